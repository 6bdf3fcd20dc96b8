//! The vault operations: seal, unseal, metadata, list, revoke.
//!
//! Each operation validates its input, picks keys from the [`keyring`], seals or
//! opens with the [`envelope`](crate::crypto::envelope), and writes through one
//! atomic, durable store batch, which also moves the usage counts of the
//! [`ledger`]. A write that races another is retried against fresh state (every
//! batch names the exact bytes it replaces).

mod audit;
pub mod backup;
mod events;
mod keyring;
mod ledger;
mod lifecycle;
mod rotation;
mod status;
pub mod validate;

pub use crate::store::records::JobKind;
pub use audit::Caller;
pub use events::{Event, EventPage};
pub use ledger::{
    DEFAULT_KEY_STATUS_PAGE, DekStatus, KekStatus, KeyStatus, KeyStatusPage, MAX_KEY_STATUS_PAGE,
    RootKeyStatus,
};
pub use lifecycle::{DeletionReceipt, TenantStatus};
pub use rotation::{JobState, KeyLayer, RotationJob, RotationOptions};
pub use status::VaultStatus;

use std::collections::BTreeMap;
use std::sync::Arc;

use prost::Message;
use zeroize::{Zeroize, Zeroizing};

use crate::clock::Clock;
use crate::crypto::SymmetricKey;
use crate::crypto::envelope::{self, Context};
use crate::error::{Error, Invalid, Result};
use crate::store::records::{
    self, CredentialHead, EventKind, KeyState, TenantState, Tombstone, VersionRecord, VersionState,
};
use crate::store::{Batch, Store, StoreError, layout};

/// The kind of a stored credential. The numbers are part of the at-rest format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    CookieJar = 1,
    ApiKey = 2,
    OauthToken = 3,
    Generic = 4,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::CookieJar,
        Kind::ApiKey,
        Kind::OauthToken,
        Kind::Generic,
    ];

    pub fn from_number(n: u32) -> Result<Self, Invalid> {
        Self::ALL
            .into_iter()
            .find(|k| *k as u32 == n)
            .ok_or(Invalid::Kind)
    }
}

/// Secret bytes: wiped on drop, never shown by `Debug`.
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The secret bytes. Every use is a greppable call.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl From<Zeroizing<Vec<u8>>> for Secret {
    fn from(mut bytes: Zeroizing<Vec<u8>>) -> Self {
        // Moved out, not copied: what is left to `bytes` is an empty vector.
        Self(std::mem::take(&mut *bytes))
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        // Wiped as a slice: `Vec<u8>`'s own `zeroize` (what `Zeroizing` calls)
        // writes one volatile byte at a time, which was a tenth of an unseal
        // of 2 KiB; the slice's is a bulk fill behind an optimisation barrier.
        self.0.as_mut_slice().zeroize();
        self.0.spare_capacity_mut().zeroize();
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Who revoked a credential, when and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    pub revoked_at_ms: u64,
    pub revoked_by: String,
    pub reason: String,
}

impl From<Tombstone> for Revocation {
    fn from(t: Tombstone) -> Self {
        Self {
            revoked_at_ms: t.revoked_at_ms,
            revoked_by: t.revoked_by,
            reason: t.reason,
        }
    }
}

/// What the vault says about a credential version. Never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub tenant: String,
    pub credential: String,
    pub version: u32,
    /// The credential's latest version (equal to `version` unless an older one was asked for).
    pub latest_version: u32,
    pub kind: Kind,
    pub labels: BTreeMap<String, String>,
    pub created_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// Size of the secret in bytes.
    pub size: u64,
    pub dek_version: u32,
    /// `Some` once the credential is revoked.
    pub revocation: Option<Revocation>,
}

/// A request to seal a new version of a credential.
#[derive(Debug)]
pub struct SealRequest {
    pub tenant: String,
    pub credential: String,
    pub kind: Kind,
    pub secret: Secret,
    pub labels: BTreeMap<String, String>,
    pub expires_at_ms: Option<u64>,
    /// Compare-and-set: the version the caller believes is current (0 = must not exist).
    pub expected_version: Option<u32>,
}

/// An unsealed secret with its metadata.
#[derive(Debug)]
pub struct Unsealed {
    pub secret: Secret,
    pub metadata: Metadata,
}

