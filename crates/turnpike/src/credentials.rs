//! Where the server's credentials come from, merged in this one place: the
//! configured users and REST-API secrets (flags and file), the SQLite user
//! database, the Redis store and coturn's SQL database. Start-up, SIGHUP reload and the watcher
//! that re-reads the stores every 2 s all go through [`CredentialStores`].
//!
//! The generated demo credential is used only while no store has a user:
//! once one does, the demo credential stops working.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use tracing::{info, warn};
use turn_core::Credentials;

use crate::config::Settings;

/// The credential sources and what was last read from each.
pub struct CredentialStores {
    configured: Credentials,
    demo: bool,
    db: PathBuf,
    realm: String,
    redis_url: Option<String>,
    db_users: Option<Credentials>,
    db_fingerprint: Option<u64>,
    /// The last good copy from Redis, kept through outages.
    redis_users: Option<Credentials>,
    redis_fingerprint: Option<u64>,
    /// coturn's SQL database (`db-url`); the last good copy too.
    sql_url: Option<String>,
    sql_users: Option<Credentials>,
    sql_fingerprint: Option<u64>,
    /// The secret the ICE page mints its credentials with.
    web_secret: Option<[u8; 32]>,
}

impl CredentialStores {
    /// The sources `settings` name; nothing is read yet.
    pub fn new(settings: &Settings) -> Self {
        CredentialStores {
            configured: settings.credentials.clone(),
            demo: settings.demo_user.is_some(),
            db: settings.db.clone(),
            realm: settings.realm.clone(),
            redis_url: settings.redis_url.clone(),
            db_users: None,
            db_fingerprint: None,
            redis_users: None,
            redis_fingerprint: None,
            sql_url: settings.db_url.clone(),
            sql_users: None,
            sql_fingerprint: None,
            web_secret: None,
        }
    }

    /// Reads the user database; returns whether it changed. A missing
    /// database is no error (`turnpike user` makes it).
    pub fn read_db(&mut self) -> anyhow::Result<bool> {
        let fp = crate::userdb::fingerprint(&self.db, &self.realm);
        if fp == self.db_fingerprint && self.db_users.is_some() {
            return Ok(false);
        }
        let users = crate::userdb::load(&self.db, &self.realm)?;
        let changed = fp != self.db_fingerprint || users.is_some() != self.db_users.is_some();
        self.db_users = users;
        self.db_fingerprint = fp;
        Ok(changed)
    }

    /// Reads Redis, when configured; returns whether it changed. On an
    /// error the last good copy stays.
    pub fn read_redis(&mut self) -> anyhow::Result<bool> {
        let Some(url) = &self.redis_url else {
            return Ok(false);
        };
        let (users, fp) = crate::redisdb::load(url, &self.realm)?;
        if self.redis_fingerprint == Some(fp) {
            return Ok(false);
        }
        self.redis_fingerprint = Some(fp);
        self.redis_users = Some(users);
        Ok(true)
    }

    /// Reads coturn's SQL database, when configured; returns whether
    /// it changed. On an error the last good copy stays.
    pub fn read_sql(&mut self) -> anyhow::Result<bool> {
        let Some(url) = &self.sql_url else {
            return Ok(false);
        };
        let (users, fp, skipped) = crate::sqldb::load(url, &self.realm)?;
        if self.sql_fingerprint == Some(fp) {
            return Ok(false);
        }
        if skipped > 0 {
            warn!(
                skipped,
                "user database: users whose hmackey is not an MD5 key (coturn's SHA-256 keys) cannot log in; give them a password with `turnpike user add`"
            );
        }
        self.sql_fingerprint = Some(fp);
        self.sql_users = Some(users);
        Ok(true)
    }

