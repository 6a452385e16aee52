//! Storage (API.md § Storage): buckets, uploads and downloads, ranges and ETags, rules,
//! listing, signed URLs, limits enforced while streaming, hostile paths, events.

use reqwest::Method;
use serde_json::{json, Value};

use basalt::config::{Config, S3Config, Secret, StorageBackend};

use crate::helpers::{Backend, Reply, TestApp};

/// Where a storage test keeps its metadata and its bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Setup {
    pub(crate) db: Backend,
    pub(crate) s3: bool,
}

/// Declares each listed `async fn name(setup: Setup)` as three tests: `sqlite::name` and
/// `postgres::name` on local disk, and `s3::name` on a real S3 (SeaweedFS; see
/// `s3_support`) with PostgreSQL when it is there (the multi-node deployment), else SQLite.
#[macro_export]
macro_rules! storage_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Setup { db: $crate::helpers::Backend::Sqlite, s3: false }).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if !$crate::helpers::postgres_available() {
                        return;
                    }
                    super::$name(super::Setup { db: $crate::helpers::Backend::Postgres, s3: false }).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::s3_support::test_s3().is_none() {
                        return;
                    }
                    let db = if $crate::helpers::postgres_url().is_some() {
                        $crate::helpers::Backend::Postgres
                    } else {
                        $crate::helpers::Backend::Sqlite
                    };
                    super::$name(super::Setup { db, s3: true }).await
                }
            )*
        }
    };
}

/// Points `config` at the test S3, under a prefix of its own.
pub(crate) fn use_s3(config: &mut Config) {
    let s3 = crate::s3_support::test_s3().expect("S3 for the test");
    config.storage.backend = StorageBackend::S3;
    config.storage.s3 = S3Config {
        endpoint: Some(s3.endpoint.clone()),
        region: Some(s3.region.clone()),
        bucket: Some(s3.bucket.clone()),
        access_key_id: Some(s3.access_key_id.clone()),
        secret_access_key: Some(Secret::new(s3.secret_access_key.clone())),
        force_path_style: true,
        prefix: Some(s3.unique_prefix("api")),
    };
}

pub(crate) async fn spawn_with(setup: Setup, adjust: impl FnOnce(&mut Config)) -> TestApp {
    crate::helpers::spawn_app_with(setup.db, |c| {
        if setup.s3 {
            use_s3(c);
        }
        adjust(c)
    })
    .await
}

pub(crate) async fn spawn(setup: Setup) -> TestApp {
    spawn_with(setup, |_| {}).await
}

storage_tests!(
    buckets_are_managed_by_admins_and_validated,
    an_object_round_trips_with_its_headers,
    ranges_follow_rfc_9110,
    conditional_and_download_headers,
    rules_decide_before_anything_is_told,
    public_buckets_are_readable_by_anyone,
    size_limits_hold_while_streaming,
    content_types_are_checked,
    hostile_paths_are_refused,
    listing_folds_folders_and_pages_with_sealed_cursors,
    listing_hides_what_the_read_rule_hides,
    writes_and_deletes_reach_the_change_stream,
    signed_urls_work_until_they_expire,
    multipart_form_uploads,
    concurrent_uploads_to_one_path_leave_one_whole_object,
    replaced_bytes_are_swept_after_their_grace,
);

