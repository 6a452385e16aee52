//! `/v1/auth`: sign-up, the token grants, anonymous sign-in, logout, the caller's own user and
//! sessions (API.md § Auth).

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::auth::{AuthResponse, SessionInfo, User, UserUpdate};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{parse_json, AuthUser, Client, Json};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(signup))
        .routes(routes!(token))
        .routes(routes!(anonymous))
        .routes(routes!(logout))
        .routes(routes!(get_user, update_user, delete_user))
        .routes(routes!(list_sessions))
        .routes(routes!(revoke_session))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignupRequest {
    pub email: String,
    pub password: String,
    /// Public profile data kept on the user.
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// Create an account with email and password; answers with the user and a session.
#[utoipa::path(post, path = "/signup", tag = "auth", request_body = SignupRequest,
    responses((status = 200, body = AuthResponse), (status = 400), (status = 409), (status = 429)))]
async fn signup(
    State(state): State<AppState>,
    client: Client,
    Json(body): Json<SignupRequest>,
) -> ApiResult<axum::Json<AuthResponse>> {
    state.auth_limits.check(client.ip, Some(&body.email))?;
    let response = state
        .auth
        .signup(&body.email, &body.password, body.data, &client.info)
        .await?;
    Ok(axum::Json(response))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GrantQuery {
    /// `password` or `refresh_token`.
    pub grant_type: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PasswordGrant {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshGrant {
    pub refresh_token: String,
}

/// Exchange credentials for a session: `grant_type=password` with `{email, password}`, or
/// `grant_type=refresh_token` with `{refresh_token}` (the old refresh token stops working;
/// presenting a used one after the grace window revokes the session).
#[utoipa::path(post, path = "/token", tag = "auth", params(GrantQuery),
    request_body(content = Object, description = "PasswordGrant or RefreshGrant, by grant_type"),
    responses((status = 200, body = AuthResponse), (status = 400), (status = 401), (status = 429)))]
async fn token(
    State(state): State<AppState>,
    Query(query): Query<GrantQuery>,
    client: Client,
    Json(body): Json<Value>,
) -> ApiResult<axum::Json<AuthResponse>> {
    let body = serde_json::to_vec(&body).map_err(ApiError::internal)?;
    let response = match query.grant_type.as_deref() {
        Some("password") => {
            let grant: PasswordGrant = parse_json(&body)?;
            state.auth_limits.check(client.ip, Some(&grant.email))?;
            state
                .auth
                .sign_in_with_password(&grant.email, &grant.password, &client.info)
                .await?
        }
        Some("refresh_token") => {
            let grant: RefreshGrant = parse_json(&body)?;
            state.auth.refresh(&grant.refresh_token).await?
        }
        Some(other) => {
            return Err(ApiError::invalid_with(
                format!("unsupported grant_type `{other}`"),
                json!({"field": "grant_type", "supported": ["password", "refresh_token"]}),
            ))
        }
        None => {
            return Err(ApiError::invalid_with(
                "grant_type is required",
                json!({"field": "grant_type", "supported": ["password", "refresh_token"]}),
            ))
        }
    };
    Ok(axum::Json(response))
}

/// Sign in as a new anonymous user; upgrade later with `PATCH /v1/auth/user`.
#[utoipa::path(post, path = "/anonymous", tag = "auth",
    responses((status = 200, body = AuthResponse), (status = 403), (status = 429)))]
async fn anonymous(
    State(state): State<AppState>,
    client: Client,
) -> ApiResult<axum::Json<AuthResponse>> {
    state.auth_limits.check(client.ip, None)?;
    Ok(axum::Json(
        state.auth.sign_in_anonymously(&client.info).await?,
    ))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LogoutRequest {
    /// `local` (this session, the default) or `global` (every session of the user).
    pub scope: Option<String>,
}

/// End this session (`local`) or all of the user's sessions (`global`). Refresh tokens stop
/// working at once; access tokens run out at their expiry.
#[utoipa::path(post, path = "/logout", tag = "auth", request_body(content = LogoutRequest, description = "optional"),
    responses((status = 204), (status = 401)))]
async fn logout(
    State(state): State<AppState>,
    AuthUser(claims): AuthUser,
    body: axum::body::Bytes,
) -> ApiResult<StatusCode> {
    let request: LogoutRequest = if body.is_empty() {
        LogoutRequest::default()
    } else {
        parse_json(&body)?
    };
    let global = match request.scope.as_deref() {
        None | Some("local") => false,
        Some("global") => true,
        Some(other) => {
            return Err(ApiError::invalid_with(
                format!("scope must be local or global, not `{other}`"),
                json!({"field": "scope"}),
            ))
        }
    };
    state
        .auth
        .logout(&claims.sub, &claims.session_id, global)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user.
#[utoipa::path(get, path = "/user", tag = "auth", responses((status = 200, body = User), (status = 401)))]
async fn get_user(
    State(state): State<AppState>,
    AuthUser(claims): AuthUser,
) -> ApiResult<axum::Json<User>> {
    let user = state.auth.user(&claims.sub).await?;
    Ok(axum::Json(User::from(&user)))
}

/// Change the signed-in user's email or password (both need `current_password` when the
/// account has a password) or `data`. A new password ends every other session of the user;
/// this one stays. Giving an anonymous user an email and password upgrades the account.
#[utoipa::path(patch, path = "/user", tag = "auth", request_body = UserUpdate,
    responses((status = 200, body = User), (status = 400), (status = 401), (status = 403), (status = 409), (status = 429)))]
async fn update_user(
    State(state): State<AppState>,
    AuthUser(claims): AuthUser,
    client: Client,
    Json(update): Json<UserUpdate>,
) -> ApiResult<axum::Json<User>> {
    // Checking `current_password`, hashing a new one and finding an email taken are what
    // sign-in limits guard against (guessing, argon2 load, account enumeration): the same
    // per-IP and per-account limits apply, the account being the current email, else the
    // one asked for.
    if update.password.is_some() || update.current_password.is_some() || update.email.is_some() {
        let account = claims.email.as_deref().or(update.email.as_deref());
        state.auth_limits.check(client.ip, account)?;
    }
    let user = state
        .auth
        .update_own(&claims.sub, &claims.session_id, update)
        .await?;
    Ok(axum::Json(User::from(&user)))
}

/// Delete the signed-in user's account and all its sessions.
#[utoipa::path(delete, path = "/user", tag = "auth", responses((status = 204), (status = 401)))]
async fn delete_user(
    State(state): State<AppState>,
    AuthUser(claims): AuthUser,
) -> ApiResult<StatusCode> {
    let id = claims.sub.clone();
    state
        .auth
        .delete_user(&id, &crate::auth::Caller::User(claims))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user's live sessions, newest first.
#[utoipa::path(get, path = "/sessions", tag = "auth",
    responses((status = 200, body = Vec<SessionInfo>), (status = 401)))]
async fn list_sessions(
    State(state): State<AppState>,
    AuthUser(claims): AuthUser,
) -> ApiResult<axum::Json<Value>> {
    let sessions = state.auth.sessions(&claims.sub, &claims.session_id).await?;
    Ok(axum::Json(json!({ "sessions": sessions })))
}

/// Revoke one of the signed-in user's sessions.
#[utoipa::path(delete, path = "/sessions/{id}", tag = "auth", params(("id" = String, Path)),
    responses((status = 204), (status = 401), (status = 404)))]
async fn revoke_session(
    State(state): State<AppState>,
    AuthUser(claims): AuthUser,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.auth.revoke_session(&claims.sub, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
