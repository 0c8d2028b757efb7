//! 100,000 random and mutated datagrams and hundreds of mutated TCP byte
//! streams thrown at a running server: no worker panics, and it still
//! answers Binding requests and relays afterwards.
//!
//! The server is told to refuse every peer outside 127.0.0.0/8, so whatever a
//! mutated XOR-PEER-ADDRESS says, nothing leaves the loopback interface.

use crate::common;

use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType};
use turnpike_client::client::{binding, Channel, ClientTransport};

const LOOPBACK_ONLY: &[&str] = &[
    "--allow-loopback-peers",
    "--deny-peer",
    "0.0.0.0/2",
    "--deny-peer",
    "64.0.0.0/3",
    "--deny-peer",
    "96.0.0.0/4",
    "--deny-peer",
    "112.0.0.0/5",
    "--deny-peer",
    "120.0.0.0/6",
    "--deny-peer",
    "124.0.0.0/7",
    "--deny-peer",
    "126.0.0.0/8",
    "--deny-peer",
    "128.0.0.0/1",
    "--deny-peer",
    "::/0",
];

/// Valid messages to mutate: unauthenticated and authenticated requests,
/// indications and ChannelData, built against the live server's nonce.
fn templates(server: SocketAddr, peer: SocketAddr) -> Vec<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::ALLOCATE, Class::Request),
        &[1; 12],
    )
    .u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    s.send_to(&buf, server).unwrap();
    let mut r = [0u8; 1500];
    let n = s.recv(&mut r).unwrap();
    let m = Message::parse(&r[..n]).unwrap();
    let nonce = m.get(attr::NONCE).unwrap().to_vec();
    let realm = m.get(attr::REALM).unwrap().to_vec();
    let key = stun_proto::long_term_key_md5(USER, std::str::from_utf8(&realm).unwrap(), PASSWORD);

    let auth = |m: u16, f: &dyn Fn(&mut MessageBuilder)| {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, MessageType::new(m, Class::Request), &rand::random());
        f(&mut b);
        b.attr(attr::USERNAME, USER.as_bytes())
            .attr(attr::REALM, &realm)
            .attr(attr::NONCE, &nonce)
            .message_integrity(&key)
            .fingerprint();
        buf
    };
    let mut t = vec![
        auth(method::ALLOCATE, &|b| {
            b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
        }),
        auth(method::ALLOCATE, &|b| {
            b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
                .attr(attr::EVEN_PORT, &[0x80, 0, 0, 0]);
        }),
        auth(method::CREATE_PERMISSION, &|b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        }),
        auth(method::CHANNEL_BIND, &|b| {
            b.u32(attr::CHANNEL_NUMBER, 0x4000_0000)
                .xor_addr(attr::XOR_PEER_ADDRESS, peer);
        }),
        auth(method::REFRESH, &|b| {
            b.u32(attr::LIFETIME, 600);
        }),
    ];
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::SEND, Class::Indication),
        &[2; 12],
    )
    .xor_addr(attr::XOR_PEER_ADDRESS, peer)
    .attr(attr::DATA, b"payload");
    t.push(buf);
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::BINDING, Class::Request),
        &[3; 12],
    )
    .fingerprint();
    t.push(buf);
    let mut cd = ChannelData::header(0x4000, 9).to_vec();
    cd.extend_from_slice(b"ninebytes");
    t.push(cd);
    t
}

fn mutate(rng: &mut SmallRng, templates: &[Vec<u8>]) -> Vec<u8> {
    let mut m = templates[rng.gen_range(0..templates.len())].clone();
    match rng.gen_range(0..6) {
        0 => {
            // Random bytes of random length, mostly with STUN/ChannelData top bits.
            let n = rng.gen_range(0..700);
            m = (0..n).map(|_| rng.gen()).collect();
            if let Some(b) = m.first_mut() {
                *b &= if rng.gen() { 0x3F } else { 0x7F };
            }
        }
        1 => {
            // Flip a few bytes.
            for _ in 0..rng.gen_range(1..5) {
                let i = rng.gen_range(0..m.len());
                m[i] ^= 1 << rng.gen_range(0..8);
            }
        }
        2 => {
            let keep = rng.gen_range(0..m.len());
            m.truncate(keep);
        }
        3 => {
            // Corrupt a length field (header or attribute).
            let i = if rng.gen() {
                2
            } else {
                rng.gen_range(0..m.len().saturating_sub(2).max(1))
            };
            if i + 1 < m.len() {
                m[i] = rng.gen();
                m[i + 1] = rng.gen();
            }
        }
        4 => {
            let extra: Vec<u8> = (0..rng.gen_range(1..64)).map(|_| rng.gen()).collect();
            m.extend_from_slice(&extra);
        }
        _ => {} // unmodified: keeps real allocations and permissions around
    }
    m
}

