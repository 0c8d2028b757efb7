//! Prometheus metrics. Workers keep plain counters of their own and publish
//! a snapshot once a second (in their housekeeping sweep), so the packet
//! path touches no shared atomic; a scrape sums the snapshots. Labels are
//! bounded: transports, directions, reasons and error codes, never users
//! or addresses.

use std::fmt::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use turn_core::Counters;

/// Whether the credential store in Redis answers: -1 not configured,
/// 0 unreachable (cached credentials keep serving), 1 up.
pub static REDIS_UP: std::sync::atomic::AtomicI8 = std::sync::atomic::AtomicI8::new(-1);

/// Whether coturn's PostgreSQL user database answers (`--db-url`): -1 not
/// configured, 0 unreachable (cached credentials keep serving), 1 up.
pub static SQL_UP: std::sync::atomic::AtomicI8 = std::sync::atomic::AtomicI8::new(-1);

/// Live fleet nodes seen in Redis, this one included: -1 without a fleet,
/// 0 while Redis is unreachable.
pub static FLEET_NODES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(-1);

/// The TLS leaf certificate's notAfter (Unix seconds); 0 without TLS.
pub static TLS_NOT_AFTER: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// `--total-quota` as now configured (0: none), for saturation alerts.
pub static ALLOCATION_LIMIT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Ports in the relay range (`--min-port`..=`--max-port`): what one relay
/// address of one family can hold.
pub static RELAY_PORTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Publishes `--total-quota` (at start and on reload).
pub fn set_allocation_limit(total_quota: usize) {
    ALLOCATION_LIMIT.store(total_quota as u64, std::sync::atomic::Ordering::Relaxed);
}

/// Publishes the relay port range (at start: it changes only then).
pub fn set_relay_ports(min_port: u16, max_port: u16) {
    let n = u64::from(max_port.saturating_sub(min_port)) + 1;
    RELAY_PORTS.store(n, std::sync::atomic::Ordering::Relaxed);
}

/// 1 while the kernel fast path is loaded.
pub static FAST_PATH_ACTIVE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Binary upgrades (SIGUSR2) this process handed over, and those that
/// failed and left it serving.
pub static UPGRADES_OK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
pub static UPGRADES_FAILED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Packets the kernel fast path forwarded (read once a second).
pub static FAST_PATH_PACKETS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Packets of installed flows it passed to user space: no route or neighbour.
pub static FAST_PATH_NO_ROUTE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Packets of fast-path channels passed to user space because their UDP
/// checksum was left to offload.
pub static FAST_PATH_CHECKSUM_OFFLOAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Entries in the fast path's maps (one per bound channel it holds).
pub static FAST_PATH_ENTRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One worker's numbers, as of its last publication.
#[derive(Debug, Clone, Default)]
pub struct WorkerMetrics {
    /// `--metrics-per-user`: how many users get series of their own (0:
    /// none).
    pub per_user: usize,
    /// The users of this worker's live allocations (when `per_user` > 0).
    pub users: Arc<Vec<UserUsage>>,
    /// The protocol core's counters.
    pub core: Counters,
    /// Live allocations by transport (UDP, TCP, TLS, DTLS).
    pub allocations: [usize; turn_core::Transport::COUNT],
    /// Live permissions.
    pub permissions: usize,
    /// Live channel bindings.
    pub channels: usize,
    /// Open TCP/TLS connections.
    pub connections: usize,
    /// TLS handshakes completed.
    pub tls_handshakes: u64,
    /// TLS connections that failed (handshake or record errors).
    pub tls_failures: u64,
    /// TCP/TLS connections closed at accept: the worker's table or pending
    /// cap was full.
    pub conn_refused_worker: u64,
    /// TCP/TLS connections closed at accept: the source IP held
    /// `--max-connections-per-ip` already.
    pub conn_refused_per_source: u64,
    pub proxy_refused: u64,
    /// `recvmmsg` calls that returned datagrams, and the datagrams.
    pub recv_batches: u64,
    /// Datagrams received through `recvmmsg`.
    pub recv_datagrams: u64,
    /// What the worker's UDP send queue did.
    pub send: udp_io::SendStats,
    /// Whether the worker still uses UDP GSO.
    pub gso: bool,
    /// RFC 6062 peer data connections open (connecting, pending, bound).
    pub tcp_connections: usize,
    /// Bytes relayed over TCP relays: to peers, from peers.
    pub tcp_bytes: [u64; 2],
    /// DTLS (RFC 7350) fronts.
    pub dtls: DtlsMetrics,
}

