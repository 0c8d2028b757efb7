//! Settings of a [`crate::Server`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::Credentials;
use crate::limits::{AuthGuard, Quotas, SourceLimiter};
use crate::policy::PeerPolicy;

/// Slots in each fixed per-source table (rate limits, brute-force guard),
/// allocated once per server (not per worker).
pub const SOURCE_SLOTS: usize = 1 << 16;

/// The window the brute-force guard counts failures in.
pub const AUTH_WINDOW: Duration = Duration::from_secs(60);

/// The addresses RFC 5780 behaviour discovery uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc5780 {
    /// Primary and alternate IP.
    pub ips: (IpAddr, IpAddr),
    /// Primary and alternate port.
    pub ports: (u16, u16),
}

impl Rfc5780 {
    pub(super) fn other_ip(&self, ip: IpAddr) -> IpAddr {
        if ip == self.ips.0 {
            self.ips.1
        } else {
            self.ips.0
        }
    }

    pub(super) fn other_port(&self, port: u16) -> u16 {
        if port == self.ports.0 {
            self.ports.1
        } else {
            self.ports.0
        }
    }
}

/// What the workers' cores share with each other and with the control
/// plane: live state, not settings. The node makes one and hands clones to
/// every worker ([`crate::Server::with_shared`]); a reload that changes the
/// answer budget or the guard's settings hands new ones
/// ([`crate::Server::reconfigure`]).
#[derive(Debug, Clone)]
pub struct Shared {
    /// Allocation quotas.
    pub quotas: Arc<Quotas>,
    /// Every allocation's relayed addresses on this host (a peer that is
    /// one is allowed in a default-refused range). Read when a server is
    /// made; a reload keeps the server's own.
    pub relayed: Arc<crate::limits::RelayedAddrs>,
    /// Each user's bandwidth buckets (`Config::user_max_bps` holds per
    /// host). Read when a server is made; a reload keeps the server's own.
    pub user_bandwidth: Arc<crate::limits::UserBandwidth>,
    /// Answers per second to unauthenticated requests from one source IP
    /// (burst twice that), one budget; rate 0 turns the limit off.
    pub source_limiter: Arc<SourceLimiter>,
    /// The brute-force guard (failures per account and source IP within a
    /// minute before the pair is blocked); limit 0 turns it off.
    pub auth_guard: Arc<AuthGuard>,
    /// Set while the server drains: new allocations are refused (300 with
    /// ALTERNATE-SERVER when `Config::alternate_servers` has one of the
    /// family, else 508); existing ones carry on.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    /// A fleet's view: whether this node is over its load, and the
    /// healthy nodes to send new clients to.
    pub redirect: Arc<Redirect>,
}

impl Default for Shared {
    /// Unlimited quotas, 200 answers/s per source, 10 failures a minute
    /// before a block of 300 s, not draining, no fleet.
    fn default() -> Self {
        Shared {
            quotas: Arc::new(Quotas::new(0, 0)),
            relayed: Arc::default(),
            user_bandwidth: Arc::default(),
            source_limiter: Arc::new(SourceLimiter::new(200, SOURCE_SLOTS)),
            auth_guard: Arc::new(AuthGuard::new(
                10,
                AUTH_WINDOW,
                Duration::from_secs(300),
                SOURCE_SLOTS,
            )),
            draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            redirect: Arc::new(Redirect::default()),
        }
    }
}

impl Shared {
    /// A per-source answer budget of its own: `rate` answers per second
    /// (0: off).
    pub fn set_rate_limit_per_ip(&mut self, rate: u32) {
        self.source_limiter = Arc::new(SourceLimiter::new(rate, SOURCE_SLOTS));
    }

    /// Rebuilds the per-source tables (answer budget, brute-force guard)
    /// with `slots` slots each, keeping their settings: small tables for
    /// tests and the fuzzer, which build a server per input.
    pub fn set_source_slots(&mut self, slots: usize) {
        let (limit, block) = self.auth_guard.settings();
        self.source_limiter = Arc::new(SourceLimiter::new(self.source_limiter.rate(), slots));
        self.auth_guard = Arc::new(AuthGuard::new(limit, AUTH_WINDOW, block, slots));
    }

