//! A worker's side of a binary upgrade (`crate::upgrade`): the old
//! process's worker gives its part (snapshot, socket descriptors, plain TCP
//! connections with their buffered bytes) and waits, then lets the moved
//! go or serves on; the new process's worker takes the relay sockets and
//! connections and restores the snapshot before its loop starts.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use mio::{Interest, Token};
use tracing::warn;
use turn_core::snapshot::{Restored, Snapshot, SnapshotError};
use turn_core::{FiveTuple, ListenerId, Transport};

use super::control::{Decision, HandoverAsk};
use super::dispatch::Source;
use super::pairs::PeerConn;
use super::pairs::Stage;
use super::stream::{Conn, Proxy};
use super::worker::Worker;
use crate::upgrade::{ConnState, PeerState, WorkerPart, STEP_TIMEOUT};
use turn_core::ConnectionId;

/// A copy of a socket's descriptor for the new process (the socket stays
/// open here until the decision).
fn copy(fd: std::os::fd::BorrowedFd<'_>) -> Option<OwnedFd> {
    match fd.try_clone_to_owned() {
        Ok(fd) => Some(fd),
        Err(e) => {
            warn!(error = %e, "upgrade: cannot copy a socket for the new process");
            None
        }
    }
}

/// What a new process's worker takes over besides its listeners.
pub(super) struct TakenOver {
    /// UDP relay sockets of the snapshot's allocations, with their
    /// addresses.
    pub(super) relays: Vec<(std::net::UdpSocket, SocketAddr)>,
    /// RFC 6062 relay listeners, with their addresses.
    pub(super) tcp_relays: Vec<(std::net::TcpListener, SocketAddr)>,
    /// Plain TCP client connections, control and data.
    pub(super) conns: Vec<(std::net::TcpStream, ConnState)>,
    /// RFC 6062 peer data connections.
    pub(super) peers: Vec<(std::net::TcpStream, PeerState)>,
    /// The old process's TCP listener ids: id, address, TLS.
    pub(super) old_tcp_listeners: Vec<(u32, SocketAddr, bool)>,
    pub(super) snapshot: Snapshot,
    /// Bytes the old worker's closed RFC 6062 pairs moved.
    pub(super) tcp_closed_bytes: [u64; 2],
    /// The old process's listener ids, by address.
    pub(super) old_listeners: Vec<(u32, SocketAddr)>,
    /// Session events' state of the moved allocations.
    pub(super) records: Vec<crate::events::MovedRecord>,
}

impl Worker {
    /// Old side: sends this worker's part, reads nothing until the
    /// decision, then lets the moved allocations and sockets go (`true`)
    /// or serves on as before.
    pub(super) fn hand_over(&mut self, now: Instant, ask: HandoverAsk) {
        let Some((part, fds, conns)) = self.part(now) else {
            // (Dropping `ask` tells the node this worker could not.)
            return;
        };
        let snapshot = part.snapshot.clone();
        if ask.reply.send((part, fds)).is_err() {
            return;
        }
        if let Ok(Decision::LetGo(trailing)) = ask.decision.recv_timeout(STEP_TIMEOUT * 2) {
            // The new process's program runs on the links now: this
            // one's counts are final.
            let _ = trailing.send(self.fast.since_last_read());
            self.let_go(now, &snapshot, &conns);
        }
    }

