//! Security issue 6, the auth parts: what a hostile or merely concurrent client tried against
//! accounts and sessions, and its variants. An admin's disable or claims change must survive
//! concurrent user writes; a disabled user never gets a token again; a password change or
//! reset ends the other sessions, including ones being started with the old password at
//! that moment; setup tokens, service keys, token expiry and the rate-limit keys hold.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use basalt::config::Secret;
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::helpers::{spawn_app, spawn_app_with, Backend, TestApp};
use crate::store_tests;

store_tests!(
    an_admins_disable_and_claims_win_over_concurrent_edits_sign_ins_and_refreshes,
    a_disabled_user_never_gets_a_token_again,
    a_password_change_ends_every_other_session_and_keeps_this_one,
    an_admin_password_reset_ends_every_session,
    sessions_signed_in_with_the_old_password_end_with_a_concurrent_password_change,
    changing_the_email_needs_the_current_password,
    current_password_guesses_are_rate_limited_like_sign_ins,
    junk_emails_get_no_account_bucket_and_count_against_the_ip,
    ipv6_and_ipv4_mapped_clients_get_their_own_ip_buckets,
    a_setup_request_that_fails_validation_leaves_the_token_usable,
    racing_setup_requests_make_exactly_one_admin,
    a_service_key_cannot_manage_service_keys,
    a_deleted_service_key_stops_working_at_once_on_every_node,
    a_token_is_refused_in_its_expiry_second,
);

const PASSWORD: &str = "correct horse battery";

/// One sign-in or refresh attempted during a race: when it was sent, its status, and the
/// refresh token it obtained.
#[derive(Debug)]
struct Attempt {
    sent: Instant,
    status: u16,
    refresh_token: Option<String>,
}

fn refresh_token_of(body: &Value) -> Option<String> {
    body["session"]["refresh_token"]
        .as_str()
        .map(str::to_string)
}

async fn sign_in(app: &TestApp, email: &str, password: &str) -> crate::helpers::Reply {
    app.post(
        "/v1/auth/token?grant_type=password",
        None,
        json!({"email": email, "password": password}),
    )
    .await
}

/// Signs in with `password` until `stop` is set, recording every attempt.
fn keep_signing_in(
    app: Arc<TestApp>,
    email: String,
    password: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Attempt>> {
    tokio::spawn(async move {
        let mut attempts = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            let attempt = sign_in(&app, &email, password).await;
            attempts.push(Attempt {
                sent,
                status: attempt.status.as_u16(),
                refresh_token: refresh_token_of(&attempt.body),
            });
        }
        attempts
    })
}

/// The argon2 cost of production defaults, so a sign-in spends its tens of milliseconds
/// between reading the user and writing the session, as it does in a real deployment.
fn real_argon2(config: &mut basalt::config::Config) {
    let defaults = basalt::config::Config::default();
    config.auth.argon2_memory_kib = defaults.auth.argon2_memory_kib;
    config.auth.argon2_iterations = defaults.auth.argon2_iterations;
}

