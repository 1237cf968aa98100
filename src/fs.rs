//! The mount's filesystem logic, free of FUSE: the archive as one flat directory of inodes,
//! the write protocol that archives a file when it is closed, and the read path under the
//! restore policy. `crate::fuse` is the thin adapter that turns kernel requests into these
//! calls and [`FsError`]s into errnos (the one mapping, [`FsError::errno`]).
//!
//! Writing (`cp %p MOUNT/%f`): `create` gives a spool file in the cache directory; writes land
//! there; the close that `cp` checks (FUSE `flush`) seals and uploads it with put-if-absent and
//! succeeds only once the store confirmed. An archived name is immutable, so nothing that
//! may be incomplete is ever archived:
//! - a flush of a duplicate descriptor while the process holds another one (a shell
//!   redirection's `open, dup2, close`, or `cmd >&3`) archives nothing yet: the last close
//!   does; a last close with nothing ever written is an empty file, refused;
//! - a flush from an exiting process (a writer killed mid-file: the kernel closes its files)
//!   archives nothing;
//! - `fsync` makes the spool durable and archives nothing (a writer may fsync part-way);
//! - the store refuses empty, cut or malformed files of every kind (`crate::store`).
//!
//! Reading (`cp MOUNT/%f %p`): `lookup` answers with the exact size from a small ranged read,
//! `open` fetches and authenticates the whole object into the cache first. Every failure other
//! than authoritative absence goes through [`crate::restore::Policy`]: a recovering server's
//! read waits for the store, or has its restore_command killed so PostgreSQL stops with FATAL;
//! it never sees ENOENT for a file it cannot get.
//!
//! The root's `backups/` subdirectory (base backups as tar files, read-only) is
//! [`crate::backupfs`]; this module only routes its inodes and handles there.

use crate::backupfs::{self, BackupFs};
use crate::cache::{Cache, CachedFile, LoadError};
use crate::caller::{Processes, Role};
use crate::restore::{Policy, Refusal, Trouble};
use crate::store::{Entry as Listed, Error as StoreError, PushOutcome};
use crate::wal::{ArchiveName, FileKind};
use futures::stream::{BoxStream, StreamExt};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

pub const ROOT: u64 = 1;
/// The first inode of an archived file (those below are fixed: the root, `backups`).
const FIRST_FILE_INO: u64 = 16;
/// Archived files never change: the kernel may keep their attributes a while.
pub const TTL_ARCHIVED: Duration = Duration::from_secs(60);
pub const TTL_ROOT: Duration = Duration::from_secs(1);
/// No file PostgreSQL archives is larger than the largest segment.
const MAX_FILE: u64 = 1 << 30;

/// How the mount behaves.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub uid: u32,
    pub gid: u32,
    pub read_only: bool,
    pub allow_delete: bool,
    pub allow_other: bool,
    /// Try FUSE passthrough for reads of cached files.
    pub passthrough: bool,
}

/// Why a request failed; [`FsError::errno`] is the one place these become errnos.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsError {
    /// ENOENT: authoritatively not in the archive (or not a name it could hold).
    NotFound,
    /// EEXIST: another file is archived under this name.
    Exists,
    /// EINVAL: not a WAL archive name, or content the archive refuses.
    Invalid,
    /// EBUSY: a writer and a reader, or two writers, on one name.
    Busy,
    /// EPERM: not allowed on this mount.
    NotPermitted,
    /// EROFS: a read-only mount.
    ReadOnly,
    /// EBADF: no such handle.
    BadHandle,
    /// EFBIG: larger than any WAL file.
    TooBig,
    /// ENOTDIR.
    NotDir,
    /// EINTR: the caller was killed while it waited.
    Interrupted,
    /// EIO: anything else; never taken for absence by walfs itself.
    Io,
}

impl FsError {
    pub fn errno(self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::Invalid => libc::EINVAL,
            FsError::Busy => libc::EBUSY,
            FsError::NotPermitted => libc::EPERM,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::TooBig => libc::EFBIG,
            FsError::NotDir => libc::ENOTDIR,
            FsError::Interrupted => libc::EINTR,
            FsError::Io => libc::EIO,
        }
    }

    /// A failed archive write (close, fsync).
    fn from_push(e: &StoreError) -> FsError {
        match e {
            StoreError::Conflict { .. } => FsError::Exists,
            StoreError::Refused { .. } => FsError::Invalid,
            _ => FsError::Io,
        }
    }

    fn local(e: &std::io::Error) -> FsError {
        match e.raw_os_error() {
            Some(libc::EFBIG) => FsError::TooBig,
            _ => FsError::Io,
        }
    }
}

/// What the kernel is told about a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub dir: bool,
    /// How long the kernel may keep it.
    pub ttl: Duration,
}

impl Attr {
    fn file(ino: u64, size: u64, ttl: Duration) -> Attr {
        Attr {
            ino,
            size,
            dir: false,
            ttl,
        }
    }
}

/// A file being written through the mount.
struct Writer {
    file: std::fs::File,
    path: PathBuf,
    len: u64,
    /// Bumped by every change; `archived` is the version last archived (0: nothing written).
    version: u64,
    archived: u64,
    /// An archive of this file is under way: writes wait for its outcome.
    sealing: bool,
    /// Archive-ahead stored this name: while the writes continue its bytes, they are compared,
    /// not spooled (`file` holds nothing yet; `len` bytes matched).
    expect: Option<crate::ahead::Expected>,
}

impl Writer {
    fn dirty(&self) -> bool {
        self.version != self.archived
    }

    /// A write at `offset`: compared with archive-ahead's bytes while it continues them,
    /// else spooled (after what matched so far).
    fn write_at(&mut self, data: &[u8], offset: u64) -> std::io::Result<()> {
        if let Some(e) = self.expect.as_mut() {
            if e.take(offset, data) {
                return Ok(());
            }
        }
        self.spool_expected()?;
        self.file.write_all_at(data, offset)
    }

    /// Spools what matched archive-ahead's bytes and stops comparing: anything but a write
    /// that continues them needs the spool to hold every byte written.
    fn spool_expected(&mut self) -> std::io::Result<()> {
        if let Some(e) = &self.expect {
            // Kept until they are on the spool: a failed write loses nothing.
            self.file.write_all_at(e.written(), 0)?;
        }
        self.expect = None;
        Ok(())
    }

