//! The allocation table: allocations (RFC 8656 §2.2, §7) with their relayed
//! addresses, permissions (§9) and channel bindings (§12), the maps that
//! find them, and their expiry timers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use stun_proto::TransactionId;

use super::events::Stats;
use super::io::FiveTuple;
use crate::limits::Bucket;

/// Tables looked up per packet are keyed by addresses a client chooses, so
/// they need a keyed hash (HashDoS), but SipHash was a third of the user
/// time on the relay path; ahash with random keys is both.
pub(super) type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// How long a channel number and peer stay reserved after the binding
/// expires (RFC 8656 §12: "not reused ... for 5 minutes").
pub(super) const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

#[derive(Debug)]
pub(super) struct Permission {
    pub(super) ip: IpAddr,
    pub(super) expires: Instant,
}

#[derive(Debug)]
pub(super) struct ChannelBinding {
    pub(super) number: u16,
    pub(super) peer: SocketAddr,
    pub(super) expires: Instant,
}

/// One relayed transport address of an allocation (one per family,
/// RFC 8656 §7.2 dual allocations), with its own lifetime (§7.3: a Refresh
/// may name one family). What the client is told is computed from the
/// bound address ([`super::Config::advertise`]), not stored: 32 bytes less
/// per family.
#[derive(Debug, Clone, Copy)]
pub(super) struct Relayed {
    /// The relay socket's bound address.
    pub(super) bound: SocketAddr,
    pub(super) expires: Instant,
}

/// 0 for IPv4, 1 for IPv6: the slot of a family in [`Allocation::relays`].
pub(super) fn family(addr: SocketAddr) -> usize {
    addr.is_ipv6() as usize
}

/// The families an allocation relays.
#[derive(Debug, Clone, Copy)]
pub(super) struct Families([bool; 2]);

impl Families {
    pub(super) fn of(a: &Allocation) -> Self {
        Families([a.relays[0].is_some(), a.relays[1].is_some()])
    }

    /// Whether a relayed address of `peer`'s family exists (RFC 8656 §9.1:
    /// else 443).
    pub(super) fn relays_to(self, peer: SocketAddr) -> bool {
        self.0[family(peer)]
    }
}

#[derive(Debug)]
pub(super) struct Allocation {
    pub(super) tuple: FiveTuple,
    /// The relayed addresses, by family (IPv4, IPv6).
    pub(super) relays: [Option<Relayed>; 2],
    pub(super) username: Arc<str>,
    pub(super) txid: TransactionId,
    /// RESERVATION-TOKEN handed out with this allocation, kept so a
    /// retransmitted Allocate gets the same answer.
    pub(super) token: Option<[u8; 8]>,
    /// ADDRESS-ERROR-CODE of the creating answer, for its retransmission.
    pub(super) family_error: Option<(u8, super::ErrorCode)>,
    pub(super) created: Instant,
    /// The latest expiry of its relayed addresses.
    pub(super) expires: Instant,
    pub(super) permissions: Vec<Permission>,
    pub(super) channels: Vec<ChannelBinding>,
    pub(super) stats: Stats,
    /// Bandwidth buckets, client→peer and peer→client.
    pub(super) bw_up: Bucket,
    pub(super) bw_down: Bucket,
    /// ICMP errors relayed (RFC 8656 §11.5), rate-limited.
    pub(super) icmp: Bucket,
    /// The user's bandwidth buckets, shared by the host's workers
    /// (`user_max_bps`).
    pub(super) user_bw: Arc<crate::limits::UserBuckets>,
    /// An RFC 6062 TCP allocation: peers are reached by connections.
    pub(super) tcp: bool,
    /// Its peer data connections (connecting, pending or bound).
    pub(super) tcp_conns: u16,
    /// The Allocate had DONT-FRAGMENT (its relay sockets set DF).
    pub(super) dont_fragment: bool,
    /// RFC 8016: whether the allocation was made with MOBILITY-TICKET, and
    /// its moves so far (a ticket names the count it was issued at, so a
    /// ticket used for a move is spent).
    pub(super) mobility: Mobility,
    /// Bytes granted to the kernel fast path under bandwidth caps,
    /// client→peer and peer→client, taken from the buckets until it
    /// reports what it used (`fast_path.rs`).
    pub(super) fast_reserved: [u64; 2],
}

