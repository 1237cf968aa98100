//! Zero data loss with `walfs receive --synchronous`, tested so that a bug would show.
//!
//! Ground truth is a client that commits rows one at a time and records each commit the server
//! acknowledged ([`Committer`]). Every test kills things at moments drawn from a seeded
//! generator (`WALFS_RPO_SEED`, printed; a failure message repeats it) and checks, by
//! restoring with stock `cp` through a `--serve-partial` mount, that no acknowledged commit is
//! missing. `WALFS_RPO_TRIALS` sets the number of trials of the looped tests (default 20) and
//! `WALFS_RPO_CYCLES` the kill -9 cycles of the crash loop (default 50).
//!
//! The power-cut test (the spool on a filesystem that loses unsynced writes) is in
//! `power_cut.rs`.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use walfs_mount_tests::*;

/// Commits one by one, then `r` is `kill -9`ed and the primary stopped `immediate` together at
/// a random moment; the base backup, restored through a `--serve-partial` mount over the
/// receiver's cache with stock `cp`, holds every commit acknowledged in this trial and all
/// before it. Passes per trials are printed.
#[test]
fn every_acknowledged_commit_survives_kill_dash_nine_and_an_immediate_stop() {
    let trials = env_count("WALFS_RPO_TRIALS", 20);
    let (seed, mut rng) = seeded();
    let _watchdog = Watchdog::new(
        "rpo kill trials",
        Duration::from_secs(60 + 60 * trials as u64),
    );
    let scratch = scratch_dir("rpo-kill");
    let mut pg = sync_primary(&scratch.path().join("primary"), "");
    let backup = scratch.path().join("backup");
    pg.base_backup_with(&backup, &["-X", "fetch"]);
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &pg.conninfo(), &["--synchronous"]);
    let mount = WalfsMount::start(scratch.path(), &archive_args(&archive), &serve_partial());
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for trial in 0..trials {
        if !pg.is_running() {
            pg.start();
        }
        r.start();
        wait_sync(&pg, &r);
        let c = Committer::start(&pg, (trial as u64 + 1) * 1_000_000, 999_999);
        std::thread::sleep(Duration::from_millis(200 + rng.below(2300)));
        r.kill9();
        pg.stop_immediate();
        let acked = c.finish(Duration::from_secs(30));
        runs.push(((trial as u64 + 1) * 1_000_000, acked));
        let want: u64 = runs.iter().map(|(_, n)| n).sum();
        let dir = scratch.path().join(format!("restored-{trial}"));
        let mut restored = restore_through(&dir, &backup, mount.path());
        let have: u64 = restored.psql(&count_runs_sql(&runs)).parse().unwrap();
        restored.stop_immediate();
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("trial {}/{trials}: {acked} commits acknowledged, {have} of {want} acknowledged so far restored", trial + 1);
        if have != want {
            failed.push(format!(
                "trial {}: {} acknowledged commits missing",
                trial + 1,
                want - have
            ));
        }
    }
    eprintln!(
        "{} of {trials} trials passed (WALFS_RPO_SEED={seed})",
        trials - failed.len()
    );
    assert!(
        failed.is_empty(),
        "acknowledged commits lost (WALFS_RPO_SEED={seed}): {failed:?}\n--- receiver\n{}\n--- mount\n{}",
        r.log_tail(),
        mount.log_tail(30)
    );
    assert!(
        runs.iter().all(|(_, n)| *n > 0),
        "a trial committed nothing: {runs:?}"
    );
}

