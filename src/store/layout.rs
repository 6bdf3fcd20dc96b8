//! The key layout: which record lives under which key.
//!
//! Keys start with a one-byte table tag and a NUL; variable parts (tenant and
//! credential ids) cannot contain NUL, so they are separated by it; versions are
//! big-endian so that keys sort by version.
//!
//! ```text
//! m\0root                          RootCheck
//! k\0{kek:u32}                     KekRecord
//! n\0k\0{kek:u32}                  u64: encryptions made with the KEK (DEK wraps)
//! t\0{tenant}                      TenantRecord
//! d\0{tenant}\0{dek:u32}           DekRecord
//! n\0d\0{tenant}\0{dek:u32}        u64: encryptions made with the DEK (payload seals)
//! h\0{tenant}\0{credential}        CredentialHead
//! v\0{tenant}\0{credential}\0{v:u32}  VersionRecord
//! ```

pub const ROOT_CHECK: &[u8] = b"m\0root";

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

pub fn tenant(tenant: &str) -> Vec<u8> {
    key(&[b"t", tenant.as_bytes()])
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
    }

    #[test]
    fn prefixes_do_not_leak_across_tenants() {
        assert!(head("acme", "x").starts_with(&head_prefix("acme")));
        assert!(!head("acme2", "x").starts_with(&head_prefix("acme")));
        assert!(!version("t", "ab", 1).starts_with(&version_prefix("t", "a")));
    }
}
