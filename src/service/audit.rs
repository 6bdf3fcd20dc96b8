//! Every RPC decision in the audit log: denials (recorded by
//! [`Shared::authorise`] itself), failures, and successes. Seal, Revoke and
//! the tenant lifecycle calls record their success in the same batch as
//! their change, and Unseal before it returns the secret (the vault's `*_as`
//! methods); every other call records its outcome here. A read whose record cannot be written fails
//! (fail closed); a change that already happened is returned as it is, with
//! the failure logged.

use tonic::{Request, Status};

use super::{Shared, pb};
use crate::authz::Rpc;
use crate::error::{Error, reason_of};
use crate::vault;

/// What a request names, for its audit record (a denial's too).
pub(crate) trait AuditTarget {
    fn credential(&self) -> &str {
        ""
    }
    fn version(&self) -> u32 {
        0
    }
    fn purpose(&self) -> &str {
        ""
    }
}

/// What becomes of a successful call whose audit record cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unrecorded {
    /// A read: it fails (AUDIT_UNAVAILABLE) and returns nothing.
    Refuse,
    /// A change already made durable, or the server's status (which holds no
    /// tenant data, and is what an operator reads to learn that the audit log
    /// is down): returned as it is; the lost record is logged at error level.
    Answer,
}

macro_rules! no_credential {
    ($($t:ty),* $(,)?) => { $(impl AuditTarget for $t {})* };
}

no_credential!(
    pb::ListCredentialsRequest,
    pb::WatchRevocationsRequest,
    pb::DeleteTenantRequest,
    pb::RestoreTenantRequest,
    pb::SetLegalHoldRequest,
    pb::GetTenantStatusRequest,
    pb::RotateKekRequest,
    pb::RotateTenantKeyRequest,
    pb::RotateRootKeyRequest,
    pb::GetKeyStatusRequest,
    pb::DestroyKeyVersionRequest,
    pb::GetRotationJobRequest,
    pb::QueryAuditRequest,
    pb::VerifyAuditRequest,
    pb::BackupRequest,
    pb::GetServerStatusRequest,
);

impl AuditTarget for pb::SealRequest {
    fn credential(&self) -> &str {
        &self.credential_id
    }
}

impl AuditTarget for pb::UnsealRequest {
    fn credential(&self) -> &str {
        &self.credential_id
    }
    fn version(&self) -> u32 {
        self.version.unwrap_or(0)
    }
    fn purpose(&self) -> &str {
        &self.purpose
    }
}

impl AuditTarget for pb::GetMetadataRequest {
    fn credential(&self) -> &str {
        &self.credential_id
    }
    fn version(&self) -> u32 {
        self.version.unwrap_or(0)
    }
}

impl AuditTarget for pb::RevokeRequest {
    fn credential(&self) -> &str {
        &self.credential_id
    }
}

/// Where a successful call's audit record goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Success {
    /// Already written: in the batch of the change (Seal, Revoke, lifecycle),
    /// or for an Unseal before its secret was returned.
    AlreadyRecorded,
    /// To be written after the call (reads).
    ToRecord,
}

/// The audit identity of a caller for one RPC, with the request's purpose.
pub(crate) fn who<T: AuditTarget>(identity: &str, rpc: Rpc, req: &Request<T>) -> vault::Caller {
    vault::Caller::new(identity, rpc.name()).with_purpose(req.get_ref().purpose())
}

impl Shared {
    /// Records a denial (`identity` is "" when no certificate identity could be read).
    pub(crate) async fn audit_denial<T: AuditTarget>(
        &self,
        req: &Request<T>,
        identity: &str,
        rpc: Rpc,
        tenant: Option<&str>,
        reason: &str,
    ) {
        let who = who(identity, rpc, req);
        let r = req.get_ref();
        if let Err(error) = self
            .vault
            .audit(
                &who,
                tenant.unwrap_or(""),
                r.credential(),
                r.version(),
                reason,
            )
            .await
        {
            tracing::error!(%error, rpc = rpc.name(), "the denial's audit record was not written");
        }
    }

    /// Records a call's outcome, unless it succeeded and its success was
    /// already recorded in the batch of its change. A success whose record
    /// cannot be written here becomes [`Error::AuditUnavailable`]: nothing is
    /// returned unaudited; a failure is returned as it is, the lost record logged.
    pub(crate) async fn audited<T>(
        &self,
        who: &vault::Caller,
        tenant: &str,
        credential: &str,
        version: u32,
        result: Result<T, Error>,
        success: Success,
    ) -> Result<T, Error> {
        let outcome = match &result {
            Ok(_) if success == Success::AlreadyRecorded => return result,
            // Its record could not be written: neither can this one.
            Err(Error::AuditUnavailable) => return result,
            Ok(_) => "ok",
            Err(error) => error.reason(),
        };
        match (
            self.vault
                .audit(who, tenant, credential, version, outcome)
                .await,
            result,
        ) {
            (Err(error), Ok(_)) => Err(error),
            (Err(audit), result) => {
                tracing::error!(error = %audit, rpc = %who.rpc, "a failure's audit record was not written");
                result
            }
            (Ok(()), result) => result,
        }
    }

    /// Records the outcome of a call that ends in a gRPC result: its reason
    /// when it failed. A success that cannot be recorded fails with
    /// AUDIT_UNAVAILABLE or is returned as it is, as `unrecorded` says.
    pub(crate) async fn audit_status<T>(
        &self,
        who: &vault::Caller,
        tenant: &str,
        result: Result<T, Status>,
        unrecorded: Unrecorded,
    ) -> Result<T, Status> {
        let outcome = match &result {
            Ok(_) => "ok".to_owned(),
            Err(status) => {
                reason_of(status).unwrap_or_else(|| format!("{:?}", status.code()).to_uppercase())
            }
        };
        match self.vault.audit(who, tenant, "", 0, &outcome).await {
            Err(error) if result.is_ok() && unrecorded == Unrecorded::Refuse => Err(error.into()),
            Err(error) => {
                tracing::error!(%error, rpc = %who.rpc, "audit record not written");
                result
            }
            Ok(()) => result,
        }
    }
}
