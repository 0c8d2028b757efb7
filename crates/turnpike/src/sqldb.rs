//! coturn's user database in PostgreSQL or MySQL/MariaDB, read as coturn
//! left it (`psql-userdb`, `mysql-userdb`): users from `turnusers_lt`
//! (realm, name, hmackey) and REST-API secrets from `turn_secret` (realm,
//! value). Nothing is written: coturn's `turnadmin` (or whatever manages
//! the tables) stays the tool, and a coturn installation's database serves
//! turnpike unchanged. Polled every 2 s like the other stores, off the
//! worker threads; if the database goes away, the users already read keep
//! working (`turnpike_sql_up`, /readyz, one log line per outage).
//!
//! The `postgres` and `mysql` crates' blocking clients, without TLS: the
//! database is expected on the host or a trusted network, as coturn's
//! usually is.

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

/// A database turnpike can read coturn's tables from.
pub enum Database {
    /// PostgreSQL (a postgres:// URL or libpq's keyword string).
    Postgres(Box<postgres::Config>),
    /// MySQL or MariaDB (a mysql:// URL).
    Mysql(Box<mysql::Opts>),
}

impl std::fmt::Debug for Database {
    // Without the password the options hold.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Database::Postgres(_) => "Database::Postgres",
            Database::Mysql(_) => "Database::Mysql",
        })
    }
}

const EXPECTED: &str = "expected postgres://USER:PASSWORD@HOST:PORT/DBNAME, mysql://USER:PASSWORD@HOST:PORT/DBNAME, or coturn's psql-userdb string \"host=HOST dbname=DBNAME user=USER password=PASSWORD\"";

/// Parses `url`, or says what is wrong and what is expected, naming
/// `field`. A keyword string is PostgreSQL's (libpq's); coturn's
/// `mysql-userdb` string becomes a URL with [`mysql_url_from_coturn`].
pub fn parse(field: &str, url: &str) -> Result<Database> {
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        let url = url.replacen("mariadb://", "mysql://", 1);
        let opts = mysql::Opts::from_url(&url).map_err(|e| anyhow::anyhow!("{field}: {e}; {EXPECTED}"))?;
        let opts = mysql::OptsBuilder::from_opts(opts).tcp_connect_timeout(Some(Duration::from_secs(2)));
        return Ok(Database::Mysql(Box::new(opts.into())));
    }
    let looks_pg = url.starts_with("postgres://") || url.starts_with("postgresql://") || url.contains('=');
    if !looks_pg {
        bail!("{field}: not a PostgreSQL or MySQL URL; {EXPECTED}");
    }
    let mut cfg = postgres::Config::from_str(url).map_err(|e| anyhow::anyhow!("{field}: {e}; {EXPECTED}"))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(2));
    }
    Ok(Database::Postgres(Box::new(cfg)))
}

/// coturn's `mysql-userdb` string ("host=H dbname=D user=U password=P
/// port=N …") as a mysql:// URL; `None` without host, dbname or user.
pub fn mysql_url_from_coturn(conn: &str) -> Option<String> {
    let mut kv = std::collections::HashMap::new();
    for part in conn.split_whitespace() {
        let (k, v) = part.split_once('=')?;
        kv.insert(k.to_ascii_lowercase(), v.to_owned());
    }
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    };
    let host = kv.get("host")?;
    let db = kv.get("dbname").or(kv.get("db"))?;
    let user = kv.get("user")?;
    let password = kv
        .get("password")
        .map(|p| format!(":{}", enc(p)))
        .unwrap_or_default();
    let port = kv.get("port").map(|p| format!(":{p}")).unwrap_or_default();
    Some(format!(
        "mysql://{}{password}@{host}{port}/{}",
        enc(user),
        enc(db)
    ))
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

/// Reads coturn's users and secrets; nothing is written.
pub fn read_coturn(url: &str) -> Result<CoturnSql> {
    let cannot = || format!("database {}: cannot read coturn's tables", redacted(url));
    let mut out = match parse("db-url", url)? {
        Database::Postgres(cfg) => read_postgres(&cfg).with_context(cannot)?,
        Database::Mysql(opts) => read_mysql(*opts).with_context(cannot)?,
    };
    out.users.sort();
    out.secrets.sort();
    Ok(out)
}

fn read_postgres(cfg: &postgres::Config) -> Result<CoturnSql> {
    let mut c = cfg.connect(postgres::NoTls).context("cannot connect")?;
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
    Ok(out)
}

fn read_mysql(opts: mysql::Opts) -> Result<CoturnSql> {
    use mysql::prelude::Queryable;
    let mut c = mysql::Conn::new(opts).context("cannot connect")?;
    let users: Vec<(Option<String>, String, String)> = c
        .query("SELECT realm, name, hmackey FROM turnusers_lt")
        .context("turnusers_lt (is this coturn's database?)")?;
    // An older schema may lack it: no secrets then.
    let secrets: Vec<(Option<String>, String)> = c
        .query("SELECT realm, value FROM turn_secret")
        .unwrap_or_default();
    Ok(CoturnSql {
        users: users
            .into_iter()
            .map(|(r, n, k)| (r.unwrap_or_default(), n, k))
            .collect(),
        secrets: secrets
            .into_iter()
            .map(|(r, v)| (r.unwrap_or_default(), v))
            .collect(),
    })
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
        assert!(matches!(
            parse("db-url", "mysql://u:p@h/coturn"),
            Ok(Database::Mysql(_))
        ));
        let e = parse("db-url", "redis://h").unwrap_err().to_string();
        assert!(e.contains("db-url") && e.contains("postgres://USER"), "{e}");
        // coturn's mysql-userdb string, as a URL (the password encoded).
        assert_eq!(
            mysql_url_from_coturn(
                "host=db port=3307 dbname=coturn user=turn password=p@ss:w/d connect_timeout=10"
            )
            .as_deref(),
            Some("mysql://turn:p%40ss%3Aw%2Fd@db:3307/coturn")
        );
        assert_eq!(mysql_url_from_coturn("dbname=coturn user=turn"), None);
        assert!(parse(
            "db-url",
            &mysql_url_from_coturn("host=db dbname=c user=u password=p@q").unwrap()
        )
        .is_ok());
    }
}
