//! The kernel fast path (XDP) in network namespaces the test makes and
//! removes: an outer namespace holding the load generator's client and
//! peer sockets, joined to the server's namespace by two veth pairs (the
//! client side and the peer side), so the server sees real interfaces with
//! native XDP. Needs root, iproute2, ethtool and a build with clang;
//! skipped with a message otherwise. This file: the topologies, the
//! server under test, and relaying measured by `turnpike bench` in one-
//! and two-NIC hosts; `entries.rs`: an entry's bytes, lifetime, removal,
//! caps and what stays in user space.

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::in_ns;
use turnpike_client::client::{Channel, ClientTransport, RelayFamily, TurnClient};

mod entries;
mod events;
mod upgrade;

pub(super) fn bin() -> &'static str {
    common::turnpike_bin()
}

pub(super) fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub(super) fn can_run() -> Result<(), String> {
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
pub(super) struct Topology {
    pub(super) outer: String,
    pub(super) server: String,
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = ok(Command::new("ip").args(["netns", "del", &self.outer]));
        let _ = ok(Command::new("ip").args(["netns", "del", &self.server]));
    }
}

pub(super) fn sh(script: &str) {
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
pub(super) fn topology(tag: &str, net: u8, forwarding: bool) -> Topology {
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

pub(super) struct Server(pub(super) Child);

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

/// `turnpike serve` in the server namespace, with `extra` arguments.
pub(super) fn serve_command(t: &Topology, net: u8, extra: &[&str]) -> Command {
    let (c, p) = (net, net + 1);
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &t.server, bin(), "serve"])
        .args(["--listen", &format!("10.203.{c}.1:3478"), "--no-tls"])
        .args(["--listen", &format!("[fd03:{c}::1]:3478")])
        .args(["--user", "bench:bench-pw1", "--realm", "tp"])
        .args(["--relay-ip", &format!("10.203.{p}.1")])
        .args(["--relay-ip", &format!("fd03:{p}::1")])
        .args(["--allow-peer", &format!("10.203.{p}.0/24")])
        .args(["--allow-peer", &format!("fd03:{p}::/64")])
        .args(["--rate-limit-per-ip", "0", "--threads", "1"])
        .args(["--metrics-listen", "127.0.0.1:9641"])
        .args(extra);
    cmd
}

