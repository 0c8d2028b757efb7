//! The embedded user database (SQLite): long-term credentials stored as
//! MD5 and SHA-256 keys (RFC 8489 §9.2.2), never as passwords, per realm.
//! `turnpike user` edits it; a running server re-reads it every couple of
//! seconds, so changes apply without a restart.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rusqlite::{params, Connection, OptionalExtension};
use stun_proto::{long_term_key_md5, long_term_key_sha256};
use turn_core::Credentials;

/// The default database path: `$STATE_DIRECTORY/users.db` under systemd,
/// else `/var/lib/turnpike/users.db`.
pub fn default_path() -> PathBuf {
    let dir = std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/lib/turnpike".into());
    dir.join("users.db")
}

/// Creates the database file readable by its owner only (it holds keys
/// that log in as the users). Created by root in a directory someone else
/// owns (`/var/lib/turnpike`, the service user's), it is handed to that
/// owner, so the running server can read it at once.
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("db: cannot create {}", path.display())),
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let (Ok(d), Ok(f)) = (std::fs::metadata(dir), std::fs::metadata(path)) {
        if d.uid() != f.uid() {
            // Only root can give a file away; anyone else keeps it.
            let _ = std::os::unix::fs::chown(path, Some(d.uid()), Some(d.gid()));
        }
    }
    Ok(())
}

/// A warning when the database at `path` can be read by other users: it
/// holds keys that log in as its users.
pub fn permission_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o004 != 0).then(|| {
        format!(
            "db {}: readable by every user of this host (mode {:o}); it holds login keys: chmod 600 {}",
            path.display(),
            mode & 0o777,
            path.display()
        )
    })
}

fn open(path: &Path) -> Result<Connection> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("db: cannot create {}", dir.display()))?;
    }
    create_private(path)?;
    let c = Connection::open(path).with_context(|| format!("db: cannot open {}", path.display()))?;
    c.execute_batch(
        "CREATE TABLE IF NOT EXISTS users (
            realm TEXT NOT NULL,
            name TEXT NOT NULL,
            md5 BLOB NOT NULL,
            sha256 BLOB NOT NULL,
            PRIMARY KEY (realm, name)
        );",
    )
    .context("db: cannot create the users table")?;
    Ok(c)
}

/// Opens a database that must exist already (only `user add` makes one):
/// a mistyped path must not leave an empty database and its directories
/// behind.
fn open_existing(path: &Path) -> Result<Connection> {
    if !path.exists() {
        bail!(
            "db {}: no such database; `turnpike user add NAME --db {}` creates it",
            path.display(),
            path.display()
        );
    }
    open(path)
}

/// Adds a user or replaces their password (`replace`); stores only keys.
pub fn set(path: &Path, realm: &str, name: &str, password: &str, replace: bool) -> Result<()> {
    if name.is_empty()
        || name.contains(':') && name.split(':').next().is_some_and(|p| p.parse::<u64>().is_ok())
    {
        bail!("user name {name:?} is empty or looks like a REST-API username (EXPIRY:ID)");
    }
    if password.is_empty() {
        bail!("empty password");
    }
    // Only adding a user makes a database; changing a password needs one.
    let c = if replace {
        open_existing(path)?
    } else {
        open(path)?
    };
    let exists: Option<i64> = c
        .query_row(
            "SELECT 1 FROM users WHERE realm = ?1 AND name = ?2",
            params![realm, name],
            |r| r.get(0),
        )
        .optional()?;
    match (exists.is_some(), replace) {
        (true, false) => {
            bail!("user {name:?} already exists in realm {realm:?} (use `turnpike user passwd`)")
        }
        (false, true) => bail!("no user {name:?} in realm {realm:?} (use `turnpike user add`)"),
        _ => {}
    }
    c.execute(
        "INSERT OR REPLACE INTO users (realm, name, md5, sha256) VALUES (?1, ?2, ?3, ?4)",
        params![
            realm,
            name,
            &long_term_key_md5(name, realm, password)[..],
            &long_term_key_sha256(name, realm, password)[..]
        ],
    )?;
    Ok(())
}

/// Adds a user by MD5 key (`MD5(name:realm:password)`, coturn's `hmackey`)
/// when the password is not known; replaces an existing one. Such a user
/// logs in with MD5 only (there is no SHA-256 key to derive).
pub fn set_key(path: &Path, realm: &str, name: &str, md5: [u8; 16]) -> Result<()> {
    if name.is_empty() {
        bail!("user name is empty");
    }
    let c = open(path)?;
    c.execute(
        "INSERT OR REPLACE INTO users (realm, name, md5, sha256) VALUES (?1, ?2, ?3, ?4)",
        params![realm, name, &md5[..], &[] as &[u8]],
    )?;
    Ok(())
}

