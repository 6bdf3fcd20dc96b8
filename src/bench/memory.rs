//! `credvault bench memory`: the resident memory of a vault holding N
//! credentials (DESIGN §7: "resident size with 100,000 and 1,000,000 stored
//! credentials").
//!
//! A process's resident size is everything it has ever touched, so each phase
//! runs in a child process of this same binary (`bench memory --child …`),
//! which reports its own `VmRSS` and `VmHWM` (peak) from `/proc/self/status`:
//! 1. **fill**: a fresh store (the sled page cache at the product's default,
//!    256 MiB, unless `--cache-mb` says otherwise; a random root key in a key
//!    file) receives N credentials of 2 KiB over 1,000 tenants from 64
//!    concurrent writers, durably, as in `bench store`; the child closes the
//!    store cleanly (final checkpoint) and reports the bytes on disk;
//! 2. **open and read**: a second child opens that store as a restarted server
//!    would (resident size right after opening), unseals every credential
//!    once (so every leaf has passed through the page cache), then unseals
//!    random credentials on one thread for `seconds`. Its figures are what a
//!    server holding N credentials keeps resident under reads.
//!
//! gRPC and TLS buffers are not included: they depend on connections and calls
//! in flight, not on N. There is no bar: the design asks for the figures.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::RngExt;
use serde::{Deserialize, Serialize};

use super::store::{credential_of, fill, tenant_of};
use crate::clock::SystemClock;
use crate::crypto::root;
use crate::store::{SledStore, StoreOptions};
use crate::vault::{Vault, VaultOptions};

/// Parameters of the memory benchmark.
#[derive(Debug, Clone)]
pub struct Params {
    /// Store sizes to measure, in credentials.
    pub sizes: Vec<u64>,
    /// Tenants the credentials are spread over.
    pub tenants: u64,
    /// Random unseals after the read-everything pass, in seconds.
    pub seconds: f64,
    /// sled page cache, in bytes.
    pub cache_bytes: u64,
    /// Where the JSON goes.
    pub out: PathBuf,
}

/// What one child process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Child {
    /// Fill a fresh store with N credentials.
    Fill,
    /// Open the store, read every credential, then random ones.
    Read,
}

/// What a child reports (one JSON line on its standard output).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChildReport {
    /// Seconds the phase's main work took (fill; read: the random unseals).
    pub seconds: f64,
    /// Operations in that time.
    pub ops: u64,
    /// Read phase: seconds to open the store (sled recovery and key ring).
    pub open_seconds: f64,
    /// Read phase: resident bytes right after opening.
    pub rss_after_open: u64,
    /// Read phase: seconds to unseal every credential once.
    pub read_all_seconds: f64,
    /// Resident bytes at the end of the phase.
    pub rss: u64,
    /// Peak resident bytes over the child's life.
    pub peak_rss: u64,
    /// Fill phase: bytes in the data directory once the store is closed.
    pub disk_bytes: u64,
}

/// One store size, both phases.
#[derive(Debug, Clone, Serialize)]
pub struct SizeResult {
    pub credentials: u64,
    pub fill: ChildReport,
    pub read: ChildReport,
}

/// The scenario's results (printed as a table and written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    pub scenario: String,
    pub machine: String,
    pub cache_bytes: u64,
    pub tenants: u64,
    pub sizes: Vec<SizeResult>,
}

/// Runs every size, each phase in a child process of `exe`.
pub fn run(params: &Params, exe: &Path) -> anyhow::Result<Results> {
    let mut sizes = Vec::new();
    for &credentials in &params.sizes {
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("root.key");
        root::generate_file(&key)?;
        let child = |phase: Child| -> anyhow::Result<ChildReport> {
            let output = std::process::Command::new(exe)
                .args(["bench", "memory", "--child"])
                .arg(
                    clap::ValueEnum::to_possible_value(&phase)
                        .expect("every phase has a name")
                        .get_name(),
                )
                .arg("--dir")
                .arg(dir.path())
                .args(["--credentials", &credentials.to_string()])
                .args(["--tenants", &params.tenants.to_string()])
                .args(["--seconds", &params.seconds.to_string()])
                .args(["--cache-mb", &(params.cache_bytes >> 20).to_string()])
                .stderr(std::process::Stdio::inherit())
                .output()
                .context("starting a benchmark child process")?;
            anyhow::ensure!(
                output.status.success(),
                "the {phase:?} child failed: {}",
                output.status
            );
            let line = String::from_utf8_lossy(&output.stdout);
            serde_json::from_str(line.trim()).context("reading a child's report")
        };
        eprintln!("{credentials} credentials: filling…");
        let fill = child(Child::Fill)?;
        eprintln!("{credentials} credentials: opening and reading…");
        let read = child(Child::Read)?;
        sizes.push(SizeResult {
            credentials,
            fill,
            read,
        });
    }
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    Ok(Results {
        scenario: "memory".into(),
        machine: format!("{cores} cores"),
        cache_bytes: params.cache_bytes,
        tenants: params.tenants,
        sizes,
    })
}

