//! RFC 8016 mobility with fake time: a ticket on Allocate (§3.1), the
//! allocation moved by a Refresh with it from a new address (§3.2) with its
//! permissions, channels and relayed address, and every way a ticket must
//! fail: mobility off, over TCP, on an allocation made without it, another
//! user's ticket (the hijack), a replayed, forged or expired one.

use crate::common;

use std::net::SocketAddr;

use common::*;
use stun_proto::{attr, method, Message};
use turn_core::{Dest, Event, Transport};

const PEER: &str = "8.8.8.8:5000";
/// The client's address after its move (Wi-Fi to cellular).
const MOVED: &str = "198.18.7.9:51000";

fn mobile() -> Harness {
    Harness::with(|c| c.mobility = true)
}

/// An Allocate asking for mobility: its answer.
fn allocate_mobile(h: &mut Harness, c: &mut Client) -> Vec<u8> {
    c.request(h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::MOBILITY_TICKET, &[]);
    })
}

fn ticket_of(resp: &[u8]) -> Vec<u8> {
    Message::parse(resp)
        .unwrap()
        .get(attr::MOBILITY_TICKET)
        .expect("a MOBILITY-TICKET")
        .to_vec()
}

/// A Refresh with `ticket` (signed as `c`'s user) from `c`'s 5-tuple.
fn refresh_with(h: &mut Harness, c: &mut Client, ticket: &[u8]) -> Vec<u8> {
    let ticket = ticket.to_vec();
    c.request(h, method::REFRESH, &move |b| {
        b.attr(attr::MOBILITY_TICKET, &ticket);
    })
}

/// A mobile allocation with a permission and a channel to PEER: the
/// client, its relayed address, its ticket.
fn mobile_call(h: &mut Harness) -> (Client, SocketAddr, Vec<u8>) {
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = allocate_mobile(h, &mut c);
    assert!(is_success(&resp), "{:?}", code(&resp));
    let relayed = Message::parse(&resp)
        .unwrap()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert!(is_success(&c.bind(h, 0x4000, PEER)));
    (c, relayed, ticket_of(&resp))
}

#[test]
fn off_by_default_an_allocate_asking_for_mobility_gets_405() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    assert_eq!(code(&allocate_mobile(&mut h, &mut c)), Some(405));
    // Without the attribute, as always.
    c.allocate(&mut h);
}

#[test]
fn a_ticket_moves_the_allocation_with_its_channels_to_the_new_address() {
    let mut h = mobile();
    let (_old, relayed, ticket) = mobile_call(&mut h);
    assert!(ticket.len() >= 28, "sealed: {} bytes", ticket.len());
    let mut moved = Client::new(tuple(Transport::Udp, MOVED), "alice", "wonderland");
    let resp = refresh_with(&mut h, &mut moved, &ticket);
    assert!(is_success(&resp), "{:?}", code(&resp));
    let fresh = ticket_of(&resp);
    assert_ne!(fresh, ticket, "a new ticket with each move");
    let moves: Vec<_> = h
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::AllocationMoved { .. }))
        .collect();
    assert_eq!(moves.len(), 1, "{moves:?}");
    // The peer's data goes to the new address on the same channel.
    let (dest, data) = h.peer_sends(relayed, PEER, b"hello").expect("relayed");
    assert_eq!(dest, Dest::Client(moved.t));
    assert_eq!(data, channel_data(0x4000, b"hello"));
    // The channel works from the new address, not from the old.
    assert!(h
        .send(moved.t, &channel_data(0x4000, b"up"))
        .is_some_and(|(d, _)| matches!(d, Dest::Peer { .. })));
    assert!(h.send(udp(), &channel_data(0x4000, b"up")).is_none());
    // It refreshes from there (and a Refresh with a ticket renews it).
    assert!(is_success(&moved.refresh(&mut h, Some(600))));
    let renewed = ticket_of(&refresh_with(&mut h, &mut moved, &fresh));
    assert_ne!(renewed, fresh);
}

#[test]
fn another_users_ticket_is_441_and_moves_nothing() {
    let mut h = mobile();
    let (_alice, relayed, ticket) = mobile_call(&mut h);
    // Bob, with his own good credentials, presents Alice's ticket.
    let mut bob = Client::new(tuple(Transport::Udp, MOVED), "bob", "builder");
    assert_eq!(code(&refresh_with(&mut h, &mut bob, &ticket)), Some(441));
    let (dest, _) = h.peer_sends(relayed, PEER, b"still alice").unwrap();
    assert_eq!(dest, Dest::Client(udp()), "the allocation stayed");
    // Alice's ticket still moves it for Alice.
    let mut alice = Client::new(tuple(Transport::Udp, MOVED), "alice", "wonderland");
    assert!(is_success(&refresh_with(&mut h, &mut alice, &ticket)));
}

