//! The local-disk backend (the default): blobs are files under `<data_dir>/storage`. A blob
//! is written to a temporary file in the same filesystem, flushed to disk, and renamed into
//! place, so a failed write never leaves a partial file under its key.

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::backend::{is_valid_blob_key, BlobError, ByteStream, ObjectStore};

/// Read in chunks of this size: large enough for few syscalls, small enough that memory per
/// download stays flat.
const CHUNK: usize = 64 * 1024;

pub struct LocalStore {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalStore {
    /// Uses (and creates) `root`; temporary files go to `root/.tmp`.
    pub async fn open(root: &Path) -> anyhow::Result<LocalStore> {
        let tmp = root.join(".tmp");
        tokio::fs::create_dir_all(&tmp).await.map_err(|e| {
            anyhow::anyhow!("cannot create the storage folder {}: {e}", tmp.display())
        })?;
        Ok(LocalStore {
            root: root.to_path_buf(),
            tmp,
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, BlobError> {
        if !is_valid_blob_key(key) {
            return Err(BlobError::backend(anyhow::anyhow!(
                "invalid blob key {key:?}"
            )));
        }
        Ok(self.root.join(key))
    }

    async fn write_temp(&self, temp: &Path, mut body: ByteStream) -> Result<u64, BlobError> {
        let mut file = tokio::fs::File::create(temp)
            .await
            .map_err(BlobError::backend)?;
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(BlobError::Body)?;
            file.write_all(&chunk).await.map_err(BlobError::backend)?;
            written += chunk.len() as u64;
        }
        file.flush().await.map_err(BlobError::backend)?;
        file.sync_data().await.map_err(BlobError::backend)?;
        Ok(written)
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn kind(&self) -> &'static str {
        "local"
    }

    async fn put(&self, key: &str, body: ByteStream) -> Result<u64, BlobError> {
        let target = self.path(key)?;
        let temp = self.tmp.join(crate::ids::new_id());
        let written = match self.write_temp(&temp, body).await {
            Ok(n) => n,
            Err(e) => {
                let _ = tokio::fs::remove_file(&temp).await;
                return Err(e);
            }
        };
        let placed = async {
            if let Some(parent) = target.parent() {
                tokio::fs::create_dir_all(parent).await?;
            }
            tokio::fs::rename(&temp, &target).await
        }
        .await;
        if let Err(e) = placed {
            let _ = tokio::fs::remove_file(&temp).await;
            return Err(BlobError::backend(e));
        }
        Ok(written)
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<ByteStream, BlobError> {
        let path = self.path(key)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(BlobError::NotFound),
            Err(e) => return Err(BlobError::backend(e)),
        };
        match range {
            Some(r) => {
                file.seek(SeekFrom::Start(r.start))
                    .await
                    .map_err(BlobError::backend)?;
                let part = file.take(r.end.saturating_sub(r.start));
                Ok(ReaderStream::with_capacity(part, CHUNK).boxed())
            }
            None => Ok(ReaderStream::with_capacity(file, CHUNK).boxed()),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), BlobError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(BlobError::backend(e)),
        }
    }

    async fn ping(&self) -> Result<(), BlobError> {
        tokio::fs::metadata(&self.tmp)
            .await
            .map(|_| ())
            .map_err(BlobError::backend)
    }
}
