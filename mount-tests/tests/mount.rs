//! `walfs mount` with a real FUSE mount, real PostgreSQL (as the postgres user) archiving with
//! `cp %p MOUNT/%f` and recovering with `cp MOUNT/%f %p`, on a local archive and on a real
//! S3-protocol server on 127.0.0.1.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use walfs_mount_tests::*;

/// `walfs ARGS…` against the same archive as a mount (CLI path, not through FUSE).
fn walfs(args: &[String], env: &[(String, String)], more: &[&str]) -> Command {
    let mut c = Command::new(walfs_bin());
    c.env("WALFS_CONFIG", "/dev/null")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .args(more);
    c
}

/// `cp` as the postgres user; returns whether it succeeded.
fn pg_cp(from: &Path, to: &Path) -> bool {
    let out = run(as_postgres("cp").arg(from).arg(to));
    out.status.success()
}

fn copy_dir(from: &Path, to: &Path) {
    sh_ok(Command::new("cp").arg("-a").arg(from).arg(to));
}

/// Point-in-time recovery and a timeline switch, all through the mount.
fn pitr_and_timelines(scratch: &Path, args: &[String], env: &[(String, String)]) {
    let mount = WalfsMount::start(scratch, args, env);
    let mnt = mount.path().display().to_string();
    let archive_cmd = format!("archive_mode = on\narchive_command = 'cp %p {mnt}/%f'");
    let restore_cmd = format!("cp {mnt}/%f %p");

    let mut primary = Postgres::init(
        &scratch.join("primary"),
        InitOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    );
    primary.set_conf(&archive_cmd);
    primary.start();
    primary.pgbench(&["-i", "-s", "2"]);
    let backup = scratch.join("backup");
    primary.base_backup(&backup);
    let backup2 = scratch.join("backup2");
    copy_dir(&backup, &backup2);
    primary.pgbench(&["-t", "200", "-c", "2"]);
    let at_target = primary.psql(FINGERPRINT_SQL);
    primary.psql("select pg_create_restore_point('walfs_target')");
    primary.pgbench(&["-t", "200", "-c", "2"]);
    let at_end = primary.psql(FINGERPRINT_SQL);
    assert_ne!(at_target, at_end);
    let last = primary.switch_wal();
    primary.wait_archived_upto(&last);
    let status = primary.archiver_status();
    assert!(
        status.contains("failed_count=0"),
        "cp into the mount failed: {status}"
    );
    primary.stop();

    // 1. Recover to the restore point: the data is exactly what the primary had there.
    let mut restored = Postgres::existing(&scratch.join("restored"), &backup);
    restored.enable_recovery(&restore_cmd);
    restored.set_conf(&format!(
        "recovery_target_name = 'walfs_target'\nrecovery_target_action = 'promote'\n{archive_cmd}"
    ));
    restored.start();
    restored.wait_recovery_done(Duration::from_secs(120));
    assert_eq!(
        restored.psql(FINGERPRINT_SQL),
        at_target,
        "PITR result differs"
    );

    // 2. The promoted server archives its history file and new timeline through the mount.
    assert_eq!(
        restored.psql("select timeline_id from pg_control_checkpoint()"),
        "2"
    );
    restored.pgbench(&["-t", "150", "-c", "2"]);
    let on_tl2 = restored.psql(FINGERPRINT_SQL);
    let last2 = restored.switch_wal();
    assert!(last2.starts_with("00000002"), "{last2}");
    restored.wait_archived_upto(&last2);
    restored.stop();
    assert!(
        mount.file("00000002.history").exists(),
        "history file not archived"
    );

    // A third server follows the archive onto the new timeline.
    let mut third = Postgres::existing(&scratch.join("third"), &backup2);
    third.enable_recovery(&restore_cmd);
    third.set_conf("recovery_target_timeline = 'latest'");
    third.start();
    third.wait_recovery_done(Duration::from_secs(120));
    assert_eq!(
        third.psql(FINGERPRINT_SQL),
        on_tl2,
        "recovery onto timeline 2 differs"
    );
    let log = std::fs::read_to_string(third.log_path()).unwrap_or_default();
    assert!(
        log.contains("restored log file \"00000002.history\""),
        "{log}"
    );
    third.stop();
    // The archive is whole across both timelines.
    let mut verify = Command::new(walfs_bin());
    verify
        .env("WALFS_CONFIG", "/dev/null")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(args)
        .arg("verify");
    let out = run(&mut verify);
    assert!(
        out.status.success(),
        "verify: {}\n{}",
        stdout_str(&out),
        stderr_str(&out)
    );
    assert!(
        stdout_str(&out).contains("timeline 2 (forked from timeline 1"),
        "{}",
        stdout_str(&out)
    );
    drop(mount);
}

