//! `bench`: walfs side by side with plain `cp` and pgBackRest, on one set of real WAL.
//!
//! ```text
//! cargo run -p walfs-mount-tests --release --bin bench -- [--segments N] [--runs R] [--quick]
//! ```
//!
//! - `--segments N`: 16 MiB segments in the WAL set (default 64, `--quick`: 16).
//! - `--runs R`: runs of every measurement; the table shows the median (default 3, `--quick`: 1).
//! - `--quick`: a smoke run: 16 segments, 1 run, no 50 ms latency rows.
//!
//! Needs root and what `bash .ci/setup` installs (PostgreSQL 15, fuse3, pgBackRest, moto). The `walfs`
//! binary under test: `$WALFS_BIN` if set, else the bench builds it (`cargo build --release --bin walfs`
//! in this workspace). Either way it is copied into the scratch directory first, so a rebuild during the
//! run does not change what is measured. Progress goes to stderr, the report (Markdown) to stdout.
//! Everything lives under one `/tmp/walfs-bench-*` directory, removed at the end; every mount is stopped
//! with SIGTERM by its PID, every PostgreSQL with `pg_ctl`, moto by its PID. (An interrupted run, ^C,
//! may leave that directory behind.)
//!
//! What it does, on ONE WAL set:
//! - The WAL: initdb (16 MiB segments), `archive_command = 'cp %p DIR/%f'`, a base backup
//!   (`pg_basebackup -X none`) before any workload, then rounds of `pgbench -i -s 10` +
//!   `pgbench -T 3` until N segments past the backup's start are archived. The set is exactly those N
//!   segments (from the backup's start segment on), so a recovery of the base backup replays all of them.
//! - Section 1, restore throughput: one `cp SRC/%f DEST` (or `walfs fetch`, `pgbackrest archive-get`) per
//!   segment, in order, one process after another, as a restore_command runs. Every mount row is a fresh
//!   mount with an empty cache dir (cold), read-ahead at its defaults unless the row says otherwise; the
//!   warm rows time a second pass. Mounts run as root with `--allow-other` (the deployed way), except the
//!   rows "run by the postgres user": a non-root mount (no passthrough), read by `cp` as postgres. Those
//!   are skipped where postgres cannot open /dev/fuse (Debian's mode is 0666; some containers make it 0600).
//! - Section 2, end-to-end recovery: wall time from `pg_ctl start` until `pg_is_in_recovery()` is false, and the
//!   walfs mount's peak RSS (VmHWM) meanwhile.
//! - Section 3, archive throughput: one `cp SEG DEST/` per segment into a directory (and with `sync` of the
//!   copy), into the mount with and without a key; `walfs push`; `pgbackrest archive-push`, sync and async,
//!   with and without aes-256-cbc.
//! - Section 4, latency: the S3 backend behind a TCP proxy that delays every request (20 ms, and 50 ms unless
//!   `--quick`): archive through the mount with archive-ahead on and off, restore loop through the mount
//!   with read-ahead off and on, and a recovery.
//!
//! Loops report the 95th percentile of one call beside the total; mount rows the mount's peak RSS.
//!
//! Rows are measured interleaved (run 1 of every row, then run 2, …) to spread drift. The source
//! segments and the local archives are warm in the page cache for every row alike, except the rows
//! that say "cold": their source's pages are dropped first (posix_fadvise, per file) and read back
//! after; every restore writes
//! into a fresh directory on /tmp that is compared byte for byte with the source afterwards (untimed).
//! After each mount-based measurement, `<cache-dir>/*/stats.json` (read-ahead statistics) is printed if
//! the mount wrote one.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use walfs_mount_tests::*;

const SEG_MIB: u64 = 16;
const SEG_BYTES: u64 = SEG_MIB * 1024 * 1024;
const STANZA: &str = "bench";
const BUCKET: &str = "bench";

// ---------------------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------------------

struct Opts {
    segments: usize,
    runs: usize,
    quick: bool,
    /// Only these sections (empty: all).
    only: Vec<u8>,
    /// Only rows whose label contains this (empty: all).
    rows: String,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo run -p walfs-mount-tests --release --bin bench -- [--segments N] [--runs R] [--quick]\n\
         \n  --segments N   16 MiB WAL segments in the set (default 64; --quick: 16)\
         \n  --runs R       runs per measurement, median shown (default 3; --quick: 1)\
         \n  --quick        smoke run: 16 segments, 1 run, no 50 ms latency rows\
         \n  --only LIST    only these sections, e.g. --only 3 (archive) or --only 1,2\
         \n  --rows TEXT    only the rows whose label contains TEXT (a row starting with … goes with the one before)\
         \n\nWALFS_BIN=path uses that walfs binary instead of building it (cargo build --release)."
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut segments = None;
    let mut runs = None;
    let mut quick = false;
    let mut only = Vec::new();
    let mut rows = String::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> usize {
            let v = args.next().unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                usage()
            });
            v.parse().unwrap_or_else(|_| {
                eprintln!("{name}: not a number: {v}");
                usage()
            })
        };
        match a.as_str() {
            "--segments" => segments = Some(value("--segments")),
            "--runs" => runs = Some(value("--runs")),
            "--quick" => quick = true,
            "--only" => {
                let v = args.next().unwrap_or_else(|| usage());
                only = v
                    .split(',')
                    .map(|x| x.trim().parse().unwrap_or_else(|_| usage()))
                    .collect();
            }
            "--rows" => rows = args.next().unwrap_or_else(|| usage()),
            "-h" | "--help" => usage(),
            other => {
                if let Some(v) = other.strip_prefix("--segments=") {
                    segments = Some(v.parse().unwrap_or_else(|_| usage()));
                } else if let Some(v) = other.strip_prefix("--runs=") {
                    runs = Some(v.parse().unwrap_or_else(|_| usage()));
                } else {
                    eprintln!("unknown argument: {other}");
                    usage()
                }
            }
        }
    }
    let opts = Opts {
        segments: segments.unwrap_or(if quick { 16 } else { 64 }),
        runs: runs.unwrap_or(if quick { 1 } else { 3 }),
        quick,
        only,
        rows,
    };
    if opts.segments < 4 || opts.segments > 4096 || opts.runs == 0 || opts.runs > 50 {
        eprintln!("--segments must be 4..=4096 and --runs 1..=50");
        usage()
    }
    opts
}

// ---------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn progress(msg: &str) {
    let t = START.get_or_init(Instant::now).elapsed().as_secs();
    eprintln!("[bench {:02}:{:02}] {msg}", t / 60, t % 60);
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next().map(|u| u == "0"))
        .unwrap_or(false)
}

fn mkdir(p: &Path) -> PathBuf {
    fs::create_dir_all(p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    p.to_path_buf()
}

/// A fresh (emptied) directory, mode 0777.
fn fresh_dir(p: &Path) -> PathBuf {
    if p.exists() {
        fs::remove_dir_all(p).unwrap_or_else(|e| panic!("remove {}: {e}", p.display()));
    }
    mkdir(p);
    fs::set_permissions(p, fs::Permissions::from_mode(0o777)).expect("chmod 0777");
    p.to_path_buf()
}

fn postgres_dir(p: &Path) -> PathBuf {
    fresh_dir(p);
    chown_postgres(p);
    p.to_path_buf()
}

fn remove(p: &Path) {
    if p.exists() {
        let _ = fs::remove_dir_all(p);
    }
}

/// Every file under `dir`: its path.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(files_under(&p)),
            Ok(t) if t.is_file() => out.push(p),
            _ => {}
        }
    }
    out
}

/// Makes the files under `dir` cold: written back, then their pages dropped from the page cache
/// (posix_fadvise DONTNEED, per file: nothing else on the machine is touched).
fn drop_pages(dir: &Path) {
    use std::os::fd::AsRawFd;
    sync();
    for p in files_under(dir) {
        if let Ok(f) = fs::File::open(&p) {
            // SAFETY: an advisory call on a file descriptor this function owns.
            unsafe {
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
    }
}

/// Reads every file under `dir` back into the page cache (after [`drop_pages`], so the rows that
/// follow find it as warm as the others did).
fn warm_pages(dir: &Path) {
    for p in files_under(dir) {
        if let Ok(mut f) = fs::File::open(&p) {
            let _ = std::io::copy(&mut f, &mut std::io::sink());
        }
    }
}

fn sync() {
    let _ = Command::new("sync").stdin(Stdio::null()).status();
}

/// Runs `cmd` and panics with its output (and `context()`) unless it exits 0.
fn must(cmd: &mut Command, context: &dyn Fn() -> String) {
    let out = run(cmd);
    if !out.status.success() {
        panic!("{}\n{}", describe_output(cmd, &out), context());
    }
}

fn no_context() -> String {
    String::new()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Peak resident set size (VmHWM, KiB) of a process.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// `<cache>/stats.json` or `<cache>/*/stats.json`, if the mount wrote one.
fn read_stats(cache: &Path) -> Option<String> {
    let mut found = Vec::new();
    let direct = cache.join("stats.json");
    if direct.is_file() {
        found.push(direct);
    }
    if let Ok(rd) = fs::read_dir(cache) {
        let mut dirs: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        dirs.sort();
        for d in dirs {
            let f = d.join("stats.json");
            if f.is_file() {
                found.push(f);
            }
        }
    }
    let texts: Vec<String> = found
        .iter()
        .filter_map(|f| fs::read_to_string(f).ok())
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect();
    (!texts.is_empty()).then(|| texts.join("\n"))
}

fn file_size_sum(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                total += file_size_sum(&e.path());
            } else {
                total += md.len();
            }
        }
    }
    total
}

