//! The `serve` options: one struct that is the command line (clap), the
//! TOML file (serde) and what `/api/config` shows, with each option's
//! default, help text and type declared once. A file is laid under the
//! command line (flags win) by [`CommandLine::options`].
//!
//! Config-file keys are the long flag names; a repeatable flag is an array
//! or a single value: `listen = ["0.0.0.0:3478"]`, `user = "alice:secret"`.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, FromArgMatches};
use serde::{Deserialize, Serialize};
use turn_core::Cidr;

use super::parse::{all_displayed, one_or_many, one_or_many_parsed, parse_socket_addr, shorten_unknown_key};
use super::types::{FastPathMode, HostPort, LogFormat, PeerPrecedence, Period, UserSpec};

/// Every `serve` option, with its default, help text and value type
/// declared once, here. An `Option` or empty list means the default is the
/// host's (said in the help text) and is resolved by
/// [`validate`](super::validate()).
#[derive(Debug, Clone, PartialEq, Args, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Options {
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
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub no_tls: bool,

    /// DTLS listen address (UDP, RFC 7350; repeatable). Default: beside
    /// each TLS listener, on its port, when TLS is on and its certificate
    /// has an ECDSA key.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub dtls_listen: Vec<SocketAddr>,

    /// Turn DTLS off.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub no_dtls: bool,

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
    pub external_ip_from: Option<HostPort>,

    /// Lowest relay port.
    #[arg(long, value_name = "N", default_value_t = 49152)]
    pub min_port: u16,

    /// Highest relay port.
    #[arg(long, value_name = "N", default_value_t = 65535)]
    pub max_port: u16,

    /// Authentication realm. At most 24 bytes, so the
    /// 401 to a browser's first Allocate stays within 3x its size.
    #[arg(long, value_name = "REALM", default_value_t = "turnpike".to_owned())]
    pub realm: String,

    /// Accept a realm longer than 24 bytes: 401s to minimal Allocates are
    /// then more than 3x the request (reflection).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub allow_long_realm: bool,

    /// Long-term credential NAME:PASSWORD (repeatable). NAME:0xHEX gives the
    /// MD5 key MD5(name:realm:password) instead of a password.
    #[arg(long, value_name = "NAME:PASSWORD")]
    #[serde(
        default,
        deserialize_with = "one_or_many_parsed",
        serialize_with = "all_displayed"
    )]
    pub user: Vec<UserSpec>,

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
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub allow_loopback_peers: bool,

    /// Allow relaying to a range refused by default (repeatable).
    #[arg(long, value_name = "CIDR")]
    #[serde(
        default,
        deserialize_with = "one_or_many_parsed",
        serialize_with = "all_displayed"
    )]
    pub allow_peer: Vec<Cidr>,

    /// Load balancers whose TCP/TLS connections start with a PROXY
    /// protocol header (v1 or v2) naming the real client (repeatable). A
    /// header from any other address closes its connection.
    #[arg(long, value_name = "CIDR")]
    #[serde(
        default,
        deserialize_with = "one_or_many_parsed",
        serialize_with = "all_displayed"
    )]
    pub proxy_protocol_from: Vec<Cidr>,

    /// Refuse relaying to a range (repeatable); where it overlaps an
    /// --allow-peer range, --peer-precedence decides.
    #[arg(long, value_name = "CIDR")]
    #[serde(
        default,
        deserialize_with = "one_or_many_parsed",
        serialize_with = "all_displayed"
    )]
    pub deny_peer: Vec<Cidr>,

    /// Which wins where --allow-peer and --deny-peer both hold a peer:
    /// deny (a hole in an allowed range) or allow (coturn's order: an
    /// exception carved out of a denied range).
    #[arg(long, value_name = "deny|allow", default_value_t = PeerPrecedence::Deny)]
    pub peer_precedence: PeerPrecedence,

    /// Worker threads [default: number of cores].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Merge runs of UDP datagrams to one client into GSO sends (UDP_SEGMENT)
    /// (false for a NIC or tunnel that mishandles them).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = true, require_equals = true, value_name = "BOOL")]
    pub udp_gso: bool,

    /// Log level or tracing filter (error, warn, info, debug, trace).
    #[arg(long, value_name = "LEVEL", default_value_t = "info".to_owned())]
    pub log_level: String,

    /// SOFTWARE attribute to send in responses [default: none].
    #[arg(long, value_name = "TEXT")]
    pub software: Option<String>,

    /// RFC 8016 mobility: an Allocate with MOBILITY-TICKET gets a ticket,
    /// and a client whose address changes (Wi-Fi to cellular) keeps its
    /// allocation with it (UDP; the same user only) [default: off, as in
    /// coturn; such an Allocate then gets 405].
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub mobility: bool,

    /// Also accept RFC 5766 channel numbers 0x5000-0x7FFF (older clients).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub rfc5766_channel_numbers: bool,

    /// How long a nonce stays valid (seconds, or with units: 10m).
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(600))]
    pub nonce_lifetime: Period,

    /// Allocation lifetime when the client asks for none or for less
    /// (RFC 8656 §7.2).
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(600))]
    pub allocation_lifetime: Period,

    /// The longest allocation lifetime granted [default: 1h, or
    /// allocation-lifetime when that is longer].
    #[arg(long, value_name = "DURATION")]
    pub max_allocation_lifetime: Option<Period>,

    /// Allocations one username may hold at once (0: unlimited).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub user_quota: usize,

    /// Allocations the server holds at once (0: unlimited).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub total_quota: usize,

    /// Bytes per second one allocation may relay, each direction
    /// (0: no cap).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub max_bps: u64,

    /// Bytes per second one user's allocations may relay together, each
    /// direction, on this host whichever workers serve them (0: no cap).
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub user_max_bps: u64,

    /// Bytes one allocation may relay in all, both directions together
    /// (fast path and RFC 6062 connections included); one that has relayed
    /// them is ended, checked once a second (reason `quota` in its usage
    /// record and log line). 0: no cap.
    #[arg(long, value_name = "BYTES", default_value_t = 0)]
    pub max_allocation_bytes: u64,

    /// Answers per second to unauthenticated requests (Binding, 401) from
    /// one source IP, for the whole host (all workers share the budget);
    /// 0 turns per-source limits off, which single-host benchmarks need.
    #[arg(long, value_name = "N", default_value_t = 200)]
    pub rate_limit_per_ip: u32,

    /// Integrity failures per username and source within a minute before
    /// that pair is blocked (five times as many block the source); 0 turns
    /// the guard off.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub auth_fail_limit: u32,

    /// How long a blocked username/source stays blocked.
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(300))]
    pub auth_block_secs: Period,

    /// Most TCP/TLS connections per worker thread.
    #[arg(long, value_name = "N", default_value_t = 8192)]
    pub max_connections: usize,

    /// Most TCP/TLS connections one source IP may hold, across all worker
    /// threads, so one address cannot fill the connection tables; 0 turns
    /// the cap off.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pub max_connections_per_ip: u32,

    /// How long a TCP/TLS connection may take to complete its TLS handshake
    /// and first STUN message, or to finish a message it has begun.
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(10))]
    pub handshake_timeout: Period,

    /// How long a TCP/TLS connection without an allocation may stay silent.
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(120))]
    pub idle_timeout: Period,

    /// RFC 6062: peer data connections one TCP allocation may hold
    /// (connecting, waiting for ConnectionBind, or relaying).
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub tcp_connections_per_allocation: usize,

    /// RFC 6062: how long a Connect may take before 447 (at least 30s, as
    /// the RFC requires).
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(30))]
    pub tcp_connect_timeout: Period,

    /// Kernel fast path (XDP) for established UDP channels: auto (load when
    /// the kernel and privileges allow, else say why and relay in user
    /// space), on (refuse to start without it), off.
    #[arg(long, value_name = "MODE", default_value_t = FastPathMode::Auto)]
    pub fast_path: FastPathMode,

    /// Interface for the fast path (repeatable) [default: the non-loopback
    /// interfaces that hold a listen address].
    #[arg(long, value_name = "IFACE")]
    #[serde(default, deserialize_with = "one_or_many")]
    pub fast_path_interface: Vec<String>,

    /// RFC 5780 NAT behaviour discovery (off by default): also listen (UDP)
    /// on --alt-ip and --alt-port, and answer CHANGE-REQUEST, RESPONSE-PORT
    /// and PADDING. Needs a specific --listen address.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub rfc5780: bool,

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

    /// How long SIGTERM waits for allocations to end before closing them
    /// (0: close at once).
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(30))]
    pub drain_timeout: Period,

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

    /// coturn's user database in PostgreSQL or MySQL/MariaDB, read as it
    /// is (tables turnusers_lt and turn_secret; nothing is written):
    /// postgres://USER:PASSWORD@HOST:PORT/DBNAME, coturn's psql-userdb
    /// string "host=… dbname=… user=… password=…", or
    /// mysql://USER:PASSWORD@HOST:PORT/DBNAME; polled every 2 s, cached if
    /// it goes away.
    #[arg(long, value_name = "URL")]
    pub db_url: Option<String>,

    /// The database URL from a file, so its password is on no command line.
    #[arg(long, value_name = "FILE", conflicts_with = "db_url")]
    pub db_url_file: Option<PathBuf>,

    /// This node's name in the fleet registry (with --redis-url) [default:
    /// the host name and the first listen port].
    #[arg(long, value_name = "NAME")]
    pub node_name: Option<String>,

    /// How long a node's registry entry and its quota counts live in Redis
    /// without a heartbeat (one a second): a node that dies releases its
    /// users' quota after this long.
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(15))]
    pub fleet_lease: Period,

    /// With --redis-url: allocations the whole fleet may hold together
    /// (508 past it; 0: no fleet limit). --total-quota still caps each
    /// node.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub fleet_total_quota: usize,

    /// With --redis-url: at this many allocations or more, answer new
    /// Allocates with 300 ALTERNATE-SERVER naming the least loaded healthy
    /// node of the fleet (0: never).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub redirect_above: usize,

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
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub web_ui: bool,

    /// The public ICE test page for end users, on a listener of its own
    /// (off unless set): no token; its credentials are rate-limited per IP
    /// and expire after web-credential-ttl.
    #[arg(long, value_name = "IP:PORT", value_parser = parse_socket_addr)]
    pub web_listen: Option<SocketAddr>,

    /// Lifetime of the TURN credentials the ICE page mints, 30s to 1h.
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(300))]
    pub web_credential_ttl: Period,

    /// Credentials the ICE page gives one IP address per minute, 1 to 600
    #[arg(long, value_name = "N", default_value_t = 6)]
    pub web_credentials_per_minute: u32,

    /// Host name the ICE page puts in the stun:/turn:/turns: URLs
    /// [default: the host the page was loaded from]; turns: needs the
    /// certificate's name.
    #[arg(long, value_name = "NAME")]
    pub web_turn_host: Option<String>,

    /// Reload when the config file, an auth-secret-file, the
    /// admin-token-file or the TLS certificate or key changes (checked
    /// every 2 s), as SIGHUP does: for a Kubernetes ConfigMap or Secret
    /// mounted as files, or a certbot renewal.
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub reload_on_change: bool,

    /// Log format: text or json (one JSON object per line).
    #[arg(long, value_name = "FORMAT", default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Refused requests logged one line each, per second and worker
    /// thread; past it they are counted into one summary line a second, so
    /// a flood cannot fill the disk (0: the summaries only).
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub log_refusals_per_second: u32,

    /// Export per-user series (live allocations, bytes relayed) for the K
    /// users who relay most; everyone else is one user="other" series, so
    /// there are at most K + 1 whatever the number of usernames (0: none).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub metrics_per_user: usize,

    /// Session events (allocation start, interim usage, end; auth
    /// failures and lockouts) POSTed to this URL as signed JSON batches
    /// (http:// or https://); needs events-webhook-secret-file.
    #[arg(long, value_name = "URL")]
    pub events_webhook: Option<String>,

    /// The webhook's HMAC-SHA256 signing secret, read from FILE (at least
    /// 16 bytes): each request carries X-Turnpike-Signature: sha256=HEX.
    #[arg(long, value_name = "FILE")]
    pub events_webhook_secret_file: Option<PathBuf>,

    /// Session events appended to FILE, one JSON object a line.
    #[arg(long, value_name = "FILE")]
    pub events_file: Option<PathBuf>,

    /// Session events added to this Redis stream (XADD … MAXLEN ~) on the
    /// redis-url server.
    #[arg(long, value_name = "KEY")]
    pub events_redis_stream: Option<String>,

    /// The events stream's approximate length bound (MAXLEN ~).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub events_redis_maxlen: u64,

    /// How often each live allocation's usage is reported (0: start and
    /// end only).
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(60))]
    pub events_interim: Period,

    /// Events each sink holds queued while it cannot deliver; past it new
    /// ones are dropped and counted (turnpike_events_dropped_total).
    #[arg(long, value_name = "N", default_value_t = 65_536)]
    pub events_queue: usize,

    /// How long a stopping server keeps delivering queued events.
    #[arg(long, value_name = "DURATION", default_value_t = Period::secs(10))]
    pub events_flush_timeout: Period,

    /// Hide client and peer IP addresses and usernames in logs, replacing
    /// each with a keyed hash (stable for this run, so lines still correlate).
    #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false, require_equals = true, value_name = "BOOL")]
    pub redact: bool,
}

