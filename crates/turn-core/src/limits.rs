//! Abuse limits: token buckets, per-source rate limiting, brute-force
//! blocking and allocation quotas.
//!
//! The per-source tables are fixed-size arrays allocated once at start-up
//! and indexed by a keyed hash, so a flood from spoofed sources creates no
//! new state: collisions only make limits stricter for the colliding
//! sources, and the random hash key stops an attacker from aiming them.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `rate` tokens per second, holding at most `burst`.
/// Integer arithmetic in nanotokens, so small rates stay exact.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    nanotokens: u64,
    last: Option<Instant>,
}

impl Bucket {
    /// A full bucket (the first burst is allowed).
    pub const fn new() -> Self {
        Bucket {
            nanotokens: u64::MAX,
            last: None,
        }
    }

    /// Takes `n` tokens if available; refills first.
    pub fn take(&mut self, now: Instant, rate: u64, burst: u64, n: u64) -> bool {
        let cap = burst.saturating_mul(1_000_000_000);
        let refill = match self.last {
            None => cap,
            // Refills up to a time already claimed (`reserve_ahead`) are
            // not made again.
            Some(t) if t > now => return self.spend_if_held(n),
            Some(t) => {
                let dt = now.saturating_duration_since(t).as_nanos().min(u64::MAX as u128) as u64;
                dt.saturating_mul(rate)
            }
        };
        self.last = Some(now);
        self.nanotokens = self.nanotokens.saturating_add(refill).min(cap);
        self.spend_if_held(n)
    }

    fn spend_if_held(&mut self, n: u64) -> bool {
        let need = n.saturating_mul(1_000_000_000);
        if self.nanotokens >= need {
            self.nanotokens -= need;
            true
        } else {
            false
        }
    }

    /// Takes everything held now and everything the next `ahead` will
    /// refill: the tokens for someone who spends them on its own until
    /// then (the kernel fast path). Until `now + ahead` the bucket
    /// refills nothing; what comes back early is [`Bucket::refund`]ed.
    pub fn reserve_ahead(&mut self, now: Instant, rate: u64, burst: u64, ahead: Duration) -> u64 {
        let held = self.available(now, rate, burst);
        self.nanotokens = 0;
        // From where earlier claims end (or now) to `now + ahead`.
        let from = self.last.map_or(now, |t| t.max(now));
        let until = (now + ahead).max(from);
        self.last = Some(until);
        let claim = until.duration_since(from).as_nanos().min(u64::MAX as u128) as u64;
        held.saturating_add(claim.saturating_mul(rate) / 1_000_000_000)
    }
}

impl Bucket {
    /// Refills, then the whole tokens held: what may be spent now (a
    /// stream relay reads at most this much, instead of dropping).
    pub fn available(&mut self, now: Instant, rate: u64, burst: u64) -> u64 {
        let _ = self.take(now, rate, burst, 0);
        self.nanotokens / 1_000_000_000
    }

    /// Spends `n` tokens (at most what is held).
    pub fn spend(&mut self, n: u64) {
        self.nanotokens = self.nanotokens.saturating_sub(n.saturating_mul(1_000_000_000));
    }

    /// Gives back `n` tokens taken earlier and not used (up to `burst`).
    pub fn refund(&mut self, n: u64, burst: u64) {
        self.nanotokens = self
            .nanotokens
            .saturating_add(n.saturating_mul(1_000_000_000))
            .min(burst.saturating_mul(1_000_000_000));
    }
}

impl Default for Bucket {
    fn default() -> Self {
        Self::new()
    }
}

fn slot_of<K: Hash>(hasher: &RandomState, key: K, len: usize) -> usize {
    (hasher.hash_one(key) as usize) % len
}

