//! `walfs restore`: a backup back into a data directory, set to recover from the archive.
//!
//! 1. The backup: the one named, else the newest complete one that ends before the target
//!    (the newest of all without one), whose WAL is all in the archive.
//! 2. The data directory and each tablespace's directory (the server's path, or where
//!    `--tablespace-map` moves it) must be absent or empty.
//! 3. Each tar archive streams out of the store chunk by chunk, every chunk authenticated
//!    before a byte of it is written, tablespaces first and `base.tar` last: `global/pg_control`
//!    is its last member, so a restore that fails part-way leaves a directory PostgreSQL
//!    refuses to start, never one that looks whole. The chunk count and byte count must be
//!    the record's.
//! 4. `recovery.signal` and, in `postgresql.auto.conf`, the restore_command, the target, and
//!    `archive_mode = off` (a copy must not archive into its source's archive unless asked:
//!    its new timeline's history file would take a name the source may need), written last;
//!    then everything is synced to disk.

use super::{list, BackupError, BackupRecord};
use crate::store::Archive;
use crate::wal::Lsn;
use bytes::Bytes;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where recovery stops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// recovery_target_time, as PostgreSQL reads it; the backup must have ended before it.
    Time(String),
    Lsn(Lsn),
    /// recovery_target_name: a restore point.
    Name(String),
    /// recovery_target_timeline: `latest`, `current` or a number.
    Timeline(String),
}

pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub backup: Option<String>,
    pub target: Option<Target>,
    /// `OLDDIR=NEWDIR`: restore the tablespace at OLDDIR into NEWDIR.
    pub tablespace_map: Vec<(String, PathBuf)>,
    pub restore_command: String,
    pub keep_archiving: bool,
}

fn refused(what: impl Into<String>) -> BackupError {
    BackupError::Refused(what.into())
}

/// The backup to restore for `opts`.
async fn choose(archive: &Archive, opts: &RestoreOptions) -> Result<BackupRecord, BackupError> {
    let listed = list(archive).await?;
    if let Some(name) = &opts.backup {
        let l = listed
            .into_iter()
            .find(|l| &l.name == name)
            .ok_or_else(|| refused(format!("no backup {name} in {}", archive.url())))?;
        if let Some(why) = &l.damaged {
            return Err(refused(format!("backup {name} is damaged: {why}")));
        }
        let missing = l.missing_wal.first().cloned();
        let r = l.record.ok_or_else(|| {
            refused(format!(
                "backup {name} is incomplete (interrupted): it cannot be restored"
            ))
        })?;
        if let Some(m) = missing {
            return Err(BackupError::WalMissing(format!(
                "backup {name} needs {m}, which is not in the archive"
            )));
        }
        return Ok(r);
    }
    let before_time = match &opts.target {
        Some(Target::Time(t)) => Some(parse_time(t)?),
        _ => None,
    };
    let mut candidates: Vec<_> = listed
        .into_iter()
        .filter(|l| l.missing_wal.is_empty())
        .filter_map(|l| l.record)
        .filter(|r| match &opts.target {
            Some(Target::Lsn(lsn)) => r.end_lsn <= *lsn,
            Some(Target::Time(_)) => parse_time(&r.finished_at)
                .map(|t| before_time.is_some_and(|b| t <= b))
                .unwrap_or(false),
            _ => true,
        })
        .collect();
    candidates.sort_by_key(|r| (r.end_timeline, r.end_lsn));
    candidates.pop().ok_or_else(|| {
        refused(format!(
            "no complete backup with its WAL in {}{}: `walfs backup list` shows what there is; \
             take one with `walfs backup`{}",
            archive.url(),
            match &opts.target {
                Some(Target::Lsn(l)) => format!(" that ends before {l}"),
                Some(Target::Time(t)) => format!(" that finished before {t}"),
                _ => String::new(),
            },
            match &opts.target {
                Some(Target::Lsn(_)) => ", or give a later --target-lsn",
                Some(Target::Time(_)) => ", or give a later --target-time",
                _ => "",
            }
        ))
    })
}

