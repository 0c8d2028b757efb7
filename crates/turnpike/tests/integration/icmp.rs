//! RFC 8656 §11.5 over real sockets: a datagram relayed to a closed port on
//! 127.0.0.1 draws an ICMP port unreachable, which reaches the client as a
//! Data indication with ICMP; the metric counts it.

use crate::common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::*;
use turnpike_client::client::{ClientTransport, Received};

#[test]
fn icmp_port_unreachable_reaches_the_client() {
    let h = start(&["--allow-loopback-peers", "--metrics-listen", "127.0.0.1:0"]);
    let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    c.allocate().unwrap();
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer = closed.local_addr().unwrap();
    drop(closed);
    c.create_permission(&[peer]).unwrap();
    c.send_indication(peer, b"anyone there?").unwrap();
    let got = c.recv(Duration::from_secs(3)).unwrap();
    assert_eq!(
        got,
        Received::Icmp {
            peer,
            icmp_type: 3,
            icmp_code: 3,
            info: 0
        },
        "ICMP destination/port unreachable"
    );
    // Metrics are published once a second.
    let addr = h.metrics.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let body = scrape(addr);
        if body.contains("turnpike_icmp_total{outcome=\"relayed\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "metric not counted:\n{body}");
        std::thread::sleep(Duration::from_millis(200));
    }
    h.shutdown();
}

fn scrape(addr: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}
