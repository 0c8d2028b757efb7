//! The fake-time harness shared by the core's tests: a fake relay provider,
//! a server driven with explicit instants, and a TURN client that
//! authenticates like a real one.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stun_proto::{attr, method, ChannelData, Class, Message, MessageBuilder, MessageType};
pub use turn_core::testing::{tuple, udp, FakeRelays, Ipv6Relays};
use turn_core::{Config, Credentials, Dest, Event, FiveTuple, Server, Shared};

pub const REALM: &str = "example.org";

pub struct Harness {
    pub server: Server,
    pub relays: FakeRelays,
    pub now: Instant,
    pub start: Instant,
}

impl Harness {
    pub fn with(f: impl FnOnce(&mut Config)) -> Self {
        Self::with_shared(|c, _| f(c))
    }

    /// With the shared state (quotas, limits, drain flag) set up too.
    pub fn with_shared(f: impl FnOnce(&mut Config, &mut Shared)) -> Self {
        let mut creds = Credentials::new();
        creds.add_user("alice", REALM, "wonderland");
        creds.add_user("bob", REALM, "builder");
        creds.add_secret(b"rest-secret");
        let start = Instant::now();
        let mut cfg = Config::new(REALM, Arc::new(creds), [9; 32], start, 1_700_000_000);
        let mut shared = Shared::default();
        f(&mut cfg, &mut shared);
        Harness {
            server: Server::with_shared(cfg, shared),
            relays: FakeRelays::default(),
            now: start,
            start,
        }
    }

    pub fn new() -> Self {
        Self::with(|_| {})
    }

    pub fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.server.handle_timeout(self.now);
        self.server.run_commands(self.now, &mut self.relays);
    }

    /// Carries out what the core asked for; returns the first queued answer.
    pub fn drive(&mut self) -> Option<(Dest, Vec<u8>)> {
        self.server.run_commands(self.now, &mut self.relays);
        self.server.poll_transmit().map(|t| (t.dest, t.data))
    }

    /// A TCP/TLS connection of `t` closed.
    pub fn connection_closed(&mut self, t: FiveTuple) {
        self.server.handle_connection_closed(self.now, t);
        self.server.run_commands(self.now, &mut self.relays);
    }

    /// Sends bytes from a client; returns what came back, if anything.
    pub fn send(&mut self, t: FiveTuple, data: &[u8]) -> Option<(Dest, Vec<u8>)> {
        let now = self.now;
        match self
            .server
            .handle_client(now, t, data)
            .map(|tx| (tx.dest, tx.data.to_vec()))
        {
            Some(r) => {
                self.server.run_commands(now, &mut self.relays);
                Some(r)
            }
            None => self.drive(),
        }
    }

    pub fn peer_sends(&mut self, relay: SocketAddr, peer: &str, data: &[u8]) -> Option<(Dest, Vec<u8>)> {
        self.server
            .handle_peer(self.now, relay, peer.parse().unwrap(), data)
            .map(|tx| (tx.dest, tx.data.to_vec()))
    }

    pub fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.server.poll_event()).collect()
    }
}

/// A TURN client's view: credentials and the current nonce.
pub struct Client {
    pub t: FiveTuple,
    pub user: String,
    pub password: String,
    pub nonce: Option<Vec<u8>>,
    pub counter: u8,
}

impl Client {
    pub fn new(t: FiveTuple, user: &str, password: &str) -> Self {
        Client {
            t,
            user: user.into(),
            password: password.into(),
            nonce: None,
            counter: 0,
        }
    }

    pub fn key(&self) -> [u8; 16] {
        stun_proto::long_term_key_md5(&self.user, REALM, &self.password)
    }

    pub fn txid(&mut self) -> [u8; 12] {
        // Wraps after 255 requests (long-running loops in a test).
        self.counter = self.counter.wrapping_add(1);
        [self.counter; 12]
    }

