//! Start-up and shutdown: from a validated [`Config`] to a serving process.
//!
//! Order: root key → store (recovery) → vault (root key check, KEK ring) →
//! policy → TLS → background task → health SERVING → serve until the shutdown
//! signal → stop the background task, end the WatchRevocations streams, health
//! NOT_SERVING → stop accepting, finish in-flight calls → close the store (its
//! committer flushes whatever is queued).
//!
//! While it serves, health follows the vault: once the store refuses writes
//! or the audit log refuses records (both until a restart), the server and
//! its Vault service turn NOT_SERVING ([`follow_health`]).
//!
//! While it serves, `SIGHUP` reloads the TLS files and the policy ([`reload`]):
//! all of them or, if any fails to load, none.
//!
//! The background task drives rotation jobs (resuming any a previous run left
//! unfinished), checks the schedules, shreds the deleted tenants whose grace
//! period is over (finishing any shred a previous run left unfinished) and
//! prunes the revocation events older than `lifecycle.event_retention` and the
//! audit records older than `audit.retention` (a broken audit chain stops that
//! pruning and is logged at error level every round: it means tampering).
//! Stopping it between two awaits is safe: each job, shred and prune batch is
//! one atomic write, and the next start resumes from the last one.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::audit::{AuditError, Head};
use crate::authz::{CrlChecks, Policy, SharedPolicy};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::crypto::root;
use crate::service::{self, pb};
use crate::store::{SledStore, StoreOptions};
use crate::tls::{self, Revocations, ServerTls, ServerTlsFiles};
use crate::vault::Vault;

/// The names health reports on ("" is the whole server).
const SERVICES: [&str; 3] = [
    "",
    pb::vault_server::SERVICE_NAME,
    pb::admin_server::SERVICE_NAME,
];

/// Runs the server on `listener` until `shutdown` resolves, without metrics.
pub async fn run(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with_metrics(config, listener, None, shutdown).await
}

