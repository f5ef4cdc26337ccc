//! Which workers hold which blobs, as their reports say ([`BlobHolders`]): a bounded map, the
//! oldest facts of the worker with the most dropped first. When an action is dispatched, the inputs its worker is not
//! known to hold are hinted to it with a peer that holds each ([`BlobHolders::hints`]), so
//! that it fetches them from that peer rather than from the server. A fact may be stale (the
//! peer evicted the blob since): the worker then falls back to the server.

use crate::WorkerId;
use kiln_reapi::digest::{BlobKey, Digest};
use std::collections::{HashMap, VecDeque};

/// Blob → the workers that reported holding it, at most `cap` facts (one blob on one
/// worker) in all.
#[derive(Debug)]
pub struct BlobHolders {
    map: HashMap<BlobKey, Vec<Fact>>,
    /// Per worker, its facts in arrival order.
    orders: HashMap<WorkerId, Order>,
    facts: usize,
    cap: usize,
    next: u64,
}

/// One worker holding one blob, and when that was reported (see [`Order`]).
#[derive(Debug, Clone, Copy)]
struct Fact {
    worker: WorkerId,
    seq: u64,
}

/// One worker's facts in arrival order, each with the number it was given: an entry whose
/// fact was removed, or removed and reported again since (a later number), is stale and
/// skipped.
#[derive(Debug, Default)]
struct Order {
    queue: VecDeque<(BlobKey, u64)>,
    /// Its facts held now.
    live: usize,
}

impl BlobHolders {
    /// An empty map of at most `cap` facts.
    pub fn new(cap: usize) -> BlobHolders {
        BlobHolders {
            map: HashMap::new(),
            orders: HashMap::new(),
            facts: 0,
            cap,
            next: 0,
        }
    }

    /// Facts held.
    pub fn len(&self) -> usize {
        self.facts
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.facts == 0
    }

    /// Facts kept about `worker`.
    pub fn facts_of(&self, worker: WorkerId) -> usize {
        self.orders.get(&worker).map_or(0, |o| o.live)
    }

    /// Takes in a worker's report: with `full`, `added` is everything it holds (its earlier
    /// facts are dropped); otherwise what it added and removed since its last report. Past
    /// the cap, the oldest facts of the worker with the most go first, so that one worker
    /// (a large one, or a hostile one claiming everything) cannot push out the others'.
    pub fn update(
        &mut self,
        worker: WorkerId,
        full: bool,
        added: Vec<BlobKey>,
        removed: Vec<BlobKey>,
    ) {
        if full {
            self.worker_left(worker);
        }
        for key in &removed {
            self.remove(key, worker, None);
        }
        for key in added {
            if self.cap == 0 {
                break;
            }
            let facts = self.map.entry(key.clone()).or_default();
            if facts.iter().any(|f| f.worker == worker) {
                continue;
            }
            let seq = self.next;
            self.next += 1;
            facts.push(Fact { worker, seq });
            self.facts += 1;
            let order = self.orders.entry(worker).or_default();
            order.queue.push_back((key, seq));
            order.live += 1;
        }
        while self.facts > self.cap {
            // The worker with the most loses its oldest until it is down to the next one's
            // count (one scan of the workers per step, not per fact).
            let mut ranked: Vec<(usize, WorkerId)> = self
                .orders
                .iter()
                .filter(|(_, o)| o.live > 0)
                .map(|(id, o)| (o.live, *id))
                .collect();
            ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            let Some(&(live, largest)) = ranked.first() else {
                break;
            };
            let next = ranked.get(1).map_or(0, |r| r.0);
            let mut evict = (live - next).max(1).min(self.facts - self.cap);
            while evict > 0 {
                let Some((key, seq)) = self
                    .orders
                    .get_mut(&largest)
                    .and_then(|o| o.queue.pop_front())
                else {
                    break;
                };
                if self.remove(&key, largest, Some(seq)) {
                    evict -= 1;
                }
            }
        }
        // Stale entries linger in an order: compact it now and then, so that it stays within
        // twice its facts.
        if let Some(order) = self.orders.get_mut(&worker) {
            if order.queue.len() > 2 * order.live + 64 {
                let map = &self.map;
                order.queue.retain(|(k, seq)| {
                    map.get(k)
                        .is_some_and(|f| f.iter().any(|f| f.worker == worker && f.seq == *seq))
                });
            }
        }
    }

