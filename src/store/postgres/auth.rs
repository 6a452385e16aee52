//! Users, sessions, refresh tokens, keys, admins, service keys, audit log and meta on
//! PostgreSQL.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;

use super::{map_err, PgStore};
use crate::store::events::{user_deleted, user_event};
use crate::store::{
    contains_pattern, Actor, AdminRow, AuditRow, AuthStore, EventOp, Guarded, NewAudit,
    RefreshTokenRow, RevokeSessions, Rotation, ServiceKeyRow, SessionRow, SigningKeyRow,
    StoreResult, UserCursor, UserGuard, UserPatch, UserRow,
};

const USER_COLUMNS: &str = "id, email, password_hash, email_verified, is_anonymous, data, claims, \
     providers, mfa_enabled, disabled, created_at, updated_at, last_sign_in_at";

/// The `u.`-qualified user columns, for joins.
const USER_COLUMNS_OF_U: &str = "u.id, u.email, u.password_hash, u.email_verified, \
     u.is_anonymous, u.data, u.claims, u.providers, u.mfa_enabled, u.disabled, u.created_at, \
     u.updated_at, u.last_sign_in_at";

/// The [`UserGuard`] as a condition on `users`, taking three parameters from `$first`: the
/// `enabled` flag, whether to compare the hash, and the hash.
fn guard_where(first: usize) -> String {
    let (check, hash) = (first + 1, first + 2);
    format!(
        "(NOT ${first}::boolean OR NOT disabled) \
         AND (NOT ${check}::boolean OR password_hash IS NOT DISTINCT FROM ${hash}::text)"
    )
}

