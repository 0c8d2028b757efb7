//! RFC 8656 §7.2/§7.3 dual allocations, ADDRESS-ERROR-CODE, relay choice by
//! peer family, DONT-FRAGMENT, and nothing after expiry: fake time.

use crate::common;
use common::*;
use stun_proto::{attr, method, Message};
use turn_core::{Dest, Transport};

fn dual(h: &mut Harness, c: &mut Client) -> Vec<u8> {
    c.request(h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    })
}

fn relayed_all(resp: &[u8]) -> Vec<std::net::SocketAddr> {
    let m = Message::parse(resp).unwrap();
    m.get_all(attr::XOR_RELAYED_ADDRESS)
        .map(|v| m.decode_xor_addr(v).unwrap())
        .collect()
}

#[test]
fn dual_allocation_gets_one_relay_per_family_and_relays_by_peer_family() {
    let mut h = Harness::new();
    h.relays.ipv6 = Ipv6Relays::All;
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = dual(&mut h, &mut c);
    assert!(is_success(&resp), "{:?}", code(&resp));
    let relays = relayed_all(&resp);
    assert_eq!(relays.len(), 2, "{relays:?}");
    assert!(
        relays[0].is_ipv4() && relays[1].is_ipv6(),
        "IPv4 first: {relays:?}"
    );
    assert!(Message::parse(&resp)
        .unwrap()
        .get(attr::ADDRESS_ERROR_CODE)
        .is_none());
    // Both requests reached the runtime with the address the client reached.
    assert_eq!(h.relays.requests.len(), 2);
    assert!(h.relays.requests.iter().all(|r| r.local_ip == udp().server.ip()));

    assert!(is_success(&c.permit(&mut h, "8.8.8.8:5000")));
    assert!(is_success(&c.permit(&mut h, "[2606:4700::1111]:5000")));
    let (dest, _) = h.send(c.t, &send_indication("8.8.8.8:5000", b"v4")).unwrap();
    assert_eq!(
        dest,
        Dest::Peer {
            relay: relays[0],
            peer: "8.8.8.8:5000".parse().unwrap()
        }
    );
    let (dest, _) = h
        .send(c.t, &send_indication("[2606:4700::1111]:5000", b"v6"))
        .unwrap();
    assert_eq!(
        dest,
        Dest::Peer {
            relay: relays[1],
            peer: "[2606:4700::1111]:5000".parse().unwrap()
        }
    );
    // Peer data on the IPv6 relay reaches the client.
    let (dest, _) = h
        .peer_sends(relays[1], "[2606:4700::1111]:5000", b"back")
        .unwrap();
    assert_eq!(dest, Dest::Client(c.t));
}

#[test]
fn a_family_that_cannot_be_served_is_reported_with_address_error_code() {
    let mut h = Harness::new(); // the fake relays have no IPv6
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = dual(&mut h, &mut c);
    assert!(is_success(&resp));
    assert_eq!(relayed_all(&resp).len(), 1);
    let m = Message::parse(&resp).unwrap();
    let aec = m.get(attr::ADDRESS_ERROR_CODE).expect("ADDRESS-ERROR-CODE");
    assert_eq!(aec[0], attr::FAMILY_IPV6);
    assert_eq!((aec[2] as u16) * 100 + aec[3] as u16, 440);
    // A peer of the missing family: 443.
    assert_eq!(code(&c.permit(&mut h, "[2606:4700::1111]:5000")), Some(443));
    // A retransmission of the Allocate gets the same answer.
    let mut d = Client::new(tuple(Transport::Udp, "203.0.113.5:40002"), "alice", "wonderland");
    d.learn_nonce(&mut h);
    let txid = d.txid();
    let req = d.build(method::ALLOCATE, txid, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    let (_, first) = h.send(d.t, &req).unwrap();
    let (_, retx) = h.send(d.t, &req).unwrap();
    assert!(is_success(&retx));
    assert_eq!(relayed_all(&first), relayed_all(&retx));
    assert!(Message::parse(&retx)
        .unwrap()
        .get(attr::ADDRESS_ERROR_CODE)
        .is_some());
}

#[test]
fn the_drafts_attribute_number_asks_for_a_dual_allocation_too() {
    let mut h = Harness::new();
    h.relays.ipv6 = Ipv6Relays::All;
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT, &[2, 0, 0, 0]);
    });
    assert_eq!(relayed_all(&resp).len(), 2, "coturn's -Z uses 0x8032");
}

#[test]
fn additional_family_must_be_ipv6() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::ADDITIONAL_ADDRESS_FAMILY, &[1, 0, 0, 0]);
    });
    assert_eq!(code(&resp), Some(400));
}

#[test]
fn refresh_with_a_family_refreshes_or_deletes_only_that_family() {
    let mut h = Harness::new();
    h.relays.ipv6 = Ipv6Relays::All;
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relays = relayed_all(&dual(&mut h, &mut c));
    // Keep IPv4 alive to 3600 s; IPv6 keeps its 600 s.
    let resp = c.request(&mut h, method::REFRESH, &|b| {
        b.u32(attr::LIFETIME, 3600)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0]);
    });
    assert!(is_success(&resp));
    h.advance(601);
    assert!(h.relays.closed.contains(&relays[1]), "IPv6 expired on its own");
    assert!(!h.relays.closed.contains(&relays[0]));
    assert_eq!(h.server.allocation_count(), 1);
    assert_eq!(code(&c.permit(&mut h, "[2606:4700::1111]:5000")), Some(443));
    // Deleting the remaining family deletes the allocation.
    let resp = c.request(&mut h, method::REFRESH, &|b| {
        b.u32(attr::LIFETIME, 0)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[1, 0, 0, 0]);
    });
    assert!(is_success(&resp));
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.relays.open.is_empty());
}

