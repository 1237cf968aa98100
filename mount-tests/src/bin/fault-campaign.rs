//! `fault-campaign`: walfs against a real S3 server (moto) behind a fault-injecting HTTP proxy.
//!
//! ```text
//! cargo run -p walfs-mount-tests --release --bin fault-campaign -- \
//!     [--archives N] [--restores M] [--seed S] [--segments K] [--quick] [--keep]
//! ```
//!
//! - `--archives N`: archive attempts (default 1000; `--quick`: 120), half `cp SRC MOUNT/NAME`,
//!   half `walfs push SRC`.
//! - `--restores M`: restore attempts (default 200; `--quick`: 40), half `cp MOUNT/NAME DEST`,
//!   half `walfs fetch NAME DEST`, each from a fake data directory in archive recovery.
//! - `--seed S`: seed of the campaign's choices and of the proxy's faults (default: from the
//!   clock; printed, so a run can be repeated; request interleaving still depends on timing).
//! - `--segments K`: 1 MiB WAL segments in the fixture (default 200; `--quick`: 60).
//! - `--keep`: keep the scratch directory (logs, event log, report) even when all is well; it
//!   is always kept when the campaign finds a problem or panics.
//! - `--no-recovery-signal`: a control run: the restores' data directory has no
//!   `recovery.signal`, so walfs takes them for an operator's commands and fails fast when the
//!   store fails. EARLY ENDs are then expected: it shows the campaign sees them.
//!
//! Needs root, PostgreSQL 15, fuse3 and moto (`bash .ci/setup`); listens on 127.0.0.1 only.
//! The `walfs` binary under test: `$WALFS_BIN` if set, else `cargo build --release -p walfs
//! --bin walfs` in this workspace; either way copied into the scratch directory first.
//!
//! What walfs promises, and what is checked:
//! 1. archive success (`cp` into the mount exit 0, `walfs push` exit 0) means the store holds
//!    exactly those bytes: every success is checked against the store with faults off; a
//!    success whose object is absent or different, or a conflicting write that succeeded, is a
//!    FALSE SUCCESS.
//! 2. a restore of a file that exists never fails as if it were absent: from a directory with
//!    `PG_VERSION` and `recovery.signal` walfs takes the caller for a server in archive
//!    recovery and must answer 0 (right bytes), or stop it (SIGKILL, exit > 125); exit 1..=125
//!    or another signal is an EARLY END (PostgreSQL would promote there), exit 0 with other
//!    bytes is WRONG BYTES. Restores of names that do not exist must not exit 0.
//!
//! Prints a plain-text summary and, last, one line of JSON; exits 1 when false successes, early
//! ends, wrong bytes, an absent file served, or a restore that outlived its bound were seen.

use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use walfs_mount_tests::chaos::XorShift;
use walfs_mount_tests::*;

const BUCKET: &str = "campaign";
const PREFIX: &str = "p";
/// Per-request retry budget of the clients (`WALFS_RETRY_TIMEOUT`).
const RETRY_TIMEOUT: &str = "3s";
/// How long walfs waits for the store on behalf of a server in archive recovery.
const RECOVERY_TIMEOUT_S: u64 = 300;
/// Bound on one archive command (walfs gives up after its retry budget long before).
const ARCHIVE_CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound on one restore command: past the recovery timeout, walfs must have stopped it.
const RESTORE_CMD_TIMEOUT: Duration = Duration::from_secs(RECOVERY_TIMEOUT_S + 120);
/// Bound on one verification fetch (faults off).
const VERIFY_CMD_TIMEOUT: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------------------

struct Opts {
    archives: usize,
    restores: usize,
    seed: u64,
    segments: usize,
    quick: bool,
    keep: bool,
    control: bool,
}

fn usage() -> ! {
    eprintln!(
        "usage: cargo run -p walfs-mount-tests --release --bin fault-campaign -- \
         [--archives N] [--restores M] [--seed S] [--segments K] [--quick] [--keep] [--no-recovery-signal]\n\
         \n  --archives N   archive attempts (default 1000; --quick: 120)\
         \n  --restores M   restore attempts (default 200; --quick: 40)\
         \n  --seed S       seed of choices and faults (default: from the clock)\
         \n  --segments K   1 MiB WAL segments in the fixture (default 200; --quick: 60)\
         \n  --quick        a smoke run: 120 archives, 40 restores\
         \n  --keep         keep the scratch directory even when everything passed\
         \n  --no-recovery-signal  control run: restores not in archive recovery (early ends expected)\
         \n\nWALFS_BIN=path uses that walfs binary instead of building it (cargo build --release)."
    );
    std::process::exit(2)
}

