//! TURN over DTLS (RFC 7350) against the real server: OpenSSL's DTLS 1.2
//! client, Debian's coturn `turnutils_uclient -S`, a flood of ClientHellos
//! from 10,000 source addresses, the half-open cap, and certificates DTLS
//! cannot use. What the other transports do over DTLS too is in
//! `runtime.rs` and `dualstack.rs` (`common::transports` includes DTLS).

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A DTLS 1.2 client engine driven by hand, for what no complete client
/// does: stop after the cookie round trip, or send only a first hello.
struct RawClient {
    dtls: dimpl::Dtls,
    sock: UdpSocket,
}

impl RawClient {
    fn new(sock: UdpSocket, server: SocketAddr) -> RawClient {
        sock.connect(server).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert = dimpl::DtlsCertificate {
            certificate: cert.der().to_vec(),
            private_key: key.serialize_der(),
        };
        let mut dtls = dimpl::Dtls::new_12(Arc::new(dimpl::Config::default()), cert, Instant::now());
        dtls.set_active(true);
        dtls.handle_timeout(Instant::now()).unwrap();
        RawClient { dtls, sock }
    }

    /// The datagrams the engine wants sent now.
    fn outgoing(&mut self) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        let mut v = Vec::new();
        loop {
            match self.dtls.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => v.push(p.to_vec()),
                dimpl::Output::Timeout(_) => return v,
                _ => {}
            }
        }
    }

    /// Sends the first hello, takes the HelloVerifyRequest, sends the hello
    /// with the cookie, and returns what the server answered to it (empty
    /// when nothing came within the timeout).
    fn through_cookie(&mut self) -> Vec<u8> {
        for d in self.outgoing() {
            self.sock.send(&d).unwrap();
        }
        let mut buf = [0u8; 4096];
        let n = self.sock.recv(&mut buf).expect("a HelloVerifyRequest");
        self.dtls.handle_packet(&buf[..n]).unwrap();
        for d in self.outgoing() {
            self.sock.send(&d).unwrap();
        }
        self.sock
            .set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        match self.sock.recv(&mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(_) => Vec::new(),
        }
    }
}

/// `turnpike serve` with metrics: (process, DTLS address, metrics address).
fn serve(extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let mut args = vec!["--metrics-listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let (p, started, _rest) = serve_binary(&args);
    (
        p,
        started_addr(&started, "dtls_listen"),
        started_addr(&started, "metrics"),
    )
}

fn metric(metrics: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_request(metrics, "GET", "/metrics", None).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{series} in /metrics"))
}

/// `series` once it satisfies `want` (workers publish their numbers once
/// a second), or its value after 5 s.
fn metric_when(metrics: SocketAddr, series: &str, want: impl Fn(f64) -> bool) -> f64 {
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(metrics, series);
        if want(v) || Instant::now() >= end {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn openssl_s_client_gets_a_binding_response_over_dtls_1_2() {
    if !std::path::Path::new("/usr/bin/openssl").exists() && missing("dtls openssl", "no /usr/bin/openssl") {
        return;
    }
    let h = start(&[]);
    let mut child = Command::new("timeout")
        .args([
            "20",
            "openssl",
            "s_client",
            "-dtls1_2",
            "-quiet",
            "-nocommands",
            "-connect",
        ])
        .arg(h.dtls_listen[0].to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.len() >= 20 && got.len() >= 20 + u16::from_be_bytes([got[2], got[3]]) as usize {
                break;
            }
        }
        let _ = tx.send(got);
    });
    // s_client sends what it reads from stdin once the handshake is done:
    // wait for it, then send a Binding request.
    std::thread::sleep(Duration::from_millis(1500));
    let txid = [0x5a; 12];
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&txid);
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&req).unwrap();
    stdin.flush().unwrap();
    let got = rx.recv_timeout(Duration::from_secs(10)).unwrap_or_default();
    let _ = child.kill();
    let _ = child.wait();
    assert!(got.len() >= 20, "a STUN response over DTLS: {got:02x?}");
    assert_eq!(&got[..2], &[0x01, 0x01], "Binding success: {got:02x?}");
    assert_eq!(&got[8..20], &txid, "same transaction");
    h.shutdown();
}

