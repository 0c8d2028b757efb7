//! RFC 6062 connection pairs in the worker: one [`Pair`] per peer data
//! connection, the one place that knows which client data connection it
//! is bound to and how each direction's relaying stands (paused on a full
//! buffer, ended, held by the bandwidth cap, bytes moved). The core holds
//! the protocol state (`turn_core`'s `tcp_relay.rs`); the sockets are in
//! the worker's slab (`Source::Peer`, `Source::Conn`).
//!
//! Bytes are read straight into the other side's write buffer (one copy
//! between the sockets; TLS adds its own), at most
//! [`RAW_BUFFER`](super::raw_buf::RAW_BUFFER) per direction.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use turn_core::limits::Bucket;
use turn_core::{ConnectionId, FiveTuple, TcpConnectionInfo};

use super::dispatch::Source;
use super::raw_buf::{RawBuf, Stop, RAW_BUFFER};
use super::worker::Worker;

/// How long a capped direction waits before it is read again.
const THROTTLE_RETRY: Duration = Duration::from_millis(20);

/// A peer data connection's socket and what is waiting to be written to
/// it; its relaying state is its [`Pair`]'s.
pub(super) struct PeerConn {
    pub(super) id: ConnectionId,
    pub(super) stream: TcpStream,
    /// Bytes from the client waiting to be written to the peer (made
    /// when the connection is bound).
    pub(super) wbuf: Option<RawBuf>,
    /// What the socket is registered for (`None`: not registered).
    pub(super) interest: Option<Interest>,
}

/// Where a peer data connection stands.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Stage {
    /// A connect in flight (RFC 6062 §5.2).
    Connecting,
    /// Connected or accepted; not read until bound (§5.3: the server
    /// buffers the peer's data, here in the kernel).
    Pending,
    /// Bound to the client data connection with slab key `client`
    /// (§5.4); `control` names the allocation's shared bandwidth cap.
    Bound { client: usize, control: FiveTuple },
}

/// One direction of a bound pair.
#[derive(Default, Debug)]
pub(super) struct Flow {
    /// The reading side is not read: the other side's buffer is full.
    paused: bool,
    /// The reading side closed.
    ended: bool,
    /// Held by the bandwidth cap: a retry is scheduled.
    throttled: bool,
    /// Bytes moved.
    bytes: u64,
}

/// A peer data connection and, once bound, its client data connection.
pub(super) struct Pair {
    /// The peer connection's slab key.
    peer: usize,
    stage: Stage,
    /// Client → peer.
    up: Flow,
    /// Peer → client.
    down: Flow,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Direction {
    Up,
    Down,
}

/// The bandwidth buckets one TCP allocation's connections share, per
/// direction (`--max-bps`, as for UDP relaying).
struct TcpCap {
    up: Bucket,
    down: Bucket,
    pairs: u32,
}

/// The worker's connection pairs.
#[derive(Default)]
pub(super) struct Pairs {
    by_id: HashMap<ConnectionId, Pair, ahash::RandomState>,
    /// Bandwidth caps of TCP allocations, by control connection.
    caps: HashMap<FiveTuple, TcpCap, ahash::RandomState>,
    /// Capped directions to read again, earliest first (a retry whose
    /// direction is no longer held is skipped).
    retries: BinaryHeap<Reverse<(Instant, ConnectionId, Direction)>>,
    /// Bytes of closed pairs: to peers, from peers.
    closed_bytes: [u64; 2],
    /// Bytes of closed bound pairs by their allocation (its control
    /// connection), until the allocation ends (its usage record).
    closed_by_control: HashMap<FiveTuple, [u64; 2], ahash::RandomState>,
}

impl Pairs {
    /// A peer connection at slab key `peer`, connecting or accepted.
    pub(super) fn add(&mut self, id: ConnectionId, peer: usize, stage: Stage) {
        self.by_id.insert(
            id,
            Pair {
                peer,
                stage,
                up: Flow::default(),
                down: Flow::default(),
            },
        );
    }

    pub(super) fn stage(&self, id: ConnectionId) -> Option<Stage> {
        self.by_id.get(&id).map(|p| p.stage)
    }

