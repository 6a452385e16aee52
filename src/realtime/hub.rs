//! The hub: this node's one reader of the change bus for realtime. It follows the bus in
//! position order without a gap (reading the log when the in-memory bus lags, and fetching
//! events whose payload was too large for the bus), and routes each document change only to
//! the connections whose subscriptions could be affected: by collection, then by document id
//! or by an equality term of the query (`["owner", "==", "u1"]`), tried on the document both
//! before and after the change. Subscriptions it cannot narrow see every change of their
//! collection. Matching, rules and windows are the connection's work, not the hub's, so one
//! slow rule or one busy connection never holds up the others.
//!
//! Each connection has a bounded inbox; when it is full the change is dropped for that
//! connection and the inbox marked, and the connection reads what it missed from the log.
//!
//! The hub's **processed** position is what subscriptions start from: every change at or
//! below it has been routed before a route registered later existed, every change above it
//! will be routed to it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};

use super::cursor::PositionSeal;
use crate::changes::ChangeBus;
use crate::query::{Field, Filter, Op, Operand};
use crate::store::{Event, EventOp};

/// One document change, as connections receive it: decoded once for all of them.
#[derive(Debug)]
pub(crate) struct Delivery {
    pub(crate) position: i64,
    pub(crate) collection: String,
    pub(crate) key: String,
    pub(crate) op: EventOp,
    /// The document after the change (`None` for a delete), as the API shows it.
    pub(crate) new: Option<Value>,
    /// The document before the change (`None` for a create).
    pub(crate) old: Option<Value>,
    pub(crate) cursor: String,
    new_json: OnceLock<Arc<str>>,
}

impl Delivery {
    /// `None` for changes that are not to documents.
    pub(crate) fn from_event(event: &Event, seal: &PositionSeal) -> Option<Delivery> {
        let collection = event.topic.strip_prefix("db/")?;
        Some(Delivery {
            position: event.position,
            collection: collection.to_string(),
            key: event.key.clone(),
            op: event.op,
            new: event.data.clone(),
            old: event.old_data.clone(),
            cursor: seal.seal(event.position),
            new_json: OnceLock::new(),
        })
    }

    /// The new document serialised, once for every subscriber.
    pub(crate) fn new_json(&self) -> Option<Arc<str>> {
        let doc = self.new.as_ref()?;
        Some(
            self.new_json
                .get_or_init(|| Arc::from(doc.to_string()))
                .clone(),
        )
    }

    pub(crate) fn version(&self) -> i64 {
        self.new
            .as_ref()
            .or(self.old.as_ref())
            .and_then(|d| d.get("version"))
            .and_then(Value::as_i64)
            .unwrap_or(0)
    }
}

/// Where a connection's changes arrive.
pub(crate) struct Inbox {
    pub(crate) id: u64,
    tx: mpsc::Sender<Arc<Delivery>>,
    /// Set when a change was dropped because the inbox was full.
    pub(crate) overflowed: AtomicBool,
    /// The last position routed here (a change reaches a connection once, however many of
    /// its routes match).
    last_routed: AtomicI64,
}

impl Inbox {
    pub(crate) fn new(id: u64, capacity: usize) -> (Arc<Inbox>, mpsc::Receiver<Arc<Delivery>>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Arc::new(Inbox {
                id,
                tx,
                overflowed: AtomicBool::new(false),
                last_routed: AtomicI64::new(0),
            }),
            rx,
        )
    }
}

/// Which changes of a collection a subscription needs to see.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Route {
    All,
    Id(String),
    /// A data or metadata field equal to a value (see [`value_key`]).
    Eq(Field, String),
}

impl Route {
    /// The narrowest route a `where` allows: its `$id` equality, else one equality term of
    /// its top-level AND, else every change.
    pub(crate) fn of(filter: Option<&Filter>) -> Route {
        fn term(f: &Filter) -> Option<Route> {
            match f {
                Filter::Clause {
                    field,
                    op: Op::Eq,
                    value: Operand::Json(v),
                } => match (field, v) {
                    (Field::Id, Value::String(id)) => Some(Route::Id(id.clone())),
                    (Field::Data(_), v) => value_key(v).map(|k| Route::Eq(field.clone(), k)),
                    _ => None,
                },
                _ => None,
            }
        }
        match filter {
            Some(Filter::And(parts)) => {
                let terms: Vec<Route> = parts.iter().filter_map(term).collect();
                terms
                    .iter()
                    .find(|r| matches!(r, Route::Id(_)))
                    .or(terms.first())
                    .cloned()
                    .unwrap_or(Route::All)
            }
            Some(f) => term(f).unwrap_or(Route::All),
            None => Route::All,
        }
    }
}

