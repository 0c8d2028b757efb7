//! A worker's allocations taken over by a fresh server (the binary
//! upgrade's hand-over): written, sent as JSON, read back, and served as
//! they were, with fake time on both sides.

use crate::common;

use std::sync::Arc;

use common::*;
use stun_proto::{attr, Message};
use turn_core::limits::Quotas;
use turn_core::snapshot::{Snapshot, SnapshotError, SNAPSHOT_VERSION};
use turn_core::{Dest, ErrorCode, ListenerId, Transport};

const PEER: &str = "8.8.8.8:5000";

/// Through JSON, as it crosses between the processes.
pub(crate) fn carried(s: &Snapshot) -> Snapshot {
    serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap()
}

/// A fresh server at the same instant, holding the old one's relay
/// sockets (as the runtime would, handed over), and its quota book.
pub(crate) fn successor(h: &Harness) -> (Harness, Arc<Quotas>) {
    successor_with(h, |_| {})
}

fn successor_with(h: &Harness, f: impl FnOnce(&mut turn_core::Config)) -> (Harness, Arc<Quotas>) {
    let mut quotas = None;
    let mut next = Harness::with_shared(|c, shared| {
        f(c);
        quotas = Some(shared.quotas.clone())
    });
    next.now = h.now;
    next.relays.open = h.relays.open.clone();
    next.relays.next_port = h.relays.next_port;
    (next, quotas.unwrap())
}

#[test]
fn a_restored_server_relays_refreshes_and_counts_as_before() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    let relayed = c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    assert!(is_success(&c.bind(&mut h, 0x4001, PEER)));
    assert!(h.send(udp(), &channel_data(0x4001, b"before")).is_some());
    h.advance(100);

    let snap = carried(&h.server.snapshot(h.now));
    assert_eq!(snap.version, SNAPSHOT_VERSION);
    assert_eq!(snap.allocations.len(), 1);
    let (mut next, quotas) = successor(&h);
    let done = next.server.restore(next.now, &snap, &Some).unwrap();
    assert_eq!((done.allocations, done.dropped), (1, 0));
    assert_eq!(quotas.held_here(), vec![("alice".to_owned(), 1)]);

    // The channel relays both ways from the same relayed address.
    let (dest, data) = next.send(udp(), &channel_data(0x4001, b"after")).unwrap();
    assert_eq!(
        dest,
        Dest::Peer {
            relay,
            peer: PEER.parse().unwrap()
        }
    );
    assert_eq!(data, b"after");
    let (dest, data) = next.peer_sends(relay, PEER, b"back").unwrap();
    assert_eq!(dest, Dest::Client(udp()));
    assert_eq!(data, channel_data(0x4001, b"back"));
    // The permission is by IP, as before: another IP is not let in.
    assert!(next.peer_sends(relay, "8.8.4.4:5000", b"x").is_none());
    // The client's nonce from the old server still authenticates (same
    // secret), and a Refresh extends the allocation here.
    let resp = c.refresh(&mut next, Some(600));
    assert!(is_success(&resp), "{:?}", code(&resp));
    // The session list continues the old counts and names the address the
    // client was given.
    let s = &next.server.sessions(next.now)[0];
    assert_eq!(s.stats.to_peer_packets, 2);
    assert_eq!(s.stats.from_peer_packets, 1);
    assert_eq!(s.relayed, relayed);
}

#[test]
fn lifetimes_permissions_and_channels_keep_their_deadlines() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h); // ends at 600 s
    let relay = *h.relays.open.iter().next().unwrap();
    h.advance(250);
    assert!(is_success(&c.permit(&mut h, PEER))); // ends at 550 s
    h.advance(250);
    let snap = carried(&h.server.snapshot(h.now));
    let (mut next, _) = successor(&h);
    next.server.restore(next.now, &snap, &Some).unwrap();

    next.advance(40); // 540 s
    assert!(
        next.peer_sends(relay, PEER, b"x").is_some(),
        "permission still valid"
    );
    next.advance(20); // 560 s
    assert!(
        next.peer_sends(relay, PEER, b"x").is_none(),
        "permission ended at 550 s"
    );
    assert!(is_success(&c.permit(&mut next, PEER)));
    next.advance(39); // 599 s
    assert!(next.peer_sends(relay, PEER, b"x").is_some());
    next.advance(2); // 601 s: the allocation's 600 s are over
    assert!(next.peer_sends(relay, PEER, b"x").is_none());
    assert_eq!(code(&c.refresh(&mut next, None)), Some(437));
}