    pub(super) fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Fills in the bytes each listed connection moved (the core does not
    /// see raw bytes).
    pub(super) fn fill_bytes(&self, list: &mut [TcpConnectionInfo]) {
        for t in list {
            if let Some(p) = self.by_id.get(&t.id) {
                t.to_peer_bytes = p.up.bytes;
                t.from_peer_bytes = p.down.bytes;
            }
        }
    }

    /// RFC 6062 bytes of the allocation whose control connection is
    /// `control`, closed and open pairs: to peers, from peers.
    pub(super) fn bytes_of(&self, control: FiveTuple) -> [u64; 2] {
        let closed = self.closed_by_control.get(&control).copied().unwrap_or_default();
        self.by_id
            .values()
            .filter(|p| matches!(p.stage, Stage::Bound { control: c, .. } if c == control))
            .fold(closed, |[to, from], p| [to + p.up.bytes, from + p.down.bytes])
    }

    /// [`Pairs::bytes_of`] for every allocation that has any, in one pass
    /// (the quota check and interim reports ask for all of them).
    pub(super) fn bytes_by_control(&self) -> HashMap<FiveTuple, [u64; 2], ahash::RandomState> {
        let mut by = self.closed_by_control.clone();
        for p in self.by_id.values() {
            if let Stage::Bound { control, .. } = p.stage {
                let [to, from] = by.entry(control).or_default();
                *to += p.up.bytes;
                *from += p.down.bytes;
            }
        }
        by
    }

    /// The allocation of `control` ended: its closed pairs' bytes are
    /// forgotten.
    pub(super) fn forget_control(&mut self, control: FiveTuple) {
        self.closed_by_control.remove(&control);
    }

    /// Bytes relayed over TCP so far, closed and open pairs: to peers,
    /// from peers.
    pub(super) fn totals(&self) -> [u64; 2] {
        self.by_id.values().fold(self.closed_bytes, |[to, from], p| {
            [to + p.up.bytes, from + p.down.bytes]
        })
    }

    /// For a binary upgrade: pair `id`'s peer socket key, its stage and
    /// its bytes each way (to the peer, from it), if it can move to another
    /// process: pending, or bound with neither direction ended (a half
    /// closed pair finishes here).
    pub(super) fn movable(&self, id: ConnectionId) -> Option<(usize, Stage, [u64; 2])> {
        let p = self.by_id.get(&id)?;
        let ok = match p.stage {
            Stage::Connecting => false,
            Stage::Pending => true,
            Stage::Bound { .. } => !p.up.ended && !p.down.ended,
        };
        ok.then_some((p.peer, p.stage, [p.up.bytes, p.down.bytes]))
    }

    /// Pair `id` moved to another process: forgotten here without a
    /// trace; its peer socket's key, for the caller to drop.
    pub(super) fn forget(&mut self, id: ConnectionId) -> Option<usize> {
        let pair = self.by_id.remove(&id)?;
        if let Stage::Bound { control, .. } = pair.stage {
            if let Some(cap) = self.caps.get_mut(&control) {
                cap.pairs -= 1;
                if cap.pairs == 0 {
                    self.caps.remove(&control);
                }
            }
        }
        Some(pair.peer)
    }

    /// Bytes of pairs closed so far (to peers, from peers): a binary
    /// upgrade carries them on, so the totals continue.
    pub(super) fn closed_bytes(&self) -> [u64; 2] {
        self.closed_bytes
    }

    /// Adds what another process's closed pairs had moved.
    pub(super) fn add_closed_bytes(&mut self, [to, from]: [u64; 2]) {
        self.closed_bytes[0] += to;
        self.closed_bytes[1] += from;
    }

    /// A pair taken over from another process: the bytes it had moved.
    pub(super) fn set_bytes(&mut self, id: ConnectionId, [up, down]: [u64; 2]) {
        if let Some(p) = self.by_id.get_mut(&id) {
            p.up.bytes = up;
            p.down.bytes = down;
        }
    }

    /// The earliest retry of a capped direction.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retries.peek().map(|Reverse((at, _, _))| *at)
    }

