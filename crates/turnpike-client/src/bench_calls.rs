//! `turnpike bench --mode calls`: loads a server the way media does and,
//! with `--ramp`, finds how many calls one server core carries.
//!
//! A call is two legs, each an allocation of its own, that send to each
//! other's relayed address at a codec's pace (Opus: 50 packets/s of 120 B)
//! with send-time jitter, through channels or Send indications. Each media
//! packet crosses the server twice (client → relay A → relay B → client),
//! as between two WebRTC users who both relay. The generator is both ends,
//! so one clock gives one-way latency. Payloads carry the step, the sender
//! and the send time: loss, latency and jitter (RFC 3550 §6.4.1
//! inter-arrival difference, with the real send times, so the sender's own
//! jitter is not counted) are per packet, and a packet counts for the step
//! it was sent in, however late it comes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use mio::{Events, Interest, Poll, Token};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType};

use crate::bench::{
    client_transport, core_ticks, percentiles, sample, BenchArgs, BenchTransport, Conn, Percentiles,
};
use crate::client::{Channel, TurnClient};
use udp_io::{clock_ticks_per_second, RecvBatch, SendQueue};

/// What each leg sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Opus, 20 ms frames: 50 packets/s of 120 B (RTP and SRTP included).
    Opus,
    /// Video at 500 kbit/s in 1100 B packets.
    #[value(name = "video-500k")]
    Video500k,
    /// Video at 1 Mbit/s.
    #[value(name = "video-1m")]
    Video1m,
    /// Video at 2.5 Mbit/s.
    #[value(name = "video-2500k")]
    Video2500k,
}

impl Preset {
    /// Bytes per packet.
    pub fn size(self) -> usize {
        match self {
            Preset::Opus => 120,
            _ => 1100,
        }
    }

    /// Packets per second per leg.
    pub fn pps(self) -> u32 {
        let bitrate = match self {
            Preset::Opus => return 50,
            Preset::Video500k => 500_000,
            Preset::Video1m => 1_000_000,
            Preset::Video2500k => 2_500_000,
        };
        (bitrate as f64 / 8.0 / self.size() as f64).round() as u32
    }
}

/// How media reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Via {
    /// ChannelData (what browsers use once a channel is bound).
    Channel,
    /// Send indications.
    Send,
}

const MAGIC: [u8; 2] = [0x7c, 0xa1];
/// magic, step, call, side, send time.
const HEADER: usize = 2 + 2 + 4 + 1 + 8;
/// How long after a step's last packet its stragglers are still counted.
const DRAIN: Duration = Duration::from_millis(500);
/// The generator is behind schedule when its 99th percentile send delay
/// passes this, or it sent less than `RATE_SHORTFALL` of the target:
/// the ramp then stops, since the server is no longer what is measured.
const LAG_LIMIT_US: u64 = 5_000;
const RATE_SHORTFALL: f64 = 0.97;

/// One step of the ramp (or the only one).
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Calls (two legs each).
    pub calls: usize,
    /// Measured seconds.
    pub seconds: f64,
    /// Media packets per second the generator was to send (both legs).
    pub target_pps: f64,
    /// What it sent, per second.
    pub sent_pps: f64,
    /// Packets sent in the step.
    pub sent: u64,
    /// Of those, received.
    pub received: u64,
    /// Lost, percent of sent.
    pub loss_pct: f64,
    /// One-way latency, microseconds.
    pub latency_us: Option<Percentiles>,
    /// Inter-arrival jitter (|D| of RFC 3550 §6.4.1), microseconds.
    pub jitter_us: Option<Percentiles>,
    /// The generator's 99th percentile delay behind its schedule, µs.
    pub generator_lag_p99_us: u64,
    /// The server's CPU (user + system, all its threads), percent of one core.
    pub server_cpu_pct: Option<f64>,
    /// Busy time of `--server-core` (softirq and kernel threads included),
    /// percent.
    pub server_core_pct: Option<f64>,
    /// Within the loss and latency bounds.
    pub within_bounds: bool,
    /// The generator kept its schedule (else the step measured it, not the server).
    pub generator_kept_up: bool,
}

