//! Attacks on the document database from issue 6 and their variants: stored data leaking
//! through validation errors, existence oracles, cursors, rule lookups that starve the
//! PostgreSQL pool, inputs that used to panic, overflowing transforms.

use reqwest::Method;
use serde_json::{json, Value};

use crate::documents::admin_collection;
use crate::helpers::{spawn_app, spawn_app_with, Backend, Reply, TestApp};
use crate::store_tests;

store_tests!(
    validation_errors_never_show_a_stored_document_to_those_the_rules_refuse,
    an_allowed_writer_sees_keywords_and_paths_not_values,
    missing_and_existing_documents_answer_alike_to_those_who_cannot_read_them,
    a_reader_still_learns_not_found_conflict_and_version,
    cursors_are_opaque_bound_to_their_query_and_tamper_proof,
    a_cursor_cut_by_the_row_budget_carries_nothing_unreadable_and_loses_nothing,
    the_row_budget_answers_alike_whatever_hidden_rows_hold,
    a_where_with_thousands_of_values_is_refused,
    sums_beyond_any_integer_or_double_answer_alike_and_quote_nothing,
    aggregates_checked_row_by_row_equal_those_computed_in_sql,
    rule_lookups_in_parallel_batches_neither_starve_the_pool_nor_deny_wrongly,
    rule_lookups_in_a_batch_see_its_earlier_writes,
    out_of_range_times_are_a_bad_request_not_a_dropped_connection,
    increments_that_overflow_are_refused,
    hostile_schemas_are_refused_or_harmless,
);

/// Values planted in the stored documents; no answer to a refused caller may contain them.
const SECRETS: [&str; 3] = ["SSN-31337-SECRET", "PIN-9876-SECRET", "73737"];

fn assert_no_secret(reply: &Reply, what: &str) {
    for secret in SECRETS {
        assert!(
            !reply.text.contains(secret),
            "{what}: the answer shows `{secret}`: {}",
            reply.text
        );
    }
}

fn owner_rules() -> Value {
    json!({
        "read": "auth != null && resource.data.owner == auth.uid",
        "create": "auth != null && request.data.owner == auth.uid",
        "update": "auth != null && resource.data.owner == auth.uid",
        "delete": "auth != null && resource.data.owner == auth.uid",
    })
}

fn profile(owner: &str) -> Value {
    json!({"owner": owner, "ssn": SECRETS[0], "pin": SECRETS[1], "balance": 73737})
}

/// The writes a refused caller can try on `coll/pa`, each with the body that makes the
/// merged document invalid for the collection's schema or size.
fn hostile_writes(coll: &str, patch: &Value) -> Vec<(&'static str, Method, String, Option<Value>)> {
    vec![
        (
            "PATCH",
            Method::PATCH,
            format!("/v1/db/{coll}/pa"),
            Some(json!({"data": patch})),
        ),
        (
            "PUT with a transform",
            Method::PUT,
            format!("/v1/db/{coll}/pa"),
            Some(json!({"data": patch})),
        ),
        (
            "batch update",
            Method::POST,
            "/v1/db/_batch".to_string(),
            Some(
                json!({"writes": [{"op": "update", "collection": coll, "id": "pa", "data": patch}]}),
            ),
        ),
        (
            "batch set",
            Method::POST,
            "/v1/db/_batch".to_string(),
            Some(json!({"writes": [{"op": "set", "collection": coll, "id": "pa", "data": patch}]})),
        ),
    ]
}

