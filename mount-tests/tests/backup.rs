//! `walfs backup`, `walfs backup list` and `walfs restore` against real PostgreSQL: a backup
//! taken under pgbench load with a tablespace, restored to the end of the archive and to a
//! restore point and compared with the source's state at that point; a backup killed
//! mid-stream is never usable; a damaged chunk fails the restore loudly and leaves a
//! directory PostgreSQL refuses to start.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use walfs_mount_tests::*;

/// What the source holds: pgbench's tables and the table in the tablespace.
const FINGERPRINT: &str = "select (select count(*) from pgbench_history) || ':' || \
     (select sum(abalance) from pgbench_accounts) || ':' || (select count(*) from in_ts) || ':' || \
     (select coalesce(sum(i), 0) from in_ts)";

/// A primary archiving with `walfs push` into a keyed local archive; everything owned by
/// postgres, which runs walfs here as in a real deployment.
struct Setup {
    scratch: tempfile::TempDir,
    bin: PathBuf,
    key: PathBuf,
    archive: PathBuf,
    tablespace: PathBuf,
    primary: Postgres,
    /// The archive's URL, and what walfs needs in its environment to reach it.
    url: String,
    env: Vec<(String, String)>,
}

impl Setup {
    /// A keyed local archive (`scratch/archive`).
    fn new(tag: &str) -> Setup {
        Setup::on(tag, None)
    }

    /// An archive at `store` (URL and environment), or a local one.
    fn on(tag: &str, store: Option<(String, Vec<(String, String)>)>) -> Setup {
        let scratch = scratch_dir(tag);
        let bin = scratch.path().join("walfs");
        std::fs::copy(walfs_bin(), &bin).expect("copy walfs");
        let key = keygen(&scratch.path().join("keys"));
        let archive = scratch.path().join("archive");
        std::fs::create_dir_all(&archive).expect("archive dir");
        chown_postgres(&key);
        chown_postgres(&archive);
        let tablespace = scratch.path().join("ts");
        std::fs::create_dir_all(&tablespace).expect("tablespace dir");
        chown_postgres(&tablespace);
        let primary = Postgres::init(
            &scratch.path().join("primary"),
            InitOptions {
                wal_segsize_mb: 1,
                ..Default::default()
            },
        );
        let (url, env) =
            store.unwrap_or_else(|| (format!("file://{}", archive.display()), Vec::new()));
        let s = Setup {
            scratch,
            bin,
            key,
            archive,
            tablespace,
            url,
            env,
            primary: {
                primary.set_conf("archive_mode = on");
                primary
            },
        };
        s.primary
            .set_conf(&format!("archive_command = '{} push %p'", s.walfs_prefix()));
        s
    }

    /// walfs as a shell command (archive_command, restore_command), its environment included.
    fn walfs_prefix(&self) -> String {
        let env: String = self.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        format!(
            "env {env}{} --config /dev/null --archive {} --key-file {}",
            self.bin.display(),
            self.url,
            self.key.display()
        )
    }

    /// walfs with this archive and key, as postgres.
    fn walfs(&self, args: &[&str]) -> Command {
        let mut c = as_postgres(&self.bin);
        self.walfs_args(&mut c);
        c.args(args);
        c
    }

    /// walfs with this archive and key, as root (to be killed by PID; what root creates in a
    /// local archive, postgres cannot write into).
    fn walfs_root(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        self.walfs_args(&mut c);
        c.args(args);
        c
    }

