//! The `turnpike` command.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tracing::{error, info, warn};
use turnpike::config::{ServeArgs, Settings};

#[derive(Parser)]
#[command(
    name = "turnpike",
    version,
    about = "A fast, secure-by-default STUN/TURN server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the STUN/TURN server. With no options: STUN/TURN on UDP+TCP 3478,
    /// TLS on 5349 with a generated certificate, and a demo credential.
    Serve(Box<ServeArgs>),
    /// Load generator for any STUN/TURN server: relay packets/s, Binding/s,
    /// allocations/s, RSS per allocation, RTT percentiles, server CPU.
    Bench(Box<turnpike_client::bench::BenchArgs>),
    /// Manage users in the SQLite user database (keys only, never passwords).
    User {
        #[command(subcommand)]
        cmd: UserCommand,
    },
    /// Diagnose a STUN/TURN server: reachability, reflexive address, TURN
    /// allocation and relaying, with advice. Exit status 0 only if every
    /// check passed.
    Probe {
        #[command(subcommand)]
        cmd: turnpike_client::probe::ProbeCommand,
    },
    /// Bring users over from another server.
    Import {
        #[command(subcommand)]
        cmd: ImportCommand,
    },
}

#[derive(Subcommand)]
enum ImportCommand {
    /// A coturn `turnserver.conf`: writes an equivalent, commented
    /// turnpike.toml, lists what could not carry over and why, and imports
    /// the users of the coturn database it names (`userdb=`, or --turndb).
    Coturn {
        /// coturn's configuration file (e.g. /etc/turnserver.conf).
        conf: std::path::PathBuf,
        /// Write the turnpike.toml here [default: standard output].
        #[arg(long, value_name = "FILE")]
        out: Option<std::path::PathBuf>,
        /// coturn's SQLite user database to import [default: the file's userdb=].
        #[arg(long, value_name = "FILE")]
        turndb: Option<std::path::PathBuf>,
        /// turnpike's database for the users [default: as for `serve`].
        #[arg(long, value_name = "FILE")]
        db: Option<std::path::PathBuf>,
    },
    /// coturn's Redis user database: long-term users (`turn/realm/*/user/*/key`)
    /// into turnpike's store; REST secrets printed as `auth-secret`. Read only.
    CoturnRedis {
        /// coturn's `redis-userdb` string ("ip=127.0.0.1 port=6379 dbname=0") or a redis:// URL.
        source: String,
        /// turnpike's database for the users [default: as for `serve`].
        #[arg(long, value_name = "FILE", conflicts_with = "redis_url")]
        db: Option<std::path::PathBuf>,
        /// Put the users in turnpike's Redis store at URL instead (a fleet).
        #[arg(long, value_name = "URL")]
        redis_url: Option<String>,
    },
    /// coturn's SQLite user database (`turnadmin -b FILE`): its long-term
    /// users (MD5 keys) go into turnpike's database; REST secrets found are
    /// printed as `auth-secret` lines. coturn's file is only read.
    CoturnDb {
        /// coturn's database file (its `userdb`, e.g. /var/lib/turn/turndb).
        turndb: std::path::PathBuf,
        /// turnpike's database [default: as for `serve`].
        #[arg(long, value_name = "FILE")]
        db: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user; the password is read from stdin, or prompted for on a terminal.
    Add(UserArgs),
    /// Change a user's password (read like `add`).
    Passwd(UserArgs),
    /// Remove a user.
    Remove(UserArgs),
    /// List users.
    List {
        /// Only this realm.
        #[arg(long)]
        realm: Option<String>,
        /// Database file [default: as for `serve`].
        #[arg(long, value_name = "FILE")]
        db: Option<std::path::PathBuf>,
        /// Use the Redis store at URL.
        #[arg(long, value_name = "URL")]
        redis_url: Option<String>,
    },
}

#[derive(clap::Args)]
struct UserArgs {
    /// The username.
    name: String,
    /// The MD5 key (`MD5(name:realm:password)`, 32 hex digits, 0x optional,
    /// e.g. coturn's hmackey) instead of a password: MD5 logins only.
    #[arg(long, value_name = "0xHEX")]
    key: Option<String>,
    /// Realm (must match the server's realm) [default: the realm of the
    /// server configuration --config names, else "turnpike"].
    #[arg(long)]
    realm: Option<String>,
    /// Database file [default: the configuration's db, else as for `serve`].
    #[arg(long, value_name = "FILE")]
    db: Option<std::path::PathBuf>,
    /// The server's configuration, read for its realm and database
    /// [default: /etc/turnpike/turnpike.toml, when it exists].
    #[arg(long, value_name = "FILE")]
    config: Option<std::path::PathBuf>,
    /// Use the Redis store at URL instead of the SQLite file.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
}

fn import(cmd: ImportCommand) -> Result<()> {
    match cmd {
        ImportCommand::CoturnDb { turndb, db } => {
            let target = db.unwrap_or_else(turnpike::userdb::default_path);
            let got = import_turndb(&turndb, &target)?;
            if !got.secrets.is_empty() {
                println!("# REST-API secrets from coturn: put them in turnpike.toml (or Redis)");
                println!("auth-secret = {}", toml_list(got.secrets.iter().map(|(_, v)| v)));
            }
            Ok(())
        }
        ImportCommand::Coturn {
            conf,
            out,
            turndb,
            db,
        } => {
            let text =
                std::fs::read_to_string(&conf).with_context(|| format!("{}: cannot read", conf.display()))?;
            let mut c = turnpike::coturn_conf::convert(&text);
            let target = db.clone().unwrap_or_else(turnpike::userdb::default_path);
            let turndb = turndb.or(c.userdb.clone());
            let mut toml = std::mem::take(&mut c.toml);
            if let Some(f) = &turndb {
                let got = import_turndb(f, &target)?;
                if !got.users.is_empty() || db.is_some() {
                    toml.push_str(&format!(
                        "\n# the users imported from coturn's {}\ndb = {}\n",
                        f.display(),
                        toml::Value::String(target.display().to_string())
                    ));
                }
                if !got.secrets.is_empty() {
                    // Commented, not merged: the file may list auth-secret
                    // already, and a key may appear only once.
                    toml.push_str(&format!(
                        "# REST-API secrets in coturn's database: add them to auth-secret\n# {}\n",
                        toml_list(got.secrets.iter().map(|(_, v)| v))
                    ));
                }
            }
            match &out {
                Some(path) => {
                    if path.exists() {
                        anyhow::bail!("--out {}: exists; turnpike does not overwrite it", path.display());
                    }
                    std::fs::write(path, &toml).with_context(|| format!("--out {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{toml}"),
            }
            if c.not_carried.is_empty() {
                eprintln!("every setting carried over");
            } else {
                eprintln!("not carried over ({}), do these by hand:", c.not_carried.len());
                for n in &c.not_carried {
                    eprintln!("  {n}");
                }
            }
            for d in &c.differences {
                eprintln!("differs from coturn on purpose: {d}");
            }
            if let Some(r) = &c.redis_userdb {
                eprintln!(
                    "coturn keeps users in Redis: `turnpike import coturn-redis {:?}`",
                    r
                );
            }
            Ok(())
        }
        ImportCommand::CoturnRedis {
            source,
            db,
            redis_url,
        } => {
            let url = turnpike::redisdb::coturn_url(&source)?;
            let got = turnpike::redisdb::read_coturn(&url)?;
            let mut imported = 0;
            for (realm, name, key) in &got.users {
                let Some(md5) = turnpike::config::parse_md5_hex(key.trim().trim_start_matches("0x")) else {
                    eprintln!("skipped {name}@{realm}: the key is not a 32-digit MD5 hex (coturn's SHA-256 keys cannot be carried over)");
                    continue;
                };
                match &redis_url {
                    Some(u) => turnpike::redisdb::set_key(u, realm, name, md5)?,
                    None => turnpike::userdb::set_key(
                        &db.clone().unwrap_or_else(turnpike::userdb::default_path),
                        realm,
                        name,
                        md5,
                    )?,
                }
                eprintln!("imported {name} (realm {realm})");
                imported += 1;
            }
            if !got.secrets.is_empty() {
                println!("# REST-API secrets from coturn: put them in turnpike.toml (or Redis)");
                println!("auth-secret = {}", toml_list(got.secrets.iter().map(|(_, v)| v)));
            }
            eprintln!(
                "{imported} user(s) imported, {} skipped; they log in with MD5 keys until `turnpike user passwd` sets a password",
                got.users.len() - imported
            );
            Ok(())
        }
    }
}

fn toml_list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<String> = items
        .map(|s| toml::Value::String(s.clone()).to_string())
        .collect();
    format!("[{}]", v.join(", "))
}

fn import_turndb(turndb: &std::path::Path, target: &std::path::Path) -> Result<turnpike::userdb::Imported> {
    let got = turnpike::userdb::import_coturn(turndb, target)?;
    for (realm, name) in &got.users {
        eprintln!("imported {name} (realm {realm})");
    }
    for why in &got.skipped {
        eprintln!("skipped {why}");
    }
    eprintln!(
        "{} user(s) imported into {}, {} skipped; they log in with MD5 keys until their \
         password is set again with `turnpike user passwd`",
        got.users.len(),
        target.display(),
        got.skipped.len()
    );
    Ok(got)
}

fn parse_key_arg(k: &str) -> Result<[u8; 16]> {
    let hex = k.trim().trim_start_matches("0x").trim_start_matches("0X");
    turnpike::config::parse_md5_hex(hex)
        .with_context(|| format!("--key {k:?}: must be 32 hex digits, MD5(name:realm:password)"))
}

fn read_password() -> Result<String> {
    use std::io::IsTerminal;
    if std::io::stdin().is_terminal() {
        let a = rpassword::prompt_password("password: ")?;
        let b = rpassword::prompt_password("again: ")?;
        if a != b {
            anyhow::bail!("the passwords differ");
        }
        Ok(a)
    } else {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}

/// The realm and database of the server configuration a `user` command
/// can see: `--config`, else the packaged /etc/turnpike/turnpike.toml.
fn server_config(explicit: Option<&std::path::Path>) -> Result<Option<(std::path::PathBuf, ServeArgs)>> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => {
            let p = std::path::PathBuf::from("/etc/turnpike/turnpike.toml");
            if !p.exists() {
                return Ok(None);
            }
            p
        }
    };
    match ServeArgs::from_file(&path) {
        Ok(a) => Ok(Some((path, a))),
        // One the caller named must load; the default one only informs.
        Err(e) if explicit.is_some() => Err(e),
        Err(_) => Ok(None),
    }
}

/// Fills in a `user` command's realm and database from the server's
/// configuration, and warns when a given realm is not the server's: such
/// a user could never log in there (the realm is part of the key).
fn resolve_user_args(mut a: UserArgs) -> Result<(UserArgs, String)> {
    let cfg = server_config(a.config.as_deref())?;
    let server_realm = cfg
        .as_ref()
        .and_then(|(p, c)| c.realm.clone().map(|r| (p.clone(), r)));
    let realm = match (&a.realm, &server_realm) {
        (Some(r), Some((path, sr))) if r != sr => {
            eprintln!(
                "warning: realm {r:?} is not the server's realm {sr:?} (in {}): this user cannot log in to that server; \
                 drop --realm to use the server's",
                path.display()
            );
            r.clone()
        }
        (Some(r), _) => r.clone(),
        (None, Some((_, sr))) => sr.clone(),
        (None, None) => {
            eprintln!(
                "note: no --realm and no server configuration found (--config FILE): using realm \"turnpike\", the server's default"
            );
            "turnpike".to_owned()
        }
    };
    if a.db.is_none() && a.redis_url.is_none() {
        a.db = cfg.and_then(|(_, c)| c.db);
    }
    if let Some(w) = a.db.as_deref().and_then(turnpike::userdb::permission_warning) {
        eprintln!("warning: {w}");
    }
    Ok((a, realm))
}

fn user(cmd: UserCommand) -> Result<()> {
    use turnpike::{redisdb, userdb};
    let cmd = match cmd {
        UserCommand::Add(a) => {
            let (a, realm) = resolve_user_args(a)?;
            (UserCommand::Add(a), realm)
        }
        UserCommand::Passwd(a) => {
            let (a, realm) = resolve_user_args(a)?;
            (UserCommand::Passwd(a), realm)
        }
        UserCommand::Remove(a) => {
            let (a, realm) = resolve_user_args(a)?;
            (UserCommand::Remove(a), realm)
        }
        other => (other, String::new()),
    };
    let (cmd, realm) = cmd;
    match cmd {
        UserCommand::Add(a) | UserCommand::Passwd(a) if a.key.is_some() => {
            let md5 = parse_key_arg(a.key.as_deref().unwrap_or_default())?;
            match &a.redis_url {
                Some(url) => redisdb::set_key(url, &realm, &a.name, md5)?,
                None => userdb::set_key(&a.db.unwrap_or_else(userdb::default_path), &realm, &a.name, md5)?,
            }
            eprintln!("set {} in realm {} by MD5 key (MD5 logins only)", a.name, realm);
        }
        UserCommand::Add(a) => {
            let pw = read_password()?;
            match &a.redis_url {
                Some(url) => redisdb::set(url, &realm, &a.name, &pw, false)?,
                None => userdb::set(
                    &a.db.unwrap_or_else(userdb::default_path),
                    &realm,
                    &a.name,
                    &pw,
                    false,
                )?,
            }
            eprintln!("added {} to realm {}", a.name, realm);
        }
        UserCommand::Passwd(a) => {
            let pw = read_password()?;
            match &a.redis_url {
                Some(url) => redisdb::set(url, &realm, &a.name, &pw, true)?,
                None => userdb::set(
                    &a.db.unwrap_or_else(userdb::default_path),
                    &realm,
                    &a.name,
                    &pw,
                    true,
                )?,
            }
            eprintln!("changed the password of {}", a.name);
        }
        UserCommand::Remove(a) => {
            let removed = match &a.redis_url {
                Some(url) => redisdb::remove(url, &realm, &a.name)?,
                None => userdb::remove(&a.db.unwrap_or_else(userdb::default_path), &realm, &a.name)?,
            };
            if !removed {
                anyhow::bail!("no user {:?} in realm {:?}", a.name, realm);
            }
            eprintln!("removed {}", a.name);
        }
        UserCommand::List { realm, db, redis_url } => match redis_url {
            Some(url) => {
                let realm = realm.unwrap_or_else(|| "turnpike".into());
                for n in redisdb::list(&url, &realm)? {
                    println!("{realm}\t{n}");
                }
            }
            None => {
                for (r, n) in userdb::list(&db.unwrap_or_else(userdb::default_path), realm.as_deref())? {
                    println!("{r}\t{n}");
                }
            }
        },
    }
    Ok(())
}

fn main() {
    // coturn's option names get turnpike's answer, not clap's guess (which
    // once suggested --no-tls for coturn's --no-tlsv1).
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("serve") {
        let serve = <Cli as clap::CommandFactory>::command();
        let ours: Vec<&str> = serve
            .find_subcommand("serve")
            .map(|c| c.get_arguments().filter_map(|a| a.get_long()).collect())
            .unwrap_or_default();
        if let Some(why) = turnpike::coturn::explain_args(&argv[2..], &ours) {
            eprintln!("turnpike: {why}");
            std::process::exit(2);
        }
    }
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::Bench(args) => turnpike_client::bench::run(*args),
        Command::User { cmd } => user(cmd),
        Command::Import { cmd } => import(cmd),
        Command::Probe { cmd } => match turnpike_client::probe::run(cmd) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = res {
        eprintln!("turnpike: {e:#}");
        std::process::exit(2);
    }
}

/// A start-up field: the value, or "none" (clean in JSON logs, no `Some(…)`).
fn shown<T: std::fmt::Display>(v: Option<T>) -> String {
    shown_or(v, "none")
}

/// A start-up field: the value, or `absent`.
fn shown_or<T: std::fmt::Display>(v: Option<T>, absent: &str) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| absent.to_owned())
}

