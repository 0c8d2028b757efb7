//! A worker's allocations as data, for another process to take over (a
//! binary upgrade hands the relay sockets and plain TCP connections over
//! with this): each allocation's 5-tuple, relayed addresses, lifetimes,
//! permissions (RFC 8656 §9), channels (§12) and counts, and the worker's
//! counters.
//!
//! Times are kept as what is left of them, so the reader's clock needs no
//! relation to the writer's. In it: UDP relays on UDP and on plain TCP
//! control connections, and RFC 6062 TCP allocations on plain TCP with
//! their peer data connections (pending, or bound to a plain TCP data
//! connection; the runtime moves the sockets). Not in it: allocations on
//! TLS connections (rustls state is not moved) and TCP allocations with a
//! connect in flight or a data connection over TLS: they stay with the
//! process that has them.
//!
//! Versioning: [`SNAPSHOT_VERSION`] changes when a field is removed or its
//! meaning changes, or when a field is added that a reader must not
//! ignore; any other field is added with a default, so an older reader
//! ignores it and a newer one fills it in. [`Server::restore`] reads the
//! versions in [`SNAPSHOT_READS`] and refuses any other, naming both.
//! Version 2 added RFC 6062 allocations (`tcp`, `tcp_conns`): a version-1
//! reader would take one for a UDP relay, so the version changed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::error::ErrorCode;
use super::events::{Counters, Stats};
use super::io::{ConnectionId, FiveTuple, ListenerId, Transport};
use super::table::{family, Allocation, ChannelBinding, Mobility, Permission, Relayed, CHANNEL_COOLDOWN};
use super::tcp_relay::{TcpConn, TcpState};
use super::Server;
use crate::limits::Bucket;

/// The snapshot format this build writes.
pub const SNAPSHOT_VERSION: u32 = 2;

/// The snapshot formats this build reads (version 1 is version 2 without
/// RFC 6062 allocations).
pub const SNAPSHOT_READS: std::ops::RangeInclusive<u32> = 1..=SNAPSHOT_VERSION;

/// One worker's allocations and counters at one instant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// [`SNAPSHOT_VERSION`] of the writer.
    pub version: u32,
    /// The allocations live when it was taken (see the module docs).
    pub allocations: Vec<AllocationState>,
    /// The worker's counters, so metrics continue rather than reset.
    pub counters: Counters,
    /// Behind Data indication transaction ids and CONNECTION-IDs: carried
    /// on so the new process repeats neither.
    #[serde(default)]
    pub data_seq: u64,
    /// The CONNECTION-ID sequence (RFC 6062).
    #[serde(default)]
    pub tcp_seq: u64,
}

/// One allocation (RFC 8656 §2.2) as data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllocationState {
    /// The control connection's transport (UDP or TCP).
    pub transport: Transport,
    /// The client's address as the server sees it.
    pub client: SocketAddr,
    /// The server address the client reached.
    pub server: SocketAddr,
    /// The writer's id of the listening socket; [`Server::restore`] asks
    /// the reader's runtime for its own.
    pub listener: ListenerId,
    /// Its relayed addresses, one per family.
    pub relays: Vec<RelayState>,
    /// The user it is counted under (quotas, caps).
    pub username: String,
    /// The creating Allocate's transaction id (a retransmission of it gets
    /// the same answer, §7.2).
    pub txid: [u8; 12],
    /// RESERVATION-TOKEN handed out with it (EVEN-PORT, §14.9).
    #[serde(default)]
    pub token: Option<[u8; 8]>,
    /// ADDRESS-ERROR-CODE of the creating answer: family byte and code.
    #[serde(default)]
    pub family_error: Option<(u8, u16)>,
    /// How long the allocation has existed, in milliseconds.
    pub age_ms: u64,
    /// Installed permissions (§9).
    #[serde(default)]
    pub permissions: Vec<PermissionState>,
    /// Channel bindings (§12), cooling-down ones included.
    #[serde(default)]
    pub channels: Vec<ChannelState>,
    /// What it relayed so far.
    #[serde(default)]
    pub stats: Stats,
    /// Its relay sockets set DF (DONT-FRAGMENT, §14.8).
    #[serde(default)]
    pub dont_fragment: bool,
    /// An RFC 6062 TCP allocation: its relayed address is a listening
    /// TCP socket.
    #[serde(default)]
    pub tcp: bool,
    /// Its peer data connections (RFC 6062 §5.3, §5.4).
    #[serde(default)]
    pub tcp_conns: Vec<TcpConnState>,
    /// RFC 8016: made with MOBILITY-TICKET, and its moves so far (tickets
    /// it gave out stay good; an older reader drops mobility, not the
    /// allocation).
    #[serde(default)]
    pub mobility: Option<u16>,
}