/// One user's live allocations on a worker and what they relayed.
#[derive(Debug, Clone, Default)]
pub struct UserUsage {
    /// The user: a REST username without its expiry, `--redact`ed when on.
    pub user: Arc<str>,
    /// Live allocations.
    pub allocations: u32,
    /// Bytes those allocations relayed, both ways.
    pub bytes: u64,
}

/// The user a username counts for: a REST username (`EXPIRY:ID`) is its
/// ID, since every new credential has another expiry.
pub fn user_of(username: &str) -> &str {
    match username.split_once(':') {
        Some((expiry, id)) if !expiry.is_empty() && expiry.bytes().all(|b| b.is_ascii_digit()) => id,
        _ => username,
    }
}

/// One worker's DTLS numbers.
#[derive(Debug, Clone, Copy, Default)]
pub struct DtlsMetrics {
    /// The fronts' counts since start.
    pub counters: turn_dtls::Counters,
    /// Associations now (established or in handshake).
    pub associations: usize,
    /// Associations now in their handshake.
    pub half_open: usize,
}

/// Snapshots of every worker, indexed by worker id.
pub type Board = Arc<Mutex<Vec<WorkerMetrics>>>;

/// The workers' snapshots summed, and each worker's own.
pub(crate) fn sum(board: &Board) -> (WorkerMetrics, Vec<WorkerMetrics>) {
    let all = board.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut t = WorkerMetrics::default();
    for w in &all {
        let c = &w.core;
        let tc = &mut t.core;
        tc.rate_limited += c.rate_limited;
        tc.auth_failures += c.auth_failures;
        tc.auth_throttled += c.auth_throttled;
        tc.challenges_withheld += c.challenges_withheld;
        tc.challenges += c.challenges;
        tc.quota_user += c.quota_user;
        tc.capacity += c.capacity;
        tc.drain_refused += c.drain_refused;
        tc.load_redirected += c.load_redirected;
        tc.bandwidth_dropped += c.bandwidth_dropped;
        tc.peers_refused += c.peers_refused;
        tc.bindings += c.bindings;
        tc.tcp_connects += c.tcp_connects;
        tc.tcp_connect_failed += c.tcp_connect_failed;
        tc.tcp_peer_accepted += c.tcp_peer_accepted;
        tc.tcp_peer_refused += c.tcp_peer_refused;
        tc.tcp_refused_limit += c.tcp_refused_limit;
        tc.tcp_bound += c.tcp_bound;
        tc.tcp_unbound_expired += c.tcp_unbound_expired;
        t.tcp_connections += w.tcp_connections;
        t.tcp_bytes[0] += w.tcp_bytes[0];
        t.tcp_bytes[1] += w.tcp_bytes[1];
        for i in 0..turn_core::Transport::COUNT {
            tc.allocations_created[i] += c.allocations_created[i];
            tc.allocations_expired[i] += c.allocations_expired[i];
            tc.allocations_deleted[i] += c.allocations_deleted[i];
        }
        for (a, b) in tc.allocations_ended.iter_mut().zip(c.allocations_ended) {
            *a += b;
        }
        tc.to_peer_packets += c.to_peer_packets;
        tc.to_peer_bytes += c.to_peer_bytes;
        tc.from_peer_packets += c.from_peer_packets;
        tc.from_peer_bytes += c.from_peer_bytes;
        for (a, b) in tc.errors.iter_mut().zip(c.errors) {
            *a += b;
        }
        for (a, b) in t.allocations.iter_mut().zip(w.allocations) {
            *a += b;
        }
        t.permissions += w.permissions;
        t.channels += w.channels;
        t.connections += w.connections;
        t.tls_handshakes += w.tls_handshakes;
        t.dtls.counters += w.dtls.counters;
        t.dtls.associations += w.dtls.associations;
        t.dtls.half_open += w.dtls.half_open;
        t.tls_failures += w.tls_failures;
        t.conn_refused_worker += w.conn_refused_worker;
        t.conn_refused_per_source += w.conn_refused_per_source;
        t.proxy_refused += w.proxy_refused;
        tc.icmp_relayed += c.icmp_relayed;
        tc.icmp_dropped += c.icmp_dropped;
        t.recv_batches += w.recv_batches;
        t.recv_datagrams += w.recv_datagrams;
        t.send.syscalls += w.send.syscalls;
        t.send.datagrams += w.send.datagrams;
        t.send.gso_messages += w.send.gso_messages;
        t.send.dropped += w.send.dropped;
        t.gso |= w.gso;
    }
    (t, all)
}

