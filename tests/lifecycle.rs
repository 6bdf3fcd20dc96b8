//! Revocation events and the tenant lifecycle over gRPC, end to end: a real
//! server on 127.0.0.1 over mutual TLS 1.3 with certificates made in the test
//! and a sled store in a temp dir (the real binary for the SIGKILL test).
//!
//! - Revocation has no window: once Revoke returns, no Unseal that starts
//!   succeeds, under 32 concurrent Unseal loops; a watcher gets the event.
//! - A watcher that reconnects with its last sequence number misses nothing
//!   and sees nothing twice; a tenant filter shows only that tenant.
//! - DeleteTenant denies at once, RestoreTenant brings everything back, a
//!   grace of 0 shreds in the background and leaves an exact receipt; a legal
//!   hold (set before or after the deletion) blocks the shred until released.
//! - A shred killed with SIGKILL mid-purge completes after a restart and
//!   counts every record once.
//!
//! Waiting is polling with a hang guard, never a sleep that an assertion
//! depends on.

mod support;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use credvault::config::Config;
use credvault::service::pb::revocation_event::Kind as EventKind;
use credvault::service::pb::vault_client::VaultClient;
use credvault::service::pb::{self, CredentialKind};
use credvault::store::records::{self, TenantRecord};
use credvault::store::{SledStore, Store, StoreOptions, layout};
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use support::{
    Acked, Pki, ServerOptions, ServerProcess, TestServer, assert_all_unseal, expect_status, reason,
    role_identity, seal_all, seal_request, secret_bytes, unseal_request, unseal_version,
    write_server_files,
};

type Client = VaultClient<Channel>;

/// How long anything may take to happen: a hang guard, not a measurement.
const HANG_GUARD: Duration = Duration::from_secs(60);
const DAY_MS: u64 = 24 * 60 * 60 * 1000;
/// The background task's round: the shredder runs at least this often.
const CHECK_INTERVAL: &str = "check_interval = \"1s\"";
const CHECK_INTERVAL_MS: u64 = 1000;

// ---------------------------------------------------------------------------
// Helpers

/// `count` credentials `cred/NNN` of `tenant`, with bytes of their own.
fn items(tenant: &str, count: usize, seed: u64) -> Vec<(String, String, Vec<u8>)> {
    (0..count)
        .map(|n| {
            (
                tenant.to_owned(),
                format!("cred/{n:03}"),
                secret_bytes(seed + n as u64, 24 + (n * 37) % 700),
            )
        })
        .collect()
}

