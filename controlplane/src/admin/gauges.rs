//! Values gathered at scrape time: they live in the shards (blob counts, queue depths) or in
//! the action cache, and are asked for when someone looks.

use crate::action_cache::AcStore;
use crate::execution::ExecutionCore;
use kiln_dataplane::store::tier::ChainPlan;
use kiln_dataplane::store::CasClient;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::time::{Duration, Instant};

/// Label of a shard.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabel {
    /// Shard index.
    pub shard: u32,
}

/// Totals gathered by one refresh.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gathered {
    /// CAS blobs.
    pub blobs: u64,
    /// CAS bytes on disk.
    pub bytes: u64,
    /// Memory-tier bytes.
    pub memory_bytes: u64,
    /// Uploads being written.
    pub active_uploads: u64,
    /// Uploads parked for resumption.
    pub parked_uploads: u64,
    /// Access times waiting to be written.
    pub pending_atimes: u64,
    /// Blob directories the background index rebuild has yet to deliver.
    pub pending_dirs: u64,
    /// Action-cache entries.
    pub ac_entries: u64,
    /// Action-cache bytes.
    pub ac_bytes: u64,
}

/// What the process's allocator reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllocatorStats {
    /// Bytes the program holds in live allocations.
    pub allocated: u64,
    /// Bytes the allocator keeps resident (live, fragmented and cached free pages).
    pub resident: u64,
}

/// Reads the allocator's figures; supplied by the binary that chose the allocator.
pub type AllocatorProbe = fn() -> Option<AllocatorStats>;

/// The scrape-time gauges.
pub struct Gauges {
    cas_blobs: Gauge,
    cas_bytes: Gauge,
    memory_bytes: Gauge,
    pinned_bytes: Gauge,
    staging_bytes: Gauge,
    resident: Gauge,
    allocated: Gauge,
    allocator_resident: Gauge,
    uploads_active: Gauge,
    uploads_parked: Gauge,
    pending_atimes: Gauge,
    pending_dirs: Gauge,
    queue_depth: Family<ShardLabel, Gauge>,
    ac_entries: Gauge,
    ac_bytes: Gauge,
    uptime: Gauge,
    queued: Gauge,
    running: Gauge,
    workers: Gauge,
    completed_kept: Gauge,
    workers_caches: super::worker_gauges::WorkerGauges,
}

impl Gauges {
    /// Gauges for `shards` shards.
    pub fn new(shards: usize) -> Gauges {
        let g = Gauges {
            cas_blobs: Gauge::default(),
            cas_bytes: Gauge::default(),
            memory_bytes: Gauge::default(),
            pinned_bytes: Gauge::default(),
            staging_bytes: Gauge::default(),
            resident: Gauge::default(),
            allocated: Gauge::default(),
            allocator_resident: Gauge::default(),
            uploads_active: Gauge::default(),
            uploads_parked: Gauge::default(),
            pending_atimes: Gauge::default(),
            pending_dirs: Gauge::default(),
            queue_depth: Family::default(),
            ac_entries: Gauge::default(),
            ac_bytes: Gauge::default(),
            uptime: Gauge::default(),
            queued: Gauge::default(),
            running: Gauge::default(),
            workers: Gauge::default(),
            completed_kept: Gauge::default(),
            workers_caches: Default::default(),
        };
        for shard in 0..shards {
            let _ = g.queue_depth.get_or_create(&ShardLabel {
                shard: shard as u32,
            });
        }
        g
    }

