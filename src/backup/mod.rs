//! `walfs backup`: a base backup streamed over the replication protocol (BASE_BACKUP, as
//! pg_basebackup runs it) into the archive, beside the WAL it needs.
//!
//! How one backup goes:
//! 1. IDENTIFY_SYSTEM and the server's version (15 or later: the archive stream with typed
//!    messages), segment size and cluster, checked against the archive's `walfs.json` when
//!    it has one.
//! 2. `BASE_BACKUP (…, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP, WAIT true,
//!    TARGET 'client')`: the server answers with the start position, its tablespaces, then one
//!    COPY carrying each tar archive (`base.tar`, `<oid>.tar`) and the manifest.
//! 3. Each archive is cut into chunks of `--chunk-size` as it arrives and each chunk is
//!    sealed and stored (`backups/<name>/<archive>.<NNNNNN>`, see [`crate::store::backups`]),
//!    two uploads in flight at most: memory is bounded by a few chunks whatever the size of
//!    the database, and nothing is copied to local disk.
//! 4. While the tars stream through, every member's size and checksum is computed; once the
//!    manifest arrives it must match them all ([`manifest::verify`]) and its own checksum.
//! 5. The WAL from the start to the end position, on the timelines the manifest names, must be
//!    in the archive (the server waits for its archiver before it answers, WAIT).
//! 6. Only then is `backups/<name>/backup.json` written: the record that makes the backup
//!    exist. A backup killed at any earlier point has no record and is never used.

pub mod manifest;
pub mod restore;
pub mod retain;

use crate::receive::conn::{ConnError, ConnParams, QueryEvent, ReplicationConn};
use crate::store::{Archive, Error as StoreError};
use crate::wal::{ArchiveName, Lsn, SegmentId, SegmentSize};
use bytes::{Buf, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::task::JoinSet;

/// The record's file name; its presence is what makes a backup complete.
pub const RECORD: &str = "backup.json";
/// The manifest's file name.
pub const MANIFEST: &str = "backup_manifest";

/// What `walfs backup` was asked to do.
pub struct BackupOptions {
    pub conn: ConnParams,
    /// LABEL; by default "walfs" and the time.
    pub label: Option<String>,
    /// CHECKPOINT 'fast' (else 'spread', which can take checkpoint_timeout).
    pub fast_checkpoint: bool,
    /// MAX_RATE in bytes per second (the server reads kB/s, from 32 kB/s).
    pub max_rate: Option<u64>,
    /// Plaintext bytes per stored chunk.
    pub chunk_size: usize,
    /// How long to wait for the WAL the backup needs to reach the archive.
    pub wal_timeout: Duration,
}

/// One tar archive of a backup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchiveRecord {
    /// `base.tar` or `<oid>.tar`.
    pub name: String,
    /// The tablespace's directory on the server (None: the data directory).
    pub tablespace_path: Option<String>,
    /// Plaintext bytes.
    pub bytes: u64,
    /// Stored as chunks `<name>.000000` to `<name>.<chunks - 1>`.
    pub chunks: u32,
}

/// `backups/<name>/backup.json`: a complete, checked backup.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupRecord {
    pub format: u32,
    pub name: String,
    pub label: String,
    pub system_identifier: String,
    /// server_version_num
    pub pg_version: u32,
    pub wal_segment_size: u64,
    pub start_lsn: Lsn,
    pub start_timeline: u32,
    pub end_lsn: Lsn,
    pub end_timeline: u32,
    /// RFC 3339, this host's clock.
    pub started_at: String,
    pub finished_at: String,
    pub archives: Vec<ArchiveRecord>,
    /// Plaintext bytes of every chunk but an archive's last: where any offset of an archive
    /// lies (0 in records written before it was kept).
    #[serde(default)]
    pub chunk_size: u64,
    /// Plaintext bytes of all archives.
    pub bytes: u64,
    /// Bytes stored (chunks and manifest).
    pub stored_bytes: u64,
    /// Files the manifest lists, every one checked.
    pub files: usize,
    /// The WAL the backup needs, per timeline, as its manifest lists it (a backup during
    /// which the timeline changed spans two).
    #[serde(default)]
    pub wal_ranges: Vec<WalRangeRecord>,
}

/// One timeline's part of the WAL a backup needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WalRangeRecord {
    pub timeline: u32,
    pub start: Lsn,
    pub end: Lsn,
}

