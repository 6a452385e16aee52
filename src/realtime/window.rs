//! What one query subscription shows, kept in memory and moved by changes: the documents
//! the caller may read that match the `where`, in the query's order, cut at `limit`.
//!
//! A window knows every visible document up to a **boundary** (the sort key of the last row
//! its query read, or none when the query read them all), so a document leaving a full window
//! is replaced from memory by the next one; only when fewer than `limit` remain below a
//! boundary must the query run again ([`Window::needs_refill`]). Each change updates one
//! document and answers the difference in what is shown: `added`, `modified`, `removed` —
//! including the document pushed out of, or pulled into, a full window.
//!
//! Changes are applied by version, so events that a fresh query result already reflects are
//! not applied twice: a `create` always applies (it starts a new life of the id), an `update`
//! only when newer than what is kept, a `delete` always removes. Applied in position order
//! from any point at or before the query's, the window ends exactly where the log does.

use std::cmp::Ordering;
use std::sync::Arc;

use serde_json::Value;
use smallvec::SmallVec;

use crate::query::{compare_values, Direction, Field, Order};
use crate::store::EventOp;

/// The sort values of a document. Inline for the usual one field: comparing keys, done a
/// few times per change for every subscriber, then reads no other allocation.
type SortValues = SmallVec<[Option<Value>; 1]>;

/// A document as shown: its sort values, id, version and JSON (serialised once, shared).
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    values: SortValues,
    id: String,
    version: i64,
    pub(crate) json: Arc<str>,
}

/// A quick hash of a document id (FNV-1a), so that finding a document in a window compares
/// integers rather than strings.
fn id_hash(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// One difference in what a subscription shows.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Change {
    Added(Arc<str>),
    Modified(Arc<str>),
    /// The document as it was last shown.
    Removed(Arc<str>),
}

impl Change {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Change::Added(_) => "added",
            Change::Modified(_) => "modified",
            Change::Removed(_) => "removed",
        }
    }

    pub(crate) fn json(&self) -> &str {
        match self {
            Change::Added(j) | Change::Modified(j) | Change::Removed(j) => j,
        }
    }
}

/// A visible document's new state, for [`Window::apply`].
pub(crate) struct Visible<'a> {
    pub(crate) doc: &'a Value,
    pub(crate) json: Arc<str>,
}

#[derive(Debug, Clone)]
pub(crate) struct Window {
    order: Arc<[Order]>,
    /// The directions of the order's fields other than `$id`, and whether `$id` (the final
    /// tie-break) descends: what comparing two keys needs, worked out once.
    directions: Arc<[Direction]>,
    id_desc: bool,
    limit: usize,
    /// Most documents kept (those past `limit` wait to move up); past it the last ones are
    /// forgotten and the boundary moves up to the new last one.
    capacity: usize,
    /// Every visible document with a sort key at or before `boundary`, in order.
    entries: Vec<Entry>,
    /// The sort key of the last row the query read when there may be more; `None`: the
    /// query read every matching row.
    boundary: Option<(SortValues, String)>,
    /// [`id_hash`] of each entry's id, in the same order: finding a document scans these
    /// few contiguous integers (one or two cache lines) rather than every entry.
    hashes: Vec<u64>,
}

impl Window {
    /// A window from a query's rows (in the query's order). `complete`: there are no more.
    pub(crate) fn new(
        order: Arc<[Order]>,
        limit: usize,
        rows: Vec<(Value, Arc<str>)>,
        complete: bool,
    ) -> Window {
        let directions: Arc<[Direction]> = order
            .iter()
            .filter(|o| o.field != Field::Id)
            .map(|o| o.direction)
            .collect();
        let id_desc = order
            .iter()
            .find(|o| o.field == Field::Id)
            .is_some_and(|o| o.direction == Direction::Desc);
        let mut window = Window {
            order,
            directions,
            id_desc,
            limit,
            capacity: rows.len().max(limit) + limit.clamp(1, 50),
            entries: Vec::with_capacity(rows.len()),
            boundary: None,
            hashes: Vec::new(),
        };
        for (doc, json) in &rows {
            let entry = window.entry(doc, json.clone());
            window.entries.push(entry);
        }
        let mut entries = std::mem::take(&mut window.entries);
        entries.sort_by(|a, b| window.compare(a, b));
        window.hashes = entries.iter().map(|e| id_hash(&e.id)).collect();
        window.entries = entries;
        if !complete {
            window.boundary = window
                .entries
                .last()
                .map(|e| (e.values.clone(), e.id.clone()));
        }
        window
    }

