//! The development PKI behind `credvault certs init` and `credvault dev`, and certificate
//! helpers for tests ([`testing`]).
//!
//! A dev PKI is one directory holding a private CA, a server certificate for `localhost` and
//! `127.0.0.1`, and a client certificate per built-in role, each naming its caller with a SPIFFE
//! URI SAN (`spiffe://credvault/<role>/dev`). It is for a developer's machine: a deployment
//! brings its own CA and never uses these files.
//!
//! All keys are ECDSA P-256. Existing files are kept: [`ensure_dev_pki`] only fills in what is
//! missing, checks that what it keeps still fits together (every certificate chains to `ca.pem`,
//! is in date and matches its key), and refuses to overwrite anything.

use std::fmt;
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: Duration = Duration::from_secs(24 * 60 * 60);
/// Certificates start a day early so that a clock a little behind still accepts them.
const BACKDATE: Duration = DAY;
const DEV_CA_LIFETIME: Duration = Duration::from_secs(3650 * 24 * 60 * 60);
const DEV_LEAF_LIFETIME: Duration = Duration::from_secs(730 * 24 * 60 * 60);

const DEV_CA_COMMON_NAME: &str = "credvault development CA";
const DEV_ORGANIZATION: &str = "credvault (development only)";
/// The names the dev server certificate is valid for: the default listen address is loopback.
const SERVER_DNS_NAME: &str = "localhost";
const SERVER_IP: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const SERVER_CERT_FILE: &str = "server.pem";
const SERVER_KEY_FILE: &str = "server.key";

const DIR_MODE: u32 = 0o700;
const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;

/// A built-in role that the dev PKI issues a client certificate for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DevRole {
    /// Agent executors: unseal, metadata, watch revocations.
    Executor,
    /// Browser-extension ingest: seal.
    Ingest,
    /// The settings UI: seal, revoke, metadata, tenant lifecycle.
    Settings,
    /// Operators: the Admin service.
    Admin,
}

impl DevRole {
    /// Every dev role, in a stable order.
    pub const ALL: [DevRole; 4] = [
        DevRole::Executor,
        DevRole::Ingest,
        DevRole::Settings,
        DevRole::Admin,
    ];

    /// The role's name, which is also the stem of its certificate and key files.
    pub fn as_str(self) -> &'static str {
        match self {
            DevRole::Executor => "executor",
            DevRole::Ingest => "ingest",
            DevRole::Settings => "settings",
            DevRole::Admin => "admin",
        }
    }

    /// The identity its dev client certificate carries: `spiffe://credvault/<role>/dev`.
    pub fn identity(self) -> String {
        format!("spiffe://credvault/{}/dev", self.as_str())
    }
}

impl fmt::Display for DevRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name that is not one of the [`DevRole`]s.
#[derive(Debug, thiserror::Error)]
#[error("unknown dev role {0:?}: expected executor, ingest, settings or admin")]
pub struct UnknownDevRole(String);

impl FromStr for DevRole {
    type Err = UnknownDevRole;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DevRole::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| UnknownDevRole(s.to_owned()))
    }
}

/// Where the files of a dev PKI are, and what [`ensure_dev_pki`] did with each of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevPkiPaths {
    dir: PathBuf,
    created: Vec<PathBuf>,
    reused: Vec<PathBuf>,
}

impl DevPkiPaths {
    /// The paths of a dev PKI in `dir`, without touching the file system (for defaults such as
    /// a client's `--ca certs/ca.pem`).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        DevPkiPaths {
            dir: dir.into(),
            created: Vec::new(),
            reused: Vec::new(),
        }
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA certificate (PEM): the client-CA bundle for the server and the server-CA bundle
    /// for clients.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_CERT_FILE)
    }

    /// The CA private key (PKCS#8 PEM, mode 0600).
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join(CA_KEY_FILE)
    }

    /// The server certificate (PEM), valid for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join(SERVER_CERT_FILE)
    }

    /// The server private key (PKCS#8 PEM, mode 0600).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join(SERVER_KEY_FILE)
    }

    /// The client certificate and private key of `role`: `<role>.pem`, `<role>.key`.
    pub fn client(&self, role: DevRole) -> (PathBuf, PathBuf) {
        (
            self.dir.join(format!("{role}.pem")),
            self.dir.join(format!("{role}.key")),
        )
    }

    /// Every file of the PKI, certificate before key, CA first.
    pub fn all_files(&self) -> Vec<PathBuf> {
        let mut files = vec![
            self.ca_cert(),
            self.ca_key(),
            self.server_cert(),
            self.server_key(),
        ];
        for role in DevRole::ALL {
            let (cert, key) = self.client(role);
            files.extend([cert, key]);
        }
        files
    }

    /// The files the last [`ensure_dev_pki`] call created.
    pub fn created(&self) -> &[PathBuf] {
        &self.created
    }

    /// The files the last [`ensure_dev_pki`] call found and kept.
    pub fn reused(&self) -> &[PathBuf] {
        &self.reused
    }
}

