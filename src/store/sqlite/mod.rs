//! SQLite through rusqlite: one writer connection behind a mutex (every write is a
//! `BEGIN IMMEDIATE` transaction, so writers queue in the process instead of spinning on
//! SQLite's lock), a small r2d2 pool of read connections, cached prepared statements, WAL and
//! `synchronous=NORMAL`. notes/SQLITE.md has the measurements behind each choice.

mod auth;
mod documents;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, ErrorCode, Transaction, TransactionBehavior};

use super::{Store, StoreError, StoreResult};

/// The migration history, applied in order; `PRAGMA user_version` records how many ran.
/// Files are embedded so the binary needs nothing beside it.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_foundation",
        include_str!("../../../migrations/sqlite/0001_foundation.sql"),
    ),
    (
        "0002_documents",
        include_str!("../../../migrations/sqlite/0002_documents.sql"),
    ),
];

pub struct SqliteStore {
    writer: Arc<Mutex<Connection>>,
    readers: r2d2::Pool<SqliteConnectionManager>,
    pub(crate) feed: Arc<super::ChangeFeed>,
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = NORMAL;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;
         PRAGMA cache_size = -16000;",
    )?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(())
}

impl SqliteStore {
    pub async fn open(path: &Path, read_pool_size: u32) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    anyhow::anyhow!("cannot create database directory {}: {e}", dir.display())
                })?;
            }
        }
        let path = path.to_path_buf();
        let writer = tokio::task::spawn_blocking({
            let path = path.clone();
            move || -> anyhow::Result<Connection> {
                let mut conn = Connection::open(&path)?;
                configure(&conn)?;
                migrate(&mut conn)?;
                Ok(conn)
            }
        })
        .await??;
        let manager = SqliteConnectionManager::file(&path).with_init(|c| {
            configure(c)?;
            c.execute_batch("PRAGMA query_only = ON;")
        });
        let readers = r2d2::Pool::builder()
            .max_size(read_pool_size.max(1))
            .min_idle(Some(1))
            .build(manager)?;
        Ok(SqliteStore {
            writer: Arc::new(Mutex::new(writer)),
            readers,
            feed: Arc::new(super::ChangeFeed::default()),
        })
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction on the writer connection, off the async
    /// threads; commits when `f` returns `Ok`, rolls back otherwise.
    pub(crate) async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> StoreResult<T> + Send + 'static,
    {
        self.write_then(f, |_| {}).await
    }

    /// Like [`SqliteStore::write`], then runs `after_commit` while the writer lock is still
    /// held, so whatever it does happens in commit order.
    pub(crate) async fn write_then<T, F, A>(&self, f: F, after_commit: A) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> StoreResult<T> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        let writer = self.writer.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = writer
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(map_err)?;
            let value = f(&tx)?;
            tx.commit().map_err(map_err)?;
            after_commit(&value);
            Ok(value)
        })
        .await
        .map_err(StoreError::internal)?
    }

    /// Runs `f` on a pooled read connection, off the async threads.
    pub(crate) async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        let pool = self.readers.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool
                .get()
                .map_err(|e| StoreError::Unavailable(anyhow::anyhow!(e)))?;
            f(&conn)
        })
        .await
        .map_err(StoreError::internal)?
    }
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (index, (name, sql)) in MIGRATIONS.iter().enumerate() {
        let number = index as i64 + 1;
        if number <= applied {
            continue;
        }
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute_batch(sql)
            .map_err(|e| anyhow::anyhow!("migration {name} failed: {e}"))?;
        tx.pragma_update(None, "user_version", number)?;
        tx.commit()?;
        tracing::info!(migration = name, "applied SQLite migration");
    }
    Ok(())
}

/// Maps rusqlite errors onto the store's: unique violations name the column that clashed.
pub(crate) fn map_err(err: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(failure, message) = &err {
        match failure.code {
            ErrorCode::ConstraintViolation => {
                let message = message.clone().unwrap_or_default();
                if let Some(cols) = message.strip_prefix("UNIQUE constraint failed: ") {
                    let what = cols
                        .split(", ")
                        .map(|c| c.rsplit('.').next().unwrap_or(c))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return StoreError::AlreadyExists(what);
                }
                return StoreError::Conflict(message);
            }
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked | ErrorCode::CannotOpen => {
                return StoreError::Unavailable(err.into())
            }
            _ => {}
        }
    }
    StoreError::internal(err)
}

/// Times are stored as fixed-width RFC 3339 text (microseconds, `Z`) so text order is time
/// order.
pub(crate) fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn parse_ts(s: &str) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
}

pub(crate) fn parse_ts_opt(s: Option<String>) -> rusqlite::Result<Option<DateTime<Utc>>> {
    s.as_deref().map(parse_ts).transpose()
}

#[async_trait]
impl Store for SqliteStore {
    fn dialect(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(map_err))
            .await
    }
}
