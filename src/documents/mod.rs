//! The document database (API.md § Documents and § Rules): collections with their rules,
//! indexes and schema; document reads and writes with rules checked; queries where the `read`
//! rule acts as a filter; aggregates; batches. HTTP lives in `http::documents` and
//! `http::collections`; SQL in `store`.
//!
//! Every write goes through [`DocumentService::write`]: the store reads the current document
//! inside its write transaction and hands it to a decision closure that applies transforms,
//! validates, and checks the rule; the row and its change-log entry are committed together and
//! then published on the store's change feed. Realtime and function triggers consume that feed.

pub mod cursor;
pub mod patch;

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
use crate::query::{self, Cursor, Direction, Field, Filter, Op, Operand, Order, Query};
use crate::rules::{AuthInfo, Evaluation, Pushdown, RequestInfo, Rule, RuleInput};
use crate::store::docsql::is_index_safe_key;
use crate::store::{
    document_json, CollectionRow, Decision, DocumentRow, Fetched, IndexSpec, PlannedWrite,
    Rejection, Scan, Store, StoreError, WriteDecision, WriteOutcome,
};
use cursor::{CursorSeal, Resume};

/// How long a node trusts its cached copy of a collection's rules before re-reading it (a
/// change made on this node applies at once; one made on another node within this time).
const COLLECTION_CACHE_TTL: Duration = Duration::from_secs(2);
/// Rows examined per request when a `read` rule has to be evaluated row by row; past it the
/// page ends early with a cursor to continue from.
const MAX_ROWS_EXAMINED: usize = 5000;
pub const MAX_BATCH_WRITES: usize = 500;
/// Deepest JSON Schema a collection may declare.
const MAX_SCHEMA_DEPTH: usize = 64;

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
            // Compiling walks the schema recursively: a bound keeps a hostile one from
            // overflowing the stack. Real schemas are a few levels deep.
            if patch::depth(s) > MAX_SCHEMA_DEPTH {
                return Err(ApiError::invalid_with(
                    format!("schema is nested deeper than {MAX_SCHEMA_DEPTH} levels"),
                    json!({"field": "schema"}),
                ));
            }
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

    /// Checks `data` against the collection's JSON Schema. The error names where (the
    /// instance path) and which keyword failed, never the value: after a merge the data holds
    /// stored fields the caller may not be allowed to read.
    fn check_schema(&self, data: &Value) -> ApiResult<()> {
        if let Some(validator) = &self.schema {
            if let Err(e) = validator.validate(data) {
                let path = e.instance_path().as_str().to_string();
                let keyword = e.kind().keyword().to_string();
                let shown = if path.is_empty() { "/" } else { path.as_str() };
                return Err(ApiError::invalid_with(
                    format!(
                        "data does not match the collection schema: `{keyword}` fails at `{shown}`"
                    ),
                    json!({"path": path, "keyword": keyword, "schema_path": e.schema_path().as_str()}),
                ));
            }
        }
        Ok(())
    }
}

/// Why a check stopped short of a decision: an answer for the caller, or other documents
/// (`get()`/`exists()` in a rule) that must be fetched before it can go on.
enum Halt {
    Api(ApiError),
    Needs(Vec<(String, String)>),
}

impl From<ApiError> for Halt {
    fn from(err: ApiError) -> Self {
        Halt::Api(err)
    }
}

/// Most documents one request keeps for the `get()`/`exists()` of its per-row rule checks.
const MAX_CACHED_LOOKUPS: usize = 1000;

/// Rule checks for one caller at one time, with the documents fetched for them so far.
/// Admins and service keys always may; a missing rule denies; a rule that cannot be decided
/// (too many lookups) denies and is logged.
struct Judge<'a> {
    principal: &'a Principal,
    now: DateTime<Utc>,
    fetched: &'a Fetched,
}

