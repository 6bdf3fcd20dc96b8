//! `credvault keys status`: the usage ledger from a running server (Admin
//! `GetKeyStatus`), as a table or JSON; `credvault keys destroy`: destroy a
//! retired key version (Admin `DestroyKeyVersion`).
//!
//! It connects like the client commands (`--server`, `--dir`, `--ca`, `--cert`,
//! `--key`, the same `CREDVAULT_*` variables), with the admin dev certificate
//! by default.

use std::io::Write;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, Subcommand, ValueEnum};
use credvault::pki::DevRole;

use super::client::{Connection, status as status_error};
use credvault::service::pb::{self, admin_client::AdminClient};

#[derive(Debug, Args)]
pub struct KeysArgs {
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, Subcommand)]
enum KeysCommand {
    /// Every key version: state, age, encryptions, and how many records it still protects.
    Status {
        #[command(flatten)]
        conn: Connection,
        /// Only this tenant's data keys (the root key and KEKs are always shown).
        #[arg(long)]
        tenant: Option<String>,
        /// One JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Destroy a retired key version: its key bytes are removed for good. Refused for the
    /// primary and while anything still depends on it (see `keys status`).
    Destroy {
        #[command(flatten)]
        conn: Connection,
        /// The layer of the version.
        #[arg(long, value_enum)]
        layer: LayerArg,
        /// The tenant, for a DEK version.
        #[arg(long, required_if_eq("layer", "dek"))]
        tenant: Option<String>,
        /// The version to destroy.
        #[arg(long)]
        version: u32,
    },
}

/// A layer whose versions the store keeps (root keys are files the operator holds).
#[derive(Debug, Clone, Copy, ValueEnum)]
enum LayerArg {
    Kek,
    Dek,
}

impl LayerArg {
    fn name(self) -> &'static str {
        match self {
            LayerArg::Kek => "kek",
            LayerArg::Dek => "dek",
        }
    }
}

/// An Admin client with the admin dev certificate unless told otherwise.
pub(super) async fn admin(
    conn: &Connection,
) -> anyhow::Result<AdminClient<tonic::transport::Channel>> {
    Ok(AdminClient::new(conn.channel(DevRole::Admin).await?).max_decoding_message_size(usize::MAX))
}

/// Every row of the key status of `tenant` (empty: the whole vault), page
/// after page.
pub(super) async fn key_status(
    client: &mut AdminClient<tonic::transport::Channel>,
    tenant: &str,
) -> anyhow::Result<pb::KeyStatus> {
    let mut all = pb::KeyStatus::default();
    loop {
        let page = client
            .get_key_status(pb::GetKeyStatusRequest {
                tenant_id: tenant.to_owned(),
                page_size: 10_000,
                page_token: std::mem::take(&mut all.next_page_token),
            })
            .await
            .map_err(status_error)?
            .into_inner();
        all.versions.extend(page.versions);
        if page.next_page_token.is_empty() {
            return Ok(all);
        }
        all.next_page_token = page.next_page_token;
    }
}

/// The root key from `--root-key-file` or `--root-key-env` (one of them given).
pub(super) fn load_root(
    file: Option<PathBuf>,
    env: Option<String>,
) -> anyhow::Result<credvault::crypto::SymmetricKey> {
    Ok(match (file, env) {
        (Some(path), _) => credvault::crypto::root::load_file(&path)?,
        (None, Some(var)) => credvault::crypto::root::load_env(&var)?,
        (None, None) => anyhow::bail!("give the root key: --root-key-file or --root-key-env"),
    })
}

pub fn run(args: KeysArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(execute(args.command))
}

async fn execute(command: KeysCommand) -> anyhow::Result<()> {
    match command {
        KeysCommand::Status { conn, tenant, json } => {
            let mut client = admin(&conn).await?;
            let status = key_status(&mut client, &tenant.unwrap_or_default()).await?;
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let mut out = std::io::stdout().lock();
            if json {
                writeln!(out, "{}", to_json(&status, now))?;
            } else {
                out.write_all(table(&status, now).as_bytes())?;
            }
        }
        KeysCommand::Destroy {
            conn,
            layer,
            tenant,
            version,
        } => {
            let request = pb::DestroyKeyVersionRequest {
                layer: layer.name().into(),
                tenant_id: tenant.clone().unwrap_or_default(),
                version,
            };
            admin(&conn)
                .await?
                .destroy_key_version(request)
                .await
                .map_err(status_error)?;
            let of = tenant.map_or(String::new(), |t| format!(" of tenant {t}"));
            println!("destroyed {} v{version}{of}", layer.name());
        }
    }
    Ok(())
}

/// A time that may be unset (0) as JSON: the number, or null.
pub(super) fn optional_ms(ms: u64) -> serde_json::Value {
    if ms == 0 {
        serde_json::Value::Null
    } else {
        ms.into()
    }
}

/// The ledger as one JSON document. Times that are not set are null; a DEK row
/// names the KEK version that wraps it.
fn to_json(status: &pb::KeyStatus, now_ms: u64) -> serde_json::Value {
    let versions: Vec<_> = status
        .versions
        .iter()
        .map(|v| {
            serde_json::json!({
                "layer": v.layer,
                "tenant_id": v.tenant_id,
                "version": v.version,
                "state": v.state,
                "created_at_ms": v.created_at_ms,
                "age_ms": now_ms.saturating_sub(v.created_at_ms),
                "encryptions": v.encryptions,
                "protected_records": v.protected_records,
                "kek_version": if v.layer == "dek" { v.kek_version.into() } else { serde_json::Value::Null },
                "retired_at_ms": optional_ms(v.retired_at_ms),
                "destroyed_at_ms": optional_ms(v.destroyed_at_ms),
            })
        })
        .collect();
    serde_json::json!({ "versions": versions })
}

