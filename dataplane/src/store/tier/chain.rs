//! Composing a chain from the configuration's tiers. A [`ChainPlan`] is made once per process
//! (it owns the memory tiers' caches, which every core shares); each core, and the control
//! plane, builds its own chain from it around its own handle to the owner shards.

use super::filesystem::Filesystem;
use super::in_flight::{InFlight, Uploads};
use super::log::{LogOptions, SmallBlobLog};
use super::memory::{Memory, MemoryCache};
use super::redis::{RedisTier, SharedBlobs};
use super::remote::{RemoteMaker, RemoteTier, Remotes};
use super::size_partition::SizePartition;
use super::{BlobEvents, BlobStore};
use crate::metrics::Metrics;
use crate::store::CasClient;
use kiln_config::chain::{visit, TierSpec};
use kiln_config::{ConfigError, StorageConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// The tiers of the configured chain, with the state they share across cores.
pub struct ChainPlan {
    tiers: Vec<TierSpec>,
    caches: BTreeMap<String, Arc<MemoryCache>>,
    /// With an in-flight tier: the uploads in progress, registered by the blob services.
    uploads: Option<Arc<Uploads>>,
    /// With a redis tier: Redis, and where blobs fetched from it are written first.
    shared: Option<Arc<SharedBlobs>>,
    /// Each grpc or shard tier's endpoints, by their list (see [`ChainPlan::reach_remotes`]).
    remotes: BTreeMap<Vec<(String, u32)>, Arc<Remotes>>,
    /// Where blobs fetched from redis and remote tiers are written first.
    layout: Option<crate::store::layout::Layout>,
    /// The small-blob logs, by name (opened by [`ChainPlan::open_logs`]).
    logs: BTreeMap<String, Arc<SmallBlobLog>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for ChainPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainPlan")
            .field("tiers", &self.tiers)
            .finish()
    }
}

impl ChainPlan {
    /// The plan for `storage.chain` (its redis tiers through `redis`).
    pub fn from_config(
        storage: &StorageConfig,
        redis: &kiln_config::RedisConfig,
        metrics: Arc<Metrics>,
    ) -> Result<ChainPlan, ConfigError> {
        // Memory hits reach the filesystem's order of use at most once a second per blob, or
        // at every hit when access times are recorded at every access.
        let tell_every = Duration::from_secs(storage.access_time_resolution_secs.min(1));
        let mut plan = ChainPlan::new(storage.resolve_chain()?, metrics, tell_every);
        let mut shared = false;
        visit(&plan.tiers, &mut |t| {
            shared |= matches!(t, TierSpec::Redis { .. })
        });
        let invalid = |why: String| ConfigError::Invalid {
            key: "redis.url".into(),
            why,
        };
        if shared {
            let redis = kiln_redis::Redis::new(redis)
                .map_err(|e| invalid(e.to_string()))?
                .ok_or_else(|| invalid("a redis tier needs [redis] url".into()))?;
            let blobs = SharedBlobs::new(redis).map_err(|e| invalid(e.to_string()))?;
            plan.shared = Some(blobs);
        }
        plan.layout = Some(crate::store::layout::Layout::cas(&storage.data_dir));
        Ok(plan)
    }

    /// Opens the chain's small-blob logs, each in `data_dir/log/NAME` (indexing what they
    /// hold); `durable`: each batch is synced before it is acknowledged. `events` hear of
    /// every blob a log lets go, besides the memory tiers.
    pub fn open_logs(
        &mut self,
        data_dir: &std::path::Path,
        durable: bool,
        events: Vec<Arc<dyn BlobEvents>>,
    ) -> Result<(), ConfigError> {
        let mut logs: BTreeMap<String, LogOptions> = BTreeMap::new();
        visit(&self.tiers, &mut |t| {
            if let TierSpec::Log {
                name,
                bytes,
                segment,
                max_blob,
            } = t
            {
                let options = logs.entry(name.clone()).or_insert(LogOptions {
                    cap: *bytes,
                    segment: *segment,
                    max_blob: *max_blob,
                    durable,
                });
                options.max_blob = options.max_blob.max(*max_blob);
            }
        });
        for (name, options) in logs {
            let dir = data_dir.join("log").join(&name);
            let mut told = self.forgetters();
            told.extend(events.iter().cloned());
            let log =
                SmallBlobLog::open(&dir, options, told, self.metrics.clone()).map_err(|e| {
                    ConfigError::Invalid {
                        key: format!("storage.tiers.{name}"),
                        why: format!("cannot open its log in {}: {e}", dir.display()),
                    }
                })?;
            self.logs.insert(name, Arc::new(log));
        }
        Ok(())
    }

    /// Makes the clients of the chain's grpc and shard tiers' endpoints (`maker`: how this
    /// process reaches a CAS endpoint).
    pub fn reach_remotes(&mut self, maker: &RemoteMaker) -> std::io::Result<()> {
        let mut lists = Vec::new();
        visit(&self.tiers, &mut |t| {
            if let TierSpec::Remote { shards } = t {
                lists.push(shards.clone());
            }
        });
        for shards in lists {
            if let std::collections::btree_map::Entry::Vacant(slot) =
                self.remotes.entry(shards.clone())
            {
                slot.insert(Remotes::new(shards, maker)?);
            }
        }
        Ok(())
    }

    /// Whether the chain has grpc or shard tiers (which need [`ChainPlan::reach_remotes`]).
    pub fn has_remotes(&self) -> bool {
        let mut any = false;
        visit(&self.tiers, &mut |t| {
            any |= matches!(t, TierSpec::Remote { .. })
        });
        any
    }

