//! Tests of `lossyfs` (src/bin/lossyfs.rs), the FUSE filesystem that keeps only what was fsynced
//! when the power is cut: what survives a cut, and that the cut always ends with the mount gone
//! and the process exited 0, even when the mount is busy.
//!
//! Needs root and /dev/fuse (fuse3). Every lossyfs is stopped by its own PID; a test that fails
//! half-way still kills its lossyfs and lazily unmounts what it left behind (see [`Lossy`]).

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Upper bound of every wait on lossyfs (mounting, exiting after a signal).
const WAIT: Duration = Duration::from_secs(20);

/// A running lossyfs on a fresh mount point, with its image directory beside it.
struct Lossy {
    child: Child,
    /// Lines lossyfs printed on stdout.
    lines: Receiver<String>,
    mnt: PathBuf,
    image: PathBuf,
    /// Dropped last (after `Drop::drop` has unmounted): holds mnt and image.
    _dir: TempDir,
}

impl Lossy {
    /// Starts lossyfs and waits (bounded) for its ready line `lossyfs: mounted <MOUNTPOINT>`.
    fn start() -> Lossy {
        let dir = tempfile::Builder::new()
            .prefix("lossyfs-test-")
            .tempdir()
            .unwrap();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        let mnt = mnt.canonicalize().unwrap();
        let image = dir.path().join("image");
        let mut child = Command::new(env!("CARGO_BIN_EXE_lossyfs"))
            .arg(&mnt)
            .arg("--image")
            .arg(&image)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start lossyfs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let fs = Lossy {
            child,
            lines,
            mnt,
            image,
            _dir: dir,
        };
        let want = format!("lossyfs: mounted {}", fs.mnt.display());
        fs.wait_line(&want);
        assert!(
            is_mounted(&fs.mnt),
            "ready line printed but {} not in /proc/self/mountinfo",
            fs.mnt.display()
        );
        fs
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Waits (bounded) for lossyfs to print `want`.
    fn wait_line(&self, want: &str) {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) if line == want => return,
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        panic!("lossyfs never printed {want:?}; it printed {seen:?}");
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    fn image(&self, rel: &str) -> PathBuf {
        self.image.join(rel)
    }

    /// Sends `sig` (by PID) and waits, bounded, for lossyfs to exit; checks the power-cut line.
    fn cut(&mut self, sig: libc::c_int) -> ExitStatus {
        // SAFETY: kill on the PID of our own, not yet reaped, child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
        let deadline = Instant::now() + WAIT;
        let status = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("lossyfs did not exit within {WAIT:?} of signal {sig}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        self.wait_line(&format!(
            "lossyfs: power cut, image in {}",
            self.image.display()
        ));
        status
    }
}

impl Drop for Lossy {
    fn drop(&mut self) {
        // Only if a test failed before its cut: kill our own child by PID, then make sure no
        // mount is left behind (a killed FUSE server leaves a dead one).
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if is_mounted(&self.mnt) {
            let c = CString::new(self.mnt.as_os_str().as_bytes()).unwrap();
            // SAFETY: a valid NUL-terminated path.
            if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
                let _ = Command::new("fusermount3")
                    .args(["-u", "-z", "--"])
                    .arg(&self.mnt)
                    .status();
            }
        }
    }
}

