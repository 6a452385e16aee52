//! API.md § Documents: the contract suite, run on SQLite and PostgreSQL alike.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app, spawn_app_with, Backend, Reply, TestApp};
use crate::store_tests;

store_tests!(
    collections_are_created_read_listed_and_deleted,
    rule_that_does_not_compile_is_refused_with_its_position,
    documents_are_created_read_replaced_patched_and_deleted,
    preconditions_answer_412_and_etags_carry_the_version,
    transforms_resolve_against_the_stored_document,
    bad_documents_are_refused_and_nothing_is_stored,
    schema_violations_answer_400_with_the_failing_path,
    unique_index_violation_answers_409,
    every_query_operator_is_type_strict,
    order_by_follows_the_cross_type_order_with_id_tie_break,
    limit_select_and_count,
    cursor_pagination_while_the_collection_grows_has_no_duplicates_or_gaps,
    aggregates_count_sum_avg_min_max,
    batch_is_all_or_nothing,
    concurrent_increments_lose_nothing,
    concurrent_if_match_writers_exactly_one_wins,
    injection_attempts_in_paths_and_values_find_nothing,
    deleting_a_collection_drops_its_documents,
);

pub async fn admin_collection(app: &TestApp, admin: &str, name: &str, spec: Value) {
    let r = app
        .send(
            Method::PUT,
            &format!("/v1/admin/collections/{name}"),
            Some(admin),
            Some(spec),
        )
        .await;
    r.assert_ok();
}

const OPEN_RULES: &str =
    r#"{"read": "true", "create": "true", "update": "true", "delete": "true"}"#;

fn open_rules() -> Value {
    serde_json::from_str(OPEN_RULES).unwrap()
}

async fn create(app: &TestApp, token: &str, coll: &str, body: Value) -> Reply {
    app.post(&format!("/v1/db/{coll}"), Some(token), body).await
}

async fn query(app: &TestApp, token: Option<&str>, coll: &str, body: Value) -> Reply {
    app.post(&format!("/v1/db/{coll}/_query"), token, body)
        .await
}

fn ids(reply: &Reply) -> Vec<String> {
    reply.body["documents"]
        .as_array()
        .unwrap_or_else(|| panic!("no documents: {}", reply.text))
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

async fn collections_are_created_read_listed_and_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let spec = json!({"rules": {"read": "auth != null"}, "indexes": [{"fields": [["n", "asc"]]}], "schema": {"type": "object"}});
    let put = app
        .send(
            Method::PUT,
            "/v1/admin/collections/notes",
            Some(&admin),
            Some(spec),
        )
        .await;
    let body = put.assert_ok();
    assert_eq!(body["name"], "notes");
    assert_eq!(body["rules"]["read"], "auth != null");
    assert_eq!(body["indexes"][0]["fields"], json!([["n", "asc"]]));
    let got = app.get("/v1/admin/collections/notes", Some(&admin)).await;
    assert_eq!(got.assert_ok()["schema"], json!({"type": "object"}));
    let list = app.get("/v1/admin/collections", Some(&admin)).await;
    assert_eq!(list.assert_ok()["collections"][0]["name"], "notes");
    for bad in ["Notes", "_x", "a%20b", "a.b", &"x".repeat(64)] {
        let r = app
            .send(
                Method::PUT,
                &format!("/v1/admin/collections/{bad}"),
                Some(&admin),
                Some(json!({})),
            )
            .await;
        assert_eq!(r.status.as_u16(), 400, "{bad}: {}", r.text);
    }
    let r = app
        .send(
            Method::PUT,
            "/v1/admin/collections/x",
            Some(&admin),
            Some(json!({"indexes": [{"fields": [["a'b", "asc"]]}]})),
        )
        .await;
    r.assert_error(400, "invalid_argument");
    let r = app
        .send(
            Method::PUT,
            "/v1/admin/collections/x",
            Some(&admin),
            Some(json!({"schema": {"type": 12}})),
        )
        .await;
    r.assert_error(400, "invalid_argument");
    let (_, user, _) = app.user("u@example.com").await;
    app.get("/v1/admin/collections", Some(&user))
        .await
        .assert_error(403, "permission_denied");
    let del = app
        .delete("/v1/admin/collections/notes", Some(&admin))
        .await;
    assert_eq!(del.status.as_u16(), 204);
    app.get("/v1/admin/collections/notes", Some(&admin))
        .await
        .assert_error(404, "not_found");
    app.delete("/v1/admin/collections/notes", Some(&admin))
        .await
        .assert_error(404, "not_found");
}

