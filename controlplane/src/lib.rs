//! Kiln's control plane: a tokio runtime with tonic services for every method that is not a
//! blob method (Capabilities and ActionCache now; execution later). The data plane hands these
//! calls over in-process ([`handoff`]), so clients see one endpoint.

pub mod action_cache;
pub mod admin;
pub mod asset;
pub mod auth;
pub mod capabilities;
pub mod cas_server;
pub mod chunking;
pub mod enrolment;
pub mod error;
pub mod execution;
pub mod handoff;
pub mod metrics;
pub mod temp_file;
pub mod tree;
pub use kiln_scheduler as scheduler;

use action_cache::completeness::CheckLimits;
use action_cache::{AcSettings, AcStore, ActionCache, ActionCacheService};
use admin::ServerInfo;
use capabilities::{Advertised, CapabilitiesService};
use execution::{ExecutionService, OperationsService, WorkerApiService};
use kiln_config::Config;
use kiln_dataplane::grpc::ForwardedCall;
use kiln_dataplane::service::{ControlLink, ReadyResults};
use kiln_dataplane::store::layout::Layout;
use kiln_dataplane::store::scan::ScanReport;
use kiln_dataplane::store::tier::BlobStore;
use kiln_dataplane::store::{CasClient, ChainCas};
use kiln_proto::longrunning::operations_server::OperationsServer;
use kiln_proto::reapi::action_cache_server::ActionCacheServer;
use kiln_proto::reapi::capabilities_server::CapabilitiesServer;
use kiln_proto::reapi::execution_server::ExecutionServer;
use kiln_proto::worker::worker_api_server::WorkerApiServer;
use metrics::ControlMetrics;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A running control plane.
pub struct ControlPlane {
    execution: Option<Arc<execution::ExecutionCore>>,
    runtime: tokio::runtime::Runtime,
    cas: CasClient,
    control_metrics: Arc<ControlMetrics>,
    ready: Arc<AtomicBool>,
    handoff: async_channel::Sender<ForwardedCall>,
    ac_report: ScanReport,
    action_cache: AcStore,
    /// `GetActionResult` hits the data plane may serve itself.
    ready_results: Arc<action_cache::DataPlaneHits>,
}

