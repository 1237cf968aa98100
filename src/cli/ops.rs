//! Operator commands on a whole archive: `verify`, `delete`, `import`, `status`.

use super::{exit, open_archive, parse_name, Failure};
use crate::cache::{Cache, RECEIVE_STATE_FILE};
use crate::config::Settings;
use crate::ops::{self, import::ImportError, retention};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use std::path::Path;
use std::time::Duration;

/// A progress bar on stderr, drawn only when stderr is a terminal.
pub(super) fn bar(len: u64, what: &str, bytes: bool) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let template = if bytes {
        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}"
    } else {
        "{msg} [{bar:30}] {pos}/{len}, eta {eta}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

pub(super) fn json_out<T: serde::Serialize>(v: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(v)
        .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// A segment number from a segment, `.partial` or `.backup` name.
fn segno_arg(s: &str, size: crate::wal::SegmentSize) -> Result<u64, Failure> {
    match parse_name(s)?.wal_position(size) {
        Ok(Some(id)) => Ok(id.segno),
        Ok(None) => Err(Failure::new(
            exit::USAGE,
            format!("{s} is a history file, not a segment"),
        )),
        Err(e) => Err(Failure::new(exit::USAGE, format!("{s}: {e}"))),
    }
}

pub(super) async fn verify(
    settings: &Settings,
    from: Option<&str>,
    to: Option<&str>,
    deep: bool,
    json: bool,
) -> Result<(), Failure> {
    let archive = open_archive(settings, false)?;
    let size = archive.require_identity().await?.segment_size()?;
    let from = from.map(|s| segno_arg(s, size)).transpose()?;
    let to = to.map(|s| segno_arg(s, size)).transpose()?;
    let pb = bar(0, "opening", false);
    let progress = |done: u64, total: u64| {
        pb.set_length(total);
        pb.set_position(done);
    };
    let report = ops::verify(&archive, deep, from, to, 4, &progress).await;
    pb.finish_and_clear();
    let report = report?;
    // Each complete backup's WAL chain: every file from its start to its end; with --deep,
    // every chunk and the manifest opened and authenticated too.
    let mut backups = crate::backup::list(&archive)
        .await
        .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;
    if deep {
        for b in backups.iter_mut() {
            let Some(r) = &b.record else { continue };
            for file in r.objects() {
                match archive.get_backup_file(&b.name, &file, None).await {
                    Ok(Some(_)) => {}
                    Ok(None) => b.damaged = Some(format!("{}/{file} is missing", b.name)),
                    Err(e) if e.class() == crate::store::Class::Damaged => {
                        b.damaged = Some(e.to_string())
                    }
                    Err(e) => return Err(e.into()),
                }
                if b.damaged.is_some() {
                    b.complete = false;
                    break;
                }
            }
        }
    }
    let broken: Vec<&crate::backup::Listed> = backups
        .iter()
        .filter(|b| b.complete && !b.missing_wal.is_empty())
        .collect();
    let damaged_backups = backups.iter().filter(|b| b.damaged.is_some()).count();
    if json {
        let mut v = serde_json::to_value(&report)
            .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            o.insert(
                "backups".into(),
                serde_json::to_value(&backups)
                    .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?,
            );
        }
        json_out(&v)?;
    } else {
        for t in &report.timelines {
            let fork = t
                .forked_from
                .as_ref()
                .map(|(p, lsn)| format!(" (forked from timeline {p} at {lsn})"))
                .unwrap_or_default();
            println!("timeline {}{fork}: {} segments", t.timeline, t.segments);
            for (a, b) in &t.ranges {
                println!("  present {a} .. {b}");
            }
            for g in &t.gaps {
                println!("  MISSING {g}");
            }
        }
        if deep {
            println!("{} objects opened", report.checked);
            for (k, n) in &report.keys {
                println!("  key {k}: {n} objects");
            }
            for (v, n) in &report.formats {
                println!("  format {v}: {n} objects");
            }
            for d in &report.damaged {
                println!("  DAMAGED {d}");
            }
        }
        for b in &backups {
            match (&b.damaged, b.missing_wal.first()) {
                (Some(why), _) => println!("backup {}: DAMAGED: {why}", b.name),
                _ if !b.complete => println!("backup {}: incomplete (never used)", b.name),
                (None, None) => println!("backup {}: its WAL is present", b.name),
                (None, Some(m)) => println!(
                    "backup {}: WAL MISSING, {} files, the first {m}",
                    b.name,
                    b.missing_wal.len()
                ),
            }
        }
    }
    let gaps: usize = report.timelines.iter().map(|t| t.gaps.len()).sum();
    if damaged_backups > 0 || !report.damaged.is_empty() {
        return Err(Failure::new(
            exit::DAMAGED,
            format!(
                "{} damaged objects, {damaged_backups} damaged backups, {gaps} missing segments",
                report.damaged.len()
            ),
        ));
    }
    if !broken.is_empty() {
        return Err(Failure::new(
            exit::ABSENT_OR_REFUSED,
            format!(
                "{} backups lack WAL they need (the first: {})",
                broken.len(),
                broken[0].name
            ),
        ));
    }
    if !report.damaged.is_empty() {
        return Err(Failure::new(
            exit::DAMAGED,
            format!(
                "{} damaged objects, {gaps} missing segments",
                report.damaged.len()
            ),
        ));
    }
    if gaps > 0 {
        return Err(Failure::new(
            exit::ABSENT_OR_REFUSED,
            format!("{gaps} missing segments"),
        ));
    }
    if !json {
        println!(
            "whole: no gaps{}",
            if deep { ", every object opens" } else { "" }
        );
    }
    Ok(())
}

pub(super) struct DeleteArgs<'a> {
    pub before: Option<&'a str>,
    pub older_than: Option<Duration>,
    pub retain: Option<usize>,
    pub retain_for: Option<Duration>,
    pub incomplete_after: Option<Duration>,
    pub confirm: bool,
    pub json: bool,
}