async fn validation_errors_never_show_a_stored_document_to_those_the_rules_refuse(
    backend: Backend,
) {
    let app = spawn_app_with(backend, |c| c.documents.max_document_bytes = 2048).await;
    let admin = app.admin_token().await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (_, bob, _) = app.user("bob@example.com").await;
    let big = "x".repeat(1700);
    // Each collection's schema or size limit fails once the patch is merged with the stored
    // document, the way an attacker would probe it.
    let cases = [
        (
            "props",
            json!({"maxProperties": 6}),
            json!({"a": 1, "b": 2, "c": 3, "d": 4}),
        ),
        (
            "maximum",
            json!({"properties": {"balance": {"maximum": 73740}}}),
            json!({"balance": {"$increment": 5}}),
        ),
        (
            "oneof",
            json!({"oneOf": [{"required": ["x"]}, {"required": ["ssn"]}]}),
            json!({"x": 1}),
        ),
        (
            "enums",
            json!({"properties": {"pin": {"enum": [SECRETS[1]]}, "x": {"enum": [1]}}}),
            json!({"x": 2}),
        ),
        ("sized", json!({}), json!({"pad": big})),
    ];
    for (coll, schema, patch) in cases {
        admin_collection(
            &app,
            &admin,
            coll,
            json!({"rules": owner_rules(), "schema": schema}),
        )
        .await;
        let mut doc = profile(&alice);
        if coll == "sized" {
            doc["pad0"] = json!("y".repeat(300));
        }
        app.send(
            Method::PUT,
            &format!("/v1/db/{coll}/pa"),
            Some(&alice_token),
            Some(json!({"data": doc})),
        )
        .await
        .assert_ok();
        for token in [None, Some(bob.as_str())] {
            for (what, method, path, body) in hostile_writes(coll, &patch) {
                let reply = app.send(method, &path, token, body).await;
                let what = format!(
                    "{coll}: {what} as {}",
                    if token.is_some() { "bob" } else { "anonymous" }
                );
                reply.assert_error(403, "permission_denied");
                assert_no_secret(&reply, &what);
            }
        }
        // Nothing was written by any of it.
        let stored = app
            .get(&format!("/v1/db/{coll}/pa"), Some(&alice_token))
            .await;
        assert_eq!(stored.assert_ok()["version"], 1, "{coll}: {}", stored.text);
    }
}

async fn an_allowed_writer_sees_keywords_and_paths_not_values(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    // Anyone signed in may append a note to a board; only its owner may read it.
    admin_collection(
        &app,
        &admin,
        "boards",
        json!({
            "rules": {"read": "auth != null && resource.data.owner == auth.uid",
                      "create": "auth != null", "update": "auth != null"},
            "schema": {"properties": {"balance": {"maximum": 73740}},
                       "oneOf": [{"required": ["x"]}, {"required": ["ssn"]}]},
        }),
    )
    .await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (_, bob, _) = app.user("bob@example.com").await;
    app.send(
        Method::PUT,
        "/v1/db/boards/b1",
        Some(&alice_token),
        Some(json!({"data": profile(&alice)})),
    )
    .await
    .assert_ok();
    let over = app
        .patch(
            "/v1/db/boards/b1",
            Some(&bob),
            json!({"data": {"balance": {"$increment": 5}}}),
        )
        .await;
    let message = over.assert_error(400, "invalid_argument");
    assert!(
        message.contains("maximum") && message.contains("/balance"),
        "{message}"
    );
    assert_no_secret(&over, "maximum for an allowed writer");
    assert_eq!(over.body["error"]["details"]["keyword"], "maximum");
    let both = app
        .patch("/v1/db/boards/b1", Some(&bob), json!({"data": {"x": 1}}))
        .await;
    assert!(both.assert_error(400, "invalid_argument").contains("oneOf"));
    assert_no_secret(&both, "oneOf for an allowed writer");
}

/// (status, code, message) of an answer, what a prober compares.
fn shape(reply: &Reply) -> (u16, Value, Value) {
    (
        reply.status.as_u16(),
        reply.body["error"]["code"].clone(),
        reply.body["error"]["message"].clone(),
    )
}

async fn probe(app: &TestApp, token: Option<&str>, id: &str) -> Vec<(String, (u16, Value, Value))> {
    let path = format!("/v1/db/todos/{id}");
    let foreign = json!({"owner": "alice-is-not-you", "title": "t"});
    let mut answers = Vec::new();
    let mut record = |what: &str, reply: Reply| answers.push((what.to_string(), shape(&reply)));
    record("GET", app.get(&path, token).await);
    record("DELETE", app.delete(&path, token).await);
    record(
        "PATCH",
        app.patch(&path, token, json!({"data": {"title": "x"}}))
            .await,
    );
    record(
        "PUT",
        app.send(Method::PUT, &path, token, Some(json!({"data": foreign})))
            .await,
    );
    for (header, value) in [("if-match", "\"7\""), ("if-none-match", "*")] {
        let mut req = app
            .client
            .request(Method::PUT, app.url(&path))
            .header(header, value)
            .json(&json!({"data": foreign}));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        record(
            &format!("PUT {header}"),
            TestApp::reply(req.send().await.unwrap()).await,
        );
        let mut req = app
            .client
            .request(Method::DELETE, app.url(&path))
            .header(header, value);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        record(
            &format!("DELETE {header}"),
            TestApp::reply(req.send().await.unwrap()).await,
        );
    }
    record(
        "POST with id",
        app.post("/v1/db/todos", token, json!({"id": id, "data": foreign}))
            .await,
    );
    for write in [
        json!({"op": "delete", "collection": "todos", "id": id}),
        json!({"op": "update", "collection": "todos", "id": id, "data": {"title": "x"}}),
        json!({"op": "update", "collection": "todos", "id": id, "data": {"title": "x"}, "if_version": 1}),
        json!({"op": "create", "collection": "todos", "id": id, "data": foreign}),
        json!({"op": "set", "collection": "todos", "id": id, "data": foreign}),
    ] {
        record(
            &format!("batch {}", write["op"]),
            app.post("/v1/db/_batch", token, json!({"writes": [write]}))
                .await,
        );
    }
    answers
}

