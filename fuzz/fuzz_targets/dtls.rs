//! The DTLS front end (RFC 7350) on arbitrary input: raw datagrams from
//! four sources, and two real clients' flights delivered whole, mutated,
//! cut short, duplicated, out of order or dropped, with time moving on.
//! The front must never panic, and its counts must stay consistent.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use turn_dtls::{DtlsCertificate, Front, Identity, Limits, Output, Shared};

fn certificate() -> &'static DtlsCertificate {
    static CERT: OnceLock<DtlsCertificate> = OnceLock::new();
    CERT.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["fuzz".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        DtlsCertificate {
            certificate: cert.der().to_vec(),
            private_key: key.serialize_der(),
        }
    })
}

struct Client {
    dtls: dimpl::Dtls,
    addr: SocketAddr,
    /// Datagrams the client sent, not yet delivered.
    pending: Vec<Vec<u8>>,
}

impl Client {
    fn new(addr: SocketAddr, seed: u64, now: Instant) -> Client {
        let config = dimpl::Config::builder().dangerously_set_rng_seed(seed).build().unwrap();
        let mut dtls = dimpl::Dtls::new_12(Arc::new(config), certificate().clone(), now);
        dtls.set_active(true);
        let _ = dtls.handle_timeout(now);
        let mut c = Client { dtls, addr, pending: Vec::new() };
        c.collect();
        c
    }

    fn collect(&mut self) {
        let mut buf = vec![0u8; 4096];
        for _ in 0..64 {
            match self.dtls.poll_output(&mut buf) {
                dimpl::Output::Packet(p) => self.pending.push(p.to_vec()),
                dimpl::Output::Timeout(_) => return,
                _ => {}
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut now = start;
    let shared = Arc::new(Shared::default());
    let c = certificate();
    let identity = Identity::new(c.certificate.clone(), c.private_key.clone()).unwrap();
    let limits = Limits {
        half_open: 3,
        half_open_per_source: 2,
        associations: 4,
        ..Limits::default()
    };
    let mut front = Front::new(identity, [1; 32], start, limits, shared.clone());
    let server: SocketAddr = "198.51.100.1:5349".parse().unwrap();
    let sources: [SocketAddr; 4] = [
        "192.0.2.1:1000".parse().unwrap(),
        "192.0.2.1:1001".parse().unwrap(),
        "192.0.2.2:1000".parse().unwrap(),
        "[2001:db8::1]:1000".parse().unwrap(),
    ];
    let mut clients = [Client::new(sources[0], 1, now), Client::new(sources[2], 2, now)];
    let mut out = Output::default();
    let mut input = data;
    while let [op, arg, rest @ ..] = input {
        input = rest;
        out.clear();
        let c = &mut clients[(*arg & 1) as usize];
        match op % 8 {
            // A raw datagram from a source: the next `arg` bytes.
            0 => {
                let n = (*arg as usize).min(input.len());
                let (d, rest) = input.split_at(n);
                input = rest;
                front.handle(now, sources[(*arg as usize >> 1) % 4], server, d, &mut out);
            }
            // A client's next datagram, whole.
            1 if !c.pending.is_empty() => {
                let d = c.pending.remove(0);
                front.handle(now, c.addr, server, &d, &mut out);
            }
            // Mutated: one byte flipped.
            2 if !c.pending.is_empty() => {
                let mut d = c.pending.remove(0);
                let i = (*arg as usize) % d.len().max(1);
                if let Some(b) = d.get_mut(i) {
                    *b ^= 0x5a;
                }
                front.handle(now, c.addr, server, &d, &mut out);
            }
            // Cut short (a fragment of a record).
            3 if !c.pending.is_empty() => {
                let d = c.pending.remove(0);
                let cut = (*arg as usize) % d.len().max(1);
                front.handle(now, c.addr, server, &d[..cut], &mut out);
            }
            // Duplicated, or delivered after a later one (reordering).
            4 if !c.pending.is_empty() => {
                let d = c.pending[0].clone();
                front.handle(now, c.addr, server, &d, &mut out);
            }
            5 if c.pending.len() > 1 => {
                let d = c.pending.remove(1);
                front.handle(now, c.addr, server, &d, &mut out);
            }
            // Dropped.
            6 if !c.pending.is_empty() => {
                c.pending.remove(0);
            }
            // Time moves on (retransmissions, deadlines, cookie windows).
            7 => {
                now += Duration::from_millis(u64::from(*arg) * 250);
                front.handle_timeout(now, &mut out);
                for c in clients.iter_mut() {
                    let _ = c.dtls.handle_timeout(now);
                    c.collect();
                }
            }
            _ => {}
        }
        // What the front sent reaches the clients it was for.
        for (ends, r) in &out.datagrams {
            assert!(r.end <= out.bytes.len());
            for c in clients.iter_mut().filter(|c| c.addr == ends.client) {
                let _ = c.dtls.handle_packet(&out.bytes[r.clone()]);
                c.collect();
            }
        }
        // An established client's application data is echoed back.
        let received: Vec<_> = out.received.iter().map(|(e, r)| (e.client, out.bytes[r.clone()].to_vec())).collect();
        let mut back = Output::default();
        for (to, msg) in received {
            front.send(now, to, &msg, &mut back);
        }
        assert!(shared.half_open() <= limits.half_open);
        assert!(shared.associations() <= limits.associations);
        assert_eq!(shared.associations(), front.len());
    }
    drop(front);
    assert_eq!((shared.half_open(), shared.associations()), (0, 0));
});
