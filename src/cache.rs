//! The local cache in front of the archive: verified plaintext files on disk, indexed by
//! `moka` and bounded in bytes, with single-flight loads; sizes of known names; and the
//! write spool for files being archived through the mount.
//!
//! Opening a segment also runs the read-ahead planner (`crate::readahead`): the segments it
//! names are probed in order (one small ranged read each, stopping at the first that is not
//! archived) and loaded in the background, a few at a time, into `planned` until a reader
//! takes them. Planned files are held outside the LRU, so eviction takes already-served
//! files first, and `planned` never holds more than the planner's window.
//!
//! Layout: `<cache-dir>/<archive id>/plain/` (plaintext, rebuilt every start),
//! `<cache-dir>/<archive id>/writes/` (files being written, never acknowledged before upload)
//! and `<cache-dir>/<archive id>/stats.json` (read-ahead counters, for `walfs status`).

use crate::envelope::Priority;
use crate::readahead::{Planner, Timelines};
use crate::spool::{private_dir, spool_dir, Spool, DIR_MODE};
use crate::store::{Archive, Entry, Error, PushOutcome};
use crate::wal::{ArchiveName, FileKind, SegmentId, SegmentSize};

use futures::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A verified plaintext file in the cache. Readers keep it open: eviction only unlinks it.
#[derive(Debug)]
pub struct CachedFile {
    file: std::fs::File,
    len: u64,
    /// Served from a segment still being received (`--serve-partial`): it will change, so
    /// it is never kept in the LRU or in the kernel's page cache.
    provisional: bool,
}

impl CachedFile {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_provisional(&self) -> bool {
        self.provisional
    }

    /// The descriptor, for kernel passthrough of reads.
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.file)
    }

    /// Up to `size` bytes from `offset` (fewer at the end of the file).
    pub fn read_at(&self, offset: u64, size: u32) -> io::Result<Vec<u8>> {
        let end = self.len.min(offset.saturating_add(u64::from(size)));
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        self.file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

/// Why a load failed: absent is not an error for callers, but must not be cached either.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("not in the archive")]
    Absent,
    #[error(transparent)]
    Store(#[from] Error),
    #[error("cache directory: {0}")]
    Local(#[from] io::Error),
}

pub struct CacheOptions {
    pub dir: PathBuf,
    /// Bytes of plaintext kept on disk.
    pub max_bytes: u64,
    /// Bytes of segments loaded ahead of the reader (0: no read-ahead).
    pub prefetch_bytes: u64,
    /// Segments loaded ahead at the same time.
    pub prefetch_concurrency: usize,
    /// Serve the newest segment `walfs receive` is still writing under its final name.
    pub serve_partial: bool,
}

/// Read-ahead counters (monotonic), as `walfs status` and the log show them.
#[derive(Debug, Default)]
pub struct Stats {
    /// Segment opens.
    pub requests: AtomicU64,
    /// Opens served by a finished read-ahead.
    pub hits: AtomicU64,
    /// Opens that joined a read-ahead still loading.
    pub joined: AtomicU64,
    /// Opens that loaded on demand (not planned).
    pub misses: AtomicU64,
    /// Segments loaded ahead.
    pub prefetched: AtomicU64,
    /// Segments loaded ahead and dropped unread.
    pub wasted: AtomicU64,
    /// Planned segments found not archived (the plan stops there; at most the concurrency).
    pub absent: AtomicU64,
    /// Time readers waited for segment loads, in microseconds.
    pub stall_us: AtomicU64,
    /// Opens of segments that were not archived (lookups catch absence first, so this stays
    /// 0 unless a file vanishes between lookup and open).
    pub fetch_absent: AtomicU64,
    /// Segments dropped once a server restoring them took them (see [`Cache::served_once`]).
    pub served_once: AtomicU64,
}

impl Stats {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "segment_requests": g(&self.requests),
            "readahead_hits": g(&self.hits),
            "readahead_joined": g(&self.joined),
            "readahead_misses": g(&self.misses),
            "prefetched": g(&self.prefetched),
            "prefetch_wasted": g(&self.wasted),
            "prefetch_absent": g(&self.absent),
            "stall_seconds": g(&self.stall_us) as f64 / 1e6,
            "fetch_absent": g(&self.fetch_absent),
            "dropped_after_serving": g(&self.served_once),
        })
    }
}

