//! Credentials in Redis, for fleets of nodes sharing users and REST-API
//! secrets. Layout: hash `turnpike:users:{realm}` with field = username and
//! value = `hex(md5 key):hex(sha256 key)` (keys only, never passwords), and
//! set `turnpike:secrets` of REST-API secrets. Servers poll it; if Redis
//! goes away, the credentials already loaded keep serving.

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
    Ok(())
}

/// Removes a user; false if there was none.
pub fn remove(url: &str, realm: &str, name: &str) -> Result<bool> {
    let n: i64 = connect(url)?.hdel(users_key(realm), name)?;
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
        if let (Some(m), Some(s)) = (unhex::<16>(m), unhex::<32>(s)) {
            creds.add_user_keys(name, realm, m, s);
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
