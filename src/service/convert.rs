//! Conversions between the library's types and the wire messages.

use super::pb;
use crate::error::{Error, Invalid};
use crate::store::records::EventKind;
use crate::vault::{
    DekStatus, DeletionReceipt, Event, JobState, KeyStatus, KeyStatusPage, Kind, Metadata,
    Revocation, RotationJob, TenantStatus,
};

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

/// The ledger as rows: the root key, then every KEK, then every DEK (by tenant
/// and version). The root key's encryptions are not counted (it wraps one KEK
/// per KEK version); its protected records are the KEK versions it wraps.
pub fn key_status(status: KeyStatus) -> pb::KeyStatus {
    let root = pb::KeyVersionStatus {
        layer: "root".into(),
        tenant_id: String::new(),
        version: status.root.version,
        state: "active".into(),
        created_at_ms: status.root.created_at_ms,
        encryptions: 0,
        protected_records: status.root.wrapped_keks,
        kek_version: 0,
        retired_at_ms: 0,
        destroyed_at_ms: 0,
    };
    let keks = status.keks.into_iter().map(|k| pb::KeyVersionStatus {
        layer: "kek".into(),
        tenant_id: String::new(),
        version: k.version,
        state: k.state.name().into(),
        created_at_ms: k.created_at_ms,
        encryptions: k.encryptions,
        protected_records: k.wrapped_deks,
        kek_version: 0,
        retired_at_ms: k.retired_at_ms.unwrap_or(0),
        destroyed_at_ms: k.destroyed_at_ms.unwrap_or(0),
    });
    let deks = status.deks.into_iter().map(dek_row);
    pb::KeyStatus {
        versions: std::iter::once(root).chain(keks).chain(deks).collect(),
        next_page_token: String::new(),
    }
}

/// A page of [`key_status`]: the root and KEK rows on the first page only.
pub fn key_status_page(page: KeyStatusPage) -> pb::KeyStatus {
    let mut status = match page.head {
        Some((root, keks)) => key_status(KeyStatus {
            root,
            keks,
            deks: page.deks,
        }),
        None => pb::KeyStatus {
            versions: page.deks.into_iter().map(dek_row).collect(),
            next_page_token: String::new(),
        },
    };
    status.next_page_token = page.next_page_token.unwrap_or_default();
    status
}

fn dek_row(d: DekStatus) -> pb::KeyVersionStatus {
    pb::KeyVersionStatus {
        layer: "dek".into(),
        tenant_id: d.tenant,
        version: d.version,
        state: d.state.name().into(),
        created_at_ms: d.created_at_ms,
        encryptions: d.encryptions,
        protected_records: d.protected_versions,
        kek_version: d.kek_version,
        retired_at_ms: d.retired_at_ms.unwrap_or(0),
        destroyed_at_ms: d.destroyed_at_ms.unwrap_or(0),
    }
}

/// A job as the wire shows it: names for kind and state, "" for no tenant, and
/// 0 for "not finished".
pub fn rotation_job(job: RotationJob) -> pb::RotationJob {
    pb::RotationJob {
        job_id: job.id,
        kind: job.kind.name().into(),
        state: job.state.name().into(),
        done: job.done,
        total: job.total,
        skipped: job.skipped,
        tenant_id: job.tenant.unwrap_or_default(),
        target_version: job.target_version,
        created_at_ms: job.created_at_ms,
        finished_at_ms: match job.state {
            JobState::Running => 0,
            JobState::Done => job.finished_at_ms.unwrap_or(0),
        },
    }
}

/// A deletion receipt as the wire shows it.
pub fn deletion_receipt(r: DeletionReceipt) -> pb::DeletionReceipt {
    pb::DeletionReceipt {
        requested_at_ms: r.requested_at_ms,
        requested_by: r.requested_by,
        keys_destroyed_at_ms: r.keys_destroyed_at_ms,
        shredded_at_ms: r.shredded_at_ms,
        destroyed_dek_versions: r.destroyed_dek_versions,
        purged_credentials: r.purged_credentials,
        purged_versions: r.purged_versions,
    }
}

