//! The brute-force guard: integrity failures per (account, source) and
//! per source, shared by every worker (and, in a fleet, by every node).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

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
    /// Keyed with random `seeds`, which a binary upgrade carries so the
    /// next process finds each (account, source) in the same slot.
    hasher: ahash::RandomState,
    seeds: [u64; 4],
    tables: Mutex<Option<GuardTables>>,
    /// Failures seen here, for a fleet to share ([`AuthGuard::share`]);
    /// `None` when not shared.
    outbox: Mutex<Option<Vec<SharedFailure>>>,
}

/// An [`AuthGuard`]'s tables as data, for a binary upgrade: the hasher's
/// seeds (slots are where the seeds put each key), the table size, and
/// the slots that hold failures or a block.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuardState {
    /// The hasher's keys.
    pub seeds: [u64; 4],
    /// Slots per table.
    pub slots: u32,
    /// (Account, source) slots.
    pub pairs: Vec<SlotState>,
    /// Source slots.
    pub sources: Vec<SlotState>,
}

/// One slot of a guard table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    /// Its index.
    pub slot: u32,
    /// Failures in the current window.
    pub failures: u32,
    /// How long ago the window started.
    pub window_age_ms: Option<u64>,
    /// What is left of a block.
    pub blocked_for_ms: Option<u64>,
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
        let random = std::collections::hash_map::RandomState::new();
        Self::with_seeds(
            limit,
            window,
            block,
            slots,
            [0u64, 1, 2, 3].map(|i| random.hash_one(i)),
        )
    }

    pub(super) fn with_seeds(
        limit: u32,
        window: Duration,
        block: Duration,
        slots: usize,
        seeds: [u64; 4],
    ) -> Self {
        AuthGuard {
            limit,
            window,
            block,
            slots: slots.max(1),
            hasher: ahash::RandomState::with_seeds(seeds[0], seeds[1], seeds[2], seeds[3]),
            seeds,
            tables: Mutex::new(None),
            outbox: Mutex::new(None),
        }
    }

    /// Its failures and blocks at `now`, for a binary upgrade's next
    /// process ([`AuthGuard::restored`]): an attacker blocked stays
    /// blocked across it. Times as what is left of them (or how long
    /// ago a window started).
    pub fn state(&self, now: Instant) -> GuardState {
        let export = |v: &[Strikes]| -> Vec<SlotState> {
            v.iter()
                .enumerate()
                .filter(|(_, s)| s.failures > 0 || s.blocked_until.is_some_and(|b| b > now))
                .map(|(i, s)| SlotState {
                    slot: i as u32,
                    failures: s.failures,
                    window_age_ms: s
                        .window_start
                        .map(|w| now.saturating_duration_since(w).as_millis() as u64),
                    blocked_for_ms: s
                        .blocked_until
                        .filter(|b| *b > now)
                        .map(|b| b.saturating_duration_since(now).as_millis() as u64),
                })
                .collect()
        };
        let tables = self.lock();
        GuardState {
            seeds: self.seeds,
            slots: self.slots as u32,
            pairs: tables.as_ref().map(|t| export(&t.pairs)).unwrap_or_default(),
            sources: tables.as_ref().map(|t| export(&t.sources)).unwrap_or_default(),
        }
    }

    /// A guard with these settings that goes on from `state` (another
    /// process's, at `now` here); a state of another table size, or with
    /// slots out of range, is not taken (the guard starts empty).
    pub fn restored(
        limit: u32,
        window: Duration,
        block: Duration,
        slots: usize,
        state: &GuardState,
        now: Instant,
    ) -> Self {
        let slots = slots.max(1);
        if state.slots as usize != slots
            || state
                .pairs
                .iter()
                .chain(&state.sources)
                .any(|s| s.slot as usize >= slots)
        {
            return Self::new(limit, window, block, slots);
        }
        let g = Self::with_seeds(limit, window, block, slots, state.seeds);
        if state.pairs.is_empty() && state.sources.is_empty() {
            return g;
        }
        // Nothing lasts a day here: longer is a damaged state.
        let day = Duration::from_secs(86_400);
        let ago = |ms: u64| now.checked_sub(Duration::from_millis(ms).min(day));
        let ahead = |ms: u64| now + Duration::from_millis(ms).min(day);
        let mut t = GuardTables {
            pairs: vec![Strikes::default(); slots].into_boxed_slice(),
            sources: vec![Strikes::default(); slots].into_boxed_slice(),
            last_checked: vec![None; slots].into_boxed_slice(),
        };
        for (table, list) in [(&mut t.pairs, &state.pairs), (&mut t.sources, &state.sources)] {
            for s in list {
                table[s.slot as usize] = Strikes {
                    failures: s.failures,
                    window_start: s.window_age_ms.and_then(ago),
                    blocked_until: s.blocked_for_ms.map(ahead),
                };
            }
        }
        *g.lock() = Some(t);
        g
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

    pub(super) fn slots(&self, n: usize, user: &[u8], ip: IpAddr) -> (usize, usize) {
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
