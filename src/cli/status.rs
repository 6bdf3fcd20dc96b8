//! `credvault status`: the server at a glance (Admin `GetServerStatus`, admin
//! dev certificate by default). Exits 2 when the store no longer takes
//! writes or the audit log no longer takes records, so a script or a probe
//! can tell.

use std::io::Write;

use clap::Args;
use credvault::audit::Head;
use credvault::service::pb;

use super::client::{Connection, status as status_error};
use super::keys::{admin, age, utc};

/// The exit code when the server answers but its store refuses writes or
/// its audit log refuses records.
const UNHEALTHY_EXIT_CODE: i32 = 2;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Connection,
    /// One JSON document instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let status = runtime.block_on(async {
        admin(&args.conn)
            .await?
            .get_server_status(pb::GetServerStatusRequest {})
            .await
            .map_err(status_error)
            .map(tonic::Response::into_inner)
    })?;
    drop(runtime);
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&to_json(&status))?)?;
    } else {
        write!(out, "{}", text(&status))?;
    }
    out.flush()?;
    if !status.store_writable || !status.audit_failure.is_empty() {
        std::process::exit(UNHEALTHY_EXIT_CODE);
    }
    Ok(())
}

fn to_json(s: &pb::ServerStatus) -> serde_json::Value {
    serde_json::json!({
        "version": s.version,
        "started_at_ms": s.started_at_ms,
        "now_ms": s.now_ms,
        "root_key": { "version": s.root_key_version, "created_at_ms": s.root_key_created_at_ms },
        "primary_kek": {
            "version": s.primary_kek_version,
            "created_at_ms": s.primary_kek_created_at_ms,
            "encryptions": s.primary_kek_encryptions,
        },
        "rotation_jobs_running": s.rotation_jobs_running,
        "last_event_sequence": s.last_event_sequence,
        "last_audit_sequence": s.last_audit_sequence,
        "audit_head": audit_head(s),
        "store": { "writable": s.store_writable, "bytes": s.store_bytes },
        "audit_failure": (!s.audit_failure.is_empty()).then_some(&s.audit_failure),
    })
}

/// The audit head as `SEQUENCE:MAC` (`None`: no record yet).
fn audit_head(s: &pb::ServerStatus) -> Option<String> {
    let head = Head::try_from(s.audit_head.as_ref()?).ok()?;
    Some(head.to_string())
}

fn text(s: &pb::ServerStatus) -> String {
    let since = |ms: u64| {
        format!(
            "{} old (since {} UTC)",
            age(s.now_ms.saturating_sub(ms)),
            utc(ms)
        )
    };
    let store = match s.store_writable {
        true => "writable".to_owned(),
        false => {
            "REFUSING WRITES (it could not make a write durable; see the server log, then restart)"
                .to_owned()
        }
    };
    let audit = match s.audit_failure.as_str() {
        "" => String::new(),
        failure => format!(
            "  audit journal  REFUSING RECORDS: {failure} (audited calls fail; see the server \
             log, then restart)\n"
        ),
    };
    format!(
        "credvault {}, up {} (since {} UTC)\n\
         \x20 store          {store}, {:.1} MiB on disk\n\
         {audit}\
         \x20 root key       v{}, {}\n\
         \x20 primary KEK    v{}, {}, {} DEK wraps\n\
         \x20 rotation jobs  {} running\n\
         \x20 events         last sequence {}\n\
         \x20 audit log      last sequence {}, head {}\n",
        s.version,
        age(s.now_ms.saturating_sub(s.started_at_ms)),
        utc(s.started_at_ms),
        s.store_bytes as f64 / f64::from(1 << 20),
        s.root_key_version,
        since(s.root_key_created_at_ms),
        s.primary_kek_version,
        since(s.primary_kek_created_at_ms),
        s.primary_kek_encryptions,
        s.rotation_jobs_running,
        s.last_event_sequence,
        s.last_audit_sequence,
        audit_head(s).unwrap_or_else(|| "none".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_shows_ages_and_a_failed_store() {
        let day = 86_400_000;
        let mut status = pb::ServerStatus {
            version: "9.9.9".into(),
            started_at_ms: 20 * day,
            now_ms: 20 * day + 3_600_000,
            root_key_version: 2,
            root_key_created_at_ms: 10 * day,
            primary_kek_version: 5,
            primary_kek_created_at_ms: 18 * day,
            primary_kek_encryptions: 41,
            rotation_jobs_running: 1,
            last_event_sequence: 7,
            last_audit_sequence: 1234,
            store_writable: true,
            store_bytes: 3 << 20,
            audit_head: Some(pb::AuditHead {
                sequence: 1234,
                mac: vec![0xab; 32],
            }),
            audit_failure: String::new(),
        };
        let table = text(&status);
        for needle in [
            "credvault 9.9.9, up 1h 0m (since 1970-01-21 00:00 UTC)",
            "store          writable, 3.0 MiB on disk",
            "root key       v2, 10d 1h old (since 1970-01-11 00:00 UTC)",
            "primary KEK    v5, 2d 1h old",
            "41 DEK wraps",
            "rotation jobs  1 running",
            "last sequence 7",
            "last sequence 1234",
            &format!("head 1234:{}", "ab".repeat(32)),
        ] {
            assert!(table.contains(needle), "{needle:?} in\n{table}");
        }
        assert!(!table.contains("audit journal"), "{table}");
        assert_eq!(to_json(&status)["audit_failure"], serde_json::Value::Null);
        status.store_writable = false;
        status.audit_failure = "writing the audit journal: disk quota exceeded".into();
        let table = text(&status);
        assert!(table.contains("REFUSING WRITES"), "{table}");
        assert!(
            table.contains(
                "audit journal  REFUSING RECORDS: writing the audit journal: disk quota exceeded"
            ),
            "{table}"
        );
        assert!(
            table.contains("\n  root key"),
            "the rows stay aligned: {table}"
        );
        assert_eq!(to_json(&status)["store"]["writable"], false);
        assert_eq!(
            to_json(&status)["audit_failure"],
            "writing the audit journal: disk quota exceeded"
        );
        assert_eq!(to_json(&status)["root_key"]["version"], 2);
    }
}