fn count_files(dir: &Path) -> usize {
    let mut n = 0;
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if md.is_dir() {
                n += count_files(&e.path());
            } else {
                n += 1;
            }
        }
    }
    n
}

/// Segment number (for 16 MiB segments) of a 24-hex-digit segment name.
fn segno(name: &str) -> u64 {
    let log = u64::from_str_radix(&name[8..16], 16).expect("segment name");
    let seg = u64::from_str_radix(&name[16..24], 16).expect("segment name");
    log * (0x1_0000_0000 / SEG_BYTES) + seg
}

// ---------------------------------------------------------------------------------------------------------
// The walfs binary and the machine
// ---------------------------------------------------------------------------------------------------------

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    format!(
        "nproc {nproc}, {cpu}, Linux {}, {:.1} GiB RAM",
        kernel.trim(),
        mem_kib as f64 / 1048576.0
    )
}

fn first_line(cmd: &mut Command) -> String {
    let out = run(cmd);
    let s = stdout_str(&out);
    s.lines().next().unwrap_or("?").trim().to_string()
}

// ---------------------------------------------------------------------------------------------------------
// The WAL set
// ---------------------------------------------------------------------------------------------------------

struct WalSet {
    /// The N segments (and the `.backup` file), as `cp %p DIR/%f` archived them. Readable by everyone.
    dir: PathBuf,
    segments: Vec<String>,
    /// Base backup (`-X none`) taken before the workload.
    base: PathBuf,
    /// A pg1-path for pgBackRest: just `global/pg_control` and `PG_VERSION` of the base backup.
    fake_pg: PathBuf,
    rounds: usize,
    secs: f64,
}

fn segment_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_wal_segment_name(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn make_wal_set(root: &Path, n: usize) -> WalSet {
    let t0 = Instant::now();
    let gen_archive = postgres_dir(&root.join("gen-archive"));
    let gen_dir = root.join("gen");
    let mut pg = Postgres::init(&gen_dir, InitOptions::default());
    pg.set_conf(&format!(
        "archive_mode = on\narchive_command = 'cp %p {}/%f'",
        gen_archive.display()
    ));
    pg.start();
    let base = root.join("base");
    pg.base_backup(&base);
    let mut backup_file = None;
    wait_for(
        ".backup file in the archive",
        Duration::from_secs(60),
        || {
            backup_file = fs::read_dir(&gen_archive).ok().and_then(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .find(|n| n.ends_with(".backup"))
            });
            backup_file.is_some()
        },
    );
    let backup_file = backup_file.unwrap();
    let start = backup_file[..24].to_string();
    progress(&format!(
        "WAL: base backup starts in {start}; pgbench rounds until {n} segments from there are archived"
    ));
    let deadline = Instant::now() + Duration::from_secs(1800);
    let mut rounds = 0;
    loop {
        let have = segment_names(&gen_archive)
            .iter()
            .filter(|s| s.as_str() >= start.as_str())
            .count();
        if have >= n {
            break;
        }
        assert!(
            Instant::now() < deadline && rounds < 10 * n + 20,
            "only {have} of {n} segments after {rounds} pgbench rounds: {}",
            pg.archiver_status()
        );
        pg.pgbench(&["-i", "-q", "-s", "10"]);
        pg.pgbench(&["-n", "-c", "2", "-j", "2", "-T", "3"]);
        rounds += 1;
        progress(&format!(
            "WAL: round {rounds}: {have} segments archived before it"
        ));
    }
    let last = pg.switch_wal();
    pg.wait_archived_upto(&last);
    pg.stop();
    drop(pg);

    let dir = fresh_dir(&root.join("wal"));
    let segments: Vec<String> = segment_names(&gen_archive)
        .into_iter()
        .filter(|s| s.as_str() >= start.as_str())
        .take(n)
        .collect();
    assert_eq!(segments.len(), n);
    for (i, s) in segments.iter().enumerate() {
        assert_eq!(
            segno(s),
            segno(&segments[0]) + i as u64,
            "segments not consecutive at {s}"
        );
        let src = gen_archive.join(s);
        assert_eq!(
            fs::metadata(&src).unwrap().len(),
            SEG_BYTES,
            "{s} is not 16 MiB"
        );
        fs::copy(&src, dir.join(s)).expect("copy segment");
    }
    fs::copy(gen_archive.join(&backup_file), dir.join(&backup_file)).expect("copy .backup");
    sh_ok(Command::new("chmod").args(["-R", "a+rX"]).arg(&dir));

    let fake_pg = postgres_dir(&root.join("pgbackrest-pg1"));
    mkdir(&fake_pg.join("global"));
    fs::copy(
        base.join("global/pg_control"),
        fake_pg.join("global/pg_control"),
    )
    .expect("pg_control");
    fs::copy(base.join("PG_VERSION"), fake_pg.join("PG_VERSION")).expect("PG_VERSION");
    chown_postgres(&fake_pg);
    fs::set_permissions(&fake_pg, fs::Permissions::from_mode(0o700)).expect("chmod");

    remove(&gen_dir);
    remove(&gen_archive);
    WalSet {
        dir,
        segments,
        base,
        fake_pg,
        rounds,
        secs: t0.elapsed().as_secs_f64(),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Context shared by the measurements
// ---------------------------------------------------------------------------------------------------------

struct Ctx {
    root: PathBuf,
    walfs: PathBuf,
    wal: WalSet,
    key: PathBuf,
    /// A copy of `key` owned by postgres (mode 0600), for a mount run by that user.
    key_postgres: PathBuf,
    /// Local walfs archives with every segment: without and with the key.
    local_plain: PathBuf,
    local_key: PathBuf,
    s3_env: Vec<(String, String)>,
    proxy_env: Vec<(String, String)>,
    proxy: FaultProxy,
    /// pgBackRest: config file (repo owned by postgres, every segment pushed).
    br_conf: PathBuf,
    br_repo: PathBuf,
    br_repo_cipher: PathBuf,
    /// The same, encrypted (aes-256-cbc).
    br_conf_cipher: PathBuf,
    queue_max: String,
    prefetch_flags: bool,
}

impl Ctx {
    fn walfs(&self) -> Command {
        let mut c = Command::new(&self.walfs);
        c.env("WALFS_CONFIG", "/dev/null")
            .env_remove("WALFS_ARCHIVE")
            .env_remove("WALFS_KEY_FILE")
            .env("WALFS_LOG", "warn")
            .env("WALFS_CACHE_DIR", self.root.join("cli-cache"));
        c
    }

    /// pgBackRest's config: with aes-256-cbc (`cipher`) or without.
    fn br_conf_for(&self, cipher: bool) -> &Path {
        if cipher {
            &self.br_conf_cipher
        } else {
            &self.br_conf
        }
    }

    fn pgbackrest_with(&self, conf: &Path) -> Command {
        let mut c = Command::new("pgbackrest");
        c.arg(format!("--config={}", conf.display()))
            .arg(format!("--stanza={STANZA}"));
        c
    }

    fn run_dir(&self, tag: &str, run: usize) -> PathBuf {
        fresh_dir(&self.root.join("runs").join(format!("{tag}-{run}")))
    }

    fn local_args(&self, key: bool) -> Vec<String> {
        let a = if key {
            &self.local_key
        } else {
            &self.local_plain
        };
        let mut v = vec!["--archive".to_string(), format!("file://{}", a.display())];
        if key {
            v.extend(["--key-file".to_string(), self.key.display().to_string()]);
        }
        v
    }

    /// [`local_args`](Self::local_args) with a key for a mount run by the postgres user: the
    /// key's copy it owns (walfs refuses a key file others may read).
    fn local_args_postgres(&self) -> Vec<String> {
        vec![
            "--archive".to_string(),
            format!("file://{}", self.local_key.display()),
            "--key-file".to_string(),
            self.key_postgres.display().to_string(),
        ]
    }

    fn s3_args(&self, key: bool) -> Vec<String> {
        let mut v = vec![
            "--archive".to_string(),
            format!("s3://{BUCKET}/{}", if key { "key" } else { "plain" }),
        ];
        if key {
            v.extend(["--key-file".to_string(), self.key.display().to_string()]);
        }
        v
    }

    fn verify_restored(&self, dest: &Path, what: &str) {
        for s in &self.wal.segments {
            let got =
                fs::read(dest.join(s)).unwrap_or_else(|e| panic!("{what}: {s} not restored: {e}"));
            let want = fs::read(self.wal.dir.join(s)).expect("read source segment");
            assert!(
                got == want,
                "{what}: restored {s} differs from the archived segment"
            );
        }
    }
}

/// A mount for one measurement.
#[derive(Clone)]
struct MountSpec {
    args: Vec<String>,
    mount_args: Vec<String>,
    env: Vec<(String, String)>,
    latency: Option<Duration>,
    /// Run the mount as this user (uid, gid), as a non-root mount, and read it as that user;
    /// None: as root with `--allow-other`, the deployed way.
    user: Option<(u32, u32)>,
    /// Drop the local archive's pages from the page cache before a restore loop (read back after).
    cold: bool,
}

impl MountSpec {
    /// The directory of a `file://` archive.
    fn local_archive(&self) -> Option<PathBuf> {
        let at = self.args.iter().position(|a| a == "--archive")?;
        let url = self.args.get(at + 1)?;
        url.strip_prefix("file://").map(PathBuf::from)
    }

    fn start(&self, ctx: &Ctx, dir: &Path) -> WalfsMount {
        ctx.proxy.set_latency(self.latency.unwrap_or_default());
        let mut env = self.env.clone();
        if !env.iter().any(|(k, _)| k == "WALFS_LOG") {
            env.push(("WALFS_LOG".into(), "warn,fuser=error".into()));
        }
        WalfsMount::start_as(dir, &self.args, &self.mount_args, &env, self.user)
    }
}

/// What one run of one row measured.
#[derive(Default)]
struct Sample {
    secs: f64,
    /// Loops: the 95th percentile of one call, in ms.
    p95_ms: Option<f64>,
    rss_kib: Option<u64>,
    stats: Option<String>,
    note: Option<String>,
    redo: Option<String>,
}

/// Stops a mount after a measurement: peak RSS first, then stats.json (after the stop, when the mount
/// writes it on exit; else as it was before), printed.
fn finish_mount(ctx: &Ctx, mut m: WalfsMount, label: &str, run: usize, s: &mut Sample) {
    s.rss_kib = vm_hwm_kib(m.pid());
    let before = read_stats(&m.cache_dir());
    m.stop();
    ctx.proxy.set_latency(Duration::ZERO);
    s.stats = read_stats(&m.cache_dir()).or(before);
    match &s.stats {
        Some(t) => progress(&format!("stats.json after {label} (run {run}):\n{t}")),
        None => progress(&format!("(no stats.json in the cache dir after {label})")),
    }
}

// ---------------------------------------------------------------------------------------------------------
// Measurements
// ---------------------------------------------------------------------------------------------------------

/// Times `per_segment(name, dest_dir)` over every segment, in order, one after another: the
/// whole loop and the 95th percentile of one call.
fn timed_loop(ctx: &Ctx, dest: &Path, mut per_segment: impl FnMut(&str, &Path)) -> Sample {
    sync();
    let mut calls = Vec::with_capacity(ctx.wal.segments.len());
    let t0 = Instant::now();
    for s in &ctx.wal.segments {
        let t = Instant::now();
        per_segment(s, dest);
        calls.push(t.elapsed().as_secs_f64());
    }
    let secs = t0.elapsed().as_secs_f64();
    Sample {
        secs,
        p95_ms: Some(1000.0 * percentile(&mut calls, 0.95)),
        ..Default::default()
    }
}

/// The `q` quantile of `v` (nearest rank; 0 when empty).
fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied().unwrap_or(0.0)
}

fn cp(src: &Path, dst: &Path, context: &dyn Fn() -> String) {
    cp_as(src, dst, None, context);
}

/// `cp SRC DST` as `user` (uid, gid) if given: set in the child, as PostgreSQL's own processes
/// are, without runuser's session cost.
fn cp_as(src: &Path, dst: &Path, user: Option<(u32, u32)>, context: &dyn Fn() -> String) {
    must(
        as_user(&mut Command::new("cp"), user).arg(src).arg(dst),
        context,
    );
}

fn as_user(c: &mut Command, user: Option<(u32, u32)>) -> &mut Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
    c
}

