//! Interop with Debian's coturn client tools (`apt-get install coturn`):
//! `turnutils_uclient` relays through turnpike to `turnutils_peer` with zero
//! loss in every mode, and `turnutils_stunclient` gets the reflexive address.
//! `.ci/run` installs coturn; without it these tests fail, by design.

use crate::common;

use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

fn tool(name: &str) -> String {
    let path = format!("/usr/bin/{name}");
    assert!(
        std::path::Path::new(&path).exists(),
        "{name} not found: install Debian's coturn package (apt-get install coturn), as .ci/run does"
    );
    path
}

struct Peer(Child, u16);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_peer(avoid: &[u16]) -> Peer {
    let port = loop {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // uclient relays each call's RTCP to the next port up.
        if !avoid.contains(&port) && port.checked_add(1).is_some_and(|next| !avoid.contains(&next)) {
            break port;
        }
    };
    let child = Command::new(tool("turnutils_peer"))
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    Peer(child, port)
}

/// Runs uclient with `flags`; returns (sent, received, lost) from its
/// summary, or its whole output when it printed none.
fn uclient(flags: &[&str], port: u16, peer_port: u16) -> Result<(u64, u64, u64, String), String> {
    let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    args.extend(
        [
            "-u",
            USER,
            "-w",
            PASSWORD,
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            "40",
            "-m",
            "2",
            "-l",
            "171",
            "-p",
            &port.to_string(),
            "127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    let out = Command::new("timeout")
        .arg("60")
        .arg(tool("turnutils_uclient"))
        .args(&args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let mut sent = None;
    let mut recv = None;
    let mut lost = None;
    for line in text.lines() {
        if let Some(rest) = line.split("start_mclient: tot_send_msgs=").nth(1) {
            if let Some((s, r)) = rest.split_once(", tot_recv_msgs=") {
                if let (Ok(s), Ok(r)) = (s.trim().parse(), r.trim().parse()) {
                    sent = Some(s);
                    recv = Some(r);
                }
            }
        }
        if let Some(rest) = line.split("Total lost packets ").nth(1) {
            lost = rest.split_whitespace().next().and_then(|v| v.parse().ok());
        }
    }
    match (sent, recv, lost) {
        (Some(s), Some(r), Some(l)) => Ok((s, r, l, text)),
        _ => Err(format!("uclient {flags:?}: no summary in its output:\n{text}")),
    }
}

/// `turnpike serve` as a user runs it, its log read line by line: the
/// refusals it explains are what a failed mode shows.
struct Served {
    _proc: Proc,
    port: u16,
    tls_port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Served {
    fn start(flags: &[&str]) -> Served {
        let (proc_, started, rest) = serve_binary(flags);
        let port = started_addr(&started, "listen").port();
        let tls_port = started_addr(&started, "tls_listen");
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for l in rest {
                sink.lock().unwrap().push(l);
            }
        });
        Served {
            _proc: proc_,
            port,
            tls_port: tls_port.port(),
            log,
        }
    }

    /// The refusals the server logged, to name why a mode failed.
    fn refusals(&self) -> String {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|l| l.contains("refused") || l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[test]
fn uclient_relays_every_packet_in_every_mode() {
    // An IPv6 relay too, so -Z gets two relayed addresses.
    let v6: &[&str] = if std::net::UdpSocket::bind("[::1]:0").is_ok() {
        &["--relay-ip", "127.0.0.1", "--relay-ip", "::1"]
    } else {
        &[]
    };
    let mut flags = vec![
        "--allow-loopback-peers",
        "--rfc5766-channel-numbers",
        "--mobility",
    ];
    flags.extend_from_slice(v6);
    let h = Served::start(&flags);
    let (port, tls_port) = (h.port, h.tls_port);
    // The peer's ports must not be one of the server's own (its TLS port is
    // TCP only, so UDP may hand that number out, and uclient's RTCP goes to
    // the peer's port + 1): the server refuses relaying to its own
    // listeners whatever else is allowed.
    let peer = start_peer(&[port, tls_port]);
    let modes: Vec<(Vec<&str>, u16)> = vec![
        (vec![], port),               // UDP, channels
        (vec!["-s"], port),           // UDP, Send/Data indications
        (vec!["-t"], port),           // TCP, channels
        (vec!["-t", "-s"], port),     // TCP, Send/Data
        (vec!["-y"], port),           // UDP, client to client
        (vec!["-t", "-y"], port),     // TCP, client to client
        (vec!["-y", "-s"], port),     // UDP, client to client with Send
        (vec!["-S", "-t"], tls_port), // TLS
        (vec!["-Z", "-y"], port),     // dual allocations (RFC 8656 §7.2), client to client
        (vec!["-g", "-y"], port),     // DONT-FRAGMENT (RFC 8656 §14.8), client to client
        (vec!["-M"], port),           // RFC 8016 mobility tickets, channels
        (vec!["-M", "-y"], port),     // RFC 8016 mobility tickets, client to client
        (vec!["-T"], port),           // RFC 6062 TCP relay, client to client
        (vec!["-T", "-S"], tls_port), // RFC 6062 TCP relay over TLS
    ];
    // The modes run in parallel: each is a separate client, and the peer
    // echoes whatever reaches it.
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = modes
            .iter()
            .map(|(flags, p)| {
                let peer_port = peer.1;
                s.spawn(move || (flags.clone(), uclient(flags, *p, peer_port)))
            })
            .collect();
        handles.into_iter().map(|j| j.join().unwrap()).collect()
    });
    for (flags, outcome) in results {
        let (sent, recv, lost, text) = outcome.unwrap_or_else(|e| {
            panic!(
                "{e}\nthe server's refusals (peer port {}):\n{}",
                peer.1,
                h.refusals()
            )
        });
        assert!(sent > 0, "{flags:?} sent nothing:\n{text}");
        assert_eq!(sent, recv, "{flags:?}: sent {sent}, received {recv}:\n{text}");
        assert_eq!(lost, 0, "{flags:?}: lost {lost}:\n{text}");
    }
    // -P (RFC 6062 with the peer connecting in): uclient counts only the
    // passive side's messages as answered, so 40 of 80 come back, against
    // coturn 4.6.1 as against turnpike (measured with the same flags).
    let (sent, recv, lost, text) = uclient(&["-P"], port, peer.1)
        .unwrap_or_else(|e| panic!("{e}\nthe server's refusals:\n{}", h.refusals()));
    assert_eq!((sent, recv, lost), (80, 40, 40), "-P:\n{text}");
}

#[test]
fn stunclient_gets_the_reflexive_address() {
    let h = start(&[]);
    let out = Command::new("timeout")
        .arg("20")
        .arg(tool("turnutils_stunclient"))
        .args(["-p", &h.listen[0].port().to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("UDP reflexive addr:"))
        .unwrap_or_else(|| panic!("no reflexive address in:\n{text}"));
    let addr = line.rsplit("UDP reflexive addr: ").next().unwrap().trim();
    let addr: std::net::SocketAddr = addr
        .parse()
        .unwrap_or_else(|_| panic!("unparseable address {addr}"));
    assert_eq!(addr.ip().to_string(), "127.0.0.1");
    assert_ne!(addr.port(), 0);
    h.shutdown();
}
