//! The `turnpike` command.
#![forbid(unsafe_code)]

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use turnpike::config::Options;

#[derive(Parser)]
#[command(
    name = "turnpike",
    version,
    about = "A fast, secure-by-default STUN/TURN server"
)]
struct Cli {
    #[command(subcommand)]
    command: Subcommands,
}

#[derive(Subcommand)]
enum Subcommands {
    /// Run the STUN/TURN server. With no options: STUN/TURN on UDP+TCP 3478,
    /// TLS on 5349 with a generated certificate, and a demo credential.
    Serve(Box<Options>),
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
    /// Watch STUN/TURN servers from outside, every --interval: up, RTTs,
    /// certificate expiry and security drift (open relay, internal peers,
    /// SOFTWARE, 401 size), as Prometheus metrics or once as JSON.
    Watch(Box<turnpike_client::probe::watch::WatchArgs>),
    /// Bring users over from another server.
    Import {
        #[command(subcommand)]
        cmd: ImportCommand,
    },
    /// Upgrade a running server's binary without dropping calls: it hands
    /// its sockets and UDP allocations to the binary at the path it was
    /// started from (after a package upgrade, the new one). Asks through
    /// the admin API and prints the outcome; exit status 0 only if the new
    /// process serves.
    Upgrade(UpgradeArgs),
}

#[derive(clap::Args)]
struct UpgradeArgs {
    /// The server's admin API (its --admin-listen).
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:9642")]
    admin: std::net::SocketAddr,
    /// File holding the admin token (its --admin-token-file).
    #[arg(long, value_name = "FILE", default_value = "/etc/turnpike/admin-token")]
    token_file: std::path::PathBuf,
    /// Send SIGUSR2 to this process instead, without the admin API (the
    /// outcome is then in its log and turnpike_upgrades_total).
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
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
    /// coturn's PostgreSQL or MySQL/MariaDB user database (`psql-userdb`,
    /// `mysql-userdb`): long-term users (`turnusers_lt`) into turnpike's
    /// store; REST secrets
    /// (`turn_secret`) printed as `auth-secret`. Read only. (`--db-url`
    /// serves from that database directly, without an import.)
    CoturnSql {
        /// coturn's psql-userdb string ("host=… dbname=… user=… password=…"),
        /// its mysql-userdb string with --mysql, or a postgres:// or mysql://
        /// URL.
        source: String,
        /// SOURCE is coturn's mysql-userdb string (MySQL or MariaDB).
        #[arg(long)]
        mysql: bool,
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
            import_keys(&got.users, &got.secrets, db, redis_url.as_deref())
        }
        ImportCommand::CoturnSql {
            source,
            mysql,
            db,
            redis_url,
        } => {
            let source = match mysql && !source.contains("://") {
                true => turnpike::sqldb::mysql_url_from_coturn(&source)
                    .context("--mysql: the source is not coturn's mysql-userdb string (host=… dbname=… user=… [password=…] [port=…])")?,
                false => source,
            };
            let got = turnpike::sqldb::read_coturn(&source)?;
            import_keys(&got.users, &got.secrets, db, redis_url.as_deref())
        }
    }
}

/// coturn's users (realm, name, hex key) into turnpike's SQLite database,
/// or its Redis store; its REST secrets printed as an `auth-secret` line.
fn import_keys(
    users: &[(String, String, String)],
    secrets: &[(String, String)],
    db: Option<std::path::PathBuf>,
    redis_url: Option<&str>,
) -> Result<()> {
    let mut imported = 0;
    for (realm, name, key) in users {
        let Some(md5) = turnpike::config::parse_md5_hex(key.trim().trim_start_matches("0x")) else {
            eprintln!("skipped {name}@{realm}: the key is not a 32-digit MD5 hex (coturn's SHA-256 keys cannot be carried over)");
            continue;
        };
        match redis_url {
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
    if !secrets.is_empty() {
        println!("# REST-API secrets from coturn: put them in turnpike.toml (or Redis)");
        println!("auth-secret = {}", toml_list(secrets.iter().map(|(_, v)| v)));
    }
    eprintln!(
        "{imported} user(s) imported, {} skipped; they log in with MD5 keys until `turnpike user passwd` sets a password",
        users.len() - imported
    );
    Ok(())
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
fn server_config(explicit: Option<&std::path::Path>) -> Result<Option<(std::path::PathBuf, Options)>> {
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
    match Options::from_file(&path) {
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
    let server_realm = cfg.as_ref().map(|(p, c)| (p.clone(), c.realm.clone()));
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
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let res = match cli.command {
        Subcommands::Serve(_) => serve(matches.subcommand_matches("serve")),
        Subcommands::Bench(args) => turnpike_client::bench::run(*args),
        Subcommands::User { cmd } => user(cmd),
        Subcommands::Import { cmd } => import(cmd),
        Subcommands::Upgrade(args) => upgrade(args),
        Subcommands::Watch(args) => match turnpike_client::probe::watch::run(*args) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
        Subcommands::Probe { cmd } => match turnpike_client::probe::run(cmd) {
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

/// `turnpike upgrade`: `POST /api/upgrade` (or SIGUSR2 with --pid).
fn upgrade(args: UpgradeArgs) -> Result<()> {
    use std::io::{Read, Write};
    if let Some(pid) = args.pid {
        let status = std::process::Command::new("kill")
            .args(["-USR2", &pid.to_string()])
            .status()
            .context("kill")?;
        anyhow::ensure!(status.success(), "cannot signal process {pid}");
        println!("sent SIGUSR2 to {pid}; its log says how the upgrade went (lines starting \"upgrade\")");
        return Ok(());
    }
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("token-file {}", args.token_file.display()))?;
    let mut s = std::net::TcpStream::connect_timeout(&args.admin, std::time::Duration::from_secs(5))
        .with_context(|| format!("admin {}: is --admin-listen set there?", args.admin))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(90)))?;
    write!(
        s,
        "POST /api/upgrade HTTP/1.0\r\nHost: {}\r\nAuthorization: Bearer {}\r\nContent-Length: 0\r\n\r\n",
        args.admin,
        token.trim()
    )?;
    let mut reply = String::new();
    s.read_to_string(&mut reply)
        .context("reading the admin API's answer")?;
    let status = reply.split_whitespace().nth(1).unwrap_or("");
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    println!("{body}");
    match status {
        "200" => Ok(()),
        "401" => anyhow::bail!("the admin API refused the token"),
        _ => std::process::exit(1),
    }
}

/// `turnpike serve`: the options the user typed (not clap's defaults, so
/// the config file can set what the command line leaves out).
fn serve(matches: Option<&clap::ArgMatches>) -> Result<()> {
    let matches = matches.context("serve: no arguments")?;
    let command_line = turnpike::config::CommandLine::from_matches(matches)?;
    turnpike::node::Node::start(command_line)?.run()
}
