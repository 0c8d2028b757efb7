//! The typed values of options that are not plain numbers, addresses or
//! paths.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which of two overlapping operator ranges decides a peer
/// (`--peer-precedence`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerPrecedence {
    /// `deny-peer` beats `allow-peer` (turnpike's default).
    #[default]
    Deny,
    /// `allow-peer` beats `deny-peer` (coturn's `allowed-peer-ip`).
    Allow,
}

impl std::fmt::Display for PeerPrecedence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PeerPrecedence::Deny => "deny",
            PeerPrecedence::Allow => "allow",
        })
    }
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
    }
}

/// `--fast-path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FastPathMode {
    /// Load when possible; else relay in user space, saying why once.
    #[default]
    Auto,
    /// Refuse to start without it.
    On,
    /// Never load it.
    Off,
}

impl std::fmt::Display for FastPathMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FastPathMode::Auto => "auto",
            FastPathMode::On => "on",
            FastPathMode::Off => "off",
        })
    }
}

/// What a `--user` gives: a password, or the MD5 key coturn stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// A password (keys for every algorithm are derived from it).
    Password(String),
    /// `MD5(name:realm:password)`, given as `0x` and 32 hex digits.
    Md5Key([u8; 16]),
}

/// `--user NAME:PASSWORD` or `NAME:0xHEX`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    /// The username.
    pub name: String,
    /// Its password or key.
    pub secret: Secret,
}

/// The placeholders in deploy/turnpike.toml and README: never a live login.
pub(super) const EXAMPLE_SECRETS: [&str; 2] = ["change-me", "a-long-random-secret"];

impl FromStr for UserSpec {
    type Err = String;

    fn from_str(v: &str) -> Result<Self, String> {
        let Some((name, pw)) = v.split_once(':') else {
            return Err(format!(
                "user \"{}\": expected NAME:PASSWORD (e.g. --user alice:s3cret)",
                v.split(':').next().unwrap_or("")
            ));
        };
        if EXAMPLE_SECRETS.contains(&pw) {
            return Err(format!(
                "user \"{name}\": \"{pw}\" is the example password from deploy/turnpike.toml; \
                 choose a real one (e.g. openssl rand -base64 18)"
            ));
        }
        if name.is_empty() || pw.is_empty() {
            return Err(format!(
                "user \"{name}\": both NAME and PASSWORD must be non-empty (NAME:PASSWORD)"
            ));
        }
        let secret = match pw.strip_prefix("0x").map(super::parse::parse_md5_hex) {
            Some(Some(key)) => Secret::Md5Key(key),
            Some(None) => {
                return Err(format!(
                    "user \"{name}\": a 0x key must be 32 hex digits (MD5 of name:realm:password)"
                ))
            }
            None => Secret::Password(pw.to_owned()),
        };
        Ok(UserSpec {
            name: name.to_owned(),
            secret,
        })
    }
}

impl std::fmt::Display for UserSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.secret {
            Secret::Password(p) => write!(f, "{}:{p}", self.name),
            Secret::Md5Key(k) => {
                write!(f, "{}:0x", self.name)?;
                k.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
        }
    }
}

/// `HOST:PORT` of a server to ask (a name or an address, port above 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HostPort(String);

impl HostPort {
    /// As given, for resolving.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for HostPort {
    type Err = String;

    fn from_str(v: &str) -> Result<Self, String> {
        let ok = v
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if ok {
            Ok(HostPort(v.to_owned()))
        } else {
            Err(format!(
                "\"{v}\": expected HOST:PORT of a STUN server (e.g. stun.example.org:3478)"
            ))
        }
    }
}

impl TryFrom<String> for HostPort {
    type Error = String;
    fn try_from(v: String) -> Result<Self, String> {
        v.parse()
    }
}

impl From<HostPort> for String {
    fn from(h: HostPort) -> String {
        h.0
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A span of time: whole seconds (`600`, as every duration option took
/// before units) or with units, `ms`, `s`, `m`, `h`, `d`, combined from the
/// largest down (`1h30m`, `90s`, `500ms`). Shown in the shortest exact form
/// (`10m`), in `--help`, `/api/config` and a written configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Period(std::time::Duration);

impl Period {
    /// `n` seconds.
    pub const fn secs(n: u64) -> Self {
        Period(std::time::Duration::from_secs(n))
    }

    pub const fn get(self) -> std::time::Duration {
        self.0
    }

    /// Whole seconds (what is below a second is dropped).
    pub const fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<Period> for std::time::Duration {
    fn from(p: Period) -> Self {
        p.0
    }
}

/// The units, largest first, in milliseconds.
const PERIOD_UNITS: [(&str, u64); 5] = [
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
];

impl FromStr for Period {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("{s:?} is not a duration: give seconds (600) or units ms, s, m, h, d (10m, 1h30m)");
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s.parse::<u64>().map(Period::secs).map_err(|_| bad());
        }
        let mut rest = s;
        let mut total_ms: u64 = 0;
        // Each unit at most once, largest first.
        let mut smallest_so_far = u64::MAX;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let letters = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit = &rest[..letters];
            rest = &rest[letters..];
            let Some(&(_, ms)) = PERIOD_UNITS.iter().find(|(u, _)| *u == unit) else {
                return Err(bad());
            };
            if ms >= smallest_so_far {
                return Err(bad());
            }
            smallest_so_far = ms;
            total_ms = n
                .checked_mul(ms)
                .and_then(|v| v.checked_add(total_ms))
                .ok_or_else(bad)?;
        }
        if s.is_empty() {
            return Err(bad());
        }
        Ok(Period(std::time::Duration::from_millis(total_ms)))
    }
}

impl std::fmt::Display for Period {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ms = self.0.as_millis() as u64;
        if ms == 0 {
            return f.write_str("0s");
        }
        if !ms.is_multiple_of(1000) {
            return write!(f, "{ms}ms");
        }
        for (unit, size) in &PERIOD_UNITS[..4] {
            if ms >= *size {
                write!(f, "{}{unit}", ms / size)?;
                ms %= size;
            }
        }
        Ok(())
    }
}

impl Serialize for Period {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Period;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("seconds (600) or a duration with units (\"10m\", \"1h30m\")")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Period, E> {
                Ok(Period::secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Period, E> {
                u64::try_from(v)
                    .map(Period::secs)
                    .map_err(|_| E::custom(format!("{v} is negative; a duration is 0 or more")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Period, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}
