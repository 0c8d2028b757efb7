//! The server state machine: request processing (RFC 8489 §6.3, §9.2;
//! RFC 8656 §7–§12), relaying, and timers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

/// Tables looked up per packet are keyed by addresses a client chooses, so
/// they need a keyed hash (HashDoS), but SipHash was a third of the user
/// time on the relay path; ahash with random keys is both.
type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stun_proto::{
    attr, method, packet_kind, ChannelData, Class, Message, MessageBuilder, MessageType, PacketKind,
    TransactionId,
};

use crate::auth::{Credentials, Key, NonceMinter, PasswordAlgorithm, OFFERED_ALGORITHMS};
use crate::limits::{AuthGuard, Bucket, QuotaError, Quotas, SourceLimiter, Verdict};
use crate::policy::{PeerPolicy, Refusal};

/// The transport between client and server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// UDP.
    Udp,
    /// TCP, RFC 8489 §6.2.2 framing.
    Tcp,
    /// TLS over TCP.
    Tls,
}

impl Transport {
    /// Lower-case name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        }
    }

    /// 0, 1, 2 for UDP, TCP, TLS (metrics arrays).
    pub fn index(self) -> usize {
        self as usize
    }

    fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// The client-side 5-tuple of an allocation (RFC 8656 §2): transport, the
/// client's address, and the server socket it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// Transport protocol.
    pub transport: Transport,
    /// The client's address as the server sees it.
    pub client: SocketAddr,
    /// The server's listening address the client reached.
    pub server: SocketAddr,
}

/// Where a [`Transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// To a client, over the connection or socket of this 5-tuple.
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

/// Bytes the runtime must send.
#[derive(Debug)]
#[must_use]
pub struct Transmit<'a> {
    /// Where to.
    pub dest: Dest,
    /// What; for stream transports already framed and padded.
    pub data: &'a [u8],
}

/// What the core asks of a relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayRequest {
    /// IPv6 rather than IPv4.
    pub ipv6: bool,
    /// An even port (RFC 8656 §14.6 EVEN-PORT).
    pub even_port: bool,
    /// Also reserve the next port (EVEN-PORT with the R bit) and return a
    /// RESERVATION-TOKEN for it.
    pub reserve_next: bool,
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
pub enum RelayError {
    /// No relay address of the requested family is configured (→ 440).
    FamilyUnsupported,
    /// No free port, or the socket could not be created (→ 508).
    Exhausted,
}

/// The runtime's side of relay sockets: the core asks for one when an
/// Allocate succeeds and gives it back when the allocation ends.
pub trait RelayProvider {
    /// Opens a UDP relay socket; returns the address it is bound to.
    fn open(&mut self, req: RelayRequest) -> Result<OpenedRelay, RelayError>;
    /// Opens the relay socket reserved under `token` by an earlier
    /// `reserve_next` (RFC 8656 §7.2). Reservations may be shared by every
    /// worker, since the claiming Allocate comes from another client port.
    fn open_reserved(&mut self, token: [u8; 8]) -> Result<SocketAddr, RelayError>;
    /// Closes the relay socket bound at `relay`.
    fn close(&mut self, relay: SocketAddr);
}

/// Packet and byte counts of one allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

/// Per-worker counts of what the limits did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Unauthenticated requests not answered because of the per-source limit.
    pub rate_limited: u64,
    /// Requests whose credentials did not verify (401).
    pub auth_failures: u64,
    /// Attempts not checked because the pair was blocked or throttled.
    pub auth_throttled: u64,
    /// Allocations refused by a user quota (486).
    pub quota_user: u64,
    /// Allocations refused by the total quota or port exhaustion (508).
    pub capacity: u64,
    /// Relayed packets dropped by bandwidth caps.
    pub bandwidth_dropped: u64,
    /// Peers refused by policy.
    pub peers_refused: u64,
    /// Binding requests answered.
    pub bindings: u64,
    /// Allocations created, by transport (UDP, TCP, TLS).
    pub allocations_created: [u64; 3],
    /// Allocations that expired, by transport.
    pub allocations_expired: [u64; 3],
    /// Allocations deleted (Refresh 0, closed connection, admin), by transport.
    pub allocations_deleted: [u64; 3],
    /// Packets and payload bytes relayed client → peer.
    pub to_peer_packets: u64,
    /// Payload bytes relayed client → peer.
    pub to_peer_bytes: u64,
    /// Packets relayed peer → client.
    pub from_peer_packets: u64,
    /// Payload bytes relayed peer → client.
    pub from_peer_bytes: u64,
    /// Error responses sent, by code (see [`Counters::ERROR_CODES`]).
    pub errors: [u64; 12],
}

impl Counters {
    /// The error codes counted in `errors`, in order; anything else is
    /// counted under the last slot (0 = other).
    pub const ERROR_CODES: [u16; 12] = [300, 400, 401, 403, 420, 437, 438, 441, 442, 443, 486, 0];

    fn count_error(&mut self, code: u16) {
        let i = Self::ERROR_CODES
            .iter()
            .position(|c| *c == code)
            .unwrap_or(Self::ERROR_CODES.len() - 1);
        self.errors[i] += 1;
    }
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its lifetime ran out (RFC 8656 §7).
    Expired,
    /// The client sent Refresh with LIFETIME 0.
    Deleted,
    /// The client's TCP/TLS connection closed.
    ConnectionClosed,
    /// An operator deleted it (admin API).
    Admin,
}

/// A live allocation, as the admin API shows it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// The client 5-tuple.
    pub tuple: FiveTuple,
    /// The username.
    pub username: Arc<str>,
    /// The relayed address given to the client.
    pub relayed: SocketAddr,
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
}

