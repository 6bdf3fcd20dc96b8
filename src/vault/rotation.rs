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

use crate::error::{Error, Result};
use crate::store::records::JobKind;

use super::Vault;

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
            batch_size: 512,
            batch_pause_ms: 0,
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
    pub total: u64,
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

impl Vault {
    /// Makes a new primary KEK and starts the job that rewraps every older DEK
    /// under it. Returns the job (running; [`Vault::run_jobs`] drives it).
    pub async fn rotate_kek(&self) -> Result<RotationJob> {
        Err(Error::Corrupt("not implemented".into()))
    }

    /// Makes a new primary DEK for `tenant`; with `reencrypt`, starts the job
    /// that re-encrypts its live credential versions under it (otherwise the
    /// returned job is already done, with nothing to do). An unknown tenant is
    /// [`Error::NotFound`].
    pub async fn rotate_tenant_key(&self, tenant: &str, reencrypt: bool) -> Result<RotationJob> {
        let _ = (tenant, reencrypt);
        Err(Error::Corrupt("not implemented".into()))
    }

    /// Rewraps every KEK under `new_root` and switches the check value, in one
    /// atomic batch; from then on only `new_root` opens the store. The returned
    /// job is done. The current root key is refused ([`Error::SameRootKey`]).
    pub async fn rotate_root_key(&self, new_root: crate::crypto::SymmetricKey) -> Result<RotationJob> {
        let _ = new_root;
        Err(Error::Corrupt("not implemented".into()))
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
        let _ = (layer, tenant, version);
        Err(Error::Corrupt("not implemented".into()))
    }

    /// A job by id ([`Error::JobNotFound`] if none).
    pub fn rotation_job(&self, id: &str) -> Result<RotationJob> {
        let _ = id;
        Err(Error::JobNotFound)
    }

    /// Every job, running and finished, by id.
    pub fn rotation_jobs(&self) -> Result<Vec<RotationJob>> {
        Ok(Vec::new())
    }

    /// Drives every unfinished job to completion, batch by batch (resuming from
    /// the persisted cursor). Returns how many jobs it finished.
    pub async fn run_jobs(&self) -> Result<usize> {
        Ok(0)
    }

    /// One pass of the schedules at the clock's current time: rotates the
    /// KEK and the tenants' DEKs that are older than their period, and destroys
    /// versions retired longer than the delay. Returns the jobs it started.
    pub async fn run_schedules(&self) -> Result<Vec<RotationJob>> {
        Ok(Vec::new())
    }

    /// Woken whenever a job is started (the server's background task waits on it).
    pub fn jobs_started(&self) -> &tokio::sync::Notify {
        &self.jobs_started
    }
}
