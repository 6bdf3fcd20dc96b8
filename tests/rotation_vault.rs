//! Rotation at the library level: KEK rewrap, tenant re-encryption and root
//! key rotation as jobs over a real sled store; destroy refused while the
//! ledger says something depends on a version; jobs resume after an
//! interrupted run; concurrent seals and revokes are never undone by a
//! re-encryption; schedules fire on an injectable clock.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use credvault::crypto::SymmetricKey;
use credvault::error::{Error, Invalid};
use credvault::store::Store;
use credvault::store::records::KeyState;
use credvault::vault::{JobKind, JobState, KeyLayer, Kind, RotationOptions, Vault, VaultOptions};

use common::{SplitMix, TestVault, request};

const DAY_MS: u64 = 24 * 60 * 60 * 1000;

fn options(batch_size: usize) -> VaultOptions {
    VaultOptions {
        rotation: RotationOptions {
            batch_size,
            ..RotationOptions::default()
        },
        ..VaultOptions::default()
    }
}

/// Seals `per_tenant` credentials in each of `tenants` tenants; returns what each must unseal to.
async fn fill(
    vault: &Vault,
    tenants: usize,
    per_tenant: usize,
) -> BTreeMap<(String, String), Vec<u8>> {
    let mut expected = BTreeMap::new();
    for t in 0..tenants {
        for c in 0..per_tenant {
            let (tenant, credential) = (format!("tenant-{t}"), format!("cred/{c}"));
            let secret = SplitMix::from_str(&format!("{tenant}/{credential}")).bytes(64 + c);
            vault
                .seal(request(&tenant, &credential, Kind::CookieJar, &secret))
                .await
                .unwrap();
            expected.insert((tenant, credential), secret);
        }
    }
    expected
}

async fn assert_all_unseal(vault: &Vault, expected: &BTreeMap<(String, String), Vec<u8>>) {
    for ((tenant, credential), secret) in expected {
        let got = vault
            .unseal(tenant, credential, None)
            .await
            .unwrap_or_else(|e| panic!("{tenant}/{credential}: {e}"));
        assert_eq!(
            got.secret.expose(),
            secret.as_slice(),
            "{tenant}/{credential}"
        );
    }
}

fn kek(vault: &Vault, version: u32) -> credvault::vault::KekStatus {
    vault
        .key_status(None)
        .unwrap()
        .keks
        .into_iter()
        .find(|k| k.version == version)
        .unwrap()
}

fn dek(vault: &Vault, tenant: &str, version: u32) -> credvault::vault::DekStatus {
    vault
        .key_status(Some(tenant))
        .unwrap()
        .deks
        .into_iter()
        .find(|d| d.version == version)
        .unwrap()
}

