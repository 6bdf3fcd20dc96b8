//! The gRPC server: mutual TLS 1.3 over tokio-rustls, the Vault and Admin
//! services, health and reflection, limits, graceful shutdown.
//!
//! Each handler is thin: caller identity (from the verified client certificate)
//! → policy check → vault operation → response. Errors map to statuses in one
//! place (`error::status`).

mod admin;
mod audit;
mod convert;
mod vault;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Router;
use tonic::{Request, Status};
use tower::layer::util::{Identity, Stack};

use crate::authn::{self, Caller};
use crate::authz::{Admission, Rpc, SharedPolicy};
use crate::error::status_with_reason;
use crate::metrics::GrpcMetricsLayer;
use crate::tls::ServerTls;
use crate::vault::Vault;

/// The router every server of credvault runs: tonic's, with the metrics layer.
pub type GrpcRouter = Router<Stack<GrpcMetricsLayer, Identity>>;

/// Generated protocol buffer and gRPC code (`proto/credvault/v1`).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("credvault.v1");

    /// `Debug` of the messages that carry a secret: every field but the secret,
    /// which shows only its length (build.rs skips the derived `Debug`).
    impl std::fmt::Debug for SealRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("SealRequest")
                .field("tenant_id", &self.tenant_id)
                .field("credential_id", &self.credential_id)
                .field("kind", &self.kind)
                .field(
                    "secret",
                    &format_args!("<{} bytes redacted>", self.secret.len()),
                )
                .field("labels", &self.labels)
                .field("expires_at_ms", &self.expires_at_ms)
                .field("expected_version", &self.expected_version)
                .finish()
        }
    }

    impl std::fmt::Debug for UnsealResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("UnsealResponse")
                .field(
                    "secret",
                    &format_args!("<{} bytes redacted>", self.secret.len()),
                )
                .field("metadata", &self.metadata)
                .finish()
        }
    }

    /// The encoded file descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("credvault_descriptor");
}

/// Server limits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// Requests served at once on one connection (one caller); more wait.
    pub concurrency_per_connection: usize,
    /// Calls in flight at once from one caller identity, over all its
    /// connections; more are refused (RESOURCE_EXHAUSTED, CALLER_CONCURRENCY).
    pub concurrency_per_caller: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// A request that takes longer fails with DEADLINE_EXCEEDED / CANCELLED.
    pub request_timeout: Duration,
    /// HTTP/2 keepalive pings.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A TLS handshake that takes longer is dropped.
    pub handshake_timeout: Duration,
    /// A WatchRevocations stream that sent nothing for this long gets a KEEPALIVE.
    pub watch_keepalive: Duration,
}

impl Limits {
    /// Defaults for a vault whose secrets are at most `max_secret_bytes`.
    pub fn for_secret_limit(max_secret_bytes: usize) -> Self {
        Self {
            max_message_bytes: max_secret_bytes + (64 << 10),
            concurrency_per_connection: 128,
            concurrency_per_caller: 512,
            max_concurrent_streams: 256,
            request_timeout: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            watch_keepalive: Duration::from_secs(15),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub(crate) struct Shared {
    pub vault: Arc<Vault>,
    pub policy: SharedPolicy,
    callers: Arc<CallerCache>,
    /// Calls in flight per caller identity.
    in_flight: Arc<InFlight>,
    /// Ends the long-lived streams when the server begins shutting down.
    pub streams: StreamShutdown,
    /// See [`Limits::watch_keepalive`].
    pub watch_keepalive: Duration,
    /// When the service was built (ms since the Unix epoch).
    pub started_at_ms: u64,
}

/// Tells the server's long-lived streams (`WatchRevocations`) that it is
/// shutting down, so that they end and the graceful drain, which waits for
/// every in-flight call, can finish. Clones share the signal.
#[derive(Debug, Clone)]
pub struct StreamShutdown(Arc<watch::Sender<bool>>);

impl Default for StreamShutdown {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(false)))
    }
}

impl StreamShutdown {
    /// A signal not yet given.
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends every stream (now and any started later). Idempotent.
    pub fn begin(&self) {
        self.0.send_replace(true);
    }

