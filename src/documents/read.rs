//! Reads: one document, and queries where the `read` rule filters, with sealed cursors.

use super::*;

/// Rows examined per request when a `read` rule has to be evaluated row by row; past it the
/// page ends early with a cursor to continue from.
const MAX_ROWS_EXAMINED: usize = 5000;

impl DocumentService {
    /// The rule time of one read request (`documents.read_rules_time_ms`).
    pub(super) fn read_clock(&self) -> RuleClock {
        RuleClock::new(Duration::from_millis(self.config.read_rules_time_ms))
    }

    /// The rule time of one write request (`documents.write_rules_time_ms`).
    pub(super) fn write_clock(&self) -> RuleClock {
        RuleClock::new(Duration::from_millis(self.config.write_rules_time_ms))
    }

    // ------------------------------------------------------------------ reads

    pub async fn get(&self, caller: &Caller, collection: &str, id: &str) -> ApiResult<Document> {
        let principal = &Principal::from(caller);
        let coll = self.collection(collection).await?;
        check_document_id(id).map_err(|_| ApiError::NotFound("document not found".into()))?;
        let doc = self.store.get_document(collection, id).await?;
        if !self
            .may_read(
                &coll.read,
                principal,
                "get",
                doc.as_ref(),
                &mut Fetched::new(),
                &self.read_clock(),
            )
            .await
        {
            return Err(ApiError::PermissionDenied(
                "the read rule denies this".into(),
            ));
        }
        doc.as_ref()
            .map(Document::from)
            .ok_or_else(|| ApiError::NotFound("document not found".into()))
    }

