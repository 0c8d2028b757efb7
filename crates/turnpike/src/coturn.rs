//! coturn's option names, so a coturn user's first try is answered with
//! turnpike's name for the same thing (or why none is needed) instead of a
//! bare "unexpected argument", and a coturn `turnserver.conf` given to
//! `--config` is recognised as one.

/// What turnpike says about one of coturn's options.
pub struct Mapping {
    /// coturn's option name, without dashes.
    pub coturn: &'static str,
    /// What to do in turnpike.
    pub turnpike: &'static str,
}

/// coturn options whose name turnpike does not share, with the way over.
/// (Options with the same name, like `realm`, `user`, `relay-ip`,
/// `min-port`, are simply accepted.)
pub const MAPPINGS: &[Mapping] = &[
    Mapping {
        coturn: "listening-port",
        turnpike: "--listen IP:PORT (e.g. --listen 0.0.0.0:3478; repeatable)",
    },
    Mapping {
        coturn: "listening-ip",
        turnpike: "--listen IP:PORT (the address and port together; repeatable)",
    },
    Mapping {
        coturn: "tls-listening-port",
        turnpike: "--tls-listen IP:PORT",
    },
    Mapping {
        coturn: "alt-listening-port",
        turnpike: "--rfc5780 --alt-port N",
    },
    Mapping {
        coturn: "static-auth-secret",
        turnpike: "--auth-secret SECRET (TURN REST-API credentials)",
    },
    Mapping {
        coturn: "use-auth-secret",
        turnpike: "nothing: giving --auth-secret turns REST-API credentials on (coturn then refuses its user= and database users; the importer leaves them out)",
    },
    Mapping {
        coturn: "lt-cred-mech",
        turnpike: "nothing: long-term credentials are always on",
    },
    Mapping {
        coturn: "no-auth",
        turnpike: "nothing: TURN always authenticates (an open relay is not offered)",
    },
    Mapping {
        coturn: "no-cli",
        turnpike: "nothing: there is no telnet CLI (use --admin-listen for the admin API)",
    },
    Mapping {
        coturn: "cli-password",
        turnpike: "--admin-token-file FILE for the admin API",
    },
    Mapping {
        coturn: "pkey",
        turnpike: "--key FILE",
    },
    Mapping {
        coturn: "no-tlsv1",
        turnpike: "nothing: TLS 1.0 is never offered (TLS 1.2 and 1.3 only)",
    },
    Mapping {
        coturn: "no-tlsv1_1",
        turnpike: "nothing: TLS 1.1 is never offered (TLS 1.2 and 1.3 only)",
    },
    Mapping {
        coturn: "no-tlsv1_2",
        turnpike: "not supported: TLS 1.2 stays on for older clients",
    },
    Mapping {
        coturn: "no-dtls",
        turnpike: "--no-dtls (DTLS is on by default beside TLS, as in coturn; DTLS 1.2 only, ECDSA certificates)",
    },
    Mapping {
        coturn: "no-udp",
        turnpike: "not supported: UDP is the TURN transport clients need most",
    },
    Mapping {
        coturn: "no-tcp",
        turnpike: "not supported yet",
    },
    Mapping {
        coturn: "fingerprint",
        turnpike: "nothing: answers carry FINGERPRINT when the request had one",
    },
    Mapping {
        coturn: "denied-peer-ip",
        turnpike: "--deny-peer CIDR (ranges as CIDR, e.g. 10.0.0.0/8)",
    },
    Mapping {
        coturn: "allowed-peer-ip",
        turnpike: "--allow-peer CIDR",
    },
    Mapping {
        coturn: "no-multicast-peers",
        turnpike: "nothing: multicast peers are refused by default",
    },
    Mapping {
        coturn: "prometheus",
        turnpike: "--metrics-listen IP:PORT",
    },
    Mapping {
        coturn: "log-file",
        turnpike: "nothing: logs go to stderr (journald under systemd); --log-format json",
    },
    Mapping {
        coturn: "syslog",
        turnpike: "nothing: logs go to stderr (journald under systemd)",
    },
    Mapping {
        coturn: "simple-log",
        turnpike: "nothing: logs go to stderr",
    },
    Mapping {
        coturn: "verbose",
        turnpike: "--log-level debug",
    },
    Mapping {
        coturn: "Verbose",
        turnpike: "--log-level trace",
    },
    Mapping {
        coturn: "daemon",
        turnpike: "nothing: run it under systemd (deploy/turnpike.service)",
    },
    Mapping {
        coturn: "pidfile",
        turnpike: "nothing: run it under systemd (deploy/turnpike.service)",
    },
    Mapping {
        coturn: "relay-threads",
        turnpike: "--threads N",
    },
    Mapping {
        coturn: "userdb",
        turnpike: "--db FILE (turnpike's own SQLite store; `turnpike user add`)",
    },
    Mapping {
        coturn: "redis-userdb",
        turnpike: "--redis-url redis://HOST:PORT",
    },
    Mapping {
        coturn: "stun-only",
        turnpike: "not supported: turnpike serves STUN and TURN together",
    },
    Mapping {
        coturn: "no-stun",
        turnpike: "not supported: Binding is always answered (rate-limited per source)",
    },
    Mapping {
        coturn: "max-bps",
        turnpike: "--max-bps BYTES (per allocation and direction)",
    },
    Mapping {
        coturn: "bps-capacity",
        turnpike: "--user-max-bps BYTES per user, or --total-quota for allocations",
    },
    Mapping {
        coturn: "max-allocate-lifetime",
        turnpike: "--max-allocation-lifetime DURATION",
    },
    Mapping {
        coturn: "mobility",
        turnpike: "--mobility (RFC 8016: tickets bound to the user, spent by a move)",
    },
    Mapping {
        coturn: "server-name",
        turnpike: "nothing: the realm names the server to clients",
    },
    Mapping {
        coturn: "no-software-attribute",
        turnpike: "nothing: SOFTWARE is off unless --software is given",
    },
    Mapping {
        coturn: "secure-stun",
        turnpike: "not supported: Binding stays unauthenticated (RFC 8489), rate-limited per source",
    },
    Mapping {
        coturn: "proc-user",
        turnpike: "nothing: systemd's DynamicUser runs it unprivileged",
    },
    Mapping {
        coturn: "proc-group",
        turnpike: "nothing: systemd's DynamicUser runs it unprivileged",
    },
    Mapping {
        coturn: "psql-userdb",
        turnpike: "--db-url (the same database, read as it is), or `turnpike import coturn-sql` into turnpike's store",
    },
    Mapping {
        coturn: "mysql-userdb",
        turnpike: "--db-url mysql://USER:PASSWORD@HOST:PORT/DB (the same database, read as it is), or `turnpike import coturn-sql` into turnpike's store",
    },
    Mapping {
        coturn: "listening-device",
        turnpike: "not supported: give the device's addresses as --listen IP:PORT",
    },
    Mapping {
        coturn: "alt-tls-listening-port",
        turnpike: "nothing: RFC 5780 is answered over UDP only, so no alternative TLS port is opened",
    },
    Mapping {
        coturn: "tcp-proxy-port",
        turnpike: "not supported: behind a TCP load balancer use --proxy-protocol-from CIDR (PROXY protocol v1/v2)",
    },
    Mapping {
        coturn: "aux-server",
        turnpike: "not supported: add another --listen IP:PORT (every listener serves STUN and TURN)",
    },
    Mapping {
        coturn: "udp-self-balance",
        turnpike: "nothing: UDP clients are spread over the worker threads by SO_REUSEPORT",
    },
    Mapping {
        coturn: "relay-device",
        turnpike: "not supported: give the device's address as --relay-ip IP",
    },
    Mapping {
        coturn: "prometheus-port",
        turnpike: "--metrics-listen IP:PORT (with prometheus; the port of coturn's exporter)",
    },
    Mapping {
        coturn: "oauth",
        turnpike: "not supported: OAuth third-party authorization (RFC 7635); use REST-API credentials (--auth-secret)",
    },
    Mapping {
        coturn: "secret-key-file",
        turnpike: "not supported: it decrypts coturn's encrypted MySQL password; put the password in clear in a file turnpike reads (db-url-file, mode 0600)",
    },
    Mapping {
        coturn: "mongo-userdb",
        turnpike: "not imported: add its users with `turnpike user add NAME --key 0xHMACKEY`",
    },
    Mapping {
        coturn: "redis-statsdb",
        turnpike: "not supported: use --metrics-listen (Prometheus) and the admin API's /api/sessions",
    },
    Mapping {
        coturn: "check-origin-consistency",
        turnpike: "not supported: the ORIGIN attribute is not checked",
    },
    Mapping {
        coturn: "no-udp-relay",
        turnpike: "not supported: UDP relays are always offered",
    },
    Mapping {
        coturn: "no-tcp-relay",
        turnpike: "not supported: RFC 6062 TCP relays are always offered over TCP and TLS",
    },
    Mapping {
        coturn: "channel-lifetime",
        turnpike: "nothing at 600 (the default): channels last RFC 8656's 600 s; another value is not supported",
    },
    Mapping {
        coturn: "permission-lifetime",
        turnpike: "nothing at 300 (the default): permissions last RFC 8656's 300 s; another value is not supported",
    },
    Mapping {
        coturn: "max-allocate-timeout",
        turnpike: "nothing: an Allocate is answered at once; RFC 6062 Connects time out after --tcp-connect-timeout (30 s)",
    },
    Mapping {
        coturn: "pkey-pwd",
        turnpike: "not supported: give an unencrypted key file (--key) that only the server can read",
    },
    Mapping {
        coturn: "cipher-list",
        turnpike: "nothing at DEFAULT: rustls offers only modern suites (TLS 1.2 AEAD, TLS 1.3); another list is not supported",
    },
    Mapping {
        coturn: "ec-curve-name",
        turnpike: "nothing: rustls negotiates X25519 and the NIST curves",
    },
    Mapping {
        coturn: "dh566",
        turnpike: "nothing: no finite-field DH suites are offered (rustls uses ECDHE)",
    },
    Mapping {
        coturn: "dh1066",
        turnpike: "nothing: no finite-field DH suites are offered (rustls uses ECDHE)",
    },
    Mapping {
        coturn: "dh-file",
        turnpike: "nothing: no finite-field DH suites are offered (rustls uses ECDHE)",
    },
    Mapping {
        coturn: "no-stdout-log",
        turnpike: "nothing: logs go to stderr",
    },
    Mapping {
        coturn: "syslog-facility",
        turnpike: "nothing: logs go to stderr (journald under systemd)",
    },
    Mapping {
        coturn: "new-log-timestamp",
        turnpike: "nothing: log lines carry RFC 3339 timestamps",
    },
    Mapping {
        coturn: "new-log-timestamp-format",
        turnpike: "nothing: log lines carry RFC 3339 timestamps",
    },
    Mapping {
        coturn: "log-binding",
        turnpike: "nothing: Binding requests are counted (turnpike_binding_requests_total), not logged one by one",
    },
    Mapping {
        coturn: "tls-alternate-server",
        turnpike: "not supported: --alternate-server is one list for every transport",
    },
    Mapping {
        coturn: "rest-api-separator",
        turnpike: "nothing at `:` (the default): REST-API usernames are EXPIRY:ID; another separator is not supported",
    },
    Mapping {
        coturn: "keep-address-family",
        turnpike: "not supported: relays follow RFC 8656 (IPv4 unless the client sends REQUESTED-ADDRESS-FAMILY)",
    },
    Mapping {
        coturn: "allocation-default-address-family",
        turnpike: "nothing at ipv4 (the default, RFC 8656); ipv6 or keep is not supported",
    },
    Mapping {
        coturn: "cli-ip",
        turnpike: "nothing: there is no telnet CLI (use --admin-listen for the admin API)",
    },
    Mapping {
        coturn: "cli-port",
        turnpike: "nothing: there is no telnet CLI (use --admin-listen for the admin API)",
    },
    Mapping {
        coturn: "cli-max-output-sessions",
        turnpike: "nothing: there is no telnet CLI (use --admin-listen for the admin API)",
    },
    Mapping {
        coturn: "web-admin",
        turnpike: "--admin-listen IP:PORT --admin-token-file FILE --web-ui (the dashboard, behind a bearer token)",
    },
    Mapping {
        coturn: "web-admin-ip",
        turnpike: "--admin-listen IP:PORT (with --admin-token-file FILE)",
    },
    Mapping {
        coturn: "web-admin-port",
        turnpike: "--admin-listen IP:PORT (with --admin-token-file FILE)",
    },
    Mapping {
        coturn: "web-admin-listen-on-workers",
        turnpike: "nothing: the admin API runs on a control-plane thread of its own",
    },
    Mapping {
        coturn: "acme-redirect",
        turnpike: "not supported: serve ACME challenges from a web server; renewed certificates are reloaded on SIGHUP or with --reload-on-change",
    },
    Mapping {
        coturn: "server-relay",
        turnpike: "not supported: relaying for the server's own use",
    },
    Mapping {
        coturn: "ne",
        turnpike: "nothing: turnpike has one network engine (a worker per core with SO_REUSEPORT)",
    },
    Mapping {
        coturn: "no-rfc5780",
        turnpike: "nothing: RFC 5780 is off unless --rfc5780 is given",
    },
    Mapping {
        coturn: "no-stun-backward-compatibility",
        turnpike: "nothing: RFC 3489 requests (no magic cookie) are not answered",
    },
    Mapping {
        coturn: "response-origin-only-with-rfc5780",
        turnpike: "nothing: RESPONSE-ORIGIN and OTHER-ADDRESS are sent only with --rfc5780",
    },
    Mapping {
        coturn: "no-loopback-peers",
        turnpike: "nothing: loopback peers are refused unless --allow-loopback-peers",
    },
];

