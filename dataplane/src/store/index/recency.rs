//! The index's recency list: a doubly linked list through node numbers, most recently used
//! at one end, the next to evict at the other.

use super::BlobIndex;
use std::hash::BuildHasher;

/// No node (the end of the recency list).
pub(super) const NIL: u32 = u32::MAX;

impl<S: BuildHasher> BlobIndex<S> {
    /// Takes node `i` out of the recency list.
    pub(super) fn unlink(&mut self, i: u32) {
        let (newer, older) = {
            let n = self.node(i);
            (n.newer, n.older)
        };
        match newer {
            NIL => self.newest = older,
            j => self.node_mut(j).older = older,
        }
        match older {
            NIL => self.oldest = newer,
            j => self.node_mut(j).newer = newer,
        }
    }

    /// Puts node `i` at the most recently used end.
    pub(super) fn push_newest(&mut self, i: u32) {
        let old_newest = self.newest;
        {
            let n = self.node_mut(i);
            n.newer = NIL;
            n.older = old_newest;
        }
        match old_newest {
            NIL => self.oldest = i,
            j => self.node_mut(j).newer = i,
        }
        self.newest = i;
    }

    /// Puts node `i` just older than node `at` (at the newest end when `at` is `NIL`).
    pub(super) fn link_older_than(&mut self, i: u32, at: u32) {
        if at == NIL {
            return self.push_newest(i);
        }
        let older = self.node(at).older;
        {
            let n = self.node_mut(i);
            n.newer = at;
            n.older = older;
        }
        self.node_mut(at).older = i;
        match older {
            NIL => self.oldest = i,
            j => self.node_mut(j).newer = i,
        }
    }
}
