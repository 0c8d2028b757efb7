//! `turnpike serve` settings: one struct that is both the command line
//! (clap) and the TOML file (serde), merged (flags win) and then validated
//! into [`Settings`], with errors that name the field and the fix.
//!
//! Config-file keys are the long flag names; a repeatable flag is an array:
//! `listen = ["0.0.0.0:3478"]`, `user = ["alice:secret"]`,
//! `allow-loopback-peers = true`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use turn_core::{Cidr, Credentials};

/// Every `serve` option. `None`/empty means "not given here".
#[derive(Debug, Default, Clone, Args, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServeArgs {
    /// TOML config file; its keys are these long option names.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// UDP+TCP listen address (repeatable). Default: 0.0.0.0:3478 and [::]:3478.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,

    /// TLS listen address (repeatable). Default: 0.0.0.0:5349 and [::]:5349.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub tls_listen: Vec<SocketAddr>,

    /// Turn TLS off entirely.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub no_tls: Option<bool>,

    /// TLS certificate chain (PEM). Without --cert/--key a self-signed
    /// certificate is generated at start-up and its fingerprint logged.
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// TLS private key (PEM).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Address relay sockets bind to (one per family; repeatable).
    /// Default: the address each client reached (a loopback one only for
    /// loopback clients), else the host's address of that family.
    #[arg(long, value_name = "IP")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub relay_ip: Vec<IpAddr>,

    /// Relay address advertised to clients when the host is behind NAT
    /// (one per family; repeatable).
    #[arg(long, value_name = "IP")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub external_ip: Vec<IpAddr>,

    /// Learn the advertised relay address at start from a STUN server
    /// (HOST:PORT), asked from each relay address that has no
    /// --external-ip: for a node behind 1:1 NAT whose public address is
    /// not known in advance (a Kubernetes node, a cloud VM). Start fails
    /// if the server does not answer.
    #[arg(long, value_name = "HOST:PORT")]
    pub external_ip_from: Option<String>,

    /// Lowest relay port [default: 49152].
    #[arg(long, value_name = "N")]
    pub min_port: Option<u16>,

    /// Highest relay port [default: 65535].
    #[arg(long, value_name = "N")]
    pub max_port: Option<u16>,

    /// Authentication realm [default: turnpike]. At most 24 bytes, so the
    /// 401 to a browser's first Allocate stays within 3x its size.
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,

    /// Accept a realm longer than 24 bytes: 401s to minimal Allocates are
    /// then more than 3x the request (reflection).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub allow_long_realm: Option<bool>,

    /// Long-term credential NAME:PASSWORD (repeatable). NAME:0xHEX gives the
    /// MD5 key MD5(name:realm:password) instead of a password.
    #[arg(long, value_name = "NAME:PASSWORD")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub user: Vec<String>,

    /// TURN REST-API shared secret (repeatable, for rotation).
    #[arg(long, value_name = "SECRET")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub auth_secret: Vec<String>,

    /// File of TURN REST-API secrets, one per line (repeatable; re-read on
    /// reload): a Kubernetes Secret or a file only root can read, so the
    /// secret is not on the command line.
    #[arg(long, value_name = "FILE")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub auth_secret_file: Vec<PathBuf>,

    /// Allow relaying to 127.0.0.0/8 and ::1 (tests, local media servers).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub allow_loopback_peers: Option<bool>,

    /// Allow relaying to a range refused by default (repeatable).
    #[arg(long, value_name = "CIDR")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub allow_peer: Vec<String>,

    /// Load balancers whose TCP/TLS connections start with a PROXY
    /// protocol header (v1 or v2) naming the real client (repeatable). A
    /// header from any other address closes its connection.
    #[arg(long, value_name = "CIDR")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub proxy_protocol_from: Vec<String>,

    /// Refuse relaying to a range (repeatable); where it overlaps an
    /// --allow-peer range, --peer-precedence decides.
    #[arg(long, value_name = "CIDR")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub deny_peer: Vec<String>,

    /// Which wins where --allow-peer and --deny-peer both hold a peer:
    /// deny (a hole in an allowed range) or allow (coturn's order: an
    /// exception carved out of a denied range) [default: deny].
    #[arg(long, value_name = "deny|allow")]
    pub peer_precedence: Option<PeerPrecedence>,

    /// Worker threads [default: number of cores].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Merge runs of UDP datagrams to one client into GSO sends (UDP_SEGMENT)
    /// [default: true]; false for a NIC or tunnel that mishandles them.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub udp_gso: Option<bool>,

    /// Log level or tracing filter (error, warn, info, debug, trace) [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// SOFTWARE attribute to send in responses [default: none].
    #[arg(long, value_name = "TEXT")]
    pub software: Option<String>,

    /// Also accept RFC 5766 channel numbers 0x5000-0x7FFF (older clients).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub rfc5766_channel_numbers: Option<bool>,

    /// How long a nonce stays valid, in seconds [default: 600].
    #[arg(long, value_name = "SECS")]
    pub nonce_lifetime: Option<u64>,

    /// Allocation lifetime when the client asks for none or for less, in
    /// seconds [default: 600, RFC 8656 §7.2].
    #[arg(long, value_name = "SECS")]
    pub allocation_lifetime: Option<u64>,

    /// The longest allocation lifetime granted, in seconds [default: 3600].
    #[arg(long, value_name = "SECS")]
    pub max_allocation_lifetime: Option<u64>,

    /// Allocations one username may hold at once [default: 0 = unlimited].
    #[arg(long, value_name = "N")]
    pub user_quota: Option<usize>,

    /// Allocations the server holds at once [default: 0 = unlimited].
    #[arg(long, value_name = "N")]
    pub total_quota: Option<usize>,

    /// Bytes per second one allocation may relay, each direction
    /// [default: 0 = no cap].
    #[arg(long, value_name = "BYTES")]
    pub max_bps: Option<u64>,

    /// Bytes per second one user's allocations may relay, each direction,
    /// per worker thread [default: 0 = no cap].
    #[arg(long, value_name = "BYTES")]
    pub user_max_bps: Option<u64>,

    /// Answers per second to unauthenticated requests (Binding, 401) from
    /// one source IP, for the whole host (all workers share the budget);
    /// 0 turns per-source limits off, which single-host benchmarks need
    /// [default: 200].
    #[arg(long, value_name = "N")]
    pub rate_limit_per_ip: Option<u32>,

    /// Integrity failures per username and source within a minute before
    /// that pair is blocked (five times as many block the source); 0 turns
    /// the guard off [default: 10].
    #[arg(long, value_name = "N")]
    pub auth_fail_limit: Option<u32>,

    /// How long a blocked username/source stays blocked, in seconds [default: 300].
    #[arg(long, value_name = "SECS")]
    pub auth_block_secs: Option<u64>,

    /// Most TCP/TLS connections per worker thread [default: 8192].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,

    /// Most TCP/TLS connections one source IP may hold, across all worker
    /// threads, so one address cannot fill the connection tables; 0 turns
    /// the cap off [default: 256].
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<u32>,

    /// Seconds a TCP/TLS connection may take to complete its TLS handshake
    /// and first STUN message, or to finish a message it has begun [default: 10].
    #[arg(long, value_name = "SECS")]
    pub handshake_timeout: Option<u64>,

    /// Seconds a TCP/TLS connection without an allocation may stay silent [default: 120].
    #[arg(long, value_name = "SECS")]
    pub idle_timeout: Option<u64>,

    /// RFC 6062: peer data connections one TCP allocation may hold
    /// (connecting, waiting for ConnectionBind, or relaying) [default: 64].
    #[arg(long, value_name = "N")]
    pub tcp_connections_per_allocation: Option<usize>,

    /// RFC 6062: seconds a Connect may take before 447 (at least 30, as the
    /// RFC requires) [default: 30].
    #[arg(long, value_name = "SECS")]
    pub tcp_connect_timeout: Option<u64>,

    /// Kernel fast path (XDP) for established UDP channels: auto (load when
    /// the kernel and privileges allow, else say why and relay in user
    /// space), on (refuse to start without it), off [default: auto].
    #[arg(long, value_name = "MODE")]
    pub fast_path: Option<FastPathMode>,

    /// Interface for the fast path (repeatable) [default: the non-loopback
    /// interfaces that hold a listen address].
    #[arg(long, value_name = "IFACE")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub fast_path_interface: Vec<String>,

    /// RFC 5780 NAT behaviour discovery (off by default): also listen (UDP)
    /// on --alt-ip and --alt-port, and answer CHANGE-REQUEST, RESPONSE-PORT
    /// and PADDING. Needs a specific --listen address.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub rfc5780: Option<bool>,

    /// The second IP address for RFC 5780 (same family as the listen address).
    #[arg(long, value_name = "IP")]
    pub alt_ip: Option<IpAddr>,

    /// The second port for RFC 5780 [default: the listen port + 1].
    #[arg(long, value_name = "N")]
    pub alt_port: Option<u16>,

    /// Where a draining server sends new clients (300 ALTERNATE-SERVER);
    /// repeatable, one per family. Without it, draining answers 508.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub alternate_server: Vec<SocketAddr>,

    /// Seconds SIGTERM waits for allocations to end before closing them
    /// (0: close at once) [default: 30].
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<u64>,

    /// Serve Prometheus metrics at http://IP:PORT/metrics (off unless set;
    /// e.g. 127.0.0.1:9641).
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    pub metrics_listen: Option<SocketAddr>,

    /// SQLite user database (`turnpike user add` writes it; the server
    /// re-reads it every 2 s) [default: $STATE_DIRECTORY/users.db, else
    /// /var/lib/turnpike/users.db; ignored if absent].
    #[arg(long, value_name = "FILE")]
    pub db: Option<PathBuf>,

    /// Redis holding shared users and REST-API secrets for a fleet
    /// (redis://HOST:PORT/DB); polled every 2 s, cached if it goes away.
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,

    /// The Redis URL from a file (a Kubernetes Secret), so its password
    /// is on no command line: redis://:PASSWORD@HOST:PORT/DB.
    #[arg(long, value_name = "FILE", conflicts_with = "redis_url")]
    pub redis_url_file: Option<PathBuf>,

    /// This node's name in the fleet registry (with --redis-url) [default:
    /// the host name and the first listen port].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// Seconds a node's registry entry and its quota counts live in Redis
    /// without a heartbeat (one a second): a node that dies releases its
    /// users' quota after this long [default: 15].
    #[arg(long, value_name = "S")]
    pub fleet_lease: Option<u64>,

    /// With --redis-url: allocations the whole fleet may hold together
    /// (508 past it; 0: no fleet limit). --total-quota still caps each
    /// node [default: 0].
    #[arg(long, value_name = "N")]
    pub fleet_total_quota: Option<usize>,

    /// With --redis-url: at this many allocations or more, answer new
    /// Allocates with 300 ALTERNATE-SERVER naming the least loaded healthy
    /// node of the fleet (0: never) [default: 0].
    #[arg(long, value_name = "N")]
    pub redirect_above: Option<usize>,

    /// Admin HTTP API listener (off unless set; keep it on loopback, e.g.
    /// 127.0.0.1:9642). Needs admin-token or admin-token-file.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    pub admin_listen: Option<SocketAddr>,

    /// Bearer token for the admin API.
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,

    /// File holding the bearer token for the admin API.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Serve the operator's pages on the admin listener: the ICE test page
    /// (/ice) and the live dashboard (/dashboard); both use the admin
    /// token.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub web_ui: Option<bool>,

    /// The public ICE test page for end users, on a listener of its own
    /// (off unless set): no token; its credentials are rate-limited per IP
    /// and expire after web-credential-ttl.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    pub web_listen: Option<SocketAddr>,

    /// Lifetime in seconds of the TURN credentials the ICE page mints,
    /// 30 to 3600 [default: 300].
    #[arg(long, value_name = "SECS")]
    pub web_credential_ttl: Option<u64>,

    /// Credentials the ICE page gives one IP address per minute, 1 to 600
    /// [default: 6].
    #[arg(long, value_name = "N")]
    pub web_credentials_per_minute: Option<u32>,

    /// Host name the ICE page puts in the stun:/turn:/turns: URLs
    /// [default: the host the page was loaded from]; turns: needs the
    /// certificate's name.
    #[arg(long, value_name = "NAME")]
    pub web_turn_host: Option<String>,

    /// Reload when the config file, an auth-secret-file, the
    /// admin-token-file or the TLS certificate or key changes (checked
    /// every 2 s), as SIGHUP does: for a Kubernetes ConfigMap or Secret
    /// mounted as files, or a certbot renewal.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub reload_on_change: Option<bool>,

    /// Log format: text or json (one JSON object per line) [default: text].
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,

    /// Hide client and peer IP addresses and usernames in logs, replacing
    /// each with a keyed hash (stable for this run, so lines still correlate).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true, value_name = "BOOL")]
    pub redact: Option<bool>,
}