/// `mkdir` of a fresh `p`, owned by `user` if given.
fn fresh_dir_for(p: &Path, user: Option<(u32, u32)>) -> PathBuf {
    let d = fresh_dir(p);
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(&d, Some(uid), Some(gid)).expect("chown");
    }
    d
}

/// `cold`: the source's pages dropped first (read from the disk, as an archive nobody read lately).
fn restore_plain_cp(ctx: &Ctx, run: usize, cold: bool) -> Sample {
    let dir = ctx.run_dir(
        if cold {
            "restore-cp-cold"
        } else {
            "restore-cp"
        },
        run,
    );
    let dest = fresh_dir(&dir.join("dest"));
    if cold {
        drop_pages(&ctx.wal.dir);
    }
    let timed = timed_loop(ctx, &dest, |s, d| {
        cp(&ctx.wal.dir.join(s), &d.join(s), &no_context)
    });
    ctx.verify_restored(&dest, "cp");
    remove(&dir);
    timed
}

/// `cp` of every segment out of a fresh mount, timed. `warm`: timed on a second pass, after every
/// segment was read once (untimed), so the mount serves its cache: through kernel passthrough,
/// or by its own reads without it.
fn restore_mount(
    ctx: &Ctx,
    spec: &MountSpec,
    label: &str,
    tag: &str,
    run: usize,
    warm: bool,
) -> Sample {
    let dir = ctx.run_dir(tag, run);
    let dest = fresh_dir_for(&dir.join("dest"), spec.user);
    let m = spec.start(ctx, &dir);
    let cold = spec.cold.then(|| spec.local_archive()).flatten();
    if let Some(archive) = &cold {
        drop_pages(archive);
    }
    if warm {
        let first = fresh_dir_for(&dir.join("first"), spec.user);
        for s in &ctx.wal.segments {
            cp_as(&m.file(s), &first.join(s), spec.user, &|| m.log_tail(30));
        }
        remove(&first);
    }
    let timed = timed_loop(ctx, &dest, |s, d| {
        cp_as(&m.file(s), &d.join(s), spec.user, &|| m.log_tail(30))
    });
    let mut sample = timed;
    finish_mount(ctx, m, label, run, &mut sample);
    ctx.verify_restored(&dest, label);
    if let Some(archive) = &cold {
        warm_pages(archive);
    }
    remove(&dir);
    sample
}

fn restore_walfs_fetch(ctx: &Ctx, run: usize) -> Sample {
    let dir = ctx.run_dir("restore-fetch", run);
    let dest = fresh_dir(&dir.join("dest"));
    let args = ctx.local_args(true);
    let timed = timed_loop(ctx, &dest, |s, d| {
        must(
            ctx.walfs().args(&args).arg("fetch").arg(s).arg(d.join(s)),
            &no_context,
        )
    });
    ctx.verify_restored(&dest, "walfs fetch");
    remove(&dir);
    timed
}

/// Waits (bounded) until pgBackRest's async process let go of its lock files in `lock_dir`.
fn wait_pgbackrest_idle(lock_dir: &Path) {
    let idle = poll_until(Duration::from_secs(120), || {
        fs::read_dir(lock_dir).map_or(true, |rd| {
            !rd.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".lock"))
        })
    });
    if !idle {
        progress(&format!(
            "warning: pgBackRest still holds a lock in {} after 120 s",
            lock_dir.display()
        ));
    }
}

/// `cold`: the repo's pages dropped first (read back after).
fn restore_pgbackrest(ctx: &Ctx, run: usize, async_: bool, cipher: bool, cold: bool) -> Sample {
    let dir = ctx.run_dir(
        &format!(
            "restore-br{}{}{}",
            if async_ { "-async" } else { "" },
            if cipher { "-cipher" } else { "" },
            if cold { "-cold" } else { "" }
        ),
        run,
    );
    let repo = if cipher {
        &ctx.br_repo_cipher
    } else {
        &ctx.br_repo
    };
    if cold {
        drop_pages(repo);
    }
    let conf = ctx.br_conf_for(cipher);
    let dest = fresh_dir(&dir.join("dest"));
    let lock = fresh_dir(&dir.join("lock"));
    let spool = fresh_dir(&dir.join("spool"));
    let timed = timed_loop(ctx, &dest, |s, d| {
        let mut c = ctx.pgbackrest_with(conf);
        c.arg(format!("--lock-path={}", lock.display()));
        if async_ {
            c.arg("--archive-async")
                .arg(format!("--spool-path={}", spool.display()))
                .arg(format!("--archive-get-queue-max={}", ctx.queue_max))
                .arg("--process-max=2");
        }
        must(c.arg("archive-get").arg(s).arg(d.join(s)), &no_context);
    });
    wait_pgbackrest_idle(&lock);
    ctx.verify_restored(&dest, "pgbackrest archive-get");
    if cold {
        warm_pages(repo);
    }
    remove(&dir);
    timed
}

// --- archive ---------------------------------------------------------------------------------------------

/// `fsync`: `cp %p DIR/%f && sync DIR/%f DIR`, a `cp` that makes the copy durable as an archive
/// must.
fn archive_plain_cp(ctx: &Ctx, run: usize, fsync: bool) -> Sample {
    let dir = ctx.run_dir(
        if fsync {
            "archive-cp-sync"
        } else {
            "archive-cp"
        },
        run,
    );
    let dest = fresh_dir(&dir.join("dest"));
    let timed = timed_loop(ctx, &dest, |s, d| {
        cp(&ctx.wal.dir.join(s), &d.join(s), &no_context);
        if fsync {
            // The copy and its directory entry, as a durable archive_command must.
            must(Command::new("sync").arg(d.join(s)).arg(d), &no_context);
        }
    });
    remove(&dir);
    timed
}

