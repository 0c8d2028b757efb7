//! The data plane: one single-threaded mio event loop per worker.
//!
//! Every worker owns SO_REUSEPORT sockets on every listen address, so the
//! kernel's 4-tuple hash pins a client to one worker. The allocations made
//! through a worker, and their relay sockets, live on that worker with its
//! own [`turn_core::Server`]: relaying a packet takes no lock, crosses no
//! channel and allocates nothing. Workers share only the nonce secret and
//! epoch (so any worker accepts any worker's nonce) and a shutdown flag.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{debug, info, warn};
use turn_core::limits::{AuthGuard, SourceCounter, SourceLimiter};
use turn_core::{
    CloseReason, Dest, Event, FiveTuple, ListenerId, OpenedRelay, PeerPolicy, RelayError, RelayProvider,
    RelayRequest, Server, Transmit, Transport,
};

use crate::config::Settings;

const WAKER: Token = Token(usize::MAX);
/// Bytes queued for one TCP/TLS client before further messages to it are
/// dropped (media is real-time: late is as bad as lost).
const MAX_WRITE_BUFFER: usize = 256 * 1024;
/// Largest buffered input: one frame (≤ 65,555 bytes) plus one read.
const MAX_READ_BUFFER: usize = 192 * 1024;
/// How often connections are checked against their timeouts.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long a port reserved by EVEN-PORT's R bit stays claimable
/// (RFC 8656 §7.2: "approximately 30 seconds").
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How often the loop wakes with nothing to do, to notice shutdown.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// The peer policy `settings` describe, refusing the server's own sockets.
fn build_policy(settings: &Settings, own_sockets: &[SocketAddr]) -> PeerPolicy {
    let mut own_ips: Vec<IpAddr> = Vec::new();
    own_ips.extend(settings.relay_v4.map(IpAddr::V4));
    own_ips.extend(settings.relay_v6.map(IpAddr::V6));
    own_ips.extend(settings.external_v4.map(IpAddr::V4));
    own_ips.extend(settings.external_v6.map(IpAddr::V6));
    // Behind a wildcard listener every address of the host is a listener
    // (the policy matches these with the wildcard sockets' ports).
    if own_sockets.iter().any(|s| s.ip().is_unspecified()) {
        own_ips.extend(udp_io::local_addresses());
    }
    PeerPolicy {
        allow: settings.allow_peer.clone(),
        deny: settings.deny_peer.clone(),
        allow_loopback: settings.allow_loopback_peers,
        own_sockets: own_sockets.to_vec(),
        own_ips,
        ..PeerPolicy::default()
    }
}

/// A request from the control plane to a worker, handled in its loop
/// (never on the packet path); the answer goes back on `reply`.
pub enum Command {
    /// List this worker's allocations.
    Sessions(std::sync::mpsc::Sender<Vec<turn_core::SessionInfo>>),
    /// Delete the allocations `pick` selects; answers how many.
    Delete {
        /// Which.
        pick: Arc<dyn Fn(&turn_core::SessionInfo) -> bool + Send + Sync>,
        /// How many were deleted.
        reply: std::sync::mpsc::Sender<usize>,
    },
}

/// What a reload changes in every worker, published under a generation
/// number that workers compare once per loop iteration.
#[derive(Clone)]
struct Update {
    credentials: Option<Arc<turn_core::Credentials>>,
    policy: Option<PeerPolicy>,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: Option<(SharedLimits, u64, u64, ConnLimits)>,
}

#[derive(Default)]
struct Reloads {
    generation: std::sync::atomic::AtomicU64,
    latest: Mutex<Option<Update>>,
}

/// The limits every worker shares, so a source spread over many ports
/// (and so many workers) gets one budget: the unauthenticated-answer rate,
/// the brute-force guard and the per-source connection count. Touched only
/// on unauthenticated answers, authentication and connection set-up.
#[derive(Clone)]
struct SharedLimits {
    answers: Arc<SourceLimiter>,
    guard: Arc<AuthGuard>,
    connections: Arc<SourceCounter>,
}

impl SharedLimits {
    fn new(settings: &Settings) -> Self {
        SharedLimits {
            answers: Arc::new(SourceLimiter::new(
                settings.rate_limit_per_ip,
                turn_core::SOURCE_SLOTS,
            )),
            guard: Arc::new(AuthGuard::new(
                settings.auth_fail_limit,
                turn_core::AUTH_WINDOW,
                Duration::from_secs(settings.auth_block_secs),
                turn_core::SOURCE_SLOTS,
            )),
            connections: Arc::new(SourceCounter::new(turn_core::SOURCE_SLOTS)),
        }
    }

    /// For a reload: tables whose settings did not change are kept (their
    /// counts stay); the connection count always is.
    fn reloaded(&self, settings: &Settings) -> Self {
        let fresh = SharedLimits::new(settings);
        let same_guard = self.guard.settings()
            == (
                settings.auth_fail_limit,
                Duration::from_secs(settings.auth_block_secs),
            );
        SharedLimits {
            answers: if self.answers.rate() == settings.rate_limit_per_ip {
                self.answers.clone()
            } else {
                fresh.answers
            },
            guard: if same_guard {
                self.guard.clone()
            } else {
                fresh.guard
            },
            connections: self.connections.clone(),
        }
    }
}

/// A running server.
pub struct Handle {
    /// The bound UDP+TCP listen addresses (ports resolved when 0 was asked).
    pub listen: Vec<SocketAddr>,
    /// The bound TLS listen addresses.
    pub tls_listen: Vec<SocketAddr>,
    /// RFC 5780: the alternate UDP sockets (alt IP/primary port, primary
    /// IP/alt port, alt IP/alt port).
    pub alt_listen: Vec<SocketAddr>,
    /// SHA-256 fingerprint of the TLS certificate.
    pub tls_fingerprint: Option<String>,
    /// Where Prometheus metrics are served, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The TLS leaf certificate (DER).
    pub tls_leaf: Option<Vec<u8>>,
    stop: Control,
    threads: Vec<JoinHandle<()>>,
}

