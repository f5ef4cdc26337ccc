//! What the workers report of their directory caches, as metrics of the server: counters
//! of input roots laid out from the cache or not (`kiln_worker_dircache_hits_total`,
//! `kiln_worker_dircache_misses_total`) and the caches' sizes, each labelled by worker; and
//! where the scheduler placed actions, by reason (`kiln_scheduler_placements_total`).
//!
//! A worker's counts run from its own start; the server's counters move by what each report
//! adds to the last one it saw from that worker's run, so they only grow (a worker that
//! restarted reports a new run, whose counts are all new).

use crate::execution::ExecutionCore;
use crate::scheduler::locality::{Placements, Reason};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Mutex;

/// Label of a worker.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    /// The worker's name.
    pub worker: String,
}

/// Label of a placement reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `input_root`, `load` or `holder_busy`.
    pub reason: &'static str,
}

/// The workers' directory-cache metrics, and placements.
#[derive(Default)]
pub struct WorkerGauges {
    placements: Family<ReasonLabel, Counter>,
    /// The scheduler's placement counts at the last refresh.
    placed: Mutex<Placements>,
    hits: Family<WorkerLabel, Counter>,
    misses: Family<WorkerLabel, Counter>,
    bytes: Family<WorkerLabel, Gauge>,
    entries: Family<WorkerLabel, Gauge>,
    /// Each worker's last reported run, hits and misses.
    last: Mutex<HashMap<String, Seen>>,
}

/// A worker's counts as last seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Seen {
    run: u64,
    hits: u64,
    misses: u64,
}

/// What the counters move by when a worker's counts go from `last` to `now`: the increase
/// within one run; everything, in a new run.
fn added(last: Seen, now: Seen) -> (u64, u64) {
    if last.run != now.run {
        return (now.hits, now.misses);
    }
    (
        now.hits.saturating_sub(last.hits),
        now.misses.saturating_sub(last.misses),
    )
}

impl WorkerGauges {
    /// Adds the metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_scheduler_placements",
            "Actions placed on a worker, by why that worker: input_root (its directory cache holds the action's input root), load (no worker holds it: the least loaded), holder_busy (the holder stayed busy past execution.locality_wait_ms)",
            self.placements.clone(),
        );
        for reason in Reason::ALL {
            let _ = self.placements.get_or_create(&ReasonLabel {
                reason: reason.name(),
            });
        }
        registry.register(
            "kiln_worker_dircache_hits",
            "Input roots a worker laid out from its directory cache",
            self.hits.clone(),
        );
        registry.register(
            "kiln_worker_dircache_misses",
            "Input roots a worker with a directory cache had to fetch and build",
            self.misses.clone(),
        );
        registry.register(
            "kiln_worker_dircache_bytes",
            "Bytes a worker's directory-cache entries are charged",
            self.bytes.clone(),
        );
        registry.register(
            "kiln_worker_dircache_entries",
            "Entries in a worker's directory cache",
            self.entries.clone(),
        );
    }

    /// Takes in the connected workers' last reports.
    pub fn refresh(&self, execution: &ExecutionCore) {
        // Read under the lock: two scrapes at once must not both count the same placements.
        let mut placed = self.placed.lock().unwrap_or_else(|p| p.into_inner());
        let now = execution.stats().placements;
        for reason in Reason::ALL {
            let label = ReasonLabel {
                reason: reason.name(),
            };
            let added = now.of(reason).saturating_sub(placed.of(reason));
            self.placements.get_or_create(&label).inc_by(added);
        }
        *placed = now;
        drop(placed);
        let reports = execution.worker_caches();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        self.bytes.clear();
        self.entries.clear();
        for (worker, r) in reports {
            let label = WorkerLabel {
                worker: worker.clone(),
            };
            let now = Seen {
                run: r.run,
                hits: r.hits,
                misses: r.misses,
            };
            let before = last.get(&worker).copied().unwrap_or(Seen {
                run: r.run,
                ..Seen::default()
            });
            let (hits, misses) = added(before, now);
            self.hits.get_or_create(&label).inc_by(hits);
            self.misses.get_or_create(&label).inc_by(misses);
            last.insert(worker, now);
            self.bytes.get_or_create(&label).set(r.bytes as i64);
            self.entries.get_or_create(&label).set(r.entries as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{added, Seen};

    #[test]
    fn counters_follow_a_worker_through_its_restart() {
        let seen = |run, hits, misses| Seen { run, hits, misses };
        assert_eq!(added(seen(1, 0, 0), seen(1, 5, 1)), (5, 1));
        assert_eq!(added(seen(1, 5, 1), seen(1, 7, 1)), (2, 0));
        // Restarted, and as far along as before: all of it is new.
        assert_eq!(added(seen(1, 7, 1), seen(2, 7, 1)), (7, 1));
        assert_eq!(added(seen(2, 7, 1), seen(2, 7, 1)), (0, 0));
    }
}
