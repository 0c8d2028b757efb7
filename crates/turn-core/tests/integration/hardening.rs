//! Security hardening rules (issue 3), with fake time: RFC 8489 strong
//! authentication and bid-down protection, amplification and flood limits,
//! brute-force blocking, quotas, bandwidth caps, and bad input.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};
use turn_core::auth::OFFERED_ALGORITHMS;
use turn_core::limits::Quotas;
use turn_core::{CloseReason, Event, Transport};

const TRANSPORT_UDP: u32 = 0x1100_0000;

fn first_nonce(h: &mut Harness, t: turn_core::FiveTuple) -> Vec<u8> {
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[1; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    let (_, resp) = h.send(t, &buf).unwrap();
    Message::parse(&resp).unwrap().get(attr::NONCE).unwrap().to_vec()
}

/// An Allocate authenticated the RFC 8489 way: SHA-256 key, both algorithm
/// attributes, MESSAGE-INTEGRITY-SHA256, and USERNAME or USERHASH.
fn sha256_allocate(
    nonce: &[u8],
    user: &str,
    pw: &str,
    userhash: bool,
    algs: &[u8],
    chosen: Option<&[u8]>,
) -> Vec<u8> {
    let key = stun_proto::long_term_key_sha256(user, REALM, pw);
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[2; 12],
    );
    b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    if userhash {
        b.attr(attr::USERHASH, &stun_proto::userhash(user, REALM));
    } else {
        b.attr(attr::USERNAME, user.as_bytes());
    }
    b.attr(attr::NONCE, nonce).attr(attr::REALM, REALM.as_bytes());
    if !algs.is_empty() {
        b.attr(attr::PASSWORD_ALGORITHMS, algs);
    }
    if let Some(c) = chosen {
        b.attr(attr::PASSWORD_ALGORITHM, c);
    }
    b.message_integrity_sha256(&key);
    buf
}

const SHA256: &[u8] = &[0, 2, 0, 0];
const MD5: &[u8] = &[0, 1, 0, 0];

// ---- RFC 8489 strong authentication ----

#[test]
fn challenge_offers_password_algorithms_with_a_cookie_nonce() {
    let mut h = Harness::new();
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[1; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    let (_, resp) = h.send(udp(), &buf).unwrap();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().0, 401);
    let nonce = m.get(attr::NONCE).unwrap();
    assert!(nonce.starts_with(b"obMatJos2"), "RFC 8489 §9.2 nonce cookie");
    assert_eq!(&nonce[9..13], b"wAAA", "password algorithms + username anonymity");
    assert_eq!(m.get(attr::PASSWORD_ALGORITHMS).unwrap(), &OFFERED_ALGORITHMS);
}

#[test]
fn sha256_integrity_and_key_are_verified_and_answered_in_kind() {
    let mut h = Harness::new();
    let nonce = first_nonce(&mut h, udp());
    let req = sha256_allocate(
        &nonce,
        "alice",
        "wonderland",
        false,
        &OFFERED_ALGORITHMS,
        Some(SHA256),
    );
    let (_, resp) = h.send(udp(), &req).unwrap();
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.message_type().class, Class::Success, "{:?}", m.error_code());
    assert!(
        m.has_integrity_sha256() && !m.has_integrity(),
        "answered with MESSAGE-INTEGRITY-SHA256"
    );
    assert!(m.verify_integrity_sha256(&stun_proto::long_term_key_sha256("alice", REALM, "wonderland")));

    // Wrong password with SHA-256: 401.
    let t2 = tuple(Transport::Udp, "203.0.113.5:40009");
    let nonce = first_nonce(&mut h, t2);
    let req = sha256_allocate(&nonce, "alice", "nope", false, &OFFERED_ALGORITHMS, Some(SHA256));
    assert_eq!(code(&h.send(t2, &req).unwrap().1), Some(401));
}