    /// Adds the gauges to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("kiln_cas_blobs", "Blobs in the CAS", self.cas_blobs.clone());
        registry.register(
            "kiln_cas_bytes",
            "Bytes of blobs in the CAS",
            self.cas_bytes.clone(),
        );
        registry.register(
            "kiln_cas_memory_bytes",
            "Bytes in the memory tier",
            self.memory_bytes.clone(),
        );
        registry.register(
            "kiln_uploads_active",
            "ByteStream uploads being written",
            self.uploads_active.clone(),
        );
        registry.register(
            "kiln_uploads_parked",
            "Interrupted uploads kept for resumption",
            self.uploads_parked.clone(),
        );
        registry.register(
            "kiln_cas_pending_access_times",
            "Access times waiting to be written to blob files (at most storage.max_pending_access_times per shard)",
            self.pending_atimes.clone(),
        );
        registry.register(
            "kiln_cas_pending_directories",
            "Blob directories whose files the background index rebuild has not delivered yet (their blobs are found by looking at their files meanwhile)",
            self.pending_dirs.clone(),
        );
        registry.register(
            "kiln_shard_queue_depth",
            "Commands waiting in each shard's queue",
            self.queue_depth.clone(),
        );
        registry.register(
            "kiln_action_cache_entries",
            "Entries in the action cache",
            self.ac_entries.clone(),
        );
        registry.register(
            "kiln_action_cache_bytes",
            "Bytes in the action cache",
            self.ac_bytes.clone(),
        );
        registry.register(
            "kiln_uptime_seconds",
            "Seconds since start",
            self.uptime.clone(),
        );
        registry.register(
            "kiln_cas_pinned_bytes",
            "Bytes of CAS blobs pinned by running or queued actions",
            self.pinned_bytes.clone(),
        );
        registry.register(
            "kiln_cas_staging_bytes",
            "Bytes held against the disk cap by uploads in progress or parked",
            self.staging_bytes.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the server process (Linux: from /proc/self/statm)",
            self.resident.clone(),
        );
        registry.register(
            "kiln_allocator_allocated_bytes",
            "Bytes in live allocations, as the allocator (jemalloc) counts them",
            self.allocated.clone(),
        );
        registry.register(
            "kiln_allocator_resident_bytes",
            "Bytes the allocator keeps resident; the excess over allocated is fragmentation and free pages not yet returned",
            self.allocator_resident.clone(),
        );
        registry.register(
            "kiln_scheduler_queued",
            "Actions waiting for a worker",
            self.queued.clone(),
        );
        registry.register(
            "kiln_scheduler_running",
            "Actions running on workers",
            self.running.clone(),
        );
        registry.register(
            "kiln_scheduler_completed_kept",
            "Finished operations kept for WaitExecution and GetOperation",
            self.completed_kept.clone(),
        );
        registry.register(
            "kiln_scheduler_workers",
            "Connected workers",
            self.workers.clone(),
        );
        self.workers_caches.register(registry);
    }

    /// Asks the shards and the action cache; a shard that does not answer within a second
    /// leaves the previous values.
    pub async fn refresh(
        &self,
        cas: &CasClient,
        chain: Option<&ChainPlan>,
        ac: &AcStore,
        execution: Option<&ExecutionCore>,
        allocator: Option<AllocatorProbe>,
        started: Instant,
    ) -> Gathered {
        if let Some(a) = allocator.and_then(|probe| probe()) {
            self.allocated.set(a.allocated as i64);
            self.allocator_resident.set(a.resident as i64);
        }
        if let Some(e) = execution {
            let s = e.stats();
            self.queued.set(s.queued as i64);
            self.running.set(s.running as i64);
            self.workers.set(s.workers as i64);
            self.completed_kept.set(s.completed_kept as i64);
            self.workers_caches.refresh(e);
        }
        self.pinned_bytes.set(cas.accounting().pinned() as i64);
        self.staging_bytes.set(cas.accounting().staging() as i64);
        if let Some(rss) = resident_bytes() {
            self.resident.set(rss as i64);
        }
        let mut out = Gathered {
            memory_bytes: chain.map_or(0, ChainPlan::memory_bytes),
            ..Gathered::default()
        };
        self.memory_bytes.set(out.memory_bytes as i64);
        if let Ok(Ok(stats)) = tokio::time::timeout(Duration::from_secs(1), cas.stats()).await {
            for s in stats {
                out.blobs += s.blobs;
                out.bytes += s.bytes;
                out.active_uploads += s.active_uploads;
                out.parked_uploads += s.parked_uploads;
                out.pending_atimes += s.pending_atimes;
                out.pending_dirs = out.pending_dirs.max(s.pending_dirs);
            }
            self.cas_blobs.set(out.blobs as i64);
            self.cas_bytes.set(out.bytes as i64);
            self.uploads_active.set(out.active_uploads as i64);
            self.uploads_parked.set(out.parked_uploads as i64);
            self.pending_atimes.set(out.pending_atimes as i64);
            self.pending_dirs.set(out.pending_dirs as i64);
        }
        for (shard, depth) in cas.queue_depths().into_iter().enumerate() {
            self.queue_depth
                .get_or_create(&ShardLabel {
                    shard: shard as u32,
                })
                .set(depth as i64);
        }
        let (entries, bytes) = ac.usage();
        out.ac_entries = entries as u64;
        out.ac_bytes = bytes;
        self.ac_entries.set(entries as i64);
        self.ac_bytes.set(bytes as i64);
        self.uptime.set(started.elapsed().as_secs() as i64);
        out
    }
}

/// The process's resident memory, from `/proc/self/statm` (pages; Linux only).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
