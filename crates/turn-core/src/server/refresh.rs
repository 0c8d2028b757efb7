//! Refresh (RFC 8656 §7.3): lifetimes, deletion, and one family of a dual
//! allocation at a time with REQUESTED-ADDRESS-FAMILY; with a mobility
//! ticket, RFC 8016 §3.2 (`mobility.rs`).

use super::events::RefusalDetail;
use std::time::Instant;

use stun_proto::{attr, Message};

use super::auth_check::Authenticated;
use super::error::ErrorCode;
use super::events::CloseReason;
use super::io::Command;
use super::io::FiveTuple;
use super::respond::Reply;
use super::Server;

impl Server {
    /// `existing` is the allocation of the request's 5-tuple; a Refresh
    /// with a mobility ticket from a 5-tuple without one may move the
    /// ticket's allocation here (RFC 8016 §3.2), which then becomes it.
    pub(super) fn refresh(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
        existing: &mut Option<u32>,
    ) -> Reply {
        let ticket = msg.get(attr::MOBILITY_TICKET);
        match (ticket, *existing) {
            (Some(t), None) if !t.is_empty() => {
                match self.move_by_ticket(now, tuple, t, msg.as_bytes(), auth) {
                    Ok(idx) => *existing = Some(idx),
                    Err(reply) => return reply,
                }
            }
            (Some(_), Some(idx)) if self.table.get(idx).is_some_and(|a| a.mobility.moves().is_none()) => {
                return self.refuse(
                    ErrorCode::MobilityForbidden,
                    RefusalDetail::Rule("the allocation was made without MOBILITY-TICKET (RFC 8016)"),
                );
            }
            _ => {}
        }
        let Some(idx) = *existing else {
            return Reply::Error(ErrorCode::AllocationMismatch);
        };
        let family = match msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(v) if v.len() != 4 => {
                return self.refuse(ErrorCode::BadRequest, RefusalDetail::Malformed("LIFETIME"))
            }
            Some(v) if v[0] == attr::FAMILY_IPV4 => Some(0),
            Some(v) if v[0] == attr::FAMILY_IPV6 => Some(1),
            Some(_) => return Reply::Error(ErrorCode::AddressFamilyNotSupported),
        };
        let requested = msg.get_u32(attr::LIFETIME);
        let lifetime = self.lifetime(requested);
        let Some(a) = self.table.get_live(idx, now) else {
            return Reply::Error(ErrorCode::AllocationMismatch);
        };
        // §7.3: a family the allocation does not hold is a mismatch.
        if family.is_some_and(|f| a.relays[f].is_none()) {
            return Reply::Error(ErrorCode::PeerAddressFamilyMismatch);
        }
        if requested == Some(0) {
            let families = a.relays.iter().flatten().count();
            match family {
                // One family of a dual allocation goes; the other stays.
                Some(f) if families > 1 => {
                    if let Some(r) = a.relays[f].take() {
                        a.recompute_expiry();
                        self.table.remove_relay(&r.bound);
                        self.commands.push_back(Command::CloseRelay { relay: r.bound });
                    }
                }
                _ => self.delete(idx, now, CloseReason::Deleted),
            }
            return Reply::RefreshOk { lifetime: 0 };
        }
        for (f, r) in a.relays.iter_mut().enumerate() {
            if let Some(r) = r {
                if family.is_none_or(|want| want == f) {
                    r.expires = now + lifetime;
                }
            }
        }
        a.recompute_expiry();
        a.purge(now);
        self.table.schedule(now + lifetime, idx);
        if ticket.is_some() {
            // §3.2: every Refresh with a ticket gets a fresh one.
            self.issue_ticket(idx, now);
        }
        Reply::RefreshOk {
            lifetime: lifetime.as_secs() as u32,
        }
    }
}
