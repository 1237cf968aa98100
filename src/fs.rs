//! The `fuser::Filesystem` adapter: the archive as one flat directory.
//!
//! Every request that may touch the network is answered from a tokio task, so the FUSE loop
//! never waits on the object store. Writes go to a spool file and are archived on `flush`
//! (the close that `cp` checks) or `fsync`; the reply waits for the store's confirmation, so
//! close() returns 0 only for durable data. Reads are served from the cache once the whole
//! object authenticated.

use crate::cache::{Cache, CachedFile, LoadError};
use crate::store::{Entry, Error as StoreError};
use crate::wal::{ArchiveName, FileKind};
use bytes::Bytes;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use futures::stream::{BoxStream, StreamExt};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

const ROOT: u64 = 1;
/// Archived files never change: the kernel may keep their attributes a while.
const TTL_ARCHIVED: Duration = Duration::from_secs(60);
const TTL_ROOT: Duration = Duration::from_secs(1);
/// What `st_blksize` says: `cp` sizes its buffers by it.
const BLKSIZE: u32 = 1 << 20;
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

/// A file being written through the mount.
struct Writer {
    file: std::fs::File,
    path: PathBuf,
    len: u64,
    dirty: bool,
    /// Bumped by every change, so a push of an older snapshot does not mark newer data clean.
    version: u64,
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

type SharedWriter = Arc<Mutex<Writer>>;

struct Node {
    name: ArchiveName,
    lookups: u64,
    writer: Option<SharedWriter>,
    /// Open read handles: a write may not start under a reader's page cache.
    readers: u32,
    /// A writer went through the kernel's page cache for this inode: its pages may hold
    /// bytes the archive refused, so the next read-open must make the kernel drop them.
    stale_pages: bool,
    /// The kernel passthrough backing shared by this inode's readers (the kernel takes one
    /// backing file per inode at a time).
    backing: Option<Arc<fuser::BackingId>>,
}

/// A directory listing in progress: the backend's stream and where the kernel is in it.
struct DirCursor {
    stream: Option<BoxStream<'static, Result<Entry, StoreError>>>,
    /// The offset the kernel asks for to continue this listing.
    next: u64,
    pending: Option<Entry>,
    /// The archive's segment size: a listed segment's size needs no request of its own.
    segment_size: Option<u64>,
    /// Spooled names not (yet) seen in the archive's listing, listed after it (last first).
    spooled: Vec<ArchiveName>,
}

enum Open {
    Read {
        ino: u64,
        file: Arc<CachedFile>,
        /// Set when the kernel reads the cached file directly.
        _backing: Option<Arc<fuser::BackingId>>,
    },
    Write {
        name: ArchiveName,
        writer: SharedWriter,
    },
    Dir(Arc<tokio::sync::Mutex<DirCursor>>),
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
        self.next_ino = self.next_ino.max(ROOT) + 1;
        let ino = self.next_ino;
        self.nodes.insert(
            ino,
            Node {
                name: name.clone(),
                lookups: 1,
                writer: None,
                readers: 0,
                stale_pages: false,
                backing: None,
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
}

struct Inner {
    cache: Arc<Cache>,
    opts: MountOptions,
    state: Mutex<State>,
    started: SystemTime,
    /// Whether reads of cached files are handed to the kernel (FUSE passthrough, Linux 6.9+,
    /// root); turned off for good at the first refusal.
    passthrough: std::sync::atomic::AtomicBool,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain maps behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn attr(&self, ino: u64, size: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: FileType::RegularFile,
            perm: if self.opts.read_only { 0o440 } else { 0o640 },
            nlink: 1,
            uid: self.opts.uid,
            gid: self.opts.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    fn root_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo(ROOT),
            size: 0,
            blocks: 0,
            kind: FileType::Directory,
            perm: if self.opts.read_only { 0o550 } else { 0o750 },
            nlink: 2,
            ..self.attr(ROOT, 0)
        }
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<Open>> {
        self.state().handles.get(&fh.0).cloned()
    }
}

/// A stable, unregistered inode number for readdir's `d_ino` (the kernel looks names up
/// before it uses them).
fn listing_ino(name: &ArchiveName) -> u64 {
    let d = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        name.as_str(),
    ));
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_le_bytes(b) >> 1) | (1 << 62)
}

