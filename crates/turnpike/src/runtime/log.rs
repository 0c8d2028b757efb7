//! Log lines for the core's events, and `--redact`.

use std::time::{Duration, Instant};

use tracing::{info, warn};
use turn_core::{ErrorCode, Event};

use super::worker::Worker;

/// Hides client-identifying values in logs (`--redact`): each value becomes
/// a short keyed hash, stable for the process's life, so lines about one
/// client still correlate but the address or name is not written down.
#[derive(Clone)]
pub struct Redactor {
    pub(super) key: Option<u64>,
}

impl Redactor {
    /// `on`: redact with a fresh random key.
    pub fn new(on: bool) -> Self {
        Redactor {
            key: on.then(rand::random),
        }
    }

    /// What refused a request, its peer address redacted like the rest.
    pub fn show_detail(&self, d: &turn_core::RefusalDetail) -> String {
        match d {
            turn_core::RefusalDetail::Peer(peer, why) => format!("peer {} {why}", self.show(peer)),
            other => other.to_string(),
        }
    }

    /// The value, or its redacted stand-in.
    pub fn show(&self, v: &dyn std::fmt::Display) -> String {
        match self.key {
            None => v.to_string(),
            Some(k) => {
                use std::hash::{BuildHasher, Hasher};
                let mut h = ahash::RandomState::with_seeds(k, k ^ 0x9E37_79B9, 7, 11).build_hasher();
                h.write(v.to_string().as_bytes());
                format!("redacted:{:08x}", h.finish() as u32)
            }
        }
    }
}

/// The per-second budget of refusal log lines (`--log-refusals-per-second`,
/// per worker): the rest are counted and summed up in one line, so a flood
/// cannot fill a disk with logs.
pub(super) struct RefusalLog {
    per_second: u32,
    window: Instant,
    logged: u32,
    suppressed: [u64; ErrorCode::ALL.len()],
}

impl RefusalLog {
    pub(super) fn new(per_second: u32) -> Self {
        RefusalLog {
            per_second,
            window: Instant::now(),
            logged: 0,
            suppressed: [0; ErrorCode::ALL.len()],
        }
    }

    /// Whether a refusal with `code` is logged in full now.
    fn admit(&mut self, now: Instant, code: ErrorCode) -> bool {
        if now.saturating_duration_since(self.window) >= Duration::from_secs(1) {
            self.flush(now);
        }
        if self.logged < self.per_second {
            self.logged += 1;
            return true;
        }
        self.suppressed[code.index()] += 1;
        false
    }

    /// Logs the sum of what was not logged in the last window, and starts
    /// a new one (called at least once a second by the worker's sweep).
    pub(super) fn flush(&mut self, now: Instant) {
        let total: u64 = self.suppressed.iter().sum();
        if total > 0 {
            let by_code = ErrorCode::ALL
                .iter()
                .zip(self.suppressed)
                .filter(|(_, n)| *n > 0)
                .map(|(c, n)| format!("{}x{n}", c.code()))
                .collect::<Vec<_>>()
                .join(" ");
            warn!(
                more = total,
                codes = %by_code,
                "requests refused: {total} more like the ones above in the last second"
            );
        }
        self.window = now;
        self.logged = 0;
        self.suppressed = [0; ErrorCode::ALL.len()];
    }
}

impl Worker {
    pub(super) fn log_events(&mut self) {
        let now = Instant::now();
        // Commands still queued (an admin delete's entry removals) first,
        // so a deletion's line has the kernel's last counts.
        self.drive_core(now);
        while let Some(ev) = self.core.poll_event() {
            self.event_records(&ev);
            let r = &self.redact;
            match ev {
                Event::AllocationCreated {
                    tuple,
                    username,
                    relayed,
                    additional,
                    lifetime,
                } => info!(
                    client = %r.show(&tuple.client),
                    server = %tuple.server,
                    transport = tuple.transport.as_str(),
                    user = ?r.show(&username),
                    relayed = %relayed,
                    relayed_additional = ?additional,
                    lifetime_s = lifetime.as_secs(),
                    "allocation created"
                ),
                Event::AllocationDeleted {
                    tuple,
                    username,
                    relayed,
                    reason,
                    mut stats,
                    age,
                } => {
                    // Its RFC 6062 pairs' bytes were for its usage record.
                    self.pairs.forget_control(tuple);
                    // What the kernel forwarded in its last moments.
                    if let Some(c) = self.fast.closed.remove(&tuple) {
                        stats.to_peer_packets += c.to_peer_packets;
                        stats.to_peer_bytes += c.to_peer_bytes;
                        stats.from_peer_packets += c.from_peer_packets;
                        stats.from_peer_bytes += c.from_peer_bytes;
                    }
                    info!(
                    client = %r.show(&tuple.client),
                    transport = tuple.transport.as_str(),
                    user = ?r.show(&username),
                    relayed = %relayed,
                    reason = reason.label(),
                    age_s = age.as_secs(),
                    bytes_to_peers = stats.to_peer_bytes,
                    bytes_from_peers = stats.from_peer_bytes,
                    packets_to_peers = stats.to_peer_packets,
                    packets_from_peers = stats.from_peer_packets,
                    "allocation deleted"
                    )
                }
                Event::AllocationMoved { from, to, username } => info!(
                    client = %r.show(&to.client),
                    from = %r.show(&from.client),
                    server = %to.server,
                    user = ?r.show(&username),
                    "allocation moved to the client's new address (RFC 8016 mobility)"
                ),
                // Usernames come from the network: `?` escapes control
                // characters, so a crafted name cannot forge log lines.
                Event::AuthBlocked { client, username } => warn!(
                    client = %r.show(&client),
                    user = ?r.show(&username),
                    "repeated authentication failures: username/source blocked for a while"
                ),
                Event::PeerRefused {
                    tuple,
                    username,
                    peer,
                    reason,
                } => info!(
                    client = %r.show(&tuple.client),
                    user = ?r.show(&username),
                    peer = %r.show(&peer),
                    reason = %reason,
                    "peer refused by policy"
                ),
                Event::RequestRefused {
                    tuple,
                    method,
                    code,
                    username,
                    detail,
                } if self.refusals.admit(now, code) => info!(
                    client = %r.show(&tuple.client),
                    transport = tuple.transport.as_str(),
                    user = ?username.as_deref().map(|u| r.show(&u)).unwrap_or_default(),
                    request = stun_proto::method::name(method),
                    code = code.code(),
                    reason = code.reason(),
                    why = %detail.map(|d| r.show_detail(&d)).unwrap_or_default(),
                    "request refused"
                ),
                _ => {}
            }
        }
        // Counts for deletions already logged (removed after the line).
        self.fast.closed.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_past_the_budget_are_counted_not_logged() {
        let mut l = RefusalLog::new(20);
        let t = l.window;
        let logged = (0..25).filter(|_| l.admit(t, ErrorCode::Unauthorized)).count();
        assert_eq!(logged, 20);
        assert_eq!(l.suppressed[ErrorCode::Unauthorized.index()], 5);
        // The next second starts a new budget (the summary line is logged).
        assert!(l.admit(t + Duration::from_secs(1), ErrorCode::AllocationQuotaReached));
        assert_eq!(l.suppressed.iter().sum::<u64>(), 0);
        // 0: every refusal goes to the summary.
        let mut l = RefusalLog::new(0);
        assert!(!l.admit(t, ErrorCode::Unauthorized));
        assert_eq!(l.suppressed[ErrorCode::Unauthorized.index()], 1);
    }
}