/// Read-ahead state: the planner, the timelines it follows, what it holds for the reader.
struct Readahead {
    max_bytes: u64,
    permits: Arc<tokio::sync::Semaphore>,
    planner: Mutex<Option<Planner>>,
    timelines: Mutex<Timelines>,
    /// When history files newer than a timeline were last probed for.
    probed: Mutex<HashMap<u32, Instant>>,
    /// Planned segments: None while loading, Some once landed and waiting for the reader.
    planned: Mutex<HashMap<ArchiveName, Option<Arc<CachedFile>>>>,
    /// One probe loop at a time, so overlapping plans learn of the archive's end from
    /// each other instead of each probing past it.
    prober: tokio::sync::Mutex<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct Cache {
    archive: Arc<Archive>,
    plain_dir: PathBuf,
    writes_dir: PathBuf,
    files: moka::future::Cache<ArchiveName, Arc<CachedFile>>,
    /// Plaintext sizes of names known to exist (from lookups, listings and writes).
    sizes: moka::sync::Cache<ArchiveName, u64>,
    serial: AtomicU64,
    readahead: Readahead,
    /// The segment a restoring server took last: kept until it takes another (see
    /// [`Cache::served_once`]).
    last_served: Mutex<Option<ArchiveName>>,
    stats: Stats,
    stats_path: PathBuf,
    /// The spool `walfs receive` writes when it shares this cache directory.
    spool: Spool,
    /// One mount per cache directory and archive: a second would wipe this one's files.
    _lock: crate::dirlock::DirLock,
    serve_partial: bool,
}

/// A directory name for an archive URL, so caches of different archives never mix, and one
/// archive's cache and spool are found however its URL is spelled.
fn archive_dir_name(url: &str) -> String {
    hex::encode(&Sha256::digest(crate::store::canonical_url(url).as_bytes())[..8])
}

/// The name earlier versions gave the directory: a hash of the URL as spelled.
fn legacy_dir_name(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..8])
}

/// The receiver's state file in an archive's cache directory (the mount's is `stats.json`).
pub const RECEIVE_STATE_FILE: &str = "receive.json";

/// Moves an earlier version's directory for this archive to `dir`: whole when `dir` does not
/// exist, else the receiver's spooled files `dir` lacks (the rest is rebuilt at start).
fn take_over(legacy: &Path, dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        std::fs::rename(legacy, dir)?;
        tracing::info!(from = %legacy.display(), to = %dir.display(),
            "cache directory renamed (one name per archive, however its URL is spelled)");
        return Ok(());
    }
    Spool::at(&spool_dir(dir)).take_files_from(&Spool::at(&spool_dir(legacy)))
}

/// Mode of an archive's directory under the cache directory: others may reach the state files
/// `walfs status` reads by name, not list or read anything else.
const ARCHIVE_DIR_MODE: u32 = 0o711;

fn reset_dir(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    private_dir(dir, DIR_MODE)
}

impl Cache {
    /// Opens the cache for `archive` under `opts.dir`. Leftovers of earlier runs are removed:
    /// the index lives in memory, and no write in `writes/` was ever acknowledged. Evicted
    /// files need no clean-up: they are unlinked when they land (see `land`), so dropping the
    /// last descriptor frees their blocks.
    pub fn new(archive: Arc<Archive>, opts: &CacheOptions) -> io::Result<Cache> {
        let base = Cache::archive_dir(&opts.dir, archive.url());
        private_dir(&base, ARCHIVE_DIR_MODE)?;
        let lock = crate::dirlock::lock(&base.join("mount.lock"), "walfs mount").map_err(|e| {
            if e.kind() != io::ErrorKind::WouldBlock {
                return e;
            }
            io::Error::new(
                e.kind(),
                format!(
                    "{e}: one mount per archive and cache directory (a second would wipe the \
                     first one's cache and writes); stop it, or give this mount its own \
                     --cache-dir (WALFS_CACHE_DIR, `cache-dir` in walfs.toml)"
                ),
            )
        })?;
        let plain_dir = base.join("plain");
        let writes_dir = base.join("writes");
        reset_dir(&plain_dir)?;
        reset_dir(&writes_dir)?;
        let files = moka::future::Cache::builder()
            .max_capacity(opts.max_bytes)
            .weigher(|_: &ArchiveName, f: &Arc<CachedFile>| {
                u32::try_from(f.len()).unwrap_or(u32::MAX).max(1)
            })
            .build();
        let sizes = moka::sync::Cache::builder()
            .max_capacity(200_000)
            .time_to_live(Duration::from_secs(600))
            .build();
        Ok(Cache {
            _lock: lock,
            archive,
            plain_dir,
            writes_dir,
            files,
            sizes,
            serial: AtomicU64::new(0),
            readahead: Readahead {
                max_bytes: opts.prefetch_bytes,
                permits: Arc::new(tokio::sync::Semaphore::new(
                    opts.prefetch_concurrency.max(1),
                )),
                planner: Mutex::new(None),
                timelines: Mutex::new(Timelines::default()),
                probed: Mutex::new(HashMap::new()),
                planned: Mutex::new(HashMap::new()),
                prober: tokio::sync::Mutex::new(()),
            },
            last_served: Mutex::new(None),
            stats: Stats::default(),
            stats_path: base.join("stats.json"),
            spool: Spool::at(&spool_dir(&base)),
            serve_partial: opts.serve_partial,
        })
    }

