//! API.md § Auth: signup, grants, refresh rotation and reuse, anonymous users, logout, the
//! user's own account and sessions, token forgeries, rate limits.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, Backend};
use crate::store_tests;

store_tests!(
    signup_returns_the_user_and_a_working_session,
    signup_refuses_duplicate_email_short_password_and_bad_email,
    password_grant_signs_in_and_wrong_email_or_password_answer_the_same,
    refresh_rotates_and_the_old_token_stops_working_after_the_grace_window,
    refresh_token_reuse_inside_the_grace_window_returns_the_same_successor,
    concurrent_refresh_from_two_clients_keeps_both_signed_in,
    reuse_after_rotation_chain_revokes_the_whole_session,
    anonymous_sign_in_and_upgrade_by_patch_user,
    logout_local_ends_one_session_and_global_ends_all,
    user_can_read_update_and_delete_their_account,
    password_change_needs_the_current_password,
    sessions_are_listed_and_revocable,
    forged_expired_and_tampered_tokens_are_rejected,
    expired_access_token_is_rejected,
    disabled_user_cannot_refresh_and_tokens_die_at_expiry,
    rate_limit_answers_429_with_retry_after,
    rotated_signing_key_keeps_old_tokens_valid,
);

async fn signup_returns_the_user_and_a_working_session(backend: Backend) {
    let app = spawn_app(backend).await;
    let reply = app
        .post(
            "/v1/auth/signup",
            None,
            json!({"email": "Ada@Example.com", "password": "correct horse", "data": {"name": "Ada"}}),
        )
        .await;
    let body = reply.assert_ok();
    let user = &body["user"];
    assert_eq!(user["email"], "ada@example.com");
    assert_eq!(user["email_verified"], false);
    assert_eq!(user["is_anonymous"], false);
    assert_eq!(user["disabled"], false);
    assert_eq!(user["data"], json!({"name": "Ada"}));
    assert_eq!(user["claims"], json!({}));
    assert_eq!(user["id"].as_str().unwrap().len(), 20);
    for key in [
        "created_at",
        "updated_at",
        "last_sign_in_at",
        "providers",
        "mfa_enabled",
    ] {
        assert!(user.get(key).is_some(), "user has no {key}");
    }
    let session = &body["session"];
    assert_eq!(session["token_type"], "bearer");
    assert_eq!(session["expires_in"], 900);
    assert!(session["expires_at"].as_i64().unwrap() > chrono::Utc::now().timestamp());
    let token = session["access_token"].as_str().unwrap();
    let me = app.get("/v1/auth/user", Some(token)).await;
    assert_eq!(me.assert_ok()["id"], user["id"]);

    // The access token carries the claims API.md lists.
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    for key in [
        "iss",
        "aud",
        "sub",
        "role",
        "email",
        "email_verified",
        "session_id",
        "claims",
        "iat",
        "exp",
    ] {
        assert!(payload.get(key).is_some(), "claim {key} missing: {payload}");
    }
    assert_eq!(payload["role"], "authenticated");
    assert_eq!(payload["sub"], user["id"]);
}

async fn signup_refuses_duplicate_email_short_password_and_bad_email(backend: Backend) {
    let app = spawn_app(backend).await;
    app.signup("bob@example.com", "long enough").await;
    app.post(
        "/v1/auth/signup",
        None,
        json!({"email": "BOB@example.com", "password": "long enough"}),
    )
    .await
    .assert_error(409, "already_exists");
    let reply = app
        .post(
            "/v1/auth/signup",
            None,
            json!({"email": "carol@example.com", "password": "short"}),
        )
        .await;
    reply.assert_error(400, "invalid_argument");
    assert_eq!(reply.body["error"]["details"]["field"], "password");
    for email in ["not-an-email", "a@b", "a b@example.com", ""] {
        app.post(
            "/v1/auth/signup",
            None,
            json!({"email": email, "password": "long enough"}),
        )
        .await
        .assert_error(400, "invalid_argument");
    }
    app.post(
        "/v1/auth/signup",
        None,
        json!({"email": "d@example.com", "password": "long enough", "data": [1]}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn password_grant_signs_in_and_wrong_email_or_password_answer_the_same(backend: Backend) {
    let app = spawn_app(backend).await;
    app.signup("eve@example.com", "the right one").await;
    let ok = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "eve@example.com", "password": "the right one"}),
        )
        .await;
    assert!(ok.assert_ok()["session"]["access_token"].is_string());
    assert!(ok.body["user"]["last_sign_in_at"].is_string());

    let wrong_password = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "eve@example.com", "password": "the wrong one"}),
        )
        .await;
    let wrong_email = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "nobody@example.com", "password": "the right one"}),
        )
        .await;
    let a = wrong_password.assert_error(400, "invalid_argument");
    let b = wrong_email.assert_error(400, "invalid_argument");
    assert_eq!(a, b, "wrong email and wrong password must answer the same");
    assert_eq!(
        wrong_password.body["error"]["details"],
        wrong_email.body["error"]["details"]
    );
}

