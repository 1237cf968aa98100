//! Test harness for walfs' integration tests.
//!
//! The tests under `mount-tests/tests/` drive the real `walfs` binary against real parts that they start
//! themselves: PostgreSQL from Debian's packages (run as the `postgres` OS user, since initdb refuses root),
//! a real S3-protocol server (moto's server mode on 127.0.0.1) and a real FUSE mount. `.ci/setup` installs all
//! of it; nothing here ever skips a test because a part is missing: it panics and says what to run.
//!
//! Assumptions: tests run as root (they use `runuser -u postgres --`, `chown` and FUSE), and every server
//! listens on 127.0.0.1 or a unix socket only. Every process the harness starts is stopped by its own PID
//! (or by `pg_ctl` on its own data directory) when its handle is dropped.
//!
//! Quick tour:
//! - [`walfs_bin`]: path of the built `walfs` binary.
//! - [`scratch_dir`]: a temporary directory under /tmp that the `postgres` user can use too.
//! - [`Postgres`]: a throwaway cluster (initdb, conf, start/stop, psql, pgbench, base backups, archiver waits,
//!   recovery from an archive).
//! - [`S3Server`]: moto's S3 server with signed-request helpers to look at (or tamper with) objects.
//! - [`real_wal`]: a once-per-process fixture of real archived WAL (segments and a `.backup` file) plus the
//!   base backup it belongs to.
//! - [`run`], [`sh_ok`], [`sh_fails`], [`as_postgres`], [`wait_for`]: process and polling helpers.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

mod azure;
pub mod chaos;
mod gcs;
mod mount;
mod observe;
mod receiver;
mod zero_loss;
pub use azure::AzuriteServer;
pub use chaos::{ChaosConfig, ChaosEvent, ChaosProxy, Fault, XorShift};
pub use gcs::FakeGcsServer;
pub use mount::{is_mounted, FaultProxy, WalfsMount};
pub use observe::{metric, scrape, NotifySocket};
pub use receiver::{archived, assert_identical, wait_archived, walfs_cmd, Receiver};
pub use zero_loss::{
    archive_args, count_runs_sql, env_count, restore_through, seeded, serve_partial, sync_primary,
    wait_sync, Committer, LossyFs, Watchdog,
};

/// The OS user PostgreSQL runs as (Debian's packages create it).
pub const PG_USER: &str = "postgres";

// ---------------------------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------------------------

/// Runs `cmd` to completion with stdin closed and stdout/stderr captured, and returns its output whatever
/// the exit status. Panics only if the program cannot be started at all (e.g. it does not exist).
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null());
    match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("could not start {cmd:?}: {e}"),
    }
}

/// Runs `cmd` as [`run`] does, for a command that must end by itself within `limit` (a refusal
/// of something that would otherwise run until stopped): past it, the child gets SIGTERM (a
/// mount unmounts on it), then SIGKILL, and the test fails.
pub fn run_within(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    let t0 = Instant::now();
    while child.try_wait().ok().flatten().is_none() && t0.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: a signal to the child this function started, by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        if !poll_until(Duration::from_secs(10), || {
            child.try_wait().ok().flatten().is_some()
        }) {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("wait");
        panic!(
            "still running after {limit:?}, stopped\n{}",
            describe_output(cmd, &out)
        );
    }
    child.wait_with_output().expect("wait")
}

/// Runs `cmd` (see [`run`]) and panics, showing the command, exit status, stdout and stderr, unless it
/// exits with status 0. Returns the output for further checks.
pub fn sh_ok(cmd: &mut Command) -> Output {
    let out = run(cmd);
    if !out.status.success() {
        panic!("command failed\n{}", describe_output(cmd, &out));
    }
    out
}

/// Like [`sh_ok`], but asserts that the command FAILS (non-zero exit or killed by a signal), as
/// `cp` into the mount must when walfs refuses a write. Returns the output for checks on stderr.
pub fn sh_fails(cmd: &mut Command) -> Output {
    let out = run(cmd);
    if out.status.success() {
        panic!(
            "command succeeded but was expected to fail\n{}",
            describe_output(cmd, &out)
        );
    }
    out
}

