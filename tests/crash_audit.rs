//! Crash safety of audit records: every Unseal that returned its secret has
//! its record in the audit log after `kill -9`, exactly once, and the chain
//! verifies.
//!
//! An Unseal's record is durable in the audit journal when the call returns
//! and reaches the store's log a few milliseconds later, so a kill right after
//! an acknowledgement leaves records that only the journal holds. The test
//! binary runs itself as the child (`audit_crash_child`, which does nothing
//! unless `CREDVAULT_AUDIT_CRASH_CHILD` names a data directory): it unseals from
//! several tasks, each call with its own purpose, and prints `ACK <purpose>`
//! only after `unseal_as` returned. The parent SIGKILLs it at a random moment,
//! counts the acknowledged records the store already holds (opened without
//! the vault, so nothing is replayed), then opens the vault (which appends
//! what the journal holds) and checks every acknowledged purpose. At least one
//! round must have left records to the journal alone.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use credvault::audit::{AuditFilter, Record};
use credvault::clock::SystemClock;
use credvault::crypto::SymmetricKey;
use credvault::store::Store;
use credvault::vault::{Caller, Kind, Vault, VaultOptions};
use prost::Message;
use rand::RngExt;

use common::request;

const CHILD_ENV: &str = "CREDVAULT_AUDIT_CRASH_CHILD";
const ROOT_KEY_ENV: &str = "CREDVAULT_AUDIT_CRASH_ROOT_KEY";
const ROUND_ENV: &str = "CREDVAULT_AUDIT_CRASH_ROUND";
const ROUNDS: u32 = 8;
const TASKS: u32 = 8;
const CALLER: &str = "spiffe://credvault/executor/crash";
/// How long a child may run if nobody kills it (the parent died).
const CHILD_LIFETIME: Duration = Duration::from_secs(60);

fn root_key(hex_text: &str) -> SymmetricKey {
    SymmetricKey::from_slice(&hex::decode(hex_text).expect("hex root key")).expect("32 bytes")
}

/// The child: unseals until killed. Does nothing in an ordinary test run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let root = root_key(&std::env::var(ROOT_KEY_ENV).expect("root key variable"));
    let round: u32 = std::env::var(ROUND_ENV)
        .expect("round")
        .parse()
        .expect("round");
    let store = common::open_store_with(Path::new(&dir), 32 << 20);
    let vault = Vault::open(store, root, Arc::new(SystemClock), VaultOptions::default())
        .await
        .unwrap_or_else(|e| panic!("child: vault does not open: {e}"));
    let vault = Arc::new(vault);
    if round == 0 {
        vault
            .seal(request("acme", "gmail/alice", Kind::CookieJar, b"SID=1"))
            .await
            .expect("child: seal");
    }
    let started = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let vault = vault.clone();
            tokio::spawn(async move {
                for i in 0.. {
                    if started.elapsed() > CHILD_LIFETIME {
                        return;
                    }
                    let purpose = format!("r{round}/t{task}/{i}");
                    let caller = Caller::new(CALLER, "Unseal").with_purpose(purpose.clone());
                    let unsealed = vault
                        .unseal_as("acme", "gmail/alice", None, Some(&caller))
                        .await
                        .unwrap_or_else(|e| panic!("child: unseal: {e}"));
                    assert_eq!(unsealed.secret.expose(), b"SID=1");
                    // Only now has the secret been returned.
                    common::ack(format_args!("{purpose}"));
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("unsealing task");
    }
}

/// The purposes of the Unseal records the store's log holds, with their
/// counts, read from the store alone (no vault: nothing is replayed).
fn purposes_in_store(dir: &Path) -> BTreeMap<String, usize> {
    let store = common::open_store_with(dir, 32 << 20);
    let mut purposes = BTreeMap::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let rows = store
            .scan(credvault::audit::PREFIX, cursor.as_deref(), 1000)
            .expect("scan the audit log");
        let done = rows.len() < 1000;
        for (key, value) in rows {
            let record = Record::decode(value.as_slice()).expect("an audit record");
            if record.rpc == "Unseal" {
                *purposes.entry(record.purpose).or_default() += 1;
            }
            cursor = Some(key);
        }
        if done {
            return purposes;
        }
    }
}

#[test]
fn acknowledged_unseals_keep_their_audit_records_through_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let root_hex = hex::encode(SymmetricKey::generate().expose_bytes());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rng = rand::rng();
    let mut acked: Vec<String> = Vec::new();
    let mut journal_only = Vec::new();

    for round in 0..ROUNDS {
        let envs = [
            (CHILD_ENV, data.display().to_string()),
            (ROOT_KEY_ENV, root_hex.clone()),
            (ROUND_ENV, round.to_string()),
        ];
        let (mut child, acks, reader) = common::spawn_acking_child("audit_crash_child", &envs);
        let first = acks
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("round {round}: the child acknowledged nothing"));
        std::thread::sleep(Duration::from_millis(rng.random_range(5..=200)));
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("round {round}: the child stopped by itself ({status}) instead of being killed");
        }
        child.0.kill().expect("SIGKILL");
        assert!(!child.0.wait().unwrap().success());
        // Acks written before the kill are still in the pipe: they count too.
        reader.join().unwrap();
        acked.push(first);
        acked.extend(acks.try_iter());

        let before = purposes_in_store(&data);
        journal_only.push(acked.iter().filter(|p| !before.contains_key(*p)).count());

        let all = runtime.block_on(async {
            let store = common::open_store_with(&data, 32 << 20);
            let vault = Vault::open(
                store,
                root_key(&root_hex),
                Arc::new(SystemClock),
                VaultOptions::default(),
            )
            .await
            .expect("the vault opens after a crash");
            let log = vault.audit_log().expect("audit log");
            let verification = log.verify().expect("verify");
            assert!(verification.ok, "round {round}: {verification:?}");
            let filter = AuditFilter {
                caller: Some(CALLER.into()),
                ..AuditFilter::default()
            };
            let mut purposes: BTreeMap<String, usize> = BTreeMap::new();
            let mut token = None;
            loop {
                let page = log.query(&filter, 1000, token.as_deref()).expect("query");
                for entry in page.entries {
                    assert_eq!(entry.record.outcome, "ok");
                    *purposes.entry(entry.record.purpose).or_default() += 1;
                }
                match page.next_page_token {
                    Some(next) => token = Some(next),
                    None => break,
                }
            }
            purposes
        });
        for purpose in &acked {
            assert_eq!(
                all.get(purpose),
                Some(&1),
                "round {round}: the acknowledged Unseal {purpose} is not in the log exactly once"
            );
        }
        // Records of calls killed before they returned may be there too (their
        // record was durable, the reply never left); never twice.
        assert!(
            all.values().all(|n| *n == 1),
            "round {round}: a record appears twice"
        );
    }
    assert!(
        journal_only.iter().any(|n| *n > 0),
        "no round left acknowledged records to the journal alone: its replay went untested \
         ({journal_only:?})"
    );
    eprintln!(
        "audit crash rounds: {ROUNDS}, acknowledged unseals: {}, held only by the journal at each kill: {journal_only:?}",
        acked.len()
    );
}
