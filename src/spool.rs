//! The receiver's spool: WAL that `walfs receive` has fsynced and the archive may not hold yet.
//! The receiver writes it; the mount reads it (so a restore sees WAL the moment it is durable
//! anywhere). This module is the one place that knows its layout.
//!
//! ```text
//! <cache-dir>/<archive>/spool/          mode 0700, files 0600
//!   current/<segment>.partial           the segment being received: full size, zero-filled
//!                                       ahead of the data, written at its offsets
//!   current/.spare                      the next segment's file, zero-filled and fsynced in
//!                                       the background, renamed into place when it starts
//!                                       (`.spare.tmp` while it is being made)
//!   ready/<name>                        complete files waiting for upload: segments, timeline
//!                                       history files, a timeline's last segment as
//!                                       <segment>.partial (its end is the switch point)
//!   rejected/<name>                     files the archive refused for good (another cluster,
//!                                       different bytes already archived): kept, reported,
//!                                       never retried
//! ```
//!
//! A file's life: `current` → (the last byte arrives: fsync, rename, both directories fsynced)
//! → `ready` → (the archive confirmed it) removed, or (refused for good) → `rejected`. The
//! server is told a flush position only once it is fsynced in `current` or `ready`.
//!
//! After a crash anything may be cut short except what was fsynced: a file in `ready` is
//! whole (it got there by a rename after its fsync); a `current` file holds every byte up to
//! the last flush position reported, and the receiver re-streams it from its start; a
//! `.tmp` file in `ready` is a history file that never finished and is rewritten; `.spare`
//! exists only whole (renamed after its fsync), `.spare.tmp` is remade. A spare renamed into
//! place is named durably (directory fsynced) before any WAL is written into it, so after a
//! crash a spare never holds WAL and a segment never lacks its name.

