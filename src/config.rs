//! Configuration: built-in defaults, then `basalt.toml` (from `--config`, else `./basalt.toml`
//! if present), then `BASALT_*` environment variables where a double underscore nests
//! (`BASALT_DATABASE__URL` ↔ `database.url`). The key names are a contract (API.md
//! § Operations). Secrets are wrapped in [`Secret`] so they never reach a log or `Debug`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Deserializer, Serialize};

/// A value that must never be printed: `Debug` and `Display` show `[redacted]`.
#[derive(Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    pub fn expose(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Secret<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Secret)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Where SQLite and local storage keep their files.
    pub data_dir: PathBuf,
    /// The URL clients reach this server at (links in mails, setup link). Defaults to
    /// `http://<listen>`.
    pub public_url: Option<String>,
    pub database: DatabaseConfig,
    pub storage: StorageConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub documents: DocumentsConfig,
    pub changes: ChangesConfig,
    pub metrics: MetricsConfig,
    pub realtime: RealtimeConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` or `postgres://…`; defaults to `sqlite://<data_dir>/basalt.db`.
    pub url: Option<Secret<String>>,
    /// Read connections for SQLite.
    pub read_pool_size: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    pub backend: StorageBackend,
    pub s3: S3Config,
    /// The largest object any bucket accepts, in bytes (a bucket's `max_object_size` may
    /// only lower it).
    pub max_object_size: u64,
    /// How long an upload's body may take to arrive, in seconds (other requests have
    /// `http.body_read_timeout_secs`). Use resumable uploads for slower links.
    pub upload_timeout_secs: u64,
    /// How long the bytes of a replaced or deleted object stay readable for downloads that
    /// had already started, in seconds.
    pub replaced_grace_secs: u64,
    /// The longest `expires_in` a signed URL may have, in seconds.
    pub max_signed_url_secs: u64,
    /// How long a resumable (tus) upload may stay unfinished, in hours (fractions allowed);
    /// then it is gone and its bytes are removed.
    pub upload_expiry_hours: f64,
    /// Image transforms on download (`?width=&height=&fit=&format=`).
    pub transform: TransformConfig,
}

/// Bounds on image transforms: what they read, decode and make, and how many run at once,
/// so that one request (or many) cannot take the server's memory or CPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformConfig {
    /// The largest original a transform reads, in bytes; larger → 413.
    pub max_input_bytes: u64,
    /// The most pixels (width × height, from the image's header) a transform decodes;
    /// more → 413 before anything is allocated.
    pub max_pixels: u64,
    /// The largest `width` or `height` a transform may ask for; larger → 400.
    pub max_dimension: u32,
    /// Transforms decoded and encoded at once (0: the number of CPUs); others wait.
    pub concurrency: usize,
    /// How long a cached transform is kept before it is made again on its next request,
    /// in seconds. (The cache of an object's old version goes with its bytes.)
    pub cache_ttl_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StorageBackend {
    Local,
    S3,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub bucket: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<Secret<String>>,
    pub force_path_style: bool,
    /// A key prefix for every blob (`team-a/basalt`), so deployments can share a bucket.
    pub prefix: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `basalt=debug,tower_http=info`); `RUST_LOG` wins when set.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Largest JSON request body in bytes; larger ones answer 413.
    pub body_limit: usize,
    /// Origins allowed by CORS; `["*"]` allows any.
    pub cors_origins: Vec<String>,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    pub shutdown_grace_secs: u64,
    /// Seconds a client has to send a request's line and headers, counted from the
    /// connection's start or the request's first byte; slower connections are closed.
    pub header_read_timeout_secs: u64,
    /// Seconds a keep-alive connection may sit with no request (or a client may stop
    /// reading an answer) before it is closed.
    pub idle_timeout_secs: u64,
    /// Seconds a request's whole body has to arrive, counted from its headers; later → 408.
    pub body_read_timeout_secs: u64,
    /// Open connections served at once (lowered to fit the file-descriptor limit).
    pub max_connections: usize,
    /// Longest request target (path and query) in bytes; longer → 414.
    pub max_uri_bytes: usize,
    /// Largest request head (request line and headers) in bytes; larger → 431.
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Access-token lifetime in seconds (default 15 min).
    pub access_token_ttl_secs: u64,
    /// Refresh-token lifetime in seconds (default 30 days).
    pub refresh_token_ttl_secs: u64,
    /// Admin-token lifetime in seconds (default 1 h).
    pub admin_token_ttl_secs: u64,
    /// How long an already-rotated refresh token still yields its successor, so two tabs
    /// refreshing at once are not logged out.
    pub refresh_reuse_grace_secs: u64,
    pub password_min_length: usize,
    /// Allow `POST /v1/auth/anonymous`.
    pub anonymous_enabled: bool,
    /// Allow `POST /v1/auth/signup`.
    pub signup_enabled: bool,
    /// argon2id memory cost in KiB.
    pub argon2_memory_kib: u32,
    /// argon2id passes.
    pub argon2_iterations: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    pub enabled: bool,
    /// Sign-in, signup, recover and otp attempts per client IP per minute.
    pub auth_per_ip_per_minute: u32,
    /// Attempts per account (email) per minute.
    pub auth_per_account_per_minute: u32,
}