/// Something worth a log line or a metric.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// An allocation was created.
    AllocationCreated {
        /// The client 5-tuple.
        tuple: FiveTuple,
        /// The authenticated username.
        username: Arc<str>,
        /// The relayed transport address given to the client.
        relayed: SocketAddr,
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
    /// Repeated integrity failures blocked a username/source pair (or a
    /// source) for a while.
    AuthBlocked {
        /// The client address.
        client: SocketAddr,
        /// The username tried (lossy UTF-8, possibly a USERHASH).
        username: String,
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

/// The addresses RFC 5780 behaviour discovery uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc5780 {
    /// Primary and alternate IP.
    pub ips: (IpAddr, IpAddr),
    /// Primary and alternate port.
    pub ports: (u16, u16),
}

impl Rfc5780 {
    fn other_ip(&self, ip: IpAddr) -> IpAddr {
        if ip == self.ips.0 {
            self.ips.1
        } else {
            self.ips.0
        }
    }

    fn other_port(&self, port: u16) -> u16 {
        if port == self.ports.0 {
            self.ports.1
        } else {
            self.ports.0
        }
    }
}

/// Settings of a [`Server`].
#[derive(Debug, Clone)]
pub struct Config {
    /// The realm (RFC 8489 §14.9).
    pub realm: String,
    /// SOFTWARE to put in responses; `None` sends none.
    pub software: Option<String>,
    /// Credentials accepted.
    pub credentials: Arc<Credentials>,
    /// Secret for stateless nonces; share it among workers.
    pub nonce_secret: [u8; 32],
    /// How long a nonce stays valid (default 600 s).
    pub nonce_lifetime: Duration,
    /// Allocation lifetime when the client asks for none (RFC 8656: 600 s).
    pub default_lifetime: Duration,
    /// Upper bound on allocation lifetime (RFC 8656: 3600 s).
    pub max_lifetime: Duration,
    /// Permission lifetime (RFC 8656 §9: 300 s).
    pub permission_lifetime: Duration,
    /// Channel binding lifetime (RFC 8656 §12: 600 s).
    pub channel_lifetime: Duration,
    /// Accept channel numbers 0x5000–0x7FFF too (RFC 5766's range).
    pub legacy_channel_numbers: bool,
    /// Which peers may be relayed to.
    pub policy: PeerPolicy,
    /// The advertised IPv4 relay address when the host is behind NAT.
    pub external_ipv4: Option<Ipv4Addr>,
    /// The advertised IPv6 relay address when it differs from the bound one.
    pub external_ipv6: Option<Ipv6Addr>,
    /// Most permissions one allocation may hold (beyond: 508).
    pub max_permissions: usize,
    /// Most channel bindings one allocation may hold (beyond: 508).
    pub max_channels: usize,
    /// Allocation quotas, shared by every worker.
    pub quotas: Arc<Quotas>,
    /// Answers per second to unauthenticated requests from one source IP,
    /// per worker; 0 turns the limit off.
    pub rate_limit_per_ip: u32,
    /// Integrity failures per username/source within a minute before the
    /// pair is blocked; 0 turns the guard off.
    pub auth_fail_limit: u32,
    /// How long a blocked pair stays blocked.
    pub auth_block: Duration,
    /// Bytes per second each allocation may relay in each direction; 0: no cap.
    pub max_bps: u64,
    /// Bytes per second one user's allocations on one worker may relay in
    /// each direction; 0: no cap.
    pub user_max_bps: u64,
    /// Slots in each fixed per-source table (rate limits, brute-force
    /// guard), allocated once per worker.
    pub source_slots: usize,
    /// Set while the server drains: new allocations are refused (300 with
    /// ALTERNATE-SERVER when `alternate_servers` has one of the family,
    /// else 508); existing ones carry on. Shared by all workers.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// Where draining sends new clients (RFC 8489 §14.15 ALTERNATE-SERVER).
    pub alternate_servers: Vec<SocketAddr>,
    /// RFC 5780 NAT behaviour discovery: the server's two IPs and two ports
    /// (it listens on all four combinations over UDP). `None`: off, and
    /// CHANGE-REQUEST, RESPONSE-PORT and PADDING are answered with 420.
    pub rfc5780: Option<Rfc5780>,
    /// The instant all workers count nonce time from.
    pub epoch: Instant,
    /// Unix time (seconds) at `epoch`, for REST-API username expiry.
    pub unix_at_epoch: u64,
}

impl Config {
    /// A configuration with the RFC defaults.
    pub fn new(
        realm: &str,
        credentials: Arc<Credentials>,
        nonce_secret: [u8; 32],
        epoch: Instant,
        unix_at_epoch: u64,
    ) -> Self {
        Config {
            realm: realm.to_owned(),
            software: None,
            credentials,
            nonce_secret,
            nonce_lifetime: Duration::from_secs(600),
            default_lifetime: Duration::from_secs(600),
            max_lifetime: Duration::from_secs(3600),
            permission_lifetime: Duration::from_secs(300),
            channel_lifetime: Duration::from_secs(600),
            legacy_channel_numbers: false,
            policy: PeerPolicy::default(),
            external_ipv4: None,
            external_ipv6: None,
            max_permissions: 256,
            max_channels: 256,
            quotas: Arc::new(Quotas::new(0, 0)),
            rate_limit_per_ip: 200,
            auth_fail_limit: 10,
            auth_block: Duration::from_secs(300),
            max_bps: 0,
            user_max_bps: 0,
            source_slots: 1 << 16,
            rfc5780: None,
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            alternate_servers: Vec::new(),
            epoch,
            unix_at_epoch,
        }
    }
}

/// How long a channel number and peer stay reserved after the binding
/// expires (RFC 8656 §12: "not reused ... for 5 minutes").
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

/// RFC 8489 §14.3: USERNAME is fewer than 509 bytes.
const MAX_USERNAME_LEN: usize = 508;

#[derive(Debug)]
struct Permission {
    ip: IpAddr,
    expires: Instant,
}

#[derive(Debug)]
struct ChannelBinding {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug)]
struct Allocation {
    tuple: FiveTuple,
    relay: SocketAddr,
    advertised: SocketAddr,
    username: Arc<str>,
    txid: TransactionId,
    /// RESERVATION-TOKEN handed out with this allocation, kept so a
    /// retransmitted Allocate gets the same answer.
    token: Option<[u8; 8]>,
    created: Instant,
    expires: Instant,
    permissions: Vec<Permission>,
    channels: Vec<ChannelBinding>,
    stats: Stats,
    /// Bandwidth buckets, client→peer and peer→client.
    bw_up: Bucket,
    bw_down: Bucket,
    /// Index of the user's shared buckets in `Server::user_bw`.
    user_slot: u32,
}

/// One user's bandwidth buckets on this worker.
#[derive(Debug)]
struct UserBandwidth {
    name: Arc<str>,
    up: Bucket,
    down: Bucket,
    refs: u32,
}

impl Allocation {
    fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.iter().any(|p| p.ip == ip && p.expires > now)
    }

    fn install_permission(&mut self, ip: IpAddr, expires: Instant) {
        match self.permissions.iter_mut().find(|p| p.ip == ip) {
            Some(p) => p.expires = expires,
            None => self.permissions.push(Permission { ip, expires }),
        }
    }

    fn purge(&mut self, now: Instant) {
        self.permissions.retain(|p| p.expires > now);
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
    }
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        508 => "Insufficient Capacity",
        _ => "Server Error",
    }
}

/// Comprehension-required attributes this server understands; any other in
/// a request is answered with 420 (RFC 8489 §6.3.1). DONT-FRAGMENT is left
/// out on purpose: the relay does not set DF, so RFC 8656 §7.2 requires 420.
const KNOWN_REQUIRED: &[u16] = &[
    attr::MAPPED_ADDRESS,
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::ERROR_CODE,
    attr::UNKNOWN_ATTRIBUTES,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::XOR_RELAYED_ADDRESS,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::REQUESTED_TRANSPORT,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::PASSWORD_ALGORITHM,
    attr::USERHASH,
    attr::XOR_MAPPED_ADDRESS,
    attr::RESERVATION_TOKEN,
];

/// Outcome of request processing before the response is written.
enum Reply {
    /// An error response with this code.
    Error(u16),
    /// 420 listing these attribute types.
    Unknown([u16; 8], usize),
    /// A success response; the closure-free variants below say what to add.
    AllocateOk {
        relayed: SocketAddr,
        lifetime: u32,
        token: Option<[u8; 8]>,
    },
    RefreshOk {
        lifetime: u32,
    },
    Ok,
    /// 300 Try Alternate with ALTERNATE-SERVER (draining).
    TryAlternate(SocketAddr),
    /// RFC 5780 Binding success: RESPONSE-ORIGIN, OTHER-ADDRESS, PADDING.
    Binding5780 {
        origin: SocketAddr,
        other: SocketAddr,
        padding: u16,
    },
}

