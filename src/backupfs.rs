//! The mount's read-only `backups/` directory, free of FUSE: every complete base backup as a
//! directory of plain tar files, so stock tools restore it (`tar -x -f
//! MOUNT/backups/<name>/base.tar`), as the WAL beside it is restored with `cp`.
//!
//! ```text
//! MOUNT/backups/                       listed only when the archive holds a backup
//! MOUNT/backups/<name>/                a backup whose record opens and whose objects are all there
//! MOUNT/backups/<name>/base.tar        the data directory (chunks base.tar.000000, … joined)
//! MOUNT/backups/<name>/<oid>.tar       one per tablespace
//! MOUNT/backups/<name>/backup_manifest PostgreSQL's manifest, for `pg_verifybackup`
//! ```
//!
//! - Only a backup with an authenticated record (`backup.json`, written last) is shown; a
//!   backup that did not complete is never there.
//! - A tar's size is its record's byte count, and an offset maps to one chunk through the
//!   record's chunk size: a read fetches and authenticates that chunk whole (every chunk is
//!   sealed, so a swapped, cut or damaged chunk never yields bytes: the read fails with EIO),
//!   checks its length against the record, and starts fetching the next one, since tar and cp
//!   read front to back. An open tar holds at most two chunks in memory (32 MiB by default).
//! - Nothing here is a restore_command read: a failure is EIO at once (the store layer has
//!   already retried), never a wait, never ENOENT for a file the record lists.
//! - Inodes are stable for the mount's lifetime and never collide with the WAL side's (which
//!   counts up from a small number, or is a hash with bit 62 set): this side's have bit 61.

use crate::backup::{self, ArchiveRecord, BackupRecord, MANIFEST};
use crate::fs::{Attr, FsError};
use crate::store::{Archive, Class};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The `backups` directory.
pub const DIR_INO: u64 = 2;
/// Its name in the mount's root.
pub const DIR_NAME: &str = "backups";
const INO_BASE: u64 = 1 << 61;
/// Backups never change once complete; they may be deleted by retention.
const TTL: Duration = Duration::from_secs(60);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Backup(String),
    File { backup: String, file: String },
}

#[derive(Default)]
struct Nodes {
    by_key: HashMap<Key, u64>,
    by_ino: HashMap<u64, Key>,
    /// Authenticated records of the backups looked up (complete, immutable).
    records: HashMap<String, Arc<BackupRecord>>,
    /// Manifests read for their size (small; read once).
    manifests: HashMap<String, Arc<Vec<u8>>>,
}

impl Nodes {
    fn ino(&mut self, key: Key) -> u64 {
        if let Some(&i) = self.by_key.get(&key) {
            return i;
        }
        let ino = INO_BASE + self.by_ino.len() as u64 + 1;
        self.by_key.insert(key.clone(), ino);
        self.by_ino.insert(ino, key);
        ino
    }
}

/// An open file of the view.
pub enum Reader {
    Tar(TarReader),
    Manifest(Arc<Vec<u8>>),
}

impl Reader {
    /// `size` bytes from `offset` (fewer only at the end of the file).
    pub async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        match self {
            Reader::Tar(t) => t.read(offset, size).await,
            Reader::Manifest(m) => {
                let start = (offset as usize).min(m.len());
                let end = start.saturating_add(size as usize).min(m.len());
                Ok(m[start..end].to_vec())
            }
        }
    }
}

type Chunk = Arc<Vec<u8>>;
type Fetch = tokio::task::JoinHandle<Result<Chunk, FsError>>;

/// One tar of a backup, read chunk by chunk (see the module documentation).
pub struct TarReader {
    archive: Arc<Archive>,
    backup: String,
    tar: ArchiveRecord,
    chunk_size: u64,
    chunks: tokio::sync::Mutex<Chunks>,
}

/// What an open tar holds: the chunk last read, and the fetch of the one after it.
#[derive(Default)]
struct Chunks {
    have: Option<(u32, Chunk)>,
    next: Option<(u32, Fetch)>,
}

