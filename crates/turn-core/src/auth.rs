//! Long-term credentials (RFC 8489 §9.2) with MD5 and SHA-256 keys and
//! USERHASH, TURN REST-API ephemeral credentials, and stateless nonces that
//! carry the RFC 8489 §9.2 security-feature cookie.

use std::collections::HashMap;

use base64::Engine;
use stun_proto::{hmac_sha1, long_term_key_md5, long_term_key_sha256, userhash, MD5_KEY_LEN};
use subtle::ConstantTimeEq;

/// An MD5 long-term key, `MD5(username:realm:password)`.
pub type Md5Key = [u8; MD5_KEY_LEN];

/// PASSWORD-ALGORITHM values (RFC 8489 §18.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PasswordAlgorithm {
    /// 0x0001, the RFC 5389 key.
    Md5,
    /// 0x0002.
    Sha256,
}

/// The PASSWORD-ALGORITHMS value this server offers, in order of
/// preference: SHA-256, then MD5 (each with no parameters).
pub const OFFERED_ALGORITHMS: [u8; 8] = [0x00, 0x02, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00];

/// A long-term key of either algorithm.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Key {
    bytes: [u8; 32],
    len: u8,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({} bytes)", self.len)
    }
}

impl Key {
    /// An MD5 key.
    pub fn md5(k: Md5Key) -> Self {
        let mut bytes = [0u8; 32];
        bytes[..16].copy_from_slice(&k);
        Key { bytes, len: 16 }
    }

    /// A SHA-256 key.
    pub fn sha256(k: [u8; 32]) -> Self {
        Key { bytes: k, len: 32 }
    }

    /// The key bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len as usize]
    }
}

#[derive(Clone)]
struct UserKeys {
    md5: Md5Key,
    sha256: Option<[u8; 32]>,
}

/// The credentials a server accepts. Static users are held as keys (MD5 and
/// SHA-256), never as passwords; REST-API secrets are held as given, since
/// every key is derived from them per username.
#[derive(Clone, Default)]
pub struct Credentials {
    users: HashMap<String, UserKeys>,
    by_userhash: HashMap<[u8; 32], String>,
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
#[non_exhaustive]
pub enum CredentialError {
    /// Neither a static user nor a REST-API username.
    UnknownUser,
    /// A REST-API username whose expiry timestamp has passed.
    Expired,
    /// The user exists but has no key for the requested algorithm (it was
    /// configured by MD5 key only).
    NoKeyForAlgorithm,
}

impl Credentials {
    /// Empty: no user can authenticate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a static user, deriving and keeping only the keys.
    pub fn add_user(&mut self, username: &str, realm: &str, password: &str) {
        self.users.insert(
            username.to_owned(),
            UserKeys {
                md5: long_term_key_md5(username, realm, password),
                sha256: Some(long_term_key_sha256(username, realm, password)),
            },
        );
        self.by_userhash
            .insert(userhash(username, realm), username.to_owned());
    }

    /// Adds a static user by its precomputed MD5 key (no SHA-256 key).
    pub fn add_user_key(&mut self, username: &str, realm: &str, key: Md5Key) {
        self.users.insert(
            username.to_owned(),
            UserKeys {
                md5: key,
                sha256: None,
            },
        );
        self.by_userhash
            .insert(userhash(username, realm), username.to_owned());
    }

    /// Adds a user by both precomputed keys (from a user database).
    pub fn add_user_keys(&mut self, username: &str, realm: &str, md5: Md5Key, sha256: [u8; 32]) {
        self.users.insert(
            username.to_owned(),
            UserKeys {
                md5,
                sha256: Some(sha256),
            },
        );
        self.by_userhash
            .insert(userhash(username, realm), username.to_owned());
    }

    /// Adds every user and secret of `other` (later entries win).
    pub fn merge(&mut self, other: &Credentials) {
        for (k, v) in &other.users {
            self.users.insert(k.clone(), v.clone());
        }
        for (k, v) in &other.by_userhash {
            self.by_userhash.insert(*k, v.clone());
        }
        self.secrets.extend(other.secrets.iter().cloned());
    }

