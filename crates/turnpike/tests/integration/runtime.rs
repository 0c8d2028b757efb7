//! The real server over real sockets on 127.0.0.1: UDP, TCP, TLS and DTLS.

use crate::common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use common::*;
use stun_proto::{attr, method, Class, Message, MessageBuilder, MessageType};
use turnpike_client::client::{binding, Channel, ClientError, ClientTransport, Received};

#[test]
fn relays_both_ways_with_send_data_and_channels_over_every_transport() {
    let h = start(&["--allow-loopback-peers"]);
    for (t, addr) in transports(&h) {
        let mut c = client(&t, addr, USER, PASSWORD);
        let alloc = c.allocate().unwrap_or_else(|e| panic!("{t:?}: allocate: {e}"));
        assert_eq!(alloc.relayed.ip().to_string(), "127.0.0.1");
        assert_eq!(alloc.lifetime, 600);
        let peer = peer();
        let peer_addr = peer.local_addr().unwrap();
        c.create_permission(&[peer_addr]).unwrap();

        // Send indication → peer, from the relayed address.
        c.send_indication(peer_addr, b"hello via send").unwrap();
        let mut buf = [0u8; 2048];
        let (n, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello via send", "{t:?}");
        assert_eq!(from, alloc.relayed, "{t:?}: from the relayed address");

        // Peer → client as a Data indication.
        peer.send_to(b"hello back", alloc.relayed).unwrap();
        assert_eq!(
            c.recv(Duration::from_secs(3)).unwrap(),
            Received::Data {
                peer: peer_addr,
                data: b"hello back".to_vec()
            },
            "{t:?}"
        );

        // Channel both ways; odd lengths exercise TCP/TLS padding.
        c.channel_bind(0x4001, peer_addr).unwrap();
        c.send_channel(0x4001, b"chan!").unwrap();
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"chan!", "{t:?}");
        for len in [1usize, 3, 4, 5, 1200] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            peer.send_to(&payload, alloc.relayed).unwrap();
            assert_eq!(
                c.recv(Duration::from_secs(3)).unwrap(),
                Received::Channel {
                    channel: 0x4001,
                    data: payload
                },
                "{t:?} len {len}"
            );
        }
        assert_eq!(c.refresh(0).unwrap(), 0);
        // After delete, the relayed address no longer forwards.
        peer.send_to(b"late", alloc.relayed).unwrap();
        assert!(matches!(
            c.recv(Duration::from_millis(300)),
            Err(ClientError::Timeout)
        ));
    }
    h.shutdown();
}

#[test]
fn wrong_password_relays_nothing() {
    // Six deliberate failures from one source would trip the brute-force
    // guard (throttled, then blocked: tested in limits.rs); it is off here
    // so each transport's 401 can be checked.
    let h = start(&["--allow-loopback-peers", "--auth-fail-limit", "0"]);
    for (t, addr) in transports(&h) {
        let mut c = client(&t, addr, USER, "not-the-password");
        match c.allocate() {
            Err(ClientError::Error { code: 401, .. }) => {}
            other => panic!("{t:?}: expected 401, got {other:?}"),
        }
        let peer = peer();
        peer.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let peer_addr = peer.local_addr().unwrap();
        assert!(matches!(
            c.create_permission(&[peer_addr]),
            Err(ClientError::Error { code: 401, .. })
        ));
        c.send_indication(peer_addr, b"x").unwrap();
        let mut buf = [0u8; 64];
        assert!(peer.recv_from(&mut buf).is_err(), "{t:?}: nothing relayed");
    }
    h.shutdown();
}

