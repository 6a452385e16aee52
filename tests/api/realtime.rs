//! API.md § Realtime over a real WebSocket (tokio-tungstenite): snapshots then changes,
//! query windows, the read rule on every event, resume without loss or repeat, reset past
//! retention, slow consumers, bad input, token expiry, channels with presence, limits.

use std::collections::HashSet;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

use crate::documents::admin_collection;
use crate::helpers::{spawn_app, spawn_app_with, Backend, TestApp};
use crate::store_tests;

store_tests!(
    a_document_subscription_gets_a_snapshot_then_each_change,
    a_query_window_follows_documents_entering_and_leaving,
    the_read_rule_filters_every_event,
    a_rule_with_lookups_is_checked_per_event,
    resume_replays_exactly_the_missed_changes,
    resume_past_the_retained_log_is_a_reset,
    a_burst_that_overflows_the_inbox_loses_nothing,
    a_client_that_does_not_read_is_closed_with_4008,
    bad_messages_get_errors_and_subscriptions_live_on,
    an_expired_token_ends_subscriptions_with_an_error,
    a_socket_that_says_nothing_is_closed,
    channels_join_broadcast_and_presence,
    subscriptions_are_limited_and_checked,
    new_rules_reach_open_subscriptions,
    a_signed_out_session_ends_its_subscriptions,
    large_documents_negative_zero_and_time_rules,
);

type Stream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A realtime client, as a mobile app would write one.
pub struct Ws {
    stream: Stream,
}

/// Generous: CI machines have two cores and run many servers at once.
const WAIT: Duration = Duration::from_secs(20);

impl Ws {
    pub async fn connect(base: &str) -> Ws {
        let url = format!("{}/v1/realtime", base.replace("http://", "ws://"));
        let (stream, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("websocket connects");
        Ws { stream }
    }

    pub async fn send(&mut self, message: Value) {
        self.stream
            .send(Message::Text(message.to_string().into()))
            .await
            .expect("send");
    }

    async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send");
    }

