//! The S3 backend (`storage.backend = "s3"`): blobs are objects in one bucket of AWS S3 or an
//! S3-compatible store (SeaweedFS, MinIO, Garage), under an optional key prefix.
//!
//! A body smaller than [`PART_SIZE`] is read into memory and sent as one `PutObject`; a larger
//! one becomes a multipart upload whose parts are read, sent and dropped one at a time, so a
//! put holds at most one part in memory whatever the object's size. S3 makes an object
//! visible only when its `PutObject` or `CompleteMultipartUpload` succeeds, so a body that
//! fails midway leaves nothing under its key: the single put is never sent, and the multipart
//! upload is aborted (also when the put's future is dropped, from a guard).

use std::ops::Range;
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use async_trait::async_trait;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{
    BucketLocationConstraint, CompletedMultipartUpload, CompletedPart, CreateBucketConfiguration,
};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::backend::{is_valid_blob_key, BlobError, ByteStream, ObjectStore};
use crate::config::S3Config;

/// Bodies up to this size are one `PutObject`; larger ones are uploaded in parts of this size
/// (S3's smallest part is 5 MiB; 10,000 parts of 8 MiB allow objects up to 80 GiB).
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// S3 refuses a multipart upload with more parts than this.
const MAX_PARTS: i32 = 10_000;

/// How long start-up waits for an S3 endpoint that does not answer yet (a `docker compose up`
/// starts basalt and the object store at the same time). Refusals (bad credentials, no such
/// bucket and no right to create it) fail at once.
const STARTUP_WAIT: Duration = Duration::from_secs(30);

pub struct S3Store {
    client: Client,
    bucket: String,
    /// `""` or a prefix ending in `/`, put in front of every blob key.
    prefix: String,
    part_size: usize,
}

/// The S3 settings, checked.
struct Settings {
    bucket: String,
    key_id: String,
    secret: String,
    endpoint: Option<String>,
    region: String,
    prefix: String,
}

/// Checks `storage.s3` without any network round trip; the error names the key. Called by
/// the configuration's validation when `storage.backend = "s3"`.
pub fn check_settings(cfg: &S3Config) -> Result<(), String> {
    settings(cfg).map(|_| ())
}

fn settings(cfg: &S3Config) -> Result<Settings, String> {
    let bucket = cfg
        .bucket
        .clone()
        .filter(|b| !b.is_empty())
        .ok_or("`storage.s3.bucket`: required when storage.backend is s3")?;
    if bucket.len() < 3 || bucket.len() > 63 || bucket.contains('/') {
        return Err(format!(
            "`storage.s3.bucket`: {bucket:?} is not a bucket name (3 to 63 characters, no `/`)"
        ));
    }
    let (key_id, secret) = match (&cfg.access_key_id, &cfg.secret_access_key) {
        (Some(id), Some(secret)) if !id.is_empty() && !secret.expose().is_empty() => {
            (id.clone(), secret.expose().clone())
        }
        _ => return Err(
            "`storage.s3.access_key_id` and `storage.s3.secret_access_key`: both are required when storage.backend is s3".into(),
        ),
    };
    let endpoint = cfg.endpoint.clone().filter(|e| !e.is_empty());
    if let Some(e) = &endpoint {
        if !(e.starts_with("http://") || e.starts_with("https://")) {
            return Err(format!(
                "`storage.s3.endpoint`: {e:?} must start with http:// or https://"
            ));
        }
    }
    let region = match (cfg.region.clone().filter(|r| !r.is_empty()), &endpoint) {
        (Some(r), _) => r,
        // S3-compatible stores ignore the region, but SigV4 signs with one.
        (None, Some(_)) => "us-east-1".to_string(),
        (None, None) => return Err(
            "`storage.s3.endpoint` or `storage.s3.region`: one is required when storage.backend is s3 (the endpoint for MinIO, SeaweedFS and the like, the region alone for AWS S3)".into(),
        ),
    };
    let prefix = match cfg.prefix.as_deref().map(|p| p.trim_matches('/')) {
        None | Some("") => String::new(),
        Some(p) if is_valid_blob_key(p) => format!("{p}/"),
        Some(p) => return Err(format!(
            "`storage.s3.prefix`: {p:?} may hold only ASCII letters, digits, `_`, `-`, `.` and `/`, without empty or dot segments"
        )),
    };
    Ok(Settings {
        bucket,
        key_id,
        secret,
        endpoint,
        region,
        prefix,
    })
}

