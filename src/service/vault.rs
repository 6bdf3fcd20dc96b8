//! The `Vault` service: thin handlers over [`crate::vault::Vault`].

use std::pin::Pin;

use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{self, kind_filter, kind_from_pb};
use super::{Shared, pb};
use crate::authz::Rpc;
use crate::error::Error;
use crate::vault::{SealRequest, Secret, validate};

/// Most characters of an Unseal's stated purpose.
const MAX_PURPOSE: usize = 256;

pub(crate) struct VaultService(pub Shared);

fn unimplemented(rpc: Rpc) -> Status {
    Status::unimplemented(format!("{} is not implemented yet", rpc.name()))
}

#[tonic::async_trait]
impl pb::vault_server::Vault for VaultService {
    async fn seal(
        &self,
        req: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::Seal, Some(&req.get_ref().tenant_id))?;
        let r = req.into_inner();
        let request = SealRequest {
            kind: kind_from_pb(r.kind)?,
            secret: Secret::new(r.secret),
            labels: r.labels.into_iter().collect(),
            expires_at_ms: r.expires_at_ms,
            expected_version: r.expected_version,
            tenant: r.tenant_id,
            credential: r.credential_id,
        };
        let (tenant, credential) = (request.tenant.clone(), request.credential.clone());
        let result = self.0.vault.seal(request).await;
        log("Seal", &caller.identity, &tenant, &credential, &result);
        Ok(Response::new(pb::SealResponse {
            metadata: Some(convert::metadata(result?)),
        }))
    }

    async fn unseal(
        &self,
        req: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::Unseal, Some(&req.get_ref().tenant_id))?;
        let r = req.into_inner();
        validate::text("purpose", &r.purpose, MAX_PURPOSE).map_err(Error::from)?;
        let result = self
            .0
            .vault
            .unseal(&r.tenant_id, &r.credential_id, r.version)
            .await;
        log(
            "Unseal",
            &caller.identity,
            &r.tenant_id,
            &r.credential_id,
            &result,
        );
        let unsealed = result?;
        Ok(Response::new(pb::UnsealResponse {
            secret: unsealed.secret.expose().to_vec(),
            metadata: Some(convert::metadata(unsealed.metadata)),
        }))
    }

    async fn get_metadata(
        &self,
        req: Request<pb::GetMetadataRequest>,
    ) -> Result<Response<pb::GetMetadataResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::GetMetadata, Some(&req.get_ref().tenant_id))?;
        let r = req.into_inner();
        let result = self
            .0
            .vault
            .metadata(&r.tenant_id, &r.credential_id, r.version);
        log(
            "GetMetadata",
            &caller.identity,
            &r.tenant_id,
            &r.credential_id,
            &result,
        );
        Ok(Response::new(pb::GetMetadataResponse {
            metadata: Some(convert::metadata(result?)),
        }))
    }

    async fn list_credentials(
        &self,
        req: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let caller =
            self.0
                .authorise(&req, Rpc::ListCredentials, Some(&req.get_ref().tenant_id))?;
        let r = req.into_inner();
        let token = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let result = kind_filter(r.kind).and_then(|kind| {
            self.0
                .vault
                .list(&r.tenant_id, kind, r.page_size as usize, token)
        });
        log(
            "ListCredentials",
            &caller.identity,
            &r.tenant_id,
            "",
            &result,
        );
        let page = result?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: page
                .credentials
                .into_iter()
                .map(convert::metadata)
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::Revoke, Some(&req.get_ref().tenant_id))?;
        let r = req.into_inner();
        let result = self
            .0
            .vault
            .revoke(&r.tenant_id, &r.credential_id, &caller.identity, &r.reason)
            .await;
        log(
            "Revoke",
            &caller.identity,
            &r.tenant_id,
            &r.credential_id,
            &result,
        );
        Ok(Response::new(pb::RevokeResponse {
            revocation: Some(convert::revocation(result?)),
        }))
    }

    type WatchRevocationsStream =
        Pin<Box<dyn Stream<Item = Result<pb::RevocationEvent, Status>> + Send>>;

    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let tenant = req.get_ref().tenant_id.clone();
        self.0.authorise(
            &req,
            Rpc::WatchRevocations,
            (!tenant.is_empty()).then_some(tenant.as_str()),
        )?;
        Err(unimplemented(Rpc::WatchRevocations))
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        self.0
            .authorise(&req, Rpc::DeleteTenant, Some(&req.get_ref().tenant_id))?;
        Err(unimplemented(Rpc::DeleteTenant))
    }

    async fn restore_tenant(
        &self,
        req: Request<pb::RestoreTenantRequest>,
    ) -> Result<Response<pb::RestoreTenantResponse>, Status> {
        self.0
            .authorise(&req, Rpc::RestoreTenant, Some(&req.get_ref().tenant_id))?;
        Err(unimplemented(Rpc::RestoreTenant))
    }

    async fn set_legal_hold(
        &self,
        req: Request<pb::SetLegalHoldRequest>,
    ) -> Result<Response<pb::SetLegalHoldResponse>, Status> {
        self.0
            .authorise(&req, Rpc::SetLegalHold, Some(&req.get_ref().tenant_id))?;
        Err(unimplemented(Rpc::SetLegalHold))
    }
}

/// One log line per call: who, what, which credential, and the outcome (the
/// error's reason code). Never secret bytes.
fn log<T>(rpc: &str, caller: &str, tenant: &str, credential: &str, result: &Result<T, Error>) {
    match result {
        Ok(_) => tracing::info!(rpc, caller, tenant, credential, outcome = "ok"),
        Err(error) => tracing::info!(rpc, caller, tenant, credential, outcome = error.reason()),
    }
}
