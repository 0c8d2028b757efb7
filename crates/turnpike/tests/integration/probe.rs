//! `turnpike probe` against turnpike and against Debian's coturn, started
//! on loopback ports: the same checks pass on both, and each failure mode
//! (wrong password, closed port, refused peer) gives advice and a non-zero
//! exit.

use crate::common;

use std::net::UdpSocket;
use std::process::{Command, Stdio};
use std::time::Duration;

fn probe(args: &[&str]) -> (i32, serde_json::Value) {
    let out = Command::new(common::turnpike_bin())
        .arg("probe")
        .args(args)
        .args(["--json", "--timeout-ms", "1500"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "probe {args:?}: not JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), v)
}

fn passed(v: &serde_json::Value) -> Vec<String> {
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"].as_bool() == Some(true))
        .map(|c| {
            // "udp 127.0.0.1:PORT step" -> "udp step": comparable across servers.
            let n = c["name"].as_str().unwrap();
            let mut parts = n.splitn(3, ' ');
            let t = parts.next().unwrap();
            let _addr = parts.next();
            format!("{t} {}", parts.next().unwrap_or(""))
        })
        .collect()
}

fn advice(v: &serde_json::Value) -> String {
    v["advice"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect::<Vec<_>>()
        .join(" | ")
}

/// coturn and its port.
struct Coturn(#[allow(dead_code)] common::Proc, u16);

fn coturn() -> Coturn {
    coturn_with(&[])
}

fn coturn_with(extra: &[&str]) -> Coturn {
    let (proc, addr) = common::coturn(extra, 40000);
    Coturn(proc, addr.port())
}

#[test]
fn stun_and_turn_pass_against_turnpike_and_coturn_alike() {
    let h = common::start(&["--allow-loopback-peers"]);
    let tp = h.listen[0].port();
    let (code, v) = probe(&["stun", &format!("stun:127.0.0.1:{tp}"), "--count", "3"]);
    assert_eq!(code, 0, "{v}");
    assert!(
        v["checks"][0]["detail"]
            .as_str()
            .unwrap()
            .contains("reflexive address 127.0.0.1:"),
        "{v}"
    );
    let (code, tp_turn) = probe(&[
        "turn",
        &format!("turn:127.0.0.1:{tp}"),
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--transport",
        "udp,tcp",
    ]);
    assert_eq!(code, 0, "{tp_turn}");
    let (code, v) = probe(&[
        "turn",
        &format!("turns:127.0.0.1:{}", h.tls_listen[0].port()),
        "--user",
        "alice",
        "--password",
        "wonderland",
        // The test server's certificate is self-signed.
        "--insecure",
    ]);
    assert_eq!(code, 0, "TLS: {v}");
    assert!(v["advice"].to_string().contains("not verified"), "{v}");

    let c = coturn();
    let (code, v) = probe(&["stun", &format!("stun:127.0.0.1:{}", c.1), "--count", "3"]);
    assert_eq!(code, 0, "coturn stun: {v}");
    let (code, co_turn) = probe(&[
        "turn",
        &format!("turn:127.0.0.1:{}", c.1),
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--transport",
        "udp,tcp",
    ]);
    assert_eq!(code, 0, "coturn turn: {co_turn}");
    assert_eq!(
        passed(&tp_turn),
        passed(&co_turn),
        "the same checks pass on both servers"
    );
    // 7 steps per transport, and the IPv6 check once (not offered here:
    // both servers answer the dual Allocate with ADDRESS-ERROR-CODE 440).
    assert_eq!(passed(&tp_turn).len(), 15, "{tp_turn}");
    assert!(
        passed(&tp_turn).contains(&"udp ipv6 relay".to_owned()),
        "{tp_turn}"
    );
    assert!(
        tp_turn["checks"].to_string().contains("its reply came back"),
        "local peer relayed: {tp_turn}"
    );
    h.shutdown();
}

#[test]
fn tcp_relays_are_probed_on_turnpike_and_coturn_alike() {
    let h = common::start(&["--allow-loopback-peers"]);
    let c = coturn();
    let mut runs = Vec::new();
    for port in [h.listen[0].port(), c.1] {
        let (code, v) = probe(&[
            "turn",
            &format!("turn:127.0.0.1:{port}"),
            "--user",
            "alice",
            "--password",
            "wonderland",
            "--transport",
            "tcp,udp",
            "--tcp-relay",
        ]);
        assert_eq!(code, 0, "port {port}: {v}");
        let steps: Vec<String> = passed(&v)
            .into_iter()
            .filter(|s| s.contains("tcp-relay"))
            .collect();
        runs.push(steps);
        assert!(v["checks"].to_string().contains("bytes each way"), "{v}");
    }
    assert_eq!(runs[0], runs[1], "the same TCP relay checks pass on both servers");
    for step in [
        "allocate",
        "connect",
        "connection attempt",
        "bind",
        "data both ways",
    ] {
        assert!(
            runs[0].contains(&format!("tcp tcp-relay {step}")),
            "{step}: {:?}",
            runs[0]
        );
    }
    assert!(
        runs[0].contains(&"udp tcp-relay".to_owned()),
        "skipped over UDP, and said so"
    );
    h.shutdown();
}

#[test]
fn ipv6_relays_are_tested_when_the_server_offers_them() {
    if UdpSocket::bind("[::1]:0").is_err() {
        common::missing("ipv6 relay probe", "no IPv6 loopback here");
        return;
    }
    let h = common::start(&[
        "--allow-loopback-peers",
        "--relay-ip",
        "127.0.0.1",
        "--relay-ip",
        "::1",
    ]);
    let (code, v) = probe(&[
        "turn",
        &format!("turn:127.0.0.1:{}", h.listen[0].port()),
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--transport",
        "udp",
    ]);
    assert_eq!(code, 0, "{v}");
    let p = passed(&v);
    for step in [
        "allocate",
        "second allocation",
        "channel bind",
        "relay both ways",
        "local peer",
    ] {
        assert!(p.contains(&format!("udp ipv6 {step}")), "ipv6 {step}: {v}");
    }
    let checks = v["checks"].to_string();
    assert!(checks.contains("relayed [::1]:"), "an IPv6 relay: {v}");
    assert!(
        checks.contains("Send indication to [::1]:"),
        "an IPv6 local peer: {v}"
    );
    h.shutdown();
}

/// A Binding responder that answers every request from 127.0.0.2 (same
/// port), as a multi-homed server replying by its routing table does.
fn wrong_source_responder() -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};
    let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = rx.local_addr().unwrap().port();
    let tx = UdpSocket::bind(("127.0.0.2", port)).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let mut buf = [0u8; 1500];
        while !flag.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < deadline {
            let Ok((n, from)) = rx.recv_from(&mut buf) else {
                continue;
            };
            let Ok(m) = Message::parse(&buf[..n]) else {
                continue;
            };
            let mut out = Vec::new();
            MessageBuilder::new(
                &mut out,
                MessageType::new(method::BINDING, Class::Success),
                &m.transaction_id(),
            )
            .xor_addr(attr::XOR_MAPPED_ADDRESS, from);
            let _ = tx.send_to(&out, from);
        }
    });
    (port, stop)
}

