//! The server core fed sequences of operations (stateful): client datagrams
//! on several 5-tuples, authenticated requests built from fuzzer-chosen
//! attributes (so allocation, permission and channel code is reachable),
//! peer datagrams, clock jumps and connection closes. After every step the
//! invariants hold: no relay socket or quota slot leaks.
#![no_main]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use stun_proto::{attr, Class, MessageBuilder, MessageType};
use turn_core::limits::Quotas;
use turn_core::testing::{FakeRelays, Ipv6Relays};
use turn_core::{Config, Credentials, FiveTuple, NonceMinter, Server, Shared, Transport};

const REALM: &str = "fuzz.example";

fn tuples() -> [FiveTuple; 4] {
    let server: SocketAddr = "192.0.2.1:3478".parse().unwrap();
    [
        FiveTuple {
            transport: Transport::Udp,
            client: "203.0.113.1:1000".parse().unwrap(),
            server,
            listener: Default::default(),
        },
        FiveTuple {
            transport: Transport::Udp,
            client: "203.0.113.2:1000".parse().unwrap(),
            server,
            listener: Default::default(),
        },
        FiveTuple {
            transport: Transport::Tcp,
            client: "203.0.113.1:2000".parse().unwrap(),
            server,
            listener: Default::default(),
        },
        FiveTuple {
            transport: Transport::Tls,
            client: "[2001:db8::1]:3000".parse().unwrap(),
            server,
            listener: Default::default(),
        },
    ]
}

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut creds = Credentials::new();
    creds.add_user("alice", REALM, "pw");
    creds.add_secret(b"s");
    let quotas = Arc::new(Quotas::new(3, 6));
    let secret = [3u8; 32];
    let mut cfg = Config::new(REALM, Arc::new(creds), secret, start, 1_700_000_000);
    let mut shared = Shared {
        quotas: quotas.clone(),
        ..Shared::default()
    };
    cfg.legacy_channel_numbers = data.first().is_some_and(|b| b & 1 == 1);
    cfg.max_bps = if data.first().is_some_and(|b| b & 2 == 2) {
        5000
    } else {
        0
    };
    shared.set_rate_limit_per_ip(50);
    shared.set_auth_guard(4, Duration::from_secs(300));
    cfg.max_permissions = 8;
    cfg.max_channels = 8;
    // RFC 8016: tickets given out are offered back (the two UDP clients
    // are on different IPs, so a move is reachable).
    cfg.mobility = data.first().is_some_and(|b| b & 4 == 4);
    // Small tables: a server is built per input.
    shared.set_source_slots(64);
    let mut server = Server::with_shared(cfg, shared);
    let minter = NonceMinter::new(secret, 600);
    let key = stun_proto::long_term_key_md5("alice", REALM, "pw");
    let tuples = tuples();
    // Quiet: long runs keep no history; strict: only established
    // connections may be bound.
    let mut relays = FakeRelays {
        ipv6: Ipv6Relays::EveryOther,
        quiet: true,
        check_connections: true,
        ..FakeRelays::default()
    };
    let mut now = start;
    let mut rest = data.get(1..).unwrap_or_default();
    let mut peers: Vec<SocketAddr> = vec!["8.8.8.8:53".parse().unwrap()];
    let mut tickets: Vec<Vec<u8>> = Vec::new();

    while rest.len() >= 3 {
        let op = rest[0];
        let len = (rest[1] as usize) | (((rest[2] & 0x03) as usize) << 8);
        rest = &rest[3..];
        let len = len.min(rest.len());
        let (payload, tail) = rest.split_at(len);
        rest = tail;
        let t = tuples[(op >> 4) as usize & 3];
        match op & 0x0F {
            // Raw bytes from a client.
            0..=4 => {
                let _ = server.handle_client(now, t, payload);
            }
            // An authenticated request: method from the payload, the rest as
            // raw attributes (header + value), signed with a valid nonce.
            5..=8 => {
                let method = match payload.first().map(|b| b & 7) {
                    Some(0 | 6) => 0x003,
                    Some(1) => 0x004,
                    Some(2) => 0x008,
                    Some(3 | 7) => 0x009,
                    // RFC 6062 Connect and ConnectionBind.
                    Some(4) => 0x00a,
                    _ => 0x00b,
                };
                let secs = now.saturating_duration_since(start).as_secs();
                let nonce = minter.mint(secs, t.client.ip());
                let mut buf = Vec::new();
                let mut b =
                    MessageBuilder::new(&mut buf, MessageType::new(method, Class::Request), &[op; 12]);
                let mut attrs = payload.get(1..).unwrap_or_default();
                while attrs.len() >= 4 {
                    let typ = u16::from_be_bytes([attrs[0], attrs[1]]);
                    let l = (attrs[2] as usize % 24).min(attrs.len() - 3);
                    let v = &attrs[3..3 + l];
                    if typ == attr::XOR_PEER_ADDRESS && l >= 2 {
                        // Peers drawn from a small set, so permissions match.
                        let p = peers[v[0] as usize % peers.len()];
                        b.xor_addr(attr::XOR_PEER_ADDRESS, p);
                    } else if typ == attr::CONNECTION_ID && l >= 1 && v[0] < 0x80 && !relays.conns.is_empty() {
                        // A CONNECTION-ID the server gave out (they are
                        // random), so ConnectionBind is reachable.
                        let ids: Vec<u32> = relays.conns.iter().copied().collect();
                        b.u32(attr::CONNECTION_ID, ids[v[0] as usize % ids.len()]);
                    } else if typ == attr::MOBILITY_TICKET && l >= 1 && v[0] < 0x80 && !tickets.is_empty() {
                        // A ticket the server gave out (they are sealed).
                        b.attr(attr::MOBILITY_TICKET, &tickets[v[0] as usize % tickets.len()]);
                    } else if !matches!(
                        typ,
                        attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT
                    ) {
                        b.attr(typ, v);
                    }
                    attrs = &attrs[3 + l..];
                }
                b.attr(attr::USERNAME, b"alice")
                    .attr(attr::REALM, REALM.as_bytes())
                    .attr(attr::NONCE, &nonce)
                    .message_integrity(&key);
                if let Some(tx) = server.handle_client(now, t, &buf) {
                    let ticket = stun_proto::Message::parse(tx.data)
                        .ok()
                        .and_then(|m| m.get(attr::MOBILITY_TICKET).map(<[u8]>::to_vec));
                    if let Some(ticket) = ticket.filter(|t| !t.is_empty() && tickets.len() < 16) {
                        tickets.push(ticket);
                    }
                }
            }
            // RFC 6062 events from the runtime: a connect completing (or
            // failing), a peer connecting to a relay, a connection closing.
            10 => {
                let pick = payload.get(1).copied().unwrap_or(0) as usize;
                match payload.first().map(|b| b % 4) {
                    Some(0) | Some(1) if !relays.connecting.is_empty() => {
                        let id = relays.connecting.remove(pick % relays.connecting.len());
                        let ok = payload[0] % 4 == 0;
                        if ok {
                            relays.conns.insert(id);
                        }
                        server.handle_peer_connected(now, id, ok);
                    }
                    Some(2) => {
                        let open: Vec<SocketAddr> = relays.open.iter().copied().collect();
                        if let Some(&r) = open.get(pick % open.len().max(1)) {
                            let peer = peers[payload.len() % peers.len()];
                            if let Some(id) = server.handle_peer_connection(now, r, peer) {
                                assert!(relays.conns.insert(id), "a CONNECTION-ID given twice");
                            }
                        }
                    }
                    _ => {
                        let ids: Vec<u32> = relays.conns.iter().copied().collect();
                        if let Some(&id) = ids.get(pick % ids.len().max(1)) {
                            relays.conns.remove(&id);
                            server.handle_tcp_closed(now, id);
                        }
                    }
                }
            }
            // A datagram from a peer to one of the open relays.
            9 => {
                let open: Vec<SocketAddr> = relays.open.iter().copied().collect();
                if let (Some(&r), Some(&b)) = (open.get(payload.len() % open.len().max(1)), payload.first()) {
                    let peer = peers[b as usize % peers.len()];
                    let _ = server.handle_peer(now, r, peer, payload);
                }
            }
            11 => now += Duration::from_secs(payload.first().copied().unwrap_or(1) as u64 * 4),
            12 => server.handle_connection_closed(now, t),
            13 => relays.exhausted = !relays.exhausted,
            14 => {
                if let [a, b, c, d, p1, p2, ..] = payload {
                    peers.push(SocketAddr::from((
                        [*a, *b, *c, *d],
                        u16::from_be_bytes([*p1, *p2]),
                    )));
                }
            }
            _ => {
                now += Duration::from_millis(payload.len() as u64 * 10);
                server.handle_timeout(now);
            }
        }
        server.run_commands(now, &mut relays);
        while server.poll_transmit().is_some() {}
        while server.poll_event().is_some() {}
        assert_eq!(relays.open.len(), server.relay_count(), "relay sockets leak");
        assert_eq!(quotas.total(), server.allocation_count(), "quota slots leak");
        assert_eq!(
            relays.connecting.len() + relays.conns.len(),
            server.tcp_connection_count(),
            "TCP connections leak or vanish"
        );
    }
    // Everything expires eventually and every relay is given back.
    now += Duration::from_secs(3601);
    server.handle_timeout(now);
    server.run_commands(now, &mut relays);
    assert_eq!(server.allocation_count(), 0);
    assert!(relays.open.is_empty());
    assert_eq!(server.tcp_connection_count(), 0);
    assert!(relays.conns.is_empty() && relays.connecting.is_empty(), "TCP connections left open");
    assert_eq!(quotas.total(), 0);
});
