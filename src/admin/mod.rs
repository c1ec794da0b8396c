//! HTTP admin API and Prometheus endpoint.
//!
//! | route | answer |
//! |---|---|
//! | `GET /metrics` | Prometheus text exposition |
//! | `GET /healthz` | 200 `ok` while the process serves; never asks the upstream |
//! | `GET /readyz` | 200 when the upstream is healthy and the proxy is not paused, else 503 |
//! | `GET /pools` | JSON from [`AdminBackend::pools`] |
//! | `POST /pause`, `POST /resume` | `{"paused": bool}` |
//! | `POST /reload` | `{"reloaded": true}`, or 500 `{"reloaded": false, "error": ...}` |
//!
//! Mutating routes follow [`access::check`]: loopback only, unless a token is configured, in
//! which case every caller needs `Authorization: Bearer <token>`.

pub mod access;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use access::Access;

/// What the admin API needs from the running proxy.
pub trait AdminBackend: Send + Sync + 'static {
    /// Body of `GET /pools`.
    fn pools(&self) -> serde_json::Value;
    /// True when the upstream answered a recent health check.
    fn upstream_ready(&self) -> bool;
    fn paused(&self) -> bool;
    fn pause(&self);
    fn resume(&self);
    /// `POST /reload`: the same as SIGHUP.
    fn reload(&self) -> Result<(), String>;
    /// Brings gauges that are sampled rather than updated in place up to date; called before
    /// every scrape so a scrape never shows a value older than itself.
    fn refresh_gauges(&self) {}
}

#[derive(Debug, Clone, Default)]
pub struct AdminConfig {
    /// Bearer token required on mutating routes, from every caller, when set.
    pub token: Option<String>,
}

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

struct AppState {
    backend: Arc<dyn AdminBackend>,
    metrics: PrometheusHandle,
    token: Option<String>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    backend: Arc<dyn AdminBackend>,
    metrics: PrometheusHandle,
    cfg: AdminConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(AppState {
        backend,
        metrics,
        token: cfg.token.filter(|t| !t.is_empty()),
    });
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/pools", get(pools))
        .route("/pause", post(pause))
        .route("/resume", post(resume))
        .route("/reload", post(reload))
        .fallback(not_found)
        .with_state(state)
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    s.backend.refresh_gauges();
    let body = s.metrics.render();
    ([(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response()
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(s): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if !s.backend.upstream_ready() {
        (StatusCode::SERVICE_UNAVAILABLE, "upstream down\n")
    } else if s.backend.paused() {
        (StatusCode::SERVICE_UNAVAILABLE, "paused\n")
    } else {
        (StatusCode::OK, "ready\n")
    }
}

async fn pools(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(s.backend.pools())
}

async fn pause(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    set_paused(&s, peer, &headers, true)
}

async fn resume(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    set_paused(&s, peer, &headers, false)
}

fn set_paused(s: &AppState, peer: SocketAddr, headers: &HeaderMap, pause: bool) -> Response {
    if let Some(denied) = authorize(s, peer, headers) {
        return denied;
    }
    if pause {
        s.backend.pause();
        tracing::info!(%peer, "paused by admin request");
    } else {
        s.backend.resume();
        tracing::info!(%peer, "resumed by admin request");
    }
    Json(json!({ "paused": s.backend.paused() })).into_response()
}

async fn reload(
    State(s): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    if let Some(denied) = authorize(&s, peer, &headers) {
        return denied;
    }
    // Reloading reads files; keep it off the async workers.
    let backend = s.backend.clone();
    let outcome = match tokio::task::spawn_blocking(move || backend.reload()).await {
        Ok(r) => r,
        Err(e) => Err(format!("reload task failed: {e}")),
    };
    match outcome {
        Ok(()) => {
            tracing::info!(%peer, "configuration reloaded by admin request");
            Json(json!({ "reloaded": true })).into_response()
        }
        Err(error) => {
            tracing::warn!(%peer, %error, "configuration reload failed");
            let body = Json(json!({ "reloaded": false, "error": error }));
            (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
        }
    }
}

/// `None` when the request may proceed, else the refusal to send.
fn authorize(s: &AppState, peer: SocketAddr, headers: &HeaderMap) -> Option<Response> {
    let auth = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    match access::check(peer.ip(), s.token.as_deref(), auth) {
        Access::Allowed => None,
        Access::Unauthorized => {
            tracing::warn!(%peer, "admin request without a valid token refused");
            Some(
                (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    Json(json!({ "error": "a valid bearer token is required" })),
                )
                    .into_response(),
            )
        }
        Access::Forbidden => {
            tracing::warn!(%peer, "admin request from a non-loopback address refused");
            let msg =
                "mutating requests are accepted from loopback only unless a token is configured";
            Some((StatusCode::FORBIDDEN, Json(json!({ "error": msg }))).into_response())
        }
    }
}

async fn not_found() -> (StatusCode, &'static str) {
    (StatusCode::NOT_FOUND, "not found\n")
}
