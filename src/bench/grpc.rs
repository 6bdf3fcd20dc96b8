//! `credvault bench grpc`: the gRPC server over real mutual TLS 1.3 on
//! 127.0.0.1, client and server in this one process.
//!
//! Set-up: a dev PKI generated into a temporary directory, a temporary sled
//! store (1 GiB cache) under a random root key, filled in-process with
//! [`super::store::fill`] (100,000 credentials of 2 KiB over 1,000 tenants by
//! default), then served with the product's stack: [`service::router`] (Vault,
//! Admin, health, reflection, with [`service::server_builder`]'s limits and
//! layers) plus the bench-only Echo service added to that same router, the
//! product's [`tls::server_config`], and [`service::serve`] (tokio-rustls
//! incoming, TCP_NODELAY). The client connects with [`crate::client::connect`] and
//! the dev PKI's executor certificate, so Unseal runs the real identity and
//! policy checks.
//!
//! Measurements, each with the same load shape (`in_flight` calls kept in
//! flight by as many tasks, spread round-robin over `connections` HTTP/2
//! connections), a warm-up, then a fixed duration, split into `rounds`
//! interleaved slices so that the ratios survive a machine whose load changes
//! during the run (other processes on a shared VM):
//! 1. Echo: a request about the size of an UnsealRequest, a 2 KiB reply — the
//!    transport floor;
//! 2. Unseal of a random credential (2 KiB secret, latest version);
//! 3. Health `Check`, for reference.
//!
//! Bars: Unseal throughput ≥ 0.80 × Echo throughput; Unseal p99 ≤ 1.5 × Echo
//! p99, reported as the ratio echo p99 / unseal p99 ≥ 1 / 1.5.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::store::{credential_of, tenant_of};
use super::{Bar, Report, Row};
use crate::authz::Policy;
use crate::clock::SystemClock;
use crate::crypto::SymmetricKey;
use crate::pki::{self, DevPkiPaths, DevRole};
use crate::service::{self, Limits, pb as vault_pb};
use crate::store::{SledStore, StoreOptions};
use crate::tls::{self, ServerTlsFiles};
use crate::vault::{Vault, VaultOptions};

/// Generated code of the bench-only Echo service (`proto/credvault/bench/v1`).
/// Compiled from its own descriptor set: the product's reflection does not list it.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("credvault.bench.v1");
}

/// Parameters of the gRPC benchmark.
#[derive(Debug, Clone)]
pub struct Params {
    /// Credentials in the warm store.
    pub credentials: u64,
    /// Tenants they are spread over.
    pub tenants: u64,
    /// How long each timed measurement runs, after its warm-up.
    pub seconds: f64,
    /// Warm-up before each call's first slice (same load, not recorded); later
    /// slices get a shorter settle.
    pub warmup_seconds: f64,
    /// Each call's `seconds` are split into this many slices, run round-robin
    /// (echo, unseal, health, then the reverse, …), so that a change in the
    /// machine's load during the run affects every row alike. 1 = each call
    /// once, for its whole duration.
    pub rounds: u32,
    /// Calls kept in flight (one task each).
    pub in_flight: usize,
    /// Client connections (HTTP/2 channels) the tasks are spread over.
    pub connections: usize,
    /// sled page cache of the store, in bytes.
    pub cache_bytes: u64,
    /// Where the JSON goes.
    pub out: PathBuf,
}

/// Size of the secret unsealed and of the echo reply.
const PAYLOAD: usize = 2048;
/// Warm-up before every slice after a call's first (the 64 calls in flight
/// refill within milliseconds).
const SETTLE_SECONDS: f64 = 0.25;
/// The `purpose` every benchmark Unseal states.
const PURPOSE: &str = "bench grpc";

pub const ECHO_ROW: &str = "echo, 2 KiB reply (transport floor)";
pub const UNSEAL_ROW: &str = "unseal 2 KiB, warm store, executor";
pub const HEALTH_ROW: &str = "health Check (reference)";

