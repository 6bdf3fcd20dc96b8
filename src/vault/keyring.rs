//! The key rings: the root key check, the KEK ring, and per-tenant DEK rings.
//!
//! Wrapped keys live in the store; unwrapped ones live here, in memory only,
//! wiped on drop. The primary version of a ring is its highest `Active`
//! version. Every change to a ring is a conditional batch: it names the exact
//! record bytes it replaces, so a concurrent rotation makes it conflict and be
//! retried against fresh state instead of silently overwriting.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use prost::Message;
use zeroize::Zeroizing;

use crate::clock::Clock;
use crate::crypto::envelope::{self, Context, ROOT_CHECK_PLAINTEXT};
use crate::crypto::keys::{Dek, KEY_LEN, Kek, RootKey, SymmetricKey};
use crate::error::{Error, Result};
use crate::store::records::{
    self, DekRecord, KekRecord, KeyState, RootCheck, TenantRecord, TenantState,
};
use crate::store::{Batch, Store, StoreError, layout};

/// A key version as loaded: its record (exactly as stored) and, unless
/// destroyed, its unwrapped key.
pub(crate) struct Loaded<K> {
    pub key: Option<Arc<K>>,
    pub record_bytes: Vec<u8>,
    pub state: KeyState,
}

impl<K> Loaded<K> {
    fn usable(&self) -> Option<&Arc<K>> {
        self.key
            .as_ref()
            .filter(|_| self.state != KeyState::Destroyed)
    }
}

/// Highest `Active` version of a ring.
fn primary<K>(ring: &BTreeMap<u32, Loaded<K>>) -> Option<(u32, &Loaded<K>)> {
    ring.iter()
        .rev()
        .find(|(_, l)| l.state == KeyState::Active)
        .map(|(v, l)| (*v, l))
}

/// The DEK ring of one tenant.
pub(crate) struct TenantKeys {
    pub deks: BTreeMap<u32, Loaded<Dek>>,
    /// The tenant record exactly as stored when the ring was loaded (a write
    /// that depends on the tenant being active checks it), and its state.
    pub tenant_bytes: Vec<u8>,
    pub state: TenantState,
    /// The cache generation when the ring was read (see [`KeyRing::invalidate`]).
    generation: u64,
}

impl TenantKeys {
    /// The primary DEK and its record bytes (for the seal's precondition).
    pub fn primary(&self) -> Result<(&Arc<Dek>, &[u8])> {
        let (version, loaded) = primary(&self.deks)
            .ok_or_else(|| Error::Corrupt("tenant has no active data key".into()))?;
        let key = loaded.usable().ok_or_else(|| {
            Error::Corrupt(format!("active data key v{version} has no key bytes"))
        })?;
        Ok((key, &loaded.record_bytes))
    }

    /// The DEK of `version`, if it exists and is not destroyed.
    pub fn get(&self, version: u32) -> Option<&Arc<Dek>> {
        self.deks.get(&version).and_then(Loaded::usable)
    }
}

/// The root key in use, with its check record exactly as stored (a batch that
/// wraps under it checks that record, so it conflicts with a root rotation).
struct Root {
    key: Arc<RootKey>,
    check_bytes: Vec<u8>,
    /// The next root key while its rotation commits: from just before the
    /// commit until it is installed as `key`, the store may hold KEKs wrapped
    /// under either, and a KEK reload picks by the version the wrap names.
    pending: Option<Arc<RootKey>>,
}

impl Root {
    /// The root key of `version`: the installed one or the one being installed.
    fn by_version(&self, version: u32) -> Option<&Arc<RootKey>> {
        std::iter::once(&self.key)
            .chain(&self.pending)
            .find(|key| key.version() == version)
    }
}

/// Extra changes a rotation commits in its own batch (a job record), given the
/// new primary version.
pub(crate) type AlongWith<'a> = &'a (dyn Fn(&mut Batch, u32) + Sync);

