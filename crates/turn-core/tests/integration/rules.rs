//! One test per protocol rule, driving the sans-IO server with fake time and
//! a fake relay provider. A 600 s lifetime is walked in microseconds.

use crate::common;

use std::time::Duration;

use common::*;
use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};
use turn_core::{CloseReason, Dest, Event, Transport};

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

// ---- Allocate (RFC 8656 §7.2) ----

#[test]
fn allocate_succeeds_with_relayed_mapped_and_lifetime() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let m = Message::parse(&resp).unwrap();
    assert!(m.verify_integrity(&c.key()));
    let relayed = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert!(h.relays.open.contains(&relayed));
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        udp().client
    );
    assert_eq!(m.get_u32(attr::LIFETIME), Some(600));
    assert!(matches!(&h.events()[..], [Event::AllocationCreated { username, .. }] if &**username == "alice"));
}

#[test]
fn allocate_without_requested_transport_is_400_and_tcp_over_udp_too() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    assert_eq!(code(&c.request(&mut h, method::ALLOCATE, &|_| {})), Some(400));
    // RFC 6062 §5.1: a TCP relay needs a TCP or TLS control connection.
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x0600_0000);
    });
    assert_eq!(code(&resp), Some(400));
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x3300_0000);
    });
    assert_eq!(code(&resp), Some(442), "neither UDP nor TCP");
    assert!(h.relays.open.is_empty());
}

#[test]
fn second_allocate_is_437_but_retransmission_gets_the_same_answer() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h); // learns the nonce
    let mut c2 = Client::new(tuple(Transport::Udp, "203.0.113.5:40002"), "alice", "wonderland");
    c2.nonce = None;
    let first = c2.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let txid = Message::parse(&first).unwrap().transaction_id();
    let retrans = c2.build(method::ALLOCATE, txid, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let again = h.send(c2.t, &retrans).unwrap().1;
    assert_eq!(again, first, "retransmission answered identically");
    assert_eq!(h.relays.open.len(), 2, "no second relay for a retransmission");
    let resp = c2.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert_eq!(code(&resp), Some(437));
}

#[test]
fn different_username_on_existing_allocation_is_441() {
    let mut h = Harness::new();
    let mut a = Client::new(udp(), "alice", "wonderland");
    a.allocate(&mut h);
    let mut b = Client::new(udp(), "bob", "builder");
    assert_eq!(code(&b.refresh(&mut h, None)), Some(441));
    assert_eq!(code(&b.permit(&mut h, "8.8.8.8:1")), Some(441));
}

#[test]
fn requests_on_unknown_five_tuple_are_437_indications_dropped() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    assert_eq!(code(&c.refresh(&mut h, None)), Some(437));
    assert_eq!(code(&c.permit(&mut h, "8.8.8.8:1")), Some(437));
    assert_eq!(code(&c.bind(&mut h, 0x4000, "8.8.8.8:1")), Some(437));
    assert!(h.send(udp(), &send_indication("8.8.8.8:1", b"x")).is_none());
    assert!(h.send(udp(), &channel_data(0x4000, b"x")).is_none());
}

#[test]
fn relay_exhaustion_is_508_and_unsupported_family_440() {
    let mut h = Harness::new();
    h.relays.exhausted = true;
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert_eq!(code(&resp), Some(508));
    h.relays.exhausted = false;
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(code(&resp), Some(440));
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[9, 0, 0, 0]);
    });
    assert_eq!(code(&resp), Some(440));
}

#[test]
fn allocate_attribute_combinations() {
    // A runtime that cannot set DF (RFC 8656 §7.2: then DONT-FRAGMENT is 420).
    let mut h = Harness::with(|c| c.dont_fragment = false);
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::EVEN_PORT, &[0x80, 0, 0, 0])
            .attr(attr::RESERVATION_TOKEN, &[1; 8]);
    });
    assert_eq!(code(&resp), Some(400), "RESERVATION-TOKEN with EVEN-PORT");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0])
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(code(&resp), Some(400), "both address-family attributes");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::DONT_FRAGMENT, &[]);
    });
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.error_code().unwrap().0, 420, "DONT-FRAGMENT cannot be honoured");
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x00, 0x1A]);
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::EVEN_PORT, &[0, 0, 0, 0]);
    });
    assert!(is_success(&resp));
    let relayed = Message::parse(&resp)
        .unwrap()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relayed.port() % 2, 0);
}

