//! Settings: a TOML file < `WALFS_*` environment variables < command-line flags.
//!
//! clap resolves flag > environment; this module fills what both left open from the file, then
//! from the defaults.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SYSTEM_CONFIG: &str = "/etc/walfs/walfs.toml";

/// The keys a config file may hold (all optional). Unknown keys are an error: a typo must not
/// silently fall back to a default archive.
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileSettings {
    pub archive: Option<String>,
    pub key_file: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub compression_level: Option<i32>,
    /// A duration such as "90s" or "5m".
    pub retry_timeout: Option<String>,
    /// Bytes of plaintext the local cache keeps, such as "2GiB".
    pub cache_size: Option<String>,
    /// How long a recovering server's restore waits for the store ("10min", or "forever").
    pub recovery_timeout: Option<String>,
    /// How long a standby's restore waits for the store before it streams instead.
    pub standby_timeout: Option<String>,
}

/// Where a setting's value came from, so a refusal can say what to change.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A command-line flag.
    Flag,
    /// A `WALFS_*` environment variable (for a systemd unit, its environment file).
    Env,
    /// The config file.
    File(PathBuf),
    /// Nothing set it.
    #[default]
    Default,
}

/// What flags and environment gave (None where neither did).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub archive: Option<String>,
    /// Flag or Env, when `archive` is set.
    pub archive_origin: Origin,
    pub key_file: Option<PathBuf>,
    /// Flag or Env, when `key_file` is set.
    pub key_file_origin: Origin,
    pub cache_dir: Option<PathBuf>,
    pub compression_level: Option<i32>,
    pub retry_timeout: Option<Duration>,
    pub cache_size: Option<u64>,
    pub recovery_timeout: Option<Wait>,
    pub standby_timeout: Option<Duration>,
}

/// A bound on waiting, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    For(Duration),
    Forever,
}

impl Wait {
    pub fn bound(self) -> Option<Duration> {
        match self {
            Wait::For(d) => Some(d),
            Wait::Forever => None,
        }
    }
}

/// The settings in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub archive: String,
    pub key_file: Option<PathBuf>,
    pub cache_dir: PathBuf,
    pub compression_level: i32,
    pub retry_timeout: Duration,
    pub cache_size: u64,
    pub recovery_timeout: Wait,
    pub standby_timeout: Duration,
    /// The config file that was read, if any.
    pub config_file: Option<PathBuf>,
    /// Where `archive` came from.
    pub archive_origin: Origin,
    /// Where `key_file` came from (Default: no key file).
    pub key_file_origin: Origin,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {why}")]
    File { path: PathBuf, why: String },
    #[error("{0}")]
    Invalid(String),
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn home_dir(var: &str, fallback: &str) -> PathBuf {
    match std::env::var_os(var).filter(|v| !v.is_empty()) {
        Some(v) => PathBuf::from(v),
        None => {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into())).join(fallback)
        }
    }
}

/// The system-wide archive directory, shared by root (the mount) and the postgres user
/// (archive_command) once it exists.
pub const SYSTEM_ARCHIVE: &str = "/var/lib/walfs/archive";

/// The embedded default: a local directory.
pub fn default_archive() -> String {
    if is_root() || Path::new(SYSTEM_ARCHIVE).is_dir() {
        "file:///var/lib/walfs/archive".into()
    } else {
        let dir = home_dir("XDG_DATA_HOME", ".local/share").join("walfs/archive");
        format!("file://{}", dir.display())
    }
}

pub fn default_cache_dir() -> PathBuf {
    if is_root() {
        PathBuf::from("/var/cache/walfs")
    } else {
        home_dir("XDG_CACHE_HOME", ".cache").join("walfs")
    }
}

/// Parses a byte count: `1073741824`, `512MiB`, `2G` (binary units either way).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; try 2GiB or 512MiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?}; use KiB, MiB, GiB or TiB"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{s:?} is not a duration ({e}); try 90s or 5m"))
}

/// A duration, or `forever` (also `infinity`, `none`): no bound.
pub fn parse_wait(s: &str) -> Result<Wait, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "forever" | "infinity" | "none" => Ok(Wait::Forever),
        _ => parse_duration(s).map(Wait::For),
    }
}

