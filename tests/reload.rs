//! `SIGHUP` reloads the TLS files and the policy of a running server: a real
//! server on 127.0.0.1 over mutual TLS 1.3, certificates and CRLs made in the
//! test, and a real signal sent to this process.
//!
//! One test only: a `SIGHUP` reaches every server in the process, so the
//! steps run in order in one server, and each waits for the reload counters
//! (process-wide) to move by exactly one.

mod support;

use credvault::authz::DEV_POLICY_TOML;
use credvault::pki::testing::{TestCa, days_from_now};
use credvault::service::pb::{self, CredentialKind};
use tonic::Code;

use support::{
    Pki, ServerOptions, TestServer, expect_status, hang_up, refused_at_handshake, reloads,
    seal_request, unseal_request,
};

const TENANT: &str = "tenant-a";
/// Not in the dev policy until the reload grants it the executor role.
const PARTNER: &str = "spiffe://credvault/partner/agent-1";

type Client = pb::vault_client::VaultClient<tonic::transport::Channel>;

/// Seals a cookie jar as `credential` of the test tenant.
async fn seal(
    client: &mut Client,
    credential: &str,
    secret: &[u8],
) -> Result<tonic::Response<pb::SealResponse>, tonic::Status> {
    let request = seal_request(TENANT, credential, CredentialKind::CookieJar, secret);
    client.seal(request).await
}

/// Unseals the credential the test seals first.
async fn unseal_alice(
    client: &mut Client,
) -> Result<tonic::Response<pb::UnsealResponse>, tonic::Status> {
    client.unseal(unseal_request(TENANT, "gmail/alice")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_policy_the_crl_and_the_server_certificate_all_or_nothing() {
    credvault::tls::install_default_provider();
    let pki = Pki::new();
    let partner = pki.uri(PARTNER);
    let ingest = pki.role("ingest");
    let to_revoke = pki.uri("spiffe://credvault/ingest/leaked");
    let no_serials: [&[u8]; 0] = [];
    let empty_crl = pki.ca.crl_pem(&no_serials);
    let server = TestServer::start_with(pki, ServerOptions::default().crl(empty_crl)).await;
    let dir = server.pki.dir().to_owned();
    assert_eq!(reloads(), (0, 0), "no reload before the first SIGHUP");

    let mut ingest_client = server.vault(&ingest).await;
    seal(&mut ingest_client, "gmail/alice", b"SID=1")
        .await
        .expect("seal");
    // Opened before any reload, kept open throughout.
    let mut partner_client = server.vault(&partner).await;
    let denied = unseal_alice(&mut partner_client).await;
    expect_status(denied, Code::PermissionDenied, "PERMISSION_DENIED");

    // 1. A policy that does not parse: refused, nothing changes.
    std::fs::write(dir.join("policy.toml"), "[[grant]\nidentity = ").expect("write policy");
    hang_up((0, 1)).await;
    let still_denied = unseal_alice(&mut partner_client).await;
    expect_status(still_denied, Code::PermissionDenied, "PERMISSION_DENIED");
    seal(&mut ingest_client, "gmail/bob", b"SID=2")
        .await
        .expect("the old policy stays in force after a refused reload");

    // 2. A good policy with a broken CRL beside it: refused as a whole, the
    //    policy included.
    let granted =
        format!("{DEV_POLICY_TOML}\n[[grant]]\nidentity = \"{PARTNER}\"\nroles = [\"executor\"]\n");
    std::fs::write(dir.join("policy.toml"), &granted).expect("write policy");
    std::fs::write(dir.join("crl.pem"), "not a CRL").expect("write CRL");
    hang_up((0, 2)).await;
    let denied_again = unseal_alice(&mut partner_client).await;
    expect_status(denied_again, Code::PermissionDenied, "PERMISSION_DENIED");

    // 3. The granted policy, a CRL revoking one client, and a renewed server
    //    certificate from another CA, in one reload.
    let renewed_ca = TestCa::new("renewed server CA");
    let renewed_ca_file = dir.join("renewed-ca.pem");
    std::fs::write(&renewed_ca_file, renewed_ca.cert_pem()).expect("write CA");
    let trusts_renewed = |client: &support::ClientCert| {
        credvault::tls::client_config(&renewed_ca_file, &client.cert, &client.key)
            .expect("client config")
    };
    refused_at_handshake(
        &server,
        trusts_renewed(&ingest),
        "the renewed certificate is not served before the reload",
    )
    .await;
    // Accepted before the CRL names it, on a connection kept open.
    let mut revoked_open = server.vault(&to_revoke).await;
    seal(&mut revoked_open, "leaked/1", b"k1")
        .await
        .expect("not revoked yet");

    let expires = days_from_now(45);
    let (cert, key) = renewed_ca.issue_server(days_from_now(-1), expires);
    std::fs::write(&server.pki.server_cert, cert).expect("write server certificate");
    std::fs::write(&server.pki.server_key, key).expect("write server key");
    std::fs::write(
        dir.join("crl.pem"),
        server.pki.ca.crl_pem(&[to_revoke.serial()]),
    )
    .expect("write CRL");
    hang_up((1, 2)).await;

    // The policy: on the connection opened before the reload too.
    let unsealed = unseal_alice(&mut partner_client)
        .await
        .expect("the partner is an executor now")
        .into_inner();
    assert_eq!(unsealed.secret, b"SID=1");
    // The certificate: new connections are served the renewed one …
    let mut after = Client::new(server.lazy_channel(trusts_renewed(&ingest)));
    seal(&mut after, "gmail/carol", b"SID=3")
        .await
        .expect("the renewed server certificate is served");
    // … and a client trusting only the old CA no longer connects.
    refused_at_handshake(
        &server,
        server.pki.client_config(&ingest),
        "the old server certificate is gone",
    )
    .await;
    // The CRL: the revoked client cannot open a new connection.
    refused_at_handshake(
        &server,
        trusts_renewed(&to_revoke),
        "a revoked certificate is refused after the reload",
    )
    .await;
    // … and its connection opened before the reload is refused from its next call.
    let status = seal(&mut revoked_open, "leaked/2", b"k2").await;
    expect_status(status, Code::Unauthenticated, "CERTIFICATE_REVOKED");
    // Other connections made before the reload keep their handshake.
    seal(&mut ingest_client, "gmail/erin", b"SID=5")
        .await
        .expect("an open connection survives the reload");

    // The expiry gauge follows the certificate in force.
    let expected = expires
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs() as i64;
    let gauge = credvault::metrics::global().server_certificate_expiry.get();
    assert!(
        (gauge - expected).abs() <= 1,
        "expiry gauge {gauge}, certificate expires at {expected}"
    );
    // So does the CRL's next update (the test CA promises one in 30 days).
    let due = days_from_now(30)
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs() as i64;
    let gauge = credvault::metrics::global().crl_next_update.get();
    assert!((gauge - due).abs() < 120, "CRL gauge {gauge}, due {due}");
}
