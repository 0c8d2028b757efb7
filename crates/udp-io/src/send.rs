//! `sendmmsg(2)` of a loop iteration's datagrams, each from the source
//! address it names, with GSO runs.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};

use crate::addr::to_sockaddr;

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
    src: Option<IpAddr>,
    to: SocketAddr,
    off: u32,
    len: u32,
}

/// Control space for one message: a `UDP_SEGMENT` (CMSG_SPACE(2) = 24) and
/// an `IP_PKTINFO` or `IPV6_PKTINFO` (CMSG_SPACE(20) = 40), aligned as the
/// kernel reads it.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// What a [`SendQueue`] did, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    /// `sendmmsg`/`sendmsg` calls made.
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
/// Each names its source IP when the socket is bound to a wildcard address
/// (sent with pktinfo, so an answer leaves from the address the client
/// reached). [`SendQueue::flush`] groups the datagrams by socket, keeping
/// each destination's order, and merges consecutive equal-sized datagrams
/// from one source to one destination into a GSO message: one trip down the
/// kernel's UDP/IP path for the whole run, split into datagrams at the
/// device. A kernel or device that refuses GSO (EIO) turns it off for this
/// queue; a segment too large for the path (EINVAL/EMSGSIZE) lowers the
/// largest size merged. Either way the refused datagrams are sent one by
/// one, so nothing is lost to the attempt.
///
/// A socket must not be closed while the queue holds datagrams for it (its
/// descriptor could be reused by the next socket opened): close it with
/// [`SendQueue::close`].
pub struct SendQueue {
    buf: Vec<u8>,
    entries: Vec<Entry>,
    /// Sort keys: the descriptor (24 bits), a hash of the source and
    /// destination (24 bits), the entry's index (16 bits). Truncation or a
    /// collision only costs a merge, never order: equal pairs hash equally.
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

    /// Queues `data` to `to` on `sock`, from `src` when given (a socket
    /// bound to a wildcard address), flushing first when full.
    pub fn push(&mut self, sock: impl AsFd, src: Option<IpAddr>, to: SocketAddr, data: &[u8]) {
        self.make_room();
        let start = self.buf.len();
        self.buf.extend_from_slice(data);
        self.commit(sock, src, to, start);
    }

    /// The buffer to append one datagram to, after room was made: write the
    /// datagram at its end, then [`SendQueue::commit`] it from the length it
    /// had, or [`SendQueue::truncate`] back to that length to drop it.
    pub fn buffer(&mut self) -> &mut Vec<u8> {
        self.make_room();
        &mut self.buf
    }

