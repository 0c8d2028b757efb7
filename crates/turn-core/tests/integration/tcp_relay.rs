//! RFC 6062 TCP relay allocations, with fake time and fake sockets:
//! Allocate (§5.1), Connect (§5.2: 403, 446, 447 and its timeout), peer
//! connections (§5.3: ConnectionAttempt, no permission, unbound expiry),
//! ConnectionBind (§5.4: unknown or used ids, wrong user, UDP), and the
//! lifetimes of data connections (§5.5).

use crate::common;

use std::net::SocketAddr;

use common::*;
use stun_proto::{attr, method, Class, Message};
use turn_core::{Dest, FiveTuple, Transport};

const TCP: u32 = 0x0600_0000;

fn control() -> FiveTuple {
    tuple(Transport::Tcp, "203.0.113.5:40100")
}

fn data_conn(port: u16) -> FiveTuple {
    tuple(Transport::Tcp, &format!("203.0.113.5:{port}"))
}

/// A TCP allocation on `t`; its relayed address.
fn tcp_allocation(h: &mut Harness, c: &mut Client) -> SocketAddr {
    let resp = c.request(h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TCP);
    });
    assert!(is_success(&resp), "{:?}", code(&resp));
    assert!(h.relays.requests.last().unwrap().tcp, "a TCP relay was asked for");
    Message::parse(&resp)
        .unwrap()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap()
}

/// Sends Connect to `peer`; the core asks the runtime to connect and
/// answers nothing yet. Returns the connection id the runtime was given.
fn connect(h: &mut Harness, c: &mut Client, peer: &str) -> Result<u32, u16> {
    let peer: SocketAddr = peer.parse().unwrap();
    let txid = c.txid();
    let req = c.build(method::CONNECT, txid, &move |b| {
        b.xor_addr(attr::XOR_PEER_ADDRESS, peer);
    });
    let before = h.relays.connects.len();
    if let Some((_, resp)) = h.send(c.t, &req) {
        return Err(code(&resp).unwrap());
    }
    assert_eq!(h.relays.connects.len(), before + 1, "one connect started");
    let (id, _, to) = *h.relays.connects.last().unwrap();
    assert_eq!(to, peer);
    Ok(id)
}

/// The runtime reports the connect done: the Connect answer.
fn connected(h: &mut Harness, id: u32, ok: bool) -> Vec<u8> {
    h.server.handle_peer_connected(h.now, id, ok);
    let (dest, resp) = h.drive().expect("the Connect is answered");
    assert_eq!(dest, Dest::Client(control()));
    resp
}

fn connection_bind(h: &mut Harness, c: &mut Client, id: u32) -> Vec<u8> {
    c.request(h, method::CONNECTION_BIND, &move |b| {
        b.u32(attr::CONNECTION_ID, id);
    })
}

#[test]
fn tcp_allocations_need_a_stream_and_no_udp_only_attributes() {
    let mut h = Harness::new();
    let mut u = Client::new(udp(), "alice", "wonderland");
    let resp = u.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TCP);
    });
    assert_eq!(code(&resp), Some(400), "TCP relay over UDP");
    let mut c = Client::new(control(), "alice", "wonderland");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, TCP).attr(attr::EVEN_PORT, &[0]);
    });
    assert_eq!(code(&resp), Some(400), "EVEN-PORT with TCP");
    let resp = c.request(&mut h, method::ALLOCATE, &|b| {
        b.u32(attr::REQUESTED_TRANSPORT, 0x0700_0000);
    });
    assert_eq!(code(&resp), Some(442), "neither UDP nor TCP");
    tcp_allocation(&mut h, &mut c);
    // No channels and no Send on a TCP allocation.
    assert_eq!(code(&c.bind(&mut h, 0x4000, "8.8.8.8:80")), Some(400));
    assert!(h.send(c.t, &send_indication("8.8.8.8:80", b"x")).is_none());
}

