//! Tenant lifecycle and the revocation event log at the library level, over a
//! real sled store: deletion disables at once, restore brings everything back,
//! the shred (after the grace period on an injectable clock) destroys the keys
//! first and purges the records, legal hold blocks it, an interrupted shred
//! resumes, and every change is an event in commit order.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use credvault::error::{Error, Invalid};
use credvault::store::records::{EventKind, KeyState};
use credvault::store::{Batch, Store, layout};
use credvault::vault::{Kind, RotationOptions, VaultOptions};

use common::{SplitMix, TestVault, request};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

async fn filled(
    tenants: usize,
    per_tenant: usize,
) -> (TestVault, BTreeMap<(String, String), Vec<u8>>) {
    let tv = TestVault::new(VaultOptions {
        rotation: RotationOptions {
            batch_size: 8,
            ..RotationOptions::default()
        },
        ..VaultOptions::default()
    })
    .await;
    let mut expected = BTreeMap::new();
    for t in 0..tenants {
        for c in 0..per_tenant {
            let (tenant, credential) = (format!("tenant-{t}"), format!("cred/{c}"));
            let secret = SplitMix::from_str(&format!("{tenant}/{credential}")).bytes(100 + c);
            tv.vault()
                .seal(request(&tenant, &credential, Kind::CookieJar, &secret))
                .await
                .unwrap();
            expected.insert((tenant, credential), secret);
        }
    }
    (tv, expected)
}

async fn assert_tenant_unseals(
    tv: &TestVault,
    expected: &BTreeMap<(String, String), Vec<u8>>,
    tenant: &str,
) {
    for ((t, c), secret) in expected.iter().filter(|((t, _), _)| t == tenant) {
        let got = tv.vault().unseal(t, c, None).await.unwrap();
        assert_eq!(got.secret.expose(), secret.as_slice());
    }
}

#[tokio::test]
async fn deletion_disables_at_once_and_restore_brings_everything_back() {
    let (tv, expected) = filled(2, 5).await;
    let vault = tv.vault();
    let status = vault
        .delete_tenant("tenant-0", None, "settings-ui", None)
        .await
        .unwrap();
    assert_eq!(status.state, "deleted");
    assert_eq!(status.shred_after_ms, Some(common::T0 + 7 * DAY_MS));
    assert_eq!(status.deleted_by.as_deref(), Some("settings-ui"));

    assert!(matches!(
        vault.unseal("tenant-0", "cred/1", None).await,
        Err(Error::TenantDeleted)
    ));
    assert!(matches!(
        vault.unseal("tenant-0", "no-such", None).await,
        Err(Error::TenantDeleted)
    ));
    assert!(matches!(
        vault
            .seal(request("tenant-0", "new", Kind::ApiKey, b"x"))
            .await,
        Err(Error::TenantDeleted)
    ));
    assert!(matches!(
        vault.rotate_tenant_key("tenant-0", true).await,
        Err(Error::TenantDeleted)
    ));
    // The other tenant is untouched.
    assert_tenant_unseals(&tv, &expected, "tenant-1").await;
    // Deleting again changes nothing (not even the grace period).
    let again = vault
        .delete_tenant("tenant-0", Some(0), "someone-else", None)
        .await
        .unwrap();
    assert_eq!(again.shred_after_ms, status.shred_after_ms);
    assert!(matches!(
        vault
            .delete_tenant("tenant-1", Some(31 * DAY_MS), "x", None)
            .await,
        Err(Error::Invalid(Invalid::Grace))
    ));
    assert!(matches!(
        vault.delete_tenant("nobody", None, "x", None).await,
        Err(Error::NotFound)
    ));

    // Within the grace period: restore, and it is all there.
    tv.clock.advance_ms(6 * DAY_MS);
    assert!(vault.run_shredder().await.unwrap().is_empty());
    let restored = vault.restore_tenant("tenant-0", None).await.unwrap();
    assert_eq!(restored.state, "active");
    assert_tenant_unseals(&tv, &expected, "tenant-0").await;
    vault
        .seal(request("tenant-0", "new", Kind::ApiKey, b"after restore"))
        .await
        .unwrap();
    assert!(matches!(
        vault.restore_tenant("tenant-0", None).await,
        Err(Error::TenantNotDeleted)
    ));
    // Long after: nothing is shredded (the restore cancelled it).
    tv.clock.advance_ms(60 * DAY_MS);
    assert!(vault.run_shredder().await.unwrap().is_empty());
    assert_tenant_unseals(&tv, &expected, "tenant-0").await;

    let page = vault.events_after(0, None, 100).unwrap();
    let kinds: Vec<_> = page
        .events
        .iter()
        .map(|e| (e.kind, e.tenant.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (EventKind::TenantDisabled, "tenant-0"),
            (EventKind::TenantRestored, "tenant-0")
        ]
    );
    assert_eq!(vault.last_event_sequence(), 2);
}

