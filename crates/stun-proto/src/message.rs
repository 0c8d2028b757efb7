//! The zero-copy STUN message reader.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::attr;
use crate::integrity;
use crate::{MessageType, TransactionId, FINGERPRINT_XOR, HEADER_LEN, MAGIC_COOKIE};

/// How many attributes a message may carry before the reader refuses it.
/// Real STUN/TURN messages carry fewer than a dozen; a bound keeps the reader
/// allocation-free.
pub const MAX_ATTRIBUTES: usize = 40;

/// Why a packet is not a valid STUN message. Every variant means the same
/// thing to a server: drop the packet silently (RFC 8489 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// Shorter than the 20-byte header.
    TooShort,
    /// The two most significant bits are not zero.
    NotStun,
    /// The magic cookie is wrong (RFC 3489 clients are not supported).
    BadCookie,
    /// The length field is not a multiple of four.
    UnalignedLength,
    /// The length field does not match the bytes received.
    LengthMismatch,
    /// An attribute header or value runs past the end of the message.
    Truncated,
    /// FINGERPRINT is present but not the last attribute, has the wrong size,
    /// or does not match.
    BadFingerprint,
    /// MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 has an invalid length.
    BadIntegrityLength,
    /// More than [`MAX_ATTRIBUTES`] attributes.
    TooManyAttributes,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            ParseError::TooShort => "shorter than a STUN header",
            ParseError::NotStun => "top bits not zero",
            ParseError::BadCookie => "bad magic cookie",
            ParseError::UnalignedLength => "length not a multiple of 4",
            ParseError::LengthMismatch => "length does not match packet size",
            ParseError::Truncated => "attribute runs past the end",
            ParseError::BadFingerprint => "bad FINGERPRINT",
            ParseError::BadIntegrityLength => "bad MESSAGE-INTEGRITY length",
            ParseError::TooManyAttributes => "too many attributes",
        };
        f.write_str(s)
    }
}

impl std::error::Error for ParseError {}

/// Why an address attribute could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AddrError {
    /// The value's length does not fit its family.
    BadLength,
    /// The family octet is neither IPv4 nor IPv6.
    UnknownFamily,
}

#[derive(Debug, Clone, Copy, Default)]
struct AttrRef {
    typ: u16,
    len: u16,
    /// Offset of the value from the start of the message.
    offset: u32,
}

/// A parsed STUN message borrowing the packet it came from.
///
/// Only attributes that count are visible through the accessors: those before
/// MESSAGE-INTEGRITY, then MESSAGE-INTEGRITY-SHA256 and FINGERPRINT
/// (RFC 8489 §14.5: everything else after MESSAGE-INTEGRITY is ignored).
#[derive(Clone)]
pub struct Message<'a> {
    buf: &'a [u8],
    typ: MessageType,
    attrs: [AttrRef; MAX_ATTRIBUTES],
    n_attrs: u8,
    /// Offset of the MESSAGE-INTEGRITY attribute header.
    integrity: Option<u32>,
    /// Offset of the MESSAGE-INTEGRITY-SHA256 attribute header.
    integrity_sha256: Option<u32>,
    has_fingerprint: bool,
}

impl std::fmt::Debug for Message<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("type", &self.typ)
            .field("len", &self.buf.len())
            .field("attrs", &self.attr_types().collect::<Vec<_>>())
            .finish()
    }
}

/// Reads the total length of the STUN message at the start of `data` from its
/// header, for stream framing (RFC 8489 §6.2.2). `None` until 4 bytes exist.
pub(crate) fn framed_len(data: &[u8]) -> Option<usize> {
    if data.len() < 4 {
        return None;
    }
    Some(HEADER_LEN + u16::from_be_bytes([data[2], data[3]]) as usize)
}

