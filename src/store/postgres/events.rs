//! The change stream on PostgreSQL: appending inside a write's own transaction, reading with
//! what a commit-order reader needs (`event_snapshot`), retention, durable consumers, and the
//! NOTIFY/LISTEN pair that wakes other nodes.
//!
//! Positions come from a sequence when an event is appended, so transactions take positions
//! in one order and commit in another. So that readers can tell when a position is final,
//! every appending transaction first takes a *shared* transaction-level advisory lock (the
//! `WITH x` below is produced before its rows' `nextval`) and holds it until it ends. Shared
//! locks never wait for each other, so writers are not serialised. A reader notes the
//! sequence's last value, then the transactions holding that lock: once none of those holds
//! it any more, every position up to that value is final (`crate::changes::tailer`).
//!
//! (A first version used the snapshot's list of in-progress transaction ids instead. It missed
//! transactions whose id is above the snapshot's `xmax` — the latest *completed* id plus one —
//! which are running but not listed, and a hostile-client test caught a skipped position.)

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::Value;
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{Postgres, Row, Transaction};

use super::{map_err, PgStore};
use crate::store::events::{CommitHook, ConsumerRow, Event, EventSnapshot, EventStore, NewEvent};
use crate::store::{Actor, EventOp, StoreResult};

/// How far retention has deleted (a `meta` key).
const PRUNED_THROUGH: &str = "events_pruned_through";
/// The channel nodes announce committed events on.
const CHANNEL: &str = "basalt_events";
/// The channel of realtime messages between nodes.
const REALTIME_CHANNEL: &str = "basalt_realtime";
/// Largest body sent as a NOTIFY payload (PostgreSQL's limit is 8000 bytes); larger ones go
/// through `realtime_messages`, and the payload is `#<id>`.
const MAX_NOTIFY_BODY: usize = 7900;
/// How long a large realtime message is kept for nodes to fetch.
const REALTIME_MESSAGE_TTL: &str = "5 minutes";
/// The advisory lock every appending transaction holds, shared, until it ends (two-key form:
/// `pg_locks` shows it as classid 1651731572 ('bslt'), objid 1, objsubid 2), taken before its
/// positions, with the transaction id the rows record.
const APPENDING: &str =
    "SELECT pg_advisory_xact_lock_shared(1651731572, 1) AS locked, pg_current_xact_id() AS xid";
const EVENT_COLUMNS: &str = "position, topic, key, op, actor_type, actor_id, time, data, old_data";

/// An event from a row of [`EVENT_COLUMNS`].
pub(crate) fn event_from_row(row: &PgRow) -> Result<Event, sqlx::Error> {
    let base = 0;
    Ok(Event {
        position: row.try_get(base)?,
        topic: row.try_get(base + 1)?,
        key: row.try_get(base + 2)?,
        op: EventOp::from_stored(row.try_get(base + 3)?),
        actor: Actor::from_stored(row.try_get(base + 4)?, row.try_get(base + 5)?),
        time: row.try_get(base + 6)?,
        data: row.try_get::<Option<Value>, _>(base + 7)?,
        old_data: row.try_get::<Option<Value>, _>(base + 8)?,
        payload_omitted: false,
    })
}

/// One unit of work on PostgreSQL: a transaction in which a write's rows and the events they
/// make are written; [`Unit::commit`] commits and hands the events to the change bus. Every
/// domain that writes goes through [`PgStore::begin_unit`].
pub(crate) struct Unit<'s> {
    pub tx: Transaction<'static, Postgres>,
    pub now: DateTime<Utc>,
    events: Vec<Event>,
    store: &'s PgStore,
}

impl Unit<'_> {
    /// Appends `events` now (so their positions are known); answers them.
    pub async fn append(&mut self, events: Vec<NewEvent>) -> StoreResult<&[Event]> {
        let from = self.events.len();
        let appended = append(&mut self.tx, self.now, events).await?;
        self.events.extend(appended);
        Ok(&self.events[from..])
    }

    /// Events appended by SQL of the caller's own (a collection drop), to publish too.
    pub fn appended(&mut self, events: Vec<Event>) {
        self.events.extend(events);
    }

    pub async fn commit(self) -> StoreResult<()> {
        self.tx.commit().await.map_err(map_err)?;
        self.store.hooks.committed(&self.events);
        Ok(())
    }
}

impl PgStore {
    pub(crate) async fn begin_unit(&self) -> StoreResult<Unit<'_>> {
        Ok(Unit {
            tx: self.pool.begin().await.map_err(map_err)?,
            now: Utc::now(),
            events: Vec::new(),
            store: self,
        })
    }
}

