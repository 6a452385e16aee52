//! Resumable uploads (tus 1.0.0: core, creation, termination) into a bucket. The state of an
//! upload lives in the database (`uploads`, `upload_parts`) and its bytes in the backend, so
//! an upload started on one node resumes on another.
//!
//! Each PATCH streams its bytes into a blob of its own (`uploads/<id>/<offset>-<random>`),
//! all or nothing (the backend's put is atomic); only once the blob is whole does the
//! upload's offset move, by a compare-and-set in the database, so of two PATCHes at one
//! offset exactly one counts. An interrupted PATCH leaves the offset where it was: the
//! client asks (HEAD) and sends again from there, as every tus client does.
//!
//! When the offset reaches the length, the parts are streamed in order into a new object
//! blob and committed through the very path a plain upload takes
//! ([`StorageService::check_write`], [`StorageService::store_blob`],
//! [`StorageService::commit`]): the same rules, limits, trash and change-stream event.
//!
//! Every part is in the blob trash, due at the upload's expiry, from before its first byte is
//! written: an upload nobody finishes is removed by the ordinary sweeper.

use base64::Engine;
use chrono::Utc;
use futures::{StreamExt, TryStreamExt};
use serde_json::{json, Value};

use super::{blob_error, too_large, Access, ObjectView, StorageService};
use super::{ByteStream, Metered};
use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::store::storage::{UploadPart, UploadRow};

/// The tus protocol version spoken.
pub const TUS_VERSION: &str = "1.0.0";
/// The extensions supported, as `Tus-Extension` lists them.
pub const TUS_EXTENSIONS: &str = "creation,termination";

/// What a creation's `Upload-Metadata` says about the object to be.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TusMetadata {
    /// `path`, else `filename`.
    pub path: Option<String>,
    /// `content_type`, else `filetype`.
    pub content_type: Option<String>,
    /// `metadata`: a JSON object of the uploader's own.
    pub metadata: Value,
}

/// Parses `Upload-Metadata`: comma-separated `key base64value` pairs (a key alone has an
/// empty value). Keys other than `path`, `filename`, `content_type`, `filetype` and
/// `metadata` are ignored, as tus clients send their own (`name`, `type`, …).
pub fn parse_metadata(header: Option<&str>) -> ApiResult<TusMetadata> {
    let bad = |m: String| ApiError::invalid_with(m, json!({"header": "upload-metadata"}));
    let mut pairs = std::collections::HashMap::new();
    for pair in header.unwrap_or_default().split(',') {
        let pair = pair.trim();
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.split_once(' ') {
            Some((k, v)) => (k, v.trim()),
            None => (pair, ""),
        };
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value)
            .map_err(|_| bad(format!("the value of `{key}` is not base64")))?;
        let text = String::from_utf8(decoded)
            .map_err(|_| bad(format!("the value of `{key}` is not UTF-8")))?;
        if pairs.insert(key.to_string(), text).is_some() {
            return Err(bad(format!("`{key}` is given twice")));
        }
    }
    let mut take = |k: &str| pairs.remove(k).filter(|v| !v.is_empty());
    let path = take("path").or_else(|| take("filename"));
    let content_type = take("content_type").or_else(|| take("filetype"));
    let metadata = match take("metadata") {
        None => Value::Null,
        Some(text) => serde_json::from_str(&text).map_err(|_| {
            ApiError::invalid_with(
                "metadata must be a JSON object",
                json!({"field": "metadata"}),
            )
        })?,
    };
    Ok(TusMetadata {
        path,
        content_type,
        metadata,
    })
}

/// What a PATCH did: the upload's new offset, and the object once the upload is complete.
#[derive(Debug)]
pub struct Chunk {
    pub offset: u64,
    pub object: Option<ObjectView>,
}

/// Who may continue an upload: the caller who created it.
fn owner_of(caller: &Caller) -> String {
    let actor = caller.actor();
    format!("{}:{}", actor.kind, actor.id)
}

fn no_such_upload() -> ApiError {
    ApiError::NotFound("no such upload (it may have expired or been completed)".into())
}

impl StorageService {
    fn upload_expiry(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::milliseconds((self.config.upload_expiry_hours * 3_600_000.0) as i64)
    }