impl<'a> Message<'a> {
    /// Parses and validates a whole STUN message (RFC 8489 §6.3): header bits,
    /// magic cookie, length, every attribute's bounds, FINGERPRINT position
    /// and value. `data` must be exactly one message.
    pub fn parse(data: &'a [u8]) -> Result<Self, ParseError> {
        if data.len() < HEADER_LEN {
            return Err(ParseError::TooShort);
        }
        if data[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        if u32::from_be_bytes([data[4], data[5], data[6], data[7]]) != MAGIC_COOKIE {
            return Err(ParseError::BadCookie);
        }
        let len = u16::from_be_bytes([data[2], data[3]]) as usize;
        if !len.is_multiple_of(4) {
            return Err(ParseError::UnalignedLength);
        }
        if HEADER_LEN + len != data.len() {
            return Err(ParseError::LengthMismatch);
        }
        let typ = MessageType::from_wire(u16::from_be_bytes([data[0], data[1]]));
        let mut msg = Message {
            buf: data,
            typ,
            attrs: [AttrRef::default(); MAX_ATTRIBUTES],
            n_attrs: 0,
            integrity: None,
            integrity_sha256: None,
            has_fingerprint: false,
        };
        let mut pos = HEADER_LEN;
        while pos < data.len() {
            if data.len() - pos < 4 {
                return Err(ParseError::Truncated);
            }
            let at = u16::from_be_bytes([data[pos], data[pos + 1]]);
            let alen = u16::from_be_bytes([data[pos + 2], data[pos + 3]]) as usize;
            let value = pos + 4;
            let padded = (alen + 3) & !3;
            if data.len() - value < padded {
                return Err(ParseError::Truncated);
            }
            if msg.has_fingerprint {
                // RFC 8489 §14.7: FINGERPRINT MUST be the last attribute.
                return Err(ParseError::BadFingerprint);
            }
            let counts = match at {
                attr::FINGERPRINT => {
                    if alen != 4 {
                        return Err(ParseError::BadFingerprint);
                    }
                    let want =
                        u32::from_be_bytes([data[value], data[value + 1], data[value + 2], data[value + 3]]);
                    if fingerprint_over(data, pos) != want {
                        return Err(ParseError::BadFingerprint);
                    }
                    msg.has_fingerprint = true;
                    true
                }
                attr::MESSAGE_INTEGRITY_SHA256 => {
                    // RFC 8489 §14.6: 16..=32 bytes, a multiple of 4.
                    if !(16..=32).contains(&alen) || !alen.is_multiple_of(4) {
                        return Err(ParseError::BadIntegrityLength);
                    }
                    if msg.integrity_sha256.is_none() {
                        msg.integrity_sha256 = Some(pos as u32);
                        true
                    } else {
                        false
                    }
                }
                attr::MESSAGE_INTEGRITY => {
                    if alen != 20 {
                        return Err(ParseError::BadIntegrityLength);
                    }
                    // After MESSAGE-INTEGRITY-SHA256 only FINGERPRINT counts.
                    if msg.integrity.is_none() && msg.integrity_sha256.is_none() {
                        msg.integrity = Some(pos as u32);
                        true
                    } else {
                        false
                    }
                }
                // RFC 8489 §14.5/§14.6: ignore other attributes after integrity.
                _ => msg.integrity.is_none() && msg.integrity_sha256.is_none(),
            };
            if counts {
                if msg.n_attrs as usize == MAX_ATTRIBUTES {
                    return Err(ParseError::TooManyAttributes);
                }
                msg.attrs[msg.n_attrs as usize] = AttrRef {
                    typ: at,
                    len: alen as u16,
                    offset: value as u32,
                };
                msg.n_attrs += 1;
            }
            pos = value + padded;
        }
        Ok(msg)
    }

    /// The total length of the STUN message at the start of a byte stream, read
    /// from its header (RFC 8489 §6.2.2 framing); `None` until four bytes exist.
    pub fn stream_len(data: &[u8]) -> Option<usize> {
        framed_len(data)
    }

    /// The raw bytes of the whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Method and class.
    pub fn message_type(&self) -> MessageType {
        self.typ
    }

    /// The 96-bit transaction id.
    pub fn transaction_id(&self) -> TransactionId {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        t
    }

    /// Types of the attributes that count, in order, duplicates included.
    pub fn attr_types(&self) -> impl Iterator<Item = u16> + '_ {
        self.attrs[..self.n_attrs as usize].iter().map(|a| a.typ)
    }

