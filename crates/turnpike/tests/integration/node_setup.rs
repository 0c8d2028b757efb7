//! What a node in a fleet (a Kubernetes pod, a cloud VM) needs at start
//! and while it runs, with the real binary:
//! - `--external-ip-from`: behind a real NAT (network namespaces, veth
//!   pairs and an nftables masquerade, made and removed here), the node
//!   learns its public address from a STUN server on the far side and
//!   advertises it in XOR-RELAYED-ADDRESS. Needs root, `ip` and `nft`;
//!   skipped with a message otherwise.
//! - `--auth-secret-file` and `--reload-on-change`: a REST secret rotated
//!   in its file, and a user changed in the config file, take effect
//!   without a signal, as a Kubernetes Secret or ConfigMap update does.

use crate::common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use turnpike_client::client::{Channel, ClientTransport, TurnClient};

fn bin() -> Command {
    Command::new(common::turnpike_bin())
}

/// Three namespaces: `node` (10.81.0.2) — `router` (10.81.0.1 |
/// 10.82.0.1, masquerading what leaves towards `stun`) — `stun`
/// (10.82.0.2).
struct Nat {
    names: [String; 3],
}

impl Nat {
    fn create() -> Option<Nat> {
        let euid = common::euid();
        let have_nft = Command::new("nft")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if euid != 0 || !have_nft {
            common::missing(
                "external-ip-from behind NAT",
                "needs root and nft (apt-get install nftables)",
            );
            return None;
        }
        let id = std::process::id();
        let names = [
            format!("tp-nat-node-{id}"),
            format!("tp-nat-rt-{id}"),
            format!("tp-nat-stun-{id}"),
        ];
        for n in &names {
            let st = Command::new("ip").args(["netns", "add", n]).status().unwrap();
            assert!(st.success(), "ip netns add {n}");
        }
        let nat = Nat { names };
        let [node, rt, stun] = &nat.names;
        let (a, b, c, d) = (
            format!("tpn{}", id % 100000),
            format!("tpr{}", id % 100000),
            format!("tps{}", id % 100000),
            format!("tpt{}", id % 100000),
        );
        let ip = |ns: &str, args: &[&str]| {
            let st = Command::new("ip").args(["-n", ns]).args(args).status().unwrap();
            assert!(st.success(), "ip -n {ns} {args:?}");
        };
        // The veth pairs are made in the router and one end moved out.
        ip(rt, &["link", "add", &a, "type", "veth", "peer", "name", &b]);
        ip(rt, &["link", "set", &a, "netns", node]);
        ip(rt, &["link", "add", &c, "type", "veth", "peer", "name", &d]);
        ip(rt, &["link", "set", &d, "netns", stun]);
        for (ns, dev, addr) in [
            (node.as_str(), a.as_str(), "10.81.0.2/24"),
            (rt, b.as_str(), "10.81.0.1/24"),
            (rt, c.as_str(), "10.82.0.1/24"),
            (stun, d.as_str(), "10.82.0.2/24"),
        ] {
            ip(ns, &["addr", "add", addr, "dev", dev]);
            ip(ns, &["link", "set", dev, "up"]);
            ip(ns, &["link", "set", "lo", "up"]);
        }
        ip(node, &["route", "add", "default", "via", "10.81.0.1"]);
        ip(stun, &["route", "add", "default", "via", "10.82.0.1"]);
        let sh = |ns: &str, args: &[&str]| {
            let st = Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "{ns}: {args:?}");
        };
        sh(rt, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        sh(
            rt,
            &[
                "nft",
                &format!(
                    "add table ip nat; add chain ip nat post {{ type nat hook postrouting priority 100; }}; \
                     add rule ip nat post oifname {c} masquerade"
                ),
            ],
        );
        Some(nat)
    }

    fn exec(&self, which: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[which]]);
        c
    }
}

