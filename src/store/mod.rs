//! Persistence. The dialect-neutral [`Store`] trait is the only way the domain modules reach
//! the database; [`sqlite::SqliteStore`] (rusqlite: one writer connection, a read pool, cached
//! statements) and [`postgres::PgStore`] (sqlx) implement it. SQL lives only below this module,
//! always with bound parameters.
//!
//! The trait is split by domain ([`AuthStore`], [`DocumentStore`]) so each area's SQL sits in
//! its own file per dialect; [`Store`] is the sum that the application holds as
//! `Arc<dyn Store>`.

pub mod docsql;
pub mod events;
pub mod postgres;
pub mod sqlite;
pub mod storage;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;

pub use events::{
    document_topic, user_json, Actor, CommitHook, ConsumerRow, Event, EventOp, EventSnapshot,
    EventStore, NewEvent, USERS_TOPIC,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A unique constraint was violated; the text names what already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Conflict(String),
    /// An optimistic-concurrency precondition failed (`If-Match`, `if_version`).
    #[error("version mismatch")]
    VersionMismatch { expected: i64, actual: Option<i64> },
    /// The database refused a value it cannot store (e.g. PostgreSQL and U+0000 in text).
    #[error("{0}")]
    InvalidInput(String),
    /// The database cannot be reached (connection refused, pool exhausted, disk gone).
    #[error("database unavailable")]
    Unavailable(#[source] anyhow::Error),
    #[error("database error")]
    Internal(#[source] anyhow::Error),
    /// A planned write's own check refused it (see [`Decide`]).
    #[error("write rejected: {0}")]
    Rejected(Rejection),
}

pub type StoreResult<T> = Result<T, StoreError>;

impl StoreError {
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        StoreError::Internal(err.into())
    }
}

/// Opens the store named by a database URL: `postgres://` / `postgresql://` selects
/// PostgreSQL, `sqlite://PATH` (or a bare path) SQLite. Migrations are applied before it is
/// returned.
pub async fn open(url: &str, read_pool_size: u32) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = postgres::PgStore::connect(url).await?;
        Ok(Arc::new(store))
    } else {
        let path = url.strip_prefix("sqlite://").unwrap_or(url);
        let store = sqlite::SqliteStore::open(std::path::Path::new(path), read_pool_size).await?;
        Ok(Arc::new(store))
    }
}

// ---------------------------------------------------------------------------------------------
// Rows shared by both dialects.

