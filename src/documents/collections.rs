//! Collections: their definition (rules, indexes, JSON Schema), validation of names and
//! ids, compiling a definition for use, and the per-node cache of compiled collections.

use super::*;

/// How long a node trusts its cached copy of a collection's rules before re-reading it (a
/// change made on this node applies at once; one made on another node within this time).
const COLLECTION_CACHE_TTL: Duration = Duration::from_secs(2);

/// Deepest JSON Schema a collection may declare.
const MAX_SCHEMA_DEPTH: usize = 64;

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
    pub(super) read: Option<Rule>,
    pub(super) create: Option<Rule>,
    pub(super) update: Option<Rule>,
    pub(super) delete: Option<Rule>,
    pub(super) indexed: Vec<Vec<String>>,
    pub(super) leading: Vec<Vec<String>>,
    pub(super) index_widths: Vec<usize>,
    pub(super) schema: Option<jsonschema::Validator>,
}

/// Validates a collection name: `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn check_collection_name(name: &str) -> ApiResult<()> {
    check_name("collection", name)
}

/// Validates a collection or bucket name (`what`): `[a-z0-9][a-z0-9_-]{0,62}`.
pub fn check_name(what: &str, name: &str) -> ApiResult<()> {
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
            format!("{what} names match [a-z0-9][a-z0-9_-]{{0,62}}"),
            json!({"field": what}),
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

/// Compiles the `kind` rule of a collection or bucket; a rule that does not compile is a 400
/// with its line and column.
pub(crate) fn compile_rule(kind: &str, source: &Option<String>) -> ApiResult<Option<Rule>> {
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
    pub(super) fn check_schema(&self, data: &Value) -> ApiResult<()> {
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

impl DocumentService {
    // ------------------------------------------------------------------ collections

    pub async fn put_collection(
        &self,
        name: &str,
        spec: CollectionSpec,
    ) -> ApiResult<CollectionView> {
        check_collection_name(name)?;
        let indexes = parse_indexes(&spec.indexes)?;
        // Microseconds, as the databases store them: the definition answered (and cached)
        // now is the one read back later.
        let now = chrono::SubsecRound::trunc_subsecs(Utc::now(), 6);
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

    /// Drops the collection with its documents; each document's deletion is a change-stream
    /// event (by `caller`), so subscribers and triggers see them go.
    pub async fn delete_collection(&self, name: &str, caller: &Caller) -> ApiResult<()> {
        check_collection_name(name)?;
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        if !self.store.delete_collection(name, &caller.actor()).await? {
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
}