#[test]
fn pitr_and_timeline_switch_through_the_mount_on_a_local_archive() {
    let scratch = scratch_dir("mount-pitr-local");
    let key = keygen(&scratch.path().join("keys"));
    let args = local_args(&scratch.path().join("archive"), Some(&key));
    pitr_and_timelines(scratch.path(), &args, &[]);
}

#[test]
fn pitr_and_timeline_switch_through_the_mount_on_s3() {
    let scratch = scratch_dir("mount-pitr-s3");
    let s3 = S3Server::start();
    s3.create_bucket("wal");
    let key = keygen(&scratch.path().join("keys"));
    let args = vec![
        "--archive".to_string(),
        "s3://wal/cluster".to_string(),
        "--key-file".to_string(),
        key.display().to_string(),
    ];
    pitr_and_timelines(scratch.path(), &args, &s3.env());
    assert!(s3
        .list_keys("wal", "cluster/wal/")
        .contains(&"cluster/wal/00000002.history".to_string()));
}

#[test]
fn shell_tools_see_a_directory_with_the_right_errors() {
    let wal = real_wal(1, 8);
    let scratch = scratch_dir("mount-shell");
    let key = keygen(&scratch.path().join("keys"));
    let archive = scratch.path().join("archive");
    let args = local_args(&archive, Some(&key));
    let out = scratch.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    chown_postgres(&out);
    let mut mount = WalfsMount::start(scratch.path(), &args, &[]);
    wait_for("the mount's FUSE init", Duration::from_secs(10), || {
        mount.log().contains("passthrough=true")
    });
    let segs = &wal.segments;

    // Archive three segments and the backup label with plain cp, as PostgreSQL would.
    for name in segs[..3].iter().chain(&wal.backup_files) {
        assert!(
            pg_cp(&wal.path(name), &mount.file(name)),
            "cp into the mount: {name}"
        );
    }
    // Readable at once, byte for byte, with exact sizes in ls -l.
    for name in segs[..3].iter().chain(&wal.backup_files) {
        let dest = out.join(name);
        assert!(
            pg_cp(&mount.file(name), &dest),
            "cp out of the mount: {name}"
        );
        assert!(std::fs::read(&dest).unwrap() == std::fs::read(wal.path(name)).unwrap());
        assert_eq!(
            std::fs::metadata(mount.file(name)).unwrap().len(),
            std::fs::metadata(wal.path(name)).unwrap().len()
        );
    }
    let ls = stdout_str(&sh_ok(Command::new("ls").arg("-l").arg(mount.path())));
    for name in &segs[..3] {
        assert!(ls.contains(name.as_str()), "{ls}");
    }

    // Absent names: ENOENT, and not remembered: a file archived meanwhile appears at once.
    let later = &segs[5];
    assert!(!mount.file(later).exists());
    let err = run(Command::new("cat").arg(mount.file(later)));
    assert!(
        stderr_str(&err).contains("No such file"),
        "{}",
        stderr_str(&err)
    );
    sh_ok(&mut walfs(
        &args,
        &[],
        &["push", wal.path(later).to_str().unwrap()],
    ));
    assert!(
        mount.file(later).exists(),
        "a newly archived file stays invisible"
    );

    // Identical re-archive succeeds; other content fails and changes nothing.
    assert!(
        pg_cp(&wal.path(&segs[0]), &mount.file(&segs[0])),
        "identical re-cp failed"
    );
    let other = out.join("other");
    let mut bytes = std::fs::read(wal.path(&segs[1])).unwrap();
    bytes[300_000] ^= 0x5A;
    std::fs::write(&other, &bytes).unwrap();
    chown_postgres(&other);
    let res = run(as_postgres("cp").arg(&other).arg(mount.file(&segs[1])));
    assert!(!res.status.success(), "cp of different content succeeded");
    assert!(
        mount.log().contains("different file"),
        "{}",
        mount.log_tail(20)
    );
    let check = out.join("check");
    assert!(pg_cp(&mount.file(&segs[1]), &check));
    assert!(std::fs::read(&check).unwrap() == std::fs::read(wal.path(&segs[1])).unwrap());

    // Names PostgreSQL never archives, directories, links, renames, deletes: refused.
    let notes = out.join("notes.txt");
    std::fs::write(&notes, b"hi").unwrap();
    assert!(!pg_cp(&notes, &mount.file("notes.txt")));
    assert!(!mount.file("notes.txt").exists());
    assert!(!run(as_postgres("mkdir").arg(mount.file("sub")))
        .status
        .success());
    assert!(!run(as_postgres("ln")
        .arg("-s")
        .arg("x")
        .arg(mount.file("000000010000000000000077")))
    .status
    .success());
    assert!(!run(as_postgres("mv")
        .arg(mount.file(&segs[0]))
        .arg(mount.file(&segs[7])))
    .status
    .success());
    let rm = run(as_postgres("rm").arg("-f").arg(mount.file(&segs[0])));
    assert!(
        !rm.status.success() && stderr_str(&rm).contains("not permitted"),
        "{}",
        stderr_str(&rm)
    );
    assert!(mount.file(&segs[0]).exists());

    // A damaged object (pushed by another host, never cached here) is an error, not data.
    let victim = &segs[6];
    sh_ok(&mut walfs(
        &args,
        &[],
        &["push", wal.path(victim).to_str().unwrap()],
    ));
    let obj = archive.join("wal").join(victim);
    let mut b = std::fs::read(&obj).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 1;
    std::fs::write(&obj, b).unwrap();
    let dest = out.join(victim);
    let res = run(as_postgres("cp").arg(mount.file(victim)).arg(&dest));
    assert!(!res.status.success(), "a damaged object was copied out");
    assert!(
        std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0) == 0,
        "damaged bytes reached {dest:?}"
    );
    assert!(mount.log().contains("damaged"), "{}", mount.log_tail(20));

    // Unmount while idle, mount again, read again.
    mount.stop();
    let mount = WalfsMount::start(scratch.path(), &args, &[]);
    let again = out.join("again");
    assert!(pg_cp(&mount.file(&segs[2]), &again));
    assert!(std::fs::read(&again).unwrap() == std::fs::read(wal.path(&segs[2])).unwrap());
    drop(mount);
}