#[test]
fn a_retransmitted_allocate_gets_the_same_answer_from_the_new_server() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.learn_nonce(&mut h);
    let txid = c.txid();
    let req = c.build(stun_proto::method::ALLOCATE, txid, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    let (_, first) = h.send(udp(), &req).unwrap();
    let snap = carried(&h.server.snapshot(h.now));
    let (mut next, _) = successor(&h);
    next.server.restore(next.now, &snap, &Some).unwrap();
    let (_, again) = next.send(udp(), &req).unwrap();
    let relayed = |r: &[u8]| {
        Message::parse(r)
            .unwrap()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
    };
    assert_eq!(relayed(&again), relayed(&first));
}

#[test]
fn counters_continue_and_error_counts_survive_the_format() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    // One 437 counted (a second Allocate on the same 5-tuple).
    let resp = c.request(&mut h, stun_proto::method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x1100_0000);
    });
    assert_eq!(code(&resp), Some(437));
    let before = h.server.counters();
    assert_eq!(before.errors[ErrorCode::AllocationMismatch.index()], 1);
    let snap = carried(&h.server.snapshot(h.now));
    let (mut next, _) = successor(&h);
    next.server.restore(next.now, &snap, &Some).unwrap();
    assert_eq!(next.server.counters(), before);
}

#[test]
fn tls_allocations_stay_behind_and_unknown_listeners_are_dropped() {
    let mut h = Harness::new();
    let tls = tuple(Transport::Tls, "203.0.113.9:41000");
    Client::new(tls, "bob", "builder").allocate(&mut h);
    let tcp = tuple(Transport::Tcp, "203.0.113.9:41001");
    Client::new(tcp, "bob", "builder").allocate(&mut h);
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let snap = h.server.snapshot(h.now);
    let mut moved: Vec<Transport> = snap.allocations.iter().map(|a| a.transport).collect();
    moved.sort_by_key(|t| t.as_str());
    assert_eq!(
        moved,
        vec![Transport::Tcp, Transport::Udp],
        "UDP and plain TCP move"
    );
    assert_eq!(h.server.stays_behind(), 1, "the TLS allocation stays");
    // The new runtime has no listener for the old ids: nothing is served.
    let (mut next, quotas) = successor(&h);
    let none = |_: ListenerId| None;
    let done = next.server.restore(next.now, &snap, &none).unwrap();
    assert_eq!((done.allocations, done.dropped), (0, 2));
    assert_eq!(done.lost, vec![0, 1], "which ones, for their usage records");
    assert!(quotas.held_here().is_empty());
}

#[test]
fn another_version_a_busy_server_or_a_bad_allocation_is_refused_whole() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let snap = h.server.snapshot(h.now);

    let mut newer = snap.clone();
    newer.version = SNAPSHOT_VERSION + 1;
    let (mut next, _) = successor(&h);
    let e = next.server.restore(next.now, &newer, &Some).unwrap_err();
    assert_eq!(
        e,
        SnapshotError::Version {
            found: SNAPSHOT_VERSION + 1,
            supported: SNAPSHOT_VERSION
        }
    );
    assert!(e.to_string().contains("this build reads format"), "{e}");

    // Into a server that serves already: refused.
    assert_eq!(
        h.server.restore(h.now, &snap, &Some).unwrap_err(),
        SnapshotError::NotFresh
    );

    // A channel number outside RFC 8656 §12's range refuses the whole
    // snapshot, the good allocation with it.
    let mut bad = snap.clone();
    bad.allocations.push(bad.allocations[0].clone());
    bad.allocations[1].client = "203.0.113.7:1".parse().unwrap();
    bad.allocations[1]
        .channels
        .push(turn_core::snapshot::ChannelState {
            number: 0x3FFF,
            peer: PEER.parse().unwrap(),
            expires_in_ms: 1000,
        });
    let (mut next, quotas) = successor(&h);
    let e = next.server.restore(next.now, &bad, &Some).unwrap_err();
    assert!(
        matches!(e, SnapshotError::Invalid(ref why) if why.contains("0x3fff")),
        "{e}"
    );
    assert!(next.server.sessions(next.now).is_empty());
    assert!(quotas.held_here().is_empty());
    // A field this build does not know is ignored, one it misses defaults.
    let mut v: serde_json::Value = serde_json::to_value(&snap).unwrap();
    v["allocations"][0]["from_a_newer_build"] = serde_json::json!(7);
    v["allocations"][0].as_object_mut().unwrap().remove("stats");
    let read: Snapshot = serde_json::from_value(v).unwrap();
    let (mut next, _) = successor(&h);
    assert_eq!(
        next.server.restore(next.now, &read, &Some).unwrap().allocations,
        1
    );
}