/// serde's "unknown field `X`, expected one of `a`, `b`, … (66 keys)" with
/// the list replaced by the nearest key: a typo gets "did you mean".
fn shorten_unknown_key(msg: &str) -> String {
    let Some((head, list)) = msg.split_once(", expected one of ") else {
        return msg.to_owned();
    };
    let Some(unknown) = head.rsplit('`').nth(1) else {
        return msg.to_owned();
    };
    let keys: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
    let nearest = keys
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .min()
        .filter(|(d, k)| *d <= 3.max(unknown.len() * 2 / 5) || k.contains(unknown) || unknown.contains(*k));
    let hint = match nearest {
        Some((_, k)) => format!("; did you mean `{k}`?"),
        None => String::new(),
    };
    format!("{head}{hint}")
}

/// Levenshtein distance, for key suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

macro_rules! merge_fields {
    ($base:ident, $over:ident; opt: $($o:ident),*; vec: $($v:ident),*) => {
        $( if $over.$o.is_some() { $base.$o = $over.$o; } )*
        $( if !$over.$v.is_empty() { $base.$v = $over.$v; } )*
    };
}

impl ServeArgs {
    /// Reads the file named by `--config`, if any, and lays the command line
    /// over it.
    pub fn load(self) -> Result<ServeArgs> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let mut file = Self::from_file(&path)?;
        file.merge(self);
        Ok(file)
    }

    /// Parses a config file.
    pub fn from_file(path: &Path) -> Result<ServeArgs> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("config: cannot read {}", path.display()))?;
        // Only a file that is not TOML at all is taken for a coturn one.
        if toml::from_str::<toml::Table>(&text).is_err() && crate::coturn::looks_like_turnserver_conf(&text) {
            bail!(
                "config file {}: this is a coturn turnserver.conf, not a turnpike TOML file; \
                 `turnpike import coturn {} --out turnpike.toml` writes the equivalent \
                 (MIGRATING.md maps every coturn option to turnpike's)",
                path.display(),
                path.display()
            );
        }
        let mut parsed: ServeArgs = toml::from_str(&text).map_err(|e| {
            let msg = shorten_unknown_key(&e.to_string());
            // An unknown key that is coturn's name gets turnpike's.
            let coturn = msg
                .split('`')
                .nth(1)
                .and_then(crate::coturn::lookup)
                .map(|m| format!("\n(`{}` is coturn's name; in turnpike: {})", m.coturn, m.turnpike))
                .unwrap_or_default();
            anyhow::anyhow!(
                "config file {}: {}{coturn}\n(keys are the long option names of `turnpike serve --help`, e.g. listen, realm, user)",
                path.display(),
                msg.trim_end()
            )
        })?;
        parsed.config = Some(path.to_path_buf());
        Ok(parsed)
    }

    /// Lays `over` on top of `self`: anything `over` gives wins.
    pub fn merge(&mut self, over: ServeArgs) {
        let base = self;
        merge_fields!(base, over;
            opt: config, no_tls, cert, key, min_port, max_port, realm, allow_long_realm, allow_loopback_peers,
                 threads, udp_gso, log_level, software, rfc5766_channel_numbers, nonce_lifetime,
                 allocation_lifetime, max_allocation_lifetime,
                 user_quota, total_quota, max_bps, user_max_bps, rate_limit_per_ip,
                 auth_fail_limit, auth_block_secs, max_connections, max_connections_per_ip, handshake_timeout, idle_timeout,
                 tcp_connections_per_allocation, tcp_connect_timeout, fast_path,
                 rfc5780, alt_ip, alt_port, log_format, redact, drain_timeout, metrics_listen,
                 admin_listen, admin_token, admin_token_file, db, redis_url, redis_url_file, external_ip_from, reload_on_change,
                 node_name, fleet_lease, redirect_above, fleet_total_quota,
                 web_ui, web_listen, web_credential_ttl, web_credentials_per_minute, web_turn_host,
                 peer_precedence;
            vec: fast_path_interface, listen, tls_listen, relay_ip, external_ip, user, auth_secret, allow_peer, deny_peer,
                 proxy_protocol_from, auth_secret_file,
                 alternate_server);
    }
}

