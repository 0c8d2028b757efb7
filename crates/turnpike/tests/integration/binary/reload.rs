//! The binary under change: SIGHUP and `POST /api/reload`, SQLite and
//! Redis stores changing under a running server, users imported from
//! coturn, in every order, losing no user and no call.

use crate::common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use turnpike_client::client::{binding, Channel, ClientTransport, TurnClient};

use super::{allocates, bin, lines, listen_addr, sigterm_and_wait, user_cmd, wait_for, Server};

fn leaf_der(cert_pem: &std::path::Path) -> Vec<u8> {
    let data = std::fs::read(cert_pem).unwrap();
    let mut reader = &data[..];
    let der = rustls_pemfile::certs(&mut reader).next().unwrap().unwrap();
    der.to_vec()
}

#[test]
fn sighup_reloads_users_and_certificate_while_calls_keep_relaying() {
    let dir = std::env::temp_dir().join(format!("turnpike-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let names = vec!["localhost".to_owned()];
    turnpike::tls::write_self_signed_pem(&names, &cert, &key).unwrap();
    let first_leaf = leaf_der(&cert);
    let cfg = dir.join("turnpike.toml");
    let write_cfg = |users: &str| {
        std::fs::write(
            &cfg,
            format!(
                "listen = [\"127.0.0.1:0\"]\ntls-listen = [\"127.0.0.1:0\"]\ncert = {:?}\nkey = {:?}\nuser = [{users}]\nallow-loopback-peers = true\nthreads = 1\ndrain-timeout = 0\n",
                cert.to_str().unwrap(),
                key.to_str().unwrap()
            ),
        )
        .unwrap()
    };
    write_cfg("\"carol:c4r0l\"");
    let mut child = bin()
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let pid = child.0.as_ref().unwrap().id() as i32;
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    let udp = listen_addr(&started);
    let tls: SocketAddr = started
        .split("tls_listen=[")
        .nth(1)
        .unwrap()
        .split(']')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let connect = |u: &str, p: &str| {
        TurnClient::new(
            Channel::connect(&ClientTransport::Udp, udp, Duration::from_secs(3)).unwrap(),
            u,
            p,
        )
    };

    // A call in progress.
    let mut carol = connect("carol", "c4r0l");
    carol.allocate().unwrap();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    carol.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
    assert!(
        connect("dave", "d4ve").allocate().is_err(),
        "dave is not a user yet"
    );

    // New user list and a renewed certificate, then SIGHUP.
    write_cfg("\"carol:c4r0l\", \"dave:d4ve\"");
    turnpike::tls::write_self_signed_pem(&names, &cert, &key).unwrap();
    let second_leaf = leaf_der(&cert);
    assert_ne!(first_leaf, second_leaf);
    // SAFETY: kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    wait_for(&err, "configuration reloaded", &mut seen);
    connect("dave", "d4ve")
        .allocate()
        .expect("dave authenticates after the reload");
    carol.send_channel(0x4000, b"call goes on").unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"call goes on", "the allocation survived the reload");
    let mut ch = Channel::connect(
        &ClientTransport::Tls {
            pinned: Some(second_leaf),
        },
        tls,
        Duration::from_secs(3),
    )
    .expect("new TLS connections get the new certificate");
    binding(&mut ch, Duration::from_secs(3)).unwrap();
    assert!(
        Channel::connect(
            &ClientTransport::Tls {
                pinned: Some(first_leaf)
            },
            tls,
            Duration::from_secs(3)
        )
        .is_err(),
        "the old certificate is no longer served"
    );

    // A broken file is refused and the running configuration stays.
    std::fs::write(&cfg, "user = 5\n").unwrap();
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGHUP);
    }
    wait_for(&err, "reload failed", &mut seen);
    connect("dave", "d4ve")
        .allocate()
        .expect("still in force after a bad reload");
    sigterm_and_wait(child);
}

