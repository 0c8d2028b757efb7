//! Log lines for the core's events, and `--redact`.

use tracing::{info, warn};
use turn_core::{CloseReason, Event};

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

impl Worker {
    pub(super) fn log_events(&mut self) {
        let r = &self.redact;
        while let Some(ev) = self.core.poll_event() {
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
                    stats,
                    age,
                } => info!(
                    client = %r.show(&tuple.client),
                    transport = tuple.transport.as_str(),
                    user = ?r.show(&username),
                    relayed = %relayed,
                    reason = match reason {
                        CloseReason::Expired => "expired",
                        CloseReason::Deleted => "deleted",
                        CloseReason::ConnectionClosed => "connection-closed",
                        CloseReason::Admin => "deleted-by-admin",
                        _ => "other",
                    },
                    age_s = age.as_secs(),
                    bytes_to_peers = stats.to_peer_bytes,
                    bytes_from_peers = stats.from_peer_bytes,
                    packets_to_peers = stats.to_peer_packets,
                    packets_from_peers = stats.from_peer_packets,
                    "allocation deleted"
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
                    reason = ?reason,
                    "peer refused by policy"
                ),
                _ => {}
            }
        }
    }
}
