//! The change bus (API.md § Change stream): every committed event of every domain, in
//! position order, to whoever subscribes in this process — and the reads, durable consumers
//! and retention of the log behind it. Realtime, function triggers and outside consumers
//! (`GET /v1/admin/changes`) all read through it.
//!
//! - **SQLite** (one node): the store's writer thread hands each committed group's events to
//!   the bus, already in position order; they are published at once.
//! - **PostgreSQL** (one or many nodes): the bus tails the log itself ([`tailer`]) and
//!   publishes in commit order. It is woken by this node's commits, by other nodes'
//!   announcements (`NOTIFY`, sent after commit from outside any write transaction), and by a
//!   safety poll; so a write through node A reaches node B's bus.
//!
//! The in-memory fan-out is lossy by design (a bounded broadcast): a subscriber that falls
//! behind gets `Lagged` and reads the missed positions from the log with
//! [`ChangeBus::read`]. Events whose payload is large are published without it
//! (`payload_omitted`); read them by position.
//!
//! Readers of the log never see past the **watermark**: the highest position below which
//! every event is final, so a reader that has seen position P never later finds a committed
//! event below P. Retention never deletes past the slowest registered durable consumer
//! (within `changes.consumer_max_lag_hours`), and a read from a position older than the
//! retained log is [`ChangesError::Expired`], never a silent gap.

pub(crate) mod tailer;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use futures::StreamExt;
use tokio::sync::{broadcast, watch, Notify};

use crate::config::ChangesConfig;
use crate::store::{ConsumerRow, Event, Store, StoreError};
use tailer::Tailer;

