//! `credvault serve` (configured) and `credvault dev` (embedded defaults).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use credvault::config::{Config, ConfigError, LogFormat};
use credvault::pki::ensure_dev_pki;

/// Flags (and `CREDVAULT_*` variables) override the config file field by field.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The TOML configuration file.
    #[arg(long, env = "CREDVAULT_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_LISTEN")]
    listen: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics (plain HTTP).
    #[arg(long, env = "CREDVAULT_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    #[arg(long, env = "CREDVAULT_DATA_DIR")]
    data_dir: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_ROOT_KEY_FILE")]
    root_key_file: Option<PathBuf>,
    /// Name of an environment variable that holds the root key (base64).
    #[arg(long, env = "CREDVAULT_ROOT_KEY_ENV")]
    root_key_env: Option<String>,
    #[arg(long, env = "CREDVAULT_POLICY_FILE")]
    policy_file: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_TLS_KEY")]
    tls_key: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_TLS_CRL")]
    tls_crl: Option<PathBuf>,
    #[arg(long, env = "CREDVAULT_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// A tracing filter such as `info` or `credvault=debug`.
    #[arg(long, env = "CREDVAULT_LOG")]
    log_level: Option<String>,
}

impl ServeArgs {
    /// The config file (if any) with every given flag or variable laid over it.
    ///
    /// An error says where the text came from: the file as written (its own line numbers), or
    /// the file merged with the overrides it names.
    fn resolve(&self) -> anyhow::Result<Config> {
        let text = match &self.config {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("config file {}", path.display()))?,
            ),
            None => None,
        };
        let mut table = match (&self.config, &text) {
            (Some(path), Some(text)) => text
                .parse::<toml::Table>()
                .with_context(|| format!("config file {}", path.display()))?,
            _ => toml::Table::new(),
        };
        let string = toml::Value::String;
        let path = |p: &PathBuf| toml::Value::String(p.display().to_string());
        let format = self.log_format.map(|f| {
            toml::Value::String(if f == LogFormat::Json { "json" } else { "text" }.into())
        });
        let overrides = [
            (
                "listen",
                "CREDVAULT_LISTEN",
                self.listen.clone().map(string),
            ),
            (
                "metrics_listen",
                "CREDVAULT_METRICS_LISTEN",
                self.metrics_listen.clone().map(string),
            ),
            (
                "data_dir",
                "CREDVAULT_DATA_DIR",
                self.data_dir.as_ref().map(path),
            ),
            (
                "root_key_file",
                "CREDVAULT_ROOT_KEY_FILE",
                self.root_key_file.as_ref().map(path),
            ),
            (
                "root_key_env",
                "CREDVAULT_ROOT_KEY_ENV",
                self.root_key_env.clone().map(string),
            ),
            (
                "policy_file",
                "CREDVAULT_POLICY_FILE",
                self.policy_file.as_ref().map(path),
            ),
            (
                "tls.cert",
                "CREDVAULT_TLS_CERT",
                self.tls_cert.as_ref().map(path),
            ),
            (
                "tls.key",
                "CREDVAULT_TLS_KEY",
                self.tls_key.as_ref().map(path),
            ),
            (
                "tls.client_ca",
                "CREDVAULT_TLS_CLIENT_CA",
                self.tls_client_ca.as_ref().map(path),
            ),
            (
                "tls.crl",
                "CREDVAULT_TLS_CRL",
                self.tls_crl.as_ref().map(path),
            ),
            ("log.format", "CREDVAULT_LOG_FORMAT", format),
            (
                "log.level",
                "CREDVAULT_LOG",
                self.log_level.clone().map(string),
            ),
        ];
        let mut applied = Vec::new();
        for (field, env, value) in overrides {
            let Some(value) = value else { continue };
            let target = match field.split_once('.') {
                Some((section, _)) => table
                    .entry(section)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .with_context(|| format!("config field `{section}`: must be a table"))?,
                None => &mut table,
            };
            let key = field.rsplit('.').next().unwrap_or(field);
            target.insert(key.to_owned(), value);
            applied.push(format!(
                "`{field}` (--{} or {env})",
                field.replace(['.', '_'], "-")
            ));
        }
        let origin = match (&self.config, applied.is_empty()) {
            (Some(path), true) => format!("config file {}", path.display()),
            (Some(path), false) => format!(
                "config file {} overridden by {} (lines of the merged text)",
                path.display(),
                applied.join(", ")
            ),
            (None, true) => {
                "no configuration (give --config FILE, flags or CREDVAULT_* variables)".to_owned()
            }
            (None, false) => format!("configuration from {}", applied.join(", ")),
        };
        // Unchanged, the file is parsed as written so that error positions are its own.
        let merged = match text {
            Some(text) if applied.is_empty() => text,
            _ => toml::to_string(&table)?,
        };
        Config::parse(&merged).map_err(|error| match error {
            ConfigError::Parse { error, .. } => anyhow::anyhow!("{origin}: {error}"),
            other => other.into(),
        })
    }
}

