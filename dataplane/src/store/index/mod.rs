//! The owner shard's index of committed blobs (sans-IO): size, access time, whether the bytes
//! were verified by this process, and pins, in least-recently-used order. (The action cache
//! keeps its entries in the same structure.)
//!
//! [`Entry`] is what it tells of a blob ([`entry`]); nodes are packed into 64 bytes
//! ([`node`]), instance names numbered ([`instances`]), and kept in recency order
//! ([`recency`]).

mod entry;
pub(crate) mod instances;
mod node;
mod recency;
#[cfg(test)]
mod tests;

pub use entry::{Entry, EntryMut};

use crate::store::atime;
use instances::Instances;
use kiln_reapi::digest::{BlobKey, Digest, DigestFunction};
use node::{Node, Odd, FUNCTION_SHIFT, ODD, PINNED, SIZE_MASK, VACANT};
use recency::NIL;
use std::hash::BuildHasher;

/// The CAS index's hasher: fast and randomly seeded (SipHash was the largest cost of indexing
/// a million blobs at start-up). Only for keys a client cannot choose: the CAS indexes only
/// blobs whose bytes hashed to their digest, so its keys are uniformly distributed and made-up
/// digests in lookups only probe.
pub type VerifiedKeys = foldhash::fast::RandomState;

/// SipHash, for indexes whose keys come from clients unverified (the action cache's action
/// digests): a client must not be able to make its keys collide.
pub type ClientKeys = std::collections::hash_map::RandomState;

/// Blobs in LRU order with their total size: nodes in one vector (freed slots reused), a
/// doubly linked recency list through their indexes, and a hash table of indexes. No
/// allocation per blob: a node of 64 bytes and its slot in the table (docs/operations.md),
/// where a map of boxed list nodes took about 150 bytes and most of the start-up time.
pub struct BlobIndex<S = VerifiedKeys> {
    hasher: S,
    table: hashbrown::HashTable<u32>,
    nodes: Vec<Node>,
    free: Vec<u32>,
    instances: Instances,
    /// Pin counts of [`PINNED`] nodes.
    pins: HashMap<u32, u32>,
    /// Sizes of [`ODD`] nodes.
    odd: HashMap<u32, Odd>,
    /// Most recently used.
    newest: u32,
    /// Least recently used.
    oldest: u32,
    bytes: u64,
}

