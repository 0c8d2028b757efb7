//! `--external-ip-from`: the relay addresses' public mapping, asked of a
//! STUN server at start (RFC 8489 Binding from each relay address), for
//! nodes behind 1:1 NAT whose public address is not known in advance.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::info;
use turnpike_client::client::{binding, Channel, ClientTransport};

/// Tries per family before start is refused.
const ATTEMPTS: u32 = 3;
const TIMEOUT: Duration = Duration::from_secs(1);

/// Fills `external_v4`/`external_v6` for each relay address that has none
/// configured, from `--external-ip-from`. A family whose relay
/// address has no NAT in front (the server sees it unchanged) keeps none.
pub fn discover(settings: &mut crate::config::Settings) -> Result<()> {
    let Some(server) = settings
        .options
        .external_ip_from
        .as_ref()
        .map(|h| h.as_str().to_owned())
    else {
        return Ok(());
    };
    let targets: Vec<SocketAddr> = server
        .to_socket_addrs()
        .with_context(|| format!("external-ip-from {server}: cannot resolve it"))?
        .collect();
    let mut asked = false;
    if let (Some(relay), None) = (settings.relay_v4, settings.external_v4) {
        let to = targets.iter().find(|a| a.is_ipv4()).copied();
        let Some(to) = to else {
            bail!("external-ip-from {server}: it has no IPv4 address to ask for relay-ip {relay}");
        };
        if let IpAddr::V4(public) = ask(&server, to, IpAddr::V4(relay))? {
            settings.external_v4 = (public != relay).then_some(public);
            info!(relay = %relay, public = %public, stun = %server, "external address learned");
        }
        asked = true;
    }
    if let (Some(relay), None) = (settings.relay_v6, settings.external_v6) {
        // IPv6 rarely sits behind NAT; without an IPv6 address to ask,
        // its relay address is advertised as it is.
        if let Some(to) = targets.iter().find(|a| a.is_ipv6()).copied() {
            if let IpAddr::V6(public) = ask(&server, to, IpAddr::V6(relay))? {
                settings.external_v6 = (public != relay).then_some(public);
                info!(relay = %relay, public = %public, stun = %server, "external address learned");
            }
            asked = true;
        }
    }
    if !asked {
        info!(stun = %server, "external-ip-from: every relay address has its external-ip already");
    }
    Ok(())
}

/// One Binding from `from` to `to`, retried; the XOR-MAPPED-ADDRESS IP.
fn ask(server: &str, to: SocketAddr, from: IpAddr) -> Result<IpAddr> {
    let mut last = String::new();
    for _ in 0..ATTEMPTS {
        let got = Channel::connect_from(&ClientTransport::Udp, to, Some(from), TIMEOUT)
            .map_err(|e| e.to_string())
            .and_then(|mut ch| binding(&mut ch, TIMEOUT).map_err(|e| e.to_string()));
        match got {
            Ok(mapped) if mapped.is_ipv4() == from.is_ipv4() => return Ok(mapped.ip()),
            Ok(mapped) => last = format!("it answered with {mapped}, of the other family"),
            Err(e) => last = e,
        }
    }
    bail!(
        "external-ip-from {server}: no usable Binding answer to {from} from {to} after {ATTEMPTS} tries ({last}); \
         check that the STUN server is reachable, or set --external-ip"
    )
}
