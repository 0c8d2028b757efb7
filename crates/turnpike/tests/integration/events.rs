//! Session events against real receivers: an HTTP server in the test that
//! checks each request's signature, an events file, a real redis-server's
//! stream. Byte counts are compared with what the test's client and peer
//! really sent.

use crate::common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use turnpike_client::client::{ClientTransport, Received};

pub(crate) const SECRET: &str = "a-webhook-secret-of-32-bytes-xyz";

/// A webhook receiver: every event it was POSTed, in arrival order, after
/// checking the body's HMAC-SHA256 signature.
pub(crate) struct Receiver {
    pub(crate) addr: SocketAddr,
    events: Arc<Mutex<Vec<Value>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    pub(crate) fn start(at: Option<SocketAddr>) -> Receiver {
        let l = TcpListener::bind(at.unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())).unwrap();
        let addr = l.local_addr().unwrap();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let (ev, rq) = (events.clone(), requests.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let mut r = BufReader::new(s);
                let mut head = Vec::new();
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    head.push(line);
                }
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                let sig = head
                    .iter()
                    .find_map(|l| l.strip_prefix("X-Turnpike-Signature: sha256="))
                    .map(|s| s.trim().to_string())
                    .unwrap_or_default();
                let ok = sig == hmac_hex(SECRET.as_bytes(), &body);
                let mut s = r.into_inner();
                if !ok {
                    let _ = s.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n");
                    continue;
                }
                let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                ev.lock().unwrap().extend(batch);
                rq.lock().unwrap().push(head.concat());
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
            }
        });
        Receiver {
            addr,
            events,
            requests,
        }
    }

    pub(crate) fn of_type(&self, t: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == t)
            .cloned()
            .collect()
    }

    pub(crate) fn wait_for(&self, t: &str, n: usize, within: Duration) -> Vec<Value> {
        let end = Instant::now() + within;
        while self.of_type(t).len() < n && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.of_type(t)
    }
}

fn hmac_hex(key: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap();
    m.update(body);
    m.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub(crate) fn secret_file(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("turnpike-events-{tag}-{}", std::process::id()));
    std::fs::write(&p, format!("{SECRET}\n")).unwrap();
    p
}

