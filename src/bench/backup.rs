//! `credvault bench backup`: an online backup ([`Vault::backup`]) while the
//! vault serves audited Unseals, then the backup checked
//! ([`backup::verify`]) and restored ([`backup::restore`]), in-process, no
//! gRPC.
//!
//! 1. A sled store (group commit, `cache_bytes`, random root key) filled with
//!    [`super::store::fill`]: `credentials` of 2 KiB over `tenants`, 64
//!    writers, durably. Then one backup of the quiet store, for reference.
//! 2. `tasks` tokio tasks call [`Vault::unseal_as`] on random credentials,
//!    with audit records on ([`VaultOptions::default`], as every real
//!    server): each call's record is durable before it returns. After a
//!    warm-up, windows alternate: no backup (a timed slice), then backups
//!    back to back into fresh directories, each window ≥ 1 s. A call counts
//!    in the window current when it started; the backup windows run from the
//!    backup's start to its return. Both rows run at least `seconds`.
//! 3. After the load: the last backup taken under load is verified and
//!    restored into a new data directory (the live vault closed first). The
//!    restored store is opened with the same root key; a sample of
//!    credentials must unseal to the exact bytes and metadata the live vault
//!    gave, and its audit chain must verify and hold every record of a call
//!    that returned before that backup started and none of a call that
//!    started after it returned. Any check that fails fails the run.
//!
//! Bar: unseal during backup / no backup ≥ 0.5, our own guard that a backup
//! does not stall the service (no issue sets it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;

use super::store::{credential_of, tenant_of};
use super::{Bar, CpuSample, CpuWindow, Report, Row};
use crate::clock::SystemClock;
use crate::crypto::SymmetricKey;
use crate::store::{Durability, SledStore, StoreOptions};
use crate::vault::backup::{self, BackupSummary};
use crate::vault::{Caller, Vault, VaultOptions};

/// Parameters of the backup benchmark.
#[derive(Debug, Clone)]
pub struct Params {
    /// Credentials (2 KiB each) in the store.
    pub credentials: u64,
    /// Tenants they are spread over.
    pub tenants: u64,
    /// Least time each Unseal row is measured.
    pub seconds: f64,
    /// Tasks calling `unseal_as`.
    pub tasks: usize,
    /// Credentials compared between the live and the restored vault.
    pub sample: u64,
    /// sled page cache of the stores, in bytes.
    pub cache_bytes: u64,
    /// Where the JSON goes.
    pub out: PathBuf,
}

pub const NO_BACKUP_ROW: &str = "unseal_as 2 KiB, no backup";
pub const DURING_BACKUP_ROW: &str = "unseal_as 2 KiB, during backup";
pub const QUIET_BACKUP_ROW: &str = "backup, quiet store (rows)";
pub const LOADED_BACKUP_ROW: &str = "backup under unseal load (rows)";
pub const VERIFY_ROW: &str = "verify backup (rows)";
pub const RESTORE_ROW: &str = "restore into a new directory (rows)";
pub const SAMPLE_ROW: &str = "restored: unseal + compare sample";

/// Caller identity of the load's audit records.
const CALLER: &str = "bench-backup";
/// Load before the first window, not counted.
const WARMUP: Duration = Duration::from_millis(500);
/// Shortest window of either kind.
const MIN_WINDOW: f64 = 1.0;
const BAR_UNSEAL_RATIO: f64 = 0.5;

/// Which window a call started in.
const WARMUP_PHASE: u8 = 0;
const NO_BACKUP: u8 = 1;
const DURING: u8 = 2;
const BETWEEN: u8 = 3;
const STOP: u8 = 4;

/// One backup, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct BackupRun {
    /// `quiet` or `unseal load`.
    pub load: String,
    pub seconds: f64,
    pub bytes: u64,
    /// Records copied by the scan.
    pub rows: u64,
    /// Records written while it ran (the tap).
    pub changes: u64,
    pub mb_per_sec: f64,
}

