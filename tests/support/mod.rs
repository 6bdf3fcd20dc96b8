//! Shared helpers for the integration tests that talk to a real server: a PKI
//! made in the test (`pki::testing`, rcgen), a server on 127.0.0.1 port 0 over
//! mutual TLS 1.3 with a sled store, root key and policy in a temp dir, and
//! clients for any identity.
//!
//! ```ignore
//! let server = TestServer::start().await;               // dev policy, default limits
//! let mut vault = server.vault(&server.pki.role("settings")).await;
//! ```
//!
//! Every file the server uses is on disk under [`Pki::dir`] (`config.toml`,
//! `ca.pem`, `server.pem`, client certificates, …), so tests of the binary can
//! point `credvault` at them too.
#![allow(dead_code)] // each test binary uses a different subset

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::SystemTime;

use credvault::authz::DEV_POLICY_TOML;
use credvault::clock::SystemClock;
use credvault::config::Config;
use credvault::crypto::root;
use credvault::pki::testing::{ClientIdentity, TestCa, days_from_now, serial_of};
use credvault::service::pb;
use credvault::service::pb::admin_client::AdminClient;
use credvault::service::pb::vault_client::VaultClient;
use credvault::store::{SledStore, StoreOptions};
use credvault::vault::Vault;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{RootCertStore, SupportedProtocolVersion};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tonic_types::StatusExt;

/// The domain of every `google.rpc.ErrorInfo` credvault returns.
pub const ERROR_DOMAIN: &str = "credvault";

/// The SPIFFE identity the dev policy gives a built-in role: `spiffe://credvault/<role>/t`.
pub fn role_identity(role: &str) -> String {
    format!("spiffe://credvault/{role}/t")
}

/// A certificate authority and the files signed by it, in a temp dir.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: TestCa,
    /// The CA certificate (PEM): the server's client-CA bundle and the clients' trust root.
    pub ca_cert: PathBuf,
    /// The server's certificate and key (PEM), for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    issued: AtomicUsize,
}