/// Which of two overlapping operator ranges decides a peer
/// (`--peer-precedence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerPrecedence {
    /// `deny-peer` beats `allow-peer` (turnpike's default).
    #[default]
    Deny,
    /// `allow-peer` beats `deny-peer` (coturn's `allowed-peer-ip`).
    Allow,
}

/// Where the TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsSource {
    /// PEM files.
    Files {
        /// Certificate chain.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Generate a self-signed certificate at start-up.
    SelfSigned,
}

impl Settings {
    /// `allow-peer` ranges that can never take effect: wholly inside a
    /// `deny-peer` range while deny wins. Each is `(allow, deny)`; the
    /// server warns about them at start and on reload, since a coturn
    /// configuration meant the opposite.
    pub fn shadowed_allows(&self) -> Vec<(Cidr, Cidr)> {
        if self.allow_peer_wins {
            return Vec::new();
        }
        let mut out = Vec::new();
        for a in &self.allow_peer {
            if let Some(d) = self.deny_peer.iter().find(|d| d.covers(a)) {
                out.push((*a, *d));
            }
        }
        out
    }
}

/// Validated settings, ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// UDP+TCP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// TLS listen addresses (empty: no TLS).
    pub tls_listen: Vec<SocketAddr>,
    /// The certificate, when TLS is on.
    pub tls: Option<TlsSource>,
    /// IPv4 relay address.
    pub relay_v4: Option<Ipv4Addr>,
    /// IPv6 relay address.
    pub relay_v6: Option<Ipv6Addr>,
    /// Advertised IPv4 relay address.
    pub external_v4: Option<Ipv4Addr>,
    /// Advertised IPv6 relay address.
    pub external_v6: Option<Ipv6Addr>,
    /// Relay port range, inclusive.
    pub min_port: u16,
    /// Relay port range, inclusive.
    pub max_port: u16,
    /// Realm.
    pub realm: String,
    /// Challenge minimal Allocates even beyond 3x (a realm over 24 bytes).
    pub long_realm: bool,
    /// Credentials (keys only).
    pub credentials: Credentials,
    /// The generated demo credential, when no other was configured.
    pub demo_user: Option<(String, String)>,
    /// Peer ranges allowed.
    pub allow_peer: Vec<Cidr>,
    /// Load balancers that send PROXY protocol headers.
    pub proxy_protocol_from: Vec<Cidr>,
    /// Peer ranges refused.
    pub deny_peer: Vec<Cidr>,
    /// Where both hold a peer, `allow_peer` wins (coturn's order).
    pub allow_peer_wins: bool,
    /// Allow loopback peers.
    pub allow_loopback_peers: bool,
    /// Worker threads.
    pub threads: usize,
    /// Merge runs of datagrams to one destination with UDP GSO.
    pub udp_gso: bool,
    /// Tracing filter.
    pub log_level: String,
    /// SOFTWARE attribute.
    pub software: Option<String>,
    /// Accept 0x5000-0x7FFF channels.
    pub legacy_channel_numbers: bool,
    /// Nonce lifetime in seconds.
    pub nonce_lifetime: u64,
    /// Default and longest allocation lifetimes.
    pub allocation_lifetime: std::time::Duration,
    pub max_allocation_lifetime: std::time::Duration,
    /// Allocations per username (0: unlimited).
    pub user_quota: usize,
    /// Allocations in total (0: unlimited).
    pub total_quota: usize,
    /// Bytes/s per allocation and direction (0: no cap).
    pub max_bps: u64,
    /// Bytes/s per user, direction and worker (0: no cap).
    pub user_max_bps: u64,
    /// Unauthenticated answers/s per source IP and worker (0: off).
    pub rate_limit_per_ip: u32,
    /// Failures before a username/source pair is blocked (0: off).
    pub auth_fail_limit: u32,
    /// Seconds a block lasts.
    pub auth_block_secs: u64,
    /// TCP/TLS connections per worker.
    pub max_connections: usize,
    /// TCP/TLS connections per source IP, across workers (0: no cap).
    pub max_connections_per_ip: u32,
    /// No relay address was configured: each allocation relays from the
    /// address its client reached (falling back to `relay_v4`/`relay_v6`).
    pub relay_auto: bool,
    /// Handshake / first message / partial message timeout.
    pub handshake_timeout: std::time::Duration,
    /// Idle timeout for connections without an allocation.
    pub idle_timeout: std::time::Duration,
    /// RFC 6062: peer data connections per TCP allocation.
    pub tcp_connections_per_allocation: usize,
    /// RFC 6062: how long a Connect may take.
    pub tcp_connect_timeout: std::time::Duration,
    /// Kernel fast path mode.
    pub fast_path: FastPathMode,
    /// Interfaces named for the fast path (empty: chosen by listen address).
    pub fast_path_interfaces: Vec<String>,
    /// RFC 5780: the primary listen address and the alternate IP and port.
    pub rfc5780: Option<(SocketAddr, IpAddr, Option<u16>)>,
    /// Log lines as JSON.
    pub log_json: bool,
    /// Redact IPs and usernames in logs.
    pub redact: bool,
    /// ALTERNATE-SERVER addresses for draining.
    pub alternate_server: Vec<SocketAddr>,
    /// How long SIGTERM waits for allocations to end.
    pub drain_timeout: std::time::Duration,
    /// Prometheus endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Admin API listener and its token.
    pub admin: Option<(SocketAddr, String)>,
    /// The user database.
    pub db: PathBuf,
    /// Redis credential store.
    pub redis_url: Option<String>,
    /// STUN server that tells the relay addresses' public mapping at start.
    pub external_ip_from: Option<String>,
    /// Files whose change triggers a reload (empty: no watching).
    pub watched_files: Vec<PathBuf>,
    /// The fleet registry name (None: the default, made at start).
    pub node_name: Option<String>,
    /// How long registry entries and quota counts outlive a silent node.
    pub fleet_lease: std::time::Duration,
    /// Allocations past which new clients go to another node (0: never).
    pub redirect_above: usize,
    /// Allocations the fleet may hold together (0: no limit).
    pub fleet_total_quota: usize,
    /// The ICE test page and the dashboard.
    pub web: WebSettings,
}

