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
use crate::vault::{RotationOptions, VaultOptions};

/// The whole configuration, as in the TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Address to listen on (default 127.0.0.1:7443; loopback unless told otherwise).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where Prometheus metrics are served, plain HTTP at `/metrics` (off
    /// unless set; e.g. 127.0.0.1:9464).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
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
    /// Rotation schedules and job pacing.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// Tenant lifecycle and the revocation event log.
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
    /// The audit log's retention.
    #[serde(default)]
    pub audit: AuditConfig,
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
    /// Refuse the clients of a CA whose CRL is past its "next update" (at the
    /// handshake, and on every call of an open connection), instead of going
    /// on with the stale list. Needs `crl`.
    #[serde(default)]
    pub refuse_stale_crl: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_secret_bytes: usize,
    pub max_versions: u32,
    pub rotate_after_encryptions: u64,
    pub concurrency_per_connection: usize,
    pub concurrency_per_caller: usize,
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
            concurrency_per_caller: limits.concurrency_per_caller,
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

/// The `[rotation]` section. Durations are text (`"90d"`, `"12h"`, `"30m"`,
/// `"45s"`, or `"off"` where a schedule may be turned off), checked by
/// [`Config::validate`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Age at which the primary KEK is replaced (`"off"`: only on demand).
    pub kek_period: String,
    /// Age at which a tenant's primary DEK is replaced (`"off"`: only on demand).
    pub dek_period: String,
    /// Whether a scheduled DEK rotation also re-encrypts the tenant's credentials
    /// (so that the old DEK retires and can be destroyed).
    pub reencrypt_on_schedule: bool,
    /// How long after it stopped being the primary a retired version that
    /// protects nothing is destroyed (`"off"`: only by `keys destroy`).
    pub destroy_retired_after: String,
    /// Records per job batch (each batch is one atomic write).
    pub batch_size: usize,
    /// Pause between a job's batches, in ms (throttles its share of the machine).
    pub batch_pause_ms: u64,
    /// How often the server checks the schedules (at least 1s). Jobs started
    /// on demand begin at once, whatever this says.
    pub check_interval: String,
}

impl Default for RotationConfig {
    fn default() -> Self {
        let options = RotationOptions::default();
        Self {
            kek_period: "90d".into(),
            dek_period: "30d".into(),
            reencrypt_on_schedule: options.reencrypt_on_schedule,
            destroy_retired_after: "7d".into(),
            batch_size: options.batch_size,
            batch_pause_ms: options.batch_pause_ms,
            check_interval: "60s".into(),
        }
    }
}

/// The `[lifecycle]` section: the revocation event log and its watchers.
/// Durations as in `[rotation]`.
///
/// Shredding has no interval of its own: the background task that checks the
/// rotation schedules (every `rotation.check_interval`) also shreds the
/// tenants whose grace period is over and prunes the event log, and a
/// `DeleteTenant` or legal-hold release wakes it at once, so a deletion with
/// no grace period is shredded within moments.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// How long revocation events are kept for watchers that reconnect
    /// (`"off"`: for ever). A watcher asking for an older sequence gets
    /// EVENTS_PRUNED and must resync.
    pub event_retention: String,
    /// How long a `WatchRevocations` stream may stay silent before a KEEPALIVE
    /// is sent (at least 1s).
    pub watch_keepalive: String,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        Self {
            event_retention: "7d".into(),
            watch_keepalive: "15s".into(),
        }
    }
}

/// The default of `lifecycle.watch_keepalive`.
const DEFAULT_WATCH_KEEPALIVE: Duration = Duration::from_secs(15);
/// The default of `lifecycle.event_retention`.
const DEFAULT_EVENT_RETENTION: Duration = Duration::from_secs(7 * 86_400);

impl LifecycleConfig {
    /// How long events are kept (`None`: for ever), or the field's error.
    pub fn event_retention(&self) -> Result<Option<Duration>, ConfigError> {
        duration_field(
            "lifecycle.event_retention",
            &self.event_retention,
            true,
            Duration::from_secs(1),
        )
    }

