//! `credvault bench SCENARIO`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Scenario {
    /// The sealed store in-process: raw crypto, unseal, durable seal.
    Store,
    /// The gRPC server over mutual TLS on 127.0.0.1: echo floor, unseal, health.
    Grpc,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark to run.
    scenario: Scenario,
    /// Credentials in the warm store.
    #[arg(long, default_value_t = 100_000)]
    credentials: u64,
    /// Tenants the credentials are spread over.
    #[arg(long, default_value_t = 1_000)]
    tenants: u64,
    /// sled page cache of the benchmark stores, in MiB.
    #[arg(long, default_value_t = 1024)]
    cache_mb: u64,
    /// Seconds each timed measurement runs [default: 3 for store, 5 for grpc].
    #[arg(long)]
    seconds: Option<f64>,
    /// grpc: calls kept in flight.
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// grpc: client connections the calls in flight are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// grpc: each measurement's seconds are split into this many slices, run
    /// round-robin (echo, unseal, health, then the reverse, …).
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Where to write the JSON results (default: bench-results/SCENARIO.json).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.scenario {
        Scenario::Store => {
            let params = credvault::bench::store::Params {
                credentials: args.credentials,
                tenants: args.tenants,
                seconds: args.seconds.unwrap_or(3.0),
                cache_bytes: args.cache_mb << 20,
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/store.json".into()),
            };
            let report = runtime.block_on(credvault::bench::store::run(&params))?;
            report.finish(&params.out)?;
        }
        Scenario::Grpc => {
            let params = credvault::bench::grpc::Params {
                credentials: args.credentials,
                tenants: args.tenants,
                seconds: args.seconds.unwrap_or(5.0),
                warmup_seconds: 1.0,
                rounds: args.rounds,
                in_flight: args.in_flight,
                connections: args.connections,
                cache_bytes: args.cache_mb << 20,
                out: args.out.unwrap_or_else(|| "bench-results/grpc.json".into()),
            };
            let report = runtime.block_on(credvault::bench::grpc::run(&params))?;
            report.finish(&params.out)?;
        }
    }
    Ok(())
}