/// [`run`], also serving Prometheus metrics on `metrics` (plain HTTP,
/// `/metrics`) until the server stops.
pub async fn run_with_metrics(
    config: &Config,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // First, so that a SIGHUP during start-up (a store replaying its log can
    // take seconds) is a reload once serving, not the signal's default: exit.
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("listening for SIGHUP")?;
    let root_key = match (&config.root_key_file, &config.root_key_env) {
        (Some(path), _) => root::load_file(path)?,
        (None, Some(var)) => root::load_env(var)?,
        (None, None) => {
            anyhow::bail!("config field `root_key_file`: set root_key_file or root_key_env")
        }
    };
    let files = Files::load(config)?;
    files.record_gauges();
    let policy = SharedPolicy::new(files.policy, crl_checks(files.revocations, config));
    let tls = ServerTls::from(files.tls);
    let store = SledStore::open(&StoreOptions {
        cache_capacity: config.cache_mb << 20,
        ..StoreOptions::new(&config.data_dir)
    })
    .with_context(|| format!("data directory {}", config.data_dir.display()))?;
    let vault = Vault::open(
        Arc::new(store),
        root_key,
        Arc::new(SystemClock),
        config.vault_options(),
    )
    .await?;
    let vault = Arc::new(vault);

    let (mut health, health_service) = tonic_health::server::health_reporter();
    for name in SERVICES {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    let limits = config.server_limits();
    let streams = service::StreamShutdown::new();
    let router = service::router_with(
        vault.clone(),
        policy.clone(),
        &limits,
        health_service,
        &streams,
    )?;
    let listen = listener.local_addr()?;
    // Started once nothing can fail before the serve loop, which stops them.
    let reloader = reload_on_hangup(hangups, config.clone(), tls.clone(), policy);
    let rotation = tokio::spawn(background_task(
        vault.clone(),
        config.check_interval(),
        Retention {
            events: config.event_retention(),
            audit: config.audit_retention(),
        },
    ));
    let stop_rotation = rotation.abort_handle();
    let follower = tokio::spawn(follow_health(vault.clone(), health.clone()));
    let stop_follower = follower.abort_handle();
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(metrics) = metrics {
        if let Ok(at) = metrics.local_addr() {
            tracing::info!(%at, "metrics at http://{at}/metrics");
        }
        tokio::spawn(crate::metrics::serve(metrics, async {
            let _ = metrics_stopped.await;
        }));
    }
    tracing::info!(%listen, root_key_version = vault.root_version(), "credvault serving");

    let draining = async {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight calls");
        stop_rotation.abort();
        stop_follower.abort();
        reloader.abort();
        // Watch streams never end by themselves: end them, or the drain would
        // wait for their clients to leave.
        streams.begin();
        for name in SERVICES {
            health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
            // A health Watch stream (gRPC client-side health checking keeps one
            // open per connection) ends only when its status is removed; open, it
            // would hold the drain forever. Watchers have seen NOT_SERVING; put it
            // back for Check.
            health.clear_service_status(name).await;
            health
                .set_service_status(name, tonic_health::ServingStatus::NotServing)
                .await;
        }
    };
    let served = service::serve(router, listener, tls, limits.handshake_timeout, draining).await;
    drop(stop_metrics);
    // Also when serving failed: the task must let go of the vault.
    rotation.abort();
    follower.abort();
    reloader.abort();
    let _ = rotation.await; // cancelled: its vault handle is dropped
    let _ = follower.await;
    served?;
    // The last head, for whoever verifies this log against the server's logs.
    publish_audit_head(&vault, &mut None);
    drop(vault); // closes the store once the last handler is gone
    tracing::info!("credvault stopped");
    Ok(())
}

/// How often health follows the vault.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// What health reports NOT_SERVING on once the vault cannot do its work: the
/// whole server and the Vault service (the Admin service still answers, so
/// that `credvault status` can say why).
const UNSERVING: [&str; 2] = ["", pb::vault_server::SERVICE_NAME];

/// Turns health NOT_SERVING once the vault cannot do its work (its store
/// refuses writes, or its audit log refuses records: both last until a
/// restart), so that a load balancer or an orchestrator takes the server out
/// of rotation and restarts it.
async fn follow_health(vault: Arc<Vault>, health: tonic_health::server::HealthReporter) {
    let mut every = tokio::time::interval(HEALTH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let problem = loop {
        every.tick().await;
        if let Some(problem) = vault.serving_problem() {
            break problem;
        }
    };
    tracing::error!(%problem, "health NOT_SERVING until a restart");
    for name in UNSERVING {
        health
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
    }
}

/// The files a server reads at start and again on `SIGHUP`, loaded and
/// checked, not yet in force.
struct Files {
    policy: Policy,
    revocations: Revocations,
    tls: Arc<rustls::ServerConfig>,
    /// When the server certificate expires (seconds since the Unix epoch).
    certificate_expires: Option<i64>,
}

impl Files {
    /// Loads the policy file and the TLS files named in `config`; the error
    /// names the file that failed.
    fn load(config: &Config) -> anyhow::Result<Self> {
        let policy = Policy::load(&config.policy_file)
            .with_context(|| format!("policy file {}", config.policy_file.display()))?;
        let revocations = match &config.tls.crl {
            Some(crl) => tls::revocations(crl)?,
            None => Revocations::default(),
        };
        let tls = tls::server_config(&ServerTlsFiles {
            cert: &config.tls.cert,
            key: &config.tls.key,
            client_ca: &config.tls.client_ca,
            crl: config.tls.crl.as_deref(),
            refuse_stale_crl: config.tls.refuse_stale_crl,
        })?;
        Ok(Self {
            policy,
            revocations,
            tls,
            certificate_expires: tls::not_after(&config.tls.cert),
        })
    }

    /// Sets the gauges of the files about to be put in force.
    fn record_gauges(&self) {
        let metrics = crate::metrics::global();
        metrics
            .server_certificate_expiry
            .set(self.certificate_expires.unwrap_or(0));
        metrics
            .crl_next_update
            .set(self.revocations.next_update().unwrap_or(0));
    }
}

/// Reads the policy file and the TLS files named in `config` again (server
/// certificate and key, client CA bundle, CRL) and, only if every one of them
/// loads, puts them in force: each TLS handshake from then on uses the new
/// certificate, CAs and CRL, and each call from then on, on connections
/// already open too, is checked against the new policy and refused if the new
/// CRL revokes the certificate its connection was made with. If anything
/// fails to load, nothing changes and the error says which file. The rest of
/// the configuration (paths, listen address, limits) is read only at start-up.
pub fn reload(config: &Config, tls: &ServerTls, policy: &SharedPolicy) -> anyhow::Result<()> {
    let files = Files::load(config)?;
    files.record_gauges();
    tracing::info!(
        grants = files.policy.grant_count(),
        certificate_expires = files.certificate_expires,
        revoked = files.revocations.certificates.len(),
        "reloaded the TLS files and the policy"
    );
    policy.replace(files.policy, crl_checks(files.revocations, config));
    tls.replace(files.tls);
    Ok(())
}

/// What the CRL makes `authorise` refuse on every call: its revoked
/// certificates, and its stale issuers when `tls.refuse_stale_crl` is set.
fn crl_checks(revocations: Revocations, config: &Config) -> CrlChecks {
    CrlChecks {
        revoked: revocations.certificates,
        stale_at: if config.tls.refuse_stale_crl {
            revocations.stale_at
        } else {
            HashMap::new()
        },
    }
}

/// Reloads ([`reload`]) on every `SIGHUP` until aborted.
fn reload_on_hangup(
    mut hangups: tokio::signal::unix::Signal,
    config: Config,
    tls: ServerTls,
    policy: SharedPolicy,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            let metrics = crate::metrics::global();
            match reload(&config, &tls, &policy) {
                Ok(()) => {
                    let _ = metrics.config_reloads.inc();
                }
                Err(error) => {
                    let _ = metrics.config_reload_failures.inc();
                    tracing::error!(
                        error = format!("{error:#}"),
                        "reload refused: the previous TLS files and policy stay in force"
                    );
                }
            }
        }
    })
}

