//! What the daemons expose: Prometheus metrics over HTTP and systemd notifications.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `GET http://127.0.0.1:PORT/metrics`: the body, or None if nothing answers.
pub fn scrape(port: u16) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    if !out.starts_with("HTTP/1.1 200") {
        return None;
    }
    out.split_once("\r\n\r\n").map(|(_, body)| body.to_string())
}

/// The value of a sample in Prometheus text format: `series` is the name with its labels as
/// printed (e.g. `walfs_archive_operations_total{op="fetch"}`); labels may appear in any order
/// after the name, so each `k="v"` in `series` must be present. Sums every match.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    let (name, labels) = match series.split_once('{') {
        Some((n, l)) => (n, l.trim_end_matches('}')),
        None => (series, ""),
    };
    let wanted: Vec<&str> = labels.split(',').filter(|l| !l.is_empty()).collect();
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match key.split_once('{') {
            Some((n, l)) => (n, l.trim_end_matches('}')),
            None => (key, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<&str> = l.split(',').collect();
        if wanted.iter().all(|w| have.contains(w)) {
            if let Ok(v) = value.parse::<f64>() {
                found = Some(found.unwrap_or(0.0) + v);
            }
        }
    }
    found
}

/// A stand-in for systemd's notification socket: pass [`NotifySocket::env`] to a daemon and
/// read what it says (`READY=1`, `STOPPING=1`, `STATUS=…`).
pub struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    pub fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket { sock, path }
    }

    pub fn env(&self) -> (String, String) {
        ("NOTIFY_SOCKET".into(), self.path.display().to_string())
    }

    /// Waits (bounded) for a message containing `what`; returns every message seen meanwhile.
    pub fn wait_for(&self, what: &str, timeout: Duration) -> Result<Vec<String>, Vec<String>> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let _ = self
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(10))));
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let hit = msg.lines().any(|l| l == what);
                    seen.push(msg);
                    if hit {
                        return Ok(seen);
                    }
                }
                Err(_) => break,
            }
        }
        Err(seen)
    }
}