impl TarReader {
    fn fetch(&self, i: u32) -> Fetch {
        let (archive, backup) = (self.archive.clone(), self.backup.clone());
        let file = self.tar.chunk_file(i);
        let want = self.tar.chunk_len(i, self.chunk_size);
        tokio::spawn(async move {
            match archive.get_backup_file(&backup, &file, want).await {
                Ok(Some(b)) if Some(b.len() as u64) == want => Ok(Arc::new(b)),
                Ok(Some(b)) => {
                    tracing::error!(backup, file, bytes = b.len(), expected = ?want,
                        "a backup chunk holds other than its record's length: not served");
                    Err(FsError::Io)
                }
                Ok(None) => {
                    tracing::error!(backup, file, "a chunk the backup's record lists is missing");
                    Err(FsError::Io)
                }
                Err(e) => {
                    if e.class() == Class::Damaged {
                        tracing::error!(backup, file, error = %e, "a backup chunk does not open: not served");
                    } else {
                        tracing::warn!(backup, file, error = %e, "reading a backup chunk failed");
                    }
                    Err(FsError::Io)
                }
            }
        })
    }

    async fn chunk(&self, i: u32) -> Result<Chunk, FsError> {
        let mut g = self.chunks.lock().await;
        let Chunks { have, next } = &mut *g;
        if let Some((n, c)) = have {
            if *n == i {
                return Ok(c.clone());
            }
        }
        let fetch = match next.take() {
            Some((n, f)) if n == i => f,
            Some((_, f)) => {
                f.abort();
                self.fetch(i)
            }
            None => self.fetch(i),
        };
        let c = fetch.await.map_err(|_| FsError::Io)??;
        *have = Some((i, c.clone()));
        if i + 1 < self.tar.chunks {
            *next = Some((i + 1, self.fetch(i + 1)));
        }
        Ok(c)
    }

    async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, FsError> {
        let end = offset.saturating_add(u64::from(size)).min(self.tar.bytes);
        let mut out = Vec::with_capacity(end.saturating_sub(offset) as usize);
        let mut pos = offset;
        while pos < end {
            let i = (pos / self.chunk_size) as u32;
            let c = self.chunk(i).await?;
            let from = (pos - u64::from(i) * self.chunk_size) as usize;
            let to = (end - u64::from(i) * self.chunk_size).min(c.len() as u64) as usize;
            if from >= to {
                return Err(FsError::Io);
            }
            out.extend_from_slice(&c[from..to]);
            pos += (to - from) as u64;
        }
        Ok(out)
    }
}

impl Drop for TarReader {
    fn drop(&mut self) {
        if let Ok(mut g) = self.chunks.try_lock() {
            if let Some((_, f)) = g.next.take() {
                f.abort();
            }
        }
    }
}

/// The view: see the module documentation.
pub struct BackupFs {
    archive: Arc<Archive>,
    nodes: Mutex<Nodes>,
}

impl BackupFs {
    pub fn new(archive: Arc<Archive>) -> BackupFs {
        BackupFs {
            archive,
            nodes: Mutex::new(Nodes::default()),
        }
    }

    fn nodes(&self) -> MutexGuard<'_, Nodes> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `ino` is the view's (the directory or anything in it).
    pub fn owns(ino: u64) -> bool {
        ino == DIR_INO || (ino & INO_BASE != 0 && ino & (1 << 62) == 0)
    }

    pub fn dir_attr() -> Attr {
        Attr {
            ino: DIR_INO,
            size: 0,
            dir: true,
            ttl: TTL,
        }
    }

    /// Whether the root listing shows `backups`: when the archive holds any backup.
    pub async fn any(&self) -> Result<bool, FsError> {
        self.archive.any_backup().await.map_err(|e| {
            tracing::warn!(error = %e, "listing the archive's backups failed");
            FsError::Io
        })
    }

    /// The authenticated record of a complete backup; None when it has none.
    async fn record(&self, name: &str) -> Result<Option<Arc<BackupRecord>>, FsError> {
        if let Some(r) = self.nodes().records.get(name) {
            return Ok(Some(r.clone()));
        }
        if !crate::store::backups::valid_name(name) {
            return Ok(None);
        }
        match backup::read_record(&self.archive, name).await {
            Ok(Some(r)) => {
                let r = Arc::new(r);
                self.nodes().records.insert(name.to_string(), r.clone());
                Ok(Some(r))
            }
            Ok(None) => Ok(None),
            Err(e) => {
                tracing::warn!(backup = name, error = %e, "reading a backup's record failed");
                Err(FsError::Io)
            }
        }
    }

    async fn manifest(&self, backup: &str) -> Result<Arc<Vec<u8>>, FsError> {
        if let Some(m) = self.nodes().manifests.get(backup) {
            return Ok(m.clone());
        }
        match self.archive.get_backup_file(backup, MANIFEST, None).await {
            Ok(Some(m)) => {
                let m = Arc::new(m);
                self.nodes().manifests.insert(backup.to_string(), m.clone());
                Ok(m)
            }
            Ok(None) => {
                tracing::error!(backup, "the manifest its record lists is missing");
                Err(FsError::Io)
            }
            Err(e) => {
                tracing::warn!(backup, error = %e, "reading a backup's manifest failed");
                Err(FsError::Io)
            }
        }
    }

