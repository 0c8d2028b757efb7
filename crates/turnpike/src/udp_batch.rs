//! Batched UDP I/O: [`RecvBatch`] receives with `recvmmsg(2)`, one syscall
//! for up to [`BATCH`] datagrams; [`SendQueue`] collects a loop iteration's
//! outgoing datagrams and sends them with `sendmmsg(2)`, one syscall per
//! socket, merging runs to one destination into UDP GSO super-datagrams
//! (`UDP_SEGMENT`) so the kernel walks its send path once per run. This
//! module holds the data plane's only `unsafe` code.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Datagrams per syscall.
pub const BATCH: usize = 32;
/// Each slot holds the largest UDP payload, so nothing is ever truncated.
/// The buffer is zero-allocated, so pages never written stay unbacked.
const SLOT: usize = 65536;

/// Buffers and headers for one `recvmmsg` call, reused for every call.
///
/// The headers and iovecs are built once, pointing into buffers on the heap
/// that never move, so a call costs no set-up beyond resetting the address
/// lengths the kernel wrote last time: with one datagram per call (many quiet
/// allocations) the set-up would otherwise cost more than the datagram.
pub struct RecvBatch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    lens: [usize; BATCH],
    from: [Option<SocketAddr>; BATCH],
    n: usize,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` point only into `bufs`,
// `addrs` and `iovs`, heap buffers the batch owns and never reallocates;
// they move with it, and nothing else holds them.
#[allow(unsafe_code)]
unsafe impl Send for RecvBatch {}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Allocates the batch (2 MiB of address space, touched lazily).
    #[allow(unsafe_code)]
    pub fn new() -> Self {
        let mut b = RecvBatch {
            bufs: vec![0u8; BATCH * SLOT],
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: vec![unsafe { std::mem::zeroed() }; BATCH],
            iovs: Vec::with_capacity(BATCH),
            hdrs: Vec::with_capacity(BATCH),
            lens: [0; BATCH],
            from: [None; BATCH],
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
            b.hdrs.push(h);
        }
        b
    }

    /// Receives what is queued on `fd`, up to [`BATCH`] datagrams. Returns
    /// how many; 0 when nothing is queued (EAGAIN).
    #[allow(unsafe_code)]
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        // The kernel wrote the sender's length into the headers it filled.
        for h in &mut self.hdrs[..self.n] {
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: every header points at a live iovec and address slot owned
        // by `self` (built in `new`, never moved), sized as declared; the
        // kernel writes at most iov_len bytes and msg_namelen bytes into them.
        let n = unsafe {
            libc::recvmmsg(
                fd,
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

/// Most datagrams a [`SendQueue`] holds before it flushes by itself.
pub const QUEUE_ENTRIES: usize = 512;
// Entry indices ride in 16 bits of the sort key.
const _: () = assert!(QUEUE_ENTRIES <= 1 << 16);
/// Most bytes a [`SendQueue`] holds before it flushes by itself. One more
/// datagram (64 KiB at most) always fits in the reserved capacity.
const QUEUE_BYTES: usize = 256 * 1024;
/// Segments per GSO datagram: the kernel's UDP_MAX_SEGMENTS was 64 before
/// Linux 6.11.
const GSO_MAX_SEGMENTS: usize = 64;
/// Bytes per GSO datagram: the UDP length field must hold the whole run.
const GSO_MAX_BYTES: usize = 65000;
/// Messages per `sendmmsg` call (the kernel's UIO_MAXIOV is 1024).
const MMSG_CHUNK: usize = 64;

#[derive(Clone, Copy)]
struct Entry {
    fd: RawFd,
    to: SocketAddr,
    off: u32,
    len: u32,
}

/// Space for one `cmsghdr` carrying a u16 (CMSG_SPACE(2) is 24 on LP64),
/// aligned as the kernel reads it.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 32]);

/// What a [`SendQueue`] did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// `sendmmsg`/`sendto` calls made.
    pub syscalls: u64,
    /// Datagrams handed to the kernel.
    pub datagrams: u64,
    /// GSO super-datagrams among the messages sent.
    pub gso_messages: u64,
    /// Datagrams dropped: full socket buffer or a send error (UDP has no
    /// delivery promise; the sender retransmits or conceals).
    pub dropped: u64,
}

/// Outgoing datagrams collected during one pass of the event loop and sent
/// with as few syscalls as the kernel allows.
///
/// Each datagram is copied once, into the queue's buffer (the core writes
/// peer-to-client ChannelData straight into it with [`SendQueue::buffer`]).
/// [`SendQueue::flush`] groups the datagrams by socket, keeping each
/// destination's order, and merges consecutive equal-sized datagrams to one
/// destination into a GSO message: one trip down the kernel's UDP/IP path for
/// the whole run, split into datagrams at the device. A kernel or device that
/// refuses GSO (EIO) turns it off for this queue; a segment too large for the
/// path (EINVAL/EMSGSIZE) lowers the largest size merged. Either way the
/// refused datagrams are sent one by one, so nothing is lost to the attempt.
///
/// A socket must not be closed while the queue holds datagrams for it (its
/// descriptor could be reused by the next socket opened): flush first.
pub struct SendQueue {
    buf: Vec<u8>,
    entries: Vec<Entry>,
    /// Sort keys: the descriptor (24 bits), a hash of the destination (24
    /// bits), the entry's index (16 bits). Truncation or a collision only
    /// costs a merge, never order: equal destinations hash equally.
    order: Vec<u64>,
    msgs: Vec<(usize, usize, u16)>,
    iovs: Vec<libc::iovec>,
    names: Vec<(libc::sockaddr_storage, libc::socklen_t)>,
    cmsgs: Vec<CmsgBuf>,
    hdrs: Vec<libc::mmsghdr>,
    gso: bool,
    gso_max_segment: usize,
    stats: SendStats,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` are scratch, rebuilt by
