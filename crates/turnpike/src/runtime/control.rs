//! The control plane's side of the workers: `Control` (sessions, delete,
//! drain, reload, stop, from signal handlers, the admin API and the
//! credential watchers), the commands and reloads it sends, the limits all
//! workers share, and the peer policy built from settings.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use mio::Waker;
use turn_core::limits::{AuthGuard, SourceCounter, SourceLimiter};
use turn_core::PeerPolicy;

use super::connections::{conn_limits, ConnLimits};
use crate::config::Settings;

/// The peer policy `settings` describe, refusing the server's own sockets.
pub(super) fn build_policy(settings: &Settings, own_sockets: &[SocketAddr]) -> PeerPolicy {
    let mut own_ips: Vec<IpAddr> = Vec::new();
    own_ips.extend(settings.relay_v4.map(IpAddr::V4));
    own_ips.extend(settings.relay_v6.map(IpAddr::V6));
    own_ips.extend(settings.external_v4.map(IpAddr::V4));
    own_ips.extend(settings.external_v6.map(IpAddr::V6));
    // Behind a wildcard listener every address of the host is a listener
    // (the policy matches these with the wildcard sockets' ports).
    if own_sockets.iter().any(|s| s.ip().is_unspecified()) {
        own_ips.extend(udp_io::local_addresses());
    }
    PeerPolicy {
        allow: settings.options.allow_peer.clone(),
        deny: settings.options.deny_peer.clone(),
        allow_wins: settings.options.peer_precedence == crate::config::PeerPrecedence::Allow,
        allow_loopback: settings.options.allow_loopback_peers,
        own_sockets: own_sockets.to_vec(),
        own_ips,
        ..PeerPolicy::default()
    }
}

/// A request from the control plane to a worker, handled in its loop
/// (never on the packet path); the answer goes back on `reply`.
#[non_exhaustive]
pub(crate) enum WorkerRequest {
    /// List this worker's allocations.
    Sessions(std::sync::mpsc::Sender<Vec<turn_core::SessionInfo>>),
    /// Delete the allocations `pick` selects; answers how many.
    Delete {
        /// Which.
        pick: Arc<dyn Fn(&turn_core::SessionInfo) -> bool + Send + Sync>,
        /// How many were deleted.
        reply: std::sync::mpsc::Sender<usize>,
    },
    /// A binary upgrade: this worker's sockets and allocations, after
    /// which it waits for the decision (see `crate::upgrade`).
    Handover(HandoverAsk),
    /// After a binary upgrade, in the new process: what the old process's
    /// kernel program relayed for this worker's allocations between the
    /// snapshot and the swap of programs, into their stats.
    FastTrailing(Vec<crate::upgrade::FastCount>),
    /// RFC 8016: a mobility Refresh another worker received for an
    /// allocation this one holds (`mobility.rs`).
    MobilityMove(super::mobility::Move),
    /// RFC 8016: the allocation another worker moved, for this one (which
    /// the client's new address reaches) to serve.
    MobilityAdopt(Box<super::mobility::Adopt>),
}

/// The fast path's part of a binary upgrade: its XDP links (interface,
/// native, link), its learned next hops' map, its totals so far.
#[derive(Default)]
pub(crate) struct FastHandover {
    pub(crate) links: Vec<(String, bool, std::os::fd::OwnedFd)>,
    pub(crate) neighbours: Option<std::os::fd::OwnedFd>,
    pub(crate) totals: [u64; 4],
}

/// The decision a paused worker waits for.
pub(crate) enum Decision {
    /// The new process serves: let the moved allocations go, after saying
    /// what the kernel relayed for them since the snapshot.
    LetGo(std::sync::mpsc::Sender<Vec<crate::upgrade::FastCount>>),
}

/// A worker paused for a binary upgrade: its part, its sockets'
/// descriptors, and where to send the decision.
pub(crate) type PausedWorker = (
    crate::upgrade::WorkerPart,
    Vec<std::os::fd::OwnedFd>,
    std::sync::mpsc::Sender<Decision>,
);

/// A binary upgrade's request to one worker: it sends its part and its
/// sockets' descriptors on `reply`, then reads nothing until `decision`
/// says the new process took over ([`Decision::LetGo`]), or is dropped
/// (serve on as before).
pub(crate) struct HandoverAsk {
    pub(crate) reply: std::sync::mpsc::Sender<(crate::upgrade::WorkerPart, Vec<std::os::fd::OwnedFd>)>,
    pub(crate) decision: std::sync::mpsc::Receiver<Decision>,
}

