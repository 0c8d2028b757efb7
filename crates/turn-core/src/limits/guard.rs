//! The brute-force guard: integrity failures per (account, source) and
//! per source, shared by every worker (and, in a fleet, by every node).

use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::slot_of;

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