#[test]
fn a_replayed_forged_or_expired_ticket_is_400() {
    let mut h = mobile();
    let (_c, relayed, ticket) = mobile_call(&mut h);
    let mut moved = Client::new(tuple(Transport::Udp, MOVED), "alice", "wonderland");
    assert!(is_success(&refresh_with(&mut h, &mut moved, &ticket)));
    // Used once: from a third address, the same ticket is spent.
    let mut third = Client::new(tuple(Transport::Udp, "198.18.7.10:52000"), "alice", "wonderland");
    assert_eq!(code(&refresh_with(&mut h, &mut third, &ticket)), Some(400));
    // Forged: one bit flipped.
    let mut forged = ticket.clone();
    forged[20] ^= 1;
    assert_eq!(code(&refresh_with(&mut h, &mut third, &forged)), Some(400));
    assert_eq!(code(&refresh_with(&mut h, &mut third, b"short")), Some(400));
    let (dest, _) = h.peer_sends(relayed, PEER, b"x").unwrap();
    assert_eq!(dest, Dest::Client(moved.t), "nothing moved");

    // Expired: a ticket older than the longest allocation lifetime,
    // though the allocation lives on by Refreshes without one.
    let mut h = mobile();
    let (mut c, _, ticket) = mobile_call(&mut h);
    for _ in 0..7 {
        h.advance(500);
        assert!(is_success(&c.refresh(&mut h, Some(600))));
    }
    h.advance(200);
    let mut moved = Client::new(tuple(Transport::Udp, MOVED), "alice", "wonderland");
    assert_eq!(code(&refresh_with(&mut h, &mut moved, &ticket)), Some(400));
}

#[test]
fn no_mobility_over_tcp_or_for_an_allocation_made_without_it() {
    let mut h = mobile();
    let mut tcp = Client::new(tuple(Transport::Tcp, "203.0.113.5:40001"), "alice", "wonderland");
    assert_eq!(code(&allocate_mobile(&mut h, &mut tcp)), Some(405));
    let mut plain = Client::new(udp(), "alice", "wonderland");
    plain.allocate(&mut h);
    // Its Refresh with a ticket (from another of its allocations) is 405.
    let mut other = Client::new(tuple(Transport::Udp, "203.0.113.5:40002"), "alice", "wonderland");
    let ticket = ticket_of(&allocate_mobile(&mut h, &mut other));
    assert_eq!(code(&refresh_with(&mut h, &mut plain, &ticket)), Some(405));
}

#[test]
fn the_fast_path_entries_follow_a_move() {
    let mut h = Harness::with(|c| {
        c.mobility = true;
        c.fast_path = true;
    });
    let (_c, _, ticket) = mobile_call(&mut h);
    assert!(h.relays.fast.contains_key(&(udp(), 0x4000)));
    let mut moved = Client::new(tuple(Transport::Udp, MOVED), "alice", "wonderland");
    assert!(is_success(&refresh_with(&mut h, &mut moved, &ticket)));
    // The old 5-tuple's entry is gone, the new one's is installed.
    assert!(!h.relays.fast.contains_key(&(udp(), 0x4000)));
    let e = h.relays.fast[&(moved.t, 0x4000)];
    assert_eq!(e.peer, PEER.parse().unwrap());
}

/// The new address reached another worker (`Config::connection_id_tag`
/// differs): it passes the request on unanswered; the worker holding the
/// allocation moves it and gives it up as data; the first takes it in and
/// serves it. Each step's refusal leaves the allocation where it was.
#[test]
fn a_move_that_reached_another_worker_hands_the_allocation_over() {
    let mut a = Harness::with(|c| {
        c.mobility = true;
        c.connection_id_tag = 0;
    });
    let mut b = Harness::with(|c| {
        c.mobility = true;
        c.connection_id_tag = 1;
    });
    b.now = a.now;
    let (_c, relayed, ticket) = mobile_call(&mut a);
    let mut moved = Client::new(tuple(Transport::Udp, MOVED), "alice", "wonderland");
    moved.learn_nonce(&mut b);
    let txid = moved.txid();
    let req = moved.build(method::REFRESH, txid, &|bld| {
        bld.attr(attr::MOBILITY_TICKET, &ticket);
    });
    assert!(
        b.send(moved.t, &req).is_none(),
        "not answered by the wrong worker"
    );
    let (worker, t, request) = b.relays.elsewhere.pop().expect("passed on");
    assert_eq!((worker, t), (0, moved.t));
    // The holder moves it (its answer is not sent: the runtime hands the
    // allocation over first, and the taker answers the same request).
    let (_, resp) = a.send(t, &request).expect("answered by the holder");
    assert!(is_success(&resp), "{:?}", code(&resp));
    let state = a.server.take_allocation(&t, a.now).expect("given up");
    assert!(a.server.sessions(a.now).is_empty());
    assert!(a.peer_sends(relayed, PEER, b"gone").is_none());
    b.server.adopt_allocation(b.now, &state, &Some).unwrap();
    let (dest, resp) = b.send(t, &request).expect("answered by the taker");
    assert_eq!(dest, Dest::Client(moved.t));
    assert!(is_success(&resp), "{:?}", code(&resp));
    let renewed = ticket_of(&resp);
    // The taker serves it: the peer's data, and a later move with its
    // ticket, which names the taker, needs no other worker.
    let (dest, data) = b.peer_sends(relayed, PEER, b"here").unwrap();
    assert_eq!(dest, Dest::Client(moved.t));
    assert_eq!(data, channel_data(0x4000, b"here"));
    let mut again = Client::new(tuple(Transport::Udp, "198.18.7.11:53000"), "alice", "wonderland");
    assert!(
        is_success(&refresh_with(&mut b, &mut again, &renewed)),
        "moves again on the taker"
    );
    assert!(b.relays.elsewhere.is_empty());
}
