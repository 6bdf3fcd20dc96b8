//! Online backups and the offline restore, end to end: a real server on
//! 127.0.0.1 over mutual TLS with certificates made in the test, sled stores
//! in temp dirs.
//!
//! - A backup taken while seals and unseals run restores into a new data
//!   directory that a server then serves: every secret acknowledged before the
//!   backup started unseals to its exact bytes, a revoked credential stays
//!   revoked, a deleted tenant stays deleted, a secret sealed after the backup
//!   returned is not there, and the audit chain verifies.
//! - A backup with any flipped bit, cut short or extended, or opened with
//!   another root key, restores nothing and leaves nothing behind.
//! - Backup refuses a relative or non-empty directory and changes nothing;
//!   every call is audited.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use credvault::crypto::{SymmetricKey, root};
use credvault::error::Error;
use credvault::service::pb::{self, CredentialKind};
use credvault::store::StoreOptions;
use credvault::vault::backup;
use tonic::Code;

use support::{
    Acked, TestServer, assert_all_unseal, expect_status, reason, seal_all, seal_request,
    secret_bytes, unseal_request,
};

fn items(tenant: &str, n: usize, seed: u64) -> Vec<(String, String, Vec<u8>)> {
    (0..n)
        .map(|i| {
            (
                tenant.to_owned(),
                format!("cred/{i:03}"),
                secret_bytes(seed + i as u64, 64 + i * 37 % 3000),
            )
        })
        .collect()
}

fn root_key(server: &TestServer) -> SymmetricKey {
    root::load_file(
        server
            .config
            .root_key_file
            .as_deref()
            .expect("root key file"),
    )
    .expect("root key")
}

