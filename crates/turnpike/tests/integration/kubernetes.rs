//! `deploy/kubernetes/`, checked with the tools that run here (no cluster
//! does): `kubectl kustomize` renders the base and the Redis overlay;
//! `kubernetes-validate --strict` checks every object against the
//! Kubernetes 1.30 schemas; `checkov` finds no failed security check
//! (the accepted ones are annotated with their reason); and the pod as
//! rendered — its arguments, its ConfigMap, its Secrets' file names, its
//! probes and scrape annotation — is started with the real binary, which
//! must accept the configuration and answer the probes where the
//! manifests look; the watcher's pod (`watch/`) the same, against a real
//! turnpike. Each tool missing is skipped with a message; `.ci/run`
//! installs them all.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;

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
        common::missing("kubernetes", &format!("{tool} not found"));
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
        common::missing(
            "kubernetes pod checks",
            &format!(
                "python3 with PyYAML not found ({})",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        );
        return None;
    }
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

/// `overlay` rendered and parsed, its temporary file removed; `None`
/// when PyYAML is missing (said by `objects`).
fn rendered_objects(overlay: &str, test: &str) -> Option<Vec<Value>> {
    let rendered = render(overlay, test);
    let objs = objects(&rendered);
    let _ = std::fs::remove_file(&rendered);
    objs
}

