//! The HTTP server against hostile clients, over raw sockets: heads and bodies trickled a
//! byte at a time, idle and slow connections past the connection cap, requests hyper cannot
//! parse or will not buffer, a handler that panics, and who may read `/metrics`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::routing::get;
use basalt::config::Secret;
use basalt::http::server::{serve, ServeOptions};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::{spawn_app_with, test_config, Backend};
use crate::store_tests;

store_tests!(
    a_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout,
    a_silent_connection_is_closed_at_the_header_timeout,
    an_idle_keep_alive_connection_lives_until_the_idle_timeout_not_the_header_timeout,
    a_body_trickled_byte_by_byte_gets_408_at_the_body_deadline,
    slow_connections_past_the_cap_give_way_to_real_requests,
    at_the_cap_with_every_connection_busy_newcomers_get_503_until_one_ends,
    an_over_long_request_target_is_414_in_the_envelope,
    over_large_or_too_many_headers_are_431_in_the_envelope,
    bytes_that_are_not_http_get_400_in_the_envelope,
    a_malformed_request_after_a_good_one_on_the_same_connection_gets_the_envelope,
    shutdown_does_not_wait_for_connections_without_a_request,
    metrics_need_an_admin_token_a_service_key_or_the_metrics_token,
    a_metrics_listener_serves_only_metrics,
);

/// An answer read off a raw socket.
#[derive(Debug)]
pub(crate) struct RawReply {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Value,
}

impl RawReply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Asserts the error envelope with `status` and `code`, its request id echoed.
    fn assert_envelope(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{self:?}");
        assert_eq!(self.body["error"]["code"], code, "{self:?}");
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{self:?}"
        );
        let id = self.header("x-request-id").expect("x-request-id");
        assert_eq!(self.body["error"]["request_id"], id, "{self:?}");
        assert!(self
            .header("content-type")
            .is_some_and(|v| v.starts_with("application/json")));
    }
}

/// Reads one answer (head and a content-length body) from `stream`.
async fn read_reply(stream: &mut TcpStream) -> RawReply {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(
            n > 0,
            "connection closed before an answer: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).expect("a text head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("a status line: {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(':').expect("a header line");
            (n.trim().to_string(), v.trim().to_string())
        })
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.parse().unwrap())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("the body within 10 s")
            .expect("read");
        assert!(n > 0, "connection closed mid-body");
        body.extend_from_slice(&chunk[..n]);
    }
    RawReply {
        status,
        headers,
        body: serde_json::from_slice(&body[..length]).unwrap_or(Value::Null),
    }
}

/// Sends `request` on a fresh connection and reads the answer.
pub(crate) async fn exchange(addr: SocketAddr, request: &[u8]) -> RawReply {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_reply(&mut stream).await
}

/// Whether the server has closed `stream`: reads until end of file or a reset, discarding
/// any bytes, for at most `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut sink = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn health_on(addr: SocketAddr) -> RawReply {
    exchange(
        addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await
}

async fn a_head_trickled_byte_by_byte_is_cut_off_at_the_header_timeout(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.http.header_read_timeout_secs = 1).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    // Each byte comes well inside the timeout: only a deadline on the whole head stops it.
    let head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    let mut cut_off = false;
    for byte in head {
        if stream.write_all(&[*byte]).await.is_err() {
            cut_off = true;
            break;
        }
        if closed_within(&mut stream, Duration::from_millis(200)).await {
            cut_off = true;
            break;
        }
    }
    let elapsed = started.elapsed();
    assert!(cut_off, "a head trickled for {elapsed:?} was never cut off");
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(4),
        "cut off after {elapsed:?}, not at the 1 s header timeout"
    );
    // The server serves others all along.
    assert_eq!(health_on(app.addr).await.status, 200);
}

async fn a_silent_connection_is_closed_at_the_header_timeout(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.http.header_read_timeout_secs = 1;
        c.http.idle_timeout_secs = 30;
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(5)).await);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

