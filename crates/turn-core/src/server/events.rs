//! What the core reports: per-allocation stats, per-worker counters, and
//! events for logs and metrics.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::error::ErrorCode;
use super::io::{FiveTuple, Transport};
use crate::policy::Refusal;

/// Packet and byte counts of one allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Stats {
    /// Datagrams relayed from the client to peers.
    pub to_peer_packets: u64,
    /// Payload bytes relayed from the client to peers.
    pub to_peer_bytes: u64,
    /// Datagrams relayed from peers to the client.
    pub from_peer_packets: u64,
    /// Payload bytes relayed from peers to the client.
    pub from_peer_bytes: u64,
}

/// Per-worker counts of what the limits did, for metrics. Serialized for
/// the binary upgrade's snapshot: a field the reader does not know is
/// ignored, one it misses is 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Counters {
    /// Unauthenticated requests not answered because of the per-source limit.
    pub rate_limited: u64,
    /// Requests whose credentials did not verify (401).
    pub auth_failures: u64,
    /// Attempts not checked because the pair was blocked or throttled.
    pub auth_throttled: u64,
    /// RFC 6062 Connect requests that started a connect.
    pub tcp_connects: u64,
    /// Connects that failed or timed out (447).
    pub tcp_connect_failed: u64,
    /// Peer connections to a relayed address accepted (ConnectionAttempt).
    pub tcp_peer_accepted: u64,
    /// Peer connections closed at once: no permission for the peer.
    pub tcp_peer_refused: u64,
    /// Connects and peer connections refused by the per-allocation limit.
    pub tcp_refused_limit: u64,
    /// Peer connections bound to a client data connection (ConnectionBind).
    pub tcp_bound: u64,
    /// Peer connections closed because no ConnectionBind came in 30 s.
    pub tcp_unbound_expired: u64,
    /// Unauthenticated requests too small to challenge within the
    /// reflection bound, dropped (challenge.rs).
    pub challenges_withheld: u64,
    /// 401s sent to requests without integrity: the normal first step of
    /// every client (RFC 8489 §9.2.4), not failures. They are also in
    /// `errors` under 401, which otherwise counts failed authentications.
    pub challenges: u64,
    /// Allocations refused by a user quota (486).
    pub quota_user: u64,
    /// Allocations refused by the total quota or port exhaustion (508).
    pub capacity: u64,
    /// Allocations refused while draining (300 or 508).
    pub drain_refused: u64,
    /// Allocations sent to a less loaded node with 300 ([`crate::Redirect`]).
    pub load_redirected: u64,
    /// Relayed packets dropped by bandwidth caps.
    pub bandwidth_dropped: u64,
    /// Peers refused by policy.
    pub peers_refused: u64,
    /// Binding requests answered.
    pub bindings: u64,
    /// Allocations created, by transport (UDP, TCP, TLS).
    pub allocations_created: [u64; Transport::COUNT],
    /// Allocations that expired, by transport.
    pub allocations_expired: [u64; Transport::COUNT],
    /// Allocations deleted (Refresh 0, closed connection, admin), by transport.
    pub allocations_deleted: [u64; Transport::COUNT],
    /// Allocations ended, by reason, in [`CloseReason::ALL`] order.
    pub allocations_ended: [u64; CloseReason::ALL.len()],
    /// Packets and payload bytes relayed client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes relayed client → peer.
    pub to_peer_bytes: u64,
    /// Packets relayed peer → client.
    pub from_peer_packets: u64,
    /// Payload bytes relayed peer → client.
    pub from_peer_bytes: u64,
    /// Error responses sent, by code, in [`ErrorCode::ALL`] order
    /// (serialized by code number, so the table may grow).
    #[serde(with = "error_counts")]
    pub errors: [u64; ErrorCode::ALL.len()],
    /// ICMP errors relayed to clients (RFC 8656 §11.5).
    pub icmp_relayed: u64,
    /// ICMP errors not relayed: no permission, or over the rate limit.
    pub icmp_dropped: u64,
}

