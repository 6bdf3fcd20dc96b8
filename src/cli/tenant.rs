//! `credvault tenant …`: a tenant's lifecycle on a running server (Vault
//! `DeleteTenant`, `RestoreTenant`, `SetLegalHold`, `GetTenantStatus`).
//!
//! It connects like the client commands (`--server`, `--dir`, `--ca`, `--cert`,
//! `--key`, the same `CREDVAULT_*` variables), with the settings dev
//! certificate by default (the built-in `settings` role may make every one of
//! these calls; `admin` may read the status). Each command prints the tenant's
//! status afterwards: a few lines of text, or one JSON document with `--json`.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand};
use credvault::pki::DevRole;
use credvault::service::pb::{self, vault_client::VaultClient};

use super::client::{Connection, status as status_error};
use super::keys::{age, optional_ms, utc};

#[derive(Debug, Args)]
pub struct TenantArgs {
    #[command(subcommand)]
    command: TenantCommand,
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Delete a tenant: disabled at once (Seal and Unseal fail with TENANT_DELETED),
    /// crypto-shredded after the grace period unless on legal hold.
    Delete {
        #[command(flatten)]
        conn: Connection,
        /// The tenant id.
        tenant: String,
        /// Time before the shred: a whole number and a unit (s, m, h or d), at most 30d;
        /// 0s shreds at once. Default: the server's (7d).
        #[arg(long, value_parser = parse_grace)]
        grace: Option<u64>,
        #[command(flatten)]
        format: Format,
    },
    /// Undo a deletion within its grace period: everything comes back intact.
    Restore {
        #[command(flatten)]
        conn: Connection,
        /// The tenant id.
        tenant: String,
        #[command(flatten)]
        format: Format,
    },
    /// Put a tenant on legal hold: while held, a deleted tenant stays disabled and is not
    /// shredded.
    Hold {
        #[command(flatten)]
        conn: Connection,
        /// The tenant id.
        tenant: String,
        /// Why (kept with the hold).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        format: Format,
    },
    /// Release a tenant's legal hold (a deleted tenant past its grace period is then
    /// shredded).
    Release {
        #[command(flatten)]
        conn: Connection,
        /// The tenant id.
        tenant: String,
        #[command(flatten)]
        format: Format,
    },
    /// Show a tenant's lifecycle state; after the shred, its deletion receipt.
    Status {
        #[command(flatten)]
        conn: Connection,
        /// The tenant id.
        tenant: String,
        #[command(flatten)]
        format: Format,
    },
}