async fn refresh_rotates_and_the_old_token_stops_working_after_the_grace_window(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.auth.refresh_reuse_grace_secs = 1).await;
    let (_, _, refresh) = app.user("fay@example.com").await;
    let first = app.refresh(&refresh).await;
    let new_refresh = first.assert_ok()["session"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_refresh, refresh);
    assert!(first.body["session"]["access_token"].is_string());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The old token, past the window: refused, and the whole session is revoked.
    app.refresh(&refresh)
        .await
        .assert_error(401, "unauthenticated");
    app.refresh(&new_refresh)
        .await
        .assert_error(401, "unauthenticated");
}

async fn refresh_token_reuse_inside_the_grace_window_returns_the_same_successor(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, _, refresh) = app.user("gus@example.com").await;
    let first = app.refresh(&refresh).await;
    let second = app.refresh(&refresh).await;
    let a = first.assert_ok()["session"]["refresh_token"].clone();
    let b = second.assert_ok()["session"]["refresh_token"].clone();
    assert_eq!(
        a, b,
        "a retry inside the grace window gets the same successor"
    );
    // And the successor works.
    app.refresh(a.as_str().unwrap()).await.assert_ok();
}

async fn concurrent_refresh_from_two_clients_keeps_both_signed_in(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, _, refresh) = app.user("hal@example.com").await;
    let (a, b) = tokio::join!(app.refresh(&refresh), app.refresh(&refresh));
    let a = a.assert_ok()["session"]["refresh_token"].clone();
    let b = b.assert_ok()["session"]["refresh_token"].clone();
    assert_eq!(a, b);
    let next = app.refresh(a.as_str().unwrap()).await;
    next.assert_ok();
}

async fn reuse_after_rotation_chain_revokes_the_whole_session(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.auth.refresh_reuse_grace_secs = 0).await;
    let (_, access, refresh) = app.user("ivy@example.com").await;
    let r1 = app.refresh(&refresh).await.assert_ok()["session"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // A thief replays the first token: refused, and the legitimate successor dies with it.
    app.refresh(&refresh)
        .await
        .assert_error(401, "unauthenticated");
    app.refresh(&r1).await.assert_error(401, "unauthenticated");
    let sessions = app.get("/v1/auth/sessions", Some(&access)).await;
    assert_eq!(sessions.assert_ok()["sessions"], json!([]));
}

async fn anonymous_sign_in_and_upgrade_by_patch_user(backend: Backend) {
    let app = spawn_app(backend).await;
    let reply = app
        .send(Method::POST, "/v1/auth/anonymous", None, None)
        .await;
    let body = reply.assert_ok().clone();
    assert_eq!(body["user"]["is_anonymous"], true);
    assert_eq!(body["user"]["email"], Value::Null);
    let token = body["session"]["access_token"].as_str().unwrap();
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["role"], "anonymous");

    // Only an email is not enough to upgrade.
    app.patch(
        "/v1/auth/user",
        Some(token),
        json!({"email": "jo@example.com"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    let upgraded = app
        .patch(
            "/v1/auth/user",
            Some(token),
            json!({"email": "jo@example.com", "password": "now permanent"}),
        )
        .await;
    assert_eq!(upgraded.assert_ok()["is_anonymous"], false);
    assert_eq!(upgraded.body["id"], body["user"]["id"]);
    // The upgraded account signs in with its password, as the same user.
    let signed_in = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "jo@example.com", "password": "now permanent"}),
        )
        .await;
    assert_eq!(signed_in.assert_ok()["user"]["id"], body["user"]["id"]);
    // Refreshing the anonymous session now yields an `authenticated` token.
    let refreshed = app
        .refresh(body["session"]["refresh_token"].as_str().unwrap())
        .await;
    let token = refreshed.assert_ok()["session"]["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let payload: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["role"], "authenticated");
}