/// A client certificate and its key, in memory and on disk.
pub struct ClientCert {
    /// The identity the certificate names (as the server will read it), if any.
    pub identity: Option<String>,
    pub cert_pem: String,
    pub key_pem: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("identity", &self.identity)
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl ClientCert {
    /// The certificate's serial number, as a CRL names it.
    pub fn serial(&self) -> Vec<u8> {
        serial_of(&self.cert_pem)
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    /// A fresh CA and a server certificate, valid from yesterday to next year.
    pub fn new() -> Self {
        credvault::tls::install_default_provider();
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = TestCa::new("credvault test CA");
        let ca_cert = dir.path().join("ca.pem");
        std::fs::write(&ca_cert, ca.cert_pem()).expect("write CA certificate");
        let (cert, key) = ca.issue_server(days_from_now(-1), days_from_now(365));
        let server_cert = dir.path().join("server.pem");
        let server_key = dir.path().join("server.key");
        std::fs::write(&server_cert, cert).expect("write server certificate");
        write_private(&server_key, &key);
        Pki {
            dir,
            ca,
            ca_cert,
            server_cert,
            server_key,
            issued: AtomicUsize::new(0),
        }
    }

    /// The temp dir holding every file of this PKI and of a server started with it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A currently valid client certificate from this CA naming `identity`.
    pub fn client(&self, identity: ClientIdentity) -> ClientCert {
        self.client_from(&self.ca, identity, days_from_now(-1), days_from_now(30))
    }

    /// A currently valid client certificate from this CA with URI SAN `uri`.
    pub fn uri(&self, uri: &str) -> ClientCert {
        self.client(ClientIdentity::Uri(uri.to_owned()))
    }

    /// A client certificate for a built-in role under the dev policy
    /// (`spiffe://credvault/<role>/t`).
    pub fn role(&self, role: &str) -> ClientCert {
        self.uri(&role_identity(role))
    }

    /// A client certificate from any CA (e.g. a foreign one), with chosen validity.
    pub fn client_from(
        &self,
        ca: &TestCa,
        identity: ClientIdentity,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> ClientCert {
        let name = match &identity {
            ClientIdentity::Uri(s) | ClientIdentity::Dns(s) | ClientIdentity::CommonName(s) => {
                Some(s.clone())
            }
            ClientIdentity::Nameless => None,
        };
        let (cert_pem, key_pem) = ca.issue_client(identity, not_before, not_after);
        let n = self.issued.fetch_add(1, Ordering::Relaxed);
        let cert = self.dir().join(format!("client-{n}.pem"));
        let key = self.dir().join(format!("client-{n}.key"));
        std::fs::write(&cert, &cert_pem).expect("write client certificate");
        write_private(&key, &key_pem);
        ClientCert {
            identity: name,
            cert_pem,
            key_pem,
            cert,
            key,
        }
    }

    /// The usual client configuration: TLS 1.3, trusts this CA, presents `client`.
    pub fn client_config(&self, client: &ClientCert) -> rustls::ClientConfig {
        self.client_config_with(Some(client), &[&rustls::version::TLS13])
    }

    /// A client configuration for the odd cases: any protocol versions, and no
    /// client certificate when `client` is `None`. Trusts this CA; ALPN h2.
    pub fn client_config_with(
        &self,
        client: Option<&ClientCert>,
        versions: &[&'static SupportedProtocolVersion],
    ) -> rustls::ClientConfig {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca.cert_der()).expect("CA certificate");
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some(client) => {
                let chain = CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("client certificate PEM");
                let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())
                    .expect("client key PEM");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("client certificate and key")
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        config
    }
}

fn write_private(path: &Path, contents: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// What to start a server with, beyond the defaults.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The policy file's text (default: [`DEV_POLICY_TOML`]).
    pub policy: String,
    /// Extra lines for the config's `[limits]` table, e.g. `max_secret_bytes = 4096`.
    pub limits: Vec<String>,
    /// A CRL (PEM) for `tls.crl`.
    pub crl_pem: Option<String>,
    /// `tls.refuse_stale_crl`.
    pub refuse_stale_crl: bool,
    /// Lines for the config's `[rotation]` table, e.g. `batch_size = 16`
    /// (none: the table is left out).
    pub rotation: Vec<String>,
    /// Lines for the config's `[lifecycle]` table, e.g. `watch_keepalive = "1s"`
    /// (none: the table is left out).
    pub lifecycle: Vec<String>,
    /// Lines for the config's `[audit]` table, e.g. `retention = "1s"`
    /// (none: the table is left out).
    pub audit: Vec<String>,
    /// Serve Prometheus metrics on another 127.0.0.1 port
    /// ([`TestServer::metrics_addr`]; not again after a restart).
    pub metrics: bool,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            policy: DEV_POLICY_TOML.to_owned(),
            limits: Vec::new(),
            crl_pem: None,
            refuse_stale_crl: false,
            rotation: Vec::new(),
            lifecycle: Vec::new(),
            audit: Vec::new(),
            metrics: false,
        }
    }
}

impl ServerOptions {
    pub fn policy(mut self, policy: impl Into<String>) -> Self {
        self.policy = policy.into();
        self
    }

    /// Adds a `[limits]` line, e.g. `limit("max_secret_bytes = 4096")`.
    pub fn limit(mut self, line: impl Into<String>) -> Self {
        self.limits.push(line.into());
        self
    }

    pub fn crl(mut self, crl_pem: impl Into<String>) -> Self {
        self.crl_pem = Some(crl_pem.into());
        self
    }

    /// Sets `tls.refuse_stale_crl` (give a CRL too).
    pub fn refuse_stale_crl(mut self) -> Self {
        self.refuse_stale_crl = true;
        self
    }

    /// Adds a `[rotation]` line, e.g. `rotation("batch_size = 16")`.
    pub fn rotation(mut self, line: impl Into<String>) -> Self {
        self.rotation.push(line.into());
        self
    }

    /// Adds a `[lifecycle]` line, e.g. `lifecycle("event_retention = \"1s\"")`.
    pub fn lifecycle(mut self, line: impl Into<String>) -> Self {
        self.lifecycle.push(line.into());
        self
    }