/// Makes sure `dir` holds a complete dev PKI and returns where its files are.
///
/// Creates `dir` (mode 0700) if needed, then whichever of these are missing: `ca.pem`/`ca.key`
/// (a CA valid for 10 years), `server.pem`/`server.key` (localhost and 127.0.0.1, ServerAuth),
/// and `<role>.pem`/`<role>.key` for each [`DevRole`] (URI SAN `spiffe://credvault/<role>/dev`,
/// ClientAuth), leaves valid for 2 years; all start a day in the past. Keys are written mode 0600,
/// each file atomically.
///
/// Existing files are never overwritten. A key without its certificate gets a new certificate
/// (that is what an interrupted run leaves behind); a certificate without its key, a
/// certificate that does not match its key, does not chain to `ca.pem` or is out of date is an
/// error naming the file, and nothing is written.
pub fn ensure_dev_pki(dir: &Path) -> anyhow::Result<DevPkiPaths> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("creating the dev PKI directory {}", dir.display()))?;
    let mut paths = DevPkiPaths::in_dir(dir);
    let mut plan = Plan::default();
    let now = SystemTime::now();

    // The CA.
    let ca_key = plan.key(&paths.ca_key(), &paths.ca_cert())?;
    let ca_params = dev_ca_params(now)?;
    let ca_cert = match plan.existing_cert(&paths.ca_cert())? {
        Some(der) => {
            check_dev_ca(&der, &ca_key).with_context(|| {
                format!(
                    "{} cannot be reused: delete the dev PKI directory to start afresh",
                    paths.ca_cert().display()
                )
            })?;
            der
        }
        None => {
            let cert = ca_params.self_signed(&ca_key)?;
            let der = cert.der().clone();
            plan.write(paths.ca_cert(), cert.pem(), CERT_MODE);
            der
        }
    };
    let issuer = Issuer::new(ca_params, ca_key);
    let verifiers = Verifiers::new(&ca_cert)?;

    // The leaves: the server, then one client per role.
    let mut leaves = vec![(paths.server_cert(), paths.server_key(), None)];
    for role in DevRole::ALL {
        let (cert, key) = paths.client(role);
        leaves.push((cert, key, Some(role)));
    }
    for (cert_path, key_path, role) in leaves {
        let key = plan.key(&key_path, &cert_path)?;
        let (der, issued) = match plan.existing_cert(&cert_path)? {
            Some(der) => (der, false),
            None => {
                let params = match role {
                    Some(role) => dev_client_params(role, now)?,
                    None => dev_server_params(now)?,
                };
                let cert = params.signed_by(&key, &issuer)?;
                let der = cert.der().clone();
                plan.write(cert_path.clone(), cert.pem(), CERT_MODE);
                (der, true)
            }
        };
        let checked = check_matches_key(&der, &key).and_then(|()| match role {
            Some(_) => verifiers.client(&der),
            None => verifiers.server(&der),
        });
        if let Err(err) = checked {
            if issued {
                // Our own fresh certificate failing means ca.pem is not the CA this code makes.
                bail!(
                    "{} was not made by `credvault certs init` ({err:#}): delete the dev PKI \
                     directory to start afresh",
                    paths.ca_cert().display()
                );
            }
            bail!(
                "{} cannot be reused ({err:#}): delete it and {} to issue new ones",
                cert_path.display(),
                key_path.display()
            );
        }
    }

    plan.commit(dir, &mut paths)?;
    Ok(paths)
}

