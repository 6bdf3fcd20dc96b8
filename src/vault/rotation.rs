//! Online rotation of every layer, as resumable jobs.
//!
//! - KEK rotation makes a new primary KEK at once (new DEKs are wrapped by it)
//!   and starts a job that rewraps every older DEK under it.
//! - Tenant key rotation makes a new primary DEK at once (new seals use it) and,
//!   with `reencrypt`, starts a job that re-encrypts the tenant's live
//!   credential versions under it.
//! - Root key rotation rewraps every KEK under the new root key and switches the
//!   check value, in one atomic batch.
//!
//! A job walks its key range in order, in batches. Each batch names the exact
//! bytes of every record it replaces (so a concurrent seal, revoke or rotation
//! makes it conflict and be retried against fresh state, never undone), moves
//! the usage ledger, and writes the job's cursor and progress, all atomically:
//! after a crash the job resumes from the last durable batch, and nothing is
//! done or counted twice. Key material never leaves the process; payloads are
//! opened and resealed in memory only when re-encrypting.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message;

use crate::crypto::SymmetricKey;
use crate::crypto::envelope::{self, Context};
use crate::error::{Error, Invalid, Result};
use crate::store::records::{
    self, DekRecord, JobKind, JobRecord, KekRecord, KeyState, TenantState, VersionRecord,
    WrappedKey,
};
use crate::store::{Batch, StoreError, layout};

use super::{Kind, Vault, ledger, validate};

/// A key version to destroy: its record, its reference count, and how a
/// refusal names what still depends on it.
struct Retire {
    layer: &'static str,
    version: u32,
    key: Vec<u8>,
    refs: Vec<u8>,
    /// What it protects, singular and plural.
    protects: (&'static str, &'static str),
    hint: &'static str,
}

/// Longest job id accepted by [`Vault::rotation_job`].
const MAX_JOB_ID: usize = 128;
/// How often a batch that keeps conflicting is retried (halving its size each time).
const MAX_BATCH_ATTEMPTS: usize = 64;

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

/// Schedules and pacing of rotation.
#[derive(Debug, Clone)]
pub struct RotationOptions {
    /// Age at which the primary KEK is replaced (None: never on a schedule).
    pub kek_period_ms: Option<u64>,
    /// Age at which a tenant's primary DEK is replaced (None: never on a schedule).
    pub dek_period_ms: Option<u64>,
    /// Whether a scheduled DEK rotation also re-encrypts the tenant's records
    /// (so the old DEK retires and can be destroyed).
    pub reencrypt_on_schedule: bool,
    /// A retired version (decrypt-only, protecting nothing) is destroyed
    /// automatically this long after it stopped being the primary (None: never).
    pub destroy_retired_after_ms: Option<u64>,
    /// Records per job batch.
    pub batch_size: usize,
    /// Pause between job batches (throttles a job's share of the machine).
    pub batch_pause_ms: u64,
}

impl Default for RotationOptions {
    fn default() -> Self {
        Self {
            kek_period_ms: Some(90 * DAY_MS),
            dek_period_ms: Some(30 * DAY_MS),
            reencrypt_on_schedule: true,
            destroy_retired_after_ms: Some(7 * DAY_MS),
            // Paced so that Unseal keeps >= 70 % of its rate while a job runs
            // (sled blocks readers while it applies a batch): `bench rotation`.
            batch_size: 128,
            batch_pause_ms: 2,
        }
    }
}

/// A layer of the key hierarchy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyLayer {
    Root,
    Kek,
    Dek,
}

impl KeyLayer {
    pub fn name(self) -> &'static str {
        match self {
            KeyLayer::Root => "root",
            KeyLayer::Kek => "kek",
            KeyLayer::Dek => "dek",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        [KeyLayer::Root, KeyLayer::Kek, KeyLayer::Dek]
            .into_iter()
            .find(|l| l.name() == name)
    }
}

/// State of a rotation job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Running,
    Done,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Done => "done",
        }
    }
}

