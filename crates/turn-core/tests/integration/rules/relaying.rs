//! Permissions and Send/Data (RFC 8656 §9, §11), the peer policy, and
//! channels (§12).

use crate::common;

use common::*;
use stun_proto::{attr, method, Class, Message, MessageType};
use turn_core::{Dest, Event, Transport};

// ---- Permissions, Send/Data (RFC 8656 §9, §11) ----

#[test]
fn send_and_data_indications_relay_with_permission_only() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    // No permission yet: both directions dropped.
    assert!(h.send(udp(), &send_indication("8.8.8.8:5000", b"hi")).is_none());
    assert!(h.peer_sends(relay, "8.8.8.8:5000", b"yo").is_none());

    assert!(is_success(&c.permit(&mut h, "8.8.8.8:1")));
    let (dest, data) = h.send(udp(), &send_indication("8.8.8.8:5000", b"hi")).unwrap();
    assert_eq!(
        dest,
        Dest::Peer {
            relay,
            peer: "8.8.8.8:5000".parse().unwrap()
        }
    );
    assert_eq!(data, b"hi");
    // Permission is by IP only: another port of the same IP works.
    assert!(h.send(udp(), &send_indication("8.8.8.8:6000", b"hi")).is_some());
    // Another IP is still dropped.
    assert!(h.send(udp(), &send_indication("8.8.4.4:5000", b"hi")).is_none());

    let (dest, data) = h.peer_sends(relay, "8.8.8.8:7000", b"yo").unwrap();
    assert_eq!(dest, Dest::Client(udp()));
    let m = Message::parse(&data).unwrap();
    assert_eq!(
        m.message_type(),
        MessageType::new(method::DATA, Class::Indication)
    );
    assert_eq!(
        m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(),
        "8.8.8.8:7000".parse().unwrap()
    );
    assert_eq!(m.get(attr::DATA).unwrap(), b"yo");
    assert!(
        h.peer_sends(relay, "8.8.4.4:7000", b"yo").is_none(),
        "peer without permission dropped"
    );
}

#[test]
fn permission_expires_after_300s_and_stops_relaying() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.permit(&mut h, "8.8.8.8:1");
    h.advance(299);
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_some());
    h.advance(1);
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_none());
    assert!(h.send(udp(), &send_indication("8.8.8.8:1", b"x")).is_none());
    // Refreshing the permission restores relaying.
    c.permit(&mut h, "8.8.8.8:1");
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_some());
}

#[test]
fn create_permission_is_all_or_nothing_and_needs_a_peer() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    let resp = c.request(&mut h, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, "8.8.8.8:1".parse().unwrap())
            .xor_addr(attr::XOR_PEER_ADDRESS, "10.0.0.1:1".parse().unwrap());
    });
    assert_eq!(code(&resp), Some(403));
    assert!(
        h.peer_sends(relay, "8.8.8.8:1", b"x").is_none(),
        "nothing installed"
    );
    assert_eq!(
        code(&c.request(&mut h, method::CREATE_PERMISSION, &|_| {})),
        Some(400)
    );
    let resp = c.request(&mut h, method::CREATE_PERMISSION, &|b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, "8.8.8.8:1".parse().unwrap())
            .xor_addr(attr::XOR_PEER_ADDRESS, "1.1.1.1:1".parse().unwrap());
    });
    assert!(is_success(&resp));
    assert!(h.peer_sends(relay, "1.1.1.1:9", b"x").is_some());
}

// ---- Peer policy ----

#[test]
fn refused_peers_get_403_and_send_is_dropped() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    h.events();
    for peer in [
        "10.0.0.1:1",
        "127.0.0.1:1",
        "169.254.169.254:80",
        "192.168.1.1:1",
        "0.0.0.0:1",
    ] {
        assert_eq!(code(&c.permit(&mut h, peer)), Some(403), "{peer}");
        assert_eq!(code(&c.bind(&mut h, 0x4001, peer)), Some(403), "{peer}");
    }
    assert!(h.send(udp(), &send_indication("127.0.0.1:1", b"x")).is_none());
    let refusals = h
        .events()
        .iter()
        .filter(|e| matches!(e, Event::PeerRefused { .. }))
        .count();
    assert_eq!(refusals, 11, "every refusal is reported for logging");
}

#[test]
fn family_mismatch_is_443() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert_eq!(code(&c.permit(&mut h, "[2606:4700::1]:1")), Some(443));
    assert_eq!(code(&c.bind(&mut h, 0x4000, "[2606:4700::1]:1")), Some(443));
    // An IPv4-mapped form of a loopback address is refused either way.
    assert!(matches!(
        code(&c.permit(&mut h, "[::ffff:127.0.0.1]:1")),
        Some(443 | 403)
    ));
    let resp = c.request(&mut h, method::REFRESH, &|b| {
        b.attr(attr::REQUESTED_ADDRESS_FAMILY, &[2, 0, 0, 0]);
    });
    assert_eq!(code(&resp), Some(443));
}