impl ControlPlane {
    /// Opens the action cache and starts the services on a new tokio runtime.
    pub fn start(
        config: &Config,
        cas: CasClient,
        blobs: Arc<dyn BlobStore>,
        enroller: Option<Arc<dyn enrolment::Enroller>>,
    ) -> std::io::Result<ControlPlane> {
        let control_metrics = ControlMetrics::new();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.control_plane.threads)
            .thread_name("kiln-control")
            .enable_all()
            .build()?;
        let (action_cache, ac_report) = AcStore::open(
            &config.storage.data_dir,
            AcSettings {
                max_bytes: config.action_cache.max_bytes.as_u64(),
                max_entry_bytes: config.action_cache.max_entry_bytes.as_u64(),
                fsync: config.storage.fsync,
                atime_resolution: Duration::from_secs(config.storage.access_time_resolution_secs),
                memory_bytes: config.action_cache.memory_bytes.as_u64(),
            },
        )?;
        let local = ChainCas::new(
            cas.clone(),
            blobs.clone(),
            Layout::cas(&config.storage.data_dir),
            config.storage.fsync,
        );
        let max_message = config.server.max_message_bytes.as_u64() as usize;
        let chunk_params = chunking::ChunkParams {
            avg: config.chunking.avg_chunk_size_bytes.as_u64() as u32,
            seed: config.chunking.seed,
        };
        let capabilities = CapabilitiesService::new(Advertised {
            max_batch_total_size_bytes: config.server.max_batch_total_size_bytes.as_u64(),
            max_cas_blob_size_bytes: config.storage.disk_bytes.as_u64(),
            exec_enabled: config.execution.enabled,
            zstd: config.compression.zstd,
            chunking: config.chunking.enabled.then_some(chunk_params),
        });
        let mut action_cache_core = ActionCache::new(
            action_cache.clone(),
            cas.clone(),
            Arc::new(local.clone()),
            config.action_cache.completeness_check,
            CheckLimits {
                max_tree_bytes: config.server.max_message_bytes.as_u64().max(64 << 20),
                max_digests: usize::try_from(config.action_cache.max_check_digests)
                    .unwrap_or(usize::MAX),
                recheck_after: Duration::from_secs(config.storage.access_time_resolution_secs),
            },
        );
        let redis = kiln_redis::Redis::new(&config.redis).map_err(std::io::Error::other)?;
        if let (Some(redis), true) = (redis.clone(), config.redis.action_cache) {
            let ttl = (config.redis.action_cache_ttl_secs > 0)
                .then(|| Duration::from_secs(config.redis.action_cache_ttl_secs));
            tracing::info!(redis = %redis.at(), "the action cache is shared through Redis");
            action_cache_core =
                action_cache_core.with_shared(action_cache::shared::SharedResults::new(
                    redis,
                    ttl,
                    config.action_cache.max_entry_bytes.as_u64(),
                ));
        }
        let action_cache_core = Arc::new(action_cache_core);
        let ac_service =
            ActionCacheService::new(action_cache_core.clone(), control_metrics.clone());
        let ready_results = Arc::new(action_cache::DataPlaneHits {
            cache: action_cache_core.clone(),
            metrics: control_metrics.clone(),
        });
        let execution = config.execution.enabled.then(|| {
            let _guard = runtime.enter();
            // This server's name in Redis: new at every start, so that a restarted server's
            // old self is taken over like any server that died.
            let server = uuid::Uuid::new_v4().simple().to_string();
            let shared_ops = redis
                .clone()
                .filter(|_| config.redis.operations)
                .map(|redis| execution::shared_ops::SharedOps::new(redis, server));
            let core = execution::ExecutionCore::start(
                config.execution.clone(),
                &local,
                action_cache_core.clone(),
                max_message,
                shared_ops.clone(),
            );
            if let (Some(ops), true) = (shared_ops, config.redis.take_over) {
                let lease = Duration::from_secs(config.redis.lease_secs);
                execution::farm::Farm::start(&core, ops, lease);
            }
            core
        });
        let mut routes = tonic::service::Routes::new(
            CapabilitiesServer::new(capabilities)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(
            ActionCacheServer::new(ac_service)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        )
        .add_service(cas_server::CasServer::new(
            tree::TreeService::new(
                Arc::new(local.clone()),
                tree::TreeSettings {
                    max_tree_bytes: config.get_tree.max_tree_bytes.as_u64(),
                    cache_bytes: config.get_tree.cache_bytes.as_u64(),
                    cache_ttl: Duration::from_secs(config.get_tree.cache_ttl_secs),
                    subtree_cache_bytes: config.get_tree.subtree_cache_bytes.as_u64(),
                    page_bytes: tree::PAGE_BYTES.min(max_message.saturating_sub(64 << 10).max(1)),
                    max_directory_bytes: max_message.saturating_sub(64 << 10).max(1) as u64,
                },
                control_metrics.clone(),
            ),
            chunking::ChunkService::new(
                Arc::new(local.clone()),
                chunking::ChunkSettings {
                    enabled: config.chunking.enabled,
                    params: chunk_params,
                    max_chunks: config.chunking.max_chunks,
                    max_blob_bytes: config.storage.disk_bytes.as_u64(),
                    list_cache_bytes: config.chunking.list_cache_bytes.as_u64(),
                    layout: Layout::cas(&config.storage.data_dir),
                },
            ),
            max_message,
        ));
        let assets = Arc::new(asset::AssetService::new(
            Arc::new(local.clone()),
            asset::AssetSettings {
                enabled: config.remote_asset.enabled,
                fetch_from_origin: config.remote_asset.fetch_from_origin,
                default_timeout: Duration::from_secs(config.remote_asset.default_fetch_secs),
                max_timeout: Duration::from_secs(config.remote_asset.max_fetch_secs),
                max_bytes: config
                    .remote_asset
                    .max_fetch_bytes
                    .as_u64()
                    .min(config.storage.disk_bytes.as_u64()),
                max_redirects: config.remote_asset.max_redirects,
                concurrent_fetches: config.remote_asset.concurrent_fetches,
                memory_bytes: config.remote_asset.memory_bytes.as_u64(),
                fetch_loopback: config.remote_asset.fetch_loopback,
                fetch_private_networks: config.remote_asset.fetch_private_networks,
                proxy: asset::proxy(&config.remote_asset.proxy)?,
                layout: Layout::cas(&config.storage.data_dir),
            },
        ));
        routes = routes
            .add_service(
                kiln_proto::asset::fetch_server::FetchServer::from_arc(assets.clone())
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
            .add_service(
                kiln_proto::asset::push_server::PushServer::from_arc(assets)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            );
        if let Some(core) = &execution {
            routes = routes
                .add_service(
                    ExecutionServer::new(ExecutionService::new(core.clone()))
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message),
                )
                .add_service(OperationsServer::new(OperationsService::new(core.clone())))
                .add_service(
                    WorkerApiServer::new(WorkerApiService::new(core.clone()))
                        .max_decoding_message_size(max_message)
                        .max_encoding_message_size(max_message),
                );
        }
        if let Some(e) = enroller {
            // Anyone may call it (a worker enrols before it has a certificate): a request is
            // at most a name, a token and a 64 KiB certificate request, and nothing larger is
            // read (tonic's 4 MiB default let a stranger hold megabytes per stream).
            routes = routes.add_service(
                kiln_proto::worker::enrolment_server::EnrolmentServer::new(
                    enrolment::EnrolmentService::new(e),
                )
                .max_decoding_message_size(enrolment::MAX_REQUEST_BYTES),
            );
        }
        let (handoff, queue) =
            async_channel::bounded(config.control_plane.handoff_queue_depth.max(1));
        runtime.spawn(handoff::serve(routes, queue));
        Ok(ControlPlane {
            execution,
            runtime,
            cas,
            control_metrics,
            ready: Arc::new(AtomicBool::new(false)),
            handoff,
            ac_report,
            action_cache,
            ready_results,
        })
    }