    /// The value of the first attribute of type `typ` (RFC 8489 §14: when an
    /// attribute repeats, only the first counts).
    pub fn get(&self, typ: u16) -> Option<&'a [u8]> {
        self.attrs[..self.n_attrs as usize]
            .iter()
            .find(|a| a.typ == typ)
            .map(|a| &self.buf[a.offset as usize..a.offset as usize + a.len as usize])
    }

    /// Values of every attribute of type `typ`, in order, for the attributes
    /// that may legitimately repeat (XOR-PEER-ADDRESS in CreatePermission,
    /// RFC 8656 §9.1).
    pub fn get_all(&self, typ: u16) -> impl Iterator<Item = &'a [u8]> + '_ {
        let buf = self.buf;
        self.attrs[..self.n_attrs as usize]
            .iter()
            .filter(move |a| a.typ == typ)
            .map(move |a| &buf[a.offset as usize..a.offset as usize + a.len as usize])
    }

    /// Decodes an XOR-encoded address from a value returned by [`Self::get_all`].
    pub fn decode_xor_addr(&self, value: &[u8]) -> Result<SocketAddr, AddrError> {
        decode_address(value, Some(&self.buf[4..20]))
    }

    /// Whether an attribute of type `typ` is present.
    pub fn has(&self, typ: u16) -> bool {
        self.attrs[..self.n_attrs as usize].iter().any(|a| a.typ == typ)
    }

    /// A 32-bit attribute such as LIFETIME; `None` if absent or not 4 bytes.
    pub fn get_u32(&self, typ: u16) -> Option<u32> {
        let v = self.get(typ)?;
        let b: [u8; 4] = v.try_into().ok()?;
        Some(u32::from_be_bytes(b))
    }

    /// Decodes an XOR-encoded address attribute (RFC 8489 §14.2).
    pub fn get_xor_addr(&self, typ: u16) -> Option<Result<SocketAddr, AddrError>> {
        let v = self.get(typ)?;
        Some(decode_address(v, Some(&self.buf[4..20])))
    }

    /// Decodes a plain address attribute (MAPPED-ADDRESS, OTHER-ADDRESS).
    pub fn get_addr(&self, typ: u16) -> Option<Result<SocketAddr, AddrError>> {
        let v = self.get(typ)?;
        Some(decode_address(v, None))
    }

    /// ERROR-CODE as (code, reason) (RFC 8489 §14.8).
    pub fn error_code(&self) -> Option<(u16, &'a [u8])> {
        let v = self.get(attr::ERROR_CODE)?;
        if v.len() < 4 {
            return None;
        }
        let code = (v[2] & 0x07) as u16 * 100 + v[3] as u16;
        Some((code, &v[4..]))
    }

    /// Whether MESSAGE-INTEGRITY is present.
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some()
    }

    /// Whether MESSAGE-INTEGRITY-SHA256 is present.
    pub fn has_integrity_sha256(&self) -> bool {
        self.integrity_sha256.is_some()
    }

    /// Whether a (valid) FINGERPRINT is present.
    pub fn has_fingerprint(&self) -> bool {
        self.has_fingerprint
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1) with `key`, in constant time.
    /// False when the attribute is absent.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some(pos) = self.integrity else {
            return false;
        };
        let pos = pos as usize;
        let mac = integrity::hmac_sha1_parts(key, &self.adjusted_header(pos + 24), &self.buf[20..pos]);
        integrity::ct_eq(&mac, &self.buf[pos + 4..pos + 24])
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 with `key`, in constant time; a
    /// truncated MAC (16..32 bytes) is compared on its length.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        let Some(pos) = self.integrity_sha256 else {
            return false;
        };
        let pos = pos as usize;
        let alen = u16::from_be_bytes([self.buf[pos + 2], self.buf[pos + 3]]) as usize;
        let mac =
            integrity::hmac_sha256_parts(key, &self.adjusted_header(pos + 4 + alen), &self.buf[20..pos]);
        integrity::ct_eq(&mac[..alen], &self.buf[pos + 4..pos + 4 + alen])
    }

    /// The header with its length field rewritten as if the message ended at
    /// `end`, as integrity computations require (RFC 8489 §14.5).
    fn adjusted_header(&self, end: usize) -> [u8; 20] {
        let mut h = [0u8; 20];
        h.copy_from_slice(&self.buf[..20]);
        let l = (end - HEADER_LEN) as u16;
        h[2..4].copy_from_slice(&l.to_be_bytes());
        h
    }
}

/// CRC-32 of `data[..fp_pos]` with the header length adjusted to include an
/// 8-byte FINGERPRINT at `fp_pos`, XORed per RFC 8489 §14.7.
pub(crate) fn fingerprint_over(data: &[u8], fp_pos: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    let len = (fp_pos + 8 - HEADER_LEN) as u16;
    h.update(&data[..2]);
    h.update(&len.to_be_bytes());
    h.update(&data[4..fp_pos]);
    h.finalize() ^ FINGERPRINT_XOR
}

/// Decodes an address attribute value; `xor` is the magic cookie and
/// transaction id (bytes 4..20 of the header) for the XOR- variants.
pub(crate) fn decode_address(v: &[u8], xor: Option<&[u8]>) -> Result<SocketAddr, AddrError> {
    if v.len() < 4 {
        return Err(AddrError::BadLength);
    }
    let mut port = u16::from_be_bytes([v[2], v[3]]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    match v[1] {
        attr::FAMILY_IPV4 => {
            if v.len() != 8 {
                return Err(AddrError::BadLength);
            }
            let mut a = [v[4], v[5], v[6], v[7]];
            if let Some(x) = xor {
                for i in 0..4 {
                    a[i] ^= x[i];
                }
            }
            Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port))
        }
        attr::FAMILY_IPV6 => {
            if v.len() != 20 {
                return Err(AddrError::BadLength);
            }
            let mut a = [0u8; 16];
            a.copy_from_slice(&v[4..20]);
            if let Some(x) = xor {
                for i in 0..16 {
                    a[i] ^= x[i];
                }
            }
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
        }
        _ => Err(AddrError::UnknownFamily),
    }
}
