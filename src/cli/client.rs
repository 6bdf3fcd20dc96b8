//! The client commands: `seal`, `unseal`, `meta`, `list`, `revoke`.
//!
//! They connect over mutual TLS with the dev certificates by default (the role
//! each command needs), or the files given. A secret is read from stdin or a
//! file, never from the command line, and printed only by `unseal`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use credvault::pki::{DevPkiPaths, DevRole};
use credvault::service::pb::{self, vault_client::VaultClient};
use zeroize::Zeroizing;

/// Where the server is and who we are.
#[derive(Debug, Args)]
pub struct Connection {
    /// host:port of the server.
    #[arg(long, env = "CREDVAULT_SERVER", default_value = "localhost:7443")]
    server: String,
    /// Directory of the dev certificates (used for any file not given).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// CA bundle that the server certificate chains to.
    #[arg(long, env = "CREDVAULT_CA")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "CREDVAULT_CERT")]
    cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "CREDVAULT_KEY")]
    key: Option<PathBuf>,
}

impl Connection {
    async fn vault(&self, role: DevRole) -> anyhow::Result<VaultClient<tonic::transport::Channel>> {
        let channel = self.channel(role).await?;
        Ok(VaultClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// A channel presenting the given files, or `role`'s dev certificate for any not given.
    pub async fn channel(&self, role: DevRole) -> anyhow::Result<tonic::transport::Channel> {
        let dev = DevPkiPaths::in_dir(self.dir.join("certs"));
        let (dev_cert, dev_key) = dev.client(role);
        let ca = self.ca.clone().unwrap_or_else(|| dev.ca_cert());
        let cert = self.cert.clone().unwrap_or(dev_cert);
        let key = self.key.clone().unwrap_or(dev_key);
        credvault::client::connect(&self.server, &ca, &cert, &key)
            .await
            .with_context(|| format!("connecting to {}", self.server))
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum KindArg {
    CookieJar,
    ApiKey,
    OauthToken,
    Generic,
}

impl KindArg {
    fn to_pb(self) -> pb::CredentialKind {
        match self {
            KindArg::CookieJar => pb::CredentialKind::CookieJar,
            KindArg::ApiKey => pb::CredentialKind::ApiKey,
            KindArg::OauthToken => pb::CredentialKind::OauthToken,
            KindArg::Generic => pb::CredentialKind::Generic,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Seal a secret read from stdin (or --file) as a new credential version.
    Seal {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
        #[arg(long, value_enum, default_value = "generic")]
        kind: KindArg,
        /// Read the secret from this file instead of stdin.
        #[arg(long)]
        file: Option<PathBuf>,
        /// A label KEY=VALUE (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        #[arg(long)]
        expires_at_ms: Option<u64>,
        /// Compare-and-set: the current version expected (0 = must not exist).
        #[arg(long)]
        expected_version: Option<u32>,
    },
    /// Unseal a credential and write the secret to stdout.
    Unseal {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        version: Option<u32>,
        /// Why (recorded for the audit log), e.g. a task id.
        #[arg(long, default_value = "")]
        purpose: String,
    },
    /// Show a credential's metadata (JSON).
    Meta {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// List a tenant's credentials (JSON, one per line).
    List {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        tenant: String,
        #[arg(long, value_enum)]
        kind: Option<KindArg>,
        /// Fetch at most this many (0 = all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Revoke every version of a credential.
    Revoke {
        #[command(flatten)]
        conn: Connection,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

fn parse_label(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| "expected KEY=VALUE".into())
}

pub fn run(command: ClientCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(execute(command))
}

async fn execute(command: ClientCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        ClientCommand::Seal {
            conn,
            tenant,
            id,
            kind,
            file,
            labels,
            expires_at_ms,
            expected_version,
        } => {
            let mut secret = Zeroizing::new(Vec::new());
            match file {
                Some(path) => {
                    *secret = std::fs::read(&path).with_context(|| format!("{}", path.display()))?
                }
                None => {
                    std::io::stdin().read_to_end(&mut secret)?;
                }
            }
            let request = pb::SealRequest {
                tenant_id: tenant,
                credential_id: id,
                kind: kind.to_pb() as i32,
                secret: std::mem::take(&mut *secret),
                labels: labels.into_iter().collect::<HashMap<_, _>>(),
                expires_at_ms,
                expected_version,
            };
            let response = conn
                .vault(DevRole::Ingest)
                .await?
                .seal(request)
                .await
                .map_err(status)?;
            writeln!(
                out,
                "{}",
                json(&response.into_inner().metadata.unwrap_or_default())
            )?;
        }
        ClientCommand::Unseal {
            conn,
            tenant,
            id,
            version,
            purpose,
        } => {
            let request = pb::UnsealRequest {
                tenant_id: tenant,
                credential_id: id,
                version,
                purpose,
            };
            let response = conn
                .vault(DevRole::Executor)
                .await?
                .unseal(request)
                .await
                .map_err(status)?;
            let secret = Zeroizing::new(response.into_inner().secret);
            out.write_all(&secret)?;
        }
        ClientCommand::Meta {
            conn,
            tenant,
            id,
            version,
        } => {
            let request = pb::GetMetadataRequest {
                tenant_id: tenant,
                credential_id: id,
                version,
            };
            let response = conn
                .vault(DevRole::Executor)
                .await?
                .get_metadata(request)
                .await
                .map_err(status)?;
            writeln!(
                out,
                "{}",
                json(&response.into_inner().metadata.unwrap_or_default())
            )?;
        }
        ClientCommand::List {
            conn,
            tenant,
            kind,
            limit,
        } => {
            let mut client = conn.vault(DevRole::Executor).await?;
            let (mut token, mut shown) = (String::new(), 0usize);
            loop {
                let request = pb::ListCredentialsRequest {
                    tenant_id: tenant.clone(),
                    kind: kind.map_or(0, |k| k.to_pb() as i32),
                    page_size: 0,
                    page_token: token,
                };
                let page = client
                    .list_credentials(request)
                    .await
                    .map_err(status)?
                    .into_inner();
                for meta in &page.credentials {
                    if limit != 0 && shown == limit {
                        return Ok(());
                    }
                    writeln!(out, "{}", json(meta))?;
                    shown += 1;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
        }
        ClientCommand::Revoke {
            conn,
            tenant,
            id,
            reason,
        } => {
            let request = pb::RevokeRequest {
                tenant_id: tenant,
                credential_id: id,
                reason,
            };
            let response = conn
                .vault(DevRole::Settings)
                .await?
                .revoke(request)
                .await
                .map_err(status)?;
            let revocation = response.into_inner().revocation.unwrap_or_default();
            writeln!(out, "{}", revocation_json(&revocation))?;
        }
    }
    Ok(())
}

/// A failed call as an error line: the status code, its reason and message.
pub fn status(status: tonic::Status) -> anyhow::Error {
    let reason = credvault::error::reason_of(&status).unwrap_or_default();
    anyhow::anyhow!("{:?} {}: {}", status.code(), reason, status.message())
}

fn json(m: &pb::CredentialMetadata) -> serde_json::Value {
    let kind = pb::CredentialKind::try_from(m.kind).map_or("UNKNOWN", |k| k.as_str_name());
    serde_json::json!({
        "tenant_id": m.tenant_id,
        "credential_id": m.credential_id,
        "version": m.version,
        "latest_version": m.latest_version,
        "kind": kind,
        "labels": m.labels,
        "created_at_ms": m.created_at_ms,
        "expires_at_ms": m.expires_at_ms,
        "size_bytes": m.size_bytes,
        "dek_version": m.dek_version,
        "revocation": m.revocation.as_ref().map(revocation_json),
    })
}

fn revocation_json(r: &pb::Revocation) -> serde_json::Value {
    serde_json::json!({"revoked_at_ms": r.revoked_at_ms, "revoked_by": r.revoked_by, "reason": r.reason})
}
