//! The way over from coturn, with coturn's own tools writing its stores:
//! a realistic `turnserver.conf` becomes a turnpike.toml that starts and
//! serves the users of a `turnadmin`-made database; coturn's Redis users
//! import; `user add --key` takes an MD5 key.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use turnpike::config::{Options, Settings};
use turnpike_client::client::ClientTransport;

fn bin() -> Command {
    Command::new(common::turnpike_bin())
}

fn turnadmin() -> &'static Path {
    let p = Path::new("/usr/bin/turnadmin");
    assert!(
        p.exists(),
        "turnadmin not found: install Debian's coturn package, as .ci/run does"
    );
    p
}

/// A user in coturn's SQLite database, written by coturn's own turnadmin.
fn add_coturn_user(turndb: &Path, name: &str, realm: &str, password: &str) {
    let st = Command::new(turnadmin())
        .args(["-a", "-b", turndb.to_str().unwrap()])
        .args(["-u", name, "-r", realm, "-p", password])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "turnadmin -a");
}

/// `turnpike import coturn CONF --out TOML --db DB`: its output and stderr.
fn import_coturn(conf: &Path, toml: &Path, db: &Path) -> (Output, String) {
    run(bin()
        .args(["import", "coturn"])
        .arg(conf)
        .arg("--out")
        .arg(toml)
        .arg("--db")
        .arg(db))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run(cmd: &mut Command) -> (Output, String) {
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr)
}

/// Starts a server as `serve` does: the configured users joined by those
/// of its database and Redis.
fn serve(mut s: Settings) -> turnpike::runtime::Handle {
    let mut stores = turnpike::credentials::CredentialStores::new(&s);
    stores.read_db().expect("the database reads");
    stores.read_redis().expect("Redis reads");
    s.credentials = stores.merged();
    turnpike::runtime::start(&s).expect("starts")
}

fn settings(extra: &[&str]) -> Settings {
    let mut argv = vec![
        "--listen",
        "127.0.0.1:0",
        "--no-tls",
        "--realm",
        "test.example",
        "--threads",
        "1",
    ];
    argv.extend_from_slice(extra);
    let args = Options::from_argv(std::iter::once("turnpike").chain(argv)).expect("valid options");
    Settings::from_options(&args).expect("valid settings")
}

fn allocates(h: &turnpike::runtime::Handle, t: &ClientTransport, user: &str, pw: &str) -> bool {
    let addr = match t {
        ClientTransport::Tls { .. } => h.tls_listen[0],
        _ => h.listen[0],
    };
    let mut c = common::client(t, addr, user, pw);
    let ok = c.allocate().is_ok();
    if ok {
        let _ = c.refresh(0);
    }
    ok
}