/// Starts turnpike in the server namespace; its start-up line.
pub(super) fn serve(t: &Topology, net: u8, extra: &[&str]) -> (Server, String) {
    let mut child = serve_command(t, net, extra)
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

pub(super) fn bench(t: &Topology, net: u8) -> serde_json::Value {
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

pub(super) fn metric(t: &Topology, name: &str) -> f64 {
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
        common::missing("kernel fast path", &why);
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
        started.contains("fast_path=on: s1 (native), s2 (native); IPv4 and IPv6"),
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

/// The one-NIC host: client 10.203.N.2 and peer 10.203.N.3 (fd03:N::2,
/// ::3) on a1 ↔ server 10.203.N.1 (fd03:N::1) on s1, listening and
/// relaying on that one address; every relayed packet leaves by the
/// interface it came in on. The same link also carries the two-subnet
/// layout the other tests use (peer 10.203.N+1.2 ↔ relay 10.203.N+1.1),
/// so their helpers run on one NIC unchanged.
pub(super) fn one_nic_topology(tag: &str, net: u8, forwarding: bool) -> Topology {
    let t = Topology {
        outer: format!("tpfo-{tag}-{}", std::process::id()),
        server: format!("tpfs-{tag}-{}", std::process::id()),
    };
    let (o, s, n, p) = (&t.outer, &t.server, net, net + 1);
    sh(&format!(
        "ip netns add {o}; ip netns add {s}
         ip -n {o} link set lo up; ip -n {s} link set lo up
         ip -n {o} link add a1 type veth peer name s1 netns {s}
         ip -n {o} addr add 10.203.{n}.2/24 dev a1; ip -n {o} addr add 10.203.{n}.3/24 dev a1
         ip -n {s} addr add 10.203.{n}.1/24 dev s1
         ip -n {o} addr add fd03:{n}::2/64 dev a1 nodad; ip -n {o} addr add fd03:{n}::3/64 dev a1 nodad
         ip -n {s} addr add fd03:{n}::1/64 dev s1 nodad
         ip -n {o} addr add 10.203.{p}.2/24 dev a1; ip -n {s} addr add 10.203.{p}.1/24 dev s1
         ip -n {o} addr add fd03:{p}::2/64 dev a1 nodad; ip -n {s} addr add fd03:{p}::1/64 dev s1 nodad
         ip -n {o} link set a1 up; ip -n {s} link set s1 up
         ip netns exec {o} ethtool -K a1 gro on tx off >/dev/null
         ip netns exec {s} ethtool -K s1 tx off >/dev/null"
    ));
    if forwarding {
        sh(&format!(
            "ip netns exec {s} sysctl -qw net.ipv4.conf.s1.forwarding=1 net.ipv6.conf.s1.forwarding=1"
        ));
    }
    t
}

/// One NIC: the kernel relays both ways out of the interface the packets
/// came in on, in both families, losing nothing, and the datagrams it
/// writes carry correct UDP checksums (checked by tcpdump on the client's
/// side, since a veth may hand an unverified frame to a socket). On veth
/// every XDP_TX frame was lost; the program redirects instead.
#[test]
fn one_nic_relays_in_the_kernel_both_ways_with_correct_checksums() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    if !ok(Command::new("sh").args(["-c", "command -v tcpdump"])) {
        common::missing("kernel fast path", "tcpdump not found (apt-get install tcpdump)");
        return;
    }
    let net = 90;
    // A stock host: no forwarding (the next hops are learned).
    let t = one_nic_topology("onenic", net, false);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &t.server, bin(), "serve", "--no-tls"])
        .args([
            "--listen",
            &format!("10.203.{net}.1:3478"),
            "--listen",
            &format!("[fd03:{net}::1]:3478"),
        ])
        .args([
            "--relay-ip",
            &format!("10.203.{net}.1"),
            "--relay-ip",
            &format!("fd03:{net}::1"),
        ])
        .args([
            "--allow-peer",
            &format!("10.203.{net}.0/24"),
            "--allow-peer",
            &format!("fd03:{net}::/64"),
        ])
        .args([
            "--user",
            "bench:bench-pw1",
            "--realm",
            "tp",
            "--rate-limit-per-ip",
            "0",
            "--threads",
            "1",
        ])
        .args([
            "--metrics-listen",
            "127.0.0.1:9641",
            "--fast-path",
            "on",
            "--fast-path-interface",
            "s1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let server = Server(child);
    let started = err
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("turnpike started"))
        .expect("the server starts");
    assert!(
        started.contains("fast_path=on: s1 (native); IPv4 and IPv6"),
        "{started}"
    );
    // bench allocates IPv4 relays; IPv6 is the exact-bytes test's.
    for (server_addr, peer, client) in [(
        format!("10.203.{net}.1:3478"),
        format!("10.203.{net}.3"),
        format!("10.203.{net}.2"),
    )] {
        // The capture: what reaches the client's side of the link.
        let cap = Command::new("ip")
            .args([
                "netns", "exec", &t.outer, "tcpdump", "-nn", "-vv", "-l", "-i", "a1", "-c", "400",
            ])
            .args(["udp", "and", "not", "port", "3479"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let cap = common::Proc(cap);
        std::thread::sleep(Duration::from_millis(500));
        let before = metric(&t, "turnpike_fast_path_packets_total");
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &t.outer,
                bin(),
                "bench",
                "--server",
                &server_addr,
            ])
            .args(["--peer-ip", &peer, "--user", "bench", "--password", "bench-pw1"])
            .args(["--mode", "channel", "--allocations", "4", "--window", "4"])
            .args(["--duration", "2", "--warmup", "0.5", "--no-gso", "--json"])
            .output()
            .unwrap();
        let r: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
        let relayed = r["operations"].as_u64().unwrap();
        assert!(relayed > 1000, "{server_addr}: {r}");
        assert_eq!(r["lost"].as_u64(), Some(0), "{server_addr}: nothing lost: {r}");
        std::thread::sleep(Duration::from_millis(1500));
        let kernel = metric(&t, "turnpike_fast_path_packets_total") - before;
        assert!(
            kernel >= relayed as f64 * 0.9,
            "{server_addr}: the kernel relayed {kernel} of {relayed}"
        );
        let mut cap = cap;
        let mut stdout = cap.0.stdout.take().unwrap();
        let _ = cap.0.kill();
        let _ = cap.0.wait();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
        // tcpdump -vv checks each UDP checksum: "udp sum ok" or "bad udp
        // cksum". The relayed datagrams are 160 B of data to the peer and
        // 164 B of ChannelData to the client. The server's veth has tx
        // offload off, so what its stack sends (replies, and a datagram
        // relayed in user space before its channel's entry is in the
        // kernel) carries a finished checksum too: a bad one can only be
        // the program's.
        let relayed: Vec<&str> = text
            .lines()
            .filter(|l| l.ends_with("length 160") || l.ends_with("length 164"))
            .collect();
        let ok = relayed.iter().filter(|l| l.contains("udp sum ok")).count();
        let bad: Vec<&&str> = relayed.iter().filter(|l| !l.contains("udp sum ok")).collect();
        assert!(
            ok >= 100,
            "{server_addr}: relayed datagrams checked: {ok}\n{text}"
        );
        assert!(bad.is_empty(), "{server_addr}: bad checksums: {bad:?}");
        for to in [format!("{peer}."), format!("{client}.")] {
            assert!(
                relayed.iter().any(|l| l.contains(&format!("> {to}"))),
                "{server_addr}: datagrams toward {to} seen: {relayed:?}"
            );
        }
    }
    drop(server);
}

/// A host that is no router (forwarding off, as on most): the program
/// takes next hops from the packets each end sends, relays in the kernel
/// both ways and loses nothing, and the server leaves forwarding off.
#[test]
fn without_forwarding_the_kernel_relays_by_learned_next_hops() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = topology("learned", 20, false);
    let (server, started) = serve(
        &t,
        20,
        &["--fast-path-interface", "s1", "--fast-path-interface", "s2"],
    );
    assert!(
        started.contains("fast_path=on: s1 (native), s2 (native); IPv4 and IPv6")
            && started.contains("next hops: learned from arriving packets"),
        "{started}"
    );
    let r = bench(&t, 20);
    let relayed = r["operations"].as_u64().unwrap();
    assert!(relayed > 1000, "{r}");
    assert_eq!(r["lost"].as_u64(), Some(0), "nothing lost: {r}");
    std::thread::sleep(Duration::from_millis(1500));
    let kernel = metric(&t, "turnpike_fast_path_packets_total");
    assert!(
        kernel >= relayed as f64 * 0.9,
        "the kernel relayed {kernel} of the {relayed} measured packets"
    );
    let forwarding = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.server,
            "sysctl",
            "-n",
            "net.ipv4.conf.s1.forwarding",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&forwarding.stdout).trim(), "0");
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
        stderr.contains("--fast-path") && stderr.contains("[possible values: auto, on, off]"),
        "{stderr}"
    );
}