/// A sans-IO STUN/TURN server for one worker. See the crate docs.
pub struct Server {
    cfg: Config,
    minter: NonceMinter,
    allocs: Vec<Option<Allocation>>,
    free: Vec<u32>,
    by_tuple: FastMap<FiveTuple, u32>,
    by_relay: FastMap<SocketAddr, u32>,
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    events: VecDeque<Event>,
    out: Vec<u8>,
    keys: Vec<Key>,
    /// Sequence number behind Data indication transaction ids.
    data_seq: u64,
    limiter: SourceLimiter,
    guard: AuthGuard,
    user_bw: Vec<Option<UserBandwidth>>,
    user_bw_free: Vec<u32>,
    user_bw_index: HashMap<Arc<str>, u32>,
    counters: Counters,
}

/// A request that passed authentication.
struct Authenticated {
    key: Key,
    /// Answer with MESSAGE-INTEGRITY-SHA256 rather than MESSAGE-INTEGRITY.
    sha256: bool,
    /// The username (resolved from USERHASH if that was used).
    username: String,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("allocations", &self.by_tuple.len())
            .finish()
    }
}

impl Server {
    /// A server with no allocations.
    pub fn new(cfg: Config) -> Self {
        let minter = NonceMinter::new(cfg.nonce_secret, cfg.nonce_lifetime.as_secs().max(1));
        let (cfg_rate, cfg_fail, cfg_block, slots) = (
            cfg.rate_limit_per_ip,
            cfg.auth_fail_limit,
            cfg.auth_block,
            cfg.source_slots,
        );
        Server {
            cfg,
            minter,
            allocs: Vec::new(),
            free: Vec::new(),
            by_tuple: FastMap::default(),
            by_relay: FastMap::default(),
            timers: BinaryHeap::new(),
            events: VecDeque::new(),
            out: Vec::with_capacity(2048),
            keys: Vec::with_capacity(4),
            data_seq: 0,
            limiter: SourceLimiter::new(cfg_rate, slots),
            guard: AuthGuard::new(cfg_fail, Duration::from_secs(60), cfg_block, slots),
            user_bw: Vec::new(),
            user_bw_free: Vec::new(),
            user_bw_index: HashMap::new(),
            counters: Counters::default(),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Replaces the credentials (reload); existing allocations are kept.
    pub fn set_credentials(&mut self, credentials: Arc<Credentials>) {
        self.cfg.credentials = credentials;
    }

    /// Replaces the abuse limits (reload): per-source rate, brute-force
    /// guard and bandwidth caps. A changed rate or guard starts from clean
    /// tables; allocations are kept.
    pub fn set_limits(
        &mut self,
        rate_limit_per_ip: u32,
        auth_fail_limit: u32,
        auth_block: Duration,
        max_bps: u64,
        user_max_bps: u64,
    ) {
        if rate_limit_per_ip != self.cfg.rate_limit_per_ip {
            self.limiter = SourceLimiter::new(rate_limit_per_ip, self.cfg.source_slots);
        }
        if auth_fail_limit != self.cfg.auth_fail_limit || auth_block != self.cfg.auth_block {
            self.guard = AuthGuard::new(
                auth_fail_limit,
                Duration::from_secs(60),
                auth_block,
                self.cfg.source_slots,
            );
        }
        self.cfg.rate_limit_per_ip = rate_limit_per_ip;
        self.cfg.auth_fail_limit = auth_fail_limit;
        self.cfg.auth_block = auth_block;
        self.cfg.max_bps = max_bps;
        self.cfg.user_max_bps = user_max_bps;
    }

    /// Replaces the peer policy (reload). Existing permissions are kept.
    pub fn set_policy(&mut self, policy: PeerPolicy) {
        self.cfg.policy = policy;
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.by_tuple.len()
    }

    /// What this worker has done so far. Relay counts include the live
    /// allocations' traffic (summed here, once, rather than per packet).
    pub fn counters(&self) -> Counters {
        let mut c = self.counters;
        for a in self.allocs.iter().flatten() {
            c.to_peer_packets += a.stats.to_peer_packets;
            c.to_peer_bytes += a.stats.to_peer_bytes;
            c.from_peer_packets += a.stats.from_peer_packets;
            c.from_peer_bytes += a.stats.from_peer_bytes;
        }
        c
    }

    /// Every live allocation of this worker.
    pub fn sessions(&self, now: Instant) -> Vec<SessionInfo> {
        self.allocs
            .iter()
            .flatten()
            .map(|a| SessionInfo {
                tuple: a.tuple,
                username: a.username.clone(),
                relayed: a.advertised,
                age: now.saturating_duration_since(a.created),
                expires_in: a.expires.saturating_duration_since(now),
                stats: a.stats,
                permissions: a.permissions.iter().filter(|p| p.expires > now).count(),
                channels: a.channels.iter().filter(|c| c.expires > now).count(),
            })
            .collect()
    }

    /// Deletes the allocations `pick` selects (admin API); returns how many.
    pub fn delete_sessions(
        &mut self,
        now: Instant,
        pick: &dyn Fn(&SessionInfo) -> bool,
        relays: &mut dyn RelayProvider,
    ) -> usize {
        let doomed: Vec<u32> = self
            .sessions(now)
            .iter()
            .filter(|s| pick(s))
            .filter_map(|s| self.by_tuple.get(&s.tuple).copied())
            .collect();
        for idx in &doomed {
            self.delete(*idx, now, CloseReason::Admin, relays);
        }
        doomed.len()
    }

    /// Live allocations by client transport: UDP, TCP, TLS.
    pub fn allocations_by_transport(&self) -> [usize; 3] {
        let mut n = [0; 3];
        for t in self.by_tuple.keys() {
            n[match t.transport {
                Transport::Udp => 0,
                Transport::Tcp => 1,
                Transport::Tls => 2,
            }] += 1;
        }
        n
    }

    /// Live permissions and channel bindings across this worker's allocations.
    pub fn permissions_and_channels(&self, now: Instant) -> (usize, usize) {
        self.allocs.iter().flatten().fold((0, 0), |(p, c), a| {
            (
                p + a.permissions.iter().filter(|x| x.expires > now).count(),
                c + a.channels.iter().filter(|x| x.expires > now).count(),
            )
        })
    }

    /// Whether the 5-tuple has an allocation (the runtime's idle timeouts
    /// leave such connections alone).
    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.by_tuple.contains_key(tuple)
    }

    /// The next instant [`Self::handle_timeout`] has work to do, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// The next event for logs and metrics.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn nonce_secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.cfg.epoch).as_secs()
    }

    fn unix_now(&self, now: Instant) -> u64 {
        self.cfg.unix_at_epoch + self.nonce_secs(now)
    }

