//! Abuse limits: token buckets, per-source rate limiting, brute-force
//! blocking and allocation quotas.
//!
//! The per-source tables are fixed-size arrays allocated once at start-up
//! and indexed by a keyed hash, so a flood from spoofed sources creates no
//! new state: collisions only make limits stricter for the colliding
//! sources, and the random hash key stops an attacker from aiming them.

use std::hash::Hash;
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

fn slot_of<K: Hash>(hasher: &impl std::hash::BuildHasher, key: K, len: usize) -> usize {
    (hasher.hash_one(key) as usize) % len
}

mod bandwidth;
mod guard;
mod quota;
mod source;
#[cfg(test)]
mod tests;

pub use bandwidth::{UserBandwidth, UserBuckets};
pub use guard::{AuthGuard, GuardState, SharedFailure, SlotState, Verdict};
pub use quota::{QuotaError, Quotas, RelayedAddrs};
pub use source::{SourceCounter, SourceLimiter};