    /// The users `self` and `other` both define with different keys, sorted:
    /// after `merge(other)`, `other`'s key is the one that works.
    pub fn conflicting_users(&self, other: &Credentials) -> Vec<String> {
        let mut names: Vec<String> = self
            .users
            .iter()
            .filter(|(name, keys)| {
                other
                    .users
                    .get(*name)
                    .is_some_and(|o| o.md5 != keys.md5 || o.sha256 != keys.sha256)
            })
            .map(|(name, _)| name.clone())
            .collect();
        names.sort();
        names
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

    /// The static user whose USERHASH is `hash` (RFC 8489 §14.4). REST-API
    /// usernames cannot be found this way: they are not known in advance.
    pub fn username_for_hash(&self, hash: &[u8]) -> Option<&str> {
        let h: [u8; 32] = hash.try_into().ok()?;
        self.by_userhash.get(&h).map(|s| s.as_str())
    }

    /// Candidate keys for `username` at wall-clock `unix_now` (seconds). A
    /// static user has one key; a REST-API username has one per secret, and
    /// the caller tries each against the message's integrity.
    pub fn keys_for(
        &self,
        username: &str,
        realm: &str,
        unix_now: u64,
        alg: PasswordAlgorithm,
        out: &mut Vec<Key>,
    ) -> Result<(), CredentialError> {
        out.clear();
        if let Some(k) = self.users.get(username) {
            match alg {
                PasswordAlgorithm::Md5 => out.push(Key::md5(k.md5)),
                PasswordAlgorithm::Sha256 => {
                    out.push(Key::sha256(k.sha256.ok_or(CredentialError::NoKeyForAlgorithm)?))
                }
            }
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
            let pw = rest_password(s, username);
            out.push(match alg {
                PasswordAlgorithm::Md5 => Key::md5(long_term_key_md5(username, realm, &pw)),
                PasswordAlgorithm::Sha256 => Key::sha256(long_term_key_sha256(username, realm, &pw)),
            });
        }
        Ok(())
    }
}

/// The REST-API password for `username`: `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &[u8], username: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(hmac_sha1(secret, username.as_bytes()))
}

/// The RFC 8489 §9.2 nonce cookie followed by the security feature set
/// "wAAA" = 0xC00000: bit 0 password algorithms and bit 1 username
/// anonymity (bits count from the most significant of the 24).
pub const NONCE_PREFIX: &[u8; 13] = b"obMatJos2wAAA";

/// The cookie of an MD5-only nonce: "QAAA" = 0x400000, username anonymity
/// without password algorithms, so the challenge needs no
/// PASSWORD-ALGORITHMS (12 bytes fewer; see `Server`'s challenge sizing).
pub const NONCE_PREFIX_MD5: &[u8; 13] = b"obMatJos2QAAA";

/// Length of a nonce: the 13-byte prefix and 11 base64url characters of
/// issue time (4 bytes) and MAC (4 bytes). 24 bytes need no padding, which
/// keeps the unauthenticated 401 small (reflection). The MAC only proves
/// the nonce is ours and fresh: MESSAGE-INTEGRITY, not the nonce, is what
/// authenticates, so 32 bits (2^31 online guesses under the per-source
/// limit) are plenty.
pub const NONCE_LEN: usize = 24;

const MAC_LEN: usize = 4;
const BODY_LEN: usize = 4 + MAC_LEN;

/// Mints and checks stateless nonces:
/// `cookie || base64url(t || HMAC-SHA1(secret, cookie || t || ip)[..4])`
/// where `t` is the issue time in seconds on the server's clock. Nothing is
/// stored per client. A nonce is bound to the client IP it was issued to,
/// its security-feature bits are under the MAC (so they cannot be stripped to
/// bid the client down, §9.2.4), and every worker sharing the secret
/// accepts it.
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

impl NonceMinter {
    /// A minter with `secret` whose nonces last `lifetime_secs`.
    pub fn new(secret: [u8; 32], lifetime_secs: u64) -> Self {
        NonceMinter {
            secret,
            lifetime_secs,
        }
    }