#[test]
fn sqlite_users_apply_to_a_running_server_without_restart() {
    let dir = std::env::temp_dir().join(format!("turnpike-db-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("users.db");
    let dbs = db.to_str().unwrap();
    let realm = ["--realm", "db.example", "--db", dbs];
    assert!(user_cmd(&[&["add", "dave"][..], &realm].concat(), "d4ve-pw\n")
        .status
        .success());
    let out = user_cmd(&[&["add", "dave"][..], &realm].concat(), "again\n");
    assert!(!out.status.success(), "a second add of the same user is refused");
    let list = user_cmd(&["list", "--db", dbs], "");
    assert_eq!(String::from_utf8_lossy(&list.stdout), "db.example\tdave\n");
    // It holds login keys: readable by its owner only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&db).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "users.db is created {mode:o}");
    // Without --realm, the realm (and database) of the server's
    // configuration; a --realm that is not the server's is warned about.
    let cfg = dir.join("server.toml");
    std::fs::write(&cfg, format!("realm = \"db.example\"\ndb = \"{dbs}\"\n")).unwrap();
    let out = user_cmd(&["add", "fred", "--config", cfg.to_str().unwrap()], "fred-pw\n");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("added fred to realm db.example"));
    let out = user_cmd(
        &[
            "add",
            "gail",
            "--realm",
            "other.example",
            "--config",
            cfg.to_str().unwrap(),
        ],
        "gail-pw\n",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: realm \"other.example\" is not the server's realm \"db.example\""),
        "{stderr}"
    );
    assert!(
        user_cmd(&["remove", "gail", "--realm", "other.example", "--db", dbs], "")
            .status
            .success()
    );
    // An existing database others can read is warned about.
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = user_cmd(&["remove", "fred", "--config", cfg.to_str().unwrap()], "");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("readable by every user"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o600)).unwrap();
    let raw = std::fs::read(&db).unwrap();
    assert!(
        !raw.windows(7).any(|w| w == b"d4ve-pw"),
        "the password is not stored"
    );

    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "1"])
        .args(["--user", "carol:c4r0l", "--realm", "db.example", "--db", dbs])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let works = |u: &str, p: &str| allocates(addr, u, p);
    let eventually = |f: &dyn Fn() -> bool| {
        (0..50).any(|_| {
            f() || {
                std::thread::sleep(Duration::from_millis(200));
                false
            }
        })
    };
    assert!(works("dave", "d4ve-pw"), "users in the database at start");
    assert!(works("carol", "c4r0l"), "configured users too");

    assert!(user_cmd(&[&["add", "erin"][..], &realm].concat(), "erin-pw\n")
        .status
        .success());
    assert!(
        eventually(&|| works("erin", "erin-pw")),
        "a user added while running authenticates"
    );
    assert!(user_cmd(&[&["remove", "dave"][..], &realm].concat(), "")
        .status
        .success());
    assert!(
        eventually(&|| !works("dave", "d4ve-pw")),
        "a removed user is refused"
    );
    assert!(
        user_cmd(&[&["passwd", "erin"][..], &realm].concat(), "new-erin-pw\n")
            .status
            .success()
    );
    assert!(
        eventually(&|| works("erin", "new-erin-pw")),
        "a changed password applies"
    );
    assert!(!works("erin", "erin-pw"));
    assert!(works("carol", "c4r0l"), "configured users are kept");
    sigterm_and_wait(child);
}

fn sighup(child: &Server) {
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.0.as_ref().unwrap().id() as i32, libc::SIGHUP);
    }
}