/// Whether `path` is a mount point in this mount namespace.
fn is_mounted(path: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let want = path.as_os_str().as_bytes();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape(m) == want)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            out.push(u8::from_str_radix(&s[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// fsync on a directory: FUSE `fsyncdir`.
fn fsync_dir(path: &Path) {
    File::open(path).unwrap().sync_all().unwrap();
}

/// Creates (or truncates) `path` with `data` and fsyncs the file (not its directory).
fn write_synced(path: &Path, data: &[u8]) -> File {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
    f
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error").raw_os_error().unwrap()
}

#[test]
fn power_cut_keeps_only_what_was_fsynced() {
    let mut fs = Lossy::start();
    let d = fs.path("d");

    // Durable: d (its parent, the root, is fsynced after the mkdir).
    fs::create_dir(&d).unwrap();
    fsync_dir(&fs.mnt);

    // Entries of d, made durable by the one fsyncdir of d below.
    let a = d.join("a");
    write_synced(&a, b"first");
    chmod(&a, 0o600);
    fs::create_dir(d.join("sub")).unwrap();
    chmod(&d.join("sub"), 0o750);
    // c: durably linked, its data never fsynced: empty after the cut.
    fs::write(d.join("c"), b"never synced").unwrap();
    // gone: synced and durably linked, then unlinked without a sync of d: survives.
    write_synced(&d.join("gone"), b"still here");
    // t: truncated and regrown within one fsync interval, then grown without a sync.
    let t = write_synced(&d.join("t"), b"0123456789");
    t.set_len(2).unwrap();
    t.set_len(6).unwrap();
    t.write_all_at(b"Z", 4).unwrap();
    t.sync_all().unwrap();
    t.set_len(100).unwrap();
    // o: written later through an O_DSYNC descriptor, which is durable on return.
    fs::write(d.join("o"), b"").unwrap();
    fsync_dir(&d);

    // x: synced, and linked durably by an fsync of the root.
    let x = fs.path("x");
    write_synced(&x, b"x-content");
    chmod(&x, 0o640);
    fsync_dir(&fs.mnt);

    // From here on nothing is fsynced but b's data and o's O_DSYNC write.
    fs::write(&a, b"second").unwrap();
    fs::remove_file(d.join("gone")).unwrap();
    write_synced(&d.join("b"), b"synced data, unsynced entry");
    fs::rename(&x, fs.path("y")).unwrap();
    fs::create_dir(fs.path("e")).unwrap();
    let mut o = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DSYNC)
        .open(d.join("o"))
        .unwrap();
    o.write_all(b"dsync data").unwrap();

    // Reads see the live state.
    assert_eq!(fs::read(&a).unwrap(), b"second");
    assert_eq!(fs::read(fs.path("y")).unwrap(), b"x-content");
    assert!(!x.exists());
    assert_eq!(names(&fs.mnt), set(&["d", "e", "y"]));
    assert_eq!(names(&d), set(&["a", "b", "c", "o", "sub", "t"]));
    assert_eq!(fs::metadata(d.join("t")).unwrap().len(), 100);

    let status = fs.cut(libc::SIGUSR1);
    assert!(status.success(), "lossyfs exited with {status}");
    assert!(!is_mounted(&fs.mnt), "still mounted after the power cut");

    // The image: only what was durable.
    assert_eq!(names(&fs.image), set(&["d", "x"]));
    assert_eq!(
        names(&fs.image("d")),
        set(&["a", "c", "gone", "o", "sub", "t"])
    );
    assert_eq!(fs::read(fs.image("d/a")).unwrap(), b"first");
    assert_eq!(mode(&fs.image("d/a")), 0o600);
    assert_eq!(fs::read(fs.image("d/c")).unwrap(), b"");
    assert_eq!(fs::read(fs.image("d/gone")).unwrap(), b"still here");
    assert_eq!(fs::read(fs.image("d/t")).unwrap(), b"01\0\0Z\0");
    assert_eq!(fs::read(fs.image("d/o")).unwrap(), b"dsync data");
    assert!(fs.image("d/sub").is_dir());
    assert_eq!(mode(&fs.image("d/sub")), 0o750);
    assert_eq!(fs::read(fs.image("x")).unwrap(), b"x-content");
    assert_eq!(mode(&fs.image("x")), 0o640);
    assert_eq!(mode(&fs.image("d")), 0o755);
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(fs::metadata(fs.image("x")).unwrap().uid(), uid);
    drop(o);
    drop(t);
}

#[test]
fn cross_directory_rename_is_durable_per_side() {
    let mut fs = Lossy::start();
    for dir in ["s", "t", "u"] {
        fs::create_dir(fs.path(dir)).unwrap();
    }
    fsync_dir(&fs.mnt);
    write_synced(&fs.path("s/f1"), b"one");
    fsync_dir(&fs.path("s"));
    write_synced(&fs.path("u/f2"), b"two");
    fsync_dir(&fs.path("u"));

    // f1 moves s -> t and only t is synced: durably in both (one inode, two links).
    fs::rename(fs.path("s/f1"), fs.path("t/f1")).unwrap();
    fsync_dir(&fs.path("t"));
    // f2 moves u -> s and only u is synced: durably nowhere.
    fs::rename(fs.path("u/f2"), fs.path("s/f2")).unwrap();
    fsync_dir(&fs.path("u"));

    let status = fs.cut(libc::SIGUSR1);
    assert!(status.success(), "lossyfs exited with {status}");
    assert_eq!(names(&fs.image), set(&["s", "t", "u"]));
    assert_eq!(names(&fs.image("s")), set(&["f1"]));
    assert_eq!(names(&fs.image("t")), set(&["f1"]));
    assert_eq!(names(&fs.image("u")), set(&[]));
    assert_eq!(fs::read(fs.image("t/f1")).unwrap(), b"one");
    let (s1, t1) = (
        fs::metadata(fs.image("s/f1")).unwrap(),
        fs::metadata(fs.image("t/f1")).unwrap(),
    );
    assert_eq!(s1.ino(), t1.ino(), "one inode under two durable names");
}

#[test]
fn posix_behaviour_and_sigterm_on_a_busy_mount() {
    let mut fs = Lossy::start();

    // rmdir of a non-empty directory.
    fs::create_dir(fs.path("p")).unwrap();
    fs::write(fs.path("p/f"), b"x").unwrap();
    assert_eq!(errno(fs::remove_dir(fs.path("p"))), libc::ENOTEMPTY);

    // rename: plain replaces, RENAME_NOREPLACE refuses.
    fs::write(fs.path("r1"), b"r1").unwrap();
    fs::write(fs.path("r2"), b"r2").unwrap();
    let c = |p: &str| CString::new(fs.path(p).as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated paths.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c("r1").as_ptr(),
            libc::AT_FDCWD,
            c("r2").as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EEXIST)
    );
    fs::rename(fs.path("r1"), fs.path("r2")).unwrap();
    assert_eq!(fs::read(fs.path("r2")).unwrap(), b"r1");
    assert!(!fs.path("r1").exists());

    // No hard links or symlinks.
    assert_eq!(
        errno(fs::hard_link(fs.path("r2"), fs.path("l"))),
        libc::EPERM
    );
    assert_eq!(
        errno(std::os::unix::fs::symlink("r2", fs.path("sl"))),
        libc::EPERM
    );

    // O_APPEND, O_TRUNC, fallocate.
    let mut ap = OpenOptions::new().append(true).open(fs.path("r2")).unwrap();
    ap.write_all(b"+more").unwrap();
    assert_eq!(fs::read(fs.path("r2")).unwrap(), b"r1+more");
    fs::write(fs.path("r2"), b"new").unwrap();
    assert_eq!(fs::read(fs.path("r2")).unwrap(), b"new");
    let fa = OpenOptions::new().write(true).open(fs.path("r2")).unwrap();
    // SAFETY: fallocate on an open descriptor.
    assert_eq!(unsafe { libc::fallocate(fa.as_raw_fd(), 0, 0, 8192) }, 0);
    assert_eq!(fs::metadata(fs.path("r2")).unwrap().len(), 8192);
    // SAFETY: as above.
    let rc = unsafe { libc::fallocate(fa.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, 16384) };
    assert_eq!(rc, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EOPNOTSUPP)
    );

    // Unlinked but open: still readable and writable.
    let mut u = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(fs.path("u"))
        .unwrap();
    u.write_all(b"abc").unwrap();
    fs::remove_file(fs.path("u")).unwrap();
    u.write_all(b"def").unwrap();
    u.seek(SeekFrom::Start(0)).unwrap();
    let mut back = String::new();
    u.read_to_string(&mut back).unwrap();
    assert_eq!(back, "abcdef");
    assert_eq!(names(&fs.mnt), set(&["p", "r2"]));

    // Keep the mount busy (open files, an open directory) and stop it with SIGTERM: it must
    // still dump, unmount (lazily) and exit 0.
    let mut held = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(fs.path("held"))
        .unwrap();
    held.write_all(b"unsynced").unwrap();
    let held_dir = File::open(fs.path("p")).unwrap();
    let status = fs.cut(libc::SIGTERM);
    assert!(status.success(), "lossyfs exited with {status}");
    assert!(!is_mounted(&fs.mnt), "still mounted after SIGTERM");
    // The server is gone: the held descriptors only get errors now.
    assert!(held
        .write_all(b"more")
        .and_then(|_| held.sync_all())
        .is_err());
    // The root was never fsynced: nothing is durable.
    assert!(fs.image.is_dir());
    assert_eq!(names(&fs.image), set(&[]));
    drop((held, held_dir, u, ap, fa));
}
