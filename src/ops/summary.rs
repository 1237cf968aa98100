//! What `walfs status` shows of the archive itself: per timeline the oldest and newest
//! segment, counts, stored size and compression ratio, from one listing.

use crate::store::{Archive, Entry, Error};
use crate::wal::{FileKind, SegmentSize};
use futures::TryStreamExt;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct TimelineSummary {
    pub timeline: u32,
    pub segments: u64,
    pub oldest: String,
    pub newest: String,
    /// When the newest segment was archived (Unix seconds).
    pub newest_archived_at: i64,
}

#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Summary {
    pub url: String,
    pub system_identifier: String,
    pub wal_segment_size: u64,
    pub encrypted: bool,
    pub timelines: Vec<TimelineSummary>,
    pub files: u64,
    pub segments: u64,
    pub partials: u64,
    pub histories: u64,
    pub backups: u64,
    /// Bytes the backend holds for the whole archive.
    pub stored_bytes: u64,
    /// WAL bytes the segments hold, and the stored bytes of those segments.
    pub segment_bytes: u64,
    pub segment_stored_bytes: u64,
    /// segment_bytes / segment_stored_bytes (0 without segments).
    pub compression_ratio: f64,
}

/// Summarises listed entries.
pub fn summarize(entries: &[Entry], size: SegmentSize) -> Summary {
    let mut s = Summary::default();
    let mut tl: BTreeMap<u32, TimelineSummary> = BTreeMap::new();
    for e in entries {
        s.files += 1;
        s.stored_bytes += e.stored_bytes;
        match e.name.kind() {
            FileKind::Segment => {
                s.segments += 1;
                s.segment_bytes += size.bytes();
                s.segment_stored_bytes += e.stored_bytes;
                let name = e.name.to_string();
                let t = tl
                    .entry(e.name.timeline())
                    .or_insert_with(|| TimelineSummary {
                        timeline: e.name.timeline(),
                        oldest: name.clone(),
                        newest: name.clone(),
                        ..TimelineSummary::default()
                    });
                t.segments += 1;
                if name < t.oldest {
                    t.oldest = name.clone();
                }
                if name >= t.newest {
                    t.newest = name;
                    t.newest_archived_at = e.last_modified;
                }
            }
            FileKind::Partial => s.partials += 1,
            FileKind::History => s.histories += 1,
            FileKind::Backup => s.backups += 1,
        }
    }
    if s.segment_stored_bytes > 0 {
        s.compression_ratio = s.segment_bytes as f64 / s.segment_stored_bytes as f64;
    }
    s.timelines = tl.into_values().collect();
    s
}

/// Lists the archive and summarises it.
pub async fn summary(archive: &Archive) -> Result<Summary, Error> {
    let identity = archive.require_identity().await?;
    let size = identity.segment_size()?;
    let entries: Vec<Entry> = archive.list(None).try_collect().await?;
    let mut s = summarize(&entries, size);
    s.url = archive.url().to_string();
    s.system_identifier = identity.system_identifier.clone();
    s.wal_segment_size = identity.wal_segment_size;
    s.encrypted = identity.key_id.is_some();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::{ArchiveName, SegmentId};

    #[test]
    fn counts_ratio_and_newest_per_timeline() {
        let size = SegmentSize::new(16 << 20).expect("size");
        let e = |name: String, stored: u64, at: i64| Entry {
            name: ArchiveName::parse(&name).expect("name"),
            stored_bytes: stored,
            last_modified: at,
        };
        let seg = |t: u32, n: u64| {
            SegmentId {
                timeline: t,
                segno: n,
            }
            .file_name(size)
        };
        let entries = vec![
            e(seg(1, 3), 1 << 20, 30),
            e(seg(1, 1), 1 << 20, 10),
            e(seg(2, 3), 2 << 20, 40),
            e("00000002.history".into(), 100, 35),
        ];
        let s = summarize(&entries, size);
        assert_eq!((s.files, s.segments, s.histories), (4, 3, 1));
        assert_eq!(s.stored_bytes, (4 << 20) + 100);
        assert!((s.compression_ratio - 12.0).abs() < 1e-9);
        assert_eq!(s.timelines.len(), 2);
        assert_eq!(s.timelines[0].oldest, seg(1, 1));
        assert_eq!(s.timelines[0].newest, seg(1, 3));
        assert_eq!(s.timelines[0].newest_archived_at, 30);
    }
}
