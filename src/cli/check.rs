//! `walfs check --dbname CONNINFO`, as `pgbackrest check`: reads a running server's archive
//! settings and identity, compares them with this archive, then forces a segment switch and
//! waits until that segment is in the archive and opens with the key. The readings are
//! `ops::check`; the switch is the proof.
//!
//! Exit codes: 0 passed (warnings allowed); 1 PostgreSQL does not archive into this archive
//! (a setting, or the switched segment never arrived); 2 walfs's own settings (connection
//! string, key file, an archive of another cluster); 3 the server or the store cannot be
//! reached; 4 the switched segment arrived and does not open.

use super::{exit, open_archive, Failure};
use crate::config::{self, Settings};
use crate::ops::check::{self, Finding, Level};
use crate::receive::conn::{ConnParams, ReplicationConn};
use crate::store::Class;
use crate::wal::ArchiveName;
use clap::Args;
use std::time::{Duration, Instant};

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Connection string or URI of the server (libpq style; a SQL session, not replication)
    #[arg(short = 'd', long, value_name = "CONNSTR")]
    pub dbname: Option<String>,
    /// How long to wait for the switched segment to reach the archive
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = config::parse_duration)]
    pub timeout: Duration,
    /// Read the settings only: no restore point, no WAL switch
    #[arg(long)]
    pub no_switch: bool,
    /// The findings as JSON
    #[arg(long)]
    pub json: bool,
}

/// What the server says about itself.
struct Server {
    version: String,
    sysid: String,
    segment_size: u64,
    archive_mode: String,
    archive_command: String,
    archive_library: String,
    restore_command: String,
    in_recovery: bool,
}

const SETTINGS_SQL: &str = "select current_setting('server_version'), \
     (select system_identifier::text from pg_control_system()), \
     (select setting || ' ' || coalesce(unit, '') from pg_settings where name = 'wal_segment_size'), \
     current_setting('archive_mode'), current_setting('archive_command'), \
     coalesce(current_setting('archive_library', true), ''), \
     current_setting('restore_command'), pg_is_in_recovery()::text";

fn unavailable(what: &str, e: impl std::fmt::Display) -> Failure {
    Failure::new(exit::UNAVAILABLE, format!("{what}: {e}"))
}

/// `wal_segment_size` from pg_settings: a number and its unit.
fn segment_bytes(s: &str) -> Option<u64> {
    let (n, unit) = s.split_once(' ').unwrap_or((s, ""));
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "B" | "" => n,
        "kB" => n << 10,
        "8kB" => n * 8192,
        "MB" => n << 20,
        _ => return None,
    })
}

async fn read_server(conn: &mut ReplicationConn) -> Result<Server, Failure> {
    let rows = conn
        .query(SETTINGS_SQL)
        .await
        .map_err(|e| unavailable("reading the server's settings", e))?;
    let row = rows
        .first()
        .filter(|r| r.len() == 8)
        .ok_or_else(|| unavailable("reading the server's settings", "no answer"))?;
    let col = |i: usize| row[i].clone().unwrap_or_default();
    let segment_size = segment_bytes(&col(2)).ok_or_else(|| {
        unavailable(
            "reading the server's settings",
            format!("wal_segment_size {:?}", col(2)),
        )
    })?;
    Ok(Server {
        version: col(0),
        sysid: col(1),
        segment_size,
        archive_mode: col(3),
        archive_command: col(4),
        archive_library: col(5),
        restore_command: col(6),
        in_recovery: col(7) == "true",
    })
}

fn walfs_mounts() -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| check::walfs_mounts(&t))
        .unwrap_or_default()
}

