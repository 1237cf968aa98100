//! `lossyfs`: a FUSE filesystem that loses everything that was not fsynced when the power is cut,
//! like LazyFS (used by Jepsen). Tests put a program's files on it, "cut the power" at a chosen
//! moment and then check what survived, which proves the program fsyncs (files *and* directories)
//! before it claims something is durable.
//!
//! ```text
//! lossyfs <MOUNTPOINT> --image <DIR>
//! ```
//!
//! - Mounts an empty in-memory filesystem at MOUNTPOINT (root directory 0755, owned by the user
//!   lossyfs runs as, i.e. root in the tests). Once the mount is live it prints
//!   `lossyfs: mounted <MOUNTPOINT>` on stdout (flushed): that line is the ready signal. (The mount
//!   also shows up in /proc/self/mountinfo with fsname `lossyfs`, for tests that prefer to poll.)
//! - SIGUSR1 is the power cut: from that instant every request fails with EIO; the DURABLE state
//!   (below) is written out as a real directory tree under DIR (created if missing; it must be
//!   empty if it exists): directories, regular files with their durable bytes, modes, owners and
//!   times, a file durably linked under several names as hard links. Then the filesystem is
//!   unmounted (lazily if it is busy: open files, a cwd inside), `lossyfs: power cut, image in
//!   <DIR>` is printed and the process exits 0 (1 if the image could not be written).
//! - SIGTERM and SIGINT do exactly the same. So does an unmount from outside (`fusermount3 -u`).
//!
//! # The durability model (strict POSIX)
//!
//! Every inode has LIVE state, which every request sees, and DURABLE state, which is what a disk
//! would hold after a power cut. Only fsync moves live state into durable state:
//!
//! - File data: write, truncate (setattr size), fallocate and O_TRUNC change the inode's live
//!   contents. fsync/fdatasync of the file (FUSE `fsync`, datasync or not) makes its durable
//!   contents and length a copy of its live ones; so does a write through an O_SYNC/O_DSYNC
//!   file descriptor (or with RWF_DSYNC/RWF_SYNC), once it returns. Only what changed since the
//!   last fsync is copied (see [`FileData`]), so fsyncing a 16 MiB file after each 8 KiB write
//!   is cheap.
//! - Namespace: create, mknod, mkdir, unlink, rmdir and rename change the live entries of
//!   directories. A directory's entries become durable only when that directory itself is
//!   fsynced (FUSE `fsyncdir`): its durable entry table becomes a copy of its live table
//!   (name -> inode; an inode's type never changes). A rename between two directories is durable
//!   on each side only once that side's directory is fsynced (so after a cut the file may be in
//!   both, or in neither). The root always exists durably; a directory made by mkdir exists
//!   durably only once its parent was fsynced after the mkdir.
//! - After a cut, an inode exists only if it is reachable from the root through durable entries,
//!   with its durable contents: a file that was linked durably but never fsynced is there and
//!   empty, and a file unlinked (or renamed away) in the live namespace but still linked in the
//!   durable one is there with its durable contents, as on a real disk when the unlink was not
//!   synced.
//! - Modes, owners and times are not part of the model: one copy per inode, written to the image
//!   as they are at the cut.
//!
//! Every open uses FOPEN_DIRECT_IO, so each write(2) reaches lossyfs before it returns and the
//! kernel page cache never holds dirty data of its own (no writeback cache either). Shared mmap
//! of a file still works where the kernel allows it (FUSE_DIRECT_IO_ALLOW_MMAP); such pages reach
//! lossyfs at writeback/msync, which is again what a real disk would see.
//!
//! Not modelled: sync(2)/syncfs(2) make nothing durable (the kernel does not pass them on to a
//! FUSE server), nor does close(2). Hard links and symlinks are refused (EPERM), as are device
//! nodes, FIFOs and sockets. Unlinked-but-open files stay usable until the last handle is
//! released.
//!
//! Signals: main blocks SIGUSR1/SIGTERM/SIGINT before any thread exists (so every thread inherits
//! the mask) and then waits for them with sigwait(3); nothing runs in a signal handler. All state
//! lives behind one mutex shared by the FUSE threads and main.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, FileTimes};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// How long the kernel may cache attributes and entries. Every change goes through this mount,
/// so the kernel's copies never go stale.
const TTL: Duration = Duration::from_secs(1);
const ROOT: u64 = INodeNo::ROOT.0;
/// `st_blksize`: what `cp` and friends size their buffers by.
const BLKSIZE: u32 = 128 * 1024;
/// Largest file size accepted (EFBIG beyond): everything lives in memory.
const MAX_FILE_SIZE: u64 = 4 << 30;
const NAME_MAX: usize = 255;
/// What statfs claims the "disk" holds.
const DISK_BYTES: u64 = 64 << 30;
const DISK_INODES: u64 = 1 << 20;