    /// The execution core, when execution is enabled.
    pub fn execution(&self) -> Option<Arc<execution::ExecutionCore>> {
        self.execution.clone()
    }

    /// The data plane's link: the hand-over, and the action results it may serve itself.
    pub fn link(&self) -> ControlLink {
        ControlLink {
            handoff: self.handoff.clone(),
            // Without in-memory copies there is never a result to serve there.
            results: self
                .action_cache
                .has_memory()
                .then(|| self.ready_results.clone() as Arc<dyn ReadyResults>),
        }
    }

    /// The runtime, for the process to wait on signals and shutdown with.
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.runtime
    }

    /// What the action cache's start-up scan found.
    pub fn action_cache_report(&self) -> &ScanReport {
        &self.ac_report
    }

    /// Entries and bytes in the action cache.
    pub fn action_cache_usage(&self) -> (usize, u64) {
        self.action_cache.usage()
    }

    /// Starts the admin listener; returns where it listens.
    pub fn start_admin(
        &self,
        listen: SocketAddr,
        info: ServerInfo,
        access: admin::Access,
    ) -> std::io::Result<SocketAddr> {
        self.runtime.block_on(admin::start(
            listen,
            info,
            self.ready.clone(),
            admin::Sources {
                metrics: self.cas.metrics().clone(),
                control: self.control_metrics.clone(),
                cas: self.cas.clone(),
                action_cache: self.action_cache.clone(),
                execution: self.execution.clone(),
            },
            access,
        ))
    }

    /// What `/readyz` reports.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Stops taking calls and waits (bounded) for running tasks.
    pub fn shutdown(self, grace: Duration) {
        self.handoff.close();
        self.runtime.shutdown_timeout(grace);
        // The runtime has stopped (a put still running on its blocking pool after the
        // timeout changes a directory, which the snapshot then leaves out): the next start
        // loads the index from here.
        match self.action_cache.write_snapshot() {
            Ok(entries) => tracing::info!(entries, "action cache index kept for the next start"),
            Err(e) => {
                tracing::warn!(error = %e, "cannot write the action cache's index snapshot; the next start scans it")
            }
        }
    }
}
