//! The kernel fast path (XDP) in network namespaces the test makes and
//! removes: an outer namespace holding the load generator's client and
//! peer sockets, joined to the server's namespace by two veth pairs (the
//! client side and the peer side), so the server sees real interfaces with
//! native XDP. Needs root, iproute2, ethtool and a build with clang;
//! skipped with a message otherwise.

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::in_ns;
use turnpike_client::client::{Channel, ClientTransport, Received, RelayFamily, TurnClient};

fn bin() -> &'static str {
    common::turnpike_bin()
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
        .args(["--listen", &format!("[fd03:{c}::1]:3478")])
        .args(["--user", "bench:bench-pw1", "--realm", "tp"])
        .args(["--relay-ip", &format!("10.203.{p}.1")])
        .args(["--relay-ip", &format!("fd03:{p}::1")])
        .args(["--allow-peer", &format!("10.203.{p}.0/24")])
        .args(["--allow-peer", &format!("fd03:{p}::/64")])
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
fn one_nic_topology(tag: &str, net: u8, forwarding: bool) -> Topology {
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
struct Ends {
    client: TurnClient,
    peer: UdpSocket,
    relayed: SocketAddr,
}

const CH: u16 = 0x4001;

fn server_addr(net: u8, v6: bool) -> SocketAddr {
    if v6 {
        format!("[fd03:{net}::1]:3478")
    } else {
        format!("10.203.{net}.1:3478")
    }
    .parse()
    .unwrap()
}

fn peer_socket(net: u8, v6: bool) -> UdpSocket {
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

fn bound(t: &Topology, net: u8, v6: bool) -> Ends {
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

fn channel_data(data: &[u8], padding: &[u8]) -> Vec<u8> {
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

fn fast_args() -> Vec<&'static str> {
    vec![
        "--fast-path",
        "on",
        "--fast-path-interface",
        "s1",
        "--fast-path-interface",
        "s2",
    ]
}

fn with(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = fast_args();
    v.extend_from_slice(extra);
    v
}

/// The metrics after the workers' next once-a-second look at the
/// kernel's counts.
fn settled(t: &Topology, name: &str) -> f64 {
    std::thread::sleep(Duration::from_millis(1300));
    metric(t, name)
}

#[test]
fn the_kernel_relays_exact_bytes_both_ways_in_both_families() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = topology("bytes", 30, true);
    exact_bytes_both_ways(&t, 30, &fast_args());
}

/// One NIC, both families, padded and not: byte-identical both ways, each
/// packet counted once, the kernel carrying all but the warm-up.
#[test]
fn one_nic_relays_exact_bytes_in_both_families() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = one_nic_topology("onebytes", 92, false);
    exact_bytes_both_ways(&t, 92, &["--fast-path", "on", "--fast-path-interface", "s1"]);
}

/// Sends every length, padded and unpadded, both ways through a bound
/// channel in each family, and checks bytes and counts.
fn exact_bytes_both_ways(t: &Topology, net: u8, args: &[&str]) {
    let (server, started) = serve(t, net, args);
    assert!(started.contains("IPv4 and IPv6"), "{started}");
    let (mut packets, mut bytes) = (0u64, 0u64);
    for v6 in [false, true] {
        let mut e = bound(t, net, v6);
        e.warm_up();
        packets += 2;
        bytes += 8;
        for len in [0usize, 1, 2, 3, 4, 5, 7, 100, 1001, 1200] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            // Unpadded, and padded to four with non-zero bytes (RFC 8656
            // §12.5 lets UDP carry padding; the checksum must lose it).
            let pad = vec![0xa5u8; (4 - len % 4) % 4];
            for padding in [&[][..], &pad[..]] {
                e.client.channel().send(&channel_data(&data, padding)).unwrap();
                let got = e.at_peer(Duration::from_secs(1));
                assert_eq!(
                    got.as_deref(),
                    Some(&data[..]),
                    "v6={v6} len={len} padding={}",
                    padding.len()
                );
                packets += 1;
                bytes += len as u64;
            }
            e.peer.send_to(&data, e.relayed).unwrap();
            // Unpadded over UDP, as user space sends it.
            assert_eq!(
                e.at_client(Duration::from_secs(1)),
                Some(channel_data(&data, &[])),
                "v6={v6} len={len} back"
            );
            packets += 1;
            bytes += len as u64;
        }
    }
    let kernel = settled(t, "turnpike_fast_path_packets_total");
    let passed = metric(t, "turnpike_fast_path_no_route_total");
    // Every packet relayed once, by one path or the other: the kernel's
    // are those not passed up for an unresolved neighbour (warm-up).
    assert_eq!(metric(t, "turnpike_relayed_packets_total"), packets as f64);
    assert_eq!(metric(t, "turnpike_relayed_bytes_total"), bytes as f64);
    assert!(passed <= 4.0, "{passed} passed for want of a neighbour");
    assert!(
        kernel >= packets as f64 - 4.0,
        "the kernel relayed {kernel} of {packets}"
    );
    assert_eq!(metric(t, "turnpike_fast_path_checksum_offload_total"), 0.0);
    drop(server);
}

