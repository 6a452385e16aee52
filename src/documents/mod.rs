//! The document database (API.md § Documents and § Rules): collections with their rules,
//! indexes and schema; document reads and writes with rules checked; queries where the `read`
//! rule acts as a filter; aggregates; batches. HTTP lives in `http::documents` and
//! `http::collections`; SQL in `store`.
//!
//! Every write goes through [`DocumentService::write`]: the store reads the current document
//! inside its write transaction and hands it to a decision closure that applies transforms,
//! validates, and checks the rule; the row and its change-log entry are committed together and
//! then published on the store's change feed. Realtime and function triggers consume that feed.

pub mod patch;
pub mod query;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::config::DocumentsConfig;
use crate::error::{ApiError, ApiResult};
use crate::ids::new_id;
use crate::rules::{AuthInfo, DocumentLookup, Pushdown, RequestInfo, Rule, RuleInput};
use crate::store::docsql::is_index_safe_key;
use crate::store::{
    document_json, CollectionRow, DocumentRow, IndexSpec, PlannedWrite, Rejection, Scan, Store,
    StoreError, WriteDecision, WriteOutcome,
};
use query::{Cursor, Direction, Field, Filter, Op, Operand, Order, Query};

/// How long a node trusts its cached copy of a collection's rules before re-reading it (a
/// change made on this node applies at once; one made on another node within this time).
const COLLECTION_CACHE_TTL: Duration = Duration::from_secs(2);
/// Rows examined per request when a `read` rule has to be evaluated row by row; past it the
/// page ends early with a cursor to continue from.
const MAX_ROWS_EXAMINED: usize = 5000;
pub const MAX_BATCH_WRITES: usize = 500;

/// Who is asking, as the document layer sees it.
#[derive(Debug, Clone)]
pub enum Principal {
    /// An admin or a service key: rules do not apply.
    Privileged,
    User(AuthInfo),
    Anonymous,
}

impl Principal {
    fn auth(&self) -> Option<&AuthInfo> {
        match self {
            Principal::User(a) => Some(a),
            _ => None,
        }
    }
}

/// A document as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Document {
    pub id: String,
    #[schema(value_type = Object)]
    pub data: Value,
    pub version: i64,
    pub created_at: String,
    pub updated_at: String,
}

impl From<&DocumentRow> for Document {
    fn from(d: &DocumentRow) -> Self {
        Document {
            id: d.id.clone(),
            data: d.data.clone(),
            version: d.version,
            created_at: d.created_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            updated_at: d.updated_at.to_rfc3339_opts(SecondsFormat::Micros, true),
        }
    }
}

/// `rules` of a collection: CEL sources; a missing rule denies users.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RulesSpec {
    pub read: Option<String>,
    pub create: Option<String>,
    pub update: Option<String>,
    pub delete: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IndexDecl {
    /// `[[field, "asc"|"desc"], ...]`
    #[schema(value_type = Vec<Vec<String>>)]
    pub fields: Vec<Value>,
    #[serde(default)]
    pub unique: bool,
}

/// `PUT /v1/admin/collections/{name}`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CollectionSpec {
    #[serde(default)]
    pub rules: RulesSpec,
    #[serde(default)]
    pub indexes: Vec<IndexDecl>,
    /// A JSON Schema every document's `data` must satisfy.
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct CollectionView {
    pub name: String,
    pub rules: RulesSpec,
    pub indexes: Vec<IndexDecl>,
    #[schema(value_type = Option<Object>)]
    pub schema: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A collection ready for use: compiled rules, index paths, schema validator.
pub struct Collection {
    pub row: CollectionRow,
    read: Option<Rule>,
    create: Option<Rule>,
    update: Option<Rule>,
    delete: Option<Rule>,
    indexed: Vec<Vec<String>>,
    leading: Vec<Vec<String>>,
    index_widths: Vec<usize>,
    schema: Option<jsonschema::Validator>,
}

/// Validates a collection name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn check_collection_name(name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if !ok {
        return Err(ApiError::invalid_with(
            "collection names match [a-z0-9][a-z0-9_-]{0,62}",
            json!({"field": "collection"}),
        ));
    }
    Ok(())
}