/// Switches WAL and returns the name of the segment it finished.
async fn switch(conn: &mut ReplicationConn) -> Result<ArchiveName, Finding> {
    let denied = |e: &dyn std::fmt::Display| {
        Finding::new(
            Level::Fail,
            "switch",
            format!(
                "could not switch WAL ({e}): run check as a role that may call \
                 pg_create_restore_point() and pg_switch_wal() (a superuser, or GRANT EXECUTE \
                 on both), or give --no-switch"
            ),
        )
    };
    // Something to switch away from, even on an idle server.
    conn.query("select pg_create_restore_point('walfs check')")
        .await
        .map_err(|e| denied(&e))?;
    let rows = conn
        .query("select pg_walfile_name(pg_switch_wal())")
        .await
        .map_err(|e| denied(&e))?;
    let name = rows
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .unwrap_or_default();
    ArchiveName::parse(&name).map_err(|e| {
        Finding::new(
            Level::Fail,
            "switch",
            format!("pg_switch_wal() named {name:?}: {e}"),
        )
    })
}

/// What pg_stat_archiver says about failures, for the message when a segment never arrived.
async fn archiver_failures(conn: &mut ReplicationConn) -> String {
    let q = "select failed_count::text, coalesce(last_failed_wal, ''), \
             coalesce(last_failed_time::text, ''), coalesce(last_archived_wal, '') \
             from pg_stat_archiver";
    match conn.query(q).await {
        Ok(rows) => match rows.first() {
            Some(r) if r.len() == 4 => {
                let c = |i: usize| r[i].clone().unwrap_or_default();
                if c(0) == "0" {
                    format!(
                        "pg_stat_archiver shows no failure (last archived {:?}): is \
                         archive_command archiving somewhere else?",
                        c(3)
                    )
                } else {
                    format!(
                        "pg_stat_archiver: {} failures, the last for {} at {}; the server log \
                         says why",
                        c(0),
                        c(1),
                        c(2)
                    )
                }
            }
            _ => String::new(),
        },
        Err(e) => format!("(pg_stat_archiver: {e})"),
    }
}

