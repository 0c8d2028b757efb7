//! Host facts read through libc.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host's interface addresses (every family getifaddrs reports that
/// is IPv4 or IPv6), without duplicates.
pub fn local_addresses() -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = interface_addresses().into_iter().map(|(_, ip, _)| ip).collect();
    out.sort();
    out.dedup();
    out
}

/// The index of the interface holding `ip` (where the kernel sends a
/// datagram from it), if any.
pub fn interface_of(ip: IpAddr) -> Option<u32> {
    let (name, _, _) = interface_addresses().into_iter().find(|(_, a, _)| *a == ip)?;
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    let idx = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Every interface address: (interface name, address, whether the
/// interface is loopback).
pub fn interface_addresses() -> Vec<(String, IpAddr, bool)> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`; on success it is
    // freed below with freeifaddrs and not used after.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, alive
        // until freeifaddrs.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() && !ifa.ifa_name.is_null() {
            // SAFETY: ifa_name is a NUL-terminated string owned by the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }
                .to_string_lossy()
                .into_owned();
            let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
            // SAFETY: ifa_addr points to a sockaddr whose family says its
            // real type; each arm reads only that type.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as libc::c_int;
            match family {
                libc::AF_INET => {
                    // SAFETY: the family is AF_INET, so this is a sockaddr_in.
                    let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                    let ip = IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)));
                    out.push((name, ip, loopback));
                }
                libc::AF_INET6 => {
                    // SAFETY: the family is AF_INET6, so this is a sockaddr_in6.
                    let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                    out.push((name, IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)), loopback));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The kernel's clock ticks per second (`_SC_CLK_TCK`), the unit of CPU
/// times in `/proc/<pid>/stat`; 100 if unknown.
pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf takes an integer and returns an integer.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Moves the calling thread into the network namespace at `path` (as
/// `ip netns` names them, `/var/run/netns/NAME`): sockets it opens from
/// then on live there. Only this thread moves (setns(2) on a thread), so
/// a test or tool can run one side of a conversation in another
/// namespace. Needs CAP_SYS_ADMIN.
pub fn enter_network_namespace(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns takes a valid open descriptor (kept open by `ns` for
    // the call) and a namespace type; it touches no memory of ours.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_addresses_include_loopback() {
        let a = super::local_addresses();
        assert!(a.contains(&"127.0.0.1".parse().unwrap()), "{a:?}");
    }
}
