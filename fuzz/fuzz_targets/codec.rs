//! The codec on arbitrary bytes: parse, read every attribute, verify
//! integrity and fingerprint, frame as a stream, and re-encode what parsed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use stun_proto::{attr, ChannelData, Message, MessageBuilder};

fuzz_target!(|data: &[u8]| {
    let _ = ChannelData::parse(data);
    let _ = ChannelData::stream_len(data);
    let _ = turn_core::stream_frame_len(data);
    let _ = Message::stream_len(data);
    let Ok(m) = Message::parse(data) else {
        return;
    };
    let _ = m.verify_integrity(b"key");
    let _ = m.verify_integrity_sha256(b"key");
    let _ = m.error_code();
    for t in [
        attr::XOR_MAPPED_ADDRESS,
        attr::XOR_PEER_ADDRESS,
        attr::XOR_RELAYED_ADDRESS,
        attr::MAPPED_ADDRESS,
        attr::OTHER_ADDRESS,
    ] {
        let _ = m.get_xor_addr(t);
        let _ = m.get_addr(t);
        for v in m.get_all(t) {
            let _ = m.decode_xor_addr(v);
        }
    }
    let _ = m.get_u32(attr::LIFETIME);
    // Re-encode the visible attributes: the result must parse again, with
    // the same type, transaction id and attribute values.
    let types: Vec<u16> = m.attr_types().collect();
    let mut out = Vec::new();
    let mut b = MessageBuilder::new(&mut out, m.message_type(), &m.transaction_id());
    let mut values = Vec::new();
    for (i, t) in types.iter().enumerate() {
        if matches!(
            *t,
            attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT
        ) {
            continue;
        }
        let v = m
            .get_all(*t)
            .nth(types[..i].iter().filter(|x| *x == t).count())
            .unwrap();
        b.attr(*t, v);
        values.push((*t, v));
    }
    let again = Message::parse(&out).expect("re-encoded message parses");
    assert_eq!(again.message_type(), m.message_type());
    assert_eq!(again.transaction_id(), m.transaction_id());
    for (t, v) in values {
        assert!(again.get_all(t).any(|x| x == v));
    }
});
