//! The owner shard's index of committed blobs (sans-IO): size, access time, whether the bytes
//! were verified by this process, and pins, in least-recently-used order. (The action cache
//! keeps its entries in the same structure.)

use kiln_reapi::digest::BlobKey;
use std::hash::BuildHasher;

/// What the index knows about one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Size in bytes (also in the key; kept here for accounting).
    pub size: u64,
    /// Last access, nanoseconds since the Unix epoch (see [`super::atime`]).
    pub atime: u64,
    /// The access time last written to the file's metadata (nanoseconds).
    pub persisted_atime: u64,
    /// The file's content was hashed by this process (written here, or read and checked).
    /// Blobs found on disk at start-up are checked on first read.
    pub verified: bool,
    /// Holders that need the blob to stay (running actions, transfers); never evicted while > 0.
    pub pins: u32,
}

impl Entry {
    /// A blob just written and verified.
    pub fn fresh(size: u64, now: u64) -> Entry {
        Entry {
            size,
            atime: now,
            persisted_atime: now,
            verified: true,
            pins: 0,
        }
    }

    /// A blob found on disk at start-up.
    pub fn scanned(size: u64, atime: u64) -> Entry {
        Entry {
            size,
            atime,
            persisted_atime: atime,
            verified: false,
            pins: 0,
        }
    }
}

/// The CAS index's hasher: fast and randomly seeded (SipHash was the largest cost of indexing
/// a million blobs at start-up). Only for keys a client cannot choose: the CAS indexes only
/// blobs whose bytes hashed to their digest, so its keys are uniformly distributed and made-up
/// digests in lookups only probe.
pub type VerifiedKeys = foldhash::fast::RandomState;

/// SipHash, for indexes whose keys come from clients unverified (the action cache's action
/// digests): a client must not be able to make its keys collide.
pub type ClientKeys = std::collections::hash_map::RandomState;

/// No node (the end of the recency list).
const NIL: u32 = u32::MAX;

/// One indexed blob and its neighbours in recency order.
struct Node {
    key: BlobKey,
    entry: Entry,
    /// Toward the most recently used end.
    newer: u32,
    /// Toward the least recently used end.
    older: u32,
}

/// Blobs in LRU order with their total size: nodes in one vector (freed slots reused), a
/// doubly linked recency list through their indexes, and a hash table of indexes. No
/// allocation per blob: a node of 104 bytes and its slot in the table, about 130 bytes per
/// blob as measured with the vector's and the table's spare room (docs/operations.md), where
/// a map of boxed list nodes took about 150 and most of the start-up time.
pub struct BlobIndex<S = VerifiedKeys> {
    hasher: S,
    table: hashbrown::HashTable<u32>,
    nodes: Vec<Option<Node>>,
    free: Vec<u32>,
    /// Most recently used.
    newest: u32,
    /// Least recently used.
    oldest: u32,
    bytes: u64,
}

impl<S: BuildHasher + Default> Default for BlobIndex<S> {
    fn default() -> Self {
        BlobIndex::new()
    }
}

impl<S: BuildHasher + Default> BlobIndex<S> {
    /// An empty index.
    pub fn new() -> BlobIndex<S> {
        BlobIndex::with_capacity(0)
    }

    /// An empty index with room for `n` blobs (start-up knows how many it will index).
    pub fn with_capacity(n: usize) -> BlobIndex<S> {
        BlobIndex {
            hasher: S::default(),
            table: hashbrown::HashTable::with_capacity(n),
            nodes: Vec::with_capacity(n),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
            bytes: 0,
        }
    }
}

impl<S: BuildHasher> BlobIndex<S> {
    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no blob is indexed.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Total bytes of indexed blobs.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    fn node(&self, i: u32) -> &Node {
        self.nodes[i as usize]
            .as_ref()
            .expect("the table and the list only hold live nodes")
    }

    fn node_mut(&mut self, i: u32) -> &mut Node {
        self.nodes[i as usize]
            .as_mut()
            .expect("the table and the list only hold live nodes")
    }

    fn find(&self, key: &BlobKey) -> Option<u32> {
        let hash = self.hasher.hash_one(key);
        let nodes = &self.nodes;
        self.table
            .find(hash, |&i| {
                nodes[i as usize].as_ref().is_some_and(|n| n.key == *key)
            })
            .copied()
    }