impl ArchiveRecord {
    /// The name of chunk `i`.
    pub fn chunk_file(&self, i: u32) -> String {
        format!("{}.{i:06}", self.name)
    }

    /// The plaintext length of chunk `i`: `chunk_size` for every chunk but the last, which
    /// holds the rest (None when the record does not know its chunk size).
    pub fn chunk_len(&self, i: u32, chunk_size: u64) -> Option<u64> {
        (chunk_size > 0).then(|| {
            if i + 1 < self.chunks {
                chunk_size
            } else {
                self.bytes
                    .saturating_sub(chunk_size * u64::from(self.chunks.saturating_sub(1)))
            }
        })
    }
}

impl BackupRecord {
    /// Every object the record promises: each archive's chunks and the manifest.
    pub fn objects(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .archives
            .iter()
            .flat_map(|a| (0..a.chunks).map(move |i| a.chunk_file(i)))
            .collect();
        v.push(MANIFEST.to_string());
        v
    }

    /// The first object the record promises that `objects` lacks.
    pub fn first_missing(&self, objects: &crate::store::backups::BackupObjects) -> Option<String> {
        self.objects()
            .into_iter()
            .find(|f| !objects.files.contains_key(f))
    }

    /// The WAL needed to restore it: every segment from the start to the end position, on
    /// the timelines its manifest names.
    pub fn wal_needed(&self) -> Result<Vec<ArchiveName>, String> {
        let size = SegmentSize::new(self.wal_segment_size).map_err(|e| e.to_string())?;
        let ranges = if self.wal_ranges.is_empty() {
            vec![WalRangeRecord {
                timeline: self.end_timeline,
                start: self.start_lsn,
                end: self.end_lsn,
            }]
        } else {
            self.wal_ranges.clone()
        };
        let mut out = Vec::new();
        for r in ranges {
            let first = size.segno(r.start);
            let last = size.segno(Lsn(r.end.0.saturating_sub(1).max(r.start.0)));
            for segno in first..=last {
                let id = SegmentId {
                    timeline: r.timeline,
                    segno,
                };
                out.push(ArchiveName::parse(&id.file_name(size)).map_err(|e| e.to_string())?);
            }
        }
        Ok(out)
    }

