//! The browser pages: the ICE test page and the operator's live dashboard.
//!
//! - Operator mode (`--web-ui`, on the admin listener): `/ice` and
//!   `/dashboard`; their API calls carry the admin token.
//! - Public mode (`--web-listen`): only the ICE page, at `/`, for end users;
//!   no token.
//!
//! The ICE page never sees a secret: it asks the server for a TURN REST
//! credential (`expiry:name`, HMAC of a secret this process made at start,
//! so the credential works on this node only) that expires after
//! `--web-credential-ttl`, at most `--web-credentials-per-minute` per IP.
//! The assets are embedded in the binary: no CDN, no build step.

mod limiter;
pub mod stats;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::WebSettings;
pub use limiter::PerIpLimiter;

/// Credentials minted, by outcome, for `turnpike_web_credentials_total`.
pub static ISSUED: AtomicU64 = AtomicU64::new(0);
/// Refused: the IP asked more than `--web-credentials-per-minute`.
pub static RATE_LIMITED: AtomicU64 = AtomicU64::new(0);
/// Refused: operator mode without the admin token.
pub static UNAUTHORIZED: AtomicU64 = AtomicU64::new(0);

/// The embedded assets: (path, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("assets/style.css"),
    ),
    (
        "ice.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/ice.js"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/dashboard.js"),
    ),
];
const ICE_HTML: &str = include_str!("assets/ice.html");
const DASHBOARD_HTML: &str = include_str!("assets/dashboard.html");

/// Which page set a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// On the admin listener, behind the admin token.
    Operator,
    /// On `--web-listen`, for anyone.
    Public,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Operator => "operator",
            Mode::Public => "public",
        }
    }
}

/// The TURN ports the ICE page tests.
#[derive(Debug, Clone, Copy, Default)]
pub struct IcePorts {
    /// UDP and TCP (the first `listen` address).
    pub plain: Option<u16>,
    /// TLS (the first `tls-listen` address).
    pub tls: Option<u16>,
    /// DTLS (the first DTLS listener): reported, not tested, since a
    /// browser's WebRTC has no TURN-over-DTLS transport.
    pub dtls: Option<u16>,
}

/// What the pages need from the server: the credential minter and the
/// addresses to test.
pub struct Web {
    secret: [u8; 32],
    ttl: Duration,
    turn_host: Option<String>,
    ports: IcePorts,
    realm: String,
    redact: bool,
    limiter: Mutex<PerIpLimiter>,
    /// `turnpike started`'s fast-path line, for the dashboard.
    pub fast_path: String,
    started: std::time::Instant,
}

impl Web {
    /// The minter for `settings`, with the secret it adds to the
    /// credentials (see [`crate::credentials::CredentialStores::set_web_secret`]).
    pub fn new(settings: &WebSettings, secret: [u8; 32], ports: IcePorts, realm: &str, redact: bool) -> Web {
        Web {
            secret,
            ttl: settings.credential_ttl,
            turn_host: settings.turn_host.clone(),
            ports,
            realm: realm.to_owned(),
            redact,
            limiter: Mutex::new(PerIpLimiter::new(settings.per_minute, Duration::from_secs(60))),
            fast_path: String::new(),
            started: std::time::Instant::now(),
        }
    }

