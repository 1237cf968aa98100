//! The kit of the zero-data-loss tests: a client that records every acknowledged commit, a
//! synchronous primary, restores through a mount, the power-cut filesystem, a watchdog.
//!
//! [`Committer`] is one `psql` reading `insert into t values (N);` then `\echo N` for N = first, first+1,
//! … on its standard input, each insert its own transaction (autocommit). psql runs them in
//! order and prints `N` only after the server acknowledged insert N, so the numbers on its
//! output are exactly the acknowledged commits, and they are `first..first + count`. psql
//! stops at the first error (`ON_ERROR_STOP`): a lost connection ends it, and it flushes what
//! it printed as it exits, so nothing acknowledged goes unrecorded.

use crate::{as_postgres, pg_bin, poll_until, sh_ok, InitOptions, Postgres, Receiver, XorShift};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

pub struct Committer {
    child: Child,
    first: u64,
    /// How many commits were acknowledged so far (`first..first + acked`).
    acked: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    feeder: Option<JoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

impl Committer {
    /// Starts committing `first`, `first + 1`, … into table `t (i bigint)` of `pg`'s database
    /// `postgres`, at most `limit` rows, until the server goes away or [`finish`](Self::finish).
    pub fn start(pg: &Postgres, first: u64, limit: u64) -> Committer {
        // Line-buffered output, so `acked` follows as commits happen (psql's stdout is a pipe).
        let mut child = as_postgres("stdbuf")
            .arg("-oL")
            .arg(pg_bin("psql"))
            .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(pg.socket_dir())
            .args(["-p", &pg.port().to_string(), "-U", "postgres", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn psql");
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let mut stdin = child.stdin.take().expect("psql stdin");
        let feeder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                for n in first..first + limit {
                    if stop.load(Ordering::Relaxed)
                        || writeln!(stdin, "insert into t values ({n});\n\\echo {n}").is_err()
                    {
                        break;
                    }
                }
                // Dropping stdin: psql ends after the statements it has.
            })
        };
        let stdout = child.stdout.take().expect("psql stdout");
        let reader = {
            let acked = acked.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(n) = line.trim().parse::<u64>() {
                        acked.fetch_max(n + 1 - first, Ordering::Relaxed);
                    }
                }
            })
        };
        Committer {
            child,
            first,
            acked,
            stop,
            feeder: Some(feeder),
            reader: Some(reader),
        }
    }

    pub fn first(&self) -> u64 {
        self.first
    }

    /// Commits acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` commits were acknowledged (at most `timeout`).
    pub fn wait_acked(&self, n: u64, timeout: Duration) -> bool {
        poll_until(timeout, || self.acked() >= n)
    }

    /// Waits for psql to end by itself (the server went away, or all rows were sent), at most
    /// `timeout`; then stops feeding it and kills it (by PID). Returns the acknowledged count.
    pub fn finish(mut self, timeout: Duration) -> u64 {
        let ended = poll_until(timeout, || self.child.try_wait().ok().flatten().is_some());
        self.stop.store(true, Ordering::Relaxed);
        if !ended {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        for h in [self.feeder.take(), self.reader.take()]
            .into_iter()
            .flatten()
        {
            let _ = h.join();
        }
        self.acked()
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// SQL that counts, in table `t`, the rows of every `(first, count)` run in `runs`.
pub fn count_runs_sql(runs: &[(u64, u64)]) -> String {
    let cond: Vec<String> = runs
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(f, n)| format!("(i >= {f} and i < {})", f + n))
        .collect();
    if cond.is_empty() {
        return "select 0".into();
    }
    format!("select count(*) from t where {}", cond.join(" or "))
}

/// Ends the test process if a test runs longer than it may: a commit waiting for a
/// synchronous standby that never comes would otherwise hang the suite until CI's limit.
/// Disarmed when dropped.
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    pub fn new(what: &str, limit: Duration) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let (flag, what) = (done.clone(), what.to_string());
        std::thread::spawn(move || {
            let began = std::time::Instant::now();
            while began.elapsed() < limit {
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            eprintln!("{what}: still running after {limit:?}: hung; ending the test process");
            std::process::exit(124);
        });
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// `$var` as a number, else `default`.
pub fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The generator of a test's random moments and its seed: `$WALFS_RPO_SEED`, else the clock.
/// The seed is printed, so a failure can be replayed.
pub fn seeded() -> (u64, XorShift) {
    let seed = std::env::var("WALFS_RPO_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("WALFS_RPO_SEED={seed}");
    (seed, XorShift::new(seed))
}

/// A primary (1 MiB segments) with `extra_conf`, holding table `t (i bigint primary key)`,
/// whose commits from now on wait for a standby named `walfs` to flush them.
pub fn sync_primary(dir: &Path, extra_conf: &str) -> Postgres {
    let mut pg = Postgres::init(
        dir,
        InitOptions {
            wal_segsize_mb: 1,
            ..Default::default()
        },
    );
    pg.set_conf(extra_conf);
    pg.start();
    pg.psql("create table t (i bigint primary key)");
    pg.psql("alter system set synchronous_standby_names = 'walfs'");
    pg.psql("select pg_reload_conf()");
    pg
}

/// Waits (30 s at most) until the receiver is `pg`'s synchronous standby.
pub fn wait_sync(pg: &Postgres, r: &Receiver) {
    let ok = poll_until(Duration::from_secs(30), || {
        pg.try_psql("select count(*) from pg_stat_replication where sync_state = 'sync'")
            .is_ok_and(|n| n == "1")
    });
    assert!(
        ok,
        "walfs never became the synchronous standby:\n{}",
        r.log_tail()
    );
}

/// `--archive file://ARCHIVE`.
pub fn archive_args(archive: &Path) -> Vec<String> {
    vec![
        "--archive".to_string(),
        format!("file://{}", archive.display()),
    ]
}

/// The environment of a `--serve-partial` mount.
pub fn serve_partial() -> Vec<(String, String)> {
    vec![("WALFS_SERVE_PARTIAL".to_string(), "true".to_string())]
}

/// A copy of the base backup `backup` in `dir/data`, set to recover with `cp MOUNT/%f %p` and
/// started; returns once recovery ended (the server promoted itself at the end of the WAL).
pub fn restore_through(dir: &Path, backup: &Path, mount: &Path) -> Postgres {
    let data = dir.join("data");
    std::fs::create_dir_all(dir).expect("restore dir");
    sh_ok(Command::new("cp").arg("-a").arg(backup).arg(&data));
    let mut pg = Postgres::existing(dir, &data);
    pg.enable_recovery(&format!("cp {}/%f %p", mount.display()));
    pg.start();
    pg.wait_recovery_done(Duration::from_secs(180));
    pg
}

/// A running `lossyfs` (the test filesystem that drops what was not fsynced when the power is
/// cut; see `src/bin/lossyfs.rs`).
pub struct LossyFs {
    child: Option<Child>,
    mountpoint: PathBuf,
}

impl LossyFs {
    /// Mounts an empty lossyfs at `mountpoint`; a power cut writes what was durable to `image`.
    /// `bin`: the binary (`env!("CARGO_BIN_EXE_lossyfs")` in a test).
    pub fn mount(bin: &Path, mountpoint: &Path, image: &Path) -> LossyFs {
        std::fs::create_dir_all(mountpoint).expect("mountpoint");
        let mut child = Command::new(bin)
            .arg(mountpoint)
            .arg("--image")
            .arg(image)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn lossyfs");
        let stdout = child.stdout.take().expect("lossyfs stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines.next().and_then(Result::ok).unwrap_or_default();
        assert!(
            ready.starts_with("lossyfs: mounted"),
            "lossyfs did not mount: {ready:?}"
        );
        // The rest of its output (the power-cut line) is not needed.
        std::thread::spawn(move || lines.for_each(drop));
        LossyFs {
            child: Some(child),
            mountpoint: mountpoint.to_path_buf(),
        }
    }

    /// The power cut: everything not fsynced is lost from this instant; returns once the image
    /// is written and the filesystem is gone.
    pub fn cut(mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-USR1")
            .arg(child.id().to_string())
            .status();
        let done = poll_until(Duration::from_secs(60), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !done {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lossyfs did not finish its power cut");
        }
        let status = child.wait().expect("lossyfs status");
        assert!(status.success(), "lossyfs failed its power cut: {status}");
    }
}

impl Drop for LossyFs {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.mountpoint)
                .status();
        }
    }
}