    /// Builds a request; with a nonce known, it is authenticated.
    pub fn build(&mut self, m: u16, txid: [u8; 12], f: &dyn Fn(&mut MessageBuilder)) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut b = MessageBuilder::new(&mut buf, MessageType::new(m, Class::Request), &txid);
        f(&mut b);
        if let Some(n) = &self.nonce {
            b.attr(attr::USERNAME, self.user.as_bytes())
                .attr(attr::REALM, REALM.as_bytes())
                .attr(attr::NONCE, n)
                .message_integrity(&self.key());
        }
        buf
    }

    /// Learns a nonce from the 401 to an unauthenticated minimal Allocate,
    /// allocating nothing.
    pub fn learn_nonce(&mut self, h: &mut Harness) {
        let txid = self.txid();
        let mut buf = Vec::new();
        MessageBuilder::new(
            &mut buf,
            MessageType::new(method::ALLOCATE, Class::Request),
            &txid,
        )
        .u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
        let (_, resp) = h.send(self.t, &buf).expect("a 401");
        let msg = Message::parse(&resp).unwrap();
        assert_eq!(msg.error_code().map(|e| e.0), Some(401));
        self.nonce = Some(msg.get(attr::NONCE).unwrap().to_vec());
    }

    /// Sends a request, learning the nonce from a 401/438 and retrying once,
    /// as real clients do. Returns the final response bytes.
    pub fn request(&mut self, h: &mut Harness, m: u16, f: &dyn Fn(&mut MessageBuilder)) -> Vec<u8> {
        if self.nonce.is_none() && m != method::ALLOCATE {
            // A bare request this small gets no challenge (challenge.rs);
            // a real client has its nonce from the Allocate.
            self.learn_nonce(h);
        }
        for _ in 0..2 {
            let txid = self.txid();
            let req = self.build(m, txid, f);
            let (dest, resp) = h.send(self.t, &req).expect("a request gets a response");
            assert_eq!(dest, Dest::Client(self.t));
            let msg = Message::parse(&resp).unwrap();
            assert_eq!(msg.transaction_id(), txid);
            match msg.error_code() {
                Some((401 | 438, _)) if self.nonce.is_none() || msg.error_code().unwrap().0 == 438 => {
                    self.nonce = Some(msg.get(attr::NONCE).unwrap().to_vec());
                }
                _ => return resp,
            }
        }
        panic!("authentication did not converge")
    }

    pub fn allocate(&mut self, h: &mut Harness) -> SocketAddr {
        let resp = self.request(h, method::ALLOCATE, &|b| {
            b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
        });
        let m = Message::parse(&resp).unwrap();
        assert_eq!(
            m.message_type().class,
            Class::Success,
            "allocate failed: {:?}",
            m.error_code()
        );
        m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap()
    }

    pub fn permit(&mut self, h: &mut Harness, peer: &str) -> Vec<u8> {
        let peer: SocketAddr = peer.parse().unwrap();
        self.request(h, method::CREATE_PERMISSION, &move |b| {
            b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    pub fn bind(&mut self, h: &mut Harness, ch: u16, peer: &str) -> Vec<u8> {
        let peer: SocketAddr = peer.parse().unwrap();
        self.request(h, method::CHANNEL_BIND, &move |b| {
            b.u32(attr::CHANNEL_NUMBER, (ch as u32) << 16)
                .xor_addr(attr::XOR_PEER_ADDRESS, peer);
        })
    }

    pub fn refresh(&mut self, h: &mut Harness, lifetime: Option<u32>) -> Vec<u8> {
        self.request(h, method::REFRESH, &move |b| {
            if let Some(l) = lifetime {
                b.u32(attr::LIFETIME, l);
            }
        })
    }
}

pub fn code(resp: &[u8]) -> Option<u16> {
    Message::parse(resp).unwrap().error_code().map(|(c, _)| c)
}

pub fn is_success(resp: &[u8]) -> bool {
    Message::parse(resp).unwrap().message_type().class == Class::Success
}

pub fn send_indication(peer: &str, data: &[u8]) -> Vec<u8> {
    let mut buf = Vec::new();
    MessageBuilder::new(
        &mut buf,
        MessageType::new(method::SEND, Class::Indication),
        &[3; 12],
    )
    .xor_addr(attr::XOR_PEER_ADDRESS, peer.parse().unwrap())
    .attr(attr::DATA, data);
    buf
}

pub fn channel_data(ch: u16, data: &[u8]) -> Vec<u8> {
    let mut v = ChannelData::header(ch, data.len() as u16).to_vec();
    v.extend_from_slice(data);
    v
}

pub fn binding(with_fp: bool, extra: Option<(u16, &[u8])>) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut b = MessageBuilder::new(
        &mut buf,
        MessageType::new(method::BINDING, Class::Request),
        &[1; 12],
    );
    if let Some((t, v)) = extra {
        b.attr(t, v);
    }
    if with_fp {
        b.fingerprint();
    }
    buf
}