/// `WALFS_RPO_CYCLES` (default 50) `kill -9` and restart cycles of the receiver at random
/// moments under pgbench load: afterwards the archive holds every segment the server archived
/// itself, byte for byte, and `walfs verify` finds no gap.
#[test]
fn fifty_kill_dash_nine_cycles_under_load_leave_the_archive_whole() {
    let cycles = env_count("WALFS_RPO_CYCLES", 50);
    let (seed, mut rng) = seeded();
    let _watchdog = Watchdog::new("crash loop", Duration::from_secs(300 + 5 * cycles as u64));
    let scratch = scratch_dir("rpo-crashloop");
    let server_archive = scratch.path().join("server-archive");
    std::fs::create_dir_all(&server_archive).unwrap();
    chown_postgres(&server_archive);
    let mut pg = Postgres::init(
        &scratch.path().join("primary"),
        InitOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    );
    pg.set_conf(&format!(
        "archive_mode = on\narchive_command = 'cp %p {}/%f'",
        server_archive.display()
    ));
    pg.start();
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &pg.conninfo(), &[]);
    r.start();
    // pgbench runs as this user (trust auth), so that it can be stopped by its own PID.
    let mut bench = Command::new(pg_bin("pgbench"))
        .arg("-h")
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres"])
        .args(["-T", "600", "-c", "2", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let began = Instant::now();
    for _ in 0..cycles {
        std::thread::sleep(Duration::from_millis(100 + rng.below(700)));
        r.kill9();
        r.start();
    }
    let loop_time = began.elapsed();
    let _ = bench.kill(); // the pgbench started here, by its PID
    let _ = bench.wait();
    let last = pg.switch_wal();
    wait_archived(&archive, &last, &r);
    r.stop();
    pg.wait_archived_upto(&last);
    let n = assert_identical(&archive, &server_archive, &last, scratch.path());
    assert_verifies(
        &archive,
        &format!("after the crash loop (WALFS_RPO_SEED={seed})"),
    );
    eprintln!(
        "{cycles} kill -9 cycles in {loop_time:?} survived: {n} segments byte-identical to the server's archive, verify clean"
    );
    assert!(n >= 5, "only {n} segments compared");
}

/// The procedure the README gives for a failover with no data loss, as users run it:
/// - primary A archives through a walfs mount and has `walfs receive --synchronous` (same
///   host, same cache) as its synchronous standby; B is a standby that fell behind;
/// - A dies at a random moment while a client commits row by row;
/// - B, on another host, recovers through its own `--serve-partial` mount (its own cache: it
///   sees only the archive, so the last WAL reaches it as the receiver's final snapshot) until
///   it has the last acknowledged commit, and is promoted; its archiver pushes the new
///   timeline through that mount, into the same archive;
/// - the receiver is pointed at B and follows it onto timeline 2 as its synchronous standby;
/// - nothing acknowledged is lost, on B or in a restore of A's old base backup through both
///   timelines, and `walfs verify` finds the archive whole.
#[test]
fn a_failover_through_the_archive_loses_no_acknowledged_commit() {
    let (seed, mut rng) = seeded();
    let _watchdog = Watchdog::new("failover", Duration::from_secs(600));
    let scratch = scratch_dir("rpo-failover");
    let archive = scratch.path().join("archive");
    let host_a = scratch.path().join("a");
    // Host A: the mount A archives through and the receiver, one cache.
    let mount_a = WalfsMount::start(&host_a, &archive_args(&archive), &[]);
    let mut a = sync_primary(
        &scratch.path().join("pg-a"),
        &format!(
            "archive_mode = on\narchive_command = 'cp %p {}/%f'",
            mount_a.path().display()
        ),
    );
    let mut r = Receiver::new(&host_a, &archive, &a.conninfo(), &["--synchronous"]);
    r.start();
    wait_sync(&a, &r);
    let backup = scratch.path().join("backup");
    a.base_backup(&backup);
    // B: a standby made now, down while A takes commits: behind the receiver.
    let b_data = scratch.path().join("pg-b-data");
    a.base_backup_with(&b_data, &["-X", "stream", "-R"]);
    let host_b = scratch.path().join("b");
    let mount_b = WalfsMount::start(&host_b, &archive_args(&archive), &serve_partial());
    let mut b = Postgres::existing(&scratch.path().join("pg-b"), &b_data);
    b.set_conf(&format!(
        "hot_standby = on\nrestore_command = 'cp {m}/%f %p'\narchive_mode = on\n\
         archive_command = 'cp %p {m}/%f'\nsynchronous_standby_names = 'walfs'\n\
         synchronous_commit = on\nwal_retrieve_retry_interval = '1s'",
        m = mount_b.path().display()
    ));

    // A takes commits one by one and dies at a random moment.
    let first = 1_000_000;
    let c = Committer::start(&a, first, 999_999);
    assert!(
        c.wait_acked(1, Duration::from_secs(30)),
        "no commit acknowledged:\n{}",
        r.log_tail()
    );
    std::thread::sleep(Duration::from_millis(500 + rng.below(2500)));
    a.stop_immediate();
    let acked = c.finish(Duration::from_secs(30));
    eprintln!("A died after {acked} acknowledged commits (WALFS_RPO_SEED={seed})");

    // B catches up from the archive, to the last acknowledged commit, and is promoted.
    b.start();
    let have_all = |pg: &Postgres| {
        pg.try_psql(&count_runs_sql(&[(first, acked)]))
            .is_ok_and(|n| n == acked.to_string())
    };
    let caught_up = poll_until(Duration::from_secs(120), || have_all(&b));
    assert!(
        caught_up,
        "B never reached the last acknowledged commit (WALFS_RPO_SEED={seed}): it has {:?} of {acked}\n\
         --- B\n{}\n--- B's mount\n{}\n--- receiver\n{}",
        b.try_psql(&count_runs_sql(&[(first, acked)])),
        b.log_tail(30),
        mount_b.log_tail(30),
        r.log_tail()
    );
    b.psql("select pg_promote()");
    b.wait_recovery_done(Duration::from_secs(60));

    // The receiver follows B onto timeline 2, as its synchronous standby.
    r.stop();
    let mut r = Receiver::new(&host_a, &archive, &b.conninfo(), &["--synchronous"]);
    r.start();
    wait_sync(&b, &r);
    let first2 = 2_000_000;
    let c2 = Committer::start(&b, first2, 300);
    let acked2 = c2.finish(Duration::from_secs(60));
    assert_eq!(
        acked2,
        300,
        "commits on B did not complete:\n{}",
        r.log_tail()
    );
    let last2 = b.switch_wal();
    assert!(last2.starts_with("00000002"), "{last2}");
    wait_archived(&archive, &last2, &r);
    b.wait_archived_upto(&last2);
    r.stop();

    // Timeline 1's last segment is the receiver's tail snapshot (B restored it from the
    // archive, so B has no file of its own to archive as .partial); both timelines whole.
    let names = archived(&archive);
    assert!(names.contains(&"00000002.history".to_string()), "{names:?}");
    let snaps = stdout_str(&sh_ok(&mut walfs_cmd(&archive, &["ls", "--snapshots"])));
    assert!(
        snaps.lines().any(|l| l.starts_with("receiver/00000001")),
        "no tail snapshot of timeline 1: {snaps:?}"
    );
    assert_verifies(&archive, "");
    // Nothing acknowledged is lost: on B, and restoring A's old base backup through both
    // timelines from the archive alone.
    let runs = [(first, acked), (first2, acked2)];
    let want = (acked + acked2).to_string();
    assert_eq!(b.psql(&count_runs_sql(&runs)), want);
    let mount_c = WalfsMount::start(&scratch.path().join("c"), &archive_args(&archive), &[]);
    let restored = restore_through(&scratch.path().join("pg-c"), &backup, mount_c.path());
    assert_eq!(
        restored.psql(&count_runs_sql(&runs)),
        want,
        "a restore through both timelines lost acknowledged commits (WALFS_RPO_SEED={seed})"
    );
}

/// The failover wedge: walfs, the synchronous standby, is segments ahead of an asynchronous
/// standby B; the primary dies and B is promoted as it is. The new server refuses our
/// timeline-1 position (past its fork): the receiver must keep what it holds past the fork as
/// timeline 1's tail and stream timeline 2 from the fork, not reconnect for ever.
#[test]
fn the_receiver_follows_a_standby_promoted_behind_it() {
    let _watchdog = Watchdog::new("wedge", Duration::from_secs(600));
    let scratch = scratch_dir("rpo-wedge");
    let mut a = sync_primary(&scratch.path().join("pg-a"), "");
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &a.conninfo(), &["--synchronous"]);
    r.start();
    wait_sync(&a, &r);
    a.pgbench(&["-i", "-s", "1", "-q"]);
    let b_data = scratch.path().join("pg-b-data");
    a.base_backup_with(&b_data, &["-X", "stream", "-R"]);
    // B archives through a mount of its own into the same archive, as users run it: once
    // promoted, it pushes timeline 1's last segment as PostgreSQL's own `.partial`.
    let mount_b = WalfsMount::start(&scratch.path().join("b"), &archive_args(&archive), &[]);
    let mut b = Postgres::existing(&scratch.path().join("pg-b"), &b_data);
    b.set_conf(&format!(
        "hot_standby = on\narchive_mode = on\n\
         archive_command = 'cp %p {}/%f'",
        mount_b.path().display()
    ));
    b.start();
    // Some WAL B streams and replays, so that its timeline 1 ends inside a segment.
    a.pgbench(&["-t", "50"]);
    let lsn = a.psql("select pg_current_wal_lsn()");
    let caught = poll_until(Duration::from_secs(60), || {
        b.try_psql(&format!("select pg_last_wal_replay_lsn() >= '{lsn}'"))
            .is_ok_and(|v| v == "t")
    });
    assert!(caught, "B did not catch up:\n{}", b.log_tail(20));
    b.stop();
    // Two segments and more that only A and the receiver have.
    let fork = a.current_wal_file();
    a.pgbench(&["-t", "3000", "-c", "2"]);
    let ahead = a.current_wal_file();
    assert!(ahead.as_str() >= bump(&fork, 2).as_str(), "{fork} {ahead}");
    a.stop_immediate();
    // B is promoted with what it has; its commits do not wait for walfs (a receiver that
    // never follows fails the test at wait_archived, not by hanging).
    b.start();
    b.psql("alter system reset synchronous_standby_names");
    b.psql("select pg_reload_conf()");
    b.psql("select pg_promote()");
    b.wait_recovery_done(Duration::from_secs(60));
    r.stop();
    let before = r.log().len();
    let mut r = Receiver::new(scratch.path(), &archive, &b.conninfo(), &["--synchronous"]);
    r.start();
    b.pgbench(&["-t", "300"]);
    let last2 = b.switch_wal();
    assert!(last2.starts_with("00000002"), "{last2}");
    // The receiver itself has all of it (B archives too: the archive alone would not tell).
    let end = b.psql("select pg_current_wal_lsn()");
    let followed = poll_until(Duration::from_secs(90), || {
        b.try_psql(&format!(
            "select count(*) from pg_stat_replication where application_name = 'walfs' \
             and flush_lsn >= '{end}'"
        ))
        .is_ok_and(|n| n == "1")
    });
    assert!(
        followed,
        "the receiver did not stream B's timeline 2:\n{}",
        r.log_tail()
    );
    wait_archived(&archive, &last2, &r);
    b.wait_archived_upto(&last2);
    r.stop();
    let log = r.log()[before..].to_string();
    assert!(
        !log.contains("not in this server's history"),
        "the receiver asked B for WAL it does not have:\n{log}"
    );
    assert!(log.contains("forked from ours behind us"), "{log}");
    // Timeline 1 as the receiver had it stays: its tail as a snapshot.
    let snaps = stdout_str(&sh_ok(&mut walfs_cmd(&archive, &["ls", "--snapshots"])));
    assert!(
        snaps.lines().any(|l| l.starts_with("receiver/00000001")),
        "no tail snapshot of timeline 1: {snaps:?}"
    );
    let names = archived(&archive);
    assert!(
        names
            .iter()
            .any(|n| n.as_str() > fork.as_str() && n.starts_with("00000001")),
        "timeline 1 past the fork is gone: {names:?}"
    );
    // Beside it, B's own `.partial` of timeline 1 (it ends at the fork): two writers, two names.
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("00000001") && n.ends_with(".partial")),
        "B's archiver did not archive timeline 1's last segment: {names:?}\n--- B\n{}\n--- B's mount\n{}",
        b.log_tail(40),
        mount_b.log_tail(20)
    );
    assert_verifies(&archive, "");
}

/// The segment `n` after `name` on the same timeline (1 MiB segments: the low 8 hex digits
/// count segments of a 4 GiB "log" … 4096 to a log).
fn bump(name: &str, n: u64) -> String {
    let log = u64::from_str_radix(&name[8..16], 16).unwrap();
    let seg = u64::from_str_radix(&name[16..24], 16).unwrap();
    let total = log * 4096 + seg + n;
    format!("{}{:08X}{:08X}", &name[..8], total / 4096, total % 4096)
}

/// `walfs verify` of the archive passes (`when` says at which point, for the message).
fn assert_verifies(archive: &std::path::Path, when: &str) {
    let verify = run(&mut walfs_cmd(archive, &["verify"]));
    assert!(
        verify.status.success(),
        "walfs verify {when}:\n{}{}",
        stdout_str(&verify),
        stderr_str(&verify)
    );
}
