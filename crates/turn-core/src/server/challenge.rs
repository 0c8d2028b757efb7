//! Sizing the unauthenticated challenge (401 / 438, RFC 8489 §9.2.4) so a
//! spoofed request cannot be reflected with more than [`CHALLENGE_RATIO`]
//! times its bytes (RFC 8489 §17, RFC 8656 §21 on reflection).
//!
//! Three answers, in order: the full challenge (REALM, NONCE offering
//! password algorithms, PASSWORD-ALGORITHMS); an MD5-only challenge whose
//! nonce does not offer them, 12 bytes shorter; or, for a request too small
//! for either, no challenge at all. A request that small can never succeed
//! anyway: an Allocate needs REQUESTED-TRANSPORT (→ a short 400), and any
//! other request on a 5-tuple without an allocation gets a short 437.

use super::respond::ReqInfo;
use super::Server;
use crate::auth::NONCE_LEN;

/// An unauthenticated challenge is at most this many times its request.
pub const CHALLENGE_RATIO: usize = 3;

/// The smallest Allocate that can succeed: the header and
/// REQUESTED-TRANSPORT. Browsers send exactly this first.
pub const MIN_ALLOCATE_LEN: usize = 28;

fn attr_len(value: usize) -> usize {
    4 + value.div_ceil(4) * 4
}

/// Bytes of a challenge with a realm of `realm_len` bytes: the header,
/// ERROR-CODE without reason phrase, REALM, NONCE, PASSWORD-ALGORITHMS when
/// offered, FINGERPRINT when the request had one. No SOFTWARE: a challenge
/// carries nothing it does not need.
pub fn challenge_len(realm_len: usize, offer_algorithms: bool, fingerprint: bool) -> usize {
    20 + attr_len(4)
        + attr_len(realm_len)
        + attr_len(NONCE_LEN)
        + if offer_algorithms { attr_len(8) } else { 0 }
        + if fingerprint { 8 } else { 0 }
}

/// The longest realm whose challenge to a minimal Allocate stays within
/// the ratio (MD5-only): 24 bytes.
pub fn max_realm_len() -> usize {
    let limit = MIN_ALLOCATE_LEN * CHALLENGE_RATIO;
    (0..=limit)
        .rev()
        .find(|&n| challenge_len(n, false, false) <= limit)
        .unwrap_or(0)
}

impl Server {
    /// The challenge `req` gets: `Some(true)` the full one, `Some(false)`
    /// MD5-only, `None` none (too small a request). With
    /// `Config::long_realm`, any request of at least a minimal Allocate's
    /// size is challenged, whatever the ratio.
    pub(super) fn challenge_kind(&self, req: &ReqInfo) -> Option<bool> {
        let limit = req.len * CHALLENGE_RATIO;
        let realm = self.cfg.realm.len();
        if challenge_len(realm, true, req.fingerprint) <= limit {
            Some(true)
        } else if challenge_len(realm, false, req.fingerprint) <= limit
            || (self.cfg.long_realm && req.len >= MIN_ALLOCATE_LEN)
        {
            Some(false)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        // "example.org": 20 + 8 + 16 + 28 + 12 = 84 = 3 × 28.
        assert_eq!(challenge_len(11, true, false), 84);
        assert_eq!(challenge_len(11, false, false), 72);
        assert_eq!(max_realm_len(), 24);
        assert_eq!(challenge_len(24, false, false), 84);
    }
}
