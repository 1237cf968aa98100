//! `walfs mount`: checks, mount, and a clean unmount on SIGINT/SIGTERM.

use super::{exit, open_archive, Failure, MountArgs};
use crate::cache::{Cache, CacheOptions};
use crate::config::Settings;
use crate::fs::{Fs, MountOptions};
use crate::fuse::{self, WalFs};
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

fn usage(msg: impl Into<String>) -> Failure {
    Failure::new(exit::USAGE, msg)
}

/// A user name or a number.
fn resolve_uid(spec: &str) -> Result<u32, Failure> {
    if let Ok(n) = spec.parse() {
        return Ok(n);
    }
    let c = CString::new(spec).map_err(|_| usage(format!("--uid {spec:?}: not a user")))?;
    // SAFETY: getpwnam reads a NUL-terminated name; the result is used before any other call.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return Err(usage(format!("--uid {spec:?}: no such user")));
    }
    // SAFETY: non-null pointer to a passwd entry owned by libc.
    Ok(unsafe { (*pw).pw_uid })
}

fn resolve_gid(spec: &str) -> Result<u32, Failure> {
    if let Ok(n) = spec.parse() {
        return Ok(n);
    }
    let c = CString::new(spec).map_err(|_| usage(format!("--gid {spec:?}: not a group")))?;
    // SAFETY: as in resolve_uid, for groups.
    let gr = unsafe { libc::getgrnam(c.as_ptr()) };
    if gr.is_null() {
        // A user name given for the group means that user's primary group.
        let pw_c = c.as_ptr();
        // SAFETY: as in resolve_uid.
        let pw = unsafe { libc::getpwnam(pw_c) };
        if pw.is_null() {
            return Err(usage(format!("--gid {spec:?}: no such group")));
        }
        // SAFETY: non-null pointer to a passwd entry owned by libc.
        return Ok(unsafe { (*pw).pw_gid });
    }
    // SAFETY: non-null pointer to a group entry owned by libc.
    Ok(unsafe { (*gr).gr_gid })
}

/// The file system type of the topmost mount at `path` in a mountinfo table (field 5 is the
/// mount point, octal escapes undone; the type follows the " - " separator), if any.
fn mounted_fs_type(mountinfo: &str, path: &str) -> Option<String> {
    mountinfo
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| crate::ops::check::unescape(mp) == path)
        })
        .filter_map(|l| l.split(" - ").nth(1)?.split(' ').next().map(str::to_string))
        .next_back()
}

/// A FUSE file system already mounted at `path` (another walfs, most likely): mounting over it
/// would hide it while it keeps running. Any other mount there (a container's bind mount of the
/// host's /mnt/wal, a tmpfs) is only the directory walfs mounts on.
fn fuse_mounted_at(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mounted_fs_type(&info, &path.to_string_lossy()).filter(|t| t.starts_with("fuse"))
}

fn check_mountpoint(path: &Path) -> Result<PathBuf, Failure> {
    let shown = path.display();
    let canonical = path.canonicalize().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => usage(format!(
            "mountpoint {shown}: {e}: create it first (mkdir {shown}, an empty directory)"
        )),
        _ => usage(format!("mountpoint {shown}: {e}")),
    })?;
    if !canonical.is_dir() {
        return Err(usage(format!("mountpoint {shown} is not a directory")));
    }
    if let Some(fstype) = fuse_mounted_at(&canonical) {
        return Err(usage(format!(
            "{shown} is already a FUSE mount ({fstype}; another walfs?): unmount it with fusermount3 -u {shown}"
        )));
    }
    let mut entries =
        std::fs::read_dir(&canonical).map_err(|e| usage(format!("mountpoint {shown}: {e}")))?;
    if entries.next().is_some() {
        return Err(usage(format!("mountpoint {shown} is not empty")));
    }
    Ok(canonical)
}

fn check_fuse() -> Result<(), Failure> {
    if !Path::new("/dev/fuse").exists() {
        return Err(usage(
            "no /dev/fuse: load the fuse module (modprobe fuse), or give the container --device /dev/fuse",
        ));
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
    {
        return Err(usage(fuse_device_refused(&e)));
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        let found = std::env::var_os("PATH").is_some_and(|p| {
            std::env::split_paths(&p)
                .any(|d| d.join("fusermount3").exists() || d.join("fusermount").exists())
        });
        if !found {
            return Err(usage(
                "mounting as a user needs fusermount3: apt install fuse3 (or mount as root)",
            ));
        }
    }
    Ok(())
}

/// Why /dev/fuse could not be opened, and what to change.
fn fuse_device_refused(e: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata("/dev/fuse")
        .map(|m| {
            format!(
                " (mode {:o}, owner {}, group {})",
                m.mode() & 0o7777,
                m.uid(),
                m.gid()
            )
        })
        .unwrap_or_default();
    match e.raw_os_error() {
        Some(libc::EACCES) => format!(
            "cannot open /dev/fuse: {e}{owner}: make it readable and writable for this user \
             (chmod 0666 /dev/fuse is the usual mode), or mount as root"
        ),
        Some(libc::EPERM) => format!(
            "cannot open /dev/fuse: {e}{owner}: a device policy forbids it; under systemd add \
             DeviceAllow=/dev/fuse rw to the unit, in a container run it with --device /dev/fuse \
             (Docker and Podman also need --cap-add SYS_ADMIN)"
        ),
        _ => format!("cannot open /dev/fuse: {e}{owner}"),
    }
}

/// What to change when the kernel or fusermount3 refused the mount itself.
fn mount_refused_hint(allow_other: bool) -> &'static str {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    match (root, allow_other) {
        (false, true) => {
            ": --allow-other as a user needs user_allow_other in /etc/fuse.conf (or mount as root)"
        }
        (false, false) => {
            ": a user may mount only on a directory it owns and can write (or mount as root)"
        }
        (true, _) => {
            ": in a container, mounting needs CAP_SYS_ADMIN (--cap-add SYS_ADMIN) and \
             --device /dev/fuse; under systemd, CapabilityBoundingSet must keep CAP_SYS_ADMIN"
        }
    }
}

