//! Writes: one document or a batch, each decided inside the store's write transaction by
//! [`decide_write`] (rules before anything about the stored document is revealed).

use super::*;

pub const MAX_BATCH_WRITES: usize = 500;

impl DocumentService {
    // ------------------------------------------------------------------ writes

    /// Plans one write: the decision closure the store runs on the current document.
    #[allow(clippy::too_many_arguments)] // each is one part of the write; a struct would only rename them
    pub(super) fn plan(
        &self,
        coll: Arc<Collection>,
        principal: &Principal,
        id: String,
        kind: WriteKind,
        pre: Precondition,
        index: Option<usize>,
        clock: &RuleClock,
    ) -> PlannedWrite {
        let principal = principal.clone();
        let clock = clock.clone();
        let limits = self.config.clone();
        let collection = coll.row.name.clone();
        let decide = move |current: Option<&DocumentRow>,
                           now: DateTime<Utc>,
                           fetched: &Fetched|
              -> Result<Decision, Rejection> {
            let judge = Judge {
                principal: &principal,
                now,
                fetched,
                clock: &clock,
            };
            match decide_write(&coll, &judge, &limits, current, now, &kind, pre) {
                Ok(decision) => Ok(Decision::Write(decision)),
                Err(Halt::Needs(keys)) => Ok(Decision::Needs(keys)),
                Err(Halt::Api(e)) => Err(Box::new(at_index(e, index)) as Rejection),
            }
        };
        PlannedWrite {
            collection,
            id,
            decide: Box::new(decide),
        }
    }

    /// Runs planned writes in one transaction; maps the store's answers into API errors.
    pub(super) async fn run(
        &self,
        writes: Vec<PlannedWrite>,
        caller: &Caller,
    ) -> ApiResult<Vec<WriteOutcome>> {
        match self.store.apply_writes(writes, &caller.actor()).await {
            Ok(outcomes) => Ok(outcomes),
            Err(StoreError::AlreadyExists(_)) => Err(ApiError::AlreadyExists(
                "another document already has this value of a unique index".into(),
            )),
            Err(StoreError::NotFound) => Err(ApiError::NotFound("document not found".into())),
            Err(e) => Err(e.into()),
        }
    }

    /// One write. Returns the document after it (`None` after a delete) and whether it was
    /// created.
    pub async fn write(
        &self,
        caller: &Caller,
        collection: &str,
        id: Option<&str>,
        kind: WriteKind,
        pre: Precondition,
    ) -> ApiResult<(Option<Document>, bool)> {
        let principal = &Principal::from(caller);
        let coll = self.collection(collection).await?;
        let id = match id {
            Some(id) => {
                check_document_id(id)?;
                id.to_string()
            }
            None => new_id(),
        };
        let clock = self.write_clock();
        let plan = self.plan(coll, principal, id, kind, pre, None, &clock);
        let outcome = self
            .run(vec![plan], caller)
            .await?
            .pop()
            .expect("one write, one outcome");
        let created = outcome.op == EventOp::Create;
        Ok((outcome.document.as_ref().map(Document::from), created))
    }

