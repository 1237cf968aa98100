//! The read-ahead planner: which segments a recovering PostgreSQL will ask for next.
//!
//! Pure logic, no I/O: the cache feeds it requests and timeline history files and executes
//! its plans. The window starts at one segment, doubles while requests stay sequential (up
//! to a bound the caller derives from `--prefetch-bytes`), and drops to nothing on a jump
//! (pg_rewind, manual reads). Timelines follow PostgreSQL's own rule (`XLogFileReadAnyTLI`):
//! segment `n` is read from the newest timeline of the target's history that began at or
//! before `n`, so past a switch point the plan moves to the new timeline. Nothing is planned
//! at or past a segment known to be missing until PostgreSQL itself finds it there.

use crate::wal::{SegmentId, SegmentSize};
use std::collections::BTreeMap;

pub use crate::wal::Switch;

/// The history files known so far: timeline → its ancestors, oldest first.
#[derive(Clone, Debug, Default)]
pub struct Timelines {
    histories: BTreeMap<u32, Vec<Switch>>,
}

impl Timelines {
    pub fn insert(&mut self, timeline: u32, history: Vec<Switch>) {
        self.histories.insert(timeline, history);
    }

    pub fn knows(&self, timeline: u32) -> bool {
        self.histories.contains_key(&timeline)
    }

    /// The highest timeline that is `t` or descends from it: where recovery with
    /// `recovery_target_timeline = 'latest'` (the default) heads.
    pub fn target_from(&self, t: u32) -> u32 {
        self.histories
            .iter()
            .rev()
            .find(|(&tli, h)| tli == t || h.iter().any(|s| s.parent == t))
            .map_or(t, |(&tli, _)| tli.max(t))
    }

    /// The timeline segment `segno` is read from when recovering onto `target`.
    pub fn timeline_for(&self, target: u32, segno: u64, size: SegmentSize) -> u32 {
        let Some(history) = self.histories.get(&target) else {
            return target;
        };
        // Timeline i begins where its parent ended; the target begins at the last switch.
        let mut begins: Vec<(u32, u64)> = Vec::with_capacity(history.len() + 1);
        let mut begin = 0u64;
        for s in history {
            begins.push((s.parent, begin));
            begin = size.segno(s.end);
        }
        begins.push((target, begin));
        begins
            .iter()
            .rev()
            .find(|(_, b)| *b <= segno)
            .map_or(target, |(tli, _)| *tli)
    }
}

/// Planner state for one mount.
#[derive(Clone, Debug)]
pub struct Planner {
    size: SegmentSize,
    max_window: u32,
    window: u32,
    last: Option<SegmentId>,
    /// Set when PostgreSQL reads a timeline other than the one predicted: follow it only.
    pinned: Option<u32>,
    /// Per timeline, the first segment number found missing.
    end: BTreeMap<u32, u64>,
}

