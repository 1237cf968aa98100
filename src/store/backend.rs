//! Building an `ObjectStore` from a URL, each cloud behind its cargo feature.
//!
//! A cloud client's requests time out after `retry-timeout` (5 s to 60 s): quick to notice a
//! dead store. A large object needs longer on a slow link, so [`Backend::for_size`] hands out
//! clients whose timeout grows with the transfer (at least [`MIN_RATE`] bytes a second),
//! built once per power-of-two timeout.
use super::{Error, StoreConfig};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The slowest link a transfer is given time for: 512 KiB/s.
pub const MIN_RATE: u64 = 512 << 10;

type Make = Box<dyn Fn(Duration) -> Result<Arc<dyn ObjectStore>, Error> + Send + Sync>;

/// Clients with longer request timeouts, built on demand.
struct Scaled {
    /// The request timeout of the base client.
    base: Duration,
    make: Make,
    /// By timeout in seconds.
    built: Mutex<HashMap<u64, Arc<dyn ObjectStore>>>,
}

/// The archive's store, and how to get one with a longer request timeout.
pub(super) struct Backend {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    /// Cloud backends only.
    scaled: Option<Scaled>,
}

impl Backend {
    pub fn fixed(store: Arc<dyn ObjectStore>, prefix: Path) -> Backend {
        Backend {
            store,
            prefix,
            scaled: None,
        }
    }

    /// A client whose requests may take as long as moving `bytes` at [`MIN_RATE`] needs.
    pub fn for_size(&self, bytes: u64) -> Arc<dyn ObjectStore> {
        let Some(Scaled { base, make, built }) = &self.scaled else {
            return self.store.clone();
        };
        let needed = base.as_secs() + bytes / MIN_RATE;
        if needed <= base.as_secs() {
            return self.store.clone();
        }
        let secs = needed.next_power_of_two();
        let mut built = built.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = built.get(&secs) {
            return s.clone();
        }
        match make(Duration::from_secs(secs)) {
            Ok(s) => {
                built.insert(secs, s.clone());
                s
            }
            // Built once already with the same settings; cannot fail now, but never panic.
            Err(_) => self.store.clone(),
        }
    }
}

pub(super) fn build(cfg: &StoreConfig) -> Result<Backend, Error> {
    let raw = cfg.url.trim();
    if raw.starts_with('/') {
        return local(std::path::Path::new(raw), cfg.create);
    }
    let url = url::Url::parse(raw).map_err(|e| {
        Error::Config(format!(
            "archive URL {raw:?} does not parse ({e}); use file:///path, s3://bucket/prefix, \
             gs://bucket/prefix or az://container/prefix"
        ))
    })?;
    let prefix = || {
        Path::parse(url.path().trim_matches('/'))
            .map_err(|e| Error::Config(format!("archive URL {raw}: bad prefix: {e}")))
    };
    match url.scheme() {
        "file" => {
            let dir = url
                .to_file_path()
                .map_err(|_| Error::Config(format!("{raw} is not a local path")))?;
            local(&dir, cfg.create)
        }
        "s3" | "s3a" => cloud(url.clone(), cfg, prefix()?, s3),
        "gs" => cloud(url.clone(), cfg, prefix()?, gcs),
        "az" | "azure" | "abfs" => cloud(url.clone(), cfg, prefix()?, azure),
        other => Err(Error::Config(format!(
            "unsupported archive URL scheme {other:?} in {raw}; use file://, s3://, gs:// or az://"
        ))),
    }
}

type Builder = fn(&url::Url, &StoreConfig, Duration) -> Result<Arc<dyn ObjectStore>, Error>;

/// A cloud backend: a client with the base request timeout, and a way to build slower ones.
fn cloud(url: url::Url, cfg: &StoreConfig, prefix: Path, build: Builder) -> Result<Backend, Error> {
    let base = request_timeout(cfg);
    let store = build(&url, cfg, base)?;
    let cfg = cfg.clone();
    Ok(Backend {
        store,
        prefix,
        scaled: Some(Scaled {
            base,
            make: Box::new(move |t| build(&url, &cfg, t)),
            built: Mutex::new(HashMap::new()),
        }),
    })
}

/// One request's time limit: `retry-timeout`, between 5 s and 60 s.
fn request_timeout(cfg: &StoreConfig) -> Duration {
    cfg.retry_timeout
        .clamp(Duration::from_secs(5), Duration::from_secs(60))
}

fn local(dir: &std::path::Path, create: bool) -> Result<Backend, Error> {
    if create {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::Config(format!(
                "cannot create the archive directory {}: {e}",
                dir.display()
            ))
        })?;
    } else if !dir.is_dir() {
        return Err(Error::NoArchive(format!("file://{}", dir.display())));
    }
    // fsync file and directories on every write: a push is durable when it returns.
    let fs = LocalFileSystem::new_with_prefix(dir)
        .map_err(|e| Error::Config(format!("archive directory {}: {e}", dir.display())))?
        .with_fsync(true);
    Ok(Backend::fixed(Arc::new(fs), Path::default()))
}

#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
fn retry(cfg: &StoreConfig) -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: std::time::Duration::from_millis(100),
            max_backoff: std::time::Duration::from_secs(5),
            base: 2.0,
        },
        // The time budget is the bound; the count only has to be large enough not to be.
        max_retries: 1000,
        retry_timeout: cfg.retry_timeout,
    }
}

