//! A short smoke run of `turnpike bench` in every mode against a local
//! server: the generator works and reports sensible JSON. Numbers are not
//! asserted (machines are noisy); BENCHMARKS.md has the real runs.

use crate::common;

use std::process::Command;

fn bench(server: std::net::SocketAddr, extra: &[&str]) -> serde_json::Value {
    let pid = std::process::id().to_string();
    let out = Command::new(common::turnpike_bin())
        .args([
            "bench",
            "--server",
            &server.to_string(),
            "--user",
            "alice",
            "--password",
            "wonderland",
        ])
        .args(["--duration", "0.5", "--warmup", "0.2", "--window", "4", "--json"])
        .args(["--pid", &pid])
        .args(extra)
        .args(if extra.contains(&"--allocations") {
            &[][..]
        } else {
            &["--allocations", "4"][..]
        })
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "bench {extra:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("bench {extra:?}: not JSON ({e}): {stdout}"))
}

#[test]
fn every_mode_runs_and_reports() {
    // It loads the machine: nothing else runs beside it.
    let _alone = common::exclusive();
    let h = common::start(&["--allow-loopback-peers", "--rate-limit-per-ip", "0"]);
    let server = h.listen[0];
    for extra in [
        &["--mode", "channel"][..],
        &["--mode", "send"],
        &["--mode", "binding"],
        &["--mode", "channel", "--transport", "tcp"],
        &["--mode", "send", "--transport", "tcp"],
        &["--mode", "allocate"],
        &["--mode", "tcp-relay", "--transport", "tcp"],
    ] {
        let r = bench(server, extra);
        assert!(r["operations"].as_u64().unwrap() > 0, "{extra:?}: {r}");
        assert!(r["per_second"].as_f64().unwrap() > 0.0, "{extra:?}: {r}");
        assert!(r["rtt_us"]["p50"].as_u64().is_some(), "{extra:?}: {r}");
        assert!(r["server_user_us_per_op"].as_f64().is_some(), "{extra:?}: {r}");
        // Every mode deletes what it allocated: a UDP allocation left
        // behind would answer 437 to a later client given the same port.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while h.control().allocations() > 0 && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(h.control().allocations(), 0, "{extra:?} left allocations behind");
    }
    let r = bench(server, &["--mode", "hold", "--allocations", "50"]);
    assert_eq!(r["operations"].as_u64(), Some(50), "{r}");
    assert!(r["rss_per_allocation_bytes"].as_f64().is_some(), "{r}");
    assert_eq!(h.shutdown(), 0);
}

fn bench_fails(server: std::net::SocketAddr, extra: &[&str]) -> String {
    let out = Command::new(common::turnpike_bin())
        .args(["bench", "--server", &server.to_string(), "--user", "alice"])
        .args([
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--window",
            "16",
            "--allocations",
            "4",
        ])
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "bench {extra:?} must fail: {stderr}");
    stderr
}

#[test]
fn a_failed_or_mostly_lost_run_fails() {
    // It loads the machine: nothing else runs beside it.
    let _alone = common::exclusive();
    let h = common::start(&["--allow-loopback-peers"]);
    let server = h.listen[0];
    let err = bench_fails(server, &["--password", "nope", "--mode", "allocate"]);
    assert!(err.contains("authentication failed (401)"), "{err}");
    // The default per-source limit (200/s) drops part of a Binding flood
    // from one address: the run says why beside the rate it reports.
    let out = Command::new(common::turnpike_bin())
        .args([
            "bench",
            "--server",
            &server.to_string(),
            "--user",
            "alice",
            "--password",
            "wonderland",
        ])
        .args([
            "--mode",
            "binding",
            "--duration",
            "1",
            "--warmup",
            "0.2",
            "--window",
            "16",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    // A warning beside the rate, or a failure when most was lost: either
    // way the cause and the fix are named.
    assert!(err.contains("--rate-limit-per-ip 0"), "{err}");
    assert_eq!(h.shutdown(), 0);
}