/// The capacity figure.
#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    /// The most calls carried within the bounds.
    pub calls: usize,
    /// The server's CPU at that step, percent of one core (the core's busy
    /// time with `--server-core`, else the process's).
    pub cpu_pct: Option<f64>,
    /// Calls per fully used core, projected from `cpu_pct` (linear).
    pub calls_per_core: Option<f64>,
    /// Whether the ramp ended because the server failed the bounds (the
    /// figure is the server's) rather than at `--max-calls` or with the
    /// generator out of time (then the server carries at least this).
    pub server_limited: bool,
}

/// A calls run.
#[derive(Debug, Clone, Serialize)]
pub struct CallsReport {
    /// The server loaded.
    pub server: SocketAddr,
    /// Transport to the server.
    pub transport: BenchTransport,
    /// Channel or Send.
    pub via: Via,
    /// Preset.
    pub preset: Preset,
    /// Packets per second per leg.
    pub pps: u32,
    /// Bytes per packet.
    pub size: usize,
    /// Send-time jitter, ms.
    pub jitter_ms: f64,
    /// Loss bound, percent.
    pub max_loss_pct: f64,
    /// p99 latency bound, ms.
    pub max_p99_ms: f64,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// The largest step within the bounds, if any.
    pub capacity: Option<Capacity>,
    /// Why the run stopped, in words.
    pub stopped: String,
    /// What was measured and where, so two reports say more than a port.
    pub run: RunInfo,
}

/// The server's and the load generator's identity for a report.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `--label`, else the SOFTWARE of the server's Binding answer.
    pub server_name: Option<String>,
    /// The SOFTWARE the server sent, if any.
    pub server_software: Option<String>,
    /// This bench's version.
    pub bench_version: String,
    /// The host the bench ran on.
    pub host: String,
    /// Its CPU model (/proc/cpuinfo).
    pub cpu_model: String,
    /// Its cores.
    pub cores: usize,
}

impl RunInfo {
    /// Asks the server for its SOFTWARE and reads this host's facts.
    pub fn gather(server: SocketAddr, label: Option<&str>) -> RunInfo {
        let software = crate::client::Channel::connect(
            &crate::client::ClientTransport::Udp,
            server,
            Duration::from_secs(2),
        )
        .ok()
        .and_then(|mut ch| crate::client::binding_answer(&mut ch, Duration::from_secs(2)).ok())
        .and_then(|(_, s)| s);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, m)| m.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown CPU".to_owned());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_default();
        RunInfo {
            server_name: label.map(str::to_owned).or_else(|| software.clone()),
            server_software: software,
            bench_version: env!("CARGO_PKG_VERSION").to_owned(),
            host,
            cpu_model,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

struct Leg {
    conn: Conn,
    /// The other leg's relayed address, where this leg's packets go.
    to: SocketAddr,
    channel: u16,
    /// Offset of this leg's packets within the packet interval.
    phase_ns: u64,
    next: u64,
    /// The last measured packet from the other leg: (sent, received) ns.
    last: Option<(u64, u64)>,
    bye: Vec<u8>,
}

#[derive(Default)]
struct Tally {
    sent: u64,
    received: u64,
    latency: Vec<u32>,
    jitter: Vec<u32>,
    lag: Vec<u32>,
}

struct Load {
    legs: Vec<Leg>,
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    poll: Poll,
    t0: Instant,
    start_ns: u64,
    interval_ns: u64,
    jitter_ns: u64,
    size: usize,
    via: Via,
    stream: bool,
    rng: rand::rngs::SmallRng,
    q: SendQueue,
    batch: RecvBatch,
    buf: Vec<u8>,
    msg: Vec<u8>,
    /// The step being sent (0: not measured).
    sending: u16,
    /// The step whose packets are counted on arrival.
    counting: u16,
    tally: Tally,
}

impl Load {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn due(&mut self, leg: usize) -> u64 {
        let l = &self.legs[leg];
        let jitter = if self.jitter_ns > 0 {
            self.rng.gen_range(0..self.jitter_ns)
        } else {
            0
        };
        self.start_ns + l.phase_ns + l.next * self.interval_ns + jitter
    }

    /// Restarts every leg's schedule from now: after setting up more
    /// calls, the packets the pause skipped are not sent in a burst.
    fn reschedule(&mut self) {
        self.start_ns = self.now_ns();
        self.heap.clear();
        for i in 0..self.legs.len() {
            self.legs[i].next = 0;
            let d = self.due(i);
            self.heap.push(Reverse((d, i as u32)));
        }
    }

    fn send(&mut self, leg: usize, due: u64) -> Result<()> {
        let now = self.now_ns();
        if self.sending != 0 {
            self.tally.sent += 1;
            self.tally
                .lag
                .push((now.saturating_sub(due) / 1000).min(u32::MAX as u64) as u32);
        }
        let mut payload = [0u8; HEADER];
        payload[..2].copy_from_slice(&MAGIC);
        payload[2..4].copy_from_slice(&self.sending.to_be_bytes());
        payload[4..8].copy_from_slice(&((leg / 2) as u32).to_be_bytes());
        payload[8] = (leg % 2) as u8;
        payload[9..17].copy_from_slice(&now.to_be_bytes());
        let l = &mut self.legs[leg];
        self.msg.clear();
        match self.via {
            Via::Channel => {
                self.msg
                    .extend_from_slice(&ChannelData::header(l.channel, self.size as u16));
                self.msg.extend_from_slice(&payload);
                self.msg.resize(4 + self.size, 0xAB);
                if self.stream {
                    self.msg.resize((4 + self.size + 3) & !3, 0);
                }
            }
            Via::Send => {
                let mut data = payload.to_vec();
                data.resize(self.size, 0xAB);
                MessageBuilder::new(
                    &mut self.msg,
                    MessageType::new(method::SEND, Class::Indication),
                    &[7; 12],
                )
                .xor_addr(attr::XOR_PEER_ADDRESS, l.to)
                .attr(attr::DATA, &data);
            }
        }
        // A full socket buffer loses the packet, as a real sender's would.
        match l.conn.send_many(&mut self.q, &[&self.msg]) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e).context("sending media"),
        }
    }