/// `--web-ui`, `--web-listen` and their credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSettings {
    /// The pages on the admin listener (operator mode).
    pub ui: bool,
    /// The public ICE page's own listener.
    pub public: Option<SocketAddr>,
    /// Lifetime of a minted credential.
    pub credential_ttl: std::time::Duration,
    /// Credentials per IP per minute.
    pub per_minute: u32,
    /// Host for the ICE URLs (None: the page's own host).
    pub turn_host: Option<String>,
}

impl WebSettings {
    /// Whether either page is served (then a web secret is minted).
    pub fn enabled(&self) -> bool {
        self.ui || self.public.is_some()
    }

    fn from_args(a: &ServeArgs, admin: bool) -> Result<Self> {
        let ui = a.web_ui.unwrap_or(false);
        if ui && !admin {
            bail!("web-ui: the pages are served on the admin listener; set admin-listen and admin-token (or use web-listen for the public ICE page)");
        }
        let ttl = a.web_credential_ttl.unwrap_or(300);
        if !(30..=3600).contains(&ttl) {
            bail!("web-credential-ttl {ttl}: use 30 to 3600 seconds (the page's credentials should expire in minutes)");
        }
        let per_minute = a.web_credentials_per_minute.unwrap_or(6);
        if !(1..=600).contains(&per_minute) {
            bail!("web-credentials-per-minute {per_minute}: use 1 to 600");
        }
        let turn_host = match a.web_turn_host.as_deref().map(str::trim) {
            None => None,
            Some(h) if h.parse::<std::net::Ipv6Addr>().is_ok() => Some(format!("[{h}]")),
            Some(h)
                if !h.is_empty()
                    && h.len() <= 253
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-') =>
            {
                Some(h.to_owned())
            }
            Some(h) => bail!("web-turn-host {h:?}: give a DNS name or an IP address, without port or scheme"),
        };
        Ok(WebSettings {
            ui,
            public: a.web_listen,
            credential_ttl: std::time::Duration::from_secs(ttl),
            per_minute,
            turn_host,
        })
    }
}

fn ipv6_available() -> bool {
    std::net::UdpSocket::bind((Ipv6Addr::LOCALHOST, 0)).is_ok()
}

/// The first non-loopback, non-link-local IPv4 address of this host.
fn host_ipv4() -> Option<Ipv4Addr> {
    let mut found = None;
    // A UDP connect() sends no packet; it only makes the kernel choose the
    // source address it would route with, which is the address peers see.
    if let Ok(s) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        if s.connect((Ipv4Addr::new(192, 0, 2, 1), 9)).is_ok() {
            if let Ok(SocketAddr::V4(a)) = s.local_addr() {
                if !a.ip().is_unspecified() && !a.ip().is_loopback() {
                    found = Some(*a.ip());
                }
            }
        }
    }
    found
}

/// This host's global IPv6 address, the one it would route with.
fn host_ipv6() -> Option<Ipv6Addr> {
    let s = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1), 9))
        .ok()?;
    match s.local_addr().ok()? {
        SocketAddr::V6(a) => {
            let ip = *a.ip();
            let seg0 = ip.segments()[0];
            // Global unicast 2000::/3 only: not loopback, link-local or ULA.
            ((seg0 & 0xe000) == 0x2000).then_some(ip)
        }
        SocketAddr::V4(_) => None,
    }
}

/// An `IP:PORT` flag value, with an error that says which part is wrong
/// (clap's own only says "invalid socket address syntax").
pub fn parse_socket_addr(v: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (ip, port) = match v.rsplit_once(':') {
        Some((ip, port)) if !ip.is_empty() && (!ip.contains(':') || ip.starts_with('[')) => (ip, port),
        _ if v.parse::<IpAddr>().is_ok() => {
            return Err(format!(
                "{v:?} has no port: write IP:PORT, e.g. {}",
                match v.parse::<IpAddr>() {
                    Ok(IpAddr::V6(_)) => format!("[{v}]:3478"),
                    _ => format!("{v}:3478"),
                }
            ))
        }
        _ => return Err(format!("{v:?} is not IP:PORT (e.g. 0.0.0.0:3478 or [::]:3478)")),
    };
    let bare = ip.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_err() {
        return Err(format!(
            "{v:?}: {ip:?} is not an IP address (names are not resolved here)"
        ));
    }
    if ip.contains(':') && !(ip.starts_with('[') && ip.ends_with(']')) {
        return Err(format!(
            "{v:?}: an IPv6 address takes brackets, e.g. [{bare}]:{port}"
        ));
    }
    match port.parse::<u32>() {
        Ok(p) if p > 65535 => Err(format!("{v:?}: port {p} is above 65535")),
        Ok(_) => Err(format!("{v:?} is not IP:PORT")),
        Err(_) => Err(format!("{v:?}: {port:?} is not a port number")),
    }
}

