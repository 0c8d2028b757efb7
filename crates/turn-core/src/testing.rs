//! What tests, the fuzzer and the benchmarks drive the core with (feature
//! `testing`): a relay provider that hands out documentation addresses
//! and records what the core asked of it, and 5-tuples to speak from.
//! One fake for all three, so they exercise the core the same way.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use std::time::Instant;

use crate::{
    Command, ConnectionId, FastPathEntry, FiveTuple, OpenedRelay, RelayError, RelayRequest, RelaysOpened,
    Server, Transport,
};

/// A synchronous executor of the core's commands, for tests, the fuzzer
/// and the benchmarks ([`Server::run_commands`]). The server's runtime
/// drains [`Server::poll_command`] itself.
pub trait RelayProvider {
    /// Opens one UDP relay socket.
    fn open(&mut self, req: RelayRequest) -> Result<OpenedRelay, RelayError>;
    /// Closes the relay socket bound at `relay`.
    fn close(&mut self, relay: SocketAddr);
    /// Starts a TCP connect for [`Command::ConnectPeer`]; its completion
    /// comes later through [`crate::Server::handle_peer_connected`].
    fn connect_peer(&mut self, id: ConnectionId, relay: SocketAddr, peer: SocketAddr);
    /// Carries out [`Command::BindConnection`].
    fn bind_connection(&mut self, id: ConnectionId, data: FiveTuple, control: FiveTuple);
    /// Carries out [`Command::CloseConnection`].
    fn close_connection(&mut self, id: ConnectionId);
    /// Carries out [`Command::FastPathInstall`]. The core sends it only
    /// when `Config::fast_path` says a kernel path is loaded; a provider
    /// without one has nothing to install.
    fn fast_path_install(&mut self, _entry: FastPathEntry) {}
    /// Carries out [`Command::FastPathRemove`] (see `fast_path_install`).
    fn fast_path_remove(&mut self, _client: FiveTuple, _channel: u16) {}
    /// Carries out [`Command::MobilityElsewhere`]: one server has no other
    /// worker to pass the request to.
    fn mobility_elsewhere(&mut self, _worker: u8, _tuple: FiveTuple, _request: Vec<u8>) {}
}

impl Server {
    /// Carries out every waiting command with `relays`, feeding the
    /// completions back, until none is left; queued transmits stay for
    /// [`Self::poll_transmit`].
    pub fn run_commands(&mut self, now: Instant, relays: &mut dyn RelayProvider) {
        while let Some(cmd) = self.poll_command() {
            match cmd {
                Command::OpenRelays {
                    id,
                    primary,
                    additional,
                    ..
                } => {
                    let opened = RelaysOpened {
                        primary: relays.open(primary),
                        additional: additional.map(|r| relays.open(r)),
                    };
                    self.handle_relays_opened(now, id, opened);
                }
                Command::CloseRelay { relay } => relays.close(relay),
                Command::ConnectPeer { id, relay, peer } => relays.connect_peer(id, relay, peer),
                Command::BindConnection { id, data, control } => relays.bind_connection(id, data, control),
                Command::CloseConnection { id } => relays.close_connection(id),
                Command::FastPathInstall(e) => relays.fast_path_install(e),
                Command::FastPathRemove { client, channel } => relays.fast_path_remove(client, channel),
                Command::MobilityElsewhere {
                    worker,
                    tuple,
                    request,
                } => relays.mobility_elsewhere(worker, tuple, request),
            }
        }
    }
}

/// Which IPv6 relay requests succeed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Ipv6Relays {
    /// None: every IPv6 request gets `FamilyUnsupported` (an IPv4-only host).
    #[default]
    None,
    /// All, from 2001:db8::7.
    All,
    /// Every other one, so dual-stack allocations see both outcomes.
    EveryOther,
}

/// A relay provider without sockets: relays on 198.51.100.7 and
/// 2001:db8::7 from port 50002 up, EVEN-PORT reservations of the next
/// port, and a record of every command.
#[derive(Debug, Default)]
pub struct FakeRelays {
    /// Relays handed out so far, times two (the port counter).
    pub next_port: u16,
    /// Relays open now.
    pub open: HashSet<SocketAddr>,
    /// Relays closed, in order.
    pub closed: Vec<SocketAddr>,
    /// Refuse every open (a host out of ports).
    pub exhausted: bool,
    /// EVEN-PORT reservations: token → the reserved address.
    pub reserved: HashMap<[u8; 8], SocketAddr>,
    /// Which IPv6 requests succeed.
    pub ipv6: Ipv6Relays,
    /// Keep no history (`requests`, `closed`, `connects`, `bound`,
    /// `closed_conns`): for benchmarks and long fuzz runs.
    pub quiet: bool,
    /// The requests seen, in order.
    pub requests: Vec<RelayRequest>,
    /// RFC 6062 connects asked for: (id, relay, peer).
    pub connects: Vec<(u32, SocketAddr, SocketAddr)>,
    /// RFC 6062 connects asked for and not yet completed by the caller.
    pub connecting: Vec<u32>,
    /// RFC 6062 peer connections the caller has marked established: with
    /// `check_connections`, binding or closing another is a bug.
    pub conns: HashSet<u32>,
    /// Assert that only established connections are bound.
    pub check_connections: bool,
    /// ConnectionBinds carried out: (id, the data connection).
    pub bound: Vec<(u32, FiveTuple)>,
    /// Peer connections closed.
    pub closed_conns: Vec<u32>,
    /// The kernel fast path's table, as the core's commands leave it.
    pub fast: HashMap<(FiveTuple, u16), FastPathEntry>,
    /// RFC 8016 requests for another worker: (worker, tuple, request).
    pub elsewhere: Vec<(u8, FiveTuple, Vec<u8>)>,
}

