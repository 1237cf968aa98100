//! `walfs receive` against real PostgreSQL: byte-identical segments, kill -9 in a loop,
//! server restarts, synchronous replication with zero data loss, timeline switches.
//! Ground truth is the server's own archive (`archive_command = 'cp %p DIR/%f'`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use walfs_mount_tests::*;

/// A `walfs receive` process; output appended to one log across restarts.
struct Receiver {
    child: Option<Child>,
    log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Receiver {
    fn new(dir: &Path, archive: &Path, conninfo: &str, extra: &[&str]) -> Receiver {
        Receiver::with_url(
            dir,
            &format!("file://{}", archive.display()),
            &[],
            conninfo,
            extra,
        )
    }

    fn with_url(
        dir: &Path,
        url: &str,
        env: &[(String, String)],
        conninfo: &str,
        extra: &[&str],
    ) -> Receiver {
        let mut args = vec![
            "--archive".to_string(),
            url.to_string(),
            "--cache-dir".to_string(),
            dir.join("cache").display().to_string(),
            "receive".to_string(),
            "-d".to_string(),
            conninfo.to_string(),
            "--slot".to_string(),
            "walfs".to_string(),
            "--create-slot".to_string(),
            "-s".to_string(),
            "1s".to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Receiver {
            child: None,
            log: dir.join("receive.log"),
            args,
            env: env.to_vec(),
        }
    }

    fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(walfs_bin())
            .env("WALFS_CONFIG", "/dev/null")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn walfs receive");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let done = poll_until(Duration::from_secs(30), || {
            c.try_wait().ok().flatten().is_some()
        });
        if !done {
            let _ = c.kill();
            panic!("walfs receive ignored SIGTERM:\n{}", self.log_tail());
        }
        let status = c.wait().unwrap();
        assert!(
            status.success(),
            "walfs receive exited {status}:\n{}",
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        file_tail(&self.log, 30)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn walfs_cmd(archive: &Path, more: &[&str]) -> Command {
    let mut c = Command::new(walfs_bin());
    c.env("WALFS_CONFIG", "/dev/null")
        .arg("--archive")
        .arg(format!("file://{}", archive.display()))
        .args(more);
    c
}

fn archived(archive: &Path) -> Vec<String> {
    if !archive.join("walfs.json").exists() {
        return Vec::new();
    }
    stdout_str(&sh_ok(&mut walfs_cmd(archive, &["ls"])))
        .lines()
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect()
}

fn wait_archived(archive: &Path, name: &str, r: &Receiver) {
    let ok = poll_until(Duration::from_secs(90), || {
        archived(archive).iter().any(|n| n == name)
    });
    assert!(ok, "{name} never reached the archive:\n{}", r.log_tail());
}

/// Every segment the server archived from the first one walfs has up to `last` is in the
/// walfs archive, byte for byte; returns how many were compared.
fn assert_identical(archive: &Path, server_archive: &Path, last: &str, scratch: &Path) -> usize {
    let ours = archived(archive);
    let first = ours
        .iter()
        .find(|n| is_wal_segment_name(n))
        .cloned()
        .expect("walfs archived no segment");
    let mut theirs: Vec<String> = std::fs::read_dir(server_archive)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_wal_segment_name(n) && n.as_str() >= first.as_str() && n.as_str() <= last)
        .collect();
    theirs.sort();
    assert!(!theirs.is_empty());
    let dest = scratch.join("fetched");
    for name in &theirs {
        assert!(
            ours.contains(name),
            "gap: {name} is missing (walfs has {ours:?})"
        );
        sh_ok(&mut walfs_cmd(
            archive,
            &["fetch", name, dest.to_str().unwrap()],
        ));
        assert!(
            std::fs::read(&dest).unwrap() == std::fs::read(server_archive.join(name)).unwrap(),
            "{name} differs from the server's"
        );
    }
    theirs.len()
}

fn primary(scratch: &Path, extra_conf: &str) -> (Postgres, PathBuf) {
    let server_archive = scratch.join("server-archive");
    std::fs::create_dir_all(&server_archive).unwrap();
    chown_postgres(&server_archive);
    let mut pg = Postgres::init(
        &scratch.join("primary"),
        InitOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    );
    pg.set_conf(&format!(
        "archive_mode = on\narchive_command = 'cp %p {}/%f'\n{extra_conf}",
        server_archive.display()
    ));
    pg.start();
    (pg, server_archive)
}

#[test]
fn received_segments_equal_the_servers_and_a_restart_leaves_no_gap() {
    let scratch = scratch_dir("recv-basic");
    let (pg, server_archive) = primary(scratch.path(), "");
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &pg.conninfo(), &[]);
    r.start();
    pg.pgbench(&["-i", "-s", "2"]);
    let last = pg.switch_wal();
    wait_archived(&archive, &last, &r);
    r.stop();
    // While walfs is down, the slot keeps the server's WAL; a restart resumes without a gap.
    pg.pgbench(&["-t", "300", "-c", "2"]);
    let last = pg.switch_wal();
    r.start();
    wait_archived(&archive, &last, &r);
    r.stop();
    pg.wait_archived_upto(&last);
    let n = assert_identical(&archive, &server_archive, &last, scratch.path());
    assert!(n >= 5, "only {n} segments compared");
}