    /// Drops the fact that `worker` holds `key` (only the one numbered `seq`, when given);
    /// whether there was one.
    fn remove(&mut self, key: &BlobKey, worker: WorkerId, seq: Option<u64>) -> bool {
        if let Some(facts) = self.map.get_mut(key) {
            let found = facts
                .iter()
                .position(|f| f.worker == worker && seq.is_none_or(|s| s == f.seq));
            if let Some(at) = found {
                facts.swap_remove(at);
                self.facts -= 1;
                if let Some(order) = self.orders.get_mut(&worker) {
                    order.live -= 1;
                }
                if facts.is_empty() {
                    self.map.remove(key);
                }
                return true;
            }
        }
        false
    }

    /// A worker is gone: every fact about it is dropped (one pass over the map), and its
    /// order with them.
    pub fn worker_left(&mut self, worker: WorkerId) {
        if self.orders.remove(&worker).is_none() {
            return;
        }
        let mut dropped = 0;
        self.map.retain(|_, facts| {
            let before = facts.len();
            facts.retain(|f| f.worker != worker);
            dropped += before - facts.len();
            !facts.is_empty()
        });
        self.facts -= dropped;
    }

    /// Entries in the workers' orders, stale ones included.
    #[cfg(test)]
    fn queued(&self) -> usize {
        self.orders.values().map(|o| o.queue.len()).sum()
    }

    /// Whether `worker` reported holding `key`.
    pub fn holds(&self, key: &BlobKey, worker: WorkerId) -> bool {
        self.map
            .get(key)
            .is_some_and(|f| f.iter().any(|f| f.worker == worker))
    }

