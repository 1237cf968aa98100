//! Where base backups live in the archive, apart from WAL:
//!
//! ```text
//! backups/<name>/<archive>.<NNNNNN>   chunk N (from 0) of one tar archive: base.tar, <oid>.tar
//! backups/<name>/backup_manifest      PostgreSQL's backup manifest, checked against the tars
//! backups/<name>/backup.json          the backup's record, written last
//! ```
//!
//! - Every object is sealed like any other (compressed, encrypted with a key, authenticated)
//!   and bound to its own name, so a chunk cannot be swapped, reordered or moved to another
//!   backup without failing to open.
//! - Every object is written create-only: a name, once stored, never changes.
//! - `backup.json` is written only after every chunk and the manifest are stored and the tars
//!   matched the manifest. A backup without it did not complete: it is never listed as
//!   usable, and retention (`walfs delete --retain`) removes its objects a day after the
//!   last was written. The record counts each archive's chunks, so a missing chunk is an
//!   error, never a short file.

use super::{Archive, Error, Obj, Plain};
use crate::wal::FileKind;
use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use object_store::path::Path;
use std::collections::BTreeMap;
use std::sync::Arc;

const BACKUP_DIR: &str = "backups";

/// The objects of one backup as listed: file name → stored size.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackupObjects {
    pub files: BTreeMap<String, u64>,
    /// When the newest of them was written (seconds since the Unix epoch).
    pub newest_modified: i64,
}

impl BackupObjects {
    pub fn stored_bytes(&self) -> u64 {
        self.files.values().sum()
    }
}