/// The bench-only Echo service: returns the request's payload padded to
/// `reply_size`. No identity, no policy, no store: the floor of one call.
#[derive(Debug, Clone)]
pub struct EchoService {
    max_reply: usize,
}

#[tonic::async_trait]
impl pb::echo_server::Echo for EchoService {
    async fn echo(
        &self,
        req: Request<pb::EchoRequest>,
    ) -> Result<Response<pb::EchoResponse>, Status> {
        let r = req.into_inner();
        let size = r.reply_size as usize;
        if size > self.max_reply {
            return Err(Status::invalid_argument(
                "reply_size is over the message limit",
            ));
        }
        let mut payload = r.payload;
        if payload.len() < size {
            payload.resize(size, 0);
        }
        Ok(Response::new(pb::EchoResponse { payload }))
    }
}

/// The Echo server with the same message limits as the product's services.
pub fn echo_server(limits: &Limits) -> pb::echo_server::EchoServer<EchoService> {
    pb::echo_server::EchoServer::new(EchoService {
        max_reply: limits.max_message_bytes.saturating_sub(64),
    })
    .max_decoding_message_size(limits.max_message_bytes)
    .max_encoding_message_size(limits.max_message_bytes)
}

/// What one measurement calls.
#[derive(Debug, Clone, Copy)]
pub(super) enum Call {
    Echo,
    Unseal,
    Health,
}

/// Runs the scenario and returns its report (printed and written by the caller).
pub async fn run(params: &Params) -> anyhow::Result<Report> {
    anyhow::ensure!(params.credentials > 0, "--credentials must be at least 1");
    anyhow::ensure!(
        (1..=params.credentials).contains(&params.tenants),
        "--tenants must be between 1 and --credentials"
    );
    anyhow::ensure!(params.connections > 0, "--connections must be at least 1");
    anyhow::ensure!(
        params.in_flight >= params.connections,
        "--in-flight must be at least --connections"
    );
    anyhow::ensure!(params.seconds > 0.0, "--seconds must be positive");
    anyhow::ensure!(params.rounds > 0, "--rounds must be at least 1");

    let mut report = Report::new("grpc");
    report.scenario = format!(
        "grpc: mTLS 1.3 on 127.0.0.1, {} in flight ({} connections × {} tasks), \
         {} s each in {} round-robin slices, {} s warm-up",
        params.in_flight,
        params.connections,
        params.in_flight.div_ceil(params.connections),
        params.seconds,
        params.rounds,
        params.warmup_seconds,
    );
    report.machine = machine();

    // Certificates, TLS, store, vault.
    let dir = tempfile::tempdir()?;
    let (certs, tls) = dev_tls(dir.path())?;
    let options = VaultOptions::default();
    let limits = Limits::for_secret_limit(options.max_secret_bytes);
    let vault = open_vault(&dir.path().join("data"), params.cache_bytes, options).await?;

    // Warm store, filled in-process before serving.
    eprintln!(
        "filling the store: {} credentials over {} tenants…",
        params.credentials, params.tenants
    );
    let started = Instant::now();
    super::store::fill(&vault, params.credentials, params.tenants).await?;
    report.rows.push(Row::new(
        format!(
            "fill {} creds/{} tenants (64 writers)",
            params.credentials, params.tenants
        ),
        params.credentials,
        started.elapsed(),
        None,
    ));

    // The product's router and server, plus the bench-only Echo.
    let health_service = serving_health().await;
    let router = service::router(
        vault.clone(),
        Arc::new(Policy::dev_default()),
        &limits,
        health_service,
    )?
    .add_service(echo_server(&limits));
    let server = Server::start(router, tls, &limits).await?;

    // Client connections, as the executor.
    let channels = connect(
        &certs,
        DevRole::Executor,
        server.address,
        params.connections,
    )
    .await?;

    let measured = async {
        let calls = [
            (Call::Echo, ECHO_ROW),
            (Call::Unseal, UNSEAL_ROW),
            (Call::Health, HEALTH_ROW),
        ];
        let slice = params.seconds / params.rounds as f64;
        let mut totals: Vec<(u64, Duration, Vec<Duration>)> = calls
            .iter()
            .map(|_| (0, Duration::ZERO, Vec::new()))
            .collect();
        for round in 0..params.rounds {
            // Even rounds echo → unseal → health, odd rounds the reverse, so a
            // drift in the machine's speed weighs on all of them alike.
            let mut order: Vec<usize> = (0..calls.len()).collect();
            if round % 2 == 1 {
                order.reverse();
            }
            let warmup = if round == 0 {
                params.warmup_seconds
            } else {
                params.warmup_seconds.min(SETTLE_SECONDS)
            };
            for k in order {
                let (call, name) = calls[k];
                eprintln!("round {}/{}: {name}…", round + 1, params.rounds);
                let slice_result = load(call, &channels, params, warmup, slice).await?;
                let total = &mut totals[k];
                total.0 += slice_result.ops;
                total.1 += slice_result.elapsed;
                total.2.extend(slice_result.latencies);
            }
        }
        for ((_, name), (ops, elapsed, mut latencies)) in calls.into_iter().zip(totals) {
            report
                .rows
                .push(Row::new(name, ops, elapsed, Some(&mut latencies)));
        }
        anyhow::Ok(())
    }
    .await;

    drop(channels);
    let served = server.stop().await;
    drop(vault); // closes the store before the temporary directory goes
    measured?;
    served?;

    let echo = report.row(ECHO_ROW).cloned();
    let unseal = report.row(UNSEAL_ROW).cloned();
    if let (Some(echo), Some(unseal)) = (echo, unseal) {
        report.bars.push(Bar::new(
            "throughput: unseal / echo",
            unseal.ops_per_sec / echo.ops_per_sec,
            0.80,
        ));
        if let (Some(echo_p99), Some(unseal_p99)) = (echo.p99_us, unseal.p99_us) {
            report.bars.push(Bar::new(
                "p99: echo / unseal (unseal p99 ≤ 1.5 × echo p99)",
                echo_p99 / unseal_p99,
                1.0 / 1.5,
            ));
        }
    }
    Ok(report)
}