    /// The next JSON message (pings are skipped); panics on close or after 10 s.
    pub async fn recv(&mut self) -> Value {
        loop {
            let frame = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("a message within 20 s")
                .expect("the socket is open")
                .expect("a frame");
            match frame {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Nothing arrives for `ms`.
    async fn silent(&mut self, ms: u64) {
        match tokio::time::timeout(Duration::from_millis(ms), self.stream.next()).await {
            Err(_) => {}
            Ok(Some(Ok(Message::Ping(_)))) => {}
            Ok(other) => panic!("expected silence, got {other:?}"),
        }
    }

    /// Reads until the server closes; the close code.
    async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("closed within 20 s")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn auth(&mut self, token: &str) -> Value {
        self.send(json!({"type": "auth", "token": token})).await;
        let reply = self.recv().await;
        assert_eq!(reply["type"], "authenticated", "{reply}");
        reply
    }

    /// Subscribes and answers the first message (snapshot, changes or error).
    pub async fn subscribe(&mut self, id: &str, collection: &str, what: Value) -> Value {
        let mut message = json!({"type": "subscribe", "id": id, "collection": collection});
        for (k, v) in what.as_object().unwrap() {
            message[k] = v.clone();
        }
        self.send(message).await;
        self.recv().await
    }
}

fn ws_base(app: &TestApp) -> String {
    format!("http://{}", app.addr)
}

/// `[(type, id)]` of a `changes` message.
fn kinds(message: &Value) -> Vec<(String, String)> {
    assert_eq!(message["type"], "changes", "{message}");
    message["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap().to_string(),
                c["document"]["id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn ids(snapshot: &Value) -> Vec<String> {
    assert_eq!(snapshot["type"], "snapshot", "{snapshot}");
    snapshot["documents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

fn open_rules() -> Value {
    json!({"read": "true", "create": "true", "update": "true", "delete": "true"})
}

async fn write(app: &TestApp, token: &str, method: Method, path: &str, body: Option<Value>) {
    let r = app.send(method, path, Some(token), body).await;
    r.assert_ok();
}

async fn a_document_subscription_gets_a_snapshot_then_each_change(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "notes", json!({"rules": open_rules()})).await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/notes",
        Some(json!({"id": "a", "data": {"t": 1}})),
    )
    .await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.recv().await, json!({"type": "pong"}));
    let snap = ws.subscribe("s1", "notes", json!({"doc": "a"})).await;
    assert_eq!(ids(&snap), ["a"]);
    assert_eq!(snap["id"], "s1");
    assert_eq!(snap["documents"][0]["data"], json!({"t": 1}));
    let first_cursor = snap["cursor"].as_str().unwrap().to_string();
    // Another document changing says nothing to this subscription.
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/notes",
        Some(json!({"id": "b", "data": {}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/notes/a",
        Some(json!({"data": {"t": 2}})),
    )
    .await;
    let m = ws.recv().await;
    assert_eq!(kinds(&m), [("modified".to_string(), "a".to_string())]);
    assert_eq!(m["changes"][0]["document"]["version"], 2);
    assert_eq!(m["changes"][0]["document"]["data"]["t"], 2);
    let cursor = m["cursor"].as_str().unwrap();
    assert_ne!(cursor, first_cursor);
    assert!(cursor.len() < 64, "cursors are short and opaque");
    write(&app, &admin, Method::DELETE, "/v1/db/notes/a", None).await;
    assert_eq!(kinds(&ws.recv().await), [("removed".into(), "a".into())]);
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/notes",
        Some(json!({"id": "a", "data": {"again": true}})),
    )
    .await;
    let m = ws.recv().await;
    assert_eq!(kinds(&m), [("added".into(), "a".into())]);
    assert_eq!(m["changes"][0]["document"]["version"], 1);
    // A document that does not exist yet: an empty snapshot, then its creation.
    let snap = ws.subscribe("s2", "notes", json!({"doc": "later"})).await;
    assert_eq!(ids(&snap), Vec::<String>::new());
    write(
        &app,
        &admin,
        Method::PUT,
        "/v1/db/notes/later",
        Some(json!({"data": {}})),
    )
    .await;
    let m = ws.recv().await;
    assert_eq!(m["id"], "s2");
    assert_eq!(kinds(&m), [("added".into(), "later".into())]);
    ws.send(json!({"type": "unsubscribe", "id": "s2"})).await;
    assert_eq!(ws.recv().await, json!({"type": "unsubscribed", "id": "s2"}));
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/notes/later",
        Some(json!({"data": {"x": 1}})),
    )
    .await;
    ws.silent(300).await;
    // Metrics count what happened.
    let metrics = app.get("/metrics", Some(&admin)).await.text;
    for name in [
        "basalt_realtime_connections",
        "basalt_realtime_subscriptions",
        "basalt_realtime_events_sent_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    // Not a WebSocket request: an error in the envelope.
    app.get("/v1/realtime", None)
        .await
        .assert_error(400, "invalid_argument");
}

async fn a_query_window_follows_documents_entering_and_leaving(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "scores", json!({"rules": open_rules()})).await;
    for (id, score, game) in [
        ("a", 50, "x"),
        ("b", 40, "x"),
        ("c", 30, "x"),
        ("d", 90, "y"),
    ] {
        write(
            &app,
            &admin,
            Method::POST,
            "/v1/db/scores",
            Some(json!({"id": id, "data": {"score": score, "game": game}})),
        )
        .await;
    }
    let mut ws = Ws::connect(&ws_base(&app)).await;
    let snap = ws
        .subscribe(
            "top",
            "scores",
            json!({"query": {"where": ["game", "==", "x"], "order_by": [["score", "desc"]], "limit": 2}}),
        )
        .await;
    assert_eq!(ids(&snap), ["a", "b"]);
    // e enters at the top: b is pushed out.
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/scores",
        Some(json!({"id": "e", "data": {"score": 60, "game": "x"}})),
    )
    .await;
    assert_eq!(
        kinds(&ws.recv().await),
        [("removed".into(), "b".into()), ("added".into(), "e".into())]
    );
    // a drops below b: a leaves, b comes back.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/scores/a",
        Some(json!({"data": {"score": 35}})),
    )
    .await;
    assert_eq!(
        kinds(&ws.recv().await),
        [("removed".into(), "a".into()), ("added".into(), "b".into())]
    );
    // e moves within the window: modified.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/scores/e",
        Some(json!({"data": {"score": 61}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("modified".into(), "e".into())]);
    // e leaves the game (no longer matches the where): a (35) is the next one down.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/scores/e",
        Some(json!({"data": {"game": "y"}})),
    )
    .await;
    assert_eq!(
        kinds(&ws.recv().await),
        [("removed".into(), "e".into()), ("added".into(), "a".into())]
    );
    // Changes outside the where or below the window say nothing.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/scores/d",
        Some(json!({"data": {"score": 99}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/scores/c",
        Some(json!({"data": {"score": 31}})),
    )
    .await;
    ws.silent(300).await;
    // Emptying the window: c (31) comes in as a leaves, then everything goes.
    write(&app, &admin, Method::DELETE, "/v1/db/scores/a", None).await;
    assert_eq!(
        kinds(&ws.recv().await),
        [("removed".into(), "a".into()), ("added".into(), "c".into())]
    );
    write(&app, &admin, Method::DELETE, "/v1/db/scores/b", None).await;
    assert_eq!(kinds(&ws.recv().await), [("removed".into(), "b".into())]);
    write(&app, &admin, Method::DELETE, "/v1/db/scores/c", None).await;
    assert_eq!(kinds(&ws.recv().await), [("removed".into(), "c".into())]);
    ws.silent(300).await;
    // Many documents: a window of 3 over 120, drained from the top one by one, always shows
    // the next three (the refill path).
    for i in 0..120 {
        write(
            &app,
            &admin,
            Method::POST,
            "/v1/db/scores",
            Some(json!({"id": format!("m{i:03}"), "data": {"score": i, "game": "z"}})),
        )
        .await;
    }
    let snap = ws
        .subscribe(
            "many",
            "scores",
            json!({"query": {"where": ["game", "==", "z"], "order_by": [["score", "desc"]], "limit": 3}}),
        )
        .await;
    assert_eq!(ids(&snap), ["m119", "m118", "m117"]);
    let mut window: Vec<String> = ids(&snap);
    for i in (60..120).rev() {
        write(
            &app,
            &admin,
            Method::DELETE,
            &format!("/v1/db/scores/m{i:03}"),
            None,
        )
        .await;
        // One message per change, the window refilled within it when it ran short.
        let m = ws.recv().await;
        for (kind, id) in kinds(&m) {
            match kind.as_str() {
                "removed" => window.retain(|w| *w != id),
                "added" => window.push(id),
                other => panic!("{other}"),
            }
        }
        window.sort();
        window.reverse();
        let expected: Vec<String> = (i - 3..i).rev().map(|j| format!("m{j:03}")).collect();
        assert_eq!(window, expected, "after deleting m{i:03}");
    }
}

async fn the_read_rule_filters_every_event(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "posts",
        json!({"rules": {
            "read": "resource.data.public == true || (auth != null && resource.data.owner == auth.uid)",
            "create": "true", "update": "true", "delete": "true"}}),
    )
    .await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (bob, _, _) = app.user("bob@example.com").await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.auth(&alice_token).await;
    let mut anon = Ws::connect(&ws_base(&app)).await;
    let query = json!({"query": {"order_by": [["$created_at", "asc"]], "limit": 100}});
    assert_eq!(
        ids(&ws.subscribe("all", "posts", query.clone()).await),
        Vec::<String>::new()
    );
    assert_eq!(
        ids(&anon.subscribe("all", "posts", query).await),
        Vec::<String>::new()
    );
    // A document of Bob's, private: neither sees it.
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/posts",
        Some(json!({"id": "p1", "data": {"owner": bob, "public": false}})),
    )
    .await;
    // Alice's own: she sees it, the anonymous client does not.
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/posts",
        Some(json!({"id": "p2", "data": {"owner": alice, "public": false}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("added".into(), "p2".into())]);
    // Bob's becomes public: both see it appear.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/posts/p1",
        Some(json!({"data": {"public": true}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("added".into(), "p1".into())]);
    assert_eq!(kinds(&anon.recv().await), [("added".into(), "p1".into())]);
    // And private again: removed for both.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/posts/p1",
        Some(json!({"data": {"public": false}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("removed".into(), "p1".into())]);
    let m = anon.recv().await;
    assert_eq!(kinds(&m), [("removed".into(), "p1".into())]);
    // A removed document shows what the subscriber last saw, not what it became.
    assert_eq!(m["changes"][0]["document"]["data"]["public"], true);
    // Alice's post given to Bob: removed for her.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/posts/p2",
        Some(json!({"data": {"owner": bob}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("removed".into(), "p2".into())]);
    anon.silent(200).await;
    // A document subscription to something unreadable: empty, and silent when it changes.
    let snap = anon.subscribe("one", "posts", json!({"doc": "p2"})).await;
    assert_eq!(ids(&snap), Vec::<String>::new());
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/posts/p2",
        Some(json!({"data": {"secret": "s"}})),
    )
    .await;
    anon.silent(300).await;
    ws.silent(100).await;
}

async fn a_rule_with_lookups_is_checked_per_event(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "teams", json!({"rules": open_rules()})).await;
    admin_collection(
        &app,
        &admin,
        "docs",
        json!({"rules": {
            "read": "auth != null && auth.uid in get('teams', resource.data.team).data.members",
            "create": "true", "update": "true", "delete": "true"}}),
    )
    .await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/teams",
        Some(json!({"id": "red", "data": {"members": [alice]}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/teams",
        Some(json!({"id": "blue", "data": {"members": []}})),
    )
    .await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.auth(&alice_token).await;
    let snap = ws
        .subscribe("d", "docs", json!({"query": {"limit": 10}}))
        .await;
    assert_eq!(ids(&snap), Vec::<String>::new());
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/docs",
        Some(json!({"id": "b1", "data": {"team": "blue"}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/docs",
        Some(json!({"id": "r1", "data": {"team": "red"}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("added".into(), "r1".into())]);
    ws.silent(200).await;
}

async fn resume_replays_exactly_the_missed_changes(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "tasks", json!({"rules": open_rules()})).await;
    for i in 0..4 {
        write(
            &app,
            &admin,
            Method::POST,
            "/v1/db/tasks",
            Some(json!({"id": format!("t{i}"), "data": {"n": i, "done": false}})),
        )
        .await;
    }
    let query =
        json!({"query": {"where": ["done", "==", false], "order_by": [["n", "asc"]], "limit": 3}});
    // A client that stays connected throughout: what live looks like.
    let mut live = Ws::connect(&ws_base(&app)).await;
    assert_eq!(
        ids(&live.subscribe("q", "tasks", query.clone()).await),
        ["t0", "t1", "t2"]
    );
    // A client that drops after its snapshot.
    let mut ws = Ws::connect(&ws_base(&app)).await;
    let snap = ws.subscribe("q", "tasks", query.clone()).await;
    assert_eq!(ids(&snap), ["t0", "t1", "t2"]);
    let cursor = snap["cursor"].as_str().unwrap().to_string();
    drop(ws);
    // While it is away.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/tasks/t0",
        Some(json!({"data": {"done": true}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/tasks/t1",
        Some(json!({"data": {"title": "x"}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/tasks/t1",
        Some(json!({"data": {"title": "y"}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/tasks",
        Some(json!({"id": "t9", "data": {"n": -1, "done": false}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/tasks",
        Some(json!({"id": "tmp", "data": {"n": -5, "done": false}})),
    )
    .await;
    write(&app, &admin, Method::DELETE, "/v1/db/tasks/tmp", None).await;
    // t0 leaves (t3 in), t1 twice, t9 in (t3 out), tmp in (t2 out), tmp out (t2 back).
    let mut expected = Vec::new();
    while expected.len() < 10 {
        expected.extend(kinds(&live.recv().await));
    }
    live.silent(200).await;
    // Back, with the cursor: the same changes, in the same order, once.
    let mut ws = Ws::connect(&ws_base(&app)).await;
    let mut got = kinds(
        &ws.subscribe(
            "q",
            "tasks",
            json!({"query": query["query"].clone(), "resume": cursor}),
        )
        .await,
    );
    while got.len() < expected.len() {
        got.extend(kinds(&ws.recv().await));
    }
    assert_eq!(got, expected);
    ws.silent(200).await;
    // And it is live afterwards.
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/tasks/t9",
        Some(json!({"data": {"done": true}})),
    )
    .await;
    let m = ws.recv().await;
    assert_eq!(kinds(&m), kinds(&live.recv().await));
    let cursor = m["cursor"].as_str().unwrap().to_string();
    // Resuming with nothing missed: an empty changes message says it is live.
    drop(ws);
    let mut ws = Ws::connect(&ws_base(&app)).await;
    let m = ws
        .subscribe(
            "q",
            "tasks",
            json!({"query": query["query"].clone(), "resume": cursor}),
        )
        .await;
    assert_eq!(kinds(&m), Vec::<(String, String)>::new());
    // A forged cursor is refused.
    let m = ws
        .subscribe(
            "q2",
            "tasks",
            json!({"doc": "t1", "resume": "AAAAAAAAAAAAAAAAAAAAAAAAAAA"}),
        )
        .await;
    assert_eq!(m["type"], "error");
    assert_eq!(m["id"], "q2");
    assert_eq!(m["error"]["code"], "invalid_argument");
}

async fn resume_past_the_retained_log_is_a_reset(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.documents.change_retention_hours = 0).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "old", json!({"rules": open_rules()})).await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/old",
        Some(json!({"id": "a", "data": {}})),
    )
    .await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    let snap = ws.subscribe("s", "old", json!({"query": {}})).await;
    let cursor = snap["cursor"].as_str().unwrap().to_string();
    drop(ws);
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/old",
        Some(json!({"id": "b", "data": {}})),
    )
    .await;
    write(&app, &admin, Method::DELETE, "/v1/db/old/a", None).await;
    let mut watermark = app.state.changes.watch();
    let last = app.state.changes.last_position().await.unwrap();
    tokio::time::timeout(WAIT, watermark.wait_for(|w| *w >= last))
        .await
        .unwrap()
        .unwrap();
    app.state.changes.prune(0).await.unwrap();
    let mut ws = Ws::connect(&ws_base(&app)).await;
    let m = ws
        .subscribe("s", "old", json!({"query": {}, "resume": cursor}))
        .await;
    assert_eq!(m["type"], "snapshot", "{m}");
    assert_eq!(m["reset"], true);
    assert_eq!(ids(&m), ["b"]);
}

async fn a_burst_that_overflows_the_inbox_loses_nothing(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.realtime.event_queue = 2).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "burst", json!({"rules": open_rules()})).await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.subscribe("s", "burst", json!({"query": {"limit": 1000}}))
        .await;
    for round in 0..3 {
        let writes: Vec<Value> = (0..100)
            .map(|i| json!({"op": "create", "collection": "burst", "id": format!("r{round}-{i}"), "data": {"i": i}}))
            .collect();
        write(
            &app,
            &admin,
            Method::POST,
            "/v1/db/_batch",
            Some(json!({"writes": writes})),
        )
        .await;
    }
    let mut seen = Vec::new();
    while seen.len() < 300 {
        for (kind, id) in kinds(&ws.recv().await) {
            assert_eq!(kind, "added");
            seen.push(id);
        }
    }
    let unique: HashSet<&String> = seen.iter().collect();
    assert_eq!(unique.len(), 300, "every change once");
    ws.silent(300).await;
}

async fn a_client_that_does_not_read_is_closed_with_4008(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.realtime.send_queue = 4;
        c.documents.max_document_bytes = 1 << 20;
    })
    .await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "big", json!({"rules": open_rules()})).await;
    let mut slow = Ws::connect(&ws_base(&app)).await;
    slow.subscribe("s", "big", json!({"query": {}})).await;
    let mut fine = Ws::connect(&ws_base(&app)).await;
    fine.subscribe("s", "big", json!({"doc": "last"})).await;
    // The slow client reads a message a second while about 50 MB is written for it, then
    // (the writes done) reads on quickly to its close.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                if !done.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                match slow.stream.next().await {
                    Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                    Some(Ok(_)) => continue,
                    Some(Err(_)) | None => return None,
                }
            }
        })
    };
    let blob = "x".repeat(500_000);
    for i in 0..100 {
        write(
            &app,
            &admin,
            Method::PUT,
            &format!("/v1/db/big/d{}", i % 10),
            Some(json!({"data": {"blob": blob}})),
        )
        .await;
    }
    write(
        &app,
        &admin,
        Method::PUT,
        "/v1/db/big/last",
        Some(json!({"data": {}})),
    )
    .await;
    assert_eq!(kinds(&fine.recv().await), [("added".into(), "last".into())]);
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let code = tokio::time::timeout(Duration::from_secs(30), slow)
        .await
        .expect("the slow client is closed");
    assert_eq!(code.unwrap(), Some(4008));
    let metrics = app.get("/metrics", Some(&admin)).await.text;
    assert!(metrics.contains("basalt_realtime_slow_consumers_total"));
}

async fn bad_messages_get_errors_and_subscriptions_live_on(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.realtime.max_message_bytes = 4096).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "c", json!({"rules": open_rules()})).await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.subscribe("s", "c", json!({"query": {}})).await;
    let expect_error = |m: Value, code: &str| {
        assert_eq!(m["type"], "error", "{m}");
        assert_eq!(m["error"]["code"], code, "{m}");
        assert!(m["error"]["message"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
    };
    ws.send_raw(Message::Text("{not json".into())).await;
    expect_error(ws.recv().await, "invalid_argument");
    ws.send(json!({"type": "dance"})).await;
    expect_error(ws.recv().await, "invalid_argument");
    ws.send(json!({"no": "type"})).await;
    expect_error(ws.recv().await, "invalid_argument");
    ws.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    expect_error(ws.recv().await, "invalid_argument");
    ws.send(json!({"type": "subscribe", "id": "x", "collection": "c", "query": {"where": ["a", "~", 1]}})).await;
    let m = ws.recv().await;
    assert_eq!(m["id"], "x");
    expect_error(m, "invalid_argument");
    ws.send(json!({"type": "subscribe", "id": "x", "collection": "c", "query": {"select": ["a"]}}))
        .await;
    expect_error(ws.recv().await, "invalid_argument");
    ws.send(json!({"type": "subscribe", "id": "x", "collection": "../etc", "doc": "a"}))
        .await;
    expect_error(ws.recv().await, "invalid_argument");
    ws.send(json!({"type": "subscribe", "id": "x", "collection": "nope", "doc": "a"}))
        .await;
    expect_error(ws.recv().await, "not_found");
    ws.send(json!({"type": "subscribe", "id": "s", "collection": "c", "doc": "a"}))
        .await;
    expect_error(ws.recv().await, "already_exists");
    ws.send(json!({"type": "unsubscribe", "id": "missing"}))
        .await;
    expect_error(ws.recv().await, "not_found");
    ws.send(json!({"type": "auth", "token": "not a token"}))
        .await;
    expect_error(ws.recv().await, "unauthenticated");
    // Deep nesting is an error like any other.
    let deep = "[".repeat(1000) + &"]".repeat(1000);
    ws.send_raw(Message::Text(
        format!(r#"{{"type":"join","channel":"a","presence":{deep}}}"#).into(),
    ))
    .await;
    expect_error(ws.recv().await, "invalid_argument");
    // Over the message limit: an error, the message dropped.
    ws.send(json!({"type": "ping", "pad": "x".repeat(5000)}))
        .await;
    expect_error(ws.recv().await, "payload_too_large");
    // After all that, the subscription still works.
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/c",
        Some(json!({"id": "after", "data": {}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("added".into(), "after".into())]);
    // Far over the limit: the connection is closed (1009), and others are untouched.
    let mut other = Ws::connect(&ws_base(&app)).await;
    other.subscribe("s", "c", json!({"doc": "z"})).await;
    ws.send_raw(Message::Text("x".repeat(20_000).into())).await;
    assert_eq!(ws.closed().await, Some(u16::from(CloseCode::Size)));
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/c",
        Some(json!({"id": "z", "data": {}})),
    )
    .await;
    assert_eq!(kinds(&other.recv().await), [("added".into(), "z".into())]);
}

async fn an_expired_token_ends_subscriptions_with_an_error(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.auth.access_token_ttl_secs = 3).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "c",
        json!({"rules": {"read": "auth != null"}}),
    )
    .await;
    let (uid, token, refresh) = app.user("eve@example.com").await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    let hello = ws.auth(&token).await;
    assert_eq!(hello["uid"], uid);
    assert_eq!(hello["role"], "authenticated");
    ws.subscribe("s", "c", json!({"query": {}})).await;
    // A refreshed token for the same user: nothing is interrupted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let fresh = app.refresh(&refresh).await;
    let token2 = fresh.assert_ok()["session"]["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    ws.auth(&token2).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/c",
        Some(json!({"id": "a", "data": {}})),
    )
    .await;
    assert_eq!(kinds(&ws.recv().await), [("added".into(), "a".into())]);
    // The second token runs out: the subscription ends with an error, the socket stays.
    let m = ws.recv().await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["id"], "s");
    assert_eq!(m["error"]["code"], "unauthenticated");
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/c",
        Some(json!({"id": "b", "data": {}})),
    )
    .await;
    ws.silent(300).await;
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.recv().await["type"], "pong");
    // Anonymous now: the rule filters everything out, as a query would.
    let m = ws.subscribe("s", "c", json!({"query": {}})).await;
    assert_eq!(ids(&m), Vec::<String>::new());
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/c",
        Some(json!({"id": "c", "data": {}})),
    )
    .await;
    ws.silent(300).await;
}

