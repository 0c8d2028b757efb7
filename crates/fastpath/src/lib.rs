//! turnpike's kernel fast path: an XDP program (`src/bpf/turn_fast.c`)
//! that relays established UDP channels without the socket layer, and its
//! loader and maps here (aya, pure Rust). User space stays the authority:
//! the core decides what is installed and until when
//! (`turn_core::FastPathEntry`); this crate writes it into the maps the
//! program reads, reads the per-entry counters back, and detaches the
//! program when dropped.
//!
//! With udp-io, the workspace's only `unsafe` code: the map keys and
//! values are `#[repr(C)]` plain data the kernel reads (`aya::Pod`), and
//! `clock_gettime` gives the clock the program compares expiries with.
//!
//! IPv4 only so far: an entry with an IPv6 address is refused with
//! [`Error::Unsupported`] and its channel stays in user space.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use aya::maps::{HashMap, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpFlags};

/// The XDP object, or empty when this build had no clang (aligned: the
/// ELF parser reads its headers in place).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/turn_fast.o"));

/// Why the fast path cannot do something.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// This build has no XDP object (clang was not installed).
    NotBuilt,
    /// The kernel refused: no privileges, no BPF, a verifier error, an
    /// interface that does not take XDP. The text says which.
    Kernel(String),
    /// The entry is of a kind the program does not handle yet (IPv6).
    Unsupported(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotBuilt => f.write_str(
                "this build has no XDP program (clang and libbpf-dev were not installed when it was built)",
            ),
            Error::Kernel(e) => write!(f, "{e}"),
            Error::Unsupported(what) => write!(f, "not handled by the fast path yet: {what}"),
        }
    }
}

impl std::error::Error for Error {}

fn kernel(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Kernel(format!("{what}: {e}"))
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ClientKey {
    client_ip: u32,
    server_ip: u32,
    client_port: u16,
    server_port: u16,
    channel: u16,
    pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct ClientVal {
    relay_ip: u32,
    peer_ip: u32,
    relay_port: u16,
    peer_port: u16,
    flags: u32,
    ifindex: u32,
    pad: u32,
    expires_ns: u64,
    packets: u64,
    bytes: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PeerKey {
    relay_ip: u32,
    peer_ip: u32,
    relay_port: u16,
    peer_port: u16,
    pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PeerVal {
    client_ip: u32,
    server_ip: u32,
    client_port: u16,
    server_port: u16,
    channel: u16,
    pad: u16,
    ifindex: u32,
    pad2: u32,
    expires_ns: u64,
    packets: u64,
    bytes: u64,
}

// SAFETY: plain `#[repr(C)]` data of integers with explicit padding
// fields, matching the C structs byte for byte; any bit pattern is valid.
unsafe impl aya::Pod for ClientKey {}
// SAFETY: as above.
unsafe impl aya::Pod for ClientVal {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerKey {}
// SAFETY: as above.
unsafe impl aya::Pod for PeerVal {}

/// Nanoseconds of CLOCK_MONOTONIC, the clock `bpf_ktime_get_ns` reads.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec through a valid pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `at` on the kernel's clock.
pub fn kernel_time(at: Instant) -> u64 {
    let (now, mono) = (Instant::now(), monotonic_ns());
    match at.checked_duration_since(now) {
        Some(d) => mono.saturating_add(d.as_nanos() as u64),
        None => mono.saturating_sub(now.duration_since(at).as_nanos() as u64),
    }
}

/// One channel to forward: what `turn_core::FastPathEntry` says, in
/// addresses (this crate does not depend on the core).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The client's address.
    pub client: SocketAddr,
    /// The listener address the client reached.
    pub server: SocketAddr,
    /// The channel number.
    pub channel: u16,
    /// The relay socket's address.
    pub relay: SocketAddr,
    /// The peer.
    pub peer: SocketAddr,
    /// When forwarding stops, on the kernel's clock ([`kernel_time`]).
    pub expires_ns: u64,
    /// Send to the peer with DF (the client asked for DONT-FRAGMENT).
    pub dont_fragment: bool,
}

/// The index of the interface holding `ip` (where the kernel sends a
/// datagram from it), if any.
pub fn interface_of(ip: IpAddr) -> Option<u32> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; on success it is
    // freed below with freeifaddrs and not used after.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return None;
    }
    let mut found = None;
    let mut cur = head;
    while !cur.is_null() && found.is_none() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_name.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says its
            // type; only AF_INET is read, as a sockaddr_in.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            if family == libc::AF_INET {
                // SAFETY: the family is AF_INET, so this is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                let a = IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                if a == ip {
                    // SAFETY: ifa_name is a NUL-terminated string of the list.
                    let idx = unsafe { libc::if_nametoindex(ifa.ifa_name) };
                    found = (idx != 0).then_some(idx);
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    found
}

fn v4(a: SocketAddr) -> Result<(u32, u16), Error> {
    match a.ip() {
        // Network byte order in memory, as the program compares it.
        IpAddr::V4(ip) => Ok((u32::from_ne_bytes(ip.octets()), a.port().to_be())),
        IpAddr::V6(_) => Err(Error::Unsupported("IPv6")),
    }
}

/// Packets and bytes an entry forwarded, each way, since it was installed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Client → peer packets.
    pub to_peer_packets: u64,
    /// Client → peer payload bytes.
    pub to_peer_bytes: u64,
    /// Peer → client packets.
    pub from_peer_packets: u64,
    /// Peer → client payload bytes.
    pub from_peer_bytes: u64,
}

/// The loaded program, attached to some interfaces, and its maps.
pub struct FastPath {
    ebpf: aya::Ebpf,
    clients: HashMap<MapData, ClientKey, ClientVal>,
    peers: HashMap<MapData, PeerKey, PeerVal>,
    stats: PerCpuArray<MapData, u64>,
    /// Interfaces and whether the program runs in the driver (native) or
    /// in the generic path.
    attached: Vec<(String, bool)>,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("attached", &self.attached)
            .finish()
    }
}

