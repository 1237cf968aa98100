//! `walfs verify`: ranges, gaps, timelines and (deep) integrity of a whole archive.

use crate::store::{Archive, Error};
use crate::wal::{ArchiveName, FileKind, SegmentSize};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// What `verify` found for one timeline.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct TimelineReport {
    pub timeline: u32,
    /// Runs of consecutive segments present: (first, last) names.
    pub ranges: Vec<(String, String)>,
    /// Every segment missing between the first and the last present (and, for a timeline
    /// that forked from another, between the parent's last segment and the switch).
    pub gaps: Vec<String>,
    pub segments: u64,
    /// The parent timeline and the switch point, from this timeline's history file.
    pub forked_from: Option<(u32, String)>,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub timelines: Vec<TimelineReport>,
    /// Objects that failed to open (only with `deep`).
    pub damaged: Vec<String>,
    pub objects: u64,
    pub checked: u64,
    /// With `deep`: objects by the key they are sealed with ("none": not encrypted), so an old
    /// key can be retired once nothing uses it.
    pub keys: BTreeMap<String, u64>,
    /// With `deep`: objects by format version.
    pub formats: BTreeMap<u8, u64>,
}

impl VerifyReport {
    pub fn has_gaps(&self) -> bool {
        self.timelines.iter().any(|t| !t.gaps.is_empty())
    }
}

/// Groups segment numbers into runs of consecutive numbers.
fn runs(segnos: &BTreeSet<u64>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &n in segnos {
        match out.last_mut() {
            Some((_, last)) if *last + 1 == n => *last = n,
            _ => out.push((n, n)),
        }
    }
    out
}

/// Checks the archive: per timeline the ranges present and every gap; with `deep`, opens
/// and authenticates every object (`concurrency` at a time). `from`/`to` bound the segments
/// considered (by segment number, any timeline).
pub async fn verify(
    archive: &Archive,
    deep: bool,
    from: Option<u64>,
    to: Option<u64>,
    concurrency: usize,
    progress: &(dyn Fn(u64, u64) + Sync),
) -> Result<VerifyReport, Error> {
    let identity = archive.require_identity().await?;
    let size: SegmentSize = identity.segment_size()?;
    let names: Vec<ArchiveName> = archive.list(None).map_ok(|e| e.name).try_collect().await?;
    let in_bounds = |segno: u64| from.is_none_or(|f| segno >= f) && to.is_none_or(|t| segno <= t);
    let mut by_timeline: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    let mut histories = Vec::new();
    let mut partials: BTreeSet<(u32, u64)> = BTreeSet::new();
    for n in &names {
        match n.kind() {
            FileKind::Segment => {
                if let Ok(Some(id)) = n.segment(size) {
                    if in_bounds(id.segno) {
                        by_timeline.entry(id.timeline).or_default().insert(id.segno);
                    }
                }
            }
            FileKind::Partial => {
                if let Ok(Some(id)) = n.segment(size) {
                    partials.insert((id.timeline, id.segno));
                }
            }
            FileKind::History => histories.push(n.clone()),
            FileKind::Backup => {}
        }
    }
    let forks: BTreeMap<u32, (u32, crate::wal::Lsn)> = super::read_histories(archive, &histories)
        .await?
        .into_iter()
        .filter_map(|(tli, switches)| switches.last().map(|s| (tli, (s.parent, s.end))))
        .collect();
    let name_of =
        |timeline: u32, segno: u64| crate::wal::SegmentId { timeline, segno }.file_name(size);
    let mut report = VerifyReport {
        objects: names.len() as u64,
        ..Default::default()
    };
    for (&tli, segnos) in &by_timeline {
        let mut gaps: Vec<String> = Vec::new();
        let (Some(&first), Some(&last)) = (segnos.first(), segnos.last()) else {
            continue;
        };
        for n in first..=last {
            if !segnos.contains(&n) {
                gaps.push(name_of(tli, n));
            }
        }
        // A forked timeline starts at the switch segment; its parent must reach it.
        if let Some(&(parent, end)) = forks.get(&tli) {
            let switch = size.segno(end);
            if in_bounds(switch) {
                for n in switch..first {
                    gaps.push(name_of(tli, n));
                }
            }
            if let Some(p) = by_timeline.get(&parent) {
                let parent_last = p.last().copied().unwrap_or(0);
                let reaches = parent_last + 1 >= switch || partials.contains(&(parent, switch));
                if !reaches {
                    for n in parent_last + 1..switch {
                        if in_bounds(n) {
                            gaps.push(name_of(parent, n));
                        }
                    }
                }
            }
        }
        gaps.sort();
        gaps.dedup();
        report.timelines.push(TimelineReport {
            timeline: tli,
            ranges: runs(segnos)
                .into_iter()
                .map(|(a, b)| (name_of(tli, a), name_of(tli, b)))
                .collect(),
            gaps,
            segments: segnos.len() as u64,
            forked_from: forks.get(&tli).map(|(p, e)| (*p, e.to_string())),
        });
    }
    if deep {
        let total = names.len() as u64;
        let mut results = futures::stream::iter(names)
            .map(|n| async move {
                let r = archive.check_object(&n).await;
                (n, r)
            })
            .buffer_unordered(concurrency.max(1));
        while let Some((n, r)) = results.next().await {
            report.checked += 1;
            progress(report.checked, total);
            match r {
                Ok(Some(info)) => {
                    let key = info.key_id.unwrap_or_else(|| "none".into());
                    *report.keys.entry(key).or_default() += 1;
                    *report.formats.entry(info.format).or_default() += 1;
                }
                Ok(None) => {}
                Err(Error::Unreadable { .. }) => report.damaged.push(n.to_string()),
                Err(e) => return Err(e),
            }
        }
        report.damaged.sort();
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_consecutive_numbers() {
        let s: BTreeSet<u64> = [1, 2, 3, 5, 7, 8].into_iter().collect();
        assert_eq!(runs(&s), [(1, 3), (5, 5), (7, 8)]);
        assert!(runs(&BTreeSet::new()).is_empty());
    }
}
