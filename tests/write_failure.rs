//! A server whose disk stops taking writes: audited calls fail closed, health
//! turns NOT_SERVING, `GetServerStatus` says why, and a restart on a healthy
//! disk loses nothing that was acknowledged and records nothing that was not.
//!
//! The failure is real: the process's file-size limit (`RLIMIT_FSIZE`) drops
//! to 0, so every file write (the journal's, the store's log) fails with EFBIG
//! (SIGXFSZ, which would end the process, is caught). The limit is the whole
//! process's, so this file holds one test and nothing else runs beside it.

mod support;

use std::time::{Duration, Instant};

use credvault::service::pb::{self, CredentialKind};
use rustix::process::{Resource, Rlimit, Signal, getrlimit, setrlimit};
use tokio::signal::unix::{SignalKind, signal};
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use support::{TestServer, expect_status, seal_request, unseal_request};

/// How long health may take to follow the vault (it checks every second).
const HEALTH_DEADLINE: Duration = Duration::from_secs(30);

async fn health_of(health: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    health
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap_or_else(|s| panic!("Check {service:?}: {s:?}"))
        .into_inner()
        .status
}

async fn gmail_unseals(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> Vec<pb::AuditRecord> {
    let page = admin
        .query_audit(pb::QueryAuditRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("QueryAudit: {s:?}"))
        .into_inner();
    assert!(page.next_page_token.is_empty(), "one page holds them all");
    page.records
        .into_iter()
        .filter(|r| r.rpc == "Unseal" && r.credential_id == "gmail")
        .collect()
}

async fn unseal_gmail(
    vault: &mut pb::vault_client::VaultClient<tonic::transport::Channel>,
) -> Vec<u8> {
    vault
        .unseal(unseal_request("acme", "gmail"))
        .await
        .unwrap_or_else(|s| panic!("Unseal on a healthy disk: {s:?}"))
        .into_inner()
        .secret
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_that_refuses_writes_fails_audited_calls_closed_and_turns_health_not_serving() {
    credvault::tls::install_default_provider();
    let mut server = TestServer::start().await;
    let executor = server.pki.role("executor");
    let ingest = server.pki.role("ingest");
    let mut vault = server.vault(&executor).await;
    let mut sealer = server.vault(&ingest).await;
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let mut health = HealthClient::new(
        server
            .channel(&server.pki.uri("spiffe://credvault/probe/k8s"))
            .await,
    );

    sealer
        .seal(seal_request(
            "acme",
            "gmail",
            CredentialKind::CookieJar,
            b"SID=kept-1",
        ))
        .await
        .expect("seal on a healthy disk");
    assert_eq!(unseal_gmail(&mut vault).await, b"SID=kept-1");
    assert_eq!(
        health_of(&mut health, "").await,
        ServingStatus::Serving as i32
    );

    // From here every file write fails with EFBIG (a file-size limit of 0).
    let _xfsz = signal(SignalKind::from_raw(Signal::XFSZ.as_raw())).expect("catch SIGXFSZ");
    let limit = getrlimit(Resource::Fsize);
    setrlimit(
        Resource::Fsize,
        Rlimit {
            current: Some(0),
            maximum: limit.maximum,
        },
    )
    .expect("lower RLIMIT_FSIZE");

    // The Unseal's record cannot be made durable: no secret.
    let refused = vault.unseal(unseal_request("acme", "gmail")).await;
    let status = expect_status(refused, Code::Unavailable, "AUDIT_UNAVAILABLE");
    assert!(!String::from_utf8_lossy(status.details()).contains("kept-1"));
    // Nor can a Seal be: it stores nothing (checked after the restart).
    let refused = sealer
        .seal(seal_request(
            "acme",
            "linkedin",
            CredentialKind::CookieJar,
            b"li_at=lost",
        ))
        .await;
    expect_status(refused, Code::Unavailable, "STORAGE");

    // Health follows within a few checks: the server and its Vault service
    // are out of rotation, Admin still answers so that status can say why.
    let started = Instant::now();
    while health_of(&mut health, "").await != ServingStatus::NotServing as i32 {
        assert!(
            started.elapsed() < HEALTH_DEADLINE,
            "health never turned NOT_SERVING"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        health_of(&mut health, "credvault.v1.Vault").await,
        ServingStatus::NotServing as i32
    );
    assert_eq!(
        health_of(&mut health, "credvault.v1.Admin").await,
        ServingStatus::Serving as i32
    );
    let status = admin
        .get_server_status(pb::GetServerStatusRequest {})
        .await
        .expect("status answers while the audit log is down")
        .into_inner();
    assert!(
        status.audit_failure.contains("writing the audit journal"),
        "{:?}",
        status.audit_failure
    );
    assert!(
        !status.store_writable,
        "the Seal's failed write poisoned the store"
    );
    // What the store holds: the Seal's record at least (the first Unseal's may
    // still be only in the journal, to be appended at the next start).
    let head = status
        .audit_head
        .expect("records were stored before the failure");
    assert!(head.sequence >= 1, "{head:?}");

    // A healthy disk again, and a restart.
    setrlimit(Resource::Fsize, limit).expect("restore RLIMIT_FSIZE");
    server.restart().await;
    let mut vault = server.vault(&executor).await;
    let mut admin = server.admin(&server.pki.role("admin")).await;
    assert_eq!(unseal_gmail(&mut vault).await, b"SID=kept-1");
    expect_status(
        vault.unseal(unseal_request("acme", "linkedin")).await,
        Code::NotFound,
        "NOT_FOUND",
    );
    let verified = admin
        .verify_audit(pb::VerifyAuditRequest::default())
        .await
        .expect("VerifyAudit")
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    // The acknowledged Unseals, each once; the refused one as refused, if at
    // all (its frame never reached the disk), never as one that returned.
    let unseals = gmail_unseals(&mut admin).await;
    let ok = unseals.iter().filter(|r| r.outcome == "ok").count();
    assert_eq!(ok, 2, "{unseals:?}");
    assert!(
        unseals
            .iter()
            .all(|r| r.outcome == "ok" || r.outcome == "AUDIT_UNAVAILABLE"),
        "{unseals:?}"
    );
    let mut health = HealthClient::new(
        server
            .channel(&server.pki.uri("spiffe://credvault/probe/k8s"))
            .await,
    );
    assert_eq!(
        health_of(&mut health, "").await,
        ServingStatus::Serving as i32
    );
}
