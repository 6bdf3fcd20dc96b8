//! The `Admin` service: key status, rotation and key destruction, audit query
//! and verification, and online backups. Every call is
//! authorised first (a denial is audited there), then its outcome goes to the
//! audit log (`audit_status`): a read whose record cannot be written fails, a
//! change that happened is returned with the failure logged.
//!
//! Each call logs one line (rpc, caller, tenant, outcome); never key bytes.

use tonic::{Request, Response, Status};

use super::audit::{Unrecorded, who};
use super::{Shared, convert, pb, tenant_error};
use crate::audit::{AuditEntry, AuditFilter, Head};
use crate::authz::Rpc;
use crate::crypto::root;
use crate::error::{Error, Invalid, status_with_reason};
use crate::vault::{KeyLayer, validate};

/// Longest job id accepted (`dek-{64-character tenant}-v{u32}` is 80).
const MAX_JOB_ID: usize = 128;

/// The reason of a root key file the server could not use.
const ROOT_KEY_UNAVAILABLE: &str = "ROOT_KEY_UNAVAILABLE";

pub(crate) struct AdminService(pub Shared);

fn tenant(t: &str) -> Option<&str> {
    (!t.is_empty()).then_some(t)
}

/// The one log line of a call. `outcome` is "ok" or the stable reason.
fn log(rpc: &str, caller: &str, tenant: &str, outcome: &str) {
    tracing::info!(rpc, caller = %caller, tenant, outcome);
}

fn outcome<T>(result: &Result<T, Error>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(error) => error.reason(),
    }
}

/// The library's NotFound speaks of credentials; for these calls it is the tenant.
/// A new root key file the server cannot use: nothing changes.
fn root_key_unavailable(message: String) -> Status {
    status_with_reason(tonic::Code::InvalidArgument, message, ROOT_KEY_UNAVAILABLE)
}

