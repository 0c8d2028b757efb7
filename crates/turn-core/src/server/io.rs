//! What crosses the core's boundary: the addresses of a packet, what the
//! runtime must send, and the commands it must carry out.

use std::net::{IpAddr, SocketAddr};

/// The transport between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP, RFC 8489 §6.2.2 framing.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// DTLS over UDP (RFC 7350): datagrams like UDP, each one a record of
    /// the client's DTLS association.
    Dtls,
}

impl Transport {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Dtls => "dtls",
        }
    }

    /// How many transports there are (metrics arrays).
    pub const COUNT: usize = 4;

    /// Every transport, in [`Transport::index`] order.
    pub const ALL: [Transport; Transport::COUNT] =
        [Transport::Udp, Transport::Tcp, Transport::Tls, Transport::Dtls];

    /// 0, 1, 2, 3 for UDP, TCP, TLS, DTLS (metrics arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    /// TCP or TLS: RFC 8489 §6.2.2 framing, ChannelData padded (RFC 8656
    /// §12.5), RFC 6062 TCP allocations allowed.
    pub(super) fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }

    /// Plain UDP: the only transport the kernel fast path relays (it
    /// cannot decrypt DTLS records).
    pub(super) fn is_plain_udp(self) -> bool {
        matches!(self, Transport::Udp)
    }
}

/// The client-side 5-tuple of an allocation (RFC 8656 §2): transport, the
/// client's address, and the server address it actually reached.
///
/// `server` is exact even behind a listener bound to a wildcard address
/// (the runtime learns it with IP_PKTINFO, or from the accepted socket), so
/// answers leave from it and relays are chosen by it. `listener` names the
/// socket the packet came in on: two listeners may share an address family
/// and port on different addresses, and a wildcard listener serves many
/// addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// Transport protocol.
    pub transport: Transport,
    /// The client's address as the server sees it.
    pub client: SocketAddr,
    /// The server address the client reached.
    pub server: SocketAddr,
    /// The runtime's id of the listening socket.
    pub listener: ListenerId,
}

/// A runtime's name for one of its listening sockets.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ListenerId(pub u32);

/// Where a [`Transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dest {
    /// To a client, over the connection or socket of this 5-tuple, from the
    /// address it reached.
    Client(FiveTuple),
    /// A UDP datagram to `to` from the server's listening socket bound at
    /// `local`: RFC 5780 answers from another address or port
    /// (CHANGE-REQUEST) or to another port (RESPONSE-PORT).
    Via {
        /// The listening socket to send from.
        local: SocketAddr,
        /// The destination.
        to: SocketAddr,
    },
    /// A UDP datagram from the relay socket bound at `relay` to `peer`.
    Peer {
        /// The relay socket's bound address.
        relay: SocketAddr,
        /// The peer.
        peer: SocketAddr,
    },
}

/// Bytes the runtime must send, borrowed from the input or the core.
#[derive(Debug)]
#[must_use]
pub struct Transmit<'a> {
    /// Where to.
    pub dest: Dest,
    /// What; for stream transports already framed and padded.
    pub data: &'a [u8],
}

/// Bytes the runtime must send, queued by the core for later (answers that
/// waited for a command's completion). Drained with
/// [`crate::Server::poll_transmit`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct QueuedTransmit {
    /// Where to.
    pub dest: Dest,
    /// What.
    pub data: Vec<u8>,
}

/// RFC 6062 CONNECTION-ID: names one peer data connection. The top byte
/// is the worker's `Config::connection_id_tag`.
pub type ConnectionId = u32;

/// Names one Allocate waiting for its relay sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AllocateId(pub u64);

/// What the core asks of one relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRequest {
    /// IPv6 rather than IPv4.
    pub ipv6: bool,
    /// The server address the client reached: without a configured relay
    /// address of this family, relay from it (when of this family).
    pub local_ip: IpAddr,
    /// The client's address (a loopback client may get a loopback relay).
    pub client_ip: IpAddr,
    /// An even port (RFC 8656 §14.6 EVEN-PORT).
    pub even_port: bool,
    /// Also reserve the next port (EVEN-PORT with the R bit) and return a
    /// RESERVATION-TOKEN for it.
    pub reserve_next: bool,
    /// Open the socket reserved under this token by an earlier
    /// `reserve_next` instead of a new one (RFC 8656 §14.9).
    pub token: Option<[u8; 8]>,
    /// Send with the Don't Fragment bit (RFC 8656 §14.8).
    pub dont_fragment: bool,
    /// A TCP relay (RFC 6062): a listening socket at the relayed address,
    /// from which connects to peers also leave.
    pub tcp: bool,
}

