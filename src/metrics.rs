//! Prometheus metrics, served in the OpenMetrics text format on a separate
//! plain-HTTP port (`metrics_listen` in the configuration; off unless set).
//!
//! What is counted (never a tenant, credential or caller name, so the label
//! sets stay small and the endpoint reveals nothing about customers):
//! - every gRPC call by method and status code, and its time until the
//!   response headers (for a unary call, its whole time) — [`GrpcMetricsLayer`];
//! - the store's durable commits: batches acknowledged and the time of each log
//!   `fdatasync` (the one figure that says when the disk is the trouble; their
//!   ratio is the group-commit batch size), and whether the store has failed
//!   (it then refuses every write);
//! - TLS handshakes that failed or timed out;
//! - the `WatchRevocations` streams open now (executors listening for
//!   revocations: if it falls to zero, revocations no longer reach them).
//!
//! The metrics are process-wide ([`global`]): the store's threads record into
//! them without a handle being threaded through.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Labels of a gRPC call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `/package.Service/Method`, or `other` for a path that names no method
    /// of ours (so a scanner cannot grow the label set).
    pub method: String,
    /// The gRPC status code's name (`OK`, `NOT_FOUND`, …).
    pub code: String,
}

/// Labels of a call's duration.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: String,
}

type Seconds = Family<MethodLabels, Histogram, fn() -> Histogram>;

/// Every metric credvault exports.
pub struct Metrics {
    registry: Registry,
    pub grpc_calls: Family<CallLabels, Counter>,
    pub grpc_seconds: Seconds,
    pub store_commits: Counter,
    pub store_sync_seconds: Histogram,
    pub audit_journal_sync_seconds: Histogram,
    pub store_failed: Gauge,
    pub audit_failed: Gauge,
    pub tls_handshake_failures: Counter,
    pub revocation_watchers: Gauge,
    pub root_key_created: Gauge,
    pub primary_kek_created: Gauge,
    pub config_reloads: Counter,
    pub config_reload_failures: Counter,
    pub server_certificate_expiry: Gauge,
    pub crl_next_update: Gauge,
    pub audit_head_sequence: Gauge,
}

fn call_seconds() -> Histogram {
    // 50 µs … ≈ 1.6 s
    Histogram::new(exponential_buckets(50e-6, 2.0, 16))
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("credvault");
        let grpc_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "grpc_calls",
            "gRPC calls answered, by method and status code",
            grpc_calls.clone(),
        );
        let grpc_seconds: Seconds = Family::new_with_constructor(call_seconds);
        registry.register(
            "grpc_call_duration_seconds",
            "Time from a gRPC request to its response headers (a unary call's whole time)",
            grpc_seconds.clone(),
        );
        let store_commits = Counter::default();
        registry.register(
            "store_commits",
            "Write batches acknowledged durable (a seal, a revoke, an audit record, …)",
            store_commits.clone(),
        );
        // 25 µs … ≈ 0.8 s
        let store_sync_seconds = Histogram::new(exponential_buckets(25e-6, 2.0, 16));
        registry.register(
            "store_log_sync_duration_seconds",
            "Time of each fdatasync of the write-ahead log",
            store_sync_seconds.clone(),
        );
        let audit_journal_sync_seconds = Histogram::new(exponential_buckets(25e-6, 2.0, 16));
        registry.register(
            "audit_journal_sync_duration_seconds",
            "Time of each write and fdatasync of the audit journal (one per group of records)",
            audit_journal_sync_seconds.clone(),
        );
        let store_failed = Gauge::default();
        registry.register(
            "store_failed",
            "1 once the store has failed and refuses writes until restarted, else 0",
            store_failed.clone(),
        );
        let audit_failed = Gauge::default();
        registry.register(
            "audit_failed",
            "1 once the audit journal has failed and audited calls are refused until restarted, else 0",
            audit_failed.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed or timed out",
            tls_handshake_failures.clone(),
        );
        let revocation_watchers = Gauge::default();
        registry.register(
            "revocation_watchers",
            "WatchRevocations streams open now",
            revocation_watchers.clone(),
        );
        let root_key_created = Gauge::default();
        registry.register(
            "root_key_created_timestamp_seconds",
            "When the root key in use was put in place (Unix time; refreshed every background round)",
            root_key_created.clone(),
        );
        let primary_kek_created = Gauge::default();
        registry.register(
            "primary_kek_created_timestamp_seconds",
            "When the primary key-encryption key was made (Unix time; refreshed every background round)",
            primary_kek_created.clone(),
        );
        let audit_head_sequence = Gauge::default();
        registry.register(
            "audit_head_sequence",
            "Sequence number of the newest audit record (refreshed every background round; it never goes back)",
            audit_head_sequence.clone(),
        );
        let config_reloads = Counter::default();
        registry.register(
            "config_reloads",
            "Reloads (SIGHUP) that put new TLS files and policy in force",
            config_reloads.clone(),
        );
        let config_reload_failures = Counter::default();
        registry.register(
            "config_reload_failures",
            "Reloads (SIGHUP) refused because a file did not load; the previous configuration stays in force",
            config_reload_failures.clone(),
        );
        let server_certificate_expiry = Gauge::default();
        registry.register(
            "server_certificate_expiry_timestamp_seconds",
            "When the server certificate in force expires (Unix time; set at start and at each reload)",
            server_certificate_expiry.clone(),
        );
        let crl_next_update = Gauge::default();
        registry.register(
            "crl_next_update_timestamp_seconds",
            "When the CRL in force says a newer one is due (Unix time; 0 without a CRL; set at start and at each reload)",
            crl_next_update.clone(),
        );
        Self {
            registry,
            grpc_calls,
            grpc_seconds,
            store_commits,
            store_sync_seconds,
            audit_journal_sync_seconds,
            store_failed,
            audit_failed,
            tls_handshake_failures,
            revocation_watchers,
            root_key_created,
            primary_kek_created,
            config_reloads,
            config_reload_failures,
            server_certificate_expiry,
            crl_next_update,
            audit_head_sequence,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Serves `GET /metrics` on `listener` (plain HTTP/1.1) until `shutdown`
/// resolves; any other path is 404.
pub async fn serve(listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let accept = async {
        loop {
            let (tcp, _) = crate::service::accept(&listener).await;
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(
                        |req| async move { Ok::<_, Infallible>(respond(&req)) },
                    );
                let io = hyper_util::rt::TokioIo::new(tcp);
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(%error, "metrics: connection ended");
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => {}
    }
}

fn respond<B>(req: &hyper::Request<B>) -> hyper::Response<Full<Bytes>> {
    let builder = hyper::Response::builder();
    let response = if req.method() == hyper::Method::GET && req.uri().path() == "/metrics" {
        builder
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(global().encode())))
    } else {
        builder
            .status(hyper::StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
    };
    response.expect("a static response is well formed")
}

/// A tower layer that counts every gRPC call by method and status code, and
/// times it to its response headers.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the router.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<hyper::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<hyper::Request<B>, Response = hyper::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: hyper::Request<B>) -> Self::Future {
        let method = method_label(req.uri().path());
        let started = Instant::now();
        let future = self.inner.call(req);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                // A failed call is "trailers only": its status is in the
                // headers. A success's status comes in the trailers, after the
                // body; a response without one in its headers is counted OK.
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", code_name),
                Err(_) => "UNKNOWN",
            };
            let metrics = global();
            metrics
                .grpc_seconds
                .get_or_create(&MethodLabels {
                    method: method.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            metrics
                .grpc_calls
                .get_or_create(&CallLabels {
                    method,
                    code: code.to_owned(),
                })
                .inc();
            result
        })
    }
}