// ------------------------------------------------------------------------------------------------
// The model
// ------------------------------------------------------------------------------------------------

/// A regular file's live and durable contents.
///
/// What makes the incremental fsync correct: below `min(durable.len(), shrunk_to)`, a live byte
/// outside the dirty ranges equals the durable byte (it was neither written nor truncated away
/// since the last fsync). Everything at or beyond that point is copied whole at fsync.
#[derive(Default)]
struct FileData {
    live: Vec<u8>,
    durable: Vec<u8>,
    /// Byte ranges written since the last fsync: start -> end, disjoint, never adjacent.
    dirty: BTreeMap<usize, usize>,
    /// The smallest length the file was truncated to since the last fsync.
    shrunk_to: Option<usize>,
}

impl FileData {
    fn mark_dirty(&mut self, start: usize, end: usize) {
        let (mut start, mut end) = (start, end);
        // Merge with every range that overlaps or touches [start, end). Ranges are disjoint and
        // sorted, so those are the last ones starting at or before `end`, while they reach `start`.
        while let Some((&s, &e)) = self.dirty.range(..=end).next_back() {
            if e < start {
                break;
            }
            self.dirty.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.dirty.insert(start, end);
    }

    fn write(&mut self, offset: usize, data: &[u8]) {
        let end = offset + data.len();
        if offset > self.live.len() {
            zero_extend(&mut self.live, offset);
        }
        if offset == self.live.len() {
            self.live.extend_from_slice(data);
        } else {
            let overlap = end.min(self.live.len());
            self.live[offset..overlap].copy_from_slice(&data[..overlap - offset]);
            self.live.extend_from_slice(&data[overlap - offset..]);
        }
        if !data.is_empty() {
            self.mark_dirty(offset, end);
        }
    }

    fn set_len(&mut self, len: usize) {
        if len < self.live.len() {
            self.shrunk_to = Some(self.shrunk_to.map_or(len, |m| m.min(len)));
            self.live.truncate(len);
            if self.live.capacity() > 4 * len.max(1 << 20) {
                self.live.shrink_to_fit();
            }
        } else {
            // No dirty range needed: growth starts at or beyond min(durable length, shrunk_to),
            // from where fsync copies everything.
            zero_extend(&mut self.live, len);
        }
    }

    /// fsync: durable := live, copying only what changed.
    fn sync(&mut self) {
        if let Some(len) = self.shrunk_to.take() {
            self.durable.truncate(len);
        }
        let len = self.live.len();
        let base = self.durable.len().min(len);
        self.durable.truncate(len);
        // Growth: the new tail is copied whole (dirty or zero, it is what live holds) ...
        self.durable.extend_from_slice(&self.live[base..]);
        // ... and before it only the dirty ranges can differ.
        for (start, end) in std::mem::take(&mut self.dirty) {
            let end = end.min(base);
            if start < end {
                self.durable[start..end].copy_from_slice(&self.live[start..end]);
            }
        }
    }
}

/// Grows `v` to `len` with zeros. (`Vec::resize` fills byte by byte in unoptimised builds, which
/// is what the tests run; a zeroed allocation plus memcpy is fast in both.)
fn zero_extend(v: &mut Vec<u8>, len: usize) {
    if len > v.len() {
        v.extend_from_slice(&vec![0u8; len - v.len()]);
    }
}

struct DirData {
    /// Live entries: name -> inode.
    live: BTreeMap<OsString, u64>,
    /// Durable entries, a copy of `live` as of the last fsyncdir.
    durable: BTreeMap<OsString, u64>,
    /// Whether `live` changed since the last fsyncdir.
    changed: bool,
    /// Live parent (for `..`).
    parent: u64,
}

enum Body {
    File(FileData),
    Dir(DirData),
}

struct Inode {
    /// Permission bits (07777); the type is in `body`.
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
    body: Body,
    /// Live directory entries naming this inode (0 or 1 for a directory: no hard links).
    links: u32,
    /// Durable directory entries naming this inode.
    durable_refs: u32,
    /// The kernel's lookup count (entries replied minus forgotten).
    lookups: u64,
    /// Open file handles.
    opens: u32,
}

impl Inode {
    fn new(perm: u16, uid: u32, gid: u32, body: Body) -> Inode {
        let now = SystemTime::now();
        Inode {
            perm,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            body,
            links: 0,
            durable_refs: 0,
            lookups: 0,
            opens: 0,
        }
    }