/// Validates a client-chosen document id: `[A-Za-z0-9_-]{1,128}`, not starting with `_`.
pub fn check_document_id(id: &str) -> ApiResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('_')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(ApiError::invalid_with(
            "document ids match [A-Za-z0-9_-]{1,128} and do not start with _",
            json!({"field": "id"}),
        ));
    }
    Ok(())
}

fn compile_rule(kind: &str, source: &Option<String>) -> ApiResult<Option<Rule>> {
    match source {
        None => Ok(None),
        Some(src) => Rule::compile(src).map(Some).map_err(|e| {
            ApiError::invalid_with(
                format!("the {kind} rule does not compile: {e}"),
                json!({"rule": kind, "line": e.line, "column": e.column, "message": e.message}),
            )
        }),
    }
}

fn parse_indexes(decls: &[IndexDecl]) -> ApiResult<Vec<IndexSpec>> {
    if decls.len() > 32 {
        return Err(ApiError::invalid_with(
            "at most 32 indexes per collection",
            json!({"field": "indexes"}),
        ));
    }
    decls
        .iter()
        .map(|d| {
            if d.fields.is_empty() || d.fields.len() > 8 {
                return Err(ApiError::invalid_with(
                    "an index has 1 to 8 fields",
                    json!({"field": "indexes"}),
                ));
            }
            let fields = d
                .fields
                .iter()
                .map(|f| {
                    let (name, dir) = match f {
                        Value::String(n) => (n.as_str(), "asc"),
                        Value::Array(pair) => match pair.as_slice() {
                            [Value::String(n)] => (n.as_str(), "asc"),
                            [Value::String(n), Value::String(d)] => (n.as_str(), d.as_str()),
                            _ => ("", ""),
                        },
                        _ => ("", ""),
                    };
                    let path: Vec<String> = name.split('.').map(str::to_string).collect();
                    if name.is_empty() || !path.iter().all(|k| is_index_safe_key(k)) {
                        return Err(ApiError::invalid_with(
                            "index fields are dotted paths of [A-Za-z0-9_-] keys, as [field, \"asc\"|\"desc\"]",
                            json!({"field": "indexes", "value": f}),
                        ));
                    }
                    let desc = match dir {
                        "asc" => false,
                        "desc" => true,
                        _ => {
                            return Err(ApiError::invalid_with(
                                "index direction is asc or desc",
                                json!({"field": "indexes", "value": f}),
                            ))
                        }
                    };
                    Ok((path, desc))
                })
                .collect::<ApiResult<Vec<_>>>()?;
            Ok(IndexSpec {
                fields,
                unique: d.unique,
            })
        })
        .collect()
}

fn compile_collection(row: CollectionRow) -> ApiResult<Collection> {
    let rules: RulesSpec = serde_json::from_value(row.rules.clone()).map_err(ApiError::internal)?;
    let decls: Vec<IndexDecl> =
        serde_json::from_value(row.indexes.clone()).map_err(ApiError::internal)?;
    let indexes = parse_indexes(&decls)?;
    let schema = row
        .schema
        .as_ref()
        .map(|s| {
            jsonschema::validator_for(s).map_err(|e| {
                ApiError::invalid_with(
                    format!("schema is not a valid JSON Schema: {e}"),
                    json!({"field": "schema"}),
                )
            })
        })
        .transpose()?;
    Ok(Collection {
        read: compile_rule("read", &rules.read)?,
        create: compile_rule("create", &rules.create)?,
        update: compile_rule("update", &rules.update)?,
        delete: compile_rule("delete", &rules.delete)?,
        indexed: indexes
            .iter()
            .flat_map(|i| i.fields.iter().map(|(p, _)| p.clone()))
            .collect(),
        leading: indexes.iter().map(|i| i.fields[0].0.clone()).collect(),
        index_widths: indexes.iter().map(|i| i.fields.len()).collect(),
        schema,
        row,
    })
}

