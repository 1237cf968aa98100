//! A `walfs receive` process under test, and the archive-side checks the receiver tests share.

use crate::{file_tail, is_wal_segment_name, poll_until, sh_ok, stdout_str, walfs_bin};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `walfs receive` process; output appended to one log across restarts.
pub struct Receiver {
    child: Option<Child>,
    log: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Receiver {
    /// A receiver of `conninfo` into the local archive `archive`, with `--cache-dir DIR/cache`,
    /// slot `walfs` (created), status every second, and `extra` receive options. Not started.
    pub fn new(dir: &Path, archive: &Path, conninfo: &str, extra: &[&str]) -> Receiver {
        Receiver::with_url(
            dir,
            &format!("file://{}", archive.display()),
            &[],
            conninfo,
            extra,
        )
    }

    pub fn with_url(
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

    pub fn start(&mut self) {
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

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(c.id().to_string())
                .status();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
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

    /// Whether the process was started and has exited by itself.
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && !self.exited()
    }

    /// The log, all runs appended.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log_tail(&self) -> String {
        file_tail(&self.log, 30)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `walfs --archive file://ARCHIVE MORE…`.
pub fn walfs_cmd(archive: &Path, more: &[&str]) -> Command {
    let mut c = Command::new(walfs_bin());
    c.env("WALFS_CONFIG", "/dev/null")
        .arg("--archive")
        .arg(format!("file://{}", archive.display()))
        .args(more);
    c
}

/// The names `walfs ls` lists in the local archive `archive` (none before it exists).
pub fn archived(archive: &Path) -> Vec<String> {
    if !archive.join("walfs.json").exists() {
        return Vec::new();
    }
    stdout_str(&sh_ok(&mut walfs_cmd(archive, &["ls"])))
        .lines()
        .filter_map(|l| l.split('\t').next().map(str::to_string))
        .collect()
}

/// Waits (90 s at most, then panics with the receiver's log) until `name` is archived.
pub fn wait_archived(archive: &Path, name: &str, r: &Receiver) {
    let ok = poll_until(Duration::from_secs(90), || {
        archived(archive).iter().any(|n| n == name)
    });
    assert!(ok, "{name} never reached the archive:\n{}", r.log_tail());
}

/// Every segment the server archived from the first one walfs has up to `last` is in the
/// walfs archive, byte for byte; returns how many were compared.
pub fn assert_identical(
    archive: &Path,
    server_archive: &Path,
    last: &str,
    scratch: &Path,
) -> usize {
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