/// Per-request timeouts, set as config keys so the client settings the environment gives
/// (proxies, `*_ALLOW_HTTP`, certificates) are kept.
#[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
fn client_timeouts(attempt: Duration) -> [(object_store::ClientConfigKey, String); 2] {
    [
        (
            object_store::ClientConfigKey::ConnectTimeout,
            "5s".to_string(),
        ),
        (
            object_store::ClientConfigKey::Timeout,
            format!("{}ms", attempt.as_millis()),
        ),
    ]
}

#[cfg(not(all(feature = "s3", feature = "gcs", feature = "azure")))]
fn disabled(scheme: &str, feature: &str) -> Error {
    Error::Config(format!(
        "this walfs was built without {scheme}:// support (cargo feature {feature:?})"
    ))
}

#[cfg(feature = "s3")]
fn s3(url: &url::Url, cfg: &StoreConfig, timeout: Duration) -> Result<Arc<dyn ObjectStore>, Error> {
    use object_store::aws::AmazonS3Builder;
    use object_store::aws::AmazonS3ConfigKey;
    let mut b = AmazonS3Builder::from_env()
        .with_url(url.as_str())
        .with_retry(retry(cfg));
    for (k, v) in client_timeouts(timeout) {
        b = b.with_config(AmazonS3ConfigKey::Client(k), v);
    }
    // An S3-compatible server on plain http (a local test server, a LAN appliance).
    let endpoint = std::env::var("AWS_ENDPOINT_URL")
        .or_else(|_| std::env::var("AWS_ENDPOINT"))
        .unwrap_or_default();
    if endpoint.starts_with("http://") {
        b = b.with_allow_http(true);
    }
    let s = b
        .build()
        .map_err(|e| Error::Config(format!("S3 archive {url}: {e}")))?;
    Ok(Arc::new(s))
}
#[cfg(not(feature = "s3"))]
fn s3(_: &url::Url, _: &StoreConfig, _: Duration) -> Result<Arc<dyn ObjectStore>, Error> {
    Err(disabled("s3", "s3"))
}

#[cfg(feature = "gcs")]
fn gcs(
    url: &url::Url,
    cfg: &StoreConfig,
    timeout: Duration,
) -> Result<Arc<dyn ObjectStore>, Error> {
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let mut b = GoogleCloudStorageBuilder::from_env()
        .with_url(url.as_str())
        .with_retry(retry(cfg));
    for (k, v) in client_timeouts(timeout) {
        b = b.with_config(GoogleConfigKey::Client(k), v);
    }
    // A GCS-compatible server on plain http (a local emulator).
    if std::env::var("GOOGLE_BASE_URL").is_ok_and(|u| u.starts_with("http://")) {
        b = b.with_config(
            GoogleConfigKey::Client(object_store::ClientConfigKey::AllowHttp),
            "true",
        );
    }
    let s = b
        .build()
        .map_err(|e| Error::Config(format!("GCS archive {url}: {e}")))?;
    Ok(Arc::new(s))
}
#[cfg(not(feature = "gcs"))]
fn gcs(_: &url::Url, _: &StoreConfig, _: Duration) -> Result<Arc<dyn ObjectStore>, Error> {
    Err(disabled("gs", "gcs"))
}

#[cfg(feature = "azure")]
fn azure(
    url: &url::Url,
    cfg: &StoreConfig,
    timeout: Duration,
) -> Result<Arc<dyn ObjectStore>, Error> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut b = MicrosoftAzureBuilder::from_env()
        .with_url(url.as_str())
        .with_retry(retry(cfg));
    for (k, v) in client_timeouts(timeout) {
        b = b.with_config(AzureConfigKey::Client(k), v);
    }
    let s = b
        .build()
        .map_err(|e| Error::Config(format!("Azure archive {url}: {e}")))?;
    Ok(Arc::new(s))
}
#[cfg(not(feature = "azure"))]
fn azure(_: &url::Url, _: &StoreConfig, _: Duration) -> Result<Arc<dyn ObjectStore>, Error> {
    Err(disabled("az", "azure"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;

    #[test]
    fn large_transfers_get_clients_with_longer_timeouts() {
        let made = Arc::new(Mutex::new(Vec::new()));
        let m = made.clone();
        let make: Make = Box::new(move |t| {
            m.lock().unwrap().push(t);
            Ok(Arc::new(InMemory::new()) as Arc<dyn ObjectStore>)
        });
        let b = Backend {
            store: Arc::new(InMemory::new()),
            prefix: Path::default(),
            scaled: Some(Scaled {
                base: Duration::from_secs(10),
                make,
                built: Mutex::new(HashMap::new()),
            }),
        };
        let base = b.store.clone();
        assert!(
            Arc::ptr_eq(&b.for_size(100 << 10), &base),
            "small: the base client"
        );
        let a = b.for_size(16 << 20); // 10 s + 32 s at 512 KiB/s: a 64 s client
        assert!(
            Arc::ptr_eq(&a, &b.for_size(15 << 20)),
            "one client per timeout"
        );
        b.for_size(1 << 30); // 10 s + 2048 s: 4096 s
        assert_eq!(
            *made.lock().unwrap(),
            [Duration::from_secs(64), Duration::from_secs(4096)]
        );
        let local = Backend::fixed(Arc::new(InMemory::new()), Path::default());
        assert!(Arc::ptr_eq(&local.for_size(1 << 30), &local.store));
    }
}
