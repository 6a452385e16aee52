//! Operations and cross-cutting behaviour: health, readiness, metrics, request ids, the error
//! envelope for bad input, JWKS verification by a third party, the OpenAPI document, the CLI
//! and graceful shutdown.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, Backend};
use crate::store_tests;

store_tests!(
    health_and_ready_answer,
    metrics_count_requests_by_route_and_status,
    every_response_carries_a_request_id,
    unknown_routes_and_methods_answer_in_the_envelope,
    malformed_json_wrong_types_and_missing_fields_are_400,
    wrong_content_type_is_415_and_oversized_body_is_413,
    unknown_or_missing_grant_type_is_400,
    a_third_party_verifies_access_tokens_from_the_jwks_alone,
    openapi_document_describes_every_route,
    graceful_shutdown_finishes_in_flight_requests,
    cors_allows_configured_origins,
);

async fn health_and_ready_answer(backend: Backend) {
    let app = spawn_app(backend).await;
    assert_eq!(app.get("/health", None).await.assert_ok()["status"], "ok");
    let ready = app.get("/ready", None).await;
    assert_eq!(ready.assert_ok()["status"], "ready");
    let expected = match backend {
        Backend::Sqlite => "sqlite",
        Backend::Postgres => "postgres",
    };
    assert_eq!(ready.body["database"], expected);
}

async fn metrics_count_requests_by_route_and_status(backend: Backend) {
    let app = spawn_app(backend).await;
    app.get("/v1/auth/user", None).await;
    app.get("/health", None).await;
    let admin = app.admin_token().await;
    let resp = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("http_requests_total")
            && l.contains("route=\"/v1/auth/user\"")
            && l.contains("status=\"401\"")),
        "{text}"
    );
    assert!(
        text.contains("http_request_duration_seconds_bucket"),
        "{text}"
    );
}

async fn every_response_carries_a_request_id(backend: Backend) {
    let app = spawn_app(backend).await;
    let a = app.get("/health", None).await;
    let b = app.get("/health", None).await;
    let ida = a.headers["x-request-id"].to_str().unwrap().to_string();
    assert!(!ida.is_empty());
    assert_ne!(ida, b.headers["x-request-id"].to_str().unwrap());
    let resp = app
        .client
        .get(app.url("/v1/auth/user"))
        .header("x-request-id", "trace-me-123")
        .send()
        .await
        .unwrap();
    let reply = crate::helpers::TestApp::reply(resp).await;
    assert_eq!(reply.headers["x-request-id"], "trace-me-123");
    assert_eq!(reply.body["error"]["request_id"], "trace-me-123");
}

async fn unknown_routes_and_methods_answer_in_the_envelope(backend: Backend) {
    let app = spawn_app(backend).await;
    app.get("/v1/nothing/here", None)
        .await
        .assert_error(404, "not_found");
    let r = app
        .send(Method::PUT, "/v1/auth/signup", None, Some(json!({})))
        .await;
    assert_eq!(r.status.as_u16(), 405);
    assert_eq!(r.body["error"]["code"], "invalid_argument", "{}", r.text);
    assert!(r.body["error"]["request_id"].is_string());
}

async fn malformed_json_wrong_types_and_missing_fields_are_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let send_raw =
        |body: &'static str| app.send_json_text(Method::POST, "/v1/auth/signup", None, body);
    let r = send_raw("{\"email\": \"a@example.com\", ").await;
    r.assert_error(400, "invalid_argument");
    assert!(r.body["error"]["details"]["line"].is_number());
    let r = send_raw("{not json}").await;
    r.assert_error(400, "invalid_argument");
    assert_eq!(r.body["error"]["details"]["column"], 2);
    send_raw("").await.assert_error(400, "invalid_argument");
    send_raw("[]").await.assert_error(400, "invalid_argument");
    let msg = app
        .post(
            "/v1/auth/signup",
            None,
            json!({"email": 42, "password": "long enough"}),
        )
        .await
        .assert_error(400, "invalid_argument");
    assert!(msg.contains("invalid type"), "{msg}");
    let msg = app
        .post("/v1/auth/signup", None, json!({"password": "long enough"}))
        .await
        .assert_error(400, "invalid_argument");
    assert!(msg.contains("email"), "{msg}");
    // Nothing was created by any of these.
    let admin = app.admin_token().await;
    assert_eq!(
        app.get("/v1/admin/users", Some(&admin)).await.assert_ok()["users"],
        json!([])
    );
}