/// One page of [`Vault::list`].
#[derive(Debug)]
pub struct Page {
    pub credentials: Vec<Metadata>,
    /// Pass back to get the next page; `None` on the last page.
    pub next_page_token: Option<String>,
}

/// Limits and thresholds of a vault.
#[derive(Debug, Clone)]
pub struct VaultOptions {
    /// Largest secret accepted, in bytes.
    pub max_secret_bytes: usize,
    /// Versions kept per credential; older ones are deleted by the seal that
    /// goes past the limit (0 = keep all).
    pub max_versions: u32,
    /// Encryptions after which a DEK or KEK version is replaced by a new primary
    /// (NIST SP 800-38D allows 2^32 random nonces per key).
    pub rotate_after_encryptions: u64,
    /// Rotation schedules and job pacing.
    pub rotation: RotationOptions,
    /// Whether audit records are written. Off only in benchmarks (to measure
    /// what they cost); a server always writes them.
    pub audit: bool,
    /// Under load, the least time between the audit journal's taking of two
    /// groups ([`crate::audit::journal::LINGER`]).
    pub audit_linger: std::time::Duration,
}

impl Default for VaultOptions {
    fn default() -> Self {
        Self {
            max_secret_bytes: 1 << 20,
            max_versions: 10,
            rotate_after_encryptions: 1 << 30,
            rotation: RotationOptions::default(),
            audit: true,
            audit_linger: crate::audit::journal::LINGER,
        }
    }
}

/// How often an operation that keeps conflicting with concurrent writers is retried.
const MAX_ATTEMPTS: usize = 64;
/// Largest page of [`Vault::list`].
pub const MAX_PAGE_SIZE: usize = 1000;
pub const DEFAULT_PAGE_SIZE: usize = 100;

/// The sealed store: the key hierarchy over a durable store.
pub struct Vault {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    keys: keyring::KeyRing,
    options: VaultOptions,
    jobs_started: tokio::sync::Notify,
    /// The sequence number of the newest event (watchers wait on changes).
    events: tokio::sync::watch::Sender<u64>,
    audit: Option<crate::audit::AuditLog>,
    /// Orders audited Unseals against the changes that end them (see
    /// [`Vault::fence`]).
    fences: Box<[tokio::sync::RwLock<()>]>,
}

/// Fences per vault: tenants share one by hash.
const FENCES: usize = 64;

impl Vault {
    /// A vault with the default options over a new sled store in `dir`, under
    /// a new root key: for the crate's own tests.
    #[cfg(test)]
    pub(crate) async fn open_for_test(dir: &std::path::Path) -> Self {
        let store = crate::store::SledStore::open(&crate::store::StoreOptions::new(dir)).unwrap();
        let clock = Arc::new(crate::clock::SystemClock);
        let options = VaultOptions::default();
        let root = SymmetricKey::generate();
        Self::open(Arc::new(store), root, clock, options)
            .await
            .unwrap()
    }

    /// Opens the vault over `store` with `root`. On a new store this writes the
    /// root key's check value and the first KEK; on an existing one a wrong root
    /// key is [`Error::WrongRootKey`].
    pub async fn open(
        store: Arc<dyn Store>,
        root: SymmetricKey,
        clock: Arc<dyn Clock>,
        options: VaultOptions,
    ) -> Result<Self> {
        let keys = keyring::KeyRing::open(
            store.clone(),
            clock.clone(),
            root,
            options.rotate_after_encryptions,
        )
        .await?;
        ledger::ensure(&*store).await?;
        let last_event = events::last_sequence(&*store)?;
        let audit = match options.audit {
            true => Some(
                crate::audit::AuditLog::open(
                    store.clone(),
                    clock.clone(),
                    keys.audit_key(),
                    options.audit_linger,
                )
                .await
                .map_err(|error| {
                    tracing::error!(%error, "the audit journal could not be opened");
                    Error::AuditUnavailable
                })?,
            ),
            false => None,
        };
        Ok(Self {
            store,
            clock,
            keys,
            options,
            jobs_started: tokio::sync::Notify::new(),
            events: tokio::sync::watch::Sender::new(last_event),
            audit,
            fences: (0..FENCES).map(|_| tokio::sync::RwLock::new(())).collect(),
        })
    }