async fn todos(app: &TestApp) -> (String, String) {
    let admin = app.admin_token().await;
    admin_collection(app, &admin, "todos", json!({"rules": owner_rules()})).await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    app.send(
        Method::PUT,
        "/v1/db/todos/exists",
        Some(&alice_token),
        Some(json!({"data": {"owner": alice, "title": "mine"}})),
    )
    .await
    .assert_ok();
    (alice, alice_token)
}

async fn missing_and_existing_documents_answer_alike_to_those_who_cannot_read_them(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    todos(&app).await;
    let (_, bob, _) = app.user("bob@example.com").await;
    for token in [None, Some(bob.as_str())] {
        let existing = probe(&app, token, "exists").await;
        let missing = probe(&app, token, "nope").await;
        for ((what, a), (_, b)) in existing.iter().zip(&missing) {
            assert_eq!(a, b, "{what} tells an existing from a missing document");
            assert_eq!(a.0, 403, "{what}: {a:?}");
        }
    }
    // And none of it changed the document.
    let admin = app.admin_token().await;
    let doc = app.get("/v1/db/todos/exists", Some(&admin)).await;
    assert_eq!(doc.assert_ok()["version"], 1);
    assert_eq!(doc.body["data"]["title"], "mine");
}

async fn a_reader_still_learns_not_found_conflict_and_version(backend: Backend) {
    let app = spawn_app(backend).await;
    let (alice, alice_token) = todos(&app).await;
    let token = Some(alice_token.as_str());
    app.delete("/v1/db/todos/nope", token)
        .await
        .assert_error(403, "permission_denied");
    app.post(
        "/v1/db/todos",
        token,
        json!({"id": "exists", "data": {"owner": alice}}),
    )
    .await
    .assert_error(409, "already_exists");
    let stale = app
        .client
        .request(Method::PATCH, app.url("/v1/db/todos/exists"))
        .header("if-match", "\"7\"")
        .bearer_auth(&alice_token)
        .json(&json!({"data": {"title": "x"}}))
        .send()
        .await
        .unwrap();
    let stale = TestApp::reply(stale).await;
    assert!(stale
        .assert_error(412, "failed_precondition")
        .contains("version is 1"));
    // Under a rule that lets everyone read, a missing document is a plain 404.
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "public",
        json!({"rules": {"read": "true", "update": "true", "delete": "true"}}),
    )
    .await;
    app.delete("/v1/db/public/nope", None)
        .await
        .assert_error(404, "not_found");
    app.patch("/v1/db/public/nope", None, json!({"data": {"a": 1}}))
        .await
        .assert_error(404, "not_found");
}

