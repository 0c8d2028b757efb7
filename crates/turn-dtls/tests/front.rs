//! The front end against dimpl's own client, in memory: the cookie round
//! trip, STUN bytes both ways, the caps, and what an unknown source gets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SERVER: &str = "198.51.100.1:5349";

use turn_dtls::{hello, DtlsCertificate, Front, Identity, Limits, Output, Shared};

fn certificate() -> DtlsCertificate {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    DtlsCertificate {
        certificate: cert.der().to_vec(),
        private_key: key.serialize_der(),
    }
}

fn front(limits: Limits, shared: Arc<Shared>) -> Front {
    let c = certificate();
    let identity = Identity::new(c.certificate, c.private_key).unwrap();
    Front::new(identity, [7; 32], Instant::now(), limits, shared)
}

struct Client {
    dtls: dimpl::Dtls,
    addr: SocketAddr,
    received: Vec<Vec<u8>>,
    connected: bool,
}

impl Client {
    fn new(addr: &str, now: Instant) -> Client {
        let config = Arc::new(dimpl::Config::default());
        let mut dtls = dimpl::Dtls::new_12(config, certificate(), now);
        dtls.set_active(true);
        dtls.handle_timeout(now).unwrap();
        Client {
            dtls,
            addr: addr.parse().unwrap(),
            received: Vec::new(),
            connected: false,
        }
    }

    /// What the client wants to send now.
    fn outgoing(&mut self) -> Vec<Vec<u8>> {
        let mut buf = vec![0u8; 4096];
        let mut v = Vec::new();
        loop {
            match self.dtls.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => v.push(p.to_vec()),
                dimpl::Output::Connected => self.connected = true,
                dimpl::Output::ApplicationData(d) => self.received.push(d.to_vec()),
                dimpl::Output::Timeout(_) => return v,
                _ => {}
            }
        }
    }
}

/// Runs datagrams both ways until neither side has anything to say;
/// returns every datagram the front sent to the client, in order.
fn pump(front: &mut Front, c: &mut Client, now: Instant) -> Vec<Vec<u8>> {
    let mut sent = Vec::new();
    for _ in 0..20 {
        let out_c = c.outgoing();
        if out_c.is_empty() {
            break;
        }
        for d in out_c {
            let mut out = Output::default();
            front.handle(now, c.addr, SERVER.parse().unwrap(), &d, &mut out);
            for (to, r) in &out.datagrams {
                assert_eq!(to.client, c.addr);
                sent.push(out.bytes[r.clone()].to_vec());
                c.dtls.handle_packet(&out.bytes[r.clone()]).unwrap();
            }
            for (from, r) in &out.received {
                // The "core" echoes each message back.
                let msg = out.bytes[r.clone()].to_vec();
                let mut back = Output::default();
                assert!(front.send(now, from.client, &msg, &mut back));
                for (_, r) in &back.datagrams {
                    c.dtls.handle_packet(&back.bytes[r.clone()]).unwrap();
                }
            }
        }
    }
    sent
}

/// The first hello to `f`, its HelloVerifyRequest to the client: the
/// client's second hello (with the cookie), not yet sent.
fn second_hello(f: &mut Front, c: &mut Client, now: Instant) -> Vec<u8> {
    let first = c.outgoing().remove(0);
    let mut out = Output::default();
    f.handle(now, c.addr, SERVER.parse().unwrap(), &first, &mut out);
    c.dtls
        .handle_packet(&out.bytes[out.datagrams[0].1.clone()])
        .unwrap();
    c.outgoing().remove(0)
}

#[test]
fn a_handshake_after_the_cookie_round_trip_carries_messages_both_ways() {
    let now = Instant::now();
    let shared = Arc::new(Shared::default());
    let mut f = front(Limits::default(), shared.clone());
    let mut c = Client::new("192.0.2.1:5000", now);
    let sent = pump(&mut f, &mut c, now);
    assert!(c.connected, "handshake finished");
    assert!(
        hello::hello_verify_cookie(&sent[0]).is_some(),
        "first answer is a HelloVerifyRequest"
    );
    assert!(f.is_established(c.addr));
    assert_eq!((shared.half_open(), shared.associations()), (0, 1));
    c.dtls.send_application_data(b"\x00\x01\x00\x00binding").unwrap();
    pump(&mut f, &mut c, now);
    assert_eq!(c.received, vec![b"\x00\x01\x00\x00binding".to_vec()]);
    let n = f.counters();
    assert_eq!((n.cookies_sent, n.established, n.failed), (1, 1, 0));
}

