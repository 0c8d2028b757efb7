//! The kernel fast path (XDP) in network namespaces the test makes and
//! removes: an outer namespace holding the load generator's client and
//! peer sockets, joined to the server's namespace by two veth pairs (the
//! client side and the peer side), so the server sees real interfaces with
//! native XDP. Needs root, iproute2, ethtool and a build with clang;
//! skipped with a message otherwise.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_turnpike")
}

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn can_run() -> Result<(), String> {
    if !fastpath::built() {
        return Err("this build has no XDP program (clang was not installed)".into());
    }
    if !ok(Command::new("id").args(["-u"]))
        || String::from_utf8_lossy(
            &Command::new("id")
                .arg("-u")
                .output()
                .map_err(|e| e.to_string())?
                .stdout,
        )
        .trim()
            != "0"
    {
        return Err("not root".into());
    }
    for tool in ["ip", "ethtool", "python3"] {
        if !ok(Command::new("sh").args(["-c", &format!("command -v {tool}")])) {
            return Err(format!("{tool} not found"));
        }
    }
    Ok(())
}

/// Two namespaces and two veth pairs; removed (and so the veths) on drop.
struct Topology {
    outer: String,
    server: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = ok(Command::new("ip").args(["netns", "del", &self.outer]));
        let _ = ok(Command::new("ip").args(["netns", "del", &self.server]));
    }
}