// every flush from data the queue owns and never used after it returns; the
// queue has no shared state, so moving it to another thread is sound.
#[allow(unsafe_code)]
unsafe impl Send for SendQueue {}

impl Default for SendQueue {
    fn default() -> Self {
        Self::new(true)
    }
}

impl SendQueue {
    /// An empty queue; `gso` false never merges datagrams.
    pub fn new(gso: bool) -> Self {
        SendQueue {
            buf: Vec::with_capacity(QUEUE_BYTES + 65536 + 64),
            entries: Vec::with_capacity(QUEUE_ENTRIES),
            order: Vec::with_capacity(QUEUE_ENTRIES),
            msgs: Vec::with_capacity(QUEUE_ENTRIES),
            iovs: Vec::with_capacity(QUEUE_ENTRIES),
            names: Vec::with_capacity(QUEUE_ENTRIES),
            cmsgs: Vec::with_capacity(QUEUE_ENTRIES),
            hdrs: Vec::with_capacity(QUEUE_ENTRIES),
            gso,
            // Ethernet's 1500-byte MTU less the IPv6 and UDP headers: larger
            // segments would need fragments, which GSO refuses.
            gso_max_segment: 1452,
            stats: SendStats::default(),
        }
    }

    /// Whether GSO is still in use (false after the kernel refused it).
    pub fn gso_enabled(&self) -> bool {
        self.gso
    }

    /// Counters since the queue was made.
    pub fn stats(&self) -> SendStats {
        self.stats
    }

    /// Datagrams waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Queues `data` to `to` on socket `fd`, flushing first when full.
    pub fn push(&mut self, fd: RawFd, to: SocketAddr, data: &[u8]) {
        self.make_room();
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        self.commit(fd, to, start);
    }

