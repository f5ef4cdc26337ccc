//! A worker's own admin listener (`kiln worker --admin-listen`): `/metrics` with the metrics
//! of its data plane (its local CAS), of its directory cache and of its transfers (bytes
//! fetched from peers and the server, served to peers), and `/healthz`. The server
//! exports the same directory-cache counts per worker from the workers' reports; this is for
//! watching one worker by itself.

use super::listener;
use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use kiln_dataplane::metrics::Metrics;
use kiln_proto::worker::{DirCacheReport, TransferReport};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Reads the worker's directory cache (`None`: it has none).
pub type CacheProbe = Arc<dyn Fn() -> Option<DirCacheReport> + Send + Sync>;

/// Reads the worker's transfer counts.
pub type TransferProbe = Arc<dyn Fn() -> TransferReport + Send + Sync>;

/// Label of where fetched bytes came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

/// The transfer metrics.
#[derive(Default)]
struct TransferMetrics {
    fetched: prometheus_client::metrics::family::Family<SourceLabel, Counter>,
    served: Counter,
    peer_failures: Counter,
    quic_bytes: Counter,
    /// The counts at the last scrape.
    last: Mutex<TransferReport>,
}

impl TransferMetrics {
    fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_worker_fetch_bytes",
            "Bytes of input blobs fetched, by source: peer (another worker's CAS) or server",
            self.fetched.clone(),
        );
        registry.register(
            "kiln_worker_served_bytes",
            "Bytes this worker's CAS sent to its peers",
            self.served.clone(),
        );
        registry.register(
            "kiln_worker_peer_failures",
            "Fetches from a peer that failed (the blob then came from the server)",
            self.peer_failures.clone(),
        );
        registry.register(
            "kiln_worker_fetch_quic_bytes",
            "Of the bytes fetched from peers, those that came over QUIC",
            self.quic_bytes.clone(),
        );
        for source in ["peer", "server"] {
            let _ = self.fetched.get_or_create(&SourceLabel { source });
        }
    }

    /// Moves the counters by what the worker counted since the last scrape.
    fn refresh(&self, now: &TransferReport) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let more = |now: u64, then: u64| now.saturating_sub(then);
        self.fetched
            .get_or_create(&SourceLabel { source: "peer" })
            .inc_by(more(now.peer_bytes, last.peer_bytes));
        self.fetched
            .get_or_create(&SourceLabel { source: "server" })
            .inc_by(more(now.server_bytes, last.server_bytes));
        self.served
            .inc_by(more(now.served_bytes, last.served_bytes));
        self.peer_failures
            .inc_by(more(now.peer_failures, last.peer_failures));
        self.quic_bytes
            .inc_by(more(now.peer_quic_bytes, last.peer_quic_bytes));
        *last = *now;
    }
}

/// The directory-cache metrics.
#[derive(Default)]
struct CacheMetrics {
    hits: Counter,
    misses: Counter,
    subtree_hits: Counter,
    evictions: Counter,
    bytes: Gauge,
    capacity: Gauge,
    entries: Gauge,
    /// The counts at the last scrape.
    last: Mutex<DirCacheReport>,
}

impl CacheMetrics {
    fn register(&self, registry: &mut Registry) {
        let counters = [
            ("kiln_worker_dircache_hits", "Input roots laid out from the directory cache", &self.hits),
            ("kiln_worker_dircache_misses", "Input roots fetched and built", &self.misses),
            (
                "kiln_worker_dircache_subtree_hits",
                "Subtrees of missed input roots linked from a cache entry",
                &self.subtree_hits,
            ),
            (
                "kiln_worker_dircache_evictions",
                "Directory-cache entries evicted (by the cap, or because an action changed one of their files)",
                &self.evictions,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        let gauges = [
            (
                "kiln_worker_dircache_bytes",
                "Bytes the directory-cache entries are charged",
                &self.bytes,
            ),
            (
                "kiln_worker_dircache_capacity_bytes",
                "The directory cache's cap (worker.dircache_bytes)",
                &self.capacity,
            ),
            (
                "kiln_worker_dircache_entries",
                "Entries in the directory cache",
                &self.entries,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
    }

    /// Moves the counters by what the cache counted since the last scrape.
    fn refresh(&self, now: &DirCacheReport) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        self.hits.inc_by(now.hits.saturating_sub(last.hits));
        self.misses.inc_by(now.misses.saturating_sub(last.misses));
        self.subtree_hits
            .inc_by(now.subtree_hits.saturating_sub(last.subtree_hits));
        self.evictions
            .inc_by(now.evictions.saturating_sub(last.evictions));
        self.bytes.set(now.bytes as i64);
        self.capacity.set(now.capacity as i64);
        self.entries.set(now.entries as i64);
        *last = *now;
    }
}

struct WorkerAdmin {
    registry: Registry,
    cache: CacheMetrics,
    probe: CacheProbe,
    transfers: TransferMetrics,
    transfer_probe: TransferProbe,
}

/// Starts the listener on `listen` (plain HTTP); returns the address it bound.
pub async fn start(
    listen: SocketAddr,
    metrics: Arc<Metrics>,
    probe: CacheProbe,
    transfer_probe: TransferProbe,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let cache = CacheMetrics::default();
    if probe().is_some() {
        cache.register(&mut registry);
    }
    let transfers = TransferMetrics::default();
    transfers.register(&mut registry);
    let state = Arc::new(WorkerAdmin {
        registry,
        cache,
        probe,
        transfers,
        transfer_probe,
    });
    let app = Router::new()
        .route("/metrics", get(metrics_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    tokio::spawn(listener::serve(listener, app, None));
    Ok(addr)
}

async fn metrics_page(State(state): State<Arc<WorkerAdmin>>) -> Response {
    if let Some(report) = (state.probe)() {
        state.cache.refresh(&report);
    }
    state.transfers.refresh(&(state.transfer_probe)());
    super::encode(&state.registry)
}
