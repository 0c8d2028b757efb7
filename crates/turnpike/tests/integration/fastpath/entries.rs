//! One fast-path entry at a time: exact bytes both ways in both families
//! and on one NIC, the deadline, removal (deletion, admin, drain), the
//! bandwidth cap, ICMP, the hairpin between two allocations, and what the
//! kernel does not own.

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::in_ns;
use turnpike_client::client::{Channel, ClientTransport, Received, RelayFamily, TurnClient};

use super::*;

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
