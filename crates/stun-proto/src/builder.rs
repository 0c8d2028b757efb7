//! Writing STUN messages into a caller-owned, reusable buffer.

use std::net::{IpAddr, SocketAddr};

use crate::attr;
use crate::integrity;
use crate::message::fingerprint_over;
use crate::{MessageType, TransactionId, HEADER_LEN, MAGIC_COOKIE};

/// Builds one STUN message in a `Vec<u8>` the caller keeps and reuses, so a
/// server builds responses without allocating once the buffer has grown.
///
/// The header length is kept current after each attribute, so integrity and
/// fingerprint are computed over exactly what RFC 8489 §14.5–§14.7 specify.
pub struct MessageBuilder<'b> {
    buf: &'b mut Vec<u8>,
    /// Where this message starts in `buf`.
    start: usize,
}

impl<'b> MessageBuilder<'b> {
    /// Clears `buf` and writes a header for `typ` with transaction id `txid`.
    pub fn new(buf: &'b mut Vec<u8>, typ: MessageType, txid: &TransactionId) -> Self {
        buf.clear();
        Self::append(buf, typ, txid)
    }

    /// Writes a header for `typ` after what `buf` already holds, so several
    /// messages (a send queue's datagrams) share one buffer without a copy.
    pub fn append(buf: &'b mut Vec<u8>, typ: MessageType, txid: &TransactionId) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&typ.to_wire().to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(txid);
        MessageBuilder { buf, start }
    }

    fn set_len(&mut self) {
        let l = (self.buf.len() - self.start - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&l.to_be_bytes());
    }

