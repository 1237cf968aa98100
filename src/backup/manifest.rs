//! Checks a streamed base backup (`BASE_BACKUP`, PostgreSQL 13+) against its backup manifest.
//!
//! The server sends the backup as tar archives (`base.tar` for the data directory, one
//! `<oid>.tar` per tablespace) followed by `backup_manifest`, a JSON document listing every file
//! it sent with its size and checksum, and the WAL range the backup needs. A backup is only
//! marked complete after this module found that the archives hold exactly what the manifest
//! lists, so a truncated, reordered or corrupted transfer (or a bug in walfs's own handling of
//! the stream) is caught while the server that could send it again is still there, not at
//! restore time.
//!
//! What is checked:
//! - [`Manifest::parse`]: the manifest's own SHA-256 (`Manifest-Checksum`) over every byte
//!   before its line, the version (1 or 2; `System-Identifier` in version 2 only), that every
//!   file entry has exactly one of `Path`/`Encoded-Path`, a size, and a checksum of the right
//!   length for its algorithm, no path twice, and well-formed WAL ranges.
//! - [`TarChecker`]: the archive as it streams, in any split, with bounded memory (one 512-byte
//!   header, plus at most 64 KiB of GNU long-name or pax data; member data is never buffered):
//!   every header's checksum, sizes, that the archive does not end inside a header, a member or
//!   its padding, and that nothing but zeros follows the end-of-archive block. It computes the
//!   CRC32C and SHA-256 of every regular file.
//! - [`verify`]: every manifest file is in the archives with the same size and checksum, and
//!   every regular file in the archives is in the manifest, except the paths pg_verifybackup
//!   ignores because pg_basebackup may add or rewrite them (`backup_manifest`, `pg_wal/...`,
//!   `postgresql.auto.conf`, `recovery.signal`, `standby.signal`). Unlike pg_verifybackup,
//!   a manifest entry for one of those paths is still checked: walfs stores the server's
//!   archives untouched, so whatever the server listed must be there as listed.
//!
//! Paths: the manifest names files relative to the data directory, tablespace files as
//! `pg_tblspc/<oid>/<path inside the tablespace archive>`, and [`TarChecker`] names the
//! archive members the same way. A path that is valid UTF-8 is kept as is. One that is not
//! (the manifest then carries it as `Encoded-Path`) is named `"\u{0}hex:"` followed by the
//! lowercase hex of all its bytes, on both sides, so the two still match; a real path cannot
//! contain NUL, so this form never collides with one.
//!
//! Pure: no I/O, no async.

use crate::wal::Lsn;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Tar block size: headers are one block, member data is padded to a multiple.
const BLOCK: usize = 512;
/// Most bytes of GNU long-name or pax extended-header data kept for one member.
const MAX_META_LEN: u64 = 64 * 1024;
/// Most problems [`verify`] spells out in its error (it counts them all).
const MAX_PROBLEMS: usize = 5;
/// Prefix of the name given to a path that is not valid UTF-8 (followed by the hex of its bytes).
const NON_UTF8_PREFIX: &str = "\u{0}hex:";
/// Paths pg_verifybackup does not expect in the manifest (a path or the tree under it).
const IGNORED: [&str; 5] = [
    "backup_manifest",
    "pg_wal",
    "postgresql.auto.conf",
    "recovery.signal",
    "standby.signal",
];

/// A parsed, checksum-verified backup manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: u32,
    /// The cluster's system identifier (manifest version 2, PostgreSQL 17+).
    pub system_identifier: Option<u64>,
    /// Files by path (see the module doc for how non-UTF-8 paths are named).
    pub files: BTreeMap<String, ManifestFile>,
    pub wal_ranges: Vec<WalRange>,
}

/// One file the server sent, as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub size: u64,
    /// `None` when the backup was taken with `MANIFEST_CHECKSUMS 'NONE'`.
    pub checksum: Option<Checksum>,
}

/// A file checksum from the manifest: the digest bytes, hex-decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checksum {
    /// The four bytes of the finished CRC in the *server's* byte order (see [`verify`]).
    Crc32c([u8; 4]),
    Sha224(Vec<u8>),
    Sha256(Vec<u8>),
    Sha384(Vec<u8>),
    Sha512(Vec<u8>),
}

impl Checksum {
    /// The algorithm's name as the manifest spells it.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Checksum::Crc32c(_) => "CRC32C",
            Checksum::Sha224(_) => "SHA224",
            Checksum::Sha256(_) => "SHA256",
            Checksum::Sha384(_) => "SHA384",
            Checksum::Sha512(_) => "SHA512",
        }
    }
}

/// WAL the backup needs to be consistent: `start..end` on `timeline`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRange {
    pub timeline: u32,
    pub start: Lsn,
    pub end: Lsn,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("backup manifest is not valid JSON of the expected shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("backup manifest: {0}")]
    Invalid(String),
    #[error("backup manifest: file {path}: {reason}")]
    BadFile { path: String, reason: String },
    #[error(
        "backup manifest checksum mismatch: the manifest says {expected}, \
         its contents hash to {actual}"
    )]
    ChecksumMismatch { expected: String, actual: String },
    #[error("{0:?} is not a base backup archive name (expected base.tar or <tablespace oid>.tar)")]
    ArchiveName(String),
    #[error("{archive}: at byte {offset}: {reason}")]
    Tar {
        archive: String,
        offset: u64,
        reason: String,
    },
    #[error(
        "{path:?}: checksum algorithm {algorithm} not supported by walfs; use CRC32C or SHA256"
    )]
    UnsupportedChecksum {
        path: String,
        algorithm: &'static str,
    },
    #[error(
        "backup does not match its manifest: {total} problem(s): {}",
        describe_problems(.total, .problems)
    )]
    Mismatch {
        /// How many problems there are in all.
        total: usize,
        /// The first few of them.
        problems: Vec<String>,
    },
}

fn describe_problems(total: &usize, shown: &[String]) -> String {
    let mut s = shown.join("; ");
    if *total > shown.len() {
        s.push_str(&format!("; and {} more", total - shown.len()));
    }
    s
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "PostgreSQL-Backup-Manifest-Version")]
    version: u32,
    #[serde(rename = "System-Identifier")]
    system_identifier: Option<u64>,
    #[serde(rename = "Files")]
    files: Vec<RawFile>,
    #[serde(rename = "WAL-Ranges")]
    wal_ranges: Vec<RawWalRange>,
    #[serde(rename = "Manifest-Checksum")]
    manifest_checksum: String,
}

#[derive(Deserialize)]
struct RawFile {
    #[serde(rename = "Path")]
    path: Option<String>,
    #[serde(rename = "Encoded-Path")]
    encoded_path: Option<String>,
    #[serde(rename = "Size")]
    size: u64,
    #[serde(rename = "Checksum-Algorithm")]
    checksum_algorithm: Option<String>,
    #[serde(rename = "Checksum")]
    checksum: Option<String>,
}

#[derive(Deserialize)]
struct RawWalRange {
    #[serde(rename = "Timeline")]
    timeline: u32,
    #[serde(rename = "Start-LSN")]
    start: String,
    #[serde(rename = "End-LSN")]
    end: String,
}