/// A peer data connection of an RFC 6062 allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpConnState {
    /// Its CONNECTION-ID.
    pub id: ConnectionId,
    /// The peer's address.
    pub peer: SocketAddr,
    /// The client data connection it is bound to (§5.4): client address,
    /// server address, the writer's listener id; none while pending.
    pub bound_to: Option<(SocketAddr, SocketAddr, ListenerId)>,
    /// What is left of a pending connection's 30 s to be bound.
    pub expires_in_ms: u64,
}

/// A relayed transport address and what is left of its lifetime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayState {
    /// The relay socket's bound address.
    pub bound: SocketAddr,
    /// What is left of its lifetime.
    pub expires_in_ms: u64,
}

/// A permission (§9) and what is left of its 300 s.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionState {
    /// The peer IP it admits.
    pub ip: IpAddr,
    /// What is left of it.
    pub expires_in_ms: u64,
}

/// A channel binding; one past its expiry but within the §12 cooldown has
/// a negative `expires_in_ms` (its number and peer stay reserved).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelState {
    /// The channel number, 0x4000 to 0x7FFF.
    pub number: u16,
    /// The peer it is bound to.
    pub peer: SocketAddr,
    /// What is left of it (negative: expired this long ago).
    pub expires_in_ms: i64,
}

/// Why a snapshot was not taken in.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Written in a format this build does not read.
    Version {
        /// The snapshot's version.
        found: u32,
        /// The one this build reads.
        supported: u32,
    },
    /// The server already holds allocations or has counted traffic: a
    /// snapshot is taken in by a fresh one only.
    NotFresh,
    /// An allocation that cannot be (no relayed address, a channel number
    /// out of range, an empty username): the snapshot is refused whole.
    Invalid(String),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Version { found, supported } => {
                write!(
                    f,
                    "snapshot format {found}, this build reads formats {} to {supported}",
                    SNAPSHOT_READS.start()
                )
            }
            SnapshotError::NotFresh => f.write_str("the server already holds allocations"),
            SnapshotError::Invalid(why) => write!(f, "snapshot refused: {why}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

/// What a restore took in and what it left out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Restored {
    /// Allocations now served here.
    pub allocations: usize,
    /// Allocations already expired at `now`, or whose listener the
    /// runtime no longer has: dropped (their relay sockets are the
    /// runtime's to close).
    pub dropped: usize,
    /// The dropped ones, as indexes into the snapshot's allocations: the
    /// old process forgot them without an end, so their usage records
    /// are ended by the runtime.
    pub lost: Vec<usize>,
}

impl Server {
    /// What another process can take over: an allocation on UDP or on a
    /// plain TCP connection (whose socket and unread bytes move with it);
    /// an RFC 6062 one only without a connect in flight and with every
    /// data connection plain TCP.
    fn movable(&self, a: &Allocation) -> bool {
        // A TLS or DTLS session's keys live in the runtime's TLS library,
        // which cannot hand them over: those allocations stay.
        if matches!(a.tuple.transport, Transport::Tls | Transport::Dtls) {
            return false;
        }
        !a.tcp
            || self.tcp_conns_of(a.tuple).all(|(_, c)| match c.state {
                TcpState::Connecting { .. } => false,
                TcpState::Pending => true,
                TcpState::Bound { data } => data.transport == Transport::Tcp,
            })
    }

    fn tcp_conns_of(&self, control: FiveTuple) -> impl Iterator<Item = (&ConnectionId, &TcpConn)> {
        self.tcp.conns.iter().filter(move |(_, c)| c.control == control)
    }