/// A repeatable key in the file takes one value or a list of them
/// (`relay-ip = "203.0.113.10"` as well as `relay-ip = ["203.0.113.10"]`).
fn one_or_many<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    use serde::de::IntoDeserializer;
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a value or a list of values")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Vec<T>, E> {
            // The element's own parser, so its error message stays.
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> std::result::Result<Vec<T>, A::Error> {
            Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// Whether this process may bind ports below 1024 (root, or
/// CAP_NET_BIND_SERVICE, or a lowered ip_unprivileged_port_start): tried
/// on a throwaway loopback socket.
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

/// A log level, or a tracing filter of `target=level` directives. A bare
/// word that is no level (`verbose`, `warning`) would parse as a target
/// name and silence every log line, so it is refused.
fn check_log_level(v: &str) -> Result<()> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let hint = match v.to_ascii_lowercase().as_str() {
        "warning" => " (did you mean warn?)",
        "verbose" | "all" => " (did you mean debug or trace?)",
        "err" => " (did you mean error?)",
        _ => "",
    };
    let directive_ok = |d: &str| {
        let level = d.rsplit_once('=').map(|(_, l)| l).unwrap_or(d);
        LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
    };
    if v.trim().is_empty()
        || !v.split(',').all(directive_ok)
        || tracing_subscriber::EnvFilter::try_new(v).is_err()
    {
        bail!(
            "log-level \"{v}\": not a level{hint}; use off, error, warn, info, debug or trace, \
             or directives like \"info,turnpike=debug\""
        );
    }
    Ok(())
}

pub(crate) fn parse_cidrs(field: &str, values: &[String]) -> Result<Vec<Cidr>> {
    values
        .iter()
        .map(|v| {
            v.parse::<Cidr>()
                .map_err(|e| anyhow::anyhow!("{field} \"{v}\": {e}"))
        })
        .collect()
}

