//! API.md § Rules: rules as filters, the worked examples of docs/rules.md, and attempts to
//! get around them.

use reqwest::Method;
use serde_json::{json, Value};

use crate::documents::admin_collection;
use crate::helpers::{spawn_app, Backend, Reply, TestApp};
use crate::store_tests;

store_tests!(
    missing_rule_denies_users_but_not_admins_or_service_keys,
    owner_only_todos,
    query_without_constraint_returns_only_readable_documents,
    an_or_cannot_widen_the_read_rule,
    batch_mixing_allowed_and_forbidden_writes_writes_nothing,
    public_read_owner_write_posts,
    moderator_role_claims,
    get_and_exists_in_rules_read_other_documents,
    forged_reserved_fields_cannot_fake_ownership,
    per_row_rules_fill_the_page_and_page_on,
    aggregates_obey_the_read_rule,
    a_refused_writer_learns_nothing_from_preconditions,
    paging_past_the_row_budget_skips_and_repeats_nothing,
);

fn ids(reply: &Reply) -> Vec<String> {
    let mut v: Vec<String> = reply.body["documents"]
        .as_array()
        .unwrap_or_else(|| panic!("no documents: {}", reply.text))
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

async fn todos_app(backend: Backend) -> (TestApp, String) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "todos",
        json!({"rules": {
            "read": "auth != null && resource.data.owner == auth.uid",
            "create": "auth != null && request.data.owner == auth.uid",
            "update": "auth != null && resource.data.owner == auth.uid && request.data.owner == auth.uid",
            "delete": "auth != null && resource.data.owner == auth.uid"},
          "indexes": [{"fields": [["owner", "asc"]]}]}),
    )
    .await;
    (app, admin)
}

async fn missing_rule_denies_users_but_not_admins_or_service_keys(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "locked", json!({"rules": {"read": "true"}})).await;
    let (_, user, _) = app.user("u@example.com").await;
    app.post("/v1/db/locked", Some(&user), json!({"data": {"a": 1}}))
        .await
        .assert_error(403, "permission_denied");
    app.post("/v1/db/locked", None, json!({"data": {"a": 1}}))
        .await
        .assert_error(403, "permission_denied");
    let key = app
        .post("/v1/admin/keys", Some(&admin), json!({"name": "svc"}))
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_string();
    let by_key = app
        .post(
            "/v1/db/locked",
            Some(&key),
            json!({"id": "k", "data": {"a": 1}}),
        )
        .await;
    assert_eq!(by_key.status.as_u16(), 201, "{}", by_key.text);
    app.patch("/v1/db/locked/k", Some(&user), json!({"data": {"a": 2}}))
        .await
        .assert_error(403, "permission_denied");
    app.delete("/v1/db/locked/k", Some(&user))
        .await
        .assert_error(403, "permission_denied");
    assert_eq!(
        app.get("/v1/db/locked/k", Some(&user)).await.assert_ok()["data"]["a"],
        1
    );
    admin_collection(&app, &admin, "hidden", json!({})).await;
    app.post("/v1/db/hidden/_query", Some(&user), json!({}))
        .await
        .assert_error(403, "permission_denied");
    app.post("/v1/db/hidden/_query", Some(&admin), json!({}))
        .await
        .assert_ok();
}