    /// The backup history file the server archives when the backup ends.
    pub fn history_file(&self) -> Result<ArchiveName, String> {
        let size = SegmentSize::new(self.wal_segment_size).map_err(|e| e.to_string())?;
        let id = SegmentId {
            timeline: self.start_timeline,
            segno: size.segno(self.start_lsn),
        };
        ArchiveName::parse(&format!(
            "{}.{:08X}.backup",
            id.file_name(size),
            self.start_lsn.0 % size.bytes()
        ))
        .map_err(|e| e.to_string())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Conn(#[from] ConnError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("the backup does not match its manifest: {0}")]
    Manifest(#[from] manifest::ManifestError),
    #[error("{0}")]
    Protocol(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    WalMissing(String),
    /// The archive's objects of a backup are damaged or missing.
    #[error("{0}")]
    Damaged(String),
}

fn protocol(what: impl Into<String>) -> BackupError {
    BackupError::Protocol(what.into())
}

/// Progress, as the server reports it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub done: u64,
    /// The server's estimate (PROGRESS), when it gave one.
    pub total: Option<u64>,
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn first_value(rows: &[Vec<Option<String>>], what: &str) -> Result<String, BackupError> {
    rows.first()
        .and_then(|r| r.first().cloned().flatten())
        .ok_or_else(|| protocol(format!("{what}: no value in the server's answer")))
}

/// (LSN, timeline) of a result set such as BASE_BACKUP's start and end.
fn position(rows: &[Vec<Option<String>>], what: &str) -> Result<(Lsn, u32), BackupError> {
    let lsn = first_value(rows, what)?
        .parse()
        .map_err(|_| protocol(format!("{what} is not an LSN")))?;
    let tli = rows
        .first()
        .and_then(|r| r.get(1).cloned().flatten())
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| protocol(format!("{what}: no timeline")))?;
    Ok((lsn, tli))
}

/// An archive being received: its chunks go to the store as they fill.
struct ArchiveWriter {
    record: ArchiveRecord,
    buf: BytesMut,
    checker: manifest::TarChecker,
}

struct Run {
    archive: Arc<Archive>,
    name: String,
    chunk_size: usize,
    uploads: JoinSet<Result<u64, StoreError>>,
    stored_bytes: u64,
}

impl Run {
    /// Starts storing one chunk; waits first while two are in flight.
    async fn upload(&mut self, file: String, data: Bytes) -> Result<(), BackupError> {
        while self.uploads.len() >= 2 {
            self.join_one().await?;
        }
        let archive = self.archive.clone();
        let backup = self.name.clone();
        self.uploads
            .spawn(async move { archive.put_backup_file(&backup, &file, data).await });
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), BackupError> {
        match self.uploads.join_next().await {
            Some(Ok(r)) => {
                self.stored_bytes += r?;
                Ok(())
            }
            Some(Err(e)) => Err(protocol(format!("an upload task failed: {e}"))),
            None => Ok(()),
        }
    }

    async fn join_all(&mut self) -> Result<(), BackupError> {
        while !self.uploads.is_empty() {
            self.join_one().await?;
        }
        Ok(())
    }

    async fn write(&mut self, w: &mut ArchiveWriter, data: &[u8]) -> Result<(), BackupError> {
        w.checker.update(data)?;
        w.buf.extend_from_slice(data);
        w.record.bytes += data.len() as u64;
        while w.buf.len() >= self.chunk_size {
            let chunk = w.buf.split_to(self.chunk_size).freeze();
            let file = w.record.chunk_file(w.record.chunks);
            w.record.chunks += 1;
            self.upload(file, chunk).await?;
        }
        Ok(())
    }

    async fn finish(
        &mut self,
        mut w: ArchiveWriter,
        files: &mut Vec<manifest::TarFile>,
    ) -> Result<ArchiveRecord, BackupError> {
        if !w.buf.is_empty() || w.record.chunks == 0 {
            let chunk = w.buf.split().freeze();
            let file = w.record.chunk_file(w.record.chunks);
            w.record.chunks += 1;
            self.upload(file, chunk).await?;
        }
        files.extend(w.checker.finish()?);
        Ok(w.record)
    }
}

/// A free backup name: `base_<segment of the start>`, with `_N` when that is taken.
async fn free_name(archive: &Archive, base: &str) -> Result<String, BackupError> {
    let taken = archive.backup_objects().await?;
    if !taken.contains_key(base) {
        return Ok(base.to_string());
    }
    (1..1000)
        .map(|n| format!("{base}_{n}"))
        .find(|n| !taken.contains_key(n))
        .ok_or_else(|| BackupError::Refused(format!("no free backup name after {base}")))
}

fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// Takes one base backup into `archive`. `progress` is called as the server reports it.
pub async fn take(
    archive: Arc<Archive>,
    opts: &BackupOptions,
    progress: impl Fn(Progress),
) -> Result<BackupRecord, BackupError> {
    let started_at = now_rfc3339();
    let mut conn = ReplicationConn::connect(&opts.conn, Duration::from_secs(30)).await?;
    let ident = conn.query("IDENTIFY_SYSTEM").await?;
    let system_identifier = first_value(&ident, "IDENTIFY_SYSTEM")?;
    let version: u32 = first_value(&conn.query("SHOW server_version_num").await?, "version")?
        .parse()
        .map_err(|_| protocol("server_version_num is not a number"))?;
    if version < 150000 {
        return Err(BackupError::Refused(format!(
            "walfs backup needs PostgreSQL 15 or later; the server runs {}.{}",
            version / 10000,
            version % 10000
        )));
    }
    let seg_text = first_value(&conn.query("SHOW wal_segment_size").await?, "segment size")?;
    let wal_segment_size = crate::receive::parse_pg_size(&seg_text)
        .ok_or_else(|| protocol(format!("wal_segment_size {seg_text:?}")))?;
    let size = SegmentSize::new(wal_segment_size).map_err(|e| protocol(e.to_string()))?;
    check_identity(&archive, &system_identifier, wal_segment_size).await?;

    let label = opts
        .label
        .clone()
        .unwrap_or_else(|| format!("walfs {started_at}"));
    let mut command = format!(
        "BASE_BACKUP (LABEL {}, PROGRESS, CHECKPOINT '{}', WAIT true, MANIFEST 'yes', \
         MANIFEST_CHECKSUMS 'CRC32C', TABLESPACE_MAP, TARGET 'client'",
        quote_literal(&label),
        if opts.fast_checkpoint {
            "fast"
        } else {
            "spread"
        }
    );
    if let Some(rate) = opts.max_rate {
        command.push_str(&format!(
            ", MAX_RATE {}",
            (rate / 1024).clamp(32, 1_048_576)
        ));
    }
    command.push(')');
    conn.send_query(&command).await?;

    // Result set 1: where the backup starts.
    let start = match conn.next_event().await? {
        QueryEvent::Rows(r) => r,
        e => {
            return Err(protocol(format!(
                "BASE_BACKUP: expected the start position, got {e:?}"
            )))
        }
    };
    let (start_lsn, start_timeline) = position(&start, "the start position")?;
    // Result set 2: the tablespaces (the data directory last, with no oid), sizes in kB.
    let spaces = match conn.next_event().await? {
        QueryEvent::Rows(r) => r,
        e => {
            return Err(protocol(format!(
                "BASE_BACKUP: expected the tablespaces, got {e:?}"
            )))
        }
    };
    let total: u64 = spaces
        .iter()
        .filter_map(|r| r.get(2).cloned().flatten())
        .filter_map(|k| k.parse::<u64>().ok())
        .sum::<u64>()
        * 1024;
    let segment = SegmentId {
        timeline: start_timeline,
        segno: size.segno(start_lsn),
    };
    let name = free_name(&archive, &format!("base_{}", segment.file_name(size))).await?;
    tracing::info!(backup = %name, start = %start_lsn, timeline = start_timeline, "backup started");

    let mut run = Run {
        archive: archive.clone(),
        name: name.clone(),
        chunk_size: opts.chunk_size.max(1),
        uploads: JoinSet::new(),
        stored_bytes: 0,
    };
    let mut current: Option<ArchiveWriter> = None;
    let mut archives = Vec::new();
    let mut files = Vec::new();
    let mut manifest_bytes: Option<BytesMut> = None;
    let mut last_report = Instant::now();
    // Tar bytes received, and the progress shown: the larger of that and the server's count
    // (never moving back).
    let (mut received, mut streamed) = (0u64, 0u64);
    match conn.next_event().await? {
        QueryEvent::CopyStart => {}
        e => {
            return Err(protocol(format!(
                "BASE_BACKUP: expected the archive stream, got {e:?}"
            )))
        }
    }
    loop {
        let mut data = match conn.next_event().await? {
            QueryEvent::Data(d) => d,
            QueryEvent::CopyDone => break,
            e => {
                return Err(protocol(format!(
                    "BASE_BACKUP: unexpected {e:?} in the archive stream"
                )))
            }
        };
        if data.is_empty() {
            return Err(protocol("empty message in the archive stream"));
        }
        match data.get_u8() {
            b'n' => {
                if manifest_bytes.is_some() {
                    return Err(protocol("an archive after the manifest"));
                }
                if let Some(w) = current.take() {
                    archives.push(run.finish(w, &mut files).await?);
                }
                let mut parts = data.split(|b| *b == 0);
                let archive_name =
                    String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                let path = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                if !crate::store::backups::valid_name(&archive_name) {
                    return Err(protocol(format!("archive name {archive_name:?}")));
                }
                current = Some(ArchiveWriter {
                    checker: manifest::TarChecker::new(&archive_name)?,
                    record: ArchiveRecord {
                        name: archive_name,
                        tablespace_path: (!path.is_empty()).then_some(path),
                        bytes: 0,
                        chunks: 0,
                    },
                    buf: BytesMut::new(),
                });
            }
            b'd' => match (&mut manifest_bytes, current.as_mut()) {
                (Some(m), _) => m.extend_from_slice(&data),
                (None, Some(w)) => {
                    run.write(w, &data).await?;
                    // The server's own progress messages come about once a second.
                    received += data.len() as u64;
                    streamed = streamed.max(received);
                    progress(Progress {
                        done: streamed,
                        total: (total > 0).then_some(total),
                    });
                }
                (None, None) => return Err(protocol("archive data before any archive began")),
            },
            b'p' => {
                if data.len() >= 8 {
                    streamed = streamed.max(data.get_u64());
                    let done = streamed;
                    progress(Progress {
                        done,
                        total: (total > 0).then_some(total),
                    });
                    if last_report.elapsed() >= Duration::from_secs(10) {
                        last_report = Instant::now();
                        tracing::info!(backup = %name, done_bytes = done, total_bytes = total, "backup progress");
                    }
                }
            }
            b'm' => {
                if let Some(w) = current.take() {
                    archives.push(run.finish(w, &mut files).await?);
                }
                manifest_bytes = Some(BytesMut::new());
            }
            t => {
                return Err(protocol(format!(
                    "unknown archive stream message {:?}",
                    t as char
                )))
            }
        }
    }
    if let Some(w) = current.take() {
        archives.push(run.finish(w, &mut files).await?);
    }
    // Result set 3: where it ends; then the command's own completion.
    let end = match conn.next_event().await? {
        QueryEvent::Rows(r) => r,
        e => {
            return Err(protocol(format!(
                "BASE_BACKUP: expected the end position, got {e:?}"
            )))
        }
    };
    let (end_lsn, end_timeline) = position(&end, "the end position")?;
    loop {
        match conn.next_event().await? {
            QueryEvent::Ready => break,
            QueryEvent::Rows(_) => {}
            e => {
                return Err(protocol(format!(
                    "BASE_BACKUP: unexpected {e:?} at the end"
                )))
            }
        }
    }
    run.join_all().await?;

    let manifest_bytes = manifest_bytes
        .ok_or_else(|| protocol("the server sent no backup manifest"))?
        .freeze();
    let manifest = manifest::Manifest::parse(&manifest_bytes)?;
    let checked = manifest::verify(&manifest, &files)?;
    // WAL-Ranges run from the end timeline back to the start's: the last begins at the start.
    match manifest.wal_ranges.last() {
        Some(r) if r.start == start_lsn && r.timeline == start_timeline => {}
        _ => {
            return Err(protocol(format!(
                "the manifest's WAL ranges do not begin at the backup's start {start_lsn}"
            )))
        }
    }
    run.stored_bytes += archive
        .put_backup_file(&name, MANIFEST, manifest_bytes)
        .await?;

    let record = BackupRecord {
        format: 1,
        name: name.clone(),
        label,
        system_identifier,
        pg_version: version,
        wal_segment_size,
        start_lsn,
        start_timeline,
        end_lsn,
        end_timeline,
        started_at,
        finished_at: now_rfc3339(),
        bytes: archives.iter().map(|a| a.bytes).sum(),
        archives,
        chunk_size: run.chunk_size as u64,
        stored_bytes: run.stored_bytes,
        files: checked,
        wal_ranges: manifest
            .wal_ranges
            .iter()
            .map(|r| WalRangeRecord {
                timeline: r.timeline,
                start: r.start,
                end: r.end,
            })
            .collect(),
    };
    // The WAL it needs, in this archive: the server waited for its archiver, which may
    // archive elsewhere.
    check_identity(&archive, &record.system_identifier, wal_segment_size).await?;
    wait_for_wal(&archive, &record, opts.wal_timeout).await?;
    // Everything is still there (nothing deleted it while the backup ran) before the
    // record says so.
    let stored = archive.backup_objects().await?;
    if let Some(m) = stored
        .get(&name)
        .and_then(|o| record.first_missing(o))
        .or_else(|| (!stored.contains_key(&name)).then(|| MANIFEST.to_string()))
    {
        return Err(BackupError::Damaged(format!(
            "{name}/{m} is gone from the archive although it was stored (deleted while the \
             backup ran?): the backup is not marked complete"
        )));
    }
    let body = serde_json::to_vec_pretty(&record).map_err(|e| protocol(e.to_string()))?;
    archive
        .put_backup_file(&name, RECORD, Bytes::from(body))
        .await?;
    tracing::info!(backup = %name, end = %end_lsn, bytes = record.bytes, stored = record.stored_bytes, files = checked, "backup complete");
    Ok(record)
}

/// The server is the archive's cluster (when the archive knows its cluster yet).
async fn check_identity(archive: &Archive, sysid: &str, seg: u64) -> Result<(), BackupError> {
    if let Some(id) = archive.identity().await? {
        if id.system_identifier != sysid || id.wal_segment_size != seg {
            return Err(BackupError::Refused(format!(
                "the server is cluster {sysid} (segment size {seg}), the archive {} holds \
                 cluster {} (segment size {})",
                archive.url(),
                id.system_identifier,
                id.wal_segment_size
            )));
        }
    }
    Ok(())
}

/// Which of the files a backup needs are not in the archive.
pub async fn missing_wal(
    archive: &Archive,
    record: &BackupRecord,
) -> Result<Vec<ArchiveName>, BackupError> {
    // The `.backup` file is not needed (backup_label is in base.tar), and a standby writes
    // none: only the segments count.
    let need = record.wal_needed().map_err(protocol)?;
    let mut missing = Vec::new();
    for name in need {
        if archive.header(&name).await?.is_none() {
            missing.push(name);
        }
    }
    Ok(missing)
}

async fn wait_for_wal(
    archive: &Archive,
    record: &BackupRecord,
    timeout: Duration,
) -> Result<(), BackupError> {
    let began = Instant::now();
    loop {
        let missing = missing_wal(archive, record).await?;
        let Some(first) = missing.first() else {
            if let Ok(h) = record.history_file() {
                if archive.header(&h).await?.is_none() {
                    tracing::info!(backup = %record.name, file = %h,
                        "no backup history file in the archive (a backup of a standby writes none)");
                }
            }
            return Ok(());
        };
        if began.elapsed() >= timeout {
            return Err(BackupError::WalMissing(format!(
                "the WAL backup {} needs is not in the archive {} after {}: {} of its files \
                 missing, the first {first}; is archive_command archiving into this archive? \
                 The backup is not marked complete",
                record.name,
                archive.url(),
                humantime::format_duration(timeout),
                missing.len()
            )));
        }
        tracing::info!(backup = %record.name, missing = %first, "waiting for the WAL the backup needs to be archived");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A backup as listed: its record when complete.
#[derive(Clone, Debug, Serialize)]
pub struct Listed {
    pub name: String,
    pub complete: bool,
    /// Why its record does not open, when it does not: never used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub damaged: Option<String>,
    pub stored_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<BackupRecord>,
    /// Files the backup needs that the archive lacks (complete backups only).
    pub missing_wal: Vec<String>,
}

/// The record of backup `name`, authenticated; None when it has none.
pub async fn read_record(
    archive: &Archive,
    name: &str,
) -> Result<Option<BackupRecord>, BackupError> {
    let Some(bytes) = archive.get_backup_file(name, RECORD, None).await? else {
        return Ok(None);
    };
    let r: BackupRecord =
        serde_json::from_slice(&bytes).map_err(|e| protocol(format!("{name}/{RECORD}: {e}")))?;
    if r.name != name {
        return Err(protocol(format!("{name}/{RECORD} names backup {}", r.name)));
    }
    Ok(Some(r))
}

/// When the newest complete backup finished (Unix seconds), or None when there is none. Reads
/// the records only (one small object each), not the WAL they need.
pub async fn newest_finished(archive: &Archive) -> Result<Option<i64>, BackupError> {
    let mut newest = None;
    for (name, objects) in archive.backup_objects().await? {
        if !objects.files.contains_key(RECORD) {
            continue;
        }
        if let Some(r) = read_record(archive, &name).await? {
            let t = humantime::parse_rfc3339_weak(r.finished_at.trim_end_matches('Z'))
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs() as i64);
            newest = newest.max(t);
        }
    }
    Ok(newest)
}

/// Every backup in the archive, oldest first; incomplete ones say so.
pub async fn list(archive: &Archive) -> Result<Vec<Listed>, BackupError> {
    let mut out = list_records(archive).await?;
    for l in &mut out {
        if let Some(r) = &l.record {
            l.missing_wal = missing_wal(archive, r)
                .await?
                .iter()
                .map(|n| n.to_string())
                .collect();
        }
    }
    Ok(out)
}

/// Every backup in the archive with its record when complete (every object it lists
/// present), oldest first, without checking the WAL they need.
pub async fn list_records(archive: &Archive) -> Result<Vec<Listed>, BackupError> {
    let mut out = Vec::new();
    for (name, objects) in archive.backup_objects().await? {
        let mut damaged = None;
        let record = if objects.files.contains_key(RECORD) {
            match read_record(archive, &name).await {
                // A record whose chunks are not all there is damage too.
                Ok(Some(r)) => match r.first_missing(&objects) {
                    Some(m) => {
                        damaged = Some(format!("{name}/{m}, which its record lists, is missing"));
                        None
                    }
                    None => Some(r),
                },
                Ok(None) => None,
                // A record that does not open is damage: that backup is not usable, the
                // others still are.
                Err(BackupError::Store(e)) if e.class() == crate::store::Class::Damaged => {
                    damaged = Some(e.to_string());
                    None
                }
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        out.push(Listed {
            name,
            damaged,
            complete: record.is_some(),
            stored_bytes: objects.stored_bytes(),
            record,
            missing_wal: Vec::new(),
        });
    }
    out.sort_by(|a, b| {
        let key = |l: &Listed| l.record.as_ref().map(|r| (r.end_timeline, r.end_lsn));
        key(a).cmp(&key(b)).then(a.name.cmp(&b.name))
    });
    Ok(out)
}