    fn tcp_conn_states(&self, a: &Allocation, now: Instant) -> Vec<TcpConnState> {
        if !a.tcp {
            return Vec::new();
        }
        let mut v: Vec<TcpConnState> = self
            .tcp_conns_of(a.tuple)
            .map(|(id, c)| TcpConnState {
                id: *id,
                peer: c.peer,
                bound_to: match c.state {
                    TcpState::Bound { data } => Some((data.client, data.server, data.listener)),
                    _ => None,
                },
                expires_in_ms: left_ms(c.deadline, now),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }
}

/// The longest time left a snapshot may give anything.
const MAX_LEFT_MS: u64 = 86_400_000;

fn left_ms(at: Instant, now: Instant) -> u64 {
    at.saturating_duration_since(now).as_millis() as u64
}

impl Server {
    /// The allocations live at `now` that another process can take over,
    /// and the counters (see the module docs); [`Server::stays_behind`]
    /// counts the others.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let allocations = self
            .table
            .iter()
            .filter(|a| a.is_live(now) && self.movable(a))
            .map(|a| self.state_of(a, now))
            .collect();
        Snapshot {
            version: SNAPSHOT_VERSION,
            allocations,
            counters: self.counters,
            data_seq: self.data_seq,
            tcp_seq: self.tcp_seq,
        }
    }

    /// One allocation as data (times as what is left of them).
    fn state_of(&self, a: &Allocation, now: Instant) -> AllocationState {
        AllocationState {
            transport: a.tuple.transport,
            client: a.tuple.client,
            server: a.tuple.server,
            listener: a.tuple.listener,
            relays: a
                .relays
                .iter()
                .flatten()
                .filter(|r| r.expires > now)
                .map(|r| RelayState {
                    bound: r.bound,
                    expires_in_ms: left_ms(r.expires, now),
                })
                .collect(),
            username: a.username.to_string(),
            txid: a.txid,
            token: a.token,
            family_error: a.family_error.map(|(f, c)| (f, c.code())),
            age_ms: now.saturating_duration_since(a.created).as_millis() as u64,
            permissions: a
                .permissions
                .iter()
                .filter(|p| p.expires > now)
                .map(|p| PermissionState {
                    ip: p.ip,
                    expires_in_ms: left_ms(p.expires, now),
                })
                .collect(),
            channels: a
                .channels
                .iter()
                .filter(|c| c.expires + CHANNEL_COOLDOWN > now)
                .map(|c| ChannelState {
                    number: c.number,
                    peer: c.peer,
                    expires_in_ms: if c.expires > now {
                        left_ms(c.expires, now) as i64
                    } else {
                        -(now.duration_since(c.expires).as_millis() as i64)
                    },
                })
                .collect(),
            stats: a.stats,
            dont_fragment: a.dont_fragment,
            tcp: a.tcp,
            tcp_conns: self.tcp_conn_states(a, now),
            mobility: a.mobility.moves(),
        }
    }

    /// Allocations a snapshot leaves behind: on TLS connections, and RFC
    /// 6062 TCP allocations with a connect in flight or a TLS data
    /// connection.
    pub fn stays_behind(&self) -> usize {
        self.table.iter().filter(|a| !self.movable(a)).count()
    }

    /// Takes in `snap` (a fresh server only): its allocations are served
    /// here from `now` on, with what was left of their lifetimes, counted
    /// against the quotas (never refused by them: they exist), and
    /// handed to the fast path when it is on. `listener` gives this
    /// runtime's id for the writer's listener id (`None`: it has no such
    /// listener, and the allocation is dropped). The runtime must already
    /// hold the relay sockets at the relayed addresses.
    pub fn restore(
        &mut self,
        now: Instant,
        snap: &Snapshot,
        listener: &dyn Fn(ListenerId) -> Option<ListenerId>,
    ) -> Result<Restored, SnapshotError> {
        if !SNAPSHOT_READS.contains(&snap.version) {
            return Err(SnapshotError::Version {
                found: snap.version,
                supported: SNAPSHOT_VERSION,
            });
        }
        if self.table.len() > 0 || self.counters != Counters::default() {
            return Err(SnapshotError::NotFresh);
        }
        for a in &snap.allocations {
            check(a)?;
        }
        let mut done = Restored::default();
        for (n, a) in snap.allocations.iter().enumerate() {
            match self.insert_state(now, a, listener) {
                Some(_) => done.allocations += 1,
                None => {
                    done.dropped += 1;
                    done.lost.push(n);
                }
            }
        }
        self.counters = snap.counters;
        self.data_seq = self.data_seq.max(snap.data_seq);
        self.tcp_seq = snap.tcp_seq;
        Ok(done)
    }
}

impl Server {
    /// Serves allocation `a` (checked) from `now` on: its listener mapped
    /// by `listener`, counted against the quotas (never refused: it
    /// exists), its fast-path entries sent. `None`: expired, no such
    /// listener, or its 5-tuple taken: dropped.
    fn insert_state(
        &mut self,
        now: Instant,
        a: &AllocationState,
        listener: &dyn Fn(ListenerId) -> Option<ListenerId>,
    ) -> Option<u32> {
        let tuple = FiveTuple {
            transport: a.transport,
            client: a.client,
            server: a.server,
            listener: listener(a.listener)?,
        };
        let relays = a.relays.iter().filter(|r| r.expires_in_ms > 0);
        let mut slots: [Option<Relayed>; 2] = [None, None];
        for r in relays {
            slots[family(r.bound)] = Some(Relayed {
                bound: r.bound,
                expires: now + Duration::from_millis(r.expires_in_ms),
            });
        }
        let expires = slots.iter().flatten().map(|r| r.expires).max()?;
        // A 5-tuple or relayed address already served here (a damaged
        // snapshot naming one twice) is not taken twice.
        if self.table.by_tuple.contains_key(&tuple)
            || slots
                .iter()
                .flatten()
                .any(|r| self.table.by_relay.contains_key(&r.bound))
        {
            return None;
        }
        let username: Arc<str> = Arc::from(a.username.as_str());
        self.shared.quotas.adopt(&username);
        let user_bw = self.shared.user_bandwidth.join(&username);
        let idx = self.table.insert(Allocation {
            tuple,
            relays: slots,
            username,
            txid: a.txid,
            token: a.token,
            family_error: a
                .family_error
                .and_then(|(f, c)| ErrorCode::from_code(c).map(|c| (f, c))),
            created: now.checked_sub(Duration::from_millis(a.age_ms)).unwrap_or(now),
            expires,
            permissions: a
                .permissions
                .iter()
                .map(|p| Permission {
                    ip: p.ip,
                    expires: now + Duration::from_millis(p.expires_in_ms),
                })
                .collect(),
            channels: a
                .channels
                .iter()
                .map(|c| ChannelBinding {
                    number: c.number,
                    peer: c.peer,
                    expires: if c.expires_in_ms >= 0 {
                        now + Duration::from_millis(c.expires_in_ms as u64)
                    } else {
                        now.checked_sub(Duration::from_millis(c.expires_in_ms.unsigned_abs()))
                            .unwrap_or(now)
                    },
                })
                .collect(),
            stats: a.stats,
            bw_up: Bucket::new(),
            bw_down: Bucket::new(),
            icmp: Bucket::new(),
            user_bw,
            tcp: a.tcp,
            tcp_conns: 0,
            dont_fragment: a.dont_fragment,
            mobility: Mobility::from_moves(a.mobility),
            fast_reserved: [0; 2],
        });
        if a.tcp {
            self.restore_tcp_conns(now, idx, tuple, &a.tcp_conns, listener);
        }
        self.sync_fast_path(idx, now);
        Some(idx)
    }

