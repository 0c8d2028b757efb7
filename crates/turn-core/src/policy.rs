//! Which peers a relay may talk to (RFC 8656 §21.2.3 and
//! `docs/conformance/peer-policy.md`).
//!
//! The check runs on the *canonical* address: IPv4-mapped, IPv4-compatible,
//! NAT64 and 6to4 forms are unwrapped to the IPv4 address they carry before
//! any range is matched, so `::ffff:127.0.0.1` is loopback like `127.0.0.1`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

/// An address range in CIDR notation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

/// Why a CIDR string did not parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CidrError {
    /// The address part is not an IP address.
    BadAddress,
    /// The prefix length is missing digits or too long for the family.
    BadPrefix,
}

impl std::fmt::Display for CidrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CidrError::BadAddress => "not an IP address (expected e.g. 10.1.0.0/16 or fd00::/8)",
            CidrError::BadPrefix => "bad prefix length (0-32 for IPv4, 0-128 for IPv6)",
        })
    }
}

impl std::error::Error for CidrError {}

impl Cidr {
    /// A range; `prefix` is clamped to the family's width.
    pub fn new(addr: IpAddr, prefix: u8) -> Self {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        Cidr {
            addr,
            prefix: prefix.min(max),
        }
    }

    /// Whether `ip` lies in the range; families never match each other.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl Cidr {
    /// Whether every address of `other` is in this range.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix && self.contains(other.addr)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| CidrError::BadAddress)?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => {
                let p: u8 = p.trim().parse().map_err(|_| CidrError::BadPrefix)?;
                if p > max {
                    return Err(CidrError::BadPrefix);
                }
                p
            }
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn v4(a: u8, b: u8, c: u8, d: u8, p: u8) -> Cidr {
    Cidr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), p)
}

fn v6(s: [u16; 8], p: u8) -> Cidr {
    Cidr::new(
        IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7])),
        p,
    )
}

/// The ranges refused by default (peer-policy.md).
pub fn default_denied() -> Vec<Cidr> {
    vec![
        v4(0, 0, 0, 0, 8),
        v4(10, 0, 0, 0, 8),
        v4(100, 64, 0, 0, 10),
        v4(127, 0, 0, 0, 8),
        v4(169, 254, 0, 0, 16),
        v4(172, 16, 0, 0, 12),
        v4(192, 0, 0, 0, 24),
        v4(192, 0, 2, 0, 24),
        v4(192, 88, 99, 0, 24),
        v4(192, 168, 0, 0, 16),
        v4(198, 18, 0, 0, 15),
        v4(198, 51, 100, 0, 24),
        v4(203, 0, 113, 0, 24),
        v4(224, 0, 0, 0, 4),
        v4(240, 0, 0, 0, 4),
        v6([0; 8], 128),
        v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
        v6([0x64, 0xff9b, 1, 0, 0, 0, 0, 0], 48),
        v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
        v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 23),
        v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
        v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
        v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
        v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
        v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    ]
}

/// Unwraps an IPv4 address embedded in an IPv6 one: IPv4-mapped
/// (`::ffff:a.b.c.d`), IPv4-compatible (`::a.b.c.d`, not `::` or `::1`),
/// NAT64 well-known prefix (`64:ff9b::/96`) and 6to4 (`2002:AABB:CCDD::/16`).
pub fn canonicalize(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let s = v6.segments();
    let o = v6.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    if s[..5] == [0, 0, 0, 0, 0] && s[5] == 0xffff {
        return IpAddr::V4(tail);
    }
    // SIIT IPv4-translated (`::ffff:0:a.b.c.d`, RFC 7915 / RFC 2765).
    if s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        return IpAddr::V4(tail);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && u32::from(tail) > 1 {
        return IpAddr::V4(tail);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return IpAddr::V4(tail);
    }
    if s[0] == 0x2002 {
        return IpAddr::V4(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    ip
}

fn is_teredo(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if v6.segments()[..2] == [0x2001, 0])
}

fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback(),
    }
}

