//! File storage (API.md § Storage): buckets with rules, objects whose metadata lives in the
//! database and whose bytes live in a backend ([`backend::ObjectStore`]: local disk or S3).
//!
//! An upload streams into a *new* blob (listed in the trash until it is committed, so a
//! crash leaves nothing behind for good), then one transaction points the path at it,
//! appends the change-stream event and trashes the blob it replaced. So a failed upload is
//! never visible, concurrent uploads to one path end with exactly one of them (the last to
//! commit), and a download already reading the old bytes gets `storage.replaced_grace_secs`
//! to finish.
//!
//! Rules: a bucket's `read`, `write` and `delete` are CEL, evaluated through the documents'
//! one rule path ([`DocumentService::rule_allows`]) with `resource` the stored object
//! `{path, size, content_type, metadata, …}` (null when there is none) and `request`
//! `{method, time, path, size, content_type}`. A missing rule denies users; admins and
//! service keys pass; `public` lets anyone read. A read or delete is decided before anything
//! about the object is told: a caller the rule refuses gets 403 whether or not it exists.

pub mod backend;
pub mod local;
pub mod paths;
pub mod s3;
pub mod signing;
pub mod transform;
pub mod tus;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::auth::Caller;
use crate::config::{Config, StorageBackend, StorageConfig};
use crate::documents::cursor::CursorSeal;
use crate::documents::{check_name, compile_rule, DocumentService, RuleSession};
use crate::error::{ApiError, ApiResult};
use crate::rules::Rule;
use crate::store::storage::{object_json, BucketRow, Expect, ObjectRow, ObjectWrite};
use crate::store::Store;
pub use backend::{BlobError, ByteStream, Meter, Metered, ObjectStore};
use signing::{SignatureError, UrlSigner};

/// Opens the configured backend: local disk under `<data_dir>/storage` (the default) or S3.
pub async fn open_backend(config: &Config) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match config.storage.backend {
        StorageBackend::Local => Ok(Arc::new(
            local::LocalStore::open(&config.data_dir.join("storage")).await?,
        )),
        StorageBackend::S3 => Ok(Arc::new(s3::open(&config.storage.s3).await?)),
    }
}

/// How long a bucket's compiled settings are reused before the database is asked again
/// (another node may have changed them); this node's own changes apply at once.
const BUCKET_CACHE_TTL: Duration = Duration::from_secs(2);
/// How long an upload may take before its unfinished blob counts as abandoned.
const ABANDONED_UPLOAD: chrono::TimeDelta = chrono::TimeDelta::days(1);
/// How long an image transform waits for its turn before answering 503.
const TRANSFORM_QUEUE_WAIT: Duration = Duration::from_secs(30);
/// How often a write re-decides when the object changed under it before giving up.
const WRITE_ATTEMPTS: usize = 20;
/// The most objects a listing examines per request (rows the read rule hides count too).
const LIST_SCAN_BUDGET: usize = 5000;
pub const MAX_LIST_LIMIT: u32 = 1000;
/// User metadata per object, as JSON text.
pub const MAX_METADATA_BYTES: usize = 4096;

const SIGNING_SECRET_META: &str = "storage_signing_secret";
const CURSOR_SECRET_META: &str = "storage_cursor_secret";

/// `PUT /v1/admin/buckets/{name}`.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketSpec {
    /// Anyone may read (download and list) without a rule.
    #[serde(default)]
    pub public: bool,
    /// Bytes; at most `storage.max_object_size` (the default when absent).
    #[serde(default)]
    pub max_object_size: Option<u64>,
    /// `image/png`, `image/*`, `*/*`; empty or absent allows every type.
    #[serde(default)]
    pub allowed_content_types: Vec<String>,
    #[serde(default)]
    pub rules: BucketRules,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketRules {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delete: Option<String>,
}

/// A bucket as the admin API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct BucketView {
    pub name: String,
    pub public: bool,
    pub max_object_size: u64,
    pub allowed_content_types: Vec<String>,
    pub rules: BucketRules,
    pub created_at: String,
    pub updated_at: String,
}

/// A bucket with its rules compiled.
pub struct Bucket {
    pub row: BucketRow,
    pub max_object_size: u64,
    pub allowed_content_types: Vec<String>,
    rules: BucketRules,
    read: Option<Rule>,
    write: Option<Rule>,
    delete: Option<Rule>,
}

