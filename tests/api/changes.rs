//! API.md § Change stream: one ordered log of events from every domain, read over
//! `GET /v1/admin/changes` and through the change bus, in commit order even with many
//! concurrent writers, across nodes, with durable consumers, retention and expiry.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::documents::admin_collection;
use crate::helpers::{spawn_app, spawn_app_with, Backend, TestApp};
use crate::store_tests;

store_tests!(
    every_document_write_is_one_event_in_commit_order,
    users_are_events_and_carry_no_password_hash,
    dropping_a_collection_emits_a_delete_per_document,
    concurrent_writers_are_seen_exactly_once_in_commit_order,
    durable_consumers_hold_retention_and_advance_by_compare_and_set,
    a_position_older_than_the_retained_log_is_expired_not_a_gap,
    the_changes_endpoint_is_for_admins_and_checks_its_input,
);

fn open_rules() -> Value {
    json!({"read": "true", "create": "true", "update": "true", "delete": "true"})
}

/// Every event after `after` with a topic starting with `topic`, following `next_after`.
async fn all_changes(app: &TestApp, admin: &str, after: i64, topic: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut after = after;
    loop {
        let page = app
            .get(
                &format!("/v1/admin/changes?after={after}&limit=1000&topic={topic}"),
                Some(admin),
            )
            .await;
        let body = page.assert_ok().clone();
        let changes = body["changes"].as_array().unwrap().clone();
        let next = body["next_after"].as_i64().unwrap();
        assert!(next >= after, "next_after went back: {after} -> {next}");
        let done = changes.len() < 1000;
        out.extend(changes);
        after = next;
        if done {
            return out;
        }
    }
}

fn positions(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|e| e["position"].as_i64().unwrap())
        .collect()
}

/// Waits until the node's watermark reaches `position` (a write's event is readable once
/// everything before it is final).
async fn settled(app: &TestApp, position: i64) {
    let mut watch = app.state.changes.watch();
    tokio::time::timeout(Duration::from_secs(10), watch.wait_for(|w| *w >= position))
        .await
        .expect("the watermark reaches the last write")
        .unwrap();
}

async fn last_position(app: &TestApp) -> i64 {
    app.state.store.last_position().await.unwrap()
}