    /// Expires allocations whose lifetime has run out.
    pub fn handle_timeout(&mut self, now: Instant, relays: &mut dyn RelayProvider) {
        while let Some(&Reverse((t, idx))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let due = matches!(&self.allocs[idx as usize], Some(a) if a.expires <= now);
            if due {
                self.delete(idx, now, CloseReason::Expired, relays);
            }
        }
    }

    /// A client's TCP/TLS connection closed: its allocation goes with it
    /// (RFC 8656 §3.1: the allocation is bound to the 5-tuple).
    pub fn handle_connection_closed(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        relays: &mut dyn RelayProvider,
    ) {
        if let Some(&idx) = self.by_tuple.get(&tuple) {
            self.delete(idx, now, CloseReason::ConnectionClosed, relays);
        }
    }

    /// Deletes every allocation (shutdown), closing their relay sockets.
    pub fn close_all(&mut self, now: Instant, relays: &mut dyn RelayProvider) {
        let idxs: Vec<u32> = self.by_tuple.values().copied().collect();
        for idx in idxs {
            self.delete(idx, now, CloseReason::Deleted, relays);
        }
    }

    fn delete(&mut self, idx: u32, now: Instant, reason: CloseReason, relays: &mut dyn RelayProvider) {
        let Some(a) = self.allocs[idx as usize].take() else {
            return;
        };
        self.free.push(idx);
        self.by_tuple.remove(&a.tuple);
        self.by_relay.remove(&a.relay);
        relays.close(a.relay);
        self.cfg.quotas.release(&a.username);
        self.release_user_slot(a.user_slot);
        let t = a.tuple.transport.index();
        if reason == CloseReason::Expired {
            self.counters.allocations_expired[t] += 1;
        } else {
            self.counters.allocations_deleted[t] += 1;
        }
        self.counters.to_peer_packets += a.stats.to_peer_packets;
        self.counters.to_peer_bytes += a.stats.to_peer_bytes;
        self.counters.from_peer_packets += a.stats.from_peer_packets;
        self.counters.from_peer_bytes += a.stats.from_peer_bytes;
        self.events.push_back(Event::AllocationDeleted {
            tuple: a.tuple,
            username: a.username,
            relayed: a.advertised,
            reason,
            stats: a.stats,
            age: now.saturating_duration_since(a.created),
        });
    }

