//! The data plane: one single-threaded mio event loop per worker.
//!
//! Every worker owns SO_REUSEPORT sockets on every listen address, so the
//! kernel's 4-tuple hash pins a client to one worker. The allocations made
//! through a worker, and their relay sockets, live on that worker with its
//! own [`turn_core::Server`]: relaying a packet takes no lock, crosses no
//! channel and allocates nothing. Workers share the nonce secret and epoch
//! (so any worker accepts any worker's nonce), the quota book, the limits
//! that must hold per host (`control::SharedLimits`), and a shutdown flag.
//!
//! | file | what |
//! |---|---|
//! | `mod.rs` | `start`: binds everything (or `start_inherited`: takes a binary upgrade's sockets), builds the core config, spawns workers; `Handle` |
//! | `listeners.rs` | binding listening sockets (SO_REUSEPORT, pktinfo, in-use check) |
//! | `worker.rs` | `Worker`: the loop, events to the subsystem that owns the socket, the core's commands carried out |
//! | `udp.rs` | `UdpReads`: reading UDP listeners and relay sockets in batches, ICMP errors |
//! | `events.rs` | session events: start/interim/end records from the core's events, auth failures and lockouts |
//! | `dtls.rs` | RFC 7350: DTLS listeners' fronts (`turn_dtls`), records in and out, timers |
//! | `connections.rs` | `Streams`: accepting TCP/TLS within limits, PROXY headers, reading messages, timeouts, closing |
//! | `stream.rs` | one TCP/TLS connection and its buffers |
//! | `relays.rs` | relay sockets: IP choice, ports, reservations, DF, ICMP queue |
//! | `tcp_relay.rs` | RFC 6062: TCP relay listeners, peer connects and accepts, ConnectionBind handoff |
//! | `pairs.rs` | RFC 6062: connection pairs: binding, each direction's relaying, caps, closing |
//! | `raw_buf.rs` | a pair direction's byte buffer |
//! | `dispatch.rs` | `Io`: the sockets, and sending the core's transmits |
//! | `fast.rs` | `FastPlane`: loading the kernel fast path, its entries, its counts fed back |
//! | `control.rs` | `Control`, reloads, shared limits, the core config built from settings |
//! | `worker_control.rs` | `ControlLink`: a worker's reloads, session requests, metrics, stop |
//! | `handover.rs` | a worker's side of a binary upgrade: its part given and the decision awaited (old), relay sockets and snapshot taken over (new) |
//! | `log.rs` | log lines for the core's events, `--redact` |

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use mio::{Poll, Token, Waker};
use rand::Rng;
use turn_core::Server;

use crate::config::Settings;

mod connections;
mod control;
mod dispatch;
mod dtls;
mod events;
mod fast;
mod handover;
mod listeners;
mod log;
mod mobility;
mod pairs;
mod raw_buf;
pub mod relays;
mod stream;
mod tcp_relay;
mod udp;
mod worker;
mod worker_control;

use connections::conn_limits;
pub use control::Control;
pub(crate) use control::Decision;
pub(crate) use control::WorkerRequest;
use control::{core_config, core_shared, CoreBase, Reloads, SharedLimits};
use listeners::{bind_pair, bind_tcp, bind_udp, ensure_free, in_use_hint};
pub use log::Redactor;
use relays::{RelayConfig, Reservations};
use worker::{Worker, WorkerParams};