#[test]
fn md5_password_algorithm_with_sha256_integrity() {
    // PASSWORD-ALGORITHM MD5 selects the MD5 key, whatever the MAC.
    let mut h = Harness::new();
    let nonce = first_nonce(&mut h, udp());
    let key = stun_proto::long_term_key_md5("alice", REALM, "wonderland");
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[2; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)
    .attr(attr::USERNAME, b"alice")
    .attr(attr::NONCE, &nonce)
    .attr(attr::REALM, REALM.as_bytes())
    .attr(attr::PASSWORD_ALGORITHMS, &OFFERED_ALGORITHMS)
    .attr(attr::PASSWORD_ALGORITHM, MD5)
    .message_integrity_sha256(&key);
    let (_, resp) = h.send(udp(), &buf).unwrap();
    assert!(is_success(&resp));
}

#[test]
fn userhash_authenticates_and_owns_the_allocation_by_name() {
    let mut h = Harness::new();
    let nonce = first_nonce(&mut h, udp());
    let req = sha256_allocate(
        &nonce,
        "alice",
        "wonderland",
        true,
        &OFFERED_ALGORITHMS,
        Some(SHA256),
    );
    let (_, resp) = h.send(udp(), &req).unwrap();
    assert!(is_success(&resp), "{:?}", code(&resp));
    assert!(matches!(&h.events()[..], [Event::AllocationCreated { username, .. }] if &**username == "alice"));
    // The same user by plain USERNAME and MD5 may refresh it; bob may not.
    let mut alice = Client::new(udp(), "alice", "wonderland");
    assert!(is_success(&alice.refresh(&mut h, None)));
    let mut bob = Client::new(udp(), "bob", "builder");
    assert_eq!(code(&bob.refresh(&mut h, None)), Some(441));
    // An unknown USERHASH is 401.
    let t2 = tuple(Transport::Udp, "203.0.113.5:40010");
    let nonce = first_nonce(&mut h, t2);
    let req = sha256_allocate(&nonce, "mallory", "x", true, &OFFERED_ALGORITHMS, Some(SHA256));
    assert_eq!(code(&h.send(t2, &req).unwrap().1), Some(401));
}

#[test]
fn bid_down_attempts_are_400() {
    let mut h = Harness::new();
    let nonce = first_nonce(&mut h, udp());
    // A man in the middle stripped SHA-256 from the offered list.
    let stripped = [0u8, 1, 0, 0];
    let cases: [(&[u8], Option<&[u8]>); 4] = [
        (&stripped, Some(MD5)),
        (&OFFERED_ALGORITHMS, None),                // list without a choice
        (&[], Some(SHA256)),                        // choice without the list
        (&OFFERED_ALGORITHMS, Some(&[0, 9, 0, 0])), // a choice not offered
    ];
    for (list, chosen) in cases {
        let req = sha256_allocate(&nonce, "alice", "wonderland", false, list, chosen);
        assert_eq!(
            code(&h.send(udp(), &req).unwrap().1),
            Some(400),
            "{list:?} {chosen:?}"
        );
    }
}

#[test]
fn md5_only_rfc5389_clients_keep_working() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.permit(&mut h, "8.8.8.8:1")));
}

// ---- Amplification and flood control ----

#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut h = Harness::with_shared(|_, s| s.set_rate_limit_per_ip(10));
    let flood = binding(false, None);
    let answered = (0..1000).filter(|_| h.send(udp(), &flood).is_some()).count();
    assert_eq!(answered, 20, "burst of twice the rate, then nothing");
    assert_eq!(h.server.counters().rate_limited, 980);
    // 401s count against the same budget.
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[1; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    assert!(h.send(udp(), &buf).is_none());
    // Another source is unaffected; the limited one recovers with time.
    assert!(h.send(tuple(Transport::Udp, "198.51.100.77:5"), &flood).is_some());
    h.advance(1);
    assert!(h.send(udp(), &flood).is_some());
    // 0 turns the limit off (single-host benchmarks).
    let mut h = Harness::with_shared(|_, s| s.set_rate_limit_per_ip(0));
    assert_eq!(
        (0..5000).filter(|_| h.send(udp(), &flood).is_some()).count(),
        5000
    );
}

