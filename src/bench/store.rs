//! `credvault bench store`: the sealed store in-process, no gRPC.
//!
//! 1. raw AES-256-GCM open of a 2 KiB payload (one thread) — the crypto ceiling;
//! 2. unseal of a 2 KiB secret from a warm store of N credentials (one thread),
//!    taking turns with row 1 in [`SLICES`] slices;
//! 3. durable seal with 1, 8 and 64 concurrent writers, with group commit and
//!    with an fsync per write. The writer counts take turns in [`SLICES`]
//!    slices (order reversed every other round), so that the disk's latency,
//!    which drifts by 2× within a minute on a shared VM, weighs on the
//!    single-writer row and the 64-writer row alike.
//!
//! Bars: unseal ≥ 25 % of the raw-crypto rate; group-committed seal with 64
//! writers ≥ 10× the single-writer rate.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, RngExt};

use super::{Bar, Report, Row};
use crate::clock::SystemClock;
use crate::crypto::SymmetricKey;
use crate::crypto::aead;
use crate::store::{Durability, SledStore, StoreOptions};
use crate::vault::{Kind, SealRequest, Secret, Vault, VaultOptions};

/// Parameters of the store benchmark.
#[derive(Debug, Clone)]
pub struct Params {
    /// Credentials in the warm store.
    pub credentials: u64,
    /// Tenants they are spread over.
    pub tenants: u64,
    /// How long each timed measurement runs.
    pub seconds: f64,
    /// sled page cache of the benchmark stores, in bytes ("warm" = the working set fits).
    pub cache_bytes: u64,
    /// Where the JSON goes.
    pub out: PathBuf,
}

const PAYLOAD: usize = 2048;
/// Slices each durable-seal row's time is split into, taken in turns.
const SLICES: u32 = 5;
/// Writer counts of the durable-seal rows.
const WRITERS: [usize; 3] = [1, 8, 64];

/// The tenant of the `i`-th credential [`fill`] seals.
pub fn tenant_of(i: u64, tenants: u64) -> String {
    format!("tenant-{}", i % tenants)
}

/// The id of the `i`-th credential [`fill`] seals.
pub fn credential_of(i: u64) -> String {
    format!("cred-{i}")
}

/// Runs the scenario and returns its report (also printed and written by the caller).
pub async fn run(params: &Params) -> anyhow::Result<Report> {
    let mut report = Report::new("store");
    let budget = Duration::from_secs_f64(params.seconds);

    // 1. Warm store of N credentials.
    let dir = tempfile::tempdir()?;
    let vault = Arc::new(
        open_vault(
            dir.path().join("warm"),
            Durability::GroupCommit,
            params.cache_bytes,
        )
        .await?,
    );
    let started = Instant::now();
    fill(&vault, params.credentials, params.tenants).await?;
    let fill_elapsed = started.elapsed();
    // Warm: every credential read once (unmeasured), so that the measurement
    // sees the store as a server does after its first minute, not sled's
    // leaves as the fill left them.
    for i in 0..params.credentials {
        let unsealed = vault
            .unseal(&tenant_of(i, params.tenants), &credential_of(i), None)
            .await?;
        std::hint::black_box(unsealed.secret.expose());
    }

    // 2. Raw AES-256-GCM open of 2 KiB and unseal of 2 KiB from the warm
    // store, taking turns in slices.
    let key = SymmetricKey::generate();
    let nonce = [7u8; aead::NONCE_LEN];
    let sealed = aead::encrypt(&key, &nonce, b"aad", &[0x5a; PAYLOAD]);
    let mut rng = rand::rng();
    let (mut raw_ops, mut raw_elapsed) = (0u64, Duration::ZERO);
    let mut latencies = Vec::with_capacity(1 << 20);
    let mut unseal_elapsed = Duration::ZERO;
    for round in 0..SLICES {
        for raw_turn in [round % 2 == 0, round % 2 != 0] {
            if raw_turn {
                let (ops, elapsed) = timed(budget / SLICES, || {
                    std::hint::black_box(
                        aead::decrypt(&key, &nonce, b"aad", &sealed).expect("opens"),
                    );
                });
                raw_ops += ops;
                raw_elapsed += elapsed;
                continue;
            }
            let started = Instant::now();
            while started.elapsed() < budget / SLICES {
                for _ in 0..256 {
                    let i = rng.random_range(0..params.credentials);
                    let t = Instant::now();
                    let unsealed = vault
                        .unseal(&tenant_of(i, params.tenants), &credential_of(i), None)
                        .await?;
                    latencies.push(t.elapsed());
                    std::hint::black_box(unsealed.secret.expose());
                }
            }
            unseal_elapsed += started.elapsed();
        }
    }
    report.rows.push(Row::new(
        "raw AES-256-GCM open 2 KiB (1 thread)",
        raw_ops,
        raw_elapsed,
        None,
    ));
    report.rows.push(Row::new(
        format!("fill: seal {} credentials, 64 writers", params.credentials),
        params.credentials,
        fill_elapsed,
        None,
    ));
    report.rows.push(Row::new(
        "unseal 2 KiB, warm store (1 thread)",
        latencies.len() as u64,
        unseal_elapsed,
        Some(&mut latencies),
    ));
    drop(vault);

    // 3. Durable seals.
    for (durability, label) in [
        (Durability::GroupCommit, "group commit"),
        (Durability::PerWrite, "fsync per write"),
    ] {
        let vault = Arc::new(
            open_vault(
                dir.path().join(label.replace(' ', "-")),
                durability,
                params.cache_bytes,
            )
            .await?,
        );
        let mut tallies: Vec<(u64, Duration, Vec<Duration>)> =
            vec![(0, Duration::ZERO, Vec::new()); WRITERS.len()];
        for round in 0..SLICES {
            let order: Vec<usize> = if round % 2 == 0 {
                (0..WRITERS.len()).collect()
            } else {
                (0..WRITERS.len()).rev().collect()
            };
            for i in order {
                let (latencies, elapsed) = seal_load(&vault, WRITERS[i], budget / SLICES).await?;
                let tally = &mut tallies[i];
                tally.0 += latencies.len() as u64;
                tally.1 += elapsed;
                tally.2.extend(latencies);
            }
        }
        for (writers, (ops, elapsed, mut latencies)) in WRITERS.into_iter().zip(tallies) {
            report.rows.push(Row::new(
                format!("durable seal 2 KiB, {label}, {writers} writers"),
                ops,
                elapsed,
                Some(&mut latencies),
            ));
        }
    }

    let rate = |name: &str| report.row(name).map_or(0.0, |r| r.ops_per_sec);
    let unseal_ratio =
        rate("unseal 2 KiB, warm store (1 thread)") / rate("raw AES-256-GCM open 2 KiB (1 thread)");
    let commit_ratio = rate("durable seal 2 KiB, group commit, 64 writers")
        / rate("durable seal 2 KiB, group commit, 1 writers");
    let per_write_ratio = rate("durable seal 2 KiB, group commit, 64 writers")
        / rate("durable seal 2 KiB, fsync per write, 64 writers");
    report
        .bars
        .push(Bar::new("unseal / raw AES-GCM open", unseal_ratio, 0.25));
    report.bars.push(Bar::new(
        "seal 64 writers / 1 writer (group commit)",
        commit_ratio,
        10.0,
    ));
    report.bars.push(Bar::new(
        "seal 64 writers: group commit / fsync per write",
        per_write_ratio,
        1.0,
    ));
    Ok(report)
}