/// Who may read `/metrics`. On the main listener: an admin token, a service key, or
/// `token`. On `listen` (a listener serving only `/metrics`, meant for a private interface):
/// anyone, or only holders of `token` when it is set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// A bearer token for scrapers (`Authorization: Bearer <token>`).
    pub token: Option<Secret<String>>,
    /// A separate address serving only `/metrics`.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DocumentsConfig {
    /// Largest document, in bytes of JSON.
    pub max_document_bytes: usize,
    /// Deepest nesting of objects and arrays in a document.
    pub max_depth: usize,
    /// How long change-log entries are kept, in hours.
    pub change_retention_hours: u64,
    /// Rule evaluation time one read request may spend on per-row checks, in milliseconds;
    /// past it a page ends early with a cursor and a count or aggregate answers 400.
    pub read_rules_time_ms: u64,
    /// Rule evaluation time one write request (a batch too) may spend, in milliseconds.
    pub write_rules_time_ms: u64,
}

/// The change stream (API.md § Change stream); its retention is
/// `documents.change_retention_hours`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChangesConfig {
    /// How long a durable consumer that does not move may hold back retention, in hours;
    /// past it the log is pruned without waiting for it (and a warning is logged).
    pub consumer_max_lag_hours: u64,
    /// PostgreSQL: how often a node reads the log without being woken by a commit of its own
    /// or another node's announcement, in milliseconds (a safety net; announcements are what
    /// make cross-node delivery fast).
    pub poll_interval_ms: u64,
}

/// Realtime (`GET /v1/realtime`, docs/realtime.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RealtimeConfig {
    /// Subscriptions one connection may hold at once.
    pub max_subscriptions_per_connection: usize,
    /// Channels one connection may join at once.
    pub max_channels_per_connection: usize,
    /// Largest message a client may send, in bytes; a larger one is answered with an error
    /// and dropped. Frames over four times this close the connection (1009).
    pub max_message_bytes: usize,
    /// Messages queued for one client before it counts as too slow and is closed (4008).
    pub send_queue: usize,
    /// Bytes queued for one client before it counts as too slow and is closed (4008).
    pub send_queue_bytes: usize,
    /// Changes queued for one connection before it reads them from the change log instead.
    pub event_queue: usize,
    /// A connection that sends no valid message this long after opening is closed.
    pub hello_timeout_secs: u64,
    /// How often the server pings each connection (and announces this node to the others);
    /// a connection silent for two of these is closed.
    pub heartbeat_secs: u64,
    /// How long after its last heartbeat another node's presence entries are dropped.
    pub presence_timeout_secs: u64,
    /// Most missed changes one resume replays; past it the subscription gets a fresh
    /// snapshot with `reset: true`.
    pub max_resume_events: usize,
    /// Who may join and broadcast on channels: CEL over `auth` and `channel`. Unset: users
    /// may not (admins and service keys always may).
    pub channels: ChannelRulesConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChannelRulesConfig {
    /// Who may join a channel (and see its presence and broadcasts).
    #[serde(deserialize_with = "rule_text")]
    pub join: Option<String>,
    /// Who may broadcast on a channel they joined.
    #[serde(deserialize_with = "rule_text")]
    pub broadcast: Option<String>,
}