#[test]
fn kill_dash_nine_in_a_loop_loses_nothing() {
    let scratch = scratch_dir("recv-kill");
    let (pg, server_archive) = primary(scratch.path(), "");
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &pg.conninfo(), &[]);
    r.start();
    pg.pgbench(&["-i", "-s", "1"]);
    let mut bench = as_postgres(pg_bin("pgbench"))
        .args([
            "-h",
            pg.socket_dir().to_str().unwrap(),
            "-p",
            &pg.port().to_string(),
        ])
        .args(["-T", "10", "-c", "2", "postgres"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill at varied moments (bounded: eight rounds).
    let seed = std::process::id() as u64;
    for round in 0..8u64 {
        let ms = 200 + (seed.wrapping_mul(2654435761).wrapping_add(round * 7919) % 1000);
        std::thread::sleep(Duration::from_millis(ms));
        r.kill9();
        r.start();
    }
    let _ = bench.wait();
    let last = pg.switch_wal();
    wait_archived(&archive, &last, &r);
    r.stop();
    pg.wait_archived_upto(&last);
    let n = assert_identical(&archive, &server_archive, &last, scratch.path());
    assert!(n >= 3, "only {n} segments compared");
}

#[test]
fn a_server_restart_mid_stream_is_followed_without_a_gap() {
    let scratch = scratch_dir("recv-restart");
    let (mut pg, server_archive) = primary(scratch.path(), "");
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &pg.conninfo(), &[]);
    r.start();
    pg.pgbench(&["-i", "-s", "1"]);
    pg.restart();
    pg.pgbench(&["-t", "300", "-c", "2"]);
    pg.stop_immediate();
    pg.start();
    pg.pgbench(&["-t", "100"]);
    let last = pg.switch_wal();
    wait_archived(&archive, &last, &r);
    r.stop();
    pg.wait_archived_upto(&last);
    assert_identical(&archive, &server_archive, &last, scratch.path());
}