    /// Seconds since the pages started (about the server's uptime).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// A fresh credential and the ICE servers to use it with, as JSON;
    /// `host` is the host the page was loaded from.
    fn mint(&self, host: &str, mode: Mode) -> serde_json::Value {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let expires = now.as_secs() + self.ttl.as_secs();
        // A name of its own per credential: visitors never share a
        // --user-quota, and the session list tells page tests apart.
        let tag: u32 = rand::random();
        let username = format!("{expires}:web-{}-{tag:08x}", mode.as_str());
        let credential = turn_core::auth::rest_password(&self.secret, &username);
        let host = self.turn_host.as_deref().unwrap_or(host);
        let mut servers = Vec::new();
        if let Some(p) = self.ports.plain {
            servers.push(json!({"transport": "stun", "urls": format!("stun:{host}:{p}")}));
            servers.push(json!({"transport": "udp", "urls": format!("turn:{host}:{p}?transport=udp")}));
            servers.push(json!({"transport": "tcp", "urls": format!("turn:{host}:{p}?transport=tcp")}));
        }
        if let Some(p) = self.ports.tls {
            servers.push(json!({"transport": "tls", "urls": format!("turns:{host}:{p}?transport=tcp")}));
        }
        // RFC 7350: offered to native clients; browsers cannot use it.
        let elsewhere: Vec<serde_json::Value> = self
            .ports
            .dtls
            .map(|p| {
                json!({
                    "transport": "dtls",
                    "where": format!("{host}:{p}/udp"),
                    "why": "TURN over DTLS (RFC 7350) serves native clients (SIP phones, coturn's turnutils_uclient -S, turnpike probe --transport dtls); a browser's WebRTC has no DTLS transport for TURN, so this page cannot test it",
                })
            })
            .into_iter()
            .collect();
        ISSUED.fetch_add(1, Ordering::Relaxed);
        json!({
            "username": username,
            "credential": credential,
            "ttl_s": self.ttl.as_secs(),
            "expires_at": expires,
            "realm": self.realm,
            "servers": servers,
            "not_for_browsers": elsewhere,
        })
    }

    /// `POST` on the credential endpoint: the token (operator mode) and
    /// the per-IP limit are checked, in that order, and every refusal is
    /// logged with its reason.
    pub fn credentials(
        &self,
        mode: Mode,
        caller: SocketAddr,
        headers: &HeaderMap,
        token_ok: bool,
    ) -> Response {
        let ip = caller.ip();
        let shown = if self.redact {
            "[redacted]".to_owned()
        } else {
            ip.to_string()
        };
        if mode == Mode::Operator && !token_ok {
            UNAUTHORIZED.fetch_add(1, Ordering::Relaxed);
            tracing::info!(caller = %shown, "web: ICE credential refused: no valid admin token");
            return (
                StatusCode::UNAUTHORIZED,
                [("www-authenticate", "Bearer")],
                "bearer token required\n",
            )
                .into_response();
        }
        let allowed = self
            .limiter
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(canonical(ip));
        if let Err(retry) = allowed {
            RATE_LIMITED.fetch_add(1, Ordering::Relaxed);
            tracing::info!(caller = %shown, retry_after_s = retry.as_secs(), "web: ICE credential refused: rate limit (web-credentials-per-minute)");
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", retry.as_secs().max(1).to_string())],
                "too many credentials asked from this address; try again later\n",
            )
                .into_response();
        }
        let Some(host) = request_host(headers) else {
            return (
                StatusCode::BAD_REQUEST,
                "a Host header naming this server is required\n",
            )
                .into_response();
        };
        let body = self.mint(&host, mode);
        tracing::info!(caller = %shown, mode = mode.as_str(), ttl_s = self.ttl.as_secs(), "web: ICE credential issued");
        (
            StatusCode::OK,
            [
                ("content-type", "application/json"),
                ("cache-control", "no-store"),
            ],
            body.to_string(),
        )
            .into_response()
    }
}

/// An IPv4-mapped IPv6 caller counts as its IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// The host part of the request's `Host` header (brackets kept for IPv6),
/// when it is a plain host name or address.
fn request_host(headers: &HeaderMap) -> Option<String> {
    let h = headers.get("host")?.to_str().ok()?.trim();
    let host = if let Some(rest) = h.strip_prefix('[') {
        let end = rest.find(']')?;
        rest[..end].parse::<std::net::Ipv6Addr>().ok()?;
        &h[..end + 2]
    } else {
        h.split(':').next()?
    };
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-[]:".contains(c));
    ok.then(|| host.to_owned())
}

