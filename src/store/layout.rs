//! The key layout: which record lives under which key.
//!
//! Keys start with a one-byte table tag and a NUL; variable parts (tenant and
//! credential ids) cannot contain NUL, so they are separated by it; versions are
//! big-endian so that keys sort by version.
//!
//! ```text
//! m\0root                          RootCheck
//! m\0ledger                        u64: version of the usage ledger the store keeps
//! k\0{kek:u32}                     KekRecord
//! n\0k\0{kek:u32}                  u64: encryptions made with the KEK (DEK wraps)
//! r\0k\0{kek:u32}                  u64: DEK records the KEK wraps now
//! t\0{tenant}                      TenantRecord
//! d\0{tenant}\0{dek:u32}           DekRecord
//! n\0d\0{tenant}\0{dek:u32}        u64: encryptions made with the DEK (payload seals)
//! r\0d\0{tenant}\0{dek:u32}        u64: stored credential versions whose live ciphertext it sealed
//! h\0{tenant}\0{credential}        CredentialHead
//! v\0{tenant}\0{credential}\0{v:u32}  VersionRecord
//! j\0{job id}                      JobRecord
//! e\0{seq:u64}                     EventRecord (the revocation event log)
//! a\0{seq:u64}                     audit::Record (the HMAC-chained audit log)
//! m\0audit.anchor                  audit::Anchor (where the chain starts after pruning)
//! m\0audit.key                     the audit HMAC key, sealed by the root key
//! x\0{tenant}                      DeletionReceipt of a shredded tenant
//! m\0root.retired\0{v:u32}          RootCheck of root key v, retired by a root rotation
//! m\0wal.group                     u64: the last write-ahead-log group applied (sled backend)
//! L\0{log prefix}{first seq:u64}   a page of log entries (sled backend; see store::pages)
//! ```

pub const ROOT_CHECK: &[u8] = b"m\0root";

/// Present (holding [`LEDGER_VERSION`]) once the store keeps the `r\0…` reference
/// counts; a store written before them gets them counted once, when opened.
pub const LEDGER: &[u8] = b"m\0ledger";
pub const LEDGER_VERSION: u64 = 1;

/// Prefix of the check values of retired root keys, kept so that starting with
/// one says "this is a retired root key", and a root rotation refuses to bring
/// one back (its backups are meant to become unreadable once it is destroyed).
pub fn retired_root_prefix() -> Vec<u8> {
    b"m\0root.retired\0".to_vec()
}

pub fn retired_root(version: u32) -> Vec<u8> {
    let mut key = retired_root_prefix();
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// The number of the last write-ahead-log group the tree holds, written in
/// every group's batch by the sled backend; after a crash, opening replays the
/// log's groups after it.
pub const WAL_GROUP: &[u8] = b"m\0wal.group";

/// The audit log's HMAC key, sealed by the root key (rewrapped with the KEKs
/// when the root key rotates).
pub const AUDIT_KEY: &[u8] = b"m\0audit.key";

/// The revocation event log: entries at `e\0{seq:u64}` (see `Op::Append`).
pub const EVENTS: &[u8] = b"e\0";

/// The audit log: entries at `a\0{seq:u64}` (see `Op::Append`).
pub const AUDIT: &[u8] = b"a\0";

/// Every ordered log: the only prefixes `Op::Append` may write to. A backend
/// may store their entries its own way (the sled backend packs them into
/// pages under `L\0`) as long as each entry reads back under its key.
pub const LOGS: &[&[u8]] = &[EVENTS, AUDIT];

/// The deletion receipt of a shredded tenant.
pub fn receipt(tenant: &str) -> Vec<u8> {
    key(&[b"x", tenant.as_bytes()])
}

/// Prefix of every rotation job; the rest of the key is the job id.
pub fn job_prefix() -> Vec<u8> {
    b"j\0".to_vec()
}

pub fn job(id: &str) -> Vec<u8> {
    key(&[b"j", id.as_bytes()])
}

/// Prefix of every DEK record of every tenant.
pub fn all_deks_prefix() -> Vec<u8> {
    b"d\0".to_vec()
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(part);
    }
    out
}

pub fn kek_prefix() -> Vec<u8> {
    b"k\0".to_vec()
}

pub fn kek(version: u32) -> Vec<u8> {
    key(&[b"k", &version.to_be_bytes()])
}

pub fn kek_counter(version: u32) -> Vec<u8> {
    key(&[b"n", b"k", &version.to_be_bytes()])
}

/// The number of (non-destroyed) DEK records wrapped by KEK `version`.
pub fn kek_refs(version: u32) -> Vec<u8> {
    key(&[b"r", b"k", &version.to_be_bytes()])
}

/// Prefix of every tenant record; the rest of the key is the tenant id.
pub fn tenant_prefix() -> Vec<u8> {
    b"t\0".to_vec()
}

pub fn tenant(tenant: &str) -> Vec<u8> {
    key(&[b"t", tenant.as_bytes()])
}

/// Every tenant's DEK records.
pub fn dek_table_prefix() -> Vec<u8> {
    b"d\0".to_vec()
}

pub fn dek_prefix(tenant: &str) -> Vec<u8> {
    key(&[b"d", tenant.as_bytes(), b""])
}

