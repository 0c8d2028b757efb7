//! A fleet through Redis (`--redis-url`): what nodes share besides users
//! and secrets, always off the packet path and never needed by calls
//! already up.
//!
//! - **Registry and quota counts.** Once a second each node writes its
//!   entry (`turnpike:node:{name}`: addresses, allocations, draining, its
//!   redirect threshold) and its allocations per user
//!   (`turnpike:held:{name}`), both expiring after `--fleet-lease`, and
//!   scores itself in the sorted set `turnpike:nodes` by that expiry. It
//!   reads the others': their per-user counts count against `--user-quota`
//!   here (`Quotas::set_elsewhere`), and the healthy, less loaded ones are
//!   where it sends new clients when over `--redirect-above`
//!   (`turn_core::Redirect`). A node that dies stops beating; its entry
//!   and counts expire, so its users' quota comes back after the lease.
//!   What one node does is seen by the others within two heartbeats (it
//!   writes once a second, they read once a second), so two Allocates on
//!   two nodes within that time may both pass: the quota is exact per
//!   node and converges across the fleet within two seconds.
//! - **Push.** One subscriber connection listens on `turnpike:changes`
//!   (published by `turnpike user add|passwd|remove --redis-url`) and on
//!   keyspace events for the user hash and secret set (when the server has
//!   `notify-keyspace-events` on): a change re-reads the credentials at
//!   once, so a revoked user is refused on every node within a second.
//!   Polling every 2 s stays as the fallback.
//! - **Brute-force guard.** Each integrity failure is published on
//!   `turnpike:authfail` (an `AuthFailure` as JSON); every other node counts it in its own guard
//!   (`AuthGuard::failed_elsewhere`), so a guesser spread over nodes gets
//!   one budget, and a lockout earned on one node holds on all.
//! - **Commands.** `turnpike:commands` carries a `FleetRequest` as JSON
//!   (`delete-user`, `list-user` and `drain`) from any node's admin API
//!   (`DELETE` and `GET /api/fleet/users/NAME/sessions`, `POST` and
//!   `DELETE /api/fleet/nodes/NAME/drain`); a list is answered under
//!   `turnpike:reply:REQUEST:NODE` for 30 s, a drain in the node's next
//!   registry entry.
//! - **Fleet view.** The entry also carries what the dashboard's fleet
//!   table shows: version, start time, load over the last heartbeat
//!   (packets and bits per second relayed, CPU) and problems in words;
//!   a reader adds "no heartbeat" to an entry that has missed beats.
//!
//! While Redis is unreachable each node serves on: the last good
//! credentials, local quotas and guard only, the static
//! `--alternate-server` list. It says so once in the log, in
//! `turnpike_redis_up` and `turnpike_fleet_nodes` and in `/readyz`, and
//! everything is rewritten at the first heartbeat after it returns.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use redis::Commands;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::runtime::Control;

const NODES: &str = "turnpike:nodes";
/// Published after every change to users or secrets.
pub const CHANGES: &str = "turnpike:changes";
const AUTHFAIL: &str = "turnpike:authfail";
const COMMANDS: &str = "turnpike:commands";
const BEAT: Duration = Duration::from_secs(1);
/// An entry older than this has missed heartbeats.
const LATE: Duration = Duration::from_millis(3500);

fn node_key(name: &str) -> String {
    format!("turnpike:node:{name}")
}

fn reply_key(request: u64, name: &str) -> String {
    format!("turnpike:reply:{request:016x}:{name}")
}

fn held_key(name: &str) -> String {
    format!("turnpike:held:{name}")
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A node's registry entry.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeInfo {
    pub name: String,
    /// Where clients reach it, per family (for ALTERNATE-SERVER).
    pub ipv4: Option<SocketAddr>,
    pub ipv6: Option<SocketAddr>,
    pub allocations: usize,
    pub draining: bool,
    /// Its `--redirect-above` (0: none).
    pub redirect_above: usize,
    /// When it wrote this (Unix ms).
    pub updated_ms: u64,
    /// Its build (`0.1.0+build-id`); empty from a node older than this
    /// field, as are the other defaults below.
    #[serde(default)]
    pub version: String,
    /// When it started (Unix ms).
    #[serde(default)]
    pub started_ms: u64,
    /// What is wrong with it, in words; empty when healthy.
    #[serde(default)]
    pub problems: Vec<String>,
    /// How busy it is over the last heartbeat.
    #[serde(default)]
    pub load: Load,
}

