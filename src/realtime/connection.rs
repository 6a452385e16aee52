//! One realtime connection: its caller, subscriptions and channels, driven by the client's
//! messages, the changes the hub routes to it, and its timers.
//!
//! **Starting a subscription** (fresh, refilled or resumed) is one procedure: register the
//! route with the hub (changes after position `H` will arrive), run the query (it sees at
//! least everything up to `H`), note the log's last position `L`, wait until the hub has
//! routed up to `L`, and apply the changes of `(H, L]` to the result by version (the query may
//! or may not have seen each). The window then is exactly the state at `L`: the snapshot's
//! cursor. Changes after `L` come through the inbox.
//!
//! **Resuming** from a cursor `C` starts the same way, then rewinds the window from `L` to `C`
//! with the changes' old documents, and replays `(C, L]` forward as the client would have
//! seen them live: exactly the missed changes, each once. When `C` is older than the
//! retained log, or the window at `C` cannot be rebuilt from memory, or more than
//! `realtime.max_resume_events` changes were missed, the answer is a fresh snapshot with
//! `reset: true`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{FutureExt, Stream, StreamExt};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use super::channels::Action;
use super::hub::{Delivery, Inbox, Route};
use super::protocol::{self, ClientMessage, Subscribe};
use super::window::{Change, Visible, Window};
use super::{CloseFrame, Outbox, Realtime};
use crate::auth::Caller;
use crate::changes::ChangesError;
use crate::documents::{check_collection_name, check_document_id, ReadCheck};
use crate::error::{ApiError, ApiResult};
use crate::query::{self, Direction, Field, Filter, Op, Operand, Order, Query, QueryRequest};
use crate::rules::Fetched;
use crate::store::Event;

/// What the socket brought.
#[derive(Debug)]
pub enum Incoming {
    Text(String),
    Binary,
    /// A text message over `realtime.max_message_bytes` (its size): answered, dropped.
    TooLarge(usize),
    /// A ping or pong frame: the client is there.
    Alive,
    /// A frame past the hard limit (four times the message limit): not read, the socket is
    /// closed with 1009.
    Oversized,
    Closed,
}

/// Most changes in one `changes` message of a replay.
const REPLAY_BATCH: usize = 100;
/// Most routed changes handled in one go.
const DELIVERY_BATCH: usize = 256;
/// Batches of routed changes handled in a row before the socket is read (without waiting).
const FAIR_SOCKET_EVERY: u32 = 4;
/// How long a subscription waits for the hub to reach the log's end before giving up.
const CATCH_UP_WAIT: Duration = Duration::from_secs(10);
/// Close code for a connection that stopped answering.
const CLOSE_SILENT: u16 = 4000;
/// Bytes of document JSON the windows of one connection may keep together.
const MAX_CONNECTION_WINDOW_BYTES: usize = 16 * 1024 * 1024;
/// Broadcasts one connection may send per second.
const BROADCASTS_PER_SECOND: u32 = 100;
/// Joins (each sends the joiner the channel's whole presence) and leaves one connection may
/// send per second.
const JOINS_PER_SECOND: u32 = 10;

struct Sub {
    collection: String,
    query: Query,
    route: Route,
    check: ReadCheck,
    window: Window,
    /// Every change of the collection at or before this is reflected in `window`.
    pos: i64,
}

pub struct Connection {
    rt: Arc<Realtime>,
    /// The member key others see in presence.
    key: String,
    outbox: Outbox,
    closing: watch::Receiver<Option<CloseFrame>>,
    caller: Caller,
    expires: Option<tokio::time::Instant>,
    greeted: bool,
    inbox: Arc<Inbox>,
    inbox_rx: mpsc::Receiver<Arc<Delivery>>,
    /// Boxed: a map allocates room for several entries at once, and a `Sub` is large.
    subs: HashMap<String, Box<Sub>>,
    /// Joined channels, with the presence given.
    channels: BTreeMap<String, Value>,
    last_heard: Instant,
    broadcasts: governor::DefaultDirectRateLimiter,
    joins: governor::DefaultDirectRateLimiter,
    /// Heartbeats in a row whose ping got no sign of life before the next one.
    unanswered: u32,
    last_ping: Instant,
}

