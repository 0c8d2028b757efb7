//! RFC 8016 mobility over real sockets: a client streaming through a
//! channel changes its address (a new socket from another loopback IP, as
//! Wi-Fi to cellular would) and carries its allocation over with its
//! ticket: nothing lost, the peer's answers reach the new address, the old
//! one is served no more. Without `--mobility`, asking for it is 405.

use crate::common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::*;
use turnpike_client::client::{Channel, ClientError, ClientTransport, Received, TurnClient};

const PACKETS: u32 = 400;

fn udp_from(ip: &str, server: SocketAddr) -> Channel {
    Channel::connect_from(
        &ClientTransport::Udp,
        server,
        Some(ip.parse().unwrap()),
        Duration::from_secs(2),
    )
    .unwrap()
}

#[test]
fn a_client_that_changes_address_keeps_its_allocation_and_loses_nothing() {
    let h = start(&["--mobility", "--allow-loopback-peers"]);
    let server = h.listen[0];
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut c = TurnClient::new(udp_from("127.0.0.1", server), USER, PASSWORD);
    c.set_mobility(true);
    let relayed = c.allocate().unwrap().relayed;
    let first = c.mobility_ticket().expect("a ticket on Allocate").to_vec();
    c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();

    let receiver = std::thread::spawn(move || {
        let mut got = vec![false; PACKETS as usize];
        let mut buf = [0u8; 64];
        let mut from_relay = true;
        let end = Instant::now() + Duration::from_secs(10);
        while got.iter().any(|g| !g) && Instant::now() < end {
            if let Ok((4, from)) = peer.recv_from(&mut buf) {
                from_relay &= from == relayed;
                got[u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize] = true;
            }
        }
        (got.iter().filter(|g| !**g).count(), from_relay, peer)
    });
    let mut last_ip = String::new();
    for seq in 0..PACKETS {
        if seq > 0 && seq % 50 == 0 {
            // The address changes: a socket from another loopback IP (so
            // the nonce must be learned again), and the ticket moves the
            // allocation there. Eight moves: the two workers each receive
            // some of the new addresses (SO_REUSEPORT hashes them), so
            // some moves cross from one worker to the other.
            last_ip = format!("127.0.0.{}", 2 + seq / 50);
            c.move_to(udp_from(&last_ip, server)).unwrap();
        }
        c.send_channel(0x4000, &seq.to_be_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let (lost, from_relay, peer) = receiver.join().unwrap();
    assert_eq!(lost, 0, "packets lost across the move");
    assert!(from_relay, "every packet came from the same relayed address");
    let last = c.mobility_ticket().unwrap().to_vec();
    assert_ne!(first, last, "a move gives a new ticket");
    // The peer's answer reaches the new address through the channel.
    peer.send_to(b"back", relayed).unwrap();
    match c.recv(Duration::from_secs(2)).unwrap() {
        Received::Channel {
            channel: 0x4000,
            data,
        } => assert_eq!(data, b"back"),
        other => panic!("{other:?}"),
    }
    // It refreshes from there; the session list shows the new address.
    c.refresh(600).unwrap();
    let s = h.control().sessions();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].tuple.client.ip().to_string(), last_ip);
    c.refresh(0).unwrap();
    h.shutdown();
}

#[test]
fn without_mobility_asking_for_it_is_405() {
    let h = start(&[]);
    let mut c = TurnClient::new(udp_from("127.0.0.1", h.listen[0]), USER, PASSWORD);
    c.set_mobility(true);
    match c.allocate() {
        Err(ClientError::Error { code: 405, .. }) => {}
        other => panic!("{other:?}"),
    }
    h.shutdown();
}