/// A rule's text. `BASALT_REALTIME__CHANNELS__JOIN=true` arrives as a boolean (the
/// environment provider parses values), and `true` is a fine rule: take it as its text.
fn rule_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Text(String),
        Bool(bool),
        Int(i64),
    }
    Ok(Option::<Given>::deserialize(d)?.map(|t| match t {
        Given::Text(s) => s,
        Given::Bool(b) => b.to_string(),
        Given::Int(n) => n.to_string(),
    }))
}

impl Default for RealtimeConfig {
    fn default() -> Self {
        RealtimeConfig {
            max_subscriptions_per_connection: 100,
            max_channels_per_connection: 20,
            max_message_bytes: 64 * 1024,
            send_queue: 1024,
            send_queue_bytes: 32 * 1024 * 1024,
            event_queue: 1024,
            hello_timeout_secs: 10,
            heartbeat_secs: 25,
            presence_timeout_secs: 15,
            max_resume_events: 10_000,
            channels: ChannelRulesConfig::default(),
        }
    }
}

impl Default for ChangesConfig {
    fn default() -> Self {
        ChangesConfig {
            consumer_max_lag_hours: 24 * 30,
            poll_interval_ms: 1000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:7070".parse().expect("valid default address"),
            data_dir: PathBuf::from("./basalt_data"),
            public_url: None,
            database: DatabaseConfig::default(),
            storage: StorageConfig::default(),
            log: LogConfig::default(),
            http: HttpConfig::default(),
            auth: AuthConfig::default(),
            rate_limit: RateLimitConfig::default(),
            documents: DocumentsConfig::default(),
            changes: ChangesConfig::default(),
            metrics: MetricsConfig::default(),
            realtime: RealtimeConfig::default(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: None,
            read_pool_size: 4,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Local,
            s3: S3Config::default(),
            max_object_size: 5 * 1024 * 1024 * 1024,
            upload_timeout_secs: 3600,
            replaced_grace_secs: 60,
            max_signed_url_secs: 7 * 24 * 3600,
            upload_expiry_hours: 24.0,
            transform: TransformConfig::default(),
        }
    }
}

impl Default for TransformConfig {
    fn default() -> Self {
        TransformConfig {
            max_input_bytes: 20 * 1024 * 1024,
            max_pixels: 40_000_000,
            max_dimension: 4096,
            concurrency: 0,
            cache_ttl_secs: 30 * 24 * 3600,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            body_limit: 1024 * 1024,
            cors_origins: vec!["*".into()],
            shutdown_grace_secs: 30,
            header_read_timeout_secs: 10,
            idle_timeout_secs: 60,
            body_read_timeout_secs: 60,
            max_connections: 10_000,
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 32 * 1024,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            access_token_ttl_secs: 15 * 60,
            refresh_token_ttl_secs: 30 * 24 * 3600,
            admin_token_ttl_secs: 3600,
            refresh_reuse_grace_secs: 10,
            password_min_length: 8,
            anonymous_enabled: true,
            signup_enabled: true,
            argon2_memory_kib: 19 * 1024,
            argon2_iterations: 2,
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            auth_per_ip_per_minute: 60,
            auth_per_account_per_minute: 10,
        }
    }
}

impl Default for DocumentsConfig {
    fn default() -> Self {
        DocumentsConfig {
            max_document_bytes: 1024 * 1024,
            read_rules_time_ms: 2000,
            write_rules_time_ms: 250,
            max_depth: 32,
            change_retention_hours: 24 * 7,
        }
    }
}

impl Config {
    /// Loads defaults → the TOML file → `BASALT_*` variables. `file` is `--config`; without it
    /// `./basalt.toml` is read when it exists. Errors name the offending key.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                figment = figment.merge(Toml::file(path));
            }
            None => figment = figment.merge(Toml::file("basalt.toml")),
        }
        figment = figment.merge(Self::env());
        Self::extract(figment)
    }

    /// The `BASALT_*` environment provider, for the variables that name a setting. Others
    /// (`BASALT_TEST_*` of the test suite, a `BASALT_VERSION` a deployment happens to set)
    /// are left out rather than stopping start-up; `main` warns about them. A typo inside a
    /// section (`BASALT_DATABASE__ULR`) still names a setting's section and is refused.
    fn env() -> Env {
        Env::prefixed("BASALT_")
            .filter(|key| names_setting(key.as_str()))
            .split("__")
    }

    /// `BASALT_*` variables that name no setting and were ignored (test-suite ones aside).
    pub fn ignored_env_vars() -> Vec<String> {
        let mut ignored: Vec<String> = std::env::vars()
            .filter_map(|(name, _)| {
                let rest = name.strip_prefix("BASALT_")?;
                let ignored =
                    !names_setting(rest) && !rest.to_ascii_lowercase().starts_with("test_");
                ignored.then_some(name)
            })
            .collect();
        ignored.sort();
        ignored
    }

    fn extract(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(|e| {
            let e = e
                .into_iter()
                .next()
                .expect("an error has at least one entry");
            let key = if e.path.is_empty() {
                String::new()
            } else {
                format!("`{}`: ", e.path.join("."))
            };
            ConfigError(format!("{key}{}", e.kind))
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(url) = &self.database.url {
            let url = url.expose();
            let known = ["sqlite://", "postgres://", "postgresql://"];
            if !known.iter().any(|p| url.starts_with(p)) {
                return Err(ConfigError(
                    "`database.url`: must start with sqlite://, postgres:// or postgresql://"
                        .into(),
                ));
            }
        }
        if self.auth.access_token_ttl_secs == 0 {
            return Err(ConfigError(
                "`auth.access_token_ttl_secs`: must be positive".into(),
            ));
        }
        if self.http.body_limit < 1024 {
            return Err(ConfigError(
                "`http.body_limit`: must be at least 1024 bytes".into(),
            ));
        }
        for (key, secs) in [
            (
                "http.header_read_timeout_secs",
                self.http.header_read_timeout_secs,
            ),
            ("http.idle_timeout_secs", self.http.idle_timeout_secs),
            (
                "http.body_read_timeout_secs",
                self.http.body_read_timeout_secs,
            ),
        ] {
            if secs == 0 {
                return Err(ConfigError(format!("`{key}`: must be positive")));
            }
        }
        if self.http.max_connections == 0 {
            return Err(ConfigError(
                "`http.max_connections`: must be positive".into(),
            ));
        }
        // Hours become a chrono::Duration, which a huge value would overflow.
        if self.changes.consumer_max_lag_hours > 24 * 365 * 100
            || self.documents.change_retention_hours > 24 * 365 * 100
        {
            return Err(ConfigError(
                "`changes.consumer_max_lag_hours` and `documents.change_retention_hours`: at \
                 most 876000 (100 years)"
                    .into(),
            ));
        }
        if self.changes.poll_interval_ms < 10 {
            return Err(ConfigError(
                "`changes.poll_interval_ms`: must be at least 10 (it is a safety net; commits \
                 wake readers at once)"
                    .into(),
            ));
        }
        if self.documents.read_rules_time_ms == 0 || self.documents.write_rules_time_ms == 0 {
            return Err(ConfigError(
                "`documents.read_rules_time_ms` and `documents.write_rules_time_ms`: must be \
                 positive"
                    .into(),
            ));
        }
        let rt = &self.realtime;
        for (key, value) in [
            (
                "realtime.max_subscriptions_per_connection",
                rt.max_subscriptions_per_connection as u64,
            ),
            (
                "realtime.max_channels_per_connection",
                rt.max_channels_per_connection as u64,
            ),
            ("realtime.send_queue", rt.send_queue as u64),
            (
                "realtime.send_queue_bytes",
                (rt.send_queue_bytes / (1024 * 1024)) as u64,
            ),
            ("realtime.event_queue", rt.event_queue as u64),
            ("realtime.hello_timeout_secs", rt.hello_timeout_secs),
            ("realtime.heartbeat_secs", rt.heartbeat_secs),
            ("realtime.presence_timeout_secs", rt.presence_timeout_secs),
        ] {
            if value == 0 || value > 1_000_000 {
                return Err(ConfigError(format!(
                    "`{key}`: must be between 1 and 1000000"
                )));
            }
        }
        if !(1024..=16 * 1024 * 1024).contains(&rt.max_message_bytes) {
            return Err(ConfigError(
                "`realtime.max_message_bytes`: must be between 1024 and 16777216".into(),
            ));
        }
        for (key, rule) in [
            ("realtime.channels.join", &rt.channels.join),
            ("realtime.channels.broadcast", &rt.channels.broadcast),
        ] {
            if let Some(rule) = rule {
                crate::rules::Rule::compile_channel(rule)
                    .map_err(|e| ConfigError(format!("`{key}`: {e}")))?;
            }
        }
        if self.http.max_header_bytes < 8 * 1024 {
            return Err(ConfigError(
                "`http.max_header_bytes`: must be at least 8192 bytes".into(),
            ));
        }
        if self.http.max_uri_bytes < 256 || self.http.max_uri_bytes >= self.http.max_header_bytes {
            return Err(ConfigError(
                "`http.max_uri_bytes`: must be at least 256 and below http.max_header_bytes".into(),
            ));
        }
        if self
            .metrics
            .token
            .as_ref()
            .is_some_and(|t| t.expose().len() < 16)
        {
            return Err(ConfigError(
                "`metrics.token`: must be at least 16 characters".into(),
            ));
        }
        let expiry = self.storage.upload_expiry_hours;
        if !(expiry.is_finite() && expiry > 0.0 && expiry <= 24.0 * 365.0) {
            return Err(ConfigError(
                "`storage.upload_expiry_hours`: must be more than 0 and at most 8760 (a year)"
                    .into(),
            ));
        }
        if self.storage.backend == StorageBackend::S3 {
            crate::storage::s3::check_settings(&self.storage.s3).map_err(ConfigError)?;
        }
        let tr = &self.storage.transform;
        if tr.max_input_bytes == 0 || tr.max_pixels == 0 || tr.cache_ttl_secs == 0 {
            return Err(ConfigError(
                "`storage.transform`: max_input_bytes, max_pixels and cache_ttl_secs must be positive"
                    .into(),
            ));
        }
        if !(1..=16384).contains(&tr.max_dimension) {
            return Err(ConfigError(
                "`storage.transform.max_dimension`: must be between 1 and 16384".into(),
            ));
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(ConfigError(
                    "`public_url`: must start with http:// or https://".into(),
                ));
            }
        }
        Ok(())
    }

    /// The database URL in force (the SQLite default when none is configured).
    pub fn database_url(&self) -> String {
        match &self.database.url {
            Some(url) => url.expose().clone(),
            None => format!("sqlite://{}", self.data_dir.join("basalt.db").display()),
        }
    }

    /// The `iss` of tokens: `public_url` when set, else `basalt`. Never the bound address,
    /// so tokens stay valid across restarts on another port and across the nodes of one
    /// deployment.
    pub fn token_issuer(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => "basalt".into(),
        }
    }

    /// The externally visible base URL, without a trailing slash.
    pub fn public_url(&self, bound: SocketAddr) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => format!("http://{bound}"),
        }
    }
}