/// Rate limit on responses to unauthenticated requests, per source IP
/// (RFC 8489 §17 reflection concerns), shared by every worker so a source
/// spread over many ports (and so over many workers) gets one budget.
///
/// A fixed table of lock-free buckets: each slot is one `AtomicU64` holding
/// the time of its last refill (milliseconds since the table was made, low
/// 32 bits) and its tokens (sixteenths, 32 bits), updated by compare and
/// swap. Workers read the clock once per batch, so one may carry a time a
/// little behind the one stored: a time up to [`CLOCK_SKEW_MS`] in the past
/// refills nothing (read as "now") instead of wrapping into a full bucket.
/// A slot untouched for 49 days sees a wrapped clock: its next answer may
/// find the bucket short, once.
pub struct SourceLimiter {
    rate: u64,
    burst: u64,
    origin: Instant,
    hasher: RandomState,
    len: usize,
    /// Made on first use (512 KiB at the default size): a configuration
    /// built and then replaced costs nothing.
    slots: std::sync::OnceLock<Box<[AtomicU64]>>,
}

impl std::fmt::Debug for SourceLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceLimiter").field("rate", &self.rate).finish()
    }
}

/// Sixteenths of a token: integer refill stays exact enough at low rates.
const TOKEN: u64 = 16;
/// A slot never written: a full bucket.
const FRESH: u64 = u64::MAX;
/// How far behind the stored time a worker's clock may be and still be
/// read as the stored time (batches take microseconds; this is generous).
const CLOCK_SKEW_MS: u32 = 60_000;

impl SourceLimiter {
    /// `rate` answers per second per source (0 turns the limit off), burst
    /// twice that, in a table of `slots` buckets.
    pub fn new(rate: u32, slots: usize) -> Self {
        let n = if rate == 0 { 1 } else { slots.max(1) };
        SourceLimiter {
            rate: rate as u64,
            burst: (rate as u64)
                .saturating_mul(2)
                .clamp(1, (u32::MAX as u64) / TOKEN),
            origin: Instant::now(),
            hasher: RandomState::new(),
            len: n,
            slots: std::sync::OnceLock::new(),
        }
    }

    /// The configured rate (answers per second; 0: off).
    pub fn rate(&self) -> u32 {
        self.rate as u32
    }

    /// Whether an answer to `ip` may be sent now; takes one token if so.
    pub fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        if self.rate == 0 {
            return true;
        }
        let slots = self
            .slots
            .get_or_init(|| (0..self.len).map(|_| AtomicU64::new(FRESH)).collect());
        let slot = &slots[slot_of(&self.hasher, ip, self.len)];
        let now_ms = now.saturating_duration_since(self.origin).as_millis() as u64 as u32;
        let cap = self.burst * TOKEN;
        let mut cur = slot.load(Ordering::Relaxed);
        loop {
            let mut stamp = now_ms;
            let tokens = if cur == FRESH {
                cap
            } else {
                let (last, tokens) = ((cur >> 32) as u32, cur & 0xFFFF_FFFF);
                let elapsed = now_ms.wrapping_sub(last);
                if elapsed > u32::MAX - CLOCK_SKEW_MS {
                    // Another worker's clock is ahead: nothing to refill,
                    // and the stored time stays (it must not go back).
                    stamp = last;
                    tokens.min(cap)
                } else {
                    (tokens + elapsed as u64 * self.rate * TOKEN / 1000).min(cap)
                }
            };
            if tokens < TOKEN {
                return false;
            }
            let next = (stamp as u64) << 32 | (tokens - TOKEN);
            match slot.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Strikes {
    failures: u32,
    window_start: Option<Instant>,
    blocked_until: Option<Instant>,
}

/// What the brute-force guard says about an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Check the credentials.
    Check,
    /// Slowed down: this attempt is not checked (one per second is).
    Throttled,
    /// Blocked for a while: not checked.
    Blocked,
}

struct GuardTables {
    pairs: Box<[Strikes]>,
    sources: Box<[Strikes]>,
    last_checked: Box<[Option<Instant>]>,
}

/// Counts integrity failures per (account, source IP) pair and per source
/// IP, for every worker at once. Past half the limit within the window,
/// attempts are checked at most once a second; at the limit the pair (or
/// the source, at five times the limit) is blocked for `block`. Other users,
/// and the same user from elsewhere, are unaffected.
///
/// The account is the resolved username (USERNAME, or the name a USERHASH
/// stands for), so both ways of naming a user count together. One mutex
/// guards the tables: it is taken only for authenticated requests (a few
/// per allocation), never for relayed data. The tables (about 100 bytes a
/// slot) are made on the first failure, so a configuration that is built
/// and replaced, or a server that never sees a wrong password, pays
/// nothing for them.
pub struct AuthGuard {
    limit: u32,
    window: Duration,
    block: Duration,
    slots: usize,
    hasher: RandomState,
    tables: Mutex<Option<GuardTables>>,
    /// Failures seen here, for a fleet to share ([`AuthGuard::share`]);
    /// `None` when not shared.
    outbox: Mutex<Option<Vec<SharedFailure>>>,
}

/// A failure to tell the fleet: the account (resolved username) and source.
pub type SharedFailure = (Vec<u8>, IpAddr);

/// Failures queued for the fleet at most; past it the oldest are dropped
/// (the fleet then learns of a flood a little late, never of nothing).
const OUTBOX_MAX: usize = 4096;

impl std::fmt::Debug for AuthGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthGuard").field("limit", &self.limit).finish()
    }
}

