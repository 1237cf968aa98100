//! Archive-ahead: the mount seals and uploads the segments PostgreSQL has marked ready before
//! its archive_command's `cp` brings them, so that `cp`'s close only has to confirm that the
//! bytes it wrote are the bytes already stored.
//!
//! PostgreSQL's archiver is serial: it runs `cp %p MOUNT/%f` for one segment, waits for it,
//! then the next. Every close would compress, encrypt, upload and wait for the store while the
//! next segment waits. PostgreSQL runs archive_command with its data directory as working
//! directory and marks every finished segment `pg_wal/archive_status/<name>.ready` first, so:
//!
//! 1. The first file a process creates in the mount names its working directory
//!    (`/proc/PID/cwd`). When that holds `pg_wal/archive_status`, it is a data directory and
//!    is watched (every 100 ms) for `.ready` segments.
//! 2. Each ready segment (a segment name, exactly the archive's segment size, at most 64 MiB)
//!    is read whole and pushed as any archived file is (checked, sealed, create-only, durable
//!    before it counts), at most `concurrency` at once, started one by one lowest segment
//!    first ([`Ahead::dispatch`]), the order PostgreSQL copies them in. The job then keeps the bytes it stored
//!    (the segment buffers of running and stored jobs share [`MEMORY_BUDGET`], so jobs run only
//!    a few segments ahead of `cp`), for at most [`HOLD_MAX`].
//! 3. When `cp` creates that name, the mount borrows those bytes ([`Ahead::lend`], an
//!    [`Expected`]): each write that continues them, byte for byte, is compared and not spooled;
//!    the first write that differs (or skips ahead) spools what matched so far and goes on as
//!    any write. A close whose writes matched them all succeeds at once. A `cp` that came before
//!    its job ended waits for it at its close ([`Ahead::confirms`]) and compares its spool with
//!    the stored bytes instead. Anything else (no job, a failed job, other bytes, bytes no
//!    longer kept) takes the ordinary path: the push of what `cp` wrote, which compares it with
//!    any object already stored under the name (a create-only store never overwrites it).
//!
//! Only what the writer could read itself is read: the data directory must belong to the user
//! the writing process runs as, and each segment is opened without following a link and must
//! be a regular file of that user.
//!
//! A segment the archive did not hold when its job began stays invisible to lookups until its
//! close: `cp` checks whether its destination exists and then creates it exclusively, and a
//! segment appearing between the two would fail that `cp`. Hidden, it looks exactly as it
//! would without archive-ahead: not archived until PostgreSQL's `cp` is. Never hidden: from a
//! server that restores (it is archived, and a wrong "absent" would end its recovery), a
//! segment the archive already held, or one no longer marked ready (a scan drops every job and
//! hide of those). A close waits for its segment's job at most a minute, and not at all for one
//! still queued; then it archives what `cp` wrote itself. A confirmed close still asks the store
//! that the object is there, at that size.
//!
//! Why this never archives wrong bytes: a `.ready` segment is complete, and PostgreSQL reuses
//! its file only after archive_command succeeded, by renaming it first. A job checks after
//! reading that the path is still the same file and still ready, so what it read is the
//! segment's final content; and an upload is create-only, so nothing stored is overwritten.
//! Success is still reported only by the close of `cp`, for bytes the store holds.

use crate::cache::Cache;
use crate::store::PushOutcome;
use crate::wal::{ArchiveName, FileKind};
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::watch;

/// Segments larger than this are left to the close (memory: one segment per running job).
const MAX_SEGMENT: u64 = 64 << 20;
/// Jobs remembered at most (a backlog beyond it waits for the next scan).
const MAX_JOBS: usize = 256;
/// Names archived by a close, remembered so the watcher does not upload them again.
const DONE_KEPT: usize = 1024;
/// How often a data directory's archive_status is read.
const SCAN: Duration = Duration::from_millis(100);
/// A failed job is forgotten after this, so the segment is tried again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The longest a close waits for its segment's running job before archiving what `cp` wrote
/// itself (both are create-only: whichever lands first, the other compares).
const WAIT_MAX: Duration = Duration::from_secs(60);
/// Segment bytes the jobs may hold at once, read or kept for a `cp` to come (6 segments of
/// 16 MiB, or one of 64 MiB): the bound on archive-ahead's memory.
pub const MEMORY_BUDGET: u64 = 96 << 20;
/// Stored bytes no `cp` borrowed within this are let go (its close then compares with the
/// store).
pub const HOLD_MAX: Duration = Duration::from_secs(60);
/// Pooled segment buffers kept for reuse.
const POOL_MAX: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    /// Waiting for a permit: a close that finds it here takes the ordinary path instead.
    Queued,
    Running,
    /// In the archive (its bytes are in `State::held` while kept).
    Stored,
    Failed,
}