    /// Queues `buffer()[start..]` as one datagram to `to` on `sock`.
    pub fn commit(&mut self, sock: impl AsFd, src: Option<IpAddr>, to: SocketAddr, start: usize) {
        let len = self.buf.len().saturating_sub(start);
        if start > self.buf.len() || len > u16::MAX as usize {
            self.buf.truncate(start.min(self.buf.len()));
            self.stats.dropped += 1;
            return;
        }
        self.entries.push(Entry {
            fd: sock.as_fd().as_raw_fd(),
            src,
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

    /// Closes `sock`, first sending what is queued for it: its descriptor
    /// number could be reused by the next socket opened, and a queued
    /// datagram must never leave from another allocation's socket.
    pub fn close<S: AsFd>(&mut self, sock: S) {
        let fd = sock.as_fd().as_raw_fd();
        if self.entries.iter().any(|e| e.fd == fd) {
            self.flush();
        }
        drop(sock);
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
        // Group by socket, then source and destination; the index breaks
        // ties, so every destination's datagrams keep their order (RTP likes
        // it in order). Often already in order (one socket, or one client's
        // batch), and then not sorted at all.
        self.order.clear();
        let mut sorted = true;
        let mut last = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            let key = (e.fd as u32 as u64 & 0xFF_FFFF) << 40 | pair_hash(e.src, &e.to) << 16 | i as u64;
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

    /// Plans the messages for `order[g..end]` (all on one socket): runs from
    /// one source to one destination of equal size (the last may be
    /// shorter) become one GSO message.
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
                    if e.to != first.to
                        || e.src != first.src
                        || len == 0
                        || len > size
                        || total + len > GSO_MAX_BYTES
                    {
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
            let e = self.entry(first);
            self.names.push(to_sockaddr(&e.to));
            let mut c = CmsgBuf([0; 64]);
            write_control(&mut c, (count > 1).then_some(size), e.src);
            self.cmsgs.push(c);
        }
        for m in 0..n {
            let (first, count, size) = self.msgs[m];
            let src = self.entry(first).src;
            // SAFETY: mmsghdr is plain old data; all-zero is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut self.names[m].0 as *mut libc::sockaddr_storage as *mut libc::c_void;
            h.msg_hdr.msg_namelen = self.names[m].1;
            h.msg_hdr.msg_iov = &mut self.iovs[first - g];
            h.msg_hdr.msg_iovlen = count as _;
            let control = control_space((count > 1).then_some(size), src);
            if control > 0 {
                h.msg_hdr.msg_control = self.cmsgs[m].0.as_mut_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_controllen = control as _;
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
                        self.send_one(fd, s - g, k, self.entry(first).src);
                    }
                }
                _ => self.stats.dropped += count as u64,
            }
            k += 1;
        }
    }

    /// Sends the datagram behind `iovs[i]`, part of message `m`, alone (the
    /// GSO fallback), from `src` when given.
    fn send_one(&mut self, fd: RawFd, i: usize, m: usize, src: Option<IpAddr>) {
        let mut iov = self.iovs[i];
        let (mut ss, len) = self.names[m];
        let mut c = CmsgBuf([0; 64]);
        let control = write_control(&mut c, None, src);
        // SAFETY: msghdr is plain old data; all-zero is valid.
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_name = &mut ss as *mut libc::sockaddr_storage as *mut libc::c_void;
        h.msg_namelen = len;
        h.msg_iov = &mut iov;
        h.msg_iovlen = 1;
        if control > 0 {
            h.msg_control = c.0.as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = control as _;
        }
        self.stats.syscalls += 1;
        // SAFETY: the header points at locals that outlive the call: an
        // iovec over live bytes of `buf`, a sockaddr of `len` bytes and a
        // control buffer of `control` bytes.
        let r = unsafe { libc::sendmsg(fd, &h, 0) };
        if r < 0 {
            self.stats.dropped += 1;
        } else {
            self.stats.datagrams += 1;
        }
    }
}

/// Bytes of control data for a message with these options.
fn control_space(segment: Option<u16>, src: Option<IpAddr>) -> usize {
    // SAFETY: pure arithmetic on constants.
    unsafe {
        let seg = if segment.is_some() {
            libc::CMSG_SPACE(2) as usize
        } else {
            0
        };
        let info = match src {
            None => 0,
            Some(IpAddr::V4(_)) => libc::CMSG_SPACE(std::mem::size_of::<libc::in_pktinfo>() as u32) as usize,
            Some(IpAddr::V6(_)) => libc::CMSG_SPACE(std::mem::size_of::<libc::in6_pktinfo>() as u32) as usize,
        };
        seg + info
    }
}

/// Writes the `UDP_SEGMENT` and pktinfo control messages into `c`; returns
/// the control length to declare (0: none).
fn write_control(c: &mut CmsgBuf, segment: Option<u16>, src: Option<IpAddr>) -> usize {
    let total = control_space(segment, src);
    if total == 0 {
        return 0;
    }
    // A header to walk the buffer with the kernel's own macros.
    // SAFETY: msghdr is plain old data; all-zero is valid.
    let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
    h.msg_control = c.0.as_mut_ptr() as *mut libc::c_void;
    h.msg_controllen = total as _;
    // SAFETY: CmsgBuf is 64 bytes, aligned to 8, and `total` (at most
    // 24 + 40) fits; CMSG_FIRSTHDR/NXTHDR stay within `total`, and each
    // payload is written inside the space its CMSG_SPACE reserved.
    unsafe {
        let mut cur = libc::CMSG_FIRSTHDR(&h);
        if let Some(size) = segment {
            (*cur).cmsg_level = libc::SOL_UDP;
            (*cur).cmsg_type = libc::UDP_SEGMENT;
            (*cur).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cur) as *mut u16, size);
            cur = libc::CMSG_NXTHDR(&h, cur);
        }
        match src {
            None => {}
            Some(IpAddr::V4(ip)) => {
                (*cur).cmsg_level = libc::IPPROTO_IP;
                (*cur).cmsg_type = libc::IP_PKTINFO;
                (*cur).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in_pktinfo>() as u32) as _;
                let info = libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cur) as *mut libc::in_pktinfo, info);
            }
            Some(IpAddr::V6(ip)) => {
                (*cur).cmsg_level = libc::IPPROTO_IPV6;
                (*cur).cmsg_type = libc::IPV6_PKTINFO;
                (*cur).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::in6_pktinfo>() as u32) as _;
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr { s6_addr: ip.octets() },
                    ipi6_ifindex: 0,
                };
                std::ptr::write_unaligned(libc::CMSG_DATA(cur) as *mut libc::in6_pktinfo, info);
            }
        }
    }
    total
}