/// Stdout of `out` as (lossy) UTF-8 text.
pub fn stdout_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Stderr of `out` as (lossy) UTF-8 text.
pub fn stderr_str(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A multi-line description of a finished command for panic messages: command line, status, stdout, stderr.
pub fn describe_output(cmd: &Command, out: &Output) -> String {
    format!(
        "command: {cmd:?}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}

/// A `Command` that runs `program` as the `postgres` OS user (`runuser -u postgres -- program`), with the
/// working directory set to `/tmp` (the test's own cwd may not be reachable by `postgres`) and the libpq
/// environment variables (`PGHOST`, `PGPORT`, ...) of the test process removed.
pub fn as_postgres(program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", PG_USER, "--"])
        .arg(program)
        .current_dir("/tmp");
    for var in [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGPASSFILE",
        "PGSERVICE",
        "PGSERVICEFILE",
        "PGOPTIONS",
        "PGDATA",
        "PGSSLMODE",
        "PGAPPNAME",
        "PGTZ",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

/// `chown -R postgres:postgres path`.
pub fn chown_postgres(path: &Path) {
    sh_ok(
        Command::new("chown")
            .arg("-R")
            .arg(format!("{PG_USER}:{PG_USER}"))
            .arg(path),
    );
}

/// Polls `ready` every 50 ms until it returns true; panics with `what` after `timeout`.
/// For a richer panic message use [`poll_until`] and panic yourself.
pub fn wait_for(what: &str, timeout: Duration, ready: impl FnMut() -> bool) {
    if !poll_until(timeout, ready) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `ready` every 50 ms until it returns true (then returns true) or `timeout` passes (returns false).
pub fn poll_until(timeout: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind port 0, read the port, drop the socket).
/// Another process may take it before the caller binds it: [`Postgres::start`] and [`S3Server::start`]
/// retry with a fresh port when that happens.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// The last `lines` lines of a text file ("" if it cannot be read). Used for server logs in panic messages.
pub fn file_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("({} not readable)", path.display());
    };
    // Read at most the last 64 KiB: enough for any sensible number of log lines.
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------------------------
// walfs binary and scratch space
// ---------------------------------------------------------------------------------------------------------

/// `walfs keygen DIR/key` (DIR created if needed): a new key file for a test archive.
pub fn keygen(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).expect("create the key directory");
    let key = dir.join("key");
    sh_ok(Command::new(walfs_bin()).arg("keygen").arg(&key));
    key
}

/// `--archive file://ARCHIVE [--key-file KEY]`.
pub fn local_args(archive: &Path, key: Option<&Path>) -> Vec<String> {
    let mut a = vec![
        "--archive".to_string(),
        format!("file://{}", archive.display()),
    ];
    if let Some(k) = key {
        a.extend(["--key-file".to_string(), k.display().to_string()]);
    }
    a
}

/// Path of the `walfs` binary under test: `$WALFS_BIN` if set, else `walfs` in the cargo profile directory of
/// the running test executable (integration tests run from `target/<profile>/deps/`, so that is
/// `<dir of current exe>/../walfs`). Panics if the file does not exist: build it first with
/// `cargo build --bins` (`.ci/test` does). Never a reason to skip a test.
pub fn walfs_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("WALFS_BIN") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            panic!("$WALFS_BIN={} does not exist", p.display());
        }
        return p;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test exe has a parent dir")
        .to_path_buf();
    if dir.file_name() == Some(OsStr::new("deps")) {
        dir.pop();
    }
    let bin = dir.join("walfs");
    if !bin.is_file() {
        panic!(
            "walfs binary not found at {}: build it first: cargo build --bins (or set WALFS_BIN)",
            bin.display()
        );
    }
    bin
}

/// A fresh temporary directory `/tmp/walfs-<tag>-XXXXXX`, mode 0777 so that the `postgres` user (and a FUSE
/// mount's users) can create files in it although the tests run as root. Removed when the `TempDir` drops.
/// `tag` is reduced to at most 24 characters of `[A-Za-z0-9_-]` to keep unix socket paths short.
pub fn scratch_dir(tag: &str) -> TempDir {
    let tag: String = tag
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
        .take(24)
        .collect();
    let dir = tempfile::Builder::new()
        .prefix(&format!("walfs-{tag}-"))
        .tempdir_in("/tmp")
        .expect("create a scratch dir under /tmp");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))
        .expect("chmod 0777 scratch dir");
    dir
}

// ---------------------------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------------------------

/// Directory of the PostgreSQL server binaries: `$WALFS_PG_BINDIR` if set, else
/// `/usr/lib/postgresql/15/bin` (Debian 12), else the highest version under `/usr/lib/postgresql/*/bin`.
/// Panics with "run .ci/setup" if none has `initdb`.
pub fn pg_bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(d) = std::env::var_os("WALFS_PG_BINDIR") {
            let d = PathBuf::from(d);
            assert!(d.join("initdb").is_file(), "$WALFS_PG_BINDIR={} has no initdb", d.display());
            return d;
        }
        let preferred = PathBuf::from("/usr/lib/postgresql/15/bin");
        if preferred.join("initdb").is_file() {
            return preferred;
        }
        let mut best: Option<(u32, PathBuf)> = None;
        if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
            for e in entries.flatten() {
                let Some(v) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
                let bin = e.path().join("bin");
                if bin.join("initdb").is_file() && best.as_ref().is_none_or(|(bv, _)| v > *bv) {
                    best = Some((v, bin));
                }
            }
        }
        match best {
            Some((_, bin)) => bin,
            None => panic!("PostgreSQL server binaries not found under /usr/lib/postgresql/*/bin: run .ci/setup"),
        }
    })
}

/// Path of one PostgreSQL program (`initdb`, `pg_ctl`, `psql`, `pg_waldump`, ...) in [`pg_bin_dir`].
pub fn pg_bin(name: &str) -> PathBuf {
    pg_bin_dir().join(name)
}

/// Options for [`Postgres::init`].
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// `initdb --wal-segsize` in MiB: a power of two from 1 to 1024. Tests use 1 to stay fast.
    pub wal_segsize_mb: u32,
    /// `fsync` setting of the cluster. Off by default: it does not change the WAL that is written or
    /// archived, only makes the tests faster (an immediate stop does not lose the OS page cache).
    pub fsync: bool,
    /// Extra arguments for initdb (e.g. `--data-checksums`).
    pub initdb_args: Vec<String>,
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions {
            wal_segsize_mb: 16,
            fsync: false,
            initdb_args: Vec::new(),
        }
    }
}

/// A throwaway PostgreSQL cluster run as the `postgres` OS user.
///
/// Layout inside the directory given to [`Postgres::init`] (owned by `postgres`):
/// `data/` (PGDATA), `sock/` (the only unix socket directory), `server.log` (pg_ctl's log file).
/// The server listens on that socket and on 127.0.0.1:[`port`](Postgres::port) only, with `trust` auth
/// for the `postgres` role. Dropping a running `Postgres` stops it with `pg_ctl -m immediate` (and, should
/// that fail, kills the postmaster PID from its own `postmaster.pid`); the directory itself belongs to the
/// caller (usually a [`scratch_dir`]).
pub struct Postgres {
    dir: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    port: u16,
    wal_segsize_mb: u32,
    running: bool,
}

impl Postgres {
    /// Creates `dir` if needed, hands it to `postgres`, runs initdb into `dir/data` with
    /// `--wal-segsize=<opts.wal_segsize_mb>`, `--auth=trust`, `--locale=C`, UTF8, and writes the listen
    /// settings (a free port on 127.0.0.1, unix socket in `dir/sock`) to `postgresql.conf`. Not started.
    pub fn init(dir: &Path, opts: InitOptions) -> Postgres {
        let mb = opts.wal_segsize_mb;
        assert!(
            mb.is_power_of_two() && mb <= 1024,
            "wal_segsize_mb must be a power of two in 1..=1024, got {mb}"
        );
        let pg = Self::layout(dir, mb);
        let mut cmd = as_postgres(pg_bin("initdb"));
        cmd.arg("-D")
            .arg(&pg.data)
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .arg(format!("--wal-segsize={mb}"))
            .args(&opts.initdb_args);
        sh_ok(&mut cmd);
        pg.write_listen_conf();
        pg.set_conf("log_line_prefix = '%m [%p] '");
        pg.set_conf(&format!(
            "fsync = {}",
            if opts.fsync { "on" } else { "off" }
        ));
        pg
    }