/// What a DestroyKeyVersion request names, checked: the layer (KEK or DEK), the
/// tenant (a DEK's only), and the version. A refusal comes with its reason, for
/// the log line.
fn destroy_target(
    r: &pb::DestroyKeyVersionRequest,
) -> Result<(KeyLayer, Option<&str>, u32), (Status, &'static str)> {
    let invalid = |invalid: Invalid| {
        let reason = invalid.reason();
        (Status::from(Error::Invalid(invalid)), reason)
    };
    let layer = match KeyLayer::parse(&r.layer) {
        Some(layer @ (KeyLayer::Kek | KeyLayer::Dek)) => layer,
        Some(KeyLayer::Root) | None => return Err(invalid(Invalid::KeyLayer)),
    };
    let tenant = match layer {
        KeyLayer::Dek => {
            validate::tenant_id(&r.tenant_id).map_err(invalid)?;
            Some(r.tenant_id.as_str())
        }
        // A KEK belongs to no tenant: naming one is a mistake worth stopping,
        // not ignoring, when the call destroys key material.
        _ if !r.tenant_id.is_empty() => {
            let reason = Invalid::KeyLayer.reason();
            let status = status_with_reason(
                tonic::Code::InvalidArgument,
                "a KEK belongs to no tenant: leave tenant_id empty for layer \"kek\"",
                reason,
            );
            return Err((status, reason));
        }
        _ => None,
    };
    if r.version == 0 {
        return Err(invalid(Invalid::Version));
    }
    Ok((layer, tenant, r.version))
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn rotate_kek(
        &self,
        req: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        let caller = self.0.authorise(&req, Rpc::RotateKek, None).await?;
        let who = who(&caller.identity, Rpc::RotateKek, &req);
        let audit_tenant = String::new();
        let result: Result<Response<pb::RotationJob>, Status> = async move {
            let result = self.0.vault.rotate_kek().await;
            match &result {
                Ok(job) => {
                    tracing::info!(rpc = "RotateKek", caller = %caller.identity, tenant = "", outcome = "ok", job = %job.id, "KEK rotated")
                }
                Err(error) => log("RotateKek", &caller.identity, "", error.reason()),
            }
            Ok(Response::new(convert::rotation_job(result?)))
        }
        .await;
        self.0
            .audit_status(&who, &audit_tenant, result, Unrecorded::Answer)
            .await
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::RotateTenantKey, tenant(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::RotateTenantKey, &req);
        let audit_tenant = req.get_ref().tenant_id.clone();
        let result: Result<Response<pb::RotationJob>, Status> = async move {
            let r = req.into_inner();
            // The library checks the tenant id (INVALID_ID) before anything else.
            let result = self
                .0
                .vault
                .rotate_tenant_key(&r.tenant_id, r.reencrypt)
                .await;
            match &result {
                Ok(job) => {
                    tracing::info!(rpc = "RotateTenantKey", caller = %caller.identity, tenant = r.tenant_id.as_str(), outcome = "ok", job = %job.id, reencrypt = r.reencrypt, "tenant key rotated")
                }
                Err(error) => log(
                    "RotateTenantKey",
                    &caller.identity,
                    &r.tenant_id,
                    error.reason(),
                ),
            }
            match result {
                Ok(job) => Ok(Response::new(convert::rotation_job(job))),
                Err(error) => Err(tenant_error(error, &r.tenant_id)),
            }
        }
        .await;
        self.0
            .audit_status(&who, &audit_tenant, result, Unrecorded::Answer)
            .await
    }

    async fn rotate_root_key(
        &self,
        req: Request<pb::RotateRootKeyRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        let caller = self.0.authorise(&req, Rpc::RotateRootKey, None).await?;
        let who = who(&caller.identity, Rpc::RotateRootKey, &req);
        let file = req.into_inner().new_root_key_file;
        // In its own task, so that a client going away cannot cancel it
        // between its commit and the new root key's install in memory (the
        // store would then need a key this process no longer holds) or before
        // its audit record.
        let shared = self.0.clone();
        let rotation = async move {
            let result = rotate_root_from_file(&shared.vault, &caller.identity, file).await;
            shared
                .audit_status(&who, "", result, Unrecorded::Answer)
                .await
        };
        tokio::spawn(rotation)
            .await
            .map_err(|_| Status::internal("the root key rotation task failed"))?
    }

    async fn get_key_status(
        &self,
        req: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let wanted = tenant(&req.get_ref().tenant_id).map(str::to_owned);
        let page_size = req.get_ref().page_size as usize;
        let token = Some(req.get_ref().page_token.clone()).filter(|t| !t.is_empty());
        let caller = self
            .0
            .authorise(&req, Rpc::GetKeyStatus, wanted.as_deref())
            .await?;
        let who = who(&caller.identity, Rpc::GetKeyStatus, &req);
        let audit_tenant = req.get_ref().tenant_id.clone();
        let result: Result<Response<pb::KeyStatus>, Status> = async move {
            // Reads every key record (and, for the whole vault, every tenant's):
            // off the async workers.
            let vault = self.0.vault.clone();
            let query = wanted.clone();
            let result = tokio::task::spawn_blocking(move || {
                vault.key_status_page(query.as_deref(), page_size, token.as_deref())
            })
            .await
            .map_err(|_| Status::internal("key status task failed"))?;
            let tenant = wanted.as_deref().unwrap_or("");
            log("GetKeyStatus", &caller.identity, tenant, outcome(&result));
            match result {
                Ok(page) => Ok(Response::new(convert::key_status_page(page))),
                Err(error) => Err(tenant_error(error, tenant)),
            }
        }
        .await;
        self.0
            .audit_status(&who, &audit_tenant, result, Unrecorded::Refuse)
            .await
    }

    async fn destroy_key_version(
        &self,
        req: Request<pb::DestroyKeyVersionRequest>,
    ) -> Result<Response<pb::DestroyKeyVersionResponse>, Status> {
        let r = req.get_ref();
        // A KEK is vault-wide: a tenant-narrowed grant must not reach it by
        // naming one of its tenants.
        let scope = match KeyLayer::parse(&r.layer) {
            Some(KeyLayer::Kek) => None,
            _ => tenant(&r.tenant_id),
        };
        let caller = self
            .0
            .authorise(&req, Rpc::DestroyKeyVersion, scope)
            .await?;
        let who = who(&caller.identity, Rpc::DestroyKeyVersion, &req);
        let audit_tenant = req.get_ref().tenant_id.clone();
        let result: Result<Response<pb::DestroyKeyVersionResponse>, Status> = async move {
            let r = req.into_inner();
            let (layer, tenant, version) = match destroy_target(&r) {
                Ok(target) => target,
                Err((status, reason)) => {
                    log("DestroyKeyVersion", &caller.identity, &r.tenant_id, reason);
                    return Err(status);
                }
            };
            let result = self
                .0
                .vault
                .destroy_key_version(layer, tenant, version)
                .await;
            match &result {
                Ok(()) => {
                    tracing::info!(rpc = "DestroyKeyVersion", caller = %caller.identity, tenant = r.tenant_id.as_str(), outcome = "ok", layer = layer.name(), version, "key version destroyed")
                }
                Err(error) => {
                    tracing::info!(rpc = "DestroyKeyVersion", caller = %caller.identity, tenant = r.tenant_id.as_str(), outcome = error.reason(), layer = layer.name(), version)
                }
            }
            result?;
            Ok(Response::new(pb::DestroyKeyVersionResponse {}))
        }
        .await;
        self.0
            .audit_status(&who, &audit_tenant, result, Unrecorded::Answer)
            .await
    }

    async fn get_rotation_job(
        &self,
        req: Request<pb::GetRotationJobRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        let caller = self.0.authorise(&req, Rpc::GetRotationJob, None).await?;
        let who = who(&caller.identity, Rpc::GetRotationJob, &req);
        let audit_tenant = String::new();
        let result: Result<Response<pb::RotationJob>, Status> = async move {
            let id = req.into_inner().job_id;
            let result = if id.is_empty() || id.len() > MAX_JOB_ID {
                Err(Error::Invalid(Invalid::JobId))
            } else {
                self.0.vault.rotation_job(&id)
            };
            log("GetRotationJob", &caller.identity, "", outcome(&result));
            Ok(Response::new(convert::rotation_job(result?)))
        }
        .await;
        self.0
            .audit_status(&who, &audit_tenant, result, Unrecorded::Refuse)
            .await
    }

    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        // A tenant-narrowed caller (the settings role) must name its tenant.
        let wanted = tenant(&req.get_ref().tenant_id).map(str::to_owned);
        let caller = self
            .0
            .authorise(&req, Rpc::QueryAudit, wanted.as_deref())
            .await?;
        let who = who(&caller.identity, Rpc::QueryAudit, &req);
        let audit_tenant = req.get_ref().tenant_id.clone();
        let result: Result<Response<pb::QueryAuditResponse>, Status> = async move {
            let q = req.into_inner();
            let text = |s: String| (!s.is_empty()).then_some(s);
            let filter = AuditFilter {
                tenant: wanted.clone(),
                credential: text(q.credential_id),
                caller: text(q.caller),
                from_ms: (q.from_ms != 0).then_some(q.from_ms),
                to_ms: (q.to_ms != 0).then_some(q.to_ms),
                outcome: text(q.outcome),
            };
            let token = text(q.page_token);
            let vault = self.0.vault.clone();
            let result = tokio::task::spawn_blocking(move || {
                let log = vault.audit_log().ok_or(Error::AuditUnavailable)?;
                Ok::<_, Error>(log.query(&filter, q.page_size as usize, token.as_deref())?)
            })
            .await
            .map_err(|_| Status::internal("audit query task failed"))?;
            log(
                "QueryAudit",
                &caller.identity,
                wanted.as_deref().unwrap_or(""),
                outcome(&result),
            );
            let page = result?;
            Ok(Response::new(pb::QueryAuditResponse {
                records: page
                    .entries
                    .into_iter()
                    .map(pb::AuditRecord::from)
                    .collect(),
                next_page_token: page.next_page_token.unwrap_or_default(),
            }))
        }
        .await;
        self.0
            .audit_status(&who, &audit_tenant, result, Unrecorded::Refuse)
            .await
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let caller = self.0.authorise(&req, Rpc::VerifyAudit, None).await?;
        let who = who(&caller.identity, Rpc::VerifyAudit, &req);
        let audit_tenant = String::new();
        let seen = req.get_ref().seen.as_ref().map(Head::try_from);
        let result: Result<Response<pb::VerifyAuditResponse>, Status> = async move {
            let vault = self.0.vault.clone();
            let result = tokio::task::spawn_blocking(move || {
                let seen = seen.transpose().map_err(|_| Invalid::AuditHead)?;
                let log = vault.audit_log().ok_or(Error::AuditUnavailable)?;
                Ok::<_, Error>(log.verify_against(seen)?)
            })
            .await
            .map_err(|_| Status::internal("audit verify task failed"))?;
            log("VerifyAudit", &caller.identity, "", outcome(&result));
            let verification = result?;
            if !verification.ok {
                tracing::error!(
                    first_bad_sequence = verification.first_bad_sequence,
                    reason = %verification.reason,
                    "the audit chain does not verify"
                );
            }
            Ok(Response::new(verification.into()))
        }
        .await;
        self.0
            .audit_status(&who, &audit_tenant, result, Unrecorded::Refuse)
            .await
    }

    async fn get_server_status(
        &self,
        req: Request<pb::GetServerStatusRequest>,
    ) -> Result<Response<pb::ServerStatus>, Status> {
        let caller = self.0.authorise(&req, Rpc::GetServerStatus, None).await?;
        let who = who(&caller.identity, Rpc::GetServerStatus, &req);
        let vault = self.0.vault.clone();
        let result = tokio::task::spawn_blocking(move || vault.status())
            .await
            .map_err(|_| Status::internal("status task failed"))?;
        log("GetServerStatus", &caller.identity, "", outcome(&result));
        let started_at_ms = self.0.started_at_ms;
        let response = result.map_err(Status::from).map(|status| {
            Response::new(pb::ServerStatus {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                started_at_ms,
                now_ms: status.now_ms,
                root_key_version: status.root.version,
                root_key_created_at_ms: status.root.created_at_ms,
                primary_kek_version: status.primary_kek.version,
                primary_kek_created_at_ms: status.primary_kek.created_at_ms,
                primary_kek_encryptions: status.primary_kek.encryptions,
                rotation_jobs_running: status.rotation_jobs_running as u32,
                last_event_sequence: status.last_event_sequence,
                last_audit_sequence: status.audit_head.map_or(0, |head| head.sequence),
                store_writable: status.store.writable,
                store_bytes: status.store.bytes_on_disk.unwrap_or(0),
                audit_head: status.audit_head.map(Into::into),
                audit_failure: status.audit_failure.unwrap_or_default(),
            })
        });
        // Answered even when its record cannot be written: the status is how
        // an operator learns that the audit log is down.
        self.0
            .audit_status(&who, "", response, Unrecorded::Answer)
            .await
    }

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupResponse>, Status> {
        let caller = self.0.authorise(&req, Rpc::Backup, None).await?;
        let who = who(&caller.identity, Rpc::Backup, &req);
        let directory = std::path::PathBuf::from(&req.get_ref().directory);
        let vault = self.0.vault.clone();
        let result = tokio::task::spawn_blocking(move || vault.backup(&directory))
            .await
            .map_err(|_| Status::internal("backup task failed"))?;
        log("Backup", &caller.identity, "", outcome(&result));
        let written = result.as_ref().ok().map(|summary| summary.file.clone());
        let response = result.map_err(Status::from).map(|summary| {
            Response::new(pb::BackupResponse {
                bytes: summary.bytes,
                file: summary.file.display().to_string(),
                records: summary.rows,
                changes: summary.changes,
                root_version: summary.root_version,
                created_at_ms: summary.created_at_ms,
                consistent_at_ms: summary.consistent_at_ms,
            })
        });
        let audited = self
            .0
            .audit_status(&who, "", response, Unrecorded::Refuse)
            .await;
        if audited.is_err()
            && let Some(file) = written
        {
            // Fail closed: a copy of the store no audit record mentions is not kept.
            let _ = std::fs::remove_file(&file);
        }
        audited
    }
}

