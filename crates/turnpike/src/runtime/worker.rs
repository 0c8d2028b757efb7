//! One worker: a single-threaded mio loop over its listeners, connections
//! and relay sockets and its own `turn_core::Server`; the loop, the
//! dispatch of events to the subsystem that owns the socket, and the
//! core's commands carried out.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
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
use turn_core::{Command, RelaysOpened, Server};

use super::connections::{ConnLimits, Streams};
use super::control::{Reloads, WorkerRequest};
use super::dispatch::{Io, Source};
use super::fast::FastPlane;
use super::log::{Redactor, RefusalLog};
use super::pairs::{Pairs, Stage};
use super::relays::{RelayConfig, Reservations};
use super::stream::Conn;
use super::udp::UdpReads;
use super::worker_control::ControlLink;
use super::{WorkerSockets, IDLE_TICK, SWEEP_INTERVAL, WAKER};

/// What a worker is given besides its sockets and core.
pub(super) struct WorkerParams {
    pub(super) relay: RelayConfig,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) stop: Arc<super::control::StopFlag>,
    pub(super) reservations: Arc<Mutex<Reservations>>,
    pub(super) limits: ConnLimits,
    pub(super) redact: Redactor,
    pub(super) reloads: Arc<Reloads>,
    pub(super) id: usize,
    pub(super) gso: bool,
    pub(super) board: crate::metrics::Board,
    pub(super) commands: std::sync::mpsc::Receiver<WorkerRequest>,
    /// Every worker's request channel and waker, by worker id (RFC 8016:
    /// an allocation moves between workers).
    pub(super) peers: Vec<(std::sync::mpsc::Sender<WorkerRequest>, Arc<mio::Waker>)>,
    pub(super) connections: Arc<SourceCounter>,
    /// Data connections other workers pass to this one (RFC 6062).
    pub(super) handoff: std::sync::mpsc::Receiver<Box<Conn>>,
    /// Every worker's handoff channel and waker, by worker id.
    pub(super) handoff_to: Vec<(std::sync::mpsc::Sender<Box<Conn>>, Arc<mio::Waker>)>,
    pub(super) tcp_relay_addrs: super::tcp_relay::TcpRelayAddrs,
    pub(super) fast: Option<super::fast::Shared>,
    pub(super) refusals_per_second: u32,
    /// DTLS (RFC 7350) for this worker's DTLS sockets, when on.
    pub(super) dtls: Option<super::dtls::DtlsParams>,
    /// Session events and their interim period, when a sink is set.
    pub(super) events: Option<(crate::events::Emitter, Duration)>,
    /// `--metrics-per-user`.
    pub(super) per_user: usize,
}