#[test]
fn connect_answers_with_a_connection_id_and_binds_a_data_connection() {
    let mut h = Harness::new();
    let mut c = Client::new(control(), "alice", "wonderland");
    let relay = tcp_allocation(&mut h, &mut c);
    let id = connect(&mut h, &mut c, "8.8.8.8:80").unwrap();
    assert_eq!(
        h.relays.connects.last().unwrap().1,
        relay,
        "from the relayed address"
    );
    // Nothing is answered until the connect completes.
    assert!(h.server.poll_transmit().is_none());
    let resp = connected(&mut h, id, true);
    assert!(is_success(&resp), "{:?}", code(&resp));
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.get_u32(attr::CONNECTION_ID), Some(id));
    assert!(m.has_integrity(), "signed with the allocation's key");
    // A second Connect to the same peer: 446.
    assert_eq!(connect(&mut h, &mut c, "8.8.8.8:80"), Err(446));
    // ConnectionBind on a new connection, as the same user.
    let mut d = Client::new(data_conn(40101), "alice", "wonderland");
    let resp = connection_bind(&mut h, &mut d, id);
    assert!(is_success(&resp), "{:?}", code(&resp));
    assert_eq!(h.relays.bound, vec![(id, d.t)]);
    // Used once only.
    let mut e = Client::new(data_conn(40102), "alice", "wonderland");
    assert_eq!(code(&connection_bind(&mut h, &mut e, id)), Some(400));
    // A bound connection outlives its permission and the 30 s bind timer.
    h.advance(400);
    assert!(is_success(&c.refresh(&mut h, Some(600))));
    assert!(!h.relays.closed_conns.contains(&id), "still relaying");
    // The data connection closing closes the peer side.
    h.connection_closed(d.t);
    assert_eq!(h.relays.closed_conns, vec![id]);
    assert_eq!(h.server.tcp_connection_count(), 0);
}

#[test]
fn refused_failed_and_slow_connects() {
    let mut h = Harness::new();
    let mut c = Client::new(control(), "alice", "wonderland");
    tcp_allocation(&mut h, &mut c);
    // The peer policy applies as for CreatePermission.
    assert_eq!(connect(&mut h, &mut c, "10.0.0.1:80"), Err(403));
    assert_eq!(connect(&mut h, &mut c, "127.0.0.1:80"), Err(403));
    assert_eq!(connect(&mut h, &mut c, "[2001:4860::1]:80"), Err(443));
    // A failed connect: 447, and the peer may be tried again.
    let id = connect(&mut h, &mut c, "8.8.8.8:80").unwrap();
    assert_eq!(code(&connected(&mut h, id, false)), Some(447));
    let id = connect(&mut h, &mut c, "8.8.8.8:80").unwrap();
    // No completion within 30 s: 447, and the runtime closes its socket.
    h.now += std::time::Duration::from_secs(31);
    h.server.handle_timeout(h.now);
    let (_, resp) = h.drive().expect("the Connect is answered");
    assert_eq!(code(&resp), Some(447));
    assert!(h.relays.closed_conns.contains(&id));
    // A completion that comes after that is refused: the socket is closed.
    h.server.handle_peer_connected(h.now, id, true);
    h.drive();
    assert_eq!(h.relays.closed_conns.iter().filter(|x| **x == id).count(), 2);
    // Connect needs a TCP allocation on this connection.
    let mut other = Client::new(data_conn(40103), "alice", "wonderland");
    other.learn_nonce(&mut h);
    assert_eq!(connect(&mut h, &mut other, "8.8.8.8:80"), Err(437));
    let mut u = Client::new(udp(), "alice", "wonderland");
    u.allocate(&mut h);
    assert_eq!(connect(&mut h, &mut u, "8.8.8.8:80"), Err(400));
}

