//! A worker's side of a binary upgrade (`crate::upgrade`): the old
//! process's worker gives its part (snapshot and socket descriptors) and
//! waits, then lets the moved go or serves on; the new process's worker
//! takes the relay sockets and restores the snapshot before its loop starts.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use tracing::warn;
use turn_core::snapshot::{Restored, Snapshot, SnapshotError};
use turn_core::ListenerId;

use super::control::HandoverAsk;
use super::dispatch::Source;
use super::worker::Worker;
use crate::upgrade::{WorkerPart, STEP_TIMEOUT};

/// What a new process's worker takes over besides its listeners.
pub(super) struct TakenOver {
    /// Relay sockets of the snapshot's allocations, with their addresses.
    pub(super) relays: Vec<(std::net::UdpSocket, SocketAddr)>,
    pub(super) snapshot: Snapshot,
    /// The old process's listener ids, by address.
    pub(super) old_listeners: Vec<(u32, SocketAddr)>,
}

impl Worker {
    /// Old side: sends this worker's part, reads nothing until the
    /// decision, then lets the moved allocations and sockets go (`true`)
    /// or serves on as before.
    pub(super) fn hand_over(&mut self, now: Instant, ask: HandoverAsk) {
        let Some((part, fds)) = self.part(now) else {
            // (Dropping `ask` tells the node this worker could not.)
            return;
        };
        let snapshot = part.snapshot.clone();
        if ask.reply.send((part, fds)).is_err() {
            return;
        }
        if ask.decision.recv_timeout(STEP_TIMEOUT * 2) == Ok(true) {
            self.let_go(now, &snapshot);
        }
    }

    /// This worker's snapshot and its sockets' descriptors (copies: the
    /// sockets stay open here until the decision).
    fn part(&mut self, now: Instant) -> Option<(WorkerPart, Vec<OwnedFd>)> {
        let mut part = WorkerPart {
            udp: Vec::new(),
            tcp: Vec::new(),
            relays: Vec::new(),
            snapshot: self.core.snapshot(now),
        };
        let mut fds = Vec::new();
        let copy = |fd: std::os::fd::BorrowedFd<'_>| match fd.try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!(error = %e, "upgrade: cannot copy a socket for the new process");
                None
            }
        };
        for (key, src) in self.io.sources.iter() {
            if let Source::Udp { sock, addr } = src {
                fds.push(copy(sock.as_fd())?);
                part.udp.push((key as u32, *addr));
            }
        }
        for (_, src) in self.io.sources.iter() {
            if let Source::Listener { sock, addr, tls } = src {
                fds.push(copy(sock.as_fd())?);
                part.tcp.push((*addr, *tls));
            }
        }
        for a in &part.snapshot.allocations {
            for r in &a.relays {
                let key = self.io.relay_by_addr.get(&r.bound)?;
                let Some(Source::Relay { sock, .. }) = self.io.sources.get(*key) else {
                    return None;
                };
                fds.push(copy(sock.as_fd())?);
                part.relays.push(r.bound);
            }
        }
        Some((part, fds))
    }

    /// The new process serves the moved allocations and every listener:
    /// they leave here (the core closes this process's copies of their
    /// relay sockets), and the listeners close. What stays is the TCP and
    /// TLS connections and their allocations.
    fn let_go(&mut self, now: Instant, snapshot: &Snapshot) {
        self.core.hand_over(snapshot);
        self.drive_core(now);
        let listeners: Vec<usize> = self
            .io
            .sources
            .iter()
            .filter(|(_, s)| matches!(s, Source::Udp { .. } | Source::Listener { .. }))
            .map(|(k, _)| k)
            .collect();
        for key in listeners {
            match self.io.sources.remove(key) {
                Source::Udp { mut sock, .. } => {
                    let _ = self.io.registry.deregister(&mut sock);
                    self.io.queue.close(sock);
                }
                Source::Listener { mut sock, .. } => {
                    let _ = self.io.registry.deregister(&mut sock);
                }
                _ => {}
            }
        }
        self.io.udp_by_addr.clear();
    }

    /// New side, before the loop starts: the relay sockets join this
    /// worker and the snapshot's allocations are served from them. A
    /// snapshot the core refuses (another format) is an error: the new
    /// process then refuses the hand-over, and the old one serves on.
    pub(super) fn take_over(&mut self, now: Instant, t: TakenOver) -> Result<Restored, SnapshotError> {
        for (sock, addr) in t.relays {
            if self.io.activate(sock, addr, false).is_err() {
                warn!(%addr, "upgrade: a handed-over relay socket could not be registered");
            }
        }
        // Listener ids are slab keys: the old id is mapped by address.
        let by_addr: Vec<(SocketAddr, usize)> = self.io.udp_by_addr.clone();
        let map = |old: ListenerId| {
            let addr = t.old_listeners.iter().find(|(id, _)| *id == old.0)?.1;
            by_addr
                .iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, k)| ListenerId(*k as u32))
        };
        let restored = self.core.restore(now, &t.snapshot, &map)?;
        self.drive_core(now);
        Ok(restored)
    }
}