/// Appends `events` inside `tx` at `now`, in one statement; answers them with their
/// positions (in the order given).
async fn append(
    tx: &mut Transaction<'_, Postgres>,
    now: DateTime<Utc>,
    events: Vec<NewEvent>,
) -> StoreResult<Vec<Event>> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let mut topics = Vec::with_capacity(events.len());
    let mut keys = Vec::with_capacity(events.len());
    let mut ops = Vec::with_capacity(events.len());
    let mut kinds = Vec::with_capacity(events.len());
    let mut ids = Vec::with_capacity(events.len());
    let mut data = Vec::with_capacity(events.len());
    let mut old = Vec::with_capacity(events.len());
    for e in &events {
        topics.push(e.topic.as_str());
        keys.push(e.key.as_str());
        ops.push(e.op.as_str());
        kinds.push(e.actor.kind);
        ids.push(e.actor.id.as_str());
        data.push(e.data.clone());
        old.push(e.old_data.clone());
    }
    // `nextval` is volatile, so it is evaluated after the sort, in `n` order: positions follow
    // the order of the writes in the transaction.
    let positions: Vec<i64> = sqlx::query_scalar(&format!(
        "WITH x AS ({APPENDING})
         INSERT INTO events (position, xid, topic, key, op, actor_type, actor_id, time, data, old_data)
         SELECT nextval('events_position_seq'), x.xid, e.topic, e.key, e.op, e.kind, e.id, $8,
                e.data, e.old
         FROM x, unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::jsonb[],
                        $7::jsonb[]) WITH ORDINALITY AS e(topic, key, op, kind, id, data, old, n)
         ORDER BY e.n
         RETURNING position"
    ))
    .bind(&topics)
    .bind(&keys)
    .bind(&ops)
    .bind(&kinds)
    .bind(&ids)
    .bind(&data)
    .bind(&old)
    .bind(now)
    .fetch_all(&mut **tx)
    .await
    .map_err(map_err)?;
    let mut positions = positions;
    // RETURNING gives rows in insertion order, which is `n` order; sorting is a safeguard
    // that costs nothing for a few rows.
    positions.sort_unstable();
    Ok(events
        .into_iter()
        .zip(positions)
        .map(|(e, position)| Event {
            position,
            topic: e.topic,
            key: e.key,
            op: e.op,
            actor: e.actor,
            time: now,
            data: e.data,
            old_data: e.old_data,
            payload_omitted: false,
        })
        .collect())
}

