//! RFC 8489 §9.2.4: long-term credential checks on every TURN request, in
//! the RFC's order, with the brute-force guard in front of the MAC check.

use std::time::Instant;

use stun_proto::{attr, Message};

use super::error::ErrorCode;
use super::events::Event;
use super::events::RefusalDetail;
use super::io::FiveTuple;
use super::Server;
use crate::auth::{CredentialError, Key, PasswordAlgorithm, OFFERED_ALGORITHMS};
use crate::limits::Verdict;

/// RFC 8489 §14.3: USERNAME is fewer than 509 bytes.
const MAX_USERNAME_LEN: usize = 508;

/// A request that passed authentication.
pub(super) struct Authenticated {
    pub(super) key: Key,
    /// Answer with MESSAGE-INTEGRITY-SHA256 rather than MESSAGE-INTEGRITY.
    pub(super) sha256: bool,
    /// The username (resolved from USERHASH if that was used).
    pub(super) username: String,
}

impl Server {
    /// `Err(Some(code))`: answer with that error; `Err(None)`: drop silently
    /// (the account/source pair is blocked or throttled).
    pub(super) fn authenticate(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
    ) -> Result<Authenticated, Option<ErrorCode>> {
        use ErrorCode::{BadRequest, StaleNonce, Unauthorized};
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            return Err(Some(Unauthorized));
        }
        let user_attr = msg.get(attr::USERNAME);
        let hash_attr = msg.get(attr::USERHASH);
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            self.refusal = Some(RefusalDetail::Missing("REALM or NONCE (RFC 8489 §9.2.4)"));
            return Err(Some(BadRequest));
        };
        if user_attr.is_none() && hash_attr.is_none() {
            self.refusal = Some(RefusalDetail::Missing("USERNAME or USERHASH (RFC 8489 §9.2.4)"));
            return Err(Some(BadRequest));
        }
        if user_attr.is_some_and(|u| u.len() > MAX_USERNAME_LEN)
            || hash_attr.is_some_and(|h| h.len() != 32)
            || realm.len() > attr::MAX_TEXT_ATTR_LEN
            || nonce.len() > attr::MAX_TEXT_ATTR_LEN
        {
            self.refusal = Some(RefusalDetail::Malformed(
                "USERNAME, USERHASH, REALM or NONCE (too long)",
            ));
            return Err(Some(BadRequest));
        }
        let Some(offered) = self.minter.check(nonce, self.nonce_secs(now), tuple.client.ip()) else {
            return Err(Some(StaleNonce));
        };
        // §9.2.4 bid-down protection: a nonce that advertises password
        // algorithms is answered with both PASSWORD-ALGORITHMS (echoing our
        // list exactly) and PASSWORD-ALGORITHM (one of it), or neither
        // (MD5); an MD5-only nonce with neither. Anything else means the
        // list was tampered with.
        let alg = match (
            msg.get(attr::PASSWORD_ALGORITHMS),
            msg.get(attr::PASSWORD_ALGORITHM),
        ) {
            (None, None) => PasswordAlgorithm::Md5,
            (Some(list), Some(chosen)) if offered && list == OFFERED_ALGORITHMS => match chosen {
                [0x00, 0x01, 0x00, 0x00] => PasswordAlgorithm::Md5,
                [0x00, 0x02, 0x00, 0x00] => PasswordAlgorithm::Sha256,
                _ => {
                    self.refusal = Some(RefusalDetail::Malformed("PASSWORD-ALGORITHM"));
                    return Err(Some(BadRequest));
                }
            },
            _ => {
                self.refusal = Some(RefusalDetail::Rule(
                    "PASSWORD-ALGORITHMS does not match the nonce's offer (bid-down protection, RFC 8489 §9.2.4)",
                ));
                return Err(Some(BadRequest));
            }
        };
        let username = match (user_attr, hash_attr) {
            (Some(u), _) => std::str::from_utf8(u).ok().map(str::to_owned),
            (None, Some(h)) => self.cfg.credentials.username_for_hash(h).map(str::to_owned),
            (None, None) => None,
        };
        // The guard counts per account: a USERHASH that resolves counts with
        // the USERNAME it stands for; one that does not, by its bytes.
        let raw = user_attr.or(hash_attr).unwrap_or_default();
        let ident: Vec<u8> = username.as_deref().map(str::as_bytes).unwrap_or(raw).to_vec();
        let ident = &ident[..];
        let ip = tuple.client.ip();
        let guard = self.shared.auth_guard.clone();
        match guard.verdict(ident, ip, now) {
            Verdict::Check => {}
            _ => {
                self.counters.auth_throttled += 1;
                return Err(None);
            }
        }
        // Why a failure failed, for the refusal log only: the client gets a
        // plain 401 whatever the cause (no user enumeration).
        let mut why = "unknown USERHASH, or a USERNAME that is not UTF-8";
        let verified = match username.as_deref() {
            Some(_) if realm != self.cfg.realm.as_bytes() => {
                why = "REALM is not this server's realm";
                None
            }
            Some(name) => {
                let unix = self.unix_now(now);
                let mut keys = std::mem::take(&mut self.keys);
                let found = match self
                    .cfg
                    .credentials
                    .keys_for(name, &self.cfg.realm, unix, alg, &mut keys)
                {
                    Err(CredentialError::UnknownUser) => {
                        why = "unknown user (no such user, and not a REST-API username)";
                        None
                    }
                    Err(CredentialError::Expired) => {
                        why = "REST-API username past its expiry time";
                        None
                    }
                    Err(_) => {
                        why = "the user has no SHA-256 key (added by MD5 key): the client must use MD5";
                        None
                    }
                    Ok(()) => keys.iter().copied().find(|k| {
                        if msg.has_integrity_sha256() {
                            msg.verify_integrity_sha256(k.as_bytes())
                        } else {
                            msg.verify_integrity(k.as_bytes())
                        }
                    }),
                };
                if found.is_none() && why.starts_with("unknown USERHASH") {
                    why = "MESSAGE-INTEGRITY does not verify: wrong password";
                }
                self.keys = keys;
                found
            }
            None => None,
        };
        match (verified, username) {
            (Some(key), Some(username)) => {
                guard.succeeded(ident, ip);
                Ok(Authenticated {
                    key,
                    sha256: msg.has_integrity_sha256(),
                    username,
                })
            }
            _ => {
                self.counters.auth_failures += 1;
                if guard.failed(ident, ip, now) {
                    self.events.push_back(Event::AuthBlocked {
                        client: tuple.client,
                        username: String::from_utf8_lossy(ident).into_owned(),
                    });
                }
                self.refusal = Some(RefusalDetail::Rule(why));
                Err(Some(Unauthorized))
            }
        }
    }
}