impl BackupRun {
    fn new(load: &str, summary: &BackupSummary, seconds: f64) -> Self {
        Self {
            load: load.to_owned(),
            seconds,
            bytes: summary.bytes,
            rows: summary.rows,
            changes: summary.changes,
            mb_per_sec: mb_per_sec(summary.bytes, seconds),
        }
    }
}

/// `verify` or `restore` of the last backup taken under load.
#[derive(Debug, Clone, Serialize)]
pub struct Pass {
    pub seconds: f64,
    pub bytes: u64,
    pub mb_per_sec: f64,
}

/// The latencies of one Unseal row, with its slowest call.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub row: String,
    pub calls: u64,
    pub windows: u32,
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub p999_us: Option<f64>,
    pub max_us: f64,
}

/// A correctness check; any failure fails the run.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    #[serde(flatten)]
    pub report: Report,
    pub credentials: u64,
    pub tenants: u64,
    pub tasks: usize,
    /// The quiet backup first, then every backup taken under load.
    pub backups: Vec<BackupRun>,
    pub verify: Pass,
    pub restore: Pass,
    pub latency: Vec<Latency>,
    /// Unseals that failed while the load ran (any window).
    pub unseal_failed: u64,
    pub first_error: Option<String>,
    pub cpu: Vec<CpuWindow>,
    pub checks: Vec<Check>,
}

impl Results {
    /// Prints the table, the backups, the latencies and the checks, and
    /// writes the JSON to `out`.
    pub fn finish(&self, out: &Path) -> std::io::Result<()> {
        print!("{}", self.report.table());
        println!(
            "{:<34} {:>8} {:>12} {:>10} {:>8} {:>8}",
            "backup", "secs", "bytes", "rows", "changes", "MB/s"
        );
        for (i, b) in self.backups.iter().enumerate() {
            let name = if i == 0 {
                "quiet store".to_owned()
            } else {
                format!("under unseal load, {i}")
            };
            println!(
                "{:<34} {:>8.2} {:>12} {:>10} {:>8} {:>8.0}",
                name, b.seconds, b.bytes, b.rows, b.changes, b.mb_per_sec
            );
        }
        for (name, p) in [
            ("verify (last under load)", &self.verify),
            ("restore (last under load)", &self.restore),
        ] {
            println!(
                "{:<34} {:>8.2} {:>12} {:>10} {:>8} {:>8.0}",
                name, p.seconds, p.bytes, "-", "-", p.mb_per_sec
            );
        }
        println!(
            "{:<34} {:>10} {:>8} {:>9} {:>9} {:>9} {:>10}",
            "unseal latency", "calls", "windows", "p50 µs", "p99 µs", "p99.9 µs", "max µs"
        );
        let fmt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
        for l in &self.latency {
            println!(
                "{:<34} {:>10} {:>8} {:>9} {:>9} {:>9} {:>10.1}",
                l.row,
                l.calls,
                l.windows,
                fmt(l.p50_us),
                fmt(l.p99_us),
                fmt(l.p999_us),
                l.max_us
            );
        }
        for c in &self.cpu {
            println!(
                "cpu, {}: {:.1} s, process {:.2} cores, others {:.2}, machine busy {:.2} of {:.0}",
                c.phase, c.seconds, c.process, c.others, c.machine_busy, c.machine_cores
            );
        }
        let others = self.cpu.iter().map(|c| c.others).fold(0.0, f64::max);
        if others > 0.25 {
            println!(
                "WARNING: other processes used up to {others:.2} cores during a window: \
                 the ratio is not a clean figure"
            );
        }
        println!(
            "unseals failed under load: {}{}",
            self.unseal_failed,
            self.first_error
                .as_deref()
                .map_or_else(String::new, |e| format!(" (first: {e})"))
        );
        for c in &self.checks {
            println!(
                "check: {:<58} {} ({})",
                c.name,
                if c.pass { "ok" } else { "FAILED" },
                c.detail
            );
        }
        super::write_json(out, self)
    }