pub fn dek(tenant: &str, version: u32) -> Vec<u8> {
    key(&[b"d", tenant.as_bytes(), &version.to_be_bytes()])
}

pub fn dek_counter(tenant: &str, version: u32) -> Vec<u8> {
    key(&[b"n", b"d", tenant.as_bytes(), &version.to_be_bytes()])
}

/// Prefix of the DEK use counters of a tenant; the rest of the key is the version.
pub fn dek_counter_prefix(tenant: &str) -> Vec<u8> {
    key(&[b"n", b"d", tenant.as_bytes(), b""])
}

/// The number of stored credential versions of `tenant` whose live ciphertext
/// DEK `version` sealed.
pub fn dek_refs(tenant: &str, version: u32) -> Vec<u8> {
    key(&[b"r", b"d", tenant.as_bytes(), &version.to_be_bytes()])
}

/// Prefix of the DEK reference counts of a tenant; the rest of the key is the version.
pub fn dek_refs_prefix(tenant: &str) -> Vec<u8> {
    key(&[b"r", b"d", tenant.as_bytes(), b""])
}

/// Prefix of every reference count (KEK and DEK).
pub fn refs_prefix() -> Vec<u8> {
    b"r\0".to_vec()
}

/// Prefix of every version record of every credential of a tenant.
pub fn tenant_versions_prefix(tenant: &str) -> Vec<u8> {
    key(&[b"v", tenant.as_bytes(), b""])
}

/// Prefix of every credential head of a tenant; the rest of the key is the credential id.
pub fn head_prefix(tenant: &str) -> Vec<u8> {
    key(&[b"h", tenant.as_bytes(), b""])
}

pub fn head(tenant: &str, credential: &str) -> Vec<u8> {
    key(&[b"h", tenant.as_bytes(), credential.as_bytes()])
}

pub fn version_prefix(tenant: &str, credential: &str) -> Vec<u8> {
    key(&[b"v", tenant.as_bytes(), credential.as_bytes(), b""])
}

/// The version number of the latest-version slot: [`latest`] is
/// `version(tenant, credential, LATEST)`, so it sorts after every numbered
/// version of the credential. No credential version ever has this number.
pub const LATEST: u32 = u32::MAX;

/// Where a credential's latest version is stored (its record names its
/// version), so that reading it is one point read. Older versions are stored
/// under their number ([`version`]).
pub fn latest(tenant: &str, credential: &str) -> Vec<u8> {
    version(tenant, credential, LATEST)
}

/// The version a record under a version key is stored as: the key's number,
/// or in the latest slot the record's own `version` field (`claimed`).
pub fn stored_version(key: &[u8], claimed: u32) -> Option<u32> {
    match trailing_version(key)? {
        LATEST => Some(claimed).filter(|v| !matches!(*v, 0 | LATEST)),
        v => Some(v),
    }
}

pub fn version(tenant: &str, credential: &str, version: u32) -> Vec<u8> {
    key(&[
        b"v",
        tenant.as_bytes(),
        credential.as_bytes(),
        &version.to_be_bytes(),
    ])
}

/// The version number at the end of a key made by [`kek`], [`dek`] or [`version`].
pub fn trailing_version(key: &[u8]) -> Option<u32> {
    let tail = key.len().checked_sub(4).map(|start| &key[start..])?;
    Some(u32::from_be_bytes(tail.try_into().ok()?))
}

pub fn encode_counter(value: u64) -> Vec<u8> {
    value.to_be_bytes().to_vec()
}

/// A counter value; a malformed one reads as `None`.
pub fn decode_counter(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_numerically_and_parse_back() {
        assert!(version("t", "c", 2) < version("t", "c", 10));
        assert!(version("t", "c", 255) < version("t", "c", 256));
        assert_eq!(trailing_version(&version("t", "c/x", 258)), Some(258));
        assert_eq!(trailing_version(&dek("t", 3)), Some(3));
        assert!(version("t", "c", LATEST - 1) < latest("t", "c"));
        assert!(latest("t", "c").starts_with(&version_prefix("t", "c")));
        assert_eq!(trailing_version(&latest("t", "c")), Some(LATEST));
        assert_eq!(stored_version(&version("t", "c", 7), 3), Some(7));
        assert_eq!(stored_version(&latest("t", "c"), 3), Some(3));
        assert_eq!(stored_version(&latest("t", "c"), LATEST), None);
        assert_eq!(stored_version(&latest("t", "c"), 0), None);
    }

    #[test]
    fn prefixes_do_not_leak_across_tenants() {
        assert!(head("acme", "x").starts_with(&head_prefix("acme")));
        assert!(!head("acme2", "x").starts_with(&head_prefix("acme")));
        assert!(!version("t", "ab", 1).starts_with(&version_prefix("t", "a")));
        assert!(dek_refs("acme", 1).starts_with(&dek_refs_prefix("acme")));
        assert!(!dek_refs("acme2", 1).starts_with(&dek_refs_prefix("acme")));
        assert!(dek_counter("acme", 1).starts_with(&dek_counter_prefix("acme")));
        assert!(kek_refs(1).starts_with(&refs_prefix()));
        assert!(version("t", "c", 1).starts_with(&tenant_versions_prefix("t")));
        assert!(!version("t2", "c", 1).starts_with(&tenant_versions_prefix("t")));
        assert_ne!(kek_refs(1), kek_counter(1));
    }
}
