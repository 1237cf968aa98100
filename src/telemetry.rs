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
    ENABLED.store(true, Ordering::Relaxed);
    Ok(())
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
        "When this process last archived a segment (Unix time)"
    );
    describe_gauge!(
        "walfs_archive_newest_segment_age_seconds",
        Unit::Seconds,
        "Seconds since this process last archived a segment"
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
    describe_gauge!(
        "walfs_read_stall_seconds",
        Unit::Seconds,
        "Total time readers waited for segment loads since start"
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