    fn kind(&self) -> FileType {
        match self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
        }
    }

    fn touch(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

struct DirEntry {
    ino: u64,
    kind: FileType,
    name: OsString,
}

struct State {
    inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Directory listings, snapshotted at opendir so readdir offsets stay stable.
    dir_handles: HashMap<u64, Vec<DirEntry>>,
    next_fh: u64,
    /// Set by the power cut: every later request fails with EIO.
    cut: bool,
}

type Res<T> = Result<T, Errno>;

fn check_name(name: &OsStr) -> Res<()> {
    if name.len() > NAME_MAX {
        Err(Errno::ENAMETOOLONG)
    } else {
        Ok(())
    }
}

fn to_time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl State {
    fn new(uid: u32, gid: u32) -> State {
        let mut root = Inode::new(
            0o755,
            uid,
            gid,
            Body::Dir(DirData {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                changed: false,
                parent: ROOT,
            }),
        );
        // The root is always linked and always durable, so it is never freed.
        root.links = 1;
        root.durable_refs = 1;
        State {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            dir_handles: HashMap::new(),
            next_fh: 1,
            cut: false,
        }
    }

    fn node(&self, ino: u64) -> Res<&Inode> {
        self.inodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Res<&mut Inode> {
        self.inodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Res<&DirData> {
        match &self.node(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Res<&mut DirData> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(d) => Ok(d),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut FileData> {
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => Ok(f),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn attr(&self, ino: u64) -> Res<FileAttr> {
        let n = self.node(ino)?;
        let (size, nlink) = match &n.body {
            Body::File(f) => (f.live.len() as u64, n.links),
            Body::Dir(d) => {
                let subdirs = d
                    .live
                    .values()
                    .filter(|c| matches!(self.inodes.get(c).map(|c| &c.body), Some(Body::Dir(_))))
                    .count() as u32;
                (4096, if n.links == 0 { 0 } else { 2 + subdirs })
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: n.atime,
            mtime: n.mtime,
            ctime: n.ctime,
            crtime: n.crtime,
            kind: n.kind(),
            perm: n.perm,
            nlink,
            uid: n.uid,
            gid: n.gid,
            rdev: 0,
            blksize: BLKSIZE,
            flags: 0,
        })
    }

    /// The attributes of `ino` for an entry reply, which the kernel counts as one lookup.
    fn entry(&mut self, ino: u64) -> Res<FileAttr> {
        let attr = self.attr(ino)?;
        self.node_mut(ino)?.lookups += 1;
        Ok(attr)
    }

    fn lookup(&mut self, parent: u64, name: &OsStr) -> Res<FileAttr> {
        check_name(name)?;
        let ino = *self.dir(parent)?.live.get(name).ok_or(Errno::ENOENT)?;
        self.entry(ino)
    }

    /// Frees `ino` once nothing can reach it any more: no live or durable entry, no kernel
    /// reference, no open handle. A freed directory drops its durable entries in turn.
    fn maybe_free(&mut self, ino: u64) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            let Some(n) = self.inodes.get(&ino) else {
                continue;
            };
            if ino == ROOT || n.links > 0 || n.durable_refs > 0 || n.lookups > 0 || n.opens > 0 {
                continue;
            }
            if let Some(Inode {
                body: Body::Dir(d), ..
            }) = self.inodes.remove(&ino)
            {
                for child in d.durable.into_values() {
                    if let Some(c) = self.inodes.get_mut(&child) {
                        c.durable_refs -= 1;
                        work.push(child);
                    }
                }
            }
        }
    }

    /// Adds a new inode under `parent`/`name` (live only).
    fn make(
        &mut self,
        req: &Request,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        dir: bool,
    ) -> Res<u64> {
        check_name(name)?;
        let (parent_links, parent_perm, parent_gid) = {
            let p = self.node(parent)?;
            (p.links, p.perm, p.gid)
        };
        let d = self.dir(parent)?;
        if parent_links == 0 {
            return Err(Errno::ENOENT); // a removed directory
        }
        if d.live.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let mut perm = (mode & !umask & 0o7777) as u16;
        // setgid directories pass their group (and, to subdirectories, the bit) on.
        let gid = if parent_perm & 0o2000 != 0 {
            if dir {
                perm |= 0o2000;
            }
            parent_gid
        } else {
            req.gid()
        };
        let body = if dir {
            Body::Dir(DirData {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                changed: false,
                parent,
            })
        } else {
            Body::File(FileData::default())
        };
        let ino = self.next_ino;
        self.next_ino += 1;
        let mut node = Inode::new(perm, req.uid(), gid, body);
        node.links = 1;
        self.inodes.insert(ino, node);
        let d = self.dir_mut(parent)?;
        d.live.insert(name.to_owned(), ino);
        d.changed = true;
        self.node_mut(parent)?.touch();
        Ok(ino)
    }

    /// unlink (dir = false) or rmdir (dir = true).
    fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Res<()> {
        check_name(name)?;
        let ino = *self.dir(parent)?.live.get(name).ok_or(Errno::ENOENT)?;
        match (&self.node(ino)?.body, dir) {
            (Body::Dir(_), false) => return Err(Errno::EISDIR),
            (Body::File(_), true) => return Err(Errno::ENOTDIR),
            (Body::Dir(d), true) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
            _ => {}
        }
        let d = self.dir_mut(parent)?;
        d.live.remove(name);
        d.changed = true;
        self.node_mut(parent)?.touch();
        let n = self.node_mut(ino)?;
        n.links -= 1;
        n.ctime = SystemTime::now();
        self.maybe_free(ino);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if flags.bits() & !libc::RENAME_NOREPLACE != 0 {
            return Err(Errno::EINVAL);
        }
        check_name(name)?;
        check_name(newname)?;
        let src = *self.dir(parent)?.live.get(name).ok_or(Errno::ENOENT)?;
        if self.node(newparent)?.links == 0 {
            return Err(Errno::ENOENT);
        }
        let src_is_dir = matches!(self.node(src)?.body, Body::Dir(_));
        let dst = self.dir(newparent)?.live.get(newname).copied();
        if let Some(dst) = dst {
            if dst == src {
                return Ok(()); // same inode: POSIX says do nothing
            }
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            match (src_is_dir, &self.node(dst)?.body) {
                (true, Body::File(_)) => return Err(Errno::ENOTDIR),
                (false, Body::Dir(_)) => return Err(Errno::EISDIR),
                (true, Body::Dir(d)) if !d.live.is_empty() => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        if src_is_dir {
            // A directory cannot move into itself or below itself.
            let mut p = newparent;
            loop {
                if p == src {
                    return Err(Errno::EINVAL);
                }
                if p == ROOT {
                    break;
                }
                match self.dir(p) {
                    Ok(d) => p = d.parent,
                    Err(_) => break,
                }
            }
        }
        // Only the live tables change; each side becomes durable with its own fsyncdir.
        let d = self.dir_mut(parent)?;
        d.live.remove(name);
        d.changed = true;
        let d = self.dir_mut(newparent)?;
        d.live.insert(newname.to_owned(), src);
        d.changed = true;
        self.node_mut(parent)?.touch();
        self.node_mut(newparent)?.touch();
        let n = self.node_mut(src)?;
        n.ctime = SystemTime::now();
        if let Body::Dir(d) = &mut n.body {
            d.parent = newparent;
        }
        if let Some(dst) = dst {
            let n = self.node_mut(dst)?;
            n.links -= 1;
            n.ctime = SystemTime::now();
            self.maybe_free(dst);
        }
        Ok(())
    }

    fn set_size(&mut self, ino: u64, size: u64) -> Res<()> {
        if size > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        self.file_mut(ino)?.set_len(size as usize);
        self.node_mut(ino)?.touch();
        Ok(())
    }

    fn open_file(&mut self, ino: u64, flags: i32) -> Res<()> {
        if matches!(self.node(ino)?.body, Body::Dir(_)) {
            return Err(Errno::EISDIR);
        }
        // The kernel normally truncates with a setattr first; honour the flag anyway.
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            self.set_size(ino, 0)?;
        }
        self.node_mut(ino)?.opens += 1;
        Ok(())
    }

    fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Res<u32> {
        let end = offset.checked_add(data.len() as u64).ok_or(Errno::EFBIG)?;
        if end > MAX_FILE_SIZE {
            return Err(Errno::EFBIG);
        }
        self.file_mut(ino)?.write(offset as usize, data);
        self.node_mut(ino)?.touch();
        Ok(data.len() as u32)
    }

    fn fsync(&mut self, ino: u64) -> Res<()> {
        match &mut self.node_mut(ino)?.body {
            Body::File(f) => {
                f.sync();
                Ok(())
            }
            Body::Dir(_) => self.fsyncdir(ino),
        }
    }

    /// fsyncdir: the directory's durable entry table becomes a copy of its live one.
    fn fsyncdir(&mut self, ino: u64) -> Res<()> {
        let d = self.dir_mut(ino)?;
        if !d.changed {
            return Ok(());
        }
        d.changed = false;
        let old = std::mem::replace(&mut d.durable, d.live.clone());
        let new: Vec<u64> = d.durable.values().copied().collect();
        // Count the new references before dropping the old ones, so nothing is freed in between.
        for child in new {
            if let Some(c) = self.inodes.get_mut(&child) {
                c.durable_refs += 1;
            }
        }
        for child in old.into_values() {
            if let Some(c) = self.inodes.get_mut(&child) {
                c.durable_refs -= 1;
                self.maybe_free(child);
            }
        }
        Ok(())
    }

    /// The live listing of a directory, with `.` and `..`.
    fn listing(&self, ino: u64) -> Res<Vec<DirEntry>> {
        let d = self.dir(ino)?;
        let mut list = vec![
            DirEntry {
                ino,
                kind: FileType::Directory,
                name: ".".into(),
            },
            DirEntry {
                ino: d.parent,
                kind: FileType::Directory,
                name: "..".into(),
            },
        ];
        for (name, &child) in &d.live {
            if let Some(c) = self.inodes.get(&child) {
                list.push(DirEntry {
                    ino: child,
                    kind: c.kind(),
                    name: name.clone(),
                });
            }
        }
        Ok(list)
    }

    fn opendir(&mut self, ino: u64) -> Res<u64> {
        let list = self.listing(ino)?;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.dir_handles.insert(fh, list);
        Ok(fh)
    }

    /// Fills `reply` from the handle's snapshot, taken at opendir and again at every read from
    /// offset 0 (rewinddir), so offsets stay stable while the directory changes.
    fn readdir(&mut self, ino: u64, fh: u64, offset: u64, reply: &mut ReplyDirectory) -> Res<()> {
        if offset == 0 {
            let list = self.listing(ino)?;
            self.dir_handles.insert(fh, list);
        }
        let list = self.dir_handles.get(&fh).ok_or(Errno::EBADF)?;
        // An entry's offset is the index of the next one.
        for (i, e) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), i as u64 + 1, e.kind, &e.name) {
                break;
            }
        }
        Ok(())
    }

    fn bytes_used(&self) -> u64 {
        self.inodes
            .values()
            .map(|n| match &n.body {
                Body::File(f) => f.live.len().max(f.durable.len()) as u64,
                Body::Dir(_) => 4096,
            })
            .sum()
    }

    // --------------------------------------------------------------------------------------------
    // The image
    // --------------------------------------------------------------------------------------------

    /// Writes what is durable (see the module doc) as a directory tree under `dir`.
    fn dump(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let mut files = HashMap::new();
        let mut dirs = HashSet::new();
        self.dump_dir(ROOT, dir, &mut files, &mut dirs)
    }

    fn dump_dir(
        &self,
        ino: u64,
        path: &Path,
        files: &mut HashMap<u64, PathBuf>,
        dirs: &mut HashSet<u64>,
    ) -> io::Result<()> {
        dirs.insert(ino);
        let node = &self.inodes[&ino];
        let Body::Dir(d) = &node.body else {
            unreachable!("dump_dir on a file")
        };
        for (name, child) in &d.durable {
            let Some(c) = self.inodes.get(child) else {
                continue; // cannot happen: durable entries keep their inodes
            };
            let p = path.join(name);
            match &c.body {
                Body::File(f) => {
                    // Durably linked under several names (a rename synced on one side only,
                    // say): one inode, several links, as on the disk.
                    if let Some(first) = files.get(child) {
                        fs::hard_link(first, &p)?;
                        continue;
                    }
                    fs::write(&p, &f.durable)?;
                    apply_meta(&p, c)?;
                    files.insert(*child, p);
                }
                Body::Dir(_) => {
                    if dirs.contains(child) {
                        // Only possible after a directory rename synced on one side only;
                        // a tree cannot hold a directory twice.
                        let p = p.display();
                        eprintln!("lossyfs: {p}: a second durable name of a directory; skipped");
                        continue;
                    }
                    fs::create_dir(&p)?;
                    self.dump_dir(*child, &p, files, dirs)?;
                }
            }
        }
        // After the children, which changed this directory's mtime.
        apply_meta(path, node)
    }
}

/// Gives the image file or directory at `path` the inode's owner, mode and times.
fn apply_meta(path: &Path, n: &Inode) -> io::Result<()> {
    // chown before chmod: chown clears setuid/setgid bits.
    if let Err(e) = std::os::unix::fs::chown(path, Some(n.uid), Some(n.gid)) {
        // Only root may give files away; without it, keep going with our own ids.
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    fs::set_permissions(path, fs::Permissions::from_mode(u32::from(n.perm)))?;
    File::open(path)?.set_times(FileTimes::new().set_accessed(n.atime).set_modified(n.mtime))
}

// ------------------------------------------------------------------------------------------------
// FUSE glue
// ------------------------------------------------------------------------------------------------

struct LossyFs {
    state: Arc<Mutex<State>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl LossyFs {
    /// Runs `f` on the state, or fails with EIO once the power is cut.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> Res<T>) -> Res<T> {
        let mut s = lock(&self.state);
        if s.cut {
            return Err(Errno::EIO);
        }
        f(&mut s)
    }
}

fn open_flags() -> FopenFlags {
    // Every write(2) reaches us before it returns: no dirty pages in the kernel.
    FopenFlags::FOPEN_DIRECT_IO
}

macro_rules! reply {
    ($reply:expr, $res:expr, |$v:pat_param| $ok:expr) => {
        match $res {
            Ok($v) => $ok,
            Err(e) => $reply.error(e),
        }
    };
}

impl Filesystem for LossyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Lets programs mmap files despite direct I/O (their pages reach us at writeback).
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply!(reply, self.with(|s| s.lookup(parent.0, name)), |a| reply
            .entry(&TTL, &a, Generation(0)));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut s = lock(&self.state);
        if let Some(n) = s.inodes.get_mut(&ino.0) {
            n.lookups = n.lookups.saturating_sub(nlookup);
            s.maybe_free(ino.0);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        reply!(reply, self.with(|s| s.attr(ino.0)), |a| reply
            .attr(&TTL, &a));
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let res = self.with(|s| {
            let ino = ino.0;
            if let Some(size) = size {
                s.set_size(ino, size)?;
            }
            let n = s.node_mut(ino)?;
            if let Some(mode) = mode {
                n.perm = (mode & 0o7777) as u16;
            }
            if let Some(uid) = uid {
                n.uid = uid;
            }
            if let Some(gid) = gid {
                n.gid = gid;
            }
            if let Some(t) = atime {
                n.atime = to_time(t);
            }
            if let Some(t) = mtime {
                n.mtime = to_time(t);
            }
            n.ctime = ctime.unwrap_or_else(SystemTime::now);
            s.attr(ino)
        });
        reply!(reply, res, |a| reply.attr(&TTL, &a));
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != 0 {
            return reply.error(Errno::EPERM); // devices, FIFOs, sockets: not modelled
        }
        let res = self.with(|s| {
            let ino = s.make(req, parent.0, name, mode, umask, false)?;
            s.entry(ino)
        });
        reply!(reply, res, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let res = self.with(|s| {
            let ino = s.make(req, parent.0, name, mode, umask, true)?;
            s.entry(ino)
        });
        reply!(reply, res, |a| reply.entry(&TTL, &a, Generation(0)));
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply!(
            reply,
            self.with(|s| s.remove(parent.0, name, false)),
            |()| reply.ok()
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply!(reply, self.with(|s| s.remove(parent.0, name, true)), |()| {
            reply.ok()
        });
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = self.with(|s| s.rename(parent.0, name, newparent.0, newname, flags));
        reply!(reply, res, |()| reply.ok());
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        reply!(reply, self.with(|s| s.open_file(ino.0, flags.0)), |()| {
            reply.opened(FileHandle(0), open_flags())
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let s = lock(&self.state);
        if s.cut {
            return reply.error(Errno::EIO);
        }
        match s.node(ino.0).map(|n| &n.body) {
            Ok(Body::File(f)) => {
                let start = (offset.min(f.live.len() as u64)) as usize;
                let end = start.saturating_add(size as usize).min(f.live.len());
                reply.data(&f.live[start..end]);
            }
            Ok(Body::Dir(_)) => reply.error(Errno::EISDIR),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // O_APPEND: the kernel has already turned the position into the end of the file.
        let res = self.with(|s| {
            let n = s.write(ino.0, offset, data)?;
            // With direct I/O the kernel does not follow an O_SYNC/O_DSYNC (or RWF_DSYNC)
            // write with an fsync: it passes the flag on (O_SYNC includes the O_DSYNC bit),
            // and the write is durable when it returns.
            if flags.0 & libc::O_DSYNC != 0 {
                s.fsync(ino.0)?;
            }
            Ok(n)
        });
        reply!(reply, res, |n| reply.written(n));
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) is no sync point.
        reply!(reply, self.with(|_| Ok(())), |()| reply.ok());
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let mut s = lock(&self.state);
        if let Some(n) = s.inodes.get_mut(&ino.0) {
            n.opens = n.opens.saturating_sub(1);
            s.maybe_free(ino.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply!(reply, self.with(|s| s.fsync(ino.0)), |()| reply.ok());
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply!(reply, self.with(|s| s.opendir(ino.0)), |fh| reply
            .opened(FileHandle(fh), FopenFlags::empty()));
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.with(|s| s.readdir(ino.0, fh.0, offset, &mut reply)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.state).dir_handles.remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply!(reply, self.with(|s| s.fsyncdir(ino.0)), |()| reply.ok());
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let res = self.with(|s| Ok((s.bytes_used(), s.inodes.len() as u64)));
        reply!(reply, res, |(used, files)| {
            let bsize = 4096u64;
            let blocks = DISK_BYTES / bsize;
            let free = blocks.saturating_sub(used.div_ceil(bsize));
            let ffree = DISK_INODES.saturating_sub(files);
            reply.statfs(
                blocks,
                free,
                free,
                DISK_INODES,
                ffree,
                bsize as u32,
                NAME_MAX as u32,
                bsize as u32,
            )
        });
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions); this only says "exists".
        reply!(reply, self.with(|s| s.node(ino.0).map(|_| ())), |()| reply
            .ok());
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let res = self.with(|s| {
            let ino = match s.make(req, parent.0, name, mode, umask, false) {
                Ok(ino) => ino,
                // Lost a race with another creator: plain O_CREAT opens what is there.
                Err(e) if e == Errno::EEXIST && flags & libc::O_EXCL == 0 => {
                    *s.dir(parent.0)?.live.get(name).ok_or(Errno::ENOENT)?
                }
                Err(e) => return Err(e),
            };
            s.open_file(ino, flags)?;
            s.entry(ino)
        });
        reply!(reply, res, |a| reply.created(
            &TTL,
            &a,
            Generation(0),
            FileHandle(0),
            open_flags()
        ));
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let res = self.with(|s| {
            let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
            let len = s.file_mut(ino.0)?.live.len() as u64;
            if end > len {
                s.set_size(ino.0, end)?;
            }
            Ok(())
        });
        reply!(reply, res, |()| reply.ok());
    }
}

// ------------------------------------------------------------------------------------------------
// Main: mount, wait for a signal, cut the power
// ------------------------------------------------------------------------------------------------

const USAGE: &str = "usage: lossyfs <MOUNTPOINT> --image <DIR>";

fn parse_args() -> Result<(PathBuf, PathBuf), String> {
    let mut mountpoint = None;
    let mut image = None;
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let s = a.to_string_lossy();
        if s == "-h" || s == "--help" {
            return Err(String::new());
        } else if s == "--image" {
            image = Some(PathBuf::from(args.next().ok_or("--image needs a value")?));
        } else if let Some(v) = s.strip_prefix("--image=") {
            image = Some(PathBuf::from(v));
        } else if s.starts_with('-') {
            return Err(format!("unknown option {s}"));
        } else if mountpoint.is_none() {
            mountpoint = Some(PathBuf::from(a));
        } else {
            return Err(format!("unexpected argument {s}"));
        }
    }
    match (mountpoint, image) {
        (Some(m), Some(i)) => Ok((m, i)),
        (None, _) => Err("missing MOUNTPOINT".into()),
        (_, None) => Err("missing --image DIR".into()),
    }
}

fn blocked_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a plain sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGUSR1, libc::SIGTERM, libc::SIGINT] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

/// Unmounts `mountpoint`, lazily if it is busy; as non-root through fusermount3.
fn unmount(mountpoint: &Path) {
    let Ok(c) = CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return;
    }
    match io::Error::last_os_error().raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOENT) => return, // not mounted any more
        // SAFETY: as above.
        Some(libc::EBUSY) if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 => {
            eprintln!("lossyfs: {} busy, detached lazily", mountpoint.display());
            return;
        }
        _ => {}
    }
    for args in [&["-u"][..], &["-u", "-z"][..]] {
        let ok = Command::new("fusermount3")
            .args(args)
            .arg("--")
            .arg(mountpoint)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        if ok {
            return;
        }
    }
    eprintln!("lossyfs: could not unmount {}", mountpoint.display());
}

fn main() -> ExitCode {
    let (mountpoint, image) = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("lossyfs: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    if fs::read_dir(&image).is_ok_and(|mut d| d.next().is_some()) {
        eprintln!("lossyfs: image directory {} is not empty", image.display());
        return ExitCode::from(2);
    }
    let canonical = match mountpoint.canonicalize() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lossyfs: mount point {}: {e}", mountpoint.display());
            return ExitCode::from(2);
        }
    };

    // Block the signals before any thread exists: every thread inherits the mask, and only
    // sigwait below ever takes them.
    let signals = blocked_signals();
    // SAFETY: a valid, initialised sigset.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &signals, std::ptr::null_mut()) };

    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let state = Arc::new(Mutex::new(State::new(uid, gid)));
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName("lossyfs".into()),
        MountOption::Subtype("lossyfs".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
    ];
    config.n_threads = Some(2);
    let session = match fuser::spawn_mount(
        LossyFs {
            state: state.clone(),
        },
        &canonical,
        &config,
    ) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lossyfs: mounting {}: {e}", mountpoint.display());
            return ExitCode::FAILURE;
        }
    };
    // If the mount goes away on its own (an unmount from outside), stop as on SIGTERM.
    std::thread::spawn(move || {
        let _ = session.join();
        // SAFETY: kill on our own pid.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    // spawn_mount returns after the INIT handshake: the mount is live.
    println!("lossyfs: mounted {}", mountpoint.display());
    let _ = io::stdout().flush();

    let sig = loop {
        let mut sig = 0;
        // SAFETY: valid sigset and out pointer.
        if unsafe { libc::sigwait(&signals, &mut sig) } == 0 {
            break sig;
        }
    };

    // The power cut. From here on every request fails with EIO (`cut`); hold the lock while
    // writing the image so nothing can change underneath.
    let dumped = {
        let mut s = lock(&state);
        s.cut = true;
        s.dump(&image)
    };
    unmount(&canonical);
    let name = match sig {
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGINT",
    };
    match dumped {
        Ok(()) => {
            println!("lossyfs: power cut, image in {}", image.display());
            let _ = io::stdout().flush();
            eprintln!(
                "lossyfs: {name}: durable state written to {}",
                image.display()
            );
            // Exit without running the FUSE session's teardown: the mount is gone already.
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("lossyfs: writing the image to {}: {e}", image.display());
            std::process::exit(1)
        }
    }
}