async fn a_socket_that_says_nothing_is_closed(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.realtime.hello_timeout_secs = 1).await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    assert_eq!(ws.closed().await, Some(1008));
    // Anything valid in time keeps it open.
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.send(json!({"type": "ping"})).await;
    ws.recv().await;
    ws.silent(1500).await;
    // A client's close is answered with a close (a clean close, not 1006).
    ws.stream.close(None).await.unwrap();
    let answer = tokio::time::timeout(WAIT, ws.stream.next()).await.unwrap();
    assert!(
        matches!(answer, Some(Ok(Message::Close(_)))),
        "the server answers a close: {answer:?}"
    );
}

async fn channels_join_broadcast_and_presence(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.realtime.channels.join = Some("auth != null".into());
        c.realtime.channels.broadcast = Some("auth != null && channel.startsWith('room')".into());
    })
    .await;
    let (u1, t1, _) = app.user("one@example.com").await;
    let (u2, t2, _) = app.user("two@example.com").await;
    let mut a = Ws::connect(&ws_base(&app)).await;
    a.auth(&t1).await;
    let mut b = Ws::connect(&ws_base(&app)).await;
    b.auth(&t2).await;
    a.send(json!({"type": "join", "channel": "room1", "presence": {"name": "one"}}))
        .await;
    let state = a.recv().await;
    assert_eq!(state["type"], "presence");
    assert_eq!(state["channel"], "room1");
    let a_key = state["key"].as_str().unwrap().to_string();
    assert_eq!(state["state"].as_array().unwrap().len(), 1);
    assert_eq!(state["state"][0]["uid"], u1);
    assert_eq!(state["state"][0]["presence"]["name"], "one");
    b.send(json!({"type": "join", "channel": "room1", "presence": {"name": "two"}}))
        .await;
    let state = b.recv().await;
    assert_eq!(state["state"].as_array().unwrap().len(), 2);
    let joined = a.recv().await;
    assert_eq!(joined["joins"][0]["uid"], u2);
    assert_eq!(joined["leaves"], json!([]));
    // Broadcasts reach the others, not the sender.
    b.send(json!({"type": "broadcast", "channel": "room1", "event": "move", "payload": {"x": 1}}))
        .await;
    let m = a.recv().await;
    assert_eq!(
        m,
        json!({"type": "broadcast", "channel": "room1", "event": "move", "payload": {"x": 1}, "from": state["key"]})
    );
    b.silent(200).await;
    // Rules: anonymous may not join; broadcasting on a non-room channel is denied; one must
    // join before broadcasting.
    let mut anon = Ws::connect(&ws_base(&app)).await;
    anon.send(json!({"type": "join", "channel": "room1"})).await;
    let m = anon.recv().await;
    assert_eq!(m["error"]["code"], "permission_denied");
    assert_eq!(m["channel"], "room1");
    a.send(json!({"type": "join", "channel": "lobby"})).await;
    a.recv().await;
    a.send(json!({"type": "broadcast", "channel": "lobby", "event": "e"}))
        .await;
    assert_eq!(a.recv().await["error"]["code"], "permission_denied");
    a.send(json!({"type": "broadcast", "channel": "room2", "event": "e"}))
        .await;
    assert_eq!(a.recv().await["error"]["code"], "failed_precondition");
    // Presence is small; broadcasts are rate limited per connection.
    let big = "p".repeat(2000);
    b.send(json!({"type": "join", "channel": "room1", "presence": {"big": big}}))
        .await;
    assert_eq!(b.recv().await["error"]["code"], "invalid_argument");
    let mut limited = false;
    for i in 0..150 {
        b.send(json!({"type": "broadcast", "channel": "room1", "event": "spam", "payload": i}))
            .await;
    }
    b.send(json!({"type": "ping"})).await;
    loop {
        let m = b.recv().await;
        if m["type"] == "pong" {
            break;
        }
        if m["error"]["code"] == "rate_limited" {
            limited = true;
        }
    }
    assert!(limited, "150 broadcasts at once are rate limited");
    let mut received = 0;
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(500), a.recv()).await {
        assert_eq!(next["event"], "spam");
        received += 1;
    }
    assert!(
        (100..150).contains(&received),
        "{received} broadcasts passed"
    );
    // Leaving: the others see it; a closed socket leaves too.
    a.send(json!({"type": "leave", "channel": "room1"})).await;
    assert_eq!(a.recv().await, json!({"type": "left", "channel": "room1"}));
    let left = b.recv().await;
    assert_eq!(left["leaves"][0]["key"], a_key.as_str());
    a.send(json!({"type": "join", "channel": "room1"})).await;
    a.recv().await;
    b.recv().await;
    drop(a);
    let left = b.recv().await;
    assert_eq!(left["leaves"][0]["key"], a_key.as_str());
}