async fn an_idle_keep_alive_connection_lives_until_the_idle_timeout_not_the_header_timeout(
    backend: Backend,
) {
    let app = spawn_app_with(backend, |c| {
        c.http.header_read_timeout_secs = 1;
        c.http.idle_timeout_secs = 3;
    })
    .await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    let request = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
    stream.write_all(request).await.unwrap();
    assert_eq!(read_reply(&mut stream).await.status, 200);
    // A pause longer than the header timeout but within the idle timeout is fine.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stream.write_all(request).await.unwrap();
    assert_eq!(read_reply(&mut stream).await.status, 200);
    let idle_from = Instant::now();
    assert!(
        closed_within(&mut stream, Duration::from_secs(6)).await,
        "an idle keep-alive connection was never closed"
    );
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(2500),
        "closed after {idle:?} idle, before the 3 s idle timeout"
    );
}

async fn a_body_trickled_byte_by_byte_gets_408_at_the_body_deadline(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.http.body_read_timeout_secs = 1).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(
            b"POST /v1/auth/signup HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{",
        )
        .await
        .unwrap();
    let started = Instant::now();
    // One byte every 200 ms, each well inside any per-read timeout, until an answer comes.
    let reply = loop {
        let mut probe = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(200), stream.peek(&mut probe)).await {
            Ok(Ok(n)) if n > 0 => break read_reply(&mut stream).await,
            Ok(_) => panic!("closed without an answer"),
            Err(_) => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "no answer to a trickled body"
                );
                // The server may stop reading; the answer is what counts.
                let _ = stream.write_all(b" ").await;
            }
        }
    };
    reply.assert_envelope(408, "request_timeout");
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(closed_within(&mut stream, Duration::from_secs(3)).await);
}

/// Opens a connection that sends part of a head and then nothing.
async fn half_head(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    stream
}

async fn slow_connections_past_the_cap_give_way_to_real_requests(backend: Backend) {
    let cap = 6;
    let app = spawn_app_with(backend, |c| {
        c.http.max_connections = cap;
        c.http.header_read_timeout_secs = 30;
    })
    .await;
    let mut slow = Vec::new();
    for _ in 0..cap {
        slow.push(half_head(app.addr).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Connections are left a quarter second to send their head before they may be made to
    // give way.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..4 {
        slow.push(half_head(app.addr).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Real requests are answered although the cap is full of connections that send nothing.
    for _ in 0..3 {
        assert_eq!(health_on(app.addr).await.status, 200);
    }
    // The slow connections that made room were closed, oldest first: the four past the cap,
    // and one for the first real request (the later ones found the room it left).
    let mut closed = Vec::new();
    for stream in &mut slow {
        closed.push(closed_within(stream, Duration::from_millis(100)).await);
    }
    let count = closed.iter().filter(|c| **c).count();
    assert!(count >= 5, "only {count} slow connections were closed");
    assert!(closed[..5].iter().all(|c| *c), "not the oldest: {closed:?}");
    assert!(!closed[cap + 3], "the newest slow connection was closed");
    drop(slow);
    assert_eq!(health_on(app.addr).await.status, 200);
}

async fn shutdown_does_not_wait_for_connections_without_a_request(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.http.header_read_timeout_secs = 30;
        c.http.idle_timeout_secs = 30;
        c.http.shutdown_grace_secs = 20;
    })
    .await;
    let mut half = half_head(app.addr).await;
    let mut idle = TcpStream::connect(app.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_reply(&mut idle).await.status, 200);
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    app.stop().await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "shutdown waited {:?} for connections with no request",
        started.elapsed()
    );
    for stream in [&mut half, &mut idle, &mut silent] {
        assert!(closed_within(stream, Duration::from_secs(1)).await);
    }
}

/// Opens a connection whose request is being handled: a JSON body that never arrives.
async fn busy(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /v1/auth/signup HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        .await
        .unwrap();
    stream
}

