//! Placing an action where its inputs already are. Each worker's directory cache reports the
//! directories it holds ([`CachedDirs`]: every entry's input root and every directory inside
//! it). The scheduler scores each free worker ([`Weights`]): an exact input-root hit, the bytes
//! of the input tree under directories it holds, the bytes of input files its CAS holds, and
//! its load; the best takes the action — after waiting up to `locality_wait` for a busy worker
//! holding the input root, so that a loaded "best" worker does not hold an action for long
//! while another is idle. Each placement's [`Reason`] is counted.

use kiln_reapi::digest::BlobKey;
use std::collections::{HashSet, VecDeque};

/// The directories one worker's directory cache holds, as it reported them: at most `cap`,
/// the oldest facts dropped first.
#[derive(Debug)]
pub struct CachedDirs {
    set: HashSet<BlobKey>,
    /// Arrival order; may hold keys removed since (skipped when dropping the oldest).
    order: VecDeque<BlobKey>,
    cap: usize,
}

impl CachedDirs {
    /// An empty set of at most `cap` directories.
    pub fn new(cap: usize) -> CachedDirs {
        CachedDirs {
            set: HashSet::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    /// Takes in a report: with `full`, `added` is the whole set; otherwise what was added and
    /// removed since the last report.
    pub fn update(&mut self, full: bool, added: Vec<BlobKey>, removed: Vec<BlobKey>) {
        if full {
            self.set.clear();
            self.order.clear();
        }
        for key in &removed {
            self.set.remove(key);
        }
        for key in added {
            if self.set.insert(key.clone()) {
                self.order.push_back(key);
            }
        }
        while self.set.len() > self.cap {
            match self.order.pop_front() {
                Some(oldest) => {
                    self.set.remove(&oldest);
                }
                None => break,
            }
        }
        // Keys removed by reports linger in `order`: compact it now and then.
        if self.order.len() > 2 * self.set.len() + 64 {
            let set = &self.set;
            self.order.retain(|k| set.contains(k));
        }
    }

    /// Whether the worker reported holding the directory `dir`.
    pub fn contains(&self, dir: &BlobKey) -> bool {
        self.set.contains(dir)
    }

    /// Directories held.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Why an action went to the worker it went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The worker's directory cache holds the action's input root.
    InputRoot,
    /// No free worker holds the root: the free worker holding the most bytes of its input
    /// tree in cached directories.
    InputTree,
    /// No free worker holds the root: the free worker holding the most bytes of its input
    /// files.
    InputBlobs,
    /// The worker that fetched its inputs ahead while it waited, free now.
    Prefetched,
    /// No worker holds it: the least loaded.
    Load,
    /// A worker holding it stayed busy past `locality_wait`: the least loaded free one.
    WaitedForHolder,
}

impl Reason {
    /// Every reason, for metrics.
    pub const ALL: [Reason; 6] = [
        Reason::InputRoot,
        Reason::InputTree,
        Reason::Prefetched,
        Reason::InputBlobs,
        Reason::Load,
        Reason::WaitedForHolder,
    ];

    /// Its label in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Reason::InputRoot => "input_root",
            Reason::InputTree => "input_tree",
            Reason::InputBlobs => "input_blobs",
            Reason::Prefetched => "prefetched",
            Reason::Load => "load",
            Reason::WaitedForHolder => "holder_busy",
        }
    }
}

/// Placements made since start, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Placements {
    /// [`Reason::InputRoot`].
    pub input_root: u64,
    /// [`Reason::InputTree`].
    pub input_tree: u64,
    /// [`Reason::InputBlobs`].
    pub input_blobs: u64,
    /// [`Reason::Prefetched`].
    pub prefetched: u64,
    /// [`Reason::Load`].
    pub load: u64,
    /// [`Reason::WaitedForHolder`].
    pub holder_busy: u64,
}

impl Placements {
    /// Counts one placement.
    pub fn count(&mut self, reason: Reason) {
        match reason {
            Reason::InputRoot => self.input_root += 1,
            Reason::InputTree => self.input_tree += 1,
            Reason::InputBlobs => self.input_blobs += 1,
            Reason::Prefetched => self.prefetched += 1,
            Reason::Load => self.load += 1,
            Reason::WaitedForHolder => self.holder_busy += 1,
        }
    }

    /// The count for `reason`.
    pub fn of(&self, reason: Reason) -> u64 {
        match reason {
            Reason::InputRoot => self.input_root,
            Reason::InputTree => self.input_tree,
            Reason::InputBlobs => self.input_blobs,
            Reason::Prefetched => self.prefetched,
            Reason::Load => self.load,
            Reason::WaitedForHolder => self.holder_busy,
        }
    }
}

/// How much each thing a free worker holds of an action counts when placing it (the
/// `execution.placement_weights` section): the worker with the highest score takes the
/// action. The defaults (8, 4, 2, 1): a root hit outweighs everything else; the whole tree
/// cached outweighs every input file held plus any load; below that the shares trade off
/// (10% of the tree, 0.4, loses to half the input files, 1.0); load breaks near-ties.
pub type Weights = kiln_config::PlacementWeights;

/// What one free worker holds of an action.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Score {
    /// It caches the input root.
    pub root: bool,
    /// Share of the input tree's bytes under directories it caches.
    pub tree: f64,
    /// Share of the input files' bytes its CAS holds.
    pub blobs: f64,
    /// Share of its slots in use.
    pub load: f64,
}

impl Score {
    /// Its value under `w`.
    pub fn value(&self, w: &Weights) -> f64 {
        let root = if self.root { w.input_root } else { 0.0 };
        root + w.input_tree * self.tree + w.input_blobs * self.blobs - w.load * self.load
    }

    /// Why a worker with this score was chosen: its root hit; else whichever of the tree
    /// and blob terms added more (the tree on a tie); else its load.
    pub fn reason(&self, w: &Weights) -> Reason {
        let (tree, blobs) = (w.input_tree * self.tree, w.input_blobs * self.blobs);
        if self.root && w.input_root > 0.0 {
            Reason::InputRoot
        } else if tree > 0.0 && tree >= blobs {
            Reason::InputTree
        } else if blobs > 0.0 {
            Reason::InputBlobs
        } else {
            Reason::Load
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn root(n: u8) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, &[n]),
        )
    }

    #[test]
    fn reports_add_remove_replace_and_the_oldest_go_past_the_cap() {
        let mut roots = CachedDirs::new(3);
        roots.update(true, vec![root(1), root(2)], vec![]);
        roots.update(false, vec![root(3)], vec![root(1)]);
        assert!(!roots.contains(&root(1)) && roots.contains(&root(2)) && roots.contains(&root(3)));
        roots.update(false, vec![root(4), root(5)], vec![]);
        assert_eq!(roots.len(), 3);
        assert!(!roots.contains(&root(2)), "the oldest fact dropped first");
        assert!(roots.contains(&root(5)));
        roots.update(true, vec![root(9)], vec![]);
        assert_eq!(roots.len(), 1, "a full report replaces");
        assert!(roots.contains(&root(9)));
        // A report applies its removals first: a root removed and added again is held.
        roots.update(false, vec![root(9)], vec![root(9)]);
        assert!(roots.contains(&root(9)));
        // Many removals do not let the order grow without bound.
        for i in 0..200u8 {
            roots.update(false, vec![], vec![root(i)]);
            roots.update(false, vec![root(i)], vec![]);
            roots.update(false, vec![], vec![root(i)]);
        }
        assert!(roots.is_empty());
        assert!(roots.order.len() <= 2 * roots.len() + 64);
    }
}
