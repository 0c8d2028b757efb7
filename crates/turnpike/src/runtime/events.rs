//! A worker's session events (`crate::events`): the core's events turned
//! into start and end records, each live allocation's usage every
//! `--events-interim`, and authentication failures and lockouts. Every
//! record goes through `--redact` like the logs.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tracing::warn;
use turn_core::{ErrorCode, Event, FiveTuple};

use super::worker::Worker;
use crate::events::{Emitter, Usage};

/// What an allocation's later records repeat.
struct Live {
    id: String,
    started_ms: u64,
    user: String,
    client: String,
    peers: usize,
    /// As given to the client (the first of a dual allocation).
    relayed: std::net::SocketAddr,
}

/// A worker's events state.
pub(super) struct EventsPlane {
    emitter: Emitter,
    interim: Duration,
    next_interim: Instant,
    live: HashMap<FiveTuple, Live, ahash::RandomState>,
}

impl EventsPlane {
    pub(super) fn new(emitter: Emitter, interim: Duration) -> EventsPlane {
        EventsPlane {
            emitter,
            interim,
            next_interim: Instant::now() + interim,
            live: HashMap::default(),
        }
    }
}

impl Worker {
    /// The record(s) one core event makes, before the event is logged.
    pub(super) fn event_records(&mut self, ev: &Event) {
        let Some(plane) = self.events.as_mut() else {
            return;
        };
        let r = &self.redact;
        match ev {
            Event::AllocationCreated {
                tuple,
                username,
                relayed,
                additional,
                lifetime,
            } => {
                let live = Live {
                    id: plane.emitter.allocation_id(self.id),
                    started_ms: crate::events::unix_ms(),
                    user: r.show(username),
                    client: r.show(&tuple.client),
                    peers: 0,
                    relayed: *relayed,
                };
                let relayed: Vec<_> = std::iter::once(*relayed).chain(*additional).collect();
                plane.emitter.emit(
                    "allocation.start",
                    crate::events::start_record(
                        &live.id,
                        &live.user,
                        tuple.transport.as_str(),
                        &live.client,
                        tuple.server,
                        &relayed,
                        *lifetime,
                    ),
                );
                plane.live.insert(*tuple, live);
            }
            Event::AllocationDeleted {
                tuple,
                username,
                relayed,
                reason,
                stats,
                age,
            } => {
                let fast = self.fast.closed.get(tuple);
                // RFC 6062: the bytes of the allocation's data connections.
                let [tcp_to, tcp_from] = self.pairs.bytes_of(*tuple);
                let usage = Usage {
                    packets_to_peers: stats.to_peer_packets + fast.map_or(0, |c| c.to_peer_packets),
                    bytes_to_peers: stats.to_peer_bytes + fast.map_or(0, |c| c.to_peer_bytes) + tcp_to,
                    packets_from_peers: stats.from_peer_packets + fast.map_or(0, |c| c.from_peer_packets),
                    bytes_from_peers: stats.from_peer_bytes
                        + fast.map_or(0, |c| c.from_peer_bytes)
                        + tcp_from,
                };
                // One taken over at a binary upgrade from a process that
                // did not hand its record state over (older, or events
                // off there) has no start record here.
                let live = plane.live.remove(tuple).unwrap_or_else(|| Live {
                    id: plane.emitter.allocation_id(self.id),
                    started_ms: crate::events::unix_ms().saturating_sub(age.as_millis() as u64),
                    user: r.show(username),
                    client: r.show(&tuple.client),
                    peers: 0,
                    relayed: *relayed,
                });
                let mut v = json!({
                    "allocation": live.id,
                    "user": live.user,
                    "transport": tuple.transport.as_str(),
                    "client": live.client,
                    "server": tuple.server.to_string(),
                    "relayed": [relayed.to_string()],
                    "started_ms": live.started_ms,
                    "duration_s": age.as_secs_f64(),
                    "peers": live.peers,
                    "reason": reason.label(),
                });
                if let Value::Object(m) = &mut v {
                    usage.fields(m);
                }
                plane.emitter.emit("allocation.end", v);
            }
            Event::AllocationMoved { from, to, .. } => {
                if let Some(mut live) = plane.live.remove(from) {
                    live.client = r.show(&to.client);
                    plane.live.insert(*to, live);
                }
            }
            Event::AuthBlocked { client, username } => plane.emitter.emit(
                "auth.blocked",
                json!({ "client": r.show(client), "user": r.show(username) }),
            ),
            Event::RequestRefused {
                tuple,
                code: ErrorCode::Unauthorized,
                username,
                ..
            } => plane.emitter.emit(
                "auth.failure",
                json!({
                    "client": r.show(&tuple.client),
                    "transport": tuple.transport.as_str(),
                    "user": username.as_deref().map(|u| r.show(&u)),
                }),
            ),
            _ => {}
        }
    }

