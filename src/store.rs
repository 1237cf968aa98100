//! The archive on an `object_store` backend: key layout, the archive's identity, durable
//! put-if-absent, verified get, paged listing.
//!
//! Layout under the archive URL's prefix:
//!
//! ```text
//! walfs.json          the archive identity (system identifier, wal_segment_size), made once
//! wal/<name>          one envelope per archived file, under its PostgreSQL name
//! ```

use crate::envelope::{self, Header, Key, OpenError, SealOptions, HEADER_LEN};
use crate::telemetry;
use crate::wal::{self, ArchiveName, FileKind, SegmentSize};
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

const IDENTITY_OBJECT: &str = "walfs.json";
const WAL_DIR: &str = "wal";

/// Where the archive lives and how to reach it.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// `file:///dir`, a plain absolute path, `s3://bucket/prefix`, `gs://…`, `az://…`.
    pub url: String,
    /// How long transient backend errors are retried before an operation fails.
    pub retry_timeout: Duration,
    /// Create a local archive directory when it does not exist (writers do; readers do not).
    pub create: bool,
}

/// The cluster an archive belongs to, recorded by the first segment pushed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub format: u32,
    /// As a string: JSON numbers lose precision past 2^53.
    pub system_identifier: String,
    pub wal_segment_size: u64,
    /// The id of the key objects are sealed with (None: not encrypted). Pushes with another
    /// key, or none, are refused, so a misconfigured host cannot mix keys or leak plaintext.
    #[serde(default)]
    pub key_id: Option<String>,
    pub created_by: String,
}

impl Identity {
    pub fn segment_size(&self) -> Result<SegmentSize, Error> {
        SegmentSize::new(self.wal_segment_size)
            .map_err(|e| Error::Config(format!("archive identity ({IDENTITY_OBJECT}): {e}")))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Settings that cannot work: bad URL, unknown scheme, missing directory.
    #[error("{0}")]
    Config(String),
    /// The file is not one this archive may hold (other cluster, wrong size, not WAL).
    #[error("{name}: refused: {why}")]
    Refused { name: String, why: String },
    /// A different file is already archived under this name.
    #[error(
        "{name}: a different file is already archived under this name \
         (archived sha256 {stored}, offered sha256 {offered}); the archived copy is kept"
    )]
    Conflict {
        name: String,
        stored: String,
        offered: String,
    },
    /// The stored object cannot be opened: damaged, or sealed with another key.
    #[error("{name}: {source}")]
    Unreadable { name: String, source: OpenError },
    /// The backend failed (after retries): unreachable, missing bucket, permissions, I/O.
    #[error("{op}: {source}")]
    Backend {
        op: String,
        source: object_store::Error,
    },
    /// Writing the opened file failed locally (full disk, I/O error): nothing is wrong with
    /// the archived object.
    #[error("{name}: writing the restored file: {why}")]
    Output { name: String, why: String },
    /// A write was answered "not found": the bucket or container does not exist.
    #[error("{op}: the bucket or container of {url} does not exist")]
    MissingContainer { op: String, url: String },
    /// There is no walfs archive at the URL at all.
    #[error(
        "no walfs archive at {0} (no {IDENTITY_OBJECT}): wrong --archive, or a missing bucket, \
         container or prefix?"
    )]
    NoArchive(String),
}

impl Error {
    /// The kind, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) | Error::MissingContainer { .. } | Error::NoArchive(_) => "config",
            Error::Refused { .. } => "refused",
            Error::Conflict { .. } => "conflict",
            Error::Unreadable { .. } => "damaged",
            Error::Backend { .. } => "backend",
            Error::Output { .. } => "local",
        }
    }

    fn backend(op: impl Into<String>, source: object_store::Error) -> Error {
        Error::Backend {
            op: op.into(),
            source,
        }
    }
}

impl Archive {
    /// A failed write: "not found" there can only mean the bucket or container is missing.
    fn write_error(&self, op: String, source: object_store::Error) -> Error {
        match source {
            object_store::Error::NotFound { .. } => Error::MissingContainer {
                op,
                url: self.url.clone(),
            },
            source => Error::backend(op, source),
        }
    }
}

