//! The usage ledger: for every key version, what it still protects.
//!
//! Two persistent reference counts sit beside the encryption counts:
//!
//! - `r\0k\0{kek}`: the DEK records KEK `kek` wraps (those not destroyed);
//! - `r\0d\0{tenant}\0{dek}`: the stored credential versions whose live
//!   ciphertext DEK `dek` sealed (a revoked version holds no ciphertext, a
//!   pruned one is gone).
//!
//! They are never recomputed by scanning: each operation that makes or drops a
//! reference moves the count in the same atomic batch as the record change
//! ([`Batch::add`] / [`Batch::sub`]), and that batch names the exact record
//! bytes it replaces, so a count cannot drift from the records under
//! concurrency. Every key version gets its count (0) when it is created, so
//! "nothing depends on it" is one exact value a later batch can check.
//!
//! A store written before the ledger existed has no counts; [`ensure`] counts
//! them once, when the vault opens, and marks the store (`m\0ledger`).
//!
//! This module also reads the ledger back: [`Vault::key_status`].

use std::collections::BTreeMap;

use crate::error::{Error, Invalid, Result};
use crate::store::records::{self, DekRecord, KekRecord, KeyState, RootCheck, VersionRecord};
use crate::store::{Batch, Store, layout};

use super::{Vault, validate};

/// The root key, as [`Vault::key_status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootKeyStatus {
    pub version: u32,
    /// When this root key was put in place (ms since the Unix epoch). Its age
    /// is what the backup erasure schedule follows: a backup stays readable for
    /// as long as the root key it was made under exists.
    pub created_at_ms: u64,
    /// KEK versions it wraps (those not destroyed).
    pub wrapped_keks: u64,
}

/// Default and largest number of DEK rows in a page of [`Vault::key_status_page`].
pub const DEFAULT_KEY_STATUS_PAGE: usize = 1000;
pub const MAX_KEY_STATUS_PAGE: usize = 10_000;

/// A page of the usage ledger and the token of the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatusPage {
    /// The root key and the KEKs: on the first page only.
    pub head: Option<(RootKeyStatus, Vec<KekStatus>)>,
    pub deks: Vec<DekStatus>,
    pub next_page_token: Option<String>,
}

/// One KEK version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KekStatus {
    pub version: u32,
    pub state: KeyState,
    pub created_at_ms: u64,
    /// When it stopped being the primary.
    pub retired_at_ms: Option<u64>,
    /// When its key bytes were destroyed.
    pub destroyed_at_ms: Option<u64>,
    /// DEK wraps it has made, ever.
    pub encryptions: u64,
    /// DEK records it wraps now.
    pub wrapped_deks: u64,
}

/// One DEK version of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DekStatus {
    pub tenant: String,
    pub version: u32,
    /// The KEK version that wraps it.
    pub kek_version: u32,
    pub state: KeyState,
    pub created_at_ms: u64,
    /// When it stopped being the primary.
    pub retired_at_ms: Option<u64>,
    /// When its key bytes were destroyed.
    pub destroyed_at_ms: Option<u64>,
    /// Payloads it has sealed, ever.
    pub encryptions: u64,
    /// Stored credential versions whose live ciphertext it sealed.
    pub protected_versions: u64,
}

/// Every key version with its state, age, encryption count and what it still
/// protects: see [`Vault::key_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyStatus {
    pub root: RootKeyStatus,
    /// By version.
    pub keks: Vec<KekStatus>,
    /// By tenant id, then version.
    pub deks: Vec<DekStatus>,
}

impl Vault {
    /// The usage ledger: the root key, every KEK version, and every DEK version
    /// of `tenant` (or of every tenant when `None`). An unknown tenant is
    /// [`Error::NotFound`].
    ///
    /// Reads the records and counts as they are, not as one snapshot: a change
    /// committed meanwhile may show in some rows and not others. A decision that
    /// depends on a count (destroying a version) must check it in its own batch.
    pub fn key_status(&self, tenant: Option<&str>) -> Result<KeyStatus> {
        let store = &*self.store;
        let (root, keks) = self.root_and_keks()?;
        let (deks, _) = self.dek_rows(store, tenant, None, usize::MAX)?;
        Ok(KeyStatus { root, keks, deks })
    }