/// Whether this build carries the XDP program.
pub fn built() -> bool {
    !OBJECT.is_empty()
}

fn load_object() -> Result<aya::Ebpf, Error> {
    if !built() {
        return Err(Error::NotBuilt);
    }
    aya::Ebpf::load(OBJECT).map_err(|e| kernel("loading the XDP object", e))
}

fn attach(ebpf: &mut aya::Ebpf, program: &str, iface: &str) -> Result<bool, Error> {
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .ok_or_else(|| Error::Kernel(format!("no program {program} in the object")))?
        .try_into()
        .map_err(|e| kernel("the program is not XDP", e))?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|e| kernel("the kernel refused the program", e))?;
    }
    // In the driver where it can (veth, most NICs); the generic path
    // elsewhere (loopback).
    match prog.attach(iface, XdpFlags::DRV_MODE) {
        Ok(_) => Ok(true),
        Err(native) => match prog.attach(iface, XdpFlags::SKB_MODE) {
            Ok(_) => Ok(false),
            Err(e) => Err(kernel(&format!("attaching to {iface} (native: {native})"), e)),
        },
    }
}

impl FastPath {
    /// Loads the program and attaches it to `interfaces`.
    pub fn load(interfaces: &[String]) -> Result<FastPath, Error> {
        if interfaces.is_empty() {
            return Err(Error::Kernel("no interface to attach to".into()));
        }
        // The program sends by the kernel's forwarding table, which
        // answers only for interfaces that forward.
        for iface in interfaces {
            let path = format!("/proc/sys/net/ipv4/conf/{iface}/forwarding");
            match std::fs::read_to_string(&path) {
                Ok(v) if v.trim() == "1" => {}
                Ok(_) => {
                    return Err(Error::Kernel(format!(
                    "{iface} does not forward IPv4 (the fast path sends by the kernel's forwarding table): \
                         sysctl -w net.ipv4.conf.{iface}.forwarding=1, with a FORWARD policy that drops what \
                         is not yours (SECURITY.md)"
                )))
                }
                Err(_) => return Err(Error::Kernel(format!("no interface {iface}"))),
            }
        }
        let mut ebpf = load_object()?;
        let mut attached = Vec::new();
        for iface in interfaces {
            let native = attach(&mut ebpf, "turn_fast", iface)?;
            attached.push((iface.clone(), native));
        }
        let take = |ebpf: &mut aya::Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Kernel(format!("no map {name} in the object")))
        };
        let clients =
            HashMap::try_from(take(&mut ebpf, "TURN_CLIENTS")?).map_err(|e| kernel("TURN_CLIENTS", e))?;
        let peers = HashMap::try_from(take(&mut ebpf, "TURN_PEERS")?).map_err(|e| kernel("TURN_PEERS", e))?;
        let stats =
            PerCpuArray::try_from(take(&mut ebpf, "TURN_STATS")?).map_err(|e| kernel("TURN_STATS", e))?;
        Ok(FastPath {
            ebpf,
            clients,
            peers,
            stats,
            attached,
        })
    }

    /// The interfaces the program runs on, and whether natively.
    pub fn interfaces(&self) -> &[(String, bool)] {
        &self.attached
    }

    fn keys(e: &Entry) -> Result<(ClientKey, ClientVal, PeerKey, PeerVal), Error> {
        let (ck, pk) = Self::key_pair(e)?;
        // Out of the interfaces holding the relay and the listener address.
        let relay_if = interface_of(e.relay.ip()).unwrap_or(0);
        let server_if = interface_of(e.server.ip()).unwrap_or(0);
        Ok((
            ck,
            ClientVal {
                relay_ip: pk.relay_ip,
                peer_ip: pk.peer_ip,
                relay_port: pk.relay_port,
                peer_port: pk.peer_port,
                flags: e.dont_fragment as u32,
                ifindex: relay_if,
                pad: 0,
                expires_ns: e.expires_ns,
                packets: 0,
                bytes: 0,
            },
            pk,
            PeerVal {
                client_ip: ck.client_ip,
                server_ip: ck.server_ip,
                client_port: ck.client_port,
                server_port: ck.server_port,
                channel: e.channel,
                pad: 0,
                ifindex: server_if,
                pad2: 0,
                expires_ns: e.expires_ns,
                packets: 0,
                bytes: 0,
            },
        ))
    }

    /// Installs `e`, or moves its expiry (its counts are kept).
    pub fn install(&mut self, e: &Entry) -> Result<(), Error> {
        let (ck, mut cv, pk, mut pv) = Self::keys(e)?;
        if let Ok(old) = self.clients.get(&ck, 0) {
            cv.packets = old.packets;
            cv.bytes = old.bytes;
        }
        if let Ok(old) = self.peers.get(&pk, 0) {
            pv.packets = old.packets;
            pv.bytes = old.bytes;
        }
        self.clients
            .insert(ck, cv, 0)
            .map_err(|e| kernel("TURN_CLIENTS insert", e))?;
        self.peers
            .insert(pk, pv, 0)
            .map_err(|e| kernel("TURN_PEERS insert", e))?;
        Ok(())
    }

    /// The two map keys of `e` (no interface lookups: counts and removal
    /// need only these).
    fn key_pair(e: &Entry) -> Result<(ClientKey, PeerKey), Error> {
        let (client_ip, client_port) = v4(e.client)?;
        let (server_ip, server_port) = v4(e.server)?;
        let (relay_ip, relay_port) = v4(e.relay)?;
        let (peer_ip, peer_port) = v4(e.peer)?;
        Ok((
            ClientKey {
                client_ip,
                server_ip,
                client_port,
                server_port,
                channel: e.channel,
                pad: 0,
            },
            PeerKey {
                relay_ip,
                peer_ip,
                relay_port,
                peer_port,
                pad: 0,
            },
        ))
    }

    /// Removes `e` (its expiry is not looked at); the counts it had.
    pub fn remove(&mut self, e: &Entry) -> Counts {
        let c = self.counts(e);
        if let Ok((ck, pk)) = Self::key_pair(e) {
            let _ = self.clients.remove(&ck);
            let _ = self.peers.remove(&pk);
        }
        c
    }

    /// What `e` forwarded so far.
    pub fn counts(&self, e: &Entry) -> Counts {
        let Ok((ck, pk)) = Self::key_pair(e) else {
            return Counts::default();
        };
        let mut c = Counts::default();
        if let Ok(v) = self.clients.get(&ck, 0) {
            c.to_peer_packets = v.packets;
            c.to_peer_bytes = v.bytes;
        }
        if let Ok(v) = self.peers.get(&pk, 0) {
            c.from_peer_packets = v.packets;
            c.from_peer_bytes = v.bytes;
        }
        c
    }

    /// Packets the program forwarded, packets of installed flows it
    /// looked at, and of those the ones passed to user space for want of
    /// a route or neighbour; summed over CPUs.
    pub fn totals(&self) -> (u64, u64, u64) {
        let sum = |slot: u32| {
            self.stats
                .get(&slot, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        (sum(0), sum(1), sum(2))
    }

    /// Entries installed.
    pub fn len(&self) -> usize {
        self.clients.keys().count()
    }

    /// Whether no entry is installed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Attaches the pass-through program to `iface`: a veth end that
    /// receives redirected frames needs an XDP program of its own (tests
    /// and benchmarks put one on the far ends of their veth pairs).
    pub fn attach_pass(&mut self, iface: &str) -> Result<bool, Error> {
        attach(&mut self.ebpf, "pass", iface)
    }
}
