//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load
//! balancer puts in front of a TCP connection to say whose it is. Parsed
//! here, sans-IO; the runtime accepts it only from the balancers it is
//! told to trust (`--proxy-protocol-from`), so that limits, logs,
//! XOR-MAPPED-ADDRESS and the peer policy see the real client.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>
//! (v1 §2.1, v2 §2.2).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// v2's 12-byte signature (§2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// v1's longest header, CRLF included (§2.1).
pub const V1_MAX: usize = 107;
/// The longest v2 header taken (16 bytes and the addresses and TLVs): a
/// balancer's TLVs are small; more is refused rather than buffered.
pub const V2_MAX: usize = 16 + 1024;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// The connection is `client`'s, which reached `server` (the
    /// balancer's frontend address).
    Proxied {
        /// The real client.
        client: SocketAddr,
        /// The address the client connected to.
        server: SocketAddr,
    },
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN, or an address
    /// family with no address, such as AF_UNSPEC): the connection's own
    /// addresses stand (§2.2: "the receiver must ... use the real
    /// connection endpoints").
    Local,
}

/// What the start of a connection holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// A header, `len` bytes long: what follows is the client's.
    Done(Header, usize),
    /// Not a PROXY header, or a malformed one: why.
    Invalid(&'static str),
}

/// Whether `buf` could be the start of a PROXY header (either version):
/// for a connection from an address not trusted to send one, which is
/// closed if it does.
pub fn looks_like_header(buf: &[u8]) -> bool {
    let n = buf.len().min(12);
    n > 0 && (buf[..n] == V2_SIGNATURE[..n] || buf[..buf.len().min(6)] == b"PROXY "[..buf.len().min(6)])
}

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    if buf[0] == V2_SIGNATURE[0] {
        return parse_v2(buf);
    }
    if buf[0] == b'P' {
        return parse_v1(buf);
    }
    Parsed::Invalid("no PROXY header")
}