    /// The keepalive interval of watch streams, or the field's error.
    pub fn watch_keepalive(&self) -> Result<Duration, ConfigError> {
        let keepalive = duration_field(
            "lifecycle.watch_keepalive",
            &self.watch_keepalive,
            false,
            Duration::from_secs(1),
        )?;
        Ok(keepalive.unwrap_or(DEFAULT_WATCH_KEEPALIVE))
    }
}

/// The `[audit]` section. Durations as in `[rotation]`.
///
/// Pruning has no interval of its own: the background task that checks the
/// rotation schedules (every `rotation.check_interval`) also deletes the audit
/// records older than `retention`, keeping the chain verifiable from its
/// anchor (and never the newest record).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// How long audit records are kept (`"off"`: for ever; otherwise at least 1s).
    pub retention: String,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            retention: "90d".into(),
        }
    }
}

/// The default of `audit.retention`.
const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(90 * 86_400);

impl AuditConfig {
    /// How long audit records are kept (`None`: for ever), or the field's error.
    pub fn retention(&self) -> Result<Option<Duration>, ConfigError> {
        duration_field(
            "audit.retention",
            &self.retention,
            true,
            Duration::from_secs(1),
        )
    }
}

/// Parses a duration: a whole number and a unit, `s`, `m`, `h` or `d`
/// (`"90d"`); `"off"` is `None`. Also used by the command line (`--grace 7d`).
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    const EXPECTED: &str =
        "expected a whole number and a unit (s, m, h or d), such as \"90d\" or \"45s\", or \"off\"";
    let text = text.trim();
    if text == "off" {
        return Ok(None);
    }
    let Some(unit) = text.chars().last() else {
        return Err(format!("empty; {EXPECTED}"));
    };
    let seconds: u64 = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{text:?} has no unit; {EXPECTED}")),
    };
    let number = &text[..text.len() - 1];
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{text:?} is not a duration; {EXPECTED}"));
    }
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(seconds))
        // Kept in milliseconds downstream: leave room for that.
        .filter(|s| s.checked_mul(1000).is_some())
        .map(|s| Some(Duration::from_secs(s)))
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// A duration field: parsed, with the field named in any error; `off_allowed`
/// says whether `"off"` is accepted, `min` is the least accepted value.
fn duration_field(
    field: &'static str,
    text: &str,
    off_allowed: bool,
    min: Duration,
) -> Result<Option<Duration>, ConfigError> {
    let error = |reason: String| ConfigError::Field { field, reason };
    match parse_duration(text).map_err(error)? {
        None if !off_allowed => Err(error("cannot be \"off\"".into())),
        Some(d) if d < min => Err(error(format!(
            "{text:?} is too short: the least is {}s",
            min.as_secs()
        ))),
        parsed => Ok(parsed),
    }
}

fn ms(duration: Option<Duration>) -> Option<u64> {
    duration.map(|d| d.as_millis() as u64)
}

impl RotationConfig {
    /// The vault's rotation options, or the first bad field.
    pub fn options(&self) -> Result<RotationOptions, ConfigError> {
        const SECOND: Duration = Duration::from_secs(1);
        if self.batch_size == 0 {
            return Err(ConfigError::Field {
                field: "rotation.batch_size",
                reason: "must be at least 1".into(),
            });
        }
        Ok(RotationOptions {
            kek_period_ms: ms(duration_field(
                "rotation.kek_period",
                &self.kek_period,
                true,
                SECOND,
            )?),
            dek_period_ms: ms(duration_field(
                "rotation.dek_period",
                &self.dek_period,
                true,
                SECOND,
            )?),
            reencrypt_on_schedule: self.reencrypt_on_schedule,
            destroy_retired_after_ms: ms(duration_field(
                "rotation.destroy_retired_after",
                &self.destroy_retired_after,
                true,
                Duration::ZERO,
            )?),
            batch_size: self.batch_size,
            batch_pause_ms: self.batch_pause_ms,
        })
    }