/// The top-level settings; an environment variable's first `__`-separated part must be one.
const TOP_LEVEL: &[&str] = &[
    "listen",
    "data_dir",
    "public_url",
    "database",
    "storage",
    "log",
    "http",
    "auth",
    "rate_limit",
    "documents",
    "changes",
    "metrics",
    "realtime",
];

fn names_setting(key_after_prefix: &str) -> bool {
    let first = key_after_prefix
        .split("__")
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    TOP_LEVEL.contains(&first.as_str())
}

/// A configuration problem, as one line naming the key.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

#[cfg(test)]
// figment's Jail returns its own (large) error type; that is the test API, not ours.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn environment_overrides_file_and_nests_with_double_underscore() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "basalt.toml",
                "listen = \"127.0.0.1:9000\"\n[log]\nformat = \"json\"",
            )?;
            jail.set_env("BASALT_LISTEN", "127.0.0.1:9001");
            jail.set_env("BASALT_DATABASE__URL", "postgres://u:pw@localhost/db");
            let config = Config::load(None).expect("loads");
            assert_eq!(config.listen.port(), 9001);
            assert_eq!(config.log.format, LogFormat::Json);
            assert_eq!(config.database_url(), "postgres://u:pw@localhost/db");
            assert!(
                !format!("{config:?}").contains("pw@"),
                "secret leaked into Debug"
            );
            Ok(())
        });
    }

    /// A section missing from [`TOP_LEVEL`] is silently unreachable from the environment
    /// (`changes` was, until a newcomer tried `BASALT_CHANGES__POLL_INTERVAL_MS`).
    #[test]
    fn every_setting_can_be_set_from_the_environment() {
        let defaults = serde_json::to_value(Config::default()).unwrap();
        let mut fields: Vec<&str> = defaults
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut known = TOP_LEVEL.to_vec();
        fields.sort();
        known.sort();
        assert_eq!(fields, known);
        figment::Jail::expect_with(|jail| {
            jail.set_env("BASALT_CHANGES__POLL_INTERVAL_MS", "250");
            assert_eq!(
                Config::load(None).expect("loads").changes.poll_interval_ms,
                250
            );
            jail.set_env("BASALT_CHANGES__POLL_INTERVAL_MS", "0");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("changes.poll_interval_ms"), "{err}");
            jail.set_env("BASALT_CHANGES__POLL_INTERVAL_MS", "250");
            jail.set_env(
                "BASALT_CHANGES__CONSUMER_MAX_LAG_HOURS",
                "18446744073709551615",
            );
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("changes.consumer_max_lag_hours"), "{err}");
            jail.set_env("BASALT_CHANGES__CONSUMER_MAX_LAG_HOURS", "720");
            jail.set_env("BASALT_CHANGES__POLL_INTERVAL_MS", "soon");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("changes.poll_interval_ms"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn realtime_channel_rules_are_compiled_at_start() {
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                "BASALT_REALTIME__CHANNELS__JOIN",
                "auth != null && channel.size() < 20",
            );
            let config = Config::load(None).expect("loads");
            assert!(config.realtime.channels.join.is_some());
            jail.set_env("BASALT_REALTIME__CHANNELS__BROADCAST", "resource.data == 1");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("realtime.channels.broadcast"), "{err}");
            assert!(err.contains("`auth`, `channel`"), "{err}");
            jail.set_env("BASALT_REALTIME__CHANNELS__BROADCAST", "true");
            jail.set_env("BASALT_REALTIME__SEND_QUEUE", "0");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("realtime.send_queue"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn invalid_value_names_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("BASALT_AUTH__ACCESS_TOKEN_TTL_SECS", "soon");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("auth.access_token_ttl_secs"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn unrelated_basalt_variables_are_ignored_but_typos_in_a_section_are_not() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("BASALT_VERSION", "1.2.3");
            jail.set_env("BASALT_BIN", "/usr/bin/basalt");
            assert!(Config::load(None).is_ok());
            assert!(Config::ignored_env_vars().contains(&"BASALT_BIN".to_string()));
            jail.set_env("BASALT_DATABASE__ULR", "postgres://x");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("ulr"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn a_short_metrics_token_is_refused_and_never_printed() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("BASALT_METRICS__TOKEN", "short");
            let err = Config::load(None).unwrap_err().to_string();
            assert!(err.contains("metrics.token"), "{err}");
            jail.set_env("BASALT_METRICS__TOKEN", "a-long-enough-scrape-token");
            let config = Config::load(None).expect("loads");
            assert!(!format!("{config:?}").contains("scrape-token"));
            Ok(())
        });
    }

    #[test]
    fn defaults_need_no_file() {
        figment::Jail::expect_with(|_| {
            let config = Config::load(None).expect("loads");
            assert_eq!(config.listen.to_string(), "127.0.0.1:7070");
            assert!(config.database_url().ends_with("basalt_data/basalt.db"));
            Ok(())
        });
    }
}