#[test]
fn allow_loopback_and_operator_ranges() {
    let mut h = Harness::with(|c| {
        c.policy.allow_loopback = true;
        c.policy.allow = vec!["10.1.0.0/16".parse().unwrap()];
        c.policy.deny = vec!["8.8.8.0/24".parse().unwrap()];
    });
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.permit(&mut h, "127.0.0.1:1")));
    assert!(is_success(&c.permit(&mut h, "10.1.2.3:1")));
    assert_eq!(code(&c.permit(&mut h, "10.2.0.1:1")), Some(403));
    assert_eq!(code(&c.permit(&mut h, "8.8.8.8:1")), Some(403));
    // The 403's refusal names the peer and the range that matched.
    let why: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::RequestRefused {
                code,
                detail: Some(d),
                ..
            } if code.code() == 403 => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert!(
        why.last()
            .is_some_and(|w| w.starts_with("peer 8.8.8.8:1 in deny-peer 8.8.8.0/24")),
        "{why:?}"
    );
}

/// Both legs of a call through one server: another allocation's relayed
/// address on this host is a peer even where the default ranges refuse its
/// IP (here TEST-NET-2, as a private or loopback relay address would be),
/// while it is live; an operator's deny-peer still refuses it.
#[test]
fn another_allocations_relayed_address_is_a_peer_while_it_lives() {
    let mut h = Harness::new();
    let mut a = Client::new(udp(), "alice", "wonderland");
    let mut b = Client::new(tuple(Transport::Udp, "203.0.113.6:40000"), "bob", "builder");
    a.allocate(&mut h);
    let b_relay = b.allocate(&mut h);
    assert!(b_relay.ip().to_string().starts_with("198.51.100."), "{b_relay}");
    assert!(is_success(&a.permit(&mut h, &b_relay.to_string())));
    assert!(is_success(&a.bind(&mut h, 0x4000, &b_relay.to_string())));
    // Another port of the same address is no relay: refused as before.
    let other = std::net::SocketAddr::new(b_relay.ip(), b_relay.port() + 1000);
    assert_eq!(code(&a.permit(&mut h, &other.to_string())), Some(403));
    // Once bob's allocation is gone, so is the exception.
    assert!(is_success(&b.refresh(&mut h, Some(0))));
    h.drive();
    assert_eq!(code(&a.bind(&mut h, 0x4001, &b_relay.to_string())), Some(403));

    let mut h = Harness::with(|c| c.policy.deny = vec!["198.51.100.0/24".parse().unwrap()]);
    let mut a = Client::new(udp(), "alice", "wonderland");
    let mut b = Client::new(tuple(Transport::Udp, "203.0.113.6:40000"), "bob", "builder");
    a.allocate(&mut h);
    let b_relay = b.allocate(&mut h);
    assert_eq!(
        code(&a.permit(&mut h, &b_relay.to_string())),
        Some(403),
        "deny-peer wins"
    );
}

// ---- Channels (RFC 8656 §12) ----

#[test]
fn channel_number_ranges() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")));
    assert!(is_success(&c.bind(&mut h, 0x4FFF, "8.8.8.8:2")));
    assert_eq!(code(&c.bind(&mut h, 0x3FFF, "8.8.8.8:3")), Some(400));
    h.events();
    assert_eq!(code(&c.bind(&mut h, 0x5000, "8.8.8.8:3")), Some(400));
    // The refusal names the range and the way out for older clients.
    let why: Vec<String> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::RequestRefused { detail: Some(d), .. } => Some(d.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(
        why,
        ["channel 0x5000 outside 0x4000-0x4FFF (RFC 8656 §12); older clients: --rfc5766-channel-numbers"]
    );
    assert_eq!(code(&c.bind(&mut h, 0x7FFF, "8.8.8.8:3")), Some(400));
    assert_eq!(
        code(&c.request(&mut h, method::CHANNEL_BIND, &|b| {
            b.u32(attr::CHANNEL_NUMBER, 0x4005_0000);
        })),
        Some(400),
        "missing XOR-PEER-ADDRESS"
    );

    let mut h = Harness::with(|c| c.legacy_channel_numbers = true);
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x5000, "8.8.8.8:3")));
    assert!(is_success(&c.bind(&mut h, 0x7FFF, "8.8.8.8:4")));
    assert_eq!(code(&c.bind(&mut h, 0x3FFF, "8.8.8.8:5")), Some(400));
}

