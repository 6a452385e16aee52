//! Admins: creating one (command line or first-run setup) and signing in.

use super::*;

impl AuthService {
    /// A new admin's row: the email normalised, the password checked and hashed.
    async fn new_admin(&self, email: &str, password: &str) -> ApiResult<AdminRow> {
        let email = normalize_email(email)?;
        self.check_password_strength(password)?;
        Ok(AdminRow {
            id: new_id(),
            email,
            password_hash: self.passwords.hash(password).await?,
            created_at: Utc::now(),
        })
    }

    pub async fn create_admin(&self, email: &str, password: &str) -> ApiResult<AdminRow> {
        let admin = self.new_admin(email, password).await?;
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
        let admin = self.new_admin(email, password).await?;
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
}
