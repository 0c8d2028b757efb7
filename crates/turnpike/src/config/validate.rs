//! From [`Options`] to [`Settings`]: every default resolved, every
//! setting that cannot work refused with the field and the fix.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use turn_core::{Cidr, Credentials};

use super::host::HostFacts;
use super::parse::check_log_level;
use super::types::{FastPathMode, PeerPrecedence, Period, Secret, UserSpec, EXAMPLE_SECRETS};
use super::Options;

/// Validated settings, ready to run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The options as given, defaults filled in: where a setting that
    /// needs no resolving is read.
    pub options: Options,
    /// UDP+TCP listen addresses.
    pub listen: Vec<SocketAddr>,
    /// TLS listen addresses (empty: no TLS).
    pub tls_listen: Vec<SocketAddr>,
    /// The certificate, when TLS is on.
    pub tls: Option<TlsSource>,
    /// Session events: sinks, interim period, queue.
    pub events: crate::events::EventsConfig,
    /// DTLS listen addresses (empty: no DTLS); port 0 beside a TLS
    /// listener takes that listener's port.
    pub dtls_listen: Vec<SocketAddr>,
    /// Whether `dtls_listen` was asked for by name: then a certificate
    /// DTLS cannot use refuses start; by default DTLS is just left off.
    pub dtls_explicit: bool,
    /// IPv4 relay address.
    pub relay_v4: Option<Ipv4Addr>,
    /// IPv6 relay address.
    pub relay_v6: Option<Ipv6Addr>,
    /// Advertised IPv4 relay address.
    pub external_v4: Option<Ipv4Addr>,
    /// Advertised IPv6 relay address.
    pub external_v6: Option<Ipv6Addr>,
    /// Realm.
    pub realm: String,
    /// Credentials (keys only).
    pub credentials: Credentials,
    /// The generated demo credential, when no other was configured.
    pub demo_user: Option<(String, String)>,
    /// Worker threads.
    pub threads: usize,
    /// The longest allocation lifetime granted (`max-allocation-lifetime`
    /// resolved).
    pub max_allocation_lifetime: std::time::Duration,
    /// No relay address was configured: each allocation relays from the
    /// address its client reached (falling back to `relay_v4`/`relay_v6`).
    pub relay_auto: bool,
    /// RFC 5780: the primary listen address and the alternate IP and port.
    pub rfc5780: Option<(SocketAddr, IpAddr, Option<u16>)>,
    /// Admin API listener and its token.
    pub admin: Option<(SocketAddr, String)>,
    /// The user database.
    pub db: PathBuf,
    /// Redis credential store.
    pub redis_url: Option<String>,
    /// coturn's PostgreSQL user database (`sqldb.rs`).
    pub db_url: Option<String>,
    /// Files whose change triggers a reload (empty: no watching).
    pub watched_files: Vec<PathBuf>,
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
        if self.options.peer_precedence == PeerPrecedence::Allow {
            return Vec::new();
        }
        let mut out = Vec::new();
        for a in &self.options.allow_peer {
            if let Some(d) = self.options.deny_peer.iter().find(|d| d.covers(a)) {
                out.push((*a, *d));
            }
        }
        out
    }
}

impl WebSettings {
    /// Whether either page is served (then a web secret is minted).
    pub fn enabled(&self) -> bool {
        self.ui || self.public.is_some()
    }

    fn new(
        ui: bool,
        public: Option<SocketAddr>,
        ttl: Period,
        per_minute: u32,
        turn_host: Option<&str>,
        admin: bool,
    ) -> Result<Self> {
        if ui && !admin {
            bail!("web-ui: the pages are served on the admin listener; set admin-listen and admin-token (or use web-listen for the public ICE page)");
        }
        if !(Period::secs(30)..=Period::secs(3600)).contains(&ttl) {
            bail!(
                "web-credential-ttl {ttl}: use 30s to 1h (the page's credentials should expire in minutes)"
            );
        }
        if !(1..=600).contains(&per_minute) {
            bail!("web-credentials-per-minute {per_minute}: use 1 to 600");
        }
        let turn_host = match turn_host.map(str::trim) {
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
            public,
            credential_ttl: ttl.get(),
            per_minute,
            turn_host,
        })
    }
}

