//! The `basalt` command line, run as a user would: config from the environment.

use std::process::Command;

use serde_json::json;

use crate::helpers::{spawn_app_with, Backend};

fn basalt(data_dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(args)
        .env("BASALT_DATA_DIR", data_dir)
        .env("BASALT_AUTH__ARGON2_MEMORY_KIB", "1024")
        .env("BASALT_AUTH__ARGON2_ITERATIONS", "1")
        .output()
        .expect("basalt runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_creates_admins_and_service_keys_that_the_server_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = basalt(dir.path(), &["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = basalt(
        dir.path(),
        &[
            "admin",
            "create",
            "--email",
            "cli@example.com",
            "--password",
            "cli admin pw",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = basalt(dir.path(), &["keys", "create", "deploy bot"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    let key = stdout.lines().last().unwrap().trim().to_string();
    assert!(key.starts_with("bsk_"), "{stdout}");
    let out = basalt(dir.path(), &["keys", "rotate-signing"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let data_dir = dir.path().to_path_buf();
    let app = spawn_app_with(Backend::Sqlite, move |c| c.data_dir = data_dir).await;
    app.get("/v1/admin/users", Some(&key)).await.assert_ok();
    let login = app
        .post(
            "/v1/admin/login",
            None,
            json!({"email": "cli@example.com", "password": "cli admin pw"}),
        )
        .await;
    login.assert_ok();
    assert_eq!(
        app.get("/.well-known/jwks.json", None).await.body["keys"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn invalid_config_stops_start_up_with_one_line_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(["serve"])
        .env("BASALT_DATA_DIR", dir.path())
        .env("BASALT_LISTEN", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("listen"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(["serve"])
        .env("BASALT_DATA_DIR", dir.path())
        .env("BASALT_DATABASE__URL", "mysql://nope")
        .output()
        .unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        !out.status.success() && stderr.contains("database.url"),
        "{stderr}"
    );
}

#[test]
fn serve_exits_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_basalt"))
        .args(["serve"])
        .env("BASALT_DATA_DIR", dir.path())
        .env("BASALT_LISTEN", "127.0.0.1:0")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it listens (the log says so), then ask it to stop.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("listening") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    rx.recv_timeout(std::time::Duration::from_secs(30))
        .expect("server started");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status:?}");
}
