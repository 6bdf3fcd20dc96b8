//! `credvault bench rotation`: rotation jobs in-process, over a durable sled
//! store, no gRPC (issue 4).
//!
//! Two stores, one after the other, each filled through the vault's own
//! durable seals:
//!
//! - **KEK**: N tenants with one small credential each, so N DEKs. `rotate_kek`,
//!   then `run_jobs` until the job is done: the DEKs rewrapped per second.
//! - **re-encryption**: one tenant with M credentials of 2 KiB.
//!   `rotate_tenant_key(tenant, true)`, then `run_jobs`: records per second.
//!
//! On each store, after the quiet job: unseal threads unseal random
//! credentials at rest for `seconds`, then keep going while the same rotation
//! runs a second time. Unseal ops/s is counted only over the time `run_jobs`
//! runs, and compared with the rate at rest. Every unseal that fails while the
//! threads run is counted (DESIGN §7: rotation under load loses no request).
//!
//! Bars: KEK rewrap ≥ 10,000 DEKs/s (100,000 in ≤ 10 s), re-encryption
//! ≥ 20,000 records/s, unseal during each job ≥ 0.70 of at rest, no unseal
//! fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, RngExt};
use serde::Serialize;

use super::store::{credential_of, tenant_of};
use super::{Bar, Report, Row};
use crate::clock::SystemClock;
use crate::crypto::SymmetricKey;
use crate::store::{Durability, SledStore, StoreOptions};
use crate::vault::{
    JobState, KeyStatus, Kind, RotationJob, RotationOptions, SealRequest, Secret, Vault,
    VaultOptions,
};

/// Parameters of the rotation benchmark.
#[derive(Debug, Clone)]
pub struct Params {
    /// KEK store: tenants, one small credential (so one DEK) each.
    pub tenants: u64,
    /// Re-encryption store: credentials of 2 KiB in one tenant.
    pub credentials: u64,
    /// How long unseal runs at rest before each loaded job.
    pub seconds: f64,
    /// Threads unsealing at rest and during the jobs.
    pub unseal_threads: usize,
    /// Concurrent writers that fill the stores.
    pub fill_writers: usize,
    /// sled page cache of the benchmark stores, in bytes.
    pub cache_bytes: u64,
    /// Job pacing (batch size, pause); the product's defaults unless overridden.
    pub rotation: RotationOptions,
    /// Where the JSON goes.
    pub out: PathBuf,
}

/// The secret of each tenant in the KEK store (an API key's size).
const SMALL_PAYLOAD: usize = 128;
/// The secret of each credential in the re-encryption store (a cookie jar).
const PAYLOAD: usize = 2048;
/// The one tenant of the re-encryption store.
const BIG_TENANT: &str = "bench-tenant";

const BAR_KEK_PER_SEC: f64 = 10_000.0;
const BAR_REENCRYPT_PER_SEC: f64 = 20_000.0;
const BAR_UNSEAL_RATIO: f64 = 0.70;

/// One run of a rotation job, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct JobRun {
    /// `quiet` or `under unseal load`.
    pub load: String,
    pub id: String,
    pub kind: String,
    pub target_version: u32,
    pub state: String,
    /// Progress as `rotation_job` reports it once `run_jobs` returned.
    pub done: u64,
    pub total: u64,
    /// What the job should have moved (DEKs, or live credential versions).
    pub expected: u64,
    /// `rotate_kek` / `rotate_tenant_key`: the new primary, one batch.
    pub start_seconds: f64,
    /// `run_jobs`, until it returned.
    pub run_seconds: f64,
    pub per_sec: f64,
}

/// Unseal while a job ran, against unseal at rest on the same store.
#[derive(Debug, Clone, Serialize)]
pub struct UnsealUnderLoad {
    pub job: String,
    pub threads: usize,
    pub at_rest_ops: u64,
    pub at_rest_seconds: f64,
    pub during_ops: u64,
    pub during_seconds: f64,
    pub ratio: f64,
    /// Unseals that failed at any time while the threads ran (warm-up, at rest,
    /// starting the rotation, during the job).
    pub failed: u64,
    pub first_error: Option<String>,
    /// Where the CPU went at rest and while the job ran.
    pub cpu_at_rest: CpuShare,
    pub cpu_during: CpuShare,
}