    /// The plan for resolved `tiers` (top first); memory hits are passed on to the tier below
    /// at most once per `tell_every` per blob.
    pub fn new(tiers: Vec<TierSpec>, metrics: Arc<Metrics>, tell_every: Duration) -> ChainPlan {
        let mut caches = BTreeMap::new();
        collect_caches(&tiers, tell_every, &mut caches);
        let mut in_flight = false;
        visit(&tiers, &mut |t| in_flight |= *t == TierSpec::InFlight);
        ChainPlan {
            tiers,
            caches,
            uploads: in_flight.then(|| Arc::new(Uploads::default())),
            shared: None,
            remotes: BTreeMap::new(),
            layout: None,
            logs: BTreeMap::new(),
            metrics,
        }
    }

    /// The chain, reaching the owner shards through `cas`.
    pub fn build(&self, cas: &CasClient) -> Arc<dyn BlobStore> {
        let filesystem: Arc<dyn BlobStore> = Arc::new(Filesystem::new(cas.clone()));
        self.build_list(&self.tiers, &filesystem, cas)
    }

    fn build_list(
        &self,
        tiers: &[TierSpec],
        filesystem: &Arc<dyn BlobStore>,
        cas: &CasClient,
    ) -> Arc<dyn BlobStore> {
        // Resolution guarantees a store at the end; built bottom up.
        let mut below: Option<Arc<dyn BlobStore>> = None;
        for tier in tiers.iter().rev() {
            below = Some(match (tier, below.take()) {
                (TierSpec::Filesystem, _) => filesystem.clone(),
                (TierSpec::Log { name, .. }, _) => match self.logs.get(name) {
                    Some(log) => log.clone(),
                    None => filesystem.clone(),
                },
                (
                    TierSpec::SizePartition {
                        threshold,
                        small,
                        large,
                    },
                    _,
                ) => Arc::new(SizePartition::new(
                    *threshold,
                    self.build_list(small, filesystem, cas),
                    self.build_list(large, filesystem, cas),
                )),
                (TierSpec::Memory { name, .. }, Some(inner)) => match self.caches.get(name) {
                    Some(cache) => {
                        Arc::new(Memory::new(cache.clone(), inner, self.metrics.clone()))
                    }
                    None => inner,
                },
                (TierSpec::InFlight, Some(inner)) => match &self.uploads {
                    Some(uploads) => {
                        Arc::new(InFlight::new(uploads.clone(), inner, self.metrics.clone()))
                    }
                    None => inner,
                },
                (TierSpec::Redis { max_blob }, Some(inner)) => match (&self.shared, &self.layout) {
                    (Some(blobs), Some(layout)) => Arc::new(RedisTier::new(
                        blobs.clone(),
                        inner,
                        *max_blob,
                        cas.clone(),
                        layout.clone(),
                        self.metrics.clone(),
                    )),
                    _ => inner,
                },
                (TierSpec::Remote { shards }, Some(inner)) => {
                    match (self.remotes.get(shards), &self.layout) {
                        (Some(remotes), Some(layout)) => Arc::new(RemoteTier::new(
                            remotes.clone(),
                            inner,
                            cas.clone(),
                            layout.clone(),
                            self.metrics.clone(),
                        )),
                        _ => inner,
                    }
                }
                (
                    TierSpec::Memory { .. }
                    | TierSpec::InFlight
                    | TierSpec::Redis { .. }
                    | TierSpec::Remote { .. },
                    None,
                ) => filesystem.clone(),
            });
        }
        below.unwrap_or_else(|| filesystem.clone())
    }

    /// The small-blob log called `name`, once opened.
    #[cfg(test)]
    pub(crate) fn log(&self, name: &str) -> Option<Arc<SmallBlobLog>> {
        self.logs.get(name).cloned()
    }

    /// What the filesystem tier tells when a blob leaves it: every memory tier's cache.
    pub fn forgetters(&self) -> Vec<Arc<dyn BlobEvents>> {
        self.caches
            .values()
            .map(|c| c.clone() as Arc<dyn BlobEvents>)
            .collect()
    }

    /// Where ByteStream uploads register for readers to follow them (`None`: the chain has
    /// no in-flight tier).
    pub fn uploads(&self) -> Option<Arc<Uploads>> {
        self.uploads.clone()
    }

    /// Bytes held by all memory tiers.
    pub fn memory_bytes(&self) -> u64 {
        self.caches.values().map(|c| c.weighted_size()).sum()
    }

    /// The memory tiers' combined budget.
    pub fn memory_capacity(&self) -> u64 {
        let mut total = 0u64;
        let mut seen = std::collections::BTreeSet::new();
        visit(&self.tiers, &mut |t| {
            if let TierSpec::Memory { name, bytes, .. } = t {
                if seen.insert(name.clone()) {
                    total = total.saturating_add(*bytes);
                }
            }
        });
        total
    }

    /// The largest blob any memory tier keeps (0: none): readers read blobs up to it whole,
    /// so that a memory tier can keep them.
    pub fn largest_cached_blob(&self) -> u64 {
        let mut largest = 0u64;
        visit(&self.tiers, &mut |t| {
            if let TierSpec::Memory {
                bytes, max_blob, ..
            } = t
            {
                if *bytes > 0 {
                    largest = largest.max(*max_blob);
                }
            }
        });
        largest
    }
}

/// One cache per memory tier name with a budget.
fn collect_caches(
    tiers: &[TierSpec],
    tell_every: Duration,
    caches: &mut BTreeMap<String, Arc<MemoryCache>>,
) {
    visit(tiers, &mut |t| {
        if let TierSpec::Memory {
            name,
            bytes,
            max_blob,
        } = t
        {
            if *bytes > 0 && *max_blob > 0 && !caches.contains_key(name) {
                let cache = MemoryCache::new(*bytes, *max_blob).telling_every(tell_every);
                caches.insert(name.clone(), Arc::new(cache));
            }
        }
    });
}
