//! Writing responses (RFC 8489 §6.3.3, §6.3.4; RFC 8656 §7–§12 success
//! attributes), and the 420 check for unknown comprehension-required
//! attributes (RFC 8489 §6.3.1).

use std::net::SocketAddr;
use std::time::Instant;

use stun_proto::{attr, Class, Message, MessageBuilder, MessageType, TransactionId};

use super::error::ErrorCode;
use super::io::{Dest, FiveTuple, Transmit};
use super::Server;
use crate::auth::{Key, OFFERED_ALGORITHMS};

/// What a response needs of its request, so an answer can be written after
/// the request's bytes are gone (a deferred Allocate).
#[derive(Debug, Clone, Copy)]
pub(super) struct ReqInfo {
    pub(super) method: u16,
    pub(super) txid: TransactionId,
    /// Answer with FINGERPRINT (RFC 8489 §7.3: when the request had one).
    pub(super) fingerprint: bool,
    /// The request's size, which bounds an unauthenticated answer's.
    pub(super) len: usize,
}

impl ReqInfo {
    pub(super) fn of(msg: &Message<'_>) -> Self {
        ReqInfo {
            method: msg.message_type().method,
            txid: msg.transaction_id(),
            fingerprint: msg.has_fingerprint(),
            len: msg.as_bytes().len(),
        }
    }
}

/// The key and algorithm that sign an authenticated answer.
pub(super) type Signer = Option<(Key, bool)>;

/// Outcome of request processing before the response is written.
pub(super) enum Reply {
    /// An error response with this code.
    Error(ErrorCode),
    /// 420 listing these attribute types.
    Unknown([u16; 8], usize),
    /// Allocate success (RFC 8656 §7.2): one XOR-RELAYED-ADDRESS per
    /// family, and ADDRESS-ERROR-CODE for a family that could not be served.
    AllocateOk {
        relayed: [Option<SocketAddr>; 2],
        lifetime: u32,
        token: Option<[u8; 8]>,
        family_error: Option<(u8, ErrorCode)>,
    },
    RefreshOk {
        lifetime: u32,
    },
    /// RFC 6062 §5.2 Connect success with CONNECTION-ID.
    Connected(u32),
    Ok,
    /// Not answered now: the answer comes when a command completes.
    Deferred,
    /// 300 Try Alternate with ALTERNATE-SERVER (draining).
    TryAlternate(SocketAddr),
    /// RFC 5780 Binding success: RESPONSE-ORIGIN, OTHER-ADDRESS, PADDING.
    Binding5780 {
        origin: SocketAddr,
        other: SocketAddr,
        padding: u16,
    },
}

/// RFC 5780 attributes, known when behaviour discovery is on.
pub(super) const RFC5780_ATTRS: &[u16] = &[attr::CHANGE_REQUEST, attr::RESPONSE_PORT, attr::PADDING];

/// Largest PADDING echoed back (RFC 5780 §7.6), so it cannot amplify.
pub(super) const MAX_PADDING: usize = 1024;

/// Comprehension-required attributes this server understands; any other in
/// a request is answered with 420 (RFC 8489 §6.3.1). DONT-FRAGMENT is known
/// only while the runtime can set DF ([`crate::Config::dont_fragment`]).
const KNOWN_REQUIRED: &[u16] = &[
    attr::MAPPED_ADDRESS,
    attr::CONNECTION_ID,
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::ERROR_CODE,
    attr::UNKNOWN_ATTRIBUTES,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::XOR_RELAYED_ADDRESS,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::REQUESTED_TRANSPORT,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::PASSWORD_ALGORITHM,
    attr::USERHASH,
    attr::XOR_MAPPED_ADDRESS,
    attr::RESERVATION_TOKEN,
];

/// Unknown comprehension-required attribute types in `msg`, at most eight,
/// with `extra` types also known.
pub(super) fn unknown_required_with(msg: &Message<'_>, extra: &[u16]) -> Option<([u16; 8], usize)> {
    let mut list = [0u16; 8];
    let mut n = 0;
    for t in msg.attr_types() {
        if attr::is_comprehension_required(t)
            && !KNOWN_REQUIRED.contains(&t)
            && !extra.contains(&t)
            && !list[..n].contains(&t)
            && n < list.len()
        {
            list[n] = t;
            n += 1;
        }
    }
    (n > 0).then_some((list, n))
}

impl Server {
    /// The 420 check for a TURN request: DONT-FRAGMENT is understood when
    /// the runtime sets DF.
    pub(super) fn unknown_required(&self, msg: &Message<'_>) -> Option<([u16; 8], usize)> {
        let extra: &[u16] = if self.cfg.dont_fragment {
            &[attr::DONT_FRAGMENT]
        } else {
            &[]
        };
        unknown_required_with(msg, extra)
    }