    /// Whether every byte written is exactly what archive-ahead stored.
    fn wrote_stored_bytes(&self) -> bool {
        self.expect.as_ref().is_some_and(|e| e.complete(self.len))
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

struct WriteFile {
    state: Mutex<Writer>,
    /// One archive at a time per file (two descriptors closed at once).
    archiving: tokio::sync::Mutex<()>,
}

impl WriteFile {
    fn lock(&self) -> MutexGuard<'_, Writer> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Node {
    name: ArchiveName,
    lookups: u64,
    writer: Option<Arc<WriteFile>>,
    /// Open read handles: a write may not start under a reader's page cache.
    readers: u32,
    /// A writer went through the kernel's page cache for this inode: its pages may hold
    /// bytes the archive refused, so the next read-open must make the kernel drop them.
    stale_pages: bool,
}

/// A directory listing in progress: the backend's stream and where the kernel is in it.
struct DirCursor {
    stream: Option<BoxStream<'static, Result<Listed, StoreError>>>,
    /// The offset the kernel asks for to continue this listing.
    next: u64,
    pending: Option<Listed>,
    /// The archive's segment size: a listed segment's size needs no request of its own.
    segment_size: Option<u64>,
    /// Spooled names not (yet) seen in the archive's listing, listed after it (last first).
    spooled: Vec<ArchiveName>,
    /// Whether `backups` is listed (the archive holds a backup).
    backups: bool,
}

enum Open {
    Read {
        ino: u64,
        file: Arc<CachedFile>,
    },
    Write {
        name: ArchiveName,
        writer: Arc<WriteFile>,
    },
    Dir(Arc<tokio::sync::Mutex<DirCursor>>),
    /// A file of the `backups/` view.
    View(backupfs::Reader),
    /// A directory of the `backups/` view and its entries, read at the first readdir.
    ViewDir(u64, tokio::sync::Mutex<Option<Vec<(u64, bool, String)>>>),
}

/// A file opened for reading.
pub struct Opened {
    pub fh: u64,
    /// The verified plaintext (for passthrough); None for a write handle.
    pub file: Option<Arc<CachedFile>>,
    /// The kernel may keep the inode's cached pages (nothing changed them).
    pub keep_cache: bool,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<ArchiveName, u64>,
    next_ino: u64,
    handles: HashMap<u64, Arc<Open>>,
    next_fh: u64,
}

impl State {
    /// Counts one kernel lookup of `name` and returns its inode.
    fn remember(&mut self, name: &ArchiveName) -> u64 {
        if let Some(&ino) = self.by_name.get(name) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.lookups += 1;
            }
            return ino;
        }
        self.next_ino = self.next_ino.max(FIRST_FILE_INO) + 1;
        let ino = self.next_ino;
        self.nodes.insert(
            ino,
            Node {
                name: name.clone(),
                lookups: 1,
                writer: None,
                readers: 0,
                stale_pages: false,
            },
        );
        self.by_name.insert(name.clone(), ino);
        ino
    }

    fn drop_if_unused(&mut self, ino: u64) {
        if let Some(n) = self.nodes.get(&ino) {
            if n.lookups == 0 && n.writer.is_none() && n.readers == 0 {
                self.by_name.remove(&n.name);
                self.nodes.remove(&ino);
            }
        }
    }

    fn add_handle(&mut self, open: Open) -> u64 {
        self.next_fh += 1;
        self.handles.insert(self.next_fh, Arc::new(open));
        self.next_fh
    }

    fn node(&self, ino: u64) -> Result<&Node, FsError> {
        self.nodes.get(&ino).ok_or(FsError::NotFound)
    }
}

/// A stable, unregistered inode number for readdir's `d_ino` (the kernel looks names up
/// before it uses them).
pub fn listing_ino(name: &ArchiveName) -> u64 {
    let d = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        name.as_str(),
    ));
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_le_bytes(b) >> 1) | (1 << 62)
}

fn parse_child(parent: u64, name: &OsStr) -> Option<ArchiveName> {
    if parent != ROOT {
        return None;
    }
    ArchiveName::parse(name.to_str()?).ok()
}

/// The filesystem: see the module documentation.
pub struct Fs {
    cache: Arc<Cache>,
    opts: MountOptions,
    policy: Policy,
    procs: Arc<dyn Processes>,
    state: Mutex<State>,
    backups: BackupFs,
    /// Archive-ahead (`crate::ahead`), on a read-write mount that has it on.
    ahead: Option<Arc<crate::ahead::Ahead>>,
}

impl Fs {
    pub fn new(
        cache: Arc<Cache>,
        opts: MountOptions,
        policy: Policy,
        procs: Arc<dyn Processes>,
    ) -> Fs {
        Fs {
            backups: BackupFs::new(cache.archive().clone()),
            cache,
            opts,
            policy,
            procs,
            state: Mutex::new(State::default()),
            ahead: None,
        }
    }

    /// Turns archive-ahead on (see `crate::ahead`).
    pub fn with_ahead(mut self, ahead: Arc<crate::ahead::Ahead>) -> Fs {
        self.ahead = Some(ahead);
        self
    }

    /// A process is creating a file in the mount (archive-ahead watches its data directory,
    /// if it runs in one). Runs inside the async runtime.
    pub fn writer_seen(&self, pid: u32) {
        if let Some(a) = &self.ahead {
            a.writer(pid);
        }
    }