impl Connection {
    pub(super) fn new(rt: Arc<Realtime>, id: u64, outbox: Outbox) -> Connection {
        let (inbox, inbox_rx) = Inbox::new(id, rt.config.event_queue);
        Connection {
            key: crate::ids::new_id(),
            closing: outbox.close.subscribe(),
            outbox,
            caller: Caller::Anonymous,
            expires: None,
            greeted: false,
            inbox,
            inbox_rx,
            subs: HashMap::new(),
            channels: BTreeMap::new(),
            last_heard: Instant::now(),
            broadcasts: governor::RateLimiter::direct(governor::Quota::per_second(
                std::num::NonZeroU32::new(BROADCASTS_PER_SECOND).expect("not zero"),
            )),
            joins: governor::RateLimiter::direct(governor::Quota::per_second(
                std::num::NonZeroU32::new(JOINS_PER_SECOND).expect("not zero"),
            )),
            unanswered: 0,
            last_ping: Instant::now(),
            rt,
        }
    }

    /// Serves the connection until the client goes or the server closes it.
    pub async fn run(mut self, mut incoming: impl Stream<Item = Incoming> + Unpin) {
        metrics::gauge!("basalt_realtime_connections").increment(1.0);
        let beat = Duration::from_secs(self.rt.config.heartbeat_secs);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + beat, beat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let hello_by =
            tokio::time::Instant::now() + Duration::from_secs(self.rt.config.hello_timeout_secs);
        let mut closing = self.closing.clone();
        let mut stopping = self.rt.stopping.subscribe();
        // Routed changes in a row handled without looking at the socket (see below).
        let mut busy = 0;
        loop {
            let expires = self.expires;
            // The inbox is looked at before the socket: a change then wakes the task, is
            // handled, and the socket's read path is not polled for nothing. So that a steady
            // stream of changes cannot keep the client unheard (its pongs, its requests), the
            // socket is read without waiting after every few batches.
            tokio::select! {
                biased;
                _ = super::close_requested(&mut closing) => break,
                _ = server_stopping(&mut stopping) => {
                    self.outbox.close(1001, "the server is shutting down");
                    break;
                }
                Some(first) = self.inbox_rx.recv() => {
                    let mut batch = vec![first];
                    while batch.len() < DELIVERY_BATCH {
                        match self.inbox_rx.try_recv() {
                            Ok(d) => batch.push(d),
                            Err(_) => break,
                        }
                    }
                    // Boxed, as are the other rare or long paths below: the task of an idle
                    // connection then holds only the loop's own state, not the largest of
                    // them.
                    Box::pin(self.deliver(&batch)).await;
                    busy += 1;
                    if busy >= FAIR_SOCKET_EVERY {
                        busy = 0;
                        if let Some(message) = incoming.next().now_or_never() {
                            if !self.heard(message).await {
                                break;
                            }
                        }
                    }
                }
                message = incoming.next() => {
                    busy = 0;
                    if !self.heard(message).await {
                        break;
                    }
                }
                _ = heartbeat.tick() => Box::pin(self.heartbeat()).await,
                // In async blocks: a timer is only made when it is armed.
                _ = async { tokio::time::sleep_until(expires.unwrap_or_else(tokio::time::Instant::now)).await }, if expires.is_some() => {
                    self.expire();
                }
                _ = async { tokio::time::sleep_until(hello_by).await }, if !self.greeted => {
                    self.outbox.close(1008, "no valid message in time");
                }
            }
            if self.inbox.overflowed.swap(false, Ordering::AcqRel) {
                Box::pin(self.recover()).await;
            }
        }
        self.finish();
    }

    /// Handles what the socket brought; `false` when the client is gone.
    async fn heard(&mut self, message: Option<Incoming>) -> bool {
        match message {
            None | Some(Incoming::Closed) => false,
            Some(message) => {
                self.last_heard = Instant::now();
                Box::pin(self.on_incoming(message)).await;
                true
            }
        }
    }

    fn send(&self, text: String) {
        self.outbox.send(text);
    }

    fn send_error(&self, id: Option<&str>, channel: Option<&str>, err: &ApiError) {
        self.send(protocol::error(id, channel, err));
    }

    async fn on_incoming(&mut self, message: Incoming) {
        let max = self.rt.config.max_message_bytes;
        match message {
            Incoming::Text(text) => match ClientMessage::parse(&text) {
                Ok(message) => {
                    self.greeted = true;
                    self.on_message(message).await
                }
                Err(bad) => self.send_error(bad.id.as_deref(), bad.channel.as_deref(), &bad.error),
            },
            Incoming::Binary => self.send_error(
                None,
                None,
                &ApiError::invalid("binary frames are not understood: send JSON text frames"),
            ),
            Incoming::TooLarge(size) => self.send_error(
                None,
                None,
                &ApiError::PayloadTooLarge(format!(
                    "a message of {size} bytes is over the limit of {max} (realtime.max_message_bytes)"
                )),
            ),
            Incoming::Oversized => self.outbox.close(1009, "message too big"),
            Incoming::Alive | Incoming::Closed => {}
        }
    }