/// A tenant's lifecycle state: 0 and "" for what is not set.
pub fn tenant_status(s: TenantStatus) -> pb::TenantStatus {
    pb::TenantStatus {
        tenant_id: s.tenant,
        state: s.state.into(),
        deleted_at_ms: s.deleted_at_ms.unwrap_or(0),
        deleted_by: s.deleted_by.unwrap_or_default(),
        shred_after_ms: s.shred_after_ms.unwrap_or(0),
        legal_hold: s.legal_hold,
        legal_hold_reason: s.legal_hold_reason.unwrap_or_default(),
        receipt: s.receipt.map(deletion_receipt),
    }
}

fn event_kind(kind: EventKind) -> pb::revocation_event::Kind {
    use pb::revocation_event::Kind as K;
    match kind {
        EventKind::Unspecified => K::Unspecified,
        EventKind::CredentialRevoked => K::CredentialRevoked,
        EventKind::TenantDisabled => K::TenantDisabled,
        EventKind::TenantRestored => K::TenantRestored,
        EventKind::TenantShredded => K::TenantShredded,
    }
}

/// A revocation event; "" for the credential of a tenant-wide event.
pub fn event(e: Event) -> pb::RevocationEvent {
    pb::RevocationEvent {
        sequence: e.sequence,
        tenant_id: e.tenant,
        credential_id: e.credential.unwrap_or_default(),
        kind: event_kind(e.kind) as i32,
        at_ms: e.at_ms,
    }
}

/// A KEEPALIVE: the stream's position `sequence`, sent at `at_ms`.
pub fn keepalive(sequence: u64, at_ms: u64) -> pb::RevocationEvent {
    pb::RevocationEvent {
        sequence,
        tenant_id: String::new(),
        credential_id: String::new(),
        kind: pb::revocation_event::Kind::Keepalive as i32,
        at_ms,
    }
}

impl From<crate::audit::Head> for pb::AuditHead {
    fn from(head: crate::audit::Head) -> Self {
        Self {
            sequence: head.sequence,
            mac: head.mac.to_vec(),
        }
    }
}

impl TryFrom<&pb::AuditHead> for crate::audit::Head {
    type Error = crate::audit::InvalidHead;

    fn try_from(head: &pb::AuditHead) -> Result<Self, Self::Error> {
        Self::new(head.sequence, &head.mac)
    }
}