    /// `_batch`: up to 500 writes, all or nothing.
    pub async fn batch(&self, caller: &Caller, writes: Vec<BatchWrite>) -> ApiResult<Vec<Value>> {
        let principal = &Principal::from(caller);
        if writes.is_empty() || writes.len() > MAX_BATCH_WRITES {
            return Err(ApiError::invalid_with(
                format!("a batch has 1 to {MAX_BATCH_WRITES} writes"),
                json!({"field": "writes"}),
            ));
        }
        let mut plans = Vec::with_capacity(writes.len());
        // One rule-time budget for the whole batch: it holds a transaction (and on SQLite the
        // only writer) while its checks run.
        let clock = self.write_clock();
        for (i, w) in writes.into_iter().enumerate() {
            let fail = |e: ApiError| at_index(e, Some(i));
            let coll = self.collection(&w.collection).await.map_err(fail)?;
            let id = match (&w.id, w.op.as_str()) {
                (Some(id), _) => {
                    check_document_id(id).map_err(fail)?;
                    id.clone()
                }
                (None, "create") => new_id(),
                (None, _) => {
                    return Err(fail(ApiError::invalid_with(
                        "id is required",
                        json!({"field": "id"}),
                    )))
                }
            };
            let needs_data = |d: Option<Value>| {
                d.ok_or_else(|| {
                    fail(ApiError::invalid_with(
                        "data is required",
                        json!({"field": "data"}),
                    ))
                })
            };
            let kind = match w.op.as_str() {
                "create" => WriteKind::Create(needs_data(w.data)?),
                "set" => WriteKind::Set(needs_data(w.data)?),
                "update" => WriteKind::Update(needs_data(w.data)?),
                "delete" => WriteKind::Delete,
                other => {
                    return Err(fail(ApiError::invalid_with(
                        format!("unknown op `{other}`; use create, set, update or delete"),
                        json!({"field": "op"}),
                    )))
                }
            };
            let pre = Precondition {
                if_version: w.if_version,
                must_not_exist: false,
            };
            plans.push(self.plan(coll, principal, id, kind, pre, Some(i), &clock));
        }
        let outcomes = self.run(plans, caller).await?;
        Ok(outcomes
            .iter()
            .map(|o| {
                json!({
                    "op": o.op,
                    "collection": o.collection,
                    "id": o.id,
                    "version": o.version,
                    "document": o.document.as_ref().map(Document::from),
                })
            })
            .collect())
    }
}

/// One entry of `POST /v1/db/_batch`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchWrite {
    /// `create`, `set`, `update` or `delete`.
    pub op: String,
    pub collection: String,
    pub id: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub data: Option<Value>,
    pub if_version: Option<i64>,
}

/// Adds the index of the failing write of a batch to an error.
fn at_index(err: ApiError, index: Option<usize>) -> ApiError {
    let Some(i) = index else { return err };
    match err {
        ApiError::InvalidArgument { message, details } => {
            let mut details = details.unwrap_or_else(|| json!({}));
            details["index"] = json!(i);
            ApiError::InvalidArgument {
                message: format!("write {i}: {message}"),
                details: Some(details),
            }
        }
        ApiError::PermissionDenied(m) => ApiError::PermissionDenied(format!("write {i}: {m}")),
        ApiError::NotFound(m) => ApiError::NotFound(format!("write {i}: {m}")),
        ApiError::AlreadyExists(m) => ApiError::AlreadyExists(format!("write {i}: {m}")),
        ApiError::FailedPrecondition(m) => ApiError::FailedPrecondition(format!("write {i}: {m}")),
        ApiError::PayloadTooLarge(m) => ApiError::PayloadTooLarge(format!("write {i}: {m}")),
        other => other,
    }
}

/// The precondition a write fails, if any (`If-Match` / `if_version`, `If-None-Match: *`).
fn failed_precondition(pre: Precondition, current: Option<&DocumentRow>) -> Option<ApiError> {
    if let Some(expected) = pre.if_version {
        match current {
            Some(c) if c.version == expected => {}
            Some(c) => {
                return Some(ApiError::FailedPrecondition(format!(
                    "version is {}, not {expected}",
                    c.version
                )))
            }
            None => {
                return Some(ApiError::FailedPrecondition(format!(
                    "the document does not exist (expected version {expected})"
                )))
            }
        }
    }
    if pre.must_not_exist && current.is_some() {
        return Some(ApiError::FailedPrecondition(
            "the document already exists".into(),
        ));
    }
    None
}

fn denied(method: &str) -> ApiError {
    ApiError::PermissionDenied(format!("the {method} rule denies this"))
}

