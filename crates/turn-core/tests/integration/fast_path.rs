//! The kernel fast path's entries (issue 13), with fake time: installed
//! when a channel is bound, their expiry the earliest of the channel's,
//! the permission's and the relay's, moved by every refresh, removed with
//! the channel, the family and the allocation; none over TCP, none unless
//! the runtime says a fast path is loaded; under bandwidth caps, byte
//! budgets out of the same buckets user space spends from.

use crate::common;

use std::time::Duration;

use common::*;
use turn_core::{FastPathBudget, Transport};

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
    h.relays.ipv6 = Ipv6Relays::All;
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
fn no_entries_over_tcp_or_without_a_loaded_fast_path() {
    let mut h = fast_harness();
    let mut t = Client::new(tuple(Transport::Tcp, "203.0.113.5:40200"), "alice", "wonderland");
    t.allocate(&mut h);
    assert!(is_success(&t.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    assert!(
        h.relays.fast.is_empty(),
        "ChannelData over TCP stays in user space"
    );
    let mut off = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut off);
    assert!(is_success(&c.bind(&mut off, 0x4001, "8.8.8.8:5000")));
    assert!(
        off.relays.fast.is_empty(),
        "no fast path loaded: nothing installed"
    );
}

fn budget(h: &Harness, ch: u16) -> FastPathBudget {
    h.relays.fast[&(udp(), ch)].budget
}

#[test]
fn without_caps_entries_are_unlimited() {
    let mut h = fast_harness();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    assert_eq!(budget(&h, 0x4001), FastPathBudget::Unlimited);
    h.server.handle_fast_path_usage(h.now, udp(), 5000, 5000);
    h.drive();
    assert_eq!(budget(&h, 0x4001), FastPathBudget::Unlimited);
}

#[test]
fn under_a_cap_the_kernel_gets_the_buckets_tokens_and_user_space_none_of_them() {
    let mut h = Harness::with(|c| {
        c.fast_path = true;
        c.max_bps = 10_000;
    });
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relay = c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    assert_eq!(
        budget(&h, 0x4001),
        FastPathBudget::Keep,
        "nothing until the first grant"
    );
    // The first report: the whole (full) bucket goes to the kernel, and
    // the next second's refill with it (a token bucket allows burst +
    // rate × t).
    h.server.handle_fast_path_usage(h.now, udp(), 0, 0);
    h.drive();
    let grant = |up, down| FastPathBudget::Grant {
        to_peer: up,
        from_peer: down,
    };
    assert_eq!(budget(&h, 0x4001), grant(20_000, 20_000));
    // Past the kernel's budget a packet reaches user space, whose bucket
    // the kernel holds: dropped as over the cap, both ways.
    let dropped = h.server.counters().bandwidth_dropped;
    assert!(h.send(udp(), &channel_data(0x4001, &[7; 500])).is_none());
    assert!(h.peer_sends(relay, "8.8.8.8:5000", &[7; 500]).is_none());
    assert_eq!(h.server.counters().bandwidth_dropped, dropped + 2);
    // Half a second on, the kernel used 4000 of its 20000 bytes up and
    // all of them down. Up: 16000 come back (10000, the bucket's size)
    // and go out again with the refill from 1 s to 1.5 s (the refill to
    // 1 s was granted already). Down: only that refill is new.
    h.now += Duration::from_millis(500);
    h.server.handle_fast_path_usage(h.now, udp(), 4_000, 20_000);
    h.drive();
    assert_eq!(budget(&h, 0x4001), grant(15_000, 5_000));
    // Used beyond the grant (the instant between reading counts and
    // writing budgets) comes off the next one: 1000 over, down.
    h.now += Duration::from_millis(500);
    h.server.handle_fast_path_usage(h.now, udp(), 15_000, 6_000);
    h.drive();
    assert_eq!(budget(&h, 0x4001), grant(5_000, 4_000));
    // Two channels share the allocation's cap equally.
    assert!(is_success(&c.bind(&mut h, 0x4002, "8.8.4.4:5000")));
    h.now += Duration::from_millis(1000);
    h.server.handle_fast_path_usage(h.now, udp(), 5_000, 4_000);
    h.drive();
    for ch in [0x4001, 0x4002] {
        assert_eq!(budget(&h, ch), grant(5_000, 5_000));
    }
}

#[test]
fn a_users_cap_is_shared_by_its_allocations() {
    let mut h = Harness::with(|c| {
        c.fast_path = true;
        c.user_max_bps = 8_000;
    });
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let other = tuple(Transport::Udp, "203.0.113.5:40010");
    let mut d = Client::new(other, "alice", "wonderland");
    d.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    assert!(is_success(&d.bind(&mut h, 0x4001, "8.8.8.8:5001")));
    h.server.handle_fast_path_usage(h.now, udp(), 0, 0);
    h.server.handle_fast_path_usage(h.now, other, 0, 0);
    h.drive();
    let first = budget(&h, 0x4001);
    let second = h.relays.fast[&(other, 0x4001)].budget;
    // Each takes at most half of what the user's bucket holds when it
    // asks: 4000, then 2000 of the 4000 left. Never more than the cap.
    let total = |b: FastPathBudget| match b {
        FastPathBudget::Grant { to_peer, .. } => to_peer,
        other => panic!("{other:?}"),
    };
    assert_eq!((total(first), total(second)), (4_000, 2_000));
}

#[test]
fn kernel_counts_join_the_allocation_stats() {
    let mut h = fast_harness();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    assert!(h
        .server
        .handle_fast_path_counts(h.now, udp(), (10, 1600), (7, 700)));
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

#[test]
fn counts_for_a_deleted_allocation_join_the_totals() {
    let mut h = fast_harness();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4001, "8.8.8.8:5000")));
    c.refresh(&mut h, Some(0));
    let before = h.server.counters().to_peer_packets;
    assert!(!h.server.handle_fast_path_counts(h.now, udp(), (3, 300), (0, 0)));
    assert_eq!(h.server.counters().to_peer_packets, before + 3);
}