    fn walfs_args(&self, c: &mut Command) {
        c.envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["--config", "/dev/null", "--archive", &self.url])
            .arg("--key-file")
            .arg(&self.key);
    }

    /// `walfs backup` as postgres.
    fn take(&self, conninfo: &str) {
        sh_ok(&mut self.walfs(&["backup", "-d", conninfo]));
    }

    /// The names in the archive (`walfs ls`).
    fn archived(&self) -> Vec<String> {
        stdout_str(&sh_ok(&mut self.walfs(&["ls"])))
            .lines()
            .filter_map(|l| l.split('\t').next().map(str::to_string))
            .collect()
    }

    fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres",
            self.primary.socket_dir().display(),
            self.primary.port()
        )
    }

    fn list(&self) -> serde_json::Value {
        let out = sh_ok(&mut self.walfs(&["backup", "list", "--json"]));
        serde_json::from_slice(&out.stdout).expect("backup list --json is JSON")
    }

    /// A directory for a restored cluster: `dir/data` (not created) and `dir/ts`.
    fn restore_dir(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self.scratch.path().join(name);
        std::fs::create_dir_all(&dir).expect("restore dir");
        chown_postgres(&dir);
        (dir.clone(), dir.join("data"), dir.join("ts"))
    }

    /// `walfs restore` as postgres, then the server started and its recovery waited out.
    fn restore_and_start(&self, name: &str, extra: &[&str]) -> Postgres {
        let (dir, data, ts) = self.restore_dir(name);
        let map = format!("{}={}", self.tablespace.display(), ts.display());
        let mut args = vec!["restore", data.to_str().expect("utf-8 path"), "-T", &map];
        args.extend_from_slice(extra);
        let out = sh_ok(&mut self.walfs(&args));
        assert!(
            stdout_str(&out).contains("restored backup"),
            "{}",
            stdout_str(&out)
        );
        let mut pg = Postgres::existing(&dir, &data);
        pg.start();
        pg.wait_recovery_done(Duration::from_secs(120));
        pg
    }
}

