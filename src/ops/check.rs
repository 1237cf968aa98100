//! What `walfs check` concludes from a server's settings, without I/O: whether
//! `archive_command` and `restore_command` go through walfs into this archive, and whether
//! the server's identity matches the archive's. The command itself (connecting, switching WAL,
//! waiting for the segment) is `cli::check`; the switch is the proof, these readings explain a
//! failure and catch the mistakes a switch cannot (a restore_command that points elsewhere).

use serde::Serialize;
use std::path::{Path, PathBuf};

/// How one finding weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// Worth a look; the check still passes.
    Warn,
    /// The check fails: PostgreSQL's settings do not archive into this archive.
    Fail,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// What was checked (`archive_mode`, `archive_command`, …).
    pub what: String,
    /// One line: what was found, and for anything but Ok, what to change.
    pub detail: String,
}

impl Finding {
    pub fn new(level: Level, what: &str, detail: impl Into<String>) -> Finding {
        Finding {
            level,
            what: what.to_string(),
            detail: detail.into(),
        }
    }
}

/// A command's words, as a shell would split them (None: it does not split, e.g. an
/// unbalanced quote).
fn words(cmd: &str) -> Option<Vec<String>> {
    shlex::split(cmd)
}

fn is_walfs(word: &str) -> bool {
    Path::new(word).file_name().is_some_and(|n| n == "walfs")
}

/// The `--archive` a walfs command line gives, if any.
fn archive_flag(words: &[String]) -> Option<String> {
    words.iter().enumerate().find_map(|(i, w)| {
        if w == "--archive" {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix("--archive=").map(str::to_string)
        }
    })
}

/// Two spellings of one archive URL (a trailing slash does not matter).
fn same_url(a: &str, b: &str) -> bool {
    a.trim_end_matches('/') == b.trim_end_matches('/')
}

/// Where the mount a command copies to or from lies: the directory of the word that ends in
/// `/%f`.
fn copy_dir(words: &[String]) -> Option<PathBuf> {
    words
        .iter()
        .find_map(|w| w.strip_suffix("/%f").map(PathBuf::from))
}

/// The verdict on a command (`archive_command` with `walfs push`, or `restore_command` with
/// `walfs fetch`): `walfs_mounts` are the mount points of walfs on this host.
fn command(
    what: &str,
    cmd: &str,
    verb: &str,
    url: &str,
    walfs_mounts: &[PathBuf],
    empty: Level,
) -> Finding {
    let cmd = cmd.trim();
    if cmd.is_empty() {
        let fix = match verb {
            "push" => "set archive_command = 'walfs push %p' (or 'cp %p MOUNT/%f' into a walfs mount)",
            _ => "servers that restore need restore_command = 'walfs fetch %f %p' (or 'cp MOUNT/%f %p')",
        };
        return Finding::new(empty, what, format!("{what} is empty: {fix}"));
    }
    let Some(w) = words(cmd) else {
        return Finding::new(
            Level::Warn,
            what,
            format!("{what} = '{cmd}' does not parse as a shell command"),
        );
    };
    if let Some(at) = w.iter().position(|x| is_walfs(x)) {
        let args = &w[at..];
        if !args.iter().any(|a| a == verb) {
            return Finding::new(
                Level::Fail,
                what,
                format!("{what} = '{cmd}' runs walfs but not 'walfs {verb}'"),
            );
        }
        return match archive_flag(args) {
            Some(a) if same_url(&a, url) => Finding::new(
                Level::Ok,
                what,
                format!("'{cmd}': walfs {verb} with this archive"),
            ),
            Some(a) => Finding::new(
                Level::Fail,
                what,
                format!("{what} = '{cmd}' uses the archive {a}, not {url}: give --archive {url}"),
            ),
            None => Finding::new(
                Level::Ok,
                what,
                format!(
                    "'{cmd}': walfs {verb} with the server's walfs settings (its config file or \
                     WALFS_ARCHIVE; they must name {url})"
                ),
            ),
        };
    }
    if let Some(dir) = copy_dir(&w) {
        if walfs_mounts.iter().any(|m| m == &dir) {
            return Finding::new(
                Level::Ok,
                what,
                format!(
                    "'{cmd}': through {}, a walfs mount on this host",
                    dir.display()
                ),
            );
        }
        let why = if dir.exists() {
            "which is not a walfs mount on this host"
        } else {
            "which is not on this host"
        };
        return Finding::new(
            Level::Warn,
            what,
            format!(
                "'{cmd}' goes through {}, {why}: mount walfs there (walfs mount {})",
                dir.display(),
                dir.display()
            ),
        );
    }
    Finding::new(
        Level::Warn,
        what,
        format!("{what} = '{cmd}' does not go through walfs"),
    )
}

