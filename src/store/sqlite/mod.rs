//! SQLite through rusqlite: one writer connection owned by a writer thread, a small r2d2 pool
//! of read connections, cached prepared statements, WAL and `synchronous=NORMAL`.
//! notes/SQLITE.md has the measurements behind each choice.
//!
//! Writes queue to the writer thread, which commits them in groups: it takes every write
//! waiting (up to [`MAX_GROUP`]), runs each inside its own `SAVEPOINT` of one
//! `BEGIN IMMEDIATE` transaction (a write that fails rolls back alone), commits once, then
//! answers each. Under load one commit carries many writes; alone, a write commits at once.
//! The queue is bounded ([`QUEUE_CAPACITY`]): past it, writers wait for room instead of
//! piling up memory. A write that panics is rolled back to its savepoint and answers an
//! error; the thread carries on with the rest of the group. Should the thread end anyway,
//! [`Store::ping`] says so, and `/ready` answers 503.
//! Point reads run on the calling thread when a pooled connection is free at once (no thread
//! hand-off, the fastest path measured), else on the blocking pool.

mod auth;
mod documents;
mod events;
mod storage;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use r2d2_sqlite::SqliteConnectionManager;
use rusqlite::{Connection, ErrorCode, Transaction, TransactionBehavior};
use tokio::sync::mpsc;

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
    (
        "0003_events",
        include_str!("../../../migrations/sqlite/0003_events.sql"),
    ),
    (
        "0004_storage",
        include_str!("../../../migrations/sqlite/0004_storage.sql"),
    ),
    (
        "0005_uploads",
        include_str!("../../../migrations/sqlite/0005_uploads.sql"),
    ),
];

/// The longest a read on the pool may run before it is stopped (answered 400).
const READ_TIME_LIMIT: Duration = Duration::from_secs(5);

thread_local! {
    /// When the read running on this thread must stop (checked by the read connections'
    /// progress handler); `None` outside `SqliteStore::read`.
    static READ_DEADLINE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// The most writes one group commit carries.
const MAX_GROUP: usize = 128;

/// The most writes that may wait for the writer thread. A burst beyond it makes callers wait
/// for room (each waiting caller is one parked task, not a queued closure with its data);
/// 1024 is eight full groups, far more than the thread drains between two commits.
const QUEUE_CAPACITY: usize = 1024;

/// What a write does once the group's fate is known (`Ok`: committed).
type Finish = Box<dyn FnOnce(Result<(), String>) + Send>;

/// A write waiting for the writer thread: run inside a savepoint of the group's transaction,
/// it returns what to do once the group's fate is known.
type WriteJob = Box<dyn FnOnce(&Transaction<'_>) -> Finish + Send>;

pub struct SqliteStore {
    writer: mpsc::Sender<WriteJob>,
    /// False once the writer thread has ended, however it ended.
    writer_alive: Arc<AtomicBool>,
    readers: r2d2::Pool<SqliteConnectionManager>,
    pub(crate) hooks: Arc<super::events::CommitHooks>,
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
            // Stops a read that runs past its deadline (see `read`): one costly query must
            // not hold a pooled connection, and the requests queued behind it, for minutes.
            c.progress_handler(
                10_000,
                Some(|| READ_DEADLINE.with(|d| d.get().is_some_and(|t| Instant::now() > t))),
            );
            c.execute_batch("PRAGMA query_only = ON;")
        });
        let readers = r2d2::Pool::builder()
            .max_size(read_pool_size.max(1))
            .min_idle(Some(1))
            .build(manager)?;
        let (jobs, queue) = mpsc::channel::<WriteJob>(QUEUE_CAPACITY);
        let writer_alive = Arc::new(AtomicBool::new(true));
        let alive = WriterAlive(writer_alive.clone());
        std::thread::Builder::new()
            .name("basalt-sqlite-writer".into())
            .spawn(move || writer_loop(writer, queue, alive))?;
        Ok(SqliteStore {
            writer: jobs,
            writer_alive,
            readers,
            hooks: Arc::new(super::events::CommitHooks::default()),
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
                    // A panic is caught here, where the savepoint is known to be open, so
                    // exactly this write's changes are undone and the group goes on.
                    let result = catch_unwind(AssertUnwindSafe(|| f(txn))).unwrap_or_else(|_| {
                        Err(StoreError::Internal(anyhow::anyhow!(
                            "the write panicked; its changes were rolled back"
                        )))
                    });
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
                        // The write is committed whatever `after_commit` does; a panic in it
                        // must not turn that into an error for the caller.
                        if catch_unwind(AssertUnwindSafe(|| after_commit(&value))).is_err() {
                            tracing::error!("a SQLite write's after-commit step panicked");
                        }
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
        if self.writer.send(job).await.is_err() {
            return Err(self.writer_stopped());
        }
        match rx.await {
            Ok(answer) => answer,
            // The job was dropped unanswered: either the thread is gone, or the group it was
            // in could not be run at all (the thread logged why).
            Err(_) if self.writer_alive.load(Ordering::Acquire) => Err(StoreError::Internal(
                anyhow::anyhow!("the SQLite writer abandoned the write"),
            )),
            Err(_) => Err(self.writer_stopped()),
        }
    }

    fn writer_stopped(&self) -> StoreError {
        StoreError::Unavailable(anyhow::anyhow!("the SQLite writer has stopped"))
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
            READ_DEADLINE.with(|d| d.set(Some(Instant::now() + READ_TIME_LIMIT)));
            let result = f(&conn);
            READ_DEADLINE.with(|d| d.set(None));
            result
        })
        .await
        .map_err(StoreError::internal)?
    }
}