    /// Resolves once [`StreamShutdown::begin`] has been called.
    pub(crate) fn begun(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut signal = self.0.subscribe();
        async move {
            // The sender lives in `self` and every clone: it cannot be dropped
            // while a stream that could wait on it is alive, but if it were,
            // nothing could ever begin the shutdown.
            if signal.wait_for(|begun| *begun).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Most identities [`CallerCache`] keeps; past that it starts afresh.
const CALLER_CACHE_ENTRIES: usize = 4096;

/// Identities already read from client certificates, keyed by the leaf's DER
/// bytes: parsing the certificate on every call costs ~4 µs, about 7 % of an
/// Unseal's CPU (`credvault bench grpc`). The identity is a pure function of
/// those bytes, and rustls verifies the chain, dates and CRL on every
/// handshake before a request arrives, so nothing about trust is cached.
#[derive(Default)]
struct CallerCache(Mutex<HashMap<Box<[u8]>, Caller>>);

impl CallerCache {
    fn get_or_read(&self, leaf: &[u8]) -> Result<Caller, authn::AuthnError> {
        let lock = || self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(caller) = lock().get(leaf) {
            return Ok(caller.clone());
        }
        let caller = authn::caller_from_cert(leaf)?;
        let mut callers = lock();
        if callers.len() >= CALLER_CACHE_ENTRIES {
            callers.clear();
        }
        callers.insert(leaf.into(), caller.clone());
        Ok(caller)
    }
}

/// Calls in flight per caller identity, over all of its connections (DESIGN
/// §6: per-caller concurrency limits). The per-connection limit makes calls
/// wait; this one refuses them, so that one caller with many connections
/// cannot take every worker from the others.
pub(crate) struct InFlight {
    limit: usize,
    counts: Mutex<HashMap<String, usize>>,
}

impl InFlight {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            limit,
            counts: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a place for a call of `identity`: false if it has `limit` in flight.
    fn enter(&self, identity: &str) -> bool {
        let mut counts = self.lock();
        match counts.get_mut(identity) {
            Some(count) if *count >= self.limit => false,
            Some(count) => {
                *count += 1;
                true
            }
            None => {
                counts.insert(identity.to_owned(), 1);
                true
            }
        }
    }

    /// Calls of `identity` in flight now.
    #[cfg(test)]
    fn count(&self, identity: &str) -> usize {
        self.lock().get(identity).copied().unwrap_or(0)
    }
}

/// An authorised caller. It holds one of its identity's places in
/// [`InFlight`] until it is dropped, at the end of the handler.
pub(crate) struct Authorised {
    pub identity: String,
    in_flight: Arc<InFlight>,
}

impl Drop for Authorised {
    fn drop(&mut self) {
        let mut counts = self.in_flight.lock();
        if let Some(count) = counts.get_mut(&self.identity) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.identity);
            }
        }
    }
}

impl Shared {
    /// The caller, authorised for `rpc` on `tenant` and holding a place among
    /// its calls in flight; else the status to return. A denial is recorded in
    /// the audit log before it is returned.
    pub(crate) async fn authorise<T: audit::AuditTarget>(
        &self,
        req: &Request<T>,
        rpc: Rpc,
        tenant: Option<&str>,
    ) -> Result<Authorised, Status> {
        let caller = match self.caller(req) {
            Ok(caller) => caller,
            Err(status) => {
                self.audit_denial(req, "", rpc, tenant, "UNAUTHENTICATED")
                    .await;
                return Err(status);
            }
        };
        let admission = self.policy.admits(&caller, rpc, tenant);
        let (code, reason, message) = if admission == Admission::Revoked {
            (
                tonic::Code::Unauthenticated,
                "CERTIFICATE_REVOKED",
                "the client certificate has been revoked".to_owned(),
            )
        } else if admission == Admission::StaleCrl {
            (
                tonic::Code::Unauthenticated,
                "CRL_EXPIRED",
                "the server's CRL for the client certificate's issuer is past its next update"
                    .to_owned(),
            )
        } else if admission == Admission::Denied {
            (
                tonic::Code::PermissionDenied,
                "PERMISSION_DENIED",
                format!("the caller is not allowed to call {}", rpc.name()),
            )
        } else if self.in_flight.enter(&caller.identity) {
            return Ok(Authorised {
                identity: caller.identity,
                in_flight: self.in_flight.clone(),
            });
        } else {
            (
                tonic::Code::ResourceExhausted,
                "CALLER_CONCURRENCY",
                format!(
                    "this caller already has {} calls in flight; retry later",
                    self.in_flight.limit
                ),
            )
        };
        tracing::warn!(caller = %caller.identity, rpc = rpc.name(), tenant, outcome = reason, "call refused");
        self.audit_denial(req, &caller.identity, rpc, tenant, reason)
            .await;
        Err(status_with_reason(code, message, reason))
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let unauthenticated = |message: &str| {
            status_with_reason(tonic::Code::Unauthenticated, message, "UNAUTHENTICATED")
        };
        let certs = req
            .peer_certs()
            .ok_or_else(|| unauthenticated("no client certificate"))?;
        let leaf = certs
            .first()
            .ok_or_else(|| unauthenticated("no client certificate"))?;
        self.callers
            .get_or_read(leaf.as_ref())
            .map_err(|_| unauthenticated("the client certificate carries no usable identity"))
    }
}

