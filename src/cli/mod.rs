//! The `walfs` command line: parses arguments, resolves settings, calls the library, and turns
//! outcomes into exit codes PostgreSQL can act on.

use crate::caller::{Proc, Processes, Role};
use crate::config::{self, Overrides, Settings};
use crate::envelope::{Key, Keyring, SealOptions};
use crate::restore::{Policy, Trouble};
use crate::store::{Archive, Error as StoreError, PushOutcome, StoreConfig};
use crate::wal::{ArchiveName, FileKind};
use clap::{Args, Parser, Subcommand};
use futures::{StreamExt, TryStreamExt};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod assets;
mod backup;
mod check;
mod mount;
mod ops;

/// Exit codes. PostgreSQL reads a restore_command status from 1 to 125 as "not available"
/// (and, in archive recovery, ends the recovery there), and one above 125 as FATAL. So
/// `walfs fetch` run by a server in archive recovery exits 1 only for true absence and adds
/// [`exit::FATAL`] to every other code (202, 203, 204); for a standby and by hand the codes
/// stay as they are.
pub mod exit {
    /// fetch: the file is not in the archive. push: the file was refused or conflicts.
    pub const ABSENT_OR_REFUSED: u8 = 1;
    /// Bad usage or settings: URL, key file, config file.
    pub const USAGE: u8 = 2;
    /// The backend or a local disk failed (after retries); trying again later may work.
    pub const UNAVAILABLE: u8 = 3;
    /// An archived object is damaged or sealed with another key: never served.
    pub const DAMAGED: u8 = 4;
    /// Added to the codes above when the failure must stop a recovery, not end it.
    pub const FATAL: u8 = 200;
}