/// Marks the writer thread as gone when dropped: on a normal end and while unwinding alike.
struct WriterAlive(Arc<AtomicBool>);

impl Drop for WriterAlive {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!("the SQLite writer thread died; writes fail until a restart");
        }
    }
}

/// The writer thread: waits for a write, gathers those queued behind it, runs them in one
/// transaction, commits, answers. Ends when the store (every sender) is dropped.
fn writer_loop(mut conn: Connection, mut queue: mpsc::Receiver<WriteJob>, alive: WriterAlive) {
    let _alive = alive;
    while let Some(first) = queue.blocking_recv() {
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
        let mut finishers = Vec::with_capacity(group.len());
        let mut broken = false;
        for job in group {
            if broken {
                // Dropped unanswered: its caller hears the write did not happen.
                continue;
            }
            // Jobs catch panics in their own work; one escaping here came from outside the
            // savepoint, so nothing is known about the transaction: the group is given up.
            match catch_unwind(AssertUnwindSafe(|| job(&txn))) {
                Ok(finish) => finishers.push(finish),
                Err(_) => {
                    tracing::error!(
                        "a SQLite write job panicked outside its savepoint; rolling back its group"
                    );
                    broken = true;
                }
            }
        }
        let committed = if broken {
            drop(txn);
            Err("the group was rolled back after a panic".to_string())
        } else {
            txn.commit().map_err(|e| e.to_string())
        };
        if let Err(e) = &committed {
            tracing::error!(error = %e, "SQLite commit failed");
        }
        for finish in finishers {
            if catch_unwind(AssertUnwindSafe(|| finish(committed.clone()))).is_err() {
                tracing::error!("answering a SQLite write panicked");
            }
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
            ErrorCode::OperationInterrupted => {
                return StoreError::InvalidInput(format!(
                    "the query ran longer than {} s and was stopped; narrow its where, or \
                     declare an index on the fields it filters",
                    READ_TIME_LIMIT.as_secs()
                ))
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
        if !self.writer_alive.load(Ordering::Acquire) {
            return Err(self.writer_stopped());
        }
        self.read(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(map_err))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_read_past_its_time_limit_is_stopped_and_the_connection_serves_on() {
        let (_dir, store) = store().await;
        let started = Instant::now();
        let endless = store
            .read(|c| {
                c.query_row(
                    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n)
                     SELECT count(*) FROM n",
                    [],
                    |r| r.get::<_, i64>(0),
                )
                .map_err(map_err)
            })
            .await;
        assert!(
            matches!(&endless, Err(StoreError::InvalidInput(m)) if m.contains("longer than")),
            "{endless:?}"
        );
        assert!(started.elapsed() < READ_TIME_LIMIT * 3);
        // Every pooled connection still answers (the deadline was cleared).
        for _ in 0..4 {
            let one = store
                .read(|c| {
                    c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))
                        .map_err(map_err)
                })
                .await
                .unwrap();
            assert_eq!(one, 1);
        }
    }

    async fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("w.db"), 2)
            .await
            .unwrap();
        store
            .write(|txn| {
                txn.execute_batch("CREATE TABLE marks (name TEXT PRIMARY KEY)")
                    .map_err(map_err)
            })
            .await
            .unwrap();
        (dir, store)
    }

    async fn mark(store: &SqliteStore, name: &'static str) -> StoreResult<()> {
        store
            .write(move |txn| {
                txn.execute("INSERT INTO marks (name) VALUES (?1)", [name])
                    .map(|_| ())
                    .map_err(map_err)
            })
            .await
    }

    async fn marks(store: &SqliteStore) -> Vec<String> {
        store
            .read(|c| {
                let mut stmt = c
                    .prepare("SELECT name FROM marks ORDER BY name")
                    .map_err(map_err)?;
                let rows = stmt.query_map([], |r| r.get(0)).map_err(map_err)?;
                rows.collect::<rusqlite::Result<Vec<String>>>()
                    .map_err(map_err)
            })
            .await
            .unwrap()
    }

    /// Holds the writer thread until the returned sender fires, so the writes queued
    /// meanwhile are run as one group.
    fn hold_writer(store: &Arc<SqliteStore>) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel::<()>();
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(move |_| {
                    let _ = held.recv();
                    Ok(())
                })
                .await
        });
        release
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_write_is_rolled_back_alone_and_the_writer_carries_on() {
        let (_dir, store) = store().await;
        let store = Arc::new(store);
        let release = hold_writer(&store);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let before = tokio::spawn({
            let store = store.clone();
            async move { mark(&store, "before").await }
        });
        let panicking = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .write(|txn| -> StoreResult<()> {
                        txn.execute("INSERT INTO marks (name) VALUES ('half-done')", [])
                            .map_err(map_err)?;
                        panic!("a bug in a write");
                    })
                    .await
            }
        });
        let after = tokio::spawn({
            let store = store.clone();
            async move { mark(&store, "after").await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.send(()).unwrap();

        let err = panicking.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Internal(_)), "{err:?}");
        before.await.unwrap().unwrap();
        after.await.unwrap().unwrap();
        // Later writes still go through, and the panicking write left nothing behind.
        mark(&store, "later").await.unwrap();
        assert_eq!(marks(&store).await, ["after", "before", "later"]);
        store.ping().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_after_commit_still_answers_the_committed_write() {
        let (_dir, store) = store().await;
        store
            .write_then(
                |txn| {
                    txn.execute("INSERT INTO marks (name) VALUES ('kept')", [])
                        .map(|_| ())
                        .map_err(map_err)
                },
                |_| panic!("a bug after commit"),
            )
            .await
            .unwrap();
        mark(&store, "next").await.unwrap();
        assert_eq!(marks(&store).await, ["kept", "next"]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_makes_writers_wait_instead_of_growing() {
        let (_dir, store) = store().await;
        let store = Arc::new(store);
        let release = hold_writer(&store);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let extra = 50;
        let writers: Vec<_> = (0..QUEUE_CAPACITY + extra)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.write(|_| Ok(())).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.writer.capacity(), 0, "the queue is full");
        let waiting = writers.iter().filter(|w| !w.is_finished()).count();
        assert_eq!(waiting, QUEUE_CAPACITY + extra, "no write finished early");
        release.send(()).unwrap();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ping_fails_once_the_writer_thread_has_ended() {
        let (_dir, mut store) = store().await;
        store.ping().await.unwrap();
        // Replacing the only sender ends the thread's loop, as its death would.
        let (orphan, _) = mpsc::channel::<WriteJob>(1);
        store.writer = orphan;
        for _ in 0..100 {
            if !store.writer_alive.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(matches!(
            store.ping().await,
            Err(StoreError::Unavailable(_))
        ));
        assert!(matches!(
            mark(&store, "too late").await,
            Err(StoreError::Unavailable(_))
        ));
    }
}