    pub async fn query(
        &self,
        caller: &Caller,
        collection: &str,
        query: Query,
    ) -> ApiResult<QueryResult> {
        let principal = &Principal::from(caller);
        let coll = self.collection(collection).await?;
        let plan = self.read_plan(&coll, principal)?;
        // With a rule checked row by row, the request's `where` is applied in memory to rows
        // the rule admits, never in SQL: which rows a request examines (and so where the
        // row budget cuts a page) must not depend on what the caller cannot read.
        let (filter, per_row, matching) = match plan {
            ReadPlan::Nothing => {
                return Ok(QueryResult {
                    documents: vec![],
                    next_cursor: None,
                    count: query.count.then_some(0),
                })
            }
            ReadPlan::All => (query.filter.clone(), false, None),
            ReadPlan::Filter(f) => (and(query.filter.clone(), Some(f)), false, None),
            ReadPlan::PerRow(pre) => {
                refuse_hidden_order(&query.order)?;
                (pre, true, query.filter.clone())
            }
        };
        let scope = cursor_scope(collection, principal, query.filter.as_ref());
        let resume = query
            .start_after
            .as_deref()
            .map(|token| self.cursors.open(token, &scope, &query.order))
            .transpose()?;
        // Where the scan starts, and the last position the caller was shown (what a later
        // cursor may fall back on without carrying anything the caller cannot read).
        let (mut after, shown) = match resume {
            None => (None, None),
            Some(Resume::After(position)) => (Some(position.clone()), Some(position)),
            Some(Resume::Anchor {
                id,
                version,
                created_micros,
                fallback,
            }) => match self.store.get_document(collection, &id).await? {
                Some(row)
                    if row.version == version
                        && row.created_at.timestamp_micros() == created_micros =>
                {
                    (Some(cursor_of(&query.order, &row)), fallback)
                }
                _ => (fallback.clone(), fallback),
            },
        };
        let mut lookups = Fetched::new();
        // Per-row checks share one time budget; when it is spent the page ends early, with a
        // cursor, exactly as at the row budget.
        let clock = self.read_clock();
        let mut kept: Vec<DocumentRow> = Vec::new();
        let mut examined = 0usize;
        let mut exhausted = false;
        let mut out_of_time = false;
        let mut last_examined: Option<DocumentRow> = None;
        let batch = if per_row {
            (query.limit as usize * 2).clamp(50, 1000)
        } else {
            query.limit as usize + 1
        };
        while kept.len() <= query.limit as usize {
            let rows = self
                .store
                .scan_documents(&Scan {
                    collection,
                    filter: filter.as_ref(),
                    order: &query.order,
                    after: after.as_ref(),
                    limit: batch as u32,
                    indexed: &coll.indexed,
                    leading: &coll.leading,
                    index_widths: &coll.index_widths,
                })
                .await?;
            let got = rows.len();
            for row in rows {
                let keep = !per_row
                    || (self
                        .may_read(
                            &coll.read,
                            principal,
                            "list",
                            Some(&row),
                            &mut lookups,
                            &clock,
                        )
                        .await
                        && matching
                            .as_ref()
                            .is_none_or(|f| query::matches(f, &document_json(&row))));
                if per_row && clock.expired() {
                    out_of_time = true;
                    // This row's check may have been cut short by the request's clock rather
                    // than decided: leave it to the next page (once something was examined,
                    // so every page moves on).
                    if !keep && examined > 0 {
                        break;
                    }
                }
                examined += 1;
                after = Some(cursor_of(&query.order, &row));
                if keep {
                    kept.push(row.clone());
                }
                last_examined = Some(row);
                if out_of_time || kept.len() > query.limit as usize {
                    break;
                }
            }
            if out_of_time {
                break;
            }
            if got < batch {
                exhausted = true;
                break;
            }
            if examined >= MAX_ROWS_EXAMINED {
                break;
            }
        }
        let more = kept.len() > query.limit as usize;
        kept.truncate(query.limit as usize);
        let seal = |resume: Resume| self.cursors.seal(&scope, &query.order, &resume);
        let next_cursor = match (&last_examined, kept.last()) {
            _ if more => kept
                .last()
                .map(|d| seal(Resume::After(cursor_of(&query.order, d)))),
            _ if exhausted => None,
            // Stopped at the row budget on a row the caller may read: an ordinary position.
            (Some(last), Some(shown_last)) if last.id == shown_last.id => {
                Some(seal(Resume::After(cursor_of(&query.order, last))))
            }
            // Stopped at the row budget on a row the caller may not read: the scan must go
            // on after it (so nothing is skipped or repeated), but the cursor may not carry
            // its values — an anchor (see `documents::cursor`).
            (Some(last), shown_last) => Some(seal(Resume::Anchor {
                id: last.id.clone(),
                version: last.version,
                created_micros: last.created_at.timestamp_micros(),
                fallback: shown_last.map(|d| cursor_of(&query.order, d)).or(shown),
            })),
            (None, _) => None,
        };
        let count = if query.count {
            Some(if per_row {
                self.count_per_row(&coll, principal, filter.as_ref(), matching.as_ref(), &clock)
                    .await?
            } else {
                self.store
                    .count_documents(&Scan {
                        collection,
                        filter: filter.as_ref(),
                        order: &query.order,
                        after: None,
                        limit: 0,
                        indexed: &coll.indexed,
                        leading: &coll.leading,
                        index_widths: &coll.index_widths,
                    })
                    .await?
            })
        } else {
            None
        };
        let documents = kept
            .iter()
            .map(|d| {
                let mut doc = Document::from(d);
                if let Some(select) = &query.select {
                    doc.data = project(&doc.data, select);
                }
                doc
            })
            .collect();
        Ok(QueryResult {
            documents,
            next_cursor,
            count,
        })
    }

    /// Visits, in batches, every document `filter` (SQL) finds that the caller may read and
    /// that `matching` (the request's `where`, applied in memory after the rule) matches.
    pub(super) async fn for_each_readable(
        &self,
        coll: &Collection,
        principal: &Principal,
        filter: Option<&Filter>,
        matching: Option<&Filter>,
        clock: &RuleClock,
        mut visit: impl FnMut(&DocumentRow),
    ) -> ApiResult<()> {
        let collection = coll.row.name.as_str();
        let order = [Order {
            field: Field::Id,
            direction: Direction::Asc,
        }];
        let mut lookups = Fetched::new();
        let mut after: Option<Cursor> = None;
        loop {
            let rows = self
                .store
                .scan_documents(&Scan {
                    collection,
                    filter,
                    order: &order,
                    after: after.as_ref(),
                    limit: 1000,
                    indexed: &coll.indexed,
                    leading: &coll.leading,
                    index_widths: &coll.index_widths,
                })
                .await?;
            for row in &rows {
                if clock.expired() {
                    return Err(rule_time_spent(self.config.read_rules_time_ms));
                }
                if self
                    .may_read(
                        &coll.read,
                        principal,
                        "list",
                        Some(row),
                        &mut lookups,
                        clock,
                    )
                    .await
                    && matching.is_none_or(|f| query::matches(f, &document_json(row)))
                {
                    visit(row);
                }
            }
            match rows.last() {
                Some(last) if rows.len() == 1000 => after = Some(cursor_of(&order, last)),
                _ => return Ok(()),
            }
        }
    }

