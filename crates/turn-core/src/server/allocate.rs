//! Allocate (RFC 8656 §7.2; dual allocations with ADDITIONAL-ADDRESS-FAMILY
//! and ADDRESS-ERROR-CODE, §14.12–§14.13; DONT-FRAGMENT, §14.8). The relay
//! sockets are opened by the runtime: the request leaves a
//! [`Command::OpenRelays`] and is answered in [`Server::handle_relays_opened`].

use super::events::RefusalDetail;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stun_proto::{attr, Message};

use super::auth_check::Authenticated;
use super::error::ErrorCode;
use super::events::{Event, Stats};
use super::io::{AllocateId, Command, FiveTuple, QueuedTransmit, RelayError, RelayRequest, RelaysOpened};
use super::respond::{Reply, ReqInfo, Signer};
use super::table::{family, Allocation, Mobility, Relayed};
use super::Server;
use crate::limits::{Bucket, QuotaError};

/// An Allocate waiting for its relay sockets.
#[derive(Debug)]
pub(super) struct PendingAllocate {
    tuple: FiveTuple,
    req: ReqInfo,
    signer: Signer,
    username: Arc<str>,
    lifetime: Duration,
    /// The family asked for first: IPv6 (else IPv4).
    primary_v6: bool,
    /// RFC 6062: a TCP relay.
    tcp: bool,
    /// DONT-FRAGMENT.
    dont_fragment: bool,
    /// MOBILITY-TICKET (RFC 8016 §3.1): the answer carries a ticket.
    mobility: bool,
}

/// What an Allocate asks for, its attributes checked (RFC 8656 §7.2).
struct AllocateAsk {
    /// RFC 6062: a TCP relay.
    tcp: bool,
    /// REQUESTED-ADDRESS-FAMILY: IPv6 (else IPv4).
    primary_v6: bool,
    /// ADDITIONAL-ADDRESS-FAMILY: IPv6 beside IPv4 (§14.12).
    dual: bool,
    /// EVEN-PORT, and its R bit.
    even_port: bool,
    reserve_next: bool,
}