/// A rotation job as operators see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationJob {
    /// `kek-v{N}`, `dek-{tenant}-v{N}` or `root-v{N}`: deterministic, so asking
    /// twice for the same rotation names the same job.
    pub id: String,
    pub kind: JobKind,
    pub state: JobState,
    pub tenant: Option<String>,
    /// The new primary version the job moves records onto.
    pub target_version: u32,
    pub done: u64,
    /// Records to change; raised when more turn up (records written under the
    /// old version while the rotation was being made); once finished, exactly
    /// `done + skipped`.
    pub total: u64,
    /// Records that needed changing but did not open (tampered or damaged):
    /// left as they are, logged, and still depending on the old version.
    pub skipped: u64,
    pub created_at_ms: u64,
    pub finished_at_ms: Option<u64>,
}

impl JobKind {
    /// The name operators see.
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Unspecified => "unspecified",
            JobKind::Kek => "kek",
            JobKind::TenantKey => "tenant-key",
            JobKind::RootKey => "root-key",
        }
    }
}

impl RotationJob {
    fn from_record(id: String, record: &JobRecord) -> Self {
        Self {
            id,
            kind: record.kind(),
            state: if record.finished_at_ms == 0 {
                JobState::Running
            } else {
                JobState::Done
            },
            tenant: (!record.tenant.is_empty()).then(|| record.tenant.clone()),
            target_version: record.target_version,
            done: record.done,
            total: record.total,
            skipped: record.skipped,
            created_at_ms: record.created_at_ms,
            finished_at_ms: (record.finished_at_ms != 0).then_some(record.finished_at_ms),
        }
    }
}

fn kek_job_id(target: u32) -> String {
    format!("kek-v{target}")
}

fn dek_job_id(tenant: &str, target: u32) -> String {
    format!("dek-{tenant}-v{target}")
}

fn root_job_id(target: u32) -> String {
    format!("root-v{target}")
}

/// The tenant id inside a DEK record key (`d\0{tenant}\0{v:u32}`).
fn tenant_of_dek_key(key: &[u8]) -> Result<&str> {
    key.get(2..key.len().saturating_sub(5))
        .and_then(|t| std::str::from_utf8(t).ok())
        .ok_or_else(|| Error::Corrupt("malformed data key record key".into()))
}

/// What one job batch changed: records, and the ledger moves they need.
#[derive(Default)]
struct Moves {
    changed: u64,
    /// Records that needed moving but do not open (tampered): left as they are.
    skipped: u64,
    /// References released, by old version.
    released: BTreeMap<u32, u64>,
}

impl Moves {
    fn record(&mut self, old_version: u32) {
        self.changed += 1;
        *self.released.entry(old_version).or_default() += 1;
    }
}

impl Vault {
    /// Makes a new primary KEK and starts the job that rewraps every older DEK
    /// under it (in the same atomic batch). Returns the job (running;
    /// [`Vault::run_jobs`] drives it).
    pub async fn rotate_kek(&self) -> Result<RotationJob> {
        let total = self.kek_refs_total()?;
        let now = self.clock.now_ms();
        loop {
            let from = self.keys.primary_kek_version()?;
            let along = |batch: &mut Batch, next: u32| {
                put_new_job(batch, &kek_job_id(next), JobKind::Kek, "", next, total, now);
            };
            if let Some(next) = self.keys.rotate_kek(from, &along).await? {
                self.jobs_started.notify_one();
                return self.rotation_job(&kek_job_id(next));
            }
        }
    }

    /// DEKs wrapped by any KEK now (what a new rewrap job has to move, at most).
    fn kek_refs_total(&self) -> Result<u64> {
        let mut total = 0;
        for (key, _) in self.store.scan(&layout::kek_prefix(), None, usize::MAX)? {
            if let Some(version) = layout::trailing_version(&key) {
                total += self.counter(&layout::kek_refs(version))?;
            }
        }
        Ok(total)
    }