#[test]
fn an_entry_stops_at_its_deadline_while_user_space_is_stopped() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = topology("expiry", 40, true);
    // A 3 s allocation: the entry's deadline is the relay's expiry.
    let (server, _) = serve(&t, 40, &with(&["--allocation-lifetime", "3"]));
    let before = Instant::now();
    let mut e = bound(&t, 40, false);
    let deadline_at_most = Instant::now() + Duration::from_secs(3);
    let deadline_at_least = before + Duration::from_secs(3);
    e.warm_up();
    let pid = server.0.id().to_string();
    assert!(ok(Command::new("kill").args(["-STOP", &pid])));
    let stopped = Instant::now();
    let (mut to_peer, mut to_client) = (Vec::new(), Vec::new());
    let end = before + Duration::from_secs(5);
    let mut n = 0u32;
    while Instant::now() < end {
        n += 1;
        e.client
            .channel()
            .send(&channel_data(&n.to_be_bytes(), &[]))
            .unwrap();
        e.peer.send_to(&n.to_be_bytes(), e.relayed).unwrap();
        if e.at_peer(Duration::from_millis(10)).is_some() {
            to_peer.push(Instant::now());
        }
        if e.at_client(Duration::from_millis(10)).is_some() {
            to_client.push(Instant::now());
        }
    }
    assert!(ok(Command::new("kill").args(["-CONT", &pid])));
    for (what, arrivals) in [("to the peer", &to_peer), ("to the client", &to_client)] {
        let last = *arrivals
            .last()
            .unwrap_or_else(|| panic!("nothing relayed {what}"));
        assert!(arrivals[0] >= stopped, "relayed {what} with user space stopped");
        assert!(
            // Room for this loop's own delay in noticing an arrival.
            last <= deadline_at_most + Duration::from_millis(250),
            "relayed {what} {:?} past the deadline",
            last - deadline_at_most
        );
        assert!(
            last + Duration::from_millis(500) >= deadline_at_least,
            "relaying {what} stopped {:?} before the deadline",
            deadline_at_least - last
        );
    }
    // Running again, user space finds the allocation expired: what queued
    // while it was stopped is not relayed late.
    assert_eq!(e.at_peer(Duration::from_millis(700)), None);
    assert_eq!(e.at_client(Duration::from_millis(300)), None);
    drop(server);
}