    /// Takes node `i` out of the recency list.
    fn unlink(&mut self, i: u32) {
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
    fn push_newest(&mut self, i: u32) {
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

    /// Adds (or replaces) a blob as the most recently used.
    pub fn insert(&mut self, key: BlobKey, entry: Entry) {
        self.bytes += entry.size;
        if let Some(i) = self.find(&key) {
            let old = std::mem::replace(&mut self.node_mut(i).entry, entry);
            self.bytes -= old.size;
            self.unlink(i);
            self.push_newest(i);
            return;
        }
        let i = self.add_node(key, entry);
        self.push_newest(i);
    }

    /// Adds blobs the index does not hold (sorted oldest first), each placed by its access
    /// time among the blobs already indexed: one pass over the list.
    pub fn insert_aged(&mut self, sorted: Vec<(BlobKey, Entry)>) {
        let mut at = self.oldest;
        for (key, entry) in sorted {
            debug_assert!(self.find(&key).is_none());
            while at != NIL && self.node(at).entry.atime <= entry.atime {
                at = self.node(at).newer;
            }
            self.bytes += entry.size;
            let i = self.add_node(key, entry);
            self.link_older_than(i, at);
        }
    }

    /// Puts node `i` just older than node `at` (at the newest end when `at` is `NIL`).
    fn link_older_than(&mut self, i: u32, at: u32) {
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

    /// Stores a new node (not yet in the recency list) and indexes its key.
    fn add_node(&mut self, key: BlobKey, entry: Entry) -> u32 {
        let node = Node {
            key,
            entry,
            newer: NIL,
            older: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = Some(node);
                i
            }
            None => {
                // u32 slots: four billion blobs per shard is far past any disk.
                let i = u32::try_from(self.nodes.len()).expect("fewer than 2^32 blobs per shard");
                self.nodes.push(Some(node));
                i
            }
        };
        let hash = self.hasher.hash_one(&self.node(i).key);
        let (nodes, hasher) = (&self.nodes, &self.hasher);
        self.table.insert_unique(hash, i, |&j| {
            hasher.hash_one(&nodes[j as usize].as_ref().expect("live node").key)
        });
        i
    }

    /// Every blob, most recently used first.
    pub fn iter(&self) -> impl Iterator<Item = (&BlobKey, &Entry)> {
        let mut at = self.newest;
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let n = self.node(at);
            at = n.older;
            Some((&n.key, &n.entry))
        })
    }

    /// Looks a blob up without changing its recency.
    pub fn peek(&self, key: &BlobKey) -> Option<&Entry> {
        let i = self.find(key)?;
        Some(&self.node(i).entry)
    }

    /// Marks a blob used at `now` and returns it.
    pub fn touch(&mut self, key: &BlobKey, now: u64) -> Option<&mut Entry> {
        let i = self.find(key)?;
        self.unlink(i);
        self.push_newest(i);
        let entry = &mut self.node_mut(i).entry;
        entry.atime = entry.atime.max(now);
        Some(entry)
    }

    /// Mutable access without changing recency.
    pub fn peek_mut(&mut self, key: &BlobKey) -> Option<&mut Entry> {
        let i = self.find(key)?;
        Some(&mut self.node_mut(i).entry)
    }

    /// Takes node `i` out of the table, the list and the slab.
    fn take(&mut self, i: u32) -> (BlobKey, Entry) {
        self.unlink(i);
        let hash = self.hasher.hash_one(&self.node(i).key);
        if let Ok(found) = self.table.find_entry(hash, |&j| j == i) {
            found.remove();
        }
        let node = self.nodes[i as usize]
            .take()
            .expect("the table and the list only hold live nodes");
        self.free.push(i);
        self.bytes -= node.entry.size;
        if self.table.is_empty() {
            // Start afresh rather than keep a slab of free slots.
            self.nodes.clear();
            self.free.clear();
        }
        (node.key, node.entry)
    }

    /// Forgets a blob.
    pub fn remove(&mut self, key: &BlobKey) -> Option<Entry> {
        let i = self.find(key)?;
        Some(self.take(i).1)
    }

    /// The access time of the least recently used blob.
    pub fn oldest_atime(&self) -> Option<u64> {
        (self.oldest != NIL).then(|| self.node(self.oldest).entry.atime)
    }

