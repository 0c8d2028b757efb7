//! Core microbenchmarks: Binding, authenticated Allocate (+ delete), and the
//! ChannelData forward decision both ways.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType};
use turn_core::testing::FakeRelays;
use turn_core::{Config, Credentials, FiveTuple, NonceMinter, Server, Shared, Transport};

const REALM: &str = "bench.example";

fn server(now: Instant) -> Server {
    let mut creds = Credentials::new();
    creds.add_user("alice", REALM, "pw");
    let cfg = Config::new(REALM, Arc::new(creds), [5; 32], now, 1_700_000_000);
    let mut shared = Shared::default();
    shared.set_rate_limit_per_ip(0);
    Server::with_shared(cfg, shared)
}

fn tuple(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::from(([203, 0, 113, 1], port)),
        server: "192.0.2.1:3478".parse().unwrap(),
        listener: Default::default(),
    }
}

fn signed(m: u16, nonce: &[u8], key: &[u8; 16], f: impl Fn(&mut MessageBuilder)) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(&mut buf, MessageType::new(m, Class::Request), &[9; 12]);
    f(&mut b);
    b.attr(attr::USERNAME, b"alice")
        .attr(attr::REALM, REALM.as_bytes())
        .attr(attr::NONCE, nonce)
        .message_integrity(key);
    buf
}

fn benches(c: &mut Criterion) {
    let now = Instant::now();
    let mut relays = FakeRelays {
        quiet: true,
        ..FakeRelays::default()
    };
    let key = stun_proto::long_term_key_md5("alice", REALM, "pw");
    let nonce = NonceMinter::new([5; 32], 600).mint(0, tuple(1).client.ip());

    let mut s = server(now);
    let mut binding = Vec::new();
    MessageBuilder::new(
        &mut binding,
        MessageType::new(method::BINDING, Class::Request),
        &[1; 12],
    );
    c.bench_function("core: Binding request -> response", |b| {
        b.iter(|| {
            s.handle_client(now, tuple(1), black_box(&binding))
                .map(|t| t.data.len())
        })
    });

    let alloc = signed(method::ALLOCATE, &nonce, &key, |b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let delete = signed(method::REFRESH, &nonce, &key, |b| {
        b.u32(attr::LIFETIME, 0);
    });
    c.bench_function("core: authenticated Allocate + Refresh(0)", |b| {
        b.iter(|| {
            // Allocate is answered once its relay socket is open.
            let _ = s.handle_client(now, tuple(2), &alloc);
            s.run_commands(now, &mut relays);
            let ok = s.poll_transmit().is_some();
            let gone = s.handle_client(now, tuple(2), &delete).is_some();
            s.run_commands(now, &mut relays);
            while s.poll_event().is_some() {}
            ok && gone
        })
    });

    // One allocation with a channel to a peer, for the per-packet paths.
    let _ = s.handle_client(now, tuple(3), &alloc);
    s.run_commands(now, &mut relays);
    let resp = s.poll_transmit().unwrap().data;
    let relayed = Message::parse(&resp)
        .unwrap()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    let peer: SocketAddr = "8.8.8.8:5000".parse().unwrap();
    let bind = signed(method::CHANNEL_BIND, &nonce, &key, |b| {
        b.u32(attr::CHANNEL_NUMBER, 0x4000_0000)
            .xor_addr(attr::XOR_PEER_ADDRESS, peer);
    });
    assert!(s.handle_client(now, tuple(3), &bind).is_some());
    let mut cd = ChannelData::header(0x4000, 160).to_vec();
    cd.resize(164, 0xAB);
    c.bench_function("core: ChannelData client -> peer decision (160 B)", |b| {
        b.iter(|| {
            s.handle_client(now, tuple(3), black_box(&cd))
                .map(|t| t.data.len())
        })
    });
    let payload = vec![0xCDu8; 160];
    let relay_bound = relayed; // no external IP: the bound address is advertised
    c.bench_function("core: peer -> ChannelData to client (160 B)", |b| {
        b.iter(|| {
            s.handle_peer(now, relay_bound, peer, black_box(&payload))
                .map(|t| t.data.len())
        })
    });
}

criterion_group!(core, benches);
criterion_main!(core);
