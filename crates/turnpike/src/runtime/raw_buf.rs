//! One direction's byte buffer of an RFC 6062 connection pair, and why a
//! relaying read stopped. Each direction holds at most [`RAW_BUFFER`]
//! bytes: past that the reading side stops being read, so a peer or client
//! that does not read slows the sender down through TCP flow control
//! instead of growing memory.

use std::io::{self, Read, Write};

/// Bytes buffered per direction of a relayed TCP connection.
pub(super) const RAW_BUFFER: usize = 256 * 1024;

/// Why a relaying read stopped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Stop {
    /// Nothing more to read now (an edge-triggered poll will say when).
    WouldBlock,
    /// The destination's buffer is full: the source still has data, and
    /// must be read again (no new edge comes) once there is room.
    Full,
    /// The source ended.
    Ended,
    /// The bandwidth cap allows no more now (`--max-bps`): read again a
    /// little later.
    Throttled,
}

/// One direction's buffer: allocated zeroed once (the allocator maps fresh
/// pages for this size, so nothing is written until used), read into at
/// `end`, written out from `start`. Unlike a `Vec` grown per read, no
/// byte is zeroed or moved per packet.
pub(super) struct RawBuf {
    data: Box<[u8]>,
    start: usize,
    end: usize,
}

impl RawBuf {
    pub(super) fn new() -> Self {
        RawBuf {
            data: vec![0u8; RAW_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.end - self.start
    }

    pub(super) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// What is buffered and not yet written (a binary upgrade carries it
    /// to the new process).
    pub(super) fn pending(&self) -> &[u8] {
        &self.data[self.start..self.end]
    }

    /// Room at the end, moving what is buffered to the front if needed.
    fn room(&mut self) -> &mut [u8] {
        if self.end == self.data.len() && self.start > 0 {
            self.data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.data[self.end..]
    }

    /// Appends what fits of `bytes`; returns how much did.
    pub(super) fn extend(&mut self, bytes: &[u8]) -> usize {
        let room = self.room();
        let n = room.len().min(bytes.len());
        room[..n].copy_from_slice(&bytes[..n]);
        self.end += n;
        n
    }

    /// Reads from `src` until it would block, ends, this is full, or `max`
    /// bytes were read.
    pub(super) fn read_from(&mut self, src: &mut impl Read, max: usize) -> io::Result<(usize, Stop)> {
        let mut total = 0;
        loop {
            let left = max - total;
            let room = self.room();
            if room.is_empty() {
                return Ok((total, Stop::Full));
            }
            if left == 0 {
                return Ok((total, Stop::Throttled));
            }
            let n = room.len().min(left);
            match src.read(&mut room[..n]) {
                Ok(0) => return Ok((total, Stop::Ended)),
                Ok(n) => {
                    self.end += n;
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((total, Stop::WouldBlock)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes as much as `dst` takes.
    pub(super) fn write_to(&mut self, dst: &mut impl Write) -> io::Result<()> {
        while self.start < self.end {
            match dst.write(&self.data[self.start..self.end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.start += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(())
    }
}
