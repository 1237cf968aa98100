//! One process per directory: an advisory `flock` on a file in it, naming the holder's pid.
//!
//! A mount wipes its cache's `plain/` and `writes/` when it starts, and a receiver owns its
//! spool's `current/` segment: a second process on the same directory would delete the first
//! one's files or write the same segment. The kernel drops the lock when its holder exits,
//! however it exits (kill -9 included), so a lock is never stale.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Held while this value lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Takes the lock on `path` (created 0600 if missing) without waiting. An error of kind
/// `WouldBlock` says another process holds it, with its pid when it wrote one; `what` names
/// the holder in that message ("walfs mount").
pub fn lock(path: &Path, what: &str) -> io::Result<DirLock> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::WouldBlock {
            return Err(e);
        }
        let mut text = String::new();
        let _ = file.read_to_string(&mut text);
        let holder = match text.trim().parse::<u32>() {
            Ok(pid) => format!("another {what} (pid {pid})"),
            Err(_) => format!("another {what}"),
        };
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{holder} holds {}", path.display()),
        ));
    }
    file.set_len(0)?;
    file.rewind()?;
    writeln!(file, "{}", std::process::id())?;
    Ok(DirLock { _file: file })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_first_ones_pid_until_it_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let first = lock(&p, "walfs mount").unwrap();
        let e = lock(&p, "walfs mount").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let me = std::process::id();
        assert!(
            e.to_string()
                .contains(&format!("another walfs mount (pid {me})")),
            "{e}"
        );
        drop(first);
        let _again = lock(&p, "walfs mount").unwrap();
    }
}