#[test]
fn even_port_with_reservation_then_claim_by_token() {
    let mut h = Harness::new();
    let mut rtp = Client::new(udp(), "alice", "wonderland");
    let resp = rtp.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
    });
    let m = Message::parse(&resp).unwrap();
    assert!(is_success(&resp));
    let relayed = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relayed.port() % 2, 0);
    let token: [u8; 8] = m.get(attr::RESERVATION_TOKEN).unwrap().try_into().unwrap();

    let mut rtcp = Client::new(tuple(Transport::Udp, "203.0.113.5:40001"), "alice", "wonderland");
    let resp = rtcp.request(&mut h, method::ALLOCATE, &move |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::RESERVATION_TOKEN, &token);
    });
    let m = Message::parse(&resp).unwrap();
    assert!(is_success(&resp), "{:?}", m.error_code());
    assert_eq!(
        m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap().port(),
        relayed.port() + 1
    );

    // A token is good once; an unknown one is 508; a malformed one is 400.
    let mut third = Client::new(tuple(Transport::Udp, "203.0.113.5:40002"), "alice", "wonderland");
    let resp = third.request(&mut h, method::ALLOCATE, &move |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::RESERVATION_TOKEN, &token);
    });
    assert_eq!(code(&resp), Some(508));
    let resp = third.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::RESERVATION_TOKEN, &[1, 2, 3, 4]);
    });
    assert_eq!(code(&resp), Some(400));
}

#[test]
fn external_ip_is_advertised() {
    let mut h = Harness::with(|c| c.external_ipv4 = Some("192.0.2.200".parse().unwrap()));
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relayed = c.allocate(&mut h);
    assert_eq!(relayed.ip().to_string(), "192.0.2.200");
    let bound = *h.relays.open.iter().next().unwrap();
    assert_eq!(bound.port(), relayed.port());
}

// ---- Refresh and lifetimes (RFC 8656 §7.3) ----

#[test]
fn refresh_lifetimes_default_cap_and_zero_deletes() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let lt = |r: &[u8]| Message::parse(r).unwrap().get_u32(attr::LIFETIME);
    assert_eq!(lt(&c.refresh(&mut h, None)), Some(600));
    assert_eq!(lt(&c.refresh(&mut h, Some(100_000))), Some(3600));
    assert_eq!(lt(&c.refresh(&mut h, Some(1200))), Some(1200));
    assert_eq!(lt(&c.refresh(&mut h, Some(0))), Some(0));
    assert!(h.relays.open.is_empty(), "relay closed on delete");
    assert!(h.events().iter().any(|e| matches!(
        e,
        Event::AllocationDeleted {
            reason: CloseReason::Deleted,
            ..
        }
    )));
    assert_eq!(code(&c.refresh(&mut h, None)), Some(437));
}

#[test]
fn allocation_expires_after_its_lifetime_and_refresh_extends_it() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    h.advance(500);
    assert!(is_success(&c.refresh(&mut h, None))); // now expires at 1100 s
    h.advance(599);
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(h.server.poll_timeout(), Some(h.start + Duration::from_secs(1100)));
    h.advance(1);
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.relays.open.is_empty());
    assert!(h.events().iter().any(|e| matches!(
        e,
        Event::AllocationDeleted {
            reason: CloseReason::Expired,
            ..
        }
    )));
    // The allocation is gone: its relay no longer carries anything.
    let relay = h.relays.closed[0];
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_none());
}

#[test]
fn connection_close_deletes_a_tcp_allocation() {
    let mut h = Harness::new();
    let t = tuple(Transport::Tcp, "203.0.113.5:40000");
    let mut c = Client::new(t, "alice", "wonderland");
    c.allocate(&mut h);
    h.connection_closed(t);
    assert!(h.relays.open.is_empty());
    assert!(h.events().iter().any(|e| matches!(
        e,
        Event::AllocationDeleted {
            reason: CloseReason::ConnectionClosed,
            ..
        }
    )));
}

// ---- Permissions, Send/Data (RFC 8656 §9, §11) ----

