//! A binary upgrade without dropping a call (SIGUSR2): the running server
//! starts the binary at the path it was started from (the new one after a
//! package upgrade) with the same arguments, and hands it every listening
//! socket, the relay sockets of its UDP-relay allocations and its plain TCP
//! connections, with the allocations themselves as data
//! (`turn_core::snapshot`).
//!
//! The steps, over a Unix stream pair the new process inherits
//! (`TURNPIKE_HANDOVER_FD`):
//! 1. the new process validates its configuration, then says `Ready`
//!    (or `Refused`, why);
//! 2. the old one pauses its workers, each taking its snapshot, and sends
//!    the [`Handover`] with the sockets (`SCM_RIGHTS`);
//! 3. the new one restores the snapshots, starts its workers on the same
//!    sockets, puts its XDP program on the fast path's links (one atomic
//!    swap per interface: the kernel relays throughout, with the old
//!    program's entries until then and the restored ones after) and says
//!    `Serving`;
//! 4. the old one says what its kernel program relayed since the
//!    snapshot ([`Trailing`]), lets the moved allocations go, closes its copies of the
//!    sockets and drains what stayed (TLS connections and RFC 6062
//!    allocations) until they end or `drain-timeout` passes, then exits.
//!
//! Until step 4 nothing is given up: a new process that refuses, crashes,
//! or says nothing within [`STEP_TIMEOUT`] leaves the old one serving as
//! before (the workers resume, and its program goes back on the links),
//! and the log says why. Datagrams that
//! arrive in the pause wait in the sockets' queues; they are read by
//! whichever process serves next.

pub(crate) mod new;
pub(crate) mod old;

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use turn_core::snapshot::Snapshot;
use udp_io::handover::{recv_with_fds, send_with_fds, MAX_FDS};

/// The environment variable naming the hand-over descriptor.
pub const HANDOVER_FD_ENV: &str = "TURNPIKE_HANDOVER_FD";

/// The hand-over protocol's version: both processes must speak it.
pub(crate) const PROTOCOL: u32 = 2;

/// How long either side waits for the other's next step.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Every upgrade's outcome in this process, in order: what `POST
/// /api/upgrade` waits for (the signal thread carries the upgrade out).
static OUTCOMES: std::sync::Mutex<Vec<Result<serde_json::Value, String>>> = std::sync::Mutex::new(Vec::new());

/// Records an upgrade's outcome (the node's signal thread).
pub(crate) fn record(outcome: Result<serde_json::Value, String>) {
    OUTCOMES.lock().unwrap_or_else(|p| p.into_inner()).push(outcome);
}

/// Asks this process for an upgrade (raises SIGUSR2, as `kill -USR2` would)
/// and waits for its outcome: the new process's pid and what moved, or
/// why not.
pub fn request_and_wait(timeout: Duration) -> Result<serde_json::Value, String> {
    let seen = OUTCOMES.lock().unwrap_or_else(|p| p.into_inner()).len();
    signal_hook::low_level::raise(signal_hook::consts::SIGUSR2).map_err(|e| e.to_string())?;
    let until = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < until {
        if let Some(o) = OUTCOMES.lock().unwrap_or_else(|p| p.into_inner()).get(seen) {
            return o.clone();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "no outcome within {} s (the server may be stopping)",
        timeout.as_secs()
    ))
}

/// What the new process says.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum FromNew {
    /// Its configuration is valid; send the sockets.
    Ready {
        pid: u32,
        version: String,
        protocol: u32,
        threads: usize,
    },
    /// It cannot take over, and why.
    Refused { why: String },
    /// Its workers serve the handed-over sockets and allocations.
    Serving { allocations: usize, dropped: usize },
}

