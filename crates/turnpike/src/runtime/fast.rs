//! The kernel fast path in the runtime (`--fast-path`): which interfaces
//! it runs on, loading it at start (or saying why not), carrying the
//! core's fast-path commands into its maps, and feeding what the kernel
//! forwarded back into the core's per-allocation stats once a second.
//! The program and its maps are the `fastpath` crate's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::os::fd::OwnedFd;

use anyhow::{bail, Context, Result};
use fastpath::{Counts, Entry, FastPath};
use tracing::warn;
use turn_core::{FastPathBudget, FastPathEntry, FiveTuple};

use super::worker::Worker;
use crate::config::{FastPathMode, Settings};
use crate::upgrade::{FastCount, Handover};

/// The loaded program, shared by the workers (touched when a channel is
/// bound, refreshed or removed, and once a second for counts; never per
/// packet).
pub(super) type Shared = Arc<Mutex<FastPath>>;

/// What start-up found.
pub(crate) enum State {
    /// `--fast-path off`.
    Off,
    /// `auto`, and it could not load: why.
    Unavailable(String),
    /// Loaded, on these interfaces (native XDP or generic); why IPv6
    /// channels stay in user space, if they do; where next hops come from.
    Active(Shared, Vec<(String, bool)>, Option<String>, String),
}

impl State {
    /// For the start-up summary.
    pub(crate) fn describe(&self) -> String {
        match self {
            State::Off => "off".into(),
            State::Unavailable(why) => format!("unavailable ({why}); relaying in user space"),
            State::Active(_, ifaces, no_v6, next_hops) => {
                let list: Vec<String> = ifaces
                    .iter()
                    .map(|(n, native)| format!("{n} ({})", if *native { "native" } else { "generic" }))
                    .collect();
                match no_v6 {
                    None => format!("on: {}; IPv4 and IPv6; next hops: {next_hops}", list.join(", ")),
                    Some(why) => format!(
                        "on: {}; IPv4 only, IPv6 in user space ({why}); next hops: {next_hops}",
                        list.join(", ")
                    ),
                }
            }
        }
    }
}

