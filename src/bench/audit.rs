//! `credvault bench audit`: what the audit log and the revocation watch cost,
//! over real mutual TLS 1.3 on 127.0.0.1, client and servers in this one process.
//!
//! Set-up as in [`super::grpc`]: a dev PKI in a temporary directory, the
//! product's router ([`service::router_with`]), TLS config and
//! [`service::serve`]. Two servers run side by side, each over its own sled
//! store (1 GiB cache, random root key) filled in-process with
//! [`super::store::fill`] the same way (100,000 credentials of 2 KiB over
//! 1,000 tenants by default):
//! - **audited**: [`VaultOptions::audit`] on, as every real server: the Unseal
//!   handler's record is durable (group commit) before the secret is returned;
//! - **not audited**: the bench-only switch off, so the same handler writes no
//!   record. Nothing else differs.
//!
//! 1. Unseal of a random credential (2 KiB) as the executor, with the load
//!    shape of `bench grpc` ([`super::grpc::load`]: `in_flight` calls over
//!    `connections` connections), in `rounds` interleaved slices (audited, not
//!    audited, then the reverse, …) so that other load on the machine weighs on
//!    both alike. Bar: audited / not audited ≥ 0.85. Afterwards the audited
//!    vault's log must hold exactly one `Unseal`/`ok` record per Unseal that
//!    succeeded (warm-up included) and [`AuditLog::verify`] must pass, and the
//!    other vault must have no log at all: otherwise the ratio measures nothing.
//!    For reference (no bar), the same two vaults without gRPC: `in_flight`
//!    tasks calling [`Vault::unseal_as`] directly for 2 s, which tells the
//!    store's share of the cost from the transport's; their records (caller
//!    `bench-in-process`) are counted separately.
//! 2. Revoke → watcher: `watchers` `WatchRevocations` streams (every tenant,
//!    `after_sequence` 0) over `watch_connections` executor connections to the
//!    audited server; then, one at a time, `revocations` Revoke calls (settings
//!    role) of fresh credentials. For each (watcher, revoke) pair: the time
//!    from Revoke returning on the client to that watcher receiving the event.
//!    An event may arrive before Revoke returns (the watcher reads the change
//!    once it is applied, while the writer still waits for its fsync): those
//!    pairs are counted and enter the percentiles as 0. Each revoke waits until
//!    every watcher has its event (or 2 s) before the next. Bar: p99 ≤ 50 ms.
//!
//! CPU per phase (machine, this process, everything else) from /proc, and the
//! load average, go into the JSON: on a shared VM, check them before quoting.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use tokio::sync::Notify;

use super::grpc::{self, Call, Server};
use super::store::{credential_of, tenant_of};
use super::{Bar, CpuSample, CpuWindow, Report, Row};
use crate::audit::AuditLog;
use crate::authz::Policy;
use crate::pki::DevRole;
use crate::service::{self, Limits, StreamShutdown, pb};
use crate::vault::{Caller, Kind, SealRequest, Secret, Vault, VaultOptions};

/// Parameters of the audit benchmark.
#[derive(Debug, Clone)]
pub struct Params {
    /// Credentials in each warm store.
    pub credentials: u64,
    /// Tenants they are spread over.
    pub tenants: u64,
    /// How long each Unseal row is measured, after its warm-up.
    pub seconds: f64,
    /// Warm-up before each row's first slice; later slices get 0.25 s.
    pub warmup_seconds: f64,
    /// Each row's `seconds` are split into this many interleaved slices.
    pub rounds: u32,
    /// Unseal calls kept in flight.
    pub in_flight: usize,
    /// Client connections they are spread over.
    pub connections: usize,
    /// `WatchRevocations` streams open during the revocations.
    pub watchers: usize,
    /// Client connections the watchers are spread over.
    pub watch_connections: usize,
    /// Revoke calls, one at a time.
    pub revocations: usize,
    /// sled page cache of each store, in bytes.
    pub cache_bytes: u64,
    /// The audit journal's linger ([`VaultOptions::audit_linger`]).
    pub linger: std::time::Duration,
    /// Seconds of each row of the ceiling model run at the end (0: no ceiling).
    pub ceiling_seconds: f64,
    /// Where the JSON goes.
    pub out: PathBuf,
}

