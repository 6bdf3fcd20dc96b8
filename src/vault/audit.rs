//! The vault's side of the audit log: who is calling, and the records written
//! in the same atomic batch as the change they record (seal, revoke, tenant
//! lifecycle) or, for an Unseal, durably (through the audit journal) before
//! the secret is returned, under the tenant's fence so that an Unseal racing
//! a Revoke either recorded before it committed or fails. If the record cannot
//! be written, the call fails ([`Error::AuditUnavailable`]): fail closed.

use crate::audit::{AuditLog, NewRecord};
use crate::error::{Error, Result};
use crate::store::Batch;

use super::Vault;

/// Who is calling, for the audit log: the certificate identity, the RPC and
/// the caller's stated purpose.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    pub identity: String,
    pub rpc: String,
    pub purpose: String,
}

impl Caller {
    pub fn new(identity: impl Into<String>, rpc: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            rpc: rpc.into(),
            purpose: String::new(),
        }
    }

    pub fn with_purpose(mut self, purpose: impl Into<String>) -> Self {
        self.purpose = purpose.into();
        self
    }

    pub(crate) fn record(
        &self,
        tenant: &str,
        credential: &str,
        version: u32,
        outcome: &str,
    ) -> NewRecord {
        NewRecord {
            caller: self.identity.clone(),
            rpc: self.rpc.clone(),
            tenant: tenant.to_owned(),
            credential: credential.to_owned(),
            version,
            purpose: self.purpose.clone(),
            outcome: outcome.to_owned(),
        }
    }
}

impl Vault {
    /// The audit log (`None` when records are switched off: a bench-only setting).
    pub fn audit_log(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
    }

    /// Records an outcome on its own, durably (reads, denials, failures).
    pub async fn audit(
        &self,
        caller: &Caller,
        tenant: &str,
        credential: &str,
        version: u32,
        outcome: &str,
    ) -> Result<()> {
        let Some(log) = &self.audit else {
            return Ok(());
        };
        log.record(caller.record(tenant, credential, version, outcome))
            .await
            .map(|_| ())
            .map_err(|error| {
                tracing::error!(%error, "audit record not written");
                Error::AuditUnavailable
            })
    }

    /// Adds the "ok" record of a change to the batch that makes it.
    pub(crate) fn audit_into(
        &self,
        batch: &mut Batch,
        caller: Option<&Caller>,
        tenant: &str,
        credential: &str,
        version: u32,
    ) {
        if let (Some(log), Some(caller)) = (&self.audit, caller) {
            log.append(batch, caller.record(tenant, credential, version, "ok"));
        }
    }
}