    fn key(&self, ino: u64) -> Result<Key, FsError> {
        self.nodes()
            .by_ino
            .get(&ino)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    /// The tar `file` of `record`, when it has one the view can serve.
    fn tar<'a>(record: &'a BackupRecord, file: &str) -> Option<&'a ArchiveRecord> {
        // Records written before the chunk size was kept cannot map an offset to a chunk.
        (record.chunk_size > 0)
            .then(|| record.archives.iter().find(|a| a.name == file))
            .flatten()
    }

    async fn file_attr(&self, ino: u64, backup: &str, file: &str) -> Result<Attr, FsError> {
        let record = self.record(backup).await?.ok_or(FsError::NotFound)?;
        let size = if file == MANIFEST {
            self.manifest(backup).await?.len() as u64
        } else {
            Self::tar(&record, file).ok_or(FsError::NotFound)?.bytes
        };
        Ok(Attr {
            ino,
            size,
            dir: false,
            ttl: TTL,
        })
    }

    pub async fn lookup(&self, parent: u64, name: &str) -> Result<Attr, FsError> {
        if parent == DIR_INO {
            self.record(name).await?.ok_or(FsError::NotFound)?;
            let ino = self.nodes().ino(Key::Backup(name.to_string()));
            return Ok(Attr {
                ino,
                size: 0,
                dir: true,
                ttl: TTL,
            });
        }
        let Key::Backup(backup) = self.key(parent)? else {
            return Err(FsError::NotDir);
        };
        let key = Key::File {
            backup: backup.clone(),
            file: name.to_string(),
        };
        let ino = self.nodes().by_key.get(&key).copied();
        let ino = match ino {
            Some(i) => i,
            None => {
                // Check before remembering: only names the record lists get an inode.
                self.file_attr(0, &backup, name).await?;
                self.nodes().ino(key)
            }
        };
        self.file_attr(ino, &backup, name).await
    }

    pub async fn getattr(&self, ino: u64) -> Result<Attr, FsError> {
        if ino == DIR_INO {
            return Ok(Self::dir_attr());
        }
        match self.key(ino)? {
            Key::Backup(_) => Ok(Attr {
                ino,
                size: 0,
                dir: true,
                ttl: TTL,
            }),
            Key::File { backup, file } => self.file_attr(ino, &backup, &file).await,
        }
    }

    pub async fn open(&self, ino: u64) -> Result<Reader, FsError> {
        let Key::File { backup, file } = self.key(ino)? else {
            return Err(FsError::NotPermitted);
        };
        if file == MANIFEST {
            return Ok(Reader::Manifest(self.manifest(&backup).await?));
        }
        let record = self.record(&backup).await?.ok_or(FsError::NotFound)?;
        let tar = Self::tar(&record, &file).ok_or(FsError::NotFound)?.clone();
        Ok(Reader::Tar(TarReader {
            archive: self.archive.clone(),
            backup,
            tar,
            chunk_size: record.chunk_size,
            chunks: tokio::sync::Mutex::default(),
        }))
    }

    /// The entries of directory `ino` (the view's), as (inode, is a directory, name).
    pub async fn entries(&self, ino: u64) -> Result<Vec<(u64, bool, String)>, FsError> {
        if ino == DIR_INO {
            let listed = backup::list_records(&self.archive).await.map_err(|e| {
                tracing::warn!(error = %e, "listing the archive's backups failed");
                FsError::Io
            })?;
            let mut nodes = self.nodes();
            let mut out = Vec::new();
            for l in listed {
                // Complete, undamaged, every object present: usable, so shown.
                if let Some(r) = l.record {
                    nodes.records.insert(l.name.clone(), Arc::new(r));
                    let ino = nodes.ino(Key::Backup(l.name.clone()));
                    out.push((ino, true, l.name));
                }
            }
            return Ok(out);
        }
        let Key::Backup(backup) = self.key(ino)? else {
            return Err(FsError::NotDir);
        };
        let record = self.record(&backup).await?.ok_or(FsError::NotFound)?;
        let mut nodes = self.nodes();
        let mut out = Vec::new();
        let files = record
            .archives
            .iter()
            .filter(|a| Self::tar(&record, &a.name).is_some())
            .map(|a| a.name.clone())
            .chain(std::iter::once(MANIFEST.to_string()));
        for file in files {
            let ino = nodes.ino(Key::File {
                backup: backup.clone(),
                file: file.clone(),
            });
            out.push((ino, false, file));
        }
        Ok(out)
    }

    /// The parent of one of the view's directories, for "..".
    pub fn parent(ino: u64) -> u64 {
        if ino == DIR_INO {
            crate::fs::ROOT
        } else {
            DIR_INO
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::RECORD;
    use crate::envelope::{Key, Keyring, SealOptions};
    use crate::wal::Lsn;
    use bytes::Bytes;
    use object_store::memory::InMemory;
    use object_store::path::Path as StorePath;
    use object_store::{ObjectStoreExt, PutPayload};

    const CHUNK: u64 = 1000;

    fn tar_bytes() -> Vec<u8> {
        (0..2500u32).map(|i| (i % 251) as u8).collect()
    }

    fn record(name: &str) -> BackupRecord {
        BackupRecord {
            format: 1,
            name: name.into(),
            label: name.into(),
            system_identifier: "1".into(),
            pg_version: 150000,
            wal_segment_size: 1 << 20,
            start_lsn: Lsn(1 << 20),
            start_timeline: 1,
            end_lsn: Lsn((1 << 20) + 4096),
            end_timeline: 1,
            started_at: "2026-11-29T00:00:00Z".into(),
            finished_at: "2026-11-29T00:00:01Z".into(),
            archives: vec![ArchiveRecord {
                name: "base.tar".into(),
                tablespace_path: None,
                bytes: 2500,
                chunks: 3,
            }],
            chunk_size: CHUNK,
            bytes: 2500,
            stored_bytes: 0,
            files: 1,
            wal_ranges: Vec::new(),
        }
    }

    /// An archive with a complete backup `b1` (base.tar in three chunks) and an incomplete
    /// `b2` (chunks, no record).
    async fn rig() -> (Arc<InMemory>, Arc<Archive>) {
        let store = Arc::new(InMemory::new());
        let a = Arc::new(Archive::with_store(
            store.clone(),
            StorePath::from("pfx"),
            "memory:///",
            Some(Keyring::new(Key::from_bytes([1; 32]), Vec::new()).unwrap()),
            SealOptions::default(),
        ));
        there(&a).await;
        let data = tar_bytes();
        for b in ["b1", "b2"] {
            for (i, c) in data.chunks(CHUNK as usize).enumerate() {
                a.put_backup_file(b, &format!("base.tar.{i:06}"), Bytes::from(c.to_vec()))
                    .await
                    .unwrap();
            }
            a.put_backup_file(b, MANIFEST, Bytes::from_static(b"{\"manifest\": 1}\n"))
                .await
                .unwrap();
        }
        let body = serde_json::to_vec(&record("b1")).unwrap();
        a.put_backup_file("b1", RECORD, Bytes::from(body))
            .await
            .unwrap();
        (store, a)
    }

    /// Absence is only said of an archive that is there: give it a segment.
    async fn there(a: &Archive) {
        let first = crate::wal::ArchiveName::parse("000000010000000000000001").unwrap();
        a.push(
            &first,
            crate::store::test_segment(first.as_str(), 7, 1 << 20),
        )
        .await
        .unwrap();
    }

    async fn read_all(r: &Reader, step: u32) -> Result<Vec<u8>, FsError> {
        let mut out = Vec::new();
        loop {
            let got = r.read(out.len() as u64, step).await?;
            if got.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&got);
        }
    }

    #[tokio::test]
    async fn complete_backups_read_as_plain_tars() {
        let (_store, a) = rig().await;
        let fs = BackupFs::new(a);
        assert!(fs.any().await.unwrap());
        // Only the complete backup is listed, or found.
        let listed = fs.entries(DIR_INO).await.unwrap();
        assert_eq!(
            listed.iter().map(|e| e.2.as_str()).collect::<Vec<_>>(),
            ["b1"]
        );
        assert_eq!(
            fs.lookup(DIR_INO, "b2").await.unwrap_err(),
            FsError::NotFound
        );
        assert_eq!(
            fs.lookup(DIR_INO, "../b1").await.unwrap_err(),
            FsError::NotFound
        );
        let dir = fs.lookup(DIR_INO, "b1").await.unwrap();
        assert!(dir.dir && dir.ino == listed[0].0 && BackupFs::owns(dir.ino));
        let files = fs.entries(dir.ino).await.unwrap();
        assert_eq!(
            files.iter().map(|e| e.2.as_str()).collect::<Vec<_>>(),
            ["base.tar", MANIFEST]
        );
        assert_eq!(
            fs.lookup(dir.ino, "backup.json").await.unwrap_err(),
            FsError::NotFound
        );
        let tar = fs.lookup(dir.ino, "base.tar").await.unwrap();
        assert_eq!((tar.size, tar.dir, tar.ino), (2500, false, files[0].0));
        assert_eq!(fs.getattr(tar.ino).await.unwrap().size, 2500);
        let r = fs.open(tar.ino).await.unwrap();
        // Reads of any size and offset, across chunk boundaries, and short only at the end.
        for step in [1, 7, 999, 1000, 1001, 4096] {
            assert_eq!(
                read_all(&r, step).await.unwrap(),
                tar_bytes(),
                "step {step}"
            );
        }
        assert_eq!(r.read(900, 300).await.unwrap(), tar_bytes()[900..1200]);
        assert_eq!(r.read(2400, 300).await.unwrap(), tar_bytes()[2400..]);
        assert!(r.read(5000, 10).await.unwrap().is_empty());
        let m = fs.lookup(dir.ino, MANIFEST).await.unwrap();
        let mr = fs.open(m.ino).await.unwrap();
        assert_eq!(read_all(&mr, 5).await.unwrap(), b"{\"manifest\": 1}\n");
        assert_eq!(m.size, 16);
    }

    #[tokio::test]
    async fn damaged_swapped_or_missing_chunks_are_never_served() {
        let (store, a) = rig().await;
        let chunk = |b: &str, i: u32| StorePath::from(format!("pfx/backups/{b}/base.tar.{i:06}"));
        let fs = BackupFs::new(a.clone());
        let dir = fs.lookup(DIR_INO, "b1").await.unwrap();
        let tar = fs.lookup(dir.ino, "base.tar").await.unwrap();

        // A flipped byte in chunk 1.
        let good = store
            .get(&chunk("b1", 1))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let mut bad = good.to_vec();
        let at = bad.len() - 20;
        bad[at] ^= 1;
        store
            .put(&chunk("b1", 1), PutPayload::from(bad))
            .await
            .unwrap();
        let r = fs.open(tar.ino).await.unwrap();
        assert_eq!(r.read(0, 1000).await.unwrap(), tar_bytes()[..1000]);
        assert_eq!(r.read(1000, 10).await.unwrap_err(), FsError::Io);
        assert_eq!(r.read(990, 20).await.unwrap_err(), FsError::Io);

        // Another backup's chunk 1 (same bytes, other name) is not this one's.
        let theirs = store
            .get(&chunk("b2", 1))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        store
            .put(&chunk("b1", 1), PutPayload::from(theirs))
            .await
            .unwrap();
        let r = fs.open(tar.ino).await.unwrap();
        assert_eq!(r.read(1000, 10).await.unwrap_err(), FsError::Io);

        // Chunk 2 sealed under its right name with the wrong length.
        store.delete(&chunk("b1", 2)).await.unwrap();
        a.put_backup_file("b1", "base.tar.000002", Bytes::from(vec![0u8; 400]))
            .await
            .unwrap();
        store
            .put(&chunk("b1", 1), PutPayload::from(good))
            .await
            .unwrap();
        let r = fs.open(tar.ino).await.unwrap();
        assert_eq!(r.read(1000, 1000).await.unwrap(), tar_bytes()[1000..2000]);
        assert_eq!(r.read(2000, 10).await.unwrap_err(), FsError::Io);

        // Missing: EIO, never a short file. And a backup with a missing chunk is not listed.
        store.delete(&chunk("b1", 2)).await.unwrap();
        let r = fs.open(tar.ino).await.unwrap();
        assert_eq!(r.read(2000, 10).await.unwrap_err(), FsError::Io);
        assert!(fs.entries(DIR_INO).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_archive_without_backups_lists_no_directory() {
        let store = Arc::new(InMemory::new());
        let a = Arc::new(Archive::with_store(
            store,
            StorePath::from("pfx"),
            "memory:///",
            None,
            SealOptions::default(),
        ));
        there(&a).await;
        let fs = BackupFs::new(a);
        assert!(!fs.any().await.unwrap());
        assert!(fs.entries(DIR_INO).await.unwrap().is_empty());
        assert_eq!(
            fs.lookup(DIR_INO, "b1").await.unwrap_err(),
            FsError::NotFound
        );
    }
}
