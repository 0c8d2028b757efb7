//! turnpike as an operator installs it: the Debian package built by
//! deploy/deb/build.sh, installed with dpkg, started the way its systemd
//! unit's ExecStart does (as the package's user, with only
//! CAP_NET_BIND_SERVICE, inside a network namespace of its own so the
//! host's ports are untouched), probed, and purged. Needs root and dpkg:
//! skipped with a message elsewhere, a failure in CI.

use crate::common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use turnpike_client::client::{binding, Channel, ClientTransport, TurnClient};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn sh(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Purges the package when the test ends, however it ends.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", "turnpike"]).output();
    }
}

fn unit_value(unit: &str, key: &str) -> String {
    unit.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key}= in the unit"))
        .trim()
        .to_owned()
}

#[test]
fn the_debian_package_installs_serves_and_purges() {
    if common::euid() != 0 {
        common::missing("debian package", "needs root (dpkg -i)");
        return;
    }
    if Command::new("dpkg-deb").arg("--version").output().is_err() {
        common::missing("debian package", "dpkg-deb not found");
        return;
    }
    let status = Command::new("dpkg").args(["-s", "turnpike"]).output().unwrap();
    if status.status.success()
        && String::from_utf8_lossy(&status.stdout).contains("Status: install ok installed")
    {
        // Somebody's real installation: not this test's to replace or purge
        // (under CI, a machine that is not clean: a failure).
        common::missing("debian package", "turnpike is installed on this host already");
        return;
    }
    let built = common::login_env(
        Command::new("bash")
            .arg("deploy/deb/build.sh")
            .current_dir(root()),
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "deploy/deb/build.sh:\n{stdout}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let deb = root().join(stdout.lines().last().unwrap_or_default().trim());
    assert!(deb.exists(), "{}", deb.display());
    eprintln!(
        "package {}: {} KiB",
        deb.display(),
        std::fs::metadata(&deb).unwrap().len() / 1024
    );
    let installed = Installed;
    let (ok, out) = sh(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(ok, "dpkg -i:\n{out}");

    // What the package put where, owned by whom.
    for path in [
        "/usr/bin/turnpike",
        "/lib/systemd/system/turnpike.service",
        "/lib/systemd/system/turnpike-watch.service",
        "/etc/turnpike/turnpike.toml",
        "/usr/share/doc/turnpike/README.md",
    ] {
        assert!(Path::new(path).exists(), "{path} installed");
    }
    let (ok, conffiles) = sh(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "turnpike"]));
    assert!(
        ok && conffiles.contains("/etc/turnpike/turnpike.toml"),
        "a conffile: {conffiles}"
    );
    let (ok, passwd) = sh(Command::new("getent").args(["passwd", "turnpike"]));
    assert!(ok, "the turnpike system user exists: {passwd}");
    use std::os::unix::fs::MetadataExt;
    let uid: u32 = passwd.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "a system user: {passwd}");
    let state = std::fs::metadata("/var/lib/turnpike").expect("the state directory");
    assert_eq!(state.uid(), uid, "owned by the service user");
    let conf = std::fs::metadata("/etc/turnpike/turnpike.toml").unwrap();
    assert_eq!(
        conf.mode() & 0o777,
        0o640,
        "the configuration is not world-readable"
    );
    // Nothing was started by the install.
    assert!(
        !Path::new("/run/systemd/system").exists()
            || !sh(Command::new("systemctl").args(["is-active", "--quiet", "turnpike"])).0,
        "the install starts no server"
    );
    // The units, verified where systemd-analyze exists.
    let unit = std::fs::read_to_string("/lib/systemd/system/turnpike.service").unwrap();
    if Path::new("/usr/bin/systemd-analyze").exists() {
        for name in ["turnpike.service", "turnpike-watch.service"] {
            let (_, out) =
                sh(Command::new("systemd-analyze").args(["verify", &format!("/lib/systemd/system/{name}")]));
            let ours: Vec<&str> = out.lines().filter(|l| l.contains(name)).collect();
            assert!(ours.is_empty(), "systemd-analyze verify {name}: {out}");
        }
    }

    // A user added the way README says, as root, before the start: the
    // server (running as the service user) must be able to read it.
    let mut add = Command::new("/usr/bin/turnpike")
        .args(["user", "add", "alice"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut add.stdin.take().unwrap(), b"alice-pw\n").unwrap();
    let added = add.wait_with_output().unwrap();
    let added_err = String::from_utf8_lossy(&added.stderr);
    assert!(added.status.success(), "{added_err}");
    assert!(
        added_err.contains("realm example.org"),
        "the installed configuration's realm: {added_err}"
    );
    let db = std::fs::metadata("/var/lib/turnpike/users.db").unwrap();
    assert_eq!(
        (db.uid(), db.mode() & 0o777),
        (uid, 0o600),
        "users.db: the service user's, 0600"
    );

    // Start it as the unit does: its ExecStart, as its User, with only
    // its ambient capability, with systemd's STATE_DIRECTORY.
    let exec = unit_value(&unit, "ExecStart");
    let user = unit_value(&unit, "User");
    let caps = unit_value(&unit, "AmbientCapabilities");
    assert_eq!(caps, "CAP_NET_BIND_SERVICE");
    let Some(ns) = common::Netns::new("deb") else {
        common::missing("debian package", "`ip netns add` failed (iproute2)");
        return;
    };
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, "setpriv"])
        .args(["--reuid", &user, "--regid", &user, "--init-groups"])
        .args([
            "--inh-caps",
            "+net_bind_service",
            "--ambient-caps",
            "+net_bind_service",
        ])
        .args(["--bounding-set", "-all,+net_bind_service"])
        .args(exec.split_whitespace())
        .env_clear()
        .env("STATE_DIRECTORY", "/var/lib/turnpike")
        .env("PATH", "/usr/bin:/bin");
    let (server, started, _rest) = common::spawn_server(&mut cmd);
    assert!(
        started.contains("3478") && started.contains("5349") && started.contains("database 1 user"),
        "{started}"
    );
    let answers = common::in_ns(&ns.0, move || {
        let t = Duration::from_secs(3);
        let udp: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let mut ch = Channel::connect(&ClientTransport::Udp, udp, t).unwrap();
        let stun = binding(&mut ch, t).is_ok();
        let mut tls = Channel::connect(
            &ClientTransport::Tls { pinned: None },
            "127.0.0.1:5349".parse().unwrap(),
            t,
        )
        .unwrap();
        let tls = binding(&mut tls, t).is_ok();
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Udp, udp, t).unwrap(),
            "alice",
            "alice-pw",
        );
        let turn = c.allocate().is_ok();
        let _ = c.refresh(0);
        let probe = Command::new("/usr/bin/turnpike")
            .args([
                "probe",
                "turn",
                "turn:127.0.0.1",
                "--user",
                "alice",
                "--password",
                "alice-pw",
            ])
            .output()
            .unwrap();
        (stun, tls, turn, probe)
    });
    let (stun, tls, turn, probe) = answers;
    assert!(stun, "STUN on 3478");
    assert!(tls, "TLS on 5349");
    assert!(turn, "TURN with the user added before the start");
    assert!(
        probe.status.success(),
        "turnpike probe against the installed server:\n{}",
        String::from_utf8_lossy(&probe.stdout)
    );
    drop(server);
    drop(ns);

    drop(installed);
    for path in ["/usr/bin/turnpike", "/etc/turnpike", "/var/lib/turnpike"] {
        assert!(!Path::new(path).exists(), "{path} is gone after purge");
    }
}