    /// RFC 8016 across workers: allocation `tuple` leaves this server for
    /// another worker's (whose runtime takes its relay sockets, which stay
    /// open): as data, without a trace in events or counters; its quota
    /// and bandwidth slots given back (the other takes them) and its
    /// fast-path entries removed (the other installs them).
    pub fn take_allocation(&mut self, tuple: &FiveTuple, now: Instant) -> Option<AllocationState> {
        let idx = *self.table.by_tuple.get(tuple)?;
        let a = self.table.get(idx)?;
        if a.tcp {
            return None;
        }
        let state = self.state_of(a, now);
        let channels: Vec<u16> = a.channels.iter().map(|c| c.number).collect();
        let a = self.table.remove(idx)?;
        self.remove_fast_path(a.tuple, &channels);
        self.shared.quotas.release(&a.username);
        self.shared.user_bandwidth.leave(a.user_bw);
        Some(state)
    }

    /// Takes in an allocation another worker's server gave up
    /// ([`Server::take_allocation`]); the runtime holds its relay sockets.
    pub fn adopt_allocation(
        &mut self,
        now: Instant,
        state: &AllocationState,
        listener: &dyn Fn(ListenerId) -> Option<ListenerId>,
    ) -> Result<(), SnapshotError> {
        check(state)?;
        match self.insert_state(now, state, listener) {
            Some(_) => Ok(()),
            None => Err(SnapshotError::Invalid(format!(
                "allocation of {}: expired, its listener unknown or its 5-tuple taken",
                state.client
            ))),
        }
    }

