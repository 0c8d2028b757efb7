//! The worker's side of the control plane: the configuration it takes on
//! reload, the requests it answers (sessions, deletions), the numbers it
//! publishes for the metrics endpoint, and the stop flag.

use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::Instant;

use super::control::{Reloads, WorkerRequest};
use super::worker::Worker;

/// What links a worker to the control plane.
pub(super) struct ControlLink {
    pub(super) stop: Arc<super::control::StopFlag>,
    reloads: Arc<Reloads>,
    /// The reload generation this worker has taken.
    seen_generation: u64,
    board: crate::metrics::Board,
    commands: Receiver<WorkerRequest>,
    /// Every worker's request channel and waker (this one's included).
    pub(super) peers: Vec<(std::sync::mpsc::Sender<WorkerRequest>, Arc<mio::Waker>)>,
}

impl ControlLink {
    pub(super) fn new(
        stop: Arc<super::control::StopFlag>,
        reloads: Arc<Reloads>,
        board: crate::metrics::Board,
        commands: Receiver<WorkerRequest>,
        peers: Vec<(std::sync::mpsc::Sender<WorkerRequest>, Arc<mio::Waker>)>,
    ) -> Self {
        ControlLink {
            stop,
            reloads,
            seen_generation: 0,
            board,
            commands,
            peers,
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.stopping()
    }
}

impl Worker {
    /// Answers the control plane's requests.
    pub(super) fn handle_commands(&mut self, now: Instant) {
        while let Ok(cmd) = self.control.commands.try_recv() {
            match cmd {
                WorkerRequest::Sessions(reply) => {
                    let mut list = self.core.sessions(now);
                    // The bytes of TCP relays are counted where they move.
                    for s in &mut list {
                        self.pairs.fill_bytes(&mut s.tcp_connections);
                    }
                    let _ = reply.send(list);
                }
                WorkerRequest::Delete { pick, reply } => {
                    let n = self.core.delete_sessions(now, &*pick);
                    self.drive_core(now);
                    let _ = reply.send(n);
                }
                WorkerRequest::Handover(ask) => self.hand_over(now, ask),
                WorkerRequest::FastTrailing(counts) => self.fast_trailing(now, counts),
                WorkerRequest::MobilityMove(m) => self.mobility_move(now, m),
                WorkerRequest::MobilityAdopt(m) => self.mobility_adopt(now, m),
            }
        }
    }

    /// `--metrics-per-user`: this worker's live allocations by user (a REST
    /// username counts as its ID), `--redact`ed as in the logs.
    fn user_usage(&self, now: Instant) -> Vec<crate::metrics::UserUsage> {
        if self.per_user == 0 {
            return Vec::new();
        }
        let mut by: std::collections::HashMap<String, (u32, u64)> = std::collections::HashMap::new();
        for s in self.core.sessions(now) {
            let user = self.redact.show(&crate::metrics::user_of(&s.username));
            let e = by.entry(user).or_default();
            e.0 += 1;
            e.1 += s.stats.to_peer_bytes + s.stats.from_peer_bytes;
        }
        by.into_iter()
            .map(|(user, (allocations, bytes))| crate::metrics::UserUsage {
                user: user.into(),
                allocations,
                bytes,
            })
            .collect()
    }

    /// Publishes this worker's numbers for the metrics endpoint (once a
    /// second: one short lock, never on the packet path).
    pub(super) fn publish_metrics(&mut self, now: Instant) {
        let (permissions, channels) = self.core.permissions_and_channels(now);
        let m = crate::metrics::WorkerMetrics {
            core: self.core.counters(),
            allocations: self.core.allocations_by_transport(),
            permissions,
            channels,
            connections: self.io.conn_by_tuple.len(),
            tls_handshakes: self.streams.tls_handshakes,
            tls_failures: self.streams.tls_failures,
            conn_refused_worker: self.streams.conn_refused_worker,
            conn_refused_per_source: self.streams.conn_refused_per_source,
            proxy_refused: self.streams.proxy_refused,
            recv_batches: self.udp.recv_batches,
            recv_datagrams: self.udp.recv_datagrams,
            send: self.io.queue.stats(),
            gso: self.io.queue.gso_enabled(),
            tcp_connections: self.pairs.len(),
            tcp_bytes: self.pairs.totals(),
            dtls: self.io.dtls.metrics(),
            per_user: self.per_user,
            users: std::sync::Arc::new(self.user_usage(now)),
        };
        if let Some(slot) = self
            .control
            .board
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(self.id)
        {
            *slot = m;
        }
    }

    /// Takes a newer configuration if one was published (one atomic load
    /// per loop iteration, never per packet).
    pub(super) fn apply_reload(&mut self) {
        let generation = self.control.reloads.generation.load(Ordering::Acquire);
        if generation == self.control.seen_generation {
            return;
        }
        self.control.seen_generation = generation;
        let update = self
            .control
            .reloads
            .latest
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(u) = update {
            if let Some((mut cfg, shared)) = u.core {
                cfg.connection_id_tag = self.id as u8;
                self.core.reconfigure(cfg, shared);
            } else if let Some(c) = u.credentials {
                self.core.set_credentials(c);
            }
            if let Some(conn) = u.conn {
                self.streams.limits = conn;
            }
            if let Some(tls) = u.tls {
                // New connections use the new certificate; open ones keep theirs.
                self.streams.tls = Some(tls);
            }
            if let Some(id) = &u.dtls {
                // New DTLS handshakes too; established associations keep theirs.
                self.io.dtls.set_identity(id);
            }
        }
    }
}
