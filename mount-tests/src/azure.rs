//! A real Azure Blob protocol server: Azurite (the emulator Microsoft publishes on npm), blob
//! service only, on 127.0.0.1, telemetry off. `.ci/setup` installs it under
//! `/opt/walfs-test/azurite` and the Python Azure SDK (to create containers) in the test venv.

use crate::{file_tail, free_port, poll_until, scratch_dir, ServerProcess, TempDir};
use std::fs;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Default location of Azurite's blob server, installed by `.ci/setup`.
pub const AZURITE_BLOB: &str = "/opt/walfs-test/azurite/node_modules/.bin/azurite-blob";
/// The emulator's well-known development account and key (public, in Azure's documentation).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The test venv's Python, which has `azure-storage-blob`.
const VENV_PYTHON: &str = "/opt/walfs-test/venv/bin/python";

pub struct AzuriteServer {
    process: ServerProcess,
    port: u16,
    _dir: TempDir,
}

impl AzuriteServer {
    /// Starts Azurite's blob service on a free port of 127.0.0.1 and waits (at most 60 s) until it
    /// accepts connections. Panics with "run .ci/setup" if it is not installed.
    pub fn start() -> AzuriteServer {
        let bin = std::env::var_os("WALFS_AZURITE_BLOB")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(AZURITE_BLOB));
        if !bin.exists() {
            panic!(
                "Azurite not found at {}: run .ci/setup (or set WALFS_AZURITE_BLOB)",
                bin.display()
            );
        }
        let dir = scratch_dir("azurite");
        let log = dir.path().join("azurite.log");
        let mut last = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let logf = fs::File::create(&log).expect("create azurite log");
            let mut child = Command::new(&bin)
                .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                .arg("--location")
                .arg(dir.path().join("data"))
                .args(["--disableTelemetry", "--skipApiVersionCheck", "--loose"])
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
                return AzuriteServer {
                    process: ServerProcess::new(child, log),
                    port,
                    _dir: dir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
            last = file_tail(&log, 20);
        }
        panic!("could not start Azurite:\n{last}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Environment for object_store's `MicrosoftAzureBuilder::from_env` to use this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR".into(), "true".into()),
            ("AZURITE_BLOB_STORAGE_URL".into(), self.endpoint()),
        ]
    }

    /// Creates a container (with the Python Azure SDK in the test venv).
    pub fn create_container(&self, name: &str) {
        let conn = format!(
            "DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};\
             BlobEndpoint={}/{AZURITE_ACCOUNT};",
            self.endpoint()
        );
        let script = "import sys\nfrom azure.storage.blob import BlobServiceClient\n\
                      BlobServiceClient.from_connection_string(sys.argv[1]).create_container(sys.argv[2])\n";
        let out = Command::new(VENV_PYTHON)
            .args(["-c", script, &conn, name])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{VENV_PYTHON}: {e}: run .ci/setup"));
        assert!(
            out.status.success(),
            "creating container {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Kills the Azurite child (by its PID) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        self.process.stop()
    }
}