/// An allocation's mobility (RFC 8016) in two bytes: 0 without it, else
/// one more than its moves so far (wrapping past 65,534 moves).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Mobility(u16);

impl Mobility {
    /// With mobility, after `moves` moves (`None`: without).
    pub(super) fn from_moves(moves: Option<u16>) -> Mobility {
        Mobility(moves.map_or(0, |m| (m % u16::MAX) + 1))
    }

    /// Its moves so far, if it has mobility.
    pub(super) fn moves(self) -> Option<u16> {
        self.0.checked_sub(1)
    }

    /// One more move.
    pub(super) fn moved(self) -> Mobility {
        Mobility::from_moves(self.moves().map(|m| m.wrapping_add(1)))
    }
}

impl Allocation {
    /// Live: RFC 8656 §7 — nothing relays on, refreshes or answers for an
    /// allocation past its lifetime, even before the timer sweeps it.
    pub(super) fn is_live(&self, now: Instant) -> bool {
        self.expires > now
    }

    /// The live relayed address of `peer`'s family, if any (§9: a peer is
    /// reached through the relay of its own family).
    pub(super) fn relay_for(&self, peer: SocketAddr, now: Instant) -> Option<&Relayed> {
        self.relays[family(peer)].as_ref().filter(|r| r.expires > now)
    }

    /// The relayed addresses the client was told, IPv4 before IPv6 (the
    /// order of the Allocate answer: IPv4 is the default family).
    pub(super) fn advertised(&self, cfg: &super::Config) -> [Option<SocketAddr>; 2] {
        let mut out = [None, None];
        for (n, r) in self.relays.iter().flatten().enumerate() {
            out[n] = Some(cfg.advertise(r.bound));
        }
        out
    }

    /// The first advertised relayed address, for logs and lists.
    pub(super) fn first_relayed(&self, cfg: &super::Config) -> SocketAddr {
        self.advertised(cfg)[0].unwrap_or(self.tuple.server)
    }

    pub(super) fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.iter().any(|p| p.ip == ip && p.expires > now)
    }

    pub(super) fn install_permission(&mut self, ip: IpAddr, expires: Instant) {
        match self.permissions.iter_mut().find(|p| p.ip == ip) {
            Some(p) => p.expires = expires,
            None => self.permissions.push(Permission { ip, expires }),
        }
    }

    pub(super) fn purge(&mut self, now: Instant) {
        self.permissions.retain(|p| p.expires > now);
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
    }

    pub(super) fn recompute_expiry(&mut self) {
        if let Some(t) = self.relays.iter().flatten().map(|r| r.expires).max() {
            self.expires = t;
        }
    }
}

/// A slab of allocations with the maps that find them.
#[derive(Debug, Default)]
pub(super) struct Table {
    /// The host-wide set of relayed addresses, kept with `by_relay`.
    relayed: std::sync::Arc<crate::limits::RelayedAddrs>,
    allocs: Vec<Option<Allocation>>,
    free: Vec<u32>,
    pub(super) by_tuple: FastMap<FiveTuple, u32>,
    pub(super) by_relay: FastMap<SocketAddr, u32>,
    /// Lazy min-heap of (deadline, slot): entries may be stale.
    pub(super) timers: BinaryHeap<Reverse<(Instant, u32)>>,
}

impl Table {
    /// An empty table that keeps `relayed` (host-wide) up to date.
    pub(super) fn new(relayed: std::sync::Arc<crate::limits::RelayedAddrs>) -> Self {
        Table {
            relayed,
            ..Table::default()
        }
    }