    /// Processes one packet from a client: a whole UDP datagram, or one
    /// framed message from a TCP/TLS stream. Malformed input is dropped
    /// silently (RFC 8489 §6.3) and yields `None`.
    pub fn handle_client<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        data: &'a [u8],
        relays: &mut dyn RelayProvider,
    ) -> Option<Transmit<'a>> {
        match packet_kind(data) {
            PacketKind::Stun => {
                let msg = Message::parse(data).ok()?;
                let typ = msg.message_type();
                match typ.class {
                    Class::Request => self.handle_request(now, tuple, &msg, relays),
                    Class::Indication if typ.method == method::SEND => self.handle_send(now, tuple, &msg),
                    // Responses and other indications sent to a server are dropped.
                    _ => None,
                }
            }
            PacketKind::ChannelData => self.handle_channel_data(now, tuple, data),
            PacketKind::Other => None,
        }
    }

    /// RFC 8656 §11.2: a Send indication relays DATA to XOR-PEER-ADDRESS if a
    /// permission exists; anything wrong drops it silently.
    fn handle_send<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'a>,
    ) -> Option<Transmit<'a>> {
        let &idx = self.by_tuple.get(&tuple)?;
        let peer = msg.get_xor_addr(attr::XOR_PEER_ADDRESS)?.ok()?;
        let data = msg.get(attr::DATA)?;
        let a = self.allocs[idx as usize].as_mut()?;
        if peer.is_ipv4() != a.relay.is_ipv4() {
            return None;
        }
        if let Err(reason) = self.cfg.policy.check(peer) {
            self.counters.peers_refused += 1;
            self.events.push_back(Event::PeerRefused {
                tuple,
                username: a.username.clone(),
                peer,
                reason,
            });
            return None;
        }
        if !a.has_permission(peer.ip(), now) {
            return None;
        }
        if !admit_relayed(
            &self.cfg,
            &mut self.user_bw,
            &mut self.counters,
            a,
            now,
            data.len(),
            true,
        ) {
            return None;
        }
        Some(Transmit {
            dest: Dest::Peer { relay: a.relay, peer },
            data,
        })
    }

    /// RFC 8656 §12.6: ChannelData from the client goes to the bound peer,
    /// without a copy. Unknown channel, expired binding or no permission:
    /// dropped. ChannelData never refreshes a permission.
    fn handle_channel_data<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        data: &'a [u8],
    ) -> Option<Transmit<'a>> {
        let cd = ChannelData::parse(data)?;
        let &idx = self.by_tuple.get(&tuple)?;
        let a = self.allocs[idx as usize].as_mut()?;
        let binding = a
            .channels
            .iter()
            .find(|c| c.number == cd.channel && c.expires > now)?;
        let peer = binding.peer;
        if !a.has_permission(peer.ip(), now) {
            return None;
        }
        if !admit_relayed(
            &self.cfg,
            &mut self.user_bw,
            &mut self.counters,
            a,
            now,
            cd.data.len(),
            true,
        ) {
            return None;
        }
        Some(Transmit {
            dest: Dest::Peer { relay: a.relay, peer },
            data: cd.data,
        })
    }

    /// Processes a datagram a relay socket received from `peer`
    /// (RFC 8656 §11.3, §12.7): with a permission it goes to the client as
    /// ChannelData when a channel is bound to the peer, else as a Data
    /// indication; without one it is dropped.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
    ) -> Option<Transmit<'_>> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let dest = self.handle_peer_into(now, relay, peer, data, &mut out);
        self.out = out;
        Some(Transmit {
            dest: dest?,
            data: &self.out,
        })
    }

    /// [`Server::handle_peer`], appending the datagram for the client to
    /// `out` instead of an internal buffer, so a runtime that batches its
    /// sends copies the payload once, straight into its send queue. Returns
    /// where the appended bytes go; on `None` nothing was appended.
    pub fn handle_peer_into(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Dest> {
        let &idx = self.by_relay.get(&relay)?;
        let a = self.allocs[idx as usize].as_mut()?;
        if a.expires <= now || !a.has_permission(peer.ip(), now) {
            return None;
        }
        if data.len() > u16::MAX as usize {
            return None;
        }
        if !admit_relayed(
            &self.cfg,
            &mut self.user_bw,
            &mut self.counters,
            a,
            now,
            data.len(),
            false,
        ) {
            return None;
        }
        let tuple = a.tuple;
        if let Some(c) = a.channels.iter().find(|c| c.peer == peer && c.expires > now) {
            out.extend_from_slice(&ChannelData::header(c.number, data.len() as u16));
            out.extend_from_slice(data);
            if tuple.transport.is_stream() {
                // RFC 8656 §12.5: over TCP/TLS, pad to a multiple of four.
                let pad = (4 - data.len() % 4) % 4;
                out.extend_from_slice(&[0u8; 3][..pad]);
            }
        } else {
            self.data_seq = self.data_seq.wrapping_add(1);
            let txid = data_indication_txid(self.data_seq);
            let mut b = MessageBuilder::append(out, MessageType::new(method::DATA, Class::Indication), &txid);
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, data);
        }
        Some(Dest::Client(tuple))
    }

    fn handle_request<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'a>,
        relays: &mut dyn RelayProvider,
    ) -> Option<Transmit<'a>> {
        let m = msg.message_type().method;
        if m == method::BINDING {
            // An unauthenticated answer: limited per source against reflection.
            if !self.may_answer_unauthenticated(tuple, now) {
                return None;
            }
            // RFC 8489 §6.3.1: 420 for unknown comprehension-required
            // attributes; the RFC 5780 ones are known only when it is on.
            let extra: &[u16] = if self.cfg.rfc5780.is_some() {
                RFC5780_ATTRS
            } else {
                &[]
            };
            if let Some((list, n)) = unknown_required_with(msg, extra) {
                return Some(self.respond(now, tuple, msg, Reply::Unknown(list, n), None));
            }
            if let Some(r) = self.cfg.rfc5780 {
                return Some(self.binding_5780(now, tuple, msg, r));
            }
            return Some(self.respond(now, tuple, msg, Reply::Ok, None));
        }
        if !matches!(
            m,
            method::ALLOCATE | method::REFRESH | method::CREATE_PERMISSION | method::CHANNEL_BIND
        ) {
            if !self.may_answer_unauthenticated(tuple, now) {
                return None;
            }
            return Some(self.respond(now, tuple, msg, Reply::Error(400), None));
        }
        // RFC 8489 §9.2.4: authenticate before anything else.
        let auth = match self.authenticate(now, tuple, msg) {
            Ok(a) => a,
            Err(None) => return None,
            Err(Some(code)) => {
                if !self.may_answer_unauthenticated(tuple, now) {
                    return None;
                }
                return Some(self.respond(now, tuple, msg, Reply::Error(code), None));
            }
        };
        let signer = Some((auth.key, auth.sha256));
        if let Some((list, n)) = unknown_required(msg) {
            return Some(self.respond(now, tuple, msg, Reply::Unknown(list, n), signer));
        }
        let existing = self.by_tuple.get(&tuple).copied();
        if let Some(idx) = existing {
            if let Some(a) = &self.allocs[idx as usize] {
                // RFC 8656 §7: requests on an allocation must use its username.
                if *a.username != *auth.username {
                    return Some(self.respond(now, tuple, msg, Reply::Error(441), signer));
                }
            }
        }
        let reply = match m {
            method::ALLOCATE => self.allocate(now, tuple, msg, &auth, existing, relays),
            method::REFRESH => self.refresh(now, msg, existing, relays),
            method::CREATE_PERMISSION => self.create_permission(now, tuple, msg, existing),
            _ => self.channel_bind(now, tuple, msg, existing),
        };
        Some(self.respond(now, tuple, msg, reply, signer))
    }

    /// The per-source budget for answers to unauthenticated requests
    /// (reflection); counts what it refuses.
    fn may_answer_unauthenticated(&mut self, tuple: FiveTuple, now: Instant) -> bool {
        let ok = self.limiter.allow(tuple.client.ip(), now);
        if !ok {
            self.counters.rate_limited += 1;
        }
        ok
    }

    /// RFC 8489 §9.2.4 long-term credential checks, in the RFC's order.
    /// `Err(Some(code))`: answer with that error; `Err(None)`: drop silently
    /// (the username/source pair is blocked or throttled).
    fn authenticate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
    ) -> Result<Authenticated, Option<u16>> {
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            return Err(Some(401));
        }
        let user_attr = msg.get(attr::USERNAME);
        let hash_attr = msg.get(attr::USERHASH);
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            return Err(Some(400));
        };
        if user_attr.is_none() && hash_attr.is_none() {
            return Err(Some(400));
        }
        if user_attr.is_some_and(|u| u.len() > MAX_USERNAME_LEN)
            || hash_attr.is_some_and(|h| h.len() != 32)
            || realm.len() > attr::MAX_TEXT_ATTR_LEN
            || nonce.len() > attr::MAX_TEXT_ATTR_LEN
        {
            return Err(Some(400));
        }
        if !self
            .minter
            .is_valid(nonce, self.nonce_secs(now), tuple.client.ip())
        {
            return Err(Some(438));
        }
        // §9.2.4 bid-down protection: our nonces advertise password
        // algorithms, so a request carries both PASSWORD-ALGORITHMS (echoing
        // our list exactly) and PASSWORD-ALGORITHM (one of it), or neither
        // (MD5). Anything else means the list was tampered with.
        let alg = match (
            msg.get(attr::PASSWORD_ALGORITHMS),
            msg.get(attr::PASSWORD_ALGORITHM),
        ) {
            (None, None) => PasswordAlgorithm::Md5,
            (Some(list), Some(chosen)) if list == OFFERED_ALGORITHMS => match chosen {
                [0x00, 0x01, 0x00, 0x00] => PasswordAlgorithm::Md5,
                [0x00, 0x02, 0x00, 0x00] => PasswordAlgorithm::Sha256,
                _ => return Err(Some(400)),
            },
            _ => return Err(Some(400)),
        };
        let ident = user_attr.or(hash_attr).unwrap_or_default();
        let ip = tuple.client.ip();
        match self.guard.verdict(ident, ip, now) {
            Verdict::Check => {}
            Verdict::Throttled | Verdict::Blocked => {
                self.counters.auth_throttled += 1;
                return Err(None);
            }
        }
        let username = match (user_attr, hash_attr) {
            (Some(u), _) => std::str::from_utf8(u).ok().map(str::to_owned),
            (None, Some(h)) => self.cfg.credentials.username_for_hash(h).map(str::to_owned),
            (None, None) => None,
        };
        let verified = match username {
            Some(username) if realm == self.cfg.realm.as_bytes() => {
                let unix = self.unix_now(now);
                let mut keys = std::mem::take(&mut self.keys);
                let found =
                    match self
                        .cfg
                        .credentials
                        .keys_for(&username, &self.cfg.realm, unix, alg, &mut keys)
                    {
                        Err(_) => None,
                        Ok(()) => keys.iter().copied().find(|k| {
                            if msg.has_integrity_sha256() {
                                msg.verify_integrity_sha256(k.as_bytes())
                            } else {
                                msg.verify_integrity(k.as_bytes())
                            }
                        }),
                    };
                self.keys = keys;
                found.map(|key| Authenticated {
                    key,
                    sha256: msg.has_integrity_sha256(),
                    username,
                })
            }
            _ => None,
        };
        match verified {
            Some(a) => {
                self.guard.succeeded(ident, ip);
                Ok(a)
            }
            None => {
                self.counters.auth_failures += 1;
                if self.guard.failed(ident, ip, now) {
                    self.events.push_back(Event::AuthBlocked {
                        client: tuple.client,
                        username: String::from_utf8_lossy(ident).into_owned(),
                    });
                }
                Err(Some(401))
            }
        }
    }

    fn lifetime(&self, requested: Option<u32>) -> Duration {
        // RFC 8656 §7.2: a requested lifetime is honoured up to the maximum;
        // shorter than the default is raised to the default.
        match requested {
            None => self.cfg.default_lifetime,
            Some(s) => Duration::from_secs(s as u64).clamp(self.cfg.default_lifetime, self.cfg.max_lifetime),
        }
    }

    fn advertise(&self, relay: SocketAddr) -> SocketAddr {
        match relay.ip() {
            IpAddr::V4(_) => match self.cfg.external_ipv4 {
                Some(ip) => SocketAddr::new(IpAddr::V4(ip), relay.port()),
                None => relay,
            },
            IpAddr::V6(_) => match self.cfg.external_ipv6 {
                Some(ip) => SocketAddr::new(IpAddr::V6(ip), relay.port()),
                None => relay,
            },
        }
    }

    /// RFC 8656 §7.2.
    fn allocate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
        existing: Option<u32>,
        relays: &mut dyn RelayProvider,
    ) -> Reply {
        if let Some(idx) = existing {
            if let Some(a) = &self.allocs[idx as usize] {
                // A retransmission of the request that created the allocation
                // gets the same success answer; anything else is a mismatch.
                if a.txid == msg.transaction_id() {
                    let left = a.expires.saturating_duration_since(now).as_secs() as u32;
                    return Reply::AllocateOk {
                        relayed: a.advertised,
                        lifetime: left,
                        token: a.token,
                    };
                }
            }
            return Reply::Error(437);
        }
        let Some(rt) = msg.get(attr::REQUESTED_TRANSPORT) else {
            return Reply::Error(400);
        };
        if rt.len() != 4 {
            return Reply::Error(400);
        }
        if rt[0] != attr::PROTOCOL_UDP {
            return Reply::Error(442);
        }
        let has_token = msg.has(attr::RESERVATION_TOKEN);
        let family = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        if has_token && (msg.has(attr::EVEN_PORT) || family.is_some()) {
            return Reply::Error(400);
        }
        if family.is_some() && msg.has(attr::ADDITIONAL_ADDRESS_FAMILY) {
            return Reply::Error(400);
        }
        let ipv6 = match family {
            None => false,
            Some(v) if v.len() != 4 => return Reply::Error(400),
            Some(v) if v[0] == attr::FAMILY_IPV4 => false,
            Some(v) if v[0] == attr::FAMILY_IPV6 => true,
            Some(_) => return Reply::Error(440),
        };
        let (even_port, reserve_next) = match msg.get(attr::EVEN_PORT) {
            None => (false, false),
            Some([]) => return Reply::Error(400),
            Some(v) => (true, v[0] & 0x80 != 0),
        };
        // Draining (operator's drain): no new allocations here.
        if self.cfg.draining.load(std::sync::atomic::Ordering::Relaxed) {
            let family_v6 = tuple.server.is_ipv6();
            return match self
                .cfg
                .alternate_servers
                .iter()
                .find(|a| a.is_ipv6() == family_v6)
            {
                Some(alt) => Reply::TryAlternate(*alt),
                None => {
                    self.counters.capacity += 1;
                    Reply::Error(508)
                }
            };
        }
        // Every check that can fail comes before the quota is taken, so no
        // error path below has to give it back (the fuzzer found one that
        // did not).
        let token = match msg.get(attr::RESERVATION_TOKEN) {
            None => None,
            Some(t) => match <[u8; 8]>::try_from(t) {
                Ok(t) => Some(t),
                Err(_) => return Reply::Error(400),
            },
        };
        let lifetime = self.lifetime(msg.get_u32(attr::LIFETIME));
        let username: Arc<str> = Arc::from(auth.username.as_str());
        match self.cfg.quotas.acquire(&username) {
            Ok(()) => {}
            Err(QuotaError::User) => {
                self.counters.quota_user += 1;
                return Reply::Error(486);
            }
            Err(QuotaError::Total) => {
                self.counters.capacity += 1;
                return Reply::Error(508);
            }
        }
        let opened = match token {
            // An unknown or expired token: RFC 8656 §7.2 says 508.
            Some(token) => relays
                .open_reserved(token)
                .map(|addr| OpenedRelay { addr, token: None }),
            None => relays.open(RelayRequest {
                ipv6,
                even_port,
                reserve_next,
            }),
        };
        let (relay, token) = match opened {
            Ok(o) => (o.addr, o.token),
            Err(e) => {
                self.cfg.quotas.release(&username);
                if e == RelayError::Exhausted {
                    self.counters.capacity += 1;
                    return Reply::Error(508);
                }
                return Reply::Error(440);
            }
        };
        let advertised = self.advertise(relay);
        let user_slot = self.user_slot(&username);
        let alloc = Allocation {
            tuple,
            relay,
            advertised,
            username: username.clone(),
            txid: msg.transaction_id(),
            token,
            created: now,
            expires: now + lifetime,
            permissions: Vec::new(),
            channels: Vec::new(),
            stats: Stats::default(),
            bw_up: Bucket::new(),
            bw_down: Bucket::new(),
            user_slot,
        };
        let idx = match self.free.pop() {
            Some(i) => {
                self.allocs[i as usize] = Some(alloc);
                i
            }
            None => {
                self.allocs.push(Some(alloc));
                (self.allocs.len() - 1) as u32
            }
        };
        self.by_tuple.insert(tuple, idx);
        self.by_relay.insert(relay, idx);
        self.timers.push(Reverse((now + lifetime, idx)));
        self.counters.allocations_created[tuple.transport.index()] += 1;
        self.events.push_back(Event::AllocationCreated {
            tuple,
            username,
            relayed: advertised,
            lifetime,
        });
        Reply::AllocateOk {
            relayed: advertised,
            lifetime: lifetime.as_secs() as u32,
            token,
        }
    }

    /// RFC 8656 §7.3.
    fn refresh(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        existing: Option<u32>,
        relays: &mut dyn RelayProvider,
    ) -> Reply {
        let Some(idx) = existing else {
            return Reply::Error(437);
        };
        if let Some(v) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let ipv6 = self.allocs[idx as usize]
                .as_ref()
                .is_some_and(|a| a.relay.is_ipv6());
            let asked_v6 = v.first() == Some(&attr::FAMILY_IPV6);
            if asked_v6 != ipv6 {
                return Reply::Error(443);
            }
        }
        let requested = msg.get_u32(attr::LIFETIME);
        if requested == Some(0) {
            self.delete(idx, now, CloseReason::Deleted, relays);
            return Reply::RefreshOk { lifetime: 0 };
        }
        let lifetime = self.lifetime(requested);
        if let Some(a) = self.allocs[idx as usize].as_mut() {
            a.expires = now + lifetime;
            a.purge(now);
        }
        self.timers.push(Reverse((now + lifetime, idx)));
        Reply::RefreshOk {
            lifetime: lifetime.as_secs() as u32,
        }
    }

    /// Checks one peer for CreatePermission/ChannelBind: family (443) then
    /// policy (403, logged).
    fn check_peer(
        &mut self,
        tuple: FiveTuple,
        relay_v6: bool,
        username: &Arc<str>,
        peer: SocketAddr,
    ) -> Result<(), u16> {
        if peer.is_ipv6() != relay_v6 {
            return Err(443);
        }
        if let Err(reason) = self.cfg.policy.check(peer) {
            self.counters.peers_refused += 1;
            self.events.push_back(Event::PeerRefused {
                tuple,
                username: username.clone(),
                peer,
                reason,
            });
            return Err(403);
        }
        Ok(())
    }

    /// RFC 8656 §9.2: every XOR-PEER-ADDRESS is checked before any is installed.
    fn create_permission(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        existing: Option<u32>,
    ) -> Reply {
        let Some(idx) = existing else {
            return Reply::Error(437);
        };
        let Some(a) = self.allocs[idx as usize].as_ref() else {
            return Reply::Error(437);
        };
        let (relay_v6, username) = (a.relay.is_ipv6(), a.username.clone());
        let mut peers: [Option<IpAddr>; 16] = [None; 16];
        let mut n = 0;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let Ok(peer) = msg.decode_xor_addr(v) else {
                return Reply::Error(400);
            };
            if let Err(code) = self.check_peer(tuple, relay_v6, &username, peer) {
                return Reply::Error(code);
            }
            if n == peers.len() {
                return Reply::Error(400);
            }
            peers[n] = Some(peer.ip());
            n += 1;
        }
        if n == 0 {
            return Reply::Error(400);
        }
        let expires = now + self.cfg.permission_lifetime;
        let max = self.cfg.max_permissions;
        let Some(a) = self.allocs[idx as usize].as_mut() else {
            return Reply::Error(437);
        };
        a.purge(now);
        let new = peers[..n]
            .iter()
            .flatten()
            .filter(|ip| !a.permissions.iter().any(|p| p.ip == **ip))
            .count();
        if a.permissions.len() + new > max {
            return Reply::Error(508);
        }
        for ip in peers[..n].iter().flatten() {
            a.install_permission(*ip, expires);
        }
        Reply::Ok
    }

    /// RFC 8656 §11.2.
    fn channel_bind(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        existing: Option<u32>,
    ) -> Reply {
        let Some(idx) = existing else {
            return Reply::Error(437);
        };
        let Some(a) = self.allocs[idx as usize].as_ref() else {
            return Reply::Error(437);
        };
        let (relay_v6, username) = (a.relay.is_ipv6(), a.username.clone());
        let (Some(ch), Some(peer)) = (
            msg.get(attr::CHANNEL_NUMBER),
            msg.get_xor_addr(attr::XOR_PEER_ADDRESS),
        ) else {
            return Reply::Error(400);
        };
        if ch.len() != 4 {
            return Reply::Error(400);
        }
        let number = u16::from_be_bytes([ch[0], ch[1]]);
        let top = if self.cfg.legacy_channel_numbers {
            0x7FFF
        } else {
            0x4FFF
        };
        if !(0x4000..=top).contains(&number) {
            return Reply::Error(400);
        }
        let Ok(peer) = peer else {
            return Reply::Error(400);
        };
        if let Err(code) = self.check_peer(tuple, relay_v6, &username, peer) {
            return Reply::Error(code);
        }
        let (ch_exp, perm_exp) = (
            now + self.cfg.channel_lifetime,
            now + self.cfg.permission_lifetime,
        );
        let (max_ch, max_perm) = (self.cfg.max_channels, self.cfg.max_permissions);
        let Some(a) = self.allocs[idx as usize].as_mut() else {
            return Reply::Error(437);
        };
        a.purge(now);
        // A number bound to another peer, or a peer bound to another number,
        // is a conflict (RFC 8656 §11.2), including during the cool-down.
        if a.channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer))
        {
            return Reply::Error(400);
        }
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = ch_exp,
            None => {
                if a.channels.len() >= max_ch {
                    return Reply::Error(508);
                }
                if !a.permissions.iter().any(|p| p.ip == peer.ip()) && a.permissions.len() >= max_perm {
                    return Reply::Error(508);
                }
                a.channels.push(ChannelBinding {
                    number,
                    peer,
                    expires: ch_exp,
                });
            }
        }
        a.install_permission(peer.ip(), perm_exp);
        Reply::Ok
    }

    /// Writes the response to `req` into the scratch buffer.
    fn respond(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        req: &Message<'_>,
        reply: Reply,
        signer: Option<(Key, bool)>,
    ) -> Transmit<'_> {
        let typ = req.message_type();
        let txid = req.transaction_id();
        let nonce = match reply {
            Reply::Error(401 | 438) => Some(self.minter.mint(self.nonce_secs(now), tuple.client.ip())),
            _ => None,
        };
        match reply {
            Reply::Error(code) => self.counters.count_error(code),
            Reply::Unknown(..) => self.counters.count_error(420),
            Reply::TryAlternate(_) => self.counters.count_error(300),
            _ if typ.method == method::BINDING => self.counters.bindings += 1,
            _ => {}
        }
        let class = match reply {
            Reply::Error(_) | Reply::Unknown(..) | Reply::TryAlternate(_) => Class::Error,
            _ => Class::Success,
        };
        let mut b = MessageBuilder::new(&mut self.out, MessageType::new(typ.method, class), &txid);
        match reply {
            Reply::Error(code) => {
                // The challenges (401, 438) go to unauthenticated sources:
                // no reason phrase, to keep the reflection small; the code
                // says it all.
                let reason = if nonce.is_some() { "" } else { reason_phrase(code) };
                b.error_code(code, reason);
                if let Some(n) = &nonce {
                    // RFC 8489 §9.2.4: the nonce's cookie advertises
                    // password algorithms, so the list comes with it.
                    b.attr(attr::REALM, self.cfg.realm.as_bytes())
                        .attr(attr::NONCE, n)
                        .attr(attr::PASSWORD_ALGORITHMS, &OFFERED_ALGORITHMS);
                }
            }
            Reply::TryAlternate(alt) => {
                b.error_code(300, reason_phrase(300))
                    .addr(attr::ALTERNATE_SERVER, alt);
            }
            Reply::Unknown(list, n) => {
                b.error_code(420, reason_phrase(420))
                    .unknown_attributes(&list[..n]);
            }
            Reply::AllocateOk {
                relayed,
                lifetime,
                token,
            } => {
                b.xor_addr(attr::XOR_RELAYED_ADDRESS, relayed)
                    .u32(attr::LIFETIME, lifetime)
                    .xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
                if let Some(t) = token {
                    b.attr(attr::RESERVATION_TOKEN, &t);
                }
            }
            Reply::RefreshOk { lifetime } => {
                b.u32(attr::LIFETIME, lifetime);
            }
            Reply::Ok => {
                if typ.method == method::BINDING {
                    b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
                }
            }
            Reply::Binding5780 {
                origin,
                other,
                padding,
            } => {
                b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client)
                    .addr(attr::RESPONSE_ORIGIN, origin)
                    .addr(attr::OTHER_ADDRESS, other);
                if padding > 0 {
                    b.attr(attr::PADDING, &[0u8; MAX_PADDING][..padding as usize]);
                }
            }
        }
        if let Some(s) = &self.cfg.software {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        match signer {
            Some((k, true)) => {
                b.message_integrity_sha256(k.as_bytes());
            }
            Some((k, false)) => {
                b.message_integrity(k.as_bytes());
            }
            None => {}
        }
        if req.has_fingerprint() {
            b.fingerprint();
        }
        Transmit {
            dest: Dest::Client(tuple),
            data: &self.out,
        }
    }
}

