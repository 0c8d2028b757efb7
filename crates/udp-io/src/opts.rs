//! Socket options the server sets on its UDP sockets.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

fn setsockopt_int(
    fd: impl AsFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a live descriptor (borrowed for the call) and a c_int option
    // value of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_fd().as_raw_fd(),
            level,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Asks the kernel to report, with each datagram, the local address it was
/// sent to (`IP_PKTINFO`, or `IPV6_RECVPKTINFO` on an IPv6 socket), so a
/// socket bound to a wildcard address knows which address a client reached.
pub fn set_recv_local_addr(fd: impl AsFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO, 1)
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1)
    }
}

/// Sets or clears the Don't Fragment bit on what the socket sends
/// (RFC 8656 §14.8 DONT-FRAGMENT): `IP_PMTUDISC_DO` makes the kernel send
/// IPv4 with DF and refuse datagrams above the path MTU; IPv6 routers never
/// fragment, so there it only stops the host fragmenting (`IPV6_DONTFRAG`).
pub fn set_dont_fragment(fd: impl AsFd, ipv6: bool, on: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, on as libc::c_int)
    } else {
        let mode = if on {
            libc::IP_PMTUDISC_DO
        } else {
            libc::IP_PMTUDISC_DONT
        };
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, mode)
    }
}

/// Queues ICMP errors for what the socket sent on its error queue
/// (`IP_RECVERR` / `IPV6_RECVERR`), read with [`crate::ErrorQueue`]. The
/// socket then reports readiness for errors (EPOLLERR).
pub fn set_recv_errors(fd: impl AsFd, ipv6: bool) -> io::Result<()> {
    if ipv6 {
        setsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_RECVERR, 1)
    } else {
        setsockopt_int(fd, libc::IPPROTO_IP, libc::IP_RECVERR, 1)
    }
}