fn archive_mount(ctx: &Ctx, run: usize, key: bool) -> Sample {
    let label = "cp into the mount";
    let dir = ctx.run_dir(&format!("archive-mount-{key}"), run);
    let archive = dir.join("archive");
    let mut args = vec!["--archive".into(), format!("file://{}", archive.display())];
    if key {
        args.extend(["--key-file".into(), ctx.key.display().to_string()]);
    }
    let spec = MountSpec {
        args,
        mount_args: vec![],
        env: vec![],
        latency: None,
        user: None,
        cold: false,
    };
    let m = spec.start(ctx, &dir);
    let timed = timed_loop(ctx, m.path(), |s, d| {
        cp(&ctx.wal.dir.join(s), &d.join(s), &|| m.log_tail(30))
    });
    let mut sample = timed;
    finish_mount(ctx, m, label, run, &mut sample);
    let stored = count_files(&archive.join("wal"));
    assert_eq!(
        stored,
        ctx.wal.segments.len(),
        "{label}: {stored} objects in the archive"
    );
    sample.note = Some(format!(
        "stored {:.1} MiB",
        file_size_sum(&archive.join("wal")) as f64 / 1048576.0
    ));
    remove(&dir);
    sample
}

fn archive_walfs_push(ctx: &Ctx, run: usize) -> Sample {
    let dir = ctx.run_dir("archive-push", run);
    let archive = dir.join("archive");
    let args = [
        "--archive".to_string(),
        format!("file://{}", archive.display()),
        "--key-file".into(),
        ctx.key.display().to_string(),
    ];
    let timed = timed_loop(ctx, &dir, |s, _| {
        must(
            ctx.walfs().args(&args).arg("push").arg(ctx.wal.dir.join(s)),
            &no_context,
        )
    });
    let stored = count_files(&archive.join("wal"));
    assert_eq!(
        stored,
        ctx.wal.segments.len(),
        "walfs push: {stored} objects in the archive"
    );
    remove(&dir);
    timed
}

/// `cipher`: into a repo encrypted with aes-256-cbc.
fn archive_pgbackrest(ctx: &Ctx, run: usize, cipher: bool) -> Sample {
    let dir = ctx.run_dir(&format!("archive-br-{cipher}"), run);
    let conf = ctx.br_conf_for(cipher);
    let repo = fresh_dir(&dir.join("repo"));
    let lock = fresh_dir(&dir.join("lock"));
    let br = |c: &mut Command| {
        c.arg(format!("--repo1-path={}", repo.display()))
            .arg(format!("--lock-path={}", lock.display()));
    };
    let mut c = ctx.pgbackrest_with(conf);
    br(&mut c);
    must(c.args(["stanza-create", "--no-online"]), &no_context);
    let timed = timed_loop(ctx, &dir, |s, _| {
        let mut c = ctx.pgbackrest_with(conf);
        br(&mut c);
        must(c.arg("archive-push").arg(ctx.wal.dir.join(s)), &no_context);
    });
    let stored = count_files(&repo.join("archive").join(STANZA)) - 2; // archive.info + .copy
    assert_eq!(
        stored,
        ctx.wal.segments.len(),
        "pgbackrest archive-push: {stored} files in the repo"
    );
    remove(&dir);
    timed
}

/// A data directory as PostgreSQL's archiver sees it: pgBackRest's pg1-path files, every
/// segment in `pg_wal/` and marked `pg_wal/archive_status/<name>.ready`.
fn ready_data_dir(ctx: &Ctx, dir: &Path) -> PathBuf {
    let data = fresh_dir(&dir.join("data"));
    must(
        Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", ctx.wal.fake_pg.display()))
            .arg(&data),
        &no_context,
    );
    let status = data.join("pg_wal").join("archive_status");
    fs::create_dir_all(&status).expect("archive_status");
    for s in &ctx.wal.segments {
        fs::copy(ctx.wal.dir.join(s), data.join("pg_wal").join(s)).expect("copy a segment");
        fs::write(status.join(format!("{s}.ready")), b"").expect("mark it ready");
    }
    must(
        Command::new("chown")
            .arg("-R")
            .arg("postgres:postgres")
            .arg(&data),
        &no_context,
    );
    data
}

/// The postgres user's uid and gid.
fn postgres_ids() -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    // The postgres user owns its home, /var/lib/postgresql, in Debian's packages.
    let m = fs::metadata("/var/lib/postgresql").expect("/var/lib/postgresql");
    (m.uid(), m.gid())
}

/// What PostgreSQL does after archive_command succeeded.
fn mark_done(data: &Path, s: &str) {
    let status = data.join("pg_wal").join("archive_status");
    fs::rename(
        status.join(format!("{s}.ready")),
        status.join(format!("{s}.done")),
    )
    .expect("mark it done");
}

/// `cp` into the mount as PostgreSQL's archiver runs it: from its data directory, one segment
/// after another, every one marked ready beforehand (archive-ahead's case).
/// `latency`: into a fresh prefix of the S3 bucket behind the proxy that delays every request
/// by it; else into a fresh local archive.
fn archive_mount_ready(
    ctx: &Ctx,
    run: usize,
    ahead: bool,
    latency: Option<Duration>,
    key: bool,
) -> Sample {
    let label = "cp into the mount from a data directory";
    let tag = match latency {
        Some(l) => format!("archive-ready-s3-{}ms-{ahead}-{key}", l.as_millis()),
        None => format!("archive-ready-{ahead}-{key}"),
    };
    let dir = ctx.run_dir(&tag, run);
    let archive = dir.join("archive");
    let data = ready_data_dir(ctx, &dir);
    let url = match latency {
        Some(_) => format!("s3://{BUCKET}/{tag}-{run}"),
        None => format!("file://{}", archive.display()),
    };
    let mut args = vec!["--archive".to_string(), url.clone()];
    if key {
        args.extend(["--key-file".into(), ctx.key.display().to_string()]);
    }
    let spec = MountSpec {
        args: args.clone(),
        mount_args: vec![format!("--archive-ahead={ahead}")],
        // The closes' outcomes (info), to count how many archive-ahead confirmed.
        env: [(
            "WALFS_LOG".to_string(),
            "warn,fuser=error,walfs::fs=info".to_string(),
        )]
        .into_iter()
        .chain(if latency.is_some() {
            ctx.proxy_env.clone()
        } else {
            vec![]
        })
        .collect(),
        latency,
        user: None,
        cold: false,
    };
    let m = spec.start(ctx, &dir);
    // As PostgreSQL's archiver: the postgres user (set in the child, as PostgreSQL's own
    // processes are, without runuser's session cost), in its data directory.
    let pg = Some(postgres_ids());
    let timed = timed_loop(ctx, m.path(), |s, d| {
        must(
            as_user(&mut Command::new("cp"), pg)
                .current_dir(&data)
                .arg(format!("pg_wal/{s}"))
                .arg(d.join(s)),
            &|| m.log_tail(30),
        );
        mark_done(&data, s);
    });
    let mut sample = timed;
    let log = m.log();
    let confirmed = log.matches("stored ahead; the bytes cp wrote").count();
    // Every archived close logs its outcome.
    let archived = log.matches("outcome=").count();
    sample.note = Some(format!(
        "{confirmed} of {archived} closes confirmed by archive-ahead"
    ));
    finish_mount(ctx, m, label, run, &mut sample);
    let listed = sh_ok(
        ctx.walfs()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .args(&args)
            .arg("ls"),
    );
    let stored = stdout_str(&listed).lines().count();
    assert_eq!(
        stored,
        ctx.wal.segments.len(),
        "{label}: {stored} objects in {url}"
    );
    remove(&dir);
    sample
}

/// `pgbackrest archive-push --archive-async` as PostgreSQL's archiver runs it (the async
/// process pushes every ready segment, process-max 2, while the loop goes on).
fn archive_pgbackrest_async(ctx: &Ctx, run: usize, cipher: bool) -> Sample {
    let dir = ctx.run_dir(&format!("archive-br-async-{cipher}"), run);
    let conf = ctx.br_conf_for(cipher);
    let repo = fresh_dir(&dir.join("repo"));
    let lock = fresh_dir(&dir.join("lock"));
    let spool = fresh_dir(&dir.join("spool"));
    let data = ready_data_dir(ctx, &dir);
    let br = |c: &mut Command| {
        c.arg(format!("--repo1-path={}", repo.display()))
            .arg(format!("--lock-path={}", lock.display()))
            .arg(format!("--pg1-path={}", data.display()));
    };
    let mut c = ctx.pgbackrest_with(conf);
    br(&mut c);
    must(c.args(["stanza-create", "--no-online"]), &no_context);
    let timed = timed_loop(ctx, &dir, |s, _| {
        let mut c = ctx.pgbackrest_with(conf);
        br(&mut c);
        must(
            c.current_dir(&data)
                .arg(format!("--spool-path={}", spool.display()))
                .args(["--archive-async", "--process-max=2", "archive-push"])
                .arg(format!("pg_wal/{s}")),
            &no_context,
        );
        mark_done(&data, s);
    });
    let stored = count_files(&repo.join("archive").join(STANZA)) - 2; // archive.info + .copy
    assert_eq!(
        stored,
        ctx.wal.segments.len(),
        "pgbackrest archive-push --archive-async: {stored} files in the repo"
    );
    remove(&dir);
    timed
}

