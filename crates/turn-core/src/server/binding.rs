//! Binding (RFC 8489 §6.3.1) and NAT behaviour discovery (RFC 5780 §6.1).

use std::net::SocketAddr;
use std::time::Instant;

use stun_proto::{attr, Message};

use super::config::Rfc5780;
use super::error::ErrorCode;
use super::io::{Dest, FiveTuple, Transmit, Transport};
use super::respond::{unknown_required_with, Reply, ReqInfo, MAX_PADDING, RFC5780_ATTRS};
use super::Server;

impl Server {
    /// An unauthenticated answer: limited per source against reflection.
    pub(super) fn binding<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
    ) -> Option<Transmit<'a>> {
        if !self.may_answer_unauthenticated(tuple, now) {
            return None;
        }
        let req = ReqInfo::of(msg);
        // RFC 8489 §6.3.1: 420 for unknown comprehension-required
        // attributes; the RFC 5780 ones are known only when it is on.
        let extra: &[u16] = if self.cfg.rfc5780.is_some() {
            RFC5780_ATTRS
        } else {
            &[]
        };
        if let Some((list, n)) = unknown_required_with(msg, extra) {
            return Some(self.respond(now, tuple, req, Reply::Unknown(list, n), None));
        }
        if let Some(r) = self.cfg.rfc5780 {
            return Some(self.binding_5780(now, tuple, msg, r));
        }
        Some(self.respond(now, tuple, req, Reply::Ok, None))
    }

    /// RFC 5780 §6.1: a Binding answered with RESPONSE-ORIGIN (the address
    /// the answer really leaves from) and OTHER-ADDRESS, from the socket
    /// CHANGE-REQUEST asks for, to the port RESPONSE-PORT asks for.
    fn binding_5780(
        &mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'_>,
        r: Rfc5780,
    ) -> Transmit<'_> {
        let req = ReqInfo::of(msg);
        let bad = Reply::Error(ErrorCode::BadRequest);
        let local = tuple.server;
        let other = SocketAddr::new(r.other_ip(local.ip()), r.other_port(local.port()));
        let (mut change_ip, mut change_port) = (false, false);
        if let Some(v) = msg.get(attr::CHANGE_REQUEST) {
            let Ok(v) = <[u8; 4]>::try_from(v) else {
                return self.respond(now, tuple, req, bad, None);
            };
            change_ip = v[3] & 0x04 != 0;
            change_port = v[3] & 0x02 != 0;
        }
        let response_port = match msg.get(attr::RESPONSE_PORT) {
            None => None,
            Some(v) if v.len() == 4 => Some(u16::from_be_bytes([v[0], v[1]])),
            Some(_) => return self.respond(now, tuple, req, bad, None),
        };
        if tuple.transport != Transport::Udp && (change_ip || change_port || response_port.is_some()) {
            // A stream cannot be answered from another address or port.
            return self.respond(now, tuple, req, bad, None);
        }
        let origin = SocketAddr::new(
            if change_ip { other.ip() } else { local.ip() },
            if change_port { other.port() } else { local.port() },
        );
        let padding = msg
            .get(attr::PADDING)
            .map(|p| p.len().min(MAX_PADDING) as u16)
            .unwrap_or(0);
        let to = SocketAddr::new(tuple.client.ip(), response_port.unwrap_or(tuple.client.port()));
        let mut t = self.respond(
            now,
            tuple,
            req,
            Reply::Binding5780 {
                origin,
                other,
                padding,
            },
            None,
        );
        if origin != local || to != tuple.client {
            t.dest = Dest::Via { local: origin, to };
        }
        t
    }

    /// The per-source budget for answers to unauthenticated requests
    /// (reflection), shared by every worker; counts what it refuses.
    pub(super) fn may_answer_unauthenticated(&mut self, tuple: FiveTuple, now: Instant) -> bool {
        let ok = self.shared.source_limiter.allow(tuple.client.ip(), now);
        if !ok {
            self.counters.rate_limited += 1;
        }
        ok
    }
}
