//! The vault at a glance, for `credvault status` (Admin `GetServerStatus`).

use super::{JobState, KekStatus, RootKeyStatus, Vault};
use crate::error::{Error, Result};
use crate::store::StoreHealth;

/// What an operator checks first: key ages, unfinished rotations, the logs'
/// ends, whether the store still takes writes.
#[derive(Debug, Clone)]
pub struct VaultStatus {
    pub root: RootKeyStatus,
    pub primary_kek: KekStatus,
    /// Rotation jobs not yet done.
    pub rotation_jobs_running: u64,
    /// The newest revocation event (0: none).
    pub last_event_sequence: u64,
    /// The newest audit record and its MAC (`None`: none yet, or records off).
    pub audit_head: Option<crate::audit::Head>,
    pub store: StoreHealth,
    /// Why the audit log refuses records (`None`: it takes them, or records off).
    pub audit_failure: Option<String>,
    /// The vault's clock when the status was read.
    pub now_ms: u64,
}

impl Vault {
    /// The root key and the primary KEK (their ages are what the rotation
    /// schedules and the backup erasure schedule follow).
    pub fn root_and_primary_kek(&self) -> Result<(RootKeyStatus, KekStatus)> {
        let (root, keks) = self.root_and_keks()?;
        let primary = self.keys.primary_kek_version()?;
        let primary_kek = keks
            .into_iter()
            .find(|k| k.version == primary)
            .ok_or_else(|| Error::Corrupt(format!("the primary KEK v{primary} has no record")))?;
        Ok((root, primary_kek))
    }

    /// Why the vault cannot do its work, if it cannot: the store refuses
    /// writes, or the audit log refuses records (audited calls then fail).
    /// Both last until a restart; the server's health turns NOT_SERVING.
    pub fn serving_problem(&self) -> Option<String> {
        if !self.store.writable() {
            return Some("the store refuses writes (a write could not be made durable)".into());
        }
        let failure = self.audit.as_ref()?.failure()?;
        Some(format!("the audit log refuses records ({failure})"))
    }

    /// The status, read from the store (blocking: a few point reads and the
    /// KEK and job records).
    pub fn status(&self) -> Result<VaultStatus> {
        let (root, primary_kek) = self.root_and_primary_kek()?;
        let rotation_jobs_running = self
            .rotation_jobs()?
            .iter()
            .filter(|job| job.state == JobState::Running)
            .count() as u64;
        let audit_head = match &self.audit {
            Some(log) => log.head()?,
            None => None,
        };
        let audit_failure = self.audit.as_ref().and_then(|log| log.failure());
        Ok(VaultStatus {
            root,
            primary_kek,
            rotation_jobs_running,
            last_event_sequence: self.last_event_sequence(),
            audit_head,
            store: self.store.health(),
            audit_failure,
            now_ms: self.clock.now_ms(),
        })
    }
}
