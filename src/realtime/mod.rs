//! Realtime (API.md § Realtime, docs/realtime.md): document and query subscriptions fed by
//! the change stream, with resume from a cursor, and channels with presence and broadcasts
//! across every node.
//!
//! - [`hub`]: this node's one reader of the change bus; routes each document change to the
//!   connections that could care (by collection, document id, equality terms).
//! - [`connection`]: one WebSocket's state — its caller, its subscriptions (each a
//!   [`window::Window`] over a query, checked with the collection's `read` rule through
//!   [`crate::documents::ReadCheck`] and matched with [`crate::query::matches`]), its
//!   channels — driven by the messages of [`protocol`].
//! - [`channels`]: membership, presence and broadcasts, shared with other nodes.
//! - [`cursor`]: sealed change-log positions.
//!
//! The HTTP side (`http::realtime`) upgrades the request and moves frames between the socket
//! and a [`Connection`]; nothing here sees axum types.

mod channels;
mod connection;
mod cursor;
mod hub;
mod protocol;
mod window;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::auth::AuthService;
use crate::changes::ChangeBus;
use crate::config::RealtimeConfig;
use crate::documents::DocumentService;
use crate::store::Store;
pub use connection::{Connection, Incoming};

/// A frame for the socket.
#[derive(Debug, Clone)]
pub enum Frame {
    Text(Text),
    Ping,
}

/// A text frame's bytes: UTF-8, since it is only ever made from a `String` (moved, not
/// copied) and cheap to clone for every member of a channel. Boxed so that a queue slot is
/// one pointer: every connection's outbox allocates a block of slots up front.
#[derive(Debug, Clone)]
pub struct Text(Box<bytes::Bytes>);

impl Text {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The bytes, valid UTF-8.
    pub fn into_bytes(self) -> bytes::Bytes {
        *self.0
    }
}

impl From<String> for Text {
    fn from(text: String) -> Text {
        Text(Box::new(bytes::Bytes::from(text)))
    }
}

/// Why and how the server closes a socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseFrame {
    pub code: u16,
    pub reason: &'static str,
}

/// Close code for a client that does not read its messages fast enough.
pub const CLOSE_TOO_SLOW: u16 = 4008;

/// Where messages for one client wait for its socket. Bounded: a client that cannot keep up
/// is closed with [`CLOSE_TOO_SLOW`] rather than growing the server's memory.
#[derive(Clone)]
pub struct Outbox {
    frames: mpsc::Sender<Frame>,
    close: Arc<watch::Sender<Option<CloseFrame>>>,
    /// Bytes queued and not yet taken by the socket's writer.
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The socket's side of an [`Outbox`].
pub struct OutboxReceiver {
    frames: mpsc::Receiver<Frame>,
    pub close: watch::Receiver<Option<CloseFrame>>,
    queued: Arc<AtomicUsize>,
}

impl OutboxReceiver {
    /// The next frame, taken off the queue (its bytes no longer count).
    pub async fn next(&mut self) -> Option<Frame> {
        let frame = self.frames.recv().await?;
        self.taken(&frame);
        Some(frame)
    }

    /// The next frame if one is waiting.
    pub fn try_next(&mut self) -> Option<Frame> {
        let frame = self.frames.try_recv().ok()?;
        self.taken(&frame);
        Some(frame)
    }

    fn taken(&self, frame: &Frame) {
        if let Frame::Text(text) = frame {
            self.queued.fetch_sub(text.len(), Ordering::Relaxed);
        }
    }
}

impl Outbox {
    fn new(capacity: usize, max_bytes: usize) -> (Outbox, OutboxReceiver) {
        let (tx, rx) = mpsc::channel(capacity);
        let (close_tx, close_rx) = watch::channel(None);
        let queued = Arc::new(AtomicUsize::new(0));
        (
            Outbox {
                frames: tx,
                close: Arc::new(close_tx),
                queued: queued.clone(),
                max_bytes,
            },
            OutboxReceiver {
                frames: rx,
                close: close_rx,
                queued,
            },
        )
    }

