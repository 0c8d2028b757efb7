//! `turnpike probe`: diagnostics a person runs against any STUN/TURN server.
//!
//! `probe stun URL` reports the reflexive address and round-trip times over
//! each transport and address family; `probe turn URL` allocates, binds a
//! channel and relays data through the server back to itself (two
//! allocations, so no outside peer is needed), step by step, with advice
//! for each failure. Exit status 0 only when every check passed.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::client::{binding, Channel, ClientError, ClientTransport, Received, TurnClient};

static INTERRUPTED: std::sync::OnceLock<std::sync::Arc<std::sync::atomic::AtomicBool>> =
    std::sync::OnceLock::new();

/// Whether Ctrl-C was pressed: probes stop between steps, delete what they
/// allocated, and report what they have.
fn interrupted() -> bool {
    INTERRUPTED
        .get()
        .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
}

/// `turnpike probe` subcommands.
#[derive(Debug, Subcommand)]
pub enum ProbeCommand {
    /// Reachability, reflexive address and RTT of a STUN server.
    Stun(StunArgs),
    /// Allocate, permit, bind a channel and relay data through a TURN server.
    Turn(TurnArgs),
    /// NAT mapping and filtering behaviour, hairpinning, and a verdict
    /// (RFC 5780; the server must support it, e.g. `turnpike serve --rfc5780`).
    Nat(NatArgs),
}

/// `probe nat`.
#[derive(Debug, Clone, Args)]
pub struct NatArgs {
    /// stun:HOST[:PORT] of a server with RFC 5780 enabled.
    pub url: String,
    /// Also estimate how long the NAT keeps an idle UDP binding (RFC 5780
    /// §4.6), trying idle times of 1, 2, 4, ... seconds up to SECS. Slow by
    /// nature: it waits that long.
    #[arg(long, value_name = "SECS")]
    pub lifetime: Option<u64>,
    #[command(flatten)]
    pub common: Common,
}

/// Options shared by every probe.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// Print JSON instead of a report.
    #[arg(long)]
    pub json: bool,
    /// DNS server for SRV lookups [default: the first nameserver in
    /// /etc/resolv.conf].
    #[arg(long, value_name = "IP:PORT")]
    pub dns_server: Option<SocketAddr>,
}

/// `probe stun`.
#[derive(Debug, Clone, Args)]
pub struct StunArgs {
    /// stun:HOST[:PORT], stuns:..., turn:..., turns:... (RFC 7064/7065),
    /// or HOST[:PORT].
    pub url: String,
    /// Binding requests per transport and address.
    #[arg(long, default_value_t = 5)]
    pub count: u32,
    #[command(flatten)]
    pub common: Common,
}

/// `probe turn`.
#[derive(Debug, Clone, Args)]
pub struct TurnArgs {
    /// turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT] (RFC 7065).
    pub url: String,
    /// Username (long-term credentials).
    #[arg(long)]
    pub user: Option<String>,
    /// Password.
    #[arg(long)]
    pub password: Option<String>,
    /// TURN REST-API shared secret: a username "EXPIRY:probe" and its
    /// password are derived from it.
    #[arg(long)]
    pub secret: Option<String>,
    /// Transports to test (udp, tcp, tls); default: the URL's, or udp and
    /// tcp for turn: and tls for turns:.
    #[arg(long, value_delimiter = ',')]
    pub transport: Vec<String>,
    /// Relayed address family to ask for: ipv4 (the default), ipv6, or dual
    /// (both, RFC 8656 §7.2 ADDITIONAL-ADDRESS-FAMILY).
    #[arg(long, value_enum, default_value_t)]
    pub relay_family: crate::client::RelayFamily,
    #[command(flatten)]
    pub common: Common,
}

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

/// One check's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// What was checked, e.g. "udp 127.0.0.1:3478 allocate".
    pub name: String,
    /// Passed?
    pub ok: bool,
    /// Result or error.
    pub detail: String,
    /// How long it took, in milliseconds.
    pub ms: f64,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

