//! The pages' endpoints over real HTTP against the real binary: the ICE
//! credential is refused without the admin token in operator mode, is
//! rate-limited per IP in public mode, works for TURN and stops working
//! when it expires; the dashboard's API needs the token; settings that
//! cannot work are refused at start. (The pages themselves run in real
//! browsers in browser.rs.)

use crate::common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turnpike_client::client::{Channel, ClientError, ClientTransport, TurnClient};

const TOKEN: &str = "web-test-admin-token-0123";

struct Server {
    _proc: common::Proc,
    turn: SocketAddr,
    admin: SocketAddr,
    public: SocketAddr,
}

fn server() -> Server {
    let (admin, public) = (common::free_port(), common::free_port());
    let mut cmd = Command::new(common::turnpike_bin());
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--no-tls",
        "--user",
        "alice:wonderland",
    ])
    .args([
        "--admin-listen",
        &format!("127.0.0.1:{admin}"),
        "--admin-token",
        TOKEN,
        "--web-ui",
    ])
    .args(["--web-listen", &format!("127.0.0.1:{public}")])
    .args(["--web-credential-ttl", "30", "--web-credentials-per-minute", "3"]);
    let (proc, line, _) = common::spawn_server(&mut cmd);
    Server {
        _proc: proc,
        turn: common::listen_addr(&line),
        admin: format!("127.0.0.1:{admin}").parse().unwrap(),
        public: format!("127.0.0.1:{public}").parse().unwrap(),
    }
}

fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    common::http_request(addr, "POST", path, token).unwrap()
}

fn allocate(server: SocketAddr, user: &str, password: &str) -> Result<(), ClientError> {
    let ch = Channel::connect(&ClientTransport::Udp, server, Duration::from_secs(2)).unwrap();
    let mut c = TurnClient::new(ch, user, password);
    c.allocate()?;
    c.refresh(0).map(|_| ())
}

#[test]
fn the_ice_credential_needs_the_token_is_rate_limited_and_expires() {
    let s = server();
    // Operator mode: no token, a wrong one, then the right one.
    assert_eq!(post(s.admin, "/api/ice/credentials", None).0, 401);
    assert_eq!(
        post(s.admin, "/api/ice/credentials", Some("wrong-token-wrong-token")).0,
        401
    );
    let (code, body) = post(s.admin, "/api/ice/credentials", Some(TOKEN));
    assert_eq!(code, 200, "{body}");
    let cred: serde_json::Value = serde_json::from_str(&body).unwrap();
    let user = cred["username"].as_str().unwrap().to_owned();
    let password = cred["credential"].as_str().unwrap().to_owned();
    let expires = cred["expires_at"].as_u64().unwrap();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(
        (now + 29..=now + 31).contains(&expires),
        "expires in the configured 30 s"
    );
    assert_eq!(cred["ttl_s"], 30);
    let urls: Vec<&str> = cred["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["urls"].as_str().unwrap())
        .collect();
    assert!(
        urls.contains(&format!("turn:127.0.0.1:{}?transport=udp", s.turn.port()).as_str()),
        "{urls:?}"
    );
    assert!(
        urls.contains(&format!("turn:127.0.0.1:{}?transport=tcp", s.turn.port()).as_str()),
        "{urls:?}"
    );
    assert!(
        !urls.iter().any(|u| u.starts_with("turns:")),
        "no TLS listener, no turns: URL"
    );

    // Public mode: no token, 3 a minute per address (one was used above:
    // the limit is per address, whichever page asks).
    let mut codes = Vec::new();
    for _ in 0..4 {
        codes.push(post(s.public, "/ice/credentials", None).0);
    }
    assert_eq!(
        codes,
        [200, 200, 429, 429],
        "the 4th of the minute from one address waits"
    );
    // The dashboard and the admin API are not on the public listener.
    for path in ["/dashboard", "/api/stats", "/api/sessions", "/ice"] {
        assert_eq!(
            common::http_request(s.public, "GET", path, None).unwrap().0,
            404,
            "{path}"
        );
    }

    // The minted credential is a TURN credential of this server...
    allocate(s.turn, &user, &password).expect("the page's credential allocates");
    // ...until it expires.
    let wait = expires + 1 - SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    std::thread::sleep(Duration::from_secs(wait));
    match allocate(s.turn, &user, &password) {
        Err(ClientError::Error { code: 401, .. }) => {}
        other => panic!("an expired credential is refused with 401, got {other:?}"),
    }
}

#[test]
fn the_pages_are_served_and_their_api_needs_the_token() {
    let s = server();
    for path in [
        "/ice",
        "/dashboard",
        "/assets/ice.js",
        "/assets/dashboard.js",
        "/assets/style.css",
    ] {
        let (code, body) = common::http_request(s.admin, "GET", path, None).unwrap();
        assert_eq!(code, 200, "{path}");
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "{path}: nothing loaded from elsewhere"
        );
    }
    let (_, ice) = common::http_request(s.admin, "GET", "/ice", None).unwrap();
    assert!(ice.contains("data-mode=\"operator\""));
    let (_, public) = common::http_request(s.public, "GET", "/", None).unwrap();
    assert!(public.contains("data-mode=\"public\""));
    assert_eq!(
        common::http_request(s.admin, "GET", "/assets/../Cargo.toml", None)
            .unwrap()
            .0,
        404
    );
    for path in ["/api/stats", "/api/stats/stream"] {
        assert_eq!(
            common::http_request(s.admin, "GET", path, None).unwrap().0,
            401,
            "{path}"
        );
    }
    let (code, body) = common::http_request(s.admin, "GET", "/api/stats", Some(TOKEN)).unwrap();
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["allocations"]["total"], 0);
    assert_eq!(v["node"]["draining"], false);
    assert_eq!(v["node"]["redis"], "off");

    // Every client's first 401 is a challenge, not a failure: two good
    // logins and one wrong password show as challenges and one failure.
    allocate(s.turn, "alice", "wonderland").unwrap();
    allocate(s.turn, "alice", "wonderland").unwrap();
    assert!(allocate(s.turn, "alice", "not-her-password").is_err());
    // Workers publish their counts once a second.
    let end = std::time::Instant::now() + Duration::from_secs(5);
    let errors = loop {
        let (_, body) = common::http_request(s.admin, "GET", "/api/stats", Some(TOKEN)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["errors"]["401 challenge (normal)"].as_u64() == Some(3) || std::time::Instant::now() > end {
            break v["errors"].clone();
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(errors["401 challenge (normal)"], 3, "{errors}");
    assert_eq!(errors["401 failed authentication"], 1, "{errors}");
}

#[test]
fn web_settings_that_cannot_work_are_refused_at_start() {
    for (args, names) in [
        (&["--web-ui"][..], "web-ui"),
        (
            &["--web-listen", "127.0.0.1:0", "--web-credential-ttl", "5"][..],
            "web-credential-ttl",
        ),
        (
            &["--web-listen", "127.0.0.1:0", "--web-credentials-per-minute", "0"][..],
            "web-credentials-per-minute",
        ),
        (
            &[
                "--web-listen",
                "127.0.0.1:0",
                "--web-turn-host",
                "turn.example.org:3478",
            ][..],
            "web-turn-host",
        ),
    ] {
        let out = Command::new(common::turnpike_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--no-tls", "--user", "a:b"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(names), "{args:?}: {err}");
    }
}