async fn every_document_write_is_one_event_in_commit_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "logged", json!({"rules": open_rules()})).await;
    let mut bus = app.state.changes.subscribe();
    let start = last_position(&app).await;
    app.post(
        "/v1/db/logged",
        Some(&admin),
        json!({"id": "x", "data": {"n": 1}}),
    )
    .await
    .assert_ok();
    app.patch("/v1/db/logged/x", Some(&admin), json!({"data": {"n": 2}}))
        .await
        .assert_ok();
    app.post(
        "/v1/db/_batch",
        Some(&admin),
        json!({"writes": [
            {"op": "create", "collection": "logged", "id": "y", "data": {}},
            {"op": "delete", "collection": "logged", "id": "x"}]}),
    )
    .await
    .assert_ok();
    // A failed write appends nothing.
    app.post(
        "/v1/db/logged",
        Some(&admin),
        json!({"id": "y", "data": {}}),
    )
    .await
    .assert_error(409, "already_exists");
    let end = last_position(&app).await;
    settled(&app, end).await;
    let events = all_changes(&app, &admin, start, "db/logged").await;
    let summary: Vec<(String, String, i64)> = events
        .iter()
        .map(|e| {
            let doc = if e["data"].is_null() {
                &e["old_data"]
            } else {
                &e["data"]
            };
            (
                e["op"].as_str().unwrap().to_string(),
                e["key"].as_str().unwrap().to_string(),
                doc["version"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("create".into(), "x".into(), 1),
            ("update".into(), "x".into(), 2),
            ("create".into(), "y".into(), 1),
            ("delete".into(), "x".into(), 2),
        ]
    );
    let p = positions(&events);
    assert!(p.windows(2).all(|w| w[0] < w[1]), "{p:?}");
    assert_eq!(events[1]["old_data"]["data"]["n"], 1);
    assert_eq!(events[1]["data"]["data"]["n"], 2);
    assert!(events[3]["data"].is_null());
    assert_eq!(events[0]["topic"], "db/logged");
    assert_eq!(events[0]["actor"]["type"], "admin");
    assert!(events[0]["actor"]["id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    // The bus carried the same events, in the same order.
    let mut published = Vec::new();
    while published.len() < 4 {
        let e = tokio::time::timeout(Duration::from_secs(10), bus.recv())
            .await
            .expect("the bus delivers")
            .unwrap();
        if e.topic == "db/logged" {
            published.push(e.position);
        }
    }
    assert_eq!(published, p);
}

async fn users_are_events_and_carry_no_password_hash(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let start = last_position(&app).await;
    let (id, token, _) = app.user("events@example.com").await;
    app.patch(
        &format!("/v1/admin/users/{id}"),
        Some(&admin),
        json!({"claims": {"role": "editor"}}),
    )
    .await
    .assert_ok();
    app.patch(
        "/v1/auth/user",
        Some(&token),
        json!({"data": {"name": "Ev"}}),
    )
    .await
    .assert_ok();
    app.delete(&format!("/v1/admin/users/{id}"), Some(&admin))
        .await;
    let end = last_position(&app).await;
    settled(&app, end).await;
    let events = all_changes(&app, &admin, start, "auth/").await;
    let ops: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["op"].as_str().unwrap(),
                e["actor"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            ("create", "user"),
            ("update", "admin"),
            ("update", "user"),
            ("delete", "admin")
        ]
    );
    assert!(events
        .iter()
        .all(|e| e["topic"] == "auth/users" && e["key"] == id.as_str()));
    assert_eq!(events[1]["data"]["claims"]["role"], "editor");
    assert_eq!(events[1]["old_data"]["claims"], json!({}));
    assert_eq!(events[3]["old_data"]["data"]["name"], "Ev");
    let text = serde_json::to_string(&events).unwrap();
    assert!(
        !text.contains("password") && !text.contains("argon2"),
        "{text}"
    );
}

async fn dropping_a_collection_emits_a_delete_per_document(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "doomed", json!({"rules": open_rules()})).await;
    for id in ["a", "b", "c"] {
        app.post(
            "/v1/db/doomed",
            Some(&admin),
            json!({"id": id, "data": {"k": id}}),
        )
        .await
        .assert_ok();
    }
    let start = last_position(&app).await;
    app.delete("/v1/admin/collections/doomed", Some(&admin))
        .await;
    let end = last_position(&app).await;
    settled(&app, end).await;
    let events = all_changes(&app, &admin, start, "db/doomed").await;
    let keys: Vec<&str> = events.iter().map(|e| e["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["a", "b", "c"]);
    assert!(events
        .iter()
        .all(|e| e["op"] == "delete" && e["data"].is_null()));
    assert_eq!(events[1]["old_data"]["data"]["k"], "b");
    assert_eq!(events[1]["old_data"]["version"], 1);
}

async fn concurrent_writers_are_seen_exactly_once_in_commit_order(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "busy", json!({"rules": open_rules()})).await;
    let start = last_position(&app).await;
    let mut bus = app.state.changes.subscribe();
    // A reader that resumes from the last position it saw, as a client of the endpoint
    // would, while the writers run: it must never later find anything below that position.
    let reader = {
        let (client, url, admin) = (
            app.client.clone(),
            app.url("/v1/admin/changes"),
            admin.clone(),
        );
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut after = start;
            let mut quiet = 0;
            while quiet < 40 {
                let body: Value = client
                    .get(format!("{url}?after={after}&limit=1000&topic=db/busy"))
                    .bearer_auth(&admin)
                    .send()
                    .await
                    .unwrap()
                    .json()
                    .await
                    .unwrap();
                let changes = body["changes"].as_array().unwrap();
                quiet = if changes.is_empty() { quiet + 1 } else { 0 };
                seen.extend(positions(changes));
                after = body["next_after"].as_i64().unwrap();
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            seen
        })
    };
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let (client, url, admin) = (app.client.clone(), app.url("/v1/db/busy"), admin.clone());
            tokio::spawn(async move {
                for i in 0..30 {
                    let status = client
                        .post(&url)
                        .bearer_auth(&admin)
                        .json(&json!({"id": format!("w{w}-{i}"), "data": {"w": w, "i": i}}))
                        .send()
                        .await
                        .unwrap()
                        .status();
                    assert_eq!(status, 201);
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let end = last_position(&app).await;
    settled(&app, end).await;
    let reader_saw = reader.await.unwrap();
    let all = positions(&all_changes(&app, &admin, start, "db/busy").await);
    assert_eq!(all.len(), 240, "one event per write");
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(
        reader_saw, all,
        "the resuming reader missed or repeated a position"
    );
    let mut published = Vec::new();
    while published.len() < all.len() {
        let e = tokio::time::timeout(Duration::from_secs(10), bus.recv())
            .await
            .expect("the bus delivers every event")
            .unwrap();
        if e.topic == "db/busy" {
            published.push(e.position);
        }
    }
    assert_eq!(published, all, "the bus delivered out of order or twice");
}

async fn durable_consumers_hold_retention_and_advance_by_compare_and_set(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.documents.change_retention_hours = 0).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "kept", json!({"rules": open_rules()})).await;
    let bus = &app.state.changes;
    settled(&app, last_position(&app).await).await;
    let consumer = bus.register_consumer("triggers").await.unwrap();
    // Registering again changes nothing.
    assert_eq!(
        bus.register_consumer("triggers").await.unwrap().position,
        consumer.position
    );
    for id in ["a", "b", "c"] {
        app.post("/v1/db/kept", Some(&admin), json!({"id": id, "data": {}}))
            .await
            .assert_ok();
    }
    settled(&app, last_position(&app).await).await;
    let batch = bus.next_for(&consumer, Some("db/kept"), 10).await.unwrap();
    assert_eq!(batch.len(), 3);
    // Retention of 0 hours, but the consumer has read none of it: nothing it needs goes.
    tokio::time::sleep(Duration::from_millis(20)).await;
    bus.prune(0).await.unwrap();
    assert_eq!(
        bus.next_for(&consumer, Some("db/kept"), 10).await.unwrap(),
        batch
    );
    // Two nodes handle the first event at once: exactly one advance wins.
    let first = batch[0].position;
    let (a, b) = tokio::join!(
        bus.advance("triggers", consumer.position, first),
        bus.advance("triggers", consumer.position, first)
    );
    assert!(a.unwrap() ^ b.unwrap(), "exactly one compare-and-set wins");
    let now = bus
        .consumers()
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.name == "triggers")
        .unwrap();
    assert_eq!(now.position, first);
    let rest = bus.next_for(&now, Some("db/kept"), 10).await.unwrap();
    assert_eq!(rest, batch[1..].to_vec());
    // Once it has read everything, retention may take it all.
    let last = batch[2].position;
    assert!(bus.advance("triggers", first, last).await.unwrap());
    bus.prune(0).await.unwrap();
    assert!(bus.read(last, None, 10).await.unwrap().is_empty());
    assert!(bus.remove_consumer("triggers").await.unwrap());
}

async fn a_position_older_than_the_retained_log_is_expired_not_a_gap(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.documents.change_retention_hours = 0).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "short", json!({"rules": open_rules()})).await;
    let start = last_position(&app).await;
    for id in ["a", "b"] {
        app.post("/v1/db/short", Some(&admin), json!({"id": id, "data": {}}))
            .await
            .assert_ok();
    }
    settled(&app, last_position(&app).await).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(app.state.changes.prune(0).await.unwrap() >= 2);
    let expired = app
        .get(&format!("/v1/admin/changes?after={start}"), Some(&admin))
        .await;
    let message = expired.assert_error(410, "cursor_expired");
    assert!(message.contains("older than the retained"), "{message}");
    let details = &expired.body["error"]["details"];
    assert!(details["oldest"].as_i64().unwrap() > start, "{details}");
    assert!(details["head"].as_i64().unwrap() >= details["oldest"].as_i64().unwrap() - 1);
    // Without `after`, reading starts at the oldest retained event instead.
    let from_start = app.get("/v1/admin/changes", Some(&admin)).await;
    from_start.assert_ok();
    assert!(from_start.body["head"].as_i64().unwrap() >= start);
    // From where the log now starts, reading goes on; the documents are untouched.
    let pruned_to = { app.state.store.pruned_through().await.unwrap() };
    app.get(
        &format!("/v1/admin/changes?after={pruned_to}"),
        Some(&admin),
    )
    .await
    .assert_ok();
    app.get("/v1/db/short/a", Some(&admin)).await.assert_ok();
}

