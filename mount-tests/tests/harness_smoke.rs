//! Smoke tests of the harness itself: the real parts start, answer, and the WAL fixture is what it claims.
//! They do not need the walfs binary.

use std::fs;
use std::time::{Duration, Instant};

use walfs_mount_tests::{real_wal, scratch_dir, Postgres, S3Server, FINGERPRINT_SQL};

#[test]
fn s3_server_and_real_wal_fixture() {
    // S3: a real server on 127.0.0.1 with a bucket, round trip, and put-if-absent.
    let t = Instant::now();
    let s3 = S3Server::start();
    s3.create_bucket("walfs-smoke");
    eprintln!("moto up at {} in {:?}", s3.endpoint(), t.elapsed());
    assert!(s3.endpoint().starts_with("http://127.0.0.1:"));
    let env = s3.env();
    assert!(env
        .iter()
        .any(|(k, v)| k == "AWS_ENDPOINT" && *v == s3.endpoint()));
    assert!(env
        .iter()
        .any(|(k, v)| k == "AWS_ALLOW_HTTP" && v == "true"));

    assert_eq!(s3.get_object("walfs-smoke", "wal/none"), None);
    s3.put_object("walfs-smoke", "wal/a", b"hello");
    assert_eq!(
        s3.get_object("walfs-smoke", "wal/a").as_deref(),
        Some(&b"hello"[..])
    );
    let (status, body) = s3.request(
        "PUT",
        "/walfs-smoke/wal/a",
        &["If-None-Match: *"],
        Some(b"other"),
    );
    assert_eq!(
        status,
        412,
        "put-if-absent on an existing key: {}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        s3.get_object("walfs-smoke", "wal/a").as_deref(),
        Some(&b"hello"[..])
    );
    let (status, _) = s3.request(
        "PUT",
        "/walfs-smoke/wal/b",
        &["If-None-Match: *"],
        Some(b"new"),
    );
    assert_eq!(status, 200, "put-if-absent on a new key");
    let (status, _) = s3.request("GET", "/no-such-bucket/x", &[], None);
    assert_eq!(status, 404, "GET in a missing bucket");
    assert_eq!(
        s3.list_keys("walfs-smoke", "wal/"),
        vec!["wal/a".to_string(), "wal/b".to_string()]
    );
    s3.delete_object("walfs-smoke", "wal/b");
    assert_eq!(s3.list_keys("walfs-smoke", ""), vec!["wal/a".to_string()]);

    // Real archived WAL: 1 MiB segments, at least 8, plus the .backup file of the base backup.
    let t = Instant::now();
    let wal = real_wal(1, 8);
    eprintln!(
        "real_wal(1, 8) built in {:?}: {} segments ({} .. {}), backup files {:?}, system id {}, fingerprint {}",
        t.elapsed(),
        wal.segments.len(),
        wal.segments.first().unwrap(),
        wal.segments.last().unwrap(),
        wal.backup_files,
        wal.system_id,
        wal.fingerprint
    );
    println!("system identifier: {}", wal.system_id);
    assert!(wal.segments.len() >= 8, "{} segments", wal.segments.len());
    for name in &wal.segments {
        let len = fs::metadata(wal.path(name)).unwrap().len();
        assert_eq!(len, 1024 * 1024, "{name} is {len} bytes");
    }
    assert_eq!(wal.backup_files.len(), 1);
    let backup_text = fs::read_to_string(wal.path(&wal.backup_files[0])).unwrap();
    assert!(backup_text.contains("START WAL LOCATION"), "{backup_text}");
    assert!(wal.system_id != 0);
    // Segments are consecutive, on timeline 1.
    for pair in wal.segments.windows(2) {
        let n = |s: &str| u64::from_str_radix(&s[8..], 16).unwrap();
        assert!(pair[0].starts_with("00000001"));
        assert_eq!(
            n(&pair[1]),
            n(&pair[0]) + 1,
            "gap between {} and {}",
            pair[0],
            pair[1]
        );
    }
    // The page header of the first segment carries the system identifier (XLogLongPageHeaderData:
    // 8 bytes of xlp_magic/info/tli, 8 of pageaddr, 4 of rem_len + padding, then xlp_sysid).
    let first = fs::read(wal.path(&wal.segments[0])).unwrap();
    let sysid = u64::from_le_bytes(first[24..32].try_into().unwrap());
    assert_eq!(sysid, wal.system_id);

    // A second ask is served from the same fixture.
    assert!(std::ptr::eq(wal, real_wal(1, 4)));
}

/// The fixture's base backup restores with a stock `restore_command` from its archive, which is what a
/// walfs restore test does with the mount instead of the fixture's directory.
#[test]
fn fixture_base_backup_restores_from_archive() {
    let wal = real_wal(1, 8);
    let scratch = scratch_dir("restore");
    let data = scratch.path().join("data");
    wal.copy_base_backup(&data);
    let mut pg = Postgres::existing(&scratch.path().join("pg"), &data);
    assert_eq!(pg.wal_segsize_mb(), 1);
    pg.enable_recovery(&format!("cp {}/%f %p", wal.dir.display()));
    let t = Instant::now();
    pg.start();
    pg.wait_recovery_done(Duration::from_secs(60));
    eprintln!(
        "recovery from {} archived segments took {:?}",
        wal.segments.len(),
        t.elapsed()
    );
    assert_eq!(pg.psql(FINGERPRINT_SQL), wal.fingerprint);
    assert_eq!(pg.system_identifier(), wal.system_id);
    pg.stop();
}