    /// One page of [`Vault::key_status`], for callers with a message size
    /// limit: the root key and KEK rows on the first page (no token), then up
    /// to `page_size` DEK rows (0: the default, at most
    /// [`MAX_KEY_STATUS_PAGE`]) by tenant and version, after `page_token`
    /// (`{tenant}/{version}` of the last row of the page before).
    pub fn key_status_page(
        &self,
        tenant: Option<&str>,
        page_size: usize,
        page_token: Option<&str>,
    ) -> Result<KeyStatusPage> {
        let after = page_token
            .map(|token| {
                let (t, v) = token.split_once('/').ok_or(Invalid::PageToken)?;
                validate::tenant_id(t).map_err(|_| Invalid::PageToken)?;
                let v: u32 = v.parse().map_err(|_| Invalid::PageToken)?;
                match tenant {
                    Some(tenant) if tenant != t => Err(Invalid::PageToken),
                    _ => Ok((t.to_owned(), v)),
                }
            })
            .transpose()?;
        let page_size = match page_size {
            0 => DEFAULT_KEY_STATUS_PAGE,
            n => n.min(MAX_KEY_STATUS_PAGE),
        };
        let head = match after {
            None => Some(self.root_and_keks()?),
            Some(_) => None,
        };
        let (deks, more) = self.dek_rows(&*self.store, tenant, after.as_ref(), page_size)?;
        let next_page_token = match deks.last() {
            Some(last) if more => Some(format!("{}/{}", last.tenant, last.version)),
            _ => None,
        };
        Ok(KeyStatusPage {
            head,
            deks,
            next_page_token,
        })
    }

    /// Up to `limit` DEK rows of `tenant` (else of every tenant) after
    /// `after`, and whether there are more.
    fn dek_rows(
        &self,
        store: &dyn Store,
        tenant: Option<&str>,
        after: Option<&(String, u32)>,
        limit: usize,
    ) -> Result<(Vec<DekStatus>, bool)> {
        let prefix = match tenant {
            Some(tenant) => {
                validate::tenant_id(tenant)?;
                if store.get(&layout::tenant(tenant))?.is_none() {
                    return Err(Error::NotFound);
                }
                layout::dek_prefix(tenant)
            }
            None => layout::dek_table_prefix(),
        };
        let cursor = after.map(|(t, v)| layout::dek(t, *v));
        let rows = store.scan(&prefix, cursor.as_deref(), limit.saturating_add(1))?;
        let more = rows.len() > limit;
        let mut deks = Vec::with_capacity(rows.len().min(limit));
        for (key, bytes) in rows.into_iter().take(limit) {
            let record: DekRecord = records::decode(&bytes)?;
            let version = versioned(&key, record.version, "data key")?;
            let tenant = key
                .get(2..key.len().saturating_sub(5))
                .and_then(|t| std::str::from_utf8(t).ok())
                .ok_or_else(|| Error::Corrupt("a data key record without its tenant".into()))?
                .to_owned();
            deks.push(DekStatus {
                encryptions: counter(store, &layout::dek_counter(&tenant, version))?,
                protected_versions: counter(store, &layout::dek_refs(&tenant, version))?,
                tenant,
                version,
                kek_version: record.kek_version,
                state: record.state(),
                created_at_ms: record.created_at_ms,
                retired_at_ms: nonzero(record.retired_at_ms),
                destroyed_at_ms: nonzero(record.destroyed_at_ms),
            });
        }
        Ok((deks, more))
    }

    /// The root key and every KEK version, from their records and counters.
    pub(super) fn root_and_keks(&self) -> Result<(RootKeyStatus, Vec<KekStatus>)> {
        let store = &*self.store;
        let check: RootCheck = records::decode(
            &store
                .get(layout::ROOT_CHECK)?
                .ok_or_else(|| Error::Corrupt("the root check value is missing".into()))?,
        )?;
        let mut keks = Vec::new();
        for (key, bytes) in store.scan(&layout::kek_prefix(), None, usize::MAX)? {
            let record: KekRecord = records::decode(&bytes)?;
            let version = versioned(&key, record.version, "KEK")?;
            keks.push(KekStatus {
                version,
                state: record.state(),
                created_at_ms: record.created_at_ms,
                retired_at_ms: nonzero(record.retired_at_ms),
                destroyed_at_ms: nonzero(record.destroyed_at_ms),
                encryptions: counter(store, &layout::kek_counter(version))?,
                wrapped_deks: counter(store, &layout::kek_refs(version))?,
            });
        }
        let root = RootKeyStatus {
            version: check.root_version,
            created_at_ms: check.created_at_ms,
            wrapped_keks: keks
                .iter()
                .filter(|k| k.state != KeyState::Destroyed)
                .count() as u64,
        };
        Ok((root, keks))
    }
}