/// The walfs mount on this host that `archive_command` copies into, if it does.
pub fn mount_of(archive_command: &str, walfs_mounts: &[PathBuf]) -> Option<PathBuf> {
    let dir = copy_dir(&words(archive_command)?)?;
    walfs_mounts.contains(&dir).then_some(dir)
}

/// `archive_command` as the server runs it.
pub fn archive_command(cmd: &str, url: &str, walfs_mounts: &[PathBuf]) -> Finding {
    command(
        "archive_command",
        cmd,
        "push",
        url,
        walfs_mounts,
        Level::Fail,
    )
}

/// `restore_command` (only servers that restore need one: empty is a warning).
pub fn restore_command(cmd: &str, url: &str, walfs_mounts: &[PathBuf]) -> Finding {
    command(
        "restore_command",
        cmd,
        "fetch",
        url,
        walfs_mounts,
        Level::Warn,
    )
}

/// `archive_mode`: on, or always on a standby.
pub fn archive_mode(mode: &str, in_recovery: bool) -> Finding {
    match (mode, in_recovery) {
        ("always", _) | ("on", false) => {
            Finding::new(Level::Ok, "archive_mode", format!("archive_mode = {mode}"))
        }
        ("on", true) => Finding::new(
            Level::Warn,
            "archive_mode",
            "archive_mode = on on a standby: it archives only once promoted (always: also now)",
        ),
        _ => Finding::new(
            Level::Fail,
            "archive_mode",
            format!("archive_mode = {mode}: set archive_mode = on in postgresql.conf and restart"),
        ),
    }
}

/// The server against the archive's identity (`walfs.json`); None: the archive is new.
pub fn identity(
    server_sysid: &str,
    server_segment: u64,
    archive: Option<(&str, u64)>,
    url: &str,
) -> Finding {
    match archive {
        None => Finding::new(
            Level::Ok,
            "identity",
            format!("{url} holds nothing yet: the first segment archived makes it this cluster's"),
        ),
        Some((sysid, _)) if sysid != server_sysid => Finding::new(
            Level::Fail,
            "identity",
            format!(
                "{url} belongs to the cluster with system identifier {sysid}, this server is \
                 {server_sysid}: give this cluster an archive of its own"
            ),
        ),
        Some((_, seg)) if seg != server_segment => Finding::new(
            Level::Fail,
            "identity",
            format!(
                "{url} holds {seg}-byte segments, this server writes {server_segment}-byte ones"
            ),
        ),
        Some(_) => Finding::new(
            Level::Ok,
            "identity",
            format!("{url} is this cluster's (system identifier {server_sysid})"),
        ),
    }
}

/// Mount points of walfs in a `/proc/self/mountinfo` text: a FUSE file system whose source is
/// `walfs` (type `fuse`, or `fuse.walfs` where the subtype is kept).
pub fn walfs_mounts(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut fields = right.split(' ');
            let (fstype, source) = (fields.next()?, fields.next()?);
            let mountpoint = left.split(' ').nth(4)?;
            let walfs = fstype == "fuse.walfs" || (fstype == "fuse" && source == "walfs");
            walfs.then(|| PathBuf::from(unescape(mountpoint)))
        })
        .collect()
}

