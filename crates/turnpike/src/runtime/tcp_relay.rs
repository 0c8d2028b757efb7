//! RFC 6062 TCP relays in the worker: the listening socket at a relayed
//! address, connects to peers from it, peer connections accepted on it,
//! and the relaying of raw bytes between a client data connection and its
//! peer once a ConnectionBind bound them (the core holds the protocol
//! state, `turn_core`'s `tcp_relay.rs`).
//!
//! Bytes are read straight into the other side's write buffer (one copy
//! between the sockets; TLS adds its own). Each direction holds at most
//! [`RAW_BUFFER`] bytes: past that the reading side stops being read, so
//! a peer or client that does not read slows the sender down through TCP
//! flow control instead of growing memory.

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};

use rand::Rng;
use tracing::{debug, warn};
use turn_core::{ConnectionId, FiveTuple, OpenedRelay, RelayError, RelayRequest};

use super::dispatch::{Io, Source};
use super::worker::Worker;

/// Bytes buffered per direction of a relayed TCP connection.
pub(super) const RAW_BUFFER: usize = 256 * 1024;

/// Why a relaying read stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Stop {
    /// Nothing more to read now (an edge-triggered poll will say when).
    WouldBlock,
    /// The destination's buffer is full: the source still has data, and
    /// must be read again (no new edge comes) once there is room.
    Full,
    /// The source ended.
    Ended,
    /// The bandwidth cap allows no more now (`--max-bps`): read again a
    /// little later.
    Throttled,
}

/// How long a capped direction waits before it is read again.
pub(super) const THROTTLE_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// The bandwidth buckets one TCP allocation's connections share, per
/// direction (`--max-bps`, as for UDP relaying).
pub(super) struct TcpCap {
    pub(super) up: turn_core::limits::Bucket,
    pub(super) down: turn_core::limits::Bucket,
    refs: u32,
}

