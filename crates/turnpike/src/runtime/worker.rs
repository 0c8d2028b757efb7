//! One worker: a single-threaded mio loop over its listeners, connections
//! and relay sockets, its own `turn_core::Server`, and the per-worker
//! connection limits and timeouts.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use mio::net::{TcpListener, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use rand::rngs::SmallRng;
use rand::SeedableRng;
use slab::Slab;
use tracing::warn;
use turn_core::limits::SourceCounter;
use turn_core::{Command, FiveTuple, ListenerId, RelaysOpened, Server, Transport};

use super::control::{Reloads, WorkerRequest};
use super::dispatch::{Io, Source};
use super::log::{Redactor, RefusalLog};
use super::pairs::{Pairs, Stage};
use super::relays::{RelayConfig, Reservations};
use super::stream::Conn;

use super::{WorkerSockets, IDLE_TICK, SWEEP_INTERVAL, WAKER};
use crate::config::Settings;

pub(super) fn conn_limits(settings: &Settings) -> ConnLimits {
    ConnLimits {
        max_connections: settings.options.max_connections,
        max_pending: (settings.options.max_connections / 4)
            .max(64)
            .min(settings.options.max_connections),
        max_per_source: settings.options.max_connections_per_ip,
        proxy_from: settings.options.proxy_protocol_from.clone(),
        handshake_timeout: settings.handshake_timeout,
        idle_timeout: settings.idle_timeout,
    }
}

/// What a worker is given besides its sockets and core.
pub(super) struct WorkerParams {
    pub(super) relay: RelayConfig,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) reservations: Arc<Mutex<Reservations>>,
    pub(super) limits: ConnLimits,
    pub(super) redact: Redactor,
    pub(super) reloads: Arc<Reloads>,
    pub(super) id: usize,
    pub(super) gso: bool,
    pub(super) board: crate::metrics::Board,
    pub(super) commands: std::sync::mpsc::Receiver<WorkerRequest>,
    pub(super) connections: Arc<SourceCounter>,
    /// Data connections other workers pass to this one (RFC 6062).
    pub(super) handoff: std::sync::mpsc::Receiver<Box<Conn>>,
    /// Every worker's handoff channel and waker, by worker id.
    pub(super) handoff_to: Vec<(std::sync::mpsc::Sender<Box<Conn>>, Arc<mio::Waker>)>,
    pub(super) tcp_relay_addrs: super::tcp_relay::TcpRelayAddrs,
    pub(super) fast: Option<super::fast::Shared>,
    pub(super) refusals_per_second: u32,
}

/// Limits on TCP/TLS connections, per worker.
#[derive(Clone)]
pub(super) struct ConnLimits {
    pub(super) max_connections: usize,
    /// Connections that have not yet delivered one whole message (TLS
    /// handshakes included): what a slowloris or handshake flood piles up.
    pub(super) max_pending: usize,
    /// Connections one source IP may hold across workers (0: no cap).
    pub(super) max_per_source: u32,
    /// Load balancers that send PROXY protocol headers.
    pub(super) proxy_from: Vec<turn_core::policy::Cidr>,
    pub(super) handshake_timeout: Duration,
    pub(super) idle_timeout: Duration,
}

