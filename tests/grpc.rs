//! The gRPC service end to end: a real server on 127.0.0.1 over mutual TLS 1.3,
//! a sled store in a temp dir, and certificates made in each test.
//!
//! Every test starts its own server (`support::TestServer`), so tests share no
//! state and run in parallel.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use credvault::authz::{BUILTIN_ROLES, DEV_POLICY_TOML, Policy, Rpc, builtin_role};
use credvault::pki::testing::{ClientIdentity, TestCa, days_from_now};
use credvault::service::pb::{self, CredentialKind};
use prost::Message;
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use support::{
    ClientCert, Pki, ServerOptions, TestServer, contains, expect_status, list_all, reason,
    role_identity, seal_request, secret_bytes, unseal_request,
};

const TENANT_A: &str = "tenant-a";
const TENANT_B: &str = "tenant-b";

const KINDS: [CredentialKind; 4] = [
    CredentialKind::CookieJar,
    CredentialKind::ApiKey,
    CredentialKind::OauthToken,
    CredentialKind::Generic,
];

/// An identity granted the executor and settings roles (every Vault RPC), but
/// only for tenant-b.
const NARROW_IDENTITY: &str = "spiffe://credvault/tenant-b/agent";

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

// ---------------------------------------------------------------------------
// Seal, unseal, metadata, list

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seal_then_unseal_returns_the_same_bytes_for_every_kind() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let mut ingest = server.vault(&server.pki.role("ingest")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;

    for (i, kind) in KINDS.into_iter().enumerate() {
        let id = format!("cred-{i}");
        let secret = secret_bytes(i as u64 + 1, 1000 + 517 * i);
        let sealed = ingest
            .seal(seal_request(TENANT_A, &id, kind, &secret))
            .await
            .unwrap_or_else(|s| panic!("Seal {kind:?}: {s:?}"))
            .into_inner()
            .metadata
            .expect("metadata");
        assert_eq!(
            (
                sealed.tenant_id.as_str(),
                sealed.credential_id.as_str(),
                sealed.version,
                sealed.kind,
                sealed.size_bytes
            ),
            (TENANT_A, id.as_str(), 1, kind as i32, secret.len() as u64)
        );

        let unsealed = executor
            .unseal(unseal_request(TENANT_A, &id))
            .await
            .unwrap_or_else(|s| panic!("Unseal {kind:?}: {s:?}"))
            .into_inner();
        assert_eq!(unsealed.secret, secret, "{kind:?}");
        let meta = unsealed.metadata.expect("metadata");
        assert_eq!((meta.kind, meta.version), (kind as i32, 1), "{kind:?}");
    }

    // A second version becomes the latest; the first is still there by number.
    let first = secret_bytes(1, 1000);
    let second = secret_bytes(100, 64);
    let v2 = ingest
        .seal(seal_request(
            TENANT_A,
            "cred-0",
            CredentialKind::CookieJar,
            &second,
        ))
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert_eq!((v2.version, v2.latest_version), (2, 2));
    let latest = executor
        .unseal(unseal_request(TENANT_A, "cred-0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(latest.secret, second);
    let old = executor
        .unseal(pb::UnsealRequest {
            version: Some(1),
            ..unseal_request(TENANT_A, "cred-0")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.secret, first);
    let old_meta = old.metadata.unwrap();
    assert_eq!((old_meta.version, old_meta.latest_version), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_and_list_never_carry_the_secret() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;
    let labels = BTreeMap::from([("env".to_owned(), "prod".to_owned())]);

    let mut secrets = Vec::new();
    for (i, kind) in KINDS.into_iter().enumerate() {
        let id = format!("cred-{i}");
        let secret = secret_bytes(1000 + i as u64, 256);
        let sealed = settings
            .seal(pb::SealRequest {
                labels: labels.clone().into_iter().collect(),
                ..seal_request(TENANT_A, &id, kind, &secret)
            })
            .await
            .unwrap()
            .into_inner();
        assert_no_secret(&sealed.encode_to_vec(), &secret, "SealResponse");

        let meta = settings
            .get_metadata(pb::GetMetadataRequest {
                tenant_id: TENANT_A.into(),
                credential_id: id.clone(),
                version: None,
            })
            .await
            .unwrap()
            .into_inner();
        assert_no_secret(&meta.encode_to_vec(), &secret, "GetMetadataResponse");
        let m = meta.metadata.expect("metadata");
        assert_eq!(m.size_bytes, 256);
        assert_eq!(m.kind, kind as i32);
        assert_eq!(
            m.labels.into_iter().collect::<BTreeMap<_, _>>(),
            labels,
            "labels come back as sealed"
        );
        secrets.push((id, secret));
    }

    let page = settings
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: TENANT_A.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.credentials.len(), KINDS.len());
    let encoded = page.encode_to_vec();
    for (id, secret) in &secrets {
        assert_no_secret(&encoded, secret, &format!("ListCredentialsResponse ({id})"));
        // The control: the search does find the secret where it belongs.
        let unsealed = executor
            .unseal(unseal_request(TENANT_A, id))
            .await
            .unwrap()
            .into_inner();
        assert!(contains(&unsealed.encode_to_vec(), secret));
    }
}

/// Neither the whole secret nor any 16-byte piece of it is in `encoded`.
#[track_caller]
fn assert_no_secret(encoded: &[u8], secret: &[u8], what: &str) {
    assert!(!contains(encoded, secret), "{what} carries the secret");
    for piece in secret.chunks(16) {
        assert!(
            !contains(encoded, piece),
            "{what} carries part of the secret"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_through_every_credential_once_in_id_order() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    let mut expected = BTreeSet::new();
    let mut api_keys = BTreeSet::new();
    for n in 0..25 {
        let id = format!("cred-{n:02}");
        let kind = KINDS[n % KINDS.len()];
        settings
            .seal(seal_request(
                TENANT_A,
                &id,
                kind,
                &secret_bytes(n as u64, 32),
            ))
            .await
            .unwrap();
        if kind == CredentialKind::ApiKey {
            api_keys.insert(id.clone());
        }
        expected.insert(id);
    }
    // Another tenant's credentials must not show up.
    settings
        .seal(seal_request(
            TENANT_B,
            "cred-00",
            CredentialKind::Generic,
            b"b's",
        ))
        .await
        .unwrap();

    let mut sizes = Vec::new();
    let mut seen = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = settings
            .list_credentials(pb::ListCredentialsRequest {
                tenant_id: TENANT_A.into(),
                page_size: 10,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        sizes.push(page.credentials.len());
        for m in &page.credentials {
            assert_eq!(m.tenant_id, TENANT_A);
            assert!(
                page_token.is_empty() || m.credential_id > page_token,
                "a page starts after its token"
            );
        }
        seen.extend(page.credentials.into_iter().map(|m| m.credential_id));
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(sizes.len() < 10, "pagination does not end");
        page_token = page.next_page_token;
    }
    assert_eq!(sizes, [10, 10, 5]);
    let unique: BTreeSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no duplicates: {seen:?}");
    assert_eq!(unique, expected);
    assert!(seen.is_sorted(), "id order: {seen:?}");

    // The kind filter.
    let filtered = settings
        .list_credentials(pb::ListCredentialsRequest {
            tenant_id: TENANT_A.into(),
            kind: CredentialKind::ApiKey as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let filtered: BTreeSet<_> = filtered
        .credentials
        .into_iter()
        .map(|m| m.credential_id)
        .collect();
    assert_eq!(filtered, api_keys);

    // A token that cannot have come from the server.
    expect_status(
        settings
            .list_credentials(pb::ListCredentialsRequest {
                tenant_id: TENANT_A.into(),
                page_token: "not a token!".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_PAGE_TOKEN",
    );
}

// ---------------------------------------------------------------------------
// Handshakes the server must refuse

/// A Seal over `config` by an identity the policy allows to seal must fail
/// below gRPC (no credvault reason: no handler ran), and nothing is stored.
/// The channel is lazy, so the refusal is observed on the RPC whatever the
/// stage it happens at: in TLS 1.3 the client thinks the handshake is done
/// before the server has checked its certificate.
async fn assert_refused(server: &TestServer, config: rustls::ClientConfig, what: &str) {
    let mut client = pb::vault_client::VaultClient::new(server.lazy_channel(config));
    let status = client
        .seal(seal_request(
            TENANT_A,
            "refused",
            CredentialKind::Generic,
            b"must never be stored",
        ))
        .await
        .expect_err(what);
    assert!(
        matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ),
        "{what}: {status:?}"
    );
    assert_eq!(
        reason(&status),
        None,
        "{what}: a handler answered: {status:?}"
    );

    let mut settings = server.vault(&server.pki.role("settings")).await;
    expect_status(
        settings
            .get_metadata(pb::GetMetadataRequest {
                tenant_id: TENANT_A.into(),
                credential_id: "refused".into(),
                version: None,
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

/// The control: `client` (from the server's CA) can seal over `config`.
async fn assert_accepted(server: &TestServer, config: rustls::ClientConfig, id: &str) {
    let mut client = pb::vault_client::VaultClient::new(server.channel_with(config).await);
    client
        .seal(seal_request(TENANT_A, id, CredentialKind::Generic, b"fine"))
        .await
        .unwrap_or_else(|s| panic!("control seal {id}: {s:?}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let anonymous = server
        .pki
        .client_config_with(None, &[&rustls::version::TLS13]);
    assert_refused(&server, anonymous, "no client certificate").await;
    assert_accepted(
        &server,
        server.pki.client_config(&server.pki.role("ingest")),
        "control",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let other = TestCa::new("another CA");
    let foreign = server.pki.client_from(
        &other,
        ClientIdentity::Uri(role_identity("ingest")),
        days_from_now(-1),
        days_from_now(30),
    );
    assert_refused(&server, server.pki.client_config(&foreign), "foreign CA").await;
    assert_accepted(
        &server,
        server.pki.client_config(&server.pki.role("ingest")),
        "control",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let expired = server.pki.client_from(
        &server.pki.ca,
        ClientIdentity::Uri(role_identity("ingest")),
        days_from_now(-10),
        days_from_now(-1),
    );
    assert_refused(&server, server.pki.client_config(&expired), "expired").await;
    assert_accepted(
        &server,
        server.pki.client_config(&server.pki.role("ingest")),
        "control",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_revoked_by_the_crl_is_refused_and_others_still_work() {
    credvault::tls::install_default_provider();
    let pki = Pki::new();
    let revoked = pki.role("ingest");
    let kept = pki.uri("spiffe://credvault/ingest/kept");
    let crl = pki.ca.crl_pem(&[revoked.serial()]);
    let server = TestServer::start_with(pki, ServerOptions::default().crl(crl)).await;

    assert_refused(&server, server.pki.client_config(&revoked), "revoked").await;
    assert_accepted(&server, server.pki.client_config(&kept), "kept").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls12_client_is_refused() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let ingest = server.pki.role("ingest");
    let tls12 = server
        .pki
        .client_config_with(Some(&ingest), &[&rustls::version::TLS12]);
    assert_refused(&server, tls12, "TLS 1.2 only").await;
    // The same certificate over TLS 1.3 is fine.
    assert_accepted(&server, server.pki.client_config(&ingest), "control").await;
}

// ---------------------------------------------------------------------------
// Authorisation

/// Calls `rpc` with a well-formed request naming `tenant` where the request has
/// a tenant; only the status matters.
async fn call(rpc: Rpc, channel: &Channel, tenant: &str) -> Result<(), tonic::Status> {
    let mut vault = pb::vault_client::VaultClient::new(channel.clone());
    let mut admin = pb::admin_client::AdminClient::new(channel.clone());
    let tenant_id = tenant.to_owned();
    let credential_id = "matrix".to_owned();
    match rpc {
        Rpc::Seal => vault
            .seal(seal_request(
                tenant,
                "matrix",
                CredentialKind::Generic,
                b"matrix secret",
            ))
            .await
            .map(drop),
        Rpc::Unseal => vault
            .unseal(unseal_request(tenant, "matrix"))
            .await
            .map(drop),
        Rpc::GetMetadata => vault
            .get_metadata(pb::GetMetadataRequest {
                tenant_id,
                credential_id,
                version: None,
            })
            .await
            .map(drop),
        Rpc::ListCredentials => vault
            .list_credentials(pb::ListCredentialsRequest {
                tenant_id,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::Revoke => vault
            .revoke(pb::RevokeRequest {
                tenant_id,
                credential_id,
                reason: "matrix".into(),
            })
            .await
            .map(drop),
        Rpc::WatchRevocations => vault
            .watch_revocations(pb::WatchRevocationsRequest {
                after_sequence: 0,
                tenant_id,
            })
            .await
            .map(drop),
        Rpc::DeleteTenant => vault
            .delete_tenant(pb::DeleteTenantRequest {
                tenant_id,
                grace_seconds: None,
            })
            .await
            .map(drop),
        Rpc::RestoreTenant => vault
            .restore_tenant(pb::RestoreTenantRequest { tenant_id })
            .await
            .map(drop),
        Rpc::SetLegalHold => vault
            .set_legal_hold(pb::SetLegalHoldRequest {
                tenant_id,
                hold: false,
                reason: "matrix".into(),
            })
            .await
            .map(drop),
        Rpc::GetTenantStatus => vault
            .get_tenant_status(pb::GetTenantStatusRequest { tenant_id })
            .await
            .map(drop),
        Rpc::RotateKek => admin.rotate_kek(pb::RotateKekRequest {}).await.map(drop),
        Rpc::RotateTenantKey => admin
            .rotate_tenant_key(pb::RotateTenantKeyRequest {
                tenant_id,
                reencrypt: false,
            })
            .await
            .map(drop),
        Rpc::RotateRootKey => admin
            .rotate_root_key(pb::RotateRootKeyRequest {
                new_root_key_file: "/nonexistent/credvault-test/root.key".into(),
            })
            .await
            .map(drop),
        Rpc::GetKeyStatus => admin
            .get_key_status(pb::GetKeyStatusRequest {
                tenant_id,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::DestroyKeyVersion => admin
            .destroy_key_version(pb::DestroyKeyVersionRequest {
                layer: "dek".into(),
                tenant_id,
                version: 999,
            })
            .await
            .map(drop),
        Rpc::GetRotationJob => admin
            .get_rotation_job(pb::GetRotationJobRequest {
                job_id: "no-such-job".into(),
            })
            .await
            .map(drop),
        Rpc::QueryAudit => admin
            .query_audit(pb::QueryAuditRequest {
                tenant_id,
                ..Default::default()
            })
            .await
            .map(drop),
        Rpc::VerifyAudit => admin
            .verify_audit(pb::VerifyAuditRequest::default())
            .await
            .map(drop),
        Rpc::Backup => admin
            .backup(pb::BackupRequest {
                // Relative: refused before anything is written.
                directory: "credvault-test-backup".into(),
            })
            .await
            .map(drop),
        Rpc::GetServerStatus => admin
            .get_server_status(pb::GetServerStatusRequest {})
            .await
            .map(drop),
    }
}

/// The tenant the policy is asked about for a [`call`]: the request's
/// `tenant_id`, for the requests that have one.
fn policy_tenant(rpc: Rpc, tenant: &str) -> Option<&str> {
    match rpc {
        Rpc::RotateKek
        | Rpc::RotateRootKey
        | Rpc::GetRotationJob
        | Rpc::VerifyAudit
        | Rpc::Backup
        | Rpc::GetServerStatus => None,
        _ => Some(tenant),
    }
}

/// Calls `rpc` as `who` and checks the outcome against `allowed`: an allowed
/// call may fail for any reason but authorisation; a denied one is
/// PERMISSION_DENIED naming the RPC and nothing of the policy.
async fn check_call(rpc: Rpc, channel: &Channel, tenant: &str, allowed: bool, who: &str) {
    let result = call(rpc, channel, tenant).await;
    if allowed {
        if let Err(status) = &result {
            assert!(
                !matches!(
                    status.code(),
                    Code::PermissionDenied | Code::Unauthenticated
                ),
                "{who} may call {rpc} on {tenant}: {status:?}"
            );
            assert!(
                status.code() != Code::Unimplemented,
                "{rpc} is implemented: {status:?}"
            );
        }
        return;
    }
    let status = match result {
        Ok(()) => panic!("{who} must not be able to call {rpc} on {tenant}"),
        Err(status) => status,
    };
    assert_eq!(
        (status.code(), reason(&status).as_deref()),
        (Code::PermissionDenied, Some("PERMISSION_DENIED")),
        "{who} {rpc} {tenant}: {status:?}"
    );
    let message = status.message();
    assert!(
        message
            .split(|c: char| !c.is_ascii_alphanumeric())
            .any(|word| word == rpc.name()),
        "the denial names the RPC: {message:?}"
    );
    for internal in ["spiffe", "grant", "role", TENANT_B, who]
        .into_iter()
        .chain(BUILTIN_ROLES)
    {
        assert!(
            !message.contains(internal),
            "the denial shows policy internals ({internal}): {message:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_may_call_exactly_the_rpcs_the_policy_grants() {
    credvault::tls::install_default_provider();
    let policy_text = narrowed_policy();
    let policy = Policy::from_toml(&policy_text).unwrap();
    let server =
        TestServer::start_with(Pki::new(), ServerOptions::default().policy(policy_text)).await;

    for role in BUILTIN_ROLES {
        let identity = role_identity(role);
        let channel = server.channel(&server.pki.role(role)).await;
        let mut granted = 0;
        for rpc in Rpc::ALL {
            let allowed = policy.allows(&identity, rpc, policy_tenant(rpc, TENANT_A));
            check_call(rpc, &channel, TENANT_A, allowed, &identity).await;
            granted += usize::from(allowed);
        }
        assert_eq!(granted, builtin_role(role).unwrap().len(), "{role}");
    }

    // Certificates from the right CA whose identity no grant matches.
    let unknown = [
        ClientIdentity::Uri("spiffe://credvault/nobody/t".into()),
        ClientIdentity::Uri("spiffe://credvault/executor".into()),
        ClientIdentity::Uri("spiffe://other-domain/executor/t".into()),
        ClientIdentity::Dns("executor.credvault.test".into()),
        ClientIdentity::CommonName("admin".into()),
    ];
    for identity in unknown {
        let cert = server.pki.client(identity);
        let who = cert.identity.clone().unwrap();
        let channel = server.channel(&cert).await;
        for rpc in Rpc::ALL {
            for tenant in [TENANT_A, TENANT_B] {
                assert!(!policy.allows(&who, rpc, policy_tenant(rpc, tenant)));
                check_call(rpc, &channel, tenant, false, &who).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_narrowed_identity_cannot_touch_another_tenant() {
    credvault::tls::install_default_provider();
    let policy_text = narrowed_policy();
    let policy = Policy::from_toml(&policy_text).unwrap();
    let server =
        TestServer::start_with(Pki::new(), ServerOptions::default().policy(policy_text)).await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;
    let secret = secret_bytes(7, 100);
    for tenant in [TENANT_A, TENANT_B] {
        settings
            .seal(seal_request(
                tenant,
                "matrix",
                CredentialKind::ApiKey,
                &secret,
            ))
            .await
            .unwrap();
    }

    let narrow = server.channel(&server.pki.uri(NARROW_IDENTITY)).await;
    let mut allowed_on_b = 0;
    for rpc in Rpc::ALL {
        assert!(!policy.allows(NARROW_IDENTITY, rpc, policy_tenant(rpc, TENANT_A)));
        check_call(rpc, &narrow, TENANT_A, false, NARROW_IDENTITY).await;

        let allowed = policy.allows(NARROW_IDENTITY, rpc, policy_tenant(rpc, TENANT_B));
        // Every Vault RPC, and the settings role's audit query of its own tenant.
        assert_eq!(allowed, !rpc.is_admin() || rpc == Rpc::QueryAudit, "{rpc}");
        check_call(rpc, &narrow, TENANT_B, allowed, NARROW_IDENTITY).await;
        allowed_on_b += usize::from(allowed);
    }
    assert_eq!(
        allowed_on_b, 11,
        "every Vault RPC and QueryAudit on tenant-b"
    );

    // tenant-a's credential is untouched (the narrowed caller tried Seal and Revoke).
    let unsealed = executor
        .unseal(unseal_request(TENANT_A, "matrix"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unsealed.secret, secret);
    let meta = unsealed.metadata.unwrap();
    assert_eq!((meta.version, meta.revocation), (1, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_cannot_unseal_list_revoke_or_learn_of_a_credential() {
    credvault::tls::install_default_provider();
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default().policy(narrowed_policy()),
    )
    .await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;
    let secret_a = secret_bytes(0xa, 64);
    settings
        .seal(seal_request(
            TENANT_A,
            "shared-name",
            CredentialKind::CookieJar,
            &secret_a,
        ))
        .await
        .unwrap();

    let mut b = server.vault(&server.pki.uri(NARROW_IDENTITY)).await;
    let mut outcomes = Vec::new();
    for id in ["shared-name", "never-sealed"] {
        let unseal = b.unseal(unseal_request(TENANT_A, id)).await.map(drop);
        let metadata = b
            .get_metadata(pb::GetMetadataRequest {
                tenant_id: TENANT_A.into(),
                credential_id: id.into(),
                version: None,
            })
            .await
            .map(drop);
        let revoke = b
            .revoke(pb::RevokeRequest {
                tenant_id: TENANT_A.into(),
                credential_id: id.into(),
                reason: "b tries".into(),
            })
            .await
            .map(drop);
        let mut seen = Vec::new();
        for (rpc, result) in [
            ("Unseal", unseal),
            ("GetMetadata", metadata),
            ("Revoke", revoke),
        ] {
            let status = expect_status(result, Code::PermissionDenied, "PERMISSION_DENIED");
            seen.push((
                rpc,
                status.code(),
                reason(&status),
                status.message().to_owned(),
            ));
        }
        outcomes.push(seen);
    }
    assert_eq!(
        outcomes[0], outcomes[1],
        "an existing and a missing credential of tenant-a look the same to tenant-b"
    );
    expect_status(
        b.list_credentials(pb::ListCredentialsRequest {
            tenant_id: TENANT_A.into(),
            ..Default::default()
        })
        .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );

    // tenant-b's own credential of the same name is its own.
    let secret_b = secret_bytes(0xb, 64);
    b.seal(seal_request(
        TENANT_B,
        "shared-name",
        CredentialKind::CookieJar,
        &secret_b,
    ))
    .await
    .unwrap();
    let mine = b
        .unseal(unseal_request(TENANT_B, "shared-name"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mine.secret, secret_b);
    let listed = list_all(&mut b, TENANT_B).await;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].tenant_id, TENANT_B);

    // tenant-a's credential is still there, unrevoked.
    let a = executor
        .unseal(unseal_request(TENANT_A, "shared-name"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.secret, secret_a);
    assert_eq!(a.metadata.unwrap().revocation, None);
}

// ---------------------------------------------------------------------------
// Bad input

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_the_documented_reason_and_change_nothing() {
    credvault::tls::install_default_provider();
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default().limit("max_secret_bytes = 4096"),
    )
    .await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;
    let existing = secret_bytes(1, 100);
    settings
        .seal(seal_request(
            TENANT_A,
            "existing",
            CredentialKind::ApiKey,
            &existing,
        ))
        .await
        .unwrap();
    let before = list_all(&mut settings, TENANT_A).await;

    let ok_secret = b"fine".to_vec();
    let seal = |tenant: &str, credential: &str| {
        seal_request(tenant, credential, CredentialKind::Generic, &ok_secret)
    };
    let long_tenant = "t".repeat(65);
    let long_credential = "c".repeat(257);

    // Malformed ids, on every RPC that takes them.
    for tenant in ["", "bad tenant", "tenant/a", "é", long_tenant.as_str()] {
        expect_status(
            settings.seal(seal(tenant, "new-cred")).await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
        expect_status(
            executor.unseal(unseal_request(tenant, "existing")).await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
        expect_status(
            settings
                .get_metadata(pb::GetMetadataRequest {
                    tenant_id: tenant.into(),
                    credential_id: "existing".into(),
                    version: None,
                })
                .await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
        expect_status(
            settings
                .list_credentials(pb::ListCredentialsRequest {
                    tenant_id: tenant.into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
        expect_status(
            settings
                .revoke(pb::RevokeRequest {
                    tenant_id: tenant.into(),
                    credential_id: "existing".into(),
                    reason: String::new(),
                })
                .await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
    }
    for credential in [
        "",
        "has space",
        "new\ncred",
        "x#y",
        long_credential.as_str(),
    ] {
        expect_status(
            settings.seal(seal(TENANT_A, credential)).await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
        expect_status(
            executor.unseal(unseal_request(TENANT_A, credential)).await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
        expect_status(
            settings
                .get_metadata(pb::GetMetadataRequest {
                    tenant_id: TENANT_A.into(),
                    credential_id: credential.into(),
                    version: None,
                })
                .await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
        expect_status(
            settings
                .revoke(pb::RevokeRequest {
                    tenant_id: TENANT_A.into(),
                    credential_id: credential.into(),
                    reason: String::new(),
                })
                .await,
            Code::InvalidArgument,
            "INVALID_ID",
        );
    }

    // Oversize secret: one byte over the configured limit (new and existing credential).
    for credential in ["new-cred", "existing"] {
        expect_status(
            settings
                .seal(seal_request(
                    TENANT_A,
                    credential,
                    CredentialKind::Generic,
                    &secret_bytes(2, 4097),
                ))
                .await,
            Code::InvalidArgument,
            "TOO_LARGE",
        );
    }

    // 33 labels.
    let labels: Vec<_> = (0..33).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let status = expect_status(
        settings
            .seal(pb::SealRequest {
                labels: labels.iter().cloned().collect(),
                ..seal(TENANT_A, "new-cred")
            })
            .await,
        Code::InvalidArgument,
        "TOO_MANY_LABELS",
    );
    assert!(status.message().contains("33"), "{status:?}");

    // Unknown and unspecified kinds.
    for kind in [99, -1, CredentialKind::Unspecified as i32] {
        expect_status(
            settings
                .seal(pb::SealRequest {
                    kind,
                    ..seal(TENANT_A, "new-cred")
                })
                .await,
            Code::InvalidArgument,
            "INVALID_KIND",
        );
    }
    expect_status(
        settings
            .list_credentials(pb::ListCredentialsRequest {
                tenant_id: TENANT_A.into(),
                kind: 99,
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "INVALID_KIND",
    );

    // Version 0.
    expect_status(
        executor
            .unseal(pb::UnsealRequest {
                version: Some(0),
                ..unseal_request(TENANT_A, "existing")
            })
            .await,
        Code::InvalidArgument,
        "INVALID_VERSION",
    );
    expect_status(
        settings
            .get_metadata(pb::GetMetadataRequest {
                tenant_id: TENANT_A.into(),
                credential_id: "existing".into(),
                version: Some(0),
            })
            .await,
        Code::InvalidArgument,
        "INVALID_VERSION",
    );

    // Nothing changed: the same list, the same secret, no new tenant.
    assert_eq!(list_all(&mut settings, TENANT_A).await, before);
    let unsealed = executor
        .unseal(unseal_request(TENANT_A, "existing"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unsealed.secret, existing);

    // The limits are where they are documented: exactly at them is fine.
    settings
        .seal(seal_request(
            TENANT_A,
            "at-the-limit",
            CredentialKind::Generic,
            &secret_bytes(3, 4096),
        ))
        .await
        .expect("a secret of exactly max_secret_bytes");
    settings
        .seal(pb::SealRequest {
            labels: labels[..32].iter().cloned().collect(),
            ..seal(TENANT_A, "32-labels")
        })
        .await
        .expect("32 labels");
    assert_eq!(list_all(&mut settings, TENANT_A).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_expected_version_is_a_version_mismatch_and_changes_nothing() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;
    let with_expected = |secret: &[u8], expected: Option<u32>| pb::SealRequest {
        expected_version: expected,
        ..seal_request(TENANT_A, "cas", CredentialKind::OauthToken, secret)
    };
    let v1 = secret_bytes(1, 50);
    let v2 = secret_bytes(2, 50);
    settings.seal(with_expected(&v1, Some(0))).await.unwrap();
    settings.seal(with_expected(&v2, Some(1))).await.unwrap();

    for stale in [Some(0), Some(1), Some(3)] {
        let status = expect_status(
            settings
                .seal(with_expected(&secret_bytes(9, 50), stale))
                .await,
            Code::FailedPrecondition,
            "VERSION_MISMATCH",
        );
        assert!(!status.message().is_empty());
    }
    // expected_version 0 on a new credential succeeds; on it again, it conflicts.
    settings
        .seal(pb::SealRequest {
            credential_id: "fresh".into(),
            ..with_expected(&v1, Some(0))
        })
        .await
        .unwrap();
    expect_status(
        settings
            .seal(pb::SealRequest {
                credential_id: "fresh".into(),
                ..with_expected(&v1, Some(0))
            })
            .await,
        Code::FailedPrecondition,
        "VERSION_MISMATCH",
    );

    let meta = settings
        .get_metadata(pb::GetMetadataRequest {
            tenant_id: TENANT_A.into(),
            credential_id: "cas".into(),
            version: None,
        })
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert_eq!((meta.version, meta.latest_version), (2, 2));
    let unsealed = executor
        .unseal(unseal_request(TENANT_A, "cas"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(unsealed.secret, v2);

    // The current version is accepted.
    let v3 = settings
        .seal(with_expected(&secret_bytes(3, 50), Some(2)))
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert_eq!(v3.version, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_gets_a_clear_status_and_the_server_keeps_serving() {
    credvault::tls::install_default_provider();
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default().limit("max_secret_bytes = 4096"),
    )
    .await;
    let settings = server.pki.role("settings");
    let mut client = server.vault(&settings).await;

    // Refused from the message's length prefix, before the handler (or any
    // buffering); the same status and reason as a secret just over the limit.
    let status = expect_status(
        client
            .seal(seal_request(
                TENANT_A,
                "huge",
                CredentialKind::Generic,
                &secret_bytes(4, 2 << 20),
            ))
            .await,
        Code::InvalidArgument,
        "TOO_LARGE",
    );
    assert!(status.message().contains("too large"), "{status:?}");

    // The same connection and a new one both still work.
    client
        .seal(seal_request(
            TENANT_A,
            "small-1",
            CredentialKind::Generic,
            b"s1",
        ))
        .await
        .expect("the same connection after the oversize message");
    let mut again = server.vault(&settings).await;
    again
        .seal(seal_request(
            TENANT_A,
            "small-2",
            CredentialKind::Generic,
            b"s2",
        ))
        .await
        .expect("a new connection after the oversize message");
    let ids: Vec<_> = list_all(&mut again, TENANT_A)
        .await
        .into_iter()
        .map(|m| m.credential_id)
        .collect();
    assert_eq!(
        ids,
        ["small-1", "small-2"],
        "nothing of the huge message stored"
    );
}

/// With `concurrency_per_caller = 1`, bursts of concurrent Unseals from one
/// identity must see refusals (`CALLER_CONCURRENCY`), while another identity's
/// calls at the same time all succeed; every place comes back afterwards.
/// Whether two calls overlap is up to the scheduler, so the burst is repeated
/// until one is refused (a limiter that never refuses fails after 20 bursts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_over_its_concurrency_limit_is_refused_and_others_are_not() {
    credvault::tls::install_default_provider();
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default().limit("concurrency_per_caller = 1"),
    )
    .await;
    let mut ingest = server.vault(&server.pki.role("ingest")).await;
    ingest
        .seal(seal_request(TENANT_A, "busy", CredentialKind::ApiKey, b"k"))
        .await
        .expect("Seal");
    let executor = server.vault(&server.pki.role("executor")).await;
    let other = server
        .vault(&server.pki.uri("spiffe://credvault/executor/other"))
        .await;

    let mut refused = 0;
    for _ in 0..20 {
        let burst: Vec<_> = (0..32)
            .map(|_| {
                let mut client = executor.clone();
                tokio::spawn(async move { client.unseal(unseal_request(TENANT_A, "busy")).await })
            })
            .collect();
        // Meanwhile, one call at a time from another identity: never refused.
        let mut calm = other.clone();
        for _ in 0..4 {
            calm.unseal(unseal_request(TENANT_A, "busy"))
                .await
                .expect("another caller is not limited by the busy one");
        }
        for call in burst {
            match call.await.expect("task") {
                Ok(_) => {}
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert_eq!(reason(&status).as_deref(), Some("CALLER_CONCURRENCY"));
                    refused += 1;
                }
            }
        }
        if refused > 0 {
            break;
        }
    }
    assert!(refused > 0, "no call was refused in 20 bursts of 32");

    // Every place came back: one call at a time succeeds again.
    let mut executor = executor;
    for _ in 0..3 {
        executor
            .unseal(unseal_request(TENANT_A, "busy"))
            .await
            .expect("after the burst");
    }

    // Each refusal is audited as a denial of Unseal.
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let records = admin
        .query_audit(pb::QueryAuditRequest {
            tenant_id: TENANT_A.into(),
            outcome: "CALLER_CONCURRENCY".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("QueryAudit")
        .into_inner()
        .records;
    assert_eq!(records.len(), refused, "one audit record per refusal");
    assert!(records.iter().all(|r| r.rpc == "Unseal"), "{records:?}");
}

// ---------------------------------------------------------------------------
// Revocation

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_revoke_the_very_next_unseal_is_revoked_and_revoke_is_idempotent() {
    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;
    for (id, seed) in [("jar", 1), ("jar", 2), ("other", 3)] {
        settings
            .seal(seal_request(
                TENANT_A,
                id,
                CredentialKind::CookieJar,
                &secret_bytes(seed, 40),
            ))
            .await
            .unwrap();
    }
    executor
        .unseal(unseal_request(TENANT_A, "jar"))
        .await
        .expect("live before revocation");

    let revoke = |reason: &str| pb::RevokeRequest {
        tenant_id: TENANT_A.into(),
        credential_id: "jar".into(),
        reason: reason.into(),
    };
    let first = settings
        .revoke(revoke("leaked"))
        .await
        .unwrap()
        .into_inner()
        .revocation
        .expect("tombstone");
    assert_eq!(first.revoked_by, role_identity("settings"));
    assert_eq!(first.reason, "leaked");

    expect_status(
        executor.unseal(unseal_request(TENANT_A, "jar")).await,
        Code::FailedPrecondition,
        "REVOKED",
    );
    for version in [1, 2] {
        expect_status(
            executor
                .unseal(pb::UnsealRequest {
                    version: Some(version),
                    ..unseal_request(TENANT_A, "jar")
                })
                .await,
            Code::FailedPrecondition,
            "REVOKED",
        );
    }

    // Again: the original tombstone, unchanged.
    let second = settings
        .revoke(revoke("a different reason"))
        .await
        .expect("revoke is idempotent")
        .into_inner()
        .revocation
        .expect("tombstone");
    assert_eq!(second, first);
    let meta = settings
        .get_metadata(pb::GetMetadataRequest {
            tenant_id: TENANT_A.into(),
            credential_id: "jar".into(),
            version: None,
        })
        .await
        .unwrap()
        .into_inner()
        .metadata
        .unwrap();
    assert_eq!(meta.revocation, Some(first));
    expect_status(
        executor.unseal(unseal_request(TENANT_A, "jar")).await,
        Code::FailedPrecondition,
        "REVOKED",
    );

    // Only that credential.
    let other = executor
        .unseal(unseal_request(TENANT_A, "other"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(other.secret, secret_bytes(3, 40));
    expect_status(
        settings
            .revoke(pb::RevokeRequest {
                credential_id: "never-sealed".into(),
                ..revoke("x")
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
}

// ---------------------------------------------------------------------------
// Standard services

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_reflection_lists_both_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    credvault::tls::install_default_provider();
    let server = TestServer::start().await;
    // Any client of the right CA may probe; the policy does not cover these.
    let channel = server
        .channel(&server.pki.uri("spiffe://credvault/probe/k8s"))
        .await;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "credvault.v1.Vault", "credvault.v1.Admin"] {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("Check {service:?}: {s:?}"))
            .into_inner();
        assert_eq!(
            response.status,
            ServingStatus::Serving as i32,
            "{service:?}"
        );
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), Code::NotFound);

    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = ServerReflectionClient::new(channel)
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses
        .message()
        .await
        .unwrap()
        .expect("a reflection response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a list of services: {response:?}");
    };
    let names: BTreeSet<_> = list.service.into_iter().map(|s| s.name).collect();
    for name in [
        "credvault.v1.Vault",
        "credvault.v1.Admin",
        "grpc.health.v1.Health",
    ] {
        assert!(names.contains(name), "{name} missing from {names:?}");
    }
}

// ---------------------------------------------------------------------------
// Graceful shutdown

/// A Seal request body whose one message is held back until released: the
/// HTTP/2 stream is open (and reported through `opened`) but the call cannot
/// complete before the test lets it.
struct HeldSeal {
    opened: Option<oneshot::Sender<()>>,
    message: oneshot::Receiver<pb::SealRequest>,
    done: bool,
}

impl tokio_stream::Stream for HeldSeal {
    type Item = pb::SealRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(opened) = self.opened.take() {
            let _ = opened.send(());
        }
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.message).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(message) => {
                self.done = true;
                Poll::Ready(message.ok())
            }
        }
    }
}

/// `Vault/Seal` with a held-back body. On the wire it is an ordinary unary
/// call: one message, then the end of the stream.
async fn held_seal(channel: Channel, body: HeldSeal) -> Result<pb::SealResponse, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<pb::SealRequest, pb::SealResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/credvault.v1.Vault/Seal");
    grpc.client_streaming(tonic::Request::new(body), path, codec)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_every_in_flight_call() {
    const CONNECTIONS: usize = 4;
    const CALLS_PER_CONNECTION: usize = 8;
    const SECRET: usize = 512 << 10;
    credvault::tls::install_default_provider();
    let mut server = TestServer::start().await; // 1 MiB secrets by default
    let settings: ClientCert = server.pki.role("settings");
    let mut channels = Vec::new();
    for _ in 0..CONNECTIONS {
        channels.push(server.channel(&settings).await);
    }

    let mut calls = Vec::new();
    let mut opened = Vec::new();
    let mut held = Vec::new();
    for (c, channel) in channels.iter().enumerate() {
        for i in 0..CALLS_PER_CONNECTION {
            let n = c * CALLS_PER_CONNECTION + i;
            let (opened_tx, opened_rx) = oneshot::channel();
            let (message_tx, message_rx) = oneshot::channel();
            let body = HeldSeal {
                opened: Some(opened_tx),
                message: message_rx,
                done: false,
            };
            calls.push(tokio::spawn(held_seal(channel.clone(), body)));
            opened.push(opened_rx);
            let request = seal_request(
                TENANT_A,
                &format!("in-flight-{n:02}"),
                CredentialKind::CookieJar,
                &secret_bytes(n as u64, SECRET),
            );
            held.push((message_tx, request));
        }
    }
    // Each body is polled once its HTTP/2 stream exists...
    for opened in opened {
        opened.await.expect("the call's body was polled");
    }
    // ...and a later stream on the same connection is answered only after the
    // server has read the HEADERS of every earlier one: all calls are in flight.
    for channel in &channels {
        HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await
            .expect("health on a busy connection");
    }

    // Watch health from another connection to see the server start draining.
    let watcher = server.channel(&settings).await;
    let mut watch = HealthClient::new(watcher)
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let status = |m: Option<tonic_health::pb::HealthCheckResponse>| m.expect("a status").status;
    assert_eq!(
        status(watch.message().await.unwrap()),
        ServingStatus::Serving as i32
    );
    server.begin_shutdown();
    assert_eq!(
        status(watch.message().await.unwrap()),
        ServingStatus::NotServing as i32
    );
    drop(watch);
    assert!(
        !server.has_stopped(),
        "the server stopped with calls in flight"
    );

    for (sender, request) in held {
        let _ = sender.send(request); // a call that already failed is caught below
    }
    let mut acknowledged = BTreeSet::new();
    for call in calls {
        let response = call
            .await
            .expect("call task")
            .unwrap_or_else(|s| panic!("an in-flight call failed during shutdown: {s:?}"));
        let meta = response.metadata.expect("metadata");
        assert_eq!(meta.size_bytes, SECRET as u64);
        acknowledged.insert(meta.credential_id);
    }
    assert_eq!(acknowledged.len(), CONNECTIONS * CALLS_PER_CONNECTION);
    drop(channels);

    server.stop().await.expect("server::run returns Ok");

    let vault = server.open_vault().await;
    let page = vault.list(TENANT_A, None, 1000, None).unwrap();
    let stored: BTreeSet<_> = page
        .credentials
        .iter()
        .map(|m| m.credential.clone())
        .collect();
    assert_eq!(stored, acknowledged);
    for (n, id) in acknowledged.iter().enumerate() {
        let unsealed = vault.unseal(TENANT_A, id, None).await.unwrap();
        assert_eq!(
            unsealed.secret.expose(),
            secret_bytes(n as u64, SECRET).as_slice(),
            "{id}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_watch_does_not_hold_up_shutdown() {
    credvault::tls::install_default_provider();
    let mut server = TestServer::start().await;
    // gRPC client-side health checking keeps a Watch like this one open on
    // every connection.
    let channel = server.channel(&server.pki.role("executor")).await;
    let mut watches = Vec::new();
    for service in ["", "credvault.v1.Vault"] {
        let mut watch = HealthClient::new(channel.clone())
            .watch(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let first = watch.message().await.unwrap().expect("a status");
        assert_eq!(first.status, ServingStatus::Serving as i32);
        watches.push(watch);
    }
    server.begin_shutdown();

    // A guard against hanging, not a timing assertion: a watch that never
    // ends would keep the server draining forever.
    let ended = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        for watch in &mut watches {
            let last = watch.message().await.unwrap().expect("a status");
            assert_eq!(last.status, ServingStatus::NotServing as i32);
            assert_eq!(watch.message().await.unwrap(), None, "the stream ends");
        }
        server.stop().await
    })
    .await
    .expect("shutdown waited on the health watch streams");
    ended.expect("server::run returns Ok");
}

// ---------------------------------------------------------------------------
// Server status

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_status_shows_the_keys_the_logs_and_the_store() {
    let server = TestServer::start().await;
    let admin = server.admin(&server.pki.role("admin")).await;
    let status = || {
        let mut admin = admin.clone();
        async move {
            admin
                .get_server_status(pb::GetServerStatusRequest {})
                .await
                .expect("status")
                .into_inner()
        }
    };
    let first = status().await;
    assert_eq!(first.version, env!("CARGO_PKG_VERSION"));
    assert!(
        first.started_at_ms > 0 && first.started_at_ms <= first.now_ms,
        "{first:?}"
    );
    assert_eq!((first.root_key_version, first.primary_kek_version), (1, 1));
    assert!(first.root_key_created_at_ms > 0 && first.root_key_created_at_ms <= first.now_ms);
    assert!(first.primary_kek_created_at_ms >= first.root_key_created_at_ms);
    assert!(first.store_writable);
    assert!(first.store_bytes > 0, "{first:?}");
    assert_eq!(first.rotation_jobs_running, 0);

    let mut settings = server.vault(&server.pki.role("settings")).await;
    settings
        .seal(seal_request(TENANT_A, "c", CredentialKind::ApiKey, b"s"))
        .await
        .expect("seal");
    settings
        .revoke(pb::RevokeRequest {
            tenant_id: TENANT_A.into(),
            credential_id: "c".into(),
            reason: "status test".into(),
        })
        .await
        .expect("revoke");
    let second = status().await;
    assert_eq!(second.last_event_sequence, first.last_event_sequence + 1);
    // This call's own record comes after: the first status, the seal and the revoke.
    assert_eq!(second.last_audit_sequence, first.last_audit_sequence + 3);
    assert_eq!(second.primary_kek_encryptions, 1, "the tenant's first DEK");
    // Its head is that record, as VerifyAudit sees it (which verifies up to it).
    let head = second.audit_head.clone().expect("an audit head");
    assert_eq!(head.sequence, second.last_audit_sequence);
    let verified = admin
        .clone()
        .verify_audit(pb::VerifyAuditRequest { seen: Some(head) })
        .await
        .expect("VerifyAudit")
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.head_check(), pb::HeadCheck::Matched);

    admin
        .clone()
        .rotate_kek(pb::RotateKekRequest {})
        .await
        .expect("rotate");
    let third = status().await;
    assert_eq!(third.primary_kek_version, 2);
    assert!(third.primary_kek_created_at_ms >= second.primary_kek_created_at_ms);

    let denied = server
        .admin(&server.pki.role("executor"))
        .await
        .get_server_status(pb::GetServerStatusRequest {})
        .await;
    expect_status(denied, Code::PermissionDenied, "PERMISSION_DENIED");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_status_comes_in_pages_that_add_up() {
    let server = TestServer::start().await;
    let mut admin = server.admin(&server.pki.role("admin")).await;
    let mut settings = server.vault(&server.pki.role("settings")).await;
    for tenant in ["t1", "t2", "t3"] {
        settings
            .seal(seal_request(tenant, "c", CredentialKind::ApiKey, b"s"))
            .await
            .expect("seal");
    }
    let whole = admin
        .get_key_status(pb::GetKeyStatusRequest::default())
        .await
        .expect("key status")
        .into_inner();
    assert_eq!(whole.next_page_token, "", "one page by default");
    let layers: Vec<&str> = whole.versions.iter().map(|v| v.layer.as_str()).collect();
    assert_eq!(layers, ["root", "kek", "dek", "dek", "dek"]);

    let mut rows = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = admin
            .get_key_status(pb::GetKeyStatusRequest {
                page_size: 1,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("page")
            .into_inner();
        pages += 1;
        rows.extend(page.versions);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(rows, whole.versions);

    let bad = admin
        .get_key_status(pb::GetKeyStatusRequest {
            page_token: "t1".into(),
            ..Default::default()
        })
        .await;
    expect_status(bad, Code::InvalidArgument, "INVALID_PAGE_TOKEN");
}