/// [`Counters::errors`] as (code, count) pairs.
mod error_counts {
    use super::ErrorCode;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u64; ErrorCode::ALL.len()], s: S) -> Result<S::Ok, S::Error> {
        let pairs: Vec<(u16, u64)> = ErrorCode::ALL
            .iter()
            .zip(v)
            .filter(|(_, n)| **n > 0)
            .map(|(c, n)| (c.code(), *n))
            .collect();
        pairs.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<[u64; ErrorCode::ALL.len()], D::Error> {
        let mut v = [0u64; ErrorCode::ALL.len()];
        for (code, n) in Vec::<(u16, u64)>::deserialize(d)? {
            // A code this build does not know was counted by a newer one:
            // its count has no slot here.
            if let Some(c) = ErrorCode::from_code(code) {
                v[c.index()] += n;
            }
        }
        Ok(v)
    }
}

impl Counters {
    pub(super) fn count_error(&mut self, code: ErrorCode) {
        self.errors[code.index()] += 1;
    }
}

/// Why an allocation (or one of its relayed addresses) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// Its lifetime ran out (RFC 8656 §7).
    Expired,
    /// The client sent Refresh with LIFETIME 0.
    Deleted,
    /// The client's TCP/TLS connection closed.
    ConnectionClosed,
    /// An operator deleted it (admin API).
    Admin,
    /// The server stopped while it was live (SIGINT, a second SIGTERM).
    Shutdown,
    /// A drain that ends in the process stopping (SIGTERM, the old process
    /// after a binary upgrade) ran out of `drain-timeout` while it was live.
    Drain,
    /// It relayed `max_allocation_bytes` (both directions together).
    Quota,
}

impl CloseReason {
    /// Every reason, in the order [`Counters::allocations_ended`] counts
    /// them.
    pub const ALL: [CloseReason; 7] = [
        CloseReason::Expired,
        CloseReason::Deleted,
        CloseReason::ConnectionClosed,
        CloseReason::Admin,
        CloseReason::Shutdown,
        CloseReason::Drain,
        CloseReason::Quota,
    ];

    /// Its place in [`CloseReason::ALL`].
    pub fn index(self) -> usize {
        match self {
            CloseReason::Expired => 0,
            CloseReason::Deleted => 1,
            CloseReason::ConnectionClosed => 2,
            CloseReason::Admin => 3,
            CloseReason::Shutdown => 4,
            CloseReason::Drain => 5,
            CloseReason::Quota => 6,
        }
    }

    /// How logs and usage records name it.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Expired => "expired",
            CloseReason::Deleted => "deleted",
            CloseReason::ConnectionClosed => "connection-closed",
            CloseReason::Admin => "deleted-by-admin",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Drain => "drain",
            CloseReason::Quota => "quota",
        }
    }
}

/// A live allocation, as the admin API shows it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The client 5-tuple.
    pub tuple: FiveTuple,
    /// The username.
    pub username: Arc<str>,
    /// The relayed address given to the client (the first, for a dual
    /// allocation).
    pub relayed: SocketAddr,
    /// Every relayed address, one per family.
    pub relayed_all: Vec<SocketAddr>,
    /// Age.
    pub age: Duration,
    /// Time left before it expires.
    pub expires_in: Duration,
    /// Traffic so far.
    pub stats: Stats,
    /// Live permissions.
    pub permissions: usize,
    /// Live channel bindings.
    pub channels: usize,
    /// RFC 6062: the peer data connections of a TCP allocation.
    pub tcp_connections: Vec<TcpConnectionInfo>,
}

/// One RFC 6062 peer data connection, for the session list. The core
/// knows its state; the runtime, which relays the bytes, fills in the
/// byte counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConnectionInfo {
    /// CONNECTION-ID.
    pub id: u32,
    /// The peer.
    pub peer: SocketAddr,
    /// "connecting", "pending" (waiting for ConnectionBind) or "bound".
    pub state: &'static str,
    /// Bytes relayed to the peer.
    pub to_peer_bytes: u64,
    /// Bytes relayed from the peer.
    pub from_peer_bytes: u64,
}