async fn open_vault(
    path: PathBuf,
    durability: Durability,
    cache_capacity: u64,
) -> anyhow::Result<Vault> {
    let store = SledStore::open(&StoreOptions {
        durability,
        cache_capacity,
        ..StoreOptions::new(path)
    })?;
    Ok(Vault::open(
        Arc::new(store),
        SymmetricKey::generate(),
        Arc::new(SystemClock),
        VaultOptions::default(),
    )
    .await?)
}

fn secret() -> Secret {
    let mut bytes = vec![0u8; PAYLOAD];
    rand::rng().fill_bytes(&mut bytes);
    Secret::new(bytes)
}

fn request(tenant: String, credential: String) -> SealRequest {
    SealRequest {
        tenant,
        credential,
        kind: Kind::CookieJar,
        secret: secret(),
        labels: Default::default(),
        expires_at_ms: None,
        expected_version: None,
    }
}

/// Seals `count` credentials over `tenants` tenants with 64 concurrent writers.
pub async fn fill(vault: &Arc<Vault>, count: u64, tenants: u64) -> anyhow::Result<()> {
    let next = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (vault, next) = (vault.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return anyhow::Ok(());
                    }
                    vault
                        .seal(request(tenant_of(i, tenants), credential_of(i)))
                        .await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// `writers` tasks seal new credentials for `budget`; returns every seal's
/// latency and the time taken.
async fn seal_load(
    vault: &Arc<Vault>,
    writers: usize,
    budget: Duration,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let vault = vault.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut i = 0u64;
                while started.elapsed() < budget {
                    let t = Instant::now();
                    vault
                        .seal(request(format!("t{}", w % 16), format!("r{run}-w{w}-{i}")))
                        .await?;
                    latencies.push(t.elapsed());
                    i += 1;
                }
                anyhow::Ok(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    Ok((latencies, started.elapsed()))
}

/// Runs `op` in batches until `budget` has passed; returns (count, elapsed).
fn timed(budget: Duration, mut op: impl FnMut()) -> (u64, Duration) {
    let started = Instant::now();
    let mut ops = 0;
    while started.elapsed() < budget {
        for _ in 0..1024 {
            op();
        }
        ops += 1024;
    }
    (ops, started.elapsed())
}
