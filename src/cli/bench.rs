//! `credvault bench SCENARIO`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Scenario {
    /// The sealed store in-process: raw crypto, unseal, durable seal.
    Store,
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
    /// Seconds each timed measurement runs.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
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
                seconds: args.seconds,
                cache_bytes: args.cache_mb << 20,
                out: args
                    .out
                    .unwrap_or_else(|| "bench-results/store.json".into()),
            };
            let report = runtime.block_on(credvault::bench::store::run(&params))?;
            report.finish(&params.out)?;
        }
    }
    Ok(())
}