    fn entry(&self, doc: &Value, json: Arc<str>) -> Entry {
        let id = doc
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        Entry {
            values: self
                .order
                .iter()
                .filter(|o| o.field != Field::Id)
                .map(|o| o.field.get(doc).map(|v| v.into_owned()))
                .collect(),
            id,
            version: doc.get("version").and_then(Value::as_i64).unwrap_or(0),
            json,
        }
    }

    fn compare_keys(&self, a: (&[Option<Value>], &str), b: (&[Option<Value>], &str)) -> Ordering {
        for (i, (x, y)) in a.0.iter().zip(b.0.iter()).enumerate() {
            let dir = self.directions.get(i).copied().unwrap_or(Direction::Asc);
            let ord = compare_values(x.as_ref(), y.as_ref());
            let ord = if dir == Direction::Desc {
                ord.reverse()
            } else {
                ord
            };
            if ord != Ordering::Equal {
                return ord;
            }
        }
        let ord = a.1.cmp(b.1);
        if self.id_desc {
            ord.reverse()
        } else {
            ord
        }
    }

    fn compare(&self, a: &Entry, b: &Entry) -> Ordering {
        self.compare_keys((&a.values, &a.id), (&b.values, &b.id))
    }

    fn within_boundary(&self, e: &Entry) -> bool {
        match &self.boundary {
            None => true,
            Some((values, id)) => self.compare_keys((&e.values, &e.id), (values, id)).is_le(),
        }
    }

    /// The documents shown, in order.
    pub(crate) fn shown(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().take(self.limit)
    }

    /// Fewer than `limit` documents are known while more may exist past the boundary: the
    /// query must run again to know what is shown.
    pub(crate) fn needs_refill(&self) -> bool {
        self.boundary.is_some() && self.entries.len() < self.limit
    }

    fn position(&self, id: &str) -> Option<usize> {
        let hash = id_hash(id);
        let mut from = 0;
        while let Some(i) = self.hashes[from..].iter().position(|h| *h == hash) {
            if self.entries[from + i].id == id {
                return Some(from + i);
            }
            from += i + 1;
        }
        None
    }

    /// Sets document `id` to `state` (its new visible state, or `None`: gone or not visible)
    /// without telling what changed: the building block of [`Window::apply`] and of rewinding.
    /// Answers the document as it was kept and where it is now.
    pub(crate) fn set(
        &mut self,
        id: &str,
        state: Option<Visible<'_>>,
    ) -> (Option<(usize, Entry)>, Option<usize>) {
        let old = self.position(id).map(|i| {
            self.hashes.remove(i);
            (i, self.entries.remove(i))
        });
        let mut now = None;
        if let Some(state) = state {
            let entry = self.entry(state.doc, state.json);
            if self.within_boundary(&entry) {
                let at = self
                    .entries
                    .partition_point(|e| self.compare(e, &entry).is_lt());
                self.hashes.insert(at, id_hash(&entry.id));
                self.entries.insert(at, entry);
                now = Some(at);
                if self.entries.len() > self.capacity {
                    // Down to below the capacity, so that a stream of inserts (new documents
                    // at the top of a feed) moves the boundary once every few changes rather
                    // than at each.
                    let keep = self.capacity - (self.capacity - self.limit) / 2;
                    self.entries.truncate(keep);
                    self.hashes.truncate(keep);
                    self.boundary = self
                        .entries
                        .last()
                        .map(|e| (e.values.clone(), e.id.clone()));
                    if at >= keep {
                        now = None;
                    }
                }
            }
        }
        (old, now)
    }

