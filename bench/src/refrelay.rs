//! A protocol-free reference TURN relay, for benchmarks only.
//!
//! It answers Allocate, ChannelBind, CreatePermission and Refresh at once,
//! without authentication, checks or timers, and forwards ChannelData and
//! Send/Data with one table lookup per packet and the very batched syscalls
//! turnpike uses (turnpike's own `udp-io` crate: `recvmmsg` in, one `sendmmsg`
//! per socket out with GSO runs, flushed once per event-loop pass). What it
//! reaches is the kernel's limit for that pattern; the gap to it is what
//! turnpike's protocol work costs. Never expose it: it is an open relay.
//!
//!     refrelay 127.0.0.1:3480
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;

use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType, PacketKind};
use udp_io::{Datagram, RecvBatch, SendQueue, BATCH};

struct Alloc {
    relay: UdpSocket,
    relay_addr: SocketAddr,
    client: SocketAddr,
    channels: HashMap<u16, SocketAddr>,
    by_peer: HashMap<SocketAddr, u16>,
}

const LISTENER: Token = Token(usize::MAX);

fn main() -> io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3480".into())
        .parse()
        .map_err(|_| io::Error::other("usage: refrelay IP:PORT"))?;
    let mut poll = Poll::new()?;
    let mut listener = UdpSocket::bind(addr)?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut allocs: Vec<Alloc> = Vec::new();
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut batch = RecvBatch::new();
    let mut q = SendQueue::new(true);
    let mut events = Events::with_capacity(1024);
    eprintln!("refrelay on {addr}: open relay for benchmarks only");
    loop {
        poll.poll(&mut events, None)?;
        for ev in events.iter() {
            if ev.token() == LISTENER {
                loop {
                    let n = batch.recv(&listener).unwrap_or(0);
                    for k in 0..n {
                        let Some(Datagram { from, data: pkt, .. }) = batch.get(k) else {
                            continue;
                        };
                        match stun_proto::packet_kind(pkt) {
                            PacketKind::ChannelData => {
                                let (Some(cd), Some(&i)) = (ChannelData::parse(pkt), by_client.get(&from))
                                else {
                                    continue;
                                };
                                if let Some(peer) = allocs[i].channels.get(&cd.channel) {
                                    q.push(&allocs[i].relay, None, *peer, cd.data);
                                }
                            }
                            PacketKind::Stun => {
                                let Ok(m) = Message::parse(pkt) else { continue };
                                let t = m.message_type();
                                if t == MessageType::new(method::SEND, Class::Indication) {
                                    if let (Some(&i), Some(Ok(peer)), Some(data)) = (
                                        by_client.get(&from),
                                        m.get_xor_addr(attr::XOR_PEER_ADDRESS),
                                        m.get(attr::DATA),
                                    ) {
                                        q.push(&allocs[i].relay, None, peer, data);
                                    }
                                    continue;
                                }
                                if t.class != Class::Request {
                                    continue;
                                }
                                if t.method == method::ALLOCATE && !by_client.contains_key(&from) {
                                    let mut relay = UdpSocket::bind(SocketAddr::new(addr.ip(), 0))?;
                                    let relay_addr = relay.local_addr()?;
                                    poll.registry().register(
                                        &mut relay,
                                        Token(allocs.len()),
                                        Interest::READABLE,
                                    )?;
                                    allocs.push(Alloc {
                                        relay,
                                        relay_addr,
                                        client: from,
                                        channels: HashMap::new(),
                                        by_peer: HashMap::new(),
                                    });
                                    by_client.insert(from, allocs.len() - 1);
                                }
                                let out = q.buffer();
                                let start = out.len();
                                let mut b = MessageBuilder::append(
                                    out,
                                    MessageType::new(t.method, Class::Success),
                                    &m.transaction_id(),
                                );
                                match t.method {
                                    method::ALLOCATE => {
                                        if let Some(&i) = by_client.get(&from) {
                                            b.xor_addr(attr::XOR_RELAYED_ADDRESS, allocs[i].relay_addr)
                                                .u32(attr::LIFETIME, 600)
                                                .xor_addr(attr::XOR_MAPPED_ADDRESS, from);
                                        }
                                    }
                                    method::CHANNEL_BIND => {
                                        if let (Some(&i), Some(ch), Some(Ok(peer))) = (
                                            by_client.get(&from),
                                            m.get(attr::CHANNEL_NUMBER),
                                            m.get_xor_addr(attr::XOR_PEER_ADDRESS),
                                        ) {
                                            if ch.len() >= 2 {
                                                let n = u16::from_be_bytes([ch[0], ch[1]]);
                                                allocs[i].channels.insert(n, peer);
                                                allocs[i].by_peer.insert(peer, n);
                                            }
                                        }
                                    }
                                    method::BINDING => {
                                        b.xor_addr(attr::XOR_MAPPED_ADDRESS, from);
                                    }
                                    method::REFRESH => {
                                        // Allocations are never freed: the process is short-lived.
                                        b.u32(attr::LIFETIME, m.get_u32(attr::LIFETIME).unwrap_or(600));
                                    }
                                    _ => {}
                                }
                                q.commit(&listener, None, from, start);
                            }
                            PacketKind::Other => {}
                        }
                    }
                    if n < BATCH {
                        break;
                    }
                }
            } else {
                let i = ev.token().0;
                loop {
                    let n = batch.recv(&allocs[i].relay).unwrap_or(0);
                    let a = &allocs[i];
                    for k in 0..n {
                        let Some(Datagram { from: peer, data, .. }) = batch.get(k) else {
                            continue;
                        };
                        let out = q.buffer();
                        let start = out.len();
                        if let Some(&ch) = a.by_peer.get(&peer) {
                            out.extend_from_slice(&ChannelData::header(ch, data.len() as u16));
                            out.extend_from_slice(data);
                        } else {
                            MessageBuilder::append(
                                out,
                                MessageType::new(method::DATA, Class::Indication),
                                &[0; 12],
                            )
                            .xor_addr(attr::XOR_PEER_ADDRESS, peer)
                            .attr(attr::DATA, data);
                        }
                        q.commit(&listener, None, a.client, start);
                    }
                    if n < BATCH {
                        break;
                    }
                }
            }
        }
        q.flush();
    }
}