/// A failed listing. "Not found" means the bucket or container is missing: object stores say
/// so with a status (S3) or only in the error body (Azure's `ContainerNotFound`).
fn list_error(url: &str, e: object_store::Error) -> Error {
    let missing = match &e {
        object_store::Error::NotFound { .. } => true,
        other => {
            let text = other.to_string();
            text.contains("ContainerNotFound") || text.contains("NoSuchBucket")
        }
    };
    if missing {
        Error::MissingContainer {
            op: "listing the archive".into(),
            url: url.to_string(),
        }
    } else {
        Error::backend(format!("listing {url}"), e)
    }
}

/// Counts an archive operation (or its failure, by kind) in the metrics.
fn record<T>(op: &'static str, began: Instant, plain: u64, r: &Result<T, Error>) {
    match r {
        Ok(_) => telemetry::archive_op(op, began.elapsed().as_secs_f64(), plain),
        Err(e) => telemetry::archive_error(op, e.kind()),
    }
}

/// What a push did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    /// Newly stored; `stored_bytes` is the object's size.
    Stored { stored_bytes: u64 },
    /// The same content was already archived (and still opens); nothing was uploaded.
    AlreadyArchived,
}

/// One archived file as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: ArchiveName,
    pub stored_bytes: u64,
    /// Seconds since the Unix epoch.
    pub last_modified: i64,
}

pub struct Archive {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    url: String,
    key: Option<Key>,
    seal: SealOptions,
    identity: OnceCell<Identity>,
}

impl Archive {
    /// Connects to the archive at `cfg.url`. Nothing is sent to the backend yet.
    pub fn open(cfg: &StoreConfig, key: Option<Key>, seal: SealOptions) -> Result<Archive, Error> {
        let (store, prefix) = backend::build(cfg)?;
        Ok(Archive::with_store(store, prefix, &cfg.url, key, seal))
    }

