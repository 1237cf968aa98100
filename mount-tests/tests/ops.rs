//! Running walfs in production: import, delete (retention), status, metrics, systemd
//! notifications and JSON logs, on archives made from real PostgreSQL WAL.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;
use walfs_mount_tests::*;

/// `walfs ARGS… MORE…`, isolated from any system config.
fn walfs(args: &[String], more: &[&str]) -> Output {
    run(Command::new(walfs_bin())
        .env("WALFS_CONFIG", "/dev/null")
        .env_remove("WALFS_ARCHIVE")
        .env_remove("WALFS_KEY_FILE")
        .args(args)
        .args(more))
}

fn assert_code(out: &Output, want: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(want),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        stdout_str(out),
        stderr_str(out)
    );
}

/// Names under the archive's `wal/` directory, sorted.
fn stored(archive: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(archive.join("wal"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The real WAL fixture imported into a fresh local archive.
fn imported(scratch: &Path, key: Option<&Path>) -> (&'static WalFixture, PathBuf, Vec<String>) {
    let wal = real_wal(1, 8);
    let archive = scratch.join("archive");
    let args = local_args(&archive, key);
    let dir = wal.dir.display().to_string();
    assert_code(&walfs(&args, &["import", &dir]), 0, "import");
    (wal, archive, args)
}

#[test]
fn import_loads_a_plain_archive_resumably_and_refuses_conflicts() {
    let wal = real_wal(1, 8);
    let scratch = scratch_dir("ops-import");
    let key = keygen(scratch.path());
    let archive = scratch.path().join("archive");
    let args = local_args(&archive, Some(&key));
    // A plain archive directory as `cp %p DIR/%f` leaves it, with some clutter.
    let plain = scratch.path().join("plain");
    std::fs::create_dir_all(plain.join("archive_status")).unwrap();
    for name in wal.files() {
        std::fs::copy(wal.path(&name), plain.join(&name)).unwrap();
    }
    std::fs::write(plain.join("README.txt"), "old archive").unwrap();
    let plain_arg = plain.display().to_string();
    let n = wal.files().len();

    let out = walfs(&args, &["import", &plain_arg]);
    assert_code(&out, 0, "import");
    let text = stdout_str(&out);
    assert!(
        text.contains(&format!(
            "imported {n} files, 0 already archived, 0 refused"
        )),
        "{text}"
    );
    assert!(text.contains("ignored 2 entries"), "{text}");
    assert_eq!(stored(&archive), wal.files(), "every file stored once");

    // Every file comes back byte for byte.
    let out_dir = scratch.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    for name in wal.files() {
        let dest = out_dir.join(&name);
        let d = dest.display().to_string();
        assert_code(&walfs(&args, &["fetch", &name, &d]), 0, "fetch");
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(wal.path(&name)).unwrap(),
            "{name} differs after import"
        );
    }

    // An interrupted import (some files never uploaded) finishes on the next run.
    let lost = [&wal.segments[2], &wal.segments[5], &wal.backup_files[0]];
    for name in lost {
        std::fs::remove_file(archive.join("wal").join(name)).unwrap();
    }
    let out = walfs(&args, &["import", &plain_arg, "--json"]);
    assert_code(&out, 0, "import again");
    let report: serde_json::Value = serde_json::from_str(&stdout_str(&out)).unwrap();
    assert_eq!(report["imported"], 3, "{report}");
    assert_eq!(report["already_archived"], n as u64 - 3, "{report}");
    assert_eq!(stored(&archive), wal.files());

    // Another file under an archived name is refused and the archived copy kept.
    let other = scratch.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let victim = &wal.segments[1];
    let mut bytes = std::fs::read(wal.path(victim)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(other.join(victim), bytes).unwrap();
    let out = walfs(&args, &["import", &other.display().to_string()]);
    assert_code(&out, 1, "importing a conflicting file");
    assert!(
        stdout_str(&out).contains(&format!("REFUSED {victim}")),
        "{}",
        stdout_str(&out)
    );
    let back = out_dir.join("victim");
    let d = back.display().to_string();
    assert_code(&walfs(&args, &["fetch", victim, &d]), 0, "fetch");
    assert!(std::fs::read(&back).unwrap() == std::fs::read(wal.path(victim)).unwrap());
    assert_code(&walfs(&args, &["verify", "--deep"]), 0, "deep verify");

    // A directory that does not exist is a usage error.
    let out = walfs(&args, &["import", "/nonexistent/walfs-import"]);
    assert_code(&out, 2, "import of a missing directory");
}

fn set_mtime(path: &Path, when: &str) {
    sh_ok(
        Command::new("touch")
            .arg("-m")
            .arg("-d")
            .arg(when)
            .arg(path),
    );
}

#[test]
fn delete_cuts_old_wal_keeps_histories_and_never_opens_a_gap() {
    let scratch = scratch_dir("ops-delete");
    let (wal, archive, args) = imported(scratch.path(), None);
    let seg = &wal.segments;
    // A promotion happened after the last segment: timeline 2's history must survive.
    let history = scratch.path().join("00000002.history");
    std::fs::write(&history, "1\t0/7000000\tno recovery target specified\n").unwrap();
    assert_code(
        &walfs(&args, &["push", &history.display().to_string()]),
        0,
        "push history",
    );
    let all = stored(&archive);

    // Dry run: lists, deletes nothing.
    let out = walfs(&args, &["delete", "--before", &seg[3]]);
    assert_code(&out, 0, "dry run");
    let text = stdout_str(&out);
    for s in &seg[..3] {
        assert!(text.contains(&format!("would delete {s}")), "{text}");
    }
    assert!(
        !text.contains(&format!("would delete {}", seg[3])),
        "{text}"
    );
    assert!(!text.contains("would delete 00000002.history"), "{text}");
    assert!(text.contains("dry run: nothing deleted"), "{text}");
    assert_eq!(stored(&archive), all, "a dry run deleted something");

    // For real: the segments before seg[3] (and a .backup file before it) go.
    let out = walfs(&args, &["delete", "--before", &seg[3], "--confirm"]);
    assert_code(&out, 0, "delete --confirm");
    let left = stored(&archive);
    for s in &seg[..3] {
        assert!(!left.contains(s), "{s} survived: {left:?}");
    }
    for s in &seg[3..] {
        assert!(left.contains(s), "{s} was deleted: {left:?}");
    }
    assert!(left.contains(&"00000002.history".to_string()));
    let backup = &wal.backup_files[0];
    assert_eq!(
        left.contains(backup),
        backup[..24] >= seg[3][..],
        "{backup} against the cut at {}",
        seg[3]
    );
    let out = walfs(&args, &["verify"]);
    assert_code(&out, 0, "verify after delete");
    assert!(
        stdout_str(&out).contains(&format!("present {} .. {}", seg[3], seg[seg.len() - 1])),
        "{}",
        stdout_str(&out)
    );

    // Never empties the archive.
    let out = walfs(
        &args,
        &[
            "delete",
            "--before",
            "000000010000000F00000000",
            "--confirm",
        ],
    );
    assert_code(&out, 1, "delete everything");
    assert!(
        stderr_str(&out).contains("refusing"),
        "{}",
        stderr_str(&out)
    );
    assert_eq!(stored(&archive), left);

    // By age: everything is old except seg[5] (re-archived recently, say). Deleting what is
    // older than a week stops at seg[5]: seg[6] and later stay although old, so no gap opens.
    for name in &left {
        set_mtime(&archive.join("wal").join(name), "30 days ago");
    }
    set_mtime(&archive.join("wal").join(&seg[5]), "now");
    let out = walfs(&args, &["delete", "--older-than", "7d", "--confirm"]);
    assert_code(&out, 0, "delete --older-than");
    let now_left = stored(&archive);
    for s in &seg[3..5] {
        assert!(!now_left.contains(s), "{s} survived: {now_left:?}");
    }
    for s in &seg[5..] {
        assert!(now_left.contains(s), "{s} was deleted: {now_left:?}");
    }
    assert_code(&walfs(&args, &["verify"]), 0, "verify after delete by age");

    // Everything old: refused, nothing deleted.
    set_mtime(&archive.join("wal").join(&seg[5]), "30 days ago");
    let out = walfs(&args, &["delete", "--older-than", "7d", "--confirm"]);
    assert_code(&out, 1, "delete when everything is old");
    assert_eq!(stored(&archive), now_left);

    // Usage errors.
    assert_code(&walfs(&args, &["delete"]), 2, "delete without a rule");
    assert_code(
        &walfs(&args, &["delete", "--before", "not-a-segment"]),
        2,
        "delete --before garbage",
    );
}

#[test]
fn status_summarises_the_archive() {
    let scratch = scratch_dir("ops-status");
    let (wal, _archive, args) = imported(scratch.path(), None);
    let mut a = args.clone();
    a.push(format!(
        "--cache-dir={}",
        scratch.path().join("cache").display()
    ));
    let out = walfs(&a, &["status", "--json"]);
    assert_code(&out, 0, "status");
    let v: serde_json::Value = serde_json::from_str(&stdout_str(&out)).unwrap();
    let s = &v["archive"];
    assert_eq!(s["segments"], wal.segments.len() as u64, "{v}");
    assert_eq!(s["backups"], 1, "{v}");
    assert_eq!(
        s["timelines"][0]["newest"],
        wal.segments.last().unwrap().as_str()
    );
    assert!(s["compression_ratio"].as_f64().unwrap() > 1.0, "{v}");
    assert!(v["mount"].is_null() && v["receive"].is_null(), "{v}");
    let out = walfs(&a, &["status"]);
    assert_code(&out, 0, "status text");
    assert!(
        stdout_str(&out).contains(&format!("{} segments", wal.segments.len())),
        "{}",
        stdout_str(&out)
    );
    // No archive there: exit 2 and says so.
    let none = local_args(&scratch.path().join("nothing"), None);
    let out = walfs(&none, &["status"]);
    assert_code(&out, 2, "status of a missing archive");
}

#[test]
fn a_mount_says_ready_serves_metrics_and_shows_in_status() {
    let scratch = scratch_dir("ops-mount");
    let (wal, _archive, args) = imported(scratch.path(), None);
    let notify = NotifySocket::bind(scratch.path());
    let port = free_port();
    let mut mount = WalfsMount::start_with(
        scratch.path(),
        &args,
        &["--metrics-addr".into(), format!("127.0.0.1:{port}")],
        &[notify.env(), ("WALFS_LOG_FORMAT".into(), "json".into())],
    );
    let seen = notify.wait_for("READY=1", Duration::from_secs(30));
    assert!(seen.is_ok(), "no READY=1 from the mount: {seen:?}");

    let before = scrape(port).expect("/metrics answers");
    let val = |text: &str, series: &str| metric(text, series).unwrap_or(0.0);
    let opens = val(&before, r#"walfs_mount_requests_total{op="open"}"#);
    let fetches = val(&before, r#"walfs_archive_operations_total{op="fetch"}"#);
    // Traffic: restore four segments, re-archive one (identical: accepted, nothing stored).
    let out = scratch.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    chown_postgres(&out);
    for s in &wal.segments[..4] {
        sh_ok(as_postgres("cp").arg(mount.file(s)).arg(out.join(s)));
    }
    sh_ok(
        as_postgres("cp")
            .arg(wal.path(&wal.segments[0]))
            .arg(mount.file(&wal.segments[0])),
    );
    let mut after = String::new();
    let moved = poll_until(Duration::from_secs(20), || {
        after = scrape(port).unwrap_or_default();
        val(&after, "walfs_segment_opens_total") >= 4.0
    });
    assert!(moved, "segment opens never reached the metrics:\n{after}");
    // (Reads themselves may never reach walfs: the kernel serves cached files by passthrough.)
    assert!(
        val(&after, r#"walfs_mount_requests_total{op="open"}"#) >= opens + 5.0,
        "{after}"
    );
    assert!(
        val(&after, r#"walfs_archive_operations_total{op="fetch"}"#) >= fetches + 4.0,
        "{after}"
    );
    assert!(
        val(&after, r#"walfs_archive_plain_bytes_total{op="fetch"}"#)
            >= 4.0 * wal.segment_bytes() as f64,
        "{after}"
    );
    assert!(
        val(&after, "walfs_mount_written_bytes_total") >= wal.segment_bytes() as f64,
        "{after}"
    );
    assert!(after.contains("# HELP walfs_cache_hits_total"), "{after}");

    // Status sees the running mount.
    let mut a = args.clone();
    a.push(format!("--cache-dir={}", mount.cache_dir().display()));
    let status = |a: &[String]| {
        let out = walfs(a, &["status", "--json"]);
        assert_code(&out, 0, "status");
        serde_json::from_str::<serde_json::Value>(&stdout_str(&out)).unwrap()
    };
    let v = status(&a);
    assert_eq!(v["mount"]["running"], true, "{v}");
    assert_eq!(v["mount"]["pid"], mount.pid(), "{v}");

    // Logs are JSON objects, one per line.
    let log = mount.log();
    let line = log
        .lines()
        .find(|l| l.contains("mounted"))
        .unwrap_or_else(|| panic!("no 'mounted' line in:\n{log}"));
    let parsed: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(parsed["fields"]["message"], "mounted", "{line}");

    mount.stop();
    let seen = notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(seen.is_ok(), "no STOPPING=1 from the mount: {seen:?}");
    assert!(
        scrape(port).is_none(),
        "metrics still answer after the mount stopped"
    );
    let v = status(&a);
    assert_eq!(v["mount"]["running"], false, "{v}");
}

/// `walfs ARGS… MORE…` with extra environment (S3 credentials and endpoint).
fn walfs_env(args: &[String], env: &[(String, String)], more: &[&str]) -> Output {
    run(Command::new(walfs_bin())
        .env("WALFS_CONFIG", "/dev/null")
        .env("WALFS_RETRY_TIMEOUT", "10s")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .args(more))
}

#[test]
fn import_and_delete_on_s3() {
    let wal = real_wal(1, 8);
    let s3 = S3Server::start();
    s3.create_bucket("ops");
    let env = s3.env();
    let args = vec!["--archive".to_string(), "s3://ops/cluster1".to_string()];
    let dir = wal.dir.display().to_string();
    let out = walfs_env(&args, &env, &["import", &dir, "--json"]);
    assert_code(&out, 0, "import to S3");
    let report: serde_json::Value = serde_json::from_str(&stdout_str(&out)).unwrap();
    assert_eq!(report["imported"], wal.files().len() as u64, "{report}");
    let keys = |s3: &S3Server| {
        let mut k: Vec<String> = s3
            .list_keys("ops", "cluster1/wal/")
            .into_iter()
            .map(|k| k.trim_start_matches("cluster1/wal/").to_string())
            .collect();
        k.sort();
        k
    };
    assert_eq!(keys(&s3), wal.files());
    // Batch deletes through the S3 API.
    let cut = &wal.segments[4];
    let out = walfs_env(&args, &env, &["delete", "--before", cut, "--confirm"]);
    assert_code(&out, 0, "delete on S3");
    let left = keys(&s3);
    let want: Vec<String> = wal
        .files()
        .into_iter()
        .filter(|n| n[..24] >= cut[..])
        .collect();
    assert_eq!(left, want);
    let out = walfs_env(&args, &env, &["verify"]);
    assert_code(&out, 0, "verify on S3 after delete");
}
