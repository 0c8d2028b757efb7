//! STUN and TURN wire format, with no I/O.
//!
//! This crate owns the bytes on the wire and nothing else: a zero-copy
//! [`Message`] reader that applies the RFC 8489 §6.3 validity rules, a
//! [`MessageBuilder`] that writes responses into a reusable buffer, the
//! MESSAGE-INTEGRITY / MESSAGE-INTEGRITY-SHA256 / FINGERPRINT computations, the
//! long-term credential key derivation (§9.2.2), and TURN ChannelData framing
//! (RFC 8656 §12.4).
//!
//! Parsing never allocates and never panics on any input; a malformed message
//! is an error value, which a server answers by dropping the packet silently.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod attr;
mod builder;
mod channel_data;
mod integrity;
mod message;

pub use builder::MessageBuilder;
pub use channel_data::{ChannelData, CHANNEL_DATA_HEADER_LEN};
pub use integrity::{
    hmac_sha1, long_term_key_md5, long_term_key_sha256, opaque_string, userhash, MD5_KEY_LEN,
};
pub use message::{AddrError, Message, ParseError, MAX_ATTRIBUTES};

/// The magic cookie, RFC 8489 §5.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the fixed STUN header.
pub const HEADER_LEN: usize = 20;
/// XOR value for FINGERPRINT, RFC 8489 §14.7 ("STUN" in ASCII).
pub const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// What the first two bits of a packet on a TURN port say it is
/// (RFC 8656 §12: 0b00 STUN, 0b01 ChannelData).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    /// Top bits 0b00: a STUN message.
    Stun,
    /// Top bits 0b01: a TURN ChannelData message.
    ChannelData,
    /// Anything else, or too short to say: drop it.
    Other,
}

/// Classifies a packet by its first byte.
pub fn packet_kind(data: &[u8]) -> PacketKind {
    match data.first().map(|b| b >> 6) {
        Some(0) => PacketKind::Stun,
        Some(1) => PacketKind::ChannelData,
        _ => PacketKind::Other,
    }
}

/// The class of a STUN message (RFC 8489 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// A request: expects a response.
    Request,
    /// An indication: no response.
    Indication,
    /// A success response.
    Success,
    /// An error response.
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    fn from_bits(bits: u16) -> Self {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// STUN and TURN method numbers (12 bits).
pub mod method {
    /// RFC 8489 Binding.
    pub const BINDING: u16 = 0x001;
    /// RFC 8656 Allocate.
    pub const ALLOCATE: u16 = 0x003;
    /// RFC 8656 Refresh.
    pub const REFRESH: u16 = 0x004;
    /// RFC 8656 Send (indication only).
    pub const SEND: u16 = 0x006;
    /// RFC 8656 Data (indication only).
    pub const DATA: u16 = 0x007;
    /// RFC 8656 CreatePermission.
    pub const CREATE_PERMISSION: u16 = 0x008;
    /// RFC 8656 ChannelBind.
    pub const CHANNEL_BIND: u16 = 0x009;
    /// RFC 6062 Connect (§4.3).
    pub const CONNECT: u16 = 0x00a;
    /// RFC 6062 ConnectionBind (§4.4).
    pub const CONNECTION_BIND: u16 = 0x00b;
    /// RFC 6062 ConnectionAttempt (indication only, §4.5).
    pub const CONNECTION_ATTEMPT: u16 = 0x00c;

    /// The method's name for logs and labels (`"channel-bind"`), or
    /// `"unknown"`: every method of this module has one.
    pub const fn name(m: u16) -> &'static str {
        match m {
            BINDING => "binding",
            ALLOCATE => "allocate",
            REFRESH => "refresh",
            SEND => "send",
            DATA => "data",
            CREATE_PERMISSION => "create-permission",
            CHANNEL_BIND => "channel-bind",
            CONNECT => "connect",
            CONNECTION_BIND => "connection-bind",
            CONNECTION_ATTEMPT => "connection-attempt",
            _ => "unknown",
        }
    }
}

/// A STUN message type: a 12-bit method and a class, interleaved on the wire
/// as RFC 8489 §5 Figure 3 shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MessageType {
    /// The method, 0..=0xFFF.
    pub method: u16,
    /// The class.
    pub class: Class,
}

impl MessageType {
    /// A message type from its parts; the method is truncated to 12 bits.
    pub const fn new(method: u16, class: Class) -> Self {
        MessageType {
            method: method & 0x0FFF,
            class,
        }
    }

    /// The 14-bit wire encoding (the top two bits of the field are zero).
    pub fn to_wire(self) -> u16 {
        let m = self.method;
        let c = self.class.bits();
        (m & 0x000F) | ((c & 1) << 4) | ((m & 0x0070) << 1) | ((c & 2) << 7) | ((m & 0x0F80) << 2)
    }

    /// Decodes the 14-bit wire encoding; the top two bits are ignored.
    pub fn from_wire(v: u16) -> Self {
        let method = (v & 0x000F) | ((v >> 1) & 0x0070) | ((v >> 2) & 0x0F80);
        let class = Class::from_bits(((v >> 4) & 1) | ((v >> 7) & 2));
        MessageType { method, class }
    }
}

/// A 96-bit transaction id.
pub type TransactionId = [u8; 12];

#[cfg(test)]
mod tests {

    #[test]
    fn every_method_has_a_name() {
        use super::method::*;
        for m in [
            BINDING,
            ALLOCATE,
            REFRESH,
            SEND,
            DATA,
            CREATE_PERMISSION,
            CHANNEL_BIND,
            CONNECT,
            CONNECTION_BIND,
            CONNECTION_ATTEMPT,
        ] {
            assert_ne!(name(m), "unknown", "{m:#x}");
        }
        assert_eq!(name(0x0ff), "unknown");
        assert_eq!(name(CHANNEL_BIND), "channel-bind");
    }

    use super::*;

    #[test]
    fn message_type_round_trip() {
        for method in [0u16, 1, 3, 4, 6, 7, 8, 9, 0xABC, 0xFFF] {
            for class in [Class::Request, Class::Indication, Class::Success, Class::Error] {
                let t = MessageType::new(method, class);
                assert_eq!(MessageType::from_wire(t.to_wire()), t);
            }
        }
        // Known encodings from RFC 8489 / RFC 8656.
        assert_eq!(
            MessageType::new(method::BINDING, Class::Request).to_wire(),
            0x0001
        );
        assert_eq!(
            MessageType::new(method::BINDING, Class::Success).to_wire(),
            0x0101
        );
        assert_eq!(MessageType::new(method::BINDING, Class::Error).to_wire(), 0x0111);
        assert_eq!(
            MessageType::new(method::ALLOCATE, Class::Request).to_wire(),
            0x0003
        );
        assert_eq!(
            MessageType::new(method::SEND, Class::Indication).to_wire(),
            0x0016
        );
        assert_eq!(
            MessageType::new(method::DATA, Class::Indication).to_wire(),
            0x0017
        );
        assert_eq!(
            MessageType::new(method::CHANNEL_BIND, Class::Error).to_wire(),
            0x0119
        );
    }

    #[test]
    fn classify() {
        assert_eq!(packet_kind(&[]), PacketKind::Other);
        assert_eq!(packet_kind(&[0x00]), PacketKind::Stun);
        assert_eq!(packet_kind(&[0x40]), PacketKind::ChannelData);
        assert_eq!(packet_kind(&[0x80]), PacketKind::Other);
        assert_eq!(packet_kind(&[0xC0]), PacketKind::Other);
    }
}
