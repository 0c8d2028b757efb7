//! The admin HTTP API (axum, in its own control-plane thread). Every
//! `/api` route needs `Authorization: Bearer TOKEN`; `/healthz` and
//! `/readyz` are open for load balancers.
//!
//! - `GET /healthz`: 200 while the process runs.
//! - `GET /readyz`: 200, or 503 while draining (with the count left).
//! - `GET /api/sessions[?user=U&transport=udp|tcp|tls]`: live allocations.
//! - `DELETE /api/sessions/{relayed}`: delete one (by its relayed address).
//! - `DELETE /api/users/{user}/sessions`: delete all of a user's.
//! - `POST /api/drain`, `DELETE /api/drain`: start or stop draining
//!   (409 when the drain ends in the process stopping: SIGTERM, or what
//!   stayed after a binary upgrade).
//! - `GET /api/fleet[?user=U]`: the fleet's live nodes (with Redis), and
//!   U's allocations on each; `GET /api/fleet/users/{user}/sessions`:
//!   the user's sessions on every node; `DELETE` on it: delete them;
//!   `POST`/`DELETE /api/fleet/nodes/{name}/drain`: start or stop
//!   draining that node (this one or another).
//! - `GET /api/config`: the effective configuration, secrets redacted.
//! - `POST /api/reload`: re-read the configuration, as SIGHUP does.
//!
//! With `--web-ui` (see [`crate::web`]): the pages `/ice` and `/dashboard`
//! (open; everything they show comes from `/api`), and
//! - `POST /api/ice/credentials`: a short-lived TURN credential for the
//!   ICE page;
//! - `GET /api/stats`: the dashboard's numbers; `GET /api/stats/stream`:
//!   the same every second, as server-sent events.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Result;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::runtime::Control;

/// Re-reads the configuration, as SIGHUP does; `Err` says why not.
pub type Reloader = Arc<dyn Fn() -> std::result::Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct App {
    token: Arc<String>,
    stop: Control,
    config: Arc<serde_json::Value>,
    reload: Option<Reloader>,
    web: Option<Arc<crate::web::Web>>,
    /// The fleet this node is in (`--redis-url`).
    fleet: Option<Arc<crate::fleet::FleetClient>>,
}

fn authorized(app: &App, h: &HeaderMap) -> bool {
    let Some(v) = h.get("authorization").and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(t) = v.strip_prefix("Bearer ") else {
        return false;
    };
    t.len() == app.token.len() && bool::from(t.as_bytes().ct_eq(app.token.as_bytes()))
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [("www-authenticate", "Bearer")],
        "bearer token required\n",
    )
        .into_response()
}

fn json_response(code: StatusCode, v: serde_json::Value) -> Response {
    (code, [("content-type", "application/json")], v.to_string()).into_response()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn sessions(State(app): State<App>, h: HeaderMap, uri: Uri) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    let mut user = None;
    let mut transport = None;
    for kv in uri.query().unwrap_or("").split('&').filter(|s| !s.is_empty()) {
        match kv.split_once('=') {
            Some(("user", v)) => user = Some(v.to_owned()),
            Some(("transport", v)) => transport = Some(v.to_owned()),
            _ => {
                return json_response(
                    StatusCode::BAD_REQUEST,
                    json!({"error": format!("unknown filter {kv:?}")}),
                )
            }
        }
    }
    let stop = app.stop.clone();
    let Some(all) = blocking(move || stop.sessions()).await else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let list: Vec<_> = all
        .iter()
        .filter(|s| user.as_deref().is_none_or(|u| &*s.username == u))
        .filter(|s| {
            transport
                .as_deref()
                .is_none_or(|t| s.tuple.transport.as_str() == t)
        })
        .map(crate::sessions::to_json)
        .collect();
    json_response(StatusCode::OK, json!({"sessions": list}))
}

async fn delete_session(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(relayed): Path<String>,
) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    let Ok(addr) = relayed.parse::<SocketAddr>() else {
        return json_response(
            StatusCode::BAD_REQUEST,
            json!({"error": "expected the relayed IP:PORT"}),
        );
    };
    let stop = app.stop.clone();
    let n = blocking(move || stop.delete_sessions(Arc::new(move |s| s.relayed_all.contains(&addr))))
        .await
        .unwrap_or(0);
    tracing::info!(%caller, relayed = %addr, deleted = n, "admin: session deleted");
    let code = if n == 0 {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    json_response(code, json!({"deleted": n}))
}

