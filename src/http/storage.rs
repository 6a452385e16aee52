//! `/v1/storage`: object upload, download (ranges, ETags, downloads by name), delete,
//! listing and signed URLs (API.md § Storage), and the buckets admin API under
//! `/v1/admin/buckets`. Bodies stream both ways: an upload goes to the backend as it
//! arrives, a download is read from it as the client takes it.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::header::{
    ACCEPT_RANGES, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_SECURITY_POLICY, CONTENT_TYPE, ETAG, IF_NONE_MATCH, IF_RANGE, LAST_MODIFIED, RANGE,
    X_CONTENT_TYPE_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;
use crate::error::{envelope, ApiError, ApiResult};
use crate::http::extract::{AdminCaller, Caller, Json};
use crate::http::range::{self, RangePlan};
use crate::storage::transform::{Transform, TransformQuery};
use crate::storage::{
    Access, BucketSpec, BucketView, ByteStream, Listing, ObjectView, Upload, MAX_METADATA_BYTES,
};
use crate::store::storage::ObjectRow;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_objects, upload_form))
        .routes(routes!(sign_url))
        .routes(routes!(get_object, put_object, delete_object))
        // Object bodies are not held by the JSON body limit: they stream, bounded by the
        // bucket's max_object_size.
        .layer(DefaultBodyLimit::disable())
}

pub fn admin_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list_buckets))
        .routes(routes!(put_bucket, get_bucket, delete_bucket))
}

// ------------------------------------------------------------------------- buckets (admin)

/// List buckets.
#[utoipa::path(get, path = "/buckets", tag = "admin", responses((status = 200, body = Object)))]
async fn list_buckets(
    State(state): State<AppState>,
    _admin: AdminCaller,
) -> ApiResult<axum::Json<Value>> {
    let buckets = state.storage.list_buckets().await?;
    Ok(axum::Json(json!({ "buckets": buckets })))
}

/// Create or replace a bucket: `public`, `max_object_size`, `allowed_content_types`
/// (`image/*` wildcards) and the CEL rules `read`, `write`, `delete`. A rule that does not
/// compile is refused with its line and column.
#[utoipa::path(put, path = "/buckets/{name}", tag = "admin", params(("name" = String, Path)),
    request_body = BucketSpec, responses((status = 200, body = BucketView), (status = 400)))]
async fn put_bucket(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(name): Path<String>,
    Json(spec): Json<BucketSpec>,
) -> ApiResult<axum::Json<BucketView>> {
    let view = state.storage.put_bucket(&name, spec).await?;
    state
        .audit
        .record(&caller, "bucket.put", Some(&name), json!(view))
        .await;
    Ok(axum::Json(view))
}

/// One bucket.
#[utoipa::path(get, path = "/buckets/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 200, body = BucketView), (status = 404)))]
async fn get_bucket(
    State(state): State<AppState>,
    _admin: AdminCaller,
    Path(name): Path<String>,
) -> ApiResult<axum::Json<BucketView>> {
    Ok(axum::Json(state.storage.bucket(&name).await?.view()))
}

/// Delete a bucket and all its objects.
#[utoipa::path(delete, path = "/buckets/{name}", tag = "admin", params(("name" = String, Path)),
    responses((status = 204), (status = 404)))]
async fn delete_bucket(
    State(state): State<AppState>,
    AdminCaller(caller): AdminCaller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    state.storage.delete_bucket(&name, &caller).await?;
    state
        .audit
        .record(&caller, "bucket.delete", Some(&name), json!({}))
        .await;
    Ok(StatusCode::NO_CONTENT)
}

// ------------------------------------------------------------------------- objects

/// How an object request is authorised: the caller's credential, or a signed URL's
/// `expires` + `signature` (then no credential is needed, and one that is sent is ignored).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ObjectQuery {
    /// Answer with `Content-Disposition: attachment` under this file name (empty: the
    /// path's last segment).
    download: Option<String>,
    /// A signed URL's expiry (Unix seconds).
    expires: Option<i64>,
    /// A signed URL's signature.
    signature: Option<String>,
    /// Image transform (GET): the largest width in pixels.
    width: Option<String>,
    /// Image transform (GET): the largest height in pixels.
    height: Option<String>,
    /// Image transform (GET), with both width and height: `contain` (default, the whole
    /// image inside the box) or `cover` (the box filled, centre-cropped).
    fit: Option<String>,
    /// Image transform (GET): `png`, `jpeg` or `webp` (default: the original's, else png).
    format: Option<String>,
}