async fn logout_local_ends_one_session_and_global_ends_all(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, access1, refresh1) = app.user("kim@example.com").await;
    let second = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "kim@example.com", "password": "correct horse battery"}),
        )
        .await;
    let access2 = second.assert_ok()["session"]["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let refresh2 = second.body["session"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let third = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "kim@example.com", "password": "correct horse battery"}),
        )
        .await;
    let refresh3 = third.assert_ok()["session"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();

    let out = app
        .send(Method::POST, "/v1/auth/logout", Some(&access1), None)
        .await;
    assert_eq!(out.status.as_u16(), 204);
    app.refresh(&refresh1)
        .await
        .assert_error(401, "unauthenticated");
    app.refresh(&refresh2).await.assert_ok();

    app.post(
        "/v1/auth/logout",
        Some(&access2),
        json!({"scope": "sideways"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    let out = app
        .post(
            "/v1/auth/logout",
            Some(&access2),
            json!({"scope": "global"}),
        )
        .await;
    assert_eq!(out.status.as_u16(), 204);
    app.refresh(&refresh3)
        .await
        .assert_error(401, "unauthenticated");
    app.send(Method::POST, "/v1/auth/logout", None, None)
        .await
        .assert_error(401, "unauthenticated");
}

async fn user_can_read_update_and_delete_their_account(backend: Backend) {
    let app = spawn_app(backend).await;
    let (id, access, refresh) = app.user("lee@example.com").await;
    app.user("taken@example.com").await;
    let updated = app
        .patch(
            "/v1/auth/user",
            Some(&access),
            json!({"data": {"theme": "dark"}}),
        )
        .await;
    assert_eq!(updated.assert_ok()["data"], json!({"theme": "dark"}));
    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"email": "taken@example.com", "current_password": "correct horse battery"}),
    )
    .await
    .assert_error(409, "already_exists");
    app.patch("/v1/auth/user", Some(&access), json!({"data": "nope"}))
        .await
        .assert_error(400, "invalid_argument");
    app.patch("/v1/auth/user", Some(&access), json!({"is_admin": true}))
        .await
        .assert_error(400, "invalid_argument");
    let changed = app
        .patch(
            "/v1/auth/user",
            Some(&access),
            json!({"email": "lee2@example.com", "current_password": "correct horse battery"}),
        )
        .await;
    assert_eq!(changed.assert_ok()["email"], "lee2@example.com");
    assert_eq!(changed.body["email_verified"], false);

    let deleted = app.delete("/v1/auth/user", Some(&access)).await;
    assert_eq!(deleted.status.as_u16(), 204);
    app.get("/v1/auth/user", Some(&access))
        .await
        .assert_error(404, "not_found");
    app.refresh(&refresh)
        .await
        .assert_error(401, "unauthenticated");
    let admin = app.admin_token().await;
    app.get(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await
        .assert_error(404, "not_found");
}

async fn password_change_needs_the_current_password(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, access, _) = app.user("max@example.com").await;
    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"password": "brand new pass"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"password": "brand new pass", "current_password": "wrong guess"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"password": "brand new pass", "current_password": "correct horse battery"}),
    )
    .await
    .assert_ok();
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": "max@example.com", "password": "brand new pass"}),
    )
    .await
    .assert_ok();
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": "max@example.com", "password": "correct horse battery"}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn sessions_are_listed_and_revocable(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, access, _) = app.user("ned@example.com").await;
    let other = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "ned@example.com", "password": "correct horse battery"}),
        )
        .await;
    let other_refresh = other.assert_ok()["session"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let list = app.get("/v1/auth/sessions", Some(&access)).await;
    let sessions = list.assert_ok()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 2);
    assert_eq!(sessions.iter().filter(|s| s["current"] == true).count(), 1);
    let other_id = sessions.iter().find(|s| s["current"] == false).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Someone else cannot revoke it.
    let (_, stranger, _) = app.user("oz@example.com").await;
    app.delete(&format!("/v1/auth/sessions/{other_id}"), Some(&stranger))
        .await
        .assert_error(404, "not_found");
    let revoked = app
        .delete(&format!("/v1/auth/sessions/{other_id}"), Some(&access))
        .await;
    assert_eq!(revoked.status.as_u16(), 204);
    app.refresh(&other_refresh)
        .await
        .assert_error(401, "unauthenticated");
    let list = app.get("/v1/auth/sessions", Some(&access)).await;
    assert_eq!(list.assert_ok()["sessions"].as_array().unwrap().len(), 1);
}

fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

async fn forged_expired_and_tampered_tokens_are_rejected(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, access, _) = app.user("pam@example.com").await;
    let parts: Vec<&str> = access.split('.').collect();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let mut payload: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();

    // Tampered payload (escalated claims), original signature.
    payload["claims"] = json!({"role": "admin"});
    let tampered = format!("{}.{}.{}", parts[0], b64(&payload), parts[2]);
    // `alg: none`.
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": header["kid"]})),
        parts[1]
    );
    // HS256 signed with the public key from the JWKS (the classic confusion attack).
    let jwks = app.get("/.well-known/jwks.json", None).await;
    let x = jwks.assert_ok()["keys"][0]["x"]
        .as_str()
        .unwrap()
        .to_string();
    let hs_header = json!({"alg": "HS256", "typ": "JWT", "kid": header["kid"]});
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header {
            alg: jsonwebtoken::Algorithm::HS256,
            kid: header["kid"].as_str().map(str::to_string),
            ..Default::default()
        },
        &serde_json::from_slice::<Value>(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap(),
        &jsonwebtoken::EncodingKey::from_secret(x.as_bytes()),
    )
    .unwrap();
    let _ = hs_header;
    // Unknown kid.
    let mut wrong_kid_header = header.clone();
    wrong_kid_header["kid"] = json!("0000000000000000");
    let wrong_kid = format!("{}.{}.{}", b64(&wrong_kid_header), parts[1], parts[2]);
    // Signed by a key that is not ours, with our kid.
    let foreign = {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        let der = key.to_pkcs8_der().unwrap();
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA);
        h.kid = header["kid"].as_str().map(str::to_string);
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        jsonwebtoken::encode(
            &h,
            &claims,
            &jsonwebtoken::EncodingKey::from_ed_der(der.as_bytes()),
        )
        .unwrap()
    };

    for (name, token) in [
        ("tampered", tampered.as_str()),
        ("alg none", none.as_str()),
        ("hs256 with public key", hs.as_str()),
        ("wrong kid", wrong_kid.as_str()),
        ("foreign key", foreign.as_str()),
        ("garbage", "not.a.jwt"),
        ("empty parts", ".."),
    ] {
        let reply = app.get("/v1/auth/user", Some(token)).await;
        assert_eq!(
            reply.status.as_u16(),
            401,
            "{name} token was accepted: {}",
            reply.text
        );
        reply.assert_error(401, "unauthenticated");
    }
    // A malformed Authorization header.
    let reply = TestAppExt::raw_auth(&app, "Basic abc").await;
    reply.assert_error(401, "unauthenticated");
    // The real one still works.
    app.get("/v1/auth/user", Some(&access)).await.assert_ok();
}

struct TestAppExt;
impl TestAppExt {
    async fn raw_auth(app: &crate::helpers::TestApp, header: &str) -> crate::helpers::Reply {
        let resp = app
            .client
            .get(app.url("/v1/auth/user"))
            .header("authorization", header)
            .send()
            .await
            .unwrap();
        crate::helpers::TestApp::reply(resp).await
    }
}

