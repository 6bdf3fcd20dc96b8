//! Prometheus metrics end to end: a real server on 127.0.0.1 over mutual TLS,
//! its metrics on another 127.0.0.1 port, scraped over plain HTTP.
//!
//! The metrics are process-wide, so this file holds one test: nothing else in
//! its process makes calls that would move the counters it checks.

mod support;

use std::net::SocketAddr;

use credvault::service::pb::{self, CredentialKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use support::{ServerOptions, TestServer, expect_status, seal_request, unseal_request};

const TENANT: &str = "tenant-metrics-7f3a";
const CREDENTIAL: &str = "credential-metrics-91c2";

/// `GET path` over HTTP/1.1; returns the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics port");
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send the request");
    let mut response = String::new();
    tcp.read_to_string(&mut response)
        .await
        .expect("read the response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("an HTTP response has a head");
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, body.to_owned())
}

/// The value of the sample `name` (with its labels, as printed), if present.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_commits_and_syncs_are_counted_and_no_customer_name_is_exported() {
    credvault::tls::install_default_provider();
    let server =
        TestServer::start_with(support::Pki::new(), ServerOptions::default().metrics()).await;
    let metrics = server.metrics_addr.expect("metrics were asked for");
    let mut ingest = server.vault(&server.pki.role("ingest")).await;
    let mut executor = server.vault(&server.pki.role("executor")).await;

    let missing = executor.unseal(unseal_request(TENANT, CREDENTIAL)).await;
    expect_status(missing, Code::NotFound, "NOT_FOUND");
    ingest
        .seal(seal_request(
            TENANT,
            CREDENTIAL,
            CredentialKind::ApiKey,
            b"sk-metrics-secret-bytes",
        ))
        .await
        .expect("Seal");
    for _ in 0..3 {
        executor
            .unseal(unseal_request(TENANT, CREDENTIAL))
            .await
            .expect("Unseal");
    }
    // The executor may not seal.
    let denied = executor
        .seal(seal_request(TENANT, "other", CredentialKind::ApiKey, b"x"))
        .await;
    expect_status(denied, Code::PermissionDenied, "PERMISSION_DENIED");

    let (status, text) = get(metrics, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let calls = |method: &str, code: &str| {
        sample(
            &text,
            &format!(
                "credvault_grpc_calls_total{{method=\"/credvault.v1.Vault/{method}\",code=\"{code}\"}}"
            ),
        )
    };
    assert_eq!(calls("Unseal", "OK"), Some(3.0), "{text}");
    assert_eq!(calls("Unseal", "NOT_FOUND"), Some(1.0), "{text}");
    assert_eq!(calls("Seal", "OK"), Some(1.0), "{text}");
    assert_eq!(calls("Seal", "PERMISSION_DENIED"), Some(1.0), "{text}");
    assert_eq!(
        sample(
            &text,
            "credvault_grpc_call_duration_seconds_count{method=\"/credvault.v1.Vault/Unseal\"}"
        ),
        Some(4.0),
        "{text}"
    );

    // Every call above wrote durably: the seal through the store; each
    // Unseal's audit record, the denial's and the miss's through the audit
    // journal, one call at a time, so each with a sync of its own.
    let commits = sample(&text, "credvault_store_commits_total").expect("commits");
    assert!(commits >= 1.0, "{commits} commits:\n{text}");
    let syncs = sample(&text, "credvault_store_log_sync_duration_seconds_count").expect("syncs");
    assert!(
        syncs >= 1.0 && syncs <= commits,
        "{syncs} syncs, {commits} commits:\n{text}"
    );
    let journal = sample(&text, "credvault_audit_journal_sync_duration_seconds_count")
        .expect("journal syncs");
    assert!(journal >= 5.0, "{journal} journal syncs:\n{text}");
    assert_eq!(sample(&text, "credvault_store_failed"), Some(0.0), "{text}");

    for name in [TENANT, CREDENTIAL, "sk-metrics-secret-bytes", "executor"] {
        assert!(!text.contains(name), "{name} exported:\n{text}");
    }

    let (status, _) = get(metrics, "/").await;
    assert!(status.contains("404"), "{status}");

    // An open WatchRevocations stream is counted while it is open.
    let watchers = || async {
        sample(
            &get(metrics, "/metrics").await.1,
            "credvault_revocation_watchers",
        )
    };
    assert_eq!(watchers().await, Some(0.0));
    let mut stream = executor
        .watch_revocations(pb::WatchRevocationsRequest::default())
        .await
        .expect("WatchRevocations")
        .into_inner();
    stream
        .message()
        .await
        .expect("the opening keepalive")
        .expect("a message");
    assert_eq!(watchers().await, Some(1.0));
    drop(stream);
    let mut left = None;
    for _ in 0..200 {
        left = watchers().await;
        if left == Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(left, Some(0.0), "the watch ended when its client left");

    // The key ages, from the background round that runs at start: the root
    // key and KEK v1 were made when the store was, moments ago.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let mut created = (None, None);
    for _ in 0..500 {
        let text = get(metrics, "/metrics").await.1;
        created = (
            sample(&text, "credvault_root_key_created_timestamp_seconds"),
            sample(&text, "credvault_primary_kek_created_timestamp_seconds"),
        );
        if created.0 > Some(0.0) && created.1 > Some(0.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    for (name, at) in [("root key", created.0), ("primary KEK", created.1)] {
        let at = at.unwrap_or_else(|| panic!("{name}: no gauge"));
        assert!(
            at > now - 120.0 && at <= now,
            "{name} created at {at}, now {now}"
        );
    }

    // The audit head: the round at start ran before any call; a KEK rotation wakes
    // the next one, which publishes the head the calls above moved (six records at
    // least: the missing unseal, the seal, three unseals, the denied seal).
    let mut admin = server.admin(&server.pki.role("admin")).await;
    admin
        .rotate_kek(pb::RotateKekRequest::default())
        .await
        .expect("RotateKek");
    let mut head = None;
    for _ in 0..500 {
        head = sample(
            &get(metrics, "/metrics").await.1,
            "credvault_audit_head_sequence",
        );
        if head >= Some(6.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(head >= Some(6.0), "audit head gauge: {head:?}");
}
