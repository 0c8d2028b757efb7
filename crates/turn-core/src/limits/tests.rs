//! Unit tests of the limits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

#[test]
fn a_fleet_counts_other_nodes_allocations_against_the_user_quota() {
    let q = Quotas::new(2, 0);
    let alice: Arc<str> = Arc::from("alice");
    q.acquire(&alice).unwrap();
    assert_eq!(q.held_here(), vec![("alice".to_owned(), 1)]);
    // Another node holds one of alice's: the second here is refused.
    q.set_elsewhere(HashMap::from([("alice".to_owned(), 1)]));
    assert_eq!(q.acquire(&alice), Err(QuotaError::User));
    assert_eq!(q.of_user("alice"), 1, "the refusal took nothing");
    // Bob is not affected; and when the other node lets go, alice may.
    q.acquire(&Arc::from("bob")).unwrap();
    q.set_elsewhere(HashMap::new());
    q.acquire(&alice).unwrap();
    assert_eq!(q.acquire(&alice), Err(QuotaError::User));
}

#[test]
fn a_fleet_total_counts_every_node() {
    let q = Quotas::new(0, 10);
    q.set_fleet_limit(3);
    q.acquire(&Arc::from("a")).unwrap();
    q.set_elsewhere(HashMap::from([("b".to_owned(), 1), ("c".to_owned(), 1)]));
    assert_eq!(
        q.acquire(&Arc::from("d")),
        Err(QuotaError::Total),
        "1 here + 2 elsewhere"
    );
    assert_eq!(q.total(), 1);
    q.set_fleet_limit(0);
    q.acquire(&Arc::from("d")).unwrap();
}

/// A guard whose hasher has fixed keys: the tests that check one user or
/// source is unaffected by another must not depend on two random keys
/// putting them in one slot (1 in 64 with 64 slots).
fn seeded(limit: u32, slots: usize) -> AuthGuard {
    let g = AuthGuard::with_seeds(
        limit,
        Duration::from_secs(60),
        Duration::from_secs(300),
        slots,
        [1, 2, 3, 4],
    );
    assert_ne!(
        g.slots(slots, b"alice", "192.0.2.7".parse().unwrap()).0,
        g.slots(slots, b"bob", "192.0.2.7".parse().unwrap()).0,
        "these keys put alice and bob in one slot: pick others"
    );
    g
}

#[test]
fn shared_failures_are_handed_out_once_and_imported_ones_count_but_are_not_shared_again() {
    let t0 = Instant::now();
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let g = seeded(4, 64);
    g.failed(b"alice", ip, t0);
    assert!(g.take_shared().is_empty(), "not shared until asked");
    g.share();
    g.failed(b"alice", ip, t0);
    assert_eq!(g.take_shared(), vec![(b"alice".to_vec(), ip)]);
    assert!(g.take_shared().is_empty());
    // Two failures elsewhere reach the limit of 4 here.
    assert!(!g.failed_elsewhere(b"alice", ip, t0));
    assert!(g.failed_elsewhere(b"alice", ip, t0), "the fourth failure blocks");
    assert!(g.take_shared().is_empty(), "imports are not sent back");
    assert_eq!(g.verdict(b"alice", ip, t0), Verdict::Blocked);
    assert_eq!(g.verdict(b"bob", ip, t0), Verdict::Check);
}

#[test]
fn a_reservation_ahead_and_user_space_together_stay_within_the_bucket() {
    // Rate 1000/s, burst 1000. Every 0.25 s user space tries to take
    // 600; every second a reservation takes what is held and the
    // next second's refill, and gives back half of it a second later.
    let t0 = Instant::now();
    let mut b = Bucket::new();
    let (mut spent, mut reserved) = (0u64, 0u64);
    for step in 0..40u64 {
        let now = t0 + Duration::from_millis(250 * step);
        if step % 4 == 0 {
            b.refund(reserved / 2, 1000);
            spent += reserved - reserved / 2;
            reserved = b.reserve_ahead(now, 1000, 1000, Duration::from_secs(1));
        }
        if b.take(now, 1000, 1000, 600) {
            spent += 600;
        }
        // Never more than burst + rate × elapsed, reservations
        // counted whole.
        let elapsed_ms = 250 * step;
        assert!(
            spent + reserved <= 1000 + elapsed_ms + 1000,
            "step {step}: {spent} + {reserved}"
        );
    }
    assert!(spent >= 9_000, "the bucket still passes its rate: {spent}");
}