    /// Adds an `[audit]` line, e.g. `audit("retention = \"1s\"")`.
    pub fn audit(mut self, line: impl Into<String>) -> Self {
        self.audit.push(line.into());
        self
    }

    /// Serves Prometheus metrics too.
    pub fn metrics(mut self) -> Self {
        self.metrics = true;
        self
    }
}

/// Writes every file a server over `pki` needs into [`Pki::dir`]: a new root
/// key (`root.key`), the policy, the CRL if any, and `config.toml` listening on
/// `listen` with the store in `data/`. Returns the parsed config and the
/// config file. [`TestServer::start_with`] uses it; tests of the binary can
/// call it directly (and override `listen` on the command line).
pub fn write_server_files(
    pki: &Pki,
    options: &ServerOptions,
    listen: SocketAddr,
) -> (Config, PathBuf) {
    let dir = pki.dir().to_owned();
    let root_key = dir.join("root.key");
    root::generate_file(&root_key).expect("root key file");
    let policy_file = dir.join("policy.toml");
    std::fs::write(&policy_file, &options.policy).expect("write policy");
    let crl = options.crl_pem.as_ref().map(|pem| {
        let path = dir.join("crl.pem");
        std::fs::write(&path, pem).expect("write CRL");
        path
    });

    let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
    let mut text = format!(
        "listen = \"{listen}\"\ndata_dir = {}\nroot_key_file = {}\npolicy_file = {}\ncache_mb = 16\n\
         [tls]\ncert = {}\nkey = {}\nclient_ca = {}\n",
        q(&dir.join("data")),
        q(&root_key),
        q(&policy_file),
        q(&pki.server_cert),
        q(&pki.server_key),
        q(&pki.ca_cert),
    );
    if let Some(crl) = &crl {
        text.push_str(&format!("crl = {}\n", q(crl)));
    }
    if options.refuse_stale_crl {
        text.push_str("refuse_stale_crl = true\n");
    }
    text.push_str("[limits]\n");
    for line in &options.limits {
        text.push_str(line);
        text.push('\n');
    }
    if !options.rotation.is_empty() {
        text.push_str("[rotation]\n");
        for line in &options.rotation {
            text.push_str(line);
            text.push('\n');
        }
    }
    if !options.lifecycle.is_empty() {
        text.push_str("[lifecycle]\n");
        for line in &options.lifecycle {
            text.push_str(line);
            text.push('\n');
        }
    }
    if !options.audit.is_empty() {
        text.push_str("[audit]\n");
        for line in &options.audit {
            text.push_str(line);
            text.push('\n');
        }
    }
    let config = Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
    let config_file = dir.join("config.toml");
    std::fs::write(&config_file, &text).expect("write config");
    (config, config_file)
}

/// A credvault server running in this process (`server::run` in a task) on
/// 127.0.0.1 with an OS-chosen port. Dropping it asks it to shut down.
pub struct TestServer {
    pub pki: Pki,
    pub addr: SocketAddr,
    /// Where metrics are served, if [`ServerOptions::metrics`] asked.
    pub metrics_addr: Option<SocketAddr>,
    pub config: Config,
    /// The config as a file (for `credvault serve --config`).
    pub config_file: PathBuf,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    /// A server with a fresh PKI, the dev policy and default limits.
    pub async fn start() -> Self {
        Self::start_with(Pki::new(), ServerOptions::default()).await
    }

    /// A server over `pki` (its CA is the client CA; clients it issues can connect).
    pub async fn start_with(pki: Pki, options: ServerOptions) -> Self {
        credvault::tls::install_default_provider();
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let (config, config_file) = write_server_files(&pki, &options, addr);
        let metrics = match options.metrics {
            true => Some(
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind 127.0.0.1:0 for metrics"),
            ),
            false => None,
        };
        let mut server = TestServer {
            pki,
            addr,
            metrics_addr: metrics
                .as_ref()
                .map(|l| l.local_addr().expect("local address")),
            config,
            config_file,
            shutdown: None,
            task: None,
        };
        server.launch(listener, metrics);
        server.wait_until_serving().await;
        server
    }