/// Checks `options` against `host` and resolves every default: the one
/// place a setting that cannot work is refused, before anything starts.
/// Pure: everything it knows of the host is in `host`.
pub fn validate(options: &Options, host: &HostFacts) -> Result<Settings> {
    // Every field by name: an option added to `Options` is a compile error
    // here until it is handled. `_`: any value works, and the server reads
    // it from `Settings::options` as given.
    let Options {
        config,
        listen,
        tls_listen,
        no_tls,
        dtls_listen,
        no_dtls,
        cert,
        key,
        relay_ip,
        external_ip,
        external_ip_from: _,
        min_port,
        max_port,
        realm,
        allow_long_realm,
        user,
        auth_secret,
        auth_secret_file,
        allow_loopback_peers: _,
        allow_peer: _,
        proxy_protocol_from: _,
        deny_peer: _,
        peer_precedence: _,
        threads,
        udp_gso: _,
        log_level,
        software,
        rfc5766_channel_numbers: _,
        mobility: _,
        nonce_lifetime,
        allocation_lifetime,
        max_allocation_lifetime,
        user_quota: _,
        total_quota: _,
        max_bps: _,
        user_max_bps: _,
        max_allocation_bytes: _,
        rate_limit_per_ip: _,
        auth_fail_limit: _,
        auth_block_secs,
        max_connections,
        max_connections_per_ip: _,
        handshake_timeout,
        idle_timeout,
        tcp_connections_per_allocation,
        tcp_connect_timeout,
        fast_path,
        fast_path_interface,
        rfc5780,
        alt_ip,
        alt_port,
        alternate_server: _,
        drain_timeout: _,
        metrics_listen: _,
        db,
        redis_url,
        redis_url_file,
        db_url,
        db_url_file,
        node_name,
        fleet_lease,
        fleet_total_quota,
        redirect_above,
        admin_listen,
        admin_token,
        admin_token_file,
        web_ui,
        web_listen,
        web_credential_ttl,
        web_credentials_per_minute,
        web_turn_host,
        reload_on_change,
        log_format: _,
        log_refusals_per_second: _,
        metrics_per_user,
        events_webhook,
        events_webhook_secret_file,
        events_file,
        events_redis_stream,
        events_redis_maxlen,
        events_interim,
        events_queue,
        events_flush_timeout,
        redact: _,
    } = options;
    let web = WebSettings::new(
        *web_ui,
        *web_listen,
        *web_credential_ttl,
        *web_credentials_per_minute,
        web_turn_host.as_deref(),
        admin_listen.is_some(),
    )?;
    let realm = checked_realm(realm, *allow_long_realm)?;
    let (listen, tls_listen, tls) = listeners(listen, tls_listen, *no_tls, cert, key, host)?;
    let dtls = dtls_listeners(dtls_listen, *no_dtls, *no_tls, &tls_listen)?;
    check_relay_ports(*min_port, *max_port, host)?;
    let relay = RelayAddrs::resolve(relay_ip, external_ip, &listen, host)?;
    let (credentials, demo_user) = credentials(user, auth_secret, auth_secret_file, &realm, host)?;
    let threads = threads.unwrap_or(host.cores.min(256));
    check_process(threads, log_level, software.as_deref())?;
    let max_allocation_lifetime =
        max_allocation_lifetime.unwrap_or(Period::secs(3600).max(*allocation_lifetime));
    check_lifetimes(
        *nonce_lifetime,
        *allocation_lifetime,
        max_allocation_lifetime,
        *auth_block_secs,
    )?;
    check_connections(*max_connections, *handshake_timeout, *idle_timeout)?;
    check_rfc6062(*tcp_connections_per_allocation, *tcp_connect_timeout)?;
    if *fast_path == FastPathMode::Off && !fast_path_interface.is_empty() {
        bail!("fast-path-interface: given with --fast-path off; drop one of them");
    }
    let db = user_db(db.as_ref(), host)?;
    let redis_url = redis_url_of(redis_url.as_ref(), redis_url_file.as_ref(), host)?;
    if *metrics_per_user > 1000 {
        bail!("metrics-per-user {metrics_per_user}: at most 1000 (each user is two series on every scrape)");
    }
    let events = events_config(
        host,
        events_webhook.as_deref(),
        events_webhook_secret_file.as_deref(),
        events_file.as_ref(),
        events_redis_stream.as_deref(),
        redis_url.as_deref(),
        (
            *events_redis_maxlen,
            *events_interim,
            *events_queue,
            *events_flush_timeout,
        ),
    )?;
    let db_url = db_url_of(db_url.as_ref(), db_url_file.as_ref(), host)?;
    let rfc5780 = rfc5780_addresses(*rfc5780, *alt_ip, *alt_port, &listen)?;
    let admin = admin_api(
        *admin_listen,
        admin_token.as_ref(),
        admin_token_file.as_ref(),
        host,
    )?;
    check_fleet(
        fleet_lease.get(),
        *redirect_above,
        *fleet_total_quota,
        redis_url.is_some(),
        node_name.as_ref(),
    )?;
    let watched_files = if *reload_on_change {
        watched_files(
            config
                .iter()
                .chain(auth_secret_file)
                .chain(admin_token_file)
                .chain(cert)
                .chain(key),
        )?
    } else {
        Vec::new()
    };
    Ok(Settings {
        options: options.clone(),
        listen,
        tls_listen,
        tls,
        dtls_listen: dtls,
        dtls_explicit: !dtls_listen.is_empty(),
        events,
        relay_v4: relay.v4,
        relay_v6: relay.v6,
        external_v4: relay.external_v4,
        external_v6: relay.external_v6,
        relay_auto: relay.auto,
        realm,
        credentials,
        demo_user,
        threads,
        max_allocation_lifetime: max_allocation_lifetime.get(),
        rfc5780,
        db,
        redis_url,
        db_url,
        watched_files,
        web,
        admin,
    })
}