/// Explains why a guarded write matched no row, read in the write's own transaction.
async fn refusal<T>(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: &str,
    guard: &UserGuard,
) -> StoreResult<Guarded<T>> {
    let stored: Option<(bool, Option<String>)> =
        sqlx::query_as("SELECT disabled, password_hash FROM users WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await
            .map_err(map_err)?;
    Ok(guard.refusal(stored))
}

fn user_from_row(row: &PgRow) -> Result<UserRow, sqlx::Error> {
    Ok(UserRow {
        id: row.try_get(0)?,
        email: row.try_get(1)?,
        password_hash: row.try_get(2)?,
        email_verified: row.try_get(3)?,
        is_anonymous: row.try_get(4)?,
        data: row.try_get(5)?,
        claims: row.try_get(6)?,
        providers: row.try_get(7)?,
        mfa_enabled: row.try_get(8)?,
        disabled: row.try_get(9)?,
        created_at: row.try_get(10)?,
        updated_at: row.try_get(11)?,
        last_sign_in_at: row.try_get(12)?,
    })
}

fn session_from_row(row: &PgRow) -> Result<SessionRow, sqlx::Error> {
    Ok(SessionRow {
        id: row.try_get(0)?,
        user_id: row.try_get(1)?,
        created_at: row.try_get(2)?,
        refreshed_at: row.try_get(3)?,
        user_agent: row.try_get(4)?,
        ip: row.try_get(5)?,
        revoked_at: row.try_get(6)?,
    })
}

fn admin_from_row(row: &PgRow) -> Result<AdminRow, sqlx::Error> {
    Ok(AdminRow {
        id: row.try_get(0)?,
        email: row.try_get(1)?,
        password_hash: row.try_get(2)?,
        created_at: row.try_get(3)?,
    })
}

fn service_key_from_row(row: &PgRow) -> Result<ServiceKeyRow, sqlx::Error> {
    Ok(ServiceKeyRow {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        key_hash: row.try_get(2)?,
        prefix: row.try_get(3)?,
        created_at: row.try_get(4)?,
        last_used_at: row.try_get(5)?,
    })
}

fn refresh_from_row(row: &PgRow) -> Result<RefreshTokenRow, sqlx::Error> {
    Ok(RefreshTokenRow {
        token_hash: row.try_get(0)?,
        session_id: row.try_get(1)?,
        created_at: row.try_get(2)?,
        expires_at: row.try_get(3)?,
        rotated_at: row.try_get(4)?,
    })
}

#[async_trait]
impl AuthStore for PgStore {
    async fn insert_signing_key(&self, key: &SigningKeyRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO signing_keys (kid, algorithm, private_key, public_key, created_at, retired_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&key.kid)
        .bind(&key.algorithm)
        .bind(&key.private_key)
        .bind(&key.public_key)
        .bind(key.created_at)
        .bind(key.retired_at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>> {
        let rows = sqlx::query(
            "SELECT kid, algorithm, private_key, public_key, created_at, retired_at
             FROM signing_keys ORDER BY created_at DESC, kid DESC",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                Ok(SigningKeyRow {
                    kid: row.try_get(0)?,
                    algorithm: row.try_get(1)?,
                    private_key: row.try_get(2)?,
                    public_key: row.try_get(3)?,
                    created_at: row.try_get(4)?,
                    retired_at: row.try_get(5)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)
    }

    async fn retire_signing_keys_except(
        &self,
        keep_kid: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE signing_keys SET retired_at = $1 WHERE kid <> $2 AND retired_at IS NULL",
        )
        .bind(at)
        .bind(keep_kid)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn insert_user(&self, u: &UserRow, actor: &Actor) -> StoreResult<()> {
        let mut unit = self.begin_unit().await?;
        sqlx::query(&format!(
            "INSERT INTO users ({USER_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(&u.id)
        .bind(&u.email)
        .bind(&u.password_hash)
        .bind(u.email_verified)
        .bind(u.is_anonymous)
        .bind(&u.data)
        .bind(&u.claims)
        .bind(&u.providers)
        .bind(u.mfa_enabled)
        .bind(u.disabled)
        .bind(u.created_at)
        .bind(u.updated_at)
        .bind(u.last_sign_in_at)
        .execute(&mut *unit.tx)
        .await
        .map_err(map_err)?;
        unit.append(vec![user_event(EventOp::Create, u, None, actor.clone())])
            .await?;
        unit.commit().await?;
        Ok(())
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<Option<UserRow>> {
        let row = sqlx::query(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(user_from_row).transpose().map_err(map_err)
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRow>> {
        let row = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE email = $1"
        ))
        .bind(email)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(user_from_row).transpose().map_err(map_err)
    }

    async fn update_user(
        &self,
        id: &str,
        p: &UserPatch,
        guard: &UserGuard,
        revoke: &RevokeSessions,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Guarded<UserRow>> {
        let mut unit = self.begin_unit().await?;
        // The row as it was, for the event's `old_data`; locking it here takes the same row
        // lock the UPDATE below would, only earlier in this transaction.
        let before = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *unit.tx)
        .await
        .map_err(map_err)?
        .as_ref()
        .map(user_from_row)
        .transpose()
        .map_err(map_err)?;
        // The row lock this UPDATE takes is what start_session and rotate_refresh_token wait
        // on; the session revoke below is a later statement, so under READ COMMITTED its
        // snapshot includes every session they committed while it waited. Every right-hand
        // side reads the row as it was before the statement, so the email comparison sees
        // the old address.
        let row = sqlx::query(&format!(
            "UPDATE users SET
                email = COALESCE($2, email),
                email_verified = CASE
                    WHEN $3::boolean IS NOT NULL THEN $3
                    WHEN $4 AND $2::text IS NOT NULL AND email IS DISTINCT FROM $2 THEN FALSE
                    ELSE email_verified END,
                password_hash = COALESCE($5, password_hash),
                is_anonymous = COALESCE($6, is_anonymous),
                providers = COALESCE($7, providers),
                data = COALESCE($8, data),
                claims = COALESCE($9, claims),
                disabled = COALESCE($10, disabled),
                updated_at = $11
             WHERE id = $1 AND {}
             RETURNING {USER_COLUMNS}",
            guard_where(12)
        ))
        .bind(id)
        .bind(&p.email)
        .bind(p.email_verified)
        .bind(p.unverify_changed_email)
        .bind(&p.password_hash)
        .bind(p.is_anonymous)
        .bind(&p.providers)
        .bind(&p.data)
        .bind(&p.claims)
        .bind(p.disabled)
        .bind(at)
        .bind(guard.enabled)
        .bind(guard.password_hash.is_some())
        .bind(guard.password_hash.clone().flatten())
        .fetch_optional(&mut *unit.tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else {
            return refusal(&mut unit.tx, id, guard).await;
        };
        let user = user_from_row(&row).map_err(map_err)?;
        unit.now = at;
        unit.append(vec![user_event(
            EventOp::Update,
            &user,
            before.as_ref(),
            actor.clone(),
        )])
        .await?;
        let except = match revoke {
            RevokeSessions::None => None,
            RevokeSessions::All => Some(None),
            RevokeSessions::AllExcept(keep) => Some(Some(keep.as_str())),
        };
        if let Some(except) = except {
            sqlx::query(
                "UPDATE sessions SET revoked_at = $2
                 WHERE user_id = $1 AND revoked_at IS NULL AND ($3::text IS NULL OR id <> $3)",
            )
            .bind(id)
            .bind(at)
            .bind(except)
            .execute(&mut *unit.tx)
            .await
            .map_err(map_err)?;
        }
        unit.commit().await?;
        Ok(Guarded::Done(user))
    }

    async fn delete_user(&self, id: &str, actor: &Actor) -> StoreResult<bool> {
        let mut unit = self.begin_unit().await?;
        let row = sqlx::query(&format!(
            "DELETE FROM users WHERE id = $1 RETURNING {USER_COLUMNS}"
        ))
        .bind(id)
        .fetch_optional(&mut *unit.tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(false) };
        let before = user_from_row(&row).map_err(map_err)?;
        let event = user_deleted(&before, actor.clone());
        unit.append(vec![event]).await?;
        unit.commit().await?;
        Ok(true)
    }

    async fn list_users(
        &self,
        search: Option<&str>,
        after: Option<&UserCursor>,
        limit: u32,
    ) -> StoreResult<Vec<UserRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLUMNS} FROM users
             WHERE ($1::text IS NULL OR email LIKE $1 ESCAPE '\\' OR id = $2)
               AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4))
             ORDER BY created_at DESC, id DESC
             LIMIT $5"
        ))
        .bind(search.map(contains_pattern))
        .bind(search)
        .bind(after.map(|a| a.created_at))
        .bind(after.map(|a| a.id.clone()))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(user_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn start_session(
        &self,
        s: &SessionRow,
        t: &RefreshTokenRow,
        guard: &UserGuard,
    ) -> StoreResult<Guarded<UserRow>> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // The UPDATE locks the user row until commit. An admin's disable (an UPDATE of the
        // same row, then the revoke of every session, in one transaction) either committed
        // first — this UPDATE waited for it, re-read the row and the guard refuses — or
        // waits for this commit, and its revoke, a later statement with a later snapshot,
        // sees and revokes the session made here.
        let row = sqlx::query(&format!(
            "UPDATE users SET last_sign_in_at = $2 WHERE id = $1 AND {}
             RETURNING {USER_COLUMNS}",
            guard_where(3)
        ))
        .bind(&s.user_id)
        .bind(s.created_at)
        .bind(guard.enabled)
        .bind(guard.password_hash.is_some())
        .bind(guard.password_hash.clone().flatten())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(row) = row else {
            return refusal(&mut tx, &s.user_id, guard).await;
        };
        let user = user_from_row(&row).map_err(map_err)?;
        sqlx::query(
            "INSERT INTO sessions (id, user_id, created_at, refreshed_at, user_agent, ip, revoked_at)
             VALUES ($1, $2, $3, $4, $5, $6, NULL)",
        )
        .bind(&s.id)
        .bind(&s.user_id)
        .bind(s.created_at)
        .bind(s.refreshed_at)
        .bind(&s.user_agent)
        .bind(&s.ip)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_refresh_token(&mut tx, t).await?;
        tx.commit().await.map_err(map_err)?;
        Ok(Guarded::Done(user))
    }

    async fn list_sessions(&self, user_id: &str) -> StoreResult<Vec<SessionRow>> {
        let rows = sqlx::query(
            "SELECT id, user_id, created_at, refreshed_at, user_agent, ip, revoked_at
             FROM sessions WHERE user_id = $1 AND revoked_at IS NULL
             ORDER BY created_at DESC, id DESC",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(session_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn revoke_session(
        &self,
        user_id: &str,
        session_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = $3 WHERE id = $1 AND user_id = $2 AND revoked_at IS NULL",
        )
        .bind(session_id)
        .bind(user_id)
        .bind(at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn revoke_user_sessions(&self, user_id: &str, at: DateTime<Utc>) -> StoreResult<u64> {
        let done = sqlx::query(
            "UPDATE sessions SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL",
        )
        .bind(user_id)
        .bind(at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn refresh_token(&self, token_hash: &str) -> StoreResult<Option<RefreshTokenRow>> {
        let row = sqlx::query(
            "SELECT token_hash, session_id, created_at, expires_at, rotated_at
             FROM refresh_tokens WHERE token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref()
            .map(refresh_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new: &RefreshTokenRow,
        at: DateTime<Utc>,
    ) -> StoreResult<Rotation> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // The user row first, FOR SHARE: it conflicts with the admin's UPDATE of the row, so
        // a disable either committed before (this read waits, sees `disabled`) or waits for
        // this commit and then revokes the session rotated here. Taking the user before the
        // token keeps one lock order with every writer of users (no deadlock).
        let user = sqlx::query(&format!(
            "SELECT {USER_COLUMNS_OF_U} FROM refresh_tokens t
             JOIN sessions s ON s.id = t.session_id
             JOIN users u ON u.id = s.user_id
             WHERE t.token_hash = $1 FOR SHARE OF u"
        ))
        .bind(old_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let user = match user {
            None => return Ok(Rotation::Unknown),
            Some(row) => user_from_row(&row).map_err(map_err)?,
        };
        if user.disabled {
            return Ok(Rotation::UserDisabled);
        }
        // The token row lock makes concurrent rotations of one token queue here: the first
        // sees it live, every later one sees `rotated_at` set by the first.
        let current: Option<(Option<DateTime<Utc>>, Option<DateTime<Utc>>)> = sqlx::query_as(
            "SELECT t.rotated_at, s.revoked_at FROM refresh_tokens t
             JOIN sessions s ON s.id = t.session_id
             WHERE t.token_hash = $1 FOR UPDATE OF t",
        )
        .bind(old_hash)
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?;
        let outcome = match current {
            None | Some((_, Some(_))) => Rotation::Unknown,
            Some((Some(rotated_at), None)) => Rotation::AlreadyRotated { rotated_at, user },
            Some((None, None)) => {
                sqlx::query("UPDATE refresh_tokens SET rotated_at = $2 WHERE token_hash = $1")
                    .bind(old_hash)
                    .bind(at)
                    .execute(&mut *tx)
                    .await
                    .map_err(map_err)?;
                // A logout that committed since the read above is seen here (the UPDATE
                // re-checks the row it waited for): then nothing is rotated.
                let live = sqlx::query(
                    "UPDATE sessions SET refreshed_at = $2 WHERE id = $1 AND revoked_at IS NULL",
                )
                .bind(&new.session_id)
                .bind(at)
                .execute(&mut *tx)
                .await
                .map_err(map_err)?;
                if live.rows_affected() == 0 {
                    return Ok(Rotation::Unknown);
                }
                insert_refresh_token(&mut tx, new).await?;
                Rotation::Rotated { user }
            }
        };
        tx.commit().await.map_err(map_err)?;
        Ok(outcome)
    }

    async fn insert_admin(&self, a: &AdminRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO admins (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&a.id)
        .bind(&a.email)
        .bind(&a.password_hash)
        .bind(a.created_at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn admin_by_email(&self, email: &str) -> StoreResult<Option<AdminRow>> {
        let row =
            sqlx::query("SELECT id, email, password_hash, created_at FROM admins WHERE email = $1")
                .bind(email)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        row.as_ref()
            .map(admin_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn admin_by_id(&self, id: &str) -> StoreResult<Option<AdminRow>> {
        let row =
            sqlx::query("SELECT id, email, password_hash, created_at FROM admins WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await
                .map_err(map_err)?;
        row.as_ref()
            .map(admin_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn count_admins(&self) -> StoreResult<i64> {
        sqlx::query_scalar("SELECT COUNT(*) FROM admins")
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn insert_first_admin(
        &self,
        token_key: &str,
        token_digest: &str,
        a: &AdminRow,
    ) -> StoreResult<bool> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        // Two racing requests: the second DELETE waits for the first's row lock and, once
        // that commits, finds the row gone.
        let consumed = sqlx::query("DELETE FROM meta WHERE key = $1 AND value = $2")
            .bind(token_key)
            .bind(token_digest)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if consumed.rows_affected() == 0 {
            return Ok(false);
        }
        let admins: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM admins")
            .fetch_one(&mut *tx)
            .await
            .map_err(map_err)?;
        if admins > 0 {
            // A token left over once an admin exists is worthless; consuming it is fine.
            tx.commit().await.map_err(map_err)?;
            return Ok(false);
        }
        // An error here drops the transaction, rolling back the consumption too.
        sqlx::query(
            "INSERT INTO admins (id, email, password_hash, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&a.id)
        .bind(&a.email)
        .bind(&a.password_hash)
        .bind(a.created_at)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(true)
    }

    async fn insert_service_key(&self, k: &ServiceKeyRow) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO service_keys (id, name, key_hash, prefix, created_at, last_used_at)
             VALUES ($1, $2, $3, $4, $5, NULL)",
        )
        .bind(&k.id)
        .bind(&k.name)
        .bind(&k.key_hash)
        .bind(&k.prefix)
        .bind(k.created_at)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn service_key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ServiceKeyRow>> {
        let row = sqlx::query(
            "SELECT id, name, key_hash, prefix, created_at, last_used_at FROM service_keys WHERE key_hash = $1",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref()
            .map(service_key_from_row)
            .transpose()
            .map_err(map_err)
    }

    async fn list_service_keys(&self) -> StoreResult<Vec<ServiceKeyRow>> {
        let rows = sqlx::query(
            "SELECT id, name, key_hash, prefix, created_at, last_used_at FROM service_keys
             ORDER BY created_at DESC, id DESC",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(service_key_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn delete_service_key(&self, id: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM service_keys WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }

    async fn append_audit(&self, e: &NewAudit) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO audit_log (time, actor_type, actor_id, action, target, details)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(Utc::now())
        .bind(&e.actor_type)
        .bind(&e.actor_id)
        .bind(&e.action)
        .bind(&e.target)
        .bind(&e.details)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    async fn list_audit(&self, before: Option<i64>, limit: u32) -> StoreResult<Vec<AuditRow>> {
        let rows = sqlx::query(
            "SELECT seq, time, actor_type, actor_id, action, target, details FROM audit_log
             WHERE ($1::bigint IS NULL OR seq < $1) ORDER BY seq DESC LIMIT $2",
        )
        .bind(before)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|row| {
                Ok(AuditRow {
                    seq: row.try_get(0)?,
                    time: row.try_get(1)?,
                    actor_type: row.try_get(2)?,
                    actor_id: row.try_get(3)?,
                    action: row.try_get(4)?,
                    target: row.try_get(5)?,
                    details: row.try_get(6)?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(map_err)
    }

    async fn meta_get(&self, key: &str) -> StoreResult<Option<String>> {
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn meta_put_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(value)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_one(&self.pool)
            .await
            .map_err(map_err)
    }

    async fn meta_delete(&self, key: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM meta WHERE key = $1")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() > 0)
    }
}

async fn insert_refresh_token(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    t: &RefreshTokenRow,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at, rotated_at)
         VALUES ($1, $2, $3, $4, NULL)",
    )
    .bind(&t.token_hash)
    .bind(&t.session_id)
    .bind(t.created_at)
    .bind(t.expires_at)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}