async fn rule_that_does_not_compile_is_refused_with_its_position(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let r = app
        .send(
            Method::PUT,
            "/v1/admin/collections/posts",
            Some(&admin),
            Some(json!({"rules": {"read": "true", "update": "auth.uid ==\n  resource.data.owner &&"}})),
        )
        .await;
    r.assert_error(400, "invalid_argument");
    let details = &r.body["error"]["details"];
    assert_eq!(details["rule"], "update");
    assert!(
        details["line"].as_u64().unwrap() >= 1 && details["column"].as_u64().unwrap() >= 1,
        "{details}"
    );
    let r = app
        .send(
            Method::PUT,
            "/v1/admin/collections/posts",
            Some(&admin),
            Some(json!({"rules": {"read": "user.id == 1"}})),
        )
        .await;
    r.assert_error(400, "invalid_argument");
    // Nothing was created.
    app.get("/v1/admin/collections/posts", Some(&admin))
        .await
        .assert_error(404, "not_found");
}

async fn documents_are_created_read_replaced_patched_and_deleted(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "items", json!({"rules": open_rules()})).await;
    let (_, user, _) = app.user("crud@example.com").await;

    let created = create(
        &app,
        &user,
        "items",
        json!({"data": {"title": "first", "n": 1}}),
    )
    .await;
    assert_eq!(created.status.as_u16(), 201, "{}", created.text);
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 20);
    assert_eq!(created.body["version"], 1);
    assert_eq!(created.body["data"], json!({"title": "first", "n": 1}));
    assert!(created.body["created_at"].as_str().unwrap().ends_with('Z'));

    let mine = create(
        &app,
        &user,
        "items",
        json!({"id": "my-id_1", "data": {"k": true}}),
    )
    .await;
    assert_eq!(mine.status.as_u16(), 201);
    assert_eq!(mine.body["id"], "my-id_1");
    create(&app, &user, "items", json!({"id": "my-id_1", "data": {}}))
        .await
        .assert_error(409, "already_exists");

    let got = app.get(&format!("/v1/db/items/{id}"), Some(&user)).await;
    assert_eq!(got.assert_ok()["data"]["title"], "first");

    let replaced = app
        .send(
            Method::PUT,
            &format!("/v1/db/items/{id}"),
            Some(&user),
            Some(json!({"data": {"title": "second"}})),
        )
        .await;
    assert_eq!(replaced.status.as_u16(), 200);
    assert_eq!(replaced.body["version"], 2);
    assert_eq!(replaced.body["data"], json!({"title": "second"}));
    assert_eq!(replaced.body["created_at"], created.body["created_at"]);

    let put_new = app
        .send(
            Method::PUT,
            "/v1/db/items/fresh",
            Some(&user),
            Some(json!({"data": {"a": 1}})),
        )
        .await;
    assert_eq!(put_new.status.as_u16(), 201);
    assert_eq!(put_new.body["version"], 1);

    let patched = app
        .patch(
            &format!("/v1/db/items/{id}"),
            Some(&user),
            json!({"data": {"title": null, "nested": {"a": 1}, "x": [1, 2]}}),
        )
        .await;
    assert_eq!(
        patched.assert_ok()["data"],
        json!({"nested": {"a": 1}, "x": [1, 2]})
    );
    assert_eq!(patched.body["version"], 3);
    let patched = app
        .patch(
            &format!("/v1/db/items/{id}"),
            Some(&user),
            json!({"data": {"nested": {"b": 2}}}),
        )
        .await;
    assert_eq!(
        patched.assert_ok()["data"]["nested"],
        json!({"a": 1, "b": 2})
    );
    app.patch(
        "/v1/db/items/missing",
        Some(&user),
        json!({"data": {"a": 1}}),
    )
    .await
    .assert_error(404, "not_found");

    let deleted = app.delete(&format!("/v1/db/items/{id}"), Some(&user)).await;
    assert_eq!(deleted.status.as_u16(), 204);
    app.get(&format!("/v1/db/items/{id}"), Some(&user))
        .await
        .assert_error(404, "not_found");
    app.delete(&format!("/v1/db/items/{id}"), Some(&user))
        .await
        .assert_error(404, "not_found");
    app.get("/v1/db/nowhere/x", Some(&user))
        .await
        .assert_error(404, "not_found");
}

