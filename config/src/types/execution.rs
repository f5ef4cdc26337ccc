//! The scheduler: `[execution]`, its platform properties and placement weights.

use crate::defaults as d;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a platform property of an action is matched against workers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PropertyKind {
    /// The worker must offer exactly this value (the default for undeclared properties).
    Exact,
    /// A number: the worker's value is a capacity, and each running action consumes what it
    /// asks for (`cores = "4"` on a worker offering 16 runs at most four such at once).
    Minimum,
    /// Not used for matching.
    Ignore,
}

/// How placement weighs what a free worker holds of an action: the worker with the highest
/// sum takes it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementWeights {
    /// The worker's directory cache holds the action's input root.
    pub input_root: f64,
    /// Times the share (0 to 1) of the input tree's bytes under directories its cache holds.
    pub input_tree: f64,
    /// Times the share (0 to 1) of the input files' bytes its CAS holds.
    pub input_blobs: f64,
    /// Times the share (0 to 1) of its slots in use, subtracted.
    pub load: f64,
}

impl Default for PlacementWeights {
    fn default() -> PlacementWeights {
        PlacementWeights {
            input_root: 8.0,
            input_tree: 4.0,
            input_blobs: 2.0,
            load: 1.0,
        }
    }
}

/// The scheduler.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Accept Execute calls and run the scheduler and worker API.
    pub enabled: bool,
    /// Timeout for actions that set none (seconds).
    pub default_timeout_secs: u64,
    /// Cap on any action's timeout (seconds).
    pub max_timeout_secs: u64,
    /// Times an action is re-run after its worker disappears (never after its own failure).
    pub max_retries: u32,
    /// Also store results with a non-zero exit code in the action cache.
    pub cache_failed_results: bool,
    /// How often workers send keep-alives (seconds).
    pub keepalive_secs: u64,
    /// A worker silent for this long is declared lost and its actions re-queued (seconds).
    pub worker_timeout_secs: u64,
    /// Bound on queued actions; more get RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// A queued action that no connected worker could run fails with FAILED_PRECONDITION
    /// after this long (seconds; 0 waits for a matching worker forever).
    pub unserved_timeout_secs: u64,
    /// Finished operations stay visible to WaitExecution/GetOperation this long (seconds).
    pub completed_retention_secs: u64,
    /// At most this many finished operations are kept for WaitExecution/GetOperation.
    pub max_completed_operations: usize,
    /// Share of the CAS that inputs of running actions may pin against eviction (percent).
    pub pin_budget_percent: u8,
    /// Most distinct digests (files and directories) in one action's input tree.
    pub max_input_digests: usize,
    /// How long an action may wait for a busy worker whose directory cache holds its input
    /// root before it goes to another free worker (milliseconds).
    pub locality_wait_ms: u64,
    /// Directories remembered per worker for placement (its directory cache's entries and
    /// every directory inside them).
    #[serde(alias = "max_cached_roots_per_worker")]
    pub max_cached_dirs_per_worker: usize,
    /// How placement weighs what each free worker holds of an action.
    pub placement_weights: PlacementWeights,
    /// Memory for the facts "worker W holds blob B" that workers serving their CAS to peers
    /// report (about 128 bytes each); past it the oldest facts are dropped.
    pub locality_map_bytes: ByteSize,
    /// How each platform property is matched; undeclared properties match exactly.
    pub properties: BTreeMap<String, PropertyKind>,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            enabled: d::yes(),
            default_timeout_secs: 3600,
            max_timeout_secs: 4 * 3600,
            max_retries: 3,
            cache_failed_results: false,
            keepalive_secs: 5,
            worker_timeout_secs: 20,
            max_queued: 100_000,
            unserved_timeout_secs: 300,
            completed_retention_secs: 600,
            max_completed_operations: 50_000,
            pin_budget_percent: 50,
            max_input_digests: 16_000_000,
            locality_wait_ms: 100,
            max_cached_dirs_per_worker: 100_000,
            placement_weights: PlacementWeights::default(),
            locality_map_bytes: ByteSize::mib(256),
            properties: BTreeMap::new(),
        }
    }
}