/// The control plane's hold on a running server, from other threads
/// (signals, admin API, credential watchers): list and delete sessions,
/// drain, reload, stop.
#[derive(Clone)]
pub struct Control {
    flag: Arc<AtomicBool>,
    wakers: Vec<Arc<Waker>>,
    draining: Arc<AtomicBool>,
    quotas: Arc<turn_core::limits::Quotas>,
    reloads: Arc<Reloads>,
    own_sockets: Vec<SocketAddr>,
    commands: Vec<std::sync::mpsc::Sender<Command>>,
    limits: Arc<Mutex<SharedLimits>>,
}

impl Control {
    /// Every live allocation, from all workers.
    pub fn sessions(&self) -> Vec<turn_core::SessionInfo> {
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = self.ask(|| Command::Sessions(tx.clone()));
        (0..asked)
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(2)).ok())
            .flatten()
            .collect()
    }

    /// Deletes the allocations `pick` selects, on every worker.
    pub fn delete_sessions(&self, pick: Arc<dyn Fn(&turn_core::SessionInfo) -> bool + Send + Sync>) -> usize {
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = self.ask(|| Command::Delete {
            pick: pick.clone(),
            reply: tx.clone(),
        });
        (0..asked)
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(2)).ok())
            .sum()
    }

    /// Stops a drain started by SIGUSR1 or the admin API.
    pub fn undrain(&self) {
        self.draining.store(false, Ordering::SeqCst);
    }

    fn ask(&self, make: impl Fn() -> Command) -> usize {
        let mut asked = 0;
        for (tx, w) in self.commands.iter().zip(&self.wakers) {
            if tx.send(make()).is_ok() {
                asked += 1;
                let _ = w.wake();
            }
        }
        asked
    }

    /// Applies a new configuration to every worker (SIGHUP): credentials,
    /// peer policy and, when it comes from files, the TLS certificate.
    /// Existing allocations are untouched. Errors leave the old
    /// configuration in force.
    pub fn reload(&self, new: &Settings) -> Result<()> {
        let tls = match &new.tls {
            Some(src @ crate::config::TlsSource::Files { .. }) => Some(crate::tls::setup(src)?.config),
            // A generated certificate is kept, not regenerated.
            _ => None,
        };
        self.quotas.set_limits(new.user_quota, new.total_quota);
        let limits = {
            let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
            *l = l.reloaded(new);
            l.clone()
        };
        self.publish(Update {
            credentials: Some(Arc::new(new.credentials.clone())),
            policy: Some(build_policy(new, &self.own_sockets)),
            tls,
            limits: Some((limits, new.max_bps, new.user_max_bps, conn_limits(new))),
        });
        Ok(())
    }

    /// Replaces only the credentials in every worker (user database changes).
    pub fn set_credentials(&self, credentials: turn_core::Credentials) {
        self.publish(Update {
            credentials: Some(Arc::new(credentials)),
            policy: None,
            tls: None,
            limits: None,
        });
    }

    fn publish(&self, update: Update) {
        *self.reloads.latest.lock().unwrap_or_else(|p| p.into_inner()) = Some(update);
        self.reloads.generation.fetch_add(1, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// Starts draining: new allocations are refused (300 or 508), existing
    /// ones carry on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Allocations held across all workers.
    pub fn allocations(&self) -> usize {
        self.quotas.total()
    }

    /// Asks every worker to close its allocations and exit.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
    }
}

impl Handle {
    /// A handle to stop the server from elsewhere.
    pub fn control(&self) -> Control {
        self.stop.clone()
    }

    /// Stops the server and waits for the workers to finish. Returns how
    /// many workers had panicked (always 0 unless there is a bug).
    pub fn shutdown(self) -> usize {
        self.stop.stop();
        self.join()
    }

    /// Waits for the workers to finish (after [`Stopper::stop`]); returns
    /// how many had panicked.
    pub fn join(self) -> usize {
        self.threads
            .into_iter()
            .map(|t| t.join())
            .filter(|r| r.is_err())
            .count()
    }
}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // Room for bursts: media arrives in bursts and the loop drains in batches.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    if addr.ip().is_unspecified() {
        // Learn which of the host's addresses each datagram reached, so the
        // answer leaves from it (a multi-homed host) and relays use it.
        udp_io::set_recv_local_addr(&s, addr.is_ipv6())?;
    }
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Fails if another process already holds `addr`. SO_REUSEPORT would let a
/// second server (same user) share the port silently and take part of the
/// traffic, so the first socket of each address is probed without it.
fn ensure_free(addr: SocketAddr, udp: bool) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let ty = if udp { Type::DGRAM } else { Type::STREAM };
    let s = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if !udp {
        // TIME_WAIT from a previous run must not count as "in use".
        s.set_reuse_address(true)?;
    }
    s.bind(&addr.into())
}

fn in_use_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::AddrInUse {
        " (address in use: is another turnpike or TURN server running?)"
    } else if e.kind() == io::ErrorKind::PermissionDenied {
        " (permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    } else {
        ""
    }
}

/// Binds the first UDP+TCP pair for `addr`; with port 0, UDP picks the port
/// and TCP takes the same one, retrying if TCP finds it taken.
fn bind_pair(addr: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener, SocketAddr)> {
    if let Err(e) = ensure_free(addr, true) {
        anyhow::bail!("listen {addr}: cannot bind UDP: {e}{}", in_use_hint(&e));
    }
    if let Err(e) = ensure_free(addr, false) {
        anyhow::bail!("listen {addr}: cannot bind TCP: {e}{}", in_use_hint(&e));
    }
    for _ in 0..20 {
        let u = bind_udp(addr).with_context(|| format!("listen {addr}: cannot bind UDP"))?;
        let bound = u.local_addr()?;
        match bind_tcp(bound) {
            Ok(t) => return Ok((u, t, bound)),
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e).with_context(|| format!("listen {addr}: cannot bind TCP")),
        }
    }
    anyhow::bail!("listen {addr}: no port free for both UDP and TCP")
}

struct WorkerSockets {
    udp: Vec<(std::net::UdpSocket, SocketAddr)>,
    tcp: Vec<(std::net::TcpListener, SocketAddr, bool)>,
}

