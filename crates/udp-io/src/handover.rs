//! Passing open sockets to another process over a Unix stream socket
//! (`SCM_RIGHTS`): how a binary upgrade hands its listening and relay
//! sockets to the new process, which then receives on the very same
//! sockets (their queues, bindings and SO_REUSEPORT groups unchanged).
//!
//! Each message carries a length-prefixed payload (what the fds are, as the
//! caller encodes it) and up to [`MAX_FDS`] descriptors. A reader takes
//! ownership of what it receives: fds arrive as [`OwnedFd`]s, closed on
//! drop, and with close-on-exec set (`MSG_CMSG_CLOEXEC`).

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

/// The most descriptors one message carries (the kernel's `SCM_MAX_FD`
/// is 253).
pub const MAX_FDS: usize = 250;

/// The largest payload one message carries.
pub const MAX_PAYLOAD: usize = 64 * 1024 * 1024;

/// Sends `payload` and `fds` as one message. The fds stay open here: the
/// receiver gets its own descriptors for the same open sockets.
pub fn send_with_fds(stream: &UnixStream, payload: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    if fds.len() > MAX_FDS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} descriptors in one message (at most {MAX_FDS})", fds.len()),
        ));
    }
    if payload.len() > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "payload too large"));
    }
    // The header (payload length, fd count) travels with the fds, so the
    // reader knows how many to expect before it reads the payload.
    let mut header = [0u8; 8];
    header[..4].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    header[4..].copy_from_slice(&(fds.len() as u32).to_be_bytes());
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    let mut control = vec![0u64; control_words(raw.len())];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: header.len(),
    };
    // SAFETY: msghdr is plain old data.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    if !raw.is_empty() {
        h.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        // SAFETY: CMSG_SPACE is a pure size computation.
        h.msg_controllen = unsafe { libc::CMSG_SPACE((raw.len() * size_of::<RawFd>()) as u32) } as _;
        // SAFETY: msg_control points at `control`, which is at least
        // CMSG_SPACE(n fds) bytes (control_words) and aligned for cmsghdr
        // (u64); CMSG_FIRSTHDR is therefore non-null and in bounds, and
        // CMSG_DATA has room for the fds.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&h);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN((raw.len() * size_of::<RawFd>()) as u32) as _;
            std::ptr::copy_nonoverlapping(raw.as_ptr(), libc::CMSG_DATA(c) as *mut RawFd, raw.len());
        }
    }
    // SAFETY: `h` points at buffers that live across the call.
    let n = unsafe { libc::sendmsg(stream.as_raw_fd(), &h, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut rest = &header[n as usize..];
    let mut w = stream;
    // Whatever of the header the first call did not take, then the payload.
    w.write_all(rest)?;
    rest = payload;
    w.write_all(rest)
}

/// Receives one message sent with [`send_with_fds`]: its payload and the
/// descriptors, now owned here. `Ok(None)` when the peer closed the stream
/// before a message began.
pub fn recv_with_fds(stream: &UnixStream) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut header = [0u8; 8];
    let mut control = vec![0u64; control_words(MAX_FDS)];
    let mut iov = libc::iovec {
        iov_base: header.as_mut_ptr() as *mut libc::c_void,
        iov_len: header.len(),
    };
    // SAFETY: msghdr is plain old data.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    h.msg_controllen = (control.len() * size_of::<u64>()) as _;
    let n = loop {
        // SAFETY: `h` points at buffers that live across the call.
        let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut h, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    // Take ownership of every descriptor that arrived before anything can
    // fail, so none leaks.
    let mut fds = Vec::new();
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed
    // cmsgs into `control`; CMSG_FIRSTHDR/NXTHDR stay within them, and
    // each SCM_RIGHTS cmsg's data holds (cmsg_len - CMSG_LEN(0)) / 4 fds
    // that are ours now.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let bytes = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..bytes / size_of::<RawFd>() {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&h, c);
        }
    }
    if h.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "descriptors were cut off",
        ));
    }
    if n == 0 {
        return Ok(None);
    }
    let mut r = stream;
    r.read_exact(&mut header[n..])?;
    let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
    let count = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if count != fds.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} descriptors announced, {} arrived", count, fds.len()),
        ));
    }
    if len > MAX_PAYLOAD {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "payload too large"));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    Ok(Some((payload, fds)))
}

