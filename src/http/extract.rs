//! Extractors: a JSON body whose every rejection is answered in the error envelope, the
//! [`Caller`] behind the `Authorization` header, and the client's address.

use std::net::{IpAddr, SocketAddr};

use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use axum::http::request::Parts;
use axum::http::StatusCode;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::app::AppState;
use crate::auth::tokens::UserClaims;
pub use crate::auth::Caller;
use crate::auth::ClientInfo;
use crate::error::ApiError;

/// A JSON request body. Unlike axum's, every failure is an [`ApiError`]: a missing or wrong
/// content type is 415, a body over the limit 413, malformed JSON or a wrong type 400 with the
/// line and column.
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| {
                let v = v.trim().to_ascii_lowercase();
                v == "application/json" || (v.starts_with("application/") && v.ends_with("+json"))
            })
            .unwrap_or(false);
        if !is_json {
            return Err(ApiError::UnsupportedMediaType(
                "expected a body with content-type application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(body_rejection)?;
        parse_json(&bytes).map(Json)
    }
}

/// Parses a JSON body into `T`, mapping serde's error into the envelope with its position.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let kind = match e.classify() {
            serde_json::error::Category::Data => "the body does not match the expected shape",
            serde_json::error::Category::Eof => "the body ends too early",
            _ => "the body is not valid JSON",
        };
        ApiError::invalid_with(
            format!("{kind}: {e}"),
            json!({"line": e.line(), "column": e.column()}),
        )
    })
}

pub fn body_rejection(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::PayloadTooLarge("the request body is larger than the limit".into())
    } else {
        ApiError::invalid(format!("could not read the request body: {rejection}"))
    }
}

fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    let Some(value) = parts.headers.get(AUTHORIZATION) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::Unauthenticated("the authorization header is not valid".into()))?;
    let (scheme, token) = value.split_once(' ').ok_or_else(|| {
        ApiError::Unauthenticated("expected `Authorization: Bearer <token>`".into())
    })?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(ApiError::Unauthenticated(
            "expected `Authorization: Bearer <token>`".into(),
        ));
    }
    Ok(Some(token.trim()))
}

/// Who is calling, from `Authorization: Bearer …` (see [`AuthService::resolve`]).
impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        let caller = state.auth.resolve(bearer(parts)?).await?;
        parts.extensions.insert(caller.clone());
        Ok(caller)
    }
}

/// A signed-in user (anonymous users included); anything else is 401.
pub struct AuthUser(pub UserClaims);

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            Caller::User(claims) => Ok(AuthUser(claims)),
            Caller::Anonymous => Err(ApiError::Unauthenticated(
                "this call needs a signed-in user".into(),
            )),
            _ => Err(ApiError::PermissionDenied(
                "this call is for users; admins use /v1/admin".into(),
            )),
        }
    }
}

/// An admin token or a service key; anything else is 401/403.
pub struct AdminCaller(pub Caller);

impl FromRequestParts<AppState> for AdminCaller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let caller = Caller::from_request_parts(parts, state).await?;
        match &caller {
            Caller::Admin(_) | Caller::ServiceKey { .. } | Caller::System(_) => {
                Ok(AdminCaller(caller))
            }
            Caller::Anonymous => Err(ApiError::Unauthenticated(
                "this call needs an admin token or a service key".into(),
            )),
            Caller::User(_) => Err(ApiError::PermissionDenied(
                "this call needs an admin token or a service key".into(),
            )),
        }
    }
}

/// The client's address (the TCP peer) and user agent, for rate limits and session lists.
pub struct Client {
    pub ip: IpAddr,
    pub info: ClientInfo,
}

impl<S: Send + Sync> FromRequestParts<S> for Client {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip())
            .unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let user_agent = parts
            .headers
            .get(USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(256).collect());
        Ok(Client {
            ip,
            info: ClientInfo {
                ip: Some(ip.to_string()),
                user_agent,
            },
        })
    }
}
