//! `turnpike watch`: the server checked from outside, the way its users
//! reach it, every `--interval`, with the results as Prometheus metrics
//! (`--listen`) for alerting, or once as JSON (`--once`).
//!
//! Per target: up and Binding RTT, allocation time and relay RTT through
//! the server to a peer the watcher runs, certificate days left (TLS), and
//! drift checks that should never fire on a safe server:
//! - `open_relay`: an Allocate without credentials succeeds;
//! - `internal_peer`: the server accepts a permission for loopback
//!   (127.0.0.1), a private range (10.0.0.1) or cloud metadata
//!   (169.254.169.254), RFC 8656 §21.2.3;
//! - `software`: responses carry a SOFTWARE attribute (version leak);
//! - `challenge_ratio`: the 401 to a minimal Allocate is more than three
//!   times its size (reflection, RFC 8489 §9.2).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};

use super::uri::{parse_uri, Scheme};
use crate::client::{Channel, ClientTransport, Received, TurnClient};

/// `turnpike watch` options.
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// A server to watch: turn:HOST[:PORT][?transport=udp|tcp|dtls] or
    /// turns:HOST[:PORT] (repeatable).
    #[arg(long = "target", value_name = "URI", required = true)]
    pub targets: Vec<String>,
    /// Username for long-term credentials.
    #[arg(long)]
    pub user: Option<String>,
    /// File holding the password (one line).
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// File holding a TURN REST-API secret: credentials are minted per round.
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// Seconds between rounds.
    #[arg(long, default_value_t = 30)]
    pub interval: u64,
    /// Where to serve /metrics.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:9642")]
    pub listen: SocketAddr,
    /// Run one round, print it as JSON, exit (0 when all checks are green).
    #[arg(long)]
    pub once: bool,
    /// The address the watcher's relay peer binds (default: the one this
    /// host uses toward the relayed address).
    #[arg(long, value_name = "IP")]
    pub peer_ip: Option<std::net::IpAddr>,
    /// Relay to a second allocation on the same server instead of a peer
    /// on this host: the relay check then works where the server cannot
    /// reach the watcher (behind NAT, in a pod), as two relayed WebRTC
    /// candidates talk.
    #[arg(long, conflicts_with = "peer_ip")]
    pub peer_via_relay: bool,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    pub timeout_ms: u64,
}

/// One target's round.
#[derive(Debug, Clone, Serialize, Default)]
pub struct TargetResult {
    /// The URI as given.
    pub target: String,
    /// udp, tcp, tls or dtls.
    pub transport: String,
    /// The server answered a Binding request.
    pub up: bool,
    /// Binding round trip, seconds.
    pub binding_rtt_s: Option<f64>,
    /// Authenticated Allocate (both round trips), seconds.
    pub allocate_s: Option<f64>,
    /// Send indication to the watcher's peer and the Data indication back, seconds.
    pub relay_rtt_s: Option<f64>,
    /// Days until the TLS certificate expires.
    pub certificate_days_left: Option<f64>,
    /// Drift checks: true is a finding.
    pub drift: Drift,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
}

/// The security drift checks (true: the server shows it).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Drift {
    /// An Allocate without credentials succeeded.
    pub open_relay: bool,
    /// A permission to loopback, a private range or cloud metadata was accepted.
    pub internal_peer: bool,
    /// A response carried SOFTWARE.
    pub software: bool,
    /// The 401 to a minimal Allocate over its size.
    pub challenge_ratio: Option<f64>,
}

impl TargetResult {
    /// Every check passed and nothing drifted.
    pub fn green(&self) -> bool {
        self.up
            && self.allocate_s.is_some()
            && self.relay_rtt_s.is_some()
            && !self.drift.open_relay
            && !self.drift.internal_peer
            && !self.drift.software
            && self.drift.challenge_ratio.is_some_and(|r| r <= 3.0)
    }
}

/// Runs `turnpike watch`: rounds forever (or once with `--once`).
pub fn run(a: WatchArgs) -> Result<bool> {
    let creds = Credentials::from_args(&a)?;
    if a.once {
        let results = round(&a, &creds);
        println!("{}", serde_json::to_string_pretty(&results)?);
        return Ok(results.iter().all(TargetResult::green));
    }
    let latest: Arc<Mutex<String>> = Arc::new(Mutex::new(String::new()));
    let l = TcpListener::bind(a.listen).with_context(|| format!("watch --listen {}", a.listen))?;
    eprintln!(
        "turnpike watch: {} target(s) every {} s; metrics on http://{}/metrics",
        a.targets.len(),
        a.interval,
        l.local_addr()?
    );
    let served = latest.clone();
    std::thread::spawn(move || serve(l, served));
    loop {
        let results = round(&a, &creds);
        *latest.lock().unwrap_or_else(|p| p.into_inner()) = exposition(&results);
        std::thread::sleep(Duration::from_secs(a.interval.max(1)));
    }
}