    pub(super) fn insert(&mut self, alloc: Allocation) -> u32 {
        let tuple = alloc.tuple;
        let bound: Vec<SocketAddr> = alloc.relays.iter().flatten().map(|r| r.bound).collect();
        let expires = alloc.expires;
        let idx = match self.free.pop() {
            Some(i) => {
                self.allocs[i as usize] = Some(alloc);
                i
            }
            None => {
                self.allocs.push(Some(alloc));
                (self.allocs.len() - 1) as u32
            }
        };
        self.by_tuple.insert(tuple, idx);
        for b in bound {
            self.by_relay.insert(b, idx);
            self.relayed.insert(b);
        }
        self.schedule(expires, idx);
        idx
    }

    /// Wakes `handle_timeout` for slot `idx` at `at`. The heap is lazy (a
    /// deleted allocation's or a refreshed one's old deadline stays until
    /// it comes), so it is rebuilt from the live allocations once it holds
    /// more than twice as many entries as they need: otherwise a client
    /// that allocates and deletes, or refreshes, in a loop would grow it by
    /// an entry each time for a whole lifetime (24 bytes × rate × 10 min).
    pub(super) fn schedule(&mut self, at: Instant, idx: u32) {
        self.timers.push(Reverse((at, idx)));
        if self.timers.len() > 2 * self.by_tuple.len() + 1024 {
            let mut live = Vec::with_capacity(2 * self.by_tuple.len());
            for (i, a) in self.allocs.iter().enumerate() {
                let Some(a) = a else {
                    continue;
                };
                live.push(Reverse((a.expires, i as u32)));
                for r in a.relays.iter().flatten() {
                    if r.expires < a.expires {
                        live.push(Reverse((r.expires, i as u32)));
                    }
                }
            }
            self.timers = BinaryHeap::from(live);
        }
    }

    pub(super) fn remove(&mut self, idx: u32) -> Option<Allocation> {
        let a = self.allocs.get_mut(idx as usize)?.take()?;
        self.free.push(idx);
        self.by_tuple.remove(&a.tuple);
        for r in a.relays.iter().flatten() {
            self.by_relay.remove(&r.bound);
            self.relayed.remove(&r.bound);
        }
        Some(a)
    }

    /// Allocation `idx` answers on `to` from now on (RFC 8016: its client
    /// moved).
    pub(super) fn retuple(&mut self, idx: u32, to: FiveTuple) {
        let Some(a) = self.allocs.get_mut(idx as usize).and_then(Option::as_mut) else {
            return;
        };
        self.by_tuple.remove(&a.tuple);
        a.tuple = to;
        self.by_tuple.insert(to, idx);
    }

    /// One relay of an allocation closed (a family of a dual allocation).
    pub(super) fn remove_relay(&mut self, relay: &SocketAddr) {
        self.by_relay.remove(relay);
        self.relayed.remove(relay);
    }

    pub(super) fn get(&self, idx: u32) -> Option<&Allocation> {
        self.allocs.get(idx as usize)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, idx: u32) -> Option<&mut Allocation> {
        self.allocs.get_mut(idx as usize)?.as_mut()
    }

    /// The allocation in slot `idx` if it is still live at `now`: the one
    /// accessor every relay, refresh and request path goes through.
    pub(super) fn get_live(&mut self, idx: u32, now: Instant) -> Option<&mut Allocation> {
        self.get_mut(idx).filter(|a| a.is_live(now))
    }

    /// The live allocation of a 5-tuple, with its slot.
    pub(super) fn live_by_tuple(
        &mut self,
        tuple: &FiveTuple,
        now: Instant,
    ) -> Option<(u32, &mut Allocation)> {
        let idx = *self.by_tuple.get(tuple)?;
        self.get_live(idx, now).map(|a| (idx, a))
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &Allocation> {
        self.allocs.iter().flatten()
    }

    pub(super) fn len(&self) -> usize {
        self.by_tuple.len()
    }
}