/// What `import_coturn` carried over.
#[derive(Debug, Default)]
pub struct Imported {
    /// (realm, name) of each user imported.
    pub users: Vec<(String, String)>,
    /// Users skipped, with why.
    pub skipped: Vec<String>,
    /// (realm, secret) REST-API secrets found (not stored here: they belong
    /// in `auth-secret` or Redis).
    pub secrets: Vec<(String, String)>,
}

/// Imports coturn's SQLite user database (its `turnusers_lt` table:
/// realm, name, hex `hmackey` = MD5(name:realm:password)) into the
/// turnpike database at `target`. coturn's file is opened read-only and
/// never written to.
pub fn import_coturn(turndb: &Path, target: &Path) -> Result<Imported> {
    let same = |a: &Path, b: &Path| {
        std::fs::canonicalize(a)
            .ok()
            .zip(std::fs::canonicalize(b).ok())
            .is_some_and(|(a, b)| a == b)
    };
    if same(turndb, target) {
        bail!(
            "--db {}: that is coturn's database; give turnpike's own file",
            target.display()
        );
    }
    let src = Connection::open_with_flags(turndb, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("turndb {}: cannot open", turndb.display()))?;
    let mut out = Imported::default();
    let mut st = src
        .prepare("SELECT realm, name, hmackey FROM turnusers_lt")
        .with_context(|| {
            format!(
                "turndb {}: no turnusers_lt table (is it coturn's database?)",
                turndb.display()
            )
        })?;
    let rows: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<Result<_, _>>()?;
    for (realm, name, key) in rows {
        let key = key.trim();
        match crate::config::parse_md5_hex(key) {
            Some(md5) => {
                set_key(target, &realm, &name, md5)?;
                out.users.push((realm, name));
            }
            None => out.skipped.push(format!(
                "{name}@{realm}: the key is not a 32-digit MD5 hex (coturn's SHA-256 keys cannot be carried over; set a password with `turnpike user passwd`)"
            )),
        }
    }
    if let Ok(mut st) = src.prepare("SELECT realm, value FROM turn_secret") {
        let secrets: Vec<(String, String)> = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        out.secrets = secrets;
    }
    Ok(out)
}

/// Removes a user; false if there was none.
pub fn remove(path: &Path, realm: &str, name: &str) -> Result<bool> {
    let c = open_existing(path)?;
    Ok(c.execute(
        "DELETE FROM users WHERE realm = ?1 AND name = ?2",
        params![realm, name],
    )? > 0)
}

/// (realm, name) of every user, optionally of one realm.
pub fn list(path: &Path, realm: Option<&str>) -> Result<Vec<(String, String)>> {
    let c = open_existing(path)?;
    let mut st =
        c.prepare("SELECT realm, name FROM users WHERE ?1 IS NULL OR realm = ?1 ORDER BY realm, name")?;
    let rows = st.query_map(params![realm], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The keys of every user of `realm`, as credentials; `None` if the file
/// does not exist.
pub fn load(path: &Path, realm: &str) -> Result<Option<Credentials>> {
    if !path.exists() {
        return Ok(None);
    }
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
        .with_context(|| format!("db: cannot open {}", path.display()))?;
    let mut st = c.prepare("SELECT name, md5, sha256 FROM users WHERE realm = ?1")?;
    let mut creds = Credentials::new();
    let rows = st.query_map(params![realm], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, Vec<u8>>(2)?,
        ))
    })?;
    for row in rows {
        let (name, md5, sha) = row?;
        match (<[u8; 16]>::try_from(md5), <[u8; 32]>::try_from(sha)) {
            (Ok(md5), Ok(sha)) => creds.add_user_keys(&name, realm, md5, sha),
            // An imported key (coturn keeps only MD5): SHA-256 logins are
            // not possible for this user until the password is set again.
            (Ok(md5), Err(_)) => creds.add_user_key(&name, realm, md5),
            _ => {}
        }
    }
    Ok(Some(creds))
}

/// A fingerprint of the database's users of `realm`, to notice changes.
pub fn fingerprint(path: &Path, realm: &str) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let c = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok()?;
    let mut st = c
        .prepare("SELECT name, md5 FROM users WHERE realm = ?1 ORDER BY name")
        .ok()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let rows = st
        .query_map(params![realm], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .ok()?;
    for row in rows.flatten() {
        row.hash(&mut h);
    }
    Some(h.finish())
}