/// The non-loopback interfaces that hold one of the listen addresses (all
/// with an address of the family, for a wildcard listener).
fn interfaces_for(listen: &[SocketAddr]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for (name, ip, loopback) in udp_io::interface_addresses() {
        if loopback {
            continue;
        }
        let wanted = listen
            .iter()
            .any(|l| l.ip() == ip || (l.ip().is_unspecified() && l.is_ipv4() == ip.is_ipv4()));
        if wanted && !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// A binary upgrade's fast path: the old process's XDP links (interface,
/// native, link) and what it counted.
#[derive(Default)]
pub(super) struct Handed {
    links: Vec<(String, bool, OwnedFd)>,
    neighbours: Option<OwnedFd>,
    totals: [u64; 4],
}

impl Handed {
    /// The links' descriptors, next in the hand-over's order.
    pub(super) fn take(h: &Handover, fds: &mut impl Iterator<Item = OwnedFd>) -> Result<Handed> {
        let mut links = Vec::new();
        for (iface, native) in &h.fast_links {
            let fd = fds
                .next()
                .context("a fast-path link the hand-over announced is missing")?;
            links.push((iface.clone(), *native, fd));
        }
        let neighbours = match h.fast_neighbours {
            true => Some(
                fds.next()
                    .context("the fast path's next hops the hand-over announced are missing")?,
            ),
            false => None,
        };
        Ok(Handed {
            links,
            neighbours,
            totals: h.fast_totals,
        })
    }
}

/// Loads the fast path as `--fast-path` says: attached to its interfaces,
/// or after a binary upgrade loaded onto the old process's links (which
/// keep running the old program until `FastPath::adopt_links`).
pub(super) fn start(settings: &Settings, listen: &[SocketAddr], handed: Handed) -> Result<State> {
    if settings.options.fast_path == FastPathMode::Off {
        // (The old process's links close with it.)
        return Ok(State::Off);
    }
    let ifaces = if settings.options.fast_path_interface.is_empty() {
        interfaces_for(listen)
    } else {
        settings.options.fast_path_interface.clone()
    };
    let loaded = if ifaces.is_empty() {
        Err(fastpath::Error::Kernel(
            "no non-loopback interface holds a listen address (name one with --fast-path-interface)".into(),
        ))
    } else if handed.links.is_empty() {
        FastPath::load(&ifaces)
    } else {
        let running: Vec<&String> = handed.links.iter().map(|(i, ..)| i).collect();
        if running.len() != ifaces.len() || !ifaces.iter().all(|i| running.contains(&i)) {
            bail!("fast-path runs on {running:?} and would run on {ifaces:?}: a binary upgrade keeps the running interfaces; restart to change them");
        }
        let [forwarded, matched, no_route, partial_checksum] = handed.totals;
        FastPath::load_onto(handed.links, handed.neighbours).map(|mut f| {
            f.count_before(fastpath::Totals {
                forwarded,
                matched,
                no_route,
                partial_checksum,
            });
            f
        })
    };
    match loaded {
        Ok(f) => {
            let on = f.interfaces().to_vec();
            let no_v6 = f.ipv6_unavailable().map(str::to_owned);
            let next_hops = f.next_hops().to_owned();
            Ok(State::Active(Arc::new(Mutex::new(f)), on, no_v6, next_hops))
        }
        Err(e) if settings.options.fast_path == FastPathMode::On => {
            bail!("fast-path: on, but it cannot load: {e} (run as root on Linux with XDP, or use --fast-path auto)")
        }
        Err(e) => Ok(State::Unavailable(e.to_string())),
    }
}

/// A worker's part of the fast path: the loaded program (shared), the
/// entries this worker installed and the counts last fed to the core.
pub(super) struct FastPlane {
    pub(super) shared: Option<Shared>,
    pub(super) entries: HashMap<(FiveTuple, u16), (Entry, Counts)>,
    /// Counts of removed entries, for the core.
    pub(super) final_counts: Vec<(FiveTuple, Counts)>,
    /// Payload bytes forwarded per allocation since the last budget
    /// report (bandwidth caps), removed entries' included.
    usage: HashMap<FiveTuple, (u64, u64)>,
    /// Counts of entries whose allocation was already deleted, for its
    /// deletion's log line.
    pub(super) closed: HashMap<FiveTuple, Counts>,
}

fn delta(now: Counts, before: Counts) -> Counts {
    Counts {
        to_peer_packets: now.to_peer_packets.saturating_sub(before.to_peer_packets),
        to_peer_bytes: now.to_peer_bytes.saturating_sub(before.to_peer_bytes),
        from_peer_packets: now.from_peer_packets.saturating_sub(before.from_peer_packets),
        from_peer_bytes: now.from_peer_bytes.saturating_sub(before.from_peer_bytes),
    }
}

fn add(a: &mut Counts, b: Counts) {
    a.to_peer_packets += b.to_peer_packets;
    a.to_peer_bytes += b.to_peer_bytes;
    a.from_peer_packets += b.from_peer_packets;
    a.from_peer_bytes += b.from_peer_bytes;
}

impl FastPlane {
    pub(super) fn new(shared: Option<Shared>) -> Self {
        FastPlane {
            shared,
            entries: HashMap::new(),
            final_counts: Vec::new(),
            usage: HashMap::new(),
            closed: HashMap::new(),
        }
    }

    fn note_usage(&mut self, client: FiveTuple, d: Counts) {
        let u = self.usage.entry(client).or_default();
        u.0 += d.to_peer_bytes;
        u.1 += d.from_peer_bytes;
    }
}

impl FastPlane {
    /// Carries out the core's `FastPathInstall`.
    pub(super) fn install(&mut self, e: FastPathEntry) {
        let Some(shared) = &self.shared else {
            return;
        };
        let key = (e.client, e.channel);
        let old = self.entries.get(&key);
        // Byte limits are absolute on the kernel's counters; a grant
        // counts from what was last read of them.
        let (to_peer_limit, from_peer_limit) = match e.budget {
            FastPathBudget::Unlimited => (u64::MAX, u64::MAX),
            FastPathBudget::Keep => old.map_or((0, 0), |(o, _)| (o.to_peer_limit, o.from_peer_limit)),
            FastPathBudget::Grant { to_peer, from_peer } => {
                let last = old.map(|(_, c)| *c).unwrap_or_default();
                (
                    last.to_peer_bytes.saturating_add(to_peer),
                    last.from_peer_bytes.saturating_add(from_peer),
                )
            }
        };
        let entry = Entry {
            client: e.client.client,
            server: e.client.server,
            channel: e.channel,
            relay: e.relay,
            peer: e.peer,
            expires_ns: fastpath::kernel_time(e.expires),
            dont_fragment: e.dont_fragment,
            to_peer_limit,
            from_peer_limit,
        };
        let r = shared.lock().unwrap_or_else(|p| p.into_inner()).install(&entry);
        match r {
            Ok(()) => {
                self.entries
                    .entry(key)
                    .and_modify(|(old, _)| *old = entry)
                    .or_insert((entry, Counts::default()));
            }
            // IPv6 where the interfaces do not forward it (the start-up
            // summary said so), or mixed families: the channel stays in
            // user space.
            Err(fastpath::Error::Unsupported(_)) => {}
            Err(err) => {
                warn!(error = %err, "fast path: an entry was not installed; its channel stays in user space")
            }
        }
    }

    /// What the kernel relayed for each entry since the last read, as a
    /// binary upgrade's trailing counts (this process's program is off
    /// the links by then, so they are final).
    pub(super) fn since_last_read(&self) -> Vec<FastCount> {
        let Some(shared) = &self.shared else {
            return Vec::new();
        };
        let f = shared.lock().unwrap_or_else(|p| p.into_inner());
        self.entries
            .iter()
            .map(|((client, channel), (entry, last))| {
                let d = delta(f.counts(entry), *last);
                FastCount {
                    transport: client.transport,
                    client: client.client,
                    server: client.server,
                    channel: *channel,
                    counts: [
                        d.to_peer_packets,
                        d.to_peer_bytes,
                        d.from_peer_packets,
                        d.from_peer_bytes,
                    ],
                }
            })
            .filter(|c| c.counts != [0; 4])
            .collect()
    }

    /// Carries out the core's `FastPathRemove`.
    pub(super) fn remove(&mut self, client: FiveTuple, channel: u16) {
        let (Some(shared), Some((entry, last))) = (&self.shared, self.entries.remove(&(client, channel)))
        else {
            return;
        };
        let c = shared.lock().unwrap_or_else(|p| p.into_inner()).remove(&entry);
        let d = delta(c, last);
        self.note_usage(client, d);
        self.final_counts.push((client, d));
    }
}

impl Worker {
    /// A binary upgrade's trailing counts (the old process's program
    /// relayed them after the snapshot) into the allocations' stats; the
    /// old process's listener ids differ, so an entry is found by its
    /// addresses and channel.
    pub(super) fn fast_trailing(&mut self, now: Instant, counts: Vec<FastCount>) {
        for c in counts {
            let found = self.fast.entries.keys().find(|(t, ch)| {
                t.transport == c.transport && t.client == c.client && t.server == c.server && *ch == c.channel
            });
            if let Some((tuple, _)) = found.copied() {
                let [tp, tb, fp, fb] = c.counts;
                self.core.handle_fast_path_counts(now, tuple, (tp, tb), (fp, fb));
            }
        }
        self.drive_core(now);
    }

    /// What the kernel forwarded since the last look, into the core's
    /// stats (session list, logs, metrics); once a second (`all`, which
    /// also reports usage for the bandwidth caps' budgets), and for each
    /// removed entry.
    pub(super) fn fast_counts(&mut self, now: Instant, all: bool) {
        let Some(shared) = self.fast.shared.clone() else {
            return;
        };
        let mut deltas = std::mem::take(&mut self.fast.final_counts);
        if all {
            let f = shared.lock().unwrap_or_else(|p| p.into_inner());
            let plane = &mut self.fast;
            for ((client, _), (entry, last)) in plane.entries.iter_mut() {
                let c = f.counts(entry);
                let d = delta(c, *last);
                deltas.push((*client, d));
                *last = c;
                let u = plane.usage.entry(*client).or_default();
                u.0 += d.to_peer_bytes;
                u.1 += d.from_peer_bytes;
            }
            if self.id == 0 {
                let t = f.totals();
                use std::sync::atomic::Ordering::Relaxed;
                crate::metrics::FAST_PATH_PACKETS.store(t.forwarded, Relaxed);
                crate::metrics::FAST_PATH_NO_ROUTE.store(t.no_route, Relaxed);
                crate::metrics::FAST_PATH_CHECKSUM_OFFLOAD.store(t.partial_checksum, Relaxed);
                crate::metrics::FAST_PATH_ENTRIES.store(f.len() as u64, Relaxed);
            }
        }
        for (client, d) in deltas {
            if d != Counts::default()
                && !self.core.handle_fast_path_counts(
                    now,
                    client,
                    (d.to_peer_packets, d.to_peer_bytes),
                    (d.from_peer_packets, d.from_peer_bytes),
                )
            {
                add(self.fast.closed.entry(client).or_default(), d);
            }
        }
        if all {
            for (client, (up, down)) in std::mem::take(&mut self.fast.usage) {
                self.core.handle_fast_path_usage(now, client, up, down);
            }
            self.drive_core(now);
        }
    }
}