/// A relay socket the runtime opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenedRelay {
    /// The address it is bound to.
    pub addr: SocketAddr,
    /// With `reserve_next`: the token that claims the reserved port.
    pub token: Option<[u8; 8]>,
}

/// Why a relay socket could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RelayError {
    /// No relay address of the requested family is configured (→ 440).
    FamilyUnsupported,
    /// No free port, or the socket could not be created (→ 508).
    Exhausted,
}

/// The completion of [`Command::OpenRelays`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelaysOpened {
    /// The requested family's socket.
    pub primary: Result<OpenedRelay, RelayError>,
    /// The additional family's (RFC 8656 §7.2 ADDITIONAL-ADDRESS-FAMILY),
    /// when one was asked for.
    pub additional: Option<Result<OpenedRelay, RelayError>>,
}

/// Work the core asks of the runtime, drained with
/// [`crate::Server::poll_command`]. A command that completes is answered
/// with the matching input ([`crate::Server::handle_relays_opened`],
/// [`crate::Server::handle_peer_connected`]). Exhaustive on purpose: a new
/// command does not build until the runtime carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Open the relay sockets of a new allocation, then call
    /// [`crate::Server::handle_relays_opened`] with `id`.
    OpenRelays {
        /// Names this Allocate in the completion.
        id: AllocateId,
        /// The client's 5-tuple.
        tuple: FiveTuple,
        /// The requested family's socket.
        primary: RelayRequest,
        /// A second socket of the other family (dual allocation).
        additional: Option<RelayRequest>,
    },
    /// Close the relay socket bound at `relay` (sending what is queued on
    /// it first). Needs no completion.
    CloseRelay {
        /// Its bound address.
        relay: SocketAddr,
    },
    /// RFC 6062 §5.2: connect from the relayed address `relay` to `peer`
    /// (non-blocking), then call [`crate::Server::handle_peer_connected`]
    /// with `id`. The core times the connect out itself.
    ConnectPeer {
        /// Names the connection in the completion and later commands.
        id: ConnectionId,
        /// The TCP relay's bound address, to connect from.
        relay: SocketAddr,
        /// Where to.
        peer: SocketAddr,
    },
    /// RFC 6062 §5.4: the client data connection `data` (a ConnectionBind
    /// was answered on it) now carries raw bytes to and from peer
    /// connection `id`, both ways, until either closes.
    BindConnection {
        /// The peer data connection.
        id: ConnectionId,
        /// The client data connection.
        data: FiveTuple,
        /// The allocation's control connection: its connections share
        /// one bandwidth cap per direction (`Config::max_bps`).
        control: FiveTuple,
    },
    /// Close peer connection `id` and its client data connection, if any.
    CloseConnection {
        /// The peer data connection.
        id: ConnectionId,
    },
    /// A kernel fast path may forward this channel until the entry's
    /// `expires` (installs, or replaces the entry of the same client and
    /// channel). Only with `Config::fast_path`.
    FastPathInstall(super::fast_path::FastPathEntry),
    /// The fast path must stop forwarding this client's channel.
    FastPathRemove {
        /// The client's 5-tuple.
        client: FiveTuple,
        /// The channel number.
        channel: u16,
    },
    /// RFC 8016: a Refresh with a mobility ticket of an allocation another
    /// worker holds (its tag, `Config::connection_id_tag`), which the
    /// client's new 5-tuple reached here: the runtime passes the request
    /// to that worker, which moves the allocation, and then hands it over
    /// to this one (`Server::take_allocation`, `Server::adopt_allocation`).
    MobilityElsewhere {
        /// The worker holding the allocation.
        worker: u8,
        /// The client's new 5-tuple, as this worker sees it.
        tuple: FiveTuple,
        /// The request, unanswered.
        request: Vec<u8>,
    },
}