#[derive(Parser, Debug)]
#[command(
    name = "walfs",
    version,
    about = "A PostgreSQL WAL archive in an object store, compressed and encrypted",
    after_help = "archive_command = 'walfs push %p'    restore_command = 'walfs fetch %f %p'"
)]
pub struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug)]
struct GlobalArgs {
    /// Config file (TOML) [default: /etc/walfs/walfs.toml when present]
    #[arg(long, global = true, env = "WALFS_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,
    /// Archive URL: file:///dir, s3://bucket/prefix, gs://bucket/prefix, az://container/prefix
    #[arg(long, global = true, env = "WALFS_ARCHIVE", value_name = "URL")]
    archive: Option<String>,
    /// Key file (64 hex digits, see `walfs keygen`); without one, objects are not encrypted
    #[arg(long, global = true, env = "WALFS_KEY_FILE", value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Local cache directory
    #[arg(long, global = true, env = "WALFS_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// zstd level for new objects, 0 (off) to 22 [default: 3]
    #[arg(long, global = true, env = "WALFS_COMPRESSION_LEVEL", value_name = "N")]
    compression_level: Option<i32>,
    /// How long transient backend errors are retried before giving up [default: 60s]
    #[arg(long, global = true, env = "WALFS_RETRY_TIMEOUT", value_name = "DURATION",
          value_parser = config::parse_duration)]
    retry_timeout: Option<std::time::Duration>,
    /// How long a restore for a server in archive recovery waits for an unavailable store
    /// before walfs stops the recovery with FATAL; "forever" never stops it [default: 10min]
    #[arg(long, global = true, env = "WALFS_RECOVERY_TIMEOUT", value_name = "DURATION",
          value_parser = config::parse_wait)]
    recovery_timeout: Option<config::Wait>,
    /// How long a standby's restore waits for an unavailable store before it fails (the
    /// standby then streams instead) [default: 5s]
    #[arg(long, global = true, env = "WALFS_STANDBY_TIMEOUT", value_name = "DURATION",
          value_parser = config::parse_duration)]
    standby_timeout: Option<std::time::Duration>,
    /// Bytes of plaintext the local cache keeps (mount) [default: 1GiB]
    #[arg(long, global = true, env = "WALFS_CACHE_SIZE", value_name = "SIZE",
          value_parser = config::parse_size)]
    cache_size: Option<u64>,
    /// Log lines as text or as JSON objects (one per line, for log collectors)
    #[arg(long, global = true, env = "WALFS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// More log output (-v: info, -vv: debug); WALFS_LOG takes a full filter
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a new random 256-bit key to PATH (mode 0600); never overwrites
    Keygen { path: PathBuf },
    /// Keys of an encrypted archive
    #[command(subcommand)]
    Key(KeyCommand),
    /// Archive one file (archive_command = 'walfs push %p'); exit 0 only once it is durable
    Push {
        /// The file to archive; its name must be a PostgreSQL WAL archive name
        path: PathBuf,
        /// Archive it under this name instead of the file's own
        #[arg(long)]
        name: Option<String>,
    },
    /// Restore one file (restore_command = 'walfs fetch %f %p'); exit 1 if absent
    Fetch {
        /// The archive name (%f)
        name: String,
        /// Where to write it (%p); appears only complete and verified
        dest: PathBuf,
    },
    /// Present the archive as a directory (archive_command = 'cp %p MOUNT/%f',
    /// restore_command = 'cp MOUNT/%f %p'); runs until SIGINT or SIGTERM
    Mount(MountArgs),
    /// Stream WAL from a server over replication (pg_receivewal semantics) into the spool and
    /// the archive; runs until SIGINT or SIGTERM
    Receive(ReceiveArgs),
    /// Check a running server against the archive, as `pgbackrest check`: archive_mode,
    /// archive_command, restore_command, identity, then a WAL switch that must reach the
    /// archive and open. Exit 0 passed, 1 PostgreSQL does not archive here, 2 walfs settings,
    /// 3 unreachable, 4 the segment does not open
    Check(check::CheckArgs),
    /// Take a base backup over replication (BASE_BACKUP) into the archive, checked against
    /// the server's manifest; `walfs backup list` lists them
    Backup(backup::BackupArgs),
    /// Restore a base backup into an empty data directory, set to recover from the archive
    /// (to its end, or to --target-time/-lsn/-name)
    Restore(backup::RestoreArgs),
    /// Check the archive: per timeline the ranges present and every gap; --deep also opens
    /// and authenticates every object. Exit 0 whole, 1 gaps, 4 damaged
    Verify {
        /// First segment to consider
        #[arg(long, value_name = "SEGMENT")]
        from: Option<String>,
        /// Last segment to consider
        #[arg(long, value_name = "SEGMENT")]
        to: Option<String>,
        /// Open and authenticate every object (downloads the whole archive)
        #[arg(long)]
        deep: bool,
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Delete old WAL, or old backups and the WAL no kept backup needs (retention). A dry run
    /// unless --confirm: lists what would go. Cuts every timeline at one segment, keeps
    /// history files kept timelines need, never empties the archive
    #[command(group(clap::ArgGroup::new("rule").required(true).multiple(true)
        .args(["before", "older_than", "retain", "retain_for"])))]
    Delete {
        /// Delete what comes before this segment (a segment, .partial or .backup name; the
        /// timeline part is ignored, as pg_archivecleanup does)
        #[arg(long, value_name = "SEGMENT")]
        before: Option<String>,
        /// Delete what comes before the oldest segment archived within DURATION (e.g. 14d);
        /// older segments after it stay, so no gap opens
        #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// By backup: keep the newest N restorable backups, remove older backups and the WAL
        /// no kept backup needs
        #[arg(long, value_name = "N")]
        retain: Option<usize>,
        /// By backup: keep the restorable backups that finished within DURATION (at least the
        /// newest; with --retain, those too)
        #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
        retain_for: Option<std::time::Duration>,
        /// By backup: remove an incomplete backup (interrupted, never usable) once its newest
        /// object is this old [default: 1d]; keep it longer than any backup may pause
        #[arg(long, value_name = "DURATION", value_parser = config::parse_duration)]
        incomplete_after: Option<std::time::Duration>,
        /// Really delete
        #[arg(long)]
        confirm: bool,
        /// The plan as JSON
        #[arg(long)]
        json: bool,
    },
    /// Load a plain archive directory (what `cp %p DIR/%f` left) into the archive; safe to
    /// run again after an interruption (identical files count as done). Exit 1 if any file
    /// was refused
    Import {
        /// The directory
        dir: PathBuf,
        /// Files uploaded at the same time
        #[arg(long, value_name = "N", default_value_t = 4,
              value_parser = clap::value_parser!(u16).range(1..=64))]
        concurrency: u16,
        /// A JSON report instead of text
        #[arg(long)]
        json: bool,
    },
    /// The archive (newest segment per timeline, size, compression) and the mount and
    /// receiver running on this host for it (health, cache, spool, lag)
    Status {
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
    /// List archived files: name, size, stored size
    Ls {
        /// One JSON array instead of lines
        #[arg(long)]
        json: bool,
        /// List the receiver's snapshots (`receiver/<segment>.<end>.partial`: the segment
        /// being received, and old timelines' tails) instead of archive files
        #[arg(long)]
        snapshots: bool,
    },
    /// Write man pages (DIR/man) and shell completions (DIR/completions), for packages
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Make the key file's first key the archive's current key. Before, put the new key first
    /// in the key file of every host that reads or writes the archive, the old keys after it
    /// (objects sealed with them stay readable while the file holds them)
    Rotate,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// An empty directory
    pub mountpoint: PathBuf,
    /// Serve reads only; writes fail with EROFS
    #[arg(long)]
    pub read_only: bool,
    /// Let users other than the mounting one in (the postgres user, when root mounts)
    #[arg(long)]
    pub allow_other: bool,
    /// Let unlink delete from the archive (pg_archivecleanup MOUNT …)
    #[arg(long)]
    pub allow_delete: bool,
    /// Owner of the files [default: the mounting user]
    #[arg(long, value_name = "USER|UID")]
    pub uid: Option<String>,
    /// Group of the files [default: the mounting user's group]
    #[arg(long, value_name = "GROUP|GID")]
    pub gid: Option<String>,
    /// Stay in the foreground (always: run it under systemd or with &)
    #[arg(long)]
    pub foreground: bool,
    /// Bytes of segments loaded ahead of a sequential reader; 0 turns read-ahead off
    #[arg(long, env = "WALFS_PREFETCH_BYTES", value_name = "SIZE", default_value = "256MiB",
          value_parser = config::parse_size)]
    pub prefetch_bytes: u64,
    /// Hand reads of verified cached files to the kernel (FUSE passthrough, Linux 6.9+, root)
    #[arg(long, env = "WALFS_PASSTHROUGH", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub passthrough: bool,
    /// Serve the segment `walfs receive` is still writing (sharing --cache-dir) under its
    /// final name, full size with a zero tail, so a recovery reaches the last flushed commit
    #[arg(long, env = "WALFS_SERVE_PARTIAL")]
    pub serve_partial: bool,
    /// Archive ahead: seal and upload the segments PostgreSQL marked ready before its `cp`
    /// brings them, so that the close only confirms the bytes (read-write mounts)
    #[arg(long, env = "WALFS_ARCHIVE_AHEAD", value_name = "BOOL", default_value_t = true,
          action = clap::ArgAction::Set)]
    pub archive_ahead: bool,
    /// Segments loaded ahead at the same time
    #[arg(long, env = "WALFS_PREFETCH_CONCURRENCY", value_name = "N", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub prefetch_concurrency: u16,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187)
    #[arg(long, env = "WALFS_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Connection string or URI (libpq style); PG* variables and ~/.pgpass fill the rest
    #[arg(short = 'd', long, value_name = "CONNSTR")]
    pub dbname: Option<String>,
    /// Replication slot to stream from (keeps the server's WAL until walfs has it)
    #[arg(short = 'S', long, value_name = "NAME")]
    pub slot: Option<String>,
    /// Create the slot if it does not exist
    #[arg(long)]
    pub create_slot: bool,
    /// Report the flush position right after each fsync, so the server can use walfs in
    /// synchronous_standby_names
    #[arg(long)]
    pub synchronous: bool,
    /// Seconds between status updates to the server
    #[arg(short = 's', long, value_name = "DURATION", default_value = "10s",
          value_parser = config::parse_duration)]
    pub status_interval: std::time::Duration,
    /// How often the segment being received is uploaded as .partial ("0s": never)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = config::parse_duration)]
    pub partial_upload_interval: std::time::Duration,
    /// application_name reported to the server (what synchronous_standby_names names)
    #[arg(long, default_value = "walfs")]
    pub application_name: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9188)
    #[arg(long, env = "WALFS_METRICS_ADDR", value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// A failure with the exit code it maps to and the one line that explains it.
