//! Credentials in Redis, for fleets of nodes sharing users and REST-API
//! secrets. Layout: hash `turnpike:users:{realm}` with field = username and
//! value = `hex(md5 key):hex(sha256 key)` (keys only, never passwords), and
//! set `turnpike:secrets` of REST-API secrets. Writes publish on
//! `turnpike:changes` and servers re-read at once (`fleet.rs`), and poll
//! besides; if Redis goes away, the credentials already loaded keep
//! serving.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use redis::Commands;
use stun_proto::{long_term_key_md5, long_term_key_sha256};
use turn_core::Credentials;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn users_key(realm: &str) -> String {
    format!("turnpike:users:{realm}")
}

fn connect(url: &str) -> Result<redis::Connection> {
    let client = redis::Client::open(url).with_context(|| format!("redis-url {url:?}: not a Redis URL"))?;
    client
        .get_connection_with_timeout(Duration::from_secs(2))
        .with_context(|| format!("redis: cannot connect to {url}"))
}

/// Tells the fleet's nodes to re-read now (they poll anyway; a lost
/// notice only delays the change to the next poll).
fn notify(c: &mut redis::Connection) {
    let _: redis::RedisResult<i64> = c.publish(crate::fleet::CHANGES, "users");
}

/// Adds or replaces a user (keys only).
pub fn set(url: &str, realm: &str, name: &str, password: &str, replace: bool) -> Result<()> {
    if name.is_empty() || password.is_empty() {
        bail!("empty user name or password");
    }
    let mut c = connect(url)?;
    let exists: bool = c.hexists(users_key(realm), name)?;
    match (exists, replace) {
        (true, false) => {
            bail!("user {name:?} already exists in realm {realm:?} (use `turnpike user passwd`)")
        }
        (false, true) => bail!("no user {name:?} in realm {realm:?} (use `turnpike user add`)"),
        _ => {}
    }
    let value = format!(
        "{}:{}",
        hex(&long_term_key_md5(name, realm, password)),
        hex(&long_term_key_sha256(name, realm, password))
    );
    let _: () = c.hset(users_key(realm), name, value)?;
    notify(&mut c);
    Ok(())
}

/// Adds or replaces a user by MD5 key (`MD5(name:realm:password)`) when
/// the password is not known: such a user logs in with MD5 only.
pub fn set_key(url: &str, realm: &str, name: &str, md5: [u8; 16]) -> Result<()> {
    if name.is_empty() {
        bail!("user name is empty");
    }
    let mut c = connect(url)?;
    let _: () = c.hset(users_key(realm), name, format!("{}:", hex(&md5)))?;
    notify(&mut c);
    Ok(())
}

/// A coturn Redis connection string (`ip=… port=… dbname=… password=…`,
/// its `redis-userdb` format) as a redis:// URL; a URL stays as it is.
pub fn coturn_url(s: &str) -> Result<String> {
    let s = s.trim().trim_matches('"');
    if s.starts_with("redis://") || s.starts_with("rediss://") || s.starts_with("unix://") {
        return Ok(s.to_owned());
    }
    let (mut host, mut port, mut db, mut password) = ("127.0.0.1".to_owned(), 6379u16, 0u32, None);
    for part in s.split_whitespace() {
        let Some((k, v)) = part.split_once('=') else {
            bail!("redis {s:?}: {part:?} is not key=value (coturn's form is \"ip=127.0.0.1 port=6379 dbname=0\")");
        };
        match k {
            "ip" | "host" => host = v.to_owned(),
            "port" => port = v.parse().with_context(|| format!("redis {s:?}: port {v:?}"))?,
            "dbname" | "database" | "db" => {
                db = v.parse().with_context(|| format!("redis {s:?}: dbname {v:?}"))?
            }
            "password" => password = Some(v.to_owned()),
            _ => {} // connect_timeout and the like: no meaning here
        }
    }
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(match password {
        Some(p) => format!("redis://:{p}@{host}:{port}/{db}"),
        None => format!("redis://{host}:{port}/{db}"),
    })
}

/// What coturn keeps in Redis: long-term users (`turn/realm/R/user/U/key`,
/// hex MD5 key) and REST-API secrets (`turn/realm/R/secret`).
#[derive(Debug, Default)]
pub struct CoturnRedis {
    /// (realm, name, hex key)
    pub users: Vec<(String, String, String)>,
    /// (realm, secret)
    pub secrets: Vec<(String, String)>,
}

/// Reads coturn's users and secrets from Redis at `url`; nothing is written.
pub fn read_coturn(url: &str) -> Result<CoturnRedis> {
    let mut c = connect(url)?;
    let keys: Vec<String> = c.scan_match::<_, String>("turn/realm/*")?.collect();
    let mut out = CoturnRedis::default();
    for k in keys {
        let parts: Vec<&str> = k.split('/').collect();
        match parts[..] {
            ["turn", "realm", realm, "user", name, "key"] => {
                let v: String = c.get(&k)?;
                out.users.push((realm.to_owned(), name.to_owned(), v));
            }
            ["turn", "realm", realm, "secret", ..] => {
                let kind: String = redis::cmd("TYPE").arg(&k).query(&mut c)?;
                let values: Vec<String> = match kind.as_str() {
                    "set" => c.smembers(&k)?,
                    "string" => vec![c.get(&k)?],
                    _ => Vec::new(),
                };
                out.secrets
                    .extend(values.into_iter().map(|v| (realm.to_owned(), v)));
            }
            _ => {}
        }
    }
    out.users.sort();
    out.secrets.sort();
    Ok(out)
}

/// Removes a user; false if there was none.
pub fn remove(url: &str, realm: &str, name: &str) -> Result<bool> {
    let mut c = connect(url)?;
    let n: i64 = c.hdel(users_key(realm), name)?;
    notify(&mut c);
    Ok(n > 0)
}

/// Usernames of `realm`.
pub fn list(url: &str, realm: &str) -> Result<Vec<String>> {
    let mut names: Vec<String> = connect(url)?.hkeys(users_key(realm))?;
    names.sort();
    Ok(names)
}

/// The users of `realm` and the shared REST-API secrets, with a
/// fingerprint of what was read (to notice changes).
pub fn load(url: &str, realm: &str) -> Result<(Credentials, u64)> {
    use std::hash::{Hash, Hasher};
    let mut c = connect(url)?;
    let users: std::collections::HashMap<String, String> = c.hgetall(users_key(realm))?;
    let secrets: Vec<String> = c.smembers("turnpike:secrets")?;
    let mut sorted: Vec<(&String, &String)> = users.iter().collect();
    sorted.sort();
    let mut h = std::collections::hash_map::DefaultHasher::new();
    sorted.hash(&mut h);
    let mut creds = Credentials::new();
    for (name, v) in &users {
        let Some((m, s)) = v.split_once(':') else { continue };
        match (unhex::<16>(m), unhex::<32>(s)) {
            (Some(m), Some(s)) => creds.add_user_keys(name, realm, m, s),
            // Imported by key (`user add --key`): MD5 only.
            (Some(m), None) if s.is_empty() => creds.add_user_key(name, realm, m),
            _ => {}
        }
    }
    let mut secrets = secrets;
    secrets.sort();
    secrets.hash(&mut h);
    for s in secrets {
        creds.add_secret(s.as_bytes());
    }
    Ok((creds, h.finish()))
}
