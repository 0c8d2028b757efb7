//! RFC 5780 over real sockets with two loopback addresses (127.0.0.1 and
//! 127.0.0.2): each CHANGE-REQUEST combination is answered from the right
//! source, and `turnpike probe nat` gives the expected verdict against
//! turnpike and against coturn.

use crate::common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};

/// A port free for UDP and TCP on 127.0.0.1 and 127.0.0.2, never handed
/// out twice in this run: the tests run in parallel, and a port the kernel
/// gave one of them and took back could otherwise go to the other.
fn free_udp_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if given.iter().any(|g| g.abs_diff(port) <= 1) {
            continue;
        }
        let free = ["127.0.0.1", "127.0.0.2"].iter().all(|ip| {
            std::net::TcpListener::bind((*ip, port)).is_ok() && UdpSocket::bind((*ip, port)).is_ok()
        });
        if free {
            given.push(port);
            return port;
        }
    }
}

#[test]
fn change_request_combinations_come_from_the_right_source() {
    let (p, q) = (free_udp_port(), free_udp_port());
    let h = common::start(&[
        "--listen",
        &format!("127.0.0.1:{p}"),
        "--rfc5780",
        "--alt-ip",
        "127.0.0.2",
        "--alt-port",
        &q.to_string(),
    ]);
    let primary: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for (flags, want) in [
        (0u8, primary),
        (2, format!("127.0.0.1:{q}").parse().unwrap()),
        (4, format!("127.0.0.2:{p}").parse().unwrap()),
        (6, format!("127.0.0.2:{q}").parse().unwrap()),
    ] {
        let mut req = Vec::new();
        MessageBuilder::new(
            &mut req,
            MessageType::new(method::BINDING, Class::Request),
            &[flags; 12],
        )
        .attr(attr::CHANGE_REQUEST, &[0, 0, 0, flags]);
        s.send_to(&req, primary).unwrap();
        let mut buf = [0u8; 512];
        let (n, from) = s.recv_from(&mut buf).unwrap();
        assert_eq!(from, want, "flags {flags}: answered from the right socket");
        let m = Message::parse(&buf[..n]).unwrap();
        assert_eq!(m.get_addr(attr::RESPONSE_ORIGIN).unwrap().unwrap(), want);
        assert_eq!(
            m.get_addr(attr::OTHER_ADDRESS).unwrap().unwrap(),
            format!("127.0.0.2:{q}").parse::<SocketAddr>().unwrap()
        );
    }
    assert_eq!(h.alt_listen.len(), 3);
    h.shutdown();
}

fn probe_nat(url: &str) -> (i32, serde_json::Value) {
    let out = Command::new(common::turnpike_bin())
        .args(["probe", "nat", url, "--json", "--timeout-ms", "1000"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    (
        out.status.code().unwrap_or(-1),
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}")),
    )
}

#[test]
fn probe_nat_against_turnpike_and_coturn() {
    let p = free_udp_port();
    let h = common::start(&[
        "--listen",
        &format!("127.0.0.1:{p}"),
        "--rfc5780",
        "--alt-ip",
        "127.0.0.2",
    ]);
    let (code, tp) = probe_nat(&format!("stun:127.0.0.1:{p}"));
    assert_eq!(code, 0, "{tp}");
    assert_eq!(tp["verdict"], "direct connections will usually work", "{tp}");
    // Binding lifetime: no NAT on loopback, so the binding lasts.
    let out = Command::new(common::turnpike_bin())
        .args([
            "probe",
            "nat",
            &format!("stun:127.0.0.1:{p}"),
            "--lifetime",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{v}");
    assert!(v["checks"].to_string().contains("at least 2 s"), "{v}");
    h.shutdown();

    // Without RFC 5780 the probe says so and fails.
    let h = common::start(&[]);
    let (code, v) = probe_nat(&format!("stun:127.0.0.1:{}", h.listen[0].port()));
    assert_eq!(code, 1);
    assert!(
        v["advice"][0]
            .as_str()
            .unwrap()
            .contains("does not support RFC 5780"),
        "{v}"
    );
    h.shutdown();

    // coturn with two listening addresses answers RFC 5780 too.
    assert!(
        std::path::Path::new("/usr/bin/turnserver").exists(),
        "install coturn (apt-get install coturn)"
    );
    let cp = free_udp_port();
    let mut child = Command::new("/usr/bin/turnserver")
        .args([
            "-n",
            "-L",
            "127.0.0.1",
            "-L",
            "127.0.0.2",
            &format!("--listening-port={cp}"),
            &format!("--alt-listening-port={}", cp + 1),
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--log-file=/dev/null",
            "--min-port=41000",
            "--max-port=41999",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // coturn starts slowly on a loaded machine (CI runs every test at
    // once): up to 15 s, and the last answer is shown if it never passes.
    let mut result = None;
    let mut last = serde_json::Value::Null;
    let end = std::time::Instant::now() + Duration::from_secs(15);
    while std::time::Instant::now() < end {
        std::thread::sleep(Duration::from_millis(250));
        let (code, v) = probe_nat(&format!("stun:127.0.0.1:{cp}"));
        if code == 0 {
            result = Some(v);
            break;
        }
        last = v;
    }
    let _ = child.kill();
    let _ = child.wait();
    let co = result.unwrap_or_else(|| panic!("probe nat passes against coturn; its last report: {last:#}"));
    assert_eq!(
        co["verdict"], tp["verdict"],
        "same verdict from both servers: {co}"
    );
}