#[tokio::test]
async fn the_shred_destroys_the_keys_then_purges_and_leaves_a_receipt() {
    let (mut tv, expected) = filled(2, 12).await;
    // A second version and a revoked credential, so there is more to purge.
    tv.vault()
        .seal(request("tenant-0", "cred/0", Kind::CookieJar, b"v2"))
        .await
        .unwrap();
    tv.vault()
        .revoke("tenant-0", "cred/11", "test", "gone")
        .await
        .unwrap();
    tv.vault()
        .rotate_tenant_key("tenant-0", false)
        .await
        .unwrap();
    // What a copy of the store holds before the shred.
    let saved: Vec<_> = tv
        .store()
        .scan(b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with(&layout::tenant_versions_prefix("tenant-0"))
                || k.starts_with(&layout::head_prefix("tenant-0"))
                || k == &layout::tenant("tenant-0")
        })
        .collect();
    let kek_wraps_before = tv.vault().key_status(None).unwrap().keks[0].wrapped_deks;

    tv.vault()
        .delete_tenant("tenant-0", Some(DAY_MS), "settings-ui", None)
        .await
        .unwrap();
    tv.clock.advance_ms(DAY_MS);
    assert_eq!(tv.vault().run_shredder().await.unwrap(), ["tenant-0"]);

    let status = tv.vault().tenant_status("tenant-0").unwrap();
    assert_eq!(status.state, "shredded");
    let receipt = status.receipt.unwrap();
    assert_eq!(receipt.requested_at_ms, common::T0);
    assert_eq!(receipt.shredded_at_ms, common::T0 + DAY_MS);
    assert_eq!(receipt.destroyed_dek_versions, [1, 2]);
    assert_eq!(receipt.purged_credentials, 12);
    assert_eq!(receipt.purged_versions, 13);
    // Nothing of the tenant is left but its receipt.
    let left: Vec<_> = tv
        .store()
        .scan(b"", None, usize::MAX)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k.windows(8).any(|w| w == b"tenant-0"))
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left, [layout::receipt("tenant-0")]);
    // The KEK no longer counts its two DEKs; the other tenant is untouched.
    assert_eq!(
        tv.vault().key_status(None).unwrap().keks[0].wrapped_deks,
        kek_wraps_before - 2
    );
    assert_tenant_unseals(&tv, &expected, "tenant-1").await;
    // The tenant stays deleted: no seal, no unseal, no restore.
    assert!(matches!(
        tv.vault().unseal("tenant-0", "cred/1", None).await,
        Err(Error::TenantDeleted)
    ));
    assert!(matches!(
        tv.vault()
            .seal(request("tenant-0", "again", Kind::ApiKey, b"x"))
            .await,
        Err(Error::TenantDeleted)
    ));
    assert!(matches!(
        tv.vault().restore_tenant("tenant-0", None).await,
        Err(Error::TenantShredded)
    ));

    // Its records written back from the copy (the tenant record too, so the
    // vault even tries): they no longer open, the keys are gone.
    let mut batch = Batch::default();
    for (k, v) in &saved {
        batch.put(k.clone(), v.clone());
    }
    tv.store().commit(batch).await.unwrap();
    tv.reopen().await;
    for c in 0..11 {
        let got = tv
            .vault()
            .unseal("tenant-0", &format!("cred/{c}"), None)
            .await;
        assert!(
            matches!(got, Err(Error::DecryptionFailed)),
            "cred/{c}: {:?}",
            got.map(|u| u.metadata)
        );
    }
    let events = tv.vault().events_after(0, Some("tenant-0"), 100).unwrap();
    let kinds: Vec<_> = events.events.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [
            EventKind::CredentialRevoked,
            EventKind::TenantDisabled,
            EventKind::TenantShredded
        ]
    );
}

