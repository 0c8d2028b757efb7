//! `turnpike probe`: diagnostics a person runs against any STUN/TURN server.
//!
//! `probe stun URL` reports the reflexive address and round-trip times over
//! each transport and address family; `probe turn URL` allocates, binds a
//! channel and relays data through the server back to itself (two
//! allocations, so no outside peer is needed), step by step, with advice
//! for each failure. Exit status 0 only when every check passed.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::client::{ClientError, ClientTransport};

mod nat;
mod stun;
mod turn;
mod uri;
pub mod watch;

use nat::nat;
pub use nat::NatArgs;
use stun::stun;
pub use stun::StunArgs;
use turn::turn;
pub use turn::TurnArgs;
pub use uri::{parse_uri, Scheme, Uri};

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
    /// TLS: accept any certificate (a self-signed test server). The report
    /// says the certificate was not verified.
    #[arg(long)]
    pub insecure: bool,
    /// TLS: trust this CA (or self-signed) certificate too, PEM.
    #[arg(long, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
}

impl Common {
    /// The TLS transport for `host`: verified like a browser, unless
    /// `--insecure`.
    pub(super) fn tls(&self, host: &str) -> Result<ClientTransport> {
        if self.insecure {
            return Ok(ClientTransport::Tls { pinned: None });
        }
        let extra_roots = match &self.ca {
            Some(p) => {
                crate::tls::load_pem_certs(p).map_err(|e| anyhow::anyhow!("--ca {}: {e}", p.display()))?
            }
            None => Vec::new(),
        };
        Ok(ClientTransport::TlsVerified {
            server_name: host.to_owned(),
            extra_roots,
        })
    }
}

impl Common {
    /// The DTLS transport (RFC 7350). The DTLS engine hands over the
    /// server's leaf certificate only, so it is checked by pinning: the
    /// `--ca` file's first certificate must be the server's own (a
    /// self-signed server), or `--insecure` accepts any.
    pub(super) fn dtls(&self) -> Result<ClientTransport> {
        if self.insecure {
            return Ok(ClientTransport::Dtls { pinned: None });
        }
        let Some(p) = &self.ca else {
            anyhow::bail!(
                "--transport dtls: give --ca with the server's certificate (it is pinned) or --insecure; a DTLS server sends its leaf only, so a chain cannot be checked here"
            );
        };
        let certs =
            crate::tls::load_pem_certs(p).map_err(|e| anyhow::anyhow!("--ca {}: {e}", p.display()))?;
        Ok(ClientTransport::Dtls {
            pinned: certs.into_iter().next(),
        })
    }
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

fn transport_name(t: &ClientTransport) -> &'static str {
    match t {
        ClientTransport::Udp => "udp",
        ClientTransport::Tcp => "tcp",
        ClientTransport::Tls { .. } | ClientTransport::TlsVerified { .. } => "tls",
        ClientTransport::Dtls { .. } => "dtls",
    }
}

/// For a UDP check that got no answer: whether answers do come, from
/// another address than the one asked (the multi-homed symptom), as the
/// detail and advice to report instead of "no answer".
fn wrong_source(
    t: &ClientTransport,
    addr: SocketAddr,
    timeout: std::time::Duration,
) -> Option<(String, String)> {
    if !matches!(t, ClientTransport::Udp) {
        return None;
    }
    let from = crate::client::binding_answer_source(addr, timeout).ok()??;
    (from != addr).then(|| {
        (
            format!("answers come from {from}, not from {addr} where they were sent"),
            format!(
                "the server answers UDP from another of its addresses ({from}); clients, NATs and \
                 firewalls drop such answers. It is multi-homed and replies by its routing table: \
                 coturn needs each address listed with --listening-ip (and --relay-ip); turnpike \
                 answers from the address reached, so check it is the server at {addr}"
            ),
        )
    })
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
        ClientError::Io(io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            (
                "no answer".into(),
                Some(format!(
                    "no answer on {tn} {addr}: the server is not running there, or a firewall drops {}",
                    tn.to_uppercase()
                )),
            )
        }
        ClientError::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => (
            format!("connection refused ({io})"),
            Some(format!(
                "nothing listens on {tn} {addr}: check the port and that the server runs"
            )),
        ),
        ClientError::Io(io)
            if io.to_string().contains("certificate") || io.to_string().contains("Certificate") =>
        {
            (
                format!("TLS certificate not accepted ({io})"),
                Some(format!(
                "the certificate of {addr} does not verify (expired, self-signed, untrusted CA, or a name \
                 it does not carry): give the server a certificate from a public CA for this name, trust \
                 a private CA with --ca FILE, or check anyway with --insecure"
            )),
            )
        }
        ClientError::Io(io) => (format!("{io}"), Some(format!("network error on {tn} {addr}"))),
        ClientError::Error { code, reason } => {
            use turn_core::ErrorCode as E;
            let shown = format!(
                "{code} {}",
                match (reason.is_empty(), E::from_code(*code)) {
                    (true, Some(e)) => e.reason(),
                    _ => reason.as_str(),
                }
            );
            let advice = match E::from_code(*code) {
                Some(E::Unauthorized) => Some("401: the server does not accept these credentials; check the username and password (and the realm, shown in the report)"),
                Some(E::Forbidden) => Some("403 on the peer: the server refuses that address (its peer policy: a private, loopback or reserved range, or an operator's deny-peer); its operator allows a range with allow-peer"),
                Some(E::AllocationMismatch) => Some("437: an allocation already exists for this address and port; wait for it to expire"),
                Some(E::AllocationQuotaReached) => Some("486: this user's allocation quota is used up"),
                Some(E::InsufficientCapacity) => Some("508: the server is out of capacity (relay ports or its allocation quota) or draining"),
                _ => None,
            };
            (shown, advice.map(str::to_owned))
        }
        ClientError::Protocol(p) => (
            p.to_string(),
            Some("the server's answer is not valid STUN/TURN".into()),
        ),
    }
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64() * 1000.0)
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