async fn an_admins_disable_and_claims_win_over_concurrent_edits_sign_ins_and_refreshes(
    backend: Backend,
) {
    let app = Arc::new(spawn_app_with(backend, real_argon2).await);
    let admin = app.admin_token().await;
    for round in 0..5u64 {
        let email = format!("racer{round}@example.com");
        let (id, access, refresh) = app.user(&email).await;
        let stop = Arc::new(AtomicBool::new(false));

        let patcher = tokio::spawn({
            let (app, access, stop) = (app.clone(), access.clone(), stop.clone());
            async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    n += 1;
                    app.patch("/v1/auth/user", Some(&access), json!({"data": {"n": n}}))
                        .await;
                }
            }
        });
        let signer = keep_signing_in(app.clone(), email.clone(), PASSWORD, stop.clone());
        let refresher = tokio::spawn({
            let (app, stop) = (app.clone(), stop.clone());
            async move {
                let mut attempts = Vec::new();
                let mut token = refresh;
                while !stop.load(Ordering::SeqCst) {
                    let sent = Instant::now();
                    let reply = app.refresh(&token).await;
                    let obtained = refresh_token_of(&reply.body);
                    if let Some(next) = &obtained {
                        token = next.clone();
                    }
                    attempts.push(Attempt {
                        sent,
                        status: reply.status.as_u16(),
                        refresh_token: obtained,
                    });
                }
                attempts
            }
        });

        // Let the racers get going, then disable in the middle of them.
        tokio::time::sleep(Duration::from_millis(40 + round * 17)).await;
        let claims = json!({"plan": "revoked", "round": round});
        app.patch(
            &format!("/v1/admin/users/{id}"),
            Some(&admin),
            json!({"disabled": true, "claims": claims}),
        )
        .await
        .assert_ok();
        let disabled_at = Instant::now();
        tokio::time::sleep(Duration::from_millis(150)).await;
        stop.store(true, Ordering::SeqCst);
        patcher.await.unwrap();
        let mut attempts = signer.await.unwrap();
        attempts.extend(refresher.await.unwrap());

        let user = app
            .get(&format!("/v1/admin/users/{id}"), Some(&admin))
            .await;
        assert_eq!(
            user.assert_ok()["disabled"],
            true,
            "round {round}: re-enabled"
        );
        assert_eq!(user.body["claims"], claims, "round {round}: claims undone");
        assert!(
            attempts.iter().any(|a| a.status == 200),
            "round {round}: no attempt succeeded before the disable, the race did not happen"
        );
        for a in attempts.iter().filter(|a| a.sent > disabled_at) {
            assert!(
                a.status >= 400,
                "round {round}: a sign-in or refresh sent after the disable answered {}",
                a.status
            );
        }
        for a in &attempts {
            if let Some(token) = &a.refresh_token {
                app.refresh(token)
                    .await
                    .assert_error(401, "unauthenticated");
            }
        }
        sign_in(&app, &email, PASSWORD)
            .await
            .assert_error(403, "permission_denied");
    }
}

async fn a_disabled_user_never_gets_a_token_again(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (id, access, first_refresh) = app.user("dora@example.com").await;
    let other = sign_in(&app, "dora@example.com", PASSWORD).await;
    let other_refresh = refresh_token_of(other.assert_ok()).unwrap();
    // A rotated token is answered inside the grace window with its successor: that path
    // must check the account too.
    let rotated = app.refresh(&first_refresh).await;
    let successor = refresh_token_of(rotated.assert_ok()).unwrap();

    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"disabled": true}),
    )
    .await
    .assert_ok();

    for (name, token) in [
        ("inside the grace window", &first_refresh),
        ("the successor", &successor),
        ("another session", &other_refresh),
    ] {
        let reply = app.refresh(token).await;
        assert_eq!(reply.status.as_u16(), 401, "{name}: {}", reply.text);
        reply.assert_error(401, "unauthenticated");
    }
    sign_in(&app, "dora@example.com", PASSWORD)
        .await
        .assert_error(403, "permission_denied");
    // Nor can the user change anything with the access token that has yet to expire.
    app.patch("/v1/auth/user", Some(&access), json!({"data": {"x": 1}}))
        .await
        .assert_error(403, "permission_denied");
    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"password": "a new password", "current_password": PASSWORD}),
    )
    .await
    .assert_error(403, "permission_denied");
    let user = app
        .get(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await;
    assert_eq!(user.assert_ok()["disabled"], true);
    assert_eq!(user.body["data"], json!({}));
}

async fn a_password_change_ends_every_other_session_and_keeps_this_one(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, access, refresh) = app.user("paul@example.com").await;
    let mut others = Vec::new();
    for _ in 0..2 {
        let reply = sign_in(&app, "paul@example.com", PASSWORD).await;
        others.push(refresh_token_of(reply.assert_ok()).unwrap());
    }
    let (_, stranger_access, stranger_refresh) = app.user("stranger@example.com").await;

    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"password": "a brand new one", "current_password": PASSWORD}),
    )
    .await
    .assert_ok();

    for token in &others {
        app.refresh(token)
            .await
            .assert_error(401, "unauthenticated");
    }
    let sessions = app.get("/v1/auth/sessions", Some(&access)).await;
    let sessions = sessions.assert_ok()["sessions"].as_array().unwrap().clone();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["current"], true);
    // This session carries on.
    app.refresh(&refresh).await.assert_ok();
    // Another user's sessions are untouched.
    app.refresh(&stranger_refresh).await.assert_ok();
    app.get("/v1/auth/user", Some(&stranger_access))
        .await
        .assert_ok();
    sign_in(&app, "paul@example.com", PASSWORD)
        .await
        .assert_error(400, "invalid_argument");
    sign_in(&app, "paul@example.com", "a brand new one")
        .await
        .assert_ok();
}