impl Planner {
    /// `max_window`: the most segments planned ahead (0 turns read-ahead off).
    pub fn new(size: SegmentSize, max_window: u32) -> Planner {
        Planner {
            size,
            max_window,
            window: 0,
            last: None,
            pinned: None,
            end: BTreeMap::new(),
        }
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// PostgreSQL opened segment `id`: returns the segments to have ready next, in order.
    pub fn on_request(&mut self, id: SegmentId, timelines: &Timelines) -> Vec<SegmentId> {
        let target = self.target(id.timeline, timelines);
        match self.last {
            // The same segment again (a second reader, a retry): keep the plan as it is.
            Some(last) if last.segno == id.segno => {}
            Some(last) if last.segno + 1 == id.segno => {
                // Sequential: a timeline other than the predicted one means PostgreSQL is
                // not heading where we thought; follow what it reads.
                if timelines.timeline_for(target, id.segno, self.size) != id.timeline {
                    self.pinned = Some(id.timeline);
                }
                self.window = (self.window.max(1) * 2).min(self.max_window);
            }
            // First request: start small.
            None => self.window = self.max_window.min(1),
            // A jump: stop until access is sequential again.
            Some(_) => {
                self.window = 0;
                self.pinned = None;
            }
        }
        self.last = Some(id);
        // PostgreSQL found a segment at or past a recorded end: the archive grew.
        let tli_end = self.end.get(&id.timeline).copied();
        if tli_end.is_some_and(|e| id.segno >= e) {
            self.end.remove(&id.timeline);
        }
        let target = self.target(id.timeline, timelines);
        (1..=u64::from(self.window))
            .map(|k| {
                let segno = id.segno + k;
                SegmentId {
                    timeline: timelines.timeline_for(target, segno, self.size),
                    segno,
                }
            })
            .take_while(|s| self.end.get(&s.timeline).is_none_or(|&e| s.segno < e))
            .collect()
    }

    fn target(&self, t: u32, timelines: &Timelines) -> u32 {
        match self.pinned {
            Some(p) if p == t => t,
            _ => timelines.target_from(t),
        }
    }

    /// Whether `id` is at or past a segment known to be missing on its timeline.
    pub fn past_end(&self, id: SegmentId) -> bool {
        self.end.get(&id.timeline).is_some_and(|&e| id.segno >= e)
    }

    /// A planned segment turned out not to be archived (yet).
    pub fn missing(&mut self, id: SegmentId) {
        let e = self.end.entry(id.timeline).or_insert(id.segno);
        *e = (*e).min(id.segno);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s16() -> SegmentSize {
        SegmentSize::new(16 << 20).unwrap()
    }

    fn seg(timeline: u32, segno: u64) -> SegmentId {
        SegmentId { timeline, segno }
    }

    fn names(plan: &[SegmentId]) -> Vec<String> {
        plan.iter().map(|s| s.file_name(s16())).collect()
    }

    fn hist(text: &str) -> Vec<Switch> {
        crate::wal::parse_history_file(text.as_bytes(), 9).unwrap()
    }

    #[test]
    fn window_grows_while_sequential_and_is_bounded() {
        let t = Timelines::default();
        let mut p = Planner::new(s16(), 8);
        assert_eq!(p.on_request(seg(1, 10), &t), [seg(1, 11)]);
        let sizes: Vec<usize> = (11..16)
            .map(|n| p.on_request(seg(1, n), &t).len())
            .collect();
        assert_eq!(sizes, [2, 4, 8, 8, 8]);
        assert_eq!(
            p.on_request(seg(1, 15), &t).len(),
            8,
            "a repeated request keeps the plan"
        );
        let plan = p.on_request(seg(1, 16), &t);
        assert_eq!(plan.first(), Some(&seg(1, 17)));
        assert_eq!(plan.last(), Some(&seg(1, 24)));
    }

    #[test]
    fn off_when_the_bound_is_zero() {
        let mut p = Planner::new(s16(), 0);
        let t = Timelines::default();
        for n in 1..10 {
            assert!(p.on_request(seg(1, n), &t).is_empty());
        }
    }

    #[test]
    fn log_id_rollover_is_in_the_arithmetic() {
        let mut p = Planner::new(s16(), 4);
        let t = Timelines::default();
        p.on_request(seg(1, 0x1FE), &t);
        assert_eq!(
            names(&p.on_request(seg(1, 0x1FF), &t)),
            ["000000010000000200000000", "000000010000000200000001"]
        );
    }

    #[test]
    fn jumps_stop_prefetching_until_sequential_again() {
        let mut p = Planner::new(s16(), 8);
        let t = Timelines::default();
        for n in 10..15 {
            p.on_request(seg(1, n), &t);
        }
        assert!(p.on_request(seg(1, 40), &t).is_empty());
        assert!(p.on_request(seg(1, 3), &t).is_empty());
        assert_eq!(p.on_request(seg(1, 4), &t), [seg(1, 5), seg(1, 6)]);
    }

    #[test]
    fn the_plan_crosses_a_timeline_switch() {
        // Timeline 2 forked from 1 inside segment 0x12; timeline 3 from 2 inside 0x15.
        let mut t = Timelines::default();
        t.insert(2, hist("1\t0/12345678\tx\n"));
        t.insert(3, hist("1\t0/12345678\tx\n2\t0/15000100\ty\n"));
        assert_eq!(t.target_from(1), 3);
        assert_eq!(t.target_from(2), 3);
        let mut p = Planner::new(s16(), 8);
        p.on_request(seg(1, 0x10), &t);
        let plan = p.on_request(seg(1, 0x11), &t);
        // 0x12 holds the switch to 2: PostgreSQL reads timeline 2's copy; 0x15 is 3's.
        assert_eq!(plan, [seg(2, 0x12), seg(2, 0x13)]);
        let plan = p.on_request(seg(2, 0x12), &t);
        assert_eq!(
            plan,
            [seg(2, 0x13), seg(2, 0x14), seg(3, 0x15), seg(3, 0x16)]
        );
    }

    #[test]
    fn a_server_staying_on_an_old_timeline_is_followed() {
        let mut t = Timelines::default();
        t.insert(2, hist("1\t0/12345678\tx\n"));
        let mut p = Planner::new(s16(), 8);
        p.on_request(seg(1, 0x10), &t);
        p.on_request(seg(1, 0x11), &t);
        // recovery_target_timeline = 1: PostgreSQL reads 1's 0x12, not 2's.
        let plan = p.on_request(seg(1, 0x12), &t);
        assert!(plan.iter().all(|s| s.timeline == 1), "{plan:?}");
    }

    #[test]
    fn nothing_is_planned_past_the_end_until_postgres_finds_more() {
        let mut p = Planner::new(s16(), 8);
        let t = Timelines::default();
        p.on_request(seg(1, 10), &t);
        p.on_request(seg(1, 11), &t);
        p.missing(seg(1, 14));
        let plan = p.on_request(seg(1, 12), &t);
        assert_eq!(plan, [seg(1, 13)], "nothing at or past the known end");
        assert_eq!(p.on_request(seg(1, 13), &t), Vec::<SegmentId>::new());
        // The archive grew: PostgreSQL opened 14 itself.
        assert_eq!(p.on_request(seg(1, 14), &t).first(), Some(&seg(1, 15)));
    }
}
