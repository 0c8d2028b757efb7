//! Reading the worker's UDP sockets: listeners (clients' requests and
//! ChannelData) and relay sockets (peers' datagrams, and the ICMP errors
//! queued on them), in `recvmmsg` batches within a read budget.

use std::net::SocketAddr;
use std::time::Instant;

use turn_core::{FiveTuple, ListenerId, Transport};

use super::dispatch::Source;
use super::worker::Worker;

/// `recvmmsg` batches one readiness event may read from one UDP socket.
/// A listener that stays full (every client's media arrives on it) would
/// otherwise keep the worker until it drains, while the relay sockets'
/// packets (a call's second hop) and the send queue wait: milliseconds
/// of latency under load, for no throughput.
pub(super) const READ_BUDGET: usize = 4;

/// The worker's UDP reading state.
pub(super) struct UdpReads {
    pub(super) batch: udp_io::RecvBatch,
    errors: udp_io::ErrorQueue,
    /// UDP sockets left readable when their read budget ran out: mio is
    /// edge-triggered, so they are read again after the other sockets'
    /// events, not when the kernel says so.
    pub(super) unfinished: Vec<usize>,
    pub(super) recv_batches: u64,
    pub(super) recv_datagrams: u64,
}

impl UdpReads {
    pub(super) fn new() -> Self {
        UdpReads {
            batch: udp_io::RecvBatch::new(),
            errors: udp_io::ErrorQueue::new(),
            unfinished: Vec::new(),
            recv_batches: 0,
            recv_datagrams: 0,
        }
    }
}

impl Worker {
    pub(super) fn read_udp(&mut self, key: usize, local: SocketAddr, now: Instant) {
        for round in 0.. {
            if round == READ_BUDGET {
                self.udp.unfinished.push(key);
                return;
            }
            let Some(Source::Udp { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let n = match self.udp.batch.recv(sock) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            self.udp.recv_batches += 1;
            self.udp.recv_datagrams += n as u64;
            for i in 0..n {
                let Some(d) = self.udp.batch.get(i) else {
                    continue;
                };
                // The address the client reached: pktinfo on a wildcard
                // socket, else the one it is bound to.
                let tuple = FiveTuple {
                    transport: Transport::Udp,
                    client: d.from,
                    server: SocketAddr::new(d.to_ip.unwrap_or(local.ip()), local.port()),
                    listener: ListenerId(key as u32),
                };
                if let Some(tx) = self.core.handle_client(now, tuple, d.data) {
                    self.io.transmit(tx);
                }
                self.drive_core(now);
            }
            if n < udp_io::BATCH {
                return;
            }
        }
    }

    /// RFC 8656 §11.5: ICMP errors queued on a relay socket go to the
    /// client (the core checks the permission and rate-limits them).
    pub(super) fn read_relay_errors(&mut self, key: usize, relay: SocketAddr, now: Instant) {
        for _ in 0..64 {
            let Some(Source::Relay { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let Ok(Some(e)) = self.udp.errors.recv(sock) else {
                return;
            };
            if let Some(tx) = self
                .core
                .handle_icmp(now, relay, e.dest, e.icmp_type, e.icmp_code, e.info)
            {
                self.io.transmit(tx);
            }
        }
    }

    pub(super) fn read_relay(&mut self, key: usize, relay: SocketAddr, now: Instant) {
        let mut errors_read = false;
        for round in 0.. {
            if round == READ_BUDGET {
                self.udp.unfinished.push(key);
                return;
            }
            let Some(Source::Relay { sock, .. }) = self.io.sources.get(key) else {
                return;
            };
            let n = match self.udp.batch.recv(sock) {
                Ok(0) => return,
                Ok(n) => n,
                // A pending ICMP error fails the receive once: read the
                // error queue, then go on with the datagrams.
                Err(_) if !errors_read => {
                    errors_read = true;
                    self.read_relay_errors(key, relay, now);
                    continue;
                }
                Err(_) => return,
            };
            self.udp.recv_batches += 1;
            self.udp.recv_datagrams += n as u64;
            for i in 0..n {
                let Some(udp_io::Datagram { from, data, .. }) = self.udp.batch.get(i) else {
                    continue;
                };
                // The core writes the client's datagram straight into the
                // send queue: the payload's one copy.
                let out = self.io.queue.buffer();
                let start = out.len();
                match self.core.handle_peer_into(now, relay, from, data, out) {
                    Some(dest) => self.io.forward_appended(dest, start),
                    None => self.io.queue.truncate(start),
                }
            }
            if n < udp_io::BATCH {
                return;
            }
        }
    }
}
