//! Operations endpoints outside `/v1`: liveness, readiness, Prometheus metrics, and the JWKS
//! that third parties verify access tokens with.
//!
//! `/metrics` is not public: route names, error rates and timings help an attacker map the
//! service. On the main listener it takes an admin token, a service key or `metrics.token`;
//! on the dedicated `metrics.listen` listener, `metrics.token` when one is set.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::Caller;

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
    let storage = state.storage.backend();
    storage.ping().await.map_err(|err| {
        tracing::warn!(error = %err, "the storage backend is not reachable");
        ApiError::Unavailable("the storage backend is not reachable".into())
    })?;
    Ok(axum::Json(
        json!({"status": "ready", "database": state.store.dialect(), "storage": storage.kind()}),
    ))
}

/// Prometheus text: requests by route and status, latency histograms. Needs an admin token,
/// a service key or the configured `metrics.token`.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "ops",
    security(("bearer" = [])),
    responses(
        (status = 200, content_type = "text/plain"),
        (status = 401, description = "no credential, or an invalid one"),
        (status = 403, description = "a user token"),
    )
)]
async fn metrics(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let (mut parts, _) = req.into_parts();
    if !presents_metrics_token(&state, &parts.headers) {
        match Caller::from_request_parts(&mut parts, &state).await? {
            Caller::Admin(_) | Caller::ServiceKey { .. } | Caller::System(_) => {}
            Caller::User(_) => {
                return Err(ApiError::PermissionDenied(
                    "/metrics needs an admin token, a service key or the metrics token".into(),
                ))
            }
            Caller::Anonymous => {
                return Err(ApiError::Unauthenticated(
                    "/metrics needs an admin token, a service key or the metrics token".into(),
                ))
            }
        }
    }
    Ok(render_metrics(&state))
}

/// `/metrics` on the `metrics.listen` listener: open, unless `metrics.token` is set.
pub async fn metrics_on_own_listener(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> ApiResult<Response> {
    if state.config.metrics.token.is_some() && !presents_metrics_token(&state, &headers) {
        return Err(ApiError::Unauthenticated(
            "/metrics needs the metrics token".into(),
        ));
    }
    Ok(render_metrics(&state))
}

fn render_metrics(state: &AppState) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Whether the request carries `Authorization: Bearer <metrics.token>`. The digests are
/// compared, so the time taken says nothing about how much of the token was right.
fn presents_metrics_token(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    let Some(expected) = &state.config.metrics.token else {
        return false;
    };
    let Some(presented) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
    else {
        return false;
    };
    Sha256::digest(presented.as_bytes()) == Sha256::digest(expected.expose().as_bytes())
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