/// Starts the workers. Listeners are bound before this returns, so a caller
/// can connect at once.
pub fn start(settings: &Settings) -> Result<Handle> {
    let n = settings.threads;
    let board: crate::metrics::Board = Arc::new(Mutex::new(vec![Default::default(); n]));
    let mut per_worker: Vec<WorkerSockets> = (0..n)
        .map(|_| WorkerSockets {
            udp: vec![],
            tcp: vec![],
        })
        .collect();
    let mut listen = Vec::new();
    for &addr in &settings.listen {
        let (u, t, bound) = bind_pair(addr)?;
        per_worker[0].udp.push((u, bound));
        per_worker[0].tcp.push((t, bound, false));
        for w in per_worker.iter_mut().skip(1) {
            w.udp.push((
                bind_udp(bound).with_context(|| format!("listen {bound}: UDP for another worker"))?,
                bound,
            ));
            w.tcp.push((
                bind_tcp(bound).with_context(|| format!("listen {bound}: TCP for another worker"))?,
                bound,
                false,
            ));
        }
        listen.push(bound);
    }
    // RFC 5780: the three other IP/port combinations, UDP only.
    let mut alt_listen = Vec::new();
    let mut rfc5780 = None;
    if let Some((primary, alt_ip, alt_port)) = settings.rfc5780 {
        let primary = listen
            .iter()
            .copied()
            .find(|l| l.ip() == primary.ip())
            .unwrap_or(primary);
        let q = match alt_port {
            Some(q) => q,
            None => primary
                .port()
                .checked_add(1)
                .context("rfc5780: the listen port has no port after it; set alt-port")?,
        };
        for addr in [
            SocketAddr::new(alt_ip, primary.port()),
            SocketAddr::new(primary.ip(), q),
            SocketAddr::new(alt_ip, q),
        ] {
            if let Err(e) = ensure_free(addr, true) {
                anyhow::bail!("rfc5780 {addr}: cannot bind UDP: {e}{}", in_use_hint(&e));
            }
            for w in per_worker.iter_mut() {
                w.udp.push((
                    bind_udp(addr).with_context(|| format!("rfc5780 {addr}: cannot bind UDP"))?,
                    addr,
                ));
            }
            alt_listen.push(addr);
        }
        rfc5780 = Some(turn_core::Rfc5780 {
            ips: (primary.ip(), alt_ip),
            ports: (primary.port(), q),
        });
    }
    let tls_setup = match &settings.tls {
        Some(src) => Some(crate::tls::setup(src)?),
        None => None,
    };
    let mut tls_listen = Vec::new();
    for &addr in &settings.tls_listen {
        if let Err(e) = ensure_free(addr, false) {
            anyhow::bail!("tls-listen {addr}: cannot bind: {e}{}", in_use_hint(&e));
        }
        let t = bind_tcp(addr).with_context(|| format!("tls-listen {addr}: cannot bind TCP"))?;
        let bound = t.local_addr()?;
        per_worker[0].tcp.push((t, bound, true));
        for w in per_worker.iter_mut().skip(1) {
            w.tcp.push((
                bind_tcp(bound).with_context(|| format!("tls-listen {bound}: for another worker"))?,
                bound,
                true,
            ));
        }
        tls_listen.push(bound);
    }

    let own_sockets: Vec<SocketAddr> = listen
        .iter()
        .chain(tls_listen.iter())
        .chain(alt_listen.iter())
        .copied()
        .collect();
    let policy = build_policy(settings, &own_sockets);
    let mut nonce_secret = [0u8; 32];
    rand::thread_rng().fill(&mut nonce_secret);
    let epoch = Instant::now();
    let unix_at_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let credentials = Arc::new(settings.credentials.clone());
    let mut core_cfg =
        turn_core::Config::new(&settings.realm, credentials, nonce_secret, epoch, unix_at_epoch);
    core_cfg.software = settings.software.clone();
    core_cfg.legacy_channel_numbers = settings.legacy_channel_numbers;
    core_cfg.policy = policy;
    core_cfg.external_ipv4 = settings.external_v4;
    core_cfg.external_ipv6 = settings.external_v6;
    core_cfg.nonce_lifetime = Duration::from_secs(settings.nonce_lifetime);
    // One quota book for all workers: quotas are per server, not per core.
    core_cfg.quotas = Arc::new(turn_core::limits::Quotas::new(
        settings.user_quota,
        settings.total_quota,
    ));
    let shared = SharedLimits::new(settings);
    core_cfg.source_limiter = shared.answers.clone();
    core_cfg.auth_guard = shared.guard.clone();
    core_cfg.max_bps = settings.max_bps;
    core_cfg.user_max_bps = settings.user_max_bps;
    core_cfg.rfc5780 = rfc5780;
    core_cfg.alternate_servers = settings.alternate_server.clone();
    let draining = core_cfg.draining.clone();
    let quotas = core_cfg.quotas.clone();
    let metrics = match settings.metrics_listen {
        Some(addr) => Some(crate::metrics::serve(addr, board.clone(), draining.clone())?),
        None => None,
    };

    let flag = Arc::new(AtomicBool::new(false));
    let reservations = Arc::new(Mutex::new(Reservations::default()));
    let redactor = Redactor::new(settings.redact);
    let reloads = Arc::new(Reloads::default());
    let mut commands = Vec::new();

    let mut wakers = Vec::new();
    let mut threads = Vec::new();
    for (id, sockets) in per_worker.into_iter().enumerate() {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        wakers.push(waker);
        let mut worker = Worker::new(
            poll,
            sockets,
            Server::new(core_cfg.clone()),
            WorkerParams {
                relay: RelayConfig {
                    v4: settings.relay_v4,
                    v6: settings.relay_v6,
                    auto: settings.relay_auto,
                    min_port: settings.min_port,
                    max_port: settings.max_port,
                },
                connections: shared.connections.clone(),
                tls: tls_setup.as_ref().map(|t| t.config.clone()),
                stop: flag.clone(),
                reservations: reservations.clone(),
                limits: conn_limits(settings),
                redact: redactor.clone(),
                reloads: reloads.clone(),
                id,
                gso: settings.udp_gso,
                board: board.clone(),
                commands: {
                    let (tx, rx) = std::sync::mpsc::channel();
                    commands.push(tx);
                    rx
                },
            },
        )?;
        threads.push(
            std::thread::Builder::new()
                .name(format!("turnpike-worker-{id}"))
                .spawn(move || worker.run())?,
        );
    }
    Ok(Handle {
        listen,
        tls_listen,
        alt_listen,
        tls_fingerprint: tls_setup.as_ref().map(|t| t.fingerprint.clone()),
        metrics,
        tls_leaf: tls_setup.as_ref().map(|t| t.leaf.to_vec()),
        stop: Control {
            flag,
            wakers,
            draining,
            quotas,
            reloads,
            own_sockets,
            commands,
            limits: Arc::new(Mutex::new(shared)),
        },
        threads,
    })
}

