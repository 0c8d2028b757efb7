//! RFC 6062 TCP relays in the worker: the listening socket at a relayed
//! address, connects to peers from it, peer connections accepted on it,
//! and a ConnectionBind that reached the wrong worker passed to the one
//! that holds its peer. Once bound, a pair relays in `pairs.rs`; the core
//! holds the protocol state (`turn_core`'s `tcp_relay.rs`).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};

use rand::Rng;
use tracing::{debug, warn};
use turn_core::{ConnectionId, OpenedRelay, RelayError, RelayRequest};

use super::dispatch::{Io, Source};
use super::pairs::{PeerConn, Stage};
use super::worker::Worker;

/// TCP relay addresses in use in this process. A relay listener and the
/// sockets that connect from it share the address with SO_REUSEPORT,
/// which would also let a second allocation's listener join the first's:
/// this set keeps each address to one allocation, across workers.
pub(super) type TcpRelayAddrs = Arc<Mutex<HashSet<SocketAddr>>>;

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

    /// An RFC 6062 relay listener a binary upgrade handed over.
    pub(super) fn adopt_tcp_relay(
        &mut self,
        sock: std::net::TcpListener,
        addr: SocketAddr,
    ) -> io::Result<()> {
        sock.set_nonblocking(true)?;
        let mut sock = TcpListener::from_std(sock);
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        self.registry
            .register(&mut sock, Token(key), Interest::READABLE)?;
        entry.insert(Source::TcpRelay { sock, addr });
        self.relay_by_addr.insert(addr, key);
        self.tcp_relay_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr);
        Ok(())
    }

    pub(super) fn release_tcp_addr(&mut self, addr: SocketAddr) {
        self.tcp_relay_addrs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }

    /// RFC 6062 §5.2: a non-blocking connect from the relayed address;
    /// the peer connection's key, or `None` when it failed before it
    /// began (the caller completes it).
    #[must_use]
    pub(super) fn start_connect(
        &mut self,
        id: ConnectionId,
        relay: SocketAddr,
        peer: SocketAddr,
    ) -> Option<usize> {
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
                return None;
            }
        };
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        let interest = Interest::WRITABLE;
        if self.registry.register(&mut stream, Token(key), interest).is_err() {
            return None;
        }
        entry.insert(Source::Peer(Box::new(PeerConn {
            id,
            stream,
            wbuf: None,
            interest: Some(interest),
        })));
        Some(key)
    }

    pub(super) fn close_tcp_relay(&mut self, key: usize, addr: SocketAddr) {
        if let Source::TcpRelay { mut sock, .. } = self.sources.remove(key) {
            let _ = self.registry.deregister(&mut sock);
        }
        self.release_tcp_addr(addr);
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
            let key = self.io.sources.insert(Source::Peer(Box::new(PeerConn {
                id,
                stream,
                wbuf: None,
                interest: None,
            })));
            self.pairs.add(id, key, Stage::Pending);
            self.drive_core(now);
        }
    }
}

impl Worker {
    /// The worker a ConnectionBind in `msg` belongs to, when it is not
    /// this one: the kernel spreads a client's connections over workers,
    /// and the peer connection lives where its allocation does.
    pub(super) fn handoff_target(&self, msg: &[u8]) -> Option<usize> {
        if self.streams.handoff_to.len() < 2 {
            return None;
        }
        let id = turn_core::connection_bind_id(msg)?;
        let owner = turn_core::connection_id_tag(id) as usize;
        (owner != self.id && owner < self.streams.handoff_to.len()).then_some(owner)
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
            self.streams.pending -= 1;
        }
        c.rbuf = rbuf;
        c.writable_registered = false;
        let ip = c.tuple.client.ip();
        let (tx, waker) = &self.streams.handoff_to[owner];
        match tx.send(c) {
            Ok(()) => {
                let _ = waker.wake();
            }
            // The owner is gone (shutdown): the connection closes here.
            Err(_) => self.streams.connections.release(ip),
        }
    }

    /// Data connections other workers passed here: registered, and their
    /// ConnectionBind processed.
    pub(super) fn adopt_handoffs(&mut self, now: Instant) {
        while let Ok(mut c) = self.streams.handoff.try_recv() {
            let entry = self.io.sources.vacant_entry();
            let key = entry.key();
            if self
                .io
                .registry
                .register(&mut c.stream, Token(key), Interest::READABLE)
                .is_err()
            {
                self.streams.connections.release(c.tuple.client.ip());
                continue;
            }
            if !c.got_message {
                self.streams.pending += 1;
            }
            self.io.conn_by_tuple.insert(c.tuple, key);
            entry.insert(Source::Conn(c));
            self.on_conn(key, true, false, now);
        }
    }
}
