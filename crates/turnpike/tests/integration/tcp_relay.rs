//! RFC 6062 TCP relays over real sockets, two workers (so data
//! connections often land on the other worker and are passed over): a
//! peer the server connects to and a peer that connects in, over TCP and
//! TLS control connections, IPv4 and IPv6; refused peers; closing either
//! side; and back-pressure from a peer that stops reading.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use turnpike_client::client::{Channel, ClientTransport, Received, TurnClient};

fn tcp_client(t: &ClientTransport, server: SocketAddr) -> TurnClient {
    let mut c = client(t, server, USER, PASSWORD);
    c.set_tcp_relay(true);
    c
}

fn read_exact_within(s: &mut TcpStream, n: usize) -> Vec<u8> {
    read_exact_within_secs(s, n, 5)
}

fn raw_read(ch: &mut Channel, n: usize) -> Vec<u8> {
    let end = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < n {
        match ch.recv_raw(end).unwrap() {
            Some(b) => got.extend_from_slice(&b),
            None => panic!("only {} of {n} bytes arrived", got.len()),
        }
    }
    got
}

/// Connect to a listening peer; data both ways; the peer sees the relayed
/// address as the source.
fn active(h: &turnpike::runtime::Handle, t: &ClientTransport, server: SocketAddr, loopback: &str) {
    let peer = TcpListener::bind(format!("{loopback}:0")).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut c = tcp_client(t, server);
    let alloc = c.allocate().expect("a TCP allocation");
    let id = c.connect(peer_addr).expect("Connect");
    let (mut p, from) = peer.accept().unwrap();
    assert_eq!(from, alloc.relayed, "the peer sees the relayed address");
    let mut data = c.connection_bind(t, server, id).expect("ConnectionBind");
    data.send(b"hello peer").unwrap();
    assert_eq!(read_exact_within(&mut p, 10), b"hello peer");
    p.write_all(b"hello client").unwrap();
    assert_eq!(raw_read(&mut data, 12), b"hello client");
    // The session list (admin API) shows the data connection and its bytes.
    let sessions = h.control().sessions();
    let s = sessions
        .iter()
        .find(|s| s.relayed == alloc.relayed)
        .expect("the session is listed");
    assert_eq!(s.tcp_connections.len(), 1, "{s:?}");
    let t = &s.tcp_connections[0];
    assert_eq!(
        (t.id, t.peer, t.state, t.to_peer_bytes, t.from_peer_bytes),
        (id, peer_addr, "bound", 10, 12)
    );
    // A second Connect to the same peer while this one is up: 446.
    match c.connect(peer_addr) {
        Err(turnpike_client::client::ClientError::Error { code: 446, .. }) => {}
        other => panic!("expected 446, got {other:?}"),
    }
    // The peer closing closes the client's data connection.
    drop(p);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        match data.recv_raw(end) {
            Err(_) => break,
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the data connection stayed open after the peer closed"),
        }
    }
    let _ = c.refresh(0);
}

#[test]
fn connect_relays_both_ways_over_tcp_and_tls_control_connections() {
    let h = start(&["--allow-loopback-peers"]);
    active(&h, &ClientTransport::Tcp, h.listen[0], "127.0.0.1");
    let tls = ClientTransport::Tls {
        pinned: h.tls_leaf.clone(),
    };
    active(&h, &tls, h.tls_listen[0], "127.0.0.1");
    // Many data connections: whichever worker the kernel picks, the bind
    // reaches the allocation's worker.
    for _ in 0..6 {
        active(&h, &ClientTransport::Tcp, h.listen[0], "127.0.0.1");
    }
    h.shutdown();
}

fn active6(h: &turnpike::runtime::Handle, server: SocketAddr) {
    let peer = TcpListener::bind("[::1]:0").unwrap();
    let mut c = tcp_client(&ClientTransport::Tcp, server);
    c.set_relay_family(turnpike_client::client::RelayFamily::Ipv6);
    let alloc = c.allocate().expect("an IPv6 TCP allocation");
    assert!(alloc.relayed.is_ipv6());
    let id = c.connect(peer.local_addr().unwrap()).expect("Connect");
    let (mut p, from) = peer.accept().unwrap();
    assert_eq!(from, alloc.relayed);
    let mut data = c.connection_bind(&ClientTransport::Tcp, server, id).unwrap();
    data.send(b"v6 out").unwrap();
    assert_eq!(read_exact_within(&mut p, 6), b"v6 out");
    p.write_all(b"v6 back").unwrap();
    assert_eq!(raw_read(&mut data, 7), b"v6 back");
    let _ = h;
}

#[test]
fn connect_relays_over_ipv6() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        common::missing("TCP relay over IPv6", "no IPv6 loopback here");
        return;
    }
    let h = start(&[
        "--allow-loopback-peers",
        "--listen",
        "[::1]:0",
        "--relay-ip",
        "::1",
    ]);
    active6(&h, h.listen[0]);
    h.shutdown();
}