async fn owner_only_todos(backend: Backend) {
    let (app, _) = todos_app(backend).await;
    let (alice, at, _) = app.user("alice@example.com").await;
    let (bob, bt, _) = app.user("bob@example.com").await;
    app.post(
        "/v1/db/todos",
        Some(&at),
        json!({"id": "a1", "data": {"owner": alice, "title": "milk"}}),
    )
    .await
    .assert_ok();
    app.post(
        "/v1/db/todos",
        Some(&bt),
        json!({"id": "b1", "data": {"owner": bob, "title": "eggs"}}),
    )
    .await
    .assert_ok();
    // Creating a todo for someone else is refused.
    app.post("/v1/db/todos", Some(&at), json!({"data": {"owner": bob}}))
        .await
        .assert_error(403, "permission_denied");
    app.post("/v1/db/todos", None, json!({"data": {"owner": "x"}}))
        .await
        .assert_error(403, "permission_denied");
    // Reading, changing, deleting someone else's: refused.
    app.get("/v1/db/todos/b1", Some(&at))
        .await
        .assert_error(403, "permission_denied");
    app.get("/v1/db/todos/b1", None)
        .await
        .assert_error(403, "permission_denied");
    app.patch(
        "/v1/db/todos/b1",
        Some(&at),
        json!({"data": {"title": "hacked"}}),
    )
    .await
    .assert_error(403, "permission_denied");
    app.send(
        Method::PUT,
        "/v1/db/todos/b1",
        Some(&at),
        Some(json!({"data": {"owner": alice}})),
    )
    .await
    .assert_error(403, "permission_denied");
    app.delete("/v1/db/todos/b1", Some(&at))
        .await
        .assert_error(403, "permission_denied");
    // Giving one's own todo away is refused by the update rule.
    app.patch(
        "/v1/db/todos/a1",
        Some(&at),
        json!({"data": {"owner": bob}}),
    )
    .await
    .assert_error(403, "permission_denied");
    app.patch(
        "/v1/db/todos/a1",
        Some(&at),
        json!({"data": {"done": true}}),
    )
    .await
    .assert_ok();
    assert_eq!(
        app.get("/v1/db/todos/b1", Some(&bt)).await.assert_ok()["data"]["title"],
        "eggs"
    );
    // A missing document answers like a forbidden one, so ids cannot be probed.
    app.get("/v1/db/todos/zzz", Some(&at))
        .await
        .assert_error(403, "permission_denied");
}

async fn query_without_constraint_returns_only_readable_documents(backend: Backend) {
    let (app, admin) = todos_app(backend).await;
    let (alice, at, _) = app.user("alice@example.com").await;
    let mut writes = Vec::new();
    for i in 0..30 {
        let owner = if i % 3 == 0 {
            alice.clone()
        } else {
            format!("other{i}")
        };
        writes.push(json!({"op": "create", "collection": "todos", "id": format!("t{i:02}"), "data": {"owner": owner}}));
    }
    app.post("/v1/db/_batch", Some(&admin), json!({"writes": writes}))
        .await
        .assert_ok();
    let mine = app
        .post("/v1/db/todos/_query", Some(&at), json!({"count": true}))
        .await;
    assert_eq!(ids(&mine).len(), 10);
    assert_eq!(mine.body["count"], 10);
    assert!(mine.body["documents"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["data"]["owner"] == json!(alice)));
    let anon = app.post("/v1/db/todos/_query", None, json!({})).await;
    assert_eq!(ids(&anon), Vec::<String>::new());
    let everything = app
        .post("/v1/db/todos/_query", Some(&admin), json!({"count": true}))
        .await;
    assert_eq!(everything.body["count"], 30);
}

async fn an_or_cannot_widen_the_read_rule(backend: Backend) {
    let (app, admin) = todos_app(backend).await;
    let (alice, at, _) = app.user("alice@example.com").await;
    app.post(
        "/v1/db/_batch",
        Some(&admin),
        json!({"writes": [
        {"op": "create", "collection": "todos", "id": "mine", "data": {"owner": alice}},
        {"op": "create", "collection": "todos", "id": "theirs", "data": {"owner": "bob"}},
        {"op": "create", "collection": "todos", "id": "ownerless", "data": {}}]}),
    )
    .await
    .assert_ok();
    for w in [
        json!({"or": [["owner", "==", "bob"], ["owner", "!=", "bob"]]}),
        json!({"or": [["owner", "exists", false], ["owner", "exists", true]]}),
        json!({"or": [["$id", "==", "theirs"], ["$id", "==", "mine"]]}),
        json!(["owner", "in", ["bob", alice]]),
    ] {
        let r = app
            .post("/v1/db/todos/_query", Some(&at), json!({"where": w}))
            .await;
        assert_eq!(ids(&r), ["mine"], "{w}");
    }
    let agg = app.post("/v1/db/todos/_aggregate", Some(&at), json!({"where": {"or": [["owner", "==", "bob"], ["owner", "exists", false]]}, "aggregations": {"n": {"count": {}}}})).await;
    assert_eq!(agg.assert_ok()["n"], 0);
}

