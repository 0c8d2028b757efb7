//! The sinks' delivery threads: a batch at a time, in order; a batch that
//! fails is sent again (the same batch, with the same delivery id) after a
//! backoff of 0.5 s doubling to 30 s, while new records wait in the
//! bounded queue. Once the workers are gone, what is queued is delivered
//! within the flush time, and the rest is counted as dropped.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::{info, warn};

use super::{Emitter, EventsConfig, SinkConfig, SinkCounts};

/// Every sink's counts in this process, for `/metrics`.
pub(super) static COUNTS: Mutex<Vec<(&'static str, Arc<SinkCounts>)>> = Mutex::new(Vec::new());

/// Records a batch holds at most.
const BATCH: usize = 256;
/// A webhook request's connect and read timeout.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

/// The running sinks: the emitter workers clone, and the threads.
pub struct Sinks {
    emitter: Emitter,
    threads: Vec<JoinHandle<()>>,
    /// Set once the workers are gone: retries are bounded by the flush time.
    closing: Arc<std::sync::atomic::AtomicBool>,
}

impl Sinks {
    /// Starts a thread per sink; `None` when no sink is configured.
    pub fn start(cfg: &EventsConfig, node: &str, realm: &str) -> Result<Option<Sinks>> {
        if cfg.sinks.is_empty() {
            return Ok(None);
        }
        // Ids (records, allocations, deliveries) start with this: a
        // receiver that deduplicates by them must never see one again
        // from a restarted or upgraded process.
        let prefix = format!("{node}-{:x}", super::unix_ms());
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        let closing: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        for s in &cfg.sinks {
            let mut deliver = Deliver::open(s)?;
            let (tx, rx) = sync_channel(cfg.queue.max(1));
            let counts = Arc::new(SinkCounts::default());
            COUNTS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((s.name(), counts.clone()));
            let (c, flush, name, prefix, closing) = (
                counts.clone(),
                cfg.flush,
                s.name(),
                prefix.clone(),
                closing.clone(),
            );
            threads.push(
                std::thread::Builder::new()
                    .name(format!("turnpike-events-{name}"))
                    .spawn(move || run(&mut deliver, rx, &c, (flush, &closing), name, &prefix))?,
            );
            queues.push((tx, counts));
        }
        Ok(Some(Sinks {
            emitter: Emitter::new(queues, node, &prefix, realm),
            threads,
            closing,
        }))
    }

    /// The handle workers emit through.
    pub fn emitter(&self) -> Emitter {
        self.emitter.clone()
    }

    /// After the workers have stopped: lets each sink deliver what is
    /// queued (within the flush time) and waits for it.
    pub fn finish(self) {
        let mine: Vec<Arc<SinkCounts>> = self.emitter.queues.iter().map(|(_, c)| c.clone()).collect();
        self.closing.store(true, Ordering::SeqCst);
        drop(self.emitter);
        for t in self.threads {
            let _ = t.join();
        }
        COUNTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(_, c)| !mine.iter().any(|m| Arc::ptr_eq(m, c)));
    }
}

