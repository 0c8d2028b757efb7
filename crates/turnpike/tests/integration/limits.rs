//! Abuse limits over real sockets: connection timeouts (stalled TLS
//! handshakes, slowloris, idle), connection caps, quotas, bandwidth caps,
//! per-source rate limits, brute-force blocking, and memory under a flood.

use crate::common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use stun_proto::{method, Class, MessageBuilder, MessageType};
use turnpike_client::client::{binding, Channel, ClientError, ClientTransport, TurnClient};

/// Waits until the server closes `s` (EOF or reset); returns how long it took.
fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 1024];
    while start.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

fn binding_bytes() -> Vec<u8> {
    let mut b = Vec::new();
    MessageBuilder::new(
        &mut b,
        MessageType::new(method::BINDING, Class::Request),
        &[5; 12],
    );
    b
}

#[test]
fn stalled_tls_handshake_and_slowloris_are_closed() {
    let h = start(&["--handshake-timeout", "1", "--idle-timeout", "1"]);
    // A TLS client that never finishes its handshake.
    let mut tls = TcpStream::connect(h.tls_listen[0]).unwrap();
    tls.write_all(&[0x16, 0x03, 0x01, 0x00]).unwrap();
    // A TCP client that stops mid-frame, after a whole message.
    let mut slow = TcpStream::connect(h.listen[0]).unwrap();
    slow.write_all(&binding_bytes()).unwrap();
    slow.write_all(&binding_bytes()[..7]).unwrap();
    // A TCP client that connects and says nothing.
    let mut silent = TcpStream::connect(h.listen[0]).unwrap();
    for (name, s) in [("tls", &mut tls), ("slow", &mut slow), ("silent", &mut silent)] {
        assert!(
            closed_within(s, Duration::from_secs(5)).is_some(),
            "{name} connection left open"
        );
    }
    h.shutdown();
}

#[test]
fn idle_connections_close_unless_they_hold_an_allocation() {
    let h = start(&["--idle-timeout", "1", "--allow-loopback-peers"]);
    let mut idle = TcpStream::connect(h.listen[0]).unwrap();
    idle.write_all(&binding_bytes()).unwrap();
    let mut busy = client(&ClientTransport::Tcp, h.listen[0], USER, PASSWORD);
    busy.allocate().unwrap();
    assert!(
        closed_within(&mut idle, Duration::from_secs(5)).is_some(),
        "idle connection left open"
    );
    // The allocation's connection outlived the idle timeout and still works.
    assert_eq!(busy.refresh(600).unwrap(), 600);
    h.shutdown();
}

#[test]
fn connection_cap_per_worker() {
    let h = start(&["--threads", "1", "--max-connections", "4"]);
    let mut held: Vec<Channel> = (0..4)
        .map(|_| Channel::connect(&ClientTransport::Tcp, h.listen[0], Duration::from_secs(3)).unwrap())
        .collect();
    for ch in &mut held {
        binding(ch, Duration::from_secs(3)).unwrap();
    }
    let mut fifth = TcpStream::connect(h.listen[0]).unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(3)).is_some(),
        "fifth connection accepted"
    );
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    let mut again = Channel::connect(&ClientTransport::Tcp, h.listen[0], Duration::from_secs(3)).unwrap();
    binding(&mut again, Duration::from_secs(3)).unwrap();
    h.shutdown();
}

#[test]
fn user_and_total_quotas_over_the_wire() {
    let h = start(&["--user-quota", "2", "--total-quota", "3", "--user", "bob:builder"]);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
        c.allocate().unwrap();
        held.push(c);
    }
    let mut third = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    assert!(matches!(
        third.allocate(),
        Err(ClientError::Error { code: 486, .. })
    ));
    let mut bob = client(&ClientTransport::Udp, h.listen[0], "bob", "builder");
    bob.allocate().unwrap();
    let mut bob2 = client(&ClientTransport::Udp, h.listen[0], "bob", "builder");
    assert!(matches!(
        bob2.allocate(),
        Err(ClientError::Error { code: 508, .. })
    ));
    held[0].refresh(0).unwrap();
    bob2.allocate().unwrap();
    h.shutdown();
}

/// A server with `args` (and loopback peers): `calls` allocations of one
/// user, each bound to one peer, send `each` ChannelData of 500 bytes in
/// turn, as fast as they can; how many reached the peer.
fn burst_through_caps(args: &[&str], calls: usize, each: usize) -> usize {
    let h = start(&[args, &["--allow-loopback-peers"]].concat());
    let peer = peer();
    peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut clients = Vec::new();
    for _ in 0..calls {
        let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
        c.allocate().unwrap();
        c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
        clients.push(c);
    }
    for _ in 0..each {
        for c in &mut clients {
            c.send_channel(0x4000, &[7u8; 500]).unwrap();
        }
    }
    let mut n = 0;
    let mut buf = [0u8; 1024];
    while peer.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    h.shutdown();
    n
}

#[test]
fn max_bps_drops_the_excess() {
    let n = burst_through_caps(&["--max-bps", "2000"], 1, 40);
    // 2000 bytes of burst plus whatever refilled while sending: exact counts
    // are the fake-time tests' job; here the cap must visibly bite.
    assert!(
        (4..=20).contains(&n),
        "{n} of 40 packets of 500 bytes passed a 2000 B/s cap"
    );
}

