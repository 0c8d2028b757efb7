//! CreatePermission (RFC 8656 §9) and ChannelBind (§12.2), and the peer
//! checks both make: family (443) and peer policy (403,
//! `docs/conformance/peer-policy.md`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use stun_proto::{attr, Message};

use super::error::ErrorCode;
use super::events::Event;
use super::events::RefusalDetail;
use super::io::FiveTuple;
use super::respond::Reply;
use super::table::{ChannelBinding, Families};
use super::Server;

impl Server {
    /// The peer policy, plus this host's own relayed addresses: another
    /// allocation's relay on this server is a peer even in a range refused
    /// by default (a private or loopback relay address). An operator's
    /// deny-peer, the server's listeners and Teredo stay refused.
    pub(super) fn peer_policy(
        cfg: &super::Config,
        shared: &super::Shared,
        peer: SocketAddr,
    ) -> Result<(), crate::policy::Refusal> {
        match cfg.policy.check(peer) {
            Err(crate::policy::Refusal::DefaultDenied(_))
                if shared.relayed.contains(&SocketAddr::new(
                    crate::policy::canonicalize(peer.ip()),
                    peer.port(),
                )) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    /// Checks one peer for CreatePermission/ChannelBind: family (443) then
    /// policy (403, logged).
    pub(super) fn check_peer(
        &mut self,
        tuple: FiveTuple,
        a_families: Families,
        username: &Arc<str>,
        peer: SocketAddr,
    ) -> Result<(), ErrorCode> {
        if !a_families.relays_to(peer) {
            return Err(ErrorCode::PeerAddressFamilyMismatch);
        }
        if let Err(reason) = Self::peer_policy(&self.cfg, &self.shared, peer) {
            self.refusal = Some(RefusalDetail::Peer(peer, reason));
            self.counters.peers_refused += 1;
            self.events.push_back(Event::PeerRefused {
                tuple,
                username: username.clone(),
                peer,
                reason,
            });
            return Err(ErrorCode::Forbidden);
        }
        Ok(())
    }

    /// The live allocation a CreatePermission or ChannelBind names (437
    /// without one), with the families it relays and its username.
    fn peer_context(
        &mut self,
        existing: Option<u32>,
        now: Instant,
    ) -> Result<(u32, Families, Arc<str>), Reply> {
        let a = existing
            .and_then(|idx| self.table.get_live(idx, now).map(|a| (idx, a)))
            .ok_or(Reply::Error(ErrorCode::AllocationMismatch));
        let (idx, a) = a?;
        Ok((idx, Families::of(a), a.username.clone()))
    }

    /// RFC 8656 §9.2: every XOR-PEER-ADDRESS is checked before any is installed.
    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        existing: Option<u32>,
    ) -> Reply {
        let (idx, a_families, username) = match self.peer_context(existing, now) {
            Ok(c) => c,
            Err(r) => return r,
        };
        let mut peers: [Option<IpAddr>; 16] = [None; 16];
        let mut n = 0;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let Ok(peer) = msg.decode_xor_addr(v) else {
                return self.refuse(
                    ErrorCode::BadRequest,
                    RefusalDetail::Malformed("XOR-PEER-ADDRESS"),
                );
            };
            if let Err(code) = self.check_peer(tuple, a_families, &username, peer) {
                return Reply::Error(code);
            }
            if n == peers.len() {
                return self.refuse(
                    ErrorCode::BadRequest,
                    RefusalDetail::Rule("more than 16 XOR-PEER-ADDRESS in one CreatePermission"),
                );
            }
            peers[n] = Some(peer.ip());
            n += 1;
        }
        if n == 0 {
            return self.refuse(ErrorCode::BadRequest, RefusalDetail::Missing("XOR-PEER-ADDRESS"));
        }
        let expires = now + self.cfg.permission_lifetime;
        let max = self.cfg.max_permissions;
        let Some(a) = self.table.get_live(idx, now) else {
            return Reply::Error(ErrorCode::AllocationMismatch);
        };
        a.purge(now);
        let new = peers[..n]
            .iter()
            .flatten()
            .filter(|ip| !a.permissions.iter().any(|p| p.ip == **ip))
            .count();
        if a.permissions.len() + new > max {
            return Reply::Error(ErrorCode::InsufficientCapacity);
        }
        for ip in peers[..n].iter().flatten() {
            a.install_permission(*ip, expires);
        }
        Reply::Ok
    }

    /// RFC 8656 §12.2 (ChannelBind).
    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        existing: Option<u32>,
    ) -> Reply {
        let (idx, a_families, username) = match self.peer_context(existing, now) {
            Ok(c) => c,
            Err(r) => return r,
        };
        if self.table.get(idx).is_some_and(|a| a.tcp) {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::Rule("no channels on a TCP allocation (RFC 6062 §5)"),
            );
        }
        let (Some(ch), Some(peer)) = (
            msg.get(attr::CHANNEL_NUMBER),
            msg.get_xor_addr(attr::XOR_PEER_ADDRESS),
        ) else {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::Missing("CHANNEL-NUMBER or XOR-PEER-ADDRESS"),
            );
        };
        if ch.len() != 4 {
            return self.refuse(ErrorCode::BadRequest, RefusalDetail::Malformed("CHANNEL-NUMBER"));
        }
        let number = u16::from_be_bytes([ch[0], ch[1]]);
        let top = if self.cfg.legacy_channel_numbers {
            0x7FFF
        } else {
            0x4FFF
        };
        // RFC 8656 §12: 0x4000-0x4FFF (RFC 5766 allowed up to 0x7FFF).
        if !(0x4000..=top).contains(&number) {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::ChannelOutOfRange {
                    number,
                    legacy: self.cfg.legacy_channel_numbers,
                },
            );
        }
        let Ok(peer) = peer else {
            return self.refuse(
                ErrorCode::BadRequest,
                RefusalDetail::Malformed("XOR-PEER-ADDRESS"),
            );
        };
        if let Err(code) = self.check_peer(tuple, a_families, &username, peer) {
            return Reply::Error(code);
        }
        let (ch_exp, perm_exp) = (
            now + self.cfg.channel_lifetime,
            now + self.cfg.permission_lifetime,
        );
        let (max_ch, max_perm) = (self.cfg.max_channels, self.cfg.max_permissions);
        let Some(a) = self.table.get_live(idx, now) else {
            return Reply::Error(ErrorCode::AllocationMismatch);
        };
        a.purge(now);
        // A number bound to another peer, or a peer bound to another number,
        // is a conflict (RFC 8656 §11.2), including during the cool-down.
        if a.channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer))
        {
            return self.refuse(ErrorCode::BadRequest, RefusalDetail::ChannelConflict { number });
        }
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = ch_exp,
            None => {
                if a.channels.len() >= max_ch {
                    return Reply::Error(ErrorCode::InsufficientCapacity);
                }
                if !a.permissions.iter().any(|p| p.ip == peer.ip()) && a.permissions.len() >= max_perm {
                    return Reply::Error(ErrorCode::InsufficientCapacity);
                }
                a.channels.push(ChannelBinding {
                    number,
                    peer,
                    expires: ch_exp,
                });
            }
        }
        a.install_permission(peer.ip(), perm_exp);
        Reply::Ok
    }
}