/// A probe's report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The parsed URI.
    pub uri: Uri,
    /// Addresses the host resolved to.
    pub addresses: Vec<SocketAddr>,
    /// The SRV record used, if the URI had no port and one was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub srv: Option<String>,
    /// Every check in order.
    pub checks: Vec<Check>,
    /// Overall advice drawn from the pattern of results.
    pub advice: Vec<String>,
    /// `probe nat`: the verdict in plain words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<String>,
    /// All passed?
    pub ok: bool,
}

/// The SRV service for a URI (RFC 7064 §3.3, RFC 7065 §3.3).
fn srv_service(uri: &Uri) -> &'static str {
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
fn resolve(uri: &Uri, c: &Common) -> Result<(Vec<SocketAddr>, Option<String>)> {
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

fn transport_name(t: &ClientTransport) -> &'static str {
    match t {
        ClientTransport::Udp => "udp",
        ClientTransport::Tcp => "tcp",
        ClientTransport::Tls { .. } => "tls",
    }
}

fn describe(e: &ClientError, t: &ClientTransport, addr: SocketAddr) -> (String, Option<String>) {
    let tn = transport_name(t);
    match e {
        ClientError::Timeout => (
            "no answer".into(),
            Some(format!(
                "no answer on {tn} {addr}: the server is not running there, or a firewall drops {}",
                tn.to_uppercase()
            )),
        ),
        ClientError::Io(io) if matches!(io.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => (
            "no answer".into(),
            Some(format!(
                "no answer on {tn} {addr}: the server is not running there, or a firewall drops {}",
                tn.to_uppercase()
            )),
        ),
        ClientError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => (
            format!("connection refused ({io})"),
            Some(format!("nothing listens on {tn} {addr}: check the port and that the server runs")),
        ),
        ClientError::Io(io) => (format!("{io}"), Some(format!("network error on {tn} {addr}"))),
        ClientError::Error { code: 401, reason } => (
            format!("401 {}", if reason.is_empty() { "Unauthorized" } else { reason }),
            Some("401: the server does not accept these credentials; check the username and password (and the realm, shown in the report)".into()),
        ),
        ClientError::Error { code: 403, reason } => (
            format!("403 {reason}"),
            Some("403 on the peer: the server refuses that address range (its peer policy); relaying between two of its own allocations, or to a private address, is refused unless the operator allows it".into()),
        ),
        ClientError::Error { code: 437, reason } => (
            format!("437 {reason}"),
            Some("437: an allocation already exists for this address and port; wait for it to expire".into()),
        ),
        ClientError::Error { code: 486, reason } => (
            format!("486 {reason}"),
            Some("486: this user's allocation quota is used up".into()),
        ),
        ClientError::Error { code: 508, reason } => (
            format!("508 {reason}"),
            Some("508: the server is out of capacity (relay ports or its allocation quota) or draining".into()),
        ),
        ClientError::Error { code, reason } => (format!("{code} {reason}"), None),
        ClientError::Protocol(p) => (p.to_string(), Some("the server's answer is not valid STUN/TURN".into())),
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1000.0)
}

/// Runs `probe stun`.
pub fn stun(a: &StunArgs) -> Result<Report> {
    let uri = parse_uri(&a.url, Scheme::Stun)?;
    let (addrs, srv) = resolve(&uri, &a.common)?;
    let timeout = Duration::from_millis(a.common.timeout_ms);
    let transports: Vec<ClientTransport> = match (uri.scheme, uri.transport.as_deref()) {
        (Scheme::Stuns | Scheme::Turns, _) => vec![ClientTransport::Tls { pinned: None }],
        (_, Some("udp")) => vec![ClientTransport::Udp],
        (_, Some("tcp")) => vec![ClientTransport::Tcp],
        _ => vec![ClientTransport::Udp, ClientTransport::Tcp],
    };
    let mut checks = Vec::new();
    for addr in &addrs {
        for t in &transports {
            let name = format!("{} {addr} binding", transport_name(t));
            let mut rtts = Vec::new();
            let mut mapped = None;
            let mut last_err = None;
            let ch = Channel::connect(t, *addr, timeout);
            match ch {
                Err(e) => last_err = Some(ClientError::Io(e)),
                Ok(mut ch) => {
                    for _ in 0..a.count.max(1) {
                        if interrupted() {
                            break;
                        }
                        let (r, ms) = timed(|| binding(&mut ch, timeout));
                        match r {
                            Ok(m) => {
                                mapped = Some(m);
                                rtts.push(ms);
                            }
                            Err(e) => last_err = Some(e),
                        }
                    }
                }
            }
            let sent = a.count.max(1) as usize;
            let check = match mapped {
                Some(m) => {
                    let min = rtts.iter().cloned().fold(f64::MAX, f64::min);
                    let max = rtts.iter().cloned().fold(0.0, f64::max);
                    let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
                    Check {
                        name,
                        ok: true,
                        detail: format!(
                            "reflexive address {m}; RTT min/avg/max {min:.2}/{avg:.2}/{max:.2} ms; loss {}/{sent}",
                            sent - rtts.len()
                        ),
                        ms: avg,
                        advice: None,
                    }
                }
                None => {
                    let e = last_err.unwrap_or(ClientError::Timeout);
                    let (detail, advice) = describe(&e, t, *addr);
                    Check {
                        name,
                        ok: false,
                        detail,
                        ms: 0.0,
                        advice,
                    }
                }
            };
            checks.push(check);
        }
    }
    let mut r = finish(uri, addrs, checks);
    r.srv = srv;
    Ok(r)
}

fn finish(uri: Uri, addresses: Vec<SocketAddr>, checks: Vec<Check>) -> Report {
    let mut advice = Vec::new();
    let failed = |p: &str| checks.iter().any(|c| c.name.starts_with(p) && !c.ok);
    let passed = |p: &str| checks.iter().any(|c| c.name.starts_with(p) && c.ok);
    if failed("udp")
        && passed("tcp")
        && checks
            .iter()
            .any(|c| c.name.starts_with("udp") && c.detail == "no answer")
    {
        advice.push(format!(
            "no answer on UDP {} but TCP works: a firewall drops UDP; clients will fall back to TCP/TLS, with worse latency",
            uri.port
        ));
    }
    for c in &checks {
        if let Some(a) = &c.advice {
            if !advice.contains(a) {
                advice.push(a.clone());
            }
        }
    }
    let ok = !checks.is_empty() && checks.iter().all(|c| c.ok);
    Report {
        uri,
        addresses,
        srv: None,
        checks,
        advice,
        verdict: None,
        ok,
    }
}

/// Runs `probe turn`.
pub fn turn(a: &TurnArgs) -> Result<Report> {
    let uri = parse_uri(&a.url, Scheme::Turn)?;
    let (addrs, srv) = resolve(&uri, &a.common)?;
    let timeout = Duration::from_millis(a.common.timeout_ms);
    let (user, password) = match (&a.user, &a.password, &a.secret) {
        (_, _, Some(secret)) => {
            let expiry = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                + 3600;
            let user = format!("{expiry}:{}", a.user.as_deref().unwrap_or("probe"));
            let pw = turn_core::auth::rest_password(secret.as_bytes(), &user);
            (user, pw)
        }
        (Some(u), Some(p), None) => (u.clone(), p.clone()),
        _ => bail!("probe turn needs --user and --password, or --secret for REST-API credentials"),
    };
    let names: Vec<String> = if !a.transport.is_empty() {
        a.transport.iter().map(|t| t.to_ascii_lowercase()).collect()
    } else {
        match (uri.scheme, uri.transport.as_deref()) {
            (Scheme::Turns | Scheme::Stuns, _) => vec!["tls".into()],
            (_, Some(t)) => vec![t.into()],
            _ => vec!["udp".into(), "tcp".into()],
        }
    };
    let mut checks = Vec::new();
    for addr in &addrs {
        for n in &names {
            let t = match n.as_str() {
                "udp" => ClientTransport::Udp,
                "tcp" => ClientTransport::Tcp,
                "tls" => ClientTransport::Tls { pinned: None },
                other => bail!("--transport: {other:?} is not udp, tcp or tls"),
            };
            // TLS asked of a turn: URI without a port goes to the TLS port.
            let mut target = *addr;
            if n == "tls" && !uri.explicit_port && matches!(uri.scheme, Scheme::Turn | Scheme::Stun) {
                target.set_port(5349);
            }
            relay_checks(
                &t,
                target,
                (&user, &password),
                timeout,
                a.relay_family,
                &mut checks,
            );
        }
    }
    let mut r = finish(uri, addrs, checks);
    r.srv = srv;
    Ok(r)
}

/// Records one step's outcome; returns whether it passed.
type Recorder<'a> = dyn FnMut(&str, Result<String, ClientError>, f64) -> bool + 'a;

/// Allocates twice over `t`, permits and binds a channel between the two
/// relayed addresses, relays data both ways, and cleans up.
fn relay_checks(
    t: &ClientTransport,
    addr: SocketAddr,
    (user, pw): (&str, &str),
    timeout: Duration,
    relay_family: crate::client::RelayFamily,
    checks: &mut Vec<Check>,
) {
    let tn = transport_name(t);
    let mut push = |step: &str, r: Result<String, ClientError>, ms: f64| -> bool {
        let (ok, detail, advice) = match r {
            Ok(d) => (true, d, None),
            Err(e) => {
                let (d, a) = describe(&e, t, addr);
                (false, d, a)
            }
        };
        checks.push(Check {
            name: format!("{tn} {addr} {step}"),
            ok,
            detail,
            ms,
            advice,
        });
        ok
    };
    let connect = |push: &mut Recorder<'_>, label: &str| {
        let (r, ms) = timed(|| Channel::connect(t, addr, timeout));
        match r {
            Ok(ch) => {
                let mut c = TurnClient::new(ch, user, pw);
                c.set_timeout(timeout);
                Some(c)
            }
            Err(e) => {
                push(label, Err(ClientError::Io(e)), ms);
                None
            }
        }
    };
    let Some(mut a) = connect(&mut push, "connect") else {
        return;
    };
    a.set_relay_family(relay_family);
    let (r, ms) = timed(|| a.allocate());
    let Ok(alloc_a) = r.as_ref().map(|x| *x).map_err(|_| ()) else {
        let realm = a.realm().map(str::to_owned);
        push("allocate", r.map(|_| String::new()), ms);
        if let (Some(realm), Some(last)) = (realm, checks.last_mut()) {
            if last.detail.starts_with("401") {
                last.advice = Some(format!(
                    "401: the realm is {realm:?}; check the username and password for that realm"
                ));
            }
        }
        return;
    };
    push(
        "allocate",
        Ok(format!(
            "relayed {}{}{} (reflexive {}), lifetime {} s{}",
            alloc_a.relayed,
            alloc_a
                .additional
                .map(|x| format!(" and {x}"))
                .unwrap_or_default(),
            alloc_a
                .family_error
                .map(|(f, c)| format!(" (no IPv{} relay: {c})", if f == 2 { 6 } else { 4 }))
                .unwrap_or_default(),
            alloc_a.mapped,
            alloc_a.lifetime,
            a.realm().map(|r| format!(", realm {r:?}")).unwrap_or_default()
        )),
        ms,
    );
    let Some(mut b) = connect(&mut push, "connect (second allocation)") else {
        return;
    };
    b.set_relay_family(relay_family);
    let (r, ms) = timed(|| b.allocate());
    let Ok(alloc_b) = r.as_ref().map(|x| *x).map_err(|_| ()) else {
        push("second allocation", r.map(|_| String::new()), ms);
        let _ = a.refresh(0);
        return;
    };
    push(
        "second allocation",
        Ok(format!("relayed {}", alloc_b.relayed)),
        ms,
    );
    let steps_ok = (|| {
        if interrupted() {
            return false;
        }
        let (r, ms) = timed(|| a.channel_bind(0x4000, alloc_b.relayed));
        if !push(
            "channel bind",
            r.map(|_| format!("0x4000 -> {}", alloc_b.relayed)),
            ms,
        ) {
            return false;
        }
        let (r, ms) = timed(|| b.create_permission(&[alloc_a.relayed]));
        if !push(
            "create permission",
            r.map(|_| format!("for {}", alloc_a.relayed.ip())),
            ms,
        ) {
            return false;
        }
        // A → B over the channel, B answers with a Send indication.
        let payload = b"turnpike probe";
        let (r, ms) = timed(|| -> Result<String, ClientError> {
            a.send_channel(0x4000, payload)?;
            match b.recv(timeout)? {
                Received::Data { peer, data } if data == payload && peer == alloc_a.relayed => {}
                other => {
                    return Err(ClientError::Protocol(if matches!(other, Received::Data { .. }) {
                        "relayed data arrived altered or from the wrong address"
                    } else {
                        "unexpected ChannelData on the second allocation"
                    }))
                }
            }
            b.send_indication(alloc_a.relayed, payload)?;
            match a.recv(timeout)? {
                Received::Channel {
                    channel: 0x4000,
                    data,
                } if data == payload => {
                    Ok("ChannelData out, Data indication in, Send indication back, ChannelData in".into())
                }
                _ => Err(ClientError::Protocol(
                    "the answer did not come back on the bound channel",
                )),
            }
        });
        if !push("relay both ways", r, ms) || interrupted() {
            return false;
        }
        // A local UDP peer, when the server allows this host's address.
        let (r, ms) = timed(|| local_peer_check(&mut a, addr, timeout));
        match r {
            Err(ClientError::Error { code: 403, .. }) => push(
                "local peer",
                Ok("skipped: the server refuses this host's address as a peer (its policy); the relay between two allocations above covers relaying".into()),
                ms,
            ),
            r => push("local peer", r, ms),
        }
    })();
    let _ = steps_ok;
    let (r, ms) = timed(|| a.refresh(0).and_then(|_| b.refresh(0)));
    push(
        "delete (refresh 0)",
        r.map(|_| "both allocations deleted".into()),
        ms,
    );
}