#[test]
fn unauthenticated_responses_are_small() {
    let mut h = Harness::new();
    // Binding: the smallest request, with and without FINGERPRINT.
    for fp in [false, true] {
        let req = binding(fp, None);
        let (_, resp) = h.send(udp(), &req).unwrap();
        let ratio = resp.len() as f64 / req.len() as f64;
        assert!(ratio <= 1.6, "Binding {} -> {} bytes", req.len(), resp.len());
    }
    // 401 to a minimal Allocate (realm "example.org").
    let mut req = Vec::new();
    MessageBuilder::new(
        &mut req,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[1; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    let (_, resp) = h.send(udp(), &req).unwrap();
    let m = Message::parse(&resp).unwrap();
    let attrs: Vec<u16> = m.attr_types().collect();
    assert_eq!(
        attrs,
        vec![
            attr::ERROR_CODE,
            attr::REALM,
            attr::NONCE,
            attr::PASSWORD_ALGORITHMS
        ],
        "no needless attributes"
    );
    assert!(
        resp.len() <= 3 * req.len(),
        "401 is {} bytes for a {}-byte request",
        resp.len(),
        req.len()
    );
}

fn bare(m: u16, fingerprint: bool, transport: bool) -> Vec<u8> {
    let mut req = Vec::new();
    let mut b = MessageBuilder::new(&mut req, MessageType::new(m, Class::Request), &[3; 12]);
    if transport {
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    }
    if fingerprint {
        b.fingerprint();
    }
    req
}

#[test]
fn every_challenge_is_at_most_three_times_its_request() {
    // Every realm the runtime accepts (1..=24 bytes), every TURN method as
    // a bare header, and the minimal Allocate browsers send, with and
    // without FINGERPRINT: whatever is answered is at most 3x.
    for realm_len in 1..=turn_core::max_realm_len() {
        let realm = "r".repeat(realm_len);
        let mut h = Harness::with(|c| c.realm = realm.clone());
        let mut port = 41000;
        for m in [
            method::ALLOCATE,
            method::REFRESH,
            method::CREATE_PERMISSION,
            method::CHANNEL_BIND,
        ] {
            for fp in [false, true] {
                for transport in [false, m == method::ALLOCATE] {
                    port += 1;
                    let t = tuple(Transport::Udp, &format!("203.0.113.9:{port}"));
                    let req = bare(m, fp, transport);
                    let answer = h.send(t, &req);
                    if transport {
                        let (_, resp) = answer.as_ref().expect("a minimal Allocate is challenged");
                        assert_eq!(code(resp), Some(401));
                    }
                    if let Some((_, resp)) = answer {
                        assert!(
                            resp.len() <= 3 * req.len(),
                            "realm {realm_len} B, method {m:#x}, fp {fp}: {} -> {} bytes",
                            req.len(),
                            resp.len()
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn too_small_to_challenge_gets_a_short_error_or_nothing() {
    let mut h = Harness::new();
    // A bare Allocate cannot succeed (no REQUESTED-TRANSPORT): a short 400.
    let (_, resp) = h.send(udp(), &bare(method::ALLOCATE, false, false)).unwrap();
    assert_eq!(code(&resp), Some(400));
    // A bare Refresh with no allocation on the 5-tuple: 437.
    let (_, resp) = h.send(udp(), &bare(method::REFRESH, false, false)).unwrap();
    assert_eq!(code(&resp), Some(437));
    assert!(resp.len() <= 60);
    // On a 5-tuple with an allocation the client has a nonce already: a
    // bare Refresh there is dropped and counted.
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(h.send(udp(), &bare(method::REFRESH, false, false)).is_none());
    assert_eq!(h.server.counters().challenges_withheld, 1);
    // The allocation is untouched and its client carries on.
    assert!(is_success(&c.refresh(&mut h, None)));
}

#[test]
fn a_long_realm_gets_md5_only_challenges_that_authenticate() {
    // 20 bytes: the full challenge to a 28-byte Allocate would be 92
    // bytes; the MD5-only one is 80.
    const LONG: &str = "turn.example-corp.io";
    let mut h = Harness::with(|c| {
        let mut creds = turn_core::Credentials::new();
        creds.add_user("alice", LONG, "wonderland");
        c.credentials = Arc::new(creds);
        c.realm = LONG.to_owned();
    });
    let (_, resp) = h.send(udp(), &bare(method::ALLOCATE, false, true)).unwrap();
    assert!(resp.len() <= 84, "{} bytes", resp.len());
    let m = Message::parse(&resp).unwrap();
    assert!(m.get(attr::PASSWORD_ALGORITHMS).is_none(), "no list: MD5 only");
    let nonce = m.get(attr::NONCE).unwrap().to_vec();
    assert!(nonce.starts_with(turn_core::auth::NONCE_PREFIX_MD5));
    // MD5 with that nonce allocates.
    let key = stun_proto::long_term_key_md5("alice", LONG, "wonderland");
    let mut req = Vec::new();
    MessageBuilder::new(
        &mut req,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[4; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)
    .attr(attr::USERNAME, b"alice")
    .attr(attr::REALM, LONG.as_bytes())
    .attr(attr::NONCE, &nonce)
    .message_integrity(&key);
    let (_, resp) = h.send(udp(), &req).unwrap();
    assert!(is_success(&resp), "{:?}", code(&resp));
    // Algorithm attributes with an MD5-only nonce were not offered: 400.
    let t2 = tuple(Transport::Udp, "203.0.113.5:40011");
    let (_, resp) = h.send(t2, &bare(method::ALLOCATE, false, true)).unwrap();
    let nonce = Message::parse(&resp).unwrap().get(attr::NONCE).unwrap().to_vec();
    let key = stun_proto::long_term_key_sha256("alice", LONG, "wonderland");
    let mut req = Vec::new();
    MessageBuilder::new(
        &mut req,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[5; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)
    .attr(attr::USERNAME, b"alice")
    .attr(attr::REALM, LONG.as_bytes())
    .attr(attr::NONCE, &nonce)
    .attr(attr::PASSWORD_ALGORITHMS, &OFFERED_ALGORITHMS)
    .attr(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0])
    .message_integrity_sha256(&key);
    assert_eq!(code(&h.send(t2, &req).unwrap().1), Some(400));
    // A larger first request gets the full challenge, SHA-256 included.
    let t3 = tuple(Transport::Udp, "203.0.113.5:40012");
    let mut req = Vec::new();
    MessageBuilder::new(
        &mut req,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[6; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)
    .attr(attr::SOFTWARE, b"a client, v1.2.3");
    let (_, resp) = h.send(t3, &req).unwrap();
    assert!(resp.len() <= 3 * req.len());
    assert!(Message::parse(&resp)
        .unwrap()
        .get(attr::PASSWORD_ALGORITHMS)
        .is_some());
}

// ---- Brute force ----

#[test]
fn repeated_failures_slow_then_block_the_pair_only() {
    let mut h = Harness::with_shared(|_, s| s.set_auth_guard(6, std::time::Duration::from_secs(300)));
    let mut bad = Client::new(udp(), "alice", "guess");
    let allocate = |b: &mut MessageBuilder| {
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    };
    // Learn a nonce, then fail three times (half the limit).
    assert_eq!(code(&bad.request(&mut h, method::ALLOCATE, &allocate)), Some(401));
    for _ in 0..2 {
        assert_eq!(code(&bad.request(&mut h, method::ALLOCATE, &allocate)), Some(401));
    }
    // Now slowed: one checked attempt a second, the rest dropped unanswered.
    let req = bad.build(method::ALLOCATE, [9; 12], &allocate);
    assert!(h.send(udp(), &req).is_some());
    assert!(h.send(udp(), &req).is_none(), "throttled");
    let mut events = Vec::new();
    for _ in 0..3 {
        h.advance(1);
        let _ = h.send(udp(), &req);
        events.extend(h.events());
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::AuthBlocked { username, .. } if username == "alice")),
        "a block is reported for logging: {events:?}"
    );
    // Blocked: even the right password from this source is not answered.
    let mut good_here = Client::new(udp(), "alice", "wonderland");
    good_here.nonce = bad.nonce.clone();
    let req = good_here.build(method::ALLOCATE, [10; 12], &allocate);
    assert!(h.send(udp(), &req).is_none());
    // The same user from elsewhere, and another user from here, are fine.
    let mut elsewhere = Client::new(tuple(Transport::Udp, "198.51.100.20:1"), "alice", "wonderland");
    elsewhere.allocate(&mut h);
    let mut bob_here = Client::new(tuple(Transport::Udp, "203.0.113.5:40077"), "bob", "builder");
    bob_here.allocate(&mut h);
    // The block lifts after auth_block (300 s by default).
    h.advance(301);
    let mut later = Client::new(tuple(Transport::Udp, "203.0.113.5:40078"), "alice", "wonderland");
    later.allocate(&mut h);
}

// ---- Quotas and capacity ----

#[test]
fn user_quota_486_and_total_quota_508_shared_across_workers() {
    let quotas = Arc::new(Quotas::new(2, 3));
    let q = quotas.clone();
    let mut w1 = Harness::with_shared(|_, s| s.quotas = q.clone());
    let mut w2 = Harness::with_shared(|_, s| s.quotas = q.clone());
    let mut a1 = Client::new(tuple(Transport::Udp, "203.0.113.5:1"), "alice", "wonderland");
    let mut a2 = Client::new(tuple(Transport::Udp, "203.0.113.5:2"), "alice", "wonderland");
    let mut a3 = Client::new(tuple(Transport::Udp, "203.0.113.5:3"), "alice", "wonderland");
    a1.allocate(&mut w1);
    a2.allocate(&mut w2);
    let resp = a3.request(&mut w1, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    });
    assert_eq!(
        code(&resp),
        Some(486),
        "alice's third allocation, on either worker"
    );
    let mut b1 = Client::new(tuple(Transport::Udp, "203.0.113.6:1"), "bob", "builder");
    let mut b2 = Client::new(tuple(Transport::Udp, "203.0.113.6:2"), "bob", "builder");
    b1.allocate(&mut w2);
    let resp = b2.request(&mut w1, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    });
    assert_eq!(code(&resp), Some(508), "total of 3 reached");
    assert_eq!(w1.server.counters().quota_user, 1);
    assert_eq!(w1.server.counters().capacity, 1);
    // Deleting and expiring give quota back.
    a1.refresh(&mut w1, Some(0));
    w2.advance(601);
    assert_eq!(quotas.total(), 0, "all given back: {}", quotas.total());
    b2.allocate(&mut w1);
}

#[test]
fn allocations_that_come_and_go_or_refresh_in_a_loop_do_not_grow_the_timers() {
    // Before: every Allocate and Refresh left a heap entry until its old
    // deadline (10 min), 24 bytes each, whatever happened to it since.
    let mut h = Harness::new();
    let mut held = Client::new(tuple(Transport::Udp, "203.0.113.5:1"), "alice", "wonderland");
    held.allocate(&mut h);
    for i in 0..3_000u32 {
        let mut c = Client::new(
            // Sources of their own: unauthenticated answers are rate-limited per IP.
            tuple(
                Transport::Udp,
                &format!("198.18.{}.{}:4000", i / 250, 1 + i % 250),
            ),
            "alice",
            "wonderland",
        );
        c.allocate(&mut h);
        c.refresh(&mut h, Some(0));
        held.refresh(&mut h, Some(600));
    }
    assert!(
        h.server.pending_timers() <= 2 + 1024 + 1,
        "{}",
        h.server.pending_timers()
    );
    // The held allocation still expires on time.
    h.advance(601);
    assert_eq!(h.server.allocations_by_transport().iter().sum::<usize>(), 0);
}

#[test]
fn relay_port_exhaustion_is_508_without_leaking_quota() {
    let quotas = Arc::new(Quotas::new(0, 0));
    let q = quotas.clone();
    let mut h = Harness::with_shared(|_, s| s.quotas = q);
    h.relays.exhausted = true;
    let mut c = Client::new(udp(), "alice", "wonderland");
    for _ in 0..5 {
        let resp = c.request(&mut h, method::ALLOCATE, &|b| {
            b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
        });
        assert_eq!(code(&resp), Some(508));
    }
    assert_eq!(quotas.total(), 0);
    h.relays.exhausted = false;
    c.allocate(&mut h);
    assert_eq!(quotas.total(), 1);
}

#[test]
fn malformed_reservation_token_does_not_leak_quota() {
    // Found by the `core` fuzz target: a 400 after the quota was taken.
    let quotas = Arc::new(Quotas::new(1, 0));
    let q = quotas.clone();
    let mut h = Harness::with_shared(|_, s| s.quotas = q);
    let mut c = Client::new(udp(), "alice", "wonderland");
    for _ in 0..3 {
        let resp = c.request(&mut h, method::ALLOCATE, &|b| {
            b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)
                .attr(attr::RESERVATION_TOKEN, &[1, 2, 3]);
        });
        assert_eq!(code(&resp), Some(400));
    }
    assert_eq!(quotas.total(), 0);
    c.allocate(&mut h);
}

#[test]
fn permissions_and_channels_per_allocation_are_capped() {
    let mut h = Harness::with(|c| {
        c.max_permissions = 3;
        c.max_channels = 2;
    });
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    for p in ["8.8.8.1:1", "8.8.8.2:1", "8.8.8.3:1"] {
        assert!(is_success(&c.permit(&mut h, p)));
    }
    assert_eq!(code(&c.permit(&mut h, "8.8.8.4:1")), Some(508));
    assert!(
        is_success(&c.permit(&mut h, "8.8.8.1:9")),
        "refreshing an existing one is fine"
    );
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.1:1")));
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.2:1")));
    assert_eq!(code(&c.bind(&mut h, 0x4002, "8.8.8.3:1")), Some(508));
}

#[test]
fn bandwidth_caps_per_allocation_and_per_user() {
    let mut h = Harness::with(|c| c.max_bps = 1000);
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    let pkt = channel_data(0x4000, &[0u8; 200]);
    let sent = (0..20).filter(|_| h.send(udp(), &pkt).is_some()).count();
    assert_eq!(sent, 5, "1000 bytes/s lets five 200-byte packets through at once");
    let back = (0..20)
        .filter(|_| h.peer_sends(relay, "8.8.8.8:1", &[0u8; 250]).is_some())
        .count();
    assert_eq!(back, 4, "each direction has its own cap");
    assert_eq!(h.server.counters().bandwidth_dropped, 31);
    h.now += Duration::from_millis(400);
    assert_eq!(
        (0..20).filter(|_| h.send(udp(), &pkt).is_some()).count(),
        2,
        "refills at the rate"
    );

    // Per user: two allocations of one user share the user's cap.
    let mut h = Harness::with(|c| c.user_max_bps = 1000);
    let mut c1 = Client::new(tuple(Transport::Udp, "203.0.113.5:1"), "alice", "wonderland");
    let mut c2 = Client::new(tuple(Transport::Udp, "203.0.113.5:2"), "alice", "wonderland");
    c1.allocate(&mut h);
    c2.allocate(&mut h);
    c1.bind(&mut h, 0x4000, "8.8.8.8:1");
    c2.bind(&mut h, 0x4000, "8.8.8.8:1");
    let n1 = (0..10).filter(|_| h.send(c1.t, &pkt).is_some()).count();
    let n2 = (0..10).filter(|_| h.send(c2.t, &pkt).is_some()).count();
    assert_eq!(n1 + n2, 5);
    let mut bob = Client::new(tuple(Transport::Udp, "203.0.113.6:1"), "bob", "builder");
    bob.allocate(&mut h);
    bob.bind(&mut h, 0x4000, "8.8.8.8:1");
    assert_eq!(
        (0..10).filter(|_| h.send(bob.t, &pkt).is_some()).count(),
        5,
        "bob has his own"
    );
}

/// `user_max_bps` holds per host: two workers' servers (one book of
/// user buckets, as the runtime shares it) let one user's allocations
/// through together as one allocation alone would be.
#[test]
fn the_per_user_cap_holds_across_workers() {
    let book = Arc::new(turn_core::limits::UserBandwidth::default());
    let worker = || {
        Harness::with_shared(|c, s| {
            c.user_max_bps = 1000;
            s.user_bandwidth = book.clone();
        })
    };
    let (mut w1, mut w2) = (worker(), worker());
    let mut c1 = Client::new(tuple(Transport::Udp, "203.0.113.5:1"), "alice", "wonderland");
    let mut c2 = Client::new(tuple(Transport::Udp, "203.0.113.5:2"), "alice", "wonderland");
    c1.allocate(&mut w1);
    c2.allocate(&mut w2);
    c1.bind(&mut w1, 0x4000, "8.8.8.8:1");
    c2.bind(&mut w2, 0x4000, "8.8.8.8:1");
    assert_eq!(book.users(), 1);
    let pkt = channel_data(0x4000, &[0u8; 200]);
    let n1 = (0..10).filter(|_| w1.send(c1.t, &pkt).is_some()).count();
    let n2 = (0..10).filter(|_| w2.send(c2.t, &pkt).is_some()).count();
    assert_eq!(
        (n1, n2),
        (5, 0),
        "one second's 1000 bytes for the user, whichever worker"
    );
    let mut bob = Client::new(tuple(Transport::Udp, "203.0.113.6:1"), "bob", "builder");
    bob.allocate(&mut w2);
    bob.bind(&mut w2, 0x4000, "8.8.8.8:1");
    assert_eq!(
        (0..10).filter(|_| w2.send(bob.t, &pkt).is_some()).count(),
        5,
        "bob has his own"
    );
    // A deleted allocation leaves the user's buckets to the other; the
    // last one takes the user's entry with it.
    assert!(is_success(&c1.refresh(&mut w1, Some(0))));
    assert_eq!(book.users(), 2);
    assert!(is_success(&c2.refresh(&mut w2, Some(0))));
    assert!(is_success(&bob.refresh(&mut w2, Some(0))));
    assert_eq!(book.users(), 0);
}

#[test]
fn an_allocation_that_relayed_its_byte_quota_is_ended_with_reason_quota() {
    let mut h = Harness::with(|c| c.max_allocation_bytes = 1000);
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    let mut other = Client::new(tuple(Transport::Udp, "203.0.113.5:2"), "alice", "wonderland");
    other.allocate(&mut h);
    other.bind(&mut h, 0x4000, "8.8.8.8:1");
    let _ = h.events();
    let pkt = channel_data(0x4000, &[0u8; 400]);
    assert!(h.send(udp(), &pkt).is_some());
    assert!(h.peer_sends(relay, "8.8.8.8:1", &[0u8; 599]).is_some());
    assert!(h.send(other.t, &pkt).is_some());
    assert_eq!(h.server.end_over_quota(h.now, &|_| 0), 0, "999 bytes: below");
    assert_eq!(
        h.server.end_over_quota(h.now, &|t| u64::from(*t == udp())),
        1,
        "what the caller relayed for it (RFC 6062) counts"
    );
    let ended: Vec<_> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::AllocationDeleted {
                tuple, reason, stats, ..
            } => Some((tuple, reason, stats)),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 1, "{ended:?}");
    assert_eq!(ended[0].0, udp());
    assert_eq!(ended[0].1, CloseReason::Quota);
    assert_eq!((ended[0].2.to_peer_bytes, ended[0].2.from_peer_bytes), (400, 599));
    let counted = h.server.counters().allocations_ended;
    assert_eq!(counted[CloseReason::Quota.index()], 1);
    assert_eq!(counted.iter().sum::<u64>(), 1);
    assert_eq!(code(&c.refresh(&mut h, Some(600))), Some(437), "it is gone");
    assert!(
        is_success(&other.refresh(&mut h, Some(600))),
        "the other lives on"
    );
    assert!(h.send(other.t, &pkt).is_some());

    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    assert!(h.send(udp(), &channel_data(0x4000, &[0u8; 1200])).is_some());
    assert_eq!(h.server.end_over_quota(h.now, &|_| u64::MAX), 0, "0: no cap");
}

// ---- Bad input, each case as the RFCs say ----

#[test]
fn oversized_text_attributes() {
    let mut h = Harness::new();
    let nonce = first_nonce(&mut h, udp());
    let long = vec![b'a'; 764];
    for (t, v) in [
        (attr::USERNAME, &long[..509]),
        (attr::REALM, &long[..]),
        (attr::NONCE, &long[..]),
    ] {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(
            &mut buf,
            MessageType::new(method::ALLOCATE, Class::Request),
            &[1; 12],
        );
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
        for (t2, v2) in [
            (attr::USERNAME, &b"alice"[..]),
            (attr::REALM, REALM.as_bytes()),
            (attr::NONCE, &nonce[..]),
        ] {
            b.attr(t2, if t2 == t { v } else { v2 });
        }
        b.message_integrity(b"k");
        assert_eq!(
            code(&h.send(udp(), &buf).unwrap().1),
            Some(400),
            "oversized {t:#x}"
        );
    }
    // An oversized SOFTWARE is informational: the Binding is still answered.
    let (_, resp) = h
        .send(udp(), &binding(false, Some((attr::SOFTWARE, &long))))
        .unwrap();
    assert!(is_success(&resp));
}

#[test]
fn malformed_integrity_and_fingerprint_are_dropped() {
    let mut h = Harness::new();
    // MESSAGE-INTEGRITY-SHA256 of 12 bytes (below the 16-byte minimum).
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[1; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)
    .attr(attr::MESSAGE_INTEGRITY_SHA256, &[0; 12]);
    assert!(h.send(udp(), &buf).is_none());
    // FINGERPRINT not last.
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::BINDING, Class::Request),
        &[1; 12],
    )
    .fingerprint()
    .attr(attr::SOFTWARE, b"x");
    assert!(h.send(udp(), &buf).is_none());
}

#[test]
fn lifetime_all_ones_is_capped() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP)
            .u32(attr::LIFETIME, u32::MAX);
    });
    assert_eq!(Message::parse(&resp).unwrap().get_u32(attr::LIFETIME), Some(3600));
    let resp = c.refresh(&mut h, Some(u32::MAX));
    assert_eq!(Message::parse(&resp).unwrap().get_u32(attr::LIFETIME), Some(3600));
}

