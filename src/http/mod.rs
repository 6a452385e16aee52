//! The HTTP surface: one router built from per-resource modules, each handler annotated for
//! the OpenAPI document (utoipa-axum collects routes and their descriptions together, so a
//! route cannot be served without being described). Cross-cutting layers ([`layers`]):
//! request ids, request logs, CORS, limits on the request target and on the time a body may
//! take to arrive, the body size limit, the error envelope for every non-handler error,
//! metrics, and a 500 in the envelope for a handler that panics. [`server`] serves the result.

pub mod admin;
pub mod auth;
pub mod changes;
pub mod documents;
pub mod extract;
pub mod ops;
pub mod range;
pub mod realtime;
pub mod server;
pub mod storage;
pub mod tus;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, Any, CorsLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;

use crate::app::AppState;
use crate::config::Config;
use crate::error::{envelope, REQUEST_ID};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

#[derive(OpenApi)]
#[openapi(
    info(title = "basalt", description = "Self-hosted Backend-as-a-Service: auth, documents, realtime, storage, functions."),
    modifiers(&BearerAuth),
    tags(
        (name = "auth", description = "Accounts and sessions"),
        (name = "admin", description = "Administration (admin token or service key)"),
        (name = "documents", description = "The document database"),
        (name = "ops", description = "Health, readiness, metrics, keys"),
        (name = "realtime", description = "WebSocket subscriptions and channels (docs/realtime.md)"),
        (name = "storage", description = "Buckets and objects (docs/storage.md)"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT or service key")
                    .build(),
            ),
        );
    }
}

/// Every route with its OpenAPI description.
pub fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(ops::router())
        .nest("/v1/auth", auth::router())
        .nest(
            "/v1/admin",
            admin::router()
                .merge(documents::admin_router())
                .merge(storage::admin_router())
                .merge(changes::router()),
        )
        .nest("/v1/db", documents::router())
        .nest("/v1/storage", storage::router().merge(tus::router()))
        .merge(realtime::router())
}

/// The served router: all routes, `/v1/openapi.json`, and the middleware stack.
pub fn router(state: AppState) -> Router {
    let (router, openapi) = api().split_for_parts();
    let openapi = std::sync::Arc::new(openapi_paths(openapi));
    let router = router.route(
        "/v1/openapi.json",
        axum::routing::get(move || {
            let openapi = openapi.clone();
            async move { axum::Json(openapi.as_ref().clone()) }
        }),
    );
    let config = state.config.clone();
    let router = router
        .fallback(|| async { crate::error::ApiError::NotFound("no such route".into()) })
        .with_state(state);
    layers(router, &config)
}

/// The OpenAPI document as clients read it: a route's catch-all parameter (`{*path}`, an
/// object path with its slashes) is written as a plain parameter (`{path}`).
pub fn openapi_paths(mut openapi: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let paths = std::mem::take(&mut openapi.paths.paths);
    openapi.paths.paths = paths
        .into_iter()
        .map(|(path, item)| (path.replace("{*", "{"), item))
        .collect();
    openapi
}

/// The router of the dedicated metrics listener (`metrics.listen`): `/metrics` only.
pub fn metrics_router(state: AppState) -> Router {
    let config = state.config.clone();
    let router = Router::new()
        .route("/metrics", axum::routing::get(ops::metrics_on_own_listener))
        .fallback(|| async { crate::error::ApiError::NotFound("no such route".into()) })
        .with_state(state);
    layers(router, &config)
}

