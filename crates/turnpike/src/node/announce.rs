//! What the node says when it starts: one line with where it listens and
//! how it is set up, the warnings a configuration deserves, and the demo
//! credential's banner.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use tracing::{info, warn};

use crate::config::{Settings, TlsSource};
use crate::runtime::Handle;

/// A start-up field: the value, or "none" (clean in JSON logs, no `Some(…)`).
fn shown<T: std::fmt::Display>(v: Option<T>) -> String {
    shown_or(v, "none")
}

/// A start-up field: the value, or `absent`.
fn shown_or<T: std::fmt::Display>(v: Option<T>, absent: &str) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| absent.to_owned())
}

/// A Redis URL without its password, for logs.
pub(super) fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}***{}", &url[..scheme + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// The "turnpike started" line.
pub(super) fn started(settings: &Settings, handle: &Handle, auth: &str) {
    info!(
        version = %crate::version(),
        listen = ?handle.listen,
        tls_listen = ?handle.tls_listen,
        dtls_listen = ?handle.dtls_listen,
        relay_ipv4 = %shown(settings.relay_v4),
        relay_ipv6 = %shown(settings.relay_v6),
        external_ipv4 = %shown(settings.external_v4),
        external_ipv6 = %shown(settings.external_v6),
        relay_from = if settings.relay_auto {
            "the address each client reached (the above where it cannot be used)"
        } else {
            "the configured relay-ip"
        },
        relay_ports = %format!("{}-{}", settings.options.min_port, settings.options.max_port),
        realm = %settings.realm,
        auth = %auth,
        threads = settings.threads,
        allow_loopback_peers = settings.options.allow_loopback_peers,
        metrics = %shown_or(handle.metrics, "off"),
        admin = %shown_or(settings.admin.as_ref().map(|(a, _)| *a), "off"),
        db = %settings.db.display(),
        redis = %shown_or(settings.redis_url.as_deref().map(redact_url), "off"),
        user_database = %shown_or(settings.db_url.as_deref().map(crate::sqldb::redacted), "off"),
        fast_path = %handle.fast_path,
        peer_policy = %format!(
            "default deny of private/reserved ranges{}; {} allow-peer, {} deny-peer, {} wins where both match",
            if settings.options.allow_loopback_peers { ", loopback allowed" } else { "" },
            settings.options.allow_peer.len(),
            settings.options.deny_peer.len(),
            settings.options.peer_precedence
        ),
        "turnpike started"
    );
}

/// An `allow-peer` range inside a `deny-peer` range does nothing while deny
/// wins; a configuration carried over from coturn (where allow wins) meant
/// it as an exception, so say so at start and on every reload.
pub(super) fn warn_shadowed_allows(settings: &Settings) {
    for (allow, deny) in settings.shadowed_allows() {
        warn!(
            allow_peer = %allow,
            deny_peer = %deny,
            "allow-peer {allow} has no effect: it lies inside deny-peer {deny}, and deny wins; \
             for an exception carved out of a denied range (coturn's allowed-peer-ip), set peer-precedence = \"allow\""
        );
    }
}

/// Warnings about a configuration that works but will surprise.
pub(super) fn warnings(settings: &Settings, handle: &Handle) {
    warn_shadowed_allows(settings);
    if let Some(w) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| {
            crate::runtime::relays::ephemeral_overlap(
                settings.options.min_port,
                settings.options.max_port,
                &r,
            )
        })
    {
        warn!("{w}");
    }
    if let Some(w) = crate::userdb::permission_warning(&settings.db) {
        warn!("{w}");
    }
    // A configured loopback relay behind listeners that remote clients
    // reach hands them a relayed address they cannot use.
    let remote_listeners = handle
        .listen
        .iter()
        .chain(&handle.tls_listen)
        .chain(&handle.dtls_listen)
        .any(|l| !l.ip().is_loopback());
    for ip in [
        settings.relay_v4.map(IpAddr::V4),
        settings.relay_v6.map(IpAddr::V6),
    ]
    .into_iter()
    .flatten()
    {
        if !settings.relay_auto && ip.is_loopback() && remote_listeners {
            warn!(
                relay_ip = %ip,
                "relay-ip is a loopback address but the listeners accept remote clients: they would get a relay \
                 they cannot reach; give relay-ip a routable address of this host (and external-ip behind NAT)"
            );
        }
    }
    if let Some(fp) = &handle.tls_fingerprint {
        if matches!(settings.tls, Some(TlsSource::SelfSigned)) {
            warn!(sha256 = %fp, "TLS uses a self-signed certificate generated at start-up; give --cert and --key for production");
        } else {
            info!(sha256 = %fp, "TLS certificate loaded");
        }
    }
}

/// The demo credential, printed once to stdout so log filtering cannot
/// hide it, with a probe this host can run against the defaults.
pub(super) fn demo_banner(settings: &Settings, handle: &Handle) {
    let Some((u, p)) = &settings.demo_user else {
        return;
    };
    // The first listener (a wildcard one through loopback). The probe
    // relays between its own two allocations, which the peer policy allows.
    let probe_url = handle
        .listen
        .first()
        .map(|a| {
            let ip = match a.ip() {
                IpAddr::V4(v) if v.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(v) if v.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
                ip => ip,
            };
            let host = match ip {
                IpAddr::V6(v) => format!("[{v}]"),
                v4 => v4.to_string(),
            };
            if a.port() == 3478 {
                format!("turn:{host}")
            } else {
                format!("turn:{host}:{}", a.port())
            }
        })
        .unwrap_or_else(|| "turn:127.0.0.1".to_owned());
    let banner = format!(
        "==================== DEMO CREDENTIAL ====================\n\
         \x20 No --user or --auth-secret was given, so turnpike made one\n\
         \x20 for trying it out. It changes at every start.\n\
         \x20   realm:    {}\n\
         \x20   username: {u}\n\
         \x20   password: {p}\n\
         \x20 Try it from this host:\n\
         \x20   turnpike probe turn {probe_url} --user {u} --password {p}\n\
         \x20 Configure real users with --user NAME:PASSWORD.\n\
         =========================================================\n",
        settings.realm
    );
    // A closed stdout must not stop the server, so errors are ignored.
    let mut out = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut out, banner.as_bytes());
    let _ = std::io::Write::flush(&mut out);
}

/// Where clients reach this node in `family` (v6 or not), for the fleet's
/// registry: the external address, else a specific listen address, else
/// the relay address; with the first listen port of that family.
pub(super) fn advertised(settings: &Settings, handle: &Handle, v6: bool) -> Option<std::net::SocketAddr> {
    let port = handle.listen.iter().find(|a| a.is_ipv6() == v6)?.port();
    let listen_ip = handle
        .listen
        .iter()
        .find(|a| a.is_ipv6() == v6 && !a.ip().is_unspecified())
        .map(|a| a.ip());
    let (external, relay): (Option<IpAddr>, Option<IpAddr>) = if v6 {
        (
            settings.external_v6.map(Into::into),
            settings.relay_v6.map(Into::into),
        )
    } else {
        (
            settings.external_v4.map(Into::into),
            settings.relay_v4.map(Into::into),
        )
    };
    Some(std::net::SocketAddr::new(external.or(listen_ip).or(relay)?, port))
}

/// `shown` for the fleet line.
pub(super) fn shown_addr(a: Option<std::net::SocketAddr>) -> String {
    shown(a)
}