async fn the_changes_endpoint_is_for_admins_and_checks_its_input(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    let (_, user, _) = app.user("nosy@example.com").await;
    app.get("/v1/admin/changes", None)
        .await
        .assert_error(401, "unauthenticated");
    app.get("/v1/admin/changes", Some(&user))
        .await
        .assert_error(403, "permission_denied");
    for (bad, field) in [
        ("after=-1", "after"),
        ("after=x", "after"),
        ("after=999999999", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=many", "limit"),
        // NUL cannot be stored in PostgreSQL text: the same 400 on both databases.
        ("topic=db/a%00", "topic"),
        ("topic=%0A", "topic"),
    ] {
        let reply = app
            .get(&format!("/v1/admin/changes?{bad}"), Some(&admin))
            .await;
        reply.assert_error(400, "invalid_argument");
        assert_eq!(reply.body["error"]["details"]["field"], field, "{bad}");
    }
    // A misspelt parameter is refused, not ignored.
    app.get("/v1/admin/changes?limt=5", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    // A topic is that topic and its subtopics; a trailing `/` is a family.
    for name in ["a", "acc"] {
        admin_collection(&app, &admin, name, json!({"rules": open_rules()})).await;
        app.post(
            &format!("/v1/db/{name}"),
            Some(&admin),
            json!({"id": "k", "data": {}}),
        )
        .await
        .assert_ok();
    }
    settled(&app, last_position(&app).await).await;
    let topics = |events: Vec<Value>| {
        events
            .iter()
            .map(|e| e["topic"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(topics(all_changes(&app, &admin, 0, "db/a").await), ["db/a"]);
    assert_eq!(
        topics(all_changes(&app, &admin, 0, "db/").await),
        ["db/a", "db/acc"]
    );
    let key = app
        .post("/v1/admin/keys", Some(&admin), json!({"name": "feed"}))
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_string();
    app.get("/v1/admin/changes?topic=db/", Some(&key))
        .await
        .assert_ok();
}

// ------------------------------------------------------------------------------------------
// Two server processes on one PostgreSQL database.

pub(crate) struct Node {
    pub(crate) child: std::process::Child,
    pub(crate) base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn basalt_cmd(database_url: &str, data_dir: &std::path::Path) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_basalt"));
    cmd.env("BASALT_DATABASE__URL", database_url)
        .env("BASALT_DATA_DIR", data_dir)
        .env("BASALT_LOG__LEVEL", "warn")
        .env("BASALT_AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("BASALT_AUTH__ARGON2_ITERATIONS", "1")
        // Only announcements can make delivery fast: the safety poll is a minute.
        .env("BASALT_CHANGES__POLL_INTERVAL_MS", "60000");
    cmd
}

/// `basalt keys create NAME` against the database; the key it prints on its last line.
pub(crate) fn create_service_key(
    database_url: &str,
    data_dir: &std::path::Path,
    name: &str,
) -> String {
    let out = basalt_cmd(database_url, data_dir)
        .args(["keys", "create", name])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

async fn start_node(database_url: &str, data_dir: &std::path::Path) -> Node {
    start_node_with(database_url, data_dir, &[]).await
}

/// Starts `basalt serve` on a free port with extra environment; waits until it is ready.
pub(crate) async fn start_node_with(
    database_url: &str,
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> Node {
    let port = free_port();
    let node = Node {
        child: basalt_cmd(database_url, data_dir)
            .envs(env.iter().copied())
            .arg("serve")
            .env("BASALT_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("basalt serve starts"),
        base: format!("http://127.0.0.1:{port}"),
    };
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client
            .get(format!("{}/ready", node.base))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return node;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("node on port {port} did not become ready");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_node_reaches_the_other_nodes_bus() {
    if !crate::helpers::postgres_available() {
        return;
    }
    let url = crate::helpers::fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let migrate = basalt_cmd(&url, dir.path())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let key = create_service_key(&url, dir.path(), "two-nodes");
    let (a, b) = tokio::join!(start_node(&url, dir.path()), start_node(&url, dir.path()));
    let client = reqwest::Client::new();
    let call = |node: &Node, method: Method, path: &str, body: Option<Value>| {
        let mut req = client
            .request(method, format!("{}{path}", node.base))
            .bearer_auth(&key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        req.send()
    };
    let put = call(
        &a,
        Method::PUT,
        "/v1/admin/collections/shared",
        Some(json!({"rules": {"read": "true"}})),
    )
    .await
    .unwrap();
    assert!(put.status().is_success());
    // Node B's position now, then a write through node A.
    let before: Value = call(&b, Method::GET, "/v1/admin/changes?topic=db/shared", None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let after = before["next_after"].as_i64().unwrap();
    // A node's events of `db/shared` since then.
    let shared_after = |node: &Node| {
        let page = call(
            node,
            Method::GET,
            &format!("/v1/admin/changes?after={after}&topic=db/shared"),
            None,
        );
        async move { page.await.unwrap().json::<Value>().await.unwrap() }
    };
    let created = call(
        &a,
        Method::POST,
        "/v1/db/shared",
        Some(json!({"id": "from-a", "data": {"hello": "b"}})),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    // Node B serves the log only up to what its own bus has delivered: seeing the event
    // there means B's tailer was woken (its safety poll is a minute away) and read it.
    let mut found = None;
    for _ in 0..100 {
        let page = shared_after(&b).await;
        if let Some(e) = page["changes"].as_array().and_then(|c| c.first()) {
            found = Some(e.clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let event = found.expect("node B saw node A's write within 5 s");
    assert_eq!(event["key"], "from-a");
    assert_eq!(event["data"]["data"]["hello"], "b");
    assert_eq!(event["actor"]["type"], "service");
    // And the other way round, with positions still in one order across both nodes.
    let created = call(
        &b,
        Method::POST,
        "/v1/db/shared",
        Some(json!({"id": "from-b", "data": {}})),
    )
    .await
    .unwrap();
    assert_eq!(created.status(), 201);
    let mut keys = BTreeSet::new();
    for _ in 0..100 {
        let page = shared_after(&a).await;
        let changes = page["changes"].as_array().unwrap();
        keys = changes
            .iter()
            .map(|e| e["key"].as_str().unwrap().to_string())
            .collect();
        if keys.len() == 2 {
            assert!(positions(changes).windows(2).all(|w| w[0] < w[1]));
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        keys,
        BTreeSet::from(["from-a".to_string(), "from-b".to_string()])
    );
}

/// The commit-order protocol against transactions interleaved by hand: a position taken
/// early and committed late holds back every later one; a rolled-back one does not forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_delivers_positions_in_commit_order_not_insert_order() {
    use sqlx::Connection;
    if !crate::helpers::postgres_available() {
        return;
    }
    let app = spawn_app(Backend::Postgres).await;
    let url = app.database_url();
    let mut bus = app.state.changes.subscribe();
    // The append statement's shape: the shared "appending" lock first, then the position.
    async fn append(conn: &mut sqlx::PgConnection, key: &str) -> i64 {
        sqlx::query_scalar(
            "WITH x AS (SELECT pg_advisory_xact_lock_shared(1651731572, 1) AS locked,
                               pg_current_xact_id() AS xid)
             INSERT INTO events (position, xid, topic, key, op, actor_type, actor_id, time)
             SELECT nextval('events_position_seq'), x.xid, 'db/manual', $1, 'create', 'system', 'test', now()
             FROM x RETURNING position",
        )
        .bind(key)
        .fetch_one(conn)
        .await
        .unwrap()
    }
    // What a node does after committing: wake every node's tailer.
    async fn announce(conn: &mut sqlx::PgConnection) {
        sqlx::query("SELECT pg_notify('basalt_events', '')")
            .execute(conn)
            .await
            .unwrap();
    }
    let mut early = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut late = sqlx::PgConnection::connect(&url).await.unwrap();
    // The transaction that commits second takes its transaction id first: its id is then
    // below the other's, and a snapshot taken after it commits does not list the other as
    // running (its id is past the snapshot's xmax). Only the "appending" lock tells.
    sqlx::query("BEGIN").execute(&mut late).await.unwrap();
    sqlx::query("SELECT pg_current_xact_id()")
        .execute(&mut late)
        .await
        .unwrap();
    sqlx::query("BEGIN").execute(&mut early).await.unwrap();
    let first = append(&mut early, "first").await;
    let second = append(&mut late, "second").await;
    assert!(first < second);
    sqlx::query("COMMIT").execute(&mut late).await.unwrap();
    announce(&mut late).await;
    // The second position is committed and visible, but the first may still come: nothing
    // is delivered and the watermark stays below the first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app.state.changes.watermark() < first);
    assert!(
        matches!(
            bus.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "a later position was delivered before an earlier one committed"
    );
    sqlx::query("COMMIT").execute(&mut early).await.unwrap();
    announce(&mut early).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(5), bus.recv())
            .await
            .expect("both are delivered once the first commits")
            .unwrap();
        got.push((e.position, e.key.clone()));
    }
    assert_eq!(
        got,
        vec![(first, "first".into()), (second, "second".into())]
    );
    // A position whose transaction rolls back is a hole that is skipped once it is known
    // to be final.
    sqlx::query("BEGIN").execute(&mut early).await.unwrap();
    let doomed = append(&mut early, "doomed").await;
    sqlx::query("BEGIN").execute(&mut late).await.unwrap();
    let after = append(&mut late, "after").await;
    sqlx::query("COMMIT").execute(&mut late).await.unwrap();
    announce(&mut late).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(app.state.changes.watermark() < doomed);
    sqlx::query("ROLLBACK").execute(&mut early).await.unwrap();
    announce(&mut early).await;
    let e = tokio::time::timeout(Duration::from_secs(5), bus.recv())
        .await
        .expect("the event after the hole is delivered")
        .unwrap();
    assert_eq!((e.position, e.key.as_str()), (after, "after"));
    let mut watch = app.state.changes.watch();
    tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|w| *w >= after))
        .await
        .unwrap()
        .unwrap();
    // A reader of the log sees the same, and nothing of the rolled-back one.
    let admin = app.admin_token().await;
    let seen = all_changes(&app, &admin, first - 1, "db/manual").await;
    assert_eq!(positions(&seen), vec![first, second, after]);
}