fn random_token(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

impl Settings {
    /// Validates merged arguments.
    pub fn from_args(mut a: ServeArgs) -> Result<Settings> {
        let web = WebSettings::from_args(&a, a.admin_listen.is_some())?;
        let realm = a.realm.unwrap_or_else(|| "turnpike".to_owned());
        if realm.is_empty() || realm.len() > 763 {
            bail!("realm: must be 1 to 763 bytes long (e.g. --realm example.org)");
        }
        let long_realm = a.allow_long_realm.unwrap_or(false);
        if realm.len() > turn_core::max_realm_len() && !long_realm {
            bail!(
                "realm: \"{}\" is {} bytes; with more than {} the 401 to a browser's first Allocate ({} bytes) is more than {}x its size, which helps reflection attacks. Use a shorter realm, or --allow-long-realm to accept that",
                realm.escape_debug(),
                realm.len(),
                turn_core::max_realm_len(),
                turn_core::MIN_ALLOCATE_LEN,
                turn_core::CHALLENGE_RATIO
            );
        }
        let v6 = ipv6_available();
        let listen = if a.listen.is_empty() {
            let mut l = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 3478))];
            if v6 {
                l.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 3478)));
            }
            l
        } else {
            a.listen
        };
        let no_tls = a.no_tls.unwrap_or(false);
        let tls_listen = if no_tls {
            if !a.tls_listen.is_empty() {
                bail!("tls-listen is set but no-tls is true: drop one of them");
            }
            Vec::new()
        } else if a.tls_listen.is_empty() {
            let mut l = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5349))];
            if v6 {
                l.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 5349)));
            }
            l
        } else {
            a.tls_listen
        };
        let tls = match (a.cert.clone(), a.key.clone()) {
            _ if tls_listen.is_empty() => None,
            (Some(cert), Some(key)) => Some(TlsSource::Files { cert, key }),
            (None, None) => Some(TlsSource::SelfSigned),
            (Some(_), None) => bail!("cert is set but key is not: give both --cert FILE and --key FILE"),
            (None, Some(_)) => bail!("key is set but cert is not: give both --cert FILE and --key FILE"),
        };
        let min_port = a.min_port.unwrap_or(49152);
        let max_port = a.max_port.unwrap_or(65535);
        if min_port == 0 {
            bail!("min-port: 0 is not a port; use 1024 or above (default 49152)");
        }
        if min_port < 1024 && !can_bind_privileged() {
            bail!(
                "min-port {min_port}: relay ports below 1024 need root or CAP_NET_BIND_SERVICE, \
                 which this process lacks; use min-port 1024 or above (default 49152)"
            );
        }
        if min_port > max_port {
            bail!("min-port ({min_port}) is greater than max-port ({max_port}): set min-port <= max-port");
        }

        let mut relay_v4 = None;
        let mut relay_v6 = None;
        let host_addrs = udp_io::local_addresses();
        for ip in &a.relay_ip {
            if ip.is_unspecified() {
                bail!("relay-ip {ip}: must be a concrete address clients can reach, not a wildcard");
            }
            // Relay sockets bind to it: an address this host does not have
            // would make every Allocate fail with 508.
            if !host_addrs.is_empty() && !host_addrs.contains(ip) {
                bail!(
                    "relay-ip {ip}: not an address of this host (it has {}); to advertise a NAT's \
                     public address use external-ip, and give relay-ip the local one",
                    host_addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            match ip {
                IpAddr::V4(v) if relay_v4.is_none() => relay_v4 = Some(*v),
                IpAddr::V6(v) if relay_v6.is_none() => relay_v6 = Some(*v),
                _ => bail!("relay-ip: at most one IPv4 and one IPv6 address (got a second {ip})"),
            }
        }
        let relay_auto = relay_v4.is_none() && relay_v6.is_none();
        if relay_auto {
            // IPv6 relaying is on when the host has a global IPv6 address
            // and listens on IPv6.
            if listen.iter().any(|l| l.is_ipv6()) {
                relay_v6 = listen
                    .iter()
                    .find_map(|l| match l.ip() {
                        IpAddr::V6(v) if !v.is_unspecified() => Some(v),
                        _ => None,
                    })
                    .or_else(host_ipv6);
            }
            // A specific listen address is where clients reach us: relay there.
            relay_v4 = listen.iter().find_map(|l| match l.ip() {
                IpAddr::V4(v) if !v.is_unspecified() => Some(v),
                _ => None,
            });
            if relay_v4.is_none() {
                relay_v4 = Some(host_ipv4().unwrap_or(Ipv4Addr::LOCALHOST));
            }
        }
        let mut external_v4 = None;
        let mut external_v6 = None;
        for ip in &a.external_ip {
            if ip.is_unspecified() {
                bail!("external-ip {ip}: must be the public address clients reach, not a wildcard");
            }
            match ip {
                IpAddr::V4(v) if external_v4.is_none() => external_v4 = Some(*v),
                IpAddr::V6(v) if external_v6.is_none() => external_v6 = Some(*v),
                _ => bail!("external-ip: at most one IPv4 and one IPv6 address (got a second {ip})"),
            }
        }

        let mut credentials = Credentials::new();
        for u in &a.user {
            let Some((name, pw)) = u.split_once(':') else {
                bail!(
                    "user \"{}\": expected NAME:PASSWORD (e.g. --user alice:s3cret)",
                    u.split(':').next().unwrap_or("")
                );
            };
            // The examples' placeholders must never become a live login.
            if ["change-me", "a-long-random-secret"].contains(&pw) {
                bail!(
                    "user \"{name}\": \"{pw}\" is the example password from deploy/turnpike.toml; \
                     choose a real one (e.g. openssl rand -base64 18)"
                );
            }
            if name.is_empty() || pw.is_empty() {
                bail!("user \"{name}\": both NAME and PASSWORD must be non-empty (NAME:PASSWORD)");
            }
            match pw.strip_prefix("0x").map(parse_md5_hex) {
                Some(Some(key)) => credentials.add_user_key(name, &realm, key),
                Some(None) => {
                    bail!("user \"{name}\": a 0x key must be 32 hex digits (MD5 of name:realm:password)")
                }
                None => credentials.add_user(name, &realm, pw),
            }
        }
        let mut secrets = a.auth_secret.clone();
        for f in &a.auth_secret_file {
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("auth-secret-file: cannot read {}", f.display()))?;
            let before = secrets.len();
            secrets.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_owned),
            );
            if secrets.len() == before {
                bail!("auth-secret-file {}: no secret in it (one per line)", f.display());
            }
        }
        for s in &secrets {
            if s.is_empty() {
                bail!("auth-secret: must not be empty");
            }
            if s == "a-long-random-secret" {
                bail!("auth-secret: \"{s}\" is the example from deploy/turnpike.toml; use a random one (e.g. openssl rand -base64 32)");
            }
            credentials.add_secret(s.as_bytes());
        }
        let demo_user = if credentials.user_count() == 0 && credentials.secret_count() == 0 {
            let (u, p) = (format!("demo-{}", random_token(6)), random_token(20));
            credentials.add_user(&u, &realm, &p);
            Some((u, p))
        } else {
            None
        };

        let threads = a.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get().min(256))
                .unwrap_or(1)
        });
        if threads == 0 || threads > 256 {
            bail!("threads: must be between 1 and 256 (default: number of cores)");
        }
        let log_level = a.log_level.unwrap_or_else(|| "info".to_owned());
        check_log_level(&log_level)?;
        if let Some(s) = &a.software {
            if s.len() > 763 {
                bail!("software: at most 763 bytes");
            }
        }
        let nonce_lifetime = a.nonce_lifetime.unwrap_or(600);
        if nonce_lifetime == 0 {
            bail!("nonce-lifetime: must be at least 1 second (default 600)");
        }
        let allocation_lifetime = a.allocation_lifetime.unwrap_or(600);
        let max_allocation_lifetime = a.max_allocation_lifetime.unwrap_or(3600.max(allocation_lifetime));
        if allocation_lifetime == 0 {
            bail!("allocation-lifetime: must be at least 1 second (default 600)");
        }
        if max_allocation_lifetime < allocation_lifetime {
            bail!(
                "max-allocation-lifetime: {max_allocation_lifetime} s is shorter than allocation-lifetime \
                 ({allocation_lifetime} s); raise it or lower allocation-lifetime"
            );
        }
        // The default database is optional; one named on purpose must exist
        // (a typo would otherwise start a server without its users).
        if let Some(db) = &a.db {
            if !db.exists() {
                bail!(
                    "db {}: no such file; create it with `turnpike user add NAME --db {}`, \
                     or leave db unset",
                    db.display(),
                    db.display()
                );
            }
        }
        let db = a.db.clone().unwrap_or_else(crate::userdb::default_path);
        if let Some(f) = &a.redis_url_file {
            if a.redis_url.is_some() {
                bail!("redis-url and redis-url-file: give one of them");
            }
            let url = std::fs::read_to_string(f)
                .with_context(|| format!("redis-url-file: cannot read {}", f.display()))?
                .trim()
                .to_owned();
            if url.is_empty() {
                bail!("redis-url-file {}: empty; it holds one redis:// URL", f.display());
            }
            a.redis_url = Some(url);
        }
        if let Some(url) = &a.redis_url {
            if let Err(e) = redis::Client::open(url.as_str()) {
                bail!(
                    "redis-url {url:?}: not a Redis URL ({e}); expected redis://[:PASSWORD@]HOST[:PORT][/DB]"
                );
            }
        }
        let max_connections = a.max_connections.unwrap_or(8192);
        if max_connections == 0 {
            bail!("max-connections: must be at least 1 (default 8192)");
        }
        let handshake_timeout = a.handshake_timeout.unwrap_or(10);
        if handshake_timeout == 0 {
            bail!("handshake-timeout: must be at least 1 second (default 10)");
        }
        let idle_timeout = a.idle_timeout.unwrap_or(120);
        if idle_timeout == 0 {
            bail!("idle-timeout: must be at least 1 second (default 120)");
        }
        let tcp_connections_per_allocation = a.tcp_connections_per_allocation.unwrap_or(64);
        if tcp_connections_per_allocation == 0 || tcp_connections_per_allocation > 65535 {
            bail!("tcp-connections-per-allocation: must be 1 to 65535 (default 64)");
        }
        let fast_path = a.fast_path.unwrap_or_default();
        if fast_path == FastPathMode::Off && !a.fast_path_interface.is_empty() {
            bail!("fast-path-interface: given with --fast-path off; drop one of them");
        }
        let tcp_connect_timeout = a.tcp_connect_timeout.unwrap_or(30);
        if !(30..=3600).contains(&tcp_connect_timeout) {
            bail!("tcp-connect-timeout: must be 30 to 3600 seconds (RFC 6062 §5.2 asks for at least 30; default 30)");
        }
        let rfc5780 = if a.rfc5780.unwrap_or(false) {
            let Some(alt_ip) = a.alt_ip else {
                bail!("rfc5780 needs alt-ip: the server's second IP address (e.g. --alt-ip 192.0.2.2)");
            };
            let Some(primary) = listen.iter().copied().find(|l| l.is_ipv4() == alt_ip.is_ipv4()) else {
                bail!("rfc5780: no listen address of the same family as alt-ip {alt_ip}");
            };
            if primary.ip().is_unspecified() {
                bail!(
                    "rfc5780 needs a specific --listen address (not {primary}): answers must come from known addresses"
                );
            }
            if primary.ip() == alt_ip {
                bail!("alt-ip {alt_ip} must differ from the listen address");
            }
            Some((primary, alt_ip, a.alt_port))
        } else {
            if a.alt_ip.is_some() || a.alt_port.is_some() {
                bail!("alt-ip/alt-port are set but rfc5780 is not: add --rfc5780");
            }
            None
        };
        let log_json = a.log_format == Some(LogFormat::Json);
        let admin = match a.admin_listen {
            None => None,
            Some(addr) => {
                let token = match (&a.admin_token, &a.admin_token_file) {
                    (Some(t), _) => t.trim().to_owned(),
                    (None, Some(f)) => std::fs::read_to_string(f)
                        .with_context(|| format!("admin-token-file: cannot read {}", f.display()))?
                        .trim()
                        .to_owned(),
                    (None, None) => bail!("admin-listen needs admin-token or admin-token-file: the admin API always requires a bearer token"),
                };
                if token.len() < 16 {
                    bail!("admin token: at least 16 characters (e.g. `openssl rand -hex 24`)");
                }
                Some((addr, token))
            }
        };
        let external_ip_from = match a.external_ip_from {
            None => None,
            Some(server) => {
                let port_ok = server
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
                if !port_ok {
                    bail!("external-ip-from \"{server}\": expected HOST:PORT of a STUN server (e.g. stun.example.org:3478)");
                }
                Some(server)
            }
        };
        let watched_files = if a.reload_on_change.unwrap_or(false) {
            let mut files: Vec<PathBuf> = a.config.iter().cloned().collect();
            files.extend(a.auth_secret_file.iter().cloned());
            files.extend(a.admin_token_file.iter().cloned());
            files.extend(a.cert.iter().cloned());
            files.extend(a.key.iter().cloned());
            if files.is_empty() {
                bail!("reload-on-change: nothing to watch; it watches --config, --auth-secret-file, --admin-token-file, --cert and --key");
            }
            files
        } else {
            Vec::new()
        };
        let fleet_lease = std::time::Duration::from_secs(a.fleet_lease.unwrap_or(15));
        if fleet_lease < std::time::Duration::from_secs(3) {
            bail!("fleet-lease: at least 3 s (default 15): nodes beat once a second, and a lease must outlast a missed beat");
        }
        let redirect_above = a.redirect_above.unwrap_or(0);
        if redirect_above > 0 && a.redis_url.is_none() {
            bail!("redirect-above: needs redis-url, where the fleet's nodes and their load are registered (or use alternate-server)");
        }
        let fleet_total_quota = a.fleet_total_quota.unwrap_or(0);
        if fleet_total_quota > 0 && a.redis_url.is_none() {
            bail!("fleet-total-quota: needs redis-url, where the nodes' counts are shared (on one node, use total-quota)");
        }
        let node_name = a.node_name.clone();
        if let Some(n) = &node_name {
            if n.is_empty()
                || n.len() > 64
                || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
            {
                bail!("node-name {n:?}: 1 to 64 of letters, digits and - _ . :");
            }
        }
        let auth_block_secs = a.auth_block_secs.unwrap_or(300);
        if auth_block_secs == 0 {
            bail!("auth-block-secs: must be at least 1 second (default 300); use auth-fail-limit = 0 to turn the guard off");
        }
        Ok(Settings {
            listen,
            tls_listen,
            tls,
            relay_v4,
            relay_v6,
            external_v4,
            external_v6,
            min_port,
            max_port,
            realm,
            credentials,
            demo_user,
            allow_peer: parse_cidrs("allow-peer", &a.allow_peer)?,
            proxy_protocol_from: parse_cidrs("proxy-protocol-from", &a.proxy_protocol_from)?,
            deny_peer: parse_cidrs("deny-peer", &a.deny_peer)?,
            allow_peer_wins: a.peer_precedence.unwrap_or_default() == PeerPrecedence::Allow,
            allow_loopback_peers: a.allow_loopback_peers.unwrap_or(false),
            threads,
            udp_gso: a.udp_gso.unwrap_or(true),
            log_level,
            software: a.software,
            long_realm,
            legacy_channel_numbers: a.rfc5766_channel_numbers.unwrap_or(false),
            nonce_lifetime,
            allocation_lifetime: std::time::Duration::from_secs(allocation_lifetime),
            max_allocation_lifetime: std::time::Duration::from_secs(max_allocation_lifetime),
            user_quota: a.user_quota.unwrap_or(0),
            total_quota: a.total_quota.unwrap_or(0),
            max_bps: a.max_bps.unwrap_or(0),
            user_max_bps: a.user_max_bps.unwrap_or(0),
            rate_limit_per_ip: a.rate_limit_per_ip.unwrap_or(200),
            auth_fail_limit: a.auth_fail_limit.unwrap_or(10),
            auth_block_secs,
            max_connections,
            max_connections_per_ip: a.max_connections_per_ip.unwrap_or(256),
            relay_auto,
            handshake_timeout: std::time::Duration::from_secs(handshake_timeout),
            idle_timeout: std::time::Duration::from_secs(idle_timeout),
            tcp_connections_per_allocation,
            tcp_connect_timeout: std::time::Duration::from_secs(tcp_connect_timeout),
            fast_path,
            fast_path_interfaces: a.fast_path_interface,
            rfc5780,
            log_json,
            redact: a.redact.unwrap_or(false),
            alternate_server: a.alternate_server,
            drain_timeout: std::time::Duration::from_secs(a.drain_timeout.unwrap_or(30)),
            metrics_listen: a.metrics_listen,
            db,
            redis_url: a.redis_url,
            external_ip_from,
            watched_files,
            node_name,
            fleet_lease,
            redirect_above,
            fleet_total_quota,
            web,
            admin,
        })
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FastPathMode {
    /// Load when possible; else relay in user space, saying why once.
    #[default]
    Auto,
    /// Refuse to start without it.
    On,
    /// Never load it.
    Off,
}

