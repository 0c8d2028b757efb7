//! What changes under a running server without a signal: the files
//! `--reload-on-change` watches and the credential stores.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::info;

use crate::credentials::CredentialStores;
use crate::runtime::Control;

/// `--reload-on-change`: the watched files' contents, compared every 2 s.
/// Contents, not mtimes: a Kubernetes ConfigMap update swaps a symlink,
/// and an editor may keep the mtime.
pub(super) struct FileWatch {
    files: Vec<std::path::PathBuf>,
    last: Vec<Option<Vec<u8>>>,
    checked: Instant,
}

impl FileWatch {
    pub(super) fn new(files: Vec<std::path::PathBuf>) -> Self {
        let last = files.iter().map(|f| std::fs::read(f).ok()).collect();
        FileWatch {
            files,
            last,
            checked: Instant::now(),
        }
    }

    pub(super) fn changed(&mut self) -> bool {
        if self.files.is_empty() || self.checked.elapsed() < Duration::from_secs(2) {
            return false;
        }
        self.checked = Instant::now();
        let now: Vec<Option<Vec<u8>>> = self.files.iter().map(|f| std::fs::read(f).ok()).collect();
        // A file gone for a moment (being replaced) is not a change yet.
        if now.iter().any(Option::is_none) || now == self.last {
            return false;
        }
        self.last = now;
        true
    }
}

/// Re-reads the credential stores every 2 s (at once when the fleet's
/// subscriber pushes) and, when one changed, hands the workers the merged
/// credentials.
pub(super) fn spawn_store_watcher(
    control: Control,
    stores: Arc<Mutex<CredentialStores>>,
    pushed: std::sync::mpsc::Receiver<()>,
) {
    std::thread::spawn(move || loop {
        match pushed.recv_timeout(Duration::from_secs(2)) {
            Ok(()) => while pushed.try_recv().is_ok() {},
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // No fleet (or it stopped): nothing pushes, so only the clock
            // paces this loop. Without this sleep it would spin.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_secs(2))
            }
        }
        // Published under the stores' lock, as a reload is: whichever of
        // the two comes second carries every source's current state.
        let mut s = stores.lock().unwrap_or_else(|p| p.into_inner());
        if !s.refresh() {
            continue;
        }
        let creds = s.merged();
        info!(
            users = creds.user_count(),
            secrets = creds.secret_count(),
            sources = %s.counts(),
            "credential stores changed; credentials updated"
        );
        s.report_conflicts();
        control.set_credentials(creds);
    });
}
