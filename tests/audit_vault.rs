//! The audit log as the vault writes it, over a real sled store: a record per
//! outcome, in the same batch as the change; an Unseal's record durable
//! before the secret is returned, and no secret when it cannot be written
//! (a store that refuses audit appends, wrapped around the real one); no
//! record holds a secret; the chain survives a root key rotation.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use credvault::audit::AuditFilter;
use credvault::clock::ManualClock;
use credvault::crypto::SymmetricKey;
use credvault::error::Error;
use credvault::store::{
    Batch, CommitFuture, ExportCounts, ExportError, ExportSink, Op, Row, Rows, SledStore, Store,
    StoreError, StoreHealth,
};
use credvault::vault::{Caller, Kind, Vault, VaultOptions};

use common::{T0, TestVault, request};

/// The real store, except that while `refuse` is set every batch that appends
/// to the audit log fails as a disk would. With `journal`, it lends the vault
/// its directory, so records of no change go through the audit journal
/// (whose appends to the log it then refuses); without, each is a commit.
struct RefusingAudit {
    inner: Arc<SledStore>,
    refuse: AtomicBool,
    journal: bool,
}

impl Store for RefusingAudit {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.inner.get(key)
    }
    fn scan(&self, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Rows, StoreError> {
        self.inner.scan(prefix, after, limit)
    }
    fn last(&self, prefix: &[u8]) -> Result<Option<Row>, StoreError> {
        self.inner.last(prefix)
    }
    fn commit(&self, batch: Batch) -> CommitFuture<'_> {
        let audits = batch
            .ops
            .iter()
            .any(|op| matches!(op, Op::Append(prefix, _) if prefix.as_slice() == credvault::audit::PREFIX));
        if audits && self.refuse.load(Ordering::SeqCst) {
            return Box::pin(async { Err(StoreError::Backend("injected write failure".into())) });
        }
        self.inner.commit(batch)
    }
    fn export(&self, sink: &mut ExportSink<'_>) -> Result<ExportCounts, ExportError> {
        self.inner.export(sink)
    }
    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
    fn local_dir(&self) -> Option<&std::path::Path> {
        self.journal.then(|| self.inner.local_dir()).flatten()
    }
}

fn caller(rpc: &str) -> Caller {
    Caller::new("spiffe://credvault/executor/runner-7", rpc).with_purpose("task-42")
}

fn records(vault: &Vault) -> Vec<credvault::audit::AuditEntry> {
    vault
        .audit_log()
        .unwrap()
        .query(&AuditFilter::default(), 1000, None)
        .unwrap()
        .entries
}

#[tokio::test]
async fn each_call_is_recorded_once_with_its_outcome_and_never_its_secret() {
    let tv = TestVault::new(VaultOptions::default()).await;
    let vault = tv.vault();
    let secret = b"SESSION=very-secret-cookie-value-0123456789";
    vault
        .seal_as(
            request("acme", "gmail", Kind::CookieJar, secret),
            Some(&caller("Seal")),
        )
        .await
        .unwrap();
    let unsealed = vault
        .unseal_as("acme", "gmail", None, Some(&caller("Unseal")))
        .await
        .unwrap();
    assert_eq!(unsealed.secret.expose(), secret);
    vault
        .revoke_as(
            "acme",
            "gmail",
            "settings",
            "user asked",
            Some(&caller("Revoke")),
        )
        .await
        .unwrap();
    // Idempotent revoke: still one record for the call.
    vault
        .revoke_as(
            "acme",
            "gmail",
            "settings",
            "again",
            Some(&caller("Revoke")),
        )
        .await
        .unwrap();
    // A refused unseal writes nothing itself; the caller records the outcome.
    let refused = vault
        .unseal_as("acme", "gmail", None, Some(&caller("Unseal")))
        .await;
    assert!(matches!(refused, Err(Error::Revoked)));
    vault
        .audit(&caller("Unseal"), "acme", "gmail", 0, "REVOKED")
        .await
        .unwrap();
    vault
        .delete_tenant("acme", None, "settings", Some(&caller("DeleteTenant")))
        .await
        .unwrap();

    let got: Vec<_> = records(vault)
        .into_iter()
        .map(|e| {
            (
                e.sequence,
                e.record.rpc.clone(),
                e.record.version,
                e.record.outcome.clone(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, "Seal".to_string(), 1, "ok".to_string()),
            (2, "Unseal".into(), 1, "ok".into()),
            (3, "Revoke".into(), 0, "ok".into()),
            (4, "Revoke".into(), 0, "ok".into()),
            (5, "Unseal".into(), 0, "REVOKED".into()),
            (6, "DeleteTenant".into(), 0, "ok".into()),
        ]
    );
    let first = &records(vault)[0].record;
    assert_eq!(
        (
            first.caller.as_str(),
            first.tenant.as_str(),
            first.credential.as_str(),
            first.purpose.as_str()
        ),
        (
            "spiffe://credvault/executor/runner-7",
            "acme",
            "gmail",
            "task-42"
        )
    );
    assert!(vault.audit_log().unwrap().verify().unwrap().ok);
    // No audit record holds the secret (or any long piece of it).
    for (key, value) in tv
        .store()
        .scan(credvault::audit::PREFIX, None, usize::MAX)
        .unwrap()
    {
        assert!(!common::contains(&value, &secret[8..24]), "{key:?}");
    }
    // Calls without a caller (library use) write no records.
    vault
        .seal(request("other", "x", Kind::ApiKey, b"k"))
        .await
        .unwrap();
    assert_eq!(records(vault).len(), 6);
}

#[tokio::test]
async fn an_unseal_whose_record_cannot_be_written_fails_and_returns_no_secret() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(RefusingAudit {
        inner: common::open_store(dir.path()),
        refuse: AtomicBool::new(false),
        journal: false,
    });
    let root = SymmetricKey::generate();
    let vault = Vault::open(
        store.clone(),
        root,
        Arc::new(ManualClock::new(T0)),
        VaultOptions::default(),
    )
    .await
    .unwrap();
    vault
        .seal_as(
            request("acme", "openai", Kind::ApiKey, b"sk-live-1"),
            Some(&caller("Seal")),
        )
        .await
        .unwrap();

    store.refuse.store(true, Ordering::SeqCst);
    let result = vault
        .unseal_as("acme", "openai", None, Some(&caller("Unseal")))
        .await;
    assert!(
        matches!(result, Err(Error::AuditUnavailable)),
        "{:?}",
        result.map(|u| u.metadata)
    );
    // A seal whose record cannot be written stores nothing either.
    let sealed = vault
        .seal_as(
            request("acme", "openai", Kind::ApiKey, b"sk-live-2"),
            Some(&caller("Seal")),
        )
        .await;
    assert!(sealed.is_err());
    assert_eq!(vault.metadata("acme", "openai", None).unwrap().version, 1);

    store.refuse.store(false, Ordering::SeqCst);
    let unsealed = vault
        .unseal_as("acme", "openai", None, Some(&caller("Unseal")))
        .await
        .unwrap();
    assert_eq!(unsealed.secret.expose(), b"sk-live-1");
    let outcomes: Vec<_> = records(&vault)
        .into_iter()
        .map(|e| (e.record.rpc, e.record.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("Seal".to_string(), "ok".to_string()),
            ("Unseal".into(), "ok".into())
        ]
    );
}