fn scrape(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// Waits (workers publish once a second) until the metrics contain every
/// line of `want`.
fn metrics_reach(addr: SocketAddr, want: &[&str]) {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let body = scrape(addr);
        if want.iter().all(|w| body.lines().any(|l| l == *w)) {
            return;
        }
        assert!(Instant::now() < end, "{want:?} not in:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn peers_connect_in_with_a_permission_and_are_refused_without() {
    let h = start(&["--allow-loopback-peers", "--metrics-listen", "127.0.0.1:0"]);
    let server = h.listen[0];
    let mut c = tcp_client(&ClientTransport::Tcp, server);
    let alloc = c.allocate().unwrap();
    // No permission: closed at once.
    let mut refused = TcpStream::connect(alloc.relayed).unwrap();
    refused.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b = [0u8; 1];
    assert!(
        matches!(refused.read(&mut b), Ok(0) | Err(_)),
        "a peer without a permission is closed"
    );
    c.create_permission(&["127.0.0.1:1".parse().unwrap()]).unwrap();
    let mut p = TcpStream::connect(alloc.relayed).unwrap();
    let peer_addr = p.local_addr().unwrap();
    // What the peer sends before the bind waits for it.
    p.write_all(b"early bytes").unwrap();
    let id = match c.recv(Duration::from_secs(5)).unwrap() {
        Received::ConnectionAttempt { id, peer } => {
            assert_eq!(peer, peer_addr);
            id
        }
        other => panic!("expected ConnectionAttempt, got {other:?}"),
    };
    let mut data = c.connection_bind(&ClientTransport::Tcp, server, id).unwrap();
    assert_eq!(raw_read(&mut data, 11), b"early bytes");
    data.send(b"to the peer").unwrap();
    assert_eq!(read_exact_within(&mut p, 11), b"to the peer");
    // The client closing its data connection closes the peer's.
    drop(data);
    p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(matches!(p.read(&mut b), Ok(0) | Err(_)), "the peer is closed too");
    // Deleting the allocation closes its data connections.
    let mut p2 = TcpStream::connect(alloc.relayed).unwrap();
    let id2 = match c.recv(Duration::from_secs(5)).unwrap() {
        Received::ConnectionAttempt { id, .. } => id,
        other => panic!("{other:?}"),
    };
    let _data2 = c.connection_bind(&ClientTransport::Tcp, server, id2).unwrap();
    c.refresh(0).unwrap();
    p2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        matches!(p2.read(&mut b), Ok(0) | Err(_)),
        "closed with the allocation"
    );
    metrics_reach(
        h.metrics.unwrap(),
        &[
            "turnpike_tcp_connection_events_total{event=\"peer_refused\"} 1",
            "turnpike_tcp_connection_events_total{event=\"peer_accepted\"} 2",
            "turnpike_tcp_connection_events_total{event=\"bound\"} 2",
            "turnpike_tcp_relayed_bytes_total{direction=\"to_peer\"} 11",
            "turnpike_tcp_relayed_bytes_total{direction=\"from_peer\"} 11",
            "turnpike_tcp_connections 0",
        ],
    );
    h.shutdown();
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_peer_that_stops_reading_stalls_the_client_not_the_memory() {
    let h = start(&["--allow-loopback-peers"]);
    let server = h.listen[0];
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = tcp_client(&ClientTransport::Tcp, server);
    c.allocate().unwrap();
    let id = c.connect(peer.local_addr().unwrap()).unwrap();
    let (mut p, _) = peer.accept().unwrap();
    let data = c.connection_bind(&ClientTransport::Tcp, server, id).unwrap();
    let turnpike_client::client::StdSocket::Tcp(mut out, _) = data.into_std().unwrap() else {
        panic!("a TCP data connection")
    };
    out.set_nonblocking(true).unwrap();
    let before = rss_kib();
    // The peer reads nothing: the client's writes must stall, with what is
    // in flight bounded by socket buffers and the server's 256 KiB.
    let chunk = vec![7u8; 64 * 1024];
    let mut sent = 0usize;
    let mut stalled_since: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match out.write(&chunk) {
            Ok(n) => {
                sent += n;
                stalled_since = None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let since = *stalled_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_millis(500) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        stalled_since.is_some(),
        "the client never stalled: {sent} bytes taken"
    );
    let grown = rss_kib().saturating_sub(before);
    eprintln!("sent {sent} bytes before stalling; RSS grew {grown} KiB");
    assert!(
        sent < 64 * 1024 * 1024,
        "{sent} bytes taken with a peer that reads nothing"
    );
    assert!(grown < 32 * 1024, "RSS grew {grown} KiB while stalled");
    // The peer reads again: everything arrives, in order.
    p.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    while got < sent {
        let n = p
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("the peer got {got} of {sent} bytes, then: {e}"));
        assert!(n > 0, "the peer's stream ended after {got} of {sent}");
        assert!(buf[..n].iter().all(|b| *b == 7));
        got += n;
    }
    assert_eq!(got, sent);
    h.shutdown();
}

#[test]
fn the_bandwidth_cap_slows_tcp_relaying_without_losing_bytes() {
    // 100 kB/s each way, one second of burst: 300 kB need at least 2 s.
    let h = start(&["--allow-loopback-peers", "--max-bps", "100000"]);
    let server = h.listen[0];
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = tcp_client(&ClientTransport::Tcp, server);
    c.allocate().unwrap();
    let id = c.connect(peer.local_addr().unwrap()).unwrap();
    let (mut p, _) = peer.accept().unwrap();
    let mut data = c.connection_bind(&ClientTransport::Tcp, server, id).unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let t0 = Instant::now();
    let sender = {
        let payload = payload.clone();
        let mut p2 = p.try_clone().unwrap();
        std::thread::spawn(move || p2.write_all(&payload).unwrap())
    };
    // Peer → client, capped.
    let end = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < payload.len() {
        match data.recv_raw(end).unwrap() {
            Some(b) => got.extend_from_slice(&b),
            None => panic!("{} of {} bytes in 20 s", got.len(), payload.len()),
        }
    }
    let down = t0.elapsed();
    sender.join().unwrap();
    assert!(got == payload, "every byte, in order");
    assert!(
        down >= Duration::from_millis(1800),
        "300 kB at 100 kB/s took {down:?}"
    );
    // Client → peer, capped the same way.
    let t1 = Instant::now();
    data.send(&payload).unwrap();
    let back = read_exact_within_secs(&mut p, payload.len(), 20);
    let up = t1.elapsed();
    assert!(back == payload);
    assert!(
        up >= Duration::from_millis(1800),
        "300 kB at 100 kB/s took {up:?}"
    );
    h.shutdown();
}

fn read_exact_within_secs(s: &mut TcpStream, n: usize, secs: u64) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(secs))).unwrap();
    let mut got = vec![0u8; n];
    s.read_exact(&mut got).unwrap();
    got
}

