//! Long-term credentials (RFC 8489 §9.2), TURN REST-API ephemeral credentials
//! (draft-uberti-behave-turn-rest), and stateless nonces.

use std::collections::HashMap;

use base64::Engine;
use stun_proto::{hmac_sha1, long_term_key_md5, MD5_KEY_LEN};
use subtle::ConstantTimeEq;

/// An MD5 long-term key, `MD5(username:realm:password)`.
pub type Md5Key = [u8; MD5_KEY_LEN];

/// The credentials a server accepts. Static users are held as keys, never as
/// passwords; REST-API secrets are held as given, since every key is derived
/// from them per username.
#[derive(Clone, Default)]
pub struct Credentials {
    users: HashMap<String, Md5Key>,
    secrets: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("users", &self.users.len())
            .field("secrets", &self.secrets.len())
            .finish()
    }
}

/// Why a username has no usable key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialError {
    /// Neither a static user nor a REST-API username.
    UnknownUser,
    /// A REST-API username whose expiry timestamp has passed.
    Expired,
}

impl Credentials {
    /// Empty: no user can authenticate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a static user, deriving and keeping only the key.
    pub fn add_user(&mut self, username: &str, realm: &str, password: &str) {
        self.users
            .insert(username.to_owned(), long_term_key_md5(username, realm, password));
    }

    /// Adds a static user by its precomputed MD5 key.
    pub fn add_user_key(&mut self, username: &str, key: Md5Key) {
        self.users.insert(username.to_owned(), key);
    }

    /// Adds a REST-API shared secret; several may be active during rotation.
    pub fn add_secret(&mut self, secret: &[u8]) {
        self.secrets.push(secret.to_vec());
    }

    /// Number of static users.
    pub fn user_count(&self) -> usize {
        self.users.len()
    }

    /// Number of REST-API secrets.
    pub fn secret_count(&self) -> usize {
        self.secrets.len()
    }

    /// Candidate keys for `username` at wall-clock `unix_now` (seconds). A
    /// static user has one key; a REST-API username has one per secret, and
    /// the caller tries each against MESSAGE-INTEGRITY.
    pub fn keys_for(
        &self,
        username: &str,
        realm: &str,
        unix_now: u64,
        out: &mut Vec<Md5Key>,
    ) -> Result<(), CredentialError> {
        out.clear();
        if let Some(k) = self.users.get(username) {
            out.push(*k);
            return Ok(());
        }
        if self.secrets.is_empty() {
            return Err(CredentialError::UnknownUser);
        }
        // REST-API usernames are "EXPIRY" or "EXPIRY:ID", EXPIRY in Unix seconds.
        let ts = username.split(':').next().unwrap_or("");
        let Ok(expiry) = ts.parse::<u64>() else {
            return Err(CredentialError::UnknownUser);
        };
        if expiry < unix_now {
            return Err(CredentialError::Expired);
        }
        for s in &self.secrets {
            out.push(long_term_key_md5(username, realm, &rest_password(s, username)));
        }
        Ok(())
    }
}

/// The REST-API password for `username`: `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(hmac_sha1(secret, username.as_bytes()))
}

/// Length of a nonce: 8 hex digits of issue time and 16 of MAC.
pub const NONCE_LEN: usize = 24;

/// Mints and checks stateless nonces: `hex(t) || hex(HMAC(secret, t || ip)[..8])`
/// where `t` is the issue time in seconds on the server's clock. Nothing is
/// stored per client; a nonce is bound to the client IP it was issued to,
/// and every worker sharing the secret accepts it.
#[derive(Clone)]
pub struct NonceMinter {
    secret: [u8; 32],
    lifetime_secs: u64,
}

impl std::fmt::Debug for NonceMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NonceMinter")
            .field("lifetime_secs", &self.lifetime_secs)
            .finish()
    }
}

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 15) as usize];
    }
}