fn read_file(path: &Path) -> Result<FileSettings, ConfigError> {
    let err = |why: String| ConfigError::File {
        path: path.to_path_buf(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(match e.kind() {
            std::io::ErrorKind::NotFound => {
                "not found: fix --config or WALFS_CONFIG, or unset it".to_string()
            }
            // Every user of walfs reads it: root's mount, postgres's archive_command.
            std::io::ErrorKind::PermissionDenied => format!(
                "{e}: every walfs user reads the config (root, postgres): chmod 0644 it, and \
                 keep secrets in the key file and environment files instead"
            ),
            _ => e.to_string(),
        })
    })?;
    toml::from_str(&text).map_err(|e| err(e.to_string().trim().replace('\n', " ")))
}

impl Settings {
    /// Resolves the settings. An explicitly named config file must exist; the system one is
    /// read only when present.
    pub fn resolve(o: &Overrides) -> Result<Settings, ConfigError> {
        let (file, config_file) = match &o.config {
            Some(p) => (read_file(p)?, Some(p.clone())),
            None if Path::new(SYSTEM_CONFIG).exists() => {
                let p = PathBuf::from(SYSTEM_CONFIG);
                (read_file(&p)?, Some(p))
            }
            None => (FileSettings::default(), None),
        };
        // A flag or variable wins; else the file's value (parsed, errors naming the key);
        // else the default.
        fn pick<T: Copy>(
            flag: Option<T>,
            file: &Option<String>,
            key: &str,
            parse: fn(&str) -> Result<T, String>,
            default: T,
            config_file: &Option<PathBuf>,
        ) -> Result<T, ConfigError> {
            match (flag, file) {
                (Some(v), _) => Ok(v),
                (None, Some(s)) => parse(s).map_err(|why| ConfigError::File {
                    path: config_file.clone().unwrap_or_default(),
                    why: format!("{key}: {why}"),
                }),
                (None, None) => Ok(default),
            }
        }
        let retry_timeout = pick(
            o.retry_timeout,
            &file.retry_timeout,
            "retry-timeout",
            parse_duration,
            Duration::from_secs(60),
            &config_file,
        )?;
        let cache_size = pick(
            o.cache_size,
            &file.cache_size,
            "cache-size",
            parse_size,
            1 << 30,
            &config_file,
        )?;
        let recovery_timeout = pick(
            o.recovery_timeout,
            &file.recovery_timeout,
            "recovery-timeout",
            parse_wait,
            Wait::For(Duration::from_secs(600)),
            &config_file,
        )?;
        let standby_timeout = pick(
            o.standby_timeout,
            &file.standby_timeout,
            "standby-timeout",
            parse_duration,
            Duration::from_secs(5),
            &config_file,
        )?;
        let compression_level = o.compression_level.or(file.compression_level).unwrap_or(3);
        if !(0..=22).contains(&compression_level) {
            let from = match (o.compression_level, &config_file) {
                (None, Some(p)) => format!("`compression-level` in {}", p.display()),
                _ => "--compression-level or WALFS_COMPRESSION_LEVEL".to_string(),
            };
            return Err(ConfigError::Invalid(format!(
                "compression level {compression_level} (from {from}) is outside 0 (off) to 22"
            )));
        }
        let from_file = || Origin::File(config_file.clone().unwrap_or_default());
        let archive_origin = match (&o.archive, &file.archive) {
            (Some(_), _) => o.archive_origin.clone(),
            (None, Some(_)) => from_file(),
            (None, None) => Origin::Default,
        };
        let key_file_origin = match (&o.key_file, &file.key_file) {
            (Some(_), _) => o.key_file_origin.clone(),
            (None, Some(_)) => from_file(),
            (None, None) => Origin::Default,
        };
        Ok(Settings {
            archive: o
                .archive
                .clone()
                .or(file.archive)
                .unwrap_or_else(default_archive),
            key_file: o.key_file.clone().or(file.key_file),
            archive_origin,
            key_file_origin,
            cache_dir: o
                .cache_dir
                .clone()
                .or(file.cache_dir)
                .unwrap_or_else(default_cache_dir),
            compression_level,
            retry_timeout,
            cache_size,
            recovery_timeout,
            standby_timeout,
            config_file,
        })
    }
}

impl Settings {
    /// Where the archive URL came from, naming what to change: "(archive URL … set by …)".
    pub fn archive_note(&self) -> String {
        let how = match &self.archive_origin {
            Origin::Flag => "given with --archive".to_string(),
            Origin::Env => "set by WALFS_ARCHIVE in the environment (for a systemd unit: in \
                            its /etc/walfs/*.env file)"
                .to_string(),
            Origin::File(p) => format!("set by `archive` in {}", p.display()),
            Origin::Default => format!(
                "walfs's default, since nothing set --archive, WALFS_ARCHIVE or `archive` in \
                 {SYSTEM_CONFIG}"
            ),
        };
        format!("the archive URL {} is {how}", self.archive)
    }