#[test]
fn what_the_kernel_does_not_own_goes_to_user_space_as_before() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = topology("pass", 50, true);
    let (server, _) = serve(&t, 50, &fast_args());
    let mut e = bound(&t, 50, false);
    e.warm_up();
    let kernel_before = settled(&t, "turnpike_fast_path_packets_total");
    let peer = e.peer.local_addr().unwrap();
    // A length past the datagram's end: discarded (RFC 8656 §12.5).
    let mut short = stun_proto::ChannelData::header(CH, 100).to_vec();
    short.extend_from_slice(&[1; 10]);
    e.client.channel().send(&short).unwrap();
    assert_eq!(e.at_peer(Duration::from_millis(300)), None, "bad length");
    // A channel not bound: discarded.
    let mut unknown = stun_proto::ChannelData::header(0x4002, 4).to_vec();
    unknown.extend_from_slice(b"abcd");
    e.client.channel().send(&unknown).unwrap();
    assert_eq!(e.at_peer(Duration::from_millis(300)), None, "unknown channel");
    // The right channel from another 5-tuple: no allocation there.
    let mut other = in_ns(&t.outer, || {
        Channel::connect(
            &ClientTransport::Udp,
            server_addr(50, false),
            Duration::from_secs(2),
        )
        .unwrap()
    });
    other.send(&channel_data(b"abcd", &[])).unwrap();
    assert_eq!(e.at_peer(Duration::from_millis(300)), None, "wrong 5-tuple");
    // More than padding after the data: user space relays the data.
    e.client.channel().send(&channel_data(b"abcd", &[9; 8])).unwrap();
    assert_eq!(e.at_peer(Duration::from_secs(1)).as_deref(), Some(&b"abcd"[..]));
    // Binding: answered, with the client's address.
    let mapped = turnpike_client::client::binding(e.client.channel(), Duration::from_secs(1)).unwrap();
    assert_eq!(mapped, e.client.channel().local_addr().unwrap());
    // Send indication: relayed.
    e.client.send_indication(peer, b"send-ind").unwrap();
    assert_eq!(
        e.at_peer(Duration::from_secs(1)).as_deref(),
        Some(&b"send-ind"[..])
    );
    // A second peer with a permission and no channel: a Data indication.
    let peer2 = in_ns(&t.outer, || peer_socket(50, false));
    e.client
        .create_permission(&[peer2.local_addr().unwrap()])
        .unwrap();
    peer2.send_to(b"data-ind", e.relayed).unwrap();
    match e.client.recv(Duration::from_secs(1)).unwrap() {
        Received::Data { peer: p, data } => {
            assert_eq!((p, &data[..]), (peer2.local_addr().unwrap(), &b"data-ind"[..]))
        }
        other => panic!("{other:?}"),
    }
    // And a well-formed ChannelData still goes through the kernel.
    e.client.channel().send(&channel_data(b"fast", &[])).unwrap();
    assert_eq!(e.at_peer(Duration::from_secs(1)).as_deref(), Some(&b"fast"[..]));
    let kernel = settled(&t, "turnpike_fast_path_packets_total");
    assert_eq!(
        kernel - kernel_before,
        1.0,
        "only the last packet is the kernel's"
    );
    drop(server);
}