#[test]
fn peers_connect_in_over_a_tls_control_connection() {
    let h = start(&["--allow-loopback-peers"]);
    let tls = ClientTransport::Tls {
        pinned: h.tls_leaf.clone(),
    };
    let server = h.tls_listen[0];
    for _ in 0..4 {
        let mut c = tcp_client(&tls, server);
        let alloc = c.allocate().unwrap();
        c.create_permission(&["127.0.0.1:1".parse().unwrap()]).unwrap();
        let mut p = TcpStream::connect(alloc.relayed).unwrap();
        let id = match c.recv(Duration::from_secs(5)).unwrap() {
            Received::ConnectionAttempt { id, .. } => id,
            other => panic!("expected ConnectionAttempt, got {other:?}"),
        };
        // The data connection is TLS too, and may reach the other worker.
        let mut data = c.connection_bind(&tls, server, id).unwrap();
        p.write_all(b"peer over tls").unwrap();
        assert_eq!(raw_read(&mut data, 13), b"peer over tls");
        data.send(b"client over tls").unwrap();
        assert_eq!(read_exact_within(&mut p, 15), b"client over tls");
        c.refresh(0).unwrap();
    }
    h.shutdown();
}

#[test]
fn refused_and_failed_connects_and_unknown_binds_over_real_sockets() {
    // The default peer policy: loopback peers are refused.
    let strict = start(&[]);
    let mut c = tcp_client(&ClientTransport::Tcp, strict.listen[0]);
    c.allocate().unwrap();
    match c.connect("127.0.0.1:9".parse().unwrap()) {
        Err(turnpike_client::client::ClientError::Error { code: 403, .. }) => {}
        other => panic!("a loopback peer by default: expected 403, got {other:?}"),
    }
    strict.shutdown();
    let h = start(&["--allow-loopback-peers"]);
    let server = h.listen[0];
    let mut c = tcp_client(&ClientTransport::Tcp, server);
    c.allocate().unwrap();
    // Nothing listens there: the connect is refused at once, 447.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    match c.connect(closed) {
        Err(turnpike_client::client::ClientError::Error { code: 447, .. }) => {}
        other => panic!("a closed port: expected 447, got {other:?}"),
    }
    // An id the server never gave: 400, and the allocation is unharmed.
    match c.connection_bind(&ClientTransport::Tcp, server, 0x0012_3456) {
        Err(turnpike_client::client::ClientError::Error { code: 400, .. }) => {}
        Err(e) => panic!("expected 400, got {e:?}"),
        Ok(_) => panic!("an unknown CONNECTION-ID was bound"),
    }
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let id = c
        .connect(peer.local_addr().unwrap())
        .expect("Connect still works");
    let (mut p, _) = peer.accept().unwrap();
    let mut data = c.connection_bind(&ClientTransport::Tcp, server, id).unwrap();
    data.send(b"ok").unwrap();
    assert_eq!(read_exact_within(&mut p, 2), b"ok");
    h.shutdown();
}
