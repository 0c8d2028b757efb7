//! A fleet behind real load balancers, in network namespaces made and
//! removed here: a client namespace, a balancer namespace with HAProxy
//! (TCP, PROXY protocol v2 to the nodes) and nftables (UDP, DNAT by a hash
//! of the client's address and port: sticky, source-preserving), and a
//! node namespace with three turnpike nodes and a redis-server. Every
//! process is started here and stopped by PID. Needs root, `ip`, `nft`,
//! `haproxy` and `redis-server`; skipped with a message otherwise.
//! (IPVS is the other balancer the issue names; this kernel has no ip_vs
//! module, so nftables stands in for UDP.)

use crate::common;

use std::io::{BufRead, BufReader};
use std::net::{TcpStream, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use turnpike_client::client::{Channel, ClientError, ClientTransport, Received, TurnClient};

const TOKEN: &str = "netns-fleet-admin-token-0123";
const VIP: &str = "10.90.0.1:3478";
const PROPAGATION: Duration = Duration::from_millis(2300);

struct Topology {
    names: [String; 3],
    _procs: Vec<common::Proc>,
    node_logs: Vec<mpsc::Receiver<String>>,
    haproxy_cfg: std::path::PathBuf,
}

impl Drop for Topology {
    fn drop(&mut self) {
        self._procs.clear();
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
        let _ = std::fs::remove_file(&self.haproxy_cfg);
    }
}

fn tool(name: &str, arg: &str) -> bool {
    Command::new(name)
        .arg(arg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

const CLIENT: usize = 0;
const LB: usize = 1;
const NODES: usize = 2;

impl Topology {
    fn exec(&self, ns: usize) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[ns]]);
        c
    }

    fn build() -> Option<Topology> {
        let missing: Vec<&str> = [
            ("nft", "--version"),
            ("haproxy", "-v"),
            ("redis-server", "--version"),
        ]
        .into_iter()
        .filter(|(t, a)| !tool(t, a))
        .map(|(t, _)| t)
        .collect();
        if common::euid() != 0 || !missing.is_empty() {
            common::missing("fleet behind balancers", &format!("needs root and {missing:?}"));
            return None;
        }
        let id = std::process::id();
        let names = [
            format!("tp-fl-c-{id}"),
            format!("tp-fl-lb-{id}"),
            format!("tp-fl-n-{id}"),
        ];
        for n in &names {
            assert!(Command::new("ip")
                .args(["netns", "add", n])
                .status()
                .unwrap()
                .success());
        }
        let haproxy_cfg = std::env::temp_dir().join(format!("turnpike-fleet-haproxy-{id}.cfg"));
        let mut t = Topology {
            names,
            _procs: Vec::new(),
            node_logs: Vec::new(),
            haproxy_cfg,
        };
        let ip = |ns: usize, args: &[&str]| {
            let st = Command::new("ip")
                .args(["-n", &t.names[ns]])
                .args(args)
                .status()
                .unwrap();
            assert!(st.success(), "ip -n {} {args:?}", t.names[ns]);
        };
        let (c0, l0, l1, n0) = (
            format!("fc{}", id % 100000),
            format!("fl{}", id % 100000),
            format!("fm{}", id % 100000),
            format!("fn{}", id % 100000),
        );
        ip(LB, &["link", "add", &l0, "type", "veth", "peer", "name", &c0]);
        ip(LB, &["link", "set", &c0, "netns", &t.names[CLIENT]]);
        ip(LB, &["link", "add", &l1, "type", "veth", "peer", "name", &n0]);
        ip(LB, &["link", "set", &n0, "netns", &t.names[NODES]]);
        for (ns, dev, addrs) in [
            (CLIENT, &c0, &["10.90.0.2/24", "10.90.0.3/24"][..]),
            (LB, &l0, &["10.90.0.1/24"][..]),
            (LB, &l1, &["10.91.0.1/24"][..]),
            (
                NODES,
                &n0,
                &["10.91.0.11/24", "10.91.0.12/24", "10.91.0.13/24"][..],
            ),
        ] {
            for a in addrs {
                ip(ns, &["addr", "add", a, "dev", dev]);
            }
            ip(ns, &["link", "set", dev, "up"]);
            ip(ns, &["link", "set", "lo", "up"]);
        }
        ip(CLIENT, &["route", "add", "default", "via", "10.90.0.1"]);
        ip(NODES, &["route", "add", "default", "via", "10.91.0.1"]);
        let run = |ns: usize, args: &[&str]| {
            let st = t.exec(ns).args(args).status().unwrap();
            assert!(st.success(), "{args:?}");
        };
        run(LB, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        // UDP: DNAT by a hash of the client's address and port, so one
        // client 5-tuple always reaches one node and the node sees it as
        // it is (no SNAT).
        run(
            LB,
            &[
                "nft",
                "add table ip lb; \
                 add chain ip lb pre { type nat hook prerouting priority -100; }; \
                 add rule ip lb pre ip daddr 10.90.0.1 udp dport 3478 \
                   dnat to jhash ip saddr . udp sport mod 3 map { 0 : 10.91.0.11, 1 : 10.91.0.12, 2 : 10.91.0.13 }",
            ],
        );
        // Redis and three nodes.
        let redis = t
            .exec(NODES)
            .arg("redis-server")
            .args(common::redis_args(6379))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        t._procs.push(common::Proc(redis));
        let end = Instant::now() + Duration::from_secs(5);
        while !t
            .exec(NODES)
            .args(["redis-cli", "ping"])
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        {
            assert!(Instant::now() < end, "redis did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        for n in 1..=3 {
            let mut child = t
                .exec(NODES)
                .arg(common::turnpike_bin())
                .args([
                    "serve",
                    "--listen",
                    &format!("10.91.0.1{n}:3478"),
                    "--no-tls",
                    "--threads",
                    "1",
                ])
                .args([
                    "--realm",
                    "lb.example",
                    "--user",
                    "gail:g4il-pw",
                    "--node-name",
                    &format!("node{n}"),
                ])
                .args(["--redis-url", "redis://127.0.0.1:6379/0", "--fleet-lease", "3"])
                .args([
                    "--proxy-protocol-from",
                    "10.91.0.1/32",
                    "--allow-peer",
                    "10.90.0.0/24",
                ])
                .args(["--user-quota", "2"])
                .args([
                    "--admin-listen",
                    &format!("127.0.0.1:964{n}"),
                    "--admin-token",
                    TOKEN,
                ])
                .args(["--metrics-listen", &format!("127.0.0.1:965{n}")])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            let err = child.stderr.take().unwrap();
            t._procs.push(common::Proc(child));
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in BufReader::new(err).lines().map_while(Result::ok) {
                    if tx.send(l).is_err() {
                        break;
                    }
                }
            });
            let end = Instant::now() + Duration::from_secs(15);
            loop {
                let l = rx
                    .recv_timeout(Duration::from_secs(15))
                    .expect("node start-up line");
                if l.contains("turnpike started") {
                    break;
                }
                assert!(Instant::now() < end);
            }
            t.node_logs.push(rx);
        }
        // TCP: HAProxy, source-balanced, PROXY v2 to each node.
        std::fs::write(
            &t.haproxy_cfg,
            "global\n  maxconn 500\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n\
             frontend turn_tcp\n  bind 10.90.0.1:3478\n  default_backend nodes\n\
             backend nodes\n  balance source\n\
               server n1 10.91.0.11:3478 send-proxy-v2\n\
               server n2 10.91.0.12:3478 send-proxy-v2\n\
               server n3 10.91.0.13:3478 send-proxy-v2\n",
        )
        .unwrap();
        let hp = t
            .exec(LB)
            .args(["haproxy", "-db", "-f"])
            .arg(&t.haproxy_cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        t._procs.push(common::Proc(hp));
        // Up when HAProxy accepts and every node sees the fleet.
        let ns = t.names[CLIENT].clone();
        let end = Instant::now() + Duration::from_secs(10);
        while !common::in_ns(&ns, || TcpStream::connect(VIP).is_ok()) {
            assert!(Instant::now() < end, "haproxy did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let nodes_ns = t.names[NODES].clone();
        let end = Instant::now() + Duration::from_secs(10);
        while !(1..=3).all(|n| {
            let ns = nodes_ns.clone();
            common::in_ns(&ns, move || metric(n, "turnpike_fleet_nodes")) == Some(3.0)
        }) {
            assert!(Instant::now() < end, "the fleet did not form");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(t)
    }
}

/// In the nodes' namespace: an admin or metrics request to node `n`.
fn http(port: u16, method: &str, path: &str) -> String {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    common::http_request(addr, method, path, Some(TOKEN)).unwrap().1
}

fn metric(n: u16, name: &str) -> Option<f64> {
    http(9650 + n, "GET", "/metrics")
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Clients of every node: (node, client address) of each session.
fn sessions(t: &Topology) -> Vec<(u16, String)> {
    let ns = t.names[NODES].clone();
    common::in_ns(&ns, || {
        (1..=3u16)
            .flat_map(|n| {
                let v: serde_json::Value =
                    serde_json::from_str(&http(9640 + n, "GET", "/api/sessions")).unwrap();
                v["sessions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| (n, s["client"].as_str().unwrap().to_owned()))
                    .collect::<Vec<_>>()
            })
            .collect()
    })
}

fn client(transport: ClientTransport, server: &str, from: &str) -> TurnClient {
    let ch = Channel::connect_from(
        &transport,
        server.parse().unwrap(),
        Some(from.parse().unwrap()),
        Duration::from_secs(3),
    )
    .unwrap();
    let mut c = TurnClient::new(ch, "gail", "g4il-pw");
    c.set_timeout(Duration::from_secs(2));
    c
}

#[test]
fn behind_haproxy_and_nftables_the_fleet_sees_real_clients_stays_sticky_and_redirects() {
    // Counts on three nodes, a balancer and redis answering in time: nothing else runs beside it.
    let _alone = common::exclusive();
    let Some(t) = Topology::build() else {
        return;
    };
    let cns = t.names[CLIENT].clone();

    // UDP through the nftables balancer: the node sees the real client,
    // the allocation's later requests and data reach the same node
    // (Refresh, permission, channel: a different node would say 437),
    // and the relay works both ways with a peer next to the client.
    let (mapped, me, relayed, echoed) = common::in_ns(&cns, || {
        let mut c = client(ClientTransport::Udp, VIP, "10.90.0.2");
        let me = c.channel().local_addr().unwrap();
        let a = c.allocate().unwrap();
        c.refresh(600)
            .expect("a refresh through the balancer reaches the same node");
        let peer = UdpSocket::bind("10.90.0.3:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        c.create_permission(&[peer.local_addr().unwrap()]).unwrap();
        c.channel_bind(0x4001, peer.local_addr().unwrap()).unwrap();
        c.send_channel(0x4001, b"via the balancer").unwrap();
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"via the balancer");
        assert_eq!(from, a.relayed);
        peer.send_to(b"back", from).unwrap();
        let echoed = match c.recv(Duration::from_secs(3)).unwrap() {
            Received::Channel {
                channel: 0x4001,
                data,
            } => data,
            other => panic!("{other:?}"),
        };
        let _ = c.refresh(0);
        (a.mapped, me, a.relayed, echoed)
    });
    assert_eq!(mapped, me, "XOR-MAPPED-ADDRESS is the client's own address");
    assert!(relayed.ip().to_string().starts_with("10.91.0.1"), "{relayed}");
    assert_eq!(echoed, b"back");

    // TCP through HAProxy with PROXY v2: the same. The session list (and
    // so the logs and the admin API) names 10.90.0.2, not HAProxy.
    let (mapped, me, held) = common::in_ns(&cns, || {
        let mut c = client(ClientTransport::Tcp, VIP, "10.90.0.2");
        let me = c.channel().local_addr().unwrap();
        let a = c.allocate().unwrap();
        (a.mapped, me, c)
    });
    assert_eq!(mapped, me);
    let s = sessions(&t);
    assert!(s.iter().any(|(_, client)| *client == me.to_string()), "{s:?}");
    assert!(!s.iter().any(|(_, client)| client.starts_with("10.91.")), "{s:?}");
    // A refusal is logged with the real client too.
    let bad = common::in_ns(&cns, || {
        let ch = Channel::connect_from(
            &ClientTransport::Tcp,
            VIP.parse().unwrap(),
            Some("10.90.0.2".parse().unwrap()),
            Duration::from_secs(3),
        )
        .unwrap();
        let me = ch.local_addr().unwrap();
        let mut c = TurnClient::new(ch, "gail", "wrong");
        assert!(c.allocate().is_err());
        me
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut logged = false;
    while !logged && Instant::now() < deadline {
        for logs in &t.node_logs {
            while let Ok(l) = logs.try_recv() {
                logged |= l.contains("request refused")
                    && l.contains(&bad.ip().to_string())
                    && !l.contains("10.91.0.1:");
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(logged, "a refusal logged with the client behind HAProxy");

    // The user quota of 2 holds across the fleet behind the balancers:
    // gail holds one over TCP; one more from another client port, then a
    // third is 486 wherever the balancer sends it.
    std::thread::sleep(PROPAGATION);
    let second = common::in_ns(&cns, || {
        let mut c = client(ClientTransport::Udp, VIP, "10.90.0.2");
        c.allocate().map(|_| c)
    })
    .expect("gail's second allocation");
    std::thread::sleep(PROPAGATION);
    for _ in 0..3 {
        let r = common::in_ns(&cns, || {
            client(ClientTransport::Udp, VIP, "10.90.0.3")
                .allocate()
                .map(|_| ())
        });
        assert!(matches!(r, Err(ClientError::Error { code: 486, .. })), "{r:?}");
    }
    drop(second);
    drop(held);

    // Redirection behind the balancer: the node a client lands on drains;
    // its 300 names another node's own address, and the client follows.
    let nns = t.names[NODES].clone();
    common::in_ns(&nns, || {
        for n in 1..=3u16 {
            let _ = http(9640 + n, "DELETE", "/api/users/gail/sessions");
        }
        http(9641, "POST", "/api/drain")
    });
    std::thread::sleep(PROPAGATION);
    // From many client ports, some land on node 1: each is sent on. A
    // port lands there one time in three; 60 tries miss it with
    // probability (2/3)^60, about 3e-11.
    let (mut redirected, mut tries) = (0, 0);
    while redirected < 3 && tries < 60 {
        tries += 1;
        let r = common::in_ns(&cns, || {
            let mut c = client(ClientTransport::Udp, VIP, "10.90.0.3");
            match c.allocate() {
                Ok(_) => {
                    let _ = c.refresh(0);
                    None
                }
                Err(ClientError::Error { code: 300, .. }) => {
                    let alt = c.alternate_server().expect("ALTERNATE-SERVER");
                    let mut f = TurnClient::new(
                        Channel::connect_from(
                            &ClientTransport::Udp,
                            alt,
                            Some("10.90.0.3".parse().unwrap()),
                            Duration::from_secs(3),
                        )
                        .unwrap(),
                        "gail",
                        "g4il-pw",
                    );
                    let ok = f.allocate().is_ok();
                    let _ = f.refresh(0);
                    Some((alt, ok))
                }
                Err(e) => panic!("{e}"),
            }
        });
        if let Some((alt, ok)) = r {
            assert!(
                alt.to_string() == "10.91.0.12:3478" || alt.to_string() == "10.91.0.13:3478",
                "{alt}"
            );
            assert!(ok, "the client follows the 300 to {alt}");
            redirected += 1;
        }
    }
    assert!(
        redirected > 0,
        "the hash sent no client port to node 1 in {tries} tries"
    );
    eprintln!("{redirected} of {tries} clients landed on the draining node and were sent on");
}
