//! Dual-stack allocations over real sockets (RFC 8656 §7.2): one Allocate
//! gets an IPv4 relay on 127.0.0.1 and an IPv6 relay on ::1, and data flows
//! both ways through each, picked by the peer's family; over UDP and DTLS.

use crate::common;

use std::net::UdpSocket;
use std::time::Duration;

use common::*;
use stun_proto::attr;
use turnpike_client::client::{ClientTransport, Received, RelayFamily};

#[test]
fn dual_allocation_relays_both_ways_over_127_0_0_1_and_ipv6_loopback() {
    if UdpSocket::bind("[::1]:0").is_err() {
        common::missing("dual-stack", "no IPv6 loopback here");
        return;
    }
    let h = start(&[
        "--allow-loopback-peers",
        "--relay-ip",
        "127.0.0.1",
        "--relay-ip",
        "::1",
    ]);
    // Over UDP, and over DTLS (RFC 7350: what works over UDP works there).
    let over = [
        (ClientTransport::Udp, h.listen[0]),
        (
            ClientTransport::Dtls {
                pinned: h.tls_leaf.clone(),
            },
            h.dtls_listen[0],
        ),
    ];
    for (t, addr) in over {
        dual_allocation_over(&t, addr);
    }
    h.shutdown();
}

fn dual_allocation_over(t: &ClientTransport, addr: std::net::SocketAddr) {
    let mut c = client(t, addr, USER, PASSWORD);
    c.set_relay_family(RelayFamily::Dual);
    let alloc = c.allocate().unwrap();
    let v4 = alloc.relayed;
    let v6 = alloc.additional.expect("an IPv6 relayed address too");
    assert_eq!(v4.ip().to_string(), "127.0.0.1");
    assert_eq!(v6.ip().to_string(), "::1");
    assert_eq!(alloc.family_error, None);

    let p4 = UdpSocket::bind("127.0.0.1:0").unwrap();
    let p6 = UdpSocket::bind("[::1]:0").unwrap();
    for p in [&p4, &p6] {
        p.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    }
    let (a4, a6) = (p4.local_addr().unwrap(), p6.local_addr().unwrap());
    c.create_permission(&[a4, a6]).unwrap();
    let mut buf = [0u8; 2048];
    // Each peer is reached from the relay of its own family.
    c.send_indication(a4, b"to v4").unwrap();
    let (n, from) = p4.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"to v4"[..], v4));
    c.send_indication(a6, b"to v6").unwrap();
    let (n, from) = p6.recv_from(&mut buf).unwrap();
    assert_eq!((&buf[..n], from), (&b"to v6"[..], v6));
    // And back, through each relay.
    p6.send_to(b"from v6", v6).unwrap();
    assert_eq!(
        c.recv(Duration::from_secs(3)).unwrap(),
        Received::Data {
            peer: a6,
            data: b"from v6".to_vec()
        }
    );
    c.channel_bind(0x4002, a6).unwrap();
    c.send_channel(0x4002, b"chan v6").unwrap();
    let (n, _) = p6.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"chan v6");
    p4.send_to(b"from v4", v4).unwrap();
    assert_eq!(
        c.recv(Duration::from_secs(3)).unwrap(),
        Received::Data {
            peer: a4,
            data: b"from v4".to_vec()
        }
    );

    // Refresh(0) for IPv6 alone ends only that relay (RFC 8656 §7.3).
    c.transaction(stun_proto::method::REFRESH, &|b| {
        b.u32(attr::LIFETIME, 0)
            .attr(attr::REQUESTED_ADDRESS_FAMILY, &[attr::FAMILY_IPV6, 0, 0, 0]);
    })
    .unwrap();
    p6.send_to(b"late", v6).unwrap();
    p4.send_to(b"still here", v4).unwrap();
    assert_eq!(
        c.recv(Duration::from_secs(3)).unwrap(),
        Received::Data {
            peer: a4,
            data: b"still here".to_vec()
        },
        "the IPv4 relay lives on; the IPv6 one relays nothing"
    );
    assert_eq!(c.refresh(0).unwrap(), 0);
}
