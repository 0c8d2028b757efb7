//! What a run measures: latency percentiles, the server's CPU and RSS
//! from /proc, a core's busy ticks, and the meter of a measured interval.

use std::time::Instant;

use serde::Serialize;

use udp_io::clock_ticks_per_second;

use super::{BenchArgs, Report};

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