/// The side tables' map: their keys are slot numbers, not anything a client chose.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

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
            instances: Instances::default(),
            pins: HashMap::default(),
            odd: HashMap::default(),
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

    /// The key of node `i`.
    fn key(&self, i: u32) -> BlobKey {
        BlobKey::new(
            self.instances.name(self.node(i).instance).clone(),
            self.digest(i),
        )
    }

    fn hash_of(&self, instance: u32, d: &Digest) -> u64 {
        self.hasher
            .hash_one((instance, d.function, &d.hash, d.size))
    }

    fn find(&self, key: &BlobKey) -> Option<u32> {
        let instance = self.instances.number(&key.instance)?;
        let d = &key.digest;
        let hash = self.hash_of(instance, d);
        self.table
            .find(hash, |&i| {
                let n = &self.nodes[i as usize];
                n.instance == instance && n.hash == d.hash && self.digest(i) == *d
            })
            .copied()
    }

    /// Adds (or replaces) a blob as the most recently used.
    pub fn insert(&mut self, key: BlobKey, entry: Entry) {
        if let Some(i) = self.find(&key) {
            let old = self.entry(i).size;
            self.bytes = self.bytes - old + entry.size;
            self.set_entry(i, &entry);
            self.unlink(i);
            self.push_newest(i);
            return;
        }
        self.bytes += entry.size;
        let i = self.add_node(&key, &entry);
        self.push_newest(i);
    }

    /// Adds blobs the index does not hold (sorted oldest first), each placed by its access
    /// time among the blobs already indexed: one pass over the list.
    pub fn insert_aged(&mut self, sorted: Vec<(BlobKey, Entry)>) {
        let mut at = self.oldest;
        for (key, entry) in sorted {
            debug_assert!(self.find(&key).is_none());
            while at != NIL && self.node(at).atime <= entry.atime {
                at = self.node(at).newer;
            }
            self.bytes += entry.size;
            let i = self.add_node(&key, &entry);
            self.link_older_than(i, at);
        }
    }

    /// Stores a new node (not yet in the recency list) and indexes its key.
    fn add_node(&mut self, key: &BlobKey, entry: &Entry) -> u32 {
        let instance = self.instances.acquire(&key.instance);
        let function = DigestFunction::ALL
            .iter()
            .position(|f| *f == key.digest.function)
            .unwrap_or(0) as u64;
        let size = key.digest.size;
        // Where the digest's size lives, for `set_entry` (which settles the entry's).
        let word = (function << FUNCTION_SHIFT) | if size > SIZE_MASK { ODD } else { size };
        let node = Node {
            hash: key.digest.hash,
            word,
            atime: 0,
            persisted_lag: 0,
            instance,
            newer: NIL,
            older: NIL,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                // u32 slots: four billion blobs per shard is far past any disk.
                let i = u32::try_from(self.nodes.len()).expect("fewer than 2^32 blobs per shard");
                self.nodes.push(node);
                i
            }
        };
        if size > SIZE_MASK {
            self.odd.insert(i, Odd { size, charge: size });
        }
        self.set_entry(i, entry);
        let hash = self.hash_of(instance, &key.digest);
        let mut table = std::mem::take(&mut self.table);
        table.insert_unique(hash, i, |&j| {
            self.hash_of(self.node(j).instance, &self.digest(j))
        });
        self.table = table;
        i
    }

    /// Every blob, most recently used first.
    pub fn iter(&self) -> impl Iterator<Item = (BlobKey, Entry)> + '_ {
        let mut at = self.newest;
        std::iter::from_fn(move || {
            if at == NIL {
                return None;
            }
            let i = at;
            at = self.node(i).older;
            Some((self.key(i), self.entry(i)))
        })
    }

    /// Looks a blob up without changing its recency.
    pub fn peek(&self, key: &BlobKey) -> Option<Entry> {
        let i = self.find(key)?;
        Some(self.entry(i))
    }

    /// Marks a blob used at `now` and returns it.
    pub fn touch(&mut self, key: &BlobKey, now: u64) -> Option<EntryMut<'_, S>> {
        let i = self.find(key)?;
        self.unlink(i);
        self.push_newest(i);
        self.node_mut(i).advance_atime(now);
        Some(self.entry_mut(i))
    }

    /// Marks a blob used at `now` and returns it, with whether its access time is due for
    /// writing to its file ([`atime::due`] at `resolution`); when due, the entry records that
    /// time as written, so the caller must write it.
    pub fn touch_persisting(
        &mut self,
        key: &BlobKey,
        now: u64,
        resolution: std::time::Duration,
    ) -> Option<(Entry, bool)> {
        let mut entry = self.touch(key, now)?;
        let due = atime::due(entry.atime, entry.persisted_atime, resolution);
        if due {
            entry.persisted_atime = entry.atime;
        }
        Some((*entry, due))
    }

    /// Mutable access without changing recency.
    pub fn peek_mut(&mut self, key: &BlobKey) -> Option<EntryMut<'_, S>> {
        let i = self.find(key)?;
        Some(self.entry_mut(i))
    }

    fn entry_mut(&mut self, i: u32) -> EntryMut<'_, S> {
        let entry = self.entry(i);
        EntryMut {
            index: self,
            slot: i,
            entry,
        }
    }

    /// Takes node `i` out of the table, the list and the slab.
    fn take(&mut self, i: u32) -> (BlobKey, Entry) {
        self.unlink(i);
        let (key, entry) = (self.key(i), self.entry(i));
        let instance = self.node(i).instance;
        let hash = self.hash_of(instance, &key.digest);
        if let Ok(found) = self.table.find_entry(hash, |&j| j == i) {
            found.remove();
        }
        self.pins.remove(&i);
        self.odd.remove(&i);
        self.instances.release(instance);
        self.node_mut(i).instance = VACANT;
        self.free.push(i);
        self.bytes -= entry.size;
        if self.table.is_empty() {
            // Start afresh rather than keep a slab of free slots.
            self.nodes.clear();
            self.free.clear();
        }
        (key, entry)
    }

    /// Forgets a blob.
    pub fn remove(&mut self, key: &BlobKey) -> Option<Entry> {
        let i = self.find(key)?;
        Some(self.take(i).1)
    }

    /// The access time of the least recently used blob.
    pub fn oldest_atime(&self) -> Option<u64> {
        (self.oldest != NIL).then(|| self.node(self.oldest).atime)
    }

    /// Removes and returns the least recently used blob that is not pinned. Pinned blobs met on
    /// the way are in use, so they move to the most-recent end.
    pub fn pop_oldest_unpinned(&mut self) -> Option<(BlobKey, Entry)> {
        for _ in 0..self.len() {
            let i = self.oldest;
            if i == NIL {
                return None;
            }
            if self.node(i).word & PINNED == 0 {
                return Some(self.take(i));
            }
            self.unlink(i);
            self.push_newest(i);
        }
        None
    }
}