    fn remove(&mut self, id: ConnectionId) -> Option<Pair> {
        let pair = self.by_id.remove(&id)?;
        self.closed_bytes[0] += pair.up.bytes;
        self.closed_bytes[1] += pair.down.bytes;
        if let Stage::Bound { control, .. } = pair.stage {
            let c = self.closed_by_control.entry(control).or_default();
            c[0] += pair.up.bytes;
            c[1] += pair.down.bytes;
            if let Some(cap) = self.caps.get_mut(&control) {
                cap.pairs -= 1;
                if cap.pairs == 0 {
                    self.caps.remove(&control);
                }
            }
        }
        Some(pair)
    }
}

impl Worker {
    /// RFC 6062 §5.4: the data connection `data` and peer `id` relay raw
    /// bytes from now on. The relaying starts where the ConnectionBind was
    /// read ([`Worker::start_pair`]), once the bytes behind it are back in
    /// the connection's buffer.
    pub(super) fn bind_pair(&mut self, id: ConnectionId, data: FiveTuple, control: FiveTuple) {
        let Some(&client) = self.io.conn_by_tuple.get(&data) else {
            return;
        };
        let Some(pair) = self.pairs.by_id.get_mut(&id) else {
            return;
        };
        let Some((Source::Peer(p), Source::Conn(c))) = two(&mut self.io.sources, pair.peer, client) else {
            return;
        };
        p.wbuf = Some(RawBuf::new());
        c.pair = Some(id);
        if c.tls.is_none() {
            c.raw_out = Some(RawBuf::new());
        }
        pair.stage = Stage::Bound { client, control };
        self.pairs
            .caps
            .entry(control)
            .or_insert_with(|| TcpCap {
                up: Bucket::new(),
                down: Bucket::new(),
                pairs: 0,
            })
            .pairs += 1;
    }

    /// A pair taken over from another process, just bound again: the
    /// bytes that process had read from one side and not yet written to
    /// the other go first.
    pub(super) fn refill_pair(&mut self, id: ConnectionId, to_peer: &[u8], to_client: &[u8]) {
        let Some(pair) = self.pairs.by_id.get(&id) else {
            return;
        };
        let Stage::Bound { client, .. } = pair.stage else {
            return;
        };
        if let Some((Source::Peer(p), Source::Conn(c))) = two(&mut self.io.sources, pair.peer, client) {
            if let Some(b) = p.wbuf.as_mut() {
                b.extend(to_peer);
            }
            if let Some(b) = c.raw_out.as_mut() {
                b.extend(to_client);
            }
        }
    }

    /// A pair just bound: relay what waited on either side.
    pub(super) fn start_pair(&mut self, id: ConnectionId, now: Instant) {
        self.pump_to_peer(id, now);
        self.pump_to_client(id, now);
    }

    /// Closes pair `id` (the core asked: it has forgotten the connection):
    /// the peer connection, and the data connection bound to it, whose
    /// output is flushed best-effort first.
    pub(super) fn close_pair(&mut self, id: ConnectionId) {
        let Some(pair) = self.pairs.remove(id) else {
            return;
        };
        if let Some(Source::Peer(_)) = self.io.sources.get(pair.peer) {
            if let Source::Peer(mut p) = self.io.sources.remove(pair.peer) {
                if p.interest.is_some() {
                    let _ = self.io.registry.deregister(&mut p.stream);
                }
            }
        }
        if let Stage::Bound { client, .. } = pair.stage {
            // The key names the data connection only while it is bound to
            // this pair (slab keys are reused).
            if let Some(Source::Conn(c)) = self.io.sources.get_mut(client) {
                if c.pair == Some(id) {
                    c.pair = None;
                    let _ = c.flush();
                    // The core closed the pair, so it has nothing more to
                    // be told about this connection.
                    self.remove_conn(client);
                }
            }
        }
    }

    /// Events on a peer connection: a connect completing, or relaying.
    pub(super) fn on_peer(&mut self, pkey: usize, readable: bool, writable: bool, now: Instant) {
        let Some(Source::Peer(p)) = self.io.sources.get_mut(pkey) else {
            return;
        };
        let id = p.id;
        if self.pairs.stage(id) == Some(Stage::Connecting) {
            if !writable && !readable {
                return;
            }
            let failed = p.stream.take_error().ok().flatten().is_some() || p.stream.peer_addr().is_err();
            if failed {
                self.pairs.remove(id);
                if let Source::Peer(mut p) = self.io.sources.remove(pkey) {
                    let _ = self.io.registry.deregister(&mut p.stream);
                }
                self.core.handle_peer_connected(now, id, false);
            } else {
                let _ = p.stream.set_nodelay(true);
                if let Some(pair) = self.pairs.by_id.get_mut(&id) {
                    pair.stage = Stage::Pending;
                }
                self.set_peer_interest(id);
                self.core.handle_peer_connected(now, id, true);
            }
            self.drive_core(now);
            return;
        }
        if writable {
            self.flush_to_peer(id, now);
        }
        if readable {
            self.pump_to_client(id, now);
        }
    }

