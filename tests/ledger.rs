//! The usage ledger against the records it summarises: after every step of long
//! random sequences of seals (with pruning and DEK and KEK rotations) and
//! revokes, across restarts and under concurrent writers, `Vault::key_status`
//! must equal what a full scan of the store counts. Rotation jobs (KEK rewraps,
//! tenant re-encryptions) and destroy attempts are steps too. Also: a fresh vault's
//! status, and a store written before the ledger existed gets it counted once.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use credvault::clock::ManualClock;
use credvault::crypto::SymmetricKey;
use credvault::error::{Error, Invalid};
use credvault::store::records::{
    DekRecord, KekRecord, KeyState, RootCheck, VersionRecord, VersionState,
};
use credvault::store::{Batch, Store, layout};
use credvault::vault::{
    DekStatus, JobState, KekStatus, KeyLayer, KeyStatus, Kind, RootKeyStatus, Vault, VaultOptions,
};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use prost::Message;

use common::{SplitMix, T0, TestVault, request};

const TENANTS: u8 = 3;
const CREDENTIALS: u8 = 4;

/// Small limits, so that pruning and rotations at both layers happen often.
fn churning() -> VaultOptions {
    VaultOptions {
        max_secret_bytes: 4096,
        max_versions: 3,
        rotate_after_encryptions: 3,
        ..VaultOptions::default()
    }
}

fn tenant(t: u8) -> String {
    format!("tenant-{t}")
}

fn credential(c: u8) -> String {
    format!("cred/{c}")
}

/// Payload seals per (tenant, DEK version), as the seals (and the
/// re-encryptions) made them.
type Seals = BTreeMap<(String, u32), u64>;

/// DEK wraps a KEK made whose DEK records a rewrap moved to a newer KEK.
type MovedAway = BTreeMap<u32, u64>;

/// The status a full scan of the store implies: every record decoded and
/// counted. A KEK's encryptions are the DEK records that name it plus those
/// rewrapped away from it (`moved`); a DEK's encryptions come from `seals`.
fn status_from_scan(store: &dyn Store, seals: &Seals, moved: &MovedAway) -> KeyStatus {
    let rows = common::scan_all(store);
    let table = |tag: u8| {
        rows.iter()
            .filter(move |(k, _)| k.len() > 2 && k[0] == tag && k[1] == 0)
    };
    let check =
        RootCheck::decode(store.get(layout::ROOT_CHECK).unwrap().unwrap().as_slice()).unwrap();

    // `d\0{tenant}\0{v:u32}`
    let mut deks: Vec<(String, DekRecord)> = table(b'd')
        .map(|(k, v)| {
            let tenant = String::from_utf8(k[2..k.len() - 5].to_vec()).unwrap();
            (tenant, DekRecord::decode(v.as_slice()).unwrap())
        })
        .collect();
    deks.sort_by(|a, b| (&a.0, a.1.version).cmp(&(&b.0, b.1.version)));

    // `v\0{tenant}\0{credential}\0{v:u32}`: live versions per (tenant, DEK).
    let mut live: BTreeMap<(String, u32), u64> = BTreeMap::new();
    for (k, v) in table(b'v') {
        let rest = &k[2..];
        let tenant =
            String::from_utf8(rest[..rest.iter().position(|b| *b == 0).unwrap()].to_vec()).unwrap();
        let record = VersionRecord::decode(v.as_slice()).unwrap();
        assert_eq!(
            record.ciphertext.is_empty(),
            record.state() == VersionState::Revoked,
            "a version holds a ciphertext exactly when it is live"
        );
        if record.state() == VersionState::Live {
            *live.entry((tenant, record.dek_version)).or_default() += 1;
        }
    }

    let keks: Vec<KekRecord> = table(b'k')
        .map(|(_, v)| KekRecord::decode(v.as_slice()).unwrap())
        .collect();
    let wraps = |kek: u32, only_live: bool| {
        deks.iter()
            .filter(|(_, d)| {
                d.kek_version == kek && (!only_live || d.state() != KeyState::Destroyed)
            })
            .count() as u64
    };
    KeyStatus {
        root: RootKeyStatus {
            version: check.root_version,
            created_at_ms: check.created_at_ms,
            wrapped_keks: keks
                .iter()
                .filter(|k| k.state() != KeyState::Destroyed)
                .count() as u64,
        },
        keks: keks
            .iter()
            .map(|k| KekStatus {
                version: k.version,
                state: k.state(),
                created_at_ms: k.created_at_ms,
                retired_at_ms: (k.retired_at_ms != 0).then_some(k.retired_at_ms),
                destroyed_at_ms: (k.destroyed_at_ms != 0).then_some(k.destroyed_at_ms),
                encryptions: wraps(k.version, false) + moved.get(&k.version).copied().unwrap_or(0),
                wrapped_deks: wraps(k.version, true),
            })
            .collect(),
        deks: deks
            .iter()
            .map(|(tenant, d)| DekStatus {
                tenant: tenant.clone(),
                version: d.version,
                kek_version: d.kek_version,
                state: d.state(),
                created_at_ms: d.created_at_ms,
                retired_at_ms: (d.retired_at_ms != 0).then_some(d.retired_at_ms),
                destroyed_at_ms: (d.destroyed_at_ms != 0).then_some(d.destroyed_at_ms),
                encryptions: seals
                    .get(&(tenant.clone(), d.version))
                    .copied()
                    .unwrap_or(0),
                protected_versions: live.get(&(tenant.clone(), d.version)).copied().unwrap_or(0),
            })
            .collect(),
    }
}

