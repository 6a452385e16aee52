//! SQLite through rusqlite: one writer connection owned by a writer thread, a small r2d2 pool
//! of read connections, cached prepared statements, WAL and `synchronous=NORMAL`.
//! notes/SQLITE.md has the measurements behind each choice.
//!
//! Writes queue to the writer thread, which commits them in groups: it takes every write
//! waiting (up to [`MAX_GROUP`]), runs each inside its own `SAVEPOINT` of one
//! `BEGIN IMMEDIATE` transaction (a write that fails rolls back alone), commits once, then
//! answers each. Under load one commit carries many writes; alone, a write commits at once.
//! Point reads run on the calling thread when a pooled connection is free at once (no thread
//! hand-off, the fastest path measured), else on the blocking pool.

mod auth;
mod documents;

use std::path::Path;
use std::sync::{mpsc, Arc};
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

/// The most writes one group commit carries.
const MAX_GROUP: usize = 128;

/// A write waiting for the writer thread: run inside a savepoint of the group's transaction,
/// it returns what to do once the group's fate is known (`true`: committed).
type WriteJob =
    Box<dyn FnOnce(&Transaction<'_>) -> Box<dyn FnOnce(Result<(), String>) + Send> + Send>;

pub struct SqliteStore {
    writer: mpsc::Sender<WriteJob>,
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
        let (jobs, queue) = mpsc::channel::<WriteJob>();
        std::thread::Builder::new()
            .name("basalt-sqlite-writer".into())
            .spawn(move || writer_loop(writer, queue))?;
        Ok(SqliteStore {
            writer: jobs,
            readers,
            feed: Arc::new(super::ChangeFeed::default()),
        })
    }

    /// Runs `f` as one write of a group-committed transaction on the writer thread: it
    /// takes effect when `f` returns `Ok` and the group commits; an `Err` rolls back `f`'s
    /// changes only.
    pub(crate) async fn write<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> StoreResult<T> + Send + 'static,
    {
        self.write_then(f, |_| {}).await
    }

    /// Like [`SqliteStore::write`], then runs `after_commit` on the writer thread before the
    /// next group starts, so whatever it does happens in commit order.
    pub(crate) async fn write_then<T, F, A>(&self, f: F, after_commit: A) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> StoreResult<T> + Send + 'static,
        A: FnOnce(&T) + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel::<StoreResult<T>>();
        let job: WriteJob = Box::new(move |txn: &Transaction<'_>| {
            let outcome = match txn.execute_batch("SAVEPOINT write") {
                Err(e) => Err(map_err(e)),
                Ok(()) => {
                    let result = f(txn);
                    let closed = if result.is_ok() {
                        txn.execute_batch("RELEASE write")
                    } else {
                        txn.execute_batch("ROLLBACK TO write; RELEASE write")
                    };
                    match closed {
                        Ok(()) => result,
                        Err(e) => Err(map_err(e)),
                    }
                }
            };
            Box::new(move |committed: Result<(), String>| {
                let answer = match (outcome, committed) {
                    (Ok(value), Ok(())) => {
                        after_commit(&value);
                        Ok(value)
                    }
                    (Ok(_), Err(e)) => {
                        Err(StoreError::Internal(anyhow::anyhow!("commit failed: {e}")))
                    }
                    (Err(e), _) => Err(e),
                };
                let _ = tx.send(answer);
            })
        });
        self.writer.send(job).map_err(|_| {
            StoreError::Unavailable(anyhow::anyhow!("the SQLite writer has stopped"))
        })?;
        rx.await.map_err(|_| {
            StoreError::Unavailable(anyhow::anyhow!("the SQLite writer has stopped"))
        })?
    }

    /// Runs a short read (a lookup by key) on the calling thread when a pooled connection is
    /// free right now, else like [`SqliteStore::read`].
    pub(crate) async fn read_point<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        match self.readers.try_get() {
            Some(conn) => f(&conn),
            None => self.read(f).await,
        }
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

/// The writer thread: waits for a write, gathers those queued behind it, runs them in one
/// transaction, commits, answers. Ends when the store (every sender) is dropped.
fn writer_loop(mut conn: Connection, queue: mpsc::Receiver<WriteJob>) {
    while let Ok(first) = queue.recv() {
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match queue.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        let txn = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
            Ok(txn) => txn,
            Err(e) => {
                // Dropping the jobs drops their answer channels: each caller is told the
                // write did not happen.
                tracing::error!(error = %e, "cannot begin a SQLite write transaction");
                drop(group);
                continue;
            }
        };
        let finishers: Vec<_> = group.into_iter().map(|job| job(&txn)).collect();
        let committed = txn.commit().map_err(|e| e.to_string());
        if let Err(e) = &committed {
            tracing::error!(error = %e, "SQLite commit failed");
        }
        for finish in finishers {
            finish(committed.clone());
        }
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
