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

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use mio::net::{TcpStream, UdpSocket};
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;
use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType};

use crate::client::{Channel, ClientTransport, TurnClient};
use udp_io::{clock_ticks_per_second, RecvBatch, SendQueue};

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

/// RTT percentiles.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: u64,
    /// 90th.
    pub p90: u64,
    /// 99th.
    pub p99: u64,
    /// 99.9th.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

pub(crate) fn percentiles(mut v: Vec<u32>) -> Option<Percentiles> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize] as u64;
    Some(Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        max: *v.last().unwrap_or(&0) as u64,
    })
}

/// CPU ticks (user, system) and RSS of a process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProcSample {
    pub(crate) utime: u64,
    pub(crate) stime: u64,
    pub(crate) rss_kib: u64,
}

pub(crate) fn sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields overall.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime = f.get(11)?.parse().ok()?;
    let stime = f.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(ProcSample {
        utime,
        stime,
        rss_kib,
    })
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

/// Busy and total ticks of one CPU from `/proc/stat` (busy: everything but
/// idle and iowait).
pub(crate) fn core_ticks(cpu: usize) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&format!("cpu{cpu}")))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Measures a phase: CPU and RSS deltas of the server around it.
pub(crate) struct Meter {
    pid: Option<u32>,
    start: Option<ProcSample>,
    core: Option<(usize, (u64, u64))>,
    t0: Instant,
}

impl Meter {
    pub(crate) fn start(pid: Option<u32>, core: Option<usize>) -> Meter {
        Meter {
            pid,
            start: pid.and_then(sample),
            core: core.and_then(|c| core_ticks(c).map(|t| (c, t))),
            t0: Instant::now(),
        }
    }

    pub(crate) fn finish(&self, r: &mut Report) {
        r.seconds = self.t0.elapsed().as_secs_f64();
        r.per_second = r.operations as f64 / r.seconds.max(1e-9);
        if let (Some(pid), Some(a)) = (self.pid, self.start) {
            if let Some(b) = sample(pid) {
                let tick_us = 1e6 / clock_ticks_per_second();
                let ops = r.operations.max(1) as f64;
                r.server_user_us_per_op = Some((b.utime - a.utime) as f64 * tick_us / ops);
                r.server_sys_us_per_op = Some((b.stime - a.stime) as f64 * tick_us / ops);
                r.server_rss_kib = Some(b.rss_kib);
            }
        }
        if let Some((cpu, (busy0, _))) = self.core {
            if let Some((busy1, _)) = core_ticks(cpu) {
                let tick_us = 1e6 / clock_ticks_per_second();
                r.server_core_us_per_op = Some((busy1 - busy0) as f64 * tick_us / r.operations.max(1) as f64);
            }
        }
    }
}

pub(crate) fn empty_report(args: &BenchArgs, unit: &'static str) -> Report {
    Report {
        mode: args.mode,
        transport: args.transport,
        allocations: args.allocations,
        window: args.window,
        size: args.payload_size(),
        seconds: 0.0,
        operations: 0,
        per_second: 0.0,
        unit,
        lost: 0,
        rtt_us: None,
        server_user_us_per_op: None,
        server_sys_us_per_op: None,
        server_core_us_per_op: None,
        server_rss_kib: None,
        rss_per_allocation_bytes: None,
    }
}

pub(crate) fn client_transport(t: BenchTransport) -> ClientTransport {
    match t {
        BenchTransport::Udp => ClientTransport::Udp,
        BenchTransport::Tcp => ClientTransport::Tcp,
    }
}

/// A client-side socket in the load loop.
pub(crate) enum Conn {
    /// A connected UDP socket and the server address it is connected to.
    Udp(UdpSocket, SocketAddr),
    Tcp {
        s: TcpStream,
        rbuf: Vec<u8>,
        wbuf: Vec<u8>,
    },
}

impl Conn {
    pub(crate) fn from_channel(ch: Channel) -> Result<Conn> {
        Ok(match ch.into_std()? {
            crate::client::StdSocket::Udp(u) => {
                u.set_nonblocking(true)?;
                let remote = u.peer_addr()?;
                Conn::Udp(UdpSocket::from_std(u), remote)
            }
            crate::client::StdSocket::Tcp(t, leftover) => {
                t.set_nonblocking(true)?;
                Conn::Tcp {
                    s: TcpStream::from_std(t),
                    rbuf: leftover,
                    wbuf: Vec::new(),
                }
            }
        })
    }

