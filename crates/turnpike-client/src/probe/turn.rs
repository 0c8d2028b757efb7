//! `probe turn`: allocate twice, permit and bind a channel between the two
//! relayed addresses, relay both ways, and check a local peer.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;

use super::uri::{parse_uri, resolve, Scheme};
use super::{describe, finish, interrupted, timed, transport_name, Check, Common, Report};
use crate::client::{binding, Channel, ClientError, ClientTransport, Received, TurnClient};

/// `probe turn`.
#[derive(Debug, Clone, Args)]
pub struct TurnArgs {
    /// turn:HOST[:PORT][?transport=udp|tcp] or turns:HOST[:PORT] (RFC 7065).
    pub url: String,
    /// Username (long-term credentials).
    #[arg(long)]
    pub user: Option<String>,
    /// Password.
    #[arg(long)]
    pub password: Option<String>,
    /// TURN REST-API shared secret: a username "EXPIRY:probe" and its
    /// password are derived from it.
    #[arg(long)]
    pub secret: Option<String>,
    /// Transports to test (udp, tcp, tls, dtls); default: the URL's, or udp and
    /// tcp for turn: and tls for turns:.
    #[arg(long, value_delimiter = ',')]
    pub transport: Vec<String>,
    /// Relayed address family to ask for: ipv4 (the default), ipv6, or dual
    /// (both, RFC 8656 §7.2 ADDITIONAL-ADDRESS-FAMILY).
    #[arg(long, value_enum, default_value_t)]
    pub relay_family: crate::client::RelayFamily,
    /// Also test RFC 6062 TCP relays (over the tcp and tls transports):
    /// two TCP allocations, a Connect from one to the other's relayed
    /// address, ConnectionBind on both sides, and data both ways.
    #[arg(long)]
    pub tcp_relay: bool,
    #[command(flatten)]
    pub common: Common,
}

/// Runs `probe turn`.
pub(super) fn turn(a: &TurnArgs) -> Result<Report> {
    let uri = parse_uri(&a.url, Scheme::Turn)?;
    let (addrs, srv) = resolve(&uri, &a.common)?;
    let timeout = Duration::from_millis(a.common.timeout_ms);
    let (user, password) = match (&a.user, &a.password, &a.secret) {
        (_, _, Some(secret)) => {
            let expiry = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
                + 3600;
            let user = format!("{expiry}:{}", a.user.as_deref().unwrap_or("probe"));
            let pw = turn_core::auth::rest_password(secret.as_bytes(), &user);
            (user, pw)
        }
        (Some(u), Some(p), None) => (u.clone(), p.clone()),
        _ => bail!("probe turn needs --user and --password, or --secret for REST-API credentials"),
    };
    let names: Vec<String> = if !a.transport.is_empty() {
        a.transport.iter().map(|t| t.to_ascii_lowercase()).collect()
    } else {
        match (uri.scheme, uri.transport.as_deref()) {
            (Scheme::Turns | Scheme::Stuns, _) => vec!["tls".into()],
            (_, Some(t)) => vec![t.into()],
            _ => vec!["udp".into(), "tcp".into()],
        }
    };
    let mut checks = Vec::new();
    for addr in &addrs {
        let mut ipv6_done = false;
        for n in &names {
            let t = match n.as_str() {
                "udp" => ClientTransport::Udp,
                "tcp" => ClientTransport::Tcp,
                "tls" => a.common.tls(&uri.host)?,
                "dtls" => a.common.dtls()?,
                other => bail!("--transport: {other:?} is not udp, tcp, tls or dtls"),
            };
            // TLS or DTLS asked of a turn: URI without a port goes to 5349.
            let mut target = *addr;
            if (n == "tls" || n == "dtls")
                && !uri.explicit_port
                && matches!(uri.scheme, Scheme::Turn | Scheme::Stun)
            {
                target.set_port(5349);
            }
            let before = checks.len();
            relay_checks(
                &t,
                target,
                (&user, &password),
                timeout,
                a.relay_family,
                &mut checks,
            );
            let allocated = checks[before..]
                .iter()
                .any(|c| c.ok && c.name.ends_with(" allocate"));
            if a.tcp_relay {
                if t_is_stream(&t) {
                    tcp_relay_checks(&t, target, (&user, &password), timeout, &mut checks);
                } else {
                    checks.push(Check {
                        name: format!("udp {target} tcp-relay"),
                        ok: true,
                        detail:
                            "skipped: RFC 6062 TCP relays are allocated over tcp or tls (--transport tcp,tls)"
                                .into(),
                        ms: 0.0,
                        advice: None,
                    });
                }
            }
            // IPv6 relays are tested once per address, when the server
            // offers them, unless a family was asked for explicitly.
            if allocated && !ipv6_done && a.relay_family == crate::client::RelayFamily::Ipv4 {
                ipv6_done = true;
                ipv6_relay_checks(&t, target, (&user, &password), timeout, &mut checks);
            }
        }
    }
    let mut r = finish(uri, addrs, checks);
    if a.common.insecure {
        r.advice.push(
            "TLS certificates were not verified (--insecure): this checks reachability, not who answers"
                .into(),
        );
    }
    r.srv = srv;
    Ok(r)
}