#[derive(Default)]
struct State {
    dirs: HashSet<PathBuf>,
    jobs: HashMap<ArchiveName, watch::Receiver<Job>>,
    done: VecDeque<ArchiveName>,
    /// Stored (or being stored) by a job though absent before it: hidden until its close.
    hidden: HashSet<ArchiveName>,
    /// The bytes stored jobs stored, until a `cp` of that name borrows them.
    held: HashMap<ArchiveName, (Held, std::time::Instant)>,
}

/// See the module documentation.
pub struct Ahead {
    cache: Arc<Cache>,
    permits: Arc<tokio::sync::Semaphore>,
    state: Mutex<State>,
    /// Bytes of segment buffers in use, in MiB ([`MEMORY_BUDGET`]).
    memory: Arc<tokio::sync::Semaphore>,
    /// Segment buffers, reused, so memory stays flat.
    buffers: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Jobs waiting to start, lowest segment first (see [`Ahead::dispatch`]).
    queue: Mutex<BTreeMap<ArchiveName, Pending>>,
    queued: tokio::sync::Notify,
    dispatching: AtomicBool,
}

/// A queued job: where its segment is, whose it must be, and its state's sender.
struct Pending {
    path: PathBuf,
    owner: u32,
    tx: watch::Sender<Job>,
}