/// What one [`load`] measured.
pub(super) struct Measured {
    /// Calls completed in the timed window.
    pub ops: u64,
    /// The timed window's length.
    pub elapsed: Duration,
    /// Their latencies, send to reply.
    pub latencies: Vec<Duration>,
    /// Every call that succeeded, warm-up and overrun included.
    pub succeeded: u64,
}

/// Keeps `params.in_flight` calls of `call` in flight over `channels` for
/// `warmup_seconds` and then `seconds`; returns the calls completed in the timed
/// window, its length, and their latencies. Any failed call fails the run.
pub(super) async fn load(
    call: Call,
    channels: &[Channel],
    params: &Params,
    warmup_seconds: f64,
    seconds: f64,
) -> anyhow::Result<Measured> {
    let begin = Instant::now() + Duration::from_secs_f64(warmup_seconds);
    let end = begin + Duration::from_secs_f64(seconds);
    // An Echo request as large as a typical Unseal request.
    let typical_unseal = unseal_request(params.credentials / 2, params.tenants);
    let echo_request = pb::EchoRequest {
        payload: vec![0x5a; typical_unseal.encoded_len()],
        reply_size: PAYLOAD as u32,
    };
    let tasks: Vec<_> = (0..params.in_flight)
        .map(|task| {
            let channel = channels[task % channels.len()].clone();
            let echo_request = echo_request.clone();
            let (credentials, tenants) = (params.credentials, params.tenants);
            tokio::spawn(async move {
                let mut echo = pb::echo_client::EchoClient::new(channel.clone());
                let mut vault = vault_pb::vault_client::VaultClient::new(channel.clone());
                let mut health = HealthClient::new(channel);
                let mut rng = SmallRng::seed_from_u64(task as u64);
                let mut latencies = Vec::with_capacity(1 << 14);
                let mut succeeded = 0u64;
                loop {
                    let started = Instant::now();
                    if started >= end {
                        break;
                    }
                    match call {
                        Call::Echo => {
                            let reply = echo.echo(echo_request.clone()).await?.into_inner();
                            anyhow::ensure!(reply.payload.len() == PAYLOAD, "short echo");
                        }
                        Call::Unseal => {
                            let i = rng.random_range(0..credentials);
                            let reply =
                                vault.unseal(unseal_request(i, tenants)).await?.into_inner();
                            anyhow::ensure!(reply.secret.len() == PAYLOAD, "short secret");
                        }
                        Call::Health => {
                            health
                                .check(HealthCheckRequest {
                                    service: String::new(),
                                })
                                .await?;
                        }
                    }
                    let done = Instant::now();
                    succeeded += 1;
                    if done >= begin && done < end {
                        latencies.push(done - started);
                    }
                }
                anyhow::Ok((latencies, succeeded))
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let mut succeeded = 0;
    for task in tasks {
        let (task_latencies, task_succeeded) = task.await??;
        latencies.extend(task_latencies);
        succeeded += task_succeeded;
    }
    Ok(Measured {
        ops: latencies.len() as u64,
        elapsed: end - begin,
        latencies,
        succeeded,
    })
}

fn unseal_request(i: u64, tenants: u64) -> vault_pb::UnsealRequest {
    vault_pb::UnsealRequest {
        tenant_id: tenant_of(i, tenants),
        credential_id: credential_of(i),
        version: None,
        purpose: PURPOSE.to_owned(),
    }
}

/// The dev PKI generated under `dir` (in `certs/`) and the product's server
/// TLS config for it (TLS 1.3, client certificate required).
pub(super) fn dev_tls(dir: &Path) -> anyhow::Result<(DevPkiPaths, Arc<rustls::ServerConfig>)> {
    let certs = pki::ensure_dev_pki(&dir.join("certs"))?;
    let tls = tls::server_config(&ServerTlsFiles {
        cert: &certs.server_cert(),
        key: &certs.server_key(),
        client_ca: &certs.ca_cert(),
        crl: None,
        refuse_stale_crl: false,
    })?;
    Ok((certs, tls))
}

/// A vault over a new sled store at `path` (`cache_bytes` of page cache,
/// the default group commit) under a random root key.
pub(super) async fn open_vault(
    path: &Path,
    cache_bytes: u64,
    options: VaultOptions,
) -> anyhow::Result<Arc<Vault>> {
    let store = SledStore::open(&StoreOptions {
        cache_capacity: cache_bytes,
        ..StoreOptions::new(path)
    })?;
    Ok(Arc::new(
        Vault::open(
            Arc::new(store),
            SymmetricKey::generate(),
            Arc::new(SystemClock),
            options,
        )
        .await?,
    ))
}

/// A health service that reports SERVING for the server and the Vault service.
pub(super) async fn serving_health()
-> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (health, health_service) = tonic_health::server::health_reporter();
    for name in ["", vault_pb::vault_server::SERVICE_NAME] {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    health_service
}

/// A router served by [`service::serve`] on a free port of 127.0.0.1.
pub(super) struct Server {
    pub address: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    pub(super) async fn start(
        router: service::GrpcRouter,
        tls: Arc<rustls::ServerConfig>,
        limits: &Limits,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(service::serve(
            router,
            listener,
            tls,
            limits.handshake_timeout,
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            address,
            stop,
            task,
        })
    }

    /// Shuts down gracefully (in-flight calls finish) and returns how serving ended.
    pub(super) async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await?
    }
}

/// `n` client connections to `address` with the dev certificate of `role`.
pub(super) async fn connect(
    certs: &DevPkiPaths,
    role: DevRole,
    address: SocketAddr,
    n: usize,
) -> anyhow::Result<Vec<Channel>> {
    let (cert, key) = certs.client(role);
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n {
        channels.push(
            crate::client::connect(&address.to_string(), &certs.ca_cert(), &cert, &key)
                .await
                .context("connecting to the benchmark server")?,
        );
    }
    Ok(channels)
}

/// "N cores, CPU model" (the model from /proc/cpuinfo, when there is one).
pub(super) fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        });
    match model {
        Some(model) => format!("{cores} cores, {model}"),
        None => format!("{cores} cores"),
    }
}