/// One Binding transaction on an unconnected socket (answers may come from
/// another address), with RFC 8489 retransmissions. Returns the response's
/// mapped address, RESPONSE-ORIGIN, OTHER-ADDRESS and where it came from.
struct NatAnswer {
    mapped: SocketAddr,
    origin: Option<SocketAddr>,
    other: Option<SocketAddr>,
    from: SocketAddr,
}

fn nat_binding(
    sock: &std::net::UdpSocket,
    to: SocketAddr,
    change: u8,
    timeout: Duration,
) -> Option<NatAnswer> {
    use stun_proto::{attr, method, Class, MessageBuilder, MessageType};
    let txid: [u8; 12] = rand::random();
    let mut req = Vec::new();
    let mut b = MessageBuilder::new(&mut req, MessageType::new(method::BINDING, Class::Request), &txid);
    if change != 0 {
        b.attr(attr::CHANGE_REQUEST, &[0, 0, 0, change]);
    }
    nat_exchange(sock, to, &req, &txid, timeout)
}

/// Sends `req` (retransmitting) and waits for the response with `txid`.
fn nat_exchange(
    sock: &std::net::UdpSocket,
    to: SocketAddr,
    req: &[u8],
    txid: &[u8; 12],
    timeout: Duration,
) -> Option<NatAnswer> {
    use stun_proto::{attr, Message};
    let end = Instant::now() + timeout;
    let mut rto = Duration::from_millis(200);
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        sock.send_to(req, to).ok()?;
        let wait_until = (Instant::now() + rto).min(end);
        while Instant::now() < wait_until {
            let left = wait_until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            sock.set_read_timeout(Some(left)).ok()?;
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            let Ok(m) = Message::parse(&buf[..n]) else {
                continue;
            };
            if &m.transaction_id() != txid {
                continue;
            }
            let mapped = m.get_xor_addr(attr::XOR_MAPPED_ADDRESS)?.ok()?;
            return Some(NatAnswer {
                mapped,
                origin: m.get_addr(attr::RESPONSE_ORIGIN).and_then(|r| r.ok()),
                other: m.get_addr(attr::OTHER_ADDRESS).and_then(|r| r.ok()),
                from,
            });
        }
        rto *= 2;
    }
    None
}