    async fn on_message(&mut self, message: ClientMessage) {
        match message {
            ClientMessage::Ping => self.send(protocol::pong()),
            ClientMessage::Auth { token } => match self.rt.auth.resolve(Some(&token)).await {
                Ok(caller) if !self.session_is_live(&caller).await => self.send_error(
                    None,
                    None,
                    &ApiError::Unauthenticated(
                        "this token's session was signed out or revoked".into(),
                    ),
                ),
                Ok(caller) => self.set_caller(caller).await,
                Err(err) => self.send_error(None, None, &err),
            },
            ClientMessage::Subscribe(sub) => {
                let id = sub.id.clone();
                if self.subs.contains_key(&id) {
                    return self.send_error(
                        Some(&id),
                        None,
                        &ApiError::AlreadyExists(format!(
                            "a subscription `{id}` is open on this connection; unsubscribe first"
                        )),
                    );
                }
                if self.subs.len() >= self.rt.config.max_subscriptions_per_connection {
                    return self.send_error(
                        Some(&id),
                        None,
                        &ApiError::invalid(format!(
                            "at most {} subscriptions per connection (realtime.max_subscriptions_per_connection)",
                            self.rt.config.max_subscriptions_per_connection
                        )),
                    );
                }
                if let Err(err) = self.subscribe(sub).await {
                    self.send_error(Some(&id), None, &err);
                }
            }
            ClientMessage::Unsubscribe { id } => match self.subs.remove(&id) {
                Some(sub) => {
                    self.drop_sub(&sub);
                    self.send(protocol::unsubscribed(&id));
                }
                None => self.send_error(
                    Some(&id),
                    None,
                    &ApiError::NotFound(format!("no subscription `{id}` on this connection")),
                ),
            },
            ClientMessage::Join { .. } | ClientMessage::Leave { .. }
                if self.joins.check().is_err() =>
            {
                let (ClientMessage::Join { channel, .. } | ClientMessage::Leave { channel }) =
                    &message
                else {
                    return;
                };
                self.send_error(
                    None,
                    Some(channel),
                    &ApiError::RateLimited {
                        retry_after_secs: 1,
                    },
                );
            }
            ClientMessage::Join { channel, presence } => {
                if !self.channels.contains_key(&channel)
                    && self.channels.len() >= self.rt.config.max_channels_per_connection
                {
                    return self.send_error(
                        None,
                        Some(&channel),
                        &ApiError::invalid(format!(
                            "at most {} channels per connection (realtime.max_channels_per_connection)",
                            self.rt.config.max_channels_per_connection
                        )),
                    );
                }
                if !self.rt.channels.may(Action::Join, &self.caller, &channel) {
                    return self.send_error(
                        None,
                        Some(&channel),
                        &ApiError::PermissionDenied(
                            "the channel join rule (realtime.channels.join) denies this".into(),
                        ),
                    );
                }
                self.rt
                    .channels
                    .join(&channel, &self.key, &self.caller, &presence, &self.outbox);
                self.channels.insert(channel, presence);
            }
            ClientMessage::Leave { channel } => {
                if self.channels.remove(&channel).is_some() {
                    self.rt.channels.leave(&channel, &self.key);
                    self.send(protocol::left(&channel));
                } else {
                    self.send_error(
                        None,
                        Some(&channel),
                        &ApiError::NotFound("not a member of this channel".into()),
                    );
                }
            }
            ClientMessage::Broadcast {
                channel,
                event,
                payload,
            } => {
                if !self.channels.contains_key(&channel) {
                    return self.send_error(
                        None,
                        Some(&channel),
                        &ApiError::FailedPrecondition(
                            "join the channel before broadcasting on it".into(),
                        ),
                    );
                }
                if self.broadcasts.check().is_err() {
                    return self.send_error(
                        None,
                        Some(&channel),
                        &ApiError::RateLimited {
                            retry_after_secs: 1,
                        },
                    );
                }
                if !self
                    .rt
                    .channels
                    .may(Action::Broadcast, &self.caller, &channel)
                {
                    return self.send_error(
                        None,
                        Some(&channel),
                        &ApiError::PermissionDenied(
                            "the channel broadcast rule (realtime.channels.broadcast) denies this"
                                .into(),
                        ),
                    );
                }
                self.rt
                    .channels
                    .broadcast(&channel, &self.key, &event, &payload);
            }
        }
    }