    /// A brute-force guard of its own: `limit` failures
    /// per account and source within [`AUTH_WINDOW`] block for `block`
    /// (0: off).
    pub fn set_auth_guard(&mut self, limit: u32, block: Duration) {
        self.auth_guard = Arc::new(AuthGuard::new(limit, AUTH_WINDOW, block, SOURCE_SLOTS));
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
    /// Bytes per second each allocation may relay in each direction; 0: no cap.
    pub max_bps: u64,
    /// Bytes per second one user's allocations on one worker may relay in
    /// each direction; 0: no cap.
    pub user_max_bps: u64,
    /// Bytes one allocation may relay in all (both directions together);
    /// one that has is ended (reason `quota`). 0: no cap.
    pub max_allocation_bytes: u64,
    /// Allocations may ask for DONT-FRAGMENT (RFC 8656 §14.8); when false,
    /// such an Allocate gets 420 as the RFC requires of a server that
    /// cannot set DF.
    pub dont_fragment: bool,
    /// ICMP errors relayed to one allocation per second (RFC 8656 §11.5);
    /// 0: none are relayed.
    pub icmp_per_second: u32,
    /// Where draining sends new clients (RFC 8489 §14.15 ALTERNATE-SERVER).
    pub alternate_servers: Vec<SocketAddr>,
    /// Challenge a minimal Allocate even when the realm makes the challenge
    /// more than `CHALLENGE_RATIO` times its size (challenge.rs). Off: such
    /// a realm is refused at start by the runtime.
    pub long_realm: bool,
    /// The top byte of this worker's CONNECTION-IDs (RFC 6062), so a data
    /// connection that reaches another worker can be passed to this one.
    pub connection_id_tag: u8,
    /// Peer data connections one TCP allocation may hold (RFC 6062).
    pub max_tcp_connections: usize,
    /// How long a Connect may take before 447 (RFC 6062 §5.2: at least 30 s).
    pub tcp_connect_timeout: Duration,
    /// A kernel fast path is loaded: bound channels of UDP allocations are
    /// handed to it ([`crate::Command::FastPathInstall`]).
    pub fast_path: bool,
    /// RFC 8016 mobility: an Allocate with MOBILITY-TICKET gets a ticket,
    /// and a Refresh from another 5-tuple with it moves the allocation.
    /// Off (the default): such an Allocate gets 405.
    pub mobility: bool,
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
            max_bps: 0,
            user_max_bps: 0,
            max_allocation_bytes: 0,
            dont_fragment: true,
            icmp_per_second: 10,
            rfc5780: None,
            alternate_servers: Vec::new(),
            long_realm: false,
            connection_id_tag: 0,
            max_tcp_connections: 64,
            tcp_connect_timeout: super::tcp_relay::TCP_CONNECTION_TIMEOUT,
            fast_path: false,
            mobility: false,
            epoch,
            unix_at_epoch,
        }
    }
}

impl Config {
    /// What the client is told for a relay bound at `relay`: the external
    /// address of its family when one is configured (a host behind 1:1 NAT).
    pub fn advertise(&self, relay: SocketAddr) -> SocketAddr {
        match relay.ip() {
            IpAddr::V4(_) => match self.external_ipv4 {
                Some(ip) => SocketAddr::new(IpAddr::V4(ip), relay.port()),
                None => relay,
            },
            IpAddr::V6(_) => match self.external_ipv6 {
                Some(ip) => SocketAddr::new(IpAddr::V6(ip), relay.port()),
                None => relay,
            },
        }
    }
}

/// Load-aware redirection (RFC 8489 §14.15, 300 Try Alternate): a fleet's
/// control plane says whether this node is over its configured load and
/// which other nodes are healthy and less loaded, least loaded first. The
/// core reads it on Allocate only.
#[derive(Debug, Default)]
pub struct Redirect {
    overloaded: std::sync::atomic::AtomicBool,
    targets: std::sync::Mutex<Vec<SocketAddr>>,
}

impl Redirect {
    /// Replaces the view.
    pub fn set(&self, overloaded: bool, targets: Vec<SocketAddr>) {
        *self.targets.lock().unwrap_or_else(|p| p.into_inner()) = targets;
        self.overloaded
            .store(overloaded, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether this node is over its load.
    pub fn overloaded(&self) -> bool {
        self.overloaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The least loaded healthy node of the family (the client's server
    /// address family, RFC 8489 §14.15).
    pub fn target(&self, ipv6: bool) -> Option<SocketAddr> {
        let t = self.targets.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().find(|a| a.is_ipv6() == ipv6).copied()
    }
}
