//! Starting and stopping the data plane: open the store (scan the disk), bind one socket per
//! shard on the shared port, start a pinned executor per shard running its owner and its
//! accept loop, and on shutdown stop accepting, let in-flight calls finish, then stop the
//! owners.

use crate::grpc::{serve_connection, CallHandler, Http2Settings, PeerIdentity};
use crate::metrics::Metrics;
use crate::runtime::{bind_reuseport_group, Backend, Runtime};
use crate::service::{BlobLimits, BlobServices, ControlLink, ZstdSettings};
use crate::shutdown::{Drain, Shutdown, ShutdownWatch};
use crate::slots::Slots;
use crate::store::accounting::Accounting;
use crate::store::durable;
use crate::store::group_commit::GroupCommit;
use crate::store::layout::Layout;
use crate::store::owner::{Owner, StoreSettings};
use crate::store::rebuild::{self, PendingDir};
use crate::store::scan::{scan, ScanReport, ShardEntries, TreeKind};
use crate::store::snapshot;
use crate::store::snapshot::DirKey;
use crate::store::tier::in_flight::Uploads;
use crate::store::tier::{BlobEvents, BlobStore, ChainPlan};
use crate::store::{CasClient, ShardQueues};
use crate::tls::TlsAccept;
use futures::future::{select, Either};
use kiln_config::Config;
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Number of shards for a configuration: `server.shards`, or one per core.
pub fn shard_count(config: &Config) -> usize {
    match config.server.shards {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// The smallest upload written with direct I/O, when configured and when `backend` can write
/// the CAS's temp files that way (tried once here; the log says which).
fn direct_io(config: &Config, backend: &dyn Backend, layout: &Layout) -> Option<u64> {
    let min = config.storage.direct_io_min_bytes;
    if min.as_u64() == 0 {
        return None;
    }
    match backend.direct_writes(layout.tmp_dir()) {
        Ok(()) => {
            info!("uploads of {min} or more are written with direct I/O");
            Some(min.as_u64())
        }
        Err(why) => {
            info!("uploads are written through the page cache (no direct I/O: {why})");
            None
        }
    }
}

/// The CAS, opened and scanned but not yet served.
pub struct OpenedStore {
    cas: CasClient,
    chain: Arc<ChainPlan>,
    /// Blob directories the scan left to the background rebuild.
    pending: Vec<PendingDir>,
    /// Whether [`DataPlane::start`] starts that rebuild.
    rebuild: bool,
    queues: ShardQueues,
    entries: ShardEntries,
    accounting: Arc<Accounting>,
    layout: Layout,
    report: ScanReport,
    /// Told of blobs entering and leaving the store, besides the chain's caches.
    watchers: Vec<Arc<dyn BlobEvents>>,
}

impl OpenedStore {
    /// Creates the data directory if needed and indexes what is on disk.
    pub fn open(config: &Config, shards: usize, metrics: Arc<Metrics>) -> io::Result<OpenedStore> {
        OpenedStore::open_with(config, shards, metrics, None)
    }

    /// [`OpenedStore::open`], reaching the chain's grpc and shard tiers' endpoints with
    /// `remotes` (a chain that has such tiers needs it).
    pub fn open_with(
        config: &Config,
        shards: usize,
        metrics: Arc<Metrics>,
        remotes: Option<crate::store::tier::remote::RemoteMaker>,
    ) -> io::Result<OpenedStore> {
        let layout = Layout::cas(&config.storage.data_dir);
        let mut chain = ChainPlan::from_config(&config.storage, &config.redis, metrics.clone())
            .map_err(io::Error::other)?;
        match (chain.has_remotes(), &remotes) {
            (false, _) => {}
            (true, Some(maker)) => chain.reach_remotes(maker)?,
            (true, None) => {
                return Err(io::Error::other(
                    "storage.chain has grpc or shard tiers, which only `kiln serve` runs",
                ))
            }
        }
        let accounting = Arc::new(Accounting::new(config.storage.disk_bytes.as_u64(), shards));
        // A blob a log lets go counts as a removal from the store (see Accounting::removals).
        chain
            .open_logs(
                &config.storage.data_dir,
                config.storage.fsync,
                vec![accounting.clone()],
            )
            .map_err(io::Error::other)?;
        let chain = Arc::new(chain);
        let (cas, queues) = CasClient::new(
            shards,
            config.server.shard_queue_depth,
            metrics,
            accounting.clone(),
        );
        let threads = shards.clamp(1, 16);
        // Every blob directory is left to the background rebuild, which loads the snapshot.
        let (entries, report, pending) = scan(
            &layout,
            TreeKind::Blobs,
            shards,
            threads,
            None,
            true,
            |key| cas.owner_of(&key.digest),
        )?;
        Ok(OpenedStore {
            cas,
            chain,
            queues,
            entries,
            accounting,
            layout,
            report,
            pending,
            rebuild: true,
            watchers: Vec::new(),
        })
    }

    /// Tells `watcher` of every blob committed or found by the background rebuild from now
    /// on, and of every blob that leaves the store (a worker's record of what it holds).
    pub fn watch(&mut self, watcher: Arc<dyn BlobEvents>) {
        self.watchers.push(watcher);
    }

    /// Leaves the rebuild of the directories the scan did not index to the caller (who lists
    /// and delivers them with [`crate::store::rebuild`] when it chooses): for tests of what the
    /// server answers meanwhile.
    pub fn hold_rebuild(&mut self) -> Vec<PendingDir> {
        self.rebuild = false;
        self.pending.clone()
    }

    /// The handle the control plane uses to reach the CAS.
    pub fn cas(&self) -> CasClient {
        self.cas.clone()
    }

    /// The chain of tiers for the control plane (reaching the shards through [`Self::cas`]).
    pub fn chain(&self) -> Arc<dyn BlobStore> {
        self.chain.build(&self.cas)
    }

    /// The configured tiers, with the state they share.
    pub fn chain_plan(&self) -> Arc<ChainPlan> {
        self.chain.clone()
    }

    /// What the start-up scan found.
    pub fn report(&self) -> &ScanReport {
        &self.report
    }
}

/// A running data plane.
pub struct DataPlane {
    addr: SocketAddr,
    shards: usize,
    backend: &'static str,
    shutdown: Shutdown,
    stop_owners: Shutdown,
    drained: Option<Drain>,
    threads: Vec<std::thread::JoinHandle<()>>,
    cas: CasClient,
    chain: Arc<ChainPlan>,
    layout: Layout,
    /// Each owner's blobs when it stopped, for the index snapshot.
    stopped_owners: Arc<Mutex<Vec<crate::store::owner::Stopped>>>,
    /// Group commit's limit, when it is on.
    group_commit_max: Option<u64>,
}

impl DataPlane {
    /// Starts one shard per queue of `store` on `backend`, listening on `server.listen`.
    pub fn start(
        config: &Config,
        store: OpenedStore,
        backend: Arc<dyn Backend>,
        control: Option<ControlLink>,
        tls: Option<TlsAccept>,
        policy: Arc<kiln_auth::Policy>,
    ) -> io::Result<DataPlane> {
        let shards = store.queues.0.len();
        let sockets = bind_reuseport_group(config.server.listen, shards, 4096)?;
        let addr = sockets[0].local_addr()?;
        let shutdown = Shutdown::new();
        let stop_owners = Shutdown::new();
        let drained = Drain::new();
        let stopped_owners = Arc::new(Mutex::new(Vec::with_capacity(shards)));
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let h2 = Http2Settings::from_config(&config.server);
        let slots = Slots::new(config.server.max_connections);
        // Group commit is on when it has a limit: its thread and the uploads' data syncs follow.
        let group_commit_max = durable::group_commit_max(config);
        if config.storage.fsync && config.storage.group_commit && group_commit_max.is_none() {
            warn!("storage.group_commit is on, but this system's syncfs cannot make a group of commits durable (Linux 5.8 or later needed): each blob syncs its own file and directory");
        }
        let group_commit_thread = group_commit_max
            .map(|_| {
                GroupCommit::start(
                    store.layout.tree_dir(),
                    store.accounting.clone(),
                    store.cas.metrics().clone(),
                )
                .map(Arc::new)
            })
            .transpose()?;
        let store_settings = StoreSettings {
            fsync: config.storage.fsync,
            group_commit: group_commit_thread,
            atime_resolution: Duration::from_secs(config.storage.access_time_resolution_secs),
            upload_expiry: Duration::from_secs(config.storage.upload_expiry_secs),
            max_parked: config.storage.max_parked_uploads,
            max_pending_atimes: config.storage.max_pending_access_times,
            events: store
                .chain
                .forgetters()
                .into_iter()
                .chain(store.watchers.iter().cloned())
                .collect(),
        };
        let direct_io_min = direct_io(config, &*backend, &store.layout);
        let limits = BlobLimits {
            max_batch_total: config.server.max_batch_total_size_bytes.as_u64(),
            read_chunk: config.server.read_chunk_bytes.as_u64() as usize,
            inline_read: store.chain.largest_cached_blob(),
            cas_capacity: config.storage.disk_bytes.as_u64(),
            fsync: config.storage.fsync,
            group_commit_max,
            direct_io_min,
            stalled_upload: (config.server.stalled_upload_secs > 0)
                .then(|| Duration::from_secs(config.server.stalled_upload_secs)),
            zstd: config.compression.zstd.then(|| ZstdSettings {
                level: config.compression.level,
                max_window_log: config.compression.max_window_log,
                decoders: ZstdSettings::decoder_slots(config.compression.max_window_log),
                frames: Arc::new(crate::service::frames::FrameCache::new(
                    config.compression.frame_cache_bytes.as_u64(),
                    store.cas.metrics().clone(),
                )),
            }),
            held_uploads: crate::slots::Slots::new(crate::service::HELD_UPLOAD_BYTES),
        };
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut threads = Vec::with_capacity(shards);
        let OpenedStore {
            cas,
            chain,
            queues,
            entries,
            accounting,
            layout,
            pending,
            rebuild,
            ..
        } = store;
        let pending_keys: Arc<HashSet<DirKey>> =
            Arc::new(pending.iter().map(|d| d.key.clone()).collect());
        for (index, ((queue, entries), socket)) in
            queues.0.into_iter().zip(entries).zip(sockets).enumerate()
        {
            let shard = ShardSpec {
                index,
                queue,
                entries,
                socket,
                accounting: accounting.clone(),
                layout: layout.clone(),
                cas: cas.for_shard(index),
                chain: chain.build(&cas.for_shard(index)),
                uploads: chain.uploads(),
                pending: pending_keys.clone(),
                store_settings: store_settings.clone(),
                limits: limits.clone(),
                h2: h2.clone(),
                slots: slots.clone(),
                control: control.clone(),
                tls: tls.clone(),
                policy: policy.clone(),
                shutdown: shutdown.watch(),
                stop_owners: stop_owners.watch(),
                drained: drained.guard(),
                ready: ready_tx.clone(),
                stopped_owners: stopped_owners.clone(),
            };
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            threads.push(backend.start_shard(
                format!("kiln-shard-{index}"),
                core,
                Box::new(move |runtime| Box::pin(shard.run(runtime))),
            )?);
        }
        drop(ready_tx);
        let mut plane = DataPlane {
            addr,
            shards,
            backend: backend.name(),
            shutdown,
            stop_owners,
            drained: Some(drained),
            threads,
            cas,
            chain,
            layout: layout.clone(),
            stopped_owners,
            group_commit_max,
        };
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    plane.abort();
                    return Err(io::Error::other(e));
                }
                Err(_) => {
                    plane.abort();
                    return Err(io::Error::other(
                        "a data-plane shard failed to start (see the log)",
                    ));
                }
            }
        }
        if rebuild {
            let snapshot_file = plane.layout.index_file();
            if let Err(e) = rebuild::start(
                pending,
                snapshot_file,
                plane.cas.clone(),
                shards.clamp(1, 4),
            ) {
                plane.abort();
                return Err(e);
            }
        }
        Ok(plane)
    }

    /// The address every shard listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The largest blob whose data group commit's sync covers (`None`: group commit is off,
    /// and every durable blob syncs its own data); for writers beside the blob services.
    pub fn group_commit_max(&self) -> Option<u64> {
        self.group_commit_max
    }

    /// The backend's name.
    pub fn backend(&self) -> &'static str {
        self.backend
    }

    /// The CAS handle.
    pub fn cas(&self) -> CasClient {
        self.cas.clone()
    }

    /// The configured tiers, with the state they share (the memory tiers' caches).
    pub fn chain_plan(&self) -> Arc<ChainPlan> {
        self.chain.clone()
    }

    /// Stops accepting and sends GOAWAY on every connection; returns a future that completes
    /// when every in-flight call has finished.
    pub fn begin_shutdown(&mut self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.shutdown.trigger();
        let drained = self.drained.take();
        async move {
            if let Some(d) = drained {
                d.wait().await;
            }
        }
    }

    /// Stops the owners (after [`DataPlane::begin_shutdown`] drained, or its grace expired),
    /// joins the shard threads, and persists the index for the next start (see
    /// [`crate::store::snapshot`]) once every owner has stopped cleanly.
    pub fn finish_shutdown(mut self) {
        self.abort();
        let owners = std::mem::take(&mut *lock(&self.stopped_owners));
        if owners.len() != self.shards {
            warn!(
                stopped = owners.len(),
                shards = self.shards,
                "not every owner stopped cleanly; no index snapshot (the next start scans)"
            );
            return;
        }
        let started = std::time::Instant::now();
        // The snapshot is made durable; the blobs it lists must be too (with storage.fsync
        // off they may still be in the page cache).
        if let Err(e) = crate::store::durable::sync_filesystem(self.layout.tree_dir()) {
            warn!(error = %e, "cannot sync the CAS's filesystem; no index snapshot (the next start scans)");
            return;
        }
        let mut pending = std::collections::HashSet::new();
        let groups = owners
            .into_iter()
            .map(|stopped| {
                pending.extend(stopped.pending);
                stopped.blobs
            })
            .collect();
        let mut snapshot = snapshot::stamp(&self.layout, groups);
        // Directories the background rebuild had not delivered yet (a stop soon after the
        // start) keep the listing the start found for them, where they are unchanged.
        let carried = if pending.is_empty() {
            0
        } else {
            snapshot::load(&self.layout.index_file()).map_or(0, |previous| {
                snapshot::carry_over(&self.layout, &mut snapshot, previous, &pending)
            })
        };
        let blobs: usize = snapshot.values().map(|d| d.blobs.len()).sum();
        match snapshot::write(&self.layout.index_file(), &snapshot) {
            Ok(()) => info!(
                blobs,
                directories = snapshot.len(),
                carried_over = carried,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "index snapshot written"
            ),
            Err(e) => warn!(error = %e, "cannot write the index snapshot; the next start scans"),
        }
    }

    fn abort(&mut self) {
        self.shutdown.trigger();
        self.stop_owners.trigger();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Everything one shard thread needs.
struct ShardSpec {
    index: usize,
    queue: async_channel::Receiver<crate::store::commands::Command>,
    entries: Vec<(kiln_reapi::digest::BlobKey, crate::store::index::Entry)>,
    /// Directories whose listing the background rebuild has yet to deliver.
    pending: Arc<HashSet<DirKey>>,
    socket: std::net::TcpListener,
    accounting: Arc<Accounting>,
    layout: Layout,
    cas: CasClient,
    chain: Arc<dyn BlobStore>,
    uploads: Option<Arc<Uploads>>,
    store_settings: StoreSettings,
    limits: BlobLimits,
    h2: Http2Settings,
    slots: Arc<Slots>,
    control: Option<ControlLink>,
    tls: Option<TlsAccept>,
    policy: Arc<kiln_auth::Policy>,
    shutdown: ShutdownWatch,
    stop_owners: ShutdownWatch,
    drained: Option<crate::shutdown::DrainGuard>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    stopped_owners: Arc<Mutex<Vec<crate::store::owner::Stopped>>>,
}

impl ShardSpec {
    async fn run(self, runtime: Rc<dyn Runtime>) {
        let ShardSpec {
            index,
            queue,
            entries,
            pending,
            socket,
            accounting,
            layout,
            cas,
            chain,
            uploads,
            store_settings,
            limits,
            h2,
            slots,
            control,
            tls,
            policy,
            shutdown,
            stop_owners,
            drained,
            ready,
            stopped_owners,
        } = self;
        let owner = match Owner::new(
            index,
            runtime.clone(),
            layout.clone(),
            store_settings,
            entries,
            accounting,
            cas.clone(),
        ) {
            Ok(owner) => {
                owner.await_listings(&pending);
                owner
            }
            Err(e) => {
                let _ = ready.send(Err(format!(
                    "shard {index}: cannot start its file thread: {e}"
                )));
                return;
            }
        };
        let (owner_done_tx, owner_done) = futures::channel::oneshot::channel::<()>();
        {
            let stop = stop_owners.clone();
            runtime.spawn(Box::pin(async move {
                let blobs = owner.run(queue, stop).await;
                lock(&stopped_owners).push(blobs);
                let _ = owner_done_tx.send(());
            }));
        }
        let listener = match runtime.listener(socket) {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("shard {index}: cannot listen: {e}")));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let metrics = cas.metrics().clone();
        let services: Rc<dyn CallHandler> = BlobServices::new(
            runtime.clone(),
            cas,
            chain,
            uploads,
            layout,
            limits,
            control,
        );
        let h2 = Rc::new(h2);
        let connections = Drain::new();
        let mut stopping = Box::pin(shutdown.wait());
        loop {
            match select(listener.accept(), stopping.as_mut()).await {
                Either::Left((Ok((io, peer)), _)) => {
                    let Some(slot) = slots.take() else {
                        metrics.connections_refused.inc();
                        debug!(%peer, "connection closed at once: server.max_connections are open");
                        drop(io);
                        continue;
                    };
                    let guard = connections.guard();
                    let (runtime2, h2, services, shutdown, metrics, tls, policy) = (
                        runtime.clone(),
                        h2.clone(),
                        services.clone(),
                        shutdown.clone(),
                        metrics.clone(),
                        tls.clone(),
                        policy.clone(),
                    );
                    runtime.spawn(Box::pin(async move {
                        let (io, certificate) = match &tls {
                            None => (io, None),
                            Some(tls) => match tls.accept(&runtime2, io).await {
                                Ok(accepted) => accepted,
                                Err(e) => {
                                    metrics.tls_handshake_failures.inc();
                                    debug!(%peer, error = %e, "TLS handshake failed");
                                    return;
                                }
                            },
                        };
                        let identity = PeerIdentity::new(policy, certificate);
                        serve_connection(
                            runtime2, io, peer, identity, h2, services, shutdown, metrics,
                        )
                        .await;
                        drop(slot);
                        drop(guard);
                    }));
                }
                Either::Left((Err(e), _)) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(shard = index, error = %e, "accept failed");
                    runtime.sleep(Duration::from_millis(50)).await;
                }
                Either::Right(_) => break,
            }
        }
        listener.stop();
        drop(listener);
        info!(
            shard = index,
            "stopped accepting; finishing in-flight calls"
        );
        let _ = select(Box::pin(connections.wait()), Box::pin(stop_owners.wait())).await;
        drop(drained);
        stop_owners.wait().await;
        let _ = owner_done.await;
    }
}

/// Locks a mutex, whether or not another thread panicked holding it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