    // ------------------------------------------------------------------ identity

    /// Whether a user's session is still live (not signed out, not revoked, user not disabled
    /// or deleted). Other callers have no session. A failed read does not end anything.
    async fn session_is_live(&self, caller: &Caller) -> bool {
        let Caller::User(claims) = caller else {
            return true;
        };
        match self.rt.auth.store().list_sessions(&claims.sub).await {
            Ok(sessions) => sessions.iter().any(|s| s.id == claims.session_id),
            Err(_) => true,
        }
    }

    async fn set_caller(&mut self, caller: Caller) {
        let exp = match &caller {
            Caller::User(c) => Some(c.exp),
            Caller::Admin(c) => Some(c.exp),
            _ => None,
        };
        self.expires = exp.map(|exp| {
            let left = (exp - chrono::Utc::now().timestamp()).max(0) as u64;
            tokio::time::Instant::now() + Duration::from_secs(left)
        });
        let (role, uid) = match &caller {
            Caller::User(c) => (c.role.as_str(), Some(c.sub.clone())),
            Caller::Admin(_) => ("admin", None),
            Caller::ServiceKey { .. } => ("service", None),
            _ => ("anonymous", None),
        };
        self.send(protocol::authenticated(role, uid.as_deref(), exp));
        let same = caller.is_privileged() == self.caller.is_privileged()
            && caller.rule_auth() == self.caller.rule_auth();
        self.caller = caller;
        if same {
            return;
        }
        // Who the rules see has changed: every subscription starts again as this caller.
        let ids: Vec<String> = self.subs.keys().cloned().collect();
        for id in ids {
            self.reset(&id).await;
        }
        let channels: Vec<(String, Value)> = self
            .channels
            .iter()
            .map(|(c, p)| (c.clone(), p.clone()))
            .collect();
        for (channel, presence) in channels {
            if self.rt.channels.may(Action::Join, &self.caller, &channel) {
                // Still a member, under the new identity: the others see the entry change.
                self.rt
                    .channels
                    .join(&channel, &self.key, &self.caller, &presence, &self.outbox);
            } else {
                self.channels.remove(&channel);
                self.rt.channels.leave(&channel, &self.key);
                self.send_error(
                    None,
                    Some(&channel),
                    &ApiError::PermissionDenied(
                        "the channel join rule denies the new identity; left the channel".into(),
                    ),
                );
            }
        }
    }

    /// The token expired without a fresh one: subscriptions and channels end, each with an
    /// error, and the connection is anonymous until the next `auth`.
    fn expire(&mut self) {
        self.end_identity(
            "the token expired: send `auth` with a fresh token, then subscribe again (with `resume` to miss nothing)",
        );
    }

    /// Ends everything the current identity holds, each with an `unauthenticated` error.
    fn end_identity(&mut self, why: &str) {
        self.expires = None;
        let err = ApiError::Unauthenticated(why.into());
        for (id, sub) in std::mem::take(&mut self.subs) {
            self.drop_sub(&sub);
            self.send_error(Some(&id), None, &err);
        }
        for channel in std::mem::take(&mut self.channels).into_keys() {
            self.rt.channels.leave(&channel, &self.key);
            self.send_error(None, Some(&channel), &err);
        }
        self.caller = Caller::Anonymous;
    }

    // ------------------------------------------------------------------ subscriptions

