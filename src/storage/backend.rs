//! Where object bytes live: the [`ObjectStore`] trait and the blob-level types both backends
//! share. A backend only ever sees *blob keys* the server made (`objects/<bucket>/<random id>`,
//! `uploads/<id>/<offset>`, `transforms/…`), never a client's path: which path points at
//! which blob is database metadata, so replacing an object is "write a new blob, then switch
//! the row", and a half-written or failed upload is never visible (API.md § Storage).

use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::Stream;
use sha2::{Digest, Sha256};

/// A stream of object bytes. Errors are `io::Error`s so both backends and hyper can use it.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("no such blob")]
    NotFound,
    /// Reading the body being stored failed (the client went away, it grew past the size
    /// limit, it did not arrive in time). Nothing was stored.
    #[error("reading the upload failed: {0}")]
    Body(#[source] std::io::Error),
    /// The backend failed (disk full, S3 unreachable or refusing).
    #[error("storage backend failed: {0}")]
    Backend(#[source] anyhow::Error),
}

impl BlobError {
    pub fn backend(err: impl Into<anyhow::Error>) -> Self {
        BlobError::Backend(err.into())
    }
}

/// Blob storage: local disk ([`super::local::LocalStore`]) or S3 ([`super::s3::S3Store`]).
#[async_trait]
pub trait ObjectStore: Send + Sync {
    /// `local` or `s3`, for logs and `/ready`.
    fn kind(&self) -> &'static str;

    /// Stores `body` under `key`, all or nothing: when the body fails midway (including a
    /// size limit enforced by the stream) nothing is left under `key`. Memory does not grow
    /// with the body's size. Answers the number of bytes stored.
    async fn put(&self, key: &str, body: ByteStream) -> Result<u64, BlobError>;

    /// The blob's bytes, or the bytes in `range` (`start..end`, end exclusive, within the
    /// blob; the caller has checked it against the stored size).
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, BlobError>;

    /// Removes the blob; a missing blob is not an error.
    async fn delete(&self, key: &str) -> Result<(), BlobError>;

    /// A cheap round trip, for `/ready`.
    async fn ping(&self) -> Result<(), BlobError>;
}

/// What a [`Metered`] stream saw: its size and SHA-256, known once it has been read to the
/// end.
#[derive(Debug, Clone, Default)]
pub struct Meter {
    pub size: u64,
    pub sha256: Option<[u8; 32]>,
    /// The stream stopped because it grew past its limit.
    pub too_large: bool,
}

impl Meter {
    /// The object's ETag: the first 128 bits of its SHA-256, hex, quoted (a strong
    /// validator: equal ETags mean equal bytes).
    pub fn etag(&self) -> Option<String> {
        self.sha256
            .map(|d| format!("\"{}\"", hex::encode(&d[..16])))
    }
}

/// Wraps an upload body: counts and hashes the bytes as they pass, and fails the stream as
/// soon as it passes `limit` bytes, so a backend stops storing it (and removes what it
/// stored) without the whole body ever being read.
pub struct Metered {
    inner: ByteStream,
    limit: u64,
    hasher: Option<Sha256>,
    seen: u64,
    meter: Arc<Mutex<Meter>>,
}

/// The error a [`Metered`] stream ends with when the body is larger than its limit.
#[derive(Debug, thiserror::Error)]
#[error("the body is larger than {0} bytes")]
pub struct TooLarge(pub u64);

impl Metered {
    pub fn new(inner: ByteStream, limit: u64) -> (Metered, Arc<Mutex<Meter>>) {
        let meter = Arc::new(Mutex::new(Meter::default()));
        (
            Metered {
                inner,
                limit,
                hasher: Some(Sha256::new()),
                seen: 0,
                meter: meter.clone(),
            },
            meter,
        )
    }

    pub fn boxed(self) -> ByteStream {
        Box::pin(self)
    }
}

impl Stream for Metered {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.seen += chunk.len() as u64;
                if this.seen > this.limit {
                    let mut meter = this.meter.lock().expect("meter lock");
                    meter.too_large = true;
                    meter.size = this.seen;
                    return Poll::Ready(Some(Err(std::io::Error::other(TooLarge(this.limit)))));
                }
                if let Some(h) = this.hasher.as_mut() {
                    h.update(&chunk);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => {
                if let Some(h) = this.hasher.take() {
                    let mut meter = this.meter.lock().expect("meter lock");
                    meter.size = this.seen;
                    meter.sha256 = Some(h.finalize().into());
                }
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

/// A fresh blob key for a new version of an object in `bucket`.
pub fn new_object_blob(bucket: &str) -> String {
    format!("objects/{bucket}/{}", crate::ids::new_id())
}

/// Whether `key` is a blob key this server could have made: ASCII letters, digits, `_`, `-`,
/// `.` and `/`, no empty or dot segments. Backends refuse anything else, so no key can
/// name a file outside their root.
pub fn is_valid_blob_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 512
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
        && key
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn blob_keys_cannot_escape() {
        assert!(is_valid_blob_key("objects/avatars/abc"));
        for bad in [
            "",
            "/etc/passwd",
            "a/../b",
            "a//b",
            "a/./b",
            "a\\b",
            "a/b/",
            "ü",
        ] {
            assert!(!is_valid_blob_key(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn metered_stops_past_the_limit_and_hashes_what_fits() {
        let chunks = || {
            futures::stream::iter(vec![
                Ok(Bytes::from_static(b"hello ")),
                Ok(Bytes::from_static(b"world")),
            ])
            .boxed()
        };
        let (m, meter) = Metered::new(chunks(), 11);
        let all: Vec<_> = m.collect().await;
        assert!(all.iter().all(|c| c.is_ok()));
        let meter = meter.lock().unwrap().clone();
        assert_eq!(meter.size, 11);
        assert_eq!(
            meter.etag().unwrap(),
            format!("\"{}\"", &hex::encode(Sha256::digest(b"hello world"))[..32])
        );

        let (m, meter) = Metered::new(chunks(), 10);
        let all: Vec<_> = m.collect().await;
        assert!(all.last().unwrap().is_err());
        assert!(meter.lock().unwrap().too_large);
    }
}