    /// Creates an upload of `length` bytes. The bucket's write rule decides now, with the
    /// announced size, type and path, and the bucket's limits apply (413, 415); it is asked
    /// again when the upload completes. An empty upload is complete at once.
    pub async fn create_upload(
        &self,
        caller: &Caller,
        bucket: &str,
        length: u64,
        meta: TusMetadata,
    ) -> ApiResult<UploadRow> {
        let path = meta.path.ok_or_else(|| {
            ApiError::invalid_with(
                "Upload-Metadata must name the object's `path` (or `filename`)",
                json!({"header": "upload-metadata"}),
            )
        })?;
        if length > i64::MAX as u64 {
            return Err(too_large(self.config.max_object_size));
        }
        let access = Access::Caller(caller.clone());
        let target = self
            .check_write(
                &access,
                bucket,
                &path,
                meta.content_type.as_deref(),
                meta.metadata,
                Some(length),
            )
            .await?;
        let now = Utc::now();
        let row = UploadRow {
            id: crate::ids::new_id(),
            bucket: target.bucket.row.name.clone(),
            path: target.path,
            owner: owner_of(caller),
            length: length as i64,
            offset: 0,
            content_type: target.content_type,
            metadata: target.metadata,
            created_at: now,
            expires_at: now + self.upload_expiry(),
        };
        self.store.create_upload(&row).await?;
        if length == 0 {
            self.finish_upload(&access, &row).await?;
        }
        Ok(row)
    }