/// A Redis URL without its password, for logs.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// An `allow-peer` range inside a `deny-peer` range does nothing while deny
/// wins; a configuration carried over from coturn (where allow wins) meant
/// it as an exception, so say so at start and on every reload.
fn warn_shadowed_allows(settings: &Settings) {
    for (allow, deny) in settings.shadowed_allows() {
        warn!(
            allow_peer = %allow,
            deny_peer = %deny,
            "allow-peer {allow} has no effect: it lies inside deny-peer {deny}, and deny wins; \
             for an exception carved out of a denied range (coturn's allowed-peer-ip), set peer-precedence = \"allow\""
        );
    }
}

/// SIGHUP: re-reads the config file (the command line still wins) and
/// applies what can change live. A bad file is logged and ignored.
fn reload(
    cli: &ServeArgs,
    current: &Settings,
    control: &turnpike::runtime::Control,
    stores: &std::sync::Mutex<turnpike::credentials::CredentialStores>,
) -> std::result::Result<(), String> {
    let mut new = match cli.clone().load().and_then(Settings::from_args) {
        Ok(s) => s,
        Err(e) => {
            error!(error = %format!("{e:#}"), "reload failed; the current configuration stays in force");
            return Err(format!("{e:#}"));
        }
    };
    // What --external-ip-from learned at start stands until a restart.
    if new.external_ip_from.is_some() {
        new.external_v4 = new.external_v4.or(current.external_v4);
        new.external_v6 = new.external_v6.or(current.external_v6);
    }
    warn_shadowed_allows(&new);
    // The stores stay locked until the workers have the new configuration:
    // the watcher publishes under the same lock, so its merge can never
    // land after this one with an older copy of the configured users.
    let mut s = stores.lock().unwrap_or_else(|p| p.into_inner());
    s.set_configured(&new);
    s.refresh();
    new.credentials = s.merged();
    s.report_conflicts();
    for (name, changed) in [
        ("listen", new.listen != current.listen),
        ("tls-listen", new.tls_listen != current.tls_listen),
        ("threads", new.threads != current.threads),
        (
            "min-port/max-port",
            (new.min_port, new.max_port) != (current.min_port, current.max_port),
        ),
        (
            "relay-ip",
            (new.relay_v4, new.relay_v6) != (current.relay_v4, current.relay_v6),
        ),
        ("rfc5780", new.rfc5780 != current.rfc5780),
    ] {
        if changed {
            warn!(setting = name, "reload: this setting changes at the next restart");
        }
    }
    if let Some(h) = LOG_FILTER.get() {
        if let Err(e) = h.reload(tracing_subscriber::EnvFilter::new(&new.log_level)) {
            warn!(error = %e, "cannot change the log level");
        }
    }
    let applied = control.reload(&new);
    drop(s);
    match applied {
        Ok(()) => {
            info!(
                users = new.credentials.user_count(),
                secrets = new.credentials.secret_count(),
                "configuration reloaded (credentials, peer policy, TLS certificate)"
            );
            Ok(())
        }
        Err(e) => {
            error!(error = %format!("{e:#}"), "reload failed; the current configuration stays in force");
            Err(format!("{e:#}"))
        }
    }
}