fn run(
    deliver: &mut Deliver,
    rx: Receiver<Arc<str>>,
    counts: &SinkCounts,
    (flush, closing): (Duration, &std::sync::atomic::AtomicBool),
    name: &str,
    prefix: &str,
) {
    let mut batch: Vec<Arc<str>> = Vec::new();
    let mut batch_no = 0u64;
    let mut backoff = Duration::from_millis(500);
    let mut failing_since: Option<Instant> = None;
    let mut deadline: Option<Instant> = None;
    loop {
        if batch.is_empty() {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(l) => batch.push(l),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < BATCH {
                match rx.try_recv() {
                    Ok(l) => batch.push(l),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            batch_no += 1;
        }
        let delivery = format!("{prefix}-{name}-b{batch_no}");
        match deliver.send(&batch, &delivery) {
            Ok(()) => {
                counts.sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
                backoff = Duration::from_millis(500);
                if let Some(since) = failing_since.take() {
                    info!(
                        sink = name,
                        down_s = since.elapsed().as_secs(),
                        "events: the sink takes events again"
                    );
                }
            }
            Err(e) => {
                if failing_since.is_none() {
                    failing_since = Some(Instant::now());
                    warn!(sink = name, error = %format!("{e:#}"), "events: delivery failed; retrying with backoff (new events wait in the queue)");
                }
                // Gone workers: the flush time bounds the retries.
                if closing.load(Ordering::SeqCst) {
                    let end = *deadline.get_or_insert_with(|| Instant::now() + flush);
                    if Instant::now() >= end {
                        let left = batch.len() as u64 + rx.try_iter().count() as u64;
                        counts.dropped.fetch_add(left, Ordering::Relaxed);
                        warn!(
                            sink = name,
                            dropped = left,
                            "events: shutdown's flush time ran out; events dropped"
                        );
                        return;
                    }
                    std::thread::sleep(backoff.min(end.saturating_duration_since(Instant::now())));
                } else {
                    std::thread::sleep(backoff);
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// One sink's way of delivering a batch.
enum Deliver {
    File(std::fs::File),
    Webhook(Webhook),
    Redis {
        client: redis::Client,
        conn: Option<redis::Connection>,
        key: String,
        maxlen: u64,
    },
}

impl Deliver {
    fn open(s: &SinkConfig) -> Result<Deliver> {
        Ok(match s {
            SinkConfig::File(p) => Deliver::File(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("events-file {}: cannot open it for appending", p.display()))?,
            ),
            SinkConfig::Webhook { url, secret } => Deliver::Webhook(Webhook::parse(url, secret.clone())?),
            SinkConfig::RedisStream { url, key, maxlen } => Deliver::Redis {
                client: redis::Client::open(url.as_str()).context("events-redis-stream: redis-url")?,
                conn: None,
                key: key.clone(),
                maxlen: *maxlen,
            },
        })
    }

    fn send(&mut self, batch: &[Arc<str>], delivery: &str) -> Result<()> {
        match self {
            Deliver::File(f) => {
                let mut buf = String::new();
                for l in batch {
                    buf.push_str(l);
                    buf.push('\n');
                }
                f.write_all(buf.as_bytes())?;
                f.flush()?;
                Ok(())
            }
            Deliver::Webhook(w) => w.post(batch, delivery),
            Deliver::Redis {
                client,
                conn,
                key,
                maxlen,
            } => {
                if conn.is_none() {
                    *conn = Some(client.get_connection_with_timeout(HTTP_TIMEOUT)?);
                }
                let Some(c) = conn.as_mut() else {
                    bail!("no connection");
                };
                let mut pipe = redis::pipe();
                for l in batch {
                    pipe.cmd("XADD")
                        .arg(key.as_str())
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(*maxlen)
                        .arg("*")
                        .arg("event")
                        .arg(l.as_ref())
                        .ignore();
                }
                if let Err(e) = pipe.query::<()>(c) {
                    *conn = None;
                    return Err(e.into());
                }
                Ok(())
            }
        }
    }
}

/// A webhook: where, and the signing secret.
struct Webhook {
    tls: Option<Arc<rustls::ClientConfig>>,
    host: String,
    port: u16,
    path: String,
    secret: Vec<u8>,
}

impl Webhook {
    fn parse(url: &str, secret: Vec<u8>) -> Result<Webhook> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            bail!("events-webhook {url:?}: give an http:// or https:// URL");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].to_string()),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') => (
                h.trim_start_matches('[').trim_end_matches(']').to_string(),
                p.parse()
                    .with_context(|| format!("events-webhook {url:?}: {p:?} is not a port"))?,
            ),
            _ => (authority.to_string(), if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            bail!("events-webhook {url:?}: no host");
        }
        let tls = if tls {
            Some(turnpike_client::tls::verified_config(&[]).context("events-webhook: TLS roots")?)
        } else {
            None
        };
        Ok(Webhook {
            tls,
            host,
            port,
            path,
            secret,
        })
    }

    /// POSTs the batch as a JSON array: `X-Turnpike-Signature: sha256=HEX`
    /// (HMAC-SHA256 of the body with the secret) and `Idempotency-Key`
    /// (the same for every retry of this batch). 2xx is delivered.
    fn post(&self, batch: &[Arc<str>], delivery: &str) -> Result<()> {
        let mut body = String::from("[");
        for (i, l) in batch.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(l);
        }
        body.push(']');
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&self.secret) else {
            unreachable!("HMAC takes a key of any length")
        };
        mac.update(body.as_bytes());
        let sig: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let host_header = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let request = format!(
            "POST {} HTTP/1.1\r\nHost: {host_header}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nX-Turnpike-Signature: sha256={sig}\r\nIdempotency-Key: {delivery}\r\nUser-Agent: turnpike/{}\r\nConnection: close\r\n\r\n{body}",
            self.path,
            body.len(),
            env!("CARGO_PKG_VERSION"),
        );
        let addr = (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .with_context(|| format!("{} resolves to nothing", self.host))?;
        let tcp = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
        tcp.set_read_timeout(Some(HTTP_TIMEOUT))?;
        tcp.set_write_timeout(Some(HTTP_TIMEOUT))?;
        let mut response = Vec::new();
        match &self.tls {
            None => {
                let mut s = tcp;
                s.write_all(request.as_bytes())?;
                read_status(&mut s, &mut response)?;
            }
            Some(cfg) => {
                let name = rustls::pki_types::ServerName::try_from(self.host.clone())?;
                let conn = rustls::ClientConnection::new(cfg.clone(), name)?;
                let mut s = rustls::StreamOwned::new(conn, tcp);
                s.write_all(request.as_bytes())?;
                read_status(&mut s, &mut response)?;
            }
        }
        let line = String::from_utf8_lossy(&response);
        let code: u16 = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !(200..300).contains(&code) {
            bail!(
                "the webhook answered {:?}",
                line.lines().next().unwrap_or_default()
            );
        }
        Ok(())
    }
}

/// Reads until the status line is complete (or the peer closes).
fn read_status(s: &mut impl Read, into: &mut Vec<u8>) -> Result<()> {
    let mut buf = [0u8; 512];
    while !into.windows(2).any(|w| w == b"\r\n") {
        let n = match s.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                bail!("the webhook did not answer within {} s", HTTP_TIMEOUT.as_secs())
            }
            Err(e) => return Err(e.into()),
        };
        if n == 0 {
            break;
        }
        into.extend_from_slice(&buf[..n]);
        if into.len() > 8192 {
            break;
        }
    }
    Ok(())
}