    /// The buffer to append one datagram to, after room was made: write the
    /// datagram at its end, then [`SendQueue::commit`] it from the length it
    /// had, or [`SendQueue::truncate`] back to that length to drop it.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        self.make_room();
        &mut self.buf
    }

    /// Queues `buffer()[start..]` as one datagram to `to` on `fd`.
    pub fn commit(&mut self, fd: RawFd, to: SocketAddr, start: usize) {
        let len = self.buf.len().saturating_sub(start);
        if start > self.buf.len() || len > u16::MAX as usize {
            self.buf.truncate(start.min(self.buf.len()));
            self.stats.dropped += 1;
            return;
        }
        self.entries.push(Entry {
            fd,
            to,
            off: start as u32,
            len: len as u32,
        });
    }

    /// What was written to the buffer after `start` (never flushes, unlike
    /// [`SendQueue::buffer`], so `start` stays valid).
    pub fn written(&self, start: usize) -> &[u8] {
        self.buf.get(start..).unwrap_or_default()
    }

    /// Drops what was written to the buffer after `start`.
    pub fn truncate(&mut self, start: usize) {
        self.buf.truncate(start);
    }

    fn make_room(&mut self) {
        if self.entries.len() >= QUEUE_ENTRIES || self.buf.len() >= QUEUE_BYTES {
            self.flush();
        }
    }

    /// Sends everything queued.
    pub fn flush(&mut self) {
        if self.entries.is_empty() {
            self.buf.clear();
            return;
        }
        // Group by socket, then destination; the index breaks ties, so every
        // destination's datagrams keep their order (RTP likes it in order).
        // Often already in order (one socket, or one client's batch), and
        // then not sorted at all.
        self.order.clear();
        let mut sorted = true;
        let mut last = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            let key = (e.fd as u32 as u64 & 0xFF_FFFF) << 40 | dest_hash(&e.to) << 16 | i as u64;
            sorted &= key >= last;
            last = key;
            self.order.push(key);
        }
        if !sorted {
            self.order.sort_unstable();
        }
        let mut g = 0;
        while g < self.order.len() {
            let fd = self.entry(g).fd;
            let mut end = g + 1;
            while end < self.order.len() && self.entry(end).fd == fd {
                end += 1;
            }
            self.send_group(fd, g, end);
            g = end;
        }
        self.entries.clear();
        self.buf.clear();
    }

    /// The entry at position `k` of the sorted order.
    fn entry(&self, k: usize) -> Entry {
        self.entries[(self.order[k] & 0xFFFF) as usize]
    }

    /// Plans the messages for `order[g..end]` (all on `fd`): runs to one
    /// destination of equal size (the last may be shorter) become one GSO
    /// message.
    fn plan(&mut self, g: usize, end: usize) {
        self.msgs.clear();
        let mut i = g;
        while i < end {
            let first = self.entry(i);
            let size = first.len as usize;
            let mut count = 1;
            let mut total = size;
            if self.gso && size > 0 && size <= self.gso_max_segment {
                while i + count < end && count < GSO_MAX_SEGMENTS {
                    let e = self.entry(i + count);
                    let len = e.len as usize;
                    if e.to != first.to || len == 0 || len > size || total + len > GSO_MAX_BYTES {
                        break;
                    }
                    count += 1;
                    total += len;
                    if len < size {
                        break; // only the last segment may be shorter
                    }
                }
            }
            self.msgs.push((i, count, size as u16));
            i += count;
        }
    }

    #[allow(unsafe_code)]
    fn send_group(&mut self, fd: RawFd, g: usize, end: usize) {
        self.plan(g, end);
        let n = self.msgs.len();
        self.iovs.clear();
        self.names.clear();
        self.cmsgs.clear();
        self.hdrs.clear();
        for k in g..end {
            let e = self.entry(k);
            self.iovs.push(libc::iovec {
                // SAFETY: off..off+len lies within `buf` (checked at commit).
                iov_base: unsafe { self.buf.as_ptr().add(e.off as usize) } as *mut libc::c_void,
                iov_len: e.len as usize,
            });
        }
        for m in 0..n {
            let (first, count, size) = self.msgs[m];
            let to = self.entry(first).to;
            self.names.push(to_sockaddr(&to));
            let mut c = CmsgBuf([0; 32]);
            if count > 1 {
                // SAFETY: CmsgBuf is 32 bytes, aligned to 8; CMSG_SPACE(2) is
                // 24, so the header and its u16 payload fit.
                unsafe {
                    let h = c.0.as_mut_ptr() as *mut libc::cmsghdr;
                    (*h).cmsg_level = libc::SOL_UDP;
                    (*h).cmsg_type = libc::UDP_SEGMENT;
                    (*h).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(h) as *mut u16, size);
                }
            }
            self.cmsgs.push(c);
        }
        for m in 0..n {
            let (first, count, _) = self.msgs[m];
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut self.names[m].0 as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_hdr.msg_namelen = self.names[m].1;
            h.msg_hdr.msg_iov = &mut self.iovs[first - g];
            h.msg_hdr.msg_iovlen = count as _;
            if count > 1 {
                h.msg_hdr.msg_control = self.cmsgs[m].0.as_mut_ptr() as *mut libc::c_void;
                // SAFETY: pure arithmetic on a constant.
                h.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            }
            self.hdrs.push(h);
        }
        let mut k = 0;
        while k < n {
            let chunk = (n - k).min(MMSG_CHUNK);
            self.stats.syscalls += 1;
            // SAFETY: hdrs[k..k + chunk] point at iovecs, addresses and
            // control buffers owned by `self` and not moved since they were
            // built; the iovecs describe live bytes of `buf`. The kernel only
            // reads them (it writes msg_len).
            let r = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr().add(k), chunk as libc::c_uint, 0) };
            if r > 0 {
                for m in k..k + r as usize {
                    let (_, count, _) = self.msgs[m];
                    self.stats.datagrams += count as u64;
                    if count > 1 {
                        self.stats.gso_messages += 1;
                    }
                }
                k += r as usize;
                continue;
            }
            let err = io::Error::last_os_error();
            let (first, count, _) = self.msgs[k];
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => {
                    // The socket buffer is full: what is left would fail too.
                    self.stats.dropped += self.msgs[k..n].iter().map(|m| m.1 as u64).sum::<u64>();
                    return;
                }
                Some(e @ (libc::EIO | libc::EINVAL | libc::EMSGSIZE)) if count > 1 => {
                    if e == libc::EIO {
                        // No GSO on this path (e.g. no checksum offload).
                        self.gso = false;
                    } else {
                        self.gso_max_segment = (self.msgs[k].2 as usize).saturating_sub(1);
                    }
                    for s in first..first + count {
                        self.send_one(fd, s - g, k);
                    }
                }
                _ => self.stats.dropped += count as u64,
            }
            k += 1;
        }
    }

    /// Sends the datagram behind `iovs[i]`, part of message `m`, alone (the
    /// GSO fallback).
    #[allow(unsafe_code)]
    fn send_one(&mut self, fd: RawFd, i: usize, m: usize) {
        let iov = self.iovs[i];
        let (ss, len) = self.names[m];
        self.stats.syscalls += 1;
        // SAFETY: the iovec describes live bytes of `buf`; `ss` holds a
        // sockaddr of `len` bytes.
        let r = unsafe {
            libc::sendto(
                fd,
                iov.iov_base,
                iov.iov_len,
                0,
                &ss as *const libc::sockaddr_storage as *const libc::sockaddr,
                len,
            )
        };
        if r < 0 {
            self.stats.dropped += 1;
        } else {
            self.stats.datagrams += 1;
        }
    }
}