/// Ports reserved by EVEN-PORT (R bit), held bound until claimed by a
/// RESERVATION-TOKEN or expired. Shared by all workers because the claiming
/// Allocate arrives from another client port, which the kernel may hash to
/// another worker; touched only on Allocate, never per packet.
#[derive(Default)]
struct Reservations {
    held: HashMap<[u8; 8], (std::net::UdpSocket, Instant)>,
}

impl Reservations {
    fn purge(&mut self, now: Instant) {
        self.held.retain(|_, (_, exp)| *exp > now);
    }
}

/// Hides client-identifying values in logs (`--redact`): each value becomes
/// a short keyed hash, stable for the process's life, so lines about one
/// client still correlate but the address or name is not written down.
#[derive(Clone)]
pub struct Redactor {
    key: Option<u64>,
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

fn conn_limits(settings: &Settings) -> ConnLimits {
    ConnLimits {
        max_connections: settings.max_connections,
        max_pending: (settings.max_connections / 4)
            .max(64)
            .min(settings.max_connections),
        max_per_source: settings.max_connections_per_ip,
        handshake_timeout: settings.handshake_timeout,
        idle_timeout: settings.idle_timeout,
    }
}

/// What a worker is given besides its sockets and core.
struct WorkerParams {
    relay: RelayConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: Arc<AtomicBool>,
    reservations: Arc<Mutex<Reservations>>,
    limits: ConnLimits,
    redact: Redactor,
    reloads: Arc<Reloads>,
    id: usize,
    gso: bool,
    board: crate::metrics::Board,
    commands: std::sync::mpsc::Receiver<Command>,
    connections: Arc<SourceCounter>,
}

/// Limits on TCP/TLS connections, per worker.
#[derive(Clone, Copy)]
struct ConnLimits {
    max_connections: usize,
    /// Connections that have not yet delivered one whole message (TLS
    /// handshakes included): what a slowloris or handshake flood piles up.
    max_pending: usize,
    /// Connections one source IP may hold across workers (0: no cap).
    max_per_source: u32,
    handshake_timeout: Duration,
    idle_timeout: Duration,
}

#[derive(Clone, Copy)]
struct RelayConfig {
    /// The relay address per family: configured, or the fallback when the
    /// address a client reached cannot be used.
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    /// No relay address configured: relay from the address each client
    /// reached (RFC 8656 §7.2 leaves the choice to the server; relaying
    /// from where the client came keeps a multi-homed host symmetric).
    auto: bool,
    min_port: u16,
    max_port: u16,
}

enum Source {
    Udp {
        sock: UdpSocket,
        addr: SocketAddr,
    },
    Listener {
        sock: TcpListener,
        addr: SocketAddr,
        tls: bool,
    },
    Conn(Box<Conn>),
    Relay {
        sock: UdpSocket,
        addr: SocketAddr,
    },
}

struct Conn {
    stream: TcpStream,
    tuple: FiveTuple,
    tls: Option<rustls::ServerConnection>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    writable_registered: bool,
    accepted: Instant,
    last_rx: Instant,
    /// Since when `rbuf` has held the start of an unfinished message.
    partial_since: Option<Instant>,
    /// Whether a whole message has arrived (until then it is "pending").
    got_message: bool,
    /// TLS: whether the handshake completed (counted once).
    handshake_done: bool,
}

enum ReadStep {
    Progress,
    WouldBlock,
    Closed,
}

impl Conn {
    /// Reads what is available (one chunk) into `rbuf`, decrypting if TLS.
    fn fill(&mut self, tmp: &mut [u8]) -> ReadStep {
        if self.rbuf.len() > MAX_READ_BUFFER {
            return ReadStep::Closed;
        }
        match &mut self.tls {
            None => match self.stream.read(tmp) {
                Ok(0) => ReadStep::Closed,
                Ok(n) => {
                    self.rbuf.extend_from_slice(&tmp[..n]);
                    ReadStep::Progress
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadStep::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadStep::Progress,
                Err(_) => ReadStep::Closed,
            },
            Some(tls) => {
                match tls.read_tls(&mut self.stream) {
                    Ok(0) => return ReadStep::Closed,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStep::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return ReadStep::Progress,
                    Err(_) => return ReadStep::Closed,
                }
                if let Err(e) = tls.process_new_packets() {
                    debug!(error = %e, "TLS error; closing the connection");
                    // Send the alert rustls queued, then close.
                    let _ = tls.write_tls(&mut self.wbuf);
                    let _ = self.stream.write(&self.wbuf);
                    return ReadStep::Closed;
                }
                loop {
                    match tls.reader().read(tmp) {
                        Ok(0) => return ReadStep::Closed,
                        Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStep::Progress,
                        Err(_) => return ReadStep::Closed,
                    }
                }
            }
        }
    }

    /// Queues one whole message. A message that does not fit in the write
    /// buffer is dropped whole, never cut, so framing survives.
    fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if self.wbuf.len() + data.len() + 64 > MAX_WRITE_BUFFER {
            return Ok(());
        }
        // Queued only: the worker flushes every connection it wrote to once
        // per loop iteration, so a burst of relayed messages to one client
        // costs one write(2), not one each.
        match &mut self.tls {
            None => self.wbuf.extend_from_slice(data),
            Some(tls) => {
                if tls.is_handshaking() {
                    // Nothing is sent to a client before its first request, so
                    // this is not reached; drop rather than buffer unboundedly.
                    return Ok(());
                }
                tls.writer().write_all(data)?;
            }
        }
        Ok(())
    }