impl FakeRelays {
    fn next_addr(&mut self, ip: IpAddr) -> SocketAddr {
        self.next_port = self.next_port.wrapping_add(2);
        // 50002, 50004, … wrapping within 1024..=65023.
        let port = 1024 + ((48976 + u32::from(self.next_port)) % 64000) as u16;
        SocketAddr::new(ip, port)
    }
}

impl RelayProvider for FakeRelays {
    fn open(&mut self, req: RelayRequest) -> Result<OpenedRelay, RelayError> {
        if !self.quiet {
            self.requests.push(req);
        }
        if let Some(token) = req.token {
            let a = self.reserved.remove(&token).ok_or(RelayError::Exhausted)?;
            if !self.open.insert(a) {
                return Err(RelayError::Exhausted);
            }
            return Ok(OpenedRelay { addr: a, token: None });
        }
        if self.exhausted {
            return Err(RelayError::Exhausted);
        }
        let ip: IpAddr = if req.ipv6 {
            let ok = match self.ipv6 {
                Ipv6Relays::None => false,
                Ipv6Relays::All => true,
                Ipv6Relays::EveryOther => self.next_port.is_multiple_of(4),
            };
            if !ok {
                if self.ipv6 == Ipv6Relays::EveryOther {
                    self.next_port = self.next_port.wrapping_add(2);
                }
                return Err(RelayError::FamilyUnsupported);
            }
            IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 7])
        } else {
            IpAddr::from([198, 51, 100, 7])
        };
        let addr = self.next_addr(ip);
        if !self.open.insert(addr) {
            return Err(RelayError::Exhausted);
        }
        let token = req.reserve_next.then(|| {
            let t = [self.next_port as u8; 8];
            self.reserved
                .insert(t, SocketAddr::new(addr.ip(), addr.port() + 1));
            t
        });
        Ok(OpenedRelay { addr, token })
    }

    fn close(&mut self, relay: SocketAddr) {
        assert!(
            self.open.remove(&relay),
            "closed a relay that was not open: {relay}"
        );
        if !self.quiet {
            self.closed.push(relay);
        }
    }

    fn connect_peer(&mut self, id: u32, relay: SocketAddr, peer: SocketAddr) {
        assert!(
            self.open.contains(&relay),
            "a connect from a relay that is not open"
        );
        self.connecting.push(id);
        if !self.quiet {
            self.connects.push((id, relay, peer));
        }
    }

    fn bind_connection(&mut self, id: u32, data: FiveTuple, _control: FiveTuple) {
        if self.check_connections {
            assert!(
                self.conns.contains(&id),
                "bound a connection that is not open: {id}"
            );
        }
        if !self.quiet {
            self.bound.push((id, data));
        }
    }

    fn close_connection(&mut self, id: u32) {
        self.connecting.retain(|c| *c != id);
        self.conns.remove(&id);
        if !self.quiet {
            self.closed_conns.push(id);
        }
    }

    fn fast_path_install(&mut self, e: FastPathEntry) {
        self.fast.insert((e.client, e.channel), e);
    }

    fn fast_path_remove(&mut self, client: FiveTuple, channel: u16) {
        self.fast.remove(&(client, channel));
    }

    fn mobility_elsewhere(&mut self, worker: u8, tuple: FiveTuple, request: Vec<u8>) {
        self.elsewhere.push((worker, tuple, request));
    }
}

/// A client's 5-tuple on `transport` from `client`, to 198.51.100.1:3478.
pub fn tuple(transport: Transport, client: &str) -> FiveTuple {
    FiveTuple {
        transport,
        client: client.parse().expect("an IP:PORT"),
        server: SocketAddr::from(([198, 51, 100, 1], 3478)),
        listener: Default::default(),
    }
}

/// The usual UDP client, 203.0.113.5:40000.
pub fn udp() -> FiveTuple {
    tuple(Transport::Udp, "203.0.113.5:40000")
}