async fn cursors_are_opaque_bound_to_their_query_and_tamper_proof(backend: Backend) {
    use base64::Engine;
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    for coll in ["notes", "other"] {
        admin_collection(&app, &admin, coll, json!({"rules": {"read": "true"}})).await;
        let writes: Vec<Value> = (0..5)
            .map(|i| json!({"op": "create", "collection": coll, "id": format!("n{i}"), "data": {"secret": format!("value-{i}-visible")}}))
            .collect();
        app.post("/v1/db/_batch", Some(&admin), json!({"writes": writes}))
            .await
            .assert_ok();
    }
    let order = json!([["secret", "asc"]]);
    let page = app
        .post(
            "/v1/db/notes/_query",
            None,
            json!({"limit": 2, "order_by": order}),
        )
        .await;
    let cursor = page.assert_ok()["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(&cursor)
        .expect("a cursor is base64url");
    let text = String::from_utf8_lossy(&raw);
    assert!(
        !text.contains("value-1") && !text.contains("n1"),
        "the cursor shows its position: {text}"
    );
    // It continues its own query...
    let next = app
        .post(
            "/v1/db/notes/_query",
            None,
            json!({"limit": 2, "order_by": order, "start_after": cursor}),
        )
        .await;
    assert_eq!(next.assert_ok()["documents"][0]["id"], "n2");
    // ...and no other: another collection, another order, a flipped character, garbage.
    let mut flipped = cursor.clone().into_bytes();
    let i = flipped.len() / 2;
    flipped[i] = if flipped[i] == b'A' { b'B' } else { b'A' };
    let forged = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"v": [["value-0-visible"]], "id": "n0"}).to_string());
    for (coll, order, start) in [
        ("other", json!([["secret", "asc"]]), cursor.clone()),
        ("notes", json!([["secret", "desc"]]), cursor.clone()),
        ("notes", json!([]), cursor.clone()),
        (
            "notes",
            json!([["secret", "asc"]]),
            String::from_utf8(flipped).unwrap(),
        ),
        ("notes", json!([["secret", "asc"]]), forged),
        ("notes", json!([["secret", "asc"]]), "%%%".to_string()),
        ("notes", json!([["secret", "asc"]]), "A".repeat(100_000)),
    ] {
        let reply = app
            .post(
                &format!("/v1/db/{coll}/_query"),
                None,
                json!({"order_by": order, "start_after": start}),
            )
            .await;
        reply.assert_error(400, "invalid_argument");
    }
}

async fn a_cursor_cut_by_the_row_budget_carries_nothing_unreadable_and_loses_nothing(
    backend: Backend,
) {
    use base64::Engine;
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    // A rule no SQL filter expresses, so every row is checked in turn (5,000 per request).
    admin_collection(
        &app,
        &admin,
        "vault",
        json!({"rules": {"read": "size(resource.data.tags) == 2"}}),
    )
    .await;
    let readable = [150, 5150, 5180, 5210];
    for chunk in 0..11 {
        let writes: Vec<Value> = (0..500)
            .map(|k| {
                let i = chunk * 500 + k;
                let tags = if readable.contains(&i) {
                    json!(["a", "b"])
                } else {
                    json!(["a"])
                };
                json!({"op": "create", "collection": "vault", "id": format!("v{i:05}"),
                       "data": {"tags": tags, "secret": format!("classified-{i:05}")}})
            })
            .collect();
        app.post("/v1/db/_batch", Some(&admin), json!({"writes": writes}))
            .await
            .assert_ok();
    }
    let (_, token, _) = app.user("prober@example.com").await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut body = json!({"limit": 2});
        if let Some(c) = &cursor {
            body["start_after"] = json!(c);
        }
        let page = app.post("/v1/db/vault/_query", Some(&token), body).await;
        for d in page.assert_ok()["documents"].as_array().unwrap() {
            seen.push(d["id"].as_str().unwrap().to_string());
        }
        pages += 1;
        let Some(c) = page.body["next_cursor"].as_str() else {
            break;
        };
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(c)
            .unwrap();
        assert!(
            !String::from_utf8_lossy(&raw).contains("classified"),
            "a cursor carries a value the caller cannot read"
        );
        if pages == 1 {
            // Between pages, the unreadable rows around where the budget ran out change:
            // the scan must neither skip nor repeat a readable row.
            let writes: Vec<Value> = (4950..5050)
                .map(|i| json!({"op": "update", "collection": "vault", "id": format!("v{i:05}"), "data": {"touched": true}}))
                .collect();
            app.post("/v1/db/_batch", Some(&admin), json!({"writes": writes}))
                .await
                .assert_ok();
        }
        cursor = Some(c.to_string());
        assert!(pages < 50, "paging does not end");
    }
    assert!(pages >= 3, "the row budget should have cut pages short");
    let expected: Vec<String> = readable.iter().map(|i| format!("v{i:05}")).collect();
    assert_eq!(seen, expected);
}