async fn subscriptions_are_limited_and_checked(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.realtime.max_subscriptions_per_connection = 2).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "open", json!({"rules": open_rules()})).await;
    admin_collection(&app, &admin, "closed", json!({"rules": {}})).await;
    let (_, token, _) = app.user("u@example.com").await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.auth(&token).await;
    let m = ws.subscribe("x", "closed", json!({"query": {}})).await;
    assert_eq!(m["error"]["code"], "permission_denied");
    ws.subscribe("a", "open", json!({"doc": "1"})).await;
    ws.subscribe("b", "open", json!({"doc": "2"})).await;
    let m = ws.subscribe("c", "open", json!({"doc": "3"})).await;
    assert_eq!(m["error"]["code"], "invalid_argument");
    assert_eq!(m["id"], "c");
    // Admins and service keys read everything.
    let mut adm = Ws::connect(&ws_base(&app)).await;
    assert_eq!(adm.auth(&admin).await["role"], "admin");
    let m = adm.subscribe("x", "closed", json!({"query": {}})).await;
    assert_eq!(m["type"], "snapshot");
}

async fn new_rules_reach_open_subscriptions(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.realtime.heartbeat_secs = 1).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "flip", json!({"rules": open_rules()})).await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/flip",
        Some(json!({"id": "a", "data": {}})),
    )
    .await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    assert_eq!(
        ids(&ws.subscribe("s", "flip", json!({"query": {}})).await),
        ["a"]
    );
    // No rule change: no reset at the next heartbeats (the definition just written and the
    // one read back differ only in their timestamps' precision).
    ws.silent(2500).await;
    admin_collection(&app, &admin, "flip", json!({"rules": {"read": "false"}})).await;
    // Within a few heartbeats: a fresh view under the new rule.
    let m = ws.recv().await;
    assert_eq!(m["type"], "snapshot", "{m}");
    assert_eq!(m["reset"], true);
    assert_eq!(ids(&m), Vec::<String>::new());
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/flip",
        Some(json!({"id": "b", "data": {}})),
    )
    .await;
    ws.silent(300).await;
}