#[derive(Debug, Clone)]
pub struct UserRow {
    pub id: String,
    pub email: Option<String>,
    pub password_hash: Option<String>,
    pub email_verified: bool,
    pub is_anonymous: bool,
    pub data: Value,
    pub claims: Value,
    pub providers: Value,
    pub mfa_enabled: bool,
    pub disabled: bool,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_sign_in_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct SessionRow {
    pub id: String,
    pub user_id: String,
    pub created_at: DateTime<Utc>,
    pub refreshed_at: DateTime<Utc>,
    pub user_agent: Option<String>,
    pub ip: Option<String>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct RefreshTokenRow {
    /// SHA-256 of the opaque token, hex; the token itself is never stored.
    pub token_hash: String,
    pub session_id: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Set when the token was exchanged for its successor.
    pub rotated_at: Option<DateTime<Utc>>,
}

/// What happened when a refresh token was presented for rotation. `user` is the session's
/// user as read under the lock that orders the rotation against an admin's disable, so an
/// access token built from it carries what was true when the rotation was decided.
#[derive(Debug)]
pub enum Rotation {
    /// The token was live; it is now rotated and `new` is stored.
    Rotated { user: UserRow },
    /// The token had already been rotated (at `rotated_at`); nothing was written.
    AlreadyRotated {
        rotated_at: DateTime<Utc>,
        user: UserRow,
    },
    /// No such token, or its session is revoked.
    Unknown,
    /// The session's user is disabled; nothing was written.
    UserDisabled,
}

/// The columns a user write changes; `None` leaves a column as it is. Writes name only what
/// they change so that two writers of different columns (a user editing `data`, an admin
/// setting `disabled`) can never undo each other.
#[derive(Debug, Clone, Default)]
pub struct UserPatch {
    pub email: Option<String>,
    /// With a new `email` that differs from the stored one, set `email_verified` to false
    /// (unless `email_verified` is given too).
    pub unverify_changed_email: bool,
    pub email_verified: Option<bool>,
    pub password_hash: Option<String>,
    pub is_anonymous: Option<bool>,
    pub providers: Option<Value>,
    pub data: Option<Value>,
    pub claims: Option<Value>,
    pub disabled: Option<bool>,
}

/// What a user write (or the start of a session) requires of the stored row, checked in the
/// same statement that writes it.
#[derive(Debug, Clone, Default)]
pub struct UserGuard {
    /// Refuse when the account is disabled.
    pub enabled: bool,
    /// Refuse unless the stored password hash is exactly this (`Some(None)`: no password), so
    /// a write decided on a verified password cannot land after that password was changed.
    pub password_hash: Option<Option<String>>,
}

/// Which of the user's sessions a user write revokes, in its transaction.
#[derive(Debug, Clone, Default)]
pub enum RevokeSessions {
    #[default]
    None,
    All,
    /// Every session but this one (the caller's own).
    AllExcept(String),
}

/// The outcome of a guarded user write: done, or why nothing was written.
#[derive(Debug)]
pub enum Guarded<T> {
    Done(T),
    /// There is no such user (any more).
    Gone,
    /// `UserGuard::enabled` and the account is disabled.
    Disabled,
    /// `UserGuard::password_hash` and the stored hash is another.
    PasswordChanged,
}

impl UserGuard {
    /// Why a guarded write found no row to change, given the stored `(disabled,
    /// password_hash)` (read after the write matched nothing).
    pub fn refusal<T>(&self, stored: Option<(bool, Option<String>)>) -> Guarded<T> {
        match stored {
            None => Guarded::Gone,
            Some((true, _)) if self.enabled => Guarded::Disabled,
            Some(_) => Guarded::PasswordChanged,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SigningKeyRow {
    pub kid: String,
    pub algorithm: String,
    /// PKCS#8 DER of the private key. Never leaves the server.
    pub private_key: Vec<u8>,
    /// Raw public key bytes (32 bytes for Ed25519).
    pub public_key: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub retired_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct AdminRow {
    pub id: String,
    pub email: String,
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct ServiceKeyRow {
    pub id: String,
    pub name: String,
    /// SHA-256 of the secret, hex.
    pub key_hash: String,
    /// The first characters of the secret, shown in lists so a key can be recognised.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone)]
pub struct AuditRow {
    pub seq: i64,
    pub time: DateTime<Utc>,
    pub actor_type: String,
    pub actor_id: String,
    pub action: String,
    pub target: Option<String>,
    pub details: Value,
}

#[derive(Debug, Clone)]
pub struct NewAudit {
    pub actor_type: String,
    pub actor_id: String,
    pub action: String,
    pub target: Option<String>,
    pub details: Value,
}

/// A page position for user lists: users are listed newest first.
#[derive(Debug, Clone)]
pub struct UserCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

#[async_trait]
pub trait AuthStore: Send + Sync {
    // --- signing keys
    async fn insert_signing_key(&self, key: &SigningKeyRow) -> StoreResult<()>;
    /// All keys, newest first, retired ones included.
    async fn signing_keys(&self) -> StoreResult<Vec<SigningKeyRow>>;
    /// Marks every key but `keep_kid` retired at `at` (those not retired already).
    async fn retire_signing_keys_except(
        &self,
        keep_kid: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()>;

    // --- users
    /// Fails with `AlreadyExists("email")` when the email is taken. Appends a `create` event
    /// on `auth/users`.
    async fn insert_user(&self, user: &UserRow, actor: &Actor) -> StoreResult<()>;
    async fn user_by_id(&self, id: &str) -> StoreResult<Option<UserRow>>;
    async fn user_by_email(&self, email: &str) -> StoreResult<Option<UserRow>>;
    /// Sets the columns `patch` names (and `updated_at`) if the row passes `guard`, and
    /// revokes the sessions `revoke` names, in one transaction; answers the row as written.
    /// `AlreadyExists("email")` on a taken email. Appends an `update` event on `auth/users`.
    async fn update_user(
        &self,
        id: &str,
        patch: &UserPatch,
        guard: &UserGuard,
        revoke: &RevokeSessions,
        at: DateTime<Utc>,
        actor: &Actor,
    ) -> StoreResult<Guarded<UserRow>>;
    /// Deletes the user with its sessions and refresh tokens, appending a `delete` event.
    /// `false` if there was none.
    async fn delete_user(&self, id: &str, actor: &Actor) -> StoreResult<bool>;
    async fn list_users(
        &self,
        search: Option<&str>,
        after: Option<&UserCursor>,
        limit: u32,
    ) -> StoreResult<Vec<UserRow>>;

    // --- sessions and refresh tokens
    /// Starts a session: sets the user's `last_sign_in_at` to the session's `created_at` if
    /// the user passes `guard`, then creates the session and its first refresh token, all in
    /// one transaction that an admin's disable (which revokes every session in its own
    /// transaction) is serialised with. Answers the user as written.
    async fn start_session(
        &self,
        session: &SessionRow,
        token: &RefreshTokenRow,
        guard: &UserGuard,
    ) -> StoreResult<Guarded<UserRow>>;
    /// The user's live (not revoked) sessions, newest first.
    async fn list_sessions(&self, user_id: &str) -> StoreResult<Vec<SessionRow>>;
    /// Revokes one session; `false` when it was not the user's or already revoked.
    async fn revoke_session(
        &self,
        user_id: &str,
        session_id: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Revokes all of a user's sessions; returns how many were live.
    async fn revoke_user_sessions(&self, user_id: &str, at: DateTime<Utc>) -> StoreResult<u64>;
    async fn refresh_token(&self, token_hash: &str) -> StoreResult<Option<RefreshTokenRow>>;
    /// Atomically marks `old_hash` rotated and stores `new` — only if `old_hash` is live, its
    /// session is not revoked and its user not disabled. Concurrent callers with the same
    /// token: exactly one gets `Rotated`, the others `AlreadyRotated`.
    async fn rotate_refresh_token(
        &self,
        old_hash: &str,
        new: &RefreshTokenRow,
        at: DateTime<Utc>,
    ) -> StoreResult<Rotation>;

    // --- admins
    async fn insert_admin(&self, admin: &AdminRow) -> StoreResult<()>;
    async fn admin_by_email(&self, email: &str) -> StoreResult<Option<AdminRow>>;
    async fn admin_by_id(&self, id: &str) -> StoreResult<Option<AdminRow>>;
    async fn count_admins(&self) -> StoreResult<i64>;
    /// The first admin: in one transaction, consumes the meta entry `token_key` if its value
    /// is `token_digest`, and inserts `admin` if there is no admin yet. `false` (and nothing
    /// written) when the token was not there or an admin exists, so a failed insert never
    /// burns the token and two racing requests make exactly one admin.
    async fn insert_first_admin(
        &self,
        token_key: &str,
        token_digest: &str,
        admin: &AdminRow,
    ) -> StoreResult<bool>;

    // --- service keys
    async fn insert_service_key(&self, key: &ServiceKeyRow) -> StoreResult<()>;
    async fn service_key_by_hash(&self, key_hash: &str) -> StoreResult<Option<ServiceKeyRow>>;
    async fn list_service_keys(&self) -> StoreResult<Vec<ServiceKeyRow>>;
    async fn delete_service_key(&self, id: &str) -> StoreResult<bool>;

    // --- audit log
    async fn append_audit(&self, entry: &NewAudit) -> StoreResult<()>;
    /// Newest first, entries with `seq < before` when given.
    async fn list_audit(&self, before: Option<i64>, limit: u32) -> StoreResult<Vec<AuditRow>>;

    // --- small server-wide values (setup token hash, refresh-token derivation secret)
    async fn meta_get(&self, key: &str) -> StoreResult<Option<String>>;
    /// Sets `key` only if it is absent; returns the value now stored (ours or the winner's).
    async fn meta_put_if_absent(&self, key: &str, value: &str) -> StoreResult<String>;
    async fn meta_delete(&self, key: &str) -> StoreResult<bool>;
}

/// A stored document (API.md § Documents).
#[derive(Debug, Clone, PartialEq)]
pub struct DocumentRow {
    pub collection: String,
    pub id: String,
    pub data: Value,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct CollectionRow {
    pub name: String,
    /// `{read?, create?, update?, delete?}` rule sources.
    pub rules: Value,
    /// The declared indexes as given (`[{fields: [[field, dir]], unique?}]`).
    pub indexes: Value,
    pub schema: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A declared index, ready for SQL: every key passed `docsql::is_index_safe_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexSpec {
    pub fields: Vec<(Vec<String>, bool)>,
    pub unique: bool,
}

/// What a write does once it has seen the current document.
#[derive(Debug, Clone)]
pub enum WriteDecision {
    /// Store this `data` (creating or replacing; the version grows by one).
    Put(Value),
    Delete,
}

/// Why a planned write refused to go ahead: an error of the caller's own type, handed back
/// unchanged through [`StoreError::Rejected`].
pub type Rejection = Box<dyn std::error::Error + Send + Sync>;

/// Other documents a write's rules read (`get()`/`exists()`), fetched by the store inside
/// the write's own transaction: by `(collection, id)`, the API form of the document
/// ([`document_json`]) or `None` when it does not exist. The same shape as
/// `rules::Fetched`.
pub type Fetched = std::collections::HashMap<(String, String), Option<Value>>;

/// What a write's check answers once it has seen the current document.
#[derive(Debug, Clone)]
pub enum Decision {
    Write(WriteDecision),
    /// The check needs these documents first: the store reads them on the transaction's own
    /// connection (so they include the batch's earlier writes, and no second pooled
    /// connection is awaited while this one is held), adds them to the [`Fetched`] map, and
    /// asks again.
    Needs(Vec<(String, String)>),
}

/// How many times one write's check may ask for more documents before the store gives up.
pub const MAX_DECIDE_ROUNDS: usize = 16;

/// Decides a write from the current document (read inside the write transaction, so nothing
/// can change between the check and the write), the transaction's time, and the other
/// documents fetched for it so far. May be called several times (see [`Decision::Needs`]).
pub type Decide = Box<
    dyn FnMut(Option<&DocumentRow>, DateTime<Utc>, &Fetched) -> Result<Decision, Rejection> + Send,
>;

/// Runs one write's [`Decide`] to a decision, collecting the documents it asks for. Each
/// dialect drives it with its own (sync or async) read on the write transaction:
/// `loop { match l.step(..)? { Ok(d) => break d, Err(keys) => for k in keys { l.supply(k, read(k)?) } } }`.
#[derive(Default)]
pub(crate) struct DecideLoop {
    fetched: Fetched,
    rounds: usize,
}

impl DecideLoop {
    /// The decision, or the documents to [`DecideLoop::supply`] before calling again.
    pub(crate) fn step(
        &mut self,
        decide: &mut Decide,
        current: Option<&DocumentRow>,
        now: DateTime<Utc>,
    ) -> StoreResult<Result<WriteDecision, Vec<(String, String)>>> {
        match decide(current, now, &self.fetched).map_err(StoreError::Rejected)? {
            Decision::Write(decision) => Ok(Ok(decision)),
            Decision::Needs(keys) => {
                self.rounds += 1;
                let keys: Vec<_> = keys
                    .into_iter()
                    .filter(|k| !self.fetched.contains_key(k))
                    .collect();
                if keys.is_empty() || self.rounds > MAX_DECIDE_ROUNDS {
                    return Err(StoreError::internal(anyhow::anyhow!(
                        "a write's check kept asking for documents"
                    )));
                }
                Ok(Err(keys))
            }
        }
    }

    pub(crate) fn supply(&mut self, key: (String, String), doc: Option<&DocumentRow>) {
        self.fetched.insert(key, doc.map(document_json));
    }
}

pub struct PlannedWrite {
    pub collection: String,
    pub id: String,
    pub decide: Decide,
}

#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub collection: String,
    pub id: String,
    pub op: EventOp,
    /// The version the write gave the document (a delete counts as one more).
    pub version: i64,
    /// The document after the write; `None` after a delete.
    pub document: Option<DocumentRow>,
    /// The write's position in the change stream.
    pub position: i64,
}

/// What a document scan reads: the collection, a filter (the caller has already combined the
/// request's `where` with any rule filter), an order ending in `$id`, a start position.
pub struct Scan<'a> {
    pub collection: &'a str,
    pub filter: Option<&'a crate::query::Filter>,
    pub order: &'a [crate::query::Order],
    pub after: Option<&'a crate::query::Cursor>,
    pub limit: u32,
    /// Paths with a declared index, so their SQL matches the index expression.
    pub indexed: &'a [Vec<String>],
    /// The first field of each declared index, in declaration order (index `n` is named
    /// `index_prefix(collection) + n`).
    pub leading: &'a [Vec<String>],
    /// How many fields each declared index has, in declaration order.
    pub index_widths: &'a [usize],
}

/// Sums for `_aggregate`: the number of documents and, per requested path, the sum and count
/// of its numeric values.
#[derive(Debug, Clone, Default)]
pub struct NumericAggregates {
    pub count: u64,
    pub sums: Vec<(f64, u64)>,
}

/// A `LIKE` pattern matching `needle` anywhere, with `\` escaping the wildcards in it (used
/// with `ESCAPE '\'`).
pub fn contains_pattern(needle: &str) -> String {
    let escaped = needle
        .replace('\\', "\\\\")
        .replace('%', "\\%")
        .replace('_', "\\_");
    format!("%{escaped}%")
}

/// The API form of a document (`{id, data, version, created_at, updated_at}`), as the change
/// log keeps it.
pub fn document_json(d: &DocumentRow) -> Value {
    serde_json::json!({
        "id": d.id,
        "data": d.data,
        "version": d.version,
        "created_at": d.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "updated_at": d.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}

/// The prefix of a collection's SQL index names. It derives from a hash of the collection
/// name, so one collection's prefix can never match another's.
pub fn index_prefix(collection: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "docidx_{}_",
        &hex::encode(Sha256::digest(collection.as_bytes()))[..16]
    )
}

/// What a decided write does to the `documents` table.
pub(crate) enum RowWrite {
    Insert(DocumentRow),
    Update(DocumentRow),
    /// Delete the row with this key.
    Delete,
}

/// A decided document write: the row to write and the event to append with it.
pub(crate) struct PlannedRow {
    pub write: RowWrite,
    pub event: NewEvent,
    pub version: i64,
}

/// Turns a write's decision on the current document into the row to write and its
/// change-stream event. Shared by both dialects, which only execute it.
pub(crate) fn plan_row_write(
    collection: &str,
    id: &str,
    decision: WriteDecision,
    current: Option<&DocumentRow>,
    now: DateTime<Utc>,
    actor: &Actor,
) -> StoreResult<PlannedRow> {
    let (write, op, version) = match (decision, current) {
        (WriteDecision::Put(data), Some(cur)) => {
            let doc = DocumentRow {
                collection: collection.to_string(),
                id: id.to_string(),
                data,
                version: cur.version + 1,
                created_at: cur.created_at,
                updated_at: now,
            };
            (RowWrite::Update(doc), EventOp::Update, cur.version + 1)
        }
        (WriteDecision::Put(data), None) => {
            let doc = DocumentRow {
                collection: collection.to_string(),
                id: id.to_string(),
                data,
                version: 1,
                created_at: now,
                updated_at: now,
            };
            (RowWrite::Insert(doc), EventOp::Create, 1)
        }
        (WriteDecision::Delete, Some(cur)) => (RowWrite::Delete, EventOp::Delete, cur.version + 1),
        (WriteDecision::Delete, None) => return Err(StoreError::NotFound),
    };
    let data = match &write {
        RowWrite::Insert(d) | RowWrite::Update(d) => Some(document_json(d)),
        RowWrite::Delete => None,
    };
    Ok(PlannedRow {
        write,
        event: NewEvent {
            topic: document_topic(collection),
            key: id.to_string(),
            op,
            actor: actor.clone(),
            data,
            old_data: current.map(document_json),
        },
        version,
    })
}

impl RowWrite {
    pub(crate) fn into_document(self) -> Option<DocumentRow> {
        match self {
            RowWrite::Insert(d) | RowWrite::Update(d) => Some(d),
            RowWrite::Delete => None,
        }
    }
}

/// Documents, collections and the change log (API.md § Documents). Implemented per dialect in
/// `sqlite/documents.rs` and `postgres/documents.rs`.
#[async_trait]
pub trait DocumentStore: Send + Sync {
    async fn collection(&self, name: &str) -> StoreResult<Option<CollectionRow>>;
    async fn list_collections(&self) -> StoreResult<Vec<CollectionRow>>;
    /// Creates or replaces the collection and makes its SQL indexes exactly `indexes`. A
    /// unique index that existing documents violate fails with `Conflict`.
    async fn put_collection(&self, row: &CollectionRow, indexes: &[IndexSpec]) -> StoreResult<()>;
    /// Deletes the collection, its documents and its indexes, appending a `delete` event for
    /// each document. `false` if there was none.
    async fn delete_collection(&self, name: &str, actor: &Actor) -> StoreResult<bool>;

    async fn get_document(&self, collection: &str, id: &str) -> StoreResult<Option<DocumentRow>>;
    /// Applies the writes in one transaction, in order, all or nothing. Each write's `decide`
    /// sees the current document under the transaction's lock. A unique-index violation is
    /// `AlreadyExists`; a `decide` refusal is `Rejected` with the caller's error. Every write
    /// appends its event (by `actor`) in the same transaction.
    async fn apply_writes(
        &self,
        writes: Vec<PlannedWrite>,
        actor: &Actor,
    ) -> StoreResult<Vec<WriteOutcome>>;
    async fn scan_documents(&self, scan: &Scan<'_>) -> StoreResult<Vec<DocumentRow>>;
    async fn count_documents(&self, scan: &Scan<'_>) -> StoreResult<u64>;
    /// Count and numeric sums over the documents a scan's filter matches (order and limit
    /// are ignored).
    async fn aggregate_numbers(
        &self,
        scan: &Scan<'_>,
        paths: &[Vec<String>],
    ) -> StoreResult<NumericAggregates>;

    /// Periodic upkeep of the query planner's statistics (SQLite's `PRAGMA optimize`;
    /// PostgreSQL's autovacuum does this by itself).
    async fn optimize(&self) -> StoreResult<()>;
}

#[async_trait]
pub trait Store: AuthStore + DocumentStore + EventStore + storage::StorageStore {
    /// `sqlite` or `postgres`.
    fn dialect(&self) -> &'static str;
    /// A cheap round trip, for `/ready`.
    async fn ping(&self) -> StoreResult<()>;
}