/// The access an object request has: a valid signed URL for this method, or the caller.
async fn access(
    state: &AppState,
    caller: Caller,
    method: &str,
    bucket: &str,
    path: &str,
    q: &ObjectQuery,
) -> ApiResult<Access> {
    match (&q.expires, &q.signature) {
        (None, None) => Ok(Access::Caller(caller)),
        (Some(expires), Some(signature)) => {
            state
                .storage
                .verify_signature(method, bucket, path, *expires, signature)?;
            Ok(Access::Signed)
        }
        _ => Err(ApiError::PermissionDenied(
            "a signed URL needs both expires and signature".into(),
        )),
    }
}

/// Upload the raw body as the object at `path` (`Content-Type` is kept; `x-basalt-metadata`
/// may carry a JSON object of your own). Replaces what is there; the bucket's `write` rule
/// and limits decide, the size limit while the body streams (413, nothing stored).
#[utoipa::path(put, path = "/{bucket}/{*path}", tag = "storage",
    params(("bucket" = String, Path), ("path" = String, Path), ObjectQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = ObjectView), (status = 403), (status = 413), (status = 415)))]
async fn put_object(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, path)): Path<(String, String)>,
    Query(q): Query<ObjectQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, axum::Json<ObjectView>)> {
    let access = access(&state, caller, "PUT", &bucket, &path, &q).await?;
    let metadata = match headers.get("x-basalt-metadata") {
        None => Value::Null,
        Some(v) => serde_json::from_slice(v.as_bytes()).map_err(|_| {
            ApiError::invalid_with(
                "x-basalt-metadata must be a JSON object",
                json!({"header": "x-basalt-metadata"}),
            )
        })?,
    };
    let leftover = Arc::new(Mutex::new(None));
    let upload = Upload {
        bucket,
        path,
        content_type: header_str(&headers, CONTENT_TYPE)?,
        declared_size: declared_size(&headers)?,
        metadata,
        body: Returning {
            inner: Some(body_stream(body)),
            slot: leftover.clone(),
        }
        .boxed(),
    };
    match state.storage.put(&access, upload).await {
        Ok(object) => Ok((StatusCode::CREATED, axum::Json(object))),
        Err(err) => {
            let rest = leftover.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(rest) = rest {
                linger(rest).await;
            }
            Err(err)
        }
    }
}

/// How much of a refused upload's body is still read (and thrown away) before the answer
/// goes out, and for how long. A client that is still sending when the server answers and
/// closes would otherwise often see a reset instead of the 413 or 403 (as nginx's
/// "lingering close"); a client sending more than this gets the reset.
const LINGER_BYTES: usize = 8 * 1024 * 1024;
const LINGER_TIME: std::time::Duration = std::time::Duration::from_secs(2);