async fn at_the_cap_with_every_connection_busy_newcomers_get_503_until_one_ends(backend: Backend) {
    let cap = 4;
    let app = spawn_app_with(backend, |c| c.http.max_connections = cap).await;
    let mut busy_ones = Vec::new();
    for _ in 0..cap {
        busy_ones.push(busy(app.addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = health_on(app.addr).await;
    refused.assert_envelope(503, "unavailable");
    assert_eq!(refused.header("connection"), Some("close"));
    assert_eq!(refused.header("retry-after"), Some("1"));
    // None of the busy requests was cut short to make room.
    for stream in &mut busy_ones {
        assert!(!closed_within(stream, Duration::from_millis(50)).await);
    }
    // One ends; the next client is served.
    drop(busy_ones.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(health_on(app.addr).await.status, 200);
    drop(busy_ones);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..cap + 2 {
        assert_eq!(health_on(app.addr).await.status, 200);
    }
}

async fn an_over_long_request_target_is_414_in_the_envelope(backend: Backend) {
    let app = spawn_app_with(backend, |_| {}).await;
    let target = format!("/v1/db/todos/{}", "a".repeat(10 * 1024));
    let reply = exchange(
        app.addr,
        format!("GET {target} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
    )
    .await;
    reply.assert_envelope(414, "invalid_argument");
    let query = format!("/health?q={}", "b".repeat(9 * 1024));
    exchange(
        app.addr,
        format!("GET {query} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
    )
    .await
    .assert_envelope(414, "invalid_argument");
    // Past hyper's own buffer limit the answer is hyper's, rewritten into the envelope.
    let huge = format!("/health?q={}", "c".repeat(40 * 1024));
    exchange(
        app.addr,
        format!("GET {huge} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
    )
    .await
    .assert_envelope(431, "invalid_argument");
    // Just under the limit is served.
    let fine = format!("/health?q={}", "d".repeat(7 * 1024));
    let reply = exchange(
        app.addr,
        format!("GET {fine} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200);
}

async fn over_large_or_too_many_headers_are_431_in_the_envelope(backend: Backend) {
    let app = spawn_app_with(backend, |_| {}).await;
    let one_big = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\ncookie: {}\r\n\r\n",
        "z".repeat(40 * 1024)
    );
    exchange(app.addr, one_big.as_bytes())
        .await
        .assert_envelope(431, "invalid_argument");
    let many_small: String = (0..400)
        .map(|i| format!("x-h{i}: {}\r\n", "v".repeat(100)))
        .collect();
    exchange(
        app.addr,
        format!("GET /health HTTP/1.1\r\nhost: x\r\n{many_small}\r\n").as_bytes(),
    )
    .await
    .assert_envelope(431, "invalid_argument");
    let too_many: String = (0..150).map(|i| format!("x-n{i}: 1\r\n")).collect();
    exchange(
        app.addr,
        format!("GET /health HTTP/1.1\r\nhost: x\r\n{too_many}\r\n").as_bytes(),
    )
    .await
    .assert_envelope(431, "invalid_argument");
    // A big but allowed head is served.
    let allowed = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\ncookie: {}\r\n\r\n",
        "y".repeat(16 * 1024)
    );
    assert_eq!(exchange(app.addr, allowed.as_bytes()).await.status, 200);
}

async fn bytes_that_are_not_http_get_400_in_the_envelope(backend: Backend) {
    let app = spawn_app_with(backend, |_| {}).await;
    let cases: Vec<Vec<u8>> = vec![
        b"HELLO\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1 trailing\r\nhost: x\r\n\r\n".to_vec(),
        b"GET /he alth HTTP/1.1\r\nhost: x\r\n\r\n".to_vec(),
        b"GET /health HTTP/9.9\r\nhost: x\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nbad header\r\n\r\n".to_vec(),
        b"GET /health HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"
            .to_vec(),
        // The start of a TLS ClientHello sent to the plain-text port.
        vec![
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, b'\r', b'\n', b'\r',
            b'\n',
        ],
    ];
    for case in cases {
        let reply = exchange(app.addr, &case).await;
        reply.assert_envelope(400, "invalid_argument");
        assert_eq!(reply.header("connection"), Some("close"), "{case:?}");
    }
    assert_eq!(health_on(app.addr).await.status, 200);
}

async fn a_malformed_request_after_a_good_one_on_the_same_connection_gets_the_envelope(
    backend: Backend,
) {
    let app = spawn_app_with(backend, |_| {}).await;
    let mut stream = TcpStream::connect(app.addr).await.unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let first = read_reply(&mut stream).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body["status"], "ok");
    stream.write_all(b"NOT HTTP\r\n\r\n").await.unwrap();
    read_reply(&mut stream)
        .await
        .assert_envelope(400, "invalid_argument");
}

async fn metrics_need_an_admin_token_a_service_key_or_the_metrics_token(backend: Backend) {
    let metrics_token = "scrape-me-0123456789abcdef";
    let app = spawn_app_with(backend, |c| {
        c.metrics.token = Some(Secret::new(metrics_token.into()))
    })
    .await;
    app.get("/health", None).await;
    app.get("/metrics", None)
        .await
        .assert_error(401, "unauthenticated");
    app.get("/metrics", Some("not-the-token"))
        .await
        .assert_error(401, "unauthenticated");
    let (_, user, _) = app.user("metrics-user@example.com").await;
    app.get("/metrics", Some(&user))
        .await
        .assert_error(403, "permission_denied");
    let admin = app.admin_token().await;
    let key = app
        .post("/v1/admin/keys", Some(&admin), json!({"name": "scraper"}))
        .await
        .body["key"]
        .as_str()
        .unwrap()
        .to_string();
    for credential in [admin.as_str(), key.as_str(), metrics_token] {
        let reply = app.get("/metrics", Some(credential)).await;
        assert_eq!(reply.status.as_u16(), 200, "{}", reply.text);
        assert!(reply.text.contains("http_requests_total"), "{}", reply.text);
    }
    // Without a configured token, that credential is just an unknown bearer token.
    let plain = spawn_app_with(backend, |_| {}).await;
    plain
        .get("/metrics", Some(metrics_token))
        .await
        .assert_error(401, "unauthenticated");
}

async fn a_metrics_listener_serves_only_metrics(backend: Backend) {
    let app = spawn_app_with(backend, |c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap())
    })
    .await;
    let metrics = app.metrics_addr.expect("a metrics listener");
    app.get("/health", None).await;
    let client = reqwest::Client::new();
    let reply = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(reply.status().as_u16(), 200);
    assert!(reply.text().await.unwrap().contains("http_requests_total"));
    for path in ["/health", "/v1/auth/user", "/v1/openapi.json"] {
        let reply = crate::helpers::TestApp::reply(
            client
                .get(format!("http://{metrics}{path}"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        reply.assert_error(404, "not_found");
    }
    // The main listener still wants a credential.
    app.get("/metrics", None)
        .await
        .assert_error(401, "unauthenticated");

    let token = "private-scraper-token-42";
    let guarded = spawn_app_with(backend, |c| {
        c.metrics.listen = Some("127.0.0.1:0".parse().unwrap());
        c.metrics.token = Some(Secret::new(token.into()));
    })
    .await;
    let metrics = guarded.metrics_addr.unwrap();
    let url = format!("http://{metrics}/metrics");
    crate::helpers::TestApp::reply(client.get(&url).send().await.unwrap())
        .await
        .assert_error(401, "unauthenticated");
    let reply = client.get(&url).bearer_auth(token).send().await.unwrap();
    assert_eq!(reply.status().as_u16(), 200);
}

/// Serves `router` under the production middleware stack and connection layer on a free
/// port; the returned sender stops it.
async fn serve_router(
    router: axum::Router,
    adjust: impl FnOnce(&mut basalt::config::Config),
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    adjust(&mut config);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = basalt::http::layers(router, &config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        router,
        ServeOptions::from_config(&config.http),
        async move {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_answers_500_in_the_envelope_and_keeps_the_connection() {
    async fn boom() -> &'static str {
        let index: usize = "7".parse().unwrap_or_default();
        ["only one"][index]
    }
    let router = axum::Router::new()
        .route("/boom", get(boom))
        .route("/fine", get(|| async { "fine" }));
    let (addr, _stop) = serve_router(router, |_| {}).await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /boom HTTP/1.1\r\nhost: x\r\nx-request-id: panic-trace-1\r\n\r\n")
        .await
        .unwrap();
    let reply = read_reply(&mut stream).await;
    reply.assert_envelope(500, "internal");
    assert_eq!(reply.body["error"]["request_id"], "panic-trace-1");
    assert!(
        !reply.body.to_string().contains("out of bounds"),
        "the panic message leaked: {reply:?}"
    );
    // The same connection serves the next request.
    stream
        .write_all(b"GET /fine HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_reply(&mut stream).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_upgrade_works_and_is_not_closed_by_the_idle_timeout() {
    use axum::extract::ws::WebSocketUpgrade;
    use futures::{SinkExt, StreamExt};
    let router = axum::Router::new().route(
        "/echo",
        get(|ws: WebSocketUpgrade| async move {
            ws.on_upgrade(|mut socket| async move {
                while let Some(Ok(message)) = socket.recv().await {
                    if socket.send(message).await.is_err() {
                        break;
                    }
                }
            })
        }),
    );
    let (addr, _stop) = serve_router(router, |c| {
        c.http.header_read_timeout_secs = 1;
        c.http.idle_timeout_secs = 1;
    })
    .await;
    let (mut socket, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/echo"))
        .await
        .expect("the upgrade succeeds");
    socket
        .send(tokio_tungstenite::tungstenite::Message::text("one"))
        .await
        .unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap().into_text().unwrap(),
        "one"
    );
    // Quiet for longer than both HTTP timeouts: an upgraded connection is not HTTP any more.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    socket
        .send(tokio_tungstenite::tungstenite::Message::text("two"))
        .await
        .unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap().into_text().unwrap(),
        "two"
    );
}

/// Readiness says whether the database answers, not whether the pool has a free connection:
/// with every pooled connection waiting on a row lock (writes queued behind a long
/// transaction), `/ready` still answers 200, and the writes all complete once the lock goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ready_answers_while_every_pooled_connection_is_busy() {
    use sqlx::Connection;
    if !crate::helpers::postgres_available() {
        return;
    }
    let app = crate::helpers::spawn_app(Backend::Postgres).await;
    let admin = app.admin_token().await;
    crate::documents::admin_collection(
        &app,
        &admin,
        "hot",
        json!({"rules": {"read": "true", "update": "true"}}),
    )
    .await;
    app.post(
        "/v1/db/hot",
        Some(&admin),
        json!({"id": "x", "data": {"n": 0}}),
    )
    .await
    .assert_ok();
    let url = app.database_url();
    let mut holder = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM documents WHERE collection = 'hot' AND id = 'x' FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    // More writers than the pool has connections (16): all wait on the lock.
    let client = reqwest::Client::new();
    let writers: Vec<_> = (0..24)
        .map(|_| {
            let (client, url, admin) = (client.clone(), app.url("/v1/db/hot/x"), admin.clone());
            tokio::spawn(async move {
                client
                    .patch(url)
                    .bearer_auth(admin)
                    .json(&json!({"data": {"n": {"$increment": 1}}}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    // Wait until the pool is exhausted. (Watched from another connection: inside a
    // transaction, pg_stat_activity is a snapshot.)
    let mut watcher = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut exhausted = false;
    for _ in 0..100 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(&mut watcher)
        .await
        .unwrap();
        if waiting >= 15 {
            exhausted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(exhausted, "the writers did not fill the pool");
    let ready = client.get(app.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();
    for writer in writers {
        assert_eq!(writer.await.unwrap().unwrap(), 200);
    }
    let doc = app.get("/v1/db/hot/x", Some(&admin)).await;
    assert_eq!(doc.assert_ok()["data"]["n"], 24);
}