    /// The upload, if `caller` created it (or is an admin or service key) and it has not
    /// expired; otherwise 404, which tells nothing about other callers' uploads.
    pub async fn upload(&self, caller: &Caller, bucket: &str, id: &str) -> ApiResult<UploadRow> {
        // Ids become part of blob keys: only ids this server could have made are looked up.
        if id.len() != 20 || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(no_such_upload());
        }
        let row = self.store.upload(id).await?.ok_or_else(no_such_upload)?;
        if row.bucket != bucket || !(caller.is_privileged() || row.owner == owner_of(caller)) {
            return Err(no_such_upload());
        }
        if row.expires_at <= Utc::now() {
            return Err(ApiError::NotFound("this upload has expired".into()));
        }
        Ok(row)
    }

    /// Appends `body` at `offset` (which must be the upload's offset: 409 otherwise). The
    /// chunk is stored whole or not at all; when it completes the upload, the object is
    /// committed (the write rule asked again) before the answer.
    pub async fn upload_chunk(
        &self,
        caller: &Caller,
        bucket: &str,
        id: &str,
        offset: u64,
        declared_size: Option<u64>,
        body: ByteStream,
    ) -> ApiResult<Chunk> {
        let row = self.upload(caller, bucket, id).await?;
        let at = row.offset as u64;
        if offset != at {
            return Err(ApiError::Conflict(format!(
                "Upload-Offset is {offset} but the upload is at {at}; resume from there"
            )));
        }
        let remaining = (row.length - row.offset) as u64;
        let too_long = || {
            ApiError::PayloadTooLarge(format!(
                "this upload has {remaining} bytes left of its Upload-Length"
            ))
        };
        if declared_size.is_some_and(|s| s > remaining) {
            return Err(too_long());
        }
        let access = Access::Caller(caller.clone());
        if remaining == 0 {
            // Every byte is here but the object is not: an earlier completion failed on the
            // way (the backend, say). This PATCH tries again.
            let object = self.finish_upload(&access, &row).await?;
            return Ok(Chunk {
                offset: at,
                object: Some(object),
            });
        }

        let blob = format!("uploads/{}/{}-{}", row.id, at, crate::ids::new_id());
        self.store.trash_blob(&blob, row.expires_at).await?;
        let (metered, meter) = Metered::new(body, remaining);
        let stored = self.blobs.put(&blob, metered.boxed()).await;
        let meter = meter.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Err(err) = stored {
            let _ = self.blobs.delete(&blob).await;
            if meter.too_large {
                return Err(too_long());
            }
            return Err(blob_error(err));
        }
        if declared_size.is_some_and(|s| s != meter.size) {
            let _ = self.blobs.delete(&blob).await;
            return Err(ApiError::invalid(
                "the body is not as long as its Content-Length",
            ));
        }
        if meter.size == 0 {
            let _ = self.blobs.delete(&blob).await;
            return Ok(Chunk {
                offset: at,
                object: None,
            });
        }
        let part = UploadPart {
            upload_id: row.id.clone(),
            start: row.offset,
            size: meter.size as i64,
            blob: blob.clone(),
        };
        if !self.store.append_upload_part(&part, Utc::now()).await? {
            let _ = self.blobs.delete(&blob).await;
            return Err(ApiError::Conflict(
                "the upload moved on (another request, or it expired) while this chunk \
                 arrived; ask its offset (HEAD) and resume from there"
                    .into(),
            ));
        }
        let offset = at + meter.size;
        if offset < row.length as u64 {
            return Ok(Chunk {
                offset,
                object: None,
            });
        }
        let row = UploadRow {
            offset: offset as i64,
            ..row
        };
        let object = self.finish_upload(&access, &row).await?;
        Ok(Chunk {
            offset,
            object: Some(object),
        })
    }

    /// Terminates the upload: it is gone, and its bytes with it.
    pub async fn terminate_upload(&self, caller: &Caller, bucket: &str, id: &str) -> ApiResult<()> {
        let row = self.upload(caller, bucket, id).await?;
        if !self.discard_upload(&row.id).await? {
            return Err(no_such_upload());
        }
        Ok(())
    }

    /// Streams the parts of a complete upload, in order, into a new object blob and commits
    /// it as a plain upload would be. A completion the bucket refuses (its rule, type or size
    /// limit, changed since the creation) ends the upload; one that fails otherwise (the
    /// backend) leaves it for a retry.
    async fn finish_upload(&self, access: &Access, row: &UploadRow) -> ApiResult<ObjectView> {
        let committed = async {
            let length = row.length as u64;
            let target = self
                .check_write(
                    access,
                    &row.bucket,
                    &row.path,
                    Some(&row.content_type),
                    row.metadata.clone(),
                    Some(length),
                )
                .await?;
            let parts = self.store.upload_parts(&row.id).await?;
            let mut next = 0i64;
            for p in &parts {
                if p.start != next {
                    return Err(ApiError::internal(anyhow::anyhow!(
                        "upload {} has a gap at {next}",
                        row.id
                    )));
                }
                next += p.size;
            }
            if next != row.length {
                return Err(ApiError::internal(anyhow::anyhow!(
                    "upload {} has {next} of {} bytes in its parts",
                    row.id,
                    row.length
                )));
            }
            let blobs = self.blobs.clone();
            // One part open at a time: memory stays flat whatever the upload's size.
            let body = futures::stream::iter(parts.into_iter().map(|p| p.blob))
                .then(move |key| {
                    let blobs = blobs.clone();
                    async move {
                        blobs
                            .get(&key, None)
                            .await
                            .map_err(|e| std::io::Error::other(e.to_string()))
                    }
                })
                .try_flatten()
                .boxed();
            let (blob, meter) = self.store_blob(&target.bucket, body, Some(length)).await?;
            self.commit(access, target, blob, meter).await
        }
        .await;
        match committed {
            Ok(object) => {
                self.discard_upload(&row.id).await?;
                Ok(object)
            }
            Err(err) => {
                let refused = matches!(
                    err,
                    ApiError::PermissionDenied(_)
                        | ApiError::PayloadTooLarge(_)
                        | ApiError::UnsupportedMediaType(_)
                        | ApiError::InvalidArgument { .. }
                        | ApiError::NotFound(_)
                );
                if refused {
                    self.discard_upload(&row.id).await?;
                }
                Err(err)
            }
        }
    }

    /// Forgets the upload and removes its parts (they are in the trash meanwhile, so a
    /// part that cannot be removed now is removed by the sweeper). `false`: it was gone.
    async fn discard_upload(&self, id: &str) -> ApiResult<bool> {
        let Some(parts) = self.store.delete_upload(id, Utc::now()).await? else {
            return Ok(false);
        };
        let mut gone = Vec::with_capacity(parts.len());
        for blob in parts {
            if self.blobs.delete(&blob).await.is_ok() {
                gone.push(blob);
            }
        }
        self.store.forget_blobs(&gone).await?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_pairs() {
        let b = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let header = format!(
            "filename {},filetype {}, metadata {},empty,name {}",
            b("a/b.txt"),
            b("text/plain"),
            b(r#"{"k":1}"#),
            b("ignored")
        );
        let m = parse_metadata(Some(&header)).unwrap();
        assert_eq!(m.path.as_deref(), Some("a/b.txt"));
        assert_eq!(m.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.metadata, json!({"k": 1}));
        let both = format!("filename {},path {}", b("x"), b("y"));
        assert_eq!(
            parse_metadata(Some(&both)).unwrap().path.as_deref(),
            Some("y")
        );
        assert!(parse_metadata(Some("path !!!")).is_err());
        assert!(parse_metadata(Some(&format!("path {},path {}", b("a"), b("b")))).is_err());
        assert_eq!(parse_metadata(None).unwrap(), TusMetadata::default());
    }
}