/// The ledger equals the scan, for the whole vault and for `tenant` alone.
fn assert_ledger_matches_scan(
    vault: &Vault,
    store: &dyn Store,
    seals: &Seals,
    moved: &MovedAway,
    tenant: &str,
    step: &str,
) -> Result<(), TestCaseError> {
    let scanned = status_from_scan(store, seals, moved);
    let ledger = vault.key_status(None).unwrap();
    prop_assert_eq!(&ledger, &scanned, "after {}", step);
    if let Ok(one) = vault.key_status(Some(tenant)) {
        let expected = KeyStatus {
            deks: scanned
                .deks
                .iter()
                .filter(|d| d.tenant == tenant)
                .cloned()
                .collect(),
            ..scanned
        };
        prop_assert_eq!(one, expected, "{} alone, after {}", tenant, step);
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Step {
    Seal {
        tenant: u8,
        credential: u8,
        size: usize,
    },
    Revoke {
        tenant: u8,
        credential: u8,
    },
    Reopen,
    /// A new primary KEK and its rewrap job, run to the end.
    RotateKek,
    /// A new primary DEK for the tenant and its re-encryption job, run to the end.
    Reencrypt {
        tenant: u8,
    },
    /// Destroy a key version (the tenant's DEK `pick` modulo its ring, or a KEK):
    /// refused exactly when it is the primary or the ledger says it is in use.
    Destroy {
        tenant: u8,
        pick: u8,
        kek: bool,
    },
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        12 => (0..TENANTS, 0..CREDENTIALS, 0usize..=4096)
            .prop_map(|(tenant, credential, size)| Step::Seal { tenant, credential, size }),
        4 => (0..TENANTS, 0..CREDENTIALS).prop_map(|(tenant, credential)| Step::Revoke { tenant, credential }),
        1 => Just(Step::Reopen),
        1 => Just(Step::RotateKek),
        1 => (0..TENANTS).prop_map(|tenant| Step::Reencrypt { tenant }),
        2 => (0..TENANTS, any::<u8>(), any::<bool>())
            .prop_map(|(tenant, pick, kek)| Step::Destroy { tenant, pick, kek }),
    ];
    prop::collection::vec(step, 150..=250)
}

/// What a credential's latest version must unseal to (`None`: revoked).
type Latest = BTreeMap<(String, String), Option<Vec<u8>>>;

async fn run_sequence(steps: Vec<Step>) -> Result<(), TestCaseError> {
    let mut tv = TestVault::new(churning()).await;
    let mut seals = Seals::new();
    let mut moved = MovedAway::new();
    let mut latest = Latest::new();
    let middle = steps.len() / 2;
    for (i, step) in steps.into_iter().enumerate() {
        tv.clock.advance_ms(1000);
        let touched = match step {
            Step::Seal {
                tenant: t,
                credential: c,
                size,
            } => {
                let (tenant, credential) = (tenant(t), credential(c));
                let secret = SplitMix::from_str(&format!("{i}/{tenant}/{credential}")).bytes(size);
                let meta = tv
                    .vault()
                    .seal(request(&tenant, &credential, Kind::Generic, &secret))
                    .await
                    .map_err(|e| TestCaseError::fail(format!("step {i}: seal: {e}")))?;
                *seals.entry((tenant.clone(), meta.dek_version)).or_default() += 1;
                latest.insert((tenant.clone(), credential), Some(secret));
                tenant
            }
            Step::Revoke {
                tenant: t,
                credential: c,
            } => {
                let (tenant, credential) = (tenant(t), credential(c));
                let result = tv
                    .vault()
                    .revoke(&tenant, &credential, "test", "random")
                    .await;
                match (
                    &result,
                    latest.contains_key(&(tenant.clone(), credential.clone())),
                ) {
                    (Ok(_), true) => {
                        latest.insert((tenant.clone(), credential), None);
                    }
                    (Err(Error::NotFound), false) => {}
                    _ => return Err(TestCaseError::fail(format!("step {i}: revoke: {result:?}"))),
                }
                tenant
            }
            Step::Reopen => {
                tv.reopen().await;
                tenant(0)
            }
            Step::RotateKek => {
                let before = wraps_and_live(&**tv.store());
                let job = tv.vault().rotate_kek().await.unwrap();
                let done = run_to_end(tv.vault(), &job.id).await?;
                let after = wraps_and_live(&**tv.store());
                account(&before, &after, done, true, &mut seals, &mut moved, i)?;
                tenant(0)
            }
            Step::Reencrypt { tenant: t } => {
                let tenant = tenant(t);
                let before = wraps_and_live(&**tv.store());
                match tv.vault().rotate_tenant_key(&tenant, true).await {
                    Ok(job) => {
                        let done = run_to_end(tv.vault(), &job.id).await?;
                        let after = wraps_and_live(&**tv.store());
                        account(&before, &after, done, false, &mut seals, &mut moved, i)?;
                    }
                    Err(Error::NotFound) => {
                        prop_assert!(!latest.keys().any(|(t, _)| *t == tenant), "step {}", i);
                    }
                    Err(e) => return Err(TestCaseError::fail(format!("step {i}: rotate: {e}"))),
                }
                tenant
            }
            Step::Destroy {
                tenant: t,
                pick,
                kek,
            } => {
                let tenant = tenant(t);
                let status = tv.vault().key_status(None).unwrap();
                let target = if kek {
                    let k = &status.keks[pick as usize % status.keks.len()];
                    Some((KeyLayer::Kek, k.version, k.state, k.wrapped_deks))
                } else {
                    let ring: Vec<_> = status.deks.iter().filter(|d| d.tenant == tenant).collect();
                    (!ring.is_empty()).then(|| {
                        let d = ring[pick as usize % ring.len()];
                        (KeyLayer::Dek, d.version, d.state, d.protected_versions)
                    })
                };
                if let Some((layer, version, state, refs)) = target {
                    let result = tv
                        .vault()
                        .destroy_key_version(layer, Some(&tenant), version)
                        .await;
                    match (state, refs, &result) {
                        (KeyState::Active, _, Err(Error::PrimaryKey { .. })) => {}
                        (KeyState::Destroyed, _, Ok(())) => {}
                        (KeyState::DecryptOnly, 0, Ok(())) => {}
                        (KeyState::DecryptOnly, n, Err(Error::KeyInUse { count, .. }))
                            if *count == n => {}
                        _ => {
                            return Err(TestCaseError::fail(format!(
                                "step {i}: destroy {layer:?} v{version} ({state:?}, {refs} refs): {result:?}"
                            )));
                        }
                    }
                }
                tenant
            }
        };
        if i == middle {
            // The counts are in the store, not in memory: a restart keeps them.
            let before = tv.vault().key_status(None).unwrap();
            tv.reopen().await;
            prop_assert_eq!(
                tv.vault().key_status(None).unwrap(),
                before,
                "reopen at step {}",
                i
            );
        }
        assert_ledger_matches_scan(
            tv.vault(),
            &**tv.store(),
            &seals,
            &moved,
            &touched,
            &format!("step {i}"),
        )?;
    }

    // The churn really happened: versions pruned, keys rotated at both layers.
    let status = tv.vault().key_status(None).unwrap();
    prop_assert!(status.keks.len() > 1, "no KEK rotation");
    prop_assert!(status.deks.iter().any(|d| d.version > 1), "no DEK rotation");
    // Jobs moved records, and retired versions got destroyed.
    let jobs = tv.vault().rotation_jobs().unwrap();
    prop_assert!(
        jobs.iter().map(|j| j.done).sum::<u64>() > 0,
        "no job moved anything"
    );
    prop_assert!(jobs.iter().all(|j| j.state == JobState::Done));
    // And every credential still reads back as the model says.
    for ((tenant, credential), secret) in &latest {
        let got = tv.vault().unseal(tenant, credential, None).await;
        match (secret, got) {
            (Some(secret), Ok(u)) => prop_assert_eq!(u.secret.expose(), secret.as_slice()),
            (None, Err(Error::Revoked)) => {}
            (want, got) => {
                return Err(TestCaseError::fail(format!(
                    "{tenant}/{credential}: want {:?}, got {got:?}",
                    want.as_ref().map(Vec::len)
                )));
            }
        }
    }
    Ok(())
}

/// DEK records per KEK version (destroyed included), and live versions per
/// (tenant, DEK version).
type Snapshot = (BTreeMap<u32, u64>, BTreeMap<(String, u32), u64>);

fn wraps_and_live(store: &dyn Store) -> Snapshot {
    let mut wraps = BTreeMap::new();
    let mut live = BTreeMap::new();
    for (k, v) in common::scan_all(store) {
        match k.first() {
            Some(b'd') => {
                *wraps
                    .entry(DekRecord::decode(v.as_slice()).unwrap().kek_version)
                    .or_default() += 1;
            }
            Some(b'v') => {
                let rest = &k[2..];
                let tenant =
                    String::from_utf8(rest[..rest.iter().position(|b| *b == 0).unwrap()].to_vec())
                        .unwrap();
                let record = VersionRecord::decode(v.as_slice()).unwrap();
                if record.state() == VersionState::Live {
                    *live.entry((tenant, record.dek_version)).or_default() += 1;
                }
            }
            _ => {}
        }
    }
    (wraps, live)
}

/// Runs the jobs and returns how many records the job `id` changed, checking
/// that it finished with done == total.
async fn run_to_end(vault: &Vault, id: &str) -> Result<u64, TestCaseError> {
    vault
        .run_jobs()
        .await
        .map_err(|e| TestCaseError::fail(format!("run jobs: {e}")))?;
    let job = vault.rotation_job(id).unwrap();
    prop_assert_eq!(job.state, JobState::Done);
    prop_assert_eq!(job.done, job.total);
    Ok(job.done)
}

/// Moves the model by what a job changed (no seal or revoke ran meanwhile):
/// records that left a key version still count in its encryptions; records that
/// arrived at one were encrypted by it. Exactly `done` records moved.
fn account(
    before: &Snapshot,
    after: &Snapshot,
    done: u64,
    rewrap: bool,
    seals: &mut Seals,
    moved: &mut MovedAway,
    step: usize,
) -> Result<(), TestCaseError> {
    let (mut left, mut arrived_total) = (0u64, 0u64);
    let kek_versions: BTreeSet<u32> = before.0.keys().chain(after.0.keys()).copied().collect();
    for k in kek_versions {
        let (b, a) = (
            before.0.get(&k).copied().unwrap_or(0),
            after.0.get(&k).copied().unwrap_or(0),
        );
        if a < b {
            *moved.entry(k).or_default() += b - a;
            left += b - a;
        }
    }
    let deks: BTreeSet<(String, u32)> = before.1.keys().chain(after.1.keys()).cloned().collect();
    let mut reencrypted_away = 0u64;
    for key in deks {
        let (b, a) = (
            before.1.get(&key).copied().unwrap_or(0),
            after.1.get(&key).copied().unwrap_or(0),
        );
        if a > b {
            *seals.entry(key).or_default() += a - b;
            arrived_total += a - b;
        } else {
            reencrypted_away += b - a;
        }
    }
    if rewrap {
        prop_assert_eq!(left, done, "step {}: DEKs rewrapped", step);
        prop_assert_eq!(arrived_total, 0, "step {}: a rewrap moved payloads", step);
    } else {
        prop_assert_eq!(arrived_total, done, "step {}: versions re-encrypted", step);
        prop_assert_eq!(
            reencrypted_away,
            done,
            "step {}: versions re-encrypted away",
            step
        );
    }
    Ok(())
}

#[test]
fn the_ledger_matches_a_full_scan_after_every_step() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 6,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&steps(), |steps| rt.block_on(run_sequence(steps)))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_seals_and_revokes_keep_the_ledger_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open_store(dir.path());
    let root = *SymmetricKey::generate().expose_bytes();
    let clock = Arc::new(ManualClock::new(T0));
    let options = VaultOptions {
        max_versions: 2,
        ..churning()
    };
    let vault = Arc::new(
        common::open_vault(&store, &root, &clock, options)
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = (0..8u64)
        .map(|task| {
            let vault = vault.clone();
            tokio::spawn(async move {
                let mut rng = SplitMix::from_str(&format!("task {task}"));
                let mut seals = Seals::new();
                for _ in 0..40 {
                    let tenant = tenant((rng.next_u64() % 2) as u8);
                    let credential = credential((rng.next_u64() % 3) as u8);
                    if rng.next_u64().is_multiple_of(4) {
                        match vault.revoke(&tenant, &credential, "test", "race").await {
                            Ok(_) | Err(Error::NotFound) => {}
                            Err(e) => panic!("revoke: {e}"),
                        }
                    } else {
                        let len = (rng.next_u64() % 512) as usize;
                        let secret = rng.bytes(len);
                        let meta = vault
                            .seal(request(&tenant, &credential, Kind::ApiKey, &secret))
                            .await
                            .unwrap_or_else(|e| panic!("seal: {e}"));
                        *seals.entry((tenant, meta.dek_version)).or_default() += 1;
                    }
                }
                seals
            })
        })
        .collect();
    let mut seals = Seals::new();
    for task in tasks {
        for (key, n) in task.await.unwrap() {
            *seals.entry(key).or_default() += n;
        }
    }
    assert!(seals.values().sum::<u64>() > 150, "{seals:?}");
    assert!(seals.keys().any(|(_, dek)| *dek > 1), "no DEK rotation");
    assert_ledger_matches_scan(
        &vault,
        &*store,
        &seals,
        &MovedAway::new(),
        "tenant-1",
        "concurrent writers",
    )
    .unwrap();
}