/// The realm, refused when a 401 to a minimal Allocate would be more than
/// `CHALLENGE_RATIO` times its size (reflection), unless allowed.
fn checked_realm(realm: &str, allow_long: bool) -> Result<String> {
    if realm.is_empty() || realm.len() > 763 {
        bail!("realm: must be 1 to 763 bytes long (e.g. --realm example.org)");
    }
    if realm.len() > turn_core::max_realm_len() && !allow_long {
        bail!(
            "realm: \"{}\" is {} bytes; with more than {} the 401 to a browser's first Allocate ({} bytes) is more than {}x its size, which helps reflection attacks. Use a shorter realm, or --allow-long-realm to accept that",
            realm.escape_debug(),
            realm.len(),
            turn_core::max_realm_len(),
            turn_core::MIN_ALLOCATE_LEN,
            turn_core::CHALLENGE_RATIO
        );
    }
    Ok(realm.to_owned())
}

/// The listen addresses (default: 3478 and 5349 on every address, IPv6
/// too where the host has it) and where the certificate comes from.
fn listeners(
    listen: &[SocketAddr],
    tls_listen: &[SocketAddr],
    no_tls: bool,
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    host: &HostFacts,
) -> Result<(Vec<SocketAddr>, Vec<SocketAddr>, Option<TlsSource>)> {
    let everywhere = |port: u16| {
        let mut l = vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))];
        if host.ipv6 {
            l.push(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)));
        }
        l
    };
    let listen = if listen.is_empty() {
        everywhere(3478)
    } else {
        listen.to_vec()
    };
    let tls_listen = if no_tls {
        if !tls_listen.is_empty() {
            bail!("tls-listen is set but no-tls is true: drop one of them");
        }
        Vec::new()
    } else if tls_listen.is_empty() {
        everywhere(5349)
    } else {
        tls_listen.to_vec()
    };
    let tls = match (cert.clone(), key.clone()) {
        _ if tls_listen.is_empty() => None,
        (Some(cert), Some(key)) => Some(TlsSource::Files { cert, key }),
        (None, None) => Some(TlsSource::SelfSigned),
        (Some(_), None) => bail!("cert is set but key is not: give both --cert FILE and --key FILE"),
        (None, Some(_)) => bail!("key is set but cert is not: give both --cert FILE and --key FILE"),
    };
    Ok((listen, tls_listen, tls))
}