fn admin_delete(t: &Topology, relayed: SocketAddr) -> String {
    let script = format!(
        "import urllib.request as u;r=u.Request('http://127.0.0.1:9642/api/sessions/{relayed}',method='DELETE',\
         headers={{'Authorization':'Bearer fastpath-test-token-0123'}});print(u.urlopen(r).read().decode())"
    );
    let out = Command::new("ip")
        .args(["netns", "exec", &t.server, "python3", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn deletion_admin_delete_and_drain_remove_entries() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = topology("remove", 60, true);
    let (mut server, _) = serve(
        &t,
        60,
        &with(&[
            "--admin-listen",
            "127.0.0.1:9642",
            "--admin-token",
            "fastpath-test-token-0123",
            "--drain-timeout",
            "1",
        ]),
    );
    // Refresh 0 (IPv6).
    let mut a = bound(&t, 60, true);
    a.warm_up();
    assert_eq!(settled(&t, "turnpike_fast_path_entries"), 1.0);
    assert_eq!(a.client.refresh(0).unwrap(), 0);
    assert_eq!(settled(&t, "turnpike_fast_path_entries"), 0.0);
    a.peer.send_to(b"late", a.relayed).unwrap();
    assert_eq!(a.at_client(Duration::from_millis(300)), None);
    // Admin delete (IPv4).
    let mut b = bound(&t, 60, false);
    b.warm_up();
    assert_eq!(settled(&t, "turnpike_fast_path_entries"), 1.0);
    assert!(
        admin_delete(&t, b.relayed).contains("\"deleted\":1"),
        "admin delete"
    );
    assert_eq!(settled(&t, "turnpike_fast_path_entries"), 0.0);
    b.peer.send_to(b"late", b.relayed).unwrap();
    assert_eq!(b.at_client(Duration::from_millis(300)), None);
    // Drain (SIGTERM): when it times out the allocations go, the server
    // stops, and no program is left on the interfaces.
    let mut c = bound(&t, 60, false);
    c.warm_up();
    assert_eq!(settled(&t, "turnpike_fast_path_entries"), 1.0);
    assert!(ok(
        Command::new("kill").args(["-TERM", &server.0.id().to_string()])
    ));
    let end = Instant::now() + Duration::from_secs(10);
    while server.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "the drain did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    for dev in ["s1", "s2"] {
        let out = Command::new("ip")
            .args(["-n", &t.server, "-d", "link", "show", dev])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(!shown.contains("prog/xdp"), "{dev} still has XDP: {shown}");
    }
    c.peer.send_to(b"late", c.relayed).unwrap();
    assert_eq!(c.at_client(Duration::from_millis(300)), None);
}

#[test]
fn a_bandwidth_cap_holds_with_the_fast_path() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = topology("cap", 70, true);
    const CAP: u64 = 50_000;
    let (server, _) = serve(&t, 70, &with(&["--max-bps", "50000"]));
    let mut e = bound(&t, 70, false);
    e.warm_up();
    let peer = e.peer.try_clone().unwrap();
    let counter = std::thread::spawn(move || {
        peer.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        let mut buf = [0u8; 2048];
        let mut got = 0u64;
        while let Ok(n) = peer.recv(&mut buf) {
            got += n as u64;
        }
        got
    });
    // Ten times the cap for three seconds.
    let start = Instant::now();
    let payload = [0x5au8; 1000];
    let msg = channel_data(&payload, &[]);
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(3) {
        e.client.channel().send(&msg).unwrap();
        sent += 1000;
        std::thread::sleep(Duration::from_micros(1800));
    }
    let got = counter.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    // What a token bucket of one second's burst allows, whichever path
    // carries it, with room for one grant in flight.
    let allowed = (CAP as f64 * (secs + 2.0)) as u64;
    assert!(sent > 2 * allowed, "offered {sent}");
    assert!(
        got <= allowed,
        "{got} bytes reached the peer in {secs:.1} s under a {CAP} B/s cap"
    );
    assert!(got >= CAP * 2, "only {got} bytes relayed");
    let kernel = settled(&t, "turnpike_fast_path_packets_total");
    eprintln!(
        "cap {CAP} B/s: offered {sent} B, relayed {got} B in {secs:.1} s, {kernel} packets by the kernel"
    );
    assert!(kernel > 0.0, "the kernel relayed part of it");
    drop(server);
}

