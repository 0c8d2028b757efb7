//! Refresh (RFC 8656 §7.3): lifetimes, deletion, and one family of a dual
//! allocation at a time with REQUESTED-ADDRESS-FAMILY.

use super::events::RefusalDetail;
use std::cmp::Reverse;
use std::time::Instant;

use stun_proto::{attr, Message};

use super::error::ErrorCode;
use super::events::CloseReason;
use super::io::Command;
use super::respond::Reply;
use super::Server;

impl Server {
    pub(super) fn refresh(&mut self, now: Instant, msg: &Message<'_>, existing: Option<u32>) -> Reply {
        let Some(idx) = existing else {
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
        self.table.timers.push(Reverse((now + lifetime, idx)));
        Reply::RefreshOk {
            lifetime: lifetime.as_secs() as u32,
        }
    }
}
