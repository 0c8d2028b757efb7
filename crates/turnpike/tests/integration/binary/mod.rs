//! The `turnpike` binary itself: the no-argument default that README
//! promises, clean shutdown on SIGTERM, and configuration errors that name
//! the field. Its log lines are in `logs.rs`; reloads, stores and the
//! admin API's reload in `reload.rs`; what README, `--help` and deploy/
//! promise in `docs.rs`.

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use turnpike_client::client::{binding, Channel, ClientTransport, TurnClient};

mod docs;
mod logs;
mod reload;
mod upgrade;
mod upgrade_load;

pub(super) fn bin() -> Command {
    Command::new(common::turnpike_bin())
}

/// Collects a child's output lines on a channel.
pub(super) fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

pub(super) fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) -> String {
    loop {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(l) => {
                seen.push(l.clone());
                if l.contains(needle) {
                    return l;
                }
            }
            Err(_) => panic!("no line with {needle:?}; got:\n{}", seen.join("\n")),
        }
    }
}

/// Kills the server if a test fails before stopping it.
pub(super) struct Server(pub(super) Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) fn sigterm_and_wait(mut server: Server) -> std::process::ExitStatus {
    let mut child = server.0.take().unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    // Nothing is live, so SIGTERM's drain ends at once; 10 s (not the
    // 30 s drain-timeout) leaves room for a loaded machine.
    for _ in 0..200 {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not exit within 10 s of SIGTERM");
}

/// Whether `user` can allocate over UDP at `addr` (the allocation is then
/// deleted).
pub(super) fn allocates(addr: SocketAddr, user: &str, password: &str) -> bool {
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        user,
        password,
    );
    c.set_timeout(Duration::from_secs(2));
    let ok = c.allocate().is_ok();
    if ok {
        // Deleted for sure: one left behind (a Refresh 0 answered too late
        // on a loaded machine) would hold a later SIGTERM's drain open.
        for _ in 0..3 {
            match c.refresh(0) {
                Ok(_) | Err(turnpike_client::client::ClientError::Error { code: 437, .. }) => break,
                Err(_) => continue,
            }
        }
    }
    ok
}

/// The demo credential the banner prints on stdout: (username, password).
pub(super) fn demo_credential(out: &mpsc::Receiver<String>, banner: &mut Vec<String>) -> (String, String) {
    let mut value = |label: &str| {
        wait_for(out, label, banner)
            .split(':')
            .nth(1)
            .unwrap()
            .trim()
            .to_owned()
    };
    (value("username:"), value("password:"))
}

pub(super) fn listen_addr(line: &str) -> SocketAddr {
    let rest = line
        .split("listen=[")
        .nth(1)
        .expect("listen=[...] in the start-up line");
    rest.split([']', ',']).next().unwrap().trim().parse().unwrap()
}

#[test]
fn serve_without_arguments_is_useful() {
    let mut child = bin()
        .arg("serve")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    assert!(started.contains("3478") && started.contains("5349"), "{started}");
    let mut banner = Vec::new();
    let (user, password) = demo_credential(&out, &mut banner);
    assert!(banner.iter().any(|l| l.contains("DEMO CREDENTIAL")), "{banner:?}");
    // The banner's probe command, run as printed, passes against the
    // defaults (it relays between its own two allocations).
    let probe = wait_for(&out, "turnpike probe turn", &mut banner);
    let words: Vec<&str> = probe.split_whitespace().collect();
    assert_eq!(&words[..3], ["turnpike", "probe", "turn"], "{probe}");
    let run = bin()
        .args(&words[1..])
        .args(["--transport", "udp,tcp", "--tcp-relay"])
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "`{probe}` fails against the defaults:\n{}",
        String::from_utf8_lossy(&run.stdout)
    );
    let fp = wait_for(&err, "self-signed", &mut seen);
    assert!(
        fp.contains("sha256="),
        "fingerprint of the generated cert is logged: {fp}"
    );

    let udp: SocketAddr = "127.0.0.1:3478".parse().unwrap();
    let mut ch = Channel::connect(&ClientTransport::Udp, udp, Duration::from_secs(3)).unwrap();
    binding(&mut ch, Duration::from_secs(3)).unwrap();
    // TURN works with the printed demo credential.
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, udp, Duration::from_secs(3)).unwrap(),
        &user,
        &password,
    );
    c.allocate().unwrap();
    c.refresh(0).unwrap();
    // TLS on 5349 with the generated certificate.
    let tls: SocketAddr = "127.0.0.1:5349".parse().unwrap();
    let mut ch = Channel::connect(
        &ClientTransport::Tls { pinned: None },
        tls,
        Duration::from_secs(3),
    )
    .unwrap();
    binding(&mut ch, Duration::from_secs(3)).unwrap();

    // A second server on the same ports refuses to start instead of
    // silently sharing them through SO_REUSEPORT.
    let out = bin().arg("serve").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("address in use"), "{stderr}");

    let st = sigterm_and_wait(child);
    assert!(st.success(), "clean exit on SIGTERM: {st:?}");
}

