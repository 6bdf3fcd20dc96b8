//! Integration tests of the vault over a real sled store with real crypto:
//! round trips, tampering through the store, key-usage counters and rotation,
//! the root key, revocation, compare-and-set, validation, expiry, version
//! pruning, listing and tenant isolation.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use credvault::crypto::SymmetricKey;
use credvault::crypto::envelope;
use credvault::crypto::root::{self, RootKeyError};
use credvault::error::{Error, Invalid};
use credvault::store::records::{DekRecord, KeyState, VersionRecord, VersionState};
use credvault::store::{Batch, Store, layout};
use credvault::vault::{Kind, SealRequest, Secret, Unsealed, VaultOptions};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;

use common::{T0, TestVault, contains, request};

fn small_limit() -> VaultOptions {
    VaultOptions {
        max_secret_bytes: 4096,
        ..VaultOptions::default()
    }
}

/// Writes `value` under `key` directly in the store (as an attacker with disk
/// access would) and returns what was there before.
async fn overwrite(store: &dyn Store, key: &[u8], value: Vec<u8>) -> Option<Vec<u8>> {
    let old = store.get(key).unwrap();
    let mut batch = Batch::default();
    batch.put(key.to_vec(), value);
    store.commit(batch).await.unwrap();
    old
}

/// The key version `v` of a credential is stored under: the latest slot if
/// it is the latest, else its numbered key.
fn stored_key(store: &dyn Store, tenant: &str, credential: &str, v: u32) -> Vec<u8> {
    let latest = layout::latest(tenant, credential);
    match store.get(&latest).unwrap() {
        Some(bytes) if VersionRecord::decode(bytes.as_slice()).unwrap().version == v => latest,
        _ => layout::version(tenant, credential, v),
    }
}

fn version_record(
    store: &dyn Store,
    tenant: &str,
    credential: &str,
    v: u32,
) -> (Vec<u8>, VersionRecord) {
    let bytes = store
        .get(&stored_key(store, tenant, credential, v))
        .unwrap()
        .unwrap_or_else(|| panic!("no record for {tenant}/{credential} v{v}"));
    let record = VersionRecord::decode(bytes.as_slice()).unwrap();
    assert_eq!(record.version, v);
    (bytes, record)
}

/// Asserts that `result` is exactly the opaque decryption failure and returns its message.
#[track_caller]
fn assert_decryption_failed(result: credvault::Result<Unsealed>, what: &str) -> String {
    match result {
        Err(e @ Error::DecryptionFailed) => {
            assert_eq!(e.reason(), "DECRYPTION_FAILED");
            e.to_string()
        }
        Err(other) => panic!("{what}: expected DecryptionFailed, got {other:?}"),
        Ok(u) => panic!(
            "{what}: unsealed {} bytes from a tampered store",
            u.secret.len()
        ),
    }
}

/// The one message every decryption failure has.
fn opaque() -> BTreeSet<String> {
    BTreeSet::from([Error::DecryptionFailed.to_string()])
}

#[track_caller]
fn assert_err<T: std::fmt::Debug>(
    result: credvault::Result<T>,
    check: impl FnOnce(&Error) -> bool,
    what: &str,
) {
    match result {
        Err(e) if check(&e) => {}
        other => panic!("{what}: unexpected {other:?}"),
    }
}

// ---------------------------------------------------------------- round trips

#[tokio::test]
async fn every_kind_round_trips_at_the_size_boundaries() {
    let tv = TestVault::new(small_limit()).await;
    let vault = tv.vault();
    let limit = vault.options().max_secret_bytes;
    for kind in Kind::ALL {
        for size in [0, 1, 31, limit - 1, limit] {
            let credential = format!("{kind:?}-{size}");
            let secret: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
            let meta = vault
                .seal(request("acme", &credential, kind, &secret))
                .await
                .unwrap();
            assert_eq!((meta.version, meta.kind, meta.size), (1, kind, size as u64));
            let unsealed = vault.unseal("acme", &credential, None).await.unwrap();
            assert_eq!(unsealed.secret.expose(), secret.as_slice(), "{credential}");
            assert_eq!(unsealed.metadata, meta);
            assert_eq!(vault.metadata("acme", &credential, Some(1)).unwrap(), meta);
        }
        let before = tv.scan_all();
        let err = vault
            .seal(request("acme", "too-big", kind, &vec![1; limit + 1]))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Invalid(Invalid::TooLarge { size, limit: l }) if size == limit + 1 && l == limit),
            "{err:?}"
        );
        assert_eq!(tv.scan_all(), before);
    }

    // Labels at their limits: 32 of them, 63-character keys, 256-character (not byte) values.
    let labels: BTreeMap<String, String> = (0..32)
        .map(|i| (format!("{i:02}{}", "k".repeat(61)), "é".repeat(256)))
        .collect();
    let meta = vault
        .seal(SealRequest {
            labels: labels.clone(),
            expires_at_ms: Some(T0 + 1),
            ..request("acme", "labelled", Kind::OauthToken, b"token")
        })
        .await
        .unwrap();
    assert_eq!(meta.labels, labels);
    let got = vault.metadata("acme", "labelled", None).unwrap();
    assert_eq!((got.labels, got.expires_at_ms), (labels, Some(T0 + 1)));
}

#[test]
fn any_secret_round_trips_with_its_labels_and_expiry() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tv = rt.block_on(TestVault::new(small_limit()));
    let next_id = AtomicU32::new(0);
    let strategy = (
        0..Kind::ALL.len(),
        prop::collection::vec(any::<u8>(), 0..=4096),
        prop::collection::btree_map("[A-Za-z0-9._/-]{1,63}", ".{0,40}", 0..=4),
        prop::option::of(1u64..1 << 40),
        0u32..3,
    );
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&strategy, |(kind, secret, labels, expires_in, tenant)| {
            rt.block_on(async {
                let vault = tv.vault();
                let kind = Kind::ALL[kind];
                let tenant = format!("tenant-{tenant}");
                let credential = format!("cred/{}", next_id.fetch_add(1, Ordering::Relaxed));
                let expires_at_ms = expires_in.map(|d| T0 + d);
                let sealed = vault
                    .seal(SealRequest {
                        labels: labels.clone(),
                        expires_at_ms,
                        ..request(&tenant, &credential, kind, &secret)
                    })
                    .await
                    .map_err(|e| TestCaseError::fail(format!("seal: {e}")))?;
                let unsealed = vault
                    .unseal(&tenant, &credential, None)
                    .await
                    .map_err(|e| TestCaseError::fail(format!("unseal: {e}")))?;
                prop_assert_eq!(unsealed.secret.expose(), secret.as_slice());
                let meta = unsealed.metadata;
                prop_assert_eq!(&meta, &sealed);
                prop_assert_eq!(meta.kind, kind);
                prop_assert_eq!(meta.size, secret.len() as u64);
                prop_assert_eq!(&meta.labels, &labels);
                prop_assert_eq!(meta.expires_at_ms, expires_at_ms);
                prop_assert_eq!(meta.created_at_ms, T0);
                prop_assert_eq!((meta.version, meta.latest_version), (1, 1));
                prop_assert_eq!(meta.revocation, None);
                prop_assert_eq!(vault.metadata(&tenant, &credential, None).unwrap(), sealed);
                Ok(())
            })
        })
        .unwrap();
}