/// A mountinfo field with its octal escapes (`\040` for a space) undone.
pub fn unescape(field: &str) -> String {
    let mut out = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(b) = u8::from_str_radix(&code, 8) {
                out.push(b as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "s3://wal/main";

    #[test]
    fn archive_commands_are_read_as_a_shell_would() {
        let mounts = vec![PathBuf::from("/mnt/wal")];
        let level = |cmd: &str| archive_command(cmd, URL, &mounts).level;
        assert_eq!(level("cp %p /mnt/wal/%f"), Level::Ok);
        assert_eq!(level("/usr/bin/walfs push %p"), Level::Ok);
        assert_eq!(level("walfs --archive s3://wal/main/ push %p"), Level::Ok);
        assert_eq!(level("walfs --archive=s3://wal/main push %p"), Level::Ok);
        assert_eq!(
            level("env A=1 '/opt/my tools/walfs' --archive s3://wal/main push %p"),
            Level::Ok
        );
        assert_eq!(level("walfs --archive s3://wal/other push %p"), Level::Fail);
        assert_eq!(level("walfs fetch %f %p"), Level::Fail);
        assert_eq!(level(""), Level::Fail);
        assert_eq!(level("  "), Level::Fail);
        assert_eq!(level("cp %p /elsewhere/%f"), Level::Warn);
        assert_eq!(level("/bin/true"), Level::Warn);
        assert_eq!(level("cp 'unbalanced %p"), Level::Warn);
        let f = archive_command("walfs --archive s3://wal/other push %p", URL, &mounts);
        assert!(f.detail.contains("--archive s3://wal/main"), "{}", f.detail);
    }

    #[test]
    fn the_mount_archive_command_copies_into() {
        let mounts = vec![PathBuf::from("/mnt/wal")];
        assert_eq!(
            mount_of("cp %p /mnt/wal/%f", &mounts),
            Some(PathBuf::from("/mnt/wal"))
        );
        assert_eq!(mount_of("cp %p /elsewhere/%f", &mounts), None);
        assert_eq!(mount_of("walfs push %p", &mounts), None);
    }

    #[test]
    fn restore_commands_and_modes() {
        let mounts = vec![PathBuf::from("/mnt/wal")];
        let level = |cmd: &str| restore_command(cmd, URL, &mounts).level;
        assert_eq!(level("cp /mnt/wal/%f %p"), Level::Ok);
        assert_eq!(level("walfs fetch %f %p"), Level::Ok);
        assert_eq!(level(""), Level::Warn);
        assert_eq!(level("walfs push %p"), Level::Fail);
        assert_eq!(archive_mode("on", false).level, Level::Ok);
        assert_eq!(archive_mode("always", true).level, Level::Ok);
        assert_eq!(archive_mode("on", true).level, Level::Warn);
        assert_eq!(archive_mode("off", false).level, Level::Fail);
    }

    #[test]
    fn identities_are_compared() {
        assert_eq!(identity("1", 16 << 20, None, URL).level, Level::Ok);
        assert_eq!(
            identity("1", 16 << 20, Some(("1", 16 << 20)), URL).level,
            Level::Ok
        );
        assert_eq!(
            identity("1", 16 << 20, Some(("2", 16 << 20)), URL).level,
            Level::Fail
        );
        assert_eq!(
            identity("1", 16 << 20, Some(("1", 1 << 20)), URL).level,
            Level::Fail
        );
    }

    #[test]
    fn walfs_mounts_are_found_in_mountinfo() {
        let info = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n\
                    99 22 0:50 / /mnt/wal rw,nosuid,nodev,relatime shared:50 - fuse.walfs walfs rw,user_id=0\n\
                    98 22 0:51 / /mnt/my\\040wal rw shared:51 - fuse.walfs walfs rw\n\
                    96 22 0:53 / /srv/wal rw,nosuid - fuse walfs rw,user_id=0\n\
                    95 22 0:54 / /srv/x rw,nosuid - fuse other rw,user_id=0\n\
                    97 22 0:52 / /mnt/other rw shared:52 - fuse.sshfs host: rw\n";
        assert_eq!(
            walfs_mounts(info),
            [
                PathBuf::from("/mnt/wal"),
                PathBuf::from("/mnt/my wal"),
                PathBuf::from("/srv/wal")
            ]
        );
    }
}