/// The files one [`ensure_dev_pki`] call will write, gathered so that nothing is written until
/// every check has passed.
#[derive(Default)]
struct Plan {
    writes: Vec<(PathBuf, String, u32)>,
    reused: Vec<PathBuf>,
}

impl Plan {
    /// Loads the key at `key_path`, or generates one to be written.
    fn key(&mut self, key_path: &Path, cert_path: &Path) -> anyhow::Result<KeyPair> {
        match read_if_exists(key_path)? {
            Some(pem) => {
                warn_if_readable_by_others(key_path);
                self.reused.push(key_path.to_owned());
                KeyPair::from_pem(&pem)
                    .with_context(|| format!("{} is not a PEM private key", key_path.display()))
            }
            None if cert_path.exists() => bail!(
                "{} exists but its key {} does not: delete the certificate to issue a new pair",
                cert_path.display(),
                key_path.display()
            ),
            None => {
                let key = KeyPair::generate()?;
                self.write(key_path.to_owned(), key.serialize_pem(), KEY_MODE);
                Ok(key)
            }
        }
    }

    /// The certificate at `path` (the first one in the PEM file), if there is a file.
    fn existing_cert(&mut self, path: &Path) -> anyhow::Result<Option<CertificateDer<'static>>> {
        let Some(pem) = read_if_exists(path)? else {
            return Ok(None);
        };
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .with_context(|| format!("{} is not a PEM certificate", path.display()))?;
        self.reused.push(path.to_owned());
        Ok(Some(der))
    }

    fn write(&mut self, path: PathBuf, contents: String, mode: u32) {
        self.writes.push((path, contents, mode));
    }

    /// Writes every planned file (keys before their certificates, the CA first) and records
    /// what was created and reused.
    fn commit(self, dir: &Path, paths: &mut DevPkiPaths) -> anyhow::Result<()> {
        for (path, contents, mode) in &self.writes {
            write_new_file(dir, path, contents.as_bytes(), *mode)?;
        }
        if !self.writes.is_empty() {
            // Make the new directory entries durable too.
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .with_context(|| format!("syncing {}", dir.display()))?;
        }
        let order = paths.all_files();
        let position = |p: &PathBuf| order.iter().position(|o| o == p);
        paths.created = self.writes.into_iter().map(|(p, _, _)| p).collect();
        paths.created.sort_by_key(position);
        paths.reused = self.reused;
        paths.reused.sort_by_key(position);
        Ok(())
    }
}

fn read_if_exists(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn warn_if_readable_by_others(key_path: &Path) {
    if let Ok(meta) = fs::metadata(key_path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(
            path = %key_path.display(),
            mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
            "private key file is accessible to other users; chmod 600 it"
        );
    }
}

/// Writes `contents` to `path` atomically (temporary file, fsync, rename), failing if `path`
/// already exists.
fn write_new_file(dir: &Path, path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let context = || format!("writing {}", path.display());
    // The temporary file is created mode 0600, so a key is never readable by others, even
    // briefly.
    let mut tmp = tempfile::NamedTempFile::new_in(dir).with_context(context)?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .with_context(context)?;
    tmp.write_all(contents).with_context(context)?;
    tmp.as_file().sync_all().with_context(context)?;
    tmp.persist_noclobber(path)
        .map_err(|e| e.error)
        .with_context(context)?;
    Ok(())
}

/// Checks that a kept `ca.pem` is a CA certificate for `ca.key`.
fn check_dev_ca(der: &CertificateDer<'_>, key: &KeyPair) -> anyhow::Result<()> {
    let cert = parse(der)?;
    if !cert.is_ca() {
        bail!("it is not a CA certificate");
    }
    check_matches_key(der, key)
}

/// Checks that the certificate's public key is `key`'s.
fn check_matches_key(der: &CertificateDer<'_>, key: &KeyPair) -> anyhow::Result<()> {
    if parse(der)?.public_key().raw != key.subject_public_key_info().as_slice() {
        bail!("the certificate does not belong to its private key");
    }
    Ok(())
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> anyhow::Result<X509Certificate<'a>> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|_| anyhow::anyhow!("not an X.509 certificate"))?;
    Ok(cert)
}

/// rustls' own verifiers over the dev CA: a kept or new certificate must pass exactly the
/// checks the server and the clients will apply.
struct Verifiers {
    client: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    server: Arc<WebPkiServerVerifier>,
}

impl Verifiers {
    fn new(ca: &CertificateDer<'static>) -> anyhow::Result<Self> {
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone())
            .context("the CA certificate is not usable as a trust anchor")?;
        let roots = Arc::new(roots);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(Verifiers {
            client: WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()?,
            server: WebPkiServerVerifier::builder_with_provider(roots, provider).build()?,
        })
    }

    fn client(&self, der: &CertificateDer<'_>) -> anyhow::Result<()> {
        self.client
            .verify_client_cert(der, &[], UnixTime::now())
            .context("not a valid client certificate under ca.pem")?;
        Ok(())
    }

    fn server(&self, der: &CertificateDer<'_>) -> anyhow::Result<()> {
        use rustls::client::danger::ServerCertVerifier;
        for name in [
            ServerName::try_from(SERVER_DNS_NAME)?,
            ServerName::from(SERVER_IP),
        ] {
            self.server
                .verify_server_cert(der, &[], &name, &[], UnixTime::now())
                .with_context(|| {
                    format!("not a valid server certificate for {name:?} under ca.pem")
                })?;
        }
        Ok(())
    }
}

