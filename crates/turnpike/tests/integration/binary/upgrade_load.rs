//! The binary upgrade under the load a production node carries: 100 UDP
//! allocations with paced media (half through channels, half as Send
//! indications), 10 plain TCP control connections with media, 10 RFC 6062
//! data connections streaming both ways, 2 TLS connections; the upgrade
//! goes to another build (the installed binary replaced, as a package
//! upgrade does, by one whose build id differs), and then ten times in a
//! row.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use turnpike_client::client::{ClientTransport, Received, StdSocket, TurnClient};

use super::upgrade::{alive, client, config, fds, field, scratch, signal, start_with, tls_listen};
use super::wait_for;
use crate::common::rss_kib;

const UDP_CALLS: usize = 100;
const TCP_CALLS: usize = 10;
const STREAMS: usize = 10;
const INTERVAL: Duration = Duration::from_millis(20);
/// Each stream writes this much every 10 ms each way (100 kB/s).
const CHUNK: usize = 1000;

/// A copy of the test binary whose linker build id differs (one byte of
/// the note flipped): the same code, reporting another build, as a
/// rebuilt package would.
fn another_build(from: &Path, to: &Path) {
    let mut bytes = std::fs::read(from).unwrap();
    let id = turnpike::build_id::build_id(&mut std::fs::File::open(from).unwrap())
        .expect("the test binary has a build id");
    let head = bytes.len().min(1 << 20);
    let at = bytes[..head]
        .windows(id.len())
        .position(|w| w == id.as_slice())
        .expect("the build id note near the start");
    bytes[at] ^= 0xff;
    std::fs::write(to, bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The byte at offset `k` of stream `id`: a shifted, lost or repeated byte
/// breaks the pattern.
fn pattern(id: usize, k: u64) -> u8 {
    (k % 251) as u8 ^ ((id as u8) << 4)
}

/// One direction of an RFC 6062 stream: the writer's total when it
/// stopped, and the reader's verdict.
struct Direction {
    writer: JoinHandle<u64>,
    reader: JoinHandle<Result<u64, String>>,
    written: Arc<AtomicU64>,
}

fn direction(id: usize, mut w: TcpStream, mut r: TcpStream, stop: Arc<AtomicBool>) -> Direction {
    let written = Arc::new(AtomicU64::new(u64::MAX));
    let total = written.clone();
    let writer = std::thread::spawn(move || {
        let mut k = 0u64;
        let mut next = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            let chunk: Vec<u8> = (0..CHUNK as u64).map(|i| pattern(id, k + i)).collect();
            w.write_all(&chunk).unwrap();
            k += CHUNK as u64;
            next += Duration::from_millis(10);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        total.store(k, Ordering::SeqCst);
        k
    });
    let target = written.clone();
    let reader = std::thread::spawn(move || {
        r.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut k = 0u64;
        let mut buf = vec![0u8; 65536];
        let mut quiet_since = Instant::now();
        loop {
            let want = target.load(Ordering::SeqCst);
            if k == want {
                return Ok(k);
            }
            if quiet_since.elapsed() > Duration::from_secs(10) {
                return Err(format!("stream {id}: {k} bytes then nothing (wanted {want})"));
            }
            match r.read(&mut buf) {
                // The other direction ended first and closed its socket:
                // fine once everything written has arrived (the writer may
                // publish its total just after).
                Ok(0) => {
                    std::thread::sleep(Duration::from_millis(300));
                    if k == target.load(Ordering::SeqCst) {
                        return Ok(k);
                    }
                    return Err(format!(
                        "stream {id}: closed after {k} bytes (wanted {})",
                        target.load(Ordering::SeqCst)
                    ));
                }
                Ok(n) => {
                    for (i, b) in buf[..n].iter().enumerate() {
                        if *b != pattern(id, k + i as u64) {
                            return Err(format!("stream {id}: byte {} out of order", k + i as u64));
                        }
                    }
                    k += n as u64;
                    quiet_since = Instant::now();
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(format!("stream {id}: {e} after {k} bytes")),
            }
        }
    });
    Direction {
        writer,
        reader,
        written,
    }
}

/// When each of a call's packets arrived at the peer, by sequence number.
type Arrivals = Vec<(u32, Instant)>;

/// Media from every UDP and TCP call: `[call id u16][seq u32]` every
/// 20 ms; the peer notes when each arrived.
struct Media {
    sender: JoinHandle<(Vec<Call>, u32)>,
    receiver: JoinHandle<(Vec<Arrivals>, UdpSocket)>,
}

/// A call: its client, its relayed address, and how it sends (channel
/// 0x4000, or Send indications to the peer).
struct Call {
    c: TurnClient,
    relayed: SocketAddr,
    channel: bool,
}

fn media(mut calls: Vec<Call>, peer: UdpSocket, stop: Arc<AtomicBool>) -> Media {
    let peer_addr = peer.local_addr().unwrap();
    let n = calls.len();
    let receiver = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            peer.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let mut got = vec![Vec::new(); n];
            let mut buf = [0u8; 64];
            let mut quiet = 0;
            // Until stopped and the last packets are in.
            while !stop.load(Ordering::SeqCst) || quiet < 3 {
                match peer.recv_from(&mut buf) {
                    Ok((6, _)) => {
                        quiet = 0;
                        let id = u16::from_be_bytes([buf[0], buf[1]]) as usize;
                        let seq = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
                        if let Some(v) = got.get_mut(id) {
                            v.push((seq, Instant::now()));
                        }
                    }
                    Ok(_) => {}
                    Err(_) => quiet += 1,
                }
            }
            (got, peer)
        })
    };
    let sender = std::thread::spawn(move || {
        let mut seq = 0u32;
        let mut next = Instant::now();
        while !stop.load(Ordering::SeqCst) {
            for (i, call) in calls.iter_mut().enumerate() {
                let mut p = (i as u16).to_be_bytes().to_vec();
                p.extend_from_slice(&seq.to_be_bytes());
                if call.channel {
                    call.c.send_channel(0x4000, &p).unwrap();
                } else {
                    call.c.send_indication(peer_addr, &p).unwrap();
                }
            }
            seq += 1;
            next += INTERVAL;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        (calls, seq)
    });
    Media { sender, receiver }
}

/// Everything a node carries in this test, running.
struct Load {
    stop: Arc<AtomicBool>,
    media: Media,
    streams: Vec<(Direction, Direction)>,
    /// RFC 6062 control connections (they refresh afterwards).
    tcp_controls: Vec<TurnClient>,
    tls: Vec<(TurnClient, SocketAddr)>,
}

/// What the load saw: media sent and lost, the longest silence of any
/// call, stream bytes each way (all checked in order).
struct Seen {
    sent: usize,
    lost: usize,
    longest: Duration,
    stream_bytes: u64,
    calls: Vec<Call>,
    peer: UdpSocket,
}

impl Seen {
    /// Media lost at most 0.1%, no call silent for long; every stream's
    /// bytes arrived in order (checked as they came).
    fn check(&self) {
        assert!(
            self.lost * 1000 <= self.sent,
            "{} of {} lost",
            self.lost,
            self.sent
        );
        // How long the hand-over silences a call is measured in
        // BENCHMARKS.md (20-43 ms on an idle machine); a test on a busy
        // one only checks that it is no stall.
        assert!(
            self.longest <= Duration::from_secs(1),
            "a call was silent for {:?}",
            self.longest
        );
        assert!(self.stream_bytes > 0);
    }
}

impl Load {
    fn start(addr: SocketAddr, tls_addr: SocketAddr) -> Load {
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        // Room for a second of all calls' media: the test's own receiving
        // thread, not the server, must not be what loses packets when the
        // machine is busy with other tests.
        let _ = socket2::SockRef::from(&peer).set_recv_buffer_size(4 << 20);
        let peer_addr = peer.local_addr().unwrap();
        let mut calls = Vec::new();
        for i in 0..UDP_CALLS + TCP_CALLS {
            let t = if i < UDP_CALLS {
                ClientTransport::Udp
            } else {
                ClientTransport::Tcp
            };
            let mut c = client(addr, t);
            let relayed = c.allocate().unwrap().relayed;
            let channel = i % 2 == 0 || i >= UDP_CALLS;
            if channel {
                c.channel_bind(0x4000, peer_addr).unwrap();
            } else {
                c.create_permission(&[peer_addr]).unwrap();
            }
            calls.push(Call { c, relayed, channel });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let tcp_peer = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut streams = Vec::new();
        let mut tcp_controls = Vec::new();
        for id in 0..STREAMS {
            let mut c = client(addr, ClientTransport::Tcp);
            c.set_tcp_relay(true);
            c.allocate().unwrap();
            let conn = c.connect(tcp_peer.local_addr().unwrap()).unwrap();
            let (at_peer, _) = tcp_peer.accept().unwrap();
            let data = c.connection_bind(&ClientTransport::Tcp, addr, conn).unwrap();
            let StdSocket::Tcp(at_client, rest) = data.into_std().unwrap() else {
                panic!("a TCP data connection")
            };
            assert!(rest.is_empty());
            let up = direction(
                id,
                at_client.try_clone().unwrap(),
                at_peer.try_clone().unwrap(),
                stop.clone(),
            );
            let down = direction(id + 100, at_peer, at_client, stop.clone());
            streams.push((up, down));
            tcp_controls.push(c);
        }
        let tls = (0..2)
            .map(|_| {
                let mut c = client(tls_addr, ClientTransport::Tls { pinned: None });
                let relayed = c.allocate().unwrap().relayed;
                c.channel_bind(0x4000, peer_addr).unwrap();
                (c, relayed)
            })
            .collect();
        Load {
            media: media(calls, peer, stop.clone()),
            stop,
            streams,
            tcp_controls,
            tls,
        }
    }

    fn stop(self) -> (Seen, Vec<TurnClient>, Vec<(TurnClient, SocketAddr)>) {
        self.stop.store(true, Ordering::SeqCst);
        let (calls, seq) = self.media.sender.join().unwrap();
        let (got, peer) = self.media.receiver.join().unwrap();
        let mut lost = 0;
        let mut longest = Duration::ZERO;
        for mut v in got {
            v.sort_by_key(|(s, _)| *s);
            v.dedup_by_key(|(s, _)| *s);
            lost += seq as usize - v.len();
            for w in v.windows(2) {
                longest = longest.max(w[1].1.saturating_duration_since(w[0].1));
            }
        }
        let mut stream_bytes = 0;
        for (up, down) in self.streams {
            for d in [up, down] {
                let wrote = d.writer.join().unwrap();
                assert_eq!(d.written.load(Ordering::SeqCst), wrote);
                stream_bytes += d.reader.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
            }
        }
        (
            Seen {
                sent: seq as usize * calls.len(),
                lost,
                longest,
                stream_bytes,
                calls,
                peer,
            },
            self.tcp_controls,
            self.tls,
        )
    }
}

/// A scratch directory removed on drop, a failing test's too (it holds a
/// copy of the binary: 200 MB a run left behind).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The installed binary (a copy of the test binary the server is started
/// from) in `dir`, and the configuration with TLS, admin and metrics.
fn installed(dir: &Path) -> (PathBuf, PathBuf, SocketAddr, SocketAddr, &'static str) {
    let exe = dir.join("turnpike");
    std::fs::copy(crate::common::turnpike_bin(), &exe).unwrap();
    let cfg = config(dir, 2);
    let (admin, metrics) = (crate::common::free_port(), crate::common::free_port());
    let token = "upgrade-load-token-0123456789";
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("no-tls = true\n", "tls-listen = [\"127.0.0.1:0\"]\n")
        + &format!(
            "admin-listen = \"127.0.0.1:{admin}\"\nadmin-token = \"{token}\"\nmetrics-listen = \"127.0.0.1:{metrics}\"\n\
             rate-limit-per-ip = 0\n"
        );
    std::fs::write(&cfg, text).unwrap();
    (
        exe,
        cfg,
        format!("127.0.0.1:{admin}").parse().unwrap(),
        format!("127.0.0.1:{metrics}").parse().unwrap(),
        token,
    )
}

fn get(addr: SocketAddr, path: &str, token: &str) -> String {
    let (code, body) =
        crate::common::http_request(addr, "GET", path, Some(token).filter(|t| !t.is_empty())).unwrap();
    assert_eq!(code, 200, "{path}: {body}");
    body
}

/// The admin API's sessions as `user transport client relayed`, sorted.
pub(super) fn sessions(admin: SocketAddr, token: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&get(admin, "/api/sessions", token)).unwrap();
    let mut list: Vec<String> = v["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {}",
                s["user"], s["transport"], s["client"], s["relayed"]
            )
        })
        .collect();
    list.sort();
    list
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn wait_gone(pid: u32, within: Duration) -> bool {
    let end = Instant::now() + within;
    while alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
    !alive(pid)
}