    fn receive(&mut self, leg: usize) -> Result<()> {
        let now = self.now_ns();
        let counting = self.counting;
        let Load {
            legs,
            tally,
            buf,
            batch,
            ..
        } = self;
        let Leg { conn, last, .. } = &mut legs[leg];
        let res = conn.recv_all(buf, batch, |m| {
            let payload = match stun_proto::packet_kind(m) {
                stun_proto::PacketKind::ChannelData => ChannelData::parse(m).map(|c| c.data),
                stun_proto::PacketKind::Stun => Message::parse(m).ok().and_then(|msg| msg.get(attr::DATA)),
                _ => None,
            };
            let Some(p) = payload.filter(|p| p.len() >= HEADER && p[..2] == MAGIC) else {
                return;
            };
            let step = u16::from_be_bytes([p[2], p[3]]);
            if step == 0 || step != counting {
                return;
            }
            let sent = u64::from_be_bytes(p[9..17].try_into().unwrap_or_default());
            tally.received += 1;
            tally
                .latency
                .push((now.saturating_sub(sent) / 1000).min(u32::MAX as u64) as u32);
            if let Some((s0, r0)) = *last {
                let d = (now as i64 - r0 as i64) - (sent as i64 - s0 as i64);
                tally
                    .jitter
                    .push((d.unsigned_abs() / 1000).min(u32::MAX as u64) as u32);
            }
            *last = Some((sent, now));
        });
        match res {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(e).context("receiving media"),
        }
    }

    /// Runs the media for `d`: sends what is due, receives what came.
    fn run_for(&mut self, d: Duration) -> Result<()> {
        let until = self.now_ns() + d.as_nanos() as u64;
        let mut events = Events::with_capacity(1024);
        loop {
            let now = self.now_ns();
            if now >= until {
                return Ok(());
            }
            while let Some(&Reverse((due, leg))) = self.heap.peek() {
                if due > now {
                    break;
                }
                self.heap.pop();
                self.send(leg as usize, due)?;
                self.legs[leg as usize].next += 1;
                let next = self.due(leg as usize);
                self.heap.push(Reverse((next, leg)));
            }
            // Busy-poll, as the other modes do: the generator owns its core.
            self.poll.poll(&mut events, Some(Duration::ZERO))?;
            for ev in events.iter() {
                self.receive(ev.token().0)?;
            }
        }
    }
}

