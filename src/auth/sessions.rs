//! Signing in and staying signed in: signup, the password and refresh-token grants, anonymous
//! users, logout, the caller's sessions. Refresh rotation and reuse detection are described
//! in the parent module.

use super::*;

impl AuthService {
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
}
