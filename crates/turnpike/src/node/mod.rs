//! The composition root: a [`Node`] owns everything `turnpike serve` runs
//! (the runtime's workers, the credential stores, the fleet membership,
//! the admin API, the web pages, metrics and the signal handling) and is
//! the one place they are wired together. `main.rs` only turns argv into a
//! [`CommandLine`] and calls [`Node::start`] and [`Node::run`].

mod announce;
mod logging;
pub(crate) mod notify;
mod reload;
mod watch;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tracing::info;

use crate::config::{validate, CommandLine, HostFacts, Settings};
use crate::credentials::CredentialStores;
use crate::runtime::Handle;

/// A running server and everything around it.
pub struct Node {
    settings: Settings,
    handle: Handle,
    reloader: Arc<reload::Reloader>,
    signals: signal_hook::iterator::Signals,
    watch: watch::FileWatch,
    upgrader: crate::upgrade::old::Upgrader,
}

impl Node {
    /// Validates the configuration, opens the stores, binds every socket
    /// and starts the workers and services: when it returns, the server
    /// answers. Anything that cannot work fails here, before a client.
    ///
    /// Started by a binary upgrade (`crate::upgrade`), it takes the old
    /// process's sockets and allocations instead of binding, and tells the
    /// old process why if it cannot.
    pub fn start(command_line: CommandLine) -> Result<Node> {
        let link = crate::upgrade::new::Link::from_env()?;
        Self::start_on(command_line, link.as_ref()).inspect_err(|e| {
            if let Some(l) = &link {
                l.refuse(&format!("{e:#}"));
            }
        })
    }