/// Unknown comprehension-required attribute types in `msg`, at most eight.
fn unknown_required(msg: &Message<'_>) -> Option<([u16; 8], usize)> {
    unknown_required_with(msg, &[])
}

/// RFC 5780 attributes, known when behaviour discovery is on.
const RFC5780_ATTRS: &[u16] = &[attr::CHANGE_REQUEST, attr::RESPONSE_PORT, attr::PADDING];

/// Largest PADDING echoed back (RFC 5780 §7.6), so it cannot amplify.
const MAX_PADDING: usize = 1024;

/// Like [`unknown_required`], with `extra` types also known.
fn unknown_required_with(msg: &Message<'_>, extra: &[u16]) -> Option<([u16; 8], usize)> {
    let mut list = [0u16; 8];
    let mut n = 0;
    for t in msg.attr_types() {
        if attr::is_comprehension_required(t)
            && !KNOWN_REQUIRED.contains(&t)
            && !extra.contains(&t)
            && !list[..n].contains(&t)
            && n < list.len()
        {
            list[n] = t;
            n += 1;
        }
    }
    (n > 0).then_some((list, n))
}

/// Transaction ids of Data indications need not be random (the client does
/// not match them to anything); a counter avoids an RNG call per packet.
fn data_indication_txid(seed: u64) -> TransactionId {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&seed.to_le_bytes());
    t
}

