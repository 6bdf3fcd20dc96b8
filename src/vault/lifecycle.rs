//! Tenant lifecycle: delete (disable at once, crypto-shred after a grace
//! period), restore within the grace period, legal hold, and the shred itself.
//!
//! The shred runs in the background ([`Vault::run_shredder`]) and is
//! resumable: its progress lives in the tenant record. First every DEK of the
//! tenant is destroyed in one batch (from then on nothing of it can be
//! decrypted, from the live store or from a copy made after that moment), then
//! its records are purged in bounded batches (other tenants' calls are never
//! blocked for long), and last the tenant record gives way to a deletion
//! receipt, with a `TenantShredded` event, in one batch.

use prost::Message;

use crate::error::{Error, Invalid, Result};
use crate::store::records::{
    self, DekRecord, DeletionReceipt as ReceiptRecord, EventKind, JobRecord, KeyState,
    TenantRecord, TenantState, WrappedKey,
};
use crate::store::{Batch, StoreError, layout};

use super::{Caller, MAX_ATTEMPTS, Vault, events, validate};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Grace period of a deletion when none is given.
pub const DEFAULT_GRACE_MS: u64 = 7 * DAY_MS;
/// The longest grace period: deleted accounts are gone within 30 days.
pub const MAX_GRACE_MS: u64 = 30 * DAY_MS;

/// What remains of a shredded tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletionReceipt {
    pub requested_at_ms: u64,
    pub requested_by: String,
    pub keys_destroyed_at_ms: u64,
    pub shredded_at_ms: u64,
    pub destroyed_dek_versions: Vec<u32>,
    pub purged_credentials: u64,
    pub purged_versions: u64,
}

/// A tenant's lifecycle state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStatus {
    pub tenant: String,
    /// "active", "deleted", "shredding" (keys destroyed, purge under way) or "shredded".
    pub state: &'static str,
    pub deleted_at_ms: Option<u64>,
    pub deleted_by: Option<String>,
    pub shred_after_ms: Option<u64>,
    pub legal_hold: bool,
    pub legal_hold_reason: Option<String>,
    /// Set once shredded.
    pub receipt: Option<DeletionReceipt>,
}

fn status(tenant: &str, record: &TenantRecord) -> TenantStatus {
    let deleted = record.state() == TenantState::Deleted;
    TenantStatus {
        tenant: tenant.to_owned(),
        state: match (deleted, record.keys_destroyed_at_ms != 0) {
            (false, _) => "active",
            (true, false) => "deleted",
            (true, true) => "shredding",
        },
        deleted_at_ms: deleted.then_some(record.deleted_at_ms),
        deleted_by: deleted.then(|| record.deleted_by.clone()),
        shred_after_ms: deleted.then_some(record.shred_after_ms),
        legal_hold: record.legal_hold,
        legal_hold_reason: record.legal_hold.then(|| record.legal_hold_reason.clone()),
        receipt: None,
    }
}

fn shredded(tenant: &str, receipt: ReceiptRecord) -> TenantStatus {
    TenantStatus {
        tenant: tenant.to_owned(),
        state: "shredded",
        deleted_at_ms: Some(receipt.requested_at_ms),
        deleted_by: Some(receipt.requested_by.clone()),
        shred_after_ms: None,
        legal_hold: false,
        legal_hold_reason: None,
        receipt: Some(DeletionReceipt {
            requested_at_ms: receipt.requested_at_ms,
            requested_by: receipt.requested_by,
            keys_destroyed_at_ms: receipt.keys_destroyed_at_ms,
            shredded_at_ms: receipt.shredded_at_ms,
            destroyed_dek_versions: receipt.destroyed_dek_versions,
            purged_credentials: receipt.purged_credentials,
            purged_versions: receipt.purged_versions,
        }),
    }
}

impl Vault {
    /// The tenant record and its bytes; a shredded tenant is
    /// [`Error::TenantShredded`], an unknown one [`Error::NotFound`].
    fn tenant_record(&self, tenant: &str) -> Result<(Vec<u8>, TenantRecord)> {
        validate::tenant_id(tenant)?;
        match self.store.get(&layout::tenant(tenant))? {
            Some(bytes) => {
                let record = records::decode(&bytes)?;
                Ok((bytes, record))
            }
            None if self.store.get(&layout::receipt(tenant))?.is_some() => {
                Err(Error::TenantShredded)
            }
            None => Err(Error::NotFound),
        }
    }