/// A backup or file name walfs writes: letters, digits, `_`, `-`, `.`; not starting with a
/// dot; at most 100 characters.
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 100
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Archive {
    fn backup_obj(&self, backup: &str, file: &str) -> Result<Obj, Error> {
        if !valid_name(backup) || !valid_name(file) {
            return Err(Error::Refused {
                name: format!("{BACKUP_DIR}/{backup}/{file}"),
                why: "not a backup object name walfs writes".into(),
            });
        }
        Ok(Obj {
            path: self.prefix.clone().join(BACKUP_DIR).join(backup).join(file),
            sealed_as: format!("{BACKUP_DIR}/{backup}/{file}"),
            kind: FileKind::Backup,
        })
    }

    /// Stores one object of backup `backup`, create-only (the same bytes again succeed);
    /// returns its stored size.
    pub async fn put_backup_file(
        &self,
        backup: &str,
        file: &str,
        data: Bytes,
    ) -> Result<u64, Error> {
        let obj = self.backup_obj(backup, file)?;
        let len = data.len() as u64;
        match self.put_once(&obj, &Plain::Bytes(data)).await? {
            super::PushOutcome::Stored { stored_bytes } => Ok(stored_bytes),
            _ => Ok(len),
        }
    }

    /// The verified plaintext of one object of a backup; None when it is not stored.
    /// `size`: its plaintext length when known (one allocation).
    pub async fn get_backup_file(
        &self,
        backup: &str,
        file: &str,
        size: Option<u64>,
    ) -> Result<Option<Vec<u8>>, Error> {
        let obj = self.backup_obj(backup, file)?;
        self.fetch_obj(&obj, size).await
    }

    /// Whether the archive holds any backup object (one listing request).
    pub async fn any_backup(&self) -> Result<bool, Error> {
        let dir = self.prefix.clone().join(BACKUP_DIR);
        match self.store.list_with_delimiter(Some(&dir)).await {
            Ok(r) => Ok(!r.common_prefixes.is_empty() || !r.objects.is_empty()),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(super::list_error(&self.url, e)),
        }
    }

    /// Every backup's objects, by backup name (complete or not).
    pub async fn backup_objects(&self) -> Result<BTreeMap<String, BackupObjects>, Error> {
        let dir = self.prefix.clone().join(BACKUP_DIR);
        let url = self.url.clone();
        let depth = dir.parts().count();
        let mut out: BTreeMap<String, BackupObjects> = BTreeMap::new();
        let mut listing = self
            .store
            .list(Some(&dir))
            .map_err(move |e| super::list_error(&url, e));
        while let Some(meta) = listing.try_next().await? {
            let parts: Vec<String> = meta
                .location
                .parts()
                .skip(depth)
                .map(|p| p.as_ref().to_string())
                .collect();
            if let [backup, file] = parts.as_slice() {
                let o = out.entry(backup.clone()).or_default();
                o.files.insert(file.clone(), meta.size);
                o.newest_modified = o.newest_modified.max(meta.last_modified.timestamp());
            }
        }
        Ok(out)
    }

    /// Deletes every object of backup `backup` (gone already counts as deleted): its record
    /// first, so an interrupted deletion leaves an incomplete backup, never a complete one
    /// with chunks missing.
    pub async fn delete_backup(&self, backup: &str, objects: &BackupObjects) -> Result<(), Error> {
        let record = self.backup_obj(backup, crate::backup::RECORD)?;
        match object_store::ObjectStoreExt::delete(self.store.as_ref(), &record.path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(Error::backend(format!("deleting backup {backup}"), e)),
        }
        let paths: Vec<Path> = objects
            .files
            .keys()
            .filter(|f| f.as_str() != crate::backup::RECORD)
            .map(|f| self.backup_obj(backup, f).map(|o| o.path))
            .collect::<Result<_, _>>()?;
        let store: Arc<dyn object_store::ObjectStore> = self.store.clone();
        let mut results =
            store.delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::backend(format!("deleting backup {backup}"), e)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::envelope::{Key, Keyring, SealOptions};
    use object_store::ObjectStoreExt;

    fn archive() -> Archive {
        Archive::with_store(
            Arc::new(object_store::memory::InMemory::new()),
            Path::from("pfx"),
            "memory:///",
            Some(Keyring::new(Key::from_bytes([1; 32]), Vec::new()).unwrap()),
            SealOptions::default(),
        )
    }

    #[tokio::test]
    async fn backup_objects_are_sealed_bound_and_listed() {
        let a = archive();
        assert!(a.backup_objects().await.unwrap().is_empty());
        // An archive that is there (absence is only said of one).
        let first = crate::wal::ArchiveName::parse("000000010000000000000001").unwrap();
        a.push(
            &first,
            crate::store::test_segment(first.as_str(), 7, 1 << 20),
        )
        .await
        .unwrap();
        let data = Bytes::from(vec![42u8; 100_000]);
        a.put_backup_file("b1", "base.tar.000000", data.clone())
            .await
            .unwrap();
        a.put_backup_file("b1", "backup.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        // Create-only: the same bytes again are fine, other bytes are a conflict.
        a.put_backup_file("b1", "backup.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert!(a
            .put_backup_file("b1", "backup.json", Bytes::from_static(b"[]"))
            .await
            .is_err());
        assert_eq!(
            a.get_backup_file("b1", "base.tar.000000", None)
                .await
                .unwrap(),
            Some(data.to_vec())
        );
        assert_eq!(
            a.get_backup_file("b1", "nothing", None).await.unwrap(),
            None
        );
        let listed = a.backup_objects().await.unwrap();
        assert_eq!(
            listed["b1"].files.keys().collect::<Vec<_>>(),
            ["backup.json", "base.tar.000000"]
        );
        // Bound to its name: a chunk copied over another name does not open.
        let store = a.store.clone();
        let from = a.backup_obj("b1", "base.tar.000000").unwrap().path;
        let to = a.backup_obj("b1", "base.tar.000001").unwrap().path;
        store.as_ref().copy(&from, &to).await.unwrap();
        assert!(a
            .get_backup_file("b1", "base.tar.000001", None)
            .await
            .is_err());
        assert!(a.backup_obj("../x", "y").is_err());
        a.delete_backup("b1", &a.backup_objects().await.unwrap()["b1"])
            .await
            .unwrap();
        assert!(a.backup_objects().await.unwrap().is_empty());
    }
}
