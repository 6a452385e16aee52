//! The change stream's storage (API.md § Change stream): one ordered log of events that every
//! domain appends to inside the transaction of its own write, durable consumer positions,
//! and retention. Each dialect implements [`EventStore`] and an `append` used by its own
//! writes (documents, users, soon objects and deployments), so a domain never writes event SQL
//! itself. Fan-out to subscribers and nodes is `crate::changes`, outside the store.

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{StoreResult, UserRow};

/// Who made a change, as recorded on events and in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct Actor {
    /// `user`, `admin`, `service` or `system`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub id: String,
}

impl Actor {
    pub fn system(id: &str) -> Actor {
        Actor {
            kind: "system",
            id: id.to_string(),
        }
    }

    pub(crate) fn from_stored(kind: &str, id: Option<String>) -> Actor {
        let kind = match kind {
            "user" => "user",
            "admin" => "admin",
            "service" => "service",
            _ => "system",
        };
        Actor {
            kind,
            id: id.unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum EventOp {
    Create,
    Update,
    Delete,
}

impl EventOp {
    pub fn as_str(self) -> &'static str {
        match self {
            EventOp::Create => "create",
            EventOp::Update => "update",
            EventOp::Delete => "delete",
        }
    }

    /// An op as stored (written by [`EventOp::as_str`]).
    pub(crate) fn from_stored(s: &str) -> EventOp {
        EventOp::parse(s).unwrap_or(EventOp::Update)
    }

    pub fn parse(s: &str) -> Option<EventOp> {
        match s {
            "create" => Some(EventOp::Create),
            "update" => Some(EventOp::Update),
            "delete" => Some(EventOp::Delete),
            _ => None,
        }
    }
}

/// An event to append: what changed (`topic` + `key`), how, by whom, and the payload before
/// and after.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// `db/<collection>`, `auth/users`, `storage/<bucket>`, `functions/<name>`.
    pub topic: String,
    pub key: String,
    pub op: EventOp,
    pub actor: Actor,
    pub data: Option<Value>,
    pub old_data: Option<Value>,
}

/// An appended event (API.md § Change stream).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Event {
    /// Grows in commit order on every node: a reader that has seen position P never later
    /// finds a committed event below P.
    pub position: i64,
    pub topic: String,
    pub key: String,
    pub op: EventOp,
    pub actor: Actor,
    pub time: DateTime<Utc>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    #[schema(value_type = Option<Object>)]
    pub old_data: Option<Value>,
    /// Set on the in-memory bus when `data`/`old_data` were left out for their size: read the
    /// event by position for them. Never set on events read from the log.
    #[serde(skip)]
    pub payload_omitted: bool,
}

/// A durable consumer: a name and how far it has read.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ConsumerRow {
    pub name: String,
    pub position: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Called once a transaction that appended events has committed, with those events in
/// position order. On SQLite it runs on the writer thread before the next group starts, so
/// calls arrive in commit order; on PostgreSQL it runs on the committing task, in any order
/// (the change bus treats it as a wake-up and reads the log in commit order itself).
pub type CommitHook = Arc<dyn Fn(&[Event]) + Send + Sync>;

/// Where a store keeps its commit hook (set once, by the change bus, at start).
#[derive(Default)]
pub struct CommitHooks(OnceLock<CommitHook>);

impl CommitHooks {
    pub fn set(&self, hook: CommitHook) {
        if self.0.set(hook).is_err() {
            tracing::warn!("a commit hook was already installed; keeping the first");
        }
    }

    pub fn committed(&self, events: &[Event]) {
        if events.is_empty() {
            return;
        }
        if let Some(hook) = self.0.get() {
            hook(events);
        }
    }
}

/// What a read of the log found, with what a PostgreSQL reader needs to keep commit order.
#[derive(Debug, Clone, Default)]
pub struct EventSnapshot {
    /// Every position at or below this had been handed out before `appending` was taken.
    pub through: i64,
    /// The transactions that were appending events (holding positions they may not have
    /// committed) when the read was taken, by an id unique to each transaction. Once none of
    /// them is appending any more, every position up to `through` is final. Always empty on
    /// SQLite, whose single writer commits in position order.
    pub appending: Vec<String>,
    /// The events after the position asked for, read after `through` and `appending`.
    pub events: Vec<Event>,
}

#[async_trait]
pub trait EventStore: Send + Sync {
    /// Installs the hook told about every commit that appended events.
    fn set_commit_hook(&self, hook: CommitHook);

