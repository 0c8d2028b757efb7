//! Allocate (RFC 8656 §7.2), Refresh and lifetimes (§7.3).

use crate::common;

use std::time::Duration;

use common::*;
use stun_proto::{attr, method, Message};
use turn_core::{CloseReason, Event, Transport};

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
