//! `credvault rotate …`: start a rotation on a running server (Admin
//! `RotateKek`, `RotateTenantKey`, `RotateRootKey`) or follow one
//! (`GetRotationJob`), optionally until it is done.
//!
//! It connects like the client commands (`--server`, `--dir`, `--ca`, `--cert`,
//! `--key`, the same `CREDVAULT_*` variables), with the admin dev certificate
//! by default. The job line goes to stdout; with `--wait`, progress goes to
//! stderr: a bar redrawn in place on a terminal, otherwise a plain line at most
//! once a second when it changes.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, Subcommand};
use credvault::error::reason_of;
use credvault::service::pb;

use super::client::{Connection, status as status_error};
use super::keys::admin;

/// How often `--wait` asks for progress.
const POLL: Duration = Duration::from_millis(200);
/// The least time between two plain progress lines (not on a terminal).
const PLAIN_EVERY: Duration = Duration::from_secs(1);
/// Characters of the progress bar.
const BAR_WIDTH: usize = 30;
/// The state of a finished job.
const DONE: &str = "done";

#[derive(Debug, Args)]
pub struct RotateArgs {
    #[command(subcommand)]
    command: RotateCommand,
}

#[derive(Debug, Subcommand)]
enum RotateCommand {
    /// Make a new primary KEK; a job rewraps every tenant's DEKs under it.
    Kek {
        #[command(flatten)]
        conn: Connection,
        #[command(flatten)]
        wait: Wait,
    },
    /// Make a new primary DEK for a tenant (or every tenant, --all); with --reencrypt a job
    /// re-encrypts its credentials.
    Tenant {
        #[command(flatten)]
        conn: Connection,
        /// The tenant id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        tenant: Option<String>,
        /// Every tenant (as `keys status` lists them), one after the other; deleted tenants
        /// are skipped.
        #[arg(long)]
        all: bool,
        /// Also re-encrypt the tenant's stored credential versions under the new DEK (so the
        /// old one stops protecting anything and can be destroyed).
        #[arg(long)]
        reencrypt: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Rewrap every KEK under a new root key (from `credvault keygen`); from then on only
    /// the new root key opens the store.
    Root {
        #[command(flatten)]
        conn: Connection,
        /// The new root key file, as the server reads it (mode 0600). A relative path is
        /// made absolute against the current directory.
        #[arg(long)]
        new_root_key_file: PathBuf,
        #[command(flatten)]
        wait: Wait,
    },
    /// Show a rotation job's progress.
    Status {
        #[command(flatten)]
        conn: Connection,
        /// The job id, as printed when the rotation started (e.g. `kek-v2`).
        job_id: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Debug, Args)]
struct Wait {
    /// Follow the job until it is done, showing its progress.
    #[arg(long)]
    wait: bool,
}

pub fn run(args: RotateArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(execute(args.command))
}

async fn execute(command: RotateCommand) -> anyhow::Result<()> {
    let (conn, wait) = match &command {
        RotateCommand::Kek { conn, wait }
        | RotateCommand::Tenant { conn, wait, .. }
        | RotateCommand::Root { conn, wait, .. }
        | RotateCommand::Status { conn, wait, .. } => (conn, wait.wait),
    };
    let mut client = admin(conn).await?;
    if let RotateCommand::Tenant {
        all: true,
        reencrypt,
        ..
    } = &command
    {
        return rotate_all_tenants(&mut client, *reencrypt, wait).await;
    }
    let mut root_key_file = None;
    let job = match &command {
        RotateCommand::Kek { .. } => client.rotate_kek(pb::RotateKekRequest {}).await,
        RotateCommand::Tenant {
            tenant, reencrypt, ..
        } => {
            let request = pb::RotateTenantKeyRequest {
                tenant_id: tenant.clone().unwrap_or_default(),
                reencrypt: *reencrypt,
            };
            client.rotate_tenant_key(request).await
        }
        RotateCommand::Root {
            new_root_key_file, ..
        } => {
            let path = std::path::absolute(new_root_key_file)
                .with_context(|| format!("{}", new_root_key_file.display()))?;
            let request = pb::RotateRootKeyRequest {
                new_root_key_file: path.display().to_string(),
            };
            root_key_file = Some(path);
            client.rotate_root_key(request).await
        }
        RotateCommand::Status { job_id, .. } => {
            let request = pb::GetRotationJobRequest {
                job_id: job_id.clone(),
            };
            client.get_rotation_job(request).await
        }
    }
    .map_err(status_error)?
    .into_inner();

    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", job_line(&job))?;
    out.flush()?;
    let job = if wait {
        let started = Instant::now();
        let job = follow(&mut client, job).await?;
        writeln!(out, "{}", done_line(&job, started.elapsed()))?;
        if job.skipped > 0 {
            anyhow::bail!(
                "job {} left {} record(s) it could not open (tampered or damaged; see the server log): they still depend on the old key version",
                job.job_id,
                job.skipped
            );
        }
        job
    } else {
        job
    };
    if let Some(path) = root_key_file {
        write!(out, "{}", root_next_steps(&path, job.target_version))?;
    }
    Ok(())
}

type AdminClient = pb::admin_client::AdminClient<tonic::transport::Channel>;

/// `rotate tenant --all`: every tenant with a DEK, one after the other (each
/// followed to the end with --wait). Deleted tenants are skipped; any other
/// failure stops the run with a non-zero exit.
async fn rotate_all_tenants(
    client: &mut AdminClient,
    reencrypt: bool,
    wait: bool,
) -> anyhow::Result<()> {
    let status = super::keys::key_status(client, "").await?;
    let tenants: std::collections::BTreeSet<String> = status
        .versions
        .into_iter()
        .filter(|v| v.layer == "dek")
        .map(|v| v.tenant_id)
        .collect();
    let mut out = std::io::stdout().lock();
    let (mut rotated, mut skipped) = (0, 0);
    for tenant in tenants {
        let request = pb::RotateTenantKeyRequest {
            tenant_id: tenant.clone(),
            reencrypt,
        };
        let job = match client.rotate_tenant_key(request).await {
            Ok(job) => job.into_inner(),
            Err(status) if reason_of(&status).as_deref() == Some("TENANT_DELETED") => {
                writeln!(out, "tenant {tenant}: deleted, skipped")?;
                skipped += 1;
                continue;
            }
            Err(status) => return Err(status_error(status)),
        };
        writeln!(out, "{}", job_line(&job))?;
        if wait {
            let started = Instant::now();
            let job = follow(client, job).await?;
            writeln!(out, "{}", done_line(&job, started.elapsed()))?;
        }
        rotated += 1;
    }
    writeln!(
        out,
        "rotated {rotated} tenant(s), skipped {skipped} deleted"
    )?;
    Ok(())
}

/// Polls the job until it is done, drawing its progress on stderr.
async fn follow(
    client: &mut AdminClient,
    mut job: pb::RotationJob,
) -> anyhow::Result<pb::RotationJob> {
    let mut progress = Progress::new(std::io::stderr().is_terminal(), &job);
    while job.state != DONE {
        progress.show(&job)?;
        tokio::time::sleep(POLL).await;
        let request = pb::GetRotationJobRequest {
            job_id: job.job_id.clone(),
        };
        job = client
            .get_rotation_job(request)
            .await
            .map_err(status_error)?
            .into_inner();
    }
    progress.finish(&job)?;
    Ok(job)
}

/// Progress on stderr: a bar redrawn with `\r` on a terminal, else plain lines.
struct Progress {
    terminal: bool,
    /// The last (done, total) shown, and when.
    shown: Option<((u64, u64), Instant)>,
    /// Whether the bar is on the screen (terminal only).
    drawn: bool,
}

impl Progress {
    /// Starting from `job`, whose line is already on stdout.
    fn new(terminal: bool, job: &pb::RotationJob) -> Self {
        Self {
            terminal,
            shown: Some(((job.done, job.total), Instant::now())),
            drawn: false,
        }
    }