/// The router with the Vault and Admin services, health and reflection. Extra
/// services (the benchmark's echo) can be added before [`serve`].
///
/// Its `WatchRevocations` streams end only when their clients leave: a server
/// that has watchers and shuts down gracefully should use [`router_with`].
pub fn router(
    vault: Arc<Vault>,
    policy: impl Into<SharedPolicy>,
    limits: &Limits,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<GrpcRouter> {
    router_with(
        vault,
        policy,
        limits,
        health_service,
        &StreamShutdown::new(),
    )
}

/// [`router`] whose long-lived streams end when `streams` is told the server
/// is shutting down (call [`StreamShutdown::begin`] as the drain starts).
pub fn router_with(
    vault: Arc<Vault>,
    policy: impl Into<SharedPolicy>,
    limits: &Limits,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    streams: &StreamShutdown,
) -> anyhow::Result<GrpcRouter> {
    let shared = Shared {
        vault,
        policy: policy.into(),
        callers: Arc::default(),
        in_flight: Arc::new(InFlight::new(limits.concurrency_per_caller)),
        streams: streams.clone(),
        watch_keepalive: limits.watch_keepalive,
        started_at_ms: crate::clock::Clock::now_ms(&crate::clock::SystemClock),
    };
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let vault = pb::vault_server::VaultServer::new(vault::VaultService(shared.clone()))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let admin = pb::admin_server::AdminServer::new(admin::AdminService(shared))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
    let (vault, admin) = (SizeChecked::new(vault), SizeChecked::new(admin));
    Ok(server_builder(limits)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(vault)
        .add_service(admin))
}

type HttpResponse = tonic::codegen::http::Response<tonic::body::Body>;
type MapResponse<S> = tower::util::MapResponse<S, fn(HttpResponse) -> HttpResponse>;

/// A generated service whose requests over the message size limit get the
/// contract's status for a secret over the limit, INVALID_ARGUMENT + TOO_LARGE,
/// instead of tonic's bare OUT_OF_RANGE (tonic rejects them from the 5-byte
/// length prefix, before buffering anything, and before the handler runs).
#[derive(Clone)]
struct SizeChecked<S>(MapResponse<S>);

impl<S> SizeChecked<S> {
    fn new(inner: S) -> Self {
        Self(tower::util::MapResponse::new(inner, too_large_is_invalid))
    }
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for SizeChecked<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tower::Service<tonic::codegen::http::Request<B>> for SizeChecked<S>
where
    S: tower::Service<tonic::codegen::http::Request<B>, Response = HttpResponse>,
{
    type Response = HttpResponse;
    type Error = S::Error;
    type Future = <MapResponse<S> as tower::Service<tonic::codegen::http::Request<B>>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        self.0.call(req)
    }
}

/// How tonic's decoder words a request message over `max_decoding_message_size`.
const DECODE_TOO_LARGE: &str = "Error, decoded message length too large";

fn too_large_is_invalid(mut response: HttpResponse) -> HttpResponse {
    let headers = response.headers_mut();
    if headers
        .get("grpc-status")
        .is_some_and(|code| code.as_bytes() == b"11") // OUT_OF_RANGE, as a trailers-only response
        && let Some(status) = Status::from_header_map(headers)
        && status.message().starts_with(DECODE_TOO_LARGE)
    {
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            headers.remove(name);
        }
        let mapped =
            status_with_reason(tonic::Code::InvalidArgument, status.message(), "TOO_LARGE");
        if mapped.add_header(headers).is_err() {
            // Cannot happen (the message is tonic's ASCII); keep the original code then.
            let _ = status.add_header(headers);
        }
    }
    response
}

