//! Users, sessions, refresh tokens, keys, admins, service keys, audit log and meta on SQLite.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension, Row};

use super::{map_err, parse_ts, parse_ts_opt, ts, SqliteStore};
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

/// The [`UserGuard`] as a condition on `users`, taking three parameters from `?first`: the
/// `enabled` flag, whether to compare the hash, and the hash.
fn guard_where(first: usize) -> String {
    let (check, hash) = (first + 1, first + 2);
    format!("(NOT ?{first} OR disabled = 0) AND (NOT ?{check} OR password_hash IS ?{hash})")
}

/// Explains why a guarded write matched no row. Runs in the write's own transaction, so
/// what it reads is what the write saw.
fn refusal<T>(
    tx: &rusqlite::Transaction<'_>,
    id: &str,
    guard: &UserGuard,
) -> StoreResult<Guarded<T>> {
    let stored = tx
        .prepare_cached("SELECT disabled, password_hash FROM users WHERE id = ?1")
        .and_then(|mut s| s.query_row([id], |r| Ok((r.get(0)?, r.get(1)?))).optional())
        .map_err(map_err)?;
    Ok(guard.refusal(stored))
}

fn json_col(row: &Row<'_>, idx: usize) -> rusqlite::Result<serde_json::Value> {
    let text: String = row.get(idx)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn user_from_row(row: &Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        id: row.get(0)?,
        email: row.get(1)?,
        password_hash: row.get(2)?,
        email_verified: row.get(3)?,
        is_anonymous: row.get(4)?,
        data: json_col(row, 5)?,
        claims: json_col(row, 6)?,
        providers: json_col(row, 7)?,
        mfa_enabled: row.get(8)?,
        disabled: row.get(9)?,
        created_at: parse_ts(&row.get::<_, String>(10)?)?,
        updated_at: parse_ts(&row.get::<_, String>(11)?)?,
        last_sign_in_at: parse_ts_opt(row.get(12)?)?,
    })
}

fn session_from_row(row: &Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: row.get(0)?,
        user_id: row.get(1)?,
        created_at: parse_ts(&row.get::<_, String>(2)?)?,
        refreshed_at: parse_ts(&row.get::<_, String>(3)?)?,
        user_agent: row.get(4)?,
        ip: row.get(5)?,
        revoked_at: parse_ts_opt(row.get(6)?)?,
    })
}

fn admin_from_row(row: &Row<'_>) -> rusqlite::Result<AdminRow> {
    Ok(AdminRow {
        id: row.get(0)?,
        email: row.get(1)?,
        password_hash: row.get(2)?,
        created_at: parse_ts(&row.get::<_, String>(3)?)?,
    })
}

fn service_key_from_row(row: &Row<'_>) -> rusqlite::Result<ServiceKeyRow> {
    Ok(ServiceKeyRow {
        id: row.get(0)?,
        name: row.get(1)?,
        key_hash: row.get(2)?,
        prefix: row.get(3)?,
        created_at: parse_ts(&row.get::<_, String>(4)?)?,
        last_used_at: parse_ts_opt(row.get(5)?)?,
    })
}