/// A rendered container's arguments.
fn args_of(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn the_manifests_render_validate_and_pass_checkov() {
    if !have("kubectl", &["kustomize", "--help"]) {
        return;
    }
    let rendered = [
        render("base", "check"),
        render("redis", "check"),
        render("metrics-on-node", "check"),
        render("watch", "check"),
    ];
    let text = std::fs::read_to_string(&rendered[1]).unwrap();
    assert!(text.contains("--redis-url-file=/run/secrets/turnpike/redis-url"));
    assert!(
        !text.contains("redis://"),
        "no Redis URL (or password) in the manifests"
    );
    assert!(text.contains("image: registry.example.com/turnpike:0.1.0"));

    if have("kubernetes-validate", &["--version"]) {
        let out = Command::new("kubernetes-validate")
            .args(["-k", "1.30.0", "--strict"])
            .args(&rendered)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{log}");
        // Every object was checked: base 5, Redis overlay 10, metrics 5,
        // watch 4.
        assert_eq!(log.matches(" passed for resource ").count(), 24, "{log}");
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
    let Some(objs) = rendered_objects("base", "pod") else {
        return;
    };
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
    let args: Vec<String> = args_of(c);
    let admin_port = port_named(c, c["readinessProbe"]["httpGet"]["port"].as_str().unwrap());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    // The admin API and the metrics on the node's loopback: nothing
    // outside the node reaches them; the kubelet probes 127.0.0.1.
    assert!(
        args.contains(&format!("--admin-listen=127.0.0.1:{admin_port}")),
        "{args:?}"
    );
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["host"], "127.0.0.1", "{probe}");
    }
    let scrape_port: u16 = 9641;
    assert!(
        args.contains(&format!("--metrics-listen=127.0.0.1:{scrape_port}")),
        "{args:?}"
    );
    assert!(pod["metadata"]["annotations"]["prometheus.io/port"].is_null());
    // The metrics-on-node overlay: on the node's address, and the scrape
    // annotation names that port.
    if let Some(objs) = rendered_objects("metrics-on-node", "pod") {
        let ds = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
        let t = &ds["spec"]["template"];
        let port = t["metadata"]["annotations"]["prometheus.io/port"]
            .as_str()
            .unwrap();
        let a = t["spec"]["containers"][0]["args"].as_array().unwrap();
        assert!(
            a.iter()
                .any(|v| v == &format!("--metrics-listen=$(NODE_IP):{port}")),
            "{a:?}"
        );
    }

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

    let mut child = Command::new(common::turnpike_bin())
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

/// What the Pod Security Standards (v1.30) forbid at `level` ("baseline"
/// or "restricted") in one pod spec: each violation in words. A
/// host-network pod's container ports are host ports (the API server
/// defaults hostPort to containerPort there).
fn pod_security_violations(spec: &Value, level: &str) -> Vec<String> {
    let mut v = Vec::new();
    let host_network = spec["hostNetwork"] == true;
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[key] == true {
            v.push(format!("{key}: true (host namespaces)"));
        }
    }
    let baseline_caps = [
        "AUDIT_WRITE",
        "CHOWN",
        "DAC_OVERRIDE",
        "FOWNER",
        "FSETID",
        "KILL",
        "MKNOD",
        "NET_BIND_SERVICE",
        "SETFCAP",
        "SETGID",
        "SETPCAP",
        "SETUID",
        "SYS_CHROOT",
    ];
    let safe_sysctls = [
        "kernel.shm_rmid_forced",
        "net.ipv4.ip_local_port_range",
        "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies",
        "net.ipv4.ping_group_range",
        "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time",
        "net.ipv4.tcp_fin_timeout",
        "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    ];
    let psc = &spec["securityContext"];
    for s in psc["sysctls"].as_array().into_iter().flatten() {
        if !safe_sysctls.contains(&s["name"].as_str().unwrap_or("")) {
            v.push(format!("sysctl {} (unsafe)", s["name"]));
        }
    }
    let seccomp_ok = |t: &Value| t.is_null() || t == "RuntimeDefault" || t == "Localhost";
    if !seccomp_ok(&psc["seccompProfile"]["type"]) {
        v.push("pod seccompProfile Unconfined".into());
    }
    let containers: Vec<&Value> = ["initContainers", "containers", "ephemeralContainers"]
        .iter()
        .flat_map(|k| spec[*k].as_array().into_iter().flatten())
        .collect();
    for c in &containers {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        if sc["privileged"] == true {
            v.push(format!("{name}: privileged"));
        }
        for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
            let cap = cap.as_str().unwrap_or("").trim_start_matches("CAP_");
            if !baseline_caps.contains(&cap) {
                v.push(format!("{name}: adds capability {cap}"));
            }
        }
        if sc["procMount"].as_str().is_some_and(|m| m != "Default") {
            v.push(format!("{name}: procMount {}", sc["procMount"]));
        }
        if !seccomp_ok(&sc["seccompProfile"]["type"]) {
            v.push(format!("{name}: seccompProfile Unconfined"));
        }
        for p in c["ports"].as_array().into_iter().flatten() {
            let host_port = p["hostPort"].as_u64().unwrap_or(0);
            if host_port != 0 || host_network {
                v.push(format!("{name}: host port {}", p["containerPort"]));
            }
        }
    }
    for vol in spec["volumes"].as_array().into_iter().flatten() {
        if !vol["hostPath"].is_null() {
            v.push(format!("volume {}: hostPath", vol["name"]));
        }
    }
    if level == "restricted" {
        let allowed = [
            "configMap",
            "csi",
            "downwardAPI",
            "emptyDir",
            "ephemeral",
            "persistentVolumeClaim",
            "projected",
            "secret",
            "name",
        ];
        for vol in spec["volumes"].as_array().into_iter().flatten() {
            for k in vol.as_object().unwrap().keys() {
                if !allowed.contains(&k.as_str()) {
                    v.push(format!("volume {}: type {k}", vol["name"]));
                }
            }
        }
        let pod_non_root = psc["runAsNonRoot"] == true;
        let pod_seccomp = !psc["seccompProfile"]["type"].is_null();
        if psc["runAsUser"] == 0 {
            v.push("pod runAsUser 0".into());
        }
        for c in &containers {
            let name = c["name"].as_str().unwrap_or("?");
            let sc = &c["securityContext"];
            if sc["allowPrivilegeEscalation"] != false {
                v.push(format!("{name}: allowPrivilegeEscalation not false"));
            }
            if !(sc["runAsNonRoot"] == true || (pod_non_root && sc["runAsNonRoot"] != false)) {
                v.push(format!("{name}: runAsNonRoot not true"));
            }
            if sc["runAsUser"] == 0 {
                v.push(format!("{name}: runAsUser 0"));
            }
            if !pod_seccomp && sc["seccompProfile"]["type"].is_null() {
                v.push(format!("{name}: no seccompProfile"));
            }
            let drops_all = sc["capabilities"]["drop"]
                .as_array()
                .is_some_and(|d| d.iter().any(|x| x == "ALL"));
            if !drops_all {
                v.push(format!("{name}: capabilities do not drop ALL"));
            }
            for cap in sc["capabilities"]["add"].as_array().into_iter().flatten() {
                if cap.as_str().unwrap_or("").trim_start_matches("CAP_") != "NET_BIND_SERVICE" {
                    v.push(format!(
                        "{name}: adds {cap} (restricted allows NET_BIND_SERVICE only)"
                    ));
                }
            }
        }
    }
    v
}

