//! The binary upgrade (SIGUSR2) with real processes and sockets: the new
//! process takes the UDP allocations while media flows and a plain TCP
//! control connection with its allocation, a TLS connection stays with the
//! old one until it closes, and a new binary that refuses (its
//! configuration changed to something it will not run) leaves the old one
//! serving.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use turnpike_client::client::{Channel, ClientTransport, Received, TurnClient};

use super::{bin, lines, listen_addr, wait_for, Server};

const CLIENTS: usize = 20;
/// Each client's packet interval (50 packets/s, an Opus call's).
const INTERVAL: Duration = Duration::from_millis(20);

pub(super) fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started (directly or as the
    // server's successor); no memory is involved.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid as i32, sig);
    }
}

/// The processes whose command line names `arg`.
pub(super) fn running_with(arg: &std::path::Path) -> Vec<u32> {
    let want = arg.to_str().unwrap();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid: &u32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|b| *b == 0).any(|a| a == want.as_bytes()))
                .unwrap_or(false)
                && alive(*pid)
        })
        .collect();
    pids.sort();
    pids
}

pub(super) fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// The value of `key=` in a log line.
pub(super) fn field(line: &str, key: &str) -> String {
    line.split(&format!("{key}="))
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("{key}= in {line}"))
        .trim_matches('"')
        .to_owned()
}

fn start(config: &std::path::Path) -> (Server, mpsc::Receiver<String>, SocketAddr, Vec<String>) {
    start_with(bin(), config)
}

