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

/// The credential attributes of a request (RFC 8489 §9.2.4).
struct CredentialAttrs<'m> {
    realm: &'m [u8],
    nonce: &'m [u8],
    username: Option<&'m [u8]>,
    userhash: Option<&'m [u8]>,
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
        if !msg.has_integrity() && !msg.has_integrity_sha256() {
            return Err(Some(ErrorCode::Unauthorized));
        }
        let attrs = self.credential_attrs(msg)?;
        let Some(offered) = self
            .minter
            .check(attrs.nonce, self.nonce_secs(now), tuple.client.ip())
        else {
            return Err(Some(ErrorCode::StaleNonce));
        };
        let alg = self.password_algorithm(msg, offered)?;
        let username = match (attrs.username, attrs.userhash) {
            (Some(u), _) => std::str::from_utf8(u).ok().map(str::to_owned),
            (None, Some(h)) => self.cfg.credentials.username_for_hash(h).map(str::to_owned),
            (None, None) => None,
        };
        // The guard counts per account: a USERHASH that resolves counts with
        // the USERNAME it stands for; one that does not, by its bytes.
        let raw = attrs.username.or(attrs.userhash).unwrap_or_default();
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
        let verified = match username.as_deref() {
            Some(name) => self.verify_key(now, msg, attrs.realm, name, alg),
            None => Err("unknown USERHASH, or a USERNAME that is not UTF-8"),
        };
        match (verified, username) {
            (Ok(key), Some(username)) => {
                guard.succeeded(ident, ip);
                Ok(Authenticated {
                    key,
                    sha256: msg.has_integrity_sha256(),
                    username,
                })
            }
            (why, _) => {
                self.counters.auth_failures += 1;
                if guard.failed(ident, ip, now) {
                    self.events.push_back(Event::AuthBlocked {
                        client: tuple.client,
                        username: String::from_utf8_lossy(ident).into_owned(),
                    });
                }
                // Why, for the refusal log only: the client gets a plain
                // 401 whatever the cause (no user enumeration).
                self.refusal = Some(RefusalDetail::Rule(why.err().unwrap_or("unknown user")));
                Err(Some(ErrorCode::Unauthorized))
            }
        }
    }

    /// REALM, NONCE and USERNAME or USERHASH, present and within their
    /// lengths (RFC 8489 §9.2.4, §14.3), else 400.
    fn credential_attrs<'m>(
        &mut self,
        msg: &'m Message<'_>,
    ) -> Result<CredentialAttrs<'m>, Option<ErrorCode>> {
        let username = msg.get(attr::USERNAME);
        let userhash = msg.get(attr::USERHASH);
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            self.refusal = Some(RefusalDetail::Missing("REALM or NONCE (RFC 8489 §9.2.4)"));
            return Err(Some(ErrorCode::BadRequest));
        };
        if username.is_none() && userhash.is_none() {
            self.refusal = Some(RefusalDetail::Missing("USERNAME or USERHASH (RFC 8489 §9.2.4)"));
            return Err(Some(ErrorCode::BadRequest));
        }
        if username.is_some_and(|u| u.len() > MAX_USERNAME_LEN)
            || userhash.is_some_and(|h| h.len() != 32)
            || realm.len() > attr::MAX_TEXT_ATTR_LEN
            || nonce.len() > attr::MAX_TEXT_ATTR_LEN
        {
            self.refusal = Some(RefusalDetail::Malformed(
                "USERNAME, USERHASH, REALM or NONCE (too long)",
            ));
            return Err(Some(ErrorCode::BadRequest));
        }
        Ok(CredentialAttrs {
            realm,
            nonce,
            username,
            userhash,
        })
    }

    /// §9.2.4 bid-down protection: a nonce that advertises password
    /// algorithms is answered with both PASSWORD-ALGORITHMS (echoing our
    /// list exactly) and PASSWORD-ALGORITHM (one of it), or neither (MD5);
    /// an MD5-only nonce with neither. Anything else means the list was
    /// tampered with (400).
    fn password_algorithm(
        &mut self,
        msg: &Message<'_>,
        offered: bool,
    ) -> Result<PasswordAlgorithm, Option<ErrorCode>> {
        match (
            msg.get(attr::PASSWORD_ALGORITHMS),
            msg.get(attr::PASSWORD_ALGORITHM),
        ) {
            (None, None) => Ok(PasswordAlgorithm::Md5),
            (Some(list), Some(chosen)) if offered && list == OFFERED_ALGORITHMS => match chosen {
                [0x00, 0x01, 0x00, 0x00] => Ok(PasswordAlgorithm::Md5),
                [0x00, 0x02, 0x00, 0x00] => Ok(PasswordAlgorithm::Sha256),
                _ => {
                    self.refusal = Some(RefusalDetail::Malformed("PASSWORD-ALGORITHM"));
                    Err(Some(ErrorCode::BadRequest))
                }
            },
            _ => {
                self.refusal = Some(RefusalDetail::Rule(
                    "PASSWORD-ALGORITHMS does not match the nonce's offer (bid-down protection, RFC 8489 §9.2.4)",
                ));
                Err(Some(ErrorCode::BadRequest))
            }
        }
    }

    /// The key of `name` in this realm that the request's integrity
    /// verifies with, or why there is none.
    fn verify_key(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        realm: &[u8],
        name: &str,
        alg: PasswordAlgorithm,
    ) -> Result<Key, &'static str> {
        if realm != self.cfg.realm.as_bytes() {
            return Err("REALM is not this server's realm");
        }
        let unix = self.unix_now(now);
        let mut keys = std::mem::take(&mut self.keys);
        let found = match self
            .cfg
            .credentials
            .keys_for(name, &self.cfg.realm, unix, alg, &mut keys)
        {
            Err(CredentialError::UnknownUser) => {
                Err("unknown user (no such user, and not a REST-API username)")
            }
            Err(CredentialError::Expired) => Err("REST-API username past its expiry time"),
            Err(_) => Err("the user has no SHA-256 key (added by MD5 key): the client must use MD5"),
            Ok(()) => keys
                .iter()
                .copied()
                .find(|k| {
                    if msg.has_integrity_sha256() {
                        msg.verify_integrity_sha256(k.as_bytes())
                    } else {
                        msg.verify_integrity(k.as_bytes())
                    }
                })
                .ok_or("MESSAGE-INTEGRITY does not verify: wrong password"),
        };
        // The buffer is kept for the next request (no allocation per check).
        self.keys = keys;
        found
    }
}