/// Every pod the manifests make is admitted by the Pod Security level its
/// namespace enforces (the rules of the Pod Security Standards, checked
/// on the rendered pod templates, since no cluster runs here). turnpike's
/// namespace is privileged only for host networking: the DaemonSet breaks
/// baseline by that and its host ports alone, and passes every other
/// restricted rule. Redis, in its own namespace, passes restricted.
#[test]
fn every_pod_is_admitted_by_its_namespaces_pod_security_level() {
    if !have("kubectl", &["kustomize", "--help"]) {
        return;
    }
    // The rule checker itself refuses what the standards refuse.
    let bad = serde_json::json!({
        "hostPID": true,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "securityContext": {"privileged": true, "capabilities": {"add": ["SYS_ADMIN"]}},
                        "ports": [{"containerPort": 80, "hostPort": 80}]}]
    });
    assert_eq!(
        pod_security_violations(&bad, "baseline").len(),
        5,
        "{:?}",
        pod_security_violations(&bad, "baseline")
    );
    let mut checked = 0;
    for overlay in ["base", "redis", "metrics-on-node", "watch"] {
        let Some(objs) = rendered_objects(overlay, "psa") else {
            return;
        };
        for o in objs.iter().filter(|o| !o["spec"]["template"]["spec"].is_null()) {
            let ns = o["metadata"]["namespace"].as_str().expect("a namespace");
            let level = objs
                .iter()
                .find(|n| n["kind"] == "Namespace" && n["metadata"]["name"] == ns)
                .and_then(|n| n["metadata"]["labels"]["pod-security.kubernetes.io/enforce"].as_str())
                .unwrap_or_else(|| panic!("{overlay}: namespace {ns} has no enforce label"))
                .to_owned();
            let spec = &o["spec"]["template"]["spec"];
            let name = o["metadata"]["name"].as_str().unwrap();
            if level != "privileged" {
                let v = pod_security_violations(spec, &level);
                assert!(v.is_empty(), "{overlay}: {name} in {ns} ({level}): {v:?}");
            }
            if name == "turnpike" {
                assert_eq!(
                    level, "privileged",
                    "host networking is admitted only by privileged"
                );
                let v = pod_security_violations(spec, "restricted");
                assert!(
                    v.iter()
                        .all(|x| x.contains("hostNetwork") || x.contains("host port")),
                    "turnpike needs privileged only for host networking: {v:?}"
                );
            } else {
                assert_eq!(
                    level, "restricted",
                    "{name} runs restricted, in a namespace of its own"
                );
                assert_ne!(ns, "turnpike", "{name} is not in turnpike's privileged namespace");
            }
            checked += 1;
        }
    }
    assert_eq!(
        checked, 5,
        "the DaemonSet three times, Redis and the watcher once"
    );
}