    async fn subscribe(&mut self, request: Subscribe) -> ApiResult<()> {
        check_collection_name(&request.collection)?;
        let query = match (&request.doc, request.query) {
            (Some(doc), _) => {
                check_document_id(doc)?;
                Query {
                    filter: Some(Filter::Clause {
                        field: Field::Id,
                        op: Op::Eq,
                        value: Operand::Json(Value::String(doc.clone())),
                    }),
                    order: vec![Order {
                        field: Field::Id,
                        direction: Direction::Asc,
                    }],
                    limit: 1,
                    start_after: None,
                    select: None,
                    count: false,
                }
            }
            (None, Some(q)) => parse_query(q)?,
            (None, None) => return Err(ApiError::invalid("`subscribe` needs `doc` or `query`")),
        };
        let resume = match &request.resume {
            Some(cursor) => Some(self.rt.seal.open(cursor).ok_or_else(|| {
                ApiError::invalid_with(
                    "`resume` is not a cursor this server gave out",
                    serde_json::json!({"field": "resume"}),
                )
            })?),
            None => None,
        };
        let check = self
            .rt
            .documents
            .read_check(&self.caller, &request.collection)
            .await?;
        let route = Route::of(query.filter.as_ref());
        let registered = self
            .rt
            .hub
            .register(&self.inbox, &request.collection, &route);
        let mut sub = Box::new(Sub {
            collection: request.collection,
            query,
            route,
            check,
            window: Window::new(Arc::from(Vec::new()), 0, Vec::new(), true),
            pos: registered,
        });
        match self.start(&request.id, &mut sub, resume).await {
            Ok(messages) => {
                for m in messages {
                    self.send(m);
                }
                metrics::gauge!("basalt_realtime_subscriptions").increment(1.0);
                self.subs.insert(request.id, sub);
                Ok(())
            }
            Err(err) => {
                self.rt
                    .hub
                    .unregister(self.inbox.id, &sub.collection, &sub.route);
                Err(err)
            }
        }
    }

    /// Builds `sub`'s window at the log's end and the messages that open it: a snapshot, or
    /// for a resume the missed changes (or a reset snapshot).
    async fn start(&self, id: &str, sub: &mut Sub, resume: Option<i64>) -> ApiResult<Vec<String>> {
        let (mut window, mut end) = self.build(sub, sub.pos).await?;
        let Some(from) = resume else {
            sub.window = window;
            sub.pos = end;
            return Ok(vec![protocol::snapshot(
                id,
                &sub.window.documents_json(),
                &self.rt.seal.seal(end),
                false,
            )]);
        };
        if from > end {
            // A cursor from a node that was ahead of this one: catch up to it first.
            if !self.rt.hub.wait_processed(from, CATCH_UP_WAIT).await {
                return Err(behind());
            }
            let later = self
                .changes_between(&sub.collection, end, from, None)
                .await?;
            let mut lookups = Fetched::new();
            for event in later.iter().flatten() {
                self.apply(sub, &mut window, event, &mut lookups).await;
            }
            end = from;
        }
        let missed = self
            .changes_between(
                &sub.collection,
                from,
                end,
                Some(self.rt.config.max_resume_events),
            )
            .await;
        let replay = match missed {
            Ok(Some(missed)) => self.replay(id, sub, &window, &missed).await,
            Ok(None) | Err(ApiError::CursorExpired { .. }) => None,
            Err(err) => return Err(err),
        };
        let messages = match replay {
            Some((past, mut messages)) => {
                sub.window = past;
                if messages.is_empty() {
                    // Nothing was missed: say so, so the client knows the subscription is live.
                    messages.push(protocol::changes(id, &[], &self.rt.seal.seal(end)));
                }
                messages
            }
            None => {
                sub.window = window;
                vec![protocol::snapshot(
                    id,
                    &sub.window.documents_json(),
                    &self.rt.seal.seal(end),
                    true,
                )]
            }
        };
        sub.pos = end;
        Ok(messages)
    }

    /// Rewinds `window` (the state at the end of `missed`) to before `missed`, then replays
    /// them as live. `None` when the window before cannot be known from memory.
    async fn replay(
        &self,
        id: &str,
        sub: &Sub,
        window: &Window,
        missed: &[Event],
    ) -> Option<(Window, Vec<String>)> {
        let mut lookups = Fetched::new();
        let mut past = window.clone();
        for event in missed.iter().rev() {
            let old = self
                .visible(sub, event.old_data.as_ref(), &mut lookups)
                .await;
            past.set(
                &event.key,
                old.as_ref().map(|(doc, json)| Visible {
                    doc,
                    json: json.clone(),
                }),
            );
        }
        if past.needs_refill() {
            return None;
        }
        let mut messages = Vec::new();
        let mut batch: Vec<Change> = Vec::new();
        for event in missed {
            let changes = self.apply(sub, &mut past, event, &mut lookups).await;
            batch.extend(changes);
            if batch.len() >= REPLAY_BATCH {
                messages.push(protocol::changes(
                    id,
                    &batch,
                    &self.rt.seal.seal(event.position),
                ));
                batch.clear();
            }
        }
        if !batch.is_empty() {
            let last = missed.last().map_or(0, |e| e.position);
            messages.push(protocol::changes(id, &batch, &self.rt.seal.seal(last)));
        }
        Some((past, messages))
    }

