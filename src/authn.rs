//! Caller identity from the verified client certificate.
//!
//! rustls has already checked the chain, the dates and the revocation list by the time a
//! request arrives; this module only reads the name the certificate gives its holder, and
//! which certificate it is ([`CertificateId`]), so that a CRL reloaded while the connection
//! is open is checked on each call (`service`, `authz::SharedPolicy`). The
//! identity is the first URI SAN (e.g. `spiffe://credvault/executor/runner-7`), else the first
//! DNS SAN, else the subject common name: the order SPIFFE and most service meshes use.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    /// The identity string used by the policy and the audit log.
    pub identity: String,
    /// Which certificate it presented, as a CRL names it.
    pub certificate: CertificateId,
}

/// A certificate as a CRL names it: its issuer's name (DER) and its serial
/// number (the DER INTEGER's contents).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificateId {
    pub issuer: Vec<u8>,
    pub serial: Vec<u8>,
}

/// Why no caller could be read from a client certificate. Messages describe the problem and
/// never include certificate bytes or the rejected name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// The connection presented no client certificate.
    #[error("no client certificate")]
    NoCertificate,
    /// The certificate is not well-formed DER X.509, or its subject alternative names or
    /// common name cannot be read.
    #[error("the client certificate cannot be parsed")]
    Malformed,
    /// The certificate has no URI SAN, no DNS SAN and no subject common name.
    #[error("the client certificate names no identity (no URI SAN, DNS SAN or subject CN)")]
    NoIdentity,
    /// The chosen name is empty or contains control characters, which could forge lines in
    /// logs and the audit trail.
    #[error("the client certificate's identity is empty or contains control characters")]
    InvalidIdentity,
}

/// Reads the caller from a verified leaf certificate (DER): the first URI SAN, else the first
/// DNS SAN, else the subject CN.
pub fn caller_from_cert(leaf_der: &[u8]) -> Result<Caller, AuthnError> {
    let (rest, cert) = X509Certificate::from_der(leaf_der).map_err(|_| AuthnError::Malformed)?;
    if !rest.is_empty() {
        return Err(AuthnError::Malformed);
    }

    let mut first_uri = None;
    let mut first_dns = None;
    let sans = cert
        .subject_alternative_name()
        .map_err(|_| AuthnError::Malformed)?;
    for name in sans.iter().flat_map(|ext| &ext.value.general_names) {
        match name {
            GeneralName::URI(uri) => {
                first_uri.get_or_insert(*uri);
            }
            GeneralName::DNSName(dns) => {
                first_dns.get_or_insert(*dns);
            }
            // An unreadable entry might have been the first URI: picking the next one instead
            // would silently change who the caller is.
            GeneralName::Invalid(..) => return Err(AuthnError::Malformed),
            _ => {}
        }
    }

    let identity = match first_uri.or(first_dns) {
        Some(name) => name,
        None => match cert.subject().iter_common_name().next() {
            Some(cn) => cn.as_str().map_err(|_| AuthnError::Malformed)?,
            None => return Err(AuthnError::NoIdentity),
        },
    };
    if identity.is_empty() || identity.chars().any(char::is_control) {
        return Err(AuthnError::InvalidIdentity);
    }
    Ok(Caller {
        identity: identity.to_owned(),
        certificate: CertificateId {
            issuer: cert.issuer().as_raw().to_vec(),
            serial: cert.raw_serial().to_vec(),
        },
    })
}

