//! The change stream on SQLite: appending inside a write's own transaction (on the writer
//! thread, so positions are taken and committed in one order), reading, retention and
//! durable consumers.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use rusqlite::{params, OptionalExtension, Row, Transaction};
use serde_json::Value;

use super::{map_err, parse_ts, ts, SqliteStore};
use crate::store::events::{CommitHook, ConsumerRow, Event, EventSnapshot, EventStore, NewEvent};
use crate::store::{Actor, EventOp, StoreResult};

/// How far retention has deleted (a `meta` key).
const PRUNED_THROUGH: &str = "events_pruned_through";
const EVENT_COLUMNS: &str = "position, topic, key, op, actor_type, actor_id, time, data, old_data";

fn json_opt(row: &Row<'_>, idx: usize) -> rusqlite::Result<Option<Value>> {
    let text: Option<String> = row.get(idx)?;
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(idx, rusqlite::types::Type::Text, Box::new(e))
        })
    })
    .transpose()
}

pub(crate) fn event_from_row(row: &Row<'_>) -> rusqlite::Result<Event> {
    Ok(Event {
        position: row.get(0)?,
        topic: row.get(1)?,
        key: row.get(2)?,
        op: EventOp::from_stored(&row.get::<_, String>(3)?),
        actor: Actor::from_stored(&row.get::<_, String>(4)?, row.get(5)?),
        time: parse_ts(&row.get::<_, String>(6)?)?,
        data: json_opt(row, 7)?,
        old_data: json_opt(row, 8)?,
        payload_omitted: false,
    })
}

/// One unit of work on SQLite: a write's rows and the events they make, in one transaction
/// on the writer thread; the events reach the change bus after commit, in commit order.
/// Every domain that writes goes through [`SqliteStore::write_unit`].
pub(crate) struct Unit<'a, 'c> {
    pub tx: &'a Transaction<'c>,
    pub now: DateTime<Utc>,
    events: Vec<Event>,
}

impl Unit<'_, '_> {
    /// Appends `events` now (so their positions are known); answers them.
    pub fn append(&mut self, events: Vec<NewEvent>) -> StoreResult<&[Event]> {
        let from = self.events.len();
        let appended = append(self.tx, self.now, events)?;
        self.events.extend(appended);
        Ok(&self.events[from..])
    }

    /// Events appended by SQL of the caller's own (a collection drop), to publish too.
    pub fn appended(&mut self, events: Vec<Event>) {
        self.events.extend(events);
    }
}

impl SqliteStore {
    /// Runs `f` as one unit of work (see [`Unit`]).
    pub(crate) async fn write_unit<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Unit<'_, '_>) -> StoreResult<T> + Send + 'static,
    {
        let hooks = self.hooks.clone();
        let (value, _) = self
            .write_then(
                move |tx| {
                    let mut unit = Unit {
                        tx,
                        now: Utc::now(),
                        events: Vec::new(),
                    };
                    let value = f(&mut unit)?;
                    Ok((value, unit.events))
                },
                move |(_, events)| hooks.committed(events),
            )
            .await?;
        Ok(value)
    }
}

