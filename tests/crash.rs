//! Crash safety: every acknowledged seal survives `kill -9`, and the store
//! reopens without repair.
//!
//! The test binary runs itself as the child (`crash_child`, which does nothing
//! unless `CREDVAULT_CRASH_CHILD` names a data directory). The child seals from
//! several tasks at once and prints `ACK <tenant> <credential> <version>` only
//! after `Vault::seal` returned. Most seals are of new credentials; every
//! fourth is the next version of the task's own "hot" credential, so that the
//! move of the replaced latest version out of its slot is killed mid-way too. The parent SIGKILLs it at a random moment, reopens
//! the store and checks every acknowledged secret, byte for byte, and that the
//! multi-record batches (version record + key-usage counter, new data key + KEK
//! counter) were applied all or nothing. Rounds reuse one data directory, so
//! each recovery starts from the wreck of the previous ones; most rounds leave
//! a write-ahead log for the reopen to replay, and at least one must.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use credvault::clock::SystemClock;
use credvault::crypto::SymmetricKey;
use credvault::error::Error;
use credvault::store::records::KeyState;
use credvault::store::{SledStore, Store, layout};
use credvault::vault::{Kind, SealRequest, Vault, VaultOptions};
use rand::RngExt;

use common::{KillOnDrop, SplitMix, request};

const CHILD_ENV: &str = "CREDVAULT_CRASH_CHILD";
const ROOT_KEY_ENV: &str = "CREDVAULT_CRASH_ROOT_KEY";
const ROUND_ENV: &str = "CREDVAULT_CRASH_ROUND";

const ROUNDS: u32 = 24;
const TASKS: u32 = 8;
const TENANTS: u32 = 3;
/// Low, so that data keys and KEKs rotate (more multi-record batches) under the kills.
const ROTATE_AFTER: u64 = 40;
/// Acks from earlier rounds checked again after each crash.
const EARLIER_SAMPLE: usize = 200;
/// How long a child may run if nobody kills it (the parent died).
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn options() -> VaultOptions {
    VaultOptions {
        rotate_after_encryptions: ROTATE_AFTER,
        max_versions: 0,
        ..VaultOptions::default()
    }
}

/// The kind and secret of a credential, recomputable from its name. Most are
/// small; one in 64 is large enough for sled to store it as a separate blob file.
fn expected(tenant: &str, credential: &str) -> (Kind, Vec<u8>) {
    let mut rng = SplitMix::from_str(&format!("{tenant}/{credential}"));
    let kind = Kind::ALL[(rng.next_u64() % 4) as usize];
    let pick = rng.next_u64();
    let len = if pick.is_multiple_of(64) {
        130 * 1024 + (pick >> 8) as usize % (4 * 1024)
    } else {
        1 + (pick >> 8) as usize % 2048
    };
    (kind, rng.bytes(len))
}

/// [`expected`] for version `version` of a credential (its kind stays that of version 1).
fn expected_version(tenant: &str, credential: &str, version: u32) -> (Kind, Vec<u8>) {
    let (kind, first) = expected(tenant, credential);
    match version {
        1 => (kind, first),
        v => (kind, expected(tenant, &format!("{credential}#{v}")).1),
    }
}

/// The credential that task `task` seals a new version of every fourth seal.
fn hot_credential(task: u32) -> String {
    format!("hot/t{task}")
}

fn root_key(hex_text: &str) -> SymmetricKey {
    SymmetricKey::from_slice(&hex::decode(hex_text).expect("hex root key")).expect("32 bytes")
}

fn open_store(path: &Path) -> Arc<SledStore> {
    common::open_store_with(path, 32 << 20)
}