fn t_is_stream(t: &ClientTransport) -> bool {
    !matches!(t, ClientTransport::Udp)
}

/// RFC 6062 end to end through the server: allocation A connects to B's
/// relayed TCP address (B permits A's relayed IP), both sides bind their
/// connection with ConnectionBind, and bytes go both ways. Step names are
/// "… tcp-relay STEP".
fn tcp_relay_checks(
    t: &ClientTransport,
    addr: SocketAddr,
    (user, pw): (&str, &str),
    timeout: Duration,
    checks: &mut Vec<Check>,
) {
    let tn = transport_name(t);
    let mut push = |step: &str, r: Result<String, ClientError>, ms: f64| -> bool {
        let (ok, detail, advice) = match r {
            Ok(d) => (true, d, None),
            Err(e) => {
                let (d, mut a) = describe(&e, t, addr);
                if let ClientError::Error { code: 442 | 400, .. } = e {
                    a = Some(format!(
                        "{tn} {addr} does not offer RFC 6062 TCP relays (coturn and turnpike do; \
                         turnpike over TCP and TLS control connections only)"
                    ));
                }
                if let ClientError::Error { code: 403, .. } = e {
                    a = Some(
                        "403 on Connect: the server's peer policy refuses its own relay address \
                              (turnpike: --allow-peer for it, or --allow-loopback-peers on a test host)"
                            .into(),
                    );
                }
                (false, d, a)
            }
        };
        checks.push(Check {
            name: format!("{tn} {addr} tcp-relay {step}"),
            ok,
            detail,
            ms,
            advice,
        });
        ok
    };
    let open = |push: &mut Recorder<'_>, step: &str| -> Option<(TurnClient, SocketAddr)> {
        let (r, ms) = timed(|| -> Result<(TurnClient, SocketAddr), ClientError> {
            let mut c = TurnClient::new(Channel::connect(t, addr, timeout)?, user, pw);
            c.set_timeout(timeout);
            c.set_tcp_relay(true);
            let a = c.allocate()?;
            Ok((c, a.relayed))
        });
        match r {
            Ok((c, relayed)) => {
                push(step, Ok(format!("relayed TCP {relayed}")), ms);
                Some((c, relayed))
            }
            Err(e) => {
                push(step, Err(e), ms);
                None
            }
        }
    };
    let Some((mut a, a_relayed)) = open(&mut push, "allocate") else {
        return;
    };
    let Some((mut b, b_relayed)) = open(&mut push, "second allocation") else {
        let _ = a.refresh(0);
        return;
    };
    connect_and_bind(
        (&mut a, a_relayed),
        (&mut b, b_relayed),
        (t, addr),
        timeout,
        &mut push,
    );
    let (r, ms) = timed(|| a.refresh(0).and_then(|_| b.refresh(0)));
    push(
        "delete (refresh 0)",
        r.map(|_| "both allocations deleted".into()),
        ms,
    );
}

