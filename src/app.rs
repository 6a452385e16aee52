//! The application: shared state, building it from a [`Config`], binding the listeners (the
//! API, and `metrics.listen` when set) and serving until a shutdown signal, after which
//! in-flight requests are given time to finish. How connections are served is
//! [`crate::http::server`]'s business.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::limits::AuthRateLimits;
use crate::auth::AuthService;
use crate::config::Config;
use crate::documents::DocumentService;
use crate::http::server::{serve, ServeOptions};
use crate::store::Store;

/// What every handler can reach. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub audit: Arc<crate::audit::AuditLog>,
    pub store: Arc<dyn Store>,
    pub auth: Arc<AuthService>,
    pub auth_limits: Arc<AuthRateLimits>,
    pub documents: Arc<DocumentService>,
    /// The change stream: in-process fan-out, log reads, durable consumers, retention.
    pub changes: Arc<crate::changes::ChangeBus>,
    /// Realtime subscriptions and channels (`GET /v1/realtime`).
    pub realtime: Arc<crate::realtime::Realtime>,
    /// Buckets and objects (`/v1/storage`).
    pub storage: Arc<crate::storage::StorageService>,
    pub metrics: &'static PrometheusHandle,
    /// The externally visible base URL (`public_url`, or `http://<bound address>`).
    pub public_url: Arc<str>,
}

pub struct App {
    listener: TcpListener,
    /// The listener serving only `/metrics`, when `metrics.listen` is set.
    metrics_listener: Option<TcpListener>,
    state: AppState,
    /// The one-time admin setup token, when no admin exists yet (logged at start).
    setup_token: Option<String>,
}

impl App {
    /// Opens the store (applying migrations), loads or creates the signing keys and binds the
    /// listener. Port 0 binds a free port (tests); [`App::local_addr`] tells which.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        crate::http::server::raise_fd_limit();
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let metrics_listener = match config.metrics.listen {
            Some(address) => Some(TcpListener::bind(address).await.map_err(|e| {
                anyhow::anyhow!("cannot listen on {address} (metrics.listen): {e}")
            })?),
            None => None,
        };
        let local_addr = listener.local_addr()?;
        let public_url: Arc<str> = config.public_url(local_addr).into();
        let store =
            crate::store::open(&config.database_url(), config.database.read_pool_size).await?;
        let auth =
            AuthService::new(store.clone(), config.auth.clone(), config.token_issuer()).await?;
        let changes =
            crate::changes::ChangeBus::start(store.clone(), config.changes.clone()).await?;
        let auth = Arc::new(auth);
        let documents =
            Arc::new(DocumentService::new(store.clone(), config.documents.clone()).await?);
        let realtime = crate::realtime::Realtime::start(
            store.clone(),
            documents.clone(),
            auth.clone(),
            changes.clone(),
            config.realtime.clone(),
        )
        .await?;
        let storage = Arc::new(
            crate::storage::StorageService::new(
                store.clone(),
                crate::storage::open_backend(&config).await?,
                documents.clone(),
                config.storage.clone(),
            )
            .await?,
        );
        let state = AppState {
            changes,
            realtime,
            storage,
            audit: Arc::new(crate::audit::AuditLog::new(store.clone())),
            auth_limits: Arc::new(AuthRateLimits::new(&config.rate_limit)),
            documents,
            config: Arc::new(config),
            store,
            auth,
            metrics: crate::telemetry::prometheus(),
            public_url,
        };
        // Made here rather than when serving starts, so the token is known before any
        // request can arrive. Each start replaces the previous token: the newest logged link
        // is the one that works.
        let setup_token = state.auth.setup_token().await?;
        Ok(App {
            listener,
            metrics_listener,
            state,
            setup_token,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The address of the `metrics.listen` listener, when there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    pub fn setup_token(&self) -> Option<&str> {
        self.setup_token.as_deref()
    }

    /// Serves until `shutdown` resolves, then stops accepting and waits up to
    /// `http.shutdown_grace_secs` for in-flight requests.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let state = self.state.clone();
        if let Some(token) = &self.setup_token {
            tracing::warn!(
                "no admin exists yet: open {}/console/setup?token={token} to create one (or run `basalt admin create`)",
                state.public_url
            );
        }
        let background = tokio::spawn(background_tasks(state.clone()));
        let options = ServeOptions::from_config(&state.config.http);
        let (stop_tx, stop_rx) = watch::channel(false);
        let realtime = state.realtime.clone();
        tokio::spawn(async move {
            shutdown.await;
            tracing::info!("shutting down: finishing in-flight requests");
            realtime.begin_shutdown();
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stopped| *stopped).await;
        };
        tracing::info!(address = %self.local_addr(), database = state.store.dialect(), "basalt is listening");
        let metrics = self.metrics_listener.map(|listener| {
            if let Ok(address) = listener.local_addr() {
                tracing::info!(%address, "serving /metrics on its own listener");
            }
            // Scrapers need few connections; the cap keeps this port from being a second
            // way to exhaust descriptors.
            let options = ServeOptions {
                max_connections: 64,
                ..options.clone()
            };
            tokio::spawn(serve(
                listener,
                crate::http::metrics_router(state.clone()),
                options,
                stopped(stop_rx.clone()),
            ))
        });
        serve(
            self.listener,
            crate::http::router(state.clone()),
            options,
            stopped(stop_rx),
        )
        .await;
        if let Some(metrics) = metrics {
            let _ = metrics.await;
        }
        background.abort();
        state.realtime.stop().await;
        Ok(())
    }
}

/// Periodic upkeep: reload signing keys (rotation by another node or the CLI), forget
/// rate-limit state of quiet clients, remove the bytes of replaced and deleted objects, prune
/// the change log past its retention.
async fn background_tasks(state: AppState) {
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        state.auth.tokens.reload_if_stale().await;
        match state.storage.sweep().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(blobs = n, "removed replaced and abandoned blobs"),
            Err(err) => tracing::warn!(error = %err, "could not sweep the storage trash"),
        }
        state.auth_limits.shrink();
        if ticks.is_multiple_of(20) {
            match state
                .changes
                .prune(state.config.documents.change_retention_hours)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "pruned the change log"),
                Err(err) => tracing::warn!(error = %err, "could not prune the change log"),
            }
            if let Err(err) = state.store.optimize().await {
                tracing::warn!(error = %err, "could not refresh the query planner's statistics");
            }
        }
        ticks += 1;
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called (not when
/// the future is first polled), so a signal arriving right after start-up is not lost.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    #[cfg(unix)]
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
    async move {
        #[cfg(unix)]
        {
            let term = async {
                match terminate.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            let int = async {
                match interrupt.as_mut() {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = term => {},
                _ = int => {},
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