enum Credentials {
    Static(String, String),
    Rest(Vec<u8>, String),
}

impl Credentials {
    fn from_args(a: &WatchArgs) -> Result<Credentials> {
        let read = |p: &PathBuf, what: &str| -> Result<String> {
            let t = std::fs::read_to_string(p).with_context(|| format!("{what} {}", p.display()))?;
            Ok(t.trim().to_string())
        };
        match (&a.user, &a.password_file, &a.secret_file) {
            (_, _, Some(s)) => Ok(Credentials::Rest(
                read(s, "--secret-file")?.into_bytes(),
                a.user.clone().unwrap_or_else(|| "watch".into()),
            )),
            (Some(u), Some(p), None) => Ok(Credentials::Static(u.clone(), read(p, "--password-file")?)),
            _ => bail!("watch needs --user and --password-file, or --secret-file for REST-API credentials"),
        }
    }

    fn get(&self) -> (String, String) {
        match self {
            Credentials::Static(u, p) => (u.clone(), p.clone()),
            Credentials::Rest(secret, id) => {
                let expiry = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
                    + 600;
                let user = format!("{expiry}:{id}");
                let pw = turn_core::auth::rest_password(secret, &user);
                (user, pw)
            }
        }
    }
}

fn round(a: &WatchArgs, creds: &Credentials) -> Vec<TargetResult> {
    a.targets.iter().map(|t| check_target(a, creds, t)).collect()
}

fn check_target(a: &WatchArgs, creds: &Credentials, target: &str) -> TargetResult {
    let mut r = TargetResult {
        target: target.to_string(),
        ..TargetResult::default()
    };
    let timeout = Duration::from_millis(a.timeout_ms);
    // RFC 7065 names udp and tcp only; DTLS (RFC 7350) is asked for here
    // with ?transport=dtls.
    let (plain, dtls) = match target.strip_suffix("?transport=dtls") {
        Some(t) => (t, true),
        None => (target, false),
    };
    let uri = match parse_uri(plain, Scheme::Turn) {
        Ok(u) => u,
        Err(e) => {
            r.errors.push(format!("{e:#}"));
            return r;
        }
    };
    let Some(addr) = std::net::ToSocketAddrs::to_socket_addrs(&(uri.host.as_str(), uri.port))
        .ok()
        .and_then(|mut i| i.next())
    else {
        r.errors.push(format!("{} does not resolve", uri.host));
        return r;
    };
    let (transport, name) = match (uri.scheme, uri.transport.as_deref()) {
        _ if dtls => (ClientTransport::Dtls { pinned: None }, "dtls"),
        (Scheme::Turns | Scheme::Stuns, _) => (ClientTransport::Tls { pinned: None }, "tls"),
        (_, Some("tcp")) => (ClientTransport::Tcp, "tcp"),
        (_, Some("dtls")) => (ClientTransport::Dtls { pinned: None }, "dtls"),
        _ => (ClientTransport::Udp, "udp"),
    };
    r.transport = name.to_string();
    if name == "tls" {
        r.certificate_days_left = certificate_days_left(addr, timeout);
    }
    // Binding: up, RTT, SOFTWARE.
    match raw_exchange(&transport, addr, &binding_request(), timeout) {
        Ok((resp, rtt)) => {
            r.up = true;
            r.binding_rtt_s = Some(rtt);
            if Message::parse(&resp).is_ok_and(|m| m.get(attr::SOFTWARE).is_some()) {
                r.drift.software = true;
            }
        }
        Err(e) => {
            r.errors.push(format!("binding: {e}"));
            return r;
        }
    }
    // A minimal Allocate without credentials: a 401 no more than 3× its
    // size, or an open relay.
    let bare = bare_allocate();
    match raw_exchange(&transport, addr, &bare, timeout) {
        Ok((resp, _)) => match Message::parse(&resp) {
            Ok(m) if m.message_type().class == Class::Success => r.drift.open_relay = true,
            Ok(m) => {
                if m.get(attr::SOFTWARE).is_some() {
                    r.drift.software = true;
                }
                r.drift.challenge_ratio = Some(resp.len() as f64 / bare.len() as f64);
            }
            Err(_) => r.errors.push("allocate: an answer that is not STUN".into()),
        },
        Err(e) => r.errors.push(format!("unauthenticated allocate: {e}")),
    }
    // Authenticated: allocation time, relay RTT, internal ranges.
    let (user, password) = creds.get();
    let ch = match Channel::connect(&transport, addr, timeout) {
        Ok(c) => c,
        Err(e) => {
            r.errors.push(format!("connect: {e}"));
            return r;
        }
    };
    let mut c = TurnClient::new(ch, &user, &password);
    c.set_timeout(timeout);
    let t = Instant::now();
    let alloc = match c.allocate() {
        Ok(a) => a,
        Err(e) => {
            r.errors.push(format!("allocate: {e}"));
            return r;
        }
    };
    r.allocate_s = Some(t.elapsed().as_secs_f64());
    let rtt = if a.peer_via_relay {
        Channel::connect(&transport, addr, timeout)
            .map_err(anyhow::Error::from)
            .and_then(|ch| {
                let mut other = TurnClient::new(ch, &user, &password);
                other.set_timeout(timeout);
                let r = relay_rtt_between(&mut c, alloc.relayed, &mut other, timeout);
                let _ = other.refresh(0);
                r
            })
    } else {
        relay_rtt(&mut c, alloc.relayed, a.peer_ip, timeout)
    };
    match rtt {
        Ok(s) => r.relay_rtt_s = Some(s),
        Err(e) => r.errors.push(format!("relay: {e}")),
    }
    for internal in ["127.0.0.1:9", "10.0.0.1:9", "169.254.169.254:80"] {
        let p: SocketAddr = internal
            .parse()
            .unwrap_or_else(|_| unreachable!("a literal address"));
        if c.create_permission(&[p]).is_ok() {
            r.drift.internal_peer = true;
            r.errors.push(format!("the server accepts {internal} as a peer"));
        }
    }
    let _ = c.refresh(0);
    r
}

