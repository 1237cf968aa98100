//! Power cuts: `walfs receive --synchronous` keeps its spool (the whole cache directory) on
//! lossyfs, a test filesystem that keeps unsynced writes in memory and drops them when the
//! power is cut (`src/bin/lossyfs.rs`: file data durable only after that file's fsync,
//! directory entries only after that directory's fsync). A client commits row by row; at a
//! random moment the power is cut, the receiver `kill -9`ed and the primary stopped
//! `immediate`; the base backup is restored, with stock `cp`, through a `--serve-partial`
//! mount over what survived of the receiver's disk, and must hold every acknowledged commit.
//!
//! Unlike `kill -9` (the page cache survives a process), a power cut loses what a missing
//! fsync left behind, so this test fails when the fsync before flush feedback is removed: the
//! mutation check `bash mount-tests/bench/mutation-check.sh` removes it (`SegmentWriter::flush`
//! no longer calls `sync_data`), runs this test against the mutant and expects it to fail;
//! it did, losing acknowledged commits in every trial it ran (see the script's header).
//!
//! `WALFS_RPO_TRIALS` trials (default 20), random moments from `WALFS_RPO_SEED` (printed).

use std::path::Path;
use std::time::Duration;
use walfs_mount_tests::*;

#[test]
fn a_power_cut_loses_no_acknowledged_commit() {
    let trials = env_count("WALFS_RPO_TRIALS", 20);
    let (seed, mut rng) = seeded();
    let _watchdog = Watchdog::new("power cuts", Duration::from_secs(60 + 60 * trials as u64));
    let scratch = scratch_dir("rpo-power");
    let lossyfs = Path::new(env!("CARGO_BIN_EXE_lossyfs"));
    let mut pg = sync_primary(&scratch.path().join("primary"), "");
    let backup = scratch.path().join("backup");
    pg.base_backup_with(&backup, &["-X", "fetch"]);
    // The archive is on a disk that keeps what it was given; the receiver's is lossyfs.
    let archive = scratch.path().join("archive");
    let host = scratch.path().join("rx");
    let mut r = Receiver::new(&host, &archive, &pg.conninfo(), &["--synchronous"]);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for trial in 0..trials {
        if !pg.is_running() {
            pg.start();
        }
        // Each trial's disk starts empty: the receiver resumes from the archive and its slot.
        let image = scratch.path().join(format!("image-{trial}"));
        let disk = LossyFs::mount(lossyfs, &host.join("cache"), &image.join("cache"));
        r.start();
        wait_sync(&pg, &r);
        let first = (trial as u64 + 1) * 1_000_000;
        let c = Committer::start(&pg, first, 999_999);
        std::thread::sleep(Duration::from_millis(300 + rng.below(2200)));
        disk.cut();
        r.kill9();
        pg.stop_immediate();
        let acked = c.finish(Duration::from_secs(30));
        runs.push((first, acked));
        let want: u64 = runs.iter().map(|(_, n)| n).sum();
        // What survived of the receiver's disk, served with the archive.
        let mut mount = WalfsMount::start(&image, &archive_args(&archive), &serve_partial());
        let dir = scratch.path().join(format!("restored-{trial}"));
        let mut restored = restore_through(&dir, &backup, mount.path());
        let have: u64 = restored.psql(&count_runs_sql(&runs)).parse().unwrap();
        restored.stop_immediate();
        mount.stop();
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&image);
        eprintln!(
            "trial {}/{trials}: {acked} commits acknowledged before the cut, {have} of {want} \
             acknowledged so far restored",
            trial + 1
        );
        if have != want {
            failed.push(format!(
                "trial {}: {} acknowledged commits missing",
                trial + 1,
                want - have
            ));
        }
    }
    eprintln!(
        "{} of {trials} power-cut trials passed (WALFS_RPO_SEED={seed})",
        trials - failed.len()
    );
    assert!(
        failed.is_empty(),
        "a power cut lost acknowledged commits (WALFS_RPO_SEED={seed}): {failed:?}\n--- receiver\n{}",
        r.log_tail()
    );
    assert!(
        runs.iter().all(|(_, n)| *n > 0),
        "a trial committed nothing: {runs:?}"
    );
}