/// `--reload-on-change`: the watched files' contents, compared every 2 s.
/// Contents, not mtimes: a Kubernetes ConfigMap update swaps a symlink,
/// and an editor may keep the mtime.
struct FileWatch {
    files: Vec<std::path::PathBuf>,
    last: Vec<Option<Vec<u8>>>,
    checked: std::time::Instant,
}

impl FileWatch {
    fn new(files: Vec<std::path::PathBuf>) -> Self {
        let last = files.iter().map(|f| std::fs::read(f).ok()).collect();
        FileWatch {
            files,
            last,
            checked: std::time::Instant::now(),
        }
    }

    fn changed(&mut self) -> bool {
        if self.files.is_empty() || self.checked.elapsed() < std::time::Duration::from_secs(2) {
            return false;
        }
        self.checked = std::time::Instant::now();
        let now: Vec<Option<Vec<u8>>> = self.files.iter().map(|f| std::fs::read(f).ok()).collect();
        // A file gone for a moment (being replaced) is not a change yet.
        if now.iter().any(Option::is_none) || now == self.last {
            return false;
        }
        self.last = now;
        true
    }
}

/// Re-reads the credential stores every 2 s and, when one changed, hands
/// the workers the merged credentials.
fn spawn_store_watcher(
    control: turnpike::runtime::Control,
    stores: std::sync::Arc<std::sync::Mutex<turnpike::credentials::CredentialStores>>,
    pushed: std::sync::mpsc::Receiver<()>,
) {
    std::thread::spawn(move || loop {
        // A push from the fleet's subscriber reads at once; else every 2 s.
        if pushed.recv_timeout(std::time::Duration::from_secs(2)).is_ok() {
            while pushed.try_recv().is_ok() {}
        }
        // Published under the stores' lock, as a reload is: whichever of
        // the two comes second carries every source's current state.
        let mut s = stores.lock().unwrap_or_else(|p| p.into_inner());
        if !s.refresh() {
            continue;
        }
        let creds = s.merged();
        info!(
            users = creds.user_count(),
            secrets = creds.secret_count(),
            sources = %s.counts(),
            "credential stores changed; credentials updated"
        );
        s.report_conflicts();
        control.set_credentials(creds);
    });
}