async fn batch_mixing_allowed_and_forbidden_writes_writes_nothing(backend: Backend) {
    let (app, admin) = todos_app(backend).await;
    let (alice, at, _) = app.user("alice@example.com").await;
    app.post(
        "/v1/db/todos",
        Some(&admin),
        json!({"id": "bobs", "data": {"owner": "bob", "n": 1}}),
    )
    .await
    .assert_ok();
    let r = app
        .post(
            "/v1/db/_batch",
            Some(&at),
            json!({"writes": [
                {"op": "create", "collection": "todos", "id": "ok1", "data": {"owner": alice}},
                {"op": "update", "collection": "todos", "id": "bobs", "data": {"n": 2}},
            ]}),
        )
        .await;
    r.assert_error(403, "permission_denied");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("write 1"));
    app.get("/v1/db/todos/ok1", Some(&admin))
        .await
        .assert_error(404, "not_found");
    assert_eq!(
        app.get("/v1/db/todos/bobs", Some(&admin)).await.body["data"]["n"],
        1
    );
    let ok = app
        .post(
            "/v1/db/_batch",
            Some(&at),
            json!({"writes": [
                {"op": "create", "collection": "todos", "id": "ok1", "data": {"owner": alice}},
                {"op": "update", "collection": "todos", "id": "ok1", "data": {"title": "x"}},
            ]}),
        )
        .await;
    ok.assert_ok();
}

async fn public_read_owner_write_posts(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "posts", json!({"rules": {
        "read": "resource.data.public == true || (auth != null && resource.data.author == auth.uid)",
        "create": "auth != null && request.data.author == auth.uid",
        "update": "auth != null && resource.data.author == auth.uid && request.data.author == auth.uid",
        "delete": "auth != null && resource.data.author == auth.uid"}})).await;
    let (ann, at, _) = app.user("ann@example.com").await;
    let (_, bt, _) = app.user("ben@example.com").await;
    app.post(
        "/v1/db/posts",
        Some(&at),
        json!({"id": "pub", "data": {"author": ann, "public": true}}),
    )
    .await
    .assert_ok();
    app.post(
        "/v1/db/posts",
        Some(&at),
        json!({"id": "draft", "data": {"author": ann, "public": false}}),
    )
    .await
    .assert_ok();
    app.post(
        "/v1/db/posts",
        Some(&at),
        json!({"id": "bare", "data": {"author": ann}}),
    )
    .await
    .assert_ok();
    let anon = app.post("/v1/db/posts/_query", None, json!({})).await;
    assert_eq!(ids(&anon), ["pub"]);
    let ben = app.post("/v1/db/posts/_query", Some(&bt), json!({})).await;
    assert_eq!(ids(&ben), ["pub"]);
    let own = app.post("/v1/db/posts/_query", Some(&at), json!({})).await;
    assert_eq!(ids(&own), ["bare", "draft", "pub"]);
    app.get("/v1/db/posts/pub", None).await.assert_ok();
    app.get("/v1/db/posts/draft", Some(&bt))
        .await
        .assert_error(403, "permission_denied");
    app.patch(
        "/v1/db/posts/pub",
        Some(&bt),
        json!({"data": {"title": "mine now"}}),
    )
    .await
    .assert_error(403, "permission_denied");
}

async fn moderator_role_claims(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "comments", json!({"rules": {
        "read": "true",
        "create": "auth != null && request.data.author == auth.uid",
        "update": "auth != null && (resource.data.author == auth.uid || auth.claims.role == \"moderator\")",
        "delete": "auth != null && auth.claims.role == \"moderator\""}})).await;
    let (uid, ut, _) = app.user("writer@example.com").await;
    let (mid, _, mrefresh) = app.user("mod@example.com").await;
    app.post(
        "/v1/db/comments",
        Some(&ut),
        json!({"id": "c1", "data": {"author": uid, "text": "hi"}}),
    )
    .await
    .assert_ok();
    app.patch(
        &format!("/v1/admin/users/{mid}"),
        Some(&admin),
        json!({"claims": {"role": "moderator"}}),
    )
    .await
    .assert_ok();
    // The claim arrives with the next token.
    let mt = app.refresh(&mrefresh).await.body["session"]["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    app.patch(
        "/v1/db/comments/c1",
        Some(&mt),
        json!({"data": {"text": "[removed]"}}),
    )
    .await
    .assert_ok();
    app.delete("/v1/db/comments/c1", Some(&ut))
        .await
        .assert_error(403, "permission_denied");
    assert_eq!(
        app.delete("/v1/db/comments/c1", Some(&mt))
            .await
            .status
            .as_u16(),
        204
    );
}

