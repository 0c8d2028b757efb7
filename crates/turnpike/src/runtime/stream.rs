//! TCP and TLS client connections: bounded read and write buffers, rustls
//! driven sans-IO in the worker's loop (RFC 8489 §6.2.2 framing is the
//! core's `stream_frame_len`).

use std::io::{self, Read, Write};
use std::time::Instant;

use mio::net::TcpStream;
use tracing::debug;
use turn_core::FiveTuple;

use super::raw_buf::{RawBuf, Stop, RAW_BUFFER};

/// Bytes queued for one TCP/TLS client before further messages to it are
/// dropped (media is real-time: late is as bad as lost).
pub(super) const MAX_WRITE_BUFFER: usize = 256 * 1024;
/// Largest buffered input: one frame (≤ 65,555 bytes) plus one read.
pub(super) const MAX_READ_BUFFER: usize = 192 * 1024;

pub(super) struct Conn {
    pub(super) stream: TcpStream,
    pub(super) tuple: FiveTuple,
    pub(super) tls: Option<rustls::ServerConnection>,
    pub(super) rbuf: Vec<u8>,
    pub(super) wbuf: Vec<u8>,
    pub(super) writable_registered: bool,
    pub(super) accepted: Instant,
    pub(super) last_rx: Instant,
    /// Since when `rbuf` has held the start of an unfinished message.
    pub(super) partial_since: Option<Instant>,
    /// Whether a whole message has arrived (until then it is "pending").
    pub(super) got_message: bool,
    /// TLS: whether the handshake completed (counted once).
    pub(super) handshake_done: bool,
    /// RFC 6062: a client data connection bound to the peer connection
    /// of this pair carries raw bytes, not STUN (`pairs.rs`).
    pub(super) pair: Option<turn_core::ConnectionId>,
    /// Raw over plain TCP: bytes from the peer for the client, written
    /// after `wbuf` (which may hold the ConnectionBind answer).
    pub(super) raw_out: Option<RawBuf>,
    /// The PROXY protocol header's part in this connection.
    pub(super) proxy: Proxy,
    /// Whether the per-source connection count holds this connection
    /// (under `tuple.client`'s IP).
    pub(super) counted: bool,
}

/// Where a connection stands with the PROXY protocol.
pub(super) enum Proxy {
    /// From a trusted balancer: the header comes first, in the clear
    /// (before any TLS); the bytes so far.
    Awaiting(Vec<u8>),
    /// From anyone else: its first bytes must not be a header.
    Unchecked,
    /// Nothing more to do.
    Settled,
}

pub(super) enum ReadStep {
    Progress,
    WouldBlock,
    Closed,
    /// A PROXY header from an address not trusted to send one.
    UntrustedProxy,
}

