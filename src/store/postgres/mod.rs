//! PostgreSQL through sqlx: a connection pool, runtime queries with `$N` parameters, and the
//! migrations in `migrations/postgres` embedded by `sqlx::migrate!`.

mod auth;
mod documents;
mod events;
mod storage;

use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use super::{Store, StoreError, StoreResult};

pub struct PgStore {
    pub(crate) pool: PgPool,
    /// One connection of its own for [`Store::ping`]: a node whose pool is busy serving
    /// requests is still ready, and a readiness probe that waited for the busy pool answered
    /// 503 under load (so a balancer would take away the nodes doing the most work).
    ping_pool: PgPool,
    /// The connections that `LISTEN` (change announcements, realtime messages between
    /// nodes) and the one that sends realtime messages, outside `pool`: each is held for the
    /// node's life or busy in bursts, and taken from the pool they would shrink what requests
    /// can use.
    pub(crate) listen_pool: PgPool,
    pub(crate) hooks: super::events::CommitHooks,
}

impl PgStore {
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let options: PgConnectOptions = url
            .parse::<PgConnectOptions>()
            .map_err(|e| anyhow::anyhow!("invalid database.url: {e}"))?
            // Statement logs would print every query at INFO; the request log is enough.
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_millis(500));
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(options.clone())
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL: {e}"))?;
        let ping_pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(3))
            .idle_timeout(Duration::from_secs(300))
            .connect_lazy_with(options.clone());
        let listen_pool = PgPoolOptions::new()
            .max_connections(3)
            .min_connections(0)
            .acquire_timeout(Duration::from_secs(5))
            .connect_lazy_with(options);
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| anyhow::anyhow!("PostgreSQL migrations failed: {e}"))?;
        Ok(PgStore {
            pool,
            ping_pool,
            listen_pool,
            hooks: super::events::CommitHooks::default(),
        })
    }
}

/// Maps sqlx errors onto the store's: unique violations name the column that clashed
/// (taken from the constraint name `<table>_<column>_key`).
pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::Database(db) => {
            if db.is_unique_violation() {
                let what = db
                    .constraint()
                    .map(|c| {
                        let c = c.strip_suffix("_key").unwrap_or(c);
                        match db.table() {
                            Some(t) => c.strip_prefix(&format!("{t}_")).unwrap_or(c).to_string(),
                            None => c.to_string(),
                        }
                    })
                    .unwrap_or_else(|| "record".into());
                return StoreError::AlreadyExists(what);
            }
            // Class 22 is "data exception": a value the column cannot hold (U+0000 in text,
            // an out-of-range number). The request was at fault, not the server.
            if db.code().is_some_and(|c| c.starts_with("22")) {
                // PostgreSQL's message quotes the value, which may be computed from stored
                // data (an aggregate's sum): log it, answer without it.
                tracing::debug!(message = db.message(), "data exception");
                return StoreError::InvalidInput(
                    "a value is out of range or cannot be stored".to_string(),
                );
            }
            if db.is_foreign_key_violation() || db.is_check_violation() {
                return StoreError::Conflict(db.message().to_string());
            }
            StoreError::internal(err)
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            StoreError::Unavailable(err.into())
        }
        sqlx::Error::RowNotFound => StoreError::NotFound,
        _ => StoreError::internal(err),
    }
}

#[async_trait]
impl Store for PgStore {
    fn dialect(&self) -> &'static str {
        "postgres"
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.ping_pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }
}
