//! What the workers report of themselves, as metrics of the server: counters of input roots
//! laid out from the directory cache or not (`kiln_worker_dircache_hits_total`,
//! `kiln_worker_dircache_misses_total`) and the caches' sizes; bytes of inputs fetched by
//! source (`kiln_worker_fetch_bytes_total{source="peer"|"server"}`) and served to peers
//! (`kiln_worker_served_bytes_total`); each labelled by worker. Also where the scheduler
//! placed actions, by reason (`kiln_scheduler_placements_total`), and how many blob facts it
//! keeps.
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

/// Label of a worker and where its bytes came from.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    /// The worker's name.
    pub worker: String,
    /// `peer` or `server`.
    pub source: &'static str,
}

/// The workers' metrics, and placements.
#[derive(Default)]
pub struct WorkerGauges {
    placements: Family<ReasonLabel, Counter>,
    /// The scheduler's placement counts at the last refresh.
    placed: Mutex<Placements>,
    hits: Family<WorkerLabel, Counter>,
    misses: Family<WorkerLabel, Counter>,
    bytes: Family<WorkerLabel, Gauge>,
    entries: Family<WorkerLabel, Gauge>,
    fetched: Family<SourceLabel, Counter>,
    served: Family<WorkerLabel, Counter>,
    peer_failures: Family<WorkerLabel, Counter>,
    quic_bytes: Family<WorkerLabel, Counter>,
    held_blobs: Family<WorkerLabel, Gauge>,
    slots: Family<WorkerLabel, Gauge>,
    blob_facts: Gauge,
    /// Each worker's last reported counts, by worker and report (`dircache`, `transfers`).
    last: Mutex<HashMap<(String, &'static str), Seen>>,
}

/// A worker's counts (of one report) as last seen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Seen {
    run: u64,
    counts: Vec<u64>,
}

/// What the counters move by when a worker's counts go from `last` to `now`: the increase
/// within one run; everything, in a new run.
fn added(last: &Seen, now: &Seen) -> Vec<u64> {
    if last.run != now.run {
        return now.counts.clone();
    }
    now.counts
        .iter()
        .enumerate()
        .map(|(i, n)| n.saturating_sub(last.counts.get(i).copied().unwrap_or(0)))
        .collect()
}

impl WorkerGauges {
    /// Adds the metrics to `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kiln_scheduler_placements",
            "Actions placed on a worker, by why that worker: input_root (its directory cache holds the action's input root), input_tree (the free worker whose directory cache holds the most bytes of its input tree), prefetched (the worker that fetched its inputs ahead while it waited), input_blobs (the free worker holding the most bytes of its input files), load (no worker holds anything of it: the least loaded), holder_busy (the root's holder stayed busy past execution.locality_wait_ms)",
            self.placements.clone(),
        );
        for reason in Reason::ALL {
            let _ = self.placements.get_or_create(&ReasonLabel {
                reason: reason.name(),
            });
        }
        registry.register(
            "kiln_scheduler_blob_facts",
            "Facts \"worker W holds blob B\" the scheduler keeps, from the reports of workers serving their CAS to peers (bounded by execution.locality_map_bytes)",
            self.blob_facts.clone(),
        );
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
        registry.register(
            "kiln_worker_fetch_bytes",
            "Bytes of input blobs a worker fetched, by source: peer (another worker's CAS) or server",
            self.fetched.clone(),
        );
        registry.register(
            "kiln_worker_served_bytes",
            "Bytes a worker's CAS sent to its peers",
            self.served.clone(),
        );
        registry.register(
            "kiln_worker_peer_failures",
            "Fetches from a peer that failed (the blob then came from the server)",
            self.peer_failures.clone(),
        );
        registry.register(
            "kiln_worker_held_blobs",
            "Blobs the scheduler knows a worker's CAS holds (the locality map's facts about it)",
            self.held_blobs.clone(),
        );
        registry.register(
            "kiln_worker_slots",
            "Actions this server may have running on a worker at once: its max_inflight, less what the other servers it serves run there",
            self.slots.clone(),
        );
        registry.register(
            "kiln_worker_fetch_quic_bytes",
            "Of the bytes a worker fetched from peers, those that came over QUIC",
            self.quic_bytes.clone(),
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
        self.blob_facts
            .set(i64::try_from(execution.blob_facts()).unwrap_or(i64::MAX));
        let views = execution.worker_views();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        self.bytes.clear();
        self.entries.clear();
        self.held_blobs.clear();
        self.slots.clear();
        // The increase of a report's counts since it was last seen.
        let mut increase = |worker: &str, report: &'static str, now: Seen| {
            let key = (worker.to_string(), report);
            let before = last.get(&key).cloned().unwrap_or(Seen {
                run: now.run,
                counts: Vec::new(),
            });
            let more = added(&before, &now);
            last.insert(key, now);
            more
        };
        for w in views {
            let label = WorkerLabel {
                worker: w.name.clone(),
            };
            self.slots
                .get_or_create(&label)
                .set(i64::try_from(w.slots).unwrap_or(i64::MAX));
            if w.blob_facts > 0 {
                self.held_blobs
                    .get_or_create(&label)
                    .set(i64::try_from(w.blob_facts).unwrap_or(i64::MAX));
            }
            if let Some(r) = w.dircache {
                let more = increase(
                    &w.name,
                    "dircache",
                    Seen {
                        run: r.run,
                        counts: vec![r.hits, r.misses],
                    },
                );
                self.hits.get_or_create(&label).inc_by(more[0]);
                self.misses.get_or_create(&label).inc_by(more[1]);
                self.bytes.get_or_create(&label).set(r.bytes as i64);
                self.entries.get_or_create(&label).set(r.entries as i64);
            }
            if let Some(t) = w.transfers {
                let more = increase(
                    &w.name,
                    "transfers",
                    Seen {
                        run: t.run,
                        counts: vec![
                            t.peer_bytes,
                            t.server_bytes,
                            t.served_bytes,
                            t.peer_failures,
                            t.peer_quic_bytes,
                        ],
                    },
                );
                let source = |source| SourceLabel {
                    worker: w.name.clone(),
                    source,
                };
                self.fetched.get_or_create(&source("peer")).inc_by(more[0]);
                self.fetched
                    .get_or_create(&source("server"))
                    .inc_by(more[1]);
                self.served.get_or_create(&label).inc_by(more[2]);
                self.peer_failures.get_or_create(&label).inc_by(more[3]);
                self.quic_bytes.get_or_create(&label).inc_by(more[4]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{added, Seen};

    #[test]
    fn counters_follow_a_worker_through_its_restart() {
        let seen = |run, hits, misses| Seen {
            run,
            counts: vec![hits, misses],
        };
        assert_eq!(added(&seen(1, 0, 0), &seen(1, 5, 1)), vec![5, 1]);
        assert_eq!(added(&seen(1, 5, 1), &seen(1, 7, 1)), vec![2, 0]);
        // Restarted, and as far along as before: all of it is new.
        assert_eq!(added(&seen(1, 7, 1), &seen(2, 7, 1)), vec![7, 1]);
        assert_eq!(added(&seen(2, 7, 1), &seen(2, 7, 1)), vec![0, 0]);
        // Seen for the first time: counted from nothing.
        let first = Seen {
            run: 3,
            counts: Vec::new(),
        };
        assert_eq!(added(&first, &seen(3, 4, 2)), vec![4, 2]);
    }
}