    pub fn archive(&self) -> &Arc<Archive> {
        &self.archive
    }

    fn unique(&self, dir: &Path, name: &ArchiveName) -> PathBuf {
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("{name}.{n}"))
    }

    /// A new, uniquely named file for `name` in `dir`.
    fn new_file(&self, dir: &Path, name: &ArchiveName) -> io::Result<(std::fs::File, PathBuf)> {
        let path = self.unique(dir, name);
        let file = std::os::unix::fs::OpenOptionsExt::mode(
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true),
            0o600,
        )
        .open(&path)?;
        Ok((file, path))
    }

    /// A new spool file for a write through the mount.
    pub fn new_spool_file(&self, name: &ArchiveName) -> io::Result<(std::fs::File, PathBuf)> {
        self.new_file(&self.writes_dir, name)
    }

    fn new_plain_file(&self, name: &ArchiveName) -> io::Result<(std::fs::File, PathBuf)> {
        self.new_file(&self.plain_dir, name)
    }

    /// Lands a copy of a local file (the write spool, the receiver's spool) in the cache:
    /// copied block by block at explicit offsets, never through memory whole. The copy is
    /// unlinked at once and kept only through its descriptor, so eviction, crashes and
    /// restarts never leave bytes behind that no index knows of.
    fn land_copy(
        &self,
        name: &ArchiveName,
        src: &std::fs::File,
        len: u64,
        provisional: bool,
    ) -> io::Result<Arc<CachedFile>> {
        let (file, path) = self.new_plain_file(name)?;
        let _ = std::fs::remove_file(&path);
        let mut buf = vec![0u8; (1 << 20).min(len as usize)];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], at)?;
            file.write_all_at(&buf[..n], at)?;
            at += n as u64;
        }
        Ok(Arc::new(CachedFile {
            file,
            len,
            provisional,
        }))
    }

    /// The verified plaintext of `name`: loaded once however many callers ask at the same
    /// time, then kept in the LRU. History files met on the way feed the read-ahead planner.
    async fn load(&self, name: &ArchiveName) -> Result<Arc<CachedFile>, Arc<LoadError>> {
        self.load_as(name, Priority::Reader).await
    }

    /// [`Cache::load`], decoded at `priority` (read-ahead: below replay's). A reader that
    /// joins a load read-ahead started waits at its priority: the reader's server is waiting
    /// too then, so the CPU is free for it.
    async fn load_as(
        &self,
        name: &ArchiveName,
        priority: Priority,
    ) -> Result<Arc<CachedFile>, Arc<LoadError>> {
        let load = async {
            // Received but not uploaded yet: durable here, plaintext, the same bytes. Only a
            // spool that has no such file sends the read to the archive.
            let file = match self.spool.open_ready(name)? {
                Some(src) => {
                    let len = src.metadata()?.len();
                    tokio::task::block_in_place(|| self.land_copy(name, &src, len, false))?
                }
                None => {
                    // Decoded straight into a private, unlinked file: no plaintext in memory.
                    let (f, path) = self.new_plain_file(name)?;
                    let _ = std::fs::remove_file(&path);
                    match self
                        .archive
                        .fetch_into(name, f.try_clone()?, self.sizes.get(name), priority)
                        .await
                    {
                        Ok(Some(len)) => Arc::new(CachedFile {
                            file: f,
                            len,
                            provisional: false,
                        }),
                        Ok(None) => return Err(LoadError::Absent),
                        Err(e) => return Err(e.into()),
                    }
                }
            };
            if name.kind() == FileKind::History {
                let text = file.read_at(0, u32::try_from(file.len()).unwrap_or(u32::MAX))?;
                // Served only once whole and valid: it parses (read-ahead only plans with it).
                let history =
                    crate::wal::parse_history_file(&text, name.timeline()).unwrap_or_default();
                lock(&self.readahead.timelines).insert(name.timeline(), history);
            }
            self.sizes.insert(name.clone(), file.len());
            Ok::<_, LoadError>(file)
        };
        self.files.try_get_with(name.clone(), load).await
    }

    /// The verified plaintext of `name` for a reader. A segment is taken from what read-ahead
    /// prepared when it can be, and starts read-ahead of the segments after it.
    pub async fn open(
        self: &Arc<Self>,
        name: &ArchiveName,
    ) -> Result<Arc<CachedFile>, Arc<LoadError>> {
        if name.kind() != FileKind::Segment {
            return self.load(name).await;
        }
        let result = self.open_segment(name).await;
        match result {
            Err(e) if matches!(e.as_ref(), LoadError::Absent) => {
                match self.open_partial(name).await {
                    Ok(Some(file)) => return Ok(file),
                    Ok(None) => {}
                    Err(io) => return Err(Arc::new(LoadError::Local(io))),
                }
                match self.open_snapshot(name).await {
                    Ok(Some(file)) => Ok(file),
                    Ok(None) => {
                        self.stats.fetch_absent.fetch_add(1, Ordering::Relaxed);
                        Err(e)
                    }
                    Err(s) => Err(Arc::new(LoadError::Store(s))),
                }
            }
            other => other,
        }
    }

    /// The newest segment being received, when `--serve-partial` is on: (its name, path).
    /// A spool that cannot be read is an error, never "nothing there".
    fn newest_partial(&self) -> io::Result<Option<(ArchiveName, PathBuf)>> {
        if !self.serve_partial {
            return Ok(None);
        }
        self.spool.newest_partial()
    }

    /// `name` served from the segment `walfs receive` is writing: full size, zero tail.
    async fn open_partial(&self, name: &ArchiveName) -> io::Result<Option<Arc<CachedFile>>> {
        let Some((newest, path)) = self.newest_partial()? else {
            return Ok(None);
        };
        if &newest != name {
            return Ok(None);
        }
        let src = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None), // completed meanwhile
            Err(e) => return Err(e),
        };
        let len = src.metadata()?.len();
        let file = tokio::task::block_in_place(|| self.land_copy(name, &src, len, true))?;
        tracing::info!(%name, "serving the segment being received (--serve-partial)");
        Ok(Some(file))
    }

    /// `name` served from the receiver's newest snapshot in the archive, when `--serve-partial`
    /// is on and the receiver's own spool is not here (its disk was lost): full size, zero
    /// tail, provisional like a partial from the spool.
    async fn open_snapshot(&self, name: &ArchiveName) -> Result<Option<Arc<CachedFile>>, Error> {
        if !self.serve_partial {
            return Ok(None);
        }
        let Some(snap) = self.archive.latest_snapshot(name).await? else {
            return Ok(None);
        };
        let local = |e: io::Error| Error::Output {
            name: name.to_string(),
            why: format!("the cache directory: {e}"),
        };
        let (f, path) = self.new_plain_file(name).map_err(local)?;
        let _ = std::fs::remove_file(&path);
        let copy = f.try_clone().map_err(local)?;
        let Some(len) = self.archive.fetch_snapshot_into(&snap, copy).await? else {
            return Ok(None);
        };
        tracing::info!(%name, snapshot = %snap, "serving the receiver's newest snapshot (--serve-partial)");
        Ok(Some(Arc::new(CachedFile {
            file: f,
            len,
            provisional: true,
        })))
    }

    /// Names received but not yet uploaded (few: the uploader drains them).
    pub fn spooled_names(&self) -> io::Result<Vec<ArchiveName>> {
        self.spool.ready()
    }

    async fn open_segment(
        self: &Arc<Self>,
        name: &ArchiveName,
    ) -> Result<Arc<CachedFile>, Arc<LoadError>> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let prepared = lock(&self.readahead.planned).remove(name);
        let result = match prepared {
            Some(Some(file)) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.files.insert(name.clone(), file.clone()).await;
                Ok(file)
            }
            prepared => {
                let counter = if prepared.is_some() {
                    &self.stats.joined
                } else {
                    &self.stats.misses
                };
                counter.fetch_add(1, Ordering::Relaxed);
                let t0 = Instant::now();
                let r = self.load(name).await;
                self.stats
                    .stall_us
                    .fetch_add(t0.elapsed().as_micros() as u64, Ordering::Relaxed);
                r
            }
        };
        if result.is_ok() {
            self.read_ahead_after(name).await;
        }
        result
    }

    /// `name` was opened by a server restoring it (archive recovery or a standby), which
    /// copies a segment into `pg_wal` once and moves on: the segment it took before leaves the
    /// cache now (its file goes when the last reader's handle does). So a recovery does not
    /// fill the cache with segments nobody reads again, and the kernel drops their pages
    /// instead of writing them back to disk. The newest one stays, for the server that asks
    /// again for the segment it stopped in (a record continuing into one not archived yet),
    /// and is served from here even if the store is down by then. Anyone else's reads (an
    /// operator, a script, a second pass) keep what they read cached.
    pub async fn served_once(&self, name: &ArchiveName) {
        if name.kind() != FileKind::Segment {
            return;
        }
        let before = lock(&self.last_served).replace(name.clone());
        if let Some(before) = before.filter(|b| b != name) {
            self.files.invalidate(&before).await;
            self.stats.served_once.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Plans after a segment was opened and starts loading the plan in the background.
    async fn read_ahead_after(self: &Arc<Self>, name: &ArchiveName) {
        let ra = &self.readahead;
        if ra.max_bytes == 0 {
            return;
        }
        // Never wait on the store here: the reader is waiting for this open. Without the
        // identity (the store did not answer yet), read it for the next open, plan nothing.
        let Some(identity) = self.archive.known_identity() else {
            let this = self.clone();
            tokio::spawn(async move {
                let _ = this.archive.identity().await;
            });
            return;
        };
        let Ok(size) = identity.segment_size() else {
            return;
        };
        let Ok(Some(id)) = name.segment(size) else {
            return;
        };
        let plan: Vec<SegmentId> = {
            let mut planner = lock(&ra.planner);
            let max_window = (ra.max_bytes / size.bytes()).min(256) as u32;
            let planner = planner.get_or_insert_with(|| Planner::new(size, max_window));
            let timelines = lock(&ra.timelines);
            planner.on_request(id, &timelines)
        };
        let names: Vec<ArchiveName> = plan
            .iter()
            .filter_map(|s| ArchiveName::parse(&s.file_name(size)).ok())
            .collect();
        // Keep only what the new plan still wants; the rest will not be read.
        let fresh: Vec<ArchiveName> = {
            let mut planned = lock(&ra.planned);
            let mut wasted = 0;
            planned.retain(|n, f| {
                let keep = names.contains(n);
                if !keep && f.is_some() {
                    wasted += 1;
                }
                keep
            });
            self.stats.wasted.fetch_add(wasted, Ordering::Relaxed);
            names
                .iter()
                .filter(|n| !planned.contains_key(*n) && !self.files.contains_key(*n))
                .cloned()
                .collect()
        };
        let this = self.clone();
        let timeline = id.timeline;
        tokio::spawn(async move {
            this.refresh_timelines(timeline).await;
            this.load_plan(fresh, size).await;
        });
    }

    /// Looks for history files of timelines after `t` (as PostgreSQL does), at most every
    /// ten seconds per timeline.
    async fn refresh_timelines(&self, t: u32) {
        {
            let mut probed = lock(&self.readahead.probed);
            if probed
                .get(&t)
                .is_some_and(|at| at.elapsed() < Duration::from_secs(10))
            {
                return;
            }
            probed.insert(t, Instant::now());
        }
        let mut next = t.saturating_add(1);
        loop {
            let Ok(name) = ArchiveName::parse(&format!("{next:08X}.history")) else {
                return;
            };
            if lock(&self.readahead.timelines).knows(next) {
                next = next.saturating_add(1);
                continue;
            }
            match self.size(&name).await {
                Ok(Some(_)) => {
                    if self.load(&name).await.is_err() {
                        return;
                    }
                }
                _ => return,
            }
            next = next.saturating_add(1);
        }
    }

    /// Loads the planned segments in order, a few at a time. A planned segment that is not
    /// archived marks the archive's end: nothing at or past it is requested again until
    /// PostgreSQL itself finds it, so the end costs at most `--prefetch-concurrency` misses.
    async fn load_plan(self: &Arc<Self>, names: Vec<ArchiveName>, size: SegmentSize) {
        let ra = &self.readahead;
        {
            let mut planned = lock(&ra.planned);
            for n in &names {
                planned.entry(n.clone()).or_insert(None);
            }
        }
        // One plan at a time starts loads, so overlapping plans see each other's end.
        let _starting = ra.prober.lock().await;
        for (i, name) in names.iter().enumerate() {
            let Ok(permit) = ra.permits.clone().acquire_owned().await else {
                return;
            };
            if !lock(&ra.planned).contains_key(name) {
                continue; // served or dropped meanwhile
            }
            let past_end = match (name.segment(size), lock(&ra.planner).as_ref()) {
                (Ok(Some(id)), Some(p)) => p.past_end(id),
                _ => false,
            };
            if past_end {
                lock(&ra.planned).retain(|n, f| f.is_some() || !names[i..].contains(n));
                return;
            }
            let this = self.clone();
            let name = name.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let ra = &this.readahead;
                match this.load_as(&name, Priority::Background).await {
                    Ok(file) => {
                        this.stats.prefetched.fetch_add(1, Ordering::Relaxed);
                        if let Some(slot) = lock(&ra.planned).get_mut(&name) {
                            *slot = Some(file);
                        }
                    }
                    Err(e) if matches!(e.as_ref(), LoadError::Absent) => {
                        this.stats.absent.fetch_add(1, Ordering::Relaxed);
                        if let Ok(Some(id)) = name.segment(size) {
                            if let Some(p) = lock(&ra.planner).as_mut() {
                                p.missing(id);
                            }
                        }
                        lock(&ra.planned).retain(|n, f| f.is_some() || n < &name);
                    }
                    Err(e) => {
                        // The reader will meet the same error on demand, and report it.
                        tracing::debug!(%name, error = %e, "read-ahead load failed");
                        lock(&ra.planned).remove(&name);
                    }
                }
            });
        }
    }

    /// Read-ahead counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Lets the index finish its pending bookkeeping, so sizes and counts are current.
    pub async fn settle(&self) {
        self.files.run_pending_tasks().await;
    }

    /// Copies the counters into the metrics (`--metrics-addr`).
    pub fn publish_metrics(&self) {
        use crate::telemetry::{set_counter, set_gauge};
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        set_counter("walfs_segment_opens_total", g(&s.requests));
        set_counter("walfs_cache_hits_total", g(&s.hits));
        set_counter("walfs_cache_joined_total", g(&s.joined));
        set_counter("walfs_cache_misses_total", g(&s.misses));
        set_counter("walfs_prefetch_segments_total", g(&s.prefetched));
        set_counter("walfs_prefetch_wasted_total", g(&s.wasted));
        set_counter("walfs_read_stall_milliseconds_total", g(&s.stall_us) / 1000);
        set_gauge("walfs_cache_bytes", self.files.weighted_size() as f64);
        set_gauge("walfs_cache_files", self.files.entry_count() as f64);
        crate::telemetry::tick();
    }

    /// Writes the counters to `stats.json` (atomically) for `walfs status`; `stopped` on the
    /// way out, so status does not mistake a recent file for a live mount.
    pub fn write_stats(&self, stopped: bool) -> io::Result<()> {
        let mut v = self.stats.to_json();
        v["stopped"] = stopped.into();
        v["archive"] = self.archive.url().into();
        v["pid"] = std::process::id().into();
        v["cache_files"] = self.files.entry_count().into();
        v["cache_bytes"] = self.files.weighted_size().into();
        v["updated"] = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .into();
        if let Some(t) = crate::telemetry::last_push() {
            v["last_push"] = t.into();
        }
        crate::telemetry::write_state(&self.stats_path, &v)
    }

    /// The directory of the archive at `url` under `cache_dir` (plain/, writes/, spool/). A
    /// directory an earlier version named after this spelling of the URL is taken over (it
    /// may hold a receiver's spool not uploaded yet).
    pub fn archive_dir(cache_dir: &Path, url: &str) -> PathBuf {
        let dir = cache_dir.join(archive_dir_name(url));
        let legacy = cache_dir.join(legacy_dir_name(url));
        if legacy != dir && legacy.is_dir() {
            if let Err(e) = take_over(&legacy, &dir) {
                tracing::warn!(from = %legacy.display(), error = %e,
                    "could not take over the cache directory of an earlier version");
            }
        }
        dir
    }

    /// The plaintext size of `name`, or None when it is authoritatively not archived. One
    /// small ranged read the first time; remembered after that (archived files never change).
    pub async fn size(&self, name: &ArchiveName) -> Result<Option<u64>, Error> {
        if let Some(s) = self.sizes.get(name) {
            return Ok(Some(s));
        }
        let local = |e: io::Error| Error::Output {
            name: name.to_string(),
            why: format!("reading the receiver's spool: {e}"),
        };
        if let Some(f) = self.spool.open_ready(name).map_err(local)? {
            return Ok(Some(f.metadata().map_err(local)?.len()));
        }
        let size = self.archive.header(name).await?.map(|h| h.plaintext_len);
        if let Some(s) = size {
            self.sizes.insert(name.clone(), s);
            return Ok(size);
        }
        // Not remembered: the complete segment replaces it later.
        if let Some((newest, path)) = self.newest_partial().map_err(local)? {
            if &newest == name {
                match tokio::fs::metadata(path).await {
                    Ok(m) => return Ok(Some(m.len())),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(local(e)),
                }
            }
        }
        if self.serve_partial && name.kind() == FileKind::Segment {
            if let Some(id) = self.archive.identity().await? {
                if self.archive.latest_snapshot(name).await?.is_some() {
                    return Ok(Some(id.wal_segment_size));
                }
            }
        }
        Ok(None)
    }

    /// Archives the first `len` bytes of `file` under `name` and, once durable, serves a copy
    /// from the cache at once.
    pub async fn push_file(
        &self,
        name: &ArchiveName,
        file: std::fs::File,
        len: u64,
    ) -> Result<PushOutcome, Error> {
        let copy = file.try_clone();
        let outcome = self.archive.push_file(name, file, len).await?;
        let landed = copy
            .and_then(|src| tokio::task::block_in_place(|| self.land_copy(name, &src, len, false)));
        match landed {
            Ok(f) => {
                self.sizes.insert(name.clone(), len);
                self.files.insert(name.clone(), f).await;
            }
            // The archive has it; only the shortcut is lost.
            Err(e) => tracing::warn!(%name, error = %e, "could not cache an archived file"),
        }
        Ok(outcome)
    }

    /// Forgets `name` after it was deleted.
    pub async fn forget(&self, name: &ArchiveName) {
        self.files.invalidate(name).await;
        self.sizes.invalidate(name);
    }

    /// Notes a size learnt elsewhere (a listing).
    pub fn note_size(&self, name: &ArchiveName, size: u64) {
        self.sizes.insert(name.clone(), size);
    }

    /// The archive's listing, page by page.
    pub fn list(&self) -> BoxStream<'static, Result<Entry, Error>> {
        self.archive.list(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::SealOptions;
    use object_store::memory::InMemory;
    use object_store::path::Path as StorePath;

    fn cache(dir: &Path, max_bytes: u64) -> Arc<Cache> {
        let archive = Archive::with_store(
            Arc::new(InMemory::new()),
            StorePath::default(),
            "memory:///",
            None,
            SealOptions::default(),
        );
        Arc::new(
            Cache::new(
                Arc::new(archive),
                &CacheOptions {
                    dir: dir.to_path_buf(),
                    max_bytes,
                    prefetch_bytes: 0,
                    prefetch_concurrency: 1,
                    serve_partial: false,
                },
            )
            .unwrap(),
        )
    }

    /// Archives `data` through the cache as the mount does: from a (spool) file.
    async fn push(c: &Cache, name: &ArchiveName, data: &[u8]) {
        let f = tempfile::tempfile().unwrap();
        f.write_all_at(data, 0).unwrap();
        c.push_file(name, f, data.len() as u64).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn write_through_then_read_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 1 << 20);
        let name = ArchiveName::parse("00000002.history").unwrap();
        // No archive yet: that is not "absent".
        assert!(matches!(
            c.open(&name).await.unwrap_err().as_ref(),
            LoadError::Store(Error::NoArchive(_))
        ));
        let first = ArchiveName::parse("000000010000000000000001").unwrap();
        push(
            &c,
            &first,
            &crate::store::test_segment(first.as_str(), 7, 1 << 20),
        )
        .await;
        assert!(matches!(
            c.open(&name).await.unwrap_err().as_ref(),
            LoadError::Absent
        ));
        let body = b"1\t0/3000000\tno recovery target specified\n";
        push(&c, &name, body).await;
        let f = c.open(&name).await.unwrap();
        assert_eq!(f.read_at(0, 1000).unwrap(), body);
        assert_eq!(f.read_at(2, 3).unwrap(), &body[2..5]);
        assert!(f.read_at(1000, 10).unwrap().is_empty());
        assert_eq!(c.size(&name).await.unwrap(), Some(body.len() as u64));
        // Nothing is left on disk under the cache: files live only through descriptors.
        let left: Vec<_> = std::fs::read_dir(&c.plain_dir).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn absent_is_not_cached() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 1 << 20);
        let first = ArchiveName::parse("000000010000000000000001").unwrap();
        push(
            &c,
            &first,
            &crate::store::test_segment(first.as_str(), 7, 1 << 20),
        )
        .await;
        let h1 = ArchiveName::parse("00000002.history").unwrap();
        push(&c, &h1, b"1\t0/3000000\tx\n").await;
        let h3 = ArchiveName::parse("00000003.history").unwrap();
        assert!(matches!(
            c.open(&h3).await.unwrap_err().as_ref(),
            LoadError::Absent
        ));
        assert_eq!(c.size(&h3).await.unwrap(), None);
        let body = b"1\t0/3000000\tx\n2\t0/5000000\ty\n";
        c.archive()
            .push(&h3, bytes::Bytes::from_static(body))
            .await
            .unwrap();
        assert_eq!(c.open(&h3).await.unwrap().read_at(0, 100).unwrap(), body);
    }

    #[test]
    fn one_directory_per_archive_and_earlier_ones_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let a = Cache::archive_dir(dir.path(), "s3://b/p");
        assert_eq!(a, Cache::archive_dir(dir.path(), "s3://b/p/"));
        assert_eq!(
            Cache::archive_dir(dir.path(), "/var/x"),
            Cache::archive_dir(dir.path(), "file:///var/x/")
        );
        // A spool an earlier version left under the hash of this spelling moves over.
        let old = dir.path().join(legacy_dir_name("s3://b/q/"));
        std::fs::create_dir_all(old.join("spool/ready")).unwrap();
        std::fs::write(old.join("spool/ready/000000010000000000000001"), b"x").unwrap();
        let new = Cache::archive_dir(dir.path(), "s3://b/q/");
        assert_ne!(new, old);
        assert!(new.join("spool/ready/000000010000000000000001").exists());
        assert!(!old.exists());
        // Both existed (two spellings in use before): the spooled files join the new one.
        std::fs::create_dir_all(old.join("spool/ready")).unwrap();
        std::fs::write(old.join("spool/ready/000000010000000000000002"), b"y").unwrap();
        let again = Cache::archive_dir(dir.path(), "s3://b/q/");
        assert_eq!(again, new);
        assert!(new.join("spool/ready/000000010000000000000002").exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_spool_that_cannot_be_read_is_never_absence() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 1 << 20);
        let first = ArchiveName::parse("000000010000000000000001").unwrap();
        push(
            &c,
            &first,
            &crate::store::test_segment(first.as_str(), 7, 1 << 20),
        )
        .await;
        // A spooled name that is a directory: opening it for reading fails with EISDIR.
        let name = ArchiveName::parse("000000010000000000000002").unwrap();
        std::fs::create_dir_all(c.spool.ready_path(&name).join("x")).unwrap();
        assert!(matches!(
            c.open(&name).await.unwrap_err().as_ref(),
            LoadError::Local(_)
        ));
    }

    #[test]
    fn decrypted_wal_is_the_service_users_alone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // A cache an older version made world-readable is closed at start.
        let base = Cache::archive_dir(dir.path(), "memory:///");
        std::fs::create_dir_all(base.join("plain")).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = cache(dir.path(), 1 << 20);
        assert_eq!(mode(&base), 0o711);
        assert_eq!(mode(&c.plain_dir), 0o700);
        assert_eq!(mode(&c.writes_dir), 0o700);
        let (f, path) = c
            .new_spool_file(&ArchiveName::parse("00000002.history").unwrap())
            .unwrap();
        assert_eq!(mode(&path), 0o600);
        drop(f);
        let spool = spool_dir(&base);
        Spool::open(&spool).unwrap();
        for d in [&spool, &spool.join("ready"), &spool.join("current")] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
    }
}