async fn rule_lookups_in_parallel_batches_neither_starve_the_pool_nor_deny_wrongly(
    backend: Backend,
) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "members", json!({"rules": {"read": "true"}})).await;
    admin_collection(
        &app,
        &admin,
        "posts",
        json!({"rules": {
            "read": "true",
            "create": "auth != null && get('members', auth.uid).data.role == 'writer' && exists('members', auth.uid)",
        }}),
    )
    .await;
    let mut writers = Vec::new();
    for i in 0..4 {
        let (id, token, _) = app.user(&format!("writer{i}@example.com")).await;
        app.send(
            Method::PUT,
            &format!("/v1/db/members/{id}"),
            Some(&admin),
            Some(json!({"data": {"role": "writer"}})),
        )
        .await
        .assert_ok();
        writers.push(token);
    }
    let (_, reader, _) = app.user("reader@example.com").await;
    let mut tasks = Vec::new();
    for b in 0..48 {
        let token = if b % 4 == 3 {
            reader.clone()
        } else {
            writers[b % 4].clone()
        };
        let client = app.client.clone();
        let url = app.url("/v1/db/_batch");
        tasks.push(tokio::spawn(async move {
            let writes: Vec<Value> = (0..5)
                .map(|k| json!({"op": "create", "collection": "posts", "id": format!("p{b}-{k}"), "data": {"k": k}}))
                .collect();
            let resp = client
                .post(url)
                .bearer_auth(token)
                .json(&json!({"writes": writes}))
                .send()
                .await
                .unwrap();
            (b % 4 == 3, resp.status().as_u16())
        }));
    }
    let ready = app.get("/ready", None).await;
    assert_eq!(ready.status, 200, "{}", ready.text);
    let mut wrong = Vec::new();
    for t in tasks {
        let (is_reader, status) = t.await.unwrap();
        let expected = if is_reader { 403 } else { 200 };
        if status != expected {
            wrong.push((is_reader, status));
        }
    }
    assert!(
        wrong.is_empty(),
        "wrong answers (reader?, status): {wrong:?}"
    );
    let count = app
        .post(
            "/v1/db/posts/_aggregate",
            Some(&admin),
            json!({"aggregations": {"n": {"count": {}}}}),
        )
        .await;
    assert_eq!(count.assert_ok()["n"], 36 * 5);
}

async fn rule_lookups_in_a_batch_see_its_earlier_writes(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "folders",
        json!({"rules": {
            "read": "true",
            "create": "auth != null && (request.data.parent == '' || exists('folders', request.data.parent))",
        }}),
    )
    .await;
    let (_, token, _) = app.user("u@example.com").await;
    let nested = app
        .post(
            "/v1/db/_batch",
            Some(&token),
            json!({"writes": [
                {"op": "create", "collection": "folders", "id": "a", "data": {"parent": ""}},
                {"op": "create", "collection": "folders", "id": "b", "data": {"parent": "a"}},
                {"op": "create", "collection": "folders", "id": "c", "data": {"parent": "b"}},
            ]}),
        )
        .await;
    nested.assert_ok();
    let orphan = app
        .post(
            "/v1/db/_batch",
            Some(&token),
            json!({"writes": [
                {"op": "create", "collection": "folders", "id": "x", "data": {"parent": "nowhere"}},
            ]}),
        )
        .await;
    orphan.assert_error(403, "permission_denied");
}

async fn out_of_range_times_are_a_bad_request_not_a_dropped_connection(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "open", json!({"rules": {"read": "true"}})).await;
    for where_ in [
        json!(["$created_at", "<", "0000-01-01T00:00:00+01:00"]),
        json!(["$created_at", ">=", "9999-12-31T23:59:59-01:00"]),
        json!(["$updated_at", "==", "0000-01-01T00:30:00+00:59"]),
        json!([
            "$updated_at",
            "in",
            ["2020-01-01T00:00:00Z", "9999-12-31T23:59:59-23:59"]
        ]),
        json!(["$created_at", "not-in", ["0000-01-01T00:00:00+23:59"]]),
    ] {
        for path in ["/v1/db/open/_query", "/v1/db/open/_aggregate"] {
            let mut body = json!({"where": where_});
            if path.ends_with("_aggregate") {
                body["aggregations"] = json!({"n": {"count": {}}});
            }
            let reply = app.post(path, None, body).await;
            reply.assert_error(400, "invalid_argument");
        }
    }
    // The edges themselves are fine.
    let edge = app
        .post(
            "/v1/db/open/_query",
            None,
            json!({"where": [["$created_at", ">", "0000-01-01T00:00:00Z"], ["$created_at", "<", "9999-12-31T23:59:59Z"]]}),
        )
        .await;
    edge.assert_ok();
}