/// Appends `events` inside `tx` at time `now`; answers them with their positions.
fn append(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    events: Vec<NewEvent>,
) -> StoreResult<Vec<Event>> {
    let mut stmt = tx
        .prepare_cached(
            "INSERT INTO events (topic, key, op, actor_type, actor_id, time, data, old_data)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) RETURNING position",
        )
        .map_err(map_err)?;
    let time = ts(&now);
    events
        .into_iter()
        .map(|e| {
            let position: i64 = stmt
                .query_row(
                    params![
                        e.topic,
                        e.key,
                        e.op.as_str(),
                        e.actor.kind,
                        e.actor.id,
                        time,
                        e.data.as_ref().map(Value::to_string),
                        e.old_data.as_ref().map(Value::to_string),
                    ],
                    |r| r.get(0),
                )
                .map_err(map_err)?;
            Ok(Event {
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
        })
        .collect()
}

/// Appends a `delete` event for every document of `collection` (before they are deleted).
pub(crate) fn append_collection_drop(
    tx: &Transaction<'_>,
    now: DateTime<Utc>,
    collection: &str,
    actor: &Actor,
) -> StoreResult<Vec<Event>> {
    let mut stmt = tx
        .prepare(&format!(
            "INSERT INTO events (topic, key, op, actor_type, actor_id, time, data, old_data)
             SELECT ?1, id, 'delete', ?2, ?3, ?4, NULL,
                    json_object('id', id, 'data', json(data), 'version', version,
                                'created_at', created_at, 'updated_at', updated_at)
             FROM documents WHERE collection = ?5 ORDER BY id
             RETURNING {EVENT_COLUMNS}"
        ))
        .map_err(map_err)?;
    let rows = stmt
        .query_map(
            params![
                crate::store::document_topic(collection),
                actor.kind,
                actor.id,
                ts(&now),
                collection
            ],
            event_from_row,
        )
        .map_err(map_err)?;
    let mut events = rows
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(map_err)?;
    events.sort_by_key(|e| e.position);
    Ok(events)
}

#[async_trait]
impl EventStore for SqliteStore {
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
        let prefix = topic_prefix.map(str::to_string);
        self.read(move |c| {
            let mut stmt = c
                .prepare_cached(&format!(
                    "SELECT {EVENT_COLUMNS} FROM events
                     WHERE position > ?1 AND (?2 IS NULL OR position <= ?2)
                       AND (?3 IS NULL
                            OR (substr(?3, -1) = '/' AND substr(topic, 1, length(?3)) = ?3)
                            OR (substr(?3, -1) <> '/'
                                AND (topic = ?3 OR substr(topic, 1, length(?3) + 1) = ?3 || '/')))
                     ORDER BY position LIMIT ?4"
                ))
                .map_err(map_err)?;
            let rows = stmt
                .query_map(params![after, upto, prefix, limit], event_from_row)
                .map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
        .await
    }

    async fn event_snapshot(&self, after: i64, limit: u32) -> StoreResult<EventSnapshot> {
        let through = self.last_position().await?;
        Ok(EventSnapshot {
            through,
            appending: Vec::new(),
            events: self.events_after(after, Some(through), None, limit).await?,
        })
    }

    async fn last_position(&self) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row(
                "SELECT MAX(COALESCE((SELECT MAX(position) FROM events), 0),
                            COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))",
                [],
                |r| r.get(0),
            )
            .map_err(map_err)
        })
        .await
    }

    async fn pruned_through(&self) -> StoreResult<i64> {
        self.read(|c| {
            c.query_row(
                "SELECT value FROM meta WHERE key = ?1",
                [PRUNED_THROUGH],
                |r| r.get::<_, String>(0),
            )
            .optional()
            .map(|v| v.and_then(|v| v.parse().ok()).unwrap_or(0))
            .map_err(map_err)
        })
        .await
    }

    async fn prune_events(
        &self,
        before: DateTime<Utc>,
        keep_after: Option<i64>,
    ) -> StoreResult<u64> {
        self.write(move |tx| {
            let (count, max): (i64, Option<i64>) = tx
                .query_row(
                    "SELECT COUNT(*), MAX(position) FROM events
                     WHERE time < ?1 AND (?2 IS NULL OR position <= ?2)",
                    params![ts(&before), keep_after],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .map_err(map_err)?;
            let Some(max) = max else { return Ok(0) };
            // Everything up to the newest deleted event goes, so the log never has a hole
            // that a reader could mistake for continuity.
            tx.execute("DELETE FROM events WHERE position <= ?1", [max])
                .map_err(map_err)?;
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value
                 WHERE CAST(excluded.value AS INTEGER) > CAST(meta.value AS INTEGER)",
                params![PRUNED_THROUGH, max.to_string()],
            )
            .map_err(map_err)?;
            Ok(count as u64)
        })
        .await
    }

    async fn register_consumer(&self, name: &str, position: i64) -> StoreResult<ConsumerRow> {
        let name = name.to_string();
        self.write(move |tx| {
            let now = ts(&Utc::now());
            tx.execute(
                "INSERT INTO consumers (name, position, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?3) ON CONFLICT (name) DO NOTHING",
                params![name, position, now],
            )
            .map_err(map_err)?;
            tx.query_row(
                "SELECT name, position, created_at, updated_at FROM consumers WHERE name = ?1",
                [&name],
                consumer_from_row,
            )
            .map_err(map_err)
        })
        .await
    }

    async fn consumers(&self) -> StoreResult<Vec<ConsumerRow>> {
        self.read(|c| {
            let mut stmt = c
                .prepare_cached(
                    "SELECT name, position, created_at, updated_at FROM consumers ORDER BY name",
                )
                .map_err(map_err)?;
            let rows = stmt.query_map([], consumer_from_row).map_err(map_err)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(map_err)
        })
        .await
    }

    async fn advance_consumer(&self, name: &str, from: i64, to: i64) -> StoreResult<bool> {
        let name = name.to_string();
        self.write(move |tx| {
            let n = tx
                .execute(
                    "UPDATE consumers SET position = ?3, updated_at = ?4
                     WHERE name = ?1 AND position = ?2",
                    params![name, from, to, ts(&Utc::now())],
                )
                .map_err(map_err)?;
            Ok(n == 1)
        })
        .await
    }

    async fn announce(&self) -> StoreResult<()> {
        Ok(())
    }

    async fn announcements(&self) -> StoreResult<Option<BoxStream<'static, ()>>> {
        Ok(None)
    }

    async fn send_to_nodes(&self, _body: &str) -> StoreResult<()> {
        Ok(())
    }

    async fn node_messages(&self) -> StoreResult<Option<BoxStream<'static, String>>> {
        Ok(None)
    }

    async fn delete_consumer(&self, name: &str) -> StoreResult<bool> {
        let name = name.to_string();
        self.write(move |tx| {
            let n = tx
                .execute("DELETE FROM consumers WHERE name = ?1", [name])
                .map_err(map_err)?;
            Ok(n == 1)
        })
        .await
    }
}

fn consumer_from_row(row: &Row<'_>) -> rusqlite::Result<ConsumerRow> {
    Ok(ConsumerRow {
        name: row.get(0)?,
        position: row.get(1)?,
        created_at: parse_ts(&row.get::<_, String>(2)?)?,
        updated_at: parse_ts(&row.get::<_, String>(3)?)?,
    })
}