#[tokio::test]
async fn keeping_one_version_releases_the_replaced_latest() {
    // With one version kept, each seal drops the latest it replaces instead of
    // moving it to its numbered place; its DEK (a rotation each two seals)
    // must lose the reference.
    let tv = TestVault::new(VaultOptions {
        max_versions: 1,
        rotate_after_encryptions: 2,
        ..VaultOptions::default()
    })
    .await;
    let mut seals = Seals::new();
    for i in 0..7u8 {
        let meta = tv
            .vault()
            .seal(request("tenant-0", "cred/0", Kind::Generic, &[i; 16]))
            .await
            .unwrap();
        *seals
            .entry(("tenant-0".into(), meta.dek_version))
            .or_default() += 1;
    }
    assert!(seals.len() > 2, "{seals:?}");
    let stored = tv
        .store()
        .scan(
            &layout::version_prefix("tenant-0", "cred/0"),
            None,
            usize::MAX,
        )
        .unwrap();
    assert_eq!(
        stored.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        [layout::latest("tenant-0", "cred/0")]
    );
    assert_ledger_matches_scan(
        tv.vault(),
        &**tv.store(),
        &seals,
        &MovedAway::new(),
        "tenant-0",
        "seven seals keeping one",
    )
    .unwrap();
}

#[tokio::test]
async fn a_fresh_vault_has_root_v1_and_one_active_kek_protecting_nothing() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let expected = KeyStatus {
        root: RootKeyStatus {
            version: 1,
            created_at_ms: T0,
            wrapped_keks: 1,
        },
        keks: vec![KekStatus {
            version: 1,
            state: KeyState::Active,
            created_at_ms: T0,
            retired_at_ms: None,
            destroyed_at_ms: None,
            encryptions: 0,
            wrapped_deks: 0,
        }],
        deks: vec![],
    };
    assert_eq!(tv.vault().key_status(None).unwrap(), expected);
    assert!(matches!(
        tv.vault().key_status(Some("nobody")),
        Err(Error::NotFound)
    ));
    assert!(matches!(
        tv.vault().key_status(Some("not a tenant!")),
        Err(Error::Invalid(Invalid::TenantId))
    ));

    // The first seal: the tenant's DEK v1 is wrapped by KEK v1 and protects one version.
    tv.clock.advance_ms(5);
    tv.seal("acme", "openai", Kind::ApiKey, b"sk-1").await;
    let status = tv.vault().key_status(Some("acme")).unwrap();
    assert_eq!(
        (status.keks[0].encryptions, status.keks[0].wrapped_deks),
        (1, 1)
    );
    assert_eq!(
        status.deks,
        [DekStatus {
            tenant: "acme".into(),
            version: 1,
            kek_version: 1,
            state: KeyState::Active,
            created_at_ms: T0 + 5,
            retired_at_ms: None,
            destroyed_at_ms: None,
            encryptions: 1,
            protected_versions: 1,
        }]
    );
    // Revoked: still sealed once, protects nothing.
    tv.vault()
        .revoke("acme", "openai", "test", "gone")
        .await
        .unwrap();
    let dek = &tv.vault().key_status(Some("acme")).unwrap().deks[0];
    assert_eq!((dek.encryptions, dek.protected_versions), (1, 0));
}