pub fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.resolve()?;
    run(config)
}

/// Arguments of `credvault dev`.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where `certs/` and `data/` live (created on first run, reused after).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Listen address (loopback).
    #[arg(long, default_value = "127.0.0.1:7443")]
    listen: String,
    /// A tracing filter such as `info` or `credvault=debug` (default `info`).
    #[arg(long, env = "CREDVAULT_LOG")]
    log_level: Option<String>,
}

pub fn dev(args: DevArgs) -> anyhow::Result<()> {
    let mut config = prepare_dev(&args.dir, &args.listen)?;
    if let Some(level) = args.log_level {
        config.log.level = level;
    }
    print_tour(&args.dir, &args.listen);
    run(config)
}

/// Creates (or reuses) the dev PKI, root key, policy and data directory.
fn prepare_dev(dir: &Path, listen: &str) -> anyhow::Result<Config> {
    let certs = ensure_dev_pki(&dir.join("certs"))?;
    let data = dir.join("data");
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data)?;
    }
    let root_key = data.join("root.key");
    if !root_key.exists() {
        credvault::crypto::root::generate_file(&root_key)?;
    }
    let policy = data.join("policy.toml");
    if !policy.exists() {
        std::fs::write(&policy, credvault::authz::DEV_POLICY_TOML)?;
    }
    let text = format!(
        "listen = {listen:?}\ndata_dir = {:?}\nroot_key_file = {:?}\npolicy_file = {:?}\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n",
        data.join("store").display().to_string(),
        root_key.display().to_string(),
        policy.display().to_string(),
        certs.server_cert().display().to_string(),
        certs.server_key().display().to_string(),
        certs.ca_cert().display().to_string(),
    );
    Ok(Config::parse(&text)?)
}

fn print_tour(dir: &Path, listen: &str) {
    let port = listen.rsplit_once(':').map_or("7443", |(_, p)| p);
    let at = if dir == Path::new(".") {
        String::new()
    } else {
        format!(" --dir {}", dir.display())
    };
    println!(
        "credvault dev: certificates in {certs}, root key and store in {data}\n\
         Try, from another terminal in the same directory:\n  \
         echo -n 'session=abc123' | credvault seal --server localhost:{port}{at} --tenant acme --id gmail --kind cookie-jar\n  \
         credvault unseal --server localhost:{port}{at} --tenant acme --id gmail --purpose demo\n  \
         credvault list --server localhost:{port}{at} --tenant acme\n  \
         credvault revoke --server localhost:{port}{at} --tenant acme --id gmail --reason demo\n",
        certs = dir.join("certs").display(),
        data = dir.join("data").display(),
    );
}

/// Logging, hardening, the runtime, and the server until SIGTERM or SIGINT.
fn run(config: Config) -> anyhow::Result<()> {
    init_logging(config.log.format, &config.log.level)?;
    credvault::hardening::harden_process().context("disabling core dumps")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("config field `listen`: cannot bind {}", config.listen))?;
        let metrics = match config.metrics_listen {
            Some(addr) => {
                Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                    format!("config field `metrics_listen`: cannot bind {addr}")
                })?)
            }
            None => None,
        };
        credvault::server::run_with_metrics(&config, listener, metrics, shutdown_signal()).await
    })
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Logs go to stderr, as text or JSON lines.
pub fn init_logging(format: LogFormat, level: &str) -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_new(level).context("config field `log.level`")?;
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    result.map_err(|e| anyhow::anyhow!("logging: {e}"))
}