/// A client with channel 0x4001 bound to a peer socket, in the outer
/// namespace.
pub(super) struct Ends {
    pub(super) client: TurnClient,
    pub(super) peer: UdpSocket,
    pub(super) relayed: SocketAddr,
}

pub(super) const CH: u16 = 0x4001;

pub(super) fn server_addr(net: u8, v6: bool) -> SocketAddr {
    if v6 {
        format!("[fd03:{net}::1]:3478")
    } else {
        format!("10.203.{net}.1:3478")
    }
    .parse()
    .unwrap()
}

pub(super) fn peer_socket(net: u8, v6: bool) -> UdpSocket {
    let p = net + 1;
    let s = UdpSocket::bind(if v6 {
        format!("[fd03:{p}::2]:0")
    } else {
        format!("10.203.{p}.2:0")
    })
    .unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    s
}

pub(super) fn bound(t: &Topology, net: u8, v6: bool) -> Ends {
    in_ns(&t.outer, move || {
        let peer = peer_socket(net, v6);
        let ch = Channel::connect(
            &ClientTransport::Udp,
            server_addr(net, v6),
            Duration::from_secs(2),
        )
        .unwrap();
        let mut client = TurnClient::new(ch, "bench", "bench-pw1");
        if v6 {
            client.set_relay_family(RelayFamily::Ipv6);
        }
        let a = client.allocate().unwrap();
        client.channel_bind(CH, peer.local_addr().unwrap()).unwrap();
        Ends {
            client,
            peer,
            relayed: a.relayed,
        }
    })
}

pub(super) fn channel_data(data: &[u8], padding: &[u8]) -> Vec<u8> {
    let mut m = stun_proto::ChannelData::header(CH, data.len() as u16).to_vec();
    m.extend_from_slice(data);
    m.extend_from_slice(padding);
    m
}

impl Ends {
    /// What the peer receives within `wait`, if anything.
    fn at_peer(&self, wait: Duration) -> Option<Vec<u8>> {
        self.peer.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 2048];
        match self.peer.recv_from(&mut buf) {
            Ok((n, from)) => {
                assert_eq!(from, self.relayed, "from the relayed address");
                Some(buf[..n].to_vec())
            }
            Err(_) => None,
        }
    }

    /// The next datagram the client receives within `wait`.
    fn at_client(&mut self, wait: Duration) -> Option<Vec<u8>> {
        self.client.channel().recv(Instant::now() + wait).unwrap()
    }

    /// One packet each way, until both arrive: the first of each may go
    /// through user space, which resolves the neighbours the kernel's
    /// route lookup needs.
    fn warm_up(&mut self) {
        let ping = channel_data(b"warm", &[]);
        self.client.channel().send(&ping).unwrap();
        assert_eq!(
            self.at_peer(Duration::from_secs(1)).as_deref(),
            Some(&b"warm"[..])
        );
        self.peer.send_to(b"warm", self.relayed).unwrap();
        assert_eq!(
            self.at_client(Duration::from_secs(1)),
            Some(channel_data(b"warm", &[]))
        );
    }
}

pub(super) fn fast_args() -> Vec<&'static str> {
    vec![
        "--fast-path",
        "on",
        "--fast-path-interface",
        "s1",
        "--fast-path-interface",
        "s2",
    ]
}

pub(super) fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = fast_args();
    v.extend_from_slice(extra);
    v
}

/// The metrics after the workers' next once-a-second look at the
/// kernel's counts.
pub(super) fn settled(t: &Topology, name: &str) -> f64 {
    std::thread::sleep(Duration::from_millis(1300));
    metric(t, name)
}
