//! Image transforms on download (`?width=&height=&fit=&format=`): sizes and formats of
//! real images decoded back, cover and contain, ETags and 304, the cache in the backend and
//! its sweeping with the original, rules applied as to the original, and the bounds
//! (decompression bombs, oversized inputs, non-images, bad parameters).

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};
use reqwest::Method;
use serde_json::{json, Value};

use crate::helpers::{spawn_app_with, Backend, TestApp};
use crate::storage::{get_bytes, put_bytes, spawn, spawn_with, Setup};
use crate::storage_tests;

// On local disk and on S3.
storage_tests!(
    transforms_resize_and_convert,
    cover_crops_the_centre_and_contain_keeps_everything,
    transforms_carry_their_own_etag_and_ignore_ranges,
    transforms_follow_the_rules_of_the_original,
    bombs_oversized_inputs_and_non_images_are_refused,
    bad_parameters_are_refused,
);

/// The cache is checked file by file, so on local disk.
mod cache {
    use super::transforms_are_cached_and_go_with_their_original;
    use crate::store_tests;

    store_tests!(transforms_are_cached_and_go_with_their_original);
}

/// A `w` × `h` image: red in the left quarter, green in the middle half, blue in the right
/// quarter (so a centre crop can be told from the whole).
fn striped(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, _| {
        if x < w / 4 {
            Rgb([255, 0, 0])
        } else if x < w - w / 4 {
            Rgb([0, 255, 0])
        } else {
            Rgb([0, 0, 255])
        }
    })
}