pub(super) async fn linger(mut rest: ByteStream) {
    let drain = async {
        let mut seen = 0;
        while let Some(Ok(chunk)) = rest.next().await {
            seen += chunk.len();
            if seen > LINGER_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// A request body handed to an upload; what the upload leaves unread comes back through
/// `slot` when it is dropped, for [`linger`].
pub(super) struct Returning {
    pub(super) inner: Option<ByteStream>,
    pub(super) slot: Arc<Mutex<Option<ByteStream>>>,
}

impl futures::Stream for Returning {
    type Item = Result<bytes::Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        match self.inner.as_mut() {
            Some(inner) => inner.as_mut().poll_next(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        if let Some(inner) = self.inner.take() {
            *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(inner);
        }
    }
}

/// Upload with `multipart/form-data`: a `path` field, then a `file` field (its own
/// `Content-Type` is kept; without a `path` field before it, the file's name is the path),
/// and optionally a `metadata` field (a JSON object) before `file`.
#[utoipa::path(post, path = "/{bucket}", tag = "storage", params(("bucket" = String, Path)),
    request_body(content = Object, content_type = "multipart/form-data"),
    responses((status = 201, body = ObjectView), (status = 400), (status = 403), (status = 413)))]
async fn upload_form(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
    mut form: Multipart,
) -> ApiResult<(StatusCode, axum::Json<ObjectView>)> {
    let result = read_form(&state, caller, bucket, &mut form).await;
    if result.is_err() {
        // Read on a little, as `linger` does, so the client sees the answer.
        let drain = async {
            let mut seen = 0;
            while let Ok(Some(mut field)) = form.next_field().await {
                while let Ok(Some(c)) = field.chunk().await {
                    seen += c.len();
                    if seen > LINGER_BYTES {
                        return;
                    }
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    }
    result
}

async fn read_form(
    state: &AppState,
    caller: Caller,
    bucket: String,
    form: &mut Multipart,
) -> ApiResult<(StatusCode, axum::Json<ObjectView>)> {
    let access = Access::Caller(caller);
    let mut path: Option<String> = None;
    let mut metadata = Value::Null;
    let bad = |m: &str| ApiError::invalid_with(m.to_string(), json!({"field": "file"}));
    loop {
        let field = form
            .next_field()
            .await
            .map_err(|e| ApiError::invalid(format!("the form could not be read: {e}")))?;
        let Some(field) = field else {
            return Err(bad("the form has no `file` field"));
        };
        match field.name() {
            Some("path") => path = Some(small_field(field, "path", 4096).await?),
            Some("metadata") => {
                let text = small_field(field, "metadata", MAX_METADATA_BYTES).await?;
                metadata = serde_json::from_str(&text).map_err(|_| {
                    ApiError::invalid_with(
                        "metadata must be a JSON object",
                        json!({"field": "metadata"}),
                    )
                })?;
            }
            Some("file") => {
                let path = path
                    .take()
                    .or_else(|| field.file_name().map(str::to_string))
                    .ok_or_else(|| bad("send a `path` field before `file`"))?;
                let content_type = field.content_type().map(str::to_string);
                // The field borrows the form, so it is forwarded to the upload through a
                // small channel: memory stays at a few chunks whatever the file's size.
                let (tx, rx) =
                    tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
                let forward = async move {
                    let mut field = field;
                    loop {
                        let chunk = match field.chunk().await {
                            Ok(Some(c)) => Ok(c),
                            Ok(None) => break,
                            Err(e) => Err(std::io::Error::other(e.to_string())),
                        };
                        if chunk.is_err() {
                            // Handed on so the upload fails rather than ending short.
                            let _ = tx.send(chunk).await;
                            break;
                        }
                        if tx.send(chunk).await.is_err() {
                            // The upload stopped early (refused); the caller reads on.
                            break;
                        }
                    }
                };
                let upload = Upload {
                    bucket,
                    path,
                    content_type,
                    declared_size: None,
                    metadata,
                    body: tokio_stream_from(rx),
                };
                let ((), stored) = tokio::join!(forward, state.storage.put(&access, upload));
                return Ok((StatusCode::CREATED, axum::Json(stored?)));
            }
            _ => {
                return Err(ApiError::invalid(
                    "unknown form field; the fields are path, metadata and file",
                ))
            }
        }
    }
}

/// A form field other than the file, read whole but refused past `max` bytes (a field is
/// otherwise unbounded: the body limit does not apply to upload routes).
async fn small_field(
    mut field: axum::extract::multipart::Field<'_>,
    name: &str,
    max: usize,
) -> ApiResult<String> {
    let mut buf = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|_| ApiError::invalid(format!("the `{name}` field could not be read")))?
    {
        if buf.len() + chunk.len() > max {
            return Err(ApiError::invalid_with(
                format!("the `{name}` field is longer than {max} bytes"),
                json!({"field": name}),
            ));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| {
        ApiError::invalid_with(
            format!("the `{name}` field is not UTF-8"),
            json!({"field": name}),
        )
    })
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<bytes::Bytes, std::io::Error>>,
) -> ByteStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Download an object (`HEAD`: its headers only). `Range` → 206 (several ranges:
/// `multipart/byteranges`; none inside the object: 416); `If-None-Match` with its ETag →
/// 304; `?download=name` → `Content-Disposition: attachment`. `?width=&height=&fit=&format=`
/// answers a resized or converted image (PNG, JPEG, WebP originals; 415 for others).
#[utoipa::path(get, path = "/{bucket}/{*path}", tag = "storage",
    params(("bucket" = String, Path), ("path" = String, Path), ObjectQuery),
    responses((status = 200, content_type = "application/octet-stream"), (status = 206), (status = 304),
        (status = 400), (status = 403), (status = 404), (status = 413), (status = 415), (status = 416)))]
async fn get_object(
    State(state): State<AppState>,
    caller: Caller,
    method: Method,
    Path((bucket, path)): Path<(String, String)>,
    Query(q): Query<ObjectQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    // A HEAD is authorised as the GET it describes.
    let access = access(&state, caller, "GET", &bucket, &path, &q).await?;
    let object = state.storage.object(&access, &bucket, &path).await?;
    let mut common = object_headers(&object);
    if let Some(name) = &q.download {
        let name = if name.is_empty() {
            object.path.rsplit('/').next().unwrap_or(&object.path)
        } else {
            name
        };
        common.insert(CONTENT_DISPOSITION, attachment(name));
    }
    let transform = TransformQuery {
        width: q.width.as_deref(),
        height: q.height.as_deref(),
        fit: q.fit.as_deref(),
        format: q.format.as_deref(),
    };
    if let Some(t) = Transform::parse(&transform, state.config.storage.transform.max_dimension)? {
        return transformed_object(&state, &object, &t, common, &headers, method).await;
    }
    if let Some(inm) = headers.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        if etag_matches(inm, &object.etag) {
            return Ok((StatusCode::NOT_MODIFIED, common).into_response());
        }
    }
    let size = object.size.max(0) as u64;
    let range_header = headers
        .get(RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| if_range_holds(&headers, &object));
    let head = method == Method::HEAD;
    match range::plan(range_header, size) {
        RangePlan::Full => {
            common.insert(CONTENT_TYPE, header_value(&object.content_type));
            common.insert(CONTENT_LENGTH, HeaderValue::from(size));
            let body = if head {
                Body::empty()
            } else {
                Body::from_stream(state.storage.read(&object, None).await?)
            };
            Ok((StatusCode::OK, common, body).into_response())
        }
        RangePlan::Unsatisfiable => {
            let mut response = envelope(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "invalid_argument",
                "no requested range is inside the object",
                Some(&json!({"size": size})),
            );
            response.headers_mut().extend(common);
            response
                .headers_mut()
                .insert(CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            Ok(response)
        }
        RangePlan::Partial(ranges) if ranges.len() == 1 => {
            let r = ranges[0].clone();
            common.insert(CONTENT_TYPE, header_value(&object.content_type));
            common.insert(CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            common.insert(
                CONTENT_RANGE,
                header_value(&format!("bytes {}-{}/{size}", r.start, r.end - 1)),
            );
            let body = if head {
                Body::empty()
            } else {
                Body::from_stream(state.storage.read(&object, Some(r)).await?)
            };
            Ok((StatusCode::PARTIAL_CONTENT, common, body).into_response())
        }
        RangePlan::Partial(ranges) => {
            let boundary = crate::ids::new_id();
            let heads: Vec<String> = ranges
                .iter()
                .map(|r| {
                    format!(
                        "\r\n--{boundary}\r\nContent-Type: {}\r\nContent-Range: bytes {}-{}/{size}\r\n\r\n",
                        object.content_type,
                        r.start,
                        r.end - 1
                    )
                })
                .collect();
            let tail = format!("\r\n--{boundary}--\r\n");
            let length: u64 = heads.iter().map(|h| h.len() as u64).sum::<u64>()
                + ranges.iter().map(|r| r.end - r.start).sum::<u64>()
                + tail.len() as u64;
            common.insert(
                CONTENT_TYPE,
                header_value(&format!("multipart/byteranges; boundary={boundary}")),
            );
            common.insert(CONTENT_LENGTH, HeaderValue::from(length));
            if head {
                return Ok((StatusCode::PARTIAL_CONTENT, common, Body::empty()).into_response());
            }
            let storage = state.storage.clone();
            let parts = futures::stream::iter(heads.into_iter().zip(ranges))
                .then(move |(head, r)| {
                    let storage = storage.clone();
                    let object = object.clone();
                    async move {
                        let bytes = storage
                            .read(&object, Some(r))
                            .await
                            .map_err(|e| std::io::Error::other(e.to_string()))?;
                        Ok::<_, std::io::Error>(
                            futures::stream::once(async move { Ok(bytes::Bytes::from(head)) })
                                .chain(bytes),
                        )
                    }
                })
                .try_flatten()
                .chain(futures::stream::once(async move {
                    Ok(bytes::Bytes::from(tail))
                }));
            Ok((
                StatusCode::PARTIAL_CONTENT,
                common,
                Body::from_stream(parts),
            )
                .into_response())
        }
    }
}

/// A transformed image (`?width=&height=&fit=&format=`): its own ETag (`If-None-Match` →
/// 304 before any work), no ranges (a `Range` is ignored: 200), and for `HEAD` the headers
/// without making the image.
async fn transformed_object(
    state: &AppState,
    object: &ObjectRow,
    transform: &Transform,
    mut common: HeaderMap,
    headers: &HeaderMap,
    method: Method,
) -> ApiResult<Response> {
    let etag = transform.etag(object);
    common.insert(ETAG, header_value(&etag));
    common.insert(ACCEPT_RANGES, HeaderValue::from_static("none"));
    if let Some(inm) = headers.get(IF_NONE_MATCH).and_then(|v| v.to_str().ok()) {
        if etag_matches(inm, &etag) {
            return Ok((StatusCode::NOT_MODIFIED, common).into_response());
        }
    }
    common.insert(
        CONTENT_TYPE,
        HeaderValue::from_static(transform.output_format(object).content_type()),
    );
    if method == Method::HEAD {
        return Ok((StatusCode::OK, common).into_response());
    }
    let body = state.storage.transformed(object, transform).await?;
    Ok((StatusCode::OK, common, Body::from_stream(body)).into_response())
}

/// Delete an object. The bucket's `delete` rule decides (403 whether or not it exists).
#[utoipa::path(delete, path = "/{bucket}/{*path}", tag = "storage",
    params(("bucket" = String, Path), ("path" = String, Path)),
    responses((status = 204), (status = 403), (status = 404)))]
async fn delete_object(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, path)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state
        .storage
        .delete(&Access::Caller(caller), &bucket, &path)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only paths starting with this.
    prefix: Option<String>,
    /// `/`: fold deeper paths into `prefixes` (folders).
    delimiter: Option<String>,
    /// 1–1000, default 100.
    limit: Option<u32>,
    /// `next_cursor` of the previous page.
    cursor: Option<String>,
}

/// List objects (and, with `delimiter=/`, folders) in path order. With a `read` rule, only
/// what the caller may read is listed.
#[utoipa::path(get, path = "/{bucket}", tag = "storage", params(("bucket" = String, Path), ListQuery),
    responses((status = 200, body = Listing), (status = 403), (status = 404)))]
