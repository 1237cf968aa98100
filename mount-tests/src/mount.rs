//! A running `walfs mount` and a TCP proxy that can cut or slow the path to a server.

use crate::{file_tail, poll_until, walfs_bin};
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Whether `path` is a mount point now (field 5 of /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.to_string_lossy().replace(' ', "\\040");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// `walfs … mount DIR/mnt --allow-other --uid postgres --gid postgres`, as a child process.
/// Stopping sends SIGTERM (by PID) and expects a clean unmount and exit 0.
pub struct WalfsMount {
    child: Option<Child>,
    mountpoint: PathBuf,
    log: PathBuf,
}

impl WalfsMount {
    /// Starts the mount. `args` are global walfs options (`--archive`, `--key-file`, …) and
    /// mount options; `env` is added to the process environment. Waits (bounded) until mounted.
    pub fn start(dir: &Path, args: &[String], env: &[(String, String)]) -> WalfsMount {
        Self::start_with(dir, args, &[], env)
    }

    /// Like [`start`](Self::start), with `mount_args` placed after `mount DIR/mnt` (options of the
    /// `mount` subcommand itself, e.g. `--prefetch-bytes 0`).
    pub fn start_with(
        dir: &Path,
        args: &[String],
        mount_args: &[String],
        env: &[(String, String)],
    ) -> WalfsMount {
        Self::start_as(dir, args, mount_args, env, None)
    }

    /// Like [`start_with`](Self::start_with); `user` (uid, gid): run the mount as that user, a
    /// non-root mount (through fusermount3, without `--allow-other`, so only that user reads
    /// it, and without kernel passthrough, which needs root). `dir` is given to that user.
    pub fn start_as(
        dir: &Path,
        args: &[String],
        mount_args: &[String],
        env: &[(String, String)],
        user: Option<(u32, u32)>,
    ) -> WalfsMount {
        let mountpoint = dir.join("mnt");
        std::fs::create_dir_all(&mountpoint).expect("create mountpoint");
        let log = dir.join(format!("walfs-mount-{}.log", std::process::id()));
        let logf = std::fs::File::create(&log).expect("create mount log");
        let mut cmd = Command::new(walfs_bin());
        if let Some((uid, gid)) = user {
            use std::os::unix::process::CommandExt;
            for p in [dir, mountpoint.as_path()] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid)).expect("chown the mount's dir");
            }
            cmd.uid(uid).gid(gid);
        }
        cmd.env("WALFS_CONFIG", "/dev/null")
            .env_remove("WALFS_ARCHIVE")
            .env_remove("WALFS_KEY_FILE")
            .env("WALFS_LOG", "info,fuser=error")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args(args)
            .arg("--cache-dir")
            .arg(dir.join("cache"))
            .arg("mount")
            .arg(&mountpoint)
            .args(if user.is_some() {
                &[][..]
            } else {
                &["--allow-other"][..]
            })
            .args(["--uid", "postgres", "--gid", "postgres"])
            .args(mount_args)
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf);
        let child = cmd.spawn().expect("spawn walfs mount");
        let mut m = WalfsMount {
            child: Some(child),
            mountpoint,
            log,
        };
        let ok = poll_until(Duration::from_secs(30), || {
            is_mounted(&m.mountpoint) || m.exited()
        });
        if !ok || !is_mounted(&m.mountpoint) {
            panic!("walfs mount did not come up:\n{}", m.log_tail(40));
        }
        m
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `MOUNT/name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// The mount's `--cache-dir` (`DIR/cache`).
    pub fn cache_dir(&self) -> PathBuf {
        self.mountpoint.with_file_name("cache")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log, lines)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for exit 0 and the mount to be gone.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let done = poll_until(Duration::from_secs(30), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !done {
            let _ = child.kill();
            let _ = child.wait();
            panic!("walfs mount ignored SIGTERM:\n{}", self.log_tail(40));
        }
        let status = child.wait().expect("wait walfs mount");
        assert!(
            status.success(),
            "walfs mount exited with {status}:\n{}",
            self.log_tail(40)
        );
        assert!(
            !is_mounted(&self.mountpoint),
            "still mounted after walfs exited"
        );
    }
}

impl Drop for WalfsMount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            if !poll_until(Duration::from_secs(10), || {
                child.try_wait().ok().flatten().is_some()
            }) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if is_mounted(&self.mountpoint) {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.mountpoint)
                .status();
        }
    }
}

/// A TCP proxy on 127.0.0.1 in front of a local server: it can refuse and cut every
/// connection (`set_down`), delay each request a client sends (`set_latency`: the first chunk
/// after the client was quiet for a moment, as an HTTP client is while it waits for the answer
/// to its previous request; an upload's later chunks are not delayed again) or hold what
/// clients send to a rate (`set_upload_rate`: a slow uplink).
pub struct FaultProxy {
    port: u16,
    down: Arc<AtomicBool>,
    latency_ms: Arc<AtomicU64>,
    rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    delay: Option<(Arc<AtomicU64>, Arc<AtomicU64>)>,
    down: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // When the previous chunk was passed on: a chunk after a pause starts a new request.
    let mut last: Option<std::time::Instant> = None;
    const PAUSE: Duration = Duration::from_millis(3);
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some((latency, rate)) = &delay {
            let ms = latency.load(Ordering::Relaxed);
            if ms > 0 && last.is_none_or(|t| t.elapsed() > PAUSE) {
                std::thread::sleep(Duration::from_millis(ms));
            }
            let rate = rate.load(Ordering::Relaxed);
            if rate > 0 {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / rate as f64));
            }
        }
        if down.load(Ordering::Relaxed) || to.write_all(&buf[..n]).is_err() {
            break;
        }
        last = Some(std::time::Instant::now());
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl FaultProxy {
    pub fn start(upstream_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let down = Arc::new(AtomicBool::new(false));
        let latency_ms = Arc::new(AtomicU64::new(0));
        let rate = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (d, l, r, s, c) = (
            down.clone(),
            latency_ms.clone(),
            rate.clone(),
            stop.clone(),
            conns.clone(),
        );
        let accept = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                if d.load(Ordering::Relaxed) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream_port)) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    let mut list = c.lock().unwrap_or_else(|p| p.into_inner());
                    list.retain(|t| t.peer_addr().is_ok());
                    list.push(c2);
                    list.push(s2);
                }
                let (cr, sr) = match (client.try_clone(), server.try_clone()) {
                    (Ok(a), Ok(b)) => (a, b),
                    _ => continue,
                };
                let (d1, d2, lat, rate) = (d.clone(), d.clone(), l.clone(), r.clone());
                std::thread::spawn(move || pump(client, server, Some((lat, rate)), d1));
                std::thread::spawn(move || pump(sr, cr, None, d2));
            }
        });
        FaultProxy {
            port,
            down,
            latency_ms,
            rate,
            stop,
            conns,
            accept: Some(accept),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Down: new connections are closed at once and open ones are cut.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Relaxed);
        if down {
            let mut list = self.conns.lock().unwrap_or_else(|p| p.into_inner());
            for t in list.drain(..) {
                let _ = t.shutdown(Shutdown::Both);
            }
        }
    }

    /// Delays every chunk a client sends by `d` (about once per request).
    pub fn set_latency(&self, d: Duration) {
        self.latency_ms
            .store(d.as_millis() as u64, Ordering::Relaxed);
    }

    /// Holds what clients send to about `bytes_per_sec` per connection (0: no limit).
    pub fn set_upload_rate(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::Relaxed);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.set_down(true);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}
