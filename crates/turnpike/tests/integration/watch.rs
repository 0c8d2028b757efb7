//! `turnpike watch` against real servers: turnpike and Debian's coturn
//! 4.6.1, each configured safely (every check green) and unsafely (each
//! drift check fires: coturn's `--no-auth` open relay, loopback peers
//! allowed, SOFTWARE on, a long realm's oversized 401), and the watcher's
//! own metrics fed to promtool with the committed alert rules.

use crate::common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn password_file() -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("turnpike-watch-pw-{}", std::process::id()));
    std::fs::write(&p, format!("{PASSWORD}\n")).unwrap();
    p
}

/// `turnpike watch --once` on `targets`: its exit status and results.
fn watch_once(targets: &[String]) -> (bool, Vec<Value>) {
    watch_once_with(&["--peer-ip", "127.0.0.2"], targets)
}

/// The same with `peer` saying where the relay check's peer is.
fn watch_once_with(peer: &[&str], targets: &[String]) -> (bool, Vec<Value>) {
    let pw = password_file();
    let mut cmd = Command::new(turnpike_bin());
    cmd.args(["watch", "--once", "--user", USER, "--password-file"])
        .arg(&pw)
        .args(peer)
        .args(["--timeout-ms", "1500"]);
    for t in targets {
        cmd.args(["--target", t]);
    }
    let out = cmd.output().unwrap();
    let v: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (out.status.success(), v)
}

/// A server of turnpike's own: `extra` after the listeners and user.
fn turnpike(extra: &[&str]) -> turnpike::runtime::Handle {
    turnpike::runtime::start(&settings(extra).unwrap()).unwrap()
}