    /// How often the schedules are checked.
    pub fn check_interval(&self) -> Result<Duration, ConfigError> {
        let interval = duration_field(
            "rotation.check_interval",
            &self.check_interval,
            false,
            Duration::from_secs(1),
        )?;
        Ok(interval.unwrap_or(DEFAULT_CHECK_INTERVAL))
    }
}

/// The default of `rotation.check_interval`.
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(60);

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7443))
}

/// sled's page cache when the configuration does not say, in MiB.
pub const DEFAULT_CACHE_MB: u64 = 256;

fn default_cache_mb() -> u64 {
    DEFAULT_CACHE_MB
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
        if self.limits.concurrency_per_caller == 0 {
            return field("limits.concurrency_per_caller", "must be at least 1");
        }
        if self.limits.request_timeout_ms == 0 {
            return field("limits.request_timeout_ms", "must be at least 1");
        }
        if self.cache_mb == 0 {
            return field("cache_mb", "must be at least 1");
        }
        if self.tls.refuse_stale_crl && self.tls.crl.is_none() {
            return field(
                "tls.refuse_stale_crl",
                "needs tls.crl: there is no CRL to go stale",
            );
        }
        self.rotation.options()?;
        self.rotation.check_interval()?;
        self.lifecycle.event_retention()?;
        self.lifecycle.watch_keepalive()?;
        self.audit.retention()?;
        Ok(())
    }

    /// The vault's options. On a config that did not pass [`Config::validate`]
    /// (every loaded one did), bad rotation values give the defaults.
    pub fn vault_options(&self) -> VaultOptions {
        VaultOptions {
            max_secret_bytes: self.limits.max_secret_bytes,
            max_versions: self.limits.max_versions,
            rotate_after_encryptions: self.limits.rotate_after_encryptions,
            rotation: self.rotation.options().unwrap_or_default(),
            // A server always writes audit records.
            audit: true,
            ..VaultOptions::default()
        }
    }

    /// How often the server's background task checks the rotation schedules
    /// (the default on a config that did not pass [`Config::validate`]).
    pub fn check_interval(&self) -> Duration {
        self.rotation
            .check_interval()
            .unwrap_or(DEFAULT_CHECK_INTERVAL)
    }

    /// How long revocation events are kept (`None`: for ever; the default on a
    /// config that did not pass [`Config::validate`]).
    pub fn event_retention(&self) -> Option<Duration> {
        self.lifecycle
            .event_retention()
            .unwrap_or(Some(DEFAULT_EVENT_RETENTION))
    }

    /// How long audit records are kept (`None`: for ever; the default on a
    /// config that did not pass [`Config::validate`]).
    pub fn audit_retention(&self) -> Option<Duration> {
        self.audit
            .retention()
            .unwrap_or(Some(DEFAULT_AUDIT_RETENTION))
    }

    pub fn server_limits(&self) -> Limits {
        Limits {
            watch_keepalive: self
                .lifecycle
                .watch_keepalive()
                .unwrap_or(DEFAULT_WATCH_KEEPALIVE),
            concurrency_per_connection: self.limits.concurrency_per_connection,
            concurrency_per_caller: self.limits.concurrency_per_caller,
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

    /// Each `(line, field, why)`: the line in `[section]` is refused with an
    /// error that starts by naming `field` and says `why`.
    fn assert_each_names_its_field(section: &str, cases: &[(&str, &str, &str)]) {
        for (line, field, why) in cases {
            let err = Config::parse(&format!("{MINIMAL}\n[{section}]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with(&format!("config field `{field}`: ")),
                "{line}: {err}"
            );
            assert!(err.contains(why), "{line}: {err}");
        }
    }

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
        let err = Config::parse(&format!("metrics_listen = \"9464\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics_listen"), "{err}");
    }

    #[test]
    fn refuse_stale_crl_needs_a_crl_and_is_off_by_default() {
        assert!(!Config::parse(MINIMAL).unwrap().tls.refuse_stale_crl);
        let err = Config::parse(&format!("{MINIMAL}refuse_stale_crl = true\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config field `tls.refuse_stale_crl`: ")
                && err.contains("needs tls.crl"),
            "{err}"
        );
        let config = Config::parse(&format!(
            "{MINIMAL}crl = \"certs/crl.pem\"\nrefuse_stale_crl = true\n"
        ))
        .unwrap();
        assert!(config.tls.refuse_stale_crl);
    }

    #[test]
    fn metrics_are_off_unless_an_address_is_given() {
        assert_eq!(Config::parse(MINIMAL).unwrap().metrics_listen, None);
        let config =
            Config::parse(&format!("metrics_listen = \"127.0.0.1:9464\"\n{MINIMAL}")).unwrap();
        assert_eq!(
            config.metrics_listen,
            Some(SocketAddr::from(([127, 0, 0, 1], 9464)))
        );
    }

    #[test]
    fn durations_are_a_number_and_a_unit_or_off() {
        let parsed = |text| parse_duration(text).unwrap();
        assert_eq!(parsed("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parsed("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parsed("12h"), Some(Duration::from_secs(43_200)));
        assert_eq!(parsed(" 90d "), Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(parsed("0s"), Some(Duration::ZERO));
        assert_eq!(parsed("off"), None);
        for bad in [
            "", "d", "90", "1.5h", "-1d", "+1d", "90 d", "1w", "OFF", "ninety d", "1e3s",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("such as \"90d\""), "{bad:?}: {err}");
        }
        let err = parse_duration("99999999999999999999d").unwrap_err();
        assert!(err.contains("too long"), "{err}");
        let err = parse_duration(&format!("{}d", u64::MAX / 86_400)).unwrap_err();
        assert!(err.contains("too long"), "{err}");
    }

    #[test]
    fn rotation_defaults_match_the_vault_and_every_value_reaches_it() {
        let config = Config::parse(MINIMAL).unwrap();
        let (ours, vault) = (config.vault_options().rotation, RotationOptions::default());
        assert_eq!(ours.kek_period_ms, vault.kek_period_ms);
        assert_eq!(ours.dek_period_ms, vault.dek_period_ms);
        assert_eq!(ours.reencrypt_on_schedule, vault.reencrypt_on_schedule);
        assert_eq!(
            ours.destroy_retired_after_ms,
            vault.destroy_retired_after_ms
        );
        assert_eq!(ours.batch_size, vault.batch_size);
        assert_eq!(ours.batch_pause_ms, vault.batch_pause_ms);
        assert_eq!(config.check_interval(), Duration::from_secs(60));

        let config = Config::parse(&format!(
            "{MINIMAL}\n[rotation]\nkek_period = \"off\"\ndek_period = \"12h\"\n\
             reencrypt_on_schedule = false\ndestroy_retired_after = \"off\"\n\
             batch_size = 7\nbatch_pause_ms = 3\ncheck_interval = \"5m\"\n"
        ))
        .unwrap();
        let rotation = config.vault_options().rotation;
        assert_eq!(rotation.kek_period_ms, None);
        assert_eq!(rotation.dek_period_ms, Some(12 * 3600 * 1000));
        assert!(!rotation.reencrypt_on_schedule);
        assert_eq!(rotation.destroy_retired_after_ms, None);
        assert_eq!((rotation.batch_size, rotation.batch_pause_ms), (7, 3));
        assert_eq!(config.check_interval(), Duration::from_secs(300));
    }

    #[test]
    fn lifecycle_defaults_and_values_reach_the_server() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(
            config.event_retention(),
            Some(Duration::from_secs(7 * 86_400))
        );
        assert_eq!(
            config.server_limits().watch_keepalive,
            Duration::from_secs(15)
        );
        let config = Config::parse(&format!(
            "{MINIMAL}\n[lifecycle]\nevent_retention = \"12h\"\nwatch_keepalive = \"2s\"\n"
        ))
        .unwrap();
        assert_eq!(config.event_retention(), Some(Duration::from_secs(43_200)));
        assert_eq!(
            config.server_limits().watch_keepalive,
            Duration::from_secs(2)
        );
        let config = Config::parse(&format!(
            "{MINIMAL}\n[lifecycle]\nevent_retention = \"off\"\n"
        ))
        .unwrap();
        assert_eq!(config.event_retention(), None);
    }

    #[test]
    fn bad_lifecycle_values_name_the_field() {
        let cases = [
            (
                "event_retention = \"7\"",
                "lifecycle.event_retention",
                "no unit",
            ),
            (
                "event_retention = \"0s\"",
                "lifecycle.event_retention",
                "too short",
            ),
            (
                "watch_keepalive = \"off\"",
                "lifecycle.watch_keepalive",
                "off",
            ),
            (
                "watch_keepalive = \"0s\"",
                "lifecycle.watch_keepalive",
                "too short",
            ),
        ];
        assert_each_names_its_field("lifecycle", &cases);
        let err = Config::parse(&format!(
            "{MINIMAL}\n[lifecycle]\nshred_check_interval = \"1m\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("shred_check_interval"), "{err}");
    }

    #[test]
    fn audit_retention_defaults_to_90_days_and_may_be_off() {
        let config = Config::parse(MINIMAL).unwrap();
        assert_eq!(
            config.audit_retention(),
            Some(Duration::from_secs(90 * 86_400))
        );
        let config = Config::parse(&format!("{MINIMAL}\n[audit]\nretention = \"12h\"\n")).unwrap();
        assert_eq!(config.audit_retention(), Some(Duration::from_secs(43_200)));
        let config = Config::parse(&format!("{MINIMAL}\n[audit]\nretention = \"off\"\n")).unwrap();
        assert_eq!(config.audit_retention(), None);
        let config = Config::parse(include_str!("../examples/credvault.toml")).unwrap();
        assert_eq!(
            config.audit_retention(),
            Some(Duration::from_secs(90 * 86_400))
        );
    }

    #[test]
    fn bad_audit_values_name_the_field() {
        let cases = [
            ("retention = \"nonsense\"", "no unit"),
            ("retention = \"90\"", "no unit"),
            ("retention = \"1.5d\"", "not a duration"),
            ("retention = \"0s\"", "too short"),
            ("retention = \"\"", "empty"),
        ];
        for (line, why) in cases {
            let err = Config::parse(&format!("{MINIMAL}\n[audit]\n{line}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("config field `audit.retention`: "),
                "{line}: {err}"
            );
            assert!(err.contains(why), "{line}: {err}");
        }
        let err = Config::parse(&format!("{MINIMAL}\n[audit]\nretain = \"9d\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("retain"), "{err}");
    }

    #[test]
    fn bad_rotation_values_name_the_field() {
        let cases = [
            ("kek_period = \"90\"", "rotation.kek_period", "no unit"),
            (
                "dek_period = \"1.5d\"",
                "rotation.dek_period",
                "not a duration",
            ),
            ("dek_period = \"0d\"", "rotation.dek_period", "too short"),
            (
                "destroy_retired_after = \"soon\"",
                "rotation.destroy_retired_after",
                "no unit",
            ),
            ("batch_size = 0", "rotation.batch_size", "at least 1"),
            ("check_interval = \"off\"", "rotation.check_interval", "off"),
            (
                "check_interval = \"0s\"",
                "rotation.check_interval",
                "too short",
            ),
        ];
        assert_each_names_its_field("rotation", &cases);
        let err = Config::parse(&format!("{MINIMAL}\n[rotation]\nkek_periods = \"9d\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kek_periods"), "{err}");
    }
}