pub struct Failure {
    code: u8,
    message: String,
    /// The setting whose origin the message should name (filled in by `run`).
    concerns: Option<crate::store::Concern>,
}

impl Failure {
    /// One line, whatever the source said (backends quote whole XML error bodies).
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        let message = message.into();
        Failure {
            code,
            message: message.split_whitespace().collect::<Vec<_>>().join(" "),
            concerns: None,
        }
    }

    /// The failure about `concern`: the message then says where that setting came from.
    pub fn concerning(mut self, concern: Option<crate::store::Concern>) -> Failure {
        self.concerns = concern;
        self
    }

    /// Appends where the setting this failure is about came from (flag, variable, file,
    /// default), so the operator knows what to change.
    fn with_origin(mut self, settings: &Settings) -> Failure {
        let note = match self.concerns.take() {
            Some(crate::store::Concern::Archive) => settings.archive_note(),
            Some(crate::store::Concern::KeyFile) => settings.key_note(),
            None => return self,
        };
        self.message = format!("{}; {note}", self.message);
        self
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Failure {
        let code = match e.class() {
            crate::store::Class::Misconfigured => exit::USAGE,
            crate::store::Class::Refused => exit::ABSENT_OR_REFUSED,
            crate::store::Class::Damaged => exit::DAMAGED,
            crate::store::Class::Unavailable => exit::UNAVAILABLE,
        };
        Failure::new(code, e.to_string()).concerning(e.concerns())
    }
}