/// A node's work over one heartbeat.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Load {
    /// Relayed packets per second, both directions.
    pub packets_per_s: u64,
    /// Relayed bits per second, both directions.
    pub bits_per_s: u64,
    /// The process's CPU time over wall time, in percent of one core
    /// (above 100 with several workers busy).
    pub cpu_percent: f64,
}

impl NodeInfo {
    /// Whether it takes new clients from others: not draining, and under
    /// its own threshold.
    fn takes_clients(&self) -> bool {
        !self.draining && (self.redirect_above == 0 || self.allocations < self.redirect_above)
    }
}

/// What a node needs to be one.
pub struct FleetConfig {
    pub url: String,
    pub name: String,
    pub lease: Duration,
    pub redirect_above: usize,
    pub ipv4: Option<SocketAddr>,
    pub ipv6: Option<SocketAddr>,
}

/// The fleet as the admin API sees it.
pub struct FleetClient {
    url: String,
    name: String,
}

/// A request to every node, on `turnpike:commands`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
enum FleetRequest {
    /// Write this user's sessions under `turnpike:reply:REQUEST:NODE`.
    ListUser { request: u64, user: String },
    /// Delete this user's sessions.
    DeleteUser { user: String },
    /// The node named starts (`on`) or stops draining.
    Drain { node: String, on: bool },
}

/// An integrity failure seen by one node, on `turnpike:authfail`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AuthFailure {
    node: String,
    /// The username's bytes (a client may send any).
    user: Vec<u8>,
    ip: IpAddr,
}

/// A message as published: JSON.
fn encode<T: Serialize>(m: &T) -> String {
    serde_json::to_string(m).unwrap_or_default()
}

fn connect(url: &str) -> Result<redis::Connection> {
    let client = redis::Client::open(url).with_context(|| format!("redis-url {url:?}: not a Redis URL"))?;
    let c = client
        .get_connection_with_timeout(Duration::from_secs(2))
        .with_context(|| format!("redis: cannot connect to {url}"))?;
    c.set_read_timeout(Some(Duration::from_secs(2)))?;
    c.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(c)
}

/// Live nodes (entries not expired), each with its per-user counts.
fn read_nodes(c: &mut redis::Connection) -> Result<Vec<(NodeInfo, HashMap<String, usize>)>> {
    let now = unix_ms();
    let _: () = c.zrembyscore(NODES, "-inf", now as f64)?;
    let names: Vec<String> = c.zrangebyscore(NODES, now as f64, "+inf")?;
    let mut out = Vec::new();
    for name in names {
        let info: Option<String> = c.get(node_key(&name))?;
        let Some(info) = info.and_then(|j| serde_json::from_str::<NodeInfo>(&j).ok()) else {
            continue;
        };
        let held: HashMap<String, usize> = c.hgetall(held_key(&name))?;
        out.push((info, held));
    }
    Ok(out)
}

impl FleetClient {
    /// This node's name in the fleet.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every live node, and how many allocations `user` holds on each.
    pub fn nodes(&self, user: Option<&str>) -> Result<serde_json::Value> {
        let mut c = connect(&self.url)?;
        let mut nodes = read_nodes(&mut c)?;
        nodes.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let now = unix_ms();
        Ok(serde_json::json!({
            "this_node": self.name,
            "nodes": nodes.iter().map(|(n, held)| {
                let mut v = serde_json::to_value(n).unwrap_or_default();
                let age_ms = now.saturating_sub(n.updated_ms);
                v["age_ms"] = age_ms.into();
                // Still in its lease, but it has missed beats: stalled,
                // cut off from Redis, or dying.
                if age_ms > LATE.as_millis() as u64 {
                    if let Some(p) = v["problems"].as_array_mut() {
                        p.push(format!("no heartbeat for {} s", age_ms / 1000).into());
                    }
                }
                if let Some(u) = user {
                    v["user_allocations"] = held.get(u).copied().unwrap_or(0).into();
                }
                v
            }).collect::<Vec<_>>(),
        }))
    }