/// Session events' sinks, each checked: a webhook needs its secret file
/// (read here, so a bad one refuses start), a stream needs Redis.
fn events_config(
    host: &HostFacts,
    webhook: Option<&str>,
    secret_file: Option<&std::path::Path>,
    file: Option<&PathBuf>,
    stream: Option<&str>,
    redis_url: Option<&str>,
    (maxlen, interim, queue, flush): (u64, Period, usize, Period),
) -> Result<crate::events::EventsConfig> {
    use crate::events::{EventsConfig, SinkConfig};
    let mut sinks = Vec::new();
    match (webhook, secret_file) {
        (Some(url), Some(path)) => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                bail!("events-webhook {url:?}: give an http:// or https:// URL");
            }
            sinks.push(SinkConfig::Webhook {
                url: url.to_string(),
                secret: EventsConfig::webhook_secret(path, host.file("events-webhook-secret-file", path)?)?,
            });
        }
        (Some(_), None) => bail!(
            "events-webhook needs events-webhook-secret-file FILE: requests are signed (HMAC-SHA256) so the receiver can tell them from forgeries"
        ),
        (None, Some(_)) => bail!("events-webhook-secret-file is set but events-webhook is not: give the URL or drop the file"),
        (None, None) => {}
    }
    if let Some(p) = file {
        sinks.push(SinkConfig::File(p.clone()));
    }
    if let Some(key) = stream {
        let Some(url) = redis_url else {
            bail!("events-redis-stream {key:?} needs redis-url (or redis-url-file): the stream lives on that server");
        };
        if key.is_empty() {
            bail!("events-redis-stream: give the stream's key, e.g. turnpike:events");
        }
        sinks.push(SinkConfig::RedisStream {
            url: url.to_string(),
            key: key.to_string(),
            maxlen: maxlen.max(1),
        });
    }
    if queue == 0 {
        bail!("events-queue: 0 would drop every event; use at least 1 (default 65536)");
    }
    Ok(EventsConfig {
        sinks,
        interim: interim.get(),
        queue,
        flush: flush.get(),
    })
}

/// RFC 7350: DTLS on UDP beside each TLS listener unless told otherwise;
/// it uses the TLS certificate, so it needs TLS on.
fn dtls_listeners(
    dtls_listen: &[SocketAddr],
    no_dtls: bool,
    no_tls: bool,
    tls_listen: &[SocketAddr],
) -> Result<Vec<SocketAddr>> {
    if no_dtls {
        if !dtls_listen.is_empty() {
            bail!("dtls-listen is set but no-dtls is true: drop one of them");
        }
        return Ok(Vec::new());
    }
    if dtls_listen.is_empty() {
        return Ok(tls_listen.to_vec());
    }
    if no_tls {
        bail!("dtls-listen needs the TLS certificate, but no-tls is true: drop no-tls (and give --cert/--key), or drop dtls-listen");
    }
    Ok(dtls_listen.to_vec())
}

fn check_relay_ports(min_port: u16, max_port: u16, host: &HostFacts) -> Result<()> {
    if min_port == 0 {
        bail!("min-port: 0 is not a port; use 1024 or above (default 49152)");
    }
    if min_port < 1024 && !host.privileged_ports {
        bail!(
            "min-port {min_port}: relay ports below 1024 need root or CAP_NET_BIND_SERVICE, \
             which this process lacks; use min-port 1024 or above (default 49152)"
        );
    }
    if min_port > max_port {
        bail!("min-port ({min_port}) is greater than max-port ({max_port}): set min-port <= max-port");
    }
    Ok(())
}

