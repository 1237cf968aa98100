//! TLS for the replication connection, with libpq's `sslmode` meanings:
//! `disable`; `allow`/`prefer` (TLS if the server offers it, no verification; the default);
//! `require` (TLS or fail; verified against `sslrootcert` when one is given, as libpq does);
//! `verify-ca` (certificate chain checked against `sslrootcert`); `verify-full` (and the host
//! name). Unix sockets never use TLS, as with libpq. A client certificate (`sslcert`,
//! `sslkey`) is offered when one is configured, for `cert` authentication.

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
    /// `sslcert` and `sslkey`: the client certificate chain and its key (PEM), for servers
    /// that authenticate replication by certificate (`cert` in pg_hba.conf).
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

/// The client certificate chain and private key, from PEM files.
fn client_identity(
    cert: &Path,
    key: &Path,
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        rustls::pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("sslcert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("sslcert {}: no certificate in it", cert.display()));
    }
    // As libpq: a key others can read is refused (0600 or less; 0640 when root owns it).
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(key).map_err(|e| format!("sslkey {}: {e}", key.display()))?;
        let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
        if meta.mode() & 0o777 & !allowed != 0 {
            return Err(format!(
                "sslkey {} has group or world access (mode {:o}); it must be 0600 or less \
                 (0640 if root owns it)",
                key.display(),
                meta.mode() & 0o777
            ));
        }
    }
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("sslkey {}: {e}", key.display()))?;
    Ok((chain, key_der))
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

/// Always offers the one client certificate configured.
#[derive(Debug)]
struct ClientIdentity(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
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
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots(&path)?), provider.clone())
                .build()
                .map_err(|e| e.to_string())?;
        if settings.mode == SslMode::VerifyFull {
            webpki
        } else {
            Arc::new(ChainOnly(webpki))
        }
    } else {
        Arc::new(NoVerification(provider.clone()))
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match &settings.client_cert {
        Some((cert, key_path)) => {
            let (chain, key) = client_identity(cert, key_path)?;
            let signer = provider
                .key_provider
                .load_private_key(key)
                .map_err(|e| format!("sslkey {}: {e}", key_path.display()))?;
            // The certificate goes to the server as it is, as libpq sends it: rustls' own
            // check would refuse the X.509 v1 certificates PostgreSQL's documentation shows
            // how to make. The server judges it.
            let identity = rustls::sign::CertifiedKey::new(chain, signer);
            Ok(builder.with_client_cert_resolver(Arc::new(ClientIdentity(Arc::new(identity)))))
        }
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The tls-server-end-point channel binding data of a server certificate (RFC 5929): its hash
/// under the hash of its own signature algorithm (SHA-256 for MD5 and SHA-1), as PostgreSQL
/// computes it. None for certificates that have no such hash (Ed25519, RSA-PSS), or that do
/// not parse.
pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use sha2::Digest;
    let oid = signature_oid(cert)?;
    const RSA: &[u8] = &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x04];
    let hash = match oid {
        // md5WithRSA, sha1WithRSA, ecdsa-with-SHA1: SHA-256, as the RFC says.
        [r @ .., 0x04] | [r @ .., 0x05] if r == RSA => 256,
        [e @ .., 0x01] if e == ECDSA => 256,
        [r @ .., 0x0B] if r == RSA => 256,
        [r @ .., 0x0C] if r == RSA => 384,
        [r @ .., 0x0D] if r == RSA => 512,
        [r @ .., 0x0E] if r == RSA => 224,
        [e @ .., 0x03, 0x01] if e == ECDSA => 224,
        [e @ .., 0x03, 0x02] if e == ECDSA => 256,
        [e @ .., 0x03, 0x03] if e == ECDSA => 384,
        [e @ .., 0x03, 0x04] if e == ECDSA => 512,
        _ => return None,
    };
    Some(match hash {
        224 => sha2::Sha224::digest(cert).to_vec(),
        256 => sha2::Sha256::digest(cert).to_vec(),
        384 => sha2::Sha384::digest(cert).to_vec(),
        _ => sha2::Sha512::digest(cert).to_vec(),
    })
}

/// One DER element at `at`: (tag, content range, end).
fn der(b: &[u8], at: usize) -> Option<(u8, std::ops::Range<usize>, usize)> {
    let tag = *b.get(at)?;
    let first = *b.get(at + 1)?;
    let (len, start) = if first < 0x80 {
        (usize::from(first), at + 2)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = b.get(at + 2..at + 2 + n)?;
        (
            bytes.iter().fold(0usize, |l, x| (l << 8) | usize::from(*x)),
            at + 2 + n,
        )
    };
    let end = start.checked_add(len)?;
    (end <= b.len()).then_some((tag, start..end, end))
}

