//! What README, `serve --help` and deploy/ promise, held to the binary:
//! every option documented in each, the example configuration loading,
//! the systemd unit verifying, README's commands typed as written.

use crate::common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use turnpike_client::client::{binding, Channel, ClientTransport, TurnClient};

use super::{bin, demo_credential, lines, sigterm_and_wait, Server};

#[test]
fn help_documents_every_required_flag() {
    let out = bin().args(["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--tls-listen",
        "--cert",
        "--key",
        "--relay-ip",
        "--external-ip",
        "--min-port",
        "--max-port",
        "--realm",
        "--user",
        "--auth-secret",
        "--allow-loopback-peers",
        "--allow-peer",
        "--deny-peer",
        "--threads",
        "--log-level",
        "--software",
        "--rfc5766-channel-numbers",
        "--config",
    ] {
        assert!(help.contains(flag), "serve --help lacks {flag}");
    }
    // README's option table has a row for every flag --help lists, so a
    // documented flag exists and an existing one is documented.
    let readme =
        std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .unwrap();
    let mut flags: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '=', '<', '[']).next().unwrap_or(""))
        .filter(|f| !f.is_empty() && *f != "help")
        .collect();
    flags.sort();
    flags.dedup();
    assert!(flags.len() > 60, "{flags:?}");
    let undocumented: Vec<&&str> = flags
        .iter()
        .filter(|f| !readme.contains(&format!("`--{f}")))
        .collect();
    assert!(undocumented.is_empty(), "README lacks {undocumented:?}");
    // And the other way: every `--flag` README's table names exists.
    let table = readme
        .split("| option | meaning |")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    for cell in table.lines().filter_map(|l| l.split('|').nth(1)) {
        for word in cell.split('`').skip(1).step_by(2) {
            if let Some(f) = word.strip_prefix("--") {
                let f = f.split([' ', '=']).next().unwrap();
                assert!(
                    flags.contains(&f),
                    "README documents --{f}, which serve does not have"
                );
            }
        }
    }
    // Help texts that drifted once: limits are per host.
    assert!(
        !help.contains("one source IP, per worker"),
        "the answer budget is per host"
    );
}

#[test]
fn example_config_loads_and_documents_every_option() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/turnpike.toml");
    let args = turnpike::config::Options::from_file(&path).expect("deploy/turnpike.toml loads");
    let settings = turnpike::config::Settings::from_options(&args).expect("and validates");
    assert_eq!(settings.realm, "example.org");
    // Every long option of `serve --help` appears in the file, set or
    // commented, so the example cannot fall behind the flags.
    let text = std::fs::read_to_string(&path).unwrap();
    let help = String::from_utf8(bin().args(["serve", "--help"]).output().unwrap().stdout).unwrap();
    let options: Vec<&str> = help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|rest| rest.split([' ', '=', '[', '<']).next().unwrap())
        .collect();
    assert!(options.len() > 30, "parsed the options of --help: {options:?}");
    for key in options {
        if ["help", "config", ""].contains(&key) {
            continue;
        }
        assert!(
            text.contains(&format!("{key} =")),
            "deploy/turnpike.toml does not document {key}"
        );
    }
}

fn text_has_reload(unit: &std::path::Path) -> bool {
    std::fs::read_to_string(unit)
        .unwrap()
        .lines()
        .any(|l| l.starts_with("ExecReload=") && l.contains("-HUP"))
}

#[test]
fn systemd_unit_verifies() {
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    assert!(
        analyze.exists(),
        "systemd-analyze not found (Debian package systemd)"
    );
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/turnpike.service");
    // Point ExecStart at the binary under test so verify can check it.
    let dir = std::env::temp_dir().join(format!("turnpike-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("/usr/bin/turnpike", common::turnpike_bin());
    // systemd's SIGKILL must not land while the drain is still running.
    let stop_after: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .and_then(|v| v.trim().parse().ok())
        .expect("TimeoutStopSec=SECONDS in the unit");
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/turnpike.toml"),
    )
    .unwrap();
    let drain = example
        .lines()
        .find_map(|l| l.strip_prefix("drain-timeout = "))
        .and_then(|v| {
            v.trim()
                .trim_matches('"')
                .parse::<turnpike::config::Period>()
                .ok()
        })
        .expect("drain-timeout in deploy/turnpike.toml")
        .as_secs();
    assert!(
        stop_after >= drain + 10,
        "TimeoutStopSec={stop_after} leaves no margin over drain-timeout {drain}"
    );
    assert!(
        !text.contains("example.invalid"),
        "Documentation= names a real document"
    );
    let copy = dir.join("turnpike.service");
    std::fs::write(&copy, text).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&copy).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Complaints about this machine's own units (no systemd running) are
    // not ours; anything naming our unit is.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("turnpike.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify: {stderr}");
    assert!(
        text_has_reload(&unit),
        "systemctl reload must reach SIGHUP (ExecReload)"
    );
    assert!(out.status.success(), "systemd-analyze verify failed: {stderr}");
}

/// The first command of a ```sh block after `heading` in README.md.
fn readme_command(readme: &str, heading: &str) -> String {
    let section = readme
        .split(heading)
        .nth(1)
        .unwrap_or_else(|| panic!("README.md has a {heading:?} section"));
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap_or_else(|| panic!("a ```sh block under {heading:?}"));
    block
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .expect("a command")
        .to_owned()
}