const WAKER: Token = Token(usize::MAX);
/// How often connections are checked against their timeouts.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How often the loop wakes with nothing to do, to notice shutdown.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// A running server.
pub struct Handle {
    /// The bound UDP+TCP listen addresses (ports resolved when 0 was asked).
    pub listen: Vec<SocketAddr>,
    /// The bound TLS listen addresses.
    pub tls_listen: Vec<SocketAddr>,
    /// DTLS listen addresses as bound (RFC 7350; empty: DTLS off).
    pub dtls_listen: Vec<SocketAddr>,
    /// RFC 5780: the alternate UDP sockets (alt IP/primary port, primary
    /// IP/alt port, alt IP/alt port).
    pub alt_listen: Vec<SocketAddr>,
    /// SHA-256 fingerprint of the TLS certificate.
    pub tls_fingerprint: Option<String>,
    /// Where Prometheus metrics are served, if enabled.
    pub metrics: Option<SocketAddr>,
    /// The TLS leaf certificate (DER).
    pub tls_leaf: Option<Vec<u8>>,
    /// The kernel fast path's state, for the start-up summary.
    pub fast_path: String,
    /// The admin API's listener (`--admin-listen`), bound at start and
    /// refused as a peer; `admin::serve` takes it.
    pub admin_listener: Option<std::net::TcpListener>,
    /// The public ICE page's listener (`--web-listen`), likewise.
    pub web_listener: Option<std::net::TcpListener>,
    /// Copies of the metrics, admin and web listeners, for a binary
    /// upgrade to hand over.
    pub(crate) http_copies: [Option<(SocketAddr, std::net::TcpListener)>; 3],
    /// After a binary upgrade: the old process's pid, and the allocations
    /// taken over and dropped.
    pub taken_over: Option<(u32, usize, usize)>,
    stop: Control,
    threads: Vec<JoinHandle<()>>,
    /// Session events' sinks: flushed once the workers have stopped.
    events: Option<crate::events::Sinks>,
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
        let panicked = self
            .threads
            .into_iter()
            .map(|t| t.join())
            .filter(|r| r.is_err())
            .count();
        // The workers' last records (allocations closed at shutdown) are
        // queued now: delivered within the flush time.
        if let Some(e) = self.events {
            e.finish();
        }
        panicked
    }
}

/// The control plane's HTTP listeners, bound with the TURN listeners.
struct HttpListeners {
    metrics: Option<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    web: Option<std::net::TcpListener>,
}

impl HttpListeners {
    fn bind(settings: &Settings) -> Result<Self> {
        Ok(HttpListeners {
            metrics: settings
                .options
                .metrics_listen
                .map(|a| crate::http::bind("metrics-listen", a))
                .transpose()?,
            admin: settings
                .admin
                .as_ref()
                .map(|(a, _)| crate::http::bind("admin-listen", *a))
                .transpose()?,
            web: settings
                .web
                .public
                .map(|a| crate::http::bind("web-listen", a))
                .transpose()?,
        })
    }

    /// A binary upgrade's HTTP listeners, where the old process had them.
    /// One the new configuration adds is bound; one it drops is closed.
    fn inherit(
        settings: &Settings,
        h: &crate::upgrade::Handover,
        fds: &mut std::vec::IntoIter<std::os::fd::OwnedFd>,
    ) -> Result<Self> {
        let mut got: [Option<std::net::TcpListener>; 3] = [None, None, None];
        for (slot, addr) in got.iter_mut().zip(&h.http) {
            if addr.is_some() {
                *slot = Some(std::net::TcpListener::from(
                    fds.next()
                        .context("an HTTP listener the hand-over announced is missing")?,
                ));
            }
        }
        let [metrics, admin, web] = got;
        let keep =
            |had: Option<std::net::TcpListener>, want: Option<SocketAddr>, name: &str| match (had, want) {
                (Some(l), Some(_)) => Ok(Some(l)),
                (None, Some(a)) => crate::http::bind(name, a).map(Some),
                (_, None) => Ok(None),
            };
        Ok(HttpListeners {
            metrics: keep(metrics, settings.options.metrics_listen, "metrics-listen")?,
            admin: keep(admin, settings.admin.as_ref().map(|(a, _)| *a), "admin-listen")?,
            web: keep(web, settings.web.public, "web-listen")?,
        })
    }

    /// Copies (same sockets) of the listeners, with their addresses.
    fn copies(&self) -> [Option<(SocketAddr, std::net::TcpListener)>; 3] {
        [&self.metrics, &self.admin, &self.web].map(|l| {
            let l = l.as_ref()?;
            Some((l.local_addr().ok()?, l.try_clone().ok()?))
        })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        [&self.metrics, &self.admin, &self.web]
            .into_iter()
            .flatten()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }
}