async fn preconditions_answer_412_and_etags_carry_the_version(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "items", json!({"rules": open_rules()})).await;
    let c = create(&app, &admin, "items", json!({"id": "d", "data": {"n": 1}})).await;
    assert_eq!(c.headers["etag"], "\"1\"");
    let url = app.url("/v1/db/items/d");
    let send = |method: Method, headers: Vec<(&'static str, &'static str)>, body: Option<Value>| {
        let mut req = app.client.request(method, &url).bearer_auth(&admin);
        for (k, v) in headers {
            req = req.header(k, v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move { TestApp::reply(req.send().await.unwrap()).await }
    };
    send(
        Method::PUT,
        vec![("if-match", "\"7\"")],
        Some(json!({"data": {"n": 2}})),
    )
    .await
    .assert_error(412, "failed_precondition");
    let ok = send(
        Method::PUT,
        vec![("if-match", "\"1\"")],
        Some(json!({"data": {"n": 2}})),
    )
    .await;
    assert_eq!(ok.assert_ok()["version"], 2);
    assert_eq!(ok.headers["etag"], "\"2\"");
    send(
        Method::PATCH,
        vec![("if-match", "1")],
        Some(json!({"data": {"n": 3}})),
    )
    .await
    .assert_error(412, "failed_precondition");
    send(
        Method::PUT,
        vec![("if-none-match", "*")],
        Some(json!({"data": {"n": 9}})),
    )
    .await
    .assert_error(412, "failed_precondition");
    send(Method::DELETE, vec![("if-match", "\"1\"")], None)
        .await
        .assert_error(412, "failed_precondition");
    send(
        Method::PUT,
        vec![("if-match", "soon")],
        Some(json!({"data": {}})),
    )
    .await
    .assert_error(400, "invalid_argument");
    let del = send(Method::DELETE, vec![("if-match", "\"2\"")], None).await;
    assert_eq!(del.status.as_u16(), 204);
    let created = send(
        Method::PUT,
        vec![("if-none-match", "*")],
        Some(json!({"data": {"n": 1}})),
    )
    .await;
    assert_eq!(created.status.as_u16(), 201);
    assert_eq!(created.body["version"], 1);
}

async fn transforms_resolve_against_the_stored_document(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "items", json!({"rules": open_rules()})).await;
    create(
        &app,
        &admin,
        "items",
        json!({"id": "t", "data": {"n": 1, "f": 1.5, "tags": ["a", "b"], "s": "x"}}),
    )
    .await;
    let r = app
        .patch(
            "/v1/db/items/t",
            Some(&admin),
            json!({"data": {
                "n": {"$increment": 2}, "f": {"$increment": 1}, "new": {"$increment": 5},
                "s": {"$increment": 1},
                "tags": {"$arrayUnion": ["b", "c"]}, "gone": {"$arrayRemove": ["x"]},
                "at": {"$serverTimestamp": true}, "deep": {"c": {"$increment": 1}}
            }}),
        )
        .await;
    let data = r.assert_ok()["data"].clone();
    assert_eq!(data["n"], 3);
    assert_eq!(data["f"], 2.5);
    assert_eq!(data["new"], 5);
    assert_eq!(data["s"], 1, "a non-number counts as 0");
    assert_eq!(data["tags"], json!(["a", "b", "c"]));
    assert_eq!(data["gone"], json!([]));
    assert_eq!(data["deep"], json!({"c": 1}));
    let at = chrono::DateTime::parse_from_rfc3339(data["at"].as_str().unwrap()).unwrap();
    assert!(
        (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
            .num_seconds()
            .abs()
            < 30
    );
    let r = app
        .patch(
            "/v1/db/items/t",
            Some(&admin),
            json!({"data": {"tags": {"$arrayRemove": ["a"]}}}),
        )
        .await;
    assert_eq!(r.assert_ok()["data"]["tags"], json!(["b", "c"]));
    for bad in [
        json!({"data": {"n": {"$increment": "1"}}}),
        json!({"data": {"n": {"$decrement": 1}}}),
        json!({"data": {"at": {"$serverTimestamp": false}}}),
        json!({"data": {"$increment": 1}}),
    ] {
        app.patch("/v1/db/items/t", Some(&admin), bad.clone())
            .await
            .assert_error(400, "invalid_argument");
    }
}

async fn bad_documents_are_refused_and_nothing_is_stored(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.documents.max_document_bytes = 2048).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "items", json!({"rules": open_rules()})).await;
    let deep = (0..40).fold(json!(1), |acc, _| json!({"a": acc}));
    for (body, status) in [
        (json!({"data": {"$admin": true}}), 400),
        (json!({"data": {"a": {"$where": "1"}}}), 400),
        (json!({"data": {"a": {"$b": 1, "c": 2}}}), 400),
        (json!({"data": [1, 2]}), 400),
        (json!({"data": "text"}), 400),
        (json!({"data": deep}), 400),
        (json!({"data": {"blob": "x".repeat(4096)}}), 413),
        (json!({"id": "_hidden", "data": {}}), 400),
        (json!({"id": "a/b", "data": {}}), 400),
        (json!({"id": "x".repeat(129), "data": {}}), 400),
        (json!({"id": 5, "data": {}}), 400),
        (json!({"data": {}, "extra": 1}), 400),
        (json!({}), 400),
        (json!({"data": {"name": "nul\u{0}byte"}}), 400),
        (json!({"data": {"key\u{0}": 1}}), 400),
    ] {
        let r = create(&app, &admin, "items", body.clone()).await;
        assert_eq!(r.status.as_u16(), status, "{body}: {}", r.text);
        assert!(r.body["error"]["code"].is_string());
    }
    let all = query(&app, Some(&admin), "items", json!({})).await;
    assert_eq!(all.assert_ok()["documents"], json!([]));
}

