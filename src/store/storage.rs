//! Storage metadata (API.md § Storage): buckets, objects, blobs waiting for removal, and
//! resumable (tus) uploads with their parts. The
//! SQL is written once, with `$n` placeholders numbered in order of appearance, which both
//! SQLite and PostgreSQL read; each dialect only binds its own types. The one statement only
//! PostgreSQL needs is the per-object lock ([`LOCK_OBJECT_PG`]): SQLite has one writer.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::{Actor, EventOp, NewEvent, StoreResult};

#[derive(Debug, Clone, PartialEq)]
pub struct BucketRow {
    pub name: String,
    pub public: bool,
    pub max_object_size: Option<i64>,
    /// A JSON array of content-type patterns (`image/*`); empty allows every type.
    pub allowed_content_types: Value,
    /// `{read?, write?, delete?}` rule sources.
    pub rules: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ObjectRow {
    pub bucket: String,
    pub path: String,
    /// The backend key of the bytes; never shown to clients.
    pub blob: String,
    pub size: i64,
    pub content_type: String,
    pub etag: String,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// The API form of an object (`{bucket, path, size, content_type, etag, metadata,
/// created_at, updated_at}`), as answers and the change stream carry it.
pub fn object_json(o: &ObjectRow) -> Value {
    json!({
        "bucket": o.bucket,
        "path": o.path,
        "size": o.size,
        "content_type": o.content_type,
        "etag": o.etag,
        "metadata": o.metadata,
        "created_at": o.created_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "updated_at": o.updated_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
}

/// The change-stream topic of a bucket's objects.
pub fn storage_topic(bucket: &str) -> String {
    format!("storage/{bucket}")
}

/// Which stored version a write was decided on: the write goes ahead only if the object is
/// still that version (so the rule that allowed it saw what it replaces).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there.
    Any,
    /// No object at the path.
    Absent,
    /// The version stored in this blob.
    Blob(String),
}

impl Expect {
    pub fn of(current: Option<&ObjectRow>) -> Expect {
        match current {
            Some(o) => Expect::Blob(o.blob.clone()),
            None => Expect::Absent,
        }
    }

    pub(crate) fn holds(&self, current: Option<&ObjectRow>) -> bool {
        match (self, current) {
            (Expect::Any, _) | (Expect::Absent, None) => true,
            (Expect::Blob(b), Some(o)) => &o.blob == b,
            _ => false,
        }
    }
}

/// What an object write did.
#[derive(Debug, Clone)]
pub enum ObjectWrite {
    /// Written (or deleted); `previous` is what it replaced, `position` the event's.
    Done {
        row: Box<ObjectRow>,
        previous: Option<Box<ObjectRow>>,
        position: i64,
    },
    /// The object is no longer the version the write expected; nothing was written.
    Changed,
    /// (Deletes) there is no such object.
    Missing,
}

/// A resumable (tus) upload in progress.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadRow {
    pub id: String,
    pub bucket: String,
    pub path: String,
    /// `kind:id` of the caller who created it.
    pub owner: String,
    pub length: i64,
    /// The bytes received so far (the sum of the parts' sizes).
    pub offset: i64,
    pub content_type: String,
    pub metadata: Value,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The bytes one PATCH brought: `size` bytes from `start` of the upload, in `blob`.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadPart {
    pub upload_id: String,
    pub start: i64,
    pub size: i64,
    pub blob: String,
}

#[async_trait]
pub trait StorageStore: Send + Sync {
    async fn bucket(&self, name: &str) -> StoreResult<Option<BucketRow>>;
    async fn list_buckets(&self) -> StoreResult<Vec<BucketRow>>;
    /// Creates or replaces the bucket's settings (`created_at` is kept on replace).
    async fn put_bucket(&self, row: &BucketRow) -> StoreResult<BucketRow>;
    /// Deletes the bucket and its objects (a `delete` event each; their blobs go to the
    /// trash, due after `grace`). `false` if there was none.
    async fn delete_bucket(
        &self,
        name: &str,
        actor: &Actor,
        grace: chrono::Duration,
    ) -> StoreResult<bool>;

    async fn object(&self, bucket: &str, path: &str) -> StoreResult<Option<ObjectRow>>;
    /// Objects of `bucket` with `lower <= path`, `path > after`, and `path < upper` when
    /// given, in path order (bytewise).
    async fn list_objects(
        &self,
        bucket: &str,
        lower: &str,
        after: &str,
        upper: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<ObjectRow>>;

    /// Puts `blob` in the trash, due at `due`: called before an upload starts writing it.
    async fn trash_blob(&self, blob: &str, due: DateTime<Utc>) -> StoreResult<()>;
    /// Points `row.path` at `row.blob` if the stored object is still `expect`: takes the new
    /// blob out of the trash, puts the replaced one in (due after `grace`), and appends a
    /// `create`/`update` event, in one transaction. `created_at` is kept from the replaced
    /// version; both times are the transaction's.
    async fn commit_object(
        &self,
        row: ObjectRow,
        expect: Expect,
        grace: chrono::Duration,
        actor: &Actor,
    ) -> StoreResult<ObjectWrite>;
    /// Deletes the object if it is still `expect`, trashing its blob and appending a
    /// `delete` event.
    async fn delete_object(
        &self,
        bucket: &str,
        path: &str,
        expect: Expect,
        grace: chrono::Duration,
        actor: &Actor,
    ) -> StoreResult<ObjectWrite>;
    /// Blobs whose removal is due at `now`, oldest first.
    async fn due_blobs(&self, now: DateTime<Utc>, limit: u32) -> StoreResult<Vec<String>>;
    /// Forgets trash entries whose blobs were removed from the backend.
    async fn forget_blobs(&self, blobs: &[String]) -> StoreResult<()>;
    /// Makes the trash entries whose blob keys start with `prefix` due at `due` (when due
    /// later): the cached transforms of a blob being removed go with it. Answers how many.
    async fn hasten_blobs(&self, prefix: &str, due: DateTime<Utc>) -> StoreResult<u64>;

    async fn create_upload(&self, row: &UploadRow) -> StoreResult<()>;
    async fn upload(&self, id: &str) -> StoreResult<Option<UploadRow>>;
    /// The upload's parts in offset order.
    async fn upload_parts(&self, id: &str) -> StoreResult<Vec<UploadPart>>;
    /// Records `part` and moves the upload's offset to its end, if the offset is still
    /// `part.start` and the upload has not expired at `now` (compare-and-set: of two PATCHes
    /// at one offset, one wins). `false`: nothing was recorded.
    async fn append_upload_part(&self, part: &UploadPart, now: DateTime<Utc>) -> StoreResult<bool>;
    /// Deletes the upload and its part rows, putting the parts' blobs in the trash due at
    /// `due`; answers those blobs, or `None` when there was no such upload.
    async fn delete_upload(&self, id: &str, due: DateTime<Utc>)
        -> StoreResult<Option<Vec<String>>>;
    /// Forgets uploads expired at `now` (their parts' blobs are already in the trash, due
    /// at the expiry). Answers how many.
    async fn delete_expired_uploads(&self, now: DateTime<Utc>) -> StoreResult<u64>;
}

pub(crate) const BUCKET_COLUMNS: &str =
    "name, public, max_object_size, allowed_content_types, rules, created_at, updated_at";
pub(crate) const OBJECT_COLUMNS: &str =
    "bucket, path, blob, size, content_type, etag, metadata, created_at, updated_at";

pub(crate) fn select_bucket() -> String {
    format!("SELECT {BUCKET_COLUMNS} FROM buckets WHERE name = $1")
}

pub(crate) fn list_buckets() -> String {
    format!("SELECT {BUCKET_COLUMNS} FROM buckets ORDER BY name")
}

pub(crate) fn upsert_bucket() -> String {
    format!(
        "INSERT INTO buckets ({BUCKET_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (name) DO UPDATE SET public = excluded.public,
             max_object_size = excluded.max_object_size,
             allowed_content_types = excluded.allowed_content_types,
             rules = excluded.rules, updated_at = excluded.updated_at
         RETURNING {BUCKET_COLUMNS}"
    )
}

pub(crate) const DELETE_BUCKET: &str = "DELETE FROM buckets WHERE name = $1";

pub(crate) fn select_object() -> String {
    format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND path = $2")
}

pub(crate) fn bucket_objects() -> String {
    format!("SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 ORDER BY path")
}

pub(crate) const DELETE_BUCKET_OBJECTS: &str = "DELETE FROM objects WHERE bucket = $1";

pub(crate) fn list_objects() -> String {
    format!(
        "SELECT {OBJECT_COLUMNS} FROM objects
         WHERE bucket = $1 AND path >= $2 AND path > $3 AND ($4 IS NULL OR path < $4)
         ORDER BY path LIMIT $5"
    )
}

pub(crate) fn upsert_object() -> String {
    format!(
        "INSERT INTO objects ({OBJECT_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (bucket, path) DO UPDATE SET blob = excluded.blob, size = excluded.size,
             content_type = excluded.content_type, etag = excluded.etag,
             metadata = excluded.metadata, updated_at = excluded.updated_at"
    )
}

pub(crate) const DELETE_OBJECT: &str = "DELETE FROM objects WHERE bucket = $1 AND path = $2";

/// PostgreSQL: serialises writes of one object (a transaction-scoped lock on a hash of
/// `bucket/path`; bucket names contain no `/`), so the row each write replaces is the one
/// it read.
pub(crate) const LOCK_OBJECT_PG: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

pub(crate) const TRASH_BLOB: &str = "INSERT INTO blob_trash (blob, due_at) VALUES ($1, $2)
     ON CONFLICT (blob) DO UPDATE SET due_at = excluded.due_at";
pub(crate) const UNTRASH_BLOB: &str = "DELETE FROM blob_trash WHERE blob = $1";
pub(crate) const DUE_BLOBS: &str =
    "SELECT blob FROM blob_trash WHERE due_at <= $1 ORDER BY due_at LIMIT $2";

/// `substr` rather than `LIKE` (whose `_` is a wildcard, and which SQLite compares without
/// case) or a range (which PostgreSQL compares in the database's collation). Bound as
/// (due, prefix).
pub(crate) const HASTEN_BLOBS: &str = "UPDATE blob_trash SET due_at = $1
     WHERE due_at > $1 AND substr(blob, 1, length($2)) = $2";
pub(crate) const UPLOAD_COLUMNS: &str = "id, bucket, path, owner, upload_length, upload_offset, \
     content_type, metadata, created_at, expires_at";

pub(crate) fn insert_upload() -> String {
    format!(
        "INSERT INTO uploads ({UPLOAD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
    )
}

pub(crate) fn select_upload() -> String {
    format!("SELECT {UPLOAD_COLUMNS} FROM uploads WHERE id = $1")
}

pub(crate) const SELECT_UPLOAD_PARTS: &str = "SELECT upload_id, start_offset, size, blob
     FROM upload_parts WHERE upload_id = $1 ORDER BY start_offset";
pub(crate) const ADVANCE_UPLOAD: &str = "UPDATE uploads SET upload_offset = $1
     WHERE id = $2 AND upload_offset = $3 AND expires_at > $4";
pub(crate) const INSERT_UPLOAD_PART: &str =
    "INSERT INTO upload_parts (upload_id, start_offset, size, blob) VALUES ($1, $2, $3, $4)";
pub(crate) const DELETE_UPLOAD_PARTS: &str = "DELETE FROM upload_parts WHERE upload_id = $1";
pub(crate) const DELETE_UPLOAD: &str = "DELETE FROM uploads WHERE id = $1";
pub(crate) const DELETE_EXPIRED_UPLOAD_PARTS: &str = "DELETE FROM upload_parts
     WHERE upload_id IN (SELECT id FROM uploads WHERE expires_at <= $1)";
pub(crate) const DELETE_EXPIRED_UPLOADS: &str = "DELETE FROM uploads WHERE expires_at <= $1";

/// The event of an object write: `create`/`update` with the object after, or `delete`.
pub(crate) fn object_event(
    op: EventOp,
    row: &ObjectRow,
    previous: Option<&ObjectRow>,
    actor: &Actor,
) -> NewEvent {
    NewEvent {
        topic: storage_topic(&row.bucket),
        key: row.path.clone(),
        op,
        actor: actor.clone(),
        data: (op != EventOp::Delete).then(|| object_json(row)),
        old_data: previous.map(object_json),
    }
}

/// The row a commit writes, given the one it replaces: `created_at` survives a replace.
pub(crate) fn committed_row(
    mut row: ObjectRow,
    previous: Option<&ObjectRow>,
    now: DateTime<Utc>,
) -> (ObjectRow, EventOp) {
    row.updated_at = now;
    match previous {
        Some(p) => {
            row.created_at = p.created_at;
            (row, EventOp::Update)
        }
        None => {
            row.created_at = now;
            (row, EventOp::Create)
        }
    }
}