    pub(crate) fn source(&mut self) -> &mut dyn mio::event::Source {
        match self {
            Conn::Udp(u, _) => u,
            Conn::Tcp { s, .. } => s,
        }
    }

    /// Sends several messages: on UDP through `q` (one `sendmmsg`, equal
    /// sizes merged by GSO), so the generator's kernel work per packet stays
    /// below the server's.
    pub(crate) fn send_many(&mut self, q: &mut SendQueue, msgs: &[&[u8]]) -> io::Result<()> {
        match self {
            Conn::Udp(u, remote) => {
                for m in msgs {
                    q.push(&u, None, *remote, m);
                }
                q.flush();
                Ok(())
            }
            Conn::Tcp { s, wbuf, .. } => {
                for m in msgs {
                    wbuf.extend_from_slice(m);
                }
                flush(s, wbuf)
            }
        }
    }

    /// Receives every whole message available, calling `f` on each; on UDP
    /// with `recvmmsg`, so the generator stays cheaper than what it loads.
    pub(crate) fn recv_all(
        &mut self,
        buf: &mut [u8],
        batch: &mut RecvBatch,
        mut f: impl FnMut(&[u8]),
    ) -> io::Result<()> {
        match self {
            Conn::Udp(u, _) => loop {
                let n = match batch.recv(&u) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                    Err(e) => return Err(e),
                };
                for i in 0..n {
                    if let Some(udp_io::Datagram { data: m, .. }) = batch.get(i) {
                        f(m);
                    }
                }
                if n < udp_io::BATCH {
                    return Ok(());
                }
            },
            Conn::Tcp { s, rbuf, wbuf } => {
                flush(s, wbuf)?;
                loop {
                    match s.read(buf) {
                        Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                        Ok(n) => rbuf.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                let mut off = 0;
                while let Some(Ok(n)) = turn_core::stream_frame_len(&rbuf[off..]) {
                    if rbuf.len() - off < n {
                        break;
                    }
                    f(&rbuf[off..off + n]);
                    off += n;
                }
                rbuf.drain(..off);
                Ok(())
            }
        }
    }
}

fn flush(s: &mut TcpStream, wbuf: &mut Vec<u8>) -> io::Result<()> {
    let mut done = 0;
    while done < wbuf.len() {
        match s.write(&wbuf[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    wbuf.drain(..done);
    Ok(())
}

struct Lane {
    client: Conn,
    peer: UdpSocket,
    peer_addr: SocketAddr,
    /// The allocation's relayed address, which `peer` is connected to.
    relayed: SocketAddr,
    channel: u16,
    inflight: usize,
    last_rx: Instant,
    /// A signed Refresh(0), sent at the end so the server is left as it was.
    bye: Vec<u8>,
}

const LOSS_TIMEOUT: Duration = Duration::from_millis(500);

/// Closed-loop relay through ChannelData or Send/Data indications.
fn relay(args: &BenchArgs) -> Result<Report> {
    let poll = Poll::new()?;
    let mut lanes = Vec::with_capacity(args.allocations);
    for i in 0..args.allocations {
        let ch = Channel::connect(
            &client_transport(args.transport),
            args.server,
            Duration::from_secs(3),
        )
        .with_context(|| format!("connecting to {}", args.server))?;
        let mut c = TurnClient::new(ch, &args.user, &args.password);
        let a = c.allocate().map_err(|e| anyhow::anyhow!("allocation {i}: {e}"))?;
        let peer = std::net::UdpSocket::bind((args.peer_ip, 0))?;
        let peer_addr = peer.local_addr()?;
        let channel = args.first_channel + (i % 0x0FFF) as u16;
        if args.mode == Mode::Channel {
            c.channel_bind(channel, peer_addr)
                .map_err(|e| anyhow::anyhow!("channel bind {i}: {e} (is the peer address allowed?)"))?;
        } else {
            c.create_permission(&[peer_addr])
                .map_err(|e| anyhow::anyhow!("permission {i}: {e} (is the peer address allowed?)"))?;
        }
        peer.connect(a.relayed)?;
        peer.set_nonblocking(true)?;
        let bye = c.refresh_request(0);
        lanes.push(Lane {
            bye,
            client: Conn::from_channel(c.into_channel())?,
            peer: UdpSocket::from_std(peer),
            peer_addr,
            relayed: a.relayed,
            channel,
            inflight: 0,
            last_rx: Instant::now(),
        });
    }
    for (i, l) in lanes.iter_mut().enumerate() {
        poll.registry()
            .register(l.client.source(), Token(2 * i), Interest::READABLE)?;
        poll.registry()
            .register(&mut l.peer, Token(2 * i + 1), Interest::READABLE)?;
    }
    let mut state = LoadState::new(args);
    let run = |lanes: &mut Vec<Lane>,
               state: &mut LoadState,
               poll: &mut Poll,
               until: Instant,
               record: bool|
     -> Result<()> {
        state.recording = record;
        let mut events = Events::with_capacity(1024);
        for i in 0..lanes.len() {
            state.fill(lanes, i)?;
        }
        while Instant::now() < until {
            // Busy-poll: the generator owns its core, and a generator that
            // sleeps makes the server pay to wake it for every burst (an IPI,
            // dear in a VM), which is loopback's cost, not the server's.
            poll.poll(&mut events, Some(Duration::ZERO))?;
            for ev in events.iter() {
                let i = ev.token().0 / 2;
                if ev.token().0 % 2 == 1 {
                    state.peer_echo(&mut lanes[i])?;
                } else {
                    state.client_rx(lanes, i)?;
                }
            }
            let now = Instant::now();
            for i in 0..lanes.len() {
                let l = &mut lanes[i];
                if l.inflight > 0 && now.duration_since(l.last_rx) > LOSS_TIMEOUT {
                    if state.recording {
                        state.lost += l.inflight as u64;
                    }
                    l.inflight = 0;
                    l.last_rx = now;
                    state.fill(lanes, i)?;
                }
            }
        }
        Ok(())
    };
    let mut poll = poll;
    run(
        &mut lanes,
        &mut state,
        &mut poll,
        Instant::now() + Duration::from_secs_f64(args.warmup),
        false,
    )?;
    let meter = Meter::start(args.pid, args.server_core);
    state.relayed = 0;
    state.rtts.clear();
    run(
        &mut lanes,
        &mut state,
        &mut poll,
        Instant::now() + Duration::from_secs_f64(args.duration),
        true,
    )?;
    let unit = "packets relayed";
    let mut r = empty_report(args, unit);
    r.operations = state.relayed;
    meter.finish(&mut r);
    r.lost = state.lost;
    r.rtt_us = percentiles(std::mem::take(&mut state.rtts));
    // Delete the allocations: a UDP allocation left to expire would
    // answer 437 to a later client that gets the same port.
    let mut q = SendQueue::new(false);
    for l in lanes.iter_mut() {
        let bye = std::mem::take(&mut l.bye);
        let _ = l.client.send_many(&mut q, &[&bye]);
    }
    std::thread::sleep(Duration::from_millis(50));
    drop(lanes);
    Ok(r)
}

struct LoadState {
    mode: Mode,
    window: usize,
    size: usize,
    stream: bool,
    t0: Instant,
    buf: Vec<u8>,
    msg: Vec<u8>,
    batch: RecvBatch,
    q: SendQueue,
    relayed: u64,
    lost: u64,
    rtts: Vec<u32>,
    recording: bool,
}

impl LoadState {
    fn new(args: &BenchArgs) -> Self {
        LoadState {
            mode: args.mode,
            window: args.window,
            size: args.payload_size(),
            stream: args.transport == BenchTransport::Tcp,
            t0: Instant::now(),
            buf: vec![0u8; 65536],
            msg: Vec::with_capacity(2048),
            batch: RecvBatch::new(),
            q: SendQueue::new(!args.no_gso),
            relayed: 0,
            lost: 0,
            rtts: Vec::with_capacity(1 << 20),
            recording: false,
        }
    }

    /// Sends packets into lane `i` until its window is full, in one batch.
    fn fill(&mut self, lanes: &mut [Lane], i: usize) -> Result<()> {
        let l = &mut lanes[i];
        let want = self.window.saturating_sub(l.inflight);
        if want == 0 {
            return Ok(());
        }
        self.msg.clear();
        let mut ends = Vec::with_capacity(want);
        for _ in 0..want {
            let stamp = self.t0.elapsed().as_nanos() as u64;
            let mut payload = [0u8; 16];
            payload[..8].copy_from_slice(&stamp.to_be_bytes());
            payload[8..12].copy_from_slice(&(i as u32).to_be_bytes());
            let start = self.msg.len();
            match self.mode {
                Mode::Channel => {
                    self.msg
                        .extend_from_slice(&ChannelData::header(l.channel, self.size as u16));
                    self.msg.extend_from_slice(&payload);
                    self.msg.resize(start + 4 + self.size, 0xAB);
                    if self.stream {
                        self.msg.resize(start + ((4 + self.size + 3) & !3), 0);
                    }
                }
                _ => {
                    let mut data = payload.to_vec();
                    data.resize(self.size, 0xAB);
                    let mut one = Vec::with_capacity(self.size + 64);
                    MessageBuilder::new(
                        &mut one,
                        MessageType::new(method::SEND, Class::Indication),
                        &[7; 12],
                    )
                    .xor_addr(attr::XOR_PEER_ADDRESS, l.peer_addr)
                    .attr(attr::DATA, &data);
                    self.msg.extend_from_slice(&one);
                }
            }
            ends.push(self.msg.len());
        }
        let mut msgs = Vec::with_capacity(want);
        let mut start = 0;
        for e in ends {
            msgs.push(&self.msg[start..e]);
            start = e;
        }
        l.client.send_many(&mut self.q, &msgs)?;
        l.inflight += want;
        Ok(())
    }

    /// The peer side: echo every datagram back through the relayed address,
    /// a `recvmmsg` and a `sendmmsg` per batch.
    fn peer_echo(&mut self, l: &mut Lane) -> Result<()> {
        loop {
            let n = match self.batch.recv(&l.peer) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e.into()),
            };
            if self.recording {
                self.relayed += n as u64;
            }
            for i in 0..n {
                if let Some(udp_io::Datagram { data: d, .. }) = self.batch.get(i) {
                    self.q.push(&l.peer, None, l.relayed, d);
                }
            }
            self.q.flush();
            if n < udp_io::BATCH {
                return Ok(());
            }
        }
    }

    /// The client side: each echo that arrives completes a round trip.
    fn client_rx(&mut self, lanes: &mut [Lane], i: usize) -> Result<()> {
        let mut done = 0usize;
        let mut rtts = std::mem::take(&mut self.rtts);
        let now_ns = self.t0.elapsed().as_nanos() as u64;
        let recording = self.recording;
        let res = lanes[i].client.recv_all(&mut self.buf, &mut self.batch, |m| {
            let payload = match stun_proto::packet_kind(m) {
                stun_proto::PacketKind::ChannelData => ChannelData::parse(m).map(|c| c.data),
                stun_proto::PacketKind::Stun => Message::parse(m).ok().and_then(|msg| msg.get(attr::DATA)),
                _ => None,
            };
            if let Some(p) = payload.filter(|p| p.len() >= 16) {
                let sent = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
                if recording {
                    rtts.push((now_ns.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                }
                done += 1;
            }
        });
        self.rtts = rtts;
        res?;
        let l = &mut lanes[i];
        if done > 0 {
            if self.recording {
                self.relayed += done as u64;
            }
            l.inflight = l.inflight.saturating_sub(done);
            l.last_rx = Instant::now();
        }
        self.fill(lanes, i)
    }
}

/// Closed-loop Binding requests from `allocations` sockets.
fn bindings(args: &BenchArgs) -> Result<Report> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::new();
    for i in 0..args.allocations {
        let ch = Channel::connect(
            &client_transport(args.transport),
            args.server,
            Duration::from_secs(3),
        )?;
        let mut c = Conn::from_channel(ch)?;
        poll.registry()
            .register(c.source(), Token(i), Interest::READABLE)?;
        conns.push((c, 0usize, Instant::now()));
    }
    let t0 = Instant::now();
    let mut msg = Vec::with_capacity(64);
    let mut buf = vec![0u8; 65536];
    let mut rbatch = RecvBatch::new();
    let mut q = SendQueue::new(!args.no_gso);
    // Tops `c` up to a full window in one batch; the send time rides in the
    // transaction id.
    let mut refill = |c: &mut Conn, inflight: &mut usize, msg: &mut Vec<u8>| -> io::Result<()> {
        let want = args.window.saturating_sub(*inflight);
        if want == 0 {
            return Ok(());
        }
        msg.clear();
        let stamp = (t0.elapsed().as_nanos() as u64).to_be_bytes();
        for k in 0..want {
            let mut txid = [0u8; 12];
            txid[..8].copy_from_slice(&stamp);
            txid[8..].copy_from_slice(&(k as u32).to_be_bytes());
            MessageBuilder::append(msg, MessageType::new(method::BINDING, Class::Request), &txid);
        }
        // Binding requests are all HEADER_LEN bytes.
        let msgs: Vec<&[u8]> = msg.chunks(stun_proto::HEADER_LEN).collect();
        c.send_many(&mut q, &msgs)?;
        *inflight += want;
        Ok(())
    };
    let mut done = 0u64;
    let mut lost = 0u64;
    let mut rtts = Vec::with_capacity(1 << 20);
    let mut events = Events::with_capacity(1024);
    let mut phase = |poll: &mut Poll,
                     conns: &mut Vec<(Conn, usize, Instant)>,
                     until: Instant,
                     record: bool,
                     done: &mut u64,
                     lost: &mut u64,
                     rtts: &mut Vec<u32>|
     -> Result<()> {
        for (c, inflight, _) in conns.iter_mut() {
            refill(c, inflight, &mut msg)?;
        }
        while Instant::now() < until {
            // Busy-poll: the generator owns its core, and a generator that
            // sleeps makes the server pay to wake it for every burst (an IPI,
            // dear in a VM), which is loopback's cost, not the server's.
            poll.poll(&mut events, Some(Duration::ZERO))?;
            for ev in events.iter() {
                let (c, inflight, last) = &mut conns[ev.token().0];
                let now_ns = t0.elapsed().as_nanos() as u64;
                let mut got = 0;
                c.recv_all(&mut buf, &mut rbatch, |m| {
                    if let Ok(resp) = Message::parse(m) {
                        let sent =
                            u64::from_be_bytes(resp.transaction_id()[..8].try_into().unwrap_or_default());
                        if record {
                            rtts.push((now_ns.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
                        }
                        got += 1;
                    }
                })?;
                if got > 0 {
                    *last = Instant::now();
                    *inflight = inflight.saturating_sub(got);
                    if record {
                        *done += got as u64;
                    }
                }
                refill(c, inflight, &mut msg)?;
            }
            let now = Instant::now();
            for (c, inflight, last) in conns.iter_mut() {
                if *inflight > 0 && now.duration_since(*last) > LOSS_TIMEOUT {
                    if record {
                        *lost += *inflight as u64;
                    }
                    *inflight = 0;
                    *last = now;
                    refill(c, inflight, &mut msg)?;
                }
            }
        }
        Ok(())
    };
    phase(
        &mut poll,
        &mut conns,
        Instant::now() + Duration::from_secs_f64(args.warmup),
        false,
        &mut done,
        &mut lost,
        &mut rtts,
    )?;
    let meter = Meter::start(args.pid, args.server_core);
    phase(
        &mut poll,
        &mut conns,
        Instant::now() + Duration::from_secs_f64(args.duration),
        true,
        &mut done,
        &mut lost,
        &mut rtts,
    )?;
    let mut r = empty_report(args, "Binding responses");
    r.operations = done;
    meter.finish(&mut r);
    r.lost = lost;
    r.rtt_us = percentiles(rtts);
    Ok(r)
}

/// Authenticated allocate+delete cycles, as calls start: each cycle opens a
/// new client socket (a new 5-tuple), is challenged (401), allocates with
/// credentials, and deletes with Refresh(LIFETIME 0): three transactions.
/// `allocations` clients run in parallel threads.
fn allocate_cycles(args: &BenchArgs) -> Result<Report> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    // One cycle first: wrong credentials are a failure to report, not
    // "lost" operations.
    preflight_allocate(args)?;
    let stop = Arc::new(AtomicBool::new(false));
    let record = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    for _ in 0..args.allocations {
        let (stop, record, counts) = (stop.clone(), record.clone(), counts.clone());
        let a = args.clone();
        threads.push(std::thread::spawn(move || -> Result<(Vec<u32>, u64)> {
            let mut rtts = Vec::new();
            let mut failed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let ch = Channel::connect(&client_transport(a.transport), a.server, Duration::from_secs(3))?;
                let mut c = TurnClient::new(ch, &a.user, &a.password);
                c.set_timeout(Duration::from_secs(2));
                let ok = c.allocate().is_ok() && c.refresh(0).is_ok();
                if !ok {
                    if record.load(Ordering::Relaxed) {
                        failed += 1;
                    }
                    continue;
                }
                if record.load(Ordering::Relaxed) {
                    rtts.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    counts.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok((rtts, failed))
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    let meter = Meter::start(args.pid, args.server_core);
    record.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    record.store(false, Ordering::SeqCst);
    let mut r = empty_report(args, "allocate+delete cycles");
    r.operations = counts.load(Ordering::SeqCst);
    meter.finish(&mut r);
    stop.store(true, Ordering::SeqCst);
    let mut all = Vec::new();
    for t in threads {
        let (rtts, failed) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        all.extend(rtts);
        r.lost += failed;
    }
    r.rtt_us = percentiles(all);
    Ok(r)
}

/// One authenticated allocate+delete, so a credential or server problem
/// fails the run with its reason instead of showing up as loss.
fn preflight_allocate(args: &BenchArgs) -> Result<()> {
    let ch = Channel::connect(
        &client_transport(args.transport),
        args.server,
        Duration::from_secs(3),
    )?;
    let mut c = TurnClient::new(ch, &args.user, &args.password);
    c.set_timeout(Duration::from_secs(2));
    match c.allocate() {
        Ok(_) => {
            let _ = c.refresh(0);
            Ok(())
        }
        Err(crate::client::ClientError::Error { code: 401, .. }) => bail!(
            "authentication failed (401){}: check --user and --password",
            c.realm().map(|r| format!(" in realm {r:?}")).unwrap_or_default()
        ),
        Err(e) => bail!("the first allocate failed: {e}"),
    }
}

/// Allocates and holds `allocations` allocations, then reports the server's
/// RSS growth per allocation.
fn hold(args: &BenchArgs) -> Result<Report> {
    let pid = args
        .pid
        .context("hold mode needs --pid of the server to read its RSS")?;
    let before = sample(pid).context("cannot read the server's /proc entry")?;
    let t0 = Instant::now();
    let mut held = Vec::with_capacity(args.allocations);
    let mut failed = 0u64;
    // Allocations are made from a pool of threads, each holding its share.
    let per = args.allocations.div_ceil(64);
    let threads: Vec<_> = (0..args.allocations.div_ceil(per))
        .map(|k| {
            let a = args.clone();
            let n = per.min(a.allocations - k * per);
            std::thread::spawn(move || {
                let mut clients = Vec::with_capacity(n);
                let mut failed = 0u64;
                for _ in 0..n {
                    let Ok(ch) =
                        Channel::connect(&client_transport(a.transport), a.server, Duration::from_secs(3))
                    else {
                        failed += 1;
                        continue;
                    };
                    let mut c = TurnClient::new(ch, &a.user, &a.password);
                    match c.allocate() {
                        Ok(_) => clients.push(c),
                        Err(_) => failed += 1,
                    }
                }
                (clients, failed)
            })
        })
        .collect();
    for t in threads {
        let (c, f) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        held.extend(c);
        failed += f;
    }
    let setup = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let after = sample(pid).context("cannot read the server's /proc entry")?;
    let mut r = empty_report(args, "allocations held");
    r.operations = held.len() as u64;
    r.seconds = setup.as_secs_f64();
    r.per_second = held.len() as f64 / r.seconds.max(1e-9);
    r.lost = failed;
    r.server_rss_kib = Some(after.rss_kib);
    r.rss_per_allocation_bytes =
        Some((after.rss_kib as f64 - before.rss_kib as f64) * 1024.0 / held.len().max(1) as f64);
    // Delete them, so the server is left as it was.
    for c in held.iter_mut() {
        let _ = c.refresh(0);
    }
    Ok(r)
}
