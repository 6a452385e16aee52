//! `/v1/db`: documents, queries, aggregates and batches (API.md § Documents), and the
//! collections admin API under `/v1/admin/collections`.

use axum::extract::{Path, State};
use axum::http::header::{ETAG, IF_MATCH, IF_NONE_MATCH};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::documents::{
    BatchWrite, CollectionSpec, CollectionView, Document, Precondition, QueryResult, WriteKind,
};
use crate::error::{ApiError, ApiResult};
use crate::http::extract::{AdminCaller, Caller, Json};
use crate::query::{parse_request_where, Query, QueryRequest};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_document))
        .routes(routes!(
            get_document,
            put_document,
            patch_document,
            delete_document
        ))
        .routes(routes!(query_documents))
        .routes(routes!(aggregate_documents))
        .routes(routes!(batch))
}

pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_collections))
        .routes(routes!(put_collection, get_collection, delete_collection))
}

/// A document answer with its `ETag` (the quoted version).
fn with_etag(status: StatusCode, doc: Document) -> Response {
    let etag = HeaderValue::from_str(&format!("\"{}\"", doc.version)).expect("digits");
    (status, [(ETAG, etag)], axum::Json(doc)).into_response()
}

/// `If-Match: "3"` (or `3`, or a weak `W/"3"`) → version 3; `*` means "must exist", which a
/// version check cannot express, so it is refused as unsupported.
fn if_match(headers: &HeaderMap) -> ApiResult<Option<i64>> {
    let Some(value) = headers.get(IF_MATCH) else {
        return Ok(None);
    };
    let raw = value.to_str().unwrap_or_default().trim();
    let raw = raw.strip_prefix("W/").unwrap_or(raw).trim_matches('"');
    raw.parse::<i64>().map(Some).map_err(|_| {
        ApiError::invalid_with(
            "If-Match takes a document version, as \"3\"",
            json!({"header": "if-match"}),
        )
    })
}

fn if_none_match_any(headers: &HeaderMap) -> ApiResult<bool> {
    match headers
        .get(IF_NONE_MATCH)
        .map(|v| v.to_str().unwrap_or_default().trim())
    {
        None => Ok(false),
        Some("*") => Ok(true),
        Some(_) => Err(ApiError::invalid_with(
            "If-None-Match on a write takes only *",
            json!({"header": "if-none-match"}),
        )),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDocument {
    #[schema(value_type = Object)]
    pub data: Value,
    /// A client-chosen id (`[A-Za-z0-9_-]{1,128}`, not starting with `_`); generated when absent.
    pub id: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentBody {
    #[schema(value_type = Object)]
    pub data: Value,
}

/// Create a document (201); 409 if the id exists.
#[utoipa::path(post, path = "/{collection}", tag = "documents", params(("collection" = String, Path)),
    request_body = CreateDocument,
    responses((status = 201, body = Document), (status = 400), (status = 403), (status = 404), (status = 409), (status = 413)))]
async fn create_document(
    State(state): State<AppState>,
    caller: Caller,
    Path(collection): Path<String>,
    Json(body): Json<CreateDocument>,
) -> ApiResult<Response> {
    let (doc, _) = state
        .documents
        .write(
            &caller,
            &collection,
            body.id.as_deref(),
            WriteKind::Create(body.data),
            Precondition::default(),
        )
        .await?;
    Ok(with_etag(
        StatusCode::CREATED,
        doc.expect("a create returns the document"),
    ))
}

/// Read a document.
#[utoipa::path(get, path = "/{collection}/{id}", tag = "documents",
    params(("collection" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = Document), (status = 403), (status = 404)))]
async fn get_document(
    State(state): State<AppState>,
    caller: Caller,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let doc = state.documents.get(&caller, &collection, &id).await?;
    Ok(with_etag(StatusCode::OK, doc))
}

/// Create or replace a document. `If-Match: "<version>"` → 412 on mismatch;
/// `If-None-Match: *` → create only.
#[utoipa::path(put, path = "/{collection}/{id}", tag = "documents",
    params(("collection" = String, Path), ("id" = String, Path)), request_body = DocumentBody,
    responses((status = 200, body = Document), (status = 201, body = Document), (status = 400), (status = 403), (status = 412)))]
async fn put_document(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((collection, id)): Path<(String, String)>,
    Json(body): Json<DocumentBody>,
) -> ApiResult<Response> {
    let pre = Precondition {
        if_version: if_match(&headers)?,
        must_not_exist: if_none_match_any(&headers)?,
    };
    let (doc, created) = state
        .documents
        .write(
            &caller,
            &collection,
            Some(&id),
            WriteKind::Set(body.data),
            pre,
        )
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(with_etag(status, doc.expect("a set returns the document")))
}

/// JSON merge patch (null deletes a field) with transforms: `{"$increment": n}`,
/// `{"$serverTimestamp": true}`, `{"$arrayUnion": [...]}`, `{"$arrayRemove": [...]}`.
#[utoipa::path(patch, path = "/{collection}/{id}", tag = "documents",
    params(("collection" = String, Path), ("id" = String, Path)), request_body = DocumentBody,
    responses((status = 200, body = Document), (status = 400), (status = 403), (status = 404), (status = 412)))]