#[test]
fn channel_conflicts_are_400_rebinding_same_pair_refreshes() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")));
    assert_eq!(
        code(&c.bind(&mut h, 0x4000, "8.8.8.8:2")),
        Some(400),
        "number bound to another peer"
    );
    assert_eq!(
        code(&c.bind(&mut h, 0x4001, "8.8.8.8:1")),
        Some(400),
        "peer bound to another number"
    );
    assert!(
        is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")),
        "same pair refreshes"
    );
}

#[test]
fn channel_data_relays_both_ways_and_channel_expires_after_600s() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    assert!(is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")));
    let (dest, data) = h.send(udp(), &channel_data(0x4000, b"media")).unwrap();
    assert_eq!(
        dest,
        Dest::Peer {
            relay,
            peer: "8.8.8.8:1".parse().unwrap()
        }
    );
    assert_eq!(data, b"media");
    let (_, data) = h.peer_sends(relay, "8.8.8.8:1", b"back").unwrap();
    assert_eq!(
        data,
        channel_data(0x4000, b"back"),
        "ChannelData, unpadded over UDP"
    );
    // A different port of the permitted IP has no channel: Data indication.
    let (_, data) = h.peer_sends(relay, "8.8.8.8:2", b"x").unwrap();
    assert!(Message::parse(&data).is_ok());
    // Unknown channel: dropped.
    assert!(h.send(udp(), &channel_data(0x4001, b"x")).is_none());

    // Keep the allocation and permission alive; let the channel run out at 600 s.
    for _ in 0..2 {
        h.advance(250);
        c.permit(&mut h, "8.8.8.8:1");
        c.refresh(&mut h, None);
    }
    h.advance(99);
    assert!(h.send(udp(), &channel_data(0x4000, b"x")).is_some(), "599 s");
    h.advance(1);
    assert!(
        h.send(udp(), &channel_data(0x4000, b"x")).is_none(),
        "600 s: expired"
    );
    let (_, data) = h.peer_sends(relay, "8.8.8.8:1", b"x").unwrap();
    assert!(Message::parse(&data).is_ok(), "falls back to a Data indication");
    // During the cool-down the number cannot go to another peer.
    assert_eq!(code(&c.bind(&mut h, 0x4000, "8.8.4.4:1")), Some(400));
    assert!(
        is_success(&c.bind(&mut h, 0x4000, "8.8.8.8:1")),
        "same peer may rebind"
    );
}

#[test]
fn channel_data_never_refreshes_a_permission() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    for _ in 0..29 {
        h.advance(10);
        assert!(h.send(udp(), &channel_data(0x4000, b"x")).is_some());
    }
    h.advance(10); // 300 s since the bind: the permission is gone
    assert!(h.send(udp(), &channel_data(0x4000, b"x")).is_none());
    assert!(h.peer_sends(relay, "8.8.8.8:1", b"x").is_none());
}

#[test]
fn channel_data_over_tcp_is_padded() {
    let mut h = Harness::new();
    let t = tuple(Transport::Tcp, "203.0.113.5:40000");
    let mut c = Client::new(t, "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    let (_, data) = h.peer_sends(relay, "8.8.8.8:1", b"abcde").unwrap();
    assert_eq!(data.len(), 12);
    assert_eq!(&data[..9], &channel_data(0x4000, b"abcde")[..]);
    assert_eq!(turn_core::stream_frame_len(&data), Some(Ok(12)));
    // A padded frame from the client is accepted.
    let mut framed = channel_data(0x4000, b"abcde");
    framed.resize(12, 0);
    assert_eq!(h.send(t, &framed).unwrap().1, b"abcde");
}

#[test]
fn stats_count_both_directions() {
    let mut h = Harness::new();
    let mut c = Client::new(udp(), "alice", "wonderland");
    c.allocate(&mut h);
    let relay = *h.relays.open.iter().next().unwrap();
    c.bind(&mut h, 0x4000, "8.8.8.8:1");
    let _ = h.send(udp(), &channel_data(0x4000, b"12345"));
    let _ = h.send(udp(), &send_indication("8.8.8.8:1", b"123"));
    let _ = h.peer_sends(relay, "8.8.8.8:1", b"1234567");
    c.refresh(&mut h, Some(0));
    let stats = h.events().into_iter().find_map(|e| match e {
        Event::AllocationDeleted { stats, .. } => Some(stats),
        _ => None,
    });
    let s = stats.unwrap();
    assert_eq!(
        (
            s.to_peer_packets,
            s.to_peer_bytes,
            s.from_peer_packets,
            s.from_peer_bytes
        ),
        (2, 8, 1, 7)
    );
}
