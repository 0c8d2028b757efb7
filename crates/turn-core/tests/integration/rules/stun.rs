//! STUN Binding and authentication (RFC 8489), RFC 5780.

use crate::common;

use common::*;
use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};
use turn_core::{Dest, Event, Transport};

// ---- STUN Binding (RFC 8489) ----

#[test]
fn binding_reports_reflexive_address_and_echoes_fingerprint() {
    let mut h = Harness::new();
    let (_, resp) = h.send(udp(), &binding(false, None)).unwrap();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(
        m.message_type(),
        MessageType::new(method::BINDING, Class::Success)
    );
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        udp().client
    );
    assert!(!m.has_fingerprint());
    assert!(m.get(attr::SOFTWARE).is_none(), "SOFTWARE is off by default");

    let (_, resp) = h.send(udp(), &binding(true, None)).unwrap();
    assert!(Message::parse(&resp).unwrap().has_fingerprint());
}

#[test]
fn software_attribute_is_configurable() {
    let mut h = Harness::with(|c| c.software = Some("turnpike-test".into()));
    let (_, resp) = h.send(udp(), &binding(false, None)).unwrap();
    assert_eq!(
        Message::parse(&resp).unwrap().get(attr::SOFTWARE).unwrap(),
        b"turnpike-test"
    );
}

#[test]
fn unknown_comprehension_required_gets_420_optional_is_ignored() {
    let mut h = Harness::new();
    let (_, resp) = h.send(udp(), &binding(false, Some((0x7777, b"x")))).unwrap();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().0, 420);
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x77, 0x77]);

    let (_, resp) = h.send(udp(), &binding(false, Some((0xC001, b"x")))).unwrap();
    assert!(is_success(&resp));
}

#[test]
fn malformed_packets_are_dropped_silently() {
    let mut h = Harness::new();
    let good = binding(true, None);
    let mut bad_fp = good.clone();
    let n = bad_fp.len();
    bad_fp[n - 1] ^= 1;
    let mut bad_cookie = good.clone();
    bad_cookie[5] ^= 1;
    let mut top_bits = good.clone();
    top_bits[0] |= 0x80;
    for pkt in [
        &bad_fp[..],
        &bad_cookie,
        &top_bits,
        &good[..19],
        &[][..],
        &[0x40, 0, 0, 9, 1],
    ] {
        assert!(h.send(udp(), pkt).is_none());
    }
    // Responses and unknown indications sent to the server are dropped too.
    let mut resp = Vec::new();
    MessageBuilder::new(
        &mut resp,
        MessageType::new(method::BINDING, Class::Success),
        &[1; 12],
    );
    assert!(h.send(udp(), &resp).is_none());
}

#[test]
fn unknown_method_is_400() {
    let mut h = Harness::new();
    let mut buf = Vec::new();
    MessageBuilder::new(&mut buf, MessageType::new(0x0ABC, Class::Request), &[1; 12]);
    assert_eq!(code(&h.send(udp(), &buf).unwrap().1), Some(400));
}

// ---- Authentication (RFC 8489 §9.2) ----

#[test]
fn unauthenticated_request_gets_401_with_realm_and_nonce() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let req = c.build(method::ALLOCATE, [1; 12], &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let (_, resp) = h.send(udp(), &req).unwrap();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().0, 401);
    assert_eq!(m.get(attr::REALM).unwrap(), REALM.as_bytes());
    assert!(m.get(attr::NONCE).is_some());
    assert!(!m.has_integrity());
    assert!(h.relays.open.is_empty(), "no state from unauthenticated packets");
}

