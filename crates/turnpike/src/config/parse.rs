//! Parsers for option values, with errors that say which part is wrong.

use std::net::{IpAddr, SocketAddr};

use anyhow::{bail, Result};
use serde::Deserialize;
use turn_core::Cidr;

/// An `IP:PORT` flag value, with an error that says which part is wrong
/// (clap's own only says "invalid socket address syntax").
pub fn parse_socket_addr(v: &str) -> std::result::Result<SocketAddr, String> {
    if let Ok(a) = v.parse::<SocketAddr>() {
        return Ok(a);
    }
    let (ip, port) = match v.rsplit_once(':') {
        Some((ip, port)) if !ip.is_empty() && (!ip.contains(':') || ip.starts_with('[')) => (ip, port),
        _ if v.parse::<IpAddr>().is_ok() => {
            return Err(format!(
                "{v:?} has no port: write IP:PORT, e.g. {}",
                match v.parse::<IpAddr>() {
                    Ok(IpAddr::V6(_)) => format!("[{v}]:3478"),
                    _ => format!("{v}:3478"),
                }
            ))
        }
        _ => return Err(format!("{v:?} is not IP:PORT (e.g. 0.0.0.0:3478 or [::]:3478)")),
    };
    let bare = ip.trim_start_matches('[').trim_end_matches(']');
    if bare.parse::<IpAddr>().is_err() {
        return Err(format!(
            "{v:?}: {ip:?} is not an IP address (names are not resolved here)"
        ));
    }
    if ip.contains(':') && !(ip.starts_with('[') && ip.ends_with(']')) {
        return Err(format!(
            "{v:?}: an IPv6 address takes brackets, e.g. [{bare}]:{port}"
        ));
    }
    match port.parse::<u32>() {
        Ok(p) if p > 65535 => Err(format!("{v:?}: port {p} is above 65535")),
        Ok(_) => Err(format!("{v:?} is not IP:PORT")),
        Err(_) => Err(format!("{v:?}: {port:?} is not a port number")),
    }
}

/// A repeatable key in the file takes one value or a list of them
/// (`relay-ip = "203.0.113.10"` as well as `relay-ip = ["203.0.113.10"]`).
pub(super) fn one_or_many<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    use serde::de::IntoDeserializer;
    struct V<T>(std::marker::PhantomData<T>);
    impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a value or a list of values")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Vec<T>, E> {
            // The element's own parser, so its error message stays.
            T::deserialize(v.into_deserializer()).map(|t| vec![t])
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> std::result::Result<Vec<T>, A::Error> {
            Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

/// A repeatable key whose values are parsed from strings (CIDRs, users):
/// one string or a list of them.
pub(super) fn one_or_many_parsed<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    one_or_many::<D, String>(d)?
        .iter()
        // The value itself stays out of the message: it may hold a password.
        .map(|v| v.parse::<T>().map_err(serde::de::Error::custom))
        .collect()
}

/// Serializes each value as its `Display` string (the form it is parsed from).
pub(super) fn all_displayed<S, T>(values: &[T], s: S) -> std::result::Result<S::Ok, S::Error>
where
    S: serde::Serializer,
    T: std::fmt::Display,
{
    s.collect_seq(values.iter().map(|v| v.to_string()))
}

/// serde's "unknown field `X`, expected one of `a`, `b`, … (66 keys)" with
/// the list replaced by the nearest key: a typo gets "did you mean".
pub(super) fn shorten_unknown_key(msg: &str) -> String {
    let Some((head, list)) = msg.split_once(", expected one of ") else {
        return msg.to_owned();
    };
    let Some(unknown) = head.rsplit('`').nth(1) else {
        return msg.to_owned();
    };
    let keys: Vec<&str> = list.split('`').skip(1).step_by(2).collect();
    let nearest = keys
        .iter()
        .map(|k| (edit_distance(unknown, k), *k))
        .min()
        .filter(|(d, k)| *d <= 3.max(unknown.len() * 2 / 5) || k.contains(unknown) || unknown.contains(*k));
    let hint = match nearest {
        Some((_, k)) => format!("; did you mean `{k}`?"),
        None => String::new(),
    };
    format!("{head}{hint}")
}

/// Levenshtein distance, for key suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A log level, or a tracing filter of `target=level` directives. A bare
/// word that is no level (`verbose`, `warning`) would parse as a target
/// name and silence every log line, so it is refused.
pub(super) fn check_log_level(v: &str) -> Result<()> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let hint = match v.to_ascii_lowercase().as_str() {
        "warning" => " (did you mean warn?)",
        "verbose" | "all" => " (did you mean debug or trace?)",
        "err" => " (did you mean error?)",
        _ => "",
    };
    let directive_ok = |d: &str| {
        let level = d.rsplit_once('=').map(|(_, l)| l).unwrap_or(d);
        LEVELS.contains(&level.trim().to_ascii_lowercase().as_str())
    };
    if v.trim().is_empty()
        || !v.split(',').all(directive_ok)
        || tracing_subscriber::EnvFilter::try_new(v).is_err()
    {
        bail!(
            "log-level \"{v}\": not a level{hint}; use off, error, warn, info, debug or trace, \
             or directives like \"info,turnpike=debug\""
        );
    }
    Ok(())
}

pub(crate) fn parse_cidrs(field: &str, values: &[String]) -> Result<Vec<Cidr>> {
    values
        .iter()
        .map(|v| {
            v.parse::<Cidr>()
                .map_err(|e| anyhow::anyhow!("{field} \"{v}\": {e}"))
        })
        .collect()
}

/// 32 hex digits as an MD5 key (`MD5(name:realm:password)`), or `None`.
pub fn parse_md5_hex(h: &str) -> Option<[u8; 16]> {
    if h.len() != 32 {
        return None;
    }
    let mut k = [0u8; 16];
    for (i, byte) in k.iter_mut().enumerate() {
        *byte = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(k)
}