impl Conn {
    /// Reads what is available (one chunk) into `rbuf`, decrypting if TLS.
    pub(super) fn fill(&mut self, tmp: &mut [u8]) -> ReadStep {
        if self.rbuf.len() > MAX_READ_BUFFER {
            return ReadStep::Closed;
        }
        match &mut self.proxy {
            Proxy::Awaiting(head) => {
                // Raw bytes until the header is whole (the worker parses).
                return match self.stream.read(tmp) {
                    Ok(0) => ReadStep::Closed,
                    Ok(_) if head.len() > MAX_READ_BUFFER => ReadStep::Closed,
                    Ok(n) => {
                        head.extend_from_slice(&tmp[..n]);
                        ReadStep::Progress
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadStep::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadStep::Progress,
                    Err(_) => ReadStep::Closed,
                };
            }
            Proxy::Unchecked => {
                let mut first = [0u8; 12];
                match self.stream.peek(&mut first) {
                    Ok(n) if n > 0 => {
                        if turn_core::proxy::looks_like_header(&first[..n]) {
                            return ReadStep::UntrustedProxy;
                        }
                        self.proxy = Proxy::Settled;
                    }
                    Ok(_) => return ReadStep::Closed,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStep::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return ReadStep::Progress,
                    Err(_) => return ReadStep::Closed,
                }
            }
            Proxy::Settled => {}
        }
        match &mut self.tls {
            None => match self.stream.read(tmp) {
                Ok(0) => ReadStep::Closed,
                Ok(n) => {
                    self.rbuf.extend_from_slice(&tmp[..n]);
                    ReadStep::Progress
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => ReadStep::WouldBlock,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => ReadStep::Progress,
                Err(_) => ReadStep::Closed,
            },
            Some(tls) => {
                match tls.read_tls(&mut self.stream) {
                    Ok(0) => return ReadStep::Closed,
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStep::WouldBlock,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => return ReadStep::Progress,
                    Err(_) => return ReadStep::Closed,
                }
                if let Err(e) = tls.process_new_packets() {
                    debug!(error = %e, "TLS error; closing the connection");
                    // Send the alert rustls queued, then close.
                    let _ = tls.write_tls(&mut self.wbuf);
                    let _ = self.stream.write(&self.wbuf);
                    return ReadStep::Closed;
                }
                loop {
                    match tls.reader().read(tmp) {
                        Ok(0) => return ReadStep::Closed,
                        Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStep::Progress,
                        Err(_) => return ReadStep::Closed,
                    }
                }
            }
        }
    }

    /// The balancer's header is parsed and `rest` came after it: it is
    /// the client's, read as if it had just arrived (through TLS first
    /// on a TLS listener). `false` if TLS refused it.
    pub(super) fn after_proxy_header(&mut self, rest: &[u8], tmp: &mut [u8]) -> bool {
        self.proxy = Proxy::Settled;
        let Some(tls) = &mut self.tls else {
            self.rbuf.extend_from_slice(rest);
            return true;
        };
        let mut input = rest;
        while !input.is_empty() {
            if tls.read_tls(&mut input).is_err() || tls.process_new_packets().is_err() {
                return false;
            }
            loop {
                match tls.reader().read(tmp) {
                    Ok(0) => return false,
                    Ok(n) => self.rbuf.extend_from_slice(&tmp[..n]),
                    Err(_) => break,
                }
            }
        }
        true
    }

    /// Queues one whole message. A message that does not fit in the write
    /// buffer is dropped whole, never cut, so framing survives.
    pub(super) fn send(&mut self, data: &[u8]) -> io::Result<()> {
        if self.wbuf.len() + data.len() + 64 > MAX_WRITE_BUFFER {
            return Ok(());
        }
        // Queued only: the worker flushes every connection it wrote to once
        // per loop iteration, so a burst of relayed messages to one client
        // costs one write(2), not one each.
        match &mut self.tls {
            None => self.wbuf.extend_from_slice(data),
            Some(tls) => {
                if tls.is_handshaking() {
                    // Nothing is sent to a client before its first request, so
                    // this is not reached; drop rather than buffer unboundedly.
                    return Ok(());
                }
                tls.writer().write_all(data)?;
            }
        }
        Ok(())
    }

    /// Raw relaying, peer → client: reads `src` into this connection's
    /// output (encrypting if TLS) until `src` would block, ends, or the
    /// output is full; then writes. Returns the bytes and why it stopped.
    pub(super) fn relay_in(&mut self, src: &mut impl Read, max: usize) -> io::Result<(usize, Stop)> {
        let r = match (&mut self.tls, &mut self.raw_out) {
            // Written by the flush below; what the socket does not take
            // waits in the buffer.
            (None, Some(out)) => out.read_from(src, max)?,
            (Some(tls), _) => {
                let mut tmp = [0u8; 16 * 1024];
                let mut total = 0;
                let mut stop = Stop::Full;
                while self.wbuf.len() < RAW_BUFFER {
                    let left = max - total;
                    if left == 0 {
                        stop = Stop::Throttled;
                        break;
                    }
                    let n = tmp.len().min(left);
                    match src.read(&mut tmp[..n]) {
                        Ok(0) => {
                            stop = Stop::Ended;
                            break;
                        }
                        Ok(n) => {
                            tls.writer().write_all(&tmp[..n])?;
                            total += n;
                            while tls.wants_write() {
                                tls.write_tls(&mut self.wbuf)?;
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            stop = Stop::WouldBlock;
                            break;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                (total, stop)
            }
            (None, None) => (0, Stop::Ended),
        };
        self.flush()?;
        Ok(r)
    }

    /// Raw relaying, client → peer: reads this connection (decrypting if
    /// TLS) into `dst` until it would block, ends, or `dst` is full.
    /// Returns the bytes and why it stopped.
    pub(super) fn relay_out(&mut self, dst: &mut RawBuf, max: usize) -> io::Result<(usize, Stop)> {
        match &mut self.tls {
            None => dst.read_from(&mut self.stream, max),
            Some(tls) => {
                let mut total = 0;
                loop {
                    // Plaintext rustls holds already, then more records.
                    let (n, stop) = dst.read_from(&mut tls.reader(), max - total)?;
                    total += n;
                    if matches!(stop, Stop::Full | Stop::Throttled) {
                        return Ok((total, stop));
                    }
                    match tls.read_tls(&mut self.stream) {
                        Ok(0) => return Ok((total, Stop::Ended)),
                        Ok(_) => {
                            if tls.process_new_packets().is_err() {
                                return Err(io::ErrorKind::InvalidData.into());
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            return Ok((total, Stop::WouldBlock))
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Raw output not yet taken by the socket.
    pub(super) fn raw_pending(&self) -> usize {
        self.wbuf.len() + self.raw_out.as_ref().map_or(0, RawBuf::len)
    }

    /// Moves TLS output into `wbuf` and writes `wbuf` to the socket.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        if let Some(tls) = &mut self.tls {
            while tls.wants_write() {
                tls.write_tls(&mut self.wbuf)?;
            }
        }
        let mut done = 0;
        while done < self.wbuf.len() {
            match self.stream.write(&self.wbuf[done..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.drain(..done);
        if self.wbuf.is_empty() {
            if let Some(out) = &mut self.raw_out {
                out.write_to(&mut self.stream)?;
            }
        }
        Ok(())
    }
}