#[test]
fn config_file_and_sigterm() {
    let dir = std::env::temp_dir().join(format!("turnpike-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("turnpike.toml");
    std::fs::write(
        &cfg,
        "listen = [\"127.0.0.1:0\"]\nno-tls = true\nrealm = \"file.example\"\nuser = [\"carol:c4r0l\"]\nthreads = 1\ndrain-timeout = 0\n",
    )
    .unwrap();
    let mut child = bin()
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    assert!(started.contains("file.example"), "{started}");
    let addr = listen_addr(&started);
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        "carol",
        "c4r0l",
    );
    c.allocate().unwrap();
    let st = sigterm_and_wait(child);
    assert!(st.success(), "{st:?}");
    let rest: Vec<String> = err.try_iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("allocation deleted")),
        "allocations are closed and logged at shutdown: {rest:?}"
    );
}

#[test]
fn bad_configuration_names_the_field() {
    let dir = std::env::temp_dir().join(format!("turnpike-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "realm = \"x\"\nrelay-port = 5\n").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--min-port".into(),
                "60000".into(),
                "--max-port".into(),
                "50000".into(),
            ],
            "min-port",
        ),
        (
            vec!["--config".into(), cfg.to_str().unwrap().into()],
            "relay-port",
        ),
        (
            vec!["--config".into(), "/nonexistent/turnpike.toml".into()],
            "cannot read",
        ),
        (vec!["--user".into(), "nopassword".into()], "NAME:PASSWORD"),
        (vec!["--allow-peer".into(), "10.0.0.0/40".into()], "allow-peer"),
        // A bare word that is no level would silence every log line.
        (vec!["--log-level".into(), "verbose".into()], "log-level"),
        (vec!["--log-level".into(), "warning".into()], "did you mean warn"),
        // Relay sockets could never bind there: every Allocate would be 508.
        (
            vec!["--relay-ip".into(), "192.0.2.77".into()],
            "not an address of this host",
        ),
    ];
    for (args, needle) in cases {
        let out = bin().arg("serve").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}

#[test]
fn privileged_relay_ports_are_refused_without_the_right() {
    // Run as nobody (needs root to switch, and setpriv from util-linux).
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    let root = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"));
    if !root || !setpriv.exists() {
        common::missing(
            "privileged relay ports",
            "needs root and setpriv to run the server unprivileged",
        );
        return;
    }
    let unprivileged_start =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap_or_default();
    if unprivileged_start.trim().parse::<u16>().unwrap_or(1024) <= 500 {
        common::missing(
            "privileged relay ports",
            "this host lets anyone bind low ports (ip_unprivileged_port_start)",
        );
        return;
    }
    let mut child = Command::new(setpriv)
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(common::turnpike_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--min-port",
            "500",
            "--max-port",
            "600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // It must refuse at once; a server that starts is stopped after 5 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr);
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(2),
        "it started instead of refusing: {stderr}"
    );
    assert!(
        stderr.contains("min-port 500") && stderr.contains("CAP_NET_BIND_SERVICE"),
        "{stderr}"
    );
}