    /// This worker's snapshot, its sockets' descriptors (copies: the
    /// sockets stay open here until the decision), and the keys of the
    /// connections that move.
    fn part(&mut self, now: Instant) -> Option<(WorkerPart, Vec<OwnedFd>, Vec<usize>)> {
        // DTLS sessions stay here: each keeps receiving on a socket of
        // its own once the new process joins the port.
        self.dtls_set_aside();
        // What the kernel relayed so far goes into the snapshot's stats.
        self.fast_counts(now, true);
        let mut snapshot = self.core.snapshot(now);
        // An RFC 6062 allocation moves when every pair of it can.
        snapshot
            .allocations
            .retain(|a| a.tcp_conns.iter().all(|t| self.pair_movable(t.id)));
        let mut part = WorkerPart {
            udp: Vec::new(),
            tcp: Vec::new(),
            relays: Vec::new(),
            tcp_relays: Vec::new(),
            conns: Vec::new(),
            peers: Vec::new(),
            stayed: self
                .core
                .allocation_count()
                .saturating_sub(snapshot.allocations.len()),
            tcp_closed_bytes: self.pairs.closed_bytes(),
            records: self.records_to_hand_over(),
            snapshot,
        };
        let mut fds = Vec::new();
        for (key, src) in self.io.sources.iter() {
            if let Source::Udp { sock, addr } = src {
                fds.push(copy(sock.as_fd())?);
                part.udp.push((key as u32, *addr));
            }
        }
        for (key, src) in self.io.sources.iter() {
            if let Source::Listener { sock, addr, tls } = src {
                fds.push(copy(sock.as_fd())?);
                part.tcp.push((key as u32, *addr, *tls));
            }
        }
        for tcp in [false, true] {
            for a in part.snapshot.allocations.iter().filter(|a| a.tcp == tcp) {
                for r in &a.relays {
                    let key = self.io.relay_by_addr.get(&r.bound)?;
                    match self.io.sources.get(*key)? {
                        Source::Relay { sock, .. } if !tcp => {
                            fds.push(copy(sock.as_fd())?);
                            part.relays.push(r.bound);
                        }
                        Source::TcpRelay { sock, .. } if tcp => {
                            fds.push(copy(sock.as_fd())?);
                            part.tcp_relays.push(r.bound);
                        }
                        _ => return None,
                    }
                }
            }
        }
        let moved_conns = self.part_conns(&mut part, &mut fds)?;
        let moved_pairs: Vec<ConnectionId> = part
            .snapshot
            .allocations
            .iter()
            .flat_map(|a| a.tcp_conns.iter().map(|t| t.id))
            .collect();
        for id in moved_pairs {
            let (key, _, bytes) = self.pairs.movable(id)?;
            let Some(Source::Peer(p)) = self.io.sources.get(key) else {
                return None;
            };
            fds.push(copy(p.stream.as_fd())?);
            part.peers.push(PeerState {
                id,
                to_peer: p.wbuf.as_ref().map(|b| b.pending().to_vec()).unwrap_or_default(),
                bytes,
            });
        }
        Some((part, fds, moved_conns))
    }

    /// Whether RFC 6062 pair `id` can move: pending, or bound to a plain
    /// TCP data connection with both directions open.
    fn pair_movable(&self, id: ConnectionId) -> bool {
        match self.pairs.movable(id) {
            Some((_, Stage::Bound { client, .. }, _)) => matches!(
                self.io.sources.get(client),
                Some(Source::Conn(c)) if c.tls.is_none() && matches!(c.proxy, Proxy::Settled)
            ),
            Some(_) => true,
            None => false,
        }
    }

    /// The plain TCP connections that move, into `part` and `fds`; their
    /// keys.
    fn part_conns(&self, part: &mut WorkerPart, fds: &mut Vec<OwnedFd>) -> Option<Vec<usize>> {
        // Plain TCP connections move with their allocations (or without
        // one), RFC 6062 data connections with their pairs; a TLS
        // connection, one whose PROXY header or first bytes are still
        // awaited, and one holding an allocation that stays, stay here.
        let moved: HashSet<FiveTuple> = part
            .snapshot
            .allocations
            .iter()
            .map(|a| FiveTuple {
                transport: a.transport,
                client: a.client,
                server: a.server,
                listener: a.listener,
            })
            .collect();
        let moved_pairs: HashSet<ConnectionId> = part
            .snapshot
            .allocations
            .iter()
            .flat_map(|a| a.tcp_conns.iter().map(|t| t.id))
            .collect();
        let mut keys = Vec::new();
        for (key, src) in self.io.sources.iter() {
            let Source::Conn(c) = src else { continue };
            let plain = c.tls.is_none() && matches!(c.proxy, Proxy::Settled);
            let goes = match c.pair {
                Some(id) => moved_pairs.contains(&id),
                None => !self.core.has_allocation(&c.tuple) || moved.contains(&c.tuple),
            };
            if !plain || !goes {
                continue;
            }
            fds.push(copy(c.stream.as_fd())?);
            part.conns.push(ConnState {
                client: c.tuple.client,
                server: c.tuple.server,
                listener: c.tuple.listener.0,
                rbuf: c.rbuf.clone(),
                wbuf: c.wbuf.clone(),
                got_message: c.got_message,
                pair: c.pair,
                raw_out: c
                    .raw_out
                    .as_ref()
                    .map(|b| b.pending().to_vec())
                    .unwrap_or_default(),
            });
            keys.push(key);
        }
        Some(keys)
    }

