//! What the daemons tell the outside: Prometheus metrics on `--metrics-addr`, and a state file
//! (`<cache-dir>/<archive id>/{stats,receive}.json`) that `walfs status` reads.
//!
//! Hot paths count into atomics they own (cache `Stats`, receiver `Progress`) or call the
//! `metrics` macros (no-ops until a recorder is installed); a one-second tick of each daemon
//! copies the atomics into metrics and rewrites its state file.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, now.
pub fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Whether `/metrics` is served: the per-request FUSE counters cost nothing otherwise.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Starts the `/metrics` listener (inside the current tokio runtime) and describes every metric.
pub fn serve_metrics(addr: SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("--metrics-addr {addr}: {e}"))?;
    describe();
    zero_series();
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Puts the labelled series alerts watch in place at 0 from the start: a counter that first
/// appears at 1 has no increase to alert on, and a gauge that is absent cannot cross a line.
fn zero_series() {
    for op in ["push", "fetch"] {
        counter!("walfs_archive_operations_total", "op" => op).absolute(0);
        for kind in [
            "config", "refused", "conflict", "damaged", "backend", "local",
        ] {
            counter!("walfs_archive_errors_total", "op" => op, "kind" => kind).absolute(0);
        }
    }
    for role in ["recovery", "standby", "other", "unknown"] {
        for outcome in ["failed", "stopped", "interrupted"] {
            counter!("walfs_restore_refusals_total", "role" => role, "outcome" => outcome)
                .absolute(0);
        }
    }
    gauge!("walfs_restores_waiting").set(0.0);
}

/// Notes when the newest segment already in the archive was stored (Unix seconds), read at
/// start, so the archive's age is known before this process archives anything.
pub fn note_newest_archived(t: f64) {
    let ms = (t * 1000.0) as u64;
    if LAST_PUSH_MS.fetch_max(ms, Ordering::Relaxed) < ms {
        gauge!("walfs_archive_last_push_timestamp_seconds").set(t);
    }
    tick();
}

/// Reads when the newest segment in `archive` was stored (one listing, in the background) and
/// notes it ([`note_newest_archived`]).
pub async fn read_newest_archived(archive: &crate::store::Archive) {
    use futures::TryStreamExt;
    let newest = archive
        .list(None)
        .try_fold(0i64, |m, e| async move {
            Ok(if e.name.kind() == crate::wal::FileKind::Segment {
                m.max(e.last_modified)
            } else {
                m
            })
        })
        .await;
    match newest {
        Ok(0) => {}
        Ok(t) => note_newest_archived(t as f64),
        Err(e) => tracing::warn!(error = %e, "reading the archive's newest segment failed"),
    }
}