    /// Removes and returns the least recently used blob that is not pinned. Pinned blobs met on
    /// the way are in use, so they move to the most-recent end.
    pub fn pop_oldest_unpinned(&mut self) -> Option<(BlobKey, Entry)> {
        for _ in 0..self.len() {
            let i = self.oldest;
            if i == NIL {
                return None;
            }
            if self.node(i).entry.pins == 0 {
                return Some(self.take(i));
            }
            self.unlink(i);
            self.push_newest(i);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn key(n: u8) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, &[n]),
        )
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let mut idx: BlobIndex = BlobIndex::new();
        for n in 0..4u8 {
            idx.insert(key(n), Entry::fresh(10, 100 + n as u64));
        }
        assert_eq!(idx.bytes(), 40);
        idx.touch(&key(0), 200);
        assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(1));
        assert_eq!(idx.oldest_atime(), Some(102));
        assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(2));
        assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(3));
        assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(0));
        assert!(idx.pop_oldest_unpinned().is_none());
        assert_eq!(idx.bytes(), 0);
    }

    #[test]
    fn blobs_found_late_are_placed_by_their_access_times() {
        let mut idx: BlobIndex = BlobIndex::new();
        idx.insert(key(1), Entry::scanned(1, 10));
        idx.insert(key(2), Entry::scanned(2, 30));
        idx.insert_aged(vec![
            (key(3), Entry::scanned(4, 5)),
            (key(4), Entry::scanned(8, 20)),
            (key(5), Entry::scanned(16, 30)),
            (key(6), Entry::scanned(32, 40)),
        ]);
        assert_eq!(idx.len(), 6);
        assert_eq!(idx.bytes(), 63);
        let newest_first: Vec<BlobKey> = idx.iter().map(|(k, _)| k.clone()).collect();
        assert_eq!(newest_first, [6, 5, 2, 4, 1, 3].map(key));
        let mut evicted = Vec::new();
        while let Some((k, _)) = idx.pop_oldest_unpinned() {
            evicted.push(k);
        }
        assert_eq!(evicted, [3, 1, 4, 2, 5, 6].map(key));
        // Into an empty index, in their own order.
        let mut empty: BlobIndex = BlobIndex::new();
        empty.insert_aged(vec![
            (key(7), Entry::scanned(1, 1)),
            (key(8), Entry::scanned(1, 2)),
        ]);
        assert_eq!(empty.pop_oldest_unpinned().unwrap().0, key(7));
        assert_eq!(empty.pop_oldest_unpinned().unwrap().0, key(8));
    }

    #[test]
    fn pinned_blobs_are_skipped() {
        let mut idx: BlobIndex = BlobIndex::new();
        idx.insert(key(1), Entry::fresh(5, 1));
        idx.insert(key(2), Entry::fresh(5, 2));
        idx.peek_mut(&key(1)).unwrap().pins = 1;
        assert_eq!(idx.pop_oldest_unpinned().unwrap().0, key(2));
        assert!(
            idx.pop_oldest_unpinned().is_none(),
            "only a pinned blob is left"
        );
        assert_eq!(idx.len(), 1);
    }

    #[test]
    fn replacing_keeps_byte_count_right() {
        let mut idx: BlobIndex = BlobIndex::new();
        idx.insert(key(1), Entry::fresh(5, 1));
        idx.insert(key(1), Entry::fresh(5, 2));
        assert_eq!((idx.len(), idx.bytes()), (1, 5));
        assert_eq!(idx.remove(&key(1)).map(|e| e.atime), Some(2));
        assert_eq!(idx.bytes(), 0);
    }

    /// The same operations on the index and on `lru::LruCache` (the structure it replaced),
    /// in a seeded random order: the same blobs, order, bytes and evictions throughout.
    #[test]
    fn behaves_like_a_plain_lru_under_random_operations() {
        let mut idx: BlobIndex = BlobIndex::new();
        let mut model: lru::LruCache<BlobKey, Entry> = lru::LruCache::unbounded();
        let mut model_bytes = 0u64;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for step in 0..20_000u64 {
            let k = key((next() % 48) as u8);
            match next() % 6 {
                0 | 1 => {
                    let e = Entry::fresh(next() % 100, step);
                    idx.insert(k.clone(), e);
                    model_bytes += e.size;
                    if let Some(old) = model.put(k, e) {
                        model_bytes -= old.size;
                    }
                }
                2 => {
                    let a = idx.touch(&k, step).copied();
                    let b = model.get_mut(&k).map(|e| {
                        e.atime = e.atime.max(step);
                        *e
                    });
                    assert_eq!(a, b);
                }
                3 => {
                    let a = idx.remove(&k);
                    let b = model.pop(&k);
                    if let Some(e) = b {
                        model_bytes -= e.size;
                    }
                    assert_eq!(a, b);
                }
                4 => {
                    let pins = (next() % 2) as u32;
                    if let Some(e) = idx.peek_mut(&k) {
                        e.pins = pins;
                    }
                    if let Some(e) = model.peek_mut(&k) {
                        e.pins = pins;
                    }
                }
                _ => {
                    let a = idx.pop_oldest_unpinned();
                    let mut b = None;
                    for _ in 0..model.len() {
                        let (key, pinned) = match model.peek_lru() {
                            Some((key, e)) => (key.clone(), e.pins > 0),
                            None => break,
                        };
                        if !pinned {
                            b = model.pop_lru();
                            break;
                        }
                        model.promote(&key);
                    }
                    if let Some((_, e)) = &b {
                        model_bytes -= e.size;
                    }
                    assert_eq!(a, b);
                }
            }
            assert_eq!(idx.len(), model.len());
            assert_eq!(idx.bytes(), model_bytes);
            assert_eq!(idx.oldest_atime(), model.peek_lru().map(|(_, e)| e.atime));
            if step % 97 == 0 {
                let a: Vec<(BlobKey, Entry)> = idx.iter().map(|(k, e)| (k.clone(), *e)).collect();
                let b: Vec<(BlobKey, Entry)> = model.iter().map(|(k, e)| (k.clone(), *e)).collect();
                assert_eq!(a, b, "step {step}");
            }
        }
    }
}
