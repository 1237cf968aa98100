//! The archive on an `object_store` backend: key layout, the archive's identity, durable
//! put-if-absent, verified get, paged listing.
//!
//! Layout under the archive URL's prefix:
//!
//! ```text
//! walfs.json          the archive identity (system identifier, wal_segment_size), made once
//! wal/<name>          one envelope per archived file, under its PostgreSQL name
//! ```

use crate::envelope::{
    self, Header, Key, Keyring, OpenError, Opener, Piece, Priority, SealOptions, HEADER_LEN,
};
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
    /// The archive's current key (None: not encrypted). Only hosts whose key file holds it
    /// may push, so a misconfigured host cannot mix in foreign keys or leak plaintext; `walfs
    /// key rotate` moves it to a new key.
    #[serde(default)]
    pub key_id: Option<String>,
    pub created_by: String,
    /// In an archive with a key: HMAC-SHA256 of the fields above, under a key derived from the
    /// current key, so walfs.json cannot be forged or swapped. (walfs before format 2 wrote
    /// none; the next push adds it.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl Identity {
    pub fn segment_size(&self) -> Result<SegmentSize, Error> {
        SegmentSize::new(self.wal_segment_size)
            .map_err(|e| Error::Config(format!("archive identity ({IDENTITY_OBJECT}): {e}")))
    }

    fn mac_for(&self, key: &Key) -> hmac::Hmac<sha2::Sha256> {
        use hmac::Mac;
        let mut m = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(
            &key.derive(None, b"walfs identity mac"),
        )
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for field in [
            self.format.to_string().as_str(),
            &self.system_identifier,
            &self.wal_segment_size.to_string(),
            self.key_id.as_deref().unwrap_or(""),
        ] {
            m.update(&(field.len() as u64).to_le_bytes());
            m.update(field.as_bytes());
        }
        m
    }

    /// Authenticates these fields under `key`.
    fn sign(mut self, key: &Key) -> Identity {
        use hmac::Mac;
        self.mac = Some(hex::encode(self.mac_for(key).finalize().into_bytes()));
        self
    }

    /// Whether the MAC is there and right for `key` (compared in constant time).
    fn verifies(&self, key: &Key) -> bool {
        use hmac::Mac;
        let Some(mac) = self.mac.as_deref().and_then(|m| hex::decode(m).ok()) else {
            return false;
        };
        self.mac_for(key).verify_slice(&mac).is_ok()
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
    #[error("{op}: {source}{}", credentials_hint(source))]
    Backend {
        op: String,
        source: object_store::Error,
    },
    /// A local file failed (full disk, I/O error) while reading what to archive or writing
    /// what was restored: nothing is wrong with the archive.
    #[error("{name}: {why}")]
    Output { name: String, why: String },
    /// A write was answered "not found": the bucket or container does not exist.
    #[error("{op}: the bucket or container of {url} does not exist")]
    MissingContainer { op: String, url: String },
    /// There is no walfs archive at the URL at all.
    #[error(
        "no walfs archive at {0} (no {IDENTITY_OBJECT}): a wrong archive URL, a missing \
         bucket, container or prefix, or nothing archived there yet"
    )]
    NoArchive(String),
    /// The archive's identity was read before and is gone now: a wiped or replaced prefix, or
    /// a store answering wrongly. Never taken for the absence of a file.
    #[error(
        "{IDENTITY_OBJECT} of {0} vanished after it was read: the archive was moved, wiped or \
         is answering wrongly; nothing is taken for absent until it is back"
    )]
    IdentityVanished(String),
    /// walfs.json fails authentication under the key: forged, swapped or damaged.
    #[error(
        "{IDENTITY_OBJECT} of {0} fails authentication under the configured key: it was not \
         written with this archive's key (forged, swapped or damaged); nothing is served from it"
    )]
    ForgedIdentity(String),
}

/// What to change when the store refused who we are, rather than failed.
fn credentials_hint(e: &object_store::Error) -> &'static str {
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            "; the store refused these credentials: check AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY (S3), GOOGLE_SERVICE_ACCOUNT (GCS) or AZURE_STORAGE_* (Azure) \
             in this process's environment (for a systemd unit: its /etc/walfs/*.env file), and \
             for a local archive the directory's owner and mode"
        }
        _ => "",
    }
}

/// The setting a failure is about (see [`Error::concerns`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Concern {
    /// The archive URL: another archive, bucket or prefix.
    Archive,
    /// The key file: another file, or one that holds the archive's key.
    KeyFile,
}

/// What a failure means to someone restoring WAL. None of these is "absent".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// The store (or a local disk) failed; it may work again: wait and retry.
    Unavailable,
    /// An object exists and is not data: damaged, cut, swapped, or sealed with another key.
    Damaged,
    /// The settings cannot work: wrong URL, missing bucket, no archive there.
    Misconfigured,
    /// A write was refused for its content (never a read failure).
    Refused,
}

impl Error {
    /// What this failure means to a reader.
    pub fn class(&self) -> Class {
        match self {
            Error::Backend { .. } | Error::Output { .. } | Error::IdentityVanished(_) => {
                Class::Unavailable
            }
            Error::Unreadable { .. } | Error::ForgedIdentity(_) => Class::Damaged,
            Error::Config(_) | Error::MissingContainer { .. } | Error::NoArchive(_) => {
                Class::Misconfigured
            }
            Error::Refused { .. } | Error::Conflict { .. } => Class::Refused,
        }
    }

    /// Which setting an operator would change to fix this, if one: the CLI names where that
    /// setting came from (flag, environment, config file, default).
    pub fn concerns(&self) -> Option<Concern> {
        match self {
            Error::Config(why) if why.contains("key") => Some(Concern::KeyFile),
            Error::Config(_)
            | Error::MissingContainer { .. }
            | Error::NoArchive(_)
            | Error::Conflict { .. } => Some(Concern::Archive),
            Error::Refused { why, .. } if why.contains("key id") => Some(Concern::KeyFile),
            Error::Refused { why, .. } if why.contains("this archive") => Some(Concern::Archive),
            Error::Unreadable {
                source: OpenError::KeyRequired(_) | OpenError::WrongKey { .. },
                ..
            } => Some(Concern::KeyFile),
            _ => None,
        }
    }