/// The child: seals until killed. Does nothing in an ordinary test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let root = root_key(&std::env::var(ROOT_KEY_ENV).expect("root key variable"));
    let round: u32 = std::env::var(ROUND_ENV)
        .expect("round")
        .parse()
        .expect("round number");
    let store = open_store(Path::new(&dir));
    let vault = Arc::new(
        Vault::open(store, root, Arc::new(SystemClock), options())
            .await
            .unwrap_or_else(|e| panic!("child: vault does not open: {e}")),
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let vault = vault.clone();
            tokio::spawn(async move {
                let tenant = format!("tenant-{}", task % TENANTS);
                let hot = hot_credential(task);
                // Only this task writes it, so its versions follow one another.
                let mut hot_version = match vault.metadata(&tenant, &hot, None) {
                    Ok(meta) => meta.version,
                    Err(Error::NotFound) => 0,
                    Err(e) => panic!("child: metadata of {tenant}/{hot}: {e}"),
                };
                for i in 0.. {
                    if started.elapsed() > CHILD_LIFETIME {
                        return;
                    }
                    let (credential, version, expected_version) = if i % 4 == 3 {
                        (hot.clone(), hot_version + 1, Some(hot_version))
                    } else {
                        (format!("r{round:02}/t{task}/{i}"), 1, None)
                    };
                    let (kind, secret) = self::expected_version(&tenant, &credential, version);
                    let meta = vault
                        .seal(SealRequest {
                            expected_version,
                            ..request(&tenant, &credential, kind, &secret)
                        })
                        .await
                        .unwrap_or_else(|e| panic!("child: seal {tenant}/{credential}: {e}"));
                    assert_eq!(meta.version, version, "child: {tenant}/{credential}");
                    if credential == hot {
                        hot_version = version;
                    }
                    // Only now is the write acknowledged.
                    common::ack(format_args!("{tenant} {credential} {version}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("sealing task");
    }
}

fn spawn_child(
    dir: &Path,
    root_hex: &str,
    round: u32,
) -> (
    KillOnDrop,
    mpsc::Receiver<(String, String, u32)>,
    std::thread::JoinHandle<()>,
) {
    let envs = [
        (CHILD_ENV, dir.display().to_string()),
        (ROOT_KEY_ENV, root_hex.to_owned()),
        (ROUND_ENV, round.to_string()),
    ];
    let (child, lines, reader) = common::spawn_acking_child("crash_child", &envs);
    let (tx, rx) = mpsc::channel();
    let parser = std::thread::spawn(move || {
        for ack in lines {
            let mut fields = ack.split(' ');
            let (Some(tenant), Some(credential), Some(version), None) =
                (fields.next(), fields.next(), fields.next(), fields.next())
            else {
                panic!("not ACK <tenant> <credential> <version>: {ack}");
            };
            let version = version.parse().expect("version number");
            if tx
                .send((tenant.to_owned(), credential.to_owned(), version))
                .is_err()
            {
                return;
            }
        }
        reader.join().expect("ack reader");
    });
    (child, rx, parser)
}

/// An acknowledged seal and what it must unseal to.
struct Acked {
    tenant: String,
    credential: String,
    version: u32,
    kind: Kind,
    secret: Vec<u8>,
}

/// Key-usage counters as (tenant or "" for the KEK ring, version) → uses.
type Counters = BTreeMap<(String, u32), u64>;

/// Reopens the store after a crash and checks everything acknowledged so far.
async fn verify(dir: &Path, root_hex: &str, acked: &[&Acked], previous: &Counters) -> Counters {
    let store = open_store(dir);
    let vault = Vault::open(
        store.clone(),
        root_key(root_hex),
        Arc::new(SystemClock),
        options(),
    )
    .await
    .unwrap_or_else(|e| panic!("vault does not open after a crash: {e}"));

    for Acked {
        tenant,
        credential,
        version,
        kind,
        secret,
    } in acked
    {
        let unsealed = vault
            .unseal(tenant, credential, Some(*version))
            .await
            .unwrap_or_else(|e| panic!("acknowledged {tenant}/{credential} v{version} lost: {e}"));
        assert_eq!(
            unsealed.secret.expose(),
            secret.as_slice(),
            "{tenant}/{credential} v{version}"
        );
        assert_eq!(
            (unsealed.metadata.version, unsealed.metadata.kind),
            (*version, *kind)
        );
        // The latest is this version or one sealed after it.
        let latest = vault.unseal(tenant, credential, None).await.unwrap();
        assert!(latest.metadata.version >= *version, "{tenant}/{credential}");
        if latest.metadata.version > *version {
            let (_, expected) = expected_version(tenant, credential, latest.metadata.version);
            assert_eq!(latest.secret.expose(), expected.as_slice());
        }
    }

    // Batches are all or nothing: every stored version record was counted by
    // exactly one DEK use, and every stored DEK by exactly one KEK use.
    let mut counters = Counters::new();
    let kek_states = vault.kek_states();
    assert_eq!(
        kek_states
            .values()
            .filter(|s| **s == KeyState::Active)
            .count(),
        1,
        "{kek_states:?}"
    );
    for v in kek_states.keys() {
        counters.insert((String::new(), *v), vault.kek_uses(*v).unwrap());
    }
    let mut deks = 0;
    for t in 0..TENANTS {
        let tenant = format!("tenant-{t}");
        let states = vault.dek_states(&tenant).unwrap();
        if states.is_empty() {
            continue;
        }
        assert_eq!(
            states.values().filter(|s| **s == KeyState::Active).count(),
            1,
            "{tenant}: {states:?}"
        );
        deks += states.len() as u64;
        let mut uses = 0;
        for v in states.keys() {
            let n = vault.dek_uses(&tenant, *v).unwrap();
            counters.insert((tenant.clone(), *v), n);
            uses += n;
        }
        let mut prefix = b"v\0".to_vec();
        prefix.extend_from_slice(tenant.as_bytes());
        prefix.push(0);
        let records = store.scan(&prefix, None, usize::MAX).unwrap().len() as u64;
        assert_eq!(uses, records, "{tenant}: data key uses vs. stored versions");
        assert_eq!(
            store
                .scan(&layout::dek_prefix(&tenant), None, usize::MAX)
                .unwrap()
                .len(),
            states.len()
        );
    }
    let kek_uses: u64 = counters
        .iter()
        .filter(|((t, _), _)| t.is_empty())
        .map(|(_, n)| n)
        .sum();
    assert_eq!(kek_uses, deks, "KEK uses vs. stored data keys");
    for (key, before) in previous {
        let now = counters.get(key).copied().unwrap_or(0);
        assert!(
            now >= *before,
            "counter {key:?} went back from {before} to {now}"
        );
    }
    drop(vault);
    assert_eq!(Arc::strong_count(&store), 1);
    counters
}

#[test]
fn acknowledged_seals_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let root_hex = hex::encode(SymmetricKey::generate().expose_bytes());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let mut acked: Vec<Acked> = Vec::new();
    let mut counters = Counters::new();
    let mut per_round = Vec::new();
    let mut replayed = 0;

    for round in 0..ROUNDS {
        let (mut child, acks, reader) = spawn_child(&data, &root_hex, round);
        let mut seen = Vec::new();
        let first = acks
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("round {round}: the child acknowledged nothing"));
        seen.push(first);
        // A random moment: after a random time, or after a random number of acks.
        if rng.random_bool(0.5) {
            std::thread::sleep(Duration::from_millis(rng.random_range(20..=300)));
        } else {
            let want = rng.random_range(1..=400);
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.len() < want && Instant::now() < deadline {
                match acks.recv_timeout(Duration::from_millis(100)) {
                    Ok(ack) => seen.push(ack),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("round {round}: the child stopped by itself ({status}) instead of being killed");
        }
        child.0.kill().expect("SIGKILL"); // Child::kill sends SIGKILL
        let status = child.0.wait().unwrap();
        assert!(!status.success(), "round {round}: {status}");
        // Acks written before the kill are still in the pipe: they count too.
        reader.join().unwrap();
        seen.extend(acks.try_iter());
        assert!(!seen.is_empty());
        per_round.push(seen.len());
        let earlier = acked.len();
        acked.extend(seen.into_iter().map(|(tenant, credential, version)| {
            let (kind, secret) = expected_version(&tenant, &credential, version);
            Acked {
                tenant,
                credential,
                version,
                kind,
                secret,
            }
        }));

        // This round's acks, and earlier ones that went through more crashes: a
        // random sample each round (unsealing in the debug profile is slow), all
        // of them after the last round.
        let check: Vec<&Acked> = if round + 1 == ROUNDS {
            acked.iter().collect()
        } else {
            let mut check: Vec<&Acked> = acked[earlier..].iter().collect();
            if earlier > 0 {
                check.extend((0..EARLIER_SAMPLE).map(|_| &acked[rng.random_range(0..earlier)]));
            }
            check
        };
        // Whether opening will have to replay the store's write-ahead log
        // (the tree is made durable only at checkpoints, about once a second).
        let log_bytes: u64 = std::fs::read_dir(data.join("wal"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        replayed += usize::from(log_bytes > 0);
        counters = runtime.block_on(verify(&data, &root_hex, &check, &counters));
    }
    assert!(
        replayed > 0,
        "no round left a write-ahead log to replay: the recovery path went untested"
    );
    assert!(
        per_round.iter().all(|n| *n > 0),
        "acks per round: {per_round:?}"
    );
    let reseals = acked.iter().filter(|a| a.version > 1).count();
    assert!(
        reseals > ROUNDS as usize,
        "only {reseals} acknowledged seals of a next version: the slot moves went untested"
    );
    let rotated = counters.keys().filter(|(t, _)| !t.is_empty()).count() > TENANTS as usize;
    assert!(rotated, "no data key rotated under the kills: {counters:?}");
    eprintln!(
        "crash rounds: {ROUNDS} ({replayed} replayed the log), acknowledged seals per round: {per_round:?} ({reseals} of a next version), key versions: {}",
        counters.len()
    );
}