#[test]
fn integrity_without_username_realm_or_nonce_is_400() {
    let mut h = Harness::new();
    for missing in [attr::USERNAME, attr::REALM, attr::NONCE] {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(
            &mut buf,
            MessageType::new(method::ALLOCATE, Class::Request),
            &[1; 12],
        );
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
        for (t, v) in [
            (attr::USERNAME, &b"alice"[..]),
            (attr::REALM, REALM.as_bytes()),
            (attr::NONCE, b"whatever"),
        ] {
            if t != missing {
                b.attr(t, v);
            }
        }
        b.message_integrity(b"key");
        assert_eq!(code(&h.send(udp(), &buf).unwrap().1), Some(400));
    }
}

#[test]
fn wrong_password_and_unknown_user_get_401() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wrong");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert_eq!(code(&resp), Some(401));
    let mut c = Client::new(udp(), "mallory", "x");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert_eq!(code(&resp), Some(401));
    assert!(h.relays.open.is_empty());
    // The log (not the client) is told which: a wrong password, an
    // unknown user, an expired REST username.
    let mut c = Client::new(udp(), "1:app", "x");
    c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let why: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::RequestRefused {
                detail: Some(d),
                code,
                ..
            } if code.code() == 401 => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        why,
        [
            "MESSAGE-INTEGRITY does not verify: wrong password",
            "unknown user (no such user, and not a REST-API username)",
            "REST-API username past its expiry time",
        ]
    );
}

#[test]
fn forged_or_foreign_nonce_gets_438() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.nonce = Some(b"0000000000000000deadbeef".to_vec());
    let req = c.build(method::ALLOCATE, [1; 12], &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let resp = h.send(udp(), &req).unwrap().1;
    assert_eq!(code(&resp), Some(438));
    // A nonce issued to another client IP is not accepted either.
    let mut other = Client::new(tuple(Transport::Udp, "203.0.113.99:1"), "alice", "wonderland");
    other.allocate(&mut h);
    c.nonce = other.nonce.clone();
    let req = c.build(method::ALLOCATE, [2; 12], &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert_eq!(code(&h.send(udp(), &req).unwrap().1), Some(438));
}

#[test]
fn nonce_expires_after_600s_with_438_and_a_fresh_nonce() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let old = c.nonce.clone().unwrap();
    h.advance(599);
    assert!(is_success(&c.refresh(&mut h, None)));
    assert_eq!(c.nonce.as_deref(), Some(&old[..]), "still valid at 599 s");
    h.advance(1);
    let req = c.build(method::REFRESH, [77; 12], &|_| {});
    let resp = h.send(udp(), &req).unwrap().1;
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().0, 438);
    assert_eq!(m.get(attr::REALM).unwrap(), REALM.as_bytes());
    let fresh = m.get(attr::NONCE).unwrap();
    assert_ne!(fresh, &old[..]);
    // The client retries with the fresh nonce and succeeds.
    assert!(is_success(&c.refresh(&mut h, None)));
}

#[test]
fn authenticated_responses_carry_message_integrity() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let key = c.key();
    c.allocate(&mut h);
    let ok = c.refresh(&mut h, None);
    assert!(Message::parse(&ok).unwrap().verify_integrity(&key));
    // Error responses after successful authentication are signed too.
    let err = c.bind(&mut h, 0x3FFF, "8.8.8.8:1");
    assert_eq!(code(&err), Some(400));
    assert!(Message::parse(&err).unwrap().verify_integrity(&key));
}

#[test]
fn rest_api_credentials_valid_and_expired() {
    let mut h = Harness::new();
    let unix_now = 1_700_000_000u64;
    let user = format!("{}:carol", unix_now + 3600);
    let pw = turn_core::auth::rest_password(b"rest-secret", &user);
    let mut c = Client::new(udp(), &user, &pw);
    c.allocate(&mut h);

    let user = format!("{}:dave", unix_now + 10);
    let pw = turn_core::auth::rest_password(b"rest-secret", &user);
    let mut late = Client::new(tuple(Transport::Udp, "203.0.113.5:40001"), &user, &pw);
    h.advance(11);
    let resp = late.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert_eq!(code(&resp), Some(401), "expired REST username");
}