    /// Asks the node named to start (`on`) or stop draining, and waits up
    /// to 3 s for its entry to say so: `Ok(None)` when no live node has
    /// that name, else whether it confirmed.
    pub fn drain(&self, node: &str, on: bool) -> Result<Option<bool>> {
        let mut c = connect(&self.url)?;
        if !read_nodes(&mut c)?.iter().any(|(n, _)| n.name == node) {
            return Ok(None);
        }
        let _: usize = c.publish(
            COMMANDS,
            encode(&FleetRequest::Drain {
                node: node.to_owned(),
                on,
            }),
        )?;
        let end = Instant::now() + Duration::from_secs(3);
        while Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
            let entry: Option<String> = c.get(node_key(node))?;
            if entry
                .and_then(|j| serde_json::from_str::<NodeInfo>(&j).ok())
                .is_some_and(|n| n.draining == on)
            {
                return Ok(Some(true));
            }
        }
        Ok(Some(false))
    }

    /// Every live node's sessions of `user`: each node is asked on
    /// `turnpike:commands` and writes its list under a key of this request
    /// for 30 s; the answer has the lists, and the nodes that did not
    /// answer within 2 s.
    pub fn user_sessions(&self, user: &str) -> Result<serde_json::Value> {
        let mut c = connect(&self.url)?;
        let live: Vec<String> = read_nodes(&mut c)?.into_iter().map(|(n, _)| n.name).collect();
        let request: u64 = rand::random();
        let command = FleetRequest::ListUser {
            request,
            user: user.to_owned(),
        };
        let _: usize = c.publish(COMMANDS, encode(&command))?;
        let end = Instant::now() + Duration::from_secs(2);
        let mut answers: HashMap<String, serde_json::Value> = HashMap::new();
        while answers.len() < live.len() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
            for name in &live {
                if answers.contains_key(name) {
                    continue;
                }
                let v: Option<String> = c.get(reply_key(request, name))?;
                if let Some(v) = v.and_then(|v| serde_json::from_str(&v).ok()) {
                    answers.insert(name.clone(), v);
                }
            }
        }
        let silent: Vec<&String> = live.iter().filter(|n| !answers.contains_key(*n)).collect();
        Ok(serde_json::json!({
            "user": user,
            "nodes": live.iter().filter_map(|n| answers.get(n).map(|s| serde_json::json!({"name": n, "sessions": s}))).collect::<Vec<_>>(),
            "not_answering": silent,
        }))
    }

    /// Asks every node (this one included) to delete `user`'s sessions;
    /// the number of nodes that heard it.
    pub fn delete_user(&self, user: &str) -> Result<usize> {
        let mut c = connect(&self.url)?;
        let n: usize = c.publish(
            COMMANDS,
            encode(&FleetRequest::DeleteUser {
                user: user.to_owned(),
            }),
        )?;
        Ok(n)
    }
}

/// The default node name: the host name and the first listen port.
pub fn default_name(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "turnpike".into());
    format!("{host}-{port}")
}

/// Starts the heartbeat and the subscriber; `changed` is told when the
/// credentials should be re-read now.
pub fn spawn(cfg: FleetConfig, control: Control, changed: mpsc::Sender<()>) -> Arc<FleetClient> {
    let cfg = Arc::new(cfg);
    let client = Arc::new(FleetClient {
        url: cfg.url.clone(),
        name: cfg.name.clone(),
    });
    crate::metrics::FLEET_NODES.store(0, Ordering::Relaxed);
    {
        let (cfg, control) = (cfg.clone(), control.clone());
        std::thread::Builder::new()
            .name("turnpike-fleet".into())
            .spawn(move || heartbeat(&cfg, &control))
            .expect("spawning the fleet thread");
    }
    std::thread::Builder::new()
        .name("turnpike-fleet-sub".into())
        .spawn(move || subscriber(&cfg, &control, &changed))
        .expect("spawning the fleet subscriber");
    client
}

/// What a node's load is measured from: relayed totals and the
/// process's CPU time, one reading per heartbeat.
struct Meter {
    at: Instant,
    packets: u64,
    bytes: u64,
    cpu_s: f64,
}

impl Meter {
    fn read(control: &Control) -> Meter {
        let t = control.totals();
        let c = &t.core;
        Meter {
            at: Instant::now(),
            packets: c.to_peer_packets + c.from_peer_packets,
            bytes: c.to_peer_bytes + c.from_peer_bytes + t.tcp_bytes[0] + t.tcp_bytes[1],
            cpu_s: process_cpu_seconds().unwrap_or(0.0),
        }
    }

    fn load_since(&self, before: &Meter) -> Load {
        let dt = self.at.duration_since(before.at).as_secs_f64().max(1e-3);
        Load {
            packets_per_s: (self.packets.saturating_sub(before.packets) as f64 / dt).round() as u64,
            bits_per_s: (self.bytes.saturating_sub(before.bytes) as f64 * 8.0 / dt).round() as u64,
            cpu_percent: (((self.cpu_s - before.cpu_s).max(0.0) / dt) * 1000.0).round() / 10.0,
        }
    }
}