#[tokio::test]
async fn the_default_limit_is_one_mebibyte_inclusive() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let vault = tv.vault();
    let limit = 1 << 20;
    assert_eq!(vault.options().max_secret_bytes, limit);
    let secret = common::SplitMix::from_str("big").bytes(limit);
    let meta = vault
        .seal(request("acme", "jar", Kind::CookieJar, &secret))
        .await
        .unwrap();
    assert_eq!(meta.size, limit as u64);
    assert_eq!(tv.unseal_bytes("acme", "jar", None).await, secret);

    let before = tv.scan_all();
    let mut over = secret.clone();
    over.push(0);
    for credential in ["jar", "new-jar"] {
        let err = vault
            .seal(request("acme", credential, Kind::CookieJar, &over))
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Invalid(Invalid::TooLarge { size, limit: l }) if size == limit + 1 && l == limit),
            "{err:?}"
        );
        assert_eq!(err.reason(), "TOO_LARGE");
    }
    assert_eq!(
        tv.scan_all(),
        before,
        "a rejected secret must store nothing"
    );
    assert_eq!(
        vault.metadata("acme", "jar", None).unwrap().latest_version,
        1
    );
}

// ---------------------------------------------------------------- tampering

#[tokio::test]
async fn every_bit_flip_of_a_stored_payload_fails_to_open() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let (store, vault) = (&**tv.store(), tv.vault());
    let secret = b"session=0123456789abcdef";
    tv.seal("acme", "gmail", Kind::CookieJar, secret).await;
    let key = layout::latest("acme", "gmail");
    let (original, record) = version_record(store, "acme", "gmail", 1);
    let ct = record.ciphertext.clone();
    assert_eq!(ct.len(), envelope::OVERHEAD + secret.len());
    assert_eq!(ct[0], envelope::FORMAT_V1);
    assert!(!contains(&ct, secret), "the payload is stored encrypted");

    let mut messages = BTreeSet::new();
    // Every bit of every byte: format byte, key id, nonce, body and tag.
    for byte in 0..ct.len() {
        for bit in 0..8 {
            let mut bad = record.clone();
            bad.ciphertext[byte] ^= 1 << bit;
            overwrite(store, &key, bad.encode_to_vec()).await;
            let result = vault.unseal("acme", "gmail", None).await;
            messages.insert(assert_decryption_failed(
                result,
                &format!("byte {byte} bit {bit}"),
            ));
        }
    }
    // Truncated, extended and emptied ciphertexts.
    for len in [
        0,
        1,
        5,
        envelope::HEADER_LEN,
        envelope::OVERHEAD - 1,
        ct.len() - 1,
    ] {
        let mut bad = record.clone();
        bad.ciphertext.truncate(len);
        overwrite(store, &key, bad.encode_to_vec()).await;
        messages.insert(assert_decryption_failed(
            vault.unseal("acme", "gmail", Some(1)).await,
            &format!("truncated to {len}"),
        ));
    }
    let mut bad = record.clone();
    bad.ciphertext.push(0);
    overwrite(store, &key, bad.encode_to_vec()).await;
    messages.insert(assert_decryption_failed(
        vault.unseal("acme", "gmail", None).await,
        "extended",
    ));
    assert_eq!(messages, opaque(), "every failure looks alike");

    // The untouched record still opens: the failures came from the tampering alone.
    overwrite(store, &key, original).await;
    assert_eq!(tv.unseal_bytes("acme", "gmail", None).await, secret);
}

#[tokio::test]
async fn moved_or_relabelled_version_records_fail_to_open() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let (store, vault) = (&**tv.store(), tv.vault());
    tv.seal("acme", "c1", Kind::ApiKey, b"acme c1 v1").await;
    tv.seal("acme", "c1", Kind::ApiKey, b"acme c1 v2").await;
    tv.seal("acme", "c1", Kind::ApiKey, b"acme c1 v3").await;
    tv.seal("acme", "c2", Kind::ApiKey, b"acme c2 v1").await;
    tv.seal("other", "c1", Kind::ApiKey, b"other c1 v1").await;
    let (a_c1_v1, a_c1_v1_record) = version_record(store, "acme", "c1", 1);
    let a_c1_v2 = version_record(store, "acme", "c1", 2).0;
    let a_c1_v3 = version_record(store, "acme", "c1", 3);
    let a_c2_v1 = version_record(store, "acme", "c2", 1).0;
    let b_c1_v1 = version_record(store, "other", "c1", 1).0;
    // Both tenants have exactly DEK v1, so only the binding can tell the records apart.
    assert_eq!(a_c1_v1_record.dek_version, 1);
    assert_eq!(
        vault.dek_states("other").unwrap(),
        BTreeMap::from([(1, KeyState::Active)])
    );

    let mut messages = BTreeSet::new();
    // To another tenant's key, same credential id and version.
    overwrite(store, &layout::latest("other", "c1"), a_c1_v1.clone()).await;
    messages.insert(assert_decryption_failed(
        vault.unseal("other", "c1", None).await,
        "other tenant",
    ));
    overwrite(store, &layout::latest("other", "c1"), b_c1_v1).await;
    assert_eq!(tv.unseal_bytes("other", "c1", None).await, b"other c1 v1");

    // To another credential id of the same tenant.
    overwrite(store, &layout::latest("acme", "c2"), a_c1_v1.clone()).await;
    messages.insert(assert_decryption_failed(
        vault.unseal("acme", "c2", None).await,
        "other credential",
    ));
    overwrite(store, &layout::latest("acme", "c2"), a_c2_v1).await;
    assert_eq!(tv.unseal_bytes("acme", "c2", None).await, b"acme c2 v1");

    // To another numbered version's key of the same credential: byte for
    // byte, and with the version field rewritten to match its new place.
    let v2_key = layout::version("acme", "c1", 2);
    overwrite(store, &v2_key, a_c1_v1.clone()).await;
    messages.insert(assert_decryption_failed(
        vault.unseal("acme", "c1", Some(2)).await,
        "v1 as v2",
    ));
    let mut renumbered = a_c1_v1_record.clone();
    renumbered.version = 2;
    overwrite(store, &v2_key, renumbered.encode_to_vec()).await;
    messages.insert(assert_decryption_failed(
        vault.unseal("acme", "c1", Some(2)).await,
        "renumbered v1 as v2",
    ));
    overwrite(store, &v2_key, a_c1_v2).await;
    assert_eq!(tv.unseal_bytes("acme", "c1", Some(2)).await, b"acme c1 v2");

    // Into the latest slot, claiming the latest version's number.
    let latest_key = layout::latest("acme", "c1");
    let mut renumbered = a_c1_v1_record.clone();
    renumbered.version = 3;
    overwrite(store, &latest_key, renumbered.encode_to_vec()).await;
    messages.insert(assert_decryption_failed(
        vault.unseal("acme", "c1", None).await,
        "renumbered v1 as the latest",
    ));
    messages.insert(assert_decryption_failed(
        vault.unseal("acme", "c1", Some(3)).await,
        "renumbered v1 as v3",
    ));
    // Byte for byte, it opens only as what it is: version 1. A store writer can
    // roll a credential back to a version the store holds (as deleting the
    // newer records also does); it cannot make one version read as another.
    overwrite(store, &latest_key, a_c1_v1.clone()).await;
    let rolled_back = vault.unseal("acme", "c1", None).await.unwrap();
    assert_eq!(rolled_back.secret.expose(), b"acme c1 v1");
    assert_eq!(
        (
            rolled_back.metadata.version,
            rolled_back.metadata.latest_version
        ),
        (1, 1)
    );

    // The kind field changed, to every other kind and to an unknown one.
    for kind in [
        Kind::CookieJar as u32,
        Kind::OauthToken as u32,
        Kind::Generic as u32,
        0,
        99,
    ] {
        let mut bad = a_c1_v3.1.clone();
        bad.kind = kind;
        overwrite(store, &latest_key, bad.encode_to_vec()).await;
        messages.insert(assert_decryption_failed(
            vault.unseal("acme", "c1", None).await,
            &format!("kind {kind}"),
        ));
    }
    // The DEK version field pointed elsewhere.
    for dek_version in [0, 2, u32::MAX] {
        let mut bad = a_c1_v3.1.clone();
        bad.dek_version = dek_version;
        overwrite(store, &latest_key, bad.encode_to_vec()).await;
        messages.insert(assert_decryption_failed(
            vault.unseal("acme", "c1", None).await,
            &format!("dek v{dek_version}"),
        ));
    }
    overwrite(store, &latest_key, a_c1_v3.0).await;
    assert_eq!(tv.unseal_bytes("acme", "c1", None).await, b"acme c1 v3");
    assert_eq!(tv.unseal_bytes("acme", "c1", Some(1)).await, b"acme c1 v1");
    assert_eq!(messages, opaque());
}