/// A time as `--target-time` and the records give it: RFC 3339, or `YYYY-MM-DD HH:MM:SS`
/// with an optional `+00`/`Z` (UTC).
fn parse_time(s: &str) -> Result<std::time::SystemTime, BackupError> {
    let t = s.trim();
    let t = t
        .strip_suffix("+00:00")
        .or_else(|| t.strip_suffix("+00"))
        .or_else(|| t.strip_suffix(" UTC"))
        .unwrap_or(t);
    humantime::parse_rfc3339_weak(t.trim_end_matches('Z')).map_err(|e| {
        refused(format!(
            "--target-time {s:?}: {e} (give UTC, as 2026-11-29 10:00:00)"
        ))
    })
}

/// An empty directory to restore into (created 0700 when absent).
fn empty_dir(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| refused(format!("{}: {e}", dir.display()));
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(refused(format!(
                    "{} is not empty: walfs restore writes only into an empty or new directory",
                    dir.display()
                )));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        Err(e) => return Err(io(e)),
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)
}

/// Reads a tar archive's chunks in order as they arrive from the store.
struct ChunkReader {
    rx: std::sync::mpsc::Receiver<Result<Bytes, String>>,
    cur: Bytes,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(Ok(b)) => self.cur = b,
                Ok(Err(e)) => return Err(std::io::Error::other(e)),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}

/// Streams one archive of `record` out of the store and unpacks it into `dest`.
async fn unpack(
    archive: &Arc<Archive>,
    record: &BackupRecord,
    which: &super::ArchiveRecord,
    dest: &Path,
) -> Result<(), BackupError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Bytes, String>>(2);
    // Whether the store's objects were at fault (damaged or missing), not this host.
    let damaged = Arc::new(std::sync::Mutex::new(false));
    let dest_owned = dest.to_path_buf();
    let unpacker = tokio::task::spawn_blocking(move || -> std::io::Result<u64> {
        let mut reader = ChunkReader {
            rx,
            cur: Bytes::new(),
        };
        let mut counted = CountingReader {
            inner: &mut reader,
            n: 0,
        };
        unpack_tar(&mut counted, &dest_owned)?;
        // Whatever follows the end of the tar is read too: every chunk is checked.
        std::io::copy(&mut counted, &mut std::io::sink())?;
        Ok(counted.n)
    });
    let chunk_size = record.chunk_size;
    let fetch = {
        let damaged = damaged.clone();
        let archive = archive.clone();
        let name = record.name.clone();
        let which = which.clone();
        async move {
            for i in 0..which.chunks {
                let file = which.chunk_file(i);
                let size = which.chunk_len(i, chunk_size);
                let r = match archive.get_backup_file(&name, &file, size).await {
                    Ok(Some(b)) => Ok(Bytes::from(b)),
                    Ok(None) => {
                        *damaged.lock().unwrap_or_else(|p| p.into_inner()) = true;
                        Err(format!(
                            "{name}/{file} is missing: chunk {} of {}",
                            i + 1,
                            which.chunks
                        ))
                    }
                    Err(e) => {
                        if e.class() == crate::store::Class::Damaged {
                            *damaged.lock().unwrap_or_else(|p| p.into_inner()) = true;
                        }
                        Err(e.to_string())
                    }
                };
                let failed = r.is_err();
                let sent = {
                    let tx = tx.clone();
                    tokio::task::spawn_blocking(move || tx.send(r).is_ok())
                        .await
                        .unwrap_or(false)
                };
                if failed || !sent {
                    return;
                }
            }
        }
    };
    // The sender goes with the fetch: the reader then sees the end.
    fetch.await;
    let n = unpacker
        .await
        .map_err(|e| refused(format!("unpacking {}: {e}", which.name)))?
        .map_err(|e| {
            let why = format!(
                "restoring {} of backup {} into {}: {e}; the directory is incomplete and \
                 PostgreSQL will not start from it: empty it before trying again",
                which.name,
                record.name,
                dest.display()
            );
            if *damaged.lock().unwrap_or_else(|p| p.into_inner()) {
                BackupError::Damaged(why)
            } else {
                refused(why)
            }
        })?;
    if n != which.bytes {
        return Err(BackupError::Damaged(format!(
            "{} of backup {} holds {n} bytes, its record says {}: the directory is incomplete",
            which.name, record.name, which.bytes
        )));
    }
    Ok(())
}