    /// An error naming every check that failed.
    pub fn passed(&self) -> anyhow::Result<()> {
        let failed: Vec<_> = self
            .checks
            .iter()
            .filter(|c| !c.pass)
            .map(|c| format!("{} ({})", c.name, c.detail))
            .collect();
        anyhow::ensure!(
            failed.is_empty(),
            "bench backup: {} check(s) failed: {}",
            failed.len(),
            failed.join("; ")
        );
        Ok(())
    }
}

/// What the load tasks share.
#[derive(Default)]
struct Counters {
    /// Calls begun (any window).
    started: AtomicU64,
    /// Calls that returned a secret (any window).
    completed: AtomicU64,
}

/// One task's results.
#[derive(Default)]
struct Tally {
    no_backup: Vec<Duration>,
    during: Vec<Duration>,
    failed: u64,
    first_error: Option<String>,
}

/// The running load: the tasks and what they share.
struct Load {
    phase: Arc<AtomicU8>,
    counters: Arc<Counters>,
    tasks: Vec<tokio::task::JoinHandle<Tally>>,
}

impl Load {
    fn start(vault: &Arc<Vault>, params: &Params) -> Self {
        let phase = Arc::new(AtomicU8::new(WARMUP_PHASE));
        let counters = Arc::new(Counters::default());
        let tasks = (0..params.tasks)
            .map(|task| {
                let (vault, phase, counters) = (vault.clone(), phase.clone(), counters.clone());
                let (credentials, tenants) = (params.credentials, params.tenants);
                tokio::spawn(async move {
                    unseal_task(&vault, &phase, &counters, credentials, tenants, task as u64).await
                })
            })
            .collect();
        Self {
            phase,
            counters,
            tasks,
        }
    }

