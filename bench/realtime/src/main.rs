//! rtbench: the load tool of bench/realtime.sh.
//!
//! `rtbench run ...` (the orchestrator) spawns `rtbench worker` processes (itself), each
//! holding a slice of the subscriber connections from its own 127.0.0.x source address (one
//! process may hold at most ~20,000 open files here), waits until every subscription has its
//! snapshot, then writes documents that carry their send time (`t_us`, CLOCK_REALTIME
//! microseconds, shared by every process on the machine) and a sequence number (`seq`). Each
//! subscriber records write → event latency and which `seq`s it saw, so lost, repeated and
//! unexpected events are counted exactly. The orchestrator samples the server's CPU and
//! memory from /proc and prints one JSON line of results.
//!
//! Targets: basalt (WebSocket, `GET /v1/realtime`) and PocketBase (SSE, `GET /api/realtime`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap()
}

fn raise_nofile() {
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

// ------------------------------------------------------------------------------- config

#[derive(Clone, Debug, Serialize, Deserialize)]
struct WorkerConfig {
    target: String, // "basalt" | "pocketbase"
    addr: String,   // 127.0.0.1:PORT
    source: String, // source address to bind, e.g. 127.0.0.3
    collection: String,
    mode: String, // query | doc | eq | gt (basalt); pocketbase: all
    conn_start: usize,
    conn_end: usize,
    subs_per_conn: usize,
    tokens: Vec<String>,
    writes: usize,
    limit: u32,
    /// the field query subscriptions order by, descending
    order: String,
    connect_concurrency: usize,
}

/// Which subscriptions expect every write (true) or none (false).
fn expects_all(mode: &str, global_sub: usize) -> bool {
    match mode {
        "eq" | "gt" => global_sub == 0,
        "doc" => false,
        _ => true,
    }
}

#[derive(Default, Serialize, Deserialize, Debug)]
struct WorkerResult {
    connected: usize,
    failed: usize,
    subscribed: usize,
    errors: Vec<String>,
    closed: usize,
    deliveries: u64,
    messages: u64,
    lost: u64,
    duplicated: u64,
    unexpected: u64,
    first_recv_us: u64,
    last_recv_us: u64,
    hist: Vec<(u64, u64)>,
    rss_kb: u64,
    /// this worker's CPU (user + system) from READY to its result, in clock ticks
    cpu_ticks: u64,
    /// a few (connection, subscription, seq) that never arrived
    missing: Vec<(usize, usize, u64)>,
}

struct Tracker {
    /// per (conn index within worker, sub index): bitset of seqs seen; only subs that expect.
    seen: HashMap<(usize, usize), Vec<u64>>,
    writes: usize,
    hist: Histogram<u64>,
    deliveries: u64,
    messages: u64,
    duplicated: u64,
    unexpected: u64,
    first_recv_us: u64,
    last_recv_us: u64,
    subscribed: usize,
    connected: usize,
    failed: usize,
    closed: usize,
    settled: usize,
    errors: Vec<String>,
}

impl Tracker {
    fn record(&mut self, conn: usize, sub: usize, seq: u64, t_us: u64, now: u64) {
        self.deliveries += 1;
        if self.first_recv_us == 0 || now < self.first_recv_us {
            self.first_recv_us = now;
        }
        if now > self.last_recv_us {
            self.last_recv_us = now;
        }
        let _ = self.hist.record(now.saturating_sub(t_us).max(1));
        match self.seen.get_mut(&(conn, sub)) {
            Some(bits) if (seq as usize) < self.writes => {
                let (w, b) = (seq as usize / 64, seq % 64);
                if bits[w] & (1 << b) != 0 {
                    self.duplicated += 1;
                } else {
                    bits[w] |= 1 << b;
                }
            }
            _ => self.unexpected += 1,
        }
    }

    fn missing(&self) -> u64 {
        self.seen
            .values()
            .map(|bits| self.writes as u64 - bits.iter().map(|w| w.count_ones() as u64).sum::<u64>())
            .sum()
    }

    /// Up to 20 (connection, subscription, seq) that have not arrived, for a bug report.
    fn missing_sample(&self, conn_start: usize) -> Vec<(usize, usize, u64)> {
        let mut out = Vec::new();
        let mut keys: Vec<_> = self.seen.keys().copied().collect();
        keys.sort();
        for (c, j) in keys {
            let bits = &self.seen[&(c, j)];
            for seq in 0..self.writes as u64 {
                if bits[seq as usize / 64] & (1 << (seq % 64)) == 0 {
                    out.push((conn_start + c, j, seq));
                    if out.len() >= 20 {
                        return out;
                    }
                }
            }
        }
        out
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < 5 {
            self.errors.push(e);
        }
    }
}

type Shared = Rc<RefCell<Tracker>>;

/// A connection has its answer (subscribed, refused or failed): counted once.
fn settle(st: &Shared, ready: &tokio::sync::Notify) {
    st.borrow_mut().settled += 1;
    ready.notify_one();
}

// ------------------------------------------------------------------------- parsing frames

/// The number after `key` in `s` (JSON as servers print it: no spaces).
fn num_after(s: &str, key: &str) -> Option<u64> {
    let i = s.find(key)? + key.len();
    let rest = &s[i..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-'))
        .unwrap_or(rest.len());
    let v: f64 = rest[..end].parse().ok()?;
    Some(v as u64)
}

fn str_after<'a>(s: &'a str, key: &str) -> Option<&'a str> {
    let i = s.find(key)? + key.len();
    let rest = &s[i..];
    Some(&rest[..rest.find('"')?])
}