/// What a reload changes in every worker, published under a generation
/// number that workers compare once per loop iteration.
#[derive(Clone, Default)]
pub(super) struct Update {
    /// The whole core configuration and the shared state it goes with
    /// (reload); allocations are kept.
    pub(super) core: Option<(turn_core::Config, turn_core::Shared)>,
    /// Only the credentials (a credential store changed).
    pub(super) credentials: Option<Arc<turn_core::Credentials>>,
    pub(super) tls: Option<Arc<rustls::ServerConfig>>,
    /// The reloaded certificate for DTLS (when it can serve DTLS).
    pub(super) dtls: Option<turn_dtls::Identity>,
    pub(super) conn: Option<ConnLimits>,
}

impl Update {
    /// `newer` on top of `self`: a worker that skipped a generation still
    /// gets everything published since it last looked.
    ///
    /// The newest credentials win whichever way they came: a reload's
    /// core configuration carries the credentials merged from every source
    /// at that moment, so it replaces an older store-only update instead of
    /// having that stale copy written back into it.
    fn then(self, newer: Update) -> Update {
        let credentials = newer
            .credentials
            .or_else(|| newer.core.as_ref().map(|(c, _)| c.credentials.clone()))
            .or(self.credentials);
        let mut core = newer.core.or(self.core);
        if let (Some((c, _)), Some(creds)) = (core.as_mut(), &credentials) {
            c.credentials = creds.clone();
        }
        Update {
            core,
            credentials,
            tls: newer.tls.or(self.tls),
            dtls: newer.dtls.or(self.dtls),
            conn: newer.conn.or(self.conn),
        }
    }
}

/// What every core configuration of this server shares for its whole life:
/// the nonce secret and epoch (any worker accepts any worker's nonce), the
/// quota book, the drain switch, RFC 5780 addresses and the own sockets.
#[derive(Clone)]
pub(super) struct CoreBase {
    pub(super) nonce_secret: [u8; 32],
    pub(super) epoch: Instant,
    pub(super) unix_at_epoch: u64,
    pub(super) quotas: Arc<turn_core::limits::Quotas>,
    pub(super) draining: Arc<AtomicBool>,
    pub(super) rfc5780: Option<turn_core::Rfc5780>,
    pub(super) own_sockets: Vec<SocketAddr>,
    /// The kernel fast path is loaded: the core hands it bound channels.
    pub(super) fast_path: bool,
    /// Load-aware redirection, set by the fleet thread.
    pub(super) redirect: Arc<turn_core::Redirect>,
    /// Every allocation's relayed addresses, across workers.
    pub(super) relayed: Arc<turn_core::limits::RelayedAddrs>,
    /// Each user's bandwidth buckets, across workers (`--user-max-bps`).
    pub(super) user_bandwidth: Arc<turn_core::limits::UserBandwidth>,
}

/// The core configuration `settings` describe: the one function start-up
/// and reload both use, so a setting cannot apply at start and be forgotten
/// on reload (or the reverse).
pub(super) fn core_config(settings: &Settings, base: &CoreBase) -> turn_core::Config {
    let mut c = turn_core::Config::new(
        &settings.realm,
        Arc::new(settings.credentials.clone()),
        base.nonce_secret,
        base.epoch,
        base.unix_at_epoch,
    );
    c.software = settings.options.software.clone();
    c.legacy_channel_numbers = settings.options.rfc5766_channel_numbers;
    c.mobility = settings.options.mobility;
    c.long_realm = settings.options.allow_long_realm;
    c.max_tcp_connections = settings.options.tcp_connections_per_allocation;
    c.tcp_connect_timeout = settings.options.tcp_connect_timeout.get();
    c.policy = build_policy(settings, &base.own_sockets);
    c.external_ipv4 = settings.external_v4;
    c.external_ipv6 = settings.external_v6;
    c.nonce_lifetime = settings.options.nonce_lifetime.get();
    c.default_lifetime = settings.options.allocation_lifetime.get();
    c.max_lifetime = settings.max_allocation_lifetime;
    // One quota book for all workers: quotas are per server, not per core.
    c.max_bps = settings.options.max_bps;
    c.user_max_bps = settings.options.user_max_bps;
    c.max_allocation_bytes = settings.options.max_allocation_bytes;
    c.rfc5780 = base.rfc5780;
    c.alternate_servers = settings.options.alternate_server.clone();
    c.fast_path = base.fast_path;
    c
}

