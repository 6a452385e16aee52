//! Helpers for the command-line subcommands that act on the database directly.

use crate::auth::AuthService;
use crate::config::Config;

/// An [`AuthService`] over the configured database, without a server.
pub async fn auth_service(config: &Config) -> anyhow::Result<AuthService> {
    let store = crate::store::open(&config.database_url(), 1).await?;
    AuthService::new(store, config.auth.clone(), config.token_issuer()).await
}
