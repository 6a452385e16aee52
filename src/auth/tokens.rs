//! Access and admin tokens: EdDSA (Ed25519) JWTs with a `kid`, signing keys generated on
//! first start and kept in the database, the public halves served as a JWKS.
//!
//! Rotation (`basalt keys rotate-signing`) adds a key and retires the others; a retired key
//! still verifies (and stays in the JWKS) until every token it signed has expired. Every node
//! reloads the key set each minute, and at once (rate-limited) when it meets an unknown `kid`,
//! so rotation reaches a running deployment without a restart.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use chrono::{DateTime, Utc};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::store::{SigningKeyRow, Store};

/// `aud` of user access tokens.
pub const USER_AUDIENCE: &str = "basalt";
/// `aud` of admin tokens: a user token can never pass as an admin one.
pub const ADMIN_AUDIENCE: &str = "basalt-admin";

/// The claims of a user access token (API.md § Auth).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    /// `authenticated` or `anonymous`.
    pub role: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub is_anonymous: bool,
    pub session_id: String,
    /// Custom claims set by admins.
    pub claims: Value,
    pub iat: i64,
    pub exp: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdminClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub role: String,
    pub iat: i64,
    pub exp: i64,
}

/// What a verified bearer JWT turned out to be.
#[derive(Debug, Clone)]
pub enum VerifiedToken {
    User(UserClaims),
    Admin(AdminClaims),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token has expired")]
    Expired,
    #[error("the token is not a valid basalt token")]
    Invalid,
    #[error("the token is signed by an unknown key")]
    UnknownKey,
}

struct KeySet {
    active_kid: String,
    encoding: EncodingKey,
    decoding: HashMap<String, DecodingKey>,
    jwks: Value,
    loaded_at: Instant,
}

/// Verified tokens are remembered (by SHA-256 of the token) until they expire, so a busy
/// client pays for the signature check once per token rather than once per request.
const VERIFIED_CACHE_CAPACITY: usize = 50_000;

pub struct TokenService {
    store: Arc<dyn Store>,
    keys: RwLock<KeySet>,
    last_forced_reload: Mutex<Instant>,
    issuer: String,
    pub access_ttl: Duration,
    pub admin_ttl: Duration,
    verified: Mutex<HashMap<[u8; 32], UserClaims>>,
}

impl TokenService {
    /// Loads the signing keys, creating the first one when the database has none.
    pub async fn new(
        store: Arc<dyn Store>,
        issuer: String,
        access_ttl: Duration,
        admin_ttl: Duration,
    ) -> anyhow::Result<Self> {
        let max_ttl = access_ttl.max(admin_ttl);
        let mut rows = store.signing_keys().await?;
        if !rows.iter().any(|k| k.retired_at.is_none()) {
            let row = generate_key()?;
            store.insert_signing_key(&row).await?;
            rows = store.signing_keys().await?;
        }
        let keys = build_key_set(&rows, max_ttl)?;
        Ok(TokenService {
            store,
            keys: RwLock::new(keys),
            last_forced_reload: Mutex::new(Instant::now() - Duration::from_secs(60)),
            issuer,
            access_ttl,
            admin_ttl,
            verified: Mutex::new(HashMap::new()),
        })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Re-reads the key set from the database (rotation by another process or node).
    pub async fn reload(&self) -> anyhow::Result<()> {
        let rows = self.store.signing_keys().await?;
        let keys = build_key_set(&rows, self.access_ttl.max(self.admin_ttl))?;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        Ok(())
    }

    /// Reloads when the set is older than a minute; called from a background task.
    pub async fn reload_if_stale(&self) {
        let stale = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .loaded_at
            .elapsed()
            > Duration::from_secs(60);
        if stale {
            if let Err(err) = self.reload().await {
                tracing::warn!(error = %err, "could not reload signing keys");
            }
        }
    }

    pub fn jwks(&self) -> Value {
        self.keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .jwks
            .clone()
    }

    fn sign<T: Serialize>(&self, claims: &T) -> anyhow::Result<String> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(keys.active_kid.clone());
        Ok(jsonwebtoken::encode(&header, claims, &keys.encoding)?)
    }