/// 24 bits that differ, mostly, between (source, destination) pairs.
fn pair_hash(src: Option<IpAddr>, a: &SocketAddr) -> u64 {
    fn ip_bits(ip: IpAddr) -> u64 {
        match ip {
            IpAddr::V4(v4) => u32::from(v4) as u64,
            IpAddr::V6(v6) => {
                let x = u128::from(v6);
                (x as u64) ^ (x >> 64) as u64
            }
        }
    }
    let s = src.map(ip_bits).unwrap_or(0).rotate_left(17);
    let h = (ip_bits(a.ip()) ^ s ^ (a.port() as u64) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    h >> 40
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

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
                let mut plan: Vec<(&std::net::UdpSocket, SocketAddr, Vec<u8>)> = Vec::new();
                for seq in 0..20u16 {
                    let len1 = if seq == 12 { 40 } else { 100 };
                    plan.push((&s1, a, dgram(1, seq, len1)));
                    if seq % 2 == 0 {
                        plan.push((&s1, b, dgram(2, seq / 2, 100)));
                    }
                    if seq % 4 == 0 {
                        plan.push((&s2, a, dgram(3, seq / 4, 200)));
                    }
                }
                plan.push((&s2, a, dgram(4, 0, 3000)));
                for (fd, to, d) in &plan {
                    q.push(*fd, None, *to, d);
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
            q.push(&tx, None, rx.local_addr().unwrap(), &dgram(1, seq, 50));
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
            q.push(&tx, None, rx.local_addr().unwrap(), &dgram(1, seq, 100));
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
            q.push(&tx, None, rx.local_addr().unwrap(), &dgram(1, seq, 100));
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
            q.push(&tx, None, to, &dgram(1, seq, 60000));
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

#[cfg(test)]
mod pktinfo_tests {
    use super::*;

    #[test]
    fn a_wildcard_socket_sends_from_the_source_each_datagram_names() {
        // 127.0.0.2 is this host's too (lo holds 127/8).
        let tx = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        let port = tx.local_addr().unwrap().port();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        for gso in [true, false] {
            let mut q = SendQueue::new(gso);
            for (i, src) in ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.2"]
                .iter()
                .enumerate()
            {
                q.push(
                    &tx,
                    Some(src.parse().unwrap()),
                    rx.local_addr().unwrap(),
                    &[i as u8; 100],
                );
            }
            q.flush();
            assert_eq!(q.stats().dropped, 0);
            assert_eq!(q.stats().syscalls, 1, "one sendmmsg for the socket");
            let mut buf = [0u8; 2048];
            let mut got = Vec::new();
            for _ in 0..4 {
                let (n, from) = rx.recv_from(&mut buf).unwrap();
                assert_eq!(n, 100);
                got.push((buf[0], from));
            }
            got.sort();
            let want: Vec<(u8, SocketAddr)> = [
                (0, "127.0.0.2"),
                (1, "127.0.0.3"),
                (2, "127.0.0.2"),
                (3, "127.0.0.2"),
            ]
            .iter()
            .map(|(i, ip)| (*i, SocketAddr::new(ip.parse().unwrap(), port)))
            .collect();
            assert_eq!(got, want, "gso={gso}");
            if gso {
                assert_eq!(q.stats().gso_messages, 1, "the two from .2 in a row merge");
            }
        }
    }

    #[test]
    fn close_sends_what_was_queued_first() {
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_millis(500)))
            .unwrap();
        let mut q = SendQueue::new(true);
        q.push(&tx, None, rx.local_addr().unwrap(), b"last words");
        q.close(tx);
        assert!(q.is_empty());
        let mut buf = [0u8; 64];
        let (n, _) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"last words");
    }
}