    /// The window of `sub`'s query at the log's end, and that position. `after`: every change
    /// up to it is reflected in what the query will read.
    async fn build(&self, sub: &Sub, after: i64) -> ApiResult<(Window, i64)> {
        let limit = sub.query.limit as usize;
        let want = limit + limit.min(50);
        let (rows, complete) = self.fetch(sub, want).await?;
        if !complete && rows.len() < limit {
            return Err(ApiError::invalid(
                "this collection's read rule is checked document by document and took too long \
                 to fill this subscription's window; narrow the query or write the rule so that \
                 it becomes a filter (see docs/rules.md)",
            ));
        }
        let mut window = Window::new(Arc::from(sub.query.order.clone()), limit, rows, complete);
        let others: usize = self.subs.values().map(|s| s.window.bytes()).sum();
        if others + window.bytes() > MAX_CONNECTION_WINDOW_BYTES {
            return Err(ApiError::PayloadTooLarge(format!(
                "the documents this connection's subscriptions follow would be over {} MiB; \
                 lower `limit` or subscribe on another connection",
                MAX_CONNECTION_WINDOW_BYTES / (1024 * 1024)
            )));
        }
        let end = self.rt.changes.last_position().await?.max(after);
        if !self.rt.hub.wait_processed(end, CATCH_UP_WAIT).await {
            return Err(behind());
        }
        if end > after {
            let between = self
                .changes_between(&sub.collection, after, end, None)
                .await?;
            let mut lookups = Fetched::new();
            for event in between.iter().flatten() {
                self.apply(sub, &mut window, event, &mut lookups).await;
            }
        }
        Ok((window, end))
    }

    /// Up to `want` rows of the query as the caller may read them; and whether that is all.
    async fn fetch(&self, sub: &Sub, want: usize) -> ApiResult<(Vec<(Value, Arc<str>)>, bool)> {
        let mut rows = Vec::new();
        let mut cursor = None;
        for _ in 0..8 {
            let page = self
                .rt
                .documents
                .query(
                    &self.caller,
                    &sub.collection,
                    Query {
                        start_after: cursor,
                        limit: (want - rows.len()).clamp(1, query::MAX_LIMIT as usize) as u32,
                        ..sub.query.clone()
                    },
                )
                .await?;
            for doc in page.documents {
                let value = serde_json::to_value(&doc).map_err(ApiError::internal)?;
                let json: Arc<str> = Arc::from(value.to_string());
                rows.push((value, json));
            }
            match page.next_cursor {
                None => return Ok((rows, true)),
                Some(next) if rows.len() < want => cursor = Some(next),
                Some(_) => return Ok((rows, false)),
            }
        }
        Ok((rows, false))
    }

    /// The changes of `collection` in `(after, upto]`, from the log. With `cap`, `None` when
    /// there are more than that.
    async fn changes_between(
        &self,
        collection: &str,
        after: i64,
        upto: i64,
        cap: Option<usize>,
    ) -> ApiResult<Option<Vec<Event>>> {
        let topic = crate::store::document_topic(collection);
        let mut out = Vec::new();
        let mut from = after;
        while from < upto {
            let page = self
                .rt
                .changes
                .read(from, Some(&topic), 1000)
                .await
                .map_err(|e| match e {
                    ChangesError::Expired { .. } => ApiError::from(e),
                    ChangesError::Store(s) => ApiError::from(s),
                })?;
            let Some(last) = page.last().map(|e| e.position) else {
                break;
            };
            out.extend(
                page.into_iter()
                    .filter(|e| e.position <= upto && e.topic == topic),
            );
            if cap.is_some_and(|cap| out.len() > cap) {
                return Ok(None);
            }
            from = last;
        }
        Ok(Some(out))
    }

    /// A document's state as this subscription sees it: the document and its JSON when it
    /// matches the query and the caller may read it.
    async fn visible(
        &self,
        sub: &Sub,
        doc: Option<&Value>,
        lookups: &mut Fetched,
    ) -> Option<(Value, Arc<str>)> {
        let doc = doc?;
        if !sub
            .query
            .filter
            .as_ref()
            .is_none_or(|f| query::matches(f, doc))
        {
            return None;
        }
        if !self.rt.documents.readable(&sub.check, doc, lookups).await {
            return None;
        }
        Some((doc.clone(), Arc::from(doc.to_string())))
    }