/// The heart of every write, decided on the current document inside the write transaction.
///
/// The order is the security property: nothing that depends on the stored document — that it
/// exists or not (404, 409), its version (412), what a transform finds there — is answered
/// before the write rule allowed the write, and each such answer is given only to a caller
/// whose `read` rule admits the document (or, for a missing one, whose `read` rule admits a
/// missing one, as `GET` answers 404 rather than 403); everyone else gets the very denial the
/// rule gives, so a missing and an existing document look alike. Past the rule, the checks on
/// the written document (depth, size, schema) name the limit, path and keyword, never a value.
fn decide_write(
    coll: &Collection,
    judge: &Judge<'_>,
    limits: &DocumentsConfig,
    current: Option<&DocumentRow>,
    now: DateTime<Utc>,
    kind: &WriteKind,
    pre: Precondition,
) -> Result<WriteDecision, Halt> {
    let (rule, method) = match (kind, current) {
        (WriteKind::Delete, _) => (&coll.delete, "delete"),
        (WriteKind::Update(_), _) | (WriteKind::Set(_), Some(_)) => (&coll.update, "update"),
        (WriteKind::Create(_), _) | (WriteKind::Set(_), None) => (&coll.create, "create"),
    };
    // A replace is a create or an update depending on whether the document exists; its
    // denial must not say which.
    let denied = |method: &str| match kind {
        WriteKind::Set(_) => {
            ApiError::PermissionDenied("the create or update rule denies this".into())
        }
        _ => denied(method),
    };
    // `err` depends on the stored document: shown only to a caller who may read it.
    let reveal = |err: ApiError| -> Halt {
        match judge.allows(&coll.read, "get", current, None) {
            Ok(true) => Halt::Api(err),
            Ok(false) => Halt::Api(denied(method)),
            Err(halt) => halt,
        }
    };
    // The caller's own input first: its errors describe only what the caller sent.
    match kind {
        WriteKind::Create(data) | WriteKind::Set(data) | WriteKind::Update(data) => {
            patch::check_input(data, limits.max_depth, true)?
        }
        WriteKind::Delete => {}
    }
    let new_data = match (kind, current) {
        (WriteKind::Delete | WriteKind::Update(_), None) => {
            return Err(reveal(ApiError::NotFound("document not found".into())))
        }
        (WriteKind::Create(_), Some(_)) => {
            return Err(reveal(ApiError::AlreadyExists(
                "a document with this id already exists".into(),
            )))
        }
        (WriteKind::Delete, Some(_)) => None,
        (WriteKind::Create(data), None) => Some(patch::apply_set(data, None, now)),
        (WriteKind::Set(data), _) => Some(patch::apply_set(data, current.map(|c| &c.data), now)),
        (WriteKind::Update(data), Some(cur)) => Some(patch::apply_merge(&cur.data, data, now)),
    };
    // A transform that cannot apply (an overflowing `$increment`) says something about the
    // stored value.
    let new_data = new_data.transpose().map_err(reveal)?;
    if !judge.allows(rule, method, current, new_data.as_ref())? {
        return Err(denied(method).into());
    }
    if let Some(err) = failed_precondition(pre, current) {
        return Err(reveal(err));
    }
    let Some(new_data) = new_data else {
        return Ok(WriteDecision::Delete);
    };
    if patch::depth(&new_data) > limits.max_depth {
        return Err(ApiError::invalid_with(
            format!(
                "data would be nested deeper than {} levels",
                limits.max_depth
            ),
            json!({"field": "data"}),
        )
        .into());
    }
    let size = serde_json::to_vec(&new_data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limits.max_document_bytes {
        // The size itself is not told: after a merge it measures the stored document.
        return Err(ApiError::PayloadTooLarge(format!(
            "the document would be larger than the limit of {} bytes",
            limits.max_document_bytes
        ))
        .into());
    }
    coll.check_schema(&new_data)?;
    Ok(WriteDecision::Put(new_data))
}