/// Where a member of a backup's tar goes under `dest`: relative, plain components only.
fn member_path(dest: &Path, member: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let mut out = dest.to_path_buf();
    let mut any = false;
    for c in member.components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                any = true;
            }
            Component::CurDir => {}
            _ => {
                return Err(std::io::Error::other(format!(
                    "tar member {} leaves the directory",
                    member.display()
                )))
            }
        }
    }
    if !any {
        return Err(std::io::Error::other("a tar member without a name"));
    }
    Ok(out)
}

/// Unpacks a backup's tar into the empty directory `dest`: directories, regular files and
/// symbolic links (what BASE_BACKUP sends; anything else is refused), with their modes and
/// times. Files are created new (never through something already there) and written in
/// 1 MiB pieces: small writes make the filesystem zero each new page again and again. A
/// member below a link this restore created is refused, so no member reaches outside `dest`.
fn unpack_tar(reader: &mut impl Read, dest: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    let mut tar = tar::Archive::new(reader);
    let mut dirs: Vec<(PathBuf, u32, u64)> = Vec::new();
    let mut links: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    for entry in tar.entries()? {
        let mut entry = entry?;
        let member = entry.path()?.into_owned();
        let path = member_path(dest, &member)?;
        if path.ancestors().skip(1).any(|a| links.contains(a)) {
            return Err(std::io::Error::other(format!(
                "tar member {} lies below a link",
                member.display()
            )));
        }
        let header = entry.header();
        let mode = header.mode()? & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        match header.entry_type() {
            tar::EntryType::Directory => {
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&path)?;
                dirs.push((path, mode, mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = path.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)?;
                }
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode & 0o777)
                    .open(&path)?;
                let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
                std::io::copy(&mut entry, &mut out)?;
                let file = out.into_inner().map_err(|e| e.into_error())?;
                file.set_permissions(std::fs::Permissions::from_mode(mode))?;
                file.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name()?.ok_or_else(|| {
                    std::io::Error::other(format!("link {} has no target", member.display()))
                })?;
                if let Some(parent) = path.parent() {
                    std::fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(parent)?;
                }
                std::os::unix::fs::symlink(&target, &path)?;
                links.insert(path);
            }
            t => {
                return Err(std::io::Error::other(format!(
                    "tar member {} is a {t:?}, which a base backup does not hold",
                    member.display()
                )))
            }
        }
    }
    // Directories' modes and times last: files written into them changed both.
    for (path, mode, mtime) in dirs.into_iter().rev() {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        std::fs::File::open(&path)?
            .set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(mtime))?;
    }
    Ok(())
}

struct CountingReader<'a, R: Read> {
    inner: &'a mut R,
    n: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