    /// Where the key file came from, or that none is configured, naming what to change.
    pub fn key_note(&self) -> String {
        let Some(path) = &self.key_file else {
            return format!(
                "no key file is configured: set --key-file, WALFS_KEY_FILE or `key-file` in \
                 {SYSTEM_CONFIG}"
            );
        };
        let how = match &self.key_file_origin {
            Origin::Flag => "given with --key-file".to_string(),
            Origin::Env => "set by WALFS_KEY_FILE in the environment (for a systemd unit: in \
                            its /etc/walfs/*.env file)"
                .to_string(),
            Origin::File(p) => format!("set by `key-file` in {}", p.display()),
            Origin::Default => "set".to_string(),
        };
        format!("the key file {} is {how}", path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_beat_file_and_file_beats_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("walfs.toml");
        std::fs::write(
            &p,
            "archive = \"s3://bucket/x\"\nkey-file = \"/k\"\ncompression-level = 9\nretry-timeout = \"2m\"\n",
        )
        .unwrap();
        let mut o = Overrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&o).unwrap();
        assert_eq!(s.archive, "s3://bucket/x");
        assert_eq!(s.key_file, Some(PathBuf::from("/k")));
        assert_eq!(s.compression_level, 9);
        assert_eq!(s.retry_timeout, Duration::from_secs(120));
        assert_eq!(s.recovery_timeout, Wait::For(Duration::from_secs(600)));
        assert_eq!(s.standby_timeout, Duration::from_secs(5));
        std::fs::write(
            &p,
            "recovery-timeout = \"forever\"\nstandby-timeout = \"2s\"\n",
        )
        .unwrap();
        let s = Settings::resolve(&o).unwrap();
        assert_eq!(s.recovery_timeout, Wait::Forever);
        assert_eq!(s.standby_timeout, Duration::from_secs(2));
        std::fs::write(&p, "recovery-timeout = \"soon\"\n").unwrap();
        let e = Settings::resolve(&o).unwrap_err().to_string();
        assert!(e.contains("recovery-timeout"), "{e}");
        std::fs::write(
            &p,
            "archive = \"s3://bucket/x\"\nkey-file = \"/k\"\ncompression-level = 9\nretry-timeout = \"2m\"\n",
        )
        .unwrap();
        o.archive = Some("file:///a".into());
        o.compression_level = Some(1);
        let s = Settings::resolve(&o).unwrap();
        assert_eq!(s.archive, "file:///a");
        assert_eq!(s.compression_level, 1);
    }

    #[test]
    fn refusals_can_name_where_the_archive_and_key_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("walfs.toml");
        std::fs::write(&p, "archive = \"s3://bucket/x\"\n").unwrap();
        let mut o = Overrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let s = Settings::resolve(&o).unwrap();
        assert_eq!(s.archive_origin, Origin::File(p.clone()));
        assert!(
            s.archive_note().contains("`archive` in"),
            "{}",
            s.archive_note()
        );
        assert_eq!(s.key_file_origin, Origin::Default);
        assert!(s.key_note().contains("no key file"), "{}", s.key_note());
        o.archive = Some("file:///a".into());
        o.archive_origin = Origin::Env;
        o.key_file = Some("/k".into());
        o.key_file_origin = Origin::Flag;
        let s = Settings::resolve(&o).unwrap();
        assert!(
            s.archive_note().contains("WALFS_ARCHIVE"),
            "{}",
            s.archive_note()
        );
        assert!(s.key_note().contains("--key-file"), "{}", s.key_note());
        std::fs::write(&p, "").unwrap();
        o.archive = None;
        let s = Settings::resolve(&o).unwrap();
        assert_eq!(s.archive_origin, Origin::Default);
        assert!(s.archive_note().contains("default"), "{}", s.archive_note());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("walfs.toml");
        std::fs::write(&p, "archiv = \"x\"\n").unwrap();
        let o = Overrides {
            config: Some(p.clone()),
            ..Default::default()
        };
        let e = Settings::resolve(&o).unwrap_err().to_string();
        assert!(e.contains("walfs.toml") && e.contains("archiv"), "{e}");
        let missing = Overrides {
            config: Some(dir.path().join("nope.toml")),
            ..Default::default()
        };
        assert!(Settings::resolve(&missing).is_err());
        std::fs::write(&p, "compression-level = 40\n").unwrap();
        assert!(Settings::resolve(&o).is_err());
    }
}