fn start_load(pg: &Postgres, seconds: u32) -> std::process::Child {
    as_postgres(pg_bin("pgbench"))
        .args(["-h"])
        .arg(pg.socket_dir())
        .args(["-p", &pg.port().to_string(), "-U", "postgres"])
        .args(["-c", "2", "-T", &seconds.to_string(), "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start pgbench")
}

#[test]
fn a_backup_under_load_restores_to_the_end_and_to_a_restore_point() {
    let mut s = Setup::new("backup-load");
    s.primary.start();
    s.primary.pgbench(&["-i", "-s", "3"]);
    s.primary.psql(&format!(
        "create tablespace ts location '{}'",
        s.tablespace.display()
    ));
    s.primary
        .psql("create table in_ts (i int) tablespace ts; insert into in_ts select generate_series(1, 1000)");
    let mut load = start_load(&s.primary, 8);
    let out = sh_ok(&mut s.walfs(&["backup", "-d", &s.conninfo(), "--chunk-size", "1MiB"]));
    assert!(
        stdout_str(&out).contains("complete"),
        "{}",
        stdout_str(&out)
    );
    assert!(load.wait().expect("pgbench").success(), "pgbench failed");

    // A restore point, then more work after it.
    s.primary
        .psql("insert into in_ts select generate_series(1, 500)");
    s.primary.psql("select pg_create_restore_point('walfs_rp')");
    let at_point = s.primary.psql(FINGERPRINT);
    // A time between the restore point and what follows, a whole second clear of both.
    std::thread::sleep(Duration::from_millis(1500));
    let at_time = s
        .primary
        .psql("select to_char(now() at time zone 'utc', 'YYYY-MM-DD HH24:MI:SS')");
    std::thread::sleep(Duration::from_millis(1500));
    s.primary.pgbench(&["-c", "2", "-t", "200"]);
    s.primary
        .psql("insert into in_ts select generate_series(1, 700)");
    let at_end = s.primary.psql(FINGERPRINT);
    assert_ne!(at_point, at_end);
    let last = s.primary.switch_wal();
    s.primary.wait_archived_upto(&last);

    let listed = s.list();
    let backups = listed.as_array().expect("an array");
    assert_eq!(backups.len(), 1, "{listed:#}");
    let b = &backups[0];
    assert_eq!(b["complete"], true, "{b:#}");
    assert_eq!(b["missing_wal"].as_array().map(Vec::len), Some(0), "{b:#}");
    let archives = b["record"]["archives"].as_array().expect("archives");
    assert_eq!(archives.len(), 2, "base.tar and the tablespace: {b:#}");
    assert!(
        b["record"]["archives"][0]["chunks"].as_u64() > Some(1)
            || b["record"]["archives"][1]["chunks"].as_u64() > Some(1),
        "1 MiB chunks: the data directory spans several: {b:#}"
    );
    let text = stdout_str(&sh_ok(&mut s.walfs(&["backup", "list"])));
    assert!(text.contains("WAL present"), "{text}");
    s.primary.stop();

    let end = s.restore_and_start("to-end", &[]);
    assert_eq!(end.psql(FINGERPRINT), at_end, "restored to the end");
    drop(end);
    let point = s.restore_and_start("to-point", &["--target-name", "walfs_rp"]);
    assert_eq!(
        point.psql(FINGERPRINT),
        at_point,
        "restored to the restore point"
    );
    drop(point);
    let time = s.restore_and_start("to-time", &["--target-time", &at_time]);
    assert_eq!(
        time.psql(FINGERPRINT),
        at_point,
        "restored to {at_time} UTC"
    );
}

#[test]
fn an_interrupted_backup_is_never_used_and_a_damaged_one_fails_restore_loudly() {
    let mut s = Setup::new("backup-bad");
    s.primary.start();
    s.primary.pgbench(&["-i", "-s", "2"]);
    s.primary.psql(&format!(
        "create tablespace ts location '{}'",
        s.tablespace.display()
    ));
    s.primary
        .psql("create table in_ts (i int) tablespace ts; insert into in_ts select 1");

    // Killed mid-stream: slowed to 1 MiB/s, killed once its first chunks are stored.
    let progress_port = free_port();
    let mut child = s
        .walfs_root(&[
            "backup",
            "-d",
            &s.conninfo(),
            "--chunk-size",
            "256KiB",
            "--max-rate",
            "1MiB",
            "--metrics-addr",
            &format!("127.0.0.1:{progress_port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start walfs backup");
    let backups_dir = s.archive.join("backups");
    let started = poll_until(Duration::from_secs(60), || {
        std::fs::read_dir(&backups_dir)
            .into_iter()
            .flatten()
            .flatten()
            .any(|d| {
                std::fs::read_dir(d.path())
                    .map(|f| f.count() >= 2)
                    .unwrap_or(false)
            })
    });
    // Its progress is in its metrics while it runs (published once a second: the figure may
    // trail the chunks already stored by a second's worth).
    let mut streamed = 0.0;
    poll_until(Duration::from_secs(10), || {
        streamed = scrape(progress_port)
            .and_then(|t| metric(&t, "walfs_backup_streamed_bytes"))
            .unwrap_or(0.0);
        streamed >= 256.0 * 1024.0
    });
    let still_running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill -9 the backup");
    let _ = child.wait();
    assert!(started, "no chunk stored within 60 s");
    assert!(still_running, "the backup ended before it could be killed");
    assert!(
        streamed >= 256.0 * 1024.0,
        "walfs_backup_streamed_bytes: {streamed}"
    );
    let listed = s.list();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed:#}");
    assert_eq!(listed[0]["complete"], false, "{listed:#}");
    let name = listed[0]["name"].as_str().expect("name").to_string();
    let text = stdout_str(&sh_ok(&mut s.walfs(&["backup", "list"])));
    assert!(text.contains("INCOMPLETE"), "{text}");
    let (_, data, _) = s.restore_dir("from-incomplete");
    let out = sh_fails(&mut s.walfs(&["restore", data.to_str().unwrap(), "--backup", &name]));
    assert!(
        stderr_str(&out).contains("incomplete"),
        "{}",
        stderr_str(&out)
    );
    let out = sh_fails(&mut s.walfs(&["restore", data.to_str().unwrap()]));
    assert!(
        stderr_str(&out).contains("no complete backup"),
        "{}",
        stderr_str(&out)
    );

    // A complete backup with one chunk damaged in the bucket.
    sh_ok(&mut s.walfs_root(&["backup", "-d", &s.conninfo(), "--chunk-size", "256KiB"]));
    let listed = s.list();
    let good = listed
        .as_array()
        .and_then(|a| a.iter().find(|b| b["complete"] == true))
        .expect("a complete backup");
    let good_name = good["name"].as_str().expect("name");

    // A mount's /metrics says how old the newest backup is (what an alert watches).
    let port = free_port();
    let mut mount = WalfsMount::start_with(
        &s.scratch.path().join("m"),
        &local_args(&s.archive, Some(&s.key)),
        &[
            "--read-only".into(),
            "--metrics-addr".into(),
            format!("127.0.0.1:{port}"),
        ],
        &[],
    );
    let mut age = None;
    poll_until(Duration::from_secs(30), || {
        age = scrape(port).and_then(|t| metric(&t, "walfs_backup_newest_age_seconds"));
        age.is_some()
    });
    assert!(
        age.is_some_and(|a| (0.0..600.0).contains(&a)),
        "walfs_backup_newest_age_seconds: {age:?}"
    );

    // The mount shows the complete backup, never the killed one, as plain tars that stock
    // tools restore: extracted with tar and checked with pg_verifybackup against the manifest.
    let names = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("list {}: {e}", dir.display()))
            .map(|d| d.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert!(names(mount.path()).contains(&"backups".to_string()));
    assert_eq!(names(&mount.path().join("backups")), [good_name]);
    let shown = mount.path().join("backups").join(good_name);
    let files = names(&shown);
    let ts_tar: Vec<&String> = files
        .iter()
        .filter(|f| f.ends_with(".tar") && *f != "base.tar")
        .collect();
    assert!(
        files.contains(&"base.tar".to_string())
            && files.contains(&"backup_manifest".to_string())
            && ts_tar.len() == 1,
        "{files:?}"
    );
    assert_eq!(
        std::fs::metadata(shown.join("base.tar"))
            .expect("stat base.tar")
            .len(),
        good["record"]["archives"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["name"] == "base.tar"))
            .and_then(|t| t["bytes"].as_u64())
            .expect("base.tar's bytes"),
    );
    let (_, untarred, _) = s.restore_dir("from-mount");
    let oid = ts_tar[0].trim_end_matches(".tar");
    let ts_dir = untarred.join("pg_tblspc").join(oid);
    sh_ok(as_postgres("mkdir").arg("-p").arg(&ts_dir));
    sh_ok(
        as_postgres("tar")
            .arg("-x")
            .arg("-f")
            .arg(shown.join("base.tar"))
            .arg("-C")
            .arg(&untarred),
    );
    sh_ok(
        as_postgres("tar")
            .arg("-x")
            .arg("-f")
            .arg(shown.join(ts_tar[0]))
            .arg("-C")
            .arg(&ts_dir),
    );
    let out = sh_ok(
        as_postgres(pg_bin("pg_verifybackup"))
            .arg("--no-parse-wal")
            .arg("--manifest-path")
            .arg(shown.join("backup_manifest"))
            .arg(&untarred),
    );
    assert!(
        stdout_str(&out).contains("successfully verified"),
        "{}",
        stdout_str(&out)
    );
    // Nothing there can be written.
    let err = std::fs::write(shown.join("extra"), b"x").expect_err("a write into backups/");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    mount.stop();
    let chunk = s
        .archive
        .join("backups")
        .join(good_name)
        .join("base.tar.000002");
    let mut bytes = std::fs::read(&chunk).expect("read a chunk");
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&chunk, &bytes).expect("damage a chunk");
    let (_, data, ts) = s.restore_dir("from-damaged");
    let map = format!("{}={}", s.tablespace.display(), ts.display());
    // As root, into directories made for postgres: what it restores is postgres's.
    let out = sh_fails(&mut s.walfs_root(&[
        "restore",
        data.to_str().unwrap(),
        "--backup",
        good_name,
        "-T",
        &map,
    ]));
    let err = stderr_str(&out);
    assert!(
        err.contains("base.tar") && err.contains("incomplete"),
        "the failure names the archive and says the directory is incomplete: {err}"
    );
    assert!(
        !data.join("global/pg_control").exists(),
        "a failed restore must not leave pg_control behind"
    );
    assert!(!data.join("recovery.signal").exists());
    assert_eq!(out.status.code(), Some(4), "damage exits 4: {err}");
    // Through a mount, the damaged chunk is an I/O error, never bytes and never a short file.
    let mut mount = WalfsMount::start_with(
        &s.scratch.path().join("m2"),
        &local_args(&s.archive, Some(&s.key)),
        &["--read-only".into()],
        &[],
    );
    let out = sh_fails(
        Command::new("cp")
            .arg(
                mount
                    .path()
                    .join("backups")
                    .join(good_name)
                    .join("base.tar"),
            )
            .arg(s.scratch.path().join("copied.tar")),
    );
    assert!(
        stderr_str(&out).contains("Input/output error"),
        "{}",
        stderr_str(&out)
    );
    mount.stop();

    // verify lists chunks; --deep opens them and finds the damage.
    sh_ok(&mut s.walfs(&["verify"]));
    let out = sh_fails(&mut s.walfs(&["verify", "--deep"]));
    assert_eq!(out.status.code(), Some(4), "{}", stdout_str(&out));
    assert!(
        stdout_str(&out).contains(&format!("backup {good_name}: DAMAGED")),
        "{}",
        stdout_str(&out)
    );

    // A chunk the record lists is deleted: the backup is damaged, not restorable.
    std::fs::remove_file(
        s.archive
            .join("backups")
            .join(good_name)
            .join("base.tar.000001"),
    )
    .expect("remove a chunk");
    let text = stdout_str(&sh_ok(&mut s.walfs(&["backup", "list"])));
    assert!(
        text.contains("DAMAGED") && text.contains("base.tar.000001"),
        "{text}"
    );
    let out = sh_fails(&mut s.walfs(&["verify"]));
    assert_eq!(out.status.code(), Some(4), "{}", stdout_str(&out));

    // A forged or damaged record: that backup is listed as damaged and never chosen.
    let record = s
        .archive
        .join("backups")
        .join(good_name)
        .join("backup.json");
    let mut bytes = std::fs::read(&record).expect("read the record");
    let at = bytes.len() - 20;
    bytes[at] ^= 1;
    std::fs::write(&record, &bytes).expect("damage the record");
    let text = stdout_str(&sh_ok(&mut s.walfs(&["backup", "list"])));
    assert!(text.contains("DAMAGED"), "{text}");
    let (_, data, _) = s.restore_dir("from-damaged-record");
    let out = sh_fails(&mut s.walfs(&["restore", data.to_str().unwrap()]));
    assert!(
        stderr_str(&out).contains("no complete backup"),
        "{}",
        stderr_str(&out)
    );
}

/// The segment number of an archive name (`TTTTTTTTXXXXXXXXYYYYYYYY…`) with 1 MiB segments.
fn segno_1mib(name: &str) -> Option<u64> {
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    if name.len() < 24 || name.ends_with(".history") {
        return None;
    }
    Some(hex(&name[8..16])? * 4096 + hex(&name[16..24])?)
}

#[test]
fn retention_by_backup_keeps_what_kept_backups_need_across_two_timelines() {
    let mut s = Setup::new("backup-retain");
    s.primary.start();
    s.primary.pgbench(&["-i", "-s", "1"]);
    s.primary.psql(&format!(
        "create tablespace ts location '{}'",
        s.tablespace.display()
    ));
    s.primary.psql("create table in_ts (i int) tablespace ts");
    s.take(&s.conninfo());
    s.primary.pgbench(&["-c", "2", "-t", "300"]);
    s.take(&s.conninfo());
    s.primary.pgbench(&["-c", "2", "-t", "100"]);
    s.primary.psql("select pg_create_restore_point('fork')");
    s.primary.pgbench(&["-c", "2", "-t", "100"]);
    let last = s.primary.switch_wal();
    s.primary.wait_archived_upto(&last);
    s.primary.stop();
    let listed = s.list();
    let names: Vec<String> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names.len(), 2, "{listed:#}");
    let (a, b) = (names[0].clone(), names[1].clone());

    // Timeline 2: backup B restored to the restore point, promoted, archiving into the
    // same archive; a third backup taken there.
    let mut tl2 = s.restore_and_start(
        "tl2",
        &["--backup", &b, "--target-name", "fork", "--keep-archiving"],
    );
    tl2.pgbench(&["-c", "2", "-t", "200"]);
    let tl2_conn = format!(
        "host={} port={} user=postgres",
        tl2.socket_dir().display(),
        tl2.port()
    );
    s.take(&tl2_conn);
    tl2.pgbench(&["-c", "2", "-t", "200"]);
    let at_end = tl2.psql(FINGERPRINT);
    let last = tl2.switch_wal();
    tl2.wait_archived_upto(&last);
    assert!(last.starts_with("00000002"), "{last}");
    tl2.stop();

    // Keep the newest two: A goes, and exactly the WAL before B's start.
    let dry = sh_ok(&mut s.walfs(&["delete", "--retain", "2", "--json"]));
    let plan: serde_json::Value = serde_json::from_slice(&dry.stdout).expect("json");
    assert_eq!(
        plan["backups"]["delete"],
        serde_json::json!([a]),
        "{plan:#}"
    );
    let b_start = s.list()[1]["record"]["start_lsn"]
        .as_str()
        .expect("start")
        .to_string();
    let (hi, lo) = b_start.split_once('/').expect("lsn");
    let cut =
        ((u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()) >> 20;
    let deleted: Vec<String> = plan["wal"]["delete"]
        .as_array()
        .expect("delete")
        .iter()
        .map(|v| v.as_str().expect("name").to_string())
        .collect();
    assert!(!deleted.is_empty(), "{plan:#}");
    for d in &deleted {
        assert!(
            segno_1mib(d).is_some_and(|n| n < cut),
            "{d} is at or after B's start (segment {cut})"
        );
    }
    let before: Vec<String> = s.archived();
    sh_ok(&mut s.walfs(&["delete", "--retain", "2", "--confirm"]));
    let after = s.archived();
    for name in &before {
        let gone = !after.contains(name);
        let should_go = segno_1mib(name).is_some_and(|n| n < cut);
        assert_eq!(
            gone, should_go,
            "{name}: deleted {gone}, before the cut {should_go}"
        );
    }
    assert!(after.iter().any(|n| n == "00000002.history"));
    let listed = s.list();
    let names: Vec<&str> = listed
        .as_array()
        .expect("array")
        .iter()
        .map(|b| b["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names.len(), 2, "{listed:#}");
    assert!(!names.contains(&a.as_str()));
    for l in listed.as_array().expect("array") {
        assert_eq!(l["missing_wal"], serde_json::json!([]), "{l:#}");
    }
    sh_ok(&mut s.walfs(&["verify"]));
    // B still restores, across the fork, to where timeline 2 ended.
    let again = s.restore_and_start("b-again", &["--backup", &b]);
    assert_eq!(
        again.psql(FINGERPRINT),
        at_end,
        "B restored through timeline 2"
    );

    // A segment B needs goes missing: verify says which backup lacks WAL.
    let first_needed = format!("00000001{:08X}{:08X}", cut / 4096, cut % 4096);
    std::fs::remove_file(s.archive.join("wal").join(&first_needed)).expect("remove a segment");
    let out = sh_fails(&mut s.walfs(&["verify"]));
    assert_eq!(out.status.code(), Some(1), "{}", stderr_str(&out));
    assert!(
        stdout_str(&out).contains(&format!("backup {b}: WAL MISSING")),
        "{}",
        stdout_str(&out)
    );
}

/// The same promises on a real S3-protocol server (moto): a backup under load restores to the
/// end through `walfs fetch`, its tars read whole through a mount, and a backup killed
/// mid-stream is never listed as usable and is removed by retention once stale.
#[test]
fn on_s3_a_backup_restores_reads_through_the_mount_and_an_interrupted_one_is_cleaned_up() {
    let s3 = S3Server::start();
    s3.create_bucket("pgdb");
    let mut s = Setup::on("backup-s3", Some(("s3://pgdb/cluster".into(), s3.env())));
    s.primary.start();
    s.primary.pgbench(&["-i", "-s", "2"]);
    s.primary.psql(&format!(
        "create tablespace ts location '{}'",
        s.tablespace.display()
    ));
    s.primary
        .psql("create table in_ts (i int) tablespace ts; insert into in_ts select generate_series(1, 100)");

    // Killed mid-stream, once its first chunks are in the bucket.
    let mut child = s
        .walfs_root(&[
            "backup",
            "-d",
            &s.conninfo(),
            "--chunk-size",
            "256KiB",
            "--max-rate",
            "1MiB",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start walfs backup");
    let started = poll_until(Duration::from_secs(60), || {
        s3.list_keys("pgdb", "cluster/backups/").len() >= 2
    });
    let still_running = child.try_wait().expect("try_wait").is_none();
    child.kill().expect("kill -9 the backup");
    let _ = child.wait();
    assert!(started, "no chunk stored within 60 s");
    assert!(still_running, "the backup ended before it could be killed");

    let mut load = start_load(&s.primary, 5);
    sh_ok(&mut s.walfs(&["backup", "-d", &s.conninfo(), "--chunk-size", "1MiB"]));
    assert!(load.wait().expect("pgbench").success(), "pgbench failed");
    s.primary.pgbench(&["-c", "2", "-t", "100"]);
    let at_end = s.primary.psql(FINGERPRINT);
    let last = s.primary.switch_wal();
    s.primary.wait_archived_upto(&last);

    let listed = s.list();
    let all = listed.as_array().expect("an array");
    assert_eq!(all.len(), 2, "{listed:#}");
    let name_of = |complete: bool| {
        all.iter()
            .find(|b| b["complete"] == complete)
            .and_then(|b| b["name"].as_str())
            .unwrap_or_else(|| panic!("a backup with complete={complete}: {listed:#}"))
            .to_string()
    };
    let (good, killed) = (name_of(true), name_of(false));

    // A mount on the bucket: only the complete backup, its tars whole.
    let args = vec![
        "--archive".to_string(),
        s.url.clone(),
        "--key-file".to_string(),
        s.key.display().to_string(),
    ];
    let mut mount = WalfsMount::start_with(
        &s.scratch.path().join("m"),
        &args,
        &["--read-only".into()],
        &s.env,
    );
    let shown: Vec<String> = std::fs::read_dir(mount.path().join("backups"))
        .expect("list backups/")
        .map(|d| d.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(shown, std::slice::from_ref(&good));
    let members = stdout_str(&sh_ok(
        Command::new("tar")
            .arg("-t")
            .arg("-f")
            .arg(mount.path().join("backups").join(&good).join("base.tar")),
    ));
    assert!(
        members.lines().any(|l| l == "global/pg_control"),
        "{members}"
    );
    mount.stop();

    // Retention removes the killed backup once stale (here at once), and keeps the other.
    let plan = stdout_str(&sh_ok(&mut s.walfs(&[
        "delete",
        "--retain",
        "1",
        "--incomplete-after",
        "0s",
        "--confirm",
    ])));
    assert!(
        s3.list_keys("pgdb", &format!("cluster/backups/{killed}/"))
            .is_empty(),
        "{plan}"
    );
    assert!(!s3
        .list_keys("pgdb", &format!("cluster/backups/{good}/"))
        .is_empty());
    let listed = s.list();
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed:#}");

    s.primary.stop();
    let restore_command = format!("{} fetch %f %p", s.walfs_prefix());
    let end = s.restore_and_start("s3-end", &["--restore-command", &restore_command]);
    assert_eq!(end.psql(FINGERPRINT), at_end, "restored to the end from S3");
}
