//! The local cache in front of the archive: verified plaintext files on disk, indexed by
//! `moka` and bounded in bytes, with single-flight loads; sizes of known names; and the
//! write spool for files being archived through the mount.
//!
//! Layout: `<cache-dir>/<archive id>/plain/` (plaintext, rebuilt every start) and
//! `<cache-dir>/<archive id>/writes/` (files being written, never acknowledged before upload).

use crate::store::{Archive, Entry, Error, PushOutcome};
use crate::wal::ArchiveName;
use bytes::Bytes;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A verified plaintext file in the cache. Readers keep it open: eviction only unlinks it.
#[derive(Debug)]
pub struct CachedFile {
    file: std::fs::File,
    len: u64,
}

impl CachedFile {
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
}

pub struct Cache {
    archive: Arc<Archive>,
    plain_dir: PathBuf,
    writes_dir: PathBuf,
    files: moka::future::Cache<ArchiveName, Arc<CachedFile>>,
    /// Plaintext sizes of names known to exist (from lookups, listings and writes).
    sizes: moka::sync::Cache<ArchiveName, u64>,
    serial: AtomicU64,
}

/// A directory name for an archive URL, so caches of different archives never mix.
fn archive_dir_name(url: &str) -> String {
    hex::encode(&Sha256::digest(url.as_bytes())[..8])
}

fn reset_dir(dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)
}

impl Cache {
    /// Opens the cache for `archive` under `opts.dir`. Leftovers of earlier runs are removed:
    /// the index lives in memory, and no write in `writes/` was ever acknowledged. Evicted
    /// files need no clean-up: they are unlinked when they land (see `land`), so dropping the
    /// last descriptor frees their blocks.
    pub fn new(archive: Arc<Archive>, opts: &CacheOptions) -> io::Result<Cache> {
        let base = opts.dir.join(archive_dir_name(archive.url()));
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
            archive,
            plain_dir,
            writes_dir,
            files,
            sizes,
            serial: AtomicU64::new(0),
        })
    }

    pub fn archive(&self) -> &Arc<Archive> {
        &self.archive
    }

    fn unique(&self, dir: &Path, name: &ArchiveName) -> PathBuf {
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        dir.join(format!("{name}.{n}"))
    }

    /// A new spool file for a write through the mount.
    pub fn new_spool_file(&self, name: &ArchiveName) -> io::Result<(std::fs::File, PathBuf)> {
        let path = self.unique(&self.writes_dir, name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, path))
    }

    /// Lands verified plaintext in the cache. The file is unlinked at once and kept only
    /// through its descriptor, so eviction, crashes and restarts never leave bytes behind
    /// that no index knows of.
    fn land(&self, name: &ArchiveName, data: &[u8]) -> io::Result<Arc<CachedFile>> {
        let path = self.unique(&self.plain_dir, name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let written = file.write_all_at(data, 0);
        let _ = std::fs::remove_file(&path);
        written?;
        Ok(Arc::new(CachedFile {
            file,
            len: data.len() as u64,
        }))
    }

    /// The verified plaintext of `name`: from the cache, or loaded once however many callers
    /// ask at the same time.
    pub async fn open(&self, name: &ArchiveName) -> Result<Arc<CachedFile>, Arc<LoadError>> {
        let load = async {
            // A young archive without an identity yet is empty, not misconfigured: the mount
            // checks the archive is reachable when it starts.
            let data = match self.archive.fetch(name).await {
                Ok(Some(d)) => d,
                Ok(None) | Err(Error::NoArchive(_)) => return Err(LoadError::Absent),
                Err(e) => return Err(e.into()),
            };
            let file = tokio::task::block_in_place(|| self.land(name, &data))?;
            self.sizes.insert(name.clone(), file.len());
            Ok::<_, LoadError>(file)
        };
        self.files.try_get_with(name.clone(), load).await
    }

    /// The plaintext size of `name`, or None when it is not archived. One small ranged read
    /// the first time; remembered after that (archived files never change).
    pub async fn size(&self, name: &ArchiveName) -> Result<Option<u64>, Error> {
        if let Some(s) = self.sizes.get(name) {
            return Ok(Some(s));
        }
        let size = self.archive.header(name).await?.map(|h| h.plaintext_len);
        if let Some(s) = size {
            self.sizes.insert(name.clone(), s);
        }
        Ok(size)
    }

    /// Archives `data` under `name` and, once durable, serves it from the cache at once.
    pub async fn push(&self, name: &ArchiveName, data: Bytes) -> Result<PushOutcome, Error> {
        let outcome = self.archive.push(name, data.clone()).await?;
        match tokio::task::block_in_place(|| self.land(name, &data)) {
            Ok(file) => {
                self.sizes.insert(name.clone(), file.len());
                self.files.insert(name.clone(), file).await;
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

    fn cache(dir: &Path, max_bytes: u64) -> Cache {
        let archive = Archive::with_store(
            Arc::new(InMemory::new()),
            StorePath::default(),
            "memory:///",
            None,
            SealOptions::default(),
        );
        Cache::new(
            Arc::new(archive),
            &CacheOptions {
                dir: dir.to_path_buf(),
                max_bytes,
            },
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn write_through_then_read_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let c = cache(dir.path(), 1 << 20);
        let name = ArchiveName::parse("00000002.history").unwrap();
        assert!(matches!(
            c.open(&name).await.unwrap_err().as_ref(),
            LoadError::Absent
        ));
        let body = Bytes::from_static(b"1\t0/3000000\tno recovery target specified\n");
        c.push(&name, body.clone()).await.unwrap();
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
        let h1 = ArchiveName::parse("00000002.history").unwrap();
        c.push(&h1, Bytes::from_static(b"x\n")).await.unwrap();
        let h3 = ArchiveName::parse("00000003.history").unwrap();
        assert!(matches!(
            c.open(&h3).await.unwrap_err().as_ref(),
            LoadError::Absent
        ));
        assert_eq!(c.size(&h3).await.unwrap(), None);
        c.archive()
            .push(&h3, Bytes::from_static(b"y\n"))
            .await
            .unwrap();
        assert_eq!(c.open(&h3).await.unwrap().read_at(0, 10).unwrap(), b"y\n");
    }
}