/// One direction's buffer: allocated zeroed once (the allocator maps fresh
/// pages for this size, so nothing is written until used), read into at
/// `end`, written out from `start`. Unlike a `Vec` grown per read, no
/// byte is zeroed or moved per packet.
pub(super) struct RawBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RawBuf {
    pub(super) fn new() -> Self {
        RawBuf {
            data: vec![0u8; RAW_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Room at the end, moving what is buffered to the front if needed.
    fn room(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    /// Appends what fits of `bytes`; returns how much did.
    pub(super) fn extend(&mut self, bytes: &[u8]) -> usize {
        let room = self.room();
        let n = room.len().min(bytes.len());
        room[..n].copy_from_slice(&bytes[..n]);
        self.end += n;
        n
    }

    /// Reads from `src` until it would block, ends, this is full, or `max`
    /// bytes were read.
    pub(super) fn read_from(&mut self, src: &mut impl Read, max: usize) -> io::Result<(usize, Stop)> {
        let mut total = 0;
        loop {
            let left = max - total;
            let room = self.room();
            if room.is_empty() {
                return Ok((total, Stop::Full));
            }
            if left == 0 {
                return Ok((total, Stop::Throttled));
            }
            let n = room.len().min(left);
            match src.read(&mut room[..n]) {
                Ok(0) => return Ok((total, Stop::Ended)),
                Ok(n) => {
                    self.end += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((total, Stop::WouldBlock)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes as much as `dst` takes.
    pub(super) fn write_to(&mut self, dst: &mut impl Write) -> io::Result<()> {
        while self.start < self.end {
            match dst.write(&self.data[self.start..self.end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(())
    }
}

/// TCP relay addresses in use in this process. A relay listener and the
/// sockets that connect from it share the address with SO_REUSEPORT,
/// which would also let a second allocation's listener join the first's:
/// this set keeps each address to one allocation, across workers.
pub(super) type TcpRelayAddrs = Arc<Mutex<HashSet<SocketAddr>>>;

pub(super) enum PeerState {
    /// A connect in flight.
    Connecting,
    /// Connected or accepted; not read until bound (RFC 6062 §5.3: the
    /// server buffers the peer's data, here in the kernel).
    Pending,
    /// Bound to the client data connection with this key.
    Bound(usize),
}

pub(super) struct PeerConn {
    pub(super) id: ConnectionId,
    pub(super) stream: TcpStream,
    pub(super) state: PeerState,
    /// Bytes from the client waiting to be written to the peer (made
    /// when the connection is bound).
    pub(super) wbuf: Option<RawBuf>,
    /// The allocation's control connection, naming its shared cap.
    pub(super) control: Option<FiveTuple>,
    /// Capped: a read of the peer is scheduled.
    pub(super) throttled: bool,
    pub(super) interest: Option<Interest>,
    /// The peer is not read: the client's buffer is full.
    pub(super) paused: bool,
    /// The peer closed its side: close once `wbuf` toward the client drains.
    pub(super) eof: bool,
    pub(super) to_peer: u64,
    pub(super) from_peer: u64,
}

fn tcp_socket(addr: SocketAddr) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Io {
    /// Binds a TCP relay listener at a random free port (RFC 6062 §5.1).
    pub(super) fn bind_tcp_relay(&mut self, req: &RelayRequest) -> Result<OpenedRelay, RelayError> {
        let ip = self.relay_ip(req).ok_or(RelayError::FamilyUnsupported)?;
        let (lo, hi) = (self.relay.min_port, self.relay.max_port);
        for _ in 0..64 {
            let addr = SocketAddr::new(ip, self.rng.gen_range(lo..=hi));
            // One allocation per address (see `TcpRelayAddrs`), and never
            // the address of this worker's UDP relay (the core's tables are
            // keyed by address).
            if self.relay_by_addr.contains_key(&addr) {
                continue;
            }
            if !self
                .tcp_relay_addrs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(addr)
            {
                continue;
            }
            let bound = tcp_socket(addr).and_then(|s| {
                s.bind(&addr.into())?;
                s.listen(128)?;
                Ok(s)
            });
            match bound {
                Ok(s) => {
                    let mut sock = TcpListener::from_std(s.into());
                    let entry = self.sources.vacant_entry();
                    let key = entry.key();
                    if self
                        .registry
                        .register(&mut sock, Token(key), Interest::READABLE)
                        .is_err()
                    {
                        self.release_tcp_addr(addr);
                        return Err(RelayError::Exhausted);
                    }
                    entry.insert(Source::TcpRelay { sock, addr });
                    self.relay_by_addr.insert(addr, key);
                    return Ok(OpenedRelay { addr, token: None });
                }
                Err(e) => {
                    self.release_tcp_addr(addr);
                    if e.kind() != io::ErrorKind::AddrInUse {
                        warn!(%addr, error = %e, "cannot bind a TCP relay socket");
                        return Err(RelayError::Exhausted);
                    }
                }
            }
        }
        Err(RelayError::Exhausted)
    }

    pub(super) fn release_tcp_addr(&mut self, addr: SocketAddr) {
        self.tcp_relay_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }

    /// RFC 6062 §5.2: a non-blocking connect from the relayed address;
    /// false when it failed before it began (the caller completes it).
    #[must_use]
    pub(super) fn start_connect(&mut self, id: ConnectionId, relay: SocketAddr, peer: SocketAddr) -> bool {
        let started = tcp_socket(relay).and_then(|s| {
            s.bind(&relay.into())?;
            match s.connect(&peer.into()) {
                Ok(()) => Ok(s),
                Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
                Err(e) => Err(e),
            }
        });
        let mut stream = match started {
            Ok(s) => TcpStream::from_std(s.into()),
            Err(e) => {
                debug!(%relay, %peer, error = %e, "connect to a peer failed at once");
                return false;
            }
        };
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        let interest = Interest::WRITABLE;
        if self.registry.register(&mut stream, Token(key), interest).is_err() {
            return false;
        }
        entry.insert(Source::Peer(Box::new(PeerConn {
            id,
            stream,
            state: PeerState::Connecting,
            wbuf: None,
            control: None,
            throttled: false,
            interest: Some(interest),
            paused: false,
            eof: false,
            to_peer: 0,
            from_peer: 0,
        })));
        self.peer_by_id.insert(id, key);
        true
    }

    /// RFC 6062 §5.4: the data connection `data` and peer `id` relay raw
    /// bytes from now on.
    pub(super) fn bind_pair(&mut self, id: ConnectionId, data: FiveTuple, control: FiveTuple) {
        let (Some(&pkey), Some(&ckey)) = (self.peer_by_id.get(&id), self.conn_by_tuple.get(&data)) else {
            return;
        };
        if let Some(Source::Conn(c)) = self.sources.get_mut(ckey) {
            c.raw = Some(pkey);
            if c.tls.is_none() {
                c.raw_out = Some(RawBuf::new());
            }
        }
        if let Some(Source::Peer(p)) = self.sources.get_mut(pkey) {
            p.state = PeerState::Bound(ckey);
            p.wbuf = Some(RawBuf::new());
            p.control = Some(control);
            self.tcp_caps
                .entry(control)
                .or_insert_with(|| TcpCap {
                    up: turn_core::limits::Bucket::new(),
                    down: turn_core::limits::Bucket::new(),
                    refs: 0,
                })
                .refs += 1;
        }
        self.raw_ready.push(pkey);
    }

    /// Closes peer connection `id` and the data connection bound to it.
    pub(super) fn close_peer(&mut self, id: ConnectionId) {
        let Some(pkey) = self.peer_by_id.remove(&id) else {
            return;
        };
        if let Source::Peer(mut p) = self.sources.remove(pkey) {
            if p.interest.is_some() {
                let _ = self.registry.deregister(&mut p.stream);
            }
            self.tcp_bytes[0] += p.to_peer;
            self.tcp_bytes[1] += p.from_peer;
            if let Some(control) = p.control {
                if let Some(cap) = self.tcp_caps.get_mut(&control) {
                    cap.refs -= 1;
                    if cap.refs == 0 {
                        self.tcp_caps.remove(&control);
                    }
                }
            }
            if let PeerState::Bound(ckey) = p.state {
                // The key names the data connection only while it is
                // bound to this peer (slab keys are reused).
                if let Some(Source::Conn(c)) = self
                    .sources
                    .get_mut(ckey)
                    .filter(|s| matches!(s, Source::Conn(c) if c.raw == Some(pkey)))
                {
                    c.raw = None;
                    // Whatever the client still had to receive is flushed
                    // best-effort, then the connection goes.
                    let _ = c.flush();
                    self.doomed_conns.push(ckey);
                }
            }
        }
    }

    /// Bytes relayed over TCP so far (closed and open connections): to
    /// peers, from peers.
    pub(super) fn tcp_bytes_total(&self) -> [u64; 2] {
        let mut t = self.tcp_bytes;
        for &key in self.peer_by_id.values() {
            if let Some(Source::Peer(p)) = self.sources.get(key) {
                t[0] += p.to_peer;
                t[1] += p.from_peer;
            }
        }
        t
    }

    pub(super) fn close_tcp_relay(&mut self, key: usize, addr: SocketAddr) {
        if let Source::TcpRelay { mut sock, .. } = self.sources.remove(key) {
            let _ = self.registry.deregister(&mut sock);
        }
        self.release_tcp_addr(addr);
    }

    fn set_peer_interest(&mut self, pkey: usize) {
        let Some(Source::Peer(p)) = self.sources.get_mut(pkey) else {
            return;
        };
        let want = match p.state {
            PeerState::Connecting => Some(Interest::WRITABLE),
            PeerState::Pending => None,
            PeerState::Bound(_) => match (
                !p.paused && !p.eof,
                p.wbuf.as_ref().is_some_and(|b| !b.is_empty()),
            ) {
                (true, true) => Some(Interest::READABLE | Interest::WRITABLE),
                (true, false) => Some(Interest::READABLE),
                (false, true) => Some(Interest::WRITABLE),
                (false, false) => None,
            },
        };
        if want == p.interest {
            return;
        }
        let r = match (p.interest, want) {
            (None, Some(w)) => self.registry.register(&mut p.stream, Token(pkey), w),
            (Some(_), Some(w)) => self.registry.reregister(&mut p.stream, Token(pkey), w),
            (Some(_), None) => self.registry.deregister(&mut p.stream),
            (None, None) => Ok(()),
        };
        if r.is_ok() {
            p.interest = want;
        }
    }
}

impl Worker {
    /// RFC 6062 §5.3: peers connecting to a TCP relayed address.
    pub(super) fn accept_peers(&mut self, key: usize, relay: SocketAddr, now: Instant) {
        loop {
            let Some(Source::TcpRelay { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let (stream, peer) = match sock.accept() {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            // Without a permission (or over the limit) it is closed at once.
            let Some(id) = self.core.handle_peer_connection(now, relay, peer) else {
                debug!(%relay, peer = %self.redact.show(&peer), "peer connection refused");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let entry = self.io.sources.vacant_entry();
            self.io.peer_by_id.insert(id, entry.key());
            entry.insert(Source::Peer(Box::new(PeerConn {
                id,
                stream,
                state: PeerState::Pending,
                wbuf: None,
                control: None,
                throttled: false,
                interest: None,
                paused: false,
                eof: false,
                to_peer: 0,
                from_peer: 0,
            })));
            self.drive_core(now);
        }
    }

    /// Events on a peer connection: a connect completing, or relaying.
    pub(super) fn on_peer(&mut self, pkey: usize, readable: bool, writable: bool, now: Instant) {
        let Some(Source::Peer(p)) = self.io.sources.get_mut(pkey) else {
            return;
        };
        if let PeerState::Connecting = p.state {
            if !writable && !readable {
                return;
            }
            let id = p.id;
            let failed = p.stream.take_error().ok().flatten().is_some() || p.stream.peer_addr().is_err();
            if failed {
                self.io.peer_by_id.remove(&id);
                if let Source::Peer(mut p) = self.io.sources.remove(pkey) {
                    let _ = self.io.registry.deregister(&mut p.stream);
                }
                self.core.handle_peer_connected(now, id, false);
            } else {
                let _ = p.stream.set_nodelay(true);
                p.state = PeerState::Pending;
                self.io.set_peer_interest(pkey);
                self.core.handle_peer_connected(now, id, true);
            }
            self.drive_core(now);
            return;
        }
        if writable {
            self.flush_to_peer(pkey, now);
        }
        if readable {
            self.pump_to_client(pkey, now);
        }
    }

    /// Peer → client: read the peer into the client's buffer, flush.
    pub(super) fn pump_to_client(&mut self, pkey: usize, now: Instant) {
        let Some(Source::Peer(p)) = self.io.sources.get(pkey) else {
            return;
        };
        let PeerState::Bound(ckey) = p.state else {
            return;
        };
        let rate = self.core.config().max_bps;
        let (id, ended) = {
            // (get2_mut asserts distinct keys; a stale key must not panic.)
            let pair = if pkey == ckey {
                None
            } else {
                self.io.sources.get2_mut(pkey, ckey)
            };
            let Some((Source::Peer(p), Source::Conn(c))) = pair else {
                return;
            };
            if c.raw != Some(pkey) || p.throttled {
                return;
            }
            let mut cap = p
                .control
                .and_then(|k| self.io.tcp_caps.get_mut(&k))
                .filter(|_| rate > 0);
            // Until the peer has nothing more, or the client's output stays
            // full after a write (then its draining resumes this), or the
            // cap stops it (then a retry does).
            loop {
                let max = cap
                    .as_mut()
                    .map_or(usize::MAX, |c| c.down.available(now, rate, rate) as usize);
                match c.relay_in(&mut p.stream, max) {
                    Ok((n, stop)) => {
                        p.from_peer += n as u64;
                        if let Some(c) = cap.as_mut() {
                            c.down.spend(n as u64);
                        }
                        match stop {
                            Stop::Throttled => {
                                p.throttled = true;
                                self.io.throttled.push((now + THROTTLE_RETRY, pkey));
                                break (p.id, false);
                            }
                            Stop::Ended => {
                                p.eof = true;
                                break (p.id, true);
                            }
                            Stop::WouldBlock => {
                                p.paused = false;
                                break (p.id, false);
                            }
                            Stop::Full if c.raw_pending() >= RAW_BUFFER / 2 => {
                                p.paused = true;
                                break (p.id, false);
                            }
                            Stop::Full => {}
                        }
                    }
                    Err(_) => break (p.id, true),
                }
            }
        };
        self.io.dirty.push(ckey);
        if ended {
            self.finish_if_drained(pkey, ckey, now, id);
        }
        self.io.set_peer_interest(pkey);
    }

    /// Client → peer: read the client data connection into the peer's
    /// buffer, write it out.
    pub(super) fn pump_to_peer(&mut self, ckey: usize, now: Instant) {
        let Some(Source::Conn(c)) = self.io.sources.get(ckey) else {
            return;
        };
        let Some(pkey) = c.raw else {
            return;
        };
        let rate = self.core.config().max_bps;
        let ended = {
            let pair = if pkey == ckey {
                None
            } else {
                self.io.sources.get2_mut(ckey, pkey)
            };
            let Some((Source::Conn(c), Source::Peer(p))) = pair else {
                return;
            };
            if c.raw_throttled {
                return;
            }
            let Some(wbuf) = p.wbuf.as_mut() else {
                return;
            };
            let mut cap = p
                .control
                .and_then(|k| self.io.tcp_caps.get_mut(&k))
                .filter(|_| rate > 0);
            // Bytes that came behind the ConnectionBind go first.
            if !c.rbuf.is_empty() {
                let n = wbuf.extend(&c.rbuf);
                p.to_peer += n as u64;
                c.rbuf.drain(..n);
            }
            // Until the client has nothing more, or the peer's buffer stays
            // full after a write (then its writability resumes this).
            let ended = loop {
                let max = cap
                    .as_mut()
                    .map_or(usize::MAX, |c| c.up.available(now, rate, rate) as usize);
                let stop = match c.relay_out(wbuf, max) {
                    Ok((n, stop)) => {
                        p.to_peer += n as u64;
                        if let Some(c) = cap.as_mut() {
                            c.up.spend(n as u64);
                        }
                        stop
                    }
                    Err(_) => Stop::Ended,
                };
                if wbuf.write_to(&mut p.stream).is_err() {
                    // The peer is gone: both go.
                    let id = p.id;
                    self.core.handle_tcp_closed(now, id);
                    self.drive_core(now);
                    return;
                }
                match stop {
                    Stop::Ended => break true,
                    Stop::Throttled => {
                        c.raw_throttled = true;
                        self.io.throttled.push((now + THROTTLE_RETRY, ckey));
                        break false;
                    }
                    Stop::WouldBlock => {
                        c.raw_paused = false;
                        break false;
                    }
                    Stop::Full if wbuf.len() >= RAW_BUFFER / 2 => {
                        c.raw_paused = true;
                        break false;
                    }
                    Stop::Full => {}
                }
            };
            if ended {
                c.raw_eof = true;
            }
            ended
        };
        if ended {
            // The client closed: the peer gets what is buffered, then goes.
            let id = match self.io.sources.get(pkey) {
                Some(Source::Peer(p)) => p.id,
                _ => return,
            };
            let drained = matches!(self.io.sources.get(pkey), Some(Source::Peer(p)) if p.wbuf.as_ref().is_none_or(RawBuf::is_empty));
            if drained {
                self.core.handle_tcp_closed(now, id);
                self.drive_core(now);
                return;
            }
        }
        self.io.set_peer_interest(pkey);
    }

    /// The peer's socket can take more: write, and resume the client.
    fn flush_to_peer(&mut self, pkey: usize, now: Instant) {
        let Some(Source::Peer(p)) = self.io.sources.get_mut(pkey) else {
            return;
        };
        let id = p.id;
        let Some(wbuf) = p.wbuf.as_mut() else {
            return;
        };
        if wbuf.write_to(&mut p.stream).is_err() {
            self.core.handle_tcp_closed(now, id);
            self.drive_core(now);
            return;
        }
        let drained = wbuf.is_empty();
        let below = wbuf.len() < RAW_BUFFER / 2;
        let PeerState::Bound(ckey) = p.state else {
            return;
        };
        let (client_eof, client_paused) = match self.io.sources.get(ckey) {
            Some(Source::Conn(c)) => (c.raw_eof, c.raw_paused),
            _ => (true, false),
        };
        if client_eof && drained {
            self.core.handle_tcp_closed(now, id);
            self.drive_core(now);
            return;
        }
        if client_paused && below {
            self.pump_to_peer(ckey, now);
        }
        self.io.set_peer_interest(pkey);
    }

    /// The client data connection drained some output: resume the peer,
    /// or finish a close the peer began.
    pub(super) fn client_drained(&mut self, ckey: usize, now: Instant) {
        let Some(Source::Conn(c)) = self.io.sources.get(ckey) else {
            return;
        };
        let Some(pkey) = c.raw else {
            return;
        };
        let pending = c.raw_pending();
        let Some(Source::Peer(p)) = self.io.sources.get(pkey) else {
            return;
        };
        let id = p.id;
        if p.eof {
            self.finish_if_drained(pkey, ckey, now, id);
        } else if p.paused && pending < RAW_BUFFER / 2 {
            if let Some(Source::Peer(p)) = self.io.sources.get_mut(pkey) {
                p.paused = false;
            }
            self.pump_to_client(pkey, now);
        }
    }

    fn finish_if_drained(&mut self, _pkey: usize, ckey: usize, now: Instant, id: ConnectionId) {
        let drained = match self.io.sources.get_mut(ckey) {
            Some(Source::Conn(c)) => c.flush().is_err() || c.raw_pending() == 0,
            _ => true,
        };
        if drained {
            self.core.handle_tcp_closed(now, id);
            self.drive_core(now);
        }
    }

    /// Newly bound pairs: relay what waited on either side.
    pub(super) fn start_raw(&mut self, now: Instant) {
        let ready = std::mem::take(&mut self.io.raw_ready);
        for pkey in ready {
            let ckey = match self.io.sources.get(pkey) {
                Some(Source::Peer(p)) => match p.state {
                    PeerState::Bound(c) => c,
                    _ => continue,
                },
                _ => continue,
            };
            self.pump_to_peer(ckey, now);
            self.pump_to_client(pkey, now);
        }
    }

    /// Capped directions whose wait is over are read again: `key` is a
    /// peer connection (peer → client) or a data connection (client → peer).
    pub(super) fn resume_throttled(&mut self, now: Instant) {
        if self.io.throttled.is_empty() {
            return;
        }
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.io.throttled)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.io.throttled = later;
        for (_, key) in due {
            match self.io.sources.get_mut(key) {
                Some(Source::Peer(p)) if p.throttled => {
                    p.throttled = false;
                    self.pump_to_client(key, now);
                }
                Some(Source::Conn(c)) if c.raw_throttled => {
                    c.raw_throttled = false;
                    self.pump_to_peer(key, now);
                }
                _ => {}
            }
        }
    }

    /// The earliest retry of a capped direction.
    pub(super) fn next_throttle(&self) -> Option<Instant> {
        self.io.throttled.iter().map(|(at, _)| *at).min()
    }

    /// Data connections whose peer closed: they go too.
    pub(super) fn close_doomed(&mut self, now: Instant) {
        while let Some(ckey) = self.io.doomed_conns.pop() {
            self.close_conn(ckey, now);
        }
    }
}

impl Worker {
    /// The worker a ConnectionBind in `msg` belongs to, when it is not
    /// this one: the kernel spreads a client's connections over workers,
    /// and the peer connection lives where its allocation does.
    pub(super) fn handoff_target(&self, msg: &[u8]) -> Option<usize> {
        if self.handoff_to.len() < 2 {
            return None;
        }
        let id = turn_core::connection_bind_id(msg)?;
        let owner = turn_core::connection_id_tag(id) as usize;
        (owner != self.id && owner < self.handoff_to.len()).then_some(owner)
    }

    /// Passes connection `key`, with the bytes it has not processed, to
    /// worker `owner`.
    pub(super) fn hand_off(&mut self, key: usize, owner: usize, rbuf: Vec<u8>) {
        if !matches!(self.io.sources.get(key), Some(Source::Conn(_))) {
            return;
        }
        let Source::Conn(mut c) = self.io.sources.remove(key) else {
            return;
        };
        let _ = self.io.registry.deregister(&mut c.stream);
        self.io.conn_by_tuple.remove(&c.tuple);
        if !c.got_message {
            self.pending -= 1;
        }
        c.rbuf = rbuf;
        c.writable_registered = false;
        let ip = c.tuple.client.ip();
        let (tx, waker) = &self.handoff_to[owner];
        match tx.send(c) {
            Ok(()) => {
                let _ = waker.wake();
            }
            // The owner is gone (shutdown): the connection closes here.
            Err(_) => self.connections.release(ip),
        }
    }

    /// Data connections other workers passed here: registered, and their
    /// ConnectionBind processed.
    pub(super) fn adopt_handoffs(&mut self, now: Instant) {
        while let Ok(mut c) = self.handoff.try_recv() {
            let entry = self.io.sources.vacant_entry();
            let key = entry.key();
            if self
                .io
                .registry
                .register(&mut c.stream, Token(key), Interest::READABLE)
                .is_err()
            {
                self.connections.release(c.tuple.client.ip());
                continue;
            }
            if !c.got_message {
                self.pending += 1;
            }
            self.io.conn_by_tuple.insert(c.tuple, key);
            entry.insert(Source::Conn(c));
            self.on_conn(key, true, false, now);
        }
    }
}