    /// Wraps an existing data directory (e.g. a copy of a base backup, see [`WalFixture::copy_base_backup`])
    /// so it can be started: `dir` gets the `sock/` directory and `server.log` as in [`init`](Self::init),
    /// `data_dir` (anywhere) is chowned to `postgres` and mode 0700, a fresh port and the socket directory
    /// are appended to its `postgresql.conf` (later lines win over the source cluster's), and the WAL segment
    /// size is read with `pg_controldata`. Not started.
    pub fn existing(dir: &Path, data_dir: &Path) -> Postgres {
        let mut pg = Self::layout(dir, 0);
        pg.data = data_dir.to_path_buf();
        chown_postgres(&pg.data);
        fs::set_permissions(&pg.data, fs::Permissions::from_mode(0o700))
            .expect("chmod 0700 data dir");
        let out = sh_ok(
            as_postgres(pg_bin("pg_controldata"))
                .arg("-D")
                .arg(&pg.data),
        );
        let text = stdout_str(&out);
        let bytes: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("Bytes per WAL segment:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                panic!("no 'Bytes per WAL segment' in pg_controldata output:\n{text}")
            });
        pg.wal_segsize_mb = (bytes / (1024 * 1024)) as u32;
        pg.write_listen_conf();
        pg
    }

    fn layout(dir: &Path, wal_segsize_mb: u32) -> Postgres {
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let sock = dir.join("sock");
        fs::create_dir_all(&sock).expect("create socket dir");
        // A unix socket path is limited to 107 bytes: sock/.s.PGSQL.NNNNN must fit.
        assert!(
            sock.as_os_str().len() + 20 < 107,
            "socket dir path too long for a unix socket: {}",
            sock.display()
        );
        chown_postgres(dir);
        Postgres {
            dir: dir.to_path_buf(),
            data: dir.join("data"),
            sock,
            log: dir.join("server.log"),
            port: free_port(),
            wal_segsize_mb,
            running: false,
        }
    }

    fn write_listen_conf(&self) {
        self.set_conf(&format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'",
            self.port,
            self.sock.display()
        ));
    }

    /// Appends `lines` to `postgresql.conf` (later settings win), e.g.
    /// `pg.set_conf("archive_mode = on\narchive_command = 'cp %p /mnt/wal/%f'")`.
    /// Takes effect at the next start (or `select pg_reload_conf()` for reloadable settings).
    pub fn set_conf(&self, lines: &str) {
        let path = self.data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(f, "\n{lines}").expect("append to postgresql.conf");
    }

    /// Sets the cluster up for archive recovery on its next start: appends `archive_mode = off` (a base
    /// backup inherits the source's archiving, which must not run against the source's archive) and
    /// `restore_command = '<restore_command>'` (single quotes are escaped here), and creates
    /// `recovery.signal`. Add `recovery_target_*` settings with [`set_conf`](Self::set_conf) if needed.
    /// After [`start`](Self::start), use [`wait_recovery_done`](Self::wait_recovery_done): `pg_ctl -w`
    /// returns before archive recovery ends.
    pub fn enable_recovery(&self, restore_command: &str) {
        self.set_conf(&format!(
            "archive_mode = off\nrestore_command = '{}'",
            restore_command.replace('\'', "''")
        ));
        let signal = self.data.join("recovery.signal");
        fs::write(&signal, b"").expect("create recovery.signal");
        chown_postgres(&signal);
    }

    /// Starts the server with `pg_ctl start -w` (log in `server.log`). If the port was taken meanwhile,
    /// retries with a fresh one (twice). Panics with pg_ctl's output and the server log tail on failure.
    pub fn start(&mut self) {
        assert!(
            !self.running,
            "postgres in {} is already running",
            self.data.display()
        );
        for attempt in 0..3 {
            let log_len = fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0);
            let mut cmd = as_postgres(pg_bin("pg_ctl"));
            cmd.args(["start", "-w", "-t", "120", "-D"])
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log);
            let out = run(&mut cmd);
            if out.status.success() {
                self.running = true;
                return;
            }
            let new_log = fs::read(&self.log)
                .map(|b| {
                    String::from_utf8_lossy(&b[(log_len as usize).min(b.len())..]).into_owned()
                })
                .unwrap_or_default();
            let port_taken =
                new_log.contains("could not bind") || new_log.contains("Address already in use");
            if attempt < 2 && port_taken {
                self.port = free_port();
                self.set_conf(&format!("port = {}", self.port));
                continue;
            }
            panic!(
                "pg_ctl start failed\n{}\n--- server log tail\n{}",
                describe_output(&cmd, &out),
                self.log_tail(40)
            );
        }
    }

    /// Stops the server with `pg_ctl stop -m fast -w` (a clean shutdown; the archiver gets to archive
    /// what is ready). Panics with the log tail on failure.
    pub fn stop(&mut self) {
        self.stop_mode("fast");
    }

    /// Stops the server with `pg_ctl stop -m immediate -w`: a crash as far as PostgreSQL can tell.
    pub fn stop_immediate(&mut self) {
        self.stop_mode("immediate");
    }

    /// [`stop`](Self::stop) then [`start`](Self::start).
    pub fn restart(&mut self) {
        self.stop();
        self.start();
    }

    fn stop_mode(&mut self, mode: &str) {
        assert!(
            self.running,
            "postgres in {} is not running",
            self.data.display()
        );
        let mut cmd = as_postgres(pg_bin("pg_ctl"));
        cmd.args(["stop", "-w", "-t", "120", "-m", mode, "-D"])
            .arg(&self.data);
        let out = run(&mut cmd);
        if !out.status.success() {
            panic!(
                "pg_ctl stop failed\n{}\n--- server log tail\n{}",
                describe_output(&cmd, &out),
                self.log_tail(40)
            );
        }
        self.running = false;
    }

    /// Whether this handle started the server and has not stopped it.
    pub fn is_running(&self) -> bool {
        self.running
    }

    /// Runs `sql` with `psql -XAtq -v ON_ERROR_STOP=1` as `postgres` over the unix socket (database
    /// `postgres`) and returns stdout without the trailing newline (unaligned, tuples only: one row per line,
    /// columns separated by `|`). Panics with psql's stderr and the server log tail on error.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| {
            panic!(
                "psql failed: {sql}\n{e}\n--- server log tail\n{}",
                self.log_tail(30)
            )
        })
    }

    /// Like [`psql`](Self::psql) but returns psql's stderr as the error instead of panicking.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let mut cmd = as_postgres(pg_bin("psql"));
        cmd.args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                sql,
            ]);
        let out = run(&mut cmd);
        if out.status.success() {
            Ok(stdout_str(&out).trim_end_matches('\n').to_string())
        } else {
            Err(format!("{}\n{}", out.status, stderr_str(&out).trim_end()))
        }
    }

    /// Runs `pgbench <args> postgres` as `postgres` against this server (e.g. `&["-i", "-s", "1", "-q"]` or
    /// `&["-n", "-c", "2", "-t", "500"]`) and returns its stdout. Panics with its output on failure.
    pub fn pgbench(&self, args: &[&str]) -> String {
        let mut cmd = as_postgres(pg_bin("pgbench"));
        cmd.arg("-h")
            .arg(&self.sock)
            .args(["-p", &self.port.to_string(), "-U", "postgres"])
            .args(args)
            .arg("postgres");
        let out = run(&mut cmd);
        if !out.status.success() {
            panic!(
                "pgbench failed\n{}\n--- server log tail\n{}",
                describe_output(&cmd, &out),
                self.log_tail(30)
            );
        }
        stdout_str(&out)
    }

    /// Takes a base backup into `dest` with `pg_basebackup -X none -c fast --no-sync` (plain format).
    ///
    /// `-X none`: the backup contains no WAL, so restoring it needs the WAL archive, which is what walfs
    /// serves. With `archive_mode = on` the server also writes a `<segment>.<offset>.backup` history file
    /// into the archive and pg_basebackup waits until the WAL the backup needs has been archived.
    /// `dest` is created (it must not exist or be empty) and owned by `postgres` with mode 0700, so a copy
    /// can be started with [`Postgres::existing`].
    pub fn base_backup(&self, dest: &Path) {
        self.base_backup_with(dest, &["-X", "none"]);
    }

    /// [`base_backup`](Self::base_backup) with other pg_basebackup arguments instead of `-X none`
    /// (e.g. `&["-X", "fetch"]` for a self-contained backup, or `&["-X", "stream"]`).
    pub fn base_backup_with(&self, dest: &Path, args: &[&str]) {
        fs::create_dir_all(dest).unwrap_or_else(|e| panic!("create {}: {e}", dest.display()));
        chown_postgres(dest);
        fs::set_permissions(dest, fs::Permissions::from_mode(0o700))
            .expect("chmod 0700 backup dir");
        let mut cmd = as_postgres(pg_bin("pg_basebackup"));
        cmd.arg("-h")
            .arg(&self.sock)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-c",
                "fast",
                "--no-sync",
                "-D",
            ])
            .arg(dest)
            .args(args);
        let out = run(&mut cmd);
        if !out.status.success() {
            panic!(
                "pg_basebackup failed\n{}\n--- server log tail\n{}",
                describe_output(&cmd, &out),
                self.log_tail(30)
            );
        }
    }

    /// `pg_stat_archiver.archived_count` (cumulative statistics: kept over a clean restart, reset by a crash).
    pub fn archived_count(&self) -> u64 {
        self.psql("select archived_count from pg_stat_archiver")
            .parse()
            .expect("archived_count")
    }

    /// One line of archiver state for messages: archived/failed counts and last archived/failed names.
    pub fn archiver_status(&self) -> String {
        self.try_psql(
            "select format('archived_count=%s last_archived_wal=%s failed_count=%s last_failed_wal=%s', \
             archived_count, last_archived_wal, failed_count, last_failed_wal) from pg_stat_archiver",
        )
        .unwrap_or_else(|e| format!("(pg_stat_archiver not readable: {e})"))
    }

    /// Waits (at most 60 s) until `pg_stat_archiver.archived_count >= n`; panics with the archiver status
    /// and the server log tail (which shows failing archive_command output) otherwise.
    pub fn wait_archived(&self, n: u64) {
        self.wait_archived_timeout(n, Duration::from_secs(60));
    }

    /// [`wait_archived`](Self::wait_archived) with an explicit timeout.
    pub fn wait_archived_timeout(&self, n: u64, timeout: Duration) {
        let ok = poll_until(timeout, || {
            self.try_psql("select archived_count from pg_stat_archiver")
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_some_and(|c| c >= n)
        });
        if !ok {
            panic!(
                "timed out after {timeout:?} waiting for archived_count >= {n}: {}\n--- server log tail\n{}",
                self.archiver_status(),
                self.log_tail(40)
            );
        }
    }

    /// Waits (at most 60 s) until the WAL file `name` (a segment name as returned by
    /// [`switch_wal`](Self::switch_wal), or a `.backup`/`.history` name) has been archived: its
    /// `pg_wal/archive_status/<name>.ready` is gone and either `<name>.done` exists or
    /// `last_archived_wal >= name`. Panics with the archiver status and log tail otherwise.
    pub fn wait_archived_upto(&self, name: &str) {
        let status = self.data.join("pg_wal/archive_status");
        let timeout = Duration::from_secs(60);
        let ok = poll_until(timeout, || {
            if status.join(format!("{name}.ready")).exists() {
                return false;
            }
            status.join(format!("{name}.done")).exists()
                || self
                    .try_psql("select coalesce(last_archived_wal, '') from pg_stat_archiver")
                    .is_ok_and(|last| last.as_str() >= name)
        });
        if !ok {
            panic!(
                "timed out after {timeout:?} waiting for {name} to be archived: {}\n--- server log tail\n{}",
                self.archiver_status(),
                self.log_tail(40)
            );
        }
    }

    /// Makes sure the current segment holds some WAL (commits a transaction that has an xid), then
    /// `pg_switch_wal()`; returns the name of the segment just completed (which the archiver will archive).
    pub fn switch_wal(&self) -> String {
        self.psql("select txid_current()");
        self.psql("select pg_walfile_name(pg_switch_wal())")
    }

    /// Name of the WAL segment being written now (`pg_walfile_name(pg_current_wal_lsn())`).
    pub fn current_wal_file(&self) -> String {
        self.psql("select pg_walfile_name(pg_current_wal_lsn())")
    }

    /// Polls (at most `timeout`) until `pg_is_in_recovery()` is false, i.e. archive recovery has ended and
    /// the server was promoted. Panics with the server log tail otherwise.
    pub fn wait_recovery_done(&self, timeout: Duration) {
        let ok = poll_until(timeout, || {
            self.try_psql("select pg_is_in_recovery()")
                .is_ok_and(|s| s == "f")
        });
        if !ok {
            panic!(
                "timed out after {timeout:?} waiting for recovery to end\n--- server log tail\n{}",
                self.log_tail(40)
            );
        }
    }

    /// The cluster's database system identifier (`pg_control_system()`), the one in every WAL page header.
    pub fn system_identifier(&self) -> u64 {
        self.psql("select system_identifier from pg_control_system()")
            .parse()
            .expect("system_identifier")
    }

    /// The data directory (PGDATA).
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory given to `init`/`existing` (holds `sock/` and `server.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The unix socket directory (use as `-h` / `host=`).
    pub fn socket_dir(&self) -> &Path {
        &self.sock
    }

    /// The TCP port on 127.0.0.1 (also the socket's port number).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A libpq connection string for this server over its unix socket, as user and database `postgres`.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.sock.display(),
            self.port
        )
    }

    /// WAL segment size in MiB.
    pub fn wal_segsize_mb(&self) -> u32 {
        self.wal_segsize_mb
    }

    /// WAL segment size in bytes.
    pub fn wal_segsize_bytes(&self) -> u64 {
        u64::from(self.wal_segsize_mb) * 1024 * 1024
    }

    /// Path of the server log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let mut cmd = as_postgres(pg_bin("pg_ctl"));
        cmd.args(["stop", "-w", "-t", "30", "-m", "immediate", "-D"])
            .arg(&self.data);
        let stopped = cmd
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if !stopped {
            // Kill the postmaster this handle started, by the PID in its own postmaster.pid.
            if let Some(pid) = fs::read_to_string(self.data.join("postmaster.pid"))
                .ok()
                .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
            {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stdin(Stdio::null())
                    .output();
            }
        }
        self.running = false;
    }
}

// ---------------------------------------------------------------------------------------------------------
// S3 (moto)
// ---------------------------------------------------------------------------------------------------------

/// Default location of moto's server, installed by `.ci/setup`.
pub const MOTO_SERVER: &str = "/opt/walfs-test/venv/bin/moto_server";
/// Dummy credentials given to the S3 clients (moto does not check signatures).
pub const S3_ACCESS_KEY_ID: &str = "walfs-test-key";
/// See [`S3_ACCESS_KEY_ID`].
pub const S3_SECRET_ACCESS_KEY: &str = "walfs-test-secret";
/// Region given to the S3 clients.
pub const S3_REGION: &str = "us-east-1";

/// A real S3-protocol server: moto's server mode (`moto_server -H 127.0.0.1 -p PORT`), in memory, one per
/// handle. Supports put-if-absent (`PUT` with `If-None-Match: *` answers 412 on an existing key), ranged
/// GETs, ListObjectsV2 and multipart uploads.
///
/// Note: moto answers 403 to *unsigned* GET/HEAD of objects; the helpers here ([`request`](Self::request),
/// [`get_object`](Self::get_object), ...) sign with SigV4 via `curl --aws-sigv4`. The child is killed by
/// its PID on [`stop`](Self::stop) or drop; its output goes to a log file shown in panic messages.
pub struct S3Server {
    process: ServerProcess,
    port: u16,
    _dir: TempDir,
}

/// A server the harness started: killed by its PID and reaped on [`stop`](Self::stop) or drop;
/// its output goes to a log file shown in panic messages.
pub struct ServerProcess {
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProcess {
    pub fn new(child: Child, log: PathBuf) -> ServerProcess {
        ServerProcess {
            child: Some(child),
            log,
        }
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }

    /// Kills the child (by its PID) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

impl S3Server {
    /// The moto_server executable: `$WALFS_MOTO_SERVER` if set, else [`MOTO_SERVER`]. Panics with
    /// "run .ci/setup" if it does not exist.
    pub fn moto_bin() -> PathBuf {
        let p = std::env::var_os("WALFS_MOTO_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(MOTO_SERVER));
        if !p.is_file() {
            panic!(
                "moto S3 server not found at {}: run .ci/setup (or set WALFS_MOTO_SERVER)",
                p.display()
            );
        }
        p
    }

    /// Starts moto on a free port of 127.0.0.1 and waits (at most 60 s) until it answers a ListBuckets
    /// request. Retries with another port if the first was taken meanwhile.
    pub fn start() -> S3Server {
        let bin = Self::moto_bin();
        let dir = scratch_dir("s3");
        let log = dir.path().join("moto.log");
        let mut last_err = String::new();
        for _attempt in 0..3 {
            let port = free_port();
            let logf = fs::File::create(&log).expect("create moto log");
            let mut child = Command::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(logf.try_clone().expect("dup log fd"))
                .stderr(logf)
                .spawn()
                .unwrap_or_else(|e| panic!("could not start {}: {e}", bin.display()));
            match wait_moto_ready(&mut child, port, &log) {
                Ok(()) => {
                    return S3Server {
                        process: ServerProcess::new(child, log),
                        port,
                        _dir: dir,
                    }
                }
                Err(e) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let port_taken = e.contains("Address already in use");
                    last_err = e;
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("could not start moto_server: {last_err}");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Environment for an S3 client of this server (object_store's `AmazonS3Builder::from_env` and the AWS
    /// tools): `AWS_ENDPOINT`, `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (dummies),
    /// `AWS_DEFAULT_REGION` and `AWS_REGION` = us-east-1, `AWS_ALLOW_HTTP=true`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY_ID.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_ACCESS_KEY.to_string()),
            ("AWS_DEFAULT_REGION", S3_REGION.to_string()),
            ("AWS_REGION", S3_REGION.to_string()),
            ("AWS_ALLOW_HTTP", "true".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// [`env`](Self::env) with the endpoint pointed at `proxy` (which forwards to this server),
    /// so tests can cut or slow the path to the store.
    pub fn env_through(&self, proxy: &FaultProxy) -> Vec<(String, String)> {
        let mut env = self.env();
        for (k, v) in env.iter_mut() {
            if k == "AWS_ENDPOINT" || k == "AWS_ENDPOINT_URL" {
                *v = proxy.endpoint();
            }
        }
        env
    }

    /// Creates a bucket (`PUT /<name>`); panics unless the server answers 200.
    pub fn create_bucket(&self, name: &str) {
        let (status, body) =
            self.request("PUT", &format!("/{}", encode_path(name)), &[], Some(b""));
        if status != 200 {
            panic!(
                "create bucket {name}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    /// Sends one SigV4-signed request with curl and returns (HTTP status, body). `path_and_query` is
    /// already URL-encoded (e.g. `/bucket/key?list-type=2`); `headers` are extra `Name: value` lines;
    /// `body` is sent as `application/octet-stream` when given. For `HEAD` the body returned is the
    /// response headers. Panics if the server cannot be reached (curl fails), with the server's log tail.
    pub fn request(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[&str],
        body: Option<&[u8]>,
    ) -> (u16, Vec<u8>) {
        s3_request(&self.endpoint(), method, path_and_query, headers, body).unwrap_or_else(|e| {
            panic!(
                "S3 request {method} {path_and_query} failed: {e}\n--- moto log\n{}",
                self.log_tail(20)
            )
        })
    }

    /// Writes an object (plain PUT, overwriting); panics unless 200.
    pub fn put_object(&self, bucket: &str, key: &str, data: &[u8]) {
        let (status, body) = self.request("PUT", &object_path(bucket, key), &[], Some(data));
        if status != 200 {
            panic!(
                "put {bucket}/{key}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    /// Reads an object: `Some(bytes)`, or `None` if it does not exist (404). Panics on other statuses.
    pub fn get_object(&self, bucket: &str, key: &str) -> Option<Vec<u8>> {
        match self.request("GET", &object_path(bucket, key), &[], None) {
            (200, body) => Some(body),
            (404, _) => None,
            (status, body) => panic!(
                "get {bucket}/{key}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            ),
        }
    }

    /// Deletes an object (S3 answers 204 whether or not it existed); panics on other statuses.
    pub fn delete_object(&self, bucket: &str, key: &str) {
        let (status, body) = self.request("DELETE", &object_path(bucket, key), &[], None);
        if status != 204 && status != 200 {
            panic!(
                "delete {bucket}/{key}: HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            );
        }
    }

    /// All keys of `bucket` that start with `prefix`, in S3's (lexicographic) order, following
    /// ListObjectsV2 continuation tokens.
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = format!(
                "/{}?list-type=2&prefix={}",
                encode_path(bucket),
                encode_query(prefix)
            );
            if let Some(t) = &token {
                q.push_str(&format!("&continuation-token={}", encode_query(t)));
            }
            let (status, body) = self.request("GET", &q, &[], None);
            let xml = String::from_utf8_lossy(&body);
            if status != 200 {
                panic!("list {bucket}/{prefix}: HTTP {status}: {xml}");
            }
            keys.extend(xml_values(&xml, "Key"));
            token = if xml_values(&xml, "IsTruncated").first().map(String::as_str) == Some("true") {
                xml_values(&xml, "NextContinuationToken").into_iter().next()
            } else {
                None
            };
            if token.is_none() {
                return keys;
            }
        }
    }

    /// The last `lines` lines of moto's log (one line per request).
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Kills the moto_server child (by its PID) and reaps it. Idempotent.
    pub fn stop(&mut self) {
        self.process.stop()
    }
}

fn wait_moto_ready(child: &mut Child, port: u16, log: &Path) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let endpoint = format!("http://127.0.0.1:{port}");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "moto_server exited with {status}\n--- log\n{}",
                file_tail(log, 30)
            ));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            if let Ok((200, _)) = s3_request(&endpoint, "GET", "/", &[], None) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "moto_server on port {port} did not answer within 60 s\n--- log\n{}",
                file_tail(log, 30)
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One SigV4-signed request with curl: (HTTP status, body). See [`S3Server::request`].
fn s3_request(
    endpoint: &str,
    method: &str,
    path_and_query: &str,
    headers: &[&str],
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "60",
        "--aws-sigv4",
        &format!("aws:amz:{S3_REGION}:s3"),
    ])
    .args([
        "--user",
        &format!("{S3_ACCESS_KEY_ID}:{S3_SECRET_ACCESS_KEY}"),
    ])
    .args(["-w", "\n%{http_code}"]);
    if method == "HEAD" {
        cmd.args(["--head"]);
    } else {
        cmd.args(["-X", method]);
    }
    for h in headers {
        cmd.args(["-H", h]);
    }
    if body.is_some() {
        cmd.args([
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            "@-",
        ]);
    }
    cmd.arg(format!("{}{}", endpoint, path_and_query));
    cmd.stdin(if body.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("could not start curl: {e}"))?;
    let writer = body.map(|b| {
        let mut stdin = child.stdin.take().expect("curl stdin");
        let data = b.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        })
    });
    let out = child.wait_with_output().map_err(|e| format!("curl: {e}"))?;
    if let Some(w) = writer {
        let _ = w.join();
    }
    if !out.status.success() {
        return Err(describe_output(&cmd, &out));
    }
    let pos = out
        .stdout
        .iter()
        .rposition(|&b| b == b'\n')
        .ok_or("no status line from curl")?;
    let status: u16 = std::str::from_utf8(&out.stdout[pos + 1..])
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            format!(
                "bad status from curl: {:?}",
                String::from_utf8_lossy(&out.stdout[pos + 1..])
            )
        })?;
    Ok((status, out.stdout[..pos].to_vec()))
}