fn sh(script: &str) {
    let out = Command::new("sh").args(["-ec", script]).output().unwrap();
    assert!(
        out.status.success(),
        "{script}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Client 10.203.N.2 on a1 ↔ server 10.203.N.1 on s1; peer 10.203.M.2 on
/// a2 ↔ relay 10.203.M.1 on s2 (N, M unique per test); the same in IPv6
/// as fd03:N::2 ↔ fd03:N::1 and fd03:M::2 ↔ fd03:M::1. The outer veths
/// compute UDP checksums (tx off), as datagrams from a wire carry them.
fn topology(tag: &str, net: u8, forwarding: bool) -> Topology {
    let t = Topology {
        outer: format!("tpfo-{tag}-{}", std::process::id()),
        server: format!("tpfs-{tag}-{}", std::process::id()),
    };
    let (o, s) = (&t.outer, &t.server);
    let (c, p) = (net, net + 1);
    sh(&format!(
        "ip netns add {o}; ip netns add {s}
         ip -n {o} link set lo up; ip -n {s} link set lo up
         ip -n {o} link add a1 type veth peer name s1 netns {s}
         ip -n {o} link add a2 type veth peer name s2 netns {s}
         ip -n {o} addr add 10.203.{c}.2/24 dev a1; ip -n {s} addr add 10.203.{c}.1/24 dev s1
         ip -n {o} addr add 10.203.{p}.2/24 dev a2; ip -n {s} addr add 10.203.{p}.1/24 dev s2
         ip -n {o} link set a1 up; ip -n {o} link set a2 up; ip -n {s} link set s1 up; ip -n {s} link set s2 up
         ip -n {o} addr add fd03:{c}::2/64 dev a1 nodad; ip -n {s} addr add fd03:{c}::1/64 dev s1 nodad
         ip -n {o} addr add fd03:{p}::2/64 dev a2 nodad; ip -n {s} addr add fd03:{p}::1/64 dev s2 nodad
         ip netns exec {o} ethtool -K a1 gro on tx off >/dev/null; ip netns exec {o} ethtool -K a2 gro on tx off >/dev/null"
    ));
    if forwarding {
        sh(&format!(
            "ip netns exec {s} sysctl -qw net.ipv4.conf.s1.forwarding=1 net.ipv4.conf.s2.forwarding=1 \
             net.ipv6.conf.s1.forwarding=1 net.ipv6.conf.s2.forwarding=1"
        ));
    }
    t
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SIGINT: stop at once (SIGTERM would drain).
        let _ = Command::new("kill")
            .args(["-INT", &self.0.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts turnpike in the server namespace; its start-up line.
fn serve(t: &Topology, net: u8, extra: &[&str]) -> (Server, String) {
    let (c, p) = (net, net + 1);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &t.server, bin(), "serve"])
        .args(["--listen", &format!("10.203.{c}.1:3478"), "--no-tls"])
        .args(["--user", "bench:bench-pw1", "--realm", "tp"])
        .args(["--relay-ip", &format!("10.203.{p}.1")])
        .args(["--allow-peer", &format!("10.203.{p}.0/24")])
        .args(["--rate-limit-per-ip", "0", "--threads", "1"])
        .args(["--metrics-listen", "127.0.0.1:9641"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let server = Server(child);
    for line in err.lines() {
        let line = line.unwrap();
        if line.contains("turnpike started") {
            return (server, line);
        }
        assert!(!line.contains("turnpike: "), "the server did not start: {line}");
    }
    panic!("the server exited before starting")
}

fn bench(t: &Topology, net: u8) -> serde_json::Value {
    let (c, p) = (net, net + 1);
    let out = Command::new("ip")
        .args(["netns", "exec", &t.outer, bin(), "bench"])
        .args(["--server", &format!("10.203.{c}.1:3478")])
        .args(["--peer-ip", &format!("10.203.{p}.2")])
        .args(["--user", "bench", "--password", "bench-pw1"])
        .args(["--mode", "channel", "--allocations", "4", "--window", "4"])
        .args(["--duration", "2", "--warmup", "0.5", "--no-gso", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn metric(t: &Topology, name: &str) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &t.server, "python3", "-c"])
        .arg("import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9641/metrics').read().decode())")
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn channels_are_relayed_in_the_kernel_both_ways() {
    if let Err(why) = can_run() {
        eprintln!("SKIP kernel fast path: {why}");
        return;
    }
    let t = topology("relay", 10, true);
    let (server, started) = serve(
        &t,
        10,
        &[
            "--fast-path",
            "on",
            "--fast-path-interface",
            "s1",
            "--fast-path-interface",
            "s2",
        ],
    );
    assert!(
        started.contains("fast_path=on: s1 (native), s2 (native)"),
        "{started}"
    );
    let r = bench(&t, 10);
    let relayed = r["operations"].as_u64().unwrap();
    assert!(relayed > 1000, "{r}");
    assert_eq!(r["lost"].as_u64(), Some(0), "nothing lost: {r}");
    // Workers read the kernel's counts once a second, and at removal.
    std::thread::sleep(Duration::from_millis(1500));
    let kernel = metric(&t, "turnpike_fast_path_packets_total");
    assert!(
        kernel >= relayed as f64 * 0.9,
        "the kernel relayed {kernel} of the {relayed} measured packets"
    );
    assert_eq!(metric(&t, "turnpike_fast_path_active"), 1.0);
    // What the kernel relayed is in the allocations' stats (session list,
    // logs, relayed_packets_total) as user-space relaying would be.
    let counted = metric(&t, "turnpike_relayed_packets_total");
    assert!(
        counted >= kernel * 0.99,
        "relayed_packets_total {counted} < kernel-relayed {kernel}"
    );
    drop(server);
}

#[test]
fn auto_without_forwarding_says_why_and_relays_in_user_space() {
    if let Err(why) = can_run() {
        eprintln!("SKIP kernel fast path: {why}");
        return;
    }
    let t = topology("auto", 20, false);
    let (server, started) = serve(&t, 20, &[]);
    assert!(
        started.contains("fast_path=unavailable") && started.contains("does not forward IPv4"),
        "{started}"
    );
    let r = bench(&t, 20);
    assert!(r["operations"].as_u64().unwrap() > 1000, "{r}");
    assert_eq!(r["lost"].as_u64(), Some(0), "{r}");
    assert_eq!(metric(&t, "turnpike_fast_path_active"), 0.0);
    assert_eq!(metric(&t, "turnpike_fast_path_packets_total"), 0.0);
    drop(server);
}

#[test]
fn on_refuses_to_start_when_it_cannot_load() {
    // On loopback only: no interface for it.
    let out = Command::new(bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--fast-path",
            "on",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("fast-path: on, but it cannot load"), "{stderr}");
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--fast-path", "sometimes"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("fast-path:") && stderr.contains("auto, on or off"),
        "{stderr}"
    );
}
