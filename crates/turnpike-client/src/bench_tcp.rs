//! `turnpike bench --mode tcp-relay`: RFC 6062 relaying measured end to
//! end. Each allocation connects (Connect) to a TCP peer of the load
//! generator that echoes what it reads; messages of `--size` bytes go
//! over the bound data connection with `--window` in flight, and each
//! echo's round trip is timed. Works against any server with RFC 6062
//! (coturn too). One thread per connection side: the server, not the
//! generator, should be what limits.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench::{empty_report, percentiles, BenchArgs, BenchTransport, Meter, Report};
use crate::client::{Channel, ClientTransport, TurnClient};

/// Runs the TCP relay benchmark.
pub(crate) fn tcp_relay(args: &BenchArgs) -> Result<Report> {
    if args.transport != BenchTransport::Tcp {
        bail!("--mode tcp-relay runs over --transport tcp (RFC 6062 needs a TCP control connection)");
    }
    let listener = TcpListener::bind(SocketAddr::new(args.peer_ip, 0)).context("peer listener")?;
    let peer = listener.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let timeout = Duration::from_secs(5);
    let acceptor = echo_peer(listener, stop.clone());
    let sessions = bound_sessions(args, peer, timeout)?;
    let size = args.payload_size();
    let relayed = Arc::new(AtomicU64::new(0));
    let lost = Arc::new(AtomicU64::new(0));
    let measuring = Arc::new(AtomicBool::new(false));
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for (_, s) in &sessions {
        let mut s = s.try_clone()?;
        let (stop, relayed, lost, measuring) =
            (stop.clone(), relayed.clone(), lost.clone(), measuring.clone());
        let window = args.window;
        workers.push(std::thread::spawn(move || {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut msg = vec![0xABu8; size];
            let mut local = Vec::new();
            let mut in_flight = 0usize;
            let mut back = vec![0u8; size];
            let send = |s: &mut TcpStream, msg: &mut Vec<u8>| {
                let now = t0.elapsed().as_micros() as u64;
                msg[..8].copy_from_slice(&now.to_be_bytes());
                s.write_all(msg)
            };
            for _ in 0..window {
                if send(&mut s, &mut msg).is_err() {
                    return local;
                }
                in_flight += 1;
            }
            while !stop.load(Ordering::Relaxed) {
                if s.read_exact(&mut back).is_err() {
                    // Nothing came back in 2 s: what is in flight is lost.
                    lost.fetch_add(in_flight as u64, Ordering::Relaxed);
                    return local;
                }
                in_flight -= 1;
                let sent = u64::from_be_bytes(back[..8].try_into().unwrap_or([0; 8]));
                if measuring.load(Ordering::Relaxed) {
                    let rtt = (t0.elapsed().as_micros() as u64).saturating_sub(sent);
                    local.push(rtt.min(u32::MAX as u64) as u32);
                    // Through the server twice: out and back.
                    relayed.fetch_add(2, Ordering::Relaxed);
                }
                if send(&mut s, &mut msg).is_err() {
                    return local;
                }
                in_flight += 1;
            }
            local
        }));
    }
    std::thread::sleep(Duration::from_secs_f64(args.warmup));
    measuring.store(true, Ordering::Relaxed);
    let meter = Meter::start(args.pid, args.server_core);
    std::thread::sleep(Duration::from_secs_f64(args.duration));
    measuring.store(false, Ordering::Relaxed);
    let mut report = empty_report(args, "messages relayed");
    report.operations = relayed.load(Ordering::Relaxed);
    meter.finish(&mut report);
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        if let Ok(v) = w.join() {
            all.extend(v);
        }
    }
    report.rtt_us = percentiles(all);
    report.lost = lost.load(Ordering::Relaxed);
    for (mut c, _) in sessions {
        let _ = c.refresh(0);
    }
    let _ = acceptor.join();
    Ok(report)
}

/// The peer side: accepts each connection and echoes it, each on a thread
/// of its own, until `stop`.
fn echo_peer(listener: TcpListener, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut echoes = Vec::new();
        listener.set_nonblocking(true).ok();
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_nodelay(true);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                    let st = stop.clone();
                    echoes.push(std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        while !st.load(Ordering::Relaxed) {
                            match s.read(&mut buf) {
                                Ok(0) => return,
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    }));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        for e in echoes {
            let _ = e.join();
        }
    })
}

/// The client side: a TCP allocation, a Connect to `peer` and a bound data
/// connection per allocation (RFC 6062 §4.3, §4.4).
fn bound_sessions(
    args: &BenchArgs,
    peer: SocketAddr,
    timeout: Duration,
) -> Result<Vec<(TurnClient, TcpStream)>> {
    let mut sessions = Vec::new();
    for i in 0..args.allocations {
        let ch = Channel::connect(&ClientTransport::Tcp, args.server, timeout)?;
        let mut c = TurnClient::new(ch, &args.user, &args.password);
        c.set_tcp_relay(true);
        c.allocate()
            .with_context(|| format!("allocation {i}: a TCP allocation"))?;
        let id = c.connect(peer).with_context(|| {
            format!("allocation {i}: Connect to {peer} (the server must allow it as a peer)")
        })?;
        let data = c
            .connection_bind(&ClientTransport::Tcp, args.server, id)
            .with_context(|| format!("allocation {i}: ConnectionBind"))?;
        let crate::client::StdSocket::Tcp(s, leftover) = data.into_std()? else {
            bail!("a TCP data connection");
        };
        if !leftover.is_empty() {
            bail!("allocation {i}: bytes before any were sent");
        }
        s.set_nodelay(true)?;
        sessions.push((c, s));
    }
    Ok(sessions)
}