#[test]
fn a_failing_store_fails_the_cp_and_archives_nothing() {
    let wal = real_wal(1, 8);
    let scratch = scratch_dir("mount-fail");
    let s3 = S3Server::start();
    s3.create_bucket("wal");
    let proxy = FaultProxy::start(s3.port());
    let mut env = s3.env_through(&proxy);
    env.push(("WALFS_RETRY_TIMEOUT".into(), "3s".into()));
    let args = vec!["--archive".to_string(), "s3://wal/p".to_string()];
    let mount = WalfsMount::start(scratch.path(), &args, &env);
    let segs = &wal.segments;
    assert!(pg_cp(&wal.path(&segs[0]), &mount.file(&segs[0])));

    proxy.set_down(true);
    let t0 = Instant::now();
    assert!(
        !pg_cp(&wal.path(&segs[1]), &mount.file(&segs[1])),
        "cp succeeded with the store down"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the failure took {:?}",
        t0.elapsed()
    );
    proxy.set_down(false);
    let keys = s3.list_keys("wal", "p/wal/");
    assert!(
        !keys.iter().any(|k| k.ends_with(&segs[1])),
        "recorded though cp failed: {keys:?}"
    );
    assert!(!mount.file(&segs[1]).exists());
    // PostgreSQL's retry then succeeds.
    assert!(
        pg_cp(&wal.path(&segs[1]), &mount.file(&segs[1])),
        "retry after recovery failed"
    );
    assert!(s3
        .list_keys("wal", "p/wal/")
        .iter()
        .any(|k| k.ends_with(&segs[1])));
    drop(mount);

    // A local archive on a full disk: the cp fails, no partial object is left.
    let small = scratch.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    sh_ok(
        Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=600k", "tmpfs"])
            .arg(&small),
    );
    let args = local_args(&small, None);
    let mount_dir = scratch.path().join("local");
    std::fs::create_dir_all(&mount_dir).unwrap();
    let mount = WalfsMount::start(&mount_dir, &args, &[]);
    let mut failed = None;
    for name in segs {
        if !pg_cp(&wal.path(name), &mount.file(name)) {
            failed = Some(name.clone());
            break;
        }
    }
    let listing = stdout_str(&sh_ok(&mut walfs(&args, &[], &["ls"])));
    let staged: Vec<_> = std::fs::read_dir(small.join("wal"))
        .map(|d| d.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    drop(mount);
    let _ = Command::new("umount").arg(&small).status();
    let failed = failed.expect("a 600 KiB archive never filled up");
    assert!(!listing.contains(failed.as_str()), "{listing}");
    assert!(
        staged.iter().all(|n| !n.to_string_lossy().contains('#')),
        "staging files left behind: {staged:?}"
    );
}

/// Peak resident memory of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_large_archive_lists_every_name_once_with_bounded_memory() {
    const N: u32 = 20_000;
    let wal = real_wal(1, 8);
    let scratch = scratch_dir("mount-big");
    let archive = scratch.path().join("archive");
    let args = local_args(&archive, None);
    let first = &wal.segments[0];
    sh_ok(&mut walfs(
        &args,
        &[],
        &["push", wal.path(first).to_str().unwrap()],
    ));
    // Many more names: listing reads names and the archive's segment size, never content.
    let stub = std::fs::read(archive.join("wal").join(first)).unwrap();
    let first_no = u64::from_str_radix(&first[16..24], 16).unwrap()
        + 4096 * u64::from_str_radix(&first[8..16], 16).unwrap();
    let mut names = vec![first.clone()];
    for i in 1..u64::from(N) {
        let seg = first_no + i;
        let name = format!("00000001{:08X}{:08X}", seg / 4096, seg % 4096);
        std::fs::write(archive.join("wal").join(&name), &stub[..200]).unwrap();
        names.push(name);
    }
    names.sort();
    let mount = WalfsMount::start(scratch.path(), &args, &[]);
    let out = sh_ok(Command::new("ls").arg("-l").arg(mount.path()));
    let listed: Vec<String> = stdout_str(&out)
        .lines()
        .skip(1) // "total …"
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f[4], "1048576", "size of {l}");
            f[8].to_string()
        })
        .collect();
    assert_eq!(listed.len(), names.len(), "listing lost or repeated names");
    assert!(listed == names, "listing differs from the archive");
    let hwm = vm_hwm_kib(mount.pid());
    assert!(
        hwm > 0 && hwm < 256 * 1024,
        "peak RSS {hwm} KiB listing {N} names"
    );
    drop(mount);
}