pub(super) async fn delete(settings: &Settings, args: DeleteArgs<'_>) -> Result<(), Failure> {
    let archive = open_archive(settings, false)?;
    let size = archive.require_identity().await?.segment_size()?;
    let by_backup = args.retain.is_some() || args.retain_for.is_some();
    if args.incomplete_after.is_some() && !by_backup {
        return Err(Failure::new(
            exit::USAGE,
            "--incomplete-after goes with --retain or --retain-for (retention by backup)",
        ));
    }
    let mut backups = None;
    let (rule, protect) = match (args.before, args.older_than, by_backup) {
        (Some(s), None, false) => (retention::Rule::Before(segno_arg(s, size)?), None),
        (None, Some(age), false) => {
            let cutoff = crate::telemetry::now_secs() - age.as_secs_f64();
            (retention::Rule::ModifiedBefore(cutoff as i64), None)
        }
        (None, None, true) => {
            let rule = crate::backup::retain::Rule {
                count: args.retain,
                within: args.retain_for,
                incomplete_after: args
                    .incomplete_after
                    .unwrap_or(crate::backup::retain::STALE_INCOMPLETE),
            };
            let (bplan, protect) = backup_plan(&archive, rule).await?;
            let rule = retention::Rule::Before(bplan.wal_before);
            backups = Some(bplan);
            (rule, protect)
        }
        _ => {
            return Err(Failure::new(
                exit::USAGE,
                "give one of --before SEGMENT, --older-than DURATION, or --retain N and/or \
                 --retain-for DURATION (by backup)",
            ))
        }
    };
    let plan = retention::plan_archive(&archive, rule, protect)
        .await?
        .map_err(|e| Failure::new(exit::ABSENT_OR_REFUSED, e.to_string()))?;
    if args.json {
        match &backups {
            Some(b) => json_out(&serde_json::json!({"backups": b, "wal": &plan}))?,
            None => json_out(&plan)?,
        }
    } else {
        if let Some(b) = &backups {
            let verb = if args.confirm {
                "deleting"
            } else {
                "would delete"
            };
            for name in &b.delete {
                println!("{verb} backup {name}");
            }
            println!(
                "keeping {} backups ({}); the WAL they need starts with {}",
                b.keep.len(),
                b.keep.join(", "),
                b.oldest_kept
            );
        }
        let verb = if args.confirm {
            "deleting"
        } else {
            "would delete"
        };
        for name in &plan.delete {
            println!("{verb} {name}");
        }
        for name in &plan.histories_kept {
            println!("keeping {name} (a kept timeline descends from it)");
        }
        for name in &plan.snapshots {
            println!("{verb} receiver/{name}");
        }
        println!(
            "{verb} {} files ({} stored); keeping {} files from {} on",
            plan.delete.len(),
            HumanBytes(plan.delete_stored_bytes),
            plan.keep_files,
            plan.first_kept
        );
    }
    if !args.confirm {
        if !args.json {
            println!("dry run: nothing deleted; run again with --confirm to delete");
        }
        return Ok(());
    }
    // Backups first: an interruption then leaves WAL no backup needs, never a listed backup
    // whose WAL is gone.
    if let Some(b) = &backups {
        let objects = archive.backup_objects().await?;
        for name in &b.delete {
            if let Some(o) = objects.get(name) {
                archive.delete_backup(name, o).await?;
                tracing::info!(backup = %name, "backup deleted by retention");
            }
        }
    }
    let names: Vec<_> = plan
        .delete
        .iter()
        .map(|n| parse_name(n))
        .collect::<Result<_, _>>()?;
    // Oldest first, a batch at a time: an interruption leaves the oldest files gone and the
    // kept range whole; running the command again finishes the job.
    let pb = bar(names.len() as u64, "deleting", false);
    let mut deleted = 0;
    for batch in names.chunks(256) {
        deleted += archive
            .delete_many(batch)
            .await
            .inspect_err(|_| pb.abandon())?;
        pb.set_position(deleted);
    }
    pb.finish_and_clear();
    archive.delete_snapshots(&plan.snapshot_objects).await?;
    tracing::info!(deleted, snapshots = plan.snapshot_objects.len(), first_kept = %plan.first_kept, "retention applied");
    if !args.json {
        println!("deleted {deleted} files");
    }
    Ok(())
}