/// The forms that really reach this host's loopback: 127/8, `::1`, and
/// IPv4-mapped `::ffff:127.x.y.z` (a dual-stack socket sends it to 127/8).
/// Translated forms (NAT64, 6to4, IPv4-compatible, SIIT) route off the
/// host, so `allow-loopback-peers` does not allow them.
fn is_real_loopback(raw: IpAddr) -> bool {
    match raw {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

/// Why a peer was refused, for logs and metrics: the rule, and the range
/// that matched, so a refusal log says what to change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// Matched this operator `deny-peer` range.
    OperatorDenied(Cidr),
    /// In this range, refused by default (private, loopback, reserved, ...).
    DefaultDenied(Cidr),
    /// A Teredo address, refused outright: its real endpoint is unknowable.
    Teredo,
    /// One of the server's own listening sockets.
    OwnAddress,
}

impl Refusal {
    /// The rule alone, without the range (a bounded metric label).
    pub fn rule(&self) -> &'static str {
        match self {
            Refusal::OperatorDenied(_) => "deny-peer",
            Refusal::DefaultDenied(_) => "default-deny",
            Refusal::Teredo => "teredo",
            Refusal::OwnAddress => "own-listener",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::OperatorDenied(c) => write!(f, "in deny-peer {c}"),
            Refusal::DefaultDenied(c) if c.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)) || c.contains(IpAddr::V6(Ipv6Addr::LOCALHOST)) => {
                write!(f, "loopback {c}, refused by default (allow-loopback-peers to relay to it)")
            }
            Refusal::DefaultDenied(c) => write!(
                f,
                "in {c}, refused by default (RFC 8656 §21.2.3; allow-peer {c} or a narrower range to relay to it)"
            ),
            Refusal::Teredo => f.write_str("a Teredo address (2001::/32), always refused"),
            Refusal::OwnAddress => f.write_str("one of this server's own listening sockets, always refused"),
        }
    }
}

/// The relay's peer policy.
///
/// Order of decision: Teredo is refused; the server's own listening sockets
/// are refused, whatever else is allowed; then, on the canonical address, an
/// operator `deny-peer` range refuses and an `allow-peer` range allows. Which
/// of those two wins where they overlap is [`PeerPolicy::allow_wins`]: deny
/// by default (an operator carves a hole out of an allowed range), allow
/// with coturn's order (an exception, e.g. an SFU, carved out of a denied
/// range). Then `allow-loopback-peers` allows loopback and the default
/// ranges refuse.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    /// Operator `allow-peer` ranges.
    pub allow: Vec<Cidr>,
    /// Operator `deny-peer` ranges.
    pub deny: Vec<Cidr>,
    /// An `allow` range beats a `deny` range that also holds the peer
    /// (coturn's `allowed-peer-ip` over `denied-peer-ip`); otherwise deny
    /// wins.
    pub allow_wins: bool,
    /// Allow 127.0.0.0/8 and ::1 (tests, local media servers).
    pub allow_loopback: bool,
    /// Ranges refused unless allowed; [`default_denied`] normally.
    pub default_deny: Vec<Cidr>,
    /// The server's own listening sockets (UDP/TCP/TLS): relaying to them
    /// would loop traffic back into the server.
    pub own_sockets: Vec<SocketAddr>,
    /// The server's own IP addresses, matched with the ports of listeners
    /// bound to a wildcard address.
    pub own_ips: Vec<IpAddr>,
}

impl Default for PeerPolicy {
    fn default() -> Self {
        PeerPolicy {
            allow: Vec::new(),
            deny: Vec::new(),
            allow_wins: false,
            allow_loopback: false,
            default_deny: default_denied(),
            own_sockets: Vec::new(),
            own_ips: Vec::new(),
        }
    }
}