#[tokio::test]
async fn kek_rotation_rewraps_every_dek_and_then_the_old_kek_can_be_destroyed() {
    let mut tv = TestVault::new(options(7)).await;
    let expected = fill(tv.vault(), 30, 2).await;
    let vault = tv.vault();

    let job = vault.rotate_kek().await.unwrap();
    assert_eq!(
        (job.id.as_str(), job.kind, job.state, job.target_version),
        ("kek-v2", JobKind::Kek, JobState::Running, 2)
    );
    assert_eq!((job.done, job.total), (0, 30));
    assert_eq!(vault.kek_states()[&1], KeyState::DecryptOnly);
    assert_eq!(vault.kek_states()[&2], KeyState::Active);
    assert!(kek(vault, 1).retired_at_ms.is_some());

    // Before the rewrap, KEK v1 still wraps all 30 DEKs: destroy is refused with the count.
    match vault.destroy_key_version(KeyLayer::Kek, None, 1).await {
        Err(e @ Error::KeyInUse { count: 30, .. }) => {
            assert!(e.to_string().contains("30 data keys"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        vault.destroy_key_version(KeyLayer::Kek, None, 2).await,
        Err(Error::PrimaryKey { version: 2, .. })
    ));

    assert_eq!(vault.run_jobs().await.unwrap(), 1);
    let job = vault.rotation_job("kek-v2").unwrap();
    assert_eq!((job.state, job.done, job.total), (JobState::Done, 30, 30));
    assert!(job.finished_at_ms.is_some());
    assert_eq!(kek(vault, 1).wrapped_deks, 0);
    assert_eq!(kek(vault, 2).wrapped_deks, 30);
    assert_eq!(kek(vault, 2).encryptions, 30);
    let status = vault.key_status(None).unwrap();
    assert!(status.deks.iter().all(|d| d.kek_version == 2));

    vault
        .destroy_key_version(KeyLayer::Kek, None, 1)
        .await
        .unwrap();
    // Idempotent.
    vault
        .destroy_key_version(KeyLayer::Kek, None, 1)
        .await
        .unwrap();
    let destroyed = kek(vault, 1);
    assert_eq!(destroyed.state, KeyState::Destroyed);
    assert!(destroyed.destroyed_at_ms.is_some());
    let record = tv
        .store()
        .get(&credvault::store::layout::kek(1))
        .unwrap()
        .unwrap();
    let record: credvault::store::records::KekRecord = prost::Message::decode(&*record).unwrap();
    assert!(record.wrapped.is_empty(), "destroyed KEK bytes are gone");

    assert_all_unseal(tv.vault(), &expected).await;
    // Nothing needs KEK v1 any more, after a restart either.
    tv.reopen().await;
    assert_all_unseal(tv.vault(), &expected).await;
    let sealed = tv
        .seal("tenant-new", "x", Kind::ApiKey, b"after destroy")
        .await;
    assert_eq!(sealed, 1);
    assert_eq!(kek(tv.vault(), 2).wrapped_deks, 31);
}

#[tokio::test]
async fn tenant_reencryption_moves_every_live_version_and_leaves_others_alone() {
    let tv = TestVault::new(options(16)).await;
    let mut expected = fill(tv.vault(), 2, 40).await;
    let vault = tv.vault();
    // A second version of some credentials, and one revoked credential.
    for c in 0..5 {
        let (tenant, credential) = ("tenant-0".to_string(), format!("cred/{c}"));
        let secret = format!("v2 of {c}").into_bytes();
        vault
            .seal(request(&tenant, &credential, Kind::ApiKey, &secret))
            .await
            .unwrap();
        expected.insert((tenant, credential), secret);
    }
    vault
        .revoke("tenant-0", "cred/39", "test", "gone")
        .await
        .unwrap();
    expected.remove(&("tenant-0".into(), "cred/39".into()));
    assert_eq!(dek(vault, "tenant-0", 1).protected_versions, 44);

    let job = vault.rotate_tenant_key("tenant-0", true).await.unwrap();
    assert_eq!(
        (job.id.as_str(), job.kind, job.tenant.as_deref(), job.total),
        ("dek-tenant-0-v2", JobKind::TenantKey, Some("tenant-0"), 44)
    );
    // Refused while referenced, with the count.
    assert!(matches!(
        vault
            .destroy_key_version(KeyLayer::Dek, Some("tenant-0"), 1)
            .await,
        Err(Error::KeyInUse { count: 44, .. })
    ));
    // New seals use the new DEK at once.
    let meta = vault
        .seal(request("tenant-0", "new", Kind::ApiKey, b"fresh"))
        .await
        .unwrap();
    assert_eq!(meta.dek_version, 2);
    expected.insert(("tenant-0".into(), "new".into()), b"fresh".to_vec());

    vault.run_jobs().await.unwrap();
    let job = vault.rotation_job("dek-tenant-0-v2").unwrap();
    assert_eq!((job.state, job.done, job.total), (JobState::Done, 44, 44));
    assert_eq!(dek(vault, "tenant-0", 1).protected_versions, 0);
    assert_eq!(dek(vault, "tenant-0", 2).protected_versions, 45);
    assert_eq!(dek(vault, "tenant-0", 2).encryptions, 45);
    // The other tenant was not touched.
    assert_eq!(dek(vault, "tenant-1", 1).protected_versions, 40);
    assert_eq!(dek(vault, "tenant-1", 1).state, KeyState::Active);

    vault
        .destroy_key_version(KeyLayer::Dek, Some("tenant-0"), 1)
        .await
        .unwrap();
    assert_eq!(dek(vault, "tenant-0", 1).state, KeyState::Destroyed);
    // The destroyed DEK no longer counts as wrapped by its KEK.
    assert_eq!(kek(vault, 1).wrapped_deks, 2);
    assert_all_unseal(vault, &expected).await;
    // Old versions re-encrypted too (version 1 of a credential with two).
    let old = vault.unseal("tenant-0", "cred/0", Some(1)).await.unwrap();
    assert_eq!(
        old.secret.expose(),
        SplitMix::from_str("tenant-0/cred/0").bytes(64)
    );
    assert_eq!(old.metadata.dek_version, 2);
    // The revoked one stays revoked.
    assert!(matches!(
        vault.unseal("tenant-0", "cred/39", None).await,
        Err(Error::Revoked)
    ));

    // Rotating without re-encryption: a done job with nothing to do.
    let job = vault.rotate_tenant_key("tenant-1", false).await.unwrap();
    assert_eq!((job.state, job.done, job.total), (JobState::Done, 0, 0));
    assert_eq!(dek(vault, "tenant-1", 1).state, KeyState::DecryptOnly);
    assert_eq!(dek(vault, "tenant-1", 1).protected_versions, 40);
}

#[tokio::test]
async fn destroy_and_job_lookups_validate_their_input() {
    let tv = TestVault::new(options(8)).await;
    fill(tv.vault(), 1, 1).await;
    let vault = tv.vault();
    assert!(matches!(
        vault.destroy_key_version(KeyLayer::Root, None, 1).await,
        Err(Error::Invalid(Invalid::KeyLayer))
    ));
    assert!(matches!(
        vault.destroy_key_version(KeyLayer::Kek, None, 0).await,
        Err(Error::Invalid(Invalid::Version))
    ));
    assert!(matches!(
        vault.destroy_key_version(KeyLayer::Kek, None, 9).await,
        Err(Error::KeyNotFound)
    ));
    assert!(matches!(
        vault.destroy_key_version(KeyLayer::Dek, None, 1).await,
        Err(Error::Invalid(Invalid::TenantId))
    ));
    assert!(matches!(
        vault
            .destroy_key_version(KeyLayer::Dek, Some("bad tenant!"), 1)
            .await,
        Err(Error::Invalid(Invalid::TenantId))
    ));
    assert!(matches!(
        vault
            .destroy_key_version(KeyLayer::Dek, Some("tenant-0"), 7)
            .await,
        Err(Error::KeyNotFound)
    ));
    assert!(matches!(
        vault.rotate_tenant_key("nobody", true).await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        vault.rotation_job("kek-v9"),
        Err(Error::JobNotFound)
    ));
    assert!(matches!(
        vault.rotation_job(""),
        Err(Error::Invalid(Invalid::JobId))
    ));
    assert!(vault.rotation_jobs().unwrap().is_empty());
}

#[tokio::test]
async fn root_rotation_switches_the_check_value_and_the_old_key_is_refused() {
    let mut tv = TestVault::new(options(8)).await;
    let expected = fill(tv.vault(), 3, 3).await;
    tv.vault().rotate_kek().await.unwrap();
    let old_root = tv.root;

    // The key in use is refused, and nothing changes.
    assert!(matches!(
        tv.vault().rotate_root_key(common::key(&old_root)).await,
        Err(Error::SameRootKey)
    ));
    assert_eq!(tv.vault().root_version(), 1);

    let new_root = *SymmetricKey::generate().expose_bytes();
    let job = tv
        .vault()
        .rotate_root_key(common::key(&new_root))
        .await
        .unwrap();
    assert_eq!(
        (job.id.as_str(), job.kind, job.state, job.done, job.total),
        ("root-v2", JobKind::RootKey, JobState::Done, 2, 2)
    );
    assert_eq!(tv.vault().root_version(), 2);
    // A retired root key cannot be brought back (destroying it must erase its backups).
    assert!(matches!(
        tv.vault().rotate_root_key(common::key(&old_root)).await,
        Err(Error::SameRootKey)
    ));
    assert_eq!(tv.vault().root_version(), 2);
    // The running vault keeps working, and new KEKs are wrapped under the new root.
    assert_all_unseal(tv.vault(), &expected).await;
    tv.vault().rotate_kek().await.unwrap();
    tv.vault().run_jobs().await.unwrap();
    assert_eq!(tv.vault().key_status(None).unwrap().root.version, 2);

    // Restarting with the old key: refused, saying it is the retired one.
    tv.close();
    let store = common::open_store(&tv.path);
    match common::open_vault(&store, &old_root, &tv.clock, tv.options.clone()).await {
        Err(e @ Error::RetiredRootKey { current: 2 }) => {
            assert!(e.to_string().contains("retired root key"), "{e}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let stranger = *SymmetricKey::generate().expose_bytes();
    assert!(matches!(
        common::open_vault(&store, &stranger, &tv.clock, tv.options.clone()).await,
        Err(Error::WrongRootKey)
    ));
    tv.store = Some(store);
    // With the new one, everything opens.
    tv.root = new_root;
    tv.reopen().await;
    assert_all_unseal(tv.vault(), &expected).await;
}

#[tokio::test]
async fn an_interrupted_job_resumes_from_its_last_batch_without_double_counting() {
    let mut tv = TestVault::new(VaultOptions {
        rotation: RotationOptions {
            batch_size: 4,
            // After its first batch the job pauses far longer than the test waits.
            batch_pause_ms: 600_000,
            ..RotationOptions::default()
        },
        ..VaultOptions::default()
    })
    .await;
    let expected = fill(tv.vault(), 40, 1).await;
    let job = tv.vault().rotate_kek().await.unwrap();
    // Stop the job after one batch, as a restart would (each batch is atomic).
    let stopped = tokio::time::timeout(Duration::from_secs(5), tv.vault().run_jobs()).await;
    assert!(stopped.is_err(), "the job must still be pausing");
    let partial = tv.vault().rotation_job(&job.id).unwrap();
    assert_eq!(partial.state, JobState::Running);
    assert_eq!(partial.done, 4);
    assert_eq!(
        kek(tv.vault(), 1).wrapped_deks + kek(tv.vault(), 2).wrapped_deks,
        40
    );
    tv.options.rotation.batch_pause_ms = 0;
    tv.reopen().await;
    assert_eq!(tv.vault().run_jobs().await.unwrap(), 1);
    let job = tv.vault().rotation_job(&job.id).unwrap();
    assert_eq!((job.state, job.done, job.total), (JobState::Done, 40, 40));
    assert_eq!(kek(tv.vault(), 1).wrapped_deks, 0);
    assert_eq!(kek(tv.vault(), 2).wrapped_deks, 40);
    assert_eq!(kek(tv.vault(), 2).encryptions, 40);
    assert_all_unseal(tv.vault(), &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reencryption_never_undoes_a_concurrent_seal_or_revoke() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path());
    let root = *SymmetricKey::generate().expose_bytes();
    let clock = Arc::new(credvault::clock::ManualClock::new(common::T0));
    let vault = Arc::new(
        common::open_vault(&store, &root, &clock, options(3))
            .await
            .unwrap(),
    );
    let expected = fill(&vault, 1, 120).await;
    let job = vault.rotate_tenant_key("tenant-0", true).await.unwrap();
    let jobs = {
        let vault = vault.clone();
        tokio::spawn(async move { vault.run_jobs().await })
    };
    // Meanwhile: new versions of even credentials, revocations of every 7th.
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let vault = vault.clone();
            tokio::spawn(async move {
                let mut sealed = BTreeMap::new();
                let mut revoked = Vec::new();
                for c in (w as usize..120).step_by(4) {
                    let credential = format!("cred/{c}");
                    if c % 7 == 0 {
                        vault
                            .revoke("tenant-0", &credential, "test", "race")
                            .await
                            .unwrap();
                        revoked.push(credential);
                    } else if c % 2 == 0 {
                        let secret = format!("new {c}").into_bytes();
                        vault
                            .seal(request("tenant-0", &credential, Kind::ApiKey, &secret))
                            .await
                            .unwrap();
                        sealed.insert(credential, secret);
                    }
                }
                (sealed, revoked)
            })
        })
        .collect();
    let mut latest: BTreeMap<String, Option<Vec<u8>>> = expected
        .into_iter()
        .map(|((_, c), s)| (c, Some(s)))
        .collect();
    for writer in writers {
        let (sealed, revoked) = writer.await.unwrap();
        for (c, s) in sealed {
            latest.insert(c, Some(s));
        }
        for c in revoked {
            latest.insert(c, None);
        }
    }
    jobs.await.unwrap().unwrap();
    vault.run_jobs().await.unwrap();
    let job = vault.rotation_job(&job.id).unwrap();
    assert_eq!(job.state, JobState::Done);
    assert!(job.done <= 120, "{job:?}");
    for (credential, want) in &latest {
        match (want, vault.unseal("tenant-0", credential, None).await) {
            (Some(secret), Ok(got)) => assert_eq!(got.secret.expose(), secret.as_slice()),
            (None, Err(Error::Revoked)) => {}
            (want, got) => panic!(
                "{credential}: want {:?}, got {:?}",
                want.as_ref().map(Vec::len),
                got.map(|u| u.metadata)
            ),
        }
    }
    // Nothing live is left under DEK v1, and the ledger agrees.
    assert_eq!(dek(&vault, "tenant-0", 1).protected_versions, 0);
    let live: u64 = vault
        .key_status(Some("tenant-0"))
        .unwrap()
        .deks
        .iter()
        .map(|d| d.protected_versions)
        .sum();
    let versions_live = latest.values().filter(|v| v.is_some()).count() as u64
        + latest
            .iter()
            .filter(|(c, v)| v.is_some() && c[5..].parse::<usize>().unwrap() % 2 == 0)
            .count() as u64;
    assert_eq!(live, versions_live);
}

#[tokio::test]
async fn schedules_rotate_on_time_and_destroy_what_retired_long_enough() {
    let tv = TestVault::new(VaultOptions {
        rotation: RotationOptions {
            kek_period_ms: Some(90 * DAY_MS),
            dek_period_ms: Some(30 * DAY_MS),
            reencrypt_on_schedule: true,
            destroy_retired_after_ms: Some(7 * DAY_MS),
            batch_size: 16,
            batch_pause_ms: 0,
        },
        ..VaultOptions::default()
    })
    .await;
    let expected = fill(tv.vault(), 3, 5).await;
    let vault = tv.vault();
    assert!(vault.run_schedules().await.unwrap().is_empty());

    // 30 days: every tenant's DEK is due; the KEK is not.
    tv.clock.advance_ms(30 * DAY_MS);
    let started = vault.run_schedules().await.unwrap();
    let mut ids: Vec<_> = started.iter().map(|j| j.id.as_str()).collect();
    ids.sort();
    assert_eq!(
        ids,
        ["dek-tenant-0-v2", "dek-tenant-1-v2", "dek-tenant-2-v2"]
    );
    vault.run_jobs().await.unwrap();
    assert_eq!(dek(vault, "tenant-0", 1).protected_versions, 0);
    // Retired, but not for 7 days yet: kept.
    tv.clock.advance_ms(6 * DAY_MS);
    assert!(vault.run_schedules().await.unwrap().is_empty());
    assert_eq!(dek(vault, "tenant-0", 1).state, KeyState::DecryptOnly);
    tv.clock.advance_ms(DAY_MS);
    vault.run_schedules().await.unwrap();
    for t in 0..3 {
        assert_eq!(
            dek(vault, &format!("tenant-{t}"), 1).state,
            KeyState::Destroyed
        );
    }

    // Day 90: the KEK is due (and the DEKs, again: 53 days after day 37 is past 30).
    tv.clock.advance_ms(53 * DAY_MS);
    let started = vault.run_schedules().await.unwrap();
    assert!(
        started.iter().any(|j| j.id == "kek-v2"),
        "{:?}",
        started.iter().map(|j| &j.id).collect::<Vec<_>>()
    );
    vault.run_jobs().await.unwrap();
    assert_eq!(kek(vault, 1).wrapped_deks, 0);
    tv.clock.advance_ms(7 * DAY_MS);
    vault.run_schedules().await.unwrap();
    assert_eq!(kek(vault, 1).state, KeyState::Destroyed);
    assert_all_unseal(vault, &expected).await;
}

#[tokio::test]
async fn a_threshold_rotation_of_the_kek_gets_its_rewrap_from_the_schedule() {
    let tv = TestVault::new(VaultOptions {
        rotate_after_encryptions: 4,
        rotation: RotationOptions {
            kek_period_ms: None,
            dek_period_ms: None,
            destroy_retired_after_ms: None,
            ..RotationOptions::default()
        },
        ..VaultOptions::default()
    })
    .await;
    let expected = fill(tv.vault(), 4, 1).await;
    let vault = tv.vault();
    // The 4th DEK wrap crossed the threshold: KEK v2 is primary, v1 wraps 4.
    assert_eq!(vault.kek_states()[&2], KeyState::Active);
    assert_eq!(kek(vault, 1).wrapped_deks, 4);
    let started = vault.run_schedules().await.unwrap();
    assert_eq!(
        started.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["kek-v2"]
    );
    vault.run_jobs().await.unwrap();
    assert_eq!(kek(vault, 1).wrapped_deks, 0);
    // Rewrapping 4 DEKs under v2 crossed its threshold too; the next pass
    // rewraps onto v3, and a finished job is not started again.
    let again = vault.run_schedules().await.unwrap();
    assert!(again.iter().all(|j| j.id != "kek-v2"));
    vault.run_jobs().await.unwrap();
    assert_all_unseal(vault, &expected).await;
}

#[tokio::test]
async fn a_record_that_does_not_open_is_skipped_counted_and_keeps_its_old_key_alive() {
    let tv = TestVault::new(options(4)).await;
    let mut expected = fill(tv.vault(), 1, 10).await;
    // Flip one ciphertext byte of cred/3 in the store.
    let key = credvault::store::layout::latest("tenant-0", "cred/3");
    let bytes = tv.store().get(&key).unwrap().unwrap();
    let mut record: credvault::store::records::VersionRecord =
        prost::Message::decode(&*bytes).unwrap();
    let last = record.ciphertext.len() - 1;
    record.ciphertext[last] ^= 1;
    let mut batch = credvault::store::Batch::default();
    batch.put(key, prost::Message::encode_to_vec(&record));
    tv.store().commit(batch).await.unwrap();
    expected.remove(&("tenant-0".into(), "cred/3".into()));

    let job = tv
        .vault()
        .rotate_tenant_key("tenant-0", true)
        .await
        .unwrap();
    tv.vault().run_jobs().await.unwrap();
    let job = tv.vault().rotation_job(&job.id).unwrap();
    assert_eq!(
        (job.state, job.done, job.skipped, job.total),
        (JobState::Done, 9, 1, 10)
    );
    assert_eq!(dek(tv.vault(), "tenant-0", 1).protected_versions, 1);
    assert!(matches!(
        tv.vault()
            .destroy_key_version(KeyLayer::Dek, Some("tenant-0"), 1)
            .await,
        Err(Error::KeyInUse { count: 1, .. })
    ));
    assert_all_unseal(tv.vault(), &expected).await;
    assert!(matches!(
        tv.vault().unseal("tenant-0", "cred/3", None).await,
        Err(Error::DecryptionFailed)
    ));
}