pub const AUDITED_ROW: &str = "unseal 2 KiB, audit records on";
pub const UNAUDITED_ROW: &str = "unseal 2 KiB, audit records off";
pub const IN_PROCESS_AUDITED_ROW: &str = "in-process unseal_as, records on (ref.)";
pub const IN_PROCESS_UNAUDITED_ROW: &str = "in-process unseal_as, records off (ref.)";
pub const REVOKE_ROW: &str = "Revoke call (settings, one at a time)";
pub const WATCH_ROW: &str = "revoke returned → watcher has event";
pub const WATCH_FROM_SENT_ROW: &str = "revoke sent → watcher has event";

/// Tenant of the credentials the revocation phase seals and revokes.
const REVOKE_TENANT: &str = "bench-revoke";
/// Caller identity of the in-process reference rows' records.
const IN_PROCESS_CALLER: &str = "bench-in-process";
/// Length of each in-process reference row, after a 0.5 s warm-up.
const IN_PROCESS_SECONDS: f64 = 2.0;
/// Settle before every slice after a row's first.
const SETTLE_SECONDS: f64 = 0.25;
/// How long a revoke waits for every watcher to have its event.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between one revoke's last delivery and the next revoke.
const REVOKE_GAP: Duration = Duration::from_millis(5);
/// The latency bar of the revocation watch.
const WATCH_P99_BAR: Duration = Duration::from_millis(50);

/// The report, with what a ratio alone does not say.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    #[serde(flatten)]
    pub report: Report,
    /// Did the audited run write what it should have (one record per
    /// successful Unseal, a verifiable chain), and the other nothing?
    pub audit_check: AuditCheck,
    pub revocation: RevocationStats,
    /// CPU per phase, in cores.
    pub cpu: Vec<CpuWindow>,
    /// /proc/loadavg at the start, after the Unseal rows, and at the end.
    pub load_average: Vec<String>,
    /// What the leanest group-commit journal reaches at this run's unaudited
    /// CPU per call (`None`: not asked for).
    pub ceiling: Option<Ceiling>,
}

