//! The audit log end to end: a real server on 127.0.0.1 over mutual TLS 1.3,
//! a sled store in a temp dir, certificates made in each test.
//!
//! - every RPC outcome, allowed or denied, is recorded exactly once, in order,
//!   with who, what, which tenant, credential, version and purpose;
//! - a settings identity narrowed to one tenant queries that tenant's records
//!   only;
//! - editing, deleting or swapping stored records (with the server stopped)
//!   makes `VerifyAudit` fail and name the first bad sequence number;
//! - pruning past the retention (`[audit] retention`) keeps the chain
//!   verifiable, for the records left and for new ones, across a restart;
//! - no stored audit record holds any 16-byte piece of a secret.

mod support;

use std::time::{Duration, Instant};

use credvault::authz::DEV_POLICY_TOML;
use credvault::pki::testing::ClientIdentity;
use credvault::service::pb::admin_client::AdminClient;
use credvault::service::pb::{self, CredentialKind};
use credvault::store::{Batch, Rows, SledStore, Store, StoreOptions, log_key};
use prost::Message;
use tonic::transport::Channel;
use tonic::{Code, Status};

use support::{
    ServerOptions, TestServer, contains, expect_status, role_identity, seal_request, secret_bytes,
    unseal_request,
};

const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";

/// An identity granted the executor and settings roles, but only for tenant-b
/// (as in tests/grpc.rs).
const NARROW_IDENTITY: &str = "spiffe://credvault/tenant-b/agent";

/// An identity no grant of the dev policy matches.
const STRANGER: &str = "spiffe://elsewhere/stranger";

