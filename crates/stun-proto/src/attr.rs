//! Attribute type numbers (RFC 8489 §18.3, RFC 8656 §18, RFC 5780 §7) and
//! small value encoders/decoders shared by the reader and the builder.

/// RFC 8489 MAPPED-ADDRESS.
pub const MAPPED_ADDRESS: u16 = 0x0001;
/// RFC 5780 CHANGE-REQUEST.
pub const CHANGE_REQUEST: u16 = 0x0003;
/// RFC 8489 USERNAME.
pub const USERNAME: u16 = 0x0006;
/// RFC 8489 MESSAGE-INTEGRITY.
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
/// RFC 8489 ERROR-CODE.
pub const ERROR_CODE: u16 = 0x0009;
/// RFC 8489 UNKNOWN-ATTRIBUTES.
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
/// RFC 8656 CHANNEL-NUMBER.
pub const CHANNEL_NUMBER: u16 = 0x000C;
/// RFC 8656 LIFETIME.
pub const LIFETIME: u16 = 0x000D;
/// RFC 8656 XOR-PEER-ADDRESS.
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
/// RFC 8656 DATA.
pub const DATA: u16 = 0x0013;
/// RFC 8489 REALM.
pub const REALM: u16 = 0x0014;
/// RFC 8489 NONCE.
pub const NONCE: u16 = 0x0015;
/// RFC 8656 XOR-RELAYED-ADDRESS.
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
/// RFC 8656 REQUESTED-ADDRESS-FAMILY.
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
/// RFC 8656 EVEN-PORT.
pub const EVEN_PORT: u16 = 0x0018;
/// RFC 8656 REQUESTED-TRANSPORT.
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
/// RFC 6062 §6.2.1 CONNECTION-ID (32 bits).
pub const CONNECTION_ID: u16 = 0x002a;
/// RFC 8656 DONT-FRAGMENT.
pub const DONT_FRAGMENT: u16 = 0x001A;
/// RFC 8489 MESSAGE-INTEGRITY-SHA256.
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
/// RFC 8489 PASSWORD-ALGORITHM.
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
/// RFC 8489 USERHASH.
pub const USERHASH: u16 = 0x001E;
/// RFC 8489 XOR-MAPPED-ADDRESS.
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// RFC 8656 RESERVATION-TOKEN.
pub const RESERVATION_TOKEN: u16 = 0x0022;
/// RFC 5780 PADDING.
pub const PADDING: u16 = 0x0026;
/// RFC 5780 RESPONSE-PORT.
pub const RESPONSE_PORT: u16 = 0x0027;
/// RFC 8489 PASSWORD-ALGORITHMS (comprehension-optional).
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
/// RFC 8489 ALTERNATE-DOMAIN.
pub const ALTERNATE_DOMAIN: u16 = 0x8003;
/// RFC 8489 SOFTWARE.
pub const SOFTWARE: u16 = 0x8022;
/// MOBILITY-TICKET (RFC 8016 §3.4): comprehension-optional.
pub const MOBILITY_TICKET: u16 = 0x8030;
/// RFC 8489 ALTERNATE-SERVER.
pub const ALTERNATE_SERVER: u16 = 0x8023;
/// RFC 8489 FINGERPRINT.
pub const FINGERPRINT: u16 = 0x8028;
/// RFC 5780 RESPONSE-ORIGIN.
pub const RESPONSE_ORIGIN: u16 = 0x802B;
/// RFC 5780 OTHER-ADDRESS.
pub const OTHER_ADDRESS: u16 = 0x802C;
/// RFC 8656 ADDITIONAL-ADDRESS-FAMILY.
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
/// ADDITIONAL-ADDRESS-FAMILY as the drafts before RFC 8656 numbered it,
/// still sent by coturn's `turnutils_uclient -Z` (4.6).
pub const ADDITIONAL_ADDRESS_FAMILY_DRAFT: u16 = 0x8032;
/// RFC 8656 ADDRESS-ERROR-CODE (§14.13).
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
/// RFC 8656 ICMP.
pub const ICMP: u16 = 0x8004;

/// Attributes 0x0000–0x7FFF are comprehension-required (RFC 8489 §14).
pub const fn is_comprehension_required(typ: u16) -> bool {
    typ < 0x8000
}

/// Address family octet of (XOR-)MAPPED-ADDRESS style attributes.
pub const FAMILY_IPV4: u8 = 0x01;
/// Address family octet for IPv6.
pub const FAMILY_IPV6: u8 = 0x02;

/// IANA protocol number for UDP, as carried in REQUESTED-TRANSPORT.
pub const PROTOCOL_UDP: u8 = 17;
/// IANA protocol number for TCP (RFC 6062).
pub const PROTOCOL_TCP: u8 = 6;

/// Upper bound on USERNAME, REALM, NONCE and SOFTWARE values
/// (RFC 8489 §14.3, §14.9, §14.10, §14.14: fewer than 128 characters,
/// which in UTF-8 is at most 763 bytes).
pub const MAX_TEXT_ATTR_LEN: usize = 763;
