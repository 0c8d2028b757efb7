//! Shared helpers: start a real server on 127.0.0.1 with ephemeral ports.
#![allow(dead_code, unreachable_pub)]

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use turnpike::config::{Options, Settings};
use turnpike::runtime::Handle;
use turnpike_client::client::{Channel, ClientTransport, TurnClient};

/// Tests run in one binary, two at a time. Those that load the machine
/// on purpose (the bench modes, floods) take [`exclusive`]; every other
/// test takes [`shared`] when it starts a server, so no load test overlaps
/// a test that waits on a deadline. Tests that start nothing need neither.
static GATE: std::sync::RwLock<()> = std::sync::RwLock::new(());

thread_local! {
    static SHARED: std::cell::RefCell<Option<std::sync::RwLockReadGuard<'static, ()>>> =
        const { std::cell::RefCell::new(None) };
    static EXCLUSIVE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// This test runs beside others but not beside an [`exclusive`] one; held
/// until the test's thread ends.
pub fn shared() {
    if EXCLUSIVE.with(|e| e.get()) {
        return;
    }
    SHARED.with(|s| {
        if s.borrow().is_none() {
            *s.borrow_mut() = Some(GATE.read().unwrap_or_else(|p| p.into_inner()));
        }
    });
}

/// Held by a test that loads the machine: no other server-starting test
/// runs until it is dropped.
pub struct Exclusive(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>);

impl Drop for Exclusive {
    fn drop(&mut self) {
        EXCLUSIVE.with(|e| e.set(false));
    }
}

/// Waits until no other test holds a server, then keeps them out.
pub fn exclusive() -> Exclusive {
    // A read guard of this thread's own would wait on itself.
    SHARED.with(|s| s.borrow_mut().take());
    let guard = GATE.write().unwrap_or_else(|p| p.into_inner());
    EXCLUSIVE.with(|e| e.set(true));
    Exclusive(guard)
}

/// The turnpike binary under test (taking the [`shared`] gate).
pub fn turnpike_bin() -> &'static str {
    shared();
    env!("CARGO_BIN_EXE_turnpike")
}

pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";

/// Starts a server on 127.0.0.1 (UDP/TCP and TLS on ephemeral ports) with
/// user alice, plus `extra` flags.
pub fn start(extra: &[&str]) -> Handle {
    shared();
    let mut argv = vec!["turnpike"];
    if !extra.contains(&"--listen") {
        argv.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
    argv.extend_from_slice(&[
        "--tls-listen",
        "127.0.0.1:0",
        "--user",
        "alice:wonderland",
        "--realm",
        "test.example",
        "--log-level",
        "warn",
    ]);
    if !extra.contains(&"--threads") {
        argv.extend_from_slice(&["--threads", "2"]);
    }
    argv.extend_from_slice(extra);
    let args = Options::from_argv(argv).expect("valid options");
    let settings = Settings::from_options(&args).expect("valid settings");
    turnpike::runtime::start(&settings).expect("server starts")
}

pub fn transports(h: &Handle) -> Vec<(ClientTransport, SocketAddr)> {
    vec![
        (ClientTransport::Udp, h.listen[0]),
        (ClientTransport::Tcp, h.listen[0]),
        (
            ClientTransport::Tls {
                pinned: h.tls_leaf.clone(),
            },
            h.tls_listen[0],
        ),
        // RFC 7350, beside TLS on its port.
        (
            ClientTransport::Dtls {
                pinned: h.tls_leaf.clone(),
            },
            h.dtls_listen[0],
        ),
    ]
}

pub fn client(t: &ClientTransport, addr: SocketAddr, user: &str, pw: &str) -> TurnClient {
    let ch = Channel::connect(t, addr, Duration::from_secs(3)).expect("connect");
    TurnClient::new(ch, user, pw)
}

/// A UDP "peer" on loopback.
pub fn peer() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// A redis-server on a free loopback port, stopped (by PID) when dropped.
pub struct Redis(pub std::process::Child, pub u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A throwaway redis-server's arguments: loopback, `port`, no persistence.
pub fn redis_args(port: u16) -> Vec<String> {
    [
        "--bind",
        "127.0.0.1",
        "--port",
        &port.to_string(),
        "--save",
        "",
        "--appendonly",
        "no",
        // Anything Redis writes goes to the temporary directory, never
        // into the crate (tests run with the crate as their directory).
        "--dir",
        &std::env::temp_dir().to_string_lossy(),
    ]
    .map(str::to_owned)
    .to_vec()
}

pub fn redis_server() -> Redis {
    shared();
    assert!(
        std::path::Path::new("/usr/bin/redis-server").exists(),
        "redis-server not found: install Debian's redis-server package, as .ci/run does"
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("/usr/bin/redis-server")
        .args(redis_args(port))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..50 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Redis(child, port)
}

/// A free TCP port on 127.0.0.1 (for listeners a test names up front).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A process's resident set, in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A child process stopped (by its PID) when dropped.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The effective user id, from /proc (root runs the namespace tests).
pub fn euid() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).and_then(|u| u.parse().ok()))
        })
        .unwrap_or(u32::MAX)
}