    /// The new process serves the moved allocations and every listener:
    /// they leave here (the core closes this process's copies of their
    /// relay sockets), and the listeners close. What stays is the TCP and
    /// TLS connections and their allocations.
    fn let_go(&mut self, now: Instant, snapshot: &Snapshot, conns: &[usize]) {
        self.core.hand_over(snapshot);
        self.drive_core(now);
        self.dtls_retire_listeners();
        // Without telling the core: their allocations left with the rest.
        for &key in conns {
            self.remove_conn(key);
        }
        for id in snapshot
            .allocations
            .iter()
            .flat_map(|a| a.tcp_conns.iter().map(|t| t.id))
        {
            if let Some(key) = self.pairs.forget(id) {
                if let Source::Peer(mut p) = self.io.sources.remove(key) {
                    if p.interest.is_some() {
                        let _ = self.io.registry.deregister(&mut p.stream);
                    }
                }
            }
        }
        let listeners: Vec<usize> = self
            .io
            .sources
            .iter()
            .filter(|(_, s)| matches!(s, Source::Udp { .. } | Source::Listener { .. }))
            .map(|(k, _)| k)
            .collect();
        for key in listeners {
            match self.io.sources.remove(key) {
                Source::Udp { mut sock, .. } => {
                    let _ = self.io.registry.deregister(&mut sock);
                    self.io.queue.close(sock);
                }
                Source::Listener { mut sock, .. } => {
                    let _ = self.io.registry.deregister(&mut sock);
                }
                _ => {}
            }
        }
        self.io.udp_by_addr.clear();
    }

    /// New side, before the loop starts: the relay sockets join this
    /// worker and the snapshot's allocations are served from them. A
    /// snapshot the core refuses (another format) is an error: the new
    /// process then refuses the hand-over, and the old one serves on.
    pub(super) fn take_over(&mut self, now: Instant, t: TakenOver) -> Result<Restored, SnapshotError> {
        for (sock, addr) in t.relays {
            if self.io.activate(sock, addr, false).is_err() {
                warn!(%addr, "upgrade: a handed-over relay socket could not be registered");
            }
        }
        for (sock, addr) in t.tcp_relays {
            if self.io.adopt_tcp_relay(sock, addr).is_err() {
                warn!(%addr, "upgrade: a handed-over TCP relay listener could not be registered");
            }
        }
        // Listener ids are slab keys: an old id is mapped by address.
        let mut ids: HashMap<u32, u32> = HashMap::new();
        for (old, addr) in &t.old_listeners {
            if let Some((_, k)) = self.io.udp_by_addr.iter().find(|(a, _)| a == addr) {
                ids.insert(*old, *k as u32);
            }
        }
        for (old, addr, tls) in &t.old_tcp_listeners {
            let found = self.io.sources.iter().find(
                |(_, s)| matches!(s, Source::Listener { addr: a, tls: t, .. } if a == addr && t == tls),
            );
            if let Some((k, _)) = found {
                ids.insert(*old, k as u32);
            }
        }
        let map = |old: ListenerId| ids.get(&old.0).copied().map(ListenerId);
        let mut raw_out = HashMap::new();
        for (stream, mut state) in t.conns {
            if let Some(id) = state.pair {
                raw_out.insert(id, std::mem::take(&mut state.raw_out));
            }
            self.adopt_conn(now, stream, state, &map);
        }
        let restored = self.core.restore(now, &t.snapshot, &map)?;
        self.adopt_records(now, t.records, &t.snapshot, &restored.lost);
        self.pairs.add_closed_bytes(t.tcp_closed_bytes);
        self.adopt_pairs(now, &t.snapshot, t.peers, raw_out, &map);
        self.drive_core(now);
        Ok(restored)
    }