pub(super) struct Worker {
    pub(super) poll: Poll,
    pub(super) core: Server,
    pub(super) io: Io,
    pub(super) pairs: Pairs,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) stop: Arc<AtomicBool>,
    pub(super) buf: Vec<u8>,
    pub(super) batch: udp_io::RecvBatch,
    pub(super) limits: ConnLimits,
    pub(super) redact: Redactor,
    pub(super) reloads: Arc<Reloads>,
    pub(super) seen_generation: u64,
    pub(super) id: usize,
    pub(super) board: crate::metrics::Board,
    pub(super) commands: std::sync::mpsc::Receiver<WorkerRequest>,
    pub(super) tls_handshakes: u64,
    pub(super) tls_failures: u64,
    pub(super) recv_batches: u64,
    pub(super) recv_datagrams: u64,
    pub(super) pending: usize,
    pub(super) next_sweep: Instant,
    pub(super) connections: Arc<SourceCounter>,
    pub(super) errors: udp_io::ErrorQueue,
    pub(super) conn_refused_worker: u64,
    pub(super) conn_refused_per_source: u64,
    pub(super) proxy_refused: u64,
    pub(super) refusals: RefusalLog,
    pub(super) handoff: std::sync::mpsc::Receiver<Box<Conn>>,
    pub(super) handoff_to: Vec<(std::sync::mpsc::Sender<Box<Conn>>, Arc<mio::Waker>)>,
    /// UDP sockets left readable when their read budget ran out: mio is
    /// edge-triggered, so they are read again after the other sockets'
    /// events, not when the kernel says so.
    pub(super) unfinished: Vec<usize>,
}

/// `recvmmsg` batches one readiness event may read from one UDP socket.
/// A listener that stays full (every client's media arrives on it) would
/// otherwise keep the worker until it drains, while the relay sockets'
/// packets (a call's second hop) and the send queue wait: milliseconds
/// of latency under load, for no throughput.
const READ_BUDGET: usize = 4;

