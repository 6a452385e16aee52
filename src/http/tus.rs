//! `/v1/storage/{bucket}/_uploads`: resumable uploads by the tus 1.0.0 protocol (core,
//! creation, termination; <https://tus.io/protocols/resumable-upload>). The protocol's
//! headers are read and written here; what an upload is and how it becomes an object is
//! [`crate::storage::tus`]. Every answer carries `Tus-Resumable: 1.0.0`, and a request other
//! than `OPTIONS` without it answers 412.

use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, LOCATION};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::storage::{body_stream, declared_size, header_str, linger, Returning};
use crate::app::AppState;
use crate::error::{ApiError, ApiResult};
use crate::http::extract::Caller;
use crate::storage::tus::{self, TUS_EXTENSIONS, TUS_VERSION};
use crate::store::storage::UploadRow;

pub const TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
pub const TUS_VERSION_HEADER: HeaderName = HeaderName::from_static("tus-version");
pub const TUS_EXTENSION: HeaderName = HeaderName::from_static("tus-extension");
pub const TUS_MAX_SIZE: HeaderName = HeaderName::from_static("tus-max-size");
pub const UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
pub const UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
pub const UPLOAD_METADATA: HeaderName = HeaderName::from_static("upload-metadata");
pub const UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
pub const UPLOAD_DEFER_LENGTH: HeaderName = HeaderName::from_static("upload-defer-length");

/// The media type of a PATCH body.
const OFFSET_OCTET_STREAM: &str = "application/offset+octet-stream";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(tus_options, create_upload))
        .routes(routes!(upload_offset, append_chunk, terminate_upload))
        .layer(middleware::from_fn(tus_resumable))
        // Chunks stream into the backend, bounded by the upload's length.
        .layer(DefaultBodyLimit::disable())
}

/// `Tus-Resumable: 1.0.0` on every answer; 412 (with `Tus-Version`) for a tus request that
/// does not speak it, except `OPTIONS`, which is how a client finds out.
async fn tus_resumable(req: Request, next: Next) -> Response {
    // Methods tus does not use here (OPTIONS aside) are left to the router's 405.
    let tus_method = matches!(
        *req.method(),
        Method::POST | Method::HEAD | Method::PATCH | Method::DELETE
    );
    let speaks_tus = !tus_method
        || req
            .headers()
            .get(TUS_RESUMABLE)
            .is_some_and(|v| v.as_bytes() == TUS_VERSION.as_bytes());
    let mut response = if speaks_tus {
        next.run(req).await
    } else {
        let mut refused = ApiError::FailedPrecondition(format!(
            "this is a tus {TUS_VERSION} endpoint: send `Tus-Resumable: {TUS_VERSION}`"
        ))
        .into_response();
        refused
            .headers_mut()
            .insert(TUS_VERSION_HEADER, HeaderValue::from_static(TUS_VERSION));
        refused
    };
    response
        .headers_mut()
        .insert(TUS_RESUMABLE, HeaderValue::from_static(TUS_VERSION));
    response
}

/// tus discovery: the version, the extensions (`creation`, `termination`) and the largest
/// upload any bucket accepts (`storage.max_object_size`; a bucket may accept less).
#[utoipa::path(options, path = "/{bucket}/_uploads", tag = "storage",
    params(("bucket" = String, Path)),
    responses((status = 204, headers(("Tus-Version" = String), ("Tus-Extension" = String),
        ("Tus-Max-Size" = u64)))))]
async fn tus_options(State(state): State<AppState>, Path(_bucket): Path<String>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(TUS_VERSION_HEADER, HeaderValue::from_static(TUS_VERSION));
    headers.insert(TUS_EXTENSION, HeaderValue::from_static(TUS_EXTENSIONS));
    headers.insert(
        TUS_MAX_SIZE,
        HeaderValue::from(state.config.storage.max_object_size),
    );
    (StatusCode::NO_CONTENT, headers).into_response()
}

/// Create a resumable upload: `Upload-Length` (bytes) and `Upload-Metadata` (tus pairs
/// `key base64value`: `path` or `filename`, `content_type` or `filetype`, and `metadata`, a
/// JSON object). The bucket's `write` rule decides now (with that size, type and path) and
/// again at completion; larger than the bucket allows → 413. Answers 201 with `Location`.
#[utoipa::path(post, path = "/{bucket}/_uploads", tag = "storage",
    params(("bucket" = String, Path),
        ("Tus-Resumable" = String, Header, description = "1.0.0"),
        ("Upload-Length" = u64, Header),
        ("Upload-Metadata" = String, Header)),
    responses((status = 201, headers(("Location" = String), ("Upload-Expires" = String))),
        (status = 400), (status = 403), (status = 412), (status = 413), (status = 415)))]
async fn create_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    if headers.contains_key(UPLOAD_DEFER_LENGTH) {
        return Err(ApiError::invalid_with(
            "Upload-Defer-Length is not supported: send Upload-Length",
            json!({"header": "upload-defer-length"}),
        ));
    }
    let length = number_header(&headers, UPLOAD_LENGTH)?.ok_or_else(|| {
        ApiError::invalid_with(
            "send the upload's size as Upload-Length",
            json!({"header": "upload-length"}),
        )
    })?;
    let meta = tus::parse_metadata(header_str(&headers, UPLOAD_METADATA)?.as_deref())?;
    let row = state
        .storage
        .create_upload(&caller, &bucket, length, meta)
        .await?;
    let location = format!(
        "{}/v1/storage/{}/_uploads/{}",
        state.public_url, row.bucket, row.id
    );
    let mut answer = HeaderMap::new();
    answer.insert(LOCATION, header_value(&location)?);
    answer.insert(UPLOAD_EXPIRES, header_value(&http_date(row.expires_at))?);
    Ok((StatusCode::CREATED, answer).into_response())
}