#[tokio::test]
async fn a_data_key_copied_from_another_tenant_fails_to_open() {
    let mut tv = TestVault::new(VaultOptions::default()).await;
    tv.seal("acme", "c", Kind::CookieJar, b"acme secret").await;
    tv.seal("globex", "c", Kind::CookieJar, b"globex secret")
        .await;
    tv.seal("globex", "d", Kind::ApiKey, b"globex other").await;
    let acme_dek = tv.store().get(&layout::dek("acme", 1)).unwrap().unwrap();
    let globex_dek_key = layout::dek("globex", 1);
    let globex_dek = tv.store().get(&globex_dek_key).unwrap().unwrap();
    let acme_record = DekRecord::decode(acme_dek.as_slice()).unwrap();
    assert_eq!(
        (acme_record.version, acme_record.kek_version),
        (
            1,
            DekRecord::decode(globex_dek.as_slice())
                .unwrap()
                .kek_version
        ),
        "the copy differs from the original only in its wrapped bytes"
    );

    let mut flipped = DekRecord::decode(globex_dek.as_slice()).unwrap();
    flipped.wrapped[envelope::HEADER_LEN] ^= 0x10;
    for (what, tampered) in [
        ("acme's DEK", acme_dek.clone()),
        ("flipped DEK", flipped.encode_to_vec()),
    ] {
        overwrite(&**tv.store(), &globex_dek_key, tampered).await;
        // Tenant keys are cached per vault: reopen to load the tampered record.
        tv.reopen().await;
        let mut messages = BTreeSet::new();
        for credential in ["c", "d"] {
            messages.insert(assert_decryption_failed(
                tv.vault().unseal("globex", credential, None).await,
                &format!("{what}: globex/{credential}"),
            ));
        }
        assert_eq!(messages, opaque());
        // Nothing new is sealed under a key that cannot be trusted.
        let before = tv.scan_all();
        assert!(
            tv.vault()
                .seal(request("globex", "c", Kind::CookieJar, b"new"))
                .await
                .is_err(),
            "{what}: sealed under a tampered data key"
        );
        assert_eq!(tv.scan_all(), before);
        // The other tenant is unaffected.
        assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"acme secret");
    }

    overwrite(&**tv.store(), &globex_dek_key, globex_dek).await;
    tv.reopen().await;
    assert_eq!(tv.unseal_bytes("globex", "c", None).await, b"globex secret");
    assert_eq!(tv.unseal_bytes("globex", "d", None).await, b"globex other");
}

#[tokio::test]
async fn a_tampered_old_data_key_fails_only_what_it_sealed() {
    let mut tv = TestVault::new(VaultOptions {
        rotate_after_encryptions: 2,
        ..VaultOptions::default()
    })
    .await;
    for i in 1..=3 {
        tv.seal(
            "acme",
            &format!("c{i}"),
            Kind::ApiKey,
            format!("s{i}").as_bytes(),
        )
        .await;
    }
    // c1 and c2 were sealed under DEK v1, c3 under v2.
    assert_eq!(
        tv.vault().metadata("acme", "c3", None).unwrap().dek_version,
        2
    );
    let key = layout::dek("acme", 1);
    let mut record = DekRecord::decode(tv.store().get(&key).unwrap().unwrap().as_slice()).unwrap();
    let last = record.wrapped.len() - 1;
    record.wrapped[last] ^= 1;
    overwrite(&**tv.store(), &key, record.encode_to_vec()).await;
    tv.reopen().await;
    let mut messages = BTreeSet::new();
    for credential in ["c1", "c2"] {
        messages.insert(assert_decryption_failed(
            tv.vault().unseal("acme", credential, None).await,
            credential,
        ));
    }
    assert_eq!(messages, opaque());
    assert_eq!(tv.unseal_bytes("acme", "c3", None).await, b"s3");
    tv.seal("acme", "c4", Kind::ApiKey, b"s4").await;
    assert_eq!(tv.unseal_bytes("acme", "c4", None).await, b"s4");
}

// ---------------------------------------------------------------- counters and rotation