/// Runs `probe nat`: RFC 5780 §4.3 mapping and §4.4 filtering tests, and
/// the hairpinning test of §4.5.
pub fn nat(a: &NatArgs) -> Result<Report> {
    let uri = parse_uri(&a.url, Scheme::Stun)?;
    let (addrs, _) = resolve(&uri, &a.common)?;
    let server = addrs[0];
    let timeout = Duration::from_millis(a.common.timeout_ms);
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let sock = std::net::UdpSocket::bind(any)?;
    // The local address this host uses toward the server, to tell "no NAT".
    let probe_sock = std::net::UdpSocket::bind(any)?;
    probe_sock.connect(server)?;
    let local = SocketAddr::new(probe_sock.local_addr()?.ip(), sock.local_addr()?.port());
    let mut checks = Vec::new();
    let mut advice = Vec::new();
    let mut push = |name: &str, ok: bool, detail: String| {
        checks.push(Check {
            name: name.to_owned(),
            ok,
            detail,
            ms: 0.0,
            advice: None,
        })
    };
    let Some(t1) = nat_binding(&sock, server, 0, timeout) else {
        push("test I: binding", false, format!("no answer from {server}"));
        advice.push(format!(
            "no answer on UDP {server}: the server is not running there, or a firewall drops UDP"
        ));
        let mut r = finish(uri, addrs, checks);
        r.advice = advice;
        return Ok(r);
    };
    push(
        "test I: binding",
        true,
        format!("mapped {} (local {local})", t1.mapped),
    );
    let Some(other) = t1.other else {
        push("RFC 5780 support", false, "no OTHER-ADDRESS in the answer".into());
        advice.push("the server does not support RFC 5780 (no OTHER-ADDRESS): run one that does, e.g. `turnpike serve --rfc5780 --alt-ip IP`".into());
        let mut r = finish(uri, addrs, checks);
        r.advice = advice;
        return Ok(r);
    };
    push(
        "RFC 5780 support",
        true,
        format!(
            "other address {other}, response origin {}",
            t1.origin.map(|o| o.to_string()).unwrap_or("-".into())
        ),
    );
    let behind_nat = t1.mapped != local;
    // Mapping (§4.3).
    let mapping = if !behind_nat {
        "none (no NAT: the mapped address is the local one)"
    } else {
        match nat_binding(&sock, SocketAddr::new(other.ip(), server.port()), 0, timeout) {
            None => "unknown (test II unanswered)",
            Some(t2) if t2.mapped == t1.mapped => "endpoint-independent",
            Some(t2) => match nat_binding(&sock, other, 0, timeout) {
                None => "unknown (test III unanswered)",
                Some(t3) if t3.mapped == t2.mapped => "address-dependent",
                Some(_) => "address-and-port-dependent",
            },
        }
    };
    push(
        "mapping behaviour",
        !mapping.starts_with("unknown"),
        mapping.into(),
    );
    // Filtering (§4.4): answers from the other IP and port, then the other port.
    let filtering = match nat_binding(&sock, server, 0x06, timeout) {
        Some(r) if r.from == other => "endpoint-independent",
        Some(_) => "unknown (answer to change IP+port came from the wrong address)",
        None => match nat_binding(&sock, server, 0x02, timeout) {
            Some(r) if r.from.port() != server.port() => "address-dependent",
            Some(_) => "unknown (answer to change port came from the wrong port)",
            None => "address-and-port-dependent",
        },
    };
    push(
        "filtering behaviour",
        !filtering.starts_with("unknown"),
        filtering.into(),
    );
    // Hairpinning (§4.5): from a second socket to our mapped address.
    let hairpin = {
        let s2 = std::net::UdpSocket::bind(any)?;
        let txid: [u8; 12] = rand::random();
        let mut req = Vec::new();
        stun_proto::MessageBuilder::new(
            &mut req,
            stun_proto::MessageType::new(stun_proto::method::BINDING, stun_proto::Class::Request),
            &txid,
        );
        let _ = s2.send_to(&req, t1.mapped);
        sock.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 2048];
        let mut seen = false;
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) if n >= 20 && buf[8..20] == txid => {
                    seen = true;
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        seen
    };
    push(
        "hairpinning",
        true,
        if hairpin {
            "works: packets to our own mapped address come back"
        } else {
            "not supported by this NAT"
        }
        .into(),
    );
    if let Some(max) = a.lifetime {
        let detail = binding_lifetime(server, any, max, timeout)?;
        push("binding lifetime", true, detail);
    }
    let verdict = if !behind_nat || mapping == "endpoint-independent" {
        if filtering == "address-and-port-dependent" && behind_nat {
            "direct connections will usually work with ICE hole punching (endpoint-independent mapping); a relay is needed only against peers behind symmetric NATs"
        } else {
            "direct connections will usually work"
        }
    } else if mapping.starts_with("unknown") {
        "could not determine the mapping behaviour"
    } else {
        "expect to need TURN relays: this NAT maps each destination differently (symmetric), so hole punching fails against most peers"
    };
    let mut r = finish(uri, addrs, checks);
    r.verdict = Some(verdict.into());
    Ok(r)
}