impl Manifest {
    /// Parses `backup_manifest` and checks its `Manifest-Checksum`.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let raw: RawManifest = serde_json::from_slice(bytes)?;
        check_manifest_checksum(bytes, &raw.manifest_checksum)?;
        match (raw.version, raw.system_identifier) {
            (1, None) | (2, Some(_)) => {}
            (1, Some(_)) => {
                return Err(ManifestError::Invalid(
                    "a version 1 manifest has a System-Identifier (only version 2 has one)".into(),
                ))
            }
            (2, None) => {
                return Err(ManifestError::Invalid(
                    "a version 2 manifest lacks its System-Identifier".into(),
                ))
            }
            (v, _) => {
                return Err(ManifestError::Invalid(format!(
                    "unsupported manifest version {v} (walfs knows 1 and 2)"
                )))
            }
        }
        let mut files = BTreeMap::new();
        for (i, f) in raw.files.into_iter().enumerate() {
            let path = manifest_path(i, &f)?;
            let bad = |reason: String| ManifestError::BadFile {
                path: format!("{path:?}"),
                reason,
            };
            let checksum = parse_checksum(f.checksum_algorithm.as_deref(), f.checksum.as_deref())
                .map_err(bad)?;
            if files.contains_key(&path) {
                return Err(bad("listed more than once".into()));
            }
            files.insert(
                path,
                ManifestFile {
                    size: f.size,
                    checksum,
                },
            );
        }
        let mut wal_ranges = Vec::with_capacity(raw.wal_ranges.len());
        for (i, r) in raw.wal_ranges.iter().enumerate() {
            let lsn = |s: &str| {
                s.parse::<Lsn>()
                    .map_err(|e| ManifestError::Invalid(format!("WAL-Ranges[{i}]: {e}")))
            };
            let (start, end) = (lsn(&r.start)?, lsn(&r.end)?);
            if start > end {
                return Err(ManifestError::Invalid(format!(
                    "WAL-Ranges[{i}]: Start-LSN {start} is after End-LSN {end}"
                )));
            }
            wal_ranges.push(WalRange {
                timeline: r.timeline,
                start,
                end,
            });
        }
        Ok(Manifest {
            version: raw.version,
            system_identifier: raw.system_identifier,
            files,
            wal_ranges,
        })
    }
}

/// The manifest's SHA-256 covers every byte before the `"Manifest-Checksum"` line, up to and
/// including the newline that ends the line before it.
fn check_manifest_checksum(bytes: &[u8], expected_hex: &str) -> Result<(), ManifestError> {
    const MARKER: &[u8] = b"\n\"Manifest-Checksum\"";
    let pos = bytes
        .windows(MARKER.len())
        .rposition(|w| w == MARKER)
        .ok_or_else(|| {
            ManifestError::Invalid("no line starts with \"Manifest-Checksum\"".into())
        })?;
    let covered = bytes.get(..=pos).unwrap_or_default();
    let actual: [u8; 32] = Sha256::digest(covered).into();
    let expected = hex::decode(expected_hex)
        .ok()
        .filter(|e| e.len() == 32)
        .ok_or_else(|| {
            ManifestError::Invalid(format!(
                "Manifest-Checksum {expected_hex:?} is not a SHA-256 (64 hex digits)"
            ))
        })?;
    if expected[..] != actual[..] {
        return Err(ManifestError::ChecksumMismatch {
            expected: expected_hex.to_string(),
            actual: hex::encode(actual),
        });
    }
    Ok(())
}

/// The path of the `i`th file entry, named as the module doc says.
fn manifest_path(i: usize, f: &RawFile) -> Result<String, ManifestError> {
    let bad = |reason: &str| ManifestError::BadFile {
        path: format!("Files[{i}]"),
        reason: reason.into(),
    };
    let bytes = match (&f.path, &f.encoded_path) {
        (Some(p), None) => p.as_bytes().to_vec(),
        (None, Some(h)) => hex::decode(h).map_err(|_| bad("Encoded-Path is not hex"))?,
        (Some(_), Some(_)) => return Err(bad("has both Path and Encoded-Path")),
        (None, None) => return Err(bad("has neither Path nor Encoded-Path")),
    };
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(bad("empty path, or a path containing NUL"));
    }
    Ok(path_name(bytes))
}

/// A path's name: the path itself when it is UTF-8, else [`NON_UTF8_PREFIX`] and its hex.
fn path_name(bytes: Vec<u8>) -> String {
    match String::from_utf8(bytes) {
        Ok(s) => s,
        Err(e) => format!("{NON_UTF8_PREFIX}{}", hex::encode(e.as_bytes())),
    }
}

/// A file entry's checksum; `Err` is the reason it is malformed.
fn parse_checksum(algorithm: Option<&str>, hex: Option<&str>) -> Result<Option<Checksum>, String> {
    let algorithm = match algorithm {
        Some(a) if !a.eq_ignore_ascii_case("NONE") => a.to_ascii_uppercase(),
        _ => {
            return match hex {
                Some(_) => Err("has a Checksum but no Checksum-Algorithm".into()),
                None => Ok(None),
            }
        }
    };
    type Make = fn(Vec<u8>) -> Option<Checksum>;
    let (len, make): (usize, Make) = match algorithm.as_str() {
        "CRC32C" => (4, |b| <[u8; 4]>::try_from(b).ok().map(Checksum::Crc32c)),
        "SHA224" => (28, |b| Some(Checksum::Sha224(b))),
        "SHA256" => (32, |b| Some(Checksum::Sha256(b))),
        "SHA384" => (48, |b| Some(Checksum::Sha384(b))),
        "SHA512" => (64, |b| Some(Checksum::Sha512(b))),
        _ => return Err(format!("unknown Checksum-Algorithm {algorithm:?}")),
    };
    let hex = hex.ok_or_else(|| format!("Checksum-Algorithm {algorithm} but no Checksum"))?;
    let bytes = hex::decode(hex).map_err(|_| format!("Checksum {hex:?} is not hex"))?;
    let n = bytes.len();
    match make(bytes) {
        Some(c) if n == len => Ok(Some(c)),
        _ => Err(format!(
            "{algorithm} Checksum {hex:?} has {n} bytes, not {len}"
        )),
    }
}

/// A regular file found in a backup archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TarFile {
    /// Named as the manifest names it (see the module doc).
    pub path: String,
    pub size: u64,
    /// CRC-32C of the contents (the finished value, as `crc32c::crc32c` returns it).
    pub crc32c: u32,
    /// SHA-256 of the contents (always computed by [`TarChecker`]).
    pub sha256: Option<[u8; 32]>,
}

/// One tar archive of the backup as it streams: `base.tar` (paths relative to PGDATA) or
/// `<oid>.tar` (a tablespace; its member paths are reported as
/// `pg_tblspc/<oid>/<member path>`, which is how the manifest names them).
///
/// Reads ustar, GNU and pax archives: long names from GNU `L` entries and pax `path=` records,
/// sizes in octal, GNU base-256 or pax `size=`. Regular files are checksummed; directories,
/// links and device entries are skipped; any other entry type is an error. After the first
/// all-zero block only zeros may follow; an archive may also end right after a member with no
/// end blocks at all (servers before PostgreSQL 15 leave them to the client).
pub struct TarChecker {
    archive: String,
    /// Put before every member path: empty, or `pg_tblspc/<oid>/`.
    prefix: Vec<u8>,
    state: State,
    /// The header being read: its first `header_len` bytes.
    header: [u8; BLOCK],
    header_len: usize,
    /// Bytes consumed so far.
    offset: u64,
    /// From a GNU `L` entry, for the next member.
    long_name: Option<Vec<u8>>,
    /// From a pax `x` entry, for the next member.
    pax_path: Option<Vec<u8>>,
    pax_size: Option<u64>,
    files: Vec<TarFile>,
}

