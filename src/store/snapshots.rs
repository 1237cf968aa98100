//! The receiver's snapshots of the segment it is receiving, so that losing the receiver's disk
//! loses at most one `--partial-upload-interval` of WAL. They live apart from the archive's
//! files:
//!
//! ```text
//! receiver/<segment>.<end>.partial    <end>: bytes of the segment received, 8 hex digits
//! ```
//!
//! - A snapshot is written create-only under a name of its own, so none ever replaces
//!   another: a later one has a larger `<end>`, and readers take the largest. A snapshot
//!   whose upload finishes late cannot undo a newer one.
//! - Once a newer snapshot is stored, older ones of that segment go; once the segment itself
//!   is archived, all of them go (and any a late upload leaves behind goes at the next
//!   cleanup).
//! - A timeline's last segment keeps one snapshot, the old timeline's tail, stored with
//!   `<end>` = the segment size so that it sorts after every interval snapshot (its WAL ends
//!   at the switch point the next timeline's history file gives).
//! - `wal/<segment>.partial` is never written by the receiver: it is the name PostgreSQL's own
//!   archiver gives the old timeline's last segment when a standby is promoted.
//!
//! Each snapshot is a full-size segment sealed like any object, bound to its own name, and
//! checked like a `.partial` file (page header, cluster, size). Its first `<end>` bytes were
//! fsynced by the receiver; after them come zeros, or WAL that arrived while it was read
//! (PostgreSQL stops replaying where the records stop being valid).

use super::{Archive, Error, Obj, Plain};
use crate::envelope::Priority;
use crate::wal::{ArchiveName, FileKind};
use futures::stream::{StreamExt, TryStreamExt};
use object_store::path::Path;
use std::sync::Arc;

const SNAPSHOT_DIR: &str = "receiver";

/// One snapshot: a segment and how many of its bytes it holds.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Snapshot {
    pub segment: ArchiveName,
    pub end: u64,
}

impl Snapshot {
    fn object_name(&self) -> String {
        format!("{}.{:08X}.partial", self.segment, self.end)
    }

    fn parse(file: &str) -> Option<Snapshot> {
        let rest = file.strip_suffix(".partial")?;
        let (segment, end) = rest.split_once('.')?;
        let segment = ArchiveName::parse(segment).ok()?;
        if segment.kind() != FileKind::Segment || end.len() != 8 {
            return None;
        }
        Some(Snapshot {
            segment,
            end: u64::from_str_radix(end, 16).ok()?,
        })
    }
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.object_name())
    }
}

impl Archive {
    fn snapshot_obj(&self, s: &Snapshot) -> Obj {
        let name = s.object_name();
        Obj {
            path: self.prefix.clone().join(SNAPSHOT_DIR).join(name.as_str()),
            sealed_as: format!("{SNAPSHOT_DIR}/{name}"),
            kind: FileKind::Partial,
        }
    }

    /// Stores `file` (a whole segment file, zeros after `s.end`) as snapshot `s`, then drops
    /// the snapshots of its segment older than the newest (which may be another, when this
    /// upload finished late).
    pub async fn put_snapshot(
        &self,
        s: &Snapshot,
        file: std::fs::File,
        len: u64,
    ) -> Result<(), Error> {
        let plain = Plain::File {
            file: Arc::new(file),
            len,
        };
        // Checked as the partial segment it is: page header, cluster, full size.
        let as_partial =
            ArchiveName::parse(&format!("{}.partial", s.segment)).map_err(|e| Error::Refused {
                name: s.to_string(),
                why: e.to_string(),
            })?;
        self.validate(&as_partial, &plain).await?;
        self.put_once(&self.snapshot_obj(s), &plain).await?;
        let mut same: Vec<Snapshot> = self
            .snapshots()
            .await?
            .into_iter()
            .filter(|o| o.segment == s.segment)
            .collect();
        same.pop(); // the newest (sorted by end) stays
        self.delete_snapshots(&same).await
    }

    /// Every snapshot in the archive, in order (segment, then end).
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>, Error> {
        let dir = self.prefix.clone().join(SNAPSHOT_DIR);
        let url = self.url.clone();
        let mut v: Vec<Snapshot> = self
            .store
            .list(Some(&dir))
            .map_err(move |e| super::list_error(&url, e))
            .try_filter_map(
                |meta| async move { Ok(meta.location.filename().and_then(Snapshot::parse)) },
            )
            .try_collect()
            .await?;
        v.sort();
        Ok(v)
    }