/// CPU use over a window, in cores (CPU seconds per second), from /proc
/// (10 ms ticks: coarse for windows under a second).
#[derive(Debug, Clone, Default, Serialize)]
pub struct CpuShare {
    /// The whole machine, every process.
    pub machine_busy: f64,
    pub machine_cores: f64,
    /// This process.
    pub process: f64,
    /// The unseal threads.
    pub unseal_threads: f64,
    /// This process less the unseal threads: the job, the store's committer
    /// and flusher, the runtime.
    pub rest_of_process: f64,
}

/// CPU counters at one moment, in seconds.
struct Cpu {
    machine_busy: f64,
    machine_total: f64,
    process: f64,
    unseal: f64,
}

impl Cpu {
    const TICK: f64 = 0.01;

    fn sample(unseal_tids: &[PathBuf]) -> Self {
        let (machine_busy, machine_total) = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|stat| {
                let line = stat.lines().next()?;
                let ticks: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .filter_map(|t| t.parse().ok())
                    .collect();
                let total: f64 = ticks.iter().take(8).sum();
                // idle and iowait
                let idle = ticks.get(3)? + ticks.get(4)?;
                Some(((total - idle) * Self::TICK, total * Self::TICK))
            })
            .unwrap_or_default();
        let unseal = unseal_tids
            .iter()
            .map(|tid| thread_cpu(&PathBuf::from("/proc").join(tid).join("stat")))
            .sum();
        Self {
            machine_busy,
            machine_total,
            process: thread_cpu(std::path::Path::new("/proc/self/stat")),
            unseal,
        }
    }

    fn since(&self, earlier: &Self, seconds: f64) -> CpuShare {
        let per_sec = |now: f64, then: f64| (now - then) / seconds;
        let process = per_sec(self.process, earlier.process);
        let unseal_threads = per_sec(self.unseal, earlier.unseal);
        CpuShare {
            machine_busy: per_sec(self.machine_busy, earlier.machine_busy),
            machine_cores: per_sec(self.machine_total, earlier.machine_total),
            process,
            unseal_threads,
            rest_of_process: process - unseal_threads,
        }
    }
}

/// utime + stime of a /proc `stat` file, in seconds (0 if unreadable).
fn thread_cpu(stat: &std::path::Path) -> f64 {
    std::fs::read_to_string(stat)
        .ok()
        .and_then(|s| {
            // The command name may hold spaces: count fields after its ')'.
            let fields: Vec<&str> = s.get(s.rfind(')')? + 2..)?.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) * Cpu::TICK)
        })
        .unwrap_or(0.0)
}

/// A correctness check on what the jobs left behind (not timing).
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
}

/// Everything one run measured: the common report plus the raw job figures.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    #[serde(flatten)]
    pub report: Report,
    pub tenants: u64,
    pub credentials: u64,
    pub batch_size: usize,
    pub batch_pause_ms: u64,
    pub fill_writers: usize,
    pub jobs: Vec<JobRun>,
    pub unseal: Vec<UnsealUnderLoad>,
    pub checks: Vec<Check>,
}

impl Results {
    /// Prints the table, the jobs and the checks, and writes the JSON to `out`.
    pub fn finish(&self, out: &std::path::Path) -> std::io::Result<()> {
        print!("{}", self.report.table());
        for j in &self.jobs {
            println!(
                "job {} ({}): {} {}/{} (expected {}), start {:.3} s, run_jobs {:.2} s",
                j.id, j.load, j.state, j.done, j.total, j.expected, j.start_seconds, j.run_seconds
            );
        }
        for u in &self.unseal {
            for (when, c) in [("at rest", &u.cpu_at_rest), ("during job", &u.cpu_during)] {
                println!(
                    "cpu, {} store, {when}: unseal threads {:.2}, rest of process {:.2}, \
                     machine {:.2} of {:.2} cores busy",
                    u.job, c.unseal_threads, c.rest_of_process, c.machine_busy, c.machine_cores
                );
            }
            let others = [&u.cpu_at_rest, &u.cpu_during]
                .iter()
                .map(|c| c.machine_busy - c.process)
                .fold(0.0, f64::max);
            if others > 0.25 {
                println!(
                    "WARNING: other processes used up to {others:.2} cores during the {} \
                     windows; the ratio is not a clean figure",
                    u.job
                );
            }
            println!(
                "unseal during {}: {} failed{}",
                u.job,
                u.failed,
                u.first_error
                    .as_deref()
                    .map_or_else(String::new, |e| format!(" (first: {e})"))
            );
        }
        for c in &self.checks {
            println!(
                "check: {:<60} {}",
                c.name,
                if c.pass { "ok" } else { "FAILED" }
            );
        }
        super::write_json(out, self)
    }
}