#[test]
fn send_and_data_indications_relay_with_permission_only() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    // No permission yet: both directions dropped.
    assert!(h.send(udp(), &send_indication("8.8.8.8:5000", b"hi")).is_none());
    assert!(h.peer_sends(relay, "8.8.8.8:5000", b"yo").is_none());

    assert!(is_success(&c.permit(&mut h, "8.8.8.8:1")));
    let (dest, data) = h.send(udp(), &send_indication("8.8.8.8:5000", b"hi")).unwrap();
    assert_eq!(
        dest,
        Dest::Peer {
            relay,
            peer: "8.8.8.8:5000".parse().unwrap()
        }
    );
    assert_eq!(data, b"hi");
    // Permission is by IP only: another port of the same IP works.
    assert!(h.send(udp(), &send_indication("8.8.8.8:6000", b"hi")).is_some());
    // Another IP is still dropped.
    assert!(h.send(udp(), &send_indication("8.8.4.4:5000", b"hi")).is_none());

    let (dest, data) = h.peer_sends(relay, "8.8.8.8:7000", b"yo").unwrap();
    assert_eq!(dest, Dest::Client(udp()));
    let m = Message::parse(&data).unwrap();
    assert_eq!(
        m.message_type(),
        MessageType::new(method::DATA, Class::Indication)
    );
    assert_eq!(
        m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(),
        "8.8.8.8:7000".parse().unwrap()
    );
    assert_eq!(m.get(attr::DATA).unwrap(), b"yo");
    assert!(
        h.peer_sends(relay, "8.8.4.4:7000", b"yo").is_none(),
        "peer without permission dropped"
    );
}

#[test]
fn permission_expires_after_300s_and_stops_relaying() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.permit(&mut h, "8.8.8.8:1");
    h.advance(299);
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_some());
    h.advance(1);
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_none());
    assert!(h.send(udp(), &send_indication("8.8.8.8:1", b"x")).is_none());
    // Refreshing the permission restores relaying.
    c.permit(&mut h, "8.8.8.8:1");
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_some());
}

#[test]
fn create_permission_is_all_or_nothing_and_needs_a_peer() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    let resp = c.request(&mut h, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, "8.8.8.8:1".parse().unwrap())
            .xor_addr(attr::XOR_PEER_ADDRESS, "10.0.0.1:1".parse().unwrap());
    });
    assert_eq!(code(&resp), Some(403));
    assert!(
        h.peer_sends(relay, "8.8.8.8:1", b"x").is_none(),
        "nothing installed"
    );
    assert_eq!(
        code(&c.request(&mut h, method::CREATE_PERMISSION, &|_| {})),
        Some(400)
    );
    let resp = c.request(&mut h, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, "8.8.8.8:1".parse().unwrap())
            .xor_addr(attr::XOR_PEER_ADDRESS, "1.1.1.1:1".parse().unwrap());
    });
    assert!(is_success(&resp));
    assert!(h.peer_sends(relay, "1.1.1.1:9", b"x").is_some());
}

// ---- Peer policy ----

#[test]
fn refused_peers_get_403_and_send_is_dropped() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    h.events();
    for peer in [
        "10.0.0.1:1",
        "127.0.0.1:1",
        "169.254.169.254:80",
        "192.168.1.1:1",
        "0.0.0.0:1",
    ] {
        assert_eq!(code(&c.permit(&mut h, peer)), Some(403), "{peer}");
        assert_eq!(code(&c.bind(&mut h, 0x4001, peer)), Some(403), "{peer}");
    }
    assert!(h.send(udp(), &send_indication("127.0.0.1:1", b"x")).is_none());
    let refusals = h
        .events()
        .iter()
        .filter(|e| matches!(e, Event::PeerRefused { .. }))
        .count();
    assert_eq!(refusals, 11, "every refusal is reported for logging");
}

