//! Relaying (RFC 8656 §11 Send/Data, §12 ChannelData, §11.5 ICMP) and the
//! bandwidth caps every relayed packet passes.

use std::net::SocketAddr;
use std::time::Instant;

use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType, TransactionId};

use super::config::Config;
use super::events::{Counters, Event};
use super::io::{Dest, FiveTuple, Transmit};
use super::table::Allocation;
use super::Server;

/// Transaction ids of Data indications need not be random (the client does
/// not match them to anything); a counter avoids an RNG call per packet.
pub(super) fn data_indication_txid(seed: u64) -> TransactionId {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&seed.to_le_bytes());
    t
}

impl Server {
    /// RFC 8656 §11.2: a Send indication relays DATA to XOR-PEER-ADDRESS
    /// through the relay of the peer's family, if a permission exists;
    /// anything wrong drops it silently.
    pub(super) fn handle_send<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        msg: &Message<'a>,
    ) -> Option<Transmit<'a>> {
        let peer = msg.get_xor_addr(attr::XOR_PEER_ADDRESS)?.ok()?;
        let data = msg.get(attr::DATA)?;
        let (_, a) = self.table.live_by_tuple(&tuple, now)?;
        if a.tcp {
            // RFC 6062: a TCP allocation reaches peers by connections only.
            return None;
        }
        let relay = a.relay_for(peer, now)?.bound;
        if let Err(reason) = Self::peer_policy(&self.cfg, &self.shared, peer) {
            self.counters.peers_refused += 1;
            self.events.push_back(Event::PeerRefused {
                tuple,
                username: a.username.clone(),
                peer,
                reason,
            });
            return None;
        }
        let dest = toward_peer(&self.cfg, &mut self.counters, a, now, (relay, peer), data.len())?;
        Some(Transmit { dest, data })
    }

    /// RFC 8656 §12.6: ChannelData from the client goes to the bound peer,
    /// without a copy. Unknown channel, expired binding or allocation, or no
    /// permission: dropped. ChannelData never refreshes a permission.
    pub(super) fn handle_channel_data<'a>(
        &'a mut self,
        now: Instant,
        tuple: FiveTuple,
        data: &'a [u8],
    ) -> Option<Transmit<'a>> {
        let cd = ChannelData::parse(data)?;
        let (_, a) = self.table.live_by_tuple(&tuple, now)?;
        let peer = a
            .channels
            .iter()
            .find(|c| c.number == cd.channel && c.expires > now)?
            .peer;
        let relay = a.relay_for(peer, now)?.bound;
        let dest = toward_peer(
            &self.cfg,
            &mut self.counters,
            a,
            now,
            (relay, peer),
            cd.data.len(),
        )?;
        Some(Transmit { dest, data: cd.data })
    }

    /// Processes a datagram a relay socket received from `peer`
    /// (RFC 8656 §11.3, §12.7): with a permission it goes to the client as
    /// ChannelData when a channel is bound to the peer, else as a Data
    /// indication; without one it is dropped.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
    ) -> Option<Transmit<'_>> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        let dest = self.handle_peer_into(now, relay, peer, data, &mut out);
        self.out = out;
        Some(Transmit {
            dest: dest?,
            data: &self.out,
        })
    }

    /// [`Server::handle_peer`], appending the datagram for the client to
    /// `out` instead of an internal buffer, so a runtime that batches its
    /// sends copies the payload once, straight into its send queue. Returns
    /// where the appended bytes go; on `None` nothing was appended.
    pub fn handle_peer_into(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<Dest> {
        let &idx = self.table.by_relay.get(&relay)?;
        let a = self.table.get_live(idx, now)?;
        if !a.has_permission(peer.ip(), now) || data.len() > u16::MAX as usize {
            return None;
        }
        if !admit_relayed(&self.cfg, &mut self.counters, a, now, data.len(), false) {
            return None;
        }
        let tuple = a.tuple;
        if let Some(c) = a.channels.iter().find(|c| c.peer == peer && c.expires > now) {
            out.extend_from_slice(&ChannelData::header(c.number, data.len() as u16));
            out.extend_from_slice(data);
            if tuple.transport.is_stream() {
                // RFC 8656 §12.5: over TCP/TLS, pad to a multiple of four.
                let pad = (4 - data.len() % 4) % 4;
                out.extend_from_slice(&[0u8; 3][..pad]);
            }
        } else {
            self.data_seq = self.data_seq.wrapping_add(1);
            let txid = data_indication_txid(self.data_seq);
            let mut b = MessageBuilder::append(out, MessageType::new(method::DATA, Class::Indication), &txid);
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer).attr(attr::DATA, data);
        }
        Some(Dest::Client(tuple))
    }

    /// RFC 8656 §11.5: an ICMP error the relay socket at `relay` received
    /// for a datagram it sent to `peer` goes to the client as a Data
    /// indication with XOR-PEER-ADDRESS and ICMP (no DATA), if the peer has
    /// a permission; at most [`Config::icmp_per_second`] per allocation.
    pub fn handle_icmp(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        icmp_type: u8,
        icmp_code: u8,
        error_data: u32,
    ) -> Option<Transmit<'_>> {
        let &idx = self.table.by_relay.get(&relay)?;
        let rate = self.cfg.icmp_per_second as u64;
        let a = self.table.get_live(idx, now)?;
        if !a.has_permission(peer.ip(), now) || rate == 0 || !a.icmp.take(now, rate, rate, 1) {
            self.counters.icmp_dropped += 1;
            return None;
        }
        let tuple = a.tuple;
        self.counters.icmp_relayed += 1;
        self.data_seq = self.data_seq.wrapping_add(1);
        let txid = data_indication_txid(self.data_seq);
        let mut b = MessageBuilder::new(
            &mut self.out,
            MessageType::new(method::DATA, Class::Indication),
            &txid,
        );
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer)
            .icmp(icmp_type, icmp_code, error_data);
        Some(Transmit {
            dest: Dest::Client(tuple),
            data: &self.out,
        })
    }
}