/// Relays through allocation `a` to a UDP socket on this host and back.
fn local_peer_check(
    a: &mut TurnClient,
    server: SocketAddr,
    timeout: Duration,
) -> Result<String, ClientError> {
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|_| ClientError::Protocol("address"))?;
    // The address this host uses toward the server is where the relay can reach us.
    let route = std::net::UdpSocket::bind(any)?;
    route.connect(server)?;
    let peer = std::net::UdpSocket::bind(SocketAddr::new(route.local_addr()?.ip(), 0))?;
    peer.set_read_timeout(Some(timeout))?;
    let peer_addr = peer.local_addr()?;
    a.create_permission(&[peer_addr])?;
    a.send_indication(peer_addr, b"probe to local peer")?;
    let mut buf = [0u8; 512];
    let (n, relayed) = peer.recv_from(&mut buf).map_err(|_| ClientError::Timeout)?;
    if &buf[..n] != b"probe to local peer" {
        return Err(ClientError::Protocol("the local peer received altered data"));
    }
    peer.send_to(b"reply from local peer", relayed)?;
    match a.recv(timeout)? {
        Received::Data { peer: p, data } if p == peer_addr && data == b"reply from local peer" => {
            Ok(format!("Send indication to {peer_addr} and its reply came back"))
        }
        _ => Err(ClientError::Protocol(
            "the local peer's reply did not come back as a Data indication",
        )),
    }
}