fn object_path(bucket: &str, key: &str) -> String {
    format!("/{}/{}", encode_path(bucket), encode_path(key))
}

fn percent_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_path(s: &str) -> String {
    percent_encode(s, true)
}

fn encode_query(s: &str) -> String {
    percent_encode(s, false)
}

/// Text of every `<tag>...</tag>` element in `xml`, unescaped. Enough for S3's flat XML answers.
fn xml_values(xml: &str, tag: &str) -> Vec<String> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(
            after[..j]
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&"),
        );
        rest = &after[j + close.len()..];
    }
    out
}

// ---------------------------------------------------------------------------------------------------------
// Real WAL fixture
// ---------------------------------------------------------------------------------------------------------

/// Query whose answer [`WalFixture::fingerprint`] holds: a cluster restored from the fixture's base backup
/// and archive (recovery to the end of the archive) must answer the same.
pub const FINGERPRINT_SQL: &str =
    "select count(*) || ':' || coalesce(sum(delta), 0) || ':' || (select sum(abalance) from pgbench_accounts) from pgbench_history";

/// Real WAL archived by a real PostgreSQL cluster (timeline 1), built by [`real_wal`].
#[derive(Debug)]
pub struct WalFixture {
    /// The archive directory: every file PostgreSQL's `archive_command` (`cp %p DIR/%f`) wrote — full
    /// segments and one `<segment>.<offset>.backup` file. Owned by root, readable by everyone: do not modify.
    pub dir: PathBuf,
    /// A plain-format base backup (`pg_basebackup -X none`) taken after `pgbench -i`, whose WAL is all in
    /// `dir`. Do not start it in place: copy it with [`WalFixture::copy_base_backup`].
    pub base_backup: PathBuf,
    /// The cluster's system identifier (`pg_control_system()`), found in every segment's page header.
    pub system_id: u64,
    /// WAL segment size in MiB.
    pub wal_segsize_mb: u32,
    /// Names of the archived segments (24 hex digits), sorted and consecutive. The first is the segment
    /// that was current when the server started archiving (not necessarily `000000010000000000000001`:
    /// initdb's own segments are not archived).
    pub segments: Vec<String>,
    /// Names of the `*.backup` history files, sorted (exactly one).
    pub backup_files: Vec<String>,
    /// [`FINGERPRINT_SQL`]'s answer after the last transaction (all of which is in the archived segments).
    pub fingerprint: String,
}

