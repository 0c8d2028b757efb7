//! The new process's side of a binary upgrade: the link to the old
//! process, and the steps it takes on it.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;

use anyhow::{bail, Context, Result};

use super::{recv, send, FromNew, Handover, Trailing, HANDOVER_FD_ENV, PROTOCOL, STEP_TIMEOUT};

/// The hand-over socket the old process passed.
pub(crate) struct Link {
    stream: UnixStream,
}

impl Link {
    /// The link, when this process was started by a binary upgrade.
    pub(crate) fn from_env() -> Result<Option<Link>> {
        let Some(value) = std::env::var_os(HANDOVER_FD_ENV) else {
            return Ok(None);
        };
        let fd: i32 = value
            .to_str()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{HANDOVER_FD_ENV}={value:?}: not a descriptor number"))?;
        let stream = udp_io::handover::inherited(fd).with_context(|| format!("{HANDOVER_FD_ENV}={fd}"))?;
        stream.set_read_timeout(Some(STEP_TIMEOUT))?;
        Ok(Some(Link { stream }))
    }

    /// Says the configuration is valid and takes the old process's
    /// sockets and allocations.
    pub(crate) fn take(&self, threads: usize) -> Result<(Handover, Vec<OwnedFd>)> {
        send(
            &self.stream,
            &FromNew::Ready {
                pid: std::process::id(),
                version: crate::version().into(),
                protocol: PROTOCOL,
                threads,
            },
            &[],
        )?;
        failpoint("after-ready");
        let (mut h, fds) = super::recv_handover(&self.stream)?;
        failpoint("after-handover");
        if std::env::var("TURNPIKE_UPGRADE_FAILPOINT").is_ok_and(|v| v == "future-snapshot") {
            // As if the old process wrote a format this build cannot read.
            for w in &mut h.workers {
                w.snapshot.version = turn_core::snapshot::SNAPSHOT_VERSION + 1;
            }
        }
        if h.protocol != PROTOCOL {
            bail!(
                "the old process speaks hand-over protocol {}, this one {PROTOCOL}",
                h.protocol
            );
        }
        if h.workers.len() != threads {
            bail!(
                "{} workers' sockets for {threads} worker threads",
                h.workers.len()
            );
        }
        Ok((h, fds))
    }

    /// Tells the old process this one cannot take over, and why.
    pub(crate) fn refuse(&self, why: &str) {
        let _ = send(&self.stream, &FromNew::Refused { why: why.into() }, &[]);
    }

    /// Tells the old process this one serves now, and takes its last
    /// word.
    pub(crate) fn serving(&self, allocations: usize, dropped: usize) -> Result<Trailing> {
        send(&self.stream, &FromNew::Serving { allocations, dropped }, &[])?;
        recv(&self.stream).context("the old process's trailing counts")
    }
}

/// Fault injection for the hand-over's tests: with
/// `TURNPIKE_UPGRADE_FAILPOINT` set to a step's name (`after-ready`,
/// `after-handover`, `before-serving`), the new process dies there, at once
/// and without a word, as a crash would; the old process must then serve
/// on. Set to `stall-` and a step's name, it stops there for a second
/// with neither process reading its sockets (what the kernel fast path
/// must relay through). Set to `future-snapshot`, it takes the snapshots
/// for a format newer than its own, which it must refuse.
pub(crate) fn failpoint(step: &str) {
    match std::env::var("TURNPIKE_UPGRADE_FAILPOINT") {
        Ok(v) if v == step => std::process::exit(70),
        Ok(v) if v.strip_prefix("stall-") == Some(step) => {
            std::thread::sleep(std::time::Duration::from_secs(1))
        }
        _ => {}
    }
}