    /// Commits a change to a tenant record (checked against `bytes`), with an
    /// optional event; then forgets the cached ring, so the next call sees it.
    async fn update_tenant(
        &self,
        tenant: &str,
        bytes: Vec<u8>,
        record: &TenantRecord,
        event: Option<EventKind>,
        caller: Option<&Caller>,
    ) -> Result<bool> {
        let mut batch = Batch::default();
        batch
            .check(layout::tenant(tenant), Some(bytes))
            .put(layout::tenant(tenant), record.encode_to_vec());
        self.audit_into(&mut batch, caller, tenant, "", 0);
        // The event last: its sequence is the batch's last counter.
        if let Some(kind) = event {
            events::append(&mut batch, kind, tenant, "", self.clock.now_ms());
        }
        // Held until the cached ring is forgotten, so no Unseal reads it after.
        let _fence = self.fence_for_change(tenant).await;
        match self.store.commit(batch).await {
            Ok(counters) => {
                self.keys.invalidate(tenant);
                if event.is_some() {
                    self.events_committed(counters.last().copied());
                }
                Ok(true)
            }
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a tenant: from the moment this returns, every Seal and Unseal
    /// for it fails with [`Error::TenantDeleted`]; after `grace_ms` (default 7
    /// days, at most 30, 0 = now) it is crypto-shredded unless on legal hold.
    /// Deleting a deleted tenant changes nothing and returns its status.
    pub async fn delete_tenant(
        &self,
        tenant: &str,
        grace_ms: Option<u64>,
        by: &str,
        caller: Option<&Caller>,
    ) -> Result<TenantStatus> {
        let grace = grace_ms.unwrap_or(DEFAULT_GRACE_MS);
        if grace > MAX_GRACE_MS {
            return Err(Invalid::Grace.into());
        }
        validate::text("deleted_by", by, validate::MAX_ACTOR)?;
        for _ in 0..MAX_ATTEMPTS {
            let (bytes, mut record) = self.tenant_record(tenant)?;
            if record.state() == TenantState::Deleted {
                if let Some(caller) = caller {
                    self.audit(caller, tenant, "", 0, "ok").await?;
                }
                return Ok(status(tenant, &record));
            }
            let now = self.clock.now_ms();
            record.state = TenantState::Deleted as i32;
            record.deleted_at_ms = now;
            record.deleted_by = by.to_owned();
            record.shred_after_ms = now.saturating_add(grace);
            if self
                .update_tenant(
                    tenant,
                    bytes,
                    &record,
                    Some(EventKind::TenantDisabled),
                    caller,
                )
                .await?
            {
                tracing::info!(tenant, grace_ms = grace, "tenant deleted");
                return Ok(status(tenant, &record));
            }
        }
        Err(Error::Contention)
    }

    /// Undoes a deletion within its grace period: everything comes back as it
    /// was. Refused once the shred has begun ([`Error::TenantShredded`]) and for
    /// a tenant that is not deleted ([`Error::TenantNotDeleted`]).
    pub async fn restore_tenant(
        &self,
        tenant: &str,
        caller: Option<&Caller>,
    ) -> Result<TenantStatus> {
        for _ in 0..MAX_ATTEMPTS {
            let (bytes, mut record) = self.tenant_record(tenant)?;
            if record.state() != TenantState::Deleted {
                return Err(Error::TenantNotDeleted);
            }
            if record.keys_destroyed_at_ms != 0 {
                return Err(Error::TenantShredded);
            }
            record.state = TenantState::Active as i32;
            record.deleted_at_ms = 0;
            record.deleted_by = String::new();
            record.shred_after_ms = 0;
            if self
                .update_tenant(
                    tenant,
                    bytes,
                    &record,
                    Some(EventKind::TenantRestored),
                    caller,
                )
                .await?
            {
                tracing::info!(tenant, "tenant restored");
                return Ok(status(tenant, &record));
            }
        }
        Err(Error::Contention)
    }

    /// Sets or releases a legal hold: while set, a deleted tenant stays
    /// disabled and is not shredded. Refused once the shred has begun.
    pub async fn set_legal_hold(
        &self,
        tenant: &str,
        hold: bool,
        reason: &str,
        by: &str,
        caller: Option<&Caller>,
    ) -> Result<TenantStatus> {
        validate::text("reason", reason, validate::MAX_REASON)?;
        validate::text("legal_hold_by", by, validate::MAX_ACTOR)?;
        for _ in 0..MAX_ATTEMPTS {
            let (bytes, mut record) = self.tenant_record(tenant)?;
            if record.keys_destroyed_at_ms != 0 {
                return Err(Error::TenantShredded);
            }
            record.legal_hold = hold;
            record.legal_hold_reason = if hold {
                reason.to_owned()
            } else {
                String::new()
            };
            record.legal_hold_by = by.to_owned();
            if self
                .update_tenant(tenant, bytes, &record, None, caller)
                .await?
            {
                tracing::info!(tenant, hold, "legal hold changed");
                return Ok(status(tenant, &record));
            }
        }
        Err(Error::Contention)
    }

    /// A tenant's lifecycle state; for a shredded tenant, its deletion receipt.
    pub fn tenant_status(&self, tenant: &str) -> Result<TenantStatus> {
        match self.tenant_record(tenant) {
            Ok((_, record)) => Ok(status(tenant, &record)),
            Err(Error::TenantShredded) => {
                let bytes = self
                    .store
                    .get(&layout::receipt(tenant))?
                    .ok_or(Error::NotFound)?;
                Ok(shredded(tenant, records::decode(&bytes)?))
            }
            Err(e) => Err(e),
        }
    }

    /// Shreds every deleted tenant whose grace period is over and that is not
    /// on legal hold (and finishes shreds a crash interrupted). Returns the
    /// tenants shredded.
    pub async fn run_shredder(&self) -> Result<Vec<String>> {
        let now = self.clock.now_ms();
        let prefix = layout::tenant_prefix();
        let mut due = Vec::new();
        for (key, bytes) in self.store.scan(&prefix, None, usize::MAX)? {
            let record: TenantRecord = records::decode(&bytes)?;
            if record.state() == TenantState::Deleted
                && !record.legal_hold
                && (record.shred_after_ms <= now || record.keys_destroyed_at_ms != 0)
            {
                due.push(
                    String::from_utf8(key[prefix.len()..].to_vec())
                        .map_err(|_| Error::Corrupt("tenant id is not UTF-8".into()))?,
                );
            }
        }
        let mut shredded = Vec::new();
        for tenant in due {
            if self.shred(&tenant).await? {
                shredded.push(tenant);
            }
        }
        Ok(shredded)
    }

    /// Shreds one tenant; false if it was restored or put on hold since it
    /// was found due.
    async fn shred(&self, tenant: &str) -> Result<bool> {
        if !self.destroy_tenant_keys(tenant).await? {
            return Ok(false);
        }
        self.purge_tenant(tenant).await?;
        // Last: the tenant record gives way to the receipt, with the event.
        for _ in 0..MAX_ATTEMPTS {
            let (bytes, record) = self.tenant_record(tenant)?;
            let now = self.clock.now_ms();
            let receipt = ReceiptRecord {
                requested_at_ms: record.deleted_at_ms,
                requested_by: record.deleted_by.clone(),
                keys_destroyed_at_ms: record.keys_destroyed_at_ms,
                shredded_at_ms: now,
                destroyed_dek_versions: record.destroyed_dek_versions.clone(),
                purged_credentials: record.purged_credentials,
                purged_versions: record.purged_versions,
            };
            let mut batch = Batch::default();
            batch
                .check(layout::tenant(tenant), Some(bytes))
                .delete(layout::tenant(tenant))
                .put(layout::receipt(tenant), receipt.encode_to_vec());
            events::append(&mut batch, EventKind::TenantShredded, tenant, "", now);
            match self.store.commit(batch).await {
                Ok(counters) => {
                    self.keys.invalidate(tenant);
                    self.events_committed(counters.last().copied());
                    tracing::info!(
                        tenant,
                        credentials = receipt.purged_credentials,
                        versions = receipt.purged_versions,
                        "tenant shredded"
                    );
                    return Ok(true);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// Step 1 of a shred: every DEK of the tenant destroyed, in one batch with
    /// the tenant record's progress mark (a no-op once done). The batch checks
    /// the tenant record it decided on, so a restore or a legal hold committed
    /// meanwhile wins: then nothing is destroyed and this returns false.
    async fn destroy_tenant_keys(&self, tenant: &str) -> Result<bool> {
        for _ in 0..MAX_ATTEMPTS {
            let (bytes, mut record) = self.tenant_record(tenant)?;
            if record.keys_destroyed_at_ms != 0 {
                return Ok(true);
            }
            let now = self.clock.now_ms();
            if record.state() != TenantState::Deleted
                || record.legal_hold
                || record.shred_after_ms > now
            {
                return Ok(false);
            }
            let mut batch = Batch::default();
            batch.check(layout::tenant(tenant), Some(bytes));
            record.destroyed_dek_versions.clear();
            for (key, dek_bytes) in
                self.store
                    .scan(&layout::dek_prefix(tenant), None, usize::MAX)?
            {
                let mut dek: DekRecord = records::decode(&dek_bytes)?;
                record.destroyed_dek_versions.push(dek.version);
                if dek.state() == KeyState::Destroyed {
                    continue;
                }
                batch.sub(layout::kek_refs(dek.kek_version), 1);
                dek.destroy(now);
                batch
                    .check(key.clone(), Some(dek_bytes))
                    .put(key, dek.encode_to_vec());
            }
            record.keys_destroyed_at_ms = now;
            batch.put(layout::tenant(tenant), record.encode_to_vec());
            match self.store.commit(batch).await {
                Ok(_) => {
                    self.keys.invalidate(tenant);
                    tracing::info!(tenant, versions = ?record.destroyed_dek_versions, "tenant data keys destroyed");
                    return Ok(true);
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// Step 2 of a shred: the tenant's records deleted in bounded batches
    /// (`rotation.batch_size`, paced by `rotation.batch_pause_ms`), each with the
    /// tenant record's running counts.
    async fn purge_tenant(&self, tenant: &str) -> Result<()> {
        let size = self.options.rotation.batch_size.max(1);
        let prefixes = [
            layout::head_prefix(tenant),
            layout::tenant_versions_prefix(tenant),
            layout::dek_prefix(tenant),
            layout::dek_counter_prefix(tenant),
            layout::dek_refs_prefix(tenant),
        ];
        let mut attempts = 0;
        for (i, prefix) in prefixes.iter().enumerate() {
            loop {
                let rows = self.store.scan(prefix, None, size)?;
                if rows.is_empty() {
                    break;
                }
                let (bytes, mut record) = self.tenant_record(tenant)?;
                let mut batch = Batch::default();
                for (key, value) in rows {
                    match i {
                        0 => record.purged_credentials += 1,
                        1 => record.purged_versions += 1,
                        _ => {}
                    }
                    batch.check(key.clone(), Some(value)).delete(key);
                }
                batch
                    .check(layout::tenant(tenant), Some(bytes))
                    .put(layout::tenant(tenant), record.encode_to_vec());
                match self.store.commit(batch).await {
                    // Paced like rotation jobs, so that a large tenant's purge
                    // leaves the store to the other tenants' calls.
                    Ok(_) => self.pause_between_batches().await,
                    Err(StoreError::Conflict) if attempts < MAX_ATTEMPTS => attempts += 1,
                    Err(StoreError::Conflict) => return Err(Error::Contention),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        // The tenant's rotation jobs (they hold no secrets, only progress).
        let mut batch = Batch::default();
        for (key, bytes) in self.store.scan(&layout::job_prefix(), None, usize::MAX)? {
            let job: JobRecord = records::decode(&bytes)?;
            if job.tenant == tenant {
                batch.check(key.clone(), Some(bytes)).delete(key);
            }
        }
        if !batch.ops.is_empty() {
            self.store.commit(batch).await?;
        }
        Ok(())
    }
}
