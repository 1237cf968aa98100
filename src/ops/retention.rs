//! Retention: which files `walfs delete` may remove.
//!
//! Everything is cut at one boundary segment number, across timelines, the way
//! `pg_archivecleanup` cuts: segments, `.partial` and `.backup` files before the boundary go,
//! the rest stays. A cut by age is turned into such a boundary (the oldest segment that is
//! still young enough), so deleting never opens a gap inside what is kept. `.history` files go
//! only when no kept file needs them. The receiver's snapshots (`receiver/`) of segments
//! before the boundary go too.

use crate::store::snapshots::Snapshot;
use crate::store::{Archive, Entry, Error};
use crate::wal::{ArchiveName, FileKind, SegmentSize};
use futures::TryStreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// What to delete.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Everything before this segment number (any timeline).
    Before(u64),
    /// Everything before the oldest segment modified at or after this time (Unix seconds).
    ModifiedBefore(i64),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RetentionError {
    #[error("the archive holds no segments; nothing to delete")]
    NoSegments,
    #[error(
        "that would delete every segment (the newest is {newest}); refusing to empty the \
         archive: give an earlier --before or a longer --older-than"
    )]
    WouldEmpty { newest: String },
}

/// The outcome of planning: what goes, what stays.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct Plan {
    /// The oldest segment kept; every timeline is cut at its segment number.
    pub first_kept: String,
    /// Files to delete, oldest first (history files last).
    pub delete: Vec<String>,
    pub delete_stored_bytes: u64,
    pub keep_files: u64,
    /// History files kept although older than the boundary (a kept timeline descends from them).
    pub histories_kept: Vec<String>,
    /// Receiver snapshots of segments before the boundary (old timelines' tails).
    pub snapshots: Vec<String>,
    /// The boundary segment number.
    #[serde(skip)]
    pub boundary: u64,
    #[serde(skip)]
    pub snapshot_objects: Vec<Snapshot>,
}

/// The segment number a segment, `.partial` or `.backup` file belongs to.
fn segno_of(name: &ArchiveName, size: SegmentSize) -> Option<u64> {
    name.wal_position(size).ok().flatten().map(|s| s.segno)
}

/// Plans a deletion. `ancestors` maps a timeline to the parents its history file lists;
/// nothing of timeline `protect` is deleted.
pub fn plan(
    entries: &[Entry],
    ancestors: &BTreeMap<u32, Vec<u32>>,
    size: SegmentSize,
    rule: Rule,
    protect: Option<u32>,
) -> Result<Plan, RetentionError> {
    let segments: Vec<(u64, &Entry)> = entries
        .iter()
        .filter(|e| e.name.kind() == FileKind::Segment)
        .filter_map(|e| segno_of(&e.name, size).map(|n| (n, e)))
        .collect();
    let newest = segments
        .iter()
        .max_by_key(|(n, e)| (*n, e.name.timeline()))
        .map(|(_, e)| e.name.to_string())
        .ok_or(RetentionError::NoSegments)?;
    let boundary = match rule {
        Rule::Before(n) => n,
        Rule::ModifiedBefore(cutoff) => segments
            .iter()
            .filter(|(_, e)| e.last_modified >= cutoff)
            .map(|(n, _)| *n)
            .min()
            .ok_or_else(|| RetentionError::WouldEmpty {
                newest: newest.clone(),
            })?,
    };
    if !segments.iter().any(|(n, _)| *n >= boundary) {
        return Err(RetentionError::WouldEmpty { newest });
    }

    let mut delete: Vec<(u64, &Entry)> = Vec::new();
    let mut kept_timelines: BTreeSet<u32> = BTreeSet::new();
    let mut keep_files = 0u64;
    let mut histories: Vec<&Entry> = Vec::new();
    for e in entries {
        match segno_of(&e.name, size) {
            Some(n) if n < boundary && protect != Some(e.name.timeline()) => delete.push((n, e)),
            Some(_) => {
                kept_timelines.insert(e.name.timeline());
                keep_files += 1;
            }
            None => histories.push(e),
        }
    }
    // A kept timeline needs its own history file and those of every ancestor; the newest
    // history always stays (a promotion picks the next timeline number from it).
    let mut needed: BTreeSet<u32> = BTreeSet::new();
    for t in &kept_timelines {
        needed.insert(*t);
        needed.extend(ancestors.get(t).into_iter().flatten().copied());
    }
    if let Some(max) = histories.iter().map(|h| h.name.timeline()).max() {
        needed.insert(max);
    }
    let first_kept = segments
        .iter()
        .filter(|(n, _)| *n >= boundary)
        .min_by_key(|(n, e)| (*n, e.name.timeline()))
        .map(|(_, e)| e.name.to_string())
        .unwrap_or_default();
    let mut plan = Plan {
        first_kept,
        boundary,
        ..Plan::default()
    };
    delete.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    for h in histories {
        if needed.contains(&h.name.timeline()) {
            keep_files += 1;
            if !kept_timelines.contains(&h.name.timeline()) {
                plan.histories_kept.push(h.name.to_string());
            }
        } else {
            delete.push((u64::MAX, h));
        }
    }
    plan.delete_stored_bytes = delete.iter().map(|(_, e)| e.stored_bytes).sum();
    plan.delete = delete
        .into_iter()
        .map(|(_, e)| e.name.to_string())
        .collect();
    plan.keep_files = keep_files;
    plan.histories_kept.sort();
    Ok(plan)
}

