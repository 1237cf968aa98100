//! Retention by backup: which backups `walfs delete --retain N` / `--retain-for D` keeps, which
//! it removes, and where the WAL is cut (pure; `cli` carries it out).
//!
//! - A backup counts only when it can be restored: complete (its record authenticates) and
//!   all the WAL it needs present.
//! - Newest means furthest in the WAL: by (timeline, end LSN), never by a host's clock.
//! - Kept: the newest N restorable backups (`--retain N`), and every restorable one that
//!   finished within D (`--retain-for D`, by the record's time); with only D given, the newest
//!   restorable backup is kept whatever its age. No restorable backup at all: nothing is
//!   planned.
//! - Removed: every complete backup older than the oldest kept one, and incomplete ones (no
//!   record) whose last object is older than [`Rule::incomplete_after`] (a day by default). A backup whose record does
//!   not open is reported, never removed: it may be another key's.
//! - WAL: cut at the lowest segment number where a kept backup starts, across timelines, by
//!   the same planner as `--before` (history files a kept timeline needs stay). A timeline
//!   rolled back to an older point starts below backups of the timeline it left, so the cut
//!   is the lowest start, not the oldest backup's.

use super::{BackupRecord, Listed};
use crate::store::backups::BackupObjects;
use crate::wal::SegmentSize;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// How old an incomplete backup's newest object must be before retention removes it, unless
/// told otherwise.
pub const STALE_INCOMPLETE: Duration = Duration::from_secs(24 * 3600);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Keep the newest N restorable backups.
    pub count: Option<usize>,
    /// Keep restorable backups that finished within this long.
    pub within: Option<Duration>,
    /// Remove an incomplete backup once its newest object is this old (a running backup
    /// writes one at least every chunk).
    pub incomplete_after: Duration,
}

