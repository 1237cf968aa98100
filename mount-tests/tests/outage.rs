//! Real PostgreSQL against a real S3-protocol server (moto) whose link walfs sees through a
//! proxy the tests cut: a recovery never ends early because the store is away, whether it
//! restores through the mount or with `walfs fetch`; a standby is never held from streaming or
//! from promotion; an archive that is not there stops a recovery instead of promoting it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use walfs_mount_tests::*;

/// How long walfs retries one request; the outages below last several times this.
const RETRY: u64 = 3;

struct Rig {
    scratch: TempDir,
    /// Kept running for the rig's lifetime.
    _s3: S3Server,
    proxy: FaultProxy,
    env: Vec<(String, String)>,
    args: Vec<String>,
}

impl Rig {
    fn new(tag: &str) -> Rig {
        let scratch = scratch_dir(tag);
        let s3 = S3Server::start();
        s3.create_bucket("wal");
        let proxy = FaultProxy::start(s3.port());
        let mut env = s3.env_through(&proxy);
        env.push(("WALFS_RETRY_TIMEOUT".into(), format!("{RETRY}s")));
        env.push(("WALFS_STANDBY_TIMEOUT".into(), "2s".into()));
        let key = keygen(&scratch.path().join("keys"));
        chown_postgres(&key);
        let args = vec![
            "--archive".to_string(),
            "s3://wal/cluster".to_string(),
            "--key-file".to_string(),
            key.display().to_string(),
        ];
        Rig {
            scratch,
            _s3: s3,
            proxy,
            env,
            args,
        }
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// A mount in its own directory (its own cold cache), with `more` mount options.
    fn mount(&self, name: &str, more: &[&str]) -> WalfsMount {
        let dir = self.dir(name);
        std::fs::create_dir_all(&dir).unwrap();
        let more: Vec<String> = more.iter().map(|s| s.to_string()).collect();
        WalfsMount::start_with(&dir, &self.args, &more, &self.env)
    }

    /// A primary (1 MiB segments) that archived a pgbench history through a mount, and a base
    /// backup taken before it; returns the backup and the primary's final fingerprint, and the
    /// primary still running with its mount if `keep_running`.
    fn archived_history(
        &self,
        keep_running: bool,
    ) -> (Option<(Postgres, WalfsMount)>, PathBuf, String) {
        let mount = self.mount("archiver", &[]);
        let mut primary = Postgres::init(
            &self.dir("primary"),
            InitOptions {
                wal_segsize_mb: 1,
                ..Default::default()
            },
        );
        primary.set_conf(&format!(
            "archive_mode = on\narchive_command = 'cp %p {}/%f'",
            mount.path().display()
        ));
        primary.start();
        primary.pgbench(&["-i", "-s", "2"]);
        let backup = self.dir("backup");
        primary.base_backup(&backup);
        primary.pgbench(&["-t", "400", "-c", "2"]);
        let fingerprint = primary.psql(FINGERPRINT_SQL);
        let last = primary.switch_wal();
        primary.wait_archived_upto(&last);
        if keep_running {
            return (Some((primary, mount)), backup, fingerprint);
        }
        primary.stop();
        drop(mount);
        (None, backup, fingerprint)
    }

    /// `env K=V … walfs --config /dev/null ARGS`: a walfs command line for restore_command.
    fn walfs_command(&self, bin: &Path) -> String {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!(
            "env {} {} --config /dev/null {}",
            env.join(" "),
            bin.display(),
            self.args.join(" ")
        )
    }
}

/// Restores `backup` with `restore_command` (followed by a note of each file restored), cuts
/// the store once three files were restored, for five times walfs's retry timeout, and checks
/// the server recovers to exactly `fingerprint` without ever ending recovery early.
fn recover_through_an_outage(rig: &Rig, backup: &Path, restore_command: &str, fingerprint: &str) {
    let list = rig.dir("restored.list");
    std::fs::write(&list, b"").unwrap();
    chown_postgres(&list);
    // The short pause after each file lets the test cut the store between two restores.
    let command = format!(
        "{restore_command} && echo %f >> {} && sleep 0.2",
        list.display()
    );
    let mut restored = Postgres::existing(&rig.dir("restored"), backup);
    restored.enable_recovery(&command);
    let outage = Duration::from_secs(5 * RETRY);
    // pg_ctl -w may wait through the outage: it starts on a thread while this one cuts.
    let started = std::thread::scope(|s| {
        let server = s.spawn(|| {
            restored.start();
            restored
        });
        let cut = poll_until(Duration::from_secs(120), || {
            std::fs::read_to_string(&list)
                .is_ok_and(|l| l.lines().filter(|l| is_wal_segment_name(l)).count() >= 3)
        });
        assert!(cut, "three segments were never restored");
        rig.proxy.set_down(true);
        let t0 = Instant::now();
        std::thread::sleep(outage);
        rig.proxy.set_down(false);
        let server = server.join().expect("starting the restored server");
        (server, t0)
    });
    let (restored, cut_at) = started;
    restored.wait_recovery_done(Duration::from_secs(180));
    assert!(
        cut_at.elapsed() >= outage,
        "recovery ended {:?} into a {outage:?} outage",
        cut_at.elapsed()
    );
    assert_eq!(
        restored.psql(FINGERPRINT_SQL),
        fingerprint,
        "the recovered cluster lacks WAL: recovery ended early\n{}",
        restored.log_tail(30)
    );
    let log = std::fs::read_to_string(restored.log_path()).unwrap_or_default();
    assert!(
        !log.contains("FATAL") && !log.contains("could not restore file"),
        "{log}"
    );
    let restored_files = std::fs::read_to_string(&list).unwrap_or_default();
    assert!(
        restored_files.lines().count() > 3,
        "nothing restored after the outage: {restored_files}"
    );
}

#[test]
fn a_recovery_through_the_mount_waits_out_a_store_outage() {
    let rig = Rig::new("outage-mount");
    let (_, backup, fingerprint) = rig.archived_history(false);
    // A cold, read-only mount without read-ahead: every segment comes from the store on demand.
    let mount = rig.mount("restorer", &["--read-only", "--prefetch-bytes", "0"]);
    let restore = format!("cp {}/%f %p", mount.path().display());
    recover_through_an_outage(&rig, &backup, &restore, &fingerprint);
    let log = mount.log();
    assert!(
        log.contains("waiting for it") && log.contains("role=recovery"),
        "the mount never said it waited:\n{}",
        mount.log_tail(30)
    );
    assert!(log.contains("answers again"), "{}", mount.log_tail(30));
    drop(mount);
}

#[test]
fn a_recovery_with_walfs_fetch_waits_out_a_store_outage() {
    let rig = Rig::new("outage-fetch");
    let (_, backup, fingerprint) = rig.archived_history(false);
    let bin = rig.dir("walfs");
    std::fs::copy(walfs_bin(), &bin).unwrap();
    let restore = format!("{} fetch %f %p", rig.walfs_command(&bin));
    recover_through_an_outage(&rig, &backup, &restore, &fingerprint);
}

#[test]
fn a_standby_streams_through_an_outage_and_can_be_promoted() {
    let rig = Rig::new("outage-standby");
    let (primary, backup, _) = rig.archived_history(true);
    let (primary, archiver) = primary.expect("a running primary");
    let mount = rig.mount("standby-mount", &["--read-only"]);
    let mut standby = Postgres::existing(&rig.dir("standby"), &backup);
    standby.set_conf(&format!(
        "archive_mode = off\nrestore_command = 'cp {}/%f %p'\nprimary_conninfo = '{}'",
        mount.path().display(),
        primary.conninfo()
    ));
    let signal = standby.data_dir().join("standby.signal");
    std::fs::write(&signal, b"").unwrap();
    chown_postgres(&signal);
    // The store is away from the start: the standby's first restore fails fast, and it streams.
    rig.proxy.set_down(true);
    let t0 = Instant::now();
    standby.start();
    primary.pgbench(&["-t", "200", "-c", "2"]);
    let target = primary.psql("select pg_current_wal_lsn()");
    let caught_up = poll_until(Duration::from_secs(60), || {
        standby
            .try_psql(&format!(
                "select pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
            ))
            .is_ok_and(|v| v == "t")
    });
    assert!(
        caught_up,
        "the standby did not catch up by streaming while the store was away\n{}\n{}",
        standby.log_tail(30),
        mount.log_tail(20)
    );
    assert_eq!(
        standby.psql("select status from pg_stat_wal_receiver"),
        "streaming"
    );
    assert!(
        mount.log().contains("role=standby"),
        "{}",
        mount.log_tail(20)
    );
    // Promotion looks for history files in the archive: it is not held for long either.
    let t1 = Instant::now();
    sh_ok(
        as_postgres(pg_bin("pg_ctl"))
            .args(["promote", "-w", "-t", "60", "-D"])
            .arg(standby.data_dir()),
    );
    standby.wait_recovery_done(Duration::from_secs(60));
    assert!(
        t1.elapsed() < Duration::from_secs(45),
        "promotion took {:?}",
        t1.elapsed()
    );
    assert!(t0.elapsed() < Duration::from_secs(150));
    rig.proxy.set_down(false);
    drop(standby);
    drop(primary);
    drop(archiver);
    drop(mount);
}

#[test]
fn an_archive_that_is_not_there_stops_a_recovery_instead_of_promoting_it() {
    let rig = Rig::new("outage-noarchive");
    let (_, backup, _) = rig.archived_history(false);
    // A mistyped prefix, mounted read-write: a new, empty archive to the archiver ...
    let mut wrong = rig.args.clone();
    wrong[1] = "s3://wal/clutser".to_string();
    let dir = rig.dir("wrong");
    std::fs::create_dir_all(&dir).unwrap();
    let mount = WalfsMount::start(&dir, &wrong, &rig.env);
    assert!(
        mount.log().contains("new and empty"),
        "{}",
        mount.log_tail(10)
    );
    // ... but never "absent" to a recovering server: it stops with FATAL, nothing promoted.
    let restored = Postgres::existing(&rig.dir("restored"), &backup);
    restored.enable_recovery(&format!("cp {}/%f %p", mount.path().display()));
    let mut pg_ctl = as_postgres(pg_bin("pg_ctl"));
    pg_ctl
        .args(["start", "-w", "-t", "60", "-D"])
        .arg(restored.data_dir())
        .arg("-l")
        .arg(restored.log_path());
    let out = run(&mut pg_ctl);
    let stopped = poll_until(Duration::from_secs(30), || {
        !restored.data_dir().join("postmaster.pid").exists()
    });
    if !stopped {
        let _ = run(as_postgres(pg_bin("pg_ctl"))
            .args(["stop", "-m", "immediate", "-D"])
            .arg(restored.data_dir()));
    }
    assert!(
        !out.status.success(),
        "the server started on an empty archive"
    );
    let log = std::fs::read_to_string(restored.log_path()).unwrap_or_default();
    assert!(stopped, "still running:\n{log}");
    assert!(
        log.contains("FATAL") && !log.contains("selected new timeline"),
        "{log}"
    );
    assert!(
        !restored.data_dir().join("pg_wal/00000002.history").exists(),
        "promoted onto a new timeline"
    );
    assert!(
        mount.log().contains("killed restore_command"),
        "{}",
        mount.log_tail(20)
    );
    // A read-only mount of it refuses to start at all, and says why.
    std::fs::create_dir_all(rig.dir("ro-mnt")).unwrap();
    let out = run(Command::new(walfs_bin())
        .env("WALFS_CONFIG", "/dev/null")
        .envs(rig.env.iter().map(|(k, v)| (k, v)))
        .args(&wrong)
        .arg("--cache-dir")
        .arg(rig.dir("ro-cache"))
        .arg("mount")
        .arg(rig.dir("ro-mnt"))
        .arg("--read-only"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr_str(&out));
    assert!(
        stderr_str(&out).contains("no walfs archive"),
        "{}",
        stderr_str(&out)
    );
    drop(mount);
}