/// Runs `f` on a thread inside network namespace `ns`: the sockets it
/// opens live there, and keep living there when handed back.
pub fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = std::path::PathBuf::from(format!("/var/run/netns/{ns}"));
    std::thread::spawn(move || {
        udp_io::enter_network_namespace(&path).expect("entering the test's namespace");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Spawns `cmd` (a `turnpike serve`) with its stderr read line by line,
/// and waits for the start-up line: the process, that line, the rest.
pub fn spawn_server(cmd: &mut std::process::Command) -> (Proc, String, std::sync::mpsc::Receiver<String>) {
    shared();
    use std::io::BufRead;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let proc = Proc(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(15)) {
            Ok(l) if l.contains("turnpike started") => return (proc, l, rx),
            Ok(l) => seen.push(l),
            Err(_) => panic!("turnpike did not start:\n{}", seen.join("\n")),
        }
    }
}

/// `turnpike serve` as a user runs it, on ephemeral loopback ports
/// (UDP/TCP, TLS, and DTLS beside it) with user alice and realm
/// test.example, two workers, `extra` after: the process, its start-up
/// line and the rest of its log.
pub fn serve_binary(extra: &[&str]) -> (Proc, String, std::sync::mpsc::Receiver<String>) {
    let mut cmd = std::process::Command::new(turnpike_bin());
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--user",
        "alice:wonderland",
        "--realm",
        "test.example",
        "--threads",
        "2",
        "--log-level",
        "info",
    ])
    .args(extra);
    spawn_server(&mut cmd)
}

/// The address `name=` (listen, tls_listen, dtls_listen, metrics, …)
/// shows in a start-up line: the first of a list.
pub fn started_addr(line: &str, name: &str) -> SocketAddr {
    line.split(&format!(" {name}="))
        .nth(1)
        .map(|r| r.trim_start_matches('['))
        .and_then(|r| r.split([']', ',', ' ']).next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name}= in the start-up line: {line}"))
}

/// Settings for a server of the tests' own (ephemeral loopback
/// listeners, user alice, one worker) with `extra` after, for tests that
/// set what `start` fixes (the realm) or expect a refusal.
pub fn settings(extra: &[&str]) -> anyhow::Result<Settings> {
    let mut argv = vec![
        "turnpike",
        "--listen",
        "127.0.0.1:0",
        "--tls-listen",
        "127.0.0.1:0",
        "--user",
        "alice:wonderland",
        "--threads",
        "1",
    ];
    argv.extend_from_slice(extra);
    Settings::from_options(&Options::from_argv(argv)?)
}

/// The first `listen=[…]` address of a start-up line.
pub fn listen_addr(line: &str) -> SocketAddr {
    line.split("listen=[")
        .nth(1)
        .and_then(|r| r.split([']', ',']).next())
        .expect("listen=[…] in the start-up line")
        .trim()
        .parse()
        .unwrap()
}

/// A plain HTTP/1.0 request (the admin API, /metrics, Prometheus), with a
/// bearer token if given: the status code and the body.
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n")?;
    let mut all = String::new();
    s.read_to_string(&mut all)?;
    let code = all.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = all
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((code, body))
}

/// Debian's coturn on a free loopback port with the test user, relay
/// ports from `min_port` (a thousand of them: test binaries that run at
/// once use ranges of their own), stopped by PID when dropped; returns
/// once it answers a Binding.
pub fn coturn(extra: &[&str], min_port: u16) -> (Proc, SocketAddr) {
    shared();
    assert!(
        std::path::Path::new("/usr/bin/turnserver").exists(),
        "turnserver not found: install Debian's coturn package (apt-get install coturn), as .ci/run does"
    );
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("/usr/bin/turnserver")
        .args([
            "-n",
            "--listening-ip=127.0.0.1",
            &format!("--listening-port={port}"),
            "--relay-ip=127.0.0.1",
            "--lt-cred-mech",
            &format!("--user={USER}:{PASSWORD}"),
            "--realm=coturn.example",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--allow-loopback-peers",
            &format!("--min-port={min_port}"),
            &format!("--max-port={}", min_port + 999),
            "--log-file=/dev/null",
        ])
        .args(extra)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut proc = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Under the whole suite's load coturn has taken over 5 s to start.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        let mut ch = Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(1)).unwrap();
        if turnpike_client::client::binding(&mut ch, Duration::from_millis(300)).is_ok() {
            return (proc, addr);
        }
        if let Ok(Some(status)) = proc.0.try_wait() {
            panic!("coturn exited before answering on {addr}: {status}");
        }
        // A refused datagram fails at once: wait for the port to open.
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("coturn did not answer on {addr} within 30 s");
}

/// A real part a test needs is missing: a skip with a message on a
/// developer's machine, a failure in CI (`CI` set), where .ci/run installs
/// everything. Returns whether the caller should stop (the skip case).
pub fn missing(test: &str, why: &str) -> bool {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty()) {
        panic!("{test}: {why} (CI installs it: see .ci/run)");
    }
    eprintln!("SKIP {test}: {why} (under CI this is a failure)");
    true
}

/// Gives `cmd` a login shell's environment instead of this test's: cargo
/// test adds CARGO_* variables and library paths that would make a cargo
/// started from a test rebuild what the developer's (or CI's) cargo built.
pub fn login_env(cmd: &mut std::process::Command) -> &mut std::process::Command {
    cmd.env_clear().envs(
        [
            "PATH",
            "HOME",
            "USER",
            "LANG",
            "TERM",
            "CARGO_HOME",
            "RUSTUP_HOME",
        ]
        .iter()
        .filter_map(|k| std::env::var_os(k).map(|v| (*k, v))),
    )
}

/// A network namespace with its loopback up, deleted (with whatever is
/// in it) when dropped. Needs root.
pub struct Netns(pub String);

impl Netns {
    pub fn new(tag: &str) -> Option<Netns> {
        let name = format!("tp-{tag}-{}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let ns = Netns(name);
        let up = std::process::Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status()
            .is_ok_and(|s| s.success());
        up.then_some(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}