#[tokio::test]
async fn legal_hold_blocks_the_shred_until_released() {
    let (tv, expected) = filled(1, 3).await;
    let vault = tv.vault();
    vault
        .delete_tenant("tenant-0", Some(0), "settings-ui", None)
        .await
        .unwrap();
    let held = vault
        .set_legal_hold("tenant-0", true, "case 42", "legal", None)
        .await
        .unwrap();
    assert!(held.legal_hold);
    assert_eq!(held.legal_hold_reason.as_deref(), Some("case 42"));
    tv.clock.advance_ms(90 * DAY_MS);
    assert!(vault.run_shredder().await.unwrap().is_empty());
    assert_eq!(vault.tenant_status("tenant-0").unwrap().state, "deleted");
    // Still disabled while held.
    assert!(matches!(
        vault.unseal("tenant-0", "cred/0", None).await,
        Err(Error::TenantDeleted)
    ));
    // Held data can still be restored intact.
    assert_eq!(vault.dek_states("tenant-0").unwrap()[&1], KeyState::Active);
    vault
        .set_legal_hold("tenant-0", false, "", "legal", None)
        .await
        .unwrap();
    assert_eq!(vault.run_shredder().await.unwrap(), ["tenant-0"]);
    assert!(matches!(
        vault
            .set_legal_hold("tenant-0", true, "too late", "legal", None)
            .await,
        Err(Error::TenantShredded)
    ));
    let _ = expected;
}

