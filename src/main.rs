//! The `credvault` binary: see `credvault --help`.
#![forbid(unsafe_code)]

mod cli;

use clap::Parser;

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