/// The client-to-peer rule both Send and ChannelData follow: a live
/// permission for the peer's IP (RFC 8656 §9), then the bandwidth caps.
fn toward_peer(
    cfg: &Config,
    counters: &mut Counters,
    a: &mut Allocation,
    now: Instant,
    (relay, peer): (SocketAddr, SocketAddr),
    len: usize,
) -> Option<Dest> {
    if !a.has_permission(peer.ip(), now) || !admit_relayed(cfg, counters, a, now, len, true) {
        return None;
    }
    Some(Dest::Peer { relay, peer })
}

/// Admits one relayed packet: checks the per-allocation and per-user
/// bandwidth caps (a packet over either is dropped and counted; both
/// buckets hold one second of traffic), then counts it in the allocation's
/// stats. Every relay path goes through here.
fn admit_relayed(
    cfg: &Config,
    counters: &mut Counters,
    a: &mut Allocation,
    now: Instant,
    len: usize,
    up: bool,
) -> bool {
    let len = len as u64;
    if cfg.max_bps != 0 {
        let b = if up { &mut a.bw_up } else { &mut a.bw_down };
        if !b.take(now, cfg.max_bps, cfg.max_bps, len) {
            counters.bandwidth_dropped += 1;
            return false;
        }
    }
    if cfg.user_max_bps != 0 {
        // The user's buckets are the host's (every worker's allocations
        // of the user spend from them): one uncontended lock per packet
        // while the cap is on.
        let mut u = a.user_bw.lock();
        if !u[usize::from(!up)].take(now, cfg.user_max_bps, cfg.user_max_bps, len) {
            counters.bandwidth_dropped += 1;
            return false;
        }
    }
    if up {
        a.stats.to_peer_packets += 1;
        a.stats.to_peer_bytes += len;
    } else {
        a.stats.from_peer_packets += 1;
        a.stats.from_peer_bytes += len;
    }
    true
}
