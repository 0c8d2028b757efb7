//! STUN/TURN over DTLS (RFC 7350): a worker's DTLS listeners, each with
//! a `turn_dtls::Front` (cookies, caps, associations), between the UDP
//! socket and the core. The core sees transport `dtls` and a 5-tuple per
//! association; what it sends to such a client is encrypted here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::{info, warn};
use turn_core::{FiveTuple, ListenerId, Transport};
use turn_dtls::{Front, Identity, Limits, Output, Shared};

use super::dispatch::{Io, Source};
use super::worker::Worker;
use crate::config::Settings;

/// How often associations' retransmission timers, handshake deadlines and
/// idleness are looked at.
const TICK: Duration = Duration::from_millis(50);

/// What every worker's DTLS fronts share.
#[derive(Clone)]
pub(super) struct DtlsParams {
    pub(super) identity: Identity,
    pub(super) secret: [u8; 32],
    pub(super) epoch: Instant,
    pub(super) limits: Limits,
    pub(super) shared: Arc<Shared>,
}

/// The identity DTLS serves with, or `None` when DTLS is off. A
/// certificate DTLS cannot use refuses start when `dtls-listen` was asked
/// for by name, and leaves DTLS off (said in the log) by default.
pub(super) fn identity(settings: &Settings, tls: Option<&crate::tls::TlsSetup>) -> Result<Option<Identity>> {
    if settings.dtls_listen.is_empty() {
        return Ok(None);
    }
    let Some(tls) = tls else {
        return Ok(None);
    };
    match (&tls.dtls, settings.dtls_explicit) {
        (Ok(id), _) => Ok(Some(id.clone())),
        (Err(e), true) => anyhow::bail!(
            "dtls-listen: the TLS certificate cannot serve DTLS: {e}; give an ECDSA certificate and key (--cert/--key), or drop dtls-listen"
        ),
        (Err(e), false) => {
            warn!("DTLS is off: {e}; give an ECDSA certificate and key to serve DTLS on the TLS port, or set no-dtls to silence this");
            Ok(None)
        }
    }
}

impl DtlsParams {
    pub(super) fn new(settings: &Settings, identity: Identity) -> Result<Self> {
        Ok(DtlsParams {
            identity,
            secret: turn_dtls::random_secret().map_err(anyhow::Error::msg)?,
            epoch: Instant::now(),
            limits: Limits {
                handshake_timeout: settings.options.handshake_timeout.get(),
                // Outlives the longest allocation: a client that only
                // refreshes keeps its association.
                idle_timeout: settings.max_allocation_lifetime + Duration::from_secs(300),
                ..Limits::default()
            },
            shared: Arc::new(Shared::default()),
        })
    }
}

/// A worker's DTLS fronts, by socket key, and scratch output.
#[derive(Default)]
pub(super) struct DtlsPlane {
    fronts: Vec<(usize, Front)>,
    /// Associations with a socket of their own (`Source::DtlsAside`), set
    /// aside for a binary upgrade: (listener key, client) → socket key.
    aside: std::collections::HashMap<(usize, SocketAddr), usize>,
    /// What a send produced (kept apart from what a read is handing out).
    send_out: Output,
    read_out: Output,
    next_tick: Option<Instant>,
    /// When a refusal was last logged, and how many since went unlogged
    /// (a flood of spoofed hellos must not flood the log).
    last_log: Option<Instant>,
    unlogged: u64,
}

impl DtlsPlane {
    pub(super) fn add(&mut self, key: usize, p: &DtlsParams) {
        let front = Front::new(p.identity.clone(), p.secret, p.epoch, p.limits, p.shared.clone());
        self.fronts.push((key, front));
    }

    fn front(&mut self, key: usize) -> Option<&mut Front> {
        self.fronts.iter_mut().find(|(k, _)| *k == key).map(|(_, f)| f)
    }

    /// A reloaded certificate: new handshakes use it.
    pub(super) fn set_identity(&mut self, identity: &Identity) {
        for (_, f) in &mut self.fronts {
            f.set_identity(identity.clone());
        }
    }

    /// When the worker must wake for DTLS timers.
    pub(super) fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// Counts of every front, summed, with associations and half-open.
    pub(super) fn metrics(&self) -> crate::metrics::DtlsMetrics {
        let mut m = crate::metrics::DtlsMetrics::default();
        for (_, f) in &self.fronts {
            m.counters += f.counters();
            m.associations += f.len();
            m.half_open += f.half_open();
        }
        m
    }
}

fn tuple(key: usize, ends: turn_dtls::Ends) -> FiveTuple {
    FiveTuple {
        transport: Transport::Dtls,
        client: ends.client,
        server: ends.server,
        listener: ListenerId(key as u32),
    }
}