impl Server {
    /// The user's shared bandwidth slot on this worker, created on first use.
    fn user_slot(&mut self, name: &Arc<str>) -> u32 {
        if let Some(&i) = self.user_bw_index.get(name) {
            if let Some(u) = self.user_bw[i as usize].as_mut() {
                u.refs += 1;
            }
            return i;
        }
        let entry = UserBandwidth {
            name: name.clone(),
            up: Bucket::new(),
            down: Bucket::new(),
            refs: 1,
        };
        let i = match self.user_bw_free.pop() {
            Some(i) => {
                self.user_bw[i as usize] = Some(entry);
                i
            }
            None => {
                self.user_bw.push(Some(entry));
                (self.user_bw.len() - 1) as u32
            }
        };
        self.user_bw_index.insert(name.clone(), i);
        i
    }

    fn release_user_slot(&mut self, i: u32) {
        let Some(u) = self.user_bw.get_mut(i as usize).and_then(|u| u.as_mut()) else {
            return;
        };
        u.refs -= 1;
        if u.refs == 0 {
            self.user_bw_index.remove(&u.name);
            self.user_bw[i as usize] = None;
            self.user_bw_free.push(i);
        }
    }
}

/// Admits one relayed packet: checks the per-allocation and per-user
/// bandwidth caps (a packet over either is dropped and counted; both
/// buckets hold one second of traffic), then counts it in the allocation's
/// stats. Every relay path goes through here.
fn admit_relayed(
    cfg: &Config,
    user_bw: &mut [Option<UserBandwidth>],
    counters: &mut Counters,
    a: &mut Allocation,
    now: Instant,
    len: usize,
    up: bool,
) -> bool {
    let len = len as u64;
    if cfg.max_bps != 0 {
        let b = if up { &mut a.bw_up } else { &mut a.bw_down };
        if !b.take(now, cfg.max_bps, cfg.max_bps, len) {
            counters.bandwidth_dropped += 1;
            return false;
        }
    }
    if cfg.user_max_bps != 0 {
        if let Some(Some(u)) = user_bw.get_mut(a.user_slot as usize) {
            let b = if up { &mut u.up } else { &mut u.down };
            if !b.take(now, cfg.user_max_bps, cfg.user_max_bps, len) {
                counters.bandwidth_dropped += 1;
                return false;
            }
        }
    }
    if up {
        a.stats.to_peer_packets += 1;
        a.stats.to_peer_bytes += len;
    } else {
        a.stats.from_peer_packets += 1;
        a.stats.from_peer_bytes += len;
    }
    true
}