#[test]
fn under_full_load_an_upgrade_to_another_build_keeps_every_call() {
    let scratch_dir = Scratch(scratch("load"));
    let dir = scratch_dir.0.clone();
    let (exe, cfg, admin, metrics, token) = installed(&dir);
    let (server, err, addr, mut seen) = start_with(std::process::Command::new(&exe), &cfg);
    let old_pid = server.0.as_ref().unwrap().id();
    let load = Load::start(addr, tls_listen(&seen));
    std::thread::sleep(Duration::from_millis(1500));
    let before = sessions(admin, token);
    assert_eq!(before.len(), UDP_CALLS + TCP_CALLS + STREAMS + 2);
    let scraped = get(metrics, "/metrics", "");
    let relayed_before = metric(&scraped, "turnpike_relayed_packets_total");
    let tcp_before = metric(&scraped, "turnpike_tcp_relayed_bytes_total");
    assert!(tcp_before > 0.0);
    let build_before = metric(&scraped, "turnpike_build_info");
    assert_eq!(build_before, 1.0);

    // A package upgrade: the new build is renamed over the installed one.
    let next = dir.join("turnpike.dpkg-new");
    another_build(&exe, &next);
    std::fs::rename(&next, &exe).unwrap();
    signal(old_pid, libc::SIGUSR2);
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    eprintln!("{done}");
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    assert_ne!(
        field(&done, "new_version"),
        field(&done, "old_version"),
        "another build: {done}"
    );
    for (kind, n) in [
        ("udp_allocations", UDP_CALLS),
        ("tcp_allocations", TCP_CALLS),
        ("rfc6062_allocations", STREAMS),
        ("peer_connections", STREAMS),
        // Control connections of the TCP calls and the RFC 6062
        // allocations, and the RFC 6062 data connections.
        ("tcp_connections", TCP_CALLS + 2 * STREAMS),
        ("allocations_stayed", 2),
    ] {
        assert_eq!(field(&done, kind), n.to_string(), "{kind}: {done}");
    }
    std::thread::sleep(Duration::from_millis(1500));
    let (mut seen_load, mut tcp_controls, mut tls) = load.stop();
    eprintln!(
        "upgrade under load: {} media packets, {} lost, longest silence {:?}; {} stream bytes in order",
        seen_load.sent, seen_load.lost, seen_load.longest, seen_load.stream_bytes
    );
    seen_load.check();

    // The new process: the same sessions but the TLS ones (they stay with
    // the old process), counters that continued, its own build.
    std::thread::sleep(Duration::from_millis(1200));
    let after = sessions(admin, token);
    let moved: Vec<String> = before
        .iter()
        .filter(|s| !s.contains("\"tls\""))
        .cloned()
        .collect();
    assert_eq!(after, moved);
    let scraped = get(metrics, "/metrics", "");
    assert!(metric(&scraped, "turnpike_relayed_packets_total") >= relayed_before);
    assert!(metric(&scraped, "turnpike_tcp_relayed_bytes_total") >= tcp_before);
    assert_eq!(metric(&scraped, "turnpike_upgrades_total{outcome=\"ok\"}"), 1.0);
    let build_line = scraped
        .lines()
        .find(|l| l.starts_with("turnpike_build_info"))
        .unwrap()
        .to_owned();
    assert!(
        field(&done, "new_version").ends_with(
            build_line
                .split("build=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        ),
        "{build_line} is the new build's"
    );
    // Every allocation refreshes with the new process, and relays both
    // ways.
    for call in seen_load.calls.iter_mut() {
        call.c.refresh(600).unwrap();
        seen_load.peer.send_to(b"back", call.relayed).unwrap();
        match call.c.recv(Duration::from_secs(2)).unwrap() {
            Received::Channel { data, .. } | Received::Data { data, .. } => {
                assert_eq!(data, b"back")
            }
            other => panic!("{other:?}"),
        }
    }
    for c in tcp_controls.iter_mut() {
        c.refresh(600).unwrap();
    }
    // The TLS calls stayed with the old process, which relays for them
    // until they end; then it exits.
    assert!(alive(old_pid));
    for (c, relayed) in tls.iter_mut() {
        seen_load.peer.send_to(b"tls", *relayed).unwrap();
        match c.recv(Duration::from_secs(2)).unwrap() {
            Received::Channel { data, .. } => assert_eq!(data, b"tls"),
            other => panic!("{other:?}"),
        }
        c.refresh(0).unwrap();
    }
    drop(tls);
    assert!(
        wait_gone(old_pid, Duration::from_secs(10)),
        "the old process exits with its last call"
    );
    assert!(alive(new_pid));
    signal(new_pid, libc::SIGINT);
    drop(server);
    drop(scratch_dir);
}

#[test]
fn ten_upgrades_in_a_row_under_load_lose_nothing_and_leak_nothing() {
    let scratch_dir = Scratch(scratch("load10"));
    let dir = scratch_dir.0.clone();
    let (exe, cfg, _, _, _) = installed(&dir);
    let (server, err, addr, mut seen) = start_with(std::process::Command::new(&exe), &cfg);
    let mut pid = server.0.as_ref().unwrap().id();
    let mut load = Load::start(addr, tls_listen(&seen));
    let mut tls = std::mem::take(&mut load.tls);
    std::thread::sleep(Duration::from_millis(500));
    let mut rss = Vec::new();
    let mut held = Vec::new();
    for round in 0..10 {
        signal(pid, libc::SIGUSR2);
        let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
        assert_eq!(
            field(&done, "allocations_moved"),
            (UDP_CALLS + TCP_CALLS + STREAMS).to_string(),
            "round {round}: {done}"
        );
        let old = pid;
        pid = field(&done, "new_pid").parse().unwrap();
        if round == 0 {
            // The TLS calls stay with the first process; they end now, so
            // it exits, and no later round has any to keep.
            for (c, _) in tls.iter_mut() {
                c.refresh(0).unwrap();
            }
            tls.clear();
        }
        std::thread::sleep(Duration::from_millis(700));
        rss.push(rss_kib(pid));
        held.push(fds(pid));
        assert!(
            wait_gone(old, Duration::from_secs(10)),
            "round {round}: the old process exits"
        );
    }
    let (seen_load, _, _) = load.stop();
    eprintln!(
        "ten upgrades under load: {} media packets, {} lost, longest silence {:?}; {} stream bytes in order; RSS KiB {rss:?}; descriptors {held:?}",
        seen_load.sent, seen_load.lost, seen_load.longest, seen_load.stream_bytes
    );
    seen_load.check();
    assert!(
        held[1..].windows(2).all(|w| w[0] == w[1]),
        "descriptors leak across upgrades: {held:?}"
    );
    let (lo, hi) = (rss[1..].iter().min().unwrap(), rss[1..].iter().max().unwrap());
    assert!(hi * 10 <= lo * 13, "RSS grows across upgrades: {rss:?}");
    signal(pid, libc::SIGINT);
    drop(server);
    drop(scratch_dir);
}