/// User plus system CPU time of this process (`/proc/self/stat` fields 14
/// and 15, in clock ticks).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / udp_io::clock_ticks_per_second())
}

/// What the fleet view's problems are read from, once a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
struct Health {
    /// `turnpike_sql_up`: -1 without a user database.
    sql_up: i8,
    /// The TLS certificate's notAfter, Unix seconds (0: no TLS).
    tls_not_after: i64,
    /// Session event records dropped since the last heartbeat.
    events_dropped: u64,
}

impl Health {
    /// Now, given the events dropped counted at the last heartbeat
    /// (updated).
    fn read(dropped_before: &mut u64) -> Health {
        let dropped: u64 = crate::events::counts().iter().map(|(_, c)| c[2]).sum();
        let h = Health {
            sql_up: crate::metrics::SQL_UP.load(Ordering::Relaxed),
            tls_not_after: crate::metrics::TLS_NOT_AFTER.load(Ordering::Relaxed),
            events_dropped: dropped.saturating_sub(*dropped_before),
        };
        *dropped_before = dropped;
        h
    }

    /// What is wrong, in words, for the fleet view; `now` in Unix seconds.
    fn problems(&self, now: i64) -> Vec<String> {
        let mut p = Vec::new();
        if self.sql_up == 0 {
            p.push("user database (db-url) unreachable: serving cached credentials".to_owned());
        }
        if self.tls_not_after > 0 {
            let days = (self.tls_not_after - now).div_euclid(86_400);
            if days < 0 {
                p.push("TLS certificate expired".to_owned());
            } else if days < 14 {
                p.push(format!("TLS certificate expires in {days} days"));
            }
        }
        if self.events_dropped > 0 {
            p.push(format!(
                "{} session event records dropped (a sink's queue is full)",
                self.events_dropped
            ));
        }
        p
    }
}

fn heartbeat(cfg: &FleetConfig, control: &Control) {
    let mut conn: Option<redis::Connection> = None;
    let mut up = true;
    let started_ms = unix_ms();
    let mut meter = Meter::read(control);
    let mut load = Load::default();
    let mut dropped = 0;
    Health::read(&mut dropped);
    loop {
        // After a binary upgrade the new process beats under this node's
        // name; this one, draining what stayed, must not overwrite it.
        if control.handed_over() {
            return;
        }
        let started = Instant::now();
        let now = Meter::read(control);
        if now.at.duration_since(meter.at) >= BEAT / 2 {
            load = now.load_since(&meter);
            meter = now;
        }
        let me = NodeInfo {
            name: cfg.name.clone(),
            ipv4: cfg.ipv4,
            ipv6: cfg.ipv6,
            allocations: control.allocations(),
            draining: control.is_draining(),
            redirect_above: cfg.redirect_above,
            updated_ms: unix_ms(),
            version: crate::build_id::version().to_owned(),
            started_ms,
            problems: Health::read(&mut dropped).problems((unix_ms() / 1000) as i64),
            load,
        };
        let result = conn
            .take()
            .map_or_else(|| connect(&cfg.url), Ok)
            .and_then(|mut c| beat(cfg, control, &me, &mut c).map(|()| c));
        match result {
            Ok(c) => {
                if !up {
                    info!("fleet: redis reachable again; shared quotas, guard and registry restored");
                }
                up = true;
                conn = Some(c);
            }
            Err(e) => {
                if up {
                    warn!(error = %format!("{e:#}"), "fleet: redis unreachable; local quotas, guard and alternate-server only until it returns");
                }
                up = false;
                crate::metrics::FLEET_NODES.store(0, Ordering::Relaxed);
                let (quotas, _, redirect) = control.fleet_parts();
                quotas.set_elsewhere(HashMap::new());
                redirect.set(over_threshold(cfg, control), Vec::new());
            }
        }
        std::thread::sleep(BEAT.saturating_sub(started.elapsed()));
    }
}

fn over_threshold(cfg: &FleetConfig, control: &Control) -> bool {
    cfg.redirect_above > 0 && control.allocations() >= cfg.redirect_above
}

