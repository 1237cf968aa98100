//! Who is asking: PostgreSQL in archive recovery, a standby, or anything else, told from
//! `/proc`.
//!
//! PostgreSQL runs restore_command and archive_command with the data directory as the working
//! directory, and its own processes (the startup process that runs restore_command, the
//! archiver) keep it too. So the first process among the caller and its ancestors whose working
//! directory holds `PG_VERSION` names the server, and the signal files there say what it is
//! doing: `standby.signal` a standby, `recovery.signal` (or a pre-12 `recovery.conf`) an archive
//! recovery; neither, a server that is not recovering (a primary's archiver). A caller with no
//! such ancestor is something else: an operator's `cp`, a script. A caller walfs cannot see
//! (another PID namespace, a `/proc` it may not read) is unknown, and treated as a recovery as
//! far as anything can be done for it.
//!
//! The same view tells whether a caller is dying (a signal that will end it is pending: it was
//! killed while waiting on walfs) or exiting (its files are being closed by the kernel, not by
//! the program), and stops a recovery by killing the restore_command process, which
//! PostgreSQL reads as FATAL rather than "file absent".

use std::path::{Path, PathBuf};

/// What the process behind a request is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A server in archive recovery (`recovery.signal`): a failed restore ends recovery and
    /// promotes it, so only true absence may look like absence.
    Recovery,
    /// A standby (`standby.signal`): a failed restore makes it stream instead, so failing
    /// fast is right.
    Standby,
    /// Anything else: an operator, a script, a primary's archiver.
    Other,
    /// walfs cannot see the process: treated as a recovery where it can be.
    Unknown,
}

impl Role {
    /// Whether a failure this caller takes for "absent" could end an archive recovery.
    pub fn may_end_recovery(self) -> bool {
        matches!(self, Role::Recovery | Role::Unknown)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Recovery => "recovery",
            Role::Standby => "standby",
            Role::Other => "other",
            Role::Unknown => "unknown",
        })
    }
}

/// What walfs needs to know about, and do to, the processes that call it.
pub trait Processes: Send + Sync {
    /// What `pid` is doing.
    fn role(&self, pid: u32) -> Role;
    /// Whether a signal that ends `pid` is pending (it was killed while it waited).
    fn dying(&self, pid: u32) -> bool;
    /// Whether `pid` is exiting (or gone): its files are closed by the kernel.
    fn exiting(&self, pid: u32) -> bool;
    /// Whether `pid` still has a descriptor open on the file named `name` with inode number
    /// `ino`: the close being served is of a duplicate (a shell's `>&3`), not the writer's
    /// last one.
    fn holds(&self, pid: u32, name: &str, ino: u64) -> bool;
    /// Ends `pid` with SIGKILL: a restore_command killed by a signal makes PostgreSQL stop
    /// the recovery with FATAL instead of promoting.
    fn stop(&self, pid: u32) -> std::io::Result<()>;
}

/// Ancestors looked at: restore_command is `sh -c` then the command, or a script or two deep.
const MAX_DEPTH: usize = 8;

/// `PF_EXITING` in the flags field of `/proc/PID/stat`.
const PF_EXITING: u64 = 0x4;

/// Signals whose default action does not end a process (SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP,
/// SIGTTIN, SIGTTOU, SIGURG, SIGWINCH), as a mask of bit `n - 1` for signal `n`.
const HARMLESS: u64 =
    (1 << 16) | (1 << 17) | (1 << 18) | (1 << 19) | (1 << 20) | (1 << 21) | (1 << 22) | (1 << 27);
const SIGKILL_BIT: u64 = 1 << 8;

/// The real `/proc` (or a directory laid out like it, for tests).
pub struct Proc {
    root: PathBuf,
}

impl Default for Proc {
    fn default() -> Self {
        Proc::at("/proc")
    }
}

impl Proc {
    pub fn at(root: impl Into<PathBuf>) -> Proc {
        Proc { root: root.into() }
    }

    fn dir(&self, pid: u32) -> PathBuf {
        self.root.join(pid.to_string())
    }

    /// The fields of `/proc/PID/stat` after the command name (state is the first).
    fn stat(&self, pid: u32) -> std::io::Result<Vec<String>> {
        let text = std::fs::read_to_string(self.dir(pid).join("stat"))?;
        let rest = text
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| std::io::Error::other("malformed stat"))?;
        Ok(rest.split_whitespace().map(str::to_string).collect())
    }

    fn parent(&self, pid: u32) -> Option<u32> {
        self.stat(pid).ok()?.get(1)?.parse().ok()
    }
}

