//! ICMP errors from a socket's error queue (`MSG_ERRQUEUE`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use crate::addr::to_socket_addr;

/// `struct sock_extended_err` (linux/errqueue.h).
#[repr(C)]
#[derive(Clone, Copy)]
struct SockExtendedErr {
    ee_errno: u32,
    ee_origin: u8,
    ee_type: u8,
    ee_code: u8,
    ee_pad: u8,
    ee_info: u32,
    ee_data: u32,
}

const SO_EE_ORIGIN_ICMP: u8 = 2;
const SO_EE_ORIGIN_ICMP6: u8 = 3;

/// One ICMP error the kernel matched to a datagram the socket sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpError {
    /// Where the datagram that caused it was going.
    pub dest: SocketAddr,
    /// ICMPv6 rather than ICMP.
    pub ipv6: bool,
    /// The ICMP type (e.g. 3 destination unreachable; ICMPv6 1).
    pub icmp_type: u8,
    /// The ICMP code.
    pub icmp_code: u8,
    /// Type-specific data: the next-hop MTU for "fragmentation needed"
    /// and "packet too big".
    pub info: u32,
}

/// Buffers for reading a socket's error queue.
pub struct ErrorQueue {
    control: [u64; 32],
    payload: [u8; 64],
}

impl Default for ErrorQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl ErrorQueue {
    /// Empty buffers.
    pub fn new() -> Self {
        ErrorQueue {
            control: [0; 32],
            payload: [0; 64],
        }
    }

    /// The next queued ICMP error of `sock`; `Ok(None)` when the queue is
    /// empty. Errors of other origins (local) are read and skipped.
    pub fn recv(&mut self, sock: impl AsFd) -> io::Result<Option<IcmpError>> {
        loop {
            // SAFETY: sockaddr_storage and msghdr are plain old data.
            let mut name: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: self.payload.as_mut_ptr() as *mut libc::c_void,
                iov_len: self.payload.len(),
            };
            // SAFETY: as above.
            let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
            h.msg_name = &mut name as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iov;
            h.msg_iovlen = 1;
            h.msg_control = self.control.as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = std::mem::size_of_val(&self.control) as _;
            // SAFETY: the header points at buffers that live across the call,
            // sized as declared; the kernel writes within them.
            let r = unsafe {
                libc::recvmsg(
                    sock.as_fd().as_raw_fd(),
                    &mut h,
                    libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                return if e.kind() == io::ErrorKind::WouldBlock {
                    Ok(None)
                } else {
                    Err(e)
                };
            }
            let Some(dest) = to_socket_addr(&name) else {
                continue;
            };
            let mut found = None;
            // SAFETY: the control pointer and length describe what the kernel
            // filled; the CMSG macros stay inside it, and the extended error
            // is read unaligned from within its message.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&h);
                while !c.is_null() {
                    let (level, ty) = ((*c).cmsg_level, (*c).cmsg_type);
                    if (level == libc::IPPROTO_IP && ty == libc::IP_RECVERR)
                        || (level == libc::IPPROTO_IPV6 && ty == libc::IPV6_RECVERR)
                    {
                        let ee: SockExtendedErr = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const _);
                        if ee.ee_origin == SO_EE_ORIGIN_ICMP || ee.ee_origin == SO_EE_ORIGIN_ICMP6 {
                            found = Some(IcmpError {
                                dest,
                                ipv6: ee.ee_origin == SO_EE_ORIGIN_ICMP6,
                                icmp_type: ee.ee_type,
                                icmp_code: ee.ee_code,
                                info: ee.ee_info,
                            });
                        }
                    }
                    c = libc::CMSG_NXTHDR(&h, c);
                }
            }
            if found.is_some() {
                return Ok(found);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_unreachable_is_read_from_the_error_queue() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = closed.local_addr().unwrap();
        drop(closed);
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        crate::set_recv_errors(&s, false).unwrap();
        let mut q = ErrorQueue::new();
        assert_eq!(q.recv(&s).unwrap(), None, "nothing queued yet");
        s.send_to(b"hello", dest).unwrap();
        let mut got = None;
        for _ in 0..50 {
            if let Some(e) = q.recv(&s).unwrap() {
                got = Some(e);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let e = got.expect("an ICMP port unreachable on loopback");
        assert_eq!(e.dest, dest);
        assert_eq!((e.icmp_type, e.icmp_code), (3, 3), "{e:?}");
        assert!(!e.ipv6);
    }
}
