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
//! IPv4 and IPv6, each entry of one family (an entry mixing them is
//! refused with [`Error::Unsupported`] and its channel stays in user
//! space, as do IPv6 channels where an interface has no IPv6).

mod link;

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
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
    /// The entry is of a kind the program does not handle (mixed
    /// families, or IPv6 where an interface has none).
    Unsupported(&'static str),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::NotBuilt => f.write_str(
                "this build has no XDP program (clang and libbpf-dev were not installed when it was built)",
            ),
            Error::Kernel(e) => write!(f, "{e}"),
            Error::Unsupported(what) => write!(f, "not handled by the fast path: {what}"),
        }
    }
}

impl std::error::Error for Error {}

fn kernel(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Kernel(format!("{what}: {e}"))
}

/// The map layouts, one set per family: `#[repr(C)]` twins of the C
/// structs in `turn_fast.c`, addresses and ports in network byte order.
macro_rules! layouts {
    ($ck:ident, $cv:ident, $pk:ident, $pv:ident, $ip:ty) => {
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        struct $ck {
            client_ip: $ip,
            server_ip: $ip,
            client_port: u16,
            server_port: u16,
            channel: u16,
            pad: u16,
        }

        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default)]
        struct $cv {
            relay_ip: $ip,
            peer_ip: $ip,
            relay_port: u16,
            peer_port: u16,
            flags: u32,
            ifindex: u32,
            pad: u32,
            expires_ns: u64,
            limit: u64,
            packets: u64,
            bytes: u64,
        }

        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        struct $pk {
            relay_ip: $ip,
            peer_ip: $ip,
            relay_port: u16,
            peer_port: u16,
            pad: u32,
        }

        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default)]
        struct $pv {
            client_ip: $ip,
            server_ip: $ip,
            client_port: u16,
            server_port: u16,
            channel: u16,
            pad: u16,
            ifindex: u32,
            pad2: u32,
            expires_ns: u64,
            limit: u64,
            packets: u64,
            bytes: u64,
        }

        // SAFETY: plain `#[repr(C)]` data of integers with explicit padding
        // fields, matching the C structs byte for byte; any bit pattern is
        // valid.
        unsafe impl aya::Pod for $ck {}
        // SAFETY: as above.
        unsafe impl aya::Pod for $cv {}
        // SAFETY: as above.
        unsafe impl aya::Pod for $pk {}
        // SAFETY: as above.
        unsafe impl aya::Pod for $pv {}
    };
}

layouts!(ClientKey, ClientVal, PeerKey, PeerVal, u32);
layouts!(ClientKey6, ClientVal6, PeerKey6, PeerVal6, [u32; 4]);

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
    /// Client → peer payload bytes (of [`Counts::to_peer_bytes`]) up to
    /// which the kernel forwards; past it, packets go to user space.
    /// `u64::MAX`: no limit.
    pub to_peer_limit: u64,
    /// The same for peer → client.
    pub from_peer_limit: u64,
}

/// The index of the interface holding `ip` (where the kernel sends a
/// datagram from it), if any: udp-io's interface walk, the one place that
/// reads getifaddrs.
pub fn interface_of(ip: IpAddr) -> Option<u32> {
    udp_io::interface_of(ip)
}

/// Network byte order in memory, as the program compares it.
fn port(a: SocketAddr) -> u16 {
    a.port().to_be()
}

fn ip4(a: SocketAddr) -> Option<u32> {
    match a.ip() {
        IpAddr::V4(ip) => Some(u32::from_ne_bytes(ip.octets())),
        IpAddr::V6(_) => None,
    }
}

fn ip6(a: SocketAddr) -> Option<[u32; 4]> {
    match a.ip() {
        IpAddr::V6(ip) => {
            let o = ip.octets();
            Some(std::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            }))
        }
        IpAddr::V4(_) => None,
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

/// What the program counted, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Packets forwarded.
    pub forwarded: u64,
    /// Packets of installed flows looked at.
    pub matched: u64,
    /// Of those, passed to user space for want of a route or neighbour,
    /// or over the route's MTU.
    pub no_route: u64,
    /// Of those, passed to user space because the sender left the UDP
    /// checksum to offload (a local sender on veth).
    pub partial_checksum: u64,
}

