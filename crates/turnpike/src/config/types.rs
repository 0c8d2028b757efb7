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