impl AuthGuard {
    /// `limit` failures within `window` block for `block`; 0 disables.
    pub fn new(limit: u32, window: Duration, block: Duration, slots: usize) -> Self {
        AuthGuard {
            limit,
            window,
            block,
            slots: slots.max(1),
            hasher: RandomState::new(),
            tables: Mutex::new(None),
            outbox: Mutex::new(None),
        }
    }

    /// Keeps the failures seen from now on for [`AuthGuard::take_shared`],
    /// so that a fleet's nodes count every node's failures.
    pub fn share(&self) {
        let mut o = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        o.get_or_insert_with(Vec::new);
    }

    /// The failures seen here since the last call (account, source).
    pub fn take_shared(&self) -> Vec<SharedFailure> {
        let mut o = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
        o.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Counts a failure another node saw, as if seen here (and not shared
    /// again); true if it started a block.
    pub fn failed_elsewhere(&self, user: &[u8], ip: IpAddr, now: Instant) -> bool {
        self.record(user, ip, now)
    }

    /// The configured failure limit (0: off) and block time.
    pub fn settings(&self) -> (u32, Duration) {
        (self.limit, self.block)
    }

    fn slots(&self, n: usize, user: &[u8], ip: IpAddr) -> (usize, usize) {
        (slot_of(&self.hasher, (user, ip), n), slot_of(&self.hasher, ip, n))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<GuardTables>> {
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether to check this attempt.
    pub fn verdict(&self, user: &[u8], ip: IpAddr, now: Instant) -> Verdict {
        if self.limit == 0 {
            return Verdict::Check;
        }
        let mut guard = self.lock();
        // No table yet: no failure was ever recorded.
        let Some(t) = guard.as_mut() else {
            return Verdict::Check;
        };
        let (p, s) = self.slots(t.pairs.len(), user, ip);
        for st in [&t.pairs[p], &t.sources[s]] {
            if st.blocked_until.is_some_and(|t| t > now) {
                return Verdict::Blocked;
            }
        }
        let pair = t.pairs[p];
        let in_window = pair
            .window_start
            .is_some_and(|w| now.saturating_duration_since(w) < self.window);
        if in_window && pair.failures >= self.limit.div_ceil(2) {
            if t.last_checked[p].is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1)) {
                return Verdict::Throttled;
            }
            t.last_checked[p] = Some(now);
        }
        Verdict::Check
    }

    /// Records a failed check; returns true if this failure started a block.
    pub fn failed(&self, user: &[u8], ip: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        {
            let mut o = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(q) = o.as_mut() {
                if q.len() >= OUTBOX_MAX {
                    q.remove(0);
                }
                q.push((user.to_vec(), ip));
            }
        }
        self.record(user, ip, now)
    }

    fn record(&self, user: &[u8], ip: IpAddr, now: Instant) -> bool {
        if self.limit == 0 {
            return false;
        }
        let mut guard = self.lock();
        let n = self.slots;
        let t = guard.get_or_insert_with(|| GuardTables {
            pairs: vec![Strikes::default(); n].into_boxed_slice(),
            sources: vec![Strikes::default(); n].into_boxed_slice(),
            last_checked: vec![None; n].into_boxed_slice(),
        });
        let (p, s) = self.slots(t.pairs.len(), user, ip);
        let mut started = false;
        let GuardTables { pairs, sources, .. } = t;
        for (st, limit) in [
            (&mut pairs[p], self.limit),
            (&mut sources[s], self.limit.saturating_mul(5)),
        ] {
            if st
                .window_start
                .is_none_or(|w| now.saturating_duration_since(w) >= self.window)
            {
                st.window_start = Some(now);
                st.failures = 0;
            }
            st.failures += 1;
            if st.failures >= limit && st.blocked_until.is_none_or(|t| t <= now) {
                st.blocked_until = Some(now + self.block);
                st.failures = 0;
                st.window_start = None;
                started = true;
            }
        }
        started
    }

    /// Records a success: the pair's count starts over.
    pub fn succeeded(&self, user: &[u8], ip: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let mut guard = self.lock();
        let Some(t) = guard.as_mut() else {
            return;
        };
        let (p, _) = self.slots(t.pairs.len(), user, ip);
        t.pairs[p] = Strikes::default();
    }
}

/// Counts something per source IP across workers (TCP/TLS connections), in
/// a fixed table of atomic counters indexed by a keyed hash: a flood from
/// many addresses creates no state, and a collision only makes the cap
/// stricter for the two sources that share a slot.
pub struct SourceCounter {
    hasher: RandomState,
    slots: Box<[AtomicU32]>,
}

impl std::fmt::Debug for SourceCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceCounter")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl SourceCounter {
    /// A table of `slots` counters.
    pub fn new(slots: usize) -> Self {
        SourceCounter {
            hasher: RandomState::new(),
            slots: (0..slots.max(1)).map(|_| AtomicU32::new(0)).collect(),
        }
    }

    fn slot(&self, ip: IpAddr) -> &AtomicU32 {
        &self.slots[slot_of(&self.hasher, ip, self.slots.len())]
    }

    /// Takes one for `ip` if it holds fewer than `max` (0: no cap).
    pub fn try_acquire(&self, ip: IpAddr, max: u32) -> bool {
        let slot = self.slot(ip);
        if max == 0 {
            slot.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
    }

    /// Gives one back for `ip`.
    pub fn release(&self, ip: IpAddr) {
        let _ = self
            .slot(ip)
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// How many `ip` holds (with whatever shares its slot).
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.slot(ip).load(Ordering::Relaxed)
    }
}

/// Why an allocation was refused by a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum QuotaError {
    /// The user's allocation quota is reached (486).
    User,
    /// The server's total is reached (508).
    Total,
}

/// Allocation quotas shared by every worker. Touched only when allocations
/// are created or deleted, never per packet.
#[derive(Debug, Default)]
pub struct Quotas {
    user_limit: AtomicUsize,
    total_limit: AtomicUsize,
    total: AtomicUsize,
    per_user: Mutex<HashMap<Arc<str>, usize>>,
    /// Allocations other nodes of a fleet hold, per user, as last heard
    /// (empty without a fleet).
    elsewhere: Mutex<HashMap<String, usize>>,
    /// Their sum, and the fleet's total limit (0: none).
    elsewhere_total: AtomicUsize,
    fleet_limit: AtomicUsize,
}

impl Quotas {
    /// Limits; 0 means unlimited.
    pub fn new(user_limit: usize, total_limit: usize) -> Self {
        Quotas {
            user_limit: AtomicUsize::new(user_limit),
            total_limit: AtomicUsize::new(total_limit),
            ..Default::default()
        }
    }