/// The live state every worker's core shares: the quota book, the set of
/// relayed addresses, the answer budget and guard in force, the drain
/// switch and the fleet's redirection view.
pub(super) fn core_shared(base: &CoreBase, limits: &SharedLimits) -> turn_core::Shared {
    turn_core::Shared {
        quotas: base.quotas.clone(),
        relayed: base.relayed.clone(),
        user_bandwidth: base.user_bandwidth.clone(),
        source_limiter: limits.answers.clone(),
        auth_guard: limits.guard.clone(),
        draining: base.draining.clone(),
        redirect: base.redirect.clone(),
    }
}

#[derive(Default)]
pub(super) struct Reloads {
    pub(super) generation: std::sync::atomic::AtomicU64,
    pub(super) latest: Mutex<Option<Update>>,
}

/// The limits every worker shares, so a source spread over many ports
/// (and so many workers) gets one budget: the unauthenticated-answer rate,
/// the brute-force guard and the per-source connection count. Touched only
/// on unauthenticated answers, authentication and connection set-up.
#[derive(Clone)]
pub(super) struct SharedLimits {
    pub(super) answers: Arc<SourceLimiter>,
    pub(super) guard: Arc<AuthGuard>,
    pub(super) connections: Arc<SourceCounter>,
}

impl SharedLimits {
    pub(super) fn new(settings: &Settings) -> Self {
        SharedLimits {
            answers: Arc::new(SourceLimiter::new(
                settings.options.rate_limit_per_ip,
                turn_core::SOURCE_SLOTS,
            )),
            guard: Arc::new(AuthGuard::new(
                settings.options.auth_fail_limit,
                turn_core::AUTH_WINDOW,
                settings.options.auth_block_secs.get(),
                turn_core::SOURCE_SLOTS,
            )),
            connections: Arc::new(SourceCounter::new(turn_core::SOURCE_SLOTS)),
        }
    }

    /// After a binary upgrade: the old process's brute-force guard goes on
    /// here (its blocks and counts, in the same slots).
    pub(super) fn continue_guard(&mut self, settings: &Settings, state: &turn_core::limits::GuardState) {
        self.guard = Arc::new(AuthGuard::restored(
            settings.options.auth_fail_limit,
            turn_core::AUTH_WINDOW,
            settings.options.auth_block_secs.get(),
            turn_core::SOURCE_SLOTS,
            state,
            Instant::now(),
        ));
    }

    /// For a reload: tables whose settings did not change are kept (their
    /// counts stay); the connection count always is.
    pub(super) fn reloaded(&self, settings: &Settings) -> Self {
        let block = settings.options.auth_block_secs.get();
        SharedLimits {
            answers: if self.answers.rate() == settings.options.rate_limit_per_ip {
                self.answers.clone()
            } else {
                Arc::new(SourceLimiter::new(
                    settings.options.rate_limit_per_ip,
                    turn_core::SOURCE_SLOTS,
                ))
            },
            guard: if self.guard.settings() == (settings.options.auth_fail_limit, block) {
                self.guard.clone()
            } else {
                Arc::new(AuthGuard::new(
                    settings.options.auth_fail_limit,
                    turn_core::AUTH_WINDOW,
                    block,
                    turn_core::SOURCE_SLOTS,
                ))
            },
            connections: self.connections.clone(),
        }
    }
}

/// The control plane's hold on a running server, from other threads
/// (signals, admin API, credential watchers): list and delete sessions,
/// drain, reload, stop.
#[derive(Clone)]
pub struct Control {
    pub(super) flag: Arc<StopFlag>,
    pub(super) wakers: Vec<Arc<Waker>>,
    pub(super) draining: Arc<AtomicBool>,
    pub(super) quotas: Arc<turn_core::limits::Quotas>,
    pub(super) reloads: Arc<Reloads>,
    pub(super) base: CoreBase,
    pub(super) commands: Vec<std::sync::mpsc::Sender<WorkerRequest>>,
    pub(super) limits: Arc<Mutex<SharedLimits>>,
    pub(super) board: crate::metrics::Board,
    /// A binary upgrade handed this process's sockets to a new one.
    pub(super) handed_over: Arc<AtomicBool>,
    /// Draining to stop (SIGTERM, or what stayed after an upgrade): the
    /// drain cannot be undone.
    pub(super) leaving: Arc<AtomicBool>,
    /// The kernel fast path, when loaded.
    pub(super) fast: Option<super::fast::Shared>,
}

