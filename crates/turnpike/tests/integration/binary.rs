//! The `turnpike` binary itself: the no-argument default that README
//! promises, clean shutdown on SIGTERM, and configuration errors that name
//! the field.

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use turnpike_client::client::{binding, Channel, ClientTransport, TurnClient};

fn bin() -> Command {
    Command::new(common::turnpike_bin())
}

/// Collects a child's output lines on a channel.
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
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

fn wait_for(rx: &mpsc::Receiver<String>, needle: &str, seen: &mut Vec<String>) -> String {
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
struct Server(Option<Child>);

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn sigterm_and_wait(mut server: Server) -> std::process::ExitStatus {
    let mut child = server.0.take().unwrap();
    // SAFETY: kill(2) on our own child's pid; no memory is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    for _ in 0..100 {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("server did not exit within 5 s of SIGTERM");
}

/// Whether `user` can allocate over UDP at `addr` (the allocation is then
/// deleted).
fn allocates(addr: SocketAddr, user: &str, password: &str) -> bool {
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        user,
        password,
    );
    c.set_timeout(Duration::from_secs(2));
    let ok = c.allocate().is_ok();
    if ok {
        let _ = c.refresh(0);
    }
    ok
}

/// The demo credential the banner prints on stdout: (username, password).
fn demo_credential(out: &mpsc::Receiver<String>, banner: &mut Vec<String>) -> (String, String) {
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

fn listen_addr(line: &str) -> SocketAddr {
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
fn help_documents_every_required_flag() {
    let out = bin().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--tls-listen",
        "--cert",
        "--key",
        "--relay-ip",
        "--external-ip",
        "--min-port",
        "--max-port",
        "--realm",
        "--user",
        "--auth-secret",
        "--allow-loopback-peers",
        "--allow-peer",
        "--deny-peer",
        "--threads",
        "--log-level",
        "--software",
        "--rfc5766-channel-numbers",
        "--config",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
    // README's option table has a row for every flag --help lists, so a
    // documented flag exists and an existing one is documented.
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let mut flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '=', '<', '[']).next().unwrap_or(""))
        .filter(|f| !f.is_empty() && *f != "help")
        .collect();
    flags.sort();
    flags.dedup();
    assert!(flags.len() > 60, "{flags:?}");
    let undocumented: Vec<&&str> = flags
        .iter()
        .filter(|f| !readme.contains(&format!("`--{f}")))
        .collect();
    assert!(undocumented.is_empty(), "README lacks {undocumented:?}");
    // And the other way: every `--flag` README's table names exists.
    let table = readme
        .split("| option | meaning |")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    for cell in table.lines().filter_map(|l| l.split('|').nth(1)) {
        for word in cell.split('`').skip(1).step_by(2) {
            if let Some(f) = word.strip_prefix("--") {
                let f = f.split([' ', '=']).next().unwrap();
                assert!(
                    flags.contains(&f),
                    "README documents --{f}, which serve does not have"
                );
            }
        }
    }
    // Help texts that drifted once: limits are per host.
    assert!(
        !help.contains("one source IP, per worker"),
        "the answer budget is per host"
    );
}

#[test]
fn usernames_cannot_forge_log_lines() {
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
            "--auth-fail-limit",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let evil = "mallory\n2026-01-01T00:00:00Z  INFO allocation created user=admin";
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        evil,
        "x",
    );
    c.set_timeout(Duration::from_secs(1));
    let _ = c.allocate();
    let blocked = wait_for(&err, "repeated authentication failures", &mut seen);
    assert!(
        blocked.contains("mallory\\n2026"),
        "newline escaped in: {blocked}"
    );
    sigterm_and_wait(child);
    let rest: Vec<String> = err.try_iter().collect();
    assert!(
        !seen
            .iter()
            .chain(rest.iter())
            .any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line appeared"
    );
}

/// Starts the binary with `extra`, makes one allocation as carol and
/// deletes it, and returns every stderr line.
fn log_lines_of_one_session(extra: &[&str]) -> Vec<String> {
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--user",
            "carol:c4r0l",
            "--threads",
            "1",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    let addr: SocketAddr = if started.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(&started).unwrap();
        v["listen"]
            .as_str()
            .unwrap()
            .trim_matches(['[', ']'])
            .parse()
            .unwrap()
    } else {
        listen_addr(&started)
    };
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        "carol",
        "c4r0l",
    );
    c.allocate().unwrap();
    c.refresh(0).unwrap();
    wait_for(&err, "allocation deleted", &mut seen);
    sigterm_and_wait(child);
    seen.extend(err.try_iter());
    seen
}