/// `--user-max-bps` holds per host: sixteen allocations of one user, which
/// the kernel spreads over four workers by their source ports (all on one
/// worker: 4 × 4^-16), get through together what one would alone.
#[test]
fn the_per_user_cap_holds_across_workers() {
    let n = burst_through_caps(&["--threads", "4", "--user-max-bps", "2000"], 16, 10);
    // 2000 bytes of burst and what refilled while sending; buckets per
    // worker would let at least 8 through (two workers' bursts).
    assert!(
        (3..=6).contains(&n),
        "{n} of 160 packets of 500 bytes passed one user's 2000 B/s cap"
    );
}

#[test]
fn per_source_rate_limit_on_binding() {
    let h = start(&["--threads", "1", "--rate-limit-per-ip", "5"]);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let req = binding_bytes();
    for _ in 0..200 {
        s.send_to(&req, h.listen[0]).unwrap();
    }
    let mut answered = 0;
    let mut buf = [0u8; 256];
    while s.recv(&mut buf).is_ok() {
        answered += 1;
    }
    assert!(
        (10..=100).contains(&answered),
        "{answered} of 200 answered at 5/s (burst 10)"
    );
    // Another source address is unaffected.
    let mut other = Channel::connect_from(
        &ClientTransport::Udp,
        h.listen[0],
        Some("127.0.0.2".parse().unwrap()),
        Duration::from_secs(3),
    )
    .unwrap();
    binding(&mut other, Duration::from_secs(3)).unwrap();
    h.shutdown();
}

#[test]
fn brute_force_is_blocked_for_that_source_only() {
    let h = start(&["--threads", "1", "--auth-fail-limit", "4"]);
    // Past half the limit only one attempt a second is checked, so the
    // guesses are spaced out to reach the limit.
    for _ in 0..4 {
        let mut c = client(&ClientTransport::Udp, h.listen[0], USER, "guess");
        c.set_timeout(Duration::from_millis(1500));
        assert!(matches!(c.allocate(), Err(ClientError::Error { code: 401, .. })));
        std::thread::sleep(Duration::from_millis(1050));
    }
    let mut right_here = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    right_here.set_timeout(Duration::from_millis(1500));
    assert!(
        matches!(right_here.allocate(), Err(ClientError::Timeout)),
        "blocked pair is not answered"
    );
    let elsewhere: IpAddr = "127.0.0.3".parse().unwrap();
    let ch = Channel::connect_from(
        &ClientTransport::Udp,
        h.listen[0],
        Some(elsewhere),
        Duration::from_secs(3),
    )
    .unwrap();
    TurnClient::new(ch, USER, PASSWORD).allocate().unwrap();
    h.shutdown();
}

#[test]
fn rss_stays_flat_under_a_many_source_flood() {
    // The real binary, so its RSS is its own.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // Port 0, read back from the start-up line: no race for a free port.
    let mut child = std::process::Command::new(common::turnpike_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--user",
            "a:b",
            "--log-level",
            "info",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let child = KillOnDrop(child);
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(stderr);
    while !line.contains("turnpike started") {
        line.clear();
        assert!(
            std::io::BufRead::read_line(&mut reader, &mut line).unwrap() > 0,
            "server did not start"
        );
    }
    // Keep draining stderr so the server never blocks on a full pipe.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let server: SocketAddr = line
        .split("listen=[")
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap()
        .parse()
        .unwrap();
    let mut ch = Channel::connect(&ClientTransport::Udp, server, Duration::from_secs(2)).unwrap();
    binding(&mut ch, Duration::from_secs(2)).expect("server answers");
    let mut alloc = Vec::new();
    MessageBuilder::new(
        &mut alloc,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[1; 12],
    )
    .u32(stun_proto::attr::REQUESTED_TRANSPORT, 0x1100_0000);
    let flood = |n: usize| {
        // 64 source ports, Binding and unauthenticated Allocate, paced.
        let socks: Vec<UdpSocket> = (0..64).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for s in &socks {
            s.set_nonblocking(true).unwrap();
        }
        let bind = binding_bytes();
        let mut sink = [0u8; 512];
        for i in 0..n {
            let s = &socks[i % socks.len()];
            let _ = s.send_to(if i % 2 == 0 { &bind } else { &alloc }, server);
            if i % 256 == 0 {
                for s in &socks {
                    while s.recv(&mut sink).is_ok() {}
                }
                std::thread::sleep(Duration::from_micros(300));
            }
        }
    };
    flood(20_000); // warm-up: tables, buffers, allocator pools
    let before = rss_kib(child.0.id());
    flood(100_000);
    let after = rss_kib(child.0.id());
    drop(child);
    eprintln!("RSS before {before} KiB, after a 100k-packet flood {after} KiB");
    assert!(after <= before + 512, "RSS grew from {before} KiB to {after} KiB");
}

#[test]
fn relay_port_pool_exhaustion_is_508_and_ports_come_back() {
    // A four-port range: four allocations fit, the fifth gets 508, and a
    // deleted allocation's port is reusable at once.
    let base = 61000 + (std::process::id() % 1000) as u16 * 4;
    let (lo, hi) = (base.to_string(), (base + 3).to_string());
    let h = start(&["--threads", "1", "--min-port", &lo, "--max-port", &hi]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
        let a = c.allocate().unwrap();
        assert!((base..=base + 3).contains(&a.relayed.port()));
        held.push(c);
    }
    let mut fifth = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    assert!(matches!(
        fifth.allocate(),
        Err(ClientError::Error { code: 508, .. })
    ));
    held[0].refresh(0).unwrap();
    fifth.allocate().unwrap();
    h.shutdown();
}