    fn set(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Stops the tasks and merges their tallies.
    async fn stop(self) -> anyhow::Result<Tally> {
        self.set(STOP);
        let mut all = Tally::default();
        for task in self.tasks {
            let t = task.await?;
            all.no_backup.extend(t.no_backup);
            all.during.extend(t.during);
            all.failed += t.failed;
            all.first_error = all.first_error.or(t.first_error);
        }
        Ok(all)
    }
}

/// One load task: audited Unseals of random credentials until told to stop.
async fn unseal_task(
    vault: &Vault,
    phase: &AtomicU8,
    counters: &Counters,
    credentials: u64,
    tenants: u64,
    seed: u64,
) -> Tally {
    let caller = Caller::new(CALLER, "Unseal").with_purpose("bench backup");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut tally = Tally::default();
    loop {
        let current = phase.load(Ordering::SeqCst);
        if current == STOP {
            return tally;
        }
        let i = rng.random_range(0..credentials);
        let (tenant, credential) = (tenant_of(i, tenants), credential_of(i));
        counters.started.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        let result = vault
            .unseal_as(&tenant, &credential, None, Some(&caller))
            .await;
        let latency = started.elapsed();
        match result {
            Ok(unsealed) => {
                std::hint::black_box(unsealed.secret.expose());
                counters.completed.fetch_add(1, Ordering::SeqCst);
                match current {
                    NO_BACKUP => tally.no_backup.push(latency),
                    DURING => tally.during.push(latency),
                    _ => {}
                }
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

/// What the windows under load measured.
struct Windows {
    no_backup_seconds: f64,
    no_backup_windows: u32,
    during_seconds: f64,
    during_windows: u32,
    loaded: Vec<BackupRun>,
    /// The last backup taken under load.
    last: BackupSummary,
    /// Audit records certainly in it (every call that had returned before it
    /// started) and at most in it (every call begun before it returned).
    records_at_least: u64,
    records_at_most: u64,
    cpu: [CpuWindow; 2],
}

/// Runs the scenario and returns its results (printed, written and checked
/// by the caller).
pub async fn run(params: &Params) -> anyhow::Result<Results> {
    anyhow::ensure!(params.credentials > 0, "--credentials must be at least 1");
    anyhow::ensure!(
        (1..=params.credentials).contains(&params.tenants),
        "--tenants must be between 1 and --credentials"
    );
    anyhow::ensure!(params.seconds > 0.0, "--seconds must be positive");
    anyhow::ensure!(params.tasks > 0, "--in-flight must be at least 1");

    let mut report = Report::new("backup");
    report.scenario = format!(
        "backup: {} credentials × 2 KiB over {} tenants; {} tasks of audited unseal_as, \
         ≥ {} s per row in windows of ≥ {MIN_WINDOW} s",
        params.credentials, params.tenants, params.tasks, params.seconds
    );
    report.machine = super::grpc::machine();
    let mut checks = Vec::new();

    let dir = tempfile::tempdir()?;
    let root = SymmetricKey::generate();
    let live_options = StoreOptions {
        durability: Durability::GroupCommit,
        cache_capacity: params.cache_bytes,
        ..StoreOptions::new(dir.path().join("live"))
    };
    let vault = Arc::new(open_vault(&live_options, copy(&root)).await?);

    // 1. Fill, then a backup of the quiet store.
    eprintln!(
        "filling: {} credentials over {} tenants…",
        params.credentials, params.tenants
    );
    let started = Instant::now();
    super::store::fill(&vault, params.credentials, params.tenants).await?;
    report.rows.push(Row::new(
        format!(
            "fill {} creds/{} tenants, 64 writers",
            params.credentials, params.tenants
        ),
        params.credentials,
        started.elapsed(),
        None,
    ));
    let log = vault.audit_log().context("the vault has no audit log")?;
    let base_records = log.verify()?.records;

    eprintln!("backup of the quiet store…");
    let quiet_dir = dir.path().join("backup-quiet");
    let (quiet, quiet_seconds) = take_backup(&vault, &quiet_dir).await?;
    std::fs::remove_dir_all(&quiet_dir)?;
    let mut backups = vec![BackupRun::new("quiet", &quiet, quiet_seconds)];
    report.rows.push(Row::new(
        QUIET_BACKUP_ROW,
        quiet.rows,
        Duration::from_secs_f64(quiet_seconds),
        None,
    ));

    // 2. The load, in windows without and with a backup.
    eprintln!(
        "unseal load, {} tasks, windows without and with backups…",
        params.tasks
    );
    let load = Load::start(&vault, params);
    let counters = load.counters.clone();
    let windows = windows(
        &vault,
        &load,
        params,
        dir.path(),
        base_records,
        quiet_seconds,
    )
    .await;
    let mut tally = load.stop().await?;
    let windows = windows?;
    let completed = counters.completed.load(Ordering::SeqCst);

    report.rows.push(Row::new(
        NO_BACKUP_ROW,
        tally.no_backup.len() as u64,
        Duration::from_secs_f64(windows.no_backup_seconds),
        Some(&mut tally.no_backup),
    ));
    report.rows.push(Row::new(
        DURING_BACKUP_ROW,
        tally.during.len() as u64,
        Duration::from_secs_f64(windows.during_seconds),
        Some(&mut tally.during),
    ));
    let (loaded_rows, loaded_seconds) = windows
        .loaded
        .iter()
        .fold((0, 0.0), |(r, s), b| (r + b.rows, s + b.seconds));
    report.rows.push(Row::new(
        format!("{LOADED_BACKUP_ROW} ×{}", windows.loaded.len()),
        loaded_rows,
        Duration::from_secs_f64(loaded_seconds),
        None,
    ));
    backups.extend(windows.loaded.iter().cloned());
    let n = report.rows.len();
    let latency = vec![
        latency_of(
            &report.rows[n - 3],
            &tally.no_backup,
            windows.no_backup_windows,
        ),
        latency_of(&report.rows[n - 2], &tally.during, windows.during_windows),
    ];
    checks.push(Check {
        name: "no unseal failed under load".into(),
        pass: tally.failed == 0,
        detail: format!("{} failed", tally.failed),
    });

    // The live vault after the load: its chain, one record per call, and the
    // sample the restored vault must match.
    eprintln!("checking the live vault…");
    let live = log.verify()?;
    let live_expected = base_records + completed;
    checks.push(Check {
        name: "live audit log verifies, one record per unseal".into(),
        pass: live.ok && live.records == live_expected,
        detail: format!(
            "{} records, expected {live_expected}{}",
            live.records,
            if live.ok {
                String::new()
            } else {
                format!(", {}", live.reason)
            }
        ),
    });
    let picks = sample(params.credentials, params.sample);
    let mut expected = Vec::with_capacity(picks.len());
    for &i in &picks {
        let unsealed = vault
            .unseal(&tenant_of(i, params.tenants), &credential_of(i), None)
            .await?;
        expected.push((i, unsealed.secret.expose().to_vec(), unsealed.metadata));
    }
    let root_version = vault.root_version();
    // Close the live store: every clone went with the tasks and the backups.
    drop(vault);

    // 3. Verify and restore the last backup taken under load.
    let last = &windows.last;
    eprintln!("verify and restore of {}…", last.file.display());
    let started = Instant::now();
    let verified = backup::verify(&last.file, &root)?;
    let verify = pass(last.bytes, started.elapsed());
    report.rows.push(Row::new(
        VERIFY_ROW,
        verified.rows + verified.changes,
        Duration::from_secs_f64(verify.seconds),
        None,
    ));
    checks.push(Check {
        name: "verify reads what the backup wrote".into(),
        pass: same_contents(&verified, last),
        detail: contents(&verified),
    });
    let restored_options = StoreOptions {
        path: dir.path().join("restored"),
        ..live_options.clone()
    };
    let started = Instant::now();
    let restored = backup::restore(&last.file, &restored_options, &root)?;
    let restore = pass(last.bytes, started.elapsed());
    report.rows.push(Row::new(
        RESTORE_ROW,
        restored.rows + restored.changes,
        Duration::from_secs_f64(restore.seconds),
        None,
    ));
    checks.push(Check {
        name: "restore reads what the backup wrote".into(),
        pass: same_contents(&restored, last),
        detail: contents(&restored),
    });

    // 4. The restored store under the same root key.
    eprintln!(
        "opening the restored store, comparing {} credentials…",
        expected.len()
    );
    let restored_vault = open_vault(&restored_options, copy(&root)).await?;
    checks.push(Check {
        name: "restored vault opens under the same root key".into(),
        pass: restored_vault.root_version() == root_version,
        detail: format!("root key v{}", restored_vault.root_version()),
    });
    let started = Instant::now();
    let mut mismatched = Vec::new();
    for (i, bytes, metadata) in &expected {
        let (tenant, credential) = (tenant_of(*i, params.tenants), credential_of(*i));
        match restored_vault.unseal(&tenant, &credential, None).await {
            Ok(u) if u.secret.expose() == bytes.as_slice() && u.metadata == *metadata => {}
            Ok(_) => mismatched.push(format!("{tenant}/{credential}: differs")),
            Err(e) => mismatched.push(format!("{tenant}/{credential}: {e}")),
        }
    }
    report.rows.push(Row::new(
        SAMPLE_ROW,
        expected.len() as u64,
        started.elapsed(),
        None,
    ));
    checks.push(Check {
        name: format!(
            "{} sampled credentials unseal as sealed from the restored store",
            expected.len()
        ),
        pass: mismatched.is_empty(),
        detail: match mismatched.first() {
            None => "all equal".into(),
            Some(first) => format!("{} differ, first {first}", mismatched.len()),
        },
    });
    let restored_log = restored_vault
        .audit_log()
        .context("the restored vault has no audit log")?
        .verify()?;
    checks.push(Check {
        name: "restored audit log verifies".into(),
        pass: restored_log.ok,
        detail: if restored_log.ok {
            format!("{} records", restored_log.records)
        } else {
            restored_log.reason.clone()
        },
    });
    checks.push(Check {
        name: "restored log: calls before the backup in, after it out".into(),
        pass: (windows.records_at_least..=windows.records_at_most).contains(&restored_log.records),
        detail: format!(
            "{} records, between {} and {}",
            restored_log.records, windows.records_at_least, windows.records_at_most
        ),
    });
    drop(restored_vault);
    dir.close()?;

    let rate = |name: &str| report.row(name).map_or(0.0, |r| r.ops_per_sec);
    report.bars.push(Bar::new(
        "unseal during backup / no backup",
        rate(DURING_BACKUP_ROW) / rate(NO_BACKUP_ROW),
        BAR_UNSEAL_RATIO,
    ));
    let [no_backup_cpu, during_cpu] = windows.cpu;
    Ok(Results {
        report,
        credentials: params.credentials,
        tenants: params.tenants,
        tasks: params.tasks,
        backups,
        verify,
        restore,
        latency,
        unseal_failed: tally.failed,
        first_error: tally.first_error,
        cpu: vec![no_backup_cpu.average(), during_cpu.average()],
        checks,
    })
}

/// After a warm-up, windows without a backup and windows of backups back to
/// back, alternating, until each kind has run `params.seconds`. Only the last
/// window's backups are kept on disk.
async fn windows(
    vault: &Arc<Vault>,
    load: &Load,
    params: &Params,
    dir: &Path,
    base_records: u64,
    quiet_seconds: f64,
) -> anyhow::Result<Windows> {
    tokio::time::sleep(WARMUP).await;
    let target = params.seconds;
    let mut w = Windows {
        no_backup_seconds: 0.0,
        no_backup_windows: 0,
        during_seconds: 0.0,
        during_windows: 0,
        loaded: Vec::new(),
        last: BackupSummary {
            file: PathBuf::new(),
            bytes: 0,
            rows: 0,
            changes: 0,
            root_version: 0,
            created_at_ms: 0,
            consistent_at_ms: 0,
        },
        records_at_least: 0,
        records_at_most: 0,
        cpu: [CpuWindow::default(), CpuWindow::default()],
    };
    // The length of the last window with backups, which the next window
    // without matches.
    let mut window = quiet_seconds.max(MIN_WINDOW).min(target);
    let mut kept: Vec<PathBuf> = Vec::new();
    while w.no_backup_seconds < target || w.during_seconds < target {
        let backups_next = w.during_seconds < target
            && (w.during_seconds < w.no_backup_seconds || w.no_backup_seconds >= target);
        if !backups_next {
            let length = window.min(target - w.no_backup_seconds);
            let before = CpuSample::now();
            load.set(NO_BACKUP);
            let started = Instant::now();
            tokio::time::sleep(Duration::from_secs_f64(length)).await;
            w.no_backup_seconds += started.elapsed().as_secs_f64();
            load.set(BETWEEN);
            w.cpu[0].add(&CpuSample::now().since(&before));
            w.no_backup_windows += 1;
            continue;
        }
        for old in kept.drain(..) {
            std::fs::remove_dir_all(old)?;
        }
        let mut length = 0.0;
        w.during_windows += 1;
        while length < MIN_WINDOW && w.during_seconds < target.max(w.no_backup_seconds) {
            let directory = dir.join(format!("backup-load-{}", w.loaded.len() + 1));
            let at_least = base_records + load.counters.completed.load(Ordering::SeqCst);
            let before = CpuSample::now();
            load.set(DURING);
            let (summary, seconds) = take_backup(vault, &directory).await?;
            load.set(BETWEEN);
            let at_most = base_records + load.counters.started.load(Ordering::SeqCst);
            w.cpu[1].add(&CpuSample::now().since(&before));
            w.during_seconds += seconds;
            length += seconds;
            w.loaded
                .push(BackupRun::new("unseal load", &summary, seconds));
            (w.records_at_least, w.records_at_most) = (at_least, at_most);
            w.last = summary;
            kept.push(directory);
        }
        window = length.max(MIN_WINDOW).min(target);
    }
    // Keep the last backup only.
    let last_dir = kept.pop();
    for old in kept {
        std::fs::remove_dir_all(old)?;
    }
    anyhow::ensure!(last_dir.is_some(), "no backup ran under load");
    w.cpu[0].phase = NO_BACKUP_ROW.into();
    w.cpu[1].phase = DURING_BACKUP_ROW.into();
    Ok(w)
}

/// One [`Vault::backup`] into `directory`, off the async workers; the
/// summary and the seconds until it returned.
async fn take_backup(vault: &Arc<Vault>, directory: &Path) -> anyhow::Result<(BackupSummary, f64)> {
    let (vault, directory) = (vault.clone(), directory.to_owned());
    let started = Instant::now();
    let summary = tokio::task::spawn_blocking(move || vault.backup(&directory)).await??;
    Ok((summary, started.elapsed().as_secs_f64()))
}

async fn open_vault(options: &StoreOptions, root: SymmetricKey) -> anyhow::Result<Vault> {
    let store = SledStore::open(options)?;
    Ok(Vault::open(
        Arc::new(store),
        root,
        Arc::new(SystemClock),
        VaultOptions::default(),
    )
    .await?)
}

fn copy(key: &SymmetricKey) -> SymmetricKey {
    SymmetricKey::from_slice(key.expose_bytes()).expect("a key's own length")
}

/// Up to `k` distinct credential indices below `n`, at random (all if `k ≥ n`).
fn sample(n: u64, k: u64) -> Vec<u64> {
    if k >= n {
        return (0..n).collect();
    }
    let mut rng = rand::rng();
    let mut picked = BTreeSet::new();
    while (picked.len() as u64) < k {
        picked.insert(rng.random_range(0..n));
    }
    picked.into_iter().collect()
}

fn same_contents(a: &BackupSummary, b: &BackupSummary) -> bool {
    (a.bytes, a.rows, a.changes, a.root_version) == (b.bytes, b.rows, b.changes, b.root_version)
        && (a.created_at_ms, a.consistent_at_ms) == (b.created_at_ms, b.consistent_at_ms)
}

fn contents(s: &BackupSummary) -> String {
    format!(
        "{} bytes, {} rows, {} changes, root v{}",
        s.bytes, s.rows, s.changes, s.root_version
    )
}

fn mb_per_sec(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds.max(f64::MIN_POSITIVE)
}

fn pass(bytes: u64, elapsed: Duration) -> Pass {
    let seconds = elapsed.as_secs_f64();
    Pass {
        seconds,
        bytes,
        mb_per_sec: mb_per_sec(bytes, seconds),
    }
}

/// The latencies of `row`, whose `sorted` latencies [`Row::new`] sorted.
fn latency_of(row: &Row, sorted: &[Duration], windows: u32) -> Latency {
    Latency {
        row: row.name.clone(),
        calls: row.ops,
        windows,
        p50_us: row.p50_us,
        p99_us: row.p99_us,
        p999_us: row.p999_us,
        max_us: sorted.last().map_or(0.0, |d| d.as_secs_f64() * 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiny sizes: the backups run under load, restore and every check
    /// passes. No timing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn smoke() {
        let dir = tempfile::tempdir().unwrap();
        let params = Params {
            credentials: 200,
            tenants: 10,
            seconds: 0.1,
            tasks: 4,
            sample: 50,
            cache_bytes: 16 << 20,
            out: dir.path().join("backup.json"),
        };
        let results = run(&params).await.unwrap();
        results.passed().unwrap();
        assert!(results.backups.len() >= 2, "{:?}", results.backups);
        for b in &results.backups {
            assert!(b.rows >= 200, "{b:?}");
        }
        assert_eq!(results.latency.len(), 2);
        results.finish(&params.out).unwrap();
        assert!(params.out.exists());
    }
}