/// The HTML of the ICE page for `mode` (the page reads its mode from the
/// body's `data-mode`).
pub fn ice_page(mode: Mode) -> Response {
    html(ICE_HTML.replace("{{mode}}", mode.as_str()))
}

/// The dashboard's HTML.
pub fn dashboard_page() -> Response {
    html(DASHBOARD_HTML.to_owned())
}

fn html(body: String) -> Response {
    (
        StatusCode::OK,
        [
            ("content-type", "text/html; charset=utf-8"),
            // Everything is served from here; nothing else may load.
            (
                "content-security-policy",
                "default-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            ("x-content-type-options", "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// An embedded asset by file name.
pub fn asset(name: &str) -> Response {
    match ASSETS.iter().find(|(n, ..)| *n == name) {
        Some((_, kind, body)) => (
            StatusCode::OK,
            [("content-type", *kind), ("x-content-type-options", "nosniff")],
            *body,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The public ICE page's router (`--web-listen`).
pub fn public_router(web: Arc<Web>) -> axum::Router {
    use axum::extract::{ConnectInfo, Path, State};
    use axum::routing::{get, post};
    axum::Router::new()
        .route("/", get(|| async { ice_page(Mode::Public) }))
        .route("/assets/:name", get(|Path(name): Path<String>| async move { asset(&name) }))
        .route(
            "/ice/credentials",
            post(
                |State(web): State<Arc<Web>>, ConnectInfo(caller): ConnectInfo<SocketAddr>, h: HeaderMap| async move {
                    web.credentials(Mode::Public, caller, &h, true)
                },
            ),
        )
        .with_state(web)
}

/// Serves the public ICE page on `listener` (bound by the runtime at
/// start, so the peer policy refuses it); returns the bound address.
pub fn serve_public(listener: std::net::TcpListener, web: Arc<Web>) -> anyhow::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    crate::http::spawn("web", listener, public_router(web))?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_gives_the_page_host() {
        let mut h = HeaderMap::new();
        for (given, want) in [
            ("turn.example.org:9642", Some("turn.example.org")),
            ("127.0.0.1", Some("127.0.0.1")),
            ("[::1]:8080", Some("[::1]")),
            ("[::1", None),
            ("evil\"host", None),
            ("", None),
        ] {
            h.insert("host", given.parse().unwrap());
            assert_eq!(request_host(&h).as_deref(), want, "{given}");
        }
    }

    #[test]
    fn a_minted_credential_is_a_rest_credential_of_the_secret() {
        let s = WebSettings {
            ui: true,
            public: None,
            credential_ttl: Duration::from_secs(120),
            per_minute: 2,
            turn_host: None,
        };
        let web = Web::new(
            &s,
            [7; 32],
            IcePorts {
                plain: Some(3478),
                tls: Some(5349),
                dtls: Some(5349),
            },
            "r",
            false,
        );
        let v = web.mint("turn.example.org", Mode::Public);
        let user = v["username"].as_str().unwrap();
        let (expiry, name) = user.split_once(':').unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let expiry: u64 = expiry.parse().unwrap();
        assert!((now + 119..=now + 121).contains(&expiry));
        assert!(name.starts_with("web-public-"));
        assert_eq!(v["credential"], turn_core::auth::rest_password(&[7; 32], user));
        let urls: Vec<&str> = v["servers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["urls"].as_str().unwrap())
            .collect();
        assert_eq!(
            urls,
            [
                "stun:turn.example.org:3478",
                "turn:turn.example.org:3478?transport=udp",
                "turn:turn.example.org:3478?transport=tcp",
                "turns:turn.example.org:5349?transport=tcp"
            ]
        );
        // DTLS is reported beside them, for native clients.
        assert_eq!(v["not_for_browsers"][0]["transport"], "dtls");
        assert_eq!(v["not_for_browsers"][0]["where"], "turn.example.org:5349/udp");
    }
}