    /// Writes the response to `req` into the scratch buffer.
    pub(super) fn respond(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        req: ReqInfo,
        reply: Reply,
        signer: Signer,
    ) -> Transmit<'_> {
        // (nonce, whether it offers password algorithms)
        let nonce = match reply {
            Reply::Error(c) if c.is_challenge() => {
                let offer = self.challenge_kind(&req).unwrap_or(false);
                Some((
                    self.minter
                        .mint_with(self.nonce_secs(now), tuple.client.ip(), offer),
                    offer,
                ))
            }
            _ => None,
        };
        match reply {
            Reply::Error(code) => self.counters.count_error(code),
            Reply::Unknown(..) => self.counters.count_error(ErrorCode::UnknownAttribute),
            Reply::TryAlternate(_) => self.counters.count_error(ErrorCode::TryAlternate),
            _ if req.method == stun_proto::method::BINDING => self.counters.bindings += 1,
            _ => {}
        }
        let class = match reply {
            Reply::Error(_) | Reply::Unknown(..) | Reply::TryAlternate(_) => Class::Error,
            _ => Class::Success,
        };
        let mut b = MessageBuilder::new(&mut self.out, MessageType::new(req.method, class), &req.txid);
        match reply {
            Reply::Error(code) => {
                let reason = if nonce.is_some() { "" } else { code.reason() };
                b.error_code(code.code(), reason);
                if let Some((n, offer)) = &nonce {
                    b.attr(attr::REALM, self.cfg.realm.as_bytes())
                        .attr(attr::NONCE, n);
                    if *offer {
                        // RFC 8489 §9.2.4: the nonce's cookie advertises
                        // password algorithms, so the list comes with it.
                        b.attr(attr::PASSWORD_ALGORITHMS, &OFFERED_ALGORITHMS);
                    }
                }
            }
            Reply::TryAlternate(alt) => {
                b.error_code(ErrorCode::TryAlternate.code(), ErrorCode::TryAlternate.reason())
                    .addr(attr::ALTERNATE_SERVER, alt);
            }
            Reply::Unknown(list, n) => {
                b.error_code(
                    ErrorCode::UnknownAttribute.code(),
                    ErrorCode::UnknownAttribute.reason(),
                )
                .unknown_attributes(&list[..n]);
            }
            Reply::AllocateOk {
                relayed,
                lifetime,
                token,
                family_error,
            } => {
                for r in relayed.iter().flatten() {
                    b.xor_addr(attr::XOR_RELAYED_ADDRESS, *r);
                }
                b.u32(attr::LIFETIME, lifetime)
                    .xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
                if let Some(t) = token {
                    b.attr(attr::RESERVATION_TOKEN, &t);
                }
                if let Some((family, code)) = family_error {
                    b.address_error_code(family, code.code(), code.reason());
                }
            }
            Reply::RefreshOk { lifetime } => {
                b.u32(attr::LIFETIME, lifetime);
            }
            Reply::Connected(id) => {
                b.u32(attr::CONNECTION_ID, id);
            }
            Reply::Ok | Reply::Deferred => {
                if req.method == stun_proto::method::BINDING {
                    b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client);
                }
            }
            Reply::Binding5780 {
                origin,
                other,
                padding,
            } => {
                b.xor_addr(attr::XOR_MAPPED_ADDRESS, tuple.client)
                    .addr(attr::RESPONSE_ORIGIN, origin)
                    .addr(attr::OTHER_ADDRESS, other);
                if padding > 0 {
                    b.attr(attr::PADDING, &[0u8; MAX_PADDING][..padding as usize]);
                }
            }
        }
        // RFC 8016: a ticket goes with a success only.
        if let Some(t) = self.ticket_out.take() {
            if class == Class::Success {
                b.attr(attr::MOBILITY_TICKET, &t);
            }
        }
        // A challenge is sized against its request (challenge.rs).
        if let (Some(s), None) = (&self.cfg.software, &nonce) {
            b.attr(attr::SOFTWARE, s.as_bytes());
        }
        match signer {
            Some((k, true)) => {
                b.message_integrity_sha256(k.as_bytes());
            }
            Some((k, false)) => {
                b.message_integrity(k.as_bytes());
            }
            None => {}
        }
        if req.fingerprint {
            b.fingerprint();
        }
        Transmit {
            dest: Dest::Client(tuple),
            data: &self.out,
        }
    }
}