#[test]
fn bucket_refills_at_rate() {
    let t0 = Instant::now();
    let mut b = Bucket::new();
    assert!(b.take(t0, 10, 20, 20));
    assert!(!b.take(t0, 10, 20, 1));
    assert!(b.take(t0 + Duration::from_millis(100), 10, 20, 1));
    assert!(!b.take(t0 + Duration::from_millis(100), 10, 20, 1));
    assert!(
        b.take(t0 + Duration::from_secs(10), 10, 20, 20),
        "refills to the burst"
    );
    assert!(!b.take(t0 + Duration::from_secs(10), 10, 20, 1));
}

#[test]
fn source_limiter_is_per_ip_and_can_be_off() {
    let t0 = Instant::now();
    let l = SourceLimiter::new(5, 1024);
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "192.0.2.2".parse().unwrap();
    let allowed = (0..100).filter(|_| l.allow(a, t0)).count();
    assert_eq!(allowed, 10, "burst of twice the rate");
    assert!(l.allow(b, t0) || l.len < 2, "another source is unaffected");
    assert!(l.allow(a, t0 + Duration::from_secs(1)));
    let off = SourceLimiter::new(0, 1024);
    assert!((0..10_000).all(|_| off.allow(a, t0)));
}

#[test]
fn auth_guard_slows_then_blocks_the_pair_only() {
    let t0 = Instant::now();
    let g = seeded(6, 4096);
    let ip: IpAddr = "198.51.100.9".parse().unwrap();
    let other: IpAddr = "198.51.100.10".parse().unwrap();
    for _ in 0..3 {
        assert_eq!(g.verdict(b"alice", ip, t0), Verdict::Check);
        assert!(!g.failed(b"alice", ip, t0));
    }
    // Half the limit reached: one check per second.
    assert_eq!(g.verdict(b"alice", ip, t0), Verdict::Check);
    assert_eq!(g.verdict(b"alice", ip, t0), Verdict::Throttled);
    let mut t = t0;
    let mut blocked = false;
    for _ in 0..3 {
        t += Duration::from_secs(1);
        assert_eq!(g.verdict(b"alice", ip, t), Verdict::Check);
        blocked = g.failed(b"alice", ip, t);
    }
    assert!(blocked, "sixth failure blocks");
    assert_eq!(g.verdict(b"alice", ip, t), Verdict::Blocked);
    assert_eq!(
        g.verdict(b"alice", other, t),
        Verdict::Check,
        "same user elsewhere"
    );
    assert_eq!(
        g.verdict(b"bob", ip, t),
        Verdict::Check,
        "another user from the same source"
    );
    assert_eq!(
        g.verdict(b"alice", ip, t + Duration::from_secs(301)),
        Verdict::Check,
        "block ends"
    );
}

#[test]
fn a_clock_slightly_behind_refills_nothing() {
    // Two workers, one with a clock read a millisecond earlier: the
    // late one must not see a wrapped, month-long gap.
    let t0 = Instant::now();
    let l = SourceLimiter::new(20, 1024);
    let ip: IpAddr = "192.0.2.8".parse().unwrap();
    let ahead = t0 + Duration::from_millis(1001);
    let behind = t0 + Duration::from_millis(1000);
    let mut got = 0;
    for i in 0..200 {
        if l.allow(ip, if i % 2 == 0 { ahead } else { behind }) {
            got += 1;
        }
    }
    assert_eq!(got, 40, "one burst, whichever worker's clock is read");
}

