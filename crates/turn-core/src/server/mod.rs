//! The server state machine. `Server` is the public API: inputs
//! (`handle_*`) and outputs (`poll_*`). Each concern has its own file:
//!
//! | file | what |
//! |---|---|
//! | `io.rs` | what crosses the boundary: 5-tuples, transmits, commands |
//! | `config.rs` | settings |
//! | `events.rs` | stats, counters, events |
//! | `error.rs` | error codes (one type for answers and metrics) |
//! | `table.rs` | allocations, permissions, channels, their maps and timers |
//! | `auth_check.rs` | RFC 8489 §9.2.4 on each request |
//! | `challenge.rs` | sizing 401/438 against the request (reflection) |
//! | `binding.rs` | Binding, RFC 5780 |
//! | `allocate.rs` | Allocate, dual allocations, relay sockets |
//! | `refresh.rs` | Refresh |
//! | `permission.rs` | CreatePermission, ChannelBind, peer checks |
//! | `relay.rs` | Send/Data, ChannelData, ICMP, bandwidth caps |
//! | `respond.rs` | writing responses, 420 |

mod allocate;
mod auth_check;
mod binding;
mod challenge;
mod config;
mod error;
mod events;
mod fast_path;
mod io;
mod mobility;
mod permission;
mod refresh;
mod relay;
mod respond;
mod snapshot;
mod table;
mod tcp_relay;

use std::cmp::Reverse;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use stun_proto::{attr, method, packet_kind, Class, Message, PacketKind};

pub use challenge::{challenge_len, max_realm_len, CHALLENGE_RATIO, MIN_ALLOCATE_LEN};
pub use config::{Config, Redirect, Rfc5780, Shared, AUTH_WINDOW, SOURCE_SLOTS};
pub use error::ErrorCode;
pub use events::{CloseReason, Counters, Event, RefusalDetail, SessionInfo, Stats, TcpConnectionInfo};
pub use fast_path::{FastPathBudget, FastPathEntry};
pub use io::{
    AllocateId, Command, ConnectionId, Dest, FiveTuple, ListenerId, OpenedRelay, QueuedTransmit, RelayError,
    RelayRequest, RelaysOpened, Transmit, Transport,
};
pub use snapshot::{
    AllocationState, ChannelState, PermissionState, RelayState, Restored, Snapshot, SnapshotError,
    TcpConnState, SNAPSHOT_READS, SNAPSHOT_VERSION,
};
pub use tcp_relay::{connection_bind_id, connection_id_tag, TCP_CONNECTION_TIMEOUT};

use crate::auth::{Credentials, Key, NonceMinter};
use allocate::PendingAllocate;
use respond::{Reply, ReqInfo};
use table::{FastMap, Table};

/// A sans-IO STUN/TURN server for one worker. See the crate docs.
pub struct Server {
    cfg: Config,
    shared: Shared,
    minter: NonceMinter,
    table: Table,
    events: VecDeque<Event>,
    commands: VecDeque<Command>,
    transmits: VecDeque<QueuedTransmit>,
    pending: FastMap<AllocateId, PendingAllocate>,
    next_allocate: u64,
    out: Vec<u8>,
    keys: Vec<Key>,
    /// Sequence number behind Data indication transaction ids.
    data_seq: u64,
    counters: Counters,
    /// RFC 6062 peer data connections.
    tcp: tcp_relay::TcpRelays,
    /// Behind CONNECTION-IDs (seeded with the nonce secret).
    tcp_seq: u64,
    /// What refused the request being handled ([`Server::refuse`]), taken
    /// by its refusal event.
    refusal: Option<RefusalDetail>,
    /// RFC 8016: a MOBILITY-TICKET for the answer being written.
    ticket_out: Option<Vec<u8>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("allocations", &self.table.len())
            .finish()
    }
}

impl Server {
    /// A server with no allocations and state of its own (quotas, limits,
    /// drain flag): one worker, a test, the fuzzer.
    pub fn new(cfg: Config) -> Self {
        Self::with_shared(cfg, Shared::default())
    }