/// Lists the archive, reads its history files and plans.
pub async fn plan_archive(
    archive: &Archive,
    rule: Rule,
    protect: Option<u32>,
) -> Result<Result<Plan, RetentionError>, Error> {
    let size = archive.require_identity().await?.segment_size()?;
    let entries: Vec<Entry> = archive.list(None).try_collect().await?;
    let histories = entries
        .iter()
        .map(|e| &e.name)
        .filter(|n| n.kind() == FileKind::History);
    let ancestors = super::read_histories(archive, histories)
        .await?
        .into_iter()
        .map(|(tli, switches)| (tli, switches.iter().map(|s| s.parent).collect()))
        .collect();
    let mut planned = plan(&entries, &ancestors, size, rule, protect);
    if let Ok(p) = &mut planned {
        for s in archive.snapshots().await? {
            if s.segment
                .segment(size)
                .ok()
                .flatten()
                .is_some_and(|id| id.segno < p.boundary)
            {
                p.snapshots.push(s.to_string());
                p.snapshot_objects.push(s);
            }
        }
    }
    Ok(planned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::SegmentId;

    const MB16: u64 = 16 << 20;

    fn size() -> SegmentSize {
        SegmentSize::new(MB16).expect("size")
    }

    fn seg(tli: u32, segno: u64, modified: i64) -> Entry {
        entry(
            &SegmentId {
                timeline: tli,
                segno,
            }
            .file_name(size()),
            modified,
        )
    }

    fn entry(name: &str, modified: i64) -> Entry {
        Entry {
            name: ArchiveName::parse(name).expect("name"),
            stored_bytes: 100,
            last_modified: modified,
        }
    }

    #[test]
    fn a_protected_timeline_keeps_its_segments_below_the_cut() {
        // Timeline 2 rolled back to segment 3; the cut (a kept backup on timeline 1) is at 6.
        let mut e: Vec<Entry> = (1..=8).map(|n| seg(1, n, 0)).collect();
        e.extend((3..=5).map(|n| seg(2, n, 0)));
        e.push(entry("00000002.history", 0));
        let mut anc = BTreeMap::new();
        anc.insert(2, vec![1]);
        let p = plan(&e, &anc, size(), Rule::Before(6), Some(2)).expect("plan");
        assert!(
            p.delete.iter().all(|n| n.starts_with("00000001")),
            "{:?}",
            p.delete
        );
        assert_eq!(p.delete.len(), 5);
        // Without the protection timeline 2 would go whole.
        let p = plan(&e, &anc, size(), Rule::Before(6), None).expect("plan");
        assert!(p.delete.iter().any(|n| n.starts_with("00000002")));
    }

    #[test]
    fn before_cuts_every_timeline_at_one_segment() {
        let mut e: Vec<Entry> = (1..=5).map(|n| seg(1, n, 0)).collect();
        e.extend((5..=8).map(|n| seg(2, n, 0)));
        e.push(entry("000000010000000000000005.partial", 0));
        e.push(entry("000000010000000000000002.00000028.backup", 0));
        e.push(entry("00000002.history", 0));
        let mut anc = BTreeMap::new();
        anc.insert(2, vec![1]);
        let p = plan(&e, &anc, size(), Rule::Before(4), None).expect("plan");
        assert_eq!(
            p.delete,
            [
                "000000010000000000000001",
                "000000010000000000000002",
                "000000010000000000000002.00000028.backup",
                "000000010000000000000003",
            ]
        );
        assert_eq!(p.first_kept, "000000010000000000000004");
        assert_eq!(p.delete_stored_bytes, 400);
        assert_eq!(p.keep_files, e.len() as u64 - 4);
    }

    #[test]
    fn histories_go_only_when_no_kept_timeline_descends_from_them() {
        let mut e: Vec<Entry> = (1..=3).map(|n| seg(1, n, 0)).collect();
        e.extend((3..=6).map(|n| seg(2, n, 0)));
        e.extend((6..=9).map(|n| seg(4, n, 0)));
        // 3 forked from 2 and was abandoned; 4 forked from 2 too.
        for t in [
            "00000002.history",
            "00000003.history",
            "00000004.history",
            "00000005.history",
        ] {
            e.push(entry(t, 0));
        }
        let mut anc = BTreeMap::new();
        anc.insert(2, vec![1]);
        anc.insert(3, vec![1, 2]);
        anc.insert(4, vec![1, 2]);
        anc.insert(5, vec![1, 2, 4]);
        let p = plan(&e, &anc, size(), Rule::Before(7), None).expect("plan");
        // Timeline 3 has no files and no descendant kept: its history goes. 2 is an ancestor
        // of 4; 5 is the newest timeline.
        assert!(p.delete.contains(&"00000003.history".to_string()));
        assert!(!p.delete.iter().any(|d| d == "00000002.history"
            || d == "00000004.history"
            || d == "00000005.history"));
        assert_eq!(p.histories_kept, ["00000002.history", "00000005.history"]);
        assert_eq!(
            p.delete.last().map(String::as_str),
            Some("00000003.history")
        );
    }

    #[test]
    fn age_becomes_a_boundary_so_no_gap_opens() {
        // Segment 3 is recent (re-archived, say) but 4 and 5 are old: cutting by age alone
        // would delete 4 and 5 and keep 3 — a gap. The boundary is 3.
        let e = vec![
            seg(1, 1, 10),
            seg(1, 2, 10),
            seg(1, 3, 100),
            seg(1, 4, 10),
            seg(1, 5, 10),
            seg(1, 6, 100),
        ];
        let p = plan(&e, &BTreeMap::new(), size(), Rule::ModifiedBefore(50), None).expect("plan");
        assert_eq!(
            p.delete,
            ["000000010000000000000001", "000000010000000000000002"]
        );
        assert_eq!(p.keep_files, 4);
    }

    #[test]
    fn refuses_to_empty_the_archive() {
        let e = vec![seg(1, 1, 10), seg(1, 2, 10)];
        let newest = "000000010000000000000002".to_string();
        assert_eq!(
            plan(&e, &BTreeMap::new(), size(), Rule::ModifiedBefore(50), None),
            Err(RetentionError::WouldEmpty {
                newest: newest.clone()
            })
        );
        assert_eq!(
            plan(&e, &BTreeMap::new(), size(), Rule::Before(3), None),
            Err(RetentionError::WouldEmpty { newest })
        );
        assert_eq!(
            plan(&[], &BTreeMap::new(), size(), Rule::Before(3), None),
            Err(RetentionError::NoSegments)
        );
        // Nothing before the boundary: an empty plan, not an error.
        let p = plan(&e, &BTreeMap::new(), size(), Rule::Before(1), None).expect("plan");
        assert!(p.delete.is_empty());
    }
}