    /// Events on a bound client data connection (RFC 6062 §5.4: raw bytes).
    pub(super) fn on_bound_conn(&mut self, id: ConnectionId, readable: bool, writable: bool, now: Instant) {
        if writable {
            self.client_drained(id, now);
        }
        if readable {
            self.pump_to_peer(id, now);
        }
    }

    /// Peer → client: read the peer into the client's output, flush.
    fn pump_to_client(&mut self, id: ConnectionId, now: Instant) {
        let rate = self.core.config().max_bps;
        let Some(pair) = self.pairs.by_id.get_mut(&id) else {
            return;
        };
        let Stage::Bound { client, control } = pair.stage else {
            return;
        };
        if pair.down.throttled {
            return;
        }
        let Some((Source::Peer(p), Source::Conn(c))) = two(&mut self.io.sources, pair.peer, client) else {
            return;
        };
        let mut cap = self.pairs.caps.get_mut(&control).filter(|_| rate > 0);
        // Until the peer has nothing more, or the client's output stays
        // full after a write (then its draining resumes this), or the cap
        // stops it (then a retry does).
        let ended = loop {
            let max = cap
                .as_mut()
                .map_or(usize::MAX, |c| c.down.available(now, rate, rate) as usize);
            let Ok((n, stop)) = c.relay_in(&mut p.stream, max) else {
                break true;
            };
            pair.down.bytes += n as u64;
            if let Some(c) = cap.as_mut() {
                c.down.spend(n as u64);
            }
            match stop {
                Stop::Throttled => {
                    pair.down.throttled = true;
                    self.pairs
                        .retries
                        .push(Reverse((now + THROTTLE_RETRY, id, Direction::Down)));
                    break false;
                }
                Stop::Ended => {
                    pair.down.ended = true;
                    break true;
                }
                Stop::WouldBlock => {
                    pair.down.paused = false;
                    break false;
                }
                Stop::Full if c.raw_pending() >= RAW_BUFFER / 2 => {
                    pair.down.paused = true;
                    break false;
                }
                Stop::Full => {}
            }
        };
        self.io.dirty.push(client);
        if ended {
            self.close_if_client_drained(id, client, now);
        }
        self.set_peer_interest(id);
    }

    /// Client → peer: read the client data connection into the peer's
    /// buffer, write it out.
    fn pump_to_peer(&mut self, id: ConnectionId, now: Instant) {
        let rate = self.core.config().max_bps;
        let Some(pair) = self.pairs.by_id.get_mut(&id) else {
            return;
        };
        let Stage::Bound { client, control } = pair.stage else {
            return;
        };
        if pair.up.throttled {
            return;
        }
        let Some((Source::Conn(c), Source::Peer(p))) = two(&mut self.io.sources, client, pair.peer) else {
            return;
        };
        let Some(wbuf) = p.wbuf.as_mut() else {
            return;
        };
        let mut cap = self.pairs.caps.get_mut(&control).filter(|_| rate > 0);
        // Bytes that came behind the ConnectionBind go first.
        if !c.rbuf.is_empty() {
            let n = wbuf.extend(&c.rbuf);
            pair.up.bytes += n as u64;
            c.rbuf.drain(..n);
        }
        // Until the client has nothing more, or the peer's buffer stays
        // full after a write (then its writability resumes this).
        loop {
            let max = cap
                .as_mut()
                .map_or(usize::MAX, |c| c.up.available(now, rate, rate) as usize);
            let stop = match c.relay_out(wbuf, max) {
                Ok((n, stop)) => {
                    pair.up.bytes += n as u64;
                    if let Some(c) = cap.as_mut() {
                        c.up.spend(n as u64);
                    }
                    stop
                }
                Err(_) => Stop::Ended,
            };
            if wbuf.write_to(&mut p.stream).is_err() {
                // The peer is gone: both go.
                self.core.handle_tcp_closed(now, id);
                self.drive_core(now);
                return;
            }
            match stop {
                Stop::Ended => {
                    pair.up.ended = true;
                    // The client closed: the peer gets what is buffered,
                    // then goes.
                    if wbuf.is_empty() {
                        self.core.handle_tcp_closed(now, id);
                        self.drive_core(now);
                        return;
                    }
                    break;
                }
                Stop::Throttled => {
                    pair.up.throttled = true;
                    self.pairs
                        .retries
                        .push(Reverse((now + THROTTLE_RETRY, id, Direction::Up)));
                    break;
                }
                Stop::WouldBlock => {
                    pair.up.paused = false;
                    break;
                }
                Stop::Full if wbuf.len() >= RAW_BUFFER / 2 => {
                    pair.up.paused = true;
                    break;
                }
                Stop::Full => {}
            }
        }
        self.set_peer_interest(id);
    }