impl NonceMinter {
    /// A minter with `secret` whose nonces last `lifetime_secs`.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        NonceMinter {
            secret,
            lifetime_secs,
        }
    }

    fn mac(&self, t: u32, ip: std::net::IpAddr) -> [u8; 8] {
        let mut input = [0u8; 4 + 16];
        input[..4].copy_from_slice(&t.to_be_bytes());
        let n = match ip {
            std::net::IpAddr::V4(v) => {
                input[4..8].copy_from_slice(&v.octets());
                8
            }
            std::net::IpAddr::V6(v) => {
                input[4..20].copy_from_slice(&v.octets());
                20
            }
        };
        let full = hmac_sha1(&self.secret, &input[..n]);
        let mut m = [0u8; 8];
        m.copy_from_slice(&full[..8]);
        m
    }

    /// A nonce for `ip` issued at `now_secs`.
    pub fn mint(&self, now_secs: u64, ip: std::net::IpAddr) -> [u8; NONCE_LEN] {
        let t = now_secs as u32;
        let mut out = [0u8; NONCE_LEN];
        hex_into(&t.to_be_bytes(), &mut out[..8]);
        hex_into(&self.mac(t, ip), &mut out[8..]);
        out
    }

    /// Whether `nonce` was minted by this secret for `ip` and has not expired
    /// at `now_secs`. The MAC is compared in constant time.
    pub fn is_valid(&self, nonce: &[u8], now_secs: u64, ip: std::net::IpAddr) -> bool {
        if nonce.len() != NONCE_LEN {
            return false;
        }
        let Some(t) = parse_hex_u32(&nonce[..8]) else {
            return false;
        };
        let mut want = [0u8; 16];
        hex_into(&self.mac(t, ip), &mut want);
        if !bool::from(want.ct_eq(&nonce[8..])) {
            return false;
        }
        let issued = t as u64;
        issued <= now_secs && now_secs - issued < self.lifetime_secs
    }
}

fn parse_hex_u32(s: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &c in s {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | d as u32;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_lifecycle() {
        let m = NonceMinter::new([7; 32], 600);
        let ip = "192.0.2.1".parse().unwrap();
        let other = "192.0.2.2".parse().unwrap();
        let n = m.mint(1000, ip);
        assert!(m.is_valid(&n, 1000, ip));
        assert!(m.is_valid(&n, 1599, ip));
        assert!(!m.is_valid(&n, 1600, ip), "expired after the lifetime");
        assert!(!m.is_valid(&n, 999, ip), "not valid before issue");
        assert!(!m.is_valid(&n, 1000, other), "bound to the client IP");
        let mut forged = n;
        forged[3] = if forged[3] == b'0' { b'1' } else { b'0' };
        assert!(!m.is_valid(&forged, 1000, ip), "timestamp is authenticated");
        let other_secret = NonceMinter::new([8; 32], 600);
        assert!(!other_secret.is_valid(&n, 1000, ip));
        assert!(!m.is_valid(b"short", 1000, ip));
        assert!(!m.is_valid(&[b'z'; NONCE_LEN], 1000, ip));
    }

    #[test]
    fn rest_credentials() {
        let mut c = Credentials::new();
        c.add_secret(b"north");
        c.add_secret(b"south");
        let mut keys = Vec::new();
        c.keys_for("2000:alice", "r", 1000, &mut keys).unwrap();
        assert_eq!(keys.len(), 2);
        let pw = rest_password(b"south", "2000:alice");
        assert_eq!(keys[1], long_term_key_md5("2000:alice", "r", &pw));
        assert_eq!(
            c.keys_for("999:alice", "r", 1000, &mut keys),
            Err(CredentialError::Expired)
        );
        assert_eq!(
            c.keys_for("bob", "r", 1000, &mut keys),
            Err(CredentialError::UnknownUser)
        );
        // The well-known example: secret "secret", username "1700000000:user".
        assert_eq!(rest_password(b"secret", "1700000000:user").len(), 28);
    }

    #[test]
    fn static_users_hold_keys() {
        let mut c = Credentials::new();
        c.add_user("alice", "example.org", "pw");
        let mut keys = Vec::new();
        c.keys_for("alice", "example.org", 0, &mut keys).unwrap();
        assert_eq!(keys, vec![long_term_key_md5("alice", "example.org", "pw")]);
    }
}