async fn an_admin_password_reset_ends_every_session(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (id, _, refresh) = app.user("rita@example.com").await;
    let other = sign_in(&app, "rita@example.com", PASSWORD).await;
    let other_refresh = refresh_token_of(other.assert_ok()).unwrap();
    let (_, _, bystander) = app.user("bystander@example.com").await;

    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"password": "reset by admin"}),
    )
    .await
    .assert_ok();

    for token in [&refresh, &other_refresh] {
        app.refresh(token)
            .await
            .assert_error(401, "unauthenticated");
    }
    app.refresh(&bystander).await.assert_ok();
    sign_in(&app, "rita@example.com", PASSWORD)
        .await
        .assert_error(400, "invalid_argument");
    sign_in(&app, "rita@example.com", "reset by admin")
        .await
        .assert_ok();
    // Changing anything else revokes nothing.
    let fresh = sign_in(&app, "rita@example.com", "reset by admin").await;
    let fresh_refresh = refresh_token_of(fresh.assert_ok()).unwrap();
    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"claims": {"tier": "gold"}, "email_verified": true}),
    )
    .await
    .assert_ok();
    app.refresh(&fresh_refresh).await.assert_ok();
}

async fn sessions_signed_in_with_the_old_password_end_with_a_concurrent_password_change(
    backend: Backend,
) {
    let app = Arc::new(spawn_app_with(backend, real_argon2).await);
    let admin = app.admin_token().await;
    for round in 0..4u64 {
        let email = format!("changer{round}@example.com");
        let (id, access, refresh) = app.user(&email).await;
        let stop = Arc::new(AtomicBool::new(false));
        let signers: Vec<_> = (0..2)
            .map(|_| keep_signing_in(app.clone(), email.clone(), PASSWORD, stop.clone()))
            .collect();
        tokio::time::sleep(Duration::from_millis(80 + round * 20)).await;
        // Even rounds: the user changes it; odd rounds: an admin resets it.
        let by_admin = round % 2 == 1;
        if by_admin {
            app.patch(
                &format!("/v1/admin/users/{id}"),
                Some(&admin),
                json!({"password": "the new password"}),
            )
            .await
            .assert_ok();
        } else {
            app.patch(
                "/v1/auth/user",
                Some(&access),
                json!({"password": "the new password", "current_password": PASSWORD}),
            )
            .await
            .assert_ok();
        }
        let changed_at = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        stop.store(true, Ordering::SeqCst);
        let mut attempts = Vec::new();
        for signer in signers {
            attempts.extend(signer.await.unwrap());
        }

        assert!(
            attempts.iter().any(|a| a.status == 200),
            "round {round}: no sign-in succeeded before the change, the race did not happen"
        );
        for a in &attempts {
            if a.sent > changed_at {
                assert_eq!(
                    a.status, 400,
                    "round {round}: the old password worked after the change"
                );
            }
            if let Some(token) = &a.refresh_token {
                let reply = app.refresh(token).await;
                assert_eq!(
                    reply.status.as_u16(),
                    401,
                    "round {round}: a session signed in with the old password outlived the change: {}",
                    reply.text
                );
            }
        }
        let own = app.refresh(&refresh).await;
        if by_admin {
            own.assert_error(401, "unauthenticated");
        } else {
            own.assert_ok();
        }
    }
}

