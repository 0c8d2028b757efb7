//! `probe stun`: reflexive address and round-trip time per transport and
//! address family.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::uri::{parse_uri, resolve, Scheme};
use super::{describe, finish, interrupted, timed, transport_name, wrong_source, Check, Common, Report};
use crate::client::{binding, Channel, ClientError, ClientTransport};

/// `probe stun`.
#[derive(Debug, Clone, Args)]
pub struct StunArgs {
    /// stun:HOST[:PORT], stuns:..., turn:..., turns:... (RFC 7064/7065),
    /// or HOST[:PORT].
    pub url: String,
    /// Binding requests per transport and address.
    #[arg(long, default_value_t = 5)]
    pub count: u32,
    #[command(flatten)]
    pub common: Common,
}

/// Runs `probe stun`.
pub(super) fn stun(a: &StunArgs) -> Result<Report> {
    let uri = parse_uri(&a.url, Scheme::Stun)?;
    let (addrs, srv) = resolve(&uri, &a.common)?;
    let timeout = Duration::from_millis(a.common.timeout_ms);
    let transports: Vec<ClientTransport> = match (uri.scheme, uri.transport.as_deref()) {
        (Scheme::Stuns | Scheme::Turns, _) => vec![a.common.tls(&uri.host)?],
        (_, Some("udp")) => vec![ClientTransport::Udp],
        (_, Some("tcp")) => vec![ClientTransport::Tcp],
        _ => vec![ClientTransport::Udp, ClientTransport::Tcp],
    };
    let mut checks = Vec::new();
    for addr in &addrs {
        for t in &transports {
            let name = format!("{} {addr} binding", transport_name(t));
            let mut rtts = Vec::new();
            let mut mapped = None;
            let mut last_err = None;
            let ch = Channel::connect(t, *addr, timeout);
            match ch {
                Err(e) => last_err = Some(ClientError::Io(e)),
                Ok(mut ch) => {
                    for _ in 0..a.count.max(1) {
                        if interrupted() {
                            break;
                        }
                        let (r, ms) = timed(|| binding(&mut ch, timeout));
                        match r {
                            Ok(m) => {
                                mapped = Some(m);
                                rtts.push(ms);
                            }
                            Err(e) => last_err = Some(e),
                        }
                    }
                }
            }
            let sent = a.count.max(1) as usize;
            let check = match mapped {
                Some(m) => {
                    let min = rtts.iter().cloned().fold(f64::MAX, f64::min);
                    let max = rtts.iter().cloned().fold(0.0, f64::max);
                    let avg = rtts.iter().sum::<f64>() / rtts.len() as f64;
                    Check {
                        name,
                        ok: true,
                        detail: format!(
                            "reflexive address {m}; RTT min/avg/max {min:.2}/{avg:.2}/{max:.2} ms; loss {}/{sent}",
                            sent - rtts.len()
                        ),
                        ms: avg,
                        advice: None,
                    }
                }
                None => {
                    let e = last_err.unwrap_or(ClientError::Timeout);
                    let (mut detail, mut advice) = describe(&e, t, *addr);
                    if matches!(e, ClientError::Timeout) {
                        if let Some((d, a)) = wrong_source(t, *addr, timeout) {
                            (detail, advice) = (d, Some(a));
                        }
                    }
                    Check {
                        name,
                        ok: false,
                        detail,
                        ms: 0.0,
                        advice,
                    }
                }
            };
            checks.push(check);
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
