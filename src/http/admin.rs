//! `/v1/admin`: admin sign-in and first-run setup, users, service keys and the audit log
//! (API.md § Admin). Every call but login and setup needs an admin token or a service key —
//! except the service-key calls themselves, which need an admin token — and every write is
//! appended to the audit log.

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::auth::{Admin, AdminUserUpdate, ServiceKey, User};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{AdminCaller, Caller, Client, Json};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(setup))
        .routes(routes!(list_users, create_user))
        .routes(routes!(get_user, update_user, delete_user))
        .routes(routes!(logout_user))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(delete_key))
        .routes(routes!(audit))
}

/// An admin token and nothing else; a service key gets 403. Service keys are for programs,
/// and a program able to mint keys could keep its access after its own key is deleted (a
/// leaked key would mint a spare first), so only people manage keys.
pub struct AdminTokenOnly(pub Caller);

impl FromRequestParts<AppState> for AdminTokenOnly {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match Caller::from_request_parts(parts, state).await? {
            caller @ Caller::Admin(_) => Ok(AdminTokenOnly(caller)),
            Caller::Anonymous => Err(ApiError::Unauthenticated(
                "this call needs an admin token".into(),
            )),
            Caller::ServiceKey { .. } | Caller::System(_) => Err(ApiError::PermissionDenied(
                "service keys cannot manage service keys; this call needs an admin token".into(),
            )),
            Caller::User(_) => Err(ApiError::PermissionDenied(
                "this call needs an admin token".into(),
            )),
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminLogin {
    pub email: String,
    pub password: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AdminSession {
    pub admin: Admin,
    /// An admin token (a JWT), sent as `Authorization: Bearer`.
    pub token: String,
}

/// Sign in as an admin.
#[utoipa::path(post, path = "/login", tag = "admin", request_body = AdminLogin,
    responses((status = 200, body = AdminSession), (status = 400), (status = 429)))]
async fn login(
    State(state): State<AppState>,
    client: Client,
    Json(body): Json<AdminLogin>,
) -> ApiResult<axum::Json<AdminSession>> {
    state.auth_limits.check(client.ip, Some(&body.email))?;
    let (admin, token) = state.auth.admin_login(&body.email, &body.password).await?;
    Ok(axum::Json(AdminSession {
        admin: Admin::from(&admin),
        token,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetupRequest {
    /// The token from the setup link the server logged at start.
    pub token: String,
    pub email: String,
    pub password: String,
}

/// Create the first admin with the one-time token from the logged setup link. A request
/// that fails validation (400) leaves the token usable.
#[utoipa::path(post, path = "/setup", tag = "admin", request_body = SetupRequest,
    responses((status = 200, body = AdminSession), (status = 400), (status = 403), (status = 429)))]
async fn setup(
    State(state): State<AppState>,
    client: Client,
    Json(body): Json<SetupRequest>,
) -> ApiResult<axum::Json<AdminSession>> {
    state.auth_limits.check(client.ip, None)?;
    let (admin, token) = state
        .auth
        .complete_setup(&body.token, &body.email, &body.password)
        .await?;
    state
        .audit
        .record_as(
            crate::auth::Actor {
                kind: "admin",
                id: admin.id.clone(),
            },
            "admin.setup",
            Some(&admin.id),
            json!({"email": admin.email}),
        )
        .await;
    Ok(axum::Json(AdminSession {
        admin: Admin::from(&admin),
        token,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UserListQuery {
    /// Part of an email, or a whole user id.
    pub search: Option<String>,
    pub cursor: Option<String>,
    /// 1 to 1000, default 50.
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct UserList {
    pub users: Vec<User>,
    pub next_cursor: Option<String>,
}

/// List users, newest first.
#[utoipa::path(get, path = "/users", tag = "admin", params(UserListQuery),
    responses((status = 200, body = UserList), (status = 401), (status = 403)))]
async fn list_users(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Query(q): Query<UserListQuery>,
) -> ApiResult<axum::Json<UserList>> {
    let (users, next_cursor) = state
        .auth
        .list_users(
            q.search.as_deref(),
            q.cursor.as_deref(),
            q.limit.unwrap_or(50),
        )
        .await?;
    Ok(axum::Json(UserList {
        users: users.iter().map(User::from).collect(),
        next_cursor,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateUser {
    pub email: String,
    pub password: Option<String>,
    #[serde(default)]
    pub email_verified: bool,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub claims: Option<Value>,
}

/// Create a user.
#[utoipa::path(post, path = "/users", tag = "admin", request_body = CreateUser,
    responses((status = 201, body = User), (status = 400), (status = 409)))]
async fn create_user(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Json(body): Json<CreateUser>,
) -> ApiResult<(StatusCode, axum::Json<User>)> {
    let user = state
        .auth
        .admin_create_user(
            &caller,
            &body.email,
            body.password.as_deref(),
            body.email_verified,
            body.data,
            body.claims,
        )
        .await?;
    state
        .audit
        .record(
            &caller,
            "user.create",
            Some(&user.id),
            json!({"email": user.email}),
        )
        .await;
    Ok((StatusCode::CREATED, axum::Json(User::from(&user))))
}

/// One user.
#[utoipa::path(get, path = "/users/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 200, body = User), (status = 404)))]
async fn get_user(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<axum::Json<User>> {
    Ok(axum::Json(User::from(&state.auth.user(&id).await?)))
}

/// Change a user: `disabled`, `claims`, `password`, `email`, `email_verified`, `data`.
/// Disabling, and setting a password, end every session of the user at once. Only the named
/// fields are written.
#[utoipa::path(patch, path = "/users/{id}", tag = "admin", params(("id" = String, Path)), request_body = AdminUserUpdate,
    responses((status = 200, body = User), (status = 400), (status = 404), (status = 409)))]
async fn update_user(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(id): Path<String>,
    Json(update): Json<AdminUserUpdate>,
) -> ApiResult<axum::Json<User>> {
    let mut changed: Vec<&str> = Vec::new();
    for (field, present) in [
        ("email", update.email.is_some()),
        ("password", update.password.is_some()),
        ("email_verified", update.email_verified.is_some()),
        ("disabled", update.disabled.is_some()),
        ("claims", update.claims.is_some()),
        ("data", update.data.is_some()),
    ] {
        if present {
            changed.push(field);
        }
    }
    let disabled = update.disabled;
    let user = state.auth.admin_update_user(&caller, &id, update).await?;
    state
        .audit
        .record(
            &caller,
            "user.update",
            Some(&id),
            json!({"fields": changed, "disabled": disabled}),
        )
        .await;
    Ok(axum::Json(User::from(&user)))
}

/// Delete a user with all its sessions.
#[utoipa::path(delete, path = "/users/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 204), (status = 404)))]
async fn delete_user(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.auth.delete_user(&id, &caller).await?;
    state
        .audit
        .record(&caller, "user.delete", Some(&id), json!({}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// End all of a user's sessions.
#[utoipa::path(post, path = "/users/{id}/logout", tag = "admin", params(("id" = String, Path)),
    responses((status = 204), (status = 404)))]
async fn logout_user(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.auth.user(&id).await?;
    state.auth.logout(&id, "", true).await?;
    state
        .audit
        .record(&caller, "user.logout", Some(&id), json!({}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<ServiceKey>,
}

/// List service keys (never their secrets). Admin token only: a service key gets 403.
#[utoipa::path(get, path = "/keys", tag = "admin",
    responses((status = 200, body = KeyList), (status = 401), (status = 403)))]
async fn list_keys(
    State(state): State<AppState>,
    _admin: AdminTokenOnly,
) -> ApiResult<axum::Json<KeyList>> {
    Ok(axum::Json(KeyList {
        keys: state.auth.list_service_keys().await?,
    }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
}

/// Create a service key. Its secret (`key`) is in this answer only. Admin token only: a
/// service key gets 403, so a leaked key cannot mint itself a spare.
#[utoipa::path(post, path = "/keys", tag = "admin", request_body = CreateKey,
    responses((status = 201, body = ServiceKey), (status = 400), (status = 401), (status = 403)))]
async fn create_key(
    State(state): State<AppState>,
    AdminTokenOnly(caller): AdminTokenOnly,
    Json(body): Json<CreateKey>,
) -> ApiResult<(StatusCode, axum::Json<ServiceKey>)> {
    let key = state.auth.create_service_key(&body.name).await?;
    state
        .audit
        .record(
            &caller,
            "key.create",
            Some(&key.id),
            json!({"name": key.name}),
        )
        .await;
    Ok((StatusCode::CREATED, axum::Json(key)))
}

/// Delete (revoke) a service key. It stops working at once on every node: keys are checked
/// against the database on each request, never cached. Admin token only: a service key
/// gets 403.
#[utoipa::path(delete, path = "/keys/{id}", tag = "admin", params(("id" = String, Path)),
    responses((status = 204), (status = 401), (status = 403), (status = 404)))]
async fn delete_key(
    State(state): State<AppState>,
    AdminTokenOnly(caller): AdminTokenOnly,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state.auth.delete_service_key(&id).await?;
    state
        .audit
        .record(&caller, "key.delete", Some(&id), json!({}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    pub seq: i64,
    pub time: chrono::DateTime<chrono::Utc>,
    pub actor_type: String,
    pub actor_id: String,
    pub action: String,
    pub target: Option<String>,
    #[schema(value_type = Object)]
    pub details: Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditList {
    pub entries: Vec<AuditEntry>,
    pub next_cursor: Option<String>,
}

/// Who did what, when: every admin write, newest first.
#[utoipa::path(get, path = "/audit", tag = "admin", params(AuditQuery), responses((status = 200, body = AuditList)))]
async fn audit(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Query(q): Query<AuditQuery>,
) -> ApiResult<axum::Json<AuditList>> {
    let before = q
        .cursor
        .as_deref()
        .map(|c| {
            c.parse::<i64>().map_err(|_| {
                ApiError::invalid_with("cursor is not valid", json!({"field": "cursor"}))
            })
        })
        .transpose()?;
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let rows = state.audit.list(before, limit + 1).await?;
    let more = rows.len() > limit as usize;
    let entries: Vec<AuditEntry> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| AuditEntry {
            seq: r.seq,
            time: r.time,
            actor_type: r.actor_type,
            actor_id: r.actor_id,
            action: r.action,
            target: r.target,
            details: r.details,
        })
        .collect();
    let next_cursor = if more {
        entries.last().map(|e| e.seq.to_string())
    } else {
        None
    };
    Ok(axum::Json(AuditList {
        entries,
        next_cursor,
    }))
}
