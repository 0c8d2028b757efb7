//! RFC 6062 TCP relay allocations: Connect (§5.2), a peer connecting to
//! the relayed address (§5.3, ConnectionAttempt), ConnectionBind (§5.4)
//! and the lifetimes of data connections (§5.5).
//!
//! The core keeps the state of each peer data connection, named by a
//! CONNECTION-ID; the runtime owns the sockets. The core asks for a
//! connect with [`Command::ConnectPeer`] and hears back through
//! [`Server::handle_peer_connected`]; it is told of a peer that connected
//! with [`Server::handle_peer_connection`]; after a ConnectionBind it
//! hands the pair to the runtime with [`Command::BindConnection`], which
//! relays bytes from then on without the core; either side closing comes
//! back as [`Server::handle_tcp_closed`].

use super::events::RefusalDetail;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};

use super::auth_check::Authenticated;
use super::error::ErrorCode;
use super::events::Event;
use super::io::{Command, ConnectionId, Dest, FiveTuple, QueuedTransmit};
use super::respond::{Reply, ReqInfo, Signer};
use super::table::{family, Families, FastMap};
use super::Server;

/// RFC 6062 §5.2/§5.3: a connect times out, and a peer data connection
/// not bound by a ConnectionBind is closed, after 30 seconds.
pub const TCP_CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) enum TcpState {
    /// The runtime is connecting; the Connect is answered when it is done.
    Connecting { req: ReqInfo, signer: Signer },
    /// Connected (Connect) or accepted (§5.3); waiting for ConnectionBind.
    Pending,
    /// Bound to a client data connection: the runtime relays the bytes.
    Bound { data: FiveTuple },
}

#[derive(Debug)]
pub(super) struct TcpConn {
    /// The allocation's control connection (its key in the table).
    pub(super) control: FiveTuple,
    pub(super) peer: SocketAddr,
    pub(super) state: TcpState,
    /// When a Connecting or Pending connection gives up.
    pub(super) deadline: Instant,
}

/// Every peer data connection of this worker's TCP allocations.
#[derive(Debug, Default)]
pub(super) struct TcpRelays {
    pub(super) conns: FastMap<ConnectionId, TcpConn>,
    /// Lazy min-heap of (deadline, id): entries may be stale.
    timers: BinaryHeap<Reverse<(Instant, ConnectionId)>>,
}

impl TcpRelays {
    /// Connection `id` gives up at `deadline` unless bound (checked then).
    pub(super) fn push_timer(&mut self, deadline: Instant, id: ConnectionId) {
        self.timers.push(Reverse((deadline, id)));
    }
}

/// The CONNECTION-ID a ConnectionBind request in `data` names, if `data`
/// is one: lets a runtime with several workers pass a new data
/// connection to the worker that owns the connection (its tag is
/// [`connection_id_tag`]) before any of them answers it.
pub fn connection_bind_id(data: &[u8]) -> Option<ConnectionId> {
    // The type first, one comparison, so every other message costs nothing
    // more (the runtime asks this of each first message on a connection).
    let typ = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
    if typ != MessageType::new(method::CONNECTION_BIND, Class::Request).to_wire() {
        return None;
    }
    let m = Message::parse(data).ok()?;
    let t = m.message_type();
    if t.method != method::CONNECTION_BIND || t.class != Class::Request {
        return None;
    }
    m.get_u32(attr::CONNECTION_ID)
}

/// The worker tag (`Config::connection_id_tag`) a CONNECTION-ID carries.
pub fn connection_id_tag(id: ConnectionId) -> u8 {
    (id >> 24) as u8
}

impl Server {
    fn new_connection_id(&mut self) -> ConnectionId {
        loop {
            // Unpredictable, so an id seen once cannot be guessed for the
            // next connection; the top byte names this worker.
            let id = (self.cfg.connection_id_tag as u32) << 24 | rand_u24(&mut self.tcp_seq);
            if !self.tcp.conns.contains_key(&id) {
                return id;
            }
        }
    }