#[test]
fn peers_that_connect_need_a_permission_and_a_bind_within_30_s() {
    let mut h = Harness::new();
    let mut c = Client::new(control(), "alice", "wonderland");
    let relay = tcp_allocation(&mut h, &mut c);
    let peer: SocketAddr = "8.8.4.4:5555".parse().unwrap();
    assert_eq!(
        h.server.handle_peer_connection(h.now, relay, peer),
        None,
        "no permission: closed at once"
    );
    assert!(
        h.server.poll_transmit().is_none(),
        "and nothing told to the client"
    );
    assert!(is_success(&c.permit(&mut h, "8.8.4.4:1")));
    let id = h
        .server
        .handle_peer_connection(h.now, relay, peer)
        .expect("accepted");
    let t = h.server.poll_transmit().expect("a ConnectionAttempt");
    assert_eq!(t.dest, Dest::Client(control()));
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(m.message_type().method, method::CONNECTION_ATTEMPT);
    assert_eq!(m.message_type().class, Class::Indication);
    assert_eq!(m.get_u32(attr::CONNECTION_ID), Some(id));
    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(), peer);
    // Not bound within 30 s: closed.
    h.advance(31);
    assert_eq!(h.relays.closed_conns, vec![id]);
    let mut d = Client::new(data_conn(40104), "alice", "wonderland");
    assert_eq!(code(&connection_bind(&mut h, &mut d, id)), Some(400), "gone");
    // Another user cannot take a connection, nor can UDP.
    assert!(is_success(&c.permit(&mut h, "8.8.4.4:1")));
    let id = h.server.handle_peer_connection(h.now, relay, peer).unwrap();
    let _ = h.server.poll_transmit();
    let mut bob = Client::new(data_conn(40105), "bob", "builder");
    assert_eq!(code(&connection_bind(&mut h, &mut bob, id)), Some(441));
    let mut u = Client::new(tuple(Transport::Udp, "203.0.113.5:40106"), "alice", "wonderland");
    assert_eq!(code(&connection_bind(&mut h, &mut u, id)), Some(400));
    assert_eq!(
        code(&connection_bind(&mut h, &mut d, 0x0012_3456)),
        Some(400),
        "unknown id"
    );
    assert_eq!(
        code(&connection_bind(&mut h, &mut c, id)),
        Some(400),
        "not on the control connection"
    );
    assert!(is_success(&connection_bind(&mut h, &mut d, id)));
}

#[test]
fn the_allocation_takes_its_data_connections_along() {
    let mut h = Harness::new();
    let mut c = Client::new(control(), "alice", "wonderland");
    let relay = tcp_allocation(&mut h, &mut c);
    let a = connect(&mut h, &mut c, "8.8.8.8:80").unwrap();
    assert!(is_success(&connected(&mut h, a, true)));
    assert!(is_success(&c.permit(&mut h, "8.8.4.4:1")));
    let b = h
        .server
        .handle_peer_connection(h.now, relay, "8.8.4.4:9".parse().unwrap())
        .unwrap();
    let _ = h.server.poll_transmit();
    let mut d = Client::new(data_conn(40107), "alice", "wonderland");
    assert!(is_success(&connection_bind(&mut h, &mut d, b)));
    // A connect still in flight goes too.
    let pending = connect(&mut h, &mut c, "1.1.1.1:443").unwrap();
    // The control connection closes: every data connection closes.
    h.connection_closed(control());
    let mut closed = h.relays.closed_conns.clone();
    closed.sort();
    let mut want = vec![a, b, pending];
    want.sort();
    assert_eq!(closed, want);
    assert_eq!(h.server.tcp_connection_count(), 0);
    assert_eq!(h.server.allocation_count(), 0);
}