#[test]
fn family_mismatch_is_443() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert_eq!(code(&c.permit(&mut h, "[2606:4700::1]:1")), Some(443));
    assert_eq!(code(&c.bind(&mut h, 0x4000, "[2606:4700::1]:1")), Some(443));
    // An IPv4-mapped form of a loopback address is refused either way.
    assert!(matches!(
        code(&c.permit(&mut h, "[::ffff:127.0.0.1]:1")),
        Some(443 | 403)
    ));
    let resp = c.request(&mut h, method::REFRESH, &|b| {
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(code(&resp), Some(443));
}

#[test]
fn allow_loopback_and_operator_ranges() {
    let mut h = Harness::with(|c| {
        c.policy.allow_loopback = true;
        c.policy.allow = vec!["10.1.0.0/16".parse().unwrap()];
        c.policy.deny = vec!["8.8.8.0/24".parse().unwrap()];
    });
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.permit(&mut h, "127.0.0.1:1")));
    assert!(is_success(&c.permit(&mut h, "10.1.2.3:1")));
    assert_eq!(code(&c.permit(&mut h, "10.2.0.1:1")), Some(403));
    assert_eq!(code(&c.permit(&mut h, "8.8.8.8:1")), Some(403));
    // The 403's refusal names the peer and the range that matched.
    let why: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::RequestRefused {
                code,
                detail: Some(d),
                ..
            } if code.code() == 403 => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert!(
        why.last()
            .is_some_and(|w| w.starts_with("peer 8.8.8.8:1 in deny-peer 8.8.8.0/24")),
        "{why:?}"
    );
}

/// Both legs of a call through one server: another allocation's relayed
/// address on this host is a peer even where the default ranges refuse its
/// IP (here TEST-NET-2, as a private or loopback relay address would be),
/// while it is live; an operator's deny-peer still refuses it.
#[test]
fn another_allocations_relayed_address_is_a_peer_while_it_lives() {
    let mut h = Harness::new();
    let mut a = Client::new(udp(), "alice", "wonderland");
    let mut b = Client::new(tuple(Transport::Udp, "203.0.113.6:40000"), "bob", "builder");
    a.allocate(&mut h);
    let b_relay = b.allocate(&mut h);
    assert!(b_relay.ip().to_string().starts_with("198.51.100."), "{b_relay}");
    assert!(is_success(&a.permit(&mut h, &b_relay.to_string())));
    assert!(is_success(&a.bind(&mut h, 0x4000, &b_relay.to_string())));
    // Another port of the same address is no relay: refused as before.
    let other = std::net::SocketAddr::new(b_relay.ip(), b_relay.port() + 1000);
    assert_eq!(code(&a.permit(&mut h, &other.to_string())), Some(403));
    // Once bob's allocation is gone, so is the exception.
    assert!(is_success(&b.refresh(&mut h, Some(0))));
    h.drive();
    assert_eq!(code(&a.bind(&mut h, 0x4001, &b_relay.to_string())), Some(403));

    let mut h = Harness::with(|c| c.policy.deny = vec!["198.51.100.0/24".parse().unwrap()]);
    let mut a = Client::new(udp(), "alice", "wonderland");
    let mut b = Client::new(tuple(Transport::Udp, "203.0.113.6:40000"), "bob", "builder");
    a.allocate(&mut h);
    let b_relay = b.allocate(&mut h);
    assert_eq!(
        code(&a.permit(&mut h, &b_relay.to_string())),
        Some(403),
        "deny-peer wins"
    );
}

// ---- Channels (RFC 8656 §12) ----

#[test]
fn channel_number_ranges() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")));
    assert!(is_success(&c.bind(&mut h, 0x4FFF, "8.8.8.8:2")));
    assert_eq!(code(&c.bind(&mut h, 0x3FFF, "8.8.8.8:3")), Some(400));
    h.events();
    assert_eq!(code(&c.bind(&mut h, 0x5000, "8.8.8.8:3")), Some(400));
    // The refusal names the range and the way out for older clients.
    let why: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::RequestRefused { detail: Some(d), .. } => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        why,
        ["channel 0x5000 outside 0x4000-0x4FFF (RFC 8656 §12); older clients: --rfc5766-channel-numbers"]
    );
    assert_eq!(code(&c.bind(&mut h, 0x7FFF, "8.8.8.8:3")), Some(400));
    assert_eq!(
        code(&c.request(&mut h, method::CHANNEL_BIND, &|b| {
            b.u32(attr::CHANNEL_NUMBER, 0x4005_0000);
        })),
        Some(400),
        "missing XOR-PEER-ADDRESS"
    );

    let mut h = Harness::with(|c| c.legacy_channel_numbers = true);
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x5000, "8.8.8.8:3")));
    assert!(is_success(&c.bind(&mut h, 0x7FFF, "8.8.8.8:4")));
    assert_eq!(code(&c.bind(&mut h, 0x3FFF, "8.8.8.8:5")), Some(400));
}

