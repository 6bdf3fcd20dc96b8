//! The stored records, encoded as protocol buffers (prost) so that fields can be
//! added later without a migration. `docs/format.md` lists every field.
//!
//! Records hold wrapped keys and ciphertexts, never plaintext keys or secrets.

use std::collections::BTreeMap;

use prost::Message;

use super::StoreError;

/// State of a key version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum KeyState {
    /// Unknown (never written).
    Unspecified = 0,
    /// The primary: seals (or wraps) new data, and opens old data.
    Active = 1,
    /// Opens data it sealed before, seals nothing new.
    DecryptOnly = 2,
    /// Its key bytes are gone; nothing it sealed can be opened.
    Destroyed = 3,
}

impl KeyState {
    /// The name operators see (`keys status`, `GetKeyStatus`).
    pub fn name(self) -> &'static str {
        match self {
            KeyState::Unspecified => "unspecified",
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Destroyed => "destroyed",
        }
    }
}

/// State of a stored credential version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum VersionState {
    Unspecified = 0,
    /// Holds a ciphertext that can be unsealed.
    Live = 1,
    /// Revoked: the ciphertext is gone, a tombstone remains.
    Revoked = 2,
}

/// The root key's check value and version (`m\0root`).
#[derive(Clone, PartialEq, Message)]
pub struct RootCheck {
    /// The root key's version; KEK wraps name it in their header.
    #[prost(uint32, tag = "1")]
    pub root_version: u32,
    /// seal[root](ROOT_CHECK_PLAINTEXT, root_check context).
    #[prost(bytes = "vec", tag = "2")]
    pub check: Vec<u8>,
    /// When this root key was put in place (ms since the Unix epoch).
    #[prost(uint64, tag = "3")]
    pub created_at_ms: u64,
}

/// One KEK version (`k\0{v}`).
#[derive(Clone, PartialEq, Message)]
pub struct KekRecord {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    #[prost(enumeration = "KeyState", tag = "2")]
    pub state: i32,
    #[prost(uint64, tag = "3")]
    pub created_at_ms: u64,
    /// seal[root](KEK bytes, kek_wrap(version)); empty once destroyed.
    #[prost(bytes = "vec", tag = "4")]
    pub wrapped: Vec<u8>,
    /// When it stopped being the primary (0 = still active).
    #[prost(uint64, tag = "5")]
    pub retired_at_ms: u64,
    /// When it was destroyed (0 = not destroyed).
    #[prost(uint64, tag = "6")]
    pub destroyed_at_ms: u64,
}

/// Lifecycle state of a tenant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum TenantState {
    /// Seals and unseals (the default of a record written before deletion existed).
    Active = 0,
    /// Deleted: every Seal and Unseal fails; shredded once the grace period is
    /// over (unless on legal hold); restorable until then.
    Deleted = 1,
}

/// What KEK and DEK records share: a state, and wrapped key bytes that
/// destruction removes.
pub trait WrappedKey: Message + Default {
    fn key_state(&self) -> KeyState;
    /// Marks the version destroyed at `now_ms`: its wrapped key bytes are gone.
    fn destroy(&mut self, now_ms: u64);
}

macro_rules! wrapped_key {
    ($($record:ty),*) => {$(
        impl WrappedKey for $record {
            fn key_state(&self) -> KeyState {
                self.state()
            }
            fn destroy(&mut self, now_ms: u64) {
                self.state = KeyState::Destroyed as i32;
                self.wrapped = Vec::new();
                self.destroyed_at_ms = now_ms;
            }
        }
    )*};
}

wrapped_key!(KekRecord, DekRecord);

/// A tenant (`t\0{tenant}`).
#[derive(Clone, PartialEq, Message)]
pub struct TenantRecord {
    #[prost(uint64, tag = "1")]
    pub created_at_ms: u64,
    #[prost(enumeration = "TenantState", tag = "2")]
    pub state: i32,
    /// When DeleteTenant was called (0: not deleted).
    #[prost(uint64, tag = "3")]
    pub deleted_at_ms: u64,
    #[prost(string, tag = "4")]
    pub deleted_by: String,
    /// When the shred may start.
    #[prost(uint64, tag = "5")]
    pub shred_after_ms: u64,
    /// While set, the shred waits.
    #[prost(bool, tag = "6")]
    pub legal_hold: bool,
    #[prost(string, tag = "7")]
    pub legal_hold_reason: String,
    #[prost(string, tag = "8")]
    pub legal_hold_by: String,
    /// Shred progress: when the DEKs were destroyed (0: not yet), which
    /// versions, and how many records have been purged so far.
    #[prost(uint64, tag = "9")]
    pub keys_destroyed_at_ms: u64,
    #[prost(uint32, repeated, tag = "10")]
    pub destroyed_dek_versions: Vec<u32>,
    #[prost(uint64, tag = "11")]
    pub purged_credentials: u64,
    #[prost(uint64, tag = "12")]
    pub purged_versions: u64,
}

/// What kind of change an event announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum EventKind {
    Unspecified = 0,
    CredentialRevoked = 1,
    TenantDisabled = 2,
    TenantRestored = 3,
    TenantShredded = 4,
}

/// One revocation event (`e\0{seq:u64}`), written in the same batch as the
/// change it announces.
#[derive(Clone, PartialEq, Message)]
pub struct EventRecord {
    #[prost(enumeration = "EventKind", tag = "1")]
    pub kind: i32,
    #[prost(string, tag = "2")]
    pub tenant: String,
    /// Empty for tenant-wide events.
    #[prost(string, tag = "3")]
    pub credential: String,
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
}