/// 24 bits that differ, mostly, between destinations.
fn dest_hash(a: &SocketAddr) -> u64 {
    let ip = match a {
        SocketAddr::V4(v4) => u32::from(*v4.ip()) as u64,
        SocketAddr::V6(v6) => {
            let x = u128::from(*v6.ip());
            (x as u64) ^ (x >> 64) as u64
        }
    };
    let h = (ip ^ (a.port() as u64) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h >> 40
}

fn to_sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
    #[allow(unsafe_code)]
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match a {
        SocketAddr::V4(v4) => {
            // SAFETY: sockaddr_storage is large and aligned enough for a
            // sockaddr_in.
            #[allow(unsafe_code)]
            let sin = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = v4.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            };
            (ss, std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t)
        }
        SocketAddr::V6(v6) => {
            // SAFETY: as above, for sockaddr_in6.
            #[allow(unsafe_code)]
            let sin6 = unsafe { &mut *(&mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: v6.ip().octets(),
            };
            sin6.sin6_flowinfo = v6.flowinfo();
            sin6.sin6_scope_id = v6.scope_id();
            (ss, std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t)
        }
    }
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
        }
    }

    /// Datagrams `rx` receives within a second, as (sender, bytes).
    fn drain(rx: &std::net::UdpSocket, want: usize) -> Vec<(SocketAddr, Vec<u8>)> {
        rx.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < want {
            match rx.recv_from(&mut buf) {
                Ok((n, from)) => got.push((from, buf[..n].to_vec())),
                Err(_) => break,
            }
        }
        got
    }

    /// Datagram `seq` of stream `stream`, `len` bytes long.
    fn dgram(stream: u8, seq: u16, len: usize) -> Vec<u8> {
        let mut d = vec![stream; len];
        d[1..3].copy_from_slice(&seq.to_be_bytes());
        d
    }

    #[test]
    fn send_queue_groups_by_socket_merges_runs_and_keeps_order() {
        for gso in [true, false] {
            for ip in ["127.0.0.1:0", "[::1]:0"] {
                let Ok(s1) = std::net::UdpSocket::bind(ip) else {
                    continue;
                };
                let s2 = std::net::UdpSocket::bind(ip).unwrap();
                let ra = std::net::UdpSocket::bind(ip).unwrap();
                let rb = std::net::UdpSocket::bind(ip).unwrap();
                let (a, b) = (ra.local_addr().unwrap(), rb.local_addr().unwrap());
                let mut q = SendQueue::new(gso);
                // Interleaved as a worker produces them: stream 1 (s1 -> a,
                // 100 B, then one 40 B, then 100 B again), stream 2 (s1 -> b),
                // stream 3 (s2 -> a, 200 B) and one datagram too large to merge.
                let mut plan: Vec<(i32, SocketAddr, Vec<u8>)> = Vec::new();
                for seq in 0..20u16 {
                    let len1 = if seq == 12 { 40 } else { 100 };
                    plan.push((s1.as_raw_fd(), a, dgram(1, seq, len1)));
                    if seq % 2 == 0 {
                        plan.push((s1.as_raw_fd(), b, dgram(2, seq / 2, 100)));
                    }
                    if seq % 4 == 0 {
                        plan.push((s2.as_raw_fd(), a, dgram(3, seq / 4, 200)));
                    }
                }
                plan.push((s2.as_raw_fd(), a, dgram(4, 0, 3000)));
                for (fd, to, d) in &plan {
                    q.push(*fd, *to, d);
                }
                assert_eq!(q.len(), plan.len());
                q.flush();
                assert!(q.is_empty());
                let st = q.stats();
                assert_eq!(st.datagrams, plan.len() as u64, "gso={gso} {ip}");
                assert_eq!(st.dropped, 0);
                // One sendmmsg per socket.
                assert_eq!(st.syscalls, 2, "gso={gso} {ip}");
                if gso {
                    // Stream 1 is two runs split by the short datagram
                    // (0..=12, then 13..20), streams 2 and 3 one run each.
                    assert_eq!(st.gso_messages, 4, "gso={gso} {ip}");
                } else {
                    assert_eq!(st.gso_messages, 0);
                }
                let at_a = drain(&ra, 20 + 5 + 1);
                let at_b = drain(&rb, 10);
                assert_eq!(at_a.len(), 26, "gso={gso} {ip}");
                assert_eq!(at_b.len(), 10, "gso={gso} {ip}");
                // Each stream arrives whole, in order, from its own socket.
                for (stream, rx, from, count) in [
                    (1u8, &at_a, s1.local_addr().unwrap(), 20u16),
                    (2, &at_b, s1.local_addr().unwrap(), 10),
                    (3, &at_a, s2.local_addr().unwrap(), 5),
                    (4, &at_a, s2.local_addr().unwrap(), 1),
                ] {
                    let mine: Vec<&(SocketAddr, Vec<u8>)> =
                        rx.iter().filter(|(_, d)| d[0] == stream).collect();
                    assert_eq!(mine.len(), count as usize, "stream {stream}");
                    for (seq, (src, d)) in mine.iter().enumerate() {
                        assert_eq!(*src, from, "stream {stream}");
                        let want = plan
                            .iter()
                            .find(|(_, _, p)| p[0] == stream && p[1..3] == (seq as u16).to_be_bytes())
                            .unwrap();
                        assert_eq!(d, &want.2, "stream {stream} seq {seq}");
                    }
                }
            }
        }
    }

    #[test]
    fn send_queue_flushes_itself_when_full() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = socket2::Socket::from(std::net::UdpSocket::bind("127.0.0.1:0").unwrap());
        let _ = rx.set_recv_buffer_size(4 << 20);
        // Linux reports twice what it was given, capped by net.core.rmem_max.
        let roomy = rx.recv_buffer_size().unwrap() >= 2 << 20;
        let rx = std::net::UdpSocket::from(rx);
        let mut q = SendQueue::new(true);
        for seq in 0..(QUEUE_ENTRIES + 10) as u16 {
            q.push(tx.as_raw_fd(), rx.local_addr().unwrap(), &dgram(1, seq, 50));
        }
        assert_eq!(
            q.len(),
            10,
            "the first {QUEUE_ENTRIES} left when the queue filled"
        );
        q.flush();
        assert_eq!(q.stats().datagrams, (QUEUE_ENTRIES + 10) as u64);
        let got = drain(&rx, QUEUE_ENTRIES + 10);
        if roomy {
            assert_eq!(got.len(), QUEUE_ENTRIES + 10);
        } else {
            // A small rmem_max overflows the receiver; what came is checked.
            assert!(got.len() >= 100, "{}", got.len());
        }
        for (seq, (_, d)) in got.iter().enumerate() {
            assert_eq!(d[1..3], (seq as u16).to_be_bytes(), "in order");
        }
    }

    #[test]
    fn send_queue_falls_back_when_the_kernel_refuses_gso() {
        // The kernel refuses UDP_SEGMENT (EINVAL) on a socket without UDP
        // checksums (SO_NO_CHECK): every datagram must still go, one by one.
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let one: libc::c_int = 1;
        // SAFETY: a valid socket and a c_int option value of the right size.
        #[allow(unsafe_code)]
        let r = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_NO_CHECK,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        let mut q = SendQueue::new(true);
        for seq in 0..8u16 {
            q.push(tx.as_raw_fd(), rx.local_addr().unwrap(), &dgram(1, seq, 100));
        }
        q.flush();
        let st = q.stats();
        assert_eq!(st.gso_messages, 0);
        assert_eq!(st.datagrams, 8);
        assert_eq!(st.dropped, 0);
        // One refused sendmmsg, then eight sendto.
        assert_eq!(st.syscalls, 9);
        let got = drain(&rx, 8);
        assert_eq!(got.len(), 8);
        for (seq, (_, d)) in got.iter().enumerate() {
            assert_eq!(d, &dgram(1, seq as u16, 100));
        }
        // The largest merged size went below 100, so the next flush does not
        // try again.
        for seq in 0..8u16 {
            q.push(tx.as_raw_fd(), rx.local_addr().unwrap(), &dgram(1, seq, 100));
        }
        q.flush();
        assert_eq!(q.stats().syscalls, 10);
        assert_eq!(drain(&rx, 8).len(), 8);
    }

    #[test]
    fn written_bytes_survive_a_full_queue() {
        // A TCP client's datagram is written into the queue's buffer, then
        // read back with `written`: that must not flush (which would clear
        // the buffer and move `start`), even past the byte limit.
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = tx.local_addr().unwrap();
        let mut q = SendQueue::new(true);
        for seq in 0..4u16 {
            q.push(tx.as_raw_fd(), to, &dgram(1, seq, 60000));
        }
        let out = q.buffer();
        let start = out.len();
        out.extend_from_slice(&[7u8; 65000]);
        assert!(start + 65000 > QUEUE_BYTES, "the buffer is past its limit");
        assert_eq!(q.written(start), &[7u8; 65000][..]);
        assert_eq!(q.len(), 4, "nothing flushed");
        q.truncate(start);
        assert_eq!(q.written(start), &[] as &[u8]);
        assert_eq!(q.written(usize::MAX), &[] as &[u8]);
    }
}