/// `struct neigh_key` of `turn_fast.c`: a next hop learned from
/// arriving packets (TURN_NEIGH), copied across a binary upgrade.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NeighKey {
    ip: [u32; 4],
    family: u32,
}

/// `struct neigh_val` of `turn_fast.c`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct NeighVal {
    ifindex: u32,
    remote: [u8; 6],
    local: [u8; 6],
    pad: u32,
    seen_ns: u64,
}

// SAFETY: plain `#[repr(C)]` data with no padding the kernel could leave
// uninitialised that Rust would read as anything but bytes.
unsafe impl aya::Pod for NeighKey {}
// SAFETY: as above.
unsafe impl aya::Pod for NeighVal {}

/// One family's two maps.
struct Maps<CK: aya::Pod, CV: aya::Pod, PK: aya::Pod, PV: aya::Pod> {
    clients: HashMap<MapData, CK, CV>,
    peers: HashMap<MapData, PK, PV>,
}

/// What the fast path needs of one family's map values.
trait Value: aya::Pod {
    fn counts(&self) -> (u64, u64);
    fn keep_counts(&mut self, old: &Self);
}

macro_rules! value {
    ($t:ty) => {
        impl Value for $t {
            fn counts(&self) -> (u64, u64) {
                (self.packets, self.bytes)
            }
            fn keep_counts(&mut self, old: &Self) {
                self.packets = old.packets;
                self.bytes = old.bytes;
            }
        }
    };
}
value!(ClientVal);
value!(PeerVal);
value!(ClientVal6);
value!(PeerVal6);

impl<CK: aya::Pod, CV: Value, PK: aya::Pod, PV: Value> Maps<CK, CV, PK, PV> {
    fn take(ebpf: &mut aya::Ebpf, clients: &str, peers: &str) -> Result<Self, Error> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| Error::Kernel(format!("no map {name} in the object")))
        };
        let c = take(clients)?;
        let p = take(peers)?;
        Ok(Maps {
            clients: HashMap::try_from(c).map_err(|e| kernel(clients, e))?,
            peers: HashMap::try_from(p).map_err(|e| kernel(peers, e))?,
        })
    }

    /// Writes both halves, keeping the counts of what was there.
    fn install(&mut self, ck: CK, mut cv: CV, pk: PK, mut pv: PV) -> Result<(), Error> {
        if let Ok(old) = self.clients.get(&ck, 0) {
            cv.keep_counts(&old);
        }
        if let Ok(old) = self.peers.get(&pk, 0) {
            pv.keep_counts(&old);
        }
        self.clients
            .insert(ck, cv, 0)
            .map_err(|e| kernel("client map insert", e))?;
        self.peers
            .insert(pk, pv, 0)
            .map_err(|e| kernel("peer map insert", e))?;
        Ok(())
    }

    fn counts(&self, ck: &CK, pk: &PK) -> Counts {
        let mut c = Counts::default();
        if let Ok(v) = self.clients.get(ck, 0) {
            (c.to_peer_packets, c.to_peer_bytes) = v.counts();
        }
        if let Ok(v) = self.peers.get(pk, 0) {
            (c.from_peer_packets, c.from_peer_bytes) = v.counts();
        }
        c
    }

    fn remove(&mut self, ck: &CK, pk: &PK) {
        let _ = self.clients.remove(ck);
        let _ = self.peers.remove(pk);
    }

    fn len(&self) -> usize {
        self.clients.keys().count()
    }
}

/// An entry's two map keys, in its family's maps.
enum Keys {
    V4(ClientKey, PeerKey),
    V6(ClientKey6, PeerKey6),
}