impl Io {
    /// Sends what a front produced from DTLS socket `key`: each datagram
    /// from the address its client reached, through the association's own
    /// socket where it has one.
    fn send_datagrams(&mut self, key: usize, out: &Output) {
        for (ends, r) in &out.datagrams {
            let data = &out.bytes[r.clone()];
            if let Some(Source::DtlsAside { sock, .. }) = self
                .dtls
                .aside
                .get(&(key, ends.client))
                .and_then(|k| self.sources.get(*k))
            {
                self.queue.push(sock, None, ends.client, data);
            } else if let Some(Source::Dtls { sock, addr }) = self.sources.get(key) {
                let src = addr.ip().is_unspecified().then_some(ends.server.ip());
                self.queue.push(sock, src, ends.client, data);
            }
        }
    }

    /// An association's own socket, once it ended.
    fn drop_aside(&mut self, key: usize, client: SocketAddr) {
        let Some(k) = self.dtls.aside.remove(&(key, client)) else {
            return;
        };
        if let Source::DtlsAside { mut sock, .. } = self.sources.remove(k) {
            let _ = self.registry.deregister(&mut sock);
            self.queue.close(sock);
        }
    }

    /// Encrypts `data` for the DTLS client of `t` and queues the records.
    pub(super) fn send_dtls(&mut self, t: FiveTuple, data: &[u8]) {
        let key = t.listener.0 as usize;
        let mut out = std::mem::take(&mut self.dtls.send_out);
        out.clear();
        if let Some(f) = self.dtls.front(key) {
            f.send(Instant::now(), t.client, data, &mut out);
        }
        self.send_datagrams(key, &out);
        // An association that ended while sending is noticed at the next
        // tick (the core is not called from inside a send).
        self.dtls.send_out = out;
    }
}

impl Worker {
    /// Datagrams on DTLS socket `key`: records through its front, the
    /// STUN messages they carried to the core.
    pub(super) fn read_dtls(&mut self, key: usize, local: SocketAddr, now: Instant) {
        for round in 0.. {
            if round == super::udp::READ_BUDGET {
                self.udp.unfinished.push(key);
                return;
            }
            // An association's own socket feeds its listener's front.
            let (sock, front) = match self.io.sources.get(key) {
                Some(Source::Dtls { sock, .. }) => (sock, key),
                Some(Source::DtlsAside { sock, listener, .. }) => (sock, *listener),
                _ => return,
            };
            let key = front;
            let n = match self.udp.batch.recv(sock) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            self.udp.recv_batches += 1;
            self.udp.recv_datagrams += n as u64;
            let mut out = std::mem::take(&mut self.io.dtls.read_out);
            out.clear();
            for i in 0..n {
                let Some(d) = self.udp.batch.get(i) else {
                    continue;
                };
                let server = SocketAddr::new(d.to_ip.unwrap_or(local.ip()), local.port());
                if let Some(f) = self.io.dtls.front(key) {
                    f.handle(now, d.from, server, d.data, &mut out);
                }
            }
            self.dtls_results(key, now, &out);
            self.io.dtls.read_out = out;
            self.arm_dtls_tick(now);
            if n < udp_io::BATCH {
                return;
            }
        }
    }

    /// What fronts produced: records out, messages to the core, ended
    /// associations' allocations closed.
    fn dtls_results(&mut self, key: usize, now: Instant, out: &Output) {
        self.io.send_datagrams(key, out);
        for (ends, r) in &out.received {
            if let Some(tx) = self
                .core
                .handle_client(now, tuple(key, *ends), &out.bytes[r.clone()])
            {
                self.io.transmit(tx);
            }
            self.drive_core(now);
        }
        for ends in &out.closed {
            // Like a closed TCP connection (RFC 8656 §3.1): the
            // allocation made over the association goes with it.
            self.core.handle_connection_closed(now, tuple(key, *ends));
            self.drive_core(now);
            self.io.drop_aside(key, ends.client);
        }
        let refusal = self.io.dtls.front(key).and_then(|f| f.take_refusal());
        if let Some((from, why)) = refusal {
            self.log_dtls_refusal(now, from, why);
        }
    }

    /// One line a second at most, saying how many went unlogged.
    fn log_dtls_refusal(&mut self, now: Instant, from: SocketAddr, why: turn_dtls::Refused) {
        let plane = &mut self.io.dtls;
        if plane
            .last_log
            .is_some_and(|t| now.saturating_duration_since(t) < Duration::from_secs(1))
        {
            plane.unlogged += 1;
            return;
        }
        plane.last_log = Some(now);
        let unlogged = std::mem::take(&mut plane.unlogged);
        let reason = match why {
            turn_dtls::Refused::Host => "the host's cap on DTLS handshakes in progress is reached",
            turn_dtls::Refused::PerSource => "this source IP's cap on DTLS handshakes in progress is reached",
            turn_dtls::Refused::Associations => "the host's cap on DTLS associations is reached",
            turn_dtls::Refused::OldVersion => {
                "the client offers only DTLS 1.0, which RFC 8996 forbids (answered with a protocol_version alert); it needs DTLS 1.2"
            }
        };
        info!(client = %self.redact.show(&from), similar_unlogged = unlogged, "DTLS handshake refused: {reason}");
    }