#[test]
fn a_coturn_conf_converts_starts_and_serves_its_users() {
    let dir = scratch("coturn-conf");
    // coturn's tool writes its database, as an operator's would be.
    let turndb = dir.join("turndb");
    add_coturn_user(&turndb, "gus", "turn.example.com", "gus-pw");
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(dir.join("turn.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("turn.key"), key.serialize_pem()).unwrap();
    // A production-like turnserver.conf (ports 0 so a test never collides).
    let conf = dir.join("turnserver.conf");
    std::fs::write(
        &conf,
        format!(
            r#"# /etc/turnserver.conf
listening-port=0
tls-listening-port=0
listening-ip=127.0.0.1
relay-ip=127.0.0.1
external-ip=203.0.113.7/127.0.0.1
min-port=49160
max-port=49400
verbose
fingerprint
lt-cred-mech
realm=turn.example.com
user=carol:carol-pw
total-quota=100
user-quota=12
stale-nonce=600
cert={dir}/turn.pem
pkey={dir}/turn.key
no-tlsv1
no-tlsv1_1
no-cli
no-multicast-peers
denied-peer-ip=10.0.0.0-10.255.255.255
denied-peer-ip=172.16.0.0-172.31.255.255
allowed-peer-ip=10.0.0.5
log-file=/var/log/turnserver.log
simple-log
pidfile="/var/run/turnserver.pid"
userdb={turndb}
mobility
no-udp-relay
"#,
            dir = dir.display(),
            turndb = turndb.display()
        ),
    )
    .unwrap();
    let before = std::fs::read(&turndb).unwrap();
    let toml = dir.join("turnpike.toml");
    let users = dir.join("users.db");
    let (out, stderr) = import_coturn(&conf, &toml, &users);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("imported gus (realm turn.example.com)"),
        "{stderr}"
    );
    // mobility carries over (RFC 8016); what cannot is named, with why.
    assert!(!stderr.contains("mobility: not supported"), "{stderr}");
    assert!(
        std::fs::read_to_string(&toml)
            .unwrap()
            .contains("\nmobility = true"),
        "mobility carried over"
    );
    assert!(
        stderr.contains("no-udp-relay: not supported: UDP relays are always offered"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&turndb).unwrap(),
        before,
        "coturn's file is only read"
    );
    let text = std::fs::read_to_string(&toml).unwrap();
    assert!(
        text.contains("# from coturn's `realm=turn.example.com`"),
        "{text}"
    );
    // It loads and validates as turnpike's configuration...
    let args = Options::from_file(&toml).expect("the written file loads");
    let s = Settings::from_options(&args).expect("and validates");
    assert_eq!(s.realm, "turn.example.com");
    assert_eq!(s.options.min_port, 49160);
    assert_eq!(s.options.nonce_lifetime, turnpike::config::Period::secs(600));
    assert_eq!(s.options.log_level, "debug");
    assert_eq!(s.external_v4, Some("203.0.113.7".parse().unwrap()));
    let denied: Vec<String> = s.options.deny_peer.iter().map(|c| c.to_string()).collect();
    assert!(
        denied.contains(&"10.0.0.0/8".to_owned()) && denied.contains(&"172.16.0.0/12".to_owned()),
        "coturn's ranges as CIDRs: {denied:?}"
    );
    // ...and serves: a user of coturn's database and a user of the file,
    // over UDP and TLS (REST credentials: the test below).
    let mut s = s;
    s.options.allow_loopback_peers = true;
    let h = serve(s);
    let tls = ClientTransport::Tls {
        pinned: h.tls_leaf.clone(),
    };
    assert!(
        allocates(&h, &ClientTransport::Udp, "gus", "gus-pw"),
        "coturn db user"
    );
    assert!(
        allocates(&h, &tls, "gus", "gus-pw"),
        "over TLS with coturn's cert"
    );
    assert!(
        allocates(&h, &ClientTransport::Udp, "carol", "carol-pw"),
        "user= line"
    );
    assert!(!allocates(&h, &ClientTransport::Udp, "gus", "wrong"));
    h.shutdown();
    // --out never overwrites.
    let (out, stderr) = import_coturn(&conf, &toml, &users);
    assert!(!out.status.success() && stderr.contains("exists"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn coturn_redis_users_import_and_keys_can_be_added() {
    let redis = common::redis_server();
    let port = redis.1;
    // coturn's own tool writes a user and a secret in its Redis layout.
    let coturn_db = format!("ip=127.0.0.1 port={port} dbname=0");
    for args in [
        &["-a", "-u", "hank", "-r", "test.example", "-p", "hank-pw"][..],
        &["-s", "redis-secret", "-r", "test.example"][..],
    ] {
        let st = Command::new(turnadmin())
            .args(args)
            .args(["-N", &coturn_db])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "turnadmin {args:?}");
    }
    let dir = scratch("coturn-redis");
    let users = dir.join("users.db");
    let (out, stderr) = run(bin()
        .args(["import", "coturn-redis", &coturn_db, "--db"])
        .arg(&users));
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("imported hank (realm test.example)"), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("auth-secret = [\"redis-secret\"]"), "{stdout}");
    // An MD5 key added by hand (coturn's `turnadmin -k` prints one).
    let k = Command::new(turnadmin())
        .args(["-k", "-u", "ivy", "-r", "test.example", "-p", "ivy-pw"])
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&k.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("0x"))
        .expect("turnadmin -k prints 0x<key>")
        .to_owned();
    let (out, stderr) = run(bin()
        .args([
            "user",
            "add",
            "ivy",
            "--realm",
            "test.example",
            "--key",
            &key,
            "--db",
        ])
        .arg(&users)
        .stdin(Stdio::null()));
    assert!(out.status.success(), "{stderr}");
    let (out, stderr) = run(bin()
        .args(["user", "add", "jo", "--key", "0x1234", "--db"])
        .arg(&users)
        .stdin(Stdio::null()));
    assert!(!out.status.success() && stderr.contains("--key"), "{stderr}");
    let h = serve(settings(&["--db", users.to_str().unwrap()]));
    assert!(
        allocates(&h, &ClientTransport::Udp, "hank", "hank-pw"),
        "imported from coturn's Redis"
    );
    assert!(
        allocates(&h, &ClientTransport::Udp, "ivy", "ivy-pw"),
        "added by key"
    );
    assert!(!allocates(&h, &ClientTransport::Udp, "ivy", "nope"));
    h.shutdown();
    // Into turnpike's own Redis store, for a fleet.
    let url = format!("redis://127.0.0.1:{port}/1");
    let (out, stderr) = run(bin().args(["import", "coturn-redis", &coturn_db, "--redis-url", &url]));
    assert!(out.status.success(), "{stderr}");
    let h = serve(settings(&["--redis-url", &url]));
    assert!(
        (0..30).any(|_| allocates(&h, &ClientTransport::Udp, "hank", "hank-pw") || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }),
        "hank from turnpike's Redis store"
    );
    h.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// What a client gets from `server` as `user`: the Allocate's outcome and,
/// when it succeeds, the CreatePermission outcome for each peer
/// (`"ok"`, or the error code).
fn outcomes(server: std::net::SocketAddr, user: &str, pw: &str, peers: &[&str]) -> Vec<String> {
    let mut c = common::client(&ClientTransport::Udp, server, user, pw);
    c.set_timeout(Duration::from_secs(2));
    let show = |r: Result<(), turnpike_client::client::ClientError>| match r {
        Ok(()) => "ok".to_owned(),
        Err(turnpike_client::client::ClientError::Error { code, .. }) => code.to_string(),
        Err(e) => format!("{e}"),
    };
    let alloc = show(c.allocate().map(|_| ()));
    let mut out = vec![format!("allocate {alloc}")];
    if alloc == "ok" {
        for p in peers {
            // Only a permission: nothing is ever sent to these addresses.
            let peer: std::net::SocketAddr = format!("{p}:5000").parse().unwrap();
            out.push(format!("{p} {}", show(c.create_permission(&[peer]))));
        }
        let _ = c.refresh(0);
    }
    out
}

/// The same turnserver.conf, served by Debian's coturn and by turnpike from
/// what `import coturn` wrote: every user and every peer gets the same
/// answer. The file carves an SFU out of a denied 10/8 (coturn's allow
/// beats deny), uses REST-API credentials only (use-auth-secret, so
/// coturn refuses its database's and `user=` users) and names a database.
#[test]
fn imported_turnpike_answers_as_coturn_did() {
    let dir = scratch("coturn-same");
    let turndb = dir.join("turndb");
    add_coturn_user(&turndb, "gus", "same.example", "gus-pw");
    let port = common::free_port();
    // The REST-API lines of each variant: with use-auth-secret, with the
    // secret alone (which coturn also takes as REST-only), and without.
    let variants = [
        "use-auth-secret\nstatic-auth-secret=same-secret\n",
        "static-auth-secret=same-secret\n",
        "",
    ];
    let conf_text = |rest: &str| {
        format!(
            "listening-ip=127.0.0.1\nlistening-port={port}\nrelay-ip=127.0.0.1\nmin-port=47000\nmax-port=47499\n\
             lt-cred-mech\n{rest}realm=same.example\nuser=carol:carol-pw\n\
             userdb={}\nno-tls\nno-dtls\nno-cli\nlog-file=/dev/null\nsimple-log\nprometheus-port=9777\n\
             denied-peer-ip=10.0.0.0-10.255.255.255\nallowed-peer-ip=10.20.30.40\n",
            turndb.display()
        )
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rest_user = format!("{}:app", now + 600);
    let rest_pw = turn_core::auth::rest_password(b"same-secret", &rest_user);
    let peers = ["10.20.30.40", "10.1.2.3", "127.0.0.1", "1.1.1.1"];
    for (variant, rest) in variants.iter().enumerate() {
        let rest_only = !rest.is_empty();
        let conf = dir.join(format!("turnserver-{variant}.conf"));
        std::fs::write(&conf, conf_text(rest)).unwrap();
        // coturn, from the file as written.
        let coturn = common::Proc(
            Command::new("/usr/bin/turnserver")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let coturn_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let answered = (0..50).any(|_| {
            let mut ch = turnpike_client::client::Channel::connect(
                &ClientTransport::Udp,
                coturn_addr,
                Duration::from_secs(1),
            )
            .unwrap();
            turnpike_client::client::binding(&mut ch, Duration::from_millis(200)).is_ok() || {
                std::thread::sleep(Duration::from_millis(100));
                false
            }
        });
        assert!(answered, "coturn answers on {coturn_addr}");
        let users = [
            ("gus", "gus-pw", "coturn database user"),
            ("carol", "carol-pw", "user= line"),
            (rest_user.as_str(), rest_pw.as_str(), "REST-API user"),
        ];
        let on_coturn: Vec<Vec<String>> = users
            .iter()
            .map(|(u, p, _)| outcomes(coturn_addr, u, p, &peers))
            .collect();
        drop(coturn);

        // turnpike, from what the importer wrote (on its own port and
        // relay range: coturn's may still be closing).
        let toml = dir.join(format!("turnpike-{variant}.toml"));
        let db = dir.join(format!("users-{variant}.db"));
        let (out, stderr) = import_coturn(&conf, &toml, &db);
        assert!(out.status.success(), "{stderr}");
        let text = std::fs::read_to_string(&toml).unwrap();
        assert!(text.contains("peer-precedence = \"allow\""), "{text}");
        assert!(text.contains("rfc5766-channel-numbers = true"), "{text}");
        assert!(
            text.contains("`prometheus-port=9777`: nothing"),
            "prometheus-port alone is explained: {text}"
        );
        let by_hand = text.split("NOT carried over").nth(1).unwrap_or("");
        for default in ["simple-log", "no-cli", "no-dtls", "lt-cred-mech"] {
            assert!(
                !by_hand.contains(default),
                "{default} is a default, not work by hand: {text}"
            );
        }
        let (server, started, _rest) = common::spawn_server(
            bin()
                .args(["serve", "--config"])
                .arg(&toml)
                .args([
                    "--listen",
                    "127.0.0.1:0",
                    "--min-port",
                    "47500",
                    "--max-port",
                    "47999",
                ])
                .args(["--threads", "1", "--log-level", "info"]),
        );
        let addr = common::listen_addr(&started);
        let on_turnpike: Vec<Vec<String>> = users
            .iter()
            .map(|(u, p, _)| outcomes(addr, u, p, &peers))
            .collect();
        drop(server);
        for ((c, t), (_, _, what)) in on_coturn.iter().zip(&on_turnpike).zip(&users) {
            assert_eq!(c, t, "{what} with {rest:?}: coturn vs imported turnpike");
        }
        // The file's exception relays on both, its denied range on neither.
        let served = if rest_only { &on_coturn[2] } else { &on_coturn[0] };
        assert_eq!(served[1], "10.20.30.40 ok", "{served:?}");
        assert_eq!(served[2], "10.1.2.3 403", "{served:?}");
        if rest_only {
            assert_eq!(
                on_coturn[0][0], "allocate 401",
                "coturn refuses database users with a REST secret"
            );
            assert!(
                stderr.contains("coturn accepts REST-API credentials only"),
                "{stderr}"
            );
        } else {
            assert_eq!(on_coturn[0][0], "allocate ok");
            assert_eq!(on_coturn[1][0], "allocate ok");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every option of the turnserver.conf Debian's coturn package installs,
/// commented out or not, fed to the importer with the file's own example
/// value: each is carried, reported as needing nothing, or explained by
/// name, and MIGRATING.md has a word for it. The stock file's active lines
/// are all coturn defaults turnpike shares, so they need nothing.
#[test]
fn every_option_of_debians_turnserver_conf_is_carried_defaulted_or_explained() {
    let Ok(stock) = std::fs::read_to_string("/etc/turnserver.conf") else {
        common::missing(
            "debian turnserver.conf",
            "/etc/turnserver.conf not found: install coturn",
        );
        return;
    };
    let migrating = include_str!("../../../../MIGRATING.md");
    let mut options: Vec<(String, String)> = Vec::new();
    let mut active = Vec::new();
    for raw in stock.lines() {
        let commented = raw.starts_with('#');
        let line = raw.trim_start_matches('#').trim_start_matches(' ');
        let key: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        let rest = &line[key.len()..];
        // An option line is a name alone or `name=value`; prose is not.
        let is_option = key.len() > 1
            && key.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && (rest.is_empty() || rest.starts_with('='));
        if !is_option {
            continue;
        }
        if !commented {
            active.push(line.to_owned());
        }
        if !options.iter().any(|(k, _)| *k == key) {
            options.push((key, line.to_owned()));
        }
    }
    assert!(
        options.len() > 80,
        "the stock file's options were found: {}",
        options.len()
    );
    let mut failures = Vec::new();
    for (key, line) in &options {
        let out = turnpike::coturn_conf::convert(&format!("{line}\n"));
        let unknown = out
            .not_carried
            .iter()
            .any(|n| n.contains("not an option turnpike knows"));
        let mentioned = out.toml.contains(&format!("`{line}`"))
            || out.toml.contains(&format!("coturn's {key}"))
            || out.not_carried.iter().any(|n| n.starts_with(line.as_str()));
        if unknown || !mentioned {
            failures.push(format!(
                "{line}: not carried, defaulted or explained\n{}",
                out.toml
            ));
        }
        if !migrating.contains(&format!("`{key}`")) {
            failures.push(format!("{key}: no word in MIGRATING.md"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The stock file as it ships: nothing by hand.
    let out = turnpike::coturn_conf::convert(&stock);
    assert!(!active.is_empty());
    for line in &active {
        assert!(
            out.toml.contains(&format!("# coturn's `{line}`: nothing")),
            "{line} is a default: {}",
            out.toml
        );
    }
    assert!(out.not_carried.is_empty(), "{:?}", out.not_carried);
}
