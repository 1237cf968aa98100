//! `walfs backup`, `walfs backup list` and `walfs restore`.

use super::{exit, open_archive, Failure};
use crate::backup::{self, BackupError, BackupOptions, Listed};
use crate::config::{self, Settings};
use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub action: Option<BackupAction>,
    /// Connection string or URI (libpq style); PG* variables and ~/.pgpass fill the rest
    #[arg(short = 'd', long, value_name = "CONNSTR")]
    pub dbname: Option<String>,
    /// The backup's label (default: "walfs" and the time)
    #[arg(long)]
    pub label: Option<String>,
    /// Checkpoint at once ("fast") or spread as the server's checkpoints are ("spread")
    #[arg(short = 'c', long, value_name = "fast|spread", default_value = "fast",
          value_parser = ["fast", "spread"])]
    pub checkpoint: String,
    /// Limit the server's send rate (bytes per second, e.g. 50MiB; the server's floor is 32kB)
    #[arg(short = 'r', long, value_name = "RATE", value_parser = config::parse_size)]
    pub max_rate: Option<u64>,
    /// Plaintext bytes per stored object (memory holds a few of them)
    #[arg(long, value_name = "SIZE", default_value = "16MiB", value_parser = config::parse_size)]
    pub chunk_size: u64,
    /// How long to wait for the WAL the backup needs to reach the archive
    #[arg(long, value_name = "DURATION", default_value = "5min", value_parser = config::parse_duration)]
    pub wal_timeout: std::time::Duration,
    /// Serve the backup's progress as Prometheus metrics at http://ADDR/metrics while it runs
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Subcommand, Debug)]
pub enum BackupAction {
    /// The backups in the archive: start and end, timeline, size, version, and whether the
    /// WAL to restore each is present; incomplete ones (interrupted) say so
    List {
        /// One JSON array instead of lines
        #[arg(long)]
        json: bool,
    },
}

/// Exit codes as elsewhere: 2 settings or a refusal, 3 the server or the store failed
/// (trying again may work), 4 the backup did not match its manifest.
fn failure(e: BackupError) -> Failure {
    let code = match &e {
        BackupError::Store(_) => {
            return match e {
                BackupError::Store(s) => Failure::from(s),
                _ => Failure::new(exit::UNAVAILABLE, e.to_string()),
            }
        }
        BackupError::Conn(c) if c.is_permanent() => exit::USAGE,
        BackupError::Refused(_) => exit::USAGE,
        BackupError::Manifest(_) | BackupError::Damaged(_) => exit::DAMAGED,
        _ => exit::UNAVAILABLE,
    };
    Failure::new(code, e.to_string())
}

pub async fn run(settings: &Settings, args: &BackupArgs) -> Result<(), Failure> {
    match &args.action {
        Some(BackupAction::List { json }) => list(settings, *json).await,
        None => take(settings, args).await,
    }
}