/// Retention by backup: the plan, and the timeline whose WAL must stay whole (the newest,
/// when no kept backup is on it: its WAL is the only way there).
async fn backup_plan(
    archive: &crate::store::Archive,
    rule: crate::backup::retain::Rule,
) -> Result<(crate::backup::retain::BackupPlan, Option<u32>), Failure> {
    use futures::TryStreamExt;
    let fail = |e: crate::backup::BackupError| Failure::new(exit::UNAVAILABLE, e.to_string());
    let listed = crate::backup::list(archive).await.map_err(fail)?;
    let objects = archive.backup_objects().await?;
    let plan = crate::backup::retain::plan(&listed, &objects, rule, std::time::SystemTime::now())
        .map_err(|e| Failure::new(exit::ABSENT_OR_REFUSED, e))?;
    let entries: Vec<crate::store::Entry> = archive.list(None).try_collect().await?;
    let newest = entries
        .iter()
        .filter(|e| e.name.kind() == crate::wal::FileKind::Segment)
        .map(|e| e.name.timeline())
        .max();
    let protect = crate::backup::retain::protected_timeline(&plan, &listed, newest);
    Ok((plan, protect))
}

pub(super) async fn import(
    settings: &Settings,
    dir: &Path,
    concurrency: usize,
    json: bool,
) -> Result<(), Failure> {
    let ops::import::Scan { files, ignored } = ops::import::scan(dir)
        .map_err(|e| Failure::new(exit::USAGE, format!("reading {}: {e}", dir.display())))?;
    let archive = open_archive(settings, true)?;
    archive.probe().await?;
    let total: u64 = files
        .iter()
        .map(|(_, p)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum();
    let pb = bar(total, "importing", true);
    let result = ops::import::import(&archive, files, concurrency, |n| pb.inc(n)).await;
    pb.finish_and_clear();
    let mut report = result.map_err(|e| match e {
        ImportError::Read { .. } => Failure::new(exit::UNAVAILABLE, e.to_string()),
        ImportError::Archive(e) => Failure::from(e),
    })?;
    report.ignored = ignored;
    if json {
        json_out(&report)?;
    } else {
        for (name, why) in &report.refused {
            println!("REFUSED {name}: {why}");
        }
        if !report.ignored.is_empty() {
            println!(
                "ignored {} entries that are not WAL archive files (first: {})",
                report.ignored.len(),
                report.ignored[0]
            );
        }
        println!(
            "imported {} files, {} already archived, {} refused ({} read)",
            report.imported,
            report.already_archived,
            report.refused.len(),
            HumanBytes(report.bytes)
        );
    }
    if !report.refused.is_empty() {
        return Err(Failure::new(
            exit::ABSENT_OR_REFUSED,
            format!("{} files refused", report.refused.len()),
        ));
    }
    Ok(())
}

/// A daemon's state file, with whether the process is alive and the file fresh.
fn daemon_state(path: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let pid = v["pid"].as_u64().and_then(|p| i32::try_from(p).ok());
    // SAFETY: kill with signal 0 only checks that the process exists.
    let alive = pid.is_some_and(|p| {
        let rc = unsafe { libc::kill(p, 0) };
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
    });
    let age = v["updated"]
        .as_u64()
        .map(|u| (crate::telemetry::now_secs() - u as f64).max(0.0));
    let stopped = v["stopped"].as_bool().unwrap_or(false);
    v["running"] = (alive && !stopped && age.is_some_and(|a| a < 10.0)).into();
    v["updated_seconds_ago"] = age.map(|a| a.round()).into();
    Some(v)
}

fn ago(secs: f64) -> String {
    humantime::format_duration(Duration::from_secs(secs.max(0.0) as u64)).to_string() + " ago"
}

pub(super) async fn status(settings: &Settings, json: bool) -> Result<(), Failure> {
    let dir = Cache::archive_dir(&settings.cache_dir, &settings.archive);
    let mount = daemon_state(&dir.join("stats.json"));
    let receive = daemon_state(&dir.join(RECEIVE_STATE_FILE));
    let summary = match open_archive(settings, false) {
        Ok(archive) => ops::summary::summary(&archive).await.map_err(Failure::from),
        Err(f) => Err(f),
    };
    if json {
        let archive = match &summary {
            Ok(s) => serde_json::to_value(s).unwrap_or_default(),
            Err(f) => serde_json::json!({ "error": f.message }),
        };
        json_out(&serde_json::json!({
            "archive": archive,
            "mount": mount,
            "receive": receive,
        }))?;
    } else {
        match &summary {
            Ok(s) => {
                println!(
                    "archive  {} (system {}, {} segments{})",
                    s.url,
                    s.system_identifier,
                    HumanBytes(s.wal_segment_size),
                    if s.encrypted { ", encrypted" } else { "" }
                );
                println!(
                    "files    {} ({} segments, {} partial, {} history, {} backup), {} stored, \
                     compression {:.1}x",
                    s.files,
                    s.segments,
                    s.partials,
                    s.histories,
                    s.backups,
                    HumanBytes(s.stored_bytes),
                    s.compression_ratio
                );
                let now = crate::telemetry::now_secs();
                for t in &s.timelines {
                    println!(
                        "timeline {}: {} .. {} ({} segments), newest archived {}",
                        t.timeline,
                        t.oldest,
                        t.newest,
                        t.segments,
                        ago(now - t.newest_archived_at as f64)
                    );
                }
            }
            Err(f) => println!("archive  {}: {}", settings.archive, f.message),
        }
        let health = |v: &serde_json::Value| {
            let running = v["running"].as_bool().unwrap_or(false);
            let pid = v["pid"].as_u64().unwrap_or(0);
            let seen = v["updated_seconds_ago"]
                .as_f64()
                .map(ago)
                .unwrap_or_default();
            if running {
                format!("running (pid {pid})")
            } else if v["stopped"].as_bool().unwrap_or(false) {
                format!("stopped (pid {pid}, {seen})")
            } else {
                format!("not running (pid {pid} last seen {seen})")
            }
        };
        match &mount {
            Some(m) => println!(
                "mount    {}: {} segment opens, {} read-ahead hits, {} joined, {} misses; \
                 cache {} in {} files",
                health(m),
                m["segment_requests"],
                m["readahead_hits"],
                m["readahead_joined"],
                m["readahead_misses"],
                HumanBytes(m["cache_bytes"].as_u64().unwrap_or(0)),
                m["cache_files"]
            ),
            None => println!("mount    none seen for this archive and cache directory"),
        }
        match &receive {
            Some(r) => println!(
                "receive  {}: {}timeline {}, flushed {}, server at {}, lag {}, last flush {}; \
                 upload queue {} files ({})",
                health(r),
                if r["connected"].as_bool().unwrap_or(false) {
                    "streaming "
                } else {
                    "disconnected, "
                },
                r["timeline"],
                r["flushed_lsn"].as_str().unwrap_or("?"),
                r["server_lsn"].as_str().unwrap_or("?"),
                HumanBytes(r["lag_bytes"].as_u64().unwrap_or(0)),
                r["last_flush_age_seconds"]
                    .as_f64()
                    .map(ago)
                    .unwrap_or_else(|| "never".into()),
                r["upload_queue_files"],
                HumanBytes(r["spool_bytes"].as_u64().unwrap_or(0)),
            ),
            None => println!("receive  none seen for this archive and cache directory"),
        }
        if let Some(n) = receive
            .as_ref()
            .and_then(|r| r["rejected_files"].as_u64())
            .filter(|n| *n > 0)
        {
            println!(
                "receive  REJECTED {n} files the archive refuses for good (set aside in the \
                 spool's rejected/; see the receiver's log)"
            );
        }
    }
    summary.map(|_| ())
}
