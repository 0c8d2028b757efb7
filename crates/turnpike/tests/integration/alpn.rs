//! RFC 7443 ALPN on the TLS listener: `stun.turn` and `stun.nat-discovery`
//! are accepted, a client that offers no ALPN is served as before, and one
//! that offers only other protocols is refused with the
//! no_application_protocol alert.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

/// A TLS handshake offering `alpn`; then a Binding. The negotiated
/// protocol and whether the Binding was answered, or the handshake error.
fn handshake(h: &turnpike::runtime::Handle, alpn: &[&[u8]]) -> Result<(Option<Vec<u8>>, bool), String> {
    let mut cfg = (*turnpike_client::tls::client_config(h.tls_leaf.as_deref())).clone();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let sock = TcpStream::connect(h.tls_listen[0]).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).map_err(|e| e.to_string())?;
    }
    let negotiated = tls.conn.alpn_protocol().map(|p| p.to_vec());
    let mut req = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    req.extend_from_slice(&[9u8; 12]);
    tls.write_all(&req).map_err(|e| e.to_string())?;
    let mut head = [0u8; 20];
    let answered = tls.read_exact(&mut head).is_ok() && head[0..2] == [0x01, 0x01];
    Ok((negotiated, answered))
}

#[test]
fn alpn_ids_are_accepted_none_is_served_others_are_refused() {
    let h = common::start(&[]);
    assert_eq!(
        handshake(&h, &[b"stun.turn"]).unwrap(),
        (Some(b"stun.turn".to_vec()), true)
    );
    assert_eq!(
        handshake(&h, &[b"h2", b"stun.nat-discovery"]).unwrap(),
        (Some(b"stun.nat-discovery".to_vec()), true)
    );
    assert_eq!(handshake(&h, &[]).unwrap(), (None, true), "no ALPN: served");
    let err = handshake(&h, &[b"h2", b"http/1.1"]).unwrap_err();
    assert!(
        err.contains("NoApplicationProtocol") || err.contains("no_application_protocol"),
        "other protocols only: {err}"
    );
    h.shutdown();
}