impl Server {
    /// RFC 8656 §7.2, up to the point where relay sockets are needed.
    pub(super) fn allocate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
        existing: Option<u32>,
    ) -> Reply {
        if let Some(idx) = existing {
            return self.allocate_again(now, idx, msg);
        }
        if self.pending.values().any(|p| p.tuple == tuple) {
            // Its answer comes when the relay sockets are open.
            return Reply::Deferred;
        }
        let ask = match self.allocate_ask(tuple, msg) {
            Ok(ask) => ask,
            Err(reply) => return reply,
        };
        if let Some(reply) = self.mobility_refused(tuple, msg, ask.tcp) {
            return reply;
        }
        if let Some(reply) = self.steer_away(tuple) {
            return reply;
        }
        // Every check that can fail comes before the quota is taken, so no
        // error path below has to give it back (the fuzzer found one that
        // did not).
        let token = match msg.get(attr::RESERVATION_TOKEN) {
            None => None,
            Some(t) => match <[u8; 8]>::try_from(t) {
                Ok(t) => Some(t),
                Err(_) => {
                    return self.refuse(
                        ErrorCode::BadRequest,
                        RefusalDetail::Malformed("RESERVATION-TOKEN"),
                    )
                }
            },
        };
        let lifetime = self.lifetime(msg.get_u32(attr::LIFETIME));
        let username: Arc<str> = Arc::from(auth.username.as_str());
        match self.shared.quotas.acquire(&username) {
            Ok(()) => {}
            Err(QuotaError::User) => {
                self.counters.quota_user += 1;
                return Reply::Error(ErrorCode::AllocationQuotaReached);
            }
            Err(QuotaError::Total) => {
                self.counters.capacity += 1;
                return Reply::Error(ErrorCode::InsufficientCapacity);
            }
        }
        let primary = RelayRequest {
            ipv6: ask.primary_v6,
            local_ip: tuple.server.ip(),
            client_ip: tuple.client.ip(),
            even_port: ask.even_port,
            reserve_next: ask.reserve_next,
            token,
            dont_fragment: msg.has(attr::DONT_FRAGMENT),
            tcp: ask.tcp,
        };
        let additional = ask.dual.then_some(RelayRequest {
            ipv6: true,
            even_port: false,
            reserve_next: false,
            token: None,
            ..primary
        });
        self.next_allocate = self.next_allocate.wrapping_add(1);
        let id = AllocateId(self.next_allocate);
        self.pending.insert(
            id,
            PendingAllocate {
                tuple,
                req: ReqInfo::of(msg),
                signer: Some((auth.key, auth.sha256)),
                username,
                lifetime,
                primary_v6: ask.primary_v6,
                tcp: ask.tcp,
                dont_fragment: primary.dont_fragment,
                mobility: msg.has(attr::MOBILITY_TICKET),
            },
        );
        self.commands.push_back(Command::OpenRelays {
            id,
            tuple,
            primary,
            additional,
        });
        Reply::Deferred
    }

    /// An Allocate on a 5-tuple that has an allocation: a retransmission
    /// of the request that made it gets the same success answer; anything
    /// else is a mismatch (437, RFC 8656 §7.2).
    fn allocate_again(&mut self, now: Instant, idx: u32, msg: &Message<'_>) -> Reply {
        match self.table.get(idx) {
            Some(a) if a.txid == msg.transaction_id() => {
                let reply = Reply::AllocateOk {
                    relayed: a.advertised(&self.cfg),
                    lifetime: a.expires.saturating_duration_since(now).as_secs() as u32,
                    token: a.token,
                    family_error: a.family_error,
                };
                self.issue_ticket(idx, now);
                reply
            }
            _ => Reply::Error(ErrorCode::AllocationMismatch),
        }
    }

    /// The request's transport, families and port parity, each checked
    /// (§7.2, RFC 6062 §5.1, §14.11–§14.12), or the refusal.
    fn allocate_ask(&mut self, tuple: FiveTuple, msg: &Message<'_>) -> Result<AllocateAsk, Reply> {
        use ErrorCode::*;
        let Some(rt) = msg.get(attr::REQUESTED_TRANSPORT) else {
            return Err(self.refuse(
                BadRequest,
                RefusalDetail::Missing("REQUESTED-TRANSPORT (RFC 8656 §7.2)"),
            ));
        };
        if rt.len() != 4 {
            return Err(self.refuse(BadRequest, RefusalDetail::Malformed("REQUESTED-TRANSPORT")));
        }
        let tcp = match rt[0] {
            attr::PROTOCOL_UDP => false,
            // RFC 6062 §5.1: TCP relays are for TCP/TLS control connections,
            // and have no port pairs, reservations or DF.
            attr::PROTOCOL_TCP => {
                if !tuple.transport.is_stream()
                    || msg.has(attr::EVEN_PORT)
                    || msg.has(attr::RESERVATION_TOKEN)
                    || msg.has(attr::DONT_FRAGMENT)
                {
                    return Err(self.refuse(
                        BadRequest,
                        RefusalDetail::Rule(
                            "a TCP allocation needs a TCP or TLS control connection and takes no EVEN-PORT, RESERVATION-TOKEN or DONT-FRAGMENT (RFC 6062 §5.1)",
                        ),
                    ));
                }
                true
            }
            _ => return Err(Reply::Error(UnsupportedTransport)),
        };
        let has_token = msg.has(attr::RESERVATION_TOKEN);
        let family_attr = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        // The drafts' number is accepted too: coturn's own client sends it.
        let additional_attr = msg
            .get(attr::ADDITIONAL_ADDRESS_FAMILY)
            .or_else(|| msg.get(attr::ADDITIONAL_ADDRESS_FAMILY_DRAFT));
        if has_token && (msg.has(attr::EVEN_PORT) || family_attr.is_some() || additional_attr.is_some()) {
            return Err(self.refuse(
                BadRequest,
                RefusalDetail::Rule("RESERVATION-TOKEN with EVEN-PORT or an address family (RFC 8656 §7.2)"),
            ));
        }
        if family_attr.is_some() && additional_attr.is_some() {
            return Err(self.refuse(
                BadRequest,
                RefusalDetail::Rule(
                    "REQUESTED-ADDRESS-FAMILY with ADDITIONAL-ADDRESS-FAMILY (RFC 8656 §7.2)",
                ),
            ));
        }
        let primary_v6 = match family_attr {
            None => false,
            Some(v) if v.len() != 4 => {
                return Err(self.refuse(BadRequest, RefusalDetail::Malformed("REQUESTED-ADDRESS-FAMILY")))
            }
            Some(v) if v[0] == attr::FAMILY_IPV4 => false,
            Some(v) if v[0] == attr::FAMILY_IPV6 => true,
            Some(_) => return Err(Reply::Error(AddressFamilyNotSupported)),
        };
        // §14.12: ADDITIONAL-ADDRESS-FAMILY asks for IPv6 beside IPv4;
        // any other value is a bad request.
        let dual = match additional_attr {
            None => false,
            Some(v) if v.len() == 4 && v[0] == attr::FAMILY_IPV6 => true,
            Some(_) => {
                return Err(self.refuse(
                    BadRequest,
                    RefusalDetail::Malformed("ADDITIONAL-ADDRESS-FAMILY (IPv6 only, RFC 8656 §14.12)"),
                ))
            }
        };
        let (even_port, reserve_next) = match msg.get(attr::EVEN_PORT) {
            None => (false, false),
            Some([]) => return Err(self.refuse(BadRequest, RefusalDetail::Malformed("EVEN-PORT"))),
            Some(v) => (true, v[0] & 0x80 != 0),
        };
        Ok(AllocateAsk {
            tcp,
            primary_v6,
            dual,
            even_port,
            reserve_next,
        })
    }

    /// Draining (operator's drain): no new allocations here. Over its
    /// load, a fleet node sends new clients to the least loaded healthy
    /// node (300), and serves them itself when there is none.
    fn steer_away(&mut self, tuple: FiveTuple) -> Option<Reply> {
        let draining = self.shared.draining.load(std::sync::atomic::Ordering::Relaxed);
        if !draining && !self.shared.redirect.overloaded() {
            return None;
        }
        let family_v6 = tuple.server.is_ipv6();
        let alt = self.shared.redirect.target(family_v6).or_else(|| {
            self.cfg
                .alternate_servers
                .iter()
                .find(|a| a.is_ipv6() == family_v6)
                .copied()
        });
        match alt {
            Some(alt) if draining => {
                self.counters.drain_refused += 1;
                Some(Reply::TryAlternate(alt))
            }
            Some(alt) => {
                self.counters.load_redirected += 1;
                Some(Reply::TryAlternate(alt))
            }
            None if draining => {
                self.counters.drain_refused += 1;
                Some(Reply::Error(ErrorCode::InsufficientCapacity))
            }
            None => None,
        }
    }

    /// The completion of [`Command::OpenRelays`]: the allocation is made
    /// with what opened, and the Allocate is answered (drain it with
    /// [`Server::poll_transmit`]). One family failing in a dual allocation
    /// is reported with ADDRESS-ERROR-CODE (§7.2); both failing, or the
    /// only one, is an error response (440 no such family, 508 no port).
    pub fn handle_relays_opened(&mut self, now: Instant, id: AllocateId, opened: RelaysOpened) {
        let Some(p) = self.pending.remove(&id) else {
            // Not ours (any more): give back what was opened.
            for r in [Some(opened.primary), opened.additional]
                .into_iter()
                .flatten()
                .flatten()
            {
                self.commands.push_back(Command::CloseRelay { relay: r.addr });
            }
            return;
        };
        let code = |e: RelayError| match e {
            RelayError::FamilyUnsupported => ErrorCode::AddressFamilyNotSupported,
            _ => ErrorCode::InsufficientCapacity,
        };
        let family_byte = |v6: bool| if v6 { attr::FAMILY_IPV6 } else { attr::FAMILY_IPV4 };
        let mut relays: [Option<Relayed>; 2] = [None, None];
        let mut order: [Option<SocketAddr>; 2] = [None, None];
        let mut family_error = None;
        let mut token = None;
        let mut first_error = None;
        let expires = now + p.lifetime;
        for (i, (result, v6)) in [(Some(opened.primary), p.primary_v6), (opened.additional, true)]
            .into_iter()
            .enumerate()
        {
            match result {
                None => {}
                Some(Ok(o)) => {
                    let advertised = self.cfg.advertise(o.addr);
                    relays[family(o.addr)] = Some(Relayed {
                        bound: o.addr,
                        expires,
                    });
                    order[i] = Some(advertised);
                    if i == 0 {
                        token = o.token;
                    }
                }
                Some(Err(e)) => {
                    if e == RelayError::Exhausted {
                        self.counters.capacity += 1;
                    }
                    first_error.get_or_insert(code(e));
                    family_error = Some((family_byte(v6), code(e)));
                }
            }
        }
        let reply = if relays.iter().all(Option::is_none) || self.table.by_tuple.contains_key(&p.tuple) {
            for r in relays.iter().flatten() {
                self.commands.push_back(Command::CloseRelay { relay: r.bound });
            }
            self.shared.quotas.release(&p.username);
            Reply::Error(first_error.unwrap_or(ErrorCode::AllocationMismatch))
        } else {
            let user_bw = self.shared.user_bandwidth.join(&p.username);
            let alloc = Allocation {
                tuple: p.tuple,
                relays,
                username: p.username.clone(),
                txid: p.req.txid,
                token,
                family_error,
                created: now,
                expires,
                permissions: Vec::new(),
                channels: Vec::new(),
                stats: Stats::default(),
                bw_up: Bucket::new(),
                bw_down: Bucket::new(),
                fast_reserved: [0; 2],
                icmp: Bucket::new(),
                user_bw,
                tcp: p.tcp,
                tcp_conns: 0,
                dont_fragment: p.dont_fragment,
                mobility: Mobility::from_moves(p.mobility.then_some(0)),
            };
            let first = alloc.first_relayed(&self.cfg);
            let second = order.iter().flatten().copied().find(|a| *a != first);
            let idx = self.table.insert(alloc);
            if p.mobility {
                self.issue_ticket(idx, now);
            }
            self.counters.allocations_created[p.tuple.transport.index()] += 1;
            self.events.push_back(Event::AllocationCreated {
                tuple: p.tuple,
                username: p.username.clone(),
                relayed: first,
                additional: second,
                lifetime: p.lifetime,
            });
            Reply::AllocateOk {
                relayed: order,
                lifetime: p.lifetime.as_secs() as u32,
                token,
                family_error,
            }
        };
        if let Reply::Error(code) = reply {
            self.events.push_back(Event::RequestRefused {
                tuple: p.tuple,
                method: p.req.method,
                code,
                username: Some(p.username.to_string()),
                detail: None,
            });
        }
        let t = self.respond(now, p.tuple, p.req, reply, p.signer);
        let q = QueuedTransmit {
            dest: t.dest,
            data: t.data.to_vec(),
        };
        self.transmits.push_back(q);
    }

    pub(super) fn lifetime(&self, requested: Option<u32>) -> Duration {
        // RFC 8656 §7.2: a requested lifetime is honoured up to the maximum;
        // shorter than the default is raised to the default.
        match requested {
            None => self.cfg.default_lifetime,
            Some(s) => Duration::from_secs(s as u64).clamp(self.cfg.default_lifetime, self.cfg.max_lifetime),
        }
    }
}

impl PendingAllocate {
    /// Whether this Allocate came on another 5-tuple than `t`.
    pub(super) fn tuple_is_not(&self, t: &FiveTuple) -> bool {
        self.tuple != *t
    }
}