/// Something worth a log line or a metric.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// An allocation was created.
    AllocationCreated {
        /// The client 5-tuple.
        tuple: FiveTuple,
        /// The authenticated username.
        username: Arc<str>,
        /// The relayed transport address given to the client.
        relayed: SocketAddr,
        /// The second relayed address of a dual allocation.
        additional: Option<SocketAddr>,
        /// Granted lifetime.
        lifetime: Duration,
    },
    /// An allocation ended.
    AllocationDeleted {
        /// The client 5-tuple.
        tuple: FiveTuple,
        /// The username that owned it.
        username: Arc<str>,
        /// Its relayed transport address.
        relayed: SocketAddr,
        /// Why.
        reason: CloseReason,
        /// Traffic over its life.
        stats: Stats,
        /// How long it lived.
        age: Duration,
    },
    /// RFC 8016: an allocation's client moved to another 5-tuple with its
    /// mobility ticket.
    AllocationMoved {
        /// Where it was.
        from: FiveTuple,
        /// Where it is now.
        to: FiveTuple,
        /// Its owner.
        username: Arc<str>,
    },
    /// Repeated integrity failures blocked a username/source pair (or a
    /// source) for a while.
    AuthBlocked {
        /// The client address.
        client: SocketAddr,
        /// The username tried (lossy UTF-8, possibly a USERHASH).
        username: String,
    },
    /// A request was refused with an error response (every refusal but
    /// the challenges of the normal authentication flow: a 401 to a
    /// request without integrity, and 438).
    RequestRefused {
        /// The client 5-tuple.
        tuple: FiveTuple,
        /// The request's method (e.g. `stun_proto::method::ALLOCATE`).
        method: u16,
        /// The error sent.
        code: ErrorCode,
        /// The username the request named (lossy UTF-8, at most 128
        /// bytes; the USERHASH in hex if that was used), if any.
        username: Option<String>,
        /// The attribute, range or rule that refused it, where the code
        /// alone does not say (a 400 or 403 has many causes).
        detail: Option<RefusalDetail>,
    },
    /// A peer address was refused by the peer policy.
    PeerRefused {
        /// The client 5-tuple.
        tuple: FiveTuple,
        /// The username.
        username: Arc<str>,
        /// The peer asked for.
        peer: SocketAddr,
        /// Which rule refused it.
        reason: Refusal,
    },
}

/// What refused a request, beyond its error code: which attribute, range
/// or rule, so the log line tells an operator what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RefusalDetail {
    /// A required attribute is missing (its name).
    Missing(&'static str),
    /// An attribute is malformed (its name).
    Malformed(&'static str),
    /// A channel number outside the range this server accepts.
    ChannelOutOfRange {
        /// The number asked for.
        number: u16,
        /// Whether 0x5000-0x7FFF are accepted too (`--rfc5766-channel-numbers`).
        legacy: bool,
    },
    /// The number is bound to another peer, or the peer to another number.
    ChannelConflict {
        /// The number asked for.
        number: u16,
    },
    /// The peer is refused by the peer policy.
    Peer(SocketAddr, Refusal),
    /// A rule of the protocol, named with its section.
    Rule(&'static str),
}

impl std::fmt::Display for RefusalDetail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefusalDetail::Missing(a) => write!(f, "{a} missing"),
            RefusalDetail::Malformed(a) => write!(f, "{a} malformed"),
            RefusalDetail::ChannelOutOfRange { number, legacy: false } => write!(
                f,
                "channel {number:#06x} outside 0x4000-0x4FFF (RFC 8656 §12); older clients: --rfc5766-channel-numbers"
            ),
            RefusalDetail::ChannelOutOfRange { number, legacy: true } => {
                write!(f, "channel {number:#06x} outside 0x4000-0x7FFF (RFC 5766 §11)")
            }
            RefusalDetail::ChannelConflict { number } => write!(
                f,
                "channel {number:#06x} or its peer is bound otherwise, or was within 5 minutes (RFC 8656 §12.2)"
            ),
            RefusalDetail::Peer(peer, why) => write!(f, "peer {peer} {why}"),
            RefusalDetail::Rule(r) => f.write_str(r),
        }
    }
}