    /// An archive on an already-built store (tests use `InMemory`).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        url: &str,
        key: Option<Key>,
        seal: SealOptions,
    ) -> Archive {
        Archive {
            store,
            prefix,
            url: url.to_string(),
            key,
            seal,
            identity: OnceCell::new(),
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key_id(&self) -> Option<String> {
        self.key.as_ref().map(|k| k.id().to_string())
    }

    fn object_path(&self, name: &ArchiveName) -> Path {
        self.prefix.clone().join(WAL_DIR).join(name.as_str())
    }

    fn identity_path(&self) -> Path {
        self.prefix.clone().join(IDENTITY_OBJECT)
    }

    /// The archive's identity, or None when nothing was pushed yet (or the URL is wrong).
    pub async fn identity(&self) -> Result<Option<Identity>, Error> {
        if let Some(id) = self.identity.get() {
            return Ok(Some(id.clone()));
        }
        let path = self.identity_path();
        match self.store.get(&path).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| Error::backend(format!("reading {path}"), e))?;
                let id: Identity = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Config(format!("{path} is not a walfs identity: {e}")))?;
                id.segment_size()?;
                let _ = self.identity.set(id.clone());
                Ok(Some(id))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::backend(format!("reading {path}"), e)),
        }
    }

    /// The identity, or [`Error::NoArchive`].
    pub async fn require_identity(&self) -> Result<Identity, Error> {
        self.identity()
            .await?
            .ok_or_else(|| Error::NoArchive(self.url.clone()))
    }

    /// Records `id` unless an identity exists; returns the one that holds.
    async fn establish_identity(&self, id: Identity) -> Result<Identity, Error> {
        if let Some(existing) = self.identity().await? {
            return Ok(existing);
        }
        let path = self.identity_path();
        let body = serde_json::to_vec_pretty(&id).map_err(|e| Error::Config(e.to_string()))?;
        match self
            .store
            .put_opts(&path, PutPayload::from(body), PutMode::Create.into())
            .await
        {
            Ok(_) => {
                tracing::info!(archive = %self.url, system_identifier = %id.system_identifier,
                    wal_segment_size = id.wal_segment_size, "archive identity recorded");
                let _ = self.identity.set(id.clone());
                Ok(id)
            }
            // Another writer won the race: theirs holds.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => self.require_identity().await,
            Err(e) => Err(self.write_error(format!("writing {path}"), e)),
        }
    }

    /// Checks a segment or `.partial` file against PostgreSQL's page header and the archive's
    /// identity, recording the identity on the first segment.
    async fn check_wal_content(&self, name: &ArchiveName, data: &[u8]) -> Result<(), Error> {
        let refuse = |why: String| Error::Refused {
            name: name.to_string(),
            why,
        };
        let header = wal::parse_long_header(data).map_err(|e| refuse(e.to_string()))?;
        let size = header.segment_size;
        let len = data.len() as u64;
        match name.kind() {
            FileKind::Segment if len != size.bytes() => {
                return Err(refuse(format!(
                    "{len} bytes, but its page header says wal_segment_size is {}",
                    size.bytes()
                )))
            }
            FileKind::Partial if len > size.bytes() => {
                return Err(refuse(format!("{len} bytes, larger than a segment")))
            }
            _ => {}
        }
        let seg = name
            .segment(size)
            .map_err(|e| refuse(e.to_string()))?
            .ok_or_else(|| refuse("not a segment".into()))?;
        let expected = size.start_lsn(seg.segno);
        if header.page_addr != expected {
            return Err(refuse(format!(
                "its first page is at LSN {}, but {} starts at {}: the file was renamed or is \
                 not this segment",
                header.page_addr, name, expected
            )));
        }
        let offered = Identity {
            format: 1,
            system_identifier: header.system_identifier.to_string(),
            wal_segment_size: size.bytes(),
            key_id: self.key_id(),
            created_by: format!("walfs {}", env!("CARGO_PKG_VERSION")),
        };
        let holds = self.establish_identity(offered.clone()).await?;
        if holds.system_identifier != offered.system_identifier {
            return Err(refuse(format!(
                "it belongs to the cluster with system identifier {}, this archive holds cluster {}",
                offered.system_identifier, holds.system_identifier
            )));
        }
        if holds.wal_segment_size != offered.wal_segment_size {
            return Err(refuse(format!(
                "its wal_segment_size is {}, this archive's is {}",
                offered.wal_segment_size, holds.wal_segment_size
            )));
        }
        Ok(())
    }

    /// Archives `data` under `name`. Returns only once the backend confirmed a durable write,
    /// or the identical content is already archived and still opens.
    pub async fn push(&self, name: &ArchiveName, data: Bytes) -> Result<PushOutcome, Error> {
        let began = Instant::now();
        let plain = data.len() as u64;
        let r = self.push_inner(name, data).await;
        if let Ok(PushOutcome::Stored { stored_bytes }) = &r {
            telemetry::archive_stored("push", *stored_bytes);
        }
        record("push", began, plain, &r);
        r
    }

    async fn push_inner(&self, name: &ArchiveName, data: Bytes) -> Result<PushOutcome, Error> {
        if matches!(name.kind(), FileKind::Segment | FileKind::Partial) {
            self.check_wal_content(name, &data).await?;
        }
        if let Some(id) = self.identity().await? {
            if id.key_id != self.key_id() {
                let show = |k: &Option<String>| k.clone().unwrap_or_else(|| "none".into());
                return Err(Error::Refused {
                    name: name.to_string(),
                    why: format!(
                        "this archive is sealed with key id {}, the configured key is {}; \
                         check --key-file",
                        show(&id.key_id),
                        show(&self.key_id())
                    ),
                });
            }
        }
        let path = self.object_path(name);
        // Fast path for PostgreSQL's re-archive after a crash: no upload when it is there.
        if self.head(&path).await?.is_some() {
            return self.confirm_identical(name, &data).await;
        }
        let key = self.key.clone();
        let opts = self.seal;
        let (n, d) = (name.as_str().to_string(), data.clone());
        let sealed =
            tokio::task::spawn_blocking(move || envelope::seal(&n, &d, key.as_ref(), opts))
                .await
                .map_err(|e| Error::Config(format!("sealing task failed: {e}")))?;
        let stored_bytes = sealed.len() as u64;
        let put = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(&path, PutPayload::from(sealed), put)
            .await
        {
            Ok(_) => Ok(PushOutcome::Stored { stored_bytes }),
            // Two writers raced: the conditional put let exactly one win.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                self.confirm_identical(name, &data).await
            }
            Err(e) => Err(Error::backend(
                format!("uploading {name} to {}", self.url),
                e,
            )),
        }
    }

    /// Something is stored under `name`: succeed only if it opens and holds `data`.
    async fn confirm_identical(
        &self,
        name: &ArchiveName,
        data: &[u8],
    ) -> Result<PushOutcome, Error> {
        let offered = envelope::digest(data);
        let stored = self.fetch(name).await?.ok_or_else(|| Error::Refused {
            name: name.to_string(),
            why: "the archived copy vanished while being compared; try again".into(),
        })?;
        let stored_digest = envelope::digest(&stored);
        if stored_digest == offered {
            Ok(PushOutcome::AlreadyArchived)
        } else {
            Err(Error::Conflict {
                name: name.to_string(),
                stored: hex::encode(stored_digest),
                offered: hex::encode(offered),
            })
        }
    }

    async fn head(&self, path: &Path) -> Result<Option<object_store::ObjectMeta>, Error> {
        match self.store.head(path).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::backend(format!("looking up {path}"), e)),
        }
    }

    /// The stored object of `name`, or None when it is not archived. A missing identity
    /// turns "absent" into [`Error::NoArchive`]: a wrong URL must not look like the end of the
    /// archive to PostgreSQL.
    async fn get_object(&self, name: &ArchiveName) -> Result<Option<Bytes>, Error> {
        let path = self.object_path(name);
        match self.store.get(&path).await {
            Ok(r) => {
                let bytes = r
                    .bytes()
                    .await
                    .map_err(|e| Error::backend(format!("downloading {name}"), e))?;
                telemetry::archive_stored("fetch", bytes.len() as u64);
                Ok(Some(bytes))
            }
            Err(object_store::Error::NotFound { .. }) => {
                self.require_identity().await?;
                Ok(None)
            }
            Err(e) => Err(Error::backend(format!("downloading {name}"), e)),
        }
    }

    fn unreadable(name: &ArchiveName, source: OpenError) -> Error {
        match source {
            OpenError::Output(why) => Error::Output {
                name: name.to_string(),
                why,
            },
            source => Error::Unreadable {
                name: name.to_string(),
                source,
            },
        }
    }

    /// The plaintext of `name`, fully authenticated, or None when it is not archived.
    pub async fn fetch(&self, name: &ArchiveName) -> Result<Option<Vec<u8>>, Error> {
        let began = Instant::now();
        let r = self.fetch_inner(name).await;
        let plain = r
            .as_ref()
            .ok()
            .and_then(|d| d.as_ref())
            .map_or(0, |d| d.len() as u64);
        record("fetch", began, plain, &r);
        r
    }

    async fn fetch_inner(&self, name: &ArchiveName) -> Result<Option<Vec<u8>>, Error> {
        let Some(bytes) = self.get_object(name).await? else {
            return Ok(None);
        };
        let key = self.key.clone();
        let n = name.as_str().to_string();
        let opened = tokio::task::spawn_blocking(move || envelope::open(&n, &bytes, key.as_ref()))
            .await
            .map_err(|e| Error::Config(format!("opening task failed: {e}")))?;
        opened.map(Some).map_err(|e| Self::unreadable(name, e))
    }

    /// Writes the plaintext of `name` into `file` (from offset 0) and returns its length, or
    /// None when it is not archived. Memory stays at the stored object plus a chunk per core.
    /// The file's content means nothing unless this returns Ok.
    pub async fn fetch_into(
        &self,
        name: &ArchiveName,
        file: std::fs::File,
    ) -> Result<Option<u64>, Error> {
        let began = Instant::now();
        let r = self.fetch_into_inner(name, file).await;
        record(
            "fetch",
            began,
            r.as_ref().ok().copied().flatten().unwrap_or(0),
            &r,
        );
        r
    }

    async fn fetch_into_inner(
        &self,
        name: &ArchiveName,
        file: std::fs::File,
    ) -> Result<Option<u64>, Error> {
        let Some(bytes) = self.get_object(name).await? else {
            return Ok(None);
        };
        let key = self.key.clone();
        let n = name.as_str().to_string();
        let opened = tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            envelope::open_into(&n, &bytes, key.as_ref(), &|at, data| {
                file.write_all_at(data, at)
            })
        })
        .await
        .map_err(|e| Error::Config(format!("opening task failed: {e}")))?;
        opened.map(Some).map_err(|e| Self::unreadable(name, e))
    }

    /// The object's header (one small ranged read), or None when absent. The header is only
    /// authenticated when the object is opened; use it for sizes, not for trust.
    pub async fn header(&self, name: &ArchiveName) -> Result<Option<Header>, Error> {
        let path = self.object_path(name);
        match self.store.get_range(&path, 0..HEADER_LEN as u64).await {
            Ok(b) => Header::parse(&b)
                .map(Some)
                .map_err(|source| Error::Unreadable {
                    name: name.to_string(),
                    source,
                }),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::backend(format!("reading the header of {name}"), e)),
        }
    }

    /// Stores a snapshot of a segment still being received under its `.partial` name,
    /// replacing an older snapshot (the one kind of object that changes: it only grows).
    pub async fn put_partial(&self, name: &ArchiveName, data: Bytes) -> Result<(), Error> {
        if name.kind() != FileKind::Partial {
            return Err(Error::Refused {
                name: name.to_string(),
                why: "only .partial files are replaced".into(),
            });
        }
        self.check_wal_content(name, &data).await?;
        let key = self.key.clone();
        let opts = self.seal;
        let (n, d) = (name.as_str().to_string(), data);
        let sealed =
            tokio::task::spawn_blocking(move || envelope::seal(&n, &d, key.as_ref(), opts))
                .await
                .map_err(|e| Error::Config(format!("sealing task failed: {e}")))?;
        let path = self.object_path(name);
        self.store
            .put_opts(&path, PutPayload::from(sealed), PutMode::Overwrite.into())
            .await
            .map(|_| ())
            .map_err(|e| self.write_error(format!("uploading {name} to {}", self.url), e))
    }

    /// Deletes a `.partial` snapshot made obsolete by its complete segment.
    pub async fn delete_partial(&self, name: &ArchiveName) -> Result<bool, Error> {
        if name.kind() != FileKind::Partial {
            return Ok(false);
        }
        self.delete(name).await
    }

    /// Checks the backend answers (one listing page): a missing bucket or container, bad
    /// credentials or an unreachable endpoint fail here rather than on first use.
    pub async fn probe(&self) -> Result<(), Error> {
        let dir = self.prefix.clone().join(WAL_DIR);
        let mut first = self.store.list(Some(&dir));
        match first.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(list_error(&self.url, e)),
        }
    }

    /// Deletes `name` from the archive; false when it was not there.
    pub async fn delete(&self, name: &ArchiveName) -> Result<bool, Error> {
        let path = self.object_path(name);
        if self.head(&path).await?.is_none() {
            return Ok(false);
        }
        match self.store.delete(&path).await {
            Ok(()) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(Error::backend(format!("deleting {name}"), e)),
        }
    }

    /// Deletes `names` (the backend batches them where it can: S3 deletes up to 1000 per
    /// request); names already gone count as deleted. Returns how many were deleted. Stops at
    /// the first other error: what was deleted before it stays deleted.
    pub async fn delete_many(&self, names: &[ArchiveName]) -> Result<u64, Error> {
        let paths: Vec<Path> = names.iter().map(|n| self.object_path(n)).collect();
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed());
        let mut done = 0u64;
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => done += 1,
                Err(e) => return Err(Error::backend("deleting from the archive", e)),
            }
        }
        Ok(done)
    }

    /// Every archived file, page by page from the backend (memory stays flat whatever the
    /// archive's size). `after` resumes a listing past a name. The order is the backend's:
    /// object stores list in name order, a local directory in directory order.
    pub fn list(&self, after: Option<&ArchiveName>) -> BoxStream<'static, Result<Entry, Error>> {
        let dir = self.prefix.clone().join(WAL_DIR);
        let raw = match after {
            Some(a) => self
                .store
                .list_with_offset(Some(&dir), &self.object_path(a)),
            None => self.store.list(Some(&dir)),
        };
        let url = self.url.clone();
        raw.map_err(move |e| list_error(&url, e))
            .try_filter_map(|meta| async move {
                let Some(file) = meta.location.filename() else {
                    return Ok(None);
                };
                // Staging files of in-flight writes and foreign objects are not archive files.
                let Ok(name) = ArchiveName::parse(file) else {
                    return Ok(None);
                };
                Ok(Some(Entry {
                    name,
                    stored_bytes: meta.size,
                    last_modified: meta.last_modified.timestamp(),
                }))
            })
            .boxed()
    }
}