/// One uclient run: its output, and the summary (sent, received, lost)
/// when it printed one.
fn uclient(flags: &[&str], port: u16, peer_port: u16) -> (String, Option<(u64, u64, u64)>) {
    let out = Command::new("timeout")
        .arg("60")
        .arg("/usr/bin/turnutils_uclient")
        .arg("-S")
        .args(flags)
        .args(["-u", USER, "-w", PASSWORD, "-e", "127.0.0.1", "-r"])
        .arg(peer_port.to_string())
        .args(["-n", "20", "-m", "1", "-l", "171", "-p"])
        .arg(port.to_string())
        .arg("127.0.0.1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut sent_recv = None;
    let mut lost = None;
    for line in text.lines() {
        if let Some(rest) = line.split("start_mclient: tot_send_msgs=").nth(1) {
            if let Some((s, r)) = rest.split_once(", tot_recv_msgs=") {
                if let (Ok(s), Ok(r)) = (s.trim().parse(), r.trim().parse()) {
                    sent_recv = Some((s, r));
                }
            }
        }
        if let Some(rest) = line.split("Total lost packets ").nth(1) {
            lost = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    let summary = match (sent_recv, lost) {
        (Some((s, r)), Some(l)) => Some((s, r, l)),
        _ => None,
    };
    (text, summary)
}

#[test]
fn coturns_uclient_relays_over_dtls_1_2_and_its_dtls_1_0_sessions_are_refused_by_name() {
    if !std::path::Path::new("/usr/bin/turnutils_uclient").exists()
        && missing("dtls uclient", "no turnutils_uclient (apt-get install coturn)")
    {
        return;
    }
    let (_server, dtls, metrics) = serve(&["--allow-loopback-peers", "--rfc5766-channel-numbers"]);
    let peer_port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _peer = Proc(
        Command::new("/usr/bin/turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    // Debian's coturn 4.6.1 uclient makes a DTLS 1.0 and a DTLS 1.2
    // context and picks one at random per connection; a 1.0 session gets
    // the protocol_version alert (RFC 8996) and uclient gives up that run.
    // A run whose sessions all picked 1.2 must relay every packet.
    for mode in [&[][..], &["-s"][..], &["-y"][..]] {
        let mut relayed = false;
        for _ in 0..40 {
            let (text, summary) = uclient(mode, dtls.port(), peer_port);
            match summary {
                Some((sent, recv, lost)) => {
                    assert!(sent > 0 && sent == recv && lost == 0, "{mode:?}: {text}");
                    relayed = true;
                    break;
                }
                None => assert!(
                    text.contains("alert protocol version"),
                    "{mode:?}: a failed run is a refused DTLS 1.0 session, nothing else:\n{text}"
                ),
            }
        }
        assert!(relayed, "{mode:?}: no run of uclient relayed over DTLS 1.2");
    }
    assert!(
        metric_when(metrics, "turnpike_dtls_handshakes_total{outcome=\"ok\"}", |v| v
            >= 4.0)
            >= 4.0
    );
    assert_eq!(
        metric(metrics, "turnpike_dtls_handshakes_total{outcome=\"failed\"}"),
        0.0
    );
}

#[test]
fn ten_thousand_spoofed_hellos_get_small_cookies_and_leave_no_state() {
    let (server, dtls, metrics) = serve(&[]);
    let pid = server.0.id();
    // A real DTLS 1.2 first ClientHello, as a client sends it.
    let hello = RawClient::new(UdpSocket::bind("127.0.0.1:0").unwrap(), dtls)
        .outgoing()
        .remove(0);
    let mut rss_after_first = 0;
    let mut answered = 0;
    let mut largest = 0;
    // 10,000 source addresses in 127.1.0.0/16 (the loopback's /8 is ours
    // to bind): each sends one hello, as a spoofed source would, in
    // batches of 1,000 sockets.
    for batch in 0..10u32 {
        let socks: Vec<UdpSocket> = (0..1000u32)
            .map(|i| {
                let n = batch * 1000 + i;
                let ip = format!("127.1.{}.{}", n / 250, 1 + n % 250);
                let s = UdpSocket::bind(format!("{ip}:0")).unwrap();
                s.send_to(&hello, dtls).unwrap();
                s
            })
            .collect();
        for s in &socks {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2048];
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                answered += 1;
                largest = largest.max(n);
                // A HelloVerifyRequest: handshake record, hello_verify_request.
                assert_eq!((buf[0], buf[13]), (22, 3), "{:02x?}", &buf[..n]);
            }
        }
        if batch == 0 {
            rss_after_first = rss_kib(pid);
        }
    }
    let rss_after_all = rss_kib(pid);
    eprintln!(
        "DTLS hello flood: {answered} of 10000 answered, largest answer {largest} B for a {} B hello; RSS {rss_after_first} KiB after 1,000, {rss_after_all} KiB after 10,000",
        hello.len()
    );
    assert!(answered >= 9_900, "answered {answered}");
    assert!(
        largest <= 3 * hello.len(),
        "an answer of {largest} B to {} B",
        hello.len()
    );
    assert!(
        rss_after_all <= rss_after_first + 4096,
        "RSS grew from {rss_after_first} to {rss_after_all} KiB"
    );
    assert_eq!(
        metric(metrics, "turnpike_dtls_associations{state=\"handshake\"}"),
        0.0
    );
    assert_eq!(
        metric(metrics, "turnpike_dtls_associations{state=\"established\"}"),
        0.0
    );
    let sent = "turnpike_dtls_cookies_total{outcome=\"sent\"}";
    assert!(metric_when(metrics, sent, |v| v >= 9_900.0) >= 9_900.0);
}

#[test]
fn half_open_handshakes_from_one_source_are_capped_and_time_out() {
    let (_server, dtls, metrics) = serve(&["--handshake-timeout", "6s"]);
    // 20 clients on 127.0.0.1 that stop after the cookie round trip: the
    // per-source cap (16) lets 16 handshakes start and refuses the rest.
    let mut clients: Vec<RawClient> = (0..20)
        .map(|_| RawClient::new(UdpSocket::bind("127.0.0.1:0").unwrap(), dtls))
        .collect();
    let mut started = 0;
    for c in &mut clients {
        if !c.through_cookie().is_empty() {
            started += 1;
        }
    }
    assert_eq!(started, 16, "handshakes started from one source");
    let half_open = "turnpike_dtls_associations{state=\"handshake\"}";
    assert_eq!(metric_when(metrics, half_open, |v| v == 16.0), 16.0);
    let refused = "turnpike_dtls_handshakes_total{outcome=\"refused\"}";
    assert_eq!(metric_when(metrics, refused, |v| v == 4.0), 4.0);
    // Another source is not held up by this one.
    let other = UdpSocket::bind("127.0.0.2:0").unwrap();
    assert!(!RawClient::new(other, dtls).through_cookie().is_empty());
    // After the handshake timeout every slot is free again.
    let end = Instant::now() + Duration::from_secs(15);
    while metric(metrics, half_open) > 0.0 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(metric(metrics, half_open), 0.0);
    let failed = "turnpike_dtls_handshakes_total{outcome=\"failed\"}";
    assert_eq!(metric_when(metrics, failed, |v| v == 17.0), 17.0);
}

#[test]
fn a_certificate_dtls_cannot_use_is_refused_when_asked_for_and_leaves_dtls_off_otherwise() {
    if !std::path::Path::new("/usr/bin/openssl").exists() && missing("dtls rsa", "no /usr/bin/openssl") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("turnpike-dtls-rsa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "openssl made an RSA certificate");
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let argv = |extra: &[&str]| {
        let mut v = vec!["--cert", cert, "--key", key];
        v.extend_from_slice(extra);
        settings(&v).unwrap()
    };
    let refused = match turnpike::runtime::start(&argv(&["--dtls-listen", "127.0.0.1:0"])) {
        Ok(_) => panic!("an RSA certificate with dtls-listen must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        refused.contains("dtls-listen") && refused.contains("RSA") && refused.contains("ECDSA"),
        "{refused}"
    );
    // By default TLS serves with it and DTLS is off.
    let h = turnpike::runtime::start(&argv(&[])).unwrap();
    assert!(h.dtls_listen.is_empty());
    assert_eq!(h.tls_listen.len(), 1);
    h.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dtls_listens_on_ipv6_and_no_dtls_turns_it_off() {
    let h = start(&["--no-dtls"]);
    assert!(h.dtls_listen.is_empty());
    h.shutdown();
    if UdpSocket::bind("[::1]:0").is_err() {
        common::missing("dtls ipv6", "no IPv6 loopback here");
        return;
    }
    let h = start(&["--dtls-listen", "[::1]:0", "--allow-loopback-peers"]);
    let t = turnpike_client::client::ClientTransport::Dtls {
        pinned: h.tls_leaf.clone(),
    };
    let mut c = client(&t, h.dtls_listen[0], USER, PASSWORD);
    c.allocate().unwrap();
    assert_eq!(c.refresh(0).unwrap(), 0);
    h.shutdown();
}
