//! Codec microbenchmarks: parse/validate, integrity, build.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType};

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 5769 §2.4: a long-term-credential request with MESSAGE-INTEGRITY.
const REQ_2_4: &str = "000100602112a44278ad3433c6ad72c029da412e00060012e3839ee38388e383aae38383e382afe3
    82b900000015001c662f2f3439396b39353464364f4c33346f4c394653547679363473410014000b
    6578616d706c652e6f72670000080014f67024656dd64a3e02b8e0712e85c9a28ca89666";

fn benches(c: &mut Criterion) {
    let mut binding = Vec::new();
    MessageBuilder::new(
        &mut binding,
        MessageType::new(method::BINDING, Class::Request),
        &[1; 12],
    )
    .fingerprint();
    c.bench_function("parse Binding request with FINGERPRINT", |b| {
        b.iter(|| Message::parse(black_box(&binding)).unwrap().message_type())
    });

    let req = hex(REQ_2_4);
    let key = stun_proto::long_term_key_md5(
        "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
        "example.org",
        "TheMatrIX",
    );
    c.bench_function("parse + verify MESSAGE-INTEGRITY (RFC 5769 2.4)", |b| {
        b.iter(|| Message::parse(black_box(&req)).unwrap().verify_integrity(&key))
    });

    let mut out = Vec::with_capacity(256);
    let client = "192.0.2.1:32853".parse().unwrap();
    c.bench_function("build Binding success (XOR-MAPPED-ADDRESS + FINGERPRINT)", |b| {
        b.iter(|| {
            let mut m = MessageBuilder::new(
                &mut out,
                MessageType::new(method::BINDING, Class::Success),
                &[1; 12],
            );
            m.xor_addr(attr::XOR_MAPPED_ADDRESS, black_box(client))
                .fingerprint();
            m.finish().len()
        })
    });

    c.bench_function("build Allocate success with MESSAGE-INTEGRITY", |b| {
        b.iter(|| {
            let mut m = MessageBuilder::new(
                &mut out,
                MessageType::new(method::ALLOCATE, Class::Success),
                &[1; 12],
            );
            m.xor_addr(attr::XOR_RELAYED_ADDRESS, client)
                .u32(attr::LIFETIME, 600)
                .xor_addr(attr::XOR_MAPPED_ADDRESS, client)
                .message_integrity(&key);
            m.finish().len()
        })
    });

    let mut cd = ChannelData::header(0x4000, 160).to_vec();
    cd.resize(164, 0xAB);
    c.bench_function("parse ChannelData (160 B)", |b| {
        b.iter(|| ChannelData::parse(black_box(&cd)).unwrap().channel)
    });
}

criterion_group!(codec, benches);
criterion_main!(codec);