/// The middleware stack every listener's router is wrapped in. Public so that tests can
/// put routes the product does not have (a handler that panics) under the very same stack.
pub fn layers(router: Router, config: &Config) -> Router {
    let body_deadline = Duration::from_secs(config.http.body_read_timeout_secs);
    let upload_deadline = Duration::from_secs(config.storage.upload_timeout_secs);
    let max_uri_bytes = config.http.max_uri_bytes;
    let router = router
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(middleware::from_fn(telemetry_metrics))
        .layer(middleware::from_fn(normalize_errors))
        .layer(DefaultBodyLimit::max(config.http.body_limit))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            // Object uploads may be large: they get their own deadline.
            let deadline = if req.uri().path().starts_with("/v1/storage/") {
                upload_deadline
            } else {
                body_deadline
            };
            request_body_deadline(deadline, req, next)
        }))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            request_target_limit(max_uri_bytes, req, next)
        }));
    // tower-http's CORS layer answers every OPTIONS request as a preflight; an OPTIONS
    // without `Access-Control-Request-Method` is not one (tus discovery is such a request)
    // and goes to the routes.
    let with_cors = router.clone().layer(cors(config));
    let routes = router;
    Router::new()
        .fallback_service(tower::service_fn(move |req: Request| {
            let cors_applies = req.method() != Method::OPTIONS
                || req
                    .headers()
                    .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
            let service = if cors_applies {
                with_cors.clone()
            } else {
                routes.clone()
            };
            tower::ServiceExt::oneshot(service, req)
        }))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &Request| {
                let id = req
                    .headers()
                    .get(REQUEST_ID_HEADER)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
            }),
        )
        .layer(middleware::from_fn(request_id))
}

/// The answer to a handler that panicked. The panic itself is logged once, with its
/// message, place and request id, by the panic hook (`telemetry::init`); the client sees
/// only an opaque 500 and the connection stays usable.
fn panic_response(_panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    envelope(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
        None,
    )
}

/// The code and message of the envelope for the protocol-level errors: those answered here
/// and those hyper answers on its own (rewritten by [`server`]).
pub(crate) fn protocol_error(status: StatusCode) -> (&'static str, &'static str) {
    match status {
        StatusCode::URI_TOO_LONG => (
            "invalid_argument",
            "the request target is longer than the server accepts (http.max_uri_bytes)",
        ),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => (
            "invalid_argument",
            "the request headers are larger or more numerous than the server accepts (http.max_header_bytes, 100 headers)",
        ),
        StatusCode::REQUEST_TIMEOUT => (
            "request_timeout",
            "the request body did not arrive in time (http.body_read_timeout_secs)",
        ),
        _ => ("invalid_argument", "the request is not valid HTTP/1.1"),
    }
}