/// RFC 5780 §4.6: socket X learns its mapping, idles for T, then socket Y
/// asks the server (RESPONSE-PORT) to answer to X's mapped port. If X hears
/// it, the binding outlived T. T doubles from 1 s up to `max`.
fn binding_lifetime(server: SocketAddr, any: SocketAddr, max: u64, timeout: Duration) -> Result<String> {
    use stun_proto::{attr, method, Class, MessageBuilder, MessageType};
    let mut alive = 0u64;
    let mut t = 1u64;
    while t <= max.max(1) {
        if interrupted() {
            break;
        }
        let x = std::net::UdpSocket::bind(any)?;
        let y = std::net::UdpSocket::bind(any)?;
        let Some(first) = nat_binding(&x, server, 0, timeout) else {
            return Ok("unknown: the server stopped answering".into());
        };
        std::thread::sleep(Duration::from_secs(t));
        let txid: [u8; 12] = rand::random();
        let mut req = Vec::new();
        MessageBuilder::new(&mut req, MessageType::new(method::BINDING, Class::Request), &txid).attr(
            attr::RESPONSE_PORT,
            &[(first.mapped.port() >> 8) as u8, first.mapped.port() as u8, 0, 0],
        );
        y.send_to(&req, server)?;
        // The answer must reach X, through X's (possibly expired) mapping.
        x.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 1024];
        let heard = matches!(x.recv_from(&mut buf), Ok((n, _)) if n >= 20 && buf[8..20] == txid);
        if !heard {
            return Ok(format!(
                "between {alive} and {t} s: an idle UDP binding was gone after {t} s; keepalives must come more often"
            ));
        }
        alive = t;
        t *= 2;
    }
    Ok(format!("at least {alive} s (the longest idle time tried)"))
}