/// All unwrapped keys, and the logic that creates and rotates them.
pub(crate) struct KeyRing {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    root: RwLock<Root>,
    keks: RwLock<BTreeMap<u32, Loaded<Kek>>>,
    tenants: RwLock<HashMap<String, Arc<TenantKeys>>>,
    /// Held for the whole of a root rotation, so that at most one new root key
    /// is pending at a time.
    root_rotation: tokio::sync::Mutex<()>,
    /// Moves on every invalidation; a ring read before a move is not cached.
    generation: AtomicU64,
    /// The audit log's HMAC key (random, sealed by the root key in the store).
    audit_key: SymmetricKey,
    rotate_after: u64,
}

impl KeyRing {
    /// Checks the root key against the store (initialising a new store), then
    /// loads and unwraps the KEK ring.
    pub async fn open(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        root: SymmetricKey,
        rotate_after: u64,
    ) -> Result<Self> {
        if store.get(layout::ROOT_CHECK)?.is_none() {
            Self::initialise(&*store, &*clock, &root).await?;
        }
        let check_bytes = store
            .get(layout::ROOT_CHECK)?
            .ok_or_else(|| Error::Corrupt("the root check value is missing".into()))?;
        let check: RootCheck = records::decode(&check_bytes)?;
        if !opens_check(&root, &check) {
            return Err(if opens_retired(&*store, &root)? {
                Error::RetiredRootKey {
                    current: check.root_version,
                }
            } else {
                Error::WrongRootKey
            });
        }
        let root = RootKey::new(check.root_version, root);
        let audit_key = load_audit_key(&*store, &root, &check_bytes).await?;
        let root = Root {
            key: Arc::new(root),
            check_bytes,
            pending: None,
        };
        let keks = load_keks(&*store, &root, &BTreeMap::new())?;
        if primary(&keks).is_none() {
            return Err(Error::Corrupt("no active key-encryption key".into()));
        }
        Ok(Self {
            store,
            clock,
            root: RwLock::new(root),
            keks: RwLock::new(keks),
            tenants: RwLock::default(),
            root_rotation: tokio::sync::Mutex::new(()),
            generation: AtomicU64::new(0),
            audit_key,
            rotate_after: rotate_after.max(1),
        })
    }

    /// A new store: writes the root check value, KEK v1 and the ledger mark in one batch.
    async fn initialise(store: &dyn Store, clock: &dyn Clock, root: &SymmetricKey) -> Result<()> {
        if !store.scan(&layout::kek_prefix(), None, 1)?.is_empty() {
            return Err(Error::Corrupt(
                "key-encryption keys exist but the root check value is missing".into(),
            ));
        }
        let now = clock.now_ms();
        let root_version = 1;
        let check = RootCheck {
            root_version,
            check: envelope::seal(
                root,
                root_version,
                &Context::root_check(),
                ROOT_CHECK_PLAINTEXT,
            ),
            created_at_ms: now,
        };
        let kek = SymmetricKey::generate();
        let record = KekRecord {
            version: 1,
            state: KeyState::Active as i32,
            created_at_ms: now,
            wrapped: envelope::seal(
                root,
                root_version,
                &Context::kek_wrap(1),
                kek.expose_bytes(),
            ),
            ..Default::default()
        };
        let mut batch = Batch::default();
        batch
            .check(layout::ROOT_CHECK.to_vec(), None)
            .put(layout::ROOT_CHECK.to_vec(), check.encode_to_vec())
            .put(layout::kek(1), record.encode_to_vec())
            .put(layout::kek_refs(1), layout::encode_counter(0))
            .put(
                layout::LEDGER.to_vec(),
                layout::encode_counter(layout::LEDGER_VERSION),
            );
        store.commit(batch).await?;
        tracing::info!("initialised a new store: root check value and KEK v1 written");
        Ok(())
    }

    /// The audit log's HMAC key.
    pub fn audit_key(&self) -> &SymmetricKey {
        &self.audit_key
    }

    /// The root key's version.
    pub fn root_version(&self) -> u32 {
        self.root.read().expect("root lock").key.version()
    }

    pub(super) fn root(&self) -> (Arc<RootKey>, Vec<u8>) {
        let root = self.root.read().expect("root lock");
        (root.key.clone(), root.check_bytes.clone())
    }