// --- recovery --------------------------------------------------------------------------------------------

fn psql_as_root(pg: &Postgres, sql: &str) -> Option<String> {
    let mut c = Command::new(pg_bin("psql"));
    c.args(["-XAtq", "-h"]).arg(pg.socket_dir()).args([
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-c",
        sql,
    ]);
    for v in [
        "PGHOST",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGPASSWORD",
        "PGSERVICE",
        "PGOPTIONS",
    ] {
        c.env_remove(v);
    }
    let out = run(&mut c);
    out.status
        .success()
        .then(|| stdout_str(&out).trim().to_string())
}

/// Recovers a copy of the base backup in `dir` with `restore_command`; returns the wall time from
/// `pg_ctl start` until `pg_is_in_recovery()` is false, with what the server log says it restored.
/// `on_done` runs the moment recovery has ended (e.g. to read the mount's peak RSS).
fn recover(
    ctx: &Ctx,
    dir: &Path,
    restore_command: &str,
    label: &str,
    on_done: &mut dyn FnMut(),
) -> Sample {
    let data = dir.join("data");
    sh_ok(Command::new("cp").arg("-a").arg(&ctx.wal.base).arg(&data));
    let mut pg = Postgres::existing(&dir.join("pg"), &data);
    pg.enable_recovery(restore_command);
    sync();
    let timeout = Duration::from_secs(3600);
    let t0 = Instant::now();
    pg.start();
    // Watch the log (cheap) for the end of recovery; ask the server itself now and then, and to confirm.
    let mut last_ask = Instant::now();
    let secs = loop {
        let log = fs::read_to_string(pg.log_path()).unwrap_or_default();
        let promoted_in_log = log.contains("database system is ready to accept connections");
        if promoted_in_log || last_ask.elapsed() >= Duration::from_millis(500) {
            last_ask = Instant::now();
            if psql_as_root(&pg, "select pg_is_in_recovery()").as_deref() == Some("f") {
                break t0.elapsed().as_secs_f64();
            }
        }
        if !pg.data_dir().join("postmaster.pid").exists() {
            panic!(
                "{label}: the server stopped during recovery\n--- log\n{}",
                pg.log_tail(40)
            );
        }
        if t0.elapsed() > timeout {
            panic!(
                "{label}: recovery did not end within {timeout:?}\n--- log\n{}",
                pg.log_tail(40)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    on_done();
    let log = fs::read_to_string(pg.log_path()).unwrap_or_default();
    let restored_names: Vec<&str> = log
        .split("restored log file \"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .collect();
    let restored = restored_names.len();
    let mut distinct = restored_names.clone();
    distinct.sort();
    distinct.dedup();
    let distinct = distinct.len();
    let redo = log
        .lines()
        .find_map(|l| l.split("redo done at ").nth(1))
        .map(|r| r.split_whitespace().next().unwrap_or("?").to_string());
    pg.stop_immediate();
    drop(pg);
    let n = ctx.wal.segments.len();
    let mut note = format!("{restored} restores, {distinct} distinct files");
    if distinct < n {
        note.push_str(&format!(" (WARNING: expected {n})"));
    }
    Sample {
        secs,
        note: Some(note),
        redo,
        ..Default::default()
    }
}

fn recovery_plain_cp(ctx: &Ctx, run: usize) -> Sample {
    let dir = ctx.run_dir("recover-cp", run);
    let s = recover(
        ctx,
        &dir,
        &format!("cp {}/%f %p", ctx.wal.dir.display()),
        "recovery cp",
        &mut || {},
    );
    remove(&dir);
    s
}

fn recovery_mount(ctx: &Ctx, spec: &MountSpec, label: &str, tag: &str, run: usize) -> Sample {
    let dir = ctx.run_dir(tag, run);
    let m = spec.start(ctx, &dir);
    let mut rss = None;
    let pid = m.pid();
    let cmd = format!("cp {}/%f %p", m.path().display());
    let mut s = recover(ctx, &dir, &cmd, label, &mut || rss = vm_hwm_kib(pid));
    finish_mount(ctx, m, label, run, &mut s);
    s.rss_kib = rss.or(s.rss_kib);
    remove(&dir);
    s
}

fn recovery_pgbackrest(ctx: &Ctx, run: usize, cipher: bool) -> Sample {
    let dir = ctx.run_dir(
        if cipher {
            "recover-br-cipher"
        } else {
            "recover-br"
        },
        run,
    );
    let conf = ctx.br_conf_for(cipher);
    let lock = postgres_dir(&dir.join("lock"));
    let spool = postgres_dir(&dir.join("spool"));
    let cmd = format!(
        "pgbackrest --config={} --stanza={STANZA} --pg1-path={} --lock-path={} --spool-path={} \
         --archive-async --archive-get-queue-max={} --process-max=2 archive-get %f \"%p\"",
        conf.display(),
        dir.join("data").display(),
        lock.display(),
        spool.display(),
        ctx.queue_max
    );
    let s = recover(ctx, &dir, &cmd, "recovery pgbackrest", &mut || {});
    wait_pgbackrest_idle(&lock);
    remove(&dir);
    s
}

// ---------------------------------------------------------------------------------------------------------
// Setup of the archives
// ---------------------------------------------------------------------------------------------------------

fn push_all(
    ctx_walfs: &dyn Fn() -> Command,
    args: &[String],
    env: &[(String, String)],
    wal: &WalSet,
) {
    for s in &wal.segments {
        must(
            ctx_walfs()
                .envs(env.iter().map(|(k, v)| (k, v)))
                .args(args)
                .arg("push")
                .arg(wal.dir.join(s)),
            &no_context,
        );
    }
}

/// A pgBackRest repo with every segment pushed; `cipher`: encrypted (aes-256-cbc), as walfs with
/// a key is.
fn setup_pgbackrest(root: &Path, wal: &WalSet, cipher: bool) -> (PathBuf, PathBuf) {
    let dir = postgres_dir(&root.join(if cipher {
        "pgbackrest-cipher"
    } else {
        "pgbackrest"
    }));
    let repo = postgres_dir(&dir.join("repo"));
    let lock = postgres_dir(&dir.join("lock"));
    let conf = dir.join("pgbackrest.conf");
    fs::write(
        &conf,
        format!(
            "[global]\nrepo1-path={}\nlock-path={}\nlog-path={}\nlog-level-file=off\nlog-level-console=warn\n\
             compress-type=zst\n{}\n[{STANZA}]\npg1-path={}\n",
            repo.display(),
            lock.display(),
            lock.display(),
            if cipher {
                "repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=walfs-bench-not-a-secret\n"
            } else {
                ""
            },
            wal.fake_pg.display()
        ),
    )
    .expect("write pgbackrest.conf");
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o644)).expect("chmod conf");
    let br = || {
        let mut c = as_postgres("pgbackrest");
        c.arg(format!("--config={}", conf.display()))
            .arg(format!("--stanza={STANZA}"));
        c
    };
    must(br().args(["stanza-create", "--no-online"]), &no_context);
    for s in &wal.segments {
        must(br().arg("archive-push").arg(wal.dir.join(s)), &no_context);
    }
    (conf, repo)
}

// ---------------------------------------------------------------------------------------------------------
// Rows and the report
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// A loop over the segments (restore or archive): seconds, MiB/s, segments/s.
    Loop,
    /// A recovery: seconds, segments replayed per second.
    Recovery,
}

type Runner<'a> = Box<dyn FnMut(usize) -> Sample + 'a>;

struct Row<'a> {
    section: u8,
    label: String,
    kind: Kind,
    /// Whether this row is the baseline of its section.
    baseline: bool,
    /// The section whose baseline it is compared with, when not its own (section 4's archive
    /// rows: section 3's).
    vs: Option<u8>,
    mount: bool,
    skip: Option<String>,
    runner: Option<Runner<'a>>,
    samples: Vec<Sample>,
}

fn row<'a>(section: u8, label: &str, kind: Kind, f: impl FnMut(usize) -> Sample + 'a) -> Row<'a> {
    Row {
        section,
        label: label.to_string(),
        kind,
        baseline: false,
        vs: None,
        mount: false,
        skip: None,
        runner: Some(Box::new(f)),
        samples: Vec::new(),
    }
}

fn skipped<'a>(section: u8, label: &str, kind: Kind, why: &str) -> Row<'a> {
    Row {
        section,
        label: label.to_string(),
        kind,
        baseline: false,
        vs: None,
        mount: true,
        skip: Some(why.to_string()),
        runner: None,
        samples: Vec::new(),
    }
}

