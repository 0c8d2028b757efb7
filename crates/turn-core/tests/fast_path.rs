//! The kernel fast path's entries (issue 13), with fake time: installed
//! when a channel is bound, their expiry the earliest of the channel's,
//! the permission's and the relay's, moved by every refresh, removed with
//! the channel, the family and the allocation; none over TCP, none with
//! bandwidth caps, none unless the runtime says a fast path is loaded.

mod common;

use std::time::Duration;

use common::*;
use turn_core::Transport;

fn fast_harness() -> Harness {
    Harness::with(|c| c.fast_path = true)
}

#[test]
fn a_bound_channel_is_installed_with_the_earliest_expiry() {
    let mut h = fast_harness();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relay = c.allocate(&mut h);
    assert!(h.relays.fast.is_empty(), "nothing before a channel");
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    let e = h.relays.fast[&(udp(), 0x4001)];
    assert_eq!((e.relay, e.peer), (relay, "8.8.8.8:5000".parse().unwrap()));
    // Channel 600 s, permission 300 s, allocation 600 s: the permission's.
    assert_eq!(e.expires, h.now + Duration::from_secs(300));
    // A permission refresh later moves it.
    h.advance(200);
    assert!(is_success(&c.permit(&mut h, "8.8.8.8:1")));
    let e = h.relays.fast[&(udp(), 0x4001)];
    assert_eq!(e.expires, h.now + Duration::from_secs(300));
    // The allocation's own lifetime caps it too: Refresh to the default
    // 600 s from now, the channel expires first at bind + 600 = now + 400.
    assert!(is_success(&c.refresh(&mut h, Some(600))));
    let e = h.relays.fast[&(udp(), 0x4001)];
    assert_eq!(
        e.expires,
        h.now + Duration::from_secs(300),
        "the permission still"
    );
    // The channel expires (no refresh): the next sync removes it.
    h.advance(401);
    assert!(is_success(&c.permit(&mut h, "8.8.8.8:1")));
    assert!(h.relays.fast.is_empty(), "an expired channel is removed");
}

#[test]
fn deleting_the_allocation_or_its_family_removes_entries() {
    let mut h = fast_harness();
    h.relays.v6 = true;
    let mut c = Client::new(udp(), "alice", "wonderland");
    let resp = c.request(&mut h, stun_proto::method::ALLOCATE, &|b| {
        b.u32(stun_proto::attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(stun_proto::attr::ADDITIONAL_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert!(is_success(&resp));
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    assert!(is_success(&c.bind(&mut h, 0x4002, "[2606:4700::1111]:5000")));
    assert_eq!(h.relays.fast.len(), 2);
    // Refresh(0) of the IPv6 family: its channel's entry goes.
    c.request(&mut h, stun_proto::method::REFRESH, &|b| {
        b.u32(stun_proto::attr::LIFETIME, 0)
            .attr(stun_proto::attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert!(h.relays.fast.contains_key(&(udp(), 0x4001)));
    assert!(!h.relays.fast.contains_key(&(udp(), 0x4002)));
    // Admin delete (as drain timeout and shutdown do): everything goes.
    assert_eq!(h.server.delete_sessions(h.now, &|_| true), 1);
    h.drive();
    assert!(h.relays.fast.is_empty());
    // Expiry by the timer too.
    let mut d = Client::new(tuple(Transport::Udp, "203.0.113.5:40009"), "alice", "wonderland");
    d.allocate(&mut h);
    assert!(is_success(&d.bind(&mut h, 0x4003, "8.8.8.8:5000")));
    assert_eq!(h.relays.fast.len(), 1);
    h.advance(601);
    assert!(h.relays.fast.is_empty(), "the allocation expired");
}

#[test]
fn no_entries_over_tcp_with_caps_or_without_a_loaded_fast_path() {
    let mut h = fast_harness();
    let mut t = Client::new(tuple(Transport::Tcp, "203.0.113.5:40200"), "alice", "wonderland");
    t.allocate(&mut h);
    assert!(is_success(&t.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    assert!(
        h.relays.fast.is_empty(),
        "ChannelData over TCP stays in user space"
    );
    let mut capped = Harness::with(|c| {
        c.fast_path = true;
        c.max_bps = 10_000;
    });
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut capped);
    assert!(is_success(&c.bind(&mut capped, 0x4001, "8.8.8.8:5000")));
    assert!(capped.relays.fast.is_empty(), "caps are enforced in user space");
    let mut off = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut off);
    assert!(is_success(&c.bind(&mut off, 0x4001, "8.8.8.8:5000")));
    assert!(
        off.relays.fast.is_empty(),
        "no fast path loaded: nothing installed"
    );
}

#[test]
fn kernel_counts_join_the_allocation_stats() {
    let mut h = fast_harness();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    h.server
        .handle_fast_path_counts(h.now, udp(), (10, 1600), (7, 700));
    let s = &h.server.sessions(h.now)[0];
    assert_eq!(
        (
            s.stats.to_peer_packets,
            s.stats.to_peer_bytes,
            s.stats.from_peer_packets,
            s.stats.from_peer_bytes
        ),
        (10, 1600, 7, 700)
    );
}