/// RFC 6062 between two TCP allocations: B permits A's relayed IP, A
/// connects to B's relayed address, B hears the ConnectionAttempt, both
/// bind a data connection, and bytes go both ways; stops at the first step
/// that fails.
fn connect_and_bind(
    (a, a_relayed): (&mut TurnClient, SocketAddr),
    (b, b_relayed): (&mut TurnClient, SocketAddr),
    (t, addr): (&ClientTransport, SocketAddr),
    timeout: Duration,
    push: &mut Recorder<'_>,
) {
    let (r, ms) = timed(|| b.create_permission(&[a_relayed]));
    if !push("permission", r.map(|_| format!("for {}", a_relayed.ip())), ms) {
        return;
    }
    let (r, ms) = timed(|| a.connect(b_relayed));
    let Ok(id_a) = r.as_ref().map(|x| *x).map_err(|_| ()) else {
        push("connect", r.map(|_| String::new()), ms);
        return;
    };
    push(
        "connect",
        Ok(format!("to {b_relayed}: CONNECTION-ID {id_a:#x}")),
        ms,
    );
    let (r, ms) = timed(|| match b.recv(timeout)? {
        Received::ConnectionAttempt { id, peer } if peer == a_relayed => Ok(id),
        _ => Err(ClientError::Protocol(
            "no ConnectionAttempt from the first allocation",
        )),
    });
    let Ok(id_b) = r.as_ref().map(|x| *x).map_err(|_| ()) else {
        push("connection attempt", r.map(|_| String::new()), ms);
        return;
    };
    push(
        "connection attempt",
        Ok(format!("from {a_relayed}: CONNECTION-ID {id_b:#x}")),
        ms,
    );
    let (r, ms) = timed(|| -> Result<(Channel, Channel), ClientError> {
        Ok((
            a.connection_bind(t, addr, id_a)?,
            b.connection_bind(t, addr, id_b)?,
        ))
    });
    let Ok((mut da, mut db)) = r.map_err(|e| {
        push("bind", Err(e), ms);
    }) else {
        return;
    };
    push("bind", Ok("ConnectionBind on both sides".into()), ms);
    let (r, ms) = timed(|| -> Result<String, ClientError> {
        let payload = b"turnpike probe over a TCP relay";
        da.send(payload)?;
        if raw_exact(&mut db, payload.len(), timeout)? != payload {
            return Err(ClientError::Protocol("the bytes arrived altered"));
        }
        db.send(payload)?;
        if raw_exact(&mut da, payload.len(), timeout)? != payload {
            return Err(ClientError::Protocol("the bytes came back altered"));
        }
        Ok(format!("{} bytes each way", payload.len()))
    });
    push("data both ways", r, ms);
}

/// Reads exactly `n` raw bytes from a data connection.
fn raw_exact(ch: &mut Channel, n: usize, timeout: Duration) -> Result<Vec<u8>, ClientError> {
    let end = std::time::Instant::now() + timeout;
    let mut got = Vec::new();
    while got.len() < n {
        match ch.recv_raw(end)? {
            Some(b) => got.extend_from_slice(&b),
            None => return Err(ClientError::Timeout),
        }
    }
    Ok(got)
}

/// Whether the server offers IPv6 relays (a dual Allocate, RFC 8656 §7.2),
/// and if so the IPv4 checks again for IPv6, named "… ipv6 STEP". Not
/// offered is not a failure: the check passes and says so.
fn ipv6_relay_checks(
    t: &ClientTransport,
    addr: SocketAddr,
    creds: (&str, &str),
    timeout: Duration,
    checks: &mut Vec<Check>,
) {
    let tn = transport_name(t);
    let offered = (|| -> Result<Result<SocketAddr, String>, ClientError> {
        let mut c = TurnClient::new(Channel::connect(t, addr, timeout)?, creds.0, creds.1);
        c.set_timeout(timeout);
        c.set_relay_family(crate::client::RelayFamily::Dual);
        let r = match c.allocate() {
            Ok(a) => a,
            Err(ClientError::Error { code, reason }) => {
                return Ok(Err(format!("a dual Allocate is refused ({code} {reason})")))
            }
            Err(e) => return Err(e),
        };
        let _ = c.refresh(0);
        Ok(match (r.additional, r.family_error) {
            (Some(v6), _) => Ok(v6),
            (None, Some((_, code))) => Err(format!(
                "the server has no IPv6 relay address (ADDRESS-ERROR-CODE {code})"
            )),
            (None, None) => {
                Err("the server ignores ADDITIONAL-ADDRESS-FAMILY (no RFC 8656 dual allocations)".into())
            }
        })
    })();
    match offered {
        Ok(Ok(_)) => {
            let before = checks.len();
            relay_checks(t, addr, creds, timeout, crate::client::RelayFamily::Ipv6, checks);
            let prefix = format!("{tn} {addr} ");
            for c in &mut checks[before..] {
                if let Some(step) = c.name.strip_prefix(&prefix) {
                    c.name = format!("{prefix}ipv6 {step}");
                }
            }
        }
        Ok(Err(why)) => checks.push(Check {
            name: format!("{tn} {addr} ipv6 relay"),
            ok: true,
            detail: format!("not offered: {why}; IPv4 relaying above is what clients get"),
            ms: 0.0,
            advice: None,
        }),
        Err(e) => {
            let (detail, advice) = describe(&e, t, addr);
            checks.push(Check {
                name: format!("{tn} {addr} ipv6 relay"),
                ok: false,
                detail: format!("a dual Allocate failed: {detail}"),
                ms: 0.0,
                advice,
            });
        }
    }
}

