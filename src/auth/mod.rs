//! Accounts and sessions (API.md § Auth and the account half of § Admin): signup, password
//! and refresh-token grants, anonymous users and their upgrade, logout, the user's own
//! profile and sessions, admins, service keys and the audit log. HTTP lives in `http::auth`
//! and `http::admin`; this module never sees axum types.
//!
//! Refresh tokens are opaque and stored as SHA-256 digests. Each successor token is derived
//! as HMAC(server secret, previous token): presenting an already-rotated token within the
//! grace window (default 10 s) therefore yields the *same* successor, so two tabs refreshing
//! at once stay signed in, while a reuse after the window revokes the whole session.

mod caller;
pub mod limits;
pub mod password;
pub mod tokens;

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

    /// The successor of a refresh token: HMAC(secret, token), so a retry inside the grace
    /// window recomputes the same one.
    fn successor(&self, token: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.refresh_secret)
            .expect("HMAC takes any key length");
        mac.update(token.as_bytes());
        format!("r{}", hex::encode(mac.finalize().into_bytes()))
    }

    fn session_response(
        &self,
        user: &UserRow,
        session_id: &str,
        refresh_token: String,
    ) -> ApiResult<AuthResponse> {
        let (access_token, expires_at) = self
            .tokens
            .issue_user_token(user, session_id, Utc::now())
            .map_err(ApiError::internal)?;
        Ok(AuthResponse {
            user: User::from(user),
            session: Some(Session {
                access_token,
                refresh_token,
                token_type: "bearer".into(),
                expires_in: self.config.access_token_ttl_secs,
                expires_at,
            }),
        })
    }

    /// Starts a new session for the user and answers `{user, session}`, or says why the
    /// store refused (see [`AuthStore::start_session`]): the account is disabled, gone, or
    /// no longer has the password hash `verified_hash` that the caller checked.
    ///
    /// [`AuthStore::start_session`]: crate::store::AuthStore::start_session
    async fn start_session(
        &self,
        user_id: &str,
        verified_hash: Option<&str>,
        client: &ClientInfo,
    ) -> ApiResult<Guarded<AuthResponse>> {
        let now = Utc::now();
        let session = SessionRow {
            id: new_id(),
            user_id: user_id.to_string(),
            created_at: now,
            refreshed_at: now,
            user_agent: client.user_agent.clone(),
            ip: client.ip.clone(),
            revoked_at: None,
        };
        let refresh = format!("r{}", new_secret(48));
        let row = RefreshTokenRow {
            token_hash: digest(&refresh),
            session_id: session.id.clone(),
            created_at: now,
            expires_at: now + chrono::Duration::seconds(self.config.refresh_token_ttl_secs as i64),
            rotated_at: None,
        };
        let guard = UserGuard {
            enabled: true,
            password_hash: verified_hash.map(|h| Some(h.to_string())),
        };
        Ok(
            match self.store.start_session(&session, &row, &guard).await? {
                Guarded::Done(user) => {
                    Guarded::Done(self.session_response(&user, &session.id, refresh)?)
                }
                Guarded::Gone => Guarded::Gone,
                Guarded::Disabled => Guarded::Disabled,
                Guarded::PasswordChanged => Guarded::PasswordChanged,
            },
        )
    }

    /// A session for an account this request just created: only an admin acting within the
    /// same instant can refuse it.
    async fn start_new_user_session(
        &self,
        user_id: &str,
        client: &ClientInfo,
    ) -> ApiResult<AuthResponse> {
        match self.start_session(user_id, None, client).await? {
            Guarded::Done(response) => Ok(response),
            Guarded::Disabled => Err(account_disabled()),
            Guarded::Gone | Guarded::PasswordChanged => {
                Err(ApiError::NotFound("user not found".into()))
            }
        }
    }

    pub async fn signup(
        &self,
        email: &str,
        password: &str,
        data: Option<Value>,
        client: &ClientInfo,
    ) -> ApiResult<AuthResponse> {
        if !self.config.signup_enabled {
            return Err(ApiError::PermissionDenied("signups are disabled".into()));
        }
        let email = normalize_email(email)?;
        self.check_password_strength(password)?;
        let data = data.unwrap_or_else(|| json!({}));
        check_object(&data, "data")?;
        let hash = self.passwords.hash(password).await?;
        let now = Utc::now();
        let user = UserRow {
            id: new_id(),
            email: Some(email),
            password_hash: Some(hash),
            email_verified: false,
            is_anonymous: false,
            data,
            claims: json!({}),
            providers: json!(["email"]),
            mfa_enabled: false,
            disabled: false,
            created_at: now,
            updated_at: now,
            last_sign_in_at: Some(now),
        };
        match self
            .store
            .insert_user(
                &user,
                &Actor {
                    kind: "user",
                    id: user.id.clone(),
                },
            )
            .await
        {
            Err(StoreError::AlreadyExists(_)) => {
                return Err(ApiError::AlreadyExists(
                    "a user with this email already exists".into(),
                ))
            }
            other => other?,
        }
        self.start_new_user_session(&user.id, client).await
    }

    /// The `password` grant. A wrong email and a wrong password answer the same, in the same
    /// time; a disabled account answers 403 only once the password is right. The session
    /// starts only if, when it is written, the account is still enabled and still has the
    /// password hash just verified (argon2 takes tens of milliseconds: an admin's disable or
    /// a password change can commit meanwhile).
    pub async fn sign_in_with_password(
        &self,
        email: &str,
        password: &str,
        client: &ClientInfo,
    ) -> ApiResult<AuthResponse> {
        let invalid = || {
            ApiError::invalid_with(
                "invalid email or password",
                json!({"reason": "invalid_credentials"}),
            )
        };
        let email = normalize_email(email).map_err(|_| invalid())?;
        let user = self.store.user_by_email(&email).await?;
        let hash = user.as_ref().and_then(|u| u.password_hash.as_deref());
        if !self.passwords.verify(password, hash).await? {
            return Err(invalid());
        }
        let (Some(user), Some(hash)) = (&user, hash) else {
            return Err(invalid());
        };
        match self.start_session(&user.id, Some(hash), client).await? {
            Guarded::Done(response) => Ok(response),
            Guarded::Disabled => Err(account_disabled()),
            // The password checked is no longer the account's (or the account is gone).
            Guarded::Gone | Guarded::PasswordChanged => Err(invalid()),
        }
    }

    pub async fn sign_in_anonymously(&self, client: &ClientInfo) -> ApiResult<AuthResponse> {
        if !self.config.anonymous_enabled {
            return Err(ApiError::PermissionDenied(
                "anonymous sign-in is disabled".into(),
            ));
        }
        let now = Utc::now();
        let user = UserRow {
            id: new_id(),
            email: None,
            password_hash: None,
            email_verified: false,
            is_anonymous: true,
            data: json!({}),
            claims: json!({}),
            providers: json!(["anonymous"]),
            mfa_enabled: false,
            disabled: false,
            created_at: now,
            updated_at: now,
            last_sign_in_at: Some(now),
        };
        self.store
            .insert_user(
                &user,
                &Actor {
                    kind: "user",
                    id: user.id.clone(),
                },
            )
            .await?;
        self.start_new_user_session(&user.id, client).await
    }

    /// The `refresh_token` grant, with reuse detection (see the module docs). Whether the
    /// user is enabled is decided inside the rotation's transaction, ordered against an
    /// admin's disable (see [`AuthStore::rotate_refresh_token`]).
    ///
    /// [`AuthStore::rotate_refresh_token`]: crate::store::AuthStore::rotate_refresh_token
    pub async fn refresh(&self, refresh_token: &str) -> ApiResult<AuthResponse> {
        let invalid =
            |why: &str| ApiError::Unauthenticated(format!("invalid refresh token: {why}"));
        let now = Utc::now();
        let mut token = refresh_token.to_string();
        for _ in 0..=MAX_GRACE_CHAIN {
            let hash = digest(&token);
            let row = self
                .store
                .refresh_token(&hash)
                .await?
                .ok_or_else(|| invalid("unknown token"))?;
            if row.expires_at <= now {
                return Err(invalid("expired"));
            }
            let next = self.successor(&token);
            let new_row = RefreshTokenRow {
                token_hash: digest(&next),
                session_id: row.session_id.clone(),
                created_at: now,
                expires_at: now
                    + chrono::Duration::seconds(self.config.refresh_token_ttl_secs as i64),
                rotated_at: None,
            };
            match self
                .store
                .rotate_refresh_token(&hash, &new_row, now)
                .await?
            {
                Rotation::Rotated { user } => {
                    return self.session_response(&user, &row.session_id, next)
                }
                Rotation::Unknown => return Err(invalid("the session has ended")),
                Rotation::UserDisabled => return Err(invalid("the account is disabled")),
                Rotation::AlreadyRotated { rotated_at, user } => {
                    let grace =
                        chrono::Duration::seconds(self.config.refresh_reuse_grace_secs as i64);
                    if now - rotated_at > grace {
                        tracing::warn!(session_id = %row.session_id, user_id = %user.id, "refresh token reused; revoking the session");
                        self.store
                            .revoke_session(&user.id, &row.session_id, now)
                            .await?;
                        return Err(invalid("already used; the session was revoked"));
                    }
                    // Inside the window: answer with the successor (following it if it was
                    // itself rotated meanwhile).
                    let successor = self.store.refresh_token(&digest(&next)).await?;
                    match successor {
                        Some(s) if s.rotated_at.is_none() => {
                            return self.session_response(&user, &row.session_id, next)
                        }
                        Some(_) => token = next,
                        None => return Err(invalid("unknown token")),
                    }
                }
            }
        }
        Err(invalid("rotated too many times"))
    }

    pub async fn logout(&self, user_id: &str, session_id: &str, global: bool) -> ApiResult<()> {
        let now = Utc::now();
        if global {
            self.store.revoke_user_sessions(user_id, now).await?;
        } else {
            self.store.revoke_session(user_id, session_id, now).await?;
        }
        Ok(())
    }

    pub async fn user(&self, id: &str) -> ApiResult<UserRow> {
        self.store
            .user_by_id(id)
            .await?
            .ok_or_else(|| ApiError::NotFound("user not found".into()))
    }

    /// A user's own changes, made from session `session_id`. Changing the email or the
    /// password of an account that has a password needs `current_password`; a new password
    /// ends every other session. Giving an anonymous account an email and password upgrades
    /// it. Only the columns the request names are written, and only if the account is still
    /// enabled and — when credentials change — still has the password hash checked here.
    pub async fn update_own(
        &self,
        id: &str,
        session_id: &str,
        update: UserUpdate,
    ) -> ApiResult<UserRow> {
        let user = self.user(id).await?;
        if let Some(data) = &update.data {
            check_object(data, "data")?;
        }
        let email = update.email.as_deref().map(normalize_email).transpose()?;
        if let Some(password) = &update.password {
            self.check_password_strength(password)?;
        }
        let email_changes = email.is_some() && email != user.email;
        let credentials_change = email_changes || update.password.is_some();
        if credentials_change && user.password_hash.is_some() {
            let current = update.current_password.as_deref().ok_or_else(|| {
                ApiError::invalid_with(
                    "current_password is required to change the email or the password",
                    json!({"field": "current_password"}),
                )
            })?;
            if !self
                .passwords
                .verify(current, user.password_hash.as_deref())
                .await?
            {
                return Err(ApiError::invalid_with(
                    "current_password is wrong",
                    json!({"field": "current_password"}),
                ));
            }
        }
        let mut patch = UserPatch {
            data: update.data,
            unverify_changed_email: true,
            ..UserPatch::default()
        };
        let mut guard = UserGuard {
            enabled: true,
            password_hash: None,
        };
        let mut revoke = RevokeSessions::None;
        if credentials_change {
            guard.password_hash = Some(user.password_hash.clone());
        }
        if user.is_anonymous && (update.email.is_some() || update.password.is_some()) {
            if (email.is_none() && user.email.is_none())
                || (update.password.is_none() && user.password_hash.is_none())
            {
                return Err(ApiError::invalid(
                    "an anonymous account is upgraded with both email and password",
                ));
            }
            patch.is_anonymous = Some(false);
            patch.providers = Some(json!(["email"]));
        }
        if let Some(password) = &update.password {
            patch.password_hash = Some(self.passwords.hash(password).await?);
            revoke = RevokeSessions::AllExcept(session_id.to_string());
        }
        patch.email = email;
        let actor = Actor {
            kind: "user",
            id: id.to_string(),
        };
        match self.write_user(id, &patch, &guard, &revoke, &actor).await? {
            Guarded::Done(user) => Ok(user),
            Guarded::Gone => Err(ApiError::NotFound("user not found".into())),
            Guarded::Disabled => Err(account_disabled()),
            Guarded::PasswordChanged => Err(ApiError::Conflict(
                "the password was changed meanwhile; sign in again".into(),
            )),
        }
    }

    async fn write_user(
        &self,
        id: &str,
        patch: &UserPatch,
        guard: &UserGuard,
        revoke: &RevokeSessions,
        actor: &Actor,
    ) -> ApiResult<Guarded<UserRow>> {
        match self
            .store
            .update_user(id, patch, guard, revoke, Utc::now(), actor)
            .await
        {
            Err(StoreError::AlreadyExists(_)) => Err(ApiError::AlreadyExists(
                "a user with this email already exists".into(),
            )),
            other => Ok(other?),
        }
    }

    /// Deletes a user (the user themselves, or an admin: `caller`).
    pub async fn delete_user(&self, id: &str, caller: &Caller) -> ApiResult<()> {
        if !self.store.delete_user(id, &caller.actor()).await? {
            return Err(ApiError::NotFound("user not found".into()));
        }
        Ok(())
    }

    pub async fn sessions(&self, user_id: &str, current: &str) -> ApiResult<Vec<SessionInfo>> {
        Ok(self
            .store
            .list_sessions(user_id)
            .await?
            .into_iter()
            .map(|s| SessionInfo {
                current: s.id == current,
                id: s.id,
                created_at: s.created_at,
                refreshed_at: s.refreshed_at,
                user_agent: s.user_agent,
                ip: s.ip,
            })
            .collect())
    }

    pub async fn revoke_session(&self, user_id: &str, session_id: &str) -> ApiResult<()> {
        if !self
            .store
            .revoke_session(user_id, session_id, Utc::now())
            .await?
        {
            return Err(ApiError::NotFound("session not found".into()));
        }
        Ok(())
    }

    // ---------------------------------------------------------------- admins

    pub async fn create_admin(&self, email: &str, password: &str) -> ApiResult<AdminRow> {
        let email = normalize_email(email)?;
        self.check_password_strength(password)?;
        let admin = AdminRow {
            id: new_id(),
            email,
            password_hash: self.passwords.hash(password).await?,
            created_at: Utc::now(),
        };
        match self.store.insert_admin(&admin).await {
            Err(StoreError::AlreadyExists(_)) => Err(ApiError::AlreadyExists(
                "an admin with this email already exists".into(),
            )),
            other => {
                other?;
                Ok(admin)
            }
        }
    }

    pub async fn admin_login(&self, email: &str, password: &str) -> ApiResult<(AdminRow, String)> {
        let invalid = || {
            ApiError::invalid_with(
                "invalid email or password",
                json!({"reason": "invalid_credentials"}),
            )
        };
        let email = normalize_email(email).map_err(|_| invalid())?;
        let admin = self.store.admin_by_email(&email).await?;
        if !self
            .passwords
            .verify(password, admin.as_ref().map(|a| a.password_hash.as_str()))
            .await?
        {
            return Err(invalid());
        }
        let admin = admin.ok_or_else(invalid)?;
        let (token, _) = self
            .tokens
            .issue_admin_token(&admin.id, Utc::now())
            .map_err(ApiError::internal)?;
        Ok((admin, token))
    }

    /// With no admin yet, makes a one-time setup token (stored hashed) and returns it; `None`
    /// once an admin exists.
    pub async fn setup_token(&self) -> ApiResult<Option<String>> {
        if self.store.count_admins().await? > 0 {
            return Ok(None);
        }
        let token = new_secret(32);
        self.store.meta_delete(SETUP_TOKEN_META).await?;
        self.store
            .meta_put_if_absent(SETUP_TOKEN_META, &digest(&token))
            .await?;
        Ok(Some(token))
    }

    /// `POST /v1/admin/setup`: the first admin, with the logged setup token, once. The
    /// request is validated before the token is consumed, and consuming it and inserting
    /// the admin are one transaction: a request that fails does not burn the token, and of
    /// two racing valid ones exactly one makes an admin.
    pub async fn complete_setup(
        &self,
        token: &str,
        email: &str,
        password: &str,
    ) -> ApiResult<(AdminRow, String)> {
        let denied =
            || ApiError::PermissionDenied("the setup token is invalid or was already used".into());
        let stored = self
            .store
            .meta_get(SETUP_TOKEN_META)
            .await?
            .ok_or_else(denied)?;
        if !crate::ids::digests_equal(&stored, &digest(token))
            || self.store.count_admins().await? > 0
        {
            return Err(denied());
        }
        let email = normalize_email(email)?;
        self.check_password_strength(password)?;
        let admin = AdminRow {
            id: new_id(),
            email,
            password_hash: self.passwords.hash(password).await?,
            created_at: Utc::now(),
        };
        if !self
            .store
            .insert_first_admin(SETUP_TOKEN_META, &stored, &admin)
            .await?
        {
            return Err(denied());
        }
        let (token, _) = self
            .tokens
            .issue_admin_token(&admin.id, Utc::now())
            .map_err(ApiError::internal)?;
        Ok((admin, token))
    }

    // ---------------------------------------------------------------- service keys

    pub async fn create_service_key(&self, name: &str) -> ApiResult<ServiceKey> {
        let name = name.trim();
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::invalid_with(
                "name must be 1 to 100 characters, none of them control characters",
                json!({"field": "name"}),
            ));
        }
        let secret = format!("{SERVICE_KEY_PREFIX}{}", new_secret(40));
        let row = ServiceKeyRow {
            id: new_id(),
            name: name.into(),
            key_hash: digest(&secret),
            prefix: secret[..SERVICE_KEY_PREFIX.len() + 6].to_string(),
            created_at: Utc::now(),
            last_used_at: None,
        };
        self.store.insert_service_key(&row).await?;
        let mut key = ServiceKey::from(&row);
        key.key = Some(secret);
        Ok(key)
    }

    pub fn is_service_key(token: &str) -> bool {
        token.starts_with(SERVICE_KEY_PREFIX)
    }

    pub async fn verify_service_key(&self, secret: &str) -> ApiResult<Option<ServiceKeyRow>> {
        Ok(self.store.service_key_by_hash(&digest(secret)).await?)
    }

    // ---------------------------------------------------------------- admin user management

    pub async fn admin_create_user(
        &self,
        caller: &Caller,
        email: &str,
        password: Option<&str>,
        email_verified: bool,
        data: Option<Value>,
        claims: Option<Value>,
    ) -> ApiResult<UserRow> {
        let email = normalize_email(email)?;
        let password_hash = match password {
            Some(p) => {
                self.check_password_strength(p)?;
                Some(self.passwords.hash(p).await?)
            }
            None => None,
        };
        let data = data.unwrap_or_else(|| json!({}));
        check_object(&data, "data")?;
        let claims = claims.unwrap_or_else(|| json!({}));
        check_object(&claims, "claims")?;
        let now = Utc::now();
        let user = UserRow {
            id: new_id(),
            email: Some(email),
            password_hash,
            email_verified,
            is_anonymous: false,
            data,
            claims,
            providers: json!(["email"]),
            mfa_enabled: false,
            disabled: false,
            created_at: now,
            updated_at: now,
            last_sign_in_at: None,
        };
        match self.store.insert_user(&user, &caller.actor()).await {
            Err(StoreError::AlreadyExists(_)) => Err(ApiError::AlreadyExists(
                "a user with this email already exists".into(),
            )),
            other => {
                other?;
                Ok(user)
            }
        }
    }

    /// An admin's changes. Only the named columns are written, so a user's concurrent
    /// profile change cannot undo them. Disabling, and setting a password, revoke every
    /// session in the same transaction, so refreshing fails at once and no sign-in or
    /// refresh decided before the write can outlive it; access tokens already issued run out
    /// at their expiry.
    pub async fn admin_update_user(
        &self,
        caller: &Caller,
        id: &str,
        update: AdminUserUpdate,
    ) -> ApiResult<UserRow> {
        let mut patch = UserPatch {
            email_verified: update.email_verified,
            disabled: update.disabled,
            ..UserPatch::default()
        };
        if let Some(email) = &update.email {
            patch.email = Some(normalize_email(email)?);
            patch.is_anonymous = Some(false);
        }
        if let Some(claims) = update.claims {
            check_object(&claims, "claims")?;
            patch.claims = Some(claims);
        }
        if let Some(data) = update.data {
            check_object(&data, "data")?;
            patch.data = Some(data);
        }
        if let Some(password) = &update.password {
            self.check_password_strength(password)?;
            patch.password_hash = Some(self.passwords.hash(password).await?);
        }
        let revoke = if update.disabled == Some(true) || update.password.is_some() {
            RevokeSessions::All
        } else {
            RevokeSessions::None
        };
        match self
            .write_user(id, &patch, &UserGuard::default(), &revoke, &caller.actor())
            .await?
        {
            Guarded::Done(user) => Ok(user),
            _ => Err(ApiError::NotFound("user not found".into())),
        }
    }

    pub async fn list_users(
        &self,
        search: Option<&str>,
        cursor: Option<&str>,
        limit: u32,
    ) -> ApiResult<(Vec<UserRow>, Option<String>)> {
        let after = cursor.map(decode_user_cursor).transpose()?;
        let limit = limit.clamp(1, 1000);
        let mut users = self
            .store
            .list_users(search.filter(|s| !s.is_empty()), after.as_ref(), limit + 1)
            .await?;
        let next = if users.len() > limit as usize {
            users.truncate(limit as usize);
            users.last().map(|u| {
                encode_user_cursor(&UserCursor {
                    created_at: u.created_at,
                    id: u.id.clone(),
                })
            })
        } else {
            None
        };
        Ok((users, next))
    }
}

fn encode_user_cursor(c: &UserCursor) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}|{}",
        c.created_at
            .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        c.id
    ))
}

fn decode_user_cursor(s: &str) -> ApiResult<UserCursor> {
    use base64::Engine;
    let bad = || ApiError::invalid_with("cursor is not valid", json!({"field": "cursor"}));
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (time, id) = raw.split_once('|').ok_or_else(bad)?;
    let created_at = DateTime::parse_from_rfc3339(time)
        .map_err(|_| bad())?
        .with_timezone(&Utc);
    Ok(UserCursor {
        created_at,
        id: id.to_string(),
    })
}