/// A pooled buffer lent to a push as its bytes.
struct Lent(Arc<Vec<u8>>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// A segment's bytes in a pooled buffer, with their share of the memory budget: both go back
/// when this is dropped.
pub struct Held {
    data: Arc<Vec<u8>>,
    pool: Arc<Mutex<Vec<Vec<u8>>>>,
    _memory: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Held {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        if let Ok(buf) = Arc::try_unwrap(data) {
            let mut pool = self.pool.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < POOL_MAX && buf.capacity() > 0 {
                pool.push(buf);
            }
        }
    }
}

/// The bytes archive-ahead stored under a name, lent to the writer of that name (see the
/// module documentation): how far the writes so far matched them.
pub struct Expected {
    held: Held,
    matched: u64,
}

impl Expected {
    /// A write of `data` at `offset`: true when it continues the stored bytes exactly (then
    /// it needs no spooling).
    pub fn take(&mut self, offset: u64, data: &[u8]) -> bool {
        let stored = &self.held.data;
        let end = offset.saturating_add(data.len() as u64);
        let continues = offset == self.matched
            && end <= stored.len() as u64
            && stored[offset as usize..end as usize] == *data;
        if continues {
            self.matched = end;
        }
        continues
    }

    /// What the writes so far wrote (all of it matched): to spool once they stop matching.
    pub fn written(&self) -> &[u8] {
        &self.held.data[..self.matched as usize]
    }

    /// Whether a file of `len` bytes, written so far, is exactly the stored bytes.
    pub fn complete(&self, len: u64) -> bool {
        self.matched == len && len == self.held.data.len() as u64
    }
}

impl Ahead {
    pub fn new(cache: Arc<Cache>, concurrency: usize) -> Arc<Ahead> {
        Ahead::with_budget(cache, concurrency, MEMORY_BUDGET)
    }

    /// [`Ahead::new`] with another memory budget (bytes).
    pub fn with_budget(cache: Arc<Cache>, concurrency: usize, budget: u64) -> Arc<Ahead> {
        Arc::new(Ahead {
            cache,
            permits: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            state: Mutex::new(State::default()),
            memory: Arc::new(tokio::sync::Semaphore::new((budget >> 20).max(1) as usize)),
            buffers: Arc::new(Mutex::new(Vec::new())),
            queue: Mutex::new(BTreeMap::new()),
            queued: tokio::sync::Notify::new(),
            dispatching: AtomicBool::new(false),
        })
    }

    /// Lock order: [`Ahead::state`] before this, never the other way.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn queue(&self) -> MutexGuard<'_, BTreeMap<ArchiveName, Pending>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Process `pid` creates a file in the mount: watch its working directory if it is a
    /// PostgreSQL data directory of the user it runs as.
    pub fn writer(self: &Arc<Self>, pid: u32) {
        let me = self.clone();
        // /proc and the directory may be slow (a cwd on a hung network file system).
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let Ok(uid) = std::fs::metadata(format!("/proc/{pid}")).map(|m| m.uid()) else {
                return;
            };
            let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) else {
                return;
            };
            if std::fs::metadata(&cwd).is_ok_and(|m| m.uid() == uid) {
                let rt = tokio::runtime::Handle::current();
                let _guard = rt.enter();
                me.watch_dir(cwd, uid);
            }
        });
    }

    /// Watches data directory `data` of user `owner` (once), until its archive_status cannot
    /// be read.
    pub fn watch_dir(self: &Arc<Self>, data: PathBuf, owner: u32) {
        let status = data.join("pg_wal").join("archive_status");
        if !status.is_dir() || !self.state().dirs.insert(data.clone()) {
            return;
        }
        tracing::info!(data = %data.display(), "archive-ahead: watching the ready segments of this data directory");
        let me = self.clone();
        tokio::spawn(async move {
            let mut watched: HashSet<ArchiveName> = HashSet::new();
            loop {
                let s = status.clone();
                let ready = tokio::task::spawn_blocking(move || ready_segments(&s)).await;
                match ready {
                    Ok(Ok(names)) => {
                        let set: HashSet<ArchiveName> = names.iter().cloned().collect();
                        me.forget_unready(&set, &mut watched);
                        // A new archive: its first close records the identity jobs need.
                        let known = !names.is_empty()
                            && matches!(me.cache.archive().identity().await, Ok(Some(_)));
                        for name in names.into_iter().filter(|_| known) {
                            watched.insert(name.clone());
                            me.start(&data, owner, name);
                        }
                    }
                    _ => break,
                }
                tokio::time::sleep(SCAN).await;
            }
            tracing::info!(data = %data.display(), "archive-ahead: stopped watching");
            me.forget_unready(&HashSet::new(), &mut watched);
            me.state().dirs.remove(&data);
        });
    }

    fn start(self: &Arc<Self>, data: &Path, owner: u32, name: ArchiveName) {
        {
            let mut st = self.state();
            if st.jobs.len() >= MAX_JOBS || st.jobs.contains_key(&name) || st.done.contains(&name) {
                return;
            }
            let (tx, rx) = watch::channel(Job::Queued);
            st.jobs.insert(name.clone(), rx);
            let path = data.join("pg_wal").join(name.as_str());
            self.queue().insert(name, Pending { path, owner, tx });
        }
        if !self.dispatching.swap(true, Ordering::AcqRel) {
            tokio::spawn(self.clone().dispatch());
        }
        self.queued.notify_one();
    }

    /// Starts the queued jobs, the lowest segment first, each once a permit and its share of
    /// the memory budget are free. PostgreSQL archives in segment order, so the budget goes
    /// to the segments its `cp` comes for next. (Jobs that raced for the permits themselves
    /// started in the runtime's order, the last queued often first: a far segment then held
    /// the budget, and the nearer segments' closes, finding their jobs still queued, archived
    /// the slow way.) Runs for the life of the mount.
    async fn dispatch(self: Arc<Self>) {
        // Should it ever end (a panic), the next job queued starts another.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _running = Running(&self.dispatching);
        loop {
            let notified = self.queued.notified();
            if self.queue().is_empty() {
                notified.await;
                continue;
            }
            let Ok(permit) = self.permits.clone().acquire_owned().await else {
                return;
            };
            // Only into an archive whose segment size is known (the first close records it).
            let size = match self.cache.archive().identity().await {
                Ok(Some(id)) if id.wal_segment_size <= MAX_SEGMENT => Ok(id.wal_segment_size),
                Ok(None) => Err(None),
                _ => Err(Some(Job::Failed)),
            };
            let memory = match size {
                Ok(size) => {
                    // Still queued while it waits for memory: a close meanwhile does not
                    // wait for it.
                    let mib = u32::try_from((size >> 20).max(1)).unwrap_or(u32::MAX);
                    let Ok(memory) = self.memory.clone().acquire_many_owned(mib).await else {
                        return;
                    };
                    Ok((size, memory))
                }
                Err(e) => Err(e),
            };
            let Some((name, pending)) = self.queue().pop_first() else {
                continue;
            };
            let me = self.clone();
            tokio::spawn(async move { me.run(name, pending, permit, memory).await });
        }
    }

    /// One job, from its start to its end. `memory`: the segment's size and its share of the
    /// budget, or why it cannot run (None: not yet, a new archive).
    async fn run(
        self: Arc<Self>,
        name: ArchiveName,
        pending: Pending,
        permit: tokio::sync::OwnedSemaphorePermit,
        memory: Result<(u64, tokio::sync::OwnedSemaphorePermit), Option<Job>>,
    ) {
        let Pending { path, owner, tx } = pending;
        let job = match memory {
            Ok((size, memory)) => self.upload(&name, path, owner, size, memory, &tx).await,
            Err(Some(job)) => job,
            Err(None) => {
                // Not yet possible (a new archive): the next scan tries again.
                let mut st = self.state();
                if st
                    .jobs
                    .get(&name)
                    .is_some_and(|r| r.same_channel(&tx.subscribe()))
                {
                    st.jobs.remove(&name);
                }
                drop(st);
                let _ = tx.send(Job::Failed);
                return;
            }
        };
        drop(permit);
        let _ = tx.send(job);
        if job == Job::Failed {
            self.state().hidden.remove(&name);
            tokio::time::sleep(RETRY_AFTER).await;
            let mut st = self.state();
            if st
                .jobs
                .get(&name)
                .is_some_and(|r| *r.borrow() == Job::Failed)
            {
                st.jobs.remove(&name);
            }
        }
    }

    /// The job's end: reads the segment (`size` bytes) and stores it, within `memory`.
    async fn upload(
        &self,
        name: &ArchiveName,
        path: PathBuf,
        owner: u32,
        size: u64,
        memory: tokio::sync::OwnedSemaphorePermit,
        tx: &watch::Sender<Job>,
    ) -> Job {
        let ours = |st: &State| {
            st.jobs
                .get(name)
                .is_some_and(|r| r.same_channel(&tx.subscribe()))
                && !st.done.contains(name)
        };
        {
            // A close that came while this job waited took the ordinary path, and a scan that
            // no longer sees it ready dropped it: nothing to do then.
            let st = self.state();
            if !ours(&st) {
                return Job::Failed;
            }
            let _ = tx.send(Job::Running);
        }
        match self.cache.size(name).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                // Under the lock `archived` takes: a close that archived it meanwhile wins,
                // and nothing archived is ever hidden afterwards.
                let mut st = self.state();
                if !st.done.contains(name) {
                    st.hidden.insert(name.clone());
                }
            }
            Err(_) => return Job::Failed,
        }
        let mut buf = self
            .buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            use std::io::Read;
            use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
            let mut f = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)?;
            let m = f.metadata()?;
            if !m.is_file() || m.uid() != owner || m.len() != size {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            let ready = path.parent().map(|wal| {
                wal.join("archive_status").join(format!(
                    "{}.ready",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ))
            });
            buf.clear();
            buf.reserve(size as usize);
            f.read_to_end(&mut buf)?;
            // Still this segment, still ready: PostgreSQL renames a segment for reuse only
            // after it is done, so these bytes are its final ones.
            let now = std::fs::symlink_metadata(&path)?;
            let still_ready = ready.is_some_and(|r| r.exists());
            if now.ino() != m.ino() || now.dev() != m.dev() || !still_ready {
                return Err(std::io::ErrorKind::InvalidData.into());
            }
            Ok(buf)
        })
        .await;
        let data = match read {
            Ok(Ok(d)) if d.len() as u64 == size => d,
            _ => return Job::Failed,
        };
        let data = Arc::new(data);
        let pushed = self
            .cache
            .archive()
            .push(name, Bytes::from_owner(Lent(data.clone())))
            .await;
        let held = Held {
            data,
            pool: self.buffers.clone(),
            _memory: memory,
        };
        match pushed {
            Ok(outcome) => {
                let mut st = self.state();
                if outcome == PushOutcome::AlreadyArchived {
                    // Someone stored it first (a close whose answer was lost): it is archived,
                    // so never hidden; the push compared it with these bytes.
                    st.hidden.remove(name);
                }
                tracing::debug!(%name, ?outcome, "archive-ahead: stored before its cp");
                // Kept for its cp, unless that cp came and went meanwhile.
                if ours(&st) {
                    st.held
                        .insert(name.clone(), (held, std::time::Instant::now()));
                    // Stored and kept in one step: a writer that sees either can borrow.
                    let _ = tx.send(Job::Stored);
                }
                Job::Stored
            }
            Err(e) => {
                tracing::debug!(%name, error = %e, "archive-ahead: not stored; the close archives it");
                if e.class() == crate::store::Class::Refused {
                    // A conflict or a refusal is final for this name: no retries.
                    remember(&mut self.state().done, name);
                }
                Job::Failed
            }
        }
    }

    /// The stored bytes of `name`, for its writer to compare its writes with (see
    /// [`Expected`]); None unless a job stored them and still keeps them.
    pub fn lend(&self, name: &ArchiveName) -> Option<Expected> {
        let mut st = self.state();
        let stored = st
            .jobs
            .get(name)
            .is_some_and(|r| *r.borrow() == Job::Stored);
        if !stored {
            return None;
        }
        st.held
            .remove(name)
            .map(|(held, _)| Expected { held, matched: 0 })
    }

    /// The close of a writer whose writes were exactly the bytes a job stored (`expected`
    /// complete at `len`): true when the store still holds that object at that size (deleted
    /// meanwhile, it must be archived again).
    pub async fn confirms_expected(
        &self,
        name: &ArchiveName,
        expected: &Expected,
        len: u64,
    ) -> bool {
        expected.complete(len) && self.still_stored(name, len).await
    }

    /// Whether the store still holds `name` at `len` bytes (for a close whose writes were
    /// exactly the bytes a job stored: deleted meanwhile, it must be archived again).
    pub async fn still_stored(&self, name: &ArchiveName, len: u64) -> bool {
        matches!(self.cache.archive().header(name).await, Ok(Some(h)) if h.plaintext_len == len)
    }

    /// The close of `cp` for `name`, whose first `len` bytes of `file` it wrote: true when
    /// archive-ahead stored exactly these bytes (the close may report success at once).
    /// Waits for a running job of that name first, always.
    pub async fn confirms(&self, name: &ArchiveName, file: &std::fs::File, len: u64) -> bool {
        let rx = self.state().jobs.get(name).cloned();
        let Some(mut rx) = rx else {
            return false;
        };
        let wait = async {
            loop {
                let j = *rx.borrow_and_update();
                if j == Job::Queued {
                    // Not started: this close archives it; the job must not start.
                    let mut st = self.state();
                    self.queue().remove(name);
                    st.jobs.remove(name);
                    st.hidden.remove(name);
                    remember(&mut st.done, name);
                    return Job::Failed;
                }
                if j != Job::Running {
                    return j;
                }
                if rx.changed().await.is_err() {
                    return Job::Failed;
                }
            }
        };
        let job = tokio::time::timeout(WAIT_MAX, wait)
            .await
            .unwrap_or(Job::Failed);
        if job != Job::Stored {
            return false;
        }
        let Some(expected) = self.lend(name) else {
            // Let go (kept too long) or already lent: the ordinary path compares.
            return false;
        };
        let Ok(f) = file.try_clone() else {
            return false;
        };
        let (same, expected) =
            match tokio::task::spawn_blocking(move || (same_bytes(&f, len, &expected), expected))
                .await
            {
                Ok(r) => r,
                Err(_) => return false,
            };
        same && self
            .confirms_expected(
                name,
                &Expected {
                    matched: len,
                    ..expected
                },
                len,
            )
            .await
    }

    /// Whether a job stored `name` and keeps its bytes for a writer to borrow.
    pub fn keeps(&self, name: &ArchiveName) -> bool {
        self.state().held.contains_key(name)
    }

    /// Whether lookups must not see `name` yet (stored ahead, not yet archived by its close).
    pub fn hides(&self, name: &ArchiveName) -> bool {
        self.state().hidden.contains(name)
    }

    /// `name` is archived (by its close, either way): no job for it is needed any more.
    pub fn archived(&self, name: &ArchiveName) {
        let mut st = self.state();
        self.queue().remove(name);
        st.jobs.remove(name);
        st.hidden.remove(name);
        st.held.remove(name);
        remember(&mut st.done, name);
    }

    /// Drops every job and hide of `data`'s segments that are no longer ready: PostgreSQL
    /// renames `.ready` to `.done` only after archive_command succeeded (through this mount or
    /// not), and a job never outlives its segment's readiness.
    fn forget_unready(&self, ready: &HashSet<ArchiveName>, watched: &mut HashSet<ArchiveName>) {
        let mut st = self.state();
        watched.retain(|n| {
            if ready.contains(n) {
                return true;
            }
            st.hidden.remove(n);
            st.jobs.remove(n);
            st.held.remove(n);
            self.queue().remove(n);
            false
        });
        // Bytes no cp came for within HOLD_MAX: let go, so jobs for later segments can run.
        st.held.retain(|_, (_, since)| since.elapsed() < HOLD_MAX);
    }
}

