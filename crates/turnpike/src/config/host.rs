//! What validation needs to know about the host, read once before it:
//! addresses, privileges, cores and the files options name. Tests build
//! a [`HostFacts`] by hand; a reload re-reads only the files.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use super::Options;

/// The facts [`validate`](super::validate()) decides by.
#[derive(Debug, Clone, Default)]
pub struct HostFacts {
    /// IPv6 sockets work here (`::1` binds).
    pub ipv6: bool,
    /// The IPv4 address this host routes with, if it has a route.
    pub routed_v4: Option<Ipv4Addr>,
    /// The global IPv6 address this host routes with, if any.
    pub routed_v6: Option<Ipv6Addr>,
    /// Every address of the host's interfaces (empty: unknown).
    pub addresses: Vec<IpAddr>,
    /// This process may bind ports below 1024.
    pub privileged_ports: bool,
    /// CPU cores available to this process.
    pub cores: usize,
    /// The text of each file an option names (secret, token and Redis URL
    /// files), or why it could not be read.
    pub files: BTreeMap<PathBuf, Result<String, String>>,
    /// Whether the `--db` file exists.
    pub db_exists: bool,
    /// Where the user database is when `--db` is not given.
    pub default_db: PathBuf,
}

impl HostFacts {
    /// Reads everything `options` needs from this host.
    pub fn read(options: &Options) -> HostFacts {
        HostFacts {
            ipv6: std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok(),
            routed_v4: routed_ipv4(),
            routed_v6: routed_ipv6(),
            addresses: udp_io::local_addresses(),
            privileged_ports: can_bind_privileged(),
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            files: BTreeMap::new(),
            db_exists: false,
            default_db: PathBuf::new(),
        }
        .with_files_of(options)
    }

    /// These facts with the files `options` names read again (a reload:
    /// the network and privileges are as they were at start).
    pub fn with_files_of(mut self, options: &Options) -> HostFacts {
        let named = options
            .auth_secret_file
            .iter()
            .chain(&options.admin_token_file)
            .chain(&options.redis_url_file)
            .chain(&options.db_url_file)
            .chain(&options.events_webhook_secret_file);
        self.files = named
            .map(|f| (f.clone(), std::fs::read_to_string(f).map_err(|e| e.to_string())))
            .collect();
        self.db_exists = options.db.as_ref().is_some_and(|d| d.exists());
        self.default_db = crate::userdb::default_path();
        self
    }

    /// The text of a file an option names.
    pub(super) fn file(&self, option: &str, path: &std::path::Path) -> anyhow::Result<&str> {
        match self.files.get(path) {
            Some(Ok(text)) => Ok(text),
            Some(Err(e)) => anyhow::bail!("{option}: cannot read {}: {e}", path.display()),
            None => anyhow::bail!("{option}: {} was not read", path.display()),
        }
    }
}

/// The first non-loopback, non-link-local IPv4 address of this host.
fn routed_ipv4() -> Option<Ipv4Addr> {
    // A UDP connect() sends no packet; it only makes the kernel choose the
    // source address it would route with, which is the address peers see.
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).ok()?;
    match s.local_addr().ok()? {
        SocketAddr::V4(a) if !a.ip().is_unspecified() && !a.ip().is_loopback() => Some(*a.ip()),
        _ => None,
    }
}

/// This host's global IPv6 address, the one it would route with.
fn routed_ipv6() -> Option<Ipv6Addr> {
    let s = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9))
        .ok()?;
    match s.local_addr().ok()? {
        SocketAddr::V6(a) => {
            let ip = *a.ip();
            // Global unicast 2000::/3 only: not loopback, link-local or ULA.
            ((ip.segments()[0] & 0xe000) == 0x2000).then_some(ip)
        }
        SocketAddr::V4(_) => None,
    }
}

/// Whether this process may bind ports below 1024 (root, or
/// CAP_NET_BIND_SERVICE, or a lowered ip_unprivileged_port_start).
fn can_bind_privileged() -> bool {
    let unprivileged_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|v| v.trim().parse::<u16>().ok());
    if unprivileged_start.is_some_and(|p| p <= 1) {
        return true;
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let euid_root = status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    // CAP_NET_BIND_SERVICE is capability 10 in CapEff.
    let cap = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|c| c & (1 << 10) != 0);
    euid_root || cap
}