#[test]
fn auto_without_privileges_falls_back_to_user_space() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    // The server as nobody: no CAP_BPF or CAP_NET_ADMIN.
    if !ok(Command::new("setpriv").args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        bin(),
        "--version",
    ])) {
        common::missing(
            "unprivileged fallback",
            &format!("setpriv missing, or nobody cannot run {}", bin()),
        );
        return;
    }
    let t = topology("nopriv", 80, true);
    let (c, p) = (80, 81);
    let mut child = Command::new("ip")
        .args([
            "netns",
            "exec",
            &t.server,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args([
            bin(),
            "serve",
            "--listen",
            &format!("10.203.{c}.1:3478"),
            "--no-tls",
        ])
        .args(["--user", "bench:bench-pw1", "--realm", "tp"])
        .args([
            "--relay-ip",
            &format!("10.203.{p}.1"),
            "--allow-peer",
            &format!("10.203.{p}.0/24"),
        ])
        .args(["--metrics-listen", "127.0.0.1:9641", "--threads", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = BufReader::new(child.stderr.take().unwrap());
    let server = Server(child);
    let started = err
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("turnpike started") || l.contains("turnpike: "))
        .expect("a start-up line");
    assert!(started.contains("fast_path=unavailable"), "{started}");
    let mut e = bound(&t, 80, false);
    e.warm_up();
    e.peer.send_to(b"user space", e.relayed).unwrap();
    assert_eq!(
        e.at_client(Duration::from_secs(1)),
        Some(channel_data(b"user space", &[]))
    );
    assert_eq!(settled(&t, "turnpike_fast_path_active"), 0.0);
    drop(server);
}

#[test]
fn an_icmp_error_for_a_datagram_the_kernel_sent_reaches_the_client() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    let t = topology("icmp", 90, true);
    let (server, _) = serve(&t, 90, &fast_args());
    let mut e = bound(&t, 90, false);
    e.warm_up();
    let before = settled(&t, "turnpike_fast_path_packets_total");
    // The peer goes away: its host answers port unreachable, to the
    // relayed address, whose socket has the error queued as if it had
    // sent the datagram itself (RFC 8656 §11.5, as in user space).
    let gone = e.peer.local_addr().unwrap();
    drop(std::mem::replace(
        &mut e.peer,
        in_ns(&t.outer, || peer_socket(90, false)),
    ));
    // ICMP is best effort (the peer's kernel rate-limits its errors, and a
    // busy CI machine has seen one go missing): a few tries, each counted.
    let mut sent = 0;
    let answer = loop {
        e.client.channel().send(&channel_data(b"anyone?", &[])).unwrap();
        sent += 1;
        match e.client.recv(Duration::from_millis(1500)) {
            Err(turnpike_client::client::ClientError::Timeout) if sent < 4 => continue,
            r => break r.unwrap(),
        }
    };
    match answer {
        Received::Icmp {
            peer,
            icmp_type,
            icmp_code,
            ..
        } => assert_eq!((peer, icmp_type, icmp_code), (gone, 3, 3), "port unreachable"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        settled(&t, "turnpike_fast_path_packets_total") - before,
        f64::from(sent),
        "every datagram went out through the kernel"
    );
    drop(server);
}

/// Both legs of a call on one server (two clients behind symmetric NATs
/// relaying to each other's relayed address): on a stock one-NIC host the
/// program hands A's ChannelData straight to B as B's ChannelData, and
/// back, in IPv4 and IPv6, exact bytes with good UDP checksums, counted
/// on both allocations as the two user-space hops would be.
#[test]
fn both_legs_of_a_call_on_one_server_are_relayed_in_one_pass() {
    if let Err(why) = can_run() {
        common::missing("kernel fast path", &why);
        return;
    }
    if !ok(Command::new("sh").args(["-c", "command -v tcpdump"])) {
        common::missing("kernel fast path", "tcpdump not found (apt-get install tcpdump)");
        return;
    }
    let net = 94;
    let t = one_nic_topology("hairpin", net, false);
    let (server, started) = serve(&t, net, &["--fast-path", "on", "--fast-path-interface", "s1"]);
    assert!(started.contains("fast_path=on: s1 (native)"), "{started}");
    const CH_B: u16 = 0x4002;
    let cap = Command::new("ip")
        .args([
            "netns", "exec", &t.outer, "tcpdump", "-nn", "-vv", "-l", "-i", "a1",
        ])
        .args(["udp", "port", "3478"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut cap = common::Proc(cap);
    std::thread::sleep(Duration::from_millis(500));
    let before = metric(&t, "turnpike_fast_path_packets_total");
    let sent = in_ns(&t.outer, move || {
        let mut sent = 0u64;
        for v6 in [false, true] {
            let client = |from: String| {
                let ch = Channel::connect_from(
                    &ClientTransport::Udp,
                    server_addr(net, v6),
                    Some(from.parse().unwrap()),
                    Duration::from_secs(2),
                )
                .unwrap();
                let mut c = TurnClient::new(ch, "bench", "bench-pw1");
                if v6 {
                    c.set_relay_family(RelayFamily::Ipv6);
                }
                c
            };
            let host = |n: u8| {
                if v6 {
                    format!("fd03:{net}::{n}")
                } else {
                    format!("10.203.{net}.{n}")
                }
            };
            let (mut a, mut b) = (client(host(2)), client(host(3)));
            let (ra, rb) = (a.allocate().unwrap().relayed, b.allocate().unwrap().relayed);
            a.channel_bind(CH, rb).unwrap();
            b.channel_bind(CH_B, ra).unwrap();
            let framed = |ch: u16, data: &[u8], pad: usize| {
                let mut m = stun_proto::ChannelData::header(ch, data.len() as u16).to_vec();
                m.extend_from_slice(data);
                m.extend(std::iter::repeat_n(0x5au8, pad));
                m
            };
            let wait = || Instant::now() + Duration::from_secs(1);
            // Each side's first packets teach the program its next hop.
            for _ in 0..2 {
                a.channel().send(&framed(CH, b"warm", 0)).unwrap();
                assert_eq!(b.channel().recv(wait()).unwrap(), Some(framed(CH_B, b"warm", 0)));
                b.channel().send(&framed(CH_B, b"warm", 0)).unwrap();
                assert_eq!(a.channel().recv(wait()).unwrap(), Some(framed(CH, b"warm", 0)));
            }
            for len in [0usize, 1, 3, 4, 5, 100, 161, 1001, 1200] {
                let data: Vec<u8> = (0..len).map(|i| (i * 13 + len) as u8).collect();
                for pad in [0, (4 - len % 4) % 4] {
                    a.channel().send(&framed(CH, &data, pad)).unwrap();
                    // Arrives on B's own channel, unpadded.
                    assert_eq!(
                        b.channel().recv(wait()).unwrap(),
                        Some(framed(CH_B, &data, 0)),
                        "v6={v6}: A to B, len {len} pad {pad}"
                    );
                    b.channel().send(&framed(CH_B, &data, pad)).unwrap();
                    assert_eq!(
                        a.channel().recv(wait()).unwrap(),
                        Some(framed(CH, &data, 0)),
                        "v6={v6}: B to A, len {len} pad {pad}"
                    );
                    sent += 2;
                }
            }
            a.refresh(0).unwrap();
            b.refresh(0).unwrap();
        }
        sent
    });
    let kernel = settled(&t, "turnpike_fast_path_packets_total") - before;
    // One kernel count per datagram that took one pass (the warm-up's
    // first may have gone through user space).
    assert!(
        kernel >= sent as f64,
        "the kernel relayed {kernel} of {sent} in one pass"
    );
    // Each datagram is A's to its peer and B's from its peer, as the two
    // user-space hops would count it (four warm-ups a family included).
    assert_eq!(
        metric(&t, "turnpike_relayed_packets_total"),
        2.0 * (sent + 8) as f64
    );
    std::thread::sleep(Duration::from_millis(300));
    let mut stdout = cap.0.stdout.take().unwrap();
    let _ = cap.0.kill();
    let _ = cap.0.wait();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut text).unwrap();
    let to_clients: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains(&format!("10.203.{net}.1.3478 > ")) || l.contains(&format!("fd03:{net}::1.3478 > "))
        })
        .collect();
    assert!(to_clients.len() >= sent as usize, "{text}");
    let bad: Vec<&&str> = to_clients.iter().filter(|l| !l.contains("udp sum ok")).collect();
    assert!(bad.is_empty(), "bad checksums: {bad:?}");
    drop(server);
}