async fn take(settings: &Settings, args: &BackupArgs) -> Result<(), Failure> {
    use crate::receive::conn::ConnParams;
    let conn = ConnParams::resolve(args.dbname.as_deref(), "walfs backup")
        .map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let archive = std::sync::Arc::new(open_archive(settings, false)?);
    archive.probe().await?;
    if let Some(addr) = args.metrics_addr {
        crate::telemetry::serve_metrics(addr).map_err(|e| Failure::new(exit::USAGE, e))?;
    }
    let opts = BackupOptions {
        conn,
        label: args.label.clone(),
        fast_checkpoint: args.checkpoint == "fast",
        max_rate: args.max_rate,
        chunk_size: usize::try_from(args.chunk_size).unwrap_or(usize::MAX),
        wal_timeout: args.wal_timeout,
    };
    let bar = super::ops::bar(0, "backup", true);
    let record = backup::take(archive, &opts, |p| {
        if let Some(total) = p.total {
            bar.set_length(total.max(p.done));
            crate::telemetry::set_gauge("walfs_backup_expected_bytes", total as f64);
        }
        bar.set_position(p.done);
        crate::telemetry::set_gauge("walfs_backup_streamed_bytes", p.done as f64);
    })
    .await
    .map_err(failure);
    bar.finish_and_clear();
    let record = record?;
    println!(
        "backup {} complete: {} to {} on timeline {}, {} files, {} ({} stored)",
        record.name,
        record.start_lsn,
        record.end_lsn,
        record.end_timeline,
        record.files,
        human_bytes(record.bytes),
        human_bytes(record.stored_bytes)
    );
    Ok(())
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

async fn list(settings: &Settings, json: bool) -> Result<(), Failure> {
    let archive = open_archive(settings, false)?;
    let listed = backup::list(&archive).await.map_err(failure)?;
    if json {
        return super::ops::json_out(&listed);
    }
    let mut out = std::io::stdout().lock();
    for l in &listed {
        writeln!(out, "{}", line(l)).map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;
    }
    Ok(())
}

fn line(l: &Listed) -> String {
    if let Some(why) = &l.damaged {
        return format!("{}  DAMAGED (never used): {why}", l.name);
    }
    match &l.record {
        None => format!(
            "{}  INCOMPLETE (interrupted; never used)  {} stored",
            l.name,
            human_bytes(l.stored_bytes)
        ),
        Some(r) => format!(
            "{}  start {} end {} timeline {}  {}  {} stored  PostgreSQL {}  finished {}  {}",
            l.name,
            r.start_lsn,
            r.end_lsn,
            r.end_timeline,
            human_bytes(r.bytes),
            human_bytes(r.stored_bytes),
            r.pg_version / 10000,
            r.finished_at,
            match l.missing_wal.first() {
                None => "WAL present".to_string(),
                Some(m) => format!("WAL MISSING ({} files, first {m})", l.missing_wal.len()),
            }
        ),
    }
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The data directory to restore into: absent or empty
    pub pgdata: PathBuf,
    /// The backup to restore (default: the newest complete one before the target)
    #[arg(long, value_name = "NAME")]
    pub backup: Option<String>,
    /// Recover to this time (UTC, "2026-11-29 10:00:00"), then promote
    #[arg(long, value_name = "TIME", group = "target")]
    pub target_time: Option<String>,
    /// Recover to this LSN, then promote
    #[arg(long, value_name = "LSN", group = "target")]
    pub target_lsn: Option<String>,
    /// Recover to this restore point (pg_create_restore_point), then promote
    #[arg(long, value_name = "NAME", group = "target")]
    pub target_name: Option<String>,
    /// Recover along this timeline: latest, current, or a number
    #[arg(long, value_name = "TIMELINE", group = "target")]
    pub target_timeline: Option<String>,
    /// Restore the tablespace that was at OLDDIR into NEWDIR (repeat for each)
    #[arg(short = 'T', long, value_name = "OLDDIR=NEWDIR")]
    pub tablespace_map: Vec<String>,
    /// restore_command to write (default: this walfs's `fetch %f %p` with this archive and key)
    #[arg(long, value_name = "COMMAND")]
    pub restore_command: Option<String>,
    /// Keep the backup's archive_mode (by default the copy does not archive: its new
    /// timeline must not go into the source's archive unless you mean it)
    #[arg(long)]
    pub keep_archiving: bool,
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_-.:=@%+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `walfs [--config F] --archive URL [--key-file K] fetch %f %p`, with this binary's path.
fn default_restore_command(settings: &Settings) -> String {
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "walfs".into());
    let mut parts = vec![shell_quote(&exe)];
    match &settings.config_file {
        Some(c) => parts.extend(["--config".into(), shell_quote(&c.display().to_string())]),
        None => parts.extend(["--config".into(), "/dev/null".into()]),
    }
    parts.extend(["--archive".into(), shell_quote(&settings.archive)]);
    if let Some(k) = &settings.key_file {
        parts.extend(["--key-file".into(), shell_quote(&k.display().to_string())]);
    }
    // PostgreSQL expands %f, %p, %r in restore_command: a % of a path is written %%.
    let mut line: Vec<String> = parts.iter().map(|p| p.replace('%', "%%")).collect();
    line.extend(["fetch".into(), "%f".into(), "%p".into()]);
    line.join(" ")
}

pub async fn restore(settings: &Settings, args: &RestoreArgs) -> Result<(), Failure> {
    use crate::backup::restore::{RestoreOptions, Target};
    let usage = |m: String| Failure::new(exit::USAGE, m);
    let target = if let Some(t) = &args.target_time {
        Some(Target::Time(t.clone()))
    } else if let Some(l) = &args.target_lsn {
        Some(Target::Lsn(l.parse().map_err(|_| {
            usage(format!("--target-lsn {l}: not an LSN (such as 0/3000028)"))
        })?))
    } else if let Some(n) = &args.target_name {
        Some(Target::Name(n.clone()))
    } else {
        args.target_timeline.clone().map(Target::Timeline)
    };
    let tablespace_map = args
        .tablespace_map
        .iter()
        .map(|m| {
            m.split_once('=')
                .filter(|(o, n)| o.starts_with('/') && n.starts_with('/'))
                .map(|(o, n)| (o.to_string(), PathBuf::from(n)))
                .ok_or_else(|| {
                    usage(format!(
                        "--tablespace-map {m}: give OLDDIR=NEWDIR, both absolute"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let opts = RestoreOptions {
        pgdata: args.pgdata.clone(),
        backup: args.backup.clone(),
        target,
        tablespace_map,
        restore_command: args
            .restore_command
            .clone()
            .unwrap_or_else(|| default_restore_command(settings)),
        keep_archiving: args.keep_archiving,
    };
    let archive = std::sync::Arc::new(open_archive(settings, false)?);
    let record = crate::backup::restore::restore(archive, &opts)
        .await
        .map_err(failure)?;
    println!(
        "restored backup {} ({} to {}, timeline {}) into {}; start PostgreSQL to recover{}",
        record.name,
        record.start_lsn,
        record.end_lsn,
        record.end_timeline,
        args.pgdata.display(),
        match &opts.target {
            None => " to the end of the archive".to_string(),
            Some(t) => format!(" to {t:?}"),
        }
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_restore_command_doubles_a_percent_of_a_path() {
        let settings = Settings {
            archive: "file:///srv/wal%20archive".into(),
            key_file: Some(PathBuf::from("/etc/walfs/key")),
            cache_dir: PathBuf::from("/var/cache/walfs"),
            compression_level: 3,
            retry_timeout: std::time::Duration::from_secs(60),
            cache_size: 1 << 30,
            recovery_timeout: crate::config::Wait::Forever,
            standby_timeout: std::time::Duration::from_secs(5),
            config_file: None,
            archive_origin: crate::config::Origin::Flag,
            key_file_origin: crate::config::Origin::Flag,
        };
        let c = default_restore_command(&settings);
        assert!(c.contains("file:///srv/wal%%20archive"), "{c}");
        assert!(c.ends_with(" fetch %f %p"), "{c}");
    }
}