    fn body(&self, prefix: &[u8; 13], t: u32, ip: std::net::IpAddr) -> [u8; BODY_LEN] {
        let mut input = [0u8; 13 + 4 + 16];
        input[..13].copy_from_slice(prefix);
        input[13..17].copy_from_slice(&t.to_be_bytes());
        let n = match ip {
            std::net::IpAddr::V4(v) => {
                input[17..21].copy_from_slice(&v.octets());
                21
            }
            std::net::IpAddr::V6(v) => {
                input[17..33].copy_from_slice(&v.octets());
                33
            }
        };
        let mac = hmac_sha1(&self.secret, &input[..n]);
        let mut body = [0u8; BODY_LEN];
        body[..4].copy_from_slice(&t.to_be_bytes());
        body[4..].copy_from_slice(&mac[..MAC_LEN]);
        body
    }

    /// A nonce for `ip` issued at `now_secs` that offers password
    /// algorithms (RFC 8489 §9.2.4).
    pub fn mint(&self, now_secs: u64, ip: std::net::IpAddr) -> [u8; NONCE_LEN] {
        self.mint_with(now_secs, ip, true)
    }

    /// A nonce for `ip` issued at `now_secs`; `offer_algorithms` false
    /// mints an MD5-only nonce (its challenge carries no list).
    pub fn mint_with(&self, now_secs: u64, ip: std::net::IpAddr, offer_algorithms: bool) -> [u8; NONCE_LEN] {
        let prefix = if offer_algorithms {
            NONCE_PREFIX
        } else {
            NONCE_PREFIX_MD5
        };
        let mut out = [0u8; NONCE_LEN];
        out[..13].copy_from_slice(prefix);
        let body = self.body(prefix, now_secs as u32, ip);
        let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode_slice(body, &mut out[13..])
            .unwrap_or(0);
        debug_assert_eq!(n, NONCE_LEN - 13);
        out
    }

    /// Whether `nonce` was minted by this secret for `ip` and has not expired
    /// at `now_secs`.
    pub fn is_valid(&self, nonce: &[u8], now_secs: u64, ip: std::net::IpAddr) -> bool {
        self.check(nonce, now_secs, ip).is_some()
    }

    /// For a nonce minted by this secret for `ip` and not expired at
    /// `now_secs`: whether it offered password algorithms. `None` for any
    /// other nonce. The MAC is compared in constant time.
    pub fn check(&self, nonce: &[u8], now_secs: u64, ip: std::net::IpAddr) -> Option<bool> {
        if nonce.len() != NONCE_LEN {
            return None;
        }
        let (prefix, offers) = match &nonce[..13] {
            p if p == NONCE_PREFIX => (NONCE_PREFIX, true),
            p if p == NONCE_PREFIX_MD5 => (NONCE_PREFIX_MD5, false),
            _ => return None,
        };
        let mut body = [0u8; BODY_LEN + 2];
        match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(&nonce[13..], &mut body) {
            Ok(BODY_LEN) => {}
            _ => return None,
        }
        let t = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
        let want = self.body(prefix, t, ip);
        if !bool::from(want[4..].ct_eq(&body[4..BODY_LEN])) {
            return None;
        }
        let issued = t as u64;
        (issued <= now_secs && now_secs - issued < self.lifetime_secs).then_some(offers)
    }
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
        assert!(n.starts_with(b"obMatJos2"));
        assert!(n.iter().all(|c| c.is_ascii_graphic()));
        assert!(m.is_valid(&n, 1000, ip));
        assert!(m.is_valid(&n, 1599, ip));
        assert!(!m.is_valid(&n, 1600, ip), "expired after the lifetime");
        assert!(!m.is_valid(&n, 999, ip), "not valid before issue");
        assert!(!m.is_valid(&n, 1000, other), "bound to the client IP");
        for i in 9..NONCE_LEN {
            let mut forged = n;
            forged[i] = if forged[i] == b'A' { b'B' } else { b'A' };
            assert!(!m.is_valid(&forged, 1000, ip), "byte {i} is authenticated");
        }
        let other_secret = NonceMinter::new([8; 32], 600);
        assert!(!other_secret.is_valid(&n, 1000, ip));
        assert!(!m.is_valid(b"short", 1000, ip));
        assert!(!m.is_valid(&[b'z'; NONCE_LEN], 1000, ip));
        assert_eq!(m.check(&n, 1000, ip), Some(true), "offers password algorithms");
    }

