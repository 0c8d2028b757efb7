//! The control plane's HTTP servers (metrics, admin API, public ICE page)
//! each run one axum router on a thread of their own, so a slow client or
//! a stuck handler never touches a worker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use anyhow::{Context, Result};

/// Set once a binary upgrade's new process serves on this process's HTTP
/// sockets: this one's servers stop accepting (or both processes would
/// answer, the old one with what it no longer serves) and finish the
/// requests in flight, `POST /api/upgrade`'s answer among them.
fn retired() -> &'static tokio::sync::watch::Sender<bool> {
    static RETIRED: OnceLock<tokio::sync::watch::Sender<bool>> = OnceLock::new();
    RETIRED.get_or_init(|| tokio::sync::watch::channel(false).0)
}

/// HTTP servers of this process still running.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Stops every HTTP server of this process from accepting; each ends when
/// its connections have (see [`all_retired`]).
pub(crate) fn retire() {
    retired().send_replace(true);
}

/// Whether every HTTP server of this process has ended.
pub(crate) fn all_retired() -> bool {
    RUNNING.load(Ordering::SeqCst) == 0
}

/// Binds `addr` (errors name `what`, the flag that asked for it).
pub fn bind(what: &str, addr: SocketAddr) -> Result<std::net::TcpListener> {
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("{what} {addr}: cannot bind"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves `router` on `listener` from a thread named `name`. Handlers see
/// the caller's address (`ConnectInfo`), for the log line of every action
/// and for per-IP limits.
pub(crate) fn spawn(name: &str, listener: std::net::TcpListener, router: axum::Router) -> Result<()> {
    let label = name.to_owned();
    std::thread::Builder::new()
        .name(format!("turnpike-{name}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, server = %label, "cannot start the HTTP runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                let service = router.into_make_service_with_connect_info::<SocketAddr>();
                let mut retire = retired().subscribe();
                RUNNING.fetch_add(1, Ordering::SeqCst);
                let served = axum::serve(listener, service).with_graceful_shutdown(async move {
                    let _ = retire.wait_for(|r| *r).await;
                });
                if let Err(e) = served.await {
                    tracing::error!(error = %e, server = %label, "HTTP server stopped");
                }
                RUNNING.fetch_sub(1, Ordering::SeqCst);
            });
        })?;
    Ok(())
}