enum State {
    /// Reading a header block.
    Header,
    /// Reading a member's data.
    Data {
        body: Body,
        remaining: u64,
        padding: u64,
    },
    /// Skipping the padding after a member's data.
    Padding { remaining: u64 },
    /// After the end-of-archive block: only zeros may follow.
    End,
    /// An error was returned; the archive is rejected.
    Failed,
}

/// What a member's data is for.
enum Body {
    File(Box<FileSum>),
    /// GNU `L`: the next member's name.
    LongName(Vec<u8>),
    /// pax `x`: records for the next member.
    Pax(Vec<u8>),
    /// Data nobody needs (GNU `K`, pax `g`).
    Skip,
}

struct FileSum {
    path: String,
    size: u64,
    crc32c: u32,
    sha256: Sha256,
}

impl FileSum {
    fn finish(self) -> TarFile {
        TarFile {
            path: self.path,
            size: self.size,
            crc32c: self.crc32c,
            sha256: Some(self.sha256.finalize().into()),
        }
    }
}

impl TarChecker {
    /// A checker for the archive the server named `archive_name`.
    pub fn new(archive_name: &str) -> Result<TarChecker, ManifestError> {
        let prefix = if archive_name == "base.tar" {
            Vec::new()
        } else {
            match archive_name.strip_suffix(".tar") {
                Some(oid) if !oid.is_empty() && oid.bytes().all(|b| b.is_ascii_digit()) => {
                    format!("pg_tblspc/{oid}/").into_bytes()
                }
                _ => return Err(ManifestError::ArchiveName(archive_name.to_string())),
            }
        };
        Ok(TarChecker {
            archive: archive_name.to_string(),
            prefix,
            state: State::Header,
            header: [0; BLOCK],
            header_len: 0,
            offset: 0,
            long_name: None,
            pax_path: None,
            pax_size: None,
            files: Vec::new(),
        })
    }

    /// Feeds the next bytes of the archive, split anywhere.
    pub fn update(&mut self, data: &[u8]) -> Result<(), ManifestError> {
        if let State::Failed = self.state {
            return Err(self.rejected());
        }
        let mut data = data;
        while !data.is_empty() {
            // Left as Failed if anything below returns an error.
            match std::mem::replace(&mut self.state, State::Failed) {
                State::Failed => return Err(self.rejected()),
                State::Header => {
                    let take = (BLOCK - self.header_len).min(data.len());
                    let (chunk, rest) = data.split_at(take);
                    // `take` fits: it is at most what the header still lacks.
                    let Some(slot) = self.header.get_mut(self.header_len..self.header_len + take)
                    else {
                        return Err(self.error(self.offset, "internal: header overflow"));
                    };
                    slot.copy_from_slice(chunk);
                    self.header_len += take;
                    self.offset += take as u64;
                    data = rest;
                    self.state = if self.header_len == BLOCK {
                        self.header_len = 0;
                        self.on_header()?
                    } else {
                        State::Header
                    };
                }
                State::Data {
                    mut body,
                    remaining,
                    padding,
                } => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(data.len());
                    let (chunk, rest) = data.split_at(take);
                    match &mut body {
                        Body::File(f) => {
                            f.crc32c = crc32c::crc32c_append(f.crc32c, chunk);
                            f.sha256.update(chunk);
                        }
                        // Capacity was checked against MAX_META_LEN when the header was read.
                        Body::LongName(buf) | Body::Pax(buf) => buf.extend_from_slice(chunk),
                        Body::Skip => {}
                    }
                    self.offset += take as u64;
                    data = rest;
                    let remaining = remaining - take as u64;
                    self.state = if remaining == 0 {
                        self.end_body(body)?;
                        after_data(padding)
                    } else {
                        State::Data {
                            body,
                            remaining,
                            padding,
                        }
                    };
                }
                State::Padding { remaining } => {
                    let take = usize::try_from(remaining)
                        .unwrap_or(usize::MAX)
                        .min(data.len());
                    self.offset += take as u64;
                    data = data.get(take..).unwrap_or_default();
                    self.state = after_data(remaining - take as u64);
                }
                State::End => {
                    if let Some(i) = data.iter().position(|&b| b != 0) {
                        let at = self.offset + i as u64;
                        return Err(self.error(at, "non-zero data after the end-of-archive block"));
                    }
                    self.offset += data.len() as u64;
                    data = &[];
                    self.state = State::End;
                }
            }
        }
        Ok(())
    }

    /// The regular files of the archive, once it has ended.
    pub fn finish(mut self) -> Result<Vec<TarFile>, ManifestError> {
        match std::mem::replace(&mut self.state, State::Failed) {
            State::Header if self.header_len == 0 => {
                if self.long_name.is_some() || self.pax_path.is_some() || self.pax_size.is_some() {
                    return Err(self.error(
                        self.offset,
                        "archive ends after a long-name or pax header, before its member",
                    ));
                }
                Ok(self.files)
            }
            State::End => Ok(self.files),
            State::Header => Err(self.error(
                self.offset,
                format!(
                    "archive ends inside a header ({} of {BLOCK} bytes)",
                    self.header_len
                ),
            )),
            State::Data {
                body, remaining, ..
            } => {
                let what = match &body {
                    Body::File(f) => format!("member {:?}", f.path),
                    Body::LongName(_) => "a GNU long-name entry".to_string(),
                    Body::Pax(_) => "a pax header".to_string(),
                    Body::Skip => "an extension entry".to_string(),
                };
                Err(self.error(
                    self.offset,
                    format!("archive ends inside {what}, {remaining} bytes short"),
                ))
            }
            State::Padding { remaining } => Err(self.error(
                self.offset,
                format!("archive ends inside the padding after a member, {remaining} bytes short"),
            )),
            State::Failed => Err(self.rejected()),
        }
    }

    fn error(&self, offset: u64, reason: impl Into<String>) -> ManifestError {
        ManifestError::Tar {
            archive: self.archive.clone(),
            offset,
            reason: reason.into(),
        }
    }

    /// A header's size field, or the error that it is malformed.
    fn size(&self, field: Option<u64>, at: u64) -> Result<u64, ManifestError> {
        field.ok_or_else(|| self.error(at, "malformed size in tar header"))
    }

    fn rejected(&self) -> ManifestError {
        self.error(
            self.offset,
            "the archive was already rejected by an earlier error",
        )
    }

    /// Handles the complete header in `self.header`; returns the state that follows it.
    fn on_header(&mut self) -> Result<State, ManifestError> {
        let h = self.header;
        let at = self.offset.saturating_sub(BLOCK as u64);
        if h.iter().all(|&b| b == 0) {
            if self.long_name.is_some() || self.pax_path.is_some() || self.pax_size.is_some() {
                return Err(self.error(
                    at,
                    "end-of-archive block right after a long-name or pax header",
                ));
            }
            return Ok(State::End);
        }
        if !header_checksum_ok(&h) {
            return Err(self.error(at, "tar header checksum mismatch (corrupt header)"));
        }
        let typeflag = h[156];
        let field_size = parse_number(&h[124..136]);
        match typeflag {
            b'x' | b'L' => {
                let size = self.size(field_size, at)?;
                if size > MAX_META_LEN {
                    return Err(self.error(
                        at,
                        format!(
                            "{} entry of {size} bytes (walfs accepts at most {MAX_META_LEN})",
                            if typeflag == b'x' {
                                "pax header"
                            } else {
                                "GNU long-name"
                            }
                        ),
                    ));
                }
                let buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
                let body = if typeflag == b'x' {
                    Body::Pax(buf)
                } else {
                    Body::LongName(buf)
                };
                self.start_body(body, size)
            }
            b'g' | b'K' => {
                let size = self.size(field_size, at)?;
                self.start_body(Body::Skip, size)
            }
            b'0' | 0 | b'7' => {
                let size = match self.pax_size.take() {
                    Some(s) => s,
                    None => self.size(field_size, at)?,
                };
                let name = self.entry_name(&h);
                let normalized = normalize(&name);
                if normalized.is_empty() || normalized.contains(&0) {
                    return Err(self.error(
                        at,
                        format!("regular file with a bad name {:?}", path_name(name.clone())),
                    ));
                }
                let mut full = self.prefix.clone();
                full.extend_from_slice(normalized);
                let file = FileSum {
                    path: path_name(full),
                    size,
                    crc32c: 0,
                    sha256: Sha256::new(),
                };
                self.start_body(Body::File(Box::new(file)), size)
            }
            // Hard link, symlink, character and block device, directory, FIFO: no data.
            b'1'..=b'6' => {
                self.entry_name(&h);
                self.pax_size = None;
                Ok(State::Header)
            }
            other => {
                let name = path_name(self.entry_name(&h));
                Err(self.error(
                    at,
                    format!(
                        "unsupported tar entry type {:?} for {name:?}",
                        char::from(other)
                    ),
                ))
            }
        }
    }

    /// The state for a member with `size` bytes of data; a member without data ends at once.
    fn start_body(&mut self, body: Body, size: u64) -> Result<State, ManifestError> {
        let padding = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        if size == 0 {
            self.end_body(body)?;
            return Ok(State::Header);
        }
        Ok(State::Data {
            body,
            remaining: size,
            padding,
        })
    }

    /// A member's data is complete.
    fn end_body(&mut self, body: Body) -> Result<(), ManifestError> {
        match body {
            Body::File(f) => self.files.push(f.finish()),
            Body::LongName(buf) => self.long_name = Some(until_nul(&buf).to_vec()),
            Body::Pax(buf) => {
                parse_pax(&buf, &mut self.pax_path, &mut self.pax_size)
                    .map_err(|reason| self.error(self.offset, reason))?;
            }
            Body::Skip => {}
        }
        Ok(())
    }

    /// The member name of the header `h`, consuming any pending long name; not normalized.
    fn entry_name(&mut self, h: &[u8; BLOCK]) -> Vec<u8> {
        let long_name = self.long_name.take();
        if let Some(p) = self.pax_path.take() {
            return p;
        }
        if let Some(l) = long_name {
            return l;
        }
        let name = until_nul(&h[..100]);
        // POSIX ustar ("ustar\0") has a prefix field; GNU ("ustar  \0") uses the bytes otherwise.
        let prefix = if &h[257..263] == b"ustar\0" {
            until_nul(&h[345..500])
        } else {
            &[]
        };
        if prefix.is_empty() {
            name.to_vec()
        } else {
            [prefix, b"/", name].concat()
        }
    }
}

