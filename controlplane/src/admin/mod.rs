//! The admin listener (HTTP/1.1 on the control plane's runtime, over TLS when the server has
//! TLS): Prometheus `/metrics`, `/healthz` (the process is up), `/readyz` (serving, not
//! shutting down) and `/status`, a small HTML page for people. With `[auth]`, pages other than
//! the probes need the `admin` role (metrics asked from the server's own host excepted).

mod gauges;
pub mod listener;
pub mod sampler;
pub mod status;
mod worker_gauges;
pub mod worker_listener;

use crate::action_cache::AcStore;
use crate::execution::ExecutionCore;
use crate::metrics::ControlMetrics;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use gauges::Gauges;
pub use gauges::{AllocatorProbe, AllocatorStats};
use kiln_auth::Policy;
use kiln_dataplane::metrics::Metrics;
use kiln_dataplane::store::tier::ChainPlan;
use kiln_dataplane::store::CasClient;
use listener::{AdminTls, Caller};
use prometheus_client::registry::Registry;
use sampler::Sampler;
use status::Snapshot;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Facts about the running server shown on the status page.
#[derive(Debug, Clone)]
pub struct ServerInfo {
    /// The gRPC listener.
    pub grpc_addr: SocketAddr,
    /// Data-plane shards.
    pub shards: usize,
    /// Runtime backend.
    pub backend: String,
    /// Data directory.
    pub data_dir: String,
    /// CAS disk cap.
    pub cas_capacity: u64,
    /// The CAS's chain of tiers (for the bytes its memory tiers hold).
    pub chain: Option<Arc<ChainPlan>>,
    /// The allocator's own figures, when the binary's allocator reports them.
    pub allocator: Option<AllocatorProbe>,
}

/// Everything the admin endpoints read.
pub struct AdminState {
    info: ServerInfo,
    admin_addr: SocketAddr,
    started: Instant,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    control: Arc<ControlMetrics>,
    cas: CasClient,
    action_cache: AcStore,
    execution: Option<Arc<ExecutionCore>>,
    registry: Registry,
    gauges: Gauges,
    sampler: Sampler,
}

/// Where the admin endpoints read their figures.
pub struct Sources {
    /// Data-plane counters.
    pub metrics: Arc<Metrics>,
    /// Control-plane counters.
    pub control: Arc<ControlMetrics>,
    /// The CAS (fill, queue depths).
    pub cas: CasClient,
    /// The action cache (fill).
    pub action_cache: AcStore,
    /// The scheduler, when execution is enabled.
    pub execution: Option<Arc<ExecutionCore>>,
}

/// How the admin listener is reached and who may see it.
pub struct Access {
    /// TLS, when the server has it.
    pub tls: Option<AdminTls>,
    /// The server's authorization policy.
    pub policy: Arc<Policy>,
}

/// Binds the admin listener and serves it on the current tokio runtime. `ready` is what
/// `/readyz` reports.
pub async fn start(
    listen: SocketAddr,
    info: ServerInfo,
    ready: Arc<AtomicBool>,
    sources: Sources,
    access: Access,
) -> std::io::Result<SocketAddr> {
    let Sources {
        metrics,
        control,
        cas,
        action_cache,
        execution,
    } = sources;
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let admin_addr = listener.local_addr()?;
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    control.register(&mut registry);
    let gauges = Gauges::new(cas.shard_count());
    gauges.register(&mut registry);
    let state = Arc::new(AdminState {
        info,
        admin_addr,
        started: Instant::now(),
        ready,
        metrics,
        control,
        cas,
        action_cache,
        execution,
        registry,
        gauges,
        sampler: Sampler::default(),
    });
    tokio::spawn(sample(Arc::downgrade(&state)));
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status_page))
        .route("/", get(status_page))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(access.policy, guard));
    tokio::spawn(listener::serve(listener, app, access.tls));
    Ok(admin_addr)
}

/// Answers 401 (with a Basic challenge, so that a browser asks for the token) or 403 to a
/// caller the policy does not admit.
async fn guard(State(policy): State<Arc<Policy>>, request: Request, next: Next) -> Response {
    use kiln_auth::admin::{Page, Request as Asked};
    let caller = request.extensions().get::<Caller>();
    let path = request.uri().path();
    let asked = Asked {
        page: Page::of(path),
        path,
        loopback: caller.is_some_and(|c| c.addr.ip().is_loopback()),
        certificate: caller
            .and_then(|c| c.certificate.as_ref())
            .map(|(name, fingerprint)| (name.as_str(), fingerprint.as_str())),
        authorization: request
            .headers()
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes()),
    };
    match policy.admit_admin(asked) {
        Ok(_) => next.run(request).await,
        Err(denied) if denied.unauthenticated => (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"kiln admin (token as password)\", charset=\"UTF-8\"",
            )],
            format!("{}\n", denied.message),
        )
            .into_response(),
        Err(denied) => (StatusCode::FORBIDDEN, format!("{}\n", denied.message)).into_response(),
    }
}

/// Samples throughput once a second while the admin state lives.
async fn sample(state: std::sync::Weak<AdminState>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let Some(state) = state.upgrade() else { return };
        state.sampler.record(Instant::now(), state.metrics.totals());
    }
}

async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics_page(State(state): State<Arc<AdminState>>) -> Response {
    state
        .gauges
        .refresh(
            &state.cas,
            state.info.chain.as_deref(),
            &state.action_cache,
            state.execution.as_deref(),
            state.info.allocator,
            state.started,
        )
        .await;
    encode(&state.registry)
}

/// `registry` as a `/metrics` answer (OpenMetrics text).
fn encode(registry: &Registry) -> Response {
    let mut text = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, registry) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode metrics: {e}\n"),
        )
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn status_page(State(state): State<Arc<AdminState>>) -> Html<String> {
    let stats = state
        .gauges
        .refresh(
            &state.cas,
            state.info.chain.as_deref(),
            &state.action_cache,
            state.execution.as_deref(),
            state.info.allocator,
            state.started,
        )
        .await;
    let m = &state.metrics;
    let snapshot = Snapshot {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime: state.started.elapsed(),
        grpc_addr: state.info.grpc_addr.to_string(),
        admin_addr: state.admin_addr.to_string(),
        shards: state.info.shards,
        backend: state.info.backend.clone(),
        data_dir: state.info.data_dir.clone(),
        cas_blobs: stats.blobs,
        cas_bytes: stats.bytes,
        cas_capacity: state.info.cas_capacity,
        memory_bytes: stats.memory_bytes,
        memory_capacity: state.info.chain.as_ref().map_or(0, |c| c.memory_capacity()),
        lookups: (
            m.lookups_of("memory"),
            m.lookups_of("disk"),
            m.lookups_of("miss"),
        ),
        ac_entries: stats.ac_entries,
        ac_bytes: stats.ac_bytes,
        ac_gets: (
            state.control.ac_count("get", "hit"),
            state.control.ac_count("get", "miss"),
            state.control.ac_count("get", "incomplete"),
        ),
        uploads: (stats.active_uploads, stats.parked_uploads),
        connections: m.connections_open.get(),
        execution: state.execution.as_ref().map(|e| e.stats()),
        workers: state
            .execution
            .as_ref()
            .map(|e| e.worker_views())
            .unwrap_or_default(),
        rates: state.sampler.rates(),
        series: state.sampler.series(),
    };
    Html(status::render(&snapshot))
}