/// The Prometheus text exposition of the summed snapshots.
pub fn render(board: &Board, draining: bool) -> String {
    let (t, per_worker) = sum(board);
    let mut x = Exposition::default();
    allocations(&mut x, &t);
    relayed(&mut x, &t);
    refusals(&mut x, &t);
    connections(&mut x, &t);
    udp(&mut x, &t, per_worker.len());
    fast_path(&mut x);
    operations(&mut x, &t, draining);
    per_user(&mut x, &per_worker);
    x.0
}

/// `--metrics-per-user K`: the K users whose live allocations relayed
/// most (then hold most allocations) get series of their own, everyone
/// else one `user="other"` series, so the series count is at most K + 1
/// whatever the number of distinct (REST) usernames.
fn per_user(x: &mut Exposition, per_worker: &[WorkerMetrics]) {
    let k = per_worker.iter().map(|w| w.per_user).max().unwrap_or(0);
    if k == 0 {
        return;
    }
    let mut by: std::collections::HashMap<&str, (u64, u64)> = std::collections::HashMap::new();
    for w in per_worker {
        for u in w.users.iter() {
            let e = by.entry(&u.user).or_default();
            e.0 += u64::from(u.allocations);
            e.1 += u.bytes;
        }
    }
    let mut all: Vec<(&str, (u64, u64))> = by.into_iter().collect();
    all.sort_unstable_by(|a, b| b.1 .1.cmp(&a.1 .1).then(b.1 .0.cmp(&a.1 .0)).then(a.0.cmp(b.0)));
    let mut named: Vec<(String, (u64, u64))> = all
        .iter()
        .take(k)
        .map(|(u, v)| (format!("{{user=\"{}\"}}", label_value(u)), *v))
        .collect();
    let rest = all
        .iter()
        .skip(k)
        .fold((0, 0), |acc, (_, v)| (acc.0 + v.0, acc.1 + v.1));
    named.push(("{user=\"other\"}".to_string(), rest));
    let samples = |f: fn(&(u64, u64)) -> u64| -> Vec<(&str, f64)> {
        named.iter().map(|(l, v)| (l.as_str(), f(v) as f64)).collect()
    };
    x.metric(
        "user_allocations",
        "gauge",
        "Live allocations of the --metrics-per-user users who relay most; everyone else is user=\"other\".",
        &samples(|v| v.0),
    );
    x.metric(
        "user_relayed_bytes",
        "gauge",
        "Bytes relayed (both ways) by the live allocations of the --metrics-per-user users who relay most; everyone else is user=\"other\".",
        &samples(|v| v.1),
    );
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Prometheus text, one metric family at a time.
#[derive(Default)]
struct Exposition(String);

impl Exposition {
    fn metric(&mut self, name: &str, kind: &str, help: &str, samples: &[(&str, f64)]) {
        let _ = writeln!(
            self.0,
            "# HELP turnpike_{name} {help}\n# TYPE turnpike_{name} {kind}"
        );
        for (labels, v) in samples {
            let _ = writeln!(self.0, "turnpike_{name}{labels} {v}");
        }
    }
}

/// Label sets in `turn_core::Transport::index` order.
const BY_TRANSPORT: [&str; turn_core::Transport::COUNT] = [
    "{transport=\"udp\"}",
    "{transport=\"tcp\"}",
    "{transport=\"tls\"}",
    "{transport=\"dtls\"}",
];

fn by_transport(a: [u64; turn_core::Transport::COUNT]) -> [(&'static str, f64); turn_core::Transport::COUNT] {
    std::array::from_fn(|i| (BY_TRANSPORT[i], a[i] as f64))
}

/// Session events by sink: queued, delivered, dropped (absent without a
/// sink).
fn events(x: &mut Exposition) {
    let sinks = crate::events::counts();
    if sinks.is_empty() {
        return;
    }
    let labels: Vec<String> = sinks.iter().map(|(n, _)| format!("{{sink=\"{n}\"}}")).collect();
    for (k, name, help) in [
        (0, "events_queued_total", "Session events accepted into a sink's queue."),
        (1, "events_sent_total", "Session events a sink delivered."),
        (
            2,
            "events_dropped_total",
            "Session events dropped: the sink's queue was full (its receiver down too long), or a stopping server's flush time ran out.",
        ),
    ] {
        let values: Vec<(&str, f64)> = sinks
            .iter()
            .zip(&labels)
            .map(|((_, v), l)| (l.as_str(), v[k] as f64))
            .collect();
        x.metric(name, "counter", help, &values);
    }
}

/// RFC 7350 DTLS: the cookie exchange, handshakes and associations.
fn dtls(x: &mut Exposition, d: &DtlsMetrics) {
    x.metric(
        "dtls_cookies_total",
        "counter",
        "DTLS ClientHellos answered with a HelloVerifyRequest (no state kept), and second hellos whose cookie did not verify.",
        &[
            ("{outcome=\"sent\"}", d.counters.cookies_sent as f64),
            ("{outcome=\"bad\"}", d.counters.bad_cookies as f64),
        ],
    );
    x.metric(
        "dtls_handshakes_total",
        "counter",
        "DTLS handshakes, by outcome (refused: a half-open or association cap; old_version: a DTLS 1.0 hello, RFC 8996).",
        &[
            ("{outcome=\"ok\"}", d.counters.established as f64),
            ("{outcome=\"failed\"}", d.counters.failed as f64),
            ("{outcome=\"refused\"}", d.counters.refused as f64),
            ("{outcome=\"old_version\"}", d.counters.old_versions as f64),
        ],
    );
    x.metric(
        "dtls_dropped_total",
        "counter",
        "DTLS datagrams from sources without an association that were not a ClientHello, dropped unanswered.",
        &[("", d.counters.dropped as f64)],
    );
    x.metric(
        "dtls_associations",
        "gauge",
        "DTLS associations, by state.",
        &[
            ("{state=\"handshake\"}", d.half_open as f64),
            (
                "{state=\"established\"}",
                (d.associations - d.half_open.min(d.associations)) as f64,
            ),
        ],
    );
}

/// Allocations, permissions and channels.
fn allocations(x: &mut Exposition, t: &WorkerMetrics) {
    let c = &t.core;
    x.metric(
        "allocations",
        "gauge",
        "Live allocations by client transport.",
        &by_transport(t.allocations.map(|n| n as u64)),
    );
    x.metric(
        "allocations_created_total",
        "counter",
        "Allocations created, by transport.",
        &by_transport(c.allocations_created),
    );
    x.metric(
        "allocations_expired_total",
        "counter",
        "Allocations that expired, by transport.",
        &by_transport(c.allocations_expired),
    );
    x.metric(
        "allocations_deleted_total",
        "counter",
        "Allocations deleted (Refresh 0, closed connection, admin), by transport.",
        &by_transport(c.allocations_deleted),
    );
    let by_reason: Vec<(String, f64)> = turn_core::CloseReason::ALL
        .iter()
        .map(|r| {
            (
                format!("{{reason=\"{}\"}}", r.label()),
                c.allocations_ended[r.index()] as f64,
            )
        })
        .collect();
    x.metric(
        "allocations_ended_total",
        "counter",
        "Allocations ended, by reason (as in the log line and usage record).",
        &by_reason
            .iter()
            .map(|(l, v)| (l.as_str(), *v))
            .collect::<Vec<_>>(),
    );
    let limit = ALLOCATION_LIMIT.load(std::sync::atomic::Ordering::Relaxed);
    if limit > 0 {
        x.metric(
            "allocation_limit",
            "gauge",
            "--total-quota: allocations this node may hold (absent when unlimited).",
            &[("", limit as f64)],
        );
    }
    x.metric(
        "relay_ports",
        "gauge",
        "Ports in the relay range: the allocations one relay address of one family can hold.",
        &[("", RELAY_PORTS.load(std::sync::atomic::Ordering::Relaxed) as f64)],
    );
    x.metric(
        "permissions",
        "gauge",
        "Live permissions.",
        &[("", t.permissions as f64)],
    );
    x.metric(
        "channels",
        "gauge",
        "Live channel bindings.",
        &[("", t.channels as f64)],
    );
}

/// What was relayed and answered.
fn relayed(x: &mut Exposition, t: &WorkerMetrics) {
    let c = &t.core;
    x.metric(
        "relayed_packets_total",
        "counter",
        "Packets relayed, by direction.",
        &[
            ("{direction=\"to_peer\"}", c.to_peer_packets as f64),
            ("{direction=\"from_peer\"}", c.from_peer_packets as f64),
        ],
    );
    x.metric(
        "relayed_bytes_total",
        "counter",
        "Payload bytes relayed, by direction.",
        &[
            ("{direction=\"to_peer\"}", c.to_peer_bytes as f64),
            ("{direction=\"from_peer\"}", c.from_peer_bytes as f64),
        ],
    );
    x.metric(
        "binding_requests_total",
        "counter",
        "Binding requests answered.",
        &[("", c.bindings as f64)],
    );
}

/// Refusals, by code and by reason; RFC 6062 connections and limits.
fn refusals(x: &mut Exposition, t: &WorkerMetrics) {
    let c = &t.core;
    let codes: Vec<(String, f64)> = turn_core::ErrorCode::ALL
        .iter()
        .zip(c.errors)
        .map(|(code, n)| (format!("{{code=\"{}\"}}", code.label()), n as f64))
        .collect();
    let codes: Vec<(&str, f64)> = codes.iter().map(|(l, v)| (l.as_str(), *v)).collect();
    x.metric(
        "error_responses_total",
        "counter",
        "Error responses sent, by code.",
        &codes,
    );
    x.metric(
        "auth_rejected_total",
        "counter",
        "Requests refused by authentication and abuse limits, by reason.",
        &[
            ("{reason=\"bad_credentials\"}", c.auth_failures as f64),
            ("{reason=\"brute_force_blocked\"}", c.auth_throttled as f64),
            ("{reason=\"rate_limited\"}", c.rate_limited as f64),
            (
                "{reason=\"too_small_to_challenge\"}",
                c.challenges_withheld as f64,
            ),
        ],
    );
}

/// TCP/TLS connections, RFC 6062 peer connections and their limits.
fn connections(x: &mut Exposition, t: &WorkerMetrics) {
    let c = &t.core;
    x.metric(
        "tcp_connections",
        "gauge",
        "RFC 6062 peer data connections open: connecting, waiting for ConnectionBind, or relaying.",
        &[("", t.tcp_connections as f64)],
    );
    x.metric(
        "tcp_connection_events_total",
        "counter",
        "RFC 6062 peer data connections, by what happened: connects started and failed (447), peers accepted or refused (no permission), refused by the per-allocation limit, bound by ConnectionBind, closed unbound after 30 s.",
        &[
            ("{event=\"connect\"}", c.tcp_connects as f64),
            ("{event=\"connect_failed\"}", c.tcp_connect_failed as f64),
            ("{event=\"peer_accepted\"}", c.tcp_peer_accepted as f64),
            ("{event=\"peer_refused\"}", c.tcp_peer_refused as f64),
            ("{event=\"limit_refused\"}", c.tcp_refused_limit as f64),
            ("{event=\"bound\"}", c.tcp_bound as f64),
            ("{event=\"unbound_expired\"}", c.tcp_unbound_expired as f64),
        ],
    );
    x.metric(
        "tcp_relayed_bytes_total",
        "counter",
        "Bytes relayed over RFC 6062 TCP relays, by direction.",
        &[
            ("{direction=\"to_peer\"}", t.tcp_bytes[0] as f64),
            ("{direction=\"from_peer\"}", t.tcp_bytes[1] as f64),
        ],
    );
    x.metric(
        "peers_refused_total",
        "counter",
        "Peers refused by the peer policy.",
        &[("", c.peers_refused as f64)],
    );
    x.metric(
        "quota_refused_total",
        "counter",
        "Allocations refused, by limit.",
        &[
            ("{limit=\"user\"}", c.quota_user as f64),
            ("{limit=\"capacity\"}", c.capacity as f64),
        ],
    );
    x.metric(
        "bandwidth_dropped_total",
        "counter",
        "Packets dropped by bandwidth caps.",
        &[("", c.bandwidth_dropped as f64)],
    );
    x.metric(
        "connections",
        "gauge",
        "Open TCP/TLS connections.",
        &[("", t.connections as f64)],
    );
    x.metric(
        "connections_refused_total",
        "counter",
        "TCP/TLS connections closed at accept, by limit (proxy_protocol: a PROXY header that was malformed, or from an address not in proxy-protocol-from).",
        &[
            ("{limit=\"worker\"}", t.conn_refused_worker as f64),
            ("{limit=\"per_source\"}", t.conn_refused_per_source as f64),
            ("{limit=\"proxy_protocol\"}", t.proxy_refused as f64),
        ],
    );
}

/// ICMP, TLS handshakes and UDP I/O.
fn udp(x: &mut Exposition, t: &WorkerMetrics, workers: usize) {
    let c = &t.core;
    x.metric(
        "icmp_total",
        "counter",
        "ICMP errors for relayed datagrams (RFC 8656 §11.5), by outcome.",
        &[
            ("{outcome=\"relayed\"}", c.icmp_relayed as f64),
            ("{outcome=\"dropped\"}", c.icmp_dropped as f64),
        ],
    );
    x.metric(
        "tls_handshakes_total",
        "counter",
        "TLS handshakes, by outcome.",
        &[
            ("{outcome=\"ok\"}", t.tls_handshakes as f64),
            ("{outcome=\"failed\"}", t.tls_failures as f64),
        ],
    );
    dtls(x, &t.dtls);
    let batch = if t.recv_batches > 0 {
        t.recv_datagrams as f64 / t.recv_batches as f64
    } else {
        0.0
    };
    x.metric(
        "recv_batch_size_mean",
        "gauge",
        "Mean datagrams per recvmmsg call.",
        &[("", batch)],
    );
    x.metric(
        "udp_send_syscalls_total",
        "counter",
        "sendmmsg/sendto calls made for UDP datagrams.",
        &[("", t.send.syscalls as f64)],
    );
    x.metric(
        "udp_sent_datagrams_total",
        "counter",
        "UDP datagrams handed to the kernel (after GSO splitting, one each).",
        &[("", t.send.datagrams as f64)],
    );
    x.metric(
        "udp_gso_messages_total",
        "counter",
        "GSO messages sent: runs of datagrams to one destination sent as one.",
        &[("", t.send.gso_messages as f64)],
    );
    x.metric(
        "udp_send_dropped_total",
        "counter",
        "UDP datagrams dropped on send (full socket buffer or a send error).",
        &[("", t.send.dropped as f64)],
    );
    x.metric(
        "udp_gso",
        "gauge",
        "1 while UDP GSO is in use, 0 when off or refused by the kernel.",
        &[("", if t.gso { 1.0 } else { 0.0 })],
    );
    x.metric("workers", "gauge", "Worker threads.", &[("", workers as f64)]);
}

/// The kernel fast path.
fn fast_path(x: &mut Exposition) {
    x.metric(
        "fast_path_active",
        "gauge",
        "1 while the kernel fast path (XDP) is loaded; 0 when everything is relayed in user space.",
        &[(
            "",
            FAST_PATH_ACTIVE.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    x.metric(
        "fast_path_packets_total",
        "counter",
        "Packets the kernel fast path relayed (both directions); the user-space path's are relayed_packets_total minus these.",
        &[("", FAST_PATH_PACKETS.load(std::sync::atomic::Ordering::Relaxed) as f64)],
    );
    x.metric(
        "fast_path_no_route_total",
        "counter",
        "Packets of channels the kernel fast path holds that it passed to user space for want of a route or a resolved neighbour.",
        &[("", FAST_PATH_NO_ROUTE.load(std::sync::atomic::Ordering::Relaxed) as f64)],
    );
    x.metric(
        "fast_path_checksum_offload_total",
        "counter",
        "Packets of channels the kernel fast path holds that it passed to user space because the sender left the UDP checksum to offload (a sender on this host, over veth).",
        &[(
            "",
            FAST_PATH_CHECKSUM_OFFLOAD.load(std::sync::atomic::Ordering::Relaxed) as f64,
        )],
    );
    x.metric(
        "fast_path_entries",
        "gauge",
        "Channels the kernel fast path holds (one entry per bound channel of a UDP allocation), as of the last second.",
        &[("", FAST_PATH_ENTRIES.load(std::sync::atomic::Ordering::Relaxed) as f64)],
    );
}

/// Stores, fleet, TLS certificate, drain and the web pages.
fn operations(x: &mut Exposition, t: &WorkerMetrics, draining: bool) {
    let c = &t.core;
    let redis = REDIS_UP.load(std::sync::atomic::Ordering::Relaxed);
    if redis >= 0 {
        x.metric(
            "redis_up",
            "gauge",
            "1 while the Redis credential store answers, 0 while cached credentials serve without it.",
            &[("", redis as f64)],
        );
    }
    let sql = SQL_UP.load(std::sync::atomic::Ordering::Relaxed);
    if sql >= 0 {
        x.metric(
            "sql_up",
            "gauge",
            "1 while the PostgreSQL user database (--db-url) answers, 0 while cached credentials serve without it.",
            &[("", sql as f64)],
        );
    }
    events(x);
    let nodes = FLEET_NODES.load(std::sync::atomic::Ordering::Relaxed);
    if nodes >= 0 {
        x.metric(
            "fleet_nodes",
            "gauge",
            "Live fleet nodes in the Redis registry, this one included (0 while Redis is unreachable).",
            &[("", nodes as f64)],
        );
    }
    let not_after = TLS_NOT_AFTER.load(std::sync::atomic::Ordering::Relaxed);
    if not_after > 0 {
        x.metric(
            "tls_certificate_not_after_seconds",
            "gauge",
            "When the TLS certificate expires (Unix time): alert on it minus time() being small.",
            &[("", not_after as f64)],
        );
    }
    x.metric(
        "drain_refused_total",
        "counter",
        "Allocations refused because the server is draining (300 with ALTERNATE-SERVER, or 508).",
        &[("", c.drain_refused as f64)],
    );
    x.metric(
        "load_redirected_total",
        "counter",
        "Allocations sent to a less loaded fleet node with 300 ALTERNATE-SERVER (--redirect-above).",
        &[("", c.load_redirected as f64)],
    );
    x.metric(
        "web_credentials_total",
        "counter",
        "TURN credentials asked by the ICE test page, by outcome (issued; refused: unauthorized, rate_limited).",
        &[
            ("{outcome=\"issued\"}", crate::web::ISSUED.load(std::sync::atomic::Ordering::Relaxed) as f64),
            ("{outcome=\"unauthorized\"}", crate::web::UNAUTHORIZED.load(std::sync::atomic::Ordering::Relaxed) as f64),
            ("{outcome=\"rate_limited\"}", crate::web::RATE_LIMITED.load(std::sync::atomic::Ordering::Relaxed) as f64),
        ],
    );
    x.metric(
        "draining",
        "gauge",
        "1 while draining.",
        &[("", if draining { 1.0 } else { 0.0 })],
    );
    x.metric(
        "upgrades_total",
        "counter",
        "Binary upgrades (SIGUSR2) by outcome: handed over to the new process, or failed and serving on.",
        &[
            (
                "{outcome=\"ok\"}",
                UPGRADES_OK.load(std::sync::atomic::Ordering::Relaxed) as f64,
            ),
            (
                "{outcome=\"failed\"}",
                UPGRADES_FAILED.load(std::sync::atomic::Ordering::Relaxed) as f64,
            ),
        ],
    );
    x.metric(
        "build_info",
        "gauge",
        "1, labelled with the running build: the version and the linker's build id (two builds of one version differ in it; after a binary upgrade, the new one's).",
        &[(
            &format!(
                "{{version=\"{}\",build=\"{}\"}}",
                env!("CARGO_PKG_VERSION"),
                crate::build_id::build().unwrap_or("")
            ),
            1.0,
        )],
    );
}

/// Serves `/metrics` on `listener` from a control-plane thread; returns the
/// bound address.
pub fn serve(
    listener: std::net::TcpListener,
    board: Board,
    draining: Arc<std::sync::atomic::AtomicBool>,
) -> Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = render(&board, draining.load(std::sync::atomic::Ordering::Relaxed));
            async move { ([("content-type", "text/plain; version=0.0.4")], body) }
        }),
    );
    crate::http::spawn("metrics", listener, app)?;
    Ok(bound)
}
