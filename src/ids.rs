//! Identifiers and secrets: generated ids are 20 random base62 characters (API.md
//! § Conventions); opaque secrets are longer and only ever stored as SHA-256 digests.

use rand::distributions::{Alphanumeric, DistString};
use sha2::{Digest, Sha256};

/// A new random id: 20 base62 characters (~119 bits).
pub fn new_id() -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), 20)
}

/// A new random secret of `len` base62 characters.
pub fn new_secret(len: usize) -> String {
    Alphanumeric.sample_string(&mut rand::thread_rng(), len)
}

/// Hex SHA-256, the stored form of every opaque secret (refresh tokens, service keys, setup
/// tokens): a database leak reveals no usable credential.
pub fn digest(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Constant-time comparison of two digests.
pub fn digests_equal(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_20_base62_characters() {
        let id = super::new_id();
        assert_eq!(id.len(), 20);
        assert!(id.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(id, super::new_id());
    }
}