/// A value as an index key, with the query's equality: numbers by value (`1` and `1.0` are
/// one key), strings and bools by themselves. Arrays and objects are not indexed.
pub(crate) fn value_key(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(format!("s{s}")),
        Value::Bool(b) => Some(format!("b{b}")),
        // -0 equals 0 (and is stored as 0 by one database but not the other).
        Value::Number(n) => n
            .as_f64()
            .map(|f| format!("n{}", if f == 0.0 { 0.0 } else { f })),
        Value::Null => Some("z".into()),
        _ => None,
    }
}

type Targets = HashMap<u64, (Arc<Inbox>, usize)>;

#[derive(Default)]
struct CollectionRoutes {
    all: Targets,
    by_id: HashMap<String, Targets>,
    by_eq: HashMap<Field, HashMap<String, Targets>>,
}

impl CollectionRoutes {
    fn targets_mut(&mut self, route: &Route) -> &mut Targets {
        match route {
            Route::All => &mut self.all,
            Route::Id(id) => self.by_id.entry(id.clone()).or_default(),
            Route::Eq(field, key) => self
                .by_eq
                .entry(field.clone())
                .or_default()
                .entry(key.clone())
                .or_default(),
        }
    }

    fn is_empty(&self) -> bool {
        self.all.is_empty() && self.by_id.is_empty() && self.by_eq.is_empty()
    }
}

pub(crate) struct Hub {
    routes: RwLock<HashMap<String, CollectionRoutes>>,
    processed: watch::Sender<i64>,
}

impl Hub {
    pub(crate) fn new(start: i64) -> Arc<Hub> {
        Arc::new(Hub {
            routes: RwLock::new(HashMap::new()),
            processed: watch::channel(start).0,
        })
    }

    /// Adds a route for `inbox`; answers the processed position at that moment: changes
    /// after it reach the inbox, changes at or before it did not.
    pub(crate) fn register(&self, inbox: &Arc<Inbox>, collection: &str, route: &Route) -> i64 {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let slot = routes
            .entry(collection.to_string())
            .or_default()
            .targets_mut(route)
            .entry(inbox.id)
            .or_insert_with(|| (inbox.clone(), 0));
        slot.1 += 1;
        *self.processed.borrow()
    }

    pub(crate) fn unregister(&self, inbox_id: u64, collection: &str, route: &Route) {
        let mut routes = self.routes.write().unwrap_or_else(|p| p.into_inner());
        let Some(coll) = routes.get_mut(collection) else {
            return;
        };
        let targets = coll.targets_mut(route);
        if let Some(slot) = targets.get_mut(&inbox_id) {
            slot.1 -= 1;
            if slot.1 == 0 {
                targets.remove(&inbox_id);
            }
        }
        // Drop emptied maps so a stream of distinct ids or values cannot grow them.
        match route {
            Route::All => {}
            Route::Id(id) => {
                if coll.by_id.get(id).is_some_and(|t| t.is_empty()) {
                    coll.by_id.remove(id);
                }
            }
            Route::Eq(field, key) => {
                if let Some(values) = coll.by_eq.get_mut(field) {
                    if values.get(key).is_some_and(|t| t.is_empty()) {
                        values.remove(key);
                    }
                    if values.is_empty() {
                        coll.by_eq.remove(field);
                    }
                }
            }
        }
        if coll.is_empty() {
            routes.remove(collection);
        }
    }

    pub(crate) fn processed(&self) -> i64 {
        *self.processed.borrow()
    }

