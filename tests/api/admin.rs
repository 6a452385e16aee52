//! API.md § Admin: admin login and first-run setup, users, service keys, the audit log, and
//! who may call it.

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, Backend};
use crate::store_tests;

store_tests!(
    admin_login_gives_a_token_and_wrong_credentials_are_refused,
    setup_token_creates_the_first_admin_once,
    admin_api_refuses_anonymous_users_and_user_tokens,
    users_are_listed_with_search_and_cursor,
    admin_creates_patches_and_deletes_users,
    claims_set_by_an_admin_appear_in_the_next_access_token,
    admin_logout_revokes_every_session,
    service_keys_are_shown_once_work_and_die_when_deleted,
    every_admin_write_is_in_the_audit_log,
);

async fn admin_login_gives_a_token_and_wrong_credentials_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    app.state
        .auth
        .create_admin("root@example.com", "admin password 1")
        .await
        .unwrap();
    let ok = app
        .post(
            "/v1/admin/login",
            None,
            json!({"email": "root@example.com", "password": "admin password 1"}),
        )
        .await;
    assert_eq!(ok.assert_ok()["admin"]["email"], "root@example.com");
    let token = ok.body["token"].as_str().unwrap();
    app.get("/v1/admin/users", Some(token)).await.assert_ok();
    let a = app
        .post(
            "/v1/admin/login",
            None,
            json!({"email": "root@example.com", "password": "nope nope"}),
        )
        .await;
    let b = app
        .post(
            "/v1/admin/login",
            None,
            json!({"email": "who@example.com", "password": "admin password 1"}),
        )
        .await;
    assert_eq!(
        a.assert_error(400, "invalid_argument"),
        b.assert_error(400, "invalid_argument")
    );
    // A user with the same credentials is not an admin.
    app.signup("user@example.com", "admin password 1").await;
    app.post(
        "/v1/admin/login",
        None,
        json!({"email": "user@example.com", "password": "admin password 1"}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn setup_token_creates_the_first_admin_once(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = app
        .setup_token
        .clone()
        .expect("no admin yet, so a setup token");
    app.post(
        "/v1/admin/setup",
        None,
        json!({"token": "wrong", "email": "first@example.com", "password": "first admin pw"}),
    )
    .await
    .assert_error(403, "permission_denied");
    let ok = app
        .post(
            "/v1/admin/setup",
            None,
            json!({"token": token, "email": "first@example.com", "password": "first admin pw"}),
        )
        .await;
    let admin_token = ok.assert_ok()["token"].as_str().unwrap().to_string();
    app.get("/v1/admin/users", Some(&admin_token))
        .await
        .assert_ok();
    app.post(
        "/v1/admin/setup",
        None,
        json!({"token": token, "email": "second@example.com", "password": "second admin pw"}),
    )
    .await
    .assert_error(403, "permission_denied");
    assert!(
        app.state.auth.setup_token().await.unwrap().is_none(),
        "no setup token once an admin exists"
    );
}

async fn admin_api_refuses_anonymous_users_and_user_tokens(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, user_token, _) = app.user("mallory@example.com").await;
    app.get("/v1/admin/users", None)
        .await
        .assert_error(401, "unauthenticated");
    app.get("/v1/admin/users", Some(&user_token))
        .await
        .assert_error(403, "permission_denied");
    app.post(
        "/v1/admin/keys",
        Some(&user_token),
        json!({"name": "steal"}),
    )
    .await
    .assert_error(403, "permission_denied");
    app.get("/v1/admin/users", Some("bsk_not_a_real_key"))
        .await
        .assert_error(401, "unauthenticated");
    // And an admin token is no user token.
    let admin = app.admin_token().await;
    app.get("/v1/auth/user", Some(&admin))
        .await
        .assert_error(403, "permission_denied");
}

async fn users_are_listed_with_search_and_cursor(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    for i in 0..7 {
        app.user(&format!("list{i}@example.com")).await;
    }
    app.user("other_100%@example.com").await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/admin/users?limit=3&search=list&cursor={c}"),
            None => "/v1/admin/users?limit=3&search=list".to_string(),
        };
        let page = app.get(&path, Some(&admin)).await;
        let body = page.assert_ok();
        for u in body["users"].as_array().unwrap() {
            seen.push(u["email"].as_str().unwrap().to_string());
        }
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 7, "duplicates across pages: {seen:?}");
    // Newest first.
    assert_eq!(seen[0], "list6@example.com");
    // LIKE wildcards in the search are literal.
    let pct = app.get("/v1/admin/users?search=%25", Some(&admin)).await;
    let emails: Vec<Value> = pct.assert_ok()["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["email"].clone())
        .collect();
    assert_eq!(emails, vec![json!("other_100%@example.com")]);
    app.get("/v1/admin/users?cursor=!!!", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/admin/users?limit=many", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
}

async fn admin_creates_patches_and_deletes_users(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let created = app
        .post("/v1/admin/users", Some(&admin), json!({"email": "made@example.com", "password": "made by admin", "email_verified": true}))
        .await;
    assert_eq!(created.status.as_u16(), 201, "{}", created.text);
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(created.body["email_verified"], true);
    app.post(
        "/v1/admin/users",
        Some(&admin),
        json!({"email": "made@example.com"}),
    )
    .await
    .assert_error(409, "already_exists");
    let got = app
        .get(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await;
    assert_eq!(got.assert_ok()["email"], "made@example.com");
    let patched = app
        .patch(
            &format!("/v1/admin/users/{id}"),
            Some(&admin),
            json!({"password": "reset by admin", "email_verified": false}),
        )
        .await;
    assert_eq!(patched.assert_ok()["email_verified"], false);
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": "made@example.com", "password": "reset by admin"}),
    )
    .await
    .assert_ok();
    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"claims": "admin"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"disabled": "yes"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.patch(
        "/v1/admin/users/nobody",
        Some(&admin),
        json!({"disabled": true}),
    )
    .await
    .assert_error(404, "not_found");
    let gone = app
        .delete(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await;
    assert_eq!(gone.status.as_u16(), 204);
    app.get(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await
        .assert_error(404, "not_found");
    app.delete(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await
        .assert_error(404, "not_found");
}

async fn claims_set_by_an_admin_appear_in_the_next_access_token(backend: Backend) {
    use base64::Engine;
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (id, _, refresh) = app.user("mod@example.com").await;
    let patched = app
        .patch(
            &format!("/v1/admin/users/{id}"),
            Some(&admin),
            json!({"claims": {"role": "moderator"}}),
        )
        .await;
    assert_eq!(patched.assert_ok()["claims"], json!({"role": "moderator"}));
    let refreshed = app.refresh(&refresh).await;
    let token = refreshed.assert_ok()["session"]["access_token"]
        .as_str()
        .unwrap();
    let payload: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["claims"], json!({"role": "moderator"}));
}

async fn admin_logout_revokes_every_session(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (id, _, r1) = app.user("many@example.com").await;
    let second = app
        .post(
            "/v1/auth/token?grant_type=password",
            None,
            json!({"email": "many@example.com", "password": "correct horse battery"}),
        )
        .await;
    let r2 = second.assert_ok()["session"]["refresh_token"]
        .as_str()
        .unwrap()
        .to_string();
    let out = app
        .send(
            Method::POST,
            &format!("/v1/admin/users/{id}/logout"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(out.status.as_u16(), 204, "{}", out.text);
    app.refresh(&r1).await.assert_error(401, "unauthenticated");
    app.refresh(&r2).await.assert_error(401, "unauthenticated");
}

async fn service_keys_are_shown_once_work_and_die_when_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let created = app
        .post(
            "/v1/admin/keys",
            Some(&admin),
            json!({"name": "backend job"}),
        )
        .await;
    assert_eq!(created.status.as_u16(), 201, "{}", created.text);
    let key = created.body["key"].as_str().unwrap().to_string();
    let id = created.body["id"].as_str().unwrap().to_string();
    assert!(key.starts_with("bsk_"));
    let list = app.get("/v1/admin/keys", Some(&admin)).await;
    assert!(!list.text.contains(&key), "the secret must never be listed");
    assert_eq!(list.body["keys"][0]["name"], "backend job");
    assert!(key.starts_with(list.body["keys"][0]["prefix"].as_str().unwrap()));
    // The key acts as an admin.
    app.get("/v1/admin/users", Some(&key)).await.assert_ok();
    app.post("/v1/admin/keys", Some(&admin), json!({"name": ""}))
        .await
        .assert_error(400, "invalid_argument");
    let deleted = app
        .delete(&format!("/v1/admin/keys/{id}"), Some(&admin))
        .await;
    assert_eq!(deleted.status.as_u16(), 204);
    app.get("/v1/admin/users", Some(&key))
        .await
        .assert_error(401, "unauthenticated");
    app.delete(&format!("/v1/admin/keys/{id}"), Some(&admin))
        .await
        .assert_error(404, "not_found");
}

async fn every_admin_write_is_in_the_audit_log(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (id, _, _) = app.user("audited@example.com").await;
    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"disabled": true}),
    )
    .await
    .assert_ok();
    let key = app
        .post("/v1/admin/keys", Some(&admin), json!({"name": "k"}))
        .await;
    let key_id = key.body["id"].as_str().unwrap().to_string();
    let secret = key.body["key"].as_str().unwrap().to_string();
    // A write by a service key is attributed to the key.
    app.post(
        &format!("/v1/admin/users/{id}/logout"),
        Some(&secret),
        json!({}),
    )
    .await;
    app.delete(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await;
    let log = app.get("/v1/admin/audit?limit=2", Some(&admin)).await;
    let entries = log.assert_ok()["entries"].as_array().unwrap().clone();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["action"], "user.delete");
    assert_eq!(entries[1]["action"], "user.logout");
    assert_eq!(entries[1]["actor_type"], "service");
    assert_eq!(entries[1]["actor_id"], json!(key_id));
    let next = log.body["next_cursor"].as_str().unwrap();
    let rest = app
        .get(&format!("/v1/admin/audit?cursor={next}"), Some(&admin))
        .await;
    let actions: Vec<Value> = rest.assert_ok()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].clone())
        .collect();
    assert_eq!(actions, vec![json!("key.create"), json!("user.update")]);
    assert_eq!(rest.body["entries"][1]["actor_type"], "admin");
    assert_eq!(rest.body["entries"][1]["target"], json!(id));
    app.get("/v1/admin/audit", None)
        .await
        .assert_error(401, "unauthenticated");
}