impl S3Store {
    /// Checks the settings, builds the client and makes sure the bucket exists (creating it
    /// when missing, so a fresh MinIO or SeaweedFS needs no manual step). Waits up to
    /// [`STARTUP_WAIT`] for an endpoint that cannot be reached yet.
    pub async fn connect(cfg: &S3Config) -> anyhow::Result<S3Store> {
        let store = S3Store::new(cfg)?;
        store.ensure_bucket(cfg).await?;
        Ok(store)
    }

    /// Builds the store from its settings without any network round trip.
    pub fn new(cfg: &S3Config) -> anyhow::Result<S3Store> {
        let Settings {
            bucket,
            key_id,
            secret,
            endpoint,
            region,
            prefix,
        } = settings(cfg).map_err(|e| anyhow!("invalid configuration: {e}"))?;

        // rustls with ring: no C toolchain beyond what ring needs, no cmake (aws-lc), and
        // the system's CA certificates for https endpoints.
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut conf = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .http_client(http)
            .region(Region::new(region))
            .credentials_provider(Credentials::new(key_id, secret, None, None, "basalt"))
            .force_path_style(cfg.force_path_style)
            // The SDK's default (a CRC32 checksum on every upload, sent as an aws-chunked
            // trailer) is refused by several S3-compatible stores; S3 itself checks the
            // SigV4-signed payload hash either way.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .timeout_config(
                aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .build(),
            );
        if let Some(e) = endpoint {
            conf = conf.endpoint_url(e);
        }
        Ok(S3Store {
            client: Client::from_conf(conf.build()),
            bucket,
            prefix,
            part_size: PART_SIZE,
        })
    }

    async fn ensure_bucket(&self, cfg: &S3Config) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + STARTUP_WAIT;
        loop {
            match self.client.head_bucket().bucket(&self.bucket).send().await {
                Ok(_) => return Ok(()),
                Err(e) if status(&e) == Some(404) => break,
                Err(e @ (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::warn!(
                        endpoint = cfg.endpoint.as_deref().unwrap_or("AWS S3"),
                        "S3 is not reachable yet, retrying: {}",
                        DisplayErrorContext(&e)
                    );
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => {
                    return Err(anyhow!(
                        "S3 bucket {:?} at {}: {}",
                        self.bucket,
                        cfg.endpoint.as_deref().unwrap_or("AWS S3"),
                        explain(&e)
                    ))
                }
            }
        }
        let mut create = self.client.create_bucket().bucket(&self.bucket);
        // AWS wants the region named, except for us-east-1 (which it refuses to be named).
        if let Some(region) = cfg.region.as_deref().filter(|r| *r != "us-east-1") {
            if cfg.endpoint.is_none() {
                create = create.create_bucket_configuration(
                    CreateBucketConfiguration::builder()
                        .location_constraint(BucketLocationConstraint::from(region))
                        .build(),
                );
            }
        }
        match create.send().await {
            Ok(_) => {
                tracing::info!(bucket = %self.bucket, "created the S3 bucket");
                Ok(())
            }
            // Another node made it in the meantime.
            Err(e) if e.code() == Some("BucketAlreadyOwnedByYou") => Ok(()),
            Err(e) => Err(anyhow!(
                "S3 bucket {:?} does not exist and creating it failed: {}",
                self.bucket,
                explain(&e)
            )),
        }
    }

    fn object_key(&self, key: &str) -> Result<String, BlobError> {
        if !is_valid_blob_key(key) {
            return Err(BlobError::backend(anyhow!("invalid blob key {key:?}")));
        }
        Ok(format!("{}{key}", self.prefix))
    }

    async fn put_multipart(
        &self,
        key: &str,
        first: Bytes,
        mut pending: Option<Bytes>,
        body: &mut ByteStream,
    ) -> Result<u64, BlobError> {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| s3_error("CreateMultipartUpload", key, e))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| BlobError::backend(anyhow!("CreateMultipartUpload gave no upload id")))?
            .to_string();
        let mut guard = AbortGuard {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_string(),
            upload_id: upload_id.clone(),
            armed: true,
        };

        let result = async {
            let mut parts = Vec::new();
            let mut total = 0u64;
            let mut part = first;
            let mut number = 1i32;
            loop {
                total += part.len() as u64;
                let sent = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .content_length(part.len() as i64)
                    .body(S3Body::from(part))
                    .send()
                    .await
                    .map_err(|e| s3_error("UploadPart", key, e))?;
                parts.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(sent.e_tag().map(str::to_string))
                        .build(),
                );
                let (next, rest) = read_part(body, pending.take(), self.part_size).await?;
                if next.is_empty() {
                    break;
                }
                if number == MAX_PARTS {
                    return Err(BlobError::backend(anyhow!(
                        "the body is larger than {} bytes, the most one S3 upload can take",
                        MAX_PARTS as u64 * self.part_size as u64
                    )));
                }
                number += 1;
                part = next;
                pending = rest;
            }
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .multipart_upload(
                    CompletedMultipartUpload::builder()
                        .set_parts(Some(parts))
                        .build(),
                )
                .send()
                .await
                .map_err(|e| s3_error("CompleteMultipartUpload", key, e))?;
            Ok(total)
        }
        .await;

        match result {
            Ok(total) => {
                guard.armed = false;
                Ok(total)
            }
            Err(e) => {
                guard.armed = false;
                guard.abort().await;
                Err(e)
            }
        }
    }

    #[cfg(test)]
    fn with_part_size(mut self, part_size: usize) -> S3Store {
        self.part_size = part_size;
        self
    }
}