async fn schema_violations_answer_400_with_the_failing_path(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let schema = json!({"type": "object", "required": ["title"],
        "properties": {"title": {"type": "string", "maxLength": 10}, "meta": {"type": "object", "properties": {"n": {"type": "integer"}}}}});
    admin_collection(
        &app,
        &admin,
        "typed",
        json!({"rules": open_rules(), "schema": schema}),
    )
    .await;
    create(
        &app,
        &admin,
        "typed",
        json!({"id": "ok", "data": {"title": "fine", "meta": {"n": 1}}}),
    )
    .await
    .assert_ok();
    let r = create(
        &app,
        &admin,
        "typed",
        json!({"data": {"title": "fine", "meta": {"n": "one"}}}),
    )
    .await;
    r.assert_error(400, "invalid_argument");
    assert_eq!(r.body["error"]["details"]["path"], "/meta/n");
    create(&app, &admin, "typed", json!({"data": {"meta": {}}}))
        .await
        .assert_error(400, "invalid_argument");
    // A patch that would break the schema is refused too.
    app.patch(
        "/v1/db/typed/ok",
        Some(&admin),
        json!({"data": {"title": null}}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn unique_index_violation_answers_409(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "accounts", json!({"rules": open_rules(), "indexes": [{"fields": [["handle", "asc"]], "unique": true}]})).await;
    admin_collection(&app, &admin, "others", json!({"rules": open_rules()})).await;
    create(&app, &admin, "accounts", json!({"data": {"handle": "ada"}}))
        .await
        .assert_ok();
    create(&app, &admin, "accounts", json!({"data": {"handle": "ada"}}))
        .await
        .assert_error(409, "already_exists");
    create(&app, &admin, "accounts", json!({"data": {"handle": "bob"}}))
        .await
        .assert_ok();
    // Uniqueness is per collection.
    create(&app, &admin, "others", json!({"data": {"handle": "ada"}}))
        .await
        .assert_ok();
    create(&app, &admin, "others", json!({"data": {"handle": "ada"}}))
        .await
        .assert_ok();
    // A unique index that existing data violates cannot be declared.
    let r = app
        .send(Method::PUT, "/v1/admin/collections/others", Some(&admin), Some(json!({"rules": open_rules(), "indexes": [{"fields": [["handle", "asc"]], "unique": true}]})))
        .await;
    r.assert_error(409, "conflict");
}

async fn seed(app: &TestApp, admin: &str, coll: &str, docs: Vec<(&str, Value)>) {
    let writes: Vec<Value> = docs
        .into_iter()
        .map(|(id, data)| json!({"op": "create", "collection": coll, "id": id, "data": data}))
        .collect();
    app.post("/v1/db/_batch", Some(admin), json!({"writes": writes}))
        .await
        .assert_ok();
}

async fn every_query_operator_is_type_strict(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "things",
        json!({"rules": open_rules(), "indexes": [{"fields": [["n", "asc"]]}]}),
    )
    .await;
    seed(&app, &admin, "things", vec![
        ("a", json!({"n": 1, "s": "apple", "b": true, "tags": ["x", "y"], "addr": {"city": "Oslo"}, "z": null})),
        ("b", json!({"n": 2.5, "s": "banana", "b": false, "tags": ["y"], "addr": {"city": "Rome"}})),
        ("c", json!({"n": "2", "s": "cherry", "b": 1, "tags": [1, 2]})),
        ("d", json!({"n": 10, "s": "Apple", "tags": "x"})),
        ("e", json!({"s": "apricot", "tags": [{"k": 1}]})),
    ]).await;
    let q = |w: Value| {
        let app = &app;
        let admin = admin.clone();
        async move {
            let r = query(app, Some(&admin), "things", json!({"where": w})).await;
            let mut got = ids(&r);
            got.sort();
            got
        }
    };
    assert_eq!(q(json!(["n", "==", 1])).await, ["a"]);
    assert_eq!(q(json!(["n", "==", 1.0])).await, ["a"]);
    assert_eq!(q(json!(["n", "==", "2"])).await, ["c"]);
    assert_eq!(q(json!(["n", "!=", 1])).await, ["b", "c", "d"]);
    assert_eq!(q(json!(["n", ">", 1])).await, ["b", "d"]);
    assert_eq!(q(json!(["n", ">=", 1])).await, ["a", "b", "d"]);
    assert_eq!(q(json!(["n", "<", 3])).await, ["a", "b"]);
    assert_eq!(q(json!(["n", "<=", 2.5])).await, ["a", "b"]);
    assert_eq!(q(json!(["s", ">", "b"])).await, ["b", "c"]);
    assert_eq!(
        q(json!(["s", "<", "a"])).await,
        ["d"],
        "strings compare by code point: 'A' < 'a'"
    );
    assert_eq!(q(json!(["b", "==", true])).await, ["a"]);
    assert_eq!(q(json!(["b", "==", 1])).await, ["c"], "true is not 1");
    assert_eq!(q(json!(["b", "<", true])).await, ["b"]);
    assert_eq!(q(json!(["z", "==", null])).await, ["a"]);
    assert_eq!(q(json!(["z", "exists", true])).await, ["a"]);
    assert_eq!(q(json!(["n", "exists", false])).await, ["e"]);
    assert_eq!(q(json!(["n", "in", [1, "2", 99]])).await, ["a", "c"]);
    assert_eq!(q(json!(["n", "not-in", [1, "2"]])).await, ["b", "d"]);
    assert_eq!(
        q(json!(["tags", "array-contains", "x"])).await,
        ["a"],
        "a string field is not an array"
    );
    assert_eq!(q(json!(["tags", "array-contains", 1])).await, ["c"]);
    assert_eq!(q(json!(["tags", "array-contains", {"k": 1}])).await, ["e"]);
    assert_eq!(
        q(json!(["tags", "array-contains-any", ["x", 2]])).await,
        ["a", "c"]
    );
    assert_eq!(q(json!(["s", "starts-with", "ap"])).await, ["a", "e"]);
    assert_eq!(q(json!(["addr.city", "==", "Rome"])).await, ["b"]);
    assert_eq!(q(json!(["$id", "in", ["a", "e", "zz"]])).await, ["a", "e"]);
    assert_eq!(q(json!(["$id", ">=", "d"])).await, ["d", "e"]);
    assert_eq!(
        q(json!({"or": [["n", "==", 1], ["s", "==", "cherry"]]})).await,
        ["a", "c"]
    );
    assert_eq!(
        q(json!([["tags", "array-contains", "y"], {"or": [["n", "<", 2], ["b", "==", false]]}]))
            .await,
        ["a", "b"]
    );
    assert_eq!(
        q(json!({"and": [["s", ">=", "a"], ["s", "<", "c"]]})).await,
        ["a", "b", "e"]
    );
    let past = "2000-01-01T00:00:00Z";
    assert_eq!(q(json!(["$created_at", ">", past])).await.len(), 5);
    assert_eq!(q(json!(["$updated_at", "<", past])).await.len(), 0);
}

async fn order_by_follows_the_cross_type_order_with_id_tie_break(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "mixed", json!({"rules": open_rules()})).await;
    seed(
        &app,
        &admin,
        "mixed",
        vec![
            ("obj", json!({"v": {"a": 1}, "g": 1})),
            ("arr", json!({"v": [1], "g": 1})),
            ("str", json!({"v": "b", "g": 2})),
            ("str2", json!({"v": "a", "g": 2})),
            ("num", json!({"v": 3, "g": 2})),
            ("num2", json!({"v": -1.5, "g": 1})),
            ("t", json!({"v": true, "g": 1})),
            ("f", json!({"v": false, "g": 2})),
            ("nul", json!({"v": null, "g": 1})),
            ("none", json!({"g": 2})),
        ],
    )
    .await;
    let asc = query(
        &app,
        Some(&admin),
        "mixed",
        json!({"order_by": [["v", "asc"]]}),
    )
    .await;
    assert_eq!(
        ids(&asc),
        ["none", "nul", "f", "t", "num2", "num", "str2", "str", "arr", "obj"]
    );
    let desc = query(
        &app,
        Some(&admin),
        "mixed",
        json!({"order_by": [["v", "desc"]]}),
    )
    .await;
    assert_eq!(
        ids(&desc),
        ["obj", "arr", "str", "str2", "num", "num2", "t", "f", "nul", "none"]
    );
    let multi = query(
        &app,
        Some(&admin),
        "mixed",
        json!({"order_by": [["g", "desc"], ["$id", "desc"]]}),
    )
    .await;
    assert_eq!(
        ids(&multi),
        ["str2", "str", "num", "none", "f", "t", "obj", "num2", "nul", "arr"]
    );
    let by_id = query(
        &app,
        Some(&admin),
        "mixed",
        json!({"where": ["g", "==", 1]}),
    )
    .await;
    assert_eq!(ids(&by_id), ["arr", "nul", "num2", "obj", "t"]);
    // Paging through the mixed order in pages of 3 gives the same sequence.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({"order_by": [["v", "asc"]], "limit": 3});
        if let Some(c) = &cursor {
            body["start_after"] = json!(c);
        }
        let page = query(&app, Some(&admin), "mixed", body).await;
        seen.extend(ids(&page));
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, ids(&asc));
    query(
        &app,
        Some(&admin),
        "mixed",
        json!({"order_by": [["$id", "asc"], ["v", "asc"]]}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn limit_select_and_count(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "many", json!({"rules": open_rules()})).await;
    let docs: Vec<(String, Value)> = (0..60)
        .map(|i| {
            (
                format!("d{i:03}"),
                json!({"i": i, "odd": i % 2 == 1, "p": {"q": i, "r": "x"}}),
            )
        })
        .collect();
    seed(
        &app,
        &admin,
        "many",
        docs.iter()
            .map(|(id, d)| (id.as_str(), d.clone()))
            .collect(),
    )
    .await;
    let default = query(&app, Some(&admin), "many", json!({})).await;
    assert_eq!(ids(&default).len(), 50, "limit defaults to 50");
    assert!(default.body["next_cursor"].is_string());
    assert!(default.body.get("count").is_none());
    let counted = query(
        &app,
        Some(&admin),
        "many",
        json!({"where": ["odd", "==", true], "limit": 5, "count": true}),
    )
    .await;
    assert_eq!(ids(&counted).len(), 5);
    assert_eq!(counted.body["count"], 30);
    let none = query(
        &app,
        Some(&admin),
        "many",
        json!({"where": ["i", ">", 1000], "count": true}),
    )
    .await;
    assert_eq!(none.assert_ok()["count"], 0);
    let next = counted.body["next_cursor"].as_str().unwrap();
    let second = query(
        &app,
        Some(&admin),
        "many",
        json!({"where": ["odd", "==", true], "limit": 5, "count": true, "start_after": next}),
    )
    .await;
    assert_eq!(
        second.assert_ok()["count"],
        30,
        "the count ignores the cursor"
    );
    assert_eq!(second.body["documents"][0]["id"], "d011");
    let selected = query(
        &app,
        Some(&admin),
        "many",
        json!({"limit": 1, "select": ["p.q", "missing"]}),
    )
    .await;
    assert_eq!(
        selected.assert_ok()["documents"][0]["data"],
        json!({"p": {"q": 0}})
    );
    assert_eq!(selected.body["documents"][0]["id"], "d000");
    query(&app, Some(&admin), "many", json!({"limit": 1001}))
        .await
        .assert_error(400, "invalid_argument");
    query(&app, Some(&admin), "many", json!({"limit": "ten"}))
        .await
        .assert_error(400, "invalid_argument");
    query(&app, Some(&admin), "many", json!({"select": ["$id"]}))
        .await
        .assert_error(400, "invalid_argument");
    query(&app, Some(&admin), "many", json!({"whereas": []}))
        .await
        .assert_error(400, "invalid_argument");
    let all = query(&app, Some(&admin), "many", json!({"limit": 1000})).await;
    assert_eq!(ids(&all).len(), 60);
    assert!(all.body["next_cursor"].is_null());
}

async fn cursor_pagination_while_the_collection_grows_has_no_duplicates_or_gaps(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "feed",
        json!({"rules": open_rules(), "indexes": [{"fields": [["rank", "desc"]]}]}),
    )
    .await;
    let initial: Vec<(String, Value)> = (0..100)
        .map(|i| (format!("p{i:03}"), json!({"rank": i % 17})))
        .collect();
    seed(
        &app,
        &admin,
        "feed",
        initial
            .iter()
            .map(|(id, d)| (id.as_str(), d.clone()))
            .collect(),
    )
    .await;
    let mut seen: Vec<String> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut round = 0;
    loop {
        // Inserts land before, inside and after the current page between requests.
        for k in 0..3 {
            let r = create(&app, &admin, "feed", json!({"id": format!("new{round}_{k}"), "data": {"rank": (round * 7 + k * 5) % 17}})).await;
            r.assert_ok();
        }
        let mut body = json!({"order_by": [["rank", "desc"]], "limit": 7});
        if let Some(c) = &cursor {
            body["start_after"] = json!(c);
        }
        let page = query(&app, Some(&admin), "feed", body).await;
        seen.extend(ids(&page));
        round += 1;
        match page.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
        assert!(round < 100, "paging does not end");
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), seen.len(), "a document appeared twice");
    for (id, _) in &initial {
        assert!(
            unique.contains(id),
            "{id} was present throughout but never returned"
        );
    }
}

