use std::net::{IpAddr, SocketAddr};

use turn_core::auth::PasswordAlgorithm;

use super::super::parse::{check_log_level, parse_socket_addr};
use super::super::{HostFacts, Options};
use super::*;

fn parse(args: &[&str]) -> Options {
    Options::from_argv(std::iter::once("x").chain(args.iter().copied())).unwrap()
}

/// Parsed and validated against this host, as `serve` does.
fn settle(args: &[&str]) -> anyhow::Result<Settings> {
    let o = Options::from_argv(std::iter::once("x").chain(args.iter().copied()))?;
    validate(&o, &HostFacts::read(&o))
}

#[test]
fn a_mistyped_key_gets_the_nearest_one_not_all_of_them() {
    let dir = std::env::temp_dir().join(format!("turnpike-typo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (text, want) in [
        ("relm = \"x\"\n", "did you mean `realm`?"),
        ("relay-ipp = \"1.2.3.4\"\n", "did you mean `relay-ip`?"),
        ("min_port = 5\n", "did you mean `min-port`?"),
        ("allow-peers = []\n", "did you mean `allow-peer`?"),
    ] {
        let f = dir.join("t.toml");
        std::fs::write(&f, text).unwrap();
        let e = format!("{:#}", Options::from_file(&f).unwrap_err());
        assert!(e.contains(want), "{text}: {e}");
        assert!(!e.contains("expected one of"), "no list of every key: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn defaults_are_useful() {
    let s = validate(&Options::default(), &HostFacts::read(&Options::default())).unwrap();
    assert!(s.listen.iter().any(|l| l.port() == 3478));
    assert!(s.tls_listen.iter().any(|l| l.port() == 5349));
    assert_eq!(s.tls, Some(TlsSource::SelfSigned));
    assert!(s.demo_user.is_some(), "a demo credential when none is configured");
    assert_eq!((s.options.min_port, s.options.max_port), (49152, 65535));
    assert!(s.relay_v4.is_some());
    assert!(!s.options.allow_loopback_peers);
}

#[test]
fn flags_override_file_and_arrays_replace() {
    let dir = std::env::temp_dir().join(format!("turnpike-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("t.toml");
    std::fs::write(
        &f,
        "listen = [\"127.0.0.1:3478\"]\nrealm = \"file.org\"\nuser = [\"alice:secret\"]\nallow-loopback-peers = true\nmin-port = 50000\n",
    )
    .unwrap();
    let merged = parse(&[
        "--config",
        f.to_str().unwrap(),
        "--realm",
        "cli.org",
        "--listen",
        "127.0.0.1:4000",
    ]);
    assert_eq!(merged.realm, "cli.org");
    assert_eq!(
        merged.listen,
        vec!["127.0.0.1:4000".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(merged.user, vec!["alice:secret".parse().unwrap()]);
    // What the command line does not give is the file's, not clap's default.
    assert!(merged.allow_loopback_peers);
    assert_eq!(merged.min_port, 50000);
    assert_eq!(merged.max_port, 65535, "the declared default under both");
    let merged = parse(&["--config", f.to_str().unwrap(), "--allow-loopback-peers=false"]);
    assert!(!merged.allow_loopback_peers);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let dir = std::env::temp_dir().join(format!("turnpike-cfg2-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(&f, "realm = \"x\"\nlisten-port = 3478\n").unwrap();
    let err = Options::from_file(&f).unwrap_err().to_string();
    assert!(err.contains("listen-port"), "{err}");
    assert!(err.contains("unknown field"), "{err}");
}

#[test]
fn bad_values_name_the_field() {
    let cases: &[(&[&str], &str)] = &[
        (&["--min-port", "60000", "--max-port", "50000"], "min-port"),
        (&["--user", "alice"], "NAME:PASSWORD"),
        (&["--allow-peer", "10.0.0.0/99"], "allow-peer"),
        (&["--deny-peer", "bogus"], "deny-peer"),
        (&["--cert", "/x.pem"], "key"),
        (&["--threads", "0"], "threads"),
        (&["--log-level", "lo[ud"], "log-level"),
        (&["--log-level", "verbose"], "log-level"),
        (&["--log-level", "warning"], "did you mean warn"),
        (&["--log-level", "debg"], "log-level"),
        (&["--relay-ip", "192.0.2.77"], "not an address of this host"),
        (&["--relay-ip", "0.0.0.0"], "relay-ip"),
        (&["--user", "bob:0x1234"], "32 hex"),
        (&["--user", "alice:change-me"], "example password"),
        (&["--auth-secret", "a-long-random-secret"], "example"),
    ];
    for (args, needle) in cases {
        let err = settle(args).unwrap_err().to_string();
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_repeatable_key_takes_one_value_or_a_list() {
    let dir = std::env::temp_dir().join(format!("turnpike-one-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("one.toml");
    std::fs::write(
        &f,
        "relay-ip = \"127.0.0.1\"\nuser = \"alice:pw\"\nlisten = [\"127.0.0.1:3478\", \"127.0.0.1:3479\"]\n",
    )
    .unwrap();
    let a = Options::from_file(&f).unwrap();
    assert_eq!(a.relay_ip, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
    assert_eq!(a.user, vec!["alice:pw".parse().unwrap()]);
    assert_eq!(a.listen.len(), 2);
    std::fs::write(&f, "relay-ip = \"not-an-ip\"\n").unwrap();
    let err = Options::from_file(&f).unwrap_err().to_string();
    assert!(
        err.contains("relay-ip") && err.contains("invalid IP address"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn address_errors_say_which_part_is_wrong() {
    for (v, needle) in [
        ("127.0.0.1:70000", "port 70000 is above 65535"),
        ("300.1.1.1:3478", "\"300.1.1.1\" is not an IP address"),
        ("127.0.0.1", "has no port"),
        ("::1", "[::1]:3478"),
        ("127.0.0.1:http", "not a port number"),
    ] {
        let err = parse_socket_addr(v).unwrap_err();
        assert!(err.contains(needle), "{v}: {err}");
    }
    assert_eq!(
        parse_socket_addr("[::1]:3478").unwrap(),
        "[::1]:3478".parse().unwrap()
    );
}

#[test]
fn a_coturn_key_in_toml_gets_turnpikes_name() {
    let dir = std::env::temp_dir().join(format!("turnpike-ckey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("c.toml");
    std::fs::write(&f, "realm = \"x\"\nlistening-port = 3478\n").unwrap();
    let err = Options::from_file(&f).unwrap_err().to_string();
    assert!(
        err.contains("unknown field") && err.contains("coturn's name") && err.contains("--listen"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_realm_too_long_for_a_small_challenge_is_refused_unless_allowed() {
    let long = "turn.example-company.example";
    let err = settle(&["--user", "alice:pw", "--realm", long, "--no-tls"])
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(
        err.starts_with("realm:") && err.contains("28 bytes") && err.contains("--allow-long-realm"),
        "{err}"
    );
    let s = settle(&[
        "--user",
        "alice:pw",
        "--realm",
        long,
        "--allow-long-realm",
        "--no-tls",
    ])
    .unwrap();
    assert!(s.options.allow_long_realm);
    let ok = "a".repeat(24);
    assert!(settle(&["--user", "alice:pw", "--realm", &ok, "--no-tls"]).is_ok());
}

#[test]
fn a_tcp_connect_timeout_under_the_rfc_minimum_is_refused() {
    let err = settle(&["--user", "a:pw", "--no-tls", "--tcp-connect-timeout", "5"])
        .map(|_| ())
        .expect_err("refused")
        .to_string();
    assert!(
        err.starts_with("tcp-connect-timeout:") && err.contains("30"),
        "{err}"
    );
    let s = settle(&[
        "--user",
        "a:pw",
        "--no-tls",
        "--tcp-connect-timeout",
        "45",
        "--tcp-connections-per-allocation",
        "8",
    ])
    .unwrap();
    assert_eq!(
        s.options.tcp_connect_timeout.get(),
        std::time::Duration::from_secs(45)
    );
    assert_eq!(s.options.tcp_connections_per_allocation, 8);
}

#[test]
fn levels_and_filters_are_accepted() {
    for ok in [
        "warn",
        "INFO",
        "off",
        "info,turnpike=debug",
        "turnpike::runtime=trace",
    ] {
        assert!(check_log_level(ok).is_ok(), "{ok}");
    }
}

#[test]
fn users_become_keys() {
    let s = settle(&["--user", "alice:pw", "--realm", "r", "--no-tls"]).unwrap();
    assert!(s.demo_user.is_none());
    assert!(s.tls.is_none() && s.tls_listen.is_empty());
    let mut keys = Vec::new();
    s.credentials
        .keys_for("alice", "r", 0, PasswordAlgorithm::Md5, &mut keys)
        .unwrap();
    let md5 = stun_proto::long_term_key_md5("alice", "r", "pw");
    assert_eq!(keys[0].as_bytes(), &md5);
    let k = hex16(&md5);
    let s = settle(&["--user", &format!("bob:0x{k}")]).unwrap();
    s.credentials
        .keys_for("bob", "turnpike", 0, PasswordAlgorithm::Md5, &mut keys)
        .unwrap();
    assert_eq!(keys[0].as_bytes(), &md5);
}

fn hex16(k: &[u8; 16]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

/// A host with nothing in it but what the test says.
fn host() -> HostFacts {
    HostFacts {
        ipv6: true,
        routed_v4: Some("192.0.2.10".parse().unwrap()),
        routed_v6: None,
        addresses: vec!["192.0.2.10".parse().unwrap(), "127.0.0.1".parse().unwrap()],
        privileged_ports: false,
        cores: 6,
        ..HostFacts::default()
    }
}

#[test]
fn validation_decides_by_the_host_facts_it_is_given() {
    let o = parse(&["--user", "a:pw"]);
    let s = validate(&o, &host()).unwrap();
    assert_eq!(s.threads, 6, "one worker per core");
    assert_eq!(
        s.relay_v4,
        Some("192.0.2.10".parse().unwrap()),
        "the routed address"
    );
    assert_eq!(s.relay_v6, None, "no global IPv6 address: no IPv6 relay");
    assert_eq!(s.listen.len(), 2, "IPv6 works: both families listen");
    let s = validate(
        &o,
        &HostFacts {
            ipv6: false,
            ..host()
        },
    )
    .unwrap();
    assert_eq!(s.listen, vec!["0.0.0.0:3478".parse::<SocketAddr>().unwrap()]);
    let err = validate(&parse(&["--user", "a:pw", "--min-port", "500"]), &host()).unwrap_err();
    assert!(err.to_string().contains("CAP_NET_BIND_SERVICE"), "{err}");
    let privileged = HostFacts {
        privileged_ports: true,
        ..host()
    };
    assert!(validate(&parse(&["--user", "a:pw", "--min-port", "500"]), &privileged).is_ok());
    let err = validate(&parse(&["--user", "a:pw", "--relay-ip", "192.0.2.11"]), &host()).unwrap_err();
    assert!(
        err.to_string()
            .contains("not an address of this host (it has 192.0.2.10, 127.0.0.1)"),
        "{err}"
    );
}

#[test]
fn files_are_read_before_validation_and_named_when_missing() {
    let f = std::path::PathBuf::from("/nonexistent/secrets");
    let o = parse(&["--auth-secret-file", "/nonexistent/secrets"]);
    let mut h = host();
    h.files
        .insert(f.clone(), Ok("s3cret-one\n\ns3cret-two\n".to_owned()));
    let s = validate(&o, &h).unwrap();
    assert_eq!(s.credentials.secret_count(), 2);
    h.files
        .insert(f.clone(), Err("No such file or directory".to_owned()));
    let err = validate(&o, &h).unwrap_err().to_string();
    assert!(
        err.starts_with("auth-secret-file: cannot read /nonexistent/secrets"),
        "{err}"
    );
    let err = Settings::from_options(&o).unwrap_err().to_string();
    assert!(
        err.contains("auth-secret-file") && err.contains("No such file"),
        "{err}"
    );
}

#[test]
fn every_option_has_one_default_and_the_file_and_flags_agree_on_it() {
    // The default of a flag not given is the same value whether it comes
    // from clap (command line) or serde (file): both are Options::default().
    let from_flags = parse(&[]);
    let from_file: Options = toml::from_str("").unwrap();
    assert_eq!(from_flags, from_file);
    assert_eq!(from_flags, Options::default());
    // And --help states it, for every option that has a fixed one.
    let help = Options::help();
    for (flag, default) in [
        ("--min-port", "49152"),
        ("--realm", "turnpike"),
        ("--rate-limit-per-ip", "200"),
        ("--fast-path", "auto"),
        ("--udp-gso", "true"),
        ("--peer-precedence", "deny"),
    ] {
        let at = help
            .find(&format!("      {flag} "))
            .or_else(|| help.find(&format!("      {flag}[")))
            .unwrap();
        let entry = &help[at..];
        let entry = &entry[..entry[8..]
            .find("\n      --")
            .map(|e| e + 8)
            .unwrap_or(entry.len())];
        assert!(
            entry.contains(&format!("[default: {default}]")),
            "{flag}: {entry}"
        );
    }
}

#[test]
fn durations_take_seconds_or_units_and_show_the_shortest_form() {
    use super::super::Period;
    for (text, secs, shown) in [
        ("600", 600, "10m"),
        ("0", 0, "0s"),
        ("90", 90, "1m30s"),
        ("90s", 90, "1m30s"),
        ("10m", 600, "10m"),
        ("1h30m", 5400, "1h30m"),
        ("2d", 172_800, "2d"),
        ("1h0m5s", 3605, "1h5s"),
    ] {
        let p: Period = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(p.as_secs(), secs, "{text}");
        assert_eq!(p.to_string(), shown, "{text}");
        assert_eq!(shown.parse::<Period>().unwrap(), p, "{shown} reads back");
    }
    let half: Period = "1500ms".parse().unwrap();
    assert_eq!(half.get(), std::time::Duration::from_millis(1500));
    assert_eq!(half.to_string(), "1500ms");
    for bad in [
        "",
        "m",
        "10x",
        "-5",
        "1.5s",
        "5s10m",
        "10m10m",
        "99999999999999999999d",
        "10 m",
    ] {
        let e = bad.parse::<Period>().expect_err(bad);
        assert!(e.contains("give seconds (600) or units"), "{bad}: {e}");
    }
}

#[test]
fn a_duration_option_reads_the_same_from_flags_and_file_in_either_form() {
    // A file written before units (and `import coturn`'s output) says
    // seconds as a number; units come as a string.
    let by_flag = parse(&["--idle-timeout", "2m", "--drain-timeout", "45"]);
    for text in [
        "idle-timeout = 120\ndrain-timeout = 45\n",
        "idle-timeout = \"2m\"\ndrain-timeout = \"45s\"\n",
    ] {
        let by_file: Options = toml::from_str(text).unwrap();
        assert_eq!(by_file.idle_timeout, by_flag.idle_timeout, "{text}");
        assert_eq!(by_file.drain_timeout, by_flag.drain_timeout, "{text}");
    }
    let e = toml::from_str::<Options>("idle-timeout = -3\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("negative"), "{e}");
    let e = toml::from_str::<Options>("idle-timeout = \"soon\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("idle-timeout") && e.contains("not a duration"), "{e}");
    // What /api/config shows and a written file holds reads back.
    let shown = toml::to_string(&by_flag).unwrap();
    assert!(shown.contains("idle-timeout = \"2m\""), "{shown}");
    assert_eq!(toml::from_str::<Options>(&shown).unwrap(), by_flag);
    // Below a second, where the wire counts whole seconds: refused by name.
    let err = settle(&["--user", "a:pw", "--no-tls", "--nonce-lifetime", "500ms"])
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("nonce-lifetime: 500ms is less than a second"),
        "{err}"
    );
}