/// 32 hex digits as an MD5 key (`MD5(name:realm:password)`), or `None`.
pub fn parse_md5_hex(h: &str) -> Option<[u8; 16]> {
    if h.len() != 32 {
        return None;
    }
    let mut k = [0u8; 16];
    for (i, byte) in k.iter_mut().enumerate() {
        *byte = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use turn_core::auth::PasswordAlgorithm;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ServeArgs,
    }

    fn parse(args: &[&str]) -> ServeArgs {
        Cli::parse_from(std::iter::once("x").chain(args.iter().copied())).args
    }

    #[test]
    fn a_mistyped_key_gets_the_nearest_one_not_all_of_them() {
        let dir = std::env::temp_dir().join(format!("turnpike-typo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (text, want) in [
            ("relm = \"x\"\n", "did you mean `realm`?"),
            ("relay-ipp = \"1.2.3.4\"\n", "did you mean `relay-ip`?"),
            ("min_port = 5\n", "did you mean `min-port`?"),
            ("allow-peers = []\n", "did you mean `allow-peer`?"),
        ] {
            let f = dir.join("t.toml");
            std::fs::write(&f, text).unwrap();
            let e = format!("{:#}", ServeArgs::from_file(&f).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
            assert!(!e.contains("expected one of"), "no list of every key: {e}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn defaults_are_useful() {
        let s = Settings::from_args(ServeArgs::default()).unwrap();
        assert!(s.listen.iter().any(|l| l.port() == 3478));
        assert!(s.tls_listen.iter().any(|l| l.port() == 5349));
        assert_eq!(s.tls, Some(TlsSource::SelfSigned));
        assert!(s.demo_user.is_some(), "a demo credential when none is configured");
        assert_eq!((s.min_port, s.max_port), (49152, 65535));
        assert!(s.relay_v4.is_some());
        assert!(!s.allow_loopback_peers);
    }

    #[test]
    fn flags_override_file_and_arrays_replace() {
        let dir = std::env::temp_dir().join(format!("turnpike-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t.toml");
        std::fs::write(
            &f,
            "listen = [\"127.0.0.1:3478\"]\nrealm = \"file.org\"\nuser = [\"alice:secret\"]\nallow-loopback-peers = true\nmin-port = 50000\n",
        )
        .unwrap();
        let cli = parse(&[
            "--config",
            f.to_str().unwrap(),
            "--realm",
            "cli.org",
            "--listen",
            "127.0.0.1:4000",
        ]);
        let merged = cli.load().unwrap();
        assert_eq!(merged.realm.as_deref(), Some("cli.org"));
        assert_eq!(
            merged.listen,
            vec!["127.0.0.1:4000".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(merged.user, vec!["alice:secret".to_owned()]);
        assert_eq!(merged.allow_loopback_peers, Some(true));
        assert_eq!(merged.min_port, Some(50000));
        let cli = parse(&["--config", f.to_str().unwrap(), "--allow-loopback-peers=false"]);
        assert_eq!(cli.load().unwrap().allow_loopback_peers, Some(false));
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let dir = std::env::temp_dir().join(format!("turnpike-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("bad.toml");
        std::fs::write(&f, "realm = \"x\"\nlisten-port = 3478\n").unwrap();
        let err = ServeArgs::from_file(&f).unwrap_err().to_string();
        assert!(err.contains("listen-port"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases: &[(&[&str], &str)] = &[
            (&["--min-port", "60000", "--max-port", "50000"], "min-port"),
            (&["--user", "alice"], "NAME:PASSWORD"),
            (&["--allow-peer", "10.0.0.0/99"], "allow-peer"),
            (&["--deny-peer", "bogus"], "deny-peer"),
            (&["--cert", "/x.pem"], "key"),
            (&["--threads", "0"], "threads"),
            (&["--log-level", "lo[ud"], "log-level"),
            (&["--log-level", "verbose"], "log-level"),
            (&["--log-level", "warning"], "did you mean warn"),
            (&["--log-level", "debg"], "log-level"),
            (&["--relay-ip", "192.0.2.77"], "not an address of this host"),
            (&["--relay-ip", "0.0.0.0"], "relay-ip"),
            (&["--user", "bob:0x1234"], "32 hex"),
            (&["--user", "alice:change-me"], "example password"),
            (&["--auth-secret", "a-long-random-secret"], "example"),
        ];
        for (args, needle) in cases {
            let err = Settings::from_args(parse(args)).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn a_repeatable_key_takes_one_value_or_a_list() {
        let dir = std::env::temp_dir().join(format!("turnpike-one-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("one.toml");
        std::fs::write(
            &f,
            "relay-ip = \"127.0.0.1\"\nuser = \"alice:pw\"\nlisten = [\"127.0.0.1:3478\", \"127.0.0.1:3479\"]\n",
        )
        .unwrap();
        let a = ServeArgs::from_file(&f).unwrap();
        assert_eq!(a.relay_ip, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.user, vec!["alice:pw".to_owned()]);
        assert_eq!(a.listen.len(), 2);
        std::fs::write(&f, "relay-ip = \"not-an-ip\"\n").unwrap();
        let err = ServeArgs::from_file(&f).unwrap_err().to_string();
        assert!(
            err.contains("relay-ip") && err.contains("invalid IP address"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn address_errors_say_which_part_is_wrong() {
        for (v, needle) in [
            ("127.0.0.1:70000", "port 70000 is above 65535"),
            ("300.1.1.1:3478", "\"300.1.1.1\" is not an IP address"),
            ("127.0.0.1", "has no port"),
            ("::1", "[::1]:3478"),
            ("127.0.0.1:http", "not a port number"),
        ] {
            let err = parse_socket_addr(v).unwrap_err();
            assert!(err.contains(needle), "{v}: {err}");
        }
        assert_eq!(
            parse_socket_addr("[::1]:3478").unwrap(),
            "[::1]:3478".parse().unwrap()
        );
    }

    #[test]
    fn a_coturn_key_in_toml_gets_turnpikes_name() {
        let dir = std::env::temp_dir().join(format!("turnpike-ckey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(&f, "realm = \"x\"\nlistening-port = 3478\n").unwrap();
        let err = ServeArgs::from_file(&f).unwrap_err().to_string();
        assert!(
            err.contains("unknown field") && err.contains("coturn's name") && err.contains("--listen"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_realm_too_long_for_a_small_challenge_is_refused_unless_allowed() {
        let long = "turn.example-company.example";
        let err = Settings::from_args(parse(&["--user", "alice:pw", "--realm", long, "--no-tls"]))
            .map(|_| ())
            .expect_err("refused")
            .to_string();
        assert!(
            err.starts_with("realm:") && err.contains("28 bytes") && err.contains("--allow-long-realm"),
            "{err}"
        );
        let s = Settings::from_args(parse(&[
            "--user",
            "alice:pw",
            "--realm",
            long,
            "--allow-long-realm",
            "--no-tls",
        ]))
        .unwrap();
        assert!(s.long_realm);
        let ok = "a".repeat(24);
        assert!(Settings::from_args(parse(&["--user", "alice:pw", "--realm", &ok, "--no-tls"])).is_ok());
    }

    #[test]
    fn a_tcp_connect_timeout_under_the_rfc_minimum_is_refused() {
        let err = Settings::from_args(parse(&[
            "--user",
            "a:pw",
            "--no-tls",
            "--tcp-connect-timeout",
            "5",
        ]))
        .map(|_| ())
        .expect_err("refused")
        .to_string();
        assert!(
            err.starts_with("tcp-connect-timeout:") && err.contains("30"),
            "{err}"
        );
        let s = Settings::from_args(parse(&[
            "--user",
            "a:pw",
            "--no-tls",
            "--tcp-connect-timeout",
            "45",
            "--tcp-connections-per-allocation",
            "8",
        ]))
        .unwrap();
        assert_eq!(s.tcp_connect_timeout, std::time::Duration::from_secs(45));
        assert_eq!(s.tcp_connections_per_allocation, 8);
    }

    #[test]
    fn levels_and_filters_are_accepted() {
        for ok in [
            "warn",
            "INFO",
            "off",
            "info,turnpike=debug",
            "turnpike::runtime=trace",
        ] {
            assert!(check_log_level(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn users_become_keys() {
        let s = Settings::from_args(parse(&["--user", "alice:pw", "--realm", "r", "--no-tls"])).unwrap();
        assert!(s.demo_user.is_none());
        assert!(s.tls.is_none() && s.tls_listen.is_empty());
        let mut keys = Vec::new();
        s.credentials
            .keys_for("alice", "r", 0, PasswordAlgorithm::Md5, &mut keys)
            .unwrap();
        let md5 = stun_proto::long_term_key_md5("alice", "r", "pw");
        assert_eq!(keys[0].as_bytes(), &md5);
        let k = hex16(&md5);
        let s = Settings::from_args(parse(&["--user", &format!("bob:0x{k}")])).unwrap();
        s.credentials
            .keys_for("bob", "turnpike", 0, PasswordAlgorithm::Md5, &mut keys)
            .unwrap();
        assert_eq!(keys[0].as_bytes(), &md5);
    }

    fn hex16(k: &[u8; 16]) -> String {
        k.iter().map(|b| format!("{b:02x}")).collect()
    }
}
