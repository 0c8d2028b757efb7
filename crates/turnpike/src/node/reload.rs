//! SIGHUP, `POST /api/reload` and `--reload-on-change`: the file read
//! again with the same command line on top, validated against the host
//! facts of the start (only the files they name are read again), and
//! applied part by part where each lives. What only a restart can change
//! is named in the log.

use std::sync::{Arc, Mutex};

use tracing::{error, info, warn};

use crate::config::{validate, CommandLine, HostFacts, Settings};
use crate::credentials::CredentialStores;
use crate::runtime::Control;

/// Everything a reload needs, owned by the node.
pub(super) struct Reloader {
    pub(super) command_line: CommandLine,
    pub(super) host: HostFacts,
    /// The settings the server started with: what restart-only settings
    /// are compared against.
    pub(super) started: Settings,
    pub(super) control: Control,
    pub(super) stores: Arc<Mutex<CredentialStores>>,
}

impl Reloader {
    /// Reloads; a configuration that does not validate changes nothing.
    pub(super) fn reload(&self) -> Result<(), String> {
        let new = self
            .command_line
            .options()
            .and_then(|o| validate(&o, &self.host.clone().with_files_of(&o)));
        let mut new = match new {
            Ok(s) => s,
            Err(e) => {
                error!(error = %format!("{e:#}"), "reload failed; the current configuration stays in force");
                return Err(format!("{e:#}"));
            }
        };
        // What --external-ip-from learned at start stands until a restart.
        if new.external_ip_from.is_some() {
            new.external_v4 = new.external_v4.or(self.started.external_v4);
            new.external_v6 = new.external_v6.or(self.started.external_v6);
        }
        super::announce::warn_shadowed_allows(&new);
        // The stores stay locked until the workers have the new
        // configuration: the watcher publishes under the same lock, so its
        // merge can never land after this one with an older copy of the
        // configured users.
        let mut s = self.stores.lock().unwrap_or_else(|p| p.into_inner());
        s.set_configured(&new);
        s.refresh();
        new.credentials = s.merged();
        s.report_conflicts();
        for setting in restart_only_changes(&self.started, &new) {
            warn!(setting, "reload: this setting changes at the next restart");
        }
        super::logging::set_level(&new.log_level);
        let applied = self.control.reload(&new);
        drop(s);
        match applied {
            Ok(()) => {
                info!(
                    users = new.credentials.user_count(),
                    secrets = new.credentials.secret_count(),
                    "configuration reloaded (credentials, peer policy, limits, quotas, lifetimes, TLS certificate, log level)"
                );
                Ok(())
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "reload failed; the current configuration stays in force");
                Err(format!("{e:#}"))
            }
        }
    }
}

/// The settings that differ between `old` and `new` but are fixed for the
/// life of the process: sockets, threads and what was started from them.
/// Everything else (credentials, realm, peer policy, quotas, rate limits,
/// lifetimes, connection limits, TLS files, log level) is applied live by
/// [`Control::reload`] and the log filter.
pub(super) fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let changed = [
        ("listen", old.listen != new.listen),
        ("tls-listen", old.tls_listen != new.tls_listen),
        ("threads", old.threads != new.threads),
        (
            "min-port/max-port",
            (old.min_port, old.max_port) != (new.min_port, new.max_port),
        ),
        (
            "relay-ip",
            (old.relay_v4, old.relay_v6) != (new.relay_v4, new.relay_v6),
        ),
        ("rfc5780", old.rfc5780 != new.rfc5780),
        ("udp-gso", old.udp_gso != new.udp_gso),
        ("fast-path", old.fast_path != new.fast_path),
        (
            "fast-path-interface",
            old.fast_path_interfaces != new.fast_path_interfaces,
        ),
        ("metrics-listen", old.metrics_listen != new.metrics_listen),
        ("admin-listen/admin-token", old.admin != new.admin),
        ("web-ui/web-listen/web-*", old.web != new.web),
        ("db", old.db != new.db),
        ("redis-url", old.redis_url != new.redis_url),
        ("node-name", old.node_name != new.node_name),
        ("fleet-lease", old.fleet_lease != new.fleet_lease),
        ("redirect-above", old.redirect_above != new.redirect_above),
        ("drain-timeout", old.drain_timeout != new.drain_timeout),
        ("log-format", old.log_json != new.log_json),
        ("redact", old.redact != new.redact),
        ("reload-on-change", old.watched_files != new.watched_files),
        ("external-ip-from", old.external_ip_from != new.external_ip_from),
    ];
    changed
        .into_iter()
        .filter(|(_, c)| *c)
        .map(|(name, _)| name)
        .collect()
}