    pub fn options(&self) -> &MountOptions {
        &self.opts
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn handle(&self, fh: u64) -> Result<Arc<Open>, FsError> {
        self.state()
            .handles
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// A read that gave up: a recovery is stopped (its restore_command killed: FATAL, not
    /// "absent"); anyone else gets EIO, or EINTR when it was killed while waiting.
    fn refused(&self, pid: u32, what: &ArchiveName, r: Refusal) -> FsError {
        if r.interrupted {
            return FsError::Interrupted;
        }
        if r.fatal {
            match self.procs.stop(pid) {
                Ok(()) => tracing::error!(file = %what, pid,
                    "killed restore_command process {pid}: PostgreSQL stops the recovery with \
                     FATAL instead of promoting"),
                Err(e) => tracing::error!(file = %what, pid, error = %e,
                    "could not kill restore_command process {pid}; it gets EIO"),
            }
        }
        FsError::Io
    }

    /// The size of `name` under the restore policy (None: authoritatively absent).
    async fn size(&self, name: &ArchiveName, pid: u32) -> Result<Option<u64>, FsError> {
        let cache = &self.cache;
        self.policy
            .read(
                &*self.procs,
                pid,
                name.as_str(),
                self.cache.archive().received(),
                || async move { cache.size(name).await.map_err(|e| Trouble::from(&e)) },
            )
            .await
            .map_err(|r| self.refused(pid, name, r))
    }

    pub async fn lookup(&self, parent: u64, name: &OsStr, pid: u32) -> Result<Attr, FsError> {
        if parent == ROOT && name == backupfs::DIR_NAME {
            return Ok(BackupFs::dir_attr());
        }
        if BackupFs::owns(parent) {
            let name = name.to_str().ok_or(FsError::NotFound)?;
            return self.backups.lookup(parent, name).await;
        }
        // Odd names (editors' probes, `.Trash`) are simply absent.
        let name = parse_child(parent, name).ok_or(FsError::NotFound)?;
        if self.ahead.as_ref().is_some_and(|a| a.hides(&name))
            && !self.procs.role(pid).may_end_recovery()
        {
            // Stored ahead of its cp, which checks for it and then creates it exclusively;
            // never hidden from a server that restores it (it is archived).
            return Err(FsError::NotFound);
        }
        {
            let mut st = self.state();
            let writing = st
                .by_name
                .get(&name)
                .and_then(|ino| st.nodes.get(ino))
                .and_then(|n| n.writer.clone());
            if let Some(w) = writing {
                let len = w.lock().len;
                let ino = st.remember(&name);
                return Ok(Attr::file(ino, len, Duration::ZERO));
            }
        }
        match self.size(&name, pid).await? {
            Some(size) => {
                let ino = self.state().remember(&name);
                Ok(Attr::file(ino, size, TTL_ARCHIVED))
            }
            // Not cached by the kernel: PostgreSQL polls for files that appear later.
            None => Err(FsError::NotFound),
        }
    }

    pub fn forget(&self, ino: u64, nlookup: u64) {
        let mut st = self.state();
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.lookups = n.lookups.saturating_sub(nlookup);
        }
        st.drop_if_unused(ino);
    }

    fn root() -> Attr {
        Attr {
            ino: ROOT,
            size: 0,
            dir: true,
            ttl: TTL_ROOT,
        }
    }

    pub async fn getattr(&self, ino: u64, pid: u32) -> Result<Attr, FsError> {
        if ino == ROOT {
            return Ok(Self::root());
        }
        if BackupFs::owns(ino) {
            return self.backups.getattr(ino).await;
        }
        let (name, writer) = {
            let st = self.state();
            let n = st.node(ino)?;
            (n.name.clone(), n.writer.clone())
        };
        if let Some(w) = writer {
            return Ok(Attr::file(ino, w.lock().len, Duration::ZERO));
        }
        match self.size(&name, pid).await? {
            Some(size) => Ok(Attr::file(ino, size, TTL_ARCHIVED)),
            None => Err(FsError::NotFound),
        }
    }

    /// `truncate`, `chmod`, `chown`, `utimes`. Owner and mode are the mount's; times are
    /// ignored; a size only changes a file being written.
    pub async fn setattr(
        &self,
        ino: u64,
        size: Option<u64>,
        owner_or_mode: bool,
        pid: u32,
    ) -> Result<Attr, FsError> {
        if ino == ROOT || owner_or_mode {
            return Err(FsError::NotPermitted);
        }
        if BackupFs::owns(ino) {
            return Err(FsError::ReadOnly);
        }
        let (name, writer) = {
            let st = self.state();
            let n = st.node(ino)?;
            (n.name.clone(), n.writer.clone())
        };
        match (size, writer) {
            (Some(size), Some(w)) => {
                if size > MAX_FILE {
                    return Err(FsError::TooBig);
                }
                let mut w = w.lock();
                if w.sealing {
                    return Err(FsError::Busy);
                }
                w.spool_expected().map_err(|e| FsError::local(&e))?;
                w.file.set_len(size).map_err(|e| FsError::local(&e))?;
                w.len = size;
                w.version += 1;
                Ok(Attr::file(ino, size, Duration::ZERO))
            }
            (None, Some(w)) => Ok(Attr::file(ino, w.lock().len, Duration::ZERO)),
            // Truncating an archived file ahead of a rewrite: the rewrite gets a fresh
            // spool; the archived copy is never changed.
            (Some(0), None) | (None, None) => match self.size(&name, pid).await? {
                Some(s) => Ok(Attr::file(ino, s, TTL_ARCHIVED)),
                None => Err(FsError::NotFound),
            },
            (Some(_), None) => Err(FsError::NotPermitted),
        }
    }

    pub async fn unlink(&self, parent: u64, name: &OsStr) -> Result<(), FsError> {
        if BackupFs::owns(parent) {
            return Err(FsError::ReadOnly);
        }
        let name = parse_child(parent, name).ok_or(FsError::NotFound)?;
        if self.opts.read_only {
            return Err(FsError::ReadOnly);
        }
        if !self.opts.allow_delete {
            tracing::warn!(%name, "unlink refused: the mount was not started with --allow-delete");
            return Err(FsError::NotPermitted);
        }
        match self.cache.archive().delete(&name).await {
            Ok(true) => {
                self.cache.forget(&name).await;
                tracing::info!(%name, "deleted from the archive");
                Ok(())
            }
            Ok(false) => Err(FsError::NotFound),
            Err(e) => {
                tracing::error!(%name, error = %e, "delete failed");
                Err(FsError::Io)
            }
        }
    }

    fn new_writer(&self, name: &ArchiveName) -> Result<Arc<WriteFile>, FsError> {
        let (file, path) = self.cache.new_spool_file(name).map_err(|e| {
            tracing::error!(%name, error = %e, "cannot create a spool file");
            FsError::local(&e)
        })?;
        Ok(Arc::new(WriteFile {
            state: Mutex::new(Writer {
                file,
                path,
                len: 0,
                version: 0,
                archived: 0,
                sealing: false,
                expect: None,
            }),
            archiving: tokio::sync::Mutex::new(()),
        }))
    }

    /// The writer of `name`, once it is the one: archive-ahead's stored bytes to compare its
    /// writes with, if a job stored them.
    fn lend_to(&self, name: &ArchiveName, writer: &WriteFile) {
        if let Some(a) = &self.ahead {
            writer.lock().expect = a.lend(name);
        }
    }

    /// A new file (`cp`'s `open(O_CREAT)`): returns its attributes and a write handle.
    pub fn create(&self, parent: u64, name: &OsStr) -> Result<(Attr, u64), FsError> {
        if self.opts.read_only || BackupFs::owns(parent) {
            return Err(FsError::ReadOnly);
        }
        let Some(archive_name) = parse_child(parent, name) else {
            tracing::warn!(name = ?name, "create refused: not a PostgreSQL WAL archive name");
            return Err(FsError::Invalid);
        };
        let writer = self.new_writer(&archive_name)?;
        let mut st = self.state();
        if let Some(n) = st.by_name.get(&archive_name).and_then(|i| st.nodes.get(i)) {
            if n.writer.is_some() {
                return Err(FsError::Busy);
            }
        }
        let ino = st.remember(&archive_name);
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.writer = Some(writer.clone());
            n.stale_pages = true;
        }
        self.lend_to(&archive_name, &writer);
        let fh = st.add_handle(Open::Write {
            name: archive_name,
            writer,
        });
        Ok((Attr::file(ino, 0, Duration::ZERO), fh))
    }

    pub async fn open(&self, ino: u64, write: bool, pid: u32) -> Result<Opened, FsError> {
        if BackupFs::owns(ino) {
            if write {
                return Err(FsError::ReadOnly);
            }
            let reader = self.backups.open(ino).await?;
            return Ok(Opened {
                fh: self.state().add_handle(Open::View(reader)),
                file: None,
                // A backup's files never change.
                keep_cache: true,
            });
        }
        let (name, writing) = {
            let st = self.state();
            let n = st.node(ino)?;
            (n.name.clone(), n.writer.is_some())
        };
        if writing {
            // One writer at a time, and no reads of a file before it is archived.
            return Err(FsError::Busy);
        }
        if write {
            if self.opts.read_only {
                return Err(FsError::ReadOnly);
            }
            // A rewrite of an archived name (PostgreSQL re-archiving after a crash): a fresh
            // spool; closing it compares it with the archived copy.
            let writer = self.new_writer(&name)?;
            let mut st = self.state();
            match st.nodes.get_mut(&ino) {
                Some(n) if n.writer.is_none() && n.readers == 0 => {
                    n.writer = Some(writer.clone());
                    n.stale_pages = true;
                }
                Some(_) => return Err(FsError::Busy),
                None => return Err(FsError::NotFound),
            }
            self.lend_to(&name, &writer);
            let fh = st.add_handle(Open::Write { name, writer });
            return Ok(Opened {
                fh,
                file: None,
                keep_cache: false,
            });
        }
        let cache = &self.cache;
        let opened = self
            .policy
            .read(
                &*self.procs,
                pid,
                name.as_str(),
                self.cache.archive().received(),
                || async {
                    match cache.open(&name).await {
                        Ok(file) => Ok(Some(file)),
                        Err(e) => match e.as_ref() {
                            LoadError::Absent => Ok(None),
                            LoadError::Store(s) => Err(Trouble::from(s)),
                            LoadError::Local(io) => Err(Trouble::local(io)),
                        },
                    }
                },
            )
            .await
            .map_err(|r| self.refused(pid, &name, r))?;
        let Some(file) = opened else {
            // Gone between lookup and open (deleted meanwhile).
            return Err(FsError::NotFound);
        };
        // Only a segment is dropped once served: ask /proc who reads only for those.
        if name.kind() == FileKind::Segment
            && matches!(self.procs.role(pid), Role::Recovery | Role::Standby)
        {
            self.cache.served_once(&name).await;
        }
        let mut st = self.state();
        let Some(n) = st.nodes.get_mut(&ino).filter(|n| n.writer.is_none()) else {
            return Err(FsError::Busy);
        };
        n.readers += 1;
        // A provisional file (a segment still being received) will change: its pages must
        // not outlive this open.
        let provisional = file.is_provisional();
        let keep_cache = !std::mem::replace(&mut n.stale_pages, provisional) && !provisional;
        let fh = st.add_handle(Open::Read {
            ino,
            file: file.clone(),
        });
        Ok(Opened {
            fh,
            file: Some(file),
            keep_cache,
        })
    }