async fn patch_document(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((collection, id)): Path<(String, String)>,
    Json(body): Json<DocumentBody>,
) -> ApiResult<Response> {
    let pre = Precondition {
        if_version: if_match(&headers)?,
        must_not_exist: false,
    };
    let (doc, _) = state
        .documents
        .write(
            &caller,
            &collection,
            Some(&id),
            WriteKind::Update(body.data),
            pre,
        )
        .await?;
    Ok(with_etag(
        StatusCode::OK,
        doc.expect("an update returns the document"),
    ))
}

/// Delete a document (204). `If-Match` as for `PUT`.
#[utoipa::path(delete, path = "/{collection}/{id}", tag = "documents",
    params(("collection" = String, Path), ("id" = String, Path)),
    responses((status = 204), (status = 403), (status = 404), (status = 412)))]
async fn delete_document(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((collection, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let pre = Precondition {
        if_version: if_match(&headers)?,
        must_not_exist: false,
    };
    state
        .documents
        .write(&caller, &collection, Some(&id), WriteKind::Delete, pre)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Query: `{where?, order_by?, limit?, start_after?, select?, count?}`. Only documents the
/// caller may read are returned (the `read` rule is a filter).
#[utoipa::path(post, path = "/{collection}/_query", tag = "documents", params(("collection" = String, Path)),
    request_body(content = Object, description = "{where?, order_by?, limit?, start_after?, select?, count?}"),
    responses((status = 200, body = QueryResult), (status = 400), (status = 403), (status = 404)))]
async fn query_documents(
    State(state): State<AppState>,
    caller: Caller,
    Path(collection): Path<String>,
    Json(body): Json<QueryRequest>,
) -> ApiResult<axum::Json<QueryResult>> {
    let query = Query::parse(body)?;
    Ok(axum::Json(
        state.documents.query(&caller, &collection, query).await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AggregateRequest {
    #[serde(default, rename = "where")]
    #[schema(value_type = Option<Object>)]
    pub where_: Option<Value>,
    /// `{name: {"count": {}} | {"sum": field} | {"avg": field} | {"min": field} | {"max": field}}`
    #[schema(value_type = Object)]
    pub aggregations: Map<String, Value>,
}

/// Aggregates over the documents the caller may read: `{name: value}`.
#[utoipa::path(post, path = "/{collection}/_aggregate", tag = "documents", params(("collection" = String, Path)),
    request_body = AggregateRequest, responses((status = 200, body = Object), (status = 400), (status = 403), (status = 404)))]
async fn aggregate_documents(
    State(state): State<AppState>,
    caller: Caller,
    Path(collection): Path<String>,
    Json(body): Json<AggregateRequest>,
) -> ApiResult<axum::Json<Map<String, Value>>> {
    let filter = match &body.where_ {
        Some(w) => parse_request_where(w)?,
        None => None,
    };
    Ok(axum::Json(
        state
            .documents
            .aggregate(&caller, &collection, filter, &body.aggregations)
            .await?,
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub writes: Vec<BatchWrite>,
}

/// Up to 500 writes, all or nothing: `{results: [{op, collection, id, version, document}]}`.
#[utoipa::path(post, path = "/_batch", tag = "documents", request_body = BatchRequest,
    responses((status = 200, body = Object), (status = 400), (status = 403), (status = 409), (status = 412)))]
async fn batch(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<BatchRequest>,
) -> ApiResult<axum::Json<Value>> {
    let results = state.documents.batch(&caller, body.writes).await?;
    Ok(axum::Json(json!({ "results": results })))
}

// ---------------------------------------------------------------------- collections (admin)

/// List collections.
#[utoipa::path(get, path = "/collections", tag = "admin", responses((status = 200, body = Object)))]
async fn list_collections(
    State(state): State<AppState>,
    _admin: AdminCaller,
) -> ApiResult<axum::Json<Value>> {
    let collections = state.documents.list_collections().await?;
    Ok(axum::Json(json!({ "collections": collections })))
}

/// Create or replace a collection: CEL rules, declared indexes (real SQL indexes; `unique`
/// violations answer 409), an optional JSON Schema. A rule that does not compile is refused
/// with its line and column.
#[utoipa::path(put, path = "/collections/{name}", tag = "admin", params(("name" = String, Path)),
    request_body = CollectionSpec, responses((status = 200, body = CollectionView), (status = 400), (status = 409)))]
async fn put_collection(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(name): Path<String>,
    Json(spec): Json<CollectionSpec>,
) -> ApiResult<axum::Json<CollectionView>> {
    let view = state.documents.put_collection(&name, spec).await?;
    state
        .audit
        .record(
            &caller,
            "collection.put",
            Some(&name),
            json!({"rules": view.rules, "indexes": view.indexes}),
        )
        .await;
    Ok(axum::Json(view))
}

/// One collection.
#[utoipa::path(get, path = "/collections/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = CollectionView), (status = 404)))]
async fn get_collection(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<CollectionView>> {
    Ok(axum::Json(state.documents.collection(&name).await?.view()))
}

/// Delete a collection and all its documents.
#[utoipa::path(delete, path = "/collections/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 204), (status = 404)))]
async fn delete_collection(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.documents.delete_collection(&name, &caller).await?;
    state
        .audit
        .record(&caller, "collection.delete", Some(&name), json!({}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}