#[test]
fn refused_peers_get_403() {
    // Loopback is refused by default.
    let h = start(&[]);
    for (t, addr) in transports(&h) {
        let mut c = client(&t, addr, USER, PASSWORD);
        c.allocate().unwrap();
        for p in ["127.0.0.1:9", "10.0.0.1:9", "169.254.169.254:80", "192.168.0.1:9"] {
            match c.create_permission(&[p.parse().unwrap()]) {
                Err(ClientError::Error { code: 403, .. }) => {}
                other => panic!("{t:?} {p}: expected 403, got {other:?}"),
            }
            match c.channel_bind(0x4000, p.parse().unwrap()) {
                Err(ClientError::Error { code: 403, .. }) => {}
                other => panic!("{t:?} {p}: expected 403, got {other:?}"),
            }
        }
        // The server's own listener is refused even with loopback allowed.
        c.refresh(0).unwrap();
    }
    h.shutdown();
    let h = start(&["--allow-loopback-peers"]);
    let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    c.allocate().unwrap();
    assert!(matches!(
        c.create_permission(&[h.listen[0]]),
        Err(ClientError::Error { code: 403, .. })
    ));
    h.shutdown();
}

#[test]
fn binding_over_udp_tcp_tls_and_dtls() {
    let h = start(&[]);
    for (t, addr) in transports(&h) {
        let mut ch = Channel::connect(&t, addr, Duration::from_secs(3)).unwrap();
        let local = ch.local_addr().unwrap();
        let mapped = binding(&mut ch, Duration::from_secs(3)).unwrap();
        assert_eq!(mapped, local, "{t:?}");
    }
    h.shutdown();
}

fn binding_request(txid: u8) -> Vec<u8> {
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::BINDING, Class::Request),
        &[txid; 12],
    )
    .fingerprint();
    buf
}

fn read_messages(s: &mut TcpStream, n: usize) -> Vec<Vec<u8>> {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = Vec::new();
    let mut out = Vec::new();
    while out.len() < n {
        let mut tmp = [0u8; 4096];
        let k = s.read(&mut tmp).unwrap();
        assert!(k > 0, "connection closed");
        buf.extend_from_slice(&tmp[..k]);
        while let Some(Ok(len)) = turn_core::stream_frame_len(&buf) {
            if buf.len() < len {
                break;
            }
            out.push(buf.drain(..len).collect());
        }
    }
    out
}

#[test]
fn tcp_framing_split_byte_by_byte_and_packed() {
    let h = start(&[]);
    let mut s = TcpStream::connect(h.listen[0]).unwrap();
    s.set_nodelay(true).unwrap();
    // Two requests packed into one write.
    let mut two = binding_request(1);
    two.extend_from_slice(&binding_request(2));
    s.write_all(&two).unwrap();
    let got = read_messages(&mut s, 2);
    let ids: Vec<_> = got
        .iter()
        .map(|m| Message::parse(m).unwrap().transaction_id()[0])
        .collect();
    assert_eq!(ids, vec![1, 2]);
    // One request split byte by byte.
    for b in binding_request(3) {
        s.write_all(&[b]).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let got = read_messages(&mut s, 1);
    let m = Message::parse(&got[0]).unwrap();
    assert_eq!(m.transaction_id()[0], 3);
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        s.local_addr().unwrap()
    );
    h.shutdown();
}

#[test]
fn garbage_on_tcp_closes_only_that_connection() {
    let h = start(&[]);
    let mut bad = TcpStream::connect(h.listen[0]).unwrap();
    bad.write_all(&[0xFF; 64]).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut tmp = [0u8; 16];
    assert!(
        matches!(bad.read(&mut tmp), Ok(0) | Err(_)),
        "framing lost: the server closes"
    );
    let mut ch = Channel::connect(&ClientTransport::Tcp, h.listen[0], Duration::from_secs(3)).unwrap();
    binding(&mut ch, Duration::from_secs(3)).unwrap();
    h.shutdown();
}

