//! The request modes: Binding rate, Allocate/Refresh(0) cycles, and many
//! quiet allocations held open.

use std::io::{self};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mio::{Events, Interest, Poll, Token};
use stun_proto::{method, Class, Message, MessageBuilder, MessageType};

use crate::client::{Channel, TurnClient};
use udp_io::{RecvBatch, SendQueue};

use super::relay::LOSS_TIMEOUT;
use super::{client_transport, empty_report, percentiles, sample, Conn, Meter};
use super::{BenchArgs, Report};

/// Closed-loop Binding requests from `allocations` sockets.
pub(super) fn bindings(args: &BenchArgs) -> Result<Report> {
    let mut poll = Poll::new()?;
    let mut conns = Vec::new();
    for i in 0..args.allocations {
        let ch = Channel::connect(
            &client_transport(args.transport),
            args.server,
            Duration::from_secs(3),
        )?;
        let mut c = Conn::from_channel(ch)?;
        c.register(poll.registry(), Token(i), Interest::READABLE)?;
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
pub(super) fn allocate_cycles(args: &BenchArgs) -> Result<Report> {
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
pub(super) fn hold(args: &BenchArgs) -> Result<Report> {
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