/// PUT the raw `body` with `content_type` (and `token`); answers the reply.
pub(crate) async fn put_bytes(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> Reply {
    let mut req = app
        .client
        .put(app.url(path))
        .header("content-type", content_type)
        .body(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    TestApp::reply(req.send().await.unwrap()).await
}

/// GET with extra headers; answers status, headers and the raw bytes.
pub(crate) async fn get_bytes(
    app: &TestApp,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Vec<u8>) {
    let mut req = app.client.get(app.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap().to_vec())
}

async fn make_bucket(app: &TestApp, admin: &str, name: &str, spec: Value) {
    app.send(
        Method::PUT,
        &format!("/v1/admin/buckets/{name}"),
        Some(admin),
        Some(spec),
    )
    .await
    .assert_ok();
}

/// The change-stream events of `bucket`, once there are `want` of them (on PostgreSQL an
/// event is listed once the node's tailer has seen it).
async fn storage_events(app: &TestApp, admin: &str, bucket: &str, want: usize) -> Vec<Value> {
    for _ in 0..200 {
        let page = app
            .get(
                &format!("/v1/admin/changes?topic=storage/{bucket}&limit=1000"),
                Some(admin),
            )
            .await;
        let events = page.assert_ok()["changes"].as_array().unwrap().clone();
        if events.len() >= want {
            return events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("fewer than {want} events on storage/{bucket}");
}

fn etag_of(bytes: &[u8]) -> String {
    use sha2::Digest;
    format!("\"{}\"", &hex::encode(sha2::Sha256::digest(bytes))[..32])
}

async fn buckets_are_managed_by_admins_and_validated(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    let (_, user, _) = app.user("b@example.com").await;
    let put = |token: String, name: &'static str, body: Value| {
        let app = &app;
        async move {
            app.send(
                Method::PUT,
                &format!("/v1/admin/buckets/{name}"),
                Some(&token),
                Some(body),
            )
            .await
        }
    };
    let made = put(
        admin.clone(),
        "avatars",
        json!({"public": true, "max_object_size": 1000, "allowed_content_types": ["Image/*"],
               "rules": {"write": "auth != null"}}),
    )
    .await;
    let b = made.assert_ok();
    assert_eq!(b["name"], "avatars");
    assert_eq!(b["public"], true);
    assert_eq!(b["max_object_size"], 1000);
    assert_eq!(b["allowed_content_types"], json!(["image/*"]));
    assert_eq!(b["rules"], json!({"write": "auth != null"}));
    let got = app.get("/v1/admin/buckets/avatars", Some(&admin)).await;
    assert_eq!(got.assert_ok()["created_at"], b["created_at"]);
    let list = app.get("/v1/admin/buckets", Some(&admin)).await;
    assert_eq!(list.assert_ok()["buckets"].as_array().unwrap().len(), 1);

    // Users may not manage buckets.
    put(user.clone(), "mine", json!({}))
        .await
        .assert_error(403, "permission_denied");
    // Bad input.
    let msg = put(
        admin.clone(),
        "x",
        json!({"rules": {"read": "auth.uid =="}}),
    )
    .await
    .assert_error(400, "invalid_argument");
    assert!(msg.contains("read rule"), "{msg}");
    put(admin.clone(), "x", json!({"rules": {"list": "true"}}))
        .await
        .assert_error(400, "invalid_argument");
    put(
        admin.clone(),
        "x",
        json!({"allowed_content_types": ["png"]}),
    )
    .await
    .assert_error(400, "invalid_argument");
    put(admin.clone(), "x", json!({"max_object_size": 0}))
        .await
        .assert_error(400, "invalid_argument");
    put(admin.clone(), "x", json!({"max_object_size": u64::MAX}))
        .await
        .assert_error(400, "invalid_argument");
    put(admin.clone(), "x", json!({"public": "yes"}))
        .await
        .assert_error(400, "invalid_argument");
    put(admin.clone(), "Bad_Name", json!({}))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/admin/buckets/nope", Some(&admin))
        .await
        .assert_error(404, "not_found");

    app.delete("/v1/admin/buckets/avatars", Some(&admin)).await;
    app.get("/v1/admin/buckets/avatars", Some(&admin))
        .await
        .assert_error(404, "not_found");
    app.delete("/v1/admin/buckets/avatars", Some(&admin))
        .await
        .assert_error(404, "not_found");
    app.stop().await;
}

async fn an_object_round_trips_with_its_headers(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let body = b"hello, storage".to_vec();
    let put = put_bytes(
        &app,
        "/v1/storage/files/docs/hello.txt",
        Some(&admin),
        "text/plain; charset=utf-8",
        body.clone(),
    )
    .await;
    assert_eq!(put.status, 201, "{}", put.text);
    let o = &put.body;
    assert_eq!(o["bucket"], "files");
    assert_eq!(o["path"], "docs/hello.txt");
    assert_eq!(o["size"], body.len());
    assert_eq!(o["content_type"], "text/plain; charset=utf-8");
    assert_eq!(o["etag"], etag_of(&body));
    assert_eq!(o["metadata"], json!({}));
    assert!(o.get("blob").is_none());

    let (status, headers, bytes) =
        get_bytes(&app, "/v1/storage/files/docs/hello.txt", Some(&admin), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(bytes, body);
    assert_eq!(headers["content-type"], "text/plain; charset=utf-8");
    assert_eq!(headers["etag"].to_str().unwrap(), etag_of(&body));
    assert_eq!(headers["content-length"], body.len().to_string().as_str());
    assert_eq!(headers["accept-ranges"], "bytes");
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers.contains_key("last-modified"));

    let head = app
        .client
        .head(app.url("/v1/storage/files/docs/hello.txt"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(
        head.headers()["content-length"],
        body.len().to_string().as_str()
    );

    // Replace: same created_at, new etag, and x-basalt-metadata kept.
    let again = app
        .client
        .put(app.url("/v1/storage/files/docs/hello.txt"))
        .bearer_auth(&admin)
        .header("x-basalt-metadata", r#"{"owner":"me"}"#)
        .body("second")
        .send()
        .await
        .unwrap();
    let again = TestApp::reply(again).await;
    assert_eq!(again.status, 201);
    assert_eq!(again.body["created_at"], o["created_at"]);
    assert_eq!(again.body["metadata"], json!({"owner": "me"}));
    assert_eq!(again.body["content_type"], "application/octet-stream");
    let (_, _, bytes) =
        get_bytes(&app, "/v1/storage/files/docs/hello.txt", Some(&admin), &[]).await;
    assert_eq!(bytes, b"second");

    // Empty objects are objects.
    let empty = put_bytes(
        &app,
        "/v1/storage/files/empty",
        Some(&admin),
        "text/plain",
        Vec::new(),
    )
    .await;
    assert_eq!(empty.status, 201);
    let (status, _, bytes) = get_bytes(
        &app,
        "/v1/storage/files/empty",
        Some(&admin),
        &[("range", "bytes=0-1")],
    )
    .await;
    assert_eq!((status, bytes.len()), (200, 0));

    app.delete("/v1/storage/files/docs/hello.txt", Some(&admin))
        .await;
    let (status, _, _) =
        get_bytes(&app, "/v1/storage/files/docs/hello.txt", Some(&admin), &[]).await;
    assert_eq!(status, 404);
    app.delete("/v1/storage/files/docs/hello.txt", Some(&admin))
        .await
        .assert_error(404, "not_found");
    app.get("/v1/storage/nobucket/x", Some(&admin))
        .await
        .assert_error(404, "not_found");
    app.stop().await;
}

async fn ranges_follow_rfc_9110(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let body: Vec<u8> = (0..100u8).collect();
    put_bytes(
        &app,
        "/v1/storage/files/r.bin",
        Some(&admin),
        "application/octet-stream",
        body.clone(),
    )
    .await;
    let get = |range: &'static str| {
        let app = &app;
        let admin = admin.clone();
        async move {
            get_bytes(
                app,
                "/v1/storage/files/r.bin",
                Some(&admin),
                &[("range", range)],
            )
            .await
        }
    };
    let (s, h, b) = get("bytes=10-19").await;
    assert_eq!((s, b.as_slice()), (206, &body[10..20]));
    assert_eq!(h["content-range"], "bytes 10-19/100");
    assert_eq!(h["content-length"], "10");
    let (s, h, b) = get("bytes=-5").await;
    assert_eq!((s, b.as_slice()), (206, &body[95..]));
    assert_eq!(h["content-range"], "bytes 95-99/100");
    let (s, _, b) = get("bytes=90-").await;
    assert_eq!((s, b.as_slice()), (206, &body[90..]));
    let (s, _, b) = get("bytes=90-1000").await;
    assert_eq!((s, b.as_slice()), (206, &body[90..]));
    // Unsatisfiable: 416 with the size, in the envelope.
    let (s, h, b) = get("bytes=100-").await;
    assert_eq!(s, 416);
    assert_eq!(h["content-range"], "bytes */100");
    let err: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(err["error"]["code"], "invalid_argument");
    // Invalid or overlapping: the whole object.
    for ignored in ["bytes=20-10", "bytes=x-y", "pages=1-2", "bytes=0-50,40-60"] {
        let (s, _, b) = get(ignored).await;
        assert_eq!((s, b.len()), (200, 100), "{ignored}");
    }
    // Several ranges: multipart/byteranges with each part's Content-Range.
    let (s, h, b) = get("bytes=0-1, 50-52, -2").await;
    assert_eq!(s, 206);
    let ct = h["content-type"].to_str().unwrap().to_string();
    let boundary = ct
        .strip_prefix("multipart/byteranges; boundary=")
        .expect(&ct);
    assert_eq!(h["content-length"], b.len().to_string().as_str());
    let text = b.clone();
    let parts: Vec<&[u8]> = split_on(&text, format!("--{boundary}").as_bytes());
    // Before the first boundary is the leading CRLF; after the last, "--\r\n".
    let bodies: Vec<(String, Vec<u8>)> = parts[1..parts.len() - 1]
        .iter()
        .map(|p| {
            let p = &p[2..p.len() - 2]; // CRLF after the boundary, CRLF before the next
            let split = p.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            (
                String::from_utf8(p[..split].to_vec()).unwrap(),
                p[split + 4..].to_vec(),
            )
        })
        .collect();
    assert_eq!(bodies.len(), 3);
    assert!(
        bodies[0].0.contains("Content-Range: bytes 0-1/100"),
        "{}",
        bodies[0].0
    );
    assert_eq!(bodies[0].1, &body[0..2]);
    assert!(bodies[1].0.contains("Content-Range: bytes 50-52/100"));
    assert_eq!(bodies[1].1, &body[50..53]);
    assert_eq!(bodies[2].1, &body[98..]);
    assert!(parts.last().unwrap().starts_with(b"--"));
    app.stop().await;
}

fn split_on<'a>(haystack: &'a [u8], needle: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i + needle.len() <= haystack.len() {
        if &haystack[i..i + needle.len()] == needle {
            out.push(&haystack[start..i]);
            i += needle.len();
            start = i;
        } else {
            i += 1;
        }
    }
    out.push(&haystack[start..]);
    out
}

async fn conditional_and_download_headers(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let put = put_bytes(
        &app,
        "/v1/storage/files/report.pdf",
        Some(&admin),
        "application/pdf",
        "%PDF-1.7",
    )
    .await;
    let etag = put.body["etag"].as_str().unwrap().to_string();
    let path = "/v1/storage/files/report.pdf";
    let (s, h, b) = get_bytes(&app, path, Some(&admin), &[("if-none-match", &etag)]).await;
    assert_eq!((s, b.len()), (304, 0));
    assert_eq!(h["etag"].to_str().unwrap(), etag);
    let weak = format!("W/{etag}, \"other\"");
    assert_eq!(
        get_bytes(&app, path, Some(&admin), &[("if-none-match", &weak)])
            .await
            .0,
        304
    );
    assert_eq!(
        get_bytes(&app, path, Some(&admin), &[("if-none-match", "\"other\"")])
            .await
            .0,
        200
    );
    // If-Range with another ETag: the whole object.
    let (s, _, b) = get_bytes(
        &app,
        path,
        Some(&admin),
        &[("range", "bytes=0-1"), ("if-range", "\"old\"")],
    )
    .await;
    assert_eq!((s, b.len()), (200, 8));
    let (s, _, _) = get_bytes(
        &app,
        path,
        Some(&admin),
        &[("range", "bytes=0-1"), ("if-range", &etag)],
    )
    .await;
    assert_eq!(s, 206);
    let (_, h, _) = get_bytes(&app, &format!("{path}?download="), Some(&admin), &[]).await;
    assert_eq!(
        h["content-disposition"],
        "attachment; filename=\"report.pdf\"; filename*=UTF-8''report.pdf"
    );
    let (_, h, _) = get_bytes(
        &app,
        &format!("{path}?download=r%C3%A9sum%C3%A9.pdf"),
        Some(&admin),
        &[],
    )
    .await;
    assert_eq!(
        h["content-disposition"],
        "attachment; filename=\"r_sum_.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf"
    );
    app.get(&format!("{path}?bogus=1"), Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.stop().await;
}

async fn rules_decide_before_anything_is_told(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(
        &app,
        &admin,
        "home",
        json!({"rules": {
            "read": "auth != null && request.path.startsWith('users/' + auth.uid + '/')",
            "write": "auth != null && request.path.startsWith('users/' + auth.uid + '/') && request.size <= 100",
            "delete": "auth != null && resource.metadata.owner == auth.uid"
        }}),
    )
    .await;
    make_bucket(&app, &admin, "locked", json!({})).await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (_, bob_token, _) = app.user("bob@example.com").await;
    let mine = format!("/v1/storage/home/users/{alice}/a.txt");
    let put = app
        .client
        .put(app.url(&mine))
        .bearer_auth(&alice_token)
        .header("x-basalt-metadata", json!({"owner": alice}).to_string())
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    assert_eq!(
        get_bytes(&app, &mine, Some(&alice_token), &[]).await.2,
        b"hello"
    );
    // Too large for the rule: 403 before any byte is read (Content-Length), and chunked.
    put_bytes(
        &app,
        &mine,
        Some(&alice_token),
        "text/plain",
        vec![b'x'; 101],
    )
    .await
    .assert_error(403, "permission_denied");
    let chunked = reqwest::Body::wrap_stream(futures::stream::iter(vec![
        Ok::<_, std::io::Error>(vec![b'y'; 80]),
        Ok(vec![b'y'; 80]),
    ]));
    put_bytes(&app, &mine, Some(&alice_token), "text/plain", chunked)
        .await
        .assert_error(403, "permission_denied");
    assert_eq!(
        get_bytes(&app, &mine, Some(&alice_token), &[]).await.2,
        b"hello"
    );

    // Bob: the same 403 for Alice's existing object and for a missing one.
    let missing = format!("/v1/storage/home/users/{alice}/missing.txt");
    let a = app.get(&mine, Some(&bob_token)).await;
    let b = app.get(&missing, Some(&bob_token)).await;
    assert_eq!(
        a.assert_error(403, "permission_denied"),
        b.assert_error(403, "permission_denied")
    );
    app.get(&mine, None)
        .await
        .assert_error(403, "permission_denied");
    put_bytes(&app, &mine, Some(&bob_token), "text/plain", "evil")
        .await
        .assert_error(403, "permission_denied");
    let a = app.delete(&mine, Some(&bob_token)).await;
    let b = app.delete(&missing, Some(&bob_token)).await;
    assert_eq!(
        a.assert_error(403, "permission_denied"),
        b.assert_error(403, "permission_denied")
    );
    // Alice may read a missing object of hers: 404.
    app.get(&missing, Some(&alice_token))
        .await
        .assert_error(404, "not_found");
    app.delete(&mine, Some(&alice_token)).await;
    assert_eq!(app.get(&mine, Some(&alice_token)).await.status, 404);

    // No rule: users are refused, admins are not.
    put_bytes(
        &app,
        "/v1/storage/locked/x",
        Some(&alice_token),
        "text/plain",
        "x",
    )
    .await
    .assert_error(403, "permission_denied");
    assert_eq!(
        put_bytes(
            &app,
            "/v1/storage/locked/x",
            Some(&admin),
            "text/plain",
            "x"
        )
        .await
        .status,
        201
    );
    app.get("/v1/storage/locked/x", Some(&alice_token))
        .await
        .assert_error(403, "permission_denied");
    app.get("/v1/storage/locked", Some(&alice_token)).await;
    // Bad tokens are 401, never anonymous.
    app.get("/v1/storage/locked/x", Some("garbage"))
        .await
        .assert_error(401, "unauthenticated");
    app.stop().await;
}

async fn public_buckets_are_readable_by_anyone(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "pub", json!({"public": true})).await;
    put_bytes(
        &app,
        "/v1/storage/pub/logo.png",
        Some(&admin),
        "image/png",
        "png",
    )
    .await;
    let (s, h, b) = get_bytes(&app, "/v1/storage/pub/logo.png", None, &[]).await;
    assert_eq!((s, b.as_slice()), (200, &b"png"[..]));
    assert_eq!(h["content-security-policy"], "default-src 'none'; sandbox");
    let list = app.get("/v1/storage/pub", None).await;
    assert_eq!(list.assert_ok()["objects"][0]["path"], "logo.png");
    put_bytes(&app, "/v1/storage/pub/x.png", None, "image/png", "x")
        .await
        .assert_error(403, "permission_denied");
    app.delete("/v1/storage/pub/logo.png", None)
        .await
        .assert_error(403, "permission_denied");
    app.stop().await;
}

/// How many files are under `dir` (and its folders); 0 when it does not exist.
pub(crate) fn files_under(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    files_under(&e.path())
                } else {
                    1
                }
            })
            .sum()
    })
}

