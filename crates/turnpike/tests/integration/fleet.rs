//! A fleet of three real turnpike nodes (the binary, on 127.0.0.11-13)
//! sharing one real redis-server, all started and stopped by PID here:
//! credentials pushed to every node within a second, a user quota and a
//! brute-force budget that hold across nodes, a node killed with SIGKILL
//! giving its quota back after its lease, load-aware redirection with 300
//! that turnpike's client follows, the fleet view of the admin API (every
//! node's version, load and health; a node drained from another), and a
//! Redis outage that calls survive. The same fleet in real browsers is in
//! browser.rs.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use turnpike_client::client::{Channel, ClientError, ClientTransport, TurnClient};

const REALM: &str = "fleet.example";
pub(crate) const TOKEN: &str = "fleet-admin-token-0123456789";
/// A node writes its state once a second and reads the others' once a
/// second: what one node does is seen by another within two beats.
const PROPAGATION: Duration = Duration::from_millis(2300);

pub(crate) struct Node {
    child: Option<Child>,
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    metrics: SocketAddr,
    logs: mpsc::Receiver<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Node {
    /// Kills the node with SIGKILL: no goodbye to Redis.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn node(n: u8, redis_port: u16, extra: &[&str]) -> Node {
    let ip = format!("127.0.0.{}", 10 + n);
    let (admin, metrics) = (common::free_port(), common::free_port());
    let mut child = Command::new(common::turnpike_bin())
        .args([
            "serve",
            "--listen",
            &format!("{ip}:0"),
            "--no-tls",
            "--threads",
            "2",
        ])
        .args(["--realm", REALM, "--node-name", &format!("node{n}")])
        .args(["--redis-url", &format!("redis://127.0.0.1:{redis_port}/0")])
        .args(["--fleet-lease", "3", "--allow-loopback-peers"])
        .args([
            "--admin-listen",
            &format!("127.0.0.1:{admin}"),
            "--admin-token",
            TOKEN,
        ])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, logs) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let started = loop {
        match logs.recv_timeout(Duration::from_secs(15)) {
            Ok(l) if l.contains("turnpike started") => break l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("node{n} did not start:\n{}", seen.join("\n")),
        }
    };
    let addr = started
        .split("listen=[")
        .nth(1)
        .and_then(|r| r.split([']', ',']).next())
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    Node {
        child: Some(child),
        addr,
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
        metrics: format!("127.0.0.1:{metrics}").parse().unwrap(),
        logs,
    }
}

pub(crate) fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    common::http_request(addr, method, path, Some(TOKEN)).unwrap()
}