#[test]
fn channel_data_longer_than_its_datagram_is_dropped() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    let mut pkt = channel_data(0x4000, b"abcd");
    pkt[3] = 200; // claims 200 bytes, carries 4
    assert!(h.send(udp(), &pkt).is_none());
    // A 0x5000 channel number in ChannelData (not bindable) goes nowhere.
    assert!(h.send(udp(), &channel_data(0x5000, b"x")).is_none());
}

// ---- Drain ----

#[test]
fn draining_refuses_new_allocations_and_keeps_existing_ones() {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = flag.clone();
    let mut h = Harness::with_shared(|_, s| s.draining = f.clone());
    let mut old = Client::new(udp(), "alice", "wonderland");
    old.allocate(&mut h);
    flag.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut new = Client::new(tuple(Transport::Udp, "203.0.113.5:40100"), "alice", "wonderland");
    let resp = new.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    });
    assert_eq!(code(&resp), Some(508));
    let c = h.server.counters();
    assert_eq!(
        (c.drain_refused, c.capacity),
        (1, 0),
        "a drain refusal is counted as such, not as a capacity problem"
    );
    assert!(
        is_success(&old.refresh(&mut h, None)),
        "existing allocations carry on"
    );
    assert!(is_success(&old.permit(&mut h, "8.8.8.8:1")));

    // With an alternate server: 300 Try Alternate, signed.
    let f = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let mut h = Harness::with_shared(|c, s| {
        s.draining = f.clone();
        c.alternate_servers = vec!["192.0.2.99:3478".parse().unwrap()];
    });
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TRANSPORT_UDP);
    });
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().0, 300);
    assert_eq!(
        m.get_addr(attr::ALTERNATE_SERVER).unwrap().unwrap(),
        "192.0.2.99:3478".parse().unwrap()
    );
    assert!(m.verify_integrity(&c.key()));
}