#[derive(Debug, Args)]
struct Format {
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// `--grace`: a duration as in the config file, in whole seconds.
fn parse_grace(text: &str) -> Result<u64, String> {
    match credvault::config::parse_duration(text)? {
        Some(duration) => Ok(duration.as_secs()),
        None => Err("the grace period cannot be \"off\"".into()),
    }
}

pub fn run(args: TenantArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(execute(args.command))
}

async fn vault(conn: &Connection) -> anyhow::Result<VaultClient<tonic::transport::Channel>> {
    Ok(VaultClient::new(conn.channel(DevRole::Settings).await?))
}

async fn execute(command: TenantCommand) -> anyhow::Result<()> {
    let (status, format) = match command {
        TenantCommand::Delete {
            conn,
            tenant,
            grace,
            format,
        } => {
            let request = pb::DeleteTenantRequest {
                tenant_id: tenant,
                grace_seconds: grace,
            };
            let response = vault(&conn)
                .await?
                .delete_tenant(request)
                .await
                .map_err(status_error)?;
            (response.into_inner().status, format)
        }
        TenantCommand::Restore {
            conn,
            tenant,
            format,
        } => {
            let request = pb::RestoreTenantRequest { tenant_id: tenant };
            let response = vault(&conn)
                .await?
                .restore_tenant(request)
                .await
                .map_err(status_error)?;
            (response.into_inner().status, format)
        }
        TenantCommand::Hold {
            conn,
            tenant,
            reason,
            format,
        } => (hold(&conn, tenant, true, reason).await?, format),
        TenantCommand::Release {
            conn,
            tenant,
            format,
        } => (hold(&conn, tenant, false, String::new()).await?, format),
        TenantCommand::Status {
            conn,
            tenant,
            format,
        } => {
            let request = pb::GetTenantStatusRequest { tenant_id: tenant };
            let response = vault(&conn)
                .await?
                .get_tenant_status(request)
                .await
                .map_err(status_error)?;
            (Some(response.into_inner()), format)
        }
    };
    let status = status.context("the server sent no tenant status")?;
    let mut out = std::io::stdout().lock();
    if format.json {
        writeln!(out, "{}", to_json(&status))?;
    } else {
        out.write_all(text(&status, now_ms()).as_bytes())?;
    }
    Ok(())
}

async fn hold(
    conn: &Connection,
    tenant: String,
    hold: bool,
    reason: String,
) -> anyhow::Result<Option<pb::TenantStatus>> {
    let request = pb::SetLegalHoldRequest {
        tenant_id: tenant,
        hold,
        reason,
    };
    let response = vault(conn)
        .await?
        .set_legal_hold(request)
        .await
        .map_err(status_error)?;
    Ok(response.into_inner().status)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The status as one JSON document: times that are not set are null, text
/// that is not set is null, the receipt is null until the shred.
fn to_json(s: &pb::TenantStatus) -> serde_json::Value {
    let text = |t: &str| {
        if t.is_empty() {
            serde_json::Value::Null
        } else {
            t.into()
        }
    };
    let receipt = s.receipt.as_ref().map(|r| {
        serde_json::json!({
            "requested_at_ms": r.requested_at_ms,
            "requested_by": r.requested_by,
            "keys_destroyed_at_ms": optional_ms(r.keys_destroyed_at_ms),
            "shredded_at_ms": optional_ms(r.shredded_at_ms),
            "destroyed_dek_versions": r.destroyed_dek_versions,
            "purged_credentials": r.purged_credentials,
            "purged_versions": r.purged_versions,
        })
    });
    serde_json::json!({
        "tenant_id": s.tenant_id,
        "state": s.state,
        "deleted_at_ms": optional_ms(s.deleted_at_ms),
        "deleted_by": text(&s.deleted_by),
        "shred_after_ms": optional_ms(s.shred_after_ms),
        "legal_hold": s.legal_hold,
        "legal_hold_reason": text(&s.legal_hold_reason),
        "receipt": receipt,
    })
}

/// The status as a few aligned lines of text.
fn text(s: &pb::TenantStatus, now_ms: u64) -> String {
    let mut lines = vec![format!("tenant {}: {}", s.tenant_id, s.state)];
    let mut row = |label: &str, value: String| lines.push(format!("  {label:<16}{value}"));
    if s.deleted_at_ms != 0 {
        row(
            "deleted",
            format!(
                "{} UTC ({} ago) by {}",
                utc(s.deleted_at_ms),
                age(now_ms.saturating_sub(s.deleted_at_ms)),
                s.deleted_by
            ),
        );
    }
    if s.shred_after_ms != 0 {
        let when = if s.shred_after_ms > now_ms {
            format!("in {}", age(s.shred_after_ms - now_ms))
        } else {
            "due now".into()
        };
        let held = if s.legal_hold {
            ", once the legal hold is released"
        } else {
            ""
        };
        row(
            "shred after",
            format!("{} UTC ({when}{held})", utc(s.shred_after_ms)),
        );
    }
    if s.legal_hold {
        row("legal hold", format!("yes: {}", s.legal_hold_reason));
    }
    if let Some(r) = &s.receipt {
        row(
            "keys destroyed",
            format!("{} UTC", utc(r.keys_destroyed_at_ms)),
        );
        row("shredded", format!("{} UTC", utc(r.shredded_at_ms)));
        let versions: Vec<String> = r
            .destroyed_dek_versions
            .iter()
            .map(|v| format!("v{v}"))
            .collect();
        row("destroyed DEKs", versions.join(", "));
        row(
            "purged",
            format!(
                "{} credential(s), {} version(s)",
                r.purged_credentials, r.purged_versions
            ),
        );
    }
    lines.push(String::new());
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;

    #[test]
    fn grace_is_a_duration_in_seconds_and_never_off() {
        assert_eq!(parse_grace("7d"), Ok(7 * 86_400));
        assert_eq!(parse_grace("0s"), Ok(0));
        assert_eq!(parse_grace("90m"), Ok(5400));
        assert!(parse_grace("off").unwrap_err().contains("off"));
        assert!(parse_grace("7").is_err());
    }

    #[test]
    fn an_active_tenant_is_one_line_and_nulls_in_json() {
        let status = pb::TenantStatus {
            tenant_id: "acme".into(),
            state: "active".into(),
            ..Default::default()
        };
        assert_eq!(text(&status, 0), "tenant acme: active\n");
        let json = to_json(&status);
        assert_eq!(json["state"], "active");
        for field in ["deleted_at_ms", "deleted_by", "shred_after_ms", "receipt"] {
            assert!(json[field].is_null(), "{field}: {json}");
        }
        assert_eq!(json["legal_hold"], false);
    }

    #[test]
    fn a_deleted_held_tenant_shows_when_and_why() {
        let status = pb::TenantStatus {
            tenant_id: "acme".into(),
            state: "deleted".into(),
            deleted_at_ms: 20_000 * DAY,
            deleted_by: "spiffe://credvault/settings/ui".into(),
            shred_after_ms: 20_007 * DAY,
            legal_hold: true,
            legal_hold_reason: "case 42".into(),
            receipt: None,
        };
        let shown = text(&status, 20_001 * DAY);
        assert!(shown.starts_with("tenant acme: deleted\n"), "{shown}");
        assert!(
            shown.contains("2024-10-04 00:00 UTC (1d 0h ago) by spiffe://credvault/settings/ui"),
            "{shown}"
        );
        assert!(
            shown.contains("(in 6d 0h, once the legal hold is released)"),
            "{shown}"
        );
        assert!(shown.contains("legal hold      yes: case 42"), "{shown}");
        let json = to_json(&status);
        assert_eq!(json["shred_after_ms"], 20_007 * DAY);
        assert_eq!(json["legal_hold_reason"], "case 42");
    }

    #[test]
    fn a_shredded_tenant_shows_its_receipt() {
        let status = pb::TenantStatus {
            tenant_id: "acme".into(),
            state: "shredded".into(),
            deleted_at_ms: DAY,
            deleted_by: "ui".into(),
            receipt: Some(pb::DeletionReceipt {
                requested_at_ms: DAY,
                requested_by: "ui".into(),
                keys_destroyed_at_ms: 2 * DAY,
                shredded_at_ms: 2 * DAY + 1000,
                destroyed_dek_versions: vec![1, 2],
                purged_credentials: 3,
                purged_versions: 5,
            }),
            ..Default::default()
        };
        let shown = text(&status, 3 * DAY);
        assert!(shown.contains("destroyed DEKs  v1, v2"), "{shown}");
        assert!(shown.contains("3 credential(s), 5 version(s)"), "{shown}");
        let json = to_json(&status);
        assert_eq!(json["receipt"]["destroyed_dek_versions"][1], 2);
        assert_eq!(json["receipt"]["purged_versions"], 5);
    }
}
