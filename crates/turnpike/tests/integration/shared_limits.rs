//! Limits hold per host, not per worker thread: with `--threads 2`, one IP
//! gets one answer budget whether it uses one source port or 64 (the
//! kernel spreads ports over workers), and one per-source TCP cap.

use crate::common;

use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

fn binding() -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    b.extend_from_slice(&[7u8; 12]);
    b
}

/// Sends `n` Bindings spread over `ports` sockets at once; counts answers.
fn answers(server: SocketAddr, ports: usize, n: usize) -> usize {
    let socks: Vec<UdpSocket> = (0..ports)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let req = binding();
    for i in 0..n {
        socks[i % ports].send_to(&req, server).unwrap();
    }
    // Every answer is back well within this on loopback; then each socket
    // is drained without waiting.
    std::thread::sleep(Duration::from_millis(500));
    let mut got = 0;
    let mut buf = [0u8; 1500];
    for s in &socks {
        while s.recv_from(&mut buf).is_ok() {
            got += 1;
        }
    }
    got
}

#[test]
fn one_answer_budget_per_source_ip_across_workers() {
    // 20 answers/s, burst 40: 300 requests sent at once get about 40.
    let h = common::start(&["--rate-limit-per-ip", "20", "--threads", "2"]);
    let one_port = answers(h.listen[0], 1, 300);
    std::thread::sleep(Duration::from_secs(3)); // the bucket refills (60 > burst)
    let many_ports = answers(h.listen[0], 64, 300);
    assert!((35..=50).contains(&one_port), "one port: {one_port}");
    assert!(
        (35..=50).contains(&many_ports),
        "64 ports must share the budget of one: {many_ports} (one port got {one_port})"
    );
    h.shutdown();
}

#[test]
fn per_source_connection_cap_leaves_room_for_others() {
    let h = common::start(&[
        "--max-connections-per-ip",
        "10",
        "--threads",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let addr = h.listen[0];
    let mut held = Vec::new();
    for _ in 0..25 {
        held.push(TcpStream::connect(addr).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    // Connections past the cap were closed at once: a read sees EOF.
    let mut open = 0;
    for s in &held {
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut b = [0u8; 1];
        match std::io::Read::read(&mut &*s, &mut b) {
            Ok(0) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                open += 1
            }
            _ => {}
        }
    }
    assert_eq!(open, 10, "one source holds at most the cap, over both workers");
    // Another source (127.0.0.2 is this host's too) still gets in.
    let other = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    other
        .bind(&"127.0.0.2:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    other.connect(&addr.into()).unwrap();
    let other: TcpStream = other.into();
    other.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut b = [0u8; 1];
    let r = std::io::Read::read(&mut &other, &mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "another source is not closed: {r:?}"
    );
    // Every refusal is counted, whichever worker accepted it.
    let metrics = h.metrics.unwrap();
    let want = "turnpike_connections_refused_total{limit=\"per_source\"} 15";
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let body = scrape(metrics);
        if body.contains(want) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{want} not in:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(held);
    h.shutdown();
}

fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn a_blocked_pair_stays_blocked_from_every_port_and_worker() {
    use turnpike_client::client::{Channel, ClientError, ClientTransport, TurnClient};
    let h = common::start(&["--threads", "2", "--auth-fail-limit", "4"]);
    let server = h.listen[0];
    let fresh = |pw: &str, from: Option<std::net::IpAddr>| {
        let ch = Channel::connect_from(&ClientTransport::Udp, server, from, Duration::from_secs(3)).unwrap();
        let mut c = TurnClient::new(ch, common::USER, pw);
        c.set_timeout(Duration::from_millis(1200));
        c
    };
    // Four wrong guesses, each from its own port (so over both workers);
    // past half the limit one check a second is made, so they are spaced.
    for _ in 0..4 {
        assert!(matches!(
            fresh("guess", None).allocate(),
            Err(ClientError::Error { code: 401, .. })
        ));
        std::thread::sleep(Duration::from_millis(1050));
    }
    // The right password from 8 more fresh ports: every one is refused
    // (dropped) for the block time, whichever worker its port hashes to.
    for i in 0..8 {
        assert!(
            matches!(
                fresh(common::PASSWORD, None).allocate(),
                Err(ClientError::Timeout)
            ),
            "port {i}: the blocked pair must not be answered"
        );
    }
    // Another source address is not blocked.
    fresh(common::PASSWORD, Some("127.0.0.4".parse().unwrap()))
        .allocate()
        .unwrap();
    h.shutdown();
}
