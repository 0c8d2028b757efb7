//! `turnpike bench`: a load generator for any STUN/TURN server.
//!
//! One thread, one mio loop. Relay modes run a closed loop per allocation:
//! the generator is both the TURN client and the peer. It sends `window`
//! packets (ChannelData or Send indications) into each allocation, its own
//! peer socket echoes each one back through the relayed address, and each
//! echo arriving at the client releases the next packet. Every round trip
//! is two packets relayed by the server. Payloads carry their send time, so
//! RTT is measured per packet. Given the server's pid, CPU (user and
//! system) and RSS are read from /proc before and after the measured
//! interval.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

mod conn;
mod measure;
mod relay;
mod requests;

pub(crate) use conn::{client_transport, Conn};
pub use measure::Percentiles;
pub(crate) use measure::{core_ticks, empty_report, percentiles, sample, Meter};
use relay::relay;
use requests::{allocate_cycles, bindings, hold};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// ChannelData relay, closed loop through the server and back.
    Channel,
    /// Send/Data indication relay, closed loop.
    Send,
    /// Binding requests, closed loop.
    Binding,
    /// Authenticated Allocate + Refresh(0) cycles.
    Allocate,
    /// Hold N allocations and report the server's RSS per allocation.
    Hold,
    /// RFC 6062 TCP relay: per allocation, a Connect to a local TCP peer
    /// that echoes, and messages of `size` bytes, `window` in flight, over
    /// the bound data connection (TCP to the server).
    TcpRelay,
    /// Media calls: two legs per call, each an allocation, paced at a
    /// codec's rate towards the other leg's relayed address; with
    /// `--ramp`, more calls until loss or latency passes its bound.
    Calls,
}

/// Transport to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BenchTransport {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
    /// DTLS 1.2 over UDP (RFC 7350): the server's certificate is not checked.
    Dtls,
}

/// `turnpike bench` options.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Server to load, IP:PORT.
    #[arg(long, value_name = "IP:PORT")]
    pub server: SocketAddr,
    /// What to measure.
    #[arg(long, value_enum, default_value = "channel")]
    pub mode: Mode,
    /// Transport to the server.
    #[arg(long, value_enum, default_value = "udp")]
    pub transport: BenchTransport,
    /// Allocations (or Binding/Allocate clients) in parallel.
    #[arg(long, default_value_t = 16)]
    pub allocations: usize,
    /// Packets (or transactions) in flight per allocation.
    #[arg(long, default_value_t = 8)]
    pub window: usize,
    /// Payload bytes per relayed packet, at least 16 (24 in calls mode)
    /// [default: 160; calls: the preset's].
    #[arg(long)]
    pub size: Option<usize>,
    /// Measured seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds of load before measuring.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,
    /// TURN username.
    #[arg(long, default_value = "bench")]
    pub user: String,
    /// TURN password.
    #[arg(long, default_value = "bench")]
    pub password: String,
    /// Address the generator's peer sockets bind to (the server must allow
    /// it as a peer: --allow-loopback-peers for 127.0.0.1).
    #[arg(long, default_value = "127.0.0.1")]
    pub peer_ip: IpAddr,
    /// The server's pid, for CPU per packet and RSS.
    #[arg(long)]
    pub pid: Option<u32>,
    /// The CPU the server is pinned to: its whole busy time per operation
    /// is reported too, softirq and kernel threads included (what the
    /// process's own user/system times leave out).
    #[arg(long)]
    pub server_core: Option<usize>,
    /// Channel numbers start here (0x4000; coturn accepts the same).
    #[arg(long, default_value_t = 0x4000)]
    pub first_channel: u16,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Send each datagram on its own instead of merging runs with UDP GSO
    /// (as real clients send: a kernel fast path sees one packet per
    /// datagram, never a GSO super-packet it must pass on).
    #[arg(long)]
    pub no_gso: bool,
    /// Calls mode: calls (two legs each) to start with.
    #[arg(long, default_value_t = 20, help_heading = "Calls mode")]
    pub calls: usize,
    /// Calls mode: what each leg sends: opus (50 packets/s of 120 B),
    /// video-500k, video-1m, video-2500k (1100 B packets at that bitrate).
    #[arg(long, value_enum, default_value = "opus", help_heading = "Calls mode")]
    pub preset: crate::bench_calls::Preset,
    /// Calls mode: packets per second per leg [default: the preset's].
    #[arg(long, help_heading = "Calls mode")]
    pub pps: Option<u32>,
    /// Calls mode: each packet leaves up to this late (uniform), as a
    /// real sender's clock and scheduler make it.
    #[arg(long, default_value_t = 2.0, help_heading = "Calls mode")]
    pub jitter_ms: f64,
    /// Calls mode: ChannelData or Send indications.
    #[arg(long, value_enum, default_value = "channel", help_heading = "Calls mode")]
    pub via: crate::bench_calls::Via,
    /// Calls mode: raise the calls by --ramp-factor per step until loss or
    /// latency passes its bound; report the most calls carried within it.
    #[arg(long, help_heading = "Calls mode")]
    pub ramp: bool,
    /// Calls mode: calls grow by this factor per ramp step.
    #[arg(long, default_value_t = 1.3, help_heading = "Calls mode")]
    pub ramp_factor: f64,
    /// Calls mode: the ramp stops here (each call holds two sockets).
    #[arg(long, default_value_t = 4000, help_heading = "Calls mode")]
    pub max_calls: usize,
    /// Calls mode: the loss bound, percent of packets.
    #[arg(long, default_value_t = 1.0, help_heading = "Calls mode")]
    pub max_loss: f64,
    /// Calls mode: the bound on the 99th percentile one-way latency, ms.
    #[arg(long, default_value_t = 20.0, help_heading = "Calls mode")]
    pub max_p99_ms: f64,
    /// Calls mode: write a self-contained HTML report with charts here.
    #[arg(long, value_name = "FILE.html", help_heading = "Calls mode")]
    pub report: Option<std::path::PathBuf>,
    /// Calls mode: the name of the server in the report (e.g. "coturn
    /// 4.6.1, 1 thread") [default: the SOFTWARE its Binding answer names].
    #[arg(long, value_name = "TEXT", help_heading = "Calls mode")]
    pub label: Option<String>,
}

