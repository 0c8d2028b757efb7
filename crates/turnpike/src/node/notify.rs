//! systemd's readiness protocol (`sd_notify`, a `Type=notify` unit): one
//! datagram to `$NOTIFY_SOCKET` saying the server is ready, and after a
//! binary upgrade which process is now the service's main one, so systemd
//! follows it instead of stopping the unit when the old process exits.
//! Without `$NOTIFY_SOCKET` (not under systemd, or another `Type=`) it
//! does nothing.

use std::os::unix::net::UnixDatagram;

use tracing::warn;

/// Sends `state` (e.g. `READY=1`) to systemd, if it listens.
pub(crate) fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    if let Err(e) = send(&path, state) {
        warn!(error = %e, socket = ?path, "cannot notify systemd");
    }
}

fn send(path: &std::ffi::OsStr, state: &str) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let sock = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    // An abstract socket is named with a leading '@'.
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sock.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        sock.send_to(state.as_bytes(), path)?;
    }
    Ok(())
}

/// Whether systemd runs this process but will not hear of a new main
/// process (a unit without `Type=notify`): an upgrade would then be
/// stopped with the old process.
pub(crate) fn supervised_without_notify() -> bool {
    std::env::var_os("INVOCATION_ID").is_some() && std::env::var_os("NOTIFY_SOCKET").is_none()
}