    /// The next instant a TCP connection times out, if any.
    pub(super) fn tcp_timeout(&self) -> Option<Instant> {
        self.tcp.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Live peer data connections of this worker: pending or bound.
    pub fn tcp_connection_count(&self) -> usize {
        self.tcp.conns.len()
    }

    /// RFC 6062 §5.2 Connect, on the control connection of a TCP
    /// allocation.
    pub(super) fn connect(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
        existing: Option<u32>,
    ) -> Reply {
        use ErrorCode::*;
        let Some(idx) = existing else {
            return Reply::Error(AllocationMismatch);
        };
        let Some(a) = self.table.get_live(idx, now) else {
            return Reply::Error(AllocationMismatch);
        };
        if !a.tcp {
            return Reply::Error(BadRequest);
        }
        let families = Families::of(a);
        let username = a.username.clone();
        let count = a.tcp_conns;
        let Some(Ok(peer)) = msg.get_xor_addr(attr::XOR_PEER_ADDRESS) else {
            return Reply::Error(BadRequest);
        };
        if let Err(code) = self.check_peer(tuple, families, &username, peer) {
            return Reply::Error(code);
        }
        // §5.2: one connection per peer address, connecting, pending or
        // active.
        if self
            .tcp
            .conns
            .values()
            .any(|c| c.control == tuple && c.peer == peer)
        {
            return Reply::Error(ConnectionAlreadyExists);
        }
        if count as usize >= self.cfg.max_tcp_connections {
            self.counters.tcp_refused_limit += 1;
            return Reply::Error(InsufficientCapacity);
        }
        let Some(relay) = self
            .table
            .get(idx)
            .and_then(|a| a.relays[family(peer)].map(|r| r.bound))
        else {
            return Reply::Error(PeerAddressFamilyMismatch);
        };
        let id = self.new_connection_id();
        let deadline = now + self.cfg.tcp_connect_timeout;
        self.tcp.conns.insert(
            id,
            TcpConn {
                control: tuple,
                peer,
                state: TcpState::Connecting {
                    req: ReqInfo::of(msg),
                    signer: Some((auth.key, auth.sha256)),
                },
                deadline,
            },
        );
        self.tcp.timers.push(Reverse((deadline, id)));
        if let Some(a) = self.table.get_mut(idx) {
            a.tcp_conns += 1;
        }
        self.counters.tcp_connects += 1;
        self.commands.push_back(Command::ConnectPeer { id, relay, peer });
        Reply::Deferred
    }

    /// The completion of [`Command::ConnectPeer`]: the Connect is answered
    /// with CONNECTION-ID, or 447 when the connection failed (drain with
    /// [`Server::poll_transmit`]). A failed connection is forgotten; the
    /// runtime has closed its socket.
    pub fn handle_peer_connected(&mut self, now: Instant, id: ConnectionId, connected: bool) {
        let Some(c) = self.tcp.conns.get_mut(&id) else {
            // Timed out (answered 447) or deleted meanwhile: not wanted.
            if connected {
                self.commands.push_back(Command::CloseConnection { id });
            }
            return;
        };
        let TcpState::Connecting { req, signer } = std::mem::replace(&mut c.state, TcpState::Pending) else {
            return;
        };
        let control = c.control;
        let reply = if connected {
            c.deadline = now + TCP_CONNECTION_TIMEOUT;
            self.tcp.timers.push(Reverse((c.deadline, id)));
            Reply::Connected(id)
        } else {
            self.counters.tcp_connect_failed += 1;
            self.forget_tcp(id);
            self.note_tcp_refusal(control, ErrorCode::ConnectionTimeoutOrFailure);
            Reply::Error(ErrorCode::ConnectionTimeoutOrFailure)
        };
        self.queue_answer(now, control, req, reply, signer);
    }

    fn queue_answer(&mut self, now: Instant, tuple: FiveTuple, req: ReqInfo, reply: Reply, signer: Signer) {
        let t = self.respond(now, tuple, req, reply, signer);
        let q = QueuedTransmit {
            dest: t.dest,
            data: t.data.to_vec(),
        };
        self.transmits.push_back(q);
    }

    fn note_tcp_refusal(&mut self, tuple: FiveTuple, code: ErrorCode) {
        self.events.push_back(Event::RequestRefused {
            tuple,
            method: method::CONNECT,
            code,
            detail: None,
            username: None,
        });
    }

    /// RFC 6062 §5.3: a peer connected to the relayed address `relay`.
    /// `Some(id)`: keep the connection under `id` (a ConnectionAttempt went
    /// to the client, see [`Server::poll_transmit`]); `None`: close it at
    /// once (no such allocation, no permission for the peer, or the
    /// allocation's connection limit).
    pub fn handle_peer_connection(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
    ) -> Option<ConnectionId> {
        let peer = SocketAddr::new(crate::policy::canonicalize(peer.ip()), peer.port());
        let idx = *self.table.by_relay.get(&relay)?;
        let max = self.cfg.max_tcp_connections;
        let a = self.table.get_live(idx, now)?;
        if !a.tcp {
            return None;
        }
        if !a.has_permission(peer.ip(), now) {
            self.counters.tcp_peer_refused += 1;
            return None;
        }
        if a.tcp_conns as usize >= max {
            self.counters.tcp_refused_limit += 1;
            return None;
        }
        a.tcp_conns += 1;
        let control = a.tuple;
        let id = self.new_connection_id();
        let deadline = now + TCP_CONNECTION_TIMEOUT;
        self.tcp.conns.insert(
            id,
            TcpConn {
                control,
                peer,
                state: TcpState::Pending,
                deadline,
            },
        );
        self.tcp.timers.push(Reverse((deadline, id)));
        self.counters.tcp_peer_accepted += 1;
        // §4.5: ConnectionAttempt, an indication on the control connection.
        self.data_seq = self.data_seq.wrapping_add(1);
        let txid = super::relay::data_indication_txid(self.data_seq);
        self.out.clear();
        let mut b = MessageBuilder::new(
            &mut self.out,
            MessageType::new(method::CONNECTION_ATTEMPT, Class::Indication),
            &txid,
        );
        b.u32(attr::CONNECTION_ID, id)
            .xor_addr(attr::XOR_PEER_ADDRESS, peer);
        self.transmits.push_back(QueuedTransmit {
            dest: Dest::Client(control),
            data: self.out.clone(),
        });
        Some(id)
    }

    /// RFC 6062 §5.4 ConnectionBind, on a new (data) connection.
    pub(super) fn connection_bind(
        &mut self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
        existing: Option<u32>,
    ) -> Reply {
        // Not over UDP, and never on a control connection.
        if !tuple.transport.is_stream() || existing.is_some() {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::Rule("ConnectionBind goes on a new TCP or TLS connection (RFC 6062 §5.4)"),
            );
        }
        if self
            .tcp
            .conns
            .values()
            .any(|c| matches!(c.state, TcpState::Bound { data } if data == tuple))
        {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::Rule("this connection is already bound (RFC 6062 §5.4)"),
            );
        }
        let Some(id) = msg.get_u32(attr::CONNECTION_ID) else {
            return self.refuse(ErrorCode::BadRequest, RefusalDetail::Missing("CONNECTION-ID"));
        };
        let Some(c) = self.tcp.conns.get(&id) else {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::Rule("unknown or expired CONNECTION-ID (RFC 6062 §5.4)"),
            );
        };
        if !matches!(c.state, TcpState::Pending) {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::Rule("CONNECTION-ID already bound (RFC 6062 §5.4)"),
            );
        }
        // The data connection belongs to whoever holds the allocation.
        let owner = self
            .table
            .by_tuple
            .get(&c.control)
            .and_then(|&i| self.table.get(i))
            .map(|a| a.username.clone());
        if owner.as_deref() != Some(auth.username.as_str()) {
            return Reply::Error(ErrorCode::WrongCredentials);
        }
        let mut control = tuple;
        if let Some(c) = self.tcp.conns.get_mut(&id) {
            c.state = TcpState::Bound { data: tuple };
            control = c.control;
        }
        self.counters.tcp_bound += 1;
        // After the success answer (which the runtime sends first), the
        // connection carries raw bytes.
        self.commands.push_back(Command::BindConnection {
            id,
            data: tuple,
            control,
        });
        Reply::Ok
    }

    /// The peer data connections of the allocation on `control`.
    pub(super) fn tcp_info(&self, control: FiveTuple) -> Vec<super::TcpConnectionInfo> {
        let mut v: Vec<super::TcpConnectionInfo> = self
            .tcp
            .conns
            .iter()
            .filter(|(_, c)| c.control == control)
            .map(|(id, c)| super::TcpConnectionInfo {
                id: *id,
                peer: c.peer,
                state: match c.state {
                    TcpState::Connecting { .. } => "connecting",
                    TcpState::Pending => "pending",
                    TcpState::Bound { .. } => "bound",
                },
                to_peer_bytes: 0,
                from_peer_bytes: 0,
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// The peer connection the client data connection `data` is bound to.
    pub(super) fn tcp_bound_to(&self, data: FiveTuple) -> Option<ConnectionId> {
        if self.tcp.conns.is_empty() {
            return None;
        }
        self.tcp
            .conns
            .iter()
            .find(|(_, c)| matches!(c.state, TcpState::Bound { data: d } if d == data))
            .map(|(id, _)| *id)
    }

    /// Either side of peer data connection `id` closed (or the runtime gave
    /// it up): it is forgotten, and the other side closes with it.
    pub fn handle_tcp_closed(&mut self, _now: Instant, id: ConnectionId) {
        if self.tcp.conns.contains_key(&id) {
            self.forget_tcp(id);
            self.commands.push_back(Command::CloseConnection { id });
        }
    }

    fn forget_tcp(&mut self, id: ConnectionId) {
        let _ = self.take_tcp(id);
    }

    /// Removes connection `id`, giving its slot back to the allocation.
    fn take_tcp(&mut self, id: ConnectionId) -> Option<TcpConn> {
        let c = self.tcp.conns.remove(&id)?;
        if let Some(a) = self
            .table
            .by_tuple
            .get(&c.control)
            .copied()
            .and_then(|i| self.table.get_mut(i))
        {
            a.tcp_conns = a.tcp_conns.saturating_sub(1);
        }
        Some(c)
    }

    /// §5.2/§5.3: connects that took too long are answered 447; pending
    /// connections never bound are closed.
    pub(super) fn tcp_timeouts(&mut self, now: Instant) {
        while let Some(&Reverse((t, id))) = self.tcp.timers.peek() {
            if t > now {
                break;
            }
            self.tcp.timers.pop();
            let Some(c) = self.tcp.conns.get(&id) else {
                continue;
            };
            if c.deadline > now || matches!(c.state, TcpState::Bound { .. }) {
                continue;
            }
            let Some(c) = self.take_tcp(id) else { continue };
            match c.state {
                TcpState::Connecting { req, signer } => {
                    self.counters.tcp_connect_failed += 1;
                    self.note_tcp_refusal(c.control, ErrorCode::ConnectionTimeoutOrFailure);
                    self.queue_answer(
                        now,
                        c.control,
                        req,
                        Reply::Error(ErrorCode::ConnectionTimeoutOrFailure),
                        signer,
                    );
                }
                _ => self.counters.tcp_unbound_expired += 1,
            }
            self.commands.push_back(Command::CloseConnection { id });
        }
    }

    /// §5.5: the allocation of `control` is gone; so are its data
    /// connections, both sides.
    pub(super) fn close_tcp_of(&mut self, control: FiveTuple) {
        let ids: Vec<ConnectionId> = self
            .tcp
            .conns
            .iter()
            .filter(|(_, c)| c.control == control)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.tcp.conns.remove(&id);
            self.commands.push_back(Command::CloseConnection { id });
        }
    }
}

/// 24 bits from a counter seeded with the nonce secret (SplitMix64):
/// connection ids need to be unpredictable to an outsider, not secret.
fn rand_u24(state: &mut u64) -> u32 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z as u32) & 0x00FF_FFFF
}