/// Records one step's outcome; returns whether it passed.
pub(super) type Recorder<'a> = dyn FnMut(&str, Result<String, ClientError>, f64) -> bool + 'a;

/// Allocates twice over `t`, permits and binds a channel between the two
/// relayed addresses, relays data both ways, and cleans up.
pub(super) fn relay_checks(
    t: &ClientTransport,
    addr: SocketAddr,
    (user, pw): (&str, &str),
    timeout: Duration,
    relay_family: crate::client::RelayFamily,
    checks: &mut Vec<Check>,
) {
    let tn = transport_name(t);
    let mut push = |step: &str, r: Result<String, ClientError>, ms: f64| -> bool {
        let (ok, detail, advice) = match r {
            Ok(d) => (true, d, None),
            Err(e) => {
                let (d, a) = describe(&e, t, addr);
                (false, d, a)
            }
        };
        checks.push(Check {
            name: format!("{tn} {addr} {step}"),
            ok,
            detail,
            ms,
            advice,
        });
        ok
    };
    let connect = |push: &mut Recorder<'_>, label: &str| {
        let (r, ms) = timed(|| Channel::connect(t, addr, timeout));
        match r {
            Ok(ch) => {
                let mut c = TurnClient::new(ch, user, pw);
                c.set_timeout(timeout);
                Some(c)
            }
            Err(e) => {
                push(label, Err(ClientError::Io(e)), ms);
                None
            }
        }
    };
    let Some(mut a) = connect(&mut push, "connect") else {
        return;
    };
    a.set_relay_family(relay_family);
    let (r, ms) = timed(|| a.allocate());
    let Ok(alloc_a) = r.as_ref().map(|x| *x).map_err(|_| ()) else {
        let realm = a.realm().map(str::to_owned);
        let timed_out = matches!(r, Err(ClientError::Timeout));
        push("allocate", r.map(|_| String::new()), ms);
        if let Some(last) = checks.last_mut() {
            explain_allocate_failure(last, t, addr, timeout, realm, timed_out);
        }
        return;
    };
    push("allocate", Ok(describe_allocation(&alloc_a, a.realm())), ms);
    let Some(mut b) = connect(&mut push, "connect (second allocation)") else {
        return;
    };
    b.set_relay_family(relay_family);
    let (r, ms) = timed(|| b.allocate());
    let Ok(alloc_b) = r.as_ref().map(|x| *x).map_err(|_| ()) else {
        push("second allocation", r.map(|_| String::new()), ms);
        let _ = a.refresh(0);
        return;
    };
    push(
        "second allocation",
        Ok(format!("relayed {}", alloc_b.relayed)),
        ms,
    );
    if !interrupted() {
        relay_between(&mut a, &mut b, &alloc_a, &alloc_b, timeout, &mut push);
    }
    let (r, ms) = timed(|| a.refresh(0).and_then(|_| b.refresh(0)));
    push(
        "delete (refresh 0)",
        r.map(|_| "both allocations deleted".into()),
        ms,
    );
}

/// A first Allocate failed: a 401 names the realm to check the password
/// for, and silence is told apart from a firewall by a Binding on the same
/// transport and port.
fn explain_allocate_failure(
    last: &mut Check,
    t: &ClientTransport,
    addr: SocketAddr,
    timeout: Duration,
    realm: Option<String>,
    timed_out: bool,
) {
    let tn = transport_name(t);
    if let Some(realm) = realm {
        if last.detail.starts_with("401") {
            last.advice = Some(format!(
                "401: the realm is {realm:?}; check the username and password for that realm"
            ));
        }
    }
    // No answer to Allocate is not always a firewall: if Binding on the
    // same transport and port is answered, UDP/TCP get through and it is
    // TURN that is not answered.
    if !timed_out {
        return;
    }
    let reflexive = Channel::connect(t, addr, timeout)
        .ok()
        .and_then(|mut ch| binding(&mut ch, timeout).ok());
    match reflexive {
        None => {
            if let Some((d, adv)) = super::wrong_source(t, addr, timeout) {
                last.detail = d;
                last.advice = Some(adv);
            }
        }
        Some(mapped) => {
            last.detail = format!("no answer to Allocate, but Binding is answered (reflexive {mapped})");
            last.advice = Some(format!(
                "{tn} {addr} answers STUN Binding but not TURN requests: the server does not offer \
                 TURN there (coturn's --stun-only), or this username and address are blocked after \
                 failed logins (turnpike blocks for --auth-block-secs, 5m by default; try from \
                 another address or wait)"
            ));
        }
    }
}