impl Bucket {
    fn compile(row: BucketRow, global_max: u64) -> ApiResult<Bucket> {
        let rules: BucketRules = serde_json::from_value(row.rules.clone()).unwrap_or_default();
        let allowed_content_types: Vec<String> =
            serde_json::from_value(row.allowed_content_types.clone()).unwrap_or_default();
        Ok(Bucket {
            max_object_size: row
                .max_object_size
                .map_or(global_max, |m| (m.max(0) as u64).min(global_max)),
            read: compile_rule("read", &rules.read)?,
            write: compile_rule("write", &rules.write)?,
            delete: compile_rule("delete", &rules.delete)?,
            allowed_content_types,
            rules,
            row,
        })
    }

    pub fn view(&self) -> BucketView {
        let ts = |t: &chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        BucketView {
            name: self.row.name.clone(),
            public: self.row.public,
            max_object_size: self.max_object_size,
            allowed_content_types: self.allowed_content_types.clone(),
            rules: self.rules.clone(),
            created_at: ts(&self.row.created_at),
            updated_at: ts(&self.row.updated_at),
        }
    }
}

/// An object as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ObjectView {
    pub bucket: String,
    pub path: String,
    pub size: i64,
    pub content_type: String,
    pub etag: String,
    #[schema(value_type = Object)]
    pub metadata: Value,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&ObjectRow> for ObjectView {
    fn from(o: &ObjectRow) -> Self {
        let ts = |t: &chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        ObjectView {
            bucket: o.bucket.clone(),
            path: o.path.clone(),
            size: o.size,
            content_type: o.content_type.clone(),
            etag: o.etag.clone(),
            metadata: o.metadata.clone(),
            created_at: ts(&o.created_at),
            updated_at: ts(&o.updated_at),
        }
    }
}

/// An upload as the HTTP layer hands it over.
pub struct Upload {
    pub bucket: String,
    pub path: String,
    /// The `Content-Type` given (`None`: `application/octet-stream`).
    pub content_type: Option<String>,
    /// The length announced (`Content-Length`), when there was one.
    pub declared_size: Option<u64>,
    pub metadata: Value,
    pub body: ByteStream,
}

/// A write decided as far as it can be before its bytes arrive ([`StorageService::check_write`]).
struct WriteTarget {
    bucket: Arc<Bucket>,
    path: String,
    content_type: String,
    metadata: Value,
    /// What was stored at the path when the write was decided.
    current: Option<ObjectRow>,
}

/// Who is asking: a caller with a credential, or the holder of a signed URL for exactly
/// this method, bucket and path.
#[derive(Debug, Clone)]
pub enum Access {
    Caller(Caller),
    Signed,
}

/// `GET /v1/storage/{bucket}` answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Listing {
    pub objects: Vec<ObjectView>,
    pub prefixes: Vec<String>,
    pub next_cursor: Option<String>,
}

pub struct StorageService {
    store: Arc<dyn Store>,
    blobs: Arc<dyn ObjectStore>,
    documents: Arc<DocumentService>,
    config: StorageConfig,
    cache: Mutex<HashMap<String, (Instant, Arc<Bucket>)>>,
    signer: UrlSigner,
    cursors: CursorSeal,
    /// Image transforms decoding or encoding at once (`storage.transform.concurrency`).
    transforms: tokio::sync::Semaphore,
}

impl StorageService {
    pub async fn new(
        store: Arc<dyn Store>,
        blobs: Arc<dyn ObjectStore>,
        documents: Arc<DocumentService>,
        config: StorageConfig,
    ) -> anyhow::Result<StorageService> {
        let signing = store
            .meta_put_if_absent(SIGNING_SECRET_META, &crate::ids::new_secret(64))
            .await?;
        let cursor = store
            .meta_put_if_absent(CURSOR_SECRET_META, &crate::ids::new_secret(64))
            .await?;
        Ok(StorageService {
            store,
            blobs,
            documents,
            cache: Mutex::new(HashMap::new()),
            signer: UrlSigner::new(signing.as_bytes()),
            cursors: CursorSeal::new(cursor.as_bytes())?,
            transforms: tokio::sync::Semaphore::new(match config.transform.concurrency {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            }),
            config,
        })
    }

    pub fn backend(&self) -> &Arc<dyn ObjectStore> {
        &self.blobs
    }