/// What remains of a shredded tenant (`x\0{tenant}`).
#[derive(Clone, PartialEq, Message)]
pub struct DeletionReceipt {
    #[prost(uint64, tag = "1")]
    pub requested_at_ms: u64,
    #[prost(string, tag = "2")]
    pub requested_by: String,
    #[prost(uint64, tag = "3")]
    pub keys_destroyed_at_ms: u64,
    #[prost(uint64, tag = "4")]
    pub shredded_at_ms: u64,
    #[prost(uint32, repeated, tag = "5")]
    pub destroyed_dek_versions: Vec<u32>,
    #[prost(uint64, tag = "6")]
    pub purged_credentials: u64,
    #[prost(uint64, tag = "7")]
    pub purged_versions: u64,
}

/// One DEK version of a tenant (`d\0{tenant}\0{v}`).
#[derive(Clone, PartialEq, Message)]
pub struct DekRecord {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The KEK version that wraps it.
    #[prost(uint32, tag = "2")]
    pub kek_version: u32,
    #[prost(enumeration = "KeyState", tag = "3")]
    pub state: i32,
    #[prost(uint64, tag = "4")]
    pub created_at_ms: u64,
    /// seal[kek](DEK bytes, dek_wrap(tenant, version, kek_version)); empty once destroyed.
    #[prost(bytes = "vec", tag = "5")]
    pub wrapped: Vec<u8>,
    /// When it stopped being the primary (0 = still active).
    #[prost(uint64, tag = "6")]
    pub retired_at_ms: u64,
    /// When it was destroyed (0 = not destroyed).
    #[prost(uint64, tag = "7")]
    pub destroyed_at_ms: u64,
}

/// A credential's head (`h\0{tenant}\0{credential}`): what the latest version is.
#[derive(Clone, PartialEq, Message)]
pub struct CredentialHead {
    #[prost(uint32, tag = "1")]
    pub latest_version: u32,
    #[prost(uint64, tag = "2")]
    pub created_at_ms: u64,
    #[prost(uint64, tag = "3")]
    pub updated_at_ms: u64,
}

/// Who revoked a credential, when and why.
#[derive(Clone, PartialEq, Message)]
pub struct Tombstone {
    #[prost(uint64, tag = "1")]
    pub revoked_at_ms: u64,
    #[prost(string, tag = "2")]
    pub revoked_by: String,
    #[prost(string, tag = "3")]
    pub reason: String,
}

/// One stored version of a credential (`v\0{tenant}\0{credential}\0{v}`).
#[derive(Clone, PartialEq, Message)]
pub struct VersionRecord {
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The credential kind (`vault::Kind` as a number).
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    #[prost(btree_map = "string, string", tag = "3")]
    pub labels: BTreeMap<String, String>,
    #[prost(uint64, tag = "4")]
    pub created_at_ms: u64,
    /// 0 = never expires.
    #[prost(uint64, tag = "5")]
    pub expires_at_ms: u64,
    /// The DEK version that sealed the payload.
    #[prost(uint32, tag = "6")]
    pub dek_version: u32,
    #[prost(enumeration = "VersionState", tag = "7")]
    pub state: i32,
    /// seal[dek](secret, payload(tenant, credential, version, kind, dek_version));
    /// empty once revoked.
    #[prost(bytes = "vec", tag = "8")]
    pub ciphertext: Vec<u8>,
    /// Plaintext length, for metadata.
    #[prost(uint64, tag = "9")]
    pub size: u64,
    #[prost(message, optional, tag = "10")]
    pub tombstone: Option<Tombstone>,
}

/// What a rotation job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum JobKind {
    Unspecified = 0,
    /// Rewrap every DEK not wrapped by KEK `target_version` or later.
    Kek = 1,
    /// Re-encrypt a tenant's live credential versions sealed by a DEK older than `target_version`.
    TenantKey = 2,
    /// Rewrap every KEK under root key `target_version` (done in one batch).
    RootKey = 3,
}

/// A rotation job (`j\0{job id}`): what it does and how far it got. Its
/// progress is written in the same batch as the records it changed, so after
/// a crash it resumes exactly where the last durable batch left it.
#[derive(Clone, PartialEq, Message)]
pub struct JobRecord {
    #[prost(enumeration = "JobKind", tag = "1")]
    pub kind: i32,
    /// Empty unless the job is a tenant's.
    #[prost(string, tag = "2")]
    pub tenant: String,
    /// The key version the job moves records onto (or above).
    #[prost(uint32, tag = "3")]
    pub target_version: u32,
    /// Records to change: counted when the job started, raised if more turn up,
    /// and once finished, exactly `done + skipped`.
    #[prost(uint64, tag = "4")]
    pub total: u64,
    /// Records changed so far.
    #[prost(uint64, tag = "5")]
    pub done: u64,
    /// The last store key the job has dealt with (empty: none yet).
    #[prost(bytes = "vec", tag = "6")]
    pub cursor: Vec<u8>,
    #[prost(uint64, tag = "7")]
    pub created_at_ms: u64,
    /// 0 while running.
    #[prost(uint64, tag = "8")]
    pub finished_at_ms: u64,
    /// Records the job had to leave as they were (they do not open: tampered).
    #[prost(uint64, tag = "9")]
    pub skipped: u64,
}

/// Decodes a record, turning a malformed one into a storage error.
pub fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, StoreError> {
    M::decode(bytes).map_err(|e| StoreError::Backend(format!("malformed record: {e}")))
}
