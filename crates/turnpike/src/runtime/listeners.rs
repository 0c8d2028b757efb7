//! Binding listening sockets: SO_REUSEPORT per worker, pktinfo on wildcard
//! UDP, and refusing an address another process already holds.

use std::io::{self};
use std::net::SocketAddr;

use anyhow::{Context, Result};
use socket2::{Domain, Protocol, Socket, Type};

pub(super) fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    // Room for bursts: media arrives in bursts and the loop drains in batches.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&addr.into())?;
    if addr.ip().is_unspecified() {
        // Learn which of the host's addresses each datagram reached, so the
        // answer leaves from it (a multi-homed host) and relays use it.
        udp_io::set_recv_local_addr(&s, addr.is_ipv6())?;
    }
    Ok(s.into())
}

pub(super) fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Fails if another process already holds `addr`. SO_REUSEPORT would let a
/// second server (same user) share the port silently and take part of the
/// traffic, so the first socket of each address is probed without it.
pub(super) fn ensure_free(addr: SocketAddr, udp: bool) -> io::Result<()> {
    if addr.port() == 0 {
        return Ok(());
    }
    let ty = if udp { Type::DGRAM } else { Type::STREAM };
    let s = Socket::new(Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if !udp {
        // TIME_WAIT from a previous run must not count as "in use".
        s.set_reuse_address(true)?;
    }
    s.bind(&addr.into())
}

pub(super) fn in_use_hint(e: &io::Error) -> &'static str {
    if e.kind() == io::ErrorKind::AddrInUse {
        " (address in use: is another turnpike or TURN server running?)"
    } else if e.kind() == io::ErrorKind::PermissionDenied {
        " (permission denied: ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    } else {
        ""
    }
}

/// Binds the first UDP+TCP pair for `addr`; with port 0, UDP picks the port
/// and TCP takes the same one, retrying if TCP finds it taken.
pub(super) fn bind_pair(
    addr: SocketAddr,
) -> Result<(std::net::UdpSocket, std::net::TcpListener, SocketAddr)> {
    if let Err(e) = ensure_free(addr, true) {
        anyhow::bail!("listen {addr}: cannot bind UDP: {e}{}", in_use_hint(&e));
    }
    if let Err(e) = ensure_free(addr, false) {
        anyhow::bail!("listen {addr}: cannot bind TCP: {e}{}", in_use_hint(&e));
    }
    for _ in 0..20 {
        let u = bind_udp(addr).with_context(|| format!("listen {addr}: cannot bind UDP"))?;
        let bound = u.local_addr()?;
        match bind_tcp(bound) {
            Ok(t) => return Ok((u, t, bound)),
            Err(e) if addr.port() == 0 && e.kind() == io::ErrorKind::AddrInUse => continue,
            Err(e) => return Err(e).with_context(|| format!("listen {addr}: cannot bind TCP")),
        }
    }
    anyhow::bail!("listen {addr}: no port free for both UDP and TCP")
}