/// The mapping for an option name (without dashes, before any `=`).
pub fn lookup(name: &str) -> Option<&'static Mapping> {
    MAPPINGS.iter().find(|m| m.coturn == name)
}

/// For a command line: the first coturn-only option in `args`, with the
/// sentence that tells the user what to do. `-c FILE` (coturn's config
/// flag) is caught too. Names in `ours` (options turnpike has under the
/// same name, such as `--max-bps`) are left to the parser.
pub fn explain_args(args: &[String], ours: &[&str]) -> Option<String> {
    for a in args {
        if a == "-c" {
            return Some(
                "`-c FILE` is coturn's config flag; turnpike's is `--config FILE` and takes TOML \
                 (`turnpike import coturn turnserver.conf --out turnpike.toml` writes one from \
                 coturn's; MIGRATING.md maps every option)"
                    .to_owned(),
            );
        }
        let Some(name) = a.strip_prefix("--") else {
            continue;
        };
        let name = name.split('=').next().unwrap_or(name);
        if ours.contains(&name) {
            continue;
        }
        if let Some(m) = lookup(name) {
            return Some(format!(
                "`--{name}` is coturn's name; in turnpike: {}",
                m.turnpike
            ));
        }
    }
    None
}

/// Whether `text` looks like a coturn `turnserver.conf` (bare `key=value`
/// or flag lines with coturn's names) rather than TOML.
pub fn looks_like_turnserver_conf(text: &str) -> bool {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let coturnish = lines
        .iter()
        .filter(|l| {
            let key = l.split('=').next().unwrap_or(l).trim();
            lookup(key).is_some() || (l.contains('=') && !l.contains('"') && !l.contains('['))
        })
        .count();
    !lines.is_empty() && coturnish * 2 >= lines.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrating_md_has_a_row_for_every_mapping() {
        let doc = include_str!("../../../MIGRATING.md");
        for m in MAPPINGS {
            let row = format!("| `{}` | {} |", m.coturn, m.turnpike);
            assert!(doc.contains(&row), "MIGRATING.md lacks: {row}");
        }
    }

    #[test]
    fn coturn_flags_are_answered_with_turnpikes_names() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let e = explain_args(&args(&["serve", "--static-auth-secret=s3cret"]), &[]).unwrap();
        assert!(e.contains("--auth-secret"), "{e}");
        let e = explain_args(&args(&["serve", "--listening-port", "3478"]), &[]).unwrap();
        assert!(e.contains("--listen IP:PORT"), "{e}");
        let e = explain_args(&args(&["serve", "--no-tlsv1"]), &[]).unwrap();
        assert!(e.contains("never offered") && !e.contains("--no-tls "), "{e}");
        assert!(explain_args(&args(&["serve", "-c", "/etc/turnserver.conf"]), &[]).is_some());
        assert!(explain_args(&args(&["serve", "--realm", "x", "--listen", "0.0.0.0:3478"]), &[]).is_none());
        // A name both servers have is turnpike's own.
        assert!(explain_args(&args(&["serve", "--max-bps", "50000"]), &["max-bps"]).is_none());
        assert!(explain_args(&args(&["serve", "--max-bps", "50000"]), &[]).is_some());
    }

    #[test]
    fn a_turnserver_conf_is_recognised() {
        let conf =
            "# coturn\nlistening-port=3478\nfingerprint\nlt-cred-mech\nuser=alice:pw\nrealm=example.org\n";
        assert!(looks_like_turnserver_conf(conf));
        let toml = "listen = [\"0.0.0.0:3478\"]\nrealm = \"example.org\"\n";
        assert!(!looks_like_turnserver_conf(toml));
    }
}