    #[test]
    fn md5_only_nonces_cannot_be_turned_into_the_other_kind() {
        let m = NonceMinter::new([7; 32], 600);
        let ip = "192.0.2.1".parse().unwrap();
        let md5 = m.mint_with(1000, ip, false);
        assert!(md5.starts_with(NONCE_PREFIX_MD5));
        assert_eq!(m.check(&md5, 1000, ip), Some(false));
        // The feature bits are under the MAC, both ways (§9.2.4 bid-down).
        let mut up = md5;
        up[..13].copy_from_slice(NONCE_PREFIX);
        assert_eq!(m.check(&up, 1000, ip), None);
        let mut down = m.mint(1000, ip);
        down[..13].copy_from_slice(NONCE_PREFIX_MD5);
        assert_eq!(m.check(&down, 1000, ip), None);
    }

    #[test]
    fn rest_credentials() {
        let mut c = Credentials::new();
        c.add_secret(b"north");
        c.add_secret(b"south");
        let mut keys = Vec::new();
        c.keys_for("2000:alice", "r", 1000, PasswordAlgorithm::Md5, &mut keys)
            .unwrap();
        assert_eq!(keys.len(), 2);
        let pw = rest_password(b"south", "2000:alice");
        assert_eq!(keys[1], Key::md5(long_term_key_md5("2000:alice", "r", &pw)));
        c.keys_for("2000:alice", "r", 1000, PasswordAlgorithm::Sha256, &mut keys)
            .unwrap();
        assert_eq!(keys[1], Key::sha256(long_term_key_sha256("2000:alice", "r", &pw)));
        assert_eq!(
            c.keys_for("999:alice", "r", 1000, PasswordAlgorithm::Md5, &mut keys),
            Err(CredentialError::Expired)
        );
        assert_eq!(
            c.keys_for("bob", "r", 1000, PasswordAlgorithm::Md5, &mut keys),
            Err(CredentialError::UnknownUser)
        );
    }

    #[test]
    fn static_users_hold_keys_and_userhashes() {
        let mut c = Credentials::new();
        c.add_user("alice", "example.org", "pw");
        let mut keys = Vec::new();
        c.keys_for("alice", "example.org", 0, PasswordAlgorithm::Md5, &mut keys)
            .unwrap();
        assert_eq!(
            keys,
            vec![Key::md5(long_term_key_md5("alice", "example.org", "pw"))]
        );
        c.keys_for("alice", "example.org", 0, PasswordAlgorithm::Sha256, &mut keys)
            .unwrap();
        assert_eq!(
            keys,
            vec![Key::sha256(long_term_key_sha256("alice", "example.org", "pw"))]
        );
        assert_eq!(
            c.username_for_hash(&userhash("alice", "example.org")),
            Some("alice")
        );
        assert_eq!(c.username_for_hash(&[0; 32]), None);
        c.add_user_key("bob", "example.org", [1; 16]);
        assert_eq!(
            c.keys_for("bob", "example.org", 0, PasswordAlgorithm::Sha256, &mut keys),
            Err(CredentialError::NoKeyForAlgorithm)
        );
    }
}