/// The state after a member's data, with `padding` bytes of padding still to skip.
fn after_data(padding: u64) -> State {
    if padding == 0 {
        State::Header
    } else {
        State::Padding { remaining: padding }
    }
}

/// The bytes of a NUL-terminated field before its first NUL.
fn until_nul(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(n) => field.get(..n).unwrap_or(field),
        None => field,
    }
}

/// A member path without leading `./` and trailing `/`.
fn normalize(mut name: &[u8]) -> &[u8] {
    while let Some(rest) = name.strip_prefix(b"./") {
        name = rest;
    }
    while let Some(rest) = name.strip_suffix(b"/") {
        name = rest;
    }
    name
}

/// Whether the header's checksum field matches its bytes (summed with the field as spaces).
/// Sums as unsigned bytes, as POSIX says, or as signed ones, as some old tars did.
fn header_checksum_ok(h: &[u8; BLOCK]) -> bool {
    let Some(stored) = parse_octal(&h[148..156]) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in h.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    stored == unsigned || i64::try_from(stored) == Ok(signed)
}

/// A numeric header field: octal ASCII, or GNU base-256 when the first byte's high bit is set.
fn parse_number(field: &[u8]) -> Option<u64> {
    let (&first, rest) = field.split_first()?;
    if first & 0x80 == 0 {
        return parse_octal(field);
    }
    if first & 0x40 != 0 {
        return None; // negative
    }
    rest.iter().try_fold(u64::from(first & 0x3f), |v, &b| {
        v.checked_mul(256)?.checked_add(u64::from(b))
    })
}

/// Octal digits, after optional leading spaces, ended by the field's end, a space or a NUL.
fn parse_octal(field: &[u8]) -> Option<u64> {
    let digits_start = field.iter().position(|&b| b != b' ')?;
    let field = field.get(digits_start..)?;
    let digits_len = field
        .iter()
        .position(|b| !(b'0'..=b'7').contains(b))
        .unwrap_or(field.len());
    let (digits, tail) = field.split_at(digits_len);
    if digits.is_empty() || !tail.iter().all(|&b| b == b' ' || b == 0) {
        return None;
    }
    digits.iter().try_fold(0u64, |v, &d| {
        v.checked_mul(8)?.checked_add(u64::from(d - b'0'))
    })
}

/// Reads the records (`"<len> <key>=<value>\n"`) of a pax extended header: `path` and `size`
/// apply to the next member, other keys are ignored.
fn parse_pax(
    mut data: &[u8],
    path: &mut Option<Vec<u8>>,
    size: &mut Option<u64>,
) -> Result<(), String> {
    let bad = || "malformed pax extended header".to_string();
    while !data.is_empty() {
        let space = data.iter().position(|&b| b == b' ').ok_or_else(bad)?;
        let len: usize = std::str::from_utf8(data.get(..space).ok_or_else(bad)?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(bad)?;
        if len <= space + 1 {
            return Err(bad());
        }
        let record = data
            .get(space + 1..len)
            .and_then(|r| r.strip_suffix(b"\n"))
            .ok_or_else(bad)?;
        let eq = record.iter().position(|&b| b == b'=').ok_or_else(bad)?;
        let (key, value) = (
            record.get(..eq).unwrap_or_default(),
            record.get(eq + 1..).unwrap_or_default(),
        );
        match key {
            b"path" if value.is_empty() => *path = None,
            b"path" => *path = Some(value.to_vec()),
            b"size" => {
                let s = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| format!("bad pax size {:?}", String::from_utf8_lossy(value)))?;
                *size = Some(s);
            }
            _ => {}
        }
        data = data.get(len..).unwrap_or_default();
    }
    Ok(())
}

