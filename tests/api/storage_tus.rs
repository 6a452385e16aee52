//! Resumable uploads (tus 1.0.0 at `/v1/storage/{bucket}/_uploads`): creation, offsets,
//! chunks, termination, who may continue an upload, rules and limits at creation and
//! completion, expiry, and a real tus client (tuspy) resuming an interrupted upload.

use base64::Engine;
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{Reply, TestApp};
use crate::storage::{get_bytes, spawn, spawn_with, Setup};
use crate::storage_tests;

storage_tests!(
    a_chunked_upload_becomes_the_object,
    offsets_versions_and_content_types_are_checked,
    an_interrupted_chunk_leaves_the_offset_where_it_was,
    uploads_belong_to_their_creator,
    rules_and_limits_decide_at_creation_and_completion,
    incomplete_uploads_expire_and_their_parts_are_swept,
    termination_removes_the_upload_and_its_parts,
    a_real_tus_client_resumes_an_interrupted_upload,
);

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A tus request: `Tus-Resumable: 1.0.0` unless `headers` gives another one (an empty value
/// leaves it out).
async fn tus(
    app: &TestApp,
    method: Method,
    url: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Reply {
    let url = if url.starts_with("http") {
        url.to_string()
    } else {
        app.url(url)
    };
    let mut req = app.client.request(method, url);
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("tus-resumable"))
    {
        req = req.header("tus-resumable", "1.0.0");
    }
    for (k, v) in headers {
        if !v.is_empty() {
            req = req.header(*k, *v);
        }
    }
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b);
    }
    TestApp::reply(req.send().await.unwrap()).await
}

/// Creates an upload of `length` bytes at `path`; answers its URL.
async fn create(app: &TestApp, bucket: &str, token: &str, path: &str, length: usize) -> String {
    let reply = create_reply(app, bucket, token, path, length, "").await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    header(&reply, "location")
}

async fn create_reply(
    app: &TestApp,
    bucket: &str,
    token: &str,
    path: &str,
    length: usize,
    extra_metadata: &str,
) -> Reply {
    let metadata = format!("path {}{extra_metadata}", b64(path));
    tus(
        app,
        Method::POST,
        &format!("/v1/storage/{bucket}/_uploads"),
        Some(token),
        &[
            ("upload-length", &length.to_string()),
            ("upload-metadata", &metadata),
        ],
        None,
    )
    .await
}

async fn patch(app: &TestApp, url: &str, token: &str, offset: usize, chunk: &[u8]) -> Reply {
    tus(
        app,
        Method::PATCH,
        url,
        Some(token),
        &[
            ("content-type", "application/offset+octet-stream"),
            ("upload-offset", &offset.to_string()),
        ],
        Some(chunk.to_vec()),
    )
    .await
}

async fn head(app: &TestApp, url: &str, token: &str) -> Reply {
    tus(app, Method::HEAD, url, Some(token), &[], None).await
}