/// The first allocation's line: relayed addresses, a family that failed,
/// the reflexive address, lifetime and realm.
fn describe_allocation(alloc: &crate::client::Allocation, realm: Option<&str>) -> String {
    format!(
        "relayed {}{}{} (reflexive {}), lifetime {} s{}",
        alloc.relayed,
        alloc.additional.map(|x| format!(" and {x}")).unwrap_or_default(),
        alloc
            .family_error
            .map(|(f, c)| format!(" (no IPv{} relay: {c})", if f == 2 { 6 } else { 4 }))
            .unwrap_or_default(),
        alloc.mapped,
        alloc.lifetime,
        realm.map(|r| format!(", realm {r:?}")).unwrap_or_default()
    )
}

/// A channel from `a` to `b`'s relayed address, a permission on `b` for
/// `a`'s, data both ways, then a local UDP peer; stops at the first step
/// that fails. Whether all passed.
fn relay_between(
    a: &mut TurnClient,
    b: &mut TurnClient,
    alloc_a: &crate::client::Allocation,
    alloc_b: &crate::client::Allocation,
    timeout: Duration,
    push: &mut Recorder<'_>,
) -> bool {
    let (r, ms) = timed(|| a.channel_bind(0x4000, alloc_b.relayed));
    if !push(
        "channel bind",
        r.map(|_| format!("0x4000 -> {}", alloc_b.relayed)),
        ms,
    ) {
        return false;
    }
    let (r, ms) = timed(|| b.create_permission(&[alloc_a.relayed]));
    if !push(
        "create permission",
        r.map(|_| format!("for {}", alloc_a.relayed.ip())),
        ms,
    ) {
        return false;
    }
    // A → B over the channel, B answers with a Send indication.
    let payload = b"turnpike probe";
    let (r, ms) = timed(|| -> Result<String, ClientError> {
        a.send_channel(0x4000, payload)?;
        match b.recv(timeout)? {
            Received::Data { peer, data } if data == payload && peer == alloc_a.relayed => {}
            other => {
                return Err(ClientError::Protocol(if matches!(other, Received::Data { .. }) {
                    "relayed data arrived altered or from the wrong address"
                } else {
                    "unexpected ChannelData on the second allocation"
                }))
            }
        }
        b.send_indication(alloc_a.relayed, payload)?;
        match a.recv(timeout)? {
            Received::Channel {
                channel: 0x4000,
                data,
            } if data == payload => {
                Ok("ChannelData out, Data indication in, Send indication back, ChannelData in".into())
            }
            _ => Err(ClientError::Protocol(
                "the answer did not come back on the bound channel",
            )),
        }
    });
    if !push("relay both ways", r, ms) || interrupted() {
        return false;
    }
    // A local UDP peer, when the server allows this host's address.
    let (r, ms) = timed(|| local_peer_check(a, alloc_a.relayed, timeout));
    match r {
        Err(ClientError::Error { code: 403, .. }) => push(
            "local peer",
            Ok("skipped: the server refuses this host's address as a peer (its policy); the relay between two allocations above covers relaying".into()),
            ms,
        ),
        r => push("local peer", r, ms),
    }
}

/// Relays through allocation `a` (relayed address `relayed`) to a UDP
/// socket on this host and back.
pub(super) fn local_peer_check(
    a: &mut TurnClient,
    relayed: SocketAddr,
    timeout: Duration,
) -> Result<String, ClientError> {
    let any: SocketAddr = if relayed.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
        .parse()
        .map_err(|_| ClientError::Protocol("address"))?;
    // The address this host uses toward the relay is where it can reach
    // us (of the relay's family, so an IPv6 relay gets an IPv6 peer).
    let route = std::net::UdpSocket::bind(any)?;
    route.connect(relayed)?;
    let peer = std::net::UdpSocket::bind(SocketAddr::new(route.local_addr()?.ip(), 0))?;
    peer.set_read_timeout(Some(timeout))?;
    let peer_addr = peer.local_addr()?;
    a.create_permission(&[peer_addr])?;
    a.send_indication(peer_addr, b"probe to local peer")?;
    let mut buf = [0u8; 512];
    let (n, relayed) = peer.recv_from(&mut buf).map_err(|_| ClientError::Timeout)?;
    if &buf[..n] != b"probe to local peer" {
        return Err(ClientError::Protocol("the local peer received altered data"));
    }
    peer.send_to(b"reply from local peer", relayed)?;
    match a.recv(timeout)? {
        Received::Data { peer: p, data } if p == peer_addr && data == b"reply from local peer" => {
            Ok(format!("Send indication to {peer_addr} and its reply came back"))
        }
        _ => Err(ClientError::Protocol(
            "the local peer's reply did not come back as a Data indication",
        )),
    }
}
