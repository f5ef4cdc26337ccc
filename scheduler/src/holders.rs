//! Which workers hold which blobs, as their reports say ([`BlobHolders`]): a bounded map, the
//! oldest facts dropped first. When an action is dispatched, the inputs its worker is not
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
    map: HashMap<BlobKey, Vec<WorkerId>>,
    /// Arrival order; may hold facts removed since (skipped when dropping the oldest).
    order: VecDeque<(BlobKey, WorkerId)>,
    facts: usize,
    cap: usize,
}

impl BlobHolders {
    /// An empty map of at most `cap` facts.
    pub fn new(cap: usize) -> BlobHolders {
        BlobHolders {
            map: HashMap::new(),
            order: VecDeque::new(),
            facts: 0,
            cap,
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

    /// Takes in a worker's report: with `full`, `added` is everything it holds (its earlier
    /// facts are dropped); otherwise what it added and removed since its last report.
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
            self.remove(key, worker);
        }
        for key in added {
            if self.cap == 0 {
                break;
            }
            let holders = self.map.entry(key.clone()).or_default();
            if holders.contains(&worker) {
                continue;
            }
            holders.push(worker);
            self.facts += 1;
            self.order.push_back((key, worker));
        }
        while self.facts > self.cap {
            let Some((key, worker)) = self.order.pop_front() else {
                break;
            };
            self.remove(&key, worker);
        }
        // Facts removed by reports linger in `order`: compact it now and then.
        if self.order.len() > 2 * self.facts + 64 {
            let map = &self.map;
            self.order
                .retain(|(k, w)| map.get(k).is_some_and(|h| h.contains(w)));
        }
    }

    fn remove(&mut self, key: &BlobKey, worker: WorkerId) {
        if let Some(holders) = self.map.get_mut(key) {
            if let Some(at) = holders.iter().position(|w| *w == worker) {
                holders.swap_remove(at);
                self.facts -= 1;
                if holders.is_empty() {
                    self.map.remove(key);
                }
            }
        }
    }

    /// A worker is gone: every fact about it is dropped (one pass over the map).
    pub fn worker_left(&mut self, worker: WorkerId) {
        let mut dropped = 0;
        self.map.retain(|_, holders| {
            let before = holders.len();
            holders.retain(|w| *w != worker);
            dropped += before - holders.len();
            !holders.is_empty()
        });
        self.facts -= dropped;
    }

    /// The workers that reported holding `key`.
    pub fn holders(&self, key: &BlobKey) -> &[WorkerId] {
        self.map.get(key).map_or(&[], Vec::as_slice)
    }

    /// For an action going to `target`: each of `inputs` that `target` is not known to hold,
    /// grouped by one peer that holds it (chosen by the digest, so that the work spreads over
    /// the holders; `usable` says which workers may be asked). Groups ordered by worker.
    pub fn hints(
        &self,
        target: WorkerId,
        inputs: &[BlobKey],
        usable: impl Fn(WorkerId) -> bool,
    ) -> Vec<(WorkerId, Vec<Digest>)> {
        let mut groups: HashMap<WorkerId, Vec<Digest>> = HashMap::new();
        for key in inputs {
            let holders = self.holders(key);
            if holders.is_empty() || holders.contains(&target) {
                continue;
            }
            let mut peers: Vec<WorkerId> = holders.iter().copied().filter(|w| usable(*w)).collect();
            if peers.is_empty() {
                continue;
            }
            peers.sort_unstable();
            let spread = u64::from_le_bytes(key.digest.hash[..8].try_into().unwrap_or([0; 8]));
            let peer = peers[(spread % peers.len() as u64) as usize];
            groups.entry(peer).or_default().push(key.digest);
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
                let sum = held.entry(*w).or_default();
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
        let mut two = h.holders(&blob(2)).to_vec();
        two.sort_unstable();
        assert_eq!(two, vec![1, 2]);
        h.update(1, false, vec![blob(9)], vec![blob(0), blob(2)]);
        assert!(h.holders(&blob(0)).is_empty());
        assert_eq!(h.holders(&blob(2)), &[2]);
        assert_eq!(h.holders(&blob(9)), &[1]);
        // A repeated fact counts once.
        h.update(1, false, vec![blob(9)], vec![]);
        assert_eq!(h.len(), 4);
        // A full report replaces the worker's facts, and only its own.
        h.update(2, true, vec![blob(7)], vec![]);
        assert_eq!(h.len(), 3);
        assert!(h.holders(&blob(3)).is_empty());
        assert_eq!(h.holders(&blob(1)), &[1]);
    }

    #[test]
    fn the_oldest_facts_go_past_the_cap_and_the_order_stays_bounded() {
        let mut h = BlobHolders::new(4);
        h.update(1, false, blobs(0..3), vec![]);
        h.update(2, false, blobs(3..6), vec![]);
        assert_eq!(h.len(), 4);
        assert!(h.holders(&blob(0)).is_empty() && h.holders(&blob(1)).is_empty());
        assert_eq!(h.holders(&blob(5)), &[2]);
        for _ in 0..100 {
            h.update(1, false, vec![blob(50)], vec![]);
            h.update(1, false, vec![], vec![blob(50)]);
        }
        assert!(h.order.len() <= 2 * h.len() + 64);
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
        assert!(h.holders(&blob(0)).is_empty());
        assert_eq!(h.holders(&blob(7)), &[2]);
    }

    #[test]
    fn hints_skip_what_the_target_holds_and_spread_over_usable_holders() {
        let mut h = BlobHolders::new(1000);
        h.update(1, false, blobs(0..100), vec![]);
        h.update(2, false, blobs(0..100), vec![]);
        h.update(3, false, blobs(50..60), vec![]);
        h.update(4, false, blobs(0..100), vec![]);
        let inputs = blobs(0..120);
        let hints = h.hints(3, &inputs, |w| w != 4);
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
        let held = h.bytes_held(&blobs(0..10));
        assert_eq!(held.get(&1), Some(&20));
        assert_eq!(held.get(&3), None);
    }
}