impl Worker {
    pub(super) fn new(poll: Poll, sockets: WorkerSockets, core: Server, p: WorkerParams) -> Result<Self> {
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
            handoff,
            handoff_to,
            tcp_relay_addrs,
            fast,
            refusals_per_second,
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
            tcp_relay_addrs,
            fast,
            fast_installed: Default::default(),
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
            pairs: Pairs::default(),
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
            proxy_refused: 0,
            unfinished: Vec::new(),
            refusals: RefusalLog::new(refusals_per_second),
            handoff,
            handoff_to,
        })
    }

    /// Carries out what the core asked for (open or close relay sockets)
    /// and sends the answers that waited on it. One branch per input when
    /// there is nothing to do.
    pub(super) fn drive_core(&mut self, now: Instant) {
        // One way: the core says what to do, the runtime does it and hands
        // back what completes at once; nothing here calls into the core
        // from inside the core.
        while let Some(command) = self.core.poll_command() {
            match command {
                Command::OpenRelays {
                    id,
                    primary,
                    additional,
                    ..
                } => {
                    let opened = RelaysOpened {
                        primary: self.io.open_relay(primary),
                        additional: additional.map(|r| self.io.open_relay(r)),
                    };
                    self.core.handle_relays_opened(now, id, opened);
                }
                Command::CloseRelay { relay } => self.io.close_relay(relay),
                Command::ConnectPeer { id, relay, peer } => match self.io.start_connect(id, relay, peer) {
                    Some(key) => self.pairs.add(id, key, Stage::Connecting),
                    None => self.core.handle_peer_connected(now, id, false),
                },
                Command::BindConnection { id, data, control } => self.bind_pair(id, data, control),
                Command::CloseConnection { id } => self.close_pair(id),
                Command::FastPathInstall(e) => self.io.fast_install(e),
                Command::FastPathRemove { client, channel } => self.io.fast_remove(client, channel),
            }
        }
        while let Some(t) = self.core.poll_transmit() {
            self.io.send(t.dest, &t.data);
        }
        if !self.io.fast_installed.final_counts.is_empty() {
            self.fast_counts(now, false);
        }
    }

    pub(super) fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            let timeout = self
                .core
                .poll_timeout()
                .into_iter()
                .chain(self.pairs.next_retry())
                .min()
                .map(|t| t.saturating_duration_since(now).min(IDLE_TICK))
                .unwrap_or(IDLE_TICK)
                .min(self.next_sweep.saturating_duration_since(now));
            let timeout = if self.unfinished.is_empty() {
                timeout
            } else {
                Duration::ZERO
            };
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
            // After this round's events: the sockets a budget cut short
            // last round (a key seen again above is read twice, harmlessly).
            let again = std::mem::take(&mut self.unfinished);
            for key in again {
                self.on_event(key, true, false, now);
            }
            self.core.handle_timeout(now);
            self.drive_core(now);
            self.adopt_handoffs(now);
            self.resume_held_pairs(now);
            self.apply_reload();
            self.handle_commands(now);
            if now >= self.next_sweep {
                self.sweep_connections(now);
                self.fast_counts(now, true);
                self.publish_metrics(now);
                self.refusals.flush(now);
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

    pub(super) fn on_event(&mut self, key: usize, readable: bool, writable: bool, now: Instant) {
        enum Kind {
            Udp(SocketAddr),
            Listener(bool, SocketAddr),
            Conn,
            Relay(SocketAddr),
            TcpRelay(SocketAddr),
            Peer,
        }
        let kind = match self.io.sources.get(key) {
            Some(Source::Udp { addr, .. }) => Kind::Udp(*addr),
            Some(Source::Listener { tls, addr, .. }) => Kind::Listener(*tls, *addr),
            Some(Source::Conn(_)) => Kind::Conn,
            Some(Source::Relay { addr, .. }) => Kind::Relay(*addr),
            Some(Source::TcpRelay { addr, .. }) => Kind::TcpRelay(*addr),
            Some(Source::Peer(_)) => Kind::Peer,
            None => return,
        };
        match kind {
            Kind::Udp(addr) => self.read_udp(key, addr, now),
            Kind::Relay(addr) => self.read_relay(key, addr, now),
            Kind::Listener(tls, addr) => self.accept(key, tls, addr),
            Kind::Conn => self.on_conn(key, readable, writable, now),
            Kind::TcpRelay(addr) => self.accept_peers(key, addr, now),
            Kind::Peer => self.on_peer(key, readable, writable, now),
        }
    }

    pub(super) fn read_udp(&mut self, key: usize, local: SocketAddr, now: Instant) {
        for round in 0.. {
            if round == READ_BUDGET {
                self.unfinished.push(key);
                return;
            }
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
    pub(super) fn read_relay_errors(&mut self, key: usize, relay: SocketAddr, now: Instant) {
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

    pub(super) fn read_relay(&mut self, key: usize, relay: SocketAddr, now: Instant) {
        let mut errors_read = false;
        for round in 0.. {
            if round == READ_BUDGET {
                self.unfinished.push(key);
                return;
            }
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

    /// Answers the control plane's requests.
    pub(super) fn handle_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                WorkerRequest::Sessions(reply) => {
                    let mut list = self.core.sessions(now);
                    // The bytes of TCP relays are counted where they move.
                    for s in &mut list {
                        self.pairs.fill_bytes(&mut s.tcp_connections);
                    }
                    let _ = reply.send(list);
                }
                WorkerRequest::Delete { pick, reply } => {
                    let n = self.core.delete_sessions(now, &*pick);
                    self.drive_core(now);
                    let _ = reply.send(n);
                }
            }
        }
    }

    /// Publishes this worker's numbers for the metrics endpoint (once a
    /// second: one short lock, never on the packet path).
    pub(super) fn publish_metrics(&mut self, now: Instant) {
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
            proxy_refused: self.proxy_refused,
            recv_batches: self.recv_batches,
            recv_datagrams: self.recv_datagrams,
            send: self.io.queue.stats(),
            gso: self.io.queue.gso_enabled(),
            tcp_connections: self.pairs.len(),
            tcp_bytes: self.pairs.totals(),
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
    pub(super) fn apply_reload(&mut self) {
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
            if let Some((mut cfg, shared)) = u.core {
                cfg.connection_id_tag = self.id as u8;
                self.core.reconfigure(cfg, shared);
            } else if let Some(c) = u.credentials {
                self.core.set_credentials(c);
            }
            if let Some(conn) = u.conn {
                self.limits = conn;
            }
            if let Some(tls) = u.tls {
                // New connections use the new certificate; open ones keep theirs.
                self.tls = Some(tls);
            }
        }
    }
}