/// `Options` as a clap command of its own, for defaults and tests.
#[derive(clap::Parser)]
#[command(name = "turnpike-serve")]
struct Standalone {
    #[command(flatten)]
    options: Options,
}

impl Default for Options {
    /// Every option at its declared default: an empty command line.
    fn default() -> Self {
        <Standalone as clap::Parser>::parse_from(["turnpike-serve"]).options
    }
}

/// The options given on the command line, and only those: kept for the
/// life of the server so a reload lays them over the file again.
#[derive(Debug, Clone, Default)]
pub struct CommandLine {
    given: toml::Table,
    config: Option<PathBuf>,
}

impl CommandLine {
    /// What `serve`'s matches hold that the user typed (not clap's defaults).
    pub fn from_matches(m: &clap::ArgMatches) -> Result<Self> {
        let parsed = Options::from_arg_matches(m)?;
        let all = toml::Table::try_from(&parsed).context("options as TOML")?;
        let given = all
            .into_iter()
            .filter(|(key, _)| {
                m.value_source(&key.replace('-', "_")) == Some(clap::parser::ValueSource::CommandLine)
            })
            .collect();
        Ok(CommandLine {
            given,
            config: parsed.config,
        })
    }

    /// Parses `argv` (its first item is the program name) as `serve` would.
    pub fn try_parse_from<I, T>(argv: I) -> Result<Self>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let m = <Standalone as clap::CommandFactory>::command().try_get_matches_from(argv)?;
        Self::from_matches(&m)
    }

    /// The config file `--config` names, if any.
    pub fn config_file(&self) -> Option<&Path> {
        self.config.as_deref()
    }

    /// The options in force: the file's (read now), the command line over
    /// them, the declared defaults under both.
    pub fn options(&self) -> Result<Options> {
        let mut table = match &self.config {
            Some(path) => read_file(path)?.1,
            None => toml::Table::new(),
        };
        table.extend(self.given.clone());
        let mut options: Options = table.try_into().context("options")?;
        options.config = self.config.clone();
        Ok(options)
    }
}