fn backup_reason(error: &Error) -> &'static str {
    error.reason()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_load_restores_into_a_store_a_server_serves() {
    let mut server = TestServer::start().await;
    let [settings_cert, executor_cert, admin_cert] =
        ["settings", "executor", "admin"].map(|role| server.pki.role(role));
    let settings = server.vault(&settings_cert).await;
    let executor = server.vault(&executor_cert).await;
    let mut admin = server.admin(&admin_cert).await;
    let mut acked: Vec<Acked> = Vec::new();
    for (t, tenant) in ["acme", "globex", "initech"].iter().enumerate() {
        acked.extend(
            seal_all(&settings, items(tenant, 60, 1000 * t as u64), 8, |_| {
                CredentialKind::CookieJar
            })
            .await,
        );
    }
    let mut s = settings.clone();
    s.revoke(pb::RevokeRequest {
        tenant_id: "acme".into(),
        credential_id: "cred/000".into(),
        reason: "backup test".into(),
    })
    .await
    .expect("revoke");
    s.delete_tenant(pb::DeleteTenantRequest {
        tenant_id: "initech".into(),
        grace_seconds: None,
    })
    .await
    .expect("delete tenant");

    // Seals and unseals run all through the backup.
    let stop = Arc::new(AtomicBool::new(false));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (mut settings, mut executor, stop) =
                (settings.clone(), executor.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    settings
                        .seal(seal_request(
                            "globex",
                            &format!("load/{w}/{n}"),
                            CredentialKind::ApiKey,
                            b"during",
                        ))
                        .await
                        .expect("seal under load");
                    executor
                        .unseal(unseal_request("acme", &format!("cred/{:03}", 1 + n % 59)))
                        .await
                        .expect("unseal under load");
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;

    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("backups").join("b1");
    let written = admin
        .backup(pb::BackupRequest {
            directory: target.display().to_string(),
        })
        .await
        .expect("backup")
        .into_inner();
    stop.store(true, Ordering::Relaxed);
    let mut during = 0;
    for task in load {
        during += task.await.expect("load task");
    }
    assert!(during > 0, "the load ran while the backup did");
    let file = target.join(backup::FILE_NAME);
    assert_eq!(written.file, file.display().to_string());
    assert_eq!(written.bytes, std::fs::metadata(&file).unwrap().len());
    assert!(written.records >= 180, "{written:?}");
    assert_eq!(written.root_version, 1);
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(&target).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(
        std::fs::read_dir(&target).unwrap().count(),
        1,
        "only the backup file"
    );

    // Sealed after the backup returned: not in it.
    let mut s = settings.clone();
    s.seal(seal_request(
        "acme",
        "after/backup",
        CredentialKind::ApiKey,
        b"later",
    ))
    .await
    .expect("seal after");
    let root = root_key(&server);
    server.stop().await.expect("stop");

    let restored = dir.path().join("restored");
    let summary = backup::restore(&target, &StoreOptions::new(&restored), &root).expect("restore");
    assert_eq!(
        (summary.rows, summary.changes),
        (written.records, written.changes)
    );
    assert_eq!(summary.bytes, written.bytes);
    assert_eq!(
        (summary.created_at_ms, summary.consistent_at_ms),
        (written.created_at_ms, written.consistent_at_ms)
    );
    assert!(
        written.consistent_at_ms >= written.created_at_ms,
        "{written:?}"
    );
    server
        .restart_with(|c| {
            c.insert("data_dir".into(), restored.display().to_string().into());
        })
        .await;
    let mut executor = server.vault(&executor_cert).await;
    let live: Vec<Acked> = acked
        .iter()
        .filter(|a| {
            a.tenant != "initech"
                && (a.tenant.as_str(), a.credential.as_str()) != ("acme", "cred/000")
        })
        .cloned()
        .collect();
    assert_all_unseal(&executor, &live).await;
    let status = executor
        .unseal(unseal_request("acme", "cred/000"))
        .await
        .expect_err("revoked");
    assert_eq!(reason(&status).as_deref(), Some("REVOKED"), "{status:?}");
    let status = executor
        .unseal(unseal_request("initech", "cred/001"))
        .await
        .expect_err("deleted tenant");
    assert_eq!(
        reason(&status).as_deref(),
        Some("TENANT_DELETED"),
        "{status:?}"
    );
    let status = executor
        .unseal(unseal_request("acme", "after/backup"))
        .await
        .expect_err("sealed after the backup");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let mut admin = server.admin(&admin_cert).await;
    let verified = admin
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .expect("verify")
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert!(verified.records > 180, "{verified:?}");
    // The restored store takes writes, and its logs go on past the backup's.
    let mut settings = server.vault(&settings_cert).await;
    settings
        .seal(seal_request(
            "acme",
            "after/restore",
            CredentialKind::ApiKey,
            b"new",
        ))
        .await
        .expect("seal after restore");
    assert!(
        admin
            .verify_audit(pb::VerifyAuditRequest::default())
            .await
            .expect("verify")
            .into_inner()
            .ok
    );
}

/// Every single-bit flip, a cut, an extension and another root key: restore
/// and check refuse, and nothing is left where the store would go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_foreign_backup_restores_nothing() {
    let mut server = TestServer::start().await;
    let settings = server.vault(&server.pki.role("settings")).await;
    seal_all(&settings, items("acme", 3, 7), 2, |_| {
        CredentialKind::ApiKey
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("b");
    server
        .admin(&server.pki.role("admin"))
        .await
        .backup(pb::BackupRequest {
            directory: target.display().to_string(),
        })
        .await
        .expect("backup");
    let root = root_key(&server);
    server.stop().await.expect("stop");
    let file = target.join(backup::FILE_NAME);
    let good = std::fs::read(&file).unwrap();
    let checked = backup::verify(&target, &root).expect("an intact backup verifies");
    assert_eq!(checked.bytes, good.len() as u64);

    let copy = dir.path().join("copy.backup");
    for position in 0..good.len() {
        for bit in [0, 7] {
            let mut bad = good.clone();
            bad[position] ^= 1 << bit;
            std::fs::write(&copy, &bad).unwrap();
            let error = backup::verify(&copy, &root)
                .expect_err(&format!("bit {bit} of byte {position} flipped"));
            assert!(
                matches!(backup_reason(&error), "BACKUP_DAMAGED" | "WRONG_ROOT_KEY"),
                "byte {position}: {error}"
            );
        }
    }
    for (what, bad) in [
        ("cut short", good[..good.len() - 1].to_vec()),
        (
            "cut before the end frame",
            good[..good.len() - 32 - 25].to_vec(),
        ),
        ("extended", [good.as_slice(), b"x"].concat()),
        ("empty", Vec::new()),
    ] {
        std::fs::write(&copy, &bad).unwrap();
        let error = backup::verify(&copy, &root).expect_err(what);
        assert_eq!(backup_reason(&error), "BACKUP_DAMAGED", "{what}: {error}");
        let restored = dir
            .path()
            .join(format!("restored-{}", what.replace(' ', "-")));
        let error = backup::restore(&copy, &StoreOptions::new(&restored), &root).expect_err(what);
        assert_eq!(backup_reason(&error), "BACKUP_DAMAGED", "{what}: {error}");
        assert!(!restored.exists(), "{what}: nothing restored");
        assert_only(dir.path(), &["b", "copy.backup"]);
    }

    let other = SymmetricKey::generate();
    let restored = dir.path().join("restored");
    let error = backup::restore(&target, &StoreOptions::new(&restored), &other)
        .expect_err("other root key");
    assert_eq!(backup_reason(&error), "WRONG_ROOT_KEY");
    assert!(error.to_string().contains("root key v1"), "{error}");
    assert!(!restored.exists());

    // Into a directory that holds something: refused, and it is left alone.
    std::fs::create_dir(&restored).unwrap();
    std::fs::write(restored.join("keep"), b"mine").unwrap();
    let error =
        backup::restore(&target, &StoreOptions::new(&restored), &root).expect_err("not empty");
    assert_eq!(backup_reason(&error), "DATA_DIRECTORY_NOT_EMPTY");
    assert_eq!(std::fs::read(restored.join("keep")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&restored).unwrap().count(), 1);

    // Into an empty directory: restored.
    std::fs::remove_file(restored.join("keep")).unwrap();
    backup::restore(&target, &StoreOptions::new(&restored), &root)
        .expect("restore into an empty directory");
    assert!(restored.join("db").is_file());
}

fn assert_only(dir: &Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, names, "left behind in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_refuses_a_relative_or_used_directory_and_audits_every_call() {
    let server = TestServer::start().await;
    let pki = &server.pki;
    let mut admin = server.admin(&pki.role("admin")).await;
    let dir = tempfile::tempdir().unwrap();

    let relative = admin
        .backup(pb::BackupRequest {
            directory: "backups/today".into(),
        })
        .await;
    expect_status(relative, Code::InvalidArgument, "INVALID_BACKUP_DIRECTORY");
    assert!(!Path::new("backups").exists());

    let used = dir.path().join("used");
    std::fs::create_dir(&used).unwrap();
    std::fs::write(used.join("other"), b"keep").unwrap();
    let refused = admin
        .backup(pb::BackupRequest {
            directory: used.display().to_string(),
        })
        .await;
    expect_status(
        refused,
        Code::FailedPrecondition,
        "BACKUP_DIRECTORY_NOT_EMPTY",
    );
    assert_eq!(std::fs::read_dir(&used).unwrap().count(), 1);
    assert_eq!(std::fs::read(used.join("other")).unwrap(), b"keep");

    // An empty directory that exists is used.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    admin
        .backup(pb::BackupRequest {
            directory: empty.display().to_string(),
        })
        .await
        .expect("backup into an empty directory");
    assert!(empty.join(backup::FILE_NAME).is_file());

    // Not the admin: denied, nothing written.
    let denied_dir = dir.path().join("denied");
    let denied = server
        .admin(&pki.role("executor"))
        .await
        .backup(pb::BackupRequest {
            directory: denied_dir.display().to_string(),
        })
        .await;
    expect_status(denied, Code::PermissionDenied, "PERMISSION_DENIED");
    assert!(!denied_dir.exists());

    let records = admin
        .query_audit(pb::QueryAuditRequest::default())
        .await
        .expect("query audit")
        .into_inner()
        .records;
    let outcomes: Vec<&str> = records
        .iter()
        .filter(|r| r.rpc == "Backup")
        .map(|r| r.outcome.as_str())
        .collect();
    assert_eq!(
        outcomes,
        [
            "INVALID_BACKUP_DIRECTORY",
            "BACKUP_DIRECTORY_NOT_EMPTY",
            "ok",
            "PERMISSION_DENIED"
        ]
    );
}