/// Reads up to `part_size` bytes (`carry` first, then from `body`) into one buffer: the part,
/// and what the last chunk held past it. An empty part means the body has ended.
async fn read_part(
    body: &mut ByteStream,
    carry: Option<Bytes>,
    part_size: usize,
) -> Result<(Bytes, Option<Bytes>), BlobError> {
    let mut buf = BytesMut::new();
    let mut next = carry;
    loop {
        let mut chunk = match next.take() {
            Some(c) => c,
            None => match body.next().await {
                Some(c) => c.map_err(BlobError::Body)?,
                None => return Ok((buf.freeze(), None)),
            },
        };
        if buf.is_empty() && chunk.len() >= part_size {
            // A chunk as large as a part is sent as it is, without a copy.
            let rest = (chunk.len() > part_size).then(|| chunk.split_off(part_size));
            return Ok((chunk, rest));
        }
        if buf.capacity() == 0 {
            buf.reserve(part_size);
        }
        let room = part_size - buf.len();
        if chunk.len() >= room {
            let rest = chunk.split_off(room);
            buf.extend_from_slice(&chunk);
            return Ok((buf.freeze(), (!rest.is_empty()).then_some(rest)));
        }
        buf.extend_from_slice(&chunk);
    }
}

/// Aborts a multipart upload that did not complete: awaited on errors, and spawned when the
/// put's future is dropped midway (the client went away), so no parts stay behind.
struct AbortGuard {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    armed: bool,
}

impl AbortGuard {
    async fn abort(&self) {
        abort_upload(&self.client, &self.bucket, &self.key, &self.upload_id).await;
    }
}

impl Drop for AbortGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (client, bucket, key, upload_id) = (
            self.client.clone(),
            std::mem::take(&mut self.bucket),
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.upload_id),
        );
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move { abort_upload(&client, &bucket, &key, &upload_id).await });
            }
            Err(_) => tracing::warn!(
                key,
                upload_id,
                "an S3 multipart upload was left open (no runtime to abort it from)"
            ),
        }
    }
}

async fn abort_upload(client: &Client, bucket: &str, key: &str, upload_id: &str) {
    let aborted = client
        .abort_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .send()
        .await;
    if let Err(e) = aborted {
        // A lifecycle rule (AbortIncompleteMultipartUpload) is the backstop; see
        // docs/storage-s3.md.
        tracing::warn!(
            key,
            upload_id,
            "aborting an S3 multipart upload failed: {}",
            DisplayErrorContext(&e)
        );
    }
}

/// The HTTP status S3 answered with, when it answered.
fn status<E>(e: &SdkError<E, HttpResponse>) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

