//! STUN/TURN URIs (RFC 7064, RFC 7065) and how they resolve: A/AAAA,
//! one address per family, and DNS SRV when no port is given.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::Serialize;

use super::Common;

/// Which scheme a URL had.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// stun:
    Stun,
    /// stuns:
    Stuns,
    /// turn:
    Turn,
    /// turns:
    Turns,
}

/// A parsed STUN/TURN URI (RFC 7064, RFC 7065).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Uri {
    /// Scheme.
    pub scheme: Scheme,
    /// Host name or address literal (without brackets).
    pub host: String,
    /// Port (default 3478, or 5349 for the secure schemes).
    pub port: u16,
    /// `?transport=` value, lower-cased.
    pub transport: Option<String>,
    /// Whether the port was written in the URI (else the scheme's default).
    pub explicit_port: bool,
}

/// Parses `stun:`, `stuns:`, `turn:`, `turns:` URIs; a bare `host[:port]`
/// is taken as `stun:`/`turn:` per `default`.
pub fn parse_uri(s: &str, default: Scheme) -> Result<Uri> {
    let (scheme, rest) = match s.split_once(':') {
        Some((sch, rest))
            if ["stun", "stuns", "turn", "turns"].contains(&sch.to_ascii_lowercase().as_str()) =>
        {
            let scheme = match sch.to_ascii_lowercase().as_str() {
                "stun" => Scheme::Stun,
                "stuns" => Scheme::Stuns,
                "turn" => Scheme::Turn,
                _ => Scheme::Turns,
            };
            (scheme, rest)
        }
        _ => (default, s),
    };
    let rest = rest.trim_start_matches("//");
    let (hostport, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let mut transport = None;
    if let Some(q) = query {
        for kv in q.split('&') {
            match kv.split_once('=') {
                Some((k, v)) if k.eq_ignore_ascii_case("transport") => {
                    let v = v.to_ascii_lowercase();
                    if v != "udp" && v != "tcp" {
                        bail!("{s}: transport must be udp or tcp (RFC 7065), not {v:?}");
                    }
                    transport = Some(v);
                }
                _ => bail!("{s}: unknown URI parameter {kv:?} (only ?transport= is defined)"),
            }
        }
    }
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| anyhow::anyhow!("{s}: unclosed [ in IPv6 literal"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => bail!("{s}: unexpected {after:?} after the address"),
        };
        (h.to_owned(), port)
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_owned(), Some(p)),
            _ => (hostport.to_owned(), None),
        }
    };
    if host.is_empty() {
        bail!("{s}: no host");
    }
    let explicit_port = port.is_some();
    let port = match port {
        Some(p) => p.parse().map_err(|_| anyhow::anyhow!("{s}: bad port {p:?}"))?,
        None if matches!(scheme, Scheme::Stuns | Scheme::Turns) => 5349,
        None => 3478,
    };
    Ok(Uri {
        scheme,
        host,
        port,
        transport,
        explicit_port,
    })
}

/// The SRV service for a URI (RFC 7064 §3.3, RFC 7065 §3.3).
pub(super) fn srv_service(uri: &Uri) -> &'static str {
    match (uri.scheme, uri.transport.as_deref()) {
        (Scheme::Stun, _) => "_stun._udp",
        (Scheme::Stuns, _) => "_stuns._tcp",
        (Scheme::Turn, Some("tcp")) => "_turn._tcp",
        (Scheme::Turn, _) => "_turn._udp",
        (Scheme::Turns, _) => "_turns._tcp",
    }
}

/// Resolves a URI's host: an address literal as is; a name without a port
/// through SRV first (when a nameserver answers), then A/AAAA, one address
/// per family. Returns the addresses and a description of the SRV used.
pub(super) fn resolve(uri: &Uri, c: &Common) -> Result<(Vec<SocketAddr>, Option<String>)> {
    if let Ok(ip) = uri.host.parse::<IpAddr>() {
        return Ok((vec![SocketAddr::new(ip, uri.port)], None));
    }
    let (mut host, mut port, mut srv_used) = (uri.host.clone(), uri.port, None);
    if !uri.explicit_port {
        if let Some(ns) = c.dns_server.or_else(crate::dns::system_nameserver) {
            let name = format!("{}.{}", srv_service(uri), uri.host);
            let wait = Duration::from_millis(c.timeout_ms.min(1500));
            if let Some(first) = crate::dns::lookup_srv(&name, ns, wait).and_then(|v| v.into_iter().next()) {
                srv_used = Some(format!("{name} -> {}:{}", first.target, first.port));
                host = first.target;
                port = first.port;
            }
        }
    }
    let addrs: Vec<SocketAddr> = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| anyhow::anyhow!("cannot resolve {host}: {e}"))?
        .collect();
    // One address per family is enough for a diagnosis.
    let mut out = Vec::new();
    for fam_v4 in [true, false] {
        if let Some(a) = addrs.iter().find(|a| a.is_ipv4() == fam_v4) {
            out.push(*a);
        }
    }
    if out.is_empty() {
        bail!("{host} resolved to no address");
    }
    Ok((out, srv_used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = parse_uri("stun:example.org", Scheme::Stun).unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.transport),
            (Scheme::Stun, "example.org", 3478, None)
        );
        let u = parse_uri("turns:example.org", Scheme::Turn).unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Turns, 5349));
        let u = parse_uri("turn:192.0.2.1:3479?transport=tcp", Scheme::Turn).unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.transport.as_deref()),
            ("192.0.2.1", 3479, Some("tcp"))
        );
        let u = parse_uri("turn:[2001:db8::1]:3478?transport=UDP", Scheme::Turn).unwrap();
        assert_eq!(
            (u.host.as_str(), u.transport.as_deref()),
            ("2001:db8::1", Some("udp"))
        );
        let u = parse_uri("[::1]", Scheme::Stun).unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 3478));
        let u = parse_uri("127.0.0.1:5000", Scheme::Turn).unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Turn, 5000));
        assert!(parse_uri("turn:host?transport=sctp", Scheme::Turn).is_err());
        assert!(parse_uri("turn:host:notaport", Scheme::Turn).is_err());
        assert!(parse_uri("turn:[::1", Scheme::Turn).is_err());
        assert!(parse_uri("turn:", Scheme::Turn).is_err());
        assert!(!parse_uri("turn:h", Scheme::Turn).unwrap().explicit_port);
        assert!(parse_uri("turn:h:3478", Scheme::Turn).unwrap().explicit_port);
    }
}
