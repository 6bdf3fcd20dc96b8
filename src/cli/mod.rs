//! The `credvault` command line: clap definitions and the subcommands.

pub mod audit;
pub mod backup;
pub mod bench;
pub mod certs;
pub mod client;
pub mod keys;
pub mod rotate;
pub mod serve;
pub mod status;
pub mod tenant;
pub mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// credvault: a vault for tenants' web-session cookies and BYOK API keys.
#[derive(Debug, Parser)]
#[command(name = "credvault", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the vault over mutual TLS (configuration from --config, CREDVAULT_* and flags).
    Serve(serve::ServeArgs),
    /// Serve with embedded defaults: dev PKI in certs/, root key, policy and store in data/, on 127.0.0.1.
    Dev(serve::DevArgs),
    /// The development PKI.
    Certs(certs::CertsArgs),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Key versions: `keys status` shows states, ages, encryptions and what each still
    /// protects; `keys destroy` destroys a retired version.
    Keys(keys::KeysArgs),
    /// A tenant's lifecycle: `delete` (disable, shred after a grace period), `restore`,
    /// `hold`/`release` (legal hold), `status` (with the deletion receipt once shredded).
    Tenant(tenant::TenantArgs),
    /// Follow the revocation events (one JSON line each) until the server ends the stream.
    Watch(watch::WatchArgs),
    /// The audit log: `query`, `tail`, `export` (JSON lines) and `verify` (exit 2 when the
    /// chain is broken; `--data-dir` verifies a stopped server's store offline).
    Audit(audit::AuditArgs),
    /// Write a consistent backup of a running server's store into a new directory on its
    /// host (Admin Backup); it opens only with the root key in use.
    Backup(backup::BackupArgs),
    /// Restore a backup, offline, into a new data directory (after checking the whole
    /// file and then the audit chain); `--check` only checks the backup.
    Restore(backup::RestoreArgs),
    /// The server at a glance: version and uptime, root key and primary KEK ages, rotation
    /// jobs, the logs' ends, the store and the audit journal (exit 2 when either refuses writes).
    Status(status::StatusArgs),
    /// Rotate a key layer (`kek`, `tenant ID`, `root`) or follow a rotation job (`status ID`).
    Rotate(rotate::RotateArgs),
    /// Write a new random root key (base64, mode 0600). Refuses to overwrite.
    Keygen {
        /// Where to write the key.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a benchmark: prints a table and writes JSON.
    Bench(bench::BenchArgs),
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::serve(args),
        Command::Dev(args) => serve::dev(args),
        Command::Certs(args) => certs::run(args),
        Command::Client(command) => client::run(command),
        Command::Keys(args) => keys::run(args),
        Command::Rotate(args) => rotate::run(args),
        Command::Tenant(args) => tenant::run(args),
        Command::Watch(args) => watch::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Backup(args) => backup::backup(args),
        Command::Restore(args) => backup::restore(args),
        Command::Status(args) => status::run(args),
        Command::Keygen { out } => {
            credvault::crypto::root::generate_file(&out)?;
            println!(
                "wrote a new root key to {} (mode 0600); keep it secret and backed up",
                out.display()
            );
            Ok(())
        }
        Command::Bench(args) => bench::run(args),
    }
}
