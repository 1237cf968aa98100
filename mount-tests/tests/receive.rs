//! `walfs receive` against real PostgreSQL: byte-identical segments, server restarts,
//! timeline switches, connections, status. Zero data loss through crashes, power cuts and
//! failovers is tested in `rpo.rs` and `power_cut.rs`.
//! Ground truth is the server's own archive (`archive_command = 'cp %p DIR/%f'`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use walfs_mount_tests::*;

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
    // A second receiver on the same cache directory would write the same spool: refused,
    // naming the setting that separates them.
    let cache = scratch.path().join("cache").display().to_string();
    let out = run_within(
        &mut walfs_cmd(
            &archive,
            &[
                "--cache-dir",
                &cache,
                "receive",
                "-d",
                &pg.conninfo(),
                "--slot",
                "other",
            ],
        ),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(
        stderr_str(&out).contains("one receiver per archive and cache directory"),
        "{}",
        stderr_str(&out)
    );
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
    // The standby archives into a plain directory (the ground truth) and, as users run it,
    // through a walfs mount into the receiver's archive: once promoted, its own
    // `<segment>.partial` of timeline 1 lands beside the receiver's snapshot of that segment.
    let archive = scratch.path().join("archive");
    let mount = WalfsMount::start(
        &scratch.path().join("standby-host"),
        &[
            "--archive".to_string(),
            format!("file://{}", archive.display()),
        ],
        &[],
    );
    let mut standby = Postgres::existing(&scratch.path().join("standby"), &standby_data);
    standby.set_conf(&format!(
        "archive_mode = always\narchive_command = 'cp %p {}/%f && cp %p {}/%f'\nhot_standby = on",
        standby_archive.display(),
        mount.path().display()
    ));
    standby.start();
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
    let snaps = stdout_str(&sh_ok(&mut walfs_cmd(&archive, &["ls", "--snapshots"])));
    let tail = snaps
        .lines()
        .find(|l| l.starts_with("receiver/00000001"))
        .unwrap_or_else(|| panic!("no tail snapshot of timeline 1: {snaps:?}"));
    // Two writers of timeline 1's last segment, two names: PostgreSQL's own (create-only,
    // archived through the mount) and the receiver's.
    standby.wait_archived_upto(&last2);
    let segment = tail.split('\t').nth(1).unwrap_or_default();
    let names = archived(&archive);
    assert!(
        names.contains(&format!("{segment}.partial")),
        "the promoted server's {segment}.partial is not archived: {names:?}\n{}",
        standby.archiver_status()
    );
    // New-timeline segments equal the promoted server's own.
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
        file_tail(r.log_path(), 50).contains("streaming")
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
        exited = r.exited();
        exited || file_tail(r.log_path(), 50).contains("streaming")
    }) && !exited;
    if streaming {
        r.stop();
    } else {
        r.kill9();
    }
    (streaming, file_tail(r.log_path(), 20))
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
    // ... naming where the password comes from.
    assert!(
        log.contains("PGPASSWORD") && log.contains("pgpass"),
        "{log}"
    );
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
