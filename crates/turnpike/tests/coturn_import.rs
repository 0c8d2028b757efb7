//! The way over from coturn, with coturn's own tools writing its stores:
//! a realistic `turnserver.conf` becomes a turnpike.toml that starts and
//! serves the users of a `turnadmin`-made database; coturn's Redis users
//! import; `user add --key` takes an MD5 key.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use turnpike::config::{ServeArgs, Settings};
use turnpike_client::client::ClientTransport;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_turnpike"))
}

fn turnadmin() -> &'static Path {
    let p = Path::new("/usr/bin/turnadmin");
    assert!(
        p.exists(),
        "turnadmin not found: install Debian's coturn package, as .ci/run does"
    );
    p
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
    let args = <Cli as clap::Parser>::parse_from(std::iter::once("turnpike").chain(argv)).args;
    Settings::from_args(args).expect("valid settings")
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    args: ServeArgs,
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
    let st = Command::new(turnadmin())
        .args(["-a", "-b", turndb.to_str().unwrap()])
        .args(["-u", "gus", "-r", "turn.example.com", "-p", "gus-pw"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "turnadmin -a");
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
use-auth-secret
static-auth-secret=north-wind-7f3a
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
    let (out, stderr) = run(bin()
        .args(["import", "coturn"])
        .arg(&conf)
        .arg("--out")
        .arg(&toml)
        .arg("--db")
        .arg(&users));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("imported gus (realm turn.example.com)"),
        "{stderr}"
    );
    // What cannot carry over is named, with why.
    assert!(stderr.contains("mobility: not supported"), "{stderr}");
    assert!(
        stderr.contains("no-udp-relay: not an option turnpike knows"),
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
    let args = ServeArgs::from_file(&toml).expect("the written file loads");
    let s = Settings::from_args(args).expect("and validates");
    assert_eq!(s.realm, "turn.example.com");
    assert_eq!(s.min_port, 49160);
    assert_eq!(s.nonce_lifetime, 600);
    assert_eq!(s.log_level, "debug");
    assert_eq!(s.external_v4, Some("203.0.113.7".parse().unwrap()));
    let denied: Vec<String> = s.deny_peer.iter().map(|c| c.to_string()).collect();
    assert!(
        denied.contains(&"10.0.0.0/8".to_owned()) && denied.contains(&"172.16.0.0/12".to_owned()),
        "coturn's ranges as CIDRs: {denied:?}"
    );
    // ...and serves: a user of coturn's database, a user of the file and a
    // REST credential from its secret, over UDP and TLS.
    let mut s = s;
    s.allow_loopback_peers = true;
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
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rest_user = format!("{}:app", now + 600);
    let rest_pw = turn_core::auth::rest_password(b"north-wind-7f3a", &rest_user);
    assert!(
        allocates(&h, &ClientTransport::Udp, &rest_user, &rest_pw),
        "REST secret"
    );
    assert!(!allocates(&h, &ClientTransport::Udp, "gus", "wrong"));
    h.shutdown();
    // --out never overwrites.
    let (out, stderr) = run(bin()
        .args(["import", "coturn"])
        .arg(&conf)
        .arg("--out")
        .arg(&toml)
        .arg("--db")
        .arg(&users));
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