#[test]
fn connections_per_allocation_are_capped() {
    let mut h = Harness::with(|c| c.max_tcp_connections = 2);
    let mut c = Client::new(control(), "alice", "wonderland");
    let relay = tcp_allocation(&mut h, &mut c);
    connect(&mut h, &mut c, "8.8.8.8:1").unwrap();
    connect(&mut h, &mut c, "8.8.8.8:2").unwrap();
    assert_eq!(connect(&mut h, &mut c, "8.8.8.8:3"), Err(508));
    assert!(is_success(&c.permit(&mut h, "8.8.4.4:1")));
    assert_eq!(
        h.server
            .handle_peer_connection(h.now, relay, "8.8.4.4:2".parse().unwrap()),
        None
    );
    assert_eq!(h.server.counters().tcp_refused_limit, 2);
}

/// A binary upgrade takes an RFC 6062 allocation over with its peer data
/// connections: bound ones stay bound to their data connection, pending
/// ones keep what was left of their 30 s, and one with a connect in flight
/// keeps the allocation where it is until the connect is done.
#[test]
fn an_upgrade_takes_a_tcp_allocation_over_with_its_connections() {
    let mut h = Harness::new();
    let mut c = Client::new(control(), "alice", "wonderland");
    let relay = tcp_allocation(&mut h, &mut c);
    let bound = connect(&mut h, &mut c, "8.8.8.8:80").unwrap();
    assert!(is_success(&connected(&mut h, bound, true)));
    let mut d = Client::new(data_conn(40101), "alice", "wonderland");
    assert!(is_success(&connection_bind(&mut h, &mut d, bound)));
    let pending = connect(&mut h, &mut c, "8.8.8.8:81").unwrap();
    assert!(is_success(&connected(&mut h, pending, true)));
    h.advance(10);
    let in_flight = connect(&mut h, &mut c, "8.8.8.8:82").unwrap();
    // A connect in flight cannot move (its socket is mid-handshake).
    assert!(h.server.snapshot(h.now).allocations.is_empty());
    assert_eq!(h.server.stays_behind(), 1);
    assert!(is_success(&connected(&mut h, in_flight, true)));

    let snap = crate::snapshot::carried(&h.server.snapshot(h.now));
    assert_eq!(h.server.stays_behind(), 0);
    let a = &snap.allocations[0];
    assert!(a.tcp);
    assert_eq!(a.relays[0].bound, relay);
    let ids: Vec<u32> = a.tcp_conns.iter().map(|t| t.id).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let (mut next, _) = crate::snapshot::successor(&h);
    let done = next.server.restore(next.now, &snap, &Some).unwrap();
    assert_eq!((done.allocations, done.dropped), (1, 0));
    assert_eq!(next.server.tcp_connection_count(), 3);
    // The old server lets them go without closing anything.
    assert_eq!(h.server.hand_over(&snap), 1);
    assert_eq!(h.server.tcp_connection_count(), 0);
    assert!(h.relays.closed_conns.is_empty());

    // The new one knows them: a second Connect to a connected peer is
    // 446; the pending one gives up 20 s later (30 s from its connect);
    // the bound one outlives that and ends with its data connection.
    assert_eq!(connect(&mut next, &mut c, "8.8.8.8:81"), Err(446));
    next.advance(19);
    assert!(next.relays.closed_conns.is_empty());
    next.advance(2);
    assert_eq!(next.relays.closed_conns, vec![pending]);
    assert!(is_success(&c.refresh(&mut next, Some(600))));
    next.connection_closed(d.t);
    assert_eq!(next.relays.closed_conns, vec![pending, bound]);
    // The in-flight one, done before the snapshot, is pending too.
    next.advance(10);
    assert_eq!(next.relays.closed_conns, vec![pending, bound, in_flight]);
    // A new ConnectionBind for a fresh peer connection still works.
    let id = connect(&mut next, &mut c, "8.8.8.8:83").unwrap();
    assert!(is_success(&connected(&mut next, id, true)));
    let mut e = Client::new(data_conn(40102), "alice", "wonderland");
    assert!(is_success(&connection_bind(&mut next, &mut e, id)));
}
