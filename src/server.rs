//! Start-up and shutdown: from a validated [`Config`] to a serving process.
//!
//! Order: root key → store (recovery) → vault (root key check, KEK ring) →
//! policy → TLS → health SERVING → serve until the shutdown signal → health
//! NOT_SERVING → stop accepting, finish in-flight calls → close the store
//! (its committer flushes whatever is queued).

use std::future::Future;
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::authz::Policy;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::crypto::root;
use crate::service::{self, pb};
use crate::store::{SledStore, StoreOptions};
use crate::tls::{self, ServerTlsFiles};
use crate::vault::Vault;

/// The names health reports on ("" is the whole server).
const SERVICES: [&str; 3] = [
    "",
    pb::vault_server::SERVICE_NAME,
    pb::admin_server::SERVICE_NAME,
];

/// Runs the server on `listener` until `shutdown` resolves.
pub async fn run(
    config: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let root_key = match (&config.root_key_file, &config.root_key_env) {
        (Some(path), _) => root::load_file(path)?,
        (None, Some(var)) => root::load_env(var)?,
        (None, None) => {
            anyhow::bail!("config field `root_key_file`: set root_key_file or root_key_env")
        }
    };
    let policy = Policy::load(&config.policy_file)
        .with_context(|| format!("policy file {}", config.policy_file.display()))?;
    let tls = tls::server_config(&ServerTlsFiles {
        cert: &config.tls.cert,
        key: &config.tls.key,
        client_ca: &config.tls.client_ca,
        crl: config.tls.crl.as_deref(),
    })?;
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
    let router = service::router(vault.clone(), Arc::new(policy), &limits, health_service)?;
    tracing::info!(listen = %listener.local_addr()?, root_key_version = vault.root_version(), "credvault serving");

    let draining = async {
        shutdown.await;
        tracing::info!("shutting down: draining in-flight calls");
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
    service::serve(router, listener, tls, limits.handshake_timeout, draining).await?;
    drop(vault); // closes the store once the last handler is gone
    tracing::info!("credvault stopped");
    Ok(())
}
