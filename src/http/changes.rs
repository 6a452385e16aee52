//! `GET /v1/admin/changes`: the change stream read over HTTP (API.md § Change stream), for
//! debugging and for feeding the changes elsewhere. Admin token or service key.

use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::AdminCaller;
use crate::store::Event;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_changes))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChangesQuery {
    /// Return events after this position (default 0: from the oldest retained).
    pub after: Option<i64>,
    /// At most this many events, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// Only events whose topic starts with this, e.g. `db/posts` or `auth/`.
    pub topic: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChangesPage {
    pub changes: Vec<Event>,
    /// Pass as `after` to continue. Every event up to it has been returned or filtered out,
    /// and no event at or below it will ever appear later.
    pub next_after: i64,
}

/// Events in commit order after `after`. Positions grow in commit order on every node; a
/// position older than the retained log answers 410 `cursor_expired`.
#[utoipa::path(get, path = "/changes", tag = "admin", params(ChangesQuery),
    responses((status = 200, body = ChangesPage), (status = 400), (status = 401), (status = 403),
              (status = 410, description = "`after` is older than the retained change log")))]
async fn list_changes(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Query(q): Query<ChangesQuery>,
) -> ApiResult<axum::Json<ChangesPage>> {
    let after = q.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid_with(
            "after is a position, 0 or more",
            json!({"field": "after"}),
        ));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid_with(
            "limit is 1 to 1000",
            json!({"field": "limit"}),
        ));
    }
    let topic = q.topic.as_deref().filter(|t| !t.is_empty());
    if topic.is_some_and(|t| t.len() > 200) {
        return Err(ApiError::invalid_with(
            "topic is at most 200 bytes",
            json!({"field": "topic"}),
        ));
    }
    // Taken before the read: every event up to it that matches is in this page unless the
    // page is full.
    let watermark = state.changes.watermark();
    let changes = state.changes.read(after, topic, limit).await?;
    let last = changes.last().map_or(after, |e| e.position);
    let next_after = if changes.len() as u32 == limit {
        last
    } else {
        watermark.max(last).max(after)
    };
    Ok(axum::Json(ChangesPage {
        changes,
        next_after,
    }))
}
