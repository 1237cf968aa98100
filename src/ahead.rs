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
//!    is read whole, hashed (SHA-256, kept in memory only) and pushed as any archived file is
//!    (checked, sealed, create-only, durable before it counts), at most `concurrency` at once.
//! 3. The close of `cp` for that name waits for its job, hashes what `cp` wrote, and succeeds at
//!    once when the hashes match and the job stored (or found) exactly those bytes. Anything
//!    else (no job, a failed job, other bytes) takes the ordinary path: the push of what `cp`
//!    wrote, which a create-only store turns into a conflict if other bytes were stored.
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
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Job {
    /// Waiting for a permit: a close that finds it here takes the ordinary path instead.
    Queued,
    Running,
    /// In the archive, with the SHA-256 of its plaintext.
    Stored([u8; 32]),
    Failed,
}

#[derive(Default)]
struct State {
    dirs: HashSet<PathBuf>,
    jobs: HashMap<ArchiveName, watch::Receiver<Job>>,
    done: VecDeque<ArchiveName>,
    /// Stored (or being stored) by a job though absent before it: hidden until its close.
    hidden: HashSet<ArchiveName>,
}

/// See the module documentation.
pub struct Ahead {
    cache: Arc<Cache>,
    permits: Arc<tokio::sync::Semaphore>,
    permits_total: usize,
    state: Mutex<State>,
    /// Segment buffers, reused: one per running job at most, so memory stays flat.
    buffers: Mutex<Vec<Vec<u8>>>,
}

/// A pooled buffer lent to a push as its bytes.
struct Lent(Arc<Vec<u8>>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Ahead {
    pub fn new(cache: Arc<Cache>, concurrency: usize) -> Arc<Ahead> {
        Arc::new(Ahead {
            cache,
            permits: Arc::new(tokio::sync::Semaphore::new(concurrency.max(1))),
            permits_total: concurrency.max(1),
            state: Mutex::new(State::default()),
            buffers: Mutex::new(Vec::new()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
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
        let rx = {
            let mut st = self.state();
            if st.jobs.len() >= MAX_JOBS || st.jobs.contains_key(&name) || st.done.contains(&name) {
                return;
            }
            let (tx, rx) = watch::channel(Job::Queued);
            st.jobs.insert(name.clone(), rx.clone());
            (tx, rx)
        };
        let (tx, _) = rx;
        let me = self.clone();
        let path = data.join("pg_wal").join(name.as_str());
        tokio::spawn(async move {
            let Some(job) = me.upload(&name, path, owner, &tx).await else {
                // Not yet possible (a new archive): the next scan tries again.
                me.state().jobs.remove(&name);
                let _ = tx.send(Job::Failed);
                return;
            };
            let _ = tx.send(job);
            if job == Job::Failed {
                me.state().hidden.remove(&name);
                tokio::time::sleep(RETRY_AFTER).await;
                let mut st = me.state();
                if st
                    .jobs
                    .get(&name)
                    .is_some_and(|r| *r.borrow() == Job::Failed)
                {
                    st.jobs.remove(&name);
                }
            }
        });
    }

    /// The job's end; None when it cannot run yet (the archive has no identity).
    async fn upload(
        &self,
        name: &ArchiveName,
        path: PathBuf,
        owner: u32,
        tx: &watch::Sender<Job>,
    ) -> Option<Job> {
        let Ok(_permit) = self.permits.clone().acquire_owned().await else {
            return Some(Job::Failed);
        };
        {
            // A close that came while this job waited took the ordinary path, and a scan that
            // no longer sees it ready dropped it: nothing to do then.
            let st = self.state();
            let ours = st
                .jobs
                .get(name)
                .is_some_and(|r| r.same_channel(&tx.subscribe()));
            if !ours || st.done.contains(name) {
                return Some(Job::Failed);
            }
            let _ = tx.send(Job::Running);
        }
        // Only into an archive whose segment size is known (the first close records it).
        let size = match self.cache.archive().identity().await {
            Ok(Some(id)) if id.wal_segment_size <= MAX_SEGMENT => id.wal_segment_size,
            Ok(None) => return None,
            _ => return Some(Job::Failed),
        };
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
            Err(_) => return Some(Job::Failed),
        }
        let mut buf = self
            .buffers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<(Vec<u8>, [u8; 32])> {
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
            let digest = Sha256::digest(&buf).into();
            Ok((buf, digest))
        })
        .await;
        let (data, digest) = match read {
            Ok(Ok((d, h))) if d.len() as u64 == size => (d, h),
            _ => return Some(Job::Failed),
        };
        let data = Arc::new(data);
        let pushed = self
            .cache
            .archive()
            .push(name, Bytes::from_owner(Lent(data.clone())))
            .await;
        if let Ok(buf) = Arc::try_unwrap(data) {
            let mut pool = self.buffers.lock().unwrap_or_else(|p| p.into_inner());
            if pool.len() < self.permits_total {
                pool.push(buf);
            }
        }
        Some(match pushed {
            Ok(PushOutcome::AlreadyArchived) => {
                // Someone stored it first (a close whose answer was lost): it is archived, so
                // never hidden.
                self.state().hidden.remove(name);
                Job::Stored(digest)
            }
            Ok(outcome) => {
                tracing::debug!(%name, ?outcome, "archive-ahead: stored before its cp");
                Job::Stored(digest)
            }
            Err(e) => {
                tracing::debug!(%name, error = %e, "archive-ahead: not stored; the close archives it");
                if e.class() == crate::store::Class::Refused {
                    // A conflict or a refusal is final for this name: no retries.
                    remember(&mut self.state().done, name);
                }
                Job::Failed
            }
        })
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
        let Job::Stored(stored) = job else {
            return false;
        };
        let Ok(f) = file.try_clone() else {
            return false;
        };
        let written = tokio::task::spawn_blocking(move || digest_of(&f, len)).await;
        if !matches!(written, Ok(Ok(d)) if d == stored) {
            return false;
        }
        // Still there, at that size (deleted meanwhile, it must be archived again).
        matches!(self.cache.archive().header(name).await, Ok(Some(h)) if h.plaintext_len == len)
    }

    /// Whether lookups must not see `name` yet (stored ahead, not yet archived by its close).
    pub fn hides(&self, name: &ArchiveName) -> bool {
        self.state().hidden.contains(name)
    }

    /// `name` is archived (by its close, either way): no job for it is needed any more.
    pub fn archived(&self, name: &ArchiveName) {
        let mut st = self.state();
        st.jobs.remove(name);
        st.hidden.remove(name);
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
            false
        });
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

fn digest_of(file: &std::fs::File, len: u64) -> std::io::Result<[u8; 32]> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        h.update(&buf[..n]);
        at += n as u64;
    }
    Ok(h.finalize().into())
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

    #[tokio::test]
    async fn a_directory_that_is_not_postgres_is_not_watched() {
        let r = rig().await;
        let plain = tempfile::tempdir().unwrap();
        r.ahead.watch_dir(plain.path().to_path_buf(), me());
        assert!(r.ahead.state().dirs.is_empty());
    }
}