    /// Reads from an open handle at once (the cached file or the write spool).
    pub fn read_now(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, std::io::Error> {
        let open = self
            .handle(fh)
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
        match open.as_ref() {
            Open::Read { file, .. } => file.read_at(offset, size),
            Open::Write { writer, .. } => {
                let mut w = writer.lock();
                w.spool_expected()?;
                let end = w.len.min(offset.saturating_add(u64::from(size)));
                let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
                w.file.read_exact_at(&mut buf, offset).map(|()| buf)
            }
            Open::Dir(_) | Open::ViewDir(..) => {
                Err(std::io::Error::from_raw_os_error(libc::EISDIR))
            }
            // Fetched from the store: answered by `read_patiently`, off this thread.
            Open::View(_) => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }

    /// A read that failed at once ([`Fs::read_now`]), retried under the restore policy: a
    /// local disk error is not the end of a recovery either.
    pub async fn read_patiently(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        pid: u32,
    ) -> Result<Vec<u8>, FsError> {
        let open = self.handle(fh)?;
        let name = match open.as_ref() {
            Open::Read { ino, .. } => self.state().node(*ino)?.name.clone(),
            Open::Write { name, .. } => name.clone(),
            // Not a restore_command read: no waiting, a failure is EIO.
            Open::View(r) => return r.read(offset, size).await,
            Open::Dir(_) | Open::ViewDir(..) => return Err(FsError::BadHandle),
        };
        self.policy
            .read(
                &*self.procs,
                pid,
                name.as_str(),
                self.cache.archive().received(),
                || async {
                    self.read_now(fh, offset, size)
                        .map(Some)
                        .map_err(|e| Trouble::local(&e))
                },
            )
            .await
            .map_err(|r| self.refused(pid, &name, r))?
            .ok_or(FsError::Io)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, FsError> {
        let open = self.handle(fh)?;
        let Open::Write { writer, .. } = open.as_ref() else {
            return Err(FsError::BadHandle);
        };
        let end = offset.saturating_add(data.len() as u64);
        if end > MAX_FILE {
            return Err(FsError::TooBig);
        }
        let mut w = writer.lock();
        if w.sealing {
            // Written while its archive is under way (another descriptor's close).
            return Err(FsError::Busy);
        }
        w.write_at(data, offset).map_err(|e| FsError::local(&e))?;
        w.len = w.len.max(end);
        w.version += 1;
        Ok(data.len() as u32)
    }

    /// The close that `cp` checks: archives what was written, unless nothing was or the
    /// writer is exiting (killed mid-file), and succeeds only once the store confirmed.
    pub async fn flush(&self, fh: u64, pid: u32) -> Result<(), FsError> {
        let open = self.handle(fh)?;
        let Open::Write { name, writer } = open.as_ref() else {
            return Ok(());
        };
        let _one = writer.archiving.lock().await;
        let (version, archived) = {
            let w = writer.lock();
            (w.version, w.archived)
        };
        if version == archived && version > 0 {
            // Nothing written since the last archive: a second close after the first
            // archived it.
            return Ok(());
        }
        if self.procs.exiting(pid) {
            // The kernel closes a dying process's files: what it wrote may be a prefix.
            tracing::warn!(%name, pid,
                "the writer is exiting (killed?) before closing: not archived");
            return Err(FsError::Io);
        }
        let ino = self.state().by_name.get(name).copied().unwrap_or(0);
        if self.procs.holds(pid, name.as_str(), ino) {
            // A duplicate closed (a shell redirection's open, dup2 and close, or `cmd >&3`);
            // the writer goes on. Its last close archives, and reports.
            tracing::debug!(%name, pid, "a duplicate descriptor closed: not archived yet");
            return Ok(());
        }
        if version == 0 {
            // The last close of a file nothing was written to: an empty file, which no WAL
            // file is. Refused, so the copy fails instead of reporting a success.
            tracing::warn!(%name, "an empty file is not archived: refused");
            return Err(FsError::Invalid);
        }
        let (file, len, version, stored_bytes) = {
            let mut w = writer.lock();
            let file = w.file.try_clone().map_err(|e| FsError::local(&e))?;
            // Written exactly as archive-ahead stored it: the bytes stay lent (the spool is
            // empty) while the store is asked; anything else is spooled whole first.
            let stored_bytes = w.wrote_stored_bytes();
            if !stored_bytes {
                w.spool_expected().map_err(|e| FsError::local(&e))?;
            }
            w.sealing = true;
            (file, w.len, w.version, stored_bytes)
        };
        let confirmed = match &self.ahead {
            Some(a) if stored_bytes => a.still_stored(name, len).await,
            Some(a) => a.confirms(name, &file, len).await,
            None => false,
        };
        let r = if confirmed {
            tracing::info!(%name, "stored ahead; the bytes cp wrote are those stored");
            Ok(PushOutcome::AlreadyArchived)
        } else {
            let spooled = writer.lock().spool_expected();
            match spooled {
                Ok(()) => self.cache.push_file(name, file, len).await,
                Err(e) => Err(crate::store::Error::Output {
                    name: name.to_string(),
                    why: format!("spooling: {e}"),
                }),
            }
        };
        let mut w = writer.lock();
        w.sealing = false;
        match r {
            Ok(outcome) => {
                w.archived = version;
                if let Some(a) = &self.ahead {
                    a.archived(name);
                }
                tracing::info!(%name, ?outcome, "archived");
                Ok(())
            }
            Err(e) => {
                tracing::error!(%name, error = %e, "archiving failed; close() reports it");
                Err(FsError::from_push(&e))
            }
        }
    }

    /// `fsync`: the spool is made durable; nothing is archived (a writer may fsync part-way,
    /// and an archived name is immutable). The close that follows archives.
    pub async fn fsync(&self, fh: u64) -> Result<(), FsError> {
        let open = self.handle(fh)?;
        let Open::Write { writer, .. } = open.as_ref() else {
            return Ok(());
        };
        let file = {
            let mut w = writer.lock();
            w.spool_expected().map_err(|e| FsError::local(&e))?;
            w.file.try_clone().map_err(|e| FsError::local(&e))?
        };
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|_| FsError::Io)?
            .map_err(|e| FsError::local(&e))
    }

    pub fn release(&self, fh: u64) {
        let mut st = self.state();
        let Some(open) = st.handles.remove(&fh) else {
            return;
        };
        match open.as_ref() {
            Open::Read { ino, .. } => {
                let ino = *ino;
                if let Some(n) = st.nodes.get_mut(&ino) {
                    n.readers = n.readers.saturating_sub(1);
                }
                st.drop_if_unused(ino);
            }
            Open::Write { name, writer } => {
                let ino = st.by_name.get(name).copied();
                if let Some(n) = ino.and_then(|i| st.nodes.get_mut(&i)) {
                    if n.writer.as_ref().is_some_and(|w| Arc::ptr_eq(w, writer)) {
                        n.writer = None;
                    }
                }
                if writer.lock().dirty() {
                    // Unflushed data may be incomplete: archiving it could poison the name.
                    tracing::warn!(%name, "closed without a successful flush: not archived");
                }
                if let Some(i) = ino {
                    st.drop_if_unused(i);
                }
            }
            Open::Dir(_) | Open::View(_) | Open::ViewDir(..) => {}
        }
    }

    /// The inode a read handle reads (for the adapter's passthrough bookkeeping).
    pub fn read_ino(&self, fh: u64) -> Option<u64> {
        match self.state().handles.get(&fh).map(|o| o.as_ref()) {
            Some(Open::Read { ino, .. }) => Some(*ino),
            _ => None,
        }
    }

    pub fn opendir(&self, ino: u64) -> Result<u64, FsError> {
        if BackupFs::owns(ino) {
            return Ok(self
                .state()
                .add_handle(Open::ViewDir(ino, tokio::sync::Mutex::new(None))));
        }
        if ino != ROOT {
            return Err(FsError::NotDir);
        }
        Ok(self
            .state()
            .add_handle(Open::Dir(Arc::new(tokio::sync::Mutex::new(DirCursor {
                stream: None,
                next: u64::MAX,
                pending: None,
                segment_size: None,
                spooled: Vec::new(),
                backups: false,
            })))))
    }

    /// Lists the directory from `offset`, handing entries to `add(ino, next offset, is_dir,
    /// name)` until it says the reply is full. Offsets: "." is 1, ".." is 2, `backups` (when
    /// listed) is 3, the i-th archived file is 4 + i.
    pub async fn readdir(
        &self,
        fh: u64,
        offset: u64,
        mut add: impl FnMut(u64, u64, bool, &str) -> bool,
    ) -> Result<(), FsError> {
        let open = self.handle(fh)?;
        let cursor = match open.as_ref() {
            Open::Dir(cursor) => cursor,
            Open::ViewDir(ino, entries) => {
                let mut entries = entries.lock().await;
                if entries.is_none() {
                    *entries = Some(self.backups.entries(*ino).await?);
                }
                let parent = BackupFs::parent(*ino);
                let dots = [
                    (*ino, true, ".".to_string()),
                    (parent, true, "..".to_string()),
                ];
                let all = dots.iter().chain(entries.iter().flatten());
                for (i, (ino, dir, name)) in all.enumerate().skip(offset as usize) {
                    if add(*ino, i as u64 + 1, *dir, name) {
                        break;
                    }
                }
                return Ok(());
            }
            _ => return Err(FsError::BadHandle),
        };
        let mut c = cursor.lock().await;
        if c.stream.is_none() || offset != c.next {
            if c.segment_size.is_none() {
                c.segment_size = match self.cache.archive().identity().await {
                    Ok(id) => id.map(|i| i.wal_segment_size),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the archive identity failed");
                        return Err(FsError::Io);
                    }
                };
            }
            // Fused: the kernel asks once more after the last entry; a finished listing
            // stream must answer "nothing", not be polled again.
            c.stream = Some(self.cache.list().fuse().boxed());
            c.pending = None;
            c.spooled = match self.cache.spooled_names() {
                Ok(names) => names,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the receiver's spool failed");
                    return Err(FsError::Io);
                }
            };
            c.spooled.reverse();
            c.backups = self.backups.any().await?;
            let mut skip = offset.saturating_sub(3);
            while skip > 0 {
                match c.stream.as_mut().map(|s| s.next()) {
                    Some(next) => match next.await {
                        Some(Ok(_)) => skip -= 1,
                        _ => break,
                    },
                    None => break,
                }
            }
        }
        let mut pos = offset;
        if pos == 0 {
            if add(ROOT, 1, true, ".") {
                c.next = 0;
                return Ok(());
            }
            pos = 1;
        }
        if pos == 1 {
            if add(ROOT, 2, true, "..") {
                c.next = 1;
                return Ok(());
            }
            pos = 2;
        }
        if pos == 2 {
            if c.backups && add(backupfs::DIR_INO, 3, true, backupfs::DIR_NAME) {
                c.next = 2;
                return Ok(());
            }
            pos = 3;
        }
        loop {
            let entry = match c.pending.take() {
                Some(e) => Some(e),
                None => match c.stream.as_mut() {
                    Some(s) => match s.next().await {
                        Some(Ok(e)) => Some(e),
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "listing the archive failed");
                            c.stream = None;
                            return Err(FsError::Io);
                        }
                        None => None,
                    },
                    None => None,
                },
            };
            // After the archive: what `walfs receive` spooled and has not uploaded yet.
            let entry = match entry {
                Some(e) => {
                    c.spooled.retain(|n| n != &e.name);
                    e
                }
                None => match c.spooled.pop() {
                    Some(name) => Listed {
                        name,
                        stored_bytes: 0,
                        last_modified: 0,
                    },
                    None => break,
                },
            };
            // Stored ahead of its cp: not listed either (its position still counts, so
            // offsets stay those of the archive's listing).
            if self.ahead.as_ref().is_some_and(|a| a.hides(&entry.name)) {
                pos += 1;
                continue;
            }
            // `ls -l` looks up every name next: answer those from memory.
            if let (FileKind::Segment, Some(size)) = (entry.name.kind(), c.segment_size) {
                self.cache.note_size(&entry.name, size);
            }
            if add(
                listing_ino(&entry.name),
                pos + 1,
                false,
                entry.name.as_str(),
            ) {
                c.pending = Some(entry);
                break;
            }
            pos += 1;
        }
        c.next = pos;
        Ok(())
    }

    pub fn releasedir(&self, fh: u64) {
        self.state().handles.remove(&fh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::CacheOptions;
    use crate::caller::FakeProcs;
    use crate::envelope::{Key, SealOptions};
    use crate::store::faults::{Fault, FaultyStore, Op};
    use crate::store::{test_segment, Archive};
    use object_store::memory::InMemory;
    use object_store::path::Path as StorePath;
    use object_store::{ObjectStoreExt, PutPayload};
    use std::sync::atomic::Ordering;

    const PID: u32 = 4242;
    const SEG1: &str = "000000010000000000000001";
    const SEG2: &str = "000000010000000000000002";
    const HISTORY: &[u8] = b"1\t0/3000000\tno recovery target specified\n";

    struct Rig {
        fs: Fs,
        store: Arc<FaultyStore>,
        procs: Arc<FakeProcs>,
        _dir: tempfile::TempDir,
    }

    impl Rig {
        /// A mount over an archive holding SEG1 (pushed by "another host"), or nothing.
        async fn new(role: Role, with_segment: bool, read_only: bool) -> Rig {
            let store = FaultyStore::new(Arc::new(InMemory::new()));
            let archive = || {
                Archive::with_store(
                    store.clone(),
                    StorePath::from("pfx"),
                    "memory:///pfx",
                    Some(
                        crate::envelope::Keyring::new(Key::from_bytes([3; 32]), Vec::new())
                            .unwrap(),
                    ),
                    SealOptions::default(),
                )
            };
            if with_segment {
                let n = ArchiveName::parse(SEG1).unwrap();
                archive()
                    .push(&n, test_segment(SEG1, 7, 1 << 20))
                    .await
                    .unwrap();
            }
            let dir = tempfile::tempdir().unwrap();
            let cache = Cache::new(
                Arc::new(archive()),
                &CacheOptions {
                    dir: dir.path().to_path_buf(),
                    max_bytes: 64 << 20,
                    prefetch_bytes: 0,
                    prefetch_concurrency: 1,
                    serve_partial: false,
                },
            )
            .unwrap();
            let procs = Arc::new(FakeProcs::new(role));
            let policy = Policy {
                recovery_timeout: Some(Duration::from_millis(1500)),
                standby_timeout: Duration::from_millis(300),
                other_timeout: Duration::from_millis(600),
                empty_if_new: !read_only,
            };
            let opts = MountOptions {
                uid: 0,
                gid: 0,
                read_only,
                allow_delete: false,
                allow_other: false,
                passthrough: false,
            };
            Rig {
                fs: Fs::new(Arc::new(cache), opts, policy, procs.clone()),
                store,
                procs,
                _dir: dir,
            }
        }

        fn stopped(&self) -> bool {
            self.procs.stopped.load(Ordering::Relaxed) == PID
        }

        fn set_role(&self, role: Role) {
            *self.procs.role.lock().unwrap() = role;
        }

        async fn stored(&self, name: &str) -> Option<Vec<u8>> {
            let a = Archive::with_store(
                self.store.inner().clone(),
                StorePath::from("pfx"),
                "memory:///pfx",
                Some(crate::envelope::Keyring::new(Key::from_bytes([3; 32]), Vec::new()).unwrap()),
                SealOptions::default(),
            );
            a.fetch(&ArchiveName::parse(name).unwrap()).await.unwrap()
        }

        /// `cp`: lookup, open, read everything.
        async fn cp_out(&self, name: &str) -> Result<Vec<u8>, FsError> {
            let a = self.fs.lookup(ROOT, OsStr::new(name), PID).await?;
            let o = self.fs.open(a.ino, false, PID).await?;
            let data = self
                .fs
                .read_now(o.fh, 0, a.size as u32)
                .map_err(|_| FsError::Io)?;
            self.fs.release(o.fh);
            Ok(data)
        }

        /// `cp` in: create, write `data` in pieces, close (flush), release.
        async fn cp_in(&self, name: &str, data: &[u8]) -> Result<(), FsError> {
            let (_, fh) = self.fs.create(ROOT, OsStr::new(name))?;
            for (i, part) in data.chunks(1000).enumerate() {
                self.fs.write(fh, (i * 1000) as u64, part)?;
            }
            let r = self.fs.flush(fh, PID).await;
            self.fs.release(fh);
            r
        }
    }

    /// A server restoring segments copies each once: the one it took before leaves the cache
    /// when it takes the next (its open handle keeps reading it whole), and only a later open
    /// loads it again; the newest stays cached. Anyone else's reads keep everything cached.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_segment_a_restoring_server_took_leaves_the_cache_once_it_moves_on() {
        let want1 = test_segment(SEG1, 7, 1 << 20);
        let want2 = test_segment(SEG2, 7, 1 << 20);
        for (role, dropped) in [
            (Role::Recovery, true),
            (Role::Standby, true),
            (Role::Other, false),
            (Role::Unknown, false),
        ] {
            let r = Rig::new(role, true, true).await;
            let n2 = ArchiveName::parse(SEG2).unwrap();
            r.fs.cache.archive().push(&n2, want2.clone()).await.unwrap();
            let a = r.fs.lookup(ROOT, OsStr::new(SEG1), PID).await.unwrap();
            let o = r.fs.open(a.ino, false, PID).await.unwrap();
            // The server asks again for the segment it is in: still cached.
            assert_eq!(r.cp_out(SEG1).await.unwrap(), want1, "{role:?}");
            let gets = r.store.calls(Op::Get);
            assert_eq!(r.cp_out(SEG1).await.unwrap(), want1, "{role:?}");
            assert_eq!(
                r.store.calls(Op::Get),
                gets,
                "{role:?}: the newest stays cached"
            );
            // It moves on: the one before leaves the cache; the open handle still reads it.
            assert_eq!(r.cp_out(SEG2).await.unwrap(), want2, "{role:?}");
            let data = r.fs.read_now(o.fh, 0, a.size as u32).unwrap();
            assert!(
                data == want1,
                "{role:?}: the bytes read through the open handle"
            );
            r.fs.release(o.fh);
            let stats = r.fs.cache.stats().to_json();
            assert_eq!(
                stats["dropped_after_serving"],
                u64::from(dropped),
                "{role:?}"
            );
            let gets = r.store.calls(Op::Get);
            assert_eq!(r.cp_out(SEG1).await.unwrap(), want1, "{role:?}");
            let loads_again = r.store.calls(Op::Get) > gets;
            assert_eq!(
                loads_again, dropped,
                "{role:?}: loaded again only once dropped"
            );
        }
    }

    /// Writes through a mount with archive-ahead: the bytes a job stored are compared, not
    /// spooled, and a write that stops matching them spools every byte written before it.
    #[tokio::test(flavor = "multi_thread")]
    async fn writes_of_stored_bytes_are_compared_and_a_difference_spools_all_written() {
        const SEG3: &str = "000000010000000000000003";
        const SEG4: &str = "000000010000000000000004";
        const SEG5: &str = "000000010000000000000005";
        let mut r = Rig::new(Role::Other, true, false).await;
        let ahead = crate::ahead::Ahead::new(r.fs.cache.clone(), 2);
        r.fs = r.fs.with_ahead(ahead.clone());
        let data = tempfile::tempdir().unwrap();
        let status = data.path().join("pg_wal/archive_status");
        std::fs::create_dir_all(&status).unwrap();
        let seg = |s: &str| test_segment(s, 7, 1 << 20);
        for s in [SEG2, SEG3, SEG4, SEG5] {
            std::fs::write(data.path().join("pg_wal").join(s), seg(s)).unwrap();
            std::fs::write(status.join(format!("{s}.ready")), b"").unwrap();
        }
        // SAFETY: geteuid has no preconditions.
        ahead.watch_dir(data.path().to_path_buf(), unsafe { libc::geteuid() });
        for s in [SEG2, SEG3, SEG4, SEG5] {
            let n = ArchiveName::parse(s).unwrap();
            for _ in 0..300 {
                if ahead.keeps(&n) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(ahead.keeps(&n), "{s} stored ahead");
        }
        let stored = |s: &'static str| {
            let a = r.fs.cache.archive().clone();
            async move { a.fetch(&ArchiveName::parse(s).unwrap()).await.unwrap() }
        };
        // Exactly the stored bytes: confirmed, nothing uploaded again; the descriptor still
        // reads back what it wrote (from the lent bytes, spooled on demand).
        let puts = r.store.calls(Op::Put);
        let (_, fh) = r.fs.create(ROOT, OsStr::new(SEG2)).unwrap();
        for (i, part) in seg(SEG2).chunks(1000).enumerate() {
            r.fs.write(fh, (i * 1000) as u64, part).unwrap();
        }
        r.fs.flush(fh, PID).await.unwrap();
        assert_eq!(r.store.calls(Op::Put), puts, "no second upload");
        let back = r.fs.read_now(fh, 0, 1 << 20).unwrap();
        r.fs.release(fh);
        assert!(back == seg(SEG2)[..], "read back after the close");
        // Other bytes from offset 300000 on, with the stored object gone meanwhile: the close
        // archives what was written, all of it (the matched part came from the spool too).
        let mut other = seg(SEG3).to_vec();
        other[300_000..].fill(0x5a);
        r.fs.cache
            .archive()
            .delete(&ArchiveName::parse(SEG3).unwrap())
            .await
            .unwrap();
        r.cp_in(SEG3, &other).await.unwrap();
        assert_eq!(stored(SEG3).await.as_deref(), Some(&other[..]));
        // Other bytes under a stored name: refused, the stored copy kept.
        let mut other = seg(SEG4).to_vec();
        other[700_000] ^= 1;
        assert!(r.cp_in(SEG4, &other).await.is_err());
        assert_eq!(stored(SEG4).await.as_deref(), Some(&seg(SEG4)[..]));
        // Exactly the stored bytes, but the object is gone by the close: archived again, from
        // a spool that holds every byte.
        r.fs.cache
            .archive()
            .delete(&ArchiveName::parse(SEG5).unwrap())
            .await
            .unwrap();
        r.cp_in(SEG5, &seg(SEG5)).await.unwrap();
        assert_eq!(stored(SEG5).await.as_deref(), Some(&seg(SEG5)[..]));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_recovery_waits_out_an_outage_and_gets_its_bytes() {
        let rig = Rig::new(Role::Recovery, true, true).await;
        rig.store.inject(Op::Get, "", Fault::Error, None);
        let store = rig.store.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            store.clear();
        });
        let data = rig.cp_out(SEG1).await;
        assert!(
            data.as_ref().ok() == Some(&test_segment(SEG1, 7, 1 << 20).to_vec()),
            "{:?}",
            data.err()
        );
        assert!(!rig.stopped());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_outage_is_never_absence_for_anyone() {
        for (role, stops) in [
            (Role::Recovery, true),
            (Role::Unknown, false),
            (Role::Standby, false),
            (Role::Other, false),
        ] {
            let rig = Rig::new(role, true, true).await;
            for fault in [Fault::Error, Fault::Hang] {
                rig.store.clear();
                rig.store.inject(Op::Get, "", fault.clone(), None);
                for name in [SEG1, SEG2] {
                    let t0 = std::time::Instant::now();
                    let e = rig.cp_out(name).await.unwrap_err();
                    assert_eq!(e, FsError::Io, "{role:?} {fault:?} {name}");
                    assert_eq!(rig.stopped(), stops, "{role:?} {fault:?} {name}");
                    let bound = match role {
                        Role::Standby => 300,
                        Role::Other => 600,
                        _ => 1500,
                    };
                    assert!(
                        t0.elapsed() >= Duration::from_millis(bound)
                            && t0.elapsed() < Duration::from_millis(bound + 1500),
                        "{role:?} {fault:?}: answered after {:?}",
                        t0.elapsed()
                    );
                }
            }
            // The store back: data, and true absence.
            rig.store.clear();
            assert!(rig.cp_out(SEG1).await.is_ok());
            assert_eq!(rig.cp_out(SEG2).await.unwrap_err(), FsError::NotFound);
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn damage_stops_a_recovery_and_fails_everyone_else() {
        for (role, stops) in [
            (Role::Recovery, true),
            (Role::Standby, false),
            (Role::Other, false),
        ] {
            let rig = Rig::new(role, true, true).await;
            let path = StorePath::from(format!("pfx/wal/{SEG1}"));
            let mut obj = rig
                .store
                .inner()
                .get(&path)
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
                .to_vec();
            let at = obj.len() / 2;
            obj[at] ^= 1;
            rig.store
                .inner()
                .put(&path, PutPayload::from(obj))
                .await
                .unwrap();
            let t0 = std::time::Instant::now();
            assert_eq!(rig.cp_out(SEG1).await.unwrap_err(), FsError::Io, "{role:?}");
            assert!(t0.elapsed() < Duration::from_millis(300), "damage waited");
            assert_eq!(rig.stopped(), stops, "{role:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn no_identity_is_never_absence_to_a_restore() {
        // A vanished identity: nothing is absent any more.
        let rig = Rig::new(Role::Other, true, true).await;
        assert_eq!(rig.cp_out(SEG2).await.unwrap_err(), FsError::NotFound);
        rig.store
            .inner()
            .delete(&StorePath::from("pfx/walfs.json"))
            .await
            .unwrap();
        assert_eq!(rig.cp_out(SEG2).await.unwrap_err(), FsError::Io);
        // A new archive mounted read-write: empty to the archiver, not to a recovery.
        let rig = Rig::new(Role::Other, false, false).await;
        assert_eq!(rig.cp_out(SEG1).await.unwrap_err(), FsError::NotFound);
        rig.set_role(Role::Recovery);
        assert_eq!(rig.cp_out(SEG1).await.unwrap_err(), FsError::Io);
        assert!(rig.stopped());
        // Read-only: no identity means no archive, for everyone.
        let rig = Rig::new(Role::Other, false, true).await;
        assert_eq!(rig.cp_out(SEG1).await.unwrap_err(), FsError::Io);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_killed_caller_is_answered_at_once() {
        let rig = Rig::new(Role::Recovery, true, true).await;
        rig.store.inject(Op::Get, "", Fault::Hang, None);
        let procs = rig.procs.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            procs.dying.store(true, Ordering::Relaxed);
        });
        let t0 = std::time::Instant::now();
        assert_eq!(rig.cp_out(SEG2).await.unwrap_err(), FsError::Interrupted);
        assert!(t0.elapsed() < Duration::from_millis(1000));
        assert!(!rig.stopped());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn only_complete_files_are_archived() {
        let rig = Rig::new(Role::Other, true, false).await;
        let h = "00000002.history";
        // A shell redirection: open, dup2, close before anything is written (the process
        // holds the duplicate).
        let (_, fh) = rig.fs.create(ROOT, OsStr::new(h)).unwrap();
        rig.procs.holding.store(true, Ordering::Relaxed);
        rig.fs.flush(fh, PID).await.unwrap();
        // Written through a duplicate that is closed while the original stays open.
        rig.fs.write(fh, 0, &HISTORY[..10]).unwrap();
        rig.fs.flush(fh, PID).await.unwrap();
        rig.procs.holding.store(false, Ordering::Relaxed);
        assert_eq!(
            rig.stored(h).await,
            None,
            "an empty flush archived something"
        );
        // The writer is killed mid-file: the kernel's close archives nothing.
        rig.procs.exiting.store(true, Ordering::Relaxed);
        assert_eq!(rig.fs.flush(fh, PID).await.unwrap_err(), FsError::Io);
        rig.procs.exiting.store(false, Ordering::Relaxed);
        rig.fs.release(fh);
        assert_eq!(
            rig.stored(h).await,
            None,
            "a killed writer's prefix was archived"
        );
        // fsync part-way archives nothing either.
        let (_, fh) = rig.fs.create(ROOT, OsStr::new(h)).unwrap();
        rig.fs.write(fh, 0, &HISTORY[..10]).unwrap();
        rig.fs.fsync(fh).await.unwrap();
        assert_eq!(rig.stored(h).await, None, "fsync archived a prefix");
        // A cut file closed normally is refused, and the name stays free.
        assert_eq!(rig.fs.flush(fh, PID).await.unwrap_err(), FsError::Invalid);
        rig.fs.release(fh);
        // The last close of a file nothing was written to: an empty file, refused.
        let (_, fh) = rig.fs.create(ROOT, OsStr::new(h)).unwrap();
        assert_eq!(rig.fs.flush(fh, PID).await.unwrap_err(), FsError::Invalid);
        rig.fs.release(fh);
        // Truncated to nothing: refused.
        let (a, fh) = rig.fs.create(ROOT, OsStr::new(h)).unwrap();
        rig.fs.write(fh, 0, HISTORY).unwrap();
        rig.fs.setattr(a.ino, Some(0), false, PID).await.unwrap();
        assert_eq!(rig.fs.flush(fh, PID).await.unwrap_err(), FsError::Invalid);
        rig.fs.release(fh);
        assert_eq!(rig.stored(h).await, None);
        // The whole file goes in, and readers see it at once.
        rig.cp_in(h, HISTORY).await.unwrap();
        assert_eq!(rig.stored(h).await.as_deref(), Some(HISTORY));
        assert_eq!(rig.cp_out(h).await.unwrap(), HISTORY);
        // Again with the same bytes: fine. Other bytes: EEXIST, archived copy kept.
        rig.cp_in(h, HISTORY).await.unwrap();
        let other = b"1\t0/4000000\tno recovery target specified\n";
        assert_eq!(rig.cp_in(h, other).await.unwrap_err(), FsError::Exists);
        assert_eq!(rig.stored(h).await.as_deref(), Some(HISTORY));
        // A store failure fails the close and archives nothing; the retry works.
        rig.store.inject(Op::Put, "wal/", Fault::Error, None);
        let seg2 = test_segment(SEG2, 7, 1 << 20);
        assert_eq!(rig.cp_in(SEG2, &seg2).await.unwrap_err(), FsError::Io);
        rig.store.clear();
        assert_eq!(rig.stored(SEG2).await, None);
        rig.cp_in(SEG2, &seg2).await.unwrap();
        assert!(rig.stored(SEG2).await.unwrap() == seg2);
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;
    use crate::cache::CacheOptions;
    use crate::caller::FakeProcs;
    use crate::envelope::SealOptions;
    use crate::store::{test_segment, Archive};
    use object_store::memory::InMemory;
    use object_store::path::Path as StorePath;

    async fn fs_with(segments: u32, backup: bool) -> (Fs, tempfile::TempDir) {
        let archive = Arc::new(Archive::with_store(
            Arc::new(InMemory::new()),
            StorePath::from("pfx"),
            "memory:///pfx",
            None,
            SealOptions::default(),
        ));
        for i in 1..=segments {
            let n = ArchiveName::parse(&format!("0000000100000000{i:08X}")).unwrap();
            archive
                .push(&n, test_segment(n.as_str(), 7, 1 << 20))
                .await
                .unwrap();
        }
        if backup {
            archive
                .put_backup_file("b1", "base.tar.000000", bytes::Bytes::from_static(b"x"))
                .await
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(
            archive,
            &CacheOptions {
                dir: dir.path().to_path_buf(),
                max_bytes: 64 << 20,
                prefetch_bytes: 0,
                prefetch_concurrency: 1,
                serve_partial: false,
            },
        )
        .unwrap();
        let fs = Fs::new(
            Arc::new(cache),
            MountOptions {
                uid: 0,
                gid: 0,
                read_only: false,
                allow_delete: false,
                allow_other: false,
                passthrough: false,
            },
            Policy {
                recovery_timeout: Some(Duration::from_millis(500)),
                standby_timeout: Duration::from_millis(300),
                other_timeout: Duration::from_millis(300),
                empty_if_new: false,
            },
            Arc::new(FakeProcs::new(Role::Other)),
        );
        (fs, dir)
    }

    /// The whole root listing, `per_reply` entries per readdir call, as the kernel resumes it
    /// by offset (on the same handle, or on a new one each time, as after a seek).
    async fn list(fs: &Fs, per_reply: usize, fresh: bool) -> Vec<(String, bool)> {
        let mut fh = fs.opendir(ROOT).unwrap();
        let (mut out, mut offset) = (Vec::new(), 0);
        loop {
            if fresh {
                fs.releasedir(fh);
                fh = fs.opendir(ROOT).unwrap();
            }
            let mut got = Vec::new();
            fs.readdir(fh, offset, |_, next, dir, name| {
                if got.len() == per_reply {
                    return true;
                }
                got.push((name.to_string(), dir, next));
                false
            })
            .await
            .unwrap();
            let Some(last) = got.last() else { break };
            offset = last.2;
            out.extend(got.into_iter().map(|(n, d, _)| (n, d)));
        }
        fs.releasedir(fh);
        out
    }

    #[tokio::test]
    async fn backups_are_listed_once_and_only_when_there_are_any() {
        for (backup, want_dir) in [(false, false), (true, true)] {
            let (fs, _dir) = fs_with(5, backup).await;
            for (per_reply, fresh) in [1, 2, 3, 100]
                .into_iter()
                .flat_map(|n| [(n, false), (n, true)])
            {
                let l = list(&fs, per_reply, fresh).await;
                let files: Vec<&str> = l.iter().filter(|e| !e.1).map(|e| e.0.as_str()).collect();
                assert_eq!(files.len(), 5, "{l:?}");
                assert!(files.windows(2).all(|w| w[0] < w[1]), "{l:?}");
                let dirs: Vec<&str> = l.iter().filter(|e| e.1).map(|e| e.0.as_str()).collect();
                let want: &[&str] = if want_dir {
                    &[".", "..", "backups"]
                } else {
                    &[".", ".."]
                };
                assert_eq!(dirs, want, "{l:?}");
            }
            // Looked up either way; nothing may be created in it.
            let attr = fs.lookup(ROOT, OsStr::new("backups"), 1).await.unwrap();
            assert!(attr.dir);
            assert_eq!(
                fs.create(attr.ino, OsStr::new("000000010000000000000009"))
                    .unwrap_err(),
                FsError::ReadOnly
            );
        }
    }
}
