//! Operations endpoints outside `/v1`: liveness, readiness, Prometheus metrics, and the JWKS
//! that third parties verify access tokens with.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(metrics))
        .routes(routes!(jwks))
}

/// The process is up.
#[utoipa::path(get, path = "/health", tag = "ops", responses((status = 200, body = Object)))]
async fn health() -> axum::Json<Value> {
    axum::Json(json!({"status": "ok"}))
}

/// The database answers; 503 when it does not.
#[utoipa::path(get, path = "/ready", tag = "ops", responses((status = 200, body = Object), (status = 503)))]
async fn ready(State(state): State<AppState>) -> ApiResult<axum::Json<Value>> {
    state
        .store
        .ping()
        .await
        .map_err(|_| ApiError::Unavailable("the database is not reachable".into()))?;
    Ok(axum::Json(
        json!({"status": "ready", "database": state.store.dialect()}),
    ))
}

/// Prometheus text: requests by route and status, latency histograms.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, content_type = "text/plain")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// The public keys that sign access tokens (RFC 7517). Retired keys stay listed until every
/// token they signed has expired.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "ops", responses((status = 200, body = Object)))]
async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=60")],
        axum::Json(state.auth.tokens.jwks()),
    )
}
