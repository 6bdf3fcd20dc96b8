//! `credvault backup DIR`: a consistent backup of a running server's store
//! (Admin `Backup`, admin dev certificate by default), written into DIR on the
//! server's host. `credvault restore`: offline, into a new data directory,
//! after checking the whole file; `--check` only checks it.

use std::path::PathBuf;

use anyhow::Context;
use clap::{ArgGroup, Args};
use credvault::service::pb;
use credvault::store::StoreOptions;
use credvault::vault::backup::{self, BackupSummary};

use super::audit::{Verdict, verify_in_place};
use super::client::{Connection, status as status_error};
use super::keys::{admin, load_root, utc};

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    conn: Connection,
    /// Directory on the server's host to write the backup into: an absolute path,
    /// created (mode 0700) if missing, else it must be empty.
    directory: PathBuf,
}

#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("root_key").args(["root_key_file", "root_key_env"]).required(true)
))]
pub struct RestoreArgs {
    /// The backup: its directory, or the `credvault.backup` file itself.
    #[arg(long)]
    from: PathBuf,
    /// The new data directory (the config's data_dir): it must not exist, or be
    /// empty. The server must not be running on it.
    #[arg(long, required_unless_present = "check")]
    data_dir: Option<PathBuf>,
    /// The root key file the backup was made under.
    #[arg(long)]
    root_key_file: Option<PathBuf>,
    /// The environment variable holding that root key (base64).
    #[arg(long)]
    root_key_env: Option<String>,
    /// Only check that the backup opens with the root key and is intact; write nothing.
    #[arg(long, conflicts_with = "data_dir")]
    check: bool,
}

pub fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let directory = std::path::absolute(&args.directory)?;
        let written = admin(&args.conn)
            .await?
            .backup(pb::BackupRequest {
                directory: directory.display().to_string(),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        println!("backup written: {} ({} bytes)", written.file, written.bytes);
        println!(
            "  records {} (+{} written while it ran), root key v{}, the store as of {} UTC",
            written.records,
            written.changes,
            written.root_version,
            utc_seconds(written.consistent_at_ms)
        );
        println!(
            "  it opens only with root key v{}: keep that key as long as this backup",
            written.root_version
        );
        Ok(())
    })
}

pub fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let root = load_root(args.root_key_file, args.root_key_env)?;
    let Some(data_dir) = args.data_dir else {
        let checked = backup::verify(&args.from, &root)?;
        print_summary("backup intact", &checked);
        return Ok(());
    };
    let restored = backup::restore(&args.from, &StoreOptions::new(&data_dir), &root)?;
    print_summary("restored", &restored);
    println!("  into {}", data_dir.display());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let verdict = runtime
        .block_on(verify_in_place(data_dir.clone(), root))
        .with_context(|| format!("opening the restored store in {}", data_dir.display()))?;
    if let Verdict::Broken = verdict {
        anyhow::bail!(
            "the restored store's audit chain does not verify; keep the backup and \
             investigate before serving it"
        );
    }
    println!(
        "  nothing written after {} UTC is in it: revoke, delete and rotate again what \
         changed since (docs/operations.md, Backups)",
        utc_seconds(restored.consistent_at_ms)
    );
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS` (UTC): a backup's moment to the second.
fn utc_seconds(ms: u64) -> String {
    format!("{}:{:02}", utc(ms), ms / 1000 % 60)
}

fn print_summary(what: &str, summary: &BackupSummary) {
    println!(
        "{what}: {} ({} bytes, the store as of {} UTC, root key v{})",
        summary.file.display(),
        summary.bytes,
        utc_seconds(summary.consistent_at_ms),
        summary.root_version
    );
    println!(
        "  records {} (+{} written while it ran)",
        summary.rows, summary.changes
    );
}
