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
//! With bandwidth caps configured nothing is installed: the user-space
//! path enforces them packet by packet.

use std::net::SocketAddr;
use std::time::Instant;

use super::io::{Command, FiveTuple};
use super::table::family;
use super::Server;

/// One fast-path entry: ChannelData on `channel` from `client` goes to
/// `peer` from `relay`, and UDP from `peer` to `relay` comes back to
/// `client` as ChannelData on `channel`, until `expires`.
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
}

impl Server {
    /// Whether entries may be installed at all.
    fn fast_path_on(&self) -> bool {
        self.cfg.fast_path && self.cfg.max_bps == 0 && self.cfg.user_max_bps == 0
    }

    /// Brings allocation `idx`'s entries in line with its channels,
    /// permissions and lifetimes: installs or replaces each live one,
    /// removes those that are gone.
    pub(super) fn sync_fast_path(&mut self, idx: u32, now: Instant) {
        if !self.fast_path_on() {
            return;
        }
        let Some(a) = self.table.get_mut(idx) else {
            return;
        };
        if a.tuple.transport.is_stream() || a.tcp {
            return;
        }
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
                });
            }
        }
        let client = a.tuple;
        // Channels held but not live (expired, in their cool-down, or
        // without a permission or relay): removing one never installed is
        // harmless, so no list of what was installed is kept.
        let gone: Vec<u16> = a
            .channels
            .iter()
            .map(|c| c.number)
            .filter(|n| !live.iter().any(|e| e.channel == *n))
            .collect();
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
        if !self.fast_path_on() || client.transport.is_stream() {
            return;
        }
        for &channel in channels {
            self.commands
                .push_back(Command::FastPathRemove { client, channel });
        }
    }

    /// What the kernel forwarded for one entry since the last report: it
    /// joins the allocation's stats (session list, logs, metrics) as if
    /// user space had relayed it.
    pub fn handle_fast_path_counts(
        &mut self,
        now: Instant,
        client: FiveTuple,
        to_peer: (u64, u64),
        from_peer: (u64, u64),
    ) {
        let Some((_, a)) = self.table.live_by_tuple(&client, now) else {
            return;
        };
        a.stats.to_peer_packets += to_peer.0;
        a.stats.to_peer_bytes += to_peer.1;
        a.stats.from_peer_packets += from_peer.0;
        a.stats.from_peer_bytes += from_peer.1;
    }
}
