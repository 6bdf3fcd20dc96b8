//! `credvault watch`: follow the revocation event log of a running server
//! (Vault `WatchRevocations`), printing one JSON line per event.
//!
//! It connects like the client commands, with the executor dev certificate by
//! default. `--after N` resumes after sequence N (0: from now); the position
//! the stream starts from is written to stderr. Keepalives are printed only
//! with `--keepalives`. It exits 0 when the server ends the stream (as it does
//! when shutting down: reconnect with `--after` the last sequence printed), and
//! non-zero on an error, such as EVENTS_PRUNED when `--after` is too old.

use std::io::Write;

use clap::Args;
use credvault::pki::DevRole;
use credvault::service::pb::{self, revocation_event::Kind, vault_client::VaultClient};

use super::client::{Connection, status as status_error};

#[derive(Debug, Args)]
pub struct WatchArgs {
    #[command(flatten)]
    conn: Connection,
    /// Only this tenant's events (required when the certificate's grant is narrowed to
    /// some tenants).
    #[arg(long)]
    tenant: Option<String>,
    /// Start after this sequence number (0: from now).
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Also print the keepalives (kind KEEPALIVE: the stream's position).
    #[arg(long)]
    keepalives: bool,
}

pub fn run(args: WatchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(execute(args))
}

async fn execute(args: WatchArgs) -> anyhow::Result<()> {
    let mut client = VaultClient::new(args.conn.channel(DevRole::Executor).await?);
    let request = pb::WatchRevocationsRequest {
        after_sequence: args.after,
        tenant_id: args.tenant.unwrap_or_default(),
    };
    let mut stream = client
        .watch_revocations(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut opened = false;
    while let Some(event) = stream.message().await.map_err(status_error)? {
        let keepalive = event.kind == Kind::Keepalive as i32;
        if keepalive && !opened {
            eprintln!("watching events after sequence {}", event.sequence);
        }
        opened = true;
        if keepalive && !args.keepalives {
            continue;
        }
        // stdout is line-buffered: each event is out as soon as it arrives.
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", to_json(&event))?;
        out.flush()?;
    }
    eprintln!("the server ended the stream");
    Ok(())
}

/// One event as a JSON line; the credential is null for tenant-wide events and
/// keepalives, the tenant null for keepalives.
fn to_json(e: &pb::RevocationEvent) -> serde_json::Value {
    let kind = Kind::try_from(e.kind).map_or("UNKNOWN", |k| k.as_str_name());
    let text = |t: &str| {
        if t.is_empty() {
            serde_json::Value::Null
        } else {
            t.into()
        }
    };
    serde_json::json!({
        "sequence": e.sequence,
        "kind": kind,
        "tenant_id": text(&e.tenant_id),
        "credential_id": text(&e.credential_id),
        "at_ms": e.at_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_with_names_for_kinds() {
        let revoked = pb::RevocationEvent {
            sequence: 7,
            tenant_id: "acme".into(),
            credential_id: "gmail/alice".into(),
            kind: Kind::CredentialRevoked as i32,
            at_ms: 1234,
        };
        assert_eq!(
            to_json(&revoked).to_string(),
            r#"{"at_ms":1234,"credential_id":"gmail/alice","kind":"CREDENTIAL_REVOKED","sequence":7,"tenant_id":"acme"}"#
        );
        let keepalive = pb::RevocationEvent {
            sequence: 9,
            kind: Kind::Keepalive as i32,
            ..Default::default()
        };
        let json = to_json(&keepalive);
        assert_eq!(json["kind"], "KEEPALIVE");
        assert!(json["tenant_id"].is_null() && json["credential_id"].is_null());
        let unknown = pb::RevocationEvent {
            kind: 99,
            ..Default::default()
        };
        assert_eq!(to_json(&unknown)["kind"], "UNKNOWN");
    }
}
