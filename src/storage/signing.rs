//! Signed URLs (`POST /v1/storage/{bucket}/_sign`): a URL that lets whoever holds it `GET`
//! (or `PUT`) one object until it expires, without a token. The signature is an HMAC-SHA256
//! over the method, bucket, path and expiry under a secret kept in the database (so every
//! node checks every other node's URLs); a changed byte anywhere, or an expired time, and
//! the URL answers 403.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How a signed URL was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum SignatureError {
    Invalid,
    Expired,
}

pub struct UrlSigner {
    key: Vec<u8>,
}

impl UrlSigner {
    pub fn new(secret: &[u8]) -> UrlSigner {
        UrlSigner {
            key: secret.to_vec(),
        }
    }

    fn mac(&self, method: &str, bucket: &str, path: &str, expires: i64) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        // Lengths first, so no two different inputs give the same message.
        for part in [method, bucket, path, &expires.to_string()] {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part.as_bytes());
        }
        mac
    }

    /// The signature of `method` (`GET` or `PUT`) on `bucket`/`path` until `expires` (Unix
    /// seconds), hex.
    pub fn sign(&self, method: &str, bucket: &str, path: &str, expires: i64) -> String {
        hex::encode(
            self.mac(method, bucket, path, expires)
                .finalize()
                .into_bytes(),
        )
    }

    /// Checks a signature (in constant time) and then the expiry against `now`.
    pub fn verify(
        &self,
        method: &str,
        bucket: &str,
        path: &str,
        expires: i64,
        signature: &str,
        now: i64,
    ) -> Result<(), SignatureError> {
        let given = hex::decode(signature).map_err(|_| SignatureError::Invalid)?;
        self.mac(method, bucket, path, expires)
            .verify_slice(&given)
            .map_err(|_| SignatureError::Invalid)?;
        if now >= expires {
            return Err(SignatureError::Expired);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_covers_every_part() {
        let s = UrlSigner::new(b"secret");
        let sig = s.sign("GET", "b", "p/q", 100);
        assert_eq!(s.verify("GET", "b", "p/q", 100, &sig, 99), Ok(()));
        assert_eq!(
            s.verify("GET", "b", "p/q", 100, &sig, 100),
            Err(SignatureError::Expired)
        );
        for (m, b, p, e) in [
            ("PUT", "b", "p/q", 100),
            ("GET", "c", "p/q", 100),
            ("GET", "b", "p/r", 100),
            ("GET", "b", "p/q", 101),
            ("GET", "bp", "/q", 100),
        ] {
            assert_eq!(s.verify(m, b, p, e, &sig, 0), Err(SignatureError::Invalid));
        }
        assert_eq!(
            s.verify("GET", "b", "p/q", 100, "zz", 0),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            UrlSigner::new(b"other").verify("GET", "b", "p/q", 100, &sig, 0),
            Err(SignatureError::Invalid)
        );
    }
}