    fn arm_dtls_tick(&mut self, now: Instant) {
        let busy = self.io.dtls.fronts.iter().any(|(_, f)| !f.is_empty());
        self.io.dtls.next_tick = match (busy, self.io.dtls.next_tick) {
            (false, _) => None,
            (true, Some(t)) => Some(t),
            (true, None) => Some(now + TICK),
        };
    }

    /// Retransmissions, handshake deadlines and idle associations, every
    /// tick while any association exists.
    pub(super) fn dtls_tick(&mut self, now: Instant) {
        if self.io.dtls.next_tick.is_none_or(|t| t > now) {
            return;
        }
        self.io.dtls.next_tick = None;
        let keys: Vec<usize> = self.io.dtls.fronts.iter().map(|(k, _)| *k).collect();
        for key in keys {
            let mut out = std::mem::take(&mut self.io.dtls.read_out);
            out.clear();
            if let Some(f) = self.io.dtls.front(key) {
                f.handle_timeout(now, &mut out);
            }
            self.dtls_results(key, now, &out);
            self.io.dtls.read_out = out;
        }
        self.arm_dtls_tick(now);
    }

    /// Binary upgrade, old side, before the new process binds the DTLS
    /// ports: every association gets a socket of its own (bound to the
    /// address its client reached, SO_REUSEPORT, connected to the client),
    /// so its datagrams keep coming here whichever socket of the port's
    /// group the kernel would pick for it. Idempotent.
    pub(super) fn dtls_set_aside(&mut self) {
        let mut wanted = Vec::new();
        for (key, f) in &self.io.dtls.fronts {
            for ends in f.ends() {
                if !self.io.dtls.aside.contains_key(&(*key, ends.client)) {
                    wanted.push((*key, ends));
                }
            }
        }
        for (listener, ends) in wanted {
            let sock = match aside_socket(ends) {
                Ok(s) => s,
                Err(e) => {
                    warn!(client = %self.redact.show(&ends.client), error = %e, "upgrade: a DTLS session could not get a socket of its own; it may lose datagrams to the new process");
                    continue;
                }
            };
            let mut sock = mio::net::UdpSocket::from_std(sock);
            let e = self.io.sources.vacant_entry();
            if self
                .io
                .registry
                .register(&mut sock, mio::Token(e.key()), mio::Interest::READABLE)
                .is_err()
            {
                continue;
            }
            self.io.dtls.aside.insert((listener, ends.client), e.key());
            e.insert(Source::DtlsAside {
                sock,
                listener,
                local: ends.server,
            });
        }
    }

    /// Binary upgrade, old side, once the new process serves: the DTLS
    /// listeners close (new clients reach the new process only); their
    /// keys stay for the associations served through their own sockets.
    pub(super) fn dtls_retire_listeners(&mut self) {
        let keys: Vec<usize> = self
            .io
            .sources
            .iter()
            .filter(|(_, s)| matches!(s, Source::Dtls { .. }))
            .map(|(k, _)| k)
            .collect();
        for key in keys {
            let Some(entry) = self.io.sources.get_mut(key) else {
                continue;
            };
            if let Source::Dtls { mut sock, .. } = std::mem::replace(entry, Source::DtlsRetired) {
                let _ = self.io.registry.deregister(&mut sock);
                self.io.queue.close(sock);
            }
        }
    }

    /// Shutdown: close_notify to every association.
    pub(super) fn dtls_close_all(&mut self, now: Instant) {
        let keys: Vec<usize> = self.io.dtls.fronts.iter().map(|(k, _)| *k).collect();
        for key in keys {
            let mut out = Output::default();
            if let Some(f) = self.io.dtls.front(key) {
                f.close_all(now, &mut out);
            }
            self.io.send_datagrams(key, &out);
        }
    }
}

/// A socket for one association: bound to the server address its client
/// reached (in the listener's SO_REUSEPORT group) and connected to the
/// client, which the kernel prefers over the group for that client.
fn aside_socket(ends: turn_dtls::Ends) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(ends.server), Type::DGRAM, Some(Protocol::UDP))?;
    if ends.server.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&ends.server.into())?;
    s.connect(&ends.client.into())?;
    Ok(s.into())
}