struct WorkerSockets {
    udp: Vec<(std::net::UdpSocket, SocketAddr)>,
    /// DTLS listeners (RFC 7350): UDP sockets whose datagrams are records.
    dtls: Vec<(std::net::UdpSocket, SocketAddr)>,
    tcp: Vec<(std::net::TcpListener, SocketAddr, bool)>,
    /// After a binary upgrade: the old worker's relay sockets and
    /// allocations (`handover.rs`).
    taken: Option<handover::TakenOver>,
}

/// Every TURN listener, bound once per worker (SO_REUSEPORT).
struct Listeners {
    per_worker: Vec<WorkerSockets>,
    listen: Vec<SocketAddr>,
    tls_listen: Vec<SocketAddr>,
    dtls_listen: Vec<SocketAddr>,
    /// RFC 5780's three other address/port pairs (UDP).
    alt_listen: Vec<SocketAddr>,
    rfc5780: Option<turn_core::Rfc5780>,
}

impl Listeners {
    fn bind(settings: &Settings, dtls: bool) -> Result<Self> {
        let mut l = Listeners {
            per_worker: (0..settings.threads)
                .map(|_| WorkerSockets {
                    udp: vec![],
                    dtls: vec![],
                    tcp: vec![],
                    taken: None,
                })
                .collect(),
            listen: Vec::new(),
            tls_listen: Vec::new(),
            dtls_listen: Vec::new(),
            alt_listen: Vec::new(),
            rfc5780: None,
        };
        for &addr in &settings.listen {
            l.bind_plain(addr)?;
        }
        if let Some((primary, alt_ip, alt_port)) = settings.rfc5780 {
            l.bind_rfc5780(primary, alt_ip, alt_port)?;
        }
        for &addr in &settings.tls_listen {
            l.bind_tls(addr)?;
        }
        if dtls {
            for &addr in &settings.dtls_listen {
                l.bind_dtls(addr, true)?;
            }
        }
        Ok(l)
    }

    /// RFC 7350: a DTLS listener. Port 0 where a TLS listener has the same
    /// address takes that listener's port (DTLS beside TLS, as on 5349).
    /// `check`: refuse a port in use (false after a binary upgrade, where
    /// the old process still holds it until it stops).
    fn bind_dtls(&mut self, addr: SocketAddr, check: bool) -> Result<()> {
        let addr = match self.tls_listen.iter().find(|t| t.ip() == addr.ip()) {
            Some(t) if addr.port() == 0 => SocketAddr::new(addr.ip(), t.port()),
            _ => addr,
        };
        if check {
            if let Err(e) = ensure_free(addr, true) {
                anyhow::bail!("dtls-listen {addr}: cannot bind UDP: {e}{}", in_use_hint(&e));
            }
        }
        let first = bind_udp(addr).with_context(|| format!("dtls-listen {addr}: cannot bind UDP"))?;
        let bound = first.local_addr()?;
        self.per_worker[0].dtls.push((first, bound));
        for w in self.per_worker.iter_mut().skip(1) {
            w.dtls.push((
                bind_udp(bound).with_context(|| format!("dtls-listen {bound}: for another worker"))?,
                bound,
            ));
        }
        self.dtls_listen.push(bound);
        Ok(())
    }

    /// UDP and TCP on one address (port 0: one port shared by both).
    fn bind_plain(&mut self, addr: SocketAddr) -> Result<()> {
        let (u, t, bound) = bind_pair(addr)?;
        self.per_worker[0].udp.push((u, bound));
        self.per_worker[0].tcp.push((t, bound, false));
        for w in self.per_worker.iter_mut().skip(1) {
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
        self.listen.push(bound);
        Ok(())
    }

    /// RFC 5780 §4.1: the three other IP/port combinations, UDP only.
    fn bind_rfc5780(&mut self, primary: SocketAddr, alt_ip: IpAddr, alt_port: Option<u16>) -> Result<()> {
        let primary = self
            .listen
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
            for w in self.per_worker.iter_mut() {
                w.udp.push((
                    bind_udp(addr).with_context(|| format!("rfc5780 {addr}: cannot bind UDP"))?,
                    addr,
                ));
            }
            self.alt_listen.push(addr);
        }
        self.rfc5780 = Some(turn_core::Rfc5780 {
            ips: (primary.ip(), alt_ip),
            ports: (primary.port(), q),
        });
        Ok(())
    }