fn init_logging(verbose: u8, daemon: bool, format: LogFormat) {
    // fuser warns about every request it answers with ENOSYS (xattrs, say): not ours to report.
    // A daemon (the mount) says what it does; one-shot commands only what goes wrong.
    let default = match (verbose, daemon) {
        (0, false) => "warn,fuser=error",
        (0, true) | (1, _) => "info,fuser=error",
        _ => "debug",
    };
    // A WALFS_LOG that does not parse is said, once logging works, not silently replaced.
    let mut bad_filter = None;
    let filter = match std::env::var("WALFS_LOG") {
        Ok(v) if !v.trim().is_empty() => {
            tracing_subscriber::EnvFilter::try_new(&v).unwrap_or_else(|e| {
                bad_filter = Some((v, e.to_string()));
                tracing_subscriber::EnvFilter::new(default)
            })
        }
        _ => tracing_subscriber::EnvFilter::new(default),
    };
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // Nothing logs key material: keys are only ever named by their id.
    let _ = match format {
        LogFormat::Json => fmt.json().try_init(),
        LogFormat::Text => fmt
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
    };
    if let Some((v, e)) = bad_filter {
        tracing::warn!(
            "WALFS_LOG={v:?} is not a log filter ({e}); logging as by default ({default}). \
             Fix or unset WALFS_LOG: e.g. WALFS_LOG=info, or WALFS_LOG=info,walfs::ahead=debug"
        );
    }
}

