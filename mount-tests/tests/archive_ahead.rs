//! Archive-ahead under real PostgreSQL: a backlog of ready segments (archive_command failing
//! while pgbench writes), then `cp %p MOUNT/%f`. The mount uploads the ready segments before
//! their `cp`, each close confirms the bytes, and every archived segment is byte for byte the
//! server's; with archive-ahead off nothing is stored ahead.

use std::path::Path;
use std::process::Command;
use walfs_mount_tests::*;

/// The segments marked ready in `pg_wal`, copied aside (PostgreSQL recycles them once archived).
fn copy_ready(pg: &Postgres, to: &Path) -> Vec<String> {
    std::fs::create_dir_all(to).unwrap();
    let status = pg.data_dir().join("pg_wal/archive_status");
    let mut names: Vec<String> = std::fs::read_dir(&status)
        .unwrap()
        .filter_map(|e| {
            let n = e.ok()?.file_name().to_string_lossy().into_owned();
            let n = n.strip_suffix(".ready")?.to_string();
            (n.len() == 24).then_some(n)
        })
        .collect();
    names.sort();
    for n in &names {
        std::fs::copy(pg.data_dir().join("pg_wal").join(n), to.join(n)).unwrap();
    }
    names
}

thread_local! {
    static LAST_LOG: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

fn run_with(ahead: bool) -> (usize, usize) {
    let scratch = scratch_dir(if ahead { "ahead-on" } else { "ahead-off" });
    let archive = scratch.path().join("archive");
    let key = keygen(&scratch.path().join("keys"));
    let mount = WalfsMount::start_with(
        scratch.path(),
        &local_args(&archive, Some(&key)),
        &[format!("--archive-ahead={ahead}")],
        &[],
    );
    let mut pg = Postgres::init(
        &scratch.path().join("pg"),
        InitOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    );
    // Failing at first: ready segments pile up.
    pg.set_conf("archive_mode = on\narchive_command = 'false'");
    pg.start();
    pg.pgbench(&["-i", "-s", "2"]);
    let last = pg.switch_wal();
    let ready = copy_ready(&pg, &scratch.path().join("server"));
    assert!(ready.len() >= 20, "a backlog: {ready:?}");
    pg.psql(&format!(
        "alter system set archive_command = 'cp %p {}/%f'",
        mount.path().display()
    ));
    pg.psql("select pg_reload_conf()");
    // Once cp archives (the failures of `false` are over), count failures afresh.
    wait_for(
        "the first segment archived",
        std::time::Duration::from_secs(60),
        || {
            !pg.psql("select coalesce(last_archived_wal, '') from pg_stat_archiver")
                .is_empty()
        },
    );
    pg.psql("select pg_stat_reset_shared('archiver')");
    pg.wait_archived_upto(&last);
    // No cp failed: a segment stored ahead never appears between cp's check for its
    // destination and its exclusive create.
    assert_eq!(
        pg.psql("select failed_count from pg_stat_archiver"),
        "0",
        "{}",
        pg.archiver_status()
    );
    // Every ready segment is archived, and is the server's byte for byte.
    for n in &ready {
        let got = std::fs::read(mount.file(n)).unwrap_or_else(|e| panic!("{n}: {e}"));
        let want = std::fs::read(scratch.path().join("server").join(n)).unwrap();
        assert!(got == want, "{n} differs from the server's");
    }
    let log = mount.log();
    LAST_LOG.with(|l| *l.borrow_mut() = log.lines().take(60).collect::<Vec<_>>().join("\n"));
    let confirmed = log
        .lines()
        .filter(|l| l.contains("stored ahead; the bytes cp wrote are those stored"))
        .count();
    drop(mount);
    sh_ok(
        Command::new(walfs_bin())
            .env("WALFS_CONFIG", "/dev/null")
            .args(local_args(&archive, Some(&key)))
            .arg("verify"),
    );
    (ready.len(), confirmed)
}

#[test]
fn ready_segments_are_stored_ahead_and_every_close_confirms_the_bytes() {
    let (ready, confirmed) = run_with(true);
    // The first cp starts the watcher; the backlog behind it is stored ahead.
    assert!(
        confirmed * 2 >= ready,
        "{confirmed} of {ready} ready segments confirmed as stored ahead\n{}",
        LAST_LOG.with(|l| l.borrow().clone())
    );
    let (_, confirmed) = run_with(false);
    assert_eq!(confirmed, 0, "archive-ahead off stores nothing ahead");
}