/// One heartbeat: write this node, read the others, share failures.
fn beat(cfg: &FleetConfig, control: &Control, me: &NodeInfo, c: &mut redis::Connection) -> Result<()> {
    let (quotas, guard, redirect) = control.fleet_parts();
    guard.share();
    let lease_ms = cfg.lease.as_millis() as u64;
    let held = quotas.held_here();
    let mut p = redis::pipe();
    p.atomic()
        .cmd("SET")
        .arg(node_key(&cfg.name))
        .arg(serde_json::to_string(me)?)
        .arg("PX")
        .arg(lease_ms)
        .ignore()
        .del(held_key(&cfg.name))
        .ignore();
    if !held.is_empty() {
        p.hset_multiple(held_key(&cfg.name), &held)
            .ignore()
            .pexpire(held_key(&cfg.name), lease_ms as i64)
            .ignore();
    }
    p.zadd(NODES, &cfg.name, (me.updated_ms + lease_ms) as f64)
        .ignore();
    let _: () = p.query(c)?;

    let nodes = read_nodes(c)?;
    crate::metrics::FLEET_NODES.store(nodes.len() as i64, Ordering::Relaxed);
    let mut elsewhere: HashMap<String, usize> = HashMap::new();
    let mut others: Vec<&NodeInfo> = Vec::new();
    for (n, h) in &nodes {
        if n.name == cfg.name {
            continue;
        }
        for (u, k) in h {
            *elsewhere.entry(u.clone()).or_insert(0) += k;
        }
        others.push(n);
    }
    quotas.set_elsewhere(elsewhere);
    others.retain(|n| n.takes_clients());
    others.sort_by_key(|n| (n.allocations, n.name.clone()));
    let targets: Vec<SocketAddr> = others.iter().flat_map(|n| [n.ipv4, n.ipv6]).flatten().collect();
    tracing::debug!(?targets, "fleet: redirect targets, least loaded first");
    redirect.set(over_threshold(cfg, control), targets);

    let failures = guard.take_shared();
    if !failures.is_empty() {
        let mut p = redis::pipe();
        for (user, ip) in &failures {
            let failure = AuthFailure {
                node: cfg.name.clone(),
                user: user.to_vec(),
                ip: *ip,
            };
            p.publish(AUTHFAIL, encode(&failure)).ignore();
        }
        let _: () = p.query(c)?;
    }
    Ok(())
}

fn subscriber(cfg: &FleetConfig, control: &Control, changed: &mpsc::Sender<()>) {
    loop {
        if let Err(e) = listen(cfg, control, changed) {
            tracing::debug!(error = %format!("{e:#}"), "fleet subscriber: reconnecting");
        }
        std::thread::sleep(BEAT);
    }
}