#[test]
fn drain_refuses_new_allocations_then_exits_after_the_last_one() {
    let admin: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
    let token = "drain-test-admin-token-0123";
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--user",
            "a:b",
            "--threads",
            "1",
        ])
        .args(["--drain-timeout", "20", "--allow-loopback-peers"])
        .args(["--admin-listen", &admin.to_string(), "--admin-token", token])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let mut child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let connect = || {
        TurnClient::new(
            Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
            "a",
            "b",
        )
    };
    let mut held = connect();
    held.allocate().unwrap();
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    held.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();

    let pid = child.0.as_ref().unwrap().id() as i32;
    // SAFETY: kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGUSR1);
    }
    wait_for(&err, "draining", &mut seen);
    let mut newcomer = connect();
    match newcomer.allocate() {
        Err(turnpike_client::client::ClientError::Error { code: 508, .. }) => {}
        other => panic!("a draining server must refuse new allocations: {other:?}"),
    }
    // The existing allocation still relays.
    held.send_channel(0x4000, b"still here").unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"still here");

    // SIGTERM waits for the last allocation...
    #[allow(unsafe_code)]
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        child.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "exited while an allocation was live"
    );
    // A drain to stop cannot be undone (the dashboard's button, the API):
    // the server would take calls it is about to cut.
    let (code, body) = common::http_request(admin, "DELETE", "/api/drain", Some(token)).unwrap();
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("draining to stop"), "{body}");
    assert!(matches!(
        connect().allocate(),
        Err(turnpike_client::client::ClientError::Error { code: 508, .. })
    ));
    // ...and exits once it ends.
    held.refresh(0).unwrap();
    let mut exited = None;
    for _ in 0..50 {
        if let Some(st) = child.0.as_mut().unwrap().try_wait().unwrap() {
            exited = Some(st);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let st = exited.expect("exits after the last allocation ends");
    assert!(st.success(), "{st:?}");
    child.0 = None;
}

/// An idle server sleeps: no thread polls in a loop (a store watcher
/// once spun on a channel nobody would ever send on, taking a core). A
/// spinning thread spends about as much CPU as wall time; an idle server
/// spends next to none.
#[test]
fn an_idle_server_uses_no_cpu() {
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "2"])
        .args(["--user", "idle:idle-pw", "--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let pid = child.id();
    let child = Server(Some(child));
    let mut seen = Vec::new();
    wait_for(&err, "turnpike started", &mut seen);
    let cpu = || -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // utime and stime, fields 14 and 15, after the parenthesised name.
        let rest = stat.rsplit_once(')').unwrap().1;
        let f: Vec<u64> = rest.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        f[10] + f[11]
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(3));
    let ticks = cpu() - before;
    // Clock ticks are 1/100 s: 3 s of spinning is about 300.
    assert!(ticks < 30, "{ticks} ticks of CPU in 3 s idle");
    sigterm_and_wait(child);
}

#[test]
fn a_missing_db_or_a_malformed_redis_url_is_refused() {
    let missing = std::env::temp_dir().join(format!("turnpike-typo-{}/users.db", std::process::id()));
    let out = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--db",
            missing.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no such file") && stderr.contains("turnpike user add"),
        "{stderr}"
    );
    // `user list` on a mistyped path makes nothing.
    let list = user_cmd(&["list", "--db", missing.to_str().unwrap()], "");
    assert!(!list.status.success());
    assert!(!missing.parent().unwrap().exists(), "no directory was made");
    let out = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--redis-url",
            "redis//nohost",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("redis-url") && stderr.contains("redis://"),
        "{stderr}"
    );
}