#[tokio::test]
async fn usage_counters_count_and_survive_reopen() {
    let mut tv = TestVault::new(VaultOptions::default()).await;
    let mut last = (0, 0, 0);
    for round in 0..3u64 {
        for i in 0..4 {
            tv.seal("acme", &format!("c{i}"), Kind::ApiKey, b"k").await;
        }
        tv.seal("globex", "c", Kind::ApiKey, b"k").await;
        tv.seal(&format!("tenant-{round}"), "c", Kind::ApiKey, b"k")
            .await;

        let v = tv.vault();
        let now = (
            v.dek_uses("acme", 1).unwrap(),
            v.dek_uses("globex", 1).unwrap(),
            v.kek_uses(1).unwrap(),
        );
        // acme: 4 seals a round; globex: 1; KEK: one DEK wrap per new tenant.
        assert_eq!(now, (4 * (round + 1), round + 1, 3 + round));
        assert_eq!(v.dek_uses("acme", 2).unwrap(), 0, "no DEK v2 yet");
        assert_eq!(v.dek_uses("nobody", 1).unwrap(), 0);
        assert_eq!(v.kek_uses(2).unwrap(), 0);
        assert!(
            now.0 >= last.0 && now.1 >= last.1 && now.2 >= last.2,
            "counters went back"
        );
        last = now;

        tv.reopen().await;
        let v = tv.vault();
        assert_eq!(
            (
                v.dek_uses("acme", 1).unwrap(),
                v.dek_uses("globex", 1).unwrap(),
                v.kek_uses(1).unwrap()
            ),
            last,
            "counters must survive a restart"
        );
    }
    // Failed and read-only operations count nothing.
    let v = tv.vault();
    let stale = v
        .seal(SealRequest {
            expected_version: Some(7),
            ..request("acme", "c0", Kind::ApiKey, b"x")
        })
        .await;
    assert!(matches!(stale, Err(Error::VersionMismatch { .. })));
    let too_big = v
        .seal(request("acme", "c0", Kind::ApiKey, &vec![0; (1 << 20) + 1]))
        .await;
    assert!(matches!(too_big, Err(Error::Invalid(_))));
    assert_eq!(
        v.unseal("acme", "c0", None).await.unwrap().secret.expose(),
        b"k"
    );
    v.metadata("acme", "c0", None).unwrap();
    v.list("acme", None, 0, None).unwrap();
    assert_eq!(v.dek_uses("acme", 1).unwrap(), last.0);
    assert_eq!(v.kek_uses(1).unwrap(), last.2);
}

#[tokio::test]
async fn data_keys_rotate_at_the_threshold_and_old_versions_still_open() {
    let mut tv = TestVault::new(VaultOptions {
        rotate_after_encryptions: 5,
        max_versions: 0,
        ..VaultOptions::default()
    })
    .await;
    let mut sealed = Vec::new(); // (credential, version, dek version, secret)
    for i in 0..12u32 {
        let credential = format!("c{}", i % 3);
        let secret = format!("secret number {i}").into_bytes();
        let meta = tv
            .vault()
            .seal(request("acme", &credential, Kind::Generic, &secret))
            .await
            .unwrap();
        // Seals 1-5 use DEK v1, 6-10 v2, 11-12 v3.
        assert_eq!(meta.dek_version, i / 5 + 1, "seal {i}");
        sealed.push((credential, meta.version, meta.dek_version, secret));
        let states = tv.vault().dek_states("acme").unwrap();
        if i == 4 {
            assert_eq!(
                states,
                BTreeMap::from([(1, KeyState::DecryptOnly), (2, KeyState::Active)])
            );
        }
    }
    for reopened in [false, true] {
        let v = tv.vault();
        assert_eq!(
            v.dek_states("acme").unwrap(),
            BTreeMap::from([
                (1, KeyState::DecryptOnly),
                (2, KeyState::DecryptOnly),
                (3, KeyState::Active)
            ]),
            "reopened: {reopened}"
        );
        assert_eq!(
            [1, 2, 3, 4].map(|d| v.dek_uses("acme", d).unwrap()),
            [5, 5, 2, 0]
        );
        // One wrap for DEK v1, one per rotation; far from the KEK threshold... which is also 5.
        assert_eq!(v.kek_uses(1).unwrap(), 3);
        assert_eq!(v.kek_states(), BTreeMap::from([(1, KeyState::Active)]));
        for (credential, version, dek, secret) in &sealed {
            let unsealed = v.unseal("acme", credential, Some(*version)).await.unwrap();
            assert_eq!(
                unsealed.secret.expose(),
                secret.as_slice(),
                "{credential} v{version}"
            );
            assert_eq!(unsealed.metadata.dek_version, *dek);
        }
        tv.reopen().await;
    }
}

#[tokio::test]
async fn the_kek_rotates_at_the_threshold_and_old_wraps_still_open() {
    let mut tv = TestVault::new(VaultOptions {
        rotate_after_encryptions: 5,
        ..VaultOptions::default()
    })
    .await;
    assert_eq!(
        tv.vault().kek_states(),
        BTreeMap::from([(1, KeyState::Active)])
    );
    for t in 0..12 {
        tv.seal(
            &format!("tenant-{t:02}"),
            "c",
            Kind::ApiKey,
            format!("key of {t}").as_bytes(),
        )
        .await;
        if t == 4 {
            assert_eq!(
                tv.vault().kek_states(),
                BTreeMap::from([(1, KeyState::DecryptOnly), (2, KeyState::Active)])
            );
        }
    }
    for reopened in [false, true] {
        let v = tv.vault();
        assert_eq!(
            v.kek_states(),
            BTreeMap::from([
                (1, KeyState::DecryptOnly),
                (2, KeyState::DecryptOnly),
                (3, KeyState::Active)
            ]),
            "reopened: {reopened}"
        );
        assert_eq!([1, 2, 3, 4].map(|k| v.kek_uses(k).unwrap()), [5, 5, 2, 0]);
        for t in 0..12 {
            let tenant = format!("tenant-{t:02}");
            let dek = tv.store().get(&layout::dek(&tenant, 1)).unwrap().unwrap();
            assert_eq!(
                DekRecord::decode(dek.as_slice()).unwrap().kek_version,
                t / 5 + 1,
                "{tenant}"
            );
            assert_eq!(
                tv.unseal_bytes(&tenant, "c", None).await,
                format!("key of {t}").as_bytes()
            );
            assert_eq!(v.dek_uses(&tenant, 1).unwrap(), 1);
        }
        tv.reopen().await;
    }
    // A tenant whose DEK is wrapped by a decrypt-only KEK can still seal and unseal.
    tv.seal("tenant-00", "c", Kind::ApiKey, b"again").await;
    assert_eq!(tv.unseal_bytes("tenant-00", "c", None).await, b"again");
    assert_eq!(
        tv.unseal_bytes("tenant-00", "c", Some(1)).await,
        b"key of 0"
    );
    assert_eq!(tv.vault().dek_uses("tenant-00", 1).unwrap(), 2);
    assert_eq!(
        tv.vault().kek_uses(3).unwrap(),
        2,
        "no DEK was wrapped by that seal"
    );
}

// ---------------------------------------------------------------- the root key