async fn aggregates_count_sum_avg_min_max(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "sales", json!({"rules": open_rules()})).await;
    seed(
        &app,
        &admin,
        "sales",
        vec![
            ("a", json!({"amount": 10, "region": "eu", "name": "x"})),
            ("b", json!({"amount": 2.5, "region": "eu", "name": "y"})),
            ("c", json!({"amount": "n/a", "region": "eu"})),
            ("d", json!({"amount": 100, "region": "us", "name": "a"})),
        ],
    )
    .await;
    let r = app
        .post("/v1/db/sales/_aggregate", Some(&admin), json!({"where": ["region", "==", "eu"], "aggregations": {
            "n": {"count": {}}, "total": {"sum": "amount"}, "mean": {"avg": "amount"},
            "low": {"min": "amount"}, "high": {"max": "amount"}, "first": {"min": "name"}, "none": {"avg": "missing"}}}))
        .await;
    let body = r.assert_ok();
    assert_eq!(body["n"], 3);
    assert_eq!(body["total"], 12.5);
    assert_eq!(body["mean"], 6.25);
    assert_eq!(body["low"], 2.5);
    assert_eq!(body["high"], "n/a", "strings sort after numbers");
    assert_eq!(body["first"], "x");
    assert_eq!(body["none"], Value::Null);
    let all = app
        .post(
            "/v1/db/sales/_aggregate",
            Some(&admin),
            json!({"aggregations": {"n": {"count": {}}, "s": {"sum": "amount"}}}),
        )
        .await;
    assert_eq!(all.assert_ok()["n"], 4);
    assert_eq!(all.body["s"], 112.5);
    app.post(
        "/v1/db/sales/_aggregate",
        Some(&admin),
        json!({"aggregations": {"x": {"median": "amount"}}}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.post(
        "/v1/db/sales/_aggregate",
        Some(&admin),
        json!({"aggregations": {}}),
    )
    .await
    .assert_error(400, "invalid_argument");
}

async fn batch_is_all_or_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "a", json!({"rules": open_rules()})).await;
    admin_collection(&app, &admin, "b", json!({"rules": open_rules()})).await;
    seed(
        &app,
        &admin,
        "a",
        vec![("x", json!({"n": 1})), ("y", json!({"n": 1}))],
    )
    .await;
    let ok = app
        .post(
            "/v1/db/_batch",
            Some(&admin),
            json!({"writes": [
                {"op": "create", "collection": "b", "data": {"k": 1}},
                {"op": "set", "collection": "a", "id": "x", "data": {"n": 5}, "if_version": 1},
                {"op": "update", "collection": "a", "id": "y", "data": {"n": {"$increment": 1}}},
                {"op": "delete", "collection": "a", "id": "y"},
            ]}),
        )
        .await;
    let results = ok.assert_ok()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0]["op"], "create");
    assert_eq!(results[1]["version"], 2);
    assert_eq!(results[2]["document"]["data"]["n"], 2);
    assert_eq!(results[3]["op"], "delete");
    assert_eq!(results[3]["document"], Value::Null);
    // One failing precondition: nothing of the batch is applied.
    let r = app
        .post(
            "/v1/db/_batch",
            Some(&admin),
            json!({"writes": [
                {"op": "create", "collection": "b", "id": "ghost", "data": {}},
                {"op": "update", "collection": "a", "id": "x", "data": {"n": 6}},
                {"op": "set", "collection": "a", "id": "x", "data": {"n": 7}, "if_version": 1},
            ]}),
        )
        .await;
    r.assert_error(412, "failed_precondition");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("write 2"));
    app.get("/v1/db/b/ghost", Some(&admin))
        .await
        .assert_error(404, "not_found");
    assert_eq!(
        app.get("/v1/db/a/x", Some(&admin)).await.body["data"]["n"],
        5
    );
    for bad in [
        json!({"writes": []}),
        json!({"writes": [{"op": "upsert", "collection": "a", "id": "x"}]}),
        json!({"writes": [{"op": "set", "collection": "a", "id": "x"}]}),
        json!({"writes": [{"op": "delete", "collection": "a"}]}),
        json!({"writes": [{"op": "create", "collection": "nope", "data": {}}]}),
    ] {
        let r = app.post("/v1/db/_batch", Some(&admin), bad.clone()).await;
        assert!(r.status.is_client_error(), "{bad}: {}", r.text);
    }
    let too_many: Vec<Value> = (0..501)
        .map(|i| json!({"op": "create", "collection": "b", "id": format!("m{i}"), "data": {}}))
        .collect();
    app.post("/v1/db/_batch", Some(&admin), json!({"writes": too_many}))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/db/b/m0", Some(&admin))
        .await
        .assert_error(404, "not_found");
}

