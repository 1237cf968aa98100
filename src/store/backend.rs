//! Building an `ObjectStore` from a URL, each cloud behind its cargo feature.
use super::{Error, StoreConfig};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::ObjectStore;
use std::sync::Arc;

pub(super) fn build(cfg: &StoreConfig) -> Result<(Arc<dyn ObjectStore>, Path), Error> {
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
        "s3" | "s3a" => Ok((s3(&url, cfg)?, prefix()?)),
        "gs" => Ok((gcs(&url, cfg)?, prefix()?)),
        "az" | "azure" | "abfs" => Ok((azure(&url, cfg)?, prefix()?)),
        other => Err(Error::Config(format!(
            "unsupported archive URL scheme {other:?} in {raw}; use file://, s3://, gs:// or az://"
        ))),
    }
}

fn local(dir: &std::path::Path, create: bool) -> Result<(Arc<dyn ObjectStore>, Path), Error> {
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
    Ok((Arc::new(fs), Path::default()))
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
fn client_timeouts(cfg: &StoreConfig) -> [(object_store::ClientConfigKey, String); 2] {
    let attempt = cfg.retry_timeout.clamp(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_secs(60),
    );
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
fn s3(url: &url::Url, cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    use object_store::aws::AmazonS3Builder;
    use object_store::aws::AmazonS3ConfigKey;
    let mut b = AmazonS3Builder::from_env()
        .with_url(url.as_str())
        .with_retry(retry(cfg));
    for (k, v) in client_timeouts(cfg) {
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
fn s3(_: &url::Url, _: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    Err(disabled("s3", "s3"))
}

#[cfg(feature = "gcs")]
fn gcs(url: &url::Url, cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let mut b = GoogleCloudStorageBuilder::from_env()
        .with_url(url.as_str())
        .with_retry(retry(cfg));
    for (k, v) in client_timeouts(cfg) {
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
fn gcs(_: &url::Url, _: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    Err(disabled("gs", "gcs"))
}

#[cfg(feature = "azure")]
fn azure(url: &url::Url, cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut b = MicrosoftAzureBuilder::from_env()
        .with_url(url.as_str())
        .with_retry(retry(cfg));
    for (k, v) in client_timeouts(cfg) {
        b = b.with_config(AzureConfigKey::Client(k), v);
    }
    let s = b
        .build()
        .map_err(|e| Error::Config(format!("Azure archive {url}: {e}")))?;
    Ok(Arc::new(s))
}
#[cfg(not(feature = "azure"))]
fn azure(_: &url::Url, _: &StoreConfig) -> Result<Arc<dyn ObjectStore>, Error> {
    Err(disabled("az", "azure"))
}
