//! The `Vault` service: thin handlers over [`crate::vault::Vault`].

use std::future::Future;
use std::pin::Pin;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::audit::{Success, who};
use super::convert::{self, kind_filter, kind_from_pb};
use super::{Shared, pb, tenant_error};
use crate::authz::Rpc;
use crate::clock::{Clock, SystemClock};
use crate::error::Error;
use crate::vault::{EventPage, SealRequest, Secret, validate};

/// Most characters of an Unseal's stated purpose.
const MAX_PURPOSE: usize = 256;

pub(crate) struct VaultService(pub Shared);

#[tonic::async_trait]
impl pb::vault_server::Vault for VaultService {
    async fn seal(
        &self,
        req: Request<pb::SealRequest>,
    ) -> Result<Response<pb::SealResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::Seal, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::Seal, &req);
        let r = req.into_inner();
        let request = SealRequest {
            kind: kind_from_pb(r.kind)?,
            secret: Secret::new(r.secret),
            labels: r.labels.into_iter().collect(),
            expires_at_ms: r.expires_at_ms,
            expected_version: r.expected_version,
            tenant: r.tenant_id,
            credential: r.credential_id,
        };
        let (tenant, credential) = (request.tenant.clone(), request.credential.clone());
        let result = self.0.vault.seal_as(request, Some(&who)).await;
        let result = self
            .0
            .audited(
                &who,
                &tenant,
                &credential,
                0,
                result,
                Success::AlreadyRecorded,
            )
            .await;
        log("Seal", &caller.identity, &tenant, &credential, &result);
        Ok(Response::new(pb::SealResponse {
            metadata: Some(convert::metadata(result?)),
        }))
    }

    async fn unseal(
        &self,
        req: Request<pb::UnsealRequest>,
    ) -> Result<Response<pb::UnsealResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::Unseal, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::Unseal, &req);
        let r = req.into_inner();
        let result = match validate::text("purpose", &r.purpose, MAX_PURPOSE) {
            Err(invalid) => Err(invalid.into()),
            Ok(()) => {
                self.0
                    .vault
                    .unseal_as(&r.tenant_id, &r.credential_id, r.version, Some(&who))
                    .await
            }
        };
        let result = self
            .0
            .audited(
                &who,
                &r.tenant_id,
                &r.credential_id,
                r.version.unwrap_or(0),
                result,
                Success::AlreadyRecorded,
            )
            .await;
        log(
            "Unseal",
            &caller.identity,
            &r.tenant_id,
            &r.credential_id,
            &result,
        );
        let unsealed = result?;
        Ok(Response::new(pb::UnsealResponse {
            secret: unsealed.secret.expose().to_vec(),
            metadata: Some(convert::metadata(unsealed.metadata)),
        }))
    }

    async fn get_metadata(
        &self,
        req: Request<pb::GetMetadataRequest>,
    ) -> Result<Response<pb::GetMetadataResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::GetMetadata, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::GetMetadata, &req);
        let r = req.into_inner();
        let result = self
            .0
            .vault
            .metadata(&r.tenant_id, &r.credential_id, r.version);
        let version = result
            .as_ref()
            .map_or(r.version.unwrap_or(0), |m| m.version);
        let result = self
            .0
            .audited(
                &who,
                &r.tenant_id,
                &r.credential_id,
                version,
                result,
                Success::ToRecord,
            )
            .await;
        log(
            "GetMetadata",
            &caller.identity,
            &r.tenant_id,
            &r.credential_id,
            &result,
        );
        Ok(Response::new(pb::GetMetadataResponse {
            metadata: Some(convert::metadata(result?)),
        }))
    }

    async fn list_credentials(
        &self,
        req: Request<pb::ListCredentialsRequest>,
    ) -> Result<Response<pb::ListCredentialsResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::ListCredentials, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::ListCredentials, &req);
        let r = req.into_inner();
        let token = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let result = kind_filter(r.kind).and_then(|kind| {
            self.0
                .vault
                .list(&r.tenant_id, kind, r.page_size as usize, token)
        });
        let result = self
            .0
            .audited(&who, &r.tenant_id, "", 0, result, Success::ToRecord)
            .await;
        log(
            "ListCredentials",
            &caller.identity,
            &r.tenant_id,
            "",
            &result,
        );
        let page = result?;
        Ok(Response::new(pb::ListCredentialsResponse {
            credentials: page
                .credentials
                .into_iter()
                .map(convert::metadata)
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn revoke(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::Revoke, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::Revoke, &req);
        let r = req.into_inner();
        let result = self
            .0
            .vault
            .revoke_as(
                &r.tenant_id,
                &r.credential_id,
                &caller.identity,
                &r.reason,
                Some(&who),
            )
            .await;
        let result = self
            .0
            .audited(
                &who,
                &r.tenant_id,
                &r.credential_id,
                0,
                result,
                Success::AlreadyRecorded,
            )
            .await;
        log(
            "Revoke",
            &caller.identity,
            &r.tenant_id,
            &r.credential_id,
            &result,
        );
        Ok(Response::new(pb::RevokeResponse {
            revocation: Some(convert::revocation(result?)),
        }))
    }

    type WatchRevocationsStream = ReceiverStream<Result<pb::RevocationEvent, Status>>;

    /// The stream semantics are documented with `WatchRevocationsRequest` in
    /// the proto file. Errors known at the start (denial, a bad tenant id,
    /// EVENTS_PRUNED) are the call's status; the rest is a task that follows
    /// the log into a bounded channel.
    async fn watch_revocations(
        &self,
        req: Request<pb::WatchRevocationsRequest>,
    ) -> Result<Response<Self::WatchRevocationsStream>, Status> {
        let r = req.get_ref();
        let tenant = (!r.tenant_id.is_empty()).then(|| r.tenant_id.clone());
        // A watch of every tenant names none: only grants without a tenant
        // list allow it, so a tenant-narrowed caller must name its tenant.
        let caller = self
            .0
            .authorise(&req, Rpc::WatchRevocations, tenant.as_deref())
            .await?;
        let after = r.after_sequence;
        let logged = tenant.clone().unwrap_or_default();
        let who = who(&caller.identity, Rpc::WatchRevocations, &req);
        let result = open_watch(&self.0, after, tenant);
        let result = self
            .0
            .audited(&who, &logged, "", 0, result, Success::ToRecord)
            .await;
        log("WatchRevocations", &caller.identity, &logged, "", &result);
        Ok(Response::new(result?))
    }

    async fn delete_tenant(
        &self,
        req: Request<pb::DeleteTenantRequest>,
    ) -> Result<Response<pb::DeleteTenantResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::DeleteTenant, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::DeleteTenant, &req);
        let r = req.into_inner();
        // Saturating: an absurd grace period is INVALID_GRACE, not a wrap.
        let grace_ms = r.grace_seconds.map(|s| s.saturating_mul(1000));
        let result = self
            .0
            .vault
            .delete_tenant(&r.tenant_id, grace_ms, &caller.identity, Some(&who))
            .await;
        let result = self
            .0
            .audited(&who, &r.tenant_id, "", 0, result, Success::AlreadyRecorded)
            .await;
        log("DeleteTenant", &caller.identity, &r.tenant_id, "", &result);
        let status = result.map_err(|e| tenant_error(e, &r.tenant_id))?;
        // The background task shreds what is due: wake it, so that a deletion
        // without a grace period does not wait for the next check.
        self.0.vault.jobs_started().notify_one();
        Ok(Response::new(pb::DeleteTenantResponse {
            shred_after_ms: status.shred_after_ms.unwrap_or(0),
            status: Some(convert::tenant_status(status)),
        }))
    }

    async fn restore_tenant(
        &self,
        req: Request<pb::RestoreTenantRequest>,
    ) -> Result<Response<pb::RestoreTenantResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::RestoreTenant, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::RestoreTenant, &req);
        let r = req.into_inner();
        let result = self.0.vault.restore_tenant(&r.tenant_id, Some(&who)).await;
        let result = self
            .0
            .audited(&who, &r.tenant_id, "", 0, result, Success::AlreadyRecorded)
            .await;
        log("RestoreTenant", &caller.identity, &r.tenant_id, "", &result);
        let status = result.map_err(|e| tenant_error(e, &r.tenant_id))?;
        Ok(Response::new(pb::RestoreTenantResponse {
            status: Some(convert::tenant_status(status)),
        }))
    }

    async fn set_legal_hold(
        &self,
        req: Request<pb::SetLegalHoldRequest>,
    ) -> Result<Response<pb::SetLegalHoldResponse>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::SetLegalHold, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::SetLegalHold, &req);
        let r = req.into_inner();
        let result = self
            .0
            .vault
            .set_legal_hold(
                &r.tenant_id,
                r.hold,
                &r.reason,
                &caller.identity,
                Some(&who),
            )
            .await;
        let result = self
            .0
            .audited(&who, &r.tenant_id, "", 0, result, Success::AlreadyRecorded)
            .await;
        log("SetLegalHold", &caller.identity, &r.tenant_id, "", &result);
        let status = result.map_err(|e| tenant_error(e, &r.tenant_id))?;
        if !r.hold {
            // A released tenant past its grace period is due now.
            self.0.vault.jobs_started().notify_one();
        }
        Ok(Response::new(pb::SetLegalHoldResponse {
            status: Some(convert::tenant_status(status)),
        }))
    }

    async fn get_tenant_status(
        &self,
        req: Request<pb::GetTenantStatusRequest>,
    ) -> Result<Response<pb::TenantStatus>, Status> {
        let caller = self
            .0
            .authorise(&req, Rpc::GetTenantStatus, Some(&req.get_ref().tenant_id))
            .await?;
        let who = who(&caller.identity, Rpc::GetTenantStatus, &req);
        let r = req.into_inner();
        let result = self.0.vault.tenant_status(&r.tenant_id);
        let result = self
            .0
            .audited(&who, &r.tenant_id, "", 0, result, Success::ToRecord)
            .await;
        log(
            "GetTenantStatus",
            &caller.identity,
            &r.tenant_id,
            "",
            &result,
        );
        let status = result.map_err(|e| tenant_error(e, &r.tenant_id))?;
        Ok(Response::new(convert::tenant_status(status)))
    }
}