/// Events the bus keeps for slow subscribers before they lag.
const BUS_CAPACITY: usize = 4096;
/// Payloads larger than this (estimated JSON bytes, `data` + `old_data`) stay out of memory.
const MAX_BUS_PAYLOAD: usize = 64 * 1024;
/// Events read per tailer round.
const TAIL_BATCH: u32 = 1000;
/// How soon the tailer looks again while a transaction it saw in progress may still fill a
/// position (without being woken otherwise: `changes.poll_interval_ms`).
const WAITING_POLL: Duration = Duration::from_millis(5);
/// How long to wait before retrying a lost listening connection or a failed read.
const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ChangesError {
    /// The position is older than the retained log: events after it were deleted.
    #[error("position {after} is older than the retained change log (kept from {first})")]
    Expired { after: i64, first: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct ChangeBus {
    store: Arc<dyn Store>,
    config: ChangesConfig,
    events: broadcast::Sender<Arc<Event>>,
    watermark: watch::Sender<i64>,
    /// Wakes the PostgreSQL tailer (this node committed).
    wake: Arc<Notify>,
    /// Wakes the announcer (tell other nodes); coalesces bursts of commits into one NOTIFY.
    announce: Arc<Notify>,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl ChangeBus {
    /// Starts the bus on `store`: from the current end of the log, installing the store's
    /// commit hook, and on PostgreSQL the tailer, listener and announcer tasks.
    pub async fn start(store: Arc<dyn Store>, config: ChangesConfig) -> anyhow::Result<Arc<Self>> {
        let start = store.last_position().await?;
        let sqlite = store.dialect() == "sqlite";
        let bus = Arc::new(ChangeBus {
            events: broadcast::channel(BUS_CAPACITY).0,
            watermark: watch::channel(if sqlite { start } else { 0 }).0,
            wake: Arc::new(Notify::new()),
            announce: Arc::new(Notify::new()),
            tasks: Mutex::new(Vec::new()),
            store: store.clone(),
            config,
        });
        if sqlite {
            // Runs on the writer thread after each commit, before the next group: in order.
            let weak = Arc::downgrade(&bus);
            store.set_commit_hook(Arc::new(move |events: &[Event]| {
                if let Some(bus) = weak.upgrade() {
                    bus.publish(events.iter().cloned());
                }
            }));
            return Ok(bus);
        }
        let (wake, announce) = (bus.wake.clone(), bus.announce.clone());
        store.set_commit_hook(Arc::new(move |_events: &[Event]| {
            wake.notify_one();
            announce.notify_one();
        }));
        let tasks = vec![
            tokio::spawn(tail(
                Arc::downgrade(&bus),
                start,
                Duration::from_millis(bus.config.poll_interval_ms.max(1)),
            )),
            tokio::spawn(listen(Arc::downgrade(&bus))),
            tokio::spawn(announce_commits(Arc::downgrade(&bus))),
        ];
        *bus.tasks.lock().unwrap_or_else(|p| p.into_inner()) = tasks;
        Ok(bus)
    }

    /// Stops the background tasks (at shutdown; tests start many buses in one process).
    pub fn stop(&self) {
        for task in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            task.abort();
        }
    }

    /// Every event committed from now on, in position order. Lossy: on `Lagged`, read the
    /// missed positions with [`ChangeBus::read`].
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.events.subscribe()
    }

    /// Every position at or below this is final (committed, or never to be).
    pub fn watermark(&self) -> i64 {
        *self.watermark.borrow()
    }

    /// Follows the watermark as it moves.
    pub fn watch(&self) -> watch::Receiver<i64> {
        self.watermark.subscribe()
    }

    fn publish(&self, events: impl IntoIterator<Item = Event>) {
        let mut last = None;
        for mut event in events {
            last = Some(event.position);
            if payload_size(&event) > MAX_BUS_PAYLOAD {
                event.data = None;
                event.old_data = None;
                event.payload_omitted = true;
            }
            // Nobody listening is not an error.
            let _ = self.events.send(Arc::new(event));
        }
        if let Some(last) = last {
            self.watermark.send_if_modified(|w| {
                let moved = last > *w;
                *w = (*w).max(last);
                moved
            });
        }
    }

    /// Events after `after` (up to the watermark) whose topic starts with `topic`, oldest
    /// first, at most `limit`. A position older than the retained log is `Expired`.
    pub async fn read(
        &self,
        after: i64,
        topic: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Event>, ChangesError> {
        let pruned = self.store.pruned_through().await?;
        if after < pruned {
            return Err(ChangesError::Expired {
                after,
                first: pruned + 1,
            });
        }
        let upto = self.watermark();
        if after >= upto {
            return Ok(Vec::new());
        }
        Ok(self
            .store
            .events_after(after, Some(upto), topic, limit)
            .await?)
    }

    /// The event at `position` (topic `topic`), read whatever the watermark: for an event the
    /// bus published without its payload, which is committed but may be above the watermark
    /// for a moment yet. `None` when it is not there (pruned, or another topic).
    pub async fn event_at(
        &self,
        position: i64,
        topic: &str,
    ) -> Result<Option<Event>, ChangesError> {
        Ok(self
            .store
            .events_after(position - 1, Some(position), Some(topic), 1)
            .await?
            .into_iter()
            .find(|e| e.position == position && e.topic == topic))
    }

    /// Where reading from the start begins: just before the oldest retained event.
    pub async fn oldest_retained(&self) -> Result<i64, ChangesError> {
        Ok(self.store.pruned_through().await?)
    }

    /// The newest position appended on any node (it may not be final yet).
    pub async fn last_position(&self) -> Result<i64, ChangesError> {
        Ok(self.store.last_position().await?)
    }

    // ---------------------------------------------------------------- durable consumers

    /// Registers a durable consumer (idempotent): new ones start at the current watermark.
    /// While registered, retention keeps every event after its position.
    pub async fn register_consumer(&self, name: &str) -> Result<ConsumerRow, ChangesError> {
        Ok(self.store.register_consumer(name, self.watermark()).await?)
    }

    /// The next events for consumer `name` (after its stored position).
    pub async fn next_for(
        &self,
        consumer: &ConsumerRow,
        topic: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Event>, ChangesError> {
        self.read(consumer.position, topic, limit).await
    }

    /// Records that consumer `name` has handled everything up to `to`, if it is still at
    /// `from` (compare-and-set: with several nodes, one advance wins). `false` when another
    /// node moved it first.
    pub async fn advance(&self, name: &str, from: i64, to: i64) -> Result<bool, ChangesError> {
        Ok(self.store.advance_consumer(name, from, to).await?)
    }

    pub async fn consumers(&self) -> Result<Vec<ConsumerRow>, ChangesError> {
        Ok(self.store.consumers().await?)
    }

    pub async fn remove_consumer(&self, name: &str) -> Result<bool, ChangesError> {
        Ok(self.store.delete_consumer(name).await?)
    }

    // ---------------------------------------------------------------- retention

    /// Deletes events past `retention_hours`, never past a registered consumer's position
    /// unless that consumer has not moved for `consumer_max_lag_hours` (then it is reported,
    /// and its lag no longer holds the log). Publishes each consumer's lag as a metric.
    pub async fn prune(&self, retention_hours: u64) -> Result<u64, ChangesError> {
        let now = Utc::now();
        let watermark = self.watermark();
        let stale_before = now - chrono::Duration::hours(self.config.consumer_max_lag_hours as i64);
        let mut keep_after: Option<i64> = None;
        for c in self.store.consumers().await? {
            let lag = (watermark - c.position).max(0);
            metrics::gauge!("basalt_change_consumer_lag", "consumer" => c.name.clone())
                .set(lag as f64);
            if c.updated_at < stale_before && lag > 0 {
                tracing::warn!(consumer = %c.name, position = c.position, lag,
                    "a durable consumer has not moved for longer than changes.consumer_max_lag_hours; retention no longer waits for it");
                continue;
            }
            keep_after = Some(keep_after.map_or(c.position, |k| k.min(c.position)));
        }
        // Never past what readers may have seen: the log up to the watermark is final.
        let keep_after = Some(keep_after.map_or(watermark, |k| k.min(watermark)));
        let before = now - chrono::Duration::hours(retention_hours as i64);
        Ok(self.store.prune_events(before, keep_after).await?)
    }
}

impl Drop for ChangeBus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A rough size of an event's payload in JSON bytes (cheap: no serialisation).
fn payload_size(event: &Event) -> usize {
    fn size(v: &serde_json::Value) -> usize {
        match v {
            serde_json::Value::Null | serde_json::Value::Bool(_) => 5,
            serde_json::Value::Number(_) => 12,
            serde_json::Value::String(s) => s.len() + 2,
            serde_json::Value::Array(a) => 2 + a.iter().map(|x| size(x) + 1).sum::<usize>(),
            serde_json::Value::Object(o) => {
                2 + o.iter().map(|(k, x)| k.len() + 4 + size(x)).sum::<usize>()
            }
        }
    }
    event.data.as_ref().map_or(0, size) + event.old_data.as_ref().map_or(0, size)
}

/// The PostgreSQL tailer: reads the log in commit order and publishes it.
async fn tail(bus: std::sync::Weak<ChangeBus>, start: i64, safety_poll: Duration) {
    let mut tailer = Tailer::new(start);
    loop {
        let Some(bus) = bus.upgrade() else { return };
        let wake = bus.wake.clone();
        let after = tailer.delivered();
        match bus.store.event_snapshot(after, TAIL_BATCH).await {
            Ok(snapshot) => {
                let full = snapshot.events.len() as u32 >= TAIL_BATCH;
                let deliver = tailer.observe(snapshot);
                let progressed = !deliver.is_empty();
                bus.publish(deliver);
                let watermark = tailer.watermark();
                bus.watermark.send_if_modified(|w| {
                    let moved = watermark > *w;
                    *w = (*w).max(watermark);
                    moved
                });
                let waiting = tailer.waiting();
                drop(bus);
                if full && progressed {
                    continue;
                }
                let pause = if waiting { WAITING_POLL } else { safety_poll };
                let _ = tokio::time::timeout(pause, wake.notified()).await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "could not read the change log; retrying");
                drop(bus);
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Wakes the tailer when another node announces a commit. Reconnects when the listening
/// connection is lost (the safety poll covers the gap).
async fn listen(bus: std::sync::Weak<ChangeBus>) {
    loop {
        let Some(strong) = bus.upgrade() else { return };
        let (store, wake) = (strong.store.clone(), strong.wake.clone());
        drop(strong);
        match store.announcements().await {
            Ok(Some(mut stream)) => {
                while stream.next().await.is_some() {
                    wake.notify_one();
                }
                tracing::warn!(
                    "lost the connection listening for other nodes' changes; reconnecting"
                );
            }
            Ok(None) => return,
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for other nodes' changes; retrying")
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Tells other nodes about this node's commits: one NOTIFY per burst, sent from outside any
/// write transaction (a NOTIFY inside one would serialise every committing writer).
async fn announce_commits(bus: std::sync::Weak<ChangeBus>) {
    loop {
        let Some(strong) = bus.upgrade() else { return };
        let (store, announce) = (strong.store.clone(), strong.announce.clone());
        drop(strong);
        announce.notified().await;
        if let Err(err) = store.announce().await {
            tracing::debug!(error = %err, "could not announce a commit; other nodes will poll");
        }
    }
}