/// Runs one phase in this process and prints its report as one JSON line.
pub async fn run_child(phase: Child, dir: &Path, params: &Params) -> anyhow::Result<()> {
    let credentials = *params.sizes.first().context("no size given")?;
    let store_dir = dir.join("store");
    let open = || async {
        let store = Arc::new(SledStore::open(&StoreOptions {
            cache_capacity: params.cache_bytes,
            ..StoreOptions::new(&store_dir)
        })?);
        let vault = Vault::open(
            store,
            root::load_file(&dir.join("root.key"))?,
            Arc::new(SystemClock),
            VaultOptions::default(),
        )
        .await?;
        anyhow::Ok(Arc::new(vault))
    };
    let mut report = ChildReport::default();
    match phase {
        Child::Fill => {
            let vault = open().await?;
            let started = Instant::now();
            fill(&vault, credentials, params.tenants).await?;
            report.seconds = started.elapsed().as_secs_f64();
            report.ops = credentials;
            (report.rss, report.peak_rss) = resident()?;
            let vault = Arc::into_inner(vault).context("the fill still holds the vault")?;
            drop(vault); // closes the store: final checkpoint, log deleted
            report.disk_bytes = crate::store::dir_bytes(&store_dir)?;
        }
        Child::Read => {
            let started = Instant::now();
            let vault = open().await?;
            report.open_seconds = started.elapsed().as_secs_f64();
            report.rss_after_open = resident()?.0;
            let started = Instant::now();
            for i in 0..credentials {
                let unsealed = vault
                    .unseal(&tenant_of(i, params.tenants), &credential_of(i), None)
                    .await?;
                std::hint::black_box(unsealed.secret.expose());
            }
            report.read_all_seconds = started.elapsed().as_secs_f64();
            let budget = Duration::from_secs_f64(params.seconds);
            let mut rng = rand::rng();
            let started = Instant::now();
            while started.elapsed() < budget {
                for _ in 0..256 {
                    let i = rng.random_range(0..credentials);
                    let unsealed = vault
                        .unseal(&tenant_of(i, params.tenants), &credential_of(i), None)
                        .await?;
                    std::hint::black_box(unsealed.secret.expose());
                    report.ops += 1;
                }
            }
            report.seconds = started.elapsed().as_secs_f64();
            (report.rss, report.peak_rss) = resident()?;
        }
    }
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

impl Results {
    /// The table, as printed.
    pub fn table(&self) -> String {
        let mib = |bytes: u64| bytes as f64 / f64::from(1 << 20);
        let mut out = format!(
            "scenario: memory ({}; sled page cache {:.0} MiB; 2 KiB secrets over {} tenants)\n\
             {:<42} {:>12} {:>12}\n",
            self.machine,
            mib(self.cache_bytes),
            self.tenants,
            "measurement",
            "value",
            "unit"
        );
        let mut line = |name: String, value: String, unit: &str| {
            out += &format!("{name:<42} {value:>12} {unit:>12}\n");
        };
        for s in &self.sizes {
            let rate = |ops: u64, secs: f64| format!("{:.0}", ops as f64 / secs.max(1e-9));
            let mb = |bytes: u64| format!("{:.0}", mib(bytes));
            let rows = [
                (
                    "fill, 64 writers",
                    rate(s.fill.ops, s.fill.seconds),
                    "seals/s",
                ),
                ("peak resident while filling", mb(s.fill.peak_rss), "MiB"),
                ("on disk after close", mb(s.fill.disk_bytes), "MiB"),
                ("open (restart)", format!("{:.2}", s.read.open_seconds), "s"),
                ("resident after open", mb(s.read.rss_after_open), "MiB"),
                (
                    "read every credential once",
                    rate(s.credentials, s.read.read_all_seconds),
                    "unseals/s",
                ),
                (
                    "random unseals (1 thread)",
                    rate(s.read.ops, s.read.seconds),
                    "unseals/s",
                ),
                ("resident after reads", mb(s.read.rss), "MiB"),
                ("peak resident while reading", mb(s.read.peak_rss), "MiB"),
            ];
            for (name, value, unit) in rows {
                line(format!("{}: {name}", s.credentials), value, unit);
            }
        }
        if let [small, .., large] = self.sizes.as_slice() {
            line(
                format!(
                    "resident after reads, {} / {}",
                    large.credentials, small.credentials
                ),
                format!(
                    "{:.2}",
                    large.read.rss as f64 / small.read.rss.max(1) as f64
                ),
                "×",
            );
        }
        out
    }

    /// Prints the table and writes the JSON to `out`.
    pub fn finish(&self, out: &Path) -> std::io::Result<()> {
        print!("{}", self.table());
        super::write_json(out, self)
    }
}

/// This process's resident and peak resident bytes (`VmRSS`, `VmHWM`).
fn resident() -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")
        .context("reading /proc/self/status (the memory benchmark needs Linux)")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("no {name} in /proc/self/status"))?;
        let kib: u64 = line
            .trim_start_matches(name)
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib << 10)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Bytes in the files under `dir`, recursively.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_reads_this_process_and_the_peak_is_at_least_the_current() {
        let (rss, peak) = resident().expect("Linux /proc");
        assert!(rss > 0, "a running process has resident pages");
        assert!(peak >= rss, "peak {peak} below current {rss}");
    }
}
