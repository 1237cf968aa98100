//! TLS for the replication connection, with libpq's `sslmode` meanings:
//! `disable`; `allow`/`prefer` (TLS if the server offers it, no verification; the default);
//! `require` (TLS or fail; verified against `sslrootcert` when one is given, as libpq does);
//! `verify-ca` (certificate chain checked against `sslrootcert`); `verify-full` (and the host
//! name). Unix sockets never use TLS, as with libpq.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn parse(s: &str) -> Result<SslMode, String> {
        match s {
            "disable" => Ok(SslMode::Disable),
            "allow" | "prefer" => Ok(SslMode::Prefer),
            "require" => Ok(SslMode::Require),
            "verify-ca" => Ok(SslMode::VerifyCa),
            "verify-full" => Ok(SslMode::VerifyFull),
            other => Err(format!(
                "sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
            )),
        }
    }
}

/// How to set up TLS for one connection.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub mode: SslMode,
    /// `sslrootcert`: PEM file of trusted certificates.
    pub root_cert: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn roots(path: &Path) -> Result<RootCertStore, String> {
    let mut store = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
        store
            .add(cert)
            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
    }
    if store.is_empty() {
        return Err(format!(
            "sslrootcert {}: no certificate in it",
            path.display()
        ));
    }
    Ok(store)
}

/// Accepts any certificate (libpq's prefer/require without a root certificate) but still
/// checks the handshake signatures, so the session is bound to the key the server showed.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// verify-ca: the chain must lead to a trusted root; the name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The client configuration for `settings`.
pub fn client_config(settings: &TlsSettings) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verify_with_roots = match settings.mode {
        SslMode::VerifyCa | SslMode::VerifyFull => true,
        SslMode::Require => settings.root_cert.is_some(),
        SslMode::Prefer | SslMode::Disable => false,
    };
    let verifier: Arc<dyn ServerCertVerifier> = if verify_with_roots {
        let path = settings.root_cert.clone().ok_or_else(|| {
            "sslmode verify-ca/verify-full needs sslrootcert (or ~/.postgresql/root.crt)"
                .to_string()
        })?;
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&path)?), provider)
            .build()
            .map_err(|e| e.to_string())?;
        if settings.mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        }
    } else {
        Arc::new(NoVerification(provider))
    };
    Ok(builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth())
}

/// Takes `sslmode` and `sslrootcert` out of a conninfo string or URI (tokio-postgres does not
/// know verify-ca/verify-full); returns the rest and the two values.
pub fn take_ssl_params(conninfo: &str) -> (String, Option<String>, Option<String>) {
    let (mut mode, mut root) = (None, None);
    let trimmed = conninfo.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        if let Ok(mut url) = url::Url::parse(trimmed) {
            let kept: Vec<(String, String)> = url
                .query_pairs()
                .filter_map(|(k, v)| match k.as_ref() {
                    "sslmode" => {
                        mode = Some(v.into_owned());
                        None
                    }
                    "sslrootcert" => {
                        root = Some(v.into_owned());
                        None
                    }
                    _ => Some((k.into_owned(), v.into_owned())),
                })
                .collect();
            if kept.is_empty() {
                url.set_query(None);
            } else {
                url.query_pairs_mut().clear().extend_pairs(kept);
            }
            return (url.to_string(), mode, root);
        }
        return (conninfo.to_string(), None, None);
    }
    let rest: Vec<&str> = trimmed
        .split_whitespace()
        .filter(|tok| {
            if let Some(v) = tok.strip_prefix("sslmode=") {
                mode = Some(v.trim_matches('\'').to_string());
                false
            } else if let Some(v) = tok.strip_prefix("sslrootcert=") {
                root = Some(v.trim_matches('\'').to_string());
                false
            } else {
                true
            }
        })
        .collect();
    (rest.join(" "), mode, root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_params_are_taken_out_of_both_forms() {
        let (rest, m, r) =
            take_ssl_params("host=db port=5433 sslmode=verify-full sslrootcert=/ca.pem user=x");
        assert_eq!(rest, "host=db port=5433 user=x");
        assert_eq!(m.as_deref(), Some("verify-full"));
        assert_eq!(r.as_deref(), Some("/ca.pem"));
        let (rest, m, r) =
            take_ssl_params("postgresql://u@db:5433/x?sslmode=require&application_name=a");
        assert_eq!(rest, "postgresql://u@db:5433/x?application_name=a");
        assert_eq!(m.as_deref(), Some("require"));
        assert_eq!(r, None);
        assert!(SslMode::parse("verify-ca").is_ok());
        assert!(SslMode::parse("sometimes").is_err());
    }
}