pub async fn run(settings: &Settings, args: &CheckArgs) -> Result<(), Failure> {
    let params = ConnParams::resolve(args.dbname.as_deref(), "walfs check")
        .map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let mut conn = ReplicationConn::connect_sql(&params, Duration::from_secs(30))
        .await
        .map_err(|e| {
            let code = if e.is_permanent() {
                exit::USAGE
            } else {
                exit::UNAVAILABLE
            };
            Failure::new(code, format!("connecting to PostgreSQL: {e}"))
        })?;
    let server = read_server(&mut conn).await?;
    let url = settings.archive.as_str();
    let mounts = walfs_mounts();
    let mut findings = vec![Finding::new(
        Level::Ok,
        "server",
        format!(
            "PostgreSQL {} at {}, system identifier {}, {} MiB segments, {}",
            server.version,
            params.describe(),
            server.sysid,
            server.segment_size >> 20,
            if server.in_recovery {
                "in recovery (a standby)"
            } else {
                "a primary"
            }
        ),
    )];
    findings.push(check::archive_mode(
        &server.archive_mode,
        server.in_recovery,
    ));
    if !server.archive_library.is_empty() {
        findings.push(Finding::new(
            Level::Fail,
            "archive_library",
            format!(
                "archive_library = '{}': PostgreSQL ignores archive_command while it is set; \
                 empty it",
                server.archive_library
            ),
        ));
    }
    findings.push(check::archive_command(
        &server.archive_command,
        url,
        &mounts,
    ));
    findings.push(check::restore_command(
        &server.restore_command,
        url,
        &mounts,
    ));

    // A local archive this user may not read (the packaged mount writes it as root): the
    // segment is then read back through the mount archive_command copies into, which opens it
    // with the archive's key before it serves a byte.
    let mount = check::mount_of(&server.archive_command, &mounts);
    let through = match (
        local_dir(url).map(|d| std::fs::read_dir(d.join("wal"))),
        &mount,
    ) {
        (Some(Err(e)), Some(m)) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            findings.push(Finding::new(
                Level::Warn,
                "archive",
                format!(
                    "{url} is not readable by this user ({e}): the identity is not compared \
                     here, and the switched segment is read back through {} (the mount opens \
                     it with the archive's key)",
                    m.display()
                ),
            ));
            Some(m.clone())
        }
        (Some(Err(e)), None) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(Failure::new(
                exit::USAGE,
                format!(
                    "{url} is not readable by this user ({e}): run walfs check as a user that \
                     can read it, or archive through a walfs mount"
                ),
            ));
        }
        _ => None,
    };
    // Through the mount, neither the archive nor the key file is opened here (either may be
    // root's alone).
    let proof = match through {
        Some(m) => Proof::Mount(m),
        None => Proof::Store(Box::new(open_archive(settings, false)?)),
    };
    let id = match &proof {
        Proof::Mount(_) => None,
        Proof::Store(archive) => {
            archive.probe().await?;
            // A key file that does not fit the archive is walfs's own setting: exit 2.
            let id = archive.identity().await?;
            findings.push(check::identity(
                &server.sysid,
                server.segment_size,
                id.as_ref()
                    .map(|i| (i.system_identifier.as_str(), i.wal_segment_size)),
                url,
            ));
            id
        }
    };
    if let Some(i) = &id {
        findings.push(Finding::new(
            Level::Ok,
            "key",
            match &i.key_id {
                Some(k) => format!("sealed with key id {k}, which the key file holds"),
                None => "not encrypted (walfs keygen and --key-file encrypt an archive)".into(),
            },
        ));
    }

    let mut code = None;
    if server.in_recovery {
        findings.push(Finding::new(
            Level::Warn,
            "switch",
            "a standby cannot switch WAL: check its primary for the end-to-end test",
        ));
    } else if args.no_switch {
        findings.push(Finding::new(
            Level::Warn,
            "switch",
            "--no-switch: not proven end to end",
        ));
    } else {
        match switch(&mut conn).await {
            Err(f) => findings.push(f),
            Ok(name) => {
                let (f, c) = match &proof {
                    Proof::Mount(m) => {
                        let want = server.segment_size;
                        wait_in_mount(m, &name, want, args.timeout, &mut conn).await
                    }
                    Proof::Store(archive) => {
                        wait_for(archive, &name, args.timeout, &mut conn).await
                    }
                };
                findings.push(f);
                code = c;
                if let (None, Proof::Store(archive)) = (&id, &proof) {
                    // The first segment made the archive: it must be this cluster's now.
                    if let Ok(Some(i)) = archive.identity().await {
                        findings.push(check::identity(
                            &server.sysid,
                            server.segment_size,
                            Some((i.system_identifier.as_str(), i.wal_segment_size)),
                            url,
                        ));
                    }
                }
            }
        }
    }

    if args.json {
        super::ops::json_out(&findings)?;
    } else {
        for f in &findings {
            let tag = match f.level {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            println!("{tag} {}: {}", f.what, f.detail);
        }
    }
    match findings.iter().find(|f| f.level == Level::Fail) {
        None => {
            if !args.json {
                println!("check passed: {url} archives this server's WAL");
            }
            Ok(())
        }
        Some(first) => Err(Failure::new(
            code.unwrap_or(exit::ABSENT_OR_REFUSED),
            format!("check failed: {}: {}", first.what, first.detail),
        )),
    }
}

/// Where the switched segment is looked for: the archive itself, or (when this user cannot
/// read a local archive) the walfs mount archive_command copies into.
enum Proof {
    Store(Box<crate::store::Archive>),
    Mount(std::path::PathBuf),
}

/// The directory of a local archive URL (`file://…` or an absolute path).
fn local_dir(url: &str) -> Option<std::path::PathBuf> {
    if url.starts_with('/') {
        return Some(url.into());
    }
    url::Url::parse(url)
        .ok()
        .filter(|u| u.scheme() == "file")
        .and_then(|u| u.to_file_path().ok())
}

