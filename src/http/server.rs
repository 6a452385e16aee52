//! The connection layer: accepts TCP connections and serves HTTP/1.1 on them with hyper,
//! with the limits a listener open to hostile clients needs.
//!
//! - **Slow or silent clients.** Every connection is in one phase: waiting for a request's
//!   head (from the connection's start or the request's first byte: `header_read_timeout`),
//!   idle between requests (`idle_timeout`), being handled (no limit here; the body has its
//!   own deadline in the middleware stack), or sending an answer the client must keep reading
//!   (`idle_timeout` without progress). A watchdog beside each connection closes it when its
//!   phase's deadline passes. hyper's own header timer is not used: it also runs while a
//!   keep-alive connection waits for its next request, so it cannot tell a 10 s head limit
//!   from a 60 s idle limit.
//! - **Too many connections.** At most `max_connections` (lowered to fit the descriptor
//!   limit) are served. A connection arriving at the cap takes the place of the one that has
//!   waited longest without a request in progress (a slow head, or an idle keep-alive), which
//!   is closed, provided it has waited at least 250 ms: a newcomer always gets that long to
//!   send its head, so a storm of reconnecting clients cannot evict each other (and real
//!   clients) before a request is read. With no such connection, the newcomer gets a 503 in
//!   the error envelope with `Connection: close` and `Retry-After`, written without reading
//!   its request. So connections that only hold a slot cannot lock out clients that send
//!   requests for long, and nobody waits in a backlog without an answer.
//! - **Accept errors** (out of descriptors) are logged at most once a second, free a waiting
//!   connection and pause the loop briefly instead of spinning or ending it.
//! - **Protocol errors.** hyper answers a request it cannot parse (bad request line, a head
//!   over `max_header_bytes`, too many headers) itself, with a bare status and no body. Such an
//!   answer can only be written while no request is being handled, so the connection's writer
//!   recognises it there and sends the same status in the JSON envelope instead.
//! - **Shutdown.** The listener closes at once, and so do connections without a request in
//!   progress; the others finish their request and close; after the grace period the rest
//!   are closed.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response, StatusCode};
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

use crate::config::HttpConfig;

/// Descriptors kept free beside client connections: database connections, files, the
/// busy answers below.
const FD_RESERVE: u64 = 128;

/// Connections being told "busy" at once; while all are in use, accepting pauses.
const BUSY_ANSWERS: usize = 32;

/// How far past the cap connections that were told to close but have not gone yet may
/// take the count; past it, newcomers are told "busy" instead of evicting more.
const EVICTION_SLACK: usize = 32;

/// The least time a connection without a request in progress is left alone before it may be
/// closed to make room (shorter when the header timeout is). A real client's head arrives
/// with the connection's first packets; a quarter second covers a busy server that has not
/// read it yet. Longer hands a reconnecting flood more of the slots: measured with 400
/// slow clients reconnecting after 1 s against a cap of 128, /health got 200 on 36 of 57
/// tries with 250 ms against 8 of 76 with 1 s (the rest were 503s).
const EVICTION_GRACE: Duration = Duration::from_millis(250);

/// How long a busy answer may take to write and to see the client hang up.
const BUSY_ANSWER_TIME: Duration = Duration::from_secs(2);

/// How long the accept loop pauses after an accept error such as EMFILE.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The limits of one listener.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    /// The largest request head hyper buffers; beyond it, 431.
    pub max_header_bytes: usize,
    pub shutdown_grace: Duration,
}

impl ServeOptions {
    pub fn from_config(http: &HttpConfig) -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(http.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(http.idle_timeout_secs),
            max_connections: http.max_connections,
            max_header_bytes: http.max_header_bytes,
            shutdown_grace: Duration::from_secs(http.shutdown_grace_secs),
        }
    }
}