/// A worker: the protocol core and the subsystems that carry out what it
/// asks, each the one owner of its state.
pub(super) struct Worker {
    pub(super) poll: Poll,
    pub(super) core: Server,
    /// The sockets (one slab, one mio token space) and sending.
    pub(super) io: Io,
    /// Reading UDP listeners and relay sockets (`udp.rs`).
    pub(super) udp: UdpReads,
    /// TCP/TLS client connections: limits, counts, handoffs (`connections.rs`).
    pub(super) streams: Streams,
    /// RFC 6062 connection pairs (`pairs.rs`).
    pub(super) pairs: Pairs,
    /// The kernel fast path's entries of this worker (`fast.rs`).
    pub(super) fast: FastPlane,
    /// Reloads, requests and metrics from and to the control plane
    /// (`worker_control.rs`).
    pub(super) control: ControlLink,
    pub(super) id: usize,
    pub(super) redact: Redactor,
    pub(super) refusals: RefusalLog,
    /// Scratch space for one read.
    pub(super) buf: Vec<u8>,
    pub(super) next_sweep: Instant,
    /// Session events (`events.rs`), when a sink is set.
    pub(super) events: Option<super::events::EventsPlane>,
    /// `--metrics-per-user` (0: no per-user numbers published).
    pub(super) per_user: usize,
}

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
            peers,
            connections,
            handoff,
            handoff_to,
            tcp_relay_addrs,
            fast,
            refusals_per_second,
            dtls,
            events,
            per_user,
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
            dtls: Default::default(),
        };
        for (s, addr) in sockets.udp {
            let mut sock = UdpSocket::from_std(s);
            let e = io.sources.vacant_entry();
            io.registry
                .register(&mut sock, Token(e.key()), Interest::READABLE)?;
            io.udp_by_addr.push((addr, e.key()));
            e.insert(Source::Udp { sock, addr });
        }
        if let Some(p) = &dtls {
            for (s, addr) in sockets.dtls {
                let mut sock = UdpSocket::from_std(s);
                let e = io.sources.vacant_entry();
                io.registry
                    .register(&mut sock, Token(e.key()), Interest::READABLE)?;
                io.dtls.add(e.key(), p);
                e.insert(Source::Dtls { sock, addr });
            }
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
            udp: UdpReads::new(),
            streams: Streams::new(tls, limits, connections, handoff, handoff_to),
            pairs: Pairs::default(),
            fast: FastPlane::new(fast),
            control: ControlLink::new(stop, reloads, board, commands, peers),
            id,
            redact,
            refusals: RefusalLog::new(refusals_per_second),
            buf: vec![0u8; 65536],
            next_sweep: Instant::now() + SWEEP_INTERVAL,
            events: events.map(|(e, interim)| super::events::EventsPlane::new(e, interim)),
            per_user,
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
                Command::FastPathInstall(e) => self.fast.install(e),
                Command::FastPathRemove { client, channel } => self.fast.remove(client, channel),
                Command::MobilityElsewhere {
                    worker,
                    tuple,
                    request,
                } => self.mobility_elsewhere(worker, tuple, request),
            }
        }
        while let Some(t) = self.core.poll_transmit() {
            self.io.send(t.dest, &t.data);
        }
        if !self.fast.final_counts.is_empty() {
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
                .chain(self.io.dtls.poll_timeout())
                .min()
                .map(|t| t.saturating_duration_since(now).min(IDLE_TICK))
                .unwrap_or(IDLE_TICK)
                .min(self.next_sweep.saturating_duration_since(now));
            let timeout = if self.udp.unfinished.is_empty() {
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
            let again = std::mem::take(&mut self.udp.unfinished);
            for key in again {
                self.on_event(key, true, false, now);
            }
            self.dtls_tick(now);
            self.core.handle_timeout(now);
            self.drive_core(now);
            self.adopt_handoffs(now);
            self.resume_held_pairs(now);
            self.apply_reload();
            self.handle_commands(now);
            if now >= self.next_sweep {
                self.sweep_connections(now);
                self.fast_counts(now, true);
                self.end_over_quota(now);
                self.publish_metrics(now);
                self.refusals.flush(now);
                self.interim_records(now);
                self.next_sweep = now + SWEEP_INTERVAL;
            }
            // Everything this pass produced leaves in as few syscalls as
            // the kernel allows, before the worker sleeps again.
            self.io.queue.flush();
            self.update_interests(now);
            self.log_events();
            if self.control.stopping() {
                let now = Instant::now();
                self.dtls_close_all(now);
                self.core.close_all(now, self.control.stop.reason());
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
            Dtls(SocketAddr),
            Listener(bool, SocketAddr),
            Conn,
            Relay(SocketAddr),
            TcpRelay(SocketAddr),
            Peer,
        }
        let kind = match self.io.sources.get(key) {
            Some(Source::Udp { addr, .. }) => Kind::Udp(*addr),
            Some(Source::Dtls { addr, .. }) => Kind::Dtls(*addr),
            Some(Source::DtlsAside { local, .. }) => Kind::Dtls(*local),
            Some(Source::DtlsRetired) => return,
            Some(Source::Listener { tls, addr, .. }) => Kind::Listener(*tls, *addr),
            Some(Source::Conn(_)) => Kind::Conn,
            Some(Source::Relay { addr, .. }) => Kind::Relay(*addr),
            Some(Source::TcpRelay { addr, .. }) => Kind::TcpRelay(*addr),
            Some(Source::Peer(_)) => Kind::Peer,
            None => return,
        };
        match kind {
            Kind::Udp(addr) => self.read_udp(key, addr, now),
            Kind::Dtls(addr) => self.read_dtls(key, addr, now),
            Kind::Relay(addr) => self.read_relay(key, addr, now),
            Kind::Listener(tls, addr) => self.accept(key, tls, addr),
            Kind::Conn => self.on_conn(key, readable, writable, now),
            Kind::TcpRelay(addr) => self.accept_peers(key, addr, now),
            Kind::Peer => self.on_peer(key, readable, writable, now),
        }
    }

    /// `--max-allocation-bytes`: ends the allocations that relayed their
    /// bytes, counted with the fast path's (handed in just before) and
    /// their RFC 6062 connections'.
    fn end_over_quota(&mut self, now: Instant) {
        if self.core.config().max_allocation_bytes == 0 {
            return;
        }
        let rfc6062 = self.pairs.bytes_by_control();
        let outside =
            |t: &turn_core::FiveTuple| rfc6062.get(t).map_or(0, |[to, from]| to.saturating_add(*from));
        if self.core.end_over_quota(now, &outside) > 0 {
            self.drive_core(now);
        }
    }
}
