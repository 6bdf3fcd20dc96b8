//! Input validation: everything a request carries is checked here, before any
//! key is touched or anything is stored.

use std::collections::BTreeMap;

use crate::error::Invalid;

pub const MAX_TENANT_ID: usize = 64;
pub const MAX_CREDENTIAL_ID: usize = 256;
pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY: usize = 63;
pub const MAX_LABEL_VALUE: usize = 256;
/// Revocation reasons and caller names stored in tombstones.
pub const MAX_REASON: usize = 1024;
pub const MAX_ACTOR: usize = 512;

fn id_ok(id: &str, max: usize, extra: &[u8]) -> bool {
    (1..=max).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Tenant ids: 1-64 of `[A-Za-z0-9_-]`.
pub fn tenant_id(id: &str) -> Result<(), Invalid> {
    id_ok(id, MAX_TENANT_ID, b"_-")
        .then_some(())
        .ok_or(Invalid::TenantId)
}

/// Credential ids: 1-256 of `[A-Za-z0-9._:/@-]`.
pub fn credential_id(id: &str) -> Result<(), Invalid> {
    id_ok(id, MAX_CREDENTIAL_ID, b"._:/@-")
        .then_some(())
        .ok_or(Invalid::CredentialId)
}

/// At most 32 labels; keys 1-63 of `[A-Za-z0-9._/-]`, values at most 256 characters.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<(), Invalid> {
    if labels.len() > MAX_LABELS {
        return Err(Invalid::TooManyLabels {
            count: labels.len(),
            limit: MAX_LABELS,
        });
    }
    for (key, value) in labels {
        if !id_ok(key, MAX_LABEL_KEY, b"._/-") {
            return Err(Invalid::LabelKey);
        }
        if value.chars().count() > MAX_LABEL_VALUE {
            return Err(Invalid::LabelValue);
        }
    }
    Ok(())
}

/// A secret of at most `limit` bytes.
pub fn secret_size(size: usize, limit: usize) -> Result<(), Invalid> {
    (size <= limit)
        .then_some(())
        .ok_or(Invalid::TooLarge { size, limit })
}

/// Free text stored in a tombstone or audit record.
pub fn text(field: &'static str, value: &str, limit: usize) -> Result<(), Invalid> {
    (value.chars().count() <= limit)
        .then_some(())
        .ok_or(Invalid::TooLong { field, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids() {
        for ok in ["a", "acme-corp_2", &"x".repeat(64)] {
            assert_eq!(tenant_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", &"x".repeat(65), "a b", "a/b", "a\0", "é", "a.b"] {
            assert_eq!(tenant_id(bad), Err(Invalid::TenantId), "{bad:?}");
        }
    }

    #[test]
    fn credential_ids() {
        for ok in [
            "gmail",
            "user@example.com/cookies",
            "a.b:c-d_e",
            &"y".repeat(256),
        ] {
            assert_eq!(credential_id(ok), Ok(()), "{ok}");
        }
        for bad in ["", &"y".repeat(257), "a b", "a\nb", "a\0b", "a?b", "ü"] {
            assert_eq!(credential_id(bad), Err(Invalid::CredentialId), "{bad:?}");
        }
    }

    #[test]
    fn label_rules() {
        let many: BTreeMap<_, _> = (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(matches!(
            labels(&many),
            Err(Invalid::TooManyLabels { count: 33, .. })
        ));
        let at_limit: BTreeMap<_, _> = (0..32)
            .map(|i| (format!("k{i}"), "v".repeat(256)))
            .collect();
        assert_eq!(labels(&at_limit), Ok(()));
        let long_key = BTreeMap::from([("k".repeat(64), String::new())]);
        assert_eq!(labels(&long_key), Err(Invalid::LabelKey));
        let empty_key = BTreeMap::from([(String::new(), String::new())]);
        assert_eq!(labels(&empty_key), Err(Invalid::LabelKey));
        let long_value = BTreeMap::from([("k".into(), "v".repeat(257))]);
        assert_eq!(labels(&long_value), Err(Invalid::LabelValue));
    }

    #[test]
    fn secret_limit() {
        assert_eq!(secret_size(10, 10), Ok(()));
        assert_eq!(
            secret_size(11, 10),
            Err(Invalid::TooLarge {
                size: 11,
                limit: 10
            })
        );
    }
}