    fn bind_tls(&mut self, addr: SocketAddr) -> Result<()> {
        if let Err(e) = ensure_free(addr, false) {
            anyhow::bail!("tls-listen {addr}: cannot bind: {e}{}", in_use_hint(&e));
        }
        let t = bind_tcp(addr).with_context(|| format!("tls-listen {addr}: cannot bind TCP"))?;
        let bound = t.local_addr()?;
        self.per_worker[0].tcp.push((t, bound, true));
        for w in self.per_worker.iter_mut().skip(1) {
            w.tcp.push((
                bind_tcp(bound).with_context(|| format!("tls-listen {bound}: for another worker"))?,
                bound,
                true,
            ));
        }
        self.tls_listen.push(bound);
        Ok(())
    }
}

impl Listeners {
    /// A binary upgrade's listeners: the old process's sockets, worker by
    /// worker, in the order it sent them; nothing is bound.
    fn inherit(
        settings: &Settings,
        dtls: bool,
        h: &mut crate::upgrade::Handover,
        fds: &mut std::vec::IntoIter<std::os::fd::OwnedFd>,
    ) -> Result<Self> {
        // The sockets are the old process's: a configuration that listens
        // elsewhere cannot take them over (a restart applies it).
        for (what, want, have) in [
            ("listen", &settings.listen, &h.listen),
            ("tls-listen", &settings.tls_listen, &h.tls_listen),
        ] {
            let same = want.len() == have.len()
                && want
                    .iter()
                    .zip(have.iter())
                    .all(|(w, h)| w.ip() == h.ip() && (w.port() == 0 || w.port() == h.port()));
            if !same {
                anyhow::bail!(
                    "{what} changed ({have:?} running, {want:?} configured): a binary upgrade keeps the running sockets; restart to listen elsewhere"
                );
            }
        }
        let mut next = || {
            fds.next()
                .context("a descriptor the hand-over announced is missing")
        };
        let mut per_worker = Vec::new();
        for part in h.workers.iter_mut() {
            let mut w = WorkerSockets {
                udp: vec![],
                dtls: vec![],
                tcp: vec![],
                taken: None,
            };
            for (_, addr) in &part.udp {
                w.udp.push((std::net::UdpSocket::from(next()?), *addr));
            }
            for (_, addr, tls) in &part.tcp {
                w.tcp.push((std::net::TcpListener::from(next()?), *addr, *tls));
            }
            let mut relays = Vec::new();
            for addr in &part.relays {
                relays.push((std::net::UdpSocket::from(next()?), *addr));
            }
            let mut tcp_relays = Vec::new();
            for addr in &part.tcp_relays {
                tcp_relays.push((std::net::TcpListener::from(next()?), *addr));
            }
            let mut conns = Vec::new();
            for c in &part.conns {
                conns.push((std::net::TcpStream::from(next()?), c.clone()));
            }
            let mut peers = Vec::new();
            for p in &part.peers {
                peers.push((std::net::TcpStream::from(next()?), p.clone()));
            }
            w.taken = Some(handover::TakenOver {
                relays,
                tcp_relays,
                conns,
                peers,
                old_tcp_listeners: part.tcp.clone(),
                snapshot: std::mem::replace(
                    &mut part.snapshot,
                    turn_core::snapshot::Snapshot {
                        version: turn_core::snapshot::SNAPSHOT_VERSION,
                        allocations: Vec::new(),
                        counters: Default::default(),
                        data_seq: 0,
                        tcp_seq: 0,
                    },
                ),
                old_listeners: part.udp.clone(),
                tcp_closed_bytes: part.tcp_closed_bytes,
                records: std::mem::take(&mut part.records),
            });
            per_worker.push(w);
        }
        let rfc5780 = match settings.rfc5780 {
            Some((primary, alt_ip, alt_port)) => {
                let primary = h
                    .listen
                    .iter()
                    .copied()
                    .find(|l| l.ip() == primary.ip())
                    .unwrap_or(primary);
                let q = alt_port
                    .or_else(|| primary.port().checked_add(1))
                    .context("rfc5780: no alt-port")?;
                Some(turn_core::Rfc5780 {
                    ips: (primary.ip(), alt_ip),
                    ports: (primary.port(), q),
                })
            }
            None => None,
        };
        let mut l = Listeners {
            per_worker,
            listen: h.listen.clone(),
            tls_listen: h.tls_listen.clone(),
            dtls_listen: Vec::new(),
            alt_listen: h.alt_listen.clone(),
            rfc5780,
        };
        // DTLS sessions cannot be handed over: this process binds its own
        // DTLS sockets beside the old process's (SO_REUSEPORT); the old
        // one has given each of its sessions a connected socket first
        // (`Worker::dtls_set_aside`), so they stay whole there.
        if dtls {
            for &addr in &settings.dtls_listen {
                l.bind_dtls(addr, false)?;
            }
        }
        Ok(l)
    }
}

