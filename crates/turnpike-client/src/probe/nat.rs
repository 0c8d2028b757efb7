//! `probe nat`: RFC 5780 §4.3–§4.5 mapping and filtering behaviour, and
//! the binding lifetime estimate.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;

use super::uri::{parse_uri, resolve, Scheme};
use super::{finish, interrupted, Check, Common, Report};

/// `probe nat`.
#[derive(Debug, Clone, Args)]
pub struct NatArgs {
    /// stun:HOST[:PORT] of a server with RFC 5780 enabled.
    pub url: String,
    /// Also estimate how long the NAT keeps an idle UDP binding (RFC 5780
    /// §4.6), trying idle times of 1, 2, 4, ... seconds up to SECS. Slow by
    /// nature: it waits that long.
    #[arg(long, value_name = "SECS")]
    pub lifetime: Option<u64>,
    #[command(flatten)]
    pub common: Common,
}

/// One Binding transaction on an unconnected socket (answers may come from
/// another address), with RFC 8489 retransmissions. Returns the response's
/// mapped address, RESPONSE-ORIGIN, OTHER-ADDRESS and where it came from.
pub(super) struct NatAnswer {
    mapped: SocketAddr,
    origin: Option<SocketAddr>,
    other: Option<SocketAddr>,
    from: SocketAddr,
}

pub(super) fn nat_binding(
    sock: &std::net::UdpSocket,
    to: SocketAddr,
    change: u8,
    timeout: Duration,
) -> Option<NatAnswer> {
    use stun_proto::{attr, method, Class, MessageBuilder, MessageType};
    let txid: [u8; 12] = rand::random();
    let mut req = Vec::new();
    let mut b = MessageBuilder::new(&mut req, MessageType::new(method::BINDING, Class::Request), &txid);
    if change != 0 {
        b.attr(attr::CHANGE_REQUEST, &[0, 0, 0, change]);
    }
    nat_exchange(sock, to, &req, &txid, timeout)
}

/// Sends `req` (retransmitting) and waits for the response with `txid`.
pub(super) fn nat_exchange(
    sock: &std::net::UdpSocket,
    to: SocketAddr,
    req: &[u8],
    txid: &[u8; 12],
    timeout: Duration,
) -> Option<NatAnswer> {
    use stun_proto::{attr, Message};
    let end = Instant::now() + timeout;
    let mut rto = Duration::from_millis(200);
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        sock.send_to(req, to).ok()?;
        let wait_until = (Instant::now() + rto).min(end);
        while Instant::now() < wait_until {
            let left = wait_until
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1));
            sock.set_read_timeout(Some(left)).ok()?;
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                break;
            };
            let Ok(m) = Message::parse(&buf[..n]) else {
                continue;
            };
            if &m.transaction_id() != txid {
                continue;
            }
            let mapped = m.get_xor_addr(attr::XOR_MAPPED_ADDRESS)?.ok()?;
            return Some(NatAnswer {
                mapped,
                origin: m.get_addr(attr::RESPONSE_ORIGIN).and_then(|r| r.ok()),
                other: m.get_addr(attr::OTHER_ADDRESS).and_then(|r| r.ok()),
                from,
            });
        }
        rto *= 2;
    }
    None
}

/// Runs `probe nat`: RFC 5780 §4.3 mapping and §4.4 filtering tests, and
/// the hairpinning test of §4.5.
pub(super) fn nat(a: &NatArgs) -> Result<Report> {
    let uri = parse_uri(&a.url, Scheme::Stun)?;
    let (addrs, _) = resolve(&uri, &a.common)?;
    let server = addrs[0];
    let timeout = Duration::from_millis(a.common.timeout_ms);
    let any: SocketAddr = if server.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
    let sock = std::net::UdpSocket::bind(any)?;
    // The local address this host uses toward the server, to tell "no NAT".
    let probe_sock = std::net::UdpSocket::bind(any)?;
    probe_sock.connect(server)?;
    let local = SocketAddr::new(probe_sock.local_addr()?.ip(), sock.local_addr()?.port());
    let mut checks = Vec::new();
    let mut advice = Vec::new();
    let mut push = |name: &str, ok: bool, detail: String| {
        checks.push(Check {
            name: name.to_owned(),
            ok,
            detail,
            ms: 0.0,
            advice: None,
        })
    };
    let Some(t1) = nat_binding(&sock, server, 0, timeout) else {
        push("test I: binding", false, format!("no answer from {server}"));
        advice.push(format!(
            "no answer on UDP {server}: the server is not running there, or a firewall drops UDP"
        ));
        let mut r = finish(uri, addrs, checks);
        r.advice = advice;
        return Ok(r);
    };
    push(
        "test I: binding",
        true,
        format!("mapped {} (local {local})", t1.mapped),
    );
    let Some(other) = t1.other else {
        push("RFC 5780 support", false, "no OTHER-ADDRESS in the answer".into());
        advice.push("the server does not support RFC 5780 (no OTHER-ADDRESS): run one that does, e.g. `turnpike serve --rfc5780 --alt-ip IP`".into());
        let mut r = finish(uri, addrs, checks);
        r.advice = advice;
        return Ok(r);
    };
    push(
        "RFC 5780 support",
        true,
        format!(
            "other address {other}, response origin {}",
            t1.origin.map(|o| o.to_string()).unwrap_or("-".into())
        ),
    );
    let behind_nat = t1.mapped != local;
    let mapping = if behind_nat {
        mapping_behaviour(&sock, server, other, t1.mapped, timeout)
    } else {
        "none (no NAT: the mapped address is the local one)"
    };
    push(
        "mapping behaviour",
        !mapping.starts_with("unknown"),
        mapping.into(),
    );
    let filtering = filtering_behaviour(&sock, server, other, timeout);
    push(
        "filtering behaviour",
        !filtering.starts_with("unknown"),
        filtering.into(),
    );
    let hairpin = hairpins(&sock, any, t1.mapped, timeout)?;
    push(
        "hairpinning",
        true,
        if hairpin {
            "works: packets to our own mapped address come back"
        } else {
            "not supported by this NAT"
        }
        .into(),
    );
    if let Some(max) = a.lifetime {
        let detail = binding_lifetime(server, any, max, timeout)?;
        push("binding lifetime", true, detail);
    }
    let verdict = verdict(behind_nat, mapping, filtering);
    let mut r = finish(uri, addrs, checks);
    r.verdict = Some(verdict.into());
    Ok(r)
}