/// What the old process hands over, beside the sockets: the descriptors
/// follow in the order listed (each worker's UDP listeners, TCP listeners,
/// UDP relay sockets, RFC 6062 relay listeners, plain TCP connections and
/// RFC 6062 peer connections, then the HTTP listeners
/// present, then the fast path's links and its learned next hops).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Handover {
    pub(crate) protocol: u32,
    pub(crate) version: String,
    pub(crate) pid: u32,
    /// The nonce key and its clock, so nonces given out stay valid.
    pub(crate) nonce_secret: [u8; 32],
    pub(crate) unix_at_epoch: u64,
    pub(crate) epoch_age_ms: u64,
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) tls_listen: Vec<SocketAddr>,
    pub(crate) alt_listen: Vec<SocketAddr>,
    pub(crate) workers: Vec<WorkerPart>,
    /// The metrics, admin and web listeners, where present.
    pub(crate) http: [Option<SocketAddr>; 3],
    /// The kernel fast path's XDP links, when it runs: interface and
    /// whether native; their descriptors follow the HTTP listeners'.
    #[serde(default)]
    pub(crate) fast_links: Vec<(String, bool)>,
    /// Whether the fast path's learned next hops (a map) follow the links.
    #[serde(default)]
    pub(crate) fast_neighbours: bool,
    /// What the fast path counted so far (forwarded, matched, no route,
    /// partial checksum), for its totals to continue.
    #[serde(default)]
    pub(crate) fast_totals: [u64; 4],
    /// The old process's upgrade counts (ok, failed), for
    /// `turnpike_upgrades_total` to continue (this one counts as ok).
    #[serde(default)]
    pub(crate) upgrades: [u64; 2],
    /// The brute-force guard's failures and blocks: a source blocked stays
    /// blocked.
    #[serde(default)]
    pub(crate) auth_guard: Option<turn_core::limits::GuardState>,
    /// How many descriptors follow, in all.
    pub(crate) fds: usize,
}

/// One worker's sockets and allocations.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct WorkerPart {
    /// UDP listeners: the old process's listener id, and the address.
    pub(crate) udp: Vec<(u32, SocketAddr)>,
    /// TCP listeners: the old listener id, the address, TLS.
    pub(crate) tcp: Vec<(u32, SocketAddr, bool)>,
    /// UDP relay sockets of the snapshot's allocations.
    pub(crate) relays: Vec<SocketAddr>,
    /// RFC 6062 relay listeners of the snapshot's TCP allocations.
    #[serde(default)]
    pub(crate) tcp_relays: Vec<SocketAddr>,
    /// Plain TCP client connections (TLS ones stay), control and data.
    pub(crate) conns: Vec<ConnState>,
    /// RFC 6062 peer data connections of the snapshot's TCP allocations.
    #[serde(default)]
    pub(crate) peers: Vec<PeerState>,
    pub(crate) snapshot: Snapshot,
    /// Allocations that stay with the old process (on TLS, or RFC 6062
    /// ones that cannot move).
    #[serde(default)]
    pub(crate) stayed: usize,
    /// Bytes the worker's closed RFC 6062 pairs moved (to peers, from
    /// peers), for `turnpike_tcp_relayed_bytes_total` to continue.
    #[serde(default)]
    pub(crate) tcp_closed_bytes: [u64; 2],
    /// Session events: what the moved allocations' records repeat (their
    /// ids, starts and users), so billing sees one allocation, not two.
    #[serde(default)]
    pub(crate) records: Vec<crate::events::MovedRecord>,
}

/// What a hand-over moves, by kind, and what stays (for the log).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Moved {
    /// Allocations on UDP, on plain TCP (UDP relays), RFC 6062 ones.
    pub(crate) udp: usize,
    pub(crate) tcp: usize,
    pub(crate) rfc6062: usize,
    /// Plain TCP connections (control and data) and RFC 6062 peer
    /// connections.
    pub(crate) conns: usize,
    pub(crate) peer_conns: usize,
    /// Allocations left with the old process.
    pub(crate) stayed: usize,
}

impl Moved {
    pub(crate) fn of(parts: &[WorkerPart]) -> Moved {
        let mut m = Moved::default();
        for p in parts {
            for a in &p.snapshot.allocations {
                match (a.tcp, a.transport) {
                    (true, _) => m.rfc6062 += 1,
                    (false, turn_core::Transport::Udp) => m.udp += 1,
                    (false, _) => m.tcp += 1,
                }
            }
            m.conns += p.conns.len();
            m.peer_conns += p.peers.len();
            m.stayed += p.stayed;
        }
        m
    }
}

