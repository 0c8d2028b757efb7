//! RFC 8016 across workers (the rules are `turn_core`'s `mobility.rs`):
//! the listeners are bound once per worker with SO_REUSEPORT, so a
//! client's new address may reach another worker than the one holding its
//! allocation. That worker passes the Refresh on unanswered ([`Move`]);
//! the holder checks and moves the allocation, takes it out of its core
//! with its relay sockets (still open) and sends both back ([`Adopt`]);
//! the taker serves the allocation from then on and answers the Refresh
//! itself, with a ticket naming it. The client sends from its new address
//! once answered, so nothing it sends reaches a worker without the
//! allocation.

use std::net::SocketAddr;
use std::time::Instant;

use tracing::warn;
use turn_core::snapshot::AllocationState;
use turn_core::{FiveTuple, ListenerId, Transport};

use super::control::WorkerRequest;
use super::worker::Worker;

/// A mobility Refresh for the worker holding the allocation.
pub(crate) struct Move {
    client: SocketAddr,
    server: SocketAddr,
    request: Vec<u8>,
    /// The worker the client's new address reaches.
    from: usize,
}

/// A moved allocation for the worker the client's new address reaches:
/// the allocation as data, its relay sockets, and the Refresh to answer.
pub(crate) struct Adopt {
    state: AllocationState,
    sockets: Vec<(std::net::UdpSocket, SocketAddr)>,
    client: SocketAddr,
    server: SocketAddr,
    request: Vec<u8>,
}

impl Worker {
    /// The client's UDP 5-tuple as this worker sees it: through its own
    /// listener for the server address the client reached (a wildcard
    /// socket's port and family, or the address itself).
    fn udp_tuple(&self, client: SocketAddr, server: SocketAddr) -> Option<FiveTuple> {
        let (_, key) = self.io.udp_by_addr.iter().find(|(a, _)| {
            *a == server
                || (a.ip().is_unspecified() && a.port() == server.port() && a.is_ipv4() == server.is_ipv4())
        })?;
        Some(FiveTuple {
            transport: Transport::Udp,
            client,
            server,
            listener: ListenerId(*key as u32),
        })
    }

    fn tell(&self, worker: usize, r: WorkerRequest) {
        if let Some((tx, waker)) = self.control.peers.get(worker) {
            if tx.send(r).is_ok() {
                let _ = waker.wake();
            }
        }
    }

    /// The core's `MobilityElsewhere`: the Refresh goes to the holder.
    pub(super) fn mobility_elsewhere(&mut self, worker: u8, tuple: FiveTuple, request: Vec<u8>) {
        self.tell(
            worker as usize,
            WorkerRequest::MobilityMove(Move {
                client: tuple.client,
                server: tuple.server,
                request,
                from: self.id,
            }),
        );
    }

    /// Holder: the Refresh as if it had come here; if it moved the
    /// allocation, the allocation and its sockets go to the worker the new
    /// address reaches, which answers; else the refusal is answered here.
    pub(super) fn mobility_move(&mut self, now: Instant, m: Move) {
        let Some(tuple) = self.udp_tuple(m.client, m.server) else {
            return;
        };
        let answer = self
            .core
            .handle_client(now, tuple, &m.request)
            .map(|t| (t.dest, t.data.to_vec()));
        let state = self.core.take_allocation(&tuple, now);
        // Its fast-path entries leave with it; queued datagrams name its
        // sockets by descriptor, so they go out before the sockets do.
        self.drive_core(now);
        self.io.queue.flush();
        let Some(state) = state else {
            if let Some((dest, data)) = answer {
                self.io.send(dest, &data);
            }
            return;
        };
        let sockets = state
            .relays
            .iter()
            .filter_map(|r| self.io.release_relay(r.bound).map(|s| (s, r.bound)))
            .collect();
        self.tell(
            m.from,
            WorkerRequest::MobilityAdopt(Box::new(Adopt {
                state,
                sockets,
                client: m.client,
                server: m.server,
                request: m.request,
            })),
        );
    }

    /// Taker: serves the moved allocation on its sockets and answers the
    /// Refresh that moved it.
    pub(super) fn mobility_adopt(&mut self, now: Instant, m: Box<Adopt>) {
        let m = *m;
        let Some(tuple) = self.udp_tuple(m.client, m.server) else {
            return;
        };
        let addrs: Vec<SocketAddr> = m.sockets.iter().map(|(_, a)| *a).collect();
        for (sock, addr) in m.sockets {
            if self.io.activate(sock, addr, m.state.dont_fragment).is_err() {
                warn!(%addr, "mobility: a moved relay socket could not be registered");
            }
        }
        if let Err(e) = self
            .core
            .adopt_allocation(now, &m.state, &|_| Some(tuple.listener))
        {
            warn!(error = %e, "mobility: a moved allocation could not be taken in; it ends");
            for a in addrs {
                self.io.close_relay(a);
            }
            return;
        }
        if let Some(tx) = self.core.handle_client(now, tuple, &m.request) {
            self.io.transmit(tx);
        }
        self.drive_core(now);
    }
}