    /// Moves TLS output into `wbuf` and writes `wbuf` to the socket.
    fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                tls.write_tls(&mut self.wbuf)?;
            }
        }
        let mut done = 0;
        while done < self.wbuf.len() {
            match self.stream.write(&self.wbuf[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.drain(..done);
        Ok(())
    }
}

/// Everything a worker owns except the protocol core, so the core can
/// borrow it as its [`RelayProvider`] while a packet is processed.
struct Io {
    registry: Registry,
    sources: Slab<Source>,
    udp_by_addr: Vec<(SocketAddr, usize)>,
    relay_by_addr: HashMap<SocketAddr, usize, ahash::RandomState>,
    conn_by_tuple: HashMap<FiveTuple, usize, ahash::RandomState>,
    relay: RelayConfig,
    rng: SmallRng,
    reservations: Arc<Mutex<Reservations>>,
    /// Connections whose write interest must be updated after a send.
    dirty: Vec<usize>,
    /// UDP datagrams to send at the end of this loop iteration.
    queue: udp_io::SendQueue,
}

impl Io {
    /// Registers a bound relay socket with this worker's poll.
    fn activate(
        &mut self,
        std_sock: std::net::UdpSocket,
        addr: SocketAddr,
        dont_fragment: bool,
    ) -> Result<(), RelayError> {
        std_sock
            .set_nonblocking(true)
            .map_err(|_| RelayError::Exhausted)?;
        if dont_fragment {
            // RFC 8656 §14.8: the client asked for DF on what is relayed.
            udp_io::set_dont_fragment(&std_sock, addr.is_ipv6(), true).map_err(|e| {
                warn!(%addr, error = %e, "cannot set DF on a relay socket");
                RelayError::Exhausted
            })?;
        }
        // RFC 8656 §11.5: ICMP errors for relayed datagrams go back to the
        // client; without the error queue they are simply not seen.
        let _ = udp_io::set_recv_errors(&std_sock, addr.is_ipv6());
        let mut sock = UdpSocket::from_std(std_sock);
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        self.registry
            .register(&mut sock, Token(key), Interest::READABLE)
            .map_err(|_| RelayError::Exhausted)?;
        entry.insert(Source::Relay { sock, addr });
        self.relay_by_addr.insert(addr, key);
        Ok(())
    }
}

fn bind_relay(addr: SocketAddr) -> Result<Option<std::net::UdpSocket>, RelayError> {
    match std::net::UdpSocket::bind(addr) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => {
            warn!(%addr, error = %e, "cannot bind relay socket");
            Err(RelayError::Exhausted)
        }
    }
}

impl Io {
    /// The relay IP for `req` (RFC 8656 §7.2 leaves the choice to the
    /// server): with no relay address configured, the address the client
    /// reached, unless it is loopback and the client is not; else the
    /// configured (or detected) address of the family.
    fn relay_ip(&self, req: &RelayRequest) -> Option<IpAddr> {
        let reached = req.local_ip;
        if self.relay.auto
            && reached.is_ipv6() == req.ipv6
            && !reached.is_unspecified()
            && (!reached.is_loopback() || req.client_ip.is_loopback())
        {
            return Some(reached);
        }
        let fallback = if req.ipv6 {
            self.relay.v6.map(IpAddr::V6)
        } else {
            self.relay.v4.map(IpAddr::V4)
        };
        // A relay a remote client cannot reach is no relay: a loopback
        // fallback (a host without a route of that family) is for loopback
        // clients only, unless the operator configured it.
        fallback.filter(|ip| !self.relay.auto || !ip.is_loopback() || req.client_ip.is_loopback())
    }

    /// Binds a new relay socket for `req` at a random port.
    fn bind_new_relay(&mut self, req: &RelayRequest) -> Result<OpenedRelay, RelayError> {
        let ip = self.relay_ip(req).ok_or(RelayError::FamilyUnsupported)?;
        let (lo, hi) = (self.relay.min_port, self.relay.max_port);
        // Random ports, never a scan: a scan makes ports predictable and costs
        // a syscall per busy port.
        for _ in 0..64 {
            let mut port = self.rng.gen_range(lo..=hi);
            if req.even_port {
                port &= !1;
                if port < lo || (req.reserve_next && port == u16::MAX) || (req.reserve_next && port + 1 > hi)
                {
                    continue;
                }
            }
            let addr = SocketAddr::new(ip, port);
            let Some(sock) = bind_relay(addr)? else { continue };
            let token = if req.reserve_next {
                let next = SocketAddr::new(ip, port + 1);
                let Some(held) = bind_relay(next)? else { continue };
                let token: [u8; 8] = self.rng.gen();
                let now = Instant::now();
                let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
                r.purge(now);
                r.held.insert(token, (held, now + RESERVATION_LIFETIME));
                Some(token)
            } else {
                None
            };
            self.activate(sock, addr, req.dont_fragment)?;
            return Ok(OpenedRelay { addr, token });
        }
        Err(RelayError::Exhausted)
    }
}

impl RelayProvider for Io {
    fn open(&mut self, req: RelayRequest) -> Result<OpenedRelay, RelayError> {
        let Some(token) = req.token else {
            return self.bind_new_relay(&req);
        };
        let held = {
            let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
            r.purge(Instant::now());
            r.held.remove(&token)
        };
        // An unknown or expired token: RFC 8656 §7.2 says 508.
        let (sock, _) = held.ok_or(RelayError::Exhausted)?;
        let addr = sock.local_addr().map_err(|_| RelayError::Exhausted)?;
        self.activate(sock, addr, req.dont_fragment)?;
        Ok(OpenedRelay { addr, token: None })
    }

    fn close(&mut self, relay: SocketAddr) {
        if let Some(key) = self.relay_by_addr.remove(&relay) {
            if let Source::Relay { mut sock, .. } = self.sources.remove(key) {
                let _ = self.registry.deregister(&mut sock);
                // Queued datagrams name the socket by descriptor, which the
                // next socket opened could reuse: they leave first.
                self.queue.close(sock);
            }
        }
    }
}

impl Io {
    /// Sends the bytes a core call appended to the send queue from `start`
    /// to the client of `dest`: queued for a UDP client, written to the
    /// connection of a TCP/TLS one.
    fn forward_appended(&mut self, dest: Dest, start: usize) {
        match dest {
            Dest::Client(t) if t.transport == Transport::Udp => match self.sources.get(t.listener.0 as usize)
            {
                Some(Source::Udp { sock, addr }) => {
                    let src = addr.ip().is_unspecified().then_some(t.server.ip());
                    self.queue.commit(sock, src, t.client, start)
                }
                _ => self.queue.truncate(start),
            },
            Dest::Client(t) => {
                if let Some(&key) = self.conn_by_tuple.get(&t) {
                    if let Some(Source::Conn(c)) = self.sources.get_mut(key) {
                        // A failed queueing (TLS) is noticed at flush.
                        let _ = c.send(self.queue.written(start));
                        self.dirty.push(key);
                    }
                }
                self.queue.truncate(start);
            }
            // handle_peer only ever answers toward the client.
            _ => self.queue.truncate(start),
        }
    }