impl PeerPolicy {
    /// Decides on a peer address; `Ok(())` means relaying is allowed.
    pub fn check(&self, peer: SocketAddr) -> Result<(), Refusal> {
        let raw = peer.ip();
        if is_teredo(raw) {
            return Err(Refusal::Teredo);
        }
        let ip = canonicalize(raw);
        if self.is_own(ip, peer.port()) {
            return Err(Refusal::OwnAddress);
        }
        let allowed = self.allow.iter().any(|c| c.contains(ip));
        if let Some(d) = self.deny.iter().find(|c| c.contains(ip) || c.contains(raw)) {
            if !(allowed && self.allow_wins) {
                return Err(Refusal::OperatorDenied(*d));
            }
        }
        if allowed {
            return Ok(());
        }
        if self.allow_loopback && is_real_loopback(raw) {
            return Ok(());
        }
        if let Some(d) = self.default_deny.iter().find(|c| c.contains(ip)) {
            return Err(Refusal::DefaultDenied(*d));
        }
        // A translated form whose wrapper range is itself refused (6to4,
        // local-use NAT64) stays refused even when the inner address is public.
        if ip != raw {
            if let Some(d) = self.default_deny.iter().find(|c| c.contains(raw)) {
                return Err(Refusal::DefaultDenied(*d));
            }
        }
        Ok(())
    }