/// Starts the workers. Listeners are bound before this returns, so a caller
/// can connect at once.
pub fn start(settings: &Settings) -> Result<Handle> {
    start_with(settings, None)
}

/// Starts the workers on the sockets and allocations a binary upgrade
/// handed over (`crate::upgrade`): nothing is bound, and nonces the old
/// process gave out stay valid.
pub(crate) fn start_inherited(
    settings: &Settings,
    handover: crate::upgrade::Handover,
    fds: Vec<std::os::fd::OwnedFd>,
) -> Result<Handle> {
    start_with(settings, Some((handover, fds)))
}

fn start_with(
    settings: &Settings,
    mut inherited: Option<(crate::upgrade::Handover, Vec<std::os::fd::OwnedFd>)>,
) -> Result<Handle> {
    let n = settings.threads;
    let board: crate::metrics::Board = Arc::new(Mutex::new(vec![Default::default(); n]));
    let mut fds = inherited
        .as_mut()
        .map(|(_, fds)| std::mem::take(fds).into_iter())
        .unwrap_or_default();
    let tls_setup = match &settings.tls {
        Some(src) => Some(crate::tls::setup(src)?),
        None => None,
    };
    let dtls_identity = dtls::identity(settings, tls_setup.as_ref())?;
    let Listeners {
        per_worker,
        listen,
        tls_listen,
        dtls_listen,
        alt_listen,
        rfc5780,
    } = match inherited.as_mut() {
        Some((h, _)) => Listeners::inherit(settings, dtls_identity.is_some(), h, &mut fds)?,
        None => Listeners::bind(settings, dtls_identity.is_some())?,
    };

    // The HTTP listeners are bound here, before the peer policy is made:
    // they are the server's own sockets as much as the TURN listeners, and
    // with loopback or private peers allowed a relay could otherwise reach
    // /metrics or the admin API (RFC 8656 §21.2.3's concern).
    let http = match inherited.as_ref() {
        Some((h, _)) => HttpListeners::inherit(settings, h, &mut fds)?,
        None => HttpListeners::bind(settings)?,
    };
    // After the listeners (their addresses choose the interfaces), before
    // the core's configuration (which says whether entries are wanted).
    // After a binary upgrade, on the old process's links, unswapped yet.
    let handed = match inherited.as_ref() {
        Some((h, _)) => fast::Handed::take(h, &mut fds)?,
        None => fast::Handed::default(),
    };
    let fast_state = fast::start(settings, &listen, handed)?;
    crate::metrics::FAST_PATH_ACTIVE.store(
        matches!(fast_state, fast::State::Active(..)) as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    // Copies for a later binary upgrade to hand over.
    let http_copies = http.copies();
    let own_sockets: Vec<SocketAddr> = listen
        .iter()
        .chain(tls_listen.iter())
        .chain(dtls_listen.iter())
        .chain(alt_listen.iter())
        .copied()
        .chain(http.addrs())
        .collect();
    let (nonce_secret, epoch, unix_at_epoch) = nonce_clock(inherited.as_ref().map(|(h, _)| h));
    if let Some((h, _)) = &inherited {
        // The upgrade that started this process counts as done.
        use std::sync::atomic::Ordering::Relaxed;
        crate::metrics::UPGRADES_OK.store(h.upgrades[0] + 1, Relaxed);
        crate::metrics::UPGRADES_FAILED.store(h.upgrades[1], Relaxed);
    }
    let base = CoreBase {
        nonce_secret,
        epoch,
        unix_at_epoch,
        quotas: Arc::new(turn_core::limits::Quotas::new(
            settings.options.user_quota,
            settings.options.total_quota,
        )),
        draining: Arc::new(AtomicBool::new(false)),
        rfc5780,
        own_sockets,
        fast_path: matches!(fast_state, fast::State::Active(..)),
        redirect: Arc::new(turn_core::Redirect::default()),
        relayed: Arc::default(),
        user_bandwidth: Arc::default(),
    };
    base.quotas.set_fleet_limit(settings.options.fleet_total_quota);
    crate::metrics::set_allocation_limit(settings.options.total_quota);
    crate::metrics::set_relay_ports(settings.options.min_port, settings.options.max_port);
    let mut shared = SharedLimits::new(settings);
    if let Some(state) = inherited.as_ref().and_then(|(h, _)| h.auth_guard.as_ref()) {
        shared.continue_guard(settings, state);
    }
    let core_cfg = (core_config(settings, &base), core_shared(&base, &shared));
    let draining = base.draining.clone();
    let quotas = base.quotas.clone();
    let metrics = match http.metrics {
        Some(l) => Some(crate::metrics::serve(l, board.clone(), draining.clone())?),
        None => None,
    };

    let flag = Arc::new(control::StopFlag::default());
    let reloads = Arc::new(Reloads::default());
    let fast = match &fast_state {
        fast::State::Active(f, ..) => Some(f.clone()),
        _ => None,
    };
    let events = crate::events::Sinks::start(&settings.events, &node_name(), &settings.realm)?;
    let (workers, taken_over) = spawn_workers(
        settings,
        per_worker,
        &core_cfg,
        WorkerShared {
            stop: flag.clone(),
            reloads: reloads.clone(),
            board: board.clone(),
            connections: shared.connections.clone(),
            tls: tls_setup.as_ref().map(|t| t.config.clone()),
            fast: fast.clone(),
            dtls: dtls_identity
                .map(|id| dtls::DtlsParams::new(settings, id))
                .transpose()?,
            events: events.as_ref().map(|s| (s.emitter(), settings.events.interim)),
        },
    )?;
    // The workers hold the restored allocations and the maps their
    // entries: this process's program goes on the handed-over links.
    if let (Some(f), Some(_)) = (&fast, &inherited) {
        f.lock()
            .unwrap_or_else(|p| p.into_inner())
            .adopt_links()
            .context("fast path: putting this binary's program on the running links")?;
    }
    Ok(Handle {
        listen,
        tls_listen,
        dtls_listen,
        alt_listen,
        tls_fingerprint: tls_setup.as_ref().map(|t| t.fingerprint.clone()),
        metrics,
        tls_leaf: tls_setup.as_ref().map(|t| t.leaf.to_vec()),
        fast_path: fast_state.describe(),
        admin_listener: http.admin,
        web_listener: http.web,
        http_copies,
        taken_over: inherited.map(|(h, _)| (h.pid, taken_over.allocations, taken_over.dropped)),
        stop: Control {
            flag,
            wakers: workers.wakers,
            draining,
            quotas,
            reloads,
            base,
            commands: workers.commands,
            limits: Arc::new(Mutex::new(shared)),
            board,
            handed_over: Arc::default(),
            leaving: Arc::default(),
            fast,
        },
        threads: workers.threads,
        events,
    })
}

/// This host's name, for event records (`/proc/sys/kernel/hostname`).
fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "turnpike".to_string())
}