fn remember(done: &mut VecDeque<ArchiveName>, name: &ArchiveName) {
    if !done.contains(name) {
        done.push_back(name.clone());
        if done.len() > DONE_KEPT {
            done.pop_front();
        }
    }
}

/// The segments marked `.ready` in an archive_status directory, oldest first.
fn ready_segments(status: &Path) -> std::io::Result<Vec<ArchiveName>> {
    let mut names: Vec<ArchiveName> = std::fs::read_dir(status)?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let f = e.file_name();
            let n = f.to_str()?.strip_suffix(".ready")?;
            ArchiveName::parse(n)
                .ok()
                .filter(|n| n.kind() == FileKind::Segment)
        })
        .collect();
    names.sort();
    Ok(names)
}

/// Whether the first `len` bytes of `file` are exactly the stored bytes of `expected`.
fn same_bytes(file: &std::fs::File, len: u64, expected: &Expected) -> bool {
    let stored = &expected.held.data;
    if len != stored.len() as u64 {
        return false;
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        if file.read_exact_at(&mut buf[..n], at).is_err()
            || buf[..n] != stored[at as usize..at as usize + n]
        {
            return false;
        }
        at += n as u64;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheOptions;
    use crate::envelope::SealOptions;
    use crate::store::faults::{Fault, FaultyStore, Op};
    use crate::store::{test_segment, Archive};
    use object_store::memory::InMemory;
    use object_store::path::Path as StorePath;
    use std::io::Write;

    const SEG1: &str = "000000010000000000000001";
    const SEG2: &str = "000000010000000000000002";
    const SEG3: &str = "000000010000000000000003";

    struct Rig {
        ahead: Arc<Ahead>,
        store: Arc<FaultyStore>,
        archive: Arc<Archive>,
        data: tempfile::TempDir,
        _cache: tempfile::TempDir,
    }

    /// A data directory with SEG2 and SEG3 ready, over an archive that holds SEG1.
    async fn rig() -> Rig {
        let store = FaultyStore::new(Arc::new(InMemory::new()));
        let archive = Arc::new(Archive::with_store(
            store.clone(),
            StorePath::from("pfx"),
            "memory:///pfx",
            None,
            SealOptions::default(),
        ));
        let n1 = ArchiveName::parse(SEG1).unwrap();
        archive
            .push(&n1, test_segment(SEG1, 7, 1 << 20))
            .await
            .unwrap();
        let data = tempfile::tempdir().unwrap();
        let status = data.path().join("pg_wal/archive_status");
        std::fs::create_dir_all(&status).unwrap();
        for s in [SEG2, SEG3] {
            std::fs::write(
                data.path().join("pg_wal").join(s),
                test_segment(s, 7, 1 << 20),
            )
            .unwrap();
            std::fs::write(status.join(format!("{s}.ready")), b"").unwrap();
        }
        std::fs::write(status.join(format!("{SEG1}.done")), b"").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(
            Cache::new(
                archive.clone(),
                &CacheOptions {
                    dir: dir.path().to_path_buf(),
                    max_bytes: 64 << 20,
                    prefetch_bytes: 0,
                    prefetch_concurrency: 1,
                    serve_partial: false,
                },
            )
            .unwrap(),
        );
        Rig {
            ahead: Ahead::new(cache, 2),
            store,
            archive,
            data,
            _cache: dir,
        }
    }

    /// Waits until the watcher took up `name` (a close that comes first takes the ordinary path).
    async fn taken_up(r: &Rig, name: &str) {
        let n = ArchiveName::parse(name).unwrap();
        for _ in 0..100 {
            if r.ahead.state().jobs.contains_key(&n) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{name} was not taken up");
    }

    fn me() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    /// What `cp` wrote into the mount's spool.
    fn spool(bytes: &[u8]) -> std::fs::File {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    async fn stored(r: &Rig, name: &str) -> Option<Vec<u8>> {
        r.archive
            .fetch(&ArchiveName::parse(name).unwrap())
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn ready_segments_are_stored_before_cp_and_its_close_confirms_them() {
        let r = rig().await;
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        let n2 = ArchiveName::parse(SEG2).unwrap();
        let seg2 = test_segment(SEG2, 7, 1 << 20);
        taken_up(&r, SEG2).await;
        // The close waits for the job, and confirms the same bytes.
        assert!(
            r.ahead
                .confirms(&n2, &spool(&seg2), seg2.len() as u64)
                .await
        );
        assert_eq!(stored(&r, SEG2).await.as_deref(), Some(&seg2[..]));
        // Other bytes under that name are not confirmed (the ordinary path then conflicts).
        let mut other = seg2.to_vec();
        other[5000] ^= 1;
        assert!(
            !r.ahead
                .confirms(&n2, &spool(&other), other.len() as u64)
                .await
        );
        // A short write is not confirmed either.
        assert!(
            !r.ahead
                .confirms(&n2, &spool(&seg2), seg2.len() as u64 - 1)
                .await
        );
        assert!(
            r.ahead.hides(&n2),
            "absent before its job: hidden until its close"
        );
        r.ahead.archived(&n2);
        assert!(!r.ahead.hides(&n2));
        assert!(
            !r.ahead
                .confirms(&n2, &spool(&seg2), seg2.len() as u64)
                .await
        );
        // The one already done (.done) and unknown names have no job.
        let n1 = ArchiveName::parse(SEG1).unwrap();
        assert!(!r.ahead.confirms(&n1, &spool(b"x"), 1).await);
        let n3 = ArchiveName::parse(SEG3).unwrap();
        let seg3 = test_segment(SEG3, 7, 1 << 20);
        taken_up(&r, SEG3).await;
        assert!(
            r.ahead
                .confirms(&n3, &spool(&seg3), seg3.len() as u64)
                .await
        );
    }

    #[tokio::test]
    async fn a_failed_upload_is_never_confirmed() {
        let r = rig().await;
        r.store.inject(Op::Put, "", Fault::Error, None);
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        let n2 = ArchiveName::parse(SEG2).unwrap();
        let seg2 = test_segment(SEG2, 7, 1 << 20);
        // Give the watcher time to start the job.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !r.ahead
                .confirms(&n2, &spool(&seg2), seg2.len() as u64)
                .await
        );
        r.store.clear();
        assert!(!r.ahead.hides(&n2), "a failed job hides nothing");
        assert_eq!(stored(&r, SEG2).await, None);
    }

    #[tokio::test]
    async fn links_and_other_users_files_are_not_read() {
        let r = rig().await;
        let wal = r.data.path().join("pg_wal");
        // SEG2 is a link to a file elsewhere: never read; SEG3 is stored.
        let elsewhere = r.data.path().join("elsewhere");
        std::fs::rename(wal.join(SEG2), &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, wal.join(SEG2)).unwrap();
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        let (n2, n3) = (
            ArchiveName::parse(SEG2).unwrap(),
            ArchiveName::parse(SEG3).unwrap(),
        );
        let (seg2, seg3) = (
            test_segment(SEG2, 7, 1 << 20),
            test_segment(SEG3, 7, 1 << 20),
        );
        taken_up(&r, SEG3).await;
        assert!(
            r.ahead
                .confirms(&n3, &spool(&seg3), seg3.len() as u64)
                .await
        );
        assert!(
            !r.ahead
                .confirms(&n2, &spool(&seg2), seg2.len() as u64)
                .await
        );
        assert_eq!(stored(&r, SEG2).await, None);

        // Files of another user than the directory's owner are not read.
        let r = rig().await;
        r.ahead.watch_dir(r.data.path().to_path_buf(), me() + 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !r.ahead
                .confirms(&n3, &spool(&seg3), seg3.len() as u64)
                .await
        );
        assert_eq!(stored(&r, SEG3).await, None);
    }

    #[tokio::test]
    async fn a_segment_archived_before_its_job_is_never_hidden() {
        let r = rig().await;
        let n2 = ArchiveName::parse(SEG2).unwrap();
        let seg2 = test_segment(SEG2, 7, 1 << 20);
        r.archive.push(&n2, seg2.clone()).await.unwrap();
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        taken_up(&r, SEG2).await;
        assert!(
            r.ahead
                .confirms(&n2, &spool(&seg2), seg2.len() as u64)
                .await
        );
        assert!(!r.ahead.hides(&n2));
    }

    #[tokio::test]
    async fn a_segment_its_close_archived_first_is_never_hidden() {
        let r = rig().await;
        let n2 = ArchiveName::parse(SEG2).unwrap();
        // The close archived it (ordinary path) before the watcher's job looked.
        r.ahead.archived(&n2);
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        taken_up(&r, SEG3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!r.ahead.hides(&n2));
        assert!(
            !r.ahead.state().jobs.contains_key(&n2),
            "no job for an archived name"
        );
    }

    #[tokio::test]
    async fn a_segment_no_longer_ready_is_neither_hidden_nor_waited_for() {
        let r = rig().await;
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        taken_up(&r, SEG2).await;
        let n2 = ArchiveName::parse(SEG2).unwrap();
        let seg2 = test_segment(SEG2, 7, 1 << 20);
        assert!(
            r.ahead
                .confirms(&n2, &spool(&seg2), seg2.len() as u64)
                .await
        );
        assert!(r.ahead.hides(&n2));
        // Archived elsewhere (not through this mount's close): PostgreSQL marks it done.
        let status = r.data.path().join("pg_wal/archive_status");
        std::fs::rename(
            status.join(format!("{SEG2}.ready")),
            status.join(format!("{SEG2}.done")),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!r.ahead.hides(&n2));
        assert!(!r.ahead.state().jobs.contains_key(&n2));
    }

    #[tokio::test]
    async fn a_close_never_waits_for_a_job_still_queued() {
        let mut r = rig().await;
        r.ahead = Ahead::new(r.ahead.cache.clone(), 1);
        // The only permit is held by SEG2's slow upload; SEG3's job waits in the queue.
        r.store
            .inject(Op::Put, SEG2, Fault::Latency(Duration::from_secs(2)), None);
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        taken_up(&r, SEG3).await;
        let n3 = ArchiveName::parse(SEG3).unwrap();
        let seg3 = test_segment(SEG3, 7, 1 << 20);
        let began = std::time::Instant::now();
        assert!(
            !r.ahead
                .confirms(&n3, &spool(&seg3), seg3.len() as u64)
                .await
        );
        assert!(
            began.elapsed() < Duration::from_secs(1),
            "{:?}",
            began.elapsed()
        );
        // That job never runs: the close archives it.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(stored(&r, SEG3).await, None);
        r.store.clear();
    }

    async fn kept(r: &Rig, name: &str) -> ArchiveName {
        let n = ArchiveName::parse(name).unwrap();
        for _ in 0..200 {
            if r.ahead.keeps(&n) {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{name} was not stored and kept");
    }

    #[tokio::test]
    async fn a_writer_borrows_the_stored_bytes_and_only_exactly_them_confirm() {
        let r = rig().await;
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        let n2 = kept(&r, SEG2).await;
        let seg2 = test_segment(SEG2, 7, 1 << 20);
        let len = seg2.len() as u64;
        let mut e = r.ahead.lend(&n2).expect("lent");
        assert!(r.ahead.lend(&n2).is_none(), "lent once");
        for (i, part) in seg2.chunks(128 << 10).enumerate() {
            assert!(e.take((i * (128 << 10)) as u64, part));
        }
        assert!(r.ahead.confirms_expected(&n2, &e, len).await);
        assert!(!r.ahead.confirms_expected(&n2, &e, len - 1).await);
        // Deleted from the store meanwhile: not confirmed (the close archives it again).
        r.archive.delete(&n2).await.unwrap();
        assert!(!r.ahead.confirms_expected(&n2, &e, len).await);

        let n3 = kept(&r, SEG3).await;
        let seg3 = test_segment(SEG3, 7, 1 << 20);
        let mut e = r.ahead.lend(&n3).expect("lent");
        assert!(e.take(0, &seg3[..4096]));
        // Out of order, past the end, or other bytes: not taken, and nothing more matches.
        assert!(!e.take(8192, &seg3[8192..9000]));
        assert!(!e.take(4096, &[1u8; 5]));
        let mut longer = seg3[4096..].to_vec();
        longer.push(0);
        assert!(!e.take(4096, &longer));
        assert_eq!(e.written(), &seg3[..4096], "what matched, to spool");
        assert!(!e.complete(seg3.len() as u64));
        assert!(!r.ahead.confirms_expected(&n3, &e, 4096).await);
    }

    #[tokio::test]
    async fn jobs_run_ahead_only_as_far_as_the_memory_budget() {
        let mut r = rig().await;
        // Two segments' worth: SEG2 and SEG3 are kept, SEG4 waits for a borrower to finish.
        const SEG4: &str = "000000010000000000000004";
        let status = r.data.path().join("pg_wal/archive_status");
        std::fs::write(
            r.data.path().join("pg_wal").join(SEG4),
            test_segment(SEG4, 7, 1 << 20),
        )
        .unwrap();
        std::fs::write(status.join(format!("{SEG4}.ready")), b"").unwrap();
        r.ahead = Ahead::with_budget(r.ahead.cache.clone(), 2, 2 << 20);
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        let n2 = kept(&r, SEG2).await;
        kept(&r, SEG3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(stored(&r, SEG4).await, None, "past the budget");
        // A borrower done with SEG2's bytes frees their share: SEG4 goes.
        drop(r.ahead.lend(&n2).expect("lent"));
        kept(&r, SEG4).await;
        assert!(stored(&r, SEG4).await.is_some());
    }

    /// On the mount's runtime (several workers), with a budget of one segment and many ready:
    /// the segment kept is always the next one PostgreSQL copies, then the one after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_start_in_segment_order_so_the_budget_goes_to_the_next_cp() {
        let mut r = rig().await;
        let status = r.data.path().join("pg_wal/archive_status");
        let more: Vec<String> = (4..=9)
            .map(|i| format!("0000000100000000000000{i:02X}"))
            .collect();
        for s in &more {
            std::fs::write(
                r.data.path().join("pg_wal").join(s),
                test_segment(s, 7, 1 << 20),
            )
            .unwrap();
            std::fs::write(status.join(format!("{s}.ready")), b"").unwrap();
        }
        r.ahead = Ahead::with_budget(r.ahead.cache.clone(), 4, 1 << 20);
        r.ahead.watch_dir(r.data.path().to_path_buf(), me());
        let mut order = vec![SEG2.to_string(), SEG3.to_string()];
        order.extend(more);
        for s in order.iter().take(4) {
            let n = kept(&r, s).await;
            // Only it holds the budget: nothing later was stored meanwhile.
            for later in order.iter().skip_while(|o| *o != s).skip(1) {
                assert_eq!(stored(&r, later).await, None, "{later} stored before {s}");
            }
            drop(r.ahead.lend(&n).expect("lent"));
        }
    }

    #[tokio::test]
    async fn a_directory_that_is_not_postgres_is_not_watched() {
        let r = rig().await;
        let plain = tempfile::tempdir().unwrap();
        r.ahead.watch_dir(plain.path().to_path_buf(), me());
        assert!(r.ahead.state().dirs.is_empty());
    }
}
