//! The old process's side of a binary upgrade: start the new binary,
//! hand over when it is ready, and decide.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{recv, send, FromNew, Handover, Trailing, HANDOVER_FD_ENV, PROTOCOL, STEP_TIMEOUT};
use crate::runtime::Control;
use crate::runtime::Decision;

/// What the old process needs to hand over: how it was started, its
/// workers, and copies of its HTTP listeners.
pub(crate) struct Upgrader {
    /// The binary's path as started (after a package upgrade, the new
    /// binary is there).
    pub(crate) exe: PathBuf,
    pub(crate) args: Vec<OsString>,
    pub(crate) threads: usize,
    pub(crate) control: Control,
    pub(crate) listen: Vec<SocketAddr>,
    pub(crate) tls_listen: Vec<SocketAddr>,
    pub(crate) alt_listen: Vec<SocketAddr>,
    /// The metrics, admin and web listeners, where present.
    pub(crate) http: [Option<(SocketAddr, std::net::TcpListener)>; 3],
}

/// What a hand-over did.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub(crate) pid: u32,
    pub(crate) version: String,
    /// Allocations the new process serves, and those it dropped.
    pub(crate) moved: usize,
    pub(crate) dropped: usize,
    /// What was handed over, by kind, and what stayed.
    pub(crate) kinds: super::Moved,
    /// From the workers' pause to the new process serving.
    pub(crate) gap: Duration,
}

impl Upgrader {
    /// Starts the new binary and hands over. An error leaves this process
    /// serving as before (its workers resume) and says why.
    pub(crate) fn run(&self) -> Result<Outcome> {
        // Under systemd the new process must become the unit's main
        // process (sd_notify MAINPID=), or systemd stops the unit, and the
        // new process with it, when this one exits.
        if crate::node::notify::supervised_without_notify() {
            bail!("running under systemd in a unit without Type=notify and NotifyAccess=all, which would stop the new process when this one exits; use deploy/turnpike.service's settings, or systemctl restart");
        }
        let (ours, theirs) = UnixStream::pair().context("a socket pair for the hand-over")?;
        let fd = udp_io::handover::inheritable(&theirs).context("the hand-over socket")?;
        let mut child = Command::new(&self.exe)
            .args(&self.args)
            .env(HANDOVER_FD_ENV, fd.to_string())
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.exe.display()))?;
        drop(theirs);
        ours.set_read_timeout(Some(STEP_TIMEOUT))?;
        let result = self.converse(&ours);
        if result.is_err() {
            // It must not serve beside this process; and if it had put its
            // program on the fast path's links, this one's goes back.
            let _ = child.kill();
            let _ = child.wait();
            self.control.fast_reclaim();
        }
        result
    }

    fn converse(&self, link: &UnixStream) -> Result<Outcome> {
        let (pid, version) = match recv::<FromNew>(link).context("waiting for the new process")? {
            FromNew::Ready {
                pid,
                version,
                protocol,
                threads,
            } => {
                if protocol != PROTOCOL {
                    bail!("the new binary speaks hand-over protocol {protocol}, this one {PROTOCOL}");
                }
                if threads != self.threads {
                    bail!(
                        "the new process would run {threads} worker threads and this one runs {}: the sockets are per worker; keep threads the same",
                        self.threads
                    );
                }
                (pid, version)
            }
            FromNew::Refused { why } => bail!("the new binary refused: {why}"),
            FromNew::Serving { .. } => bail!("the new process skipped a step"),
        };
        let paused = Instant::now();
        // From here each worker reads nothing until its decision; dropping
        // the decisions (any error below) resumes it.
        let parts = self.control.pause_for_handover(STEP_TIMEOUT)?;
        let (nonce_secret, unix_at_epoch, age) = self.control.nonce_clock();
        let fast = self.control.fast_handover()?;
        let mut workers = Vec::new();
        let mut fds = Vec::new();
        let mut decisions = Vec::new();
        for (part, f, d) in parts {
            workers.push(part);
            fds.extend(f);
            decisions.push(d);
        }
        let http: Vec<BorrowedFd<'_>> = self.http.iter().flatten().map(|(_, l)| l.as_fd()).collect();
        let kinds = super::Moved::of(&workers);
        let handover = Handover {
            protocol: PROTOCOL,
            version: crate::version().into(),
            pid: std::process::id(),
            nonce_secret,
            unix_at_epoch,
            epoch_age_ms: age.as_millis() as u64,
            listen: self.listen.clone(),
            tls_listen: self.tls_listen.clone(),
            alt_listen: self.alt_listen.clone(),
            workers,
            http: [0, 1, 2].map(|i| self.http[i].as_ref().map(|(a, _)| *a)),
            fast_links: fast.links.iter().map(|(i, n, _)| (i.clone(), *n)).collect(),
            fast_neighbours: fast.neighbours.is_some(),
            fast_totals: fast.totals,
            auth_guard: Some(self.control.guard_state()),
            upgrades: [
                crate::metrics::UPGRADES_OK.load(std::sync::atomic::Ordering::Relaxed),
                crate::metrics::UPGRADES_FAILED.load(std::sync::atomic::Ordering::Relaxed),
            ],
            fds: fds.len() + http.len() + fast.links.len() + usize::from(fast.neighbours.is_some()),
        };
        let all: Vec<BorrowedFd<'_>> = fds
            .iter()
            .map(|f| f.as_fd())
            .chain(http)
            .chain(fast.links.iter().map(|(_, _, l)| l.as_fd()))
            .chain(fast.neighbours.iter().map(|m| m.as_fd()))
            .collect();
        send(link, &handover, &all)?;
        match recv::<FromNew>(link).context("waiting for the new process to serve")? {
            FromNew::Serving { allocations, dropped } => {
                self.control.set_handed_over();
                let mut trailing = Trailing::default();
                let mut asked = Vec::new();
                for d in decisions {
                    let (tx, rx) = std::sync::mpsc::channel();
                    let _ = d.send(Decision::LetGo(tx));
                    asked.push(rx);
                }
                for rx in asked {
                    trailing
                        .workers
                        .push(rx.recv_timeout(STEP_TIMEOUT).unwrap_or_default());
                }
                let now = self.control.fast_totals();
                trailing.totals = [0, 1, 2, 3].map(|i| now[i].saturating_sub(fast.totals[i]));
                if let Err(e) = send(link, &trailing, &[]) {
                    tracing::warn!(error = %format!("{e:#}"), "upgrade: the new process did not take the fast path's trailing counts");
                }
                Ok(Outcome {
                    pid,
                    version,
                    moved: allocations,
                    dropped,
                    kinds,
                    gap: paused.elapsed(),
                })
            }
            FromNew::Refused { why } => bail!("the new process refused the hand-over: {why}"),
            FromNew::Ready { .. } => bail!("the new process repeated a step"),
        }
    }
}