fn narrowed_policy() -> String {
    format!(
        "{DEV_POLICY_TOML}
[[grant]]
identity = \"{NARROW_IDENTITY}\"
roles = [\"executor\", \"settings\"]
tenants = [\"{TENANT_B}\"]
"
    )
}

/// What a test expects of a record: caller, rpc, tenant, credential, version,
/// purpose, outcome.
type Row<'a> = (&'a str, &'a str, &'a str, &'a str, u32, &'a str, &'a str);

fn row(r: &pb::AuditRecord) -> Row<'_> {
    (
        &r.caller,
        &r.rpc,
        &r.tenant_id,
        &r.credential_id,
        r.version,
        &r.purpose,
        &r.outcome,
    )
}

/// One page of QueryAudit (large enough for every test here: a test that
/// expected more fails on `next_page_token`).
async fn query(
    admin: &mut AdminClient<Channel>,
    request: pb::QueryAuditRequest,
) -> Result<Vec<pb::AuditRecord>, Status> {
    let page = admin
        .query_audit(pb::QueryAuditRequest {
            page_size: 1000,
            ..request
        })
        .await?
        .into_inner();
    assert!(
        page.next_page_token.is_empty(),
        "more than one page of audit records"
    );
    Ok(page.records)
}

/// Every record, as the admin sees it (the query itself is recorded after it answers).
async fn query_all(admin: &mut AdminClient<Channel>) -> Vec<pb::AuditRecord> {
    query(admin, pb::QueryAuditRequest::default())
        .await
        .unwrap_or_else(|s| panic!("QueryAudit: {s:?}"))
}

async fn verify(admin: &mut AdminClient<Channel>) -> pb::VerifyAuditResponse {
    admin
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .unwrap_or_else(|s| panic!("VerifyAudit: {s:?}"))
        .into_inner()
}

fn unseal_for(tenant: &str, credential: &str, purpose: &str) -> pb::UnsealRequest {
    pb::UnsealRequest {
        purpose: purpose.to_owned(),
        ..unseal_request(tenant, credential)
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

// ---------------------------------------------------------------------------
// Every outcome, exactly once

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_outcome_is_recorded_exactly_once_in_order() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let pki = &server.pki;
    let mut ingest = server.vault(&pki.role("ingest")).await;
    let mut executor = server.vault(&pki.role("executor")).await;
    let mut settings = server.vault(&pki.role("settings")).await;
    let mut stranger = server.vault(&pki.uri(STRANGER)).await;
    let mut nameless = server.vault(&pki.client(ClientIdentity::Nameless)).await;
    let mut admin = server.admin(&pki.role("admin")).await;
    let started_ms = now_ms();

    // 1. Seal: ok.
    let secret = secret_bytes(7, 64);
    ingest
        .seal(seal_request(
            TENANT_A,
            "gmail",
            CredentialKind::CookieJar,
            &secret,
        ))
        .await
        .expect("Seal");
    // 2. Unseal with a purpose: ok.
    let unsealed = executor
        .unseal(unseal_for(TENANT_A, "gmail", "task-42"))
        .await
        .expect("Unseal")
        .into_inner();
    assert_eq!(unsealed.secret, secret);
    // 3. Unseal of a credential that does not exist.
    expect_status(
        executor
            .unseal(unseal_for(TENANT_A, "missing", "task-43"))
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    // 4. GetMetadata (latest version): ok, recorded with the version it resolved to.
    executor
        .get_metadata(pb::GetMetadataRequest {
            tenant_id: TENANT_A.into(),
            credential_id: "gmail".into(),
            version: None,
        })
        .await
        .expect("GetMetadata");
    // 5. ListCredentials: ok.
    executor
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: TENANT_A.into(),
            ..Default::default()
        })
        .await
        .expect("ListCredentials");
    // 6. Revoke: ok.
    settings
        .revoke(pb::RevokeRequest {
            tenant_id: TENANT_A.into(),
            credential_id: "gmail".into(),
            reason: "user disconnected Gmail".into(),
        })
        .await
        .expect("Revoke");
    // 7. Unseal after the revoke.
    expect_status(
        executor
            .unseal(unseal_for(TENANT_A, "gmail", "task-44"))
            .await,
        Code::FailedPrecondition,
        "REVOKED",
    );
    // 8. Seal by an executor: the policy says no.
    expect_status(
        executor
            .seal(seal_request(
                TENANT_A,
                "smuggled",
                CredentialKind::ApiKey,
                b"sk-not-allowed",
            ))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    // 9. A certificate whose identity no grant matches.
    expect_status(
        stranger
            .unseal(unseal_for(TENANT_A, "gmail", "just looking"))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    // 10. A certificate that names nobody (no SAN, no CN).
    expect_status(
        nameless
            .list_credentials(pb::ListCredentialsRequest {
                tenant_id: TENANT_A.into(),
                ..Default::default()
            })
            .await,
        Code::Unauthenticated,
        "UNAUTHENTICATED",
    );
    // 11. DeleteTenant (an hour's grace) and 12. RestoreTenant.
    settings
        .delete_tenant(pb::DeleteTenantRequest {
            tenant_id: TENANT_A.into(),
            grace_seconds: Some(3600),
        })
        .await
        .expect("DeleteTenant");
    settings
        .restore_tenant(pb::RestoreTenantRequest {
            tenant_id: TENANT_A.into(),
        })
        .await
        .expect("RestoreTenant");
    // 13. An Admin call.
    admin
        .get_key_status(pb::GetKeyStatusRequest {
            tenant_id: TENANT_A.into(),
            ..Default::default()
        })
        .await
        .expect("GetKeyStatus");

    let ingest_id = role_identity("ingest");
    let executor_id = role_identity("executor");
    let settings_id = role_identity("settings");
    let admin_id = role_identity("admin");
    let (i, e, s, a) = (
        ingest_id.as_str(),
        executor_id.as_str(),
        settings_id.as_str(),
        admin_id.as_str(),
    );
    #[rustfmt::skip]
    let expected: Vec<Row> = vec![
        // caller    rpc                tenant    credential  v  purpose         outcome
        (i,        "Seal",            TENANT_A, "gmail",    1, "",             "ok"),
        (e,        "Unseal",          TENANT_A, "gmail",    1, "task-42",      "ok"),
        (e,        "Unseal",          TENANT_A, "missing",  0, "task-43",      "NOT_FOUND"),
        (e,        "GetMetadata",     TENANT_A, "gmail",    1, "",             "ok"),
        (e,        "ListCredentials", TENANT_A, "",         0, "",             "ok"),
        (s,        "Revoke",          TENANT_A, "gmail",    0, "",             "ok"),
        (e,        "Unseal",          TENANT_A, "gmail",    0, "task-44",      "REVOKED"),
        (e,        "Seal",            TENANT_A, "smuggled", 0, "",             "PERMISSION_DENIED"),
        (STRANGER, "Unseal",          TENANT_A, "gmail",    0, "just looking", "PERMISSION_DENIED"),
        ("",       "ListCredentials", TENANT_A, "",         0, "",             "UNAUTHENTICATED"),
        (s,        "DeleteTenant",    TENANT_A, "",         0, "",             "ok"),
        (s,        "RestoreTenant",   TENANT_A, "",         0, "",             "ok"),
        (a,        "GetKeyStatus",    TENANT_A, "",         0, "",             "ok"),
    ];

    let records = query_all(&mut admin).await;
    let got: Vec<Row> = records.iter().map(row).collect();
    assert_eq!(got, expected);
    let sequences: Vec<u64> = records.iter().map(|r| r.sequence).collect();
    let numbered: Vec<u64> = (1..=expected.len() as u64).collect();
    assert_eq!(sequences, numbered, "numbered from 1 without gaps");
    // The server's clock, not a measurement: each stamp is from this test's run.
    let finished_ms = now_ms();
    for r in &records {
        assert!(
            (started_ms.saturating_sub(60_000)..=finished_ms + 60_000).contains(&r.at_ms),
            "{r:?}"
        );
    }

    // The query recorded itself once, after it answered; the chain verifies
    // and covers every record so far.
    let verification = verify(&mut admin).await;
    let count = expected.len() as u64 + 1;
    assert!(verification.ok, "{verification:?}");
    assert_eq!(verification.records, count, "{verification:?}");
    assert_eq!(verification.first_bad_sequence, 0);

    let records = query_all(&mut admin).await;
    let tail: Vec<Row> = records[expected.len()..].iter().map(row).collect();
    assert_eq!(
        tail,
        [
            (a, "QueryAudit", "", "", 0, "", "ok"),
            (a, "VerifyAudit", "", "", 0, "", "ok"),
        ]
    );
    assert_eq!(records.len() as u64, count + 1);
}

// ---------------------------------------------------------------------------
// A narrowed settings identity sees its own tenant's records only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settings_identity_narrowed_to_a_tenant_sees_only_its_records() {
    credvault::tls::install_default_provider();
    let server = TestServer::start_with(
        support::Pki::new(),
        ServerOptions::default().policy(narrowed_policy()),
    )
    .await;
    let pki = &server.pki;
    let mut ingest = server.vault(&pki.role("ingest")).await;
    let mut executor = server.vault(&pki.role("executor")).await;
    let narrow_cert = pki.uri(NARROW_IDENTITY);
    let mut narrow_vault = server.vault(&narrow_cert).await;
    let mut narrow = server.admin(&narrow_cert).await;
    let mut admin = server.admin(&pki.role("admin")).await;
    let executor_id = role_identity("executor");
    let ingest_id = role_identity("ingest");

    // The executor acts on both tenants; the narrowed identity on its own.
    for tenant in [TENANT_A, TENANT_B] {
        ingest
            .seal(seal_request(
                tenant,
                "openai",
                CredentialKind::ApiKey,
                b"sk",
            ))
            .await
            .expect("Seal");
        executor
            .unseal(unseal_for(tenant, "openai", &format!("task-{tenant}")))
            .await
            .expect("Unseal");
    }
    narrow_vault
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: TENANT_B.into(),
            ..Default::default()
        })
        .await
        .expect("ListCredentials of its own tenant");

    // Its own tenant: only that tenant's records, whatever the filter.
    let own = query(
        &mut narrow,
        pb::QueryAuditRequest {
            tenant_id: TENANT_B.into(),
            ..Default::default()
        },
    )
    .await
    .expect("QueryAudit of its own tenant");
    assert_eq!(
        own.iter().map(row).collect::<Vec<_>>(),
        [
            (ingest_id.as_str(), "Seal", TENANT_B, "openai", 1, "", "ok"),
            (
                executor_id.as_str(),
                "Unseal",
                TENANT_B,
                "openai",
                1,
                "task-tenant-b",
                "ok"
            ),
            (
                NARROW_IDENTITY,
                "ListCredentials",
                TENANT_B,
                "",
                0,
                "",
                "ok"
            ),
        ]
    );
    let by_executor = query(
        &mut narrow,
        pb::QueryAuditRequest {
            tenant_id: TENANT_B.into(),
            caller: executor_id.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("QueryAudit of its own tenant, by caller");
    assert_eq!(
        by_executor.iter().map(row).collect::<Vec<_>>(),
        [(
            executor_id.as_str(),
            "Unseal",
            TENANT_B,
            "openai",
            1,
            "task-tenant-b",
            "ok"
        )]
    );
    let by_credential = query(
        &mut narrow,
        pb::QueryAuditRequest {
            tenant_id: TENANT_B.into(),
            credential_id: "openai".into(),
            ..Default::default()
        },
    )
    .await
    .expect("QueryAudit of its own tenant, by credential");
    assert!(
        by_credential.iter().all(|r| r.tenant_id == TENANT_B) && by_credential.len() == 2,
        "{by_credential:?}"
    );

    // Another tenant, or every tenant: refused, with or without other filters.
    for tenant in [TENANT_A, ""] {
        for caller in [String::new(), executor_id.clone()] {
            let refused = query(
                &mut narrow,
                pb::QueryAuditRequest {
                    tenant_id: tenant.into(),
                    caller,
                    ..Default::default()
                },
            )
            .await;
            expect_status(refused, Code::PermissionDenied, "PERMISSION_DENIED");
        }
    }
    // Nor is VerifyAudit (admin only) a way round.
    expect_status(
        narrow.verify_audit(pb::VerifyAuditRequest::default()).await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // The admin sees the executor on both tenants, and the refused queries.
    let everywhere = query(
        &mut admin,
        pb::QueryAuditRequest {
            caller: executor_id.clone(),
            ..Default::default()
        },
    )
    .await
    .expect("QueryAudit by the admin");
    let tenants: Vec<&str> = everywhere.iter().map(|r| r.tenant_id.as_str()).collect();
    assert_eq!(tenants, [TENANT_A, TENANT_B]);
    let narrowed = query(
        &mut admin,
        pb::QueryAuditRequest {
            caller: NARROW_IDENTITY.into(),
            ..Default::default()
        },
    )
    .await
    .expect("QueryAudit by the admin, of the narrowed identity");
    let calls: Vec<(&str, &str, &str)> = narrowed
        .iter()
        .map(|r| (r.rpc.as_str(), r.tenant_id.as_str(), r.outcome.as_str()))
        .collect();
    let denied = "PERMISSION_DENIED";
    assert_eq!(
        calls,
        [
            ("ListCredentials", TENANT_B, "ok"),
            ("QueryAudit", TENANT_B, "ok"),
            ("QueryAudit", TENANT_B, "ok"),
            ("QueryAudit", TENANT_B, "ok"),
            ("QueryAudit", TENANT_A, denied),
            ("QueryAudit", TENANT_A, denied),
            ("QueryAudit", "", denied),
            ("QueryAudit", "", denied),
            ("VerifyAudit", "", denied),
        ]
    );
}

// ---------------------------------------------------------------------------
// Tampering with the stopped server's store

/// Every stored audit record, in sequence order.
fn audit_rows(store: &SledStore) -> Rows {
    store
        .scan(credvault::audit::PREFIX, None, usize::MAX)
        .expect("scan the audit log")
}

fn open_store(server: &TestServer) -> SledStore {
    SledStore::open(&StoreOptions::new(&server.config.data_dir))
        .unwrap_or_else(|e| panic!("open the stopped server's store: {e}"))
}

async fn write(store: &SledStore, batch: Batch) {
    store.commit(batch).await.expect("write to the store");
}

/// Stops the server (if it runs), changes its store with `tamper`, restarts
/// it and returns what VerifyAudit says.
async fn tampered(
    server: &mut TestServer,
    tamper: impl AsyncFnOnce(&SledStore),
) -> pb::VerifyAuditResponse {
    if !server.has_stopped() {
        server.stop().await.expect("the server stops cleanly");
    }
    {
        let store = open_store(server);
        tamper(&store).await;
    } // the store is closed (sled holds a file lock) before the restart
    server.restart().await;
    let mut admin = server.admin(&server.pki.role("admin")).await;
    verify(&mut admin).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_deleting_or_swapping_a_record_fails_verify_at_its_sequence() {
    credvault::tls::install_default_provider();
    let mut server = TestServer::start().await;
    {
        let pki = &server.pki;
        let mut ingest = server.vault(&pki.role("ingest")).await;
        let mut executor = server.vault(&pki.role("executor")).await;
        let mut settings = server.vault(&pki.role("settings")).await;
        ingest
            .seal(seal_request(TENANT_A, "c1", CredentialKind::ApiKey, b"k1"))
            .await
            .expect("Seal"); // 1
        for purpose in ["task-2", "task-3"] {
            executor
                .unseal(unseal_for(TENANT_A, "c1", purpose))
                .await
                .expect("Unseal"); // 2, 3
        }
        executor
            .get_metadata(pb::GetMetadataRequest {
                tenant_id: TENANT_A.into(),
                credential_id: "c1".into(),
                version: None,
            })
            .await
            .expect("GetMetadata"); // 4
        executor
            .list_credentials(pb::ListCredentialsRequest {
                tenant_id: TENANT_A.into(),
                ..Default::default()
            })
            .await
            .expect("ListCredentials"); // 5
        settings
            .revoke(pb::RevokeRequest {
                tenant_id: TENANT_A.into(),
                credential_id: "c1".into(),
                reason: "done".into(),
            })
            .await
            .expect("Revoke"); // 6
        let mut admin = server.admin(&pki.role("admin")).await;
        let verification = verify(&mut admin).await; // 7 is its own record
        assert!(verification.ok, "{verification:?}");
        assert_eq!(verification.records, 6);
    }

    server.stop().await.expect("the server stops cleanly");
    let original = audit_rows(&open_store(&server));
    assert_eq!(original.len(), 7, "six calls and the VerifyAudit");
    let key = |seq: u64| log_key(credvault::audit::PREFIX, seq);
    let value = |seq: u64| original[seq as usize - 1].1.clone();
    let restore = async |store: &SledStore| {
        let mut batch = Batch::default();
        for (k, v) in &original {
            batch.put(k.clone(), v.clone());
        }
        write(store, batch).await;
    };

    // Edit: record 3's purpose "task-3" becomes "task-2" (one bit of one
    // byte); the record still decodes.
    let mut edited = value(3);
    let at = edited
        .windows(6)
        .position(|w| w == b"task-3")
        .expect("record 3 holds its purpose")
        + 5;
    edited[at] ^= 0x01;
    let forged = credvault::audit::Record::decode(edited.as_slice()).expect("still decodes");
    assert_eq!(forged.purpose, "task-2");
    let verification = tampered(&mut server, async |store| {
        let mut batch = Batch::default();
        batch.put(key(3), edited.clone());
        write(store, batch).await;
    })
    .await;
    assert!(!verification.ok, "an edited record: {verification:?}");
    assert_eq!(verification.first_bad_sequence, 3, "{verification:?}");
    assert_eq!(verification.records, 2, "{verification:?}");
    // The forgery is what a query shows: only verify tells.
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let shown = query_all(&mut admin).await;
    assert_eq!(
        (shown[2].sequence, shown[2].purpose.as_str()),
        (3, "task-2")
    );

    // The control: with the original bytes back the chain verifies again,
    // records written meanwhile included.
    let verification = tampered(&mut server, restore).await;
    assert!(verification.ok, "restored: {verification:?}");

    // Delete a record from the middle.
    let verification = tampered(&mut server, async |store| {
        let mut batch = Batch::default();
        batch.delete(key(4));
        write(store, batch).await;
    })
    .await;
    assert!(!verification.ok, "a deleted record: {verification:?}");
    assert_eq!(verification.first_bad_sequence, 4, "{verification:?}");
    assert_eq!(verification.records, 3, "{verification:?}");
    let verification = tampered(&mut server, restore).await;
    assert!(verification.ok, "restored: {verification:?}");

    // Swap two records' values (a reordering): the first position is named.
    let verification = tampered(&mut server, async |store| {
        let mut batch = Batch::default();
        batch.put(key(2), value(5)).put(key(5), value(2));
        write(store, batch).await;
    })
    .await;
    assert!(!verification.ok, "swapped records: {verification:?}");
    assert_eq!(verification.first_bad_sequence, 2, "{verification:?}");
    assert_eq!(verification.records, 1, "{verification:?}");
    let verification = tampered(&mut server, restore).await;
    assert!(verification.ok, "restored: {verification:?}");
}

// ---------------------------------------------------------------------------
// Pruning

/// How long the background task may take to prune: a hang guard, not a measurement.
const PRUNE_GUARD: Duration = Duration::from_secs(30);

/// Polls QueryAudit until every record up to `last` has been pruned; returns
/// the records left then (the polls are recorded, and pruned in turn).
async fn wait_pruned_through(admin: &mut AdminClient<Channel>, last: u64) -> Vec<pb::AuditRecord> {
    let deadline = Instant::now() + PRUNE_GUARD;
    loop {
        let records = query_all(admin).await;
        if records.first().is_some_and(|r| r.sequence > last) {
            return records;
        }
        assert!(
            Instant::now() < deadline,
            "audit records up to {last} were not pruned within {PRUNE_GUARD:?}; the oldest: {:?}",
            records.first()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The records' sequence numbers follow each other without a gap.
#[track_caller]
fn assert_contiguous(records: &[pb::AuditRecord]) {
    let sequences: Vec<u64> = records.iter().map(|r| r.sequence).collect();
    let first = sequences.first().copied().unwrap_or(1);
    let expected: Vec<u64> = (first..first + sequences.len() as u64).collect();
    assert_eq!(sequences, expected);
}

async fn verify_seen(
    admin: &mut AdminClient<Channel>,
    seen: pb::AuditHead,
) -> Result<pb::VerifyAuditResponse, Status> {
    admin
        .verify_audit(pb::VerifyAuditRequest { seen: Some(seen) })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cutting_off_the_newest_records_fails_verify_against_a_kept_head() {
    credvault::tls::install_default_provider();
    let mut server = TestServer::start().await;
    let head = {
        let mut ingest = server.vault(&server.pki.role("ingest")).await;
        let mut executor = server.vault(&server.pki.role("executor")).await;
        ingest
            .seal(seal_request(TENANT_A, "c1", CredentialKind::ApiKey, b"k1"))
            .await
            .expect("Seal"); // 1
        for _ in 0..3 {
            executor
                .unseal(unseal_request(TENANT_A, "c1"))
                .await
                .expect("Unseal"); // 2, 3, 4
        }
        let mut admin = server.admin(&server.pki.role("admin")).await;
        let verification = verify(&mut admin).await; // 5
        assert!(verification.ok, "{verification:?}");
        assert_eq!(
            (verification.first_sequence, verification.last_sequence),
            (1, 4)
        );
        let head = verification.head.expect("the head of a verified log");
        assert_eq!(head.sequence, 4);
        // It is record 4 as QueryAudit shows it.
        let records = query_all(&mut admin).await; // 6
        assert_eq!(records[3].mac, head.mac);

        let matched = verify_seen(&mut admin, head.clone())
            .await
            .expect("VerifyAudit"); // 7
        assert!(matched.ok, "{matched:?}");
        assert_eq!(matched.head_check(), pb::HeadCheck::Matched);
        assert_eq!(matched.last_sequence, 6);

        // Malformed heads: refused, and nothing verified.
        for bad in [
            pb::AuditHead {
                sequence: 0,
                mac: head.mac.clone(),
            },
            pb::AuditHead {
                sequence: 4,
                mac: head.mac[..31].to_vec(),
            },
        ] {
            let refused = verify_seen(&mut admin, bad).await;
            expect_status(refused, Code::InvalidArgument, "INVALID_AUDIT_HEAD");
        }
        head
    };

    // Records 3 on cut off with the server stopped: the rest is a valid chain.
    let plain = tampered(&mut server, async |store: &SledStore| {
        let mut batch = Batch::default();
        for (key, _) in audit_rows(store) {
            if key >= log_key(credvault::audit::PREFIX, 3) {
                batch.delete(key);
            }
        }
        write(store, batch).await;
    })
    .await; // its own record becomes the new 3
    assert!(plain.ok, "the chain alone cannot tell: {plain:?}");
    assert_eq!(plain.last_sequence, 2);

    let mut admin = server.admin(&server.pki.role("admin")).await;
    let caught = verify_seen(&mut admin, head).await.expect("VerifyAudit");
    assert!(!caught.ok, "{caught:?}");
    assert_eq!(
        caught.first_bad_sequence, 4,
        "record 3 is the new one: {caught:?}"
    );
    assert!(caught.reason.contains("cut off"), "{}", caught.reason);
    assert_eq!(caught.head, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_old_records_keeps_the_chain_verifiable() {
    credvault::tls::install_default_provider();
    let mut server = TestServer::start_with(
        support::Pki::new(),
        ServerOptions::default()
            .audit("retention = \"1s\"")
            .rotation("check_interval = \"1s\""),
    )
    .await;
    let executor_id = role_identity("executor");
    for round in 1..=2 {
        let pki = &server.pki;
        let mut ingest = server.vault(&pki.role("ingest")).await;
        let mut executor = server.vault(&pki.role("executor")).await;
        let mut admin = server.admin(&pki.role("admin")).await;
        let id = format!("c{round}");
        ingest
            .seal(seal_request(TENANT_A, &id, CredentialKind::ApiKey, b"k"))
            .await
            .expect("Seal");
        for _ in 0..3 {
            executor
                .unseal(unseal_for(TENANT_A, &id, &format!("round-{round}")))
                .await
                .expect("Unseal");
        }
        // New records, on top of whatever earlier pruning left, verify.
        let records = query_all(&mut admin).await;
        assert_contiguous(&records);
        let unseals = records
            .iter()
            .filter(|r| r.rpc == "Unseal" && r.credential_id == id && r.caller == executor_id)
            .count();
        assert_eq!(unseals, 3, "round {round}: {records:?}");
        let verification = verify(&mut admin).await;
        assert!(
            verification.ok,
            "round {round}, before pruning: {verification:?}"
        );

        // Once they are older than the retention, the background task prunes
        // them (keeping the newest record), and what is left still verifies
        // from the anchor.
        let last = records.last().expect("records").sequence;
        let kept = wait_pruned_through(&mut admin, last).await;
        assert_contiguous(&kept);
        let verification = verify(&mut admin).await;
        assert!(
            verification.ok,
            "round {round}, after pruning: {verification:?}"
        );
        assert!(verification.records >= 1, "{verification:?}");

        // The anchor is stored: a restart verifies from it too.
        server.restart().await;
        let mut admin = server.admin(&server.pki.role("admin")).await;
        let verification = verify(&mut admin).await;
        assert!(
            verification.ok,
            "round {round}, after a restart: {verification:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// No secret in the audit log

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_audit_record_holds_any_piece_of_a_secret() {
    credvault::tls::install_default_provider();
    let mut server = TestServer::start().await;
    // Two distinctive secrets: a cookie jar in text (a field copied into a
    // record by mistake would be text), and random bytes.
    let random = secret_bytes(0x5ec2e7, 300);
    let hex: String = random[..48].iter().map(|b| format!("{b:02x}")).collect();
    let cookie = format!("SID={hex}; HSID=audit-canary-{hex}").into_bytes();
    let secrets = [cookie, random];
    {
        let pki = &server.pki;
        let mut ingest = server.vault(&pki.role("ingest")).await;
        let mut executor = server.vault(&pki.role("executor")).await;
        let mut settings = server.vault(&pki.role("settings")).await;
        for (i, secret) in secrets.iter().enumerate() {
            let id = format!("canary-{i}");
            ingest
                .seal(seal_request(
                    TENANT_A,
                    &id,
                    CredentialKind::CookieJar,
                    secret,
                ))
                .await
                .expect("Seal");
            // A second version over the first, an unseal of each, and a
            // refused seal that carries the secret too.
            settings
                .seal(seal_request(
                    TENANT_A,
                    &id,
                    CredentialKind::CookieJar,
                    secret,
                ))
                .await
                .expect("Seal v2");
            for version in [Some(1), None] {
                let unsealed = executor
                    .unseal(pb::UnsealRequest {
                        version,
                        ..unseal_for(TENANT_A, &id, "canary check")
                    })
                    .await
                    .expect("Unseal")
                    .into_inner();
                // The control: the search finds the secret where it belongs.
                assert!(contains(&unsealed.encode_to_vec(), &secret[..16]));
            }
            expect_status(
                executor
                    .seal(seal_request(
                        TENANT_A,
                        &id,
                        CredentialKind::CookieJar,
                        secret,
                    ))
                    .await,
                Code::PermissionDenied,
                "PERMISSION_DENIED",
            );
            // A seal refused by the library (a wrong compare-and-set version).
            expect_status(
                ingest
                    .seal(pb::SealRequest {
                        expected_version: Some(7),
                        ..seal_request(TENANT_A, &id, CredentialKind::CookieJar, secret)
                    })
                    .await,
                Code::FailedPrecondition,
                "VERSION_MISMATCH",
            );
        }
    }

    server.stop().await.expect("the server stops cleanly");
    let store = open_store(&server);
    let mut rows = audit_rows(&store);
    assert_eq!(rows.len(), 2 * 6, "six records per secret");
    if let Some(anchor) = store
        .get(credvault::audit::ANCHOR)
        .expect("read the anchor")
    {
        rows.push((credvault::audit::ANCHOR.to_vec(), anchor));
    }
    for (key, value) in &rows {
        for secret in &secrets {
            for (offset, piece) in secret.windows(16).enumerate() {
                assert!(
                    !contains(key, piece) && !contains(value, piece),
                    "audit entry {key:?} holds the secret's bytes {offset}..{}",
                    offset + 16
                );
            }
        }
    }
}