/// Where relay sockets bind and what clients are told.
struct RelayAddrs {
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    external_v4: Option<Ipv4Addr>,
    external_v6: Option<Ipv6Addr>,
    auto: bool,
}

impl RelayAddrs {
    fn resolve(
        relay_ip: &[IpAddr],
        external_ip: &[IpAddr],
        listen: &[SocketAddr],
        host: &HostFacts,
    ) -> Result<Self> {
        let (mut v4, mut v6) = (None, None);
        for ip in relay_ip {
            if ip.is_unspecified() {
                bail!("relay-ip {ip}: must be a concrete address clients can reach, not a wildcard");
            }
            // Relay sockets bind to it: an address this host does not have
            // would make every Allocate fail with 508.
            if !host.addresses.is_empty() && !host.addresses.contains(ip) {
                bail!(
                    "relay-ip {ip}: not an address of this host (it has {}); to advertise a NAT's \
                     public address use external-ip, and give relay-ip the local one",
                    host.addresses
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            match ip {
                IpAddr::V4(v) if v4.is_none() => v4 = Some(*v),
                IpAddr::V6(v) if v6.is_none() => v6 = Some(*v),
                _ => bail!("relay-ip: at most one IPv4 and one IPv6 address (got a second {ip})"),
            }
        }
        let auto = v4.is_none() && v6.is_none();
        if auto {
            // IPv6 relaying is on when the host has a global IPv6 address
            // and listens on IPv6.
            if listen.iter().any(|l| l.is_ipv6()) {
                v6 = listen
                    .iter()
                    .find_map(|l| match l.ip() {
                        IpAddr::V6(v) if !v.is_unspecified() => Some(v),
                        _ => None,
                    })
                    .or(host.routed_v6);
            }
            // A specific listen address is where clients reach us: relay there.
            v4 = listen
                .iter()
                .find_map(|l| match l.ip() {
                    IpAddr::V4(v) if !v.is_unspecified() => Some(v),
                    _ => None,
                })
                .or(Some(host.routed_v4.unwrap_or(Ipv4Addr::LOCALHOST)));
        }
        let (mut external_v4, mut external_v6) = (None, None);
        for ip in external_ip {
            if ip.is_unspecified() {
                bail!("external-ip {ip}: must be the public address clients reach, not a wildcard");
            }
            match ip {
                IpAddr::V4(v) if external_v4.is_none() => external_v4 = Some(*v),
                IpAddr::V6(v) if external_v6.is_none() => external_v6 = Some(*v),
                _ => bail!("external-ip: at most one IPv4 and one IPv6 address (got a second {ip})"),
            }
        }
        Ok(RelayAddrs {
            v4,
            v6,
            external_v4,
            external_v6,
            auto,
        })
    }
}

/// The configured users and REST secrets as keys; with none, a demo user.
fn credentials(
    users: &[UserSpec],
    auth_secret: &[String],
    auth_secret_file: &[PathBuf],
    realm: &str,
    host: &HostFacts,
) -> Result<(Credentials, Option<(String, String)>)> {
    let mut credentials = Credentials::new();
    for u in users {
        match &u.secret {
            Secret::Password(pw) => credentials.add_user(&u.name, realm, pw),
            Secret::Md5Key(key) => credentials.add_user_key(&u.name, realm, *key),
        }
    }
    let mut secrets = auth_secret.to_vec();
    for f in auth_secret_file {
        let before = secrets.len();
        secrets.extend(
            host.file("auth-secret-file", f)?
                .lines()
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
        if EXAMPLE_SECRETS.contains(&s.as_str()) {
            bail!("auth-secret: \"{s}\" is the example from deploy/turnpike.toml; use a random one (e.g. openssl rand -base64 32)");
        }
        credentials.add_secret(s.as_bytes());
    }
    let demo_user = if credentials.user_count() == 0 && credentials.secret_count() == 0 {
        let (u, p) = (format!("demo-{}", random_token(6)), random_token(20));
        credentials.add_user(&u, realm, &p);
        Some((u, p))
    } else {
        None
    };
    Ok((credentials, demo_user))
}

/// `--reload-on-change`: the files it watches, of those named.
fn watched_files<'a>(named: impl Iterator<Item = &'a PathBuf>) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = named.cloned().collect();
    if files.is_empty() {
        bail!("reload-on-change: nothing to watch; it watches --config, --auth-secret-file, --admin-token-file, --cert and --key");
    }
    Ok(files)
}

/// Worker threads, the log filter and SOFTWARE (RFC 8489 §14.14: fewer
/// than 128 characters, at most 763 bytes).
fn check_process(threads: usize, log_level: &str, software: Option<&str>) -> Result<()> {
    if threads == 0 || threads > 256 {
        bail!("threads: must be between 1 and 256 (default: number of cores)");
    }
    check_log_level(log_level)?;
    if software.is_some_and(|s| s.len() > 763) {
        bail!("software: at most 763 bytes");
    }
    Ok(())
}

/// Lifetimes are whole seconds on the wire (LIFETIME, RFC 8656 §18.2) and
/// in the nonce's timestamp, so each is at least one second.
fn check_lifetimes(
    nonce: Period,
    allocation: Period,
    max_allocation: Period,
    auth_block: Period,
) -> Result<()> {
    let one = Period::secs(1);
    if nonce < one {
        bail!("nonce-lifetime: {nonce} is less than a second; give at least 1s (default 10m)");
    }
    if allocation < one {
        bail!("allocation-lifetime: {allocation} is less than a second; give at least 1s (default 10m)");
    }
    if max_allocation < allocation {
        bail!(
            "max-allocation-lifetime: {max_allocation} is shorter than allocation-lifetime \
             ({allocation}); raise it or lower allocation-lifetime"
        );
    }
    if auth_block < one {
        bail!("auth-block-secs: {auth_block} is less than a second; give at least 1s (default 5m), or auth-fail-limit = 0 to turn the guard off");
    }
    Ok(())
}

fn check_connections(max_connections: usize, handshake_timeout: Period, idle_timeout: Period) -> Result<()> {
    if max_connections == 0 {
        bail!("max-connections: must be at least 1 (default 8192)");
    }
    if handshake_timeout < Period::secs(1) {
        bail!("handshake-timeout: {handshake_timeout} is less than a second; give at least 1s (default 10s)");
    }
    if idle_timeout < Period::secs(1) {
        bail!("idle-timeout: {idle_timeout} is less than a second; give at least 1s (default 2m)");
    }
    Ok(())
}

fn check_rfc6062(per_allocation: usize, connect_timeout: Period) -> Result<()> {
    if per_allocation == 0 || per_allocation > 65535 {
        bail!("tcp-connections-per-allocation: must be 1 to 65535 (default 64)");
    }
    if !(Period::secs(30)..=Period::secs(3600)).contains(&connect_timeout) {
        bail!("tcp-connect-timeout: {connect_timeout} is outside 30s to 1h (RFC 6062 §5.2 asks for at least 30 seconds; default 30s)");
    }
    Ok(())
}

/// The user database: the default one is optional, one named on purpose
/// must exist (a typo would otherwise start a server without its users).
fn user_db(db: Option<&PathBuf>, host: &HostFacts) -> Result<PathBuf> {
    match db {
        Some(db) if !host.db_exists => bail!(
            "db {}: no such file; create it with `turnpike user add NAME --db {}`, or leave db unset",
            db.display(),
            db.display()
        ),
        Some(db) => Ok(db.clone()),
        None => Ok(host.default_db.clone()),
    }
}

/// A URL given as `{name}` or read from `{name}-file` (so a password in
/// it is on no command line), not both.
fn url_or_file(
    name: &str,
    url: Option<&String>,
    file: Option<&PathBuf>,
    host: &HostFacts,
) -> Result<Option<String>> {
    match (url, file) {
        (Some(_), Some(_)) => bail!("{name} and {name}-file: give one of them"),
        (_, Some(f)) => {
            let url = host.file(&format!("{name}-file"), f)?.trim();
            if url.is_empty() {
                bail!("{name}-file {}: empty; it holds one URL", f.display());
            }
            Ok(Some(url.to_owned()))
        }
        (url, None) => Ok(url.cloned()),
    }
}

fn redis_url_of(url: Option<&String>, file: Option<&PathBuf>, host: &HostFacts) -> Result<Option<String>> {
    let url = url_or_file("redis-url", url, file, host)?;
    if let Some(url) = &url {
        if let Err(e) = redis::Client::open(url.as_str()) {
            bail!("redis-url {url:?}: not a Redis URL ({e}); expected redis://[:PASSWORD@]HOST[:PORT][/DB]");
        }
    }
    Ok(url)
}

fn db_url_of(url: Option<&String>, file: Option<&PathBuf>, host: &HostFacts) -> Result<Option<String>> {
    let url = url_or_file("db-url", url, file, host)?;
    if let Some(url) = &url {
        crate::sqldb::parse("db-url", url)?;
    }
    Ok(url)
}

/// RFC 5780 §4.1: the primary address and the alternate IP and port.
fn rfc5780_addresses(
    on: bool,
    alt_ip: Option<IpAddr>,
    alt_port: Option<u16>,
    listen: &[SocketAddr],
) -> Result<Option<(SocketAddr, IpAddr, Option<u16>)>> {
    if !on {
        if alt_ip.is_some() || alt_port.is_some() {
            bail!("alt-ip/alt-port are set but rfc5780 is not: add --rfc5780");
        }
        return Ok(None);
    }
    let Some(alt_ip) = alt_ip else {
        bail!("rfc5780 needs alt-ip: the server's second IP address (e.g. --alt-ip 192.0.2.2)");
    };
    let Some(primary) = listen.iter().copied().find(|l| l.is_ipv4() == alt_ip.is_ipv4()) else {
        bail!("rfc5780: no listen address of the same family as alt-ip {alt_ip}");
    };
    if primary.ip().is_unspecified() {
        bail!("rfc5780 needs a specific --listen address (not {primary}): answers must come from known addresses");
    }
    if primary.ip() == alt_ip {
        bail!("alt-ip {alt_ip} must differ from the listen address");
    }
    Ok(Some((primary, alt_ip, alt_port)))
}

/// The admin listener and its token, which it never runs without.
fn admin_api(
    listen: Option<SocketAddr>,
    token: Option<&String>,
    token_file: Option<&PathBuf>,
    host: &HostFacts,
) -> Result<Option<(SocketAddr, String)>> {
    let Some(addr) = listen else {
        return Ok(None);
    };
    let token = match (token, token_file) {
        (Some(t), _) => t.trim().to_owned(),
        (None, Some(f)) => host.file("admin-token-file", f)?.trim().to_owned(),
        (None, None) => bail!("admin-listen needs admin-token or admin-token-file: the admin API always requires a bearer token"),
    };
    if token.len() < 16 {
        bail!("admin token: at least 16 characters (e.g. `openssl rand -hex 24`)");
    }
    Ok(Some((addr, token)))
}

fn check_fleet(
    lease: Duration,
    redirect_above: usize,
    fleet_total_quota: usize,
    redis: bool,
    node_name: Option<&String>,
) -> Result<()> {
    if lease < Duration::from_secs(3) {
        bail!("fleet-lease: at least 3 s (default 15): nodes beat once a second, and a lease must outlast a missed beat");
    }
    if redirect_above > 0 && !redis {
        bail!("redirect-above: needs redis-url, where the fleet's nodes and their load are registered (or use alternate-server)");
    }
    if fleet_total_quota > 0 && !redis {
        bail!("fleet-total-quota: needs redis-url, where the nodes' counts are shared (on one node, use total-quota)");
    }
    if let Some(n) = node_name {
        if n.is_empty() || n.len() > 64 || !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            bail!("node-name {n:?}: 1 to 64 of letters, digits and - _ . :");
        }
    }
    Ok(())
}

fn random_token(n: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;