/// A basalt `changes` message: (sub id, [(seq, t_us)]) of its added/modified documents.
fn parse_changes(text: &str) -> Option<(&str, Vec<(u64, u64)>)> {
    let id = str_after(text, r#""id":""#)?;
    let start = text.find(r#""changes":["#)?;
    let mut out = Vec::new();
    for seg in text[start..].split(r#"{"type":""#).skip(1) {
        if seg.starts_with("added") || seg.starts_with("modified") {
            if let (Some(seq), Some(t)) = (num_after(seg, r#""seq":"#), num_after(seg, r#""t_us":"#)) {
                out.push((seq, t));
            }
        }
    }
    Some((id, out))
}

// ------------------------------------------------------------------------------ connecting

async fn connect_from(source: &str, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    let src: Ipv4Addr = source.parse().unwrap_or(Ipv4Addr::LOCALHOST);
    if src != Ipv4Addr::LOCALHOST {
        // Let the kernel pick the port at connect time, per destination: one source address
        // then holds ~28k connections to each server port.
        unsafe {
            use std::os::fd::AsRawFd;
            let one: libc::c_int = 1;
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn subscribe_msg(cfg: &WorkerConfig, sub_id: &str, g: usize) -> String {
    let order = json!([[cfg.order.as_str(), "desc"]]);
    let msg = match cfg.mode.as_str() {
        "doc" => json!({"type":"subscribe","id":sub_id,"collection":cfg.collection,"doc":format!("d{g}")}),
        "eq" => json!({"type":"subscribe","id":sub_id,"collection":cfg.collection,
            "query":{"where":[["room","==",format!("r{g}")]],"order_by":order,"limit":cfg.limit}}),
        "gt" => json!({"type":"subscribe","id":sub_id,"collection":cfg.collection,
            "query":{"where":[["n",">",g]],"order_by":order,"limit":cfg.limit}}),
        _ => json!({"type":"subscribe","id":sub_id,"collection":cfg.collection,
            "query":{"order_by":order,"limit":cfg.limit}}),
    };
    msg.to_string()
}

/// One basalt WebSocket subscriber connection (with `subs_per_conn` subscriptions).
async fn ws_conn(
    cfg: Rc<WorkerConfig>,
    local: usize,
    st: Shared,
    permit: Rc<tokio::sync::Semaphore>,
    ready: Rc<tokio::sync::Notify>,
) {
    let conn_idx = cfg.conn_start + local;
    let addr: SocketAddr = cfg.addr.parse().unwrap();
    let url = format!("ws://{}/v1/realtime", cfg.addr);
    let wsconf = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let guard = permit.acquire().await.unwrap();
    let mut attempt = 0;
    let ws = loop {
        attempt += 1;
        let r = async {
            let s = connect_from(&cfg.source, addr).await.map_err(|e| format!("connect: {e}"))?;
            tokio_tungstenite::client_async_with_config(url.as_str(), s, Some(wsconf))
                .await
                .map_err(|e| format!("handshake: {e}"))
        }
        .await;
        match r {
            Ok((ws, _)) => break ws,
            Err(e) if attempt >= 5 => {
                let mut t = st.borrow_mut();
                t.failed += 1;
                t.error(e);
                drop(t);
                settle(&st, &ready);
                return;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
        }
    };
    let (mut tx, mut rx) = ws.split();
    st.borrow_mut().connected += 1;
    if !cfg.tokens.is_empty() {
        let token = &cfg.tokens[conn_idx % cfg.tokens.len()];
        let _ = tx
            .feed(Message::Text(json!({"type":"auth","token":token}).to_string().into()))
            .await;
    }
    for j in 0..cfg.subs_per_conn {
        let g = conn_idx * cfg.subs_per_conn + j;
        let _ = tx.feed(Message::Text(subscribe_msg(&cfg, &format!("s{j}"), g).into())).await;
    }
    let _ = tx.flush().await;
    let mut pending = cfg.subs_per_conn;
    let mut guard = Some(guard);
    while let Some(msg) = rx.next().await {
        let text = match msg {
            Ok(Message::Text(t)) => t,
            Ok(Message::Close(f)) => {
                let mut t = st.borrow_mut();
                t.closed += 1;
                t.error(format!("closed by server: {f:?}"));
                break;
            }
            Ok(_) => continue,
            Err(e) => {
                let mut t = st.borrow_mut();
                t.closed += 1;
                t.error(format!("read: {e}"));
                break;
            }
        };
        let text: &str = text.as_str();
        let now = now_us();
        let mut t = st.borrow_mut();
        t.messages += 1;
        if text.starts_with(r#"{"type":"changes""#) {
            if let Some((id, docs)) = parse_changes(text) {
                let sub: usize = id.trim_start_matches('s').parse().unwrap_or(usize::MAX);
                for (seq, ts) in docs {
                    t.record(local, sub, seq, ts, now);
                }
            }
        } else if text.starts_with(r#"{"type":"snapshot""#) {
            t.subscribed += 1;
            pending -= 1;
            if pending == 0 {
                guard.take();
                drop(t);
                settle(&st, &ready);
            }
        } else if text.starts_with(r#"{"type":"error""#) {
            t.error(text.chars().take(300).collect());
            if pending > 0 {
                pending -= 1;
                if pending == 0 {
                    guard.take();
                    drop(t);
                    settle(&st, &ready);
                }
            }
        }
    }
    if pending > 0 {
        settle(&st, &ready);
    }
    // keep the socket until the worker exits
    let _ = tx;
}

/// A minimal HTTP/1.1 request on its own connection (`Connection: close`): the status.
async fn http_once(source: &str, addr: SocketAddr, req: String) -> Result<u16, String> {
    let mut s = connect_from(source, addr).await.map_err(|e| e.to_string())?;
    s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
    let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).to_string();
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("bad response: {head}"))
}

/// One PocketBase SSE subscriber: `GET /api/realtime` over HTTP/1.0 (so the body is the raw
/// event stream, not chunked), then `POST /api/realtime` with its clientId.
async fn sse_conn(
    cfg: Rc<WorkerConfig>,
    local: usize,
    st: Shared,
    permit: Rc<tokio::sync::Semaphore>,
    ready: Rc<tokio::sync::Notify>,
) {
    let addr: SocketAddr = cfg.addr.parse().unwrap();
    let guard = permit.acquire().await.unwrap();
    let fail = |e: String| {
        let mut t = st.borrow_mut();
        t.failed += 1;
        t.error(e);
        drop(t);
        settle(&st, &ready);
    };
    let mut s = None;
    for attempt in 1..=5u64 {
        match connect_from(&cfg.source, addr).await {
            Ok(x) => {
                s = Some(x);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200 * attempt)).await,
        }
    }
    let Some(mut s) = s else {
        return fail("connect failed 5 times".into());
    };
    let req = format!(
        "GET /api/realtime HTTP/1.0\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        cfg.addr
    );
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return fail(format!("write: {e}"));
    }
    let mut r = BufReader::with_capacity(4096, s);
    let mut line = String::new();
    // headers
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return fail("closed during headers".into()),
            Ok(_) if line == "\r\n" || line == "\n" => break,
            Ok(_) => {}
        }
    }
    st.borrow_mut().connected += 1;
    let mut event = String::new();
    let mut guard = Some(guard);
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => {
                let mut t = st.borrow_mut();
                t.closed += 1;
                t.error("sse stream closed".into());
                break;
            }
            Ok(_) => {}
        }
        let l = line.trim_end();
        if let Some(e) = l.strip_prefix("event:") {
            event = e.trim().to_string();
        } else if let Some(d) = l.strip_prefix("data:") {
            let now = now_us();
            if event == "PB_CONNECT" {
                let Some(client) = str_after(d, r#""clientId":""#) else {
                    return fail(format!("no clientId in {d}"));
                };
                let body = json!({"clientId": client, "subscriptions":[format!("{}/*", cfg.collection)]})
                    .to_string();
                let req = format!(
                    "POST /api/realtime HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                    cfg.addr,
                    body.len(),
                    body
                );
                let source = cfg.source.clone();
                match http_once(&source, addr, req).await {
                    Ok(204) | Ok(200) => {
                        st.borrow_mut().subscribed += 1;
                        guard.take();
                        settle(&st, &ready);
                    }
                    Ok(code) => return fail(format!("subscribe answered {code}")),
                    Err(e) => return fail(format!("subscribe: {e}")),
                }
            } else {
                let mut t = st.borrow_mut();
                t.messages += 1;
                if d.contains(r#""action":"create""#) || d.contains(r#""action":"update""#) {
                    if let (Some(seq), Some(ts)) = (num_after(d, r#""seq":"#), num_after(d, r#""t_us":"#)) {
                        t.record(local, 0, seq, ts, now);
                    }
                }
            }
        }
    }
    if guard.is_some() {
        settle(&st, &ready);
    }
}