    fn is_own(&self, ip: IpAddr, port: u16) -> bool {
        self.own_sockets.iter().any(|s| {
            s.port() == port
                && (canonicalize(s.ip()) == ip
                    || (s.ip().is_unspecified()
                        && (is_loopback(ip) || self.own_ips.iter().any(|o| canonicalize(*o) == ip))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn rule(r: Result<(), Refusal>) -> Option<&'static str> {
        r.err().map(|r| r.rule())
    }

    /// Every range docs/conformance/peer-policy.md lists as refused by
    /// default is in `default_denied`, and the code refuses no range the
    /// table does not list.
    #[test]
    fn the_default_ranges_are_the_documented_table() {
        let doc = include_str!("../../../docs/conformance/peer-policy.md");
        let table: Vec<Cidr> = doc
            .lines()
            .skip_while(|l| !l.starts_with("Refuse by default"))
            .skip(1)
            .take_while(|l| !l.contains("own listening"))
            .flat_map(|l| l.split([',', ' ']))
            .filter(|w| w.contains('/'))
            .map(|w| {
                w.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("{w} in peer-policy.md"))
            })
            .collect();
        assert!(table.len() > 20, "{table:?}");
        let code = default_denied();
        for c in &table {
            assert!(
                code.contains(c),
                "{c} is in peer-policy.md but not refused by default"
            );
        }
        for c in &code {
            assert!(
                table.contains(c),
                "{c} is refused by default but not in peer-policy.md"
            );
        }
    }

    #[test]
    fn refusals_name_the_range_and_the_way_out() {
        let p = PeerPolicy {
            deny: vec!["203.0.113.0/24".parse().unwrap()],
            ..PeerPolicy::default()
        };
        let why = |a: &str| p.check(sa(a)).unwrap_err().to_string();
        assert_eq!(why("203.0.113.9:1"), "in deny-peer 203.0.113.0/24");
        assert!(
            why("10.1.2.3:1").contains("in 10.0.0.0/8, refused by default"),
            "{}",
            why("10.1.2.3:1")
        );
        assert!(why("10.1.2.3:1").contains("allow-peer 10.0.0.0/8"));
        assert!(why("127.0.0.1:1").contains("allow-loopback-peers"));
        assert!(why("[::1]:1").contains("allow-loopback-peers"));
    }

    #[test]
    fn every_default_range_is_refused_and_public_is_allowed() {
        let p = PeerPolicy::default();
        for peer in [
            "0.0.0.0:1",
            "10.1.2.3:1",
            "100.64.0.1:1",
            "127.0.0.1:1",
            "169.254.169.254:80",
            "172.16.0.1:1",
            "172.31.255.255:1",
            "192.0.0.8:1",
            "192.0.2.1:1",
            "192.88.99.1:1",
            "192.168.1.1:1",
            "198.18.0.1:1",
            "198.19.255.1:1",
            "198.51.100.1:1",
            "203.0.113.9:1",
            "224.0.0.1:1",
            "239.1.1.1:1",
            "240.0.0.1:1",
            "255.255.255.255:1",
            "[::]:1",
            "[::1]:1",
            "[64:ff9b:1::1]:1",
            "[100::1]:1",
            "[2001:db8::1]:1",
            "[2002::1]:1",
            "[fc00::1]:1",
            "[fd12::1]:1",
            "[fe80::1]:1",
            "[fec0::1]:1",
            "[ff02::1]:1",
            "[2001:0:1:2::1]:1",
        ] {
            assert!(p.check(sa(peer)).is_err(), "{peer} must be refused");
        }
        for peer in ["8.8.8.8:53", "1.1.1.1:1", "172.32.0.1:1", "[2606:4700::1111]:1"] {
            assert_eq!(p.check(sa(peer)), Ok(()), "{peer} must be allowed");
        }
    }

    #[test]
    fn precedence_between_allow_and_deny() {
        let allow: Vec<Cidr> = vec![
            "10.20.30.40/32".parse().unwrap(),
            "192.168.0.0/16".parse().unwrap(),
        ];
        let deny: Vec<Cidr> = vec!["10.0.0.0/8".parse().unwrap(), "192.168.5.0/24".parse().unwrap()];
        let mut p = PeerPolicy {
            allow,
            deny,
            own_sockets: vec![sa("0.0.0.0:3478")],
            own_ips: vec!["10.20.30.40".parse().unwrap()],
            ..PeerPolicy::default()
        };
        // Deny wins (turnpike's default): a hole in an allowed range.
        assert_eq!(rule(p.check(sa("10.20.30.40:5000"))), Some("deny-peer"));
        assert_eq!(rule(p.check(sa("192.168.5.1:1"))), Some("deny-peer"));
        assert_eq!(p.check(sa("192.168.6.1:1")), Ok(()));
        // Allow wins (coturn's order): the SFU carved out of 10/8 relays,
        // in every form of its address; the rest of 10/8 stays refused.
        p.allow_wins = true;
        assert_eq!(p.check(sa("10.20.30.40:5000")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:10.20.30.40]:5000")), Ok(()));
        assert_eq!(p.check(sa("192.168.5.1:1")), Ok(()));
        assert_eq!(rule(p.check(sa("10.20.30.41:5000"))), Some("deny-peer"));
        // The server's own listener stays refused whatever is allowed.
        assert_eq!(p.check(sa("10.20.30.40:3478")), Err(Refusal::OwnAddress));
    }

    #[test]
    fn embedded_ipv4_forms_are_canonicalised() {
        let p = PeerPolicy::default();
        for peer in [
            "[::ffff:127.0.0.1]:1",
            "[::ffff:10.0.0.1]:1",
            "[::127.0.0.1]:1",
            "[::ffff:169.254.169.254]:80",
            "[64:ff9b::7f00:1]:1",
            "[64:ff9b::a00:1]:1",
            "[2002:7f00:1::]:1",
            "[2002:c0a8:101::1]:1",
        ] {
            assert!(p.check(sa(peer)).is_err(), "{peer} must be refused");
        }
        // NAT64 of a public address is a public peer.
        assert_eq!(p.check(sa("[64:ff9b::808:808]:53")), Ok(()));
        assert_eq!(
            canonicalize("::ffff:1.2.3.4".parse().unwrap()),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            canonicalize("2002:0102:0304::".parse().unwrap()),
            "1.2.3.4".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn operator_overrides() {
        let mut p = PeerPolicy {
            allow: vec!["10.1.0.0/16".parse().unwrap()],
            deny: vec!["10.1.2.0/24".parse().unwrap(), "8.8.4.0/24".parse().unwrap()],
            ..PeerPolicy::default()
        };
        assert_eq!(p.check(sa("10.1.9.9:1")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:10.1.9.9]:1")), Ok(()));
        assert_eq!(rule(p.check(sa("10.1.2.3:1"))), Some("deny-peer"));
        assert_eq!(rule(p.check(sa("10.2.0.1:1"))), Some("default-deny"));
        assert_eq!(rule(p.check(sa("8.8.4.4:1"))), Some("deny-peer"));
        assert!(p.check(sa("127.0.0.1:5000")).is_err());
        p.allow_loopback = true;
        assert_eq!(p.check(sa("127.0.0.1:5000")), Ok(()));
        assert_eq!(p.check(sa("[::1]:5000")), Ok(()));
        assert_eq!(p.check(sa("[::ffff:127.0.0.2]:5000")), Ok(()));
    }

    #[test]
    fn own_listeners_are_refused_even_with_loopback_allowed() {
        let p = PeerPolicy {
            allow_loopback: true,
            own_sockets: vec![sa("0.0.0.0:3478"), sa("127.0.0.1:5349")],
            own_ips: vec!["8.8.8.8".parse().unwrap()],
            ..PeerPolicy::default()
        };
        assert_eq!(p.check(sa("127.0.0.1:3478")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("8.8.8.8:3478")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("127.0.0.1:5349")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("127.0.0.1:5350")), Ok(()));
        assert_eq!(p.check(sa("9.9.9.9:3478")), Ok(()));
    }

    #[test]
    fn siit_is_unwrapped_and_loopback_switch_allows_only_real_loopback() {
        let mut p = PeerPolicy::default();
        assert_eq!(
            canonicalize("::ffff:0:127.0.0.1".parse().unwrap()),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(rule(p.check(sa("[::ffff:0:127.0.0.1]:1"))), Some("default-deny"));
        assert_eq!(rule(p.check(sa("[::ffff:0:10.0.0.1]:1"))), Some("default-deny"));
        p.allow_loopback = true;
        for ok in ["127.0.0.1:1", "127.9.9.9:1", "[::1]:1", "[::ffff:127.0.0.1]:1"] {
            assert_eq!(p.check(sa(ok)), Ok(()), "{ok} is this host's loopback");
        }
        for off_host in [
            "[64:ff9b::7f00:1]:1",
            "[2002:7f00:1::1]:1",
            "[::127.0.0.1]:1",
            "[::ffff:0:127.0.0.1]:1",
        ] {
            assert!(p.check(sa(off_host)).is_err(), "{off_host} routes off the host");
        }
    }

    #[test]
    fn every_host_address_behind_a_wildcard_listener_is_own() {
        let p = PeerPolicy {
            own_sockets: vec![sa("0.0.0.0:3478"), sa("[::]:3478")],
            own_ips: vec!["192.0.2.10".parse().unwrap(), "2001:db8::10".parse().unwrap()],
            allow: vec!["192.0.2.0/24".parse().unwrap(), "2001:db8::/32".parse().unwrap()],
            ..PeerPolicy::default()
        };
        assert_eq!(p.check(sa("192.0.2.10:3478")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("[2001:db8::10]:3478")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("[::ffff:192.0.2.10]:3478")), Err(Refusal::OwnAddress));
        assert_eq!(p.check(sa("192.0.2.10:3479")), Ok(()));
        assert_eq!(p.check(sa("192.0.2.11:3478")), Ok(()));
    }

    #[test]
    fn cidr_parsing() {
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nonsense/8".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        let c: Cidr = "fd00::/8".parse().unwrap();
        assert!(c.contains("fd12::1".parse().unwrap()));
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains("1.2.3.4".parse().unwrap()));
        assert!(!c.contains("::1".parse().unwrap()));
        let one: Cidr = "1.2.3.4".parse().unwrap();
        assert!(one.contains("1.2.3.4".parse().unwrap()));
        assert!(!one.contains("1.2.3.5".parse().unwrap()));
    }
}