fn mount_row<'a>(
    c: &'a Ctx,
    section: u8,
    label: &str,
    tag: &str,
    recovery: bool,
    sp: MountSpec,
) -> Row<'a> {
    let kind = if recovery { Kind::Recovery } else { Kind::Loop };
    if !sp.mount_args.is_empty() && !c.prefetch_flags {
        return skipped(
            section,
            label,
            kind,
            "this walfs mount has no --prefetch-bytes",
        );
    }
    let (label_s, tag_s) = (label.to_string(), tag.to_string());
    let mut r = if recovery {
        row(section, label, kind, move |run| {
            recovery_mount(c, &sp, &label_s, &tag_s, run)
        })
    } else {
        row(section, label, kind, move |run| {
            restore_mount(c, &sp, &label_s, &tag_s, run, false)
        })
    };
    r.mount = true;
    r
}

/// The members of a flat JSON object as (key, raw value) pairs, whitespace outside strings removed
/// (nested values are kept as raw text). Enough to tabulate stats.json without a JSON dependency.
fn flat_json(text: &str) -> Vec<(String, String)> {
    let mut compact = String::new();
    let mut in_str = false;
    let mut escaped = false;
    for ch in text.chars() {
        if in_str {
            compact.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_str = false;
            }
        } else if ch == '"' {
            in_str = true;
            compact.push(ch);
        } else if !ch.is_whitespace() {
            compact.push(ch);
        }
    }
    let body = compact
        .trim()
        .strip_prefix('{')
        .and_then(|b| b.strip_suffix('}'))
        .unwrap_or("");
    // Split at commas outside strings and brackets.
    let mut parts = Vec::new();
    let (mut depth, mut in_str, mut escaped, mut start) = (0i32, false, false, 0usize);
    for (i, ch) in body.char_indices() {
        if in_str {
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_str = false;
            }
            continue;
        }
        match ch {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < body.len() {
        parts.push(&body[start..]);
    }
    parts
        .into_iter()
        .filter_map(|p| {
            let p = p.strip_prefix('"')?;
            let end = p.find("\":")?;
            Some((p[..end].to_string(), p[end + 2..].to_string()))
        })
        .collect()
}

/// The 1-minute load average.
fn load_avg_1min() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// (total, steal) jiffies of all CPUs, from the `cpu` line of /proc/stat.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user/nice]
    let total: u64 = v.iter().take(8).sum();
    Some((total, *v.get(7)?))
}

fn fmt_rss(kib: Option<u64>) -> String {
    kib.map_or("".into(), |k| format!("{:.0} MiB", k as f64 / 1024.0))
}

