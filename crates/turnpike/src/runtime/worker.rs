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
use tracing::{debug, info, warn};
use turn_core::limits::SourceCounter;
use turn_core::proxy::{Header as ProxyHeader, Parsed};
use turn_core::{Command, FiveTuple, ListenerId, RelaysOpened, Server, Transport};

use super::control::{Reloads, WorkerRequest};
use super::dispatch::{Io, Source};
use super::log::{Redactor, RefusalLog};
use super::relays::{RelayConfig, Reservations};
use super::stream::{Conn, Proxy, ReadStep};

/// What a read does after the PROXY protocol part.
enum ProxyStep {
    /// On to the client's bytes.
    Proceed,
    /// The header is not whole yet and more may be there.
    ReadMore,
    /// Nothing more now (closed, or waiting for bytes).
    Stop,
}
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
            peer_by_id: HashMap::default(),
            tcp_relay_addrs,
            raw_ready: Vec::new(),
            doomed_conns: Vec::new(),
            tcp_bytes: [0; 2],
            tcp_caps: HashMap::default(),
            throttled: Vec::new(),
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
                Command::ConnectPeer { id, relay, peer } => {
                    if !self.io.start_connect(id, relay, peer) {
                        self.core.handle_peer_connected(now, id, false);
                    }
                }
                Command::BindConnection { id, data, control } => self.io.bind_pair(id, data, control),
                Command::CloseConnection { id } => self.io.close_peer(id),
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
                .chain(self.next_throttle())
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
            self.start_raw(now);
            self.resume_throttled(now);
            self.close_doomed(now);
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

    pub(super) fn accept(&mut self, key: usize, tls: bool, local: SocketAddr) {
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
            // A trusted balancer's connection is counted under the client
            // its PROXY header names, once it has arrived.
            let balancer = self.limits.proxy_from.iter().any(|c| c.contains(client.ip()));
            // One source cannot take every slot: its count is shared by all
            // workers (the kernel spreads its connections over them).
            if !balancer
                && !self
                    .connections
                    .try_acquire(client.ip(), self.limits.max_per_source)
            {
                debug!(client = %self.redact.show(&client), "per-source connection limit reached; closing");
                self.conn_refused_per_source += 1;
                continue;
            }
            let release = |w: &Self| {
                if !balancer {
                    w.connections.release(client.ip())
                }
            };
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
                raw: None,
                raw_paused: false,
                raw_eof: false,
                raw_out: None,
                raw_throttled: false,
                proxy: if balancer {
                    Proxy::Awaiting(Vec::new())
                } else {
                    Proxy::Unchecked
                },
                counted: !balancer,
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

    pub(super) fn on_conn(&mut self, key: usize, readable: bool, writable: bool, now: Instant) {
        if writable {
            if let Some(Source::Conn(c)) = self.io.sources.get_mut(key) {
                if c.flush().is_err() {
                    self.close_conn(key, now);
                    return;
                }
                self.io.dirty.push(key);
            }
        }
        if matches!(self.io.sources.get(key), Some(Source::Conn(c)) if c.raw.is_some()) {
            // A bound data connection: raw bytes (RFC 6062 §5.4).
            if writable {
                self.client_drained(key, now);
            }
            if readable {
                self.pump_to_peer(key, now);
            }
            return;
        }
        if !readable {
            return;
        }
        loop {
            let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
                return;
            };
            let step = c.fill(&mut self.buf);
            match self.proxy_header(key, &step, now) {
                ProxyStep::Proceed => {}
                ProxyStep::ReadMore => continue,
                ProxyStep::Stop => return,
            }
            let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
                return;
            };
            if !c.handshake_done && c.tls.as_ref().is_some_and(|t| !t.is_handshaking()) {
                c.handshake_done = true;
                self.tls_handshakes += 1;
            }
            let tuple = c.tuple;
            let mut rbuf = std::mem::take(&mut c.rbuf);
            let mut off = 0;
            let mut broken = false;
            let mut handed_off = false;
            while off < rbuf.len() {
                match turn_core::stream_frame_len(&rbuf[off..]) {
                    Some(Ok(n)) if rbuf.len() - off >= n => {
                        // RFC 6062: a ConnectionBind for a connection
                        // another worker owns goes there, whole.
                        if let Some(owner) = self.handoff_target(&rbuf[off..off + n]) {
                            rbuf.drain(..off);
                            self.hand_off(key, owner, std::mem::take(&mut rbuf));
                            handed_off = true;
                            break;
                        }
                        if let Some(tx) = self.core.handle_client(now, tuple, &rbuf[off..off + n]) {
                            self.io.transmit(tx);
                        }
                        self.drive_core(now);
                        off += n;
                        // Bound by that ConnectionBind: the rest is raw.
                        if matches!(self.io.sources.get(key), Some(Source::Conn(c)) if c.raw.is_some()) {
                            break;
                        }
                    }
                    Some(Err(())) => {
                        // Neither STUN nor ChannelData: framing is lost for good.
                        broken = true;
                        break;
                    }
                    _ => break,
                }
            }
            if handed_off {
                return;
            }
            rbuf.drain(..off);
            let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
                return;
            };
            c.rbuf = rbuf;
            if c.raw.is_some() {
                if !c.got_message {
                    c.got_message = true;
                    self.pending -= 1;
                }
                self.io.dirty.push(key);
                self.start_raw(now);
                return;
            }
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
                ReadStep::Closed | ReadStep::UntrustedProxy => {
                    self.close_conn(key, now);
                    return;
                }
            }
        }
    }

    /// The PROXY protocol part of a read: a trusted balancer's header
    /// parsed and the connection made the client's, or an untrusted one's
    /// refused.
    fn proxy_header(&mut self, key: usize, step: &ReadStep, now: Instant) -> ProxyStep {
        let Some(Source::Conn(c)) = self.io.sources.get_mut(key) else {
            return ProxyStep::Stop;
        };
        if matches!(step, ReadStep::UntrustedProxy) {
            info!(
                client = %self.redact.show(&c.tuple.client),
                "a PROXY protocol header from an address not in proxy-protocol-from; closing"
            );
            self.proxy_refused += 1;
            self.close_conn(key, now);
            return ProxyStep::Stop;
        }
        let Proxy::Awaiting(head) = &mut c.proxy else {
            return ProxyStep::Proceed;
        };
        let (header, len) = match turn_core::proxy::parse(head) {
            Parsed::Incomplete => {
                return match step {
                    ReadStep::Progress => ProxyStep::ReadMore,
                    ReadStep::WouldBlock => ProxyStep::Stop,
                    _ => {
                        self.close_conn(key, now);
                        ProxyStep::Stop
                    }
                };
            }
            Parsed::Invalid(why) => {
                info!(balancer = %c.tuple.client, why, "a bad PROXY protocol header; closing");
                self.proxy_refused += 1;
                self.close_conn(key, now);
                return ProxyStep::Stop;
            }
            Parsed::Done(h, n) => (h, n),
        };
        let rest = head.split_off(len);
        let old = c.tuple;
        let mut tuple = old;
        if let ProxyHeader::Proxied { client, .. } = header {
            tuple.client = client;
        }
        // A header naming a client this server already has a connection
        // from is a balancer gone wrong (or lying).
        if tuple != old && self.io.conn_by_tuple.contains_key(&tuple) {
            info!(balancer = %old.client, client = %self.redact.show(&tuple.client),
                  "a PROXY protocol header naming a connection that exists; closing");
            self.proxy_refused += 1;
            self.close_conn(key, now);
            return ProxyStep::Stop;
        }
        self.io.conn_by_tuple.remove(&old);
        self.io.conn_by_tuple.insert(tuple, key);
        c.tuple = tuple;
        debug!(balancer = %old.client, client = %self.redact.show(&tuple.client), "PROXY protocol header");
        if !self
            .connections
            .try_acquire(tuple.client.ip(), self.limits.max_per_source)
        {
            debug!(client = %self.redact.show(&tuple.client), "per-source connection limit reached; closing");
            self.conn_refused_per_source += 1;
            self.close_conn(key, now);
            return ProxyStep::Stop;
        }
        c.counted = true;
        if !c.after_proxy_header(&rest, &mut self.buf) {
            self.close_conn(key, now);
            return ProxyStep::Stop;
        }
        ProxyStep::Proceed
    }

    /// Answers the control plane's requests.
    pub(super) fn handle_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                WorkerRequest::Sessions(reply) => {
                    let mut list = self.core.sessions(now);
                    // The bytes of TCP relays are counted where they move.
                    for s in &mut list {
                        for t in &mut s.tcp_connections {
                            if let Some(Source::Peer(p)) = self
                                .io
                                .peer_by_id
                                .get(&t.id)
                                .and_then(|k| self.io.sources.get(*k))
                            {
                                t.to_peer_bytes = p.to_peer;
                                t.from_peer_bytes = p.from_peer;
                            }
                        }
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
            tcp_connections: self.io.peer_by_id.len(),
            tcp_bytes: self.io.tcp_bytes_total(),
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
            if let Some(mut cfg) = u.core {
                cfg.connection_id_tag = self.id as u8;
                self.core.reconfigure(cfg);
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

    /// Closes connections past their timeouts: no whole message within the
    /// handshake timeout (stalled TLS handshakes, silent connects), a message
    /// begun but not finished within it (slowloris), or silence past the idle
    /// timeout without an allocation.
    pub(super) fn sweep_connections(&mut self, now: Instant) {
        let (handshake_timeout, idle_timeout) = (self.limits.handshake_timeout, self.limits.idle_timeout);
        let mut doomed = Vec::new();
        for (key, src) in self.io.sources.iter() {
            let Source::Conn(c) = src else { continue };
            let stalled = !c.got_message && now.saturating_duration_since(c.accepted) > handshake_timeout;
            // (A bound data connection's bytes are not messages.)
            let slow = c.raw.is_none()
                && c.partial_since
                    .is_some_and(|t| now.saturating_duration_since(t) > handshake_timeout);
            // A bound data connection may be quiet as long as its peer is.
            let idle = now.saturating_duration_since(c.last_rx) > idle_timeout
                && c.raw.is_none()
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

    pub(super) fn close_conn(&mut self, key: usize, now: Instant) {
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
                if c.counted {
                    self.connections.release(c.tuple.client.ip());
                }
                self.core.handle_connection_closed(now, c.tuple);
                self.drive_core(now);
            }
        }
    }

    /// Flushes connections written to in this iteration, registers write
    /// interest for those with output left, and drops it once drained;
    /// closes connections whose writes failed.
    pub(super) fn update_interests(&mut self, now: Instant) {
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
}
