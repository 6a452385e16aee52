//! Accounts and sessions (API.md § Auth and the account half of § Admin): signup, password
//! and refresh-token grants, anonymous users and their upgrade, logout, the user's own
//! profile and sessions, admins, service keys and the audit log. HTTP lives in `http::auth`
//! and `http::admin`; this module never sees axum types.
//!
//! Refresh tokens are opaque and stored as SHA-256 digests. Each successor token is derived
//! as HMAC(server secret, previous token): presenting an already-rotated token within the
//! grace window (default 10 s) therefore yields the *same* successor, so two tabs refreshing
//! at once stay signed in, while a reuse after the window revokes the whole session.

mod admins;
mod caller;
mod keys;
pub mod limits;
pub mod password;
mod sessions;
pub mod tokens;
mod users;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::Sha256;
use utoipa::ToSchema;

use crate::config::AuthConfig;
use crate::error::{ApiError, ApiResult};
use crate::ids::{digest, new_id, new_secret};
use crate::store::{
    AdminRow, Guarded, RefreshTokenRow, RevokeSessions, Rotation, ServiceKeyRow, SessionRow, Store,
    StoreError, UserCursor, UserGuard, UserPatch, UserRow,
};
pub use caller::{Actor, Caller};
use password::PasswordHasherConfig;
use tokens::TokenService;

/// Refresh tokens are followed at most this many rotations deep inside the grace window.
const MAX_GRACE_CHAIN: usize = 5;
const REFRESH_SECRET_META: &str = "refresh_token_secret";
const SETUP_TOKEN_META: &str = "admin_setup_token";
const SERVICE_KEY_PREFIX: &str = "bsk_";

/// A user as the API shows it (API.md § Auth: `user`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct User {
    pub id: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub is_anonymous: bool,
    #[schema(value_type = Object)]
    pub data: Value,
    #[schema(value_type = Object)]
    pub claims: Value,
    #[schema(value_type = Vec<String>)]
    pub providers: Value,
    pub mfa_enabled: bool,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_sign_in_at: Option<DateTime<Utc>>,
}

impl From<&UserRow> for User {
    fn from(u: &UserRow) -> Self {
        User {
            id: u.id.clone(),
            email: u.email.clone(),
            email_verified: u.email_verified,
            is_anonymous: u.is_anonymous,
            data: u.data.clone(),
            claims: u.claims.clone(),
            providers: u.providers.clone(),
            mfa_enabled: u.mfa_enabled,
            disabled: u.disabled,
            created_at: u.created_at,
            updated_at: u.updated_at,
            last_sign_in_at: u.last_sign_in_at,
        }
    }
}

/// A signed-in session's credentials (API.md § Auth: `session`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: String,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Unix time at which the access token expires.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuthResponse {
    pub user: User,
    pub session: Option<Session>,
}

/// One of the caller's sessions, as `GET /v1/auth/sessions` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SessionInfo {
    pub id: String,
    pub created_at: DateTime<Utc>,
    pub refreshed_at: DateTime<Utc>,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
    /// True for the session the request's token belongs to.
    pub current: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Admin {
    pub id: String,
    pub email: String,
    pub created_at: DateTime<Utc>,
}

impl From<&AdminRow> for Admin {
    fn from(a: &AdminRow) -> Self {
        Admin {
            id: a.id.clone(),
            email: a.email.clone(),
            created_at: a.created_at,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ServiceKey {
    pub id: String,
    pub name: String,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    /// The secret itself: present only in the answer to its creation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl From<&ServiceKeyRow> for ServiceKey {
    fn from(k: &ServiceKeyRow) -> Self {
        ServiceKey {
            id: k.id.clone(),
            name: k.name.clone(),
            prefix: k.prefix.clone(),
            created_at: k.created_at,
            last_used_at: k.last_used_at,
            key: None,
        }
    }
}

/// Where a sign-in came from, kept on the session so users can recognise their devices.
#[derive(Debug, Clone, Default)]
pub struct ClientInfo {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// Changes a user may make to their own account (`PATCH /v1/auth/user`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserUpdate {
    pub email: Option<String>,
    pub password: Option<String>,
    pub current_password: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

/// Changes an admin may make to any account (`PATCH /v1/admin/users/{id}`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminUserUpdate {
    pub email: Option<String>,
    pub password: Option<String>,
    pub email_verified: Option<bool>,
    pub disabled: Option<bool>,
    #[schema(value_type = Option<Object>)]
    pub claims: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
}

pub struct AuthService {
    store: Arc<dyn Store>,
    pub tokens: TokenService,
    passwords: PasswordHasherConfig,
    config: AuthConfig,
    refresh_secret: Vec<u8>,
}

/// Lower-cases and checks an email address: something@something, no spaces, sane length.
pub fn normalize_email(email: &str) -> ApiResult<String> {
    let email = email.trim();
    // Lower-casing shrinks a character to no less than a third of its bytes (the Kelvin
    // sign becomes `k`), so anything longer than 3 × 254 bytes is still too long after it:
    // refused before a copy of a huge string is made.
    let email = if email.len() <= 254 * 3 {
        email.to_lowercase()
    } else {
        String::new()
    };
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if !valid {
        return Err(ApiError::invalid_with(
            "email is not a valid address",
            json!({"field": "email"}),
        ));
    }
    Ok(email)
}

fn account_disabled() -> ApiError {
    ApiError::PermissionDenied("this account is disabled".into())
}

fn check_object(value: &Value, field: &str) -> ApiResult<()> {
    if !value.is_object() {
        return Err(ApiError::invalid_with(
            format!("{field} must be a JSON object"),
            json!({ "field": field }),
        ));
    }
    if value.to_string().contains("\\u0000") {
        return Err(ApiError::invalid_with(
            format!("{field} contains the character U+0000, which cannot be stored"),
            json!({ "field": field }),
        ));
    }
    Ok(())
}

impl AuthService {
    pub async fn new(
        store: Arc<dyn Store>,
        config: AuthConfig,
        issuer: String,
    ) -> anyhow::Result<Self> {
        let tokens = TokenService::new(
            store.clone(),
            issuer,
            std::time::Duration::from_secs(config.access_token_ttl_secs),
            std::time::Duration::from_secs(config.admin_token_ttl_secs),
        )
        .await?;
        let passwords =
            PasswordHasherConfig::new(config.argon2_memory_kib, config.argon2_iterations)?;
        let refresh_secret = store
            .meta_put_if_absent(REFRESH_SECRET_META, &new_secret(64))
            .await?
            .into_bytes();
        Ok(AuthService {
            store,
            tokens,
            passwords,
            config,
            refresh_secret,
        })
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    fn check_password_strength(&self, password: &str) -> ApiResult<()> {
        if password.chars().count() < self.config.password_min_length {
            return Err(ApiError::invalid_with(
                format!(
                    "password must be at least {} characters",
                    self.config.password_min_length
                ),
                json!({"field": "password"}),
            ));
        }
        if password.len() > 1024 {
            return Err(ApiError::invalid_with(
                "password must be at most 1024 bytes",
                json!({"field": "password"}),
            ));
        }
        Ok(())
    }
}