fn main() {
    let opts = parse_args();
    START.get_or_init(Instant::now);
    if !is_root() {
        eprintln!("bench must run as root (PostgreSQL as the postgres user, FUSE mounts, chown)");
        std::process::exit(2);
    }
    let scratch = scratch_dir("bench");
    let root = scratch.path().to_path_buf();
    let (walfs, walfs_source) = release_walfs(&root.join("bin"), &|m: &str| progress(m));
    let mount_help = stdout_str(&run(Command::new(&walfs).args(["mount", "--help"])));
    let prefetch_flags = mount_help.contains("--prefetch-bytes");
    let machine = machine();
    let walfs_version = first_line(Command::new(&walfs).arg("--version"));
    let pg_version = first_line(Command::new(pg_bin("postgres")).arg("--version"));
    let br_version = first_line(Command::new("pgbackrest").arg("version"));
    progress(&format!("machine: {machine}"));
    progress(&format!(
        "{walfs_version} ({walfs_source}; copied to {}), {pg_version}, {br_version}",
        walfs.display()
    ));
    if !prefetch_flags {
        progress(
            "note: this walfs mount has no --prefetch-bytes: the read-ahead-off rows are skipped",
        );
    }
    let n = opts.segments;
    let mib = n as f64 * SEG_MIB as f64;

    // --- the WAL set and the archives (untimed) ---
    let wal = make_wal_set(&root, n);
    progress(&format!(
        "WAL: {n} segments {}..{} in {:.0} s ({} pgbench rounds)",
        wal.segments[0],
        wal.segments[n - 1],
        wal.secs,
        wal.rounds
    ));
    let key = root.join("key");
    sh_ok(Command::new(&walfs).arg("keygen").arg(&key));
    let t_setup = Instant::now();
    let cli = || {
        let mut c = Command::new(&walfs);
        c.env("WALFS_CONFIG", "/dev/null")
            .env_remove("WALFS_ARCHIVE")
            .env_remove("WALFS_KEY_FILE")
            .env("WALFS_LOG", "warn")
            .env("WALFS_CACHE_DIR", root.join("cli-cache"));
        c
    };
    let local_plain = root.join("archive-plain");
    let local_key = root.join("archive-key");
    let keyarg = ["--key-file".to_string(), key.display().to_string()];
    progress("setup: walfs push into local archives (without and with key)");
    push_all(
        &cli,
        &[
            "--archive".into(),
            format!("file://{}", local_plain.display()),
        ],
        &[],
        &wal,
    );
    push_all(
        &cli,
        &[
            "--archive".into(),
            format!("file://{}", local_key.display()),
            keyarg[0].clone(),
            keyarg[1].clone(),
        ],
        &[],
        &wal,
    );
    progress("setup: moto S3 server, walfs push into s3://bench/plain and s3://bench/key");
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let s3_env = s3.env();
    push_all(
        &cli,
        &["--archive".into(), format!("s3://{BUCKET}/plain")],
        &s3_env,
        &wal,
    );
    push_all(
        &cli,
        &[
            "--archive".into(),
            format!("s3://{BUCKET}/key"),
            keyarg[0].clone(),
            keyarg[1].clone(),
        ],
        &s3_env,
        &wal,
    );
    let proxy = FaultProxy::start(s3.port());
    let mut proxy_env = s3_env.clone();
    for (k, v) in proxy_env.iter_mut() {
        if k == "AWS_ENDPOINT" || k == "AWS_ENDPOINT_URL" {
            *v = proxy.endpoint();
        }
    }
    progress("setup: pgBackRest stanza and archive-push (zst) into a local repo");
    let (br_conf, br_repo) = setup_pgbackrest(&root, &wal, false);
    progress("setup: the same, encrypted (aes-256-cbc), into a second repo");
    let (br_conf_cipher, br_repo_cipher) = setup_pgbackrest(&root, &wal, true);
    // For a mount run by the postgres user: the keyed archive readable by it, and its own copy
    // of the key.
    chown_postgres(&local_key);
    let key_postgres = root.join("key-postgres");
    fs::copy(&key, &key_postgres).expect("copy the key");
    chown_postgres(&key_postgres);
    let setup_secs = t_setup.elapsed().as_secs_f64();
    progress(&format!("setup took {setup_secs:.0} s"));

    let ctx = Ctx {
        root: root.clone(),
        walfs: walfs.clone(),
        key,
        key_postgres,
        local_plain,
        local_key,
        s3_env,
        proxy_env,
        proxy,
        br_conf,
        br_repo,
        br_repo_cipher,
        br_conf_cipher,
        queue_max: format!("{}MiB", (n as u64 * SEG_MIB * 2).max(1024)),
        prefetch_flags,
        wal,
    };
    let stored_key = file_size_sum(&ctx.local_key.join("wal"));
    let stored_br = file_size_sum(&ctx.br_repo.join("archive").join(STANZA));

    // --- the rows ---
    let off: Vec<String> = vec!["--prefetch-bytes".into(), "0".into()];
    let spec = |args: Vec<String>, env: Vec<(String, String)>, ra: bool, lat: Option<Duration>| {
        MountSpec {
            args,
            mount_args: if ra { vec![] } else { off.clone() },
            env,
            latency: lat,
            user: None,
            cold: false,
        }
    };
    let c = &ctx;
    let mut rows: Vec<Row> = Vec::new();

    // 1. restore throughput
    let mut b = row(
        1,
        "`cp` from a local directory (baseline)",
        Kind::Loop,
        move |r| restore_plain_cp(c, r, false),
    );
    b.baseline = true;
    rows.push(b);
    rows.push(row(
        1,
        "… cold (its pages dropped first)",
        Kind::Loop,
        move |r| restore_plain_cp(c, r, true),
    ));
    rows.push(mount_row(
        c,
        1,
        "mount (read-ahead), local",
        "r-mount-local",
        false,
        spec(c.local_args(false), vec![], true, None),
    ));
    rows.push(mount_row(
        c,
        1,
        "mount (read-ahead), local, key",
        "r-mount-local-key",
        false,
        spec(c.local_args(true), vec![], true, None),
    ));
    rows.push(mount_row(
        c,
        1,
        "… archive cold (its pages dropped first)",
        "r-mount-local-key-cold",
        false,
        MountSpec {
            cold: true,
            ..spec(c.local_args(true), vec![], true, None)
        },
    ));
    rows.push(mount_row(
        c,
        1,
        "mount (read-ahead off: `--prefetch-bytes 0`), local, key",
        "r-mount-local-key-off",
        false,
        spec(c.local_args(true), vec![], false, None),
    ));
    rows.push(mount_row(
        c,
        1,
        "mount (read-ahead), S3 (moto)",
        "r-mount-s3",
        false,
        spec(c.s3_args(false), c.s3_env.clone(), true, None),
    ));
    rows.push(mount_row(
        c,
        1,
        "mount (read-ahead), S3 (moto), key",
        "r-mount-s3-key",
        false,
        spec(c.s3_args(true), c.s3_env.clone(), true, None),
    ));
    // A mount run by the postgres user: no `--allow-other` (only that user reads it), no
    // kernel passthrough (it needs root), read by `cp` as postgres, as its own restore_command.
    // Its rows are skipped where that user cannot open /dev/fuse (some containers make it 0600;
    // Debian's default is 0666).
    let pg = Some(postgres_ids());
    let non_root = MountSpec {
        user: pg,
        ..spec(c.local_args_postgres(), vec![], true, None)
    };
    let fuse_for_postgres = as_postgres("test")
        .args(["-r", "/dev/fuse", "-a", "-w", "/dev/fuse"])
        .status()
        .is_ok_and(|s| s.success());
    let non_root_skip = |label: &str, kind: Kind| {
        skipped(
            if kind == Kind::Loop { 1 } else { 2 },
            label,
            kind,
            "the postgres user cannot open /dev/fuse here (chmod 0666 /dev/fuse, Debian's default)",
        )
    };
    let label = "mount (read-ahead) run by the postgres user (non-root), local, key";
    rows.push(if fuse_for_postgres {
        mount_row(c, 1, label, "r-mount-nonroot", false, non_root.clone())
    } else {
        non_root_skip(label, Kind::Loop)
    });
    for (sp, label, tag) in [
        (
            MountSpec {
                mount_args: vec!["--passthrough".into(), "true".into()],
                ..spec(c.local_args(true), vec![], true, None)
            },
            "mount, warm (a second pass), local, key",
            "r-warm",
        ),
        (
            MountSpec {
                mount_args: vec!["--passthrough".into(), "false".into()],
                ..spec(c.local_args(true), vec![], true, None)
            },
            "… without passthrough (`--passthrough false`)",
            "r-warm-nopt",
        ),
        (
            non_root.clone(),
            "… run by the postgres user (non-root: no passthrough)",
            "r-warm-nonroot",
        ),
    ] {
        if sp.user.is_some() && !fuse_for_postgres {
            rows.push(non_root_skip(label, Kind::Loop));
            continue;
        }
        let l = label.to_string();
        let mut w = row(1, label, Kind::Loop, move |r| {
            restore_mount(c, &sp, &l, tag, r, true)
        });
        w.mount = true;
        rows.push(w);
    }
    rows.push(row(1, "`walfs fetch`, local, key", Kind::Loop, move |r| {
        restore_walfs_fetch(c, r)
    }));
    for async_ in [false, true] {
        for cipher in [false, true] {
            let label = match (async_, cipher) {
                (_, true) => "… with aes-256-cbc (as walfs with a key)",
                (false, false) => "`pgbackrest archive-get`, zst, local repo",
                (true, false) => {
                    "`pgbackrest archive-get`, zst, local repo, archive-async (process-max=2)"
                }
            };
            rows.push(row(1, label, Kind::Loop, move |r| {
                restore_pgbackrest(c, r, async_, cipher, false)
            }));
        }
    }
    rows.push(row(
        1,
        "… with aes-256-cbc, repo cold (its pages dropped first)",
        Kind::Loop,
        move |r| restore_pgbackrest(c, r, true, true, true),
    ));

    // 2. end-to-end recovery
    let mut b = row(
        2,
        "`cp` from a local directory (baseline)",
        Kind::Recovery,
        move |r| recovery_plain_cp(c, r),
    );
    b.baseline = true;
    rows.push(b);
    rows.push(mount_row(
        c,
        2,
        "`cp` out of the mount (read-ahead), local, key",
        "rec-mount",
        true,
        spec(c.local_args(true), vec![], true, None),
    ));
    rows.push(mount_row(
        c,
        2,
        "`cp` out of the mount (read-ahead off), local, key",
        "rec-mount-off",
        true,
        spec(c.local_args(true), vec![], false, None),
    ));
    let label = "`cp` out of a mount run by the postgres user (non-root), read-ahead, local, key";
    rows.push(if fuse_for_postgres {
        mount_row(c, 2, label, "rec-mount-nonroot", true, non_root)
    } else {
        non_root_skip(label, Kind::Recovery)
    });
    rows.push(row(
        2,
        "`pgbackrest archive-get`, zst, archive-async (process-max=2)",
        Kind::Recovery,
        move |r| recovery_pgbackrest(c, r, false),
    ));
    rows.push(row(
        2,
        "… with aes-256-cbc (as walfs with a key)",
        Kind::Recovery,
        move |r| recovery_pgbackrest(c, r, true),
    ));

    // 3. archive throughput
    let mut b = row(
        3,
        "`cp` into a local directory (baseline)",
        Kind::Loop,
        move |r| archive_plain_cp(c, r, false),
    );
    b.baseline = true;
    rows.push(b);
    rows.push(row(
        3,
        "`cp` + `sync` of the copy (fsync), into a local directory",
        Kind::Loop,
        move |r| archive_plain_cp(c, r, true),
    ));
    for key in [true, false] {
        let label = if key {
            "`cp` into the mount, local, key"
        } else {
            "… without a key"
        };
        let mut m = row(3, label, Kind::Loop, move |r| archive_mount(c, r, key));
        m.mount = true;
        rows.push(m);
    }
    rows.push(row(3, "`walfs push`, local, key", Kind::Loop, move |r| {
        archive_walfs_push(c, r)
    }));
    for cipher in [false, true] {
        let label = if cipher {
            "… with aes-256-cbc (as walfs with a key)"
        } else {
            "`pgbackrest archive-push`, zst, local repo"
        };
        rows.push(row(3, label, Kind::Loop, move |r| {
            archive_pgbackrest(c, r, cipher)
        }));
    }
    for (ahead, key, label) in [
        (
            true,
            true,
            "`cp` into the mount from a data directory, all ready, archive-ahead, key",
        ),
        (false, true, "… archive-ahead off"),
        (true, false, "… archive-ahead, without a key"),
    ] {
        let mut m = row(3, label, Kind::Loop, move |r| {
            archive_mount_ready(c, r, ahead, None, key)
        });
        m.mount = true;
        rows.push(m);
    }
    for cipher in [false, true] {
        let label = if cipher {
            "… with aes-256-cbc (as walfs with a key)"
        } else {
            "`pgbackrest archive-push --archive-async`, zst, process-max 2, from a data directory"
        };
        rows.push(row(3, label, Kind::Loop, move |r| {
            archive_pgbackrest_async(c, r, cipher)
        }));
    }

    // 4. latency
    let latencies: &[u64] = if opts.quick { &[20] } else { &[20, 50] };
    for &ms in latencies {
        let lat = Some(Duration::from_millis(ms));
        for ahead in [true, false] {
            let label = if ahead {
                format!("archive: `cp` into the mount from a data directory, all ready, S3 + {ms} ms, key, archive-ahead")
            } else {
                "… archive-ahead off".to_string()
            };
            let mut m = row(4, &label, Kind::Loop, move |r| {
                archive_mount_ready(c, r, ahead, lat, true)
            });
            m.mount = true;
            m.vs = Some(3);
            rows.push(m);
        }
        rows.push(mount_row(
            c,
            4,
            &format!("restore loop, mount, S3 + {ms} ms, key, read-ahead off"),
            &format!("lat{ms}-off"),
            false,
            spec(c.s3_args(true), c.proxy_env.clone(), false, lat),
        ));
        rows.push(mount_row(
            c,
            4,
            &format!("restore loop, mount, S3 + {ms} ms, key, read-ahead"),
            &format!("lat{ms}-on"),
            false,
            spec(c.s3_args(true), c.proxy_env.clone(), true, lat),
        ));
        rows.push(mount_row(
            c,
            4,
            &format!("recovery, mount, S3 + {ms} ms, key, read-ahead"),
            &format!("lat{ms}-rec"),
            true,
            spec(c.s3_args(true), c.proxy_env.clone(), true, lat),
        ));
        rows.push(mount_row(
            c,
            4,
            &format!("recovery, mount, S3 + {ms} ms, key, read-ahead off"),
            &format!("lat{ms}-rec-off"),
            true,
            spec(c.s3_args(true), c.proxy_env.clone(), false, lat),
        ));
    }

    if !opts.only.is_empty() {
        rows.retain(|r| opts.only.contains(&r.section));
    }
    if !opts.rows.is_empty() {
        // A "…" row continues the label of the one before it.
        let mut last = String::new();
        rows.retain(|r| {
            if !r.label.starts_with('…') {
                last = r.label.clone();
            }
            last.contains(&opts.rows) || r.label.contains(&opts.rows)
        });
    }

    // --- run, interleaved ---
    let t_measure = Instant::now();
    let cpu_before = cpu_times();
    let mut loads: Vec<f64> = Vec::new();
    for run in 1..=opts.runs {
        for r in rows.iter_mut() {
            let Some(f) = r.runner.as_mut() else { continue };
            loads.extend(load_avg_1min());
            progress(&format!(
                "run {run}/{}: {}. {} ...",
                opts.runs, r.section, r.label
            ));
            let s = f(run);
            progress(&format!(
                "run {run}/{}: {}. {}: {:.2} s{}{}",
                opts.runs,
                r.section,
                r.label,
                s.secs,
                s.rss_kib.map_or(String::new(), |k| format!(
                    ", walfs peak RSS {}",
                    fmt_rss(Some(k))
                )),
                s.note.as_ref().map_or(String::new(), |n| format!(", {n}"))
            ));
            r.samples.push(s);
        }
    }
    let measure_secs = t_measure.elapsed().as_secs_f64();
    let cpu_after = cpu_times();

    // --- report ---
    let mut out = String::new();
    let w = &mut out;
    use std::fmt::Write;
    let _ = writeln!(w, "# walfs benchmark\n");
    let _ = writeln!(w, "- machine: {machine}");
    let _ = writeln!(
        w,
        "- {walfs_version} ({walfs_source}), {pg_version}, {br_version}"
    );
    let _ = writeln!(
        w,
        "- WAL: {n} × 16 MiB segments ({mib:.0} MiB, {}..{}) from real PostgreSQL: base backup (`-X none`), then \
         {} rounds of `pgbench -i -s 10` + `pgbench -c 2 -T 3`; archived with `cp` into a local directory",
        ctx.wal.segments[0],
        ctx.wal.segments[n - 1],
        ctx.wal.rounds
    );
    let _ = writeln!(
        w,
        "- stored: walfs (zstd 3, key) {:.1} MiB ({:.1}×), pgBackRest (zst) {:.1} MiB ({:.1}×)",
        stored_key as f64 / 1048576.0,
        mib * 1048576.0 / stored_key.max(1) as f64,
        stored_br as f64 / 1048576.0,
        mib * 1048576.0 / stored_br.max(1) as f64
    );
    if !loads.is_empty() {
        let (lo, hi) = loads
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
        let steal = match (cpu_before, cpu_after) {
            (Some((t0, s0)), Some((t1, s1))) if t1 > t0 => {
                format!(
                    ", CPU steal {:.1}%",
                    100.0 * (s1 - s0) as f64 / (t1 - t0) as f64
                )
            }
            _ => String::new(),
        };
        let _ = writeln!(
            w,
            "- while measuring: 1-min load average {lo:.2}–{hi:.2} (includes the benchmark's own work){steal}"
        );
    }
    let _ = writeln!(
        w,
        "- median of {} run(s); rows interleaved; sources and local archives warm in the page cache (except \
         in the rows that say their pages were dropped); every mount row is a fresh mount with an empty \
         cache dir (cold); read-ahead at the mount's defaults unless `--prefetch-bytes 0`",
        opts.runs
    );
    if !ctx.prefetch_flags {
        let _ = writeln!(
            w,
            "- NOTE: this walfs has no `--prefetch-bytes`: \"read-ahead\" rows run its default behaviour, read-ahead-off rows are skipped"
        );
    }
    let baseline = |section: u8| -> Option<f64> {
        rows.iter()
            .find(|r| r.section == section && r.baseline && !r.samples.is_empty())
            .map(|r| median(&r.samples.iter().map(|s| s.secs).collect::<Vec<_>>()))
    };
    let titles = [
        (1, "1. Restore throughput: one process per segment, in order (as restore_command)"),
        (2, "2. End-to-end recovery: base backup replayed to the end, `pg_ctl start` → `pg_is_in_recovery()` false"),
        (3, "3. Archive throughput: one process per segment, in order (as archive_command)"),
        (4, "4. Latency: S3 (moto) behind a proxy that delays every request"),
    ];
    for (section, title) in titles {
        let _ = writeln!(w, "\n## {title}\n");
        let _ = writeln!(
            w,
            "| what | seconds | MiB/s | segments/s | p95 per call | vs plain `cp` | walfs peak RSS | runs (s) | notes |"
        );
        let _ = writeln!(
            w,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
        );
        for r in rows.iter().filter(|r| r.section == section) {
            if let Some(why) = &r.skip {
                let _ = writeln!(w, "| {} | skipped | | | | | | | {why} |", r.label);
                continue;
            }
            let times: Vec<f64> = r.samples.iter().map(|s| s.secs).collect();
            if times.is_empty() {
                continue;
            }
            let t = median(&times);
            // Section 4 compares with section 1's (restore loops), 2's (recovery) or 3's
            // (archive) baseline.
            let base = match (section, r.kind) {
                _ if r.vs.is_some() => r.vs.and_then(baseline),
                (4, Kind::Loop) => baseline(1),
                (4, Kind::Recovery) => baseline(2),
                (s, _) => baseline(s),
            };
            let ratio = base.map_or("".into(), |b| format!("{:.2}×", b / t));
            let rss: Vec<u64> = r.samples.iter().filter_map(|s| s.rss_kib).collect();
            let rss = rss.iter().max().copied();
            let runs = times
                .iter()
                .map(|t| format!("{t:.2}"))
                .collect::<Vec<_>>()
                .join(", ");
            let p95: Vec<f64> = r.samples.iter().filter_map(|s| s.p95_ms).collect();
            let p95 = if p95.is_empty() {
                String::new()
            } else {
                format!("{:.0} ms", median(&p95))
            };
            let mut notes: Vec<String> = Vec::new();
            if let Some(nt) = r.samples.last().and_then(|s| s.note.clone()) {
                notes.push(nt);
            }
            let _ = writeln!(
                w,
                "| {} | {t:.2} | {:.0} | {:.1} | {p95} | {ratio} | {} | {runs} | {} |",
                r.label,
                mib / t,
                n as f64 / t,
                if r.mount { fmt_rss(rss) } else { String::new() },
                notes.join("; ")
            );
        }
    }
    // Every recovery must have replayed to the same point.
    let redos: Vec<(String, String)> = rows
        .iter()
        .filter(|r| r.kind == Kind::Recovery)
        .flat_map(|r| {
            r.samples.iter().map(move |s| {
                (
                    r.label.clone(),
                    s.redo.clone().unwrap_or_else(|| "?".into()),
                )
            })
        })
        .collect();
    let mut distinct: Vec<&String> = redos.iter().map(|(_, r)| r).collect();
    distinct.sort();
    distinct.dedup();
    if distinct.len() == 1 {
        let _ = writeln!(
            w,
            "\nEvery recovery replayed to the same point (redo done at {}).",
            distinct[0]
        );
    } else {
        let _ = writeln!(
            w,
            "\nWARNING: recoveries ended at different points: {redos:?}"
        );
    }
    let _ = writeln!(
        w,
        "\n## Read-ahead stats (`<cache-dir>/*/stats.json` of each mount run)\n"
    );
    let mut table: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for r in rows.iter().filter(|r| r.mount) {
        for (i, s) in r.samples.iter().enumerate() {
            if let Some(st) = &s.stats {
                table.push((
                    format!("{}. {} (run {})", r.section, r.label, i + 1),
                    flat_json(st),
                ));
            }
        }
    }
    let any = !table.is_empty();
    if any {
        // Columns: every key seen that holds a number, in first-seen order (not pid/updated).
        let mut keys: Vec<String> = Vec::new();
        for (_, kv) in &table {
            for (k, v) in kv {
                let numeric = v.parse::<f64>().is_ok();
                if numeric && k != "pid" && k != "updated" && !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        let _ = writeln!(w, "| mount run | {} |", keys.join(" | "));
        let _ = writeln!(w, "| --- |{}", " ---: |".repeat(keys.len()));
        for (label, kv) in &table {
            let cells: Vec<String> = keys
                .iter()
                .map(|k| {
                    kv.iter()
                        .find(|(kk, _)| kk == k)
                        .map_or(String::new(), |(_, v)| v.clone())
                })
                .collect();
            let _ = writeln!(w, "| {label} | {} |", cells.join(" | "));
        }
    }
    if !any {
        let _ = writeln!(w, "(none: this walfs wrote no stats.json)");
    }
    let total = START.get().unwrap().elapsed().as_secs_f64();
    let _ = writeln!(
        w,
        "\nTook {:.0} s in all: WAL {:.0} s, setup of the archives {:.0} s, measurements {:.0} s.",
        total, ctx.wal.secs, setup_secs, measure_secs
    );
    println!("\n{out}");

    // Clean up in order: rows (closures borrow ctx), ctx (proxy), moto, scratch.
    drop(rows);
    drop(ctx);
    drop(s3);
    drop(scratch);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_json_members() {
        let kv = flat_json("{\n  \"archive\": \"s3://b/p, x\",\n  \"hits\": 12,\n  \"stall_seconds\": 0.5,\n  \"n\": {\"a\": 1}\n}\n");
        assert_eq!(
            kv,
            vec![
                ("archive".to_string(), "\"s3://b/p, x\"".to_string()),
                ("hits".to_string(), "12".to_string()),
                ("stall_seconds".to_string(), "0.5".to_string()),
                ("n".to_string(), "{\"a\":1}".to_string()),
            ]
        );
        assert!(flat_json("not json").is_empty());
    }

    #[test]
    fn medians_and_segments() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(segno("000000010000000100000002"), 0x102);
    }
}