/// The dev CA. The subject and key usages are fixed, so the issuer can be rebuilt from
/// `ca.key` alone on later runs.
fn dev_ca_params(now: SystemTime) -> anyhow::Result<CertificateParams> {
    ca_params(
        DEV_CA_COMMON_NAME,
        Some(DEV_ORGANIZATION),
        now - BACKDATE,
        now + DEV_CA_LIFETIME,
    )
}

fn dev_server_params(now: SystemTime) -> anyhow::Result<CertificateParams> {
    server_params(now - BACKDATE, now + DEV_LEAF_LIFETIME)
}

fn dev_client_params(role: DevRole, now: SystemTime) -> anyhow::Result<CertificateParams> {
    let mut params = leaf_params(
        &format!("credvault dev {role}"),
        vec![SanType::URI(role.identity().try_into()?)],
        ExtendedKeyUsagePurpose::ClientAuth,
        now - BACKDATE,
        now + DEV_LEAF_LIFETIME,
    )?;
    params
        .distinguished_name
        .push(DnType::OrganizationName, DEV_ORGANIZATION);
    Ok(params)
}

fn ca_params(
    common_name: &str,
    organization: Option<&str>,
    not_before: SystemTime,
    not_after: SystemTime,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        params
            .distinguished_name
            .push(DnType::OrganizationName, org);
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    Ok(params)
}

fn server_params(
    not_before: SystemTime,
    not_after: SystemTime,
) -> anyhow::Result<CertificateParams> {
    leaf_params(
        "credvault server",
        vec![
            SanType::DnsName(SERVER_DNS_NAME.try_into()?),
            SanType::IpAddress(SERVER_IP),
        ],
        ExtendedKeyUsagePurpose::ServerAuth,
        not_before,
        not_after,
    )
}

/// An end-entity certificate: not a CA, digitalSignature (the TLS 1.3 handshake signature),
/// one extended key usage, a random serial and the issuer's key id.
fn leaf_params(
    common_name: &str,
    subject_alt_names: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    not_before: SystemTime,
    not_after: SystemTime,
) -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if !common_name.is_empty() {
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
    }
    params.subject_alt_names = subject_alt_names;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    params.serial_number = Some(random_serial());
    Ok(params)
}

/// A random positive 128-bit serial number, so that a CRL can name one certificate (RFC 5280
/// asks for unique serials per CA; the default in rcgen is derived from the public key).
///
/// The top byte is in 0x40..=0x7f: positive, no leading zero, so its DER contents are exactly
/// these 16 bytes and [`testing::serial_of`] returns them unchanged.
fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