/// Whether pg_verifybackup would ignore `path` in a backup: the path or the tree under it.
fn ignored(path: &str) -> bool {
    IGNORED.iter().any(|i| {
        path.strip_prefix(i)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// Every manifest file must be in the archives with the same size and checksum; every regular
/// file in the archives must be in the manifest, except the paths pg_verifybackup ignores
/// (`backup_manifest`, `pg_wal/` contents, `postgresql.auto.conf`, `recovery.signal`,
/// `standby.signal`). Returns how many manifest files were verified, or an error listing the
/// first few problems (missing, extra, duplicate, size mismatch, checksum mismatch).
///
/// CRC32C: PostgreSQL writes the finished `uint32` as it lies in the *server's* memory
/// (`pg_checksum_final` memcpy's it), then hex, so a little-endian server writes
/// crc32c("123456789") = 0xE3069283 as `839206e3` and a big-endian one as `e3069283`. The
/// manifest does not say which, so either byte order is accepted: a corruption that happens to
/// yield the byte-swapped CRC is a 1 in 2^32 event.
pub fn verify(manifest: &Manifest, files: &[TarFile]) -> Result<usize, ManifestError> {
    let unsupported = |path: &str, c: &Checksum| ManifestError::UnsupportedChecksum {
        path: path.to_string(),
        algorithm: c.algorithm(),
    };
    for (path, f) in &manifest.files {
        if let Some(c @ (Checksum::Sha224(_) | Checksum::Sha384(_) | Checksum::Sha512(_))) =
            &f.checksum
        {
            return Err(unsupported(path, c));
        }
    }
    let mut total = 0;
    let mut problems = Vec::new();
    let mut problem = |p: String| {
        total += 1;
        if problems.len() < MAX_PROBLEMS {
            problems.push(p);
        }
    };
    let mut in_archives: BTreeMap<&str, &TarFile> = BTreeMap::new();
    for f in files {
        if in_archives.insert(&f.path, f).is_some() {
            problem(format!("{:?} is in the archives more than once", f.path));
        }
    }
    for (path, want) in &manifest.files {
        let Some(got) = in_archives.get(path.as_str()) else {
            problem(format!("{path:?} is in the manifest but not in the backup"));
            continue;
        };
        if got.size != want.size {
            problem(format!(
                "{path:?} has {} bytes, the manifest says {}",
                got.size, want.size
            ));
            continue;
        }
        let mismatch = match &want.checksum {
            None => None,
            Some(Checksum::Crc32c(expected)) => {
                let ok =
                    *expected == got.crc32c.to_le_bytes() || *expected == got.crc32c.to_be_bytes();
                (!ok).then(|| {
                    format!(
                        "{path:?}: CRC32C {:08x} in the backup, the manifest says {}",
                        got.crc32c,
                        hex::encode(expected)
                    )
                })
            }
            Some(Checksum::Sha256(expected)) => match &got.sha256 {
                Some(actual) if actual[..] == expected[..] => None,
                Some(actual) => Some(format!(
                    "{path:?}: SHA256 {} in the backup, the manifest says {}",
                    hex::encode(actual),
                    hex::encode(expected)
                )),
                None => Some(format!(
                    "{path:?}: no SHA256 was computed for the backup's copy"
                )),
            },
            Some(other) => return Err(unsupported(path, other)),
        };
        if let Some(p) = mismatch {
            problem(p);
        }
    }
    for path in in_archives.keys() {
        if !manifest.files.contains_key(*path) && !ignored(path) {
            problem(format!("{path:?} is in the backup but not in the manifest"));
        }
    }
    if total == 0 {
        Ok(manifest.files.len())
    } else {
        Err(ManifestError::Mismatch { total, problems })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // ---- tar building ----

    fn write_octal(h: &mut [u8; BLOCK], at: usize, width: usize, v: u64) {
        let s = format!("{v:0w$o}\0", w = width - 1);
        h[at..at + width].copy_from_slice(s.as_bytes());
    }

    fn set_checksum(h: &mut [u8; BLOCK]) {
        h[148..156].fill(b' ');
        let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
    }

    /// A POSIX ustar header, as PostgreSQL writes them.
    fn header_raw(prefix: &[u8], name: &[u8], typeflag: u8, size: u64) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..name.len()].copy_from_slice(name);
        write_octal(&mut h, 100, 8, 0o600);
        write_octal(&mut h, 108, 8, 26);
        write_octal(&mut h, 116, 8, 26);
        write_octal(&mut h, 124, 12, size);
        write_octal(&mut h, 136, 12, 1_700_000_000);
        h[156] = typeflag;
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[345..345 + prefix.len()].copy_from_slice(prefix);
        set_checksum(&mut h);
        h
    }

    fn pad(tar: &mut Vec<u8>) {
        while tar.len() % BLOCK != 0 {
            tar.push(0);
        }
    }

    fn entry(tar: &mut Vec<u8>, name: &str, typeflag: u8, data: &[u8]) {
        tar.extend_from_slice(&header_raw(
            b"",
            name.as_bytes(),
            typeflag,
            data.len() as u64,
        ));
        tar.extend_from_slice(data);
        pad(tar);
    }

    fn file(tar: &mut Vec<u8>, name: &str, data: &[u8]) {
        entry(tar, name, b'0', data);
    }

    fn end(tar: &mut Vec<u8>) {
        tar.extend_from_slice(&[0; 2 * BLOCK]);
    }

    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        // The length counts itself: find the fixed point.
        let body = 1 + key.len() + 1 + value.len() + 1;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        let mut r = format!("{len} {key}=").into_bytes();
        r.extend_from_slice(value);
        r.push(b'\n');
        assert_eq!(r.len(), len);
        r
    }

    fn check(archive: &str, tar: &[u8]) -> Result<Vec<TarFile>, ManifestError> {
        let mut c = TarChecker::new(archive)?;
        c.update(tar)?;
        c.finish()
    }

    fn check_split(archive: &str, tar: &[u8], chunk: usize) -> Result<Vec<TarFile>, ManifestError> {
        let mut c = TarChecker::new(archive)?;
        for piece in tar.chunks(chunk) {
            c.update(piece)?;
        }
        c.finish()
    }

    fn sha(data: &[u8]) -> Option<[u8; 32]> {
        Some(Sha256::digest(data).into())
    }

    fn tar_file(path: &str, data: &[u8]) -> TarFile {
        TarFile {
            path: path.into(),
            size: data.len() as u64,
            crc32c: crc32c::crc32c(data),
            sha256: sha(data),
        }
    }

    /// An archive with every kind of entry the checker knows.
    fn rich_tar() -> (Vec<u8>, Vec<TarFile>) {
        let mut t = Vec::new();
        let big: Vec<u8> = (0..1500u32).map(|i| (i * 7 % 251) as u8).collect();
        let long_name = format!("base/1/{}", "n".repeat(150));
        let split_name = format!("{}/file", "d".repeat(120));
        entry(&mut t, "./", b'5', b"");
        entry(&mut t, "base/", b'5', b"");
        file(&mut t, "PG_VERSION", b"15\n");
        file(&mut t, "./base/1/1259", &big);
        file(&mut t, "base/1/empty", b"");
        entry(&mut t, "pg_tblspc/16385", b'2', b"");
        entry(&mut t, "base/1/hardlink", b'1', b"");
        // A pax global header: skipped.
        entry(
            &mut t,
            "pax_global_header",
            b'g',
            &pax_record("comment", b"hello"),
        );
        // A GNU long name.
        let mut name_data = long_name.clone().into_bytes();
        name_data.push(0);
        entry(&mut t, "././@LongLink", b'L', &name_data);
        file(&mut t, "truncated-name", b"long");
        // A pax path and size (the header's size field says 0).
        let pax: Vec<u8> = [
            pax_record("mtime", b"1700000000.5"),
            pax_record("path", b"global/pax_named"),
            pax_record("size", b"5"),
        ]
        .concat();
        entry(&mut t, "PaxHeaders/x", b'x', &pax);
        t.extend_from_slice(&header_raw(b"", b"ignored", b'0', 0));
        t.extend_from_slice(b"12345");
        pad(&mut t);
        // A ustar prefix/name split.
        let (prefix, name) = split_name.split_at(120);
        t.extend_from_slice(&header_raw(
            prefix.as_bytes(),
            &name.as_bytes()[1..],
            b'0',
            3,
        ));
        t.extend_from_slice(b"abc");
        pad(&mut t);
        // A GNU base-256 size.
        let mut h = header_raw(b"", b"global/b256", b'0', 0);
        h[124..136].fill(0);
        h[124] = 0x80;
        h[135] = 2;
        set_checksum(&mut h);
        t.extend_from_slice(&h);
        t.extend_from_slice(b"hi");
        pad(&mut t);
        end(&mut t);
        let expected = vec![
            tar_file("PG_VERSION", b"15\n"),
            tar_file("base/1/1259", &big),
            tar_file("base/1/empty", b""),
            tar_file(&long_name, b"long"),
            tar_file("global/pax_named", b"12345"),
            tar_file(&split_name, b"abc"),
            tar_file("global/b256", b"hi"),
        ];
        (t, expected)
    }

    #[test]
    fn any_split_gives_the_same_files() {
        let (tar, expected) = rich_tar();
        let whole = check("base.tar", &tar).unwrap();
        assert_eq!(whole, expected);
        for chunk in 1..=7 {
            assert_eq!(
                check_split("base.tar", &tar, chunk).unwrap(),
                expected,
                "chunk {chunk}"
            );
        }
        assert_eq!(check_split("base.tar", &tar, 511).unwrap(), expected);
        assert_eq!(check_split("base.tar", &tar, 513).unwrap(), expected);
    }

    #[test]
    fn damaged_archives_never_panic() {
        let (tar, _) = rich_tar();
        for i in (0..tar.len()).step_by(3) {
            let mut t = tar.clone();
            t[i] ^= 0xa5;
            // An error, or (damage in member data or padding) other checksums: never a panic.
            let _ = check("base.tar", &t);
            let _ = check("base.tar", &tar[..i]);
        }
    }

    #[test]
    fn corrupt_header_checksum_is_an_error() {
        let mut t = Vec::new();
        file(&mut t, "PG_VERSION", b"15\n");
        end(&mut t);
        t[3] ^= 0x01; // the name, covered by the checksum
        let e = check("base.tar", &t).unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
        assert!(e.to_string().contains("base.tar"), "{e}");
        // The checksum field itself.
        let mut t2 = Vec::new();
        file(&mut t2, "PG_VERSION", b"15\n");
        t2[153] = if t2[153] == b'0' { b'1' } else { b'0' };
        assert!(check("base.tar", &t2).is_err());
        // After an error the checker stays failed.
        let mut c = TarChecker::new("base.tar").unwrap();
        assert!(c.update(&t).is_err());
        assert!(c.update(&[0; BLOCK]).is_err());
        assert!(c.finish().is_err());
    }

    #[test]
    fn truncation_is_an_error() {
        let mut t = Vec::new();
        file(&mut t, "PG_VERSION", b"15\n");
        file(&mut t, "base/1/1259", &[7; 1000]);
        // Mid-member.
        let e = check("base.tar", &t[..BLOCK * 3 + 10]).unwrap_err();
        assert!(e.to_string().contains("base/1/1259"), "{e}");
        // Mid-header.
        assert!(check("base.tar", &t[..BLOCK + 100]).is_err());
        // Inside the padding after the last member.
        assert!(check("base.tar", &t[..t.len() - 5]).is_err());
        // After a long-name entry whose member never comes.
        let mut l = Vec::new();
        entry(&mut l, "././@LongLink", b'L', b"some/long/name\0");
        assert!(check("base.tar", &l).is_err());
        end(&mut l);
        assert!(check("base.tar", &l).is_err());
    }

    #[test]
    fn end_of_archive() {
        let mut t = Vec::new();
        file(&mut t, "PG_VERSION", b"15\n");
        // Before PostgreSQL 15 the server sends no end blocks.
        assert_eq!(check("base.tar", &t).unwrap().len(), 1);
        // An empty archive.
        assert!(check("base.tar", b"").unwrap().is_empty());
        end(&mut t);
        t.extend_from_slice(&[0; 10 * BLOCK + 7]);
        assert_eq!(check("base.tar", &t).unwrap().len(), 1);
        let n = t.len();
        t[n - 100] = 1;
        let e = check("base.tar", &t).unwrap_err();
        assert!(e.to_string().contains("after the end-of-archive"), "{e}");
        // A member after the end block is data after the end too.
        let mut t = Vec::new();
        end(&mut t);
        file(&mut t, "PG_VERSION", b"15\n");
        assert!(check("base.tar", &t).is_err());
    }

    #[test]
    fn tablespace_archives() {
        let mut t = Vec::new();
        entry(&mut t, "PG_15_202209061/", b'5', b"");
        file(&mut t, "PG_15_202209061/5/16386", b"x");
        end(&mut t);
        let files = check("16385.tar", &t).unwrap();
        assert_eq!(
            files,
            vec![tar_file("pg_tblspc/16385/PG_15_202209061/5/16386", b"x")]
        );
        for bad in [
            "foo.tar",
            ".tar",
            "base.tar.gz",
            "12a.tar",
            "16385",
            "base",
            "",
        ] {
            assert!(
                matches!(TarChecker::new(bad), Err(ManifestError::ArchiveName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn unsupported_and_oversized_entries_are_errors() {
        let mut t = Vec::new();
        entry(&mut t, "sparse", b'S', b"");
        let e = check("base.tar", &t).unwrap_err();
        assert!(
            e.to_string().contains("unsupported tar entry type 'S'"),
            "{e}"
        );

        let mut t = Vec::new();
        let big = vec![b'a'; MAX_META_LEN as usize + 1];
        entry(&mut t, "././@LongLink", b'L', &big);
        assert!(check("base.tar", &t).is_err());

        let mut t = Vec::new();
        entry(&mut t, "PaxHeaders/x", b'x', b"garbage");
        file(&mut t, "a", b"");
        assert!(check("base.tar", &t).is_err());

        // A regular file with no name.
        let mut t = Vec::new();
        file(&mut t, "./", b"");
        assert!(check("base.tar", &t).is_err());
    }

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_octal(b"00000000012\0"), Some(10));
        assert_eq!(parse_octal(b"  17 \0"), Some(15));
        assert_eq!(parse_octal(b"0000001"), Some(1));
        assert_eq!(parse_octal(b"        "), None);
        assert_eq!(parse_octal(b"\0\0\0\0"), None);
        assert_eq!(parse_octal(b"0008"), None);
        assert_eq!(parse_octal(b"12 3"), None);
        assert_eq!(parse_octal(b"77777777777777777777777"), None);
        assert_eq!(
            parse_number(&[0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]),
            Some(256)
        );
        assert_eq!(parse_number(&[0xff; 12]), None);
        assert_eq!(
            parse_number(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
        assert_eq!(parse_number(b""), None);
    }

    #[test]
    fn non_utf8_names_match_encoded_paths() {
        let mut t = Vec::new();
        let name = b"base/1/caf\xe9";
        t.extend_from_slice(&header_raw(b"", name, b'0', 1));
        t.push(b'z');
        pad(&mut t);
        end(&mut t);
        let files = check("base.tar", &t).unwrap();
        let expected = format!("\u{0}hex:{}", hex::encode(name));
        assert_eq!(files[0].path, expected);

        let body = format!(
            "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n\
             {{ \"Encoded-Path\": \"{}\", \"Size\": 1, \"Last-Modified\": \"2024-01-01 00:00:00 GMT\", \
             \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}\n],\n\
             \"WAL-Ranges\": [\n],\n",
            hex::encode(name),
            hex::encode(crc32c::crc32c(b"z").to_le_bytes())
        );
        let m = Manifest::parse(with_checksum(&body).as_bytes()).unwrap();
        assert!(m.files.contains_key(&expected));
        assert_eq!(verify(&m, &files).unwrap(), 1);
    }

    // ---- checksums ----

    #[test]
    fn crc32c_byte_order_is_postgres() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        // pg_checksum_final on a little-endian server.
        assert_eq!(
            hex::encode(crc32c::crc32c(b"123456789").to_le_bytes()),
            "839206e3"
        );
        // Incremental (as TarChecker computes it) equals one-shot.
        let c = crc32c::crc32c_append(crc32c::crc32c_append(0, b"1234"), b"56789");
        assert_eq!(c, 0xE306_9283);
        // What a real (little-endian) PostgreSQL manifest says for an all-zero 8 KiB page.
        assert_eq!(
            hex::encode(crc32c::crc32c(&[0; 8192]).to_le_bytes()),
            "23464490"
        );
    }

    // ---- manifests ----

    /// The manifest `body` (everything up to the checksum line) with its checksum line added,
    /// as PostgreSQL ends it.
    fn with_checksum(body: &str) -> String {
        let sum = hex::encode(Sha256::digest(body.as_bytes()));
        format!("{body}\"Manifest-Checksum\": \"{sum}\"}}\n")
    }

    fn manifest_body(files: &[(&str, &[u8])]) -> String {
        let mut s = String::from(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\
             \"System-Identifier\": 7301234567890123456,\n\"Files\": [\n",
        );
        let lines: Vec<String> = files
            .iter()
            .map(|(path, data)| {
                format!(
                    "{{ \"Path\": \"{path}\", \"Size\": {}, \"Last-Modified\": \"2024-01-16 09:15:28 GMT\", \
                     \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}",
                    data.len(),
                    hex::encode(crc32c::crc32c(data).to_le_bytes())
                )
            })
            .collect();
        s.push_str(&lines.join(",\n"));
        s.push_str(
            "\n],\n\"WAL-Ranges\": [\n\
             { \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n",
        );
        s
    }

    #[test]
    fn parses_a_manifest() {
        let text = with_checksum(&manifest_body(&[
            ("backup_label", b"START WAL LOCATION: 0/2000028\n"),
            ("PG_VERSION", b"15\n"),
            ("global/pg_control", &[0; 8192]),
        ]));
        let m = Manifest::parse(text.as_bytes()).unwrap();
        assert_eq!(m.version, 2);
        assert_eq!(m.system_identifier, Some(7_301_234_567_890_123_456));
        assert_eq!(m.files.len(), 3);
        assert_eq!(
            m.files["global/pg_control"],
            ManifestFile {
                size: 8192,
                checksum: Some(Checksum::Crc32c([0x23, 0x46, 0x44, 0x90])),
            }
        );
        assert_eq!(
            m.wal_ranges,
            vec![WalRange {
                timeline: 1,
                start: Lsn(0x200_0028),
                end: Lsn(0x200_0100),
            }]
        );
    }

    #[test]
    fn manifest_checksum_must_match() {
        let body = manifest_body(&[("PG_VERSION", b"15\n")]);
        let good = with_checksum(&body);
        assert!(Manifest::parse(good.as_bytes()).is_ok());
        // A changed byte in the covered part.
        let bad = good.replacen("\"Size\": 3", "\"Size\": 4", 1);
        let e = Manifest::parse(bad.as_bytes()).unwrap_err();
        assert!(matches!(e, ManifestError::ChecksumMismatch { .. }), "{e}");
        // A changed checksum.
        let sum_at = good.rfind("\"}").unwrap() - 1;
        let mut bad = good.clone().into_bytes();
        bad[sum_at] = if bad[sum_at] == b'0' { b'1' } else { b'0' };
        assert!(matches!(
            Manifest::parse(&bad),
            Err(ManifestError::ChecksumMismatch { .. })
        ));
        // Upper-case hex is the same checksum.
        let upper = format!(
            "{body}\"Manifest-Checksum\": \"{}\"}}\n",
            hex::encode_upper(Sha256::digest(body.as_bytes()))
        );
        assert!(Manifest::parse(upper.as_bytes()).is_ok());
        // No checksum line, or not a SHA-256.
        let none = format!("{}}}\n", body.trim_end_matches(",\n"));
        assert!(Manifest::parse(none.as_bytes()).is_err());
        let short = format!("{body}\"Manifest-Checksum\": \"abcd\"}}\n");
        assert!(matches!(
            Manifest::parse(short.as_bytes()),
            Err(ManifestError::Invalid(_))
        ));
    }

    #[test]
    fn malformed_manifests_are_errors() {
        let entry = |fields: &str| {
            with_checksum(&format!(
                "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n{{ {fields} }}\n],\n\
                 \"WAL-Ranges\": [\n],\n"
            ))
        };
        let ok = entry("\"Path\": \"a\", \"Size\": 1");
        let m = Manifest::parse(ok.as_bytes()).unwrap();
        assert_eq!(m.files["a"].checksum, None);
        let none = entry("\"Path\": \"a\", \"Size\": 1, \"Checksum-Algorithm\": \"NONE\"");
        assert!(Manifest::parse(none.as_bytes()).is_ok());
        let sha = entry(&format!(
            "\"Path\": \"a\", \"Size\": 1, \"Checksum-Algorithm\": \"SHA512\", \"Checksum\": \"{}\"",
            "ab".repeat(64)
        ));
        assert!(Manifest::parse(sha.as_bytes()).is_ok());
        for bad in [
            "\"Size\": 1",
            "\"Path\": \"a\", \"Encoded-Path\": \"61\", \"Size\": 1",
            "\"Encoded-Path\": \"6\", \"Size\": 1",
            "\"Path\": \"\", \"Size\": 1",
            "\"Path\": \"a\"",
            "\"Path\": \"a\", \"Size\": -1",
            "\"Path\": \"a\", \"Size\": 1, \"Checksum\": \"00\"",
            "\"Path\": \"a\", \"Size\": 1, \"Checksum-Algorithm\": \"CRC32C\"",
            "\"Path\": \"a\", \"Size\": 1, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"001122\"",
            "\"Path\": \"a\", \"Size\": 1, \"Checksum-Algorithm\": \"SHA256\", \"Checksum\": \"00\"",
            "\"Path\": \"a\", \"Size\": 1, \"Checksum-Algorithm\": \"MD5\", \"Checksum\": \"00\"",
            "\"Path\": \"a\", \"Size\": 1, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"zzzzzzzz\"",
        ] {
            assert!(Manifest::parse(entry(bad).as_bytes()).is_err(), "{bad}");
        }
        let twice = with_checksum(
            "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n\
             { \"Path\": \"a\", \"Size\": 1 },\n{ \"Path\": \"a\", \"Size\": 1 }\n],\n\
             \"WAL-Ranges\": [\n],\n",
        );
        let e = Manifest::parse(twice.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("more than once"), "{e}");
        for header in [
            "{ \"PostgreSQL-Backup-Manifest-Version\": 3,\n",
            "{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n",
            "{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"System-Identifier\": 1,\n",
        ] {
            let m = with_checksum(&format!(
                "{header}\"Files\": [\n],\n\"WAL-Ranges\": [\n],\n"
            ));
            assert!(matches!(
                Manifest::parse(m.as_bytes()),
                Err(ManifestError::Invalid(_))
            ));
        }
        for range in [
            "{ \"Timeline\": 1, \"Start-LSN\": \"0/3000000\", \"End-LSN\": \"0/2000000\" }",
            "{ \"Timeline\": 1, \"Start-LSN\": \"02000000\", \"End-LSN\": \"0/2000000\" }",
        ] {
            let m = with_checksum(&format!(
                "{{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n],\n\
                 \"WAL-Ranges\": [\n{range}\n],\n"
            ));
            assert!(Manifest::parse(m.as_bytes()).is_err(), "{range}");
        }
        assert!(matches!(
            Manifest::parse(b"{ \"PostgreSQL-Backup"),
            Err(ManifestError::Json(_))
        ));
    }

    // ---- verify ----

    #[test]
    fn a_matching_backup_verifies() {
        let (tar, files) = rich_tar();
        let found = check("base.tar", &tar).unwrap();
        assert_eq!(found, files);
        // The manifest the server would send for these files.
        let mut body = String::from("{ \"PostgreSQL-Backup-Manifest-Version\": 1,\n\"Files\": [\n");
        let lines: Vec<String> = found
            .iter()
            .map(|f| {
                format!(
                    "{{ \"Path\": \"{}\", \"Size\": {}, \"Last-Modified\": \"2024-01-16 09:15:28 GMT\", \
                     \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{}\" }}",
                    f.path,
                    f.size,
                    hex::encode(f.crc32c.to_le_bytes())
                )
            })
            .collect();
        body.push_str(&lines.join(",\n"));
        body.push_str("\n],\n\"WAL-Ranges\": [\n{ \"Timeline\": 1, \"Start-LSN\": \"0/2000028\", \"End-LSN\": \"0/2000100\" }\n],\n");
        let m = Manifest::parse(with_checksum(&body).as_bytes()).unwrap();
        assert_eq!(verify(&m, &found).unwrap(), found.len());
    }

    fn crc_manifest(files: &[(&str, &[u8])]) -> Manifest {
        Manifest::parse(with_checksum(&manifest_body(files)).as_bytes()).unwrap()
    }

    #[test]
    fn verify_reports_each_kind_of_problem() {
        let m = crc_manifest(&[
            ("PG_VERSION", b"15\n"),
            ("base/1/1259", b"heap"),
            ("base/1/1249", b"attr"),
            ("global/pg_control", b"control"),
            ("pg_tblspc/16385/PG_15_202209061/5/16386", b"ts"),
        ]);
        let good = vec![
            tar_file("PG_VERSION", b"15\n"),
            tar_file("base/1/1259", b"heap"),
            tar_file("base/1/1249", b"attr"),
            tar_file("global/pg_control", b"control"),
            tar_file("pg_tblspc/16385/PG_15_202209061/5/16386", b"ts"),
            // Ignored like pg_verifybackup does.
            tar_file("pg_wal/000000010000000000000002", b"wal"),
            tar_file("pg_wal/archive_status/000000010000000000000002.done", b""),
            tar_file("backup_manifest", b"{}"),
            tar_file("postgresql.auto.conf", b"x"),
            tar_file("recovery.signal", b""),
            tar_file("standby.signal", b""),
        ];
        assert_eq!(verify(&m, &good).unwrap(), 5);

        let mut bad = good.clone();
        bad.retain(|f| f.path != "base/1/1249"); // missing
        bad.push(tar_file("base/1/extra", b"e")); // extra
        bad.push(tar_file("pg_walx", b"")); // not under pg_wal/: extra
        bad[1] = tar_file("base/1/1259", b"heap!"); // size
        bad[2] = tar_file("global/pg_control", b"CONTROL"); // checksum
        let e = verify(&m, &bad).unwrap_err();
        let ManifestError::Mismatch { total, problems } = &e else {
            panic!("{e}");
        };
        assert_eq!(*total, 5, "{e}");
        let text = e.to_string();
        for want in [
            "\"base/1/1249\" is in the manifest but not in the backup",
            "\"base/1/extra\" is in the backup but not in the manifest",
            "\"pg_walx\" is in the backup but not in the manifest",
            "\"base/1/1259\" has 5 bytes, the manifest says 4",
            "\"global/pg_control\": CRC32C",
        ] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        assert_eq!(problems.len(), 5);

        // More problems than are spelled out.
        let many = crc_manifest(&[
            ("a", b"1"),
            ("b", b"2"),
            ("c", b"3"),
            ("d", b"4"),
            ("e", b"5"),
            ("f", b"6"),
            ("g", b"7"),
        ]);
        let e = verify(&many, &[]).unwrap_err();
        let ManifestError::Mismatch { total, problems } = &e else {
            panic!("{e}");
        };
        assert_eq!((*total, problems.len()), (7, 5));
        assert!(e.to_string().contains("; and 2 more"), "{e}");

        // A manifest entry for an ignored path is still checked.
        let m = crc_manifest(&[("postgresql.auto.conf", b"a")]);
        assert!(verify(&m, &[tar_file("postgresql.auto.conf", b"b")]).is_err());
        assert!(verify(&m, &[]).is_err());

        // The same path twice in the archives.
        let m = crc_manifest(&[("a", b"1")]);
        let e = verify(&m, &[tar_file("a", b"1"), tar_file("a", b"1")]).unwrap_err();
        assert!(e.to_string().contains("more than once"), "{e}");
    }

    #[test]
    fn verify_checksum_algorithms() {
        let file = |checksum| Manifest {
            version: 1,
            system_identifier: None,
            files: [("a".to_string(), ManifestFile { size: 9, checksum })].into(),
            wal_ranges: vec![],
        };
        let data = b"123456789";
        let got = [tar_file("a", data)];
        // CRC32C from a little-endian and from a big-endian server.
        assert!(verify(
            &file(Some(Checksum::Crc32c([0x83, 0x92, 0x06, 0xe3]))),
            &got
        )
        .is_ok());
        assert!(verify(
            &file(Some(Checksum::Crc32c([0xe3, 0x06, 0x92, 0x83]))),
            &got
        )
        .is_ok());
        assert!(verify(
            &file(Some(Checksum::Crc32c([0x83, 0x92, 0x06, 0xe4]))),
            &got
        )
        .is_err());
        // SHA256.
        let digest = Sha256::digest(data).to_vec();
        assert!(verify(&file(Some(Checksum::Sha256(digest.clone()))), &got).is_ok());
        let mut wrong = digest;
        wrong[0] ^= 1;
        let e = verify(&file(Some(Checksum::Sha256(wrong))), &got).unwrap_err();
        assert!(e.to_string().contains("SHA256"), "{e}");
        // No checksum: size only.
        assert!(verify(&file(None), &got).is_ok());
        // Other SHAs are refused.
        for c in [
            Checksum::Sha224(vec![0; 28]),
            Checksum::Sha384(vec![0; 48]),
            Checksum::Sha512(vec![0; 64]),
        ] {
            let name = c.algorithm();
            let e = verify(&file(Some(c)), &got).unwrap_err();
            assert!(
                e.to_string()
                    .contains(&format!("checksum algorithm {name} not supported by walfs")),
                "{e}"
            );
        }
    }

    #[test]
    fn ignored_paths() {
        for p in [
            "backup_manifest",
            "pg_wal",
            "pg_wal/000000010000000000000001",
            "pg_wal/archive_status/x.done",
            "postgresql.auto.conf",
            "recovery.signal",
            "standby.signal",
        ] {
            assert!(ignored(p), "{p}");
        }
        for p in [
            "pg_walx",
            "base/pg_wal/x",
            "backup_manifest.tmp",
            "global/standby.signal",
            "pg_tblspc/1/pg_wal/x",
        ] {
            assert!(!ignored(p), "{p}");
        }
    }
}