async fn delete_user(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    let stop = app.stop.clone();
    let who = user.clone();
    let n = blocking(move || stop.delete_sessions(Arc::new(move |s| *s.username == *who)))
        .await
        .unwrap_or(0);
    tracing::info!(%caller, user = ?user, deleted = n, "admin: a user's sessions deleted");
    json_response(StatusCode::OK, json!({"deleted": n}))
}

/// Runs `f` with the fleet client off the async thread, answering its
/// result as JSON (404 outside a fleet, 503 when Redis fails).
async fn with_fleet(
    app: &App,
    h: &HeaderMap,
    f: impl FnOnce(&crate::fleet::FleetClient) -> Result<serde_json::Value> + Send + 'static,
) -> Response {
    with_fleet_status(app, h, move |fleet| f(fleet).map(|v| (StatusCode::OK, v))).await
}

/// [`with_fleet`] where `f` chooses the status.
async fn with_fleet_status(
    app: &App,
    h: &HeaderMap,
    f: impl FnOnce(&crate::fleet::FleetClient) -> Result<(StatusCode, serde_json::Value)> + Send + 'static,
) -> Response {
    if !authorized(app, h) {
        return unauthorized();
    }
    let Some(fleet) = app.fleet.clone() else {
        return json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "not in a fleet (no redis-url)"}),
        );
    };
    match blocking(move || f(&fleet)).await {
        Some(Ok((code, v))) => json_response(code, v),
        Some(Err(e)) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": format!("{e:#}")}),
        ),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /api/fleet[?user=U]`: every live node of the fleet (from Redis),
/// with U's allocations on each.
async fn fleet_nodes(State(app): State<App>, h: HeaderMap, uri: Uri) -> Response {
    let user = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("user="))
        .map(str::to_owned);
    with_fleet(&app, &h, move |fleet| fleet.nodes(user.as_deref())).await
}

/// `GET /api/fleet/users/{user}/sessions`: the user's sessions on every
/// live node, as each node lists them (nodes that do not answer within
/// the wait are named).
async fn fleet_user_sessions(State(app): State<App>, h: HeaderMap, Path(user): Path<String>) -> Response {
    with_fleet(&app, &h, move |fleet| fleet.user_sessions(&user)).await
}

/// `DELETE /api/fleet/users/{user}/sessions`: on every node.
async fn fleet_delete_user(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
    Path(user): Path<String>,
) -> Response {
    with_fleet(&app, &h, move |fleet| {
        let n = fleet.delete_user(&user)?;
        tracing::info!(%caller, user = ?user, nodes = n, "admin: a user's sessions deleted across the fleet");
        Ok(json!({"nodes_asked": n}))
    })
    .await
}

/// `POST` or `DELETE /api/fleet/nodes/{name}/drain`: drain on or off on
/// any node of the fleet, told through Redis (this node directly), and
/// answered once its registry entry says so (`confirmed`), or after 3 s.
async fn fleet_drain(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
    method: axum::http::Method,
    Path(node): Path<String>,
) -> Response {
    let on = method != axum::http::Method::DELETE;
    let here = app.fleet.as_ref().is_some_and(|f| f.name() == node);
    if here && authorized(&app, &h) {
        if on {
            app.stop.drain();
        } else if !app.stop.undrain() {
            return stopping();
        }
        tracing::info!(%caller, node, draining = on, "admin: drain set from the fleet view");
        return json_response(
            StatusCode::OK,
            json!({"node": node, "draining": on, "confirmed": true}),
        );
    }
    with_fleet_status(&app, &h, move |fleet| {
        let confirmed = fleet.drain(&node, on)?;
        tracing::info!(%caller, node, draining = on, ?confirmed, "admin: drain asked of a fleet node");
        Ok(match confirmed {
            None => (
                StatusCode::NOT_FOUND,
                json!({"node": node, "error": "no live node has this name"}),
            ),
            Some(c) => (
                StatusCode::OK,
                json!({"node": node, "draining": on, "confirmed": c}),
            ),
        })
    })
    .await
}

/// 409: a drain that ends in the process stopping cannot be undone.
fn stopping() -> Response {
    json_response(
        StatusCode::CONFLICT,
        json!({"draining": true, "error": "this process is draining to stop (SIGTERM, or it was replaced by a binary upgrade); the drain cannot be undone"}),
    )
}

async fn drain(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
    method: axum::http::Method,
) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    if method == axum::http::Method::DELETE {
        if !app.stop.undrain() {
            return stopping();
        }
        tracing::info!(%caller, "admin: drain off");
    } else {
        app.stop.drain();
        tracing::info!(%caller, allocations = app.stop.allocations(), "admin: drain on");
    }
    json_response(
        StatusCode::OK,
        json!({"draining": app.stop.is_draining(), "allocations": app.stop.allocations()}),
    )
}

async fn reload_handler(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    let Some(r) = app.reload.clone() else {
        return json_response(
            StatusCode::NOT_IMPLEMENTED,
            json!({"error": "reload is not available"}),
        );
    };
    tracing::info!(%caller, "admin: reload requested");
    match blocking(move || r()).await {
        Some(Ok(())) => json_response(StatusCode::OK, json!({"reloaded": true})),
        Some(Err(e)) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"reloaded": false, "error": e}),
        ),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `POST /api/upgrade`: a binary upgrade as SIGUSR2 does, answered with
/// its outcome (200 with the new process's pid and what moved; 409 with
/// why not, this process serving on).
async fn upgrade_handler(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    tracing::info!(%caller, "admin: upgrade requested");
    match blocking(|| crate::upgrade::request_and_wait(std::time::Duration::from_secs(75))).await {
        Some(Ok(v)) => json_response(StatusCode::OK, v),
        Some(Err(e)) => json_response(StatusCode::CONFLICT, json!({"upgraded": false, "error": e})),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn show_config(State(app): State<App>, h: HeaderMap) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    json_response(StatusCode::OK, (*app.config).clone())
}

async fn readyz(State(app): State<App>) -> Response {
    if app.stop.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("draining: {} allocations left\n", app.stop.allocations()),
        )
            .into_response()
    } else if crate::metrics::REDIS_UP.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        // Still ready: calls and new allocations go on without Redis.
        (
            StatusCode::OK,
            "ready; redis unreachable: cached credentials, local quotas and guard\n",
        )
            .into_response()
    } else if crate::metrics::SQL_UP.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        // Still ready: the users read before serve on.
        (
            StatusCode::OK,
            "ready; user database (db-url) unreachable: cached credentials\n",
        )
            .into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

/// The effective configuration as JSON, without secrets.
/// Every option (file and command line merged, declared defaults filled
/// in; `null` or `[]`: a default the host decides, resolved below), with
/// passwords, secrets, the admin token and a Redis password redacted, and
/// over it the effective values of the main settings (addresses resolved).
pub fn effective_config(s: &crate::config::Settings) -> serde_json::Value {
    let mut shown = s.options.clone();
    shown.auth_secret = shown
        .auth_secret
        .iter()
        .map(|_| "[redacted]".to_owned())
        .collect();
    shown.admin_token = shown.admin_token.as_ref().map(|_| "[redacted]".to_owned());
    shown.redis_url = shown.redis_url.as_deref().map(redact_url_password);
    shown.db_url = shown.db_url.as_deref().map(crate::sqldb::redacted);
    let mut all = serde_json::to_value(&shown).unwrap_or_else(|_| json!({}));
    all["user"] = json!(shown
        .user
        .iter()
        .map(|u| format!("{}:[redacted]", u.name))
        .collect::<Vec<_>>());
    if let (Some(all), serde_json::Value::Object(main)) = (all.as_object_mut(), main_settings(s)) {
        all.extend(main);
    }
    all
}

/// `redis://user:PASSWORD@host` with the password replaced.
fn redact_url_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:[redacted]{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// The main settings as they are in force.
fn main_settings(s: &crate::config::Settings) -> serde_json::Value {
    json!({
        "listen": s.listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "tls-listen": s.tls_listen.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        "realm": s.realm,
        "users": s.credentials.user_count(),
        "auth-secrets": s.credentials.secret_count(),
        "passwords-and-secrets": "[redacted]",
        "relay-ip": [s.relay_v4.map(|i| i.to_string()), s.relay_v6.map(|i| i.to_string())],
        "external-ip": [s.external_v4.map(|i| i.to_string()), s.external_v6.map(|i| i.to_string())],
        "min-port": s.options.min_port,
        "max-port": s.options.max_port,
        "allow-loopback-peers": s.options.allow_loopback_peers,
        "allow-peer": s.options.allow_peer.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "deny-peer": s.options.deny_peer.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "threads": s.threads,
        "user-quota": s.options.user_quota,
        "total-quota": s.options.total_quota,
        "max-bps": s.options.max_bps,
        "user-max-bps": s.options.user_max_bps,
        "max-allocation-bytes": s.options.max_allocation_bytes,
        "rate-limit-per-ip": s.options.rate_limit_per_ip,
        "auth-fail-limit": s.options.auth_fail_limit,
        "drain-timeout": s.options.drain_timeout.as_secs(),
        "rfc5780": s.rfc5780.is_some(),
        "metrics-listen": s.options.metrics_listen.map(|a| a.to_string()),
        "admin-token": "[redacted]",
    })
}

/// `POST /api/ice/credentials`: the ICE page's credential (operator mode).
async fn ice_credentials(
    State(app): State<App>,
    axum::extract::ConnectInfo(caller): axum::extract::ConnectInfo<SocketAddr>,
    h: HeaderMap,
) -> Response {
    let Some(web) = &app.web else {
        return StatusCode::NOT_FOUND.into_response();
    };
    web.credentials(crate::web::Mode::Operator, caller, &h, authorized(&app, &h))
}

/// `GET /api/stats`: one snapshot of the dashboard's numbers.
async fn stats(State(app): State<App>, h: HeaderMap) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    let Some(web) = app.web.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let stop = app.stop.clone();
    match blocking(move || crate::web::stats::snapshot(&stop, &web, None).0).await {
        Some(v) => json_response(StatusCode::OK, v),
        None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// `GET /api/stats/stream`: a snapshot a second, as server-sent events.
async fn stats_stream(State(app): State<App>, h: HeaderMap) -> Response {
    if !authorized(&app, &h) {
        return unauthorized();
    }
    let Some(web) = app.web.clone() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let events = crate::web::stats::stream(app.stop.clone(), web, std::time::Duration::from_secs(1));
    (
        StatusCode::OK,
        [
            ("content-type", "text/event-stream"),
            ("cache-control", "no-store"),
        ],
        axum::body::Body::from_stream(events),
    )
        .into_response()
}

/// Serves the admin API on `listener` (from [`crate::http::bind`]; the
/// runtime binds it at start so the peer policy refuses it) and, given
/// `web`, the operator's pages; returns the bound address.
pub fn serve(
    listener: std::net::TcpListener,
    token: String,
    stop: Control,
    config: serde_json::Value,
    reload: Option<Reloader>,
    web: Option<Arc<crate::web::Web>>,
    fleet: Option<Arc<crate::fleet::FleetClient>>,
) -> Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let pages = web.is_some();
    let app = App {
        token: Arc::new(token),
        stop,
        config: Arc::new(config),
        reload,
        web,
        fleet,
    };
    let mut router = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/sessions", get(sessions))
        .route("/api/sessions/:relayed", delete(delete_session))
        .route("/api/users/:user/sessions", delete(delete_user))
        .route("/api/drain", post(drain).delete(drain))
        .route("/api/fleet", get(fleet_nodes))
        .route(
            "/api/fleet/users/:user/sessions",
            get(fleet_user_sessions).delete(fleet_delete_user),
        )
        .route(
            "/api/fleet/nodes/:name/drain",
            post(fleet_drain).delete(fleet_drain),
        )
        .route("/api/config", get(show_config))
        .route("/api/reload", post(reload_handler))
        .route("/api/upgrade", post(upgrade_handler));
    if pages {
        router = router
            .route(
                "/ice",
                get(|| async { crate::web::ice_page(crate::web::Mode::Operator) }),
            )
            .route("/dashboard", get(|| async { crate::web::dashboard_page() }))
            .route(
                "/assets/:name",
                get(|Path(name): Path<String>| async move { crate::web::asset(&name) }),
            )
            .route("/api/ice/credentials", post(ice_credentials))
            .route("/api/stats", get(stats))
            .route("/api/stats/stream", get(stats_stream));
    }
    crate::http::spawn("admin", listener, router.with_state(app))?;
    Ok(bound)
}