/// An RFC 6062 peer data connection: its CONNECTION-ID, the client's bytes
/// not yet written to the peer, and the bytes moved each way so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct PeerState {
    pub(crate) id: u32,
    pub(crate) to_peer: Vec<u8>,
    pub(crate) bytes: [u64; 2],
}

/// A plain TCP client connection: its 5-tuple, what was read and not yet
/// handled (the start of a message) and what is queued and not yet
/// written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConnState {
    pub(crate) client: SocketAddr,
    pub(crate) server: SocketAddr,
    /// The old process's id of the listener that accepted it.
    pub(crate) listener: u32,
    pub(crate) rbuf: Vec<u8>,
    pub(crate) wbuf: Vec<u8>,
    /// Whether a whole message has arrived (else it is still "pending").
    pub(crate) got_message: bool,
    /// RFC 6062: the peer connection this data connection is bound to,
    /// and the peer's bytes not yet written to the client.
    #[serde(default)]
    pub(crate) pair: Option<u32>,
    #[serde(default)]
    pub(crate) raw_out: Vec<u8>,
}

/// A fast-path entry's counts: the 5-tuple of its allocation, its
/// channel, and packets and bytes each way (to the peer, from it).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FastCount {
    pub(crate) transport: turn_core::Transport,
    pub(crate) client: SocketAddr,
    pub(crate) server: SocketAddr,
    pub(crate) channel: u16,
    pub(crate) counts: [u64; 4],
}

/// The old process's last word, once the new one serves: what its kernel
/// program relayed between the snapshot and the swap of programs, per
/// worker and in total, so the new process's stats and metrics lose none
/// of it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Trailing {
    pub(crate) workers: Vec<Vec<FastCount>>,
    pub(crate) totals: [u64; 4],
}

impl Handover {
    /// How many descriptors its parts name: must equal `fds`.
    fn named(&self) -> usize {
        self.workers
            .iter()
            .map(|w| {
                w.udp.len()
                    + w.tcp.len()
                    + w.relays.len()
                    + w.tcp_relays.len()
                    + w.conns.len()
                    + w.peers.len()
            })
            .sum::<usize>()
            + self.http.iter().flatten().count()
            + self.fast_links.len()
            + usize::from(self.fast_neighbours)
    }
}

/// Sends `msg` and `fds`, in messages of at most [`MAX_FDS`] descriptors
/// (the first carries `msg`).
fn send<T: Serialize>(stream: &UnixStream, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<()> {
    let payload = serde_json::to_vec(msg)?;
    let mut chunks = fds.chunks(MAX_FDS);
    send_with_fds(stream, &payload, chunks.next().unwrap_or(&[])).context("hand-over socket")?;
    for chunk in chunks {
        send_with_fds(stream, b"", chunk).context("hand-over socket")?;
    }
    Ok(())
}

/// Receives one message without descriptors.
fn recv<T: DeserializeOwned>(stream: &UnixStream) -> Result<T> {
    match recv_with_fds(stream).context("hand-over socket")? {
        Some((payload, fds)) if fds.is_empty() => Ok(serde_json::from_slice(&payload)?),
        Some(_) => bail!("descriptors where none were expected"),
        None => bail!("the other process closed the hand-over socket"),
    }
}

/// Receives the [`Handover`] and all its descriptors.
fn recv_handover(stream: &UnixStream) -> Result<(Handover, Vec<OwnedFd>)> {
    let Some((payload, mut fds)) = recv_with_fds(stream).context("hand-over socket")? else {
        bail!("the old process closed the hand-over socket");
    };
    let h: Handover = serde_json::from_slice(&payload).context("the hand-over message")?;
    if h.named() != h.fds {
        bail!(
            "the hand-over names {} descriptors and announces {}",
            h.named(),
            h.fds
        );
    }
    while fds.len() < h.fds {
        match recv_with_fds(stream).context("hand-over socket")? {
            Some((_, more)) if !more.is_empty() => fds.extend(more),
            _ => bail!("{} of {} descriptors arrived", fds.len(), h.fds),
        }
    }
    if fds.len() != h.fds {
        bail!("{} descriptors arrived, {} announced", fds.len(), h.fds);
    }
    Ok((h, fds))
}