/// A one-line account of why a request failed, with a hint for the usual causes.
fn explain<E>(e: &SdkError<E, HttpResponse>) -> String
where
    E: std::error::Error + ProvideErrorMetadata + 'static,
{
    let hint = match (status(e), e.code()) {
        (_, Some("SignatureDoesNotMatch" | "InvalidAccessKeyId")) | (Some(403), _) => {
            " (check storage.s3.access_key_id and storage.s3.secret_access_key, and that the key may use this bucket)"
        }
        (Some(301 | 307), _) | (_, Some("PermanentRedirect" | "AuthorizationHeaderMalformed")) => {
            " (check storage.s3.region)"
        }
        _ if matches!(e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) => {
            " (check storage.s3.endpoint, and that the object store is running)"
        }
        _ => "",
    };
    format!("{}{hint}", DisplayErrorContext(e))
}

fn s3_error<E>(op: &str, key: &str, e: SdkError<E, HttpResponse>) -> BlobError
where
    E: std::error::Error + ProvideErrorMetadata + Send + Sync + 'static,
{
    BlobError::Backend(anyhow!("S3 {op} {key}: {}", explain(&e)))
}

#[async_trait]
impl ObjectStore for S3Store {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn put(&self, key: &str, mut body: ByteStream) -> Result<u64, BlobError> {
        let key = self.object_key(key)?;
        let (first, rest) = read_part(&mut body, None, self.part_size).await?;
        if first.len() == self.part_size {
            // Possibly more to come: a multipart upload (it ends at once when the body does).
            return self.put_multipart(&key, first, rest, &mut body).await;
        }
        let size = first.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_length(size as i64)
            .body(S3Body::from(first))
            .send()
            .await
            .map_err(|e| s3_error("PutObject", &key, e))?;
        Ok(size)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, BlobError> {
        let key = self.object_key(key)?;
        let mut req = self.client.get_object().bucket(&self.bucket).key(&key);
        match &range {
            Some(r) if r.start >= r.end => {
                // `bytes=a-(a-1)` is no range at all: answer nothing, but only for a blob
                // that exists.
                self.client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(&key)
                    .send()
                    .await
                    .map_err(|e| match status(&e) {
                        Some(404) => BlobError::NotFound,
                        _ => s3_error("HeadObject", &key, e),
                    })?;
                return Ok(futures::stream::empty().boxed());
            }
            Some(r) => req = req.range(format!("bytes={}-{}", r.start, r.end - 1)),
            None => {}
        }
        let answer = req.send().await.map_err(|e| {
            if e.as_service_error().is_some_and(|s| s.is_no_such_key()) || status(&e) == Some(404) {
                BlobError::NotFound
            } else {
                s3_error("GetObject", &key, e)
            }
        })?;
        let stream = futures::stream::try_unfold(answer.body, |mut body| async move {
            match body.try_next().await {
                Ok(Some(chunk)) => Ok(Some((chunk, body))),
                Ok(None) => Ok(None),
                Err(e) => Err(std::io::Error::other(e)),
            }
        });
        Ok(stream.boxed())
    }

    async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let key = self.object_key(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status(&e) == Some(404) => Ok(()),
            Err(e) => Err(s3_error("DeleteObject", &key, e)),
        }
    }

    async fn ping(&self) -> Result<(), BlobError> {
        self.client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| BlobError::Backend(anyhow!("S3 HeadBucket: {}", explain(&e))))
    }
}

/// Opens the S3 backend from `storage.s3`, for [`super::open_backend`].
pub async fn open(cfg: &S3Config) -> anyhow::Result<S3Store> {
    S3Store::connect(cfg)
        .await
        .context("cannot use the S3 storage backend")
}

#[cfg(test)]
#[path = "../../tests/api/s3_support.rs"]
mod s3_support;

/// These talk to a real S3 server (SeaweedFS): see `tests/api/s3_support.rs` for where it
/// comes from. Without one they skip with a notice, except under `CI=true`, where they fail.
#[cfg(test)]
mod tests {
    use super::s3_support::test_s3;
    use super::*;
    use crate::config::Secret;
    use crate::storage::backend::{Metered, TooLarge};
    use sha2::{Digest, Sha256};
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::time::Instant;

    /// Counts the heap bytes each thread holds, to show that a put's memory does not grow
    /// with the body (a `#[tokio::test]` runs its tasks, hyper's included, on its thread).
    struct ThreadCounting;

    thread_local! {
        static LIVE: Cell<isize> = const { Cell::new(0) };
        static PEAK: Cell<isize> = const { Cell::new(0) };
    }

