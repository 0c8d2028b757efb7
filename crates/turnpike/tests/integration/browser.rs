//! The pages in real browsers: Debian's chromium and firefox-esr, driven
//! by puppeteer-core (tests/browser/drive.mjs), against a real turnpike
//! (and, for the fleet view, three nodes and a real redis-server on
//! loopback, as in fleet.rs).
//! The browser runs in a client network namespace and the server in a
//! server namespace, joined by a veth pair, both made and removed here: a
//! browser sees the server as a remote host, and the test can make TURN
//! unreachable with nftables without touching the host. Screenshots go to
//! target/test-artifacts/. Needs root, `ip`, `nft`, node with the npm
//! packages installed (.ci/run does it) and both browsers; skipped with a
//! message otherwise, except under CI=true, where a missing part fails.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use turnpike_client::client::{Channel, ClientTransport, TurnClient};

const TOKEN: &str = "browser-test-admin-token-0123";
const SERVER_IP: &str = "10.78.0.1";
const CLIENT_IP: &str = "10.78.0.2";

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Where screenshots are kept: target/test-artifacts.
pub(crate) fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d.canonicalize().unwrap()
}

/// Why the browser tests cannot run here, if they cannot.
fn missing() -> Option<String> {
    if common::euid() != 0 {
        return Some("not root (network namespaces)".into());
    }
    for (tool, path) in [
        ("chromium", "/usr/bin/chromium"),
        ("firefox-esr", "/usr/bin/firefox-esr"),
        ("nft", "/usr/sbin/nft"),
    ] {
        if !Path::new(path).exists() {
            return Some(format!("{tool} is not installed"));
        }
    }
    if !Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        return Some("node is not installed".into());
    }
    if !driver_dir().join("node_modules/puppeteer-core").exists() {
        return Some("puppeteer-core is not installed (npm ci in crates/turnpike/tests/browser)".into());
    }
    None
}

fn skip_unless_ready(test: &str) -> bool {
    match missing() {
        None => false,
        Some(why) if std::env::var("CI").as_deref() == Ok("true") => panic!("{test}: {why}"),
        Some(why) => {
            eprintln!("skipping {test}: {why}");
            true
        }
    }
}

struct Net {
    client: String,
    server: String,
}

impl Net {
    fn new(tag: &str) -> Net {
        let id = std::process::id() % 100_000;
        let net = Net {
            client: format!("tpb{tag}c{id}"),
            server: format!("tpb{tag}s{id}"),
        };
        let ip = |args: &[&str]| {
            let ok = Command::new("ip").args(args).status().is_ok_and(|s| s.success());
            assert!(ok, "ip {}", args.join(" "));
        };
        ip(&["netns", "add", &net.client]);
        ip(&["netns", "add", &net.server]);
        let (vc, vs) = (format!("vc{tag}{id}"), format!("vs{tag}{id}"));
        ip(&[
            "link",
            "add",
            &vc,
            "netns",
            &net.client,
            "type",
            "veth",
            "peer",
            "name",
            &vs,
            "netns",
            &net.server,
        ]);
        ip(&[
            "-n",
            &net.client,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            &vc,
        ]);
        ip(&[
            "-n",
            &net.server,
            "addr",
            "add",
            &format!("{SERVER_IP}/24"),
            "dev",
            &vs,
        ]);
        for (ns, dev) in [(&net.client, &vc), (&net.server, &vs)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        // Browsers gather on the interface of the default route.
        ip(&["-n", &net.client, "route", "add", "default", "via", SERVER_IP]);
        net
    }

    fn exec(&self, ns: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]);
        c
    }

    fn server(&self) -> common::Proc {
        let mut cmd = self.exec(&self.server);
        cmd.arg(common::turnpike_bin()).args([
            "serve",
            "--listen",
            &format!("{SERVER_IP}:3478"),
            "--tls-listen",
            &format!("{SERVER_IP}:5349"),
            "--user",
            &format!("{}:{}", common::USER, common::PASSWORD),
            // The relay check sends between two of the server's own
            // relayed addresses, as two relayed browsers would.
            "--allow-peer",
            &format!("{SERVER_IP}/32"),
            "--admin-listen",
            &format!("{SERVER_IP}:9642"),
            "--admin-token",
            TOKEN,
            "--web-ui",
            "--web-listen",
            &format!("{SERVER_IP}:8080"),
            "--web-credentials-per-minute",
            "60",
        ]);
        let (p, _, _) = common::spawn_server(&mut cmd);
        p
    }

    /// Runs drive.mjs in the client namespace; its JSON.
    fn drive(&self, browser: &str, args: &[&str]) -> serde_json::Value {
        let mut c = self.exec(&self.client);
        c.arg("node");
        drive(c, browser, args)
    }

    fn nft(&self, rules: &str) {
        let mut c = self.exec(&self.server);
        c.args(["nft", "-f", "-"]).stdin(Stdio::piped());
        let mut child = c.spawn().unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), rules.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft: {rules}");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs drive.mjs through `node` (a command ready to take its
