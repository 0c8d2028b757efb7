//! `deploy/kubernetes/`, checked with the tools that run here (no cluster
//! does): `kubectl kustomize` renders the base and the Redis overlay;
//! `kubernetes-validate --strict` checks every object against the
//! Kubernetes 1.30 schemas; `checkov` finds no failed security check
//! (the accepted ones are annotated with their reason); and the pod as
//! rendered — its arguments, its ConfigMap, its Secrets' file names, its
//! probes and scrape annotation — is started with the real binary, which
//! must accept the configuration and answer the probes where the
//! manifests look. Each tool missing is skipped with a message; `.ci/run`
//! installs them all.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes")
}

fn have(tool: &str, args: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("SKIP: {tool} not found (.ci/run installs it)");
    }
    ok
}

/// `kubectl kustomize DIR`, written to a temporary file; its path.
fn render(overlay: &str, test: &str) -> PathBuf {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(k8s_dir().join(overlay))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {overlay}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = std::env::temp_dir().join(format!(
        "turnpike-k8s-{}-{test}-{overlay}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, &out.stdout).unwrap();
    path
}

/// The rendered objects as JSON (PyYAML, which checkov brings).
fn objects(rendered: &Path) -> Option<Vec<Value>> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(std::fs::File::open(rendered).unwrap())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!(
            "SKIP the pod check: python3 with PyYAML not found ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn the_manifests_render_validate_and_pass_checkov() {
    if !have("kubectl", &["kustomize", "--help"]) {
        return;
    }
    let rendered = [render("base", "check"), render("redis", "check")];
    let text = std::fs::read_to_string(&rendered[1]).unwrap();
    assert!(text.contains("--redis-url=redis://redis.turnpike.svc.cluster.local:6379/0"));
    assert!(text.contains("image: registry.example.com/turnpike:0.1.0"));

    if have("kubernetes-validate", &["--version"]) {
        let out = Command::new("kubernetes-validate")
            .args(["-k", "1.30.0", "--strict"])
            .args(&rendered)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        // Every object was checked: base 5, overlay 8.
        assert_eq!(log.matches(" passed for resource ").count(), 13, "{log}");
    }

    if have("checkov", &["--version"]) {
        for r in &rendered {
            let out = Command::new("checkov")
                .arg("-f")
                .arg(r)
                .args([
                    "--framework",
                    "kubernetes",
                    "--compact",
                    "--quiet",
                    "--skip-download",
                ])
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && log.contains("Failed checks: 0"),
                "checkov {}:\n{log}",
                r.display()
            );
            assert!(log.contains("Passed checks: "), "{log}");
        }
    }
    for r in &rendered {
        let _ = std::fs::remove_file(r);
    }
}

fn http_status(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    common::http_request(addr, "GET", path, None).ok()
}

/// The container port named `name`.
fn port_named(container: &Value, name: &str) -> u16 {
    container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no port named {name}"))["containerPort"]
        .as_u64()
        .unwrap() as u16
}

#[test]
fn the_pod_as_rendered_starts_and_answers_its_probes() {
    if !have("kubectl", &["kustomize", "--help"]) {
        return;
    }
    let rendered = render("base", "pod");
    let Some(objs) = objects(&rendered) else {
        return;
    };
    let _ = std::fs::remove_file(&rendered);
    let find = |kind: &str| {
        objs.iter()
            .find(|o| o["kind"] == kind)
            .unwrap_or_else(|| panic!("no {kind}"))
    };
    let ds = find("DaemonSet");
    let pod = &ds["spec"]["template"];
    let spec = &pod["spec"];
    let c = &spec["containers"][0];
    assert_eq!(spec["hostNetwork"], true);
    let toml = find("ConfigMap")["data"]["turnpike.toml"]
        .as_str()
        .unwrap()
        .to_owned();

    // The drain fits in the grace period, so SIGTERM can drain calls.
    let drain: u64 = toml
        .lines()
        .find_map(|l| l.strip_prefix("drain-timeout = "))
        .expect("drain-timeout in the ConfigMap")
        .trim()
        .parse()
        .unwrap();
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(drain + 10 <= grace, "drain-timeout {drain} s vs grace {grace} s");

    // Probes and the scrape annotation name the ports turnpike listens on.
    let args: Vec<String> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let admin_port = port_named(c, c["readinessProbe"]["httpGet"]["port"].as_str().unwrap());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        args.contains(&format!("--admin-listen=$(NODE_IP):{admin_port}")),
        "{args:?}"
    );
    let scrape_port: u16 = pod["metadata"]["annotations"]["prometheus.io/port"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        args.contains(&format!("--metrics-listen=$(NODE_IP):{scrape_port}")),
        "{args:?}"
    );

    // The mounts, laid out in a temporary root: the ConfigMap, the TLS
    // Secret (a generated certificate) and the credentials Secret.
    let root = std::env::temp_dir().join(format!("turnpike-k8s-pod-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mounted = |p: &str| root.join(p.trim_start_matches('/'));
    let mounts: Vec<(String, String)> = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_owned(),
                m["mountPath"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mount_of = |name: &str| &mounts.iter().find(|(n, _)| n == name).unwrap().1;
    for (_, path) in &mounts {
        std::fs::create_dir_all(mounted(path)).unwrap();
    }
    let secret_name = |vol: &str| {
        spec["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == vol)
            .unwrap()["secret"]["secretName"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(secret_name("tls"), "turnpike-tls");
    assert_eq!(secret_name("credentials"), "turnpike-credentials");
    let tls_dir = mounted(mount_of("tls"));
    turnpike::tls::write_self_signed_pem(
        &["localhost".into()],
        &tls_dir.join("tls.crt"),
        &tls_dir.join("tls.key"),
    )
    .unwrap();
    let cred_dir = mounted(mount_of("credentials"));
    std::fs::write(cred_dir.join("auth-secret"), "k8s-rest-secret\n").unwrap();
    std::fs::write(cred_dir.join("admin-token"), "an-admin-token-of-some-length\n").unwrap();

    // The pod's paths under the root, its ports on loopback, free ports
    // for the listeners (a test must not take 3478 from anyone).
    let (admin, metrics) = (common::free_port(), common::free_port());
    let relocate = |s: &str| {
        s.replace("/etc/turnpike", mounted("/etc/turnpike").to_str().unwrap())
            .replace("/run/secrets/turnpike", cred_dir.to_str().unwrap())
            .replace("$(NODE_IP)", "127.0.0.1")
            .replace(&format!(":{admin_port}"), &format!(":{admin}"))
            .replace(&format!(":{scrape_port}"), &format!(":{metrics}"))
    };
    let toml = toml
        .replace("0.0.0.0:3478", "127.0.0.1:0")
        .replace("0.0.0.0:5349", "127.0.0.1:0");
    std::fs::write(mounted(mount_of("config")).join("turnpike.toml"), relocate(&toml)).unwrap();
    let args: Vec<String> = args.iter().map(|a| relocate(a)).collect();

    let mut child = Command::new(env!("CARGO_BIN_EXE_turnpike"))
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let _proc = common::Proc(child);
    let mut seen = Vec::new();
    for line in BufReader::new(err).lines().map_while(Result::ok) {
        if line.contains("turnpike started") {
            break;
        }
        seen.push(line);
    }
    let admin_addr: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let ready = loop {
        if let Some(r) = http_status(admin_addr, "/readyz") {
            break r;
        }
        assert!(
            Instant::now() < end,
            "no /readyz with {args:?}:\n{}",
            seen.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(ready.0, 200, "{}", ready.1);
    assert_eq!(http_status(admin_addr, "/healthz").unwrap().0, 200);
    let (code, body) = http_status(format!("127.0.0.1:{metrics}").parse().unwrap(), "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("turnpike_workers"), "{body}");
    // The admin token came from the Secret's file.
    let (code, cfg) = common::http_request(
        admin_addr,
        "GET",
        "/api/config",
        Some("an-admin-token-of-some-length"),
    )
    .unwrap();
    assert_eq!(code, 200, "{cfg}");
    drop(_proc);
    let _ = std::fs::remove_dir_all(&root);
}