async fn concurrent_increments_lose_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "counters", json!({"rules": open_rules()})).await;
    create(
        &app,
        &admin,
        "counters",
        json!({"id": "c", "data": {"n": 0}}),
    )
    .await
    .assert_ok();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let client = app.client.clone();
        let url = app.url("/v1/db/counters/c");
        let token = admin.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..10 {
                let r = client
                    .patch(&url)
                    .bearer_auth(&token)
                    .json(&json!({"data": {"n": {"$increment": 1}}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status().as_u16(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let doc = app.get("/v1/db/counters/c", Some(&admin)).await;
    assert_eq!(doc.assert_ok()["data"]["n"], 160);
    assert_eq!(doc.body["version"], 161);
}

async fn concurrent_if_match_writers_exactly_one_wins(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "docs", json!({"rules": open_rules()})).await;
    create(
        &app,
        &admin,
        "docs",
        json!({"id": "d", "data": {"owner": "none"}}),
    )
    .await
    .assert_ok();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let client = app.client.clone();
        let url = app.url("/v1/db/docs/d");
        let token = admin.clone();
        tasks.push(tokio::spawn(async move {
            client
                .put(&url)
                .bearer_auth(&token)
                .header("if-match", "\"1\"")
                .json(&json!({"data": {"owner": format!("w{i}")}}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 412).count(),
        15,
        "{statuses:?}"
    );
    assert_eq!(
        app.get("/v1/db/docs/d", Some(&admin)).await.body["version"],
        2
    );
}

async fn injection_attempts_in_paths_and_values_find_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "safe",
        json!({"rules": open_rules(), "indexes": [{"fields": [["name", "asc"]]}]}),
    )
    .await;
    seed(
        &app,
        &admin,
        "safe",
        vec![("a", json!({"name": "alice", "it's": 1}))],
    )
    .await;
    for value in [
        json!("' OR '1'='1"),
        json!("alice' --"),
        json!("\"; DROP TABLE documents; --"),
        json!("%"),
    ] {
        let r = query(
            &app,
            Some(&admin),
            "safe",
            json!({"where": ["name", "==", value]}),
        )
        .await;
        assert_eq!(ids(&r), Vec::<String>::new(), "{value}");
        let r = query(
            &app,
            Some(&admin),
            "safe",
            json!({"where": ["name", "starts-with", value]}),
        )
        .await;
        assert_eq!(ids(&r), Vec::<String>::new(), "{value}");
    }
    // A quote in a field name is a plain key, not SQL.
    let r = query(
        &app,
        Some(&admin),
        "safe",
        json!({"where": ["it's", "==", 1]}),
    )
    .await;
    assert_eq!(ids(&r), ["a"]);
    for field in ["name\") OR 1=1 --", "a\\b", "$where", "data') --"] {
        let r = query(
            &app,
            Some(&admin),
            "safe",
            json!({"where": [field, "==", 1]}),
        )
        .await;
        assert!(
            r.status.as_u16() == 400 || ids(&r).is_empty(),
            "{field}: {}",
            r.text
        );
    }
    let r = query(
        &app,
        Some(&admin),
        "safe",
        json!({"order_by": [["name') DESC; --", "asc"]]}),
    )
    .await;
    assert!(
        r.status.as_u16() == 400 || r.status.is_success(),
        "{}",
        r.text
    );
    let r = query(
        &app,
        Some(&admin),
        "safe",
        json!({"where": ["name", "==", "a\u{0}"]}),
    )
    .await;
    r.assert_error(400, "invalid_argument");
    // The table is intact.
    assert_eq!(
        ids(&query(&app, Some(&admin), "safe", json!({})).await),
        ["a"]
    );
}

async fn deleting_a_collection_drops_its_documents(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "temp",
        json!({"rules": open_rules(), "indexes": [{"fields": [["n", "asc"]], "unique": true}]}),
    )
    .await;
    seed(&app, &admin, "temp", vec![("a", json!({"n": 1}))]).await;
    assert_eq!(
        app.delete("/v1/admin/collections/temp", Some(&admin))
            .await
            .status
            .as_u16(),
        204
    );
    admin_collection(&app, &admin, "temp", json!({"rules": open_rules()})).await;
    app.get("/v1/db/temp/a", Some(&admin))
        .await
        .assert_error(404, "not_found");
    // The old unique index is gone with it.
    seed(
        &app,
        &admin,
        "temp",
        vec![("b", json!({"n": 1})), ("c", json!({"n": 1}))],
    )
    .await;
}