/// Debian's coturn on a free port with `extra`.
fn coturn(extra: &[&str]) -> (Proc, u16) {
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("/usr/bin/turnserver")
        .args([
            "-n",
            "--listening-ip=127.0.0.1",
            &format!("--listening-port={port}"),
            "--relay-ip=127.0.0.1",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--min-port=46000",
            "--max-port=46999",
            "--log-file=/dev/null",
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let p = Proc(child);
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    for _ in 0..100 {
        let mut ch = turnpike_client::client::Channel::connect(
            &turnpike_client::client::ClientTransport::Udp,
            addr,
            Duration::from_secs(1),
        )
        .unwrap();
        if turnpike_client::client::binding(&mut ch, Duration::from_millis(200)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (p, port)
}

fn drift(r: &Value, check: &str) -> bool {
    match check {
        "challenge_ratio" => r["drift"]["challenge_ratio"].as_f64().is_some_and(|x| x > 3.0),
        c => r["drift"][c] == true,
    }
}

#[test]
fn green_on_safe_turnpike_and_coturn_and_every_drift_fires_where_configured() {
    if !std::path::Path::new("/usr/bin/turnserver").exists()
        && missing("watch", "no turnserver (apt-get install coturn)")
    {
        return;
    }
    // turnpike as shipped, with the watcher's peer address allowed.
    let h = turnpike(&["--allow-peer", "127.0.0.2/32"]);
    let (p, t, d) = (
        h.listen[0].port(),
        h.tls_listen[0].port(),
        h.dtls_listen[0].port(),
    );
    let targets = vec![
        format!("turn:127.0.0.1:{p}"),
        format!("turn:127.0.0.1:{p}?transport=tcp"),
        format!("turns:127.0.0.1:{t}"),
        format!("turn:127.0.0.1:{d}?transport=dtls"),
    ];
    let (ok, results) = watch_once(&targets);
    assert!(ok, "green on turnpike: {results:#?}");
    for r in &results {
        assert!(r["relay_rtt_s"].as_f64().is_some(), "{r}");
    }
    assert!(results[2]["certificate_days_left"]
        .as_f64()
        .is_some_and(|d| d > 0.0));
    h.shutdown();

    // A watcher the server cannot reach (behind NAT, in a pod) relays to
    // a second allocation of its own. Relayed addresses are on loopback
    // here, so the server must allow 127.0.0.1, and the internal-range
    // check rightly says so; nothing else drifts.
    let h = turnpike(&["--allow-peer", "127.0.0.1/32"]);
    let p = h.listen[0].port();
    let targets = vec![
        format!("turn:127.0.0.1:{p}"),
        format!("turn:127.0.0.1:{p}?transport=tcp"),
    ];
    let (_, results) = watch_once_with(&["--peer-via-relay"], &targets);
    for r in &results {
        assert!(
            r["relay_rtt_s"].as_f64().is_some(),
            "relayed through a peer allocation: {r}"
        );
        assert!(drift(r, "internal_peer"), "{r}");
        for check in ["open_relay", "software", "challenge_ratio"] {
            assert!(!drift(r, check), "{check}: {r}");
        }
    }
    h.shutdown();

    // turnpike configured unsafely: loopback peers, SOFTWARE, a long realm.
    let h = turnpike(&[
        "--allow-loopback-peers",
        "--software",
        "turnpike-1.2.3",
        "--realm",
        "a-very-long-realm-name.example.org",
        "--allow-long-realm",
    ]);
    let (ok, results) = watch_once(&[format!("turn:127.0.0.1:{}", h.listen[0].port())]);
    assert!(!ok);
    for check in ["internal_peer", "software", "challenge_ratio"] {
        assert!(drift(&results[0], check), "{check} on turnpike: {:#}", results[0]);
    }
    assert!(!drift(&results[0], "open_relay"));
    h.shutdown();

    // coturn 4.6.1 configured safely. Its loopback rule has no exception
    // for one address, so loopback is allowed and the address the drift
    // check tries (127.0.0.1) denied; the watcher's peer is 127.0.0.2.
    let (_c, port) = coturn(&[
        "--lt-cred-mech",
        &format!("--user={USER}:{PASSWORD}"),
        "--realm=ex.org",
        "--no-software-attribute",
        "--allow-loopback-peers",
        "--denied-peer-ip=127.0.0.1",
        "--denied-peer-ip=10.0.0.0-10.255.255.255",
        "--denied-peer-ip=169.254.0.0-169.254.255.255",
    ]);
    let (ok, results) = watch_once(&[format!("turn:127.0.0.1:{port}")]);
    assert!(ok, "green on a safe coturn: {results:#?}");
    drop(_c);

    // coturn as an open relay with SOFTWARE and loopback peers.
    let (_c, port) = coturn(&["--no-auth", "--allow-loopback-peers"]);
    let (ok, results) = watch_once(&[format!("turn:127.0.0.1:{port}")]);
    assert!(!ok);
    for check in ["open_relay", "software", "internal_peer"] {
        assert!(drift(&results[0], check), "{check} on coturn: {:#}", results[0]);
    }
}

#[test]
fn the_watchers_metrics_fire_the_committed_drift_alert_in_promtool() {
    if !have_promtool() {
        return;
    }
    let h = turnpike(&["--allow-loopback-peers", "--software", "turnpike-1.2.3"]);
    let pw = password_file();
    let listen = free_port();
    let target = format!("turn:127.0.0.1:{}", h.listen[0].port());
    // Over TLS too, so the certificate's days left are exported.
    let tls_target = format!("turns:127.0.0.1:{}", h.tls_listen[0].port());
    let _w = Proc(
        Command::new(turnpike_bin())
            .args(["watch", "--user", USER, "--password-file"])
            .arg(&pw)
            .args(["--peer-ip", "127.0.0.2", "--interval", "1", "--listen"])
            .arg(format!("127.0.0.1:{listen}"))
            .args(["--target", &target, "--target", &tls_target])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{listen}").parse().unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let body = loop {
        let body = http_request(addr, "GET", "/metrics", None)
            .map(|(_, b)| b)
            .unwrap_or_default();
        if body.contains("turnpike_watch_certificate_days_left{") || std::time::Instant::now() > end {
            break body;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    h.shutdown();
    // Every metric the committed rules and Grafana dashboard name is one
    // the watcher exports with samples (a rename would blank a panel or
    // silence an alert).
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus");
    for file in ["watch-rules.yml", "watch-dashboard.json"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        let used = crate::prometheus::metric_names(&text);
        assert!(used.len() >= 4, "{file}: {used:?}");
        for name in used {
            assert!(
                body.lines().any(|l| l.starts_with(&format!("{name}{{"))),
                "{file} uses {name}, which the watcher does not export:\n{body}"
            );
        }
    }
    let dash: Value =
        serde_json::from_str(&std::fs::read_to_string(deploy.join("watch-dashboard.json")).unwrap()).unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 8));
    // Each series the watcher exported, held for ten minutes, against the
    // committed rules: the drift alert fires for exactly the drifting checks.
    let mut series = String::new();
    let mut alerts = String::new();
    for line in body.lines().filter(|l| l.starts_with("turnpike_watch_drift{")) {
        let (name_labels, value) = line.rsplit_once(' ').unwrap();
        series.push_str(&format!(
            "      - series: '{name_labels}'\n        values: '{value}x20'\n"
        ));
        if value == "1" {
            let labels = name_labels
                .trim_start_matches("turnpike_watch_drift{")
                .trim_end_matches('}');
            alerts.push_str("          - exp_labels:\n              severity: critical\n");
            for kv in labels.split(',') {
                let (k, v) = kv.split_once('=').unwrap();
                alerts.push_str(&format!("              {k}: {v}\n"));
            }
            let target = labels
                .split("target=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            let check = labels
                .split("check=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            alerts.push_str(&format!(
                "            exp_annotations:\n              summary: \"{target}: {check} drift\"\n"
            ));
        }
    }
    assert!(
        alerts.contains("internal_peer") && alerts.contains("software"),
        "{body}"
    );
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/prometheus/watch-rules.yml")
        .canonicalize()
        .unwrap();
    let test = std::env::temp_dir().join(format!("turnpike-watch-rules-{}.test.yml", std::process::id()));
    std::fs::write(
        &test,
        format!(
            "rule_files:\n  - {}\nevaluation_interval: 30s\ntests:\n  - interval: 30s\n    input_series:\n{series}    alert_rule_test:\n      - eval_time: 2m\n        alertname: TurnWatchSecurityDrift\n        exp_alerts:\n{alerts}",
            rules.display()
        ),
    )
    .unwrap();
    let out = Command::new("promtool")
        .args(["test", "rules"])
        .arg(&test)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(test);
}

fn have_promtool() -> bool {
    if Command::new("promtool").arg("--version").output().is_ok() {
        return true;
    }
    !missing("watch promtool", "no promtool (apt-get install prometheus)")
}

/// `turnpike ARGS` (a watcher serving metrics on 127.0.0.1:`metrics`)
/// started, and its `/metrics` once it has a relay round trip for each of
/// four targets (UDP, TCP, TLS, DTLS), each of them up.
pub(crate) fn four_transports_up(args: &[String], metrics: u16) -> (Proc, String) {
    let watcher = Proc(
        Command::new(turnpike_bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let end = std::time::Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Ok((200, body)) = http_request(addr, "GET", "/metrics", None) {
            if body.matches("turnpike_watch_relay_rtt_seconds{").count() == 4 {
                break body;
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "no relay round trip for all four targets with {args:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    for transport in ["udp", "tcp", "tls", "dtls"] {
        assert!(
            body.lines().any(|l| l.starts_with("turnpike_watch_up{")
                && l.contains(&format!("transport=\"{transport}\""))
                && l.ends_with(" 1")),
            "{transport} up:\n{body}"
        );
    }
    (watcher, body)
}