impl WalFixture {
    /// Segment size in bytes.
    pub fn segment_bytes(&self) -> u64 {
        u64::from(self.wal_segsize_mb) * 1024 * 1024
    }

    /// Path of one archived file.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Every file name in the archive (segments and `.backup`), sorted.
    pub fn files(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .segments
            .iter()
            .chain(&self.backup_files)
            .cloned()
            .collect();
        all.sort();
        all
    }

    /// Copies the base backup to `dest` (which must not exist; `cp -a`), owned by `postgres`, mode 0700,
    /// ready for [`Postgres::existing`] + [`Postgres::enable_recovery`].
    pub fn copy_base_backup(&self, dest: &Path) {
        assert!(!dest.exists(), "{} already exists", dest.display());
        sh_ok(
            Command::new("cp")
                .arg("-a")
                .arg(&self.base_backup)
                .arg(dest),
        );
        chown_postgres(dest);
        fs::set_permissions(dest, fs::Permissions::from_mode(0o700)).expect("chmod 0700");
    }
}

/// Whether `name` is a WAL segment file name: 24 uppercase hex digits.
pub fn is_wal_segment_name(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Real archived WAL with segments of `segsize_mb` MiB, at least `min_segments` of them, plus a `.backup`
/// file and the base backup it belongs to. Built once per test process and shared (read-only) by every
/// test that asks for the same segment size and no more segments than an earlier build made.
///
/// How: initdb `--wal-segsize=<segsize_mb>`, `archive_mode = on`,
/// `archive_command = 'test ! -f DIR/%f && cp %p DIR/%f'`, start, `pgbench -i -s 1`, `pg_basebackup -X none`,
/// then rounds of `pgbench -n -t 200` + `pg_switch_wal()` until `min_segments` segments are archived
/// (bounded: 120 s), the fingerprint query, a last switch, wait for the archiver, clean stop. The cluster
/// itself is deleted afterwards. With 1 MiB segments this takes a few seconds.
///
/// Files live under `/tmp/walfs-fixtures/p<pid>-...`; directories of test processes that are gone are
/// removed when the next fixture is built.
pub fn real_wal(segsize_mb: u32, min_segments: usize) -> &'static WalFixture {
    static FIXTURES: OnceLock<Mutex<HashMap<u32, Vec<&'static WalFixture>>>> = OnceLock::new();
    let mut map = FIXTURES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let list = map.entry(segsize_mb).or_default();
    if let Some(f) = list.iter().find(|f| f.segments.len() >= min_segments) {
        return f;
    }
    let fixture: &'static WalFixture = Box::leak(Box::new(build_real_wal(
        segsize_mb,
        min_segments,
        list.len(),
    )));
    list.push(fixture);
    fixture
}

