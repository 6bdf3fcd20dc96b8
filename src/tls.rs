//! rustls configurations: the server (mutual TLS 1.3 only, client certificate
//! required and verified against the client CA bundle, optional CRLs, ALPN h2)
//! and the client used by the `credvault` client commands and tests.
//!
//! Only the ring provider is used; `main` also installs it as the process
//! default before anything else touches rustls.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use x509_parser::prelude::FromDer;

use crate::authn::CertificateId;

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

/// Reads the PEM CRLs of `path`. A file without one is refused: read as "no
/// revocations", a damaged or misnamed file would quietly let every revoked
/// certificate back in (a CA with nothing revoked still signs an empty CRL).
fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| file_error("CRL file", path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("CRL file", path, e))?;
    if crls.is_empty() {
        return Err(file_error("CRL file", path, "no CRL found"));
    }
    Ok(crls)
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
    /// Refuse clients whose issuer's CRL is past its next update.
    pub refuse_stale_crl: bool,
}

/// TLS 1.3 only; every client must present a certificate that chains to the
/// client CA (and is not revoked by the CRL, when one is given, nor issued by
/// a CA whose CRL is stale, when `refuse_stale_crl`); ALPN h2.
pub fn server_config(files: &ServerTlsFiles<'_>) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut verifier =
        WebPkiClientVerifier::builder_with_provider(roots(files.client_ca)?, provider());
    if let Some(crl) = files.crl {
        verifier = verifier.with_crls(load_crls(crl)?);
        if files.refuse_stale_crl {
            verifier = verifier.enforce_revocation_expiration();
        }
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

/// What the CRLs of a file say.
#[derive(Debug, Default)]
pub struct Revocations {
    /// The certificates they revoke, by issuer and serial number, so that a
    /// certificate revoked while its connection is open is refused on its
    /// next call (rustls checks the CRL only at the handshake).
    pub certificates: HashSet<CertificateId>,
    /// Per issuer (its DER name, as [`CertificateId::issuer`]), the earliest
    /// "next update" of its CRLs (seconds since the Unix epoch): the CA
    /// promises a fresh CRL by then, so a file still older afterwards is stale.
    pub stale_at: HashMap<Vec<u8>, i64>,
}

impl Revocations {
    /// The earliest "next update" of all the CRLs (`None`: none says one).
    pub fn next_update(&self) -> Option<i64> {
        self.stale_at.values().copied().min()
    }
}

/// Reads the CRLs of `path` ([`Revocations`]).
pub fn revocations(path: &Path) -> Result<Revocations, TlsError> {
    let mut revocations = Revocations::default();
    for der in load_crls(path)? {
        let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(&der)
            .map_err(|e| file_error("CRL file", path, e))?;
        let issuer = crl.issuer().as_raw().to_vec();
        for entry in crl.iter_revoked_certificates() {
            revocations.certificates.insert(CertificateId {
                issuer: issuer.clone(),
                serial: entry.raw_serial().to_vec(),
            });
        }
        if let Some(next) = crl.next_update() {
            let next = next.timestamp();
            let at = revocations.stale_at.entry(issuer).or_insert(next);
            *at = (*at).min(next);
        }
    }
    Ok(revocations)
}

/// The server's TLS configuration, replaceable while the server runs
/// (`SIGHUP`, [`crate::server::reload`]): each new handshake takes the one in
/// force; connections already open keep the one they were made with.
#[derive(Debug, Clone)]
pub struct ServerTls(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl ServerTls {
    /// The configuration in force now.
    pub fn current(&self) -> Arc<rustls::ServerConfig> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts `config` in force for every handshake from now on.
    pub fn replace(&self, config: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = config;
    }
}

impl From<Arc<rustls::ServerConfig>> for ServerTls {
    fn from(config: Arc<rustls::ServerConfig>) -> Self {
        Self(Arc::new(RwLock::new(config)))
    }
}

/// When the first certificate of the PEM file at `path` expires, in seconds
/// since the Unix epoch (for the expiry gauge; `None` if it cannot be read).
pub fn not_after(path: &Path) -> Option<i64> {
    let cert = load_certs(path).ok()?.into_iter().next()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).ok()?;
    Some(parsed.validity().not_after.timestamp())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authn::caller_from_cert;
    use crate::pki::testing::{ClientIdentity, TestCa, days_from_now};

    #[test]
    fn a_crl_file_without_a_crl_is_refused_and_an_empty_crl_loads() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("crl.pem");
        for junk in ["", "not a CRL\n"] {
            std::fs::write(&path, junk).expect("write");
            let error = load_crls(&path)
                .expect_err("no CRL in the file")
                .to_string();
            assert!(
                error.contains("CRL file")
                    && error.contains("crl.pem")
                    && error.contains("no CRL found"),
                "{error}"
            );
        }
        let no_serials: [&[u8]; 0] = [];
        std::fs::write(&path, TestCa::new("test CA").crl_pem(&no_serials)).expect("write");
        assert_eq!(load_crls(&path).expect("a CRL revoking nothing").len(), 1);
        let read = revocations(&path).expect("read");
        assert!(read.certificates.is_empty());
        // TestCa's CRLs promise the next one in 30 days.
        let in_30_days = unix_secs(days_from_now(30));
        let next = read.next_update().expect("next update");
        assert!((next - in_30_days).abs() < 120, "{next} vs {in_30_days}");
    }

    /// The revoked set names a certificate exactly as the caller read from
    /// its connection does (issuer and serial), and no other.
    #[test]
    fn the_revoked_set_matches_the_callers_certificate_id() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("crl.pem");
        let (ca, other_ca) = (TestCa::new("test CA"), TestCa::new("other CA"));
        let validity = (days_from_now(-1), days_from_now(30));
        let issue = |ca: &TestCa, uri: &str| {
            let (pem, _) = ca.issue_client(ClientIdentity::Uri(uri.into()), validity.0, validity.1);
            CertificateDer::from_pem_slice(pem.as_bytes()).expect("PEM")
        };
        let revoked = issue(&ca, "spiffe://credvault/executor/leaked");
        let kept = issue(&ca, "spiffe://credvault/executor/kept");
        std::fs::write(&path, ca.crl_pem(&[serial_of_der(&revoked)])).expect("write");
        let set = revocations(&path).expect("read").certificates;
        let id = |der: &CertificateDer<'_>| caller_from_cert(der).expect("caller").certificate;
        assert_eq!(set.len(), 1);
        assert!(set.contains(&id(&revoked)));
        assert!(!set.contains(&id(&kept)));
        // The same serial from another issuer is another certificate.
        let mut elsewhere = id(&issue(&other_ca, "spiffe://credvault/executor/x"));
        elsewhere.serial = id(&revoked).serial;
        assert!(!set.contains(&elsewhere));

        // Two CAs' CRLs in one file: each issuer goes stale at its own CRL's next
        // update, keyed as the caller's certificate names its issuer.
        let soon = days_from_now(1);
        let both = ca.crl_pem(&[serial_of_der(&revoked)]) + &other_ca.crl_pem_until(&[[1u8]], soon);
        std::fs::write(&path, both).expect("write");
        let read = revocations(&path).expect("read");
        let stale_at = |der: &CertificateDer<'_>| read.stale_at.get(&id(der).issuer).copied();
        let near = |at: Option<i64>, t| at.is_some_and(|at| (at - unix_secs(t)).abs() < 120);
        assert_eq!(read.stale_at.len(), 2);
        assert!(
            near(stale_at(&kept), days_from_now(30)),
            "{:?}",
            stale_at(&kept)
        );
        let theirs = issue(&other_ca, "spiffe://credvault/executor/y");
        assert!(near(stale_at(&theirs), soon), "{:?}", stale_at(&theirs));
        assert!(
            near(read.next_update(), soon),
            "the earliest: {:?}",
            read.next_update()
        );
    }

    fn unix_secs(t: std::time::SystemTime) -> i64 {
        let since = t.duration_since(std::time::UNIX_EPOCH);
        since.expect("after the epoch").as_secs() as i64
    }

    fn serial_of_der(der: &CertificateDer<'_>) -> Vec<u8> {
        caller_from_cert(der).expect("caller").certificate.serial
    }
}
