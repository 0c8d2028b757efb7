//! A sans-IO STUN/TURN server.
//!
//! [`Server`] owns every piece of protocol state a worker has: allocations,
//! permissions, channel bindings and their timers, the stateless nonce minter
//! and the credentials. It never touches a socket or reads a clock. A runtime
//! feeds it packets with [`Server::handle_client`] and
//! [`Server::handle_peer`], drives time with [`Server::handle_timeout`] at
//! [`Server::poll_timeout`], and drains what the core asks for: commands
//! ([`Server::poll_command`]: open or close relay sockets), whose
//! completions come back as inputs ([`Server::handle_relays_opened`]),
//! queued transmits ([`Server::poll_transmit`]) and [`Event`]s for logs and
//! metrics.
//!
//! The common case stays one in, one out: an input that can be answered at
//! once returns one [`Transmit`], borrowing either the input (ChannelData
//! from a client is forwarded without a copy) or a scratch buffer inside the
//! server, so the per-packet path does not allocate.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod limits;
pub mod policy;
pub mod proxy;
mod server;
#[cfg(feature = "testing")]
pub mod testing;

pub use auth::{Credentials, NonceMinter};
pub use policy::{Cidr, PeerPolicy, Refusal};
pub use server::{
    challenge_len, connection_bind_id, connection_id_tag, max_realm_len, AllocateId, CloseReason, Command,
    Config, ConnectionId, Counters, Dest, ErrorCode, Event, FastPathBudget, FastPathEntry, FiveTuple,
    ListenerId, OpenedRelay, QueuedTransmit, Redirect, RefusalDetail, RelayError, RelayRequest, RelaysOpened,
    Rfc5780, Server, SessionInfo, Shared, Stats, TcpConnectionInfo, Transmit, Transport, AUTH_WINDOW,
    CHALLENGE_RATIO, MIN_ALLOCATE_LEN, SOURCE_SLOTS, TCP_CONNECTION_TIMEOUT,
};
/// A worker's allocations as data, for a binary upgrade's hand-over.
pub mod snapshot {
    pub use crate::server::{
        AllocationState, ChannelState, PermissionState, RelayState, Restored, Snapshot, SnapshotError,
        TcpConnState, SNAPSHOT_READS, SNAPSHOT_VERSION,
    };
}

/// Frames one message at the start of a TCP/TLS byte stream
/// (RFC 8489 §6.2.2, RFC 8656 §12.5).
///
/// `Some(Ok(n))`: the first message is `n` bytes (ChannelData padded to four).
/// `None`: not enough bytes yet. `Some(Err(()))`: the stream carries neither
/// STUN nor ChannelData and must be closed, since framing is lost for good.
pub fn stream_frame_len(buf: &[u8]) -> Option<Result<usize, ()>> {
    match stun_proto::packet_kind(buf) {
        stun_proto::PacketKind::Stun => stun_proto::Message::stream_len(buf).map(Ok),
        stun_proto::PacketKind::ChannelData => stun_proto::ChannelData::stream_len(buf).map(Ok),
        stun_proto::PacketKind::Other if buf.is_empty() => None,
        stun_proto::PacketKind::Other => Some(Err(())),
    }
}