    /// The kind, as metrics label it.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) | Error::MissingContainer { .. } | Error::NoArchive(_) => "config",
            Error::Refused { .. } => "refused",
            Error::Conflict { .. } => "conflict",
            Error::Unreadable { .. } | Error::ForgedIdentity(_) => "damaged",
            Error::Backend { .. } | Error::IdentityVanished(_) => "backend",
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

/// One spelling of an archive URL for each archive: `/x`, `/x/` and `file:///x` are one local
/// archive, `s3://b/p` and `s3://b/p/` (or `s3a://`) one bucket prefix. Caches and the
/// receiver's spool are found by it, however a command line spelled the URL.
pub fn canonical_url(url: &str) -> String {
    let raw = url.trim();
    let clean = |path: &str| -> String {
        path.split('/')
            .filter(|p| !p.is_empty() && *p != ".")
            .collect::<Vec<_>>()
            .join("/")
    };
    if raw.starts_with('/') {
        return format!("file:///{}", clean(raw));
    }
    let Ok(parsed) = url::Url::parse(raw) else {
        return raw.to_string();
    };
    match parsed.scheme() {
        "file" => format!("file:///{}", clean(parsed.path())),
        scheme => {
            let scheme = match scheme {
                "s3a" => "s3",
                "azure" | "abfs" => "az",
                other => other,
            };
            format!(
                "{scheme}://{}/{}",
                parsed.host_str().unwrap_or_default(),
                clean(parsed.path())
            )
        }
    }
}

/// Opens a local file to archive with [`Archive::push_file`]: the file and its length now.
pub fn open_local(path: &std::path::Path) -> std::io::Result<(std::fs::File, u64)> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}

/// Plaintext to archive: bytes in memory, or a file read at offsets.
#[derive(Clone)]
enum Plain {
    Bytes(Bytes),
    File { file: Arc<std::fs::File>, len: u64 },
}

impl Plain {
    fn source(&self) -> envelope::Source<'_> {
        match self {
            Plain::Bytes(b) => envelope::Source::Bytes(b),
            Plain::File { file, len } => envelope::Source::File(file, *len),
        }
    }
}

/// An object: where it lives, the name its seal binds it to, and the kind of WAL file it
/// holds (an archive file under `wal/`, or a receiver's snapshot, see `snapshots`).
struct Obj {
    path: Path,
    sealed_as: String,
    kind: FileKind,
}

/// What an object is sealed as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// The object format version.
    pub format: u8,
    /// The key it is sealed with (None: not encrypted).
    pub key_id: Option<String>,
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
    /// The same store, with clients that give large transfers longer.
    backend: backend::Backend,
    url: String,
    keys: Option<Keyring>,
    seal: SealOptions,
    identity: OnceCell<Identity>,
    /// Bytes received from the store so far: readers waiting on it tell a slow store from
    /// a dead one by whether this moves.
    received: std::sync::atomic::AtomicU64,
    /// This process authenticated an identity an older walfs wrote without a MAC.
    authenticated: std::sync::atomic::AtomicBool,
    /// Where sealed objects wait for their upload (None: the system's temp directory).
    scratch: Option<std::path::PathBuf>,
}

impl Archive {
    /// Connects to the archive at `cfg.url`. Nothing is sent to the backend yet.
    pub fn open(
        cfg: &StoreConfig,
        keys: Option<Keyring>,
        seal: SealOptions,
    ) -> Result<Archive, Error> {
        Ok(Archive::on(backend::build(cfg)?, &cfg.url, keys, seal))
    }

    /// An archive on an already-built store (tests use `InMemory`).
    pub fn with_store(
        store: Arc<dyn ObjectStore>,
        prefix: Path,
        url: &str,
        keys: Option<Keyring>,
        seal: SealOptions,
    ) -> Archive {
        Archive::on(backend::Backend::fixed(store, prefix), url, keys, seal)
    }

    fn on(
        backend: backend::Backend,
        url: &str,
        keys: Option<Keyring>,
        seal: SealOptions,
    ) -> Archive {
        Archive {
            store: backend.store.clone(),
            prefix: backend.prefix.clone(),
            backend,
            url: url.to_string(),
            keys,
            seal,
            identity: OnceCell::new(),
            received: std::sync::atomic::AtomicU64::new(0),
            authenticated: std::sync::atomic::AtomicBool::new(false),
            scratch: None,
        }
    }