impl From<crate::audit::Verification> for pb::VerifyAuditResponse {
    fn from(v: crate::audit::Verification) -> Self {
        use crate::audit::HeadCheck;
        let head_check = match v.head_check {
            HeadCheck::NotGiven => pb::HeadCheck::NotGiven,
            HeadCheck::Matched => pb::HeadCheck::Matched,
            HeadCheck::Pruned => pb::HeadCheck::Pruned,
        };
        Self {
            ok: v.ok,
            records: v.records,
            first_bad_sequence: v.first_bad_sequence.unwrap_or(0),
            reason: v.reason,
            first_sequence: v.first_sequence,
            last_sequence: v.last_sequence,
            head: v.head.map(Into::into),
            head_check: head_check as i32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::records::KeyState;
    use crate::vault::{DekStatus, JobKind, KekStatus, RootKeyStatus};

    #[test]
    fn key_status_rows_name_layer_and_state() {
        let status = KeyStatus {
            root: RootKeyStatus {
                version: 1,
                created_at_ms: 10,
                wrapped_keks: 2,
            },
            keks: vec![
                KekStatus {
                    version: 1,
                    state: KeyState::DecryptOnly,
                    created_at_ms: 10,
                    retired_at_ms: Some(20),
                    destroyed_at_ms: None,
                    encryptions: 5,
                    wrapped_deks: 3,
                },
                KekStatus {
                    version: 2,
                    state: KeyState::Active,
                    created_at_ms: 20,
                    retired_at_ms: None,
                    destroyed_at_ms: None,
                    encryptions: 1,
                    wrapped_deks: 1,
                },
            ],
            deks: vec![DekStatus {
                tenant: "acme".into(),
                version: 4,
                kek_version: 2,
                state: KeyState::Destroyed,
                created_at_ms: 30,
                retired_at_ms: Some(40),
                destroyed_at_ms: Some(50),
                encryptions: 7,
                protected_versions: 0,
            }],
        };
        let rows: Vec<_> = key_status(status)
            .versions
            .into_iter()
            .map(|r| {
                (
                    (r.layer, r.tenant_id, r.version, r.state),
                    (r.created_at_ms, r.encryptions, r.protected_records),
                    (r.kek_version, r.retired_at_ms, r.destroyed_at_ms),
                )
            })
            .collect();
        let row = |layer: &str, tenant: &str, v, state: &str, counts, times| {
            (
                (layer.to_owned(), tenant.to_owned(), v, state.to_owned()),
                counts,
                times,
            )
        };
        assert_eq!(
            rows,
            [
                row("root", "", 1, "active", (10, 0, 2), (0, 0, 0)),
                row("kek", "", 1, "decrypt-only", (10, 5, 3), (0, 20, 0)),
                row("kek", "", 2, "active", (20, 1, 1), (0, 0, 0)),
                row("dek", "acme", 4, "destroyed", (30, 7, 0), (2, 40, 50)),
            ]
        );
    }

    fn job(state: JobState, tenant: Option<&str>, finished: Option<u64>) -> RotationJob {
        RotationJob {
            id: "dek-acme-v3".into(),
            kind: JobKind::TenantKey,
            state,
            tenant: tenant.map(str::to_owned),
            target_version: 3,
            done: 5,
            total: 9,
            skipped: 1,
            created_at_ms: 100,
            finished_at_ms: finished,
        }
    }

    #[test]
    fn a_job_shows_names_and_zero_for_what_is_not_set() {
        let running = rotation_job(job(JobState::Running, Some("acme"), None));
        assert_eq!(
            running,
            pb::RotationJob {
                job_id: "dek-acme-v3".into(),
                kind: "tenant-key".into(),
                state: "running".into(),
                done: 5,
                total: 9,
                skipped: 1,
                tenant_id: "acme".into(),
                target_version: 3,
                created_at_ms: 100,
                finished_at_ms: 0,
            }
        );
        let done = rotation_job(job(JobState::Done, None, Some(200)));
        assert_eq!((done.state.as_str(), done.tenant_id.as_str()), ("done", ""));
        assert_eq!(done.finished_at_ms, 200);
        // A running job never shows a finish time, whatever the record holds.
        let odd = rotation_job(job(JobState::Running, None, Some(200)));
        assert_eq!(odd.finished_at_ms, 0);
        for (kind, name) in [
            (JobKind::Kek, "kek"),
            (JobKind::TenantKey, "tenant-key"),
            (JobKind::RootKey, "root-key"),
        ] {
            let pb = rotation_job(RotationJob {
                kind,
                ..job(JobState::Done, None, Some(1))
            });
            assert_eq!(pb.kind, name);
        }
    }

    fn receipt() -> DeletionReceipt {
        DeletionReceipt {
            requested_at_ms: 100,
            requested_by: "spiffe://credvault/settings/ui".into(),
            keys_destroyed_at_ms: 200,
            shredded_at_ms: 300,
            destroyed_dek_versions: vec![1, 2],
            purged_credentials: 4,
            purged_versions: 9,
        }
    }

    #[test]
    fn an_active_tenant_shows_zero_and_empty_for_what_is_not_set() {
        let active = tenant_status(TenantStatus {
            tenant: "acme".into(),
            state: "active",
            deleted_at_ms: None,
            deleted_by: None,
            shred_after_ms: None,
            legal_hold: false,
            legal_hold_reason: None,
            receipt: None,
        });
        assert_eq!(
            active,
            pb::TenantStatus {
                tenant_id: "acme".into(),
                state: "active".into(),
                ..Default::default()
            }
        );
    }

    #[test]
    fn a_deleted_held_tenant_shows_every_field() {
        let deleted = tenant_status(TenantStatus {
            tenant: "acme".into(),
            state: "deleted",
            deleted_at_ms: Some(100),
            deleted_by: Some("spiffe://credvault/settings/ui".into()),
            shred_after_ms: Some(700),
            legal_hold: true,
            legal_hold_reason: Some("case 42".into()),
            receipt: None,
        });
        assert_eq!(
            deleted,
            pb::TenantStatus {
                tenant_id: "acme".into(),
                state: "deleted".into(),
                deleted_at_ms: 100,
                deleted_by: "spiffe://credvault/settings/ui".into(),
                shred_after_ms: 700,
                legal_hold: true,
                legal_hold_reason: "case 42".into(),
                receipt: None,
            }
        );
    }

    #[test]
    fn a_shredded_tenant_carries_its_receipt() {
        let shredded = tenant_status(TenantStatus {
            tenant: "acme".into(),
            state: "shredded",
            deleted_at_ms: Some(100),
            deleted_by: Some("spiffe://credvault/settings/ui".into()),
            shred_after_ms: None,
            legal_hold: false,
            legal_hold_reason: None,
            receipt: Some(receipt()),
        });
        assert_eq!(shredded.state, "shredded");
        assert_eq!(shredded.shred_after_ms, 0);
        assert_eq!(
            shredded.receipt,
            Some(pb::DeletionReceipt {
                requested_at_ms: 100,
                requested_by: "spiffe://credvault/settings/ui".into(),
                keys_destroyed_at_ms: 200,
                shredded_at_ms: 300,
                destroyed_dek_versions: vec![1, 2],
                purged_credentials: 4,
                purged_versions: 9,
            })
        );
    }

    #[test]
    fn events_keep_their_kind_and_tenant_wide_ones_name_no_credential() {
        use pb::revocation_event::Kind as K;
        let revoked = event(Event {
            sequence: 7,
            kind: EventKind::CredentialRevoked,
            tenant: "acme".into(),
            credential: Some("gmail/alice".into()),
            at_ms: 1234,
        });
        assert_eq!(
            revoked,
            pb::RevocationEvent {
                sequence: 7,
                tenant_id: "acme".into(),
                credential_id: "gmail/alice".into(),
                kind: K::CredentialRevoked as i32,
                at_ms: 1234,
            }
        );
        for (kind, wire) in [
            (EventKind::Unspecified, K::Unspecified),
            (EventKind::TenantDisabled, K::TenantDisabled),
            (EventKind::TenantRestored, K::TenantRestored),
            (EventKind::TenantShredded, K::TenantShredded),
        ] {
            let e = event(Event {
                sequence: 8,
                kind,
                tenant: "acme".into(),
                credential: None,
                at_ms: 1,
            });
            assert_eq!((e.kind, e.credential_id.as_str()), (wire as i32, ""));
        }
        // The wire numbers are the stored ones (both are part of a contract).
        for kind in [
            EventKind::CredentialRevoked,
            EventKind::TenantDisabled,
            EventKind::TenantRestored,
            EventKind::TenantShredded,
        ] {
            assert_eq!(event_kind(kind) as i32, kind as i32);
        }
    }

    #[test]
    fn a_keepalive_carries_only_the_position_and_time() {
        assert_eq!(
            keepalive(41, 99),
            pb::RevocationEvent {
                sequence: 41,
                tenant_id: String::new(),
                credential_id: String::new(),
                kind: pb::revocation_event::Kind::Keepalive as i32,
                at_ms: 99,
            }
        );
    }
}
