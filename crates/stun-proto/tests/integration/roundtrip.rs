//! Property tests: whatever the builder writes, the reader reads back; and
//! the reader never panics on arbitrary or mutated bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use stun_proto::{attr, ChannelData, Class, Message, MessageBuilder, MessageType};

fn class() -> impl Strategy<Value = Class> {
    prop_oneof![
        Just(Class::Request),
        Just(Class::Indication),
        Just(Class::Success),
        Just(Class::Error)
    ]
}

fn sockaddr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<u32>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<u128>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

proptest! {
    #[test]
    fn build_then_parse(
        method in 0u16..0x1000,
        class in class(),
        txid in any::<[u8; 12]>(),
        // Comprehension-optional types outside the ones with special meaning.
        attrs in proptest::collection::vec((0x8100u16..0xFFFF, proptest::collection::vec(any::<u8>(), 0..80)), 0..8),
        addr in sockaddr(),
        lifetime in any::<u32>(),
        key in proptest::collection::vec(any::<u8>(), 1..40),
        with_fp in any::<bool>(),
        prefix in proptest::collection::vec(any::<u8>(), 0..50),
    ) {
        let typ = MessageType::new(method, class);
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, typ, &txid);
        for (t, v) in &attrs {
            b.attr(*t, v);
        }
        b.xor_addr(attr::XOR_PEER_ADDRESS, addr);
        b.u32(attr::LIFETIME, lifetime);
        b.message_integrity(&key);
        b.message_integrity_sha256(&key);
        if with_fp {
            b.fingerprint();
        }
        let bytes = b.finish().to_vec();
        let m = Message::parse(&bytes).unwrap();
        prop_assert_eq!(m.message_type(), typ);
        prop_assert_eq!(m.transaction_id(), txid);
        prop_assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(), addr);
        prop_assert_eq!(m.get_u32(attr::LIFETIME), Some(lifetime));
        for (t, v) in &attrs {
            // First occurrence wins when types repeat.
            let first = attrs.iter().find(|(t2, _)| t2 == t).unwrap();
            prop_assert_eq!(m.get(*t).unwrap(), &first.1[..]);
            let _ = v;
        }
        prop_assert!(m.verify_integrity(&key));
        prop_assert!(m.verify_integrity_sha256(&key));
        prop_assert_eq!(m.has_fingerprint(), with_fp);

        // The same message appended after other bytes (a send queue's
        // earlier datagrams) is byte for byte the same, and they are kept.
        let mut shared = prefix.clone();
        let mut b = MessageBuilder::append(&mut shared, typ, &txid);
        for (t, v) in &attrs {
            b.attr(*t, v);
        }
        b.xor_addr(attr::XOR_PEER_ADDRESS, addr);
        b.u32(attr::LIFETIME, lifetime);
        b.message_integrity(&key);
        b.message_integrity_sha256(&key);
        if with_fp {
            b.fingerprint();
        }
        prop_assert_eq!(b.finish(), &bytes[..]);
        prop_assert_eq!(&shared[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&shared[prefix.len()..], &bytes[..]);
    }

    #[test]
    fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Message::parse(&data);
        let _ = ChannelData::parse(&data);
    }

    #[test]
    fn mutated_messages_never_panic(
        txid in any::<[u8; 12]>(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, MessageType::new(3, Class::Request), &txid);
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000)
            .attr(attr::USERNAME, b"alice")
            .attr(attr::REALM, b"example.org")
            .attr(attr::NONCE, b"abcdefgh")
            .message_integrity(b"key")
            .fingerprint();
        let mut bytes = b.finish().to_vec();
        for (pos, x) in flips {
            let n = bytes.len();
            bytes[pos % n] ^= x;
        }
        bytes.truncate(cut % (bytes.len() + 1));
        if let Ok(m) = Message::parse(&bytes) {
            let _ = m.verify_integrity(b"key");
            let _ = m.get_xor_addr(attr::XOR_PEER_ADDRESS);
            let _ = m.error_code();
        }
    }

    #[test]
    fn channel_data_round_trip(ch in 0x4000u16..0x8000, data in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut p = ChannelData::header(ch, data.len() as u16).to_vec();
        p.extend_from_slice(&data);
        let framed = ChannelData::stream_len(&p).unwrap();
        prop_assert_eq!(framed % 4, 0);
        prop_assert!(framed >= p.len());
        p.resize(framed, 0);
        let c = ChannelData::parse(&p).unwrap();
        prop_assert_eq!(c.channel, ch);
        prop_assert_eq!(c.data, &data[..]);
    }
}

#[test]
fn malformed_cases_are_rejected() {
    let txid = [7u8; 12];
    let mut buf = Vec::new();
    MessageBuilder::new(&mut buf, MessageType::new(1, Class::Request), &txid).attr(attr::SOFTWARE, b"abc");
    let good = buf.clone();
    assert!(Message::parse(&good).is_ok());

    let mut top = good.clone();
    top[0] |= 0x80;
    assert!(Message::parse(&top).is_err());

    let mut cookie = good.clone();
    cookie[4] ^= 1;
    assert!(Message::parse(&cookie).is_err());

    let mut unaligned = good.clone();
    unaligned[3] += 1;
    assert!(Message::parse(&unaligned).is_err());

    // Attribute length past the end.
    let mut past = good.clone();
    past[23] = 200;
    assert!(Message::parse(&past).is_err());

    // Truncated header.
    assert!(Message::parse(&good[..19]).is_err());

    // FINGERPRINT not last.
    let mut buf = Vec::new();
    MessageBuilder::new(&mut buf, MessageType::new(1, Class::Request), &txid)
        .fingerprint()
        .attr(attr::SOFTWARE, b"abc");
    assert!(Message::parse(&buf).is_err());

    // Attributes after MESSAGE-INTEGRITY are ignored, except FINGERPRINT.
    let mut buf = Vec::new();
    MessageBuilder::new(&mut buf, MessageType::new(1, Class::Request), &txid)
        .attr(attr::USERNAME, b"u")
        .message_integrity(b"k")
        .attr(attr::SOFTWARE, b"late")
        .fingerprint();
    let m = Message::parse(&buf).unwrap();
    assert!(m.get(attr::SOFTWARE).is_none());
    assert!(m.has_fingerprint());

    // Duplicate attributes: the first wins.
    let mut buf = Vec::new();
    MessageBuilder::new(&mut buf, MessageType::new(1, Class::Request), &txid)
        .attr(attr::SOFTWARE, b"first")
        .attr(attr::SOFTWARE, b"second");
    assert_eq!(
        Message::parse(&buf).unwrap().get(attr::SOFTWARE).unwrap(),
        b"first"
    );

    // ChannelData whose length runs past the datagram.
    assert!(ChannelData::parse(&[0x40, 0x00, 0x00, 0x10, 1, 2, 3, 4]).is_none());
}