impl Drop for Nat {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth ends and nftables tables.
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

#[test]
fn behind_nat_the_node_learns_and_advertises_its_public_address() {
    let Some(nat) = Nat::create() else {
        return;
    };
    // The STUN server on the far side of the NAT: turnpike itself.
    let mut stun = nat.exec(2);
    stun.arg(common::turnpike_bin()).args([
        "serve",
        "--listen",
        "10.82.0.2:3478",
        "--no-tls",
        "--threads",
        "1",
    ]);
    let (_stun, _, _) = common::spawn_server(&mut stun);

    // The node behind it.
    let mut node = nat.exec(0);
    node.arg(common::turnpike_bin()).args([
        "serve",
        "--listen",
        "10.81.0.2:3478",
        "--no-tls",
        "--threads",
        "1",
        "--user",
        "alice:wonderland",
        "--external-ip-from",
        "10.82.0.2:3478",
    ]);
    let (_node, started, _) = common::spawn_server(&mut node);
    assert!(started.contains("external_ipv4=10.82.0.1"), "{started}");

    // A client next to the node is told the public address.
    let relayed = common::in_ns(&nat.names[0], || {
        let ch = Channel::connect(
            &ClientTransport::Udp,
            "10.81.0.2:3478".parse().unwrap(),
            Duration::from_secs(3),
        )
        .unwrap();
        let mut c = TurnClient::new(ch, "alice", "wonderland");
        c.allocate().unwrap().relayed
    });
    assert_eq!(relayed.ip().to_string(), "10.82.0.1");

    // A STUN server that does not answer refuses the start, saying so.
    let out = nat
        .exec(0)
        .arg(common::turnpike_bin())
        .args(["serve", "--listen", "10.81.0.2:3479", "--no-tls", "--user", "a:b"])
        .args(["--external-ip-from", "10.82.0.2:3999"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("external-ip-from 10.82.0.2:3999") && err.contains("--external-ip"),
        "{err}"
    );
}

#[test]
fn a_bad_external_ip_from_or_reload_on_change_is_refused_at_start() {
    for (args, want) in [
        (
            &["--external-ip-from", "stun.example.org"][..],
            "external-ip-from",
        ),
        (&["--reload-on-change"][..], "reload-on-change: nothing to watch"),
    ] {
        let out = bin()
            .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--user", "a:b"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(want), "{args:?}: {err}");
    }
    let missing = std::env::temp_dir().join("turnpike-no-such-secret-file");
    let out = bin()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-tls",
            "--auth-secret-file",
        ])
        .arg(&missing)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("auth-secret-file: cannot read"),
        "{err}"
    );
}

fn allocates(server: SocketAddr, user: &str, pw: &str) -> bool {
    let ch = Channel::connect(&ClientTransport::Udp, server, Duration::from_secs(2)).unwrap();
    let mut c = TurnClient::new(ch, user, pw);
    c.set_timeout(Duration::from_millis(800));
    let ok = c.allocate().is_ok();
    if ok {
        let _ = c.refresh(0);
    }
    ok
}

fn rest(secret: &[u8]) -> (String, String) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let user = format!("{}:pod", now + 600);
    let pw = turn_core::auth::rest_password(secret, &user);
    (user, pw)
}

/// Polls `ok` for up to 10 s (the watch looks every 2 s).
fn within(ok: impl Fn() -> bool) -> Option<Duration> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if ok() {
            return Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

#[test]
fn a_rotated_secret_file_and_an_edited_config_apply_without_a_signal() {
    // Waits on the 2 s file watch within a deadline: nothing else runs beside it.
    let _alone = common::exclusive();
    let dir = std::env::temp_dir().join(format!("turnpike-node-setup-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (config, secret) = (dir.join("turnpike.toml"), dir.join("rest-secret"));
    std::fs::write(&config, "realm = \"pods.example\"\nuser = [\"carol:first-pw\"]\n").unwrap();
    std::fs::write(&secret, "secret-one\n").unwrap();
    let mut cmd = bin();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--threads", "1"])
        .arg("--config")
        .arg(&config)
        .arg("--auth-secret-file")
        .arg(&secret)
        .arg("--reload-on-change");
    let (_server, started, logs) = common::spawn_server(&mut cmd);
    let addr = common::listen_addr(&started);

    let (u1, p1) = rest(b"secret-one");
    assert!(allocates(addr, &u1, &p1), "the secret from the file works");
    assert!(allocates(addr, "carol", "first-pw"));

    // Rotation, as a Kubernetes Secret update does it: the new secret
    // first, both for a while, then the old one gone.
    std::fs::write(&secret, "secret-two\nsecret-one\n").unwrap();
    let (u2, p2) = rest(b"secret-two");
    if within(|| allocates(addr, &u2, &p2)).is_none() {
        let logs: Vec<String> = logs.try_iter().collect();
        panic!(
            "the new secret within 10 s; the server said:\n{}",
            logs.join("\n")
        );
    }
    assert!(
        allocates(addr, &u1, &p1),
        "the old secret still, during the overlap"
    );
    std::fs::write(&secret, "secret-two\n").unwrap();
    within(|| !allocates(addr, &u1, &p1)).expect("the old secret refused within 10 s");
    assert!(allocates(addr, &u2, &p2));

    // A ConfigMap update: the file replaced by a rename (as the kubelet's
    // symlink swap), carol's password changed.
    let next = dir.join("turnpike.toml.next");
    std::fs::write(&next, "realm = \"pods.example\"\nuser = [\"carol:second-pw\"]\n").unwrap();
    std::fs::rename(&next, &config).unwrap();
    within(|| allocates(addr, "carol", "second-pw")).expect("the edited config within 10 s");
    assert!(!allocates(addr, "carol", "first-pw"));

    // A broken edit is logged and the running configuration stays.
    std::fs::write(&config, "realm = \n").unwrap();
    let end = Instant::now() + Duration::from_secs(10);
    let mut saw = false;
    while Instant::now() < end && !saw {
        if let Ok(l) = logs.recv_timeout(Duration::from_millis(500)) {
            saw = l.contains("reload failed");
        }
    }
    assert!(saw, "a failed reload is logged");
    assert!(allocates(addr, "carol", "second-pw"));
    let _ = std::fs::remove_dir_all(&dir);
}