    /// The newest snapshot of `segment`, if any.
    pub async fn latest_snapshot(&self, segment: &ArchiveName) -> Result<Option<Snapshot>, Error> {
        Ok(self
            .snapshots()
            .await?
            .into_iter()
            .filter(|s| &s.segment == segment)
            .max())
    }

    /// Writes snapshot `s`, authenticated whole and checked, into `file`; its length, or None
    /// when it is gone (the segment was archived meanwhile).
    pub async fn fetch_snapshot_into(
        &self,
        s: &Snapshot,
        file: std::fs::File,
    ) -> Result<Option<u64>, Error> {
        self.fetch_obj_into(&self.snapshot_obj(s), None, file, Priority::Reader)
            .await
    }

    /// Deletes snapshots (gone already counts as deleted).
    pub async fn delete_snapshots(&self, snaps: &[Snapshot]) -> Result<(), Error> {
        let paths: Vec<Path> = snaps.iter().map(|s| self.snapshot_obj(s).path).collect();
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(paths.into_iter().map(Ok)).boxed());
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(Error::backend("deleting snapshots", e)),
            }
        }
        Ok(())
    }

    /// Deletes the snapshots of segments the archive holds whole: stale after the segment
    /// arrived (a late upload, a crash between the two). Timeline tails stay.
    pub async fn delete_stale_snapshots(&self) -> Result<usize, Error> {
        let mut stale = Vec::new();
        for s in self.snapshots().await? {
            if self.head(&self.object_path(&s.segment)).await?.is_some() {
                stale.push(s);
            }
        }
        self.delete_snapshots(&stale).await?;
        Ok(stale.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Key, Keyring, SealOptions};
    use crate::store::test_segment;
    use object_store::memory::InMemory;

    fn archive() -> Archive {
        Archive::with_store(
            Arc::new(InMemory::new()),
            Path::from("pfx"),
            "memory:///",
            Some(Keyring::new(Key::from_bytes([1; 32]), Vec::new()).unwrap()),
            SealOptions::default(),
        )
    }

    fn file(data: &[u8]) -> (std::fs::File, u64) {
        let f = tempfile::tempfile().unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, data, 0).unwrap();
        (f, data.len() as u64)
    }

    #[tokio::test]
    async fn snapshots_only_grow_and_leave_with_their_segment() {
        let a = archive();
        let first = ArchiveName::parse("000000010000000000000001").unwrap();
        let seg = ArchiveName::parse("000000010000000000000002").unwrap();
        a.push(&first, test_segment(first.as_str(), 7, 1 << 20))
            .await
            .unwrap();
        let data = test_segment(seg.as_str(), 7, 1 << 20);
        for end in [0x1000, 0x8000, 0x4000] {
            let (f, len) = file(&data);
            let s = Snapshot {
                segment: seg.clone(),
                end,
            };
            a.put_snapshot(&s, f, len).await.unwrap();
        }
        // The late, older one (0x4000) did not undo the newer one, and is gone itself.
        let latest = a.latest_snapshot(&seg).await.unwrap().unwrap();
        assert_eq!(latest.end, 0x8000);
        assert_eq!(a.snapshots().await.unwrap(), vec![latest.clone()]);
        let f = tempfile::tempfile().unwrap();
        assert_eq!(
            a.fetch_snapshot_into(&latest, f).await.unwrap(),
            Some(1 << 20)
        );
        // None of them is an archive file: PostgreSQL's own .partial keeps its name.
        let names: Vec<String> = a
            .list(None)
            .map_ok(|e| e.name.to_string())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(names, vec![first.to_string()]);
        // The segment arrives: its snapshots are stale.
        a.push(&seg, data.clone()).await.unwrap();
        assert!(a.delete_stale_snapshots().await.unwrap() >= 1);
        assert_eq!(a.latest_snapshot(&seg).await.unwrap(), None);
        // A snapshot of another cluster's segment is refused.
        let (f, len) = file(&test_segment("000000010000000000000003", 8, 1 << 20));
        let s = Snapshot {
            segment: ArchiveName::parse("000000010000000000000003").unwrap(),
            end: 0x100,
        };
        assert!(a.put_snapshot(&s, f, len).await.is_err());
        assert_eq!(
            Snapshot::parse("000000010000000000000003.00000100.partial"),
            Some(s)
        );
        assert_eq!(Snapshot::parse("000000010000000000000003.partial"), None);
    }
}