/// Synchronous: every commit the client saw acknowledged survives an immediate stop of the
/// primary, recovered from the archive plus the receiver's .partial.
#[test]
fn a_synchronous_receiver_loses_no_acknowledged_commit() {
    let scratch = scratch_dir("recv-sync");
    let (mut pg, _) = primary(
        scratch.path(),
        "synchronous_standby_names = 'walfs'\nsynchronous_commit = on",
    );
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &pg.conninfo(), &["--synchronous"]);
    r.start();
    let ok = poll_until(Duration::from_secs(30), || {
        pg.psql("select count(*) from pg_stat_replication where sync_state = 'sync'") == "1"
    });
    assert!(
        ok,
        "walfs never became the synchronous standby:\n{}",
        r.log_tail()
    );
    // Every commit waits for walfs' flush report; a hang here is a failure, not a pass.
    let backup = scratch.path().join("backup");
    pg.base_backup(&backup);
    let mut acked = 0;
    let sql: String = (1..=300)
        .map(|i| format!("insert into t values ({i});\n"))
        .collect();
    pg.psql("create table t (i int)");
    let out = run(as_postgres("timeout")
        .args(["60", pg_bin("psql").to_str().unwrap()])
        .args([
            "-h",
            pg.socket_dir().to_str().unwrap(),
            "-p",
            &pg.port().to_string(),
        ])
        .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-c", &sql, "postgres"]));
    if out.status.success() {
        acked = 300;
    }
    assert_eq!(
        acked,
        300,
        "commits did not complete:\n{}\n{}",
        stderr_str(&out),
        r.log_tail()
    );
    pg.stop_immediate();
    r.stop();
    // Restore through the mount over the same cache: the archive, the spool, and the segment
    // still being received served under its final name.
    let mount_args = vec![
        "--archive".to_string(),
        format!("file://{}", archive.display()),
    ];
    let serve = [("WALFS_SERVE_PARTIAL".to_string(), "true".to_string())];
    let mount = WalfsMount::start(scratch.path(), &mount_args, &serve);
    let mut restored = Postgres::existing(&scratch.path().join("restored"), &backup);
    restored.enable_recovery(&format!("cp {}/%f %p", mount.path().display()));
    restored.start();
    restored.wait_recovery_done(Duration::from_secs(120));
    assert_eq!(
        restored.psql("select count(*) from t"),
        acked.to_string(),
        "acknowledged commits lost"
    );
}

/// Streaming from a standby that is promoted: walfs follows onto the new timeline, archives
/// the history file, keeps the old timeline's last segment as its snapshot
/// (`receiver/<segment>.<end>.partial`, never PostgreSQL's own `<segment>.partial` name).
#[test]
fn a_timeline_switch_is_followed() {
    let scratch = scratch_dir("recv-tli");
    let (pg, _) = primary(scratch.path(), "");
    pg.pgbench(&["-i", "-s", "1"]);
    let standby_data = scratch.path().join("standby-data");
    pg.base_backup_with(&standby_data, &["-X", "stream", "-R"]);
    let standby_archive = scratch.path().join("standby-archive");
    std::fs::create_dir_all(&standby_archive).unwrap();
    chown_postgres(&standby_archive);
    let mut standby = Postgres::existing(&scratch.path().join("standby"), &standby_data);
    standby.set_conf(&format!(
        "archive_mode = always\narchive_command = 'cp %p {}/%f'\nhot_standby = on",
        standby_archive.display()
    ));
    standby.start();
    let archive = scratch.path().join("archive");
    let mut r = Receiver::new(scratch.path(), &archive, &standby.conninfo(), &[]);
    r.start();
    pg.pgbench(&["-t", "200"]);
    let last1 = pg.switch_wal();
    wait_archived(&archive, &last1, &r);
    // Some WAL into the next segment, replayed by the standby, so timeline 1 ends mid-segment.
    pg.pgbench(&["-t", "50"]);
    let lsn = pg.psql("select pg_current_wal_lsn()");
    let caught_up = poll_until(Duration::from_secs(30), || {
        standby.psql(&format!("select pg_last_wal_replay_lsn() >= '{lsn}'")) == "t"
    });
    assert!(caught_up, "the standby did not replay up to {lsn}");
    std::thread::sleep(Duration::from_secs(2)); // let walfs receive it too (status every 1 s)
                                                // Promote; the new timeline writes more.
    standby.psql("select pg_promote()");
    standby.wait_recovery_done(Duration::from_secs(60));
    standby.pgbench(&["-t", "200"]);
    let last2 = standby.switch_wal();
    assert!(last2.starts_with("00000002"), "{last2}");
    let t0 = Instant::now();
    wait_archived(&archive, &last2, &r);
    let names = archived(&archive);
    r.stop();
    assert!(names.contains(&"00000002.history".to_string()), "{names:?}");
    assert!(!names.iter().any(|n| n.ends_with(".partial")), "{names:?}");
    let snaps = stdout_str(&sh_ok(&mut walfs_cmd(&archive, &["ls", "--snapshots"])));
    assert!(
        snaps
            .lines()
            .any(|l| l.starts_with("receiver/00000001") && l.contains(".partial")),
        "no tail snapshot of timeline 1: {snaps:?}"
    );
    // New-timeline segments equal the promoted server's own.
    standby.wait_archived_upto(&last2);
    for n in names
        .iter()
        .filter(|n| n.starts_with("00000002") && is_wal_segment_name(n))
    {
        let dest = scratch.path().join("x");
        sh_ok(&mut walfs_cmd(
            &archive,
            &["fetch", n, dest.to_str().unwrap()],
        ));
        let theirs = standby_archive.join(n);
        if theirs.exists() {
            assert!(
                std::fs::read(&dest).unwrap() == std::fs::read(&theirs).unwrap(),
                "{n} differs"
            );
        }
    }
    assert!(t0.elapsed() < Duration::from_secs(90));
}