/// Waits until `name` can be read whole through the walfs mount `mount` (which serves only
/// what opened with the archive's key).
async fn wait_in_mount(
    mount: &std::path::Path,
    name: &ArchiveName,
    segment_size: u64,
    timeout: Duration,
    conn: &mut ReplicationConn,
) -> (Finding, Option<u8>) {
    let path = mount.join(name.as_str());
    let began = Instant::now();
    loop {
        let p = path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read(p)).await;
        match read {
            Ok(Ok(bytes)) if bytes.len() as u64 == segment_size => {
                return (
                    Finding::new(
                        Level::Ok,
                        "switch",
                        format!(
                            "switched WAL: {name} reached the archive, read back whole through \
                             {} ({:.1} s)",
                            mount.display(),
                            began.elapsed().as_secs_f64()
                        ),
                    ),
                    None,
                )
            }
            Ok(Ok(bytes)) => {
                return (
                    Finding::new(
                        Level::Fail,
                        "switch",
                        format!(
                            "{name} read through {} holds {} bytes, not {segment_size}",
                            mount.display(),
                            bytes.len()
                        ),
                    ),
                    Some(exit::DAMAGED),
                )
            }
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            Ok(Err(e)) => {
                return (
                    Finding::new(
                        Level::Fail,
                        "switch",
                        format!("reading {} failed: {e}", path.display()),
                    ),
                    Some(exit::UNAVAILABLE),
                )
            }
            Err(e) => {
                return (
                    Finding::new(Level::Fail, "switch", format!("reading task failed: {e}")),
                    Some(exit::UNAVAILABLE),
                )
            }
        }
        if began.elapsed() >= timeout {
            return (
                Finding::new(
                    Level::Fail,
                    "switch",
                    format!(
                        "switched WAL, but {name} did not appear in {} within {}; {}",
                        mount.display(),
                        humantime::format_duration(timeout),
                        archiver_failures(conn).await
                    ),
                ),
                None,
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until `name` is in the archive and opens; the finding, and the exit code when it is
/// not one of "PostgreSQL's settings" (1).
async fn wait_for(
    archive: &crate::store::Archive,
    name: &ArchiveName,
    timeout: Duration,
    conn: &mut ReplicationConn,
) -> (Finding, Option<u8>) {
    let began = Instant::now();
    let mut last_error = None;
    loop {
        match archive.check_object(name).await {
            Ok(Some(info)) => {
                let key = match info.key_id {
                    Some(k) => format!("opens with key id {k}"),
                    None => "opens (not encrypted)".into(),
                };
                return (
                    Finding::new(
                        Level::Ok,
                        "switch",
                        format!(
                            "switched WAL: {name} reached the archive and {key} ({:.1} s)",
                            began.elapsed().as_secs_f64()
                        ),
                    ),
                    None,
                );
            }
            Ok(None) => {}
            // No walfs.json yet: a new archive the first segment has not reached.
            Err(e) if e.class() == Class::Misconfigured => {}
            Err(e) if e.class() == Class::Damaged => {
                return (
                    Finding::new(
                        Level::Fail,
                        "switch",
                        format!("{name} is in the archive and does not open: {e}"),
                    ),
                    Some(exit::DAMAGED),
                )
            }
            Err(e) => last_error = Some(e.to_string()),
        }
        if began.elapsed() >= timeout {
            return match last_error {
                Some(e) => (
                    Finding::new(
                        Level::Fail,
                        "switch",
                        format!("could not read {name} from the archive: {e}"),
                    ),
                    Some(exit::UNAVAILABLE),
                ),
                None => (
                    Finding::new(
                        Level::Fail,
                        "switch",
                        format!(
                            "switched WAL, but {name} did not reach {} within {}; {}",
                            archive.url(),
                            humantime::format_duration(timeout),
                            archiver_failures(conn).await
                        ),
                    ),
                    None,
                ),
            };
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn segment_sizes_in_any_unit() {
        assert_eq!(super::segment_bytes("16777216 B"), Some(16 << 20));
        assert_eq!(super::segment_bytes("2048 8kB"), Some(16 << 20));
        assert_eq!(super::segment_bytes("1 MB"), Some(1 << 20));
        assert_eq!(super::segment_bytes("x B"), None);
    }
}
