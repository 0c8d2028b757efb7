//! The PROXY protocol behind a real HAProxy (Debian's package, started and
//! stopped by PID here): v2 in front of the TCP listener, v1 in front of
//! TLS. The server must answer, count and limit by the client HAProxy
//! names, and close connections whose header comes from an address it
//! does not trust. Skipped with a message where haproxy is not installed.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use turnpike_client::client::{binding, Channel, ClientTransport, TurnClient};

struct Haproxy(Child, std::path::PathBuf);

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_file(&self.1);
    }
}

/// HAProxy on two free ports: TCP → `tcp` with PROXY v2, TLS (passed
/// through) → `tls` with PROXY v1. Its connections to turnpike come from
/// 127.0.0.1; the test's clients use 127.0.0.5 and 127.0.0.6.
fn haproxy(tcp: SocketAddr, tls: SocketAddr) -> Option<(Haproxy, SocketAddr, SocketAddr)> {
    let ok = Command::new("haproxy")
        .arg("-v")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        common::missing(
            "PROXY protocol",
            "haproxy not installed (apt-get install haproxy)",
        );
        return None;
    }
    let (p1, p2) = (common::free_port(), common::free_port());
    let cfg = format!(
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
         frontend turn_tcp\n  bind 127.0.0.1:{p1}\n  default_backend tcp_nodes\n\
         backend tcp_nodes\n  source 127.0.0.1\n  server n1 {tcp} send-proxy-v2\n\
         frontend turn_tls\n  bind 127.0.0.1:{p2}\n  default_backend tls_nodes\n\
         backend tls_nodes\n  source 127.0.0.1\n  server n1 {tls} send-proxy\n"
    );
    let path = std::env::temp_dir().join(format!("turnpike-haproxy-{}-{p1}.cfg", std::process::id()));
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("haproxy")
        .args(["-db", "-f"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let h = Haproxy(child, path);
    let front = (
        format!("127.0.0.1:{p1}").parse().unwrap(),
        format!("127.0.0.1:{p2}").parse().unwrap(),
    );
    // Up when both frontends accept.
    let end = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(front.0).is_err() || TcpStream::connect(front.1).is_err() {
        assert!(Instant::now() < end, "haproxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((h, front.0, front.1))
}

fn scrape(addr: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The metric once the workers have published (once a second), or what
/// it is after 3 s.
fn settled(addr: SocketAddr, name: &str, want: f64) -> f64 {
    let end = Instant::now() + Duration::from_secs(3);
    loop {
        let n = scrape(addr, name);
        if n >= want || Instant::now() > end {
            return n;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn from(t: &ClientTransport, ip: &str, to: SocketAddr) -> std::io::Result<Channel> {
    Channel::connect_from(t, to, Some(ip.parse().unwrap()), Duration::from_secs(3))
}

#[test]
fn behind_haproxy_the_server_sees_the_real_client() {
    let h = common::start(&[
        "--proxy-protocol-from",
        "127.0.0.1/32",
        "--max-connections-per-ip",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let Some((_hp, tcp_front, tls_front)) = haproxy(h.listen[0], h.tls_listen[0]) else {
        return;
    };
    let tls = ClientTransport::Tls {
        pinned: h.tls_leaf.clone(),
    };
    // XOR-MAPPED-ADDRESS is the client's address, not HAProxy's, through
    // v2 (TCP) and v1 (TLS).
    for (t, front) in [(ClientTransport::Tcp, tcp_front), (tls.clone(), tls_front)] {
        let mut ch = from(&t, "127.0.0.5", front).unwrap();
        let me = ch.local_addr().unwrap();
        assert_eq!(binding(&mut ch, Duration::from_secs(3)).unwrap(), me, "{t:?}");
    }
    // An allocation through HAProxy is the client's: the session list
    // (and so the logs and the admin API) names it.
    let mut c = TurnClient::new(
        from(&ClientTransport::Tcp, "127.0.0.6", tcp_front).unwrap(),
        common::USER,
        common::PASSWORD,
    );
    let me = c.channel().local_addr().unwrap();
    let a = c.allocate().unwrap();
    assert_eq!(a.mapped, me);
    let sessions = h.control().sessions();
    assert!(
        sessions.iter().any(|s| s.tuple.client == me),
        "{:?}",
        sessions.iter().map(|s| s.tuple.client).collect::<Vec<_>>()
    );
    // The per-source connection cap counts the real client: two from
    // 127.0.0.5 are served, the third is closed, while 127.0.0.6 (a
    // different client behind the same balancer) still gets in.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut ch = from(&ClientTransport::Tcp, "127.0.0.5", tcp_front).unwrap();
        binding(&mut ch, Duration::from_secs(3)).unwrap();
        held.push(ch);
    }
    let mut third = from(&ClientTransport::Tcp, "127.0.0.5", tcp_front).unwrap();
    assert!(
        binding(&mut third, Duration::from_secs(2)).is_err(),
        "a third from one client"
    );
    let mut other = from(&ClientTransport::Tcp, "127.0.0.6", tcp_front).unwrap();
    binding(&mut other, Duration::from_secs(3)).expect("another client behind the balancer");
    assert_eq!(
        settled(
            h.metrics.unwrap(),
            "turnpike_connections_refused_total{limit=\"per_source\"}",
            1.0
        ),
        1.0
    );
    drop(c);
    h.shutdown();
}

#[test]
fn a_header_from_elsewhere_or_none_from_a_balancer_closes_the_connection() {
    let h = common::start(&[
        "--proxy-protocol-from",
        "127.0.0.1/32",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    // From 127.0.0.5, not a balancer: a v2 header claiming 203.0.113.9.
    let mut header = turn_core::proxy::V2_SIGNATURE.to_vec();
    header.extend_from_slice(&[
        0x21, 0x11, 0, 12, 203, 0, 113, 9, 127, 0, 0, 1, 0x9c, 0x40, 0x0d, 0x96,
    ]);
    for (listener, what) in [(h.listen[0], "tcp"), (h.tls_listen[0], "tls")] {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&"127.0.0.5:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        sock.connect(&listener.into()).unwrap();
        let mut s: TcpStream = sock.into();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        s.write_all(&header).unwrap();
        let mut buf = [0u8; 64];
        assert!(
            matches!(s.read(&mut buf), Ok(0) | Err(_)),
            "{what}: closed, unanswered"
        );
    }
    // From 127.0.0.1, a balancer, without a header: closed too.
    let mut ch = from(&ClientTransport::Tcp, "127.0.0.1", h.listen[0]).unwrap();
    assert!(binding(&mut ch, Duration::from_secs(2)).is_err());
    // Three refusals, by name.
    assert_eq!(
        settled(
            h.metrics.unwrap(),
            "turnpike_connections_refused_total{limit=\"proxy_protocol\"}",
            3.0
        ),
        3.0
    );
    // And clients not behind a balancer are served as before.
    let mut plain = from(&ClientTransport::Tcp, "127.0.0.5", h.listen[0]).unwrap();
    let me = plain.local_addr().unwrap();
    assert_eq!(binding(&mut plain, Duration::from_secs(3)).unwrap(), me);
    h.shutdown();
}