const FIXTURE_ROOT: &str = "/tmp/walfs-fixtures";

fn remove_stale_fixtures() {
    let Ok(entries) = fs::read_dir(FIXTURE_ROOT) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('p')
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn build_real_wal(segsize_mb: u32, min_segments: usize, seq: usize) -> WalFixture {
    remove_stale_fixtures();
    fs::create_dir_all(FIXTURE_ROOT).expect("create fixture root");
    fs::set_permissions(FIXTURE_ROOT, fs::Permissions::from_mode(0o755))
        .expect("chmod fixture root");
    let root =
        PathBuf::from(FIXTURE_ROOT).join(format!("p{}-{segsize_mb}m-{seq}", std::process::id()));
    if root.exists() {
        fs::remove_dir_all(&root).expect("remove old fixture dir");
    }
    fs::create_dir_all(&root).expect("create fixture dir");
    fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).expect("chmod fixture dir");
    let archive = root.join("archive");
    fs::create_dir(&archive).expect("create archive dir");
    chown_postgres(&archive);
    let base = root.join("base");
    let cluster_dir = root.join("pg");

    let count_segments = || {
        fs::read_dir(&archive)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| is_wal_segment_name(&e.file_name().to_string_lossy()))
                    .count()
            })
            .unwrap_or(0)
    };

    let mut pg = Postgres::init(
        &cluster_dir,
        InitOptions {
            wal_segsize_mb: segsize_mb,
            ..Default::default()
        },
    );
    let a = archive.display();
    pg.set_conf(&format!(
        "archive_mode = on\narchive_command = 'test ! -f {a}/%f && cp %p {a}/%f'"
    ));
    pg.start();
    let system_id = pg.system_identifier();
    pg.pgbench(&["-i", "-s", "1", "-q"]);
    pg.base_backup(&base);

    let deadline = Instant::now() + Duration::from_secs(120);
    let mut rounds = 0;
    while rounds == 0 || count_segments() < min_segments {
        if Instant::now() >= deadline {
            panic!(
                "real_wal({segsize_mb}, {min_segments}): only {} segments archived after 120 s ({rounds} rounds): {}\n--- server log tail\n{}",
                count_segments(),
                pg.archiver_status(),
                pg.log_tail(30)
            );
        }
        pg.pgbench(&["-n", "-c", "1", "-t", "200"]);
        let seg = pg.switch_wal();
        pg.wait_archived_upto(&seg);
        rounds += 1;
    }
    let fingerprint = pg.psql(FINGERPRINT_SQL);
    let last = pg.switch_wal();
    pg.wait_archived_upto(&last);
    pg.stop();
    drop(pg);
    let _ = fs::remove_dir_all(&cluster_dir);

    // Freeze the archive: root-owned, world-readable.
    sh_ok(
        Command::new("chown")
            .arg("-R")
            .arg("root:root")
            .arg(&archive),
    );
    sh_ok(
        Command::new("chmod")
            .arg("-R")
            .arg("u=rwX,go=rX")
            .arg(&archive),
    );

    let mut segments = Vec::new();
    let mut backup_files = Vec::new();
    for e in fs::read_dir(&archive).expect("read archive").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if is_wal_segment_name(&name) {
            segments.push(name);
        } else if name.ends_with(".backup") {
            backup_files.push(name);
        }
    }
    segments.sort();
    backup_files.sort();
    assert!(
        segments.len() >= min_segments,
        "fixture has {} segments, wanted {min_segments}",
        segments.len()
    );
    assert_eq!(
        backup_files.len(),
        1,
        "fixture should have exactly one .backup file: {backup_files:?}"
    );
    WalFixture {
        dir: archive,
        base_backup: base,
        system_id,
        wal_segsize_mb: segsize_mb,
        segments,
        backup_files,
        fingerprint,
    }
}

