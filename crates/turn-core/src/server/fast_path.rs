//! What a kernel fast path may forward on its own (issue 13): the bound
//! channels of UDP allocations, each with the instant it must stop. The
//! core stays the authority: it installs an entry when a channel is bound
//! (after the peer policy), replaces it whenever the channel, the peer's
//! permission or the allocation's lifetime moves, and removes it when any
//! of them goes. An entry carries `expires`, the earliest of the three, so
//! a kernel path that checks it never forwards past a lifetime even if the
//! runtime is late. Counts from the kernel come back through
//! [`Server::handle_fast_path_counts`] into the allocation's stats.
//!
//! Bandwidth caps (`max_bps`, `user_max_bps`) hold with the fast path on:
//! the kernel forwards an entry only within a byte budget the core grants
//! out of the allocation's (and user's) token buckets. The tokens granted
//! leave the buckets at once, so user space cannot spend them a second
//! time; once a second [`Server::handle_fast_path_usage`] gives back what
//! the kernel did not use and grants again. Past its budget an entry's
//! packets reach user space, which drops them as over the cap.

use std::net::SocketAddr;
use std::time::Instant;

use super::io::{Command, FiveTuple};
use super::table::family;
use super::Server;

/// How often the runtime reports usage ([`Server::handle_fast_path_usage`]):
/// a grant covers the refill of this long.
pub(super) const GRANT_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// One fast-path entry: ChannelData on `channel` from `client` goes to
/// `peer` from `relay`, and UDP from `peer` to `relay` comes back to
/// `client` as ChannelData on `channel`, until `expires`, within `budget`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPathEntry {
    /// The client's UDP 5-tuple (`server` is the address it reached).
    pub client: FiveTuple,
    /// The channel number.
    pub channel: u16,
    /// The relay socket's bound address (the peer's family).
    pub relay: SocketAddr,
    /// The peer.
    pub peer: SocketAddr,
    /// The earliest of the channel's, the permission's and the relay's
    /// expiry: forwarding stops here whatever else happens.
    pub expires: Instant,
    /// Send to the peer with DF (the Allocate had DONT-FRAGMENT).
    pub dont_fragment: bool,
    /// How many payload bytes the kernel may forward.
    pub budget: FastPathBudget,
}

/// The bytes an entry may forward on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastPathBudget {
    /// No bandwidth caps: no limit.
    Unlimited,
    /// Caps, and no new grant with this change: what the entry may still
    /// forward stays as it was (nothing, for a new entry, until the next
    /// grant).
    Keep,
    /// Caps: this many more bytes each way, from the counts last
    /// reported to [`Server::handle_fast_path_usage`].
    Grant {
        /// Client → peer payload bytes.
        to_peer: u64,
        /// Peer → client payload bytes.
        from_peer: u64,
    },
}

impl Server {
    /// Whether entries may be installed at all.
    fn fast_path_on(&self) -> bool {
        self.cfg.fast_path
    }

    fn capped(&self) -> bool {
        self.cfg.max_bps != 0 || self.cfg.user_max_bps != 0
    }

    /// The entries allocation `idx` should have now (budgets `Keep` or
    /// `Unlimited`), and the channels it holds that are not live.
    fn fast_path_entries(&self, idx: u32, now: Instant) -> Option<(Vec<FastPathEntry>, Vec<u16>)> {
        let a = self.table.get(idx)?;
        if !a.tuple.transport.is_plain_udp() || a.tcp {
            return None;
        }
        let budget = if self.capped() {
            FastPathBudget::Keep
        } else {
            FastPathBudget::Unlimited
        };
        let mut live: Vec<FastPathEntry> = Vec::new();
        for c in a.channels.iter().filter(|c| c.expires > now) {
            let perm = a
                .permissions
                .iter()
                .find(|p| p.ip == c.peer.ip() && p.expires > now)
                .map(|p| p.expires);
            let relay = a.relays[family(c.peer)].filter(|r| r.expires > now);
            if let (Some(perm), Some(relay)) = (perm, relay) {
                live.push(FastPathEntry {
                    client: a.tuple,
                    channel: c.number,
                    relay: relay.bound,
                    peer: c.peer,
                    expires: c.expires.min(perm).min(relay.expires),
                    dont_fragment: a.dont_fragment,
                    budget,
                });
            }
        }
        // Channels held but not live (expired, in their cool-down, or
        // without a permission or relay): removing one never installed is
        // harmless, so no list of what was installed is kept.
        let gone = a
            .channels
            .iter()
            .map(|c| c.number)
            .filter(|n| !live.iter().any(|e| e.channel == *n))
            .collect();
        Some((live, gone))
    }

    /// Brings allocation `idx`'s entries in line with its channels,
    /// permissions and lifetimes: installs or replaces each live one,
    /// removes those that are gone.
    pub(super) fn sync_fast_path(&mut self, idx: u32, now: Instant) {
        if !self.fast_path_on() {
            return;
        }
        let Some((live, gone)) = self.fast_path_entries(idx, now) else {
            return;
        };
        let Some(client) = self.table.get(idx).map(|a| a.tuple) else {
            return;
        };
        for channel in gone {
            self.commands
                .push_back(Command::FastPathRemove { client, channel });
        }
        for e in live {
            self.commands.push_back(Command::FastPathInstall(e));
        }
    }