/// A postgresql.conf string: backslashes and quotes escaped.
fn conf_quote(s: &str) -> Result<String, BackupError> {
    if s.contains(['\n', '\r', '\0']) {
        return Err(refused(format!(
            "{s:?}: a setting cannot hold a line break"
        )));
    }
    Ok(format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''")))
}

/// Restores per `opts`; returns the backup restored.
pub async fn restore(
    archive: Arc<Archive>,
    opts: &RestoreOptions,
) -> Result<BackupRecord, BackupError> {
    let record = choose(&archive, opts).await?;
    // Every destination first: nothing is written unless all are usable.
    let mut plan: Vec<(&super::ArchiveRecord, PathBuf)> = Vec::new();
    for a in &record.archives {
        let dest = match &a.tablespace_path {
            None => opts.pgdata.clone(),
            Some(p) => opts
                .tablespace_map
                .iter()
                .find(|(old, _)| old == p)
                .map(|(_, new)| new.clone())
                .unwrap_or_else(|| PathBuf::from(p)),
        };
        plan.push((a, dest));
    }
    for (old, _) in &opts.tablespace_map {
        if !record
            .archives
            .iter()
            .any(|a| a.tablespace_path.as_deref() == Some(old.as_str()))
        {
            return Err(refused(format!(
                "--tablespace-map {old}=…: backup {} has no tablespace at {old}",
                record.name
            )));
        }
    }
    // The settings first: one that cannot be written stops the restore before it writes.
    let mut conf = String::from("\n# walfs restore of backup ");
    conf.push_str(&record.name);
    conf.push('\n');
    conf.push_str(&format!(
        "restore_command = {}\n",
        conf_quote(&opts.restore_command)?
    ));
    if !opts.keep_archiving {
        conf.push_str("archive_mode = off\n");
    }
    match &opts.target {
        // In UTC whatever the server's TimeZone: as the backup was chosen.
        Some(Target::Time(t)) => conf.push_str(&format!(
            "recovery_target_time = '{}'\n",
            humantime::format_rfc3339_seconds(parse_time(t)?)
                .to_string()
                .replace('T', " ")
                .replace('Z', "+00")
        )),
        Some(Target::Lsn(l)) => conf.push_str(&format!("recovery_target_lsn = '{l}'\n")),
        Some(Target::Name(n)) => {
            conf.push_str(&format!("recovery_target_name = {}\n", conf_quote(n)?))
        }
        Some(Target::Timeline(t)) => {
            conf.push_str(&format!("recovery_target_timeline = {}\n", conf_quote(t)?))
        }
        None => {}
    }
    if matches!(
        opts.target,
        Some(Target::Time(_) | Target::Lsn(_) | Target::Name(_))
    ) {
        conf.push_str("recovery_target_action = 'promote'\n");
    }
    for (_, dest) in &plan {
        empty_dir(dest)?;
    }
    // Tablespaces first, base.tar (and pg_control, its last member) last.
    plan.sort_by_key(|(a, _)| a.tablespace_path.is_none());
    for (a, dest) in &plan {
        tracing::info!(backup = %record.name, archive = %a.name, into = %dest.display(), "restoring");
        unpack(&archive, &record, a, dest).await?;
    }
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e: std::io::Error| refused(format!("{what}: {e}"))
    };
    // A moved tablespace: the server makes its pg_tblspc link from tablespace_map.
    let map_path = opts.pgdata.join("tablespace_map");
    if !opts.tablespace_map.is_empty() {
        let text = std::fs::read_to_string(&map_path).map_err(io(&map_path))?;
        let mut out = String::new();
        let mut moved_count = vec![0usize; opts.tablespace_map.len()];
        for line in text.lines() {
            // "<oid> <path>", the path with \ and newlines escaped by a backslash.
            let moved = line.split_once(' ').and_then(|(oid, path)| {
                let path = path.replace("\\\\", "\\");
                opts.tablespace_map
                    .iter()
                    .position(|(old, _)| *old == path)
                    .map(|i| {
                        moved_count[i] += 1;
                        let new = opts.tablespace_map[i].1.display().to_string();
                        format!("{oid} {}", new.replace('\\', "\\\\"))
                    })
            });
            out.push_str(&moved.unwrap_or_else(|| line.to_string()));
            out.push('\n');
        }
        if let Some(i) = moved_count.iter().position(|n| *n != 1) {
            return Err(refused(format!(
                "--tablespace-map {}=…: tablespace_map of backup {} names that directory {} \
                 times, not once; nothing is started from {}",
                opts.tablespace_map[i].0,
                record.name,
                moved_count[i],
                opts.pgdata.display()
            )));
        }
        std::fs::write(&map_path, out).map_err(io(&map_path))?;
    }
    let auto = opts.pgdata.join("postgresql.auto.conf");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&auto)
        .map_err(io(&auto))?;
    f.write_all(conf.as_bytes()).map_err(io(&auto))?;
    let signal = opts.pgdata.join("recovery.signal");
    std::fs::write(&signal, b"").map_err(io(&signal))?;
    // Owned as the data directory is (root restoring for postgres into a directory made
    // for it), and on disk before success is said.
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(&opts.pgdata).map_err(io(&opts.pgdata))?,
    );
    for (_, dest) in &plan {
        if unsafe { libc::geteuid() } == 0 {
            chown_tree(dest, owner).map_err(io(dest))?;
        }
        sync_fs(dest).map_err(io(dest))?;
    }
    Ok(record)
}

