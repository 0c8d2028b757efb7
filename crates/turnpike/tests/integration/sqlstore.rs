//! coturn's SQL user database, for real: a `postgres` server the
//! test starts (initdb in a temporary directory, run as the `postgres`
//! system user on a free port, stopped by its PID), coturn's own schema
//! (/usr/share/coturn/schema.sql) and users written by coturn's own
//! `turnadmin -e`. turnpike serves them with no import (`--db-url`), sees
//! a user added while it runs, keeps serving the users it has when the
//! database stops (`turnpike_sql_up`, /readyz), and `import coturn-sql`
//! carries them into SQLite; the same with MariaDB (`turnadmin -M`,
//! `mariadbd` run as root in its own directory). Needs root, PostgreSQL,
//! MariaDB and coturn; skipped with a message otherwise (a failure under
//! CI).

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use turnpike_client::client::{Channel, ClientTransport, TurnClient};

const REALM: &str = "pg.example";

/// Which database.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Postgres,
    Mariadb,
}

/// A database server in a temporary directory, stopped (by its PID) and
/// removed on drop.
struct Db {
    kind: Kind,
    server: Option<Child>,
    dir: PathBuf,
    port: u16,
}

impl Drop for Db {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ok(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

impl Db {
    /// Starts one, with coturn's schema in database `coturn`.
    fn start(kind: Kind) -> Result<Db, String> {
        if common::euid() != 0 {
            return Err("not root (the servers run as their system users)".into());
        }
        if !Path::new("/usr/share/coturn/schema.sql").exists() || !has("turnadmin") {
            return Err("coturn (turnadmin, its schema.sql) is not installed".into());
        }
        let dir = std::env::temp_dir().join(format!("turnpike-{kind:?}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = common::free_port();
        let server = match kind {
            Kind::Postgres => Self::spawn_postgres(&dir, port)?,
            Kind::Mariadb => Self::spawn_mariadb(&dir, port)?,
        };
        let db = Db {
            kind,
            server: Some(server),
            dir,
            port,
        };
        let end = Instant::now() + Duration::from_secs(30);
        while db.sql(None, "SELECT 1").is_err() {
            if Instant::now() > end {
                return Err(format!("{kind:?} did not start"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        db.sql(None, "CREATE DATABASE coturn")?;
        let schema = std::fs::read_to_string("/usr/share/coturn/schema.sql").map_err(|e| e.to_string())?;
        db.sql(Some("coturn"), &schema)?;
        Ok(db)
    }

    fn spawn_postgres(dir: &Path, port: u16) -> Result<Child, String> {
        let bin = pg_bin().ok_or("PostgreSQL is not installed")?;
        ok(Command::new("chown").args(["postgres:postgres", dir.to_str().unwrap()]))?;
        let data = dir.join("data");
        let as_postgres = |program: &Path| {
            let mut c = Command::new("setpriv");
            c.args(["--reuid=postgres", "--regid=postgres", "--init-groups", "--"])
                .arg(program);
            c
        };
        ok(as_postgres(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data))?;
        // setpriv execs: the PID is the server's.
        as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(dir)
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())
    }

    fn spawn_mariadb(dir: &Path, port: u16) -> Result<Child, String> {
        if !Path::new("/usr/sbin/mariadbd").exists() || !has("mariadb-install-db") {
            return Err("MariaDB (mariadb-server) is not installed".into());
        }
        let data = dir.join("data");
        ok(Command::new("mariadb-install-db")
            .args([
                "--user=root",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
            ])
            .arg(format!("--datadir={}", data.display())))?;
        Command::new("/usr/sbin/mariadbd")
            .args([
                "--no-defaults",
                "--user=root",
                "--bind-address=127.0.0.1",
                "--skip-networking=0",
            ])
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())
    }

    /// Runs `sql` with the database's own client.
    fn sql(&self, db: Option<&str>, sql: &str) -> Result<(), String> {
        let port = self.port.to_string();
        let mut c = match self.kind {
            Kind::Postgres => {
                let mut c = Command::new("psql");
                c.args(["-q", "-h", "127.0.0.1", "-p", &port, "-U", "postgres"])
                    .args(["-d", db.unwrap_or("postgres"), "-v", "ON_ERROR_STOP=1", "-c", sql]);
                c
            }
            Kind::Mariadb => {
                let mut c = Command::new("mariadb");
                c.args(["--no-defaults", "-h", "127.0.0.1", "-P", &port, "-u", "root"]);
                if let Some(db) = db {
                    c.arg(db);
                }
                c.args(["-e", sql]);
                c
            }
        };
        ok(&mut c)
    }

    /// coturn's connection string for it (what `psql-userdb` or
    /// `mysql-userdb` holds).
    fn coturn_conn(&self) -> String {
        let user = match self.kind {
            Kind::Postgres => "postgres",
            Kind::Mariadb => "root",
        };
        format!(
            "host=127.0.0.1 port={} dbname=coturn user={user} connect_timeout=5",
            self.port
        )
    }

    /// What turnpike is given.
    fn url(&self) -> String {
        match self.kind {
            Kind::Postgres => format!("postgres://postgres@127.0.0.1:{}/coturn", self.port),
            Kind::Mariadb => format!("mysql://root@127.0.0.1:{}/coturn", self.port),
        }
    }

    fn turnadmin_flag(&self) -> &'static str {
        match self.kind {
            Kind::Postgres => "-e",
            Kind::Mariadb => "-M",
        }
    }

    /// coturn's own tool adds a long-term user.
    fn turnadmin_user(&self, name: &str, password: &str) {
        ok(Command::new("turnadmin").args([
            "-a",
            self.turnadmin_flag(),
            &self.coturn_conn(),
            "-u",
            name,
            "-r",
            REALM,
            "-p",
            password,
        ]))
        .unwrap();
    }

    /// SIGINT is PostgreSQL's fast shutdown; SIGTERM MariaDB's.
    fn stop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let sig = match self.kind {
                Kind::Postgres => "-INT",
                Kind::Mariadb => "-TERM",
            };
            let _ = Command::new("kill").args([sig, &c.id().to_string()]).status();
            let end = Instant::now() + Duration::from_secs(15);
            while Instant::now() < end {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn has(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn allocates(server: SocketAddr, user: &str, password: &str) -> bool {
    let Ok(ch) = Channel::connect(&ClientTransport::Udp, server, Duration::from_secs(2)) else {
        return false;
    };
    let mut c = TurnClient::new(ch, user, password);
    c.set_timeout(Duration::from_secs(2));
    let ok = c.allocate().is_ok();
    if ok {
        let _ = c.refresh(0);
    }
    ok
}

fn within(ok: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = common::http_request(addr, "GET", "/metrics", None).ok()?;
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn coturns_postgresql_users_log_in_with_no_import_and_stay_when_it_stops() {
    users_log_in_with_no_import_and_stay_when_it_stops(Kind::Postgres);
}

#[test]
fn coturns_mariadb_users_log_in_with_no_import_and_stay_when_it_stops() {
    users_log_in_with_no_import_and_stay_when_it_stops(Kind::Mariadb);
}

fn users_log_in_with_no_import_and_stay_when_it_stops(kind: Kind) {
    let mut pg = match Db::start(kind) {
        Ok(pg) => pg,
        Err(why) => {
            common::missing(&format!("coturn's {kind:?} user database"), &why);
            return;
        }
    };
    pg.turnadmin_user("alice", "alice-pw1");
    pg.turnadmin_user("bob", "bob-pw1");
    ok(Command::new("turnadmin").args([
        "-s",
        "pg-rest-secret",
        pg.turnadmin_flag(),
        &pg.coturn_conn(),
        "-r",
        REALM,
    ]))
    .unwrap();

    let (metrics, admin) = (common::free_port(), common::free_port());
    let token = "sqlstore-admin-token-0123456789";
    let db_url = pg.url();
    let (server, started, _rx) = common::spawn_server(
        Command::new(common::turnpike_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--realm", REALM])
            .args(["--db-url", &db_url])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
            .args([
                "--admin-listen",
                &format!("127.0.0.1:{admin}"),
                "--admin-token",
                token,
            ]),
    );
    assert!(started.contains("sql 2 users"), "{started}");
    assert!(started.contains("1 REST secret"), "{started}");
    let addr = common::listen_addr(&started);
    let metrics: SocketAddr = format!("127.0.0.1:{metrics}").parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    assert!(allocates(addr, "alice", "alice-pw1"), "a turnadmin user logs in");
    assert!(!allocates(addr, "alice", "wrong"), "with her password only");
    // The REST secret in coturn's turn_secret table.
    let user = format!(
        "{}:pod",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600
    );
    assert!(allocates(
        addr,
        &user,
        &turn_core::auth::rest_password(b"pg-rest-secret", &user)
    ));
    assert_eq!(metric(metrics, "turnpike_sql_up"), Some(1.0));

    // A user coturn's tool adds while turnpike runs: served within a poll.
    pg.turnadmin_user("carol", "carol-pw1");
    assert!(
        within(|| allocates(addr, "carol", "carol-pw1")),
        "a new user is read"
    );

    // Imported into turnpike's own SQLite store: they log in from there,
    // with no database server.
    let users_db = pg.dir.join("imported.db");
    // From coturn's own connection string, as its configuration holds it.
    let mut import = Command::new(common::turnpike_bin());
    import.args(["import", "coturn-sql", &pg.coturn_conn()]);
    if kind == Kind::Mariadb {
        import.arg("--mysql");
    }
    let out = import
        .args(["--db", users_db.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("3 user(s) imported"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("pg-rest-secret"));
    let (sqlite_only, started2, _rx2) = common::spawn_server(
        Command::new(common::turnpike_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--realm", REALM])
            .args(["--db", users_db.to_str().unwrap()]),
    );
    assert!(allocates(common::listen_addr(&started2), "bob", "bob-pw1"));
    drop(sqlite_only);

    // The database stops: the users read keep working, and it says so.
    pg.stop();
    assert!(
        within(|| metric(metrics, "turnpike_sql_up") == Some(0.0)),
        "turnpike_sql_up goes to 0"
    );
    let (_, ready) = common::http_request(admin, "GET", "/readyz", None).unwrap();
    assert!(ready.contains("user database"), "{ready}");
    assert!(allocates(addr, "alice", "alice-pw1"), "cached users keep working");
    assert!(allocates(addr, "carol", "carol-pw1"));
    // No password in what the server shows of its configuration.
    let (_, config) = common::http_request(admin, "GET", "/api/config", Some(token)).unwrap();
    assert!(config.contains("db_url") || config.contains("db-url"), "{config}");
    drop(server);
}

/// `turnpike import coturn` of a turnserver.conf with `lines`: the TOML.
fn imported(tag: &str, lines: &str) -> toml::Value {
    let dir = std::env::temp_dir().join(format!("turnpike-{tag}-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("turnserver.conf");
    std::fs::write(&conf, format!("realm=pg.example\nlt-cred-mech\n{lines}\n")).unwrap();
    let out = Command::new(common::turnpike_bin())
        .args(["import", "coturn", conf.to_str().unwrap()])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()
}

/// `import coturn` carries `psql-userdb` over as `db-url`: the same
/// database serves turnpike, unchanged.
#[test]
fn import_coturn_carries_psql_userdb_as_db_url() {
    let v = imported(
        "psql",
        "psql-userdb=\"host=db.internal dbname=coturn user=coturn password=s3cret connect_timeout=30\"",
    );
    let url = v["db-url"].as_str().unwrap();
    assert_eq!(
        url,
        "host=db.internal dbname=coturn user=coturn password=s3cret connect_timeout=30"
    );
    // One turnpike takes as it is.
    assert!(matches!(
        turnpike::sqldb::parse("db-url", url),
        Ok(turnpike::sqldb::Database::Postgres(_))
    ));
}

/// `mysql-userdb` becomes a mysql:// URL (its password encoded).
#[test]
fn import_coturn_carries_mysql_userdb_as_a_mysql_url() {
    let v = imported(
        "mysql",
        "mysql-userdb=\"host=db.internal dbname=coturn user=turn password=p@ss port=3306 connect_timeout=10\"",
    );
    let url = v["db-url"].as_str().unwrap();
    assert_eq!(url, "mysql://turn:p%40ss@db.internal:3306/coturn");
    assert!(matches!(
        turnpike::sqldb::parse("db-url", url),
        Ok(turnpike::sqldb::Database::Mysql(_))
    ));
}
