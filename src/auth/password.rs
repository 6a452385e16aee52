//! Password hashing with argon2id, always off the async threads (one hash costs tens of
//! milliseconds of CPU by design). At most one hash per core runs at a time: more cannot go
//! faster, and each one holds its memory cost (19 MiB by default) while it runs — a burst of
//! sign-ins on the blocking pool's many threads otherwise grew the process by gigabytes.

use argon2::password_hash::{
    rand_core::OsRng, PasswordHash, PasswordHasher, PasswordVerifier, SaltString,
};
use argon2::{Algorithm, Argon2, Params, Version};

use crate::error::ApiError;

#[derive(Clone)]
pub struct PasswordHasherConfig {
    params: Params,
    permits: std::sync::Arc<tokio::sync::Semaphore>,
    /// A hash of a random password, verified against when the account does not exist so that
    /// a wrong email costs the same time as a wrong password.
    dummy_hash: String,
}

impl PasswordHasherConfig {
    pub fn new(memory_kib: u32, iterations: u32) -> anyhow::Result<Self> {
        let params = Params::new(memory_kib, iterations, 1, None)
            .map_err(|e| anyhow::anyhow!("invalid argon2 parameters: {e}"))?;
        let dummy_hash = hash_sync(&params, "basalt-dummy-password-for-equal-timing")?;
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        Ok(PasswordHasherConfig {
            params,
            permits: std::sync::Arc::new(tokio::sync::Semaphore::new(cores)),
            dummy_hash,
        })
    }

    pub async fn hash(&self, password: &str) -> Result<String, ApiError> {
        let params = self.params.clone();
        let password = password.to_string();
        let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
        tokio::task::spawn_blocking(move || hash_sync(&params, &password))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)
    }

    /// Verifies `password` against `hash`; with `None` (no such account) it verifies against
    /// the dummy hash and answers `false`, taking the same time.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, ApiError> {
        let (hash, real) = match hash {
            Some(h) => (h.to_string(), true),
            None => (self.dummy_hash.clone(), false),
        };
        let password = password.to_string();
        let _permit = self.permits.acquire().await.map_err(ApiError::internal)?;
        let ok = tokio::task::spawn_blocking(move || {
            let parsed =
                PasswordHash::new(&hash).map_err(|e| anyhow::anyhow!("stored hash: {e}"))?;
            Ok::<bool, anyhow::Error>(
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok(),
            )
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?;
        Ok(ok && real)
    }
}

fn hash_sync(params: &Params, password: &str) -> anyhow::Result<String> {
    let salt = SaltString::generate(&mut OsRng);
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    Ok(argon
        .hash_password(password.as_bytes(), &salt)
        .map_err(|e| anyhow::anyhow!("argon2: {e}"))?
        .to_string())
}