/// The OCI image, built by deploy/image.sh from deploy/Dockerfile with
/// Debian's buildah (its base made with debootstrap when no registry can
/// be reached), run with podman in a network namespace of its own, as its
/// non-root user with every capability dropped but NET_BIND_SERVICE, and
/// probed over STUN and TURN. Its size is reported.
#[test]
fn the_oci_image_builds_runs_and_serves() {
    if common::euid() != 0 {
        common::missing("oci image", "needs root (podman with runc, network namespaces)");
        return;
    }
    for tool in ["podman", "buildah", "debootstrap", "runc"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            common::missing("oci image", &format!("{tool} not found (Debian package {tool})"));
            return;
        }
    }
    let state = root()
        .join("target/containers")
        .canonicalize()
        .unwrap_or_else(|_| {
            std::fs::create_dir_all(root().join("target/containers")).unwrap();
            root().join("target/containers").canonicalize().unwrap()
        });
    let built = common::login_env(
        Command::new("bash")
            .arg("deploy/image.sh")
            .current_dir(root())
            .env("TURNPIKE_CONTAINERS", &state),
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&built.stdout);
    assert!(
        built.status.success(),
        "deploy/image.sh:\n{stdout}{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default().to_owned();
    let (tag, size) = last.split_once(' ').expect("TAG SIZE");
    let size: u64 = size.trim().parse().unwrap();
    eprintln!("image {tag}: {} MB", size / 1_000_000);
    assert!(size < 200_000_000, "the image stays small: {size} bytes");

    let Some(ns) = common::Netns::new("img") else {
        common::missing("oci image", "`ip netns add` failed (iproute2)");
        return;
    };
    let name = format!("turnpike-test-{}", std::process::id());
    let podman = |args: &[&str]| {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_STORAGE_CONF", state.join("storage.conf"))
            .env("CONTAINERS_CONF", state.join("containers.conf"))
            .args(args);
        c
    };
    // Removes the test's own container, by the name it gave it.
    struct Container<'a>(&'a dyn Fn(&[&str]) -> Command, String);
    impl Drop for Container<'_> {
        fn drop(&mut self) {
            let _ = (self.0)(&["rm", "-f", "-t", "2", &self.1]).output();
        }
    }
    let netns = format!("ns:/var/run/netns/{}", ns.0);
    let mut run = podman(&[
        "run",
        "--rm",
        "--name",
        &name,
        "--network",
        &netns,
        "--cap-drop",
        "all",
        "--cap-add",
        "net_bind_service",
        tag,
        "serve",
        "--realm",
        "img.example",
        "--user",
        "ivy:ivy-pw",
        "--threads",
        "1",
    ]);
    let (server, started, _rest) = common::spawn_server(&mut run);
    let _container = Container(&podman, name.clone());
    assert!(started.contains("3478") && started.contains("5349"), "{started}");
    let (ok, user) = sh(&mut podman(&[
        "exec",
        &name,
        "sh",
        "-c",
        "id -u; grep Cap[EP] /proc/1/status",
    ]));
    assert!(ok, "{user}");
    assert!(user.starts_with("65532\n"), "not root: {user}");
    // CAP_NET_BIND_SERVICE is bit 10: effective and permitted are 0x400 at most.
    for line in user.lines().skip(1) {
        let caps = u64::from_str_radix(line.split_whitespace().last().unwrap(), 16).unwrap();
        assert_eq!(caps & !0x400, 0, "only NET_BIND_SERVICE: {line}");
    }
    let (stun, turn) = common::in_ns(&ns.0, || {
        let t = Duration::from_secs(3);
        let udp: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        let mut ch = Channel::connect(&ClientTransport::Udp, udp, t).unwrap();
        let stun = binding(&mut ch, t).is_ok();
        let mut c = TurnClient::new(
            Channel::connect(&ClientTransport::Tcp, udp, t).unwrap(),
            "ivy",
            "ivy-pw",
        );
        let turn = c.allocate().is_ok();
        let _ = c.refresh(0);
        (stun, turn)
    });
    assert!(stun, "STUN through the image");
    assert!(turn, "TURN through the image");
    let (ok, out) = sh(&mut podman(&["stop", "-t", "10", &name]));
    assert!(ok, "podman stop: {out}");
    drop(server);
}