fn binding_request() -> Vec<u8> {
    let mut buf = Vec::new();
    let txid: [u8; 12] = rand::random();
    MessageBuilder::new(&mut buf, MessageType::new(method::BINDING, Class::Request), &txid);
    buf
}

/// The smallest Allocate a client sends first: REQUESTED-TRANSPORT only.
fn bare_allocate() -> Vec<u8> {
    let mut buf = Vec::new();
    let txid: [u8; 12] = rand::random();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &txid,
    )
    .u32(attr::REQUESTED_TRANSPORT, u32::from(attr::PROTOCOL_UDP) << 24);
    buf
}

/// Sends `request` on a fresh connection and returns the answer and the
/// round trip in seconds.
fn raw_exchange(
    t: &ClientTransport,
    addr: SocketAddr,
    request: &[u8],
    timeout: Duration,
) -> Result<(Vec<u8>, f64)> {
    let mut ch = Channel::connect(t, addr, timeout)?;
    let start = Instant::now();
    ch.send(request)?;
    let deadline = start + timeout;
    loop {
        match ch.recv(deadline)? {
            Some(resp) if resp.len() >= 20 && resp[8..20] == request[8..20] => {
                return Ok((resp, start.elapsed().as_secs_f64()))
            }
            Some(_) => continue,
            None => bail!("no answer within {} ms", timeout.as_millis()),
        }
    }
}

/// A Send indication to a second allocation's relayed address, and its
/// answer back the same way: both legs through the server.
fn relay_rtt_between(
    c: &mut TurnClient,
    relayed: SocketAddr,
    other: &mut TurnClient,
    timeout: Duration,
) -> Result<f64> {
    let theirs = other
        .allocate()
        .map_err(|e| anyhow::anyhow!("the peer allocation: {e}"))?
        .relayed;
    c.create_permission(&[theirs])
        .map_err(|e| anyhow::anyhow!("permission for the peer allocation {theirs}: {e}"))?;
    other
        .create_permission(&[relayed])
        .map_err(|e| anyhow::anyhow!("permission back to {relayed}: {e}"))?;
    let start = Instant::now();
    c.send_indication(theirs, b"turnpike watch")?;
    match other.recv(timeout) {
        Ok(Received::Data { data, .. }) if data == b"turnpike watch" => {}
        Ok(other) => bail!("unexpected {other:?} at the peer allocation"),
        Err(e) => bail!("the peer allocation got nothing: {e}"),
    }
    other.send_indication(relayed, b"turnpike watch")?;
    match c.recv(timeout) {
        Ok(Received::Data { data, .. }) if data == b"turnpike watch" => Ok(start.elapsed().as_secs_f64()),
        Ok(other) => bail!("unexpected {other:?}"),
        Err(e) => bail!("no Data indication back: {e}"),
    }
}