/// The log filter's reload handle (SIGHUP changes the level live).
static LOG_FILTER: std::sync::OnceLock<
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>,
> = std::sync::OnceLock::new();

/// Log output that never fails. If stderr goes away (a closed pipe, a
/// restarted log collector), tracing-subscriber reports the failed write
/// with `eprintln!`, which panics on the same broken stderr, and that would
/// kill a worker or the signal thread. Lost log lines are better.
struct LossyStderr;

impl std::io::Write for LossyStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    // Kept to re-read the file on SIGHUP with the same command line on top.
    let cli = args.clone();
    // The options as given (file under command line), for /api/config.
    let given = args.load()?;
    let mut settings = Settings::from_args(given.clone())?;
    turnpike::external_ip::discover(&mut settings)?;
    // Users from the database and Redis join the configured ones; with any
    // there, no demo credential is made up.
    let mut stores = turnpike::credentials::CredentialStores::new(&settings);
    let web_secret: Option<[u8; 32]> = settings.web.enabled().then(rand::random);
    if let Some(secret) = web_secret {
        stores.set_web_secret(secret);
    }
    stores.read_db()?;
    match stores.read_redis() {
        Ok(_) if settings.redis_url.is_some() => {
            turnpike::metrics::REDIS_UP.store(1, std::sync::atomic::Ordering::Relaxed)
        }
        Ok(_) => {}
        Err(e) => {
            turnpike::metrics::REDIS_UP.store(0, std::sync::atomic::Ordering::Relaxed);
            eprintln!("turnpike: {e:#}; starting without its users, retrying every 2 s");
        }
    }
    if !stores.demo_in_use() {
        settings.demo_user = None;
    }
    settings.credentials = stores.merged();
    let stores = std::sync::Arc::new(std::sync::Mutex::new(stores));
    // The filter sits behind a reload handle so SIGHUP can change the level.
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) =
        tracing_subscriber::reload::Layer::new(tracing_subscriber::EnvFilter::new(&settings.log_level));
    let _ = LOG_FILTER.set(handle);
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(|| LossyStderr);
    if settings.log_json {
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.json().flatten_event(true))
            .init();
    } else {
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        tracing_subscriber::registry()
            .with(filter)
            .with(fmt.with_ansi(ansi))
            .init();
    }
    // Signals are caught before anything starts, so a SIGTERM during
    // start-up stops the server cleanly instead of killing it mid-way.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGUSR1,
        signal_hook::consts::SIGHUP,
    ])?;
    let mut handle = turnpike::runtime::start(&settings)?;
    let web = web_secret.map(|secret| {
        let ports = turnpike::web::IcePorts {
            plain: handle.listen.first().map(|a| a.port()),
            tls: handle.tls_listen.first().map(|a| a.port()),
        };
        let mut w = turnpike::web::Web::new(&settings.web, secret, ports, &settings.realm, settings.redact);
        w.fast_path = handle.fast_path.clone();
        std::sync::Arc::new(w)
    });
    if let (Some(listener), Some(web)) = (handle.web_listener.take(), &web) {
        let bound = turnpike::web::serve_public(listener, web.clone())?;
        info!(url = %format!("http://{bound}/"), "public ICE test page listening");
    }
    if let (Some(listener), Some((_, token))) = (handle.admin_listener.take(), &settings.admin) {
        let (cli2, current2, control2, stores2) =
            (cli.clone(), settings.clone(), handle.control(), stores.clone());
        let reloader: turnpike::admin::Reloader =
            std::sync::Arc::new(move || reload(&cli2, &current2, &control2, &stores2));
        let bound = turnpike::admin::serve(
            listener,
            token.clone(),
            handle.control(),
            turnpike::admin::effective_config(&settings, &given),
            Some(reloader),
            web.clone().filter(|_| settings.web.ui),
        )?;
        info!(admin = %bound, "admin API listening");
        if settings.web.ui {
            info!(ice = %format!("http://{bound}/ice"), dashboard = %format!("http://{bound}/dashboard"), "operator pages listening");
        }
    }
    let auth = {
        let s = stores.lock().unwrap_or_else(|p| p.into_inner());
        s.report_conflicts();
        s.counts()
    };
    info!(
        listen = ?handle.listen,
        tls_listen = ?handle.tls_listen,
        relay_ipv4 = %shown(settings.relay_v4),
        relay_ipv6 = %shown(settings.relay_v6),
        external_ipv4 = %shown(settings.external_v4),
        external_ipv6 = %shown(settings.external_v6),
        relay_from = if settings.relay_auto {
            "the address each client reached (the above where it cannot be used)"
        } else {
            "the configured relay-ip"
        },
        relay_ports = %format!("{}-{}", settings.min_port, settings.max_port),
        realm = %settings.realm,
        auth = %auth,
        threads = settings.threads,
        allow_loopback_peers = settings.allow_loopback_peers,
        metrics = %shown_or(handle.metrics, "off"),
        admin = %shown_or(settings.admin.as_ref().map(|(a, _)| *a), "off"),
        db = %settings.db.display(),
        redis = %shown_or(settings.redis_url.as_deref().map(redact_url), "off"),
        fast_path = %handle.fast_path,
        peer_policy = %format!(
            "default deny of private/reserved ranges{}; {} allow-peer, {} deny-peer, {} wins where both match",
            if settings.allow_loopback_peers { ", loopback allowed" } else { "" },
            settings.allow_peer.len(),
            settings.deny_peer.len(),
            if settings.allow_peer_wins { "allow" } else { "deny" }
        ),
        "turnpike started"
    );
    warn_shadowed_allows(&settings);
    if let Some(w) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| turnpike::runtime::relays::ephemeral_overlap(settings.min_port, settings.max_port, &r))
    {
        warn!("{w}");
    }
    if let Some(w) = turnpike::userdb::permission_warning(&settings.db) {
        warn!("{w}");
    }
    // A configured loopback relay behind listeners that remote clients
    // reach hands them a relayed address they cannot use.
    let remote_listeners = handle
        .listen
        .iter()
        .chain(&handle.tls_listen)
        .any(|l| !l.ip().is_loopback());
    for ip in [
        settings.relay_v4.map(std::net::IpAddr::V4),
        settings.relay_v6.map(std::net::IpAddr::V6),
    ]
    .into_iter()
    .flatten()
    {
        if !settings.relay_auto && ip.is_loopback() && remote_listeners {
            warn!(
                relay_ip = %ip,
                "relay-ip is a loopback address but the listeners accept remote clients: they would get a relay \
                 they cannot reach; give relay-ip a routable address of this host (and external-ip behind NAT)"
            );
        }
    }
    if let Some(fp) = &handle.tls_fingerprint {
        if matches!(settings.tls, Some(turnpike::config::TlsSource::SelfSigned)) {
            warn!(sha256 = %fp, "TLS uses a self-signed certificate generated at start-up; give --cert and --key for production");
        } else {
            info!(sha256 = %fp, "TLS certificate loaded");
        }
    }
    if let Some((u, p)) = &settings.demo_user {
        // A probe this host can run against the defaults: the first
        // listener (a wildcard one through loopback). It relays between
        // its own two allocations, which the peer policy allows.
        let probe_url = handle
            .listen
            .first()
            .map(|a| {
                let ip = match a.ip() {
                    std::net::IpAddr::V4(v) if v.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
                    std::net::IpAddr::V6(v) if v.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
                    ip => ip,
                };
                let host = match ip {
                    std::net::IpAddr::V6(v) => format!("[{v}]"),
                    v4 => v4.to_string(),
                };
                if a.port() == 3478 {
                    format!("turn:{host}")
                } else {
                    format!("turn:{host}:{}", a.port())
                }
            })
            .unwrap_or_else(|| "turn:127.0.0.1".to_owned());
        // Printed once, to stdout, so it is not lost in log filtering; a
        // closed stdout must not stop the server, so errors are ignored.
        let banner = format!(
            "==================== DEMO CREDENTIAL ====================\n\
             \x20 No --user or --auth-secret was given, so turnpike made one\n\
             \x20 for trying it out. It changes at every start.\n\
             \x20   realm:    {}\n\
             \x20   username: {u}\n\
             \x20   password: {p}\n\
             \x20 Try it from this host:\n\
             \x20   turnpike probe turn {probe_url} --user {u} --password {p}\n\
             \x20 Configure real users with --user NAME:PASSWORD.\n\
             =========================================================\n",
            settings.realm
        );
        let mut out = std::io::stdout().lock();
        let _ = std::io::Write::write_all(&mut out, banner.as_bytes());
        let _ = std::io::Write::flush(&mut out);
    }
    let (push_tx, push_rx) = std::sync::mpsc::channel();
    spawn_store_watcher(handle.control(), stores.clone(), push_rx);
    if let Some(url) = &settings.redis_url {
        let port_of = |v6: bool| handle.listen.iter().find(|a| a.is_ipv6() == v6).map(|a| a.port());
        // Where clients reach this node, per family: the external address,
        // else a specific listen address, else the relay address.
        let advertised = |v6: bool| -> Option<std::net::SocketAddr> {
            let port = port_of(v6)?;
            let listen_ip = handle
                .listen
                .iter()
                .find(|a| a.is_ipv6() == v6 && !a.ip().is_unspecified())
                .map(|a| a.ip());
            let (external, relay) = if v6 {
                (
                    settings.external_v6.map(Into::into),
                    settings.relay_v6.map(Into::into),
                )
            } else {
                (
                    settings.external_v4.map(Into::into),
                    settings.relay_v4.map(Into::into),
                )
            };
            Some(std::net::SocketAddr::new(external.or(listen_ip).or(relay)?, port))
        };
        let (ipv4, ipv6) = (advertised(false), advertised(true));
        let name = settings
            .node_name
            .clone()
            .unwrap_or_else(|| turnpike::fleet::default_name(port_of(false).or(port_of(true)).unwrap_or(0)));
        info!(node = %name, ipv4 = %shown(ipv4), ipv6 = %shown(ipv6), "fleet: registering in redis");
        turnpike::fleet::spawn(
            turnpike::fleet::FleetConfig {
                url: url.clone(),
                name,
                lease: settings.fleet_lease,
                redirect_above: settings.redirect_above,
                ipv4,
                ipv6,
            },
            handle.control(),
            push_tx,
        );
    }
    let control = handle.control();
    let drain_timeout = settings.drain_timeout;
    let current = settings.clone();
    std::thread::spawn(move || {
        // SIGUSR1: drain. SIGTERM: drain, then exit when the last allocation
        // ends or drain-timeout passes. SIGINT, or a second SIGTERM: now.
        let mut deadline: Option<std::time::Instant> = None;
        let mut last_report = std::time::Instant::now();
        let mut watch = FileWatch::new(current.watched_files.clone());
        loop {
            if watch.changed() {
                info!("a watched file changed (reload-on-change); reloading");
                let _ = reload(&cli, &current, &control, &stores);
            }
            for sig in signals.pending() {
                match sig {
                    signal_hook::consts::SIGHUP => {
                        let _ = reload(&cli, &current, &control, &stores);
                    }
                    signal_hook::consts::SIGUSR1 => {
                        control.drain();
                        info!(
                            allocations = control.allocations(),
                            "draining: new allocations are refused"
                        );
                    }
                    signal_hook::consts::SIGTERM if deadline.is_none() => {
                        control.drain();
                        deadline = Some(std::time::Instant::now() + drain_timeout);
                        info!(
                            allocations = control.allocations(),
                            timeout_s = drain_timeout.as_secs(),
                            "SIGTERM: draining, then stopping"
                        );
                    }
                    _ => {
                        // Stop first: nothing after this line may keep the server up.
                        control.stop();
                        info!(signal = sig, "shutting down");
                        return;
                    }
                }
            }
            if let Some(d) = deadline {
                let left = control.allocations();
                if left == 0 || std::time::Instant::now() >= d {
                    control.stop();
                    info!(allocations_closed = left, "drain finished; shutting down");
                    return;
                }
                if last_report.elapsed() >= std::time::Duration::from_secs(5) {
                    info!(allocations = left, "draining");
                    last_report = std::time::Instant::now();
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    });
    let panicked = handle.join();
    if panicked > 0 {
        anyhow::bail!("{panicked} worker thread(s) panicked; this is a bug, please report it");
    }
    info!("stopped");
    Ok(())
}
