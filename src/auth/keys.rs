//! Service keys: secrets for your own back-end code, stored as SHA-256 digests and checked
//! against the database on every request (deleting one ends its access at once).

use super::*;

impl AuthService {
    pub async fn create_service_key(&self, name: &str) -> ApiResult<ServiceKey> {
        let name = name.trim();
        if name.is_empty() || name.len() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::invalid_with(
                "name must be 1 to 100 characters, none of them control characters",
                json!({"field": "name"}),
            ));
        }
        let secret = format!("{SERVICE_KEY_PREFIX}{}", new_secret(40));
        let row = ServiceKeyRow {
            id: new_id(),
            name: name.into(),
            key_hash: digest(&secret),
            prefix: secret[..SERVICE_KEY_PREFIX.len() + 6].to_string(),
            created_at: Utc::now(),
            last_used_at: None,
        };
        self.store.insert_service_key(&row).await?;
        let mut key = ServiceKey::from(&row);
        key.key = Some(secret);
        Ok(key)
    }

    pub fn is_service_key(token: &str) -> bool {
        token.starts_with(SERVICE_KEY_PREFIX)
    }

    pub async fn verify_service_key(&self, secret: &str) -> ApiResult<Option<ServiceKeyRow>> {
        Ok(self.store.service_key_by_hash(&digest(secret)).await?)
    }

    pub async fn list_service_keys(&self) -> ApiResult<Vec<ServiceKey>> {
        Ok(self
            .store
            .list_service_keys()
            .await?
            .iter()
            .map(ServiceKey::from)
            .collect())
    }

    /// Deletes a key; its next request is refused, on every node.
    pub async fn delete_service_key(&self, id: &str) -> ApiResult<()> {
        if !self.store.delete_service_key(id).await? {
            return Err(ApiError::NotFound("service key not found".into()));
        }
        Ok(())
    }
}