    /// Events with `after < position <= upto` (any position when `upto` is `None`) of topic
    /// `topic_prefix` — a topic and its subtopics (`db/posts`), or, ending with `/`, every
    /// topic under it (`db/`) — oldest first. Readers that must never pass a
    /// position still being committed take `upto` from the change bus.
    async fn events_after(
        &self,
        after: i64,
        upto: Option<i64>,
        topic_prefix: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<Event>>;

    /// The next events after `after`, with what tells which positions are final (see
    /// [`EventSnapshot`]).
    async fn event_snapshot(&self, after: i64, limit: u32) -> StoreResult<EventSnapshot>;

    /// The highest position appended so far (0 when none).
    async fn last_position(&self) -> StoreResult<i64>;

    /// The highest position retention has deleted up to (0 when none): reading from below it
    /// would silently skip events, so it is answered as expired.
    async fn pruned_through(&self) -> StoreResult<i64>;

    /// Deletes events older than `before` with a position at most `keep_after` (the slowest
    /// registered consumer's position, when there is one) and records how far it went.
    /// Returns how many were deleted.
    async fn prune_events(
        &self,
        before: DateTime<Utc>,
        keep_after: Option<i64>,
    ) -> StoreResult<u64>;

    /// Registers consumer `name` at `position` unless it exists; returns it as stored.
    async fn register_consumer(&self, name: &str, position: i64) -> StoreResult<ConsumerRow>;
    async fn consumers(&self) -> StoreResult<Vec<ConsumerRow>>;
    /// Moves consumer `name` from `from` to `to`, only if it is still at `from` (another node
    /// may have moved it meanwhile). `false` when it was not.
    async fn advance_consumer(&self, name: &str, from: i64, to: i64) -> StoreResult<bool>;
    async fn delete_consumer(&self, name: &str) -> StoreResult<bool>;

    /// Tells the other nodes sharing the database that events were committed (PostgreSQL:
    /// `NOTIFY` from outside any write transaction, so committing writers are not serialised
    /// on the notification queue; SQLite: nothing, it has no other nodes).
    async fn announce(&self) -> StoreResult<()>;

    /// Other nodes' announcements, as wake-ups (PostgreSQL: `LISTEN` on a connection of its
    /// own; SQLite: `None`). The stream ends when that connection is lost.
    async fn announcements(&self) -> StoreResult<Option<BoxStream<'static, ()>>>;

    /// Sends a realtime message (channel broadcasts, presence) to every node sharing the
    /// database, this one included (PostgreSQL: `NOTIFY`, a body too large for a payload kept
    /// in a table for a few minutes and sent by id; SQLite: nothing, it has no other nodes).
    async fn send_to_nodes(&self, body: &str) -> StoreResult<()>;

    /// Realtime messages sent by any node, in the order the database delivers them
    /// (PostgreSQL: `LISTEN` on a connection of its own; SQLite: `None`). The stream ends when
    /// that connection is lost: messages sent meanwhile are not seen.
    async fn node_messages(&self) -> StoreResult<Option<BoxStream<'static, String>>>;
}

/// The topic of a collection's documents.
pub fn document_topic(collection: &str) -> String {
    format!("db/{collection}")
}

/// The topic of user accounts.
pub const USERS_TOPIC: &str = "auth/users";

/// A user as events carry it: the API's `user` (never the password hash).
pub fn user_json(u: &UserRow) -> Value {
    let time = |t: &DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    serde_json::json!({
        "id": u.id,
        "email": u.email,
        "email_verified": u.email_verified,
        "is_anonymous": u.is_anonymous,
        "data": u.data,
        "claims": u.claims,
        "providers": u.providers,
        "mfa_enabled": u.mfa_enabled,
        "disabled": u.disabled,
        "created_at": time(&u.created_at),
        "updated_at": time(&u.updated_at),
        "last_sign_in_at": u.last_sign_in_at.as_ref().map(time),
    })
}

/// The event of a user written (`data`: as it is now; `old_data`: as it was).
pub(crate) fn user_event(
    op: EventOp,
    user: &UserRow,
    before: Option<&UserRow>,
    actor: Actor,
) -> NewEvent {
    NewEvent {
        topic: USERS_TOPIC.into(),
        key: user.id.clone(),
        op,
        actor,
        data: Some(user_json(user)),
        old_data: before.map(user_json),
    }
}

/// The event of a user deleted.
pub(crate) fn user_deleted(before: &UserRow, actor: Actor) -> NewEvent {
    NewEvent {
        topic: USERS_TOPIC.into(),
        key: before.id.clone(),
        op: EventOp::Delete,
        actor,
        data: None,
        old_data: Some(user_json(before)),
    }
}
