//! RFC 8016 mobility: a client whose address changes keeps its allocation.
//! An Allocate with an empty MOBILITY-TICKET gets a ticket (§3.1); a
//! Refresh on the allocation renews it; a Refresh from another 5-tuple
//! with a valid ticket moves the allocation there (§3.2), permissions,
//! channels and relayed addresses kept, and gets a new ticket.
//!
//! A ticket is opaque to the client: ChaCha20-Poly1305 under a key derived
//! from the nonce secret (so every worker reads every worker's tickets and
//! a binary upgrade keeps them valid), over the allocation's relayed
//! address and creating transaction id (which name it), its owner, when
//! the ticket was issued and how many moves the allocation had made. What
//! it prevents:
//! - another user's ticket (coturn's hijack: user B presenting A's ticket
//!   from B's address): the Refresh is authenticated as usual, and a user
//!   other than the ticket's gets 441, moving nothing;
//! - a replay: a ticket names the move count it was issued at, and a move
//!   increments it, so a ticket that moved the allocation once is spent
//!   (400), as is any older one;
//! - forgery or damage: the AEAD tag fails (400);
//! - an old ticket: one issued longer ago than the longest allocation
//!   lifetime is refused (400): the allocation would have needed a
//!   Refresh, which gives a new ticket.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use hmac::{Hmac, Mac};
use stun_proto::{attr, Message};

use super::auth_check::Authenticated;
use super::error::ErrorCode;
use super::events::{Event, RefusalDetail};
use super::io::{Command, FiveTuple, Transport};
use super::respond::Reply;
use super::Server;

/// The ticket format this build writes and reads.
const TICKET_VERSION: u8 = 1;

/// What a ticket says, once opened.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ticket {
    /// The worker that holds the allocation (its CONNECTION-ID tag).
    worker: u8,
    relay: SocketAddr,
    txid: [u8; 12],
    moves: u16,
    issued_ms: u64,
    username: String,
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// The ticket key: derived from the nonce secret, never the secret itself.
fn key(secret: &[u8; 32]) -> ChaCha20Poly1305 {
    let k = hmac_sha256(secret, &[b"turnpike RFC 8016 mobility ticket key"]);
    ChaCha20Poly1305::new((&k).into())
}

impl Ticket {
    fn plain(&self) -> Vec<u8> {
        let mut p = vec![TICKET_VERSION, self.worker];
        match self.relay.ip() {
            IpAddr::V4(ip) => {
                p.push(4);
                p.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                p.push(6);
                p.extend_from_slice(&ip.octets());
            }
        }
        p.extend_from_slice(&self.relay.port().to_be_bytes());
        p.extend_from_slice(&self.txid);
        p.extend_from_slice(&self.moves.to_be_bytes());
        p.extend_from_slice(&self.issued_ms.to_be_bytes());
        p.extend_from_slice(self.username.as_bytes());
        p
    }

    fn parse(p: &[u8]) -> Option<Ticket> {
        let (&version, rest) = p.split_first()?;
        if version != TICKET_VERSION {
            return None;
        }
        let (&worker, rest) = rest.split_first()?;
        let (&family, rest) = rest.split_first()?;
        let (ip, rest): (IpAddr, &[u8]) = match family {
            4 => {
                let (a, r) = rest.split_first_chunk::<4>()?;
                ((*a).into(), r)
            }
            6 => {
                let (a, r) = rest.split_first_chunk::<16>()?;
                ((*a).into(), r)
            }
            _ => return None,
        };
        let (port, rest) = rest.split_first_chunk::<2>()?;
        let (txid, rest) = rest.split_first_chunk::<12>()?;
        let (moves, rest) = rest.split_first_chunk::<2>()?;
        let (issued, rest) = rest.split_first_chunk::<8>()?;
        Some(Ticket {
            worker,
            relay: SocketAddr::new(ip, u16::from_be_bytes(*port)),
            txid: *txid,
            moves: u16::from_be_bytes(*moves),
            issued_ms: u64::from_be_bytes(*issued),
            username: String::from_utf8(rest.to_vec()).ok()?,
        })
    }
}