impl Control {
    /// The workers' last published numbers, summed (what /metrics shows).
    pub fn totals(&self) -> crate::metrics::WorkerMetrics {
        crate::metrics::sum(&self.board).0
    }

    /// Every live allocation, from all workers.
    pub fn sessions(&self) -> Vec<turn_core::SessionInfo> {
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = self.ask(|| WorkerRequest::Sessions(tx.clone()));
        (0..asked)
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(2)).ok())
            .flatten()
            .collect()
    }

    /// Deletes the allocations `pick` selects, on every worker.
    pub fn delete_sessions(&self, pick: Arc<dyn Fn(&turn_core::SessionInfo) -> bool + Send + Sync>) -> usize {
        let (tx, rx) = std::sync::mpsc::channel();
        let asked = self.ask(|| WorkerRequest::Delete {
            pick: pick.clone(),
            reply: tx.clone(),
        });
        (0..asked)
            .filter_map(|_| rx.recv_timeout(Duration::from_secs(2)).ok())
            .sum()
    }

    /// Binary upgrade, old side: every worker's part and descriptors, each
    /// worker paused until its decision sender says (or is dropped).
    pub(crate) fn pause_for_handover(&self, timeout: Duration) -> Result<Vec<PausedWorker>> {
        let mut parts = Vec::new();
        for (tx, w) in self.commands.iter().zip(&self.wakers) {
            let (reply, from_worker) = std::sync::mpsc::channel();
            let (decide, decision) = std::sync::mpsc::channel();
            tx.send(WorkerRequest::Handover(HandoverAsk { reply, decision }))
                .map_err(|_| anyhow::anyhow!("a worker is gone"))?;
            let _ = w.wake();
            let (part, fds) = from_worker
                .recv_timeout(timeout)
                .map_err(|_| anyhow::anyhow!("a worker did not hand over its sockets"))?;
            parts.push((part, fds, decide));
        }
        Ok(parts)
    }

    /// What keeps nonces valid in another process: the secret, the Unix
    /// time at the epoch, and how long ago the epoch was.
    pub(crate) fn nonce_clock(&self) -> ([u8; 32], u64, Duration) {
        (
            self.base.nonce_secret,
            self.base.unix_at_epoch,
            self.base.epoch.elapsed(),
        )
    }

    /// Marks this process as replaced by a binary upgrade's new one: it
    /// only drains what stayed (its fleet heartbeat stops).
    pub(crate) fn set_handed_over(&self) {
        self.handed_over.store(true, Ordering::SeqCst);
    }

    /// Whether a binary upgrade replaced this process.
    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }

    /// For a binary upgrade's new process: copies of the fast path's XDP
    /// links (interface, native, link) and of its learned next hops' map;
    /// nothing when it is off; an error where the links cannot be handed
    /// over.
    pub(crate) fn fast_handover(&self) -> anyhow::Result<FastHandover> {
        let Some(fast) = &self.fast else {
            return Ok(FastHandover::default());
        };
        let f = fast.lock().unwrap_or_else(|p| p.into_inner());
        let mut links = Vec::new();
        for (iface, native, link) in f
            .links()
            .map_err(|e| anyhow::anyhow!("fast path: {e}; restart instead"))?
        {
            links.push((iface, native, link.try_clone_to_owned()?));
        }
        let neighbours = f.neighbours().map(|m| m.try_clone_to_owned()).transpose()?;
        let t = f.totals();
        Ok(FastHandover {
            links,
            neighbours,
            totals: [t.forwarded, t.matched, t.no_route, t.partial_checksum],
        })
    }

    /// The brute-force guard's failures and blocks, for a binary upgrade.
    pub(crate) fn guard_state(&self) -> turn_core::limits::GuardState {
        let limits = self.limits.lock().unwrap_or_else(|p| p.into_inner());
        limits.guard.state(Instant::now())
    }

    /// The fast path's totals so far (forwarded, matched, no route,
    /// partial checksum); zeros when it is off.
    pub(crate) fn fast_totals(&self) -> [u64; 4] {
        self.fast.as_ref().map_or([0; 4], |f| {
            let t = f.lock().unwrap_or_else(|p| p.into_inner()).totals();
            [t.forwarded, t.matched, t.no_route, t.partial_checksum]
        })
    }

    /// In a binary upgrade's new process: what the old process's kernel
    /// program relayed after the snapshot, into the stats and totals.
    pub(crate) fn fast_trailing(&self, t: crate::upgrade::Trailing) {
        if let Some(fast) = &self.fast {
            let [forwarded, matched, no_route, partial_checksum] = t.totals;
            fast.lock()
                .unwrap_or_else(|p| p.into_inner())
                .count_before(fastpath::Totals {
                    forwarded,
                    matched,
                    no_route,
                    partial_checksum,
                });
        }
        for ((counts, tx), w) in t.workers.into_iter().zip(&self.commands).zip(&self.wakers) {
            if !counts.is_empty() && tx.send(WorkerRequest::FastTrailing(counts)).is_ok() {
                let _ = w.wake();
            }
        }
    }

    /// After a failed binary upgrade: this process's XDP program back on
    /// the fast path's links, in case the new one had put its own there.
    pub(crate) fn fast_reclaim(&self) {
        if let Some(fast) = &self.fast {
            if let Err(e) = fast.lock().unwrap_or_else(|p| p.into_inner()).adopt_links() {
                tracing::error!(error = %e, "upgrade: the fast path's links could not be taken back; restart to relay in the kernel again");
            }
        }
    }

    /// Stops a drain started by SIGUSR1 or the admin API; `false` (and
    /// still draining) when the process is draining to stop.
    pub fn undrain(&self) -> bool {
        if self.is_leaving() {
            return false;
        }
        self.draining.store(false, Ordering::SeqCst);
        true
    }

    /// Drains for good: the process stops at the last allocation or the
    /// drain timeout (SIGTERM, or the old process after an upgrade).
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::SeqCst);
        self.drain();
    }

    /// Whether the process is draining to stop.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::SeqCst)
    }

    pub(super) fn ask(&self, make: impl Fn() -> WorkerRequest) -> usize {
        let mut asked = 0;
        for (tx, w) in self.commands.iter().zip(&self.wakers) {
            if tx.send(make()).is_ok() {
                asked += 1;
                let _ = w.wake();
            }
        }
        asked
    }

    /// Applies a new configuration to every worker (SIGHUP): credentials,
    /// peer policy and, when it comes from files, the TLS certificate.
    /// Existing allocations are untouched. Errors leave the old
    /// configuration in force.
    pub fn reload(&self, new: &Settings) -> Result<()> {
        let setup = match &new.tls {
            Some(src @ crate::config::TlsSource::Files { .. }) => Some(crate::tls::setup(src)?),
            // A generated certificate is kept, not regenerated.
            _ => None,
        };
        // DTLS keeps its old certificate when the new one cannot serve it
        // (an RSA key): said, not silent.
        let dtls = match setup.as_ref().map(|s| &s.dtls) {
            Some(Ok(id)) => Some(id.clone()),
            Some(Err(e)) => {
                if !new.dtls_listen.is_empty() {
                    tracing::warn!(
                        "reload: DTLS keeps its previous certificate: the new one cannot serve DTLS: {e}"
                    );
                }
                None
            }
            None => None,
        };
        let tls = setup.map(|s| s.config);
        self.quotas
            .set_limits(new.options.user_quota, new.options.total_quota);
        self.quotas.set_fleet_limit(new.options.fleet_total_quota);
        crate::metrics::set_allocation_limit(new.options.total_quota);
        let limits = {
            let mut l = self.limits.lock().unwrap_or_else(|p| p.into_inner());
            *l = l.reloaded(new);
            l.clone()
        };
        self.publish(Update {
            core: Some((core_config(new, &self.base), core_shared(&self.base, &limits))),
            credentials: None,
            tls,
            dtls,
            conn: Some(conn_limits(new)),
        });
        Ok(())
    }

    /// Replaces only the credentials in every worker (user database changes).
    pub fn set_credentials(&self, credentials: turn_core::Credentials) {
        self.publish(Update {
            credentials: Some(Arc::new(credentials)),
            ..Update::default()
        });
    }

    pub(super) fn publish(&self, update: Update) {
        {
            let mut latest = self.reloads.latest.lock().unwrap_or_else(|p| p.into_inner());
            *latest = Some(latest.take().unwrap_or_default().then(update));
        }
        self.reloads.generation.fetch_add(1, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// Starts draining: new allocations are refused (300 or 508), existing
    /// ones carry on.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the server is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Allocations held across all workers.
    pub fn allocations(&self) -> usize {
        self.quotas.total()
    }

    /// What a fleet shares: the quota book, the brute-force guard now in
    /// force (a reload may replace it) and the redirection view.
    pub fn fleet_parts(
        &self,
    ) -> (
        Arc<turn_core::limits::Quotas>,
        Arc<AuthGuard>,
        Arc<turn_core::Redirect>,
    ) {
        let guard = self
            .limits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .guard
            .clone();
        (self.quotas.clone(), guard, self.base.redirect.clone())
    }

    /// Asks every worker to close its allocations and exit.
    pub fn stop(&self) {
        self.flag.stop.store(true, Ordering::SeqCst);
        for w in &self.wakers {
            let _ = w.wake();
        }
    }

    /// As [`Control::stop`], when a drain's timeout ran out: what is still
    /// live ends with reason `drain` rather than `shutdown`.
    pub fn stop_drain_ran_out(&self) {
        self.flag.drain_ran_out.store(true, Ordering::SeqCst);
        self.stop();
    }
}

/// The workers' stop flag, and why they stopped.
#[derive(Default)]
pub(super) struct StopFlag {
    stop: AtomicBool,
    drain_ran_out: AtomicBool,
}

impl StopFlag {
    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// What the allocations live at the stop end with.
    pub(super) fn reason(&self) -> turn_core::CloseReason {
        if self.drain_ran_out.load(Ordering::SeqCst) {
            turn_core::CloseReason::Drain
        } else {
            turn_core::CloseReason::Shutdown
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credentials_update_after_a_reload_keeps_the_reload() {
        let mut creds = turn_core::Credentials::new();
        creds.add_user("alice", "r", "pw");
        let cfg = turn_core::Config::new("r", Arc::new(creds), [1; 32], Instant::now(), 0);
        let reload = Update {
            core: Some((cfg, turn_core::Shared::default())),
            conn: None,
            ..Update::default()
        };
        let mut newer = turn_core::Credentials::new();
        newer.add_user("bob", "r", "pw");
        let newer = Arc::new(newer);
        let merged = Update::default().then(reload).then(Update {
            credentials: Some(newer.clone()),
            ..Update::default()
        });
        // A worker that skipped both generations gets the reloaded core
        // with the newest credentials in it.
        let core = merged.core.expect("the reload is not lost");
        assert!(Arc::ptr_eq(&core.0.credentials, &newer));
    }

    #[test]
    fn a_reload_after_a_credentials_update_keeps_the_reload_credentials() {
        // The store watcher published first (its merge: alice)...
        let mut store = turn_core::Credentials::new();
        store.add_user("alice", "r", "pw");
        let store_update = Update {
            credentials: Some(Arc::new(store)),
            ..Update::default()
        };
        // ...then SIGHUP added carol to the file (its merge: alice, carol).
        let mut reloaded = turn_core::Credentials::new();
        reloaded.add_user("alice", "r", "pw");
        reloaded.add_user("carol", "r", "pw");
        let reloaded = Arc::new(reloaded);
        let cfg = turn_core::Config::new("r", reloaded.clone(), [1; 32], Instant::now(), 0);
        let reload = Update {
            core: Some((cfg, turn_core::Shared::default())),
            ..Update::default()
        };
        // A worker that looks after both, or only after the second, must
        // authenticate carol: the store's older copy may not come back.
        for merged in [
            Update::default().then(store_update.clone()).then(reload.clone()),
            Update::default().then(reload),
        ] {
            let core = merged.core.expect("the reload is applied");
            assert!(Arc::ptr_eq(&core.0.credentials, &reloaded));
            assert!(Arc::ptr_eq(
                &merged.credentials.expect("credentials carried"),
                &reloaded
            ));
        }
    }
}