    fn transmit(&mut self, tx: Transmit<'_>) {
        self.send(tx.dest, tx.data);
    }

    /// Sends `data` to `dest` (queued for UDP, buffered for a connection).
    fn send(&mut self, dest: Dest, data: &[u8]) {
        let tx = Transmit { dest, data };
        match tx.dest {
            Dest::Peer { relay, peer } => {
                if let Some(&key) = self.relay_by_addr.get(&relay) {
                    if let Some(Source::Relay { sock, .. }) = self.sources.get(key) {
                        self.queue.push(sock, None, peer, tx.data);
                    }
                }
            }
            Dest::Via { local, to } => {
                if let Some(&(_, key)) = self.udp_by_addr.iter().find(|(a, _)| *a == local) {
                    if let Some(Source::Udp { sock, .. }) = self.sources.get(key) {
                        let _ = sock.send_to(tx.data, to);
                    }
                }
            }
            Dest::Client(t) => match t.transport {
                Transport::Udp => {
                    // From the address the client reached: on a wildcard
                    // socket the kernel would pick one by route.
                    if let Some(Source::Udp { sock, addr }) = self.sources.get(t.listener.0 as usize) {
                        let src = addr.ip().is_unspecified().then_some(t.server.ip());
                        self.queue.push(sock, src, t.client, tx.data);
                    }
                }
                _ => {
                    if let Some(&key) = self.conn_by_tuple.get(&t) {
                        if let Some(Source::Conn(c)) = self.sources.get_mut(key) {
                            // A failed queueing (TLS) is noticed at flush.
                            let _ = c.send(tx.data);
                            self.dirty.push(key);
                        }
                    }
                }
            },
            _ => {}
        }
    }
}

struct Worker {
    poll: Poll,
    core: Server,
    io: Io,
    tls: Option<Arc<rustls::ServerConfig>>,
    stop: Arc<AtomicBool>,
    buf: Vec<u8>,
    batch: udp_io::RecvBatch,
    limits: ConnLimits,
    redact: Redactor,
    reloads: Arc<Reloads>,
    seen_generation: u64,
    id: usize,
    board: crate::metrics::Board,
    commands: std::sync::mpsc::Receiver<Command>,
    tls_handshakes: u64,
    tls_failures: u64,
    recv_batches: u64,
    recv_datagrams: u64,
    pending: usize,
    next_sweep: Instant,
    connections: Arc<SourceCounter>,
    errors: udp_io::ErrorQueue,
    conn_refused_worker: u64,
    conn_refused_per_source: u64,
}

impl Worker {
    fn new(poll: Poll, sockets: WorkerSockets, core: Server, p: WorkerParams) -> Result<Self> {
        let WorkerParams {
            relay,
            tls,
            stop,
            reservations,
            limits,
            redact,
            reloads,
            id,
            gso,
            board,
            commands,
            connections,
        } = p;
        let registry = poll.registry().try_clone()?;
        let mut io = Io {
            registry,
            sources: Slab::new(),
            udp_by_addr: Vec::new(),
            relay_by_addr: HashMap::default(),
            conn_by_tuple: HashMap::default(),
            relay,
            rng: SmallRng::from_entropy(),
            reservations,
            dirty: Vec::new(),
            queue: udp_io::SendQueue::new(gso),
        };
        for (s, addr) in sockets.udp {
            let mut sock = UdpSocket::from_std(s);
            let e = io.sources.vacant_entry();
            io.registry
                .register(&mut sock, Token(e.key()), Interest::READABLE)?;
            io.udp_by_addr.push((addr, e.key()));
            e.insert(Source::Udp { sock, addr });
        }
        for (s, addr, tls) in sockets.tcp {
            let mut sock = TcpListener::from_std(s);
            let e = io.sources.vacant_entry();
            io.registry
                .register(&mut sock, Token(e.key()), Interest::READABLE)?;
            e.insert(Source::Listener { sock, addr, tls });
        }
        Ok(Worker {
            poll,
            core,
            io,
            tls,
            stop,
            buf: vec![0u8; 65536],
            batch: udp_io::RecvBatch::new(),
            limits,
            redact,
            reloads,
            seen_generation: 0,
            id,
            board,
            commands,
            tls_handshakes: 0,
            tls_failures: 0,
            recv_batches: 0,
            recv_datagrams: 0,
            pending: 0,
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            connections,
            errors: udp_io::ErrorQueue::new(),
            conn_refused_worker: 0,
            conn_refused_per_source: 0,
        })
    }