// ---- RFC 5780 NAT behaviour discovery ----

fn binding_with(attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::new(method::BINDING, Class::Request),
        &[4; 12],
    );
    for (t, v) in attrs {
        b.attr(*t, v);
    }
    buf
}

#[test]
fn rfc5780_is_refused_with_420_when_off() {
    let mut h = Harness::new();
    for t in [attr::CHANGE_REQUEST, attr::RESPONSE_PORT, attr::PADDING] {
        let (_, resp) = h.send(udp(), &binding_with(&[(t, &[0, 0, 0, 6])])).unwrap();
        assert_eq!(code(&resp), Some(420), "{t:#x}");
    }
}

#[test]
fn rfc5780_change_request_answers_from_the_right_socket() {
    use std::net::IpAddr;
    let a: IpAddr = "198.51.100.1".parse().unwrap();
    let b: IpAddr = "198.51.100.2".parse().unwrap();
    let mut h = Harness::with(|c| {
        c.rfc5780 = Some(turn_core::Rfc5780 {
            ips: (a, b),
            ports: (3478, 3479),
        })
    });
    let t = udp(); // arrives on 198.51.100.1:3478
    let sa = |ip: IpAddr, port: u16| std::net::SocketAddr::new(ip, port);
    // (flags, expected origin): none, change port, change IP, both.
    for (flags, origin) in [
        (0u8, sa(a, 3478)),
        (2, sa(a, 3479)),
        (4, sa(b, 3478)),
        (6, sa(b, 3479)),
    ] {
        let (dest, resp) = h
            .send(t, &binding_with(&[(attr::CHANGE_REQUEST, &[0, 0, 0, flags])]))
            .unwrap();
        let m = Message::parse(&resp).unwrap();
        assert_eq!(
            m.get_addr(attr::RESPONSE_ORIGIN).unwrap().unwrap(),
            origin,
            "flags {flags}"
        );
        assert_eq!(m.get_addr(attr::OTHER_ADDRESS).unwrap().unwrap(), sa(b, 3479));
        assert_eq!(
            m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
            t.client
        );
        if flags == 0 {
            assert_eq!(dest, Dest::Client(t));
        } else {
            assert_eq!(
                dest,
                Dest::Via {
                    local: origin,
                    to: t.client
                },
                "flags {flags}"
            );
        }
    }
    // A request that reached the alternate socket names the primary as other.
    let alt = turn_core::FiveTuple {
        server: sa(b, 3479),
        ..t
    };
    let (_, resp) = h.send(alt, &binding_with(&[])).unwrap();
    assert_eq!(
        Message::parse(&resp)
            .unwrap()
            .get_addr(attr::OTHER_ADDRESS)
            .unwrap()
            .unwrap(),
        sa(a, 3478)
    );
    // RESPONSE-PORT redirects; PADDING is echoed; bad lengths are 400.
    let (dest, resp) = h
        .send(
            t,
            &binding_with(&[
                (attr::RESPONSE_PORT, &[0x1F, 0x90, 0, 0]),
                (attr::PADDING, &[0; 40]),
            ]),
        )
        .unwrap();
    assert_eq!(
        dest,
        Dest::Via {
            local: sa(a, 3478),
            to: sa(t.client.ip(), 8080)
        }
    );
    assert_eq!(
        Message::parse(&resp).unwrap().get(attr::PADDING).unwrap().len(),
        40
    );
    let (_, resp) = h.send(t, &binding_with(&[(attr::CHANGE_REQUEST, &[6])])).unwrap();
    assert_eq!(code(&resp), Some(400));
    // Over TCP a change cannot be honoured.
    let tcp = tuple(Transport::Tcp, "203.0.113.5:40000");
    let (_, resp) = h
        .send(tcp, &binding_with(&[(attr::CHANGE_REQUEST, &[0, 0, 0, 4])]))
        .unwrap();
    assert_eq!(code(&resp), Some(400));
}