async fn get_and_exists_in_rules_read_other_documents(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "members", json!({"rules": {"read": "false"}})).await;
    admin_collection(&app, &admin, "rooms", json!({"rules": {
        "read": "auth != null && exists(\"members\", resource.id + \"_\" + auth.uid)",
        "update": "auth != null && get(\"members\", resource.id + \"_\" + auth.uid).data.role == \"owner\""}})).await;
    let (u1, t1, _) = app.user("m1@example.com").await;
    let (u2, t2, _) = app.user("m2@example.com").await;
    app.post("/v1/db/_batch", Some(&admin), json!({"writes": [
        {"op": "create", "collection": "rooms", "id": "r1", "data": {"name": "one"}},
        {"op": "create", "collection": "rooms", "id": "r2", "data": {"name": "two"}},
        {"op": "create", "collection": "members", "id": format!("r1_{u1}"), "data": {"role": "owner"}},
        {"op": "create", "collection": "members", "id": format!("r1_{u2}"), "data": {"role": "guest"}},
    ]})).await.assert_ok();
    app.get("/v1/db/rooms/r1", Some(&t1)).await.assert_ok();
    app.get("/v1/db/rooms/r2", Some(&t1))
        .await
        .assert_error(403, "permission_denied");
    let q = app.post("/v1/db/rooms/_query", Some(&t2), json!({})).await;
    assert_eq!(ids(&q), ["r1"]);
    app.patch(
        "/v1/db/rooms/r1",
        Some(&t2),
        json!({"data": {"name": "guest edit"}}),
    )
    .await
    .assert_error(403, "permission_denied");
    app.patch(
        "/v1/db/rooms/r1",
        Some(&t1),
        json!({"data": {"name": "owner edit"}}),
    )
    .await
    .assert_ok();
    // The membership documents themselves stay unreadable: get() in a rule is no way out.
    app.get(&format!("/v1/db/members/r1_{u1}"), Some(&t1))
        .await
        .assert_error(403, "permission_denied");
    let m = app
        .post("/v1/db/members/_query", Some(&t1), json!({}))
        .await;
    assert_eq!(ids(&m), Vec::<String>::new());
}

async fn forged_reserved_fields_cannot_fake_ownership(backend: Backend) {
    let (app, _) = todos_app(backend).await;
    let (alice, at, _) = app.user("alice@example.com").await;
    for data in [
        json!({"owner": alice, "$owner": "bob"}),
        json!({"owner": {"$serverTimestamp": true}}),
        json!({"owner": alice, "meta": {"$id": "x"}}),
    ] {
        let r = app
            .post("/v1/db/todos", Some(&at), json!({"data": data}))
            .await;
        assert!(
            r.status.as_u16() == 400 || r.status.as_u16() == 403,
            "{}",
            r.text
        );
    }
    // Metadata in the body is not accepted either.
    app.post(
        "/v1/db/todos",
        Some(&at),
        json!({"data": {"owner": alice}, "version": 99}),
    )
    .await
    .assert_error(400, "invalid_argument");
    // A token whose claims were edited is refused before any rule runs.
    let parts: Vec<&str> = at.split('.').collect();
    use base64::Engine;
    let engine = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut payload: Value = serde_json::from_slice(&engine.decode(parts[1]).unwrap()).unwrap();
    payload["sub"] = json!("bob");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        engine.encode(payload.to_string()),
        parts[2]
    );
    app.post("/v1/db/todos/_query", Some(&forged), json!({}))
        .await
        .assert_error(401, "unauthenticated");
}