pub mod testing;

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use rustls::CertificateError;
    use rustls::pki_types::CertificateRevocationListDer;
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::X509Certificate;

    use super::testing::{ClientIdentity, TestCa, days_from_now, serial_of};
    use super::*;

    fn der_of(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    fn der_file(path: &Path) -> CertificateDer<'static> {
        der_of(&fs::read_to_string(path).unwrap())
    }

    fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
        cert.subject_alternative_name()
            .unwrap()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(u.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().mode() & 0o777
    }

    fn snapshot(paths: &DevPkiPaths) -> Vec<(PathBuf, Vec<u8>, u32)> {
        paths
            .all_files()
            .into_iter()
            .map(|p| {
                let bytes = fs::read(&p).unwrap();
                let m = mode(&p);
                (p, bytes, m)
            })
            .collect()
    }

    #[test]
    fn dev_pki_creates_every_file_with_private_keys_and_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("certs");
        let paths = ensure_dev_pki(&dir).unwrap();

        assert_eq!(mode(&dir), 0o700);
        assert_eq!(paths.created(), paths.all_files().as_slice());
        assert!(paths.reused().is_empty());
        assert_eq!(paths.all_files().len(), 12);
        for file in paths.all_files() {
            let expected = if file.extension().unwrap() == "key" {
                0o600
            } else {
                0o644
            };
            assert_eq!(mode(&file), expected, "{}", file.display());
        }
        assert_eq!(paths.ca_cert(), dir.join("ca.pem"));
        assert_eq!(
            paths.client(DevRole::Ingest),
            (dir.join("ingest.pem"), dir.join("ingest.key"))
        );
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 12);
    }

    #[test]
    fn dev_pki_certificates_have_the_promised_shape() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        let year = 365 * 24 * 3600;
        let now = UnixTime::now().as_secs() as i64;

        let ca_der = der_file(&paths.ca_cert());
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        assert!(ca.is_ca());
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let ca_life = ca.validity().not_after.timestamp() - now;
        assert!((9 * year..=10 * year + 10).contains(&ca_life), "{ca_life}");
        assert!(ca.validity().not_before.timestamp() <= now - 23 * 3600);

        let server_der = der_file(&paths.server_cert());
        let (_, server) = X509Certificate::from_der(&server_der).unwrap();
        assert!(!server.is_ca());
        assert!(
            server
                .extended_key_usage()
                .unwrap()
                .unwrap()
                .value
                .server_auth
        );
        let names = &server
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names;
        assert!(names.contains(&GeneralName::DNSName("localhost")));
        assert!(names.contains(&GeneralName::IPAddress(&[127, 0, 0, 1])));
        let leaf_life = server.validity().not_after.timestamp() - now;
        assert!((year..=2 * year + 10).contains(&leaf_life), "{leaf_life}");

        let mut serials = vec![ca.raw_serial().to_vec(), server.raw_serial().to_vec()];
        for role in DevRole::ALL {
            let der = der_file(&paths.client(role).0);
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            assert_eq!(
                uri_sans(&cert),
                vec![format!("spiffe://credvault/{}/dev", role.as_str())]
            );
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
            serials.push(cert.raw_serial().to_vec());
        }
        serials.sort();
        serials.dedup();
        assert_eq!(serials.len(), 6, "serial numbers are unique");
    }

    #[test]
    fn dev_pki_certificates_pass_rustls_verification() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        let verifiers = Verifiers::new(&der_file(&paths.ca_cert())).unwrap();
        verifiers.server(&der_file(&paths.server_cert())).unwrap();
        for role in DevRole::ALL {
            verifiers.client(&der_file(&paths.client(role).0)).unwrap();
        }
        // And the other way round: the usages are enforced, so the check can fail.
        assert!(verifiers.client(&der_file(&paths.server_cert())).is_err());
        assert!(
            verifiers
                .server(&der_file(&paths.client(DevRole::Admin).0))
                .is_err()
        );
        // Every key file loads and matches its certificate.
        let key = KeyPair::from_pem(&fs::read_to_string(paths.server_key()).unwrap()).unwrap();
        check_matches_key(&der_file(&paths.server_cert()), &key).unwrap();
        let other = KeyPair::from_pem(&fs::read_to_string(paths.ca_key()).unwrap()).unwrap();
        assert!(check_matches_key(&der_file(&paths.server_cert()), &other).is_err());
    }

    #[test]
    fn second_call_changes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ensure_dev_pki(tmp.path()).unwrap();
        let before = snapshot(&first);
        let second = ensure_dev_pki(tmp.path()).unwrap();
        assert!(second.created().is_empty());
        assert_eq!(second.reused(), first.all_files().as_slice());
        assert_eq!(snapshot(&second), before);
    }

    #[test]
    fn missing_leaf_is_reissued_under_the_existing_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        let ca_before = fs::read(paths.ca_cert()).unwrap();
        let (cert, key) = paths.client(DevRole::Executor);
        fs::remove_file(&cert).unwrap();
        fs::remove_file(&key).unwrap();

        let again = ensure_dev_pki(tmp.path()).unwrap();
        assert_eq!(again.created(), &[cert.clone(), key.clone()]);
        assert_eq!(fs::read(again.ca_cert()).unwrap(), ca_before);
        Verifiers::new(&der_file(&again.ca_cert()))
            .unwrap()
            .client(&der_file(&cert))
            .unwrap();
    }

    #[test]
    fn key_without_certificate_gets_a_certificate_for_that_key() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        let key_before = fs::read(paths.server_key()).unwrap();
        fs::remove_file(paths.server_cert()).unwrap();

        let again = ensure_dev_pki(tmp.path()).unwrap();
        assert_eq!(again.created(), &[paths.server_cert()]);
        assert_eq!(fs::read(paths.server_key()).unwrap(), key_before);
    }

    #[test]
    fn lost_ca_certificate_is_rebuilt_from_its_key_and_old_leaves_still_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        fs::remove_file(paths.ca_cert()).unwrap();
        let again = ensure_dev_pki(tmp.path()).unwrap();
        assert_eq!(again.created(), &[paths.ca_cert()]);
    }

    #[test]
    fn certificate_without_key_is_an_error_and_nothing_is_written() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        fs::remove_file(paths.client(DevRole::Settings).1).unwrap();
        fs::remove_file(paths.client(DevRole::Admin).0).unwrap();
        fs::remove_file(paths.client(DevRole::Admin).1).unwrap();

        let err = ensure_dev_pki(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("settings.pem"), "{err}");
        assert!(!paths.client(DevRole::Admin).0.exists());
        assert!(!paths.client(DevRole::Admin).1.exists());
    }

    #[test]
    fn leaves_of_a_lost_ca_are_refused_not_overwritten() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        fs::remove_file(paths.ca_cert()).unwrap();
        fs::remove_file(paths.ca_key()).unwrap();
        let server_before = fs::read(paths.server_cert()).unwrap();

        let err = format!("{:#}", ensure_dev_pki(tmp.path()).unwrap_err());
        assert!(err.contains("server.pem cannot be reused"), "{err}");
        assert!(!paths.ca_cert().exists(), "nothing is written on error");
        assert_eq!(fs::read(paths.server_cert()).unwrap(), server_before);
    }

    #[test]
    fn foreign_ca_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ensure_dev_pki(tmp.path()).unwrap();
        // A leaf in place of the CA certificate.
        fs::copy(paths.server_cert(), paths.ca_cert()).unwrap();
        let err = format!("{:#}", ensure_dev_pki(tmp.path()).unwrap_err());
        assert!(err.contains("ca.pem cannot be reused"), "{err}");
    }

    #[test]
    fn dev_role_names_round_trip() {
        for role in DevRole::ALL {
            assert_eq!(role.as_str().parse::<DevRole>().unwrap(), role);
        }
        assert!("root".parse::<DevRole>().is_err());
        assert_eq!(
            DevRole::Executor.identity(),
            "spiffe://credvault/executor/dev"
        );
    }

    fn client_verifier(
        ca: &TestCa,
        crl: Option<String>,
    ) -> Arc<dyn rustls::server::danger::ClientCertVerifier> {
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der()).unwrap();
        let mut builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        if let Some(crl) = crl {
            builder = builder
                .with_crls([CertificateRevocationListDer::from_pem_slice(crl.as_bytes()).unwrap()]);
        }
        builder.build().unwrap()
    }

    fn verify_client(
        verifier: &Arc<dyn rustls::server::danger::ClientCertVerifier>,
        pem: &str,
    ) -> Result<(), rustls::Error> {
        verifier
            .verify_client_cert(&der_of(pem), &[], UnixTime::now())
            .map(|_| ())
    }

    #[test]
    fn test_ca_issues_verifiable_certificates_with_the_asked_names() {
        let ca = TestCa::new("test CA");
        let verifier = client_verifier(&ca, None);
        let cases = [
            (
                ClientIdentity::Uri("spiffe://credvault/executor/r7".into()),
                "spiffe://credvault/executor/r7",
            ),
            (
                ClientIdentity::Dns("runner.example".into()),
                "runner.example",
            ),
            (ClientIdentity::CommonName("cn-only".into()), "cn-only"),
        ];
        for (identity, name) in cases {
            let (cert, key) = ca.issue_client(identity, days_from_now(-1), days_from_now(1));
            verify_client(&verifier, &cert).unwrap();
            let der = der_of(&cert);
            let (_, parsed) = X509Certificate::from_der(&der).unwrap();
            let text = format!(
                "{:?} {}",
                parsed.subject_alternative_name(),
                parsed.subject()
            );
            assert!(text.contains(name), "{text}");
            let key = KeyPair::from_pem(&key).unwrap();
            check_matches_key(&der, &key).unwrap();
        }
        let (cert, _) = ca.issue_client(
            ClientIdentity::Nameless,
            days_from_now(-1),
            days_from_now(1),
        );
        let der = der_of(&cert);
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert!(parsed.subject_alternative_name().unwrap().is_none());
        assert_eq!(parsed.subject().iter_common_name().count(), 0);
    }

    #[test]
    fn test_ca_expired_and_foreign_certificates_are_rejected() {
        let ca = TestCa::new("test CA");
        let other = TestCa::new("other CA");
        let verifier = client_verifier(&ca, None);
        let id = || ClientIdentity::Uri("spiffe://credvault/executor/x".into());

        let (expired, _) = ca.issue_client(id(), days_from_now(-10), days_from_now(-1));
        assert!(matches!(
            verify_client(&verifier, &expired),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            ))
        ));
        let (foreign, _) = other.issue_client(id(), days_from_now(-1), days_from_now(1));
        assert!(matches!(
            verify_client(&verifier, &foreign),
            Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer
            ))
        ));
    }

    #[test]
    fn test_ca_crl_revokes_exactly_the_named_certificates() {
        let ca = TestCa::new("test CA");
        let id = |n: &str| ClientIdentity::Uri(format!("spiffe://credvault/executor/{n}"));
        let (revoked, _) = ca.issue_client(id("a"), days_from_now(-1), days_from_now(1));
        let (kept, _) = ca.issue_client(id("b"), days_from_now(-1), days_from_now(1));
        assert_ne!(serial_of(&revoked), serial_of(&kept));
        assert_eq!(serial_of(&revoked).len(), 16);

        let crl = ca.crl_pem(&[serial_of(&revoked)]);
        let verifier = client_verifier(&ca, Some(crl));
        assert!(matches!(
            verify_client(&verifier, &revoked),
            Err(rustls::Error::InvalidCertificate(CertificateError::Revoked))
        ));
        verify_client(&verifier, &kept).unwrap();

        let empty = client_verifier(&ca, Some(ca.crl_pem::<Vec<u8>>(&[])));
        verify_client(&empty, &revoked).unwrap();
    }

    #[test]
    fn test_ca_server_certificate_verifies_for_localhost_and_loopback() {
        use rustls::client::danger::ServerCertVerifier;
        let ca = TestCa::new("test CA");
        let (cert, _) = ca.issue_server(days_from_now(-1), days_from_now(1));
        let mut roots = RootCertStore::empty();
        roots.add(ca.cert_der()).unwrap();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let verify = |name: ServerName<'static>| {
            verifier.verify_server_cert(&der_of(&cert), &[], &name, &[], UnixTime::now())
        };
        verify(ServerName::try_from("localhost").unwrap()).unwrap();
        verify(ServerName::from(SERVER_IP)).unwrap();
        assert!(verify(ServerName::try_from("example.com").unwrap()).is_err());
        assert!(format!("{ca:?}").contains("test CA"));
        assert!(ca.cert_pem().starts_with("-----BEGIN CERTIFICATE-----"));
    }

    #[test]
    fn days_from_now_goes_both_ways() {
        let now = SystemTime::now();
        assert!(days_from_now(-1) < now);
        assert!(days_from_now(1) > now + Duration::from_secs(23 * 3600));
    }
}