pub(super) async fn run(settings: &Settings, args: &MountArgs) -> Result<(), Failure> {
    // SAFETY: geteuid/getegid have no preconditions.
    let (euid, egid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let opts = MountOptions {
        uid: args
            .uid
            .as_deref()
            .map(resolve_uid)
            .transpose()?
            .unwrap_or(euid),
        gid: args
            .gid
            .as_deref()
            .map(resolve_gid)
            .transpose()?
            .unwrap_or(egid),
        read_only: args.read_only,
        allow_delete: args.allow_delete,
        allow_other: args.allow_other,
        passthrough: args.passthrough,
    };
    let mountpoint = check_mountpoint(&args.mountpoint)?;
    check_fuse()?;
    if let Some(addr) = args.metrics_addr {
        crate::telemetry::serve_metrics(addr).map_err(usage)?;
    }
    let archive = open_archive(settings, !args.read_only)?;
    match archive.probe().await {
        Ok(()) => {}
        // Unreachable for now: mount anyway (the cache and a receiver's spool still serve,
        // writes fail and restores wait until it is back), and say so.
        Err(e @ crate::store::Error::Backend { .. }) => {
            tracing::warn!(error = %e, "the archive does not answer; mounting anyway")
        }
        Err(e) => return Err(e.into()),
    }
    match archive.identity().await {
        Ok(Some(id)) => tracing::info!(archive = archive.url(),
            system_identifier = %id.system_identifier, wal_segment_size = id.wal_segment_size,
            "archive identity read"),
        // Nothing to serve: a wrong URL must not look like an empty archive to a restore.
        Ok(None) if args.read_only => {
            return Err(crate::store::Error::NoArchive(archive.url().into()).into())
        }
        Ok(None) => tracing::warn!(
            archive = archive.url(),
            "this archive is new and empty (no walfs.json yet): the first segment archived \
             through the mount records its identity; restores of a recovering server are \
             refused (FATAL) until then. If this should be an existing archive, check --archive"
        ),
        Err(e) => tracing::warn!(error = %e,
            "the archive identity cannot be read yet; restores wait for it"),
    }
    let archive_dir = Cache::archive_dir(&settings.cache_dir, archive.url());
    let archive = Arc::new(archive.with_scratch_dir(archive_dir.join("writes")));
    let cache = Cache::new(
        archive.clone(),
        &CacheOptions {
            dir: settings.cache_dir.clone(),
            max_bytes: settings.cache_size,
            prefetch_bytes: args.prefetch_bytes,
            prefetch_concurrency: usize::from(args.prefetch_concurrency),
            serve_partial: args.serve_partial,
        },
    )
    .map_err(|e| {
        usage(format!(
            "cache directory {}: {e}",
            settings.cache_dir.display()
        ))
    })?;
    let cache = Arc::new(cache);
    let policy = super::restore_policy(settings, !args.read_only);
    let mut fs = Fs::new(
        cache.clone(),
        opts,
        policy,
        Arc::new(crate::caller::Proc::default()),
    );
    if args.archive_ahead && !args.read_only {
        // A local archive: one job per core (sealing is the work). A remote store: jobs mostly
        // wait on requests, so more run at once. Memory is bounded either way (MEMORY_BUDGET).
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get().min(4));
        let local = crate::store::canonical_url(archive.url()).starts_with("file:");
        let jobs = if local { cores } else { 6 };
        fs = fs.with_ahead(crate::ahead::Ahead::new(cache.clone(), jobs));
    }
    if args.metrics_addr.is_some() {
        tokio::spawn(watch_backups(archive.clone()));
        if !args.read_only {
            // The archive's age is known from the start, not from this process's first push
            // (a read-only mount archives nothing: it has no such age).
            let archive = archive.clone();
            tokio::spawn(async move { crate::telemetry::read_newest_archived(&archive).await });
        }
    }
    let fs = WalFs::new(fs, tokio::runtime::Handle::current());
    let session = fuse::spawn(fs, &mountpoint).map_err(|e| {
        // fusermount3 refuses in words of its own (no errno): allow_other is the one a hint
        // helps with, naming walfs's option. (Its own reading of fuse.conf decides: where it
        // looks depends on how it was built, and a process with CAP_SYS_ADMIN needs none.)
        let refused_allow_other = args.allow_other && e.to_string().contains("allow_other");
        let hint = match e.raw_os_error() {
            Some(libc::EPERM) | Some(libc::EACCES) => mount_refused_hint(args.allow_other),
            _ if refused_allow_other => mount_refused_hint(true),
            _ => "",
        };
        usage(format!("mounting {}: {e}{hint}", mountpoint.display()))
    })?;
    tracing::warn!(archive = archive.url(), mountpoint = %mountpoint.display(), "mounted");
    if !args.allow_other {
        tracing::warn!(
            "mounted without --allow-other: the kernel lets only uid {euid} open files in it; \
             PostgreSQL's archive_command and restore_command run as PostgreSQL's user \
             (usually postgres), so add --allow-other unless PostgreSQL runs as uid {euid}"
        );
    }
    // systemd (Type=notify): PostgreSQL units ordered after this one start only now.
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("mounted at {}", mountpoint.display())),
    ]);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Failure::new(exit::UNAVAILABLE, format!("signal handler: {e}")))?;
    let mut ticker = tokio::time::interval(Duration::from_millis(250));
    let mut ticks = 0u32;
    let reason = loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break "SIGINT",
            _ = term.recv() => break "SIGTERM",
            _ = ticker.tick() => {
                if session.guard.is_finished() {
                    break "unmounted from outside";
                }
                ticks += 1;
                if ticks % 4 == 0 {
                    cache.settle().await;
                    cache.publish_metrics();
                    if let Err(e) = cache.write_stats(false) {
                        tracing::debug!(error = %e, "writing stats.json failed");
                    }
                }
            }
        }
    };
    tracing::warn!(mountpoint = %mountpoint.display(), reason, "unmounting");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let _ = cache.write_stats(true);
    tracing::info!(stats = %cache.stats().to_json(), "read-ahead");
    let mp = mountpoint.clone();
    let result = tokio::task::spawn_blocking(move || session.umount_and_join())
        .await
        .map_err(|e| Failure::new(exit::UNAVAILABLE, format!("unmount task: {e}")))?;
    if let Err(e) = result {
        // Busy (a shell's working directory inside, say): detach so the path frees up as
        // soon as the last user leaves.
        let c = CString::new(mp.as_os_str().as_encoded_bytes()).unwrap_or_default();
        // SAFETY: umount2 with a NUL-terminated path.
        let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if rc != 0 && fuse_mounted_at(&mp).is_some() {
            return Err(Failure::new(
                exit::UNAVAILABLE,
                format!("unmounting {}: {e}", mp.display()),
            ));
        }
    }
    Ok(())
}