/// Raises the soft limit on open files to the hard limit, so the connection cap, not the
/// kernel, decides when clients are turned away. Returns the limit in force afterwards.
#[cfg(unix)]
pub fn raise_fd_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let soft = limit.current;
    // An unlimited hard limit is not accepted as a soft one everywhere (macOS); a million
    // is more than any cap here needs.
    let target = limit.maximum.unwrap_or(1 << 20);
    if soft.is_some_and(|soft| soft >= target) || soft.is_none() {
        tracing::info!(
            limit = soft.unwrap_or(u64::MAX),
            "open-file limit (already the hard limit)"
        );
        return soft;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(target),
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => {
            tracing::info!(
                from = soft.unwrap_or_default(),
                to = target,
                "raised the open-file limit"
            );
            Some(target)
        }
        Err(err) => {
            tracing::warn!(error = %err, limit = soft.unwrap_or_default(), "could not raise the open-file limit");
            soft
        }
    }
}

#[cfg(not(unix))]
pub fn raise_fd_limit() -> Option<u64> {
    None
}

/// The connection cap in force: the configured one, lowered to fit the open-file limit.
fn connection_cap(configured: usize) -> usize {
    #[cfg(unix)]
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    #[cfg(not(unix))]
    let soft: Option<u64> = None;
    let Some(soft) = soft else {
        return configured;
    };
    let budget = usize::try_from(soft.saturating_sub(FD_RESERVE).max(1)).unwrap_or(usize::MAX);
    if budget < configured {
        tracing::warn!(
            configured,
            serving = budget,
            open_file_limit = soft,
            "http.max_connections does not fit the open-file limit; serving fewer connections"
        );
        budget
    } else {
        configured
    }
}