/// The nonce key, the epoch and the Unix time at it: new, or after an
/// upgrade the old process's, so nonces its clients hold stay valid.
fn nonce_clock(handover: Option<&crate::upgrade::Handover>) -> ([u8; 32], Instant, u64) {
    if let Some(h) = handover {
        let epoch = Instant::now()
            .checked_sub(Duration::from_millis(h.epoch_age_ms))
            .unwrap_or_else(Instant::now);
        return (h.nonce_secret, epoch, h.unix_at_epoch);
    }
    let mut secret = [0u8; 32];
    rand::thread_rng().fill(&mut secret);
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    (secret, Instant::now(), unix)
}

/// What every worker shares, besides the core's configuration.
struct WorkerShared {
    stop: Arc<control::StopFlag>,
    reloads: Arc<Reloads>,
    board: crate::metrics::Board,
    connections: Arc<turn_core::limits::SourceCounter>,
    tls: Option<Arc<rustls::ServerConfig>>,
    fast: Option<fast::Shared>,
    dtls: Option<dtls::DtlsParams>,
    events: Option<(crate::events::Emitter, Duration)>,
}

/// The running workers: their threads, wakers and command channels.
struct Workers {
    threads: Vec<std::thread::JoinHandle<()>>,
    wakers: Vec<Arc<Waker>>,
    commands: Vec<std::sync::mpsc::Sender<WorkerRequest>>,
}