#[test]
fn an_unreachable_store_is_an_error_on_reads_never_absence() {
    let wal = real_wal(1, 8);
    let scratch = scratch_dir("mount-read-fail");
    let s3 = S3Server::start();
    s3.create_bucket("wal");
    let proxy = FaultProxy::start(s3.port());
    let mut env = s3.env_through(&proxy);
    env.push(("WALFS_RETRY_TIMEOUT".into(), "2s".into()));
    let args = vec!["--archive".to_string(), "s3://wal/p".to_string()];
    // Archived by another host: nothing of it is cached by this mount.
    for name in &wal.segments[..2] {
        sh_ok(&mut walfs(
            &args,
            &env,
            &["push", wal.path(name).to_str().unwrap()],
        ));
    }
    let mount = WalfsMount::start(scratch.path(), &args, &env);
    proxy.set_down(true);
    for name in [&wal.segments[0], &wal.segments[7]] {
        let out = run(Command::new("cat").arg(mount.file(name)));
        assert!(!out.status.success(), "read {name} with the store down");
        let err = stderr_str(&out);
        assert!(
            err.contains("Input/output error") && !err.contains("No such file"),
            "{name}: {err}"
        );
    }
    proxy.set_down(false);
    let dest = scratch.path().join("back");
    sh_ok(
        Command::new("cp")
            .arg(mount.file(&wal.segments[0]))
            .arg(&dest),
    );
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(wal.path(&wal.segments[0])).unwrap());
    drop(mount);
}