    /// The workers that reported holding `key`.
    pub fn holders(&self, key: &BlobKey) -> impl Iterator<Item = WorkerId> + '_ {
        self.map.get(key).into_iter().flatten().map(|f| f.worker)
    }

    /// For an action going to `target`: each of `inputs` that `target` is not known to hold,
    /// grouped by one peer that holds it (chosen by the digest, so that the work spreads over
    /// the holders; `usable` says which workers may be asked), at most `max` digests in all.
    /// Groups ordered by worker. The caller bounds `inputs` (the walk runs under the
    /// scheduler's lock).
    pub fn hints(
        &self,
        target: WorkerId,
        inputs: &[BlobKey],
        max: usize,
        usable: impl Fn(WorkerId) -> bool,
    ) -> Vec<(WorkerId, Vec<Digest>)> {
        let mut groups: HashMap<WorkerId, Vec<Digest>> = HashMap::new();
        let mut hinted = 0;
        let mut peers: Vec<WorkerId> = Vec::new();
        for key in inputs {
            if hinted >= max {
                break;
            }
            let Some(facts) = self.map.get(key) else {
                continue;
            };
            if facts.iter().any(|f| f.worker == target) {
                continue;
            }
            peers.clear();
            peers.extend(facts.iter().map(|f| f.worker).filter(|w| usable(*w)));
            if peers.is_empty() {
                continue;
            }
            peers.sort_unstable();
            let spread = u64::from_le_bytes(key.digest.hash[..8].try_into().unwrap_or([0; 8]));
            let peer = peers[(spread % peers.len() as u64) as usize];
            groups.entry(peer).or_default().push(key.digest);
            hinted += 1;
        }
        let mut groups: Vec<(WorkerId, Vec<Digest>)> = groups.into_iter().collect();
        groups.sort_unstable_by_key(|(w, _)| *w);
        groups
    }

    /// Bytes of `inputs` each worker is known to hold.
    pub fn bytes_held(&self, inputs: &[BlobKey]) -> HashMap<WorkerId, u64> {
        let mut held: HashMap<WorkerId, u64> = HashMap::new();
        for key in inputs {
            for w in self.holders(key) {
                let sum = held.entry(w).or_default();
                *sum = sum.saturating_add(key.digest.size);
            }
        }
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{DigestFunction, InstanceName};

    fn blob(n: u16) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, &n.to_le_bytes()),
        )
    }

    fn blobs(range: std::ops::Range<u16>) -> Vec<BlobKey> {
        range.map(blob).collect()
    }

    #[test]
    fn reports_add_remove_and_replace_facts() {
        let mut h = BlobHolders::new(100);
        h.update(1, true, blobs(0..3), vec![]);
        h.update(2, true, blobs(2..4), vec![]);
        assert_eq!(h.len(), 5);
        let mut two: Vec<WorkerId> = h.holders(&blob(2)).collect();
        two.sort_unstable();
        assert_eq!(two, vec![1, 2]);
        h.update(1, false, vec![blob(9)], vec![blob(0), blob(2)]);
        assert!(h.holders(&blob(0)).next().is_none());
        assert_eq!(h.holders(&blob(2)).collect::<Vec<_>>(), vec![2]);
        assert_eq!(h.holders(&blob(9)).collect::<Vec<_>>(), vec![1]);
        // A repeated fact counts once.
        h.update(1, false, vec![blob(9)], vec![]);
        assert_eq!(h.len(), 4);
        // A full report replaces the worker's facts, and only its own.
        h.update(2, true, vec![blob(7)], vec![]);
        assert_eq!(h.len(), 3);
        assert!(h.holders(&blob(3)).next().is_none());
        assert_eq!(h.holders(&blob(1)).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn the_oldest_facts_of_the_largest_worker_go_past_the_cap_and_the_order_stays_bounded() {
        let mut h = BlobHolders::new(4);
        h.update(1, false, blobs(0..3), vec![]);
        h.update(2, false, blobs(3..6), vec![]);
        assert_eq!(h.len(), 4);
        // Both held 3: worker 1's oldest went first (ties to the lower id), then worker 2's.
        assert!(h.holders(&blob(0)).next().is_none() && h.holders(&blob(3)).next().is_none());
        assert_eq!(h.holders(&blob(1)).collect::<Vec<_>>(), vec![1]);
        assert_eq!(h.holders(&blob(5)).collect::<Vec<_>>(), vec![2]);
        // A worker claiming a flood of blobs pushes out only its own.
        let mut h = BlobHolders::new(10);
        h.update(1, false, blobs(0..3), vec![]);
        h.update(2, false, blobs(3..6), vec![]);
        h.update(3, false, blobs(100..200), vec![]);
        assert_eq!(h.len(), 10);
        for b in 0..6 {
            assert_eq!(h.holders(&blob(b)).count(), 1, "blob {b} kept");
        }
        assert!(h.holders(&blob(150)).next().is_none());
        assert_eq!(h.holders(&blob(199)).collect::<Vec<_>>(), vec![3]);
        let mut h = BlobHolders::new(4);
        for _ in 0..100 {
            h.update(1, false, vec![blob(50)], vec![]);
            h.update(1, false, vec![], vec![blob(50)]);
        }
        assert!(h.queued() <= 2 * h.len() + 64 * 3);
        // A fact removed and reported again, or listed again in full reports, is as new as
        // its last report: its older entries in the order neither linger nor drop it early.
        let mut h = BlobHolders::new(3);
        for _ in 0..200 {
            h.update(1, true, blobs(0..2), vec![]);
            h.update(2, false, vec![blob(9)], vec![blob(9)]);
        }
        assert!(h.queued() <= 2 * h.len() + 64 * 2, "{}", h.queued());
        h.update(3, false, vec![blob(7)], vec![]);
        assert_eq!(h.len(), 3);
        assert!(
            h.holders(&blob(0)).next().is_none(),
            "the oldest of the last reports goes"
        );
        assert_eq!(h.holders(&blob(1)).collect::<Vec<_>>(), vec![1]);
        assert_eq!(h.holders(&blob(9)).collect::<Vec<_>>(), vec![2]);
        let mut none = BlobHolders::new(0);
        none.update(1, true, blobs(0..10), vec![]);
        assert!(none.is_empty());
    }

    #[test]
    fn a_worker_leaving_takes_its_facts() {
        let mut h = BlobHolders::new(100);
        h.update(1, false, blobs(0..10), vec![]);
        h.update(2, false, blobs(5..15), vec![]);
        h.worker_left(1);
        assert_eq!(h.len(), 10);
        assert!(h.holders(&blob(0)).next().is_none());
        assert_eq!(h.holders(&blob(7)).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn hints_skip_what_the_target_holds_and_spread_over_usable_holders() {
        let mut h = BlobHolders::new(1000);
        h.update(1, false, blobs(0..100), vec![]);
        h.update(2, false, blobs(0..100), vec![]);
        h.update(3, false, blobs(50..60), vec![]);
        h.update(4, false, blobs(0..100), vec![]);
        let inputs = blobs(0..120);
        let hints = h.hints(3, &inputs, usize::MAX, |w| w != 4);
        let hinted: usize = hints.iter().map(|(_, d)| d.len()).sum();
        assert_eq!(
            hinted, 90,
            "not what the target holds, nor what nobody holds"
        );
        assert_eq!(
            hints.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
            vec![1, 2],
            "both usable holders share the work; worker 4 cannot be asked"
        );
        assert!(hints.iter().all(|(_, d)| d.len() > 20), "{hints:?}");
        let capped: usize = h
            .hints(3, &inputs, 7, |_| true)
            .iter()
            .map(|(_, d)| d.len())
            .sum();
        assert_eq!(capped, 7, "at most `max` hints");
        let held = h.bytes_held(&blobs(0..10));
        assert_eq!(held.get(&1), Some(&20));
        assert_eq!(held.get(&3), None);
    }
}