async fn wrong_content_type_is_415_and_oversized_body_is_413(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.http.body_limit = 64 * 1024).await;
    // The server closes a connection whose body it refused to read; a client without
    // keep-alive keeps the later requests off such a half-dead connection.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = client
        .post(app.url("/v1/auth/signup"))
        .header("content-type", "text/plain")
        .body("{\"email\": \"x@example.com\", \"password\": \"long enough\"}")
        .send()
        .await
        .unwrap();
    crate::helpers::TestApp::reply(r)
        .await
        .assert_error(415, "unsupported_media_type");
    let huge = json!({"email": "big@example.com", "password": "long enough", "data": {"blob": "x".repeat(200 * 1024)}});
    let r = client
        .post(app.url("/v1/auth/signup"))
        .json(&huge)
        .send()
        .await
        .unwrap();
    crate::helpers::TestApp::reply(r)
        .await
        .assert_error(413, "payload_too_large");
    // Without content-length (chunked), the limit holds while streaming: the server answers
    // 413 as soon as the limit is passed and stops reading, so the client either reads that
    // answer or finds the upload cut off mid-body. It never gets a success.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..100).map(|_| Ok(vec![b' '; 4096])).collect();
    let sent = client
        .post(app.url("/v1/auth/signup"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await;
    match sent {
        Ok(resp) => {
            crate::helpers::TestApp::reply(resp)
                .await
                .assert_error(413, "payload_too_large");
        }
        Err(err) => assert!(
            err.is_request() || err.is_body(),
            "unexpected client error: {err:?}"
        ),
    }
    // Nothing was stored.
    let mut app = app;
    app.client = client;
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": "big@example.com", "password": "long enough"}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn unknown_or_missing_grant_type_is_400(backend: Backend) {
    let app = spawn_app(backend).await;
    let r = app
        .post("/v1/auth/token?grant_type=magic", None, json!({}))
        .await;
    r.assert_error(400, "invalid_argument");
    assert_eq!(
        r.body["error"]["details"]["supported"],
        json!(["password", "refresh_token"])
    );
    app.post("/v1/auth/token", None, json!({}))
        .await
        .assert_error(400, "invalid_argument");
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": "a@example.com"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.post(
        "/v1/auth/token?grant_type=refresh_token",
        None,
        json!({"refresh_token": 7}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.refresh("r-made-up")
        .await
        .assert_error(401, "unauthenticated");
}

/// The same check with a library basalt does not use: Node's `jose`, through the example in
/// docs/examples (its `npm ci` is part of .ci/run). Skipped, loudly, where Node or the package
/// is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_jose_verifies_access_tokens_from_the_jwks() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/examples");
    if !examples.join("node_modules/jose").exists() {
        eprintln!(
            "docs/examples/node_modules/jose is missing (run `npm ci` there): jose check not run"
        );
        return;
    }
    let app = spawn_app(Backend::Sqlite).await;
    let url = app.url("");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg("verify-jwks.mjs")
            .current_dir(&examples)
            .env("BASALT_URL", url)
            .output()
    })
    .await
    .unwrap()
    .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verified:"), "{stdout}");
    assert!(stdout.contains("rejected a tampered token"), "{stdout}");
    assert!(stdout.contains("rejected the wrong audience"), "{stdout}");
}