/// The Redis overlay as rendered, with a real redis-server: Redis started
/// with the manifest's own arguments and the password file its Secret
/// holds refuses a client without the password, and turnpike with the
/// DaemonSet's `--redis-url-file` (the URL with the password, from its
/// credentials Secret) reads users from it.
#[test]
fn the_redis_overlay_requires_a_password_that_turnpike_reads_from_a_file() {
    if !have("kubectl", &["kustomize", "--help"]) {
        return;
    }
    if !Path::new("/usr/bin/redis-server").exists() {
        common::missing("kubernetes redis", "redis-server not found");
        return;
    }
    let Some(objs) = rendered_objects("redis", "auth") else {
        return;
    };
    let redis = objs.iter().find(|o| o["kind"] == "Deployment").unwrap();
    let c = &redis["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<String> = args_of(c);
    let auth_mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "auth")
        .unwrap()["mountPath"]
        .as_str()
        .unwrap()
        .to_owned();
    let dir = std::env::temp_dir().join(format!("turnpike-k8s-redis-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("auth")).unwrap();
    std::fs::create_dir_all(dir.join("data")).unwrap();
    // The Secret, as README's command makes it.
    std::fs::write(dir.join("auth/redis.conf"), "requirepass k8s-redis-pw\n").unwrap();
    let port = common::free_port();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace(&auth_mount, dir.join("auth").to_str().unwrap())
                .replace("/data", dir.join("data").to_str().unwrap())
        })
        .chain(["--bind", "127.0.0.1", "--port", &port.to_string()].map(str::to_owned))
        .collect();
    let server = common::Redis(
        Command::new("/usr/bin/redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
        port,
    );
    let url = format!("redis://:k8s-redis-pw@127.0.0.1:{port}/0");
    let cli = |extra: &[&str]| {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(extra)
            .arg("ping")
            .output()
            .unwrap()
    };
    let end = Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&cli(&["-a", "k8s-redis-pw", "--no-auth-warning"]).stdout).contains("PONG")
    {
        assert!(Instant::now() < end, "redis-server did not start with {args:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let anon = String::from_utf8_lossy(&cli(&[]).stdout).into_owned();
    assert!(anon.contains("NOAUTH"), "no password, no Redis: {anon}");

    // The DaemonSet's flag, with the credentials Secret's file.
    let ds = objs.iter().find(|o| o["kind"] == "DaemonSet").unwrap();
    let flag = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .find(|a| a.starts_with("--redis-url-file="))
        .unwrap()
        .to_owned();
    let url_file = dir.join("redis-url");
    std::fs::write(&url_file, format!("{url}\n")).unwrap();
    let flag = flag.replace("/run/secrets/turnpike/redis-url", url_file.to_str().unwrap());
    let mut add = Command::new(common::turnpike_bin())
        .args([
            "user",
            "add",
            "kim",
            "--realm",
            "k8s.example",
            "--redis-url",
            &url,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut add.stdin.take().unwrap(), b"kim-pw\n").unwrap();
    assert!(
        add.wait().unwrap().success(),
        "user add through the password-protected Redis"
    );
    let (proc_, started, _rest) = common::spawn_server(
        Command::new(common::turnpike_bin())
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--no-tls",
                "--threads",
                "1",
                "--realm",
                "k8s.example",
            ])
            .arg(&flag),
    );
    assert!(started.contains("redis 1 user"), "{started}");
    assert!(
        !started.contains("k8s-redis-pw"),
        "the password is not logged: {started}"
    );
    let addr = common::listen_addr(&started);
    let mut c = common::client(
        &turnpike_client::client::ClientTransport::Udp,
        addr,
        "kim",
        "kim-pw",
    );
    c.allocate().expect("a user from the Redis the URL file names");
    let _ = c.refresh(0);
    drop(proc_);
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The watcher's Deployment as rendered, run with the real binary: its
/// arguments (targets pointed at a real turnpike on loopback), its
/// Secret's file name, its probe port and path, and its scrape
/// annotation; the relay check passes through a second allocation
/// (`--peer-via-relay`), as it must from behind a cluster's NAT.
#[test]
fn the_watch_pod_as_rendered_checks_a_real_server_and_answers_its_probes() {
    if !have("kubectl", &["kustomize", "--help"]) {
        return;
    }
    let Some(objs) = rendered_objects("watch", "pod") else {
        return;
    };
    let d = objs
        .iter()
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment");
    let pod = &d["spec"]["template"];
    let c = &pod["spec"]["containers"][0];
    let args: Vec<String> = args_of(c);
    assert_eq!(args[0], "watch");
    assert!(args.contains(&"--peer-via-relay".to_owned()), "{args:?}");
    let port = port_named(c, c["readinessProbe"]["httpGet"]["port"].as_str().unwrap());
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/metrics");
    assert_eq!(
        pod["metadata"]["annotations"]["prometheus.io/port"],
        port.to_string(),
        "the scrape annotation names the metrics port"
    );
    assert!(args.contains(&format!("--listen=0.0.0.0:{port}")), "{args:?}");
    let secret = pod["spec"]["volumes"][0]["secret"]["secretName"]
        .as_str()
        .unwrap();
    assert_eq!(secret, "turnpike-watch");
    let mount = c["volumeMounts"][0]["mountPath"].as_str().unwrap().to_owned();

    // A real turnpike with the watch user; relayed addresses on loopback,
    // so it allows 127.0.0.1 (the internal-range check says so, below).
    let server = turnpike::runtime::start(
        &common::settings(&["--user", "watch:a-watch-password", "--allow-peer", "127.0.0.1/32"]).unwrap(),
    )
    .unwrap();
    let (p, t) = (server.listen[0].port(), server.tls_listen[0].port());
    let root = std::env::temp_dir().join(format!("turnpike-k8s-watch-{}", std::process::id()));
    let dir = root.join(mount.trim_start_matches('/'));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("password"), "a-watch-password\n").unwrap();
    let metrics = common::free_port();
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.replace(&mount, dir.to_str().unwrap())
                .replace(&format!("0.0.0.0:{port}"), &format!("127.0.0.1:{metrics}"))
                .replace("turn.example.org:3478", &format!("127.0.0.1:{p}"))
                .replace(
                    "turn.example.org:5349?transport=dtls",
                    &format!("127.0.0.1:{}?transport=dtls", server.dtls_listen[0].port()),
                )
                .replace("turn.example.org:5349", &format!("127.0.0.1:{t}"))
                .replace("--interval=30", "--interval=1")
        })
        .collect();
    assert!(!args.iter().any(|a| a.contains("example.org")), "{args:?}");
    let (_watch, body) = crate::watch::four_transports_up(&args, metrics);
    assert!(body.contains("turnpike_watch_certificate_days_left{"), "{body}");
    for l in body.lines().filter(|l| l.starts_with("turnpike_watch_drift{")) {
        let expected = if l.contains("check=\"internal_peer\"") {
            " 1"
        } else {
            " 0"
        };
        assert!(l.ends_with(expected), "{l}");
    }
    drop(_watch);
    server.shutdown();
    let _ = std::fs::remove_dir_all(&root);
}
