//! The alert rules and dashboard in `deploy/prometheus/` against real
//! tools: `promtool` checks and unit-tests the rules; a real turnpike
//! binary (with a real redis-server, TLS and a total quota, so that every
//! conditional metric is exported) is scraped to prove that every metric
//! name the rules, their tests and the dashboard use exists; and a real
//! Prometheus server, loading the committed rules and scraping that
//! turnpike every second, sees `TurnpikeAuthFailureSpike` go pending after
//! a burst of wrong passwords. Processes are started here and stopped by
//! PID. Skipped with a message where Debian's `prometheus` package (which
//! holds promtool) is not installed; `.ci/run` installs it.

use crate::common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use turnpike_client::client::{Channel, ClientTransport, TurnClient};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/prometheus")
}

fn have(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        common::missing(
            "prometheus",
            &format!("{tool} not installed (apt-get install prometheus)"),
        );
    }
    found
}

/// A plain HTTP GET; the body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    common::http_request(addr, "GET", path, None).map(|(_, body)| body)
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    if !have("promtool") {
        return;
    }
    let dir = deploy();
    // The server's rules, and `turnpike watch`'s.
    for (rules_file, tests_file) in [
        ("turnpike-rules.yml", "turnpike-rules.test.yml"),
        ("watch-rules.yml", "watch-rules.test.yml"),
    ] {
        let check = Command::new("promtool")
            .args(["check", "rules", rules_file])
            .current_dir(&dir)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&check.stdout);
        assert!(
            check.status.success(),
            "{out}{}",
            String::from_utf8_lossy(&check.stderr)
        );
        assert!(out.contains("SUCCESS"), "{out}");
        let test = Command::new("promtool")
            .args(["test", "rules", tests_file])
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            test.status.success(),
            "{}{}",
            String::from_utf8_lossy(&test.stdout),
            String::from_utf8_lossy(&test.stderr)
        );
        // Every alert the rules define is exercised by the unit tests.
        let rules = std::fs::read_to_string(dir.join(rules_file)).unwrap();
        let tests = std::fs::read_to_string(dir.join(tests_file)).unwrap();
        for line in rules.lines() {
            if let Some(name) = line.trim().strip_prefix("- alert: ") {
                assert!(
                    tests.contains(&format!("alertname: {name}\n")),
                    "alert {name} has no promtool test"
                );
            }
        }
    }
}