/// `None` for an entry mixing families (never installed).
fn keys(e: &Entry) -> Option<Keys> {
    let (cp, sp, rp, pp) = (port(e.client), port(e.server), port(e.relay), port(e.peer));
    macro_rules! pair {
        ($ck:ident, $pk:ident, $c:expr, $s:expr, $r:expr, $p:expr) => {
            (
                $ck {
                    client_ip: $c,
                    server_ip: $s,
                    client_port: cp,
                    server_port: sp,
                    channel: e.channel,
                    pad: 0,
                },
                $pk {
                    relay_ip: $r,
                    peer_ip: $p,
                    relay_port: rp,
                    peer_port: pp,
                    pad: 0,
                },
            )
        };
    }
    if let (Some(c), Some(s), Some(r), Some(p)) = (ip4(e.client), ip4(e.server), ip4(e.relay), ip4(e.peer)) {
        let (ck, pk) = pair!(ClientKey, PeerKey, c, s, r, p);
        return Some(Keys::V4(ck, pk));
    }
    if let (Some(c), Some(s), Some(r), Some(p)) = (ip6(e.client), ip6(e.server), ip6(e.relay), ip6(e.peer)) {
        let (ck, pk) = pair!(ClientKey6, PeerKey6, c, s, r, p);
        return Some(Keys::V6(ck, pk));
    }
    None
}

/// The loaded program, attached to some interfaces, and its maps.
pub struct FastPath {
    ebpf: aya::Ebpf,
    v4: Maps<ClientKey, ClientVal, PeerKey, PeerVal>,
    v6: Maps<ClientKey6, ClientVal6, PeerKey6, PeerVal6>,
    stats: PerCpuArray<MapData, u64>,
    /// Interfaces and whether the program runs in the driver (native) or
    /// in the generic path.
    attached: Vec<(String, bool)>,
    /// The BPF link on each of `attached`, in order; none where the kernel
    /// has no XDP links (before 5.9: attached through netlink, and not
    /// handed over).
    links: Vec<Option<OwnedFd>>,
    /// What an earlier process counted before a binary upgrade: the
    /// totals continue from it.
    counted_before: Totals,
    /// A binary upgrade's old process's learned next hops (TURN_NEIGH),
    /// copied into this program's map when it takes the links.
    old_neighbours: Option<OwnedFd>,
    /// Why IPv6 entries are not taken, if they are not.
    no_v6: Option<String>,
    /// Where next hops come from.
    next_hops: String,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("attached", &self.attached)
            .field("no_v6", &self.no_v6)
            .field("next_hops", &self.next_hops)
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

fn program<'a>(ebpf: &'a mut aya::Ebpf, program: &str) -> Result<&'a mut Xdp, Error> {
    let prog: &mut Xdp = ebpf
        .program_mut(program)
        .ok_or_else(|| Error::Kernel(format!("no program {program} in the object")))?
        .try_into()
        .map_err(|e| kernel("the program is not XDP", e))?;
    if prog.fd().is_err() {
        prog.load()
            .map_err(|e| kernel("the kernel refused the program", e))?;
    }
    Ok(prog)
}

fn attach(ebpf: &mut aya::Ebpf, program: &str, iface: &str) -> Result<bool, Error> {
    let prog = self::program(ebpf, program)?;
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

/// Attaches `turn_fast` to `iface` as a BPF link (native, else generic),
/// or through netlink where the kernel has no XDP links: whether native,
/// and the link.
fn attach_link(ebpf: &mut aya::Ebpf, iface: &str) -> Result<(bool, Option<OwnedFd>), Error> {
    let (index, _) = index_and_mtu(iface)?;
    let prog = program(ebpf, "turn_fast")?;
    let fd = prog.fd().map_err(|e| kernel("the program", e))?.as_fd();
    for (native, flags) in [(true, XdpFlags::DRV_MODE), (false, XdpFlags::SKB_MODE)] {
        if let Ok(l) = link::create(fd, index, flags.bits()) {
            return Ok((native, Some(l)));
        }
    }
    attach(ebpf, "turn_fast", iface).map(|native| (native, None))
}

/// The first of `interfaces` that does not forward `family` ("ipv4",
/// "ipv6"), or whether one has no IPv6 at all.
fn forwarding(interfaces: &[String], family: &str) -> Result<Forwarding, Error> {
    for iface in interfaces {
        let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => {}
            Ok(_) => return Ok(Forwarding::Off(iface.clone())),
            Err(_) if family == "ipv4" => return Err(Error::Kernel(format!("no interface {iface}"))),
            // IPv6 off on this host or interface.
            Err(_) => return Ok(Forwarding::NoFamily(format!("{iface} has no IPv6"))),
        }
    }
    Ok(Forwarding::On)
}