/// The errno a failed archive operation reports through close(), open() or read().
fn errno_for(e: &StoreError) -> Errno {
    match e {
        StoreError::Conflict { .. } => Errno::EEXIST,
        StoreError::Refused { .. } => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

pub struct WalFs {
    rt: tokio::runtime::Handle,
    inner: Arc<Inner>,
}

impl WalFs {
    pub fn new(cache: Arc<Cache>, opts: MountOptions, rt: tokio::runtime::Handle) -> WalFs {
        WalFs {
            rt,
            inner: Arc::new(Inner {
                cache,
                opts,
                state: Mutex::new(State::default()),
                started: SystemTime::now(),
                passthrough: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Archives what a writer holds, if anything changed; replies when the store confirmed.
    fn archive_writer(&self, name: ArchiveName, writer: SharedWriter, reply: ReplyEmpty) {
        let snapshot = {
            let w = writer.lock().unwrap_or_else(|p| p.into_inner());
            if !w.dirty {
                reply.ok();
                return;
            }
            let mut data = vec![0u8; w.len as usize];
            if let Err(e) = w.file.read_exact_at(&mut data, 0) {
                tracing::error!(%name, error = %e, "reading the write spool failed");
                reply.error(Errno::EIO);
                return;
            }
            (data, w.version)
        };
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            let (data, version) = snapshot;
            match inner.cache.push(&name, Bytes::from(data)).await {
                Ok(outcome) => {
                    let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
                    if w.version == version {
                        w.dirty = false;
                    }
                    tracing::info!(%name, ?outcome, "archived");
                    reply.ok();
                }
                Err(e) => {
                    tracing::error!(%name, error = %e, "archiving failed; close() reports it");
                    reply.error(errno_for(&e));
                }
            }
        });
    }

    fn new_writer(&self, name: &ArchiveName) -> Result<SharedWriter, Errno> {
        let (file, path) = self.inner.cache.new_spool_file(name).map_err(|e| {
            tracing::error!(%name, error = %e, "cannot create a spool file");
            Errno::from(e)
        })?;
        Ok(Arc::new(Mutex::new(Writer {
            file,
            path,
            len: 0,
            dirty: true,
            version: 0,
        })))
    }
}

fn parse_child(parent: INodeNo, name: &OsStr) -> Option<ArchiveName> {
    if parent.0 != ROOT {
        return None;
    }
    ArchiveName::parse(name.to_str()?).ok()
}

impl Filesystem for WalFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // open(O_TRUNC) arrives as one request instead of open + setattr.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // Reads of verified cached files can bypass this process entirely. The cache sits on
        // a plain or stacked (overlay) file system.
        let passthrough = self.inner.opts.passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.inner
            .passthrough
            .store(passthrough, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(passthrough, "kernel read passthrough");
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::telemetry::mount_request("lookup");
        // Odd names (editors' probes, `.Trash`) are simply absent.
        let Some(name) = parse_child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        {
            let mut st = self.inner.state();
            let writing = st
                .by_name
                .get(&name)
                .and_then(|ino| st.nodes.get(ino))
                .and_then(|n| n.writer.clone());
            if let Some(w) = writing {
                let len = w.lock().map(|w| w.len).unwrap_or(0);
                let ino = st.remember(&name);
                return reply.entry(&Duration::ZERO, &self.inner.attr(ino, len), Generation(0));
            }
        }
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            match inner.cache.size(&name).await {
                Ok(Some(size)) => {
                    let ino = inner.state().remember(&name);
                    reply.entry(&TTL_ARCHIVED, &inner.attr(ino, size), Generation(0));
                }
                // Not cached by the kernel: PostgreSQL polls for files that appear later.
                Ok(None) => reply.error(Errno::ENOENT),
                Err(e) => {
                    tracing::warn!(%name, error = %e, "lookup failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut st = self.inner.state();
        if let Some(n) = st.nodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
        }
        st.drop_if_unused(ino.0);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        crate::telemetry::mount_request("getattr");
        if ino.0 == ROOT {
            return reply.attr(&TTL_ROOT, &self.inner.root_attr());
        }
        let (name, writer) = {
            let st = self.inner.state();
            match st.nodes.get(&ino.0) {
                Some(n) => (n.name.clone(), n.writer.clone()),
                None => return reply.error(Errno::ENOENT),
            }
        };
        if let Some(w) = writer {
            let len = w.lock().map(|w| w.len).unwrap_or(0);
            return reply.attr(&Duration::ZERO, &self.inner.attr(ino.0, len));
        }
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            match inner.cache.size(&name).await {
                Ok(Some(size)) => reply.attr(&TTL_ARCHIVED, &inner.attr(ino.0, size)),
                Ok(None) => reply.error(Errno::ENOENT),
                Err(e) => {
                    tracing::warn!(%name, error = %e, "getattr failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == ROOT {
            return reply.error(Errno::EPERM);
        }
        // Owner and mode are the mount's; times are ignored (touch works, nothing changes).
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        let (name, writer) = {
            let st = self.inner.state();
            match st.nodes.get(&ino.0) {
                Some(n) => (n.name.clone(), n.writer.clone()),
                None => return reply.error(Errno::ENOENT),
            }
        };
        match (size, writer) {
            (Some(size), Some(w)) => {
                if size > MAX_FILE {
                    return reply.error(Errno::EFBIG);
                }
                let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = w.file.set_len(size) {
                    return reply.error(Errno::from(e));
                }
                w.len = size;
                w.dirty = true;
                w.version += 1;
                reply.attr(&Duration::ZERO, &self.inner.attr(ino.0, size));
            }
            (None, Some(w)) => {
                let len = w.lock().map(|w| w.len).unwrap_or(0);
                reply.attr(&Duration::ZERO, &self.inner.attr(ino.0, len));
            }
            (Some(0), None) | (None, None) => {
                // Truncating an archived file ahead of a rewrite: the rewrite gets a fresh
                // spool; the archived copy is never changed.
                let inner = self.inner.clone();
                self.rt.spawn(async move {
                    match inner.cache.size(&name).await {
                        Ok(Some(s)) => reply.attr(&TTL_ARCHIVED, &inner.attr(ino.0, s)),
                        Ok(None) => reply.error(Errno::ENOENT),
                        Err(_) => reply.error(Errno::EIO),
                    }
                });
            }
            (Some(_), None) => reply.error(Errno::EPERM),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::telemetry::mount_request("unlink");
        let Some(name) = parse_child(parent, name) else {
            return reply.error(Errno::ENOENT);
        };
        if self.inner.opts.read_only {
            return reply.error(Errno::EROFS);
        }
        if !self.inner.opts.allow_delete {
            tracing::warn!(%name, "unlink refused: the mount was not started with --allow-delete");
            return reply.error(Errno::EPERM);
        }
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            match inner.cache.archive().delete(&name).await {
                Ok(true) => {
                    inner.cache.forget(&name).await;
                    tracing::info!(%name, "deleted from the archive");
                    reply.ok();
                }
                Ok(false) => reply.error(Errno::ENOENT),
                Err(e) => {
                    tracing::error!(%name, error = %e, "delete failed");
                    reply.error(Errno::EIO);
                }
            }
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        crate::telemetry::mount_request("create");
        if self.inner.opts.read_only {
            return reply.error(Errno::EROFS);
        }
        let Some(archive_name) = parse_child(parent, name) else {
            tracing::warn!(name = ?name, "create refused: not a PostgreSQL WAL archive name");
            return reply.error(Errno::EINVAL);
        };
        let writer = match self.new_writer(&archive_name) {
            Ok(w) => w,
            Err(e) => return reply.error(e),
        };
        let mut st = self.inner.state();
        if let Some(n) = st.by_name.get(&archive_name).and_then(|i| st.nodes.get(i)) {
            if n.writer.is_some() {
                return reply.error(Errno::EBUSY);
            }
        }
        let ino = st.remember(&archive_name);
        if let Some(n) = st.nodes.get_mut(&ino) {
            n.writer = Some(writer.clone());
            n.stale_pages = true;
        }
        let fh = st.add_handle(Open::Write {
            name: archive_name,
            writer,
        });
        drop(st);
        reply.created(
            &Duration::ZERO,
            &self.inner.attr(ino, 0),
            Generation(0),
            FileHandle(fh),
            FopenFlags::empty(),
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::telemetry::mount_request("open");
        let (name, writing) = {
            let st = self.inner.state();
            match st.nodes.get(&ino.0) {
                Some(n) => (n.name.clone(), n.writer.is_some()),
                None => return reply.error(Errno::ENOENT),
            }
        };
        if writing {
            // One writer at a time, and no reads of a file before it is archived.
            return reply.error(Errno::EBUSY);
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            if self.inner.opts.read_only {
                return reply.error(Errno::EROFS);
            }
            // A rewrite of an archived name (PostgreSQL re-archiving after a crash): a fresh
            // spool; flush compares it with the archived copy.
            let writer = match self.new_writer(&name) {
                Ok(w) => w,
                Err(e) => return reply.error(e),
            };
            let mut st = self.inner.state();
            match st.nodes.get_mut(&ino.0) {
                Some(n) if n.writer.is_none() && n.readers == 0 => {
                    n.writer = Some(writer.clone());
                    n.stale_pages = true;
                }
                Some(_) => return reply.error(Errno::EBUSY),
                None => return reply.error(Errno::ENOENT),
            }
            let fh = st.add_handle(Open::Write { name, writer });
            return reply.opened(FileHandle(fh), FopenFlags::empty());
        }
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            match inner.cache.open(&name).await {
                Ok(file) => {
                    let mut st = inner.state();
                    let Some(n) = st.nodes.get_mut(&ino.0).filter(|n| n.writer.is_none()) else {
                        return reply.error(Errno::EBUSY);
                    };
                    n.readers += 1;
                    // A provisional file (a segment still being received) will change: its
                    // pages must not outlive this open.
                    let provisional = file.is_provisional();
                    let keep = !std::mem::replace(&mut n.stale_pages, provisional) && !provisional;
                    let backing = match &n.backing {
                        _ if provisional => None,
                        Some(b) => Some(b.clone()),
                        None if inner.passthrough.load(std::sync::atomic::Ordering::Relaxed) => {
                            match reply.open_backing(file.fd()) {
                                Ok(b) => {
                                    let b = Arc::new(b);
                                    n.backing = Some(b.clone());
                                    Some(b)
                                }
                                Err(e) => {
                                    tracing::info!(error = %e, "kernel read passthrough refused; reads go through walfs");
                                    inner.passthrough.store(false, std::sync::atomic::Ordering::Relaxed);
                                    None
                                }
                            }
                        }
                        None => None,
                    };
                    let fh = st.add_handle(Open::Read {
                        ino: ino.0,
                        file,
                        _backing: backing.clone(),
                    });
                    drop(st);
                    if let Some(b) = backing {
                        return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b);
                    }
                    // Without KEEP_CACHE the kernel drops the inode's cached pages on open.
                    let flags = if keep {
                        FopenFlags::FOPEN_KEEP_CACHE
                    } else {
                        FopenFlags::empty()
                    };
                    reply.opened(FileHandle(fh), flags);
                }
                Err(e) => match e.as_ref() {
                    LoadError::Absent => reply.error(Errno::ENOENT),
                    other => {
                        tracing::error!(%name, error = %other, "cannot serve this file");
                        reply.error(match other {
                            LoadError::Store(s) => errno_for(s),
                            _ => Errno::EIO,
                        });
                    }
                },
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        crate::telemetry::mount_request("read");
        let result = match self.inner.handle(fh).as_deref() {
            Some(Open::Read { file, .. }) => file.read_at(offset, size),
            Some(Open::Write { writer, .. }) => {
                let w = writer.lock().unwrap_or_else(|p| p.into_inner());
                let end = w.len.min(offset.saturating_add(u64::from(size)));
                let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
                w.file.read_exact_at(&mut buf, offset).map(|()| buf)
            }
            _ => return reply.error(Errno::EBADF),
        };
        match result {
            Ok(data) => {
                crate::telemetry::mount_read(data.len());
                reply.data(&data)
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        crate::telemetry::mount_request("write");
        let writer = match self.inner.handle(fh).as_deref() {
            Some(Open::Write { writer, .. }) => writer.clone(),
            _ => return reply.error(Errno::EBADF),
        };
        let end = offset.saturating_add(data.len() as u64);
        if end > MAX_FILE {
            return reply.error(Errno::EFBIG);
        }
        let mut w = writer.lock().unwrap_or_else(|p| p.into_inner());
        match w.file.write_all_at(data, offset) {
            Ok(()) => {
                w.len = w.len.max(end);
                w.dirty = true;
                w.version += 1;
                crate::telemetry::mount_written(data.len());
                reply.written(data.len() as u32);
            }
            Err(e) => reply.error(Errno::from(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        crate::telemetry::mount_request("flush");
        match self.inner.handle(fh).as_deref() {
            Some(Open::Write { name, writer }) => {
                self.archive_writer(name.clone(), writer.clone(), reply)
            }
            Some(_) => reply.ok(),
            None => reply.error(Errno::EBADF),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        crate::telemetry::mount_request("fsync");
        self.flush(_req, _ino, fh, LockOwner(0), reply)
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        crate::telemetry::mount_request("release");
        let mut st = self.inner.state();
        if let Some(open) = st.handles.remove(&fh.0) {
            if let Open::Read { ino, .. } = open.as_ref() {
                if let Some(n) = st.nodes.get_mut(ino) {
                    n.readers = n.readers.saturating_sub(1);
                    if n.readers == 0 {
                        n.backing = None;
                    }
                }
            }
            if let Open::Write { name, writer } = open.as_ref() {
                if let Some(n) = st.nodes.get_mut(&ino.0) {
                    if n.writer.as_ref().is_some_and(|w| Arc::ptr_eq(w, writer)) {
                        n.writer = None;
                    }
                }
                if writer.lock().map(|w| w.dirty).unwrap_or(true) {
                    // Unflushed data may be incomplete: archiving it could poison the name.
                    tracing::warn!(%name, "closed without a successful flush: not archived");
                }
            }
        }
        st.drop_if_unused(ino.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let fh = self
            .inner
            .state()
            .add_handle(Open::Dir(Arc::new(tokio::sync::Mutex::new(DirCursor {
                stream: None,
                next: u64::MAX,
                pending: None,
                segment_size: None,
                spooled: Vec::new(),
            }))));
        reply.opened(FileHandle(fh), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        crate::telemetry::mount_request("readdir");
        let Some(open) = self.inner.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        let Open::Dir(cursor) = open.as_ref() else {
            return reply.error(Errno::EBADF);
        };
        let cursor = cursor.clone();
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            let mut reply = reply;
            let mut c = cursor.lock().await;
            // Offsets: "." is 1, ".." is 2, the i-th archived file is 3 + i.
            if c.stream.is_none() || offset != c.next {
                if c.segment_size.is_none() {
                    c.segment_size = match inner.cache.archive().identity().await {
                        Ok(id) => id.map(|i| i.wal_segment_size),
                        Err(e) => {
                            tracing::warn!(error = %e, "reading the archive identity failed");
                            return reply.error(Errno::EIO);
                        }
                    };
                }
                // Fused: the kernel asks once more after the last entry; a finished listing
                // stream must answer "nothing", not be polled again.
                c.stream = Some(inner.cache.list().fuse().boxed());
                c.pending = None;
                c.spooled = inner.cache.spooled_names();
                c.spooled.reverse();
                let mut skip = offset.saturating_sub(2);
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
                if reply.add(INodeNo(ROOT), 1, FileType::Directory, ".") {
                    c.next = 0;
                    return reply.ok();
                }
                pos = 1;
            }
            if pos == 1 {
                if reply.add(INodeNo(ROOT), 2, FileType::Directory, "..") {
                    c.next = 1;
                    return reply.ok();
                }
                pos = 2;
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
                                return reply.error(Errno::EIO);
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
                        Some(name) => Entry {
                            name,
                            stored_bytes: 0,
                            last_modified: 0,
                        },
                        None => break,
                    },
                };
                // `ls -l` looks up every name next: answer those from memory.
                if let (FileKind::Segment, Some(size)) = (entry.name.kind(), c.segment_size) {
                    inner.cache.note_size(&entry.name, size);
                }
                let name = entry.name.to_string();
                if reply.add(
                    INodeNo(listing_ino(&entry.name)),
                    pos + 1,
                    FileType::RegularFile,
                    &name,
                ) {
                    c.pending = Some(entry);
                    break;
                }
                pos += 1;
            }
            c.next = pos;
            reply.ok();
        });
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.state().handles.remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // An object store has no meaningful free space; report plenty so tools do not balk.
        let blocks = 1u64 << 40;
        reply.statfs(blocks, blocks, blocks, 1 << 32, 1 << 32, 4096, 255, 4096);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _d: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn symlink(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _l: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn link(&self, _r: &Request, _i: INodeNo, _p: INodeNo, _n: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EPERM);
    }
}

/// Mounts `fs` at `mountpoint` and serves it from background threads until the returned
/// session is dropped or unmounted.
pub fn spawn(fs: WalFs, mountpoint: &std::path::Path) -> std::io::Result<fuser::BackgroundSession> {
    use fuser::{MountOption, SessionACL};
    let opts = fs.inner.opts.clone();
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("walfs".into()),
        MountOption::Subtype("walfs".into()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        if opts.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    config.acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    // Network work happens on tokio; these threads only dispatch and serve cached bytes.
    config.n_threads = Some(2);
    fuser::spawn_mount(fs, mountpoint, &config)
}