    /// The allocation of `client`, holding `channels`, is going: its
    /// entries go with it.
    pub(super) fn remove_fast_path(&mut self, client: FiveTuple, channels: &[u16]) {
        if !self.fast_path_on() || !client.transport.is_plain_udp() {
            return;
        }
        for &channel in channels {
            self.commands
                .push_back(Command::FastPathRemove { client, channel });
        }
    }

    /// What the kernel forwarded for one entry since the last report: it
    /// joins the allocation's stats (session list, logs, metrics) as if
    /// user space had relayed it. For an allocation already deleted it
    /// joins the server's totals only, and `false` says so (the runtime
    /// adds it to the deletion's log line).
    pub fn handle_fast_path_counts(
        &mut self,
        now: Instant,
        client: FiveTuple,
        to_peer: (u64, u64),
        from_peer: (u64, u64),
    ) -> bool {
        let Some((_, a)) = self.table.live_by_tuple(&client, now) else {
            self.counters.to_peer_packets += to_peer.0;
            self.counters.to_peer_bytes += to_peer.1;
            self.counters.from_peer_packets += from_peer.0;
            self.counters.from_peer_bytes += from_peer.1;
            return false;
        };
        a.stats.to_peer_packets += to_peer.0;
        a.stats.to_peer_bytes += to_peer.1;
        a.stats.from_peer_packets += from_peer.0;
        a.stats.from_peer_bytes += from_peer.1;
        true
    }

    /// Under bandwidth caps, once a second per allocation with entries:
    /// the payload bytes its entries forwarded (each way) since the last
    /// call. What was granted and not used goes back to the buckets (what
    /// was used beyond it comes off the next grant), and every live entry
    /// gets an equal share of what the buckets hold now plus, from the
    /// allocation's bucket, the refill until the next report
    /// ([`FastPathBudget::Grant`]).
    pub fn handle_fast_path_usage(&mut self, now: Instant, client: FiveTuple, to_peer: u64, from_peer: u64) {
        if !self.fast_path_on() || !self.capped() {
            return;
        }
        let Some(&idx) = self.table.by_tuple.get(&client) else {
            return;
        };
        let live = self
            .fast_path_entries(idx, now)
            .map(|(live, _)| live)
            .unwrap_or_default();
        let (max_bps, user_max_bps) = (self.cfg.max_bps, self.cfg.user_max_bps);
        let Some(a) = self.table.get_mut(idx) else {
            return;
        };
        // The user's buckets are the host's: its allocations on every
        // worker share them, each granted its part.
        let user_allocations = a.user_bw.allocations().max(1) as u64;
        let user_bw = a.user_bw.clone();
        let mut user = (user_max_bps != 0).then(|| user_bw.lock());
        let mut share = [0u64; 2];
        for (dir, used) in [to_peer, from_peer].into_iter().enumerate() {
            let reserved = std::mem::take(&mut a.fast_reserved[dir]);
            let bucket = if dir == 0 { &mut a.bw_up } else { &mut a.bw_down };
            let mut user_bucket = user.as_deref_mut().map(|u| (&mut u[dir], user_allocations));
            // What was granted and not used goes back; what was used
            // beyond it (forwarded in the instant between the runtime's
            // reading the counts and writing new budgets) comes off the
            // next grant.
            let debt = used.saturating_sub(reserved);
            if reserved > used {
                if max_bps != 0 {
                    bucket.refund(reserved - used, max_bps);
                }
                if let Some((u, _)) = user_bucket.as_mut() {
                    u.refund(reserved - used, user_max_bps);
                }
            }
            if live.is_empty() {
                continue;
            }
            // The allocation's bucket: what it holds and the next
            // second's refill, so that user space, which gets this
            // channel's packets only once the kernel's budget is spent,
            // cannot take the refill first. The user's: a share of what
            // it holds now (its other allocations refill from it too).
            let taken = if max_bps != 0 {
                bucket.reserve_ahead(now, max_bps, max_bps, GRANT_PERIOD)
            } else {
                u64::MAX
            };
            let mut avail = taken;
            if let Some((u, refs)) = user_bucket.as_mut() {
                avail = avail.min(u.available(now, user_max_bps, user_max_bps) / *refs);
            }
            let per = avail.saturating_sub(debt) / live.len() as u64;
            let total = per * live.len() as u64;
            if max_bps != 0 {
                // Taken and not granted (the debt stays spent).
                bucket.refund(taken.saturating_sub(total).saturating_sub(debt), max_bps);
            }
            if let Some((u, _)) = user_bucket.as_mut() {
                u.spend(total.saturating_add(debt));
            }
            a.fast_reserved[dir] = total;
            share[dir] = per;
        }
        for mut e in live {
            e.budget = FastPathBudget::Grant {
                to_peer: share[0],
                from_peer: share[1],
            };
            self.commands.push_back(Command::FastPathInstall(e));
        }
    }
}