/// Starts a watch of the event log after `after` (0: from now), only
/// `tenant`'s events if given: the first read happens here, so that its
/// errors are the call's; the rest runs in a task.
fn open_watch(
    shared: &Shared,
    after: u64,
    tenant: Option<String>,
) -> Result<ReceiverStream<Result<pb::RevocationEvent, Status>>, Error> {
    // Subscribed before the first read: whatever is committed after this
    // line changes the receiver, so the task reads it.
    let mut changes = shared.vault.subscribe_events();
    let start = if after == 0 {
        *changes.borrow_and_update()
    } else {
        changes.mark_unchanged();
        after
    };
    let first = shared
        .vault
        .events_after(start, tenant.as_deref(), WATCH_PAGE)?;
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let watch = Watch {
        shared: shared.clone(),
        tenant,
        cursor: start,
        changes,
        tx,
        last_sent: Instant::now(),
    };
    tokio::spawn(watch.run(first));
    Ok(ReceiverStream::new(rx))
}

/// Events read from the log at a time by a watch.
const WATCH_PAGE: usize = 256;
/// Events a watch may have sent that its client has not taken yet; when full,
/// the watch waits for the client (or the shutdown) before reading on.
const WATCH_BUFFER: usize = 64;

/// One `WatchRevocations` stream: follows the event log from `cursor`.
struct Watch {
    shared: Shared,
    tenant: Option<String>,
    /// The last log sequence read (its event sent, or filtered out).
    cursor: u64,
    /// Changes after each committed event (subscribed before the first read).
    changes: watch::Receiver<u64>,
    tx: mpsc::Sender<Result<pb::RevocationEvent, Status>>,
    /// When the last message was sent: the keepalive is due an interval later
    /// (a filtered watch of a busy log may read much and send nothing).
    last_sent: Instant,
}