/// What a layer's keys protect, for the table.
fn protects(layer: &str, n: u64) -> String {
    let unit = match layer {
        "root" => "KEK",
        "kek" => "DEK",
        "dek" => "version",
        _ => "record",
    };
    let plural = if n == 1 { "" } else { "s" };
    format!("{n} {unit}{plural}")
}

fn table(status: &pb::KeyStatus, now_ms: u64) -> String {
    let header = [
        "LAYER",
        "TENANT",
        "VERSION",
        "STATE",
        "CREATED (UTC)",
        "AGE",
        "RETIRED",
        "KEK",
        "ENCRYPTIONS",
        "PROTECTS",
    ]
    .map(String::from);
    let mut rows = vec![header];
    for v in &status.versions {
        rows.push([
            v.layer.clone(),
            if v.tenant_id.is_empty() {
                "-".into()
            } else {
                v.tenant_id.clone()
            },
            v.version.to_string(),
            v.state.clone(),
            utc(v.created_at_ms),
            age(now_ms.saturating_sub(v.created_at_ms)),
            // How long ago it stopped being the primary.
            if v.retired_at_ms == 0 {
                "-".into()
            } else {
                format!("{} ago", age(now_ms.saturating_sub(v.retired_at_ms)))
            },
            // The KEK version that wraps a DEK.
            if v.layer == "dek" && v.kek_version != 0 {
                format!("v{}", v.kek_version)
            } else {
                "-".into()
            },
            // The root key's wraps are not counted (one per KEK version).
            if v.layer == "root" {
                "-".into()
            } else {
                v.encryptions.to_string()
            },
            protects(&v.layer, v.protected_records),
        ]);
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// An age as its two largest units: `3d 4h`, `5h 12m`, `42s`.
pub(super) fn age(ms: u64) -> String {
    let s = ms / 1000;
    let (d, h, m) = (s / 86_400, s / 3600 % 24, s / 60 % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {}s", s % 60),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DD HH:MM` (UTC).
pub(super) fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        rem / 3600,
        rem / 60 % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        layer: &str,
        tenant: &str,
        version: u32,
        state: &str,
        at: u64,
        enc: u64,
        prot: u64,
    ) -> pb::KeyVersionStatus {
        pb::KeyVersionStatus {
            layer: layer.into(),
            tenant_id: tenant.into(),
            version,
            state: state.into(),
            created_at_ms: at,
            encryptions: enc,
            protected_records: prot,
            kek_version: if layer == "dek" { 1 } else { 0 },
            retired_at_ms: 0,
            destroyed_at_ms: 0,
        }
    }

    /// 2026-01-01T00:00:00Z.
    const T0: u64 = 1_767_225_600_000;

    #[test]
    fn dates_and_ages_read_like_a_calendar() {
        assert_eq!(utc(0), "1970-01-01 00:00");
        assert_eq!(utc(T0), "2026-01-01 00:00");
        assert_eq!(utc(951_782_400_000 + 90_061_000), "2000-03-01 01:01"); // 2000-02-29 + 1d 1h 1m
        assert_eq!(age(42_000), "42s");
        assert_eq!(age(125_000), "2m 5s");
        assert_eq!(age((5 * 3600 + 12 * 60) * 1000), "5h 12m");
        assert_eq!(age((3 * 86_400 + 4 * 3600 + 59) * 1000), "3d 4h");
    }

    #[test]
    fn the_table_aligns_columns_and_names_what_each_layer_protects() {
        let status = pb::KeyStatus {
            versions: vec![
                row("root", "", 1, "active", T0, 0, 2),
                pb::KeyVersionStatus {
                    retired_at_ms: T0 + 36 * 3_600_000,
                    ..row("kek", "", 1, "decrypt-only", T0, 12, 0)
                },
                row("dek", "acme", 3, "active", T0 + 86_400_000, 7, 5),
                row("dek", "globex", 1, "active", T0 + 86_400_000, 1, 1),
            ],
            ..Default::default()
        };
        let now = T0 + 2 * 86_400_000;
        let text = table(&status, now);
        let expected = "\
LAYER  TENANT  VERSION  STATE         CREATED (UTC)     AGE    RETIRED     KEK  ENCRYPTIONS  PROTECTS
root   -       1        active        2026-01-01 00:00  2d 0h  -           -    -            2 KEKs
kek    -       1        decrypt-only  2026-01-01 00:00  2d 0h  12h 0m ago  -    12           0 DEKs
dek    acme    3        active        2026-01-02 00:00  1d 0h  -           v1   7            5 versions
dek    globex  1        active        2026-01-02 00:00  1d 0h  -           v1   1            1 version
";
        assert_eq!(text, expected);
        let json = to_json(&status, now);
        assert_eq!(json["versions"][2]["tenant_id"], "acme");
        assert_eq!(json["versions"][2]["protected_records"], 5);
        assert_eq!(json["versions"][0]["age_ms"], 2 * 86_400_000);
        assert_eq!(json["versions"][2]["kek_version"], 1);
        assert!(json["versions"][1]["kek_version"].is_null());
        assert_eq!(json["versions"][1]["retired_at_ms"], T0 + 36 * 3_600_000);
        assert!(json["versions"][2]["retired_at_ms"].is_null());
        assert!(json["versions"][1]["destroyed_at_ms"].is_null());
    }
}
