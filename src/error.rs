//! The one error type every handler returns, and the JSON envelope it renders to.
//!
//! Every error answer has the shape of API.md § Conventions:
//! `{"error": {"code", "message", "details"?, "request_id"}}`. The statuses are mapped in
//! exactly one `match` ([`ApiError::status`]); database and unexpected errors are logged with
//! their detail and answered as an opaque 500 so no SQL text or stack trace ever leaves.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use crate::store::StoreError;

tokio::task_local! {
    /// The request id of the request being served, set by the request-id middleware so that
    /// error bodies can carry it without every handler passing it around.
    pub static REQUEST_ID: String;
}

/// The request id of the current request, or an empty string outside a request.
pub fn current_request_id() -> String {
    REQUEST_ID.try_with(|id| id.clone()).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidArgument {
        message: String,
        details: Option<Value>,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("too many requests, retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("{0}")]
    Unavailable(String),
    /// A position older than the retained change log (410 `cursor_expired`); `details` says
    /// where the retained log starts.
    #[error("{message}")]
    CursorExpired { message: String, details: Value },
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidArgument {
            message: message.into(),
            details: None,
        }
    }

    pub fn invalid_with(message: impl Into<String>, details: Value) -> Self {
        ApiError::InvalidArgument {
            message: message.into(),
            details: Some(details),
        }
    }

    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        ApiError::Internal(err.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::InvalidArgument { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            ApiError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists(_) | ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::FailedPrecondition(_) => StatusCode::PRECONDITION_FAILED,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::CursorExpired { .. } => StatusCode::GONE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument { .. } => "invalid_argument",
            ApiError::Unauthenticated(_) => "unauthenticated",
            ApiError::PermissionDenied(_) => "permission_denied",
            ApiError::NotFound(_) => "not_found",
            ApiError::AlreadyExists(_) => "already_exists",
            ApiError::Conflict(_) => "conflict",
            ApiError::FailedPrecondition(_) => "failed_precondition",
            ApiError::PayloadTooLarge(_) => "payload_too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::RateLimited { .. } => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::CursorExpired { .. } => "cursor_expired",
            ApiError::Internal(_) => "internal",
        }
    }
}

/// Builds the envelope for any status: used for [`ApiError`] and for answers produced outside
/// handlers (router fallbacks, 405s, body-limit rejections) so every error looks the same.
pub fn envelope(
    status: StatusCode,
    code: &str,
    message: &str,
    details: Option<&Value>,
) -> Response {
    let mut error = json!({
        "code": code,
        "message": message,
        "request_id": current_request_id(),
    });
    if let Some(details) = details {
        error["details"] = details.clone();
    }
    (status, axum::Json(json!({ "error": error }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            ApiError::Internal(err) => {
                tracing::error!(error = ?err, "internal error");
            }
            ApiError::Unavailable(msg) => tracing::warn!(%msg, "unavailable"),
            _ => {}
        }
        let details = match &self {
            ApiError::InvalidArgument { details, .. } => details.clone(),
            ApiError::CursorExpired { details, .. } => Some(details.clone()),
            _ => None,
        };
        let mut response = envelope(status, self.code(), &self.to_string(), details.as_ref());
        if let ApiError::RateLimited { retry_after_secs } = self {
            response.headers_mut().insert(
                "retry-after",
                HeaderValue::from_str(&retry_after_secs.max(1).to_string())
                    .expect("digits are a valid header value"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => ApiError::NotFound("not found".into()),
            StoreError::AlreadyExists(what) => ApiError::AlreadyExists(what),
            StoreError::Conflict(what) => ApiError::Conflict(what),
            StoreError::InvalidInput(what) => ApiError::invalid(what),
            StoreError::VersionMismatch { expected, actual } => {
                ApiError::FailedPrecondition(match actual {
                    Some(actual) => format!("version is {actual}, not {expected}"),
                    None => format!("the document does not exist (expected version {expected})"),
                })
            }
            StoreError::Unavailable(err) => {
                tracing::error!(error = ?err, "database unavailable");
                ApiError::Unavailable("the database is unavailable".into())
            }
            StoreError::Internal(err) => ApiError::Internal(err),
            StoreError::Rejected(err) => match err.downcast::<ApiError>() {
                Ok(api) => *api,
                Err(other) => ApiError::Internal(anyhow::anyhow!(other)),
            },
        }
    }
}

impl From<crate::query::QueryError> for ApiError {
    fn from(err: crate::query::QueryError) -> Self {
        ApiError::invalid_with(err.message, serde_json::json!({"field": err.field}))
    }
}

impl From<crate::changes::ChangesError> for ApiError {
    fn from(err: crate::changes::ChangesError) -> Self {
        match err {
            crate::changes::ChangesError::Expired { after, first } => ApiError::CursorExpired {
                message: format!(
                    "position {after} is older than the retained change log, which starts at {first}"
                ),
                details: json!({"after": after, "oldest": first}),
            },
            crate::changes::ChangesError::Store(e) => e.into(),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
