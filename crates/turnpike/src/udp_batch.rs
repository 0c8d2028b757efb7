//! Batched UDP receive with `recvmmsg(2)`: one syscall for up to
//! [`BATCH`] datagrams. This module holds the data plane's only `unsafe`
//! code.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per syscall.
pub const BATCH: usize = 32;
/// Each slot holds the largest UDP payload, so nothing is ever truncated.
/// The buffer is zero-allocated, so pages never written stay unbacked.
const SLOT: usize = 65536;

/// Buffers and headers for one `recvmmsg` call, reused for every call.
pub struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    n: usize,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Allocates the batch (2 MiB of address space, touched lazily).
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![0u8; BATCH * SLOT],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            #[allow(unsafe_code)]
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            lens: [0; BATCH],
            from: [None; BATCH],
            n: 0,
        }
    }

    /// Receives what is queued on `fd`, up to [`BATCH`] datagrams. Returns
    /// how many; 0 when nothing is queued (EAGAIN).
    #[allow(unsafe_code)]
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // SAFETY: iovec/mmsghdr are plain old data; all-zero is valid and
        // every field read by the kernel is set below.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        let base = self.bufs.as_mut_ptr();
        for i in 0..BATCH {
            iov[i] = libc::iovec {
                // SAFETY: slot i lies within `bufs` (BATCH * SLOT bytes).
                iov_base: unsafe { base.add(i * SLOT) } as *mut libc::c_void,
                iov_len: SLOT,
            };
            hdrs[i].msg_hdr.msg_name = &mut self.addrs[i] as *mut libc::sockaddr_storage as *mut libc::c_void;
            hdrs[i].msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at a live iovec and address slot owned
        // by `self` or this frame, sized as declared; the kernel writes at most
        // iov_len bytes and msg_namelen bytes into them.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
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
        for (i, h) in hdrs.iter().enumerate().take(n) {
            self.lens[i] = h.msg_len as usize;
            self.from[i] = to_socket_addr(&self.addrs[i]);
        }
        self.n = n;
        Ok(n)
    }

    /// Datagram `i` of the last call: its sender and bytes. `None` for a
    /// sender of an unknown family.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.n {
            return None;
        }
        let from = self.from[i]?;
        Some((from, &self.bufs[i * SLOT..i * SLOT + self.lens[i]]))
    }
}

/// Sends each of `msgs` as one datagram on the connected socket `fd`, with
/// one `sendmmsg(2)` per [`BATCH`]. Returns how many the kernel took;
/// with a full send buffer that is fewer (the rest is dropped, as UDP is).
#[allow(unsafe_code)]
pub fn send_many(fd: RawFd, msgs: &[&[u8]]) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in msgs.chunks(BATCH) {
        // SAFETY: plain old data; all-zero is valid, fields set below.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for (i, m) in chunk.iter().enumerate() {
            iov[i] = libc::iovec {
                iov_base: m.as_ptr() as *mut libc::c_void,
                iov_len: m.len(),
            };
            hdrs[i].msg_hdr.msg_iov = &mut iov[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: each header points at an iovec describing a live, readable
        // slice of `msgs`; the kernel only reads through them.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                hdrs.as_mut_ptr(),
                chunk.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(sent);
            }
            return Err(e);
        }
        sent += n as usize;
        if (n as usize) < chunk.len() {
            break;
        }
    }
    Ok(sent)
}

fn to_socket_addr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in, and
            // sockaddr_storage is large and aligned enough for it.
            #[allow(unsafe_code)]
            let a = unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in) };
            let ip = Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(a.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            #[allow(unsafe_code)]
            let a = unsafe { &*(ss as *const libc::sockaddr_storage as *const libc::sockaddr_in6) };
            let ip = Ipv6Addr::from(a.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn receives_a_batch_with_senders_v4_and_v6() {
        for (bind, from) in [("127.0.0.1:0", "127.0.0.1:0"), ("[::1]:0", "[::1]:0")] {
            let Ok(rx) = std::net::UdpSocket::bind(bind) else {
                continue;
            };
            let tx = std::net::UdpSocket::bind(from).unwrap();
            let mut b = RecvBatch::new();
            assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), 0, "nothing queued");
            for i in 0..40u8 {
                tx.send_to(&vec![i; i as usize + 1], rx.local_addr().unwrap())
                    .unwrap();
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), BATCH);
            for i in 0..BATCH {
                let (src, data) = b.get(i).unwrap();
                assert_eq!(src, tx.local_addr().unwrap());
                assert_eq!(data, &vec![i as u8; i + 1][..]);
            }
            assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), 8);
            let big = vec![9u8; 60000];
            tx.send_to(&big, rx.local_addr().unwrap()).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), 1);
            assert_eq!(b.get(0).unwrap().1.len(), 60000, "no truncation");
            // send_many on a connected socket.
            tx.connect(rx.local_addr().unwrap()).unwrap();
            let msgs: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 3]).collect();
            let refs: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
            assert_eq!(send_many(tx.as_raw_fd(), &refs).unwrap(), 40);
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(b.recv(rx.as_raw_fd()).unwrap(), BATCH);
            assert_eq!(b.get(5).unwrap().1, &[5, 5, 5]);
        }
    }
}