    /// A server with no allocations, sharing `shared` with the others the
    /// node runs.
    pub fn with_shared(cfg: Config, shared: Shared) -> Self {
        let minter = NonceMinter::new(cfg.nonce_secret, cfg.nonce_lifetime.as_secs().max(1));
        // Not the secret itself: its hash, so ids reveal nothing of it.
        let cfg_seed = stun_proto::hmac_sha1(&cfg.nonce_secret, b"connection-id");
        let relayed = shared.relayed.clone();
        Server {
            cfg,
            shared,
            minter,
            table: Table::new(relayed),
            events: VecDeque::new(),
            refusal: None,
            ticket_out: None,
            commands: VecDeque::new(),
            transmits: VecDeque::new(),
            pending: FastMap::default(),
            next_allocate: 0,
            out: Vec::with_capacity(2048),
            keys: Vec::with_capacity(4),
            data_seq: 0,
            counters: Counters::default(),
            tcp: tcp_relay::TcpRelays::default(),
            tcp_seq: u64::from_le_bytes([
                cfg_seed[0],
                cfg_seed[1],
                cfg_seed[2],
                cfg_seed[3],
                cfg_seed[4],
                cfg_seed[5],
                cfg_seed[6],
                cfg_seed[7],
            ]),
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Replaces the credentials (reload); existing allocations are kept.
    pub fn set_credentials(&mut self, credentials: Arc<Credentials>) {
        self.cfg.credentials = credentials;
    }

    /// Replaces the configuration (reload): credentials, peer policy,
    /// limits, caps and every other setting, and the shared state (a new
    /// answer budget or guard when their settings changed). Allocations are
    /// kept, and so are nonces if the secret and epoch stay (the runtime
    /// keeps them), and the set of relayed addresses and the users'
    /// bandwidth buckets this server was made with.
    pub fn reconfigure(&mut self, cfg: Config, shared: Shared) {
        self.minter = NonceMinter::new(cfg.nonce_secret, cfg.nonce_lifetime.as_secs().max(1));
        self.cfg = cfg;
        self.shared = Shared {
            relayed: self.shared.relayed.clone(),
            user_bandwidth: self.shared.user_bandwidth.clone(),
            ..shared
        };
    }

    /// The state this server shares with the node's other servers.
    pub fn shared(&self) -> &Shared {
        &self.shared
    }

    /// Number of live allocations.
    pub fn allocation_count(&self) -> usize {
        self.table.len()
    }

    /// What this worker has done so far. Relay counts include the live
    /// allocations' traffic (summed here, once, rather than per packet).
    pub fn counters(&self) -> Counters {
        let mut c = self.counters;
        for a in self.table.iter() {
            c.to_peer_packets += a.stats.to_peer_packets;
            c.to_peer_bytes += a.stats.to_peer_bytes;
            c.from_peer_packets += a.stats.from_peer_packets;
            c.from_peer_bytes += a.stats.from_peer_bytes;
        }
        c
    }

    /// Every live allocation of this worker.
    pub fn sessions(&self, now: Instant) -> Vec<SessionInfo> {
        self.table
            .iter()
            .map(|a| SessionInfo {
                tuple: a.tuple,
                username: a.username.clone(),
                relayed: a.first_relayed(&self.cfg),
                relayed_all: a.advertised(&self.cfg).into_iter().flatten().collect(),
                age: now.saturating_duration_since(a.created),
                expires_in: a.expires.saturating_duration_since(now),
                stats: a.stats,
                permissions: a.permissions.iter().filter(|p| p.expires > now).count(),
                channels: a.channels.iter().filter(|c| c.expires > now).count(),
                tcp_connections: if a.tcp { self.tcp_info(a.tuple) } else { Vec::new() },
            })
            .collect()
    }

    /// Deletes the allocations `pick` selects (admin API); returns how many.
    pub fn delete_sessions(&mut self, now: Instant, pick: &dyn Fn(&SessionInfo) -> bool) -> usize {
        let doomed: Vec<u32> = self
            .sessions(now)
            .iter()
            .filter(|s| pick(s))
            .filter_map(|s| self.table.by_tuple.get(&s.tuple).copied())
            .collect();
        for idx in &doomed {
            self.delete(*idx, now, CloseReason::Admin);
        }
        doomed.len()
    }

    /// Ends the allocations that have relayed `max_allocation_bytes` in all
    /// (reason `quota`); `outside` adds, per allocation, what was relayed
    /// where the core does not count (RFC 6062 data connections). Bytes the
    /// fast path relayed count once they are handed in
    /// ([`Server::handle_fast_path_counts`]). Returns how many ended.
    pub fn end_over_quota(&mut self, now: Instant, outside: &dyn Fn(&FiveTuple) -> u64) -> usize {
        let cap = self.cfg.max_allocation_bytes;
        if cap == 0 {
            return 0;
        }
        let over: Vec<u32> = self
            .table
            .by_tuple
            .iter()
            .filter(|(tuple, idx)| {
                self.table.get(**idx).is_some_and(|a| {
                    let s = &a.stats;
                    s.to_peer_bytes
                        .saturating_add(s.from_peer_bytes)
                        .saturating_add(outside(tuple))
                        >= cap
                })
            })
            .map(|(_, idx)| *idx)
            .collect();
        for idx in &over {
            self.delete(*idx, now, CloseReason::Quota);
        }
        over.len()
    }

    /// Relay sockets the live allocations hold (two for a dual one).
    pub fn relay_count(&self) -> usize {
        self.table.by_relay.len()
    }

    /// Entries in the expiry heap: at most twice what the live
    /// allocations need plus 1,024, however many came and went.
    pub fn pending_timers(&self) -> usize {
        self.table.timers.len()
    }

    /// Whether the server is draining (new allocations refused).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Live allocations by client transport: UDP, TCP, TLS, DTLS.
    pub fn allocations_by_transport(&self) -> [usize; Transport::COUNT] {
        let mut n = [0; Transport::COUNT];
        for t in self.table.by_tuple.keys() {
            n[t.transport.index()] += 1;
        }
        n
    }

    /// Live permissions and channel bindings across this worker's allocations.
    pub fn permissions_and_channels(&self, now: Instant) -> (usize, usize) {
        self.table.iter().fold((0, 0), |(p, c), a| {
            (
                p + a.permissions.iter().filter(|x| x.expires > now).count(),
                c + a.channels.iter().filter(|x| x.expires > now).count(),
            )
        })
    }

    /// Whether the 5-tuple has an allocation (the runtime's idle timeouts
    /// leave such connections alone).
    pub fn has_allocation(&self, tuple: &FiveTuple) -> bool {
        self.table.by_tuple.contains_key(tuple)
    }

    /// The next instant [`Self::handle_timeout`] has work to do, if any.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let a = self.table.timers.peek().map(|Reverse((t, _))| *t);
        match (a, self.tcp_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next event for logs and metrics.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next command for the runtime. Drain after every input.
    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Whether commands wait (one cheap check per input on the hot path).
    pub fn has_commands(&self) -> bool {
        !self.commands.is_empty()
    }

    /// The next queued transmit (answers written on a completion).
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<QueuedTransmit> {
        self.transmits.pop_front()
    }

    fn nonce_secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.cfg.epoch).as_secs()
    }

    fn unix_now(&self, now: Instant) -> u64 {
        self.cfg.unix_at_epoch + self.nonce_secs(now)
    }

    /// Expires allocations, and single families of dual allocations, whose
    /// lifetime has run out (RFC 8656 §7.3).
    pub fn handle_timeout(&mut self, now: Instant) {
        self.tcp_timeouts(now);
        while let Some(&Reverse((t, idx))) = self.table.timers.peek() {
            if t > now {
                break;
            }
            self.table.timers.pop();
            let Some(a) = self.table.get_mut(idx) else {
                continue;
            };
            if a.expires <= now {
                self.delete(idx, now, CloseReason::Expired);
                continue;
            }
            let mut gone = [None, None];
            for (slot, g) in a.relays.iter_mut().zip(gone.iter_mut()) {
                if slot.is_some_and(|r| r.expires <= now) {
                    *g = slot.take().map(|r| r.bound);
                }
            }
            for relay in gone.into_iter().flatten() {
                self.table.remove_relay(&relay);
                self.commands.push_back(Command::CloseRelay { relay });
            }
        }
    }

    /// A client's TCP/TLS connection closed: its allocation goes with it
    /// (RFC 8656 §3.1: the allocation is bound to the 5-tuple).
    pub fn handle_connection_closed(&mut self, now: Instant, tuple: FiveTuple) {
        if let Some(&idx) = self.table.by_tuple.get(&tuple) {
            self.delete(idx, now, CloseReason::ConnectionClosed);
        }
        self.pending.retain(|_, p| p.tuple_is_not(&tuple));
        // RFC 6062 §5.5: a client data connection takes its peer's along.
        if let Some(id) = self.tcp_bound_to(tuple) {
            self.handle_tcp_closed(now, id);
        }
    }

    /// Deletes every allocation (the server stops, `reason` says why),
    /// asking for their relay sockets to be closed.
    pub fn close_all(&mut self, now: Instant, reason: CloseReason) {
        let idxs: Vec<u32> = self.table.by_tuple.values().copied().collect();
        for idx in idxs {
            self.delete(idx, now, reason);
        }
    }

    fn delete(&mut self, idx: u32, now: Instant, reason: CloseReason) {
        let Some(a) = self.table.remove(idx) else {
            return;
        };
        for r in a.relays.iter().flatten() {
            self.commands.push_back(Command::CloseRelay { relay: r.bound });
        }
        if a.tcp {
            self.close_tcp_of(a.tuple);
        }
        let channels: Vec<u16> = a.channels.iter().map(|c| c.number).collect();
        self.remove_fast_path(a.tuple, &channels);
        self.shared.quotas.release(&a.username);
        let t = a.tuple.transport.index();
        self.counters.allocations_ended[reason.index()] += 1;
        if reason == CloseReason::Expired {
            self.counters.allocations_expired[t] += 1;
        } else {
            self.counters.allocations_deleted[t] += 1;
        }
        self.counters.to_peer_packets += a.stats.to_peer_packets;
        self.counters.to_peer_bytes += a.stats.to_peer_bytes;
        self.counters.from_peer_packets += a.stats.from_peer_packets;
        self.counters.from_peer_bytes += a.stats.from_peer_bytes;
        let relayed = a.first_relayed(&self.cfg);
        let age = now.saturating_duration_since(a.created);
        self.shared.user_bandwidth.leave(a.user_bw);
        self.events.push_back(Event::AllocationDeleted {
            tuple: a.tuple,
            username: a.username,
            relayed,
            reason,
            stats: a.stats,
            age,
        });
    }

    /// Processes one packet from a client: a whole UDP datagram, or one
    /// framed message from a TCP/TLS stream. Malformed input is dropped
    /// silently (RFC 8489 §6.3) and yields `None`. An answer that needs the
    /// runtime first (Allocate) also yields `None`: it leaves commands
    /// ([`Self::poll_command`]) and comes with their completion.
    pub fn handle_client<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        data: &'a [u8],
    ) -> Option<Transmit<'a>> {
        match packet_kind(data) {
            PacketKind::Stun => {
                let msg = Message::parse(data).ok()?;
                let typ = msg.message_type();
                match typ.class {
                    Class::Request => self.handle_request(now, tuple, &msg),
                    Class::Indication if typ.method == method::SEND => self.handle_send(now, tuple, &msg),
                    // Responses and other indications sent to a server are dropped.
                    _ => None,
                }
            }
            PacketKind::ChannelData => self.handle_channel_data(now, tuple, data),
            PacketKind::Other => None,
        }
    }

    fn handle_request<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'a>,
    ) -> Option<Transmit<'a>> {
        let m = msg.message_type().method;
        if m == method::BINDING {
            return self.binding(now, tuple, msg);
        }
        let req = ReqInfo::of(msg);
        self.refusal = None;
        if !matches!(
            m,
            method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
                | method::CONNECT
                | method::CONNECTION_BIND
        ) {
            if !self.may_answer_unauthenticated(tuple, now) {
                return None;
            }
            self.note_refusal(
                tuple,
                msg,
                ErrorCode::BadRequest,
                Some(RefusalDetail::Rule("unknown method")),
            );
            return Some(self.respond(now, tuple, req, Reply::Error(ErrorCode::BadRequest), None));
        }
        // RFC 8489 §9.2.4: authenticate before anything else.
        let auth = match self.authenticate(now, tuple, msg) {
            Ok(a) => a,
            Err(None) => return None,
            Err(Some(code)) => {
                if !self.may_answer_unauthenticated(tuple, now) {
                    return None;
                }
                if code.is_challenge() && self.challenge_kind(&req).is_none() {
                    // Too small to challenge within the reflection bound,
                    // and it could never succeed: a short answer or none.
                    let short = if m == method::ALLOCATE {
                        (!msg.has(attr::REQUESTED_TRANSPORT)).then_some(ErrorCode::BadRequest)
                    } else {
                        (!self.table.by_tuple.contains_key(&tuple)).then_some(ErrorCode::AllocationMismatch)
                    };
                    let Some(short) = short else {
                        self.counters.challenges_withheld += 1;
                        return None;
                    };
                    self.note_refusal(tuple, msg, short, None);
                    return Some(self.respond(now, tuple, req, Reply::Error(short), None));
                }
                // The challenges are the normal first step of every client.
                let challenge = code == ErrorCode::StaleNonce
                    || (code == ErrorCode::Unauthorized
                        && !msg.has_integrity()
                        && !msg.has_integrity_sha256());
                if !challenge {
                    self.note_refusal(tuple, msg, code, None);
                } else if code == ErrorCode::Unauthorized {
                    self.counters.challenges += 1;
                }
                return Some(self.respond(now, tuple, req, Reply::Error(code), None));
            }
        };
        let signer = Some((auth.key, auth.sha256));
        if let Some((list, n)) = self.unknown_required(msg) {
            self.note_refusal(tuple, msg, ErrorCode::UnknownAttribute, None);
            return Some(self.respond(now, tuple, req, Reply::Unknown(list, n), signer));
        }
        let mut existing = self.table.by_tuple.get(&tuple).copied();
        if let Some(idx) = existing {
            // RFC 8656 §7: past its lifetime an allocation is gone, even if
            // the timer has not swept it yet; nothing may revive it.
            if self.table.get_live(idx, now).is_none() {
                self.delete(idx, now, CloseReason::Expired);
                existing = None;
            }
        }
        if let Some(a) = existing.and_then(|idx| self.table.get(idx)) {
            // RFC 8656 §7: requests on an allocation must use its username.
            if *a.username != *auth.username {
                self.note_refusal(tuple, msg, ErrorCode::WrongCredentials, None);
                return Some(self.respond(
                    now,
                    tuple,
                    req,
                    Reply::Error(ErrorCode::WrongCredentials),
                    signer,
                ));
            }
        }
        let reply = match m {
            method::ALLOCATE => self.allocate(now, tuple, msg, &auth, existing),
            method::CONNECT => self.connect(now, tuple, msg, &auth, existing),
            method::CONNECTION_BIND => self.connection_bind(tuple, msg, &auth, existing),
            // Refresh, CreatePermission, ChannelBind: lifetimes of relays,
            // permissions and channels move, and so do the fast path's
            // entries.
            _ => {
                let mut existing = existing;
                let r = match m {
                    method::REFRESH => self.refresh(now, tuple, msg, &auth, &mut existing),
                    method::CREATE_PERMISSION => self.create_permission(now, tuple, msg, existing),
                    _ => self.channel_bind(now, tuple, msg, existing),
                };
                if let (Reply::Ok | Reply::RefreshOk { .. }, Some(idx)) = (&r, existing) {
                    self.sync_fast_path(idx, now);
                }
                r
            }
        };
        let detail = self.refusal.take();
        match reply {
            Reply::Deferred => return None,
            Reply::Error(code) => self.note_refusal(tuple, msg, code, detail),
            Reply::TryAlternate(_) => self.note_refusal(tuple, msg, ErrorCode::TryAlternate, None),
            _ => {}
        }
        Some(self.respond(now, tuple, req, reply, signer))
    }

    /// An error reply whose refusal event names what refused it.
    fn refuse(&mut self, code: ErrorCode, detail: RefusalDetail) -> Reply {
        self.refusal = Some(detail);
        Reply::Error(code)
    }

    /// An event for a refused request, naming the user it asked for.
    fn note_refusal(
        &mut self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        code: ErrorCode,
        detail: Option<RefusalDetail>,
    ) {
        let detail = detail.or(self.refusal.take());
        let username = match (msg.get(attr::USERNAME), msg.get(attr::USERHASH)) {
            (Some(u), _) => Some(String::from_utf8_lossy(&u[..u.len().min(128)]).into_owned()),
            (None, Some(h)) => Some(format!(
                "userhash:{}",
                h.iter().take(8).map(|b| format!("{b:02x}")).collect::<String>()
            )),
            (None, None) => None,
        };
        self.events.push_back(Event::RequestRefused {
            tuple,
            method: msg.message_type().method,
            code,
            username,
            detail,
        });
    }
}

#[cfg(test)]
mod size_tests {
    use super::table::{Allocation, ChannelBinding, Permission};
    use super::*;

    /// Per-allocation state stays small: BENCHMARKS.md reports these sizes
    /// next to the measured RSS per held allocation.
    #[test]
    fn per_allocation_state_is_small() {
        let sizes = [
            ("Allocation", std::mem::size_of::<Allocation>()),
            ("Permission", std::mem::size_of::<Permission>()),
            ("ChannelBinding", std::mem::size_of::<ChannelBinding>()),
            ("FiveTuple", std::mem::size_of::<FiveTuple>()),
        ];
        for (name, size) in sizes {
            eprintln!("size_of::<{name}>() = {size}");
        }
        // 416 until RFC 8016's two bytes cost a word.
        assert!(
            std::mem::size_of::<Allocation>() <= 424,
            "grew past the budget BENCHMARKS.md reports"
        );
    }
}