/// Serves `router` on `listener` until `shutdown` resolves, then lets connections finish
/// for up to `shutdown_grace` and closes the rest.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send,
) {
    let cap = connection_cap(options.max_connections);
    let grace = options.header_read_timeout.min(EVICTION_GRACE);
    let registry = Arc::new(Registry::default());
    let busy_answers = Arc::new(Semaphore::new(BUSY_ANSWERS));
    let mut http = http1::Builder::new();
    http.header_read_timeout(None)
        .max_header_size(options.max_header_bytes);
    let listener_wide = Arc::new(ListenerWide {
        router,
        http,
        options: options.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut warned = Warned::default();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(accepted) => accepted,
            Err(err) if is_connection_error(&err) => continue,
            Err(err) => {
                if warned.accept_error.due() {
                    tracing::error!(error = %err, open = registry.len(), "cannot accept a connection");
                }
                registry.evict_longest_waiting(grace);
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let open = registry.len();
        let admitted =
            open < cap || (open < cap + EVICTION_SLACK && registry.evict_longest_waiting(grace));
        if !admitted {
            if warned.cap.due() {
                tracing::warn!(
                    cap,
                    "connection limit reached and no connection may give way; answering 503"
                );
            }
            metrics::counter!("http_connections_refused_total").increment(1);
            // With every answer slot in use, accepting waits for one: later clients wait in
            // the kernel's backlog for an answer rather than being closed without one.
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                permit = busy_answers.clone().acquire_owned() => permit,
            };
            let Ok(permit) = permit else { continue };
            tokio::spawn(async move {
                let _ = tokio::time::timeout(BUSY_ANSWER_TIME, answer_busy(stream)).await;
                drop(permit);
            });
            continue;
        }
        let (conn, slot) = registry.register();
        tokio::spawn(serve_connection(
            stream,
            remote,
            (conn, slot),
            listener_wide.clone(),
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Nobody waits for an answer on a connection without a request in progress (a head not
    // yet complete, an idle keep-alive): those close now rather than at their timeout.
    registry.close_waiting();
    if tokio::time::timeout(options.shutdown_grace, registry.wait_empty())
        .await
        .is_err()
    {
        tracing::warn!(
            open = registry.len(),
            "shutdown grace period over; closing the remaining connections"
        );
        registry.close_all();
    }
}

/// What every connection of one listener shares.
struct ListenerWide {
    router: Router,
    http: http1::Builder,
    options: ServeOptions,
}

async fn serve_connection(
    stream: TcpStream,
    remote: SocketAddr,
    (conn, slot): (Arc<Conn>, Slot),
    shared: Arc<ListenerWide>,
    mut stop: watch::Receiver<bool>,
) {
    let io = TokioIo::new(WatchedIo {
        stream,
        conn: conn.clone(),
        rewrite: None,
        _slot: slot,
    });
    let service = ConnService {
        router: shared.router.clone(),
        remote,
        conn: conn.clone(),
    };
    let connection = shared.http.serve_connection(io, service).with_upgrades();
    tokio::pin!(connection);
    let mut draining = *stop.borrow();
    if draining {
        connection.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, %remote, "connection ended with an error");
                }
                return;
            }
            // Dropping the connection closes the socket.
            _ = conn.expired(&shared.options) => {
                tracing::debug!(%remote, "closing a connection past its deadline");
                return;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Answers a connection over the cap with a 503 in the envelope, without reading its
/// request, then waits for the client to hang up so the answer is not lost to a reset.
async fn answer_busy(mut stream: TcpStream) {
    let response = envelope_bytes(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the server is at its connection limit; retry shortly",
        &[("retry-after", "1")],
    );
    if stream.write_all(&response).await.is_err() {
        return;
    }
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < 64 * 1024 {
        match tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Rate-limits a repeated warning to once a second.
#[derive(Default)]
struct Warned {
    accept_error: Every,
    cap: Every,
}

#[derive(Default)]
struct Every(Option<Instant>);

impl Every {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self
            .0
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            return false;
        }
        self.0 = Some(now);
        true
    }
}

/// A complete HTTP/1.1 answer carrying the error envelope, for answers written below hyper.
fn envelope_bytes(
    status: StatusCode,
    code: &str,
    message: &str,
    extra_headers: &[(&str, &str)],
) -> Vec<u8> {
    let request_id = crate::ids::new_id();
    let body = serde_json::json!({
        "error": {"code": code, "message": message, "request_id": request_id}
    })
    .to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\nx-request-id: {request_id}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    );
    for (name, value) in extra_headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// The envelope for the statuses hyper answers on its own (see the module docs).
fn protocol_error_answer(status: StatusCode) -> Vec<u8> {
    let (code, message) = crate::http::protocol_error(status);
    metrics::counter!("http_protocol_errors_total", "status" => status.as_u16().to_string())
        .increment(1);
    envelope_bytes(status, code, message, &[])
}

/// The status of a bare answer hyper writes for a request it could not parse, if `head` is
/// one.
fn automatic_answer_status(head: &[u8]) -> Option<StatusCode> {
    let rest = head
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| head.strip_prefix(b"HTTP/1.0 "))?;
    match rest.get(..3)? {
        b"400" => Some(StatusCode::BAD_REQUEST),
        b"414" => Some(StatusCode::URI_TOO_LONG),
        b"431" => Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
        _ => None,
    }
}

/// Every open connection, to enforce the cap, pick one to close, and wait at shutdown.
#[derive(Default)]
struct Registry {
    conns: Mutex<BTreeMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    emptied: Notify,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Arc<Conn>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn register(self: &Arc<Self>) -> (Arc<Conn>, Slot) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn::new());
        self.lock().insert(id, conn.clone());
        metrics::gauge!("http_connections_open").increment(1.0);
        (
            conn,
            Slot {
                registry: self.clone(),
                id,
            },
        )
    }

    /// Closes the connection that has waited longest, and at least `grace`, without a
    /// request in progress; false when there is none.
    fn evict_longest_waiting(&self, grace: Duration) -> bool {
        let Some(cutoff) = Instant::now().checked_sub(grace) else {
            return false;
        };
        let conns = self.lock();
        let victim = conns
            .values()
            .filter_map(|conn| conn.waiting_since().map(|since| (since, conn)))
            .filter(|(since, _)| *since <= cutoff)
            .min_by_key(|(since, _)| *since)
            .map(|(_, conn)| conn.clone());
        drop(conns);
        match victim {
            Some(conn) => {
                conn.close();
                metrics::counter!("http_connections_evicted_total").increment(1);
                true
            }
            None => false,
        }
    }

    fn close_waiting(&self) {
        for conn in self.lock().values() {
            if conn.waiting_since().is_some() {
                conn.close();
            }
        }
    }

    fn close_all(&self) {
        for conn in self.lock().values() {
            conn.close();
        }
    }

    async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.len() == 0 {
                return;
            }
            emptied.await;
        }
    }
}

