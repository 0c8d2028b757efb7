//! A minimal DNS SRV lookup (RFC 2782) for `turnpike probe`: one UDP query
//! to the system's (or a given) nameserver. Responses are parsed with every
//! offset bounds-checked; anything odd means "no SRV record".

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::Duration;

/// One SRV answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    /// Lower is preferred.
    pub priority: u16,
    /// Higher is preferred among equal priorities.
    pub weight: u16,
    /// Port.
    pub port: u16,
    /// Target host name (without the trailing dot).
    pub target: String,
}

/// The first `nameserver` in /etc/resolv.conf, on port 53.
pub fn system_nameserver() -> Option<SocketAddr> {
    let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
    conf.lines().find_map(|l| {
        let mut w = l.split_whitespace();
        (w.next() == Some("nameserver"))
            .then(|| w.next()?.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 53)))?
    })
}

fn encode_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 33, 0, 1]); // SRV, IN
    Some(q)
}

/// Reads a possibly compressed name at `pos`; returns it and the offset
/// after it (after the first pointer, if any).
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut name = String::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *msg.get(pos)? as usize;
        if len & 0xC0 == 0xC0 {
            let ptr = ((len & 0x3F) << 8) | *msg.get(pos + 1)? as usize;
            end.get_or_insert(pos + 2);
            pos = ptr;
            continue;
        }
        if len == 0 {
            return Some((name, end.unwrap_or(pos + 1)));
        }
        let label = msg.get(pos + 1..pos + 1 + len)?;
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(std::str::from_utf8(label).ok()?);
        pos += 1 + len;
    }
    None // a pointer loop
}

/// Parses SRV answers out of a response to query `id`.
pub fn parse_response(msg: &[u8], id: u16) -> Option<Vec<Srv>> {
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id || msg[2] & 0x80 == 0 {
        return None;
    }
    let rcode = msg[3] & 0x0F;
    if rcode != 0 {
        return Some(Vec::new());
    }
    let qd = u16::from_be_bytes([msg[4], msg[5]]) as usize;
    let an = u16::from_be_bytes([msg[6], msg[7]]) as usize;
    let mut pos = 12;
    for _ in 0..qd {
        let (_, p) = read_name(msg, pos)?;
        pos = p + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an {
        let (_, p) = read_name(msg, pos)?;
        let head = msg.get(p..p + 10)?;
        let typ = u16::from_be_bytes([head[0], head[1]]);
        let rdlen = u16::from_be_bytes([head[8], head[9]]) as usize;
        let rdata_at = p + 10;
        let rdata = msg.get(rdata_at..rdata_at + rdlen)?;
        if typ == 33 && rdata.len() >= 7 {
            let (target, _) = read_name(msg, rdata_at + 6)?;
            out.push(Srv {
                priority: u16::from_be_bytes([rdata[0], rdata[1]]),
                weight: u16::from_be_bytes([rdata[2], rdata[3]]),
                port: u16::from_be_bytes([rdata[4], rdata[5]]),
                target,
            });
        }
        pos = rdata_at + rdlen;
    }
    out.sort_by(|a, b| a.priority.cmp(&b.priority).then(b.weight.cmp(&a.weight)));
    Some(out)
}

/// Looks up SRV records for `name` at `server`; `None` on no answer.
pub fn lookup_srv(name: &str, server: SocketAddr, timeout: Duration) -> Option<Vec<Srv>> {
    let id: u16 = rand::random();
    let q = encode_query(id, name)?;
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .ok()?;
    let s = UdpSocket::bind(any).ok()?;
    s.connect(server).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.send(&q).ok()?;
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        let n = s.recv(&mut buf).ok()?;
        if let Some(r) = parse_response(&buf[..n], id) {
            return Some(r);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A response with two SRV answers, the second one compressed.
    pub(crate) fn response(id: u16, query: &[u8], answers: &[(u16, u16, u16, &str)]) -> Vec<u8> {
        let mut r = query.to_vec();
        r[0..2].copy_from_slice(&id.to_be_bytes());
        r[2] = 0x81;
        r[3] = 0x80;
        r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
        for (prio, weight, port, target) in answers {
            r.extend_from_slice(&[0xC0, 12]); // name: pointer to the question
            r.extend_from_slice(&[0, 33, 0, 1, 0, 0, 0, 60]);
            let mut rdata = Vec::new();
            rdata.extend_from_slice(&prio.to_be_bytes());
            rdata.extend_from_slice(&weight.to_be_bytes());
            rdata.extend_from_slice(&port.to_be_bytes());
            for l in target.split('.') {
                rdata.push(l.len() as u8);
                rdata.extend_from_slice(l.as_bytes());
            }
            rdata.push(0);
            r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            r.extend_from_slice(&rdata);
        }
        r
    }

    #[test]
    fn parses_and_orders_answers() {
        let q = encode_query(7, "_stun._udp.example.test").unwrap();
        let r = response(
            7,
            &q,
            &[(20, 0, 3478, "b.example.test"), (10, 5, 3479, "a.example.test")],
        );
        let srv = parse_response(&r, 7).unwrap();
        assert_eq!(srv[0].target, "a.example.test");
        assert_eq!((srv[0].priority, srv[0].port), (10, 3479));
        assert_eq!(srv[1].target, "b.example.test");
        assert!(parse_response(&r, 8).is_none(), "wrong id");
    }

    #[test]
    fn malformed_responses_never_panic() {
        let q = encode_query(7, "_stun._udp.example.test").unwrap();
        let good = response(7, &q, &[(1, 1, 1, "x.test")]);
        for cut in 0..good.len() {
            let _ = parse_response(&good[..cut], 7);
        }
        let mut looped = good.clone();
        let n = looped.len();
        looped[n - 8] = 0xC0; // make the target a pointer...
        looped[n - 7] = (n - 8) as u8; // ...to itself
        let _ = parse_response(&looped, 7);
        for i in 0..good.len() {
            let mut m = good.clone();
            m[i] ^= 0xFF;
            let _ = parse_response(&m, 7);
        }
    }
}