#[test]
fn mountpoints_that_cannot_work_are_refused_with_a_reason() {
    let scratch = scratch_dir("mount-refuse");
    let args = local_args(&scratch.path().join("archive"), None);
    let busy = scratch.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("x"), b"x").unwrap();
    for (dir, why) in [
        (busy.clone(), "not empty"),
        (scratch.path().join("missing"), "No such file"),
        (busy.join("x"), "not a directory"),
    ] {
        let out = run(&mut walfs(&args, &[], &["mount", dir.to_str().unwrap()]));
        assert_eq!(out.status.code(), Some(2), "mount on {dir:?}");
        assert!(
            stderr_str(&out).contains(why),
            "{dir:?}: {}",
            stderr_str(&out)
        );
    }
    // A second mount on a live one.
    let mount = WalfsMount::start(scratch.path(), &args, &[]);
    let out = run(&mut walfs(
        &args,
        &[],
        &["mount", mount.path().to_str().unwrap()],
    ));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_str(&out).contains("already a FUSE mount"),
        "{}",
        stderr_str(&out)
    );
    // A second mount of the same archive elsewhere, on the live one's cache directory: it
    // would wipe that mount's cache and writes.
    let elsewhere = scratch.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let cache = mount.cache_dir().display().to_string();
    let out = run_within(
        &mut walfs(
            &args,
            &[],
            &["--cache-dir", &cache, "mount", elsewhere.to_str().unwrap()],
        ),
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr_str(&out));
    assert!(
        stderr_str(&out).contains("one mount per archive and cache directory")
            && stderr_str(&out).contains("--cache-dir"),
        "{}",
        stderr_str(&out)
    );
    drop(mount);

    // A user mounting: /dev/fuse must be open to it (on some hosts it is 0600), and
    // --allow-other needs user_allow_other in /etc/fuse.conf. Each refusal names its fix.
    let device_open = run(as_postgres("test").args(["-r", "/dev/fuse", "-a", "-w", "/dev/fuse"]))
        .status
        .success();
    let allowed = std::fs::read_to_string("/etc/fuse.conf")
        .unwrap_or_default()
        .lines()
        .any(|l| l.trim() == "user_allow_other");
    let own = scratch.path().join("users");
    std::fs::create_dir_all(own.join("mnt")).unwrap();
    let bin = own.join("walfs");
    std::fs::copy(walfs_bin(), &bin).unwrap();
    chown_postgres(&own);
    chown_postgres(&own.join("mnt"));
    let mut child = as_postgres(&bin)
        .env("WALFS_CONFIG", "/dev/null")
        .args(&args)
        .arg("--cache-dir")
        .arg(own.join("cache"))
        .args(["mount", "--allow-other"])
        .arg(own.join("mnt"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if !device_open {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr_str(&out));
        assert!(
            stderr_str(&out).contains("cannot open /dev/fuse")
                && stderr_str(&out).contains("chmod 0666 /dev/fuse"),
            "{}",
            stderr_str(&out)
        );
    } else if allowed {
        // This host allows it: the mount comes up instead.
        assert!(
            poll_until(Duration::from_secs(30), || is_mounted(&own.join("mnt"))),
            "a user's --allow-other mount did not come up though /etc/fuse.conf allows it"
        );
        // SAFETY: a PID of a child this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        assert!(child.wait().unwrap().success());
    } else {
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr_str(&out));
        assert!(
            stderr_str(&out).contains("user_allow_other in /etc/fuse.conf"),
            "{}",
            stderr_str(&out)
        );
    }
}

/// `walfs status --json` of the archive a mount serves.
fn status_json(args: &[String], cache_dir: &Path) -> String {
    let cache = format!("--cache-dir={}", cache_dir.display());
    stdout_str(&sh_ok(&mut walfs(args, &[], &["status", "--json", &cache])))
}

fn counter(json: &str, key: &str) -> u64 {
    let at = json
        .find(&format!("\"{key}\""))
        .unwrap_or_else(|| panic!("{key} not in {json}"));
    json[at..]
        .split(':')
        .nth(1)
        .and_then(|v| {
            v.trim()
                .trim_end_matches([',', '}'])
                .trim()
                .split([',', '\n'])
                .next()
        })
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or_else(|| panic!("{key} in {json}")) as u64
}