#[tokio::test]
async fn a_wrong_root_key_is_a_clear_start_up_error() {
    let mut tv = TestVault::new(VaultOptions::default()).await;
    tv.seal("acme", "c", Kind::ApiKey, b"k").await;
    let before = tv.scan_all();
    tv.close();

    let store = common::open_store(&tv.path);
    let wrong = *SymmetricKey::generate().expose_bytes();
    let Err(err) = common::open_vault(&store, &wrong, &tv.clock, VaultOptions::default()).await
    else {
        panic!("opened the vault with the wrong root key");
    };
    assert!(matches!(err, Error::WrongRootKey), "{err:?}");
    assert_eq!(err.reason(), "WRONG_ROOT_KEY");
    let message = err.to_string();
    assert!(message.contains("root key does not match"), "{message}");
    assert_eq!(
        common::scan_all(&*store),
        before,
        "a failed open writes nothing"
    );
    drop(store);

    tv.store = Some(common::open_store(&tv.path));
    tv.reopen().await;
    assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"k");
}

#[tokio::test]
async fn root_key_files_load_and_are_refused_when_others_can_read_them() {
    let keys = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let path = keys.path().join("root.key");
    root::generate_file(&path).unwrap();
    let clock = Arc::new(credvault::clock::ManualClock::new(T0));

    let store = common::open_store(data.path());
    let vault = credvault::Vault::open(
        store.clone(),
        root::load_file(&path).unwrap(),
        clock.clone(),
        VaultOptions::default(),
    )
    .await
    .unwrap();
    vault
        .seal(request("acme", "c", Kind::ApiKey, b"from a key file"))
        .await
        .unwrap();
    drop((vault, store));

    for mode in [0o644, 0o640, 0o604, 0o660] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = root::load_file(&path).unwrap_err();
        assert!(
            matches!(err, RootKeyError::Permissions { .. }),
            "{mode:o}: {err:?}"
        );
        assert!(
            err.to_string()
                .contains("must not be readable by group or others"),
            "{err}"
        );
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    let store = common::open_store(data.path());
    let vault = credvault::Vault::open(
        store.clone(),
        root::load_file(&path).unwrap(),
        clock.clone(),
        VaultOptions::default(),
    )
    .await
    .unwrap();
    let unsealed = vault.unseal("acme", "c", None).await.unwrap();
    assert_eq!(unsealed.secret.expose(), b"from a key file");
    drop((vault, store));

    // Another key file is another root key.
    let other = keys.path().join("other.key");
    root::generate_file(&other).unwrap();
    let store = common::open_store(data.path());
    let result = credvault::Vault::open(
        store,
        root::load_file(&other).unwrap(),
        clock,
        VaultOptions::default(),
    )
    .await;
    assert!(matches!(result, Err(Error::WrongRootKey)));
}

// ---------------------------------------------------------------- revocation

#[tokio::test]
async fn revoke_destroys_every_version_and_keeps_a_tombstone() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let (store, vault) = (&**tv.store(), tv.vault());
    let secrets: Vec<Vec<u8>> = (1..=3)
        .map(|v| format!("cookie jar version {v}").into_bytes())
        .collect();
    for secret in &secrets {
        tv.seal("acme", "gmail", Kind::CookieJar, secret).await;
        tv.clock.advance_ms(1000);
    }
    tv.seal("acme", "slack", Kind::CookieJar, b"unrelated")
        .await;
    let ciphertexts: Vec<Vec<u8>> = (1..=3)
        .map(|v| version_record(store, "acme", "gmail", v).1.ciphertext)
        .collect();
    for ct in &ciphertexts {
        assert!(
            tv.scan_all().iter().any(|(_, value)| contains(value, ct)),
            "the ciphertext is stored before revoking"
        );
    }

    tv.clock.advance_ms(5000);
    let revoked_at = T0 + 8000;
    let tombstone = vault
        .revoke("acme", "gmail", "settings-ui:alice", "cookie leaked")
        .await
        .unwrap();
    assert_eq!(
        (
            tombstone.revoked_at_ms,
            tombstone.revoked_by.as_str(),
            tombstone.reason.as_str()
        ),
        (revoked_at, "settings-ui:alice", "cookie leaked")
    );

    for version in [None, Some(1), Some(2), Some(3)] {
        assert_err(
            vault.unseal("acme", "gmail", version).await,
            |e| matches!(e, Error::Revoked),
            "unseal after revoke",
        );
        let meta = vault.metadata("acme", "gmail", version).unwrap();
        assert_eq!(meta.revocation.as_ref(), Some(&tombstone), "{version:?}");
        assert_eq!(meta.latest_version, 3);
    }
    let rows = tv.scan_all();
    for (i, ct) in ciphertexts.iter().enumerate() {
        for (key, value) in &rows {
            assert!(
                !contains(key, ct) && !contains(value, ct),
                "ciphertext of v{} survives under {key:?}",
                i + 1
            );
        }
    }
    for v in 1..=3 {
        let record = version_record(store, "acme", "gmail", v).1;
        assert_eq!(record.state(), VersionState::Revoked);
        assert!(record.ciphertext.is_empty());
    }

    // Again, later, by someone else: the same tombstone, and nothing changes.
    tv.clock.advance_ms(60_000);
    let again = vault
        .revoke("acme", "gmail", "someone-else", "again")
        .await
        .unwrap();
    assert_eq!(again, tombstone);
    assert_eq!(tv.scan_all(), rows);

    // The other credential is untouched; unknown credentials are NotFound.
    assert_eq!(tv.unseal_bytes("acme", "slack", None).await, b"unrelated");
    assert_err(
        vault.revoke("acme", "nope", "x", "y").await,
        |e| matches!(e, Error::NotFound),
        "unknown credential",
    );
    assert_err(
        vault.revoke("nobody", "gmail", "x", "y").await,
        |e| matches!(e, Error::NotFound),
        "unknown tenant",
    );
    assert_eq!(tv.scan_all(), rows);
}

// ---------------------------------------------------------------- compare-and-set

