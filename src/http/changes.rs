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

/// Read as text so that a bad value gets this API's 400 naming the parameter; unknown
/// parameters (a typo such as `limt`) are refused rather than ignored.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    /// Return events after this position. Without it: from the oldest retained event.
    #[param(value_type = Option<i64>)]
    pub after: Option<String>,
    /// At most this many events, 1 to 1000 (default 100).
    #[param(value_type = Option<i64>)]
    pub limit: Option<String>,
    /// A topic and everything below it, by whole segments: `db/posts` (that collection's
    /// events), `db` or `db/` (every collection's), `auth` (accounts').
    pub topic: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChangesPage {
    pub changes: Vec<Event>,
    /// Pass as `after` to continue. Every event up to it has been returned or filtered out,
    /// and no event at or below it will ever appear later.
    pub next_after: i64,
    /// The newest position this node can serve (everything at or below it is final): to
    /// follow only what happens from now on, start with `after=<head>`.
    pub head: i64,
}

fn number(raw: Option<&str>, field: &str) -> ApiResult<Option<i64>> {
    raw.map(|v| {
        v.parse::<i64>().map_err(|_| {
            ApiError::invalid_with(
                format!("{field} must be an integer"),
                json!({"field": field}),
            )
        })
    })
    .transpose()
}

/// Events in commit order after `after`. Positions grow in commit order on every node; a
/// position older than the retained log answers 410 `cursor_expired` (with `details.oldest`
/// and `details.head`), one past the newest 400.
#[utoipa::path(get, path = "/changes", tag = "admin", params(ChangesQuery),
    responses((status = 200, body = ChangesPage), (status = 400), (status = 401), (status = 403),
              (status = 410, description = "`after` is older than the retained change log")))]
async fn list_changes(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Query(q): Query<ChangesQuery>,
) -> ApiResult<axum::Json<ChangesPage>> {
    let after = number(q.after.as_deref(), "after")?;
    if after.is_some_and(|a| a < 0) {
        return Err(ApiError::invalid_with(
            "after is a position, 0 or more",
            json!({"field": "after"}),
        ));
    }
    let limit = number(q.limit.as_deref(), "limit")?.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid_with(
            "limit is 1 to 1000",
            json!({"field": "limit"}),
        ));
    }
    let limit = limit as u32;
    let topic = q.topic.as_deref().filter(|t| !t.is_empty());
    if topic.is_some_and(|t| t.len() > 200) {
        return Err(ApiError::invalid_with(
            "topic is at most 200 bytes",
            json!({"field": "topic"}),
        ));
    }
    // PostgreSQL text cannot hold NUL (it would be a 500 there and an empty page on SQLite),
    // and no topic has control characters.
    if topic.is_some_and(|t| t.chars().any(char::is_control)) {
        return Err(ApiError::invalid_with(
            "topic has a control character",
            json!({"field": "topic"}),
        ));
    }
    // Taken before the read: every event up to it that matches is in this page unless the
    // page is full.
    let head = state.changes.watermark();
    let after = match after {
        Some(after) => {
            // A position no node has handed out yet would silently skip whatever comes
            // before it (a position from another deployment, or from before a restore).
            if after > state.changes.last_position().await? {
                return Err(ApiError::invalid_with(
                    "after is beyond the newest position of this change stream",
                    json!({"field": "after", "head": head}),
                ));
            }
            after
        }
        None => state.changes.oldest_retained().await?,
    };
    let changes = match state.changes.read(after, topic, limit).await {
        Err(crate::changes::ChangesError::Expired { after, first }) => {
            return Err(ApiError::CursorExpired {
                message: format!(
                    "position {after} is older than the retained change log, which starts at \
                     {first}; read your data afresh and follow the stream from `head`"
                ),
                details: json!({"after": after, "oldest": first, "head": head}),
            })
        }
        other => other?,
    };
    let last = changes.last().map_or(after, |e| e.position);
    let next_after = if changes.len() as u32 == limit {
        last
    } else {
        head.max(last).max(after)
    };
    Ok(axum::Json(ChangesPage {
        changes,
        next_after,
        head,
    }))
}