/// The pause after a failed round of the background task (at most the check interval).
const FAILURE_PAUSE: Duration = Duration::from_secs(5);

/// How long the background task keeps revocation events and audit records
/// (`None`: for ever).
#[derive(Debug, Clone, Copy)]
struct Retention {
    events: Option<Duration>,
    audit: Option<Duration>,
}

/// The background task: runs the rotation jobs, the schedules, the shredder,
/// the event pruning and the audit pruning, then waits to be woken (a rotation job started by an
/// Admin call, a tenant deleted or released from a legal hold) or for the
/// check interval. Errors are logged and retried on the next round; it never
/// ends by itself.
async fn background_task(vault: Arc<Vault>, check_interval: Duration, retention: Retention) {
    let mut published = None;
    loop {
        // Registered before the jobs run, so that a job started while they
        // run wakes the next round instead of waiting for the interval.
        let started = vault.jobs_started().notified();
        tokio::pin!(started);
        started.as_mut().enable();

        let jobs = vault.run_jobs().await;
        let mut failed = false;
        if let Err(error) = jobs {
            tracing::error!(%error, reason = error.reason(), "rotation jobs failed; retrying later");
            failed = true;
        }
        match vault.run_schedules().await {
            Ok(jobs) => {
                for job in jobs {
                    tracing::info!(job = %job.id, kind = job.kind.name(), target_version = job.target_version, "scheduled rotation started");
                }
            }
            Err(error) => {
                tracing::error!(%error, reason = error.reason(), "rotation schedules failed; retrying later");
                failed = true;
            }
        }
        // Each shred logs itself; an error leaves the rest for the next round.
        if let Err(error) = vault.run_shredder().await {
            tracing::error!(%error, reason = error.reason(), "tenant shredding failed; retrying later");
            failed = true;
        }
        if let Some(cutoff) = cutoff(retention.events) {
            match vault.prune_events(cutoff).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "old revocation events pruned"),
                Err(error) => {
                    tracing::error!(%error, reason = error.reason(), "pruning revocation events failed; retrying later");
                    failed = true;
                }
            }
        }
        if let (Some(cutoff), Some(log)) = (cutoff(retention.audit), vault.audit_log()) {
            match log.prune(cutoff).await {
                Ok(0) => {}
                Ok(pruned) => tracing::info!(pruned, "old audit records pruned"),
                Err(AuditError::ChainBroken { sequence, reason }) => {
                    // Logged every round until someone looks: the store was
                    // written by something that does not hold the audit key.
                    tracing::error!(
                        first_bad_sequence = sequence,
                        %reason,
                        "AUDIT CHAIN BROKEN: the stored audit log was tampered with (or corrupted); \
                         audit pruning is stopped so that the evidence is kept; \
                         run `credvault audit verify` and investigate"
                    );
                    failed = true;
                }
                Err(error) => {
                    tracing::error!(%error, reason = error.reason(), "pruning audit records failed; retrying later");
                    failed = true;
                }
            }
        }
        match vault.root_and_primary_kek() {
            Ok((root, kek)) => {
                let metrics = crate::metrics::global();
                let seconds = |ms: u64| i64::try_from(ms / 1000).unwrap_or(i64::MAX);
                metrics.root_key_created.set(seconds(root.created_at_ms));
                metrics.primary_kek_created.set(seconds(kek.created_at_ms));
            }
            Err(error) => {
                tracing::error!(%error, reason = error.reason(), "reading the key status failed; retrying later");
                failed = true;
            }
        }
        if !publish_audit_head(&vault, &mut published) {
            failed = true;
        }
        if failed {
            // A persistent failure must not spin, however often jobs start.
            tokio::time::sleep(FAILURE_PAUSE.min(check_interval)).await;
        }

        tokio::select! {
            () = &mut started => {}
            () = tokio::time::sleep(check_interval) => {}
        }
    }
}

/// Logs the audit log's head ("audit head", its sequence number and MAC) if
/// it moved since `published`, and sets its gauge. Log lines leave the host,
/// where whoever can write the store cannot reach them: `credvault audit
/// verify --seen` against one catches the newest records being cut off.
/// False if the head could not be read.
fn publish_audit_head(vault: &Vault, published: &mut Option<Head>) -> bool {
    let Some(log) = vault.audit_log() else {
        return true;
    };
    match log.head() {
        Ok(Some(head)) if *published != Some(head) => {
            tracing::info!(sequence = head.sequence, head = %head, "audit head");
            let sequence = i64::try_from(head.sequence).unwrap_or(i64::MAX);
            crate::metrics::global().audit_head_sequence.set(sequence);
            *published = Some(head);
            true
        }
        Ok(_) => true,
        Err(error) => {
            tracing::error!(%error, reason = error.reason(), "reading the audit head failed; retrying later");
            false
        }
    }
}

/// The time before which records kept for `retention` may go (None: kept for ever).
fn cutoff(retention: Option<Duration>) -> Option<u64> {
    retention.map(|r| SystemClock.now_ms().saturating_sub(r.as_millis() as u64))
}
