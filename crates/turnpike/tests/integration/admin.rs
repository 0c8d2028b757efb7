//! The admin API over real HTTP: auth (no token / wrong token → 401),
//! listing and deleting sessions (a deleted session stops relaying),
//! deleting a user's sessions, drain on and off, redacted config.

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use turnpike_client::client::{ClientError, ClientTransport};

const TOKEN: &str = "test-admin-token-0123456789";

fn http(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    (code, resp.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn admin_api() {
    let h = start(&["--allow-loopback-peers"]);
    let settings_json = serde_json::json!({"realm": "test.example", "admin-token": "[redacted]"});
    let admin = turnpike::admin::serve(
        turnpike::http::bind("admin-listen", "127.0.0.1:0".parse().unwrap()).unwrap(),
        TOKEN.into(),
        h.control(),
        settings_json,
        None,
        None,
        None,
    )
    .unwrap();

    assert_eq!(http(admin, "GET", "/healthz", None).0, 200);
    assert_eq!(http(admin, "GET", "/readyz", None).0, 200);
    assert_eq!(http(admin, "GET", "/api/sessions", None).0, 401, "no token");
    assert_eq!(
        http(admin, "GET", "/api/sessions", Some("wrong-token-wrong-token")).0,
        401,
        "wrong token"
    );

    let mut c = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    let a = c.allocate().unwrap();
    let peer = peer();
    peer.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    c.channel_bind(0x4000, peer.local_addr().unwrap()).unwrap();
    c.send_channel(0x4000, b"before").unwrap();
    let mut buf = [0u8; 64];
    let n = peer.recv_from(&mut buf).unwrap().0;
    assert_eq!(&buf[..n], b"before");

    let (code, body) = http(admin, "GET", "/api/sessions", Some(TOKEN));
    assert_eq!(code, 200);
    let v = json(&body);
    let list = v["sessions"].as_array().unwrap();
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["user"], USER);
    assert_eq!(list[0]["transport"], "udp");
    assert_eq!(list[0]["relayed"], a.relayed.to_string());
    assert_eq!(list[0]["channels"], 1);
    assert_eq!(list[0]["to_peer"]["packets"], 1);
    let (_, body) = http(admin, "GET", "/api/sessions?user=nobody", Some(TOKEN));
    assert_eq!(json(&body)["sessions"].as_array().unwrap().len(), 0);

    // Deleting the session stops its relay.
    let (code, body) = http(
        admin,
        "DELETE",
        &format!("/api/sessions/{}", a.relayed),
        Some(TOKEN),
    );
    assert_eq!((code, json(&body)["deleted"].as_u64()), (200, Some(1)));
    c.send_channel(0x4000, b"after").unwrap();
    assert!(
        peer.recv_from(&mut buf).is_err(),
        "a deleted session relays nothing"
    );
    assert!(matches!(
        c.refresh(600),
        Err(ClientError::Error { code: 437, .. })
    ));
    assert_eq!(
        http(
            admin,
            "DELETE",
            &format!("/api/sessions/{}", a.relayed),
            Some(TOKEN)
        )
        .0,
        404
    );

    // All of a user's sessions.
    for _ in 0..2 {
        client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD)
            .allocate()
            .unwrap();
    }
    let (_, body) = http(
        admin,
        "DELETE",
        &format!("/api/users/{USER}/sessions"),
        Some(TOKEN),
    );
    assert_eq!(json(&body)["deleted"], 2);

    // Drain on and off.
    assert_eq!(http(admin, "POST", "/api/drain", Some(TOKEN)).0, 200);
    assert_eq!(http(admin, "GET", "/readyz", None).0, 503);
    let mut late = client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD);
    assert!(matches!(
        late.allocate(),
        Err(ClientError::Error { code: 508, .. })
    ));
    assert_eq!(http(admin, "DELETE", "/api/drain", Some(TOKEN)).0, 200);
    assert_eq!(http(admin, "GET", "/readyz", None).0, 200);
    client(&ClientTransport::Udp, h.listen[0], USER, PASSWORD)
        .allocate()
        .unwrap();

    let (code, body) = http(admin, "GET", "/api/config", Some(TOKEN));
    assert_eq!(code, 200);
    assert!(!body.contains(PASSWORD) && !body.contains(TOKEN), "{body}");
    h.shutdown();
}

#[test]
fn effective_config_hides_secrets() {
    let args = turnpike::config::Options::from_argv([
        "t",
        "--user",
        "alice:topsecretpw",
        "--auth-secret",
        "restsecret123",
        "--admin-listen",
        "127.0.0.1:0",
        "--admin-token",
        TOKEN,
    ])
    .unwrap();
    let s = turnpike::config::Settings::from_options(&args).unwrap();
    let json = turnpike::admin::effective_config(&s);
    let v = json.to_string();
    for secret in ["topsecretpw", "restsecret123", TOKEN] {
        assert!(!v.contains(secret), "{secret} leaked: {v}");
    }
    assert!(v.contains("\"users\":1"));
    assert_eq!(json["user"][0], "alice:[redacted]", "{v}");
    // Every option of `serve --help` is shown, given or not.
    let help = std::process::Command::new(common::turnpike_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout).into_owned();
    for flag in help
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '=', '<', '[']).next().unwrap_or(""))
        // --config names the file itself, not a setting.
        .filter(|f| !f.is_empty() && *f != "help" && *f != "config")
    {
        assert!(json.get(flag).is_some(), "/api/config lacks {flag}: {v}");
    }
    // A Redis URL's password is not shown either.
    let mut with_redis = s.clone();
    with_redis.options.redis_url = Some("redis://:redispw@10.0.0.5:6379/0".into());
    let v = turnpike::admin::effective_config(&with_redis).to_string();
    assert!(
        !v.contains("redispw") && v.contains("redis://:[redacted]@10.0.0.5:6379/0"),
        "{v}"
    );
}