/// Files under the local backend's objects folder (uploads that were stored).
fn stored_files(app: &TestApp) -> usize {
    let root = app.state.config.data_dir.join("storage");
    files_under(&root.join("objects")) + files_under(&root.join(".tmp"))
}

async fn size_limits_hold_while_streaming(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "small", json!({"max_object_size": 1000})).await;
    assert_eq!(
        put_bytes(
            &app,
            "/v1/storage/small/ok",
            Some(&admin),
            "text/plain",
            vec![b'a'; 1000]
        )
        .await
        .status,
        201
    );
    let before = stored_files(&app);
    put_bytes(
        &app,
        "/v1/storage/small/big",
        Some(&admin),
        "text/plain",
        vec![b'a'; 1001],
    )
    .await
    .assert_error(413, "payload_too_large");
    // Chunked, no length announced: refused once the 1001st byte arrives, even though the
    // client would go on for a megabyte.
    let chunks =
        futures::stream::iter((0..1024).map(|_| Ok::<_, std::io::Error>(vec![b'b'; 1024])));
    put_bytes(
        &app,
        "/v1/storage/small/big",
        Some(&admin),
        "text/plain",
        reqwest::Body::wrap_stream(chunks),
    )
    .await
    .assert_error(413, "payload_too_large");
    assert_eq!(
        app.get("/v1/storage/small/big", Some(&admin)).await.status,
        404
    );
    // (On S3 the backend's own tests show a refused upload leaves no object and no open
    // multipart upload.)
    if !setup.s3 {
        assert_eq!(
            stored_files(&app),
            before,
            "nothing of a refused upload is left"
        );
    }
    // A body shorter than its Content-Length never becomes an object.
    let list = app.get("/v1/storage/small", Some(&admin)).await;
    assert_eq!(list.assert_ok()["objects"].as_array().unwrap().len(), 1);
    app.stop().await;
}

