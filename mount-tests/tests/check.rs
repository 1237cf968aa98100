//! `walfs check` against a real PostgreSQL: it passes for a server that archives into this
//! archive (with `walfs push`, and with `cp` through a real walfs mount), and fails with the
//! right exit code and a reason for a server archiving elsewhere, one whose archive_command
//! does nothing, and a wrong key.

use std::path::PathBuf;
use std::process::Output;
use walfs_mount_tests::*;

struct Rig {
    scratch: tempfile::TempDir,
    bin: PathBuf,
    key: PathBuf,
    archive: PathBuf,
    pg: Postgres,
}

impl Rig {
    fn new() -> Rig {
        let scratch = scratch_dir("check");
        let bin = scratch.path().join("walfs");
        std::fs::copy(walfs_bin(), &bin).expect("copy walfs");
        let key = keygen(&scratch.path().join("keys"));
        chown_postgres(&key);
        let archive = scratch.path().join("archive");
        std::fs::create_dir_all(&archive).expect("archive dir");
        chown_postgres(&archive);
        let mut pg = Postgres::init(
            &scratch.path().join("pg"),
            InitOptions {
                wal_segsize_mb: 1,
                ..Default::default()
            },
        );
        pg.set_conf(&format!(
            "archive_mode = on\narchive_command = '{} --config /dev/null --archive file://{} \
             --key-file {} push %p'",
            bin.display(),
            archive.display(),
            key.display()
        ));
        pg.start();
        Rig {
            scratch,
            bin,
            key,
            archive,
            pg,
        }
    }

    fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres",
            self.pg.socket_dir().display(),
            self.pg.port()
        )
    }

    /// `walfs check` with an archive and key of the test's choosing.
    fn check(&self, archive: &std::path::Path, key: &std::path::Path, more: &[&str]) -> Output {
        run(as_postgres(&self.bin)
            .args(["--config", "/dev/null", "--archive"])
            .arg(format!("file://{}", archive.display()))
            .arg("--key-file")
            .arg(key)
            .args(["check", "-d", &self.conninfo(), "--timeout", "5s"])
            .args(more))
    }

    fn set_archive_command(&self, cmd: &str) {
        self.pg.psql(&format!(
            "alter system set archive_command = '{}'",
            cmd.replace('\'', "''")
        ));
        self.pg.psql("select pg_reload_conf()");
        // The archiver picks the new setting up at its next loop.
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn expect(out: &Output, code: i32, says: &[&str]) {
    let text = format!("{}{}", stdout_str(out), stderr_str(out));
    assert_eq!(out.status.code(), Some(code), "{text}");
    for s in says {
        assert!(text.contains(s), "expected {s:?} in:\n{text}");
    }
}

#[test]
fn check_passes_where_the_server_archives_and_says_why_elsewhere() {
    let r = Rig::new();

    // walfs push into this archive: passes, by a switched segment that opens with the key.
    let out = r.check(&r.archive, &r.key, &[]);
    expect(
        &out,
        0,
        &[
            "ok   archive_command",
            "switched WAL",
            "opens with key id",
            "check passed",
        ],
    );
    let json: serde_json::Value =
        serde_json::from_slice(&r.check(&r.archive, &r.key, &["--json"]).stdout)
            .expect("check --json is JSON");
    assert!(
        json.as_array()
            .is_some_and(|a| a.iter().all(|f| f["level"] != "fail")),
        "{json:#}"
    );

    // Another archive: the command names a different one, and the segment never arrives.
    let other = r.scratch.path().join("other");
    std::fs::create_dir_all(&other).expect("other archive dir");
    chown_postgres(&other);
    let out = r.check(&other, &r.key, &[]);
    expect(
        &out,
        1,
        &[
            "FAIL archive_command",
            &format!("not file://{}", other.display()),
            "did not reach",
        ],
    );

    // A wrong key: walfs's own setting, exit 2, naming the key file.
    let wrong = keygen(&r.scratch.path().join("wrong"));
    chown_postgres(&wrong);
    expect(&r.check(&r.archive, &wrong, &[]), 2, &["key"]);

    // cp through a real walfs mount of this archive: recognised, and proven by the switch.
    let mount = WalfsMount::start_with(
        &r.scratch.path().join("m"),
        &local_args(&r.archive, Some(&r.key)),
        &[],
        &[],
    );
    r.set_archive_command(&format!("cp %p {}/%f", mount.path().display()));
    let out = r.check(&r.archive, &r.key, &[]);
    expect(
        &out,
        0,
        &[
            "ok   archive_command",
            ", a walfs mount on this host",
            "switched WAL",
            "check passed",
        ],
    );
    drop(mount);

    // As packaged: the mount (root) keeps a local archive postgres cannot read. The segment
    // is then read back through the mount.
    let private = r.scratch.path().join("private");
    std::fs::create_dir_all(&private).expect("private archive dir");
    sh_ok(
        std::process::Command::new("chmod")
            .arg("0700")
            .arg(&private),
    );
    let mount = WalfsMount::start_with(
        &r.scratch.path().join("m2"),
        &local_args(&private, Some(&r.key)),
        &[],
        &[],
    );
    r.set_archive_command(&format!("cp %p {}/%f", mount.path().display()));
    let out = r.check(&private, &r.key, &[]);
    expect(
        &out,
        0,
        &[
            "WARN archive",
            "not readable by this user",
            "read back whole through",
            "check passed",
        ],
    );
    drop(mount);

    // An archive_command that archives nothing: the switch proves it, pg_stat_archiver is cited.
    r.set_archive_command("/bin/true");
    let out = r.check(&r.archive, &r.key, &[]);
    expect(
        &out,
        1,
        &["WARN archive_command", "did not reach", "pg_stat_archiver"],
    );

    // --no-switch reads settings only.
    let out = r.check(&r.archive, &r.key, &["--no-switch"]);
    expect(&out, 0, &["--no-switch"]);
}
