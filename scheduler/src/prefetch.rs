//! Fetching inputs ahead. When an action must wait because every worker that could run it
//! is busy, the busy worker likely to take it — the one already holding the most bytes of
//! its inputs, one waiting action per worker — is told to fetch the rest into its CAS now,
//! while it runs what it runs ([`Command::Prefetch`]; a newer one replaces it on the
//! worker). When one of its slots frees, the action goes there
//! ([`crate::locality::Reason::Prefetched`]); if another worker frees first the action takes
//! that one and the fetch was only a warm cache. An action whose input root a worker's
//! directory cache holds is not fetched ahead: it waits for that worker.

use crate::platform::could_fit;
use crate::{Command, OpId, OpStage, Scheduler, WorkerId};
use kiln_reapi::digest::Digest;

/// Queued operations looked at for prefetching per event (the queue can be long; those
/// behind wait their turn).
const MAX_LOOKED_AT: usize = 1_000;

/// Input files (the largest first) a prefetch names at most.
const MAX_PREFETCHED: usize = 100_000;

impl<P: Clone, R> Scheduler<P, R> {
    /// Tells busy workers to fetch ahead the inputs of actions that wait for a slot.
    pub(crate) fn prefetch(&mut self) {
        let mut idle: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| !w.draining && w.prefetching.is_none() && w.busy >= w.capacity)
            .map(|(id, _)| *id)
            .collect();
        if idle.is_empty() {
            return;
        }
        idle.sort_unstable();
        let queued: Vec<OpId> = self.queue.values().take(MAX_LOOKED_AT).copied().collect();
        for op in queued {
            if idle.is_empty() {
                return;
            }
            let Some(state) = self.ops.get(&op) else {
                continue;
            };
            // An action whose input root some worker that could run it caches waits for
            // that worker (when root hits count at all): nothing to fetch ahead.
            let kinds = &self.config.kinds;
            let cached = self.config.weights.input_root > 0.0
                && state.job.input_root.as_ref().is_some_and(|root| {
                    self.workers.values().any(|w| {
                        !w.draining
                            && w.dirs.contains(root)
                            && could_fit(kinds, &state.job.requirements, &w.offer)
                    })
                });
            let waiting = matches!(state.stage, OpStage::Queued { .. })
                && state.prefetch.is_none()
                && !cached
                && !state.job.inputs.is_empty();
            if !waiting {
                continue;
            }
            let kinds = &self.config.kinds;
            let fitting: Vec<WorkerId> = idle
                .iter()
                .copied()
                .filter(|id| {
                    self.workers
                        .get(id)
                        .is_some_and(|w| could_fit(kinds, &state.job.requirements, &w.offer))
                })
                .collect();
            if fitting.is_empty() {
                continue;
            }
            let inputs = &state.job.inputs[..state.job.inputs.len().min(MAX_PREFETCHED)];
            let held = self.holders.bytes_held(inputs);
            // The worker holding most of it; ties to the lowest id.
            let chosen = fitting.into_iter().max_by(|a, b| {
                let bytes = |id| held.get(id).copied().unwrap_or(0);
                bytes(a).cmp(&bytes(b)).then(b.cmp(a))
            });
            let Some(worker) = chosen else {
                continue;
            };
            let digests: Vec<Digest> = inputs
                .iter()
                .filter(|k| !self.holders.holds(k, worker))
                .map(|k| k.digest)
                .collect();
            let serves =
                |w: &WorkerId| self.workers.get(w).is_some_and(|w| w.serves && !w.draining);
            let peers = if serves(&worker) {
                self.holders
                    .hints(worker, inputs, MAX_PREFETCHED, |w| serves(&w))
            } else {
                Vec::new()
            };
            idle.retain(|id| *id != worker);
            let payload = state.job.payload.clone();
            if let Some(state) = self.ops.get_mut(&op) {
                state.prefetch = Some(worker);
            }
            if let Some(w) = self.workers.get_mut(&worker) {
                w.prefetching = Some(op);
            }
            // A worker that holds it all already only keeps it for the action.
            if digests.is_empty() {
                continue;
            }
            self.out.push(Command::Prefetch {
                worker,
                op,
                payload,
                digests,
                peers,
            });
        }
    }

    /// `op` left the queue (placed, or finished): its worker may fetch ahead for another.
    pub(crate) fn prefetch_over(&mut self, op: OpId, worker: Option<WorkerId>) {
        if let Some(w) = worker.and_then(|w| self.workers.get_mut(&w)) {
            if w.prefetching == Some(op) {
                w.prefetching = None;
            }
        }
    }

    /// A worker left: the actions it fetched ahead for wait for another.
    pub(crate) fn prefetcher_left(&mut self, worker: WorkerId, prefetching: Option<OpId>) {
        if let Some(state) = prefetching.and_then(|op| self.ops.get_mut(&op)) {
            if state.prefetch == Some(worker) {
                state.prefetch = None;
            }
        }
    }
}