    /// Queues a text frame; `false` when the client is gone or too slow (then it is closed):
    /// more than `realtime.send_queue` messages or `realtime.send_queue_bytes` bytes waiting.
    pub(crate) fn send(&self, text: impl Into<Text>) -> bool {
        if self.is_closed() {
            return false;
        }
        let text = text.into();
        let len = text.len();
        if self.queued.fetch_add(len, Ordering::Relaxed) + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return self.too_slow();
        }
        match self.frames.try_send(Frame::Text(text)) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                self.too_slow()
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    fn too_slow(&self) -> bool {
        metrics::counter!("basalt_realtime_slow_consumers_total").increment(1);
        self.close(
            CLOSE_TOO_SLOW,
            "too slow: messages were not read fast enough",
        );
        false
    }

    fn ping(&self) {
        let _ = self.frames.try_send(Frame::Ping);
    }

    /// Closes the socket (the first close wins).
    pub(crate) fn close(&self, code: u16, reason: &'static str) {
        self.close.send_if_modified(|c| {
            if c.is_some() {
                return false;
            }
            *c = Some(CloseFrame { code, reason });
            true
        });
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.close.borrow().is_some()
    }
}

/// Resolves once a close is requested (the guard `wait_for` answers is not `Send`: it is
/// dropped here, before any other await).
pub async fn close_requested(rx: &mut watch::Receiver<Option<CloseFrame>>) {
    let _ = rx.wait_for(Option::is_some).await;
}

/// The realtime service of one node.
pub struct Realtime {
    documents: Arc<DocumentService>,
    auth: Arc<AuthService>,
    changes: Arc<ChangeBus>,
    hub: Arc<hub::Hub>,
    channels: Arc<channels::Channels>,
    seal: Arc<cursor::PositionSeal>,
    config: RealtimeConfig,
    next_connection: AtomicU64,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Set when the server begins to shut down: every connection closes with 1001.
    stopping: watch::Sender<bool>,
}

/// The database key of the secret realtime cursors are sealed with (shared by all nodes).
const CURSOR_SECRET_META: &str = "realtime_cursor_secret";

impl Realtime {
    pub async fn start(
        store: Arc<dyn Store>,
        documents: Arc<DocumentService>,
        auth: Arc<AuthService>,
        changes: Arc<ChangeBus>,
        config: RealtimeConfig,
    ) -> anyhow::Result<Arc<Realtime>> {
        let secret = store
            .meta_put_if_absent(CURSOR_SECRET_META, &crate::ids::new_secret(64))
            .await?;
        let seal = Arc::new(cursor::PositionSeal::new(secret.as_bytes()));
        let hub = hub::Hub::new(changes.watermark());
        let channels = channels::Channels::new(store, &config)?;
        let tasks = vec![
            tokio::spawn(hub.clone().run(Arc::downgrade(&changes), seal.clone())),
            tokio::spawn(channels::Channels::run(Arc::downgrade(&channels))),
        ];
        Ok(Arc::new(Realtime {
            documents,
            auth,
            changes,
            hub,
            channels,
            seal,
            config,
            next_connection: AtomicU64::new(1),
            tasks,
            stopping: watch::channel(false).0,
        }))
    }

    /// A new connection, and where its frames are to be read from.
    pub fn open(self: &Arc<Self>) -> (Connection, OutboxReceiver) {
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let (outbox, receiver) = Outbox::new(self.config.send_queue, self.config.send_queue_bytes);
        (Connection::new(self.clone(), id, outbox), receiver)
    }

    /// The configured largest client message.
    pub fn max_message_bytes(&self) -> usize {
        self.config.max_message_bytes
    }

    /// The server is shutting down: every connection closes now (1001, "going away") rather
    /// than holding the shutdown for its grace period; clients reconnect to another node and
    /// resume.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
    }

    /// At shutdown: tells the other nodes this one's members are gone.
    pub async fn stop(&self) {
        self.channels.goodbye().await;
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Drop for Realtime {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}