    /// Changes the limits (reload); allocations already held stay.
    pub fn set_limits(&self, user_limit: usize, total_limit: usize) {
        self.user_limit.store(user_limit, Ordering::SeqCst);
        self.total_limit.store(total_limit, Ordering::SeqCst);
    }

    /// Takes one allocation for `user`.
    pub fn acquire(&self, user: &Arc<str>) -> Result<(), QuotaError> {
        let (user_limit, total_limit) = (
            self.user_limit.load(Ordering::SeqCst),
            self.total_limit.load(Ordering::SeqCst),
        );
        let prev = self.total.fetch_add(1, Ordering::SeqCst);
        let fleet_limit = self.fleet_limit.load(Ordering::SeqCst);
        let fleet_full =
            fleet_limit != 0 && prev + self.elsewhere_total.load(Ordering::SeqCst) >= fleet_limit;
        if (total_limit != 0 && prev >= total_limit) || fleet_full {
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(QuotaError::Total);
        }
        let others = if user_limit != 0 {
            let e = self.elsewhere.lock().unwrap_or_else(|p| p.into_inner());
            e.get(&**user).copied().unwrap_or(0)
        } else {
            0
        };
        let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(user.clone()).or_insert(0);
        if user_limit != 0 && *n + others >= user_limit {
            if *n == 0 {
                m.remove(user);
            }
            self.total.fetch_sub(1, Ordering::SeqCst);
            return Err(QuotaError::User);
        }
        *n += 1;
        Ok(())
    }