/// Lets a child process inherit `stream` (clears close-on-exec); returns
/// the descriptor number the child will find it under.
pub fn inheritable(stream: &UnixStream) -> io::Result<RawFd> {
    let fd = stream.as_raw_fd();
    // SAFETY: fcntl on a descriptor `stream` owns and keeps open.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// The Unix stream a parent passed as descriptor `fd` (see
/// [`inheritable`]), owned from here on and made close-on-exec again.
/// Refused unless `fd` is an open Unix stream socket, so a stray number in
/// the environment cannot take over another descriptor.
pub fn inherited(fd: RawFd) -> io::Result<UnixStream> {
    if fd < 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a hand-over descriptor",
        ));
    }
    // SAFETY: stat and getsockopt only read the descriptor's state, and
    // fail cleanly on one that is not open.
    let (is_socket, sock_type) = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd, &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ty: libc::c_int = 0;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        let r = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TYPE,
            &mut ty as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        );
        (st.st_mode & libc::S_IFMT == libc::S_IFSOCK && r == 0, ty)
    };
    if !is_socket || sock_type != libc::SOCK_STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a Unix stream socket",
        ));
    }
    // SAFETY: the descriptor is open, a stream socket, and was passed to
    // this process to own (nothing else here refers to it).
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: fcntl on the descriptor `stream` now owns.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(stream)
}

/// u64 words of control space for `n` descriptors.
fn control_words(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure size computation.
    let bytes = unsafe { libc::CMSG_SPACE((n.max(1) * size_of::<RawFd>()) as u32) } as usize;
    bytes.div_ceil(size_of::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsFd;

    #[test]
    fn a_passed_socket_is_the_same_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        let other = UdpSocket::bind("127.0.0.1:0").unwrap();
        // A datagram queued before the hand-over is read after it.
        other.send_to(b"queued", addr).unwrap();
        send_with_fds(&a, b"one udp socket", &[sock.as_fd(), other.as_fd()]).unwrap();
        drop(sock);
        let (payload, fds) = recv_with_fds(&b).unwrap().unwrap();
        assert_eq!(payload, b"one udp socket");
        assert_eq!(fds.len(), 2);
        let mut fds = fds.into_iter();
        let got = UdpSocket::from(fds.next().unwrap());
        assert_eq!(got.local_addr().unwrap(), addr);
        got.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = got.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"queued");
        other.send_to(b"after", addr).unwrap();
        let (n, _) = got.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"after");
        // Close-on-exec is set on what arrived.
        // SAFETY: fcntl(F_GETFD) on a descriptor we own.
        let flags = unsafe { libc::fcntl(got.as_raw_fd(), libc::F_GETFD) };
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn messages_without_descriptors_and_a_closed_peer() {
        let (a, b) = UnixStream::pair().unwrap();
        let big = vec![7u8; 300_000];
        let t = std::thread::spawn(move || {
            send_with_fds(&a, &big, &[]).unwrap();
            send_with_fds(&a, b"", &[]).unwrap();
        });
        let (p, fds) = recv_with_fds(&b).unwrap().unwrap();
        assert_eq!((p.len(), fds.len()), (300_000, 0));
        let (p, _) = recv_with_fds(&b).unwrap().unwrap();
        assert!(p.is_empty());
        t.join().unwrap();
        assert!(recv_with_fds(&b).unwrap().is_none(), "closed");
    }

    #[test]
    fn too_many_descriptors_are_refused_before_sending() {
        let (a, _b) = UnixStream::pair().unwrap();
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        let many: Vec<BorrowedFd<'_>> = (0..MAX_FDS + 1).map(|_| s.as_fd()).collect();
        let e = send_with_fds(&a, b"x", &many).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
