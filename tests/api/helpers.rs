//! Test harness: every test starts the real server on port 0 with its own temporary data
//! directory and its own database, and talks to it over a real socket.
//!
//! Store tests run twice through [`store_tests!`]: on SQLite, and on PostgreSQL when
//! `BASALT_TEST_DATABASE_URL` points at a server (each test then gets a fresh database).
//! Under CI (`CI` set) a missing URL fails the PostgreSQL variants instead of skipping them,
//! so a misconfigured pipeline cannot pass with half the suite unrun.

use std::net::SocketAddr;

use basalt::app::{App, AppState};
use basalt::config::{Config, Secret};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Declares each listed `async fn name(backend: Backend)` as two tests, `sqlite::name` and
/// `postgres::name`.
#[macro_export]
macro_rules! store_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::helpers::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !$crate::helpers::postgres_available() {
                        return;
                    }
                    super::$name($crate::helpers::Backend::Postgres).await
                }
            )*
        }
    };
}

pub fn postgres_url() -> Option<String> {
    std::env::var("BASALT_TEST_DATABASE_URL")
        .ok()
        .filter(|s| !s.is_empty())
}

/// Whether the PostgreSQL variant of a store test can run. Outside CI a missing URL skips
/// it with a note; in CI it is a failure.
pub fn postgres_available() -> bool {
    if postgres_url().is_some() {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !in_ci,
        "CI is set but BASALT_TEST_DATABASE_URL is not: the PostgreSQL variant must run in CI"
    );
    eprintln!("BASALT_TEST_DATABASE_URL is not set: PostgreSQL variant not run");
    false
}

/// Creates a fresh, uniquely named database on the test PostgreSQL server.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let base = postgres_url().expect("BASALT_TEST_DATABASE_URL");
    let name = format!("basalt_test_{}", basalt::ids::new_id().to_lowercase());
    let mut conn = sqlx::PgConnection::connect(&base)
        .await
        .expect("connect to BASALT_TEST_DATABASE_URL");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let (prefix, _) = base.rsplit_once('/').expect("database url has a path");
    format!("{prefix}/{name}")
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The `metrics.listen` listener's address, when the test configured one.
    pub metrics_addr: Option<SocketAddr>,
    pub client: reqwest::Client,
    pub state: AppState,
    /// The setup token the server logged, when it started without an admin.
    pub setup_token: Option<String>,
    _data_dir: tempfile::TempDir,
    shutdown: Option<oneshot::Sender<()>>,
    pub server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// The configuration tests start from: port 0, a temp data dir, cheap argon2 (the cost is
/// configurable; production defaults are measured in bench/), no rate limits unless a test
/// turns them on.
pub fn test_config(data_dir: &std::path::Path) -> Config {
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.to_path_buf(),
        ..Config::default()
    };
    config.auth.argon2_memory_kib = 1024;
    config.auth.argon2_iterations = 1;
    config.rate_limit.enabled = false;
    config.http.shutdown_grace_secs = 5;
    config
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, |_| {}).await
}

pub async fn spawn_app_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> TestApp {
    let data_dir = tempfile::tempdir().expect("temp dir");
    let mut config = test_config(data_dir.path());
    if backend == Backend::Postgres {
        config.database.url = Some(Secret::new(fresh_postgres_database().await));
    }
    adjust(&mut config);
    let app = App::build(config.clone()).await.expect("server builds");
    let addr = app.local_addr();
    let metrics_addr = app.metrics_addr();
    let state = app.state().clone();
    let setup_token = app.setup_token().map(str::to_string);
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        metrics_addr,
        client: reqwest::Client::new(),
        state,
        setup_token,
        _data_dir: data_dir,
        shutdown: Some(tx),
        server: Some(server),
    }
}

/// A response with its status, headers and JSON body (Null when empty or not JSON).
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    /// Asserts the error envelope of API.md with `code`, and returns the message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(
            self.status.as_u16(),
            status,
            "unexpected status; body: {}",
            self.text
        );
        let error = &self.body["error"];
        assert_eq!(error["code"], code, "unexpected code; body: {}", self.text);
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "no message: {}",
            self.text
        );
        let request_id = self
            .headers
            .get("x-request-id")
            .expect("x-request-id header");
        assert_eq!(
            error["request_id"],
            request_id.to_str().unwrap(),
            "request_id in body differs from header"
        );
        error["message"].as_str().unwrap().to_string()
    }

    pub fn assert_ok(&self) -> &Value {
        assert!(
            self.status.is_success(),
            "expected success, got {}: {}",
            self.status,
            self.text
        );
        &self.body
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Reply {
        let mut req = self.client.request(method, self.url(path));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        Self::reply(req.send().await.expect("request sent")).await
    }

    /// Sends `body` as it is, labelled JSON (for input `serde_json::Value` cannot hold:
    /// malformed JSON, `-0.0`, nesting deeper than a `Value` should build).
    pub async fn send_json_text(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> Reply {
        let mut req = self
            .client
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .body(body);
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        Self::reply(req.send().await.expect("request sent")).await
    }

    pub async fn reply(resp: reqwest::Response) -> Reply {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::GET, path, token, None).await
    }

    pub async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.send(Method::POST, path, token, Some(body)).await
    }

    pub async fn patch(&self, path: &str, token: Option<&str>, body: Value) -> Reply {
        self.send(Method::PATCH, path, token, Some(body)).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> Reply {
        self.send(Method::DELETE, path, token, None).await
    }

    /// Signs up and returns `{user, session}`.
    pub async fn signup(&self, email: &str, password: &str) -> Value {
        let reply = self
            .post(
                "/v1/auth/signup",
                None,
                json!({"email": email, "password": password}),
            )
            .await;
        reply.assert_ok().clone()
    }

    /// Signs up a fresh user and returns (user id, access token, refresh token).
    pub async fn user(&self, email: &str) -> (String, String, String) {
        let body = self.signup(email, "correct horse battery").await;
        (
            body["user"]["id"].as_str().unwrap().to_string(),
            body["session"]["access_token"]
                .as_str()
                .unwrap()
                .to_string(),
            body["session"]["refresh_token"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    }

    pub async fn refresh(&self, refresh_token: &str) -> Reply {
        self.post(
            "/v1/auth/token?grant_type=refresh_token",
            None,
            json!({"refresh_token": refresh_token}),
        )
        .await
    }

    /// Creates an admin (as `basalt admin create` does) and signs in over HTTP; returns the
    /// admin token.
    /// The database URL this app was started with (PostgreSQL tests connect to it directly).
    pub fn database_url(&self) -> String {
        self.state
            .config
            .database
            .url
            .as_ref()
            .expect("a database url")
            .expose()
            .clone()
    }

    pub async fn admin_token(&self) -> String {
        let email = format!("admin-{}@example.com", basalt::ids::new_id().to_lowercase());
        self.state
            .auth
            .create_admin(&email, "admin password 1")
            .await
            .expect("admin created");
        let reply = self
            .post(
                "/v1/admin/login",
                None,
                json!({"email": email, "password": "admin password 1"}),
            )
            .await;
        reply.assert_ok()["token"].as_str().unwrap().to_string()
    }

    /// Stops the server gracefully and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            server
                .await
                .expect("server task")
                .expect("server stopped cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