/// Received but not yet uploaded (the store is unreachable): the mount over the same cache
/// lists and serves it anyway, and still does after the upload.
#[test]
fn the_mount_shows_what_the_receiver_spooled() {
    let scratch = scratch_dir("recv-spool");
    let (pg, server_archive) = primary(scratch.path(), "");
    let s3 = S3Server::start();
    s3.create_bucket("wal");
    let proxy = FaultProxy::start(s3.port());
    let mut env = s3.env_through(&proxy);
    env.push(("WALFS_RETRY_TIMEOUT".into(), "2s".into()));
    let url = "s3://wal/p";
    let mut r = Receiver::with_url(scratch.path(), url, &env, &pg.conninfo(), &[]);
    r.start();
    // Let the receiver start (it probes the store), then cut the store off.
    let up = poll_until(Duration::from_secs(30), || {
        file_tail(&r.log, 50).contains("streaming")
    });
    assert!(up, "{}", r.log_tail());
    proxy.set_down(true);
    pg.pgbench(&["-i", "-s", "1"]);
    let last = pg.switch_wal();
    pg.wait_archived_upto(&last);
    let mount = WalfsMount::start(
        scratch.path(),
        &["--archive".to_string(), url.to_string()],
        &env,
    );
    let seen = poll_until(Duration::from_secs(60), || mount.file(&last).exists());
    assert!(seen, "a spooled segment is not visible:\n{}", r.log_tail());
    // A listing needs the archive: with it unreachable, an error, never a partial list.
    let ls = run(Command::new("ls").arg(mount.path()));
    assert!(
        !ls.status.success() && stderr_str(&ls).contains("Input/output error"),
        "{}",
        stderr_str(&ls)
    );
    let dest = scratch.path().join("out");
    sh_ok(Command::new("cp").arg(mount.file(&last)).arg(&dest));
    assert!(std::fs::read(&dest).unwrap() == std::fs::read(server_archive.join(&last)).unwrap());
    assert!(s3
        .list_keys("wal", "p/wal/")
        .iter()
        .all(|k| !k.ends_with(last.as_str())));
    // The store comes back: the spool drains, and the file is still there, the same.
    proxy.set_down(false);
    let uploaded = poll_until(Duration::from_secs(90), || {
        s3.list_keys("wal", "p/wal/")
            .iter()
            .any(|k| k.ends_with(last.as_str()))
    });
    assert!(uploaded, "the spool never drained:\n{}", r.log_tail());
    let ls = run(Command::new("ls").arg(mount.path()));
    assert!(
        ls.status.success(),
        "{}\n{}",
        stderr_str(&ls),
        mount
            .log()
            .lines()
            .filter(|l| l.contains("panicked") || l.contains("WARN") || l.contains("ERROR"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let ls = stdout_str(&ls);
    assert!(ls.contains(last.as_str()), "{ls}");
    let dest2 = scratch.path().join("out2");
    sh_ok(Command::new("cp").arg(mount.file(&last)).arg(&dest2));
    assert!(std::fs::read(&dest2).unwrap() == std::fs::read(server_archive.join(&last)).unwrap());
    r.stop();
    drop(mount);
}

/// Runs a receiver until it streams (true) or exits by itself (false); returns its log.
fn try_receive(dir: &Path, conninfo: &str, env: &[(String, String)]) -> (bool, String) {
    std::fs::create_dir_all(dir).unwrap();
    let archive = dir.join("archive");
    let mut r = Receiver::with_url(
        dir,
        &format!("file://{}", archive.display()),
        env,
        conninfo,
        &[],
    );
    r.start();
    let mut exited = false;
    let streaming = poll_until(Duration::from_secs(30), || {
        exited = r
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some());
        exited || file_tail(&r.log, 50).contains("streaming")
    }) && !exited;
    if streaming {
        r.stop();
    } else {
        r.kill9();
    }
    (streaming, file_tail(&r.log, 20))
}

#[test]
fn password_md5_scram_and_tls_connections() {
    let scratch = scratch_dir("recv-auth");
    let dir = scratch.path();
    let mut pg = Postgres::init(
        &dir.join("pg"),
        InitOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    );
    // A test CA signs the server's certificate (localhost / 127.0.0.1); another CA is unrelated.
    let data = pg.data_dir().to_path_buf();
    let openssl = |args: &[&str]| sh_ok(Command::new("openssl").current_dir(dir).args(args));
    for ca in ["ca", "other-ca"] {
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.crt"),
            "-subj",
            &format!("/CN=walfs test {ca}"),
        ]);
    }
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    // A client certificate for certificate authentication (CN = the role).
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "client.key",
        "-out",
        "client.csr",
        "-subj",
        "/CN=certrep",
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        "client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "client.crt",
        "-days",
        "2",
    ]);
    for f in ["server.crt", "server.key", "ca.crt"] {
        std::fs::copy(dir.join(f), data.join(f)).unwrap();
        chown_postgres(&data.join(f));
    }
    sh_ok(
        Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key")),
    );
    pg.set_conf(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'ca.crt'",
    );
    // Ahead of initdb's trust lines: SCRAM over TLS only for `rep`, md5 for `legacy`.
    let hba = data.join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "hostssl replication certrep 127.0.0.1/32 cert\nhost replication certrep 127.0.0.1/32 reject\n\
             hostssl replication rep 127.0.0.1/32 scram-sha-256\nhost replication rep 127.0.0.1/32 reject\n\
             host replication legacy 127.0.0.1/32 md5\n{old}"
        ),
    )
    .unwrap();
    pg.start();
    pg.psql("create role rep replication login password 'scram secret'");
    pg.psql("create role certrep replication login");
    pg.psql("set password_encryption = 'md5'; create role legacy replication login password 'md5 secret'");
    let port = pg.port();
    let base = |user: &str, extra: &str| format!("host=127.0.0.1 port={port} user={user} {extra}");
    let pw = |p: &str| vec![("PGPASSWORD".to_string(), p.to_string())];

    // SCRAM over TLS (prefer negotiates it; hostssl would refuse plain).
    let (ok, log) = try_receive(&dir.join("a"), &base("rep", ""), &pw("scram secret"));
    assert!(ok, "SCRAM over TLS: {log}");
    // A wrong password is a clear, final error.
    let (ok, log) = try_receive(&dir.join("b"), &base("rep", ""), &pw("wrong"));
    assert!(!ok && log.contains("authentication"), "{log}");
    // TLS refused on the client side: the server's hostssl-only rule rejects it.
    let (ok, log) = try_receive(
        &dir.join("c"),
        &base("rep", "sslmode=disable"),
        &pw("scram secret"),
    );
    assert!(!ok, "{log}");
    // verify-full against the right and the wrong root.
    let right = format!(
        "sslmode=verify-full sslrootcert={}",
        dir.join("ca.crt").display()
    );
    let (ok, log) = try_receive(&dir.join("d"), &base("rep", &right), &pw("scram secret"));
    assert!(ok, "verify-full: {log}");
    let wrong = format!(
        "sslmode=verify-full sslrootcert={}",
        dir.join("other-ca.crt").display()
    );
    let (ok, log) = try_receive(&dir.join("e"), &base("rep", &wrong), &pw("scram secret"));
    assert!(!ok && log.contains("TLS"), "{log}");
    // Certificate authentication: a client certificate from the conninfo, or from PGSSLCERT and
    // PGSSLKEY; without one the server refuses.
    let ca = dir.join("ca.crt").display().to_string();
    let with_cert = format!(
        "sslmode=verify-full sslrootcert={ca} sslcert={} sslkey={}",
        dir.join("client.crt").display(),
        dir.join("client.key").display()
    );
    let (ok, log) = try_receive(&dir.join("g"), &base("certrep", &with_cert), &[]);
    assert!(ok, "client certificate in the conninfo: {log}");
    let env = vec![
        (
            "PGSSLCERT".to_string(),
            dir.join("client.crt").display().to_string(),
        ),
        (
            "PGSSLKEY".to_string(),
            dir.join("client.key").display().to_string(),
        ),
    ];
    let only_root = format!("sslmode=verify-full sslrootcert={ca}");
    let (ok, log) = try_receive(&dir.join("h"), &base("certrep", &only_root), &env);
    assert!(ok, "client certificate from PGSSLCERT/PGSSLKEY: {log}");
    let (ok, log) = try_receive(&dir.join("i"), &base("certrep", &only_root), &[]);
    assert!(
        !ok && log.contains("certificate"),
        "no client certificate: {log}"
    );
    // A key others can read is refused before connecting, as libpq does.
    let open_key = dir.join("open.key");
    std::fs::copy(dir.join("client.key"), &open_key).unwrap();
    sh_ok(Command::new("chmod").arg("644").arg(&open_key));
    let loose = with_cert.replace("client.key", "open.key");
    let (ok, log) = try_receive(&dir.join("j"), &base("certrep", &loose), &[]);
    assert!(
        !ok && log.contains("group or world access"),
        "readable key: {log}"
    );
    // md5, with the password from a .pgpass file.
    let pgpass = dir.join("pgpass");
    std::fs::write(
        &pgpass,
        format!("127.0.0.1:{port}:replication:legacy:md5 secret\n"),
    )
    .unwrap();
    sh_ok(Command::new("chmod").arg("600").arg(&pgpass));
    let env = vec![("PGPASSFILE".to_string(), pgpass.display().to_string())];
    let (ok, log) = try_receive(&dir.join("f"), &base("legacy", "sslmode=disable"), &env);
    assert!(ok, "md5 with .pgpass: {log}");
    // A .pgpass others may read is ignored, as libpq ignores it: no password, and a warning.
    sh_ok(Command::new("chmod").arg("644").arg(&pgpass));
    let (ok, log) = try_receive(&dir.join("k"), &base("legacy", "sslmode=disable"), &env);
    assert!(
        !ok && log.contains("group or world access"),
        "readable .pgpass: {log}"
    );

    // Channel binding: required, SCRAM binds to the TLS connection and succeeds ...
    let (ok, log) = try_receive(
        &dir.join("l"),
        &base("rep", &format!("{right} channel_binding=require")),
        &pw("scram secret"),
    );
    assert!(ok, "channel_binding=require over TLS: {log}");
    // ... and it is refused where it cannot happen: no TLS, or a server using md5.
    let (ok, log) = try_receive(
        &dir.join("m"),
        &base("legacy", "sslmode=disable channel_binding=require"),
        &pw("md5 secret"),
    );
    assert!(!ok && log.contains("channel binding required"), "{log}");
    let (ok, log) = try_receive(&dir.join("n"), &base("rep", "channel_binding=maybe"), &[]);
    assert!(!ok && log.contains("channel_binding"), "{log}");

    // A password with spaces and a quote, quoted as libpq quotes it; a malformed string is an
    // error that never shows the password.
    pg.psql("create role quoted replication login password 'it''s a secret'");
    let hba_now = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("hostssl replication quoted 127.0.0.1/32 scram-sha-256\n{hba_now}"),
    )
    .unwrap();
    pg.psql("select pg_reload_conf()");
    let (ok, log) = try_receive(
        &dir.join("o"),
        &base("quoted", r"password='it\'s a secret'"),
        &[],
    );
    assert!(ok, "quoted password: {log}");
    let (ok, log) = try_receive(
        &dir.join("p"),
        &base("quoted", "password='it is a secret"),
        &[],
    );
    assert!(!ok && log.contains("unterminated"), "{log}");
    assert!(
        !log.contains("a secret"),
        "the password reached the log: {log}"
    );
}