/// Where an upload stands: `Upload-Offset` (bytes received), `Upload-Length`. Only its
/// creator (or an admin or service key) sees it; otherwise, and once it has expired or
/// completed, 404.
#[utoipa::path(head, path = "/{bucket}/_uploads/{id}", tag = "storage",
    params(("bucket" = String, Path), ("id" = String, Path),
        ("Tus-Resumable" = String, Header, description = "1.0.0")),
    responses((status = 200, headers(("Upload-Offset" = u64), ("Upload-Length" = u64))),
        (status = 404), (status = 412)))]
async fn upload_offset(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, id)): Path<(String, String)>,
) -> ApiResult<Response> {
    let row = state.storage.upload(&caller, &bucket, &id).await?;
    let mut headers = upload_headers(&row)?;
    headers.insert(UPLOAD_LENGTH, HeaderValue::from(row.length));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok((StatusCode::OK, headers).into_response())
}

/// Send the bytes from `Upload-Offset` on (`Content-Type: application/offset+octet-stream`;
/// 415 otherwise). The offset must be the upload's (409 otherwise). A chunk counts whole or
/// not at all: after an interrupted PATCH, ask the offset (HEAD) and send from there. The
/// PATCH that brings the last byte commits the object (the `write` rule asked again) before
/// it is answered.
#[utoipa::path(patch, path = "/{bucket}/_uploads/{id}", tag = "storage",
    params(("bucket" = String, Path), ("id" = String, Path),
        ("Tus-Resumable" = String, Header, description = "1.0.0"),
        ("Upload-Offset" = u64, Header)),
    request_body(content = Vec<u8>, content_type = "application/offset+octet-stream"),
    responses((status = 204, headers(("Upload-Offset" = u64))), (status = 403), (status = 404),
        (status = 409), (status = 412), (status = 413), (status = 415)))]
async fn append_chunk(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let leftover = Arc::new(Mutex::new(None));
    let chunk = async {
        let content_type = header_str(&headers, CONTENT_TYPE)?.unwrap_or_default();
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !essence.eq_ignore_ascii_case(OFFSET_OCTET_STREAM) {
            return Err(ApiError::UnsupportedMediaType(format!(
                "a PATCH's Content-Type is {OFFSET_OCTET_STREAM}"
            )));
        }
        let offset = number_header(&headers, UPLOAD_OFFSET)?.ok_or_else(|| {
            ApiError::invalid_with(
                "send the chunk's place as Upload-Offset",
                json!({"header": "upload-offset"}),
            )
        })?;
        let body = Returning {
            inner: Some(body_stream(body)),
            slot: leftover.clone(),
        }
        .boxed();
        state
            .storage
            .upload_chunk(
                &caller,
                &bucket,
                &id,
                offset,
                declared_size(&headers)?,
                body,
            )
            .await
    }
    .await;
    match chunk {
        Ok(chunk) => {
            let mut answer = HeaderMap::new();
            answer.insert(UPLOAD_OFFSET, HeaderValue::from(chunk.offset));
            if let Some(object) = chunk.object {
                answer.insert(axum::http::header::ETAG, header_value(&object.etag)?);
            }
            Ok((StatusCode::NO_CONTENT, answer).into_response())
        }
        Err(err) => {
            // A refused chunk is still on its way: read on a little so the client sees the
            // answer (409, 413…) rather than a reset connection.
            let rest = leftover.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(rest) = rest {
                linger(rest).await;
            }
            Err(err)
        }
    }
}

/// Terminate an upload (tus termination): it and its bytes are gone.
#[utoipa::path(delete, path = "/{bucket}/_uploads/{id}", tag = "storage",
    params(("bucket" = String, Path), ("id" = String, Path),
        ("Tus-Resumable" = String, Header, description = "1.0.0")),
    responses((status = 204), (status = 404), (status = 412)))]
async fn terminate_upload(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, id)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    state
        .storage
        .terminate_upload(&caller, &bucket, &id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn upload_headers(row: &UploadRow) -> ApiResult<HeaderMap> {
    let mut headers = HeaderMap::new();
    headers.insert(UPLOAD_OFFSET, HeaderValue::from(row.offset));
    headers.insert(UPLOAD_EXPIRES, header_value(&http_date(row.expires_at))?);
    Ok(headers)
}

/// A non-negative integer header (`Upload-Length`, `Upload-Offset`).
fn number_header(headers: &HeaderMap, name: HeaderName) -> ApiResult<Option<u64>> {
    headers
        .get(&name)
        .map(|v| {
            v.to_str()
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::invalid_with(
                        format!("{name} must be a non-negative integer"),
                        json!({"header": name.as_str()}),
                    )
                })
        })
        .transpose()
}

fn header_value(s: &str) -> ApiResult<HeaderValue> {
    HeaderValue::from_str(s).map_err(ApiError::internal)
}

/// RFC 9110's date format, as `Upload-Expires` uses it.
fn http_date(t: DateTime<Utc>) -> String {
    t.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
}