#[test]
fn hundred_thousand_bad_datagrams_and_streams() {
    // It loads the machine: nothing else runs beside it.
    let _alone = common::exclusive();
    let h = start(LOOPBACK_ONLY);
    let server = h.listen[0];
    let peer = peer();
    let peer_addr = peer.local_addr().unwrap();
    let tpl = templates(server, peer_addr);
    let seed: u64 = rand::random();
    eprintln!("garbage seed {seed}");
    let mut rng = SmallRng::seed_from_u64(seed);

    // A few fixed client sockets, so mutations land on live allocations.
    let socks: Vec<UdpSocket> = (0..8).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
    for s in &socks {
        s.set_nonblocking(true).unwrap();
    }
    let mut sink = [0u8; 2048];
    for i in 0..100_000 {
        let m = mutate(&mut rng, &tpl);
        let s = &socks[i % socks.len()];
        let _ = s.send_to(&m, server);
        if i % 500 == 0 {
            // Drain replies so our receive buffers do not fill, and pace a
            // little so the server's do not either.
            for s in &socks {
                while s.recv(&mut sink).is_ok() {}
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    // Mutated TCP streams: valid and broken frames, random chunking, some
    // connections dropped mid-frame.
    for _ in 0..300 {
        let Ok(mut c) = TcpStream::connect(server) else {
            continue;
        };
        let mut stream = Vec::new();
        for _ in 0..rng.gen_range(1..20) {
            stream.extend_from_slice(&mutate(&mut rng, &tpl));
        }
        let cut = rng.gen_range(0..=stream.len());
        let mut pos = 0;
        while pos < cut {
            let n = rng.gen_range(1..=64).min(cut - pos);
            if c.write_all(&stream[pos..pos + n]).is_err() {
                break;
            }
            pos += n;
        }
    }

    // Still serving. The flood came from 127.0.0.1, whose unauthenticated
    // answers are now rate-limited and whose alice/source pair the
    // brute-force guard has blocked, as it should. A correct client at
    // another address is unaffected: Binding from many fresh ports (so
    // every worker is asked) over UDP, over TCP, and a full relay.
    let elsewhere: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    for _ in 0..32 {
        let mut ch = Channel::connect_from(
            &ClientTransport::Udp,
            server,
            Some(elsewhere),
            Duration::from_secs(3),
        )
        .unwrap();
        binding(&mut ch, Duration::from_secs(3)).expect("binding answered after the garbage");
    }
    let mut ch = Channel::connect_from(
        &ClientTransport::Tcp,
        server,
        Some(elsewhere),
        Duration::from_secs(3),
    )
    .unwrap();
    binding(&mut ch, Duration::from_secs(3)).unwrap();
    let ch = Channel::connect_from(
        &ClientTransport::Udp,
        server,
        Some(elsewhere),
        Duration::from_secs(3),
    )
    .unwrap();
    let mut c = turnpike_client::client::TurnClient::new(ch, USER, PASSWORD);
    let a = c.allocate().unwrap();
    c.channel_bind(0x4ABC, peer_addr).unwrap();
    peer.set_nonblocking(false).unwrap();
    // Drain whatever the garbage phase relayed to the peer.
    peer.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while peer.recv_from(&mut sink).is_ok() {}
    peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c.send_channel(0x4ABC, b"after").unwrap();
    let (n, from) = peer.recv_from(&mut sink).unwrap();
    assert_eq!((&sink[..n], from), (&b"after"[..], a.relayed));
    assert_eq!(h.shutdown(), 0, "no worker panicked (seed {seed})");
}