    fn grace(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::seconds(self.config.replaced_grace_secs.min(i64::MAX as u64) as i64)
    }

    // ------------------------------------------------------------------ buckets (admin)

    pub async fn put_bucket(&self, name: &str, spec: BucketSpec) -> ApiResult<BucketView> {
        check_name("bucket", name)?;
        if spec.max_object_size == Some(0) {
            return Err(ApiError::invalid_with(
                "max_object_size must be positive",
                json!({"field": "max_object_size"}),
            ));
        }
        if let Some(max) = spec.max_object_size {
            if max > self.config.max_object_size {
                return Err(ApiError::invalid_with(
                    format!(
                        "max_object_size may be at most {} (storage.max_object_size)",
                        self.config.max_object_size
                    ),
                    json!({"field": "max_object_size"}),
                ));
            }
        }
        if spec.allowed_content_types.len() > 100 {
            return Err(ApiError::invalid_with(
                "at most 100 allowed_content_types",
                json!({"field": "allowed_content_types"}),
            ));
        }
        for p in &spec.allowed_content_types {
            if !paths::valid_type_pattern(p) {
                return Err(ApiError::invalid_with(
                    format!("{p:?} is not a content type pattern (image/png, image/*, */*)"),
                    json!({"field": "allowed_content_types"}),
                ));
            }
        }
        let now = Utc::now();
        let row = BucketRow {
            name: name.to_string(),
            public: spec.public,
            max_object_size: spec.max_object_size.map(|m| m as i64),
            allowed_content_types: json!(spec
                .allowed_content_types
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect::<Vec<_>>()),
            rules: serde_json::to_value(&spec.rules).map_err(ApiError::internal)?,
            created_at: now,
            updated_at: now,
        };
        // Compile first: a rule that does not compile is refused before anything is stored.
        Bucket::compile(row.clone(), self.config.max_object_size)?;
        let stored = self.store.put_bucket(&row).await?;
        let bucket = Arc::new(Bucket::compile(stored, self.config.max_object_size)?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (Instant::now(), bucket.clone()));
        Ok(bucket.view())
    }

    pub async fn list_buckets(&self) -> ApiResult<Vec<BucketView>> {
        self.store
            .list_buckets()
            .await?
            .into_iter()
            .map(|r| Bucket::compile(r, self.config.max_object_size).map(|b| b.view()))
            .collect()
    }

    pub async fn delete_bucket(&self, name: &str, caller: &Caller) -> ApiResult<()> {
        check_name("bucket", name)?;
        let deleted = self
            .store
            .delete_bucket(name, &caller.actor(), self.grace())
            .await?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if !deleted {
            return Err(ApiError::NotFound(format!("bucket `{name}` not found")));
        }
        Ok(())
    }