fn parse_args() -> Opts {
    let mut archives = None;
    let mut restores = None;
    let mut seed = None;
    let mut segments = None;
    let mut quick = false;
    let mut keep = false;
    let mut control = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let mut value = |name: &str| -> u64 {
            let v = inline.clone().or_else(|| args.next()).unwrap_or_else(|| {
                eprintln!("{name} needs a value");
                usage()
            });
            v.parse().unwrap_or_else(|_| {
                eprintln!("{name}: not a number: {v}");
                usage()
            })
        };
        match flag.as_str() {
            "--archives" => archives = Some(value("--archives") as usize),
            "--restores" => restores = Some(value("--restores") as usize),
            "--seed" => seed = Some(value("--seed")),
            "--segments" => segments = Some(value("--segments") as usize),
            "--quick" => quick = true,
            "--keep" => keep = true,
            "--no-recovery-signal" => control = true,
            "-h" | "--help" => usage(),
            other => {
                eprintln!("unknown argument: {other}");
                usage()
            }
        }
    }
    let opts = Opts {
        archives: archives.unwrap_or(if quick { 120 } else { 1000 }),
        restores: restores.unwrap_or(if quick { 40 } else { 200 }),
        seed: seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64 % 1_000_000_007)
                .unwrap_or(1)
        }),
        segments: segments.unwrap_or(if quick { 60 } else { 200 }),
        quick,
        keep,
        control,
    };
    if opts.archives < 2 || opts.restores < 2 || !(8..=1000).contains(&opts.segments) {
        eprintln!("--archives and --restores must be at least 2, --segments 8..=1000");
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
    eprintln!("[campaign {:02}:{:02}] {msg}", t / 60, t % 60);
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

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exit {
    Code(i32),
    Signal(i32),
    /// Outlived its bound; the campaign killed it (SIGKILL, by PID).
    TimedOut,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit {c}"),
            Exit::Signal(s) => write!(f, "signal {s}"),
            Exit::TimedOut => f.write_str("timed out (killed by the campaign)"),
        }
    }
}

const SIGKILL: i32 = 9;

/// Runs `cmd` with stdin closed and stdout+stderr into `out_file`, for at most `timeout`.
/// Returns how it ended, its output (lossy, at most the last 8 KiB) and how long it took.
fn run_bounded(cmd: &mut Command, timeout: Duration, out_file: &Path) -> (Exit, String, Duration) {
    let f =
        fs::File::create(out_file).unwrap_or_else(|e| panic!("create {}: {e}", out_file.display()));
    let f2 = f.try_clone().expect("dup output fd");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(f))
        .stderr(Stdio::from(f2));
    let t0 = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {cmd:?}: {e}"));
    let mut exit = None;
    let mut nap = Duration::from_millis(1);
    while t0.elapsed() < timeout {
        match child.try_wait() {
            Ok(Some(st)) => {
                exit = Some(match (st.code(), st.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    _ => Exit::Code(-1),
                });
                break;
            }
            Ok(None) => {}
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    }
    let exit = exit.unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        Exit::TimedOut
    });
    let took = t0.elapsed();
    let text = fs::read(out_file).unwrap_or_default();
    let tail = &text[text.len().saturating_sub(8192)..];
    (exit, String::from_utf8_lossy(tail).into_owned(), took)
}

/// The log file `WalfsMount::start_with(dir, …)` writes (the harness names it after our PID).
fn mount_log_path(dir: &Path) -> PathBuf {
    dir.join(format!("walfs-mount-{}.log", std::process::id()))
}

