//! Certificate helpers for tests and development: an in-memory CA that issues client and
//! server certificates with chosen names and validity, and CRLs that revoke them.
//!
//! These are not for production use: keys live in memory and are returned as PEM strings,
//! and the functions panic on failure, as a test would. Validity times are
//! [`SystemTime`]s; [`days_from_now`] makes them.

use std::fmt;
use std::time::{Duration, SystemTime};

use rcgen::{
    CertificateRevocationListParams, CertifiedIssuer, ExtendedKeyUsagePurpose, KeyIdMethod,
    KeyPair, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{DAY, ca_params, leaf_params, random_serial, server_params};

/// The name a test client certificate carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientIdentity {
    /// A URI SAN such as `spiffe://credvault/executor/runner-7`; the subject CN is
    /// `test client`.
    Uri(String),
    /// A DNS SAN; the subject CN is `test client`.
    Dns(String),
    /// No SAN, only this subject common name.
    CommonName(String),
    /// No SAN and an empty subject: a certificate that names nobody.
    Nameless,
}

/// The subject CN given to certificates whose identity is a SAN, so that tests can tell
/// whether the SAN or the CN was picked.
pub const SAN_CERT_COMMON_NAME: &str = "test client";

/// An in-memory certificate authority for tests (ECDSA P-256).
pub struct TestCa {
    name: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl fmt::Debug for TestCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// A new CA with subject CN `name` and a fresh key, valid from a day ago for ten years.
    ///
    /// # Panics
    /// If key generation or signing fails.
    pub fn new(name: &str) -> Self {
        let now = SystemTime::now();
        let params =
            ca_params(name, None, now - DAY, now + 3650 * DAY).expect("test CA parameters");
        let key = KeyPair::generate().expect("generating a test CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signing a test CA");
        TestCa {
            name: name.to_owned(),
            issuer,
        }
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// Issues a client certificate (ClientAuth) naming `identity`, valid from `not_before`
    /// to `not_after` (pass past times for an expired certificate). Returns the certificate
    /// and its PKCS#8 private key, both PEM.
    ///
    /// # Panics
    /// If the identity is not a valid IA5 string (URI, DNS) or signing fails.
    pub fn issue_client(
        &self,
        identity: ClientIdentity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> (String, String) {
        let ia5 = |s: String| s.try_into().expect("SAN must be an IA5 (ASCII) string");
        let (common_name, sans) = match identity {
            ClientIdentity::Uri(uri) => (
                SAN_CERT_COMMON_NAME.to_owned(),
                vec![SanType::URI(ia5(uri))],
            ),
            ClientIdentity::Dns(dns) => (
                SAN_CERT_COMMON_NAME.to_owned(),
                vec![SanType::DnsName(ia5(dns))],
            ),
            ClientIdentity::CommonName(cn) => {
                assert!(!cn.is_empty(), "use ClientIdentity::Nameless for no name");
                (cn, Vec::new())
            }
            ClientIdentity::Nameless => (String::new(), Vec::new()),
        };
        let params = leaf_params(
            &common_name,
            sans,
            ExtendedKeyUsagePurpose::ClientAuth,
            not_before,
            not_after,
        )
        .expect("test client certificate parameters");
        self.sign(params)
    }

    /// Issues a server certificate (ServerAuth) for `localhost` and `127.0.0.1`. Returns
    /// the certificate and its PKCS#8 private key, both PEM.
    ///
    /// # Panics
    /// If signing fails.
    pub fn issue_server(&self, not_before: SystemTime, not_after: SystemTime) -> (String, String) {
        let params =
            server_params(not_before, not_after).expect("test server certificate parameters");
        self.sign(params)
    }

    fn sign(&self, params: rcgen::CertificateParams) -> (String, String) {
        let key = KeyPair::generate().expect("generating a test key");
        let cert = params
            .signed_by(&key, &*self.issuer)
            .expect("signing a test certificate");
        (cert.pem(), key.serialize_pem())
    }

    /// A CRL signed by this CA, revoking the certificates with these serial numbers (as
    /// returned by [`serial_of`]); current from an hour ago, next update in 30 days.
    ///
    /// # Panics
    /// If signing fails.
    pub fn crl_pem<S: AsRef<[u8]>>(&self, revoked_serials: &[S]) -> String {
        self.crl_pem_until(revoked_serials, SystemTime::now() + 30 * DAY)
    }

    /// [`Self::crl_pem`] promising the next CRL by `next_update`, which may be
    /// past (a stale CRL: issued a day before it).
    ///
    /// # Panics
    /// If signing fails.
    pub fn crl_pem_until<S: AsRef<[u8]>>(
        &self,
        revoked_serials: &[S],
        next_update: SystemTime,
    ) -> String {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let this_update = (now - hour).min(next_update - DAY);
        let params = CertificateRevocationListParams {
            this_update: this_update.into(),
            next_update: next_update.into(),
            crl_number: random_serial(),
            issuing_distribution_point: None,
            revoked_certs: revoked_serials
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(serial.as_ref()),
                    revocation_time: this_update.into(),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params
            .signed_by(&*self.issuer)
            .and_then(|crl| crl.pem())
            .expect("signing a test CRL")
    }
}

/// The serial number of a PEM certificate: the contents of its DER INTEGER, as a CRL names
/// it.
///
/// # Panics
/// If `cert_pem` is not a PEM X.509 certificate.
pub fn serial_of(cert_pem: &str) -> Vec<u8> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).expect("a PEM certificate");
    let (_, cert) = X509Certificate::from_der(&der).expect("an X.509 certificate");
    cert.raw_serial().to_vec()
}

/// `days` days from now (negative for the past), for validity periods.
pub fn days_from_now(days: i64) -> SystemTime {
    let span = DAY * u32::try_from(days.unsigned_abs()).expect("days fit in u32");
    if days < 0 {
        SystemTime::now() - span
    } else {
        SystemTime::now() + span
    }
}