/// Prints a report, coloured on a terminal.
pub fn print(r: &Report, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
        return Ok(());
    }
    let color = std::io::stdout().is_terminal();
    let (g, red, dim, off) = if color {
        ("\x1b[32m", "\x1b[31m", "\x1b[2m", "\x1b[0m")
    } else {
        ("", "", "", "")
    };
    let addrs: Vec<String> = r.addresses.iter().map(|a| a.to_string()).collect();
    println!(
        "{:?}:{}:{} -> {}",
        r.uri.scheme,
        r.uri.host,
        r.uri.port,
        addrs.join(", ")
    );
    for c in &r.checks {
        let mark = if c.ok {
            format!("{g}ok  {off}")
        } else {
            format!("{red}FAIL{off}")
        };
        println!("  {mark} {:<40} {} {dim}({:.1} ms){off}", c.name, c.detail, c.ms);
    }
    for a in &r.advice {
        println!("  {red}advice:{off} {a}");
    }
    if let Some(v) = &r.verdict {
        println!("  verdict: {v}");
    }
    println!(
        "{}",
        if r.ok {
            format!("{g}all checks passed{off}")
        } else {
            format!("{red}some checks failed{off}")
        }
    );
    Ok(())
}

/// Runs a probe command; the process exit status is 0 only if all passed.
pub fn run(cmd: ProbeCommand) -> Result<bool> {
    // First Ctrl-C: finish the current step, delete what was allocated,
    // report. A second Ctrl-C exits at once.
    let flag = INTERRUPTED.get_or_init(Default::default).clone();
    signal_hook::flag::register_conditional_shutdown(signal_hook::consts::SIGINT, 130, flag.clone())?;
    signal_hook::flag::register(signal_hook::consts::SIGINT, flag)?;
    let (mut report, json) = match &cmd {
        ProbeCommand::Stun(a) => (stun(a)?, a.common.json),
        ProbeCommand::Turn(a) => (turn(a)?, a.common.json),
        ProbeCommand::Nat(a) => (nat(a)?, a.common.json),
    };
    if interrupted() {
        report.ok = false;
        report
            .advice
            .push("interrupted (Ctrl-C): allocations made were deleted".into());
        print(&report, json)?;
        std::process::exit(130);
    }
    print(&report, json)?;
    Ok(report.ok)
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