async fn increments_that_overflow_are_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "counters", json!({"rules": owner_rules()})).await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (_, bob, _) = app.user("bob@example.com").await;
    app.send(
        Method::PUT,
        "/v1/db/counters/c",
        Some(&alice_token),
        Some(json!({"data": {"owner": alice, "n": i64::MAX - 1, "f": 1.7e308, "m": i64::MIN}})),
    )
    .await
    .assert_ok();
    app.patch(
        "/v1/db/counters/c",
        Some(&alice_token),
        json!({"data": {"n": {"$increment": 1}}}),
    )
    .await
    .assert_ok();
    for (field, by) in [("n", json!(1)), ("f", json!(1.7e308)), ("m", json!(-1))] {
        let reply = app
            .patch(
                "/v1/db/counters/c",
                Some(&alice_token),
                json!({"data": {field: {"$increment": by}}}),
            )
            .await;
        let message = reply.assert_error(400, "invalid_argument");
        assert!(message.contains("overflow"), "{message}");
        // Someone who may not read the counter learns nothing about its value.
        app.patch(
            "/v1/db/counters/c",
            Some(&bob),
            json!({"data": {field: {"$increment": by}}}),
        )
        .await
        .assert_error(403, "permission_denied");
    }
    let doc = app.get("/v1/db/counters/c", Some(&alice_token)).await;
    assert_eq!(doc.assert_ok()["data"]["n"], json!(i64::MAX));
    assert_eq!(doc.body["version"], 2);
}

async fn hostile_schemas_are_refused_or_harmless(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let put = |schema: Value| {
        let app = &app;
        let admin = admin.clone();
        async move {
            app.send(
                Method::PUT,
                "/v1/admin/collections/shaped",
                Some(&admin),
                Some(json!({"rules": {"read": "true", "create": "true"}, "schema": schema})),
            )
            .await
        }
    };
    // Deeper than any real schema (and than serde's own limit of 128 for the body).
    for depth in [65, 120, 1000] {
        let deep = (0..depth).fold(
            json!({"type": "object"}),
            |acc, _| json!({"properties": {"a": acc}}),
        );
        let reply = put(deep).await;
        assert_eq!(reply.status, 400, "depth {depth}: {}", reply.text);
    }
    // Deep but within the bound: compiles, and validates a document.
    let deep = (0..30).fold(
        json!({"type": "object"}),
        |acc, _| json!({"properties": {"a": acc}}),
    );
    put(deep).await.assert_ok();
    app.post("/v1/db/shaped", None, json!({"data": {"a": {"a": 1}}}))
        .await
        .assert_ok();
    // A body far deeper than anything parses to a 400 (built as text: a value this deep
    // would overflow the test's own stack when dropped).
    let body = format!(
        "{{\"rules\": {{}}, \"schema\": {}1{}}}",
        "{\"a\": ".repeat(100_000),
        "}".repeat(100_000)
    );
    app.send_json_text(
        Method::PUT,
        "/v1/admin/collections/shaped",
        Some(&admin),
        body,
    )
    .await
    .assert_error(400, "invalid_argument");
    // A schema that refers to itself validates a document as deep as documents may be.
    put(json!({"type": "object", "properties": {"a": {"$ref": "#"}}}))
        .await
        .assert_ok();
    let deep_doc = (0..31).fold(json!({}), |acc, _| json!({"a": acc}));
    app.post("/v1/db/shaped", None, json!({"data": deep_doc}))
        .await
        .assert_ok();
    let bad = (0..30).fold(json!({"a": 1}), |acc, _| json!({"a": acc}));
    app.post("/v1/db/shaped", None, json!({"data": bad}))
        .await
        .assert_error(400, "invalid_argument");
    assert_eq!(app.get("/health", None).await.status, 200);
}