#[tokio::test]
async fn compare_and_set_on_the_version() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let vault = tv.vault();
    let cas = |credential: &str, expected: u32, secret: &[u8]| SealRequest {
        expected_version: Some(expected),
        ..request("acme", credential, Kind::OauthToken, secret)
    };
    assert_eq!(vault.seal(cas("c", 0, b"first")).await.unwrap().version, 1);
    let before = tv.scan_all();
    assert_err(
        vault.seal(cas("c", 0, b"again")).await,
        |e| {
            matches!(
                e,
                Error::VersionMismatch {
                    expected: 0,
                    actual: 1
                }
            )
        },
        "must-not-exist on an existing credential",
    );
    assert_eq!(tv.scan_all(), before);
    assert_eq!(vault.seal(cas("c", 1, b"second")).await.unwrap().version, 2);

    let before = tv.scan_all();
    for stale in [1, 3, 0] {
        let err = vault.seal(cas("c", stale, b"stale")).await.unwrap_err();
        assert!(
            matches!(err, Error::VersionMismatch { expected, actual: 2 } if expected == stale),
            "{err:?}"
        );
        assert_eq!(err.reason(), "VERSION_MISMATCH");
    }
    // A stale version on a credential (and tenant) that does not exist yet.
    assert_err(
        vault
            .seal(SealRequest {
                expected_version: Some(4),
                ..request("new-tenant", "c", Kind::ApiKey, b"x")
            })
            .await,
        |e| {
            matches!(
                e,
                Error::VersionMismatch {
                    expected: 4,
                    actual: 0
                }
            )
        },
        "stale version on a new tenant",
    );
    assert_eq!(
        tv.scan_all(),
        before,
        "a failed compare-and-set stores nothing"
    );
    assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"second");
    assert_eq!(tv.unseal_bytes("acme", "c", Some(1)).await, b"first");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_seals_of_one_credential_lose_no_update() {
    let tv = Arc::new(
        TestVault::new(VaultOptions {
            max_versions: 0,
            ..VaultOptions::default()
        })
        .await,
    );
    const TASKS: u32 = 16;
    const EACH: u32 = 3;
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS as usize));
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let (tv, barrier) = (tv.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                let mut got = Vec::new();
                for i in 0..EACH {
                    let secret = format!("task {task} seal {i}").into_bytes();
                    let meta = tv
                        .vault()
                        .seal(request("acme", "shared", Kind::CookieJar, &secret))
                        .await
                        .unwrap();
                    got.push((meta.version, secret));
                }
                got
            })
        })
        .collect();
    let mut by_version = BTreeMap::new();
    for task in tasks {
        for (version, secret) in task.await.unwrap() {
            assert!(
                by_version.insert(version, secret).is_none(),
                "version {version} handed out twice"
            );
        }
    }
    let total = TASKS * EACH;
    assert_eq!(
        by_version.keys().copied().collect::<Vec<_>>(),
        (1..=total).collect::<Vec<_>>()
    );
    let vault = tv.vault();
    assert_eq!(
        vault
            .metadata("acme", "shared", None)
            .unwrap()
            .latest_version,
        total
    );
    for (version, secret) in &by_version {
        assert_eq!(
            &tv.unseal_bytes("acme", "shared", Some(*version)).await,
            secret
        );
    }
    assert_eq!(vault.dek_uses("acme", 1).unwrap(), u64::from(total));
    assert_eq!(vault.kek_uses(1).unwrap(), 1, "the tenant was created once");
}

// ---------------------------------------------------------------- validation

#[tokio::test]
async fn invalid_requests_are_rejected_and_store_nothing() {
    let tv = TestVault::new(small_limit()).await;
    let vault = tv.vault();
    tv.seal("acme", "c", Kind::ApiKey, b"k").await;
    let base = || request("acme", "c", Kind::ApiKey, b"x");
    let labels = |pairs: &[(&str, String)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    let cases: Vec<(&str, SealRequest, Invalid)> = vec![
        (
            "empty tenant",
            SealRequest {
                tenant: "".into(),
                ..base()
            },
            Invalid::TenantId,
        ),
        (
            "tenant with space",
            SealRequest {
                tenant: "a b".into(),
                ..base()
            },
            Invalid::TenantId,
        ),
        (
            "tenant with dot",
            SealRequest {
                tenant: "a.b".into(),
                ..base()
            },
            Invalid::TenantId,
        ),
        (
            "tenant with NUL",
            SealRequest {
                tenant: "a\0b".into(),
                ..base()
            },
            Invalid::TenantId,
        ),
        (
            "long tenant",
            SealRequest {
                tenant: "t".repeat(65),
                ..base()
            },
            Invalid::TenantId,
        ),
        (
            "non-ASCII tenant",
            SealRequest {
                tenant: "café".into(),
                ..base()
            },
            Invalid::TenantId,
        ),
        (
            "empty credential",
            SealRequest {
                credential: "".into(),
                ..base()
            },
            Invalid::CredentialId,
        ),
        (
            "credential with NUL",
            SealRequest {
                credential: "c\0d".into(),
                ..base()
            },
            Invalid::CredentialId,
        ),
        (
            "credential with newline",
            SealRequest {
                credential: "c\nd".into(),
                ..base()
            },
            Invalid::CredentialId,
        ),
        (
            "long credential",
            SealRequest {
                credential: "c".repeat(257),
                ..base()
            },
            Invalid::CredentialId,
        ),
        (
            "33 labels",
            SealRequest {
                labels: (0..33).map(|i| (format!("k{i}"), String::new())).collect(),
                ..base()
            },
            Invalid::TooManyLabels {
                count: 33,
                limit: 32,
            },
        ),
        (
            "empty label key",
            SealRequest {
                labels: labels(&[("", "v".into())]),
                ..base()
            },
            Invalid::LabelKey,
        ),
        (
            "label key with space",
            SealRequest {
                labels: labels(&[("a b", "v".into())]),
                ..base()
            },
            Invalid::LabelKey,
        ),
        (
            "long label key",
            SealRequest {
                labels: labels(&[(&"k".repeat(64), "v".into())]),
                ..base()
            },
            Invalid::LabelKey,
        ),
        (
            "long label value",
            SealRequest {
                labels: labels(&[("k", "é".repeat(257))]),
                ..base()
            },
            Invalid::LabelValue,
        ),
        (
            "expires now",
            SealRequest {
                expires_at_ms: Some(T0),
                ..base()
            },
            Invalid::Expiry,
        ),
        (
            "expired",
            SealRequest {
                expires_at_ms: Some(T0 - 1),
                ..base()
            },
            Invalid::Expiry,
        ),
        (
            "expired long ago",
            SealRequest {
                expires_at_ms: Some(1),
                ..base()
            },
            Invalid::Expiry,
        ),
        (
            "too large",
            SealRequest {
                secret: Secret::new(vec![0; 4097]),
                ..base()
            },
            Invalid::TooLarge {
                size: 4097,
                limit: 4096,
            },
        ),
    ];
    let before = tv.scan_all();
    for (what, req, expected) in cases {
        // The same request for a tenant that does not exist yet must not create it either.
        let fresh = SealRequest {
            tenant: if req.tenant == "acme" {
                "fresh".into()
            } else {
                req.tenant.clone()
            },
            credential: req.credential.clone(),
            kind: req.kind,
            secret: Secret::new(req.secret.expose().to_vec()),
            labels: req.labels.clone(),
            expires_at_ms: req.expires_at_ms,
            expected_version: req.expected_version,
        };
        for req in [req, fresh] {
            match vault.seal(req).await {
                Err(Error::Invalid(got)) => assert_eq!(got, expected, "{what}"),
                other => panic!("{what}: {other:?}"),
            }
            assert_eq!(tv.scan_all(), before, "{what} changed the store");
        }
    }

    assert_err(
        vault.unseal("acme", "c", Some(0)).await,
        |e| matches!(e, Error::Invalid(Invalid::Version)),
        "v0",
    );
    assert_err(
        vault.metadata("acme", "c", Some(0)),
        |e| matches!(e, Error::Invalid(Invalid::Version)),
        "v0 metadata",
    );
    assert_err(
        vault.unseal("a b", "c", None).await,
        |e| matches!(e, Error::Invalid(Invalid::TenantId)),
        "unseal tenant",
    );
    assert_err(
        vault.unseal("acme", "c d", None).await,
        |e| matches!(e, Error::Invalid(Invalid::CredentialId)),
        "unseal id",
    );
    assert_err(
        vault.list("acme", None, 10, Some("bad token")),
        |e| matches!(e, Error::Invalid(Invalid::PageToken)),
        "token",
    );
    assert_err(
        vault.revoke("acme", "c", "me", &"r".repeat(1025)).await,
        |e| {
            matches!(
                e,
                Error::Invalid(Invalid::TooLong {
                    field: "reason",
                    ..
                })
            )
        },
        "long reason",
    );
    assert_err(
        vault.revoke("acme", "c d", "me", "r").await,
        |e| matches!(e, Error::Invalid(Invalid::CredentialId)),
        "revoke id",
    );
    assert_eq!(tv.scan_all(), before);
    assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"k");
}

