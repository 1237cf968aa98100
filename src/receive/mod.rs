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
pub mod resume;
pub mod tls;

use crate::spool::Spool;
use crate::store::snapshots::Snapshot;
use crate::store::{Archive, Error as StoreError};
use crate::wal::{ArchiveName, FileKind, Lsn, SegmentId, SegmentSize};
use conn::{ConnError, ConnParams, ReplMessage, ReplicationConn};
use futures::TryStreamExt;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
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

/// Writes the stream into segment files. Its methods block on the disk (writes, fsyncs,
/// renames): the streaming task runs them through [`off_async`].
struct SegmentWriter {
    spool: Arc<Spool>,
    size: SegmentSize,
    timeline: u32,
    current: Option<(u64, File)>,
    written: Lsn,
    flushed: Lsn,
}

impl SegmentWriter {
    fn new(spool: Arc<Spool>, size: SegmentSize, timeline: u32, start: Lsn) -> SegmentWriter {
        SegmentWriter {
            spool,
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
    fn write(&mut self, start: Lsn, data: &[u8]) -> io::Result<bool> {
        let seg = self.size.bytes();
        let mut pos = start.0;
        let mut rest = data;
        let mut completed = false;
        while !rest.is_empty() {
            let segno = pos / seg;
            let off = pos % seg;
            if self.current.as_ref().map(|c| c.0) != Some(segno) {
                // A new segment (the previous one was completed, or this is the first). Its
                // file is the spare made in the background, when there is one; the next spare
                // is made now, off the streaming path.
                let (f, _) = self.spool.open_current(&self.segment_name(segno), seg)?;
                self.current = Some((segno, f));
                let spool = self.spool.clone();
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = spool.make_spare(seg) {
                        tracing::warn!(error = %e, "making the next segment's file ahead failed; it will be made when needed");
                    }
                });
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
                    self.spool.finish(&f, &name, &name)?;
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
    fn close_timeline(&mut self) -> io::Result<Option<ArchiveName>> {
        let Some((segno, f)) = self.current.take() else {
            return Ok(None);
        };
        let name = self.segment_name(segno);
        let final_name = format!("{name}.partial");
        self.spool.finish(&f, &name, &final_name)?;
        self.flushed = self.written;
        Ok(ArchiveName::parse(&final_name).ok())
    }

    /// The segment being written and how many of its bytes are written, for snapshots.
    fn current_partial(&self) -> Option<(String, u64)> {
        self.current.as_ref().map(|(segno, _)| {
            let end = self.written.0 - segno * self.size.bytes();
            (self.segment_name(*segno), end)
        })
    }
}

/// Runs disk work that blocks (writes, fsyncs, renames) without stalling the runtime's other
/// tasks: on a multi-threaded runtime the worker hands its queue to another thread while `f`
/// runs on this one, so the streaming path pays no thread hop; elsewhere (unit tests) `f`
/// simply runs.
fn off_async<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// `16MB`, `1GB`, `1024kB` as SHOW wal_segment_size prints it.
pub(crate) fn parse_pg_size(s: &str) -> Option<u64> {
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
    /// Files the archive refused for good, set aside in the spool's `rejected/`.
    pub rejected: AtomicU64,
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
        let queue = spool.ready().map(|r| r.len()).unwrap_or(0);
        let rejected = spool.rejected().map(|r| r.len()).unwrap_or(0);
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
        set_gauge("walfs_upload_queue_files", queue as f64);
        set_gauge("walfs_upload_rejected_files", rejected as f64);
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
            "upload_queue_files": queue,
            "rejected_files": rejected,
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
    /// The newest snapshot stored, so an unchanged segment is not uploaded again.
    last_snapshot: Arc<std::sync::Mutex<Option<Snapshot>>>,
    /// One receiver per spool: two would write the same segment.
    _lock: crate::dirlock::DirLock,
}

enum Ended {
    Shutdown,
}

impl Receiver {
    pub fn new(archive: Arc<Archive>, opts: ReceiveOptions) -> Result<Receiver, ReceiveError> {
        let spool = Arc::new(Spool::open(&opts.spool_dir).map_err(spool_err(&opts.spool_dir))?);
        let lock = crate::dirlock::lock(&opts.spool_dir.join("receive.lock"), "walfs receive")
            .map_err(|e| {
                let e = if e.kind() == io::ErrorKind::WouldBlock {
                    io::Error::new(
                        e.kind(),
                        format!(
                            "{e}: one receiver per archive and cache directory (two would write \
                             the same segment); stop it, or give this one its own --cache-dir \
                             (WALFS_CACHE_DIR, `cache-dir` in walfs.toml)"
                        ),
                    )
                } else {
                    e
                };
                spool_err(&opts.spool_dir)(e)
            })?;
        Ok(Receiver {
            _lock: lock,
            archive,
            opts,
            spool,
            ready: Arc::new(Notify::new()),
            progress: Arc::new(Progress::default()),
            last_snapshot: Default::default(),
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
        let partials = self
            .spool
            .partials()
            .map_err(spool_err(&self.opts.spool_dir))?;
        if let Some(p) = partials.last() {
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
        for n in self
            .spool
            .ready()
            .map_err(spool_err(&self.opts.spool_dir))?
        {
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

    /// The server's timeline history (its ancestors and where each ended).
    async fn server_history(
        &self,
        conn: &mut ReplicationConn,
        server_tli: u32,
    ) -> Result<Vec<crate::wal::Switch>, ReceiveError> {
        if server_tli <= 1 {
            return Ok(Vec::new());
        }
        let rows = conn
            .query(&format!("TIMELINE_HISTORY {server_tli}"))
            .await?;
        let content = rows
            .first()
            .and_then(|r| r.get(1).cloned().flatten())
            .unwrap_or_default();
        crate::wal::parse_history_file(content.as_bytes(), server_tli)
            .map_err(|e| ReceiveError::Refused(format!("TIMELINE_HISTORY {server_tli}: {e}")))
    }

    /// Our own timeline's history, from the spool or the archive (empty when unknown).
    async fn known_history(&self, tli: u32) -> Vec<crate::wal::Switch> {
        let Ok(name) = ArchiveName::parse(&format!("{tli:08X}.history")) else {
            return Vec::new();
        };
        let text = match std::fs::read(self.spool.ready_path(&name)) {
            Ok(t) => Some(t),
            Err(_) => self.archive.fetch(&name).await.ok().flatten(),
        };
        text.and_then(|t| crate::wal::parse_history_file(&t, tli).ok())
            .unwrap_or_default()
    }

    /// Finishes the segments being received on timelines other than `tli` as `.partial`
    /// tails (uploaded as their timeline's last snapshot), since streaming moves elsewhere.
    fn keep_tails_before(&self, tli: u32, size: SegmentSize) -> Result<(), ReceiveError> {
        let dir = &self.opts.spool_dir;
        for p in self.spool.partials().map_err(spool_err(dir))? {
            let segment = p.as_str().trim_end_matches(".partial").to_string();
            if p.timeline() == tli || p.segment(size).ok().flatten().is_none() {
                continue;
            }
            off_async(|| {
                let f = File::open(self.spool.current_path(&segment))?;
                self.spool
                    .finish(&f, &segment, &format!("{segment}.partial"))
            })
            .map_err(spool_err(dir))?;
            tracing::info!(name = %p, "kept as the old timeline's tail");
            self.ready.notify_one();
        }
        Ok(())
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
        off_async(|| self.spool.put_ready(&name, content.as_bytes()))
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
        if tli != server_tli {
            // The server may have forked from our timeline behind us (a standby promoted in
            // place of our primary): stream from the fork, keep what we have past it.
            let server_history = self.server_history(&mut conn, server_tli).await?;
            let ours = self.known_history(tli).await;
            let r = resume::resume_point(&server_history, server_tli, (tli, start), &ours, size);
            if r.diverged {
                tracing::warn!(our_timeline = tli, our_position = %start, server_timeline = server_tli,
                    resume_timeline = r.timeline, resume_at = %r.start,
                    "the server's history forked from ours behind us: keeping our WAL past the fork \
                     as the old timeline's tail, streaming from the fork");
                self.keep_tails_before(r.timeline, size)?;
                (tli, start) = (r.timeline, r.start);
            }
        }
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
            let mut writer = SegmentWriter::new(self.spool.clone(), size, tli, start);
            self.progress.timeline.store(tli, Ordering::Relaxed);
            let streamed = self.stream_timeline(&mut conn, &mut writer, shutdown).await;
            if !matches!(streamed, Ok(Some(()))) {
                // The server is lost, or we stop: what we hold goes to the archive now.
                self.snapshot_now(&mut writer).await;
            }
            match streamed? {
                None => return Ok(Ended::Shutdown),
                Some(()) => {
                    // End of the timeline: keep its last segment as .partial, then follow.
                    if let Some(p) = off_async(|| writer.close_timeline())
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
                off_async(|| w.flush()).map_err(io)?;
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
                    // Synchronous: report as soon as nothing more is waiting.
                    let sync_now = self.opts.synchronous && !conn.more_waiting()?;
                    let completed = off_async(|| {
                        let completed = w.write(start, &data)?;
                        if sync_now {
                            w.flush()?;
                        }
                        Ok(completed)
                    })
                    .map_err(io)?;
                    if completed {
                        self.ready.notify_one();
                    }
                    if sync_now {
                        reply = w.flushed != reported;
                    }
                }
                Some(ReplMessage::Keepalive {
                    end,
                    reply_requested: true,
                }) => {
                    self.progress.server_at(end);
                    off_async(|| w.flush()).map_err(io)?;
                    reply = true;
                }
                Some(ReplMessage::Keepalive { end, .. }) => self.progress.server_at(end),
                Some(ReplMessage::CopyDone) => {
                    off_async(|| w.flush()).map_err(io)?;
                    return Ok(Some(()));
                }
                None => {}
            }
            self.progress.flushed_to(w.written, w.flushed);
            if reply || last_status.elapsed() >= self.opts.status_interval {
                if !reply {
                    off_async(|| w.flush()).map_err(io)?;
                }
                conn.send_status(w.written, w.flushed, false).await?;
                reported = w.flushed;
                last_status = Instant::now();
            }
            if let Some(every) = self.opts.partial_upload_interval {
                if last_partial_upload.elapsed() >= every {
                    last_partial_upload = Instant::now();
                    if let Some((segment, end)) = w.current_partial() {
                        off_async(|| w.flush()).map_err(io)?;
                        tokio::spawn(self.put_snapshot(&segment, end));
                    }
                }
            }
        }
    }

    /// Uploads a snapshot of the segment being received (its first `end` bytes are WAL,
    /// fsynced): losing the receiver's disk then loses at most one interval. Nothing when
    /// that snapshot is stored already.
    fn put_snapshot(&self, segment: &str, end: u64) -> impl std::future::Future<Output = ()> {
        let path = self.spool.current_path(segment);
        let (archive, last) = (self.archive.clone(), self.last_snapshot.clone());
        let snap = ArchiveName::parse(segment)
            .ok()
            .map(|segment| Snapshot { segment, end });
        async move {
            let Some(snap) = snap.filter(|s| s.end > 0) else {
                return;
            };
            if lock(&last).as_ref() == Some(&snap) {
                return;
            }
            let Ok((file, len)) = crate::store::open_local(&path) else {
                return; // completed and moved meanwhile
            };
            match archive.put_snapshot(&snap, file, len).await {
                Ok(()) => {
                    tracing::debug!(snapshot = %snap, "snapshot stored");
                    *lock(&last) = Some(snap);
                }
                Err(e) => {
                    tracing::warn!(snapshot = %snap, error = %e, "uploading a snapshot failed")
                }
            }
        }
    }

    /// When the server is lost or the receiver stops: stores a snapshot of everything flushed
    /// of the segment being received, so that a `--serve-partial` mount on any host restores
    /// up to the last acknowledged commit (the failover procedure). Bounded in time: the
    /// spool keeps the segment anyway.
    async fn snapshot_now(&self, w: &mut SegmentWriter) {
        if off_async(|| w.flush()).is_err() {
            return;
        }
        if let Some((segment, end)) = w.current_partial() {
            let upload = self.put_snapshot(&segment, end);
            if tokio::time::timeout(Duration::from_secs(30), upload)
                .await
                .is_err()
            {
                tracing::warn!(
                    segment,
                    "storing the final snapshot timed out; the spool keeps it"
                );
            } else {
                tracing::info!(
                    segment,
                    end,
                    "snapshot of the segment being received stored"
                );
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Archives one ready file: a timeline's last segment (`<segment>.partial`) as its final
/// snapshot, anything else as the archive file it is. Read from the spool file, never into
/// memory whole.
async fn upload_one(
    archive: &Archive,
    spool: &Spool,
    name: &ArchiveName,
) -> Result<(), StoreError> {
    let local = |e: std::io::Error| StoreError::Output {
        name: name.to_string(),
        why: format!("reading the spool: {e}"),
    };
    let (file, len) = crate::store::open_local(&spool.ready_path(name)).map_err(local)?;
    if name.kind() == FileKind::Partial {
        let segment = ArchiveName::parse(name.as_str().trim_end_matches(".partial"))
            .map_err(|e| local(std::io::Error::other(e.to_string())))?;
        // Its final state: the whole file, so it sorts after every interval snapshot.
        let snap = Snapshot { segment, end: len };
        return archive.put_snapshot(&snap, file, len).await;
    }
    let outcome = archive.push_file(name, file, len).await?;
    tracing::info!(%name, ?outcome, "uploaded");
    if name.kind() == FileKind::Segment {
        // The snapshots of this segment are obsolete now (and any a late upload left).
        if let Err(e) = archive.delete_stale_snapshots().await {
            tracing::warn!(%name, error = %e, "deleting obsolete snapshots failed; the next upload retries");
        }
    }
    Ok(())
}

/// Whether the archive refuses this one file for good: its content (another cluster's, not
/// WAL), different bytes under its name, or an object under its name walfs cannot read.
/// Failures of the whole archive (unreachable, misconfigured, a forged identity) are not:
/// they are retried with the file staying first.
fn refused_for_good(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Refused { .. } | StoreError::Conflict { .. } | StoreError::Unreadable { .. }
    )
}

/// Uploads ready files in order; a file leaves the spool only once the archive has it. A file
/// the archive refuses for good (another cluster's, different bytes already archived under
/// its name) is set aside in `rejected/`, loudly, and the rest goes on; any other failure is
/// retried with backoff, the file staying first.
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
        let names = match spool.ready() {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "reading the spool failed");
                failed = true;
                Vec::new()
            }
        };
        for name in names {
            match upload_one(&archive, &spool, &name).await {
                Ok(()) => {
                    progress.uploaded.fetch_add(1, Ordering::Relaxed);
                    if let Err(e) = spool.remove_ready(&name) {
                        tracing::error!(%name, error = %e, "removing an uploaded file from the spool failed");
                    }
                }
                Err(e) if refused_for_good(&e) => {
                    progress.rejected.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%name, error = %e, path = %spool.dir().join("rejected").display(),
                        "the archive refuses this file for good: set aside, the uploads behind it go on");
                    if let Err(e) = spool.reject(&name) {
                        tracing::error!(%name, error = %e, "setting a refused file aside failed");
                        failed = true;
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(%name, error = %e, retry_in = ?backoff, "upload failed; the file stays in the spool");
                    failed = true;
                    break;
                }
            }
        }
        if *stop.borrow() && (!failed || spool.ready().is_ok_and(|r| r.is_empty())) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SealOptions;
    use crate::store::test_segment;
    use object_store::memory::InMemory;

    /// A file the archive refuses for good goes to `rejected/`, counted, and the upload of
    /// the file behind it is not held up.
    #[tokio::test]
    async fn a_refused_file_is_set_aside_and_the_rest_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Arc::new(Spool::open(&dir.path().join("spool")).unwrap());
        let archive = Arc::new(Archive::with_store(
            Arc::new(InMemory::new()),
            object_store::path::Path::from("p"),
            "memory:///",
            None,
            SealOptions::default(),
        ));
        let seg = |n: &str| (ArchiveName::parse(n).unwrap(), test_segment(n, 7, 1 << 20));
        let (first, data) = seg("000000010000000000000001");
        archive.push(&first, data).await.unwrap();
        // Another history under a name already archived: different bytes, refused for good.
        let history = ArchiveName::parse("00000002.history").unwrap();
        archive
            .push(&history, bytes::Bytes::from_static(b"1\t0/1000000\tone\n"))
            .await
            .unwrap();
        spool.put_ready(&history, b"1\t0/1800000\tother\n").unwrap();
        let (next, data) = seg("000000010000000000000002");
        spool.put_ready(&next, &data).unwrap();
        let progress = Arc::new(Progress::default());
        let (_stop, stopped) = watch::channel(true); // return once the spool is drained
        let drained = upload_loop(
            archive.clone(),
            spool.clone(),
            Arc::new(Notify::new()),
            progress.clone(),
            stopped,
        );
        tokio::time::timeout(Duration::from_secs(20), drained)
            .await
            .expect("the uploader kept retrying a file the archive refuses for good");
        assert_eq!(spool.rejected().unwrap(), vec![history.clone()]);
        assert!(spool.ready().unwrap().is_empty());
        assert!(archive.header(&next).await.unwrap().is_some());
        assert_eq!(progress.rejected.load(Ordering::Relaxed), 1);
        assert_eq!(progress.uploaded.load(Ordering::Relaxed), 1);
        // The archived history is the first one still.
        let kept = archive.fetch(&history).await.unwrap().unwrap();
        assert_eq!(&kept[..], b"1\t0/1000000\tone\n");
    }
}
