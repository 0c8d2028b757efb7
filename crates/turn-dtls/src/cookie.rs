//! The cookie exchange without an engine (RFC 6347 §4.2.1).
//!
//! A dimpl engine in the server role draws its cookie secret from its
//! random generator when it is made, and its cookie is
//! HMAC-SHA256(secret, ClientHello.random). Seeded, that generator is the
//! `rand` crate's `StdRng::seed_from_u64(seed)`, and the engine draws an
//! `f32` (its first flight's retransmission jitter) before the 32-byte
//! secret. So the cookie an engine seeded with `seed` will expect is known
//! without making one, and a HelloVerifyRequest costs two HMACs instead of
//! an engine (a configuration, a key parse: milliseconds). `Front::new`
//! checks this prediction against a real engine once ([`check`]) and the
//! front refuses to run if the engine ever derives its cookie otherwise.

use hmac::{Hmac, Mac};
use rand::{RngExt, SeedableRng};
use sha2::Sha256;

/// The cookie an engine seeded with `seed` issues to a hello with `random`.
pub(crate) fn predicted(seed: u64, random: &[u8; 32]) -> [u8; 32] {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let _jitter: f32 = rng.random();
    let secret: [u8; 32] = rng.random();
    let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(&secret) else {
        unreachable!("HMAC takes a key of any length")
    };
    mac.update(random);
    mac.finalize().into_bytes().into()
}

/// A HelloVerifyRequest with `cookie` answering a hello whose record
/// sequence number is `record_seq` (RFC 6347 §4.2.1: the server's record
/// repeats it), byte for byte what the engine writes: record version DTLS
/// 1.2, server_version DTLS 1.0 (§4.2.1 says so for the body).
pub(crate) fn hello_verify_request(record_seq: [u8; 6], cookie: &[u8; 32]) -> [u8; 60] {
    let mut m = [0u8; 60];
    // Record: handshake, DTLS 1.2, epoch 0, the hello's sequence number,
    // length 47.
    m[..3].copy_from_slice(&[22, 0xfe, 0xfd]);
    m[5..11].copy_from_slice(&record_seq);
    m[11..13].copy_from_slice(&47u16.to_be_bytes());
    // Handshake: hello_verify_request, length 35, message_seq 0, whole.
    m[13..25].copy_from_slice(&[3, 0, 0, 35, 0, 0, 0, 0, 0, 0, 0, 35]);
    // Body: server_version DTLS 1.0, the cookie.
    m[25..28].copy_from_slice(&[0xfe, 0xff, 32]);
    m[28..].copy_from_slice(cookie);
    m
}
