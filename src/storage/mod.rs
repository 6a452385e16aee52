//! File storage (API.md § Storage): buckets with rules, objects whose metadata lives in the
//! database and whose bytes live in a backend ([`backend::ObjectStore`]: local disk or S3).

pub mod backend;
pub mod local;
pub mod s3;

use std::sync::Arc;

use crate::config::{Config, StorageBackend};
pub use backend::{BlobError, ByteStream, ObjectStore};

/// Opens the configured backend: local disk under `<data_dir>/storage` (the default) or S3.
pub async fn open_backend(config: &Config) -> anyhow::Result<Arc<dyn ObjectStore>> {
    match config.storage.backend {
        StorageBackend::Local => Ok(Arc::new(
            local::LocalStore::open(&config.data_dir.join("storage")).await?,
        )),
        StorageBackend::S3 => Ok(Arc::new(s3::open(&config.storage.s3).await?)),
    }
}
