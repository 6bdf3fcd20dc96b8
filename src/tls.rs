//! rustls configurations: the server (mutual TLS 1.3 only, client certificate
//! required and verified against the client CA bundle, optional CRLs, ALPN h2)
//! and the client used by the `credvault` client commands and tests.
//!
//! Only the ring provider is used; `main` also installs it as the process
//! default before anything else touches rustls.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// A TLS configuration could not be built. Names the file, never key bytes.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {reason}")]
    File {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as the process-wide rustls provider. Call first thing in `main`.
pub fn install_default_provider() {
    // Err means a provider is already installed (e.g. by a test harness): fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn file_error(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        what,
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error("certificate file", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("certificate file", path, e))?;
    if certs.is_empty() {
        return Err(file_error("certificate file", path, "no certificate found"));
    }
    Ok(certs)
}

/// Reads a PEM private key.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error("private key file", path, e))
}

fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| file_error("CRL file", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("CRL file", path, e))
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error("CA bundle", path, e))?;
    }
    Ok(Arc::new(roots))
}

/// Files of the server's TLS configuration.
#[derive(Debug, Clone)]
pub struct ServerTlsFiles<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub client_ca: &'a Path,
    pub crl: Option<&'a Path>,
}

/// TLS 1.3 only; every client must present a certificate that chains to the
/// client CA (and is not revoked by the CRL, when one is given); ALPN h2.
pub fn server_config(files: &ServerTlsFiles<'_>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(roots(files.client_ca)?, provider());
    if let Some(crl) = files.crl {
        verifier = verifier.with_crls(load_crls(crl)?);
    }
    let verifier = verifier
        .build()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(files.cert)?, load_key(files.key)?)
        .map_err(|e| file_error("server certificate/key", files.cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration: trusts `ca`, presents `cert`/`key`, ALPN h2, TLS 1.3.
pub fn client_config(ca: &Path, cert: &Path, key: &Path) -> Result<rustls::ClientConfig, TlsError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots(ca)?)
        .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| file_error("client certificate/key", cert, e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}