    /// Waits until every change up to `position` has been routed; `false` after `timeout`.
    pub(crate) async fn wait_processed(&self, position: i64, timeout: std::time::Duration) -> bool {
        let mut rx = self.processed.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|p| *p >= position))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Routes one change and moves the processed position past it.
    fn route(&self, delivery: Delivery) {
        let delivery = Arc::new(delivery);
        let routes = self.routes.read().unwrap_or_else(|p| p.into_inner());
        if let Some(coll) = routes.get(&delivery.collection) {
            let position = delivery.position;
            let send = |targets: &Targets| {
                for (inbox, _) in targets.values() {
                    if inbox.last_routed.swap(position, Ordering::Relaxed) == position {
                        continue;
                    }
                    match inbox.tx.try_send(delivery.clone()) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            inbox.overflowed.store(true, Ordering::Release);
                            metrics::counter!("basalt_realtime_queue_drops_total").increment(1);
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {}
                    }
                }
            };
            send(&coll.all);
            if let Some(t) = coll.by_id.get(&delivery.key) {
                send(t);
            }
            for (field, values) in &coll.by_eq {
                for doc in [delivery.new.as_ref(), delivery.old.as_ref()]
                    .into_iter()
                    .flatten()
                {
                    if let Some(t) = field
                        .get(doc)
                        .and_then(|v| value_key(&v))
                        .and_then(|k| values.get(&k))
                    {
                        send(t);
                    }
                }
            }
        }
        self.advance(delivery.position);
    }

    fn advance(&self, position: i64) {
        self.processed.send_if_modified(|p| {
            let moved = position > *p;
            *p = (*p).max(position);
            moved
        });
    }

    /// Follows the bus until it is dropped.
    pub(crate) async fn run(
        self: Arc<Self>,
        bus: std::sync::Weak<ChangeBus>,
        seal: Arc<PositionSeal>,
    ) {
        let (mut events, mut watermark) = match bus.upgrade() {
            Some(bus) => (bus.subscribe(), bus.watch()),
            None => return,
        };
        loop {
            tokio::select! {
                received = events.recv() => match received {
                    Ok(event) => self.take(&bus, &event, &seal).await,
                    Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up(&bus, &seal).await,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                changed = watermark.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Events are published before the watermark moves past them: once those
                    // already sent are taken, everything up to the watermark is routed.
                    loop {
                        match events.try_recv() {
                            Ok(event) => self.take(&bus, &event, &seal).await,
                            Err(broadcast::error::TryRecvError::Lagged(_)) => {
                                self.catch_up(&bus, &seal).await
                            }
                            Err(broadcast::error::TryRecvError::Closed) => return,
                            Err(broadcast::error::TryRecvError::Empty) => break,
                        }
                    }
                    let w = *watermark.borrow_and_update();
                    self.advance(w);
                }
            }
        }
    }

    async fn take(&self, bus: &std::sync::Weak<ChangeBus>, event: &Event, seal: &PositionSeal) {
        if event.position <= self.processed() {
            return;
        }
        if !event.topic.starts_with("db/") {
            self.advance(event.position);
            return;
        }
        if event.payload_omitted {
            // Too large for the bus: read it from the log, once for every subscriber.
            let Some(bus) = bus.upgrade() else { return };
            match bus.event_at(event.position, &event.topic).await {
                Ok(Some(full)) => {
                    if let Some(d) = Delivery::from_event(&full, seal) {
                        self.route(d);
                    }
                }
                Ok(None) => {
                    tracing::warn!(position = event.position, "a large change is missing from the log; realtime subscribers will not see it")
                }
                Err(err) => {
                    tracing::warn!(error = %err, position = event.position, "could not read a large change for realtime; subscribers will not see it")
                }
            }
            self.advance(event.position);
            return;
        }
        if let Some(d) = Delivery::from_event(event, seal) {
            self.route(d);
        }
    }

    /// After the bus lagged: route what it dropped from the log, up to its watermark.
    async fn catch_up(&self, bus: &std::sync::Weak<ChangeBus>, seal: &PositionSeal) {
        let Some(bus) = bus.upgrade() else { return };
        let upto = bus.watermark();
        loop {
            let after = self.processed();
            match bus.read(after, Some("db/"), 1000).await {
                Ok(events) if events.is_empty() => break,
                Ok(events) => {
                    for event in &events {
                        if let Some(d) = Delivery::from_event(event, seal) {
                            self.route(d);
                        }
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "realtime could not read the change log after falling behind; changes were skipped");
                    break;
                }
            }
        }
        self.advance(upto);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn routes_take_the_narrowest_equality() {
        let f = |w: Value| crate::query::parse_where(&w).unwrap();
        assert_eq!(
            Route::of(f(json!([["n", ">", 1], ["$id", "==", "a"]])).as_ref()),
            Route::Id("a".into())
        );
        assert_eq!(
            Route::of(f(json!(["owner", "==", "u1"])).as_ref()),
            Route::Eq(Field::parse("owner").unwrap(), "su1".into())
        );
        assert_eq!(
            Route::of(f(json!({"or": [["a", "==", 1], ["b", "==", 2]]})).as_ref()),
            Route::All
        );
        assert_eq!(value_key(&json!(1)), value_key(&json!(1.0)));
        assert_eq!(value_key(&json!(-0.0)), value_key(&json!(0)));
        assert_ne!(value_key(&json!(1)), value_key(&json!("1")));
    }
}