async fn a_third_party_verifies_access_tokens_from_the_jwks_alone(backend: Backend) {
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
    let app = spawn_app(backend).await;
    let (id, access, _) = app.user("third@example.com").await;
    // The verifier knows only the JWKS URL; it fetches it with a plain HTTP client.
    let jwks: JwkSet = reqwest::get(app.url("/.well-known/jwks.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kid = decode_header(&access).unwrap().kid.unwrap();
    let jwk = jwks.find(&kid).expect("the token's kid is published");
    let key = DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&["basalt"]);
    validation.set_issuer(&["basalt"]);
    let data = decode::<Value>(&access, &key, &validation).expect("verifies with the JWKS");
    assert_eq!(data.claims["sub"], json!(id));
    assert_eq!(data.claims["email"], "third@example.com");
}

/// The contract's routes that exist so far (API.md § Auth, § Admin, § Operations).
const CONTRACT_ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/auth/signup"),
    ("post", "/v1/auth/token"),
    ("post", "/v1/auth/anonymous"),
    ("post", "/v1/auth/logout"),
    ("get", "/v1/auth/user"),
    ("patch", "/v1/auth/user"),
    ("delete", "/v1/auth/user"),
    ("get", "/v1/auth/sessions"),
    ("delete", "/v1/auth/sessions/{id}"),
    ("post", "/v1/admin/login"),
    ("post", "/v1/admin/setup"),
    ("get", "/v1/admin/users"),
    ("post", "/v1/admin/users"),
    ("get", "/v1/admin/users/{id}"),
    ("patch", "/v1/admin/users/{id}"),
    ("delete", "/v1/admin/users/{id}"),
    ("post", "/v1/admin/users/{id}/logout"),
    ("get", "/v1/admin/keys"),
    ("post", "/v1/admin/keys"),
    ("delete", "/v1/admin/keys/{id}"),
    ("get", "/v1/admin/audit"),
    ("get", "/v1/admin/collections"),
    ("put", "/v1/admin/collections/{name}"),
    ("get", "/v1/admin/collections/{name}"),
    ("delete", "/v1/admin/collections/{name}"),
    ("post", "/v1/db/{collection}"),
    ("get", "/v1/db/{collection}/{id}"),
    ("put", "/v1/db/{collection}/{id}"),
    ("patch", "/v1/db/{collection}/{id}"),
    ("delete", "/v1/db/{collection}/{id}"),
    ("post", "/v1/db/{collection}/_query"),
    ("post", "/v1/db/{collection}/_aggregate"),
    ("post", "/v1/db/_batch"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/.well-known/jwks.json"),
];

async fn openapi_document_describes_every_route(backend: Backend) {
    let app = spawn_app(backend).await;
    let spec = app.get("/v1/openapi.json", None).await;
    let spec = spec.assert_ok();
    assert!(
        spec["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        spec["openapi"]
    );
    let paths = spec["paths"].as_object().unwrap();
    for (method, path) in CONTRACT_ROUTES {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{method} {path} is not in the OpenAPI document"
        );
    }
    // And every documented operation is really routed: it never hits the router's fallback
    // (404 "no such route") or a 405.
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            let concrete = path
                .replace("{id}", "x")
                .replace("{collection}", "x")
                .replace("{name}", "x");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let r = app.send(m, &concrete, None, None).await;
            assert_ne!(
                r.status.as_u16(),
                405,
                "{method} {path} documented but not routed"
            );
            if r.status.as_u16() == 404 {
                assert_ne!(
                    r.body["error"]["message"], "no such route",
                    "{method} {path} documented but not routed"
                );
            }
        }
    }
}

async fn graceful_shutdown_finishes_in_flight_requests(backend: Backend) {
    // Expensive hashing makes the signup take a while; the shutdown arrives in the middle.
    let app = spawn_app_with(backend, |c| {
        c.auth.argon2_memory_kib = 64 * 1024;
        c.auth.argon2_iterations = 3;
    })
    .await;
    let client = app.client.clone();
    let url = app.url("/v1/auth/signup");
    let in_flight = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"email": "late@example.com", "password": "still counts"}))
            .send()
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    let addr = app.addr;
    app.stop().await;
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight request got an answer");
    assert_eq!(resp.status().as_u16(), 200);
    // And the server no longer accepts connections.
    assert!(reqwest::get(format!("http://{addr}/health")).await.is_err());
}

async fn cors_allows_configured_origins(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.http.cors_origins = vec!["https://app.example.com".into()]
    })
    .await;
    let preflight = |origin: &'static str| {
        app.client
            .request(Method::OPTIONS, app.url("/v1/auth/signup"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type,authorization",
            )
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let other = preflight("https://evil.example.com").await.unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}