    /// The bucket, from the cache when fresh.
    pub async fn bucket(&self, name: &str) -> ApiResult<Arc<Bucket>> {
        check_name("bucket", name)?;
        if let Some((at, b)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            if at.elapsed() < BUCKET_CACHE_TTL {
                return Ok(b.clone());
            }
        }
        let row = self
            .store
            .bucket(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("bucket `{name}` not found")))?;
        let bucket = Arc::new(Bucket::compile(row, self.config.max_object_size)?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (Instant::now(), bucket.clone()));
        Ok(bucket)
    }

    // ------------------------------------------------------------------ rules

    /// Whether `rule` lets `access` do `method` on `path` with `current` stored there.
    #[allow(clippy::too_many_arguments)]
    async fn allows(
        &self,
        access: &Access,
        rule: &Option<Rule>,
        method: &str,
        path: &str,
        current: Option<&ObjectRow>,
        size: Option<u64>,
        content_type: Option<&str>,
        session: &mut RuleSession,
    ) -> bool {
        let caller = match access {
            Access::Signed => return true,
            Access::Caller(c) => c,
        };
        let mut extra = Map::new();
        extra.insert("path".into(), json!(path));
        extra.insert("size".into(), json!(size));
        extra.insert("content_type".into(), json!(content_type));
        self.documents
            .rule_allows(
                rule,
                caller,
                method,
                current.map(object_json),
                &extra,
                session,
            )
            .await
    }

    async fn may_read(
        &self,
        access: &Access,
        bucket: &Bucket,
        object: Option<&ObjectRow>,
        path: &str,
        session: &mut RuleSession,
    ) -> bool {
        bucket.row.public
            || self
                .allows(
                    access,
                    &bucket.read,
                    "GET",
                    path,
                    object,
                    object.map(|o| o.size.max(0) as u64),
                    object.map(|o| o.content_type.as_str()),
                    session,
                )
                .await
    }

    // ------------------------------------------------------------------ objects

    /// The object to download, once the read rule allows it (403 before anything is said
    /// about whether it exists).
    pub async fn object(&self, access: &Access, bucket: &str, path: &str) -> ApiResult<ObjectRow> {
        let bucket = self.bucket(bucket).await?;
        paths::check_path(path)?;
        let object = self.store.object(&bucket.row.name, path).await?;
        if !self
            .may_read(
                access,
                &bucket,
                object.as_ref(),
                path,
                &mut RuleSession::new(),
            )
            .await
        {
            return Err(ApiError::PermissionDenied(
                "the bucket's read rule denies this".into(),
            ));
        }
        object.ok_or_else(|| ApiError::NotFound("no such object".into()))
    }

    /// The bytes of `object` (or of `range`). A blob gone since the row was read (replaced
    /// and swept meanwhile) is a 404.
    pub async fn read(
        &self,
        object: &ObjectRow,
        range: Option<std::ops::Range<u64>>,
    ) -> ApiResult<ByteStream> {
        self.blobs
            .get(&object.blob, range)
            .await
            .map_err(|e| match e {
                BlobError::NotFound => ApiError::NotFound("no such object".into()),
                other => blob_error(other),
            })
    }

    /// The bytes of `transform` applied to `object` (whose read the caller has been allowed):
    /// the cached result, or made now and cached ([`transform`] has the bounds and the cache).
    pub async fn transformed(
        &self,
        object: &ObjectRow,
        transform: &transform::Transform,
    ) -> ApiResult<ByteStream> {
        let key = transform.cache_key(object);
        if let Some(cached) = self.cached_transform(&key).await {
            return Ok(cached);
        }
        let limits = &self.config.transform;
        if object.size.max(0) as u64 > limits.max_input_bytes {
            return Err(ApiError::PayloadTooLarge(format!(
                "transforms read originals of at most {} bytes (storage.transform.max_input_bytes)",
                limits.max_input_bytes
            )));
        }
        let _permit = tokio::time::timeout(TRANSFORM_QUEUE_WAIT, self.transforms.acquire())
            .await
            .map_err(|_| ApiError::Unavailable("too many image transforms at once; retry".into()))?
            .map_err(ApiError::internal)?;
        // Made by another request while this one waited?
        if let Some(cached) = self.cached_transform(&key).await {
            return Ok(cached);
        }
        let mut input = Vec::with_capacity(object.size.max(0) as usize);
        let mut body = self.read(object, None).await?;
        while let Some(chunk) = futures::StreamExt::next(&mut body).await {
            let chunk = chunk.map_err(|e| blob_error(BlobError::backend(e)))?;
            if (input.len() + chunk.len()) as u64 > limits.max_input_bytes {
                return Err(ApiError::PayloadTooLarge(format!(
                    "transforms read originals of at most {} bytes",
                    limits.max_input_bytes
                )));
            }
            input.extend_from_slice(&chunk);
        }
        let format = transform.output_format(object);
        let (job, job_limits) = (transform.clone(), limits.clone());
        let output = tokio::task::spawn_blocking(move || {
            transform::render(&input, &job, format, &job_limits)
        })
        .await
        .map_err(ApiError::internal)??;
        let output = bytes::Bytes::from(output);
        // Listed in the trash before it is written, so it is removed in time (and with its
        // original) even if this node stops right after.
        // (Capped at a century, so the date cannot overflow.)
        let ttl = limits.cache_ttl_secs.min(100 * 365 * 24 * 3600) as i64;
        let due = Utc::now() + chrono::TimeDelta::seconds(ttl);
        match self.store.trash_blob(&key, due).await {
            Err(err) => tracing::warn!(%key, error = %err, "could not list an image transform"),
            Ok(()) => {
                let once = futures::stream::once(std::future::ready(Ok(output.clone())));
                if let Err(err) = self.blobs.put(&key, Box::pin(once)).await {
                    tracing::warn!(%key, error = %err, "could not cache an image transform");
                }
            }
        }
        Ok(Box::pin(futures::stream::once(std::future::ready(Ok(
            output,
        )))))
    }

    async fn cached_transform(&self, key: &str) -> Option<ByteStream> {
        match self.blobs.get(key, None).await {
            Ok(stream) => Some(stream),
            Err(BlobError::NotFound) => None,
            Err(err) => {
                tracing::warn!(%key, error = %err, "could not read a cached image transform");
                None
            }
        }
    }

    /// Streams an upload into a new blob and commits it (see the module comment).
    pub async fn put(&self, access: &Access, upload: Upload) -> ApiResult<ObjectView> {
        let target = self
            .check_write(
                access,
                &upload.bucket,
                &upload.path,
                upload.content_type.as_deref(),
                upload.metadata,
                upload.declared_size,
            )
            .await?;
        let (blob, meter) = self
            .store_blob(&target.bucket, upload.body, upload.declared_size)
            .await?;
        self.commit(access, target, blob, meter).await
    }

    /// Decides what can be decided about a write before any byte is read: the path, type
    /// and metadata, the rule with the announced size (a write of unknown size is decided
    /// once its size is known, in [`StorageService::commit`]), then the bucket's limits.
    async fn check_write(
        &self,
        access: &Access,
        bucket: &str,
        path: &str,
        content_type: Option<&str>,
        metadata: Value,
        declared_size: Option<u64>,
    ) -> ApiResult<WriteTarget> {
        let bucket = self.bucket(bucket).await?;
        paths::check_path(path)?;
        let content_type = paths::content_type(content_type)?;
        let metadata = check_metadata(metadata)?;
        let current = self.store.object(&bucket.row.name, path).await?;
        if let Some(size) = declared_size {
            let mut session = RuleSession::new();
            if !self
                .allows(
                    access,
                    &bucket.write,
                    "PUT",
                    path,
                    current.as_ref(),
                    Some(size),
                    Some(&content_type),
                    &mut session,
                )
                .await
            {
                return Err(write_denied());
            }
        }
        if !paths::type_allowed(&content_type, &bucket.allowed_content_types) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "this bucket accepts {}",
                bucket.allowed_content_types.join(", ")
            )));
        }
        let limit = bucket.max_object_size;
        if declared_size.is_some_and(|s| s > limit) {
            return Err(too_large(limit));
        }
        Ok(WriteTarget {
            bucket,
            path: path.to_string(),
            content_type,
            metadata,
            current,
        })
    }

    /// Streams `body` into a new object blob of `bucket` (in the trash until it is
    /// committed), enforcing the bucket's size limit as it goes and, when one was announced,
    /// the exact size. Answers the blob and what the stream measured.
    async fn store_blob(
        &self,
        bucket: &Bucket,
        body: ByteStream,
        declared_size: Option<u64>,
    ) -> ApiResult<(String, Meter)> {
        let limit = bucket.max_object_size;
        let blob = backend::new_object_blob(&bucket.row.name);
        self.store
            .trash_blob(&blob, Utc::now() + ABANDONED_UPLOAD)
            .await?;
        let (metered, meter) = Metered::new(body, limit);
        let stored = self.blobs.put(&blob, metered.boxed()).await;
        let meter = meter.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(err) = stored {
            let _ = self.blobs.delete(&blob).await;
            if meter.too_large {
                return Err(too_large(limit));
            }
            return Err(blob_error(err));
        }
        if meter.sha256.is_none() {
            let _ = self.blobs.delete(&blob).await;
            return Err(ApiError::internal(anyhow::anyhow!(
                "upload ended without a digest"
            )));
        }
        if declared_size.is_some_and(|s| s != meter.size) {
            let _ = self.blobs.delete(&blob).await;
            return Err(ApiError::invalid(
                "the body is not as long as its Content-Length",
            ));
        }
        Ok((blob, meter))
    }

    /// Points `target.path` at the stored `blob`: the write rule is asked again with the
    /// size actually received, then one transaction switches the row, appends the event and
    /// trashes the replaced blob. A refused commit removes the blob.
    async fn commit(
        &self,
        access: &Access,
        target: WriteTarget,
        blob: String,
        meter: Meter,
    ) -> ApiResult<ObjectView> {
        let WriteTarget {
            bucket,
            path,
            content_type,
            metadata,
            mut current,
        } = target;
        let name = bucket.row.name.clone();
        let etag = meter
            .etag()
            .ok_or_else(|| ApiError::internal(anyhow::anyhow!("upload ended without a digest")))?;
        // Only a rule that looks at the stored object needs the write to land on the very
        // version it saw; otherwise the last upload to commit simply wins.
        let decided_on_current = match access {
            Access::Signed => false,
            Access::Caller(c) => {
                !c.is_privileged() && bucket.write.as_ref().is_some_and(|r| r.reads("resource"))
            }
        };
        let mut session = RuleSession::new();
        for _ in 0..WRITE_ATTEMPTS {
            if !self
                .allows(
                    access,
                    &bucket.write,
                    "PUT",
                    &path,
                    current.as_ref(),
                    Some(meter.size),
                    Some(&content_type),
                    &mut session,
                )
                .await
            {
                let _ = self.blobs.delete(&blob).await;
                return Err(write_denied());
            }
            let now = Utc::now();
            let row = ObjectRow {
                bucket: name.clone(),
                path: path.clone(),
                blob: blob.clone(),
                size: meter.size as i64,
                content_type: content_type.clone(),
                etag: etag.clone(),
                metadata: metadata.clone(),
                created_at: now,
                updated_at: now,
            };
            let actor = match access {
                Access::Caller(c) => c.actor(),
                Access::Signed => crate::store::Actor::system("signed-url"),
            };
            match self
                .store
                .commit_object(
                    row,
                    if decided_on_current {
                        Expect::of(current.as_ref())
                    } else {
                        Expect::Any
                    },
                    self.grace(),
                    &actor,
                )
                .await?
            {
                ObjectWrite::Done { row, .. } => return Ok(ObjectView::from(row.as_ref())),
                ObjectWrite::Changed | ObjectWrite::Missing => {
                    current = self.store.object(&name, &path).await?;
                }
            }
        }
        let _ = self.blobs.delete(&blob).await;
        Err(ApiError::Conflict(
            "the object kept changing while this upload was being committed; retry".into(),
        ))
    }

    /// Deletes an object (the delete rule decides before anything is said about it).
    pub async fn delete(&self, access: &Access, bucket: &str, path: &str) -> ApiResult<()> {
        let bucket = self.bucket(bucket).await?;
        paths::check_path(path)?;
        let actor = match access {
            Access::Caller(c) => c.actor(),
            Access::Signed => crate::store::Actor::system("signed-url"),
        };
        let mut session = RuleSession::new();
        for _ in 0..WRITE_ATTEMPTS {
            let current = self.store.object(&bucket.row.name, path).await?;
            if !self
                .allows(
                    access,
                    &bucket.delete,
                    "DELETE",
                    path,
                    current.as_ref(),
                    None,
                    None,
                    &mut session,
                )
                .await
            {
                return Err(ApiError::PermissionDenied(
                    "the bucket's delete rule denies this".into(),
                ));
            }
            let Some(current) = current else {
                return Err(ApiError::NotFound("no such object".into()));
            };
            match self
                .store
                .delete_object(
                    &bucket.row.name,
                    path,
                    Expect::Blob(current.blob.clone()),
                    self.grace(),
                    &actor,
                )
                .await?
            {
                ObjectWrite::Done { .. } => return Ok(()),
                ObjectWrite::Changed | ObjectWrite::Missing => continue,
            }
        }
        Err(ApiError::Conflict(
            "the object kept changing while it was being deleted; retry".into(),
        ))
    }

    /// Lists objects under `prefix`, folded at `delimiter` (only `/`), `limit` at a time.
    /// With a read rule, only objects the caller may read are listed, and a folder only
    /// when it holds one; the cursor is sealed, so it tells nothing about hidden objects.
    pub async fn list(
        &self,
        caller: &Caller,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> ApiResult<Listing> {
        let bucket = self.bucket(bucket).await?;
        paths::check_prefix(prefix)?;
        let folding = match delimiter {
            None | Some("") => false,
            Some("/") => true,
            Some(_) => {
                return Err(ApiError::invalid_with(
                    "delimiter may only be `/`",
                    json!({"field": "delimiter"}),
                ))
            }
        };
        let limit = limit.unwrap_or(100);
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(ApiError::invalid_with(
                format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
                json!({"field": "limit"}),
            ));
        }
        let access = Access::Caller(caller.clone());
        let scope = format!(
            "{}\u{0}{}\u{0}{}\u{0}{}",
            bucket.row.name,
            prefix,
            folding,
            caller.actor().id
        );
        let (mut lower, mut after) = match cursor {
            Some(c) => self.open_list_cursor(c, &scope)?,
            None => (prefix.to_string(), String::new()),
        };
        let upper = paths::prefix_end(prefix);
        let mut objects = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut examined = 0usize;
        let mut session = RuleSession::new();
        let batch = (limit as usize + 1).min(500) as u32;
        loop {
            let rows = self
                .store
                .list_objects(&bucket.row.name, &lower, &after, upper.as_deref(), batch)
                .await?;
            let exhausted = rows.len() < batch as usize;
            // Rows of a folder already listed, further on in this batch, are passed over.
            let mut skip_to: Option<String> = None;
            for row in rows {
                if let Some(s) = &skip_to {
                    if row.path.as_str() < s.as_str() {
                        continue;
                    }
                }
                examined += 1;
                after = row.path.clone();
                if !row.path.starts_with(prefix) {
                    continue;
                }
                let folder = folding
                    .then(|| {
                        row.path[prefix.len()..]
                            .find('/')
                            .map(|i| row.path[..prefix.len() + i + 1].to_string())
                    })
                    .flatten();
                if !self
                    .may_read(&access, &bucket, Some(&row), &row.path, &mut session)
                    .await
                {
                    if examined >= LIST_SCAN_BUDGET {
                        break;
                    }
                    continue;
                }
                match folder {
                    Some(f) => {
                        // Everything else in the folder is skipped: the next rows to read
                        // start past it.
                        let end = paths::prefix_end(&f).unwrap_or_else(|| f.clone());
                        lower = end.clone();
                        skip_to = Some(end);
                        after = String::new();
                        prefixes.push(f);
                    }
                    None => objects.push(ObjectView::from(&row)),
                }
                if objects.len() + prefixes.len() >= limit as usize || examined >= LIST_SCAN_BUDGET
                {
                    break;
                }
            }
            let full = objects.len() + prefixes.len() >= limit as usize;
            if full || examined >= LIST_SCAN_BUDGET {
                let next = self.seal_list_cursor(&scope, &lower, &after);
                return Ok(Listing {
                    objects,
                    prefixes,
                    next_cursor: Some(next),
                });
            }
            if exhausted {
                return Ok(Listing {
                    objects,
                    prefixes,
                    next_cursor: None,
                });
            }
        }
    }

    fn seal_list_cursor(&self, scope: &str, lower: &str, after: &str) -> String {
        // Padded to a fixed width so the cursor's length says nothing about the path it
        // resumes at (which may be one the caller cannot read).
        let plain = json!({"l": lower, "a": after}).to_string();
        let padded = format!("{plain:<width$}", width = 2 * paths::MAX_PATH_BYTES + 64);
        self.cursors.seal_bytes(scope, padded.as_bytes())
    }

    fn open_list_cursor(&self, raw: &str, scope: &str) -> ApiResult<(String, String)> {
        let bad = || {
            ApiError::invalid_with(
                "cursor is not a cursor of this listing",
                json!({"field": "cursor"}),
            )
        };
        let plain = self.cursors.open_bytes(raw, scope).ok_or_else(bad)?;
        let value: Value = serde_json::from_slice(plain.trim_ascii_end()).map_err(|_| bad())?;
        let lower = value.get("l").and_then(Value::as_str).ok_or_else(bad)?;
        let after = value.get("a").and_then(Value::as_str).ok_or_else(bad)?;
        Ok((lower.to_string(), after.to_string()))
    }

    // ------------------------------------------------------------------ signed URLs

    /// A URL that lets its holder `GET` or `PUT` one object until it expires. Signing asks
    /// the caller's own rule first: `read` for GET (the object must exist), `write` for PUT
    /// (with `request.size` and `request.content_type` null: they are not known yet; the
    /// bucket's limits still apply to the upload).
    pub async fn sign(
        &self,
        caller: &Caller,
        bucket: &str,
        path: &str,
        expires_in: u64,
        method: &str,
    ) -> ApiResult<(String, i64)> {
        if expires_in == 0 || expires_in > self.config.max_signed_url_secs {
            return Err(ApiError::invalid_with(
                format!(
                    "expires_in must be between 1 and {} seconds",
                    self.config.max_signed_url_secs
                ),
                json!({"field": "expires_in"}),
            ));
        }
        let access = Access::Caller(caller.clone());
        let bucket_row = self.bucket(bucket).await?;
        paths::check_path(path)?;
        match method {
            "GET" => {
                self.object(&access, bucket, path).await?;
            }
            "PUT" => {
                let current = self.store.object(bucket, path).await?;
                if !self
                    .allows(
                        &access,
                        &bucket_row.write,
                        "PUT",
                        path,
                        current.as_ref(),
                        None,
                        None,
                        &mut RuleSession::new(),
                    )
                    .await
                {
                    return Err(write_denied());
                }
            }
            _ => {
                return Err(ApiError::invalid_with(
                    "method must be GET or PUT",
                    json!({"field": "method"}),
                ))
            }
        }
        let expires = Utc::now().timestamp() + expires_in as i64;
        Ok((self.signer.sign(method, bucket, path, expires), expires))
    }

    /// Checks a signed URL's `expires` and `signature` for `method` on `bucket`/`path`.
    pub fn verify_signature(
        &self,
        method: &str,
        bucket: &str,
        path: &str,
        expires: i64,
        signature: &str,
    ) -> ApiResult<()> {
        self.signer
            .verify(
                method,
                bucket,
                path,
                expires,
                signature,
                Utc::now().timestamp(),
            )
            .map_err(|e| {
                ApiError::PermissionDenied(match e {
                    SignatureError::Expired => "this signed URL has expired".into(),
                    SignatureError::Invalid => "this signed URL is not valid".into(),
                })
            })
    }

    // ------------------------------------------------------------------ upkeep

    /// Removes from the backend the blobs whose time in the trash is up (replaced or
    /// deleted objects past their grace, abandoned uploads, parts of expired resumable
    /// uploads). Every node may run it: removing
    /// a blob twice is harmless.
    pub async fn sweep(&self) -> ApiResult<usize> {
        // Expired uploads are forgotten; their parts are in the trash, due at the expiry.
        self.store.delete_expired_uploads(Utc::now()).await?;
        let mut removed = 0;
        loop {
            let due = self.store.due_blobs(Utc::now(), 200).await?;
            if due.is_empty() {
                return Ok(removed);
            }
            let mut gone = Vec::with_capacity(due.len());
            for blob in due {
                match self.blobs.delete(&blob).await {
                    Ok(()) => gone.push(blob),
                    Err(err) => {
                        tracing::warn!(%blob, error = %err, "could not remove a blob; will retry");
                    }
                }
            }
            // An object's blob takes its cached transforms with it: they are made due now
            // and removed by this same loop.
            let mut hastened = 0;
            for blob in gone.iter().filter(|b| transform::has_transforms(b)) {
                hastened += self
                    .store
                    .hasten_blobs(&transform::cache_prefix(blob), Utc::now())
                    .await?;
            }
            let done = gone.len();
            self.store.forget_blobs(&gone).await?;
            removed += done;
            if done < 200 && hastened == 0 {
                return Ok(removed);
            }
        }
    }
}