#[tokio::test]
async fn the_counts_live_in_the_store_and_an_old_store_gets_them_counted_once() {
    let mut tv = TestVault::new(churning()).await;
    for i in 0..20u32 {
        let (tenant, credential) = (tenant((i % 2) as u8), credential((i % 3) as u8));
        tv.seal(&tenant, &credential, Kind::Generic, &i.to_be_bytes())
            .await;
        if i % 7 == 6 {
            tv.vault()
                .revoke(&tenant, &credential, "test", "x")
                .await
                .unwrap();
        }
    }
    let status = tv.vault().key_status(None).unwrap();
    assert!(status.deks.iter().any(|d| d.protected_versions > 0));
    let refs = |tv: &TestVault| {
        tv.store()
            .scan(&layout::refs_prefix(), None, usize::MAX)
            .unwrap()
    };
    let stored = refs(&tv);
    // One count per key version, from its creation.
    assert_eq!(stored.len(), status.keks.len() + status.deks.len());

    // Opening does not recount: a count changed behind the vault's back stays
    // changed (which is why it must be right all along).
    let key = layout::dek_refs("tenant-0", 1);
    let mut batch = Batch::default();
    batch.put(key.clone(), layout::encode_counter(999));
    tv.store().commit(batch).await.unwrap();
    tv.reopen().await;
    let tampered = tv.vault().key_status(Some("tenant-0")).unwrap();
    assert_eq!(tampered.deks[0].protected_versions, 999);

    // A store from before the ledger: no mark, no counts. Opening counts them.
    let mut batch = Batch::default();
    batch.delete(layout::LEDGER.to_vec());
    for (key, _) in &stored {
        batch.delete(key.clone());
    }
    tv.store().commit(batch).await.unwrap();
    assert!(refs(&tv).is_empty());
    tv.reopen().await;
    assert_eq!(tv.vault().key_status(None).unwrap(), status);
    assert_eq!(refs(&tv), stored);
    assert_eq!(
        tv.store().get(layout::LEDGER).unwrap(),
        Some(layout::encode_counter(layout::LEDGER_VERSION))
    );
    let tenants: BTreeSet<_> = status.deks.iter().map(|d| d.tenant.clone()).collect();
    assert_eq!(tenants, BTreeSet::from([tenant(0), tenant(1)]));
}