    /// An RFC 6062 allocation's peer data connections, pending (with what
    /// was left of their time to be bound) or bound to their data
    /// connection (the runtime adopts its socket at the same 5-tuple).
    fn restore_tcp_conns(
        &mut self,
        now: Instant,
        idx: u32,
        control: FiveTuple,
        conns: &[TcpConnState],
        listener: &dyn Fn(ListenerId) -> Option<ListenerId>,
    ) {
        let mut n: u16 = 0;
        for c in conns {
            let state = match c.bound_to {
                None => TcpState::Pending,
                Some((client, server, l)) => match listener(l) {
                    Some(listener) => TcpState::Bound {
                        data: FiveTuple {
                            transport: Transport::Tcp,
                            client,
                            server,
                            listener,
                        },
                    },
                    None => continue,
                },
            };
            let deadline = now + Duration::from_millis(c.expires_in_ms);
            if matches!(state, TcpState::Pending) {
                self.tcp.push_timer(deadline, c.id);
            }
            self.tcp.conns.insert(
                c.id,
                TcpConn {
                    control,
                    peer: c.peer,
                    state,
                    deadline,
                },
            );
            n = n.saturating_add(1);
        }
        if let Some(a) = self.table.get_mut(idx) {
            a.tcp_conns = n;
        }
    }

    /// The allocations of `snap` were taken over by another process: they
    /// leave this server without a trace in its events or counters (they
    /// did not end). Their relay sockets are closed here (the runtime's
    /// copies; the other process holds its own), and their quota and
    /// bandwidth slots given back. Returns how many left.
    pub fn hand_over(&mut self, snap: &Snapshot) -> usize {
        let mut n = 0;
        for s in &snap.allocations {
            let tuple = FiveTuple {
                transport: s.transport,
                client: s.client,
                server: s.server,
                listener: s.listener,
            };
            let Some(&idx) = self.table.by_tuple.get(&tuple) else {
                continue;
            };
            let Some(a) = self.table.remove(idx) else {
                continue;
            };
            // Its peer data connections left with it (the runtime's
            // copies of their sockets are its to drop).
            self.tcp.conns.retain(|_, c| c.control != tuple);
            for r in a.relays.iter().flatten() {
                self.commands
                    .push_back(super::Command::CloseRelay { relay: r.bound });
            }
            self.shared.quotas.release(&a.username);
            self.shared.user_bandwidth.leave(a.user_bw);
            n += 1;
        }
        n
    }
}

/// What no allocation of this server could be: refused before anything
/// is taken in.
fn check(a: &AllocationState) -> Result<(), SnapshotError> {
    let bad = |why: String| {
        Err(SnapshotError::Invalid(format!(
            "allocation of {}: {why}",
            a.client
        )))
    };
    if matches!(a.transport, Transport::Tls | Transport::Dtls) {
        return bad(format!(
            "transport {} (TLS and DTLS sessions are not handed over)",
            a.transport.as_str()
        ));
    }
    if a.username.is_empty() {
        return bad("no username".into());
    }
    if a.relays.is_empty() || a.relays.len() > 2 {
        return bad(format!("{} relayed addresses", a.relays.len()));
    }
    if a.relays.len() == 2 && a.relays[0].bound.is_ipv6() == a.relays[1].bound.is_ipv6() {
        return bad("two relayed addresses of one family".into());
    }
    if let Some(c) = a.channels.iter().find(|c| !(0x4000..=0x7FFF).contains(&c.number)) {
        return bad(format!("channel number {:#06x} (RFC 8656 §12)", c.number));
    }
    if !a.tcp && !a.tcp_conns.is_empty() {
        return bad("peer data connections on a UDP relay".into());
    }
    if a.tcp && (a.relays.len() != 1 || !a.channels.is_empty()) {
        return bad("an RFC 6062 allocation with channels or two relayed addresses".into());
    }
    // Nothing of a TURN server lasts a day without a refresh; a longer
    // time is a damaged snapshot (and would overflow the clock).
    let times = a
        .relays
        .iter()
        .map(|r| r.expires_in_ms)
        .chain(a.permissions.iter().map(|p| p.expires_in_ms))
        .chain(a.channels.iter().map(|c| c.expires_in_ms.unsigned_abs()))
        .chain(a.tcp_conns.iter().map(|c| c.expires_in_ms));
    if let Some(t) = times.into_iter().find(|t| *t > MAX_LEFT_MS) {
        return bad(format!("a lifetime of {t} ms (more than a day)"));
    }
    Ok(())
}
