//! Relay sockets (RFC 8656 §7.2): which IP to relay from, random ports,
//! EVEN-PORT reservations, DF and the ICMP error queue, and the core's
//! `OpenRelays`/`CloseRelay` commands carried out on them.

use std::collections::HashMap;
use std::io::{self};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Result;
use mio::net::UdpSocket;
use mio::{Interest, Token};
use rand::Rng;
use tracing::warn;
use turn_core::{OpenedRelay, RelayError, RelayRequest};

use super::dispatch::{Io, Source};

/// How long a port reserved by EVEN-PORT's R bit stays claimable
/// (RFC 8656 §7.2: "approximately 30 seconds").
/// Where the relay port range overlaps the kernel's ephemeral port range
/// (`net.ipv4.ip_local_port_range`, `contents` as /proc gives it): the
/// host's own outgoing connections (RFC 6062 connects, Redis, DNS) take
/// ports there, which relays then cannot have, and the reverse. The
/// warning says which and how to part them; `None` when they do not meet.
pub fn ephemeral_overlap(min_port: u16, max_port: u16, contents: &str) -> Option<String> {
    let mut it = contents.split_whitespace().map(|v| v.parse::<u16>());
    let (Some(Ok(lo)), Some(Ok(hi))) = (it.next(), it.next()) else {
        return None;
    };
    if max_port < lo || min_port > hi {
        return None;
    }
    let advice = if lo > 1024 && min_port < lo {
        format!("end the relay range below {lo} (max-port = {})", lo - 1)
    } else if hi < 65535 {
        format!("start the relay range above {hi} (min-port = {})", hi + 1)
    } else {
        format!(
            "narrow the kernel's range: sysctl net.ipv4.ip_local_port_range=\"{lo} {}\"",
            min_port.saturating_sub(1).max(lo)
        )
    };
    Some(format!(
        "relay ports {min_port}-{max_port} overlap the kernel's ephemeral ports {lo}-{hi} (net.ipv4.ip_local_port_range): \
         this host's outgoing connections take ports relays then cannot have; {advice}, or narrow the ephemeral range"
    ))
}

pub(super) const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

/// Ports reserved by EVEN-PORT (R bit), held bound until claimed by a
/// RESERVATION-TOKEN or expired. Shared by all workers because the claiming
/// Allocate arrives from another client port, which the kernel may hash to
/// another worker; touched only on Allocate, never per packet.
#[derive(Default)]
pub(super) struct Reservations {
    pub(super) held: HashMap<[u8; 8], (std::net::UdpSocket, Instant)>,
}

impl Reservations {
    pub(super) fn purge(&mut self, now: Instant) {
        self.held.retain(|_, (_, exp)| *exp > now);
    }
}

#[derive(Clone, Copy)]
pub(super) struct RelayConfig {
    /// The relay address per family: configured, or the fallback when the
    /// address a client reached cannot be used.
    pub(super) v4: Option<Ipv4Addr>,
    pub(super) v6: Option<Ipv6Addr>,
    /// No relay address configured: relay from the address each client
    /// reached (RFC 8656 §7.2 leaves the choice to the server; relaying
    /// from where the client came keeps a multi-homed host symmetric).
    pub(super) auto: bool,
    pub(super) min_port: u16,
    pub(super) max_port: u16,
}

impl Io {
    /// Registers a bound relay socket with this worker's poll.
    pub(super) fn activate(
        &mut self,
        std_sock: std::net::UdpSocket,
        addr: SocketAddr,
        dont_fragment: bool,
    ) -> Result<(), RelayError> {
        std_sock
            .set_nonblocking(true)
            .map_err(|_| RelayError::Exhausted)?;
        if dont_fragment {
            // RFC 8656 §14.8: the client asked for DF on what is relayed.
            udp_io::set_dont_fragment(&std_sock, addr.is_ipv6(), true).map_err(|e| {
                warn!(%addr, error = %e, "cannot set DF on a relay socket");
                RelayError::Exhausted
            })?;
        }
        // RFC 8656 §11.5: ICMP errors for relayed datagrams go back to the
        // client; without the error queue they are simply not seen.
        let _ = udp_io::set_recv_errors(&std_sock, addr.is_ipv6());
        let mut sock = UdpSocket::from_std(std_sock);
        let entry = self.sources.vacant_entry();
        let key = entry.key();
        self.registry
            .register(&mut sock, Token(key), Interest::READABLE)
            .map_err(|_| RelayError::Exhausted)?;
        entry.insert(Source::Relay { sock, addr });
        self.relay_by_addr.insert(addr, key);
        Ok(())
    }
}

pub(super) fn bind_relay(addr: SocketAddr) -> Result<Option<std::net::UdpSocket>, RelayError> {
    match std::net::UdpSocket::bind(addr) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Ok(None),
        Err(e) => {
            warn!(%addr, error = %e, "cannot bind relay socket");
            Err(RelayError::Exhausted)
        }
    }
}

