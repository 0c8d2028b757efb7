//! Turns a coturn `turnserver.conf` into an equivalent, commented
//! turnpike.toml (`turnpike import coturn`). Each setting that carries
//! over is written with the coturn line it came from; each that needs
//! nothing is noted; each that cannot carry over is listed with why, so
//! nothing is dropped without a word. The option-by-option answers are
//! [`crate::coturn::MAPPINGS`], the same table MIGRATING.md prints.

use std::net::IpAddr;
use std::path::PathBuf;

/// The result of a conversion.
#[derive(Debug, Default)]
pub struct Converted {
    /// The turnpike.toml text.
    pub toml: String,
    /// coturn lines that did not carry over, each with why.
    pub not_carried: Vec<String>,
    /// Where turnpike behaves otherwise than coturn did with this file, on
    /// purpose (secure defaults), and what to write to keep coturn's way.
    pub differences: Vec<String>,
    /// coturn's SQLite user database (`userdb=`), to import users from.
    pub userdb: Option<PathBuf>,
    /// coturn's Redis user database (`redis-userdb=`), as coturn wrote it.
    pub redis_userdb: Option<String>,
}

/// One coturn line: its option name (no dashes) and value, if any.
struct Line<'a> {
    key: &'a str,
    value: Option<&'a str>,
    text: &'a str,
}

fn lines(text: &str) -> impl Iterator<Item = Line<'_>> {
    text.lines().filter_map(|raw| {
        let t = raw.trim();
        if t.is_empty() || t.starts_with('#') {
            return None;
        }
        let t = t.trim_start_matches('-');
        // coturn takes `name=value`, `name value` and bare `name`.
        let (key, value) = match t.find(['=', ' ', '\t']) {
            Some(i) => (t[..i].trim(), Some(t[i + 1..].trim())),
            None => (t, None),
        };
        let value = value
            .map(|v| v.trim_start_matches('=').trim().trim_matches('"'))
            .filter(|v| !v.is_empty());
        Some(Line { key, value, text: t })
    })
}

fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| q(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// The CIDR blocks that exactly cover `lo..=hi` (one family).
pub fn range_to_cidrs(lo: IpAddr, hi: IpAddr) -> Option<Vec<String>> {
    let (a, b, bits) = match (lo, hi) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32u32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128u32),
        _ => return None,
    };
    if a > b {
        return None;
    }
    let show = |v: u128, prefix: u32| match bits {
        32 => format!("{}/{prefix}", std::net::Ipv4Addr::from(v as u32)),
        _ => format!("{}/{prefix}", std::net::Ipv6Addr::from(v)),
    };
    let mut out = Vec::new();
    let mut cur = a;
    loop {
        // The largest block aligned at `cur` that stays within `b`.
        let mut size_bits = if cur == 0 {
            bits
        } else {
            cur.trailing_zeros().min(bits)
        };
        while size_bits > 0 {
            let last = if size_bits >= 128 {
                u128::MAX
            } else {
                cur + ((1u128 << size_bits) - 1)
            };
            if last <= b {
                break;
            }
            size_bits -= 1;
        }
        out.push(show(cur, bits - size_bits));
        let last = if size_bits >= 128 {
            u128::MAX
        } else {
            cur + ((1u128 << size_bits) - 1)
        };
        if last >= b {
            return Some(out);
        }
        cur = last + 1;
    }
}

/// coturn's peer address forms (`IP`, `IP-IP`, or `IP/N`) as CIDRs.
fn peer_cidrs(v: &str) -> Option<Vec<String>> {
    if let Some((a, b)) = v.split_once('-') {
        return range_to_cidrs(a.trim().parse().ok()?, b.trim().parse().ok()?);
    }
    if v.contains('/') {
        return crate::config::parse_cidrs("peer", &[v.to_owned()])
            .ok()
            .map(|_| vec![v.to_owned()]);
    }
    let ip: IpAddr = v.parse().ok()?;
    Some(vec![format!("{ip}/{}", if ip.is_ipv4() { 32 } else { 128 })])
}