#[test]
fn json_logs_one_object_per_line() {
    let lines = log_lines_of_one_session(&["--log-format", "json"]);
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let created = events
        .iter()
        .find(|e| e["message"] == "allocation created")
        .expect("a session-start event");
    assert_eq!(created["user"], "\"carol\"");
    assert!(created["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let deleted = events
        .iter()
        .find(|e| e["message"] == "allocation deleted")
        .expect("a session-end event");
    assert!(
        deleted["bytes_to_peers"].is_u64() && deleted["packets_from_peers"].is_u64(),
        "{deleted}"
    );
    // The start-up summary: clean fields, every listener and store named.
    let started = events
        .iter()
        .find(|e| e["message"] == "turnpike started")
        .expect("the start-up line");
    assert_eq!(started["relay_ipv4"], "127.0.0.1", "{started}");
    assert_eq!(started["relay_ipv6"], "none", "{started}");
    assert_eq!(started["metrics"], "off", "{started}");
    assert!(
        started["db"].is_string() && started["peer_policy"].is_string(),
        "{started}"
    );
    assert!(!started.to_string().contains("Some("), "{started}");
}

#[test]
fn redact_hides_client_addresses_and_usernames() {
    let lines = log_lines_of_one_session(&["--redact"]);
    let session: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("allocation created") || l.contains("allocation deleted"))
        .collect();
    assert_eq!(session.len(), 2, "{lines:?}");
    for l in &session {
        assert!(!l.contains("carol"), "username in: {l}");
        assert!(!l.contains("client=127.0.0.1"), "client address in: {l}");
        assert!(l.contains("redacted:"), "{l}");
    }
    // The same client is the same token in both lines.
    let token = |l: &str| {
        l.split("client=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(token(session[0]), token(session[1]));
}

#[test]
fn example_config_loads_and_documents_every_option() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/turnpike.toml");
    let args = turnpike::config::Options::from_file(&path).expect("deploy/turnpike.toml loads");
    let settings = turnpike::config::Settings::from_options(&args).expect("and validates");
    assert_eq!(settings.realm, "example.org");
    // Every long option of `serve --help` appears in the file, set or
    // commented, so the example cannot fall behind the flags.
    let text = std::fs::read_to_string(&path).unwrap();
    let help = String::from_utf8(bin().args(["serve", "--help"]).output().unwrap().stdout).unwrap();
    let options: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|rest| rest.split([' ', '=', '[', '<']).next().unwrap())
        .collect();
    assert!(options.len() > 30, "parsed the options of --help: {options:?}");
    for key in options {
        if ["help", "config", ""].contains(&key) {
            continue;
        }
        assert!(
            text.contains(&format!("{key} =")),
            "deploy/turnpike.toml does not document {key}"
        );
    }
}

fn text_has_reload(unit: &std::path::Path) -> bool {
    std::fs::read_to_string(unit)
        .unwrap()
        .lines()
        .any(|l| l.starts_with("ExecReload=") && l.contains("-HUP"))
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
fn systemd_unit_verifies() {
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "systemd-analyze not found (Debian package systemd)"
    );
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/turnpike.service");
    // Point ExecStart at the binary under test so verify can check it.
    let dir = std::env::temp_dir().join(format!("turnpike-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("/usr/bin/turnpike", common::turnpike_bin());
    // systemd's SIGKILL must not land while the drain is still running.
    let stop_after: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec=SECONDS in the unit");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/turnpike.toml"),
    )
    .unwrap();
    let drain = example
        .lines()
        .find_map(|l| l.strip_prefix("drain-timeout = "))
        .and_then(|v| {
            v.trim()
                .trim_matches('"')
                .parse::<turnpike::config::Period>()
                .ok()
        })
        .expect("drain-timeout in deploy/turnpike.toml")
        .as_secs();
    assert!(
        stop_after >= drain + 10,
        "TimeoutStopSec={stop_after} leaves no margin over drain-timeout {drain}"
    );
    assert!(
        !text.contains("example.invalid"),
        "Documentation= names a real document"
    );
    let copy = dir.join("turnpike.service");
    std::fs::write(&copy, text).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&copy).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about this machine's own units (no systemd running) are
    // not ours; anything naming our unit is.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("turnpike.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify: {stderr}");
    assert!(
        text_has_reload(&unit),
        "systemctl reload must reach SIGHUP (ExecReload)"
    );
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
}