    /// Makes a new primary DEK for `tenant`; with `reencrypt`, starts the job
    /// that re-encrypts its live credential versions under it (otherwise the
    /// returned job is already done, with nothing to do). An unknown tenant is
    /// [`Error::NotFound`].
    pub async fn rotate_tenant_key(&self, tenant: &str, reencrypt: bool) -> Result<RotationJob> {
        validate::tenant_id(tenant)?;
        let now = self.clock.now_ms();
        loop {
            let keys = self.keys.tenant(tenant)?.ok_or(Error::NotFound)?;
            if keys.state != TenantState::Active {
                return Err(Error::TenantDeleted);
            }
            let (dek, _) = keys.primary()?;
            let from = dek.version();
            let mut total = 0;
            if reencrypt {
                for (key, value) in
                    self.store
                        .scan(&layout::dek_refs_prefix(tenant), None, usize::MAX)?
                {
                    if layout::trailing_version(&key).is_some_and(|v| v <= from) {
                        total += layout::decode_counter(&value).unwrap_or(0);
                    }
                }
            }
            let along = |batch: &mut Batch, next: u32| {
                let id = dek_job_id(tenant, next);
                put_new_job(batch, &id, JobKind::TenantKey, tenant, next, total, now);
                if !reencrypt {
                    finish_in(batch, &id, JobKind::TenantKey, tenant, next, now);
                }
            };
            if let Some(next) = self.keys.rotate_dek(tenant, from, &along).await? {
                if reencrypt {
                    self.jobs_started.notify_one();
                }
                return self.rotation_job(&dek_job_id(tenant, next));
            }
        }
    }

    /// Rewraps every KEK under `new_root` and switches the check value, in one
    /// atomic batch; from then on only `new_root` opens the store. The returned
    /// job is done. The current root key is refused ([`Error::SameRootKey`]).
    /// Run it to completion (the server runs it in its own task): dropped
    /// after its commit, it leaves the process with the old root key in memory
    /// while the store opens only under the new one, until a restart.
    pub async fn rotate_root_key(&self, new_root: SymmetricKey) -> Result<RotationJob> {
        let now = self.clock.now_ms();
        let along = |batch: &mut Batch, version: u32, keks: u64| {
            let record = JobRecord {
                kind: JobKind::RootKey as i32,
                tenant: String::new(),
                target_version: version,
                total: keks,
                done: keks,
                cursor: Vec::new(),
                created_at_ms: now,
                finished_at_ms: now,
                skipped: 0,
            };
            batch.put(layout::job(&root_job_id(version)), record.encode_to_vec());
        };
        let (version, _) = self.keys.rotate_root(new_root, &along).await?;
        self.rotation_job(&root_job_id(version))
    }

    /// Destroys a retired key version: its key bytes are removed from the
    /// store. Refused for the primary ([`Error::PrimaryKey`]) and while the
    /// ledger says anything depends on it ([`Error::KeyInUse`], with the count).
    /// Destroying a destroyed version is a no-op.
    pub async fn destroy_key_version(
        &self,
        layer: KeyLayer,
        tenant: Option<&str>,
        version: u32,
    ) -> Result<()> {
        if version == 0 {
            return Err(Invalid::Version.into());
        }
        match layer {
            KeyLayer::Root => Err(Invalid::KeyLayer.into()),
            KeyLayer::Kek => self.destroy_kek(version).await,
            KeyLayer::Dek => {
                let tenant = tenant.ok_or(Invalid::TenantId)?;
                validate::tenant_id(tenant)?;
                self.destroy_dek(tenant, version).await
            }
        }
    }

    async fn destroy_kek(&self, version: u32) -> Result<()> {
        let target = Retire {
            layer: "KEK",
            version,
            key: layout::kek(version),
            refs: layout::kek_refs(version),
            protects: ("data key", "data keys"),
            hint: "rewrap them first: rotate the KEK and wait for its job (credvault rotate kek --wait)",
        };
        if self.destroy::<KekRecord>(target, |_, _| {}).await? {
            self.keys.reload_keks()?;
            tracing::info!(version, "destroyed key-encryption key");
        }
        Ok(())
    }

