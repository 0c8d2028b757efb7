//! Prometheus metrics: scrape, make real traffic, scrape again until the
//! counters moved (workers publish once a second; this is a bounded poll,
//! not a timing assertion). Labels never carry users or addresses.

use crate::common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use turnpike_client::client::{binding, Channel, ClientTransport};

fn scrape(addr: SocketAddr) -> (String, HashMap<String, f64>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: metrics\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    let map = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            l.rsplit_once(' ')
                .map(|(k, v)| (k.to_owned(), v.parse().unwrap_or(f64::NAN)))
        })
        .collect();
    (body, map)
}

#[test]
fn counters_move_with_real_traffic() {
    let h = start(&["--metrics-listen", "127.0.0.1:0", "--allow-loopback-peers"]);
    let m = h.metrics.expect("metrics enabled");
    let (_, before) = scrape(m);
    let get = |map: &HashMap<String, f64>, k: &str| map.get(k).copied().unwrap_or(0.0);

    // A relayed call, a Binding, a 401 and a TLS handshake.
    let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    c.allocate().unwrap();
    let peer = peer();
    c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
    let mut buf = [0u8; 256];
    for _ in 0..10 {
        c.send_channel(0x4000, &[1u8; 100]).unwrap();
        let (_, relayed) = peer.recv_from(&mut buf).unwrap();
        peer.send_to(&[2u8; 50], relayed).unwrap();
        c.recv(Duration::from_secs(2)).unwrap();
    }
    let mut ch = Channel::connect(&ClientTransport::Udp, h.listen[0], Duration::from_secs(2)).unwrap();
    binding(&mut ch, Duration::from_secs(2)).unwrap();
    let _ = client(&ClientTransport::Udp, h.listen[0], USER, "wrong").allocate();
    let mut tls = Channel::connect(
        &ClientTransport::Tls {
            pinned: h.tls_leaf.clone(),
        },
        h.tls_listen[0],
        Duration::from_secs(3),
    )
    .unwrap();
    binding(&mut tls, Duration::from_secs(2)).unwrap();

    let deadline = Instant::now() + Duration::from_secs(10);
    let (body, after) = loop {
        let (body, after) = scrape(m);
        let moved = get(&after, "turnpike_relayed_packets_total{direction=\"to_peer\"}")
            >= get(&before, "turnpike_relayed_packets_total{direction=\"to_peer\"}") + 10.0
            && get(&after, "turnpike_tls_handshakes_total{outcome=\"ok\"}") >= 1.0;
        if moved || Instant::now() > deadline {
            break (body, after);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let delta = |k: &str| get(&after, k) - get(&before, k);
    assert_eq!(
        delta("turnpike_relayed_packets_total{direction=\"to_peer\"}"),
        10.0,
        "{body}"
    );
    assert_eq!(
        delta("turnpike_relayed_packets_total{direction=\"from_peer\"}"),
        10.0,
        "{body}"
    );
    assert_eq!(
        delta("turnpike_relayed_bytes_total{direction=\"to_peer\"}"),
        1000.0,
        "{body}"
    );
    assert_eq!(
        delta("turnpike_relayed_bytes_total{direction=\"from_peer\"}"),
        500.0,
        "{body}"
    );
    assert_eq!(
        delta("turnpike_allocations_created_total{transport=\"udp\"}"),
        1.0,
        "{body}"
    );
    assert_eq!(
        get(&after, "turnpike_allocations{transport=\"udp\"}"),
        1.0,
        "{body}"
    );
    assert!(get(&after, "turnpike_channels") >= 1.0, "{body}");
    assert!(delta("turnpike_binding_requests_total") >= 2.0, "{body}");
    assert!(
        delta("turnpike_error_responses_total{code=\"401\"}") >= 2.0,
        "challenges and the bad password: {body}"
    );
    assert_eq!(
        delta("turnpike_auth_rejected_total{reason=\"bad_credentials\"}"),
        1.0,
        "{body}"
    );
    assert!(
        get(&after, "turnpike_tls_handshakes_total{outcome=\"ok\"}") >= 1.0,
        "{body}"
    );
    assert_eq!(get(&after, "turnpike_workers"), 2.0);
    assert!(
        get(&after, "turnpike_tls_certificate_not_after_seconds") > 1.7e9,
        "the certificate's expiry is exported: {body}"
    );
    assert_eq!(get(&after, "turnpike_drain_refused_total"), 0.0, "{body}");
    // The UDP data plane's batching: every datagram received went through
    // recvmmsg, every one sent through the send queue, none dropped here.
    assert!(get(&after, "turnpike_recv_batch_size_mean") >= 1.0, "{body}");
    assert!(
        delta("turnpike_udp_sent_datagrams_total") >= 20.0,
        "10 relayed each way plus responses: {body}"
    );
    assert!(delta("turnpike_udp_send_syscalls_total") >= 1.0, "{body}");
    assert!(
        delta("turnpike_udp_send_syscalls_total") <= delta("turnpike_udp_sent_datagrams_total"),
        "{body}"
    );
    assert_eq!(delta("turnpike_udp_send_dropped_total"), 0.0, "{body}");
    assert_eq!(get(&after, "turnpike_udp_gso"), 1.0, "on by default: {body}");
    assert!(
        !body.contains(USER) && !body.contains("127.0.0.1"),
        "no users or addresses in labels"
    );
    h.shutdown();
}

/// `--metrics-per-user 5` with 50,000 distinct REST usernames allocating:
/// never more than 6 series per family, and the server's RSS flat.
#[test]
fn per_user_series_stay_bounded_with_fifty_thousand_rest_users() {
    let mut cmd = std::process::Command::new(turnpike_bin());
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-tls",
        "--metrics-listen",
        "127.0.0.1:0",
        "--auth-secret",
        "per-user-secret",
        "--realm",
        "test.example",
        "--rate-limit-per-ip",
        "0",
        "--auth-fail-limit",
        "0",
        "--metrics-per-user",
        "5",
        "--threads",
        "2",
        "--log-level",
        "info",
    ]);
    let (server, started, _rest) = spawn_server(&mut cmd);
    let addr = listen_addr(&started);
    let metrics: std::net::SocketAddr = started
        .split(" metrics=")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|a| a.parse().ok())
        .expect("metrics= in the start-up line");
    let expiry = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let series = |family: &str| -> Vec<String> {
        let (_, text) = http_request(metrics, "GET", "/metrics", None).unwrap();
        text.lines()
            .filter(|l| l.starts_with(&format!("turnpike_{family}{{")))
            .map(str::to_owned)
            .collect()
    };
    // A few users hold allocations throughout (the named ones); 50,000
    // others come and go, each a REST username of its own.
    let mut held = Vec::new();
    for i in 0..3 {
        let user = format!("{expiry}:holder{i}");
        let pw = turn_core::auth::rest_password(b"per-user-secret", &user);
        let mut c = client(&ClientTransport::Udp, addr, &user, &pw);
        c.allocate().unwrap();
        held.push(c);
    }
    let mut rss = Vec::new();
    let mut most = 0;
    // Ten clients at a time (a socket each), each allocating and deleting.
    for round in 0..5_000u32 {
        let mut live = Vec::new();
        for j in 0..10u32 {
            let user = format!("{expiry}:visitor{}", round * 10 + j);
            let pw = turn_core::auth::rest_password(b"per-user-secret", &user);
            let mut c = client(&ClientTransport::Udp, addr, &user, &pw);
            c.allocate().unwrap();
            live.push(c);
        }
        if round % 500 == 0 {
            std::thread::sleep(Duration::from_millis(1100));
            let a = series("user_allocations");
            most = most.max(a.len());
            assert!(a.len() <= 6, "{a:?}");
            assert!(series("user_relayed_bytes").len() <= 6);
            rss.push(rss_kib(server.0.id()));
        }
        for mut c in live {
            c.refresh(0).unwrap();
        }
    }
    assert_eq!(most, 6, "five named users and user=\"other\"");
    // A REST username counts as its ID: the holders appear by name.
    let a = series("user_allocations");
    assert!(a.iter().any(|l| l.contains("user=\"holder0\"")), "{a:?}");
    let (first, last) = (rss[1], *rss.last().unwrap());
    eprintln!("per-user metrics: RSS {rss:?} KiB over 50,000 REST usernames");
    assert!(last <= first + 1024, "RSS grew from {first} to {last} KiB");
}