impl Collection {
    pub fn view(&self) -> CollectionView {
        CollectionView {
            name: self.row.name.clone(),
            rules: serde_json::from_value(self.row.rules.clone()).unwrap_or_default(),
            indexes: serde_json::from_value(self.row.indexes.clone()).unwrap_or_default(),
            schema: self.row.schema.clone(),
            created_at: self.row.created_at,
            updated_at: self.row.updated_at,
        }
    }

    fn check_schema(&self, data: &Value) -> ApiResult<()> {
        if let Some(validator) = &self.schema {
            if let Err(e) = validator.validate(data) {
                let path = e.instance_path().as_str().to_string();
                return Err(ApiError::invalid_with(
                    format!("data does not match the collection schema at `{path}`: {e}"),
                    json!({"path": path}),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `rule` lets `principal` do `method`. Admins and service keys always may; a missing
/// rule denies; a rule that cannot be decided (a failed lookup) denies and is logged. The
/// document (`resource`) and the written data are only built when the rule needs them.
fn rule_allows(
    rule: &Option<Rule>,
    principal: &Principal,
    resource: impl FnOnce() -> Option<Value>,
    method: &str,
    time: DateTime<Utc>,
    data: impl FnOnce() -> Option<Value>,
    lookup: &dyn DocumentLookup,
) -> bool {
    if matches!(principal, Principal::Privileged) {
        return true;
    }
    let Some(rule) = rule else { return false };
    if let Some(constant) = rule.constant() {
        return constant;
    }
    let input = RuleInput {
        auth: principal.auth().cloned(),
        resource: resource(),
        request: RequestInfo {
            method: method.into(),
            time,
            data: data(),
        },
    };
    match rule.evaluate(&input, lookup) {
        Ok(allowed) => allowed,
        Err(err) => {
            tracing::warn!(error = %err, rule = rule.source(), "rule could not be decided; denying");
            false
        }
    }
}

/// Reads other documents for `get()`/`exists()` in rules. Rules are evaluated synchronously
/// (sometimes inside a write transaction), so this blocks on the store in place.
struct StoreLookup {
    store: Arc<dyn Store>,
    handle: tokio::runtime::Handle,
}

impl DocumentLookup for StoreLookup {
    fn get(&self, collection: &str, id: &str) -> Result<Option<Value>, String> {
        let store = self.store.clone();
        let (c, i) = (collection.to_string(), id.to_string());
        let fetch = move || {
            self.handle
                .block_on(async move { store.get_document(&c, &i).await })
        };
        let found = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(fetch)
            }
            _ => fetch(),
        };
        found
            .map(|d| d.as_ref().map(document_json))
            .map_err(|e| e.to_string())
    }
}

/// What a single write asks for.
#[derive(Debug, Clone)]
pub enum WriteKind {
    /// Create; fails if the id exists.
    Create(Value),
    /// Create or replace.
    Set(Value),
    /// Merge patch; the document must exist.
    Update(Value),
    Delete,
}

/// Preconditions of a write: `If-Match` / `if_version`, `If-None-Match: *`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Precondition {
    pub if_version: Option<i64>,
    pub must_not_exist: bool,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct QueryResult {
    pub documents: Vec<Document>,
    pub next_cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
}

pub struct DocumentService {
    store: Arc<dyn Store>,
    config: DocumentsConfig,
    cache: Mutex<HashMap<String, (Instant, Arc<Collection>)>>,
}

impl DocumentService {
    pub fn new(store: Arc<dyn Store>, config: DocumentsConfig) -> Self {
        DocumentService {
            store,
            config,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn lookup(&self) -> StoreLookup {
        StoreLookup {
            store: self.store.clone(),
            handle: tokio::runtime::Handle::current(),
        }
    }

    // ------------------------------------------------------------------ collections

    pub async fn put_collection(
        &self,
        name: &str,
        spec: CollectionSpec,
    ) -> ApiResult<CollectionView> {
        check_collection_name(name)?;
        let indexes = parse_indexes(&spec.indexes)?;
        let now = Utc::now();
        let existing = self.store.collection(name).await?;
        let row = CollectionRow {
            name: name.to_string(),
            rules: serde_json::to_value(&spec.rules).map_err(ApiError::internal)?,
            indexes: serde_json::to_value(&spec.indexes).map_err(ApiError::internal)?,
            schema: spec.schema,
            created_at: existing.map(|e| e.created_at).unwrap_or(now),
            updated_at: now,
        };
        // Compile first: a rule or schema that does not compile changes nothing.
        let compiled = compile_collection(row.clone())?;
        self.store.put_collection(&row, &indexes).await?;
        let view = compiled.view();
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (Instant::now(), Arc::new(compiled)));
        Ok(view)
    }

    pub async fn delete_collection(&self, name: &str) -> ApiResult<()> {
        check_collection_name(name)?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if !self.store.delete_collection(name).await? {
            return Err(ApiError::NotFound(format!("collection `{name}` not found")));
        }
        Ok(())
    }

    pub async fn list_collections(&self) -> ApiResult<Vec<CollectionView>> {
        let rows = self.store.list_collections().await?;
        rows.into_iter()
            .map(|r| compile_collection(r).map(|c| c.view()))
            .collect()
    }

    /// The collection, from the cache when fresh.
    pub async fn collection(&self, name: &str) -> ApiResult<Arc<Collection>> {
        check_collection_name(name)?;
        if let Some((at, c)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            if at.elapsed() < COLLECTION_CACHE_TTL {
                return Ok(c.clone());
            }
        }
        let row = self
            .store
            .collection(name)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("collection `{name}` not found")))?;
        let compiled = Arc::new(compile_collection(row)?);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string(), (Instant::now(), compiled.clone()));
        Ok(compiled)
    }

    // ------------------------------------------------------------------ reads

    pub async fn get(
        &self,
        principal: &Principal,
        collection: &str,
        id: &str,
    ) -> ApiResult<Document> {
        let coll = self.collection(collection).await?;
        check_document_id(id).map_err(|_| ApiError::NotFound("document not found".into()))?;
        let doc = self.store.get_document(collection, id).await?;
        let resource = || doc.as_ref().map(document_json);
        if !rule_allows(
            &coll.read,
            principal,
            resource,
            "get",
            Utc::now(),
            || None,
            &self.lookup(),
        ) {
            return Err(ApiError::PermissionDenied(
                "the read rule denies this".into(),
            ));
        }
        doc.as_ref()
            .map(Document::from)
            .ok_or_else(|| ApiError::NotFound("document not found".into()))
    }

    /// How the `read` rule restricts a scan for this caller.
    fn read_plan(&self, coll: &Collection, principal: &Principal) -> ApiResult<ReadPlan> {
        if matches!(principal, Principal::Privileged) {
            return Ok(ReadPlan::All);
        }
        let rule = coll
            .read
            .as_ref()
            .ok_or_else(|| ApiError::PermissionDenied("this collection has no read rule".into()))?;
        match rule.constant() {
            Some(true) => return Ok(ReadPlan::All),
            Some(false) => return Ok(ReadPlan::Nothing),
            None => {}
        }
        Ok(match rule.pushdown(principal.auth(), Utc::now()) {
            Pushdown::Allow => ReadPlan::All,
            Pushdown::Deny => ReadPlan::Nothing,
            Pushdown::Filter(f) => ReadPlan::Filter(parse_rule_filter(&f)?),
            Pushdown::Partial { filter } => ReadPlan::PerRow(Some(parse_rule_filter(&filter)?)),
            Pushdown::Residual => ReadPlan::PerRow(None),
        })
    }

    pub async fn query(
        &self,
        principal: &Principal,
        collection: &str,
        query: Query,
    ) -> ApiResult<QueryResult> {
        let coll = self.collection(collection).await?;
        let plan = self.read_plan(&coll, principal)?;
        let (filter, per_row) = match plan {
            ReadPlan::Nothing => {
                return Ok(QueryResult {
                    documents: vec![],
                    next_cursor: None,
                    count: query.count.then_some(0),
                })
            }
            ReadPlan::All => (query.filter.clone(), false),
            ReadPlan::Filter(f) => (and(query.filter.clone(), Some(f)), false),
            ReadPlan::PerRow(pre) => (and(query.filter.clone(), pre), true),
        };
        let lookup = self.lookup();
        let mut kept: Vec<DocumentRow> = Vec::new();
        let mut after = query.after.clone();
        let mut examined = 0usize;
        let mut exhausted = false;
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
                examined += 1;
                after = Some(cursor_of(&query.order, &row));
                let keep = !per_row
                    || rule_allows(
                        &coll.read,
                        principal,
                        || Some(document_json(&row)),
                        "list",
                        Utc::now(),
                        || None,
                        &lookup,
                    );
                if keep {
                    kept.push(row.clone());
                }
                last_examined = Some(row);
                if kept.len() > query.limit as usize {
                    break;
                }
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
        let next_cursor = if more {
            kept.last().map(|d| query.cursor_after(&document_json(d)))
        } else if !exhausted {
            // Stopped at the row budget: continue after the last row examined, so no row is
            // skipped and none is returned twice.
            last_examined
                .as_ref()
                .map(|d| query.cursor_after(&document_json(d)))
        } else {
            None
        };
        let count = if query.count {
            Some(if per_row {
                self.count_per_row(&coll, principal, collection, filter.as_ref())
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

    /// Visits every document a filter matches that the caller may read, in batches.
    async fn for_each_readable(
        &self,
        coll: &Collection,
        principal: &Principal,
        collection: &str,
        filter: Option<&Filter>,
        per_row: bool,
        mut visit: impl FnMut(&DocumentRow),
    ) -> ApiResult<()> {
        let order = [Order {
            field: Field::Id,
            direction: Direction::Asc,
        }];
        let lookup = self.lookup();
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
                if !per_row
                    || rule_allows(
                        &coll.read,
                        principal,
                        || Some(document_json(row)),
                        "list",
                        Utc::now(),
                        || None,
                        &lookup,
                    )
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

    async fn count_per_row(
        &self,
        coll: &Collection,
        principal: &Principal,
        collection: &str,
        filter: Option<&Filter>,
    ) -> ApiResult<u64> {
        let mut n = 0u64;
        self.for_each_readable(coll, principal, collection, filter, true, |_| n += 1)
            .await?;
        Ok(n)
    }

    /// `_aggregate`: count, sum, avg, min, max over the documents the caller may read.
    pub async fn aggregate(
        &self,
        principal: &Principal,
        collection: &str,
        where_: Option<Filter>,
        aggregations: &Map<String, Value>,
    ) -> ApiResult<Map<String, Value>> {
        let coll = self.collection(collection).await?;
        let specs = parse_aggregations(aggregations)?;
        let (filter, per_row) = match self.read_plan(&coll, principal)? {
            ReadPlan::Nothing => {
                return Ok(specs
                    .iter()
                    .map(|(name, agg)| (name.clone(), agg.empty()))
                    .collect())
            }
            ReadPlan::All => (where_, false),
            ReadPlan::Filter(f) => (and(where_, Some(f)), false),
            ReadPlan::PerRow(pre) => (and(where_, pre), true),
        };
        let mut out = Map::new();
        if per_row {
            let mut rows = Vec::new();
            self.for_each_readable(&coll, principal, collection, filter.as_ref(), true, |r| {
                rows.push(document_json(r))
            })
            .await?;
            for (name, agg) in &specs {
                out.insert(name.clone(), agg.compute(&rows));
            }
            return Ok(out);
        }
        let order: Vec<Order> = vec![Order {
            field: Field::Id,
            direction: Direction::Asc,
        }];
        let numeric_paths: Vec<Vec<String>> = specs
            .iter()
            .filter_map(|(_, a)| match a {
                Aggregation::Sum(Field::Data(p)) | Aggregation::Avg(Field::Data(p)) => {
                    Some(p.clone())
                }
                _ => None,
            })
            .collect();
        let sums = self
            .store
            .aggregate_numbers(
                &Scan {
                    collection,
                    filter: filter.as_ref(),
                    order: &order,
                    after: None,
                    limit: 0,
                    indexed: &coll.indexed,
                    leading: &coll.leading,
                    index_widths: &coll.index_widths,
                },
                &numeric_paths,
            )
            .await?;
        let mut next_sum = sums.sums.iter();
        for (name, agg) in &specs {
            let value = match agg {
                Aggregation::Count => json!(sums.count),
                Aggregation::Sum(Field::Data(_)) => {
                    let (sum, _) = next_sum.next().copied().unwrap_or((0.0, 0));
                    number(sum)
                }
                Aggregation::Avg(Field::Data(_)) => {
                    let (sum, n) = next_sum.next().copied().unwrap_or((0.0, 0));
                    if n == 0 {
                        Value::Null
                    } else {
                        number(sum / n as f64)
                    }
                }
                Aggregation::Sum(_) | Aggregation::Avg(_) => json!(0),
                Aggregation::Min(field) | Aggregation::Max(field) => {
                    let direction = if matches!(agg, Aggregation::Min(_)) {
                        Direction::Asc
                    } else {
                        Direction::Desc
                    };
                    let present = Filter::Clause {
                        field: field.clone(),
                        op: Op::Ne,
                        value: Operand::Json(Value::Null),
                    };
                    let f = and(filter.clone(), Some(present));
                    let order = vec![
                        Order {
                            field: field.clone(),
                            direction,
                        },
                        Order {
                            field: Field::Id,
                            direction: Direction::Asc,
                        },
                    ];
                    let rows = self
                        .store
                        .scan_documents(&Scan {
                            collection,
                            filter: f.as_ref(),
                            order: &order,
                            after: None,
                            limit: 1,
                            indexed: &coll.indexed,
                            leading: &coll.leading,
                            index_widths: &coll.index_widths,
                        })
                        .await?;
                    rows.first()
                        .and_then(|r| field.get(&document_json(r)).map(|v| v.into_owned()))
                        .unwrap_or(Value::Null)
                }
            };
            out.insert(name.clone(), value);
        }
        Ok(out)
    }

    // ------------------------------------------------------------------ writes

    /// Plans one write: the decision closure the store runs on the current document.
    fn plan(
        &self,
        coll: Arc<Collection>,
        principal: &Principal,
        id: String,
        kind: WriteKind,
        pre: Precondition,
        index: Option<usize>,
    ) -> PlannedWrite {
        let principal = principal.clone();
        let lookup = self.lookup();
        let limits = self.config.clone();
        let collection = coll.row.name.clone();
        let decide = move |current: Option<&DocumentRow>,
                           now: DateTime<Utc>|
              -> Result<WriteDecision, Rejection> {
            let result = decide_write(&coll, &principal, &lookup, &limits, current, now, kind, pre);
            result.map_err(|e| Box::new(at_index(e, index)) as Rejection)
        };
        PlannedWrite {
            collection,
            id,
            decide: Box::new(decide),
        }
    }

    /// Runs planned writes in one transaction; maps the store's answers into API errors.
    async fn run(&self, writes: Vec<PlannedWrite>) -> ApiResult<Vec<WriteOutcome>> {
        match self.store.apply_writes(writes).await {
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
        principal: &Principal,
        collection: &str,
        id: Option<&str>,
        kind: WriteKind,
        pre: Precondition,
    ) -> ApiResult<(Option<Document>, bool)> {
        let coll = self.collection(collection).await?;
        let id = match id {
            Some(id) => {
                check_document_id(id)?;
                id.to_string()
            }
            None => new_id(),
        };
        let plan = self.plan(coll, principal, id, kind, pre, None);
        let outcome = self
            .run(vec![plan])
            .await?
            .pop()
            .expect("one write, one outcome");
        let created = outcome.change.op == "create";
        Ok((outcome.document.as_ref().map(Document::from), created))
    }

    /// `_batch`: up to 500 writes, all or nothing.
    pub async fn batch(
        &self,
        principal: &Principal,
        writes: Vec<BatchWrite>,
    ) -> ApiResult<Vec<Value>> {
        if writes.is_empty() || writes.len() > MAX_BATCH_WRITES {
            return Err(ApiError::invalid_with(
                format!("a batch has 1 to {MAX_BATCH_WRITES} writes"),
                json!({"field": "writes"}),
            ));
        }
        let mut plans = Vec::with_capacity(writes.len());
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
            plans.push(self.plan(coll, principal, id, kind, pre, Some(i)));
        }
        let outcomes = self.run(plans).await?;
        Ok(outcomes
            .iter()
            .map(|o| {
                json!({
                    "op": o.change.op,
                    "collection": o.change.collection,
                    "id": o.change.id,
                    "version": o.change.version,
                    "document": o.document.as_ref().map(Document::from),
                })
            })
            .collect())
    }

    /// Deletes change-log entries older than the retention.
    pub async fn prune_changes(&self) -> ApiResult<u64> {
        let keep = chrono::Duration::hours(self.config.change_retention_hours as i64);
        Ok(self.store.prune_changes(Utc::now() - keep).await?)
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

enum ReadPlan {
    All,
    Nothing,
    Filter(Filter),
    /// Evaluate the rule per row, after an optional SQL pre-filter.
    PerRow(Option<Filter>),
}

fn parse_rule_filter(v: &Value) -> ApiResult<Filter> {
    query::parse_where(v)?.ok_or_else(|| ApiError::internal(anyhow::anyhow!("empty rule filter")))
}

fn and(a: Option<Filter>, b: Option<Filter>) -> Option<Filter> {
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

fn number(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        json!(f as i64)
    } else {
        serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
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

/// The heart of every write: preconditions, transforms, validation and the rule, decided on
/// the current document inside the write transaction.
#[allow(clippy::too_many_arguments)]
fn decide_write(
    coll: &Collection,
    principal: &Principal,
    lookup: &StoreLookup,
    limits: &DocumentsConfig,
    current: Option<&DocumentRow>,
    now: DateTime<Utc>,
    kind: WriteKind,
    pre: Precondition,
) -> ApiResult<WriteDecision> {
    // `resource` is the stored document, built only when a rule reads it.
    let svc_allowed = |rule: &Option<Rule>, method: &str, data: Option<Value>| {
        rule_allows(
            rule,
            principal,
            || current.map(document_json),
            method,
            now,
            || data,
            lookup,
        )
    };
    // Preconditions are checked after the rule: a caller the rule refuses gets 403 and
    // learns nothing about the document's version.
    let check_preconditions = || -> ApiResult<()> {
        if let Some(expected) = pre.if_version {
            match current {
                Some(c) if c.version == expected => {}
                Some(c) => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "version is {}, not {expected}",
                        c.version
                    )))
                }
                None => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "the document does not exist (expected version {expected})"
                    )))
                }
            }
        }
        if pre.must_not_exist && current.is_some() {
            return Err(ApiError::FailedPrecondition(
                "the document already exists".into(),
            ));
        }
        Ok(())
    };
    let old_data = current.map(|c| &c.data);
    let new_data = match kind {
        WriteKind::Delete => {
            if current.is_none() {
                return Err(ApiError::NotFound("document not found".into()));
            }
            if !svc_allowed(&coll.delete, "delete", None) {
                return Err(ApiError::PermissionDenied(
                    "the delete rule denies this".into(),
                ));
            }
            check_preconditions()?;
            return Ok(WriteDecision::Delete);
        }
        WriteKind::Create(data) => {
            if current.is_some() {
                return Err(ApiError::AlreadyExists(
                    "a document with this id already exists".into(),
                ));
            }
            patch::check_input(&data, limits.max_depth, true)?;
            patch::apply_set(&data, None, now)
        }
        WriteKind::Set(data) => {
            patch::check_input(&data, limits.max_depth, true)?;
            patch::apply_set(&data, old_data, now)
        }
        WriteKind::Update(patch_data) => {
            let Some(old) = old_data else {
                return Err(ApiError::NotFound("document not found".into()));
            };
            patch::check_input(&patch_data, limits.max_depth, true)?;
            patch::apply_merge(old, &patch_data, now)
        }
    };
    if patch::depth(&new_data) > limits.max_depth {
        return Err(ApiError::invalid_with(
            format!("data is nested deeper than {} levels", limits.max_depth),
            json!({"field": "data"}),
        ));
    }
    let size = serde_json::to_vec(&new_data)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if size > limits.max_document_bytes {
        return Err(ApiError::PayloadTooLarge(format!(
            "the document is {size} bytes; the limit is {}",
            limits.max_document_bytes
        )));
    }
    coll.check_schema(&new_data)?;
    let (rule, method) = if current.is_some() {
        (&coll.update, "update")
    } else {
        (&coll.create, "create")
    };
    let written = if rule.as_ref().and_then(Rule::constant).is_some() {
        None
    } else {
        Some(new_data.clone())
    };
    if !svc_allowed(rule, method, written) {
        return Err(ApiError::PermissionDenied(format!(
            "the {method} rule denies this"
        )));
    }
    check_preconditions()?;
    Ok(WriteDecision::Put(new_data))
}

#[derive(Debug, Clone)]
enum Aggregation {
    Count,
    Sum(Field),
    Avg(Field),
    Min(Field),
    Max(Field),
}

impl Aggregation {
    fn empty(&self) -> Value {
        match self {
            Aggregation::Count | Aggregation::Sum(_) => json!(0),
            _ => Value::Null,
        }
    }

    /// The same aggregate computed in Rust over documents already filtered by the rule.
    fn compute(&self, docs: &[Value]) -> Value {
        let numbers = |f: &Field| -> Vec<f64> {
            docs.iter()
                .filter_map(|d| f.get(d).and_then(|v| v.as_f64()))
                .collect()
        };
        match self {
            Aggregation::Count => json!(docs.len()),
            Aggregation::Sum(f) => number(numbers(f).iter().sum()),
            Aggregation::Avg(f) => {
                let n = numbers(f);
                if n.is_empty() {
                    Value::Null
                } else {
                    number(n.iter().sum::<f64>() / n.len() as f64)
                }
            }
            Aggregation::Min(f) | Aggregation::Max(f) => {
                let values = docs
                    .iter()
                    .filter_map(|d| f.get(d))
                    .filter(|v| !v.is_null());
                let pick = if matches!(self, Aggregation::Min(_)) {
                    values.min_by(|a, b| query::compare_values(Some(a), Some(b)))
                } else {
                    values.max_by(|a, b| query::compare_values(Some(a), Some(b)))
                };
                pick.map(|v| v.into_owned()).unwrap_or(Value::Null)
            }
        }
    }
}

fn parse_aggregations(aggs: &Map<String, Value>) -> ApiResult<Vec<(String, Aggregation)>> {
    if aggs.is_empty() || aggs.len() > 20 {
        return Err(ApiError::invalid_with(
            "aggregations has 1 to 20 entries",
            json!({"field": "aggregations"}),
        ));
    }
    aggs.iter()
        .map(|(name, spec)| {
            let bad = || {
                ApiError::invalid_with(
                    format!("aggregation `{name}` is {{\"count\": {{}}}}, {{\"sum\": field}}, {{\"avg\": field}}, {{\"min\": field}} or {{\"max\": field}}"),
                    json!({"field": name}),
                )
            };
            let obj = spec.as_object().filter(|o| o.len() == 1).ok_or_else(bad)?;
            let (kind, arg) = obj.iter().next().expect("one entry");
            let field = || -> ApiResult<Field> { Field::parse(arg.as_str().ok_or_else(bad)?) };
            let agg = match kind.as_str() {
                "count" => Aggregation::Count,
                "sum" => Aggregation::Sum(field()?),
                "avg" => Aggregation::Avg(field()?),
                "min" => Aggregation::Min(field()?),
                "max" => Aggregation::Max(field()?),
                _ => return Err(bad()),
            };
            Ok((name.clone(), agg))
        })
        .collect()
}
