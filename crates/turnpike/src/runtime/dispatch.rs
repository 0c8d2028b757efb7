//! Where a worker's sockets live (`Io`, a slab of sources) and how the
//! core's transmits reach them: UDP through the send queue from the
//! address the client reached, TCP/TLS into the connection's buffer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use mio::net::{TcpListener, UdpSocket};
use mio::Registry;
use rand::rngs::SmallRng;
use slab::Slab;
use turn_core::{Dest, FiveTuple, Transmit, Transport};

use super::relays::{RelayConfig, Reservations};
use super::stream::Conn;

pub(super) enum Source {
    Udp {
        sock: UdpSocket,
        addr: SocketAddr,
    },
    /// A DTLS listener (RFC 7350): its associations are in `Io::dtls`.
    Dtls {
        sock: UdpSocket,
        addr: SocketAddr,
    },
    /// A DTLS listener closed at a binary upgrade (the new process serves
    /// its port): its key stays taken, since its front and its
    /// associations' tuples name it, while they are served through
    /// `DtlsAside` sockets.
    DtlsRetired,
    /// One DTLS association's own socket, bound to the listener's port
    /// and connected to the client: the kernel delivers that client's
    /// datagrams here, not to any socket of the port's SO_REUSEPORT group
    /// (which a binary upgrade's new process joins), so its session,
    /// whose keys stay in this process, keeps working.
    DtlsAside {
        sock: UdpSocket,
        /// The listener's key (its front).
        listener: usize,
        /// The server address the client reached.
        local: SocketAddr,
    },
    Listener {
        sock: TcpListener,
        addr: SocketAddr,
        tls: bool,
    },
    Conn(Box<Conn>),
    Relay {
        sock: UdpSocket,
        addr: SocketAddr,
    },
    /// RFC 6062: a TCP relay's listening socket.
    TcpRelay {
        sock: TcpListener,
        addr: SocketAddr,
    },
    /// RFC 6062: a peer data connection.
    Peer(Box<super::pairs::PeerConn>),
}

/// Everything a worker owns except the protocol core: the sockets and
/// what the core's commands (`Worker::drive_core`) act on.
pub(super) struct Io {
    pub(super) registry: Registry,
    pub(super) sources: Slab<Source>,
    pub(super) udp_by_addr: Vec<(SocketAddr, usize)>,
    pub(super) relay_by_addr: HashMap<SocketAddr, usize, ahash::RandomState>,
    pub(super) conn_by_tuple: HashMap<FiveTuple, usize, ahash::RandomState>,
    pub(super) relay: RelayConfig,
    pub(super) rng: SmallRng,
    pub(super) reservations: Arc<Mutex<Reservations>>,
    /// Connections whose write interest must be updated after a send.
    pub(super) dirty: Vec<usize>,
    /// UDP datagrams to send at the end of this loop iteration.
    pub(super) queue: udp_io::SendQueue,
    pub(super) tcp_relay_addrs: super::tcp_relay::TcpRelayAddrs,
    /// The DTLS listeners' associations.
    pub(super) dtls: super::dtls::DtlsPlane,
}

impl Io {
    /// Sends the bytes a core call appended to the send queue from `start`
    /// to the client of `dest`: queued for a UDP client, written to the
    /// connection of a TCP/TLS one.
    pub(super) fn forward_appended(&mut self, dest: Dest, start: usize) {
        match dest {
            Dest::Client(t) if t.transport == Transport::Udp => match self.sources.get(t.listener.0 as usize)
            {
                Some(Source::Udp { sock, addr }) => {
                    let src = addr.ip().is_unspecified().then_some(t.server.ip());
                    self.queue.commit(sock, src, t.client, start)
                }
                _ => self.queue.truncate(start),
            },
            Dest::Client(t) if t.transport == Transport::Dtls => {
                // The payload was written in the clear into the queue:
                // taken out, encrypted, and queued as records.
                let plain = self.queue.written(start).to_vec();
                self.queue.truncate(start);
                self.send_dtls(t, &plain);
            }
            Dest::Client(t) => {
                if let Some(&key) = self.conn_by_tuple.get(&t) {
                    if let Some(Source::Conn(c)) = self.sources.get_mut(key) {
                        // A failed queueing (TLS) is noticed at flush.
                        let _ = c.send(self.queue.written(start));
                        self.dirty.push(key);
                    }
                }
                self.queue.truncate(start);
            }
            // handle_peer only ever answers toward the client.
            _ => self.queue.truncate(start),
        }
    }

    pub(super) fn transmit(&mut self, tx: Transmit<'_>) {
        self.send(tx.dest, tx.data);
    }

    /// Sends `data` to `dest` (queued for UDP, buffered for a connection).
    pub(super) fn send(&mut self, dest: Dest, data: &[u8]) {
        let tx = Transmit { dest, data };
        match tx.dest {
            Dest::Peer { relay, peer } => {
                if let Some(&key) = self.relay_by_addr.get(&relay) {
                    if let Some(Source::Relay { sock, .. }) = self.sources.get(key) {
                        self.queue.push(sock, None, peer, tx.data);
                    }
                }
            }
            Dest::Via { local, to } => {
                if let Some(&(_, key)) = self.udp_by_addr.iter().find(|(a, _)| *a == local) {
                    if let Some(Source::Udp { sock, .. }) = self.sources.get(key) {
                        let _ = sock.send_to(tx.data, to);
                    }
                }
            }
            Dest::Client(t) => match t.transport {
                Transport::Udp => {
                    // From the address the client reached: on a wildcard
                    // socket the kernel would pick one by route.
                    if let Some(Source::Udp { sock, addr }) = self.sources.get(t.listener.0 as usize) {
                        let src = addr.ip().is_unspecified().then_some(t.server.ip());
                        self.queue.push(sock, src, t.client, tx.data);
                    }
                }
                Transport::Dtls => self.send_dtls(t, tx.data),
                _ => {
                    if let Some(&key) = self.conn_by_tuple.get(&t) {
                        if let Some(Source::Conn(c)) = self.sources.get_mut(key) {
                            // A failed queueing (TLS) is noticed at flush.
                            let _ = c.send(tx.data);
                            self.dirty.push(key);
                        }
                    }
                }
            },
            _ => {}
        }
    }
}