#[test]
fn an_unknown_source_gets_a_small_answer_to_a_hello_and_nothing_else() {
    let now = Instant::now();
    let shared = Arc::new(Shared::default());
    let mut f = front(Limits::default(), shared.clone());
    let mut c = Client::new("192.0.2.1:5000", now);
    let first = c.outgoing().remove(0);
    for i in 0..1000u32 {
        let from: SocketAddr = format!(
            "10.{}.{}.{}:{}",
            i >> 16 & 255,
            i >> 8 & 255,
            i & 255,
            1024 + i % 60000
        )
        .parse()
        .unwrap();
        let mut out = Output::default();
        f.handle(now, from, SERVER.parse().unwrap(), &first, &mut out);
        assert_eq!(out.datagrams.len(), 1);
        let answer = &out.bytes[out.datagrams[0].1.clone()];
        assert!(answer.len() <= first.len(), "{} > {}", answer.len(), first.len());
        // Not a hello: dropped without an answer.
        let mut out = Output::default();
        f.handle(
            now,
            from,
            SERVER.parse().unwrap(),
            &[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0],
            &mut out,
        );
        assert!(out.datagrams.is_empty());
    }
    assert!(f.is_empty(), "no state kept for any of them");
    assert_eq!(shared.associations(), 0);
}

#[test]
fn a_cookie_from_another_address_or_a_forged_one_starts_nothing() {
    let now = Instant::now();
    let shared = Arc::new(Shared::default());
    let mut f = front(Limits::default(), shared.clone());
    let mut c = Client::new("192.0.2.1:5000", now);
    let second = second_hello(&mut f, &mut c, now);
    // The same hello with its cookie, from elsewhere: a fresh cookie only.
    let mut out = Output::default();
    f.handle(
        now,
        "192.0.2.2:5000".parse().unwrap(),
        SERVER.parse().unwrap(),
        &second,
        &mut out,
    );
    assert!(hello::hello_verify_cookie(&out.bytes[out.datagrams[0].1.clone()]).is_some());
    // A flipped cookie byte from the right address: the same.
    let ch = hello::client_hello(&second).unwrap();
    let mut forged = second.clone();
    let cookie_at = second
        .windows(ch.cookie.len())
        .position(|w| w == ch.cookie)
        .unwrap();
    forged[cookie_at] ^= 1;
    let mut out = Output::default();
    f.handle(now, c.addr, SERVER.parse().unwrap(), &forged, &mut out);
    assert!(hello::hello_verify_cookie(&out.bytes[out.datagrams[0].1.clone()]).is_some());
    assert!(f.is_empty());
    // Three minutes later the real cookie has expired.
    let mut out = Output::default();
    f.handle(
        now + Duration::from_secs(180),
        c.addr,
        SERVER.parse().unwrap(),
        &second,
        &mut out,
    );
    assert!(f.is_empty());
    assert_eq!(f.counters().bad_cookies, 3);
    // In time, it starts the handshake.
    let mut out = Output::default();
    f.handle(now, c.addr, SERVER.parse().unwrap(), &second, &mut out);
    assert_eq!(f.len(), 1);
    assert_eq!(shared.half_open(), 1);
}

#[test]
fn half_open_handshakes_are_capped_per_source_and_per_host_and_time_out() {
    let now = Instant::now();
    let shared = Arc::new(Shared::default());
    let limits = Limits {
        half_open: 6,
        half_open_per_source: 4,
        ..Limits::default()
    };
    // Two workers' fronts share the host's caps.
    let mut fronts = [front(limits, shared.clone()), front(limits, shared.clone())];
    let mut started = 0;
    for i in 0..10u16 {
        let ip = if i < 5 { "192.0.2.1" } else { "192.0.2.2" };
        let mut c = Client::new(&format!("{ip}:{}", 6000 + i), now);
        let f = &mut fronts[i as usize % 2];
        // The second hello, and then silence (no Finished).
        let second = second_hello(f, &mut c, now);
        let mut out = Output::default();
        f.handle(now, c.addr, SERVER.parse().unwrap(), &second, &mut out);
        if !out.datagrams.is_empty() {
            started += 1;
        }
    }
    // Four from the first source, two more from the second: the host's six.
    assert_eq!(started, 6);
    assert_eq!(shared.half_open(), 6);
    let refused: u64 = fronts.iter().map(|f| f.counters().refused).sum();
    assert_eq!(refused, 4);
    let later = now + Limits::default().handshake_timeout + Duration::from_secs(1);
    for f in &mut fronts {
        let mut out = Output::default();
        f.handle_timeout(later, &mut out);
        assert!(f.is_empty());
    }
    assert_eq!((shared.half_open(), shared.associations()), (0, 0));
}

#[test]
fn a_dtls_1_0_hello_gets_a_protocol_version_alert_and_nothing_else() {
    let now = Instant::now();
    let shared = Arc::new(Shared::default());
    let mut f = front(Limits::default(), shared.clone());
    // What Debian's coturn 4.6.1 turnutils_uclient -S sends over UDP:
    // client_version DTLS 1.0, CBC suites only.
    let mut c = Client::new("192.0.2.1:5000", now);
    let mut hello_1_0 = c.outgoing().remove(0);
    hello_1_0[25] = 0xfe;
    hello_1_0[26] = 0xff;
    let mut out = Output::default();
    f.handle(now, c.addr, SERVER.parse().unwrap(), &hello_1_0, &mut out);
    let answer = &out.bytes[out.datagrams[0].1.clone()];
    assert_eq!(answer, &hello::protocol_version_alert(0xfeff));
    assert!(f.is_empty());
    assert_eq!(f.counters().old_versions, 1);
    assert_eq!(
        f.take_refusal().map(|(_, r)| r),
        Some(turn_dtls::Refused::OldVersion)
    );
}