#[test]
fn coturn_names_and_files_are_recognised() {
    for (args, needle) in [
        (&["--static-auth-secret=s3cret"][..], "--auth-secret"),
        (&["--listening-port", "3478"], "--listen IP:PORT"),
        (&["--lt-cred-mech"], "always on"),
        (&["--no-tlsv1"], "never offered"),
        (&["-c", "/etc/turnserver.conf"], "--config"),
    ] {
        let out = bin().arg("serve").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains("coturn") && stderr.contains(needle),
            "{args:?}: {stderr}"
        );
        assert!(
            !stderr.contains("similar argument"),
            "no guess at a turnpike flag: {stderr}"
        );
    }
    let dir = std::env::temp_dir().join(format!("turnpike-coturnconf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("turnserver.conf");
    std::fs::write(
        &conf,
        "listening-port=3478\nfingerprint\nlt-cred-mech\nuser=alice:pw\nrealm=example.org\n",
    )
    .unwrap();
    let out = bin()
        .args(["serve", "--config", conf.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("coturn turnserver.conf") && stderr.contains("MIGRATING.md"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_expired_certificate_is_refused_with_its_date() {
    let dir = std::env::temp_dir().join(format!("turnpike-expired-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2019, 1, 1);
    params.not_after = rcgen::date_time_ymd(2020, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    let out = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-listen", "127.0.0.1:0"])
        .args(["--cert", c.to_str().unwrap(), "--key", k.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("expired on 2020-01-01"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_loopback_relay_behind_a_public_listener_is_warned_about() {
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--no-tls",
            "--relay-ip",
            "127.0.0.1",
        ])
        .args(["--user", "a:b", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let line = wait_for(&err, "relay-ip is a loopback address", &mut seen);
    assert!(line.contains("127.0.0.1"), "{line}");
    sigterm_and_wait(child);
}

/// Every listener of the server is refused as a peer, whatever
/// --allow-loopback-peers and --allow-peer say: the admin API, metrics and
/// the public web page included, over UDP relays (CreatePermission,
/// ChannelBind) and RFC 6062 Connect, and behind a wildcard HTTP
/// listener through any loopback address. A single-host SFU setup needs
/// loopback peers; it must not hand TURN users /metrics.
#[test]
fn the_servers_own_listeners_are_never_peers() {
    let (admin, metrics, web) = (common::free_port(), common::free_port(), common::free_port());
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "2"])
        .args([
            "--realm",
            "own.example",
            "--user",
            "olga:olga-pw",
            "--allow-loopback-peers",
        ])
        .args(["--allow-peer", "127.0.0.0/8"])
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--admin-token",
            "own-listeners-token-1234",
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(["--web-listen", &format!("0.0.0.0:{web}"), "--drain-timeout", "0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    // The HTTP servers run on the listeners bound at start.
    for port in [admin, metrics, web] {
        let path = if port == metrics { "/metrics" } else { "/healthz" };
        let path = if port == web { "/" } else { path };
        let (code, _) =
            common::http_request(format!("127.0.0.1:{port}").parse().unwrap(), "GET", path, None).unwrap();
        assert_eq!(code, 200, "port {port} serves {path}");
    }
    let refused = |r: Result<(), turnpike_client::client::ClientError>| {
        matches!(
            r,
            Err(turnpike_client::client::ClientError::Error { code: 403, .. })
        )
    };
    let mut udp = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        "olga",
        "olga-pw",
    );
    udp.allocate().unwrap();
    let mut tcp = TurnClient::new(
        Channel::connect(&ClientTransport::Tcp, addr, Duration::from_secs(3)).unwrap(),
        "olga",
        "olga-pw",
    );
    tcp.set_tcp_relay(true);
    tcp.allocate().unwrap();
    let mut channel = 0x4000;
    let mut targets: Vec<SocketAddr> = vec![addr];
    for port in [admin, metrics, web] {
        targets.push(format!("127.0.0.1:{port}").parse().unwrap());
    }
    // The wildcard web listener answers on every loopback address.
    targets.push(format!("127.0.0.7:{web}").parse().unwrap());
    for peer in targets {
        assert!(refused(udp.create_permission(&[peer])), "CreatePermission {peer}");
        assert!(refused(udp.channel_bind(channel, peer)), "ChannelBind {peer}");
        channel += 1;
        let connect = tcp.connect(peer).map(|_| ());
        assert!(refused(connect), "RFC 6062 Connect {peer}");
    }
    // Loopback peers that are not the server's own stay allowed.
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = other.local_addr().unwrap();
    udp.create_permission(&[other])
        .expect("another loopback port is a peer");
    udp.channel_bind(0x4100, other).expect("and can be bound");
    tcp.connect(other).expect("and connected to over TCP");
    // The log lines come through a pipe and a reader thread: wait for them.
    let mut refusals: Vec<String> = Vec::new();
    let end = Instant::now() + Duration::from_secs(5);
    while !refusals.iter().any(|l| l.contains("own listening sockets")) && Instant::now() < end {
        if let Ok(l) = err.recv_timeout(Duration::from_millis(100)) {
            if l.contains("peer refused") {
                refusals.push(l);
            }
        }
    }
    assert!(
        refusals.iter().any(|l| l.contains("own listening sockets")),
        "the log says why: {refusals:?}"
    );
    sigterm_and_wait(child);
}

pub(super) fn user_cmd(args: &[&str], stdin: &str) -> std::process::Output {
    let mut child = bin()
        .arg("user")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

/// One HTTP/1.1 request with the admin token (no body): the status and the
/// whole answer.
pub(super) fn http(addr: SocketAddr, method: &str, path: &str, token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    (r.split_whitespace().nth(1).unwrap().parse().unwrap(), r)
}