/// RFC 5780 §4.3: test II (the other IP, same port), then test III (the
/// other IP and port), compared with test I's mapping.
fn mapping_behaviour(
    sock: &std::net::UdpSocket,
    server: SocketAddr,
    other: SocketAddr,
    mapped: SocketAddr,
    timeout: Duration,
) -> &'static str {
    match nat_binding(sock, SocketAddr::new(other.ip(), server.port()), 0, timeout) {
        None => "unknown (test II unanswered)",
        Some(t2) if t2.mapped == mapped => "endpoint-independent",
        Some(t2) => match nat_binding(sock, other, 0, timeout) {
            None => "unknown (test III unanswered)",
            Some(t3) if t3.mapped == t2.mapped => "address-dependent",
            Some(_) => "address-and-port-dependent",
        },
    }
}

/// RFC 5780 §4.4: answers from the other IP and port (CHANGE-REQUEST
/// 0x06), then from the other port (0x02).
fn filtering_behaviour(
    sock: &std::net::UdpSocket,
    server: SocketAddr,
    other: SocketAddr,
    timeout: Duration,
) -> &'static str {
    match nat_binding(sock, server, 0x06, timeout) {
        Some(r) if r.from == other => "endpoint-independent",
        Some(_) => "unknown (answer to change IP+port came from the wrong address)",
        None => match nat_binding(sock, server, 0x02, timeout) {
            Some(r) if r.from.port() != server.port() => "address-dependent",
            Some(_) => "unknown (answer to change port came from the wrong port)",
            None => "address-and-port-dependent",
        },
    }
}

/// RFC 5780 §4.5: whether a Binding from a second socket to our own
/// mapped address comes back to the first.
fn hairpins(
    sock: &std::net::UdpSocket,
    any: SocketAddr,
    mapped: SocketAddr,
    timeout: Duration,
) -> Result<bool> {
    let s2 = std::net::UdpSocket::bind(any)?;
    let txid: [u8; 12] = rand::random();
    let mut req = Vec::new();
    stun_proto::MessageBuilder::new(
        &mut req,
        stun_proto::MessageType::new(stun_proto::method::BINDING, stun_proto::Class::Request),
        &txid,
    );
    let _ = s2.send_to(&req, mapped);
    sock.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 2048];
    let mut seen = false;
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if n >= 20 && buf[8..20] == txid => {
                seen = true;
                break;
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(seen)
}

/// What the mapping and filtering mean for a call.
fn verdict(behind_nat: bool, mapping: &str, filtering: &str) -> &'static str {
    if !behind_nat || mapping == "endpoint-independent" {
        if filtering == "address-and-port-dependent" && behind_nat {
            "direct connections will usually work with ICE hole punching (endpoint-independent mapping); a relay is needed only against peers behind symmetric NATs"
        } else {
            "direct connections will usually work"
        }
    } else if mapping.starts_with("unknown") {
        "could not determine the mapping behaviour"
    } else {
        "expect to need TURN relays: this NAT maps each destination differently (symmetric), so hole punching fails against most peers"
    }
}

/// RFC 5780 §4.6: socket X learns its mapping, idles for T, then socket Y
/// asks the server (RESPONSE-PORT) to answer to X's mapped port. If X hears
/// it, the binding outlived T. T doubles from 1 s up to `max`.
pub(super) fn binding_lifetime(
    server: SocketAddr,
    any: SocketAddr,
    max: u64,
    timeout: Duration,
) -> Result<String> {
    use stun_proto::{attr, method, Class, MessageBuilder, MessageType};
    let mut alive = 0u64;
    let mut t = 1u64;
    while t <= max.max(1) {
        if interrupted() {
            break;
        }
        let x = std::net::UdpSocket::bind(any)?;
        let y = std::net::UdpSocket::bind(any)?;
        let Some(first) = nat_binding(&x, server, 0, timeout) else {
            return Ok("unknown: the server stopped answering".into());
        };
        std::thread::sleep(Duration::from_secs(t));
        let txid: [u8; 12] = rand::random();
        let mut req = Vec::new();
        MessageBuilder::new(&mut req, MessageType::new(method::BINDING, Class::Request), &txid).attr(
            attr::RESPONSE_PORT,
            &[(first.mapped.port() >> 8) as u8, first.mapped.port() as u8, 0, 0],
        );
        y.send_to(&req, server)?;
        // The answer must reach X, through X's (possibly expired) mapping.
        x.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 1024];
        let heard = matches!(x.recv_from(&mut buf), Ok((n, _)) if n >= 20 && buf[8..20] == txid);
        if !heard {
            return Ok(format!(
                "between {alive} and {t} s: an idle UDP binding was gone after {t} s; keepalives must come more often"
            ));
        }
        alive = t;
        t *= 2;
    }
    Ok(format!("at least {alive} s (the longest idle time tried)"))
}