impl Options {
    /// The options of `argv` (its first item is the program name), with
    /// the file `--config` names under them: what `turnpike serve ARGS`
    /// would run with.
    pub fn from_argv<I, T>(argv: I) -> Result<Options>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        CommandLine::try_parse_from(argv)?.options()
    }

    /// `serve --help`, as plain text.
    pub fn help() -> String {
        <Standalone as clap::CommandFactory>::command()
            .render_long_help()
            .to_string()
    }

    /// A config file's options, with the defaults for what it does not set.
    pub fn from_file(path: &Path) -> Result<Options> {
        let mut options = read_file(path)?.0;
        options.config = Some(path.to_path_buf());
        Ok(options)
    }

    /// Whether the option `key` (a long flag name) was set to anything but
    /// its declared default.
    pub fn is_default(&self, key: &str) -> bool {
        let ours = toml::Table::try_from(self).ok();
        let default = toml::Table::try_from(Options::default()).ok();
        let get = |t: &Option<toml::Table>| t.as_ref().and_then(|t| t.get(key).cloned());
        get(&ours) == get(&default)
    }
}

/// A config file, checked key by key (errors name the key and line), as
/// options and as the table of what it sets.
fn read_file(path: &Path) -> Result<(Options, toml::Table)> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("config: cannot read {}", path.display()))?;
    let table = match toml::from_str::<toml::Table>(&text) {
        Ok(t) => t,
        // Only a file that is not TOML at all is taken for a coturn one.
        Err(_) if crate::coturn::looks_like_turnserver_conf(&text) => bail!(
            "config file {}: this is a coturn turnserver.conf, not a turnpike TOML file; \
             `turnpike import coturn {} --out turnpike.toml` writes the equivalent \
             (MIGRATING.md maps every coturn option to turnpike's)",
            path.display(),
            path.display()
        ),
        Err(_) => toml::Table::new(),
    };
    let options: Options = toml::from_str(&text).map_err(|e| {
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
    Ok((options, table))
}