#[async_trait]
impl AuthStore for SqliteStore {
    async fn insert_signing_key(&self, key: &SigningKeyRow) -> StoreResult<()> {
        let key = key.clone();
        self.write(move |tx| {
            tx.prepare_cached(
                "INSERT INTO signing_keys (kid, algorithm, private_key, public_key, created_at, retired_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    key.kid,
                    key.algorithm,
                    key.private_key,
                    key.public_key,
                    ts(&key.created_at),
                    key.retired_at.as_ref().map(ts)
                ])
            })
            .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT kid, algorithm, private_key, public_key, created_at, retired_at
                     FROM signing_keys ORDER BY created_at DESC, kid DESC",
                )
                .map_err(map_err)?;
            let rows = stmt
                .query_map([], |row| {
                    Ok(SigningKeyRow {
                        kid: row.get(0)?,
                        algorithm: row.get(1)?,
                        private_key: row.get(2)?,
                        public_key: row.get(3)?,
                        created_at: parse_ts(&row.get::<_, String>(4)?)?,
                        retired_at: parse_ts_opt(row.get(5)?)?,
                    })
                })
                .map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
        .await
    }

    async fn retire_signing_keys_except(
        &self,
        keep_kid: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let keep = keep_kid.to_string();
        self.write(move |tx| {
            tx.execute(
                "UPDATE signing_keys SET retired_at = ?1 WHERE kid <> ?2 AND retired_at IS NULL",
                params![ts(&at), keep],
            )
            .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn insert_user(&self, user: &UserRow, actor: &Actor) -> StoreResult<()> {
        let u = user.clone();
        let actor = actor.clone();
        self.write_unit(move |unit| {
            unit.tx.prepare_cached(&format!(
                "INSERT INTO users ({USER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ))
            .and_then(|mut s| {
                s.execute(params![
                    u.id,
                    u.email,
                    u.password_hash,
                    u.email_verified,
                    u.is_anonymous,
                    u.data.to_string(),
                    u.claims.to_string(),
                    u.providers.to_string(),
                    u.mfa_enabled,
                    u.disabled,
                    ts(&u.created_at),
                    ts(&u.updated_at),
                    u.last_sign_in_at.as_ref().map(ts),
                ])
            })
            .map_err(map_err)?;
            unit.now = u.created_at;
            unit.append(vec![user_event(EventOp::Create, &u, None, actor)])?;
            Ok(())
        })
        .await
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<Option<UserRow>> {
        let id = id.to_string();
        self.read_point(move |c| {
            c.prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))
                .and_then(|mut s| s.query_row([id], user_from_row).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRow>> {
        let email = email.to_string();
        self.read_point(move |c| {
            c.prepare_cached(&format!(
                "SELECT {USER_COLUMNS} FROM users WHERE email = ?1"
            ))
            .and_then(|mut s| s.query_row([email], user_from_row).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn update_user(
        &self,
        id: &str,
        patch: &UserPatch,
        guard: &UserGuard,
        revoke: &RevokeSessions,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Guarded<UserRow>> {
        let (id, p, guard, revoke) = (id.to_string(), patch.clone(), guard.clone(), revoke.clone());
        let actor = actor.clone();
        self.write_unit(move |unit| {
            unit.now = at;
            let tx = unit.tx;
            let before = tx
                .prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))
                .and_then(|mut s| s.query_row([&id], user_from_row).optional())
                .map_err(map_err)?;
            // Every right-hand side reads the row as it was before this statement, so the
            // email comparison sees the old address.
            let written = tx
                .prepare_cached(&format!(
                    "UPDATE users SET
                        email = COALESCE(?2, email),
                        email_verified = CASE
                            WHEN ?3 IS NOT NULL THEN ?3
                            WHEN ?4 AND ?2 IS NOT NULL AND email IS NOT ?2 THEN 0
                            ELSE email_verified END,
                        password_hash = COALESCE(?5, password_hash),
                        is_anonymous = COALESCE(?6, is_anonymous),
                        providers = COALESCE(?7, providers),
                        data = COALESCE(?8, data),
                        claims = COALESCE(?9, claims),
                        disabled = COALESCE(?10, disabled),
                        updated_at = ?11
                     WHERE id = ?1 AND {}
                     RETURNING {USER_COLUMNS}",
                    guard_where(12)
                ))
                .and_then(|mut s| {
                    s.query_row(
                        params![
                            id,
                            p.email,
                            p.email_verified,
                            p.unverify_changed_email,
                            p.password_hash,
                            p.is_anonymous,
                            p.providers.as_ref().map(|v| v.to_string()),
                            p.data.as_ref().map(|v| v.to_string()),
                            p.claims.as_ref().map(|v| v.to_string()),
                            p.disabled,
                            ts(&at),
                            guard.enabled,
                            guard.password_hash.is_some(),
                            guard.password_hash.clone().flatten(),
                        ],
                        user_from_row,
                    )
                    .optional()
                })
                .map_err(map_err)?;
            let Some(user) = written else {
                return refusal(tx, &id, &guard);
            };
            unit.append(vec![user_event(
                EventOp::Update,
                &user,
                before.as_ref(),
                actor,
            )])?;
            let except = match &revoke {
                RevokeSessions::None => return Ok(Guarded::Done(user)),
                RevokeSessions::All => None,
                RevokeSessions::AllExcept(keep) => Some(keep.clone()),
            };
            tx.prepare_cached(
                "UPDATE sessions SET revoked_at = ?2
                 WHERE user_id = ?1 AND revoked_at IS NULL AND (?3 IS NULL OR id <> ?3)",
            )
            .and_then(|mut s| s.execute(params![id, ts(&at), except]))
            .map_err(map_err)?;
            Ok(Guarded::Done(user))
        })
        .await
    }

    async fn delete_user(&self, id: &str, actor: &Actor) -> StoreResult<bool> {
        let id = id.to_string();
        let actor = actor.clone();
        self.write_unit(move |unit| {
            let tx = unit.tx;
            let before = tx
                .prepare_cached(&format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1"))
                .and_then(|mut s| s.query_row([&id], user_from_row).optional())
                .map_err(map_err)?;
            let Some(before) = before else {
                return Ok(false);
            };
            tx.execute("DELETE FROM users WHERE id = ?1", [&id])
                .map_err(map_err)?;
            unit.append(vec![user_deleted(&before, actor)])?;
            Ok(true)
        })
        .await
    }

    async fn list_users(
        &self,
        search: Option<&str>,
        after: Option<&UserCursor>,
        limit: u32,
    ) -> StoreResult<Vec<UserRow>> {
        let pattern = search.map(contains_pattern);
        let exact = search.map(str::to_string);
        let after = after.cloned();
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {USER_COLUMNS} FROM users
                     WHERE (?1 IS NULL OR email LIKE ?1 ESCAPE '\\' OR id = ?2)
                       AND (?3 IS NULL OR created_at < ?3 OR (created_at = ?3 AND id < ?4))
                     ORDER BY created_at DESC, id DESC
                     LIMIT ?5"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(
                    params![
                        pattern,
                        exact,
                        after.as_ref().map(|a| ts(&a.created_at)),
                        after.as_ref().map(|a| a.id.clone()),
                        limit,
                    ],
                    user_from_row,
                )
                .map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
        .await
    }

    async fn start_session(
        &self,
        session: &SessionRow,
        token: &RefreshTokenRow,
        guard: &UserGuard,
    ) -> StoreResult<Guarded<UserRow>> {
        let (s, t, guard) = (session.clone(), token.clone(), guard.clone());
        // One job on the single writer: an admin's disable-and-revoke runs wholly before
        // (then the guard refuses) or wholly after (then it revokes this session).
        self.write(move |tx| {
            let user = tx
                .prepare_cached(&format!(
                    "UPDATE users SET last_sign_in_at = ?2 WHERE id = ?1 AND {}
                     RETURNING {USER_COLUMNS}",
                    guard_where(3)
                ))
                .and_then(|mut st| {
                    st.query_row(
                        params![
                            s.user_id,
                            ts(&s.created_at),
                            guard.enabled,
                            guard.password_hash.is_some(),
                            guard.password_hash.clone().flatten(),
                        ],
                        user_from_row,
                    )
                    .optional()
                })
                .map_err(map_err)?;
            let Some(user) = user else {
                return refusal(tx, &s.user_id, &guard);
            };
            tx.prepare_cached(
                "INSERT INTO sessions (id, user_id, created_at, refreshed_at, user_agent, ip, revoked_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
            )
            .and_then(|mut st| {
                st.execute(params![
                    s.id,
                    s.user_id,
                    ts(&s.created_at),
                    ts(&s.refreshed_at),
                    s.user_agent,
                    s.ip
                ])
            })
            .map_err(map_err)?;
            insert_refresh_token(tx, &t)?;
            Ok(Guarded::Done(user))
        })
        .await
    }

    async fn list_sessions(&self, user_id: &str) -> StoreResult<Vec<SessionRow>> {
        let user_id = user_id.to_string();
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, user_id, created_at, refreshed_at, user_agent, ip, revoked_at
                     FROM sessions WHERE user_id = ?1 AND revoked_at IS NULL
                     ORDER BY created_at DESC, id DESC",
                )
                .map_err(map_err)?;
            let rows = stmt
                .query_map([user_id], session_from_row)
                .map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
        .await
    }

    async fn revoke_session(
        &self,
        user_id: &str,
        session_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let (user_id, session_id) = (user_id.to_string(), session_id.to_string());
        self.write(move |tx| {
            let n = tx
                .execute(
                    "UPDATE sessions SET revoked_at = ?3
                     WHERE id = ?1 AND user_id = ?2 AND revoked_at IS NULL",
                    params![session_id, user_id, ts(&at)],
                )
                .map_err(map_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn revoke_user_sessions(&self, user_id: &str, at: DateTime<Utc>) -> StoreResult<u64> {
        let user_id = user_id.to_string();
        self.write(move |tx| {
            let n = tx
                .execute(
                    "UPDATE sessions SET revoked_at = ?2 WHERE user_id = ?1 AND revoked_at IS NULL",
                    params![user_id, ts(&at)],
                )
                .map_err(map_err)?;
            Ok(n as u64)
        })
        .await
    }

    async fn refresh_token(&self, token_hash: &str) -> StoreResult<Option<RefreshTokenRow>> {
        let hash = token_hash.to_string();
        self.read_point(move |c| {
            c.prepare_cached(
                "SELECT token_hash, session_id, created_at, expires_at, rotated_at
                 FROM refresh_tokens WHERE token_hash = ?1",
            )
            .and_then(|mut s| s.query_row([hash], refresh_from_row).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new: &RefreshTokenRow,
        at: DateTime<Utc>,
    ) -> StoreResult<Rotation> {
        let old_hash = old_hash.to_string();
        let new = new.clone();
        self.write(move |tx| {
            let current = tx
                .prepare_cached(&format!(
                    "SELECT {USER_COLUMNS_OF_U}, t.rotated_at, s.revoked_at FROM refresh_tokens t
                     JOIN sessions s ON s.id = t.session_id
                     JOIN users u ON u.id = s.user_id
                     WHERE t.token_hash = ?1"
                ))
                .and_then(|mut s| {
                    s.query_row([&old_hash], |r| {
                        Ok((
                            user_from_row(r)?,
                            r.get::<_, Option<String>>(13)?,
                            r.get::<_, Option<String>>(14)?,
                        ))
                    })
                    .optional()
                })
                .map_err(map_err)?;
            let (user, rotated_at) = match current {
                None | Some((_, _, Some(_))) => return Ok(Rotation::Unknown),
                Some((user, _, None)) if user.disabled => return Ok(Rotation::UserDisabled),
                Some((user, rotated_at, None)) => (user, rotated_at),
            };
            if let Some(rotated_at) = rotated_at {
                return Ok(Rotation::AlreadyRotated {
                    rotated_at: parse_ts(&rotated_at).map_err(map_err)?,
                    user,
                });
            }
            tx.execute(
                "UPDATE refresh_tokens SET rotated_at = ?2 WHERE token_hash = ?1",
                params![old_hash, ts(&at)],
            )
            .map_err(map_err)?;
            tx.execute(
                "UPDATE sessions SET refreshed_at = ?2 WHERE id = ?1",
                params![new.session_id, ts(&at)],
            )
            .map_err(map_err)?;
            insert_refresh_token(tx, &new)?;
            Ok(Rotation::Rotated { user })
        })
        .await
    }

    async fn insert_admin(&self, admin: &AdminRow) -> StoreResult<()> {
        let a = admin.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO admins (id, email, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![a.id, a.email, a.password_hash, ts(&a.created_at)],
            )
            .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn admin_by_email(&self, email: &str) -> StoreResult<Option<AdminRow>> {
        let email = email.to_string();
        self.read_point(move |c| {
            c.prepare_cached(
                "SELECT id, email, password_hash, created_at FROM admins WHERE email = ?1",
            )
            .and_then(|mut s| s.query_row([email], admin_from_row).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn admin_by_id(&self, id: &str) -> StoreResult<Option<AdminRow>> {
        let id = id.to_string();
        self.read_point(move |c| {
            c.prepare_cached(
                "SELECT id, email, password_hash, created_at FROM admins WHERE id = ?1",
            )
            .and_then(|mut s| s.query_row([id], admin_from_row).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn count_admins(&self) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row("SELECT COUNT(*) FROM admins", [], |r| r.get(0))
                .map_err(map_err)
        })
        .await
    }

    async fn insert_first_admin(
        &self,
        token_key: &str,
        token_digest: &str,
        admin: &AdminRow,
    ) -> StoreResult<bool> {
        let (key, digest, a) = (
            token_key.to_string(),
            token_digest.to_string(),
            admin.clone(),
        );
        self.write(move |tx| {
            let consumed = tx
                .execute(
                    "DELETE FROM meta WHERE key = ?1 AND value = ?2",
                    params![key, digest],
                )
                .map_err(map_err)?;
            if consumed == 0 {
                return Ok(false);
            }
            let admins: i64 = tx
                .query_row("SELECT COUNT(*) FROM admins", [], |r| r.get(0))
                .map_err(map_err)?;
            if admins > 0 {
                // A token left over once an admin exists is worthless; consuming it is fine.
                return Ok(false);
            }
            // An error here rolls back the consumption too: the token still works.
            tx.execute(
                "INSERT INTO admins (id, email, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![a.id, a.email, a.password_hash, ts(&a.created_at)],
            )
            .map_err(map_err)?;
            Ok(true)
        })
        .await
    }

    async fn insert_service_key(&self, key: &ServiceKeyRow) -> StoreResult<()> {
        let k = key.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO service_keys (id, name, key_hash, prefix, created_at, last_used_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
                params![k.id, k.name, k.key_hash, k.prefix, ts(&k.created_at)],
            )
            .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn service_key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ServiceKeyRow>> {
        let hash = key_hash.to_string();
        self.read_point(move |c| {
            c.prepare_cached(
                "SELECT id, name, key_hash, prefix, created_at, last_used_at FROM service_keys WHERE key_hash = ?1",
            )
            .and_then(|mut s| s.query_row([hash], service_key_from_row).optional())
            .map_err(map_err)
        })
        .await
    }

    async fn list_service_keys(&self) -> StoreResult<Vec<ServiceKeyRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT id, name, key_hash, prefix, created_at, last_used_at FROM service_keys
                     ORDER BY created_at DESC, id DESC",
                )
                .map_err(map_err)?;
            let rows = stmt.query_map([], service_key_from_row).map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
        .await
    }

    async fn delete_service_key(&self, id: &str) -> StoreResult<bool> {
        let id = id.to_string();
        self.write(move |tx| {
            let n = tx
                .execute("DELETE FROM service_keys WHERE id = ?1", [id])
                .map_err(map_err)?;
            Ok(n > 0)
        })
        .await
    }

    async fn append_audit(&self, entry: &NewAudit) -> StoreResult<()> {
        let e = entry.clone();
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO audit_log (time, actor_type, actor_id, action, target, details)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    ts(&Utc::now()),
                    e.actor_type,
                    e.actor_id,
                    e.action,
                    e.target,
                    e.details.to_string()
                ],
            )
            .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    async fn list_audit(&self, before: Option<i64>, limit: u32) -> StoreResult<Vec<AuditRow>> {
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT seq, time, actor_type, actor_id, action, target, details FROM audit_log
                     WHERE (?1 IS NULL OR seq < ?1) ORDER BY seq DESC LIMIT ?2",
                )
                .map_err(map_err)?;
            let rows = stmt
                .query_map(params![before, limit], |row| {
                    Ok(AuditRow {
                        seq: row.get(0)?,
                        time: parse_ts(&row.get::<_, String>(1)?)?,
                        actor_type: row.get(2)?,
                        actor_id: row.get(3)?,
                        action: row.get(4)?,
                        target: row.get(5)?,
                        details: json_col(row, 6)?,
                    })
                })
                .map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
        .await
    }

    async fn meta_get(&self, key: &str) -> StoreResult<Option<String>> {
        let key = key.to_string();
        self.read_point(move |c| {
            c.prepare_cached("SELECT value FROM meta WHERE key = ?1")
                .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
                .map_err(map_err)
        })
        .await
    }

    async fn meta_put_if_absent(&self, key: &str, value: &str) -> StoreResult<String> {
        let (key, value) = (key.to_string(), value.to_string());
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO NOTHING",
                params![key, value],
            )
            .map_err(map_err)?;
            tx.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .map_err(map_err)
        })
        .await
    }

    async fn meta_delete(&self, key: &str) -> StoreResult<bool> {
        let key = key.to_string();
        self.write(move |tx| {
            let n = tx
                .execute("DELETE FROM meta WHERE key = ?1", [key])
                .map_err(map_err)?;
            Ok(n > 0)
        })
        .await
    }
}

fn refresh_from_row(row: &Row<'_>) -> rusqlite::Result<RefreshTokenRow> {
    Ok(RefreshTokenRow {
        token_hash: row.get(0)?,
        session_id: row.get(1)?,
        created_at: parse_ts(&row.get::<_, String>(2)?)?,
        expires_at: parse_ts(&row.get::<_, String>(3)?)?,
        rotated_at: parse_ts_opt(row.get(4)?)?,
    })
}

fn insert_refresh_token(tx: &rusqlite::Transaction<'_>, t: &RefreshTokenRow) -> StoreResult<()> {
    tx.prepare_cached(
        "INSERT INTO refresh_tokens (token_hash, session_id, created_at, expires_at, rotated_at)
         VALUES (?1, ?2, ?3, ?4, NULL)",
    )
    .and_then(|mut s| {
        s.execute(params![
            t.token_hash,
            t.session_id,
            ts(&t.created_at),
            ts(&t.expires_at)
        ])
    })
    .map_err(map_err)?;
    Ok(())
}
