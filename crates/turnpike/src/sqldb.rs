//! coturn's user database in PostgreSQL, read as coturn left it
//! (`psql-userdb`): users from `turnusers_lt` (realm, name, hmackey) and
//! REST-API secrets from `turn_secret` (realm, value). Nothing is written:
//! coturn's `turnadmin` (or whatever manages the table) stays the tool, and
//! a coturn installation's database serves turnpike unchanged. Polled every
//! 2 s like the other stores, off the worker threads; if the database goes
//! away, the users already read keep working (`turnpike_sql_up`, /readyz,
//! one log line per outage).
//!
//! The `postgres` crate's blocking client, without TLS: the database is
//! expected on the host or a trusted network, as coturn's usually is.

use std::hash::{Hash, Hasher};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use turn_core::Credentials;

/// What coturn's tables hold.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CoturnSql {
    /// (realm, name, hex key)
    pub users: Vec<(String, String, String)>,
    /// (realm, secret)
    pub secrets: Vec<(String, String)>,
}

/// Parses `url` (postgres://… or coturn's `host=… dbname=…` string), or
/// says what is wrong and what is expected, naming `field`.
pub fn parse(field: &str, url: &str) -> Result<postgres::Config> {
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        bail!("{field}: MySQL and MariaDB are not read yet; export the users (SELECT realm, name, hmackey FROM turnusers_lt) and add each with `turnpike user add NAME --realm REALM --key 0xHMACKEY`");
    }
    let looks_pg = url.starts_with("postgres://") || url.starts_with("postgresql://") || url.contains('=');
    if !looks_pg {
        bail!("{field}: not a PostgreSQL URL; expected postgres://USER:PASSWORD@HOST:PORT/DBNAME or coturn's psql-userdb string \"host=HOST dbname=DBNAME user=USER password=PASSWORD\"");
    }
    let mut cfg = postgres::Config::from_str(url).map_err(|e| {
        anyhow::anyhow!("{field}: {e}; expected postgres://USER:PASSWORD@HOST:PORT/DBNAME or \"host=HOST dbname=DBNAME user=USER\"")
    })?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(2));
    }
    Ok(cfg)
}

/// `url` without its password, for logs and `/api/config`: in a URL's
/// user part, or as libpq's `password=` keyword.
pub fn redacted(url: &str) -> String {
    if let (Some(scheme), Some(at)) = (url.find("://"), url.rfind('@')) {
        if at > scheme {
            let user = url[scheme + 3..at].split(':').next().unwrap_or("");
            return format!("{}{user}:[redacted]{}", &url[..scheme + 3], &url[at..]);
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=[redacted]"),
            _ => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn connect(url: &str) -> Result<postgres::Client> {
    parse("db-url", url)?
        .connect(postgres::NoTls)
        .with_context(|| format!("database {}: cannot connect", redacted(url)))
}

/// Reads coturn's users and secrets; nothing is written.
pub fn read_coturn(url: &str) -> Result<CoturnSql> {
    let mut c = connect(url)?;
    let mut out = CoturnSql::default();
    let rows = c
        .query("SELECT realm, name, hmackey FROM turnusers_lt", &[])
        .context("turnusers_lt (is this coturn's database?)")?;
    for r in rows {
        let realm: Option<String> = r.try_get(0)?;
        out.users
            .push((realm.unwrap_or_default(), r.try_get(1)?, r.try_get(2)?));
    }
    // An older schema may lack it: no secrets then.
    if let Ok(rows) = c.query("SELECT realm, value FROM turn_secret", &[]) {
        for r in rows {
            let realm: Option<String> = r.try_get(0)?;
            out.secrets.push((realm.unwrap_or_default(), r.try_get(1)?));
        }
    }
    out.users.sort();
    out.secrets.sort();
    Ok(out)
}

/// The users and secrets of `realm` (and those with no realm, coturn's
/// default), with a fingerprint of what was read; and how many users were
/// skipped for keys that are not MD5 (coturn's SHA-256 keys).
pub fn load(url: &str, realm: &str) -> Result<(Credentials, u64, usize)> {
    let got = read_coturn(url)?;
    let ours = |r: &str| r == realm || r.is_empty();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let mut creds = Credentials::new();
    let mut skipped = 0;
    for (r, name, key) in got.users.iter().filter(|(r, ..)| ours(r)) {
        (r, name, key).hash(&mut h);
        match crate::config::parse_md5_hex(key.trim().trim_start_matches("0x")) {
            Some(md5) => creds.add_user_key(name, realm, md5),
            None => skipped += 1,
        }
    }
    for (r, secret) in got.secrets.iter().filter(|(r, _)| ours(r)) {
        (r, secret).hash(&mut h);
        creds.add_secret(secret.as_bytes());
    }
    Ok((creds, h.finish(), skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_redacted_in_both_forms_and_bad_urls_are_named() {
        assert_eq!(
            redacted("postgres://coturn:s3cret@db:5432/coturn"),
            "postgres://coturn:[redacted]@db:5432/coturn"
        );
        assert_eq!(
            redacted("host=db dbname=coturn user=coturn password=s3cret connect_timeout=30"),
            "host=db dbname=coturn user=coturn password=[redacted] connect_timeout=30"
        );
        assert!(parse("db-url", "host=db dbname=coturn user=coturn").is_ok());
        assert!(parse("db-url", "postgres://u@localhost/coturn").is_ok());
        let e = parse("db-url", "mysql://u:p@h/coturn").unwrap_err().to_string();
        assert!(e.contains("db-url") && e.contains("--key"), "{e}");
        let e = parse("db-url", "redis://h").unwrap_err().to_string();
        assert!(e.contains("postgres://USER"), "{e}");
    }
}