impl Io {
    /// The relay IP for `req` (RFC 8656 §7.2 leaves the choice to the
    /// server): with no relay address configured, the address the client
    /// reached, unless it is loopback and the client is not; else the
    /// configured (or detected) address of the family.
    pub(super) fn relay_ip(&self, req: &RelayRequest) -> Option<IpAddr> {
        let reached = req.local_ip;
        if self.relay.auto
            && reached.is_ipv6() == req.ipv6
            && !reached.is_unspecified()
            && (!reached.is_loopback() || req.client_ip.is_loopback())
        {
            return Some(reached);
        }
        let fallback = if req.ipv6 {
            self.relay.v6.map(IpAddr::V6)
        } else {
            self.relay.v4.map(IpAddr::V4)
        };
        // A relay a remote client cannot reach is no relay: a loopback
        // fallback (a host without a route of that family) is for loopback
        // clients only, unless the operator configured it.
        fallback.filter(|ip| !self.relay.auto || !ip.is_loopback() || req.client_ip.is_loopback())
    }

    /// Binds a new relay socket for `req` at a random port.
    pub(super) fn bind_new_relay(&mut self, req: &RelayRequest) -> Result<OpenedRelay, RelayError> {
        let ip = self.relay_ip(req).ok_or(RelayError::FamilyUnsupported)?;
        let (lo, hi) = (self.relay.min_port, self.relay.max_port);
        // Random ports, never a scan: a scan makes ports predictable and costs
        // a syscall per busy port.
        for _ in 0..64 {
            let mut port = self.rng.gen_range(lo..=hi);
            if req.even_port {
                port &= !1;
                if port < lo || (req.reserve_next && port == u16::MAX) || (req.reserve_next && port + 1 > hi)
                {
                    continue;
                }
            }
            let addr = SocketAddr::new(ip, port);
            // Not the address of this worker's TCP relay: the core's
            // tables are keyed by address.
            if self.relay_by_addr.contains_key(&addr) {
                continue;
            }
            let Some(sock) = bind_relay(addr)? else { continue };
            let token = if req.reserve_next {
                let next = SocketAddr::new(ip, port + 1);
                let Some(held) = bind_relay(next)? else { continue };
                let token: [u8; 8] = self.rng.gen();
                let now = Instant::now();
                let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
                r.purge(now);
                r.held.insert(token, (held, now + RESERVATION_LIFETIME));
                Some(token)
            } else {
                None
            };
            self.activate(sock, addr, req.dont_fragment)?;
            return Ok(OpenedRelay { addr, token });
        }
        Err(RelayError::Exhausted)
    }
}

impl Io {
    /// Opens a relay socket the core asked for (`Command::OpenRelays`).
    pub(super) fn open_relay(&mut self, req: RelayRequest) -> Result<OpenedRelay, RelayError> {
        if req.tcp {
            return self.bind_tcp_relay(&req);
        }
        let Some(token) = req.token else {
            return self.bind_new_relay(&req);
        };
        let held = {
            let mut r = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
            r.purge(Instant::now());
            r.held.remove(&token)
        };
        // An unknown or expired token: RFC 8656 §7.2 says 508.
        let (sock, _) = held.ok_or(RelayError::Exhausted)?;
        let addr = sock.local_addr().map_err(|_| RelayError::Exhausted)?;
        self.activate(sock, addr, req.dont_fragment)?;
        Ok(OpenedRelay { addr, token: None })
    }

    /// Closes a relay socket (`Command::CloseRelay`), UDP or TCP.
    /// A UDP relay socket leaves this worker open, for another to serve
    /// (RFC 8016 across workers, `mobility.rs`); queued datagrams must
    /// have been sent.
    pub(super) fn release_relay(&mut self, relay: SocketAddr) -> Option<std::net::UdpSocket> {
        let key = *self.relay_by_addr.get(&relay)?;
        if !matches!(self.sources.get(key), Some(Source::Relay { .. })) {
            return None;
        }
        self.relay_by_addr.remove(&relay);
        let Source::Relay { mut sock, .. } = self.sources.remove(key) else {
            return None;
        };
        let _ = self.registry.deregister(&mut sock);
        Some(std::net::UdpSocket::from(std::os::fd::OwnedFd::from(sock)))
    }

    pub(super) fn close_relay(&mut self, relay: SocketAddr) {
        if let Some(key) = self.relay_by_addr.remove(&relay) {
            if matches!(self.sources.get(key), Some(Source::TcpRelay { .. })) {
                self.close_tcp_relay(key, relay);
                return;
            }
            if let Source::Relay { mut sock, .. } = self.sources.remove(key) {
                let _ = self.registry.deregister(&mut sock);
                // Queued datagrams name the socket by descriptor, which the
                // next socket opened could reuse: they leave first.
                self.queue.close(sock);
            }
        }
    }
}

#[cfg(test)]
mod port_range_tests {
    use super::ephemeral_overlap;

    #[test]
    fn overlap_with_the_ephemeral_range_is_named_with_a_fix() {
        // Linux's default ephemeral range against the default relay range.
        let w = ephemeral_overlap(49152, 65535, "32768\t60999\n").expect("they overlap");
        assert!(w.contains("49152-65535") && w.contains("32768-60999"), "{w}");
        assert!(w.contains("min-port = 61000"), "{w}");
        assert!(ephemeral_overlap(61000, 65535, "32768\t60999\n").is_none());
        assert!(ephemeral_overlap(10000, 20000, "32768 60999").is_none());
        let w = ephemeral_overlap(30000, 40000, "32768 60999").unwrap();
        assert!(w.contains("max-port = 32767"), "{w}");
        assert!(ephemeral_overlap(49152, 65535, "garbage").is_none());
    }
}
