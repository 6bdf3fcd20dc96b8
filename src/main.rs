//! The `credvault` binary: see `credvault --help`.
#![forbid(unsafe_code)]

mod cli;

use clap::Parser;

/// mimalloc in secure mode: glibc's arena locks were a sixth of the gRPC workers' time
/// (docs/decisions/0006-allocator.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    credvault::tls::install_default_provider();
    let cli = cli::Cli::parse();
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("credvault: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