/// The tonic server builder with the limits applied (also used by the benchmark).
pub fn server_builder(
    limits: &Limits,
) -> tonic::transport::Server<Stack<GrpcMetricsLayer, Identity>> {
    tonic::transport::Server::builder()
        .concurrency_limit_per_connection(limits.concurrency_per_connection)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .timeout(limits.request_timeout)
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(limits.keepalive_timeout))
        .layer(GrpcMetricsLayer)
}

/// Serves `router` on `listener` over mutual TLS until `shutdown` resolves, then
/// stops accepting and finishes in-flight calls.
pub async fn serve(
    router: GrpcRouter,
    listener: TcpListener,
    tls: impl Into<ServerTls>,
    handshake_timeout: Duration,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let (incoming, accept_loop) = tls_incoming(listener, tls.into(), handshake_timeout);
    // On shutdown, stop accepting at once (closing the listener), so that a
    // client connecting during the drain is refused instead of left waiting.
    let stop_accepting = accept_loop.abort_handle();
    let signal = async move {
        shutdown.await;
        stop_accepting.abort();
    };
    let result = router.serve_with_incoming_shutdown(incoming, signal).await;
    accept_loop.abort();
    Ok(result?)
}

type Incoming = ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>>;

/// Accepts TCP connections (TCP_NODELAY on: tonic does not set it on this
/// path), completes each TLS handshake in its own task with the TLS
/// configuration in force when the connection arrived, and yields the streams.
fn tls_incoming(
    listener: TcpListener,
    tls: ServerTls,
    handshake_timeout: Duration,
) -> (Incoming, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let accept_loop = tokio::spawn(async move {
        loop {
            let (tcp, peer) = accept(&listener).await;
            let _ = tcp.set_nodelay(true);
            let (acceptor, tx) = (TlsAcceptor::from(tls.current()), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => log_handshake_failure(peer, &error),
                    Err(_) => {
                        crate::metrics::global().tls_handshake_failures.inc();
                        tracing::info!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    (ReceiverStream::new(rx), accept_loop)
}

/// The next connection on `listener`. A failed accept (say, out of file
/// descriptors) is logged and retried after a pause instead of ending the loop.
pub(crate) async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn log_handshake_failure(peer: SocketAddr, error: &std::io::Error) {
    crate::metrics::global().tls_handshake_failures.inc();
    tracing::info!(%peer, %error, "TLS handshake refused");
}

/// The library's NotFound speaks of credentials; for the lifecycle calls it is
/// the tenant (lifecycle and key calls name one).
fn tenant_error(error: crate::error::Error, tenant: &str) -> Status {
    match error {
        crate::error::Error::NotFound => status_with_reason(
            tonic::Code::NotFound,
            format!("no tenant {tenant:?} in this vault"),
            "NOT_FOUND",
        ),
        error => error.into(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn debug_of_secret_messages_hides_the_secret() {
        let secret = b"hunter2-cookie-jar".to_vec();
        let seal = super::pb::SealRequest {
            secret: secret.clone(),
            tenant_id: "acme".into(),
            ..Default::default()
        };
        let unseal = super::pb::UnsealResponse {
            secret,
            metadata: None,
        };
        for shown in [format!("{seal:?}"), format!("{unseal:?}")] {
            assert!(!shown.contains("hunter2"), "{shown}");
            assert!(!shown.contains("104, 117"), "{shown}"); // "hu" as a byte list
            assert!(shown.contains("18 bytes redacted"), "{shown}");
        }
        assert!(format!("{seal:?}").contains("acme"));
    }

    #[test]
    fn a_caller_gets_at_most_its_limit_of_places_and_each_comes_back_when_dropped() {
        use std::sync::Arc;

        use super::{Authorised, InFlight};
        let in_flight = Arc::new(InFlight::new(2));
        let enter = |identity: &str| {
            in_flight.enter(identity).then(|| Authorised {
                identity: identity.to_owned(),
                in_flight: in_flight.clone(),
            })
        };
        let first = enter("a").expect("first place");
        let second = enter("a").expect("second place");
        assert!(enter("a").is_none(), "a third call of `a` is refused");
        let other = enter("b").expect("another caller has its own places");
        assert_eq!((in_flight.count("a"), in_flight.count("b")), (2, 1));
        drop(first);
        assert_eq!(in_flight.count("a"), 1);
        let third = enter("a").expect("a place came back");
        drop((second, third, other));
        assert_eq!((in_flight.count("a"), in_flight.count("b")), (0, 0));
        assert!(in_flight.lock().is_empty(), "idle callers leave no entry");
    }
}