#[test]
fn tcp_allocation_is_deleted_when_the_connection_closes() {
    let h = start(&["--allow-loopback-peers"]);
    let relayed;
    {
        let mut c = client(&ClientTransport::Tcp, h.listen[0], USER, PASSWORD);
        relayed = c.allocate().unwrap().relayed;
    }
    // The relay port is released: binding it ourselves succeeds soon after.
    let mut freed = false;
    for _ in 0..50 {
        if UdpSocket::bind(relayed).is_ok() {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        freed,
        "relay socket {relayed} still bound after the TCP client left"
    );
    h.shutdown();
}

#[test]
fn rest_api_credentials_over_udp() {
    let h = start(&["--auth-secret", "s3cret", "--allow-loopback-peers"]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let user = format!("{}:bob", now + 3600);
    let pw = turn_core::auth::rest_password(b"s3cret", &user);
    let mut c = client(&ClientTransport::Udp, h.listen[0], &user, &pw);
    c.allocate().unwrap();
    let user = format!("{}:bob", now - 10);
    let pw = turn_core::auth::rest_password(b"s3cret", &user);
    let mut c = client(&ClientTransport::Udp, h.listen[0], &user, &pw);
    assert!(matches!(c.allocate(), Err(ClientError::Error { code: 401, .. })));
    h.shutdown();
}

#[test]
fn software_and_fingerprint_in_responses() {
    let h = start(&["--software", "turnpike-test"]);
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.send_to(&binding_request(9), h.listen[0]).unwrap();
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf).unwrap();
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.get(attr::SOFTWARE).unwrap(), b"turnpike-test");
    assert!(m.has_fingerprint());
    h.shutdown();
}

#[test]
fn tls_client_that_never_finishes_its_handshake_does_not_block_others() {
    let h = start(&[]);
    let mut stalled = TcpStream::connect(h.tls_listen[0]).unwrap();
    stalled.write_all(&[0x16, 0x03, 0x01, 0x00]).unwrap(); // a partial ClientHello
    let mut ch = Channel::connect(
        &ClientTransport::Tls {
            pinned: h.tls_leaf.clone(),
        },
        h.tls_listen[0],
        Duration::from_secs(3),
    )
    .unwrap();
    binding(&mut ch, Duration::from_secs(3)).unwrap();
    drop(stalled);
    h.shutdown();
}

#[test]
fn bursts_arrive_whole_and_in_order_with_and_without_gso() {
    // A peer's burst reaches the worker in recvmmsg batches and leaves as
    // GSO runs (equal sizes merged, a shorter datagram ends a run); the
    // client must see every datagram, unmerged and in order, either way.
    for gso in ["--udp-gso=true", "--udp-gso=false"] {
        let h = start(&["--allow-loopback-peers", gso]);
        let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
        let alloc = c.allocate().unwrap();
        let peer = peer();
        c.channel_bind(0x4002, peer.local_addr().unwrap()).unwrap();
        let sizes: Vec<usize> = (0..120)
            .map(|i| match i % 40 {
                17 => 90,   // a short one ends a run
                33 => 1200, // a large one
                _ => 300,
            })
            .collect();
        let burst: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut d = vec![(i % 251) as u8; n];
                d[..2].copy_from_slice(&(i as u16).to_be_bytes());
                d
            })
            .collect();
        for d in &burst {
            peer.send_to(d, alloc.relayed).unwrap();
        }
        for (i, want) in burst.iter().enumerate() {
            match c.recv(Duration::from_secs(3)) {
                Ok(Received::Channel { channel, data }) => {
                    assert_eq!(channel, 0x4002);
                    assert_eq!(&data, want, "{gso}: datagram {i}");
                }
                other => panic!("{gso}: datagram {i}: {other:?}"),
            }
        }
        // And the other way: a burst of ChannelData to the peer.
        for d in &burst {
            c.send_channel(0x4002, d).unwrap();
        }
        let mut buf = [0u8; 2048];
        peer.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        for (i, want) in burst.iter().enumerate() {
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(from, alloc.relayed);
            assert_eq!(&buf[..n], &want[..], "{gso}: to the peer, datagram {i}");
        }
        h.shutdown();
    }
}