    /// Gives back one allocation of `user`.
    pub fn release(&self, user: &str) {
        self.total.fetch_sub(1, Ordering::SeqCst);
        let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                m.remove(user);
            }
        }
    }

    /// Allocations held across all workers.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    /// Allocations per user held here (what a fleet node tells the others).
    pub fn held_here(&self) -> Vec<(String, usize)> {
        let m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(u, n)| (u.to_string(), *n)).collect()
    }

    /// What the other nodes of a fleet hold, per user: counted against
    /// the user quota from now on (replacing what was heard before).
    pub fn set_elsewhere(&self, counts: HashMap<String, usize>) {
        self.elsewhere_total
            .store(counts.values().sum(), Ordering::SeqCst);
        *self.elsewhere.lock().unwrap_or_else(|p| p.into_inner()) = counts;
    }

    /// The fleet's total limit (0: none): allocations here and elsewhere
    /// together, refused with 508 past it.
    pub fn set_fleet_limit(&self, limit: usize) {
        self.fleet_limit.store(limit, Ordering::SeqCst);
    }

    /// Allocations `user` holds.
    pub fn of_user(&self, user: &str) -> usize {
        let m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        m.get(user).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
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

    #[test]
    fn shared_failures_are_handed_out_once_and_imported_ones_count_but_are_not_shared_again() {
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let g = AuthGuard::new(4, Duration::from_secs(60), Duration::from_secs(300), 64);
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
        let g = AuthGuard::new(6, Duration::from_secs(60), Duration::from_secs(300), 4096);
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
}

/// The relayed addresses of every allocation on this host, shared by all
/// workers. A peer that is one of them is another client's relay on this
/// same server (both legs of a call through one server, or `turnpike probe`
/// against a fresh install): it is allowed even in a range the policy
/// refuses by default (a private or loopback relay address), since the
/// packet can only reach that allocation, which forwards it to its client
/// only with a permission. Written on allocation and deletion, read only
/// when the default ranges would refuse a peer: never on the relay path.
#[derive(Debug, Default)]
pub struct RelayedAddrs(std::sync::Mutex<std::collections::HashSet<std::net::SocketAddr>>);

impl RelayedAddrs {
    fn set(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<std::net::SocketAddr>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A relay socket of an allocation opened at `addr`.
    pub fn insert(&self, addr: std::net::SocketAddr) {
        self.set().insert(addr);
    }

    /// The relay socket at `addr` closed.
    pub fn remove(&self, addr: &std::net::SocketAddr) {
        self.set().remove(addr);
    }

    /// Whether `addr` is a live allocation's relayed address on this host.
    pub fn contains(&self, addr: &std::net::SocketAddr) -> bool {
        self.set().contains(addr)
    }
}