/// Where the unseal threads pick their credentials.
#[derive(Debug, Clone)]
enum Keyspace {
    /// `tenant-{i}` / `cred-{i}`, one credential per tenant.
    OneEach(u64),
    /// `cred-{i}` of one tenant.
    OneTenant(u64),
}

impl Keyspace {
    fn entry(&self, i: u64) -> (String, String) {
        match self {
            Keyspace::OneEach(n) => (tenant_of(i, *n), credential_of(i)),
            Keyspace::OneTenant(_) => (BIG_TENANT.to_owned(), credential_of(i)),
        }
    }

    fn len(&self) -> u64 {
        match self {
            Keyspace::OneEach(n) | Keyspace::OneTenant(n) => *n,
        }
    }
}

/// Runs the scenario and returns its results (printed and written by the caller).
pub async fn run(params: &Params) -> anyhow::Result<Results> {
    anyhow::ensure!(
        params.tenants > 0 && params.credentials > 0,
        "nothing to rotate"
    );
    let mut results = Results {
        report: Report::new("rotation"),
        tenants: params.tenants,
        credentials: params.credentials,
        batch_size: params.rotation.batch_size,
        batch_pause_ms: params.rotation.batch_pause_ms,
        fill_writers: params.fill_writers,
        jobs: Vec::new(),
        unseal: Vec::new(),
        checks: Vec::new(),
    };
    let dir = tempfile::tempdir()?;

    // 1. KEK rewrap over N tenants.
    {
        let vault = Arc::new(open_vault(dir.path().join("kek"), params).await?);
        let keyspace = Keyspace::OneEach(params.tenants);
        fill(
            &vault,
            &keyspace,
            SMALL_PAYLOAD,
            params.fill_writers,
            &mut results,
        )
        .await?;
        let n = params.tenants;
        let rotate = |vault: Arc<Vault>| async move { vault.rotate_kek().await };
        let quiet = rotation(&vault, rotate, "quiet", n).await?;
        results.report.rows.push(Row::new(
            format!("KEK rewrap {n} DEKs, quiet"),
            quiet.done,
            Duration::from_secs_f64(quiet.run_seconds),
            None,
        ));
        let rate = quiet.per_sec;
        results.jobs.push(quiet);
        let (loaded, unseal) = under_load(&vault, &keyspace, rotate, params, "KEK rewrap").await?;
        results.report.rows.push(Row::new(
            format!("KEK rewrap {n} DEKs, unseal load"),
            loaded.done,
            Duration::from_secs_f64(loaded.run_seconds),
            None,
        ));
        let target = loaded.target_version;
        results.jobs.push(loaded);
        push_unseal(&mut results, unseal, "KEK rewrap", SMALL_PAYLOAD);
        // The ledger after both jobs: the new primary wraps every DEK, the
        // older KEKs none.
        let status = vault.key_status(None)?;
        let kek_ok = status
            .keks
            .iter()
            .all(|k| k.wrapped_deks == if k.version == target { n } else { 0 });
        results.checks.push(Check {
            name: format!("ledger: KEK v{target} wraps all {n} DEKs, older KEKs none"),
            pass: kek_ok,
        });
        results.checks.push(Check {
            name: format!("every DEK record names KEK v{target}"),
            pass: status.deks.len() as u64 == n
                && status.deks.iter().all(|d| d.kek_version == target),
        });
        results.report.bars.push(Bar::new(
            format!("KEK rewrap, DEKs/s (100,000 in ≤ 10 s: ≥ {BAR_KEK_PER_SEC:.0})"),
            rate,
            BAR_KEK_PER_SEC,
        ));
    }

    // 2. Re-encryption of one tenant's M credentials.
    {
        let vault = Arc::new(open_vault(dir.path().join("reencrypt"), params).await?);
        let keyspace = Keyspace::OneTenant(params.credentials);
        fill(
            &vault,
            &keyspace,
            PAYLOAD,
            params.fill_writers,
            &mut results,
        )
        .await?;
        let m = params.credentials;
        let rotate =
            |vault: Arc<Vault>| async move { vault.rotate_tenant_key(BIG_TENANT, true).await };
        let quiet = rotation(&vault, rotate, "quiet", m).await?;
        results.report.rows.push(Row::new(
            format!("re-encrypt {m} × 2 KiB, quiet"),
            quiet.done,
            Duration::from_secs_f64(quiet.run_seconds),
            None,
        ));
        let rate = quiet.per_sec;
        results.jobs.push(quiet);
        let (loaded, unseal) =
            under_load(&vault, &keyspace, rotate, params, "re-encryption").await?;
        results.report.rows.push(Row::new(
            format!("re-encrypt {m} × 2 KiB, unseal load"),
            loaded.done,
            Duration::from_secs_f64(loaded.run_seconds),
            None,
        ));
        let target = loaded.target_version;
        results.jobs.push(loaded);
        push_unseal(&mut results, unseal, "re-encryption", PAYLOAD);
        let status = vault.key_status(Some(BIG_TENANT))?;
        results.checks.push(Check {
            name: format!("ledger: DEK v{target} protects all {m} records, older DEKs none"),
            pass: dek_ledger_ok(&status, target, m),
        });
        results.report.bars.push(Bar::new(
            format!("re-encryption, records/s (≥ {BAR_REENCRYPT_PER_SEC:.0})"),
            rate,
            BAR_REENCRYPT_PER_SEC,
        ));
    }

    // The unseal bars, after the job-rate bars.
    let ratios: Vec<_> = results
        .unseal
        .iter()
        .map(|u| (u.job.clone(), u.ratio))
        .collect();
    for (job, ratio) in ratios {
        results.report.bars.push(Bar::new(
            format!("unseal during {job} / at rest"),
            ratio,
            BAR_UNSEAL_RATIO,
        ));
    }
    let (attempted, failed) = results.unseal.iter().fold((0, 0), |(a, f), u| {
        (a + u.at_rest_ops + u.during_ops + u.failed, f + u.failed)
    });
    results.report.bars.push(Bar::new(
        "unseals that succeeded while rotating (fraction)",
        if attempted == 0 {
            0.0
        } else {
            1.0 - failed as f64 / attempted as f64
        },
        1.0,
    ));
    Ok(results)
}

