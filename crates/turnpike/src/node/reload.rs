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
        if new.options.external_ip_from.is_some() {
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
            warn!(setting = %setting, "reload: this setting changes at the next restart");
        }
        super::logging::set_level(&new.options.log_level);
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

/// The options [`Control::reload`] and the log filter apply to a running
/// server. Every other option is fixed for the life of the process
/// (sockets, threads, stores, the fleet identity, what was started from
/// them): a new option is restart-only until it is added here.
const LIVE: &[&str] = &[
    "user",
    "auth-secret",
    "auth-secret-file",
    "realm",
    "allow-long-realm",
    "software",
    "rfc5766-channel-numbers",
    "allow-peer",
    "deny-peer",
    "peer-precedence",
    "allow-loopback-peers",
    "external-ip",
    "nonce-lifetime",
    "allocation-lifetime",
    "max-allocation-lifetime",
    "user-quota",
    "total-quota",
    "fleet-total-quota",
    "rate-limit-per-ip",
    "auth-fail-limit",
    "auth-block-secs",
    "max-bps",
    "user-max-bps",
    "max-allocation-bytes",
    "alternate-server",
    "cert",
    "key",
    "max-connections",
    "max-connections-per-ip",
    "proxy-protocol-from",
    "handshake-timeout",
    "idle-timeout",
    "tcp-connections-per-allocation",
    "tcp-connect-timeout",
    "log-level",
];

/// The options that differ between `old` and `new` but only a restart
/// applies, by name.
pub(super) fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<String> {
    let table = |s: &Settings| toml::Table::try_from(&s.options).unwrap_or_default();
    let (a, b) = (table(old), table(new));
    let mut changed: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k) && !LIVE.contains(&k.as_str()))
        .cloned()
        .collect();
    changed.sort();
    changed.dedup();
    // The same file with new contents: the admin API keeps its token.
    if old.admin != new.admin && !changed.iter().any(|k| k.starts_with("admin-")) {
        changed.push("admin-token-file (its contents)".to_owned());
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HostFacts, Options};

    fn settings(args: &[&str]) -> Settings {
        let o = Options::from_argv(["x", "--user", "a:pw"].iter().chain(args)).unwrap();
        crate::config::validate(&o, &HostFacts::read(&o)).unwrap()
    }

    #[test]
    fn live_options_are_real_ones_and_everything_else_waits_for_a_restart() {
        let help = Options::help();
        for k in LIVE {
            assert!(
                help.contains(&format!("--{k} ")) || help.contains(&format!("--{k}[")),
                "LIVE names no option {k}"
            );
        }
        let old = settings(&[]);
        assert!(restart_only_changes(
            &old,
            &settings(&["--user-quota", "3", "--deny-peer", "192.0.2.0/24"])
        )
        .is_empty());
        assert_eq!(
            restart_only_changes(
                &old,
                &settings(&["--threads", "3", "--log-refusals-per-second", "5"])
            ),
            ["log-refusals-per-second", "threads"]
        );
    }
}