impl Judge<'_> {
    /// Whether `rule` lets the caller do `method` on `resource` (the stored document), with
    /// `data` the document as it would be after a write. `Err(Halt::Needs)` when the rule
    /// reads documents not fetched yet.
    fn allows(
        &self,
        rule: &Option<Rule>,
        method: &str,
        resource: Option<&DocumentRow>,
        data: Option<&Value>,
    ) -> Result<bool, Halt> {
        if matches!(self.principal, Principal::Privileged) {
            return Ok(true);
        }
        let Some(rule) = rule else { return Ok(false) };
        if let Some(constant) = rule.constant() {
            return Ok(constant);
        }
        let input = RuleInput {
            auth: self.principal.auth().cloned(),
            resource: resource.map(document_json),
            request: RequestInfo {
                method: method.into(),
                time: self.now,
                data: data.cloned(),
            },
        };
        match rule.evaluate_with(&input, self.fetched) {
            Ok(Evaluation::Decided(allowed)) => Ok(allowed),
            Ok(Evaluation::Needs(keys)) => Err(Halt::Needs(keys)),
            Err(err) => {
                tracing::warn!(error = %err, rule = rule.source(), "rule could not be decided; denying");
                Ok(false)
            }
        }
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
    cursors: CursorSeal,
}

/// The database key of the secret query cursors are sealed with (shared by all nodes).
const CURSOR_SECRET_META: &str = "cursor_secret";

impl DocumentService {
    /// Loads (or, on a new database, makes) the cursor secret.
    pub async fn new(store: Arc<dyn Store>, config: DocumentsConfig) -> anyhow::Result<Self> {
        let secret = store
            .meta_put_if_absent(CURSOR_SECRET_META, &crate::ids::new_secret(64))
            .await?;
        Ok(DocumentService {
            cursors: CursorSeal::new(secret.as_bytes())?,
            store,
            config,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `rule` lets the caller `method` (`get` or `list`) the stored document `row`,
    /// fetching what `get()`/`exists()` read from the store (after the scan: no connection is
    /// held meanwhile). `cache` keeps fetched documents for the rest of the request.
    async fn may_read(
        &self,
        rule: &Option<Rule>,
        principal: &Principal,
        method: &str,
        row: Option<&DocumentRow>,
        cache: &mut Fetched,
    ) -> bool {
        let now = Utc::now();
        let mut fetched = Fetched::new();
        loop {
            let judge = Judge {
                principal,
                now,
                fetched: &fetched,
            };
            match judge.allows(rule, method, row, None) {
                Ok(allowed) => return allowed,
                Err(Halt::Api(_)) => return false,
                Err(Halt::Needs(keys)) => {
                    for key in keys {
                        let doc = match cache.get(&key) {
                            Some(doc) => doc.clone(),
                            None => match self.store.get_document(&key.0, &key.1).await {
                                Ok(doc) => {
                                    let doc = doc.as_ref().map(document_json);
                                    if cache.len() < MAX_CACHED_LOOKUPS {
                                        cache.insert(key.clone(), doc.clone());
                                    }
                                    doc
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "get()/exists() failed; denying");
                                    return false;
                                }
                            },
                        };
                        fetched.insert(key, doc);
                    }
                }
            }
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
        if !self
            .may_read(
                &coll.read,
                principal,
                "get",
                doc.as_ref(),
                &mut Fetched::new(),
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
        let resume = query
            .start_after
            .as_deref()
            .map(|token| self.cursors.open(token, collection, &query.order))
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
        let mut kept: Vec<DocumentRow> = Vec::new();
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
                    || self
                        .may_read(&coll.read, principal, "list", Some(&row), &mut lookups)
                        .await;
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
        let seal = |resume: Resume| self.cursors.seal(collection, &query.order, &resume);
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
                if !per_row
                    || self
                        .may_read(&coll.read, principal, "list", Some(row), &mut lookups)
                        .await
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
            let field = || -> ApiResult<Field> { Ok(Field::parse(arg.as_str().ok_or_else(bad)?)?) };
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