    /// Seals uploads in `dir` (on the cache's disk) instead of the system's temp directory.
    pub fn with_scratch_dir(mut self, dir: std::path::PathBuf) -> Archive {
        self.scratch = Some(dir);
        self
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    fn key_id(&self) -> Option<String> {
        self.keys.as_ref().map(|k| k.current().id().to_string())
    }

    fn obj(&self, name: &ArchiveName) -> Obj {
        Obj {
            path: self.object_path(name),
            sealed_as: name.to_string(),
            kind: name.kind(),
        }
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
                self.check_identity(&id)?;
                let _ = self.identity.set(id.clone());
                Ok(Some(id))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::backend(format!("reading {path}"), e)),
        }
    }

    /// Checks a read identity against the key file: an archive with a key must name a key the
    /// file holds, and its MAC must verify (one written before there was a MAC is accepted,
    /// with a warning, and authenticated by the next push).
    fn check_identity(&self, id: &Identity) -> Result<(), Error> {
        let Some(ring) = &self.keys else {
            return Ok(());
        };
        let Some(key_id) = &id.key_id else {
            return Err(Error::Config(format!(
                "the archive at {} is not encrypted ({IDENTITY_OBJECT} names no key), but a key \
                 file is configured: drop --key-file, or use another archive",
                self.url
            )));
        };
        let Some(key) = ring.keys().iter().find(|k| &k.id().to_string() == key_id) else {
            let held: Vec<String> = ring.keys().iter().map(|k| k.id().to_string()).collect();
            return Err(Error::Config(format!(
                "the archive at {} is sealed with key id {key_id}, which the key file does not \
                 hold (it holds {}): check --key-file",
                self.url,
                held.join(", ")
            )));
        };
        match &id.mac {
            Some(_) if id.verifies(key) => Ok(()),
            Some(_) => Err(Error::ForgedIdentity(self.url.clone())),
            None => {
                tracing::warn!(archive = %self.url,
                    "{IDENTITY_OBJECT} is not authenticated (written by an older walfs); the next \
                     push authenticates it");
                Ok(())
            }
        }
    }

    /// Authenticates an identity written before there were MACs, once the archive's own key
    /// reads it (a writer's job: `push` calls it).
    async fn authenticate_identity(&self, id: &Identity) -> Result<(), Error> {
        let Some(ring) = &self.keys else {
            return Ok(());
        };
        let ours = id.key_id.as_deref() == Some(&ring.current().id().to_string());
        if id.mac.is_some()
            || !ours
            || self
                .authenticated
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            return Ok(());
        }
        let signed = id.clone().sign(ring.current());
        let body = serde_json::to_vec_pretty(&signed).map_err(|e| Error::Config(e.to_string()))?;
        let path = self.identity_path();
        self.store
            .put_opts(&path, PutPayload::from(body), PutMode::Overwrite.into())
            .await
            .map_err(|e| self.write_error(format!("writing {path}"), e))?;
        tracing::info!(archive = %self.url, "{IDENTITY_OBJECT} authenticated under the archive key");
        self.authenticated
            .store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Moves the archive to the key file's current key: walfs.json names it and is
    /// authenticated under it. Objects sealed with the old key stay readable with a key file
    /// that holds it. Returns (old key id, new key id).
    pub async fn rotate_key(&self) -> Result<(String, String), Error> {
        let Some(ring) = &self.keys else {
            return Err(Error::Config("key rotation needs --key-file".into()));
        };
        let id = self.require_identity().await?;
        let old = id.key_id.clone().unwrap_or_default();
        let new = ring.current().id().to_string();
        if old == new {
            return Err(Error::Config(format!(
                "the archive already uses key {new}, the key file's first (current) key: put the \
                 new key first in the key file, the old ones after it"
            )));
        }
        let rotated = Identity {
            key_id: Some(new.clone()),
            created_by: format!("walfs {}", env!("CARGO_PKG_VERSION")),
            mac: None,
            ..id
        }
        .sign(ring.current());
        let body = serde_json::to_vec_pretty(&rotated).map_err(|e| Error::Config(e.to_string()))?;
        let path = self.identity_path();
        self.store
            .put_opts(&path, PutPayload::from(body), PutMode::Overwrite.into())
            .await
            .map_err(|e| self.write_error(format!("writing {path}"), e))?;
        Ok((old, new))
    }

    /// The identity if it was read already (no request).
    pub fn known_identity(&self) -> Option<&Identity> {
        self.identity.get()
    }

    /// Bytes received from the store so far (it moves while downloads make progress).
    pub fn received(&self) -> &std::sync::atomic::AtomicU64 {
        &self.received
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
        let id = match &self.keys {
            Some(ring) => id.sign(ring.current()),
            None => id,
        };
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

    /// Checks a segment or `.partial` file (its first bytes `first` and length `len`) against
    /// PostgreSQL's page header and the archive's identity, recording the identity on the
    /// first segment. Both must be exactly one segment long: PostgreSQL and pg_receivewal
    /// write `.partial` files at full size, so anything shorter is a cut copy.
    async fn check_wal_content(
        &self,
        name: &ArchiveName,
        first: &[u8],
        len: u64,
    ) -> Result<(), Error> {
        let refuse = |why: String| Error::Refused {
            name: name.to_string(),
            why,
        };
        let header = wal::parse_long_header(first).map_err(|e| refuse(e.to_string()))?;
        let size = header.segment_size;
        if len != size.bytes() {
            return Err(refuse(format!(
                "{len} bytes, but its page header says wal_segment_size is {}: the file is cut \
                 short or is not a whole segment",
                size.bytes()
            )));
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
            mac: None,
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

    /// Checks that `plain` is a whole, well-formed file of its kind: an archived name is
    /// immutable, so an empty, cut or foreign file must never be its first write.
    async fn validate(&self, name: &ArchiveName, plain: &Plain) -> Result<(), Error> {
        let refuse = |why: String| Error::Refused {
            name: name.to_string(),
            why,
        };
        let src = plain.source();
        let local = |e: std::io::Error| Error::Output {
            name: name.to_string(),
            why: format!("reading the file to archive: {e}"),
        };
        if src.is_empty() {
            return Err(refuse("the file is empty".into()));
        }
        match name.kind() {
            FileKind::Segment | FileKind::Partial => {
                let mut first = vec![0u8; (wal::LONG_HEADER_LEN as u64).min(src.len()) as usize];
                src.read_exact_at(&mut first, 0).map_err(local)?;
                self.check_wal_content(name, &first, src.len()).await
            }
            FileKind::History | FileKind::Backup => {
                if src.len() > wal::MAX_TEXT_FILE {
                    return Err(refuse(format!(
                        "{} bytes: too large for a {}",
                        src.len(),
                        name.kind()
                    )));
                }
                let mut text = vec![0u8; src.len() as usize];
                src.read_exact_at(&mut text, 0).map_err(local)?;
                if name.kind() == FileKind::History {
                    wal::parse_history_file(&text, name.timeline()).map(|_| ())
                } else {
                    let size = match self.identity().await? {
                        Some(id) => Some(id.segment_size()?),
                        None => None,
                    };
                    wal::parse_backup_file(&text, name, size).map(|_| ())
                }
                .map_err(|why| refuse(format!("not a well-formed {}: {why}", name.kind())))
            }
        }
    }

    /// Archives `data` under `name`. Returns only once the backend confirmed a durable write,
    /// or the identical content is already archived and still opens.
    pub async fn push(&self, name: &ArchiveName, data: Bytes) -> Result<PushOutcome, Error> {
        self.push_plain(name, Plain::Bytes(data)).await
    }

    /// Archives the first `len` bytes of `file` (read at offsets, never whole into memory).
    pub async fn push_file(
        &self,
        name: &ArchiveName,
        file: std::fs::File,
        len: u64,
    ) -> Result<PushOutcome, Error> {
        self.push_plain(
            name,
            Plain::File {
                file: Arc::new(file),
                len,
            },
        )
        .await
    }

    async fn push_plain(&self, name: &ArchiveName, plain: Plain) -> Result<PushOutcome, Error> {
        let began = Instant::now();
        let len = plain.source().len();
        let r = self.push_inner(name, plain).await;
        if let Ok(PushOutcome::Stored { stored_bytes }) = &r {
            telemetry::archive_stored("push", *stored_bytes);
        }
        record("push", began, len, &r);
        r
    }

    /// A push must seal under the archive's key regime: no key when it has none; with a key,
    /// a key file that holds the archive's current key (the file's own current key seals).
    fn check_key(&self, name: &ArchiveName, id: &Identity) -> Result<(), Error> {
        let holds = match (&self.keys, &id.key_id) {
            (None, None) => true,
            (Some(ring), Some(k)) => ring.keys().iter().any(|key| &key.id().to_string() == k),
            _ => false,
        };
        if holds {
            return Ok(());
        }
        let show = |k: &Option<String>| k.clone().unwrap_or_else(|| "none".into());
        Err(Error::Refused {
            name: name.to_string(),
            why: format!(
                "this archive is sealed with key id {}, the configured key is {}; \
                 check --key-file",
                show(&id.key_id),
                show(&self.key_id())
            ),
        })
    }

    async fn push_inner(&self, name: &ArchiveName, plain: Plain) -> Result<PushOutcome, Error> {
        self.validate(name, &plain).await?;
        if let Some(id) = self.identity().await? {
            self.check_key(name, &id)?;
            self.authenticate_identity(&id).await?;
        }
        self.put_once(&self.obj(name), &plain).await
    }

    /// Stores `plain` as `obj` with a create-only write, unless it is there already; then it
    /// must open and hold exactly `plain`. Returns only once the backend confirmed.
    async fn put_once(&self, obj: &Obj, plain: &Plain) -> Result<PushOutcome, Error> {
        // Fast path for PostgreSQL's re-archive after a crash: no upload when it is there.
        if self.head(&obj.path).await?.is_some() {
            return self.confirm_identical(obj, plain).await;
        }
        let (payload, stored_bytes) = self.seal(obj, plain).await?;
        match self
            .backend
            .for_size(stored_bytes)
            .put_opts(&obj.path, payload, PutOptions::from(PutMode::Create))
            .await
        {
            Ok(_) => Ok(PushOutcome::Stored { stored_bytes }),
            // Two writers raced, or a retry met its own first attempt (whose answer was
            // lost): the conditional put let exactly one write through; compare with it.
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => {
                self.confirm_identical(obj, plain).await
            }
            Err(e) => {
                Err(self.write_error(format!("uploading {} to {}", obj.sealed_as, self.url), e))
            }
        }
    }

    /// Seals `plain` into an unlinked scratch file and maps it: the upload reads the sealed
    /// object from the page cache, so memory stays flat whatever the file's size.
    async fn seal(&self, obj: &Obj, plain: &Plain) -> Result<(PutPayload, u64), Error> {
        let keys = self.keys.clone();
        let opts = self.seal;
        let n = obj.sealed_as.clone();
        let plain = plain.clone();
        let scratch = self.scratch.clone();
        let scratch_dir = self.scratch.clone().unwrap_or_else(std::env::temp_dir);
        let local = |e: std::io::Error| Error::Output {
            name: obj.sealed_as.clone(),
            why: format!(
                "sealing into a scratch file in {} (the mount's: under --cache-dir; else \
                 TMPDIR): {e}",
                scratch_dir.display()
            ),
        };
        let sealed = tokio::task::spawn_blocking(move || -> std::io::Result<(Bytes, u64)> {
            let file = match &scratch {
                Some(dir) => tempfile::tempfile_in(dir)?,
                None => tempfile::tempfile()?,
            };
            let mut out = std::io::BufWriter::with_capacity(1 << 20, &file);
            let key = keys.as_ref().map(Keyring::current);
            let len = envelope::seal_to(&n, plain.source(), key, opts, &mut out)?;
            std::io::Write::flush(&mut out)?;
            drop(out);
            // SAFETY: the file is private (unlinked, never shared) and nothing writes it
            // while the map lives.
            let map = unsafe { memmap2::Mmap::map(&file)? };
            Ok((Bytes::from_owner(map), len))
        })
        .await
        .map_err(|e| Error::Config(format!("sealing task failed: {e}")))?
        .map_err(local)?;
        Ok((PutPayload::from(sealed.0), sealed.1))
    }

    /// Something is stored under `name`: succeed only if it opens and holds exactly `plain`.
    /// The stored object is opened chunk by chunk and compared with the file at the same
    /// offsets, never expanded into memory whole.
    async fn confirm_identical(&self, obj: &Obj, plain: &Plain) -> Result<PushOutcome, Error> {
        let vanished = || Error::Refused {
            name: obj.sealed_as.clone(),
            why: "the archived copy vanished while being compared; try again".into(),
        };
        let offered = plain.clone();
        let differs = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let d = differs.clone();
        let compare = Box::new(move |at: u64, data: &[u8]| {
            let src = offered.source();
            let mut mine = vec![0u8; data.len()];
            let same = at + data.len() as u64 <= src.len()
                && src.read_exact_at(&mut mine, at).is_ok()
                && mine == data;
            if !same {
                d.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        });
        let len = plain.source().len();
        let Some((_, stored_len)) = self
            .open_object(obj, Some(len), compare, Priority::Reader)
            .await?
        else {
            return Err(vanished());
        };
        if stored_len == len && !differs.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(PushOutcome::AlreadyArchived);
        }
        // They differ: name both by their SHA-256, computed here (the bucket holds no digest
        // of any plaintext), from a second download of the stored copy.
        let local = |e: std::io::Error| Error::Output {
            name: obj.sealed_as.clone(),
            why: format!("a scratch file to compare with the archived copy: {e}"),
        };
        let copy = tempfile::tempfile().map_err(local)?;
        let Some(stored_len) = self
            .fetch_obj_into(
                obj,
                Some(len),
                copy.try_clone().map_err(local)?,
                Priority::Reader,
            )
            .await?
        else {
            return Err(vanished());
        };
        let plain = plain.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let stored = envelope::Source::File(&copy, stored_len).digest()?;
            let offered = plain.source().digest()?;
            // The second look found them equal after all (the object was replaced between
            // the two downloads by an identical one): that is the answer.
            Ok::<_, std::io::Error>((stored != offered).then_some((stored, offered)))
        })
        .await
        .map_err(|e| Error::Config(format!("comparing task failed: {e}")))?
        .map_err(local)?;
        match outcome {
            None => Ok(PushOutcome::AlreadyArchived),
            Some((stored, offered)) => Err(Error::Conflict {
                name: obj.sealed_as.clone(),
                stored: hex::encode(stored),
                offered: hex::encode(offered),
            }),
        }
    }

    /// The archive answered "no such object": that is absence only if the archive itself is
    /// still there. Asks for the identity object afresh (never from memory): a wiped prefix,
    /// a wrong URL or a store answering "not found" for everything is never "absent".
    async fn confirm_absent(&self) -> Result<(), Error> {
        let path = self.identity_path();
        match self.store.head(&path).await {
            Ok(_) => {
                if self.identity.get().is_none() {
                    self.identity().await?;
                }
                Ok(())
            }
            Err(object_store::Error::NotFound { .. }) if self.identity.get().is_some() => {
                Err(Error::IdentityVanished(self.url.clone()))
            }
            Err(object_store::Error::NotFound { .. }) => Err(Error::NoArchive(self.url.clone())),
            Err(e) => Err(Error::backend(format!("reading {path}"), e)),
        }
    }

    async fn head(&self, path: &Path) -> Result<Option<object_store::ObjectMeta>, Error> {
        match self.store.head(path).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::backend(format!("looking up {path}"), e)),
        }
    }

    /// The download of `obj`'s stored object, or None when it is authoritatively not archived
    /// (see [`Archive::confirm_absent`]): a wrong URL must not look like the end of the archive
    /// to PostgreSQL.
    ///
    /// `size` is what the caller expects the file to hold (a segment: the segment size): the
    /// download is given the time that needs on a slow link.
    async fn get_stream(
        &self,
        obj: &Obj,
        size: Option<u64>,
    ) -> Result<Option<object_store::GetResult>, Error> {
        let size = size.or_else(|| match obj.kind {
            FileKind::Segment | FileKind::Partial => {
                self.identity.get().map(|i| i.wal_segment_size)
            }
            _ => None,
        });
        match self
            .backend
            .for_size(size.unwrap_or(0))
            .get(&obj.path)
            .await
        {
            Ok(r) => Ok(Some(r)),
            Err(object_store::Error::NotFound { .. }) => {
                self.confirm_absent().await?;
                Ok(None)
            }
            Err(e) => Err(Error::backend(format!("downloading {}", obj.sealed_as), e)),
        }
    }

    /// An opened segment (or `.partial`) is one of this archive's: exactly its segment size,
    /// with a page header naming its cluster and segment size. The object authenticated, so a
    /// mismatch is an object of another cluster sealed with the same key (replayed), or an
    /// identity that is not this archive's; either way not data.
    fn check_content(&self, obj: &Obj, len: u64, first: &[u8]) -> Result<(), Error> {
        let (FileKind::Segment | FileKind::Partial, Some(id)) = (obj.kind, self.identity.get())
        else {
            return Ok(());
        };
        let bad = |why: String| Error::Unreadable {
            name: obj.sealed_as.clone(),
            source: OpenError::Corrupt(why),
        };
        if id.wal_segment_size != len {
            return Err(bad(format!(
                "{len} bytes, but the archive's segment size is {}",
                id.wal_segment_size
            )));
        }
        let header = wal::parse_long_header(first).map_err(|e| bad(e.to_string()))?;
        if header.system_identifier.to_string() != id.system_identifier
            || header.segment_size.bytes() != id.wal_segment_size
        {
            return Err(bad(format!(
                "its page header names cluster {} (segment size {}), this archive holds \
                 cluster {} (segment size {})",
                header.system_identifier,
                header.segment_size.bytes(),
                id.system_identifier,
                id.wal_segment_size
            )));
        }
        Ok(())
    }

    /// Downloads `obj`, authenticates it whole and hands its plaintext to `sink` (several
    /// threads, any order), then checks its content against the identity; None when it is
    /// not archived. The sink's output means nothing unless this returns Ok.
    ///
    /// The object is opened as it arrives: the download is cut into records
    /// ([`envelope::Framer`]), which threads open while the next ones download. Memory stays
    /// at a few chunks (four records queued, one being framed, and per thread a record and its
    /// chunk) whatever the object's size.
    async fn open_object(
        &self,
        obj: &Obj,
        size: Option<u64>,
        sink: Box<envelope::OwnedSink>,
        priority: Priority,
    ) -> Result<Option<(Header, u64)>, Error> {
        let wal = matches!(obj.kind, FileKind::Segment | FileKind::Partial);
        let (download, identity) = tokio::join!(self.get_stream(obj, size), async {
            if wal {
                self.identity().await.map(|_| ())
            } else {
                Ok(())
            }
        });
        let Some(download) = download? else {
            return Ok(None);
        };
        identity?;
        let name = &obj.sealed_as;
        let mut body = download.into_stream();
        let mut framer = envelope::Framer::default();
        let mut pieces = Vec::new();
        let mut opening: Option<Opening> = None;
        let mut stored = 0u64;
        // The sink also keeps the first bytes, for the content check against the identity.
        let first = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = first.clone();
        let sink: Arc<envelope::OwnedSink> = Arc::new(move |at: u64, data: &[u8]| {
            if at == 0 {
                let take = data.len().min(wal::LONG_HEADER_LEN);
                *keep.lock().unwrap_or_else(|p| p.into_inner()) = data[..take].to_vec();
            }
            sink(at, data)
        });
        let fed: Result<(), Error> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| Error::backend(format!("downloading {name}"), e))?;
                // Counted as it arrives: a slow download is not a dead store.
                self.received
                    .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                stored += chunk.len() as u64;
                framer
                    .push(&chunk, &mut pieces)
                    .map_err(|e| Self::unreadable(name, e))?;
                for piece in pieces.drain(..) {
                    match piece {
                        Piece::Header(bytes) => {
                            let opener = Opener::new(name, &bytes, self.keys.as_ref())
                                .map_err(|e| Self::unreadable(name, e))?;
                            opening = Some(
                                Opening::start(opener, sink.clone(), priority)
                                    .map_err(|e| Self::unreadable(name, e))?,
                            );
                        }
                        Piece::Record(i, sealed) => {
                            let Some(o) = &opening else {
                                return Err(Self::unreadable(
                                    name,
                                    OpenError::Corrupt("a chunk before the header".into()),
                                ));
                            };
                            if o.records.send((i, sealed)).await.is_err() {
                                // The threads stopped: one failed, and its verdict says why.
                                return Err(Self::unreadable(
                                    name,
                                    OpenError::Output("the opening threads stopped".into()),
                                ));
                            }
                        }
                    }
                }
            }
            framer.finish().map_err(|e| Self::unreadable(name, e))
        }
        .await;
        // A damaged chunk is the answer even when the download failed too: it cannot heal.
        // Then a download that failed (the chunks after it never came); then every chunk must
        // have been opened.
        let opened = match opening {
            Some(o) => Some(o.finish().await.map_err(|e| Self::unreadable(name, e))?),
            None => None,
        };
        fed?;
        if let Some((opener, opened)) = opened {
            opener
                .all_opened(opened)
                .map_err(|e| Self::unreadable(name, e))?;
        }
        telemetry::archive_stored("fetch", stored);
        let header = framer
            .header()
            .cloned()
            .ok_or_else(|| Self::unreadable(name, OpenError::Corrupt("no header".into())))?;
        let len = header.plaintext_len;
        let first = std::mem::take(&mut *first.lock().unwrap_or_else(|p| p.into_inner()));
        self.check_content(obj, len, &first)?;
        Ok(Some((header, len)))
    }

    fn unreadable(name: &str, source: OpenError) -> Error {
        match source {
            OpenError::Output(why) => Error::Output {
                name: name.to_string(),
                why: format!("writing the restored file: {why}"),
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
        self.fetch_obj(&self.obj(name), None).await
    }

    /// `obj`'s verified plaintext in memory; None when it is absent. `size`: its plaintext
    /// length when known, so the buffer is allocated once (chunks land in any order).
    async fn fetch_obj(&self, obj: &Obj, size: Option<u64>) -> Result<Option<Vec<u8>>, Error> {
        let cap = size.map_or(0, |n| usize::try_from(n).unwrap_or(0).min(1 << 30));
        let out = Arc::new(std::sync::Mutex::new(Vec::with_capacity(cap)));
        let o = out.clone();
        let sink = Box::new(move |at: u64, data: &[u8]| {
            let mut v = o.lock().unwrap_or_else(|p| p.into_inner());
            let end = at as usize + data.len();
            if v.len() < end {
                v.resize(end, 0);
            }
            v[at as usize..end].copy_from_slice(data);
            Ok(())
        });
        Ok(self
            .open_object(obj, size, sink, Priority::Reader)
            .await?
            .map(|_| std::mem::take(&mut *out.lock().unwrap_or_else(|p| p.into_inner()))))
    }

    /// Downloads and authenticates the whole object of `name` (the plaintext is dropped as it
    /// opens); None when it is not archived. What `verify --deep` checks, and counts by key.
    pub async fn check_object(&self, name: &ArchiveName) -> Result<Option<ObjectInfo>, Error> {
        let opened = self
            .open_object(
                &self.obj(name),
                None,
                Box::new(|_, _| Ok(())),
                Priority::Reader,
            )
            .await?;
        Ok(opened.map(|(h, _)| ObjectInfo {
            format: h.version,
            key_id: (h.cipher == envelope::Cipher::Aes256Gcm).then(|| h.key_id.to_string()),
        }))
    }

    /// Writes the plaintext of `name` into `file` (from offset 0) and returns its length, or
    /// None when it is not archived. Memory stays at a few chunks whatever the file's size.
    /// The file's content means nothing unless this returns Ok. `size`: the plaintext size,
    /// when known (a slow link gets the time a large file needs).
    pub async fn fetch_into(
        &self,
        name: &ArchiveName,
        file: std::fs::File,
        size: Option<u64>,
        priority: Priority,
    ) -> Result<Option<u64>, Error> {
        let began = Instant::now();
        let r = self.fetch_into_inner(name, file, size, priority).await;
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
        size: Option<u64>,
        priority: Priority,
    ) -> Result<Option<u64>, Error> {
        self.fetch_obj_into(&self.obj(name), size, file, priority)
            .await
    }

    /// Writes `obj`'s verified plaintext into `file`; its length, or None when absent.
    async fn fetch_obj_into(
        &self,
        obj: &Obj,
        size: Option<u64>,
        file: std::fs::File,
        priority: Priority,
    ) -> Result<Option<u64>, Error> {
        let sink = Box::new(move |at: u64, data: &[u8]| {
            std::os::unix::fs::FileExt::write_all_at(&file, data, at)
        });
        Ok(self
            .open_object(obj, size, sink, priority)
            .await?
            .map(|(_, len)| len))
    }

    /// The object's header (one small ranged read), or None when authoritatively absent. The
    /// header is only authenticated when the object is opened; use it for sizes, not for trust.
    pub async fn header(&self, name: &ArchiveName) -> Result<Option<Header>, Error> {
        let path = self.object_path(name);
        match self.store.get_range(&path, 0..HEADER_LEN as u64).await {
            Ok(b) => Header::parse(&b)
                .map(Some)
                .map_err(|source| Error::Unreadable {
                    name: name.to_string(),
                    source,
                }),
            Err(object_store::Error::NotFound { .. }) => {
                self.confirm_absent().await?;
                Ok(None)
            }
            Err(e) => Err(Error::backend(format!("reading the header of {name}"), e)),
        }
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

mod backend;
pub mod backups;
pub mod faults;
pub mod snapshots;

#[cfg(test)]
/// A segment-shaped buffer: a long page header for `name` and some content.
pub(crate) fn test_segment(name: &str, sysid: u64, size: u64) -> Bytes {
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

/// The threads opening one object's records while its download brings the next ones: a
/// thread of its own (not tokio's blocking pool, which local-file downloads need to make
/// progress) and one per core under it.
struct Opening {
    records: tokio::sync::mpsc::Sender<(usize, Bytes)>,
    verdict: tokio::sync::oneshot::Receiver<(Arc<Opener>, Result<usize, OpenError>)>,
}

impl Opening {
    fn start(
        opener: Opener,
        sink: Arc<envelope::OwnedSink>,
        priority: Priority,
    ) -> Result<Opening, OpenError> {
        // Records waiting for a thread: the download runs a few records ahead of them.
        let (records, rx) = tokio::sync::mpsc::channel::<(usize, Bytes)>(4);
        let (tell, verdict) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("walfs-open".into())
            .spawn(move || {
                let rx = std::sync::Mutex::new(rx);
                let next = || rx.lock().unwrap_or_else(|p| p.into_inner()).blocking_recv();
                let opened = envelope::open_records(&opener, &next, &*sink, priority);
                let _ = tell.send((Arc::new(opener), opened));
            })
            .map_err(|e| OpenError::Output(format!("starting an opening thread: {e}")))?;
        Ok(Opening { records, verdict })
    }

    /// No more records: the opener and how many records the threads opened, once they are
    /// done; an error when one failed.
    async fn finish(self) -> Result<(Arc<Opener>, usize), OpenError> {
        drop(self.records);
        match self.verdict.await {
            Ok((opener, opened)) => Ok((opener, opened?)),
            Err(_) => Err(OpenError::Output("the opening thread ended early".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    const SYSID: u64 = 7_300_000_000_000_000_001;

    use super::test_segment as segment;

    fn archive() -> Archive {
        Archive::with_store(
            Arc::new(InMemory::new()),
            Path::from("pfx"),
            "memory:///",
            Some(
                crate::envelope::Keyring::new(
                    crate::envelope::Key::from_bytes([1; 32]),
                    Vec::new(),
                )
                .unwrap(),
            ),
            SealOptions::default(),
        )
    }

    fn n(s: &str) -> ArchiveName {
        ArchiveName::parse(s).unwrap()
    }

    #[test]
    fn one_archive_one_spelling() {
        for (a, b) in [
            ("/var/lib/walfs/archive", "file:///var/lib/walfs/archive/"),
            ("/x//y/./z", "file:///x/y/z"),
            ("s3://b/p", "s3://b/p/"),
            ("s3a://b//p", "s3://b/p"),
            ("az://c/p", "azure://c/p/"),
            (" gs://b ", "gs://b/"),
        ] {
            assert_eq!(canonical_url(a), canonical_url(b), "{a} vs {b}");
        }
        assert_ne!(canonical_url("s3://b/p"), canonical_url("s3://b/q"));
        assert_ne!(canonical_url("s3://b/p"), canonical_url("gs://b/p"));
        assert_ne!(canonical_url("/x/y"), canonical_url("/x/y/z"));
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
                Err(e @ Error::Refused { .. }) => {
                    assert!(e.to_string().contains(why), "{e}");
                    // Another cluster's WAL: the fix is another archive URL; a bad file has
                    // no setting to change.
                    let other_cluster = why == "system identifier" || why == "wal_segment_size";
                    assert_eq!(
                        e.concerns(),
                        other_cluster.then_some(Concern::Archive),
                        "{e}"
                    );
                }
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

    fn faulty_archive() -> (Arc<faults::FaultyStore>, Archive) {
        let store = faults::FaultyStore::new(Arc::new(InMemory::new()));
        let a = Archive::with_store(
            store.clone(),
            Path::from("pfx"),
            "memory:///",
            Some(
                crate::envelope::Keyring::new(
                    crate::envelope::Key::from_bytes([1; 32]),
                    Vec::new(),
                )
                .unwrap(),
            ),
            SealOptions::default(),
        );
        (store, a)
    }

    #[tokio::test]
    async fn absence_is_only_said_of_an_archive_that_is_there() {
        let (store, a) = faulty_archive();
        let missing = n("000000010000000000000009");
        // Never seen: no archive at all, not "absent".
        assert!(matches!(a.header(&missing).await, Err(Error::NoArchive(_))));
        assert!(matches!(a.fetch(&missing).await, Err(Error::NoArchive(_))));
        let first = n("000000010000000000000001");
        a.push(&first, segment(first.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        assert_eq!(a.header(&missing).await.unwrap(), None);
        // The identity vanishes behind the archive's back: every "not found" is suspect now.
        store
            .inner()
            .delete(&Path::from("pfx/walfs.json"))
            .await
            .unwrap();
        let e = a.header(&missing).await.unwrap_err();
        assert!(matches!(e, Error::IdentityVanished(_)), "{e:?}");
        assert_eq!(e.class(), Class::Unavailable);
        assert!(matches!(
            a.fetch(&missing).await,
            Err(Error::IdentityVanished(_))
        ));
        // The store failing is never absence either.
        let (store, a) = faulty_archive();
        a.push(&first, segment(first.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        store.inject(faults::Op::Get, "walfs.json", faults::Fault::Error, None);
        let e = a.header(&missing).await.unwrap_err();
        assert_eq!(e.class(), Class::Unavailable, "{e:?}");
        store.clear();
        store.inject(faults::Op::Get, "", faults::Fault::BrokenBody, None);
        assert_eq!(
            a.fetch(&first).await.unwrap_err().class(),
            Class::Unavailable
        );
    }

    #[tokio::test]
    async fn a_download_is_opened_as_it_arrives() {
        // Chunks are opened while the rest downloads (memory stays at a few chunks for a
        // 1 GiB segment): a body that breaks half-way has already fed its first chunks to
        // the sink, and the fetch still fails as the store's failure, never as damage.
        let (store, a) = faulty_archive();
        let first = n("000000010000000000000001");
        let size = 8u64 << 20;
        a.push(&first, segment(first.as_str(), SYSID, size))
            .await
            .unwrap();
        store.inject(
            faults::Op::Get,
            first.as_str(),
            faults::Fault::BrokenBody,
            None,
        );
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let s = seen.clone();
        let sink = Box::new(move |_: u64, d: &[u8]| {
            s.fetch_add(d.len() as u64, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        });
        let e = a
            .open_object(&a.obj(&first), None, sink, Priority::Reader)
            .await
            .unwrap_err();
        assert_eq!(e.class(), Class::Unavailable, "{e:?}");
        let seen = seen.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            (size / 4..size).contains(&seen),
            "{seen} of {size} bytes opened before the body broke"
        );
        store.clear();
        let f = tempfile::tempfile().unwrap();
        let len = a
            .fetch_into(&first, f.try_clone().unwrap(), None, Priority::Background)
            .await
            .unwrap();
        assert_eq!(len, Some(size));
        let mut back = vec![0u8; size as usize];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut back, 0).unwrap();
        assert!(back == segment(first.as_str(), SYSID, size));
    }

    #[tokio::test]
    async fn only_whole_well_formed_files_are_archived() {
        let a = archive();
        let first = n("000000010000000000000001");
        let seg = segment(first.as_str(), SYSID, 1 << 20);
        a.push(&first, seg.clone()).await.unwrap();
        let history = &b"1\t0/3000000\tno recovery target specified\n"[..];
        let backup = "START WAL LOCATION: 0/100028 (file 000000010000000000000001)\n\
                      STOP WAL LOCATION: 0/100100 (file 000000010000000000000001)\n\
                      START TIMELINE: 1\nSTOP TIME: 2026-11-22 10:00:01 UTC\nSTOP TIMELINE: 1\n";
        let cases: Vec<(&str, Bytes)> = vec![
            ("00000002.history", Bytes::new()),
            (
                "00000002.history",
                Bytes::copy_from_slice(&history[..history.len() - 1]),
            ),
            ("00000002.history", Bytes::copy_from_slice(&history[..10])),
            ("00000002.history", Bytes::from_static(b"garbage\n")),
            (
                "000000010000000000000001.00000028.backup",
                Bytes::copy_from_slice(&backup.as_bytes()[..backup.len() - 20]),
            ),
            (
                "000000010000000000000001.00000030.backup",
                Bytes::copy_from_slice(backup.as_bytes()),
            ),
            (
                "000000010000000000000001.partial",
                seg.slice(..seg.len() / 2),
            ),
            ("000000010000000000000001.partial", Bytes::new()),
            ("000000010000000000000002", Bytes::new()),
        ];
        for (name, data) in cases {
            let name = n(name);
            match a.push(&name, data.clone()).await {
                Err(e @ Error::Refused { .. }) => assert_eq!(e.class(), Class::Refused),
                r => panic!(
                    "{name} ({} bytes): expected a refusal, got {r:?}",
                    data.len()
                ),
            }
            assert_eq!(a.fetch(&name).await.unwrap(), None, "{name} was archived");
        }
        // The whole files go in, and a cut one never poisoned their names.
        a.push(&n("00000002.history"), Bytes::from_static(history))
            .await
            .unwrap();
        a.push(
            &n("000000010000000000000001.00000028.backup"),
            Bytes::copy_from_slice(backup.as_bytes()),
        )
        .await
        .unwrap();
        a.push(&n("000000010000000000000001.partial"), seg)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_lost_answer_is_confirmed_and_a_failed_put_stores_nothing() {
        let (store, a) = faulty_archive();
        let first = n("000000010000000000000001");
        let seg = segment(first.as_str(), SYSID, 1 << 20);
        a.push(&first, seg.clone()).await.unwrap();
        let second = n("000000010000000000000002");
        let seg2 = segment(second.as_str(), SYSID, 1 << 20);
        // The put fails before anything is stored: an error, and nothing there.
        store.inject(faults::Op::Put, "wal/", faults::Fault::Error, Some(1));
        assert_eq!(
            a.push(&second, seg2.clone()).await.unwrap_err().class(),
            Class::Unavailable
        );
        assert_eq!(a.fetch(&second).await.unwrap(), None);
        // Stored, but the answer was lost: a retry compares and succeeds.
        store.inject(
            faults::Op::Put,
            "wal/",
            faults::Fault::LostResponse,
            Some(1),
        );
        assert!(a.push(&second, seg2.clone()).await.is_err());
        assert_eq!(
            a.push(&second, seg2.clone()).await.unwrap(),
            PushOutcome::AlreadyArchived
        );
        assert_eq!(a.fetch(&second).await.unwrap().unwrap(), seg2);
    }

    #[tokio::test]
    async fn a_file_is_archived_from_disk_as_bytes_are() {
        let a = archive();
        let name = n("000000010000000000000001");
        let seg = segment(name.as_str(), SYSID, 1 << 20);
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, &seg).unwrap();
        // A longer file: only the first `len` bytes count.
        std::io::Write::write_all(&mut f, b"trailing").unwrap();
        let g = f.try_clone().unwrap();
        a.push_file(&name, f, seg.len() as u64).await.unwrap();
        assert_eq!(a.fetch(&name).await.unwrap().unwrap(), seg);
        assert_eq!(
            a.push_file(&name, g, seg.len() as u64).await.unwrap(),
            PushOutcome::AlreadyArchived
        );
    }

    fn keyed(store: Arc<dyn ObjectStore>, keys: &[u8]) -> Archive {
        let ring = Keyring::new(
            Key::from_bytes([keys[0]; 32]),
            keys[1..]
                .iter()
                .map(|b| Key::from_bytes([*b; 32]))
                .collect(),
        )
        .unwrap();
        Archive::with_store(
            store,
            Path::from("pfx"),
            "memory:///",
            Some(ring),
            SealOptions::default(),
        )
    }

    #[tokio::test]
    async fn walfs_json_is_authenticated_under_the_key() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let first = n("000000010000000000000001");
        keyed(store.clone(), &[1])
            .push(&first, segment(first.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        let path = Path::from("pfx/walfs.json");
        let text = store.get(&path).await.unwrap().bytes().await.unwrap();
        let id: Identity = serde_json::from_slice(&text).unwrap();
        assert!(id.mac.is_some(), "no MAC in {id:?}");
        assert!(keyed(store.clone(), &[1])
            .identity()
            .await
            .unwrap()
            .is_some());
        // Forged: another segment size, the MAC left as it was.
        let forged = Identity {
            wal_segment_size: 2 << 20,
            ..id.clone()
        };
        store
            .put(
                &path,
                PutPayload::from(serde_json::to_vec(&forged).unwrap()),
            )
            .await
            .unwrap();
        let e = keyed(store.clone(), &[1]).identity().await.unwrap_err();
        assert!(matches!(e, Error::ForgedIdentity(_)), "{e:?}");
        assert_eq!(e.class(), Class::Damaged);
        // Swapped for one claiming no key: a configuration error, never data.
        let plain = Identity {
            key_id: None,
            mac: None,
            ..id.clone()
        };
        store
            .put(&path, PutPayload::from(serde_json::to_vec(&plain).unwrap()))
            .await
            .unwrap();
        assert_eq!(
            keyed(store.clone(), &[1])
                .identity()
                .await
                .unwrap_err()
                .class(),
            Class::Misconfigured
        );
        // One an older walfs wrote (no MAC): read, and authenticated by the next push.
        let legacy = Identity {
            mac: None,
            ..id.clone()
        };
        store
            .put(
                &path,
                PutPayload::from(serde_json::to_vec(&legacy).unwrap()),
            )
            .await
            .unwrap();
        let a = keyed(store.clone(), &[1]);
        assert!(a.identity().await.unwrap().is_some());
        let second = n("000000010000000000000002");
        a.push(&second, segment(second.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        let again: Identity =
            serde_json::from_slice(&store.get(&path).await.unwrap().bytes().await.unwrap())
                .unwrap();
        assert!(again.verifies(&Key::from_bytes([1; 32])));
    }

    #[tokio::test]
    async fn keys_rotate_and_old_objects_stay_readable() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let (s1, s2, s3) = (
            n("000000010000000000000001"),
            n("000000010000000000000002"),
            n("000000010000000000000003"),
        );
        let seg = |x: &ArchiveName| segment(x.as_str(), SYSID, 1 << 20);
        keyed(store.clone(), &[1])
            .push(&s1, seg(&s1))
            .await
            .unwrap();
        // The new key goes first in every host's key file, the old one after it.
        let both = keyed(store.clone(), &[2, 1]);
        both.push(&s2, seg(&s2)).await.unwrap();
        assert!(matches!(both.rotate_key().await, Ok((ref o, ref n)) if o != n));
        // A host still on the old key alone may no longer push, nor read the new objects.
        let old = keyed(store.clone(), &[1]);
        let e = old.identity().await.unwrap_err();
        assert_eq!(e.concerns(), Some(Concern::KeyFile), "{e}");
        let both = keyed(store.clone(), &[2, 1]);
        both.push(&s3, seg(&s3)).await.unwrap();
        for x in [&s1, &s2, &s3] {
            assert_eq!(both.fetch(x).await.unwrap().unwrap(), seg(x), "{x}");
        }
        // Without the old key the first object is damage to the new key alone, never data.
        let new_only = keyed(store.clone(), &[2]);
        let e = new_only.fetch(&s1).await.unwrap_err();
        assert_eq!(e.class(), Class::Damaged);
        assert_eq!(e.concerns(), Some(Concern::KeyFile), "{e}");
        assert_eq!(new_only.fetch(&s3).await.unwrap().unwrap(), seg(&s3));
        assert!(
            both.rotate_key().await.is_err(),
            "rotating to the key in use"
        );
    }

    #[test]
    fn a_refusal_of_the_credentials_names_them() {
        let refused = Error::backend(
            "uploading x",
            object_store::Error::PermissionDenied {
                path: "x".into(),
                source: "403 AccessDenied".into(),
            },
        );
        assert!(
            refused.to_string().contains("AWS_ACCESS_KEY_ID"),
            "{refused}"
        );
        let down = Error::backend(
            "uploading x",
            object_store::Error::Generic {
                store: "S3",
                source: "connection refused".into(),
            },
        );
        assert!(!down.to_string().contains("credentials"), "{down}");
    }

    #[tokio::test]
    async fn an_unencrypted_object_in_a_keyed_archive_is_damage() {
        let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let s1 = n("000000010000000000000001");
        let a = keyed(store.clone(), &[1]);
        a.push(&s1, segment(s1.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        // Whoever can write to the bucket plants an unkeyed object with bytes of their own.
        let mut bytes = segment(s1.as_str(), SYSID, 1 << 20).to_vec();
        bytes[5000] ^= 0xFF;
        let planted = envelope::seal(s1.as_str(), &bytes, None, SealOptions::default());
        store
            .put(
                &Path::from(format!("pfx/wal/{s1}")),
                PutPayload::from(planted),
            )
            .await
            .unwrap();
        let e = keyed(store.clone(), &[1]).fetch(&s1).await.unwrap_err();
        assert_eq!(e.class(), Class::Damaged, "{e}");
    }

    #[tokio::test]
    async fn an_object_of_another_cluster_under_the_same_key_is_damage() {
        // Two clusters share a key (it happens); one's object is copied over the other's.
        let (a_store, b_store): (Arc<dyn ObjectStore>, Arc<dyn ObjectStore>) =
            (Arc::new(InMemory::new()), Arc::new(InMemory::new()));
        let s1 = n("000000010000000000000001");
        let s2 = n("000000010000000000000002");
        keyed(a_store.clone(), &[1])
            .push(&s1, segment(s1.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        keyed(a_store.clone(), &[1])
            .push(&s2, segment(s2.as_str(), SYSID, 1 << 20))
            .await
            .unwrap();
        keyed(b_store.clone(), &[1])
            .push(&s2, segment(s2.as_str(), SYSID + 9, 1 << 20))
            .await
            .unwrap();
        let path = Path::from(format!("pfx/wal/{s2}"));
        let foreign = b_store.get(&path).await.unwrap().bytes().await.unwrap();
        a_store.put(&path, PutPayload::from(foreign)).await.unwrap();
        let e = keyed(a_store.clone(), &[1]).fetch(&s2).await.unwrap_err();
        assert_eq!(e.class(), Class::Damaged, "{e}");
        assert!(e.to_string().contains("cluster"), "{e}");
        let f = tempfile::tempfile().unwrap();
        let e = keyed(a_store.clone(), &[1])
            .fetch_into(&s2, f, None, Priority::Reader)
            .await
            .unwrap_err();
        assert_eq!(e.class(), Class::Damaged, "{e}");
    }
}