use crate::wal::{ArchiveName, FileKind};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Mode of the directories that hold WAL (the spool, the cache's plain/ and writes/):
/// received WAL is every row of the database.
pub const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;
const PARTIAL: &str = ".partial";
const SPARE: &str = ".spare";
const SPARE_TMP: &str = ".spare.tmp";

/// Where the spool of the archive whose cache directory is `archive_dir` lives.
pub fn spool_dir(archive_dir: &Path) -> PathBuf {
    archive_dir.join("spool")
}

pub struct Spool {
    dir: PathBuf,
    current: PathBuf,
    ready: PathBuf,
    rejected: PathBuf,
    /// A spare is being made (one at a time: they share `.spare.tmp`).
    making_spare: std::sync::atomic::AtomicBool,
}

/// Makes `dir` (and its missing parents) with `mode`, and gives `dir` that mode if it existed
/// with another. A directory it makes is named durably: its parent is fsynced.
pub fn private_dir(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // A relative path's last ancestor is "": its first component's parent is the cwd.
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .collect();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    for made in missing.iter().rev() {
        match made.parent() {
            Some(p) if p.as_os_str().is_empty() => fsync_dir(Path::new("."))?,
            Some(p) => fsync_dir(p)?,
            None => {}
        }
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Makes `dest` whole or not at all: `fill` writes `tmp` (created or emptied, private), which is
/// fsynced and renamed to `dest`, whose directory is fsynced.
fn durable_file(
    tmp: &Path,
    dest: &Path,
    fill: impl FnOnce(&File) -> io::Result<()>,
) -> io::Result<()> {
    let f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(tmp)?;
    fill(&f)?;
    f.sync_all()?;
    std::fs::rename(tmp, dest)?;
    fsync_dir(dest.parent().unwrap_or(Path::new(".")))
}

/// Fills `f` with zeros up to `size` bytes and fsyncs it, as pg_receivewal does for a new
/// segment: later fdatasyncs then write data only, not block allocations (a sparse file would
/// make every synchronous commit wait for a metadata update).
fn zero_fill(f: &File, size: u64) -> io::Result<()> {
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

/// Files carrying archive names in `dir`, sorted; a missing directory holds none, any other
/// error is one.
fn names_in(dir: &Path) -> io::Result<Vec<ArchiveName>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut v = Vec::new();
    for e in entries {
        if let Some(n) = e?
            .file_name()
            .to_str()
            .and_then(|n| ArchiveName::parse(n).ok())
        {
            v.push(n);
        }
    }
    v.sort();
    Ok(v)
}

impl Spool {
    /// The spool under `dir`, as a reader sees it (nothing is created).
    pub fn at(dir: &Path) -> Spool {
        Spool {
            dir: dir.to_path_buf(),
            current: dir.join("current"),
            ready: dir.join("ready"),
            rejected: dir.join("rejected"),
            making_spare: Default::default(),
        }
    }

    /// The spool under `dir`, for the receiver: its directories are made, private.
    pub fn open(dir: &Path) -> io::Result<Spool> {
        let s = Spool::at(dir);
        for d in [&s.dir, &s.current, &s.ready, &s.rejected] {
            private_dir(d, DIR_MODE)?;
        }
        Ok(s)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Files waiting for upload, in name order (history files before the segments of their
    /// timeline).
    pub fn ready(&self) -> io::Result<Vec<ArchiveName>> {
        names_in(&self.ready)
    }

    /// Files the archive refused for good.
    pub fn rejected(&self) -> io::Result<Vec<ArchiveName>> {
        names_in(&self.rejected)
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

    /// The segments being received (`current/`), as `<segment>.partial` names.
    pub fn partials(&self) -> io::Result<Vec<ArchiveName>> {
        Ok(names_in(&self.current)?
            .into_iter()
            .filter(|n| n.kind() == FileKind::Partial)
            .collect())
    }

    /// The newest segment being received: (its segment name, its file).
    pub fn newest_partial(&self) -> io::Result<Option<(ArchiveName, PathBuf)>> {
        Ok(self.partials()?.pop().and_then(|p| {
            let segment = ArchiveName::parse(p.as_str().strip_suffix(PARTIAL)?).ok()?;
            Some((segment, self.current.join(p.as_str())))
        }))
    }

    pub fn ready_path(&self, name: &ArchiveName) -> PathBuf {
        self.ready.join(name.as_str())
    }

    pub fn current_path(&self, segment: &str) -> PathBuf {
        self.current.join(format!("{segment}{PARTIAL}"))
    }

    /// A ready file for reading, or None when the spool has none of that name.
    pub fn open_ready(&self, name: &ArchiveName) -> io::Result<Option<File>> {
        match File::open(self.ready_path(name)) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens the file a segment is received into, `size` bytes long: the one there (a segment
    /// received before a restart), else the spare renamed into place, else a new file filled
    /// with zeros here and now. Its name is durable when this returns. Says whether the spare
    /// was used.
    pub fn open_current(&self, segment: &str, size: u64) -> io::Result<(File, bool)> {
        let path = self.current_path(segment);
        let spare = self.current.join(SPARE);
        let took_spare = !path.exists()
            && std::fs::metadata(&spare).is_ok_and(|m| m.len() == size)
            && std::fs::rename(&spare, &path).is_ok();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&path)?;
        if !took_spare {
            zero_fill(&f, size)?;
        }
        fsync_dir(&self.current)?;
        Ok((f, took_spare))
    }

    /// Makes the spare segment file (zero-filled, fsynced) unless there is one or another
    /// call is making it. Slow (a whole segment is written): call it off the streaming path.
    pub fn make_spare(&self, size: u64) -> io::Result<()> {
        use std::sync::atomic::Ordering;
        let spare = self.current.join(SPARE);
        if std::fs::metadata(&spare).is_ok_and(|m| m.len() == size)
            || self.making_spare.swap(true, Ordering::AcqRel)
        {
            return Ok(());
        }
        let made = durable_file(&self.current.join(SPARE_TMP), &spare, |f| {
            zero_fill(f, size)
        });
        self.making_spare.store(false, Ordering::Release);
        made
    }

    /// Writes a whole file into `ready/` durably (a history file the server sent).
    pub fn put_ready(&self, name: &ArchiveName, data: &[u8]) -> io::Result<()> {
        let tmp = self.ready.join(format!(".{name}.tmp"));
        durable_file(&tmp, &self.ready_path(name), |f| f.write_all_at(data, 0))
    }

    /// Moves a finished `current/<segment>.partial` to `ready/` under `final_name`.
    pub fn finish(&self, file: &File, segment: &str, final_name: &str) -> io::Result<()> {
        file.sync_all()?;
        std::fs::rename(self.current_path(segment), self.ready.join(final_name))?;
        fsync_dir(&self.ready)?;
        fsync_dir(&self.current)
    }

    /// Forgets a ready file the archive now holds.
    pub fn remove_ready(&self, name: &ArchiveName) -> io::Result<()> {
        std::fs::remove_file(self.ready_path(name))?;
        fsync_dir(&self.ready)
    }

    /// Moves into this spool the received files another one holds and this one lacks (the
    /// spool of a cache directory an earlier walfs named differently).
    pub fn take_files_from(&self, older: &Spool) -> io::Result<()> {
        for (from, to) in [(&older.ready, &self.ready), (&older.current, &self.current)] {
            let Ok(entries) = std::fs::read_dir(from) else {
                continue;
            };
            private_dir(to, DIR_MODE)?;
            for e in entries {
                let e = e?;
                let target = to.join(e.file_name());
                if !target.exists() {
                    std::fs::rename(e.path(), &target)?;
                    tracing::info!(file = %target.display(), "spooled file moved from an earlier cache directory");
                }
            }
            fsync_dir(to)?;
        }
        Ok(())
    }

    /// Sets a ready file aside for good: the archive refused it and always will.
    pub fn reject(&self, name: &ArchiveName) -> io::Result<()> {
        std::fs::rename(self.ready_path(name), self.rejected.join(name.as_str()))?;
        fsync_dir(&self.rejected)?;
        fsync_dir(&self.ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_directory_is_made_under_the_working_directory() {
        // `--cache-dir cache` where ./cache does not exist yet (its parent is "", the cwd).
        let top = format!("walfs-private-dir-test-{}", std::process::id());
        let dir = Path::new(&top).join("a");
        let made = private_dir(&dir, 0o700);
        let is_dir = dir.is_dir();
        let _ = std::fs::remove_dir_all(&top);
        made.unwrap();
        assert!(is_dir);
    }

    #[test]
    fn files_move_through_the_states_and_readers_see_them() {
        let t = tempfile::tempdir().unwrap();
        let s = Spool::open(&t.path().join("spool")).unwrap();
        let reader = Spool::at(s.dir());
        assert!(reader.newest_partial().unwrap().is_none());
        let seg = "000000010000000000000003";
        let (f, spare) = s.open_current(seg, 4096).unwrap();
        assert!(!spare);
        f.write_all_at(b"wal", 0).unwrap();
        let (newest, path) = reader.newest_partial().unwrap().unwrap();
        assert_eq!(newest.as_str(), seg);
        let mut want = b"wal".to_vec();
        want.resize(4096, 0);
        assert_eq!(std::fs::read(path).unwrap(), want);
        s.finish(&f, seg, seg).unwrap();
        let name = ArchiveName::parse(seg).unwrap();
        assert_eq!(reader.ready().unwrap(), vec![name.clone()]);
        assert!(reader.open_ready(&name).unwrap().is_some());
        assert!(reader.newest_partial().unwrap().is_none());
        let h = ArchiveName::parse("00000002.history").unwrap();
        s.put_ready(&h, b"1\t0/3000000\tx\n").unwrap();
        s.reject(&h).unwrap();
        assert_eq!(s.rejected().unwrap(), vec![h.clone()]);
        assert_eq!(s.ready().unwrap(), vec![name.clone()]);
        s.remove_ready(&name).unwrap();
        assert!(reader.open_ready(&name).unwrap().is_none());
        // The next segment takes the spare, which is zeros and not a segment of its own.
        s.make_spare(4096).unwrap();
        assert!(reader.partials().unwrap().is_empty());
        let next = "000000010000000000000004";
        let (f, spare) = s.open_current(next, 4096).unwrap();
        assert!(spare);
        assert_eq!(f.metadata().unwrap().len(), 4096);
        assert_eq!(std::fs::read(s.current_path(next)).unwrap(), vec![0; 4096]);
        // A spare of another size (the server's segment size changed) is not taken.
        s.make_spare(8192).unwrap();
        let (_, spare) = s.open_current("000000010000000000000005", 4096).unwrap();
        assert!(!spare);
        // A spool that cannot be read is an error, not an empty spool.
        std::fs::remove_dir_all(t.path().join("spool/ready")).unwrap();
        std::fs::write(t.path().join("spool/ready"), b"not a directory").unwrap();
        assert!(reader.ready().is_err());
    }
}