async fn list_objects(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
    Query(q): Query<ListQuery>,
) -> ApiResult<axum::Json<Listing>> {
    let listing = state
        .storage
        .list(
            &caller,
            &bucket,
            q.prefix.as_deref().unwrap_or(""),
            q.delimiter.as_deref(),
            q.limit,
            q.cursor.as_deref(),
        )
        .await?;
    Ok(axum::Json(listing))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignRequest {
    path: String,
    /// Seconds, at most `storage.max_signed_url_secs` (7 days by default).
    expires_in: u64,
    /// `GET` (default) or `PUT`.
    #[serde(default)]
    method: Option<String>,
}

/// A URL that lets anyone holding it download (`GET`) or upload (`PUT`) one object until it
/// expires, without a token. Signing needs the caller's own `read` (or `write`) permission.
#[utoipa::path(post, path = "/{bucket}/_sign", tag = "storage", params(("bucket" = String, Path)),
    request_body = SignRequest, responses((status = 200, body = Object), (status = 403)))]
async fn sign_url(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
    Json(req): Json<SignRequest>,
) -> ApiResult<axum::Json<Value>> {
    let method = req.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    let (signature, expires) = state
        .storage
        .sign(&caller, &bucket, &req.path, req.expires_in, &method)
        .await?;
    let encoded: Vec<String> = req.path.split('/').map(percent_encode_segment).collect();
    let url = format!(
        "{}/v1/storage/{bucket}/{}?expires={expires}&signature={signature}",
        state.public_url,
        encoded.join("/")
    );
    let expires_at = chrono::DateTime::from_timestamp(expires, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
    Ok(axum::Json(
        json!({"url": url, "method": method, "expires_at": expires_at}),
    ))
}

// ------------------------------------------------------------------------- helpers

pub(super) fn body_stream(body: Body) -> ByteStream {
    body.into_data_stream()
        .map_err(std::io::Error::other)
        .boxed()
}

pub(super) fn header_str(
    headers: &HeaderMap,
    name: axum::http::HeaderName,
) -> ApiResult<Option<String>> {
    headers
        .get(&name)
        .map(|v| {
            v.to_str().map(str::to_string).map_err(|_| {
                ApiError::invalid_with(
                    format!("{name} is not valid text"),
                    json!({"header": name.as_str()}),
                )
            })
        })
        .transpose()
}

pub(super) fn declared_size(headers: &HeaderMap) -> ApiResult<Option<u64>> {
    headers
        .get(CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Content-Length is not a number"))
        })
        .transpose()
}

fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s)
        .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"))
}

/// Headers every object answer carries. Stored content is served so that a browser never
/// runs it as part of this origin: no sniffing, and a sandboxing CSP (an uploaded HTML or
/// SVG file cannot reach the app's tokens).
fn object_headers(object: &ObjectRow) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(ETAG, header_value(&object.etag));
    h.insert(
        LAST_MODIFIED,
        header_value(
            &object
                .updated_at
                .format("%a, %d %b %Y %H:%M:%S GMT")
                .to_string(),
        ),
    );
    h.insert(ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    h
}

/// `If-None-Match`: `*` or a list of (possibly weak) ETags, compared weakly.
fn etag_matches(header: &str, etag: &str) -> bool {
    let etag = etag.trim_start_matches("W/");
    header
        .split(',')
        .map(str::trim)
        .any(|candidate| candidate == "*" || candidate.trim_start_matches("W/") == etag)
}

/// `If-Range`: the range applies only if the object is still the one the client has (a
/// strong ETag compare; a date is compared with `Last-Modified`).
fn if_range_holds(headers: &HeaderMap, object: &ObjectRow) -> bool {
    let Some(v) = headers.get(IF_RANGE).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let v = v.trim();
    if v.starts_with('"') {
        return v == object.etag;
    }
    v == object
        .updated_at
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string()
}

/// `attachment; filename="…"; filename*=UTF-8''…` with an ASCII fallback.
fn attachment(name: &str) -> HeaderValue {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    header_value(&format!(
        "attachment; filename=\"{fallback}\"; filename*=UTF-8''{}",
        percent_encode_segment(name)
    ))
}

/// Percent-encodes everything but RFC 3986 unreserved characters.
fn percent_encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags_and_names() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches("W/\"a\", \"b\"", "\"a\""));
        assert!(etag_matches("*", "\"a\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
        assert_eq!(
            attachment("ré sumé\".pdf").to_str().unwrap(),
            "attachment; filename=\"r_ sum__.pdf\"; filename*=UTF-8''r%C3%A9%20sum%C3%A9%22.pdf"
        );
    }
}