/// clap's message for a bad value names the flag even when the value came from its
/// environment variable: then say which variable to fix.
fn env_origin_of(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let long = arg.split_whitespace().next()?.strip_prefix("--")?;
    let flag = format!("--{long}");
    if std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}="))) {
        return None;
    }
    let cmd = <Cli as clap::CommandFactory>::command();
    let env = std::iter::once(&cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))?
        .get_env()?
        .to_string_lossy()
        .into_owned();
    std::env::var_os(&env)?;
    Some(format!(
        "walfs: that value of --{long} came from {env} in the environment (for a systemd unit: \
         its /etc/walfs/*.env file): fix or unset {env}"
    ))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // A restore_command mistyped (`walfs fecth`, a missing %p) must not read as
            // "absent" to a recovering server either.
            let fetching = std::env::args().any(|a| a == "fetch");
            let from_env = env_origin_of(&e);
            if e.use_stderr() && fetching && restore_role().is_some_and(|r| r.may_end_recovery()) {
                let _ = e.print();
                if let Some(note) = &from_env {
                    eprintln!("{note}");
                }
                return ExitCode::from(exit::FATAL + exit::USAGE);
            }
            if let Some(note) = from_env {
                let _ = e.print();
                eprintln!("{note}");
                return ExitCode::from(exit::USAGE);
            }
            e.exit();
        }
    };
    let daemon = matches!(cli.command, Command::Mount(_) | Command::Receive(_));
    if !daemon {
        // A reader that stops early (`walfs ls | head`) ends a one-shot command quietly, as
        // it ends cat or ls, instead of a panic on the broken pipe. Daemons keep ignoring
        // SIGPIPE: they write to sockets.
        // SAFETY: setting a signal's disposition to its default before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(cli.global.verbose, daemon, cli.global.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("walfs: cannot start the async runtime: {e}");
            return ExitCode::from(exit::UNAVAILABLE);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("walfs: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let g = cli.global;
    let overrides = Overrides {
        config: g.config,
        archive_origin: flag_or_env("--archive"),
        archive: g.archive,
        key_file_origin: flag_or_env("--key-file"),
        key_file: g.key_file,
        cache_dir: g.cache_dir,
        compression_level: g.compression_level,
        retry_timeout: g.retry_timeout,
        cache_size: g.cache_size,
        recovery_timeout: g.recovery_timeout,
        standby_timeout: g.standby_timeout,
    };
    match &cli.command {
        Command::Keygen { path } => return keygen(path),
        Command::GenerateAssets { dir } => return assets::generate(dir),
        _ => {}
    }
    let settings =
        Settings::resolve(&overrides).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    dispatch(cli.command, &settings)
        .await
        .map_err(|f| f.with_origin(&settings))
}

/// Flag or environment: clap resolves a flag over its variable, so a value present without
/// the flag on the command line came from the variable.
fn flag_or_env(long: &str) -> config::Origin {
    let eq = format!("{long}=");
    let on_line = std::env::args_os()
        .take_while(|a| a != "--")
        .any(|a| a == long || a.to_string_lossy().starts_with(&eq));
    if on_line {
        config::Origin::Flag
    } else {
        config::Origin::Env
    }
}

async fn dispatch(command: Command, settings: &Settings) -> Result<(), Failure> {
    let settings = settings.clone();
    match command {
        Command::Keygen { .. } | Command::GenerateAssets { .. } => Ok(()),
        Command::Key(KeyCommand::Rotate) => {
            let archive = open_archive(&settings, false)?;
            let (old, new) = archive.rotate_key().await?;
            println!(
                "archive key is now {new} (was {old}); objects sealed with {old} need a key file \
                 that still holds it: `walfs verify --deep` counts objects by key"
            );
            Ok(())
        }
        Command::Push { path, name } => push(&settings, &path, name.as_deref()).await,
        Command::Fetch { name, dest } => fetch(&settings, &name, &dest).await,
        Command::Ls { json, snapshots } => ls(&settings, json, snapshots).await,
        Command::Mount(args) => mount::run(&settings, &args).await,
        Command::Status { json } => ops::status(&settings, json).await,
        Command::Verify {
            from,
            to,
            deep,
            json,
        } => ops::verify(&settings, from.as_deref(), to.as_deref(), deep, json).await,
        Command::Delete {
            before,
            older_than,
            retain,
            retain_for,
            incomplete_after,
            confirm,
            json,
        } => {
            let args = ops::DeleteArgs {
                before: before.as_deref(),
                older_than,
                retain,
                retain_for,
                incomplete_after,
                confirm,
                json,
            };
            ops::delete(&settings, args).await
        }
        Command::Import {
            dir,
            concurrency,
            json,
        } => ops::import(&settings, &dir, usize::from(concurrency), json).await,
        Command::Receive(args) => receive(&settings, &args).await,
        Command::Backup(args) => backup::run(&settings, &args).await,
        Command::Check(args) => check::run(&settings, &args).await,
        Command::Restore(args) => backup::restore(&settings, &args).await,
    }
}

/// Reads the key file: refused when anyone but its owner (and, for a root-owned file, its
/// group) may read it, as libpq refuses a private key others can read.
fn load_keys(settings: &Settings) -> Result<Option<Keyring>, Failure> {
    use std::os::unix::fs::MetadataExt;
    let Some(path) = &settings.key_file else {
        return Ok(None);
    };
    let fail = |why: String| {
        Failure::new(exit::USAGE, format!("key file {}: {why}", path.display()))
            .concerning(Some(crate::store::Concern::KeyFile))
    };
    let file = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let meta = file.metadata().map_err(|e| fail(e.to_string()))?;
    let mode = meta.mode() & 0o777;
    let group_ok = meta.uid() == 0 && mode & 0o030 == 0;
    if mode & 0o007 != 0 || (mode & 0o070 != 0 && !group_ok) {
        return Err(fail(format!(
            "mode {mode:04o} lets others read the archive's key; chmod 600 it (or 640 with \
             owner root, to share it with one group)"
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    Keyring::from_file_contents(&bytes)
        .map(Some)
        .map_err(|e| fail(e.to_string()))
}

pub(crate) fn open_archive(settings: &Settings, create: bool) -> Result<Archive, Failure> {
    let key = load_keys(settings)?;
    let cfg = StoreConfig {
        url: settings.archive.clone(),
        retry_timeout: settings.retry_timeout,
        create,
    };
    let seal = SealOptions {
        level: settings.compression_level,
        ..SealOptions::default()
    };
    Ok(Archive::open(&cfg, key, seal)?)
}

fn keygen(path: &Path) -> Result<(), Failure> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail =
        |e: std::io::Error| Failure::new(exit::USAGE, format!("keygen {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    let key = Key::generate().map_err(fail)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Failure::new(
                    exit::USAGE,
                    format!(
                        "{} exists; refusing to overwrite a key (objects sealed with it would be lost)",
                        path.display()
                    ),
                )
            } else {
                fail(e)
            }
        })?;
    f.write_all(key.to_file_line().as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)?;
    sync_parent(path).map_err(fail)?;
    println!("key id {}", key.id());
    eprintln!(
        "Keep a copy of {} somewhere else (a password manager, a safe, another host): without \
         it nothing sealed with it can ever be read again.",
        path.display()
    );
    Ok(())
}

fn parse_name(name: &str) -> Result<ArchiveName, Failure> {
    ArchiveName::parse(name).map_err(|e| Failure::new(exit::USAGE, e.to_string()))
}

async fn push(settings: &Settings, path: &Path, name: Option<&str>) -> Result<(), Failure> {
    let file_name = match name {
        Some(n) => n.to_string(),
        None => path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let name = parse_name(&file_name)?;
    let (file, size) = crate::store::open_local(path).map_err(|e| {
        Failure::new(
            exit::UNAVAILABLE,
            format!("reading {}: {e}", path.display()),
        )
    })?;
    let archive = open_archive(settings, true)?;
    match archive.push_file(&name, file, size).await? {
        PushOutcome::Stored { stored_bytes } => {
            tracing::info!(%name, size, stored_bytes, archive = archive.url(), "archived");
        }
        PushOutcome::AlreadyArchived => {
            tracing::info!(%name, "already archived with identical content");
        }
    }
    Ok(())
}

/// What this process's caller is doing (restore_command runs in the data directory).
fn restore_role() -> Option<Role> {
    Some(Proc::default().role(std::process::id()))
}

/// The restore policy the settings describe. `empty_if_new`: a read-write mount, where an
/// archive without identity is new and empty.
pub(crate) fn restore_policy(settings: &Settings, empty_if_new: bool) -> Policy {
    Policy {
        recovery_timeout: settings.recovery_timeout.bound(),
        standby_timeout: settings.standby_timeout,
        other_timeout: settings.retry_timeout,
        empty_if_new,
    }
}

/// `walfs fetch`: exit 0 with `dest` complete, 1 only when the archive says the file is not
/// there; for a server in archive recovery every other failure exits above 125 (FATAL).
async fn fetch(settings: &Settings, name: &str, dest: &Path) -> Result<(), Failure> {
    let procs = Proc::default();
    let pid = std::process::id();
    fetch_under_policy(settings, name, dest, &procs, pid)
        .await
        .map_err(|mut f| {
            let ends_recovery = || procs.role(pid).may_end_recovery();
            if f.code != exit::ABSENT_OR_REFUSED && f.code < exit::FATAL && ends_recovery() {
                f.code += exit::FATAL;
            }
            f
        })
}

async fn fetch_under_policy(
    settings: &Settings,
    name: &str,
    dest: &Path,
    procs: &Proc,
    pid: u32,
) -> Result<(), Failure> {
    let name = parse_name(name)?;
    let archive = open_archive(settings, false)?;
    let local = |e: std::io::Error| Trouble {
        class: crate::store::Class::Unavailable,
        no_archive: false,
        message: format!("writing {}: {e}", dest.display()),
        concerns: None,
    };
    // Decoded straight into a temp file beside the destination; renamed into place only once
    // every chunk authenticated and the data is on disk.
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let attempt = || async {
        let tmp = tempfile::Builder::new()
            .prefix(".walfs-fetch-")
            .tempfile_in(dir)
            .map_err(local)?;
        let out = tmp.as_file().try_clone().map_err(local)?;
        match archive
            .fetch_into(&name, out, None, crate::envelope::Priority::Reader)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(None),
            Err(e) => return Err(Trouble::from(&e)),
        }
        let dest_path = dest.to_path_buf();
        tokio::task::spawn_blocking(move || {
            tmp.as_file().sync_all()?;
            tmp.persist(&dest_path).map_err(|e| e.error)?;
            sync_parent(&dest_path)
        })
        .await
        .map_err(|e| local(std::io::Error::other(e.to_string())))?
        .map_err(local)?;
        Ok(Some(()))
    };
    match restore_policy(settings, false)
        .read(procs, pid, name.as_str(), archive.received(), attempt)
        .await
    {
        Ok(Some(())) => Ok(()),
        Ok(None) => Err(Failure::new(
            exit::ABSENT_OR_REFUSED,
            format!("{name} is not in the archive"),
        )),
        Err(r) => {
            let code = match r.class {
                crate::store::Class::Unavailable => exit::UNAVAILABLE,
                crate::store::Class::Damaged => exit::DAMAGED,
                crate::store::Class::Misconfigured | crate::store::Class::Refused => exit::USAGE,
            };
            Err(Failure::new(code, r.message).concerning(r.concerns))
        }
    }
}

async fn receive(settings: &Settings, args: &ReceiveArgs) -> Result<(), Failure> {
    use crate::receive::{conn::ConnParams, ReceiveOptions, Receiver};
    let conn = ConnParams::resolve(args.dbname.as_deref(), &args.application_name)
        .map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let archive = std::sync::Arc::new(open_archive(settings, true)?);
    archive.probe().await?;
    if let Some(addr) = args.metrics_addr {
        crate::telemetry::serve_metrics(addr).map_err(|e| Failure::new(exit::USAGE, e))?;
        let archive = archive.clone();
        tokio::spawn(async move { crate::telemetry::read_newest_archived(&archive).await });
    }
    let spool_dir = crate::spool::spool_dir(&crate::cache::Cache::archive_dir(
        &settings.cache_dir,
        &settings.archive,
    ));
    let opts = ReceiveOptions {
        conn,
        slot: args.slot.clone(),
        create_slot: args.create_slot,
        synchronous: args.synchronous,
        status_interval: args
            .status_interval
            .max(std::time::Duration::from_millis(100)),
        partial_upload_interval: Some(args.partial_upload_interval).filter(|d| !d.is_zero()),
        spool_dir,
    };
    let receiver =
        Receiver::new(archive, opts).map_err(|e| Failure::new(exit::USAGE, e.to_string()))?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping: flushing and uploading what is spooled");
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        let _ = tx.send(true);
    });
    receiver
        .run(rx)
        .await
        .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))
}

