//! Per-source limits shared by every worker: the answer budget for
//! unauthenticated requests and the connection count per source IP.

use std::collections::hash_map::RandomState;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use super::slot_of;

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
    pub(super) len: usize,
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