    /// Carries out what the core asked for (open or close relay sockets)
    /// and sends the answers that waited on it. One branch per input when
    /// there is nothing to do.
    fn drive_core(&mut self, now: Instant) {
        if self.core.has_commands() {
            self.core.run_commands(now, &mut self.io);
            while let Some(t) = self.core.poll_transmit() {
                self.io.send(t.dest, &t.data);
            }
        }
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = self
                .core
                .poll_timeout()
                .map(|t| t.saturating_duration_since(now).min(IDLE_TICK))
                .unwrap_or(IDLE_TICK)
                .min(self.next_sweep.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "poll failed");
                }
                continue;
            }
            let now = Instant::now();
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                self.on_event(
                    ev.token().0,
                    ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                    now,
                );
            }
            self.core.handle_timeout(now);
            self.drive_core(now);
            self.apply_reload();
            self.handle_commands(now);
            if now >= self.next_sweep {
                self.sweep_connections(now);
                self.publish_metrics(now);
                self.next_sweep = now + SWEEP_INTERVAL;
            }
            // Everything this pass produced leaves in as few syscalls as
            // the kernel allows, before the worker sleeps again.
            self.io.queue.flush();
            self.update_interests(now);
            self.log_events();
            if self.stop.load(Ordering::SeqCst) {
                let now = Instant::now();
                self.core.close_all(now);
                self.drive_core(now);
                self.io.queue.flush();
                self.log_events();
                return;
            }
        }
    }

    fn on_event(&mut self, key: usize, readable: bool, writable: bool, now: Instant) {
        enum Kind {
            Udp(SocketAddr),
            Listener(bool, SocketAddr),
            Conn,
            Relay(SocketAddr),
        }
        let kind = match self.io.sources.get(key) {
            Some(Source::Udp { addr, .. }) => Kind::Udp(*addr),
            Some(Source::Listener { tls, addr, .. }) => Kind::Listener(*tls, *addr),
            Some(Source::Conn(_)) => Kind::Conn,
            Some(Source::Relay { addr, .. }) => Kind::Relay(*addr),
            None => return,
        };
        match kind {
            Kind::Udp(addr) => self.read_udp(key, addr, now),
            Kind::Relay(addr) => self.read_relay(key, addr, now),
            Kind::Listener(tls, addr) => self.accept(key, tls, addr),
            Kind::Conn => self.on_conn(key, readable, writable, now),
        }
    }

    fn read_udp(&mut self, key: usize, local: SocketAddr, now: Instant) {
        loop {
            let Some(Source::Udp { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let n = match self.batch.recv(sock) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            self.recv_batches += 1;
            self.recv_datagrams += n as u64;
            for i in 0..n {
                let Some(d) = self.batch.get(i) else {
                    continue;
                };
                // The address the client reached: pktinfo on a wildcard
                // socket, else the one it is bound to.
                let tuple = FiveTuple {
                    transport: Transport::Udp,
                    client: d.from,
                    server: SocketAddr::new(d.to_ip.unwrap_or(local.ip()), local.port()),
                    listener: ListenerId(key as u32),
                };
                if let Some(tx) = self.core.handle_client(now, tuple, d.data) {
                    self.io.transmit(tx);
                }
                self.drive_core(now);
            }
            if n < udp_io::BATCH {
                return;
            }
        }
    }

    /// RFC 8656 §11.5: ICMP errors queued on a relay socket go to the
    /// client (the core checks the permission and rate-limits them).
    fn read_relay_errors(&mut self, key: usize, relay: SocketAddr, now: Instant) {
        for _ in 0..64 {
            let Some(Source::Relay { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let Ok(Some(e)) = self.errors.recv(sock) else {
                return;
            };
            if let Some(tx) = self
                .core
                .handle_icmp(now, relay, e.dest, e.icmp_type, e.icmp_code, e.info)
            {
                self.io.transmit(tx);
            }
        }
    }

    fn read_relay(&mut self, key: usize, relay: SocketAddr, now: Instant) {
        let mut errors_read = false;
        loop {
            let Some(Source::Relay { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let n = match self.batch.recv(sock) {
                Ok(0) => return,
                Ok(n) => n,
                // A pending ICMP error fails the receive once: read the
                // error queue, then go on with the datagrams.
                Err(_) if !errors_read => {
                    errors_read = true;
                    self.read_relay_errors(key, relay, now);
                    continue;
                }
                Err(_) => return,
            };
            self.recv_batches += 1;
            self.recv_datagrams += n as u64;
            for i in 0..n {
                let Some(udp_io::Datagram { from, data, .. }) = self.batch.get(i) else {
                    continue;
                };
                // The core writes the client's datagram straight into the
                // send queue: the payload's one copy.
                let out = self.io.queue.buffer();
                let start = out.len();
                match self.core.handle_peer_into(now, relay, from, data, out) {
                    Some(dest) => self.io.forward_appended(dest, start),
                    None => self.io.queue.truncate(start),
                }
            }
            if n < udp_io::BATCH {
                return;
            }
        }
    }

    fn accept(&mut self, key: usize, tls: bool, local: SocketAddr) {
        loop {
            let Some(Source::Listener { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let (stream, client) = match sock.accept() {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.io.conn_by_tuple.len() >= self.limits.max_connections
                || self.pending >= self.limits.max_pending
            {
                // Dropping the stream closes it at once.
                debug!(client = %self.redact.show(&client), "connection limit reached; closing");
                self.conn_refused_worker += 1;
                continue;
            }
            // One source cannot take every slot: its count is shared by all
            // workers (the kernel spreads its connections over them).
            if !self
                .connections
                .try_acquire(client.ip(), self.limits.max_per_source)
            {
                debug!(client = %self.redact.show(&client), "per-source connection limit reached; closing");
                self.conn_refused_per_source += 1;
                continue;
            }
            let release = |w: &Self| w.connections.release(client.ip());
            let _ = stream.set_nodelay(true);
            let tls_conn = if tls {
                let made = self
                    .tls
                    .as_ref()
                    .and_then(|cfg| rustls::ServerConnection::new(cfg.clone()).ok());
                if made.is_none() {
                    release(self);
                    continue;
                }
                made
            } else {
                None
            };
            // The accepted socket knows the address the client reached, also
            // behind a wildcard listener.
            let tuple = FiveTuple {
                transport: if tls { Transport::Tls } else { Transport::Tcp },
                client,
                server: stream.local_addr().unwrap_or(local),
                listener: ListenerId(key as u32),
            };
            let now = Instant::now();
            let mut conn = Box::new(Conn {
                stream,
                tuple,
                tls: tls_conn,
                rbuf: Vec::new(),
                wbuf: Vec::new(),
                writable_registered: false,
                accepted: now,
                last_rx: now,
                partial_since: None,
                got_message: false,
                handshake_done: false,
            });
            let entry = self.io.sources.vacant_entry();
            let ckey = entry.key();
            if self
                .io
                .registry
                .register(&mut conn.stream, Token(ckey), Interest::READABLE)
                .is_err()
            {
                release(self);
                continue;
            }
            entry.insert(Source::Conn(conn));
            self.io.conn_by_tuple.insert(tuple, ckey);
            self.pending += 1;
        }
    }

    fn on_conn(&mut self, key: usize, readable: bool, writable: bool, now: Instant) {
        if writable {
            if let Some(Source::Conn(c)) = self.io.sources.get_mut(key) {
                if c.flush().is_err() {
                    self.close_conn(key, now);
                    return;
                }
                self.io.dirty.push(key);
            }
        }
        if !readable {
            return;
        }
        loop {
            let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
                return;
            };
            let step = c.fill(&mut self.buf);
            if !c.handshake_done && c.tls.as_ref().is_some_and(|t| !t.is_handshaking()) {
                c.handshake_done = true;
                self.tls_handshakes += 1;
            }
            let tuple = c.tuple;
            let mut rbuf = std::mem::take(&mut c.rbuf);
            let mut off = 0;
            let mut broken = false;
            while off < rbuf.len() {
                match turn_core::stream_frame_len(&rbuf[off..]) {
                    Some(Ok(n)) if rbuf.len() - off >= n => {
                        if let Some(tx) = self.core.handle_client(now, tuple, &rbuf[off..off + n]) {
                            self.io.transmit(tx);
                        }
                        self.drive_core(now);
                        off += n;
                    }
                    Some(Err(())) => {
                        // Neither STUN nor ChannelData: framing is lost for good.
                        broken = true;
                        break;
                    }
                    _ => break,
                }
            }
            rbuf.drain(..off);
            let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
                return;
            };
            c.rbuf = rbuf;
            if matches!(step, ReadStep::Progress) {
                c.last_rx = now;
            }
            if off > 0 && !c.got_message {
                c.got_message = true;
                self.pending -= 1;
            }
            c.partial_since = if c.rbuf.is_empty() {
                None
            } else {
                c.partial_since.or(Some(now))
            };
            // TLS handshake records and anything rustls queued go out now.
            let flushed = c.flush();
            if broken || flushed.is_err() {
                self.close_conn(key, now);
                return;
            }
            self.io.dirty.push(key);
            match step {
                ReadStep::Progress => continue,
                ReadStep::WouldBlock => return,
                ReadStep::Closed => {
                    self.close_conn(key, now);
                    return;
                }
            }
        }
    }

    /// Answers the control plane's requests.
    fn handle_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Sessions(reply) => {
                    let _ = reply.send(self.core.sessions(now));
                }
                Command::Delete { pick, reply } => {
                    let n = self.core.delete_sessions(now, &*pick);
                    self.drive_core(now);
                    let _ = reply.send(n);
                }
            }
        }
    }

    /// Publishes this worker's numbers for the metrics endpoint (once a
    /// second: one short lock, never on the packet path).
    fn publish_metrics(&mut self, now: Instant) {
        let (permissions, channels) = self.core.permissions_and_channels(now);
        let m = crate::metrics::WorkerMetrics {
            core: self.core.counters(),
            allocations: self.core.allocations_by_transport(),
            permissions,
            channels,
            connections: self.io.conn_by_tuple.len(),
            tls_handshakes: self.tls_handshakes,
            tls_failures: self.tls_failures,
            conn_refused_worker: self.conn_refused_worker,
            conn_refused_per_source: self.conn_refused_per_source,
            recv_batches: self.recv_batches,
            recv_datagrams: self.recv_datagrams,
            send: self.io.queue.stats(),
            gso: self.io.queue.gso_enabled(),
        };
        if let Some(slot) = self
            .board
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.id)
        {
            *slot = m;
        }
    }

    /// Takes a newer configuration if one was published (one atomic load
    /// per loop iteration, never per packet).
    fn apply_reload(&mut self) {
        let generation = self.reloads.generation.load(Ordering::Acquire);
        if generation == self.seen_generation {
            return;
        }
        self.seen_generation = generation;
        let update = self
            .reloads
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(u) = update {
            if let Some(c) = u.credentials {
                self.core.set_credentials(c);
            }
            if let Some(p) = u.policy {
                self.core.set_policy(p);
            }
            if let Some((shared, bps, user_bps, conn)) = u.limits {
                self.core.set_limits(shared.answers, shared.guard, bps, user_bps);
                self.limits = conn;
            }
            if let Some(tls) = u.tls {
                // New connections use the new certificate; open ones keep theirs.
                self.tls = Some(tls);
            }
        }
    }

    /// Closes connections past their timeouts: no whole message within the
    /// handshake timeout (stalled TLS handshakes, silent connects), a message
    /// begun but not finished within it (slowloris), or silence past the idle
    /// timeout without an allocation.
    fn sweep_connections(&mut self, now: Instant) {
        let l = self.limits;
        let mut doomed = Vec::new();
        for (key, src) in self.io.sources.iter() {
            let Source::Conn(c) = src else { continue };
            let stalled = !c.got_message && now.saturating_duration_since(c.accepted) > l.handshake_timeout;
            let slow = c
                .partial_since
                .is_some_and(|t| now.saturating_duration_since(t) > l.handshake_timeout);
            let idle = now.saturating_duration_since(c.last_rx) > l.idle_timeout
                && !self.core.has_allocation(&c.tuple);
            if stalled || slow || idle {
                debug!(
                    client = %self.redact.show(&c.tuple.client),
                    stalled,
                    slow,
                    idle,
                    "closing connection on timeout"
                );
                doomed.push(key);
            }
        }
        for key in doomed {
            self.close_conn(key, now);
        }
    }

    fn close_conn(&mut self, key: usize, now: Instant) {
        if let Some(Source::Conn(_)) = self.io.sources.get(key) {
            if let Source::Conn(mut c) = self.io.sources.remove(key) {
                if !c.got_message {
                    self.pending -= 1;
                }
                if c.tls.is_some() && !c.handshake_done {
                    self.tls_failures += 1;
                }
                let _ = self.io.registry.deregister(&mut c.stream);
                self.io.conn_by_tuple.remove(&c.tuple);
                self.connections.release(c.tuple.client.ip());
                self.core.handle_connection_closed(now, c.tuple);
                self.drive_core(now);
            }
        }
    }

    /// Flushes connections written to in this iteration, registers write
    /// interest for those with output left, and drops it once drained;
    /// closes connections whose writes failed.
    fn update_interests(&mut self, now: Instant) {
        let mut dirty = std::mem::take(&mut self.io.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for key in dirty.drain(..) {
            let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
                continue;
            };
            if c.flush().is_err() {
                self.close_conn(key, now);
                continue;
            }
            let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
                continue;
            };
            let want = !c.wbuf.is_empty();
            if want != c.writable_registered {
                let interest = if want {
                    Interest::READABLE | Interest::WRITABLE
                } else {
                    Interest::READABLE
                };
                if self
                    .io
                    .registry
                    .reregister(&mut c.stream, Token(key), interest)
                    .is_err()
                {
                    self.close_conn(key, now);
                    continue;
                }
                c.writable_registered = want;
            }
        }
        self.io.dirty = dirty;
    }

    fn log_events(&mut self) {
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
