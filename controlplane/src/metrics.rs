//! What the control plane counts: action-cache lookups and updates by outcome, and `GetTree`'s
//! walks and cache hits.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Outcome of an action-cache request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcLabels {
    /// `get` or `update`.
    pub op: &'static str,
    /// `hit`, `miss`, `incomplete` (a miss because referenced blobs are gone), `ok`, `error`.
    pub result: &'static str,
}

/// Control-plane counters.
#[derive(Default)]
pub struct ControlMetrics {
    /// Action-cache requests by outcome.
    pub action_cache: Family<AcLabels, Counter>,
    /// Of the `get` hits, those the data plane served itself (from memory, no check due).
    pub action_cache_data_plane_hits: Counter,
    /// `GetTree` calls.
    pub get_tree_calls: Counter,
    /// Walks of a tree for `GetTree` (calls served from the tree cache, or waiting on
    /// another call's walk of the same tree, make none).
    pub get_tree_walks: Counter,
    /// Directories a walk took from the kept subtrees instead of reading them from the CAS.
    pub get_tree_kept_directories: Counter,
}

impl ControlMetrics {
    /// Fresh counters.
    pub fn new() -> Arc<ControlMetrics> {
        Arc::new(ControlMetrics::default())
    }

    /// Adds the counters to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_action_cache_requests",
            "Action-cache requests by operation and outcome",
            self.action_cache.clone(),
        );
        registry.register(
            "kiln_action_cache_data_plane_hits",
            "GetActionResult hits served by the data plane from memory, without the control plane (also counted as hits above)",
            self.action_cache_data_plane_hits.clone(),
        );
        registry.register(
            "kiln_get_tree_calls",
            "GetTree calls",
            self.get_tree_calls.clone(),
        );
        registry.register(
            "kiln_get_tree_walks",
            "Walks of a tree for GetTree (a call answered from the tree cache, or by another call's walk of the same tree, makes none)",
            self.get_tree_walks.clone(),
        );
        registry.register(
            "kiln_get_tree_kept_directories",
            "Directories a GetTree walk took from the kept subtrees (get_tree.subtree_cache_bytes) instead of the CAS",
            self.get_tree_kept_directories.clone(),
        );
    }

    /// Counts one action-cache request.
    pub fn ac(&self, op: &'static str, result: &'static str) {
        self.action_cache
            .get_or_create(&AcLabels { op, result })
            .inc();
    }

    /// Count of one outcome.
    pub fn ac_count(&self, op: &'static str, result: &'static str) -> u64 {
        self.action_cache
            .get_or_create(&AcLabels { op, result })
            .get()
    }
}
