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
    let mut g = Gathered::new(text);
    for l in lines(text) {
        g.line(&l);
    }
    g.finish()
}

/// What the lines of a `turnserver.conf` say, gathered first: coturn
/// spreads one turnpike key over several lines (listening-ip ×
/// listening-port) and repeats list options.
#[derive(Default)]
struct Gathered {
    /// coturn with use-auth-secret, or a static-auth-secret (which turns
    /// it on), authenticates REST-API credentials only: its `user=` lines
    /// and database users are refused there (tests/integration/
    /// coturn_import.rs shows it against coturn itself), so carrying them
    /// would let in more credentials than before the move.
    rest_only: bool,
    /// `psql-userdb` beside use-auth-secret: turnpike reads the users'
    /// table too, which coturn then ignores.
    psql_with_rest: bool,
    both_peer_lists: bool,
    prometheus: bool,
    prometheus_port: Option<u16>,
    ips: Vec<String>,
    port: u16,
    tls_port: u16,
    port_lines: Vec<String>,
    /// turnpike key, values, the coturn lines they came from.
    lists: Vec<(&'static str, Vec<String>, Vec<String>)>,
    /// turnpike key, TOML value, the coturn line it came from.
    scalars: Vec<(&'static str, String, String)>,
    /// Lines that need nothing in turnpike, as comments.
    noted: Vec<String>,
    not_carried: Vec<String>,
    userdb: Option<PathBuf>,
    redis_userdb: Option<String>,
}

impl Gathered {
    fn new(text: &str) -> Self {
        Gathered {
            rest_only: lines(text).any(|l| l.key == "use-auth-secret" || l.key == "static-auth-secret"),
            psql_with_rest: false,
            both_peer_lists: lines(text).any(|l| l.key == "allowed-peer-ip")
                && lines(text).any(|l| l.key == "denied-peer-ip"),
            prometheus: lines(text).any(|l| l.key == "prometheus"),
            prometheus_port: lines(text)
                .filter(|l| l.key == "prometheus-port")
                .filter_map(|l| l.value.and_then(|v| v.parse().ok()))
                .last(),
            port: 3478,
            tls_port: 5349,
            ..Gathered::default()
        }
    }

    fn push_list(&mut self, key: &'static str, values: Vec<String>, from: &str) {
        match self.lists.iter_mut().find(|(k, _, _)| *k == key) {
            Some((_, v, f)) => {
                v.extend(values);
                f.push(from.to_owned());
            }
            None => self.lists.push((key, values, vec![from.to_owned()])),
        }
    }

    fn scalar(&mut self, key: &'static str, value: String, from: &str) {
        self.scalars.push((key, value, from.to_owned()));
    }

    fn not(&mut self, line: &Line<'_>, why: &str) {
        self.not_carried.push(format!("{}: {why}", line.text));
    }

    fn line(&mut self, l: &Line<'_>) {
        match l.key {
            "listening-ip" | "listening-port" | "tls-listening-port" | "relay-ip" | "external-ip" => {
                self.address(l)
            }
            "user" | "static-auth-secret" | "userdb" | "db" | "b" | "redis-userdb" | "psql-userdb"
            | "sql-userdb" | "mysql-userdb" => self.credentials(l),
            "alternate-server" => match l.value {
                Some(s) => self.push_list("alternate-server", vec![s.to_owned()], l.text),
                None => self.not(l, "no address given"),
            },
            "denied-peer-ip" | "allowed-peer-ip" => {
                let key = if l.key == "denied-peer-ip" {
                    "deny-peer"
                } else {
                    "allow-peer"
                };
                match l.value.and_then(peer_cidrs) {
                    Some(c) => self.push_list(key, c, l.text),
                    None => self.not(l, "not IP, IP-IP or IP/N"),
                }
            }
            "realm" | "cert" | "pkey" => self.text_value(l),
            "min-port"
            | "max-port"
            | "user-quota"
            | "total-quota"
            | "max-bps"
            | "relay-threads"
            | "stale-nonce"
            | "max-allocate-lifetime" => self.number(l),
            "no-tls" => self.scalar("no-tls", "true".into(), l.text),
            // coturn serves DTLS on its TLS port unless told not to, as
            // turnpike does.
            "no-dtls" => self.scalar("no-dtls", "true".into(), l.text),
            "allow-loopback-peers" => self.scalar("allow-loopback-peers", "true".into(), l.text),
            "mobility" => self.scalar("mobility", "true".into(), l.text),
            "verbose" | "v" => self.scalar("log-level", q("debug"), l.text),
            "Verbose" | "V" => self.scalar("log-level", q("trace"), l.text),
            "prometheus" => {
                let from = match self.prometheus_port {
                    Some(p) => format!("{}` and `prometheus-port={p}", l.text),
                    None => l.text.to_owned(),
                };
                let listen = q(&format!("0.0.0.0:{}", self.prometheus_port.unwrap_or(9641)));
                self.scalar("metrics-listen", listen, &from);
            }
            // Carried with `prometheus` above; alone it changes nothing.
            "prometheus-port" if self.prometheus => {}
            "prometheus-port" => self.noted.push(format!(
                "# coturn's `{}`: nothing: coturn's exporter is off without `prometheus`",
                l.text
            )),
            key => self.other(key, l),
        }
    }

    /// Where to listen, relay from and advertise.
    fn address(&mut self, l: &Line<'_>) {
        let v = l.value;
        let ip = || v.and_then(|v| v.parse::<IpAddr>().ok());
        match l.key {
            "listening-ip" => match ip() {
                Some(ip) => self.ips.push(ip.to_string()),
                None => self.not(l, "not an IP address"),
            },
            "listening-port" | "tls-listening-port" => match v.and_then(|v| v.parse().ok()) {
                Some(p) => {
                    if l.key == "listening-port" {
                        self.port = p;
                    } else {
                        self.tls_port = p;
                    }
                    self.port_lines.push(l.text.to_owned());
                }
                None => self.not(l, "not a port"),
            },
            "relay-ip" => match ip() {
                Some(ip) => self.push_list("relay-ip", vec![ip.to_string()], l.text),
                None => self.not(l, "not an IP address"),
            },
            // PUBLIC or PUBLIC/PRIVATE: turnpike needs only the public one.
            _ => match v
                .and_then(|v| v.split('/').next())
                .and_then(|v| v.trim().parse::<IpAddr>().ok())
            {
                Some(ip) => self.push_list("external-ip", vec![ip.to_string()], l.text),
                None => self.not(l, "not IP or IP/IP"),
            },
        }
    }

    /// Users, REST secrets and user databases.
    fn credentials(&mut self, l: &Line<'_>) {
        let v = l.value;
        match l.key {
            "user" if self.rest_only => self.not(
                l,
                "left out: with use-auth-secret or static-auth-secret coturn accepts REST-API credentials only, so this user could not log in there either",
            ),
            "user" => match v.filter(|v| v.contains(':')) {
                Some(u) => self.push_list("user", vec![u.to_owned()], l.text),
                None => self.not(l, "not NAME:PASSWORD or NAME:0xKEY"),
            },
            "static-auth-secret" => match v {
                Some(s) => self.push_list("auth-secret", vec![s.to_owned()], l.text),
                None => self.not(l, "no secret given"),
            },
            "redis-userdb" => {
                self.redis_userdb = v.map(str::to_owned);
                self.not(
                    l,
                    "turnpike keeps its own Redis layout: import coturn's users with `turnpike import coturn-redis`, then set redis-url",
                );
            }
            // turnpike reads coturn's MySQL/MariaDB database as it is.
            "mysql-userdb" => match v.and_then(crate::sqldb::mysql_url_from_coturn) {
                Some(url) => {
                    self.scalar("db-url", q(&url), l.text);
                    if self.rest_only {
                        self.psql_with_rest = true;
                    }
                }
                None => self.not(l, "not host=… dbname=… user=… [password=…] [port=…]"),
            },
            // turnpike reads coturn's PostgreSQL database as it is.
            "psql-userdb" | "sql-userdb" => match v {
                Some(conn) => {
                    self.scalar("db-url", q(conn), l.text);
                    if self.rest_only {
                        self.psql_with_rest = true;
                    }
                }
                None => self.not(l, "no connection string given"),
            },
            _ if self.rest_only => self.not(
                l,
                "its users are not imported: with use-auth-secret or static-auth-secret coturn accepts REST-API credentials only, so they could not log in there either",
            ),
            _ => match v {
                Some(p) => {
                    self.userdb = Some(PathBuf::from(p));
                    self.noted.push(format!(
                        "# coturn's `{}`: its users are imported into turnpike's own database (see --turndb)",
                        l.text
                    ));
                }
                None => self.not(l, "no file given"),
            },
        }
    }

    /// realm, cert and pkey.
    fn text_value(&mut self, l: &Line<'_>) {
        let Some(v) = l.value else {
            return self.not(l, "no value given");
        };
        let key = match l.key {
            "pkey" => "key",
            "cert" => "cert",
            _ => "realm",
        };
        self.scalar(key, q(v), l.text);
        if key == "realm" && v.len() > turn_core::max_realm_len() {
            // Keys are MD5(name:realm:password): the realm must stay.
            let why = format!(
                "(the realm is over {} bytes: kept, since users' MD5 keys depend on it, though its 401s are more than 3x a minimal request)",
                turn_core::max_realm_len()
            );
            self.scalar("allow-long-realm", "true".into(), &why);
        }
    }

    /// Options that are one number in both servers.
    fn number(&mut self, l: &Line<'_>) {
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
        match (l.key, l.value.and_then(|v| v.parse::<u64>().ok())) {
            // coturn's bare stale-nonce means its default, 600 s.
            ("stale-nonce", None) if l.value.is_none() => self.scalar(key, "600".into(), l.text),
            (_, Some(n)) => self.scalar(key, n.to_string(), l.text),
            _ => self.not(l, "not a number"),
        }
    }

    /// Options at a value that is turnpike's behaviour anyway, and the rest
    /// of MIGRATING.md's table.
    fn other(&mut self, key: &str, l: &Line<'_>) {
        if let Some((_, defaults)) = FIXED_DEFAULTS.iter().find(|(k, _)| *k == key) {
            let m = mapping(key).unwrap_or("nothing");
            if l.value
                .is_none_or(|v| defaults.iter().any(|d| d.eq_ignore_ascii_case(v)))
            {
                self.noted.push(format!("# coturn's `{}`: {m}", l.text));
            } else {
                self.not(l, m);
            }
            return;
        }
        match mapping(key) {
            Some(m) if m.starts_with("nothing") => self.noted.push(format!("# coturn's `{}`: {m}", l.text)),
            Some(m) => self.not(l, m),
            None => self.not(l, "not an option turnpike knows"),
        }
    }

    /// The listen keys: coturn's addresses × ports, nothing at turnpike's
    /// defaults.
    fn listeners(&mut self) -> (Vec<String>, Vec<String>) {
        let on_every = |port: u16| vec![host_port("0.0.0.0", port)];
        let listen: Vec<String> = match (self.ips.is_empty(), self.port) {
            (true, 3478) => Vec::new(),
            (true, p) => on_every(p),
            (false, p) => self.ips.iter().map(|ip| host_port(ip, p)).collect(),
        };
        if self.ips.is_empty() {
            // Ports alone at turnpike's defaults (3478, 5349) need no line.
            for line in &self.port_lines {
                if [3478, 5349]
                    .iter()
                    .any(|p| line.ends_with(&format!("={p}")) || line.ends_with(&format!(" {p}")))
                {
                    self.noted.push(format!(
                        "# coturn's `{line}`: nothing: turnpike listens on 3478 (UDP, TCP) and 5349 (TLS) on every address by default"
                    ));
                }
            }
        }
        let no_tls = self.scalars.iter().any(|(k, _, _)| *k == "no-tls");
        let tls_listen: Vec<String> = match (no_tls, self.ips.is_empty(), self.tls_port) {
            (true, _, _) | (false, true, 5349) => Vec::new(),
            (false, true, p) => on_every(p),
            (false, false, p) => self.ips.iter().map(|ip| host_port(ip, p)).collect(),
        };
        (listen, tls_listen)
    }

    fn finish(mut self) -> Converted {
        let (listen, tls_listen) = self.listeners();
        // coturn relays to private and reserved ranges unless told not to;
        // turnpike refuses them unless told to (peer-policy, SECURITY.md).
        let allowed: Vec<&str> = self
            .lists
            .iter()
            .filter(|(k, _, _)| *k == "allow-peer")
            .flat_map(|(_, v, _)| v.iter().map(String::as_str))
            .collect();
        let mut differences = vec![format!(
            "internal peers: coturn relays to private and reserved ranges (10/8, 172.16/12, 192.168/16, fc00::/7, ...) unless \
             denied-peer-ip names them; turnpike refuses them unless allow-peer names them{}. Add allow-peer CIDR for each \
             internal peer (an SFU, a media server) this server must reach",
            if allowed.is_empty() {
                String::new()
            } else {
                format!(" (this file allows {})", allowed.join(", "))
            }
        )];
        if self.psql_with_rest {
            differences.push(
                "db-url: with use-auth-secret coturn takes only the REST-API secrets (turn_secret) from its database; turnpike                  also accepts the users in turnusers_lt. Empty that table, or keep its users out of turnpike's realm, to keep                  REST-only logins"
                    .to_owned(),
            );
        }
        let toml = self.toml(&listen, &tls_listen, &differences);
        Converted {
            toml,
            not_carried: self.not_carried,
            differences,
            userdb: self.userdb,
            redis_userdb: self.redis_userdb,
        }
    }

    /// The turnpike.toml, each setting with the coturn line it came from.
    fn toml(&self, listen: &[String], tls_listen: &[String], differences: &[String]) -> String {
        let mut t = String::new();
        t.push_str("# turnpike.toml written by `turnpike import coturn` from a coturn turnserver.conf.\n");
        t.push_str("# Each setting names the coturn line it came from. Check it, then run:\n");
        t.push_str("#   turnpike serve --config THIS_FILE\n");
        t.push_str("# Every key turnpike has: deploy/turnpike.toml; every coturn option: MIGRATING.md.\n\n");
        if !listen.is_empty() {
            t.push_str("# from coturn's listening-ip / listening-port\n");
            t.push_str(&format!("listen = {}\n", list(listen)));
        }
        if !tls_listen.is_empty() {
            t.push_str("# from coturn's listening-ip / tls-listening-port\n");
            t.push_str(&format!("tls-listen = {}\n", list(tls_listen)));
        }
        for (i, (key, value, from)) in self.scalars.iter().enumerate() {
            // A later line wins in coturn too; earlier ones become comments.
            let last = self.scalars.iter().rposition(|(k, _, _)| k == key) == Some(i);
            if from.starts_with('(') {
                t.push_str(&format!("# {from}\n"));
            } else {
                t.push_str(&format!("# from coturn's `{from}`\n"));
            }
            if last {
                t.push_str(&format!("{key} = {value}\n"));
            } else {
                t.push_str(&format!("# {key} = {value}   (overridden by a later line)\n"));
            }
        }
        for (key, values, from) in &self.lists {
            let shown: Vec<String> = from.iter().map(|f| format!("`{f}`")).collect();
            t.push_str(&format!("# from coturn's {}\n", shown.join(", ")));
            t.push_str(&format!("{key} = {}\n", list(values)));
        }
        if self.both_peer_lists {
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
        if !self.noted.is_empty() {
            t.push_str("\n# Nothing to do (already turnpike's default or behaviour):\n");
            for n in &self.noted {
                t.push_str(n);
                t.push('\n');
            }
        }
        t.push_str("\n# Where turnpike differs from coturn on purpose (check these):\n");
        for d in differences {
            t.push_str(&format!("# - {d}\n"));
        }
        if !self.not_carried.is_empty() {
            t.push_str("\n# NOT carried over (do these by hand):\n");
            for n in &self.not_carried {
                t.push_str(&format!("# - {n}\n"));
            }
        }
        t
    }
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
