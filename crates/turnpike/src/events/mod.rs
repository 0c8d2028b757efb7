//! Session events: one JSON record per allocation start, interim usage
//! report and end (user, addresses, transport, bytes and packets each way
//! with the kernel fast path's share, peers, the end reason), and security
//! events (authentication failures and lockouts), for billing and audit.
//!
//! Workers never wait on delivery: a record is serialised once and offered
//! to each sink's bounded queue (`try_send`); a full queue drops it and
//! counts it. Each sink has a thread (`sink.rs`) that sends in batches,
//! retries with backoff while its receiver is down, and at shutdown keeps
//! sending for a bounded time before it gives up.

mod sink;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Result};
use serde_json::{json, Value};

pub use sink::Sinks;

/// Where events go, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkConfig {
    /// One JSON object a line, appended.
    File(PathBuf),
    /// HTTP(S) POST of a JSON array, signed with HMAC-SHA256.
    Webhook {
        /// `http://host:port/path` or `https://…`.
        url: String,
        /// The signing secret (from `--events-webhook-secret-file`).
        secret: Vec<u8>,
    },
    /// `XADD key MAXLEN ~ maxlen * event JSON` on the `--redis-url` server.
    RedisStream {
        /// The Redis URL.
        url: String,
        /// The stream's key.
        key: String,
        /// The stream's approximate length bound.
        maxlen: u64,
    },
}

impl SinkConfig {
    /// The label in metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            SinkConfig::File(_) => "file",
            SinkConfig::Webhook { .. } => "webhook",
            SinkConfig::RedisStream { .. } => "redis",
        }
    }
}

/// What the events need, resolved from the options at start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EventsConfig {
    /// Every sink (empty: events off).
    pub sinks: Vec<SinkConfig>,
    /// How often each live allocation's usage is reported (zero: never).
    pub interim: Duration,
    /// Records a sink's queue holds before new ones are dropped.
    pub queue: usize,
    /// How long shutdown keeps delivering what is queued.
    pub flush: Duration,
}

impl EventsConfig {
    /// The webhook secret from its file's text: shorter than 16 bytes
    /// refuses start, naming the option.
    pub fn webhook_secret(path: &std::path::Path, text: &str) -> Result<Vec<u8>> {
        let secret = text.trim().as_bytes().to_vec();
        if secret.len() < 16 {
            bail!(
                "events-webhook-secret-file {}: the secret is {} bytes; use at least 16 (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
                path.display(),
                secret.len()
            );
        }
        Ok(secret)
    }
}

/// Counts per sink, for `/metrics`: queued, sent, dropped.
#[derive(Debug, Default)]
pub struct SinkCounts {
    /// Records accepted into the queue.
    pub queued: AtomicU64,
    /// Records delivered.
    pub sent: AtomicU64,
    /// Records dropped: the queue was full, or shutdown's time ran out.
    pub dropped: AtomicU64,
}

/// The counts of every running sink of this process, summed by sink kind
/// (for `/metrics`): (kind, queued, sent, dropped).
pub fn counts() -> Vec<(&'static str, [u64; 3])> {
    let mut by: Vec<(&'static str, [u64; 3])> = Vec::new();
    for (name, c) in sink::COUNTS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let v = [
            c.queued.load(Ordering::Relaxed),
            c.sent.load(Ordering::Relaxed),
            c.dropped.load(Ordering::Relaxed),
        ];
        match by.iter_mut().find(|(n, _)| n == name) {
            Some((_, t)) => {
                for (a, b) in t.iter_mut().zip(v) {
                    *a += b;
                }
            }
            None => by.push((name, v)),
        }
    }
    by
}

/// What an allocation's records repeat, handed to a binary upgrade's new
/// process with the allocation, so its interim and end records there
/// carry the id, start and user of its start record here.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MovedRecord {
    /// Its relayed address (as given to the client): how the new process
    /// finds the allocation it restored.
    pub relayed: std::net::SocketAddr,
    pub id: String,
    pub started_ms: u64,
    /// As shown (after `--redact`).
    pub user: String,
    pub client: String,
    pub peers: usize,
}

/// A worker's handle: offers records to every sink's queue.
#[derive(Clone)]
pub struct Emitter {
    pub(crate) queues: Vec<(SyncSender<Arc<str>>, Arc<SinkCounts>)>,
    node: Arc<str>,
    /// What every id this process makes starts with: the node and this
    /// process's start (Unix ms, hex), so that ids stay unique across
    /// restarts and binary upgrades, where the counters start again.
    prefix: Arc<str>,
    realm: Arc<str>,
    seq: Arc<AtomicU64>,
}

impl Emitter {
    pub(crate) fn new(
        queues: Vec<(SyncSender<Arc<str>>, Arc<SinkCounts>)>,
        node: &str,
        prefix: &str,
        realm: &str,
    ) -> Emitter {
        Emitter {
            queues,
            node: node.into(),
            prefix: prefix.into(),
            realm: realm.into(),
            seq: Arc::default(),
        }
    }

    /// A new allocation id, unique to this node across its restarts
    /// (an allocation handed over at a binary upgrade keeps its own).
    pub fn allocation_id(&self, worker: usize) -> String {
        format!(
            "{}-{worker}-{}",
            self.prefix,
            self.seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Sends `record` (an object) with its type, id, time, node and realm.
    pub fn emit(&self, kind: &str, mut record: Value) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        if let Value::Object(m) = &mut record {
            m.insert("type".into(), kind.into());
            m.insert("id".into(), format!("{}-e{n}", self.prefix).into());
            m.insert("time_ms".into(), unix_ms().into());
            m.insert("node".into(), self.node.as_ref().into());
            m.insert("realm".into(), self.realm.as_ref().into());
        }
        let line: Arc<str> = record.to_string().into();
        for (q, c) in &self.queues {
            match q.try_send(line.clone()) {
                Ok(()) => {
                    c.queued.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Usage of one allocation so far (the core's counters with the fast
/// path's share added).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Packets to peers.
    pub packets_to_peers: u64,
    /// Bytes to peers.
    pub bytes_to_peers: u64,
    /// Packets from peers.
    pub packets_from_peers: u64,
    /// Bytes from peers.
    pub bytes_from_peers: u64,
}

impl Usage {
    /// As JSON fields.
    pub fn fields(&self, v: &mut serde_json::Map<String, Value>) {
        v.insert("packets_to_peers".into(), self.packets_to_peers.into());
        v.insert("bytes_to_peers".into(), self.bytes_to_peers.into());
        v.insert("packets_from_peers".into(), self.packets_from_peers.into());
        v.insert("bytes_from_peers".into(), self.bytes_from_peers.into());
    }
}

/// The start record's fields.
pub fn start_record(
    allocation: &str,
    user: &str,
    transport: &str,
    client: &str,
    server: SocketAddr,
    relayed: &[SocketAddr],
    lifetime: Duration,
) -> Value {
    json!({
        "allocation": allocation,
        "user": user,
        "transport": transport,
        "client": client,
        "server": server.to_string(),
        "relayed": relayed.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "lifetime_s": lifetime.as_secs(),
    })
}