async fn content_types_are_checked(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(
        &app,
        &admin,
        "img",
        json!({"allowed_content_types": ["image/*", "application/pdf"]}),
    )
    .await;
    assert_eq!(
        put_bytes(
            &app,
            "/v1/storage/img/a.png",
            Some(&admin),
            "image/png",
            "x"
        )
        .await
        .status,
        201
    );
    assert_eq!(
        put_bytes(
            &app,
            "/v1/storage/img/a.pdf",
            Some(&admin),
            "application/pdf",
            "x"
        )
        .await
        .status,
        201
    );
    put_bytes(
        &app,
        "/v1/storage/img/a.html",
        Some(&admin),
        "text/html",
        "<script>",
    )
    .await
    .assert_error(415, "unsupported_media_type");
    put_bytes(&app, "/v1/storage/img/a.x", Some(&admin), "imagex/png", "x")
        .await
        .assert_error(415, "unsupported_media_type");
    put_bytes(&app, "/v1/storage/img/a.y", Some(&admin), "not a type", "x")
        .await
        .assert_error(400, "invalid_argument");
    app.stop().await;
}

async fn hostile_paths_are_refused(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let long = "a".repeat(256);
    let too_long = format!("{}x", "ab/".repeat(350));
    for path in [
        "../../etc/passwd",
        "%2E%2E/%2E%2E/etc/passwd",
        "a/%2E%2E/b",
        "a/./b",
        "a//b",
        "a/",
        "a%00b",
        "a%0Ab",
        "a%5Cb",
        "a\\b",
        "_sign",
        "_uploads/x",
        long.as_str(),
        too_long.as_str(),
    ] {
        // Sent byte for byte: an HTTP client library would resolve the dot segments itself.
        let request = format!(
            "PUT /v1/storage/files/{path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {admin}\r\ncontent-type: text/plain\r\ncontent-length: 1\r\nconnection: close\r\n\r\nx"
        );
        let reply = crate::security_http::exchange(app.addr, request.as_bytes()).await;
        // `_sign` is a route of its own, for POST only; `_uploads/…` are tus's.
        let expected = if path == "_sign" || path == "_uploads/x" {
            405
        } else {
            400
        };
        assert_eq!(reply.status, expected, "{path}: {:?}", reply.body);
        assert_eq!(reply.body["error"]["code"], "invalid_argument", "{path}");
    }
    let list = app.get("/v1/storage/files", Some(&admin)).await;
    assert_eq!(list.assert_ok()["objects"], json!([]));
    // Nothing was written outside the storage folder.
    assert!(!app.state.config.data_dir.join("etc").exists());
    // Unicode names are names.
    let ok = put_bytes(
        &app,
        "/v1/storage/files/%E6%96%87%E4%BB%B6/caf%C3%A9%20au%20lait.txt",
        Some(&admin),
        "text/plain",
        "x",
    )
    .await;
    assert_eq!(ok.status, 201);
    assert_eq!(ok.body["path"], "文件/café au lait.txt");
    app.get("/v1/storage/files?prefix=%00", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/storage/files?delimiter=x", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/storage/files?limit=0", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/storage/files?limit=5000", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/storage/files?cursor=garbage", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.get("/v1/storage/BAD", Some(&admin))
        .await
        .assert_error(400, "invalid_argument");
    app.stop().await;
}

async fn listing_folds_folders_and_pages_with_sealed_cursors(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    for p in [
        "a.txt",
        "b/1.txt",
        "b/2.txt",
        "b/c/3.txt",
        "b0.txt",
        "c.txt",
        "d/4.txt",
        "e.txt",
    ] {
        put_bytes(
            &app,
            &format!("/v1/storage/files/{p}"),
            Some(&admin),
            "text/plain",
            p.to_string(),
        )
        .await;
    }
    let all = app.get("/v1/storage/files", Some(&admin)).await;
    let paths: Vec<&str> = all.assert_ok()["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "a.txt",
            "b/1.txt",
            "b/2.txt",
            "b/c/3.txt",
            "b0.txt",
            "c.txt",
            "d/4.txt",
            "e.txt"
        ]
    );
    assert_eq!(all.body["next_cursor"], Value::Null);

    // Folded at `/`, two at a time.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..10 {
        let url = match &cursor {
            Some(c) => format!("/v1/storage/files?delimiter=/&limit=2&cursor={c}"),
            None => "/v1/storage/files?delimiter=/&limit=2".into(),
        };
        let page = app.get(&url, Some(&admin)).await;
        let page = page.assert_ok().clone();
        for o in page["objects"].as_array().unwrap() {
            seen.push(o["path"].as_str().unwrap().to_string());
        }
        for p in page["prefixes"].as_array().unwrap() {
            seen.push(p.as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, ["a.txt", "b/", "b0.txt", "c.txt", "d/", "e.txt"]);

    let inside = app
        .get("/v1/storage/files?prefix=b/&delimiter=/", Some(&admin))
        .await;
    let inside = inside.assert_ok();
    assert_eq!(inside["prefixes"], json!(["b/c/"]));
    assert_eq!(inside["objects"].as_array().unwrap().len(), 2);
    let prefix_b = app.get("/v1/storage/files?prefix=b", Some(&admin)).await;
    assert_eq!(prefix_b.assert_ok()["objects"].as_array().unwrap().len(), 4);

    // A cursor belongs to its listing: another prefix refuses it.
    let page = app.get("/v1/storage/files?limit=1", Some(&admin)).await;
    let c = page.assert_ok()["next_cursor"]
        .as_str()
        .unwrap()
        .to_string();
    app.get(
        &format!("/v1/storage/files?limit=1&prefix=b&cursor={c}"),
        Some(&admin),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.stop().await;
}

async fn listing_hides_what_the_read_rule_hides(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(
        &app,
        &admin,
        "home",
        json!({"rules": {"read": "auth != null && request.path.startsWith('users/' + auth.uid + '/')"}}),
    )
    .await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (bob, _, _) = app.user("bob@example.com").await;
    for p in [
        format!("users/{alice}/1"),
        format!("users/{alice}/d/2"),
        format!("users/{bob}/secret"),
        format!("users/{bob}/d/x"),
    ] {
        put_bytes(
            &app,
            &format!("/v1/storage/home/{p}"),
            Some(&admin),
            "text/plain",
            "x",
        )
        .await;
    }
    let list = app
        .get(
            "/v1/storage/home?prefix=users/&delimiter=/",
            Some(&alice_token),
        )
        .await;
    assert_eq!(
        list.assert_ok()["prefixes"],
        json!([format!("users/{alice}/")])
    );
    let list = app.get("/v1/storage/home", Some(&alice_token)).await;
    let paths: Vec<&str> = list.assert_ok()["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [format!("users/{alice}/1"), format!("users/{alice}/d/2")]
    );
    let list = app
        .get(
            &format!("/v1/storage/home?prefix=users/{bob}/&limit=1"),
            Some(&alice_token),
        )
        .await;
    assert_eq!(list.assert_ok()["objects"], json!([]));
    // Anonymous sees nothing.
    let list = app.get("/v1/storage/home", None).await;
    assert_eq!(list.assert_ok()["objects"], json!([]));
    app.stop().await;
}

async fn writes_and_deletes_reach_the_change_stream(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    put_bytes(
        &app,
        "/v1/storage/files/a.txt",
        Some(&admin),
        "text/plain",
        "1",
    )
    .await;
    put_bytes(
        &app,
        "/v1/storage/files/a.txt",
        Some(&admin),
        "text/plain",
        "22",
    )
    .await;
    app.delete("/v1/storage/files/a.txt", Some(&admin)).await;
    let events = storage_events(&app, &admin, "files", 3).await;
    let ops: Vec<&str> = events.iter().map(|e| e["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["create", "update", "delete"], "{events:?}");
    assert!(events
        .iter()
        .all(|e| e["topic"] == "storage/files" && e["key"] == "a.txt"));
    assert_eq!(events[0]["data"]["size"], 1);
    assert_eq!(events[1]["data"]["size"], 2);
    assert_eq!(events[1]["old_data"]["size"], 1);
    assert!(events[0]["data"].get("blob").is_none());
    // Dropping the bucket deletes its objects, each with its event.
    put_bytes(
        &app,
        "/v1/storage/files/b.txt",
        Some(&admin),
        "text/plain",
        "1",
    )
    .await;
    app.delete("/v1/admin/buckets/files", Some(&admin)).await;
    let events = storage_events(&app, &admin, "files", 5).await;
    let last = events.last().unwrap().clone();
    assert_eq!(
        (last["op"].as_str(), last["key"].as_str()),
        (Some("delete"), Some("b.txt"))
    );
    app.stop().await;
}

async fn signed_urls_work_until_they_expire(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "home", json!({"rules": {"read": "auth != null && request.path.startsWith(auth.uid + '/')", "write": "auth != null && request.path.startsWith(auth.uid + '/')"}})).await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (_, bob_token, _) = app.user("bob@example.com").await;
    let path = format!("{alice}/photo 1.jpg");
    put_bytes(
        &app,
        &format!("/v1/storage/home/{alice}/photo%201.jpg"),
        Some(&alice_token),
        "image/jpeg",
        "jpeg",
    )
    .await;
    let signed = app
        .post(
            "/v1/storage/home/_sign",
            Some(&alice_token),
            json!({"path": path, "expires_in": 60}),
        )
        .await;
    let url = signed.assert_ok()["url"].as_str().unwrap().to_string();
    assert!(url.starts_with(&app.url("/v1/storage/home/")), "{url}");
    assert!(url.contains("photo%201.jpg"), "{url}");
    let got = app.client.get(&url).send().await.unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().await.unwrap().as_ref(), b"jpeg");
    // Tampering with any part: 403.
    let tampered = url.replace("signature=", "signature=0");
    assert_eq!(
        app.client.get(&tampered).send().await.unwrap().status(),
        403
    );
    let other_expiry = url.replacen("expires=", "expires=9", 1);
    assert_eq!(
        app.client.get(&other_expiry).send().await.unwrap().status(),
        403
    );
    let other_path = url.replace("photo%201.jpg", "photo%202.jpg");
    assert_eq!(
        app.client.get(&other_path).send().await.unwrap().status(),
        403
    );
    // A GET URL does not upload.
    assert_eq!(
        app.client
            .put(&url)
            .body("x")
            .send()
            .await
            .unwrap()
            .status(),
        403
    );
    // Bob may not sign Alice's object.
    app.post(
        "/v1/storage/home/_sign",
        Some(&bob_token),
        json!({"path": path, "expires_in": 60}),
    )
    .await
    .assert_error(403, "permission_denied");
    app.post(
        "/v1/storage/home/_sign",
        Some(&alice_token),
        json!({"path": path, "expires_in": 0}),
    )
    .await
    .assert_error(400, "invalid_argument");
    app.post(
        "/v1/storage/home/_sign",
        Some(&alice_token),
        json!({"path": path, "expires_in": 60, "method": "DELETE"}),
    )
    .await
    .assert_error(400, "invalid_argument");

    // A PUT URL uploads without a token.
    let signed = app
        .post(
            "/v1/storage/home/_sign",
            Some(&alice_token),
            json!({"path": format!("{alice}/up.txt"), "expires_in": 60, "method": "PUT"}),
        )
        .await;
    let put_url = signed.assert_ok()["url"].as_str().unwrap().to_string();
    let up = app
        .client
        .put(&put_url)
        .header("content-type", "text/plain")
        .body("uploaded")
        .send()
        .await
        .unwrap();
    assert_eq!(up.status(), 201);
    let (_, _, b) = get_bytes(
        &app,
        &format!("/v1/storage/home/{alice}/up.txt"),
        Some(&alice_token),
        &[],
    )
    .await;
    assert_eq!(b, b"uploaded");

    // Expired: 403.
    let signed = app
        .post(
            "/v1/storage/home/_sign",
            Some(&alice_token),
            json!({"path": path, "expires_in": 1}),
        )
        .await;
    let short = signed.assert_ok()["url"].as_str().unwrap().to_string();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let expired = TestApp::reply(app.client.get(&short).send().await.unwrap()).await;
    let msg = expired.assert_error(403, "permission_denied");
    assert!(msg.contains("expired"), "{msg}");
    app.stop().await;
}

async fn multipart_form_uploads(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({"max_object_size": 100})).await;
    let form = reqwest::multipart::Form::new()
        .text("path", "forms/a.txt")
        .text("metadata", r#"{"k": 1}"#)
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"from a form".to_vec())
                .file_name("ignored.txt")
                .mime_str("text/plain")
                .unwrap(),
        );
    let reply = TestApp::reply(
        app.client
            .post(app.url("/v1/storage/files"))
            .bearer_auth(&admin)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    assert_eq!(reply.body["path"], "forms/a.txt");
    assert_eq!(reply.body["content_type"], "text/plain");
    assert_eq!(reply.body["metadata"], json!({"k": 1}));
    let (_, _, b) = get_bytes(&app, "/v1/storage/files/forms/a.txt", Some(&admin), &[]).await;
    assert_eq!(b, b"from a form");
    // Without a path field, the file name is the path.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"x".to_vec()).file_name("named.txt"),
    );
    let reply = TestApp::reply(
        app.client
            .post(app.url("/v1/storage/files"))
            .bearer_auth(&admin)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(reply.body["path"], "named.txt");
    // Too large, no file, unknown field.
    let form = reqwest::multipart::Form::new()
        .text("path", "big")
        .part("file", reqwest::multipart::Part::bytes(vec![0u8; 101]));
    TestApp::reply(
        app.client
            .post(app.url("/v1/storage/files"))
            .bearer_auth(&admin)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(413, "payload_too_large");
    let form = reqwest::multipart::Form::new().text("path", "nofile");
    TestApp::reply(
        app.client
            .post(app.url("/v1/storage/files"))
            .bearer_auth(&admin)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(400, "invalid_argument");
    // Fields other than the file are small, however much a client sends.
    let form = reqwest::multipart::Form::new()
        .text("path", "p".repeat(1024 * 1024))
        .part("file", reqwest::multipart::Part::bytes(vec![0u8; 1]));
    TestApp::reply(
        app.client
            .post(app.url("/v1/storage/files"))
            .bearer_auth(&admin)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(400, "invalid_argument");
    let form = reqwest::multipart::Form::new().text("what", "x");
    TestApp::reply(
        app.client
            .post(app.url("/v1/storage/files"))
            .bearer_auth(&admin)
            .multipart(form)
            .send()
            .await
            .unwrap(),
    )
    .await
    .assert_error(400, "invalid_argument");
    let not_form = app
        .client
        .post(app.url("/v1/storage/files"))
        .bearer_auth(&admin)
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(not_form.status().is_client_error());
    app.stop().await;
}

async fn concurrent_uploads_to_one_path_leave_one_whole_object(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let bodies: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 256 * 1024]).collect();
    let uploads = bodies.iter().map(|body| {
        // Trickled in chunks so the uploads overlap.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(16 * 1024).map(|c| Ok(c.to_vec())).collect();
        put_bytes(
            &app,
            "/v1/storage/files/same",
            Some(&admin),
            "application/octet-stream",
            reqwest::Body::wrap_stream(futures::stream::iter(chunks)),
        )
    });
    let replies = futures::future::join_all(uploads).await;
    assert!(
        replies.iter().all(|r| r.status == 201),
        "{:?}",
        replies
            .iter()
            .map(|r| (r.status, &r.text))
            .collect::<Vec<_>>()
    );
    let (_, headers, got) = get_bytes(&app, "/v1/storage/files/same", Some(&admin), &[]).await;
    assert!(bodies.contains(&got), "the object is one upload, whole");
    assert_eq!(headers["etag"].to_str().unwrap(), etag_of(&got));
    let events = storage_events(&app, &admin, "files", 8).await;
    assert_eq!(events.len(), 8);
    assert_eq!(events.iter().filter(|e| e["op"] == "create").count(), 1);
    assert_eq!(
        events.last().unwrap()["data"]["etag"],
        etag_of(&got).as_str()
    );
    app.stop().await;
}

async fn replaced_bytes_are_swept_after_their_grace(setup: Setup) {
    let app = spawn_with(setup, |c| c.storage.replaced_grace_secs = 0).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    put_bytes(
        &app,
        "/v1/storage/files/a",
        Some(&admin),
        "text/plain",
        "one",
    )
    .await;
    put_bytes(
        &app,
        "/v1/storage/files/a",
        Some(&admin),
        "text/plain",
        "two",
    )
    .await;
    put_bytes(
        &app,
        "/v1/storage/files/b",
        Some(&admin),
        "text/plain",
        "three",
    )
    .await;
    app.delete("/v1/storage/files/b", Some(&admin)).await;
    if !setup.s3 {
        assert_eq!(stored_files(&app), 3);
    }
    let removed = app.state.storage.sweep().await.unwrap();
    assert_eq!(removed, 2);
    if !setup.s3 {
        assert_eq!(stored_files(&app), 1);
    }
    let (_, _, b) = get_bytes(&app, "/v1/storage/files/a", Some(&admin), &[]).await;
    assert_eq!(b, b"two");
    assert_eq!(app.state.storage.sweep().await.unwrap(), 0);
    app.stop().await;
}

/// Peak resident memory of a process, from /proc (kB).
pub(crate) fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Uploads and downloads `size` bytes through a `basalt serve` process (`env` picks the
/// backend), checking the bytes by their SHA-256 and answering the server's peak RSS in MiB.
pub(crate) async fn big_round_trip(env: &[(&str, &str)], size: u64) -> u64 {
    use futures::StreamExt;
    use sha2::Digest;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("basalt.db").display());
    let migrate = crate::changes::basalt_cmd(&url, dir.path())
        .envs(env.iter().copied())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let key = crate::changes::create_service_key(&url, dir.path(), "big");
    let node = crate::changes::start_node_with(&url, dir.path(), env).await;
    let client = reqwest::Client::new();
    let made = client
        .put(format!("{}/v1/admin/buckets/big", node.base))
        .bearer_auth(&key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 200);
    // 1 MiB chunks of a pattern that changes per chunk, made as they are sent.
    let chunk = 1024 * 1024u64;
    let chunks = size / chunk;
    let make = move |i: u64| bytes::Bytes::from(vec![(i % 251) as u8; chunk as usize]);
    let mut expected = sha2::Sha256::new();
    for i in 0..chunks {
        expected.update(make(i));
    }
    let expected = hex::encode(expected.finalize());
    let body = futures::stream::iter(0..chunks).map(move |i| Ok::<_, std::io::Error>(make(i)));
    let put = client
        .put(format!("{}/v1/storage/big/blob.bin", node.base))
        .bearer_auth(&key)
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201, "{}", put.text().await.unwrap());
    let got = client
        .get(format!("{}/v1/storage/big/blob.bin", node.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let mut stream = got.bytes_stream();
    let mut hash = sha2::Sha256::new();
    let mut total = 0u64;
    while let Some(part) = stream.next().await {
        let part = part.unwrap();
        total += part.len() as u64;
        hash.update(&part);
    }
    assert_eq!(total, size);
    assert_eq!(hex::encode(hash.finalize()), expected);
    peak_rss_kib(node.child.id()) / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_512_mib_object_streams_through_a_server_under_150_mib() {
    let peak = big_round_trip(&[], 512 * 1024 * 1024).await;
    eprintln!("server peak RSS after a 512 MiB upload and download: {peak} MiB");
    assert!(peak < 150, "server peak RSS {peak} MiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_512_mib_object_streams_through_a_server_on_s3_under_150_mib() {
    let Some(s3) = crate::s3_support::test_s3() else {
        return;
    };
    let env = s3.server_env(&s3.unique_prefix("big"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let peak = big_round_trip(&env, 512 * 1024 * 1024).await;
    eprintln!("server peak RSS after a 512 MiB upload and download on S3: {peak} MiB");
    assert!(peak < 150, "server peak RSS {peak} MiB");
}

/// Two `basalt serve` processes on one PostgreSQL database and one S3 bucket: an object
/// uploaded through one is listed, served and deleted through the other, a signed URL made
/// by one works on the other, and a resumable upload started on one finishes on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_objects_through_postgres_and_s3() {
    if !crate::helpers::postgres_available() {
        return;
    }
    let Some(s3) = crate::s3_support::test_s3() else {
        return;
    };
    let url = crate::helpers::fresh_postgres_database().await;
    let dir = tempfile::tempdir().unwrap();
    let env = s3.server_env(&s3.unique_prefix("nodes"));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let migrate = crate::changes::basalt_cmd(&url, dir.path())
        .envs(env.iter().copied())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let key = crate::changes::create_service_key(&url, dir.path(), "nodes");
    // Each node gets a data folder of its own: nothing may depend on a shared disk.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = tokio::join!(
        crate::changes::start_node_with(&url, dir_a.path(), &env),
        crate::changes::start_node_with(&url, dir_b.path(), &env)
    );
    let client = reqwest::Client::new();
    let made = client
        .put(format!("{}/v1/admin/buckets/shared", a.base))
        .bearer_auth(&key)
        .json(&json!({"rules": {"read": "auth != null"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(made.status(), 200);
    let body = vec![7u8; 3 * 1024 * 1024];
    let put = client
        .put(format!("{}/v1/storage/shared/dir/file.bin", a.base))
        .bearer_auth(&key)
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);
    let listed: Value = client
        .get(format!("{}/v1/storage/shared?prefix=dir/", b.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["objects"][0]["path"], "dir/file.bin");
    let got = client
        .get(format!("{}/v1/storage/shared/dir/file.bin", b.base))
        .bearer_auth(&key)
        .header("range", "bytes=1048576-1048579")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 206);
    assert_eq!(got.bytes().await.unwrap().as_ref(), &body[1048576..1048580]);
    // A URL signed by one node opens on the other.
    let signed: Value = client
        .post(format!("{}/v1/storage/shared/_sign", a.base))
        .bearer_auth(&key)
        .json(&json!({"path": "dir/file.bin", "expires_in": 60}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let signed_url = signed["url"].as_str().unwrap().replace(&a.base, &b.base);
    let via_b = client.get(&signed_url).send().await.unwrap();
    assert_eq!(via_b.status(), 200);
    assert_eq!(via_b.bytes().await.unwrap().len(), body.len());
    // A resumable upload started on one node is finished on the other.
    use base64::Engine;
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let meta = format!(
        "path {}",
        base64::engine::general_purpose::STANDARD.encode("dir/resumed.bin")
    );
    let created = client
        .post(format!("{}/v1/storage/shared/_uploads", a.base))
        .bearer_auth(&key)
        .header("tus-resumable", "1.0.0")
        .header("upload-length", data.len().to_string())
        .header("upload-metadata", meta)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let location = created.headers()["location"].to_str().unwrap().to_string();
    let upload_path = location
        .find("/v1/storage/")
        .map(|i| location[i..].to_string())
        .unwrap();
    let first = client
        .patch(format!("{}{upload_path}", a.base))
        .bearer_auth(&key)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "0")
        .header("content-type", "application/offset+octet-stream")
        .body(data[..120_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 204);
    let head = client
        .head(format!("{}{upload_path}", b.base))
        .bearer_auth(&key)
        .header("tus-resumable", "1.0.0")
        .send()
        .await
        .unwrap();
    assert_eq!(head.headers()["upload-offset"], "120000");
    let rest = client
        .patch(format!("{}{upload_path}", b.base))
        .bearer_auth(&key)
        .header("tus-resumable", "1.0.0")
        .header("upload-offset", "120000")
        .header("content-type", "application/offset+octet-stream")
        .body(data[120_000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(rest.status(), 204);
    let resumed = client
        .get(format!("{}/v1/storage/shared/dir/resumed.bin", a.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resumed.status(), 200);
    assert_eq!(resumed.bytes().await.unwrap().as_ref(), data.as_slice());

    let deleted = client
        .delete(format!("{}/v1/storage/shared/dir/file.bin", b.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let gone = client
        .get(format!("{}/v1/storage/shared/dir/file.bin", a.base))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);
}