fn dek_ledger_ok(status: &KeyStatus, target: u32, m: u64) -> bool {
    status
        .deks
        .iter()
        .all(|d| d.protected_versions == if d.version == target { m } else { 0 })
}

fn push_unseal(results: &mut Results, unseal: UnsealUnderLoad, job: &str, payload: usize) {
    let threads = unseal.threads;
    let size = if payload >= 1024 {
        format!("{} KiB", payload / 1024)
    } else {
        format!("{payload} B")
    };
    results.report.rows.push(Row::new(
        format!("unseal {size} at rest ({threads} thr)"),
        unseal.at_rest_ops,
        Duration::from_secs_f64(unseal.at_rest_seconds),
        None,
    ));
    results.report.rows.push(Row::new(
        format!("unseal {size} during {job} ({threads} thr)"),
        unseal.during_ops,
        Duration::from_secs_f64(unseal.during_seconds),
        None,
    ));
    results.unseal.push(unseal);
}

async fn open_vault(path: PathBuf, params: &Params) -> anyhow::Result<Vault> {
    // The store's normal durable settings: group commit, a log write +
    // fdatasync before a commit resolves.
    let store = SledStore::open(&StoreOptions {
        durability: Durability::GroupCommit,
        cache_capacity: params.cache_bytes,
        ..StoreOptions::new(path)
    })?;
    Ok(Vault::open(
        Arc::new(store),
        SymmetricKey::generate(),
        Arc::new(SystemClock),
        VaultOptions {
            rotation: params.rotation.clone(),
            ..VaultOptions::default()
        },
    )
    .await?)
}