    fn show(&mut self, job: &pb::RotationJob) -> std::io::Result<()> {
        let mut err = std::io::stderr().lock();
        let now = Instant::now();
        let at = (job.done, job.total);
        if self.terminal {
            if self.drawn && self.shown.is_some_and(|(shown, _)| shown == at) {
                return Ok(());
            }
            write!(err, "\r{}", bar(job))?;
            self.shown = Some((at, now));
            self.drawn = true;
            return err.flush();
        }
        let changed = match self.shown {
            None => true,
            Some((shown, when)) => shown != at && now - when >= PLAIN_EVERY,
        };
        if changed {
            writeln!(err, "{}", job_line(job))?;
            self.shown = Some((at, now));
        }
        Ok(())
    }

    /// The bar at its end, and the line closed.
    fn finish(&mut self, job: &pb::RotationJob) -> std::io::Result<()> {
        if self.terminal && self.drawn {
            let mut err = std::io::stderr().lock();
            writeln!(err, "\r{}", bar(job))?;
        }
        Ok(())
    }
}

/// `job kek-v2 (kek) running: 300/1000`, with the tenant of a tenant job.
fn job_line(job: &pb::RotationJob) -> String {
    let tenant = if job.tenant_id.is_empty() {
        String::new()
    } else {
        format!(", tenant {}", job.tenant_id)
    };
    format!(
        "job {} ({}{tenant}) {}: {}/{}",
        job.job_id, job.kind, job.state, job.done, job.total
    )
}

/// `job kek-v2 done: 1000/1000 in 3.2s`: the job's own time when the server
/// recorded it, else how long we waited.
fn done_line(job: &pb::RotationJob, waited: Duration) -> String {
    let took = if job.finished_at_ms >= job.created_at_ms && job.created_at_ms > 0 {
        Duration::from_millis(job.finished_at_ms - job.created_at_ms)
    } else {
        waited
    };
    format!(
        "job {} done: {}/{} in {:.1}s",
        job.job_id,
        job.done,
        job.total,
        took.as_secs_f64()
    )
}

/// `[#########---------------------]  30%  300/1000 kek-v2`; a job with
/// nothing to do is full.
fn bar(job: &pb::RotationJob) -> String {
    let fraction = if job.total == 0 {
        1.0
    } else {
        (job.done as f64 / job.total as f64).clamp(0.0, 1.0)
    };
    let filled = (fraction * BAR_WIDTH as f64).round() as usize;
    format!(
        "[{}{}] {:>3.0}%  {}/{} {}",
        "#".repeat(filled),
        "-".repeat(BAR_WIDTH - filled),
        fraction * 100.0,
        job.done,
        job.total,
        job.job_id
    )
}

/// What the operator must do after a root rotation to `version`.
fn root_next_steps(new_key: &std::path::Path, version: u32) -> String {
    format!(
        "\
The store is now under root key v{version}; the old root key no longer opens it.
Next:
  1. Configure the server with the new root key before it next starts:
       root_key_file = {:?}
     (or its base64 in root_key_env). A start with the old key is refused.
  2. Keep the old root key only as long as you keep backups made under it
     (they open only with it), then destroy it: that is what erases them.
",
        new_key.display().to_string()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: &str, done: u64, total: u64) -> pb::RotationJob {
        pb::RotationJob {
            job_id: "kek-v2".into(),
            kind: "kek".into(),
            state: state.into(),
            done,
            total,
            tenant_id: String::new(),
            target_version: 2,
            created_at_ms: 1_000,
            finished_at_ms: 0,
            skipped: 0,
        }
    }

    #[test]
    fn a_job_reads_as_one_line() {
        assert_eq!(
            job_line(&job("running", 300, 1000)),
            "job kek-v2 (kek) running: 300/1000"
        );
        let tenant = pb::RotationJob {
            job_id: "dek-acme-v3".into(),
            kind: "tenant-key".into(),
            tenant_id: "acme".into(),
            ..job("done", 5, 5)
        };
        assert_eq!(
            job_line(&tenant),
            "job dek-acme-v3 (tenant-key, tenant acme) done: 5/5"
        );
    }

    #[test]
    fn the_done_line_uses_the_servers_times_when_it_has_them() {
        let finished = pb::RotationJob {
            finished_at_ms: 4_200,
            ..job("done", 1000, 1000)
        };
        assert_eq!(
            done_line(&finished, Duration::from_secs(99)),
            "job kek-v2 done: 1000/1000 in 3.2s"
        );
        assert_eq!(
            done_line(&job("done", 0, 0), Duration::from_millis(250)),
            "job kek-v2 done: 0/0 in 0.2s"
        );
    }

    #[test]
    fn the_bar_fills_with_progress() {
        assert_eq!(
            bar(&job("running", 0, 10)),
            format!("[{}]   0%  0/10 kek-v2", "-".repeat(30))
        );
        assert_eq!(
            bar(&job("running", 5, 10)),
            format!("[{}{}]  50%  5/10 kek-v2", "#".repeat(15), "-".repeat(15))
        );
        assert_eq!(
            bar(&job("done", 0, 0)),
            format!("[{}] 100%  0/0 kek-v2", "#".repeat(30))
        );
        // A total that moved under the count never overflows the bar.
        assert!(bar(&job("running", 12, 10)).starts_with(&format!("[{}]", "#".repeat(30))));
    }

    #[test]
    fn root_advice_names_the_version_and_the_file() {
        let text = root_next_steps(std::path::Path::new("/etc/credvault/root-2.key"), 2);
        assert!(
            text.starts_with("The store is now under root key v2;"),
            "{text}"
        );
        assert!(
            text.contains("root_key_file = \"/etc/credvault/root-2.key\""),
            "{text}"
        );
    }
}