#[test]
fn channel_conflicts_are_400_rebinding_same_pair_refreshes() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")));
    assert_eq!(
        code(&c.bind(&mut h, 0x4000, "8.8.8.8:2")),
        Some(400),
        "number bound to another peer"
    );
    assert_eq!(
        code(&c.bind(&mut h, 0x4001, "8.8.8.8:1")),
        Some(400),
        "peer bound to another number"
    );
    assert!(
        is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")),
        "same pair refreshes"
    );
}

#[test]
fn channel_data_relays_both_ways_and_channel_expires_after_600s() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")));
    let (dest, data) = h.send(udp(), &channel_data(0x4000, b"media")).unwrap();
    assert_eq!(
        dest,
        Dest::Peer {
            relay,
            peer: "8.8.8.8:1".parse().unwrap()
        }
    );
    assert_eq!(data, b"media");
    let (_, data) = h.peer_sends(relay, "8.8.8.8:1", b"back").unwrap();
    assert_eq!(
        data,
        channel_data(0x4000, b"back"),
        "ChannelData, unpadded over UDP"
    );
    // A different port of the permitted IP has no channel: Data indication.
    let (_, data) = h.peer_sends(relay, "8.8.8.8:2", b"x").unwrap();
    assert!(Message::parse(&data).is_ok());
    // Unknown channel: dropped.
    assert!(h.send(udp(), &channel_data(0x4001, b"x")).is_none());

    // Keep the allocation and permission alive; let the channel run out at 600 s.
    for _ in 0..2 {
        h.advance(250);
        c.permit(&mut h, "8.8.8.8:1");
        c.refresh(&mut h, None);
    }
    h.advance(99);
    assert!(h.send(udp(), &channel_data(0x4000, b"x")).is_some(), "599 s");
    h.advance(1);
    assert!(
        h.send(udp(), &channel_data(0x4000, b"x")).is_none(),
        "600 s: expired"
    );
    let (_, data) = h.peer_sends(relay, "8.8.8.8:1", b"x").unwrap();
    assert!(Message::parse(&data).is_ok(), "falls back to a Data indication");
    // During the cool-down the number cannot go to another peer.
    assert_eq!(code(&c.bind(&mut h, 0x4000, "8.8.4.4:1")), Some(400));
    assert!(
        is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")),
        "same peer may rebind"
    );
}

#[test]
fn channel_data_never_refreshes_a_permission() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    for _ in 0..29 {
        h.advance(10);
        assert!(h.send(udp(), &channel_data(0x4000, b"x")).is_some());
    }
    h.advance(10); // 300 s since the bind: the permission is gone
    assert!(h.send(udp(), &channel_data(0x4000, b"x")).is_none());
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_none());
}

#[test]
fn channel_data_over_tcp_is_padded() {
    let mut h = Harness::new();
    let t = tuple(Transport::Tcp, "203.0.113.5:40000");
    let mut c = Client::new(t, "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    let (_, data) = h.peer_sends(relay, "8.8.8.8:1", b"abcde").unwrap();
    assert_eq!(data.len(), 12);
    assert_eq!(&data[..9], &channel_data(0x4000, b"abcde")[..]);
    assert_eq!(turn_core::stream_frame_len(&data), Some(Ok(12)));
    // A padded frame from the client is accepted.
    let mut framed = channel_data(0x4000, b"abcde");
    framed.resize(12, 0);
    assert_eq!(h.send(t, &framed).unwrap().1, b"abcde");
}

#[test]
fn stats_count_both_directions() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    let _ = h.send(udp(), &channel_data(0x4000, b"12345"));
    let _ = h.send(udp(), &send_indication("8.8.8.8:1", b"123"));
    let _ = h.peer_sends(relay, "8.8.8.8:1", b"1234567");
    c.refresh(&mut h, Some(0));
    let stats = h.events().into_iter().find_map(|e| match e {
        Event::AllocationDeleted { stats, .. } => Some(stats),
        _ => None,
    });
    let s = stats.unwrap();
    assert_eq!(
        (
            s.to_peer_packets,
            s.to_peer_bytes,
            s.from_peer_packets,
            s.from_peer_bytes
        ),
        (2, 8, 1, 7)
    );
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