#[test]
fn answers_from_another_address_are_named_not_called_a_firewall() {
    let (port, stop) = wrong_source_responder();
    let (code, v) = probe(&[
        "stun",
        &format!("stun:127.0.0.1:{port}?transport=udp"),
        "--count",
        "1",
    ]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_ne!(code, 0, "{v}");
    let detail = v["checks"][0]["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "answers come from 127.0.0.2:{port}, not from 127.0.0.1:{port}"
        )),
        "{v}"
    );
    let a = advice(&v);
    assert!(
        a.contains("--listening-ip") && !a.contains("firewall drops"),
        "{a}"
    );
}

#[test]
fn wrong_password_gives_realm_advice_on_both_servers() {
    let h = common::start(&[]);
    let (code, v) = probe(&[
        "turn",
        &format!("turn:127.0.0.1:{}", h.listen[0].port()),
        "--user",
        "alice",
        "--password",
        "nope",
        "--transport",
        "udp",
    ]);
    assert_eq!(code, 1);
    assert!(
        advice(&v).contains("the realm is \"test.example\"; check the username and password"),
        "{v}"
    );
    let c = coturn();
    let (code, v) = probe(&[
        "turn",
        &format!("turn:127.0.0.1:{}", c.1),
        "--user",
        "alice",
        "--password",
        "nope",
        "--transport",
        "udp",
    ]);
    assert_eq!(code, 1);
    assert!(advice(&v).contains("the realm is \"coturn.example\""), "{v}");
    h.shutdown();
}

#[test]
fn closed_port_and_refused_peer_give_advice() {
    let closed = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, v) = probe(&["stun", &format!("stun:127.0.0.1:{closed}"), "--count", "1"]);
    assert_eq!(code, 1);
    assert!(advice(&v).contains("nothing listens on udp"), "{v}");

    // An operator's deny-peer refuses even the server's own relayed
    // addresses (which the default ranges no longer do): a refused peer.
    let h = common::start(&["--deny-peer", "127.0.0.0/8"]);
    let (code, v) = probe(&[
        "turn",
        &format!("turn:127.0.0.1:{}", h.listen[0].port()),
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--transport",
        "udp",
    ]);
    assert_eq!(code, 1);
    assert!(advice(&v).contains("403 on the peer"), "{v}");
    h.shutdown();
}