/// Pages of the key status, however small, add up to the whole of it: the
/// root and KEK rows once, on the first page, then every DEK row once, in
/// order; a malformed or foreign token is refused.
#[tokio::test]
async fn key_status_pages_add_up_to_the_whole_ledger() {
    let tv = TestVault::new(VaultOptions::default()).await;
    for tenant in ["acme", "beta", "cyan", "delta", "echo"] {
        tv.seal(tenant, "c", Kind::ApiKey, b"s").await;
    }
    for tenant in ["beta", "delta"] {
        tv.vault().rotate_tenant_key(tenant, false).await.unwrap();
    }
    tv.vault().rotate_kek().await.unwrap();
    let vault = tv.vault();
    let whole = vault.key_status(None).unwrap();
    assert_eq!(whole.deks.len(), 7);
    assert_eq!(whole.keks.len(), 2);

    for page_size in [1, 2, 3, 7, 8, 1000] {
        let mut pages = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = vault
                .key_status_page(None, page_size, token.as_deref())
                .unwrap();
            assert!(page.deks.len() <= page_size);
            assert_eq!(
                page.head.is_some(),
                pages.is_empty(),
                "head on the first page only"
            );
            token = page.next_page_token.clone();
            pages.push(page);
            if token.is_none() {
                break;
            }
            assert!(pages.len() <= 8, "page size {page_size}: no end");
        }
        let (root, keks) = pages[0].head.clone().unwrap();
        assert_eq!((root, keks), (whole.root.clone(), whole.keks.clone()));
        let deks: Vec<DekStatus> = pages.iter().flat_map(|p| p.deks.clone()).collect();
        assert_eq!(deks, whole.deks, "page size {page_size}");
        assert_eq!(
            pages.len(),
            7usize.div_ceil(page_size).max(1),
            "page size {page_size}"
        );
    }
    // One tenant's pages.
    let first = vault.key_status_page(Some("delta"), 1, None).unwrap();
    assert_eq!(first.next_page_token.as_deref(), Some("delta/1"));
    let second = vault
        .key_status_page(Some("delta"), 1, Some("delta/1"))
        .unwrap();
    assert_eq!(
        (second.deks[0].tenant.as_str(), second.deks[0].version),
        ("delta", 2)
    );
    assert_eq!(second.next_page_token, None);
    for bad in ["", "delta", "delta/x", "del ta/1", "delta/1/2", "acme/1"] {
        assert!(
            matches!(
                vault.key_status_page(Some("delta"), 1, Some(bad)),
                Err(Error::Invalid(Invalid::PageToken))
            ),
            "{bad:?}"
        );
    }
}