/// Gives every file under `dir` to `uid` (and its primary group), without following links.
fn chown_tree(dir: &Path, uid: u32) -> std::io::Result<()> {
    let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(dir)?);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        std::os::unix::fs::lchown(&d, Some(uid), Some(gid))?;
        if std::fs::symlink_metadata(&d)?.is_dir() {
            for e in std::fs::read_dir(&d)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
}

/// Everything written on the filesystem of `dir` reaches the disk.
fn sync_fs(dir: &Path) -> std::io::Result<()> {
    let f = std::fs::File::open(dir)?;
    // SAFETY: a valid descriptor for the duration of the call.
    if unsafe { libc::syncfs(std::os::unix::io::AsRawFd::as_raw_fd(&f)) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_of(entries: &[(&str, tar::EntryType, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(*kind);
            h.set_mode(if *kind == tar::EntryType::Directory {
                0o700
            } else {
                0o600
            });
            h.set_size(data.len() as u64);
            h.set_mtime(1_700_000_000);
            if *kind == tar::EntryType::Symlink {
                h.set_link_name("/etc").unwrap();
            }
            // Names that `append_data` would refuse are written raw, as a hostile tar would.
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn settings_are_quoted_as_postgresql_conf_reads_them() {
        assert_eq!(conf_quote("cp /a/%f %p").unwrap(), "'cp /a/%f %p'");
        assert_eq!(conf_quote("it's").unwrap(), "'it''s'");
        assert_eq!(conf_quote(r"c:\x").unwrap(), r"'c:\\x'");
        assert!(conf_quote("a\nrecovery_target_action = 'shutdown'").is_err());
    }

    #[test]
    fn unpacks_directories_and_files_and_refuses_escapes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 3 << 20];
        let t = tar_of(&[
            ("base", tar::EntryType::Directory, b""),
            ("base/1", tar::EntryType::Directory, b""),
            ("base/1/1259", tar::EntryType::Regular, &data),
            ("PG_VERSION", tar::EntryType::Regular, b"15\n"),
        ]);
        unpack_tar(&mut &t[..], dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join("base/1/1259")).unwrap(), data);
        assert_eq!(
            std::fs::read(dir.path().join("PG_VERSION")).unwrap(),
            b"15\n"
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("PG_VERSION"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A link is made as a link, never followed.
        let l = tempfile::tempdir().unwrap();
        let t = tar_of(&[("pg_wal", tar::EntryType::Symlink, b"")]);
        unpack_tar(&mut &t[..], l.path()).unwrap();
        assert_eq!(
            std::fs::read_link(l.path().join("pg_wal")).unwrap(),
            Path::new("/etc")
        );

        for bad in [
            tar_of(&[("../escape", tar::EntryType::Regular, b"x")]),
            tar_of(&[("/etc/escape", tar::EntryType::Regular, b"x")]),
            tar_of(&[("a/../../escape", tar::EntryType::Regular, b"x")]),
            tar_of(&[
                ("link", tar::EntryType::Symlink, b""),
                ("link/escape", tar::EntryType::Regular, b"x"),
            ]),
            tar_of(&[("hard", tar::EntryType::Link, b"")]),
            // A member over one already there is refused, never written through.
            tar_of(&[
                ("twice", tar::EntryType::Regular, b"x"),
                ("twice", tar::EntryType::Regular, b"y"),
            ]),
        ] {
            let d = tempfile::tempdir().unwrap();
            assert!(unpack_tar(&mut &bad[..], d.path()).is_err());
            assert!(!d.path().parent().unwrap().join("escape").exists());
        }
    }
}
