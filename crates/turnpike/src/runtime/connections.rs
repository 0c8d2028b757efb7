//! The worker's TCP and TLS client connections: accepting them within
//! the per-worker and per-source limits, the PROXY protocol header from a
//! trusted balancer, reading and handing whole messages to the core (and
//! ConnectionBinds to the worker that owns the peer), the sweep that
//! closes silent or stalled ones, closing, and write interest.

use std::io;
use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::{Interest, Token};
use tracing::{debug, info};
use turn_core::limits::SourceCounter;
use turn_core::proxy::{Header as ProxyHeader, Parsed};
use turn_core::{FiveTuple, ListenerId, Transport};

use super::dispatch::Source;
use super::stream::{Conn, Proxy, ReadStep};
use super::worker::Worker;
use crate::config::Settings;

pub(super) fn conn_limits(settings: &Settings) -> ConnLimits {
    ConnLimits {
        max_connections: settings.options.max_connections,
        max_pending: (settings.options.max_connections / 4)
            .max(64)
            .min(settings.options.max_connections),
        max_per_source: settings.options.max_connections_per_ip,
        proxy_from: settings.options.proxy_protocol_from.clone(),
        handshake_timeout: settings.options.handshake_timeout.get(),
        idle_timeout: settings.options.idle_timeout.get(),
    }
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

/// The worker's TCP/TLS client connections: their limits, the TLS
/// configuration new ones get, what is counted of them, and the channels
/// that pass RFC 6062 data connections between workers. (The sockets are
/// in the worker's slab, `Source::Conn`.)
pub(super) struct Streams {
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    pub(super) limits: ConnLimits,
    /// Connections that have not delivered one whole message yet.
    pub(super) pending: usize,
    pub(super) tls_handshakes: u64,
    pub(super) tls_failures: u64,
    pub(super) conn_refused_worker: u64,
    pub(super) conn_refused_per_source: u64,
    pub(super) proxy_refused: u64,
    /// Connections per source IP, shared by all workers.
    pub(super) connections: Arc<SourceCounter>,
    /// Data connections other workers pass to this one (RFC 6062).
    pub(super) handoff: Receiver<Box<Conn>>,
    /// Every worker's handoff channel and waker, by worker id.
    pub(super) handoff_to: Vec<(Sender<Box<Conn>>, Arc<mio::Waker>)>,
}

impl Streams {
    pub(super) fn new(
        tls: Option<Arc<rustls::ServerConfig>>,
        limits: ConnLimits,
        connections: Arc<SourceCounter>,
        handoff: Receiver<Box<Conn>>,
        handoff_to: Vec<(Sender<Box<Conn>>, Arc<mio::Waker>)>,
    ) -> Self {
        Streams {
            tls,
            limits,
            pending: 0,
            tls_handshakes: 0,
            tls_failures: 0,
            conn_refused_worker: 0,
            conn_refused_per_source: 0,
            proxy_refused: 0,
            connections,
            handoff,
            handoff_to,
        }
    }
}

/// What a read does after the PROXY protocol part.
pub(super) enum ProxyStep {
    /// On to the client's bytes.
    Proceed,
    /// The header is not whole yet and more may be there.
    ReadMore,
    /// Nothing more now (closed, or waiting for bytes).
    Stop,
}

impl Worker {
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
            if self.io.conn_by_tuple.len() >= self.streams.limits.max_connections
                || self.streams.pending >= self.streams.limits.max_pending
            {
                // Dropping the stream closes it at once.
                debug!(client = %self.redact.show(&client), "connection limit reached; closing");
                self.streams.conn_refused_worker += 1;
                continue;
            }
            // A trusted balancer's connection is counted under the client
            // its PROXY header names, once it has arrived.
            let balancer = self
                .streams
                .limits
                .proxy_from
                .iter()
                .any(|c| c.contains(client.ip()));
            // One source cannot take every slot: its count is shared by all
            // workers (the kernel spreads its connections over them).
            if !balancer
                && !self
                    .streams
                    .connections
                    .try_acquire(client.ip(), self.streams.limits.max_per_source)
            {
                debug!(client = %self.redact.show(&client), "per-source connection limit reached; closing");
                self.streams.conn_refused_per_source += 1;
                continue;
            }
            let release = |w: &Self| {
                if !balancer {
                    w.streams.connections.release(client.ip())
                }
            };
            let _ = stream.set_nodelay(true);
            let tls_conn = if tls {
                let made = self
                    .streams
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
                pair: None,
                raw_out: None,
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
            self.streams.pending += 1;
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
        if let Some(id) = self.io.sources.get(key).and_then(|s| match s {
            Source::Conn(c) => c.pair,
            _ => None,
        }) {
            // A bound data connection: raw bytes (RFC 6062 §5.4).
            self.on_bound_conn(id, readable, writable, now);
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
                self.streams.tls_handshakes += 1;
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
                        if matches!(self.io.sources.get(key), Some(Source::Conn(c)) if c.pair.is_some()) {
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
            if let Some(id) = c.pair {
                if !c.got_message {
                    c.got_message = true;
                    self.streams.pending -= 1;
                }
                self.io.dirty.push(key);
                self.start_pair(id, now);
                return;
            }
            if matches!(step, ReadStep::Progress) {
                c.last_rx = now;
            }
            if off > 0 && !c.got_message {
                c.got_message = true;
                self.streams.pending -= 1;
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
            self.streams.proxy_refused += 1;
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
                self.streams.proxy_refused += 1;
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
            self.streams.proxy_refused += 1;
            self.close_conn(key, now);
            return ProxyStep::Stop;
        }
        self.io.conn_by_tuple.remove(&old);
        self.io.conn_by_tuple.insert(tuple, key);
        c.tuple = tuple;
        debug!(balancer = %old.client, client = %self.redact.show(&tuple.client), "PROXY protocol header");
        if !self
            .streams
            .connections
            .try_acquire(tuple.client.ip(), self.streams.limits.max_per_source)
        {
            debug!(client = %self.redact.show(&tuple.client), "per-source connection limit reached; closing");
            self.streams.conn_refused_per_source += 1;
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

    /// Closes connections past their timeouts: no whole message within the
    /// handshake timeout (stalled TLS handshakes, silent connects), a message
    /// begun but not finished within it (slowloris), or silence past the idle
    /// timeout without an allocation.
    pub(super) fn sweep_connections(&mut self, now: Instant) {
        let (handshake_timeout, idle_timeout) = (
            self.streams.limits.handshake_timeout,
            self.streams.limits.idle_timeout,
        );
        let mut doomed = Vec::new();
        for (key, src) in self.io.sources.iter() {
            let Source::Conn(c) = src else { continue };
            let stalled = !c.got_message && now.saturating_duration_since(c.accepted) > handshake_timeout;
            // (A bound data connection's bytes are not messages.)
            let slow = c.pair.is_none()
                && c.partial_since
                    .is_some_and(|t| now.saturating_duration_since(t) > handshake_timeout);
            // A bound data connection may be quiet as long as its peer is.
            let idle = now.saturating_duration_since(c.last_rx) > idle_timeout
                && c.pair.is_none()
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

    /// Closes connection `key` and tells the core.
    pub(super) fn close_conn(&mut self, key: usize, now: Instant) {
        if let Some(tuple) = self.remove_conn(key) {
            self.core.handle_connection_closed(now, tuple);
            self.drive_core(now);
        }
    }

    /// Closes connection `key` without telling the core (it asked, or
    /// knows): the socket, the counts that held it. Its 5-tuple, if it
    /// was a connection.
    pub(super) fn remove_conn(&mut self, key: usize) -> Option<FiveTuple> {
        let Some(Source::Conn(_)) = self.io.sources.get(key) else {
            return None;
        };
        let Source::Conn(mut c) = self.io.sources.remove(key) else {
            return None;
        };
        if !c.got_message {
            self.streams.pending -= 1;
        }
        if c.tls.is_some() && !c.handshake_done {
            self.streams.tls_failures += 1;
        }
        let _ = self.io.registry.deregister(&mut c.stream);
        self.io.conn_by_tuple.remove(&c.tuple);
        if c.counted {
            self.streams.connections.release(c.tuple.client.ip());
        }
        Some(c.tuple)
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