fn check_metadata(metadata: Value) -> ApiResult<Value> {
    let metadata = match metadata {
        Value::Null => json!({}),
        v @ Value::Object(_) => v,
        _ => {
            return Err(ApiError::invalid_with(
                "metadata must be a JSON object",
                json!({"field": "metadata"}),
            ))
        }
    };
    if metadata.to_string().len() > MAX_METADATA_BYTES || crate::rules::json_depth(&metadata) > 8 {
        return Err(ApiError::invalid_with(
            format!("metadata must be at most {MAX_METADATA_BYTES} bytes of JSON, nested at most 8 deep"),
            json!({"field": "metadata"}),
        ));
    }
    Ok(metadata)
}

fn write_denied() -> ApiError {
    ApiError::PermissionDenied("the bucket's write rule denies this".into())
}

fn too_large(limit: u64) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "objects in this bucket may be at most {limit} bytes"
    ))
}

fn blob_error(err: BlobError) -> ApiError {
    match err {
        BlobError::NotFound => ApiError::NotFound("no such object".into()),
        BlobError::Body(e) => {
            tracing::info!(error = %e, "upload body failed");
            ApiError::invalid("the upload body could not be read to its end")
        }
        BlobError::Backend(e) => {
            tracing::error!(error = ?e, "storage backend failed");
            ApiError::Unavailable("the storage backend failed; retry".into())
        }
    }
}