/// Issue 6, round 2: with a rule checked row by row, a `where` on fields the caller cannot
/// read used to decide which rows counted against the 5,000-row budget, so whether a page
/// came back with a cursor told whether a hidden row matched. Now the `where` applies after
/// the rule, and ordering by data fields is refused there.
async fn the_row_budget_answers_alike_whatever_hidden_rows_hold(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "notes",
        json!({"rules": {
            "read": "resource.data.public == true || exists('acl', resource.id + '_' + (auth == null ? '' : auth.uid))",
            "create": "auth != null && request.data.owner == auth.uid"}}),
    )
    .await;
    admin_collection(&app, &admin, "acl", json!({"rules": {}})).await;
    let (victim, victim_token, _) = app.user("victim@example.com").await;
    app.post(
        "/v1/db/notes",
        Some(&victim_token),
        json!({"id": "victim-diary", "data": {"owner": victim, "public": false, "pin": 8413}}),
    )
    .await
    .assert_ok();
    // The attacker's own private filler, enough to spend the budget.
    let (attacker, attacker_token, _) = app.user("attacker@example.com").await;
    for chunk in 0..10 {
        let writes: Vec<Value> = (0..500)
            .map(|k| {
                json!({"op": "create", "collection": "notes", "id": format!("f{chunk}-{k:03}"),
                            "data": {"owner": attacker, "public": false, "filler": true}})
            })
            .collect();
        app.post(
            "/v1/db/_batch",
            Some(&attacker_token),
            json!({"writes": writes}),
        )
        .await
        .assert_ok();
    }
    let probe = |n: i64| {
        json!({"limit": 1, "where": {"or": [["filler", "==", true],
            {"and": [["$id", "==", "victim-diary"], ["pin", ">", n]]}]}})
    };
    // A pin below and above the truth: the answers (documents, whether a cursor comes) match.
    let shape = |r: &Reply| {
        (
            r.status.as_u16(),
            r.body["documents"].clone(),
            r.body["next_cursor"].is_null(),
        )
    };
    let low = app.post("/v1/db/notes/_query", None, probe(1)).await;
    let high = app.post("/v1/db/notes/_query", None, probe(99_999)).await;
    assert_eq!(shape(&low), shape(&high), "{} / {}", low.text, high.text);
    assert_eq!(low.body["documents"], json!([]));
    // Counting and aggregating answer only for what the caller may read.
    for n in [1, 99_999] {
        let mut body = probe(n);
        body["count"] = json!(true);
        body.as_object_mut().unwrap().remove("limit");
        let count = app.post("/v1/db/notes/_query", None, body).await;
        assert_eq!(count.assert_ok()["count"], 0);
    }
    // Ordering by a data field would let the cut compare hidden values: refused.
    let ordered = app
        .post(
            "/v1/db/notes/_query",
            None,
            json!({"order_by": [["pin", "asc"]]}),
        )
        .await;
    let message = ordered.assert_error(400, "invalid_argument");
    assert!(message.contains("$created_at"), "{message}");
    // A cursor is the caller's own: another caller cannot continue it.
    let page = app
        .post(
            "/v1/db/notes/_query",
            Some(&attacker_token),
            json!({"limit": 1}),
        )
        .await;
    let cursor = page.assert_ok()["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    app.post(
        "/v1/db/notes/_query",
        None,
        json!({"limit": 1, "start_after": cursor}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.post(
        "/v1/db/notes/_query",
        Some(&attacker_token),
        json!({"limit": 1, "start_after": cursor}),
    )
    .await
    .assert_ok();
}

/// Hostile-client round 2: 100 `in` clauses of 100 values each, ORed, took 30-60 s per query
/// on SQLite, and eight of them held every pooled read connection.
async fn a_where_with_thousands_of_values_is_refused(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "pub", json!({"rules": {"read": "true"}})).await;
    let values: Vec<i64> = (0..100).collect();
    let clauses: Vec<Value> = (0..100)
        .map(|f| json!([format!("f{f}"), "in", values]))
        .collect();
    for path in ["/v1/db/pub/_query", "/v1/db/pub/_aggregate"] {
        let mut body = json!({"where": {"or": clauses}});
        if path.ends_with("_aggregate") {
            body["aggregations"] = json!({"n": {"count": {}}});
        }
        let reply = app.post(path, None, body).await;
        let message = reply.assert_error(400, "invalid_argument");
        assert!(message.contains("500 values"), "{message}");
    }
    // Within the bound it runs.
    let small: Vec<Value> = (0..5)
        .map(|f| json!([format!("f{f}"), "in", values]))
        .collect();
    app.post("/v1/db/pub/_query", None, json!({"where": {"or": small}}))
        .await
        .assert_ok();
}