impl BenchArgs {
    /// The payload size: `--size`, or the mode's default.
    pub fn payload_size(&self) -> usize {
        self.size.unwrap_or(match self.mode {
            Mode::Calls => self.preset.size(),
            _ => 160,
        })
    }
}

/// One run's results.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Mode.
    pub mode: Mode,
    /// Transport.
    pub transport: BenchTransport,
    /// Allocations or clients.
    pub allocations: usize,
    /// Window.
    pub window: usize,
    /// Payload size.
    pub size: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Operations completed in the measured interval: packets the server
    /// relayed (two per round trip), Binding responses, allocate+delete
    /// cycles, or allocations held.
    pub operations: u64,
    /// Operations per second.
    pub per_second: f64,
    /// What an operation is.
    pub unit: &'static str,
    /// Packets or requests that never came back (lost or timed out).
    pub lost: u64,
    /// Round-trip percentiles in microseconds (relay, Binding and allocate modes).
    pub rtt_us: Option<Percentiles>,
    /// Server CPU per operation, user mode, microseconds.
    pub server_user_us_per_op: Option<f64>,
    /// Server CPU per operation, kernel mode, microseconds.
    pub server_sys_us_per_op: Option<f64>,
    /// Busy time of the server's core per operation (`--server-core`),
    /// microseconds: the server, softirq and kernel threads on that core.
    pub server_core_us_per_op: Option<f64>,
    /// Server RSS at the end, KiB.
    pub server_rss_kib: Option<u64>,
    /// Hold mode: server RSS growth per held allocation, bytes.
    pub rss_per_allocation_bytes: Option<f64>,
}

/// Runs a benchmark and prints its report.
pub fn run(args: BenchArgs) -> Result<()> {
    if args.mode != Mode::Calls && args.payload_size() < 16 {
        bail!("size: at least 16 bytes (the payload carries a timestamp and an index)");
    }
    if args.allocations == 0 || args.window == 0 {
        bail!("allocations and window must be at least 1");
    }
    let report = match args.mode {
        Mode::Channel | Mode::Send => relay(&args)?,
        Mode::Binding => bindings(&args)?,
        Mode::Allocate => allocate_cycles(&args)?,
        Mode::Hold => hold(&args)?,
        Mode::TcpRelay => crate::bench_tcp::tcp_relay(&args)?,
        // Its own report, its own checks.
        Mode::Calls => return crate::bench_calls::run(&args),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    // A run that lost most of what it sent measured nothing: say so, and
    // fail, so a script cannot take it for a result.
    let attempted = report.operations + report.lost;
    let hint = match args.mode {
        Mode::Binding | Mode::Allocate => {
            "; unauthenticated requests from one address hit per-source limits: start turnpike \
             with --rate-limit-per-ip 0 (and --auth-fail-limit 0) for single-host load"
        }
        _ => "",
    };
    if report.operations > 0
        && report.lost * 2 <= attempted
        && report.lost * 20 > attempted
        && !hint.is_empty()
    {
        eprintln!(
            "turnpike bench: warning: {} of {attempted} requests lost, which looks like rate limiting{hint}",
            report.lost
        );
    }
    if report.operations == 0 || report.lost * 2 > attempted {
        bail!(
            "{} of {attempted} operations lost: the measurement is not valid{hint}",
            report.lost
        );
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!("turnpike bench: {:?} over {:?}", r.mode, r.transport);
    println!(
        "  allocations {}  window {}  payload {} B  measured {:.1} s",
        r.allocations, r.window, r.size, r.seconds
    );
    println!("  {:<28} {:>14.0}", format!("{}/s", r.unit), r.per_second);
    println!("  {:<28} {:>14}", r.unit, r.operations);
    println!("  {:<28} {:>14}", "lost", r.lost);
    if let Some(p) = r.rtt_us {
        println!(
            "  {:<28} {:>14}",
            "RTT µs p50/p90/p99/p99.9/max",
            format!("{}/{}/{}/{}/{}", p.p50, p.p90, p.p99, p.p999, p.max)
        );
    }
    if let (Some(u), Some(s)) = (r.server_user_us_per_op, r.server_sys_us_per_op) {
        println!("  {:<28} {:>14.3}", "server CPU µs/op user", u);
        println!("  {:<28} {:>14.3}", "server CPU µs/op system", s);
        println!("  {:<28} {:>14.3}", "server CPU µs/op total", u + s);
    }
    if let Some(c) = r.server_core_us_per_op {
        println!("  {:<28} {:>14.3}", "server core µs/op (all)", c);
    }
    if let Some(rss) = r.server_rss_kib {
        println!("  {:<28} {:>14}", "server RSS KiB", rss);
    }
    if let Some(b) = r.rss_per_allocation_bytes {
        println!("  {:<28} {:>14.0}", "server RSS per allocation B", b);
    }
}
