//! The binary's log lines: one per refusal within a budget, JSON, no
//! forged lines, `--redact`.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use turnpike_client::client::{Channel, ClientTransport, TurnClient};

use super::{bin, lines, listen_addr, sigterm_and_wait, wait_for, Server};

#[test]
fn usernames_cannot_forge_log_lines() {
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--user",
            "a:b",
            "--threads",
            "1",
            "--auth-fail-limit",
            "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let evil = "mallory\n2026-01-01T00:00:00Z  INFO allocation created user=admin";
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        evil,
        "x",
    );
    c.set_timeout(Duration::from_secs(1));
    let _ = c.allocate();
    let blocked = wait_for(&err, "repeated authentication failures", &mut seen);
    assert!(
        blocked.contains("mallory\\n2026"),
        "newline escaped in: {blocked}"
    );
    sigterm_and_wait(child);
    let rest: Vec<String> = err.try_iter().collect();
    assert!(
        !seen
            .iter()
            .chain(rest.iter())
            .any(|l| l.starts_with("2026-01-01T00:00:00Z")),
        "a forged line appeared"
    );
}

/// Starts the binary with `extra`, makes one allocation as carol and
/// deletes it, and returns every stderr line.
fn log_lines_of_one_session(extra: &[&str]) -> Vec<String> {
    let mut child = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--user",
            "carol:c4r0l",
            "--threads",
            "1",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let started = wait_for(&err, "turnpike started", &mut seen);
    let addr: SocketAddr = if started.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(&started).unwrap();
        v["listen"]
            .as_str()
            .unwrap()
            .trim_matches(['[', ']'])
            .parse()
            .unwrap()
    } else {
        listen_addr(&started)
    };
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        "carol",
        "c4r0l",
    );
    c.allocate().unwrap();
    c.refresh(0).unwrap();
    wait_for(&err, "allocation deleted", &mut seen);
    sigterm_and_wait(child);
    seen.extend(err.try_iter());
    seen
}

#[test]
fn json_logs_one_object_per_line() {
    let lines = log_lines_of_one_session(&["--log-format", "json"]);
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let created = events
        .iter()
        .find(|e| e["message"] == "allocation created")
        .expect("a session-start event");
    assert_eq!(created["user"], "\"carol\"");
    assert!(created["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let deleted = events
        .iter()
        .find(|e| e["message"] == "allocation deleted")
        .expect("a session-end event");
    assert!(
        deleted["bytes_to_peers"].is_u64() && deleted["packets_from_peers"].is_u64(),
        "{deleted}"
    );
    // The start-up summary: clean fields, every listener and store named.
    let started = events
        .iter()
        .find(|e| e["message"] == "turnpike started")
        .expect("the start-up line");
    assert_eq!(started["relay_ipv4"], "127.0.0.1", "{started}");
    assert_eq!(started["relay_ipv6"], "none", "{started}");
    assert_eq!(started["metrics"], "off", "{started}");
    assert!(
        started["db"].is_string() && started["peer_policy"].is_string(),
        "{started}"
    );
    assert!(!started.to_string().contains("Some("), "{started}");
}

#[test]
fn redact_hides_client_addresses_and_usernames() {
    let lines = log_lines_of_one_session(&["--redact"]);
    let session: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("allocation created") || l.contains("allocation deleted"))
        .collect();
    assert_eq!(session.len(), 2, "{lines:?}");
    for l in &session {
        assert!(!l.contains("carol"), "username in: {l}");
        assert!(!l.contains("client=127.0.0.1"), "client address in: {l}");
        assert!(l.contains("redacted:"), "{l}");
    }
    // The same client is the same token in both lines.
    let token = |l: &str| {
        l.split("client=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_owned()
    };
    assert_eq!(token(session[0]), token(session[1]));
}

#[test]
fn every_refusal_leaves_a_log_line() {
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "1"])
        .args(["--user", "dave:d4ve", "--user", "erin:3rin", "--user-quota", "1"])
        .args(["--auth-fail-limit", "0", "--realm", "refusals.example"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let client = |u: &str, p: &str| {
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
            u,
            p,
        );
        c.set_timeout(Duration::from_secs(2));
        c
    };
    // Wrong password, unknown user: 401 with integrity.
    assert!(client("dave", "wrong").allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(
        line.contains("code=401") && line.contains("dave") && line.contains("allocate"),
        "{line}"
    );
    assert!(client("mallory", "x").allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(line.contains("code=401") && line.contains("mallory"), "{line}");
    // The user quota: 486.
    let mut first = client("erin", "3rin");
    first.allocate().unwrap();
    assert!(client("erin", "3rin").allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(line.contains("code=486") && line.contains("erin"), "{line}");
    // An address family the server does not relay: 440.
    let mut v6 = client("dave", "d4ve");
    v6.set_relay_family(turnpike_client::client::RelayFamily::Ipv6);
    assert!(v6.allocate().is_err());
    let line = wait_for(&err, "request refused", &mut seen);
    assert!(line.contains("code=440"), "{line}");
    first.refresh(0).unwrap();
    sigterm_and_wait(child);
}

#[test]
fn refusal_lines_past_the_configured_budget_are_summed_up() {
    // Two refusals a second logged one by one; five wrong passwords give
    // two lines and a summary counting the other three.
    let mut child = bin()
        .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "1"])
        .args([
            "--user",
            "dave:d4ve",
            "--auth-fail-limit",
            "0",
            "--realm",
            "budget.example",
        ])
        .args(["--log-refusals-per-second", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    let addr = listen_addr(&wait_for(&err, "turnpike started", &mut seen));
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, addr, Duration::from_secs(3)).unwrap(),
        "dave",
        "wrong",
    );
    c.set_timeout(Duration::from_secs(2));
    for _ in 0..5 {
        assert!(c.allocate().is_err());
    }
    let summary = wait_for(&err, "more like the ones above", &mut seen);
    let one_by_one = seen.iter().filter(|l| l.contains("request refused")).count();
    // At least five 401s: two logged in the window (four if it turned
    // over mid-way), the rest summed up (the default of 20 logs them all).
    assert!((2..=4).contains(&one_by_one), "{seen:#?}");
    let more: usize = summary
        .split("more=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(more >= 1 && one_by_one + more >= 5, "{summary}");
    assert!(summary.contains(&format!("401x{more}")), "{summary}");
    sigterm_and_wait(child);
}