/// The path if it names one of the services credvault serves, else `other`.
fn method_label(path: &str) -> String {
    const SERVICES: [&str; 4] = [
        crate::service::pb::vault_server::SERVICE_NAME,
        crate::service::pb::admin_server::SERVICE_NAME,
        tonic_health::pb::health_server::SERVICE_NAME,
        tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME,
    ];
    let known = path
        .strip_prefix('/')
        .and_then(|path| path.split_once('/'))
        .is_some_and(|(service, method)| {
            SERVICES.contains(&service)
                && !method.is_empty()
                && method.len() <= 64
                && method.bytes().all(|b| b.is_ascii_alphanumeric())
        });
    if known {
        path.to_owned()
    } else {
        "other".to_owned()
    }
}

/// The canonical name of a gRPC status code.
fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_methods_become_labels() {
        assert_eq!(
            method_label("/credvault.v1.Vault/Unseal"),
            "/credvault.v1.Vault/Unseal"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        for path in [
            "/",
            "/credvault.v1.Vault/",
            "/credvault.v1.Vault/Un/seal",
            "/evil.Service/Method",
            "/credvault.v1.Vault/secret-token-in-the-path",
        ] {
            assert_eq!(method_label(path), "other", "{path}");
        }
    }

    #[test]
    fn status_codes_have_their_canonical_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(9), "FAILED_PRECONDITION");
        assert_eq!(code_name(16), "UNAUTHENTICATED");
        assert_eq!(code_name(17), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
    }

    /// The per-call families appear with their first call (tests/metrics.rs).
    #[test]
    fn the_text_format_names_every_metric_without_labels() {
        let text = global().encode();
        for (name, kind) in [
            ("credvault_store_commits", "counter"),
            ("credvault_store_log_sync_duration_seconds", "histogram"),
            ("credvault_store_failed", "gauge"),
            ("credvault_audit_failed", "gauge"),
            ("credvault_tls_handshake_failures", "counter"),
            ("credvault_revocation_watchers", "gauge"),
            ("credvault_root_key_created_timestamp_seconds", "gauge"),
            ("credvault_primary_kek_created_timestamp_seconds", "gauge"),
            ("credvault_audit_head_sequence", "gauge"),
            ("credvault_config_reloads", "counter"),
            ("credvault_config_reload_failures", "counter"),
            (
                "credvault_server_certificate_expiry_timestamp_seconds",
                "gauge",
            ),
            ("credvault_crl_next_update_timestamp_seconds", "gauge"),
        ] {
            let line = format!("# TYPE {name} {kind}");
            assert!(text.contains(&line), "{line} missing:\n{text}");
        }
    }
}