    /// Runs `server::run_with_metrics` with `self.config` on `listener` in a task.
    fn launch(&mut self, listener: TcpListener, metrics: Option<TcpListener>) {
        let (shutdown, signal) = oneshot::channel::<()>();
        let server_config = self.config.clone();
        self.task = Some(tokio::spawn(async move {
            credvault::server::run_with_metrics(&server_config, listener, metrics, async {
                let _ = signal.await;
            })
            .await
        }));
        self.shutdown = Some(shutdown);
    }

    /// Stops the server (gracefully, if it is running) and starts it again on
    /// the same data directory, PKI and config, on a new port. Clients must
    /// connect again.
    pub async fn restart(&mut self) {
        self.restart_with(|_| {}).await
    }

    /// [`TestServer::restart`], after `edit` changed the config file's table,
    /// e.g. `|c| c["rotation"]["batch_pause_ms"] = 0.into()` or another
    /// `root_key_file`. The change stays in [`TestServer::config_file`].
    pub async fn restart_with(&mut self, edit: impl FnOnce(&mut toml::Table)) {
        if self.task.is_some() {
            self.stop()
                .await
                .unwrap_or_else(|e| panic!("the server failed while stopping: {e:#}"));
        }
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        self.addr = listener.local_addr().expect("local address");
        let text = std::fs::read_to_string(&self.config_file).expect("read config");
        let mut table: toml::Table = text.parse().expect("config file is TOML");
        table.insert("listen".into(), self.addr.to_string().into());
        edit(&mut table);
        let text = toml::to_string(&table).expect("config as TOML");
        self.config = Config::parse(&text).unwrap_or_else(|e| panic!("test config: {e}\n{text}"));
        std::fs::write(&self.config_file, &text).expect("write config");
        self.metrics_addr = None;
        self.launch(listener, None);
        self.wait_until_serving().await;
    }