    /// The peer's socket can take more: write, and resume the client.
    fn flush_to_peer(&mut self, id: ConnectionId, now: Instant) {
        let Some(pair) = self.pairs.by_id.get(&id) else {
            return;
        };
        let Some(Source::Peer(p)) = self.io.sources.get_mut(pair.peer) else {
            return;
        };
        let Some(wbuf) = p.wbuf.as_mut() else {
            return;
        };
        if wbuf.write_to(&mut p.stream).is_err() {
            self.core.handle_tcp_closed(now, id);
            self.drive_core(now);
            return;
        }
        if pair.up.ended && wbuf.is_empty() {
            self.core.handle_tcp_closed(now, id);
            self.drive_core(now);
            return;
        }
        if pair.up.paused && wbuf.len() < RAW_BUFFER / 2 {
            self.pump_to_peer(id, now);
        }
        self.set_peer_interest(id);
    }

    /// The client data connection drained some output: resume the peer,
    /// or finish a close the peer began.
    fn client_drained(&mut self, id: ConnectionId, now: Instant) {
        let Some(pair) = self.pairs.by_id.get_mut(&id) else {
            return;
        };
        let Stage::Bound { client, .. } = pair.stage else {
            return;
        };
        let Some(Source::Conn(c)) = self.io.sources.get(client) else {
            return;
        };
        if pair.down.ended {
            self.close_if_client_drained(id, client, now);
        } else if pair.down.paused && c.raw_pending() < RAW_BUFFER / 2 {
            pair.down.paused = false;
            self.pump_to_client(id, now);
        }
    }

    /// The peer closed: the pair goes once the client has what it sent.
    fn close_if_client_drained(&mut self, id: ConnectionId, client: usize, now: Instant) {
        let drained = match self.io.sources.get_mut(client) {
            Some(Source::Conn(c)) => c.flush().is_err() || c.raw_pending() == 0,
            _ => true,
        };
        if drained {
            self.core.handle_tcp_closed(now, id);
            self.drive_core(now);
        }
    }

    /// Capped directions whose wait is over are read again.
    pub(super) fn resume_held_pairs(&mut self, now: Instant) {
        while let Some(&Reverse((at, id, direction))) = self.pairs.retries.peek() {
            if at > now {
                return;
            }
            self.pairs.retries.pop();
            let Some(pair) = self.pairs.by_id.get_mut(&id) else {
                continue;
            };
            match direction {
                Direction::Up if pair.up.throttled => {
                    pair.up.throttled = false;
                    self.pump_to_peer(id, now);
                }
                Direction::Down if pair.down.throttled => {
                    pair.down.throttled = false;
                    self.pump_to_client(id, now);
                }
                _ => {}
            }
        }
    }

    /// Registers the peer socket for what its pair's state needs.
    pub(super) fn set_peer_interest(&mut self, id: ConnectionId) {
        let Some(pair) = self.pairs.by_id.get(&id) else {
            return;
        };
        let Some(Source::Peer(p)) = self.io.sources.get_mut(pair.peer) else {
            return;
        };
        let want = match pair.stage {
            Stage::Connecting => Some(Interest::WRITABLE),
            Stage::Pending => None,
            Stage::Bound { .. } => match (
                !pair.down.paused && !pair.down.ended,
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
        let registry = &self.io.registry;
        let token = Token(pair.peer);
        let r = match (p.interest, want) {
            (None, Some(w)) => registry.register(&mut p.stream, token, w),
            (Some(_), Some(w)) => registry.reregister(&mut p.stream, token, w),
            (Some(_), None) => registry.deregister(&mut p.stream),
            (None, None) => Ok(()),
        };
        if r.is_ok() {
            p.interest = want;
        }
    }
}

/// Two distinct sources at once (`None` for one key twice or a missing
/// key: a stale key must not panic).
fn two(sources: &mut slab::Slab<Source>, a: usize, b: usize) -> Option<(&mut Source, &mut Source)> {
    if a == b {
        return None;
    }
    sources.get2_mut(a, b)
}
