//! Accounts: reading a user, a user's own changes, admins' changes, deletion, listing. Every
//! write names only the columns it changes and appends its change-stream event.

use super::*;

impl AuthService {
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