/// For benchmarks and campaigns: `$WALFS_BIN`, or `cargo build --release --bin walfs` in this
/// workspace, copied to `dir/walfs` (mode 0755) and exported as `$WALFS_BIN` for the harness.
/// Returns the copy and where it came from (the commit, and whether `src/` had changes).
pub fn release_walfs(dir: &Path, say: &dyn Fn(&str)) -> (PathBuf, String) {
    let (src, source) = match std::env::var_os("WALFS_BIN") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(p.is_file(), "$WALFS_BIN={} does not exist", p.display());
            say(&format!("walfs: $WALFS_BIN = {}", p.display()));
            let source = format!("$WALFS_BIN={}", p.display());
            (p, source)
        }
        None => {
            let ws = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .to_path_buf();
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            say(&format!(
                "walfs: cargo build --release --bin walfs in {}",
                ws.display()
            ));
            let out = Command::new(&cargo)
                .args([
                    "build",
                    "--release",
                    "-p",
                    "walfs",
                    "--bin",
                    "walfs",
                    "--message-format=json-render-diagnostics",
                ])
                .current_dir(&ws)
                .stdin(Stdio::null())
                .stderr(Stdio::inherit())
                .output()
                .expect("run cargo");
            if !out.status.success() {
                panic!("cargo build --release --bin walfs failed (set WALFS_BIN to use a built binary)");
            }
            let text = String::from_utf8_lossy(&out.stdout);
            let exe = text
                .lines()
                .filter(|l| l.contains("\"compiler-artifact\""))
                .filter_map(|l| {
                    let i = l.find("\"executable\":\"")? + "\"executable\":\"".len();
                    let j = l[i..].find('"')?;
                    Some(PathBuf::from(&l[i..i + j]))
                })
                .find(|p| p.file_name().is_some_and(|n| n == "walfs"))
                .unwrap_or_else(|| ws.join("target/release/walfs"));
            assert!(exe.is_file(), "built walfs not found at {}", exe.display());
            let git = |args: &[&str]| {
                stdout_str(&run(Command::new("git").args(args).current_dir(&ws)))
                    .trim()
                    .to_string()
            };
            let commit = git(&["rev-parse", "--short", "HEAD"]);
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "Cargo.toml",
                "Cargo.lock",
            ]);
            let source = format!(
                "built from {} at commit {commit}{}",
                ws.display(),
                if dirty.is_empty() {
                    ""
                } else {
                    " + uncommitted changes in src/"
                }
            );
            (exe, source)
        }
    };
    fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let bin = dir.join("walfs");
    fs::copy(&src, &bin)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), bin.display()));
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).expect("chmod walfs");
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).expect("chmod bin dir");
    // Single-threaded here: nothing else reads the environment yet.
    std::env::set_var("WALFS_BIN", &bin);
    (bin, source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_and_encoding() {
        let xml =
            "<R><Contents><Key>a/b&amp;c</Key></Contents><Contents><Key>d</Key></Contents></R>";
        assert_eq!(
            xml_values(xml, "Key"),
            vec!["a/b&c".to_string(), "d".to_string()]
        );
        assert_eq!(encode_path("wal/0001 x+y"), "wal/0001%20x%2By");
        assert_eq!(encode_query("a/b"), "a%2Fb");
    }

    #[test]
    fn segment_names() {
        assert!(is_wal_segment_name("000000010000000000000003"));
        assert!(!is_wal_segment_name("000000010000000000000003.partial"));
        assert!(!is_wal_segment_name("00000001000000000000000g"));
        assert!(!is_wal_segment_name("00000002.history"));
    }
}
