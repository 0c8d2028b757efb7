//! A multi-homed host, for real: a private network namespace with two
//! addresses of each family on one veth, a wildcard listener, and clients
//! in the same namespace. Each Binding is answered from the address it was
//! sent to, and an Allocate that reached the second address relays from
//! it. Needs root and `ip` (iproute2); skipped with a message otherwise.

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

struct Netns {
    name: String,
}

impl Netns {
    fn create() -> Option<Netns> {
        let name = format!("tp-mh-{}", std::process::id());
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return None;
        }
        let ns = Netns { name };
        let veth_a = format!("mha{}", std::process::id() % 100000);
        let veth_b = format!("mhb{}", std::process::id() % 100000);
        for cmd in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", &veth_a, "type", "veth", "peer", "name", &veth_b],
            vec!["link", "set", &veth_a, "up"],
            vec!["link", "set", &veth_b, "up"],
            vec!["addr", "add", "10.200.0.1/24", "dev", &veth_a],
            vec!["addr", "add", "10.200.0.2/24", "dev", &veth_a],
            vec!["addr", "add", "10.200.0.9/24", "dev", &veth_b],
            vec!["-6", "addr", "add", "fd00:200::1/64", "dev", &veth_a, "nodad"],
            vec!["-6", "addr", "add", "fd00:200::2/64", "dev", &veth_a, "nodad"],
            vec!["-6", "addr", "add", "fd00:200::9/64", "dev", &veth_b, "nodad"],
        ] {
            let st = Command::new("ip")
                .args(["-n", &ns.name])
                .args(&cmd)
                .status()
                .unwrap();
            assert!(st.success(), "ip {cmd:?}");
        }
        Some(ns)
    }

    fn exec(&self) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace removes its veth pair with it.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends a Binding from an unconnected socket (so an answer from any
/// address is seen) and prints the address the answer came from.
const BINDING_SOURCE: &str = r#"
import socket, sys, os
dst, port, src = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fam = socket.AF_INET6 if ':' in dst else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.bind((src, 0))
s.settimeout(2)
req = b'\x00\x01\x00\x00\x21\x12\xa4\x42' + os.urandom(12)
for _ in range(3):
    s.sendto(req, (dst, port))
    try:
        data, frm = s.recvfrom(2048)
        print(frm[0]); sys.exit(0)
    except socket.timeout:
        pass
print('none')
"#;

#[test]
fn wildcard_listener_answers_and_relays_from_the_address_reached() {
    if not_root() {
        common::missing("multihome", "needs root for network namespaces");
        return;
    }
    let Some(ns) = Netns::create() else {
        common::missing(
            "multihome",
            "`ip netns add` failed (no iproute2 or no namespaces here)",
        );
        return;
    };
    let server = Server(
        ns.exec()
            .arg(common::turnpike_bin())
            .args([
                "serve",
                "--listen",
                "0.0.0.0:3478",
                "--listen",
                "[::]:3478",
                "--no-tls",
                "--user",
                "alice:wonderland",
                "--allow-peer",
                "10.200.0.0/24",
                "--allow-peer",
                "fd00:200::/64",
                "--threads",
                "2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(800));
    for (dst, src) in [
        ("10.200.0.1", "10.200.0.9"),
        ("10.200.0.2", "10.200.0.9"),
        ("fd00:200::1", "fd00:200::9"),
        ("fd00:200::2", "fd00:200::9"),
    ] {
        let out = ns
            .exec()
            .args(["python3", "-c", BINDING_SOURCE, dst, "3478", src])
            .output()
            .unwrap();
        let from = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert_eq!(from, dst, "a Binding to {dst} must be answered from {dst}");
    }
    // `probe turn` allocates (a connected socket: a reply from another
    // address would be lost) and reports the relayed addresses.
    for (dst, family, want) in [
        ("10.200.0.2:3478", "ipv4", "relayed 10.200.0.2:"),
        ("10.200.0.1:3478", "ipv4", "relayed 10.200.0.1:"),
        ("[fd00:200::2]:3478", "ipv6", "relayed [fd00:200::2]:"),
        ("[fd00:200::1]:3478", "ipv6", "relayed [fd00:200::1]:"),
    ] {
        let (ok, detail) = probe_allocate(&ns, dst, family);
        assert!(ok, "{dst} {family}: {detail}");
        assert!(detail.starts_with(want), "{dst} {family}: {detail}");
    }
    // The namespace has no IPv4 route off the host, so an IPv6 client that
    // asks for the default family cannot be given a relay it could use:
    // 440, never a loopback relay.
    let (ok, detail) = probe_allocate(&ns, "[fd00:200::2]:3478", "ipv4");
    assert!(!ok && detail.contains("440"), "{detail}");
    // Dual over IPv6: the IPv6 relay is made, and the IPv4 family that
    // cannot be served is reported with ADDRESS-ERROR-CODE (RFC 8656 §7.2).
    let (ok, detail) = probe_allocate(&ns, "[fd00:200::2]:3478", "dual");
    assert!(ok, "{detail}");
    assert!(detail.starts_with("relayed [fd00:200::2]:"), "{detail}");
    assert!(detail.contains("no IPv4 relay: 440"), "{detail}");
    drop(server);
}

/// `turnpike probe turn` inside the namespace: the allocate step's result.
fn probe_allocate(ns: &Netns, dst: &str, family: &str) -> (bool, String) {
    let out = ns
        .exec()
        .arg(common::turnpike_bin())
        .args([
            "probe",
            "turn",
            &format!("turn:{dst}"),
            "--user",
            "alice",
            "--password",
            "wonderland",
        ])
        .args([
            "--relay-family",
            family,
            "--transport",
            "udp",
            "--json",
            "--timeout-ms",
            "1500",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("probe: {e}: {}", String::from_utf8_lossy(&out.stdout)));
    let alloc = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"].as_str().unwrap_or("").ends_with("allocate"))
        .unwrap_or_else(|| panic!("no allocate step: {v}"))
        .clone();
    (
        alloc["ok"] == true,
        alloc["detail"].as_str().unwrap_or("").to_owned(),
    )
}

/// Whether this process is not root (namespaces need CAP_SYS_ADMIN).
fn not_root() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    !status
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}