fn parse_v2(buf: &[u8]) -> Parsed {
    let n = buf.len().min(12);
    if buf[..n] != V2_SIGNATURE[..n] {
        return Parsed::Invalid("no PROXY header");
    }
    if buf.len() < 16 {
        return Parsed::Incomplete;
    }
    let (ver_cmd, fam) = (buf[12], buf[13]);
    let len = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    if ver_cmd >> 4 != 2 {
        return Parsed::Invalid("PROXY v2: version is not 2");
    }
    if 16 + len > V2_MAX {
        return Parsed::Invalid("PROXY v2: header too long");
    }
    if buf.len() < 16 + len {
        return Parsed::Incomplete;
    }
    let total = 16 + len;
    let body = &buf[16..total];
    match ver_cmd & 0x0f {
        0 => return Parsed::Done(Header::Local, total),
        1 => {}
        _ => return Parsed::Invalid("PROXY v2: unknown command"),
    }
    // Transport: STREAM (or UNSPEC with UNSPEC family); a datagram on a
    // TCP listener is a balancer misconfigured.
    let (family, transport) = (fam >> 4, fam & 0x0f);
    match (family, transport) {
        (0, _) | (3, _) => Parsed::Done(Header::Local, total),
        (1, 1) if len >= 12 => {
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(body[o], body[o + 1], body[o + 2], body[o + 3]));
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Parsed::Done(
                Header::Proxied {
                    client: SocketAddr::new(ip(0), port(8)),
                    server: SocketAddr::new(ip(4), port(10)),
                },
                total,
            )
        }
        (2, 1) if len >= 36 => {
            let ip = |o: usize| {
                let mut a = [0u8; 16];
                a.copy_from_slice(&body[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(a))
            };
            let port = |o: usize| u16::from_be_bytes([body[o], body[o + 1]]);
            Parsed::Done(
                Header::Proxied {
                    client: SocketAddr::new(ip(0), port(32)),
                    server: SocketAddr::new(ip(16), port(34)),
                },
                total,
            )
        }
        (1 | 2, 1) => Parsed::Invalid("PROXY v2: addresses cut short"),
        (1 | 2, _) => Parsed::Invalid("PROXY v2: not a stream connection"),
        _ => Parsed::Invalid("PROXY v2: unknown address family"),
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    let n = buf.len().min(6);
    if buf[..n] != b"PROXY "[..n] {
        return Parsed::Invalid("no PROXY header");
    }
    let Some(end) = buf.windows(2).take(V1_MAX - 1).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Parsed::Invalid("PROXY v1: no CRLF within 107 bytes")
        } else {
            Parsed::Incomplete
        };
    };
    let total = end + 2;
    let Ok(line) = std::str::from_utf8(&buf[6..end]) else {
        return Parsed::Invalid("PROXY v1: not text");
    };
    let mut f = line.split(' ');
    let proto = f.next().unwrap_or("");
    if proto == "UNKNOWN" {
        return Parsed::Done(Header::Local, total);
    }
    let fields: Vec<&str> = f.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Parsed::Invalid("PROXY v1: wrong number of fields");
    };
    let (Ok(src), Ok(dst)) = (src.parse::<IpAddr>(), dst.parse::<IpAddr>()) else {
        return Parsed::Invalid("PROXY v1: bad address");
    };
    // Ports: decimal, no sign or leading zero (§2.1).
    let port = |p: &str| {
        let digits = !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
        (digits && (!p.starts_with('0') || p == "0"))
            .then(|| p.parse::<u16>().ok())
            .flatten()
    };
    let (Some(sport), Some(dport)) = (port(sport), port(dport)) else {
        return Parsed::Invalid("PROXY v1: bad port");
    };
    let family_ok = match proto {
        "TCP4" => src.is_ipv4() && dst.is_ipv4(),
        "TCP6" => src.is_ipv6() && dst.is_ipv6(),
        _ => return Parsed::Invalid("PROXY v1: unknown protocol"),
    };
    if !family_ok {
        return Parsed::Invalid("PROXY v1: address of the other family");
    }
    Parsed::Done(
        Header::Proxied {
            client: SocketAddr::new(src, sport),
            server: SocketAddr::new(dst, dport),
        },
        total,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | cmd);
        h.push(fam);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v2_ipv4_and_ipv6_with_tlvs() {
        let mut body = vec![203, 0, 113, 7, 192, 0, 2, 1, 0x9c, 0x40, 0x0d, 0x96];
        body.extend_from_slice(&[0x04, 0x00, 0x01, 0xaa]); // a TLV (NOOP)
        let mut h = v2(1, 0x11, &body);
        h.extend_from_slice(b"STUN...");
        assert_eq!(
            parse(&h),
            Parsed::Done(
                Header::Proxied {
                    client: "203.0.113.7:40000".parse().unwrap(),
                    server: "192.0.2.1:3478".parse().unwrap()
                },
                16 + 16
            )
        );
        let mut body6 = Vec::new();
        body6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body6.extend_from_slice(&[0x9c, 0x40, 0x0d, 0x96]);
        assert_eq!(
            parse(&v2(1, 0x21, &body6)),
            Parsed::Done(
                Header::Proxied {
                    client: "[2001:db8::7]:40000".parse().unwrap(),
                    server: "[2001:db8::1]:3478".parse().unwrap()
                },
                52
            )
        );
    }

    #[test]
    fn v2_local_unspec_and_errors() {
        assert_eq!(parse(&v2(0, 0x00, &[])), Parsed::Done(Header::Local, 16));
        assert_eq!(parse(&v2(1, 0x00, &[1, 2, 3])), Parsed::Done(Header::Local, 19));
        assert!(matches!(parse(&v2(1, 0x12, &[0; 12])), Parsed::Invalid(_)), "UDP");
        assert!(
            matches!(parse(&v2(1, 0x11, &[0; 8])), Parsed::Invalid(_)),
            "short"
        );
        assert!(
            matches!(parse(&v2(2, 0x11, &[0; 12])), Parsed::Invalid(_)),
            "command"
        );
        let mut h = v2(1, 0x11, &[0; 12]);
        h[12] = 0x11;
        assert!(matches!(parse(&h), Parsed::Invalid(_)), "version 1 in v2 framing");
        let long = v2(1, 0x11, &vec![0; 2000]);
        assert!(matches!(parse(&long), Parsed::Invalid(_)), "too long");
        // Every prefix of a good header is incomplete, not invalid.
        let good = v2(1, 0x11, &[1; 12]);
        for n in 1..good.len() {
            assert_eq!(parse(&good[..n]), Parsed::Incomplete, "{n}");
            assert!(looks_like_header(&good[..n]));
        }
    }

    #[test]
    fn v1_tcp4_tcp6_unknown_and_errors() {
        let h = b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 3478\r\nrest";
        assert_eq!(
            parse(h),
            Parsed::Done(
                Header::Proxied {
                    client: "203.0.113.7:40000".parse().unwrap(),
                    server: "192.0.2.1:3478".parse().unwrap()
                },
                h.len() - 4
            )
        );
        let h6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 3478\r\n";
        assert!(matches!(parse(h6), Parsed::Done(Header::Proxied { .. }, 47)));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Parsed::Done(Header::Local, 15));
        assert_eq!(
            parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"),
            Parsed::Done(Header::Local, 35)
        );
        for bad in [
            &b"PROXY TCP4 203.0.113.7 192.0.2.1 40000\r\n"[..],
            b"PROXY TCP4 203.0.113.7 192.0.2.1 040000 3478\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 70000 3478\r\n",
            b"PROXY TCP4 2001:db8::7 192.0.2.1 1 2\r\n",
            b"PROXY UDP4 203.0.113.7 192.0.2.1 1 2\r\n",
            b"PROXY TCP4 x y 1 2\r\n",
            b"PROXY TCP4 203.0.113.7 192.0.2.1 +1 3478\r\n",
        ] {
            assert!(
                matches!(parse(bad), Parsed::Invalid(_)),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(b"PROXY TCP4 203.0"), Parsed::Incomplete);
        assert!(matches!(parse(&[b'P'; 200]), Parsed::Invalid(_)));
        let mut no_crlf = b"PROXY TCP4 ".to_vec();
        no_crlf.extend_from_slice(&[b'1'; 120]);
        assert!(
            matches!(parse(&no_crlf), Parsed::Invalid(_)),
            "no CRLF in 107 bytes"
        );
    }

    #[test]
    fn stun_and_tls_are_not_headers() {
        // A STUN Allocate and a TLS ClientHello start otherwise.
        assert!(!looks_like_header(&[0x00, 0x03, 0x00, 0x08]));
        assert!(!looks_like_header(&[0x16, 0x03, 0x01]));
        assert!(matches!(parse(&[0x00, 0x03, 0x00, 0x08]), Parsed::Invalid(_)));
        assert!(matches!(parse(&[0x16, 0x03, 0x01]), Parsed::Invalid(_)));
        assert!(looks_like_header(b"PROXY TCP4"));
        assert!(looks_like_header(b"PRO"));
    }

    proptest::proptest! {
        /// Any bytes: an answer, never a panic; a Done length within
        /// the input; a prefix of a parsed header is never Invalid.
        #[test]
        fn any_input_parses_without_panicking(mut buf in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), v2_start in proptest::prelude::any::<bool>()) {
            if v2_start {
                let mut b = V2_SIGNATURE.to_vec();
                b.extend_from_slice(&buf);
                buf = b;
            }
            if let Parsed::Done(_, n) = parse(&buf) {
                proptest::prop_assert!(n <= buf.len());
                for k in 1..n {
                    proptest::prop_assert_eq!(parse(&buf[..k]), Parsed::Incomplete);
                }
            }
        }
    }
}