// ---------------------------------------------------------------- expiry

#[tokio::test]
async fn expiry_follows_the_clock_and_differs_from_revocation() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let vault = tv.vault();
    tv.seal("acme", "c", Kind::OauthToken, b"no expiry").await;
    vault
        .seal(SealRequest {
            expires_at_ms: Some(T0 + 1000),
            ..request("acme", "c", Kind::OauthToken, b"short-lived")
        })
        .await
        .unwrap();
    tv.clock.advance_ms(999);
    assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"short-lived");
    tv.clock.advance_ms(1);
    let expired = vault.unseal("acme", "c", None).await.unwrap_err();
    assert!(matches!(expired, Error::Expired), "{expired:?}");
    assert_eq!(expired.reason(), "EXPIRED");
    assert_eq!(
        vault.metadata("acme", "c", None).unwrap().expires_at_ms,
        Some(T0 + 1000)
    );
    // The version without an expiry is still valid.
    assert_eq!(tv.unseal_bytes("acme", "c", Some(1)).await, b"no expiry");

    vault.revoke("acme", "c", "me", "done").await.unwrap();
    let revoked = vault.unseal("acme", "c", None).await.unwrap_err();
    assert!(matches!(revoked, Error::Revoked), "{revoked:?}");
    assert_ne!(revoked.reason(), expired.reason());
    assert_ne!(revoked.to_string(), expired.to_string());
}

// ---------------------------------------------------------------- version pruning

#[tokio::test]
async fn only_the_last_max_versions_are_kept() {
    let mut tv = TestVault::new(VaultOptions {
        max_versions: 3,
        ..VaultOptions::default()
    })
    .await;
    for v in 1..=5u32 {
        assert_eq!(
            tv.seal("acme", "c", Kind::Generic, format!("v{v}").as_bytes())
                .await,
            v
        );
    }
    for _ in 0..2 {
        let vault = tv.vault();
        for v in 1..=2 {
            assert_err(
                vault.unseal("acme", "c", Some(v)).await,
                |e| matches!(e, Error::NotFound),
                "pruned version",
            );
            assert_err(
                vault.metadata("acme", "c", Some(v)),
                |e| matches!(e, Error::NotFound),
                "pruned metadata",
            );
        }
        for v in 3..=5 {
            let unsealed = vault.unseal("acme", "c", Some(v)).await.unwrap();
            assert_eq!(unsealed.secret.expose(), format!("v{v}").as_bytes());
            // An older version's metadata still names the credential's latest version.
            assert_eq!(
                (unsealed.metadata.version, unsealed.metadata.latest_version),
                (v, 5)
            );
            assert_eq!(
                unsealed.metadata,
                vault.metadata("acme", "c", Some(v)).unwrap()
            );
        }
        assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"v5");
        let stored = tv
            .store()
            .scan(&layout::version_prefix("acme", "c"), None, usize::MAX)
            .unwrap();
        // Versions 3 and 4 under their numbers, 5 in the latest slot.
        assert_eq!(
            stored
                .iter()
                .map(|(k, v)| (
                    layout::trailing_version(k).unwrap(),
                    VersionRecord::decode(v.as_slice()).unwrap().version
                ))
                .collect::<Vec<_>>(),
            [(3, 3), (4, 4), (layout::LATEST, 5)]
        );
        tv.reopen().await;
    }
}

#[tokio::test]
async fn a_credential_stored_without_a_latest_slot_reads_and_moves_on() {
    // A store written before the latest slot kept every version, the latest
    // too, under its number. Make one such credential by hand.
    let tv = TestVault::new(VaultOptions::default()).await;
    let (store, vault) = (&**tv.store(), tv.vault());
    tv.seal("acme", "c", Kind::ApiKey, b"v1").await;
    let slot = layout::latest("acme", "c");
    let (v1, _) = version_record(store, "acme", "c", 1);
    let mut batch = Batch::default();
    batch
        .delete(slot.clone())
        .put(layout::version("acme", "c", 1), v1.clone());
    store.commit(batch).await.unwrap();

    assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"v1");
    assert_eq!(tv.unseal_bytes("acme", "c", Some(1)).await, b"v1");
    assert_eq!(vault.metadata("acme", "c", None).unwrap().version, 1);
    let listed = vault.list("acme", None, 0, None).unwrap().credentials;
    assert_eq!(
        listed
            .iter()
            .map(|m| (m.credential.as_str(), m.version))
            .collect::<Vec<_>>(),
        [("c", 1)]
    );

    // The next seal takes the slot; version 1 stays where it is.
    tv.seal("acme", "c", Kind::ApiKey, b"v2").await;
    assert_eq!(
        store.get(&layout::version("acme", "c", 1)).unwrap(),
        Some(v1)
    );
    assert_eq!(stored_key(store, "acme", "c", 2), slot);
    assert_eq!(tv.unseal_bytes("acme", "c", None).await, b"v2");
    assert_eq!(tv.unseal_bytes("acme", "c", Some(1)).await, b"v1");
    let unsealed = vault.unseal("acme", "c", Some(1)).await.unwrap();
    assert_eq!(
        (unsealed.metadata.version, unsealed.metadata.latest_version),
        (1, 2)
    );
    // Revocation reaches both places.
    vault.revoke("acme", "c", "test", "done").await.unwrap();
    for version in [None, Some(1), Some(2)] {
        assert_err(
            vault.unseal("acme", "c", version).await,
            |e| matches!(e, Error::Revoked),
            "revoked",
        );
    }
}

#[tokio::test]
async fn a_latest_slot_naming_no_real_version_is_corrupt() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let store = &**tv.store();
    tv.seal("acme", "c", Kind::ApiKey, b"v1").await;
    let (_, record) = version_record(store, "acme", "c", 1);
    for claimed in [0, layout::LATEST] {
        let mut bad = record.clone();
        bad.version = claimed;
        overwrite(store, &layout::latest("acme", "c"), bad.encode_to_vec()).await;
        assert_err(
            tv.vault().unseal("acme", "c", None).await,
            |e| matches!(e, Error::Corrupt(_)),
            &format!("slot claiming version {claimed}"),
        );
    }
}