    fn account(delta: isize) {
        let _ = LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }

    unsafe impl GlobalAlloc for ThreadCounting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            account(layout.size() as isize);
            System.alloc(layout)
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            account(layout.size() as isize);
            System.alloc_zeroed(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            account(-(layout.size() as isize));
            System.dealloc(ptr, layout)
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            account(new_size as isize - layout.size() as isize);
            System.realloc(ptr, layout, new_size)
        }
    }

    #[global_allocator]
    static ALLOC: ThreadCounting = ThreadCounting;

    /// Starts measuring this thread's peak heap; answers a function giving the growth since.
    fn measure_peak() -> impl Fn() -> isize {
        let base = LIVE.with(Cell::get);
        PEAK.with(|p| p.set(base));
        move || PEAK.with(Cell::get) - base
    }

    const MIB: usize = 1024 * 1024;
    /// The smallest part S3 accepts, so multipart tests need fewer bytes.
    const SMALL_PART: usize = 5 * MIB;

    fn config(prefix: Option<String>) -> Option<S3Config> {
        let s3 = test_s3()?;
        Some(S3Config {
            endpoint: Some(s3.endpoint.clone()),
            region: Some(s3.region.clone()),
            bucket: Some(s3.bucket.clone()),
            access_key_id: Some(s3.access_key_id.clone()),
            secret_access_key: Some(Secret::new(s3.secret_access_key.clone())),
            force_path_style: true,
            prefix,
        })
    }

    /// A store on the test server under a prefix of its own, or `None` to skip.
    async fn store(name: &str) -> Option<S3Store> {
        let prefix = test_s3()?.unique_prefix(name);
        let cfg = config(Some(prefix))?;
        Some(
            S3Store::connect(&cfg)
                .await
                .expect("connect to the test S3"),
        )
    }

    /// Deterministic bytes, made as they are read: `len` bytes in `chunk`-sized pieces (the
    /// same bytes whatever the chunk size).
    fn generated(len: usize, chunk: usize) -> ByteStream {
        let byte_at = |i: usize| {
            // splitmix64 of the 8-byte word's index
            let mut z = (i / 8) as u64 ^ 0x9E37_79B9_7F4A_7C15;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)).to_le_bytes()[i % 8]
        };
        let mut at = 0usize;
        futures::stream::iter(std::iter::from_fn(move || {
            if at == len {
                return None;
            }
            let n = (len - at).min(chunk);
            let buf: Vec<u8> = (at..at + n).map(byte_at).collect();
            at += n;
            Some(Ok(Bytes::from(buf)))
        }))
        .boxed()
    }

    async fn collect(s: ByteStream) -> Vec<u8> {
        let mut out = Vec::new();
        let mut s = s;
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c.expect("read the blob"));
        }
        out
    }

    async fn sha256_of(mut s: ByteStream) -> ([u8; 32], u64) {
        let mut h = Sha256::new();
        let mut n = 0u64;
        while let Some(c) = s.next().await {
            let c = c.expect("read the stream");
            n += c.len() as u64;
            h.update(&c);
        }
        (h.finalize().into(), n)
    }

    /// The first `len` bytes, then an error.
    fn failing_after(len: usize, chunk: usize) -> ByteStream {
        generated(len, chunk)
            .chain(futures::stream::once(async {
                Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "the client went away",
                ))
            }))
            .boxed()
    }

    async fn open_uploads(store: &S3Store, key: &str) -> usize {
        store
            .client
            .list_multipart_uploads()
            .bucket(&store.bucket)
            .prefix(format!("{}{key}", store.prefix))
            .send()
            .await
            .expect("ListMultipartUploads")
            .uploads()
            .len()
    }

    async fn assert_nothing_under(store: &S3Store, key: &str) {
        assert!(
            matches!(store.get(key, None).await, Err(BlobError::NotFound)),
            "a blob was left under {key}"
        );
        assert_eq!(open_uploads(store, key).await, 0, "an upload was left open");
    }

    #[tokio::test]
    async fn small_put_get_range_delete() {
        let Some(store) = store("small").await else {
            return;
        };
        store.ping().await.expect("ping");
        assert_eq!(store.kind(), "s3");

        let key = "objects/avatars/small1";
        let body = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"hello ")),
            Ok(Bytes::from_static(b"world")),
        ])
        .boxed();
        assert_eq!(store.put(key, body).await.unwrap(), 11);
        assert_eq!(
            collect(store.get(key, None).await.unwrap()).await,
            b"hello world"
        );
        assert_eq!(
            collect(store.get(key, Some(0..5)).await.unwrap()).await,
            b"hello"
        );
        assert_eq!(
            collect(store.get(key, Some(6..11)).await.unwrap()).await,
            b"world"
        );
        assert_eq!(
            collect(store.get(key, Some(10..11)).await.unwrap()).await,
            b"d"
        );
        assert!(collect(store.get(key, Some(3..3)).await.unwrap())
            .await
            .is_empty());

        // Replacing a blob (the server never does, but S3 allows it) and an empty blob.
        let empty = "objects/avatars/empty";
        assert_eq!(
            store
                .put(empty, futures::stream::empty().boxed())
                .await
                .unwrap(),
            0
        );
        assert!(collect(store.get(empty, None).await.unwrap())
            .await
            .is_empty());

        store.delete(key).await.unwrap();
        store.delete(empty).await.unwrap();
        assert!(matches!(
            store.get(key, None).await,
            Err(BlobError::NotFound)
        ));
        assert!(matches!(
            store.get(key, Some(0..1)).await,
            Err(BlobError::NotFound)
        ));
        assert!(matches!(
            store.get(key, Some(1..1)).await,
            Err(BlobError::NotFound)
        ));
        // Deleting what is not there is fine.
        store.delete(key).await.unwrap();
        store.delete("objects/never/was").await.unwrap();
    }

    #[tokio::test]
    async fn keys_are_checked_and_prefixed() {
        let Some(store) = store("keys").await else {
            return;
        };
        for bad in ["", "/abs", "a/../b", "a//b", "ü"] {
            assert!(matches!(
                store.put(bad, futures::stream::empty().boxed()).await,
                Err(BlobError::Backend(_))
            ));
            assert!(matches!(
                store.get(bad, None).await,
                Err(BlobError::Backend(_))
            ));
        }
        let key = "objects/b/k1";
        store
            .put(key, generated(10, 10))
            .await
            .expect("put under a prefix");
        let listed = store
            .client
            .list_objects_v2()
            .bucket(&store.bucket)
            .prefix(&store.prefix)
            .send()
            .await
            .unwrap();
        let keys: Vec<_> = listed.contents().iter().filter_map(|o| o.key()).collect();
        assert_eq!(keys, vec![format!("{}{key}", store.prefix)]);
        store.delete(key).await.unwrap();
    }

    #[tokio::test]
    async fn multipart_put_with_ragged_chunks() {
        let Some(store) = store("multi").await else {
            return;
        };
        let store = store.with_part_size(SMALL_PART);
        // 2.4 parts in chunks that never line up with a part's end.
        let len = SMALL_PART * 2 + 2 * MIB + 7;
        let key = "objects/big/multi1";
        assert_eq!(
            store.put(key, generated(len, 100_003)).await.unwrap(),
            len as u64
        );
        let want = collect(generated(len, 1 << 20)).await;
        assert!(
            collect(store.get(key, None).await.unwrap()).await == want,
            "other bytes came back"
        );
        // A range across the first part boundary, and the very end.
        let r = (SMALL_PART - 10) as u64..(SMALL_PART + 10) as u64;
        assert!(
            collect(store.get(key, Some(r.clone())).await.unwrap()).await
                == want[r.start as usize..r.end as usize]
        );
        let end = (len - 3) as u64..len as u64;
        assert!(collect(store.get(key, Some(end)).await.unwrap()).await == want[len - 3..]);
        assert_eq!(open_uploads(&store, key).await, 0);
        store.delete(key).await.unwrap();
        assert!(matches!(
            store.get(key, None).await,
            Err(BlobError::NotFound)
        ));
    }

    #[tokio::test]
    async fn exactly_one_part_and_chunks_larger_than_a_part() {
        let Some(store) = store("edges").await else {
            return;
        };
        let store = store.with_part_size(SMALL_PART);
        // Exactly one part: a multipart upload of one part.
        let key = "objects/e/one-part";
        assert_eq!(
            store
                .put(key, generated(SMALL_PART, 64 * 1024))
                .await
                .unwrap(),
            SMALL_PART as u64
        );
        let (got, n) = sha256_of(store.get(key, None).await.unwrap()).await;
        let (want, _) = sha256_of(generated(SMALL_PART, 1 << 20)).await;
        assert_eq!((got, n), (want, SMALL_PART as u64));
        // One chunk holding two and a half parts.
        let key2 = "objects/e/huge-chunk";
        let len = SMALL_PART * 5 / 2;
        assert_eq!(
            store.put(key2, generated(len, len)).await.unwrap(),
            len as u64
        );
        let (got, n) = sha256_of(store.get(key2, None).await.unwrap()).await;
        let (want, _) = sha256_of(generated(len, len)).await;
        assert_eq!((got, n), (want, len as u64));
        store.delete(key).await.unwrap();
        store.delete(key2).await.unwrap();
    }

    #[tokio::test]
    async fn a_body_failing_midway_leaves_nothing() {
        let Some(store) = store("fail").await else {
            return;
        };
        let store = store.with_part_size(SMALL_PART);

        // Before the first part is full: nothing was ever sent.
        let key = "objects/f/small";
        let err = store.put(key, failing_after(1000, 100)).await.unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
        assert_nothing_under(&store, key).await;

        // After two parts were uploaded: the multipart upload is aborted.
        let key = "objects/f/multi";
        let err = store
            .put(key, failing_after(SMALL_PART * 2 + 123, 256 * 1024))
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Body(_)), "{err:?}");
        assert_nothing_under(&store, key).await;

        // The size limit of a Metered body, past a part.
        let key = "objects/f/too-large";
        let (body, meter) =
            Metered::new(generated(SMALL_PART * 3, 64 * 1024), SMALL_PART as u64 + 1);
        let err = store.put(key, body.boxed()).await.unwrap_err();
        match &err {
            BlobError::Body(io) => {
                assert!(io.get_ref().is_some_and(|e| e.is::<TooLarge>()), "{io:?}")
            }
            other => panic!("{other:?}"),
        }
        assert!(meter.lock().unwrap().too_large);
        assert_nothing_under(&store, key).await;

        // A failed put does not disturb an existing blob under another key.
        let kept = "objects/f/kept";
        store.put(kept, generated(100, 100)).await.unwrap();
        let _ = store.put("objects/f/x", failing_after(10, 10)).await;
        assert_eq!(
            collect(store.get(kept, None).await.unwrap()).await.len(),
            100
        );
        store.delete(kept).await.unwrap();
    }

    #[tokio::test]
    async fn a_put_dropped_midway_aborts_its_upload() {
        let Some(store) = store("dropped").await else {
            return;
        };
        let store = store.with_part_size(SMALL_PART);
        let key = "objects/d/dropped";
        // One and a bit parts, then a client that never sends the rest. The put asks for
        // more only once it knows its upload's id (the first part is sent before the rest is
        // read), so dropping it after that must abort the upload.
        let waiting = std::sync::Arc::new(tokio::sync::Notify::new());
        let told = waiting.clone();
        let body = generated(SMALL_PART + 10, 64 * 1024)
            .chain(futures::stream::once(async move {
                told.notify_one();
                futures::future::pending::<Result<Bytes, std::io::Error>>().await
            }))
            .boxed();
        let put = store.put(key, body);
        let seen_open = async {
            waiting.notified().await;
            loop {
                if open_uploads(&store, key).await > 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::select! {
            r = put => panic!("the put ended: {:?}", r.map(|_| ())),
            _ = seen_open => {}
            _ = tokio::time::sleep(Duration::from_secs(20)) => panic!("no upload was opened"),
        }
        // The put future is dropped here; its guard aborts the upload in the background.
        let started = Instant::now();
        while open_uploads(&store, key).await > 0 {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the upload stayed open"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(matches!(
            store.get(key, None).await,
            Err(BlobError::NotFound)
        ));
    }

    #[tokio::test]
    async fn a_64_mib_put_streams_with_bounded_memory() {
        let Some(store) = store("stream").await else {
            return;
        };
        let len = 64 * MIB;
        let key = "objects/s/64mib";
        let peak = measure_peak();
        let n = store.put(key, generated(len, 64 * 1024)).await.unwrap();
        let grew = peak();
        assert_eq!(n, len as u64);
        // One part (8 MiB) in memory, plus what the HTTP client holds; never the body.
        assert!(
            grew < (2 * PART_SIZE + 2 * MIB) as isize,
            "a 64 MiB put grew the heap by {} MiB",
            grew / MIB as isize
        );
        let peak = measure_peak();
        let (got, got_len) = sha256_of(store.get(key, None).await.unwrap()).await;
        assert!(
            peak() < (4 * MIB) as isize,
            "a download grew the heap by {} bytes",
            peak()
        );
        let (want, _) = sha256_of(generated(len, 64 * 1024)).await;
        assert_eq!((got, got_len), (want, len as u64));
        store.delete(key).await.unwrap();
    }

    #[tokio::test]
    async fn connecting_creates_the_bucket_and_refuses_bad_credentials() {
        let Some(mut cfg) = config(None) else { return };
        let bucket = format!("basalt-new-{}", crate::ids::new_id().to_ascii_lowercase());
        cfg.bucket = Some(bucket.chars().take(63).collect());
        let store = S3Store::connect(&cfg).await.expect("creates the bucket");
        store.ping().await.expect("ping the new bucket");
        store.put("objects/x/y", generated(5, 5)).await.unwrap();
        store.delete("objects/x/y").await.unwrap();
        let _ = store
            .client
            .delete_bucket()
            .bucket(&store.bucket)
            .send()
            .await;

        let Some(mut cfg) = config(None) else { return };
        cfg.secret_access_key = Some(Secret::new("wrong".into()));
        let err = S3Store::connect(&cfg).await.err().expect("refused");
        let msg = format!("{err:#}");
        assert!(msg.contains("storage.s3.secret_access_key"), "{msg}");
        // ping on a store whose credentials are wrong fails too.
        let bad = S3Store::new(&cfg).unwrap();
        assert!(matches!(bad.ping().await, Err(BlobError::Backend(_))));
    }

    #[test]
    fn settings_are_checked_before_any_request() {
        let full = S3Config {
            endpoint: Some("http://127.0.0.1:9".into()),
            region: None,
            bucket: Some("basalt".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some(Secret::new("s".into())),
            force_path_style: true,
            prefix: Some("/team-a/basalt/".into()),
        };
        let store = S3Store::new(&full).expect("valid");
        assert_eq!(store.prefix, "team-a/basalt/");
        assert_eq!(
            store.object_key("objects/a/b").unwrap(),
            "team-a/basalt/objects/a/b"
        );

        type Break = fn(&mut S3Config);
        let cases: Vec<(Break, &str)> = vec![
            (|c| c.bucket = None, "storage.s3.bucket"),
            (|c| c.bucket = Some("ab".into()), "storage.s3.bucket"),
            (|c| c.access_key_id = None, "storage.s3.access_key_id"),
            (
                |c| c.secret_access_key = None,
                "storage.s3.secret_access_key",
            ),
            (
                |c| c.endpoint = Some("127.0.0.1:9000".into()),
                "storage.s3.endpoint",
            ),
            (|c| c.endpoint = None, "storage.s3.region"),
            (|c| c.prefix = Some("a/../b".into()), "storage.s3.prefix"),
        ];
        for (break_it, names) in cases {
            let mut cfg = full.clone();
            break_it(&mut cfg);
            let msg = S3Store::new(&cfg).err().expect("refused").to_string();
            assert!(msg.contains(names), "{msg}");
        }
        // AWS: a region and no endpoint is enough.
        let mut aws = full.clone();
        aws.endpoint = None;
        aws.region = Some("eu-west-1".into());
        S3Store::new(&aws).expect("AWS settings");
    }

    #[tokio::test]
    async fn an_unreachable_endpoint_is_reported_not_hung_on() {
        let cfg = S3Config {
            // Nothing listens on the discard port.
            endpoint: Some("http://127.0.0.1:9".into()),
            region: None,
            bucket: Some("basalt".into()),
            access_key_id: Some("k".into()),
            secret_access_key: Some(Secret::new("s".into())),
            force_path_style: true,
            prefix: None,
        };
        let store = S3Store::new(&cfg).unwrap();
        let err = store.ping().await.unwrap_err();
        assert!(
            format!("{err:#}").contains("storage.s3.endpoint"),
            "{err:#}"
        );
    }
}