/// One call: allocate over `t`, relay `n` datagrams of `size` each way
/// through a channel, delete. Returns (bytes to the peer, bytes back).
fn call(t: &ClientTransport, server: SocketAddr, n: usize, size: usize) -> (u64, u64) {
    let mut c = client(t, server, USER, PASSWORD);
    let alloc = c.allocate().unwrap();
    let peer = peer();
    let p = peer.local_addr().unwrap();
    c.channel_bind(0x4001, p).unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..n {
        let payload = vec![i as u8; size];
        c.send_channel(0x4001, &payload).unwrap();
        let (got, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(got, size);
        peer.send_to(&payload[..size / 2], alloc.relayed).unwrap();
        match c.recv(Duration::from_secs(3)).unwrap() {
            Received::Channel { data, .. } => assert_eq!(data.len(), size / 2),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(c.refresh(0).unwrap(), 0);
    ((n * size) as u64, (n * (size / 2)) as u64)
}

/// A server relaying to loopback peers, posting its events to `url`
/// signed with a secret file of its own (removed by the caller).
fn with_webhook(tag: &str, url: &str) -> (turnpike::runtime::Handle, std::path::PathBuf) {
    let secret = secret_file(tag);
    let h = start(&[
        "--allow-loopback-peers",
        "--events-webhook",
        url,
        "--events-webhook-secret-file",
        secret.to_str().unwrap(),
    ]);
    (h, secret)
}

#[test]
fn a_signed_webhook_gets_one_start_and_one_end_per_allocation_with_the_bytes() {
    let rx = Receiver::start(None);
    let (h, secret) = with_webhook("ok", &format!("http://{}/turn-events", rx.addr));
    let mut expected = Vec::new();
    for t in [ClientTransport::Udp, ClientTransport::Tcp] {
        let addr = h.listen[0];
        expected.push((format!("{t:?}").to_lowercase(), call(&t, addr, 20, 100)));
    }
    h.shutdown();
    let starts = rx.wait_for("allocation.start", 2, Duration::from_secs(10));
    let ends = rx.wait_for("allocation.end", 2, Duration::from_secs(10));
    assert_eq!(starts.len(), 2, "{starts:?}");
    assert_eq!(ends.len(), 2, "{ends:?}");
    for ((transport, (to_peer, from_peer)), (s, e)) in expected.iter().zip(starts.iter().zip(&ends)) {
        assert_eq!(&s["transport"], transport.as_str());
        assert_eq!(s["allocation"], e["allocation"], "one allocation: {s} / {e}");
        assert_eq!(s["user"], USER);
        assert_eq!(s["realm"], "test.example");
        assert_eq!(e["reason"], "deleted");
        assert_eq!(e["bytes_to_peers"].as_u64(), Some(*to_peer), "{e}");
        assert_eq!(e["bytes_from_peers"].as_u64(), Some(*from_peer), "{e}");
        assert_eq!(e["packets_to_peers"].as_u64(), Some(20));
        assert_eq!(e["packets_from_peers"].as_u64(), Some(20));
    }
    // Signed, with a delivery id the receiver can deduplicate by.
    assert!(rx
        .requests
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.contains("Idempotency-Key: ")));
    let _ = std::fs::remove_file(secret);
}

#[test]
fn events_queued_while_the_receiver_is_down_arrive_after_in_order_and_once() {
    // The receiver's port, reserved and let go: nothing listens there yet.
    let at: SocketAddr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (h, secret) = with_webhook("down", &format!("http://{at}/hook"));
    for _ in 0..5 {
        call(&ClientTransport::Udp, h.listen[0], 2, 50);
    }
    std::thread::sleep(Duration::from_secs(10));
    let rx = Receiver::start(Some(at));
    let ends = rx.wait_for("allocation.end", 5, Duration::from_secs(40));
    assert_eq!(
        ends.len(),
        5,
        "{:#?}",
        rx.events
            .lock()
            .unwrap()
            .iter()
            .map(|e| format!("{} {} {}", e["id"], e["type"], e["allocation"]))
            .collect::<Vec<_>>()
    );
    let all = rx.events.lock().unwrap().clone();
    let ids: Vec<u64> = all
        .iter()
        .map(|e| {
            e["id"]
                .as_str()
                .unwrap()
                .rsplit("-e")
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(ids, sorted, "in order, none twice");
    assert_eq!(rx.of_type("allocation.start").len(), 5);
    h.shutdown();
    let _ = std::fs::remove_file(secret);
}

#[test]
fn a_bad_webhook_secret_refuses_start_and_file_and_stream_sinks_hold_the_same_events() {
    // A short secret, a missing file, no file: refused, naming the option.
    let short = std::env::temp_dir().join(format!("turnpike-events-short-{}", std::process::id()));
    std::fs::write(&short, "short").unwrap();
    for (file, want) in [
        (Some(short.to_str().unwrap()), "at least 16"),
        (Some("/nonexistent/secret"), "cannot read"),
        (None, "needs events-webhook-secret-file"),
    ] {
        let mut argv = vec!["turnpike", "--events-webhook", "http://127.0.0.1:9/x"];
        if let Some(f) = file {
            argv.extend_from_slice(&["--events-webhook-secret-file", f]);
        }
        let o = turnpike::config::Options::from_argv(argv).unwrap();
        let e = turnpike::config::Settings::from_options(&o).expect_err("refused");
        let e = format!("{e:#}");
        assert!(e.contains("events-webhook") && e.contains(want), "{e}");
    }
    let _ = std::fs::remove_file(&short);

    // A file and a Redis stream at once, bounded to about 100 entries.
    let redis = redis_server();
    let file = std::env::temp_dir().join(format!("turnpike-events-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let redis_url = format!("redis://127.0.0.1:{}", redis.1);
    let h = start(&[
        "--allow-loopback-peers",
        "--rate-limit-per-ip",
        "0",
        "--events-file",
        file.to_str().unwrap(),
        "--redis-url",
        &redis_url,
        "--events-redis-stream",
        "turnpike:events",
        "--events-redis-maxlen",
        "100",
    ]);
    for _ in 0..200 {
        let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
        c.allocate().unwrap();
        c.refresh(0).unwrap();
    }
    h.shutdown();
    let lines: Vec<Value> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let allocations = |t: &str| lines.iter().filter(|e| e["type"] == t).count();
    assert_eq!(
        (allocations("allocation.start"), allocations("allocation.end")),
        (200, 200)
    );
    let mut r = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let len: usize = redis::cmd("XLEN").arg("turnpike:events").query(&mut r).unwrap();
    // MAXLEN ~ trims whole nodes of 100 entries: at most about twice the bound.
    assert!(
        (100..=200).contains(&len),
        "stream length {len} for 400 events, MAXLEN ~ 100"
    );
    let newest: redis::Value = redis::cmd("XREVRANGE")
        .arg("turnpike:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query(&mut r)
        .unwrap();
    // [[id, ["event", JSON]]]
    let json = match newest {
        redis::Value::Array(entries) => match entries.into_iter().next() {
            Some(redis::Value::Array(entry)) => match entry.into_iter().nth(1) {
                Some(redis::Value::Array(fields)) => match fields.into_iter().nth(1) {
                    Some(redis::Value::BulkString(b)) => String::from_utf8(b).unwrap(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let last: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        &last,
        lines.last().unwrap(),
        "the stream's newest event is the file's last"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn the_readme_sample_receiver_verifies_and_counts_the_bytes() {
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
        && missing("events readme receiver", "no python3")
    {
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let code = readme
        .split("A receiver in Python:\n\n```python\n")
        .nth(1)
        .and_then(|r| r.split("\n```").next())
        .expect("README's sample receiver");
    let secret = secret_file("readme");
    let port = free_port();
    let code = code
        .replace("/etc/turnpike/events-secret", secret.to_str().unwrap())
        .replace("8080", &port.to_string());
    let script = std::env::temp_dir().join(format!("turnpike-events-receiver-{}.py", std::process::id()));
    std::fs::write(&script, code).unwrap();
    let mut receiver = Proc(
        std::process::Command::new("python3")
            .arg("-u")
            .arg(&script)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("http://127.0.0.1:{port}/");
    let h = start(&[
        "--allow-loopback-peers",
        "--events-webhook",
        &url,
        "--events-webhook-secret-file",
        secret.to_str().unwrap(),
    ]);
    // The receiver listens once Python has started.
    let end = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let (to, from) = call(&ClientTransport::Udp, h.listen[0], 10, 200);
    h.shutdown();
    let mut out = receiver.0.stdout.take().unwrap();
    let (tx, rx_line) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(&mut out).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx_line.recv_timeout(Duration::from_secs(15)).unwrap_or_default();
    assert_eq!(line.trim(), format!("{USER} {} bytes", to + from));
    drop(receiver);
    let _ = std::fs::remove_file(script);
    let _ = std::fs::remove_file(secret);
}

#[test]
fn an_rfc_6062_allocation_reports_its_data_connections_bytes() {
    let rx = Receiver::start(None);
    let (h, secret) = with_webhook("tcp", &format!("http://{}/hook", rx.addr));
    let server = h.listen[0];
    let peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = client(&ClientTransport::Tcp, server, USER, PASSWORD);
    c.set_tcp_relay(true);
    c.allocate().unwrap();
    let id = c.connect(peer.local_addr().unwrap()).unwrap();
    let (mut p, _) = peer.accept().unwrap();
    let mut data = c.connection_bind(&ClientTransport::Tcp, server, id).unwrap();
    let up = vec![7u8; 30_000];
    data.send(&up).unwrap();
    let mut got = vec![0u8; up.len()];
    p.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    p.read_exact(&mut got).unwrap();
    let down = vec![9u8; 12_345];
    p.write_all(&down).unwrap();
    let mut back = 0;
    let end = Instant::now() + Duration::from_secs(5);
    while back < down.len() && Instant::now() < end {
        if let Some(b) = data.recv_raw(end).unwrap() {
            back += b.len();
        }
    }
    assert_eq!(back, down.len());
    drop(data);
    drop(p);
    assert_eq!(c.refresh(0).unwrap(), 0);
    h.shutdown();
    let ends = rx.wait_for("allocation.end", 1, Duration::from_secs(10));
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0]["transport"], "tcp");
    assert_eq!(
        ends[0]["bytes_to_peers"].as_u64(),
        Some(up.len() as u64),
        "{}",
        ends[0]
    );
    assert_eq!(
        ends[0]["bytes_from_peers"].as_u64(),
        Some(down.len() as u64),
        "{}",
        ends[0]
    );
    let _ = std::fs::remove_file(secret);
}

/// The `allocation.end` records an events file holds.
fn ends_in(file: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["type"] == "allocation.end")
        .collect()
}

/// A server that stops with calls up reports each one's end with its
/// usage (reason `shutdown`) before it exits: a restart loses no usage.
#[test]
fn allocations_live_at_shutdown_end_with_their_usage() {
    let file = std::env::temp_dir().join(format!("turnpike-events-stop-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let h = start(&["--allow-loopback-peers", "--events-file", file.to_str().unwrap()]);
    let peer = peer();
    let p = peer.local_addr().unwrap();
    let mut calls = Vec::new();
    for t in [ClientTransport::Udp, ClientTransport::Tcp] {
        let mut c = client(&t, h.listen[0], USER, PASSWORD);
        c.allocate().unwrap();
        c.create_permission(&[p]).unwrap();
        for _ in 0..10 {
            c.send_indication(p, &[9u8; 120]).unwrap();
            let mut buf = [0u8; 256];
            assert_eq!(peer.recv_from(&mut buf).unwrap().0, 120);
        }
        calls.push(c);
    }
    h.shutdown();
    let ends = ends_in(&file);
    assert_eq!(ends.len(), 2, "{ends:#?}");
    for e in &ends {
        assert_eq!(e["reason"], "shutdown", "{e}");
        assert_eq!(e["bytes_to_peers"].as_u64(), Some(1200), "{e}");
        assert_eq!(e["packets_to_peers"].as_u64(), Some(10), "{e}");
    }
    drop(calls);
    let _ = std::fs::remove_file(&file);
}

/// SIGTERM drains to stop; a call still up when `--drain-timeout` runs
/// out ends with reason `drain` (not `shutdown`) and its usage, written
/// before the process exits.
#[test]
fn a_call_cut_by_the_end_of_a_drain_ends_with_reason_drain() {
    let file = std::env::temp_dir().join(format!("turnpike-events-drain-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let (mut proc, line, _log) = serve_binary(&[
        "--allow-loopback-peers",
        "--drain-timeout",
        "2",
        "--events-file",
        file.to_str().unwrap(),
    ]);
    let listen = started_addr(&line, "listen");
    let peer = peer();
    let p = peer.local_addr().unwrap();
    let mut c = client(&ClientTransport::Udp, listen, USER, PASSWORD);
    c.allocate().unwrap();
    c.create_permission(&[p]).unwrap();
    for _ in 0..10 {
        c.send_indication(p, &[7u8; 100]).unwrap();
        let mut buf = [0u8; 256];
        assert_eq!(peer.recv_from(&mut buf).unwrap().0, 100);
    }
    let started = Instant::now();
    // SAFETY: kill(2) on this test's own child.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(proc.0.id() as i32, libc::SIGTERM);
    }
    let status = loop {
        if let Some(s) = proc.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no exit after the drain"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the call held the drain open"
    );
    let ends = ends_in(&file);
    assert_eq!(ends.len(), 1, "{ends:#?}");
    assert_eq!(ends[0]["reason"], "drain", "{}", ends[0]);
    assert_eq!(ends[0]["bytes_to_peers"].as_u64(), Some(1000), "{}", ends[0]);
    let _ = std::fs::remove_file(&file);
}

/// `--max-allocation-bytes`: an allocation that relayed its bytes (UDP,
/// and RFC 6062 counting its data connections) is ended within about a
/// second, its usage record saying `quota`; one below the cap relays on.
#[test]
fn an_allocation_that_relays_its_byte_quota_is_ended_with_reason_quota() {
    let file = std::env::temp_dir().join(format!("turnpike-events-quota-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&file);
    let h = start(&[
        "--allow-loopback-peers",
        "--metrics-listen",
        "127.0.0.1:0",
        "--max-allocation-bytes",
        "20000",
        "--events-file",
        file.to_str().unwrap(),
    ]);
    let server = h.listen[0];
    let peer = peer();
    let p = peer.local_addr().unwrap();
    // The cap is crossed by the last datagram only, so a check between
    // two of them cannot end the call before all were relayed.
    let udp_call = |sizes: &[usize]| {
        let mut c = client(&ClientTransport::Udp, server, USER, PASSWORD);
        c.allocate().unwrap();
        c.create_permission(&[p]).unwrap();
        for &size in sizes {
            c.send_indication(p, &vec![5u8; size]).unwrap();
            let mut buf = [0u8; 8192];
            assert_eq!(peer.recv_from(&mut buf).unwrap().0, size);
        }
        c
    };
    let mut below = udp_call(&[100; 100]);
    let mut over = udp_call(&[[100; 199].as_slice(), &[5_100]].concat());

    let tcp_peer = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut rfc6062 = client(&ClientTransport::Tcp, server, USER, PASSWORD);
    rfc6062.set_tcp_relay(true);
    rfc6062.allocate().unwrap();
    let id = rfc6062.connect(tcp_peer.local_addr().unwrap()).unwrap();
    let (mut at_peer, _) = tcp_peer.accept().unwrap();
    let mut data = rfc6062
        .connection_bind(&ClientTransport::Tcp, server, id)
        .unwrap();
    // The check may come while these are relayed: the record must then
    // count what reached the peer.
    data.send(&[7u8; 30_000]).unwrap();
    at_peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut at_peer_got = 0u64;
    let mut chunk = [0u8; 4096];
    while at_peer_got < 30_000 {
        match at_peer.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => at_peer_got += n as u64,
        }
    }
    assert!(at_peer_got >= 20_000, "{at_peer_got} bytes reached the peer");

    let ended = |c: &mut turnpike_client::client::TurnClient| {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match c.refresh(600) {
                Err(turnpike_client::client::ClientError::Error { code: 437, .. }) => return true,
                Ok(_) if Instant::now() < end => std::thread::sleep(Duration::from_millis(200)),
                other => {
                    eprintln!("still allocated: {other:?}");
                    return false;
                }
            }
        }
    };
    assert!(ended(&mut over), "the UDP allocation over its quota must end");
    assert!(
        ended(&mut rfc6062),
        "the RFC 6062 allocation over its quota must end"
    );
    // Its peer connection went with it.
    let mut rest = [0u8; 16];
    assert_eq!(
        at_peer.read(&mut rest).unwrap_or(0),
        0,
        "the peer connection is closed"
    );
    assert_eq!(below.refresh(600).unwrap(), 600, "below the cap it lives on");
    below.send_indication(p, &[5u8; 100]).unwrap();
    let mut buf = [0u8; 256];
    assert_eq!(peer.recv_from(&mut buf).unwrap().0, 100);
    // The metric by reason says so (published once a second).
    let metrics = h.metrics.unwrap();
    let line = "turnpike_allocations_ended_total{reason=\"quota\"} 2";
    let end = Instant::now() + Duration::from_secs(5);
    let mut body = String::new();
    while Instant::now() < end {
        body = http_request(metrics, "GET", "/metrics", None).unwrap().1;
        if body.lines().any(|l| l == line) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(body.lines().any(|l| l == line), "{body}");

    h.shutdown();
    let ends = ends_in(&file);
    let quota: Vec<&Value> = ends.iter().filter(|e| e["reason"] == "quota").collect();
    assert_eq!(quota.len(), 2, "{ends:#?}");
    let by = |t: &str| quota.iter().find(|e| e["transport"] == t).unwrap();
    assert_eq!(
        by("udp")["bytes_to_peers"].as_u64(),
        Some(25_000),
        "{}",
        by("udp")
    );
    assert_eq!(
        by("tcp")["bytes_to_peers"].as_u64(),
        Some(at_peer_got),
        "{}",
        by("tcp")
    );
    let rest: Vec<&Value> = ends.iter().filter(|e| e["reason"] != "quota").collect();
    assert_eq!(rest.len(), 1, "{ends:#?}");
    assert_eq!(rest[0]["reason"], "shutdown");
    assert_eq!(rest[0]["bytes_to_peers"].as_u64(), Some(10_100));
    drop(data);
    let _ = std::fs::remove_file(&file);
}