/// One writer's numbers must not break `_aggregate` for everyone: two `i64::MAX` made SQLite
/// answer 500 (integer overflow in SUM), and two 1.79e308 made PostgreSQL answer a 400
/// quoting the exact sum of stored values. Sums are doubles on both; past a double's range
/// the answer is a 400 naming the aggregation only — by SQL and by the per-row path alike.
async fn sums_beyond_any_integer_or_double_answer_alike_and_quote_nothing(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (_, user, _) = app.user("u@example.com").await;
    for (name, read) in [
        ("scores", "true"),
        // A loop: checked row by row, summed in memory.
        ("scores_per_row", "resource.data.tags.all(t, t != 'hidden')"),
    ] {
        admin_collection(&app, &admin, name, json!({"rules": {"read": read}})).await;
        let big = format!("{name}_big");
        admin_collection(&app, &admin, &big, json!({"rules": {"read": read}})).await;
        for (coll, n) in [
            (name, json!(10)),
            (name, json!(9223372036854775807_i64)),
            (name, json!(9223372036854775807_i64)),
            (big.as_str(), json!(10)),
            (big.as_str(), json!(1.7976931348623157e308)),
            (big.as_str(), json!(1.7976931348623157e308)),
        ] {
            app.post(
                &format!("/v1/db/{coll}"),
                Some(&admin),
                json!({"data": {"points": n, "tags": ["a"]}}),
            )
            .await
            .assert_ok();
        }
        let aggs = json!({"aggregations": {"total": {"sum": "points"}, "mean": {"avg": "points"}, "n": {"count": {}}}});
        let body = app
            .post(
                &format!("/v1/db/{name}/_aggregate"),
                Some(&user),
                aggs.clone(),
            )
            .await;
        let body = body.assert_ok();
        assert_eq!(body["n"], 3, "{name}: {body}");
        let total = body["total"].as_f64().unwrap();
        assert!(
            (total - 1.8446744073709552e19).abs() < 1e5,
            "{name}: {body}"
        );
        assert!(
            (body["mean"].as_f64().unwrap() - total / 3.0).abs() < 1e5,
            "{name}: {body}"
        );
        let reply = app
            .post(&format!("/v1/db/{big}/_aggregate"), Some(&user), aggs)
            .await;
        let message = reply.assert_error(400, "invalid_argument");
        assert!(message.contains("range"), "{big}: {message}");
        assert!(
            !message.chars().any(|c| c.is_ascii_digit()),
            "{big}: the message quotes a number: {message}"
        );
        // Each is fine alone.
        let fine = app
            .post(
                &format!("/v1/db/{big}/_aggregate"),
                Some(&user),
                json!({"aggregations": {"high": {"max": "points"}, "n": {"count": {}}}}),
            )
            .await;
        assert_eq!(fine.assert_ok()["n"], 3);
    }
}

/// `_aggregate` under a per-row rule folds documents in Rust one at a time (never holding the
/// collection); it must answer exactly what SQL answers when the rule is a filter.
async fn aggregates_checked_row_by_row_equal_those_computed_in_sql(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (_, user, _) = app.user("u@example.com").await;
    let values = [
        json!(3),
        json!(1),
        json!(1.0),
        json!(2.5),
        json!(-7),
        json!("b"),
        json!("a"),
        json!(true),
        json!(null),
        json!([1]),
        json!({"k": 1}),
    ];
    for (name, read) in [
        ("in_sql", "true"),
        ("per_row", "resource.data.tags.all(t, t != 'hidden')"),
    ] {
        admin_collection(&app, &admin, name, json!({"rules": {"read": read}})).await;
        let mut writes: Vec<Value> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                json!({"op": "create", "collection": name, "id": format!("d{i:02}"),
                                "data": {"v": v, "n": i, "tags": ["a"]}})
            })
            .collect();
        writes.push(json!({"op": "create", "collection": name, "id": "d99", "data": {"tags": []}}));
        app.post("/v1/db/_batch", Some(&admin), json!({"writes": writes}))
            .await
            .assert_ok();
    }
    let aggs = json!({"aggregations": {
        "n": {"count": {}}, "sum_v": {"sum": "v"}, "avg_v": {"avg": "v"},
        "min_v": {"min": "v"}, "max_v": {"max": "v"}, "sum_n": {"sum": "n"},
        "min_n": {"min": "n"}, "avg_none": {"avg": "missing"}, "max_none": {"max": "missing"}}});
    for body in [aggs.clone(), {
        let mut b = aggs.clone();
        b["where"] = json!(["n", ">=", 3]);
        b
    }] {
        let sql = app
            .post("/v1/db/in_sql/_aggregate", Some(&user), body.clone())
            .await;
        let per_row = app
            .post("/v1/db/per_row/_aggregate", Some(&user), body.clone())
            .await;
        assert_eq!(sql.assert_ok(), per_row.assert_ok(), "{body}");
    }
}
