//! The document database (API.md § Documents and § Rules): collections with their rules,
//! indexes and schema; document reads and writes with rules checked; queries where the `read`
//! rule acts as a filter; aggregates; batches. HTTP lives in `http::documents` and
//! `http::collections`; SQL in `store`.
//!
//! Every write goes through [`DocumentService::write`]: the store reads the current document
//! inside its write transaction and hands it to a decision closure that applies transforms,
//! validates, and checks the rule; the row and its change-log entry are committed together and
//! then published on the store's change feed. Realtime and function triggers consume that feed.
//!
//! Files: `collections` (definitions, compiling, the cache), `access` (rule checks for one
//! caller, pushdown), `read` (get, query, cursors), `aggregate`, `write` (one write, batches,
//! the decision), `patch` (merge patch and transforms), `cursor` (sealed cursors). The shared
//! imports live here; each file takes them with `use super::*`.

mod access;
mod aggregate;
mod collections;
pub mod cursor;
pub mod patch;
mod read;
mod write;

pub use access::{ReadCheck, RuleSession};
pub(crate) use collections::compile_rule;
pub use collections::{
    check_collection_name, check_document_id, check_name, Collection, CollectionSpec,
    CollectionView, IndexDecl, RulesSpec,
};
pub use write::{BatchWrite, MAX_BATCH_WRITES};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::config::DocumentsConfig;
use crate::error::{ApiError, ApiResult};
use crate::ids::new_id;
use crate::query::{self, Cursor, Direction, Field, Filter, Op, Operand, Order, Query};
use crate::rules::budget::{self, RuleClock};
use crate::rules::{AuthInfo, Evaluation, Pushdown, RequestInfo, Rule, RuleEvalError, RuleInput};
use crate::store::docsql::is_index_safe_key;
use crate::store::{
    document_json, CollectionRow, Decision, DocumentRow, EventOp, Fetched, IndexSpec, PlannedWrite,
    Rejection, Scan, Store, StoreError, WriteDecision, WriteOutcome,
};
use access::{Halt, Judge, ReadPlan};
use cursor::{CursorSeal, Resume};
use read::and;

/// What the rules need of a [`Caller`], worked out once per request.
#[derive(Debug, Clone)]
pub(crate) enum Principal {
    /// An admin or a service key: rules do not apply.
    Privileged,
    User(AuthInfo),
    Anonymous,
}

impl From<&Caller> for Principal {
    fn from(caller: &Caller) -> Self {
        if caller.is_privileged() {
            return Principal::Privileged;
        }
        match caller.rule_auth() {
            Some(auth) => Principal::User(auth),
            None => Principal::Anonymous,
        }
    }
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
}