/// Counts the ledger of a store written before it existed, once: every
/// reference count from the records, in one batch with the `m\0ledger` mark.
/// Runs when the vault opens, before it takes any write.
pub(crate) async fn ensure(store: &dyn Store) -> Result<()> {
    if store.get(layout::LEDGER)?.is_some() {
        return Ok(());
    }
    let mut kek_refs: BTreeMap<u32, u64> = BTreeMap::new();
    for (key, bytes) in store.scan(&layout::kek_prefix(), None, usize::MAX)? {
        let record: KekRecord = records::decode(&bytes)?;
        kek_refs.insert(versioned(&key, record.version, "KEK")?, 0);
    }
    let mut batch = Batch::default();
    batch.check(layout::LEDGER.to_vec(), None);
    for (key, _) in store.scan(&layout::refs_prefix(), None, usize::MAX)? {
        batch.delete(key);
    }
    let tenants = tenant_ids(store)?;
    for tenant in &tenants {
        let mut dek_refs: BTreeMap<u32, u64> = BTreeMap::new();
        for (key, bytes) in store.scan(&layout::dek_prefix(tenant), None, usize::MAX)? {
            let record: DekRecord = records::decode(&bytes)?;
            dek_refs.insert(versioned(&key, record.version, "data key")?, 0);
            if record.state() != KeyState::Destroyed {
                *kek_refs.entry(record.kek_version).or_default() += 1;
            }
        }
        for (_, bytes) in store.scan(&layout::tenant_versions_prefix(tenant), None, usize::MAX)? {
            let record: VersionRecord = records::decode(&bytes)?;
            if protects(&record) {
                *dek_refs.entry(record.dek_version).or_default() += 1;
            }
        }
        for (version, n) in dek_refs {
            batch.put(layout::dek_refs(tenant, version), layout::encode_counter(n));
        }
    }
    for (version, n) in kek_refs {
        batch.put(layout::kek_refs(version), layout::encode_counter(n));
    }
    batch.put(
        layout::LEDGER.to_vec(),
        layout::encode_counter(layout::LEDGER_VERSION),
    );
    store.commit(batch).await?;
    tracing::info!(
        tenants = tenants.len(),
        "counted the usage ledger of a store written before it existed"
    );
    Ok(())
}

/// Whether a version record holds a ciphertext, and so depends on its DEK.
pub(crate) fn protects(record: &VersionRecord) -> bool {
    record.state() == records::VersionState::Live
}

/// Every tenant id, in order.
fn tenant_ids(store: &dyn Store) -> Result<Vec<String>> {
    let prefix = layout::tenant_prefix();
    store
        .scan(&prefix, None, usize::MAX)?
        .into_iter()
        .map(|(key, _)| {
            String::from_utf8(key[prefix.len()..].to_vec())
                .map_err(|_| Error::Corrupt("tenant id is not UTF-8".into()))
        })
        .collect()
}

/// The version a key record is stored under, which its own field must repeat.
fn versioned(key: &[u8], claimed: u32, what: &str) -> Result<u32> {
    layout::trailing_version(key)
        .filter(|v| *v == claimed)
        .ok_or_else(|| Error::Corrupt(format!("{what} record under the wrong key")))
}

fn nonzero(ms: u64) -> Option<u64> {
    (ms != 0).then_some(ms)
}

/// A counter's value (absent or malformed: 0).
pub(crate) fn counter(store: &dyn Store, key: &[u8]) -> Result<u64> {
    Ok(store
        .get(key)?
        .and_then(|b| layout::decode_counter(&b))
        .unwrap_or(0))
}