    async fn destroy_dek(&self, tenant: &str, version: u32) -> Result<()> {
        let target = Retire {
            layer: "DEK",
            version,
            key: layout::dek(tenant, version),
            refs: layout::dek_refs(tenant, version),
            protects: ("credential version", "credential versions"),
            hint: "re-encrypt them first (credvault rotate tenant ID --reencrypt --wait)",
        };
        // A destroyed DEK is no longer one its KEK wraps.
        let release = |dek: &DekRecord, batch: &mut Batch| {
            batch.sub(layout::kek_refs(dek.kek_version), 1);
        };
        if self.destroy(target, release).await? {
            self.keys.invalidate(tenant);
            tracing::info!(tenant, version, "destroyed data key");
        }
        Ok(())
    }

    /// Destroys one key version if it is retired and the ledger says nothing
    /// depends on it, in a batch that checks both (with `along`'s changes).
    /// Returns whether it destroyed it (false: it already was).
    async fn destroy<R: WrappedKey>(
        &self,
        target: Retire,
        along: impl Fn(&R, &mut Batch),
    ) -> Result<bool> {
        for _ in 0..MAX_BATCH_ATTEMPTS {
            let bytes = self.store.get(&target.key)?.ok_or(Error::KeyNotFound)?;
            let mut record: R = records::decode(&bytes)?;
            match record.key_state() {
                KeyState::Destroyed => return Ok(false),
                KeyState::Active => {
                    return Err(Error::PrimaryKey {
                        layer: target.layer,
                        version: target.version,
                    });
                }
                _ => {}
            }
            let refs_bytes = self.store.get(&target.refs)?;
            let refs = refs_bytes
                .as_deref()
                .and_then(layout::decode_counter)
                .unwrap_or(0);
            if refs > 0 {
                return Err(Error::KeyInUse {
                    layer: target.layer,
                    version: target.version,
                    count: refs,
                    what: if refs == 1 {
                        target.protects.0
                    } else {
                        target.protects.1
                    },
                    hint: target.hint,
                });
            }
            record.destroy(self.clock.now_ms());
            let mut batch = Batch::default();
            batch
                .check(target.key.clone(), Some(bytes))
                .check(target.refs.clone(), refs_bytes)
                .put(target.key.clone(), record.encode_to_vec());
            along(&record, &mut batch);
            match self.store.commit(batch).await {
                Ok(_) => return Ok(true),
                Err(StoreError::Conflict) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(Error::Contention)
    }

    /// A job by id ([`Error::JobNotFound`] if none).
    pub fn rotation_job(&self, id: &str) -> Result<RotationJob> {
        if id.is_empty() || id.len() > MAX_JOB_ID || id.contains('\0') {
            return Err(Invalid::JobId.into());
        }
        let bytes = self
            .store
            .get(&layout::job(id))?
            .ok_or(Error::JobNotFound)?;
        Ok(RotationJob::from_record(
            id.to_owned(),
            &records::decode(&bytes)?,
        ))
    }

    /// Every job, running and finished, by id.
    pub fn rotation_jobs(&self) -> Result<Vec<RotationJob>> {
        let prefix = layout::job_prefix();
        self.store
            .scan(&prefix, None, usize::MAX)?
            .into_iter()
            .map(|(key, bytes)| {
                let id = String::from_utf8(key[prefix.len()..].to_vec())
                    .map_err(|_| Error::Corrupt("job id is not UTF-8".into()))?;
                Ok(RotationJob::from_record(id, &records::decode(&bytes)?))
            })
            .collect()
    }

    /// Drives every unfinished job to completion, batch by batch (resuming from
    /// the persisted cursor). Returns how many jobs it finished.
    pub async fn run_jobs(&self) -> Result<usize> {
        let mut finished = 0;
        loop {
            let running: Vec<_> = self
                .rotation_jobs()?
                .into_iter()
                .filter(|j| j.state == JobState::Running)
                .collect();
            if running.is_empty() {
                return Ok(finished);
            }
            for job in running {
                self.run_job(&job.id).await?;
                finished += 1;
            }
        }
    }

    async fn run_job(&self, id: &str) -> Result<()> {
        let job_key = layout::job(id);
        let started = std::time::Instant::now();
        let mut size = self.options.rotation.batch_size.max(1);
        let mut attempts = 0;
        loop {
            // A job purged with its tenant is over.
            let Some(job_bytes) = self.store.get(&job_key)? else {
                return Ok(());
            };
            let mut job: JobRecord = records::decode(&job_bytes)?;
            if job.finished_at_ms != 0 {
                return Ok(());
            }
            let mut batch = Batch::default();
            let (moves, cursor) = match job.kind() {
                JobKind::Kek => self.rewrap_batch(&mut batch, &job, size)?,
                JobKind::TenantKey => self.reencrypt_batch(&mut batch, &job, size)?,
                _ => (None, None),
            };
            let Some(cursor) = cursor else {
                // Past the last record: the job is done.
                job.finished_at_ms = self.clock.now_ms().max(1);
                job.total = job.done + job.skipped;
                let mut batch = Batch::default();
                batch
                    .check(job_key.clone(), Some(job_bytes))
                    .put(job_key.clone(), job.encode_to_vec());
                match self.store.commit(batch).await {
                    Ok(_) => {
                        tracing::info!(
                            job = id,
                            records = job.done,
                            seconds = started.elapsed().as_secs_f64(),
                            "rotation job done"
                        );
                        return Ok(());
                    }
                    Err(StoreError::Conflict) => continue,
                    Err(e) => return Err(e.into()),
                }
            };
            let changed = moves.as_ref().map_or(0, |m| m.changed);
            job.cursor = cursor;
            job.done += changed;
            job.skipped += moves.as_ref().map_or(0, |m| m.skipped);
            job.total = job.total.max(job.done + job.skipped);
            batch
                .check(job_key.clone(), Some(job_bytes))
                .put(job_key.clone(), job.encode_to_vec());
            match self.store.commit(batch).await {
                Ok(counters) => {
                    attempts = 0;
                    size = (size * 2).min(self.options.rotation.batch_size.max(1));
                    if changed > 0 {
                        // The batch's first counter is the new key's use count.
                        self.after_job_batch(&job, counters[0]).await?;
                    }
                    self.pause_between_batches().await;
                }
                Err(StoreError::Conflict) => {
                    // A seal, revoke or rotation changed a record of this batch:
                    // retry against fresh state, in a smaller batch.
                    attempts += 1;
                    if attempts > MAX_BATCH_ATTEMPTS {
                        return Err(Error::Contention);
                    }
                    size = (size / 2).max(1);
                    if let Some(tenant) = (!job.tenant.is_empty()).then_some(&job.tenant) {
                        self.keys.invalidate(tenant);
                    }
                    self.keys.reload_keks()?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The pause between two background batches (jobs, shred purges).
    pub(crate) async fn pause_between_batches(&self) {
        match self.options.rotation.batch_pause_ms {
            0 => tokio::task::yield_now().await,
            pause => tokio::time::sleep(Duration::from_millis(pause)).await,
        }
    }

    /// After a batch: the new key's use count may have reached the threshold.
    async fn after_job_batch(&self, job: &JobRecord, uses: u64) -> Result<()> {
        match job.kind() {
            JobKind::Kek => {
                let primary = self.keys.primary_kek_version()?;
                self.keys.after_kek_use(primary, uses).await
            }
            JobKind::TenantKey => {
                if uses >= self.keys.rotate_after() {
                    let keys = self.keys.tenant_fresh(&job.tenant)?;
                    let (dek, _) = keys.primary()?;
                    self.keys
                        .rotate_dek(&job.tenant, dek.version(), &|_, _| {})
                        .await?;
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Adds to `batch` the rewrap of up to `size` DEK records after the job's
    /// cursor that a KEK older than its target wraps. Returns the moves and the
    /// new cursor (`None`: nothing left).
    fn rewrap_batch(
        &self,
        batch: &mut Batch,
        job: &JobRecord,
        size: usize,
    ) -> Result<(Option<Moves>, Option<Vec<u8>>)> {
        let cursor = (!job.cursor.is_empty()).then_some(job.cursor.as_slice());
        let rows = self.store.scan(&layout::all_deks_prefix(), cursor, size)?;
        let Some((last, _)) = rows.last() else {
            return Ok((None, None));
        };
        let last = last.clone();
        let (kek, kek_bytes) = self.keys.primary_kek()?;
        let mut moves = Moves::default();
        // The new KEK's use count first, so that it is the batch's first counter.
        let mut puts = Batch::default();
        for (key, bytes) in rows {
            let mut record: DekRecord = records::decode(&bytes)?;
            if record.state() == KeyState::Destroyed || record.kek_version >= job.target_version {
                continue;
            }
            let tenant = tenant_of_dek_key(&key)?;
            let old = record.kek_version;
            let Some(old_kek) = self.keys.kek(old) else {
                tracing::error!(
                    tenant,
                    version = record.version,
                    kek = old,
                    "data key names a missing KEK; left as is"
                );
                moves.skipped += 1;
                continue;
            };
            let Ok(material) = envelope::open(
                old_kek.key(),
                &Context::dek_wrap(tenant, record.version, old),
                &record.wrapped,
            ) else {
                tracing::error!(
                    tenant,
                    version = record.version,
                    "data key does not unwrap; left as is"
                );
                moves.skipped += 1;
                continue;
            };
            record.kek_version = kek.version();
            record.wrapped = envelope::seal(
                kek.key(),
                kek.version(),
                &Context::dek_wrap(tenant, record.version, kek.version()),
                &material,
            );
            puts.check(key.clone(), Some(bytes))
                .put(key, record.encode_to_vec());
            moves.record(old);
        }
        if moves.changed > 0 {
            batch
                .add(layout::kek_counter(kek.version()), moves.changed)
                .check(layout::kek(kek.version()), Some(kek_bytes))
                .add(layout::kek_refs(kek.version()), moves.changed);
            for (old, n) in &moves.released {
                batch.sub(layout::kek_refs(*old), *n);
            }
            batch.checks.append(&mut puts.checks);
            batch.ops.append(&mut puts.ops);
        }
        Ok((Some(moves), Some(last)))
    }

    /// Adds to `batch` the re-encryption of up to `size` of the tenant's
    /// version records after the job's cursor whose live ciphertext a DEK
    /// older than the target sealed. Returns the moves and the new cursor.
    fn reencrypt_batch(
        &self,
        batch: &mut Batch,
        job: &JobRecord,
        size: usize,
    ) -> Result<(Option<Moves>, Option<Vec<u8>>)> {
        let tenant = job.tenant.as_str();
        let prefix = layout::tenant_versions_prefix(tenant);
        let cursor = (!job.cursor.is_empty()).then_some(job.cursor.as_slice());
        let rows = self.store.scan(&prefix, cursor, size)?;
        let Some((last, _)) = rows.last() else {
            return Ok((None, None));
        };
        let last = last.clone();
        // A tenant deleted (or shredded) since the job started: nothing more to
        // do; its records are going away, or come back as they were.
        let Some(keys) = self.keys.tenant(tenant)? else {
            return Ok((None, None));
        };
        if keys.state != TenantState::Active {
            return Ok((None, None));
        }
        let (dek, dek_bytes) = keys.primary()?;
        let mut moves = Moves::default();
        let mut puts = Batch::default();
        for (key, bytes) in rows {
            let mut record: VersionRecord = records::decode(&bytes)?;
            if !ledger::protects(&record) || record.dek_version >= job.target_version {
                continue;
            }
            let (Some(version), Some(credential)) = (
                layout::stored_version(&key, record.version),
                key.get(prefix.len()..key.len().saturating_sub(5))
                    .and_then(|c| std::str::from_utf8(c).ok()),
            ) else {
                return Err(Error::Corrupt("malformed version record key".into()));
            };
            let old = record.dek_version;
            let (Some(old_dek), Ok(kind)) = (keys.get(old), Kind::from_number(record.kind)) else {
                tracing::error!(
                    tenant,
                    credential,
                    version,
                    "credential version cannot be opened; left as is"
                );
                moves.skipped += 1;
                continue;
            };
            let Ok(secret) = envelope::open(
                old_dek.key(),
                &Context::payload(tenant, credential, version, kind as u8, old),
                &record.ciphertext,
            ) else {
                tracing::error!(
                    tenant,
                    credential,
                    version,
                    "credential version does not open; left as is"
                );
                moves.skipped += 1;
                continue;
            };
            record.dek_version = dek.version();
            record.ciphertext = envelope::seal(
                dek.key(),
                dek.version(),
                &Context::payload(tenant, credential, version, kind as u8, dek.version()),
                &secret,
            );
            puts.check(key.clone(), Some(bytes))
                .put(key, record.encode_to_vec());
            moves.record(old);
        }
        if moves.changed > 0 {
            batch
                .add(layout::dek_counter(tenant, dek.version()), moves.changed)
                .check(layout::dek(tenant, dek.version()), Some(dek_bytes.to_vec()))
                .add(layout::dek_refs(tenant, dek.version()), moves.changed);
            for (old, n) in &moves.released {
                batch.sub(layout::dek_refs(tenant, *old), *n);
            }
            batch.checks.append(&mut puts.checks);
            batch.ops.append(&mut puts.ops);
        }
        Ok((Some(moves), Some(last)))
    }

    /// One pass of the schedules at the clock's current time: rotates the
    /// KEK and the tenants' DEKs that are older than their period, and destroys
    /// versions retired longer than the delay. Returns the jobs it started.
    pub async fn run_schedules(&self) -> Result<Vec<RotationJob>> {
        let now = self.clock.now_ms();
        let options = self.options.rotation.clone();
        let mut started = Vec::new();
        let due = |created: u64, period: Option<u64>| {
            period.is_some_and(|p| created.saturating_add(p) <= now)
        };
        let retired_long_enough = |retired: u64| {
            retired != 0
                && options
                    .destroy_retired_after_ms
                    .is_some_and(|d| retired.saturating_add(d) <= now)
        };

        // KEKs: rotate an old primary; rewrap what older versions still wrap
        // (after a threshold rotation, or a job lost before it was recorded);
        // destroy long-retired versions that wrap nothing.
        let mut keks = Vec::new();
        for (_, bytes) in self.store.scan(&layout::kek_prefix(), None, usize::MAX)? {
            let record: KekRecord = records::decode(&bytes)?;
            let refs = self.counter(&layout::kek_refs(record.version))?;
            keks.push((record, refs));
        }
        let primary = keks
            .iter()
            .filter(|(k, _)| k.state() == KeyState::Active)
            .map(|(k, _)| (k.version, k.created_at_ms))
            .max();
        if let Some((version, created)) = primary {
            let stale = keks.iter().any(|(k, refs)| {
                k.version < version && k.state() != KeyState::Destroyed && *refs > 0
            });
            if due(created, options.kek_period_ms) {
                tracing::info!(version, "KEK reached its rotation period");
                started.push(self.rotate_kek().await?);
            } else if stale && !self.job_running(JobKind::Kek)? {
                let job = self.start_rewrap(version).await?;
                if job.state == JobState::Running {
                    started.push(job);
                }
            }
        }
        for (record, refs) in &keks {
            if record.state() == KeyState::DecryptOnly
                && *refs == 0
                && retired_long_enough(record.retired_at_ms)
            {
                match self.destroy_kek(record.version).await {
                    Ok(()) | Err(Error::KeyInUse { .. }) | Err(Error::PrimaryKey { .. }) => {}
                    Err(e) => return Err(e),
                }
            }
        }

        // DEKs, tenant by tenant (the records are in tenant order).
        let mut rows = self
            .store
            .scan(&layout::all_deks_prefix(), None, usize::MAX)?
            .into_iter()
            .peekable();
        while let Some((key, bytes)) = rows.next() {
            let tenant = tenant_of_dek_key(&key)?.to_owned();
            let mut ring = vec![records::decode::<DekRecord>(&bytes)?];
            while let Some((next, _)) = rows.peek() {
                if tenant_of_dek_key(next)? != tenant {
                    break;
                }
                let (_, bytes) = rows.next().expect("peeked");
                ring.push(records::decode(&bytes)?);
            }
            if let Some(primary) = ring
                .iter()
                .filter(|d| d.state() == KeyState::Active)
                .max_by_key(|d| d.version)
                && due(primary.created_at_ms, options.dek_period_ms)
            {
                tracing::info!(
                    tenant,
                    version = primary.version,
                    "data key reached its rotation period"
                );
                match self
                    .rotate_tenant_key(&tenant, options.reencrypt_on_schedule)
                    .await
                {
                    Ok(job) => started.push(job),
                    // Deleted tenants are not rotated: they are on their way out.
                    Err(Error::TenantDeleted) => {}
                    Err(e) => return Err(e),
                }
            }
            for dek in &ring {
                if dek.state() == KeyState::DecryptOnly
                    && retired_long_enough(dek.retired_at_ms)
                    && self.counter(&layout::dek_refs(&tenant, dek.version))? == 0
                {
                    match self.destroy_dek(&tenant, dek.version).await {
                        Ok(()) | Err(Error::KeyInUse { .. }) | Err(Error::PrimaryKey { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(started)
    }

    fn job_running(&self, kind: JobKind) -> Result<bool> {
        Ok(self
            .rotation_jobs()?
            .iter()
            .any(|j| j.kind == kind && j.state == JobState::Running))
    }

    /// Starts the rewrap job onto the primary KEK `version`, unless it exists
    /// (a finished job that left a record it could not unwrap is not re-run).
    async fn start_rewrap(&self, version: u32) -> Result<RotationJob> {
        let id = kek_job_id(version);
        if self.store.get(&layout::job(&id))?.is_some() {
            return self.rotation_job(&id);
        }
        let total = self.kek_refs_total()?;
        let mut batch = Batch::default();
        batch.check(layout::job(&id), None);
        put_new_job(
            &mut batch,
            &id,
            JobKind::Kek,
            "",
            version,
            total,
            self.clock.now_ms(),
        );
        self.store.commit(batch).await?;
        self.jobs_started.notify_one();
        self.rotation_job(&id)
    }

    /// Woken whenever a job is started (the server's background task waits on it).
    pub fn jobs_started(&self) -> &tokio::sync::Notify {
        &self.jobs_started
    }
}

/// Adds a new running job record to `batch`.
fn put_new_job(
    batch: &mut Batch,
    id: &str,
    kind: JobKind,
    tenant: &str,
    target_version: u32,
    total: u64,
    now: u64,
) {
    let record = JobRecord {
        kind: kind as i32,
        tenant: tenant.to_owned(),
        target_version,
        total,
        done: 0,
        cursor: Vec::new(),
        created_at_ms: now,
        finished_at_ms: 0,
        skipped: 0,
    };
    batch.put(layout::job(id), record.encode_to_vec());
}

/// Replaces the job record just added to `batch` with a finished one.
fn finish_in(
    batch: &mut Batch,
    id: &str,
    kind: JobKind,
    tenant: &str,
    target_version: u32,
    now: u64,
) {
    let record = JobRecord {
        kind: kind as i32,
        tenant: tenant.to_owned(),
        target_version,
        total: 0,
        done: 0,
        cursor: Vec::new(),
        created_at_ms: now,
        finished_at_ms: now.max(1),
        skipped: 0,
    };
    batch.put(layout::job(id), record.encode_to_vec());
}