/// Counts a watch in `credvault_revocation_watchers` while it runs, however
/// its task ends.
struct OpenWatch;

impl OpenWatch {
    fn count() -> Self {
        crate::metrics::global().revocation_watchers.inc();
        Self
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        crate::metrics::global().revocation_watchers.dec();
    }
}

/// Why a watch stops.
enum Stop {
    /// The client went away, or the server is shutting down: end quietly.
    Quietly,
    /// The log could not be read: the stream ends with this status.
    Failed(Status),
}

impl Watch {
    /// Sends the opening KEEPALIVE and `first`, catches up with whatever
    /// `first` did not hold (a backlog longer than a page), then follows the
    /// log until the client leaves, the server shuts down or a read fails.
    /// Dropping `tx` ends the stream (with OK, unless an error was sent last).
    async fn run(mut self, first: EventPage) {
        let _open = OpenWatch::count();
        let shutdown = self.shared.streams.begun();
        tokio::pin!(shutdown);
        let result = async {
            self.send(keepalive(self.cursor), &mut shutdown).await?;
            self.deliver(first, &mut shutdown).await?;
            self.catch_up(&mut shutdown).await?;
            self.follow(&mut shutdown).await
        }
        .await;
        match result {
            Ok(never) => match never {},
            Err(Stop::Quietly) => {}
            Err(Stop::Failed(status)) => {
                // After the events already queued; the client may be gone.
                tokio::select! {
                    _ = self.tx.send(Err(status)) => {}
                    () = shutdown => {}
                }
            }
        }
    }

