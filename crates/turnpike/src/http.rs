//! The control plane's HTTP servers (metrics, admin API, public ICE page)
//! each run one axum router on a thread of their own, so a slow client or
//! a stuck handler never touches a worker.

use std::net::SocketAddr;

use anyhow::{Context, Result};

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
                if let Err(e) = axum::serve(listener, service).await {
                    tracing::error!(error = %e, server = %label, "HTTP server stopped");
                }
            });
        })?;
    Ok(())
}