fn sync_parent(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)?.sync_all()
}

#[derive(serde::Serialize)]
struct LsRow {
    name: String,
    size: u64,
    stored_size: u64,
    modified: i64,
}

async fn ls(settings: &Settings, json: bool, snapshots: bool) -> Result<(), Failure> {
    let archive = open_archive(settings, false)?;
    if snapshots {
        let snaps = archive.snapshots().await?;
        if json {
            let rows: Vec<_> = snaps
                .iter()
                .map(|s| serde_json::json!({"object": format!("receiver/{s}"), "segment": s.segment.as_str(), "end": s.end}))
                .collect();
            return ops::json_out(&rows);
        }
        for s in snaps {
            println!("receiver/{s}\t{}\t{}", s.segment, s.end);
        }
        return Ok(());
    }
    let segment_size = archive.identity().await?.map(|i| i.wal_segment_size);
    // Local directories list in directory order: sort (names only, a few MB for 100,000).
    let mut entries: Vec<_> = archive.list(None).try_collect().await?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    let archive = &archive;
    // Segments have the archive's segment size; other files need their header (small reads,
    // a few at a time).
    let rows = futures::stream::iter(entries).map(move |e| async move {
        let size = match (e.name.kind(), segment_size) {
            (FileKind::Segment, Some(s)) => s,
            _ => archive
                .header(&e.name)
                .await?
                .map_or(0, |h| h.plaintext_len),
        };
        Ok::<_, StoreError>(LsRow {
            name: e.name.to_string(),
            size,
            stored_size: e.stored_bytes,
            modified: e.last_modified,
        })
    });
    let mut rows = rows.buffered(16);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let io =
        |e: std::io::Error| Failure::new(exit::UNAVAILABLE, format!("writing the listing: {e}"));
    let mut first = true;
    if json {
        write!(out, "[").map_err(io)?;
    }
    while let Some(row) = rows.try_next().await? {
        if json {
            let sep = if first { "" } else { "," };
            let text = serde_json::to_string(&row)
                .map_err(|e| Failure::new(exit::UNAVAILABLE, e.to_string()))?;
            write!(out, "{sep}\n  {text}").map_err(io)?;
        } else {
            writeln!(out, "{}\t{}\t{}", row.name, row.size, row.stored_size).map_err(io)?;
        }
        first = false;
    }
    if json {
        writeln!(out, "{}]", if first { "" } else { "\n" }).map_err(io)?;
    }
    out.flush().map_err(io)
}