/// `bench journal`'s model run at the end, calibrated to the unaudited row:
/// the ratio the leanest group-commit journal (one writer, a write and an
/// fdatasync per group) reaches on this machine with Unseals this cheap, to
/// read the bar's ratio against (docs/performance.md).
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// The unaudited row's CPU per call (this process, client included), in µs.
    pub work_us: u64,
    pub linger_us: u64,
    /// On / off of the model at `in_flight` and at twice as many.
    pub in_flight: usize,
    pub ratio: f64,
    pub ratio_twice_in_flight: f64,
    pub records_per_sync: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditCheck {
    /// Unseals that succeeded on the audited server (warm-up included).
    pub audited_unseals_ok: u64,
    /// Records in its log after them (the fill writes none).
    pub records: u64,
    /// Of which `Unseal` with outcome `ok` by the executor (the gRPC rows).
    pub unseal_ok_records: u64,
    /// In-process reference row: `unseal_as` calls that succeeded on the
    /// audited vault, and its records (caller `bench-in-process`).
    pub in_process_unseals_ok: u64,
    pub in_process_records: u64,
    /// Records that are anything else.
    pub other_records: u64,
    /// [`AuditLog::verify`] over the whole chain.
    pub verify_ok: bool,
    pub verify_reason: String,
    /// The vault with the switch off has no log.
    pub unaudited_has_no_log: bool,
    /// Unseals that succeeded on the server without records.
    pub unaudited_unseals_ok: u64,
    /// Records added by the revocation phase (Revoke and WatchRevocations
    /// decisions, if the handlers record them), and `verify` after it.
    pub records_after_revocations: u64,
    pub verify_ok_after_revocations: bool,
    pub pass: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RevocationStats {
    pub watchers: usize,
    pub revocations: usize,
    /// (watcher, revoke) pairs whose event arrived.
    pub pairs: u64,
    /// Pairs whose event had not arrived when the last revoke's wait ended.
    pub missing: u64,
    /// Pairs whose event arrived before Revoke returned on the client; they
    /// enter the percentiles as 0.
    pub arrived_before_return: u64,
    /// How early the earliest of those was, in µs.
    pub earliest_before_return_us: f64,
    /// Slowest pair, from Revoke returning, in µs.
    pub max_us: f64,
}

impl Results {
    /// Prints the table and the checks, and writes the JSON to `out`.
    pub fn finish(&self, out: &std::path::Path) -> std::io::Result<()> {
        print!("{}", self.report.table());
        let a = &self.audit_check;
        println!(
            "audit records: {} Unseal ok for {} successful audited Unseals (gRPC), {} for {} \
             (in-process), {} other, verify {}{}; records-off vault has {} log; after \
             revocations {} records, verify {}: {}",
            a.unseal_ok_records,
            a.audited_unseals_ok,
            a.in_process_records,
            a.in_process_unseals_ok,
            a.other_records,
            if a.verify_ok { "ok" } else { "FAILED" },
            if a.verify_reason.is_empty() {
                String::new()
            } else {
                format!(" ({})", a.verify_reason)
            },
            if a.unaudited_has_no_log { "no" } else { "a" },
            a.records_after_revocations,
            if a.verify_ok_after_revocations {
                "ok"
            } else {
                "FAILED"
            },
            if a.pass { "PASS" } else { "FAIL" }
        );
        let r = &self.revocation;
        println!(
            "revocations: {} watchers × {} revokes: {} pairs, {} missing, {} arrived before \
             Revoke returned (earliest {:.0} µs before; counted as 0), slowest {:.0} µs",
            r.watchers,
            r.revocations,
            r.pairs,
            r.missing,
            r.arrived_before_return,
            r.earliest_before_return_us,
            r.max_us
        );
        for c in &self.cpu {
            println!(
                "cpu, {}: {:.1} s, process {:.2} cores, others {:.2}, machine busy {:.2} of {:.0}",
                c.phase, c.seconds, c.process, c.others, c.machine_busy, c.machine_cores
            );
        }
        let others = self.cpu.iter().map(|c| c.others).fold(0.0, f64::max);
        if others > 0.25 {
            println!(
                "WARNING: other processes used up to {others:.2} cores during a phase: \
                 the figures are not clean"
            );
        }
        for l in &self.load_average {
            println!("loadavg: {l}");
        }
        if let Some(c) = &self.ceiling {
            println!(
                "ceiling (`bench journal --work-us {} --linger-us {}`, the unaudited row's CPU \
                 per call): {:.3} at {} in flight, {:.3} at {}, {:.1} records per sync: what the \
                 leanest group-commit journal reaches here with Unseals this cheap",
                c.work_us,
                c.linger_us,
                c.ratio,
                c.in_flight,
                c.ratio_twice_in_flight,
                c.in_flight * 2,
                c.records_per_sync
            );
        }
        super::write_json(out, self)
    }
}

/// One server of the comparison: its vault, its stream shutdown and its
/// client connections.
struct Served {
    vault: Arc<Vault>,
    streams: StreamShutdown,
    server: Server,
    channels: Vec<tonic::transport::Channel>,
}

/// Runs the scenario.
pub async fn run(params: &Params) -> anyhow::Result<Results> {
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
    anyhow::ensure!(
        params.watchers > 0 && params.watch_connections > 0 && params.revocations > 0,
        "--watchers, --watch-connections and --revocations must be at least 1"
    );

    let mut report = Report::new("audit");
    report.scenario = format!(
        "audit: mTLS 1.3 on 127.0.0.1; unseal {} in flight ({} connections × {} tasks), \
         {} s per row in {} interleaved slices, {} s warm-up; {} watchers over {} connections, \
         {} revokes",
        params.in_flight,
        params.connections,
        params.in_flight.div_ceil(params.connections),
        params.seconds,
        params.rounds,
        params.warmup_seconds,
        params.watchers,
        params.watch_connections,
        params.revocations,
    );
    report.machine = grpc::machine();
    let mut cpu = Vec::new();
    let mut load_average = vec![loadavg()];

    let dir = tempfile::tempdir()?;
    let (certs, tls) = grpc::dev_tls(dir.path())?;
    let policy = Arc::new(Policy::dev_default());

    // Two stores filled alike, one server each.
    let mut served = Vec::new();
    for audit in [true, false] {
        let options = VaultOptions {
            audit,
            audit_linger: params.linger,
            ..VaultOptions::default()
        };
        let limits = Limits::for_secret_limit(options.max_secret_bytes);
        let name = if audit { "audited" } else { "not-audited" };
        let vault = grpc::open_vault(&dir.path().join(name), params.cache_bytes, options).await?;
        eprintln!(
            "filling the {name} store: {} credentials over {} tenants…",
            params.credentials, params.tenants
        );
        let started = Instant::now();
        super::store::fill(&vault, params.credentials, params.tenants).await?;
        report.rows.push(Row::new(
            format!(
                "fill {name}: {} creds/{} tenants",
                params.credentials, params.tenants
            ),
            params.credentials,
            started.elapsed(),
            None,
        ));
        let streams = StreamShutdown::new();
        let router = service::router_with(
            vault.clone(),
            policy.clone(),
            &limits,
            grpc::serving_health().await,
            &streams,
        )?;
        let server = Server::start(router, tls.clone(), &limits).await?;
        let channels = grpc::connect(
            &certs,
            DevRole::Executor,
            server.address,
            params.connections,
        )
        .await?;
        served.push(Served {
            vault,
            streams,
            server,
            channels,
        });
    }

    let measured = async {
        let check = unseal_rows(params, &served, &mut report, &mut cpu).await?;
        load_average.push(loadavg());
        let audited = &served[0];
        let stats = revocations(params, audited, &certs, &mut report, &mut cpu).await?;
        anyhow::Ok((check, stats))
    }
    .await;

    // Shut down: streams first (their drain would wait for them), then servers.
    let mut stopped = Vec::new();
    let mut vaults = Vec::new();
    for s in served {
        drop(s.channels);
        s.streams.begin();
        stopped.push(s.server.stop().await);
        vaults.push(s.vault);
    }
    let (mut check, stats) = measured?;
    for s in stopped {
        s?;
    }
    // After the revocation phase: the chain still verifies.
    if let Some(log) = vaults[0].audit_log() {
        let v = log.verify()?;
        check.records_after_revocations = v.records;
        check.verify_ok_after_revocations = v.ok;
    }
    check.pass = check.pass && check.verify_ok_after_revocations;
    drop(vaults); // closes the stores before the temporary directory goes
    load_average.push(loadavg());

    let rate = |name: &str| report.row(name).map_or(0.0, |r| r.ops_per_sec);
    let unaudited_cpu = cpu
        .iter()
        .find(|c| c.phase.starts_with(UNAUDITED_ROW))
        .map_or(0.0, |c| c.process);
    let ceiling = match params.ceiling_seconds > 0.0 {
        true => Some(ceiling(params, unaudited_cpu / rate(UNAUDITED_ROW).max(1.0)).await?),
        false => None,
    };
    report.bars.push(Bar::new(
        "throughput: unseal audited / not audited",
        rate(AUDITED_ROW) / rate(UNAUDITED_ROW),
        0.85,
    ));
    if let Some(p99) = report.row(WATCH_ROW).and_then(|r| r.p99_us) {
        report.bars.push(Bar::new(
            "revoke → watcher p99 ≤ 50 ms (50 ms / p99)",
            WATCH_P99_BAR.as_secs_f64() * 1e6 / p99.max(1.0),
            1.0,
        ));
    }
    Ok(Results {
        report,
        audit_check: check,
        revocation: stats,
        cpu,
        load_average,
        ceiling,
    })
}

/// Runs `bench journal`'s model with `seconds_per_call` of CPU per call (the
/// unaudited row's), this run's calls in flight and linger, once the servers
/// are gone.
async fn ceiling(params: &Params, seconds_per_call: f64) -> anyhow::Result<Ceiling> {
    let model = super::journal::Params {
        in_flight: params.in_flight,
        work_us: (seconds_per_call * 1e6).round().max(1.0) as u64,
        linger_us: params.linger.as_micros() as u64,
        append: false,
        seconds: params.ceiling_seconds,
        warmup_seconds: 0.5,
        rounds: 2,
        out: params.out.clone(),
    };
    eprintln!(
        "ceiling: the journal model at {} µs of CPU per call…",
        model.work_us
    );
    let results = super::journal::run(&model).await?;
    results.passed()?;
    let bar = |k: usize| results.report.bars.get(k).map_or(0.0, |b| b.ratio);
    let records: u64 = results.journal.iter().map(|j| j.records).sum();
    let syncs: u64 = results.journal.iter().map(|j| j.syncs).sum();
    Ok(Ceiling {
        work_us: model.work_us,
        linger_us: model.linger_us,
        in_flight: params.in_flight,
        ratio: bar(0),
        ratio_twice_in_flight: bar(1),
        records_per_sync: records as f64 / syncs.max(1) as f64,
    })
}

/// The two Unseal rows, interleaved, then the audit-record check.
async fn unseal_rows(
    params: &Params,
    served: &[Served],
    report: &mut Report,
    cpu: &mut Vec<CpuWindow>,
) -> anyhow::Result<AuditCheck> {
    // `bench grpc`'s load, with this run's shape.
    let shape = grpc::Params {
        credentials: params.credentials,
        tenants: params.tenants,
        seconds: params.seconds,
        warmup_seconds: params.warmup_seconds,
        rounds: params.rounds,
        in_flight: params.in_flight,
        connections: params.connections,
        cache_bytes: params.cache_bytes,
        out: params.out.clone(),
    };
    let rows = [AUDITED_ROW, UNAUDITED_ROW];
    let slice = params.seconds / params.rounds as f64;
    let mut totals: Vec<(u64, Duration, Vec<Duration>)> = rows
        .iter()
        .map(|_| (0, Duration::ZERO, Vec::new()))
        .collect();
    let mut succeeded = [0u64; 2];
    let mut windows = [CpuWindow::default(), CpuWindow::default()];
    for round in 0..params.rounds {
        let mut order = [0, 1];
        if round % 2 == 1 {
            order.reverse();
        }
        let warmup = if round == 0 {
            params.warmup_seconds
        } else {
            params.warmup_seconds.min(SETTLE_SECONDS)
        };
        for k in order {
            eprintln!("round {}/{}: {}…", round + 1, params.rounds, rows[k]);
            let before = CpuSample::now();
            let m = grpc::load(Call::Unseal, &served[k].channels, &shape, warmup, slice).await?;
            windows[k].add(&CpuSample::now().since(&before));
            let total = &mut totals[k];
            total.0 += m.ops;
            total.1 += m.elapsed;
            total.2.extend(m.latencies);
            succeeded[k] += m.succeeded;
        }
    }
    for (k, (name, (ops, elapsed, mut latencies))) in rows.into_iter().zip(totals).enumerate() {
        report
            .rows
            .push(Row::new(name, ops, elapsed, Some(&mut latencies)));
        let mut w = std::mem::take(&mut windows[k]);
        w.phase = format!("{name} (slices incl. warm-up)");
        cpu.push(w.average());
    }

    // Reference: the same vaults without gRPC, to tell the store's share from
    // the transport's.
    let mut in_process_ok = 0;
    for (k, name) in [IN_PROCESS_AUDITED_ROW, IN_PROCESS_UNAUDITED_ROW]
        .into_iter()
        .enumerate()
    {
        eprintln!("{name}…");
        let (row, ok) = in_process(&served[k].vault, params).await?;
        report.rows.push(Row {
            name: name.into(),
            ..row
        });
        if k == 0 {
            in_process_ok = ok;
        }
    }

    eprintln!("checking the audit log…");
    let log = served[0]
        .vault
        .audit_log()
        .context("the audited vault has no audit log")?;
    let counts = count_records(log)?;
    let verification = log.verify()?;
    let mut check = AuditCheck {
        audited_unseals_ok: succeeded[0],
        records: counts.records,
        unseal_ok_records: counts.unseal_ok,
        in_process_unseals_ok: in_process_ok,
        in_process_records: counts.in_process,
        other_records: counts.records - counts.unseal_ok - counts.in_process,
        verify_ok: verification.ok && verification.records == counts.records,
        verify_reason: verification.reason.clone(),
        unaudited_has_no_log: served[1].vault.audit_log().is_none(),
        unaudited_unseals_ok: succeeded[1],
        ..AuditCheck::default()
    };
    check.pass = check.verify_ok
        && check.unaudited_has_no_log
        && check.unseal_ok_records == check.audited_unseals_ok
        && check.in_process_records == check.in_process_unseals_ok
        && check.other_records == 0;
    Ok(check)
}

/// `in_flight` tasks calling [`Vault::unseal_as`] on random credentials for
/// 0.5 s + [`IN_PROCESS_SECONDS`]; the row of the timed part, and every call
/// that succeeded.
async fn in_process(vault: &Arc<Vault>, params: &Params) -> anyhow::Result<(Row, u64)> {
    let begin = Instant::now() + Duration::from_millis(500);
    let end = begin + Duration::from_secs_f64(IN_PROCESS_SECONDS);
    let tasks: Vec<_> = (0..params.in_flight)
        .map(|task| {
            let vault = vault.clone();
            let (credentials, tenants) = (params.credentials, params.tenants);
            tokio::spawn(async move {
                let caller = Caller::new(IN_PROCESS_CALLER, "Unseal").with_purpose("bench audit");
                let mut rng = SmallRng::seed_from_u64(task as u64);
                let (mut latencies, mut ok) = (Vec::new(), 0u64);
                loop {
                    let started = Instant::now();
                    if started >= end {
                        break;
                    }
                    let i = rng.random_range(0..credentials);
                    let unsealed = vault
                        .unseal_as(
                            &tenant_of(i, tenants),
                            &credential_of(i),
                            None,
                            Some(&caller),
                        )
                        .await?;
                    std::hint::black_box(unsealed.secret.expose());
                    let done = Instant::now();
                    ok += 1;
                    if done >= begin && done < end {
                        latencies.push(done - started);
                    }
                }
                anyhow::Ok((latencies, ok))
            })
        })
        .collect();
    let (mut latencies, mut ok) = (Vec::new(), 0);
    for task in tasks {
        let (l, n) = task.await??;
        latencies.extend(l);
        ok += n;
    }
    let row = Row::new(
        "",
        latencies.len() as u64,
        end - begin,
        Some(&mut latencies),
    );
    Ok((row, ok))
}

/// What the audit log holds.
struct Counts {
    records: u64,
    /// `Unseal` records with outcome `ok`, by other callers than the in-process rows.
    unseal_ok: u64,
    /// Records of the in-process rows (all `Unseal`, `ok`).
    in_process: u64,
}

fn count_records(log: &AuditLog) -> anyhow::Result<Counts> {
    let mut counts = Counts {
        records: 0,
        unseal_ok: 0,
        in_process: 0,
    };
    let mut after = 0;
    loop {
        let page = log.export(after, 1000)?;
        let Some(last) = page.last() else {
            return Ok(counts);
        };
        after = last.sequence;
        counts.records += page.len() as u64;
        for e in &page {
            let unseal_ok = e.record.rpc == "Unseal" && e.record.outcome == "ok";
            if unseal_ok && e.record.caller == IN_PROCESS_CALLER {
                counts.in_process += 1;
            } else if unseal_ok {
                counts.unseal_ok += 1;
            }
        }
    }
}

/// What one watcher saw: for each revoke it received, its index and when.
type Received = Vec<(usize, Instant)>;

/// The revocation phase on `server`.
async fn revocations(
    params: &Params,
    server: &Served,
    certs: &crate::pki::DevPkiPaths,
    report: &mut Report,
    cpu: &mut Vec<CpuWindow>,
) -> anyhow::Result<RevocationStats> {
    let n = params.revocations;
    eprintln!("sealing {n} credentials to revoke…");
    for i in 0..n {
        server
            .vault
            .seal(SealRequest {
                tenant: REVOKE_TENANT.to_owned(),
                credential: revoke_credential(i),
                kind: Kind::CookieJar,
                secret: Secret::new(vec![0x5a; 256]),
                labels: Default::default(),
                expires_at_ms: None,
                expected_version: None,
            })
            .await?;
    }

    eprintln!(
        "opening {} watchers over {} connections…",
        params.watchers, params.watch_connections
    );
    let channels = grpc::connect(
        certs,
        DevRole::Executor,
        server.server.address,
        params.watch_connections,
    )
    .await?;
    let delivered: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
    let all_delivered = Arc::new(Notify::new());
    let ready = Arc::new(AtomicUsize::new(0));
    let all_ready = Arc::new(Notify::new());
    let (done, done_rx) = tokio::sync::watch::channel(false);
    let watchers = params.watchers;
    let mut tasks = Vec::with_capacity(watchers);
    for w in 0..watchers {
        let channel = channels[w % channels.len()].clone();
        let (delivered, all_delivered) = (delivered.clone(), all_delivered.clone());
        let (ready, all_ready) = (ready.clone(), all_ready.clone());
        let mut done = done_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = pb::vault_client::VaultClient::new(channel);
            let mut stream = client
                .watch_revocations(pb::WatchRevocationsRequest {
                    after_sequence: 0,
                    tenant_id: String::new(),
                })
                .await?
                .into_inner();
            let first = stream
                .message()
                .await?
                .context("the watch ended before its opening keepalive")?;
            anyhow::ensure!(
                first.kind == pb::revocation_event::Kind::Keepalive as i32,
                "the watch did not open with a KEEPALIVE"
            );
            if ready.fetch_add(1, Ordering::AcqRel) + 1 == watchers {
                all_ready.notify_one();
            }
            let mut received: Received = Vec::with_capacity(n);
            loop {
                tokio::select! {
                    message = stream.message() => {
                        let Some(event) = message? else { break };
                        let at = Instant::now();
                        if event.kind != pb::revocation_event::Kind::CredentialRevoked as i32
                            || event.tenant_id != REVOKE_TENANT
                        {
                            continue;
                        }
                        let Some(i) = revoke_index(&event.credential_id).filter(|&i| i < n) else {
                            continue;
                        };
                        received.push((i, at));
                        if delivered[i].fetch_add(1, Ordering::AcqRel) + 1 == watchers {
                            all_delivered.notify_one();
                        }
                        if received.len() == n {
                            break;
                        }
                    }
                    _ = done.changed() => break,
                }
            }
            anyhow::Ok(received)
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready.load(Ordering::Acquire) < watchers {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {watchers} watchers opened within 30 s",
            ready.load(Ordering::Acquire)
        );
        let _ = tokio::time::timeout(Duration::from_millis(100), all_ready.notified()).await;
    }

    eprintln!("revoking {n} credentials, one at a time…");
    let (cert, key) = certs.client(DevRole::Settings);
    let settings = crate::client::connect(
        &server.server.address.to_string(),
        &certs.ca_cert(),
        &cert,
        &key,
    )
    .await?;
    let mut revoker = pb::vault_client::VaultClient::new(settings);
    let mut sent = Vec::with_capacity(n);
    let mut returned = Vec::with_capacity(n);
    let mut revoke_latencies = Vec::with_capacity(n);
    let before = CpuSample::now();
    let started = Instant::now();
    for i in 0..n {
        let t0 = Instant::now();
        revoker
            .revoke(pb::RevokeRequest {
                tenant_id: REVOKE_TENANT.to_owned(),
                credential_id: revoke_credential(i),
                reason: "bench audit".to_owned(),
            })
            .await?;
        let t1 = Instant::now();
        sent.push(t0);
        returned.push(t1);
        revoke_latencies.push(t1 - t0);
        let until = t1 + DELIVERY_TIMEOUT;
        while delivered[i].load(Ordering::Acquire) < watchers {
            let now = Instant::now();
            if now >= until {
                break;
            }
            let _ = tokio::time::timeout(until - now, all_delivered.notified()).await;
        }
        tokio::time::sleep(REVOKE_GAP).await;
    }
    let elapsed = started.elapsed();
    let mut w = CpuSample::now().since(&before);
    w.phase = format!("revocations ({} watchers)", watchers);
    cpu.push(w.average());
    let _ = done.send(true);

    let mut from_returned = Vec::with_capacity(n * watchers);
    let mut from_sent = Vec::with_capacity(n * watchers);
    let mut stats = RevocationStats {
        watchers,
        revocations: n,
        ..RevocationStats::default()
    };
    for task in tasks {
        for (i, at) in task.await?? {
            from_sent.push(at.saturating_duration_since(sent[i]));
            match at.checked_duration_since(returned[i]) {
                Some(latency) => {
                    stats.max_us = stats.max_us.max(latency.as_secs_f64() * 1e6);
                    from_returned.push(latency);
                }
                None => {
                    stats.arrived_before_return += 1;
                    let early = (returned[i] - at).as_secs_f64() * 1e6;
                    stats.earliest_before_return_us = stats.earliest_before_return_us.max(early);
                    from_returned.push(Duration::ZERO);
                }
            }
        }
    }
    stats.pairs = from_returned.len() as u64;
    stats.missing = (n * watchers) as u64 - stats.pairs;
    report.rows.push(Row::new(
        REVOKE_ROW,
        n as u64,
        elapsed,
        Some(&mut revoke_latencies),
    ));
    report.rows.push(Row::new(
        WATCH_ROW,
        stats.pairs,
        elapsed,
        Some(&mut from_returned),
    ));
    report.rows.push(Row::new(
        WATCH_FROM_SENT_ROW,
        from_sent.len() as u64,
        elapsed,
        Some(&mut from_sent),
    ));
    Ok(stats)
}

fn revoke_credential(i: usize) -> String {
    format!("revoke-{i}")
}

fn revoke_index(credential: &str) -> Option<usize> {
    credential.strip_prefix("revoke-")?.parse().ok()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.trim().to_owned())
        .unwrap_or_default()
}