fn file_len(p: &Path) -> u64 {
    fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

/// Bytes `[from, to)` of a text file, lossy.
fn file_slice(p: &Path, from: u64, to: u64) -> String {
    let b = fs::read(p).unwrap_or_default();
    let to = (to as usize).min(b.len());
    let from = (from as usize).min(to);
    String::from_utf8_lossy(&b[from..to]).into_owned()
}

/// The first `max` lines of `text`, and a note of how many were left out.
fn head_lines(text: &str, max: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.len() <= max {
        return lines.join("\n");
    }
    format!(
        "{}\n… ({} more lines)",
        lines[..max].join("\n"),
        lines.len() - max
    )
}

/// The segment `k` after `name` (24 hex digits; 1 MiB segments: 4096 per log id).
fn segment_after(name: &str, k: u64) -> String {
    let tli = u64::from_str_radix(&name[0..8], 16).expect("segment name");
    let log = u64::from_str_radix(&name[8..16], 16).expect("segment name");
    let seg = u64::from_str_radix(&name[16..24], 16).expect("segment name");
    let n = log * 4096 + seg + k;
    format!("{tli:08X}{:08X}{:08X}", n / 4096, n % 4096)
}

// ---------------------------------------------------------------------------------------------------------
// The walfs binary
// ---------------------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------------------
// The scratch directory: kept on problems and panics
// ---------------------------------------------------------------------------------------------------------

struct Scratch {
    dir: Option<TempDir>,
    path: PathBuf,
    keep: bool,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(d) = self.dir.take() {
            if self.keep || std::thread::panicking() {
                let p = d.keep();
                eprintln!("scratch directory kept: {}", p.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The campaign
// ---------------------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Mount,
    Cli,
}

impl Via {
    fn archive_name(self) -> &'static str {
        match self {
            Via::Mount => "mount",
            Via::Cli => "push",
        }
    }
    fn restore_name(self) -> &'static str {
        match self {
            Via::Mount => "mount",
            Via::Cli => "fetch",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// No earlier attempt on this name succeeded.
    First,
    /// An earlier attempt succeeded: same name, same bytes (PostgreSQL after a crash).
    Rearchive,
    /// Same name, other (valid) bytes, after the original succeeded: must never succeed.
    Conflict,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::First => "first",
            Kind::Rearchive => "rearchive",
            Kind::Conflict => "conflict",
        }
    }
}

struct Source {
    path: PathBuf,
    bytes: Vec<u8>,
    /// A conflicting version (history files only): same name, other valid content.
    conflict: Option<(PathBuf, Vec<u8>)>,
}

struct Attempt {
    idx: usize,
    via: Via,
    kind: Kind,
    name: String,
    exit: Exit,
    took: Duration,
    output: String,
    /// Proxy request sequence numbers seen during the attempt: `[from, to)`.
    seq: (u64, u64),
    /// Byte range of the mount log written during the attempt (mount attempts).
    log: (u64, u64),
}

struct Restore {
    idx: usize,
    via: Via,
    name: String,
    exists: bool,
    exit: Exit,
    took: Duration,
    output: String,
    same_bytes: Option<bool>,
    seq: (u64, u64),
    log: (u64, u64),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    Ok,
    EarlyEnd,
    Stopped,
    WrongBytes,
    AbsentCorrect,
    /// Absent name, non-zero exit other than 1 (and not "stopped"): PostgreSQL takes it as
    /// absence too, but `walfs fetch` in recovery promised 1 or > 125.
    AbsentOther,
    /// Absent name served with exit 0.
    AbsentServed,
    /// Outlived the recovery timeout plus margin.
    Hung,
}

impl Verdict {
    fn name(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::EarlyEnd => "EARLY END",
            Verdict::Stopped => "stopped",
            Verdict::WrongBytes => "WRONG BYTES",
            Verdict::AbsentCorrect => "absent-correct",
            Verdict::AbsentOther => "absent-other-code",
            Verdict::AbsentServed => "ABSENT SERVED",
            Verdict::Hung => "HUNG",
        }
    }
}

fn classify(r: &Restore) -> Verdict {
    match (r.exists, r.exit) {
        (_, Exit::TimedOut) => Verdict::Hung,
        (_, Exit::Signal(SIGKILL)) => Verdict::Stopped,
        (_, Exit::Code(c)) if c > 125 => Verdict::Stopped,
        (true, Exit::Code(0)) => {
            if r.same_bytes == Some(true) {
                Verdict::Ok
            } else {
                Verdict::WrongBytes
            }
        }
        (true, _) => Verdict::EarlyEnd,
        (false, Exit::Code(0)) => Verdict::AbsentServed,
        (false, Exit::Code(1)) => Verdict::AbsentCorrect,
        (false, _) => Verdict::AbsentOther,
    }
}

struct Env {
    args: Vec<String>,
    env: Vec<(String, String)>,
    cli_cache: PathBuf,
}

impl Env {
    /// `walfs --archive … --key-file … ARGS…`, isolated from any system config.
    fn walfs(&self, args: &[&str]) -> Command {
        let mut c = Command::new(walfs_bin());
        c.env_remove("WALFS_ARCHIVE")
            .env_remove("WALFS_KEY_FILE")
            .env_remove("WALFS_LOG")
            .env("WALFS_CONFIG", "/dev/null")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(&self.args)
            .arg("--cache-dir")
            .arg(&self.cli_cache)
            .args(args);
        c
    }
}

fn main() {
    START.get_or_init(Instant::now);
    let opts = parse_args();
    if !is_root() {
        eprintln!("fault-campaign must run as root (FUSE mounts, runuser for PostgreSQL)");
        std::process::exit(2);
    }
    let t_start = Instant::now();
    let mut scratch = {
        let d = scratch_dir("fault-campaign");
        let path = d.path().to_path_buf();
        Scratch {
            dir: Some(d),
            path,
            keep: opts.keep,
        }
    };
    let root = scratch.path.clone();
    let (_, walfs_source) = release_walfs(&root.join("bin"), &|m: &str| progress(m));
    progress(&format!(
        "seed {}, {} archive attempts, {} restores, {} segments; walfs {walfs_source}; scratch {}",
        opts.seed,
        opts.archives,
        opts.restores,
        opts.segments,
        root.display()
    ));
    let mut rng = XorShift::new(opts.seed);

    // ---- The fixture: real WAL, a .backup file, timeline history files written by hand.
    let t = Instant::now();
    let wal = real_wal(1, opts.segments);
    progress(&format!(
        "fixture: {} segments of 1 MiB ({} .. {}) in {:.1}s",
        wal.segments.len(),
        wal.segments[0],
        wal.segments[wal.segments.len() - 1],
        t.elapsed().as_secs_f64()
    ));
    let mut sources: BTreeMap<String, Source> = BTreeMap::new();
    for name in wal.files() {
        let path = wal.path(&name);
        let bytes = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        sources.insert(
            name,
            Source {
                path,
                bytes,
                conflict: None,
            },
        );
    }
    let hist_dir = mkdir(&root.join("history"));
    let conflict_dir = mkdir(&root.join("conflict"));
    let mut history_names = Vec::new();
    for tli in 2u32..=5 {
        let name = format!("{tli:08X}.history");
        let mut text = String::new();
        let mut other = String::new();
        for parent in 1..tli {
            text.push_str(&format!(
                "{parent}\t0/{:X}000000\tno recovery target specified\n",
                parent + 2
            ));
            // The conflicting version switches later on its last line: valid, different.
            let lsn = if parent == tli - 1 {
                format!("0/{:X}800000", parent + 2)
            } else {
                format!("0/{:X}000000", parent + 2)
            };
            other.push_str(&format!("{parent}\t{lsn}\tno recovery target specified\n"));
        }
        let path = hist_dir.join(&name);
        fs::write(&path, &text).expect("write history file");
        let cpath = conflict_dir.join(&name);
        fs::write(&cpath, &other).expect("write conflicting history file");
        sources.insert(
            name.clone(),
            Source {
                path,
                bytes: text.into_bytes(),
                conflict: Some((cpath, other.into_bytes())),
            },
        );
        history_names.push(name);
    }
    let names: Vec<String> = sources.keys().cloned().collect();

    // Fake data directories: a primary (archive_command's cwd) and a server in archive recovery.
    let primary_dir = mkdir(&root.join("primary-data"));
    fs::write(primary_dir.join("PG_VERSION"), "15\n").expect("PG_VERSION");
    let recovery_dir = mkdir(&root.join("recovery-data"));
    fs::write(recovery_dir.join("PG_VERSION"), "15\n").expect("PG_VERSION");
    if !opts.control {
        fs::write(recovery_dir.join("recovery.signal"), "").expect("recovery.signal");
    }
    let out_dir = mkdir(&root.join("out"));
    let restore_dir = mkdir(&root.join("restored"));

    // ---- The store, the proxy, the mount.
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let cfg = ChaosConfig {
        seed: opts.seed ^ 0x5eed_c4a0_5000_0001,
        ..ChaosConfig::default()
    };
    let fault_weights: Vec<(String, u32)> = cfg
        .weights
        .iter()
        .map(|(f, w)| (f.name().to_string(), *w))
        .collect();
    let proxy = ChaosProxy::start(s3.port(), cfg);
    progress(&format!(
        "moto on port {}, chaos proxy on port {} ({} per mille of requests meet a fault: {:?})",
        s3.port(),
        proxy.port(),
        fault_weights.iter().map(|(_, w)| w).sum::<u32>(),
        fault_weights
    ));
    let key = keygen(&root.join("keys"));
    let mut env = s3.env_through_chaos(&proxy);
    env.push(("WALFS_RETRY_TIMEOUT".into(), RETRY_TIMEOUT.into()));
    let args: Vec<String> = vec![
        "--archive".into(),
        format!("s3://{BUCKET}/{PREFIX}"),
        "--key-file".into(),
        key.display().to_string(),
        "--recovery-timeout".into(),
        format!("{RECOVERY_TIMEOUT_S}s"),
    ];
    let mount_args: Vec<String> = ["--prefetch-bytes", "0", "--cache-size", "3MiB"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let walfs_env = Env {
        args: args.clone(),
        env: env.clone(),
        cli_cache: mkdir(&root.join("cli-cache")),
    };
    let m1_dir = mkdir(&root.join("m1"));
    let mut mount = WalfsMount::start_with(&m1_dir, &args, &mount_args, &env);
    let m1_log = mount_log_path(&m1_dir);
    progress(&format!(
        "mount 1 up at {} (log {})",
        mount.path().display(),
        m1_log.display()
    ));

    // ---- Archive attempts.
    let t_archive = Instant::now();
    let mut succeeded: BTreeSet<String> = BTreeSet::new();
    let mut attempts: Vec<Attempt> = Vec::new();
    for i in 0..opts.archives {
        let via = if i % 2 == 0 { Via::Mount } else { Via::Cli };
        let archived_histories: Vec<&String> = history_names
            .iter()
            .filter(|n| succeeded.contains(*n))
            .collect();
        let (name, kind) = if !archived_histories.is_empty() && rng.chance(50) {
            let n = archived_histories[rng.below(archived_histories.len() as u64) as usize];
            (n.clone(), Kind::Conflict)
        } else {
            // Half the time a name not archived yet (while there are any), else any name.
            let fresh: Vec<&String> = names.iter().filter(|n| !succeeded.contains(*n)).collect();
            let n = if !fresh.is_empty() && rng.chance(500) {
                fresh[rng.below(fresh.len() as u64) as usize].clone()
            } else {
                names[rng.below(names.len() as u64) as usize].clone()
            };
            let kind = if succeeded.contains(&n) {
                Kind::Rearchive
            } else {
                Kind::First
            };
            (n, kind)
        };
        let src = &sources[&name];
        let src_path = match kind {
            Kind::Conflict => src.conflict.as_ref().expect("conflict source").0.clone(),
            _ => src.path.clone(),
        };
        let seq0 = proxy.requests();
        let log0 = file_len(&m1_log);
        let out_file = out_dir.join("archive.out");
        let (exit, output, took) = match via {
            Via::Mount => {
                let mut c = Command::new("cp");
                c.arg(&src_path)
                    .arg(mount.file(&name))
                    .current_dir(&primary_dir);
                run_bounded(&mut c, ARCHIVE_CMD_TIMEOUT, &out_file)
            }
            Via::Cli => {
                let mut c = walfs_env.walfs(&["push", src_path.to_str().expect("utf-8 path")]);
                c.current_dir(&primary_dir);
                run_bounded(&mut c, ARCHIVE_CMD_TIMEOUT, &out_file)
            }
        };
        let seq1 = proxy.requests();
        let log1 = file_len(&m1_log);
        if exit == Exit::Code(0) && kind != Kind::Conflict {
            succeeded.insert(name.clone());
        }
        attempts.push(Attempt {
            idx: i,
            via,
            kind,
            name,
            exit,
            took,
            output,
            seq: (seq0, seq1),
            log: if via == Via::Mount {
                (log0, log1)
            } else {
                (0, 0)
            },
        });
        if (i + 1) % 50 == 0 || i + 1 == opts.archives {
            let ok = attempts.iter().filter(|a| a.exit == Exit::Code(0)).count();
            progress(&format!(
                "archive attempts: {}/{} ({ok} succeeded, {} names archived), {} proxy requests, faults {:?}",
                i + 1,
                opts.archives,
                succeeded.len(),
                proxy.requests(),
                proxy.counts()
            ));
        }
    }
    let archive_secs = t_archive.elapsed().as_secs_f64();
    let archive_faults = proxy.counts();

    // ---- Verification with faults off: what does the store hold?
    proxy.set_enabled(false);
    let t_verify = Instant::now();
    progress("faults off: checking what the store holds for every name");
    let plain_dir = mkdir(&root.join("plain"));
    let listed: BTreeSet<String> = s3
        .list_keys(BUCKET, &format!("{PREFIX}/wal/"))
        .into_iter()
        .filter_map(|k| k.rsplit('/').next().map(str::to_string))
        .collect();
    let mut stored: HashMap<String, Option<Vec<u8>>> = HashMap::new();
    let mut verify_problems: Vec<String> = Vec::new();
    for name in &names {
        let dest = restore_dir.join(format!("verify-{name}"));
        let mut answer = None;
        let mut last = String::new();
        for _try in 0..3 {
            let _ = fs::remove_file(&dest);
            let mut c = walfs_env.walfs(&["fetch", name, dest.to_str().expect("utf-8")]);
            c.current_dir(&plain_dir);
            let (exit, output, _) =
                run_bounded(&mut c, VERIFY_CMD_TIMEOUT, &out_dir.join("verify.out"));
            match exit {
                Exit::Code(0) => {
                    answer = Some(Some(fs::read(&dest).expect("read fetched file")));
                    break;
                }
                Exit::Code(1) => {
                    answer = Some(None);
                    break;
                }
                other => last = format!("{other}: {}", output.trim()),
            }
        }
        let _ = fs::remove_file(&dest);
        match answer {
            Some(a) => {
                if a.is_some() != listed.contains(name) {
                    verify_problems.push(format!(
                        "{name}: walfs fetch says {} but the bucket listing {} it",
                        if a.is_some() { "present" } else { "absent" },
                        if listed.contains(name) {
                            "has"
                        } else {
                            "does not have"
                        }
                    ));
                }
                stored.insert(name.clone(), a);
            }
            None => {
                verify_problems.push(format!(
                    "{name}: walfs fetch with faults off failed 3 times: {last}"
                ));
            }
        }
    }
    let verify_secs = t_verify.elapsed().as_secs_f64();

    let mut false_successes: Vec<(usize, String)> = Vec::new();
    for a in &attempts {
        if a.exit != Exit::Code(0) {
            continue;
        }
        let src = &sources[&a.name];
        let why = match (a.kind, stored.get(&a.name)) {
            (Kind::Conflict, _) => {
                Some("a conflicting write (same name, other bytes) succeeded".to_string())
            }
            (_, None) => Some("the store could not be read back with faults off".to_string()),
            (_, Some(None)) => Some("the object is absent from the store".to_string()),
            (_, Some(Some(b))) if *b != src.bytes => Some(format!(
                "the store holds other bytes ({} bytes{}) than the source ({} bytes)",
                b.len(),
                if src.conflict.as_ref().is_some_and(|c| c.1 == *b) {
                    ", the conflicting version"
                } else {
                    ""
                },
                src.bytes.len()
            )),
            _ => None,
        };
        if let Some(w) = why {
            false_successes.push((a.idx, w));
        }
    }
    let present: Vec<String> = names
        .iter()
        .filter(|n| stored.get(*n).is_some_and(|s| s.is_some()))
        .cloned()
        .collect();
    progress(&format!(
        "store holds {} of {} names ({} listed); {} false successes; {} verification problems ({:.1}s)",
        present.len(),
        names.len(),
        listed.len(),
        false_successes.len(),
        verify_problems.len(),
        verify_secs
    ));

    // ---- Restores, faults on, a fresh mount with a cold cache.
    mount.stop();
    progress("mount 1 stopped");
    let m2_dir = mkdir(&root.join("m2"));
    let m2_log = mount_log_path(&m2_dir);
    proxy.set_enabled(true);
    let restore_faults_before = proxy.counts();
    let mount2 = WalfsMount::start_with(&m2_dir, &args, &mount_args, &env);
    progress(&format!(
        "mount 2 up (cold cache; log {})",
        m2_log.display()
    ));
    let last_seg = wal.segments.last().expect("segments").clone();
    let mut absent_names: Vec<String> = (1..=20).map(|k| segment_after(&last_seg, k)).collect();
    absent_names.extend([
        "0000000A.history".to_string(),
        "0000000B.history".to_string(),
    ]);
    absent_names.retain(|n| !sources.contains_key(n));
    let t_restore = Instant::now();
    let mut restores: Vec<Restore> = Vec::new();
    for i in 0..opts.restores {
        let via = if i % 2 == 0 { Via::Mount } else { Via::Cli };
        let absent = present.is_empty() || rng.chance(100);
        let name = if absent {
            absent_names[rng.below(absent_names.len() as u64) as usize].clone()
        } else {
            present[rng.below(present.len() as u64) as usize].clone()
        };
        let dest = restore_dir.join(format!("{name}-{i}"));
        let seq0 = proxy.requests();
        let log0 = file_len(&m2_log);
        let out_file = out_dir.join("restore.out");
        let (exit, output, took) = match via {
            Via::Mount => {
                let mut c = Command::new("cp");
                c.arg(mount2.file(&name))
                    .arg(&dest)
                    .current_dir(&recovery_dir);
                run_bounded(&mut c, RESTORE_CMD_TIMEOUT, &out_file)
            }
            Via::Cli => {
                let mut c = walfs_env.walfs(&["fetch", &name, dest.to_str().expect("utf-8")]);
                c.current_dir(&recovery_dir);
                run_bounded(&mut c, RESTORE_CMD_TIMEOUT, &out_file)
            }
        };
        let seq1 = proxy.requests();
        let log1 = file_len(&m2_log);
        let same_bytes = if exit == Exit::Code(0) {
            let got = fs::read(&dest).ok();
            let want = stored.get(&name).cloned().flatten();
            Some(got.is_some() && got == want)
        } else {
            None
        };
        let _ = fs::remove_file(&dest);
        restores.push(Restore {
            idx: i,
            via,
            name,
            exists: !absent,
            exit,
            took,
            output,
            same_bytes,
            seq: (seq0, seq1),
            log: if via == Via::Mount {
                (log0, log1)
            } else {
                (0, 0)
            },
        });
        if (i + 1) % 20 == 0 || i + 1 == opts.restores {
            let ok = restores
                .iter()
                .filter(|r| classify(r) == Verdict::Ok)
                .count();
            progress(&format!(
                "restores: {}/{} ({ok} ok), {} proxy requests",
                i + 1,
                opts.restores,
                proxy.requests()
            ));
        }
    }
    let restore_secs = t_restore.elapsed().as_secs_f64();
    proxy.set_enabled(false);
    let all_faults = proxy.counts();
    let restore_faults: BTreeMap<String, u64> = all_faults
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v - restore_faults_before.get(k).copied().unwrap_or(0),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    drop(mount2);

    // ---- The summary.
    let wall = t_start.elapsed().as_secs_f64();
    let mut by_path: BTreeMap<&str, [usize; 3]> = BTreeMap::new(); // attempts, ok, failed
    let mut by_kind: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
    let mut archive_timeouts = 0;
    for a in &attempts {
        let ok = a.exit == Exit::Code(0);
        for e in [
            by_path.entry(a.via.archive_name()).or_default(),
            by_kind.entry(a.kind.name()).or_default(),
        ] {
            e[0] += 1;
            e[if ok { 1 } else { 2 }] += 1;
        }
        if a.exit == Exit::TimedOut {
            archive_timeouts += 1;
        }
    }
    let mut exit_codes: BTreeMap<String, usize> = BTreeMap::new();
    for a in &attempts {
        *exit_codes
            .entry(format!(
                "{} {} {}",
                a.via.archive_name(),
                a.kind.name(),
                a.exit
            ))
            .or_default() += 1;
    }
    let archive_ok = attempts.iter().filter(|a| a.exit == Exit::Code(0)).count();
    let mut verdicts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut verdict_totals: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &restores {
        let v = classify(r);
        *verdicts
            .entry((r.via.restore_name(), v.name()))
            .or_default() += 1;
        *verdict_totals.entry(v.name()).or_default() += 1;
    }
    let count = |v: Verdict| verdict_totals.get(v.name()).copied().unwrap_or(0);
    let restore_times: Vec<f64> = restores.iter().map(|r| r.took.as_secs_f64()).collect();
    let max_restore = restore_times.iter().cloned().fold(0.0, f64::max);
    let max_archive = attempts
        .iter()
        .map(|a| a.took.as_secs_f64())
        .fold(0.0, f64::max);

    let mut report = String::new();
    let mut say = |s: String| {
        println!("{s}");
        report.push_str(&s);
        report.push('\n');
    };
    say("== walfs fault campaign ==".into());
    if opts.control {
        say("CONTROL RUN (--no-recovery-signal): restores are not in archive recovery; early ends are expected".into());
    }
    say(format!(
        "seed {} | walfs {walfs_source} | fixture {} names ({} segments of 1 MiB, {} .backup, {} .history)",
        opts.seed,
        names.len(),
        wal.segments.len(),
        wal.backup_files.len(),
        history_names.len()
    ));
    say(format!(
        "fault mix (per mille of requests): {}",
        fault_weights
            .iter()
            .map(|(k, w)| format!("{k}={w}"))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    say(format!(
        "archive attempts: {} ({:.0}s, longest {:.1}s)",
        attempts.len(),
        archive_secs,
        max_archive
    ));
    for (p, [n, ok, failed]) in &by_path {
        say(format!(
            "  via {p:<6} {n:>5} attempts, {ok:>5} succeeded, {failed:>5} failed"
        ));
    }
    for (k, [n, ok, failed]) in &by_kind {
        say(format!(
            "  {k:<10} {n:>5} attempts, {ok:>5} succeeded, {failed:>5} failed"
        ));
    }
    say(format!(
        "  exit statuses: {}",
        exit_codes
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    say(format!(
        "  FALSE SUCCESSES: {} | timed out: {archive_timeouts} | names in the store: {} of {}",
        false_successes.len(),
        present.len(),
        names.len()
    ));
    say(format!("  faults during archiving: {archive_faults:?}"));
    say(format!(
        "restores: {} ({:.0}s, longest {:.1}s), {} of names that exist, {} of absent names",
        restores.len(),
        restore_secs,
        max_restore,
        restores.iter().filter(|r| r.exists).count(),
        restores.iter().filter(|r| !r.exists).count()
    ));
    for via in ["mount", "fetch"] {
        let n = restores
            .iter()
            .filter(|r| r.via.restore_name() == via)
            .count();
        let parts: Vec<String> = verdicts
            .iter()
            .filter(|((v, _), _)| *v == via)
            .map(|((_, k), c)| format!("{k} {c}"))
            .collect();
        say(format!("  via {via:<6} {n:>5}: {}", parts.join(", ")));
    }
    say(format!(
        "  ok {} | EARLY END {} | stopped {} | WRONG BYTES {} | absent-correct {} | absent-other-code {} | ABSENT SERVED {} | HUNG {}",
        count(Verdict::Ok),
        count(Verdict::EarlyEnd),
        count(Verdict::Stopped),
        count(Verdict::WrongBytes),
        count(Verdict::AbsentCorrect),
        count(Verdict::AbsentOther),
        count(Verdict::AbsentServed),
        count(Verdict::Hung)
    ));
    say(format!("  faults during restores: {restore_faults:?}"));
    say(format!(
        "faults injected in all: {all_faults:?} ({} requests on {} client connections, up to {} on one)",
        proxy.requests(),
        proxy.connections(),
        proxy.max_requests_per_connection()
    ));
    if !verify_problems.is_empty() {
        say(format!("verification problems: {}", verify_problems.len()));
        for p in &verify_problems {
            say(format!("  {p}"));
        }
    }
    say(format!(
        "rerun: cargo run -p walfs-mount-tests --release --bin fault-campaign -- --archives {} --restores {} --segments {} --seed {}{}",
        opts.archives,
        opts.restores,
        opts.segments,
        opts.seed,
        if opts.control { " --no-recovery-signal" } else { "" }
    ));
    say(format!(
        "wall time {:.0}s (fixture and setup {:.0}s, archiving {:.0}s, verification {:.0}s, restores {:.0}s)",
        wall,
        wall - archive_secs - verify_secs - restore_secs,
        archive_secs,
        verify_secs,
        restore_secs
    ));

    // ---- Details of every problem, with the requests and log lines around it.
    let bad_restores: Vec<&Restore> = restores
        .iter()
        .filter(|r| {
            matches!(
                classify(r),
                Verdict::EarlyEnd | Verdict::WrongBytes | Verdict::AbsentServed | Verdict::Hung
            )
        })
        .collect();
    let problems = !false_successes.is_empty() || !bad_restores.is_empty();
    let mut details = String::new();
    for (idx, why) in &false_successes {
        let a = &attempts[*idx];
        details.push_str(&format!(
            "\n--- FALSE SUCCESS: archive attempt #{} via {} ({}) of {}: {why}\n    {} after {:.2}s; output:\n{}\n    proxy requests during it:\n{}\n",
            a.idx,
            a.via.archive_name(),
            a.kind.name(),
            a.name,
            a.exit,
            a.took.as_secs_f64(),
            head_lines(a.output.trim_end(), 40),
            proxy
                .events_between(a.seq.0, a.seq.1)
                .iter()
                .map(|e| format!("      {}", e.line()))
                .collect::<Vec<_>>()
                .join("\n")
        ));
        if a.via == Via::Mount {
            details.push_str(&format!(
                "    mount log ({}) during it:\n{}\n",
                m1_log.display(),
                head_lines(&file_slice(&m1_log, a.log.0, a.log.1), 80)
            ));
        }
        let others: Vec<String> = attempts
            .iter()
            .filter(|b| b.name == a.name)
            .map(|b| {
                format!(
                    "#{} {} {} {}",
                    b.idx,
                    b.via.archive_name(),
                    b.kind.name(),
                    b.exit
                )
            })
            .collect();
        details.push_str(&format!(
            "    every attempt on {}: {}\n",
            a.name,
            others.join("; ")
        ));
    }
    for r in &bad_restores {
        details.push_str(&format!(
            "\n--- {}: restore #{} via {} of {} ({}): {} after {:.2}s; output:\n{}\n    proxy requests during it:\n{}\n",
            classify(r).name(),
            r.idx,
            r.via.restore_name(),
            r.name,
            if r.exists { "in the store" } else { "absent" },
            r.exit,
            r.took.as_secs_f64(),
            head_lines(r.output.trim_end(), 40),
            proxy
                .events_between(r.seq.0, r.seq.1)
                .iter()
                .map(|e| format!("      {}", e.line()))
                .collect::<Vec<_>>()
                .join("\n")
        ));
        if r.via == Via::Mount {
            details.push_str(&format!(
                "    mount log ({}) during it:\n{}\n",
                m2_log.display(),
                head_lines(&file_slice(&m2_log, r.log.0, r.log.1), 80)
            ));
        }
    }
    if !details.is_empty() {
        println!("\n== problems ==={details}");
        report.push_str("\n== problems ===");
        report.push_str(&details);
    }
    // Keep the evidence: the report, every proxy event, every attempt.
    let mut log = String::new();
    for a in &attempts {
        log.push_str(&format!(
            "archive #{} {} {} {} -> {} in {:.2}s, requests {}..{}\n",
            a.idx,
            a.via.archive_name(),
            a.kind.name(),
            a.name,
            a.exit,
            a.took.as_secs_f64(),
            a.seq.0,
            a.seq.1
        ));
    }
    for r in &restores {
        log.push_str(&format!(
            "restore #{} {} {} ({}) -> {} [{}] in {:.2}s, requests {}..{}\n",
            r.idx,
            r.via.restore_name(),
            r.name,
            if r.exists { "exists" } else { "absent" },
            r.exit,
            classify(r).name(),
            r.took.as_secs_f64(),
            r.seq.0,
            r.seq.1
        ));
    }
    let _ = fs::write(root.join("attempts.txt"), log);
    let _ = fs::write(
        root.join("proxy-events.txt"),
        proxy
            .events()
            .iter()
            .map(|e| e.line() + "\n")
            .collect::<String>(),
    );
    let _ = fs::write(root.join("report.txt"), &report);

    let by_path_json: serde_json::Map<String, serde_json::Value> = by_path
        .iter()
        .map(|(k, [n, ok, failed])| {
            (
                k.to_string(),
                json!({"attempts": n, "succeeded": ok, "failed": failed}),
            )
        })
        .collect();
    let by_kind_json: serde_json::Map<String, serde_json::Value> = by_kind
        .iter()
        .map(|(k, [n, ok, failed])| {
            (
                k.to_string(),
                json!({"attempts": n, "succeeded": ok, "failed": failed}),
            )
        })
        .collect();
    let mut restore_by_path = serde_json::Map::new();
    for via in ["mount", "fetch"] {
        let mut m = serde_json::Map::new();
        m.insert(
            "restores".into(),
            json!(restores
                .iter()
                .filter(|r| r.via.restore_name() == via)
                .count()),
        );
        for ((v, k), c) in &verdicts {
            if *v == via {
                m.insert(k.to_string(), json!(c));
            }
        }
        restore_by_path.insert(via.to_string(), serde_json::Value::Object(m));
    }
    let fail = problems;
    let summary = json!({
        "seed": opts.seed,
        "quick": opts.quick,
        "control_no_recovery_signal": opts.control,
        "walfs": walfs_source,
        "names": names.len(),
        "archive": {
            "attempts": attempts.len(),
            "by_path": by_path_json,
            "by_kind": by_kind_json,
            "successes": archive_ok,
            "failures": attempts.len() - archive_ok,
            "false_successes": false_successes.len(),
            "timed_out": archive_timeouts,
            "names_in_store": present.len(),
            "seconds": archive_secs.round(),
        },
        "restore": {
            "attempts": restores.len(),
            "by_path": restore_by_path,
            "ok": count(Verdict::Ok),
            "early_ends": count(Verdict::EarlyEnd),
            "stopped": count(Verdict::Stopped),
            "wrong_bytes": count(Verdict::WrongBytes),
            "absent_correct": count(Verdict::AbsentCorrect),
            "absent_other_code": count(Verdict::AbsentOther),
            "absent_served": count(Verdict::AbsentServed),
            "hung": count(Verdict::Hung),
            "seconds": restore_secs.round(),
        },
        "verification_problems": verify_problems.len(),
        "faults": all_faults,
        "requests": proxy.requests(),
        "client_connections": proxy.connections(),
        "wall_seconds": wall.round(),
        "result": if fail { "FAIL" } else { "PASS" },
    });
    if fail || !verify_problems.is_empty() {
        scratch.keep = true;
    }
    drop(proxy);
    drop(s3);
    if scratch.keep {
        println!(
            "evidence in {} (report.txt, attempts.txt, proxy-events.txt, m1/ and m2/ mount logs)",
            root.display()
        );
    }
    drop(scratch);
    // The fixture lives under /tmp/walfs-fixtures/p<our pid>-…: ours, not needed any more.
    if let Some(fixture_root) = wal.dir.parent() {
        let _ = fs::remove_dir_all(fixture_root);
    }
    println!("{summary}");
    std::process::exit(if fail { 1 } else { 0 });
}