    /// Appends an attribute, zero-padding its value to four bytes.
    ///
    /// Values longer than 65535 bytes are truncated by the caller's contract;
    /// this method caps them rather than panicking.
    pub fn attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let value = &value[..value.len().min(u16::MAX as usize - 3)];
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&(value.len() as u16).to_be_bytes());
        self.buf.extend_from_slice(value);
        let pad = (4 - value.len() % 4) % 4;
        self.buf.extend_from_slice(&[0u8; 3][..pad]);
        self.set_len();
        self
    }

    /// Appends a 32-bit attribute (LIFETIME and the like).
    pub fn u32(&mut self, typ: u16, v: u32) -> &mut Self {
        self.attr(typ, &v.to_be_bytes())
    }

    /// Appends an XOR-encoded address attribute (RFC 8489 §14.2).
    pub fn xor_addr(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        let mut x = [0u8; 16];
        x.copy_from_slice(&self.buf[self.start + 4..self.start + 20]);
        let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
        match addr.ip() {
            IpAddr::V4(ip) => {
                let mut v = [0u8; 8];
                v[1] = attr::FAMILY_IPV4;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                for (i, b) in ip.octets().iter().enumerate() {
                    v[4 + i] = b ^ x[i];
                }
                self.attr(typ, &v)
            }
            IpAddr::V6(ip) => {
                let mut v = [0u8; 20];
                v[1] = attr::FAMILY_IPV6;
                v[2..4].copy_from_slice(&port.to_be_bytes());
                for (i, b) in ip.octets().iter().enumerate() {
                    v[4 + i] = b ^ x[i];
                }
                self.attr(typ, &v)
            }
        }
    }

    /// Appends a plain address attribute (MAPPED-ADDRESS, OTHER-ADDRESS, ...).
    pub fn addr(&mut self, typ: u16, addr: SocketAddr) -> &mut Self {
        match addr.ip() {
            IpAddr::V4(ip) => {
                let mut v = [0u8; 8];
                v[1] = attr::FAMILY_IPV4;
                v[2..4].copy_from_slice(&addr.port().to_be_bytes());
                v[4..].copy_from_slice(&ip.octets());
                self.attr(typ, &v)
            }
            IpAddr::V6(ip) => {
                let mut v = [0u8; 20];
                v[1] = attr::FAMILY_IPV6;
                v[2..4].copy_from_slice(&addr.port().to_be_bytes());
                v[4..].copy_from_slice(&ip.octets());
                self.attr(typ, &v)
            }
        }
    }

    /// Appends ERROR-CODE (RFC 8489 §14.8).
    pub fn error_code(&mut self, code: u16, reason: &str) -> &mut Self {
        let mut v = [0u8; 4 + 128];
        let r = &reason.as_bytes()[..reason.len().min(128)];
        v[2] = ((code / 100) & 0x07) as u8;
        v[3] = (code % 100) as u8;
        v[4..4 + r.len()].copy_from_slice(r);
        self.attr(attr::ERROR_CODE, &v[..4 + r.len()])
    }

    /// Appends ADDRESS-ERROR-CODE (RFC 8656 §14.13): the family that could
    /// not be served, then the code and reason as in ERROR-CODE.
    pub fn address_error_code(&mut self, family: u8, code: u16, reason: &str) -> &mut Self {
        let mut v = [0u8; 4 + 128];
        let r = &reason.as_bytes()[..reason.len().min(128)];
        v[0] = family;
        v[2] = ((code / 100) & 0x07) as u8;
        v[3] = (code % 100) as u8;
        v[4..4 + r.len()].copy_from_slice(r);
        self.attr(attr::ADDRESS_ERROR_CODE, &v[..4 + r.len()])
    }

    /// Appends ICMP (RFC 8656 §14.14): type, code and error data.
    pub fn icmp(&mut self, icmp_type: u8, icmp_code: u8, data: u32) -> &mut Self {
        let mut v = [0u8; 8];
        v[2] = icmp_type;
        v[3] = icmp_code;
        v[4..].copy_from_slice(&data.to_be_bytes());
        self.attr(attr::ICMP, &v)
    }

    /// Appends UNKNOWN-ATTRIBUTES listing `types` (RFC 8489 §14.9).
    pub fn unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        let mut v = [0u8; 2 * crate::MAX_ATTRIBUTES];
        let n = types.len().min(crate::MAX_ATTRIBUTES);
        for (i, t) in types[..n].iter().enumerate() {
            v[2 * i..2 * i + 2].copy_from_slice(&t.to_be_bytes());
        }
        self.attr(attr::UNKNOWN_ATTRIBUTES, &v[..2 * n])
    }

    /// Appends MESSAGE-INTEGRITY computed with `key` (RFC 8489 §14.5).
    pub fn message_integrity(&mut self, key: &[u8]) -> &mut Self {
        let (s, pos) = (self.start, self.buf.len());
        let mut header = [0u8; 20];
        header.copy_from_slice(&self.buf[s..s + 20]);
        header[2..4].copy_from_slice(&((pos - s + 24 - HEADER_LEN) as u16).to_be_bytes());
        let mac = integrity::hmac_sha1_parts(key, &header, &self.buf[s + 20..pos]);
        self.attr(attr::MESSAGE_INTEGRITY, &mac)
    }

    /// Appends a full-length MESSAGE-INTEGRITY-SHA256 computed with `key`.
    pub fn message_integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let (s, pos) = (self.start, self.buf.len());
        let mut header = [0u8; 20];
        header.copy_from_slice(&self.buf[s..s + 20]);
        header[2..4].copy_from_slice(&((pos - s + 36 - HEADER_LEN) as u16).to_be_bytes());
        let mac = integrity::hmac_sha256_parts(key, &header, &self.buf[s + 20..pos]);
        self.attr(attr::MESSAGE_INTEGRITY_SHA256, &mac)
    }

    /// Appends FINGERPRINT (RFC 8489 §14.7); it must be the last attribute.
    pub fn fingerprint(&mut self) -> &mut Self {
        let crc = fingerprint_over(&self.buf[self.start..], self.buf.len() - self.start);
        self.attr(attr::FINGERPRINT, &crc.to_be_bytes())
    }

    /// The finished message.
    pub fn finish(self) -> &'b [u8] {
        &self.buf[self.start..]
    }
}
