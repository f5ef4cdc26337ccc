//! Where blobs and results are kept: `[storage]`, `[action_cache]`.

use crate::defaults as d;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The CAS: a chain of tiers (by default a memory tier over the filesystem), both capped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory holding the CAS, the action cache and upload temp files.
    pub data_dir: PathBuf,
    /// Memory tier budget (split evenly across shards).
    pub memory_bytes: ByteSize,
    /// Largest blob kept in the memory tier.
    pub memory_max_blob_bytes: ByteSize,
    /// Filesystem tier cap; the least recently used blobs are evicted above it.
    pub disk_bytes: ByteSize,
    /// fsync each blob (and its directory) before acknowledging it.
    pub fsync: bool,
    /// With `fsync`: commits made at the same time share one filesystem sync
    /// (`syncfs`, Linux) instead of each syncing its file and directory.
    pub group_commit: bool,
    /// With `group_commit`: blobs larger than this sync their own data before they join a
    /// group, so that one large blob does not hold up the small ones sharing its sync.
    pub group_commit_max_bytes: ByteSize,
    /// Uploads of at least this many bytes are written with direct I/O (O_DIRECT: to the disk
    /// without a copy into the page cache) where the runtime (glommio) and the filesystem
    /// allow it; `0` writes every upload through the page cache.
    pub direct_io_min_bytes: ByteSize,
    /// Access times are written to disk at most this often per blob (seconds).
    pub access_time_resolution_secs: u64,
    /// An interrupted upload can be resumed for this long (seconds).
    pub upload_expiry_secs: u64,
    /// Interrupted uploads kept for resumption, per shard.
    pub max_parked_uploads: usize,
    /// Access times queued for writing to blob files, per shard; past it, updates are skipped.
    pub max_pending_access_times: usize,
    /// The tiers blobs go through, top first (see [`crate::chain`]).
    pub chain: Vec<String>,
    /// Named tiers for `chain`.
    pub tiers: BTreeMap<String, crate::chain::TierConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: d::data_dir(),
            memory_bytes: d::memory_bytes(),
            memory_max_blob_bytes: d::memory_max_blob_bytes(),
            disk_bytes: d::disk_bytes(),
            fsync: d::yes(),
            group_commit: d::yes(),
            group_commit_max_bytes: d::group_commit_max_bytes(),
            direct_io_min_bytes: d::direct_io_min_bytes(),
            access_time_resolution_secs: d::access_time_resolution_secs(),
            upload_expiry_secs: d::upload_expiry_secs(),
            max_parked_uploads: d::max_parked_uploads(),
            max_pending_access_times: d::max_pending_access_times(),
            chain: crate::chain::default_chain(),
            tiers: BTreeMap::new(),
        }
    }
}

/// The action cache (stored on disk under `data_dir/ac`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ActionCacheConfig {
    /// Cap on the action cache's bytes on disk; least recently used entries are evicted above it.
    pub max_bytes: ByteSize,
    /// Largest ActionResult accepted.
    pub max_entry_bytes: ByteSize,
    /// Serve an entry only when every blob it references is in the CAS.
    pub completeness_check: bool,
    /// Copies of recently used results kept in memory (0: every hit reads its file).
    pub memory_bytes: ByteSize,
    /// Most digests one completeness check goes through (output directories, the files
    /// their trees list, what directory-format outputs' walks meet); a result that needs more
    /// is refused when stored and never served.
    pub max_check_digests: u64,
}

impl Default for ActionCacheConfig {
    fn default() -> Self {
        ActionCacheConfig {
            max_bytes: d::action_cache_bytes(),
            max_entry_bytes: d::max_action_result_bytes(),
            completeness_check: d::yes(),
            memory_bytes: d::action_cache_memory_bytes(),
            max_check_digests: d::max_check_digests(),
        }
    }
}
