//! `tls.refuse_stale_crl`: a CRL past its "next update" refuses its CA's
//! clients, at the handshake and on every call of a connection already open.
//! A real server on 127.0.0.1 over mutual TLS 1.3, CRLs made in the test, and
//! a real `SIGHUP` (so this file holds one test: the signal reaches every
//! server in the process).

mod support;

use std::time::{Duration, SystemTime};

use credvault::service::pb::{self, CredentialKind};
use tonic::Code;

use support::{
    Pki, ServerOptions, TestServer, expect_status, hang_up, refused_at_handshake, reloads,
    seal_request,
};

const TENANT: &str = "tenant-a";

async fn seal(client: &mut pb::vault_client::VaultClient<tonic::transport::Channel>, id: &str) {
    let request = seal_request(TENANT, id, CredentialKind::ApiKey, b"sk-stale-crl");
    client.seal(request).await.expect("Seal");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_crl_refuses_its_clients_at_the_handshake_and_on_open_connections() {
    credvault::tls::install_default_provider();
    let none: [&[u8]; 0] = [];
    let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);

    // Without the option, a stale CRL goes on being used (the gauge
    // credvault_crl_next_update_timestamp_seconds is the alert).
    let pki = Pki::new();
    let stale = pki.ca.crl_pem_until(&none, an_hour_ago);
    let mut lenient = TestServer::start_with(pki, ServerOptions::default().crl(stale)).await;
    let mut client = lenient.vault(&lenient.pki.role("ingest")).await;
    seal(&mut client, "k0").await;
    drop(client);
    lenient.stop().await.expect("the lenient server stops");

    let pki = Pki::new();
    let ingest = pki.role("ingest");
    let fresh = pki.ca.crl_pem(&none);
    let stale = pki.ca.crl_pem_until(&none, an_hour_ago);
    let server =
        TestServer::start_with(pki, ServerOptions::default().crl(fresh).refuse_stale_crl()).await;
    let crl = server.pki.dir().join("crl.pem");

    // Fresh: served. The connection stays open across the reload.
    let mut open = server.vault(&ingest).await;
    seal(&mut open, "k1").await;

    // The CA's CRL goes stale (its publisher stopped) and is reloaded.
    std::fs::write(&crl, &stale).expect("write the stale CRL");
    hang_up((1, 0)).await;
    let refused = open
        .seal(seal_request(TENANT, "k2", CredentialKind::ApiKey, b"x"))
        .await;
    expect_status(refused, Code::Unauthenticated, "CRL_EXPIRED");
    let config = server.pki.client_config(&ingest);
    refused_at_handshake(&server, config, "a new connection under a stale CRL").await;

    // A fresh CRL again: served again, on the open connection too.
    std::fs::write(&crl, server.pki.ca.crl_pem(&none)).expect("write a fresh CRL");
    hang_up((2, 0)).await;
    seal(&mut open, "k3").await;
    let mut reconnected = server.vault(&ingest).await;
    seal(&mut reconnected, "k4").await;

    // The refusal was audited, with its reason.
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let records = admin
        .query_audit(pb::QueryAuditRequest {
            outcome: "CRL_EXPIRED".into(),
            ..Default::default()
        })
        .await
        .expect("QueryAudit")
        .into_inner()
        .records;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(
        (records[0].rpc.as_str(), records[0].credential_id.as_str()),
        ("Seal", "k2")
    );
    assert_eq!(reloads(), (2, 0));
}