    /// Applies a change read from the log to `window`.
    async fn apply(
        &self,
        sub: &Sub,
        window: &mut Window,
        event: &Event,
        lookups: &mut Fetched,
    ) -> Vec<Change> {
        let version = event
            .data
            .as_ref()
            .or(event.old_data.as_ref())
            .and_then(|d| d.get("version"))
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let state = self.visible(sub, event.data.as_ref(), lookups).await;
        window.apply(
            &event.key,
            event.op,
            version,
            state.as_ref().map(|(doc, json)| Visible {
                doc,
                json: json.clone(),
            }),
        )
    }

    /// Handles routed changes: each subscription of their collection, in order, once; one
    /// message per subscription, with the window refilled in it when it ran short.
    async fn deliver(&mut self, batch: &[Arc<Delivery>]) {
        let mut lookups = Fetched::new();
        let rt = self.rt.clone();
        // Windows that ran short wait for their refill, which rides in the same message.
        let mut short: Vec<(String, Vec<Change>)> = Vec::new();
        for (id, sub) in self.subs.iter_mut() {
            let mut changes = Vec::new();
            let mut cursor = None;
            for d in batch {
                if d.collection != sub.collection || d.position <= sub.pos {
                    continue;
                }
                sub.pos = d.position;
                if let Route::Id(doc) = &sub.route {
                    if *doc != d.key {
                        continue;
                    }
                }
                cursor = Some(&d.cursor);
                let state = match &d.new {
                    Some(doc)
                        if sub
                            .query
                            .filter
                            .as_ref()
                            .is_none_or(|f| query::matches(f, doc))
                            && rt.documents.readable(&sub.check, doc, &mut lookups).await =>
                    {
                        d.new_json().map(|json| (doc, json))
                    }
                    _ => None,
                };
                changes.extend(sub.window.apply(
                    &d.key,
                    d.op,
                    d.version(),
                    state.map(|(doc, json)| Visible { doc, json }),
                ));
            }
            if sub.window.needs_refill() {
                short.push((id.clone(), changes));
            } else if let (false, Some(cursor)) = (changes.is_empty(), cursor) {
                metrics::counter!("basalt_realtime_events_sent_total")
                    .increment(changes.len() as u64);
                self.outbox.send(protocol::changes(id, &changes, cursor));
            }
        }
        for (id, changes) in short {
            let Some(mut sub) = self.subs.remove(&id) else {
                continue;
            };
            match self.build(&sub, sub.pos).await {
                Ok((window, end)) => {
                    let changes = merge(changes, window.diff_from(&sub.window));
                    sub.window = window;
                    sub.pos = end;
                    if !changes.is_empty() {
                        metrics::counter!("basalt_realtime_events_sent_total")
                            .increment(changes.len() as u64);
                        self.send(protocol::changes(&id, &changes, &self.rt.seal.seal(end)));
                    }
                    self.subs.insert(id, sub);
                }
                Err(err) => {
                    self.drop_sub(&sub);
                    self.send_error(Some(&id), None, &err);
                }
            }
        }
    }

    /// Starts a subscription again from scratch (new identity, new rules): a snapshot with
    /// `reset: true`, or an error that ends it.
    async fn reset(&mut self, id: &str) {
        let Some(mut sub) = self.subs.remove(id) else {
            return;
        };
        let rebuilt = match self
            .rt
            .documents
            .read_check(&self.caller, &sub.collection)
            .await
        {
            Ok(check) => {
                sub.check = check;
                self.build(&sub, sub.pos).await
            }
            Err(err) => Err(err),
        };
        match rebuilt {
            Ok((window, end)) => {
                sub.window = window;
                sub.pos = end;
                self.send(protocol::snapshot(
                    id,
                    &sub.window.documents_json(),
                    &self.rt.seal.seal(end),
                    true,
                ));
                self.subs.insert(id.to_string(), sub);
            }
            Err(err) => {
                self.drop_sub(&sub);
                self.send_error(Some(id), None, &err);
            }
        }
    }