#[test]
fn read_ahead_serves_a_sequential_restore_stops_at_the_end_and_never_serves_damage() {
    let wal = real_wal(1, 12);
    let scratch = scratch_dir("mount-readahead");
    let key = keygen(&scratch.path().join("keys"));
    let archive = scratch.path().join("archive");
    let args = local_args(&archive, Some(&key));
    let segs = &wal.segments[..12];
    for name in segs {
        sh_ok(&mut walfs(
            &args,
            &[],
            &["push", wal.path(name).to_str().unwrap()],
        ));
    }
    // Damage one segment in the middle: read-ahead will load it before the reader asks.
    let victim = &segs[7];
    let obj = archive.join("wal").join(victim);
    let mut b = std::fs::read(&obj).unwrap();
    let at = b.len() - 40;
    b[at] ^= 0x10;
    std::fs::write(&obj, b).unwrap();

    // Reads served by walfs itself, as without kernel passthrough (other tests use it).
    let served = [("WALFS_PASSTHROUGH".to_string(), "false".to_string())];
    let mut mount = WalfsMount::start(scratch.path(), &args, &served);
    wait_for("the mount's FUSE init", Duration::from_secs(10), || {
        mount.log().contains("passthrough=false")
    });
    let out = scratch.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    chown_postgres(&out);
    // As restore_command does: one segment at a time, in order, then the next one, absent.
    for name in segs {
        let dest = out.join(name);
        let ok = pg_cp(&mount.file(name), &dest);
        if name == victim {
            assert!(!ok, "a damaged segment was served");
            assert_eq!(std::fs::metadata(&dest).map(|m| m.len()).unwrap_or(0), 0);
        } else {
            assert!(ok, "cp {name}");
            assert!(
                std::fs::read(&dest).unwrap() == std::fs::read(wal.path(name)).unwrap(),
                "{name}"
            );
        }
    }
    let past_end = wal
        .segments
        .get(12)
        .cloned()
        .unwrap_or_else(|| "0000000100000000000000FF".into());
    for _ in 0..3 {
        assert!(
            !pg_cp(&mount.file(&past_end), &out.join("past")),
            "past the end exists?"
        );
    }
    mount.stop();
    let stats = status_json(&args, &scratch.path().join("cache"));
    assert!(
        counter(&stats, "prefetched") >= 6,
        "read-ahead did not run: {stats}"
    );
    assert!(
        counter(&stats, "readahead_hits") + counter(&stats, "readahead_joined") >= 6,
        "{stats}"
    );
    assert_eq!(
        counter(&stats, "fetch_absent"),
        0,
        "downloaded past the archive's end: {stats}"
    );
    // At most --prefetch-concurrency (4) requests past the end, then nothing more.
    assert!(
        counter(&stats, "prefetch_absent") <= 4,
        "a storm of misses at the end: {stats}"
    );
    assert!(mount.log().contains("damaged"), "{}", mount.log_tail(20));
}

#[test]
fn read_ahead_off_and_random_access_fetch_only_what_is_read() {
    let wal = real_wal(1, 12);
    let scratch = scratch_dir("mount-random");
    let archive = scratch.path().join("archive");
    let args = local_args(&archive, None);
    for name in &wal.segments[..12] {
        sh_ok(&mut walfs(
            &args,
            &[],
            &["push", wal.path(name).to_str().unwrap()],
        ));
    }
    // Random order (as pg_rewind or an operator reads): nothing is loaded ahead.
    let mut mount = WalfsMount::start(scratch.path(), &args, &[]);
    for i in [9usize, 2, 6, 0, 11, 4] {
        sh_ok(
            Command::new("cat")
                .arg(mount.file(&wal.segments[i]))
                .stdout(std::process::Stdio::null()),
        );
    }
    mount.stop();
    let stats = status_json(&args, &scratch.path().join("cache"));
    assert!(
        counter(&stats, "prefetched") <= 1,
        "random reads triggered read-ahead: {stats}"
    );
    // Off: a sequential reader gets no read-ahead at all.
    let scratch2 = scratch_dir("mount-off");
    let off = [("WALFS_PREFETCH_BYTES".to_string(), "0".to_string())];
    let mut mount = WalfsMount::start(scratch2.path(), &args, &off);
    for name in &wal.segments[..6] {
        sh_ok(
            Command::new("cat")
                .arg(mount.file(name))
                .stdout(std::process::Stdio::null()),
        );
    }
    mount.stop();
    let stats = status_json(&args, &scratch2.path().join("cache"));
    assert_eq!(counter(&stats, "prefetched"), 0, "{stats}");
    assert_eq!(counter(&stats, "readahead_misses"), 6, "{stats}");
}

