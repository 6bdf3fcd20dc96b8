//! Typed configuration, validated once at start-up.
//!
//! Sources, later ones winning: the TOML file (`serve --config FILE`), then
//! `CREDVAULT_*` environment variables and command-line flags (both handled by
//! clap in `cli::serve`). A bad value is an error naming the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::service::Limits;
use crate::vault::VaultOptions;

/// The whole configuration, as in the TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default 127.0.0.1:7443; loopback unless told otherwise).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The sled data directory.
    pub data_dir: PathBuf,
    /// Where the root key comes from: a file, or an environment variable (base64).
    #[serde(default)]
    pub root_key_file: Option<PathBuf>,
    #[serde(default)]
    pub root_key_env: Option<String>,
    /// The authorisation policy (TOML, see docs/policy.md).
    pub policy_file: PathBuf,
    pub tls: TlsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// sled page cache, in MiB.
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA bundle that client certificates must chain to (PEM).
    pub client_ca: PathBuf,
    /// Optional certificate revocation list (PEM).
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_secret_bytes: usize,
    pub max_versions: u32,
    pub rotate_after_encryptions: u64,
    pub concurrency_per_connection: usize,
    pub request_timeout_ms: u64,
    pub keepalive_interval_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let vault = VaultOptions::default();
        let limits = Limits::for_secret_limit(vault.max_secret_bytes);
        Self {
            max_secret_bytes: vault.max_secret_bytes,
            max_versions: vault.max_versions,
            rotate_after_encryptions: vault.rotate_after_encryptions,
            concurrency_per_connection: limits.concurrency_per_connection,
            request_timeout_ms: limits.request_timeout.as_millis() as u64,
            keepalive_interval_ms: limits.keepalive_interval.as_millis() as u64,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `credvault=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

fn default_cache_mb() -> u64 {
    256
}

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("config file {path}: {error}")]
    Parse { path: String, error: String },
    #[error("config field `{field}`: {reason}")]
    Field { field: &'static str, reason: String },
}

impl Config {
    /// Parses a TOML file. serde's message names the offending key and line.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.display().to_string(),
            error,
        })?;
        Self::parse(&text).map_err(|error| match error {
            ConfigError::Parse { error, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                error,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: String::new(),
            error: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let field = |field, reason: &str| {
            Err(ConfigError::Field {
                field,
                reason: reason.into(),
            })
        };
        match (&self.root_key_file, &self.root_key_env) {
            (None, None) => return field("root_key_file", "set root_key_file or root_key_env"),
            (Some(_), Some(_)) => {
                return field(
                    "root_key_env",
                    "set only one of root_key_file and root_key_env",
                );
            }
            _ => {}
        }
        if self.limits.max_secret_bytes == 0 || self.limits.max_secret_bytes > 64 << 20 {
            return field("limits.max_secret_bytes", "must be between 1 and 67108864");
        }
        if self.limits.rotate_after_encryptions == 0
            || self.limits.rotate_after_encryptions > 1 << 32
        {
            return field(
                "limits.rotate_after_encryptions",
                "must be between 1 and 2^32 (NIST SP 800-38D)",
            );
        }
        if self.limits.concurrency_per_connection == 0 {
            return field("limits.concurrency_per_connection", "must be at least 1");
        }
        if self.limits.request_timeout_ms == 0 {
            return field("limits.request_timeout_ms", "must be at least 1");
        }
        if self.cache_mb == 0 {
            return field("cache_mb", "must be at least 1");
        }
        Ok(())
    }

    pub fn vault_options(&self) -> VaultOptions {
        VaultOptions {
            max_secret_bytes: self.limits.max_secret_bytes,
            max_versions: self.limits.max_versions,
            rotate_after_encryptions: self.limits.rotate_after_encryptions,
            rotation: Default::default(),
        }
    }

    pub fn server_limits(&self) -> Limits {
        Limits {
            concurrency_per_connection: self.limits.concurrency_per_connection,
            request_timeout: Duration::from_millis(self.limits.request_timeout_ms),
            keepalive_interval: Duration::from_millis(self.limits.keepalive_interval_ms.max(1)),
            ..Limits::for_secret_limit(self.limits.max_secret_bytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
data_dir = "data/store"
root_key_file = "data/root.key"
policy_file = "data/policy.toml"
[tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"
"#;

    #[test]
    fn minimal_config_gets_loopback_and_defaults() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(config.listen, default_listen());
        assert!(config.listen.ip().is_loopback());
        assert_eq!(config.limits.max_secret_bytes, 1 << 20);
        assert_eq!(
            config.server_limits().max_message_bytes,
            (1 << 20) + (64 << 10)
        );
    }

    #[test]
    fn example_config_parses() {
        let config = Config::parse(include_str!("../examples/credvault.toml")).unwrap();
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(config.listen.ip().is_loopback());
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::parse(&format!("{MINIMAL}\n[limits]\nmax_secrets = 5\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_secrets"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = Config::parse(&format!(
            "{MINIMAL}\n[limits]\nrotate_after_encryptions = 0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("limits.rotate_after_encryptions"), "{err}");
        let err = Config::parse(&MINIMAL.replace("root_key_file = \"data/root.key\"", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("root_key_file"), "{err}");
        let err = Config::parse(&format!("listen = \"nonsense\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
    }
}
