//! The dashboard's numbers: one snapshot of the node (`GET /api/stats`),
//! and the same every second as server-sent events
//! (`GET /api/stats/stream`), with rates from the difference between two
//! snapshots.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::metrics::WorkerMetrics;
use crate::runtime::Control;

/// Sessions listed in one snapshot (the busiest first); the rest are
/// counted.
const SESSIONS_SHOWN: usize = 200;
/// Users in the "top users" table.
const TOP_USERS: usize = 10;

/// The counters that rates are made of.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    at: Instant,
    to_peer_packets: u64,
    from_peer_packets: u64,
    to_peer_bytes: u64,
    from_peer_bytes: u64,
}

impl Sample {
    fn of(t: &WorkerMetrics) -> Sample {
        let c = &t.core;
        // TCP relays count bytes only; their bytes are added so the
        // dashboard's throughput covers every transport.
        Sample {
            at: Instant::now(),
            to_peer_packets: c.to_peer_packets,
            from_peer_packets: c.from_peer_packets,
            to_peer_bytes: c.to_peer_bytes + t.tcp_bytes[0],
            from_peer_bytes: c.from_peer_bytes + t.tcp_bytes[1],
        }
    }

    fn rates_since(&self, before: &Sample) -> Value {
        let dt = self.at.duration_since(before.at).as_secs_f64().max(1e-3);
        let per_s = |now: u64, then: u64| (now.saturating_sub(then) as f64 / dt).round();
        json!({
            "to_peer_pps": per_s(self.to_peer_packets, before.to_peer_packets),
            "from_peer_pps": per_s(self.from_peer_packets, before.from_peer_packets),
            "to_peer_bps": per_s(self.to_peer_bytes, before.to_peer_bytes) * 8.0,
            "from_peer_bps": per_s(self.from_peer_bytes, before.from_peer_bytes) * 8.0,
        })
    }
}

/// The node's state and numbers as JSON; `before` gives rates.
pub(crate) fn snapshot(control: &Control, web: &super::Web, before: Option<&Sample>) -> (Value, Sample) {
    let t = control.totals();
    let sample = Sample::of(&t);
    let c = &t.core;
    // A 401 to a request without integrity is every client's first step
    // (the challenge), not a failure: shown apart from the 401s that
    // refused a wrong password or an unknown user.
    let errors: serde_json::Map<String, Value> = turn_core::ErrorCode::ALL
        .iter()
        .zip(c.errors)
        .flat_map(|(code, n)| {
            if *code == turn_core::ErrorCode::Unauthorized {
                vec![
                    ("401 challenge (normal)".to_owned(), c.challenges.min(n)),
                    (
                        "401 failed authentication".to_owned(),
                        n.saturating_sub(c.challenges),
                    ),
                ]
            } else {
                vec![(code.label().to_string(), n)]
            }
        })
        .filter(|(_, n)| *n > 0)
        .map(|(label, n)| (label, json!(n)))
        .collect();
    let refusals = json!({
        "bad_credentials": c.auth_failures,
        "brute_force_blocked": c.auth_throttled,
        "rate_limited": c.rate_limited,
        "too_small_to_challenge": c.challenges_withheld,
        "user_quota": c.quota_user,
        "capacity": c.capacity,
        "draining": c.drain_refused,
        "redirected": c.load_redirected,
        "peer_policy": c.peers_refused,
        "bandwidth_dropped": c.bandwidth_dropped,
        "connections_worker": t.conn_refused_worker,
        "connections_per_source": t.conn_refused_per_source,
        "proxy_protocol": t.proxy_refused,
    });
    let mut sessions = control.sessions();
    let session_count = sessions.len();
    let traffic = |s: &turn_core::SessionInfo| s.stats.to_peer_bytes + s.stats.from_peer_bytes;
    let mut users: HashMap<&str, (usize, u64, u64)> = HashMap::new();
    for s in &sessions {
        let u = users.entry(&s.username).or_default();
        u.0 += 1;
        u.1 += s.stats.to_peer_bytes;
        u.2 += s.stats.from_peer_bytes;
    }
    let mut top: Vec<_> = users.into_iter().collect();
    top.sort_by(|a, b| (b.1 .1 + b.1 .2).cmp(&(a.1 .1 + a.1 .2)).then(a.0.cmp(b.0)));
    let top_users: Vec<Value> = top
        .iter()
        .take(TOP_USERS)
        .map(|(user, (n, to, from))| json!({"user": user, "allocations": n, "to_peer_bytes": to, "from_peer_bytes": from}))
        .collect();
    sessions.sort_by_key(|s| std::cmp::Reverse(traffic(s)));
    let listed: Vec<Value> = sessions
        .iter()
        .take(SESSIONS_SHOWN)
        .map(crate::sessions::to_json)
        .collect();
    let redis = match crate::metrics::REDIS_UP.load(Ordering::Relaxed) {
        -1 => "off",
        0 => "unreachable",
        _ => "up",
    };
    let fleet_nodes = crate::metrics::FLEET_NODES.load(Ordering::Relaxed);
    let v = json!({
        "node": {
            "draining": control.is_draining(),
            "fast_path": web.fast_path,
            "fast_path_entries": crate::metrics::FAST_PATH_ENTRIES.load(Ordering::Relaxed),
            "redis": redis,
            "fleet_nodes": if fleet_nodes < 0 { Value::Null } else { json!(fleet_nodes) },
            "uptime_s": web.uptime().as_secs(),
        },
        "allocations": {
            "udp": t.allocations[0], "tcp": t.allocations[1], "tls": t.allocations[2], "dtls": t.allocations[3],
            "total": t.allocations.iter().sum::<usize>(),
        },
        "permissions": t.permissions,
        "channels": t.channels,
        "connections": t.connections,
        "rates": before.map(|b| sample.rates_since(b)),
        "totals": {
            "to_peer_packets": sample.to_peer_packets, "from_peer_packets": sample.from_peer_packets,
            "to_peer_bytes": sample.to_peer_bytes, "from_peer_bytes": sample.from_peer_bytes,
        },
        "errors": errors,
        "refusals": refusals,
        "top_users": top_users,
        "sessions": listed,
        "sessions_total": session_count,
    });
    (v, sample)
}

/// The event stream: a snapshot every `every`, as `data:` lines, until the
/// page goes away (the write fails and the stream is dropped).
pub(crate) fn stream(
    control: Control,
    web: Arc<super::Web>,
    every: Duration,
) -> impl futures_util::Stream<Item = Result<String, std::convert::Infallible>> {
    futures_util::stream::unfold((None::<Sample>, true), move |(before, first)| {
        let (control, web) = (control.clone(), web.clone());
        async move {
            if !first {
                tokio::time::sleep(every).await;
            }
            // Session listing waits on the workers: off the async thread.
            let (v, sample) = tokio::task::spawn_blocking(move || snapshot(&control, &web, before.as_ref()))
                .await
                .ok()?;
            Some((Ok(format!("data: {v}\n\n")), (Some(sample), false)))
        }
    })
}