    fn start_on(command_line: CommandLine, link: Option<&crate::upgrade::new::Link>) -> Result<Node> {
        // As started: after a package upgrade the new binary is at this path.
        let exe = std::env::current_exe()?;
        let options = command_line.options()?;
        let host = HostFacts::read(&options);
        let mut settings = validate(&options, &host)?;
        // The watched files as they were read: a change from here on, even
        // one made before the server says it started, is a reload.
        let watch = watch::FileWatch::new(settings.watched_files.clone());
        crate::external_ip::discover(&mut settings)?;
        let web_secret: Option<[u8; 32]> = settings.web.enabled().then(rand::random);
        let stores = open_stores(&mut settings, web_secret)?;
        logging::init(&settings);
        // Signals are caught before anything starts, so a SIGTERM during
        // start-up stops the server cleanly instead of killing it mid-way.
        let signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
            signal_hook::consts::SIGUSR1,
            signal_hook::consts::SIGHUP,
            signal_hook::consts::SIGUSR2,
        ])?;
        let mut handle = match link {
            Some(l) => {
                let (handover, fds) = l.take(settings.threads)?;
                crate::runtime::start_inherited(&settings, handover, fds)?
            }
            None => crate::runtime::start(&settings)?,
        };
        let upgrader = crate::upgrade::old::Upgrader {
            exe,
            args: std::env::args_os().skip(1).collect(),
            threads: settings.threads,
            control: handle.control(),
            listen: handle.listen.clone(),
            tls_listen: handle.tls_listen.clone(),
            alt_listen: handle.alt_listen.clone(),
            http: std::mem::take(&mut handle.http_copies),
        };
        let reloader = Arc::new(reload::Reloader {
            command_line,
            host,
            started: settings.clone(),
            control: handle.control(),
            stores: stores.clone(),
        });
        let web = start_web(&settings, &mut handle, web_secret)?;
        let (push_tx, push_rx) = std::sync::mpsc::channel();
        let fleet = start_fleet(&settings, &handle, push_tx);
        start_admin(&settings, &mut handle, &reloader, web, fleet)?;
        let auth = {
            let s = stores.lock().unwrap_or_else(|p| p.into_inner());
            s.report_conflicts();
            s.counts()
        };
        announce::started(&settings, &handle, &auth.to_string());
        announce::warnings(&settings, &handle);
        announce::demo_banner(&settings, &handle);
        watch::spawn_store_watcher(handle.control(), stores, push_rx);
        if let (Some(l), Some((pid, allocations, dropped))) = (link, handle.taken_over) {
            info!(
                old_pid = pid,
                allocations, dropped, "upgrade: took over the old process's sockets and allocations"
            );
            // systemd follows this process from here on (before the old
            // one is told, so it never sees the unit's main process exit).
            crate::upgrade::new::failpoint("before-serving");
            notify::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
            match l.serving(allocations, dropped) {
                Ok(trailing) => handle.control().fast_trailing(trailing),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "upgrade: the old process did not hear that this one serves, or said nothing after")
                }
            }
        }
        if link.is_none() {
            notify::notify("READY=1");
        }
        Ok(Node {
            settings,
            handle,
            reloader,
            signals,
            watch,
            upgrader,
        })
    }

    /// Serves until a signal stops it: SIGHUP reloads, SIGUSR1 drains,
    /// SIGTERM drains then stops (at the last allocation or
    /// `drain-timeout`), SIGINT or a second SIGTERM stops at once.
    pub fn run(self) -> Result<()> {
        let Node {
            settings,
            handle,
            reloader,
            mut signals,
            mut watch,
            upgrader,
        } = self;
        let control = handle.control();
        let drain_timeout = settings.options.drain_timeout.get();
        std::thread::spawn(move || {
            let mut deadline: Option<Instant> = None;
            let mut retired_at: Option<Instant> = None;
            let mut last_report = Instant::now();
            loop {
                if watch.changed() {
                    info!("a watched file changed (reload-on-change); reloading");
                    let _ = reloader.reload();
                }
                for sig in signals.pending() {
                    match sig {
                        signal_hook::consts::SIGHUP => {
                            let _ = reloader.reload();
                        }
                        signal_hook::consts::SIGUSR1 => {
                            control.drain();
                            info!(
                                allocations = control.allocations(),
                                "draining: new allocations are refused"
                            );
                        }
                        signal_hook::consts::SIGUSR2 if deadline.is_none() => {
                            if upgrade(&upgrader) {
                                // The new process accepts on the HTTP
                                // sockets; what stayed here (TLS connections
                                // and their allocations) drains, then this
                                // exits.
                                crate::http::retire();
                                retired_at = Some(Instant::now());
                                control.leave();
                                deadline = Some(Instant::now() + drain_timeout);
                            }
                        }
                        signal_hook::consts::SIGUSR2 => {
                            info!("SIGUSR2 while stopping: no upgrade");
                            crate::upgrade::record(Err("the server is stopping".into()));
                        }
                        signal_hook::consts::SIGTERM if deadline.is_none() => {
                            control.leave();
                            deadline = Some(Instant::now() + drain_timeout);
                            info!(
                                allocations = control.allocations(),
                                timeout_s = drain_timeout.as_secs(),
                                "SIGTERM: draining, then stopping"
                            );
                        }
                        _ => {
                            // Stop first: nothing after this line may keep the server up.
                            control.stop();
                            info!(signal = sig, "shutting down");
                            return;
                        }
                    }
                }
                if let Some(d) = deadline {
                    let left = control.allocations();
                    // After an upgrade, HTTP requests in flight (the one
                    // that asked for it) are answered first, for a while.
                    let answered =
                        retired_at.is_none_or(|at| crate::http::all_retired() || at.elapsed() >= HTTP_GRACE);
                    if left == 0 && answered {
                        control.stop();
                        info!(allocations_closed = 0, "drain finished; shutting down");
                        return;
                    }
                    if Instant::now() >= d {
                        control.stop_drain_ran_out();
                        info!(
                            allocations_closed = left,
                            "drain-timeout ran out; ending what is left (reason drain) and shutting down"
                        );
                        return;
                    }
                    if last_report.elapsed() >= Duration::from_secs(5) {
                        info!(allocations = left, "draining");
                        last_report = Instant::now();
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let panicked = handle.join();
        if panicked > 0 {
            anyhow::bail!("{panicked} worker thread(s) panicked; this is a bug, please report it");
        }
        info!("stopped");
        Ok(())
    }
}

/// How long a process replaced by a binary upgrade keeps answering the
/// HTTP requests it had accepted (an idle keep-alive connection holds no
/// longer than this).
const HTTP_GRACE: Duration = Duration::from_secs(5);

/// SIGUSR2: hands the sockets and allocations to the binary at the path
/// this one was started from; whether it did (else this one serves on).
fn upgrade(upgrader: &crate::upgrade::old::Upgrader) -> bool {
    info!(binary = %upgrader.exe.display(), "SIGUSR2: upgrading");
    match upgrader.run() {
        Ok(o) => {
            crate::metrics::UPGRADES_OK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let k = o.kinds;
            crate::upgrade::record(Ok(serde_json::json!({
                "upgraded": true,
                "new_pid": o.pid,
                "new_version": o.version,
                "allocations_moved": o.moved,
                "allocations_dropped": o.dropped,
                "moved": {
                    "udp_allocations": k.udp,
                    "tcp_allocations": k.tcp,
                    "rfc6062_allocations": k.rfc6062,
                    "tcp_connections": k.conns,
                    "peer_connections": k.peer_conns,
                },
                "allocations_stayed": k.stayed,
                "gap_ms": o.gap.as_millis() as u64,
            })));
            info!(
                old_pid = std::process::id(),
                new_pid = o.pid,
                new_version = %o.version,
                old_version = %crate::version(),
                allocations_moved = o.moved,
                allocations_dropped = o.dropped,
                udp_allocations = k.udp,
                tcp_allocations = k.tcp,
                rfc6062_allocations = k.rfc6062,
                tcp_connections = k.conns,
                peer_connections = k.peer_conns,
                allocations_stayed = k.stayed,
                gap_ms = o.gap.as_millis() as u64,
                "upgrade: the new process serves; what stayed here (TLS connections and their allocations) drains until it ends or drain-timeout"
            );
            true
        }
        Err(e) => {
            crate::metrics::UPGRADES_FAILED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            crate::upgrade::record(Err(format!("{e:#}")));
            tracing::warn!(error = %format!("{e:#}"), "upgrade failed; serving on as before");
            false
        }
    }
}

/// A networked credential store (Redis, SQL) read at start: `up` says
/// whether it answered; one that does not is no reason not to start (its
/// users come when it answers, the watcher retries every 2 s).
fn store_read_at_start(read: Result<bool>, configured: bool, up: &std::sync::atomic::AtomicI8) {
    match read {
        Ok(_) if configured => up.store(1, std::sync::atomic::Ordering::Relaxed),
        Ok(_) => {}
        Err(e) => {
            up.store(0, std::sync::atomic::Ordering::Relaxed);
            eprintln!("turnpike: {e:#}; starting without its users, retrying every 2 s");
        }
    }
}

/// The credential sources (configuration, SQLite, Redis, the web pages'
/// secret), read once; `settings` gets their merged credentials, and no
/// demo credential when any other user exists.
fn open_stores(
    settings: &mut Settings,
    web_secret: Option<[u8; 32]>,
) -> Result<Arc<Mutex<CredentialStores>>> {
    let mut stores = CredentialStores::new(settings);
    if let Some(secret) = web_secret {
        stores.set_web_secret(secret);
    }
    stores.read_db()?;
    let redis = stores.read_redis();
    store_read_at_start(redis, settings.redis_url.is_some(), &crate::metrics::REDIS_UP);
    let sql = stores.read_sql();
    store_read_at_start(sql, settings.db_url.is_some(), &crate::metrics::SQL_UP);
    if !stores.demo_in_use() {
        settings.demo_user = None;
    }
    settings.credentials = stores.merged();
    Ok(Arc::new(Mutex::new(stores)))
}

/// The ICE page and dashboard's shared state, and the public page's own
/// listener when `web-listen` is set.
fn start_web(
    settings: &Settings,
    handle: &mut Handle,
    secret: Option<[u8; 32]>,
) -> Result<Option<Arc<crate::web::Web>>> {
    let Some(secret) = secret else {
        return Ok(None);
    };
    let ports = crate::web::IcePorts {
        plain: handle.listen.first().map(|a| a.port()),
        tls: handle.tls_listen.first().map(|a| a.port()),
        dtls: handle.dtls_listen.first().map(|a| a.port()),
    };
    let mut w = crate::web::Web::new(
        &settings.web,
        secret,
        ports,
        &settings.realm,
        settings.options.redact,
    );
    w.fast_path = handle.fast_path.clone();
    let web = Arc::new(w);
    if let Some(listener) = handle.web_listener.take() {
        let bound = crate::web::serve_public(listener, web.clone())?;
        info!(url = %format!("http://{bound}/"), "public ICE test page listening");
    }
    Ok(Some(web))
}

/// The admin API (and the operator's pages on it), when configured.
fn start_admin(
    settings: &Settings,
    handle: &mut Handle,
    reloader: &Arc<reload::Reloader>,
    web: Option<Arc<crate::web::Web>>,
    fleet: Option<Arc<crate::fleet::FleetClient>>,
) -> Result<()> {
    let (Some(listener), Some((_, token))) = (handle.admin_listener.take(), &settings.admin) else {
        return Ok(());
    };
    let r = reloader.clone();
    let reload: crate::admin::Reloader = Arc::new(move || r.reload());
    let bound = crate::admin::serve(
        listener,
        token.clone(),
        handle.control(),
        crate::admin::effective_config(settings),
        Some(reload),
        web.filter(|_| settings.web.ui),
        fleet,
    )?;
    info!(admin = %bound, "admin API listening");
    if settings.web.ui {
        info!(ice = %format!("http://{bound}/ice"), dashboard = %format!("http://{bound}/dashboard"), "operator pages listening");
    }
    Ok(())
}

/// Fleet membership in Redis, when `redis-url` is set.
fn start_fleet(
    settings: &Settings,
    handle: &Handle,
    pushed: std::sync::mpsc::Sender<()>,
) -> Option<Arc<crate::fleet::FleetClient>> {
    let url = settings.redis_url.as_ref()?;
    let (ipv4, ipv6) = (
        announce::advertised(settings, handle, false),
        announce::advertised(settings, handle, true),
    );
    let port_of = |v6: bool| handle.listen.iter().find(|a| a.is_ipv6() == v6).map(|a| a.port());
    let first_port = port_of(false).or(port_of(true));
    let name = settings
        .options
        .node_name
        .clone()
        .unwrap_or_else(|| crate::fleet::default_name(first_port.unwrap_or(0)));
    info!(node = %name, ipv4 = %announce::shown_addr(ipv4), ipv6 = %announce::shown_addr(ipv6), "fleet: registering in redis");
    Some(crate::fleet::spawn(
        crate::fleet::FleetConfig {
            url: url.clone(),
            name,
            lease: settings.options.fleet_lease.get(),
            redirect_above: settings.options.redirect_above,
            ipv4,
            ipv6,
        },
        handle.control(),
        pushed,
    ))
}