fn listen(cfg: &FleetConfig, control: &Control, changed: &mpsc::Sender<()>) -> Result<()> {
    let mut c = connect(&cfg.url)?;
    c.set_read_timeout(None)?;
    let mut ps = c.as_pubsub();
    ps.subscribe(&[CHANGES, AUTHFAIL, COMMANDS])?;
    // Keyspace events, if the server publishes them (notify-keyspace-events).
    ps.psubscribe(&[
        "__keyspace@*__:turnpike:users:*",
        "__keyspace@*__:turnpike:secrets",
    ])?;
    // Anything missed while not subscribed is re-read now.
    let _ = changed.send(());
    loop {
        let msg = ps.get_message()?;
        let channel = msg.get_channel_name().to_owned();
        let payload: String = msg.get_payload().unwrap_or_default();
        match channel.as_str() {
            AUTHFAIL => {
                let Ok(f) = serde_json::from_str::<AuthFailure>(&payload) else {
                    continue;
                };
                if f.node != cfg.name {
                    let (_, guard, _) = control.fleet_parts();
                    guard.failed_elsewhere(&f.user, f.ip, Instant::now());
                }
            }
            COMMANDS => match serde_json::from_str::<FleetRequest>(&payload) {
                // A process replaced by a binary upgrade keeps the node's
                // name only for the calls that stayed with it: its
                // successor answers lists and drains under that name.
                Ok(FleetRequest::ListUser { .. } | FleetRequest::Drain { .. }) if control.handed_over() => {}
                Ok(FleetRequest::ListUser { request, user }) => {
                    let list: Vec<serde_json::Value> = control
                        .sessions()
                        .iter()
                        .filter(|s| *s.username == *user)
                        .map(crate::sessions::to_json)
                        .collect();
                    // Answered on a connection of its own: this one only listens.
                    let mut w = connect(&cfg.url)?;
                    let _: () = redis::cmd("SET")
                        .arg(reply_key(request, &cfg.name))
                        .arg(serde_json::Value::from(list).to_string())
                        .arg("EX")
                        .arg(30)
                        .query(&mut w)?;
                }
                Ok(FleetRequest::Drain { node, on }) if node == cfg.name => {
                    if on {
                        control.drain();
                    } else if !control.undrain() {
                        warn!("fleet: undrain refused: this process is draining to stop");
                        continue;
                    }
                    info!(
                        draining = on,
                        allocations = control.allocations(),
                        "fleet: drain {} on request",
                        if on { "on" } else { "off" }
                    );
                }
                Ok(FleetRequest::Drain { .. }) => {}
                Ok(FleetRequest::DeleteUser { user }) => {
                    let name = user.clone();
                    let n = control.delete_sessions(Arc::new(move |s| *s.username == *name));
                    info!(user = %user, deleted = n, "fleet: a user's sessions deleted on request");
                }
                Err(e) => tracing::debug!(error = %e, "fleet: an unreadable command ignored"),
            },
            _ => {
                let _ = changed.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_and_any_username_survives() {
        let c = FleetRequest::ListUser {
            request: 7,
            user: "tab\there, \"quoted\"".into(),
        };
        let text = encode(&c);
        assert!(
            text.starts_with(r#"{"command":"list-user","request":7,"user":"#),
            "{text}"
        );
        assert_eq!(serde_json::from_str::<FleetRequest>(&text).unwrap(), c);
        let f = AuthFailure {
            node: "n1".into(),
            user: vec![0xff, b'\t', 0],
            ip: "2001:db8::1".parse().unwrap(),
        };
        assert_eq!(serde_json::from_str::<AuthFailure>(&encode(&f)).unwrap(), f);
        // What an older node published is ignored, not misread.
        assert!(serde_json::from_str::<FleetRequest>("delete-user\talice").is_err());
        let d = FleetRequest::Drain {
            node: "n2".into(),
            on: false,
        };
        assert_eq!(encode(&d), r#"{"command":"drain","node":"n2","on":false}"#);
    }

    #[test]
    fn an_entry_from_a_node_without_the_fleet_view_fields_still_reads() {
        // What a node of the previous release writes, in a rolling upgrade.
        let old = r#"{"name":"n1","ipv4":"192.0.2.1:3478","ipv6":null,"allocations":3,
            "draining":false,"redirect_above":0,"updated_ms":1000}"#;
        let n: NodeInfo = serde_json::from_str(old).unwrap();
        assert_eq!(
            (n.allocations, n.version.as_str(), n.load),
            (3, "", Load::default())
        );
        assert!(n.problems.is_empty());
    }

    #[test]
    fn problems_are_said_in_words_and_a_healthy_node_has_none() {
        let now = 1_800_000_000;
        let healthy = Health {
            sql_up: -1,
            tls_not_after: now + 90 * 86_400,
            events_dropped: 0,
        };
        assert!(healthy.problems(now).is_empty());
        let sick = Health {
            sql_up: 0,
            tls_not_after: now + 3 * 86_400 + 10,
            events_dropped: 12,
        };
        let p = sick.problems(now);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].contains("db-url") && p[1].contains("in 3 days") && p[2].starts_with("12 "),
            "{p:?}"
        );
        let expired = Health {
            tls_not_after: now - 5,
            ..healthy
        };
        assert_eq!(expired.problems(now), ["TLS certificate expired"]);
    }

    #[test]
    fn load_is_per_second_over_the_heartbeat() {
        let t0 = Instant::now();
        let before = Meter {
            at: t0,
            packets: 100,
            bytes: 10_000,
            cpu_s: 1.0,
        };
        let after = Meter {
            at: t0 + Duration::from_secs(2),
            packets: 2100,
            bytes: 210_000,
            cpu_s: 1.5,
        };
        let l = after.load_since(&before);
        assert_eq!((l.packets_per_s, l.bits_per_s), (1000, 800_000));
        assert!((l.cpu_percent - 25.0).abs() < 1e-9, "{l:?}");
        // Busy for a while, this process's CPU time grows past one tick.
        let first = process_cpu_seconds().unwrap();
        let spin = Instant::now();
        while process_cpu_seconds().unwrap() <= first {
            assert!(spin.elapsed() < Duration::from_secs(5), "CPU time never grew");
        }
    }
}