    /// Bytes of JSON the window keeps.
    pub(crate) fn bytes(&self) -> usize {
        self.entries.iter().map(|e| e.json.len()).sum()
    }

    /// Applies one change of document `id` (`op`, its version, and its new state when it is
    /// visible) and answers what the subscriber sees change. Stale updates (older than
    /// what is kept) change nothing. One document moves, so at most one other crosses the
    /// window's edge: no copy of the window is made.
    pub(crate) fn apply(
        &mut self,
        id: &str,
        op: EventOp,
        version: i64,
        state: Option<Visible<'_>>,
    ) -> Vec<Change> {
        if op == EventOp::Update
            && self
                .position(id)
                .is_some_and(|i| self.entries[i].version >= version)
        {
            return Vec::new();
        }
        let limit = self.limit;
        let (old, now) = self.set(id, state);
        let was_shown = old.as_ref().filter(|(i, _)| *i < limit).map(|(_, e)| e);
        let now_shown = now.filter(|j| *j < limit);
        match (was_shown, now_shown) {
            (Some(before), Some(j)) => {
                let after = &self.entries[j];
                if before.version != after.version || before.json != after.json {
                    vec![Change::Modified(after.json.clone())]
                } else {
                    Vec::new()
                }
            }
            (Some(before), None) => {
                let mut changes = vec![Change::Removed(before.json.clone())];
                // The one below the edge moves up into the window.
                if let Some(up) = self.entries.get(limit - 1) {
                    changes.push(Change::Added(up.json.clone()));
                }
                changes
            }
            (None, Some(j)) => {
                let mut changes = Vec::new();
                // The one at the edge is pushed out.
                if let Some(out) = self.entries.get(limit) {
                    changes.push(Change::Removed(out.json.clone()));
                }
                changes.push(Change::Added(self.entries[j].json.clone()));
                changes
            }
            (None, None) => Vec::new(),
        }
    }

    /// The difference between what `before` showed and what this window shows (a refill or
    /// a reset of the same subscription).
    pub(crate) fn diff_from(&self, before: &Window) -> Vec<Change> {
        use std::collections::HashMap;
        let now: HashMap<&str, &Entry> = self.shown().map(|e| (e.id.as_str(), e)).collect();
        let then: HashMap<&str, &Entry> = before.shown().map(|e| (e.id.as_str(), e)).collect();
        let mut changes = Vec::new();
        for old in before.shown() {
            if !now.contains_key(old.id.as_str()) {
                changes.push(Change::Removed(old.json.clone()));
            }
        }
        for e in self.shown() {
            match then.get(e.id.as_str()) {
                None => changes.push(Change::Added(e.json.clone())),
                Some(old) if old.version != e.version || old.json != e.json => {
                    changes.push(Change::Modified(e.json.clone()))
                }
                Some(_) => {}
            }
        }
        changes
    }