    /// The primary KEK with its record bytes.
    pub fn primary_kek(&self) -> Result<(Arc<Kek>, Vec<u8>)> {
        let keks = self.keks.read().expect("kek lock");
        let (_, loaded) = primary(&keks).ok_or_else(|| Error::Corrupt("no active KEK".into()))?;
        let kek = loaded
            .usable()
            .ok_or_else(|| Error::Corrupt("active KEK has no key bytes".into()))?;
        Ok((kek.clone(), loaded.record_bytes.clone()))
    }

    /// KEK states by version (for status and tests).
    pub fn kek_states(&self) -> BTreeMap<u32, KeyState> {
        self.keks
            .read()
            .expect("kek lock")
            .iter()
            .map(|(v, l)| (*v, l.state))
            .collect()
    }

    /// The tenant's DEK ring, or `None` if the tenant has never sealed anything.
    pub fn tenant(&self, tenant: &str) -> Result<Option<Arc<TenantKeys>>> {
        if let Some(keys) = self.tenants.read().expect("tenant lock").get(tenant) {
            return Ok(Some(keys.clone()));
        }
        if self.store.get(&layout::tenant(tenant))?.is_none() {
            return Ok(None);
        }
        let keys = Arc::new(self.load_tenant(tenant)?);
        self.cache(tenant, keys.clone());
        Ok(Some(keys))
    }

    /// Caches a ring read at cache generation `keys.generation`, unless
    /// a change invalidated some ring since: the ring may predate that change
    /// (a rotation committed between our read and now), so it is used for this
    /// call only and the next one reads the store again.
    fn cache(&self, tenant: &str, keys: Arc<TenantKeys>) {
        let mut tenants = self.tenants.write().expect("tenant lock");
        if keys.generation == self.generation.load(Ordering::SeqCst) {
            tenants.insert(tenant.to_owned(), keys);
        }
    }