impl Server {
    /// RFC 5780 §6.1: a Binding answered with RESPONSE-ORIGIN and
    /// OTHER-ADDRESS, from the socket CHANGE-REQUEST asks for, to the port
    /// RESPONSE-PORT asks for.
    fn binding_5780(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        r: Rfc5780,
    ) -> Transmit<'_> {
        let local = tuple.server;
        let other = SocketAddr::new(r.other_ip(local.ip()), r.other_port(local.port()));
        let (mut change_ip, mut change_port) = (false, false);
        if let Some(v) = msg.get(attr::CHANGE_REQUEST) {
            let Ok(v) = <[u8; 4]>::try_from(v) else {
                return self.respond(now, tuple, msg, Reply::Error(400), None);
            };
            change_ip = v[3] & 0x04 != 0;
            change_port = v[3] & 0x02 != 0;
        }
        let response_port = match msg.get(attr::RESPONSE_PORT) {
            None => None,
            Some(v) if v.len() == 4 => Some(u16::from_be_bytes([v[0], v[1]])),
            Some(_) => return self.respond(now, tuple, msg, Reply::Error(400), None),
        };
        if tuple.transport != Transport::Udp && (change_ip || change_port || response_port.is_some()) {
            // A stream cannot be answered from another address or port.
            return self.respond(now, tuple, msg, Reply::Error(400), None);
        }
        let origin = SocketAddr::new(
            if change_ip { other.ip() } else { local.ip() },
            if change_port { other.port() } else { local.port() },
        );
        let padding = msg
            .get(attr::PADDING)
            .map(|p| p.len().min(MAX_PADDING) as u16)
            .unwrap_or(0);
        let to = SocketAddr::new(tuple.client.ip(), response_port.unwrap_or(tuple.client.port()));
        let mut t = self.respond(
            now,
            tuple,
            msg,
            Reply::Binding5780 {
                origin,
                other,
                padding,
            },
            None,
        );
        if origin != local || to != tuple.client {
            t.dest = Dest::Via { local: origin, to };
        }
        t
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// Per-allocation state stays small: BENCHMARKS.md reports these sizes
    /// next to the measured RSS per held allocation.
    #[test]
    fn per_allocation_state_is_small() {
        let sizes = [
            ("Allocation", std::mem::size_of::<Allocation>()),
            ("Permission", std::mem::size_of::<Permission>()),
            ("ChannelBinding", std::mem::size_of::<ChannelBinding>()),
            ("FiveTuple", std::mem::size_of::<FiveTuple>()),
        ];
        for (name, size) in sizes {
            eprintln!("size_of::<{name}>() = {size}");
        }
        assert!(
            std::mem::size_of::<Allocation>() <= 384,
            "grew past the budget BENCHMARKS.md reports"
        );
    }
}