fn encode(image: &RgbImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    image.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn decode(bytes: &[u8]) -> (ImageFormat, image::DynamicImage) {
    let format = image::guess_format(bytes).expect("an image");
    (format, image::load_from_memory(bytes).expect("decodes"))
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

/// A GET answer as an error envelope (for `assert_error`).
async fn get_reply(app: &TestApp, path: &str, token: Option<&str>) -> crate::helpers::Reply {
    app.get(path, token).await
}

/// Files under `<data_dir>/storage/transforms`.
fn cached_transforms(app: &TestApp) -> usize {
    crate::storage::files_under(&app.state.config.data_dir.join("storage").join("transforms"))
}

async fn transforms_resize_and_convert(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "pics", json!({})).await;
    let png = encode(&striped(400, 200), ImageFormat::Png);
    put_bytes(
        &app,
        "/v1/storage/pics/a.png",
        Some(&admin),
        "image/png",
        png,
    )
    .await
    .assert_ok();
    let jpeg = encode(&striped(400, 200), ImageFormat::Jpeg);
    put_bytes(
        &app,
        "/v1/storage/pics/b.jpg",
        Some(&admin),
        "image/jpeg",
        jpeg,
    )
    .await
    .assert_ok();

    for (query, want_format, want_size) in [
        // One side: the other follows the aspect ratio.
        ("width=100", ImageFormat::Png, (100, 50)),
        ("height=50", ImageFormat::Png, (100, 50)),
        // Both (contain by default): inside the box.
        ("width=100&height=100", ImageFormat::Png, (100, 50)),
        (
            "width=100&height=100&fit=contain",
            ImageFormat::Png,
            (100, 50),
        ),
        (
            "width=100&height=100&fit=cover",
            ImageFormat::Png,
            (100, 100),
        ),
        // Never enlarged.
        ("width=1000", ImageFormat::Png, (400, 200)),
        // Formats.
        ("width=100&format=jpeg", ImageFormat::Jpeg, (100, 50)),
        ("width=100&format=webp", ImageFormat::WebP, (100, 50)),
        ("format=webp", ImageFormat::WebP, (400, 200)),
    ] {
        let (status, headers, body) = get_bytes(
            &app,
            &format!("/v1/storage/pics/a.png?{query}"),
            Some(&admin),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{query}: {}", String::from_utf8_lossy(&body));
        let (format, image) = decode(&body);
        assert_eq!(format, want_format, "{query}");
        assert_eq!((image.width(), image.height()), want_size, "{query}");
        assert_eq!(
            headers["content-type"],
            match want_format {
                ImageFormat::Png => "image/png",
                ImageFormat::Jpeg => "image/jpeg",
                _ => "image/webp",
            },
            "{query}"
        );
        assert_eq!(headers["x-content-type-options"], "nosniff");
    }

    // A JPEG original stays JPEG unless asked otherwise.
    let (status, headers, body) =
        get_bytes(&app, "/v1/storage/pics/b.jpg?width=40", Some(&admin), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "image/jpeg");
    let (format, image) = decode(&body);
    assert_eq!(format, ImageFormat::Jpeg);
    assert_eq!((image.width(), image.height()), (40, 20));
    let (_, _, body) = get_bytes(
        &app,
        "/v1/storage/pics/b.jpg?width=40&format=png",
        Some(&admin),
        &[],
    )
    .await;
    assert_eq!(decode(&body).0, ImageFormat::Png);

    // HEAD: the transform's headers, no image made.
    let head = app
        .client
        .head(app.url("/v1/storage/pics/a.png?width=10&format=webp"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-type"], "image/webp");
    app.stop().await;
}

async fn cover_crops_the_centre_and_contain_keeps_everything(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "pics", json!({})).await;
    let png = encode(&striped(400, 200), ImageFormat::Png);
    put_bytes(
        &app,
        "/v1/storage/pics/a.png",
        Some(&admin),
        "image/png",
        png,
    )
    .await
    .assert_ok();
    let fetch = |query: &'static str| {
        let app = &app;
        let admin = admin.clone();
        async move {
            let (status, _, body) = get_bytes(
                app,
                &format!("/v1/storage/pics/a.png?{query}"),
                Some(&admin),
                &[],
            )
            .await;
            assert_eq!(status, 200, "{query}");
            decode(&body).1.to_rgb8()
        }
    };
    let near = |p: &Rgb<u8>, want: [u8; 3]| {
        p.0.iter()
            .zip(want)
            .all(|(a, b)| (i16::from(*a) - i16::from(b)).abs() < 40)
    };
    // Cover 100×100: resized to 200×100, the middle 100 columns kept: all green.
    let cover = fetch("width=100&height=100&fit=cover").await;
    assert_eq!(cover.dimensions(), (100, 100));
    for x in [0, 50, 99] {
        assert!(near(cover.get_pixel(x, 50), [0, 255, 0]), "cover at x={x}");
    }
    // Contain: the whole image, red on the left and blue on the right.
    let contain = fetch("width=100&height=100").await;
    assert_eq!(contain.dimensions(), (100, 50));
    assert!(near(contain.get_pixel(2, 25), [255, 0, 0]));
    assert!(near(contain.get_pixel(50, 25), [0, 255, 0]));
    assert!(near(contain.get_pixel(97, 25), [0, 0, 255]));
    // Cover of a box larger than the image on one side: not enlarged, cropped to the box.
    let tall = fetch("width=1000&height=100&fit=cover").await;
    assert_eq!(tall.dimensions(), (400, 100));
    app.stop().await;
}

async fn transforms_carry_their_own_etag_and_ignore_ranges(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "pics", json!({})).await;
    let png = encode(&striped(64, 64), ImageFormat::Png);
    put_bytes(
        &app,
        "/v1/storage/pics/a.png",
        Some(&admin),
        "image/png",
        png,
    )
    .await
    .assert_ok();
    let (_, original, _) = get_bytes(&app, "/v1/storage/pics/a.png", Some(&admin), &[]).await;
    let path = "/v1/storage/pics/a.png?width=32";
    let (status, headers, body) =
        get_bytes(&app, path, Some(&admin), &[("range", "bytes=0-9")]).await;
    assert_eq!(status, 200, "a Range is ignored on a transform");
    assert!(headers.get("content-range").is_none());
    assert_eq!(decode(&body).1.width(), 32);
    let etag = headers["etag"].to_str().unwrap().to_string();
    assert_ne!(etag, original["etag"].to_str().unwrap());
    // Other parameters, other ETag; the same ones, the same.
    let (_, other, _) = get_bytes(&app, "/v1/storage/pics/a.png?width=16", Some(&admin), &[]).await;
    assert_ne!(other["etag"], headers["etag"]);
    let (_, again, _) = get_bytes(&app, path, Some(&admin), &[]).await;
    assert_eq!(again["etag"], headers["etag"]);
    let (status, _, body) = get_bytes(&app, path, Some(&admin), &[("if-none-match", &etag)]).await;
    assert_eq!(status, 304);
    assert!(body.is_empty());
    // The original's ETag does not match the transform.
    let (status, _, _) = get_bytes(
        &app,
        path,
        Some(&admin),
        &[("if-none-match", original["etag"].to_str().unwrap())],
    )
    .await;
    assert_eq!(status, 200);
    app.stop().await;
}

async fn transforms_are_cached_and_go_with_their_original(backend: Backend) {
    let app = spawn_app_with(backend, |c| c.storage.replaced_grace_secs = 0).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "pics", json!({})).await;
    let png = encode(&striped(200, 100), ImageFormat::Png);
    put_bytes(
        &app,
        "/v1/storage/pics/a.png",
        Some(&admin),
        "image/png",
        png,
    )
    .await
    .assert_ok();
    assert_eq!(cached_transforms(&app), 0);
    let path = "/v1/storage/pics/a.png?width=50";
    let (_, _, first) = get_bytes(&app, path, Some(&admin), &[]).await;
    assert_eq!(
        cached_transforms(&app),
        1,
        "the first request caches its result"
    );
    // Served from the cache: the cached blob is what answers (overwrite it to see).
    let cached = walk_files(&app.state.config.data_dir.join("storage").join("transforms"));
    assert_eq!(std::fs::read(&cached[0]).unwrap(), first);
    let marker = encode(&striped(7, 7), ImageFormat::Png);
    std::fs::write(&cached[0], &marker).unwrap();
    let (status, _, second) = get_bytes(&app, path, Some(&admin), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        second, marker,
        "the second request is served from the cache"
    );
    assert_eq!(cached_transforms(&app), 1);
    get_bytes(&app, "/v1/storage/pics/a.png?width=20", Some(&admin), &[]).await;
    assert_eq!(cached_transforms(&app), 2);

    // Replaced: the new version's transform is made afresh, never the old one served.
    let png = encode(&striped(100, 100), ImageFormat::Png);
    put_bytes(
        &app,
        "/v1/storage/pics/a.png",
        Some(&admin),
        "image/png",
        png,
    )
    .await
    .assert_ok();
    let (_, _, fresh) = get_bytes(&app, path, Some(&admin), &[]).await;
    assert_eq!(decode(&fresh).1.height(), 50);
    assert_eq!(cached_transforms(&app), 3);

    // Sweeping the old blob takes its two transforms with it; the new one stays.
    let removed = app.state.storage.sweep().await.unwrap();
    assert_eq!(removed, 3, "the old blob and its two transforms");
    assert_eq!(cached_transforms(&app), 1);
    let (_, _, again) = get_bytes(&app, path, Some(&admin), &[]).await;
    assert_eq!(again, fresh);

    // Deleted: the transform goes at the next sweep.
    app.delete("/v1/storage/pics/a.png", Some(&admin))
        .await
        .assert_ok();
    app.state.storage.sweep().await.unwrap();
    assert_eq!(cached_transforms(&app), 0);
    app.stop().await;
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(walk_files(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

async fn transforms_follow_the_rules_of_the_original(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(
        &app,
        &admin,
        "home",
        json!({"rules": {
            "read": "auth != null && request.path.startsWith('users/' + auth.uid + '/')",
            "write": "auth != null && request.path.startsWith('users/' + auth.uid + '/')"
        }}),
    )
    .await;
    make_bucket(&app, &admin, "avatars", json!({"public": true})).await;
    let (alice, alice_token, _) = app.user("alice@example.com").await;
    let (_, bob_token, _) = app.user("bob@example.com").await;
    let png = encode(&striped(64, 32), ImageFormat::Png);
    let mine = format!("/v1/storage/home/users/{alice}/me.png");
    put_bytes(&app, &mine, Some(&alice_token), "image/png", png.clone())
        .await
        .assert_ok();
    let (status, _, _) =
        get_bytes(&app, &format!("{mine}?width=16"), Some(&alice_token), &[]).await;
    assert_eq!(status, 200);
    // Bob may not read the original, so not its transform either (and nothing is made).
    get_reply(&app, &format!("{mine}?width=8"), Some(&bob_token))
        .await
        .assert_error(403, "permission_denied");
    get_reply(&app, &format!("{mine}?width=8"), None)
        .await
        .assert_error(403, "permission_denied");
    // A refused caller learns nothing from bad parameters either: the rule comes first.
    get_reply(&app, &format!("{mine}?width=0"), Some(&bob_token))
        .await
        .assert_error(403, "permission_denied");
    // A missing object the caller could read: 404.
    get_reply(
        &app,
        &format!("/v1/storage/home/users/{alice}/none.png?width=8"),
        Some(&alice_token),
    )
    .await
    .assert_error(404, "not_found");

    // A signed GET URL lets its holder have transforms of that object.
    let signed = app
        .post(
            "/v1/storage/home/_sign",
            Some(&alice_token),
            json!({"path": format!("users/{alice}/me.png"), "expires_in": 60}),
        )
        .await;
    let url = signed.assert_ok()["url"].as_str().unwrap().to_string();
    let resp = app
        .client
        .get(format!("{url}&width=16&format=webp"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (format, image) = decode(&resp.bytes().await.unwrap());
    assert_eq!(format, ImageFormat::WebP);
    assert_eq!(image.width(), 16);

    // A public bucket: anyone.
    put_bytes(
        &app,
        "/v1/storage/avatars/a.png",
        Some(&admin),
        "image/png",
        png,
    )
    .await
    .assert_ok();
    let (status, _, body) = get_bytes(&app, "/v1/storage/avatars/a.png?height=8", None, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(decode(&body).1.height(), 8);
    app.stop().await;
}

/// CRC-32 (IEEE), to write a PNG header by hand.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid 1×1 PNG whose header is rewritten to claim `w` × `h` pixels: a few hundred bytes
/// that would need gigabytes if decoded.
fn bomb(w: u32, h: u32) -> Vec<u8> {
    let mut png = encode(&RgbImage::new(1, 1), ImageFormat::Png);
    // Signature (8), IHDR length (4), "IHDR" (4), width (4), height (4), 5 more bytes, CRC.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

async fn bombs_oversized_inputs_and_non_images_are_refused(setup: Setup) {
    let app = spawn_with(setup, |c| {
        c.storage.transform.max_input_bytes = 64 * 1024;
        c.storage.transform.max_pixels = 1_000_000;
    })
    .await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "pics", json!({})).await;
    let put = |path: &'static str, content_type: &'static str, body: Vec<u8>| {
        let app = &app;
        let admin = admin.clone();
        async move {
            put_bytes(app, path, Some(&admin), content_type, body)
                .await
                .assert_ok();
        }
    };

    // A decompression bomb: refused from its header, before decoding.
    put(
        "/v1/storage/pics/bomb.png",
        "image/png",
        bomb(50_000, 50_000),
    )
    .await;
    let message = get_reply(&app, "/v1/storage/pics/bomb.png?width=10", Some(&admin))
        .await
        .assert_error(413, "payload_too_large");
    assert!(message.contains("50000×50000"), "{message}");
    // Just past the configured pixel count: the same.
    let big = encode(&RgbImage::new(1001, 1000), ImageFormat::Png);
    assert!(big.len() < 64 * 1024);
    put("/v1/storage/pics/big.png", "image/png", big).await;
    get_reply(&app, "/v1/storage/pics/big.png?width=10", Some(&admin))
        .await
        .assert_error(413, "payload_too_large");
    // An original over max_input_bytes.
    let noisy = RgbImage::from_fn(300, 300, |x, y| {
        let v = (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503)) as u8;
        Rgb([v, v.wrapping_mul(3), v.wrapping_mul(7)])
    });
    let heavy = encode(&noisy, ImageFormat::Png);
    assert!(heavy.len() > 64 * 1024, "{}", heavy.len());
    put("/v1/storage/pics/heavy.png", "image/png", heavy).await;
    get_reply(&app, "/v1/storage/pics/heavy.png?width=10", Some(&admin))
        .await
        .assert_error(413, "payload_too_large");
    // Not images: 415, whatever the declared type.
    put("/v1/storage/pics/a.txt", "text/plain", b"hello".to_vec()).await;
    get_reply(&app, "/v1/storage/pics/a.txt?width=10", Some(&admin))
        .await
        .assert_error(415, "unsupported_media_type");
    put(
        "/v1/storage/pics/fake.png",
        "image/png",
        b"\x89PNG\r\n\x1a\nnot really".to_vec(),
    )
    .await;
    get_reply(&app, "/v1/storage/pics/fake.png?width=10", Some(&admin))
        .await
        .assert_error(415, "unsupported_media_type");
    // The originals themselves still download as they are.
    let (status, _, body) = get_bytes(&app, "/v1/storage/pics/a.txt", Some(&admin), &[]).await;
    assert_eq!((status, body.as_slice()), (200, &b"hello"[..]));
    // Nothing refused was cached.
    assert_eq!(cached_transforms(&app), 0);
    app.stop().await;
}

async fn bad_parameters_are_refused(setup: Setup) {
    let app = spawn(setup).await;
    let admin = app.admin_token().await;
    make_bucket(&app, &admin, "pics", json!({})).await;
    let png = encode(&striped(10, 10), ImageFormat::Png);
    put_bytes(
        &app,
        "/v1/storage/pics/a.png",
        Some(&admin),
        "image/png",
        png,
    )
    .await
    .assert_ok();
    for (query, field) in [
        ("width=0", "width"),
        ("width=abc", "width"),
        ("width=-5", "width"),
        ("width=1.5", "width"),
        ("width=", "width"),
        ("height=4097", "height"),
        ("width=10&fit=stretch", "fit"),
        ("width=10&format=gif", "format"),
        ("format=JPEG", "format"),
    ] {
        let reply = get_reply(
            &app,
            &format!("/v1/storage/pics/a.png?{query}"),
            Some(&admin),
        )
        .await;
        reply.assert_error(400, "invalid_argument");
        assert_eq!(
            reply.body["error"]["details"]["field"], field,
            "{query}: {}",
            reply.text
        );
    }
    app.stop().await;
}