/// A connection's place in the registry, held by its socket (and so, after a WebSocket
/// upgrade, by the upgraded stream): the place is freed when the socket closes.
struct Slot {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut conns = self.registry.lock();
        conns.remove(&self.id);
        let empty = conns.is_empty();
        drop(conns);
        metrics::gauge!("http_connections_open").decrement(1.0);
        if empty {
            self.registry.emptied.notify_waiters();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for (the rest of) a request's head.
    Head,
    /// Between requests on a keep-alive connection.
    Idle,
    /// A request is being handled.
    Handling,
    /// The answer is being sent.
    Responding,
}

/// One connection's phase, shared by its socket, its service and its watchdog.
struct Conn {
    state: Mutex<ConnState>,
    /// Wakes the watchdog when a deadline appears, moves earlier, or the connection is
    /// told to close.
    wake: Notify,
}

struct ConnState {
    phase: Phase,
    /// When the phase started; in `Responding`, the last write that made progress.
    since: Instant,
    /// The answer's body has been taken in full by hyper (it may still be unflushed).
    body_done: bool,
    upgraded: bool,
    close: bool,
}

impl Conn {
    fn new() -> Self {
        Conn {
            state: Mutex::new(ConnState {
                phase: Phase::Head,
                since: Instant::now(),
                body_done: false,
                upgraded: false,
                close: false,
            }),
            wake: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ConnState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bytes_read(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Idle {
            state.phase = Phase::Head;
            state.since = Instant::now();
            drop(state);
            self.wake.notify_one();
        }
    }

    fn bytes_written(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Responding {
            state.since = Instant::now();
        }
    }

    fn dispatched(&self) {
        let mut state = self.lock();
        state.phase = Phase::Handling;
        state.body_done = false;
    }

    fn responding(&self, upgrade: bool) {
        let mut state = self.lock();
        state.phase = Phase::Responding;
        state.since = Instant::now();
        state.upgraded |= upgrade;
        drop(state);
        self.wake.notify_one();
    }

    fn body_finished(&self) {
        self.lock().body_done = true;
    }

    /// hyper flushes only once its buffer is written out, so a flush after the body ended
    /// means the whole answer is on the wire.
    fn flushed(&self) {
        let mut state = self.lock();
        if state.phase == Phase::Responding && state.body_done {
            state.phase = Phase::Idle;
            state.since = Instant::now();
            state.body_done = false;
            drop(state);
            self.wake.notify_one();
        }
    }

    /// Whatever hyper writes now is its own answer to a request it could not parse: no
    /// request is being handled or answered.
    fn writes_are_automatic(&self) -> bool {
        let state = self.lock();
        matches!(state.phase, Phase::Head | Phase::Idle) && !state.upgraded
    }

    /// Since when the connection has waited without a request in progress, if it has.
    fn waiting_since(&self) -> Option<Instant> {
        let state = self.lock();
        let waiting = matches!(state.phase, Phase::Head | Phase::Idle);
        (waiting && !state.close && !state.upgraded).then_some(state.since)
    }

    fn close(&self) {
        self.lock().close = true;
        self.wake.notify_one();
    }

    fn deadline(&self, options: &ServeOptions) -> Option<Instant> {
        let state = self.lock();
        if state.close {
            return Some(Instant::now());
        }
        if state.upgraded {
            return None;
        }
        match state.phase {
            Phase::Head => Some(state.since + options.header_read_timeout),
            Phase::Idle | Phase::Responding => Some(state.since + options.idle_timeout),
            Phase::Handling => None,
        }
    }

    /// Resolves when the connection should be closed.
    async fn expired(&self, options: &ServeOptions) {
        loop {
            match self.deadline(options) {
                Some(deadline) if deadline <= Instant::now() => return,
                Some(deadline) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

/// The socket, reporting reads and writes to the connection's phase, and replacing hyper's
/// bare protocol-error answers with the envelope.
struct WatchedIo {
    stream: TcpStream,
    conn: Arc<Conn>,
    /// Our answer replacing hyper's, and how much of it is written. Once set, hyper's own
    /// bytes are dropped: it writes nothing after such an answer but closes.
    rewrite: Option<(Vec<u8>, usize)>,
    _slot: Slot,
}

impl WatchedIo {
    fn drain_rewrite(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some((bytes, written)) = &mut self.rewrite {
            while *written < bytes.len() {
                let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &bytes[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes over a write of hyper's when it is an automatic answer (or one was already
    /// taken over): the caller reports `total` bytes written once ours are out.
    fn take_over(
        &mut self,
        cx: &mut Context<'_>,
        first: &[u8],
        total: usize,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.rewrite.is_none() {
            if !self.conn.writes_are_automatic() {
                return None;
            }
            let status = automatic_answer_status(first)?;
            self.rewrite = Some((protocol_error_answer(status), 0));
        }
        Some(self.drain_rewrite(cx).map_ok(|()| total))
    }
}

impl AsyncRead for WatchedIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.conn.bytes_read();
        }
        result
    }
}

impl AsyncWrite for WatchedIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(taken) = this.take_over(cx, buf, buf.len()) {
            return taken;
        }
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.bytes_written();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        let total = bufs.iter().map(|b| b.len()).sum();
        if let Some(taken) = this.take_over(cx, first, total) {
            return taken;
        }
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.conn.bytes_written();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain_rewrite(cx))?;
        ready!(Pin::new(&mut this.stream).poll_flush(cx))?;
        this.conn.flushed();
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.drain_rewrite(cx))?;
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// The router as hyper sees it on one connection: adds the peer address, and tells the
/// connection when a request starts and its answer ends.
#[derive(Clone)]
struct ConnService {
    router: Router,
    remote: SocketAddr,
    conn: Arc<Conn>,
}

impl hyper::service::Service<Request<Incoming>> for ConnService {
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.conn.dispatched();
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(self.remote));
        let router = self.router.clone();
        let conn = self.conn.clone();
        Box::pin(async move {
            let response = match router.oneshot(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            conn.responding(response.status() == StatusCode::SWITCHING_PROTOCOLS);
            Ok(response.map(|body| TrackedBody {
                inner: body,
                conn,
                done: false,
            }))
        })
    }
}

/// An answer's body that tells the connection when hyper has taken all of it (or dropped
/// it unread, as for HEAD).
struct TrackedBody {
    inner: Body,
    conn: Arc<Conn>,
    done: bool,
}

impl TrackedBody {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            self.conn.body_finished();
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hypers_own_parse_error_answers_are_taken_over() {
        assert_eq!(
            automatic_answer_status(b"HTTP/1.1 400 Bad Request\r\n"),
            Some(StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            automatic_answer_status(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        assert_eq!(
            automatic_answer_status(b"HTTP/1.0 414 URI Too Long\r\n"),
            Some(StatusCode::URI_TOO_LONG)
        );
        assert_eq!(automatic_answer_status(b"HTTP/1.1 200 OK\r\n"), None);
        assert_eq!(automatic_answer_status(b"HTTP/1.1 4"), None);
        assert_eq!(automatic_answer_status(b"{\"a\":1}"), None);
    }
}