/// Deletes every document of `collection` and appends a `delete` event for each.
pub(crate) async fn drop_collection(
    tx: &mut Transaction<'_, Postgres>,
    now: DateTime<Utc>,
    collection: &str,
    actor: &Actor,
) -> StoreResult<Vec<Event>> {
    let rows = sqlx::query(&format!(
        "WITH x AS ({APPENDING}),
              d AS (DELETE FROM documents WHERE collection = $1
                    RETURNING id, data, version, created_at, updated_at)
         INSERT INTO events (position, xid, topic, key, op, actor_type, actor_id, time, data, old_data)
         SELECT nextval('events_position_seq'), x.xid, $2, d.id, 'delete', $3, $4, $5, NULL,
                jsonb_build_object('id', d.id, 'data', d.data, 'version', d.version,
                    'created_at', to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
                    'updated_at', to_char(d.updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'))
         FROM x, d ORDER BY d.id
         RETURNING {EVENT_COLUMNS}"
    ))
    .bind(collection)
    .bind(crate::store::document_topic(collection))
    .bind(actor.kind)
    .bind(&actor.id)
    .bind(now)
    .fetch_all(&mut **tx)
    .await
    .map_err(map_err)?;
    let mut events = rows
        .iter()
        .map(event_from_row)
        .collect::<Result<Vec<_>, _>>()
        .map_err(map_err)?;
    events.sort_by_key(|e| e.position);
    Ok(events)
}

fn consumer_from_row(row: &PgRow) -> Result<ConsumerRow, sqlx::Error> {
    Ok(ConsumerRow {
        name: row.try_get(0)?,
        position: row.try_get(1)?,
        created_at: row.try_get(2)?,
        updated_at: row.try_get(3)?,
    })
}

#[async_trait]
impl EventStore for PgStore {
    fn set_commit_hook(&self, hook: CommitHook) {
        self.hooks.set(hook);
    }

    async fn events_after(
        &self,
        after: i64,
        upto: Option<i64>,
        topic_prefix: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<Event>> {
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events
             WHERE position > $1 AND ($2::bigint IS NULL OR position <= $2)
               AND ($3::text IS NULL
                    OR (right($3, 1) = '/' AND starts_with(topic, $3))
                    OR (right($3, 1) <> '/' AND (topic = $3 OR starts_with(topic, $3 || '/'))))
             ORDER BY position LIMIT $4"
        ))
        .bind(after)
        .bind(upto)
        .bind(topic_prefix)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(event_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn event_snapshot(&self, after: i64, limit: u32) -> StoreResult<EventSnapshot> {
        // In this order: the last position handed out, then who may still be committing one
        // (everyone who took a position at or below it held the lock before taking it), then
        // the events — so whatever those transactions committed is in the read.
        let through = self.last_position().await?;
        let appending: Vec<String> = sqlx::query_scalar(
            "SELECT virtualtransaction FROM pg_locks
             WHERE locktype = 'advisory' AND classid = 1651731572 AND objid = 1
               AND objsubid = 2 AND granted",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        let events = self.events_after(after, None, None, limit).await?;
        Ok(EventSnapshot {
            through,
            appending,
            events,
        })
    }

    async fn last_position(&self) -> StoreResult<i64> {
        let (last, called): (i64, bool) =
            sqlx::query_as("SELECT last_value, is_called FROM events_position_seq")
                .fetch_one(&self.pool)
                .await
                .map_err(map_err)?;
        Ok(if called { last } else { last - 1 })
    }

    async fn pruned_through(&self) -> StoreResult<i64> {
        let value: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(PRUNED_THROUGH)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(value.and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    async fn prune_events(
        &self,
        before: DateTime<Utc>,
        keep_after: Option<i64>,
    ) -> StoreResult<u64> {
        let mut tx = self.pool.begin().await.map_err(map_err)?;
        let max: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(position) FROM events
             WHERE time < $1 AND ($2::bigint IS NULL OR position <= $2)",
        )
        .bind(before)
        .bind(keep_after)
        .fetch_one(&mut *tx)
        .await
        .map_err(map_err)?;
        let Some(max) = max else { return Ok(0) };
        // Everything up to the newest expired event goes, so the log never has a hole that a
        // reader could mistake for continuity.
        let done = sqlx::query("DELETE FROM events WHERE position <= $1")
            .bind(max)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value
             WHERE excluded.value::bigint > meta.value::bigint",
        )
        .bind(PRUNED_THROUGH)
        .bind(max.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        tx.commit().await.map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn register_consumer(&self, name: &str, position: i64) -> StoreResult<ConsumerRow> {
        sqlx::query(
            "INSERT INTO consumers (name, position, created_at, updated_at)
             VALUES ($1, $2, now(), now()) ON CONFLICT (name) DO NOTHING",
        )
        .bind(name)
        .bind(position)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        let row = sqlx::query(
            "SELECT name, position, created_at, updated_at FROM consumers WHERE name = $1",
        )
        .bind(name)
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        consumer_from_row(&row).map_err(map_err)
    }

    async fn consumers(&self) -> StoreResult<Vec<ConsumerRow>> {
        let rows = sqlx::query(
            "SELECT name, position, created_at, updated_at FROM consumers ORDER BY name",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(consumer_from_row)
            .collect::<Result<_, _>>()
            .map_err(map_err)
    }

    async fn advance_consumer(&self, name: &str, from: i64, to: i64) -> StoreResult<bool> {
        let done = sqlx::query(
            "UPDATE consumers SET position = $3, updated_at = now()
             WHERE name = $1 AND position = $2",
        )
        .bind(name)
        .bind(from)
        .bind(to)
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_consumer(&self, name: &str) -> StoreResult<bool> {
        let done = sqlx::query("DELETE FROM consumers WHERE name = $1")
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(done.rows_affected() == 1)
    }

    async fn announce(&self) -> StoreResult<()> {
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(CHANNEL)
            .execute(&self.pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn announcements(&self) -> StoreResult<Option<BoxStream<'static, ()>>> {
        let mut listener = PgListener::connect_with(&self.listen_pool)
            .await
            .map_err(map_err)?;
        listener.listen(CHANNEL).await.map_err(map_err)?;
        let stream = listener
            .into_stream()
            .take_while(|n| std::future::ready(n.is_ok()))
            .map(|_| ());
        Ok(Some(stream.boxed()))
    }

    async fn send_to_nodes(&self, body: &str) -> StoreResult<()> {
        let payload = if body.len() <= MAX_NOTIFY_BODY && !body.starts_with('#') {
            body.to_string()
        } else {
            let id: i64 =
                sqlx::query_scalar("INSERT INTO realtime_messages (body) VALUES ($1) RETURNING id")
                    .bind(body)
                    .fetch_one(&self.listen_pool)
                    .await
                    .map_err(map_err)?;
            // Old large messages go as new ones come; no node reads them after a few seconds.
            if id % 64 == 0 {
                sqlx::query(&format!(
                    "DELETE FROM realtime_messages WHERE created_at < now() - interval '{REALTIME_MESSAGE_TTL}'"
                ))
                .execute(&self.listen_pool)
                .await
                .map_err(map_err)?;
            }
            format!("#{id}")
        };
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(REALTIME_CHANNEL)
            .bind(payload)
            .execute(&self.listen_pool)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    async fn node_messages(&self) -> StoreResult<Option<BoxStream<'static, String>>> {
        let mut listener = PgListener::connect_with(&self.listen_pool)
            .await
            .map_err(map_err)?;
        listener.listen(REALTIME_CHANNEL).await.map_err(map_err)?;
        let pool = self.pool.clone();
        let stream = listener
            .into_stream()
            .take_while(|n| std::future::ready(n.is_ok()))
            .filter_map(move |n| {
                let pool = pool.clone();
                async move {
                    let payload = n.ok()?.payload().to_string();
                    let Some(id) = payload.strip_prefix('#') else {
                        return Some(payload);
                    };
                    let id: i64 = id.parse().ok()?;
                    sqlx::query_scalar("SELECT body FROM realtime_messages WHERE id = $1")
                        .bind(id)
                        .fetch_optional(&pool)
                        .await
                        .ok()
                        .flatten()
                }
            });
        Ok(Some(stream.boxed()))
    }
}