/// README's two commands, read from README.md and typed as written: the
/// run command starts the server with its defaults (inside a network
/// namespace of its own, so ports 3478/5349 of the host are not touched),
/// and STUN, TURN and TLS answer on the default ports; the test command is
/// what CI runs.
#[test]
fn readme_commands_work_as_written() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let run = readme_command(&readme, "## Run it");
    let test = readme_command(&readme, "## Test it");
    assert_eq!(test, "bash .ci/run", "CI runs .ci/run; README must say so");
    assert!(
        std::fs::read_to_string(root.join(".ci/run"))
            .unwrap()
            .contains("cargo test --workspace"),
        ".ci/run runs every test"
    );
    if common::euid() != 0 {
        common::missing("readme run command", "needs root for a network namespace");
        return;
    }
    let Some(ns) = common::Netns::new("readme") else {
        common::missing("readme run command", "`ip netns add` failed (iproute2)");
        return;
    };
    // As typed in a shell at the repository's root.
    let mut child = common::login_env(
        Command::new("ip")
            .args(["netns", "exec", &ns.0, "sh", "-c", &format!("exec {run}")])
            .current_dir(&root),
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let out = lines(child.stdout.take().unwrap());
    let err = lines(child.stderr.take().unwrap());
    let child = Server(Some(child));
    let mut seen = Vec::new();
    // A release build may come first (CI builds it before the tests).
    let started = loop {
        match err.recv_timeout(Duration::from_secs(900)) {
            Ok(l) if l.contains("turnpike started") => break l,
            Ok(l) => seen.push(l),
            Err(_) => panic!("`{run}` did not start the server:\n{}", seen.join("\n")),
        }
    };
    assert!(started.contains("3478") && started.contains("5349"), "{started}");
    let mut banner = Vec::new();
    let (user, password) = demo_credential(&out, &mut banner);
    let answers = common::in_ns(&ns.0, move || {
        let t = Duration::from_secs(3);
        let mut got = Vec::new();
        for (what, transport, addr) in [
            ("udp 3478", ClientTransport::Udp, "127.0.0.1:3478"),
            ("tcp 3478", ClientTransport::Tcp, "127.0.0.1:3478"),
            ("udp [::1]:3478", ClientTransport::Udp, "[::1]:3478"),
            (
                "tls 5349",
                ClientTransport::Tls { pinned: None },
                "127.0.0.1:5349",
            ),
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut ch = Channel::connect(&transport, addr, t).unwrap();
            got.push((what, binding(&mut ch, t).is_ok()));
        }
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Udp, "127.0.0.1:3478".parse().unwrap(), t).unwrap(),
            &user,
            &password,
        );
        let relayed = c.allocate().is_ok();
        let _ = c.refresh(0);
        got.push(("turn allocate with the banner's credential", relayed));
        got
    });
    for (what, ok) in &answers {
        assert!(ok, "{what} answers after `{run}`: {answers:?}");
    }
    let st = sigterm_and_wait(child);
    assert!(st.success(), "{st:?}");
}

/// deploy/turnpike-watch.service as a user installs it: `systemd-analyze
/// verify` accepts it, and its ExecStart, typed as written (only the
/// targets pointed at a real turnpike on loopback, the credential
/// directory `%d` at a temporary one, the port and interval shortened),
/// watches all four transports and serves their metrics.
#[test]
fn the_watch_unit_verifies_and_its_command_line_watches_a_real_server() {
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists()
        && common::missing("watch unit", "systemd-analyze not found (Debian package systemd)")
    {
        return;
    }
    let unit = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/turnpike-watch.service");
    let text = std::fs::read_to_string(&unit)
        .unwrap()
        .replace("/usr/bin/turnpike", common::turnpike_bin());
    let dir = std::env::temp_dir().join(format!("turnpike-watch-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("turnpike-watch.service");
    std::fs::write(&copy, &text).unwrap();
    let out = Command::new(analyze).arg("verify").arg(&copy).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("turnpike-watch.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze verify: {stderr}");

    // ExecStart, its continuation lines joined, split as systemd does
    // (no quotes in it).
    let exec = text
        .split("ExecStart=")
        .nth(1)
        .expect("ExecStart=")
        .lines()
        .scan(true, |more, l| {
            let take = *more;
            *more = l.trim_end().ends_with('\\');
            take.then(|| l.trim_end().trim_end_matches('\\').to_owned())
        })
        .collect::<Vec<_>>()
        .join(" ");
    assert!(!exec.contains('"') && !exec.contains('\''), "{exec}");
    let server = turnpike::runtime::start(
        &common::settings(&["--user", "watch:a-watch-password", "--allow-peer", "127.0.0.1/32"]).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("watch-password"), "a-watch-password\n").unwrap();
    let metrics = common::free_port();
    let (p, t, d) = (
        server.listen[0].port(),
        server.tls_listen[0].port(),
        server.dtls_listen[0].port(),
    );
    let args: Vec<String> = exec
        .split_whitespace()
        .skip(1)
        .map(|a| {
            a.replace("%d", dir.to_str().unwrap())
                .replace("127.0.0.1:9642", &format!("127.0.0.1:{metrics}"))
                .replace("turn.example.org:3478", &format!("127.0.0.1:{p}"))
                .replace(
                    "turn.example.org:5349?transport=dtls",
                    &format!("127.0.0.1:{d}?transport=dtls"),
                )
                .replace("turn.example.org:5349", &format!("127.0.0.1:{t}"))
        })
        .collect();
    let mut args = args;
    if let Some(i) = args.iter().position(|a| a == "--interval") {
        args[i + 1] = "1".into();
    }
    assert!(
        !args.iter().any(|a| a.contains("example.org") || a.contains('%')),
        "{args:?}"
    );
    let (_watch, _) = crate::watch::four_transports_up(&args, metrics);
    drop(_watch);
    server.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