#[test]
fn drain_refuses_new_allocations_then_exits_after_the_last_one() {
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

fn user_cmd(args: &[&str], stdin: &str) -> std::process::Output {
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
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "DELETE {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    (r.split_whitespace().nth(1).unwrap().parse().unwrap(), r)
}

fn http_post(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    (r.split_whitespace().nth(1).unwrap().parse().unwrap(), r)
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
fn every_refusal_leaves_a_log_line() {
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "1"])
        .args(["--user", "dave:d4ve", "--user", "erin:3rin", "--user-quota", "1"])
        .args(["--auth-fail-limit", "0", "--realm", "refusals.example"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let client = |u: &str, p: &str| {
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
            u,
            p,
        );
        c.set_timeout(Duration::from_secs(2));
        c
    };
    // Wrong password, unknown user: 401 with integrity.
    assert!(client("dave", "wrong").allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(
        line.contains("code=401") && line.contains("dave") && line.contains("allocate"),
        "{line}"
    );
    assert!(client("mallory", "x").allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(line.contains("code=401") && line.contains("mallory"), "{line}");
    // The user quota: 486.
    let mut first = client("erin", "3rin");
    first.allocate().unwrap();
    assert!(client("erin", "3rin").allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(line.contains("code=486") && line.contains("erin"), "{line}");
    // An address family the server does not relay: 440.
    let mut v6 = client("dave", "d4ve");
    v6.set_relay_family(turnpike_client::client::RelayFamily::Ipv6);
    assert!(v6.allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(line.contains("code=440"), "{line}");
    first.refresh(0).unwrap();
    sigterm_and_wait(child);
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
fn refusal_lines_past_the_configured_budget_are_summed_up() {
    // Two refusals a second logged one by one; five wrong passwords give
    // two lines and a summary counting the other three.
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "1"])
        .args([
            "--user",
            "dave:d4ve",
            "--auth-fail-limit",
            "0",
            "--realm",
            "budget.example",
        ])
        .args(["--log-refusals-per-second", "2"])
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
        "dave",
        "wrong",
    );
    c.set_timeout(Duration::from_secs(2));
    for _ in 0..5 {
        assert!(c.allocate().is_err());
    }
    let summary = wait_for(&err, "more like the ones above", &mut seen);
    let one_by_one = seen.iter().filter(|l| l.contains("request refused")).count();
    // At least five 401s: two logged in the window (four if it turned
    // over mid-way), the rest summed up (the default of 20 logs them all).
    assert!((2..=4).contains(&one_by_one), "{seen:#?}");
    let more: usize = summary
        .split("more=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(more >= 1 && one_by_one + more >= 5, "{summary}");
    assert!(summary.contains(&format!("401x{more}")), "{summary}");
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
    let refusals: Vec<String> = err.try_iter().filter(|l| l.contains("peer refused")).collect();
    assert!(
        refusals.iter().any(|l| l.contains("own listening sockets")),
        "the log says why: {refusals:?}"
    );
    sigterm_and_wait(child);
}

/// The first command of a ```sh block after `heading` in README.md.
fn readme_command(readme: &str, heading: &str) -> String {
    let section = readme
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README.md has a {heading:?} section"));
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("a ```sh block under {heading:?}"));
    block
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("a command")
        .to_owned()
}

/// README's two commands, read from README.md and typed as written: the
/// run command starts the server with its defaults (inside a network
/// namespace of its own, so ports 3478/5349 of the host are not touched),
/// and STUN, TURN and TLS answer on the default ports; the test command is
/// what CI runs.
#[test]
fn readme_commands_work_as_written() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let run = readme_command(&readme, "## Run it");
    let test = readme_command(&readme, "## Test it");
    assert_eq!(test, "bash .ci/run", "CI runs .ci/run; README must say so");
    assert!(
        std::fs::read_to_string(root.join(".ci/run"))
            .unwrap()
            .contains("cargo test --workspace"),
        ".ci/run runs every test"
    );
    if common::euid() != 0 {
        common::missing("readme run command", "needs root for a network namespace");
        return;
    }
    let Some(ns) = common::Netns::new("readme") else {
        common::missing("readme run command", "`ip netns add` failed (iproute2)");
        return;
    };
    // As typed in a shell at the repository's root.
    let mut child = common::login_env(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "sh", "-c", &format!("exec {run}")])
            .current_dir(&root),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    // A release build may come first (CI builds it before the tests).
    let started = loop {
        match err.recv_timeout(Duration::from_secs(900)) {
            Ok(l) if l.contains("turnpike started") => break l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("`{run}` did not start the server:\n{}", seen.join("\n")),
        }
    };
    assert!(started.contains("3478") && started.contains("5349"), "{started}");
    let mut banner = Vec::new();
    let (user, password) = demo_credential(&out, &mut banner);
    let answers = common::in_ns(&ns.0, move || {
        let t = Duration::from_secs(3);
        let mut got = Vec::new();
        for (what, transport, addr) in [
            ("udp 3478", ClientTransport::Udp, "127.0.0.1:3478"),
            ("tcp 3478", ClientTransport::Tcp, "127.0.0.1:3478"),
            ("udp [::1]:3478", ClientTransport::Udp, "[::1]:3478"),
            (
                "tls 5349",
                ClientTransport::Tls { pinned: None },
                "127.0.0.1:5349",
            ),
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut ch = Channel::connect(&transport, addr, t).unwrap();
            got.push((what, binding(&mut ch, t).is_ok()));
        }
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Udp, "127.0.0.1:3478".parse().unwrap(), t).unwrap(),
            &user,
            &password,
        );
        let relayed = c.allocate().is_ok();
        let _ = c.refresh(0);
        got.push(("turn allocate with the banner's credential", relayed));
        got
    });
    for (what, ok) in &answers {
        assert!(ok, "{what} answers after `{run}`: {answers:?}");
    }
    let st = sigterm_and_wait(child);
    assert!(st.success(), "{st:?}");
}
