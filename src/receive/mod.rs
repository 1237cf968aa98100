//! `walfs receive`: streams WAL over the replication protocol into a durable spool, the way
//! pg_receivewal does, and uploads completed files to the archive.
//!
//! Spool layout, under `<cache-dir>/<archive id>/spool/`:
//! - `current/<segment>.partial`: the segment being received, full size, written at its
//!   offsets; fsynced before any flush position that covers it is reported to the server.
//! - `ready/<name>`: complete segments, history files, and a timeline's last `.partial`,
//!   moved here by a durable rename (file and both directories fsynced); each leaves only
//!   after the archive confirmed its upload.
//!
//! On (re)start, streaming resumes at the start of the newest `.partial` segment, else after
//! the newest complete segment in the spool or the archive, else at the slot's restart_lsn,
//! else at the server's current position: never a gap.

pub mod conn;
pub mod conninfo;
pub mod tls;

use crate::store::{Archive, Error as StoreError};
use crate::wal::{ArchiveName, FileKind, Lsn, SegmentId, SegmentSize};
use bytes::Bytes;
use conn::{ConnError, ConnParams, ReplMessage, ReplicationConn};
use futures::TryStreamExt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

#[derive(Clone, Debug)]
pub struct ReceiveOptions {
    pub conn: ConnParams,
    pub slot: Option<String>,
    pub create_slot: bool,
    /// Report the flush position right after every fsync, for synchronous_standby_names.
    pub synchronous: bool,
    pub status_interval: Duration,
    /// Upload the newest `.partial` this often (None: never).
    pub partial_upload_interval: Option<Duration>,
    pub spool_dir: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Conn(#[from] ConnError),
    #[error("spool {path}: {source}")]
    Spool { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ReceiveError {
    fn permanent(&self) -> bool {
        match self {
            ReceiveError::Conn(c) => c.is_permanent(),
            ReceiveError::Refused(_) | ReceiveError::Spool { .. } => true,
            ReceiveError::Store(_) => false,
        }
    }
}

fn spool_err(path: &Path) -> impl FnOnce(io::Error) -> ReceiveError + '_ {
    move |source| ReceiveError::Spool {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The durable spool.
pub struct Spool {
    current: PathBuf,
    ready: PathBuf,
}

impl Spool {
    pub fn open(dir: &Path) -> Result<Spool, ReceiveError> {
        let current = dir.join("current");
        let ready = dir.join("ready");
        // Received WAL is every row of the database: the spool is the service user's alone.
        for d in [dir, &current, &ready] {
            crate::cache::private_dir(d, crate::cache::WAL_DIR_MODE).map_err(spool_err(d))?;
        }
        Ok(Spool { current, ready })
    }

    fn names(dir: &Path) -> Vec<ArchiveName> {
        crate::cache::archive_names_in(dir)
    }

    /// Files waiting for upload, oldest first (history files before the segments after them).
    pub fn ready(&self) -> Vec<ArchiveName> {
        Self::names(&self.ready)
    }

    pub fn ready_bytes(&self) -> u64 {
        std::fs::read_dir(&self.ready)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    fn partials(&self) -> Vec<ArchiveName> {
        Self::names(&self.current)
            .into_iter()
            .filter(|n| n.kind() == FileKind::Partial)
            .collect()
    }

    pub fn ready_path(&self, name: &ArchiveName) -> PathBuf {
        self.ready.join(name.as_str())
    }

    pub fn current_path(&self, segment: &str) -> PathBuf {
        self.current.join(format!("{segment}.partial"))
    }

    /// Writes a whole file into `ready/` durably.
    fn put_ready(&self, name: &ArchiveName, data: &[u8]) -> io::Result<()> {
        let tmp = self.ready.join(format!(".{name}.tmp"));
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all_at(data, 0)?;
        f.sync_all()?;
        std::fs::rename(&tmp, self.ready_path(name))?;
        fsync_dir(&self.ready)
    }

    /// Moves a finished `current/<segment>.partial` to `ready/` under `final_name`.
    fn finish(&self, file: &File, segment: &str, final_name: &str) -> io::Result<()> {
        file.sync_all()?;
        std::fs::rename(self.current_path(segment), self.ready.join(final_name))?;
        fsync_dir(&self.ready)?;
        fsync_dir(&self.current)
    }

    fn remove_ready(&self, name: &ArchiveName) -> io::Result<()> {
        std::fs::remove_file(self.ready_path(name))?;
        fsync_dir(&self.ready)
    }
}

/// Writes the stream into segment files.
struct SegmentWriter {
    size: SegmentSize,
    timeline: u32,
    current: Option<(u64, File)>,
    written: Lsn,
    flushed: Lsn,
}

impl SegmentWriter {
    fn new(size: SegmentSize, timeline: u32, start: Lsn) -> SegmentWriter {
        SegmentWriter {
            size,
            timeline,
            current: None,
            written: start,
            flushed: start,
        }
    }

    fn segment_name(&self, segno: u64) -> String {
        SegmentId {
            timeline: self.timeline,
            segno,
        }
        .file_name(self.size)
    }

    /// Writes `data` at `start`; completed segments move to `ready/`. Returns whether any did.
    fn write(&mut self, spool: &Spool, start: Lsn, data: &[u8]) -> io::Result<bool> {
        let seg = self.size.bytes();
        let mut pos = start.0;
        let mut rest = data;
        let mut completed = false;
        while !rest.is_empty() {
            let segno = pos / seg;
            let off = pos % seg;
            if self.current.as_ref().map(|c| c.0) != Some(segno) {
                // A new segment (the previous one was completed, or this is the first).
                let path = spool.current_path(&self.segment_name(segno));
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .mode(0o600)
                    .open(&path)?;
                preallocate(&f, seg)?;
                fsync_dir(&spool.current)?;
                self.current = Some((segno, f));
            }
            let n = rest.len().min((seg - off) as usize);
            if let Some((_, f)) = &self.current {
                f.write_all_at(&rest[..n], off)?;
            }
            pos += n as u64;
            rest = &rest[n..];
            if pos % seg == 0 {
                if let Some((segno, f)) = self.current.take() {
                    let name = self.segment_name(segno);
                    spool.finish(&f, &name, &name)?;
                    completed = true;
                    self.flushed = Lsn(pos);
                }
            }
        }
        self.written = Lsn(pos);
        Ok(completed)
    }

    /// fsyncs what was written; afterwards the flush position may be reported.
    fn flush(&mut self) -> io::Result<()> {
        if let Some((_, f)) = &self.current {
            f.sync_data()?;
        }
        self.flushed = self.written;
        Ok(())
    }

    /// The end of a timeline: its last segment stays a `.partial`, ready for upload.
    fn close_timeline(&mut self, spool: &Spool) -> io::Result<Option<ArchiveName>> {
        let Some((segno, f)) = self.current.take() else {
            return Ok(None);
        };
        let name = self.segment_name(segno);
        let final_name = format!("{name}.partial");
        spool.finish(&f, &name, &final_name)?;
        self.flushed = self.written;
        Ok(ArchiveName::parse(&final_name).ok())
    }

    /// The file being written, for `.partial` uploads.
    fn current_partial(&self) -> Option<(String, u64)> {
        self.current
            .as_ref()
            .map(|(segno, _)| (self.segment_name(*segno), *segno))
    }
}

/// Fills a new segment file with zeros up to its full size, as pg_receivewal does: later
/// fdatasyncs then write data only, not block allocations (a sparse file would make every
/// synchronous commit wait for a metadata update).
fn preallocate(f: &File, size: u64) -> io::Result<()> {
    let have = f.metadata()?.len();
    if have >= size {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut at = have;
    while at < size {
        let n = zeros.len().min((size - at) as usize);
        f.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()
}

/// `16MB`, `1GB`, `1024kB` as SHOW wal_segment_size prints it.
fn parse_pg_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n: u64 = s[..split].parse().ok()?;
    let mult = match &s[split..] {
        "" | "B" => 1,
        "kB" => 1 << 10,
        "MB" => 1 << 20,
        "GB" => 1 << 30,
        _ => return None,
    };
    Some(n * mult)
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Where the receiver stands: for `walfs status` (`receive.json`) and the metrics.
#[derive(Debug, Default)]
pub struct Progress {
    pub connected: AtomicBool,
    pub timeline: AtomicU32,
    /// Received (written to the spool) and flushed (fsynced) positions.
    pub written: AtomicU64,
    pub flushed: AtomicU64,
    /// The server's WAL end as it last said.
    pub server_end: AtomicU64,
    /// When the flushed position last moved (Unix milliseconds).
    pub last_flush_ms: AtomicU64,
    pub wal_bytes: AtomicU64,
    pub reconnects: AtomicU64,
    pub uploaded: AtomicU64,
}

fn now_ms() -> u64 {
    (crate::telemetry::now_secs() * 1000.0) as u64
}

impl Progress {
    fn flushed_to(&self, written: Lsn, flushed: Lsn) {
        self.written.store(written.0, Ordering::Relaxed);
        if self.flushed.swap(flushed.0, Ordering::Relaxed) != flushed.0 {
            self.last_flush_ms.store(now_ms(), Ordering::Relaxed);
        }
    }

    fn server_at(&self, end: Lsn) {
        self.server_end.fetch_max(end.0, Ordering::Relaxed);
    }

    /// Sets the metrics from the counters and returns the state `walfs status` shows.
    pub fn publish(&self, spool: &Spool) -> serde_json::Value {
        use crate::telemetry::{set_counter, set_gauge};
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (flushed, server) = (g(&self.flushed), g(&self.server_end));
        let lag = server.saturating_sub(flushed);
        let last_flush = g(&self.last_flush_ms);
        let flush_age = if last_flush == 0 {
            None
        } else {
            Some(now_ms().saturating_sub(last_flush) as f64 / 1000.0)
        };
        let queue = spool.ready();
        let spool_bytes = spool.ready_bytes();
        let connected = self.connected.load(Ordering::Relaxed);
        let timeline = self.timeline.load(Ordering::Relaxed);
        set_gauge("walfs_receive_connected", f64::from(u8::from(connected)));
        set_gauge("walfs_receive_timeline", f64::from(timeline));
        set_gauge("walfs_receive_flushed_lsn", flushed as f64);
        set_gauge("walfs_receive_server_lsn", server as f64);
        set_gauge("walfs_receive_lag_bytes", lag as f64);
        if let Some(age) = flush_age {
            set_gauge("walfs_receive_last_flush_age_seconds", age);
        }
        set_counter("walfs_receive_wal_bytes_total", g(&self.wal_bytes));
        set_counter("walfs_receive_reconnects_total", g(&self.reconnects));
        set_gauge("walfs_upload_queue_files", queue.len() as f64);
        set_gauge("walfs_spool_bytes", spool_bytes as f64);
        crate::telemetry::tick();
        serde_json::json!({
            "pid": std::process::id(),
            "updated": now_ms() / 1000,
            "connected": connected,
            "timeline": timeline,
            "received_lsn": Lsn(g(&self.written)).to_string(),
            "flushed_lsn": Lsn(flushed).to_string(),
            "server_lsn": Lsn(server).to_string(),
            "lag_bytes": lag,
            "last_flush_age_seconds": flush_age,
            "wal_bytes": g(&self.wal_bytes),
            "reconnects": g(&self.reconnects),
            "uploaded": g(&self.uploaded),
            "upload_queue_files": queue.len(),
            "spool_bytes": spool_bytes,
            "last_push": crate::telemetry::last_push(),
        })
    }
}

/// The receiver: a streaming loop that reconnects, and an uploader.
pub struct Receiver {
    archive: Arc<Archive>,
    opts: ReceiveOptions,
    spool: Arc<Spool>,
    ready: Arc<Notify>,
    progress: Arc<Progress>,
}

enum Ended {
    Shutdown,
}

impl Receiver {
    pub fn new(archive: Arc<Archive>, opts: ReceiveOptions) -> Result<Receiver, ReceiveError> {
        let spool = Arc::new(Spool::open(&opts.spool_dir)?);
        Ok(Receiver {
            archive,
            opts,
            spool,
            ready: Arc::new(Notify::new()),
            progress: Arc::new(Progress::default()),
        })
    }

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// Where the state file for `walfs status` goes: beside the spool.
    pub fn state_path(&self) -> PathBuf {
        let spool = &self.opts.spool_dir;
        spool
            .parent()
            .unwrap_or(spool)
            .join(crate::cache::RECEIVE_STATE_FILE)
    }

    /// Streams until `shutdown` turns true; reconnects with backoff after any error a retry
    /// can fix. The uploader drains the spool meanwhile.
    pub async fn run(&self, mut shutdown: watch::Receiver<bool>) -> Result<(), ReceiveError> {
        // The uploader stops when streaming does, whatever the reason.
        let (stop_uploader, uploader_stop) = watch::channel(false);
        let uploader = tokio::spawn(upload_loop(
            self.archive.clone(),
            self.spool.clone(),
            self.ready.clone(),
            self.progress.clone(),
            uploader_stop,
        ));
        // State file and metrics, every second while running.
        let (progress, spool, path) =
            (self.progress.clone(), self.spool.clone(), self.state_path());
        let publisher = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let state = progress.publish(&spool);
                if let Err(e) = crate::telemetry::write_state(&path, &state) {
                    tracing::debug!(error = %e, path = %path.display(), "writing the state file failed");
                }
            }
        });
        let mut backoff = Duration::from_millis(500);
        let result = loop {
            let began = Instant::now();
            match self.stream_once(&mut shutdown).await {
                Ok(Ended::Shutdown) => break Ok(()),
                Err(e) if e.permanent() => break Err(e),
                Err(e) => {
                    self.progress.connected.store(false, Ordering::Relaxed);
                    self.progress.reconnects.fetch_add(1, Ordering::Relaxed);
                    if began.elapsed() > Duration::from_secs(30) {
                        backoff = Duration::from_millis(500);
                    }
                    tracing::warn!(error = %e, retry_in = ?backoff, "streaming stopped; reconnecting");
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&format!(
                        "reconnecting: {e}"
                    ))]);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => break Ok(()),
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        self.progress.connected.store(false, Ordering::Relaxed);
        let _ = stop_uploader.send(true);
        self.ready.notify_one();
        // Give the uploader a moment to drain; what is left stays durable in the spool.
        let _ = tokio::time::timeout(Duration::from_secs(10), uploader).await;
        publisher.abort();
        let mut last = self.progress.publish(&self.spool);
        last["stopped"] = true.into();
        let _ = crate::telemetry::write_state(&self.state_path(), &last);
        result
    }

    /// Where to start: (timeline, segment-aligned LSN).
    async fn start_position(
        &self,
        conn: &mut ReplicationConn,
        size: SegmentSize,
        server_tli: u32,
        server_pos: Lsn,
    ) -> Result<(u32, Lsn), ReceiveError> {
        // 1. A segment being received: re-stream it from its start.
        if let Some(p) = self.spool.partials().last() {
            if let Ok(Some(id)) = p.segment(size) {
                if id.timeline <= server_tli {
                    return Ok((id.timeline, size.start_lsn(id.segno)));
                }
            }
        }
        // 2. After the newest complete segment in the spool or the archive.
        let mut newest: Option<SegmentId> = None;
        let mut consider = |n: &ArchiveName| {
            if n.kind() == FileKind::Segment {
                if let Ok(Some(id)) = n.segment(size) {
                    if id.timeline <= server_tli
                        && newest.is_none_or(|b| (id.segno, id.timeline) > (b.segno, b.timeline))
                    {
                        newest = Some(id);
                    }
                }
            }
        };
        for n in self.spool.ready() {
            consider(&n);
        }
        let mut listing = self.archive.list(None);
        while let Some(e) = listing.try_next().await? {
            consider(&e.name);
        }
        if let Some(id) = newest {
            return Ok((id.timeline, size.start_lsn(id.segno + 1)));
        }
        // 3. The slot's restart_lsn.
        if let Some(slot) = &self.opts.slot {
            if let Ok(rows) = conn
                .query(&format!("READ_REPLICATION_SLOT {}", quote_ident(slot)))
                .await
            {
                if let Some(row) = rows.first() {
                    let lsn: Option<Lsn> =
                        row.get(1).cloned().flatten().and_then(|l| l.parse().ok());
                    let tli: Option<u32> =
                        row.get(2).cloned().flatten().and_then(|t| t.parse().ok());
                    if let Some(lsn) = lsn {
                        return Ok((tli.unwrap_or(server_tli), size.start_lsn(size.segno(lsn))));
                    }
                }
            }
        }
        // 4. The server's current position.
        Ok((server_tli, size.start_lsn(size.segno(server_pos))))
    }

    async fn ensure_history(
        &self,
        conn: &mut ReplicationConn,
        tli: u32,
    ) -> Result<(), ReceiveError> {
        if tli <= 1 {
            return Ok(());
        }
        let name = ArchiveName::parse(&format!("{tli:08X}.history"))
            .map_err(|e| ReceiveError::Refused(e.to_string()))?;
        if self.spool.ready_path(&name).exists() || self.archive.header(&name).await?.is_some() {
            return Ok(());
        }
        let rows = conn.query(&format!("TIMELINE_HISTORY {tli}")).await?;
        let content = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .ok_or_else(|| {
                ReceiveError::Refused(format!("TIMELINE_HISTORY {tli} returned nothing"))
            })?;
        self.spool
            .put_ready(&name, content.as_bytes())
            .map_err(spool_err(&self.opts.spool_dir))?;
        tracing::info!(%name, "timeline history received");
        self.ready.notify_one();
        Ok(())
    }

    async fn stream_once(
        &self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Ended, ReceiveError> {
        let mut conn = ReplicationConn::connect(&self.opts.conn, Duration::from_secs(10)).await?;
        let ident = conn.query("IDENTIFY_SYSTEM").await?;
        let row = ident
            .first()
            .ok_or_else(|| ReceiveError::Refused("IDENTIFY_SYSTEM returned nothing".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let system_id = field(0);
        let server_tli: u32 = field(1)
            .parse()
            .map_err(|_| ReceiveError::Refused("bad timeline".into()))?;
        let server_pos: Lsn = field(2)
            .parse()
            .map_err(|_| ReceiveError::Refused("bad xlogpos".into()))?;
        if let Some(id) = self.archive.identity().await? {
            if id.system_identifier != system_id {
                return Err(ReceiveError::Refused(format!(
                    "the server's system identifier is {system_id}, this archive holds cluster {}",
                    id.system_identifier
                )));
            }
        }
        let size_text = conn.query("SHOW wal_segment_size").await?;
        let size = size_text
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .and_then(|s| parse_pg_size(&s))
            .and_then(|b| SegmentSize::new(b).ok())
            .ok_or_else(|| ReceiveError::Refused("cannot read wal_segment_size".into()))?;
        if let (Some(slot), true) = (&self.opts.slot, self.opts.create_slot) {
            match conn
                .query(&format!(
                    "CREATE_REPLICATION_SLOT {} PHYSICAL RESERVE_WAL",
                    quote_ident(slot)
                ))
                .await
            {
                Ok(_) => tracing::info!(slot, "replication slot created"),
                Err(ConnError::Server(m)) if m.contains("42710") => {} // already exists
                Err(e) => return Err(e.into()),
            }
        }
        let (mut tli, mut start) = self
            .start_position(&mut conn, size, server_tli, server_pos)
            .await?;
        tracing::info!(server = %self.opts.conn.describe(), system_id, timeline = tli, start = %start, "streaming");
        self.progress.connected.store(true, Ordering::Relaxed);
        // systemd (Type=notify): ready once streaming; repeated after a reconnect, harmless.
        let _ = sd_notify::notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(&format!("streaming timeline {tli} from {start}")),
        ]);
        loop {
            self.ensure_history(&mut conn, tli).await?;
            let slot = self
                .opts
                .slot
                .as_ref()
                .map(|s| format!("SLOT {} ", quote_ident(s)))
                .unwrap_or_default();
            conn.start_copy(&format!(
                "START_REPLICATION {slot}PHYSICAL {start} TIMELINE {tli}"
            ))
            .await?;
            let mut writer = SegmentWriter::new(size, tli, start);
            self.progress.timeline.store(tli, Ordering::Relaxed);
            match self
                .stream_timeline(&mut conn, &mut writer, shutdown)
                .await?
            {
                None => return Ok(Ended::Shutdown),
                Some(()) => {
                    // End of the timeline: keep its last segment as .partial, then follow.
                    if let Some(p) = writer
                        .close_timeline(&self.spool)
                        .map_err(spool_err(&self.opts.spool_dir))?
                    {
                        tracing::info!(name = %p, "timeline ended");
                        self.ready.notify_one();
                    }
                    match conn.end_copy().await? {
                        Some((next_tli, next_start)) => {
                            tli = next_tli;
                            // Like pg_receivewal: a new timeline's file starts whole.
                            start = size.start_lsn(size.segno(next_start));
                        }
                        None => {
                            return Err(ReceiveError::Conn(ConnError::Protocol(
                                "the server ended streaming (shutting down?)".into(),
                            )))
                        }
                    }
                }
            }
        }
    }

    /// Streams one timeline. Some(()) at its end, None on shutdown.
    async fn stream_timeline(
        &self,
        conn: &mut ReplicationConn,
        w: &mut SegmentWriter,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<()>, ReceiveError> {
        let spool_dir = self.opts.spool_dir.clone();
        let io = |e: io::Error| ReceiveError::Spool {
            path: spool_dir.clone(),
            source: e,
        };
        let mut last_status = Instant::now();
        let mut last_partial_upload = Instant::now();
        let mut reported = Lsn(0);
        loop {
            if *shutdown.borrow() {
                w.flush().map_err(io)?;
                let _ = conn.send_status(w.written, w.flushed, false).await;
                return Ok(None);
            }
            let due = self
                .opts
                .status_interval
                .saturating_sub(last_status.elapsed());
            let msg = tokio::select! {
                m = conn.next(due.max(Duration::from_millis(10))) => m?,
                _ = shutdown.changed() => continue,
            };
            let mut reply = false;
            match msg {
                Some(ReplMessage::XLogData { start, end, data }) => {
                    self.progress.server_at(end);
                    self.progress
                        .wal_bytes
                        .fetch_add(data.len() as u64, Ordering::Relaxed);
                    if start != w.written {
                        return Err(ReceiveError::Conn(ConnError::Protocol(format!(
                            "WAL arrived at {start}, expected {}",
                            w.written
                        ))));
                    }
                    if w.write(&self.spool, start, &data).map_err(io)? {
                        self.ready.notify_one();
                    }
                    // Synchronous: report as soon as nothing more is waiting.
                    if self.opts.synchronous && !conn.has_buffered() {
                        w.flush().map_err(io)?;
                        reply = w.flushed != reported;
                    }
                }
                Some(ReplMessage::Keepalive {
                    end,
                    reply_requested: true,
                }) => {
                    self.progress.server_at(end);
                    w.flush().map_err(io)?;
                    reply = true;
                }
                Some(ReplMessage::Keepalive { end, .. }) => self.progress.server_at(end),
                Some(ReplMessage::CopyDone) => {
                    w.flush().map_err(io)?;
                    return Ok(Some(()));
                }
                None => {}
            }
            self.progress.flushed_to(w.written, w.flushed);
            if reply || last_status.elapsed() >= self.opts.status_interval {
                if !reply {
                    w.flush().map_err(io)?;
                }
                conn.send_status(w.written, w.flushed, false).await?;
                reported = w.flushed;
                last_status = Instant::now();
            }
            if let Some(every) = self.opts.partial_upload_interval {
                if last_partial_upload.elapsed() >= every {
                    last_partial_upload = Instant::now();
                    if let Some((segment, _)) = w.current_partial() {
                        w.flush().map_err(io)?;
                        self.upload_partial(&segment);
                    }
                }
            }
        }
    }

    /// Uploads a snapshot of the segment being received under its `.partial` name, in the
    /// background (losing the receiver's disk then loses at most one interval).
    fn upload_partial(&self, segment: &str) {
        let path = self.spool.current_path(segment);
        let archive = self.archive.clone();
        let Ok(name) = ArchiveName::parse(&format!("{segment}.partial")) else {
            return;
        };
        tokio::spawn(async move {
            let data = match tokio::fs::read(&path).await {
                Ok(d) => d,
                Err(_) => return, // completed and moved meanwhile
            };
            if let Err(e) = archive.put_partial(&name, Bytes::from(data)).await {
                tracing::warn!(%name, error = %e, "uploading the partial segment failed");
            }
        });
    }
}

/// Pushes ready files in order; a file leaves the spool only once the archive has it.
async fn upload_loop(
    archive: Arc<Archive>,
    spool: Arc<Spool>,
    ready: Arc<Notify>,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    loop {
        let mut failed = false;
        for name in spool.ready() {
            let path = spool.ready_path(&name);
            // A timeline's last .partial replaces the interval snapshots of itself; anything
            // else is pushed from the spool file, never read into memory whole.
            let local = |e: std::io::Error| crate::store::Error::Output {
                name: name.to_string(),
                why: format!("reading the spool: {e}"),
            };
            let pushed = if name.kind() == FileKind::Partial {
                match tokio::fs::read(&path).await {
                    Ok(data) => archive
                        .put_partial(&name, Bytes::from(data))
                        .await
                        .map(|()| crate::store::PushOutcome::Stored { stored_bytes: 0 }),
                    Err(e) => Err(local(e)),
                }
            } else {
                match crate::store::open_local(&path) {
                    Ok((file, len)) => archive.push_file(&name, file, len).await,
                    Err(e) => Err(local(e)),
                }
            };
            match pushed {
                Ok(outcome) => {
                    tracing::info!(%name, ?outcome, "uploaded");
                    progress.uploaded.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = spool.remove_ready(&name) {
                        tracing::error!(%name, error = %e, "removing an uploaded file from the spool failed");
                    }
                    // The interval snapshot of this segment is obsolete now.
                    if name.kind() == FileKind::Segment {
                        if let Ok(p) = ArchiveName::parse(&format!("{name}.partial")) {
                            let _ = archive.delete_partial(&p).await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%name, error = %e, retry_in = ?backoff, "upload failed; the file stays in the spool");
                    failed = true;
                    break;
                }
            }
        }
        if *stop.borrow() && (!failed || spool.ready().is_empty()) {
            return;
        }
        let wait = if failed {
            let w = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(30));
            w
        } else {
            backoff = Duration::from_millis(500);
            Duration::from_secs(5)
        };
        tokio::select! {
            _ = ready.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed(), if !*stop.borrow() => {}
        }
    }
}