impl Server {
    fn since_epoch_ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.cfg.epoch).as_millis() as u64
    }

    /// A ticket for allocation `idx` as it stands, to go in this answer.
    pub(super) fn issue_ticket(&mut self, idx: u32, now: Instant) {
        let Some(a) = self.table.get(idx) else { return };
        let (Some(moves), Some(relay)) = (a.mobility.moves(), a.relays.iter().flatten().next()) else {
            return;
        };
        let t = Ticket {
            worker: self.cfg.connection_id_tag,
            relay: relay.bound,
            txid: a.txid,
            moves,
            issued_ms: self.since_epoch_ms(now),
            username: a.username.to_string(),
        };
        // An AEAD nonce must never repeat under one key: this worker's tag
        // and a counter that only grows (carried across a binary upgrade
        // in the snapshot), hashed so it says nothing of either.
        self.data_seq = self.data_seq.wrapping_add(1);
        let n = hmac_sha256(
            &self.cfg.nonce_secret,
            &[
                b"ticket nonce",
                &[self.cfg.connection_id_tag],
                &self.data_seq.to_be_bytes(),
            ],
        );
        let mut nonce = [0u8; 12];
        nonce.copy_from_slice(&n[..12]);
        let Ok(sealed) = key(&self.cfg.nonce_secret).encrypt(Nonce::from_slice(&nonce), t.plain().as_slice())
        else {
            return;
        };
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        self.ticket_out = Some(out);
    }

    fn open_ticket(&self, sealed: &[u8]) -> Option<Ticket> {
        if sealed.len() < 12 + 16 {
            return None;
        }
        let (nonce, body) = sealed.split_at(12);
        let plain = key(&self.cfg.nonce_secret)
            .decrypt(Nonce::from_slice(nonce), body)
            .ok()?;
        Ticket::parse(&plain)
    }

    /// An Allocate's MOBILITY-TICKET (§3.1): allowed only when mobility is
    /// on, for a UDP relay over UDP.
    pub(super) fn mobility_refused(
        &mut self,
        tuple: FiveTuple,
        msg: &Message<'_>,
        tcp: bool,
    ) -> Option<Reply> {
        if !msg.has(attr::MOBILITY_TICKET) {
            return None;
        }
        if !self.cfg.mobility || tuple.transport != Transport::Udp || tcp {
            return Some(self.refuse(
                ErrorCode::MobilityForbidden,
                RefusalDetail::Rule(if self.cfg.mobility {
                    "mobility is for UDP allocations over UDP (RFC 8016)"
                } else {
                    "mobility is off (--mobility)"
                }),
            ));
        }
        None
    }

    /// A Refresh with MOBILITY-TICKET from a 5-tuple with no allocation
    /// (§3.2): the ticket's allocation moves here if the ticket is good
    /// and the request's user is its owner. `Ok(idx)`: moved; the caller
    /// refreshes it and a new ticket goes in the answer.
    pub(super) fn move_by_ticket(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        sealed: &[u8],
        request: &[u8],
        auth: &Authenticated,
    ) -> Result<u32, Reply> {
        let bad = |s: &mut Server, why: &'static str| {
            Err(s.refuse(ErrorCode::BadRequest, RefusalDetail::Rule(why)))
        };
        if !self.cfg.mobility || tuple.transport != Transport::Udp {
            return Err(self.refuse(
                ErrorCode::MobilityForbidden,
                RefusalDetail::Rule("mobility is off, or not over this transport (RFC 8016)"),
            ));
        }
        let Some(t) = self.open_ticket(sealed) else {
            return bad(self, "a mobility ticket this server did not issue (RFC 8016)");
        };
        // §3.2: the same user, re-authenticated; another's ticket is the
        // hijack coturn allowed.
        if t.username != auth.username.as_str() {
            return Err(self.refuse(
                ErrorCode::WrongCredentials,
                RefusalDetail::Rule("a mobility ticket of another user (RFC 8016)"),
            ));
        }
        let max_age = self.cfg.max_lifetime.as_millis() as u64;
        if self.since_epoch_ms(now).saturating_sub(t.issued_ms) > max_age {
            return bad(self, "an expired mobility ticket (RFC 8016)");
        }
        if t.worker != self.cfg.connection_id_tag {
            // Another worker holds it: the request goes there, unanswered
            // here (the answer comes with the allocation).
            self.commands.push_back(Command::MobilityElsewhere {
                worker: t.worker,
                tuple,
                request: request.to_vec(),
            });
            return Err(Reply::Deferred);
        }
        let Some(&idx) = self.table.by_relay.get(&t.relay) else {
            return Err(Reply::Error(ErrorCode::AllocationMismatch));
        };
        let Some(a) = self.table.get_live(idx, now) else {
            return Err(Reply::Error(ErrorCode::AllocationMismatch));
        };
        if a.txid != t.txid || *a.username != *t.username {
            // The relayed address now belongs to another allocation.
            return Err(Reply::Error(ErrorCode::AllocationMismatch));
        }
        if a.mobility.moves() != Some(t.moves) {
            return bad(self, "a spent or replayed mobility ticket (RFC 8016)");
        }
        if a.tuple.transport != Transport::Udp {
            return Err(Reply::Error(ErrorCode::MobilityForbidden));
        }
        let from = a.tuple;
        a.mobility = a.mobility.moved();
        let channels: Vec<u16> = a.channels.iter().map(|c| c.number).collect();
        // The kernel's entries name the old 5-tuple: they go, and the
        // refresh re-installs them under the new one.
        self.remove_fast_path(from, &channels);
        self.table.retuple(idx, tuple);
        self.events.push_back(Event::AllocationMoved {
            from,
            to: tuple,
            username: t.username.as_str().into(),
        });
        Ok(idx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_reads_back_and_garbage_does_not() {
        let t = Ticket {
            worker: 1,
            relay: "[2001:db8::1]:50000".parse().unwrap(),
            txid: [7; 12],
            moves: 3,
            issued_ms: 123_456,
            username: "alice@example".into(),
        };
        assert_eq!(Ticket::parse(&t.plain()), Some(t.clone()));
        let mut p = t.plain();
        p[0] = 2;
        assert_eq!(Ticket::parse(&p), None, "another version");
        assert_eq!(Ticket::parse(&t.plain()[..20]), None, "cut short");
    }
}