/// Unseal and Seal of a deleted tenant fail with TENANT_DELETED, for an
/// existing credential (latest and by version) and an unknown one.
async fn assert_tenant_denied(executor: &mut Client, settings: &mut Client, acked: &[Acked]) {
    let a = acked.first().expect("a credential of the tenant");
    expect_status(
        executor
            .unseal(unseal_request(&a.tenant, &a.credential))
            .await,
        Code::FailedPrecondition,
        "TENANT_DELETED",
    );
    expect_status(
        executor
            .unseal(unseal_version(&a.tenant, &a.credential, a.version))
            .await,
        Code::FailedPrecondition,
        "TENANT_DELETED",
    );
    expect_status(
        executor
            .unseal(unseal_request(&a.tenant, "never/sealed"))
            .await,
        Code::FailedPrecondition,
        "TENANT_DELETED",
    );
    expect_status(
        settings
            .seal(seal_request(
                &a.tenant,
                &a.credential,
                CredentialKind::ApiKey,
                b"a new version",
            ))
            .await,
        Code::FailedPrecondition,
        "TENANT_DELETED",
    );
    expect_status(
        settings
            .seal(seal_request(
                &a.tenant,
                "brand/new",
                CredentialKind::ApiKey,
                b"a new credential",
            ))
            .await,
        Code::FailedPrecondition,
        "TENANT_DELETED",
    );
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

async fn revoke(settings: &mut Client, tenant: &str, credential: &str) -> pb::Revocation {
    settings
        .revoke(pb::RevokeRequest {
            tenant_id: tenant.to_owned(),
            credential_id: credential.to_owned(),
            reason: "lifecycle test".to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("Revoke {tenant}/{credential}: {s:?}"))
        .into_inner()
        .revocation
        .expect("revocation")
}

fn delete_request(tenant: &str, grace_seconds: Option<u64>) -> pb::DeleteTenantRequest {
    pb::DeleteTenantRequest {
        tenant_id: tenant.to_owned(),
        grace_seconds,
    }
}

async fn delete(
    settings: &mut Client,
    tenant: &str,
    grace_seconds: Option<u64>,
) -> pb::DeleteTenantResponse {
    settings
        .delete_tenant(delete_request(tenant, grace_seconds))
        .await
        .unwrap_or_else(|s| panic!("DeleteTenant {tenant} (grace {grace_seconds:?}): {s:?}"))
        .into_inner()
}

async fn restore(settings: &mut Client, tenant: &str) {
    settings
        .restore_tenant(pb::RestoreTenantRequest {
            tenant_id: tenant.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("RestoreTenant {tenant}: {s:?}"));
}

fn hold_request(tenant: &str, hold: bool, reason: &str) -> pb::SetLegalHoldRequest {
    pb::SetLegalHoldRequest {
        tenant_id: tenant.to_owned(),
        hold,
        reason: reason.to_owned(),
    }
}

async fn set_hold(settings: &mut Client, tenant: &str, hold: bool, reason: &str) {
    settings
        .set_legal_hold(hold_request(tenant, hold, reason))
        .await
        .unwrap_or_else(|s| panic!("SetLegalHold {tenant} {hold}: {s:?}"));
}

async fn tenant_status(client: &mut Client, tenant: &str) -> pb::TenantStatus {
    client
        .get_tenant_status(pb::GetTenantStatusRequest {
            tenant_id: tenant.to_owned(),
        })
        .await
        .unwrap_or_else(|s| panic!("GetTenantStatus {tenant}: {s:?}"))
        .into_inner()
}

/// Polls a deleted tenant's status until it is shredded (passing only through
/// "deleted" and "shredding"); returns the final status.
async fn wait_shredded(client: &mut Client, tenant: &str) -> pb::TenantStatus {
    let deadline = Instant::now() + HANG_GUARD;
    loop {
        let status = tenant_status(client, tenant).await;
        assert_eq!(status.tenant_id, tenant, "{status:?}");
        match status.state.as_str() {
            "shredded" => return status,
            "deleted" | "shredding" => {}
            other => panic!("{tenant}: unexpected state {other:?} while shredding: {status:?}"),
        }
        assert!(
            Instant::now() < deadline,
            "{tenant} was not shredded within {HANG_GUARD:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The receipt of a shredded tenant, checked against what was sealed.
#[track_caller]
fn assert_receipt(status: &pb::TenantStatus, deleted: &pb::TenantStatus, acked: &[Acked]) {
    let receipt = status
        .receipt
        .as_ref()
        .unwrap_or_else(|| panic!("a shredded tenant has a receipt: {status:?}"));
    let credentials: std::collections::BTreeSet<_> =
        acked.iter().map(|a| a.credential.as_str()).collect();
    assert_eq!(
        (receipt.purged_credentials, receipt.purged_versions),
        (credentials.len() as u64, acked.len() as u64),
        "every credential and version purged, each counted once: {receipt:?}"
    );
    assert_eq!(
        receipt.destroyed_dek_versions,
        [1],
        "the tenant's one DEK: {receipt:?}"
    );
    assert_eq!(
        receipt.requested_at_ms, deleted.deleted_at_ms,
        "{receipt:?}"
    );
    assert_eq!(receipt.requested_by, deleted.deleted_by, "{receipt:?}");
    assert!(
        receipt.requested_at_ms > 0
            && receipt.keys_destroyed_at_ms >= receipt.requested_at_ms
            && receipt.shredded_at_ms >= receipt.keys_destroyed_at_ms,
        "requested, then keys destroyed, then shredded: {receipt:?}"
    );
    assert!(!status.legal_hold, "{status:?}");
}

/// A `WatchRevocations` stream that checks what the contract promises of
/// every message: it opens with a KEEPALIVE carrying its position; events come
/// in sequence order (unfiltered: each the next one, no gaps); a KEEPALIVE
/// never goes back.
struct Watch {
    stream: Streaming<pb::RevocationEvent>,
    /// The last sequence received (event or keepalive).
    position: u64,
    /// Whether a tenant filter is set (gaps are then expected).
    filtered: bool,
    what: String,
}

impl Watch {
    /// Opens `WatchRevocations` (after `after`, 0 = from now; `tenant` "" =
    /// every tenant) and reads its opening KEEPALIVE.
    async fn open(client: &mut Client, after: u64, tenant: &str) -> Watch {
        let what = format!("watch after {after} {tenant:?}");
        let stream = client
            .watch_revocations(pb::WatchRevocationsRequest {
                after_sequence: after,
                tenant_id: tenant.to_owned(),
            })
            .await
            .unwrap_or_else(|s| panic!("{what}: {s:?}"))
            .into_inner();
        let mut watch = Watch {
            stream,
            position: after,
            filtered: !tenant.is_empty(),
            what,
        };
        let first = watch.message().await;
        assert_eq!(
            (
                first.kind(),
                first.tenant_id.as_str(),
                first.credential_id.as_str()
            ),
            (EventKind::Keepalive, "", ""),
            "{}: the stream opens with a KEEPALIVE: {first:?}",
            watch.what
        );
        if after > 0 {
            assert_eq!(first.sequence, after, "{}: {first:?}", watch.what);
        }
        watch.position = first.sequence;
        watch
    }

    /// The next message, whatever it is; panics if the stream fails, ends or
    /// stays silent for [`HANG_GUARD`].
    async fn message(&mut self) -> pb::RevocationEvent {
        tokio::time::timeout(HANG_GUARD, self.stream.message())
            .await
            .unwrap_or_else(|_| panic!("{}: nothing within {HANG_GUARD:?}", self.what))
            .unwrap_or_else(|s| panic!("{}: the stream failed: {s:?}", self.what))
            .unwrap_or_else(|| panic!("{}: the stream ended", self.what))
    }

    /// The next message, checked against the stream's position.
    async fn checked(&mut self) -> pb::RevocationEvent {
        let message = self.message().await;
        if message.kind() == EventKind::Keepalive {
            assert!(
                message.sequence >= self.position,
                "{}: a KEEPALIVE went back from {}: {message:?}",
                self.what,
                self.position
            );
            assert!(
                self.filtered || message.sequence == self.position,
                "{}: an unfiltered KEEPALIVE skipped events after {}: {message:?}",
                self.what,
                self.position
            );
        } else if self.filtered {
            assert!(
                message.sequence > self.position,
                "{}: an event at or before {}: {message:?}",
                self.what,
                self.position
            );
        } else {
            assert_eq!(
                message.sequence,
                self.position + 1,
                "{}: events without gaps or repeats: {message:?}",
                self.what
            );
        }
        self.position = message.sequence;
        message
    }

    /// The next event that is not a keepalive.
    async fn next_event(&mut self) -> pb::RevocationEvent {
        loop {
            let message = self.checked().await;
            if message.kind() != EventKind::Keepalive {
                return message;
            }
        }
    }

    /// Reads `want.len()` events, which must be `want`, in order, with exactly
    /// these sequence numbers.
    async fn expect(&mut self, want: &[(u64, Expected)]) {
        for (sequence, (tenant, credential, kind)) in want {
            let event = self.next_event().await;
            assert_eq!(
                (
                    event.sequence,
                    event.tenant_id.as_str(),
                    event.credential_id.as_str(),
                    event.kind()
                ),
                (*sequence, tenant.as_str(), credential.as_str(), *kind),
                "{}: events in order, each once: {event:?}",
                self.what
            );
            assert!(event.at_ms > 0, "{}: {event:?}", self.what);
        }
    }

    /// Waits for the end of the stream (after the server's shutdown): it must
    /// end with OK and send no further event.
    async fn expect_end(&mut self) {
        let what = self.what.clone();
        let end = tokio::time::timeout(HANG_GUARD, async {
            loop {
                match self.stream.message().await {
                    Ok(Some(event)) if event.kind() == EventKind::Keepalive => continue,
                    other => return other,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: the stream did not end at shutdown"));
        assert!(
            matches!(end, Ok(None)),
            "{what}: the stream ends with OK at shutdown: {end:?}"
        );
    }
}

/// An event as the test expects it: (tenant, credential, kind).
type Expected = (String, String, EventKind);

fn expected(tenant: &str, credential: &str, kind: EventKind) -> Expected {
    (tenant.to_owned(), credential.to_owned(), kind)
}

/// Expected events numbered from 1 (a fresh server's log), optionally only
/// `tenant`'s and only after `after`.
fn numbered(log: &[Expected], after: u64, tenant: Option<&str>) -> Vec<(u64, Expected)> {
    log.iter()
        .enumerate()
        .map(|(i, e)| (i as u64 + 1, e.clone()))
        .filter(|(s, e)| *s > after && tenant.is_none_or(|t| e.0 == t))
        .collect()
}

// ---------------------------------------------------------------------------
// 1. Revocation has no window

/// What one Unseal returned.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Secret,
    Revoked,
    Other(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn once_revoke_returns_no_unseal_succeeds_and_a_watcher_receives_the_event() {
    const LOOPS: usize = 32;
    const CONNECTIONS: usize = 4;
    /// Unseals each loop makes that start after Revoke returned.
    const AFTER_REVOKE: usize = 8;
    const TENANT: &str = "acme";
    const TARGET: &str = "gmail/alice";

    let server = TestServer::start().await;
    let pki = &server.pki;
    let mut settings = server.vault(&pki.role("settings")).await;
    let secret = secret_bytes(42, 1500);
    let neighbour = seal_all(
        &settings,
        vec![(TENANT.into(), "gmail/bob".into(), secret_bytes(43, 99))],
        1,
        |_| CredentialKind::CookieJar,
    )
    .await;
    let target = seal_all(
        &settings,
        vec![(TENANT.into(), TARGET.into(), secret.clone())],
        1,
        |_| CredentialKind::CookieJar,
    )
    .await;

    // The watcher, from now, connected before anything is revoked.
    let mut watcher_client = server.vault(&pki.role("executor")).await;
    let mut events = Watch::open(&mut watcher_client, 0, "").await;
    assert_eq!(events.position, 0, "no event yet");

    let executor = pki.role("executor");
    let mut connections = Vec::new();
    for _ in 0..CONNECTIONS {
        connections.push(server.vault(&executor).await);
    }
    let revoked_at: Arc<OnceLock<Instant>> = Arc::new(OnceLock::new());
    let unsealed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..LOOPS)
        .map(|n| {
            let mut client = connections[n % CONNECTIONS].clone();
            let (revoked_at, unsealed, stop) = (revoked_at.clone(), unsealed.clone(), stop.clone());
            let secret = secret.clone();
            tokio::spawn(async move {
                let mut calls: Vec<(Instant, Outcome)> = Vec::new();
                let mut after = 0;
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let outcome = match client.unseal(unseal_request(TENANT, TARGET)).await {
                        Ok(response) if response.get_ref().secret == secret => {
                            unsealed.fetch_add(1, Ordering::Relaxed);
                            Outcome::Secret
                        }
                        Ok(_) => Outcome::Other("OK with the wrong bytes".into()),
                        Err(status)
                            if status.code() == Code::FailedPrecondition
                                && reason(&status).as_deref() == Some("REVOKED") =>
                        {
                            Outcome::Revoked
                        }
                        Err(status) => Outcome::Other(format!("{status:?}")),
                    };
                    calls.push((start, outcome));
                    if revoked_at.get().is_some_and(|at| start > *at) {
                        after += 1;
                        if after >= AFTER_REVOKE {
                            break;
                        }
                    }
                }
                calls
            })
        })
        .collect();

    // Revoke while every loop is unsealing.
    let deadline = Instant::now() + HANG_GUARD;
    while unsealed.load(Ordering::Relaxed) < 4 * LOOPS as u64 {
        assert!(
            Instant::now() < deadline,
            "the Unseal loops make no progress"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let revocation = revoke(&mut settings, TENANT, TARGET).await;
    revoked_at
        .set(Instant::now())
        .expect("the revoke instant is set once");
    let returned = *revoked_at.get().expect("set");

    let mut calls = Vec::new();
    for task in loops {
        match tokio::time::timeout(HANG_GUARD, task).await {
            Ok(result) => calls.push(result.expect("an Unseal loop panicked")),
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                panic!("the Unseal loops did not finish within {HANG_GUARD:?}");
            }
        }
    }
    let all: Vec<_> = calls.iter().flatten().collect();
    let others: Vec<_> = all
        .iter()
        .filter_map(|(_, o)| match o {
            Outcome::Other(what) => Some(what),
            _ => None,
        })
        .collect();
    assert!(
        others.is_empty(),
        "every Unseal either opened the secret or said REVOKED: {} did not, e.g. {:?}",
        others.len(),
        &others[..others.len().min(5)]
    );
    let after: Vec<_> = all.iter().filter(|(start, _)| *start > returned).collect();
    let succeeded_after = after.iter().filter(|(_, o)| *o == Outcome::Secret).count();
    assert_eq!(
        succeeded_after,
        0,
        "{succeeded_after} of {} Unseals started after Revoke returned still opened the secret",
        after.len()
    );
    assert!(after.len() >= LOOPS * AFTER_REVOKE, "{}", after.len());
    let before = all.len() - after.len();
    eprintln!(
        "{} Unseals: {before} started before Revoke returned ({} opened the secret), {} after (all REVOKED)",
        all.len(),
        unsealed.load(Ordering::Relaxed),
        after.len()
    );
    // Each loop's outcomes: secrets, then REVOKED, never a secret after a REVOKED.
    for loop_calls in &calls {
        if let Some(first) = loop_calls.iter().position(|(_, o)| *o == Outcome::Revoked) {
            assert!(
                loop_calls[first..]
                    .iter()
                    .all(|(_, o)| *o == Outcome::Revoked),
                "an Unseal opened the secret after another had said REVOKED"
            );
        }
    }

    // The watcher gets the event.
    let event = events.next_event().await;
    assert_eq!(
        (
            event.tenant_id.as_str(),
            event.credential_id.as_str(),
            event.kind()
        ),
        (TENANT, TARGET, EventKind::CredentialRevoked),
        "{event:?}"
    );
    assert_eq!(
        event.sequence, 1,
        "the first event of a fresh log: {event:?}"
    );
    assert!(event.at_ms > 0, "{event:?}");
    assert!(revocation.revoked_at_ms > 0, "{revocation:?}");

    // Revoked means revoked for every version; the tenant's other credential is untouched.
    let mut executor = connections[0].clone();
    expect_status(
        executor
            .unseal(unseal_version(TENANT, TARGET, target[0].version))
            .await,
        Code::FailedPrecondition,
        "REVOKED",
    );
    assert_all_unseal(&executor, &neighbour).await;
}

// ---------------------------------------------------------------------------
// 2. A watcher that reconnects misses nothing; a tenant filter

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_reconnecting_from_its_last_sequence_misses_nothing_and_sees_nothing_twice() {
    let mut server = TestServer::start().await;
    let pki = &server.pki;
    let mut settings = server.vault(&pki.role("settings")).await;
    let mut seed = items("a", 8, 100);
    seed.extend(items("b", 8, 200));
    seed.extend(items("c", 2, 300));
    seed.extend(items("d", 2, 400));
    seal_all(&settings, seed, 8, |_| CredentialKind::CookieJar).await;

    let executor = pki.role("executor");
    // Each watcher on its own connection, all opened before the first event.
    let mut all_client = server.vault(&executor).await;
    let mut all = Watch::open(&mut all_client, 0, "").await;
    let mut only_a_client = server.vault(&executor).await;
    let mut only_a = Watch::open(&mut only_a_client, 0, "a").await;
    let mut only_b_client = server.vault(&executor).await;
    let mut only_b = Watch::open(&mut only_b_client, 0, "b").await;

    let mut log: Vec<Expected> = Vec::new();
    let r = EventKind::CredentialRevoked;

    // Events 1-4; the watcher reads three, then disconnects (stream and connection).
    for (t, c) in [("a", 0), ("b", 0), ("a", 1), ("b", 1)] {
        let credential = format!("cred/{c:03}");
        revoke(&mut settings, t, &credential).await;
        log.push(expected(t, &credential, r));
    }
    all.expect(&numbered(&log, 0, None)[..3]).await;
    let last_seen = all.position;
    assert_eq!(last_seen, 3);
    drop(all);
    drop(all_client);

    // While it is away: revocations, deletions, a restore, and repeats that
    // are no events (a revoked credential, a deleted tenant).
    revoke(&mut settings, "a", "cred/002").await;
    log.push(expected("a", "cred/002", r));
    delete(&mut settings, "c", None).await;
    log.push(expected("c", "", EventKind::TenantDisabled));
    revoke(&mut settings, "a", "cred/002").await; // again: no event
    delete(&mut settings, "c", Some(0)).await; // again: no event
    revoke(&mut settings, "b", "cred/002").await;
    log.push(expected("b", "cred/002", r));
    restore(&mut settings, "c").await;
    log.push(expected("c", "", EventKind::TenantRestored));
    delete(&mut settings, "d", None).await;
    log.push(expected("d", "", EventKind::TenantDisabled));
    revoke(&mut settings, "a", "cred/003").await;
    log.push(expected("a", "cred/003", r));

    // Reconnected from its last sequence: every missed event, in order, once.
    let mut all_client = server.vault(&executor).await;
    let mut all = Watch::open(&mut all_client, last_seen, "").await;
    all.expect(&numbered(&log, last_seen, None)).await;
    // A tenant-filtered watcher reconnecting from the same point.
    let mut a_again_client = server.vault(&executor).await;
    let mut a_again = Watch::open(&mut a_again_client, last_seen, "a").await;
    a_again.expect(&numbered(&log, last_seen, Some("a"))).await;

    // Then the new ones, live, on every stream.
    let missed = log.len();
    for (t, c) in [("b", 3), ("a", 4), ("c", 0)] {
        let credential = format!("cred/{c:03}");
        revoke(&mut settings, t, &credential).await;
        log.push(expected(t, &credential, r));
    }
    delete(&mut settings, "a", None).await;
    log.push(expected("a", "", EventKind::TenantDisabled));
    all.expect(&numbered(&log, missed as u64, None)).await;
    a_again
        .expect(&numbered(&log, missed as u64, Some("a")))
        .await;

    // The filtered watchers that never disconnected saw exactly their tenant's.
    only_a.expect(&numbered(&log, 0, Some("a"))).await;
    only_b.expect(&numbered(&log, 0, Some("b"))).await;

    // Nothing was delivered twice or out of turn: the next event on each
    // stream is the next one committed.
    restore(&mut settings, "a").await;
    log.push(expected("a", "", EventKind::TenantRestored));
    revoke(&mut settings, "b", "cred/004").await;
    log.push(expected("b", "cred/004", r));
    let n = log.len() as u64;
    all.expect(&numbered(&log, n - 2, None)).await;
    a_again.expect(&numbered(&log, n - 2, Some("a"))).await;
    only_a.expect(&numbered(&log, n - 2, Some("a"))).await;
    only_b.expect(&numbered(&log, n - 2, Some("b"))).await;

    // A watcher from now sees only what comes next.
    let mut from_now = Watch::open(&mut all_client, 0, "").await;
    assert_eq!(
        from_now.position,
        log.len() as u64,
        "from now: the newest event's sequence"
    );
    revoke(&mut settings, "b", "cred/005").await;
    log.push(expected("b", "cred/005", r));
    let n = log.len() as u64;
    from_now.expect(&numbered(&log, n - 1, None)).await;
    all.expect(&numbered(&log, n - 1, None)).await;
    only_b.expect(&numbered(&log, n - 1, Some("b"))).await;

    // Watch streams end when the server shuts down (they do not hold it up).
    tokio::time::timeout(HANG_GUARD, server.stop())
        .await
        .expect("the server stops with watchers connected")
        .unwrap_or_else(|e| panic!("stop: {e:#}"));
    for watch in [
        &mut all,
        &mut a_again,
        &mut only_a,
        &mut only_b,
        &mut from_now,
    ] {
        watch.expect_end().await;
    }
}

/// `lifecycle.watch_keepalive` of the keepalive test, in seconds.
const KEEPALIVE_S: u64 = 1;
/// How long a filtered watcher may go without a KEEPALIVE while other tenants'
/// events keep coming: many keepalive intervals (a hang guard).
const BUSY_GUARD: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalives_carry_the_position_and_a_pruned_sequence_says_resync() {
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default()
            .rotation(CHECK_INTERVAL)
            .lifecycle(format!("watch_keepalive = \"{KEEPALIVE_S}s\""))
            .lifecycle("event_retention = \"1s\""),
    )
    .await;
    let pki = &server.pki;
    let mut settings = server.vault(&pki.role("settings")).await;
    let mut seed = items("a", 4, 100);
    seed.extend(items("b", 2, 200));
    seal_all(&settings, seed, 4, |_| CredentialKind::CookieJar).await;
    let mut executor = server.vault(&pki.role("executor")).await;

    // A watcher of tenant b while only a's credentials are revoked: it gets
    // no event, but a KEEPALIVE that carries the log's position past them.
    let mut idle = Watch::open(&mut executor, 0, "b").await;
    assert_eq!(idle.position, 0);
    for c in 0..3 {
        revoke(&mut settings, "a", &format!("cred/{c:03}")).await;
    }
    while idle.position < 3 {
        let message = idle.checked().await;
        assert_eq!(
            message.kind(),
            EventKind::Keepalive,
            "tenant b's watcher sees none of a's events: {message:?}"
        );
        assert!(message.at_ms > 0, "{message:?}");
    }
    assert_eq!(idle.position, 3, "the keepalive never passes the log's end");
    // Reconnecting from a keepalive's position misses nothing.
    let position = idle.position;
    drop(idle);
    let mut resumed = Watch::open(&mut executor, position, "b").await;
    revoke(&mut settings, "b", "cred/000").await;
    resumed
        .expect(&[(4, expected("b", "cred/000", EventKind::CredentialRevoked))])
        .await;
    let mut newest = 4;

    // A watcher of b while the log is busy with a's events (more often than
    // the keepalive interval): it is sent none of them, so it still gets a
    // KEEPALIVE, carrying its position past them.
    let mut busy = Watch::open(&mut executor, 0, "b").await;
    let opened_at = busy.position;
    let guard = Instant::now() + BUSY_GUARD;
    let mut deleted = false;
    let keepalive = loop {
        tokio::select! {
            message = busy.checked() => {
                assert_eq!(message.kind(), EventKind::Keepalive, "{message:?}");
                if message.sequence > opened_at {
                    break message;
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                assert!(
                    Instant::now() < guard,
                    "no KEEPALIVE within {BUSY_GUARD:?} for a filtered watcher while \
                     other tenants' events kept coming (the keepalive is {KEEPALIVE_S}s)"
                );
                if deleted {
                    restore(&mut settings, "a").await;
                } else {
                    delete(&mut settings, "a", None).await;
                }
                deleted = !deleted;
                newest += 1;
            }
        }
    };
    assert!(
        keepalive.tenant_id.is_empty() && keepalive.sequence <= newest,
        "{keepalive:?}"
    );
    if deleted {
        restore(&mut settings, "a").await;
        newest += 1;
    }
    drop(busy);

    // Past the retention, the background task prunes all but the newest
    // event: asking for what came after an old sequence is a clear resync.
    let deadline = Instant::now() + HANG_GUARD;
    let pruned = loop {
        let result = executor
            .watch_revocations(pb::WatchRevocationsRequest {
                after_sequence: 1,
                tenant_id: String::new(),
            })
            .await;
        match result {
            Err(status) => break status,
            Ok(stream) => drop(stream),
        }
        assert!(
            Instant::now() < deadline,
            "events older than the retention were not pruned within {HANG_GUARD:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(pruned.code(), Code::OutOfRange, "{pruned:?}");
    assert_eq!(
        reason(&pruned).as_deref(),
        Some("EVENTS_PRUNED"),
        "{pruned:?}"
    );
    // The resync: watch from now, which is where the log ends.
    let mut fresh = Watch::open(&mut executor, 0, "").await;
    assert_eq!(
        fresh.position, newest,
        "numbering carries on from the newest event"
    );
    revoke(&mut settings, "b", "cred/001").await;
    let event = [(
        newest + 1,
        expected("b", "cred/001", EventKind::CredentialRevoked),
    )];
    fresh.expect(&event).await;
    resumed.expect(&event).await;
}

// ---------------------------------------------------------------------------
// 3. Tenant deletion, restore, the shred, legal hold

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tenant_denies_at_once_restore_brings_it_back_and_grace_zero_shreds_it() {
    const DOOMED: &str = "doomed";
    const BYSTANDER: &str = "bystander";
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default().rotation(CHECK_INTERVAL),
    )
    .await;
    let pki = &server.pki;
    let mut settings = server.vault(&pki.role("settings")).await;
    let mut executor = server.vault(&pki.role("executor")).await;
    let mut doomed = seal_all(&settings, items(DOOMED, 6, 1000), 4, |_| {
        CredentialKind::CookieJar
    })
    .await;
    // Second versions of two credentials.
    let mut again = items(DOOMED, 2, 2000);
    again.iter_mut().for_each(|i| i.2.push(0xff));
    doomed.extend(seal_all(&settings, again, 2, |_| CredentialKind::CookieJar).await);
    let bystander = seal_all(&settings, items(BYSTANDER, 4, 3000), 4, |_| {
        CredentialKind::CookieJar
    })
    .await;
    let mut watcher_client = server.vault(&pki.role("executor")).await;
    let mut events = Watch::open(&mut watcher_client, 0, "").await;

    // An executor may not delete a tenant.
    expect_status(
        executor
            .delete_tenant(delete_request(DOOMED, Some(0)))
            .await,
        Code::PermissionDenied,
        "PERMISSION_DENIED",
    );
    assert_eq!(tenant_status(&mut settings, DOOMED).await.state, "active");
    // A tenant this vault never held.
    expect_status(
        settings
            .get_tenant_status(pb::GetTenantStatusRequest {
                tenant_id: "nobody".into(),
            })
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );
    expect_status(
        settings
            .delete_tenant(delete_request("nobody", Some(0)))
            .await,
        Code::NotFound,
        "NOT_FOUND",
    );

    // Deleted (default grace): denied from the moment DeleteTenant returns.
    let response = delete(&mut settings, DOOMED, None).await;
    assert_tenant_denied(&mut executor, &mut settings, &doomed).await;
    let status = tenant_status(&mut settings, DOOMED).await;
    assert_eq!(
        (status.tenant_id.as_str(), status.state.as_str()),
        (DOOMED, "deleted"),
        "{status:?}"
    );
    assert_eq!(status.deleted_by, role_identity("settings"), "{status:?}");
    assert!(status.deleted_at_ms > 0, "{status:?}");
    assert_eq!(
        status.shred_after_ms,
        status.deleted_at_ms + 7 * DAY_MS,
        "the default grace is 7 days: {status:?}"
    );
    assert_eq!(
        response.shred_after_ms, status.shred_after_ms,
        "{response:?}"
    );
    assert!(!status.legal_hold && status.receipt.is_none(), "{status:?}");
    let first = events.next_event().await;
    assert_eq!(
        (
            first.tenant_id.as_str(),
            first.credential_id.as_str(),
            first.kind()
        ),
        (DOOMED, "", EventKind::TenantDisabled),
        "{first:?}"
    );
    // Deleting again changes nothing, not even the grace period.
    let again = delete(&mut settings, DOOMED, Some(0)).await;
    assert_eq!(again.shred_after_ms, status.shred_after_ms, "{again:?}");
    // Out of range grace periods are refused.
    expect_status(
        settings
            .delete_tenant(delete_request(BYSTANDER, Some(31 * 24 * 3600)))
            .await,
        Code::InvalidArgument,
        "INVALID_GRACE",
    );
    // The other tenant is untouched: it unseals, seals, and is active.
    assert_all_unseal(&executor, &bystander).await;
    let mut bystander = bystander;
    bystander.extend(
        seal_all(
            &settings,
            vec![(BYSTANDER.into(), "while/deleted".into(), b"b".to_vec())],
            1,
            |_| CredentialKind::CookieJar,
        )
        .await,
    );
    assert_eq!(
        tenant_status(&mut settings, BYSTANDER).await.state,
        "active"
    );
    // A background round or two change nothing within the grace period.
    wait_rounds(2).await;
    assert_eq!(tenant_status(&mut settings, DOOMED).await.state, "deleted");

    // Restored: everything is back, to its exact bytes, every version.
    restore(&mut settings, DOOMED).await;
    let status = tenant_status(&mut settings, DOOMED).await;
    assert_eq!(status.state, "active", "{status:?}");
    assert_all_unseal(&executor, &doomed).await;
    doomed.extend(
        seal_all(
            &settings,
            vec![(DOOMED.into(), "after/restore".into(), b"new".to_vec())],
            1,
            |_| CredentialKind::CookieJar,
        )
        .await,
    );
    expect_status(
        settings
            .restore_tenant(pb::RestoreTenantRequest {
                tenant_id: DOOMED.into(),
            })
            .await,
        Code::FailedPrecondition,
        "TENANT_NOT_DELETED",
    );
    let restored = events.next_event().await;
    assert_eq!(
        (restored.tenant_id.as_str(), restored.kind()),
        (DOOMED, EventKind::TenantRestored),
        "{restored:?}"
    );
    assert_eq!(restored.sequence, first.sequence + 1, "{restored:?}");

    // Deleted with a grace of 0: the background task shreds it.
    let response = delete(&mut settings, DOOMED, Some(0)).await;
    let deleted = tenant_status(&mut settings, DOOMED).await;
    assert_ne!(deleted.state, "active", "{deleted:?}");
    if deleted.state == "deleted" {
        assert_eq!(deleted.shred_after_ms, deleted.deleted_at_ms, "{deleted:?}");
        assert_eq!(response.shred_after_ms, deleted.shred_after_ms);
    }
    assert_tenant_denied(&mut executor, &mut settings, &doomed).await;
    let shredded = wait_shredded(&mut settings, DOOMED).await;
    let deleted = if deleted.state == "shredded" {
        shredded.clone()
    } else {
        deleted
    };
    assert_receipt(&shredded, &deleted, &doomed);
    let receipt = shredded.receipt.as_ref().expect("receipt");
    assert_eq!(receipt.requested_by, role_identity("settings"));
    // Due at once: the deletion time, which the receipt keeps.
    assert_eq!(
        receipt.requested_at_ms, response.shred_after_ms,
        "{receipt:?}"
    );
    // Gone for good: no unseal, no seal, no restore, no hold.
    assert_tenant_denied(&mut executor, &mut settings, &doomed).await;
    expect_status(
        settings
            .restore_tenant(pb::RestoreTenantRequest {
                tenant_id: DOOMED.into(),
            })
            .await,
        Code::FailedPrecondition,
        "TENANT_SHREDDED",
    );
    expect_status(
        settings
            .set_legal_hold(hold_request(DOOMED, true, "too late"))
            .await,
        Code::FailedPrecondition,
        "TENANT_SHREDDED",
    );
    events
        .expect(&[
            (
                restored.sequence + 1,
                expected(DOOMED, "", EventKind::TenantDisabled),
            ),
            (
                restored.sequence + 2,
                expected(DOOMED, "", EventKind::TenantShredded),
            ),
        ])
        .await;
    // The receipt stays.
    assert_eq!(
        tenant_status(&mut settings, DOOMED).await.receipt,
        shredded.receipt
    );
    // The other tenant never noticed.
    assert_all_unseal(&executor, &bystander).await;
    assert_eq!(
        tenant_status(&mut settings, BYSTANDER).await.state,
        "active"
    );
}

/// Lets `n` rounds of the background task pass (a check interval each, plus
/// slack): only ever used to show that something does NOT happen.
async fn wait_rounds(n: u64) {
    tokio::time::sleep(Duration::from_millis(n * CHECK_INTERVAL_MS + 300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legal_hold_set_before_or_after_deletion_blocks_the_shred_until_released() {
    const BEFORE: &str = "held-before";
    const AFTER: &str = "held-after";
    const CONTROL: &str = "control";
    const BYSTANDER: &str = "bystander";
    /// The grace of the tenant held after its deletion: the hold must land
    /// before the shred could start, so it is not 0.
    const AFTER_GRACE_S: u64 = 3;
    let server = TestServer::start_with(
        Pki::new(),
        ServerOptions::default().rotation(CHECK_INTERVAL),
    )
    .await;
    let pki = &server.pki;
    let mut settings = server.vault(&pki.role("settings")).await;
    let mut executor = server.vault(&pki.role("executor")).await;
    let mut sealed: BTreeMap<&str, Vec<Acked>> = BTreeMap::new();
    for (n, tenant) in [BEFORE, AFTER, CONTROL, BYSTANDER].into_iter().enumerate() {
        let acked = seal_all(
            &settings,
            items(tenant, 3 + n, 10_000 * n as u64),
            4,
            |_| CredentialKind::CookieJar,
        )
        .await;
        sealed.insert(tenant, acked);
    }

    // Held while active, then deleted with a grace of 0.
    set_hold(&mut settings, BEFORE, true, "case 42").await;
    let status = tenant_status(&mut settings, BEFORE).await;
    assert_eq!(
        (
            status.state.as_str(),
            status.legal_hold,
            status.legal_hold_reason.as_str()
        ),
        ("active", true, "case 42"),
        "{status:?}"
    );
    assert_all_unseal(&executor, &sealed[BEFORE]).await;
    delete(&mut settings, BEFORE, Some(0)).await;
    // Deleted, then held before its (short) grace period is over.
    let response = delete(&mut settings, AFTER, Some(AFTER_GRACE_S)).await;
    set_hold(&mut settings, AFTER, true, "case 43").await;
    let after_due = response.shred_after_ms;
    assert!(after_due > 0, "{response:?}");

    let check_held = |status: &pb::TenantStatus, reason: &str| {
        assert_eq!(
            (
                status.state.as_str(),
                status.legal_hold,
                status.legal_hold_reason.as_str()
            ),
            ("deleted", true, reason),
            "held: {status:?}"
        );
        assert!(status.receipt.is_none(), "{status:?}");
    };
    // Both are due (by the server's clock, which is this process's): wait,
    // watching them stay held.
    while now_ms() <= after_due + CHECK_INTERVAL_MS {
        check_held(&tenant_status(&mut settings, BEFORE).await, "case 42");
        check_held(&tenant_status(&mut settings, AFTER).await, "case 43");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // A tenant deleted now, without a hold, is shredded by a round that ran
    // while both held tenants were due: the hold is what stops them.
    let control = delete(&mut settings, CONTROL, Some(0)).await;
    assert_eq!(
        control.shred_after_ms,
        control.status.as_ref().map_or(0, |s| s.shred_after_ms),
        "{control:?}"
    );
    let control_deleted = tenant_status(&mut settings, CONTROL).await;
    let shredded = wait_shredded(&mut settings, CONTROL).await;
    assert_receipt(
        &shredded,
        if control_deleted.state == "shredded" {
            &shredded
        } else {
            &control_deleted
        },
        &sealed[CONTROL],
    );
    for _ in 0..4 {
        check_held(&tenant_status(&mut settings, BEFORE).await, "case 42");
        check_held(&tenant_status(&mut settings, AFTER).await, "case 43");
        tokio::time::sleep(Duration::from_millis(CHECK_INTERVAL_MS / 2)).await;
    }
    // Still disabled while held.
    assert_tenant_denied(&mut executor, &mut settings, &sealed[BEFORE]).await;
    assert_tenant_denied(&mut executor, &mut settings, &sealed[AFTER]).await;

    // Released: shredded.
    let before_deleted = tenant_status(&mut settings, BEFORE).await;
    let after_deleted = tenant_status(&mut settings, AFTER).await;
    set_hold(&mut settings, BEFORE, false, "").await;
    set_hold(&mut settings, AFTER, false, "").await;
    let before_shredded = wait_shredded(&mut settings, BEFORE).await;
    let after_shredded = wait_shredded(&mut settings, AFTER).await;
    assert_receipt(&before_shredded, &before_deleted, &sealed[BEFORE]);
    assert_receipt(&after_shredded, &after_deleted, &sealed[AFTER]);
    expect_status(
        settings
            .set_legal_hold(hold_request(BEFORE, true, "too late"))
            .await,
        Code::FailedPrecondition,
        "TENANT_SHREDDED",
    );

    // The bystander was never touched.
    assert_all_unseal(&executor, &sealed[BYSTANDER]).await;
    let status = tenant_status(&mut settings, BYSTANDER).await;
    assert_eq!(
        (status.state.as_str(), status.legal_hold),
        ("active", false)
    );
}

// ---------------------------------------------------------------------------
// 4. SIGKILL mid-shred

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shred_killed_with_sigkill_completes_after_restart_and_counts_every_record_once() {
    const TENANT: &str = "big";
    const BYSTANDER: &str = "bystander";
    const CREDENTIALS: usize = 600;
    /// Credentials with a second version.
    const TWICE: usize = 100;
    let pki = Pki::new();
    // Purge batches of 2 records: hundreds of batches to kill in the middle of.
    let options = ServerOptions::default()
        .rotation("batch_size = 2")
        .rotation(CHECK_INTERVAL);
    let (_, config_file) = write_server_files(&pki, &options, "127.0.0.1:0".parse().unwrap());
    let mut process = ServerProcess::start(&pki, &config_file, &[]).await;
    let mut settings = process.vault(&pki, &pki.role("settings")).await;
    let mut big = seal_all(&settings, items(TENANT, CREDENTIALS, 1), 16, |_| {
        CredentialKind::CookieJar
    })
    .await;
    let mut second = items(TENANT, TWICE, 50_000);
    second.iter_mut().for_each(|i| i.2.push(2));
    big.extend(seal_all(&settings, second, 16, |_| CredentialKind::CookieJar).await);
    let bystander = seal_all(&settings, items(BYSTANDER, 20, 90_000), 8, |_| {
        CredentialKind::CookieJar
    })
    .await;
    assert_eq!(big.len(), CREDENTIALS + TWICE);

    delete(&mut settings, TENANT, Some(0)).await;
    let deleted = tenant_status(&mut settings, TENANT).await;
    assert!(
        deleted.state == "deleted" || deleted.state == "shredding",
        "the shred finished before the status could be read (make the tenant bigger): {deleted:?}"
    );
    // Wait until the keys are destroyed and the purge is under way.
    let deadline = Instant::now() + HANG_GUARD;
    let mut executor = process.vault(&pki, &pki.role("executor")).await;
    loop {
        let status = tenant_status(&mut settings, TENANT).await;
        match status.state.as_str() {
            "shredding" => break,
            "deleted" => {}
            _ => panic!(
                "the shred finished before it could be interrupted (make the tenant bigger): {status:?}"
            ),
        }
        assert!(
            Instant::now() < deadline,
            "the shred did not start within {HANG_GUARD:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Mid-shred the tenant is still just "deleted" to its callers.
    expect_status(
        executor.unseal(unseal_request(TENANT, "cred/599")).await,
        Code::FailedPrecondition,
        "TENANT_DELETED",
    );
    let status = process.kill();
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status}");

    // What the kill left on disk: keys destroyed, the purge part-way, and its
    // running counts agreeing with what is left (each batch deletes records
    // and counts them in one atomic write).
    let data_dir = Config::load(&config_file).expect("config").data_dir;
    {
        let store = SledStore::open(&StoreOptions::new(&data_dir)).expect("open the store");
        let record: TenantRecord = records::decode(
            &store
                .get(&layout::tenant(TENANT))
                .expect("read")
                .expect("the kill came before the shred finished (make the tenant bigger)"),
        )
        .expect("tenant record");
        let heads = store
            .scan(&layout::head_prefix(TENANT), None, usize::MAX)
            .expect("scan")
            .len() as u64;
        let versions = store
            .scan(&layout::tenant_versions_prefix(TENANT), None, usize::MAX)
            .expect("scan")
            .len() as u64;
        eprintln!(
            "killed mid-shred: {} credentials and {} versions purged, {heads} and {versions} left",
            record.purged_credentials, record.purged_versions
        );
        assert!(record.keys_destroyed_at_ms > 0, "{record:?}");
        assert!(
            heads + versions > 0,
            "the purge was not finished at the kill"
        );
        assert_eq!(
            (
                record.purged_credentials + heads,
                record.purged_versions + versions
            ),
            (CREDENTIALS as u64, (CREDENTIALS + TWICE) as u64),
            "purged and left add up at the kill: {record:?}"
        );
    } // the store is closed (its lock released) before the restart

    let process = ServerProcess::start(&pki, &config_file, &[]).await;
    let mut settings = process.vault(&pki, &pki.role("settings")).await;
    let resumed = tenant_status(&mut settings, TENANT).await;
    eprintln!("after the restart: {resumed:?}");
    assert!(
        resumed.state == "shredding" || resumed.state == "shredded",
        "the keys stay destroyed across the kill: {resumed:?}"
    );
    let shredded = wait_shredded(&mut settings, TENANT).await;
    assert_receipt(&shredded, &deleted, &big);
    let receipt = shredded.receipt.as_ref().expect("receipt");
    assert_eq!(
        (receipt.purged_credentials, receipt.purged_versions),
        ((CREDENTIALS) as u64, (CREDENTIALS + TWICE) as u64)
    );

    // The other tenant still has everything, and carries on.
    let executor = process.vault(&pki, &pki.role("executor")).await;
    assert_all_unseal(&executor, &bystander).await;
    let mut bystander = bystander;
    bystander.extend(
        seal_all(
            &settings,
            vec![(BYSTANDER.into(), "after/restart".into(), b"x".to_vec())],
            1,
            |_| CredentialKind::CookieJar,
        )
        .await,
    );
    assert_all_unseal(&executor, &bystander).await;
    assert_eq!(
        tenant_status(&mut settings, BYSTANDER).await.state,
        "active"
    );
}