/// Building an `ObjectStore` from a URL, each cloud behind its cargo feature.
mod backend {
    use super::{Error, StoreConfig};
    use object_store::local::LocalFileSystem;
    use object_store::path::Path;
    use object_store::ObjectStore;
    use std::sync::Arc;

    pub(super) fn build(cfg: &StoreConfig) -> Result<(Arc<dyn ObjectStore>, Path), Error> {
        let raw = cfg.url.trim();
        if raw.starts_with('/') {
            return local(std::path::Path::new(raw), cfg.create);
        }
        let url = url::Url::parse(raw).map_err(|e| {
            Error::Config(format!(
                "archive URL {raw:?} does not parse ({e}); use file:///path, s3://bucket/prefix, \
                 gs://bucket/prefix or az://container/prefix"
            ))
        })?;
        let prefix = || {
            Path::parse(url.path().trim_matches('/'))
                .map_err(|e| Error::Config(format!("archive URL {raw}: bad prefix: {e}")))
        };
        match url.scheme() {
            "file" => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| Error::Config(format!("{raw} is not a local path")))?;
                local(&dir, cfg.create)
            }
            "s3" | "s3a" => Ok((s3(&url, cfg)?, prefix()?)),
            "gs" => Ok((gcs(&url, cfg)?, prefix()?)),
            "az" | "azure" | "abfs" => Ok((azure(&url, cfg)?, prefix()?)),
            other => Err(Error::Config(format!(
                "unsupported archive URL scheme {other:?} in {raw}; use file://, s3://, gs:// or az://"
            ))),
        }
    }

    fn local(dir: &std::path::Path, create: bool) -> Result<(Arc<dyn ObjectStore>, Path), Error> {
        if create {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Config(format!(
                    "cannot create the archive directory {}: {e}",
                    dir.display()
                ))
            })?;
        } else if !dir.is_dir() {
            return Err(Error::NoArchive(format!("file://{}", dir.display())));
        }
        // fsync file and directories on every write: a push is durable when it returns.
        let fs = LocalFileSystem::new_with_prefix(dir)
            .map_err(|e| Error::Config(format!("archive directory {}: {e}", dir.display())))?
            .with_fsync(true);
        Ok((Arc::new(fs), Path::default()))
    }

    #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
    fn retry(cfg: &StoreConfig) -> object_store::RetryConfig {
        object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: std::time::Duration::from_millis(100),
                max_backoff: std::time::Duration::from_secs(5),
                base: 2.0,
            },
            // The time budget is the bound; the count only has to be large enough not to be.
            max_retries: 1000,
            retry_timeout: cfg.retry_timeout,
        }
    }

    /// Per-request timeouts, set as config keys so the client settings the environment gives
    /// (proxies, `*_ALLOW_HTTP`, certificates) are kept.
    #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
    fn client_timeouts(cfg: &StoreConfig) -> [(object_store::ClientConfigKey, String); 2] {
        let attempt = cfg.retry_timeout.clamp(
            std::time::Duration::from_secs(5),
            std::time::Duration::from_secs(60),
        );
        [
            (
                object_store::ClientConfigKey::ConnectTimeout,
                "5s".to_string(),
            ),
            (
                object_store::ClientConfigKey::Timeout,
                format!("{}ms", attempt.as_millis()),
            ),
        ]
    }

    #[cfg(not(all(feature = "s3", feature = "gcs", feature = "azure")))]
    fn disabled(scheme: &str, feature: &str) -> Error {
        Error::Config(format!(
            "this walfs was built without {scheme}:// support (cargo feature {feature:?})"
        ))
    }

    #[cfg(feature = "s3")]
    fn s3(url: &url::Url, cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        use object_store::aws::AmazonS3Builder;
        use object_store::aws::AmazonS3ConfigKey;
        let mut b = AmazonS3Builder::from_env()
            .with_url(url.as_str())
            .with_retry(retry(cfg));
        for (k, v) in client_timeouts(cfg) {
            b = b.with_config(AmazonS3ConfigKey::Client(k), v);
        }
        // An S3-compatible server on plain http (a local test server, a LAN appliance).
        let endpoint = std::env::var("AWS_ENDPOINT_URL")
            .or_else(|_| std::env::var("AWS_ENDPOINT"))
            .unwrap_or_default();
        if endpoint.starts_with("http://") {
            b = b.with_allow_http(true);
        }
        let s = b
            .build()
            .map_err(|e| Error::Config(format!("S3 archive {url}: {e}")))?;
        Ok(Arc::new(s))
    }
    #[cfg(not(feature = "s3"))]
    fn s3(_: &url::Url, _: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        Err(disabled("s3", "s3"))
    }

    #[cfg(feature = "gcs")]
    fn gcs(url: &url::Url, cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
        let mut b = GoogleCloudStorageBuilder::from_env()
            .with_url(url.as_str())
            .with_retry(retry(cfg));
        for (k, v) in client_timeouts(cfg) {
            b = b.with_config(GoogleConfigKey::Client(k), v);
        }
        // A GCS-compatible server on plain http (a local emulator).
        if std::env::var("GOOGLE_BASE_URL").is_ok_and(|u| u.starts_with("http://")) {
            b = b.with_config(
                GoogleConfigKey::Client(object_store::ClientConfigKey::AllowHttp),
                "true",
            );
        }
        let s = b
            .build()
            .map_err(|e| Error::Config(format!("GCS archive {url}: {e}")))?;
        Ok(Arc::new(s))
    }
    #[cfg(not(feature = "gcs"))]
    fn gcs(_: &url::Url, _: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        Err(disabled("gs", "gcs"))
    }

    #[cfg(feature = "azure")]
    fn azure(url: &url::Url, cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
        let mut b = MicrosoftAzureBuilder::from_env()
            .with_url(url.as_str())
            .with_retry(retry(cfg));
        for (k, v) in client_timeouts(cfg) {
            b = b.with_config(AzureConfigKey::Client(k), v);
        }
        let s = b
            .build()
            .map_err(|e| Error::Config(format!("Azure archive {url}: {e}")))?;
        Ok(Arc::new(s))
    }
    #[cfg(not(feature = "azure"))]
    fn azure(_: &url::Url, _: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
        Err(disabled("az", "azure"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    const SYSID: u64 = 7_300_000_000_000_000_001;

    /// A segment-shaped buffer: a long page header for `name` and some content.
    fn segment(name: &str, sysid: u64, size: u64) -> Bytes {
        let seg = SegmentSize::new(size).unwrap();
        let id = wal::SegmentId::parse(&name[..24], seg).unwrap();
        let mut b = vec![0u8; size as usize];
        b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        b[2..4].copy_from_slice(&2u16.to_le_bytes());
        b[4..8].copy_from_slice(&id.timeline.to_le_bytes());
        b[8..16].copy_from_slice(&seg.start_lsn(id.segno).0.to_le_bytes());
        b[24..32].copy_from_slice(&sysid.to_le_bytes());
        b[32..36].copy_from_slice(&(size as u32).to_le_bytes());
        b[36..40].copy_from_slice(&8192u32.to_le_bytes());
        for (i, x) in b[64..4096].iter_mut().enumerate() {
            *x = (i % 7) as u8;
        }
        Bytes::from(b)
    }

    fn archive() -> Archive {
        Archive::with_store(
            Arc::new(InMemory::new()),
            Path::from("pfx"),
            "memory:///",
            Some(Key::from_bytes([1; 32])),
            SealOptions::default(),
        )
    }

    fn n(s: &str) -> ArchiveName {
        ArchiveName::parse(s).unwrap()
    }

    #[tokio::test]
    async fn push_fetch_and_identity() {
        let a = archive();
        assert!(matches!(
            a.fetch(&n("000000010000000000000001")).await,
            Err(Error::NoArchive(_))
        ));
        let s = segment("000000010000000000000001", SYSID, 1 << 20);
        assert!(matches!(
            a.push(&n("000000010000000000000001"), s.clone())
                .await
                .unwrap(),
            PushOutcome::Stored { .. }
        ));
        let id = a.identity().await.unwrap().unwrap();
        assert_eq!(id.system_identifier, SYSID.to_string());
        assert_eq!(id.wal_segment_size, 1 << 20);
        assert_eq!(
            a.fetch(&n("000000010000000000000001"))
                .await
                .unwrap()
                .unwrap(),
            s
        );
        assert_eq!(a.fetch(&n("000000010000000000000002")).await.unwrap(), None);
        let h = a
            .header(&n("000000010000000000000001"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(h.plaintext_len, 1 << 20);
    }

    #[tokio::test]
    async fn identical_repush_succeeds_and_different_content_is_refused() {
        let a = archive();
        let name = n("000000010000000000000001");
        let s = segment(name.as_str(), SYSID, 1 << 20);
        a.push(&name, s.clone()).await.unwrap();
        assert_eq!(
            a.push(&name, s.clone()).await.unwrap(),
            PushOutcome::AlreadyArchived
        );
        let mut other = s.to_vec();
        other[5000] ^= 1;
        match a.push(&name, Bytes::from(other)).await {
            Err(Error::Conflict {
                stored, offered, ..
            }) => {
                assert_eq!(stored, hex::encode(envelope::digest(&s)));
                assert_ne!(stored, offered);
            }
            r => panic!("expected a conflict, got {r:?}"),
        }
        assert_eq!(
            a.fetch(&name).await.unwrap().unwrap(),
            s,
            "archived copy changed"
        );
    }

    #[tokio::test]
    async fn racing_writers_one_wins() {
        let a = Arc::new(archive());
        let name = n("000000010000000000000001");
        let s1 = segment(name.as_str(), SYSID, 1 << 20);
        let mut v = s1.to_vec();
        v[9000] = 42;
        let s2 = Bytes::from(v);
        let (r1, r2) = tokio::join!(a.push(&name, s1.clone()), a.push(&name, s2.clone()));
        assert!(r1.is_ok() != r2.is_ok(), "{r1:?} {r2:?}");
        let stored = a.fetch(&name).await.unwrap().unwrap();
        assert_eq!(stored, if r1.is_ok() { s1 } else { s2 });
    }

    #[tokio::test]
    async fn foreign_and_malformed_segments_are_refused() {
        let a = archive();
        a.push(
            &n("000000010000000000000001"),
            segment("000000010000000000000001", SYSID, 1 << 20),
        )
        .await
        .unwrap();
        let cases = [
            (
                "000000010000000000000002",
                segment("000000010000000000000002", SYSID + 1, 1 << 20),
                "system identifier",
            ),
            (
                "000000010000000000000002",
                segment("000000010000000000000002", SYSID, 2 << 20),
                "wal_segment_size",
            ),
            (
                "000000010000000000000003",
                segment("000000010000000000000002", SYSID, 1 << 20),
                "renamed",
            ),
            (
                "000000010000000000000002",
                Bytes::from(vec![0u8; 1 << 20]),
                "magic",
            ),
            (
                "000000010000000000000002",
                segment("000000010000000000000002", SYSID, 1 << 20).slice(..1000),
                "bytes",
            ),
        ];
        for (name, data, why) in cases {
            match a.push(&n(name), data).await {
                Err(Error::Refused { why: w, .. }) => assert!(w.contains(why), "{w}"),
                r => panic!("{why}: expected a refusal, got {r:?}"),
            }
            assert_eq!(a.fetch(&n(name)).await.unwrap(), None);
        }
    }

    #[tokio::test]
    async fn history_files_and_listing() {
        let a = archive();
        a.push(
            &n("000000010000000000000001"),
            segment("000000010000000000000001", SYSID, 1 << 20),
        )
        .await
        .unwrap();
        let hist = Bytes::from_static(b"1\t0/3000000\tno recovery target specified\n");
        a.push(&n("00000002.history"), hist.clone()).await.unwrap();
        assert_eq!(
            a.fetch(&n("00000002.history")).await.unwrap().unwrap(),
            hist
        );
        let names: Vec<String> = a
            .list(None)
            .map_ok(|e| e.name.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(names, ["000000010000000000000001", "00000002.history"]);
        let after: Vec<String> = a
            .list(Some(&n("000000010000000000000001")))
            .map_ok(|e| e.name.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(after, ["00000002.history"]);
    }

    #[tokio::test]
    async fn damaged_objects_are_errors_not_data() {
        let store = Arc::new(InMemory::new());
        let a = Archive::with_store(
            store.clone(),
            Path::from("pfx"),
            "memory:///",
            None,
            SealOptions::default(),
        );
        let name = n("000000010000000000000001");
        a.push(&name, segment(name.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        let path = Path::from("pfx/wal/000000010000000000000001");
        let mut obj = store
            .get(&path)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap()
            .to_vec();
        let last = obj.len() - 1;
        obj[last] ^= 1;
        store.put(&path, PutPayload::from(obj)).await.unwrap();
        assert!(matches!(
            a.fetch(&name).await,
            Err(Error::Unreadable { .. })
        ));
        // Re-archiving the same segment over a damaged copy is not a success.
        assert!(a
            .push(&name, segment(name.as_str(), SYSID, 1 << 20))
            .await
            .is_err());
    }
}
