//! The `fuser::Filesystem` adapter over [`crate::fs::Fs`]: it turns kernel requests into calls
//! and [`FsError`]s into errnos, and hands reads of verified cached files to the kernel (FUSE
//! passthrough). Every request that may wait on the network is answered from a tokio task,
//! so the FUSE threads never do.

use crate::fs::{Attr, Fs, FsError};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
    WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::SystemTime;

/// What `st_blksize` says: `cp` sizes its buffers by it.
const BLKSIZE: u32 = 1 << 20;

fn errno(e: FsError) -> Errno {
    Errno::from_i32(e.errno())
}

/// Kernel passthrough backings: one per inode at a time (the kernel's rule), shared by that
/// inode's read handles and dropped with the last of them.
#[derive(Default)]
struct Backings {
    by_ino: HashMap<u64, Weak<fuser::BackingId>>,
    by_fh: HashMap<u64, Arc<fuser::BackingId>>,
}

struct Inner {
    fs: Fs,
    started: SystemTime,
    /// Whether reads of cached files are handed to the kernel (Linux 6.9+, root); turned off
    /// for good at the first refusal.
    passthrough: AtomicBool,
    backings: Mutex<Backings>,
}

impl Inner {
    fn attr(&self, a: &Attr) -> FileAttr {
        let ro = self.fs.options().read_only;
        let o = self.fs.options();
        FileAttr {
            ino: INodeNo(a.ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind: if a.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            // Files are 0640 even on a read-only mount (writes fail with EROFS there anyway):
            // `cp` gives its copy the source's mode, and PostgreSQL opens the RECOVERYXLOG it
            // restored read-write to fsync it.
            perm: match (a.dir, ro) {
                (true, true) => 0o550,
                (true, false) => 0o750,
                (false, _) => 0o640,
            },
            nlink: if a.dir { 2 } else { 1 },
            uid: o.uid,
            gid: o.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        }
    }

    fn backings(&self) -> std::sync::MutexGuard<'_, Backings> {
        self.backings.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct WalFs {
    rt: tokio::runtime::Handle,
    inner: Arc<Inner>,
}

impl WalFs {
    pub fn new(fs: Fs, rt: tokio::runtime::Handle) -> WalFs {
        WalFs {
            rt,
            inner: Arc::new(Inner {
                fs,
                started: SystemTime::now(),
                passthrough: AtomicBool::new(false),
                backings: Mutex::new(Backings::default()),
            }),
        }
    }
}

impl Filesystem for WalFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // open(O_TRUNC) arrives as one request instead of open + setattr.
        let _ = config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC);
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        // Reads of verified cached files can bypass this process entirely. The cache sits on
        // a plain or stacked (overlay) file system.
        let passthrough = self.inner.fs.options().passthrough
            && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
            && config.set_max_stack_depth(2).is_ok();
        self.inner.passthrough.store(passthrough, Ordering::Relaxed);
        tracing::info!(passthrough, "kernel read passthrough");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        crate::telemetry::mount_request("lookup");
        let (inner, name, pid) = (self.inner.clone(), name.to_owned(), req.pid());
        self.rt.spawn(async move {
            match inner.fs.lookup(parent.0, &name, pid).await {
                Ok(a) => reply.entry(&a.ttl, &inner.attr(&a), Generation(0)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inner.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        crate::telemetry::mount_request("getattr");
        let (inner, pid) = (self.inner.clone(), req.pid());
        self.rt.spawn(async move {
            match inner.fs.getattr(ino.0, pid).await {
                Ok(a) => reply.attr(&a.ttl, &inner.attr(&a)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
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
        let owner_or_mode = mode.is_some() || uid.is_some() || gid.is_some();
        let (inner, pid) = (self.inner.clone(), req.pid());
        self.rt.spawn(async move {
            match inner.fs.setattr(ino.0, size, owner_or_mode, pid).await {
                Ok(a) => reply.attr(&a.ttl, &inner.attr(&a)),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        crate::telemetry::mount_request("unlink");
        let (inner, name) = (self.inner.clone(), name.to_owned());
        self.rt.spawn(async move {
            match inner.fs.unlink(parent.0, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        crate::telemetry::mount_request("create");
        let (inner, pid) = (self.inner.clone(), req.pid());
        self.rt.spawn(async move { inner.fs.writer_seen(pid) });
        match self.inner.fs.create(parent.0, name) {
            Ok((a, fh)) => reply.created(
                &a.ttl,
                &self.inner.attr(&a),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        crate::telemetry::mount_request("open");
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let (inner, pid) = (self.inner.clone(), req.pid());
        self.rt.spawn(async move {
            let opened = match inner.fs.open(ino.0, write, pid).await {
                Ok(o) => o,
                Err(e) => return reply.error(errno(e)),
            };
            let Some(file) = opened.file.filter(|f| !f.is_provisional()) else {
                // A write handle, or a file that will change: no passthrough, and (provisional)
                // no pages kept.
                let flags = if opened.keep_cache {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                return reply.opened(FileHandle(opened.fh), flags);
            };
            if inner.passthrough.load(Ordering::Relaxed) {
                let mut b = inner.backings();
                let backing = match b.by_ino.get(&ino.0).and_then(Weak::upgrade) {
                    Some(existing) => Some(existing),
                    None => match reply.open_backing(file.fd()) {
                        Ok(id) => {
                            let id = Arc::new(id);
                            b.by_ino.insert(ino.0, Arc::downgrade(&id));
                            Some(id)
                        }
                        Err(e) => {
                            tracing::info!(error = %e, "kernel read passthrough refused; reads go through walfs");
                            inner.passthrough.store(false, Ordering::Relaxed);
                            None
                        }
                    },
                };
                if let Some(id) = backing {
                    b.by_fh.insert(opened.fh, id.clone());
                    drop(b);
                    return reply.opened_passthrough(FileHandle(opened.fh), FopenFlags::empty(), &id);
                }
            }
            // Without KEEP_CACHE the kernel drops the inode's cached pages on open.
            let flags = if opened.keep_cache {
                FopenFlags::FOPEN_KEEP_CACHE
            } else {
                FopenFlags::empty()
            };
            reply.opened(FileHandle(opened.fh), flags);
        });
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        crate::telemetry::mount_request("read");
        // Cached bytes are served on this thread; a failure is retried under the policy.
        match self.inner.fs.read_now(fh.0, offset, size) {
            Ok(data) => {
                crate::telemetry::mount_read(data.len());
                reply.data(&data)
            }
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => reply.error(Errno::EBADF),
            Err(_) => {
                let (inner, pid) = (self.inner.clone(), req.pid());
                self.rt.spawn(async move {
                    match inner.fs.read_patiently(fh.0, offset, size, pid).await {
                        Ok(data) => {
                            crate::telemetry::mount_read(data.len());
                            reply.data(&data)
                        }
                        Err(e) => reply.error(errno(e)),
                    }
                });
            }
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
        match self.inner.fs.write(fh.0, offset, data) {
            Ok(n) => {
                crate::telemetry::mount_written(data.len());
                reply.written(n)
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        crate::telemetry::mount_request("flush");
        let (inner, pid) = (self.inner.clone(), req.pid());
        self.rt.spawn(async move {
            match inner.fs.flush(fh.0, pid).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
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
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            match inner.fs.fsync(fh.0).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        crate::telemetry::mount_request("release");
        self.inner.fs.release(fh.0);
        let mut b = self.inner.backings();
        if b.by_fh.remove(&fh.0).is_some() {
            b.by_ino.retain(|_, w| w.strong_count() > 0);
        }
        drop(b);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.inner.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno(e)),
        }
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
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            let mut reply = reply;
            let r = inner
                .fs
                .readdir(fh.0, offset, |ino, next, dir, name| {
                    let kind = if dir {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    reply.add(INodeNo(ino), next, kind, name)
                })
                .await;
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
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
        self.inner.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // An object store has no meaningful free space; report plenty so tools do not balk.
        let blocks = 1u64 << 40;
        reply.statfs(blocks, blocks, blocks, 1 << 32, 1 << 32, 4096, 255, 4096);
    }

    fn mkdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(errno(FsError::NotPermitted));
    }

    fn rmdir(&self, _r: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(errno(FsError::NotPermitted));
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
        reply.error(errno(FsError::NotPermitted));
    }

    fn symlink(
        &self,
        _r: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _l: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(errno(FsError::NotPermitted));
    }

    fn link(&self, _r: &Request, _i: INodeNo, _p: INodeNo, _n: &OsStr, reply: ReplyEntry) {
        reply.error(errno(FsError::NotPermitted));
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
        reply.error(errno(FsError::NotPermitted));
    }
}

/// Mounts `fs` at `mountpoint` and serves it from background threads until the returned
/// session is dropped or unmounted.
pub fn spawn(fs: WalFs, mountpoint: &std::path::Path) -> std::io::Result<fuser::BackgroundSession> {
    use fuser::{MountOption, SessionACL};
    let opts = fs.inner.fs.options().clone();
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
