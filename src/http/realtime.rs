//! `GET /v1/realtime`: upgrades to a WebSocket and moves frames between the socket and a
//! [`crate::realtime::Connection`]. The protocol is docs/realtime.md; this file only knows
//! WebSocket frames. The read buffer is small (1 KiB: ~40× less memory per idle connection
//! than the default 128 KiB, measured in ../shared/notes/REALTIME.md; client messages are
//! small and rare), and the writer, in the connection's own task, sends what is queued before
//! flushing once.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::ApiError;
use crate::realtime::{Frame, Incoming, OutboxReceiver};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(realtime))
}

/// Frames written before one flush.
const WRITE_BATCH: usize = 64;
/// How long one batch may take to reach a client before it counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Realtime subscriptions and channels over a WebSocket (JSON text frames; see
/// docs/realtime.md). Authenticate with the first message, `{"type":"auth","token":"..."}`.
#[utoipa::path(
    get,
    path = "/v1/realtime",
    tag = "realtime",
    responses(
        (status = 101, description = "Switching to the WebSocket protocol of docs/realtime.md"),
        (status = 400, description = "Not a WebSocket upgrade request"),
    )
)]
async fn realtime(
    State(state): State<AppState>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(upgrade) = upgrade else {
        return ApiError::invalid(
            "this endpoint speaks WebSocket: send a GET with `Upgrade: websocket` (see docs/realtime.md)",
        )
        .into_response();
    };
    let soft = state.realtime.max_message_bytes();
    // Past four times the limit a message is not even read: the connection is closed (1009).
    let hard = soft.saturating_mul(4);
    upgrade
        .read_buffer_size(1024)
        .max_message_size(hard)
        .max_frame_size(hard)
        .on_upgrade(move |socket| serve(state, socket, soft))
}

async fn serve(state: AppState, socket: WebSocket, max_message: usize) {
    let (sink, stream) = socket.split();
    let (connection, outbox) = state.realtime.open();
    let incoming = stream.map(move |frame| match frame {
        Ok(Message::Text(text)) if text.len() > max_message => Incoming::TooLarge(text.len()),
        Ok(Message::Text(text)) => Incoming::Text(text.to_string()),
        Ok(Message::Binary(_)) => Incoming::Binary,
        Ok(Message::Ping(_) | Message::Pong(_)) => Incoming::Alive,
        Ok(Message::Close(_)) => Incoming::Closed,
        // tungstenite's "Message too long" (past the hard limit) is worth a 1009.
        Err(err) if err.to_string().contains("too long") => Incoming::Oversized,
        Err(_) => Incoming::Closed,
    });
    // The writer runs in this same task: a change reaching the socket wakes one task, not
    // two, and an idle connection holds one task.
    tokio::join!(connection.run(Box::pin(incoming)), write(sink, outbox));
}

/// Writes queued frames until the connection closes; then the close frame.
async fn write(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut outbox: OutboxReceiver,
) {
    let mut close = outbox.close.clone();
    loop {
        let batch = async {
            let Some(first) = outbox.next().await else {
                return false;
            };
            let mut frames = vec![first];
            while frames.len() < WRITE_BATCH {
                match outbox.try_next() {
                    Some(f) => frames.push(f),
                    None => break,
                }
            }
            let send = async {
                for frame in frames {
                    sink.feed(match frame {
                        // Made from a `String`: always UTF-8, so this checks without copying.
                        Frame::Text(text) => match Utf8Bytes::try_from(text.into_bytes()) {
                            Ok(text) => Message::Text(text),
                            Err(_) => continue,
                        },
                        Frame::Ping => Message::Ping(Default::default()),
                    })
                    .await?;
                }
                sink.flush().await
            };
            // Most batches go out at once: the timer is only armed for one that waits.
            let mut send = std::pin::pin!(send);
            if let std::task::Poll::Ready(sent) = futures::poll!(send.as_mut()) {
                return sent.is_ok();
            }
            matches!(tokio::time::timeout(WRITE_TIMEOUT, send).await, Ok(Ok(())))
        };
        tokio::select! {
            biased;
            _ = crate::realtime::close_requested(&mut close) => break,
            ok = batch => if !ok { return },
        }
    }
    let close = close.borrow().clone();
    if let Some(close) = close {
        let frame = Message::Close(Some(CloseFrame {
            code: close.code,
            reason: close.reason.into(),
        }));
        // Behind whatever the client has not read yet: give it a while, then drop the socket.
        // When the client closed first, tungstenite has queued its answer to that close and
        // refuses ours: the flush sends the queued one, so the close is clean either way.
        let _ = tokio::time::timeout(WRITE_TIMEOUT, async {
            let _ = sink.send(frame).await;
            let _ = sink.flush().await;
        })
        .await;
    }
}