/// The OID of a certificate's signatureAlgorithm (after the tbsCertificate).
fn signature_oid(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, outer, _) = der(cert, 0)? else {
        return None;
    };
    let (0x30, _, after_tbs) = der(cert, outer.start)? else {
        return None;
    };
    let (0x30, alg, _) = der(cert, after_tbs)? else {
        return None;
    };
    let (0x06, oid, _) = der(cert, alg.start)? else {
        return None;
    };
    Some(&cert[oid])
}

/// The TLS parameters of a conninfo string or URI, which tokio-postgres's parser does not know.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SslParams {
    pub mode: Option<String>,
    pub root_cert: Option<String>,
    /// `sslcert` and `sslkey`: a client certificate (PEM chain) and its private key.
    pub cert: Option<String>,
    pub key: Option<String>,
    /// `channel_binding`: disable, prefer, require.
    pub channel_binding: Option<String>,
}

impl SslParams {
    /// Takes one `key=value` if it is a TLS parameter; false otherwise.
    fn take(&mut self, key: &str, value: &str) -> bool {
        let slot = match key {
            "sslmode" => &mut self.mode,
            "sslrootcert" => &mut self.root_cert,
            "sslcert" => &mut self.cert,
            "sslkey" => &mut self.key,
            "channel_binding" => &mut self.channel_binding,
            _ => return false,
        };
        *slot = Some(value.to_string());
        true
    }
}

/// Takes the TLS parameters out of a conninfo string or URI; returns the rest (every value
/// quoted, so tokio-postgres reads it as libpq would) and them. A malformed string is an error
/// that never quotes it: it may hold a password.
pub fn take_ssl_params(conninfo: &str) -> Result<(String, SslParams), String> {
    let mut ssl = SslParams::default();
    let trimmed = conninfo.trim();
    if trimmed.starts_with("postgres://") || trimmed.starts_with("postgresql://") {
        let mut url = url::Url::parse(trimmed)
            .map_err(|e| format!("the connection URI does not parse ({e})"))?;
        let kept: Vec<(String, String)> = url
            .query_pairs()
            .filter(|(k, v)| !ssl.take(k, v))
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        if kept.is_empty() {
            url.set_query(None);
        } else {
            url.query_pairs_mut().clear().extend_pairs(kept);
        }
        return Ok((url.to_string(), ssl));
    }
    let pairs = super::conninfo::parse(trimmed).map_err(|e| e.to_string())?;
    let rest: Vec<(String, String)> = pairs.into_iter().filter(|(k, v)| !ssl.take(k, v)).collect();
    Ok((super::conninfo::format(&rest), ssl))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssl_params_are_taken_out_of_both_forms() {
        let (rest, p) = take_ssl_params(
            "host=db port=5433 sslmode=verify-full sslrootcert=/ca.pem sslcert='/c.crt' sslkey=/c.key user=x channel_binding=require",
        )
        .unwrap();
        assert_eq!(rest, "host='db' port='5433' user='x'");
        assert_eq!(p.channel_binding.as_deref(), Some("require"));
        assert_eq!(p.mode.as_deref(), Some("verify-full"));
        assert_eq!(p.root_cert.as_deref(), Some("/ca.pem"));
        assert_eq!(p.cert.as_deref(), Some("/c.crt"));
        assert_eq!(p.key.as_deref(), Some("/c.key"));
        let (rest, p) = take_ssl_params(
            "postgresql://u@db:5433/x?sslmode=require&application_name=a&sslcert=%2Fc.crt",
        )
        .unwrap();
        assert_eq!(rest, "postgresql://u@db:5433/x?application_name=a");
        assert_eq!(p.mode.as_deref(), Some("require"));
        assert_eq!(p.root_cert, None);
        assert_eq!(p.cert.as_deref(), Some("/c.crt"));
        let e = take_ssl_params("host=db password='top secret").unwrap_err();
        assert!(!e.contains("secret"), "{e}");
        assert!(SslMode::parse("verify-ca").is_ok());
        assert!(SslMode::parse("sometimes").is_err());
    }

    #[test]
    fn channel_binding_hashes_follow_the_certificates_signature() {
        use sha2::Digest;
        let rsa = include_bytes!("testdata/rsa-sha256.der");
        assert_eq!(
            end_point_hash(rsa),
            Some(sha2::Sha256::digest(rsa).to_vec())
        );
        let ec = include_bytes!("testdata/ecdsa-sha384.der");
        assert_eq!(end_point_hash(ec), Some(sha2::Sha384::digest(ec).to_vec()));
        assert_eq!(end_point_hash(include_bytes!("testdata/ed25519.der")), None);
        for bad in [&b""[..], b"\x30", b"\x30\x84\xff\xff\xff\xff", &rsa[..100]] {
            assert_eq!(end_point_hash(bad), None);
        }
    }
}