async fn a_signed_out_session_ends_its_subscriptions(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.realtime.heartbeat_secs = 1).await;
    let admin = app.admin_token().await;
    admin_collection(
        &app,
        &admin,
        "c",
        json!({"rules": {"read": "auth != null"}}),
    )
    .await;
    let (_, token, _) = app.user("gone@example.com").await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.auth(&token).await;
    ws.subscribe("s", "c", json!({"query": {}})).await;
    app.post("/v1/auth/logout", Some(&token), json!({}))
        .await
        .assert_ok();
    let m = ws.recv().await;
    assert_eq!(m["type"], "error", "{m}");
    assert_eq!(m["id"], "s");
    assert_eq!(m["error"]["code"], "unauthenticated");
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/c",
        Some(json!({"id": "x", "data": {}})),
    )
    .await;
    ws.silent(300).await;
    // A server shutting down closes its sockets at once with 1001 (going away).
    let mut other = Ws::connect(&ws_base(&app)).await;
    other.send(json!({"type": "ping"})).await;
    other.recv().await;
    let stopping = tokio::spawn(app.stop());
    assert_eq!(other.closed().await, Some(1001));
    stopping.await.unwrap();
}

/// What a hostile client found: changes over the bus's 64 KiB payload were lost on SQLite,
/// `-0` was routed apart from `0`, and a rule reading `request.time` was frozen at subscribe.
async fn large_documents_negative_zero_and_time_rules(backend: Backend) {
    let app = spawn_app(backend).await;
    let admin = app.admin_token().await;
    admin_collection(&app, &admin, "c", json!({"rules": open_rules()})).await;
    let mut ws = Ws::connect(&ws_base(&app)).await;
    ws.subscribe("all", "c", json!({"query": {"limit": 1000}}))
        .await;
    ws.subscribe("zero", "c", json!({"query": {"where": ["n", "==", 0]}}))
        .await;
    let big = "b".repeat(70_000);
    let writes: Vec<Value> = (0..10)
        .map(|i| json!({"op": "create", "collection": "c", "id": format!("big{i}"), "data": {"s": big}}))
        .collect();
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/_batch",
        Some(json!({"writes": writes})),
    )
    .await;
    for i in 0..5 {
        write(
            &app,
            &admin,
            Method::POST,
            "/v1/db/c",
            Some(json!({"id": format!("one{i}"), "data": {"s": big}})),
        )
        .await;
    }
    let mut got = HashSet::new();
    while got.len() < 15 {
        for (kind, id) in kinds(&ws.recv().await) {
            assert_eq!(kind, "added");
            got.insert(id);
        }
    }
    let r = app
        .send_json_text(
            Method::POST,
            "/v1/db/c",
            Some(&admin),
            r#"{"id": "negzero", "data": {"n": -0.0}}"#,
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let m = ws.recv().await;
        seen.push(m["id"].as_str().unwrap().to_string());
    }
    seen.sort();
    assert_eq!(seen, ["all", "zero"]);
    // A rule that reads the time is applied at each change, not frozen at subscribe.
    let until = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    admin_collection(
        &app,
        &admin,
        "embargo",
        json!({"rules": {"read": format!("request.time < timestamp('{until}')")}}),
    )
    .await;
    let mut late = Ws::connect(&ws_base(&app)).await;
    let (_, token, _) = app.user("late@example.com").await;
    late.auth(&token).await;
    late.subscribe("e", "embargo", json!({"query": {}})).await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/embargo",
        Some(json!({"id": "early", "data": {}})),
    )
    .await;
    assert_eq!(
        kinds(&late.recv().await),
        [("added".into(), "early".into())]
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    write(
        &app,
        &admin,
        Method::POST,
        "/v1/db/embargo",
        Some(json!({"id": "after", "data": {}})),
    )
    .await;
    write(
        &app,
        &admin,
        Method::PATCH,
        "/v1/db/embargo/early",
        Some(json!({"data": {"secret": 1}})),
    )
    .await;
    let m = late.recv().await;
    assert_eq!(kinds(&m), [("removed".into(), "early".into())]);
    assert!(m["changes"][0]["document"]["data"].get("secret").is_none());
    late.silent(300).await;
}