impl Default for Rule {
    fn default() -> Rule {
        Rule {
            count: None,
            within: None,
            incomplete_after: STALE_INCOMPLETE,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct BackupPlan {
    /// Kept backups, oldest first.
    pub keep: Vec<String>,
    /// Backups removed, oldest first.
    pub delete: Vec<String>,
    /// The WAL before this segment number goes (every timeline).
    #[serde(skip)]
    pub wal_before: u64,
    /// The kept backup whose start is the cut.
    pub oldest_kept: String,
}

fn finished(r: &BackupRecord) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(r.finished_at.trim_end_matches('Z')).ok()
}

/// Plans retention by backup over what `backup::list` and the listing of objects say.
pub fn plan(
    listed: &[Listed],
    objects: &BTreeMap<String, BackupObjects>,
    rule: Rule,
    now: SystemTime,
) -> Result<BackupPlan, String> {
    if rule.count == Some(0) {
        return Err("--retain 0 would keep no backup; give 1 or more".into());
    }
    let mut restorable: Vec<&BackupRecord> = listed
        .iter()
        .filter(|l| l.damaged.is_none() && l.missing_wal.is_empty())
        .filter_map(|l| l.record.as_ref())
        .collect();
    let order = |r: &BackupRecord| (r.end_timeline, r.end_lsn);
    restorable.sort_by_key(|r| order(r));
    let Some(newest) = restorable.last() else {
        return Err(
            "the archive holds no restorable backup (complete, with its WAL): retention by backup \
             would keep nothing; take a backup first"
                .into(),
        );
    };
    let mut keep: Vec<&BackupRecord> = Vec::new();
    let n = restorable.len();
    for (i, r) in restorable.iter().enumerate() {
        let by_count = rule.count.is_some_and(|c| i + c >= n);
        let by_age = rule.within.is_some_and(|d| {
            finished(r).is_some_and(|t| now.duration_since(t).map_or(true, |age| age <= d))
        });
        if by_count || by_age {
            keep.push(r);
        }
    }
    if keep.is_empty() {
        keep.push(newest);
    }
    let oldest = keep[0];
    let size = SegmentSize::new(oldest.wal_segment_size).map_err(|e| e.to_string())?;
    let cut_at = keep
        .iter()
        .min_by_key(|r| size.segno(r.start_lsn))
        .copied()
        .unwrap_or(oldest);
    let kept: Vec<&str> = keep.iter().map(|r| r.name.as_str()).collect();
    let stale_before = now
        .checked_sub(rule.incomplete_after)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut delete: Vec<(Option<SystemTime>, String)> = Vec::new();
    for l in listed {
        if kept.contains(&l.name.as_str()) {
            continue;
        }
        match (&l.record, &l.damaged) {
            (Some(r), None) => {
                if order(r) < order(oldest) {
                    delete.push((finished(r), l.name.clone()));
                }
            }
            (_, Some(_)) => {}
            (None, None) => {
                let newest_object = objects.get(&l.name).map_or(0, |o| o.newest_modified);
                let t = SystemTime::UNIX_EPOCH
                    + Duration::from_secs(u64::try_from(newest_object).unwrap_or(0));
                if t < stale_before {
                    delete.push((Some(t), l.name.clone()));
                }
            }
        }
    }
    delete.sort();
    Ok(BackupPlan {
        keep: kept.iter().map(|s| s.to_string()).collect(),
        delete: delete.into_iter().map(|(_, n)| n).collect(),
        wal_before: size.segno(cut_at.start_lsn),
        oldest_kept: cut_at.name.clone(),
    })
}

/// The timeline whose WAL retention must not touch at all: the newest timeline the archive
/// holds WAL of (`newest_wal_timeline`), when no kept backup is on it. That WAL is what a
/// server promoted after the newest backup writes; no backup needs it yet, and the next one
/// will (a kept backup on it is covered by the cut already).
pub fn protected_timeline(
    plan: &BackupPlan,
    listed: &[Listed],
    newest_wal_timeline: Option<u32>,
) -> Option<u32> {
    let newest = newest_wal_timeline?;
    let on_newest = listed
        .iter()
        .filter(|l| plan.keep.contains(&l.name))
        .filter_map(|l| l.record.as_ref())
        .any(|r| r.end_timeline == newest);
    (!on_newest).then_some(newest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::ArchiveRecord;
    use crate::wal::Lsn;

    fn record(name: &str, tli: u32, start: u64, finished_at: &str) -> BackupRecord {
        BackupRecord {
            format: 1,
            name: name.into(),
            label: name.into(),
            system_identifier: "1".into(),
            pg_version: 150000,
            wal_segment_size: 1 << 20,
            start_lsn: Lsn(start << 20),
            start_timeline: tli,
            end_lsn: Lsn((start << 20) + 4096),
            end_timeline: tli,
            started_at: finished_at.into(),
            finished_at: finished_at.into(),
            archives: vec![ArchiveRecord {
                name: "base.tar".into(),
                tablespace_path: None,
                bytes: 1,
                chunks: 1,
            }],
            chunk_size: 1,
            bytes: 1,
            stored_bytes: 1,
            files: 1,
            wal_ranges: Vec::new(),
        }
    }

    #[test]
    fn the_newest_timeline_is_protected_unless_a_kept_backup_is_on_it() {
        let l = vec![
            listed(record("a", 1, 2, "2026-11-01T00:00:00Z")),
            listed(record("b", 2, 8, "2026-11-02T00:00:00Z")),
        ];
        let p = plan(
            &l,
            &BTreeMap::new(),
            Rule {
                count: Some(1),
                within: None,
                ..Default::default()
            },
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(p.keep, ["b"]);
        assert_eq!(protected_timeline(&p, &l, Some(3)), Some(3));
        assert_eq!(protected_timeline(&p, &l, Some(2)), None);
        assert_eq!(protected_timeline(&p, &l, None), None);
        // A kept backup on timeline 3 covers it (the cut keeps what that backup needs).
        let mut l3 = l.clone();
        l3.insert(0, listed(record("c", 3, 1, "2026-10-01T00:00:00Z")));
        let p = plan(
            &l3,
            &BTreeMap::new(),
            Rule {
                count: Some(1),
                within: None,
                ..Default::default()
            },
            SystemTime::now(),
        )
        .unwrap();
        assert_eq!(p.keep, ["c"]);
        assert_eq!(protected_timeline(&p, &l3, Some(3)), None);
    }

    fn listed(r: BackupRecord) -> Listed {
        Listed {
            name: r.name.clone(),
            complete: true,
            damaged: None,
            stored_bytes: 1,
            record: Some(r),
            missing_wal: Vec::new(),
        }
    }

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339_weak(s).unwrap()
    }

    #[test]
    fn keeps_the_newest_and_cuts_at_the_oldest_kept_start() {
        let l = vec![
            listed(record("a", 1, 2, "2026-11-01T00:00:00Z")),
            listed(record("b", 1, 10, "2026-11-10T00:00:00Z")),
            listed(record("c", 2, 20, "2026-11-20T00:00:00Z")),
        ];
        let now = at("2026-11-29T00:00:00");
        let p = plan(
            &l,
            &BTreeMap::new(),
            Rule {
                count: Some(2),
                within: None,
                ..Default::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(p.keep, ["b", "c"]);
        assert_eq!(p.delete, ["a"]);
        assert_eq!(p.wal_before, 10);
        let p = plan(
            &l,
            &BTreeMap::new(),
            Rule {
                count: None,
                within: Some(Duration::from_secs(15 * 86400)),
                ..Default::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(p.keep, ["c"]);
        assert_eq!(p.delete, ["a", "b"]);
        assert_eq!(p.wal_before, 20);
        // Too old for the window: the newest stays all the same.
        let p = plan(
            &l,
            &BTreeMap::new(),
            Rule {
                count: None,
                within: Some(Duration::from_secs(86400)),
                ..Default::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(p.keep, ["c"]);
        // Count and window together: the union.
        let p = plan(
            &l,
            &BTreeMap::new(),
            Rule {
                count: Some(1),
                within: Some(Duration::from_secs(25 * 86400)),
                ..Default::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(p.keep, ["b", "c"]);
    }

    #[test]
    fn a_rolled_back_timeline_moves_the_cut_to_the_lowest_kept_start() {
        // A at 10 and B at 50 on timeline 1; restored from A to 30 and promoted: C on
        // timeline 2 starts at 31. Keeping B and C must keep timeline 2 from 31.
        let l = vec![
            listed(record("a", 1, 10, "2026-11-01T00:00:00Z")),
            listed(record("b", 1, 50, "2026-11-10T00:00:00Z")),
            // Its host's clock is behind: order comes from the WAL, not the clock.
            listed(record("c", 2, 31, "2026-11-05T00:00:00Z")),
        ];
        let now = at("2026-11-29T00:00:00");
        let p = plan(
            &l,
            &BTreeMap::new(),
            Rule {
                count: Some(2),
                within: None,
                ..Default::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(p.keep, ["b", "c"]);
        assert_eq!(p.delete, ["a"]);
        assert_eq!(p.wal_before, 31);
        assert_eq!(p.oldest_kept, "c");
        let p = plan(
            &l,
            &BTreeMap::new(),
            Rule {
                count: Some(1),
                within: None,
                ..Default::default()
            },
            now,
        )
        .unwrap();
        assert_eq!(p.keep, ["c"]);
        assert_eq!(p.wal_before, 31);
    }

    #[test]
    fn only_restorable_backups_count_and_stale_incomplete_ones_go() {
        let mut missing = listed(record("c", 1, 30, "2026-11-20T00:00:00Z"));
        missing.missing_wal = vec!["00000001000000000000001E".into()];
        let incomplete_old = Listed {
            name: "d".into(),
            complete: false,
            damaged: None,
            stored_bytes: 1,
            record: None,
            missing_wal: Vec::new(),
        };
        let incomplete_running = Listed {
            name: "e".into(),
            ..incomplete_old.clone()
        };
        let l = vec![
            listed(record("a", 1, 2, "2026-11-01T00:00:00Z")),
            listed(record("b", 1, 10, "2026-11-10T00:00:00Z")),
            missing,
            incomplete_old,
            incomplete_running,
        ];
        let now = at("2026-11-29T00:00:00");
        let mut objects = BTreeMap::new();
        let secs =
            |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs() as i64;
        objects.insert(
            "d".to_string(),
            BackupObjects {
                newest_modified: secs(now) - 2 * 86400,
                ..Default::default()
            },
        );
        objects.insert(
            "e".to_string(),
            BackupObjects {
                newest_modified: secs(now) - 5,
                ..Default::default()
            },
        );
        let p = plan(
            &l,
            &objects,
            Rule {
                count: Some(1),
                within: None,
                ..Default::default()
            },
            now,
        )
        .unwrap();
        // c cannot be restored: b is the newest that can, and c (newer) is left alone.
        assert_eq!(p.keep, ["b"]);
        assert_eq!(p.delete, ["a", "d"]);
        assert_eq!(p.wal_before, 10);
        assert!(plan(
            &l,
            &objects,
            Rule {
                count: Some(0),
                within: None,
                ..Default::default()
            },
            now
        )
        .is_err());
        assert!(plan(
            &[],
            &objects,
            Rule {
                count: Some(3),
                within: None,
                ..Default::default()
            },
            now
        )
        .is_err());
    }
}