/// Every order of "a credential store changed" and "SIGHUP with a new
/// user in the file": each merge carries every source's current state, so
/// no user is lost, whichever came first or whether they came together.
#[test]
fn reloads_and_store_changes_in_any_order_lose_no_user() {
    let dir = std::env::temp_dir().join(format!("turnpike-reload-order-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join("users.db");
    let dbs = db.to_str().unwrap();
    let realm = ["--realm", "ro.example", "--db", dbs];
    assert!(user_cmd(&[&["add", "dave"][..], &realm].concat(), "dave-pw\n")
        .status
        .success());
    let cfg = dir.join("turnpike.toml");
    let write_cfg = |users: &[&str]| {
        let list: Vec<String> = users.iter().map(|u| format!("\"{u}\"")).collect();
        let text = format!(
            "listen = [\"127.0.0.1:0\"]\nno-tls = true\nthreads = 2\nrealm = \"ro.example\"\ndb = \"{dbs}\"\nuser = [{}]\n",
            list.join(", ")
        );
        // Written whole then renamed, as an editor or a ConfigMap does.
        let tmp = dir.join("turnpike.toml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &cfg).unwrap();
    };
    write_cfg(&["carol:carol-pw"]);
    let mut child = bin()
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    assert!(
        started.contains("config 1 user, database 1 user"),
        "the start line counts users by source: {started}"
    );
    let addr = listen_addr(&started);
    let works = |u: &str, p: &str| {
        // Several clients: the two workers each apply updates on their own.
        (0..4).all(|_| allocates(addr, u, p))
    };
    let eventually = |u: &str, p: &str| {
        (0..40).any(|_| {
            works(u, p) || {
                std::thread::sleep(Duration::from_millis(250));
                false
            }
        })
    };
    let add = |name: &str| {
        let pw = format!("{name}-pw\n");
        assert!(user_cmd(&[&["add", name][..], &realm].concat(), &pw)
            .status
            .success());
    };
    // 1. A store change, then SIGHUP with a new user in the file (the
    //    order that lost the file's new user).
    add("erin");
    assert!(eventually("erin", "erin-pw"), "the database's new user");
    write_cfg(&["carol:carol-pw", "frank:frank-pw"]);
    sighup(&child);
    wait_for(&err, "configuration reloaded", &mut seen);
    assert!(
        eventually("frank", "frank-pw"),
        "the file's new user after a store change and SIGHUP"
    );
    // 2. SIGHUP, then a store change.
    write_cfg(&["carol:carol-pw", "frank:frank-pw", "gina:gina-pw"]);
    sighup(&child);
    wait_for(&err, "configuration reloaded", &mut seen);
    add("hank");
    assert!(eventually("hank", "hank-pw"), "the database's user after SIGHUP");
    assert!(
        works("gina", "gina-pw"),
        "the reload's user survives the store change"
    );
    // 3. Both at once: the store changes and SIGHUP arrives before the
    //    watcher's next look.
    add("ivan");
    write_cfg(&["carol:carol-pw", "frank:frank-pw", "gina:gina-pw", "jill:jill-pw"]);
    sighup(&child);
    wait_for(&err, "configuration reloaded", &mut seen);
    assert!(eventually("ivan", "ivan-pw"), "the store's user");
    assert!(eventually("jill", "jill-pw"), "the file's user");
    // Nobody was lost on the way.
    for u in ["carol", "dave", "erin", "frank", "gina", "hank"] {
        assert!(works(u, &format!("{u}-pw")), "{u} still authenticates");
    }
    // A name in the file and in the database with different keys is
    // reported, with the source that wins.
    write_cfg(&["carol:carol-pw", "dave:another-pw"]);
    sighup(&child);
    let warned = wait_for(&err, "defined in two credential sources", &mut seen);
    assert!(
        warned.contains("dave") && warned.contains("wins=database") && warned.contains("shadowed=config"),
        "{warned}"
    );
    assert!(
        works("dave", "dave-pw"),
        "the database's key is the one that works, as reported"
    );
    sigterm_and_wait(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn redis_users_and_secrets_serve_and_survive_a_redis_outage() {
    let redis = common::redis_server();
    let url = format!("redis://127.0.0.1:{}/0", redis.1);
    let realm = ["--realm", "fleet.example", "--redis-url", &url];
    assert!(user_cmd(&[&["add", "frank"][..], &realm].concat(), "fr4nk-pw\n")
        .status
        .success());
    let list = user_cmd(&["list", "--realm", "fleet.example", "--redis-url", &url], "");
    assert_eq!(String::from_utf8_lossy(&list.stdout), "fleet.example\tfrank\n");
    // A REST-API secret shared by the fleet.
    assert!(Command::new("redis-cli")
        .args([
            "-p",
            &redis.1.to_string(),
            "SADD",
            "turnpike:secrets",
            "fleet-secret"
        ])
        .output()
        .unwrap()
        .status
        .success());

    // A database with no user of this realm: Redis alone supplies them.
    let empty_db = std::env::temp_dir().join(format!("turnpike-redis-db-{}.db", std::process::id()));
    let _ = std::fs::remove_file(&empty_db);
    turnpike::userdb::set(&empty_db, "elsewhere.example", "nobody", "pw", false).unwrap();
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--threads",
            "1",
            "--db",
            empty_db.to_str().unwrap(),
        ])
        .args([
            "--realm",
            "fleet.example",
            "--redis-url",
            &url,
            "--metrics-listen",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    let addr = listen_addr(&started);
    let metrics: SocketAddr = started
        .split("metrics=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .expect("metrics=ADDR in the start-up line");
    let redis_up = || {
        scrape(metrics)
            .lines()
            .find_map(|l| l.strip_prefix("turnpike_redis_up ").map(str::to_owned))
    };
    assert_eq!(
        redis_up().as_deref(),
        Some("1"),
        "the documented metric is rendered"
    );
    let works = |u: &str, p: &str| allocates(addr, u, p);
    assert!(works("frank", "fr4nk-pw"), "a Redis user authenticates");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let rest_user = format!("{}:bot", now + 600);
    let rest_pw = turn_core::auth::rest_password(b"fleet-secret", &rest_user);
    assert!(works(&rest_user, &rest_pw), "a REST secret from Redis works");

    // A user added while the server runs applies within seconds.
    assert!(user_cmd(&[&["add", "gina"][..], &realm].concat(), "g1na-pw\n")
        .status
        .success());
    assert!(
        (0..50).any(|_| works("gina", "g1na-pw") || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }),
        "a Redis user added while running authenticates"
    );

    // Redis goes away: the cached credentials keep serving, and it is said.
    drop(redis);
    wait_for(&err, "redis unavailable", &mut seen);
    assert!(works("frank", "fr4nk-pw"), "cached users survive the outage");
    assert_eq!(redis_up().as_deref(), Some("0"), "the outage shows in metrics");
    sigterm_and_wait(child);
}

fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn http_delete(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    super::http(addr, "DELETE", path, token)
}

fn http_post(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    super::http(addr, "POST", path, token)
}

#[test]
fn admin_reload_endpoint_applies_and_rejects() {
    let dir = std::env::temp_dir().join(format!("turnpike-adminreload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("t.toml");
    let token = "admin-reload-token-0123456789";
    let write = |users: &str| {
        std::fs::write(
            &cfg,
            format!("listen = [\"127.0.0.1:0\"]\nno-tls = true\nthreads = 1\ndrain-timeout = 0\nuser = [{users}]\nadmin-listen = \"127.0.0.1:0\"\nadmin-token = \"{token}\"\n"),
        )
        .unwrap()
    };
    write("\"carol:c4r0l\"");
    let mut child = bin()
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let udp = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let admin_line = seen
        .iter()
        .find(|l| l.contains("admin API listening"))
        .cloned()
        .unwrap_or_else(|| wait_for(&err, "admin API listening", &mut seen));
    let admin: SocketAddr = admin_line
        .split("admin=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let works = |u: &str, p: &str| {
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Udp, udp, Duration::from_secs(3)).unwrap(),
            u,
            p,
        );
        c.set_timeout(Duration::from_secs(2));
        c.allocate().is_ok()
    };
    assert!(!works("dave", "d4ve"));
    write("\"carol:c4r0l\", \"dave:d4ve\"");
    let (code, _) = http_post(admin, "/api/reload", token);
    assert_eq!(code, 200);
    let line = wait_for(&err, "admin: reload requested", &mut seen);
    assert!(line.contains("caller=127.0.0.1:"), "the caller is named: {line}");
    assert!(works("dave", "d4ve"), "reloaded through the admin API");
    let (code, _) = http_post(admin, "/api/drain", token);
    assert_eq!(code, 200);
    assert!(wait_for(&err, "admin: drain on", &mut seen).contains("caller=127.0.0.1:"));
    let (code, _) = http_delete(admin, "/api/drain", token);
    assert_eq!(code, 200);
    assert!(wait_for(&err, "admin: drain off", &mut seen).contains("caller=127.0.0.1:"));
    // Limits reload too: dave holds one allocation; a quota of one refuses a second.
    let text = std::fs::read_to_string(&cfg).unwrap() + "user-quota = 1\n";
    std::fs::write(&cfg, text).unwrap();
    assert_eq!(http_post(admin, "/api/reload", token).0, 200);
    let mut second = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, udp, Duration::from_secs(3)).unwrap(),
        "dave",
        "d4ve",
    );
    match second.allocate() {
        Err(turnpike_client::client::ClientError::Error { code: 486, .. }) => {}
        other => panic!("user-quota reloaded: expected 486, got {other:?}"),
    }
    std::fs::write(&cfg, "user = 5\n").unwrap();
    let (code, body) = http_post(admin, "/api/reload", token);
    assert_eq!(code, 422, "{body}");
    assert_eq!(http_post(admin, "/api/reload", "wrong-token-wrong-token").0, 401);
    sigterm_and_wait(child);
}

#[test]
fn coturn_users_are_imported_and_log_in() {
    let turnadmin = std::path::Path::new("/usr/bin/turnadmin");
    assert!(
        turnadmin.exists(),
        "turnadmin not found: install Debian's coturn package, as .ci/run does"
    );
    let dir = std::env::temp_dir().join(format!("turnpike-import-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let turndb = dir.join("turndb");
    // coturn's own tool writes its database, as an operator's would be.
    let st = Command::new(turnadmin)
        .args([
            "-a",
            "-b",
            turndb.to_str().unwrap(),
            "-u",
            "gus",
            "-r",
            "import.example",
            "-p",
            "gus-pw",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "turnadmin -a");
    let before = std::fs::read(&turndb).unwrap();
    let users = dir.join("users.db");
    let out = bin()
        .args([
            "import",
            "coturn-db",
            turndb.to_str().unwrap(),
            "--db",
            users.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("imported gus (realm import.example)"), "{stderr}");
    assert_eq!(
        std::fs::read(&turndb).unwrap(),
        before,
        "coturn's file is only read"
    );
    // Pointed at coturn's own file as the target, it refuses.
    let out = bin()
        .args([
            "import",
            "coturn-db",
            turndb.to_str().unwrap(),
            "--db",
            turndb.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    // The imported user logs in against turnpike with the coturn password.
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "1"])
        .args(["--realm", "import.example", "--db", users.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        "gus",
        "gus-pw",
    );
    c.allocate().expect("an imported coturn user authenticates");
    c.refresh(0).unwrap();
    sigterm_and_wait(child);
    let _ = std::fs::remove_dir_all(&dir);
}