    async fn follow(
        &mut self,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<std::convert::Infallible, Stop> {
        let keepalive_every = self.shared.watch_keepalive;
        loop {
            // Idle: wait for a commit, the keepalive, the client leaving or
            // the shutdown.
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        // The vault is gone: the server is stopping.
                        return Err(Stop::Quietly);
                    }
                }
                () = tokio::time::sleep_until(self.last_sent + keepalive_every) => {
                    self.send(keepalive(self.cursor), shutdown).await?;
                    continue;
                }
                () = self.tx.closed() => return Err(Stop::Quietly),
                () = shutdown.as_mut() => return Err(Stop::Quietly),
            }
            self.catch_up(shutdown).await?;
        }
    }

    /// Reads and sends until the log holds nothing newer than the last
    /// committed sequence this watch has been told of.
    async fn catch_up(
        &mut self,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), Stop> {
        loop {
            // Marked seen before reading: a commit after this line changes
            // the receiver again, so nothing is left unread.
            let newest = *self.changes.borrow_and_update();
            let before = self.cursor;
            let page = self
                .shared
                .vault
                .events_after(self.cursor, self.tenant.as_deref(), WATCH_PAGE)
                .map_err(|e| {
                    tracing::info!(
                        rpc = "WatchRevocations",
                        tenant = self.tenant.as_deref().unwrap_or(""),
                        after = self.cursor,
                        outcome = e.reason(),
                        "watch ended"
                    );
                    Stop::Failed(e.into())
                })?;
            self.deliver(page, shutdown).await?;
            if self.cursor >= newest || self.cursor == before {
                return Ok(());
            }
        }
    }

    /// Sends a page's events and moves the cursor past what it read.
    async fn deliver(
        &mut self,
        page: EventPage,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), Stop> {
        for event in page.events {
            self.send(convert::event(event), shutdown).await?;
        }
        self.cursor = self.cursor.max(page.read_to);
        Ok(())
    }

    async fn send(
        &mut self,
        event: pb::RevocationEvent,
        shutdown: &mut Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), Stop> {
        tokio::select! {
            sent = self.tx.send(Ok(event)) => sent.map_err(|_| Stop::Quietly)?,
            () = shutdown.as_mut() => return Err(Stop::Quietly),
        }
        self.last_sent = Instant::now();
        Ok(())
    }
}

fn keepalive(sequence: u64) -> pb::RevocationEvent {
    convert::keepalive(sequence, SystemClock.now_ms())
}