fn host_port(ip: &str, port: u16) -> String {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V6(v)) => format!("[{v}]:{port}"),
        _ => format!("{ip}:{port}"),
    }
}

fn mapping(key: &str) -> Option<&'static str> {
    crate::coturn::MAPPINGS
        .iter()
        .find(|m| m.coturn == key)
        .map(|m| m.turnpike)
}

/// coturn options that need nothing in turnpike at these values (coturn's
/// defaults, which turnpike shares) and cannot be set to any other.
const FIXED_DEFAULTS: &[(&str, &[&str])] = &[
    ("channel-lifetime", &["600", "-1", "0"]),
    ("permission-lifetime", &["300", "0"]),
    ("cipher-list", &["DEFAULT"]),
    ("rest-api-separator", &[":"]),
    ("allocation-default-address-family", &["ipv4"]),
];

/// Converts the text of a `turnserver.conf`.
pub fn convert(text: &str) -> Converted {
    // coturn with use-auth-secret, or a static-auth-secret (which turns it
    // on), authenticates REST-API credentials only: its `user=` lines and
    // database users are refused there (tests/integration/coturn_import.rs shows it
    // against coturn itself), so carrying them would let in more
    // credentials than before the move.
    let rest_only = lines(text).any(|l| l.key == "use-auth-secret" || l.key == "static-auth-secret");
    let both_peer_lists =
        lines(text).any(|l| l.key == "allowed-peer-ip") && lines(text).any(|l| l.key == "denied-peer-ip");
    let prometheus_port: Option<u16> = lines(text)
        .filter(|l| l.key == "prometheus-port")
        .filter_map(|l| l.value.and_then(|v| v.parse().ok()))
        .last();
    // Settings gathered first: coturn spreads one turnpike key over several
    // lines (listening-ip × listening-port), and repeats list options.
    let mut ips: Vec<String> = Vec::new();
    let mut port: u16 = 3478;
    let mut tls_port: u16 = 5349;
    let mut lists: Vec<(&'static str, Vec<String>, Vec<String>)> = Vec::new();
    let mut scalars: Vec<(&'static str, String, String)> = Vec::new();
    let mut noted: Vec<String> = Vec::new();
    let mut port_lines: Vec<String> = Vec::new();
    let mut push_list = |key: &'static str, values: Vec<String>, from: &str| match lists
        .iter_mut()
        .find(|(k, _, _)| *k == key)
    {
        Some((_, v, f)) => {
            v.extend(values);
            f.push(from.to_owned());
        }
        None => lists.push((key, values, vec![from.to_owned()])),
    };
    let mut not_carried: Vec<String> = Vec::new();
    let mut userdb = None;
    let mut redis_userdb = None;
    let mut not = |line: &Line<'_>, why: &str| not_carried.push(format!("{}: {why}", line.text));
    for l in lines(text) {
        let v = l.value;
        let num = |v: Option<&str>| v.and_then(|v| v.parse::<u64>().ok());
        match l.key {
            "listening-ip" => match v.and_then(|v| v.parse::<IpAddr>().ok()) {
                Some(ip) => ips.push(ip.to_string()),
                None => not(&l, "not an IP address"),
            },
            "listening-port" => match v.and_then(|v| v.parse().ok()) {
                Some(p) => {
                    port = p;
                    port_lines.push(l.text.to_owned());
                }
                None => not(&l, "not a port"),
            },
            "tls-listening-port" => match v.and_then(|v| v.parse().ok()) {
                Some(p) => {
                    tls_port = p;
                    port_lines.push(l.text.to_owned());
                }
                None => not(&l, "not a port"),
            },
            "relay-ip" => match v.and_then(|v| v.parse::<IpAddr>().ok()) {
                Some(ip) => push_list("relay-ip", vec![ip.to_string()], l.text),
                None => not(&l, "not an IP address"),
            },
            // PUBLIC or PUBLIC/PRIVATE: turnpike needs only the public one.
            "external-ip" => match v
                .and_then(|v| v.split('/').next())
                .and_then(|v| v.trim().parse::<IpAddr>().ok())
            {
                Some(ip) => push_list("external-ip", vec![ip.to_string()], l.text),
                None => not(&l, "not IP or IP/IP"),
            },
            "user" if rest_only => not(
                &l,
                "left out: with use-auth-secret or static-auth-secret coturn accepts REST-API credentials only, so this user could not log in there either",
            ),
            "user" => match v.filter(|v| v.contains(':')) {
                Some(u) => push_list("user", vec![u.to_owned()], l.text),
                None => not(&l, "not NAME:PASSWORD or NAME:0xKEY"),
            },
            "static-auth-secret" => match v {
                Some(s) => push_list("auth-secret", vec![s.to_owned()], l.text),
                None => not(&l, "no secret given"),
            },
            "alternate-server" => match v {
                Some(s) => push_list("alternate-server", vec![s.to_owned()], l.text),
                None => not(&l, "no address given"),
            },
            "denied-peer-ip" | "allowed-peer-ip" => {
                let key = if l.key == "denied-peer-ip" {
                    "deny-peer"
                } else {
                    "allow-peer"
                };
                match v.and_then(peer_cidrs) {
                    Some(c) => push_list(key, c, l.text),
                    None => not(&l, "not IP, IP-IP or IP/N"),
                }
            }
            "realm" if v.is_some_and(|r| r.len() > turn_core::max_realm_len()) => {
                let r = v.unwrap_or_default();
                scalars.push(("realm", q(r), l.text.to_owned()));
                // Keys are MD5(name:realm:password): the realm must stay.
                scalars.push((
                    "allow-long-realm",
                    "true".into(),
                    format!(
                        "(the realm is over {} bytes: kept, since users' MD5 keys depend on it, though its 401s are more than 3x a minimal request)",
                        turn_core::max_realm_len()
                    ),
                ));
            }
            "realm" | "cert" | "pkey" => match v {
                Some(s) => scalars.push((
                    match l.key {
                        "pkey" => "key",
                        "cert" => "cert",
                        _ => "realm",
                    },
                    q(s),
                    l.text.to_owned(),
                )),
                None => not(&l, "no value given"),
            },
            "min-port"
            | "max-port"
            | "user-quota"
            | "total-quota"
            | "max-bps"
            | "relay-threads"
            | "stale-nonce"
            | "max-allocate-lifetime" => {
                let key = match l.key {
                    "min-port" => "min-port",
                    "max-port" => "max-port",
                    "user-quota" => "user-quota",
                    "total-quota" => "total-quota",
                    "max-bps" => "max-bps",
                    "relay-threads" => "threads",
                    "max-allocate-lifetime" => "max-allocation-lifetime",
                    _ => "nonce-lifetime",
                };
                match (l.key, num(v)) {
                    // coturn's bare stale-nonce means its default, 600 s.
                    ("stale-nonce", None) if v.is_none() => {
                        scalars.push((key, "600".into(), l.text.to_owned()))
                    }
                    (_, Some(n)) => scalars.push((key, n.to_string(), l.text.to_owned())),
                    _ => not(&l, "not a number"),
                }
            }
            "no-tls" => scalars.push(("no-tls", "true".into(), l.text.to_owned())),
            "allow-loopback-peers" => {
                scalars.push(("allow-loopback-peers", "true".into(), l.text.to_owned()))
            }
            "verbose" | "v" => scalars.push(("log-level", q("debug"), l.text.to_owned())),
            "Verbose" | "V" => scalars.push(("log-level", q("trace"), l.text.to_owned())),
            "prometheus" => scalars.push((
                "metrics-listen",
                q(&format!("0.0.0.0:{}", prometheus_port.unwrap_or(9641))),
                match prometheus_port {
                    Some(p) => format!("{}` and `prometheus-port={p}", l.text),
                    None => l.text.to_owned(),
                },
            )),
            // Carried with `prometheus` above; alone it changes nothing.
            "prometheus-port" if lines(text).any(|l| l.key == "prometheus") => {}
            "prometheus-port" => noted.push(format!(
                "# coturn's `{}`: nothing: coturn's exporter is off without `prometheus`",
                l.text
            )),
            key if FIXED_DEFAULTS.iter().any(|(k, _)| *k == key) => {
                let (_, defaults) = FIXED_DEFAULTS.iter().find(|(k, _)| *k == key).expect("matched");
                let m = mapping(key).unwrap_or("nothing");
                if v.is_none_or(|v| defaults.iter().any(|d| d.eq_ignore_ascii_case(v))) {
                    noted.push(format!("# coturn's `{}`: {m}", l.text));
                } else {
                    not(&l, m);
                }
            }
            "userdb" | "db" | "b" if rest_only => not(
                &l,
                "its users are not imported: with use-auth-secret or static-auth-secret coturn accepts REST-API credentials only, so they could not log in there either",
            ),
            "userdb" | "db" | "b" => match v {
                Some(p) => {
                    userdb = Some(PathBuf::from(p));
                    noted.push(format!(
                        "# coturn's `{}`: its users are imported into turnpike's own database (see --turndb)",
                        l.text
                    ));
                }
                None => not(&l, "no file given"),
            },
            "redis-userdb" => {
                redis_userdb = v.map(str::to_owned);
                not(
                    &l,
                    "turnpike keeps its own Redis layout: import coturn's users with `turnpike import coturn-redis`, then set redis-url",
                );
            }
            key => match mapping(key) {
                Some(m) if m.starts_with("nothing") => noted.push(format!("# coturn's `{}`: {m}", l.text)),
                Some(m) => not(&l, m),
                None => not(&l, "not an option turnpike knows"),
            },
        }
    }
    let mut out = Converted {
        not_carried,
        ..Converted::default()
    };
    out.userdb = userdb;
    out.redis_userdb = redis_userdb;
    let listen: Vec<String> = if ips.is_empty() {
        if port == 3478 {
            Vec::new()
        } else {
            vec![host_port("0.0.0.0", port)]
        }
    } else {
        ips.iter().map(|ip| host_port(ip, port)).collect()
    };
    if ips.is_empty() {
        // Ports alone at turnpike's defaults (3478, 5349) need no line.
        for line in &port_lines {
            if line.ends_with("=3478")
                || line.ends_with("=5349")
                || line.ends_with(" 3478")
                || line.ends_with(" 5349")
            {
                noted.push(format!(
                    "# coturn's `{line}`: nothing: turnpike listens on 3478 (UDP, TCP) and 5349 (TLS) on every address by default"
                ));
            }
        }
    }
    let no_tls = scalars.iter().any(|(k, _, _)| *k == "no-tls");
    let tls_listen: Vec<String> = if no_tls || (ips.is_empty() && tls_port == 5349) {
        Vec::new()
    } else if ips.is_empty() {
        vec![host_port("0.0.0.0", tls_port)]
    } else {
        ips.iter().map(|ip| host_port(ip, tls_port)).collect()
    };

    // coturn relays to private and reserved ranges unless told not to;
    // turnpike refuses them unless told to (peer-policy, SECURITY.md).
    let allowed: Vec<&String> = lists
        .iter()
        .filter(|(k, _, _)| *k == "allow-peer")
        .flat_map(|(_, v, _)| v)
        .collect();
    out.differences.push(format!(
        "internal peers: coturn relays to private and reserved ranges (10/8, 172.16/12, 192.168/16, fc00::/7, ...) unless \
         denied-peer-ip names them; turnpike refuses them unless allow-peer names them{}. Add allow-peer CIDR for each \
         internal peer (an SFU, a media server) this server must reach",
        if allowed.is_empty() {
            String::new()
        } else {
            format!(" (this file allows {})", allowed.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
        }
    ));

    let mut t = String::new();
    t.push_str("# turnpike.toml written by `turnpike import coturn` from a coturn turnserver.conf.\n");
    t.push_str("# Each setting names the coturn line it came from. Check it, then run:\n");
    t.push_str("#   turnpike serve --config THIS_FILE\n");
    t.push_str("# Every key turnpike has: deploy/turnpike.toml; every coturn option: MIGRATING.md.\n\n");
    if !listen.is_empty() {
        t.push_str("# from coturn's listening-ip / listening-port\n");
        t.push_str(&format!("listen = {}\n", list(&listen)));
    }
    if !tls_listen.is_empty() {
        t.push_str("# from coturn's listening-ip / tls-listening-port\n");
        t.push_str(&format!("tls-listen = {}\n", list(&tls_listen)));
    }
    for (key, value, from) in &scalars {
        // A later line wins in coturn too; earlier ones become comments.
        let last = scalars.iter().rposition(|(k, _, _)| k == key);
        let this = scalars
            .iter()
            .position(|(k, v, f)| k == key && v == value && f == from);
        if from.starts_with('(') {
            t.push_str(&format!("# {from}\n"));
        } else {
            t.push_str(&format!("# from coturn's `{from}`\n"));
        }
        if last == this {
            t.push_str(&format!("{key} = {value}\n"));
        } else {
            t.push_str(&format!("# {key} = {value}   (overridden by a later line)\n"));
        }
    }
    for (key, values, from) in &lists {
        let shown: Vec<String> = from.iter().map(|f| format!("`{f}`")).collect();
        t.push_str(&format!("# from coturn's {}\n", shown.join(", ")));
        t.push_str(&format!("{key} = {}\n", list(values)));
    }
    if both_peer_lists {
        t.push_str(
            "# coturn's allowed-peer-ip beats its denied-peer-ip (an exception carved out of a\n\
             # denied range); turnpike's default is the other way round, so keep coturn's order\n",
        );
        t.push_str("peer-precedence = \"allow\"\n");
    }
    t.push_str(
        "# coturn accepts channel numbers 0x4000-0x7FFF (RFC 5766); RFC 8656 narrowed them to\n\
         # 0x4000-0x4FFF. Kept so coturn's clients (turnutils_uclient picks 0x5000-0x7FFF) keep\n\
         # working; remove once every client follows RFC 8656.\n",
    );
    t.push_str("rfc5766-channel-numbers = true\n");
    if !noted.is_empty() {
        t.push_str("\n# Nothing to do (already turnpike's default or behaviour):\n");
        for n in &noted {
            t.push_str(n);
            t.push('\n');
        }
    }
    t.push_str("\n# Where turnpike differs from coturn on purpose (check these):\n");
    for d in &out.differences {
        t.push_str(&format!("# - {d}\n"));
    }
    if !out.not_carried.is_empty() {
        t.push_str("\n# NOT carried over (do these by hand):\n");
        for n in &out.not_carried {
            t.push_str(&format!("# - {n}\n"));
        }
    }
    out.toml = t;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_become_exact_cidrs() {
        let c = |a: &str, b: &str| range_to_cidrs(a.parse().unwrap(), b.parse().unwrap()).unwrap();
        assert_eq!(c("10.0.0.0", "10.255.255.255"), ["10.0.0.0/8"]);
        assert_eq!(c("0.0.0.0", "255.255.255.255"), ["0.0.0.0/0"]);
        assert_eq!(c("192.168.1.1", "192.168.1.1"), ["192.168.1.1/32"]);
        assert_eq!(
            c("172.16.0.0", "172.31.255.255"),
            ["172.16.0.0/12"],
            "coturn's example range"
        );
        assert_eq!(
            c("10.0.0.1", "10.0.0.6"),
            ["10.0.0.1/32", "10.0.0.2/31", "10.0.0.4/31", "10.0.0.6/32"]
        );
        assert_eq!(c("::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"), ["::/0"]);
        assert_eq!(
            c("fc00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"),
            ["fc00::/7"]
        );
        assert!(range_to_cidrs("10.0.0.2".parse().unwrap(), "10.0.0.1".parse().unwrap()).is_none());
        assert!(range_to_cidrs("10.0.0.1".parse().unwrap(), "::1".parse().unwrap()).is_none());
    }
}