fn metric(node: &Node, name: &str) -> Option<f64> {
    let (_, body) = http(node.metrics, "GET", "/metrics");
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Waits until every node sees `want` live nodes (the registry settled).
pub(crate) fn settled(nodes: &[&Node], want: f64) {
    let end = Instant::now() + Duration::from_secs(10);
    while !nodes
        .iter()
        .all(|n| metric(n, "turnpike_fleet_nodes") == Some(want))
    {
        assert!(Instant::now() < end, "the fleet did not settle at {want} nodes");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn user_cmd(args: &[&str], stdin: &str, redis_port: u16) {
    let mut c = Command::new(common::turnpike_bin())
        .arg("user")
        .args(args)
        .args([
            "--realm",
            REALM,
            "--redis-url",
            &format!("redis://127.0.0.1:{redis_port}/0"),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    assert!(c.wait().unwrap().success(), "turnpike user {args:?}");
}

/// A client from `from` (an address of 127/8) that has allocated on
/// `server`, or the error.
fn allocate_from(server: SocketAddr, from: &str, user: &str, pw: &str) -> Result<TurnClient, ClientError> {
    let ch = Channel::connect_from(
        &ClientTransport::Udp,
        server,
        Some(from.parse().unwrap()),
        Duration::from_secs(2),
    )
    .unwrap();
    let mut c = TurnClient::new(ch, user, pw);
    c.set_timeout(Duration::from_millis(600));
    c.allocate().map(|_| c)
}

pub(crate) fn allocate(server: SocketAddr, user: &str, pw: &str) -> Result<TurnClient, ClientError> {
    allocate_from(server, "127.0.0.1", user, pw)
}

pub(crate) fn code(r: &Result<TurnClient, ClientError>) -> Option<u16> {
    match r {
        Err(ClientError::Error { code, .. }) => Some(*code),
        _ => None,
    }
}

#[test]
fn credentials_reach_every_node_and_a_revoked_user_is_refused_everywhere_within_a_second() {
    let redis = common::redis_server();
    let nodes: Vec<Node> = (1..=3).map(|n| node(n, redis.1, &[])).collect();
    settled(&nodes.iter().collect::<Vec<_>>(), 3.0);

    // Added once, through Redis: every node knows the user.
    user_cmd(&["add", "bob"], "b0b-pw\n", redis.1);
    for n in &nodes {
        let end = Instant::now() + Duration::from_secs(3);
        loop {
            match allocate(n.addr, "bob", "b0b-pw") {
                Ok(mut c) => {
                    let _ = c.refresh(0);
                    break;
                }
                Err(e) => assert!(Instant::now() < end, "{}: bob not known: {e}", n.addr),
            }
        }
    }
    // Revoked: refused on every node within a second (the push; the
    // 2 s poll alone could not).
    user_cmd(&["remove", "bob"], "", redis.1);
    let revoked = Instant::now();
    for n in &nodes {
        loop {
            let r = allocate(n.addr, "bob", "b0b-pw");
            if code(&r) == Some(401) {
                break;
            }
            if let Ok(mut c) = r {
                let _ = c.refresh(0);
            }
            assert!(
                revoked.elapsed() < Duration::from_secs(1),
                "{}: bob still allocates {:?} after removal",
                n.addr,
                revoked.elapsed()
            );
        }
    }
    eprintln!("revoked everywhere after {:?}", revoked.elapsed());
}

#[test]
fn a_user_quota_holds_across_nodes_and_a_killed_node_gives_it_back_after_its_lease() {
    let redis = common::redis_server();
    let quota = ["--user-quota", "2", "--user", "carol:car0l-pw"];
    let mut nodes: Vec<Node> = (1..=3).map(|n| node(n, redis.1, &quota)).collect();
    settled(&nodes.iter().collect::<Vec<_>>(), 3.0);

    // One allocation on node 1 and one on node 2: carol's two.
    let _a = allocate(nodes[0].addr, "carol", "car0l-pw").expect("first on node1");
    std::thread::sleep(PROPAGATION);
    let _b = allocate(nodes[1].addr, "carol", "car0l-pw").expect("second on node2");
    std::thread::sleep(PROPAGATION);
    // The third, on the node that holds none of them, is 486.
    assert_eq!(code(&allocate(nodes[2].addr, "carol", "car0l-pw")), Some(486));
    // The fleet view shows where they are.
    let (status, body) = http(nodes[2].admin, "GET", "/api/fleet?user=carol");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let held: Vec<(String, u64)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["user_allocations"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(held.len(), 3, "{body}");
    assert_eq!(held.iter().map(|h| h.1).sum::<u64>(), 2, "{body}");
    // And each node's own list of carol's sessions, asked from node 3.
    let (status, body) = http(nodes[2].admin, "GET", "/api/fleet/users/carol/sessions");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["not_answering"].as_array().unwrap().len(), 0, "{body}");
    let lists: Vec<(String, usize)> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["name"].as_str().unwrap().to_owned(),
                n["sessions"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(lists.len(), 3, "{body}");
    let on = |name: &str| lists.iter().find(|l| l.0 == name).unwrap().1;
    assert_eq!((on("node1"), on("node2"), on("node3")), (1, 1, 0), "{body}");
    assert!(body.contains("\"user\":\"carol\""), "{body}");

    // Node 1 dies without a word. Until its lease (3 s) runs out, its
    // allocation still counts; then it is given back.
    nodes[0].kill9();
    let killed = Instant::now();
    assert_eq!(
        code(&allocate(nodes[2].addr, "carol", "car0l-pw")),
        Some(486),
        "still within the lease"
    );
    let end = killed + Duration::from_secs(8);
    let _c = loop {
        match allocate(nodes[2].addr, "carol", "car0l-pw") {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < end, "quota not released: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let took = killed.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "released after {took:?}, before the lease"
    );
    eprintln!("quota released {took:?} after SIGKILL (lease 3 s)");
}

#[test]
fn a_fleet_total_quota_counts_every_node() {
    let redis = common::redis_server();
    let args = [
        "--fleet-total-quota",
        "2",
        "--user",
        "hal:h4l-pw",
        "--user",
        "ida:1da-pw",
    ];
    let n1 = node(1, redis.1, &args);
    let n2 = node(2, redis.1, &args);
    settled(&[&n1, &n2], 2.0);
    let _a = allocate(n1.addr, "hal", "h4l-pw").unwrap();
    let _b = allocate(n2.addr, "ida", "1da-pw").unwrap();
    std::thread::sleep(PROPAGATION);
    // Each node holds one: the fleet's two are taken, whoever asks.
    assert_eq!(code(&allocate(n1.addr, "ida", "1da-pw")), Some(508));
    assert_eq!(code(&allocate(n2.addr, "hal", "h4l-pw")), Some(508));
}

#[test]
fn a_guesser_spread_over_nodes_gets_one_budget_and_the_lockout_holds_everywhere() {
    let redis = common::redis_server();
    let guard = ["--auth-fail-limit", "6", "--user", "dave:d4ve-pw"];
    let nodes: Vec<Node> = (1..=3).map(|n| node(n, redis.1, &guard)).collect();
    settled(&nodes.iter().collect::<Vec<_>>(), 3.0);

    // Six wrong guesses from 127.0.0.50, two per node: on one node that
    // would be three short of the limit of six; in the fleet it is the limit.
    for round in 0..2 {
        for n in &nodes {
            let r = allocate_from(n.addr, "127.0.0.50", "dave", &format!("guess-{round}"));
            assert!(r.is_err());
        }
    }
    // Within a heartbeat the pair is blocked on every node: even the right
    // password from that source goes unanswered.
    std::thread::sleep(PROPAGATION);
    for n in &nodes {
        let r = allocate_from(n.addr, "127.0.0.50", "dave", "d4ve-pw");
        assert!(
            matches!(r, Err(ClientError::Timeout)),
            "{}: {:?}",
            n.addr,
            r.err()
        );
    }
    // The account from elsewhere is not locked out.
    let mut ok = allocate_from(nodes[1].addr, "127.0.0.51", "dave", "d4ve-pw").expect("another source");
    let _ = ok.refresh(0);
}

#[test]
fn an_overloaded_or_draining_node_sends_new_clients_to_the_least_loaded_with_300() {
    let redis = common::redis_server();
    let user = ["--user", "erin:er1n-pw"];
    let n1 = node(1, redis.1, &[&user[..], &["--redirect-above", "1"]].concat());
    let n2 = node(2, redis.1, &user);
    let n3 = node(3, redis.1, &user);
    settled(&[&n1, &n2, &n3], 3.0);

    // Node 2 carries one allocation, node 3 none.
    let _on2 = allocate(n2.addr, "erin", "er1n-pw").unwrap();
    // Node 1 takes its first allocation; then it is at its threshold.
    let _on1 = allocate(n1.addr, "erin", "er1n-pw").unwrap();
    std::thread::sleep(PROPAGATION);
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, n1.addr, Duration::from_secs(2)).unwrap(),
        "erin",
        "er1n-pw",
    );
    let r = c.allocate();
    assert!(
        matches!(r, Err(ClientError::Error { code: 300, .. })),
        "{:?}",
        r.err()
    );
    assert_eq!(
        c.alternate_server(),
        Some(n3.addr),
        "the least loaded node: {}",
        http(n1.admin, "GET", "/api/fleet").1
    );
    // The client follows it.
    let mut followed =
        allocate(c.alternate_server().unwrap(), "erin", "er1n-pw").expect("allocates on node 3");
    // (Workers publish their counters once a second.)
    let end = Instant::now() + Duration::from_secs(3);
    while metric(&n1, "turnpike_load_redirected_total") != Some(1.0) {
        assert!(Instant::now() < end, "turnpike_load_redirected_total is not 1");
        std::thread::sleep(Duration::from_millis(100));
    }

    // Node 3 drains: it leaves the candidates, and it sends its own new
    // clients on too (to node 2, the only one under its load).
    let _ = followed.refresh(0);
    assert_eq!(http(n3.admin, "POST", "/api/drain").0, 200);
    std::thread::sleep(PROPAGATION);
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, n3.addr, Duration::from_secs(2)).unwrap(),
        "erin",
        "er1n-pw",
    );
    assert!(matches!(c.allocate(), Err(ClientError::Error { code: 300, .. })));
    assert_eq!(c.alternate_server(), Some(n2.addr));
    let mut c = TurnClient::new(
        Channel::connect(&ClientTransport::Udp, n1.addr, Duration::from_secs(2)).unwrap(),
        "erin",
        "er1n-pw",
    );
    assert!(matches!(c.allocate(), Err(ClientError::Error { code: 300, .. })));
    assert_eq!(
        c.alternate_server(),
        Some(n2.addr),
        "a draining node is no target"
    );
}

#[test]
fn with_redis_stopped_calls_continue_new_allocations_use_cached_credentials_and_sharing_comes_back() {
    let mut redis = common::redis_server();
    let port = redis.1;
    let quota = ["--user-quota", "1"];
    let n1 = node(1, port, &quota);
    let n2 = node(2, port, &quota);
    user_cmd(&["add", "fay"], "f4y-pw\n", port);
    settled(&[&n1, &n2], 2.0);
    let end = Instant::now() + Duration::from_secs(3);
    let mut call = loop {
        match allocate(n1.addr, "fay", "f4y-pw") {
            Ok(c) => break c,
            Err(e) => assert!(Instant::now() < end, "fay unknown: {e}"),
        }
    };
    let peer = common::peer();
    call.create_permission(&[peer.local_addr().unwrap()]).unwrap();
    call.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
    std::thread::sleep(PROPAGATION);
    assert_eq!(
        code(&allocate(n2.addr, "fay", "f4y-pw")),
        Some(486),
        "the quota of 1 is shared"
    );

    // Redis goes away.
    let _ = redis.0.kill();
    let _ = redis.0.wait();
    let end = Instant::now() + Duration::from_secs(10);
    while metric(&n1, "turnpike_redis_up") != Some(0.0) || metric(&n2, "turnpike_fleet_nodes") != Some(0.0) {
        assert!(Instant::now() < end, "the outage is not reported");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, body) = http(n1.admin, "GET", "/readyz");
    assert_eq!(status, 200);
    assert!(body.contains("redis unreachable"), "{body}");
    let mut logged = false;
    while let Ok(l) = n2.logs.try_recv() {
        logged |= l.contains("redis unreachable");
    }
    assert!(logged, "the outage is logged");
    // The call goes on.
    call.send_channel(0x4000, b"during the outage").unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = peer.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"during the outage");
    // A new allocation with the cached credentials, under local limits
    // (node 2 no longer hears of node 1's allocation).
    let mut local = allocate(n2.addr, "fay", "f4y-pw").expect("cached credentials, local quota");
    let _ = local.refresh(0);

    // Redis comes back (empty: it kept nothing): the nodes register again
    // and share their counts; fay's user is re-added by the operator.
    let back = std::process::Command::new("/usr/bin/redis-server")
        .args(common::redis_args(port))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _redis_again = common::Redis(back, port);
    let end = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < end, "redis did not come back");
        std::thread::sleep(Duration::from_millis(50));
    }
    user_cmd(&["add", "fay"], "f4y-pw\n", port);
    settled(&[&n1, &n2], 2.0);
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        let r = allocate(n2.addr, "fay", "f4y-pw");
        if code(&r) == Some(486) {
            break;
        }
        if let Ok(mut c) = r {
            let _ = c.refresh(0);
        }
        assert!(
            Instant::now() < end,
            "the shared quota is not back: node 1 holds fay's one"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(metric(&n1, "turnpike_redis_up"), Some(1.0));
}

/// `/api/fleet` on node 1, parsed.
fn fleet_view(n1: &Node) -> serde_json::Value {
    let (status, body) = http(n1.admin, "GET", "/api/fleet");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn entry<'a>(view: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    view["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} is not in the fleet view: {view:#}"))
}

#[test]
fn the_fleet_view_shows_each_nodes_version_load_and_health_and_one_node_drains_another() {
    let redis = common::redis_server();
    let user = ["--user", "fay:f4y-pw"];
    let n1 = node(1, redis.1, &user);
    let n2 = node(2, redis.1, &user);
    let n3 = node(3, redis.1, &user);
    settled(&[&n1, &n2, &n3], 3.0);

    // Traffic through node 2: a client relaying to a peer on loopback.
    let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut c = allocate(n2.addr, "fay", "f4y-pw").unwrap();
    c.create_permission(&[peer_addr]).unwrap();
    let version = format!("{}+", env!("CARGO_PKG_VERSION"));
    let end = Instant::now() + Duration::from_secs(8);
    let loaded = loop {
        for _ in 0..50 {
            c.send_indication(peer_addr, &[7u8; 200]).unwrap();
        }
        std::thread::sleep(Duration::from_millis(100));
        let view = fleet_view(&n1);
        if entry(&view, "node2")["load"]["packets_per_s"].as_u64() > Some(100) {
            break view;
        }
        assert!(Instant::now() < end, "node 2's load never showed: {view:#}");
    };
    assert_eq!(loaded["this_node"], "node1");
    for name in ["node1", "node2", "node3"] {
        let n = entry(&loaded, name);
        assert!(
            n["version"].as_str().unwrap().starts_with(&version),
            "{name} runs {version} and its build id: {n:#}"
        );
        assert_eq!(n["problems"], serde_json::json!([]), "{name} is healthy: {n:#}");
        assert_eq!(n["draining"], false);
        assert!(n["age_ms"].as_u64().unwrap() < 3500, "{n:#}");
        assert!(n["started_ms"].as_u64().unwrap() > 1_600_000_000_000, "{n:#}");
    }
    let l2 = &entry(&loaded, "node2")["load"];
    // 200-byte payloads: 1600 bits a packet.
    let bits_per_packet = l2["bits_per_s"].as_f64().unwrap() / l2["packets_per_s"].as_f64().unwrap();
    assert!((1550.0..1650.0).contains(&bits_per_packet), "{l2}");
    assert_eq!(entry(&loaded, "node2")["allocations"], 1);
    assert_eq!(entry(&loaded, "node3")["load"]["packets_per_s"], 0);

    // Node 1 drains node 3: node 3 answers so itself (readyz, 300/508).
    let (status, body) = http(n1.admin, "POST", "/api/fleet/nodes/node3/drain");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (v["draining"].as_bool(), v["confirmed"].as_bool()),
        (Some(true), Some(true)),
        "{v}"
    );
    assert_eq!(http(n3.admin, "GET", "/readyz").0, 503);
    assert_eq!(entry(&fleet_view(&n1), "node3")["draining"], true);
    let refused = allocate(n3.addr, "fay", "f4y-pw");
    assert!(matches!(code(&refused), Some(300 | 508)), "{:?}", refused.err());
    assert_eq!(http(n2.admin, "GET", "/readyz").0, 200, "only node 3 drains");
    // And undrains it.
    let (status, body) = http(n1.admin, "DELETE", "/api/fleet/nodes/node3/drain");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""confirmed":true"#), "{body}");
    assert_eq!(http(n3.admin, "GET", "/readyz").0, 200);
    allocate(n3.addr, "fay", "f4y-pw").expect("node 3 takes clients again");

    // Its own name drains node 1 itself, at once.
    let (status, _) = http(n1.admin, "POST", "/api/fleet/nodes/node1/drain");
    assert_eq!(status, 200);
    assert_eq!(http(n1.admin, "GET", "/readyz").0, 503);
    assert_eq!(http(n1.admin, "DELETE", "/api/fleet/nodes/node1/drain").0, 200);
    assert_eq!(http(n1.admin, "GET", "/readyz").0, 200);

    // A name no live node has is a 404, and nothing drains; no token, 401.
    let (status, body) = http(n1.admin, "POST", "/api/fleet/nodes/node9/drain");
    assert_eq!(status, 404, "{body}");
    let (status, _) = common::http_request(n1.admin, "POST", "/api/fleet/nodes/node3/drain", None).unwrap();
    assert_eq!(status, 401);
    std::thread::sleep(PROPAGATION);
    let view = fleet_view(&n1);
    for name in ["node1", "node2", "node3"] {
        assert_eq!(entry(&view, name)["draining"], false, "{view:#}");
    }
}