async fn changing_the_email_needs_the_current_password(backend: Backend) {
    let app = spawn_app(backend).await;
    let (_, access, _) = app.user("eve@example.com").await;
    let missing = app
        .patch(
            "/v1/auth/user",
            Some(&access),
            json!({"email": "mallory@example.com"}),
        )
        .await;
    missing.assert_error(400, "invalid_argument");
    assert_eq!(
        missing.body["error"]["details"]["field"],
        "current_password"
    );
    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"email": "mallory@example.com", "current_password": "not it at all"}),
    )
    .await
    .assert_error(400, "invalid_argument");
    let me = app.get("/v1/auth/user", Some(&access)).await;
    assert_eq!(me.assert_ok()["email"], "eve@example.com");

    // Sending the address it already has (in any case) changes nothing and needs nothing.
    app.patch(
        "/v1/auth/user",
        Some(&access),
        json!({"email": "EVE@example.com", "data": {"a": 1}}),
    )
    .await
    .assert_ok();
    let changed = app
        .patch(
            "/v1/auth/user",
            Some(&access),
            json!({"email": "eve2@example.com", "current_password": PASSWORD}),
        )
        .await;
    assert_eq!(changed.assert_ok()["email"], "eve2@example.com");
    assert_eq!(changed.body["data"], json!({"a": 1}));

    // An anonymous account has no password to give: it upgrades with email and password.
    let anon = app.post("/v1/auth/anonymous", None, json!({})).await;
    let anon_access = anon.assert_ok()["session"]["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let upgraded = app
        .patch(
            "/v1/auth/user",
            Some(&anon_access),
            json!({"email": "anon@example.com", "password": "anon password"}),
        )
        .await;
    assert_eq!(upgraded.assert_ok()["is_anonymous"], false);
    app.patch(
        "/v1/auth/user",
        Some(&anon_access),
        json!({"email": "anon2@example.com"}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn junk_emails_get_no_account_bucket_and_count_against_the_ip(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.rate_limit.enabled = true;
        c.rate_limit.auth_per_ip_per_minute = 1000;
        c.rate_limit.auth_per_account_per_minute = 2;
    })
    .await;
    let huge = format!("{}@example.com", "a".repeat(1_000_000));
    let junk = [
        huge.as_str(),
        "not an email",
        "a@b",
        "\u{0}@example.com",
        "",
    ];
    for email in junk {
        // The same junk sent again and again is never limited per account: it names none.
        for _ in 0..3 {
            for (path, body) in [
                (
                    "/v1/auth/token?grant_type=password",
                    json!({"email": email, "password": "whatever 123"}),
                ),
                (
                    "/v1/auth/signup",
                    json!({"email": email, "password": "whatever 123"}),
                ),
                (
                    "/v1/admin/login",
                    json!({"email": email, "password": "whatever 123"}),
                ),
            ] {
                app.post(path, None, body)
                    .await
                    .assert_error(400, "invalid_argument");
            }
        }
    }
    assert_eq!(app.state.auth_limits.tracked_accounts(), 0);

    // A valid address, however it is spelt, is one account.
    for (email, status) in [
        ("Sam@Example.com", 400),
        ("  sam@example.com ", 400),
        ("SAM@EXAMPLE.COM", 429),
    ] {
        let reply = sign_in(&app, email, "wrong password").await;
        assert_eq!(reply.status.as_u16(), status, "{email}: {}", reply.text);
    }
    assert_eq!(app.state.auth_limits.tracked_accounts(), 1);

    // Junk still counts against the sender's IP.
    let app = spawn_app_with(backend, |c| {
        c.rate_limit.enabled = true;
        c.rate_limit.auth_per_ip_per_minute = 3;
        c.rate_limit.auth_per_account_per_minute = 2;
    })
    .await;
    for _ in 0..3 {
        sign_in(&app, &huge, "whatever 123")
            .await
            .assert_error(400, "invalid_argument");
    }
    sign_in(&app, &huge, "whatever 123")
        .await
        .assert_error(429, "rate_limited");
    assert_eq!(app.state.auth_limits.tracked_accounts(), 0);
}

async fn ipv6_and_ipv4_mapped_clients_get_their_own_ip_buckets(backend: Backend) {
    // A dual-stack listener: IPv4 clients arrive as IPv4-mapped IPv6 addresses.
    let app = spawn_app_with(backend, |c| {
        c.listen = "[::]:0".parse().unwrap();
        c.rate_limit.enabled = true;
        c.rate_limit.auth_per_ip_per_minute = 2;
        c.rate_limit.auth_per_account_per_minute = 0;
    })
    .await;
    let port = app.addr.port();
    let attempt = |local: &'static str, host: &'static str| async move {
        let client = reqwest::Client::builder()
            .local_address(local.parse::<IpAddr>().unwrap())
            .build()
            .unwrap();
        let resp = client
            .post(format!("http://{host}:{port}/v1/auth/anonymous"))
            .send()
            .await
            .expect("request sent");
        resp.status().as_u16()
    };
    for (local, host) in [
        ("::1", "[::1]"),
        ("127.0.0.1", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.1"),
    ] {
        let statuses = vec![
            attempt(local, host).await,
            attempt(local, host).await,
            attempt(local, host).await,
        ];
        assert_eq!(statuses, vec![200, 200, 429], "client {local}");
    }
}

async fn a_setup_request_that_fails_validation_leaves_the_token_usable(backend: Backend) {
    let app = spawn_app(backend).await;
    let token = app.setup_token.clone().expect("a setup token");
    for (body, field) in [
        (
            json!({"token": token, "email": "not-an-email", "password": "first admin pw"}),
            "email",
        ),
        (
            json!({"token": token, "email": "first@example.com", "password": "short"}),
            "password",
        ),
        (
            json!({"token": token, "email": "", "password": ""}),
            "email",
        ),
    ] {
        let reply = app.post("/v1/admin/setup", None, body).await;
        reply.assert_error(400, "invalid_argument");
        assert_eq!(reply.body["error"]["details"]["field"], field);
    }
    // A malformed body never reaches the token either.
    app.post("/v1/admin/setup", None, json!({"token": token}))
        .await
        .assert_error(400, "invalid_argument");
    let ok = app
        .post(
            "/v1/admin/setup",
            None,
            json!({"token": token, "email": "first@example.com", "password": "first admin pw"}),
        )
        .await;
    let admin = ok.assert_ok()["token"].as_str().unwrap().to_string();
    app.get("/v1/admin/users", Some(&admin)).await.assert_ok();
    app.post(
        "/v1/admin/setup",
        None,
        json!({"token": token, "email": "again@example.com", "password": "first admin pw"}),
    )
    .await
    .assert_error(403, "permission_denied");
}

async fn racing_setup_requests_make_exactly_one_admin(backend: Backend) {
    let app = Arc::new(spawn_app(backend).await);
    let token = app.setup_token.clone().expect("a setup token");
    let racers: Vec<_> = (0..8)
        .map(|i| {
            let (app, token) = (app.clone(), token.clone());
            tokio::spawn(async move {
                let reply = app
                    .post(
                        "/v1/admin/setup",
                        None,
                        json!({"token": token, "email": format!("racer{i}@example.com"), "password": "first admin pw"}),
                    )
                    .await;
                (i, reply)
            })
        })
        .collect();
    let mut winners = Vec::new();
    for racer in racers {
        let (i, reply) = racer.await.unwrap();
        if reply.status.as_u16() == 200 {
            winners.push(i);
        } else {
            reply.assert_error(403, "permission_denied");
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    assert_eq!(app.state.store.count_admins().await.unwrap(), 1);
    for i in 0..8 {
        let login = app
            .post(
                "/v1/admin/login",
                None,
                json!({"email": format!("racer{i}@example.com"), "password": "first admin pw"}),
            )
            .await;
        assert_eq!(login.status.is_success(), winners == [i], "racer {i}");
    }
}

async fn a_service_key_cannot_manage_service_keys(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let created = app
        .post("/v1/admin/keys", Some(&admin), json!({"name": "job"}))
        .await;
    assert_eq!(created.status.as_u16(), 201, "{}", created.text);
    let key = created.body["key"].as_str().unwrap().to_string();
    let id = created.body["id"].as_str().unwrap().to_string();

    app.post("/v1/admin/keys", Some(&key), json!({"name": "spare"}))
        .await
        .assert_error(403, "permission_denied");
    app.get("/v1/admin/keys", Some(&key))
        .await
        .assert_error(403, "permission_denied");
    app.delete(&format!("/v1/admin/keys/{id}"), Some(&key))
        .await
        .assert_error(403, "permission_denied");
    let (_, user_token, _) = app.user("uma@example.com").await;
    app.get("/v1/admin/keys", Some(&user_token))
        .await
        .assert_error(403, "permission_denied");
    app.get("/v1/admin/keys", None)
        .await
        .assert_error(401, "unauthenticated");
    // Nothing was minted, and the key still does what service keys are for.
    let keys = app.get("/v1/admin/keys", Some(&admin)).await;
    assert_eq!(keys.assert_ok()["keys"].as_array().unwrap().len(), 1);
    app.get("/v1/admin/users", Some(&key)).await.assert_ok();
    app.post(
        "/v1/admin/users",
        Some(&key),
        json!({"email": "made-by-a-job@example.com"}),
    )
    .await
    .assert_ok();
    // The OpenAPI document says so.
    let openapi = app.get("/v1/openapi.json", None).await;
    let create = &openapi.assert_ok()["paths"]["/v1/admin/keys"]["post"];
    assert!(create["responses"].get("403").is_some(), "{create}");
}

async fn a_deleted_service_key_stops_working_at_once_on_every_node(backend: Backend) {
    let first = spawn_app(backend).await;
    let url = first.state.config.database_url();
    let second = spawn_app_with(backend, |c| c.database.url = Some(Secret::new(url))).await;
    let admin = first.admin_token().await;
    let created = first
        .post("/v1/admin/keys", Some(&admin), json!({"name": "leaked"}))
        .await;
    let key = created.body["key"].as_str().unwrap().to_string();
    let id = created.body["id"].as_str().unwrap().to_string();
    // Used on both nodes, so anything a node might remember about it is warm.
    for node in [&first, &second] {
        for _ in 0..3 {
            node.get("/v1/admin/users", Some(&key)).await.assert_ok();
        }
    }
    let deleted = first
        .delete(&format!("/v1/admin/keys/{id}"), Some(&admin))
        .await;
    assert_eq!(deleted.status.as_u16(), 204);
    for node in [&second, &first] {
        node.get("/v1/admin/users", Some(&key))
            .await
            .assert_error(401, "unauthenticated");
    }
}

async fn a_token_is_refused_in_its_expiry_second(backend: Backend) {
    let app = spawn_app(backend).await;
    let (id, _, _) = app.user("tess@example.com").await;
    let user = app.state.auth.user(&id).await.unwrap();
    let admin = app
        .state
        .auth
        .create_admin("clock@example.com", "admin password 1")
        .await
        .unwrap();
    let tokens = &app.state.auth.tokens;
    let user_ttl = tokens.access_ttl.as_secs() as i64;
    let admin_ttl = tokens.admin_ttl.as_secs() as i64;

    // Start right after a second begins, so the requests below arrive within it.
    let millis = chrono::Utc::now().timestamp_subsec_millis() as u64;
    tokio::time::sleep(Duration::from_millis(1000 - millis.min(999) + 10)).await;
    let second = chrono::Utc::now().timestamp();
    let issued_at = |ttl: i64, exp: i64| chrono::DateTime::from_timestamp(exp - ttl, 0).unwrap();
    let (user_at_exp, exp) = tokens
        .issue_user_token(&user, "session", issued_at(user_ttl, second))
        .unwrap();
    assert_eq!(exp, second);
    let (admin_at_exp, _) = tokens
        .issue_admin_token(&admin.id, issued_at(admin_ttl, second))
        .unwrap();

    let message = app
        .get("/v1/auth/user", Some(&user_at_exp))
        .await
        .assert_error(401, "unauthenticated");
    assert!(message.contains("expired"), "{message}");
    app.get("/v1/admin/users", Some(&admin_at_exp))
        .await
        .assert_error(401, "unauthenticated");
    // Tokens expiring a second later are fine: the check is exactly `exp > now`.
    let (user_valid, _) = tokens
        .issue_user_token(&user, "session", issued_at(user_ttl, second + 2))
        .unwrap();
    let (admin_valid, _) = tokens
        .issue_admin_token(&admin.id, issued_at(admin_ttl, second + 2))
        .unwrap();
    app.get("/v1/auth/user", Some(&user_valid))
        .await
        .assert_ok();
    app.get("/v1/admin/users", Some(&admin_valid))
        .await
        .assert_ok();
    // Once verified and cached, a token is still refused when its second comes.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    app.get("/v1/auth/user", Some(&user_valid))
        .await
        .assert_error(401, "unauthenticated");
}

/// Hostile-client round 2: `PATCH /v1/auth/user` checked `current_password` (and hashed new
/// passwords) with no limit, so a stolen access token could guess the password 30 times a
/// second, and an anonymous account could probe which emails are taken.
async fn current_password_guesses_are_rate_limited_like_sign_ins(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.rate_limit.enabled = true;
        c.rate_limit.auth_per_ip_per_minute = 1000;
        c.rate_limit.auth_per_account_per_minute = 5;
    })
    .await;
    let (_, token, _) = app.user("guessed@example.com").await;
    let mut statuses = Vec::new();
    for i in 0..8 {
        let reply = app
            .patch(
                "/v1/auth/user",
                Some(&token),
                json!({"password": "a new password 1", "current_password": format!("guess {i}")}),
            )
            .await;
        statuses.push(reply.status.as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let first_limited = statuses.iter().position(|s| *s == 429).unwrap();
    assert!(
        statuses[..first_limited].iter().all(|s| *s == 400),
        "{statuses:?}"
    );
    // Profile data alone is not a password check and stays unlimited.
    app.patch("/v1/auth/user", Some(&token), json!({"data": {"n": 1}}))
        .await
        .assert_ok();
}