    /// The documents shown, as a JSON array.
    pub(crate) fn documents_json(&self) -> String {
        let mut out = String::from("[");
        for (i, e) in self.shown().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&e.json);
        }
        out.push(']');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(id: &str, n: i64, version: i64) -> Value {
        json!({"id": id, "data": {"n": n}, "version": version,
               "created_at": "2026-01-01T00:00:00.000000Z", "updated_at": "2026-01-01T00:00:00.000000Z"})
    }

    fn rows(docs: &[Value]) -> Vec<(Value, Arc<str>)> {
        docs.iter()
            .map(|d| (d.clone(), Arc::from(d.to_string())))
            .collect()
    }

    fn by_n_desc() -> Arc<[Order]> {
        Arc::from(vec![
            Order {
                field: Field::parse("n").unwrap(),
                direction: Direction::Desc,
            },
            Order {
                field: Field::Id,
                direction: Direction::Asc,
            },
        ])
    }

    fn ids(w: &Window) -> Vec<String> {
        w.shown().map(|e| e.id.clone()).collect()
    }

    fn apply(w: &mut Window, d: &Value, op: EventOp) -> Vec<(&'static str, String)> {
        let json: Arc<str> = Arc::from(d.to_string());
        w.apply(
            d["id"].as_str().unwrap(),
            op,
            d["version"].as_i64().unwrap(),
            (op != EventOp::Delete).then_some(Visible { doc: d, json }),
        )
        .into_iter()
        .map(|c| {
            let v: Value = serde_json::from_str(c.json()).unwrap();
            (c.kind(), v["id"].as_str().unwrap().to_string())
        })
        .collect()
    }

    #[test]
    fn a_full_window_pushes_out_and_pulls_in_at_its_edge() {
        let docs = [doc("a", 50, 1), doc("b", 40, 1), doc("c", 30, 1)];
        let mut w = Window::new(by_n_desc(), 2, rows(&docs), true);
        assert_eq!(ids(&w), ["a", "b"]);
        // d enters at the top: b falls out.
        let got = apply(&mut w, &doc("d", 60, 1), EventOp::Create);
        assert_eq!(got, [("removed", "b".into()), ("added", "d".into())]);
        // a drops below c: it leaves, b comes back.
        let got = apply(&mut w, &doc("a", 10, 2), EventOp::Update);
        assert_eq!(got, [("removed", "a".into()), ("added", "b".into())]);
        // A stale update changes nothing.
        assert!(apply(&mut w, &doc("a", 99, 2), EventOp::Update).is_empty());
        // d is deleted: c comes in.
        let got = apply(&mut w, &doc("d", 60, 1), EventOp::Delete);
        assert_eq!(got, [("removed", "d".into()), ("added", "c".into())]);
        // b changes in place.
        assert_eq!(
            apply(&mut w, &doc("b", 41, 2), EventOp::Update),
            [("modified", "b".into())]
        );
        assert!(!w.needs_refill());
    }

    #[test]
    fn below_a_boundary_a_short_window_asks_for_a_refill() {
        let docs = [doc("a", 50, 1), doc("b", 40, 1)];
        let mut w = Window::new(by_n_desc(), 2, rows(&docs), false);
        // Past the boundary (n < 40): not known, not shown.
        assert!(apply(&mut w, &doc("z", 1, 1), EventOp::Create).is_empty());
        apply(&mut w, &doc("a", 50, 1), EventOp::Delete);
        assert!(w.needs_refill());
    }

    #[test]
    fn inserts_past_the_capacity_move_the_boundary_up() {
        let docs: Vec<Value> = (0..4).map(|i| doc(&format!("d{i}"), 100 - i, 1)).collect();
        let mut w = Window::new(by_n_desc(), 2, rows(&docs), true);
        for i in 0..20 {
            apply(
                &mut w,
                &doc(&format!("n{i:02}"), 200 + i, 1),
                EventOp::Create,
            );
        }
        assert!(w.entries.len() <= w.capacity);
        let hashes: Vec<u64> = w.entries.iter().map(|e| id_hash(&e.id)).collect();
        assert_eq!(w.hashes, hashes);
        assert!(w.boundary.is_some());
        assert_eq!(ids(&w), ["n19", "n18"]);
        // What fell past the boundary is unknown now: a change there says nothing.
        assert!(apply(&mut w, &doc("d0", 101, 2), EventOp::Update).is_empty());
    }

    #[test]
    fn a_recreated_document_is_a_new_life() {
        let mut w = Window::new(by_n_desc(), 5, rows(&[doc("a", 5, 7)]), true);
        assert_eq!(
            apply(&mut w, &doc("a", 5, 7), EventOp::Delete),
            [("removed", "a".into())]
        );
        assert_eq!(
            apply(&mut w, &doc("a", 6, 1), EventOp::Create),
            [("added", "a".into())]
        );
    }
}