#[tokio::test]
async fn with_the_journal_a_log_that_refuses_its_records_fails_later_unseals_and_keeps_the_acknowledged_one()
 {
    let dir = tempfile::tempdir().unwrap();
    let root = SymmetricKey::generate();
    let store = Arc::new(RefusingAudit {
        inner: common::open_store(dir.path()),
        refuse: AtomicBool::new(false),
        journal: true,
    });
    let clock = Arc::new(ManualClock::new(T0));
    let open = |store: Arc<dyn Store>| {
        let root = SymmetricKey::from_slice(root.expose_bytes()).unwrap();
        Vault::open(store, root, clock.clone(), VaultOptions::default())
    };
    let vault = open(store.clone()).await.unwrap();
    vault
        .seal_as(
            request("acme", "openai", Kind::ApiKey, b"sk-live-1"),
            Some(&caller("Seal")),
        )
        .await
        .unwrap();

    store.refuse.store(true, Ordering::SeqCst);
    // Durable in the journal, so it returns the secret; the log then refuses it.
    let unsealed = vault
        .unseal_as("acme", "openai", None, Some(&caller("Unseal")))
        .await
        .unwrap();
    assert_eq!(unsealed.secret.expose(), b"sk-live-1");
    // The status waits for the journal, which fails on the refused feed (now,
    // or already at its 5 ms feed): it answers anyway, naming the failure,
    // with the head the store holds.
    let status = vault
        .status()
        .expect("the status answers once the journal failed");
    let failure = status.audit_failure.expect("the journal's failure");
    assert!(failure.contains("injected write failure"), "{failure}");
    assert_eq!(
        status.audit_head.map(|h| h.sequence),
        Some(1),
        "the Seal's record only"
    );
    let problem = vault.serving_problem().expect("a problem to report");
    assert!(problem.contains("audit log refuses records"), "{problem}");
    let log = vault.audit_log().unwrap();
    assert!(log.settled().await.is_err(), "the log took the record");
    // From then on no Unseal returns a secret: fail closed.
    let refused = vault
        .unseal_as("acme", "openai", None, Some(&caller("Unseal")))
        .await;
    assert!(
        matches!(refused, Err(Error::AuditUnavailable)),
        "{:?}",
        refused.map(|u| u.metadata)
    );
    drop(vault);
    drop(store);

    // After a restart the acknowledged record is in the log; the refused call's is not.
    let vault = open(common::open_store(dir.path())).await.unwrap();
    let outcomes: Vec<_> = records(&vault)
        .into_iter()
        .map(|e| (e.record.rpc, e.record.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("Seal".to_string(), "ok".to_string()),
            ("Unseal".into(), "ok".into())
        ]
    );
    assert!(vault.audit_log().unwrap().verify().unwrap().ok);
}

#[tokio::test]
async fn the_chain_survives_a_root_key_rotation_and_a_restart() {
    let mut tv = TestVault::new(VaultOptions::default()).await;
    for i in 0..5 {
        tv.vault()
            .seal_as(
                request("acme", &format!("c{i}"), Kind::ApiKey, b"x"),
                Some(&caller("Seal")),
            )
            .await
            .unwrap();
    }
    let new_root = *SymmetricKey::generate().expose_bytes();
    tv.vault()
        .rotate_root_key(common::key(&new_root))
        .await
        .unwrap();
    tv.root = new_root;
    tv.reopen().await;
    tv.vault()
        .unseal_as("acme", "c1", None, Some(&caller("Unseal")))
        .await
        .unwrap();
    let verification = tv.vault().audit_log().unwrap().verify().unwrap();
    assert!(verification.ok, "{verification:?}");
    assert_eq!(verification.records, 6);
}