/// What a PostgreSQL data directory's signal files say, or None when `dir` is not one.
fn data_dir_role(dir: &Path) -> Option<Role> {
    if !dir.join("PG_VERSION").is_file() {
        return None;
    }
    if dir.join("standby.signal").exists() {
        return Some(Role::Standby);
    }
    if dir.join("recovery.signal").exists() {
        return Some(Role::Recovery);
    }
    // Before PostgreSQL 12: recovery.conf, a standby when standby_mode is on.
    if let Ok(conf) = std::fs::read_to_string(dir.join("recovery.conf")) {
        let standby = conf.lines().any(|l| {
            let l = l.split('#').next().unwrap_or_default();
            let Some((k, v)) = l.split_once('=') else {
                return false;
            };
            let v = v.trim().trim_matches('\'').to_ascii_lowercase();
            k.trim() == "standby_mode" && matches!(v.as_str(), "on" | "true" | "yes" | "1")
        });
        return Some(if standby {
            Role::Standby
        } else {
            Role::Recovery
        });
    }
    Some(Role::Other)
}

/// A 64-bit signal mask from a `/proc/PID/status` line such as `SigPnd:\t0000000000000100`.
fn mask(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

impl Processes for Proc {
    fn role(&self, pid: u32) -> Role {
        if pid == 0 {
            return Role::Unknown;
        }
        // The caller itself must be visible; its ancestors may end the walk.
        if self.stat(pid).is_err() {
            return Role::Unknown;
        }
        let mut p = pid;
        for _ in 0..MAX_DEPTH {
            let cwd = self.dir(p).join("cwd");
            match std::fs::metadata(&cwd) {
                Ok(_) => {
                    if let Some(role) = data_dir_role(&cwd) {
                        return role;
                    }
                }
                // Not ours to look at: whether PostgreSQL is behind it is unknown.
                Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Role::Unknown,
                Err(_) => {}
            }
            match self.parent(p) {
                Some(pp) if pp > 1 => p = pp,
                _ => break,
            }
        }
        Role::Other
    }

    fn dying(&self, pid: u32) -> bool {
        let Ok(status) = std::fs::read_to_string(self.dir(pid).join("status")) else {
            // Gone: nobody waits for the answer any more.
            return pid != 0;
        };
        let pending = mask(&status, "SigPnd:") | mask(&status, "ShdPnd:");
        let deliverable = pending
            & !mask(&status, "SigBlk:")
            & !mask(&status, "SigIgn:")
            & !mask(&status, "SigCgt:");
        pending & SIGKILL_BIT != 0 || deliverable & !HARMLESS != 0
    }

    fn exiting(&self, pid: u32) -> bool {
        if pid == 0 {
            return false;
        }
        match self.stat(pid) {
            Ok(fields) => fields
                .get(6)
                .and_then(|f| f.parse::<u64>().ok())
                .is_some_and(|flags| flags & PF_EXITING != 0),
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }

    fn holds(&self, pid: u32, name: &str, ino: u64) -> bool {
        if pid == 0 {
            return false;
        }
        let dir = self.dir(pid);
        let Ok(fds) = std::fs::read_dir(dir.join("fd")) else {
            return false;
        };
        // The name narrows it down cheaply; the inode number (fdinfo, Linux 5.14+) tells this
        // file from a source of the same name (`cp pg_wal/X MOUNT/X`).
        fds.filter_map(Result::ok).any(|fd| {
            let named = std::fs::read_link(fd.path())
                .is_ok_and(|target| target.file_name().is_some_and(|n| n == name));
            named
                && std::fs::read_to_string(dir.join("fdinfo").join(fd.file_name()))
                    .ok()
                    .and_then(|info| {
                        info.lines()
                            .find_map(|l| l.strip_prefix("ino:"))
                            .and_then(|v| v.trim().parse::<u64>().ok())
                    })
                    == Some(ino)
        })
    }

    fn stop(&self, pid: u32) -> std::io::Result<()> {
        let pid = libc::pid_t::try_from(pid).map_err(|_| std::io::Error::other("bad pid"))?;
        if pid <= 1 {
            return Err(std::io::Error::other("refusing to signal pid 0 or 1"));
        }
        // SAFETY: kill(2) with a positive pid and a valid signal number.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

#[cfg(test)]
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
#[cfg(test)]
use std::sync::Mutex;

#[cfg(test)]
/// Processes as a test says they are.
pub(crate) struct FakeProcs {
    pub role: Mutex<Role>,
    pub dying: AtomicBool,
    pub exiting: AtomicBool,
    pub holding: AtomicBool,
    pub stopped: AtomicU32,
}

#[cfg(test)]
impl FakeProcs {
    pub(crate) fn new(role: Role) -> FakeProcs {
        FakeProcs {
            role: Mutex::new(role),
            dying: AtomicBool::new(false),
            exiting: AtomicBool::new(false),
            holding: AtomicBool::new(false),
            stopped: AtomicU32::new(0),
        }
    }
}

#[cfg(test)]
impl Processes for FakeProcs {
    fn role(&self, _: u32) -> Role {
        *self.role.lock().unwrap()
    }
    fn dying(&self, _: u32) -> bool {
        self.dying.load(Ordering::Relaxed)
    }
    fn exiting(&self, _: u32) -> bool {
        self.exiting.load(Ordering::Relaxed)
    }
    fn holds(&self, _: u32, _: &str, _: u64) -> bool {
        self.holding.load(Ordering::Relaxed)
    }
    fn stop(&self, pid: u32) -> std::io::Result<()> {
        self.stopped.store(pid, Ordering::Relaxed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake /proc: `pid → (ppid, cwd, flags, status)`.
    fn fake(root: &Path, pid: u32, ppid: u32, cwd: &Path, flags: u64, status: &str) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("stat"),
            format!("{pid} (a (b) c) S {ppid} 1 1 0 -1 {flags} 0 0 0\n"),
        )
        .unwrap();
        std::os::unix::fs::symlink(cwd, d.join("cwd")).unwrap();
        std::fs::write(d.join("status"), status).unwrap();
    }

    #[test]
    fn roles_come_from_the_nearest_data_directory() {
        let t = tempfile::tempdir().unwrap();
        let proc_ = t.path().join("proc");
        let data = t.path().join("data");
        let elsewhere = t.path().join("tmp");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::create_dir_all(&elsewhere).unwrap();
        std::fs::write(data.join("PG_VERSION"), "15\n").unwrap();
        // cp (in /tmp, after a `cd`) ← sh ← postgres startup process (in the data dir).
        fake(&proc_, 300, 200, &elsewhere, 0, "");
        fake(&proc_, 200, 100, &elsewhere, 0, "");
        fake(&proc_, 100, 1, &data, 0, "");
        fake(&proc_, 400, 1, &elsewhere, 0, "");
        let p = Proc::at(&proc_);
        assert_eq!(p.role(300), Role::Other, "a primary's data directory");
        std::fs::write(data.join("recovery.signal"), "").unwrap();
        assert_eq!(p.role(300), Role::Recovery);
        std::fs::write(data.join("standby.signal"), "").unwrap();
        assert_eq!(
            p.role(300),
            Role::Standby,
            "standby.signal wins, as in PostgreSQL"
        );
        assert_eq!(p.role(400), Role::Other, "no PostgreSQL above it");
        assert_eq!(p.role(0), Role::Unknown);
        assert_eq!(p.role(999), Role::Unknown, "not visible");
        std::fs::remove_file(data.join("standby.signal")).unwrap();
        std::fs::remove_file(data.join("recovery.signal")).unwrap();
        std::fs::write(data.join("recovery.conf"), "standby_mode = 'on'\n").unwrap();
        assert_eq!(p.role(300), Role::Standby);
        std::fs::write(data.join("recovery.conf"), "restore_command = 'cp'\n").unwrap();
        assert_eq!(p.role(300), Role::Recovery);
    }

    #[test]
    fn dying_and_exiting_are_read_from_status_and_stat() {
        let t = tempfile::tempdir().unwrap();
        let proc_ = t.path().join("proc");
        let cwd = t.path().to_path_buf();
        let status = |pnd: u64, blk: u64, ign: u64, cgt: u64| {
            format!(
                "Name:\tcp\nSigPnd:\t{pnd:016x}\nShdPnd:\t0000000000000000\n\
                 SigBlk:\t{blk:016x}\nSigIgn:\t{ign:016x}\nSigCgt:\t{cgt:016x}\n"
            )
        };
        let term = 1 << 14; // SIGTERM
        let chld = 1 << 16; // SIGCHLD
        fake(&proc_, 10, 1, &cwd, 0, &status(0, 0, 0, 0));
        fake(&proc_, 11, 1, &cwd, PF_EXITING, &status(term, 0, 0, 0));
        fake(&proc_, 12, 1, &cwd, 0, &status(chld, 0, 0, 0));
        fake(&proc_, 13, 1, &cwd, 0, &status(term, 0, 0, term));
        fake(&proc_, 14, 1, &cwd, 0, &status(term, term, 0, 0));
        fake(&proc_, 15, 1, &cwd, 0, &status(SIGKILL_BIT, 0, 0, 0));
        let p = Proc::at(&proc_);
        assert!(!p.dying(10));
        assert!(p.dying(11));
        assert!(!p.dying(12), "SIGCHLD ends nobody");
        assert!(!p.dying(13), "a handled signal returns to the program");
        assert!(!p.dying(14), "a blocked signal waits");
        assert!(p.dying(15));
        assert!(p.dying(99), "gone");
        assert!(!p.exiting(10));
        assert!(p.exiting(11));
        assert!(p.exiting(99), "gone");
        assert!(!p.exiting(0));
    }

    #[test]
    fn this_process_is_seen_for_real() {
        let p = Proc::default();
        let me = std::process::id();
        assert!(!p.exiting(me));
        assert!(!p.dying(me));
        assert_ne!(p.role(me), Role::Unknown);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000002.history");
        let f = std::fs::File::create(&path).unwrap();
        let ino = std::os::unix::fs::MetadataExt::ino(&f.metadata().unwrap());
        assert!(p.holds(me, "00000002.history", ino));
        assert!(
            !p.holds(me, "00000002.history", ino + 1),
            "another file of that name"
        );
        drop(f);
        assert!(!p.holds(me, "00000002.history", ino));
    }
}