#[test]
fn refresh_zero_with_a_family_of_a_dual_allocation_keeps_the_other() {
    let mut h = Harness::new();
    h.relays.ipv6 = Ipv6Relays::All;
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relays = relayed_all(&dual(&mut h, &mut c));
    let resp = c.request(&mut h, method::REFRESH, &|b| {
        b.u32(attr::LIFETIME, 0)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert!(is_success(&resp));
    assert_eq!(h.relays.closed, vec![relays[1]]);
    assert_eq!(h.server.allocation_count(), 1);
    // A family it no longer holds: 443.
    let resp = c.request(&mut h, method::REFRESH, &|b| {
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(code(&resp), Some(443));
}

#[test]
fn dont_fragment_is_accepted_and_reaches_the_relay_socket() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::DONT_FRAGMENT, &[]);
    });
    assert!(is_success(&resp), "{:?}", code(&resp));
    assert!(h.relays.requests.last().unwrap().dont_fragment);
    let mut d = Client::new(tuple(Transport::Udp, "203.0.113.5:40009"), "alice", "wonderland");
    assert!(d.allocate(&mut h).is_ipv4());
    assert!(!h.relays.requests.last().unwrap().dont_fragment);
}

#[test]
fn nothing_relays_or_refreshes_after_expiry_even_before_the_sweep() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relay = c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:5000")));
    assert!(h.send(c.t, &channel_data(0x4000, b"x")).is_some());
    // Past the lifetime, without handle_timeout.
    h.now += std::time::Duration::from_secs(601);
    assert!(
        h.send(c.t, &channel_data(0x4000, b"x")).is_none(),
        "no ChannelData"
    );
    assert!(
        h.send(c.t, &send_indication("8.8.8.8:5000", b"x")).is_none(),
        "no Send"
    );
    assert!(h.peer_sends(relay, "8.8.8.8:5000", b"x").is_none(), "no Data");
    let resp = c.refresh(&mut h, Some(600));
    assert_eq!(code(&resp), Some(437), "an expired allocation is not revived");
    assert_eq!(h.server.allocation_count(), 0);
    assert!(h.relays.open.is_empty());
}

#[test]
fn icmp_errors_reach_the_client_for_permitted_peers_only_and_rate_limited() {
    let mut h = Harness::with(|c| c.icmp_per_second = 2);
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relay = c.allocate(&mut h);
    let peer: std::net::SocketAddr = "8.8.8.8:5000".parse().unwrap();
    assert!(
        h.server.handle_icmp(h.now, relay, peer, 3, 3, 0).is_none(),
        "no permission"
    );
    assert!(is_success(&c.permit(&mut h, "8.8.8.8:5000")));
    let t = h.server.handle_icmp(h.now, relay, peer, 3, 3, 0).unwrap();
    assert_eq!(t.dest, Dest::Client(c.t));
    let m = Message::parse(t.data).unwrap();
    assert_eq!(m.message_type().method, method::DATA);
    assert_eq!(m.get(attr::ICMP).unwrap(), &[0, 0, 3, 3, 0, 0, 0, 0]);
    assert!(m.get(attr::DATA).is_none());
    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(), peer);
    assert!(h.server.handle_icmp(h.now, relay, peer, 3, 3, 0).is_some());
    assert!(
        h.server.handle_icmp(h.now, relay, peer, 3, 3, 0).is_none(),
        "over the rate"
    );
    assert_eq!(h.server.counters().icmp_relayed, 2);
}

#[test]
fn userhash_counts_with_username_in_the_brute_force_guard() {
    let mut h = Harness::with_shared(|_, s| s.set_auth_guard(4, std::time::Duration::from_secs(300)));
    let mut good = Client::new(udp(), "alice", "wonderland");
    good.learn_nonce(&mut h);
    let mut bad = Client::new(udp(), "alice", "not-the-password");
    bad.nonce = good.nonce.clone();
    for _ in 0..4 {
        let txid = bad.txid();
        let req = bad.build(method::REFRESH, txid, &|_| {});
        let _ = h.send(bad.t, &req);
    }
    // The pair is blocked: the right password by USERNAME is dropped...
    let txid = good.txid();
    let req = good.build(method::ALLOCATE, txid, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert!(h.send(good.t, &req).is_none(), "blocked by USERNAME");
    // ...and by USERHASH (the same account) too.
    let hash = stun_proto::userhash("alice", REALM);
    let mut buf = Vec::new();
    let mut b = stun_proto::MessageBuilder::new(
        &mut buf,
        stun_proto::MessageType::new(method::ALLOCATE, stun_proto::Class::Request),
        &[77; 12],
    );
    b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
        .attr(attr::USERHASH, &hash)
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, good.nonce.as_ref().unwrap())
        .message_integrity(&good.key());
    assert!(h.send(good.t, &buf).is_none(), "blocked by USERHASH");
    // Another source is not blocked.
    let mut elsewhere = Client::new(tuple(Transport::Udp, "203.0.113.99:4000"), "alice", "wonderland");
    elsewhere.allocate(&mut h);
}
