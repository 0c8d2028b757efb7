//! `recvmmsg(2)` into reused buffers, with each datagram's sender and the
//! local address it reached.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use crate::addr::to_socket_addr;

/// Datagrams per syscall.
pub const BATCH: usize = 32;
/// Each slot holds the largest UDP payload, so nothing is ever truncated.
/// The buffer is zero-allocated, so pages never written stay unbacked.
const SLOT: usize = 65536;
/// Control bytes per datagram: room for one IPv6 pktinfo (CMSG_SPACE(20)
/// is 40) with margin.
const CONTROL: usize = 64;

#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; CONTROL]);

/// One received datagram.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    /// Who sent it.
    pub from: SocketAddr,
    /// The local IP it was sent to, when the socket reports it
    /// ([`crate::set_recv_local_addr`]); `None` otherwise.
    pub to_ip: Option<IpAddr>,
    /// Its bytes.
    pub data: &'a [u8],
}

/// Buffers and headers for one `recvmmsg` call, reused for every call.
///
/// The headers and iovecs are built once, pointing into buffers on the heap
/// that never move, so a call costs no set-up beyond resetting the lengths
/// the kernel wrote last time: with one datagram per call (many quiet
/// allocations) the set-up would otherwise cost more than the datagram.
pub struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    controls: Vec<Control>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    to_ip: [Option<IpAddr>; BATCH],
    n: usize,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point only into `bufs`,
// `addrs`, `controls` and `iovs`, heap buffers the batch owns and never
// reallocates; they move with it, and nothing else holds them.
unsafe impl Send for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Allocates the batch (2 MiB of address space, touched lazily).
    pub fn new() -> Self {
        let mut b = RecvBatch {
            bufs: vec![0u8; BATCH * SLOT],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            controls: vec![Control([0; CONTROL]); BATCH],
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
            lens: [0; BATCH],
            from: [None; BATCH],
            to_ip: [None; BATCH],
            n: 0,
        };
        let base = b.bufs.as_mut_ptr();
        for i in 0..BATCH {
            b.iovs.push(libc::iovec {
                // SAFETY: slot i lies within `bufs` (BATCH * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT) } as *mut libc::c_void,
                iov_len: SLOT,
            });
        }
        for i in 0..BATCH {
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut b.addrs[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_iov = &mut b.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = b.controls[i].0.as_mut_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_controllen = CONTROL as _;
            b.hdrs.push(h);
        }
        b
    }

    /// Receives what is queued on `sock`, up to [`BATCH`] datagrams. Returns
    /// how many; 0 when nothing is queued (EAGAIN).
    pub fn recv(&mut self, sock: impl AsFd) -> io::Result<usize> {
        // The kernel wrote the sender's and the control lengths into the
        // headers it filled.
        for h in &mut self.hdrs[..self.n] {
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_controllen = CONTROL as _;
        }
        // SAFETY: every header points at a live iovec, address slot and
        // control buffer owned by `self` (built in `new`, never moved),
        // sized as declared; the kernel writes at most iov_len, msg_namelen
        // and msg_controllen bytes into them.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_fd().as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            self.n = 0;
            return if e.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(e)
            };
        }
        let n = n as usize;
        for i in 0..n {
            self.lens[i] = self.hdrs[i].msg_len as usize;
            self.from[i] = to_socket_addr(&self.addrs[i]);
            self.to_ip[i] = local_ip(&self.hdrs[i].msg_hdr);
        }
        self.n = n;
        Ok(n)
    }

    /// Datagram `i` of the last call. `None` past the end, or for a sender
    /// of an unknown family.
    pub fn get(&self, i: usize) -> Option<Datagram<'_>> {
        if i >= self.n {
            return None;
        }
        Some(Datagram {
            from: self.from[i]?,
            to_ip: self.to_ip[i],
            data: &self.bufs[i * SLOT..i * SLOT + self.lens[i]],
        })
    }
}

/// The destination address in an `IP_PKTINFO` / `IPV6_PKTINFO` control
/// message of a received header, if there is one.
fn local_ip(h: &libc::msghdr) -> Option<IpAddr> {
    if h.msg_controllen == 0 {
        return None;
    }
    // SAFETY: the header's control pointer and length describe the buffer
    // the kernel filled in this call; CMSG_FIRSTHDR/NXTHDR stay inside it
    // and return null at its end.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::IPPROTO_IP && ty == libc::IP_PKTINFO {
                let info: libc::in_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const _);
                return Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr))));
            }
            if level == libc::IPPROTO_IPV6 && ty == libc::IPV6_PKTINFO {
                let info: libc::in6_pktinfo = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const _);
                return Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_a_batch_with_senders_v4_and_v6() {
        for (bind, from) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let Ok(rx) = std::net::UdpSocket::bind(bind) else {
                continue;
            };
            let tx = std::net::UdpSocket::bind(from).unwrap();
            let mut b = RecvBatch::new();
            assert_eq!(b.recv(&rx).unwrap(), 0, "nothing queued");
            for i in 0..40u8 {
                tx.send_to(&vec![i; i as usize + 1], rx.local_addr().unwrap())
                    .unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(b.recv(&rx).unwrap(), BATCH);
            for i in 0..BATCH {
                let d = b.get(i).unwrap();
                assert_eq!(d.from, tx.local_addr().unwrap());
                assert_eq!(d.to_ip, None, "pktinfo was not asked for");
                assert_eq!(d.data, &vec![i as u8; i + 1][..]);
            }
            assert_eq!(b.recv(&rx).unwrap(), 8);
            let big = vec![9u8; 60000];
            tx.send_to(&big, rx.local_addr().unwrap()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(b.recv(&rx).unwrap(), 1);
            assert_eq!(b.get(0).unwrap().data.len(), 60000, "no truncation");
        }
    }

    #[test]
    fn a_wildcard_socket_learns_the_address_each_datagram_reached() {
        // 127.0.0.1 and 127.0.0.2 are both this host's (lo holds 127/8).
        let rx = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        crate::set_recv_local_addr(&rx, false).unwrap();
        let port = rx.local_addr().unwrap().port();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"one", ("127.0.0.1", port)).unwrap();
        tx.send_to(b"two", ("127.0.0.2", port)).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let mut b = RecvBatch::new();
        assert_eq!(b.recv(&rx).unwrap(), 2);
        assert_eq!(b.get(0).unwrap().to_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(b.get(1).unwrap().to_ip, Some("127.0.0.2".parse().unwrap()));
        if let Ok(rx6) = std::net::UdpSocket::bind("[::]:0") {
            crate::set_recv_local_addr(&rx6, true).unwrap();
            let port = rx6.local_addr().unwrap().port();
            let tx6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
            tx6.send_to(b"six", ("::1", port)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(30));
            assert_eq!(b.recv(&rx6).unwrap(), 1);
            assert_eq!(b.get(0).unwrap().to_ip, Some("::1".parse().unwrap()));
        }
    }
}
