//! `walfs import DIR`: bulk-loads a plain archive directory (what a `cp`-based
//! archive_command left) into the archive.
//!
//! Each file goes through the same `push` as archive_command: checked, sealed, stored with
//! create-only semantics. A file already archived with the same content counts as done, so an
//! interrupted import simply runs again; one archived with other content is a conflict and is
//! reported, never overwritten.

use crate::store::{Archive, Error, PushOutcome};
use crate::wal::ArchiveName;
use futures::StreamExt;
use serde::Serialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Serialize)]
pub struct ImportReport {
    /// Files newly stored.
    pub imported: u64,
    /// Files already archived with identical content (an earlier run, or archive_command).
    pub already_archived: u64,
    /// Plaintext bytes read from the directory.
    pub bytes: u64,
    /// Files refused or in conflict, with the reason; nothing was stored for them.
    pub refused: Vec<(String, String)>,
    /// Directory entries that are not WAL archive names (left alone).
    pub ignored: Vec<String>,
}

/// What a directory holds.
pub struct Scan {
    /// Files with archive names, sorted (oldest first), and their paths.
    pub files: Vec<(ArchiveName, PathBuf)>,
    /// Other entries.
    pub ignored: Vec<String>,
}

/// What is in `dir`.
pub fn scan(dir: &Path) -> std::io::Result<Scan> {
    let mut files = Vec::new();
    let mut ignored = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        match ArchiveName::parse(&name) {
            Ok(n) if e.file_type()?.is_file() => files.push((n, e.path())),
            _ => ignored.push(name),
        }
    }
    files.sort();
    ignored.sort();
    Ok(Scan { files, ignored })
}

/// Pushes `files`, `concurrency` at a time, calling `progress(bytes)` after each. Stops at the
/// first error that is not about one file (backend down after retries, unreadable file).
pub async fn import(
    archive: &Archive,
    files: Vec<(ArchiveName, PathBuf)>,
    concurrency: usize,
    progress: impl Fn(u64),
) -> Result<ImportReport, ImportError> {
    let mut report = ImportReport::default();
    let mut results = futures::stream::iter(files)
        .map(|(name, path)| async move {
            let (file, len) = crate::store::open_local(&path)
                .map_err(|e| ImportError::Read { path, source: e })?;
            let outcome = archive.push_file(&name, file, len).await;
            Ok::<_, ImportError>((name, len, outcome))
        })
        .buffered(concurrency.max(1));
    while let Some(r) = results.next().await {
        let (name, len, outcome) = r?;
        report.bytes += len;
        match outcome {
            Ok(PushOutcome::Stored { .. }) => report.imported += 1,
            Ok(PushOutcome::AlreadyArchived) => report.already_archived += 1,
            Err(e @ (Error::Refused { .. } | Error::Conflict { .. })) => {
                report.refused.push((name.to_string(), e.to_string()))
            }
            Err(e) => return Err(ImportError::Archive(e)),
        }
        progress(len);
    }
    Ok(report)
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Archive(#[from] Error),
}
