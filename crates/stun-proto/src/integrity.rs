//! MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and long-term key derivation.

use hmac::{Hmac, Mac};
use md5::{Digest, Md5};
use sha1::Sha1;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Length of an MD5 long-term key.
pub const MD5_KEY_LEN: usize = 16;

pub(crate) fn hmac_sha1_parts(key: &[u8], header: &[u8], body: &[u8]) -> [u8; 20] {
    // HMAC accepts keys of any length, so new_from_slice cannot fail.
    let mut m = <Hmac<Sha1> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(header);
    m.update(body);
    m.finalize().into_bytes().into()
}

pub(crate) fn hmac_sha256_parts(key: &[u8], header: &[u8], body: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    m.update(header);
    m.update(body);
    m.finalize().into_bytes().into()
}

/// HMAC-SHA1 of `data` under `key` (used by TURN REST-API credentials and by
/// stateless nonces).
pub fn hmac_sha1(key: &[u8], data: &[u8]) -> [u8; 20] {
    hmac_sha1_parts(key, data, &[])
}

/// Constant-time equality; false when lengths differ.
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The OpaqueString-prepared form of a password or realm (RFC 8489 §9.2.2
/// via RFC 8265). SASLprep (RFC 4013) gives the same result for the strings
/// STUN uses in practice and for the RFC 5769 vector; a string it rejects is
/// used as is, which is what deployed servers do.
pub fn opaque_string(s: &str) -> std::borrow::Cow<'_, str> {
    match stringprep::saslprep(s) {
        Ok(p) => p,
        Err(_) => std::borrow::Cow::Borrowed(s),
    }
}

/// The long-term MD5 key, RFC 8489 §9.2.2:
/// `MD5(username ":" OpaqueString(realm) ":" OpaqueString(password))`.
pub fn long_term_key_md5(username: &str, realm: &str, password: &str) -> [u8; MD5_KEY_LEN] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(opaque_string(realm).as_bytes());
    h.update(b":");
    h.update(opaque_string(password).as_bytes());
    h.finalize().into()
}

/// The long-term SHA-256 key, RFC 8489 §9.2.2.
pub fn long_term_key_sha256(username: &str, realm: &str, password: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(opaque_string(realm).as_bytes());
    h.update(b":");
    h.update(opaque_string(password).as_bytes());
    h.finalize().into()
}

/// USERHASH, RFC 8489 §14.4: `SHA-256(OpaqueString(username) ":" OpaqueString(realm))`.
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(opaque_string(username).as_bytes());
    h.update(b":");
    h.update(opaque_string(realm).as_bytes());
    h.finalize().into()
}