fn header(reply: &Reply, name: &str) -> String {
    reply
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header: {:?}", reply.headers))
        .to_str()
        .unwrap()
        .to_string()
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

/// Files under `<data_dir>/storage/uploads` (the parts of unfinished uploads).
fn stored_parts(app: &TestApp) -> usize {
    crate::storage::files_under(&app.state.config.data_dir.join("storage").join("uploads"))
}

/// On local disk, that `n` part files are stored (S3 is checked through the API only).
fn assert_parts(app: &TestApp, setup: Setup, n: usize) {
    if !setup.s3 {
        assert_eq!(stored_parts(app), n);
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

async fn a_chunked_upload_becomes_the_object(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;

    // Discovery needs no token and no Tus-Resumable.
    let options = app
        .client
        .request(Method::OPTIONS, app.url("/v1/storage/files/_uploads"))
        .send()
        .await
        .unwrap();
    assert_eq!(options.status(), 204);
    let h = options.headers();
    assert_eq!(h["tus-resumable"], "1.0.0");
    assert_eq!(h["tus-version"], "1.0.0");
    assert_eq!(h["tus-extension"], "creation,termination");
    assert_eq!(h["tus-max-size"], (5u64 * 1024 * 1024 * 1024).to_string());

    let bytes = pattern(1000);
    let created = create_reply(
        &app,
        "files",
        &admin,
        "docs/report.bin",
        bytes.len(),
        &format!(
            ",content_type {},metadata {}",
            b64("application/pdf"),
            b64(r#"{"owner":"me"}"#)
        ),
    )
    .await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(header(&created, "tus-resumable"), "1.0.0");
    let url = header(&created, "location");
    assert!(
        url.starts_with(&format!("http://{}/v1/storage/files/_uploads/", app.addr)),
        "{url}"
    );
    assert!(created.headers.contains_key("upload-expires"));

    let status = head(&app, &url, &admin).await;
    assert_eq!(status.status, 200);
    assert_eq!(header(&status, "upload-offset"), "0");
    assert_eq!(header(&status, "upload-length"), "1000");
    assert_eq!(header(&status, "cache-control"), "no-store");
    assert_eq!(header(&status, "tus-resumable"), "1.0.0");

    // Not there yet: the object appears only when the last byte arrives.
    let (s, _, _) = get_bytes(&app, "/v1/storage/files/docs/report.bin", Some(&admin), &[]).await;
    assert_eq!(s, 404);

    let first = patch(&app, &url, &admin, 0, &bytes[..400]).await;
    assert_eq!(first.status, 204, "{}", first.text);
    assert_eq!(header(&first, "upload-offset"), "400");
    assert_eq!(
        header(&head(&app, &url, &admin).await, "upload-offset"),
        "400"
    );
    // An empty chunk is harmless.
    let empty = patch(&app, &url, &admin, 400, b"").await;
    assert_eq!(empty.status, 204);
    assert_eq!(header(&empty, "upload-offset"), "400");
    let last = patch(&app, &url, &admin, 400, &bytes[400..]).await;
    assert_eq!(last.status, 204, "{}", last.text);
    assert_eq!(header(&last, "upload-offset"), "1000");

    let (s, h, got) = get_bytes(&app, "/v1/storage/files/docs/report.bin", Some(&admin), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(got, bytes);
    assert_eq!(h["content-type"], "application/pdf");
    assert_eq!(h["etag"], header(&last, "etag").as_str());
    let listed = app
        .get("/v1/storage/files?prefix=docs/", Some(&admin))
        .await;
    assert_eq!(
        listed.assert_ok()["objects"][0]["metadata"],
        json!({"owner": "me"})
    );
    // The commit is the ordinary one: its event is on the change stream.
    let mut events = Vec::new();
    for _ in 0..100 {
        let page = app
            .get("/v1/admin/changes?topic=storage/files", Some(&admin))
            .await;
        events = page.assert_ok()["changes"].as_array().unwrap().clone();
        if !events.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["op"], "create");
    assert_eq!(events[0]["key"], "docs/report.bin");
    assert_eq!(events[0]["data"]["size"], 1000);

    // The upload is finished: it and its parts are gone.
    assert_eq!(head(&app, &url, &admin).await.status, 404);
    assert_parts(&app, setup, 0);

    // `filename` stands in for `path`; an empty upload is complete at creation.
    let empty = tus(
        &app,
        Method::POST,
        "/v1/storage/files/_uploads",
        Some(&admin),
        &[
            ("upload-length", "0"),
            ("upload-metadata", &format!("filename {}", b64("empty.txt"))),
        ],
        None,
    )
    .await;
    assert_eq!(empty.status, 201, "{}", empty.text);
    let (s, _, got) = get_bytes(&app, "/v1/storage/files/empty.txt", Some(&admin), &[]).await;
    assert_eq!((s, got.len()), (200, 0));
    app.stop().await;
}

async fn offsets_versions_and_content_types_are_checked(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let url = create(&app, "files", &admin, "a.bin", 10).await;

    // A PATCH at another offset than the upload's: 409, nothing taken.
    let wrong = patch(&app, &url, &admin, 3, b"abc").await;
    wrong.assert_error(409, "conflict");
    assert_eq!(header(&wrong, "tus-resumable"), "1.0.0");
    assert_eq!(
        header(&head(&app, &url, &admin).await, "upload-offset"),
        "0"
    );

    // Without Tus-Resumable, or with another version: 412 with the version spoken.
    for version in ["", "0.2.2"] {
        let r = tus(
            &app,
            Method::HEAD,
            &url,
            Some(&admin),
            &[("tus-resumable", version)],
            None,
        )
        .await;
        assert_eq!(r.status, 412);
        assert_eq!(header(&r, "tus-version"), "1.0.0");
        assert_eq!(header(&r, "tus-resumable"), "1.0.0");
        let r = tus(
            &app,
            Method::POST,
            "/v1/storage/files/_uploads",
            Some(&admin),
            &[
                ("tus-resumable", version),
                ("upload-length", "1"),
                ("upload-metadata", &format!("path {}", b64("b"))),
            ],
            None,
        )
        .await;
        r.assert_error(412, "failed_precondition");
    }

    // A PATCH body of another type: 415.
    let r = tus(
        &app,
        Method::PATCH,
        &url,
        Some(&admin),
        &[
            ("content-type", "application/octet-stream"),
            ("upload-offset", "0"),
        ],
        Some(b"abc".to_vec()),
    )
    .await;
    r.assert_error(415, "unsupported_media_type");

    // More than the upload's length: 413, nothing taken.
    patch(&app, &url, &admin, 0, &[1u8; 11])
        .await
        .assert_error(413, "payload_too_large");
    assert_eq!(
        header(&head(&app, &url, &admin).await, "upload-offset"),
        "0"
    );

    // Creation needs a length and a path.
    let r = tus(
        &app,
        Method::POST,
        "/v1/storage/files/_uploads",
        Some(&admin),
        &[("upload-metadata", &format!("path {}", b64("b")))],
        None,
    )
    .await;
    r.assert_error(400, "invalid_argument");
    create_reply(&app, "files", &admin, "", 5, "")
        .await
        .assert_error(400, "invalid_argument");
    let r = tus(
        &app,
        Method::POST,
        "/v1/storage/files/_uploads",
        Some(&admin),
        &[("upload-length", "5"), ("upload-metadata", "path %%%")],
        None,
    )
    .await;
    r.assert_error(400, "invalid_argument");
    // Hostile paths are refused as in a plain upload.
    create_reply(&app, "files", &admin, "../etc/passwd", 5, "")
        .await
        .assert_error(400, "invalid_argument");
    // An id this server could not have made.
    let r = head(&app, "/v1/storage/files/_uploads/..%2F..%2Fx", &admin).await;
    assert_eq!(r.status, 404);
    app.stop().await;
}

async fn an_interrupted_chunk_leaves_the_offset_where_it_was(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let bytes = pattern(300_000);
    let url = create(&app, "files", &admin, "big.bin", bytes.len()).await;
    patch(&app, &url, &admin, 0, &bytes[..100_000])
        .await
        .assert_ok();

    // A PATCH whose body breaks off midway (the client dies): none of it counts.
    let part: Vec<u8> = bytes[100_000..150_000].to_vec();
    let body = futures::stream::iter(vec![
        Ok::<_, std::io::Error>(bytes::Bytes::from(part)),
        Err(std::io::Error::other("the client went away")),
    ]);
    let sent = app
        .client
        .patch(&url)
        .bearer_auth(&admin)
        .header("tus-resumable", "1.0.0")
        .header("content-type", "application/offset+octet-stream")
        .header("upload-offset", "100000")
        .header("content-length", "200000")
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await;
    assert!(sent.is_err() || !sent.unwrap().status().is_success());
    let mut offset = String::new();
    for _ in 0..50 {
        offset = header(&head(&app, &url, &admin).await, "upload-offset");
        if offset == "100000" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(offset, "100000");

    // Resumed from the offset HEAD gives, the object is whole.
    patch(&app, &url, &admin, 100_000, &bytes[100_000..])
        .await
        .assert_ok();
    let (s, _, got) = get_bytes(&app, "/v1/storage/files/big.bin", Some(&admin), &[]).await;
    assert_eq!(s, 200);
    assert!(got == bytes, "the object differs from what was sent");

    // Two PATCHes at one offset: one counts, the other is a 409.
    let url = create(&app, "files", &admin, "race.bin", 20).await;
    let (a, b) = tokio::join!(
        patch(&app, &url, &admin, 0, b"aaaaaaaaaa"),
        patch(&app, &url, &admin, 0, b"bbbbbbbbbb")
    );
    let mut statuses = [a.status.as_u16(), b.status.as_u16()];
    statuses.sort();
    assert_eq!(statuses, [204, 409], "{} / {}", a.text, b.text);
    assert_eq!(
        header(&head(&app, &url, &admin).await, "upload-offset"),
        "10"
    );
    app.stop().await;
}

async fn uploads_belong_to_their_creator(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(
        &app,
        &admin,
        "files",
        json!({"rules": {"read": "auth != null", "write": "auth != null"}}),
    )
    .await;
    let (_, alice, _) = app.user("alice@example.com").await;
    let (_, bob, _) = app.user("bob@example.com").await;
    let url = create(&app, "files", &alice, "a.bin", 6).await;

    // Another user learns nothing: every call is a 404, and nothing changes.
    assert_eq!(head(&app, &url, &bob).await.status, 404);
    patch(&app, &url, &bob, 0, b"abc")
        .await
        .assert_error(404, "not_found");
    tus(&app, Method::DELETE, &url, Some(&bob), &[], None)
        .await
        .assert_error(404, "not_found");
    // Nor does the same id under another bucket.
    make_bucket(&app, &admin, "other", json!({})).await;
    let elsewhere = url.replace("/files/", "/other/");
    assert_eq!(head(&app, &elsewhere, &alice).await.status, 404);

    // The creator continues it; an admin may look.
    patch(&app, &url, &alice, 0, b"abc").await.assert_ok();
    assert_eq!(
        header(&head(&app, &url, &admin).await, "upload-offset"),
        "3"
    );
    patch(&app, &url, &alice, 3, b"def").await.assert_ok();
    let (s, _, got) = get_bytes(&app, "/v1/storage/files/a.bin", Some(&bob), &[]).await;
    assert_eq!((s, got), (200, b"abcdef".to_vec()));
    app.stop().await;
}

async fn rules_and_limits_decide_at_creation_and_completion(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    let (uid, alice, _) = app.user("alice@example.com").await;
    let spec = |write: &str| {
        json!({"max_object_size": 100, "allowed_content_types": ["image/*"],
               "rules": {"write": write}})
    };
    make_bucket(
        &app,
        &admin,
        "pics",
        spec("auth != null && request.path.startsWith(auth.uid + '/') && request.size <= 50"),
    )
    .await;
    let png = format!(",content_type {}", b64("image/png"));

    // The rule sees the path and the announced size; the bucket's limits hold.
    create_reply(&app, "pics", &alice, "someone/else.png", 10, &png)
        .await
        .assert_error(403, "permission_denied");
    create_reply(&app, "pics", &alice, &format!("{uid}/big.png"), 60, &png)
        .await
        .assert_error(403, "permission_denied");
    create_reply(&app, "pics", &admin, "big.png", 101, &png)
        .await
        .assert_error(413, "payload_too_large");
    create_reply(
        &app,
        "pics",
        &alice,
        &format!("{uid}/a.txt"),
        10,
        &format!(",content_type {}", b64("text/plain")),
    )
    .await
    .assert_error(415, "unsupported_media_type");
    create_reply(&app, "missing", &admin, "x", 1, "")
        .await
        .assert_error(404, "not_found");

    // Asked again at completion: a rule changed meanwhile refuses the object, and the
    // upload is over.
    let made = create_reply(&app, "pics", &alice, &format!("{uid}/a.png"), 4, &png).await;
    assert_eq!(made.status, 201, "{}", made.text);
    let url = header(&made, "location");
    patch(&app, &url, &alice, 0, b"ab").await.assert_ok();
    make_bucket(&app, &admin, "pics", spec("false")).await;
    patch(&app, &url, &alice, 2, b"cd")
        .await
        .assert_error(403, "permission_denied");
    let (s, _, _) = get_bytes(
        &app,
        &format!("/v1/storage/pics/{uid}/a.png"),
        Some(&admin),
        &[],
    )
    .await;
    assert_eq!(s, 404);
    assert_eq!(head(&app, &url, &alice).await.status, 404);
    assert_parts(&app, setup, 0);
    app.stop().await;
}

async fn incomplete_uploads_expire_and_their_parts_are_swept(setup: Setup) {
    // Four seconds.
    let app = spawn_with(setup, |c| c.storage.upload_expiry_hours = 4.0 / 3600.0).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let started = std::time::Instant::now();
    let url = create(&app, "files", &admin, "slow.bin", 10).await;
    patch(&app, &url, &admin, 0, b"abcde").await.assert_ok();
    assert_parts(&app, setup, 1);
    // Not due yet: the sweeper leaves the part alone.
    app.state.storage.sweep().await.unwrap();
    assert_parts(&app, setup, 1);

    tokio::time::sleep(std::time::Duration::from_secs(4).saturating_sub(started.elapsed())).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(head(&app, &url, &admin).await.status, 404);
    patch(&app, &url, &admin, 5, b"fghij")
        .await
        .assert_error(404, "not_found");
    let removed = app.state.storage.sweep().await.unwrap();
    assert_eq!(removed, 1);
    assert_parts(&app, setup, 0);
    let (s, _, _) = get_bytes(&app, "/v1/storage/files/slow.bin", Some(&admin), &[]).await;
    assert_eq!(s, 404);
    app.stop().await;
}

async fn termination_removes_the_upload_and_its_parts(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let url = create(&app, "files", &admin, "gone.bin", 10).await;
    patch(&app, &url, &admin, 0, b"abc").await.assert_ok();
    patch(&app, &url, &admin, 3, b"def").await.assert_ok();
    assert_parts(&app, setup, 2);
    let r = tus(&app, Method::DELETE, &url, Some(&admin), &[], None).await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_eq!(header(&r, "tus-resumable"), "1.0.0");
    assert_parts(&app, setup, 0);
    assert_eq!(head(&app, &url, &admin).await.status, 404);
    patch(&app, &url, &admin, 6, b"ghij")
        .await
        .assert_error(404, "not_found");
    tus(&app, Method::DELETE, &url, Some(&admin), &[], None)
        .await
        .assert_error(404, "not_found");
    let (s, _, _) = get_bytes(&app, "/v1/storage/files/gone.bin", Some(&admin), &[]).await;
    assert_eq!(s, 404);
    app.stop().await;
}

/// Whether tuspy can be imported; under CI its absence is a failure, elsewhere the test is
/// skipped with a note (`pip install tuspy`).
fn tuspy_available() -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import tusclient"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(
        !in_ci,
        "CI is set but python3 cannot import tusclient: .ci/run installs tuspy"
    );
    eprintln!("python3 cannot import tusclient (pip install tuspy): tus client test not run");
    false
}

/// One run of tests/api/tus_client.py; answers its JSON line.
fn run_tus_client(args: &[&str]) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/tus_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .args(args)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "tus_client.py failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|_| panic!("tus_client.py printed {stdout}"))
}

async fn a_real_tus_client_resumes_an_interrupted_upload(setup: Setup) {
    if !tuspy_available() {
        return;
    }
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "files", json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("video.bin");
    let bytes: Vec<u8> = (0..700_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&file, &bytes).unwrap();
    let store = dir.path().join("urls.json");
    let endpoint = app.url("/v1/storage/files/_uploads");
    let (file, store) = (
        file.to_str().unwrap().to_string(),
        store.to_str().unwrap().to_string(),
    );

    // First run: 64 KiB chunks, stops after five of them and exits.
    let args = |stop: Option<&str>| {
        let mut a = vec![
            endpoint.clone(),
            admin.clone(),
            file.clone(),
            store.clone(),
            "media/video.bin".to_string(),
            "65536".to_string(),
        ];
        if let Some(s) = stop {
            a.push(s.to_string());
        }
        a
    };
    let first_args = args(Some("327680"));
    let first = tokio::task::spawn_blocking(move || {
        run_tus_client(&first_args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    assert_eq!(first["start"], 0);
    assert_eq!(first["offset"], 327680);
    let url = first["url"].as_str().unwrap().to_string();
    assert_eq!(
        header(&head(&app, &url, &admin).await, "upload-offset"),
        "327680"
    );
    let (s, _, _) = get_bytes(&app, "/v1/storage/files/media/video.bin", Some(&admin), &[]).await;
    assert_eq!(
        s, 404,
        "the object must not exist before the upload is complete"
    );

    // Second run: finds the stored URL, asks the offset, sends the rest.
    let second_args = args(None);
    let second = tokio::task::spawn_blocking(move || {
        run_tus_client(&second_args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await
    .unwrap();
    assert_eq!(second["url"], url.as_str());
    assert_eq!(second["start"], 327680);
    assert_eq!(second["offset"], bytes.len());

    let (s, h, got) = get_bytes(&app, "/v1/storage/files/media/video.bin", Some(&admin), &[]).await;
    assert_eq!(s, 200);
    assert_eq!(h["content-type"], "application/x-test");
    assert!(got == bytes, "the object differs from the file");
    assert_parts(&app, setup, 0);
    app.stop().await;
}