/// `cmd` (the binary, with its environment) serving `config`, started.
pub(super) fn start_with(
    mut cmd: std::process::Command,
    config: &std::path::Path,
) -> (Server, mpsc::Receiver<String>, SocketAddr, Vec<String>) {
    let mut child = cmd
        .args(["serve", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    (Server(Some(child)), err, listen_addr(&started), seen)
}

/// The TLS listener the start-up line names.
pub(super) fn tls_listen(seen: &[String]) -> SocketAddr {
    seen.iter()
        .find_map(|l| l.split("tls_listen=[").nth(1))
        .and_then(|r| r.split([']', ',']).next())
        .and_then(|a| a.trim().parse().ok())
        .expect("tls_listen in the start-up line")
}

pub(super) fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("turnpike-upgrade-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub(super) fn config(dir: &std::path::Path, threads: usize) -> std::path::PathBuf {
    let path = dir.join("turnpike.toml");
    std::fs::write(
        &path,
        format!(
            "listen = [\"127.0.0.1:0\"]\nno-tls = true\nuser = [\"alice:wonderland1\"]\n\
             allow-loopback-peers = true\nthreads = {threads}\ndrain-timeout = \"20s\"\nlog-level = \"info\"\n"
        ),
    )
    .unwrap();
    path
}

/// [`config`] with a TLS listener (a generated certificate), and so
/// DTLS beside it.
fn config_with_tls(dir: &std::path::Path, threads: usize) -> std::path::PathBuf {
    let cfg = config(dir, threads);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("no-tls = true\n", "tls-listen = [\"127.0.0.1:0\"]\n"),
    )
    .unwrap();
    cfg
}

/// Appends `lines` to the configuration file `cfg`.
fn add_to(cfg: &std::path::Path, lines: &str) {
    let mut text = std::fs::read_to_string(cfg).unwrap();
    text.push_str(lines);
    std::fs::write(cfg, text).unwrap();
}

pub(super) fn client(server: SocketAddr, t: ClientTransport) -> TurnClient {
    let mut c = TurnClient::new(
        Channel::connect(&t, server, Duration::from_secs(3)).unwrap(),
        "alice",
        "wonderland1",
    );
    c.set_timeout(Duration::from_secs(2));
    c
}

#[test]
fn an_upgrade_moves_udp_and_tcp_calls_without_loss_and_tls_stays_until_it_closes() {
    let dir = scratch("moves");
    let cfg = config_with_tls(&dir, 2);
    let (server, err, addr, mut seen) = start(&cfg);
    let tls_addr = tls_listen(&seen);
    let old_pid = server.0.as_ref().unwrap().id();

    // The peer: one socket that counts what each client sent.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut clients: Vec<(TurnClient, SocketAddr)> = (0..CLIENTS)
        .map(|_| {
            let mut c = client(addr, ClientTransport::Udp);
            let relayed = c.allocate().unwrap().relayed;
            c.channel_bind(0x4000, peer_addr).unwrap();
            (c, relayed)
        })
        .collect();
    // A plain TCP control connection moves with its allocation; a TLS one
    // stays with the old process (its TLS state does not move).
    let mut tcp = client(addr, ClientTransport::Tcp);
    let tcp_relayed = tcp.allocate().unwrap().relayed;
    tcp.channel_bind(0x4001, peer_addr).unwrap();
    let mut tls = client(tls_addr, ClientTransport::Tls { pinned: None });
    let tls_relayed = tls.allocate().unwrap().relayed;
    tls.channel_bind(0x4002, peer_addr).unwrap();

    // Media from every client, paced, while the upgrade happens.
    let stop = Arc::new(AtomicBool::new(false));
    let counted = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut got: HashMap<u16, Vec<(u32, Instant)>> = HashMap::new();
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::SeqCst) {
                if let Ok((n, _)) = peer.recv_from(&mut buf) {
                    if n == 6 {
                        let id = u16::from_be_bytes([buf[0], buf[1]]);
                        let seq = u32::from_be_bytes([buf[2], buf[3], buf[4], buf[5]]);
                        got.entry(id).or_default().push((seq, Instant::now()));
                    }
                }
            }
            (got, peer)
        })
    };
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut seq = 0u32;
            let mut next = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                for (i, (c, _)) in clients.iter_mut().enumerate() {
                    let mut p = (i as u16).to_be_bytes().to_vec();
                    p.extend_from_slice(&seq.to_be_bytes());
                    c.send_channel(0x4000, &p).unwrap();
                }
                seq += 1;
                next += INTERVAL;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            (clients, seq)
        })
    };
    // Half a ChannelData frame on the TCP connection before the upgrade:
    // the old process has read it and holds it, the rest comes after.
    let frame = [&[0x40, 0x01, 0x00, 0x08][..], b"split-me"].concat();
    tcp.channel().send(&frame[..6]).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    signal(old_pid, libc::SIGUSR2);
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    assert_eq!(
        field(&done, "allocations_moved"),
        (CLIENTS + 1).to_string(),
        "{done}"
    );
    eprintln!("{done}");
    std::thread::sleep(Duration::from_millis(1200));
    stop.store(true, Ordering::SeqCst);
    let (mut clients, sent) = sender.join().unwrap();
    let (got, peer) = counted.join().unwrap();

    // Every packet of every client arrived (loopback: nothing may be lost
    // to the hand-over), and the longest silence is reported.
    let mut lost = 0;
    let mut longest = Duration::ZERO;
    for id in 0..CLIENTS as u16 {
        let mut v = got.get(&id).cloned().unwrap_or_default();
        v.sort_by_key(|(s, _)| *s);
        v.dedup_by_key(|(s, _)| *s);
        lost += sent as usize - v.len();
        for w in v.windows(2) {
            longest = longest.max(w[1].1.saturating_duration_since(w[0].1));
        }
    }
    eprintln!(
        "upgrade under load: {} packets sent, {lost} lost, longest gap {longest:?}",
        sent as usize * CLIENTS
    );
    assert!(
        lost * 1000 <= sent as usize * CLIENTS,
        "{lost} of {} lost",
        sent as usize * CLIENTS
    );

    // The new process serves them: a Refresh with the nonce the old one
    // gave, and the peer's answer back through each channel.
    for (c, relayed) in clients.iter_mut() {
        c.refresh(600).unwrap();
        peer.send_to(b"back", *relayed).unwrap();
        match c.recv(Duration::from_secs(2)).unwrap() {
            Received::Channel {
                channel: 0x4000,
                data,
            } => assert_eq!(data, b"back"),
            other => panic!("{other:?}"),
        }
    }
    // The TCP connection was handed over with its allocation and the
    // half frame it had sent: with the rest, the peer gets it whole.
    tcp.channel().send(&frame[6..]).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while got.is_empty() {
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        if n == 8 {
            got = buf[..n].to_vec();
        }
    }
    assert_eq!(got, b"split-me");
    // The new process relays for it and refreshes it.
    peer.send_to(b"tcp", tcp_relayed).unwrap();
    match tcp.recv(Duration::from_secs(2)).unwrap() {
        Received::Channel {
            channel: 0x4001,
            data,
        } => assert_eq!(data, b"tcp"),
        other => panic!("{other:?}"),
    }
    tcp.refresh(600).unwrap();
    // The TLS allocation stays with the old process, which still relays
    // for it, and leaves when it ends.
    assert!(alive(old_pid), "the old process serves its TLS connection");
    peer.send_to(b"tls", tls_relayed).unwrap();
    match tls.recv(Duration::from_secs(2)).unwrap() {
        Received::Channel {
            channel: 0x4002,
            data,
        } => assert_eq!(data, b"tls"),
        other => panic!("{other:?}"),
    }
    tls.refresh(0).unwrap();
    drop(tls);
    let gone = Instant::now() + Duration::from_secs(10);
    while alive(old_pid) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(old_pid),
        "the old process exits once its last allocation ends"
    );
    assert!(alive(new_pid));
    // The TCP connection lives on in the new process; fresh clients on the
    // same addresses reach it too.
    tcp.refresh(600).unwrap();
    let mut fresh = client(addr, ClientTransport::Udp);
    fresh.allocate().unwrap();
    let mut fresh = client(tls_addr, ClientTransport::Tls { pinned: None });
    fresh.allocate().unwrap();
    signal(new_pid, libc::SIGINT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_binary_that_refuses_leaves_the_old_one_serving() {
    let dir = scratch("refuses");
    let cfg = config(&dir, 2);
    let (server, err, addr, mut seen) = start(&cfg);
    let pid = server.0.as_ref().unwrap().id();
    let mut c = client(addr, ClientTransport::Udp);
    c.allocate().unwrap();

    // A configuration the new binary will not run: it says so, and the
    // old process serves on.
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("threads = 2", "threads = 0")).unwrap();
    signal(pid, libc::SIGUSR2);
    let failed = wait_for(&err, "upgrade failed", &mut seen);
    assert!(failed.contains("threads"), "{failed}");
    c.refresh(600).unwrap();

    // Another listen address: the new process cannot take the sockets
    // over, says so, and the old one serves on.
    std::fs::write(&cfg, text.replace("127.0.0.1:0", "127.0.0.2:0")).unwrap();
    signal(pid, libc::SIGUSR2);
    let failed = wait_for(&err, "upgrade failed", &mut seen);
    assert!(failed.contains("listen changed"), "{failed}");
    c.refresh(600).unwrap();

    // Another thread count: refused by the old process, which serves on.
    std::fs::write(&cfg, text.replace("threads = 2", "threads = 1")).unwrap();
    signal(pid, libc::SIGUSR2);
    let failed = wait_for(&err, "upgrade failed", &mut seen);
    assert!(failed.contains("keep threads the same"), "{failed}");
    c.refresh(600).unwrap();
    assert!(alive(pid));
    // Nothing else serves the port: no successor was left running.
    assert_eq!(running_with(&cfg), vec![pid], "only the old process runs");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Descriptors a process holds.
pub(super) fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn ten_upgrades_in_a_row_keep_every_call_and_leak_no_descriptor() {
    let dir = scratch("ten");
    let cfg = config(&dir, 2);
    let (server, err, addr, mut seen) = start(&cfg);
    let mut pid = server.0.as_ref().unwrap().id();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut calls: Vec<(TurnClient, SocketAddr)> = (0..10)
        .map(|_| {
            let mut c = client(addr, ClientTransport::Udp);
            let relayed = c.allocate().unwrap().relayed;
            c.channel_bind(0x4000, peer_addr).unwrap();
            (c, relayed)
        })
        .collect();
    let mut held = Vec::new();
    for round in 0..10 {
        signal(pid, libc::SIGUSR2);
        let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
        assert_eq!(field(&done, "allocations_moved"), "10", "round {round}: {done}");
        let old = pid;
        pid = field(&done, "new_pid").parse().unwrap();
        let gone = Instant::now() + Duration::from_secs(10);
        while alive(old) && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !alive(old),
            "round {round}: the old process exits (nothing stayed with it)"
        );
        // Every call still relays both ways and refreshes on the new one.
        for (i, (c, relayed)) in calls.iter_mut().enumerate() {
            c.send_channel(0x4000, &[round as u8, i as u8]).unwrap();
            let mut buf = [0u8; 8];
            let (n, _) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[round as u8, i as u8]);
            peer.send_to(b"ok", *relayed).unwrap();
            assert!(matches!(
                c.recv(Duration::from_secs(2)).unwrap(),
                Received::Channel { .. }
            ));
            c.refresh(600).unwrap();
        }
        held.push(fds(pid));
    }
    eprintln!("descriptors held after each upgrade: {held:?}");
    assert!(
        held.windows(2).all(|w| w[0] == w[1]),
        "descriptors leak across upgrades: {held:?}"
    );
    assert_eq!(running_with(&cfg), vec![pid], "one server runs");
    signal(pid, libc::SIGINT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn under_systemd_the_new_process_names_itself_the_main_one() {
    use std::os::unix::net::UnixDatagram;
    let dir = scratch("notify");
    let cfg = config(&dir, 2);
    let socket = dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&socket).unwrap();
    systemd.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // As systemd starts a Type=notify unit: $NOTIFY_SOCKET, $INVOCATION_ID.
    let mut cmd = bin();
    cmd.env("NOTIFY_SOCKET", &socket)
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
    let (server, err, _, mut seen) = start_with(cmd, &cfg);
    let pid = server.0.as_ref().unwrap().id();
    let mut buf = [0u8; 256];
    let n = systemd.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1", "ready once every listener is bound");
    signal(pid, libc::SIGUSR2);
    let n = systemd.recv(&mut buf).unwrap();
    let said = String::from_utf8_lossy(&buf[..n]).into_owned();
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    assert_eq!(said, format!("MAINPID={new_pid}\nREADY=1"));
    signal(new_pid, libc::SIGINT);
    drop(server);

    // A unit without Type=notify (no $NOTIFY_SOCKET): systemd would stop
    // the new process with the old, so the upgrade is refused.
    let mut cmd = bin();
    cmd.env_remove("NOTIFY_SOCKET")
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef");
    let (server, err, _, mut seen) = start_with(cmd, &cfg);
    let pid = server.0.as_ref().unwrap().id();
    signal(pid, libc::SIGUSR2);
    let failed = wait_for(&err, "upgrade failed", &mut seen);
    assert!(failed.contains("Type=notify"), "{failed}");
    assert!(alive(pid));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_replaced_process_leaves_the_fleet_registry_to_its_successor() {
    let redis = crate::common::redis_server();
    let dir = scratch("fleet");
    let cfg = config_with_tls(&dir, 2);
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text.push_str(&format!(
        "redis-url = \"redis://127.0.0.1:{}/0\"\nnode-name = \"upgraded\"\n",
        redis.1
    ));
    std::fs::write(&cfg, text).unwrap();
    let (server, err, addr, mut seen) = start(&cfg);
    let pid = server.0.as_ref().unwrap().id();
    let mut udp = client(addr, ClientTransport::Udp);
    udp.allocate().unwrap();
    // A TLS allocation keeps the old process draining after the upgrade.
    let mut tcp = client(tls_listen(&seen), ClientTransport::Tls { pinned: None });
    tcp.allocate().unwrap();
    signal(pid, libc::SIGUSR2);
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    assert!(alive(pid), "the old process drains its TLS allocation");
    // For three seconds (three heartbeats of each), the registry says
    // what the new process says: serving, not draining.
    let mut redis_conn = redis::Client::open(format!("redis://127.0.0.1:{}/0", redis.1))
        .unwrap()
        .get_connection()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(3);
    let mut reads = 0;
    while Instant::now() < until {
        let info: Option<String> = redis::cmd("GET")
            .arg("turnpike:node:upgraded")
            .query(&mut redis_conn)
            .unwrap();
        if let Some(info) = info {
            let v: serde_json::Value = serde_json::from_str(&info).unwrap();
            assert_eq!(
                v["draining"], false,
                "the draining old process wrote the registry: {info}"
            );
            reads += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        reads > 20,
        "the new process keeps its registry entry ({reads} reads)"
    );
    tcp.refresh(0).unwrap();
    drop(tcp);
    signal(new_pid, libc::SIGINT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GET with the admin token: the body.
fn get(addr: SocketAddr, path: &str, token: &str) -> String {
    let (_, text) = super::http(addr, "GET", path, token);
    text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in the scrape"))
}

#[test]
fn the_session_list_and_the_counters_continue_across_an_upgrade() {
    let dir = scratch("sessions");
    let cfg = config(&dir, 2);
    let (admin, metrics) = (crate::common::free_port(), crate::common::free_port());
    let token = "upgrade-test-token-0123456789";
    add_to(
        &cfg,
        &format!(
            "admin-listen = \"127.0.0.1:{admin}\"\nadmin-token = \"{token}\"\nmetrics-listen = \"127.0.0.1:{metrics}\"\n"
        ),
    );
    let (admin, metrics): (SocketAddr, SocketAddr) = (
        format!("127.0.0.1:{admin}").parse().unwrap(),
        format!("127.0.0.1:{metrics}").parse().unwrap(),
    );
    let (server, err, addr, mut seen) = start(&cfg);
    let pid = server.0.as_ref().unwrap().id();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut calls: Vec<TurnClient> = (0..6)
        .map(|_| {
            let mut c = client(addr, ClientTransport::Udp);
            c.allocate().unwrap();
            c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
            for _ in 0..5 {
                c.send_channel(0x4000, b"count me").unwrap();
            }
            c
        })
        .collect();
    // Workers publish once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let before = super::upgrade_load::sessions(admin, token);
    let scraped = get(metrics, "/metrics", "");
    let relayed_before = metric(&scraped, "turnpike_relayed_packets_total{direction=\"to_peer\"}");
    assert_eq!(before.len(), 6);
    // `turnpike upgrade` through the admin API: it answers with the
    // outcome once the new process serves.
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, token).unwrap();
    let out = bin()
        .args([
            "upgrade",
            "--admin",
            &admin.to_string(),
            "--token-file",
            token_file.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?} {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(said["upgraded"], true, "{said}");
    assert_eq!(said["allocations_moved"], 6, "{said}");
    let new_pid = said["new_pid"].as_u64().unwrap() as u32;
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    assert_eq!(field(&done, "new_pid"), new_pid.to_string());
    let gone = Instant::now() + Duration::from_secs(10);
    while alive(pid) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in calls.iter_mut() {
        c.send_channel(0x4000, b"and me").unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    // The new process answers on the same admin and metrics addresses,
    // lists the same allocations, and counts on from where the old left.
    assert_eq!(super::upgrade_load::sessions(admin, token), before);
    let scraped = get(metrics, "/metrics", "");
    let relayed_after = metric(&scraped, "turnpike_relayed_packets_total{direction=\"to_peer\"}");
    assert!(
        relayed_after >= relayed_before + 6.0,
        "counters continue: {relayed_before} then {relayed_after}"
    );
    signal(new_pid, libc::SIGINT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_missing_or_crashing_new_binary_leaves_the_old_one_serving() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("crash");
    let cfg = config(&dir, 2);
    // The server runs from its own copy of the binary, as from
    // /usr/bin/turnpike: what is at that path when SIGUSR2 comes is what
    // starts.
    let exe = dir.join("turnpike");
    std::fs::copy(crate::common::turnpike_bin(), &exe).unwrap();
    let (server, err, addr, mut seen) = start_with(std::process::Command::new(&exe), &cfg);
    let pid = server.0.as_ref().unwrap().id();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut c = client(addr, ClientTransport::Udp);
    let relayed = c.allocate().unwrap().relayed;
    c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
    let still_serving = |c: &mut TurnClient| {
        c.refresh(600).unwrap();
        peer.send_to(b"still", relayed).unwrap();
        assert!(matches!(
            c.recv(Duration::from_secs(2)).unwrap(),
            Received::Channel { .. }
        ));
    };

    // No binary at the path (an uninstall half-way).
    std::fs::remove_file(&exe).unwrap();
    signal(pid, libc::SIGUSR2);
    let failed = wait_for(&err, "upgrade failed", &mut seen);
    assert!(failed.contains("cannot start"), "{failed}");
    still_serving(&mut c);

    // A binary that dies before it is ready (it crashes at start).
    std::fs::write(&exe, "#!/bin/sh\nkill -9 $$\n").unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    signal(pid, libc::SIGUSR2);
    let failed = wait_for(&err, "upgrade failed", &mut seen);
    assert!(failed.contains("closed the hand-over socket"), "{failed}");
    still_serving(&mut c);
    assert!(alive(pid));
    assert_eq!(running_with(&cfg), vec![pid], "no successor left running");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_new_process_that_dies_at_any_step_or_cannot_read_the_snapshot_leaves_the_old_one_serving_its_calls() {
    for (step, says) in [
        ("after-ready", "hand-over socket"),
        ("after-handover", "hand-over socket"),
        ("before-serving", "hand-over socket"),
        // A snapshot it cannot read: it refuses, and says why.
        ("future-snapshot", "this build reads formats 1 to"),
    ] {
        let dir = scratch(step);
        let cfg = config(&dir, 2);
        // The failpoint is inherited by the new process, which dies there.
        let mut cmd = bin();
        cmd.env("TURNPIKE_UPGRADE_FAILPOINT", step);
        let (server, err, addr, mut seen) = start_with(cmd, &cfg);
        let pid = server.0.as_ref().unwrap().id();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut calls: Vec<(TurnClient, SocketAddr)> = (0..3)
            .map(|_| {
                let mut c = client(addr, ClientTransport::Udp);
                let relayed = c.allocate().unwrap().relayed;
                c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
                (c, relayed)
            })
            .collect();
        let mut tcp = client(addr, ClientTransport::Tcp);
        tcp.allocate().unwrap();
        signal(pid, libc::SIGUSR2);
        let failed = wait_for(&err, "upgrade failed", &mut seen);
        assert!(failed.contains(says), "{step}: {failed}");
        // Every call is served by the old process as before: refreshed,
        // relayed both ways; the TCP one too.
        for (c, relayed) in calls.iter_mut() {
            c.refresh(600).unwrap();
            c.send_channel(0x4000, b"out").unwrap();
            let mut buf = [0u8; 8];
            let (n, _) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"out", "{step}");
            peer.send_to(b"in", *relayed).unwrap();
            assert!(
                matches!(c.recv(Duration::from_secs(2)).unwrap(), Received::Channel { .. }),
                "{step}"
            );
        }
        tcp.refresh(600).unwrap();
        assert!(alive(pid), "{step}");
        assert_eq!(running_with(&cfg), vec![pid], "{step}: no successor left running");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A source the brute-force guard blocked stays blocked in the new
/// process (the guard's tables are handed over); others are unaffected.
#[test]
fn a_blocked_guesser_stays_blocked_across_an_upgrade() {
    let dir = scratch("guard");
    let cfg = config(&dir, 1);
    add_to(&cfg, "auth-fail-limit = 4\n");
    let (server, err, addr, mut seen) = start(&cfg);
    // Past half the limit one attempt a second is checked: spaced out.
    for _ in 0..4 {
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
            "alice",
            "a guess",
        );
        c.set_timeout(Duration::from_millis(1500));
        assert!(matches!(
            c.allocate(),
            Err(turnpike_client::client::ClientError::Error { code: 401, .. })
        ));
        std::thread::sleep(Duration::from_millis(1050));
    }
    signal(server.0.as_ref().unwrap().id(), libc::SIGUSR2);
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    // The right password from the blocked source: not answered.
    let mut right_here = client(addr, ClientTransport::Udp);
    right_here.set_timeout(Duration::from_millis(1500));
    assert!(
        matches!(
            right_here.allocate(),
            Err(turnpike_client::client::ClientError::Timeout)
        ),
        "the block went on in the new process"
    );
    // From another source: served.
    let ch = Channel::connect_from(
        &ClientTransport::Udp,
        addr,
        Some("127.0.0.3".parse().unwrap()),
        Duration::from_secs(3),
    )
    .unwrap();
    TurnClient::new(ch, "alice", "wonderland1").allocate().unwrap();
    signal(new_pid, libc::SIGINT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A mobility ticket the old process gave out moves the allocation in the
/// new one (the ticket key is the nonce secret's, which moves; the move
/// count is in the snapshot).
#[test]
fn a_mobility_ticket_from_before_an_upgrade_moves_the_allocation_after() {
    let dir = scratch("mobility");
    let cfg = config(&dir, 2);
    add_to(&cfg, "mobility = true\n");
    let (server, err, addr, mut seen) = start(&cfg);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut c = client(addr, ClientTransport::Udp);
    c.set_mobility(true);
    let relayed = c.allocate().unwrap().relayed;
    c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
    signal(server.0.as_ref().unwrap().id(), libc::SIGUSR2);
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    // Wi-Fi to cellular, after the upgrade: the old ticket moves it.
    let moved = Channel::connect_from(
        &ClientTransport::Udp,
        addr,
        Some("127.0.0.3".parse().unwrap()),
        Duration::from_secs(2),
    )
    .unwrap();
    c.move_to(moved).unwrap();
    c.send_channel(0x4000, b"moved").unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"moved"[..], relayed));
    peer.send_to(b"back", relayed).unwrap();
    assert!(matches!(
        c.recv(Duration::from_secs(2)).unwrap(),
        Received::Channel { channel: 0x4000, .. }
    ));
    signal(new_pid, libc::SIGINT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Session events across a binary upgrade: the allocation the old process
/// started is the one the new process reports and ends (one id, one start,
/// one end whose bytes count both processes' relaying), and no record or
/// delivery id of the new process repeats one of the old's.
#[test]
fn usage_records_continue_across_an_upgrade_under_the_same_allocation_id() {
    let dir = scratch("events");
    let cfg = config(&dir, 1);
    let events = dir.join("events.jsonl");
    add_to(
        &cfg,
        &format!(
            "events-file = \"{}\"\nevents-interim = \"1s\"\n",
            events.display()
        ),
    );
    let (server, err, addr, mut seen) = start(&cfg);
    let pid = server.0.as_ref().unwrap().id();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut c = client(addr, ClientTransport::Udp);
    let relayed = c.allocate().unwrap().relayed;
    c.channel_bind(0x4000, peer_addr).unwrap();
    let mut relay = |n: usize| {
        for i in 0..n {
            c.send_channel(0x4000, &[i as u8; 100]).unwrap();
            let mut buf = [0u8; 200];
            assert_eq!(peer.recv_from(&mut buf).unwrap().0, 100);
            peer.send_to(&[1u8; 50], relayed).unwrap();
            assert!(matches!(
                c.recv(Duration::from_secs(2)).unwrap(),
                Received::Channel { .. }
            ));
        }
    };
    relay(30);
    // An interim report from the old process.
    std::thread::sleep(Duration::from_millis(1500));
    signal(pid, libc::SIGUSR2);
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    assert_eq!(field(&done, "allocations_moved"), "1", "{done}");
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    relay(20);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(c.refresh(0).unwrap(), 0);
    // The new process writes the end (and flushes at exit).
    signal(new_pid, libc::SIGINT);
    let gone = Instant::now() + Duration::from_secs(10);
    while (alive(new_pid) || alive(pid)) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(server);
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |t: &str| records.iter().filter(|r| r["type"] == t).collect::<Vec<_>>();
    let (starts, ends, interims) = (
        of("allocation.start"),
        of("allocation.end"),
        of("allocation.interim"),
    );
    assert_eq!(starts.len(), 1, "{records:#?}");
    assert_eq!(ends.len(), 1, "one end, from the new process: {records:#?}");
    let id = &starts[0]["allocation"];
    assert_eq!(&ends[0]["allocation"], id, "the same allocation id");
    let started = ends[0]["started_ms"].as_u64().unwrap();
    assert!(
        starts[0]["time_ms"].as_u64().unwrap().abs_diff(started) < 1000,
        "{:#}",
        ends[0]
    );
    assert_eq!(ends[0]["user"], "alice");
    assert_eq!(ends[0]["reason"], "deleted");
    assert_eq!(
        ends[0]["bytes_to_peers"].as_u64(),
        Some(50 * 100),
        "{:#}",
        ends[0]
    );
    assert_eq!(
        ends[0]["bytes_from_peers"].as_u64(),
        Some(50 * 50),
        "{:#}",
        ends[0]
    );
    // Interim reports from both processes, all under the one id.
    assert!(interims.iter().all(|i| &i["allocation"] == id), "{interims:#?}");
    let reported: Vec<u64> = interims
        .iter()
        .filter_map(|i| i["bytes_to_peers"].as_u64())
        .collect();
    assert!(
        reported.contains(&3000) && reported.contains(&5000),
        "{reported:?}"
    );
    // Record ids never repeat across the two processes.
    let mut ids: Vec<&str> = records.iter().map(|r| r["id"].as_str().unwrap()).collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(
        ids.len(),
        n,
        "a record id repeated across the upgrade: {records:#?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// DTLS calls across a binary upgrade: their sessions' keys stay in the
/// old process, which must keep receiving every one of their datagrams
/// although the new process binds the same DTLS port (SO_REUSEPORT); new
/// DTLS clients go to the new process.
#[test]
fn dtls_calls_stay_whole_with_the_old_process_and_new_ones_reach_the_new() {
    let dir = scratch("dtls");
    let cfg = config_with_tls(&dir, 2);
    let (server, err, _, mut seen) = start(&cfg);
    // DTLS beside TLS, on its port.
    let dtls = tls_listen(&seen);
    let old_pid = server.0.as_ref().unwrap().id();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let dtls_client = || client(dtls, ClientTransport::Dtls { pinned: None });
    let mut calls: Vec<(TurnClient, SocketAddr)> = (0..12)
        .map(|_| {
            let mut c = dtls_client();
            let relayed = c.allocate().unwrap().relayed;
            c.channel_bind(0x4000, peer_addr).unwrap();
            (c, relayed)
        })
        .collect();
    signal(old_pid, libc::SIGUSR2);
    let done = wait_for(&err, "upgrade: the new process serves", &mut seen);
    let new_pid: u32 = field(&done, "new_pid").parse().unwrap();
    // Every call, both ways, for a few rounds after the upgrade.
    let mut lost = Vec::new();
    for round in 0..5u8 {
        for (i, (c, relayed)) in calls.iter_mut().enumerate() {
            c.send_channel(0x4000, &[round, i as u8]).unwrap();
            let mut buf = [0u8; 16];
            match peer.recv_from(&mut buf) {
                Ok((n, _)) if buf[..n] == [round, i as u8] => {}
                other => {
                    lost.push(format!("round {round} call {i} to the peer: {other:?}"));
                    continue;
                }
            }
            peer.send_to(&[round, i as u8], *relayed).unwrap();
            if !matches!(c.recv(Duration::from_secs(1)), Ok(Received::Channel { .. })) {
                lost.push(format!("round {round} call {i} back from the peer"));
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(lost.is_empty(), "DTLS calls broke at the upgrade: {lost:#?}");
    // Each refreshes with the process that holds its session.
    for (c, _) in &mut calls {
        c.refresh(600).unwrap();
    }
    // A new DTLS client allocates (on the new process), and the old one
    // still runs for the calls it kept.
    let mut fresh = dtls_client();
    fresh.allocate().expect("a new DTLS client after the upgrade");
    assert!(alive(old_pid), "the old process keeps its DTLS calls");
    // They end: the old process leaves.
    for (c, _) in &mut calls {
        assert_eq!(c.refresh(0).unwrap(), 0);
    }
    let gone = Instant::now() + Duration::from_secs(10);
    while alive(old_pid) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        !alive(old_pid),
        "the old process exits when its last DTLS call ends"
    );
    signal(new_pid, libc::SIGINT);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
