//! `credvault bench SCENARIO`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Scenario {
    /// The sealed store in-process: raw crypto, unseal, durable seal.
    Store,
    /// The gRPC server over mutual TLS on 127.0.0.1: echo floor, unseal, health.
    Grpc,
    /// Rotation jobs in-process: KEK rewrap, re-encryption, unseal while they run.
    Rotation,
    /// Audit log and revocation watch over mutual TLS on 127.0.0.1: unseal with
    /// audit records on / off, revoke → watcher latency.
    Audit,
    /// Resident memory of a vault holding 100,000 and 1,000,000 credentials
    /// (each phase in a child process).
    Memory,
    /// Online backup in-process: audited unseal without and during backups,
    /// then verify, restore and a check of the restored store.
    Backup,
    /// Ceiling of durable-before-return audit records (a lean group-commit journal): records on / off.
    Journal,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    scenario: Scenario,
    /// Credentials in the warm store (rotation: of the one tenant re-encrypted;
    /// memory: the one store size to measure) [default: 100,000; memory:
    /// 100,000 and 1,000,000].
    #[arg(long)]
    credentials: Option<u64>,
    /// Tenants the credentials are spread over (rotation: tenants of the KEK
    /// rewrap, one credential each) [default: 1,000; rotation: 100,000].
    #[arg(long)]
    tenants: Option<u64>,
    /// sled page cache of the benchmark stores, in MiB [default: 1024; memory:
    /// 256, the server's default].
    #[arg(long)]
    cache_mb: Option<u64>,
    /// Seconds each timed measurement runs [default: 3 for store, 5 for grpc,
    /// audit and journal;
    /// rotation: unseal at rest before each loaded job, 3; memory: random
    /// unseals after reading every credential, 5; backup: least time of the
    /// unseal rows without and during backups, 5].
    #[arg(long)]
    seconds: Option<f64>,
    /// grpc, audit: calls kept in flight; backup: tasks calling unseal_as;
    /// journal: calls in flight of the first pair of rows (the second: twice).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// grpc, audit: client connections the calls in flight are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// grpc, audit, journal: each measurement's seconds are split into this many
    /// slices, run round-robin (echo, unseal, health, then the reverse, …).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// rotation: threads unsealing at rest and during the jobs.
    #[arg(long, default_value_t = 1)]
    unseal_threads: usize,
    /// rotation: concurrent writers filling the stores.
    #[arg(long, default_value_t = 64)]
    fill_writers: usize,
    /// rotation: records per job batch [default: the vault's, 128].
    #[arg(long)]
    batch_size: Option<usize>,
    /// rotation: pause between job batches, ms [default: the vault's, 2].
    #[arg(long)]
    batch_pause_ms: Option<u64>,
    /// audit: WatchRevocations streams open while credentials are revoked.
    #[arg(long, default_value_t = 100)]
    watchers: usize,
    /// audit: client connections the watchers are spread over.
    #[arg(long, default_value_t = 4)]
    watch_connections: usize,
    /// audit: credentials revoked, one at a time.
    #[arg(long, default_value_t = 200)]
    revocations: usize,
    /// journal: CPU per call standing in for the rest of an Unseal, in µs
    /// (80: an unaudited gRPC Unseal on session 8's VM, 1.96 cores / 24,000
    /// calls/s; `bench audit` ends with this model at its own measured figure).
    #[arg(long, default_value_t = 80)]
    work_us: u64,
    /// journal: how long the writer waits after a group's first record
    /// before taking the group, in µs [default: 0, greedy group commit];
    /// audit: how long the audit journal waits for more records once its
    /// previous group held more than one [default: the server's, 500].
    #[arg(long)]
    linger_us: Option<u64>,
    /// journal: append to a growing file (every sync then also writes the
    /// file's size) instead of overwriting a preallocated one, as the
    /// product's journal does (and as this model did before session 11).
    #[arg(long)]
    append_journal: bool,
    /// audit: seconds of each row of the ceiling run at the end (`bench
    /// journal`'s model at the unaudited row's CPU per call; 0: skip it).
    #[arg(long, default_value_t = 2.0)]
    ceiling_seconds: f64,
    /// Where to write the JSON results (default: bench-results/SCENARIO.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// memory: run one phase in this process (the benchmark starts its own
    /// children with this).
    #[arg(long, hide = true, requires = "dir")]
    child: Option<credvault::bench::memory::Child>,
    /// memory: the data directory of a child phase.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let cache_mb = args.cache_mb.unwrap_or(match args.scenario {
        Scenario::Memory => credvault::config::DEFAULT_CACHE_MB,
        _ => 1024,
    });
    match args.scenario {
        Scenario::Store => {
            let params = credvault::bench::store::Params {
                credentials: args.credentials.unwrap_or(100_000),
                tenants: args.tenants.unwrap_or(1_000),
                seconds: args.seconds.unwrap_or(3.0),
                cache_bytes: cache_mb << 20,
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/store.json".into()),
            };
            let report = runtime.block_on(credvault::bench::store::run(&params))?;
            report.finish(&params.out)?;
        }
        Scenario::Grpc => {
            let params = credvault::bench::grpc::Params {
                credentials: args.credentials.unwrap_or(100_000),
                tenants: args.tenants.unwrap_or(1_000),
                seconds: args.seconds.unwrap_or(5.0),
                warmup_seconds: 1.0,
                rounds: args.rounds,
                in_flight: args.in_flight,
                connections: args.connections,
                cache_bytes: cache_mb << 20,
                out: args.out.unwrap_or_else(|| "bench-results/grpc.json".into()),
            };
            let report = runtime.block_on(credvault::bench::grpc::run(&params))?;
            report.finish(&params.out)?;
        }
        Scenario::Rotation => {
            let defaults = credvault::vault::RotationOptions::default();
            let params = credvault::bench::rotation::Params {
                tenants: args.tenants.unwrap_or(100_000),
                credentials: args.credentials.unwrap_or(100_000),
                seconds: args.seconds.unwrap_or(3.0),
                unseal_threads: args.unseal_threads,
                fill_writers: args.fill_writers,
                cache_bytes: cache_mb << 20,
                rotation: credvault::vault::RotationOptions {
                    batch_size: args.batch_size.unwrap_or(defaults.batch_size),
                    batch_pause_ms: args.batch_pause_ms.unwrap_or(defaults.batch_pause_ms),
                    ..defaults
                },
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/rotation.json".into()),
            };
            let results = runtime.block_on(credvault::bench::rotation::run(&params))?;
            results.finish(&params.out)?;
        }
        Scenario::Audit => {
            let params = credvault::bench::audit::Params {
                credentials: args.credentials.unwrap_or(100_000),
                tenants: args.tenants.unwrap_or(1_000),
                seconds: args.seconds.unwrap_or(5.0),
                warmup_seconds: 1.0,
                rounds: args.rounds,
                in_flight: args.in_flight,
                connections: args.connections,
                watchers: args.watchers,
                watch_connections: args.watch_connections,
                revocations: args.revocations,
                cache_bytes: cache_mb << 20,
                linger: args.linger_us.map_or(
                    credvault::audit::journal::LINGER,
                    std::time::Duration::from_micros,
                ),
                ceiling_seconds: args.ceiling_seconds,
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/audit.json".into()),
            };
            let results = runtime.block_on(credvault::bench::audit::run(&params))?;
            results.finish(&params.out)?;
        }
        Scenario::Backup => {
            let params = credvault::bench::backup::Params {
                credentials: args.credentials.unwrap_or(100_000),
                tenants: args.tenants.unwrap_or(1_000),
                seconds: args.seconds.unwrap_or(5.0),
                tasks: args.in_flight,
                sample: 1_000,
                cache_bytes: cache_mb << 20,
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/backup.json".into()),
            };
            let results = runtime.block_on(credvault::bench::backup::run(&params))?;
            results.finish(&params.out)?;
            results.passed()?;
        }
        Scenario::Journal => {
            let params = credvault::bench::journal::Params {
                in_flight: args.in_flight,
                work_us: args.work_us,
                linger_us: args.linger_us.unwrap_or(0),
                append: args.append_journal,
                seconds: args.seconds.unwrap_or(5.0),
                warmup_seconds: 1.0,
                rounds: args.rounds,
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/journal.json".into()),
            };
            let results = runtime.block_on(credvault::bench::journal::run(&params))?;
            results.finish(&params.out)?;
            results.passed()?;
        }
        Scenario::Memory => {
            let params = credvault::bench::memory::Params {
                sizes: args
                    .credentials
                    .map_or_else(|| vec![100_000, 1_000_000], |n| vec![n]),
                tenants: args.tenants.unwrap_or(1_000),
                seconds: args.seconds.unwrap_or(5.0),
                cache_bytes: cache_mb << 20,
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/memory.json".into()),
            };
            match (args.child, args.dir) {
                (Some(phase), Some(dir)) => {
                    runtime.block_on(credvault::bench::memory::run_child(phase, &dir, &params))?
                }
                _ => {
                    let exe = std::env::current_exe()?;
                    credvault::bench::memory::run(&params, &exe)?.finish(&params.out)?;
                }
            }
        }
    }
    Ok(())
}