// ------------------------------------------------------------------------------------------
// Two server processes on one PostgreSQL database.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_broadcasts_and_presence_cross_nodes() {
    use crate::changes::{create_service_key, start_node_with};
    if !crate::helpers::postgres_available() {
        return;
    }
    let url = crate::helpers::fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let key = create_service_key(&url, dir.path(), "rt");
    let env = [("BASALT_REALTIME__PRESENCE_TIMEOUT_SECS", "3")];
    let (a, b) = tokio::join!(
        start_node_with(&url, dir.path(), &env),
        start_node_with(&url, dir.path(), &env)
    );
    let client = reqwest::Client::new();
    let put = client
        .put(format!("{}/v1/admin/collections/shared", a.base))
        .bearer_auth(&key)
        .json(&json!({"rules": {"read": "true"}}))
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success());
    // A subscriber on node B; a write through node A.
    let mut on_b = Ws::connect(&b.base).await;
    on_b.auth(&key).await;
    assert_eq!(
        ids(&on_b.subscribe("s", "shared", json!({"query": {}})).await),
        Vec::<String>::new()
    );
    let created = client
        .post(format!("{}/v1/db/shared", a.base))
        .bearer_auth(&key)
        .json(&json!({"id": "from-a", "data": {"hello": "b"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let m = on_b.recv().await;
    assert_eq!(kinds(&m), [("added".into(), "from-a".into())]);
    // Channels: a member on each node.
    let mut on_a = Ws::connect(&a.base).await;
    on_a.auth(&key).await;
    on_a.send(json!({"type": "join", "channel": "room", "presence": {"node": "a"}}))
        .await;
    let a_state = on_a.recv().await;
    let a_key = a_state["key"].as_str().unwrap().to_string();
    // Node B's joiner sees A's member: in its first state, or as a join soon after (the
    // join travels through the database).
    on_b.send(json!({"type": "join", "channel": "room", "presence": {"node": "b"}}))
        .await;
    let has_a = |list: &Value| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|e| e["key"] == a_key.as_str()))
    };
    loop {
        let m = on_b.recv().await;
        assert_eq!(m["type"], "presence", "{m}");
        if has_a(&m["state"]) || has_a(&m["joins"]) {
            break;
        }
    }
    // A sees B's join.
    let joined = on_a.recv().await;
    assert_eq!(joined["joins"][0]["presence"]["node"], "b");
    // A broadcast from B reaches A.
    on_b.send(json!({"type": "broadcast", "channel": "room", "event": "hi", "payload": {"n": 1}}))
        .await;
    loop {
        let m = on_a.recv().await;
        if m["type"] == "broadcast" {
            assert_eq!(m["payload"], json!({"n": 1}));
            break;
        }
    }
    // A large broadcast goes by reference and still arrives.
    let big = "y".repeat(20_000);
    on_b.send(
        json!({"type": "broadcast", "channel": "room", "event": "big", "payload": {"s": big}}),
    )
    .await;
    loop {
        let m = on_a.recv().await;
        if m["type"] == "broadcast" {
            assert_eq!(m["payload"]["s"].as_str().unwrap().len(), 20_000);
            break;
        }
    }
    // Node A dies without a word: its member leaves B's presence within the timeout.
    let mut a = a;
    let _ = a.child.kill();
    let _ = a.child.wait();
    drop(on_a);
    let started = std::time::Instant::now();
    loop {
        let m = on_b.recv().await;
        if m["type"] == "presence"
            && m["leaves"]
                .as_array()
                .is_some_and(|l| l.iter().any(|e| e["key"] == a_key.as_str()))
        {
            break;
        }
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}