async fn expired_access_token_is_rejected(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.auth.access_token_ttl_secs = 1).await;
    let (_, access, refresh) = app.user("quin@example.com").await;
    app.get("/v1/auth/user", Some(&access)).await.assert_ok();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let msg = app
        .get("/v1/auth/user", Some(&access))
        .await
        .assert_error(401, "unauthenticated");
    assert!(msg.contains("expired"), "{msg}");
    // The refresh token still gets a fresh one.
    let fresh = app.refresh(&refresh).await;
    let token = fresh.assert_ok()["session"]["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    app.get("/v1/auth/user", Some(&token)).await.assert_ok();
}

async fn disabled_user_cannot_refresh_and_tokens_die_at_expiry(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.auth.access_token_ttl_secs = 2).await;
    let admin = app.admin_token().await;
    let (id, access, refresh) = app.user("rex@example.com").await;
    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"disabled": true}),
    )
    .await
    .assert_ok();
    app.refresh(&refresh)
        .await
        .assert_error(401, "unauthenticated");
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": "rex@example.com", "password": "correct horse battery"}),
    )
    .await
    .assert_error(403, "permission_denied");
    tokio::time::sleep(Duration::from_millis(3100)).await;
    app.get("/v1/auth/user", Some(&access))
        .await
        .assert_error(401, "unauthenticated");
    // Re-enabled, the user signs in again.
    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"disabled": false}),
    )
    .await
    .assert_ok();
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": "rex@example.com", "password": "correct horse battery"}),
    )
    .await
    .assert_ok();
}

async fn rate_limit_answers_429_with_retry_after(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.rate_limit.enabled = true;
        c.rate_limit.auth_per_ip_per_minute = 100;
        c.rate_limit.auth_per_account_per_minute = 3;
    })
    .await;
    app.signup("sam@example.com", "correct horse").await;
    // Per account: the 3 allowed attempts include the signup.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = app
            .post(
                "/v1/auth/token?grant_type=password",
                None,
                json!({"email": "sam@example.com", "password": "guess guess"}),
            )
            .await;
        statuses.push(r.status.as_u16());
        if r.status.as_u16() == 429 {
            r.assert_error(429, "rate_limited");
            let retry: u64 = r
                .headers
                .get("retry-after")
                .unwrap()
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&retry), "retry-after {retry}");
        }
    }
    assert_eq!(statuses, vec![400, 400, 429]);
    // Another account from the same IP is not affected by sam's limit.
    app.signup("tia@example.com", "correct horse").await;

    // Per IP.
    let app = spawn_app_with(backend, |c| {
        c.rate_limit.enabled = true;
        c.rate_limit.auth_per_ip_per_minute = 2;
    })
    .await;
    app.signup("u1@example.com", "correct horse").await;
    app.signup("u2@example.com", "correct horse").await;
    let r = app
        .post(
            "/v1/auth/signup",
            None,
            json!({"email": "u3@example.com", "password": "correct horse"}),
        )
        .await;
    r.assert_error(429, "rate_limited");
    assert!(r.headers.get("retry-after").is_some());
}

async fn rotated_signing_key_keeps_old_tokens_valid(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, old_access, _) = app.user("val@example.com").await;
    let old_kid =
        app.get("/.well-known/jwks.json", None).await.assert_ok()["keys"][0]["kid"].clone();
    let new_kid = basalt::auth::tokens::TokenService::rotate(app.state.store.as_ref())
        .await
        .unwrap();
    app.state.auth.tokens.reload().await.unwrap();
    let jwks = app.get("/.well-known/jwks.json", None).await;
    let kids: Vec<Value> = jwks.assert_ok()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].clone())
        .collect();
    assert!(
        kids.contains(&old_kid) && kids.contains(&json!(new_kid)),
        "{kids:?}"
    );
    app.get("/v1/auth/user", Some(&old_access))
        .await
        .assert_ok();
    let (_, new_access, _) = app.user("wes@example.com").await;
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(new_access.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], json!(new_kid));
    app.get("/v1/auth/user", Some(&new_access))
        .await
        .assert_ok();
}