async fn per_row_rules_fill_the_page_and_page_on(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    // A rule no SQL can express (a size() of the data): evaluated row by row.
    admin_collection(
        &app,
        &admin,
        "notes",
        json!({"rules": {"read": "size(resource.data.tags) == 2"}}),
    )
    .await;
    let mut writes = Vec::new();
    for i in 0..120 {
        let tags = if i % 4 == 0 {
            json!(["a", "b"])
        } else {
            json!(["a"])
        };
        writes.push(json!({"op": "create", "collection": "notes", "id": format!("n{i:03}"), "data": {"tags": tags}}));
    }
    app.post("/v1/db/_batch", Some(&admin), json!({"writes": writes}))
        .await
        .assert_ok();
    let (_, t, _) = app.user("reader@example.com").await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({"limit": 7, "count": true});
        if let Some(c) = &cursor {
            body["start_after"] = json!(c);
        }
        let page = app.post("/v1/db/notes/_query", Some(&t), body).await;
        let got = ids(&page);
        assert!(got.len() <= 7);
        assert_eq!(page.body["count"], 30);
        seen.extend(got);
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 30);
    assert!(seen
        .iter()
        .all(|id| id[1..].parse::<u32>().unwrap() % 4 == 0));
}

async fn aggregates_obey_the_read_rule(backend: Backend) {
    let (app, admin) = todos_app(backend).await;
    let (alice, at, _) = app.user("alice@example.com").await;
    app.post("/v1/db/_batch", Some(&admin), json!({"writes": [
        {"op": "create", "collection": "todos", "id": "1", "data": {"owner": alice, "mins": 10}},
        {"op": "create", "collection": "todos", "id": "2", "data": {"owner": alice, "mins": 5}},
        {"op": "create", "collection": "todos", "id": "3", "data": {"owner": "bob", "mins": 1000}}]})).await.assert_ok();
    let r = app
        .post("/v1/db/todos/_aggregate", Some(&at), json!({"aggregations": {"n": {"count": {}}, "total": {"sum": "mins"}, "max": {"max": "mins"}}}))
        .await;
    assert_eq!(r.assert_ok()["n"], 2);
    assert_eq!(r.body["total"], 15);
    assert_eq!(r.body["max"], 10);
    let anon = app
        .post(
            "/v1/db/todos/_aggregate",
            None,
            json!({"aggregations": {"n": {"count": {}}}}),
        )
        .await;
    assert_eq!(anon.assert_ok()["n"], 0);
    let _ = app.send(Method::GET, "/health", None, None).await;
}

async fn a_refused_writer_learns_nothing_from_preconditions(backend: Backend) {
    let (app, admin) = todos_app(backend).await;
    let (_, at, _) = app.user("alice@example.com").await;
    app.post(
        "/v1/db/todos",
        Some(&admin),
        json!({"id": "bobs", "data": {"owner": "bob"}}),
    )
    .await
    .assert_ok();
    for (method, headers) in [
        (Method::PUT, ("if-match", "\"7\"")),
        (Method::PUT, ("if-none-match", "*")),
        (Method::DELETE, ("if-match", "\"7\"")),
    ] {
        let mut req = app
            .client
            .request(method, app.url("/v1/db/todos/bobs"))
            .bearer_auth(&at)
            .header(headers.0, headers.1);
        if req.try_clone().is_some() {
            req = req.json(&json!({"data": {"owner": "bob"}}));
        }
        let r = TestApp::reply(req.send().await.unwrap()).await;
        let msg = r.assert_error(403, "permission_denied");
        assert!(!msg.contains("version"), "{msg}");
    }
}

async fn paging_past_the_row_budget_skips_and_repeats_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "big",
        json!({"rules": {"read": "size(resource.data.tags) == 2"}}),
    )
    .await;
    for chunk in 0..12 {
        let writes: Vec<Value> = (0..500)
            .map(|k| {
                let i = chunk * 500 + k;
                let tags = if i % 1000 == 999 { json!(["a", "b"]) } else { json!(["a"]) };
                json!({"op": "create", "collection": "big", "id": format!("r{i:05}"), "data": {"tags": tags}})
            })
            .collect();
        app.post("/v1/db/_batch", Some(&admin), json!({"writes": writes}))
            .await
            .assert_ok();
    }
    let (_, t, _) = app.user("pager@example.com").await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut body = json!({"limit": 10});
        if let Some(c) = &cursor {
            body["start_after"] = json!(c);
        }
        let page = app.post("/v1/db/big/_query", Some(&t), body).await;
        seen.extend(ids(&page));
        pages += 1;
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert!(
        pages >= 2,
        "the row budget should have ended the first page early"
    );
    let expected: Vec<String> = (0..6000)
        .filter(|i| i % 1000 == 999)
        .map(|i| format!("r{i:05}"))
        .collect();
    seen.sort();
    assert_eq!(seen, expected);
}