/// A Send indication to a UDP peer on this host and its reply back as a
/// Data indication.
fn relay_rtt(
    c: &mut TurnClient,
    relayed: SocketAddr,
    peer_ip: Option<std::net::IpAddr>,
    timeout: Duration,
) -> Result<f64> {
    let ip = match peer_ip {
        Some(ip) => ip,
        None => {
            let any: SocketAddr = if relayed.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
            let route = UdpSocket::bind(any)?;
            route.connect(relayed)?;
            route.local_addr()?.ip()
        }
    };
    let peer = UdpSocket::bind(SocketAddr::new(ip, 0))?;
    peer.set_read_timeout(Some(timeout))?;
    let peer_addr = peer.local_addr()?;
    c.create_permission(&[peer_addr])
        .map_err(|e| anyhow::anyhow!("permission for the watcher's peer {peer_addr}: {e}"))?;
    let start = Instant::now();
    c.send_indication(peer_addr, b"turnpike watch")?;
    let mut buf = [0u8; 256];
    let (n, from) = peer.recv_from(&mut buf).context("the peer got nothing")?;
    peer.send_to(&buf[..n], from)?;
    match c.recv(timeout) {
        Ok(Received::Data { data, .. }) if data == b"turnpike watch" => Ok(start.elapsed().as_secs_f64()),
        Ok(other) => bail!("unexpected {other:?}"),
        Err(e) => bail!("no Data indication back: {e}"),
    }
}

/// The TLS leaf's days left, from a handshake that trusts anything (this
/// measures expiry; `probe` checks the chain).
fn certificate_days_left(addr: SocketAddr, timeout: Duration) -> Option<f64> {
    let s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let name = rustls::pki_types::ServerName::try_from("localhost").ok()?;
    let conn = rustls::ClientConnection::new(crate::tls::client_config(None), name).ok()?;
    let mut tls = rustls::StreamOwned::new(conn, s);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).ok()?;
    }
    let leaf = tls.conn.peer_certificates()?.first()?.clone();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((cert.validity().not_after.timestamp() - now) as f64 / 86_400.0)
}

/// The results as Prometheus text.
pub fn exposition(results: &[TargetResult]) -> String {
    let mut out = String::new();
    let labels = |r: &TargetResult| {
        format!(
            "target=\"{}\",transport=\"{}\"",
            r.target.replace(['"', '\\', '\n'], "_"),
            r.transport
        )
    };
    let mut family = |name: &str, help: &str, kind: &str, rows: Vec<(String, f64)>| {
        out.push_str(&format!(
            "# HELP turnpike_watch_{name} {help}\n# TYPE turnpike_watch_{name} {kind}\n"
        ));
        for (l, v) in rows {
            out.push_str(&format!("turnpike_watch_{name}{{{l}}} {v}\n"));
        }
    };
    family(
        "up",
        "1 when the target answered a Binding request.",
        "gauge",
        results
            .iter()
            .map(|r| (labels(r), f64::from(u8::from(r.up))))
            .collect(),
    );
    for (name, help, get) in [
        (
            "binding_rtt_seconds",
            "Binding round trip.",
            (|r: &TargetResult| r.binding_rtt_s) as fn(&TargetResult) -> Option<f64>,
        ),
        (
            "allocate_seconds",
            "Authenticated Allocate, both round trips.",
            |r| r.allocate_s,
        ),
        (
            "relay_rtt_seconds",
            "Send indication to the watcher's peer and the Data indication back.",
            |r| r.relay_rtt_s,
        ),
        (
            "certificate_days_left",
            "Days until the TLS certificate expires.",
            |r| r.certificate_days_left,
        ),
        (
            "challenge_ratio",
            "Size of the 401 to a minimal Allocate over the request's.",
            |r| r.drift.challenge_ratio,
        ),
    ] {
        family(
            name,
            help,
            "gauge",
            results
                .iter()
                .filter_map(|r| get(r).map(|v| (labels(r), v)))
                .collect(),
        );
    }
    let mut drift = Vec::new();
    for r in results {
        let ratio = r.drift.challenge_ratio.is_some_and(|x| x > 3.0);
        for (check, on) in [
            ("open_relay", r.drift.open_relay),
            ("internal_peer", r.drift.internal_peer),
            ("software", r.drift.software),
            ("challenge_ratio", ratio),
        ] {
            drift.push((
                format!("{},check=\"{check}\"", labels(r)),
                f64::from(u8::from(on)),
            ));
        }
    }
    family(
        "drift",
        "1 when a security drift check finds the server unsafe.",
        "gauge",
        drift,
    );
    out
}

fn serve(l: TcpListener, latest: Arc<Mutex<String>>) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let body = latest.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let _ = write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
}