/// The most sockets this process may open, from /proc/self/limits.
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn setup_call(args: &BenchArgs, load: &mut Load, call: usize) -> Result<()> {
    let connect = || -> Result<TurnClient> {
        let ch = Channel::connect(
            &client_transport(args.transport),
            args.server,
            Duration::from_secs(3),
        )
        .with_context(|| format!("connecting to {}", args.server))?;
        Ok(TurnClient::new(ch, &args.user, &args.password))
    };
    let (mut a, mut b) = (connect()?, connect()?);
    let ra = a
        .allocate()
        .map_err(|e| anyhow::anyhow!("call {call}, leg A: allocate: {e}"))?
        .relayed;
    let rb = b
        .allocate()
        .map_err(|e| anyhow::anyhow!("call {call}, leg B: allocate: {e}"))?
        .relayed;
    let ch = args.first_channel;
    for (c, peer, side) in [(&mut a, rb, 'A'), (&mut b, ra, 'B')] {
        match args.via {
            Via::Channel => c.channel_bind(ch, peer),
            Via::Send => c.create_permission(&[peer]),
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "call {call}, leg {side}: permission for the other leg's relayed address {peer}: {e} \
                 (the server must allow its own relay addresses as peers: --allow-loopback-peers on 127.0.0.1)"
            )
        })?;
    }
    let interval = load.interval_ns;
    for (c, to) in [(a, rb), (b, ra)] {
        let mut c = c;
        let bye = c.refresh_request(0);
        let phase_ns = load.rng.gen_range(0..interval);
        let mut conn = Conn::from_channel(c.into_channel())?;
        let token = Token(load.legs.len());
        conn.register(load.poll.registry(), token, Interest::READABLE)?;
        load.legs.push(Leg {
            conn,
            to,
            channel: ch,
            phase_ns,
            next: 0,
            last: None,
            bye,
        });
    }
    Ok(())
}