    /// Signs an access token for a user session. Returns the token and its expiry.
    pub fn issue_user_token(
        &self,
        user: &crate::store::UserRow,
        session_id: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<(String, i64)> {
        let exp = now.timestamp() + self.access_ttl.as_secs() as i64;
        let claims = UserClaims {
            iss: self.issuer.clone(),
            aud: USER_AUDIENCE.into(),
            sub: user.id.clone(),
            role: if user.is_anonymous {
                "anonymous"
            } else {
                "authenticated"
            }
            .into(),
            email: user.email.clone(),
            email_verified: user.email_verified,
            is_anonymous: user.is_anonymous,
            session_id: session_id.into(),
            claims: user.claims.clone(),
            iat: now.timestamp(),
            exp,
        };
        Ok((self.sign(&claims)?, exp))
    }

    pub fn issue_admin_token(
        &self,
        admin_id: &str,
        now: DateTime<Utc>,
    ) -> anyhow::Result<(String, i64)> {
        let exp = now.timestamp() + self.admin_ttl.as_secs() as i64;
        let claims = AdminClaims {
            iss: self.issuer.clone(),
            aud: ADMIN_AUDIENCE.into(),
            sub: admin_id.into(),
            role: "admin".into(),
            iat: now.timestamp(),
            exp,
        };
        Ok((self.sign(&claims)?, exp))
    }

    /// Verifies a bearer JWT: algorithm EdDSA only (so `none` and HS256-with-the-public-key
    /// forgeries fail), a known `kid`, our issuer, one of our audiences, not expired.
    pub async fn verify(&self, token: &str) -> Result<VerifiedToken, TokenError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Utc::now().timestamp();
        if let Some(claims) = self
            .verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
        {
            if claims.exp > now {
                return Ok(VerifiedToken::User(claims.clone()));
            }
            return Err(TokenError::Expired);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        let verified = match self.verify_with_kid(token, &kid) {
            Err(TokenError::UnknownKey) if self.may_force_reload() => {
                self.reload().await.map_err(|_| TokenError::UnknownKey)?;
                self.verify_with_kid(token, &kid)
            }
            other => other,
        }?;
        if let VerifiedToken::User(claims) = &verified {
            let mut cache = self.verified.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() >= VERIFIED_CACHE_CAPACITY {
                cache.retain(|_, c| c.exp > now);
                if cache.len() >= VERIFIED_CACHE_CAPACITY {
                    cache.clear();
                }
            }
            cache.insert(digest, claims.clone());
        }
        Ok(verified)
    }

    fn may_force_reload(&self) -> bool {
        let mut last = self
            .last_forced_reload
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.elapsed() > Duration::from_secs(5) {
            *last = Instant::now();
            true
        } else {
            false
        }
    }

    fn verify_with_kid(&self, token: &str, kid: &str) -> Result<VerifiedToken, TokenError> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let key = keys.decoding.get(kid).ok_or(TokenError::UnknownKey)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = 0;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[USER_AUDIENCE, ADMIN_AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        let data =
            jsonwebtoken::decode::<Value>(token, key, &validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        // jsonwebtoken still accepts a token in its `exp` second; a token is valid strictly
        // before `exp`, as RFC 7519 § 4.1.4 has it (and as the verified cache checks).
        let exp = data
            .claims
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or(TokenError::Invalid)?;
        if exp <= Utc::now().timestamp() {
            return Err(TokenError::Expired);
        }
        let aud = data
            .claims
            .get("aud")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if aud == ADMIN_AUDIENCE {
            serde_json::from_value(data.claims)
                .map(VerifiedToken::Admin)
                .map_err(|_| TokenError::Invalid)
        } else {
            serde_json::from_value(data.claims)
                .map(VerifiedToken::User)
                .map_err(|_| TokenError::Invalid)
        }
    }

    /// Adds a new active key and retires the others (the CLI's `keys rotate-signing`).
    pub async fn rotate(store: &dyn Store) -> anyhow::Result<String> {
        let row = generate_key()?;
        store.insert_signing_key(&row).await?;
        store
            .retire_signing_keys_except(&row.kid, Utc::now())
            .await?;
        Ok(row.kid)
    }
}

fn generate_key() -> anyhow::Result<SigningKeyRow> {
    let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let der = signing
        .to_pkcs8_der()
        .map_err(|e| anyhow::anyhow!("encode signing key: {e}"))?;
    let public = signing.verifying_key().to_bytes().to_vec();
    let kid = hex::encode(&Sha256::digest(&public)[..8]);
    Ok(SigningKeyRow {
        kid,
        algorithm: "EdDSA".into(),
        private_key: der.as_bytes().to_vec(),
        public_key: public,
        created_at: Utc::now(),
        retired_at: None,
    })
}

fn build_key_set(rows: &[SigningKeyRow], max_ttl: Duration) -> anyhow::Result<KeySet> {
    let now = Utc::now();
    // A node learns of a rotation at its next reload (up to ~90 s later) and signs with the
    // retired key until then, so the retired key stays valid that much past its last token.
    let grace = chrono::Duration::from_std(max_ttl + std::time::Duration::from_secs(120))?;
    let active = rows
        .iter()
        .find(|k| k.retired_at.is_none())
        .ok_or_else(|| anyhow::anyhow!("no active signing key"))?;
    let mut decoding = HashMap::new();
    let mut jwks = Vec::new();
    for key in rows {
        let published = match key.retired_at {
            None => true,
            Some(retired) => retired + grace > now,
        };
        if !published {
            continue;
        }
        let x = URL_SAFE_NO_PAD.encode(&key.public_key);
        decoding.insert(key.kid.clone(), DecodingKey::from_ed_components(&x)?);
        jwks.push(json!({
            "kty": "OKP", "crv": "Ed25519", "x": x, "kid": key.kid, "alg": "EdDSA", "use": "sig",
        }));
    }
    Ok(KeySet {
        active_kid: active.kid.clone(),
        encoding: EncodingKey::from_ed_der(&active.private_key),
        decoding,
        jwks: json!({ "keys": jwks }),
        loaded_at: Instant::now(),
    })
}