/// One worker thread per listener set, each with its own core.
fn spawn_workers(
    settings: &Settings,
    per_worker: Vec<WorkerSockets>,
    core_cfg: &(turn_core::Config, turn_core::Shared),
    shared: WorkerShared,
) -> Result<(Workers, turn_core::snapshot::Restored)> {
    let mut restored = turn_core::snapshot::Restored::default();
    let reservations = Arc::new(Mutex::new(Reservations::default()));
    let redactor = Redactor::new(settings.options.redact);
    let mut commands = Vec::new();
    let mut wakers = Vec::new();
    let mut threads = Vec::new();
    // Polls and wakers first: every worker can pass a data connection
    // (RFC 6062 ConnectionBind) to the worker that owns its peer.
    let mut polls = Vec::new();
    let mut handoff_rx = Vec::new();
    let mut handoff_tx = Vec::new();
    let mut request_rx = Vec::new();
    let mut peers = Vec::new();
    for _ in 0..per_worker.len() {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (tx, rx) = std::sync::mpsc::channel();
        handoff_tx.push((tx, waker.clone()));
        handoff_rx.push(rx);
        // The control plane's requests, and other workers' (RFC 8016).
        let (tx, rx) = std::sync::mpsc::channel();
        commands.push(tx.clone());
        peers.push((tx, waker.clone()));
        request_rx.push(rx);
        wakers.push(waker);
        polls.push(poll);
    }
    let tcp_relay_addrs = tcp_relay::TcpRelayAddrs::default();
    for (((id, mut sockets), (poll, handoff)), rx) in per_worker
        .into_iter()
        .enumerate()
        .zip(polls.into_iter().zip(handoff_rx))
        .zip(request_rx)
    {
        let taken = sockets.taken.take();
        let mut cfg = core_cfg.0.clone();
        cfg.connection_id_tag = id as u8;
        let mut worker = Worker::new(
            poll,
            sockets,
            Server::with_shared(cfg, core_cfg.1.clone()),
            WorkerParams {
                relay: RelayConfig {
                    v4: settings.relay_v4,
                    v6: settings.relay_v6,
                    auto: settings.relay_auto,
                    min_port: settings.options.min_port,
                    max_port: settings.options.max_port,
                },
                connections: shared.connections.clone(),
                tls: shared.tls.clone(),
                stop: shared.stop.clone(),
                reservations: reservations.clone(),
                limits: conn_limits(settings),
                redact: redactor.clone(),
                reloads: shared.reloads.clone(),
                id,
                gso: settings.options.udp_gso,
                board: shared.board.clone(),
                commands: rx,
                peers: peers.clone(),
                handoff,
                handoff_to: handoff_tx.clone(),
                tcp_relay_addrs: tcp_relay_addrs.clone(),
                fast: shared.fast.clone(),
                refusals_per_second: settings.options.log_refusals_per_second,
                dtls: shared.dtls.clone(),
                events: shared.events.clone(),
                per_user: settings.options.metrics_per_user,
            },
        )?;
        if let Some(t) = taken {
            let r = worker
                .take_over(Instant::now(), t)
                .map_err(|e| anyhow::anyhow!("worker {id}: {e}"))?;
            restored.allocations += r.allocations;
            restored.dropped += r.dropped;
        }
        threads.push(
            std::thread::Builder::new()
                .name(format!("turnpike-worker-{id}"))
                .spawn(move || worker.run())?,
        );
    }
    Ok((
        Workers {
            threads,
            wakers,
            commands,
        },
        restored,
    ))
}