fn protocol_error_response(status: StatusCode) -> Response {
    let (code, message) = protocol_error(status);
    let mut response = envelope(status, code, message, None);
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// 414 in the envelope for a request target over `http.max_uri_bytes`. hyper's own limit
/// (64 KiB, answered without a body) sits far above it.
async fn request_target_limit(max_uri_bytes: usize, req: Request, next: Next) -> Response {
    let uri = req.uri();
    let length = uri.path_and_query().map_or(0, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    if length > max_uri_bytes {
        return protocol_error_response(StatusCode::URI_TOO_LONG);
    }
    next.run(req).await
}

/// Gives the whole request body one deadline from the moment its head arrived. A client
/// trickling a byte now and then keeps no connection past it: reading the body fails, and
/// the answer becomes 408 with `Connection: close`. (tower-http's body timeout restarts
/// with every chunk, so it stops a silent client but not a trickling one.)
async fn request_body_deadline(limit: Duration, req: Request, next: Next) -> Response {
    let timed_out = Arc::new(AtomicBool::new(false));
    let req = req.map(|body| {
        axum::body::Body::new(DeadlineBody {
            inner: body,
            deadline: Box::pin(tokio::time::sleep(limit)),
            timed_out: timed_out.clone(),
        })
    });
    let response = next.run(req).await;
    if timed_out.load(Ordering::Acquire) {
        tracing::info!("the request body did not arrive in time");
        return protocol_error_response(StatusCode::REQUEST_TIMEOUT);
    }
    response
}

struct DeadlineBody {
    inner: axum::body::Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timed_out: Arc<AtomicBool>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive in time")]
struct BodyDeadlinePassed;

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.timed_out.store(true, Ordering::Release);
            return Poll::Ready(Some(Err(axum::Error::new(BodyDeadlinePassed))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

async fn telemetry_metrics(req: Request, next: Next) -> Response {
    crate::telemetry::track_metrics(req, next).await
}

/// Gives every request an id (the client's `x-request-id` when it is sane, else a new one),
/// echoes it on the response and makes it available to error bodies.
async fn request_id(mut req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
        .unwrap_or_else(crate::ids::new_id);
    let header_value = HeaderValue::from_str(&id).expect("checked to be visible ASCII");
    req.headers_mut()
        .insert(REQUEST_ID_HEADER, header_value.clone());
    let mut response = REQUEST_ID.scope(id, next.run(req)).await;
    response
        .headers_mut()
        .insert(REQUEST_ID_HEADER, header_value);
    response
}

/// Rewrites error answers that did not come from our handlers (axum's 405, path and query
/// rejections, CORS refusals) into the JSON envelope, so clients parse one error shape.
async fn normalize_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 16 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let (code, default_message) = match status {
        StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => {
            ("invalid_argument", "the request is not valid")
        }
        StatusCode::UNAUTHORIZED => ("unauthenticated", "authentication is required"),
        StatusCode::FORBIDDEN => ("permission_denied", "permission denied"),
        StatusCode::NOT_FOUND => ("not_found", "not found"),
        StatusCode::METHOD_NOT_ALLOWED => (
            "invalid_argument",
            "this method is not allowed on this route",
        ),
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "the request body is larger than the limit",
        ),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ("unsupported_media_type", "unsupported content type")
        }
        StatusCode::TOO_MANY_REQUESTS => ("rate_limited", "too many requests"),
        StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "unavailable"),
        StatusCode::GATEWAY_TIMEOUT => ("function_timeout", "timed out"),
        s if s.is_server_error() => ("internal", "internal error"),
        _ => ("invalid_argument", "the request is not valid"),
    };
    // Rejection texts from axum are safe to show (they describe the request, not the server);
    // server errors never show theirs.
    let message = if status.is_server_error() || text.trim().is_empty() {
        default_message.to_string()
    } else {
        text.trim().to_string()
    };
    // 422 is what axum uses for a body that parses but does not fit; the contract says 400.
    let status = if status == StatusCode::UNPROCESSABLE_ENTITY {
        StatusCode::BAD_REQUEST
    } else {
        status
    };
    let mut rebuilt = envelope(status, code, &message, None);
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            rebuilt.headers_mut().insert(name.clone(), value.clone());
        }
    }
    rebuilt.into_response()
}

fn cors(config: &Config) -> CorsLayer {
    let origins = &config.http.cors_origins;
    let layer = CorsLayer::new()
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::HEAD,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::RANGE,
            header::IF_RANGE,
            REQUEST_ID_HEADER,
            // an object's own metadata on a raw upload
            HeaderName::from_static("x-basalt-metadata"),
            // tus (resumable uploads)
            tus::TUS_RESUMABLE,
            tus::UPLOAD_LENGTH,
            tus::UPLOAD_OFFSET,
            tus::UPLOAD_METADATA,
        ])
        .expose_headers([
            REQUEST_ID_HEADER,
            header::ETAG,
            header::RETRY_AFTER,
            // object downloads: ranges and file names
            header::CONTENT_RANGE,
            header::ACCEPT_RANGES,
            header::CONTENT_DISPOSITION,
            // tus: a browser client reads where its upload lives and how far it got.
            header::LOCATION,
            tus::TUS_RESUMABLE,
            tus::TUS_VERSION_HEADER,
            tus::TUS_EXTENSION,
            tus::TUS_MAX_SIZE,
            tus::UPLOAD_OFFSET,
            tus::UPLOAD_LENGTH,
            tus::UPLOAD_EXPIRES,
        ])
        .max_age(Duration::from_secs(3600));
    if origins.iter().any(|o| o == "*") {
        layer.allow_origin(Any)
    } else {
        let list: Vec<HeaderValue> = origins
            .iter()
            .filter_map(|o| HeaderValue::from_str(o).ok())
            .collect();
        layer.allow_origin(AllowOrigin::list(list))
    }
}