    pub(super) async fn count_per_row(
        &self,
        coll: &Collection,
        principal: &Principal,
        filter: Option<&Filter>,
        matching: Option<&Filter>,
        clock: &RuleClock,
    ) -> ApiResult<u64> {
        let mut n = 0u64;
        self.for_each_readable(coll, principal, filter, matching, clock, |_| n += 1)
            .await?;
        Ok(n)
    }
}

/// A count or aggregate that needs every row checked, when the checks used up the request's
/// rule time: it cannot answer part of the rows.
fn rule_time_spent(limit_ms: u64) -> ApiError {
    ApiError::invalid_with(
        format!(
            "the read rule is checked row by row here and took more than {} ms for this \
             request; narrow the where, or write the rule so that it becomes a filter (see \
             docs/rules.md)",
            limit_ms
        ),
        json!({"reason": "rule_time"}),
    )
}

pub(super) fn and(a: Option<Filter>, b: Option<Filter>) -> Option<Filter> {
    match (a, b) {
        (Some(a), Some(b)) => Some(Filter::And(vec![a, b])),
        (a, None) => a,
        (None, b) => b,
    }
}

fn cursor_of(order: &[Order], row: &DocumentRow) -> Cursor {
    let doc = document_json(row);
    Cursor {
        values: order
            .iter()
            .filter(|o| o.field != Field::Id)
            .map(|o| o.field.get(&doc).map(|v| v.into_owned()))
            .collect(),
        id: row.id.clone(),
    }
}

fn project(data: &Value, select: &[Field]) -> Value {
    let mut out = Value::Object(Map::new());
    for field in select {
        let Field::Data(path) = field else { continue };
        let mut src = Some(data);
        for key in path {
            src = src.and_then(|v| v.get(key));
        }
        if let Some(v) = src {
            let mut dst = &mut out;
            for key in &path[..path.len() - 1] {
                dst = dst
                    .as_object_mut()
                    .expect("built as objects")
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
            }
            dst.as_object_mut()
                .expect("built as objects")
                .insert(path[path.len() - 1].clone(), v.clone());
        }
    }
    out
}

/// What a cursor is bound to besides its order: the collection, the caller and the `where`.
fn cursor_scope(collection: &str, principal: &Principal, filter: Option<&Filter>) -> String {
    use sha2::{Digest, Sha256};
    let caller = match principal {
        Principal::Privileged => "*".to_string(),
        Principal::Anonymous => "-".to_string(),
        Principal::User(auth) => format!("u:{}", auth.uid),
    };
    let filter = hex::encode(&Sha256::digest(format!("{filter:?}").as_bytes())[..12]);
    format!("{collection}|{caller}|{filter}")
}

/// Under a rule checked row by row, the scan's order decides which rows a page examines
/// before the row budget cuts it; ordering by data fields would let the cut reveal how the
/// values of documents the caller cannot read compare with those it can.
fn refuse_hidden_order(order: &[Order]) -> ApiResult<()> {
    if order.iter().any(|o| matches!(o.field, Field::Data(_))) {
        return Err(ApiError::invalid_with(
            "this collection's read rule is checked document by document, so queries can order \
             only by $id, $created_at or $updated_at (a rule that becomes a filter, see \
             docs/rules.md, lifts this)",
            json!({"field": "order_by"}),
        ));
    }
    Ok(())
}