/// Keeps the backup gauges current for an alert on the newest backup's age: the records are
/// read every 5 minutes, the age moves every 30 s.
async fn watch_backups(archive: Arc<crate::store::Archive>) {
    let mut newest: Option<i64> = None;
    let mut ticks = 0u32;
    loop {
        if ticks % 10 == 0 {
            match crate::backup::newest_finished(&archive).await {
                Ok(t) => newest = t,
                Err(e) => tracing::debug!(error = %e, "reading the backups' records failed"),
            }
        }
        if let Some(t) = newest {
            crate::telemetry::set_gauge("walfs_backup_last_success_timestamp_seconds", t as f64);
            crate::telemetry::set_gauge(
                "walfs_backup_newest_age_seconds",
                (crate::telemetry::now_secs() - t as f64).max(0.0),
            );
        }
        ticks = ticks.wrapping_add(1);
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::mounted_fs_type;

    const INFO: &str = "\
22 1 0:21 / / rw,relatime - overlay overlay rw
35 22 8:1 /var/tmp/x/mnt /mnt/wal rw,relatime - ext4 /dev/sda1 rw
36 22 0:40 / /mnt/other\\040dir rw shared:5 - tmpfs tmpfs rw
";

    #[test]
    fn the_topmost_mount_at_a_point_names_its_type() {
        assert_eq!(mounted_fs_type(INFO, "/mnt/wal").as_deref(), Some("ext4"));
        assert_eq!(
            mounted_fs_type(INFO, "/mnt/other dir").as_deref(),
            Some("tmpfs")
        );
        assert_eq!(mounted_fs_type(INFO, "/mnt"), None);
        // A walfs mounted over the bind mount is what a second mount must not hide.
        let stacked = format!("{INFO}40 35 0:50 / /mnt/wal rw,nosuid - fuse.walfs walfs rw\n");
        assert_eq!(
            mounted_fs_type(&stacked, "/mnt/wal").as_deref(),
            Some("fuse.walfs")
        );
    }
}