#[tokio::test]
async fn the_slot_number_is_never_a_version() {
    let tv = TestVault::new(VaultOptions::default()).await;
    tv.seal("acme", "c", Kind::ApiKey, b"v1").await;
    assert_err(
        tv.vault().unseal("acme", "c", Some(layout::LATEST)).await,
        |e| matches!(e, Error::Invalid(_)),
        "the slot's number",
    );
    assert_err(
        tv.vault().metadata("acme", "c", Some(layout::LATEST)),
        |e| matches!(e, Error::Invalid(_)),
        "the slot's number",
    );
}

// ---------------------------------------------------------------- listing

#[tokio::test]
async fn list_paginates_in_id_order_and_never_shows_secrets() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let vault = tv.vault();
    let secret_of = |i: usize| format!("TOPSECRET-{i:02}-xyzzy");
    // Sealed out of order; ids sort as strings.
    let mut order: Vec<usize> = (0..25).collect();
    order.reverse();
    order.swap(3, 17);
    for &i in &order {
        let kind = Kind::ALL[i % 4];
        tv.seal(
            "acme",
            &format!("cred-{i:02}"),
            kind,
            secret_of(i).as_bytes(),
        )
        .await;
    }
    tv.seal("acme", "cred-07", Kind::ALL[7 % 4], b"TOPSECRET-07-second")
        .await;
    tv.seal("acme-2", "cred-99", Kind::ApiKey, b"other tenant")
        .await;
    tv.seal("acmd", "cred-98", Kind::ApiKey, b"other tenant")
        .await;

    let mut pages = Vec::new();
    let mut token = None;
    loop {
        let page = vault.list("acme", None, 10, token.as_deref()).unwrap();
        let ids: Vec<String> = page
            .credentials
            .iter()
            .map(|m| m.credential.clone())
            .collect();
        pages.push(ids);
        let shown = format!("{page:?}");
        for i in 0..25 {
            assert!(
                !shown.contains(&secret_of(i)),
                "page shows a secret: {shown}"
            );
        }
        assert!(!shown.contains("TOPSECRET"), "{shown}");
        for meta in &page.credentials {
            assert_eq!(meta.version, meta.latest_version);
            assert_eq!(meta.tenant, "acme");
        }
        match page.next_page_token {
            Some(next) => {
                assert_eq!(
                    Some(&next),
                    pages.last().unwrap().last(),
                    "the token is the last id of the page"
                );
                token = Some(next);
            }
            None => break,
        }
        assert!(pages.len() < 10, "pagination does not end");
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [10, 10, 5]);
    let all: Vec<String> = pages.concat();
    let expected: Vec<String> = (0..25).map(|i| format!("cred-{i:02}")).collect();
    assert_eq!(all, expected, "in id order, each once, only this tenant's");

    // Page size 0 means the default; metadata is of the latest version.
    let page = vault.list("acme", None, 0, None).unwrap();
    assert_eq!(page.credentials.len(), 25);
    assert!(page.next_page_token.is_none());
    let seven = page
        .credentials
        .iter()
        .find(|m| m.credential == "cred-07")
        .unwrap();
    assert_eq!(seven.version, 2);
    assert!(!format!("{seven:?}").contains("TOPSECRET"));

    // Kind filter, across pages.
    for kind in Kind::ALL {
        let mut got = Vec::new();
        let mut token = None;
        loop {
            let page = vault.list("acme", Some(kind), 3, token.as_deref()).unwrap();
            assert!(page.credentials.len() <= 3);
            assert!(page.credentials.iter().all(|m| m.kind == kind));
            got.extend(page.credentials.into_iter().map(|m| m.credential));
            match page.next_page_token {
                Some(next) => token = Some(next),
                None => break,
            }
        }
        let expected: Vec<String> = (0..25)
            .filter(|i| Kind::ALL[i % 4] == kind)
            .map(|i| format!("cred-{i:02}"))
            .collect();
        assert_eq!(got, expected, "{kind:?}");
    }
    assert!(
        vault
            .list("nobody", None, 10, None)
            .unwrap()
            .credentials
            .is_empty()
    );
}

// ---------------------------------------------------------------- tenant isolation

#[tokio::test]
async fn another_tenant_sees_nothing_of_a_credential() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let vault = tv.vault();
    tv.seal("acme", "gmail", Kind::CookieJar, b"acme cookies")
        .await;
    let before = tv.scan_all();
    for seal_other_first in [false, true] {
        if seal_other_first {
            tv.seal("globex", "slack", Kind::CookieJar, b"globex cookies")
                .await;
        }
        for version in [None, Some(1)] {
            assert_err(
                vault.unseal("globex", "gmail", version).await,
                |e| matches!(e, Error::NotFound),
                "unseal",
            );
            assert_err(
                vault.metadata("globex", "gmail", version),
                |e| matches!(e, Error::NotFound),
                "metadata",
            );
        }
        assert_err(
            vault.revoke("globex", "gmail", "mallory", "x").await,
            |e| matches!(e, Error::NotFound),
            "revoke",
        );
        let listed = vault.list("globex", None, 0, None).unwrap();
        assert!(listed.credentials.iter().all(|m| m.credential != "gmail"));
        if !seal_other_first {
            assert_eq!(
                tv.scan_all(),
                before,
                "lookups by an unknown tenant create nothing"
            );
        }
    }
    assert_eq!(
        tv.unseal_bytes("acme", "gmail", None).await,
        b"acme cookies"
    );
    assert!(
        vault
            .metadata("acme", "gmail", None)
            .unwrap()
            .revocation
            .is_none()
    );
}

// ---------------------------------------------------------------- Debug

#[tokio::test]
async fn debug_output_never_shows_secret_or_key_bytes() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let secret = b"hunter2-super-secret";
    let shown_bytes = format!("{:?}", secret.to_vec()); // "[104, 117, ...]"
    let leaks = |shown: &str| shown.contains("hunter2") || shown.contains(&shown_bytes[1..20]);

    let s = Secret::new(secret.to_vec());
    assert!(!leaks(&format!("{s:?}")), "{s:?}");
    let req = request("acme", "c", Kind::ApiKey, secret);
    let shown = format!("{req:?} {req:#?}");
    assert!(!leaks(&shown), "{shown}");
    tv.vault().seal(req).await.unwrap();
    let unsealed = tv.vault().unseal("acme", "c", None).await.unwrap();
    assert_eq!(unsealed.secret.expose(), secret);
    let shown = format!("{unsealed:?} {unsealed:#?}");
    assert!(!leaks(&shown), "{shown}");
    assert!(shown.contains("acme"), "metadata is shown: {shown}");

    let key = SymmetricKey::from_slice(&[0xA7; 32]).unwrap();
    let shown = format!("{key:?} {key:#?}");
    assert!(
        !shown.to_lowercase().contains("a7") && !shown.contains("167"),
        "{shown}"
    );
}