    /// The tenant's DEK ring, creating the tenant and its first DEK if needed.
    pub async fn tenant_or_create(&self, tenant: &str) -> Result<Arc<TenantKeys>> {
        loop {
            if let Some(keys) = self.tenant(tenant)? {
                return Ok(keys);
            }
            // A shredded tenant's id stays retired (its receipt stays).
            if self.store.get(&layout::receipt(tenant))?.is_some() {
                return Err(Error::TenantDeleted);
            }
            let now = self.clock.now_ms();
            let mut batch = Batch::default();
            batch.check(layout::tenant(tenant), None).put(
                layout::tenant(tenant),
                TenantRecord {
                    created_at_ms: now,
                    ..Default::default()
                }
                .encode_to_vec(),
            );
            let (kek, kek_bytes) = self.primary_kek()?;
            self.add_new_dek(&mut batch, tenant, 1, &kek, kek_bytes, now);
            match self.store.commit(batch).await {
                Ok(counters) => {
                    tracing::info!(tenant, "created tenant with data key v1");
                    self.after_kek_use(kek.version(), counters[0]).await?;
                }
                Err(StoreError::Conflict) => self.reload_keks()?,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Adds a new active DEK `version` for `tenant`, wrapped under `kek`, to `batch`,
    /// with its ledger: one more DEK the KEK wraps, and nothing the DEK protects yet.
    /// The batch's first counter is then the KEK's use count.
    fn add_new_dek(
        &self,
        batch: &mut Batch,
        tenant: &str,
        version: u32,
        kek: &Kek,
        kek_bytes: Vec<u8>,
        now: u64,
    ) {
        let dek = SymmetricKey::generate();
        let record = DekRecord {
            version,
            kek_version: kek.version(),
            state: KeyState::Active as i32,
            created_at_ms: now,
            wrapped: envelope::seal(
                kek.key(),
                kek.version(),
                &Context::dek_wrap(tenant, version, kek.version()),
                dek.expose_bytes(),
            ),
            ..Default::default()
        };
        batch
            .check(layout::kek(kek.version()), Some(kek_bytes))
            .check(layout::dek(tenant, version), None)
            .put(layout::dek(tenant, version), record.encode_to_vec())
            .add(layout::kek_counter(kek.version()), 1)
            .add(layout::kek_refs(kek.version()), 1)
            .put(layout::dek_refs(tenant, version), layout::encode_counter(0));
    }

    fn load_tenant(&self, tenant: &str) -> Result<TenantKeys> {
        let generation = self.generation.load(Ordering::SeqCst);
        // The tenant record first: a ring is never newer than the record it
        // was loaded with (a deletion invalidates the cached ring after it commits).
        let tenant_bytes = self
            .store
            .get(&layout::tenant(tenant))?
            .ok_or(Error::NotFound)?;
        let state = records::decode::<TenantRecord>(&tenant_bytes)?.state();
        let keks = self.keks.read().expect("kek lock");
        let mut deks = BTreeMap::new();
        for (key, bytes) in self
            .store
            .scan(&layout::dek_prefix(tenant), None, usize::MAX)?
        {
            let record: DekRecord = records::decode(&bytes)?;
            let version = layout::trailing_version(&key)
                .filter(|v| *v == record.version)
                .ok_or_else(|| Error::Corrupt("data key record under the wrong key".into()))?;
            let state = record.state();
            let key = match state {
                KeyState::Destroyed => None,
                _ => {
                    let kek = keks
                        .get(&record.kek_version)
                        .and_then(Loaded::usable)
                        .ok_or_else(|| {
                            Error::Corrupt(format!("data key v{version} names a missing KEK"))
                        })?;
                    let context = Context::dek_wrap(tenant, version, record.kek_version);
                    match envelope::open(kek.key(), &context, &record.wrapped) {
                        Ok(material) => Some(Arc::new(Dek::new(version, to_key(&material)?))),
                        // Tampered or moved (say, another tenant's record): loaded
                        // without key bytes, so what it sealed fails to open with
                        // the same opaque DecryptionFailed as any other tampering,
                        // and nothing new is sealed under it.
                        Err(_) => {
                            tracing::error!(tenant, version, "data key does not unwrap");
                            None
                        }
                    }
                }
            };
            deks.insert(
                version,
                Loaded {
                    key,
                    record_bytes: bytes,
                    state,
                },
            );
        }
        Ok(TenantKeys {
            deks,
            tenant_bytes,
            state,
            generation,
        })
    }

    /// Forgets the cached DEK ring of `tenant` (after a conflict or rotation).
    pub fn invalidate(&self, tenant: &str) {
        let mut tenants = self.tenants.write().expect("tenant lock");
        self.generation.fetch_add(1, Ordering::SeqCst);
        tenants.remove(tenant);
    }

    /// The unwrapped KEK of `version`, unless it is missing or destroyed.
    pub fn kek(&self, version: u32) -> Option<Arc<Kek>> {
        self.keks
            .read()
            .expect("kek lock")
            .get(&version)
            .and_then(Loaded::usable)
            .cloned()
    }

    /// The tenant's DEK ring, read from the store (not the cache).
    pub fn tenant_fresh(&self, tenant: &str) -> Result<Arc<TenantKeys>> {
        let keys = Arc::new(self.load_tenant(tenant)?);
        self.cache(tenant, keys.clone());
        Ok(keys)
    }

    /// Reads the KEK ring from the store again. The store is read under the
    /// write lock, so reloads take turns and the ring never goes back: two
    /// reloads that read before and after a rotation, then installed their
    /// rings in the other order, left the new KEK out while DEKs wrapped
    /// under it were already committed ("data key names a missing KEK").
    ///
    /// The root keys are read under that lock too, together with the one a
    /// root rotation is committing: a reload that took the root key before a
    /// new one was installed met KEKs wrapped under the new one and failed
    /// with `Corrupt` ("KEK vN does not open under the root key").
    pub fn reload_keks(&self) -> Result<()> {
        self.reload_keks_reusing(true)
    }

    /// [`KeyRing::reload_keks`], reusing the unwrapped keys of the ring in
    /// memory or (tests: the widest exposure to a root key changing
    /// underneath) unwrapping every KEK again.
    fn reload_keks_reusing(&self, reuse: bool) -> Result<()> {
        let mut keks = self.keks.write().expect("kek lock");
        let root = self.root.read().expect("root lock");
        let none = BTreeMap::new();
        *keks = load_keks(&*self.store, &root, if reuse { &keks } else { &none })?;
        Ok(())
    }

    /// Makes a new primary DEK for `tenant`; the old primary becomes decrypt-only.
    /// `along` adds its changes to the same batch. Returns the new version, or
    /// `None` (a no-op) if `from_version` is no longer the primary (someone else
    /// rotated).
    pub async fn rotate_dek(
        &self,
        tenant: &str,
        from_version: u32,
        along: AlongWith<'_>,
    ) -> Result<Option<u32>> {
        for _ in 0..MAX_ATTEMPTS {
            let keys = self.load_tenant(tenant)?;
            let Some((current, loaded)) = primary(&keys.deks) else {
                return Err(Error::Corrupt("tenant has no active data key".into()));
            };
            if current != from_version {
                self.invalidate(tenant);
                return Ok(None);
            }
            let next = keys.deks.keys().next_back().copied().unwrap_or(current) + 1;
            let now = self.clock.now_ms();
            let mut old: DekRecord = records::decode(&loaded.record_bytes)?;
            old.state = KeyState::DecryptOnly as i32;
            old.retired_at_ms = now;
            let (kek, kek_bytes) = self.primary_kek()?;
            let mut batch = Batch::default();
            self.add_new_dek(&mut batch, tenant, next, &kek, kek_bytes, now);
            batch
                .check(
                    layout::dek(tenant, current),
                    Some(loaded.record_bytes.clone()),
                )
                .put(layout::dek(tenant, current), old.encode_to_vec());
            along(&mut batch, next);
            match self.store.commit(batch).await {
                Ok(counters) => {
                    self.invalidate(tenant);
                    tracing::info!(tenant, from = current, to = next, "rotated tenant data key");
                    self.after_kek_use(kek.version(), counters[0]).await?;
                    return Ok(Some(next));
                }
                Err(StoreError::Conflict) => self.reload_keks()?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// The primary KEK's version.
    pub fn primary_kek_version(&self) -> Result<u32> {
        Ok(self.primary_kek()?.0.version())
    }

    /// Makes a new primary KEK; the old primary becomes decrypt-only. `along`
    /// adds its changes to the same batch. Returns the new version, or `None`
    /// (a no-op) if `from_version` is no longer the primary.
    pub async fn rotate_kek(&self, from_version: u32, along: AlongWith<'_>) -> Result<Option<u32>> {
        for _ in 0..MAX_ATTEMPTS {
            let (current, current_bytes, next) = {
                let keks = self.keks.read().expect("kek lock");
                let (current, loaded) =
                    primary(&keks).ok_or_else(|| Error::Corrupt("no active KEK".into()))?;
                let next = keks.keys().next_back().copied().unwrap_or(current) + 1;
                (current, loaded.record_bytes.clone(), next)
            };
            if current != from_version {
                return Ok(None);
            }
            let now = self.clock.now_ms();
            let mut old: KekRecord = records::decode(&current_bytes)?;
            old.state = KeyState::DecryptOnly as i32;
            old.retired_at_ms = now;
            let kek = SymmetricKey::generate();
            let (root, root_bytes) = self.root();
            let record = KekRecord {
                version: next,
                state: KeyState::Active as i32,
                created_at_ms: now,
                wrapped: envelope::seal(
                    root.key(),
                    root.version(),
                    &Context::kek_wrap(next),
                    kek.expose_bytes(),
                ),
                ..Default::default()
            };
            let mut batch = Batch::default();
            batch
                .check(layout::ROOT_CHECK.to_vec(), Some(root_bytes))
                .check(layout::kek(current), Some(current_bytes))
                .check(layout::kek(next), None)
                .put(layout::kek(current), old.encode_to_vec())
                .put(layout::kek(next), record.encode_to_vec())
                .put(layout::kek_refs(next), layout::encode_counter(0));
            along(&mut batch, next);
            match self.store.commit(batch).await {
                Ok(_) => {
                    self.reload_keks()?;
                    tracing::info!(from = current, to = next, "rotated key-encryption key");
                    return Ok(Some(next));
                }
                Err(StoreError::Conflict) => self.reload_keks()?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// Called with a KEK's new use count: rotates it once it reaches the
    /// threshold (with the rewrap job `along` builds, if any).
    pub async fn after_kek_use(&self, version: u32, count: u64) -> Result<()> {
        if count >= self.rotate_after() {
            self.rotate_kek(version, &|_, _| {}).await?;
        }
        Ok(())
    }

    /// Rewraps every live KEK under `new_root` and switches the check value,
    /// in one batch (with `along`'s changes); keeps the old check value so that
    /// starting with the retired key says so, and so that no later rotation
    /// brings it back. The current and every retired root key are refused. Returns the new root version and
    /// how many KEKs were rewrapped.
    pub async fn rotate_root(
        &self,
        new_root: SymmetricKey,
        along: &(dyn Fn(&mut Batch, u32, u64) + Sync),
    ) -> Result<(u32, u64)> {
        // Root keys change only here, so the root read now stays current
        // while this is held.
        let _rotation = self.root_rotation.lock().await;
        let (root, root_bytes) = self.root();
        let check: RootCheck = records::decode(&root_bytes)?;
        if opens_check(&new_root, &check) || opens_retired(&*self.store, &new_root)? {
            return Err(Error::SameRootKey);
        }
        let version = root
            .version()
            .checked_add(1)
            .ok_or_else(|| Error::Corrupt("root key version overflow".into()))?;
        let new_root = Arc::new(RootKey::new(version, new_root));
        // Pending from before the commit until the end: a reload may meet the
        // rewrapped KEKs from the moment the batch lands, a little before
        // `commit` returns and the new key is installed.
        self.root.write().expect("root lock").pending = Some(new_root.clone());
        let result = self
            .commit_root_rotation(&root, &root_bytes, &new_root, along)
            .await;
        self.root.write().expect("root lock").pending = None;
        result
    }

    /// The attempts of [`KeyRing::rotate_root`], from `root` to `new_root`.
    async fn commit_root_rotation(
        &self,
        root: &RootKey,
        root_bytes: &[u8],
        new_root: &Arc<RootKey>,
        along: &(dyn Fn(&mut Batch, u32, u64) + Sync),
    ) -> Result<(u32, u64)> {
        let version = new_root.version();
        for _ in 0..MAX_ATTEMPTS {
            let mut batch = Batch::default();
            let mut rewrapped = 0;
            for (key, bytes) in self.store.scan(&layout::kek_prefix(), None, usize::MAX)? {
                let mut record: KekRecord = records::decode(&bytes)?;
                if record.state() == KeyState::Destroyed {
                    continue;
                }
                let context = Context::kek_wrap(record.version);
                let material =
                    envelope::open(root.key(), &context, &record.wrapped).map_err(|_| {
                        Error::Corrupt(format!(
                            "KEK v{} does not open under the root key",
                            record.version
                        ))
                    })?;
                record.wrapped = envelope::seal(new_root.key(), version, &context, &material);
                batch
                    .check(key.clone(), Some(bytes))
                    .put(key, record.encode_to_vec());
                rewrapped += 1;
            }
            if let Some(bytes) = self.store.get(layout::AUDIT_KEY)? {
                let material =
                    envelope::open(root.key(), &Context::audit_key(), &bytes).map_err(|_| {
                        Error::Corrupt("the audit key does not open under the root key".into())
                    })?;
                batch.check(layout::AUDIT_KEY.to_vec(), Some(bytes)).put(
                    layout::AUDIT_KEY.to_vec(),
                    envelope::seal(new_root.key(), version, &Context::audit_key(), &material),
                );
            }
            let new_check = RootCheck {
                root_version: version,
                check: envelope::seal(
                    new_root.key(),
                    version,
                    &Context::root_check(),
                    ROOT_CHECK_PLAINTEXT,
                ),
                created_at_ms: self.clock.now_ms(),
            }
            .encode_to_vec();
            batch
                .check(layout::ROOT_CHECK.to_vec(), Some(root_bytes.to_vec()))
                .put(layout::ROOT_CHECK.to_vec(), new_check.clone())
                .put(layout::retired_root(root.version()), root_bytes.to_vec());
            along(&mut batch, version, rewrapped);
            match self.store.commit(batch).await {
                Ok(_) => {
                    *self.root.write().expect("root lock") = Root {
                        key: new_root.clone(),
                        check_bytes: new_check,
                        pending: None,
                    };
                    self.reload_keks()?;
                    tracing::info!(
                        from = version - 1,
                        to = version,
                        keks = rewrapped,
                        "rotated the root key"
                    );
                    return Ok((version, rewrapped));
                }
                Err(StoreError::Conflict) => self.reload_keks()?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// The use count at which a key version is replaced by a new primary.
    pub fn rotate_after(&self) -> u64 {
        self.rotate_after
    }
}

/// Loads the KEK ring from the store, unwrapping each live version under the
/// root key its wrap names, the installed one or the one being installed (or
/// reusing the unwrapped key from `known`).
fn load_keks(
    store: &dyn Store,
    root: &Root,
    known: &BTreeMap<u32, Loaded<Kek>>,
) -> Result<BTreeMap<u32, Loaded<Kek>>> {
    let mut keks = BTreeMap::new();
    for (key, record_bytes) in store.scan(&layout::kek_prefix(), None, usize::MAX)? {
        let record: KekRecord = records::decode(&record_bytes)?;
        let version = layout::trailing_version(&key)
            .filter(|v| *v == record.version)
            .ok_or_else(|| Error::Corrupt("KEK record under the wrong key".into()))?;
        let state = record.state();
        let key = match (state, known.get(&version).and_then(|l| l.key.clone())) {
            (KeyState::Destroyed, _) => None,
            (_, Some(known)) => Some(known),
            (_, None) => {
                let unopened =
                    || Error::Corrupt(format!("KEK v{version} does not open under the root key"));
                let wrapped_by = envelope::key_version(&record.wrapped).map_err(|_| unopened())?;
                let root = root.by_version(wrapped_by).ok_or_else(unopened)?;
                let material =
                    envelope::open(root.key(), &Context::kek_wrap(version), &record.wrapped)
                        .map_err(|_| unopened())?;
                Some(Arc::new(Kek::new(version, to_key(&material)?)))
            }
        };
        keks.insert(
            version,
            Loaded {
                key,
                record_bytes,
                state,
            },
        );
    }
    Ok(keks)
}

/// The audit HMAC key: unsealed from the store, or made (and stored, checked
/// against the root check value so it cannot race a root rotation) on first use.
async fn load_audit_key(
    store: &dyn Store,
    root: &RootKey,
    check_bytes: &[u8],
) -> Result<SymmetricKey> {
    if let Some(bytes) = store.get(layout::AUDIT_KEY)? {
        let material = envelope::open(root.key(), &Context::audit_key(), &bytes)
            .map_err(|_| Error::Corrupt("the audit key does not open under the root key".into()))?;
        return to_key(&material);
    }
    let key = SymmetricKey::generate();
    let mut batch = Batch::default();
    batch
        .check(layout::ROOT_CHECK.to_vec(), Some(check_bytes.to_vec()))
        .check(layout::AUDIT_KEY.to_vec(), None)
        .put(
            layout::AUDIT_KEY.to_vec(),
            envelope::seal(
                root.key(),
                root.version(),
                &Context::audit_key(),
                key.expose_bytes(),
            ),
        );
    store.commit(batch).await?;
    tracing::info!("made the audit log key");
    Ok(key)
}

/// Whether `key` opens a root check value.
fn opens_check(key: &SymmetricKey, check: &RootCheck) -> bool {
    envelope::open(key, &Context::root_check(), &check.check)
        .is_ok_and(|opened| opened.as_slice() == ROOT_CHECK_PLAINTEXT)
}

/// Whether `key` is a retired root key of this store.
fn opens_retired(store: &dyn Store, key: &SymmetricKey) -> Result<bool> {
    for (_, bytes) in store.scan(&layout::retired_root_prefix(), None, usize::MAX)? {
        if opens_check(key, &records::decode(&bytes)?) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// How often a conflicting key change is retried before giving up.
const MAX_ATTEMPTS: usize = 64;

fn to_key(material: &Zeroizing<Vec<u8>>) -> Result<SymmetricKey> {
    SymmetricKey::from_slice(material)
        .ok_or_else(|| Error::Corrupt(format!("unwrapped key is not {KEY_LEN} bytes")))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::clock::SystemClock;
    use crate::store::{SledStore, StoreOptions};

    /// A ring over a new store in `dir`.
    async fn ring_in(dir: &std::path::Path) -> Arc<KeyRing> {
        let store: Arc<dyn Store> =
            Arc::new(SledStore::open(&StoreOptions::new(dir)).expect("store"));
        Arc::new(
            KeyRing::open(
                store,
                Arc::new(SystemClock),
                SymmetricKey::generate(),
                1 << 30,
            )
            .await
            .expect("ring"),
        )
    }

    /// Three threads calling `reload` on `ring` in a loop until `stop`; each
    /// returns the errors it met.
    fn reloaders(
        ring: &Arc<KeyRing>,
        stop: &Arc<AtomicBool>,
        reload: fn(&KeyRing) -> Result<()>,
    ) -> Vec<std::thread::JoinHandle<Vec<String>>> {
        (0..3)
            .map(|_| {
                let (ring, stop) = (ring.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut failures = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(error) = reload(&ring) {
                            failures.push(error.to_string());
                        }
                        std::thread::yield_now();
                    }
                    failures
                })
            })
            .collect()
    }

    /// Stops the reloaders and asserts that none of their reloads failed.
    fn no_reload_failed(stop: &AtomicBool, reloaders: Vec<std::thread::JoinHandle<Vec<String>>>) {
        stop.store(true, Ordering::Relaxed);
        let failures: Vec<String> = reloaders
            .into_iter()
            .flat_map(|r| r.join().expect("reloader"))
            .collect();
        assert!(
            failures.is_empty(),
            "{} reloads failed, first: {:?}",
            failures.len(),
            failures.first()
        );
    }

    /// Regression: concurrent reloads must never put back a ring older than
    /// one already installed. Threads reload in a loop while KEKs rotate;
    /// after each rotation returns, its KEK must stay loaded.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reloads_racing_rotations_never_lose_a_kek() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ring = ring_in(dir.path()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let reloaders = reloaders(&ring, &stop, KeyRing::reload_keks);
        let mut rotated = Vec::new();
        for _ in 0..60 {
            let from = ring.primary_kek_version().expect("primary");
            if let Some(to) = ring.rotate_kek(from, &|_, _| {}).await.expect("rotate") {
                rotated.push(to);
            }
            for &version in &rotated {
                assert!(ring.kek(version).is_some(), "KEK v{version} went missing");
            }
        }
        no_reload_failed(&stop, reloaders);
        assert_eq!(rotated.len(), 60, "every rotation took effect");
    }

    /// Regression: a reload racing a root rotation and a KEK rotation must
    /// never fail. A reload that took the root key just before a new root was
    /// installed met KEKs wrapped under the new one and reported `Corrupt`
    /// ("KEK vN does not open under the root key"). Threads reload in a loop
    /// (with a fresh ring as `known`, so every KEK is unwrapped again) while
    /// root and KEK rotations alternate.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reloads_racing_root_rotations_never_fail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ring = ring_in(dir.path()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let reloaders = reloaders(&ring, &stop, |ring| ring.reload_keks_reusing(false));
        for _ in 0..25 {
            ring.rotate_root(SymmetricKey::generate(), &|_, _, _| {})
                .await
                .expect("rotate root");
            let from = ring.primary_kek_version().expect("primary");
            ring.rotate_kek(from, &|_, _| {}).await.expect("rotate KEK");
        }
        no_reload_failed(&stop, reloaders);
        assert_eq!(ring.root_version(), 26, "every root rotation took effect");
        assert_eq!(ring.primary_kek_version().expect("primary"), 26);
    }
}