    /// After the inbox overflowed: reads what was dropped from the log and handles it.
    async fn recover(&mut self) {
        let upto = self.rt.hub.processed();
        let mut collections: HashMap<String, i64> = HashMap::new();
        for sub in self.subs.values() {
            let from = collections.entry(sub.collection.clone()).or_insert(sub.pos);
            *from = (*from).min(sub.pos);
        }
        for (collection, from) in collections {
            match self.changes_between(&collection, from, upto, None).await {
                Ok(events) => {
                    let deliveries: Vec<Arc<Delivery>> = events
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|e| Delivery::from_event(e, &self.rt.seal))
                        .map(Arc::new)
                        .collect();
                    for chunk in deliveries.chunks(DELIVERY_BATCH) {
                        self.deliver(chunk).await;
                    }
                }
                Err(_) => {
                    // The missed changes are gone from the log: start those subscriptions
                    // again.
                    let ids: Vec<String> = self
                        .subs
                        .iter()
                        .filter(|(_, s)| s.collection == collection)
                        .map(|(id, _)| id.clone())
                        .collect();
                    for id in ids {
                        self.reset(&id).await;
                    }
                }
            }
        }
    }

    async fn heartbeat(&mut self) {
        // Silent: nothing read since the last ping, twice in a row. Counted in pings rather
        // than in time, so a connection kept busy (a large refill) does not blame its client.
        if self.last_heard < self.last_ping {
            self.unanswered += 1;
        } else {
            self.unanswered = 0;
        }
        if self.unanswered >= 2 {
            self.outbox
                .close(CLOSE_SILENT, "no message or pong for two heartbeats");
            return;
        }
        self.outbox.ping();
        self.last_ping = Instant::now();
        // A signed-out or revoked session (logout, an admin's disable) ends here rather than
        // at its token's expiry: one small read per user socket per heartbeat.
        if !self.session_is_live(&self.caller.clone()).await {
            self.end_identity(
                "the session was signed out or revoked: sign in again, then send `auth`",
            );
        }
        // New rules for a collection apply to open subscriptions from here.
        let mut changed = Vec::new();
        for (id, sub) in &self.subs {
            // The definition is re-read from the database now and then: compare what
            // matters, not the copy.
            let was = &sub.check.collection().row;
            match self.rt.documents.collection(&sub.collection).await {
                Ok(coll)
                    if coll.row.rules.get("read") == was.rules.get("read")
                        && coll.row.created_at == was.created_at => {}
                _ => changed.push(id.clone()),
            }
        }
        for id in changed {
            self.reset(&id).await;
        }
    }

    fn drop_sub(&self, sub: &Sub) {
        self.rt
            .hub
            .unregister(self.inbox.id, &sub.collection, &sub.route);
        metrics::gauge!("basalt_realtime_subscriptions").decrement(1.0);
    }

    fn finish(&mut self) {
        for (_, sub) in std::mem::take(&mut self.subs) {
            self.drop_sub(&sub);
        }
        for channel in std::mem::take(&mut self.channels).into_keys() {
            self.rt.channels.leave(&channel, &self.key);
        }
        self.outbox.close(1000, "");
        metrics::gauge!("basalt_realtime_connections").decrement(1.0);
    }
}

/// `first` then `then`, where a document removed in `first` and added back in `then` is one
/// `modified` (or nothing, when it is the same version).
fn merge(first: Vec<Change>, then: Vec<Change>) -> Vec<Change> {
    let id_of = |c: &Change| {
        serde_json::from_str::<Value>(c.json())
            .ok()
            .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_string))
    };
    let mut out = first;
    for change in then {
        let id = id_of(&change);
        let earlier = out
            .iter()
            .position(|c| matches!(c, Change::Removed(_)) && id.is_some() && id_of(c) == id);
        match (earlier, &change) {
            (Some(i), Change::Added(json)) => {
                if out[i].json() == json.as_ref() {
                    out.remove(i);
                } else {
                    out[i] = Change::Modified(json.clone());
                }
            }
            _ => out.push(change),
        }
    }
    out
}

async fn server_stopping(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stopping| *stopping).await;
}

fn behind() -> ApiError {
    ApiError::Unavailable(
        "realtime could not reach the end of the change log in time; subscribe again".into(),
    )
}

/// A subscription's `query`: `where`, `order_by` and `limit` as in `_query`.
fn parse_query(q: Value) -> ApiResult<Query> {
    let Some(object) = q.as_object() else {
        return Err(ApiError::invalid_with(
            "`query`: an object with `where`, `order_by` and `limit`",
            serde_json::json!({"field": "query"}),
        ));
    };
    if let Some(other) = object
        .keys()
        .find(|k| !["where", "order_by", "limit"].contains(&k.as_str()))
    {
        let shown: String = other.chars().take(64).collect();
        return Err(ApiError::invalid_with(
            format!("`query.{shown}`: subscriptions take `where`, `order_by` and `limit`"),
            serde_json::json!({"field": "query"}),
        ));
    }
    let request: QueryRequest =
        serde_json::from_value(q).map_err(|e| ApiError::invalid(format!("`query`: {e}")))?;
    Ok(Query::parse(request)?)
}