/// Reads the caller from a peer's certificate chain, leaf first (as tonic's
/// `Request::peer_certs` gives it); an absent or empty chain is [`AuthnError::NoCertificate`].
pub fn caller_from_chain<C: AsRef<[u8]>>(chain: Option<&[C]>) -> Result<Caller, AuthnError> {
    match chain.and_then(|c| c.first()) {
        Some(leaf) => caller_from_cert(leaf.as_ref()),
        None => Err(AuthnError::NoCertificate),
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;

    use super::*;
    use crate::pki::testing::{ClientIdentity, SAN_CERT_COMMON_NAME, TestCa, days_from_now};

    fn issue(identity: ClientIdentity) -> CertificateDer<'static> {
        let ca = TestCa::new("authn test CA");
        let (pem, _key) = ca.issue_client(identity, days_from_now(-1), days_from_now(1));
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// A self-signed certificate with exactly these SANs and subject CN.
    fn custom(sans: Vec<SanType>, common_name: Option<&str>) -> CertificateDer<'static> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(cn) = common_name {
            params.distinguished_name.push(DnType::CommonName, cn);
        }
        params.subject_alt_names = sans;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    fn identity(der: &[u8]) -> Result<String, AuthnError> {
        caller_from_cert(der).map(|c| c.identity)
    }

    #[test]
    fn uri_san_is_the_identity_even_with_a_cn() {
        let der = issue(ClientIdentity::Uri(
            "spiffe://credvault/executor/runner-7".into(),
        ));
        assert_eq!(
            identity(&der).unwrap(),
            "spiffe://credvault/executor/runner-7"
        );
    }

    #[test]
    fn dns_san_is_used_when_there_is_no_uri() {
        let der = issue(ClientIdentity::Dns("runner-7.agents.example".into()));
        assert_eq!(identity(&der).unwrap(), "runner-7.agents.example");
        assert_ne!(identity(&der).unwrap(), SAN_CERT_COMMON_NAME);
    }

    #[test]
    fn common_name_is_the_last_resort() {
        let der = issue(ClientIdentity::CommonName("settings-ui".into()));
        assert_eq!(identity(&der).unwrap(), "settings-ui");
    }

    #[test]
    fn a_certificate_naming_nobody_is_refused() {
        let der = issue(ClientIdentity::Nameless);
        assert_eq!(caller_from_cert(&der), Err(AuthnError::NoIdentity));
    }

    #[test]
    fn uri_wins_over_an_earlier_dns_and_the_first_of_each_kind_is_taken() {
        let der = custom(
            vec![
                SanType::DnsName("first.example".try_into().unwrap()),
                SanType::URI("spiffe://credvault/ingest/a".try_into().unwrap()),
                SanType::URI("spiffe://credvault/admin/b".try_into().unwrap()),
            ],
            Some("cn"),
        );
        assert_eq!(identity(&der).unwrap(), "spiffe://credvault/ingest/a");

        let der = custom(
            vec![
                SanType::DnsName("first.example".try_into().unwrap()),
                SanType::DnsName("second.example".try_into().unwrap()),
            ],
            Some("cn"),
        );
        assert_eq!(identity(&der).unwrap(), "first.example");
    }

    #[test]
    fn other_san_kinds_do_not_count() {
        let der = custom(
            vec![SanType::IpAddress("127.0.0.1".parse().unwrap())],
            Some("by-cn"),
        );
        assert_eq!(identity(&der).unwrap(), "by-cn");
        let der = custom(vec![SanType::IpAddress("127.0.0.1".parse().unwrap())], None);
        assert_eq!(caller_from_cert(&der), Err(AuthnError::NoIdentity));
    }

    #[test]
    fn control_characters_are_refused() {
        let der = custom(Vec::new(), Some("admin\nforged log line"));
        assert_eq!(caller_from_cert(&der), Err(AuthnError::InvalidIdentity));
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed_and_the_message_shows_no_bytes() {
        let der = issue(ClientIdentity::Uri("spiffe://credvault/x/y".into()));
        assert_eq!(
            caller_from_cert(b"not a certificate"),
            Err(AuthnError::Malformed)
        );
        assert_eq!(
            caller_from_cert(&der[..der.len() - 1]),
            Err(AuthnError::Malformed)
        );
        let mut extended = der.to_vec();
        extended.push(0);
        assert_eq!(caller_from_cert(&extended), Err(AuthnError::Malformed));

        let mut flipped = der.to_vec();
        flipped[1] ^= 0xff; // the outer length
        let err = caller_from_cert(&flipped).unwrap_err().to_string();
        assert!(!err.contains("spiffe"), "{err}");
        assert!(
            err.chars().all(|c| c.is_ascii_graphic() || c == ' '),
            "{err}"
        );
    }

    #[test]
    fn chain_takes_the_leaf_and_requires_one() {
        let leaf = issue(ClientIdentity::Uri("spiffe://credvault/leaf/1".into()));
        let other = issue(ClientIdentity::Uri("spiffe://credvault/other/2".into()));
        let chain = vec![leaf, other];
        assert_eq!(
            caller_from_chain(Some(chain.as_slice())).unwrap().identity,
            "spiffe://credvault/leaf/1"
        );
        let empty: Vec<CertificateDer<'static>> = Vec::new();
        assert_eq!(
            caller_from_chain(Some(empty.as_slice())),
            Err(AuthnError::NoCertificate)
        );
        assert_eq!(
            caller_from_chain::<CertificateDer<'static>>(None),
            Err(AuthnError::NoCertificate)
        );
    }
}
