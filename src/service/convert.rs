//! Conversions between the library's types and the wire messages.

use super::pb;
use crate::error::{Error, Invalid};
use crate::vault::{Kind, Metadata, Revocation};

pub fn kind_to_pb(kind: Kind) -> pb::CredentialKind {
    match kind {
        Kind::CookieJar => pb::CredentialKind::CookieJar,
        Kind::ApiKey => pb::CredentialKind::ApiKey,
        Kind::OauthToken => pb::CredentialKind::OauthToken,
        Kind::Generic => pb::CredentialKind::Generic,
    }
}

/// A wire kind; UNSPECIFIED and unknown numbers are invalid.
pub fn kind_from_pb(kind: i32) -> Result<Kind, Error> {
    u32::try_from(kind)
        .ok()
        .and_then(|n| Kind::from_number(n).ok())
        .ok_or(Error::Invalid(Invalid::Kind))
}

/// A kind filter: UNSPECIFIED means all kinds.
pub fn kind_filter(kind: i32) -> Result<Option<Kind>, Error> {
    match kind {
        0 => Ok(None),
        n => kind_from_pb(n).map(Some),
    }
}

pub fn revocation(r: Revocation) -> pb::Revocation {
    pb::Revocation {
        revoked_at_ms: r.revoked_at_ms,
        revoked_by: r.revoked_by,
        reason: r.reason,
    }
}

pub fn metadata(m: Metadata) -> pb::CredentialMetadata {
    pb::CredentialMetadata {
        tenant_id: m.tenant,
        credential_id: m.credential,
        version: m.version,
        latest_version: m.latest_version,
        kind: kind_to_pb(m.kind) as i32,
        labels: m.labels.into_iter().collect(),
        created_at_ms: m.created_at_ms,
        expires_at_ms: m.expires_at_ms,
        size_bytes: m.size,
        dek_version: m.dek_version,
        revocation: m.revocation.map(revocation),
    }
}