/// `turnpike_…` names in `text`, leaving out recording rules'
/// (`instance:turnpike_…:rate1m`).
pub(crate) fn metric_names(text: &str) -> BTreeSet<String> {
    let b = text.as_bytes();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("turnpike_") {
        let start = i + at;
        let mut end = start + "turnpike_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        let recorded = start > 0 && b[start - 1] == b':';
        let word = start > 0 && (b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        if !recorded && !word && end > start + "turnpike_".len() {
            names.insert(text[start..end].to_owned());
        }
        i = end;
    }
    names
}

struct Node {
    _proc: common::Proc,
    listen: SocketAddr,
    metrics: SocketAddr,
}

/// The real binary on loopback, with everything that makes conditional
/// metrics appear: Redis, TLS (a generated certificate) and a total quota.
fn start_node(redis_port: u16) -> Node {
    let metrics: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
    let mut child = Command::new(common::turnpike_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--tls-listen",
            "127.0.0.1:0",
            "--threads",
            "2",
        ])
        .args([
            "--realm",
            "test.example",
            "--user",
            "alice:wonderland",
            "--total-quota",
            "100",
        ])
        .args(["--redis-url", &format!("redis://127.0.0.1:{redis_port}/0")])
        .args(["--metrics-listen", &metrics.to_string(), "--log-level", "info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let proc = common::Proc(child);
    let mut seen = Vec::new();
    let mut started = None;
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        if line.contains("turnpike started") {
            started = Some(line);
            break;
        }
        seen.push(line);
    }
    let started = started.unwrap_or_else(|| panic!("turnpike did not start:\n{}", seen.join("\n")));
    let listen = started
        .split("listen=[")
        .nth(1)
        .and_then(|r| r.split([']', ',']).next())
        .expect("listen=[…] in the start-up line")
        .parse()
        .unwrap();
    Node {
        _proc: proc,
        listen,
        metrics,
    }
}

#[test]
fn a_real_prometheus_scrapes_turnpike_and_the_auth_failure_alert_goes_pending() {
    // Waits on a real Prometheus's evaluation clock: nothing else runs beside it.
    let _alone = common::exclusive();
    if !have("prometheus") {
        return;
    }
    let redis = common::redis_server();
    let node = start_node(redis.1);

    // Every name the rules, their tests and the dashboard use is one this
    // turnpike exports (a rename would otherwise silence an alert).
    let scrape = {
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let body = get(node.metrics, "/metrics").unwrap_or_default();
            // Up, and registered in the fleet (its first heartbeat).
            if body.contains("turnpike_redis_up 1") && body.contains("turnpike_fleet_nodes 1") {
                break body;
            }
            assert!(
                Instant::now() < end,
                "no turnpike_redis_up 1 and turnpike_fleet_nodes 1 in:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let exported = metric_names(&scrape);
    let dir = deploy();
    for file in [
        "turnpike-rules.yml",
        "turnpike-rules.test.yml",
        "turnpike-dashboard.json",
    ] {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let used = metric_names(&text);
        assert!(used.len() >= 5, "{file}: {used:?}");
        let missing: Vec<_> = used.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} uses metrics turnpike does not export: {missing:?}"
        );
    }
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("turnpike-dashboard.json")).unwrap()).unwrap();
    assert!(dash["panels"].as_array().is_some_and(|p| p.len() >= 10));

    // A real Prometheus with the committed rules, scraping every second.
    let tmp = std::env::temp_dir().join(format!("turnpike-prometheus-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let rules = dir.join("turnpike-rules.yml").canonicalize().unwrap();
    std::fs::write(
        tmp.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: turnpike\n    static_configs:\n      - targets: ['{}']\n",
            rules.display(),
            node.metrics
        ),
    )
    .unwrap();
    let web: SocketAddr = format!("127.0.0.1:{}", common::free_port()).parse().unwrap();
    let prom = common::Proc(
        Command::new("prometheus")
            .arg(format!("--config.file={}", tmp.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", tmp.join("data").display()))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let query = |path: &str| -> serde_json::Value {
        get(web, path)
            .ok()
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let wait = |what: &str, secs: u64, ok: &dyn Fn() -> bool| {
        let end = Instant::now() + Duration::from_secs(secs);
        while !ok() {
            assert!(Instant::now() < end, "Prometheus: {what} within {secs} s");
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    // The target is up, and every rule has been evaluated without error
    // against turnpike's real series.
    wait("turnpike's target up", 30, &|| {
        query("/api/v1/query?query=up")["data"]["result"]
            .as_array()
            .is_some_and(|r| r.iter().any(|s| s["value"][1] == "1"))
    });
    let rules_ok = || {
        let v = query("/api/v1/rules");
        let rules: Vec<&serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() >= 15
            && rules.iter().all(|r| {
                r["health"] == "ok" && !r["lastEvaluation"].as_str().unwrap_or("0001").starts_with("0001")
            })
    };
    wait("all rules evaluated with health ok", 30, &rules_ok);
    let auth_alert = |state: &str| {
        query("/api/v1/alerts")["data"]["alerts"]
            .as_array()
            .is_some_and(|a| {
                a.iter()
                    .any(|x| x["labels"]["alertname"] == "TurnpikeAuthFailureSpike" && x["state"] == state)
            })
    };
    assert!(
        !auth_alert("pending") && !auth_alert("firing"),
        "quiet before the spike"
    );

    // The spike: 30 sources guessing alice's password 10 times each, as
    // fast as the server answers (the guard's own budget is 10 a minute,
    // so its blocks, silent, count too).
    let threads: Vec<_> = (10..40)
        .map(|last| {
            let server = node.listen;
            std::thread::spawn(move || {
                let from: std::net::IpAddr = format!("127.0.0.{last}").parse().unwrap();
                for _ in 0..10 {
                    let ch = Channel::connect_from(
                        &ClientTransport::Udp,
                        server,
                        Some(from),
                        Duration::from_secs(2),
                    )
                    .unwrap();
                    let mut c = TurnClient::new(ch, "alice", "not-the-password");
                    c.set_timeout(Duration::from_millis(300));
                    assert!(c.allocate().is_err());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    wait("TurnpikeAuthFailureSpike pending", 45, &|| auth_alert("pending"));
    // Its `for: 2m` keeps it from firing yet.
    assert!(!auth_alert("firing"));
    drop(prom);
    let _ = std::fs::remove_dir_all(&tmp);
}