#[test]
fn source_limiter_is_one_budget_for_every_thread() {
    let l = Arc::new(SourceLimiter::new(50, 1024));
    let t0 = Instant::now();
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let got: usize = (0..4)
        .map(|_| {
            let l = l.clone();
            std::thread::spawn(move || (0..1000).filter(|_| l.allow(ip, t0)).count())
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|h| h.join().unwrap())
        .sum();
    assert_eq!(got, 100, "one burst (twice the rate) across four threads");
}

#[test]
fn source_counter_caps_each_source() {
    let c = SourceCounter::new(4096);
    let a: IpAddr = "192.0.2.1".parse().unwrap();
    let b: IpAddr = "2001:db8::1".parse().unwrap();
    assert_eq!((0..10).filter(|_| c.try_acquire(a, 3)).count(), 3);
    assert!(c.try_acquire(b, 3), "another source has its own count");
    c.release(a);
    assert!(c.try_acquire(a, 3));
    assert_eq!(c.count(a), 3);
    c.release(b);
    c.release(b);
    assert_eq!(c.count(b), 0, "never below zero");
}

#[test]
fn quotas_per_user_and_total() {
    let q = Quotas::new(2, 3);
    let a: Arc<str> = Arc::from("a");
    let b: Arc<str> = Arc::from("b");
    assert!(q.acquire(&a).is_ok());
    assert!(q.acquire(&a).is_ok());
    assert_eq!(q.acquire(&a), Err(QuotaError::User));
    assert!(q.acquire(&b).is_ok());
    assert_eq!(q.acquire(&b), Err(QuotaError::Total));
    q.release("a");
    assert!(q.acquire(&b).is_ok());
    assert_eq!((q.total(), q.of_user("a"), q.of_user("b")), (3, 1, 2));
    let unlimited = Quotas::new(0, 0);
    assert!((0..1000).all(|_| unlimited.acquire(&a).is_ok()));
}

/// A binary upgrade carries the guard: a block and a count in progress
/// go on in the next process (through JSON, as they cross), with the
/// time left; a state of another table size is not taken.
#[test]
fn a_block_survives_the_guard_being_carried_to_another_process() {
    let t0 = Instant::now();
    let (ip, other): (IpAddr, IpAddr) = ("192.0.2.7".parse().unwrap(), "192.0.2.8".parse().unwrap());
    let (window, block) = (Duration::from_secs(60), Duration::from_secs(300));
    let g = seeded(4, 4096);
    for _ in 0..4 {
        g.failed(b"alice", ip, t0);
    }
    g.failed(b"bob", other, t0);
    g.failed(b"bob", other, t0);
    let state: GuardState =
        serde_json::from_str(&serde_json::to_string(&g.state(t0 + Duration::from_secs(10))).unwrap())
            .unwrap();
    // The next process's clock: another origin.
    let t1 = Instant::now() + Duration::from_secs(1000);
    let next = AuthGuard::restored(4, window, block, 4096, &state, t1);
    assert_eq!(next.verdict(b"alice", ip, t1), Verdict::Blocked);
    assert_eq!(next.verdict(b"carol", other, t1), Verdict::Check);
    // 290 s of the block were left.
    assert_eq!(
        next.verdict(b"alice", ip, t1 + Duration::from_secs(289)),
        Verdict::Blocked
    );
    assert_eq!(
        next.verdict(b"alice", ip, t1 + Duration::from_secs(291)),
        Verdict::Check
    );
    // Bob's two failures, 10 s into their window, count: two more block
    // him.
    next.failed(b"bob", other, t1);
    assert!(next.failed(b"bob", other, t1), "the fourth failure blocks");
    // Another table size: an empty guard.
    let small = AuthGuard::restored(4, window, block, 64, &state, t1);
    assert_eq!(small.verdict(b"alice", ip, t1), Verdict::Check);
    // A slot out of range: refused whole.
    let mut bad = state.clone();
    bad.pairs.push(SlotState {
        slot: 4096,
        ..Default::default()
    });
    let empty = AuthGuard::restored(4, window, block, 4096, &bad, t1);
    assert_eq!(empty.verdict(b"alice", ip, t1), Verdict::Check);
}