fn describe() {
    describe_counter!(
        "walfs_archive_operations_total",
        "Archive operations by op (push, fetch)"
    );
    describe_counter!(
        "walfs_archive_errors_total",
        "Failed archive operations by op and kind (backend, damaged, conflict, refused, local)"
    );
    describe_counter!(
        "walfs_archive_plain_bytes_total",
        Unit::Bytes,
        "WAL bytes archived (push) or restored (fetch)"
    );
    describe_counter!(
        "walfs_archive_stored_bytes_total",
        Unit::Bytes,
        "Bytes sent to (push) or read from (fetch) the object store"
    );
    describe_histogram!(
        "walfs_archive_operation_seconds",
        Unit::Seconds,
        "Duration of archive operations by op, retries included"
    );
    describe_gauge!(
        "walfs_archive_last_push_timestamp_seconds",
        Unit::Seconds,
        "When this process last archived a segment, or when the newest segment in the archive \
         was stored, whichever is later (Unix time)"
    );
    describe_gauge!(
        "walfs_archive_newest_segment_age_seconds",
        Unit::Seconds,
        "Seconds since walfs_archive_last_push_timestamp_seconds"
    );
    describe_gauge!(
        "walfs_backup_last_success_timestamp_seconds",
        Unit::Seconds,
        "When the newest complete base backup in the archive finished (Unix time; read every 5 min)"
    );
    describe_gauge!(
        "walfs_backup_streamed_bytes",
        Unit::Bytes,
        "A running walfs backup: bytes received from the server so far"
    );
    describe_gauge!(
        "walfs_backup_expected_bytes",
        Unit::Bytes,
        "A running walfs backup: the server's estimate of the database size"
    );
    describe_gauge!(
        "walfs_backup_newest_age_seconds",
        Unit::Seconds,
        "Seconds since the newest complete base backup in the archive finished"
    );
    describe_counter!(
        "walfs_mount_requests_total",
        "Filesystem requests served by the mount, by op"
    );
    describe_counter!(
        "walfs_mount_read_bytes_total",
        Unit::Bytes,
        "Bytes read through the mount (reads the kernel serves by passthrough are not seen)"
    );
    describe_counter!(
        "walfs_mount_written_bytes_total",
        Unit::Bytes,
        "Bytes written into the mount (archive_command)"
    );
    describe_counter!("walfs_segment_opens_total", "Segments opened for reading");
    describe_counter!(
        "walfs_cache_hits_total",
        "Segment opens served from the cache or a finished read-ahead"
    );
    describe_counter!(
        "walfs_cache_joined_total",
        "Segment opens that waited for a read-ahead still loading"
    );
    describe_counter!(
        "walfs_cache_misses_total",
        "Segment opens loaded on demand from the archive"
    );
    describe_counter!(
        "walfs_prefetch_segments_total",
        "Segments loaded ahead of the reader"
    );
    describe_counter!(
        "walfs_prefetch_wasted_total",
        "Segments loaded ahead and dropped unread"
    );
    describe_counter!(
        "walfs_read_stall_milliseconds_total",
        Unit::Milliseconds,
        "Time readers waited for segment loads"
    );
    describe_gauge!(
        "walfs_cache_bytes",
        Unit::Bytes,
        "Plaintext bytes in the local cache"
    );
    describe_gauge!("walfs_cache_files", "Files in the local cache");
    describe_gauge!(
        "walfs_receive_connected",
        "1 while streaming from the server"
    );
    describe_gauge!("walfs_receive_timeline", "Timeline being received");
    describe_gauge!(
        "walfs_receive_flushed_lsn",
        "Position received and fsynced (WAL byte position)"
    );
    describe_gauge!(
        "walfs_receive_server_lsn",
        "The server's WAL end as last reported (WAL byte position)"
    );
    describe_gauge!(
        "walfs_receive_lag_bytes",
        Unit::Bytes,
        "Server WAL end minus the flushed position"
    );
    describe_gauge!(
        "walfs_receive_last_flush_age_seconds",
        Unit::Seconds,
        "Seconds since the flushed position last moved"
    );
    describe_counter!(
        "walfs_receive_wal_bytes_total",
        Unit::Bytes,
        "WAL bytes received"
    );
    describe_counter!(
        "walfs_receive_reconnects_total",
        "Times streaming stopped and was restarted"
    );
    describe_gauge!(
        "walfs_upload_queue_files",
        "Completed files in the spool waiting for upload"
    );
    describe_gauge!(
        "walfs_spool_bytes",
        Unit::Bytes,
        "Bytes of completed files in the spool waiting for upload"
    );
}

/// Counts one archive operation, its plaintext bytes and duration.
pub fn archive_op(op: &'static str, seconds: f64, plain: u64) {
    counter!("walfs_archive_operations_total", "op" => op).increment(1);
    counter!("walfs_archive_plain_bytes_total", "op" => op).increment(plain);
    metrics::histogram!("walfs_archive_operation_seconds", "op" => op).record(seconds);
    if op == "push" {
        let now = now_secs();
        LAST_PUSH_MS.store((now * 1000.0) as u64, Ordering::Relaxed);
        gauge!("walfs_archive_last_push_timestamp_seconds").set(now);
    }
}