    /// Re-reads every store (the watcher, reload); returns whether any
    /// changed. Failures are logged, Redis's once per outage, and the last
    /// good copies stay.
    pub fn refresh(&mut self) -> bool {
        let mut changed = match self.read_db() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %format!("{e:#}"), "user database unreadable");
                false
            }
        };
        if self.redis_url.is_some() {
            match self.read_redis() {
                Ok(c) => {
                    if crate::metrics::REDIS_UP.swap(1, Ordering::Relaxed) == 0 {
                        info!("redis credential store reachable again");
                    }
                    changed |= c;
                }
                Err(e) => {
                    if crate::metrics::REDIS_UP.swap(0, Ordering::Relaxed) != 0 {
                        warn!(error = %format!("{e:#}"), "redis unavailable; cached credentials keep serving");
                    }
                }
            }
        }
        if self.sql_url.is_some() {
            match self.read_sql() {
                Ok(c) => {
                    if crate::metrics::SQL_UP.swap(1, Ordering::Relaxed) == 0 {
                        info!("user database (db-url) reachable again");
                    }
                    changed |= c;
                }
                Err(e) => {
                    if crate::metrics::SQL_UP.swap(0, Ordering::Relaxed) != 0 {
                        warn!(error = %format!("{e:#}"), "user database (db-url) unavailable; cached credentials keep serving");
                    }
                }
            }
        }
        changed
    }

    /// Whether a store holds any user or secret (then the demo credential
    /// is not offered).
    pub fn stores_have_users(&self) -> bool {
        [&self.db_users, &self.redis_users, &self.sql_users]
            .into_iter()
            .flatten()
            .any(|c| c.user_count() > 0 || c.secret_count() > 0)
    }

    /// Whether the generated demo credential is in force. Never on a node
    /// with Redis or a user database URL: its users come from there, even
    /// while it is unreachable.
    pub fn demo_in_use(&self) -> bool {
        self.demo && self.redis_url.is_none() && self.sql_url.is_none() && !self.stores_have_users()
    }

    /// The ICE page's REST secret ([`crate::web`]): made once per process,
    /// so it outlives reloads, and merged whatever the stores hold.
    pub fn set_web_secret(&mut self, secret: [u8; 32]) {
        self.web_secret = Some(secret);
    }

    /// A reload's configured credentials. A reloaded configuration with
    /// none keeps the current ones rather than falling back to a demo.
    pub fn set_configured(&mut self, settings: &Settings) {
        if settings.demo_user.is_some() {
            warn!("reload: no users or secrets configured; keeping the configured credentials");
            return;
        }
        self.configured = settings.credentials.clone();
        self.demo = false;
    }

    /// The sources in merge order (a later one wins a name), with what
    /// each holds now.
    fn sources(&self) -> [(&'static str, Option<&Credentials>); 4] {
        let configured = (!self.demo || self.demo_in_use()).then_some(&self.configured);
        [
            ("config", configured),
            ("database", self.db_users.as_ref()),
            ("redis", self.redis_users.as_ref()),
            ("sql", self.sql_users.as_ref()),
        ]
    }

    /// Users and secrets by source, for the start-up and reload lines:
    /// `config 2 users, database 1 user, redis off, 1 REST secret`.
    pub fn counts(&self) -> String {
        let mut parts = Vec::new();
        let mut secrets = 0;
        for (name, creds) in self.sources() {
            let skip = (name == "redis" && self.redis_url.is_none())
                || (name == "sql" && self.sql_url.is_none())
                || (name == "database" && creds.is_none());
            if let Some(c) = creds {
                secrets += c.secret_count();
            }
            if skip {
                continue;
            }
            let n = creds.map_or(0, Credentials::user_count);
            let label = if name == "config" && self.demo_in_use() {
                "demo"
            } else {
                name
            };
            parts.push(format!("{label} {n} user{}", if n == 1 { "" } else { "s" }));
        }
        if self.web_secret.is_some() {
            parts.push("ICE page secret".to_owned());
        }
        parts.push(format!(
            "{secrets} REST secret{}",
            if secrets == 1 { "" } else { "s" }
        ));
        parts.join(", ")
    }

    /// Names two sources define with different keys, with the source whose
    /// key works (the later in merge order: SQL over Redis over the
    /// database over the configuration): `(name, loser, winner)`.
    pub fn conflicts(&self) -> Vec<(String, &'static str, &'static str)> {
        let sources = self.sources();
        let mut out = Vec::new();
        for (i, (lower, a)) in sources.iter().enumerate() {
            let Some(a) = a else { continue };
            for (higher, b) in &sources[i + 1..] {
                let Some(b) = b else { continue };
                for name in a.conflicting_users(b) {
                    out.push((name, *lower, *higher));
                }
            }
        }
        out
    }

    /// Logs every name that two sources define with different keys, and
    /// which key works: a shadowed user is a login that fails for no
    /// visible reason.
    pub fn report_conflicts(&self) {
        for (name, shadowed, wins) in self.conflicts() {
            warn!(
                user = %name,
                shadowed = %shadowed,
                wins = %wins,
                "a user is defined in two credential sources with different keys; the {wins} key works and the {shadowed} one does not (remove one of them)"
            );
        }
    }

    /// Configured + database + Redis + SQL: what the workers
    /// authenticate with.
    pub fn merged(&self) -> Credentials {
        let mut c = if self.demo_in_use() || !self.demo {
            self.configured.clone()
        } else {
            Credentials::new()
        };
        for store in [&self.db_users, &self.redis_users, &self.sql_users]
            .into_iter()
            .flatten()
        {
            c.merge(store);
        }
        if let Some(secret) = &self.web_secret {
            c.add_secret(secret);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(extra: &[&str], db: &std::path::Path) -> Settings {
        let mut argv = vec!["turnpike", "--realm", "r.example", "--db", db.to_str().unwrap()];
        argv.extend_from_slice(extra);
        Settings::from_options(&crate::config::Options::from_argv(argv).unwrap()).unwrap()
    }

    #[test]
    fn demo_only_until_a_store_has_users_and_reload_keeps_configured() {
        let dir = std::env::temp_dir().join(format!("turnpike-creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("users.db");
        let _ = std::fs::remove_file(&db);
        // A database that exists but has no user of this realm.
        crate::userdb::set(&db, "other.example", "nobody", "pw", false).unwrap();
        let s = settings(&[], &db);
        let mut stores = CredentialStores::new(&s);
        stores.read_db().unwrap();
        assert!(stores.demo_in_use(), "no users anywhere: the demo credential");
        assert_eq!(stores.merged().user_count(), 1);

        crate::userdb::set(&db, "r.example", "dora", "pw", false).unwrap();
        assert!(stores.refresh(), "the new database is seen");
        assert!(!stores.demo_in_use());
        let merged = stores.merged();
        assert_eq!(merged.user_count(), 1, "dora only; the demo credential is gone");

        // A reload with real users replaces the configured ones; the
        // database's stay.
        stores.set_configured(&settings(&["--user", "erin:pw"], &db));
        assert_eq!(stores.merged().user_count(), 2);
        // A reload with none keeps what was configured.
        stores.set_configured(&settings(&[], &db));
        assert_eq!(stores.merged().user_count(), 2);
        assert!(!stores.refresh(), "nothing changed");
        // A fleet node (Redis configured, here unreachable) never makes up
        // a demo credential.
        let fleet = CredentialStores::new(&settings(&["--redis-url", "redis://127.0.0.1:1"], &db));
        assert!(!fleet.demo_in_use());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
