//! Where streaming resumes after the server changed under the receiver: a standby promoted
//! in place of the primary the receiver followed.
//!
//! The receiver is the synchronous standby, so it is ahead of every asynchronous standby.
//! When one of those is promoted, the receiver's position on the old timeline lies past the
//! new timeline's fork point, which the new server refuses ("requested starting point … is
//! not in this server's history"). The WAL the receiver holds past the fork is the old
//! timeline's tail, kept as such; streaming goes on from the segment holding the fork point,
//! on the server's next timeline, as pg_receivewal does after a switch.

use crate::wal::{Lsn, SegmentSize, Switch};

/// Where to stream from: `(timeline, segment-aligned LSN)`, and whether the receiver's own
/// WAL from that segment on (on its old timeline) is a tail the server does not have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resume {
    pub timeline: u32,
    pub start: Lsn,
    pub diverged: bool,
}

/// `server`: the server's timeline history (its ancestors, oldest first, each with the point
/// where the next timeline left it) and its own timeline `server_tli`. `local`: where the
/// receiver would resume (timeline, segment start). `ours`: the receiver's timeline's own
/// history (empty when it is unknown or timeline 1).
pub fn resume_point(
    server: &[Switch],
    server_tli: u32,
    local: (u32, Lsn),
    ours: &[Switch],
    size: SegmentSize,
) -> Resume {
    let (tli, start) = local;
    let keep = Resume {
        timeline: tli,
        start,
        diverged: false,
    };
    if tli == server_tli {
        return keep;
    }
    // The timeline that follows `t` in the server's history.
    let next_after = |i: usize| server.get(i + 1).map_or(server_tli, |s| s.parent);
    let seg_start = |lsn: Lsn| size.start_lsn(size.segno(lsn));
    if let Some(i) = server.iter().position(|s| s.parent == tli) {
        let end = server[i].end;
        return if start <= end {
            keep
        } else {
            Resume {
                timeline: next_after(i),
                start: seg_start(end),
                diverged: true,
            }
        };
    }
    // Our timeline is not in the server's history: go back to the newest ancestor both share,
    // to the earlier of the two points where each left it.
    for mine in ours.iter().rev() {
        if let Some(i) = server.iter().position(|s| s.parent == mine.parent) {
            let fork = mine.end.min(server[i].end);
            return Resume {
                timeline: mine.parent,
                start: seg_start(fork),
                diverged: true,
            };
        }
    }
    // Nothing in common that walfs knows of (timeline 1 is everyone's root): from where the
    // server's history starts.
    match server.first() {
        Some(first) if first.parent == 1 && tli != 1 => Resume {
            timeline: 1,
            start: seg_start(first.end.min(start)),
            diverged: true,
        },
        _ => keep,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s16() -> SegmentSize {
        SegmentSize::new(16 << 20).unwrap()
    }

    fn sw(parent: u32, end: u64) -> Switch {
        Switch {
            parent,
            end: Lsn(end),
        }
    }

    #[test]
    fn a_receiver_ahead_of_the_promoted_standby_follows_from_the_fork() {
        // The receiver reached 0/5000000 on timeline 1; the promoted standby forked at
        // 0/3000100 onto timeline 2.
        let r = resume_point(&[sw(1, 0x300_0100)], 2, (1, Lsn(0x500_0000)), &[], s16());
        assert_eq!(
            r,
            Resume {
                timeline: 2,
                start: Lsn(0x300_0000),
                diverged: true
            }
        );
        // Behind the fork: stream timeline 1 up to it, the server switches there.
        let r = resume_point(&[sw(1, 0x300_0100)], 2, (1, Lsn(0x200_0000)), &[], s16());
        assert_eq!(
            (r.timeline, r.start, r.diverged),
            (1, Lsn(0x200_0000), false)
        );
        // Already on the server's timeline.
        let r = resume_point(&[sw(1, 0x300_0100)], 2, (2, Lsn(0x400_0000)), &[], s16());
        assert!(!r.diverged);
    }

    #[test]
    fn a_receiver_on_a_timeline_the_server_never_had_goes_back_to_the_common_one() {
        // We followed timeline 2 (forked from 1 at 0/3000000); the server forked timeline 3
        // from 1 at 0/2800000.
        let r = resume_point(
            &[sw(1, 0x280_0000)],
            3,
            (2, Lsn(0x600_0000)),
            &[sw(1, 0x300_0000)],
            s16(),
        );
        assert_eq!(
            r,
            Resume {
                timeline: 1,
                start: Lsn(0x200_0000),
                diverged: true
            }
        );
        // Several switches deep: the last ancestor in common is timeline 2.
        let r = resume_point(
            &[sw(1, 0x100_0000), sw(2, 0x500_0000)],
            4,
            (3, Lsn(0x900_0000)),
            &[sw(1, 0x100_0000), sw(2, 0x400_0000)],
            s16(),
        );
        assert_eq!((r.timeline, r.start), (2, Lsn(0x400_0000)));
    }
}