/// arguments); its JSON.
fn drive(mut node: Command, browser: &str, args: &[&str]) -> serde_json::Value {
    let out = node
        .current_dir(driver_dir())
        .arg("drive.mjs")
        .arg(browser)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("drive.mjs {browser} {args:?}: {e}: {text}"));
    assert!(v.get("error").is_none(), "{browser}: {v:#}");
    v
}

fn transport<'a>(v: &'a serde_json::Value, t: &str) -> &'a serde_json::Value {
    &v["transports"][t]
}

fn types(v: &serde_json::Value, t: &str) -> Vec<String> {
    transport(v, t)["types"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

#[test]
fn the_ice_page_relays_in_chromium_and_firefox_and_fails_plainly_when_turn_is_unreachable() {
    // Two browsers load the machine and wait on ICE timers: nothing else runs beside it.
    let _alone = common::exclusive();
    if skip_unless_ready("ice page") {
        return;
    }
    let net = Net::new("i");
    let _server = net.server();
    let shots = artifacts();
    let operator = format!("http://{SERVER_IP}:9642/ice");
    let public = format!("http://{SERVER_IP}:8080/");
    for browser in ["chromium", "firefox"] {
        for (url, token, name) in [(&operator, TOKEN, "operator"), (&public, "", "public")] {
            let shot = shots.join(format!("ice-{browser}-{name}.png"));
            let v = net.drive(browser, &["ice", url, token, shot.to_str().unwrap()]);
            for t in ["udp", "tcp"] {
                assert!(
                    types(&v, t).contains(&"relay".to_owned()),
                    "{browser} {name}: a relay candidate over {t}: {v:#}"
                );
                assert_eq!(
                    transport(&v, t)["verdict"],
                    "pass",
                    "{browser} {name}: relayed over {t}: {v:#}"
                );
                assert!(
                    transport(&v, t)["relayed"]
                        .as_str()
                        .unwrap()
                        .starts_with(&format!("{SERVER_IP}:")),
                    "{v:#}"
                );
                assert!(transport(&v, t)["relayRttMs"].as_f64().is_some(), "{v:#}");
            }
            assert_eq!(transport(&v, "stun")["verdict"], "pass", "{v:#}");
            assert!(
                transport(&v, "stun")["reflexive"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("{CLIENT_IP}:")),
                "the reflexive address is the browser's: {v:#}"
            );
            // The self-signed certificate is not one a browser trusts: the
            // page says TLS fails and why, and the verdict is not a pass.
            assert_ne!(transport(&v, "tls")["verdict"], "pass", "{v:#}");
            assert!(
                transport(&v, "tls")["advice"]
                    .as_str()
                    .unwrap()
                    .contains("certificate"),
                "{v:#}"
            );
            assert_eq!(v["verdict"], "partial", "{v:#}");
            assert!(shot.exists());
        }
    }
    // TURN made unreachable: the server's ports drop everything.
    net.nft(
        "table inet tpb {\n chain input {\n type filter hook input priority 0; policy accept;\n \
         udp dport 3478 drop\n tcp dport { 3478, 5349 } drop\n }\n}\n",
    );
    for browser in ["chromium", "firefox"] {
        let shot = shots.join(format!("ice-{browser}-unreachable.png"));
        let v = net.drive(browser, &["ice", &operator, TOKEN, shot.to_str().unwrap()]);
        assert_eq!(v["verdict"], "fail", "{browser}: {v:#}");
        assert!(v["verdictText"].as_str().unwrap().starts_with("Fail"), "{v:#}");
        for t in ["udp", "tcp"] {
            assert!(!types(&v, t).contains(&"relay".to_owned()), "{v:#}");
            let advice = transport(&v, t)["advice"].as_str().unwrap();
            assert!(
                advice.contains("no answer") && advice.contains("firewall"),
                "{browser} {t}: {advice}"
            );
        }
    }
}

#[test]
fn the_dashboard_shows_an_allocation_and_deletes_it_in_chromium_and_firefox() {
    // Two browsers load the machine and wait on ICE timers: nothing else runs beside it.
    let _alone = common::exclusive();
    if skip_unless_ready("dashboard") {
        return;
    }
    let net = Net::new("d");
    let _server = net.server();
    let shots = artifacts();
    let url = format!("http://{SERVER_IP}:9642/dashboard");
    for browser in ["chromium", "firefox"] {
        let server: std::net::SocketAddr = format!("{SERVER_IP}:3478").parse().unwrap();
        let (mut client, relayed) = common::in_ns(&net.client, move || {
            let ch = Channel::connect(&ClientTransport::Udp, server, Duration::from_secs(3)).unwrap();
            let mut c = TurnClient::new(ch, common::USER, common::PASSWORD);
            let a = c.allocate().unwrap();
            (c, a.relayed)
        });
        let shot = shots.join(format!("dashboard-{browser}.png"));
        let v = net.drive(
            browser,
            &[
                "dashboard",
                &url,
                TOKEN,
                shot.to_str().unwrap(),
                &relayed.to_string(),
            ],
        );
        assert_eq!(v["removed"], true, "{v:#}");
        assert_eq!(v["tiles"]["allocations"], "1", "{v:#}");
        assert_eq!(v["tiles"]["UDP"], "1", "{v:#}");
        assert_eq!(v["users"][0], common::USER, "the operator sees usernames: {v:#}");
        assert!(v["node"].as_str().unwrap().contains("serving"), "{v:#}");
        // Deleted on the server, not only on the page.
        let refresh = common::in_ns(&net.client, move || {
            client.refresh(600).map(|_| ()).map_err(|e| e.to_string())
        });
        assert!(
            refresh.is_err_and(|e| e.contains("437")),
            "the allocation is gone"
        );
        assert!(shot.exists());
    }
}

#[test]
fn the_fleet_view_drains_a_node_and_finds_and_deletes_a_users_sessions_in_chromium_and_firefox() {
    let _alone = common::exclusive();
    if skip_unless_ready("fleet view") {
        return;
    }
    use crate::fleet::{http, node, settled};
    let redis = common::redis_server();
    let web = ["--user", "gil:g1l-pw", "--web-ui"];
    let nodes: Vec<_> = (1..=3).map(|n| node(n, redis.1, &web)).collect();
    let [n1, n2, n3] = [&nodes[0], &nodes[1], &nodes[2]];
    settled(&[n1, n2, n3], 3.0);
    let url = format!("http://{}/dashboard", n1.admin);
    let shots = artifacts();
    for browser in ["chromium", "firefox"] {
        // One call on node 2 and one on node 3, none on node 1.
        let call = |server| {
            let ch = Channel::connect(&ClientTransport::Udp, server, Duration::from_secs(2)).unwrap();
            let mut c = TurnClient::new(ch, "gil", "g1l-pw");
            let relayed = c.allocate().unwrap().relayed.to_string();
            (c, relayed)
        };
        let ((mut on2, relayed2), (mut on3, relayed3)) = (call(n2.addr), call(n3.addr));
        // Node 3's readiness as a load balancer sees it, while the page
        // drains and undrains it.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (stop, admin) = (stop.clone(), n3.admin);
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let s = http(admin, "GET", "/readyz").0;
                    if seen.last() != Some(&s) {
                        seen.push(s);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                seen
            })
        };
        let shot = shots.join(format!("fleet-{browser}.png"));
        let v = drive(
            Command::new("node"),
            browser,
            &[
                "fleet",
                &url,
                crate::fleet::TOKEN,
                shot.to_str().unwrap(),
                "node3",
                "gil",
            ],
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let readiness = watcher.join().unwrap();
        assert_eq!(
            readiness,
            [200, 503, 200],
            "node 3 drained from the page, then undrained: {v:#}"
        );

        let rows = v["nodes"].as_array().unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r["node"].as_str().unwrap()).collect();
        assert_eq!(names, ["node1", "node2", "node3"], "{v:#}");
        for r in rows {
            assert_eq!(r["health"], "ok", "{v:#}");
            assert_eq!(r["draining"], "false", "{v:#}");
            let version = r["cells"][1].as_str().unwrap();
            assert!(
                version.starts_with(&format!("{}+", env!("CARGO_PKG_VERSION"))),
                "{v:#}"
            );
        }
        assert!(
            rows[0]["cells"][0].as_str().unwrap().contains("this node"),
            "{v:#}"
        );
        assert_eq!(rows[1]["cells"][4], "1", "node 2 holds one allocation: {v:#}");
        assert!(v["drainedState"].as_str().unwrap().contains("draining"), "{v:#}");
        let mut found: Vec<(String, String)> = v["found"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["node"].as_str().unwrap().to_owned(),
                    f["relayed"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        found.sort();
        assert_eq!(
            found,
            [("node2".to_owned(), relayed2), ("node3".to_owned(), relayed3)],
            "the search found both calls on their nodes: {v:#}"
        );
        // "Delete on every node" deleted them on the servers.
        for c in [&mut on2, &mut on3] {
            let r = c.refresh(600).map(|_| ()).map_err(|e| e.to_string());
            assert!(r.is_err_and(|e| e.contains("437")), "the allocation is gone");
        }
        assert!(shot.exists());
    }
}