/// When this process last archived a file (Unix milliseconds; 0: never).
static LAST_PUSH_MS: AtomicU64 = AtomicU64::new(0);

/// When this process last archived a file (Unix seconds).
pub fn last_push() -> Option<f64> {
    match LAST_PUSH_MS.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(ms as f64 / 1000.0),
    }
}

/// Counts bytes moved to or from the object store.
pub fn archive_stored(op: &'static str, bytes: u64) {
    counter!("walfs_archive_stored_bytes_total", "op" => op).increment(bytes);
}

/// Counts one failed archive operation.
pub fn archive_error(op: &'static str, kind: &'static str) {
    counter!("walfs_archive_errors_total", "op" => op, "kind" => kind).increment(1);
}

/// Counts one request the mount served (a relaxed load and nothing else without `/metrics`).
pub fn mount_request(op: &'static str) {
    if ENABLED.load(Ordering::Relaxed) {
        counter!("walfs_mount_requests_total", "op" => op).increment(1);
    }
}

pub fn mount_read(bytes: usize) {
    if ENABLED.load(Ordering::Relaxed) {
        counter!("walfs_mount_read_bytes_total").increment(bytes as u64);
    }
}

pub fn mount_written(bytes: usize) {
    if ENABLED.load(Ordering::Relaxed) {
        counter!("walfs_mount_written_bytes_total").increment(bytes as u64);
    }
}

/// Sets a counter that an atomic elsewhere keeps.
pub fn set_counter(name: &'static str, value: u64) {
    counter!(name).absolute(value);
}

pub fn set_gauge(name: &'static str, value: f64) {
    gauge!(name).set(value);
}

/// Refreshes the age gauge from the last push time (called by each daemon's tick).
pub fn tick() {
    if let Some(t) = last_push() {
        gauge!("walfs_archive_newest_segment_age_seconds").set((now_secs() - t).max(0.0));
    }
}

/// Writes a daemon's state file atomically (temp file + rename).
pub fn write_state(path: &Path, value: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(value).unwrap_or_default())?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    /// Every `walfs_…` word in `text` (a histogram's `_bucket`, `_sum`, `_count` trimmed).
    fn metric_words(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut rest = text;
        while let Some(at) = rest.find("walfs_") {
            let word: String = rest[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            rest = &rest[at + word.len()..];
            let word = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| word.strip_suffix(s))
                .map_or(word.clone(), str::to_string);
            out.insert(word);
        }
        out
    }

    fn sources(dir: &Path, into: &mut String) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                sources(&p, into);
            } else if p.extension().is_some_and(|x| x == "rs") {
                into.push_str(&std::fs::read_to_string(&p).unwrap());
            }
        }
    }

    /// The dashboard and the alerts name only metrics walfs has: a renamed metric or a typo
    /// would leave a panel empty and an alert silent for ever.
    #[test]
    fn dashboards_and_alerts_name_real_metrics() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut code = String::new();
        sources(&root.join("src"), &mut code);
        // Names as the code spells them, in a string literal.
        let known: BTreeSet<String> = metric_words(&code)
            .into_iter()
            .filter(|m| code.contains(&format!("\"{m}\"")))
            .collect();
        assert!(known.contains("walfs_archive_errors_total"), "{known:?}");
        for file in [
            "walfs-alerts.yml",
            "walfs-alerts.test.yml",
            "walfs-dashboard.json",
        ] {
            let text =
                std::fs::read_to_string(root.join("packaging/monitoring").join(file)).unwrap();
            let used = metric_words(&text);
            assert!(!used.is_empty(), "{file} names no metric");
            let unknown: Vec<_> = used.difference(&known).collect();
            assert!(
                unknown.is_empty(),
                "{file} names metrics walfs does not have: {unknown:?}"
            );
        }
        let dash: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join("packaging/monitoring/walfs-dashboard.json"))
                .unwrap(),
        )
        .unwrap();
        assert!(dash["panels"].as_array().is_some_and(|p| p.len() > 8));
    }
}
