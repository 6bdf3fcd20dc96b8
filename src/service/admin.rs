//! The `Admin` service: `GetKeyStatus` today; the rest is implemented by the
//! rotation (issue 4) and audit (issue 5) work. Every call is authorised first,
//! so the policy matrix holds today: non-admins get PERMISSION_DENIED, admins
//! UNIMPLEMENTED for what is not built yet.

use tonic::{Request, Response, Status};

use super::{Shared, convert, pb};
use crate::authz::Rpc;
use crate::error::{Error, status_with_reason};

pub(crate) struct AdminService(pub Shared);

impl AdminService {
    fn refuse<T>(&self, req: &Request<T>, rpc: Rpc, tenant: Option<&str>) -> Status {
        match self.0.authorise(req, rpc, tenant) {
            Ok(_) => Status::unimplemented(format!("{} is not implemented yet", rpc.name())),
            Err(status) => status,
        }
    }
}

fn tenant(t: &str) -> Option<&str> {
    (!t.is_empty()).then_some(t)
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn rotate_kek(
        &self,
        req: Request<pb::RotateKekRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        Err(self.refuse(&req, Rpc::RotateKek, None))
    }

    async fn rotate_tenant_key(
        &self,
        req: Request<pb::RotateTenantKeyRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        Err(self.refuse(&req, Rpc::RotateTenantKey, tenant(&req.get_ref().tenant_id)))
    }

    async fn rotate_root_key(
        &self,
        req: Request<pb::RotateRootKeyRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        Err(self.refuse(&req, Rpc::RotateRootKey, None))
    }

    async fn get_key_status(
        &self,
        req: Request<pb::GetKeyStatusRequest>,
    ) -> Result<Response<pb::KeyStatus>, Status> {
        let wanted = tenant(&req.get_ref().tenant_id).map(str::to_owned);
        let caller = self
            .0
            .authorise(&req, Rpc::GetKeyStatus, wanted.as_deref())?;
        // Reads every key record (and, for the whole vault, every tenant's):
        // off the async workers.
        let vault = self.0.vault.clone();
        let query = wanted.clone();
        let result = tokio::task::spawn_blocking(move || vault.key_status(query.as_deref()))
            .await
            .map_err(|_| Status::internal("key status task failed"))?;
        let tenant = wanted.as_deref().unwrap_or("");
        match &result {
            Ok(_) => {
                tracing::info!(rpc = "GetKeyStatus", caller = %caller.identity, tenant, outcome = "ok")
            }
            Err(error) => {
                tracing::info!(rpc = "GetKeyStatus", caller = %caller.identity, tenant, outcome = error.reason())
            }
        }
        match result {
            Ok(status) => Ok(Response::new(convert::key_status(status))),
            // The library's NotFound speaks of credentials; here it is the tenant.
            Err(Error::NotFound) => Err(status_with_reason(
                tonic::Code::NotFound,
                format!("no tenant {tenant:?} in this vault"),
                "NOT_FOUND",
            )),
            Err(error) => Err(error.into()),
        }
    }

    async fn destroy_key_version(
        &self,
        req: Request<pb::DestroyKeyVersionRequest>,
    ) -> Result<Response<pb::DestroyKeyVersionResponse>, Status> {
        Err(self.refuse(
            &req,
            Rpc::DestroyKeyVersion,
            tenant(&req.get_ref().tenant_id),
        ))
    }

    async fn get_rotation_job(
        &self,
        req: Request<pb::GetRotationJobRequest>,
    ) -> Result<Response<pb::RotationJob>, Status> {
        Err(self.refuse(&req, Rpc::GetRotationJob, None))
    }

    async fn query_audit(
        &self,
        req: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        Err(self.refuse(&req, Rpc::QueryAudit, tenant(&req.get_ref().tenant_id)))
    }

    async fn verify_audit(
        &self,
        req: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        Err(self.refuse(&req, Rpc::VerifyAudit, None))
    }

    async fn backup(
        &self,
        req: Request<pb::BackupRequest>,
    ) -> Result<Response<pb::BackupResponse>, Status> {
        Err(self.refuse(&req, Rpc::Backup, None))
    }
}