/// One log line per call: who, what, which credential, and the outcome (the
/// error's reason code). Never secret bytes.
fn log<T>(rpc: &str, caller: &str, tenant: &str, credential: &str, result: &Result<T, Error>) {
    match result {
        Ok(_) => tracing::info!(rpc, caller, tenant, credential, outcome = "ok"),
        Err(error) => tracing::info!(rpc, caller, tenant, credential, outcome = error.reason()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio_stream::StreamExt;

    use super::*;
    use crate::authz::Policy;
    use crate::service::StreamShutdown;
    use crate::vault::{Kind, Vault};

    use pb::revocation_event::Kind as EventKind;

    /// A hang guard, not a measurement.
    const GUARD: Duration = Duration::from_secs(60);

    async fn shared(dir: &std::path::Path, keepalive: Duration) -> Shared {
        let vault = Vault::open_for_test(dir).await;
        Shared {
            vault: Arc::new(vault),
            policy: Arc::new(Policy::dev_default()).into(),
            callers: Arc::default(),
            in_flight: Arc::new(crate::service::InFlight::new(512)),
            streams: StreamShutdown::new(),
            watch_keepalive: keepalive,
            started_at_ms: 0,
        }
    }

    /// Seals and revokes `count` credentials of `tenant`, concurrently.
    async fn revoke_many(shared: &Shared, tenant: &str, count: usize) {
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            let (vault, tenant) = (shared.vault.clone(), tenant.to_owned());
            tasks.spawn(async move {
                let credential = format!("cred/{i:04}");
                vault
                    .seal(SealRequest {
                        tenant: tenant.clone(),
                        credential: credential.clone(),
                        kind: Kind::Generic,
                        secret: Secret::new(b"cookie".to_vec()),
                        labels: Default::default(),
                        expires_at_ms: None,
                        expected_version: None,
                    })
                    .await
                    .unwrap();
                vault
                    .revoke(&tenant, &credential, "test", "test")
                    .await
                    .unwrap();
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    }

    type Events = ReceiverStream<Result<pb::RevocationEvent, Status>>;

    async fn next(stream: &mut Events) -> pb::RevocationEvent {
        tokio::time::timeout(GUARD, stream.next())
            .await
            .expect("a message within the guard")
            .expect("the stream goes on")
            .expect("no error")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backlog_longer_than_a_page_is_sent_whole_in_order_then_new_events() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path(), GUARD).await;
        let count = WATCH_PAGE + 44;
        revoke_many(&shared, "acme", count).await;
        assert_eq!(shared.vault.last_event_sequence(), count as u64);

        let mut stream = open_watch(&shared, 1, None).unwrap();
        let opening = next(&mut stream).await;
        assert_eq!(
            (opening.kind(), opening.sequence),
            (EventKind::Keepalive, 1)
        );
        for sequence in 2..=count as u64 {
            let event = next(&mut stream).await;
            assert_eq!(
                (event.kind(), event.sequence, event.tenant_id.as_str()),
                (EventKind::CredentialRevoked, sequence, "acme")
            );
        }
        revoke_many(&shared, "globex", 1).await;
        let event = next(&mut stream).await;
        assert_eq!(
            (event.sequence, event.tenant_id.as_str()),
            (count as u64 + 1, "globex")
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_filtered_watch_of_a_busy_log_still_gets_keepalives_with_the_position() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path(), Duration::from_millis(50)).await;
        let mut stream = open_watch(&shared, 0, Some("quiet".into())).unwrap();
        let opening = next(&mut stream).await;
        assert_eq!(
            (opening.kind(), opening.sequence),
            (EventKind::Keepalive, 0)
        );
        revoke_many(&shared, "busy", 5).await;
        // Only keepalives, until one carries the position past every event.
        loop {
            let message = next(&mut stream).await;
            assert_eq!(message.kind(), EventKind::Keepalive, "{message:?}");
            assert!(message.sequence <= 5, "{message:?}");
            if message.sequence == 5 {
                break;
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_end_when_the_shutdown_begins_and_errors_come_first() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path(), GUARD).await;
        let mut streams: Vec<Events> = vec![
            open_watch(&shared, 0, None).unwrap(),
            open_watch(&shared, 0, Some("acme".into())).unwrap(),
        ];
        for stream in &mut streams {
            assert_eq!(next(stream).await.kind(), EventKind::Keepalive);
        }
        // A bad tenant id is the call's error, before any stream.
        let invalid = open_watch(&shared, 0, Some("not a tenant".into())).unwrap_err();
        assert_eq!(invalid.reason(), "INVALID_ID");

        shared.streams.begin();
        for stream in &mut streams {
            let end = tokio::time::timeout(GUARD, stream.next())
                .await
                .expect("the stream ends within the guard");
            assert!(end.is_none(), "{end:?}");
        }
        // A watch opened after the shutdown began ends after its opening.
        let mut late = open_watch(&shared, 0, None).unwrap();
        let end = tokio::time::timeout(GUARD, late.next())
            .await
            .expect("the stream ends within the guard");
        assert!(
            end.is_none() || matches!(&end, Some(Ok(m)) if m.kind() == EventKind::Keepalive),
            "{end:?}"
        );
    }
}