fn rss_kb(pid: &str) -> u64 {
    status_field(pid, "VmRSS:")
}

fn status_field(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn worker_main() {
    raise_nofile();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let cfg: WorkerConfig = serde_json::from_str(&line).expect("worker config");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let localset = tokio::task::LocalSet::new();
    localset.block_on(&rt, async move {
        let n = cfg.conn_end - cfg.conn_start;
        let mut seen = HashMap::new();
        for local in 0..n {
            for j in 0..cfg.subs_per_conn {
                let g = (cfg.conn_start + local) * cfg.subs_per_conn + j;
                if expects_all(&cfg.mode, g) && cfg.writes > 0 {
                    seen.insert((local, j), vec![0u64; cfg.writes.div_ceil(64)]);
                }
            }
        }
        let st: Shared = Rc::new(RefCell::new(Tracker {
            seen,
            writes: cfg.writes,
            hist: new_hist(),
            deliveries: 0,
            messages: 0,
            duplicated: 0,
            unexpected: 0,
            first_recv_us: 0,
            last_recv_us: 0,
            subscribed: 0,
            connected: 0,
            failed: 0,
            closed: 0,
            settled: 0,
            errors: Vec::new(),
        }));
        let cfg = Rc::new(cfg);
        let permit = Rc::new(tokio::sync::Semaphore::new(cfg.connect_concurrency.max(1)));
        let ready = Rc::new(tokio::sync::Notify::new());
        for local in 0..n {
            let (c, s, p, r) = (cfg.clone(), st.clone(), permit.clone(), ready.clone());
            if cfg.target == "pocketbase" {
                tokio::task::spawn_local(sse_conn(c, local, s, p, r));
            } else {
                tokio::task::spawn_local(ws_conn(c, local, s, p, r));
            }
        }
        // Ready when every connection has settled: subscribed, refused or failed.
        loop {
            if st.borrow().settled >= n {
                break;
            }
            tokio::select! {
                _ = ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
        {
            let t = st.borrow();
            println!(
                "READY {}",
                json!({"connected": t.connected, "failed": t.failed, "subscribed": t.subscribed, "errors": t.errors})
            );
            std::io::stdout().flush().unwrap();
        }
        let cpu_ready = cpu_ticks("self");
        // Commands from the orchestrator: `DRAIN <timeout_ms>`.
        let mut stdin = BufReader::new(tokio::io::stdin());
        let mut cmd = String::new();
        loop {
            cmd.clear();
            if stdin.read_line(&mut cmd).await.unwrap_or(0) == 0 {
                std::process::exit(0);
            }
            let mut parts = cmd.split_whitespace();
            match parts.next() {
                Some("DRAIN") => {
                    let timeout: u64 = parts.next().and_then(|v| v.parse().ok()).unwrap_or(10_000);
                    let deadline = Instant::now() + Duration::from_millis(timeout);
                    // wait until nothing is missing, or the deadline
                    loop {
                        if st.borrow().missing() == 0 || Instant::now() >= deadline {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    // a little longer, to catch duplicates or strays
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    let t = st.borrow();
                    let hist: Vec<(u64, u64)> = t
                        .hist
                        .iter_recorded()
                        .map(|v| (v.value_iterated_to(), v.count_at_value()))
                        .collect();
                    let res = WorkerResult {
                        connected: t.connected,
                        failed: t.failed,
                        subscribed: t.subscribed,
                        errors: t.errors.clone(),
                        closed: t.closed,
                        deliveries: t.deliveries,
                        messages: t.messages,
                        lost: t.missing(),
                        duplicated: t.duplicated,
                        unexpected: t.unexpected,
                        first_recv_us: t.first_recv_us,
                        last_recv_us: t.last_recv_us,
                        hist,
                        rss_kb: rss_kb("self"),
                        cpu_ticks: cpu_ticks("self") - cpu_ready,
                        missing: t.missing_sample(cfg.conn_start),
                    };
                    println!("RESULT {}", serde_json::to_string(&res).unwrap());
                    std::io::stdout().flush().unwrap();
                }
                Some("EXIT") | None => std::process::exit(0),
                _ => {}
            }
        }
    });
}


// ---------------------------------------------------------------------------- orchestrator

#[derive(Debug, Clone)]
struct RunArgs {
    target: String,
    base: String,
    server_pid: String,
    key: String,
    collection: String,
    mode: String,
    conns: usize,
    subs_per_conn: usize,
    workers: usize,
    first_source: u8,
    tokens_file: Option<String>,
    writes: usize,
    rate: f64,
    batch: usize,
    concurrency: usize,
    extra: Value,
    label: String,
    hold_secs: u64,
    limit: u32,
    order: String,
    drain_ms: u64,
    connect_concurrency: usize,
    ready_timeout_s: u64,
}

fn parse_args(args: &[String]) -> RunArgs {
    let mut a = RunArgs {
        target: "basalt".into(),
        base: String::new(),
        server_pid: String::new(),
        key: String::new(),
        collection: "posts".into(),
        mode: "query".into(),
        conns: 1000,
        subs_per_conn: 1,
        workers: 2,
        first_source: 2,
        tokens_file: None,
        writes: 1000,
        rate: 100.0,
        batch: 1,
        concurrency: 4,
        extra: json!({}),
        label: "run".into(),
        hold_secs: 0,
        limit: 10,
        order: "seq".into(),
        drain_ms: 20_000,
        connect_concurrency: 256,
        ready_timeout_s: 300,
    };
    let mut i = 0;
    while i < args.len() {
        let k = args[i].as_str();
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match k {
            "--target" => a.target = v,
            "--base" => a.base = v.trim_end_matches('/').to_string(),
            "--server-pid" => a.server_pid = v,
            "--key" => a.key = v,
            "--collection" => a.collection = v,
            "--mode" => a.mode = v,
            "--conns" => a.conns = v.parse().unwrap(),
            "--subs-per-conn" => a.subs_per_conn = v.parse().unwrap(),
            "--workers" => a.workers = v.parse().unwrap(),
            "--first-source" => a.first_source = v.parse().unwrap(),
            "--tokens-file" => a.tokens_file = Some(v),
            "--writes" => a.writes = v.parse().unwrap(),
            "--rate" => a.rate = v.parse().unwrap(),
            "--batch" => a.batch = v.parse().unwrap(),
            "--concurrency" => a.concurrency = v.parse().unwrap(),
            "--extra" => a.extra = serde_json::from_str(&v).expect("--extra JSON"),
            "--label" => a.label = v,
            "--hold" => a.hold_secs = v.parse().unwrap(),
            "--limit" => a.limit = v.parse().unwrap(),
            "--order" => a.order = v,
            "--drain-ms" => a.drain_ms = v.parse().unwrap(),
            "--connect-concurrency" => a.connect_concurrency = v.parse().unwrap(),
            "--ready-timeout" => a.ready_timeout_s = v.parse().unwrap(),
            _ => panic!("unknown argument {k}"),
        }
        i += 2;
    }
    a
}

fn cpu_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // fields after the `(comm)`: state is field 3, utime 14, stime 15
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some(f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

fn clk_tck() -> u64 {
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as u64 }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_default()
}

struct Worker {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    out: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

async fn run_main(args: RunArgs) {
    raise_nofile();
    let exe = std::env::current_exe().unwrap();
    let addr = args.base.trim_start_matches("http://").to_string();
    let tokens: Vec<String> = match &args.tokens_file {
        Some(f) => std::fs::read_to_string(f)
            .unwrap()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        None => Vec::new(),
    };
    let hz = clk_tck() as f64;
    let pid = args.server_pid.clone();
    let load_before = loadavg();
    let rss_before = rss_kb(&pid);
    let cpu_before_connect = cpu_ticks(&pid);
    let t_connect = Instant::now();

    // --- subscribers
    let mut workers = Vec::new();
    let per = args.conns.div_ceil(args.workers.max(1));
    for w in 0..args.workers {
        let start = w * per;
        let end = ((w + 1) * per).min(args.conns);
        if start >= end {
            break;
        }
        let cfg = WorkerConfig {
            target: args.target.clone(),
            addr: addr.clone(),
            source: format!("127.0.0.{}", args.first_source as usize + w),
            collection: args.collection.clone(),
            mode: args.mode.clone(),
            conn_start: start,
            conn_end: end,
            subs_per_conn: args.subs_per_conn,
            tokens: tokens.clone(),
            writes: args.writes,
            limit: args.limit,
            order: args.order.clone(),
            connect_concurrency: args.connect_concurrency,
        };
        let mut child = tokio::process::Command::new(&exe)
            .arg("worker")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn worker");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(format!("{}\n", serde_json::to_string(&cfg).unwrap()).as_bytes())
            .await
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap()).lines();
        workers.push(Worker { child, stdin, out });
    }
    let mut connected = 0;
    let mut subscribed = 0;
    let mut failed = 0;
    let mut errors: Vec<String> = Vec::new();
    for w in workers.iter_mut() {
        let line = tokio::time::timeout(Duration::from_secs(args.ready_timeout_s), w.out.next_line())
            .await
            .expect("worker not ready in time")
            .unwrap()
            .expect("worker exited");
        let v: Value = serde_json::from_str(line.trim_start_matches("READY ")).unwrap();
        connected += v["connected"].as_u64().unwrap_or(0);
        subscribed += v["subscribed"].as_u64().unwrap_or(0);
        failed += v["failed"].as_u64().unwrap_or(0);
        for e in v["errors"].as_array().into_iter().flatten() {
            if errors.len() < 5 {
                errors.push(e.as_str().unwrap_or("").to_string());
            }
        }
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let cpu_after_connect = cpu_ticks(&pid);
    eprintln!(
        "[{}] {} connected, {} subscribed, {} failed in {:.1}s{}",
        args.label,
        connected,
        subscribed,
        failed,
        connect_secs,
        if errors.is_empty() { String::new() } else { format!("; errors: {errors:?}") }
    );
    if args.hold_secs > 0 {
        tokio::time::sleep(Duration::from_secs(args.hold_secs)).await;
    }
    let rss_subscribed = rss_kb(&pid);

    // --- writes
    let cpu0 = cpu_ticks(&pid);
    let t0 = Instant::now();
    let write_start_us = now_us();
    let write_failures = Arc::new(AtomicU64::new(0));
    let write_first_err = Arc::new(std::sync::Mutex::new(None::<String>));
    if args.writes > 0 {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .tcp_nodelay(true)
            .build()
            .unwrap();
        let sem = Arc::new(tokio::sync::Semaphore::new(args.concurrency.max(1)));
        let batch = args.batch.max(1);
        let requests = args.writes.div_ceil(batch);
        let interval = if args.rate > 0.0 {
            Some(Duration::from_secs_f64(1.0 / args.rate))
        } else {
            None
        };
        let mut tick = interval.map(|iv| {
            let mut t = tokio::time::interval(iv);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            t
        });
        let mut handles = Vec::new();
        for r in 0..requests {
            if let Some(t) = tick.as_mut() {
                t.tick().await;
            }
            let permit = sem.clone().acquire_owned().await.unwrap();
            let (client, a, fails, first_err) =
                (client.clone(), args.clone(), write_failures.clone(), write_first_err.clone());
            handles.push(tokio::spawn(async move {
                let lo = r * batch;
                let hi = ((r + 1) * batch).min(a.writes);
                let t_us = now_us();
                let doc = |seq: usize| {
                    let mut d = json!({"seq": seq, "t_us": t_us});
                    if let Value::Object(extra) = &a.extra {
                        for (k, v) in extra {
                            d[k] = v.clone();
                        }
                    }
                    d
                };
                let (url, body) = if a.target == "pocketbase" {
                    (format!("{}/api/collections/{}/records", a.base, a.collection), doc(lo))
                } else if hi - lo == 1 {
                    (
                        format!("{}/v1/db/{}", a.base, a.collection),
                        json!({"id": format!("p{lo}"), "data": doc(lo)}),
                    )
                } else {
                    let writes: Vec<Value> = (lo..hi)
                        .map(|s| json!({"op":"create","collection":a.collection,"id":format!("p{s}"),"data":doc(s)}))
                        .collect();
                    (format!("{}/v1/db/_batch", a.base), json!({"writes": writes}))
                };
                let mut req = client.post(url).json(&body);
                if !a.key.is_empty() {
                    req = req.header("Authorization", format!("Bearer {}", a.key));
                }
                match req.send().await {
                    Ok(resp) if resp.status().is_success() => {}
                    Ok(resp) => {
                        fails.fetch_add((hi - lo) as u64, Ordering::Relaxed);
                        let s = resp.status();
                        let text = resp.text().await.unwrap_or_default();
                        first_err.lock().unwrap().get_or_insert(format!("{s}: {}", &text[..text.len().min(300)]));
                    }
                    Err(e) => {
                        fails.fetch_add((hi - lo) as u64, Ordering::Relaxed);
                        first_err.lock().unwrap().get_or_insert(e.to_string());
                    }
                }
                drop(permit);
            }));
        }
        for h in handles {
            let _ = h.await;
        }
    }
    let write_secs = t0.elapsed().as_secs_f64();
    let write_end_us = now_us();

    // --- results
    let mut hist = new_hist();
    let mut total = WorkerResult::default();
    let mut client_rss = 0;
    let mut client_cpu = 0;
    let mut missing: Vec<(usize, usize, u64)> = Vec::new();
    for w in workers.iter_mut() {
        w.stdin
            .write_all(format!("DRAIN {}\n", args.drain_ms).as_bytes())
            .await
            .unwrap();
        w.stdin.flush().await.unwrap();
    }
    for w in workers.iter_mut() {
        let line = w.out.next_line().await.unwrap().expect("worker result");
        let r: WorkerResult = serde_json::from_str(line.trim_start_matches("RESULT ")).unwrap();
        for (v, c) in &r.hist {
            let _ = hist.record_n(*v, *c);
        }
        total.deliveries += r.deliveries;
        total.messages += r.messages;
        total.lost += r.lost;
        total.duplicated += r.duplicated;
        total.unexpected += r.unexpected;
        total.closed += r.closed;
        if r.first_recv_us > 0 && (total.first_recv_us == 0 || r.first_recv_us < total.first_recv_us) {
            total.first_recv_us = r.first_recv_us;
        }
        total.last_recv_us = total.last_recv_us.max(r.last_recv_us);
        client_rss += r.rss_kb;
        client_cpu += r.cpu_ticks;
        for m in r.missing {
            if missing.len() < 20 {
                missing.push(m);
            }
        }
        for e in r.errors {
            if errors.len() < 8 && !errors.contains(&e) {
                errors.push(e);
            }
        }
    }
    let cpu1 = cpu_ticks(&pid);
    let rss_after = rss_kb(&pid);
    let hwm = status_field(&pid, "VmHWM:");
    let fanout_secs = if total.last_recv_us > write_start_us {
        (total.last_recv_us - write_start_us) as f64 / 1e6
    } else {
        0.0
    };
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let out = json!({
        "label": args.label,
        "target": args.target,
        "mode": args.mode,
        "conns": args.conns,
        "subs": args.conns * args.subs_per_conn,
        "connected": connected,
        "subscribed": subscribed,
        "failed": failed,
        "connect_secs": (connect_secs * 10.0).round() / 10.0,
        "server_cpu_connect_s": (cpu_after_connect - cpu_before_connect) as f64 / hz,
        "writes": args.writes,
        "write_failures": write_failures.load(Ordering::Relaxed),
        "write_error": *write_first_err.lock().unwrap(),
        "write_secs": (write_secs * 100.0).round() / 100.0,
        "writes_per_s": if write_secs > 0.0 { (args.writes as f64 / write_secs).round() } else { 0.0 },
        "deliveries": total.deliveries,
        "messages": total.messages,
        "fanout_secs": (fanout_secs * 1000.0).round() / 1000.0,
        "deliveries_per_s": if fanout_secs > 0.0 { (total.deliveries as f64 / fanout_secs).round() } else { 0.0 },
        "lost": total.lost,
        "duplicated": total.duplicated,
        "unexpected": total.unexpected,
        "closed": total.closed,
        "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "max_ms": hist.max() as f64 / 1000.0,
        "samples": hist.len(),
        "server_rss_before_kb": rss_before,
        "server_rss_subscribed_kb": rss_subscribed,
        "server_rss_after_kb": rss_after,
        "server_hwm_kb": hwm,
        "server_cpu_s": (cpu1 - cpu0) as f64 / hz,
        "server_cpu_pct": if write_end_us > write_start_us { (((cpu1 - cpu0) as f64 / hz) / ((now_us() - write_start_us) as f64 / 1e6) * 100.0).round() } else { 0.0 },
        "client_rss_kb": client_rss,
        "client_cpu_s": client_cpu as f64 / hz,
        "server_cpu_us_per_delivery": if total.deliveries > 0 { ((cpu1 - cpu0) as f64 / hz * 1e6 / total.deliveries as f64 * 10.0).round() / 10.0 } else { 0.0 },
        "load_before": load_before,
        "errors": errors,
        "missing_sample": missing,
    });
    println!("{out}");
    for w in workers.iter_mut() {
        let _ = w.stdin.write_all(b"EXIT\n").await;
    }
    for mut w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
        let _ = w.child.kill().await;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("worker") => worker_main(),
        Some("run") => {
            let a = parse_args(&args[2..]);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(run_main(a));
        }
        _ => {
            eprintln!("usage: rtbench run --base http://127.0.0.1:PORT --server-pid PID [options]  (see bench/realtime.sh)");
            std::process::exit(2);
        }
    }
}