#[test]
fn the_fast_path_gets_the_restored_channels() {
    let mut h = Harness::with(|c| c.fast_path = true);
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4002, PEER)));
    let snap = carried(&h.server.snapshot(h.now));
    let (mut next, _) = successor_with(&h, |c| c.fast_path = true);
    next.server.restore(next.now, &snap, &Some).unwrap();
    let installs: Vec<_> = std::iter::from_fn(|| next.server.poll_command())
        .filter_map(|cmd| match cmd {
            turn_core::Command::FastPathInstall(e) => Some((e.channel, e.peer)),
            _ => None,
        })
        .collect();
    assert_eq!(installs, vec![(0x4002, PEER.parse().unwrap())]);
}

proptest::proptest! {
    /// Whatever a snapshot holds, restoring it refuses it or serves it:
    /// no panic, and the server answers afterwards.
    #[test]
    fn any_snapshot_is_refused_or_served_never_a_panic(
        allocs in proptest::collection::vec(
            (
                any_addr(),
                // Times mostly within a day (served), some beyond (refused).
                proptest::collection::vec((any_addr(), 0u64..90_000_000), 0..3),
                proptest::collection::vec((0x3F00u16..0x8100, any_addr(), -90_000_000i64..90_000_000), 0..3),
                proptest::collection::vec((any_addr(), 0u64..90_000_000), 0..3),
                proptest::num::u64::ANY,
                proptest::option::of(proptest::num::u16::ANY),
            ),
            0..6,
        ),
        version in 0u32..3,
    ) {
        let h = Harness::new();
        let snap = Snapshot {
            version,
            allocations: allocs
                .into_iter()
                .map(|(client, relays, channels, perms, age_ms, err)| turn_core::snapshot::AllocationState {
                    transport: Transport::Udp,
                    client,
                    server: udp().server,
                    listener: ListenerId(0),
                    relays: relays
                        .into_iter()
                        .map(|(bound, expires_in_ms)| turn_core::snapshot::RelayState { bound, expires_in_ms })
                        .collect(),
                    username: "alice".into(),
                    txid: [1; 12],
                    token: None,
                    family_error: err.map(|c| (1, c)),
                    age_ms,
                    permissions: perms
                        .into_iter()
                        .map(|(a, expires_in_ms)| turn_core::snapshot::PermissionState { ip: a.ip(), expires_in_ms })
                        .collect(),
                    channels: channels
                        .into_iter()
                        .map(|(number, peer, expires_in_ms)| turn_core::snapshot::ChannelState {
                            number,
                            peer,
                            expires_in_ms,
                        })
                        .collect(),
                    stats: Default::default(),
                    dont_fragment: false,
                    tcp: false,
                    tcp_conns: Vec::new(),
                    mobility: None,
                })
                .collect(),
            counters: Default::default(),
            data_seq: 0,
            tcp_seq: 0,
        };
        let (mut next, _) = successor(&h);
        // The runtime holds the handed-over relay sockets.
        for a in &snap.allocations {
            for r in &a.relays {
                next.relays.open.insert(r.bound);
            }
        }
        let _ = next.server.restore(next.now, &snap, &Some);
        next.advance(700);
        let (_, resp) = next.send(udp(), &binding(false, None)).unwrap();
        proptest::prop_assert!(is_success(&resp));
    }
}

fn any_addr() -> impl proptest::strategy::Strategy<Value = std::net::SocketAddr> {
    use proptest::strategy::Strategy;
    (
        proptest::num::u8::ANY,
        proptest::num::u16::ANY,
        proptest::bool::ANY,
    )
        .prop_map(|(b, port, v6)| {
            if v6 {
                std::net::SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, b as u16], port))
            } else {
                std::net::SocketAddr::from(([198, 51, 100, b], port))
            }
        })
}

#[test]
fn the_old_server_lets_its_handed_over_allocations_go_quietly() {
    let mut quotas = None;
    let mut h = Harness::with_shared(|_, shared| quotas = Some(shared.quotas.clone()));
    let quotas = quotas.unwrap();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    let tls = tuple(Transport::Tls, "203.0.113.9:41000");
    Client::new(tls, "bob", "builder").allocate(&mut h);
    h.events();
    let snap = h.server.snapshot(h.now);
    assert_eq!(h.server.hand_over(&snap), 1);
    // Its relay socket (this process's copy) is closed; no event says the
    // allocation ended, and no counter counts it as deleted.
    let closes: Vec<_> = std::iter::from_fn(|| h.server.poll_command())
        .filter_map(|cmd| match cmd {
            turn_core::Command::CloseRelay { relay } => Some(relay),
            _ => None,
        })
        .collect();
    assert_eq!(closes, vec![relay]);
    assert!(h.events().is_empty());
    assert_eq!(h.server.counters().allocations_deleted, [0, 0, 0, 0]);
    assert_eq!(quotas.held_here(), vec![("bob".to_owned(), 1)]);
    // The TLS allocation stays and serves.
    assert_eq!(h.server.sessions(h.now).len(), 1);
    assert!(h.send(udp(), &channel_data(0x4001, b"x")).is_none());
}