    /// `localhost:PORT`, as clients name the server (its certificate covers `localhost`).
    pub fn target(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// Waits until the server answers a health check (it binds before it
    /// opens the store, so a connection may otherwise wait for start-up).
    async fn wait_until_serving(&mut self) {
        use tonic_health::pb::health_client::HealthClient;
        let probe = self.pki.uri("spiffe://credvault/test/health-probe");
        for _ in 0..500 {
            if self.has_stopped() {
                let task = self.task.take().expect("the server task");
                panic!("the server stopped during start-up: {:?}", task.await);
            }
            if let Ok(channel) =
                credvault::client::connect_with(&self.target(), self.pki.client_config(&probe))
                    .await
            {
                let check = HealthClient::new(channel)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if check.is_ok() {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        panic!("the server did not start serving");
    }

    /// A connected channel presenting `client`.
    pub async fn channel(&self, client: &ClientCert) -> Channel {
        self.channel_with(self.pki.client_config(client)).await
    }

    /// A connected channel with any client configuration.
    pub async fn channel_with(&self, config: rustls::ClientConfig) -> Channel {
        credvault::client::connect_with(&self.target(), config)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e:#}", self.target()))
    }

    /// A channel that connects (TCP, TLS, HTTP/2) only when the first RPC is
    /// made, so that a refused handshake shows up as that RPC failing, whatever
    /// the stage the refusal happens at.
    pub fn lazy_channel(&self, config: rustls::ClientConfig) -> Channel {
        let name = ServerName::try_from("localhost").expect("server name");
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let address = self.addr;
        Endpoint::from_shared(format!("http://{}", self.target()))
            .expect("endpoint")
            .connect_with_connector_lazy(tower::service_fn(move |_| {
                let (connector, name) = (connector.clone(), name.clone());
                async move {
                    let tcp = TcpStream::connect(address).await?;
                    tcp.set_nodelay(true)?;
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
    }

    pub async fn vault(&self, client: &ClientCert) -> VaultClient<Channel> {
        VaultClient::new(self.channel(client).await)
    }

    pub async fn admin(&self, client: &ClientCert) -> AdminClient<Channel> {
        AdminClient::new(self.channel(client).await)
    }

    /// Sends the shutdown signal without waiting (the server drains in-flight calls).
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Whether the server task has returned.
    pub fn has_stopped(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Shuts the server down and returns what `server::run` returned.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        let task = self.task.take().expect("the server was already stopped");
        task.await.expect("the server task panicked")
    }

    /// Opens the server's store and vault directly, as the next start would.
    /// Call after [`TestServer::stop`].
    pub async fn open_vault(&self) -> Vault {
        assert!(self.task.is_none(), "stop the server first");
        let store = SledStore::open(&StoreOptions::new(&self.config.data_dir))
            .unwrap_or_else(|e| panic!("reopen the store: {e}"));
        let root_key = root::load_file(self.config.root_key_file.as_deref().expect("root key"))
            .expect("root key");
        Vault::open(
            Arc::new(store),
            root_key,
            Arc::new(SystemClock),
            self.config.vault_options(),
        )
        .await
        .unwrap_or_else(|e| panic!("reopen the vault: {e}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.begin_shutdown();
    }
}

/// The credvault reason of a status (its `google.rpc.ErrorInfo`, domain `credvault`).
pub fn reason(status: &Status) -> Option<String> {
    status
        .get_details_error_info()
        .filter(|info| info.domain == ERROR_DOMAIN)
        .map(|info| info.reason)
}

/// Asserts that `result` failed with `code` and credvault reason `reason`; returns the status.
#[track_caller]
pub fn expect_status<T: fmt::Debug>(
    result: Result<T, Status>,
    code: Code,
    reason_code: &str,
) -> Status {
    let status = match result {
        Ok(ok) => panic!("expected {code:?} / {reason_code}, got OK: {ok:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(reason(&status).as_deref(), Some(reason_code), "{status:?}");
    status
}

/// A Seal request with no labels, expiry or compare-and-set.
pub fn seal_request(
    tenant: &str,
    credential: &str,
    kind: pb::CredentialKind,
    secret: &[u8],
) -> pb::SealRequest {
    pb::SealRequest {
        tenant_id: tenant.to_owned(),
        credential_id: credential.to_owned(),
        kind: kind as i32,
        secret: secret.to_vec(),
        ..Default::default()
    }
}

/// An Unseal request for the latest version.
pub fn unseal_request(tenant: &str, credential: &str) -> pb::UnsealRequest {
    pb::UnsealRequest {
        tenant_id: tenant.to_owned(),
        credential_id: credential.to_owned(),
        version: None,
        purpose: "integration test".to_owned(),
    }
}

/// Every credential of a tenant (latest versions), following page tokens.
pub async fn list_all(
    client: &mut VaultClient<Channel>,
    tenant: &str,
) -> Vec<pb::CredentialMetadata> {
    let mut all = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_credentials(pb::ListCredentialsRequest {
                tenant_id: tenant.to_owned(),
                page_token,
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("ListCredentials {tenant}: {s:?}"))
            .into_inner();
        all.extend(page.credentials);
        if page.next_page_token.is_empty() {
            return all;
        }
        page_token = page.next_page_token;
    }
}

/// `len` bytes that are unlikely to appear anywhere by chance (xorshift from `seed`).
pub fn secret_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// The `credvault` binary of this build.
pub const BIN: &str = env!("CARGO_BIN_EXE_credvault");

/// How long the binary may take to serve, or to exit when it refuses to start:
/// a hang guard, not a measurement.
const PROCESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// `credvault serve --config FILE --listen 127.0.0.1:PORT ARGS…`, with nothing
/// from the test's own environment that it reads.
fn serve_command(
    config_file: &Path,
    port: u16,
    args: &[&std::ffi::OsStr],
) -> std::process::Command {
    let mut command = std::process::Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("CREDVAULT_") {
            command.env_remove(name);
        }
    }
    command
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .arg("serve")
        .arg("--config")
        .arg(config_file)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(std::process::Stdio::null());
    command
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// The real binary serving (`credvault serve`) in a child process, on a free
/// 127.0.0.1 port; killed and reaped on drop.
pub struct ServerProcess {
    child: std::process::Child,
    pub addr: SocketAddr,
    stderr: PathBuf,
    _logs: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `credvault serve --config CONFIG_FILE ARGS…` (with `--listen` on a
    /// free port) and waits until it answers a health check over mutual TLS
    /// with a certificate from `pki`.
    pub async fn start(pki: &Pki, config_file: &Path, args: &[&std::ffi::OsStr]) -> Self {
        credvault::tls::install_default_provider();
        let probe = pki.uri("spiffe://credvault/test/health-probe");
        for _ in 0..5 {
            let port = free_port();
            let logs = tempfile::tempdir().expect("temp dir");
            let stderr = logs.path().join("stderr");
            let child = serve_command(config_file, port, args)
                .stdout(std::fs::File::create(logs.path().join("stdout")).expect("stdout file"))
                .stderr(std::fs::File::create(&stderr).expect("stderr file"))
                .spawn()
                .expect("spawning credvault serve");
            let mut server = ServerProcess {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                stderr,
                _logs: logs,
            };
            let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
            loop {
                if let Some(status) = server.child.try_wait().expect("try_wait") {
                    let stderr = server.stderr_text();
                    if stderr.contains("cannot bind") {
                        break; // the port was taken meanwhile: another one
                    }
                    panic!("credvault serve exited before serving: {status}\n{stderr}");
                }
                if server.health(pki, &probe).await {
                    return server;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "credvault serve did not answer within {PROCESS_TIMEOUT:?}\n{}",
                    server.stderr_text()
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        panic!("no free port for credvault serve after 5 attempts");
    }

    /// Runs `credvault serve --config CONFIG_FILE ARGS…` expecting it to exit by
    /// itself (a refused start-up); returns its exit status and stderr.
    pub async fn run_to_exit(
        config_file: &Path,
        args: &[&std::ffi::OsStr],
    ) -> (std::process::ExitStatus, String) {
        let logs = tempfile::tempdir().expect("temp dir");
        let stderr = logs.path().join("stderr");
        let mut child = serve_command(config_file, free_port(), args)
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("spawning credvault serve");
        let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                break status;
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "credvault serve did not exit within {PROCESS_TIMEOUT:?}\n{}",
                    String::from_utf8_lossy(&std::fs::read(&stderr).unwrap_or_default())
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let text = String::from_utf8_lossy(&std::fs::read(&stderr).expect("stderr")).into_owned();
        (status, text)
    }

    async fn health(&self, pki: &Pki, probe: &ClientCert) -> bool {
        use tonic_health::pb::health_client::HealthClient;
        let Ok(channel) =
            credvault::client::connect_with(&self.target(), pki.client_config(probe)).await
        else {
            return false;
        };
        HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
    }

    /// `localhost:PORT`, as clients name the server.
    pub fn target(&self) -> String {
        format!("localhost:{}", self.addr.port())
    }

    /// A connected channel presenting `client` (from `pki`).
    pub async fn channel(&self, pki: &Pki, client: &ClientCert) -> Channel {
        credvault::client::connect_with(&self.target(), pki.client_config(client))
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e:#}", self.target()))
    }

    pub async fn vault(&self, pki: &Pki, client: &ClientCert) -> VaultClient<Channel> {
        VaultClient::new(self.channel(pki, client).await)
    }

    pub async fn admin(&self, pki: &Pki, client: &ClientCert) -> AdminClient<Channel> {
        AdminClient::new(self.channel(pki, client).await)
    }

    /// SIGKILLs the process (no chance to flush or clean up) and reaps it.
    pub fn kill(&mut self) -> std::process::ExitStatus {
        if let Some(status) = self.child.try_wait().expect("try_wait") {
            panic!(
                "credvault serve had already exited: {status}\n{}",
                self.stderr_text()
            );
        }
        self.child.kill().expect("SIGKILL"); // Child::kill sends SIGKILL
        self.child.wait().expect("wait")
    }

    /// What the process has written to stderr so far (its log).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A no-op on a child that has already been reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// Acknowledged secrets

/// What an acknowledged Seal promised: this version unseals to these bytes.
#[derive(Debug, Clone)]
pub struct Acked {
    pub tenant: String,
    pub credential: String,
    pub version: u32,
    pub secret: Vec<u8>,
}

/// Seals `(tenant, credential, secret)` items from `concurrency` tasks, item
/// `n` as `kind(n)`; panics on any failure. Returns what was acknowledged.
pub async fn seal_all(
    client: &VaultClient<Channel>,
    items: Vec<(String, String, Vec<u8>)>,
    concurrency: usize,
    kind: fn(usize) -> pb::CredentialKind,
) -> Vec<Acked> {
    let items = Arc::new(items);
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (mut client, items, next) = (client.clone(), items.clone(), next.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed) as usize;
                    let Some((tenant, credential, secret)) = items.get(n) else {
                        return acked;
                    };
                    let meta = client
                        .seal(seal_request(tenant, credential, kind(n), secret))
                        .await
                        .unwrap_or_else(|s| panic!("seed Seal {tenant}/{credential}: {s:?}"))
                        .into_inner()
                        .metadata
                        .expect("metadata");
                    acked.push(Acked {
                        tenant: tenant.clone(),
                        credential: credential.clone(),
                        version: meta.version,
                        secret: secret.clone(),
                    });
                }
            })
        })
        .collect();
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.expect("seal task"));
    }
    assert_eq!(acked.len(), items.len());
    acked
}

/// An Unseal request for one version.
pub fn unseal_version(tenant: &str, credential: &str, version: u32) -> pb::UnsealRequest {
    pb::UnsealRequest {
        version: Some(version),
        ..unseal_request(tenant, credential)
    }
}

/// Checks one acknowledged secret; `Err` says what went wrong.
pub async fn check_unseal(client: &mut VaultClient<Channel>, acked: &Acked) -> Result<(), String> {
    let Acked {
        tenant,
        credential,
        version,
        secret,
    } = acked;
    match client
        .unseal(unseal_version(tenant, credential, *version))
        .await
    {
        Ok(response) => {
            let response = response.into_inner();
            let got = response.metadata.as_ref().map(|m| m.version);
            if response.secret != *secret || got != Some(*version) {
                Err(format!(
                    "Unseal {tenant}/{credential} v{version}: wrong bytes or version ({got:?})"
                ))
            } else {
                Ok(())
            }
        }
        Err(status) => Err(format!(
            "Unseal {tenant}/{credential} v{version}: {status:?}"
        )),
    }
}

/// Every acknowledged secret unseals, by version, to its exact bytes.
pub async fn assert_all_unseal(client: &VaultClient<Channel>, acked: &[Acked]) {
    const TASKS: usize = 8;
    let acked = Arc::new(acked.to_vec());
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (mut client, acked) = (client.clone(), acked.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for a in acked.iter().skip(t).step_by(TASKS) {
                    if let Err(failure) = check_unseal(&mut client, a).await {
                        failures.push(failure);
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.expect("unseal task"));
    }
    assert!(
        failures.is_empty(),
        "{} of {} acknowledged secrets do not unseal, e.g. {:?}",
        failures.len(),
        acked.len(),
        &failures[..failures.len().min(5)]
    );
}

// ---------------------------------------------------------------------------
// SIGHUP reloads and refused handshakes

/// A call on a new connection with `config` fails at the TLS handshake, not
/// in a handler.
pub async fn refused_at_handshake(server: &TestServer, config: rustls::ClientConfig, what: &str) {
    let mut client = VaultClient::new(server.lazy_channel(config));
    let request = pb::GetMetadataRequest {
        tenant_id: "tenant-a".into(),
        credential_id: "gmail/alice".into(),
        ..Default::default()
    };
    let status = client.get_metadata(request).await.expect_err(what);
    assert!(
        matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ) && reason(&status).is_none(),
        "{what}: refused at the handshake, not by a handler: {status:?}"
    );
}

/// The reload and refused-reload counters.
pub fn reloads() -> (u64, u64) {
    let metrics = credvault::metrics::global();
    (
        metrics.config_reloads.get(),
        metrics.config_reload_failures.get(),
    )
}

/// Sends `SIGHUP` to this process and waits until the counters read `expect`.
pub async fn hang_up(expect: (u64, u64)) {
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::HUP)
        .expect("SIGHUP to this process");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while reloads() != expect {
        assert!(
            std::time::Instant::now() < deadline,
            "reload counters {:?}, expected {expect:?}",
            reloads()
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