fn pct(p: &Option<Percentiles>, f: impl Fn(&Percentiles) -> u64) -> String {
    p.as_ref()
        .map(|p| format!("{:.2}", f(p) as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn measure_step(args: &BenchArgs, load: &mut Load, step: u16, pps: u32) -> Result<Step> {
    let calls = load.legs.len() / 2;
    load.sending = 0;
    load.run_for(Duration::from_secs_f64(args.warmup))?;
    load.tally = Tally::default();
    load.counting = step;
    load.sending = step;
    for l in &mut load.legs {
        l.last = None;
    }
    let proc0 = args.pid.and_then(sample);
    let core0 = args.server_core.and_then(core_ticks);
    let t = Instant::now();
    load.run_for(Duration::from_secs_f64(args.duration))?;
    let seconds = t.elapsed().as_secs_f64();
    let tick = 1.0 / clock_ticks_per_second();
    let server_cpu_pct = match (args.pid.and_then(sample), proc0) {
        (Some(b), Some(a)) => {
            Some(((b.utime + b.stime) - (a.utime + a.stime)) as f64 * tick / seconds * 100.0)
        }
        _ => None,
    };
    let server_core_pct = match (args.server_core.and_then(core_ticks), core0) {
        (Some((b1, t1)), Some((b0, t0))) if t1 > t0 => Some((b1 - b0) as f64 / (t1 - t0) as f64 * 100.0),
        _ => None,
    };
    load.sending = 0;
    load.run_for(DRAIN)?;
    load.counting = 0;
    let tally = std::mem::take(&mut load.tally);
    let target_pps = (calls * 2) as f64 * pps as f64;
    let sent_pps = tally.sent as f64 / seconds;
    let lost = tally.sent.saturating_sub(tally.received);
    let loss_pct = if tally.sent > 0 {
        lost as f64 * 100.0 / tally.sent as f64
    } else {
        100.0
    };
    let latency_us = percentiles(tally.latency);
    let lag = percentiles(tally.lag).map(|p| p.p99).unwrap_or(0);
    let within_bounds = tally.received > 0
        && loss_pct <= args.max_loss
        && latency_us
            .as_ref()
            .is_some_and(|p| p.p99 as f64 <= args.max_p99_ms * 1000.0);
    Ok(Step {
        calls,
        seconds,
        target_pps,
        sent_pps,
        sent: tally.sent,
        received: tally.received,
        loss_pct,
        latency_us,
        jitter_us: percentiles(tally.jitter),
        generator_lag_p99_us: lag,
        server_cpu_pct,
        server_core_pct,
        within_bounds,
        generator_kept_up: lag <= LAG_LIMIT_US && sent_pps >= target_pps * RATE_SHORTFALL,
    })
}

fn print_step(s: &Step) {
    let cpu = s
        .server_core_pct
        .or(s.server_cpu_pct)
        .map(|c| format!("{c:5.1}%"))
        .unwrap_or_else(|| "    -".into());
    eprintln!(
        "  {:>5} calls  {:>8.0}/{:<8.0} pkt/s  loss {:>6.2}%  latency p50 {:>6} p99 {:>6} ms  jitter p99 {:>6} ms  server {cpu}  {}{}",
        s.calls,
        s.sent_pps,
        s.target_pps,
        s.loss_pct,
        pct(&s.latency_us, |p| p.p50),
        pct(&s.latency_us, |p| p.p99),
        pct(&s.jitter_us, |p| p.p99),
        if s.within_bounds { "ok" } else { "OUT OF BOUNDS" },
        if s.generator_kept_up { "" } else { "  (generator behind schedule)" },
    );
}

/// Calls mode's settings, checked.
struct Plan {
    /// Payload bytes.
    size: usize,
    /// Packets per second per leg.
    pps: u32,
    /// The most calls this process can hold (two sockets each).
    max_calls: usize,
}

impl Plan {
    fn of(args: &BenchArgs) -> Result<Plan> {
        let size = args.payload_size();
        if !(HEADER + 7..=1400).contains(&size) {
            bail!(
                "size: {} to 1400 bytes in calls mode (the payload carries the step, the sender and a timestamp)",
                HEADER + 7
            );
        }
        let pps = args.pps.unwrap_or_else(|| args.preset.pps());
        if !(1..=2000).contains(&pps) {
            bail!("pps: 1 to 2000 packets per second per leg");
        }
        if args.calls == 0 {
            bail!("calls: at least 1");
        }
        if args.jitter_ms < 0.0 || args.jitter_ms * 1e6 >= 1e9 / pps as f64 {
            bail!(
                "jitter-ms: from 0 to less than the packet interval ({} ms)",
                1000 / pps
            );
        }
        if args.ramp && !(args.ramp_factor > 1.0 && args.ramp_factor <= 4.0) {
            bail!("ramp-factor: more than 1, at most 4");
        }
        let max_calls = match open_files_limit() {
            Some(fds) if args.max_calls * 2 + 64 > fds => {
                let fit = fds.saturating_sub(64) / 2;
                eprintln!("turnpike bench: {fds} open files allowed, two per call: at most {fit} calls");
                fit.max(1)
            }
            _ => args.max_calls,
        };
        Ok(Plan { size, pps, max_calls })
    }
}

/// Runs calls mode and prints (or writes) its report.
pub(crate) fn run(args: &BenchArgs) -> Result<()> {
    let Plan { size, pps, max_calls } = Plan::of(args)?;
    let mut load = Load {
        legs: Vec::new(),
        heap: BinaryHeap::new(),
        poll: Poll::new()?,
        t0: Instant::now(),
        start_ns: 0,
        interval_ns: 1_000_000_000 / pps as u64,
        jitter_ns: (args.jitter_ms * 1e6) as u64,
        size,
        via: args.via,
        stream: args.transport == BenchTransport::Tcp,
        rng: rand::rngs::SmallRng::from_entropy(),
        q: SendQueue::new(false),
        batch: RecvBatch::new(),
        buf: vec![0u8; 65536],
        msg: Vec::with_capacity(2048),
        sending: 0,
        counting: 0,
        tally: Tally::default(),
    };
    eprintln!(
        "turnpike bench: calls to {} over {:?} via {:?}: {pps} packets/s of {size} B per leg, jitter {} ms{}",
        args.server,
        args.transport,
        args.via,
        args.jitter_ms,
        if args.ramp {
            format!(
                "; ramp from {} calls until loss > {}% or p99 > {} ms",
                args.calls, args.max_loss, args.max_p99_ms
            )
        } else {
            String::new()
        }
    );
    let (steps, stopped) = ramp(args, &mut load, pps, max_calls)?;
    // Leave the server as it was: delete every allocation.
    for l in load.legs.iter_mut() {
        let bye = std::mem::take(&mut l.bye);
        let _ = l.conn.send_many(&mut load.q, &[&bye]);
    }
    std::thread::sleep(Duration::from_millis(50));
    let capacity = capacity_of(&steps, args.ramp);
    let report = CallsReport {
        server: args.server,
        transport: args.transport,
        via: args.via,
        preset: args.preset,
        pps,
        size,
        jitter_ms: args.jitter_ms,
        max_loss_pct: args.max_loss,
        max_p99_ms: args.max_p99_ms,
        steps,
        capacity,
        stopped,
        run: RunInfo::gather(args.server, args.label.as_deref()),
    };
    if let Some(path) = &args.report {
        std::fs::write(path, crate::bench_report::html(&report))
            .with_context(|| format!("report: cannot write {}", path.display()))?;
        eprintln!("turnpike bench: report written to {}", path.display());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("turnpike bench: calls: {}", report.stopped);
        match &report.capacity {
            Some(c) => println!(
                "  capacity: {} calls within loss {}% and p99 {} ms{}{}",
                c.calls,
                report.max_loss_pct,
                report.max_p99_ms,
                c.cpu_pct
                    .map(|p| format!(", server at {p:.1}% of a core"))
                    .unwrap_or_default(),
                c.calls_per_core
                    .map(|n| format!(" (about {n:.0} calls per core)"))
                    .unwrap_or_default()
            ),
            None => println!("  capacity: no step stayed within the bounds"),
        }
    }
    let last = report.steps.last();
    if last.is_some_and(|s| s.received == 0) {
        bail!("no media came back: the server relays nothing between its own allocations (peer policy?)");
    }
    Ok(())
}

/// Steps of growing call counts (one without `--ramp`) until a bound or
/// the generator gives out: the steps and why it stopped.
fn ramp(args: &BenchArgs, load: &mut Load, pps: u32, max_calls: usize) -> Result<(Vec<Step>, String)> {
    let mut steps: Vec<Step> = Vec::new();
    let mut target = args.calls.min(max_calls);
    let stopped;
    let mut step_no: u16 = 1;
    loop {
        while load.legs.len() / 2 < target {
            let call = load.legs.len() / 2;
            setup_call(args, load, call)?;
        }
        load.reschedule();
        let s = measure_step(args, load, step_no, pps)?;
        print_step(&s);
        let (passed, kept_up) = (s.within_bounds, s.generator_kept_up);
        steps.push(s);
        if !args.ramp {
            stopped = "one step (no --ramp)".to_owned();
            break;
        }
        if !passed {
            stopped = format!("loss or latency passed its bound at {target} calls");
            break;
        }
        if !kept_up {
            stopped = format!(
                "the generator fell behind its schedule at {target} calls: the server carries at least this many"
            );
            break;
        }
        if target >= max_calls {
            stopped = format!("reached --max-calls ({max_calls}) within the bounds");
            break;
        }
        target = ((target as f64 * args.ramp_factor).ceil() as usize).clamp(target + 1, max_calls);
        step_no += 1;
    }
    Ok((steps, stopped))
}

/// The largest step within the bounds, and its calls per core.
fn capacity_of(steps: &[Step], ramp: bool) -> Option<Capacity> {
    let best = steps.iter().filter(|s| s.within_bounds).max_by_key(|s| s.calls);
    let server_limited = ramp
        && steps
            .last()
            .is_some_and(|s| !s.within_bounds && s.generator_kept_up);
    best.map(|s| {
        let cpu = s.server_core_pct.or(s.server_cpu_pct);
        Capacity {
            calls: s.calls,
            cpu_pct: cpu,
            calls_per_core: cpu.filter(|c| *c > 0.5).map(|c| s.calls as f64 * 100.0 / c),
            server_limited,
        }
    })
}