/// What the archive holds under `name` (fetched with the CLI), or None.
fn archived(args: &[String], name: &str, scratch: &Path) -> Option<Vec<u8>> {
    let dest = scratch.join(format!("fetched-{name}"));
    let _ = std::fs::remove_file(&dest);
    let out = run(&mut walfs(
        args,
        &[],
        &["fetch", name, dest.to_str().unwrap()],
    ));
    match out.status.code() {
        Some(0) => Some(std::fs::read(&dest).unwrap()),
        Some(1) => None,
        _ => panic!("fetch {name}: {}", stderr_str(&out)),
    }
}

#[test]
fn only_whole_files_are_archived_whatever_the_writer_does() {
    let wal = real_wal(1, 8);
    let scratch = scratch_dir("mount-whole");
    let archive = scratch.path().join("archive");
    let args = local_args(&archive, None);
    let mount = WalfsMount::start(scratch.path(), &args, &[]);
    // An identity first (a segment), as on any archive that already serves a cluster.
    assert!(pg_cp(
        &wal.path(&wal.segments[0]),
        &mount.file(&wal.segments[0])
    ));
    let history = b"1\t0/3000000\tno recovery target specified\n2\t0/5000000\tbefore 2000-01-01 00:00:00+00\n";
    let src = scratch.path().join("00000003.history");
    std::fs::write(&src, history).unwrap();
    let first_line = "1\t0/3000000\tno recovery target specified\n";
    let target = mount.file("00000003.history");
    let sh = |script: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("SRC", &src)
            .env("DST", &target)
            .env("LINE", first_line)
            .output()
            .expect("sh")
    };

    // A writer killed after a prefix that is itself a valid history file: the kernel closes
    // its file as it dies, and walfs archives nothing.
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("exec 3>\"$DST\"; printf '%s' \"$LINE\" >&3; exec sleep 60")
        .env("DST", &target)
        .env("LINE", first_line)
        .spawn()
        .expect("spawn writer");
    std::thread::sleep(Duration::from_millis(500));
    let _ = Command::new("kill")
        .args(["-KILL", &child.id().to_string()])
        .status();
    // The dying process waits for walfs to answer its close before it is gone.
    let _ = child.wait();
    assert_eq!(
        archived(&args, "00000003.history", scratch.path()),
        None,
        "a killed writer's prefix was archived"
    );

    // fsync part-way, then an exit without close: nothing archived either.
    let py = "import os,sys\nf=os.open(sys.argv[1], os.O_WRONLY|os.O_CREAT|os.O_TRUNC)\n\
              os.write(f, sys.argv[2].encode())\nos.fsync(f)\nos._exit(0)\n";
    let out = run(Command::new("/usr/bin/python3")
        .args(["-c", py])
        .arg(&target)
        .arg(first_line));
    assert!(out.status.success(), "{}", stderr_str(&out));
    assert_eq!(
        archived(&args, "00000003.history", scratch.path()),
        None,
        "fsync archived a prefix"
    );

    // A shell redirection (open, dup2, close before a byte is written), then the whole file.
    let out = sh("cat \"$SRC\" > \"$DST\"");
    assert!(out.status.success(), "{}", stderr_str(&out));
    assert_eq!(
        archived(&args, "00000003.history", scratch.path()).as_deref(),
        Some(&history[..]),
        "the redirection did not archive the whole file"
    );
    // PostgreSQL retries after a crash: the same bytes again are fine, by cp or redirection.
    assert!(pg_cp(&src, &target));
    assert!(sh("cat \"$SRC\" > \"$DST\"").status.success());

    // Malformed or empty files are refused with EINVAL and leave the name free.
    let bad = scratch.path().join("00000004.history");
    for body in [
        &b""[..],
        b"1\t0/3000000\tno newline at the end",
        b"garbage\n",
    ] {
        std::fs::write(&bad, body).unwrap();
        let out = run(Command::new("cp")
            .arg(&bad)
            .arg(mount.file("00000004.history")));
        assert!(!out.status.success(), "{body:?} archived");
        if !body.is_empty() {
            assert!(
                stderr_str(&out).contains("Invalid argument"),
                "{}",
                stderr_str(&out)
            );
        }
        assert_eq!(archived(&args, "00000004.history", scratch.path()), None);
    }
    std::fs::write(&bad, b"1\t0/3000000\tx\n2\t0/4000000\ty\n3\t0/5000000\tz\n").unwrap();
    assert!(run(Command::new("cp")
        .arg(&bad)
        .arg(mount.file("00000004.history")))
    .status
    .success());
    drop(mount);
}