#[test]
fn ctrl_c_stops_cleanly_with_status_130() {
    // A "server" that never answers: each Binding waits out its timeout.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let url = format!(
        "stun:127.0.0.1:{}?transport=udp",
        silent.local_addr().unwrap().port()
    );
    let child = Command::new(common::turnpike_bin())
        .args([
            "probe",
            "stun",
            &url,
            "--count",
            "50",
            "--timeout-ms",
            "300",
            "--json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: kill(2) on our own child's pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "exit status after Ctrl-C");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(advice(&v).contains("interrupted"), "{v}");
}

#[test]
fn srv_records_are_used_when_no_port_is_given() {
    let h = common::start(&[]);
    let port = h.listen[0].port();
    // A DNS server on loopback that answers every SRV query with 127.0.0.1:PORT.
    let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns_addr = dns.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        dns.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let (n, from) = dns.recv_from(&mut buf).unwrap();
        let q = &buf[..n];
        let mut r = q.to_vec();
        r[2] = 0x81;
        r[3] = 0x80;
        r[6..8].copy_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&[0xC0, 12, 0, 33, 0, 1, 0, 0, 0, 60]);
        let mut rdata = vec![0, 10, 0, 5];
        rdata.extend_from_slice(&port.to_be_bytes());
        for l in ["127", "0", "0", "1"] {
            rdata.push(l.len() as u8);
            rdata.extend_from_slice(l.as_bytes());
        }
        rdata.push(0);
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
        dns.send_to(&r, from).unwrap();
        // The question asked for the right service name.
        String::from_utf8_lossy(&q[12..]).into_owned()
    });
    let (code, v) = probe(&[
        "stun",
        "stun:stun.example.test",
        "--count",
        "1",
        "--dns-server",
        &dns_addr.to_string(),
    ]);
    let question = server.join().unwrap();
    assert!(
        question.contains("_stun") && question.contains("_udp") && question.contains("example"),
        "{question:?}"
    );
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v["srv"],
        format!("_stun._udp.stun.example.test -> 127.0.0.1:{port}"),
        "{v}"
    );
    h.shutdown();
}

fn allocate_check(v: &serde_json::Value) -> (String, String) {
    let c = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap_or("").ends_with("allocate"))
        .unwrap_or_else(|| panic!("no allocate step: {v}"));
    (
        c["detail"].as_str().unwrap_or("").to_owned(),
        c["advice"].as_str().unwrap_or("").to_owned(),
    )
}

#[test]
fn turn_not_answered_while_binding_is_is_not_called_a_firewall() {
    // coturn serving STUN only.
    let c = coturn_with(&["--stun-only"]);
    let (code, v) = probe(&[
        "turn",
        &format!("turn:127.0.0.1:{}", c.1),
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--transport",
        "udp",
    ]);
    assert_ne!(code, 0, "{v}");
    let (detail, advice) = allocate_check(&v);
    assert!(detail.contains("Binding is answered"), "{v}");
    assert!(
        advice.contains("--stun-only") && !advice.contains("firewall"),
        "{v}"
    );
    drop(c);

    // turnpike after the brute-force guard blocked alice from here.
    let h = common::start(&["--auth-fail-limit", "2"]);
    let url = format!("turn:127.0.0.1:{}", h.listen[0].port());
    for _ in 0..2 {
        let (code, _) = probe(&[
            "turn",
            &url,
            "--user",
            "alice",
            "--password",
            "guess",
            "--transport",
            "udp",
        ]);
        assert_ne!(code, 0);
        std::thread::sleep(Duration::from_millis(1100));
    }
    let (code, v) = probe(&[
        "turn",
        &url,
        "--user",
        "alice",
        "--password",
        "wonderland",
        "--transport",
        "udp",
    ]);
    assert_ne!(code, 0, "{v}");
    let (detail, advice) = allocate_check(&v);
    assert!(detail.contains("Binding is answered"), "{v}");
    assert!(advice.contains("blocked after failed logins"), "{v}");
    h.shutdown();
}

#[test]
fn tls_certificates_are_verified_unless_told_otherwise() {
    use base64::Engine;
    let h = common::start(&["--allow-loopback-peers"]);
    let url = format!("turns:127.0.0.1:{}", h.tls_listen[0].port());
    let args = |extra: &[&str]| {
        let mut a = vec![
            "turn",
            url.as_str(),
            "--user",
            "alice",
            "--password",
            "wonderland",
        ];
        a.extend_from_slice(extra);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    // A self-signed certificate does not verify: the probe fails and says why.
    let a = args(&[]);
    let (code, v) = probe(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_ne!(code, 0, "{v}");
    let text = v.to_string();
    assert!(
        text.contains("certificate") && text.contains("--ca") && text.contains("--insecure"),
        "{v}"
    );
    // Trusting exactly that certificate (a private CA would do the same).
    let der = h.tls_leaf.clone().unwrap();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(chunk).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    let ca = std::env::temp_dir().join(format!("turnpike-probe-ca-{}.pem", std::process::id()));
    std::fs::write(&ca, pem).unwrap();
    let a = args(&["--ca", ca.to_str().unwrap()]);
    let (code, v) = probe(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "with --ca: {v}");
    assert!(!v["advice"].to_string().contains("not verified"), "{v}");
    let _ = std::fs::remove_file(&ca);
    h.shutdown();
}