    /// RFC 6062 pairs taken over: each peer socket joins this worker,
    /// pending or bound again to its data connection with the bytes
    /// either side had not yet written, and relaying resumes.
    fn adopt_pairs(
        &mut self,
        now: Instant,
        snapshot: &Snapshot,
        peers: Vec<(std::net::TcpStream, PeerState)>,
        mut raw_out: HashMap<ConnectionId, Vec<u8>>,
        map: &dyn Fn(ListenerId) -> Option<ListenerId>,
    ) {
        let mut bound = HashMap::new();
        for a in snapshot.allocations.iter().filter(|a| a.tcp) {
            let Some(listener) = map(a.listener) else { continue };
            let control = FiveTuple {
                transport: a.transport,
                client: a.client,
                server: a.server,
                listener,
            };
            for t in &a.tcp_conns {
                if let Some((client, server, l)) = t.bound_to {
                    if let Some(listener) = map(l) {
                        let data = FiveTuple {
                            transport: Transport::Tcp,
                            client,
                            server,
                            listener,
                        };
                        bound.insert(t.id, (data, control));
                    }
                }
            }
        }
        for (stream, p) in peers {
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let key = self.io.sources.insert(Source::Peer(Box::new(PeerConn {
                id: p.id,
                stream: mio::net::TcpStream::from_std(stream),
                wbuf: None,
                interest: None,
            })));
            self.pairs.add(p.id, key, Stage::Pending);
            self.pairs.set_bytes(p.id, p.bytes);
            let Some(&(data, control)) = bound.get(&p.id) else {
                continue;
            };
            self.bind_pair(p.id, data, control);
            self.refill_pair(p.id, &p.to_peer, &raw_out.remove(&p.id).unwrap_or_default());
            self.start_pair(p.id, now);
        }
    }

    /// A plain TCP connection the old process had: served here with what
    /// it had read and not handled, and what it had not yet written.
    fn adopt_conn(
        &mut self,
        now: Instant,
        stream: std::net::TcpStream,
        s: ConnState,
        map: &dyn Fn(ListenerId) -> Option<ListenerId>,
    ) {
        let Some(listener) = map(ListenerId(s.listener)) else {
            return;
        };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        let tuple = FiveTuple {
            transport: Transport::Tcp,
            client: s.client,
            server: s.server,
            listener,
        };
        let mut conn = Box::new(Conn {
            stream: mio::net::TcpStream::from_std(stream),
            tuple,
            tls: None,
            partial_since: (!s.rbuf.is_empty()).then_some(now),
            rbuf: s.rbuf,
            wbuf: s.wbuf,
            writable_registered: false,
            accepted: now,
            last_rx: now,
            got_message: s.got_message,
            handshake_done: false,
            pair: None,
            raw_out: None,
            proxy: Proxy::Settled,
            counted: true,
        });
        let entry = self.io.sources.vacant_entry();
        let key = entry.key();
        if self
            .io
            .registry
            .register(&mut conn.stream, Token(key), Interest::READABLE)
            .is_err()
        {
            return;
        }
        // Counted under its source as an accepted one is (no cap: it exists).
        self.streams.connections.try_acquire(tuple.client.ip(), 0);
        if !conn.got_message {
            self.streams.pending += 1;
        }
        if !conn.wbuf.is_empty() {
            self.io.dirty.push(key);
        }
        entry.insert(Source::Conn(conn));
        self.io.conn_by_tuple.insert(tuple, key);
    }
}