/// An audit record on the wire (never a secret: records hold none).
impl From<AuditEntry> for pb::AuditRecord {
    fn from(entry: AuditEntry) -> Self {
        let r = entry.record;
        pb::AuditRecord {
            sequence: entry.sequence,
            at_ms: r.at_ms,
            caller: r.caller,
            rpc: r.rpc,
            tenant_id: r.tenant,
            credential_id: r.credential,
            version: r.version,
            purpose: r.purpose,
            outcome: r.outcome,
            mac: r.mac,
        }
    }
}

/// RotateRootKey's work for `identity`: loads the new root key from `file`
/// (a path on the server), rotates to it and logs the outcome.
async fn rotate_root_from_file(
    vault: &crate::vault::Vault,
    identity: &str,
    file: String,
) -> Result<Response<pb::RotationJob>, Status> {
    let path = std::path::PathBuf::from(file);
    if path.as_os_str().is_empty() {
        log("RotateRootKey", identity, "", ROOT_KEY_UNAVAILABLE);
        return Err(root_key_unavailable(
            "new_root_key_file is empty: give the path, on the server, of the new root key \
             file (credvault keygen --out FILE)"
                .into(),
        ));
    }
    // The file is read by the server process: a slow disk must not hold
    // an async worker.
    let loaded = tokio::task::spawn_blocking(move || root::load_file(&path))
        .await
        .map_err(|_| Status::internal("root key task failed"))?;
    let new_root = match loaded {
        Ok(key) => key,
        Err(error) => {
            // The error names the file and the problem, never key bytes.
            log("RotateRootKey", identity, "", ROOT_KEY_UNAVAILABLE);
            return Err(root_key_unavailable(format!(
                "the new root key cannot be used, nothing was changed: {error}"
            )));
        }
    };
    let result = vault.rotate_root_key(new_root).await;
    match &result {
        Ok(job) => {
            tracing::info!(rpc = "RotateRootKey", caller = %identity, tenant = "", outcome = "ok", job = %job.id, root_key_version = job.target_version, "root key rotated: only the new root key opens the store from now on")
        }
        Err(error) => log("RotateRootKey", identity, "", error.reason()),
    }
    Ok(Response::new(convert::rotation_job(result?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use tonic_types::StatusExt;

    fn request(layer: &str, tenant: &str, version: u32) -> pb::DestroyKeyVersionRequest {
        pb::DestroyKeyVersionRequest {
            layer: layer.into(),
            tenant_id: tenant.into(),
            version,
        }
    }

    #[test]
    fn destroy_names_a_kek_or_a_tenants_dek_and_a_version() {
        let ok = request("kek", "", 1);
        assert_eq!(destroy_target(&ok).unwrap(), (KeyLayer::Kek, None, 1));
        let ok = request("dek", "acme", 3);
        assert_eq!(
            destroy_target(&ok).unwrap(),
            (KeyLayer::Dek, Some("acme"), 3)
        );
        let cases = [
            (request("root", "", 1), "INVALID_LAYER"),
            (request("KEK", "", 1), "INVALID_LAYER"),
            (request("", "", 1), "INVALID_LAYER"),
            (request("kek", "acme", 1), "INVALID_LAYER"),
            (request("dek", "", 1), "INVALID_ID"),
            (request("dek", "no spaces", 1), "INVALID_ID"),
            (request("kek", "", 0), "INVALID_VERSION"),
            (request("dek", "acme", 0), "INVALID_VERSION"),
        ];
        for (req, reason) in cases {
            let (status, logged) = destroy_target(&req).unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{req:?}");
            assert_eq!(logged, reason, "{req:?}");
            let info = status.get_details_error_info().expect("error info");
            assert_eq!(info.reason, reason, "{req:?}");
        }
    }

    #[test]
    fn an_unusable_root_key_file_is_invalid_argument_with_its_reason() {
        let status = root_key_unavailable("root key file /x has mode 0644".into());
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.get_details_error_info().map(|i| i.reason),
            Some(ROOT_KEY_UNAVAILABLE.to_owned())
        );
        assert!(status.message().contains("0644"));
    }
}