enum Forwarding {
    /// Every interface forwards: the kernel's table gives next hops.
    On,
    /// This one does not: next hops are learned from arriving packets.
    Off(String),
    /// The family is off here.
    NoFamily(String),
}

/// An interface's index and MTU, from sysfs.
fn index_and_mtu(iface: &str) -> Result<(u32, u32), Error> {
    let read = |what: &str| -> Result<u32, Error> {
        std::fs::read_to_string(format!("/sys/class/net/{iface}/{what}"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| Error::Kernel(format!("no {what} for interface {iface}")))
    };
    Ok((read("ifindex")?, read("mtu")?))
}

impl FastPath {
    /// Loads the program and attaches it to `interfaces`. Where an
    /// interface forwards, the program sends by the kernel's forwarding
    /// table; where it does not (a host that is no router), by the next
    /// hop learned from the destination's own packets, so forwarding need
    /// not be switched on ([`FastPath::next_hops`] says which). IPv6
    /// channels stay in user space where an interface has no IPv6
    /// ([`FastPath::ipv6_unavailable`]).
    pub fn load(interfaces: &[String]) -> Result<FastPath, Error> {
        let mut f = Self::load_detached(interfaces)?;
        for iface in interfaces {
            let (native, link) = attach_link(&mut f.ebpf, iface)?;
            f.attached.push((iface.clone(), native));
            f.links.push(link);
        }
        Ok(f)
    }

    /// Loads the program for a binary upgrade's `handed` links (interface,
    /// native, link) without attaching it: the old process's program keeps
    /// relaying its entries while this one's maps are filled from the
    /// snapshot, until [`FastPath::adopt_links`] swaps it in.
    /// `neighbours` is the old program's learned next hops (TURN_NEIGH),
    /// copied at the swap so a host that does not forward need not learn
    /// them again.
    pub fn load_onto(
        handed: Vec<(String, bool, OwnedFd)>,
        neighbours: Option<OwnedFd>,
    ) -> Result<FastPath, Error> {
        let interfaces: Vec<String> = handed.iter().map(|(i, ..)| i.clone()).collect();
        let mut f = Self::load_detached(&interfaces)?;
        f.old_neighbours = neighbours;
        for (iface, native, link) in handed {
            f.attached.push((iface, native));
            f.links.push(Some(link));
        }
        Ok(f)
    }

    fn load_detached(interfaces: &[String]) -> Result<FastPath, Error> {
        if interfaces.is_empty() {
            return Err(Error::Kernel("no interface to attach to".into()));
        }
        let next_hops = match forwarding(interfaces, "ipv4")? {
            Forwarding::On => "the kernel's forwarding table".to_owned(),
            Forwarding::Off(iface) | Forwarding::NoFamily(iface) => {
                format!("learned from arriving packets ({iface} does not forward, and need not)")
            }
        };
        let no_v6 = match forwarding(interfaces, "ipv6")? {
            Forwarding::NoFamily(why) => Some(why),
            Forwarding::On | Forwarding::Off(_) => None,
        };
        let mut ebpf = Self::prepared(interfaces)?;
        program(&mut ebpf, "turn_fast")?;
        Self::with_maps(ebpf, Vec::new(), Vec::new(), no_v6, next_hops)
    }

    /// The object loaded, with each interface's MTU in its map.
    fn prepared(interfaces: &[String]) -> Result<aya::Ebpf, Error> {
        let mut ebpf = load_object()?;
        {
            let mtus = ebpf
                .map_mut("TURN_MTU")
                .ok_or_else(|| Error::Kernel("no map TURN_MTU in the object".into()))?;
            let mut mtus: HashMap<_, u32, u32> =
                HashMap::try_from(mtus).map_err(|e| kernel("TURN_MTU", e))?;
            for iface in interfaces {
                let (index, mtu) = index_and_mtu(iface)?;
                mtus.insert(index, mtu, 0).map_err(|e| kernel("TURN_MTU", e))?;
            }
        }
        Ok(ebpf)
    }

    fn with_maps(
        mut ebpf: aya::Ebpf,
        attached: Vec<(String, bool)>,
        links: Vec<Option<OwnedFd>>,
        no_v6: Option<String>,
        next_hops: String,
    ) -> Result<FastPath, Error> {
        let v4 = Maps::take(&mut ebpf, "TURN_CLIENTS", "TURN_PEERS")?;
        let v6 = Maps::take(&mut ebpf, "TURN_CLIENTS6", "TURN_PEERS6")?;
        let stats = ebpf
            .take_map("TURN_STATS")
            .ok_or_else(|| Error::Kernel("no map TURN_STATS in the object".into()))?;
        let stats = PerCpuArray::try_from(stats).map_err(|e| kernel("TURN_STATS", e))?;
        Ok(FastPath {
            ebpf,
            v4,
            v6,
            stats,
            attached,
            links,
            counted_before: Totals::default(),
            old_neighbours: None,
            no_v6,
            next_hops,
        })
    }

    /// Puts this process's program on every link (atomically on each): a
    /// binary upgrade's new process does so once its maps hold the
    /// snapshot's entries; the old one does so to take its links back
    /// when an upgrade fails after the new one had swapped.
    pub fn adopt_links(&mut self) -> Result<(), Error> {
        if let Some(old) = self.old_neighbours.take() {
            self.copy_neighbours(old)?;
        }
        let prog = program(&mut self.ebpf, "turn_fast")?;
        let prog = prog.fd().map_err(|e| kernel("the program", e))?.as_fd();
        for ((iface, _), l) in self.attached.iter().zip(&self.links) {
            if let Some(l) = l {
                link::update(l.as_fd(), prog)
                    .map_err(|e| kernel(&format!("swapping the program on {iface}"), e))?;
            }
        }
        Ok(())
    }

    /// Copies the next hops another program learned into this one's map.
    fn copy_neighbours(&mut self, old: OwnedFd) -> Result<(), Error> {
        let old =
            aya::maps::Map::LruHashMap(MapData::from_fd(old).map_err(|e| kernel("the old TURN_NEIGH", e))?);
        let old: HashMap<_, NeighKey, NeighVal> =
            HashMap::try_from(old).map_err(|e| kernel("the old TURN_NEIGH", e))?;
        let ours = self
            .ebpf
            .map_mut("TURN_NEIGH")
            .ok_or_else(|| Error::Kernel("no map TURN_NEIGH in the object".into()))?;
        let mut ours: HashMap<_, NeighKey, NeighVal> =
            HashMap::try_from(ours).map_err(|e| kernel("TURN_NEIGH", e))?;
        for (k, v) in old.iter().flatten() {
            ours.insert(k, v, 0).map_err(|e| kernel("TURN_NEIGH", e))?;
        }
        Ok(())
    }

    /// The learned next hops' map (TURN_NEIGH), for a binary upgrade's
    /// new process to copy.
    pub fn neighbours(&self) -> Option<BorrowedFd<'_>> {
        match self.ebpf.map("TURN_NEIGH")? {
            aya::maps::Map::LruHashMap(m) | aya::maps::Map::HashMap(m) => Some(m.fd().as_fd()),
            _ => None,
        }
    }

    /// The links to hand to a binary upgrade's new process (interface,
    /// native, link), or why they cannot be.
    pub fn links(&self) -> Result<Vec<(String, bool, BorrowedFd<'_>)>, Error> {
        self.attached
            .iter()
            .zip(&self.links)
            .map(|((iface, native), l)| match l {
                Some(l) => Ok((iface.clone(), *native, l.as_fd())),
                None => Err(Error::Kernel(format!(
                    "the program is attached to {iface} through netlink (a kernel without XDP links, before 5.9), which cannot be handed over"
                ))),
            })
            .collect()
    }

    /// Where the program takes next hops from (the forwarding table, or
    /// what it learned), for the start-up summary.
    pub fn next_hops(&self) -> &str {
        &self.next_hops
    }

    /// The interfaces the program runs on, and whether natively.
    pub fn interfaces(&self) -> &[(String, bool)] {
        &self.attached
    }

    /// Why IPv6 channels stay in user space, if they do.
    pub fn ipv6_unavailable(&self) -> Option<&str> {
        self.no_v6.as_deref()
    }

    /// Installs `e`, or moves its expiry and limits (its counts are kept).
    pub fn install(&mut self, e: &Entry) -> Result<(), Error> {
        let Some(keys) = keys(e) else {
            return Err(Error::Unsupported("an entry mixing IPv4 and IPv6"));
        };
        // Out of the interfaces holding the relay and the listener address.
        let relay_if = interface_of(e.relay.ip()).unwrap_or(0);
        let server_if = interface_of(e.server.ip()).unwrap_or(0);
        // Each half's value is the other half's key, with what to do.
        macro_rules! values {
            ($ck:ident, $pk:ident, $cv:ident, $pv:ident) => {
                (
                    $cv {
                        relay_ip: $pk.relay_ip,
                        peer_ip: $pk.peer_ip,
                        relay_port: $pk.relay_port,
                        peer_port: $pk.peer_port,
                        flags: e.dont_fragment as u32,
                        ifindex: relay_if,
                        pad: 0,
                        expires_ns: e.expires_ns,
                        limit: e.to_peer_limit,
                        packets: 0,
                        bytes: 0,
                    },
                    $pv {
                        client_ip: $ck.client_ip,
                        server_ip: $ck.server_ip,
                        client_port: $ck.client_port,
                        server_port: $ck.server_port,
                        channel: e.channel,
                        pad: 0,
                        ifindex: server_if,
                        pad2: 0,
                        expires_ns: e.expires_ns,
                        limit: e.from_peer_limit,
                        packets: 0,
                        bytes: 0,
                    },
                )
            };
        }
        match keys {
            Keys::V4(ck, pk) => {
                let (cv, pv) = values!(ck, pk, ClientVal, PeerVal);
                self.v4.install(ck, cv, pk, pv)
            }
            Keys::V6(ck, pk) => {
                if self.no_v6.is_some() {
                    return Err(Error::Unsupported("IPv6 (an interface has none)"));
                }
                let (cv, pv) = values!(ck, pk, ClientVal6, PeerVal6);
                self.v6.install(ck, cv, pk, pv)
            }
        }
    }

    /// Removes `e` (its expiry is not looked at); the counts it had.
    pub fn remove(&mut self, e: &Entry) -> Counts {
        let c = self.counts(e);
        match keys(e) {
            Some(Keys::V4(ck, pk)) => self.v4.remove(&ck, &pk),
            Some(Keys::V6(ck, pk)) => self.v6.remove(&ck, &pk),
            None => {}
        }
        c
    }

    /// What `e` forwarded so far.
    pub fn counts(&self, e: &Entry) -> Counts {
        match keys(e) {
            Some(Keys::V4(ck, pk)) => self.v4.counts(&ck, &pk),
            Some(Keys::V6(ck, pk)) => self.v6.counts(&ck, &pk),
            None => Counts::default(),
        }
    }

    /// What the program counted, summed over CPUs.
    pub fn totals(&self) -> Totals {
        let sum = |slot: u32| {
            self.stats
                .get(&slot, 0)
                .map(|v| v.iter().sum::<u64>())
                .unwrap_or(0)
        };
        let b = self.counted_before;
        Totals {
            forwarded: b.forwarded + sum(0),
            matched: b.matched + sum(1),
            no_route: b.no_route + sum(2),
            partial_checksum: b.partial_checksum + sum(3),
        }
    }

    /// Adds to the totals what the process before a binary upgrade
    /// counted (at the hand-over, and what its program relayed after).
    pub fn count_before(&mut self, more: Totals) {
        let b = &mut self.counted_before;
        b.forwarded += more.forwarded;
        b.matched += more.matched;
        b.no_route += more.no_route;
        b.partial_checksum += more.partial_checksum;
    }

    /// Entries installed.
    pub fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
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