    pub fn options(&self) -> &VaultOptions {
        &self.options
    }

    /// Seals a new version of a credential and returns its metadata once durable.
    pub async fn seal(&self, req: SealRequest) -> Result<Metadata> {
        self.seal_as(req, None).await
    }

    /// [`Vault::seal`], with the audit record of `caller` in the same batch.
    pub async fn seal_as(&self, req: SealRequest, caller: Option<&Caller>) -> Result<Metadata> {
        validate::tenant_id(&req.tenant)?;
        validate::credential_id(&req.credential)?;
        validate::secret_size(req.secret.len(), self.options.max_secret_bytes)?;
        validate::labels(&req.labels)?;
        let now = self.clock.now_ms();
        if req.expires_at_ms.is_some_and(|at| at <= now) {
            return Err(Invalid::Expiry.into());
        }
        let (tenant, credential) = (req.tenant.as_str(), req.credential.as_str());
        let head_key = layout::head(tenant, credential);
        let latest_key = layout::latest(tenant, credential);
        for _ in 0..MAX_ATTEMPTS {
            // Compare-and-set before anything is written, so that a failed seal
            // does not create the tenant and its first data key either. The
            // batch below re-checks the head, so a change in between conflicts.
            let head_bytes = self.store.get(&head_key)?;
            let head = head_bytes
                .as_deref()
                .map(records::decode::<CredentialHead>)
                .transpose()?;
            let current = head.as_ref().map_or(0, |h| h.latest_version);
            if let Some(expected) = req.expected_version
                && expected != current
            {
                return Err(Error::VersionMismatch {
                    expected,
                    actual: current,
                });
            }
            let keys = self.keys.tenant_or_create(tenant).await?;
            if keys.state != TenantState::Active {
                return Err(Error::TenantDeleted);
            }
            let (dek, dek_bytes) = keys.primary()?;
            let version = current
                .checked_add(1)
                .filter(|v| *v != layout::LATEST)
                .ok_or(Invalid::Version)?;
            // The latest version so far moves to its numbered place; the new
            // one takes the latest slot. (A store written before the slot keeps
            // its latest under its number and has no slot yet.) A credential
            // without a head has no slot either.
            let previous = if head.is_some() {
                self.store.get(&latest_key)?
            } else {
                None
            };
            let previous = match previous {
                Some(bytes) => {
                    let record: VersionRecord = records::decode(&bytes)?;
                    if record.version != current {
                        // A seal that landed between the two reads; if the
                        // head has not moved, the store disagrees with itself.
                        if self.store.get(&head_key)? == head_bytes {
                            return Err(Error::Corrupt(
                                "the latest version record does not match the credential head"
                                    .into(),
                            ));
                        }
                        continue;
                    }
                    Some((bytes, record))
                }
                None => None,
            };
            let context =
                Context::payload(tenant, credential, version, req.kind as u8, dek.version());
            let record = VersionRecord {
                version,
                kind: req.kind as u32,
                labels: req.labels.clone(),
                created_at_ms: now,
                expires_at_ms: req.expires_at_ms.unwrap_or(0),
                dek_version: dek.version(),
                state: VersionState::Live as i32,
                ciphertext: envelope::seal(dek.key(), dek.version(), &context, req.secret.expose()),
                size: req.secret.len() as u64,
                tombstone: None,
            };
            let new_head = CredentialHead {
                latest_version: version,
                created_at_ms: head.as_ref().map_or(now, |h| h.created_at_ms),
                updated_at_ms: now,
            };
            // The DEK's use count is the batch's first counter (for rotation);
            // the new live version is one more record the DEK protects.
            let mut batch = Batch::default();
            batch
                .add(layout::dek_counter(tenant, dek.version()), 1)
                .add(layout::dek_refs(tenant, dek.version()), 1)
                .check(layout::dek(tenant, dek.version()), Some(dek_bytes.to_vec()))
                .check(layout::tenant(tenant), Some(keys.tenant_bytes.clone()))
                .put(head_key.clone(), new_head.encode_to_vec())
                .put(latest_key.clone(), record.encode_to_vec())
                .check(head_key.clone(), head_bytes);
            // A revocation or a re-encryption rewrites the slot and not the
            // head, so a slot being replaced is checked too. (Only a seal
            // creates a slot, and a seal moves the head.)
            if let Some((bytes, _)) = &previous {
                batch.check(latest_key.clone(), Some(bytes.clone()));
            }
            self.retire_versions(&mut batch, tenant, credential, version, previous)?;
            self.audit_into(&mut batch, caller, tenant, credential, version);
            match self.store.commit(batch).await {
                Ok(counters) => {
                    // The seal is durable: a failed rotation must not turn it into an
                    // error (a retry would store a duplicate). The next seal retries.
                    if counters[0] >= self.keys.rotate_after()
                        && let Err(error) = self
                            .keys
                            .rotate_dek(tenant, dek.version(), &|_, _| {})
                            .await
                    {
                        tracing::warn!(tenant, %error, "automatic data key rotation failed; will retry");
                    }
                    return metadata(tenant, credential, version, record);
                }
                Err(StoreError::Conflict) => self.keys.invalidate(tenant),
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// Adds the move of the `previous` latest version (bytes and record) to
    /// its numbered place, and deletions of versions that fall out of the
    /// `max_versions` window, each releasing its DEK's reference if it was live.
    fn retire_versions(
        &self,
        batch: &mut Batch,
        tenant: &str,
        credential: &str,
        newest: u32,
        previous: Option<(Vec<u8>, VersionRecord)>,
    ) -> Result<()> {
        let keep = self.options.max_versions;
        let oldest_kept = match keep {
            0 => 0,
            keep => newest.saturating_sub(keep - 1),
        };
        if let Some((bytes, record)) = previous {
            if record.version >= oldest_kept {
                batch.put(layout::version(tenant, credential, record.version), bytes);
            } else if ledger::protects(&record) {
                batch.sub(layout::dek_refs(tenant, record.dek_version), 1);
            }
        }
        if keep == 0 || newest <= keep {
            return Ok(());
        }
        for (key, bytes) in self
            .store
            .scan(&layout::version_prefix(tenant, credential), None, 8)?
        {
            if layout::trailing_version(&key).is_some_and(|v| v < oldest_kept) {
                let record: VersionRecord = records::decode(&bytes)?;
                if ledger::protects(&record) {
                    batch.sub(layout::dek_refs(tenant, record.dek_version), 1);
                }
                batch.check(key.clone(), Some(bytes)).delete(key);
            }
        }
        Ok(())
    }

    /// Unseals a credential: the latest version, or `version` if given.
    pub async fn unseal(
        &self,
        tenant: &str,
        credential: &str,
        version: Option<u32>,
    ) -> Result<Unsealed> {
        self.unseal_as(tenant, credential, version, None).await
    }

    /// [`Vault::unseal`] for `caller`: its audit record is durable before the
    /// secret is returned. The read and the record happen under the tenant's
    /// fence (shared), which a Revoke or a tenant change takes exclusively
    /// around its commit: an Unseal therefore either read before the change
    /// and recorded before it committed, or reads after it and is refused.
    /// If the record cannot be written, the call fails
    /// ([`Error::AuditUnavailable`]).
    pub async fn unseal_as(
        &self,
        tenant: &str,
        credential: &str,
        version: Option<u32>,
        caller: Option<&Caller>,
    ) -> Result<Unsealed> {
        let Some(caller) = caller.filter(|_| self.audit.is_some()) else {
            return self.open_version(tenant, credential, version);
        };
        let _fence = self.fence(tenant).read().await;
        let unsealed = self.open_version(tenant, credential, version)?;
        self.audit(caller, tenant, credential, unsealed.metadata.version, "ok")
            .await?;
        Ok(unsealed)
    }

    /// The fence of `tenant`'s calls: shared by audited Unseals from their read
    /// until their record is durable, taken exclusively by a change that makes
    /// later Unseals fail (Revoke, tenant deletion), from before it reads until
    /// it has committed. So no Unseal that read before such a change returns
    /// after it, and none that returns after it read before it.
    pub(crate) fn fence(&self, tenant: &str) -> &tokio::sync::RwLock<()> {
        // FNV-1a: stable and cheap; the spread only needs to be even.
        let hash = tenant.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        &self.fences[(hash % FENCES as u64) as usize]
    }

    /// Takes `tenant`'s fence exclusively for a change that ends Unseals, once
    /// the records of the Unseals before it are in the log (so the log shows
    /// them before the change). A journal that failed does not hold the
    /// change up: it is made anyway, and the failure is logged.
    pub(crate) async fn fence_for_change(
        &self,
        tenant: &str,
    ) -> tokio::sync::RwLockWriteGuard<'_, ()> {
        let fence = self.fence(tenant).write().await;
        if let Some(log) = &self.audit
            && let Err(error) = log.settled().await
        {
            tracing::error!(%error, tenant, "audit records of earlier calls may be missing from the log");
        }
        fence
    }

    /// Reads and opens a version.
    fn open_version(
        &self,
        tenant: &str,
        credential: &str,
        version: Option<u32>,
    ) -> Result<Unsealed> {
        validate::tenant_id(tenant)?;
        let Some(keys) = self.keys.tenant(tenant)? else {
            return Err(if self.store.get(&layout::receipt(tenant))?.is_some() {
                Error::TenantDeleted
            } else {
                Error::NotFound
            });
        };
        if keys.state != TenantState::Active {
            return Err(Error::TenantDeleted);
        }
        let Stored {
            version,
            latest,
            mut record,
        } = self.version_row(tenant, credential, version)?;
        if record.state() == VersionState::Revoked {
            return Err(Error::Revoked);
        }
        if record.expires_at_ms != 0 && self.clock.now_ms() >= record.expires_at_ms {
            return Err(Error::Expired);
        }
        let dek = keys
            .get(record.dek_version)
            .ok_or(Error::DecryptionFailed)?;
        let kind = Kind::from_number(record.kind).map_err(|_| Error::DecryptionFailed)?;
        // Bound to the version the record is stored under (in the latest slot:
        // the one it claims), so a record moved to another numbered version's
        // place fails to open like any other tampering.
        let context = Context::payload(tenant, credential, version, kind as u8, record.dek_version);
        let secret =
            envelope::open_owned(dek.key(), &context, std::mem::take(&mut record.ciphertext))?;
        Ok(Unsealed {
            secret: secret.into(),
            metadata: metadata(tenant, credential, latest, record)?,
        })
    }

    /// Metadata of the latest version, or of `version` if given. Never the secret.
    pub fn metadata(
        &self,
        tenant: &str,
        credential: &str,
        version: Option<u32>,
    ) -> Result<Metadata> {
        let (version, latest, record) = self.version_record(tenant, credential, version)?;
        if record.version != version {
            return Err(Error::Corrupt("version record under the wrong key".into()));
        }
        metadata(tenant, credential, latest, record)
    }

    fn head(&self, tenant: &str, credential: &str) -> Result<Option<CredentialHead>> {
        let bytes = self.store.get(&layout::head(tenant, credential))?;
        Ok(bytes.as_deref().map(records::decode).transpose()?)
    }

    /// The version asked for (default: the latest), the latest version, and the
    /// record stored under the first. The record's own `version` field is not
    /// trusted: callers compare it.
    fn version_record(
        &self,
        tenant: &str,
        credential: &str,
        version: Option<u32>,
    ) -> Result<(u32, u32, VersionRecord)> {
        validate::tenant_id(tenant)?;
        let stored = self.version_row(tenant, credential, version)?;
        Ok((stored.version, stored.latest, stored.record))
    }

    /// The version asked for (default: the latest), read with point reads: the
    /// latest slot first (its record names the latest version), then, for an
    /// older version, its numbered record. The slot is read first so that a
    /// seal that moves it on in between cannot hide the version asked for.
    fn version_row(&self, tenant: &str, credential: &str, version: Option<u32>) -> Result<Stored> {
        // The tenant id is the caller's to validate (it reads the tenant first).
        validate::credential_id(credential)?;
        if matches!(version, Some(0 | layout::LATEST)) {
            return Err(Invalid::Version.into());
        }
        let latest_key = layout::latest(tenant, credential);
        let Some(bytes) = self.store.get(&latest_key)? else {
            return self.version_row_unslotted(tenant, credential, version);
        };
        let record: VersionRecord = records::decode(&bytes)?;
        let latest = layout::stored_version(&latest_key, record.version)
            .ok_or_else(|| Error::Corrupt("malformed latest version record".into()))?;
        match version.unwrap_or(latest) {
            v if v == latest => Ok(Stored {
                version: latest,
                latest,
                record,
            }),
            v if v > latest => Err(Error::NotFound),
            v => self.numbered(tenant, credential, v, latest),
        }
    }

    /// [`Vault::version_row`] for a credential without a latest slot: unknown,
    /// or last sealed by a version that stored every version under its number.
    fn version_row_unslotted(
        &self,
        tenant: &str,
        credential: &str,
        version: Option<u32>,
    ) -> Result<Stored> {
        let Some(version) = version else {
            // The latest version is the last record under the credential's
            // version prefix (the latest is never pruned). That is the slot
            // if a first seal landed since the slot was read.
            let (key, bytes) = self
                .store
                .last(&layout::version_prefix(tenant, credential))?
                .ok_or(Error::NotFound)?;
            let record: VersionRecord = records::decode(&bytes)?;
            let latest = layout::stored_version(&key, record.version)
                .ok_or_else(|| Error::Corrupt("malformed version key".into()))?;
            return Ok(Stored {
                version: latest,
                latest,
                record,
            });
        };
        let head = self.head(tenant, credential)?.ok_or(Error::NotFound)?;
        self.numbered(tenant, credential, version, head.latest_version)
    }

    /// Version `version` read from its numbered key; `latest` is the
    /// credential's latest version as the caller read it.
    fn numbered(
        &self,
        tenant: &str,
        credential: &str,
        version: u32,
        latest: u32,
    ) -> Result<Stored> {
        let key = layout::version(tenant, credential, version);
        let bytes = self.store.get(&key)?.ok_or(Error::NotFound)?;
        let record = records::decode(&bytes)?;
        Ok(Stored {
            version,
            latest,
            record,
        })
    }

    /// A page of a tenant's credentials (latest version metadata), in id order,
    /// optionally only of one kind. `page_size` 0 means the default.
    pub fn list(
        &self,
        tenant: &str,
        kind: Option<Kind>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<Page> {
        validate::tenant_id(tenant)?;
        if let Some(token) = page_token {
            validate::credential_id(token).map_err(|_| Invalid::PageToken)?;
        }
        let page_size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let prefix = layout::head_prefix(tenant);
        let mut cursor = page_token.map(|t| layout::head(tenant, t));
        let mut credentials = Vec::new();
        loop {
            let rows = self.store.scan(&prefix, cursor.as_deref(), page_size + 1)?;
            let exhausted = rows.len() <= page_size;
            for (key, _) in rows {
                if credentials.len() == page_size {
                    let last: &Metadata = credentials.last().expect("page is full");
                    return Ok(Page {
                        next_page_token: Some(last.credential.clone()),
                        credentials,
                    });
                }
                let credential = std::str::from_utf8(&key[prefix.len()..])
                    .map_err(|_| Error::Corrupt("credential id is not UTF-8".into()))?
                    .to_owned();
                cursor = Some(key);
                // The latest version, read as Unseal reads it.
                let stored = match self.version_row(tenant, &credential, None) {
                    Ok(stored) => stored,
                    Err(Error::NotFound) => continue,
                    Err(e) => return Err(e),
                };
                let meta = metadata(tenant, &credential, stored.latest, stored.record)?;
                if kind.is_none_or(|k| k == meta.kind) {
                    credentials.push(meta);
                }
            }
            if exhausted {
                return Ok(Page {
                    credentials,
                    next_page_token: None,
                });
            }
        }
    }

    /// Revokes every version of a credential: their ciphertexts are destroyed
    /// (and their DEKs' references released) and a tombstone kept, durably,
    /// before this returns. Idempotent: revoking a
    /// revoked credential returns the original tombstone and changes nothing.
    pub async fn revoke(
        &self,
        tenant: &str,
        credential: &str,
        by: &str,
        reason: &str,
    ) -> Result<Revocation> {
        self.revoke_as(tenant, credential, by, reason, None).await
    }

    /// [`Vault::revoke`], with the audit record of `caller` in the same batch
    /// (or on its own when the credential was already revoked).
    pub async fn revoke_as(
        &self,
        tenant: &str,
        credential: &str,
        by: &str,
        reason: &str,
        caller: Option<&Caller>,
    ) -> Result<Revocation> {
        validate::tenant_id(tenant)?;
        validate::credential_id(credential)?;
        validate::text("reason", reason, validate::MAX_REASON)?;
        validate::text("revoked_by", by, validate::MAX_ACTOR)?;
        let head_key = layout::head(tenant, credential);
        let _fence = self.fence_for_change(tenant).await;
        for _ in 0..MAX_ATTEMPTS {
            let head_bytes = self.store.get(&head_key)?.ok_or(Error::NotFound)?;
            let head: CredentialHead = records::decode(&head_bytes)?;
            let tombstone = Tombstone {
                revoked_at_ms: self.clock.now_ms(),
                revoked_by: by.to_owned(),
                reason: reason.to_owned(),
            };
            let mut batch = Batch::default();
            batch.check(head_key.clone(), Some(head_bytes));
            let mut latest_tombstone = None;
            for (key, bytes) in self.store.scan(
                &layout::version_prefix(tenant, credential),
                None,
                usize::MAX,
            )? {
                let mut record: VersionRecord = records::decode(&bytes)?;
                if record.version == head.latest_version {
                    latest_tombstone = record.tombstone.clone();
                }
                if record.state() == VersionState::Revoked {
                    continue;
                }
                if ledger::protects(&record) {
                    batch.sub(layout::dek_refs(tenant, record.dek_version), 1);
                }
                record.state = VersionState::Revoked as i32;
                record.ciphertext = Vec::new();
                record.tombstone = Some(tombstone.clone());
                batch
                    .check(key.clone(), Some(bytes))
                    .put(key, record.encode_to_vec());
            }
            if batch.ops.is_empty() {
                let revocation = latest_tombstone
                    .map(Revocation::from)
                    .ok_or(Error::NotFound)?;
                if let Some(caller) = caller {
                    self.audit(caller, tenant, credential, 0, "ok").await?;
                }
                return Ok(revocation);
            }
            self.audit_into(&mut batch, caller, tenant, credential, 0);
            events::append(
                &mut batch,
                EventKind::CredentialRevoked,
                tenant,
                credential,
                tombstone.revoked_at_ms,
            );
            match self.store.commit(batch).await {
                Ok(counters) => {
                    self.events_committed(counters.last().copied());
                    return Ok(tombstone.into());
                }
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// The root key's version (1 until the root key is rotated).
    pub fn root_version(&self) -> u32 {
        self.keys.root_version()
    }

    /// KEK versions and their states.
    pub fn kek_states(&self) -> BTreeMap<u32, KeyState> {
        self.keys.kek_states()
    }

    /// A tenant's DEK versions and their states (empty for an unknown tenant).
    pub fn dek_states(&self, tenant: &str) -> Result<BTreeMap<u32, KeyState>> {
        validate::tenant_id(tenant)?;
        Ok(self
            .keys
            .tenant(tenant)?
            .map(|keys| keys.deks.iter().map(|(v, l)| (*v, l.state)).collect())
            .unwrap_or_default())
    }

    /// The persistent encryption count of a KEK version.
    pub fn kek_uses(&self, version: u32) -> Result<u64> {
        self.counter(&layout::kek_counter(version))
    }

    /// The persistent encryption count of a tenant's DEK version.
    pub fn dek_uses(&self, tenant: &str, version: u32) -> Result<u64> {
        validate::tenant_id(tenant)?;
        self.counter(&layout::dek_counter(tenant, version))
    }

    fn counter(&self, key: &[u8]) -> Result<u64> {
        ledger::counter(&*self.store, key)
    }
}

/// A stored credential version as read: the version it is stored as, the
/// credential's latest version, and the record decoded.
struct Stored {
    version: u32,
    latest: u32,
    record: VersionRecord,
}

fn metadata(
    tenant: &str,
    credential: &str,
    latest_version: u32,
    record: VersionRecord,
) -> Result<Metadata> {
    Ok(Metadata {
        tenant: tenant.to_owned(),
        credential: credential.to_owned(),
        version: record.version,
        latest_version,
        kind: Kind::from_number(record.kind)
            .map_err(|_| Error::Corrupt("unknown kind in record".into()))?,
        created_at_ms: record.created_at_ms,
        expires_at_ms: (record.expires_at_ms != 0).then_some(record.expires_at_ms),
        size: record.size,
        dek_version: record.dek_version,
        revocation: record.tombstone.map(Revocation::from),
        labels: record.labels,
    })
}