/// Seals every credential of `keyspace` durably, `writers` at a time, and adds
/// the fill row. For one credential per tenant each seal also creates its
/// tenant and DEK (one more durable batch).
async fn fill(
    vault: &Arc<Vault>,
    keyspace: &Keyspace,
    payload: usize,
    writers: usize,
    results: &mut Results,
) -> anyhow::Result<()> {
    let count = keyspace.len();
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers.max(1))
        .map(|_| {
            let (vault, next, keyspace) = (vault.clone(), next.clone(), keyspace.clone());
            tokio::spawn(async move {
                let mut bytes = vec![0u8; payload];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        return anyhow::Ok(());
                    }
                    let (tenant, credential) = keyspace.entry(i);
                    rand::rng().fill_bytes(&mut bytes);
                    vault
                        .seal(SealRequest {
                            tenant,
                            credential,
                            kind: Kind::ApiKey,
                            secret: Secret::new(bytes.clone()),
                            labels: Default::default(),
                            expires_at_ms: None,
                            expected_version: None,
                        })
                        .await?;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let name = match keyspace {
        Keyspace::OneEach(n) => format!("fill {n} tenants × 1 × {payload} B"),
        Keyspace::OneTenant(n) => format!("fill 1 tenant × {n} × {payload} B"),
    };
    results
        .report
        .rows
        .push(Row::new(name, count, started.elapsed(), None));
    Ok(())
}

/// Starts a rotation with `rotate`, drives it with `run_jobs` (on the
/// runtime) and reads the job back.
async fn rotation<F, Fut>(
    vault: &Arc<Vault>,
    rotate: F,
    load: &str,
    expected: u64,
) -> anyhow::Result<JobRun>
where
    F: Fn(Arc<Vault>) -> Fut,
    Fut: Future<Output = crate::error::Result<RotationJob>>,
{
    let started = Instant::now();
    let job = rotate(vault.clone()).await?;
    let start_seconds = started.elapsed().as_secs_f64();
    let (job, run_seconds) = drive(vault, job).await?;
    Ok(job_run(job, load, expected, start_seconds, run_seconds))
}

/// `run_jobs` on the runtime until it returns; the job as it then stands and
/// the seconds it took.
async fn drive(vault: &Arc<Vault>, job: RotationJob) -> anyhow::Result<(RotationJob, f64)> {
    let started = Instant::now();
    let runner = vault.clone();
    tokio::spawn(async move { runner.run_jobs().await }).await??;
    let seconds = started.elapsed().as_secs_f64();
    let job = vault.rotation_job(&job.id)?;
    anyhow::ensure!(
        job.state == JobState::Done,
        "job {} is still {} after run_jobs returned ({}/{})",
        job.id,
        job.state.name(),
        job.done,
        job.total
    );
    Ok((job, seconds))
}

fn job_run(
    job: RotationJob,
    load: &str,
    expected: u64,
    start_seconds: f64,
    run_seconds: f64,
) -> JobRun {
    JobRun {
        load: load.to_owned(),
        kind: job.kind.name().to_owned(),
        state: job.state.name().to_owned(),
        target_version: job.target_version,
        done: job.done,
        total: job.total,
        expected,
        start_seconds,
        run_seconds,
        per_sec: job.done as f64 / run_seconds,
        id: job.id,
    }
}

/// What the unseal threads are counting. Each unseal counts in the phase that
/// was current when it started.
const WARMUP: u8 = 0;
const AT_REST: u8 = 1;
const STARTING: u8 = 2;
const DURING: u8 = 3;
const STOP: u8 = 4;

#[derive(Default)]
struct Tally {
    ok: [u64; 4],
    failed: u64,
    first_error: Option<String>,
}

/// Unseal threads at rest for `params.seconds`, then while the rotation runs
/// again: the job and the unseal rates, each over its own window.
async fn under_load<F, Fut>(
    vault: &Arc<Vault>,
    keyspace: &Keyspace,
    rotate: F,
    params: &Params,
    job_name: &str,
) -> anyhow::Result<(JobRun, UnsealUnderLoad)>
where
    F: Fn(Arc<Vault>) -> Fut,
    Fut: Future<Output = crate::error::Result<RotationJob>>,
{
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let tids = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handle = tokio::runtime::Handle::current();
    let threads: Vec<_> = (0..params.unseal_threads.max(1))
        .map(|_| {
            let (vault, keyspace, phase, handle) = (
                vault.clone(),
                keyspace.clone(),
                phase.clone(),
                handle.clone(),
            );
            let tids = tids.clone();
            // A plain thread, not a runtime task: the loop never yields, and
            // the job needs the runtime's workers.
            std::thread::Builder::new()
                .name("bench-unseal".into())
                .spawn(move || {
                    if let Ok(me) = std::fs::read_link("/proc/thread-self") {
                        tids.lock().expect("tids").push(me);
                    }
                    handle.block_on(hammer(&vault, &keyspace, &phase))
                })
                .expect("spawn an unseal thread")
        })
        .collect();
    let stop = |threads: Vec<std::thread::JoinHandle<Tally>>| {
        phase.store(STOP, Ordering::Relaxed);
        threads
            .into_iter()
            .map(|t| t.join().expect("unseal thread"))
            .fold(Tally::default(), |mut all, t| {
                for (a, b) in all.ok.iter_mut().zip(t.ok) {
                    *a += b;
                }
                all.failed += t.failed;
                all.first_error = all.first_error.or(t.first_error);
                all
            })
    };

    tokio::time::sleep(Duration::from_secs_f64(params.seconds.min(0.5))).await;
    let unseal_tids = tids.lock().expect("tids").clone();
    phase.store(AT_REST, Ordering::Relaxed);
    let cpu = Cpu::sample(&unseal_tids);
    let at_rest_started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(params.seconds)).await;
    phase.store(STARTING, Ordering::Relaxed);
    let at_rest_seconds = at_rest_started.elapsed().as_secs_f64();
    let cpu_at_rest = Cpu::sample(&unseal_tids).since(&cpu, at_rest_seconds);

    let started = Instant::now();
    let job = match rotate(vault.clone()).await {
        Ok(job) => job,
        Err(e) => {
            stop(threads);
            return Err(e.into());
        }
    };
    let start_seconds = started.elapsed().as_secs_f64();
    phase.store(DURING, Ordering::Relaxed);
    let cpu = Cpu::sample(&unseal_tids);
    let driven = drive(vault, job).await;
    let during_seconds = driven.as_ref().map_or(1.0, |(_, s)| *s);
    let cpu_during = Cpu::sample(&unseal_tids).since(&cpu, during_seconds);
    let tally = stop(threads);
    let (job, run_seconds) = driven?;

    let expected = keyspace.len();
    let at_rest_ops = tally.ok[AT_REST as usize];
    let during_ops = tally.ok[DURING as usize];
    let at_rest_rate = at_rest_ops as f64 / at_rest_seconds;
    let during_rate = during_ops as f64 / run_seconds;
    Ok((
        job_run(
            job,
            "under unseal load",
            expected,
            start_seconds,
            run_seconds,
        ),
        UnsealUnderLoad {
            job: job_name.to_owned(),
            threads: params.unseal_threads.max(1),
            at_rest_ops,
            at_rest_seconds,
            during_ops,
            during_seconds: run_seconds,
            ratio: during_rate / at_rest_rate,
            failed: tally.failed,
            first_error: tally.first_error,
            cpu_at_rest,
            cpu_during,
        },
    ))
}

/// One unseal thread: random credentials of `keyspace` until told to stop.
async fn hammer(vault: &Vault, keyspace: &Keyspace, phase: &AtomicU8) -> Tally {
    let mut rng = rand::rng();
    let mut tally = Tally::default();
    loop {
        let current = phase.load(Ordering::Relaxed);
        if current == STOP {
            return tally;
        }
        let (tenant, credential) = keyspace.entry(rng.random_range(0..keyspace.len()));
        match vault.unseal(&tenant, &credential, None).await {
            Ok(unsealed) => {
                std::hint::black_box(unsealed.secret.expose());
                tally.ok[current as usize] += 1;
            }
            Err(e) => {
                tally.failed += 1;
                tally
                    .first_error
                    .get_or_insert_with(|| format!("{tenant}/{credential}: {e}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny sizes: the jobs finish and move exactly what was filled. No timing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smoke() {
        let dir = tempfile::tempdir().unwrap();
        let params = Params {
            tenants: 12,
            credentials: 30,
            seconds: 0.05,
            unseal_threads: 1,
            fill_writers: 4,
            cache_bytes: 16 << 20,
            rotation: RotationOptions {
                batch_size: 7,
                ..RotationOptions::default()
            },
            out: dir.path().join("rotation.json"),
        };
        let results = run(&params).await.unwrap();
        assert_eq!(results.jobs.len(), 4);
        for job in &results.jobs {
            assert_eq!(job.state, "done", "{job:?}");
            assert_eq!(
                (job.done, job.total),
                (job.expected, job.expected),
                "{job:?}"
            );
        }
        assert_eq!(results.jobs[0].expected, 12);
        assert_eq!(results.jobs[2].expected, 30);
        for check in &results.checks {
            assert!(check.pass, "{}", check.name);
        }
        for unseal in &results.unseal {
            assert_eq!(unseal.failed, 0, "{unseal:?}");
        }
        results.finish(&params.out).unwrap();
        assert!(params.out.exists());
    }
}