#[test]
fn the_receiver_says_ready_and_reports_position_lag_and_spool() {
    let scratch = scratch_dir("recv-observe");
    let (pg, _server_archive) = primary(scratch.path(), "");
    let archive = scratch.path().join("archive");
    let notify = NotifySocket::bind(scratch.path());
    let port = free_port();
    let metrics_addr = format!("127.0.0.1:{port}");
    let mut r = Receiver::with_url(
        scratch.path(),
        &format!("file://{}", archive.display()),
        &[notify.env()],
        &pg.conninfo(),
        &["--metrics-addr", &metrics_addr],
    );
    r.start();
    let seen = notify.wait_for("READY=1", Duration::from_secs(60));
    assert!(seen.is_ok(), "no READY=1: {seen:?}\n{}", r.log_tail());
    pg.pgbench(&["-i", "-s", "1"]);
    let last = pg.switch_wal();
    wait_archived(&archive, &last, &r);
    let val = |text: &str, series: &str| metric(text, series).unwrap_or(0.0);
    let mut text = String::new();
    let ok = poll_until(Duration::from_secs(20), || {
        text = scrape(port).unwrap_or_default();
        val(&text, "walfs_receive_connected") == 1.0
            && val(&text, "walfs_receive_flushed_lsn") > 0.0
            && val(&text, r#"walfs_archive_operations_total{op="push"}"#) >= 3.0
    });
    assert!(ok, "metrics did not follow the stream:\n{text}");
    assert!(
        val(&text, "walfs_receive_wal_bytes_total") >= 3.0 * 1048576.0,
        "{text}"
    );
    assert!(metric(&text, "walfs_receive_lag_bytes").is_some(), "{text}");
    assert!(
        metric(&text, "walfs_upload_queue_files").is_some(),
        "{text}"
    );

    let status = || {
        let out = sh_ok(&mut walfs_cmd(
            &archive,
            &[
                &format!("--cache-dir={}", scratch.path().join("cache").display()),
                "status",
                "--json",
            ],
        ));
        serde_json::from_str::<serde_json::Value>(&stdout_str(&out)).unwrap()
    };
    let v = status();
    assert_eq!(v["receive"]["running"], true, "{v}");
    assert_eq!(v["receive"]["connected"], true, "{v}");
    assert_ne!(v["receive"]["flushed_lsn"], "0/0", "{v}");
    assert!(v["archive"]["segments"].as_u64().unwrap() >= 3, "{v}");
    r.stop();
    let seen = notify.wait_for("STOPPING=1", Duration::from_secs(10));
    assert!(seen.is_ok(), "no STOPPING=1: {seen:?}");
    let v = status();
    assert_eq!(v["receive"]["running"], false, "{v}");
}