#[tokio::test]
async fn an_interrupted_shred_resumes_and_counts_every_record_once() {
    let (mut tv, _) = filled(1, 60).await;
    // Purge batches of 8, and after the first one a pause far longer than the test waits.
    tv.options.rotation.batch_pause_ms = 600_000;
    tv.reopen().await;
    tv.vault()
        .delete_tenant("tenant-0", Some(0), "ops", None)
        .await
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(5), tv.vault().run_shredder()).await;
    assert!(stopped.is_err(), "the shred must still be pausing");
    // Stopped as a crash would: keys destroyed, one purge batch done, the rest left.
    tv.options.rotation.batch_pause_ms = 0;
    tv.reopen().await;
    let mid = tv.vault().tenant_status("tenant-0").unwrap();
    assert_eq!(mid.state, "shredding");
    assert_eq!(
        tv.store()
            .scan(&layout::head_prefix("tenant-0"), None, usize::MAX)
            .unwrap()
            .len(),
        52
    );
    assert_eq!(tv.vault().run_shredder().await.unwrap(), ["tenant-0"]);
    let receipt = tv
        .vault()
        .tenant_status("tenant-0")
        .unwrap()
        .receipt
        .unwrap();
    assert_eq!(
        (receipt.purged_credentials, receipt.purged_versions),
        (60, 60)
    );
    assert!(
        tv.store()
            .scan(&layout::tenant_versions_prefix("tenant-0"), None, 1)
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn events_come_in_order_from_any_sequence_and_pruned_ones_say_resync() {
    let (tv, _) = filled(3, 4).await;
    let vault = tv.vault();
    let mut watcher = vault.subscribe_events();
    for c in 0..4 {
        vault
            .revoke(&format!("tenant-{}", c % 3), &format!("cred/{c}"), "t", "r")
            .await
            .unwrap();
        tv.clock.advance_ms(DAY_MS);
    }
    assert!(watcher.has_changed().unwrap());
    assert_eq!(*watcher.borrow_and_update(), 4);
    // Revoking a revoked credential is not a new event.
    vault.revoke("tenant-0", "cred/0", "t", "r").await.unwrap();
    assert_eq!(vault.last_event_sequence(), 4);

    let all = vault.events_after(0, None, 100).unwrap();
    assert_eq!(
        all.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(all.events[1].credential.as_deref(), Some("cred/1"));
    // From the middle; and a tenant filter still moves the cursor to the end.
    let rest = vault.events_after(2, None, 100).unwrap();
    assert_eq!(rest.events.len(), 2);
    let only = vault.events_after(0, Some("tenant-0"), 100).unwrap();
    assert_eq!(
        only.events.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 4]
    );
    assert_eq!(only.read_to, 4);
    let page = vault.events_after(0, None, 3).unwrap();
    assert_eq!((page.events.len(), page.read_to), (3, 3));

    // Prune what is older than 2 days: events 1 and 2 go; asking from 0 or 1
    // is a clear "resync"; from 2 still works.
    assert_eq!(
        vault.prune_events(common::T0 + 2 * DAY_MS).await.unwrap(),
        2
    );
    assert!(matches!(
        vault.events_after(1, None, 10),
        Err(Error::EventsPruned {
            after: 1,
            oldest: 3
        })
    ));
    assert_eq!(vault.events_after(2, None, 10).unwrap().events.len(), 2);
    // The newest event is never pruned, so numbering continues after a restart.
    assert_eq!(vault.prune_events(u64::MAX).await.unwrap(), 1);
    drop(watcher);
    let mut tv = tv;
    tv.reopen().await;
    assert_eq!(tv.vault().last_event_sequence(), 4);
    tv.vault()
        .revoke("tenant-1", "cred/2", "t", "r")
        .await
        .unwrap();
    assert_eq!(tv.vault().last_event_sequence(), 5);
}

/// Every file under `dir`, recursively.
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// The key bytes themselves are never written (only wrapped), before or after;
/// after the shred no live record holds even the wrapped form. sled's log may
/// keep stale wrapped copies until it reuses the segment: they open only with a
/// KEK that the root key opens, which is why the runbook rotates and destroys
/// those after a shred (docs/threat-model.md, "What stays on disk").
#[tokio::test]
async fn after_the_shred_no_store_file_holds_the_bytes_of_its_data_keys() {
    use credvault::crypto::SymmetricKey;
    use credvault::crypto::envelope::{self, Context};
    use credvault::store::records::{DekRecord, KekRecord};
    use prost::Message;

    let (mut tv, _) = filled(1, 20).await;
    tv.vault()
        .rotate_tenant_key("tenant-0", false)
        .await
        .unwrap();
    // The data keys' bytes, unwrapped here (root key → KEK → DEK) from the
    // records as they were before the shred, as an attacker with the root key would.
    let root = common::key(&tv.root);
    let mut deks = Vec::new();
    for (_, bytes) in tv
        .store()
        .scan(&layout::dek_prefix("tenant-0"), None, usize::MAX)
        .unwrap()
    {
        let dek = DekRecord::decode(bytes.as_slice()).unwrap();
        let kek = KekRecord::decode(
            tv.store()
                .get(&layout::kek(dek.kek_version))
                .unwrap()
                .unwrap()
                .as_slice(),
        )
        .unwrap();
        let kek = envelope::open(&root, &Context::kek_wrap(kek.version), &kek.wrapped).unwrap();
        let kek = SymmetricKey::from_slice(&kek).unwrap();
        let material = envelope::open(
            &kek,
            &Context::dek_wrap("tenant-0", dek.version, dek.kek_version),
            &dek.wrapped,
        )
        .unwrap();
        deks.push(material.to_vec());
    }
    assert_eq!(deks.len(), 2);

    tv.vault()
        .delete_tenant("tenant-0", Some(0), "ops", None)
        .await
        .unwrap();
    assert_eq!(tv.vault().run_shredder().await.unwrap(), ["tenant-0"]);
    assert!(
        tv.store()
            .scan(&layout::dek_prefix("tenant-0"), None, 1)
            .unwrap()
            .is_empty()
    );
    tv.close();
    let files = files_under(&tv.path);
    assert!(!files.is_empty());
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        for dek in &deks {
            assert!(
                !common::contains(&bytes, dek),
                "a data key's bytes are in {}",
                file.display()
            );
        }
    }
}