    /// Old side of a binary upgrade: what each allocation's records
    /// repeat, for the new process.
    pub(super) fn records_to_hand_over(&self) -> Vec<crate::events::MovedRecord> {
        let Some(plane) = self.events.as_ref() else {
            return Vec::new();
        };
        plane
            .live
            .values()
            .map(|l| crate::events::MovedRecord {
                relayed: l.relayed,
                id: l.id.clone(),
                started_ms: l.started_ms,
                user: l.user.clone(),
                client: l.client.clone(),
                peers: l.peers,
            })
            .collect()
    }

    /// New side, after the allocations are restored: each one's record
    /// state, found by its relayed address, so its interim and end
    /// records continue those of the old process. One the restore left
    /// out (`lost`: indexes into `snap`) was forgotten by the old process
    /// without an end: its record ends here, reason `expired` if its
    /// lifetime ran out on the way, else `error`, with the usage the
    /// snapshot carried.
    pub(super) fn adopt_records(
        &mut self,
        now: Instant,
        moved: Vec<crate::events::MovedRecord>,
        snap: &turn_core::snapshot::Snapshot,
        lost: &[usize],
    ) {
        let lost: Vec<(&turn_core::snapshot::AllocationState, std::net::SocketAddr, bool)> = lost
            .iter()
            .filter_map(|&n| snap.allocations.get(n))
            .filter_map(|a| {
                // As the old process named it: the first family's, advertised.
                let first = a.relays.iter().min_by_key(|r| r.bound.is_ipv6())?;
                let expired = a.relays.iter().all(|r| r.expires_in_ms == 0);
                Some((a, self.core.config().advertise(first.bound), expired))
            })
            .collect();
        for (a, relayed, expired) in &lost {
            warn!(
                client = %self.redact.show(&a.client),
                relayed = %relayed,
                reason = if *expired { "expired" } else { "error" },
                "upgrade: an allocation was not taken over (its lifetime ran out on the way, or this process has no such listener)"
            );
        }
        if moved.is_empty() {
            return;
        }
        let sessions = self.core.sessions(now);
        let Some(plane) = self.events.as_mut() else {
            return;
        };
        let mut by_relayed: HashMap<std::net::SocketAddr, crate::events::MovedRecord> =
            moved.into_iter().map(|m| (m.relayed, m)).collect();
        for s in sessions {
            if let Some(m) = by_relayed.remove(&s.relayed) {
                plane.live.insert(
                    s.tuple,
                    Live {
                        id: m.id,
                        started_ms: m.started_ms,
                        user: m.user,
                        client: m.client,
                        peers: m.peers,
                        relayed: m.relayed,
                    },
                );
            }
        }
        for (a, relayed, expired) in lost {
            let Some(m) = by_relayed.remove(&relayed) else {
                continue;
            };
            let usage = Usage {
                packets_to_peers: a.stats.to_peer_packets,
                bytes_to_peers: a.stats.to_peer_bytes,
                packets_from_peers: a.stats.from_peer_packets,
                bytes_from_peers: a.stats.from_peer_bytes,
            };
            let mut v = json!({
                "allocation": m.id,
                "user": m.user,
                "transport": a.transport.as_str(),
                "client": m.client,
                "server": a.server.to_string(),
                "relayed": [relayed.to_string()],
                "started_ms": m.started_ms,
                "duration_s": Duration::from_millis(a.age_ms).as_secs_f64(),
                "peers": m.peers,
                "reason": if expired { "expired" } else { "error" },
            });
            if let Value::Object(o) = &mut v {
                usage.fields(o);
            }
            plane.emitter.emit("allocation.end", v);
        }
    }

    /// Every `--events-interim`: each live allocation's usage so far.
    pub(super) fn interim_records(&mut self, now: Instant) {
        let Some(plane) = self.events.as_mut() else {
            return;
        };
        if plane.interim.is_zero() || now < plane.next_interim {
            return;
        }
        plane.next_interim = now + plane.interim;
        let rfc6062 = self.pairs.bytes_by_control();
        for s in self.core.sessions(now) {
            let Some(live) = plane.live.get_mut(&s.tuple) else {
                continue;
            };
            live.peers = live.peers.max(s.permissions);
            let [tcp_to, tcp_from] = rfc6062.get(&s.tuple).copied().unwrap_or_default();
            let usage = Usage {
                packets_to_peers: s.stats.to_peer_packets,
                bytes_to_peers: s.stats.to_peer_bytes + tcp_to,
                packets_from_peers: s.stats.from_peer_packets,
                bytes_from_peers: s.stats.from_peer_bytes + tcp_from,
            };
            let mut v = json!({
                "allocation": live.id,
                "user": live.user,
                "transport": s.tuple.transport.as_str(),
                "client": live.client,
                "server": s.tuple.server.to_string(),
                "relayed": s.relayed_all.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "started_ms": live.started_ms,
                "duration_s": s.age.as_secs_f64(),
                "peers": live.peers,
            });
            if let Value::Object(m) = &mut v {
                usage.fields(m);
            }
            plane.emitter.emit("allocation.interim", v);
        }
    }
}
