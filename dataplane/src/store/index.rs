//! The owner shard's index of committed blobs (sans-IO): size, access time, whether the bytes
//! were verified by this process, and pins, in least-recently-used order. (The action cache
//! keeps its entries in the same structure.)

use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};
use std::hash::BuildHasher;

/// What the index knows about one blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Size in bytes (also in the key; kept here for accounting).
    pub size: u64,
    /// Last access, nanoseconds since the Unix epoch (see [`super::atime`]).
    pub atime: u64,
    /// The access time last written to the file's metadata (nanoseconds; the index keeps how
    /// far it is behind `atime` in whole seconds, which is all that deciding when to write the
    /// next needs, so it may read up to a second later than it was).
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
/// `Node::instance` of a free slot.
const VACANT: u32 = u32::MAX;

/// `Node::word`: the digest's size (when it fits), its function, and flags.
const SIZE_MASK: u64 = (1 << 48) - 1;
const FUNCTION_SHIFT: u32 = 48;
const FUNCTION_MASK: u64 = 0xf << FUNCTION_SHIFT;
/// The blob's bytes were hashed by this process ([`Entry::verified`]).
const VERIFIED: u64 = 1 << 52;
/// Pinned: the count is in [`BlobIndex::pins`].
const PINNED: u64 = 1 << 53;
/// The digest's size does not fit the word, or the entry's size is not the digest's: both
/// are in [`BlobIndex::odd`] (the action cache's entries, charged by their results' size).
const ODD: u64 = 1 << 54;

const NANOS: u64 = 1_000_000_000;

/// One indexed blob, packed into 64 bytes: its hash, size, function and flags, access time,
/// instance (by number, see [`Instances`]) and neighbours in recency order. A `BlobKey` and an
/// `Entry` side by side took 104 bytes, the most of a million-blob index's memory. Pin counts
/// and odd sizes, which few blobs have, live in side tables.
struct Node {
    hash: [u8; 32],
    word: u64,
    /// [`Entry::atime`], in full.
    atime: u64,
    /// How far [`Entry::persisted_atime`] is behind `atime`, in whole seconds (at most
    /// `u32::MAX`): it only decides when an access time is written again, at a resolution of
    /// seconds, and a lag holds for any clock (an absolute time in seconds would end in 2106).
    persisted_lag: u32,
    /// The instance's number; [`VACANT`] for a free slot.
    instance: u32,
    /// Toward the most recently used end.
    newer: u32,
    /// Toward the least recently used end.
    older: u32,
}

/// The sizes of an [`ODD`] node.
#[derive(Clone, Copy)]
struct Odd {
    /// The digest's.
    size: u64,
    /// The entry's ([`Entry::size`]).
    charge: u64,
}

/// The instance names the index's blobs are under, each numbered, with a count of the blobs
/// that use it (a number is reused once its last blob is gone). Names come from clients, so
/// they are looked up with SipHash; the last name looked up is remembered, since one request's
/// keys share one parsed name.
#[derive(Default)]
struct Instances {
    names: Vec<Option<(InstanceName, u32)>>,
    numbers: std::collections::HashMap<InstanceName, u32>,
    free: Vec<u32>,
    last: std::cell::RefCell<Option<(InstanceName, u32)>>,
}

impl Instances {
    /// The number of `name`, if any blob is under it.
    fn number(&self, name: &InstanceName) -> Option<u32> {
        if let Some((last, n)) = &*self.last.borrow() {
            if last.same(name) {
                return Some(*n);
            }
        }
        let n = *self.numbers.get(name)?;
        *self.last.borrow_mut() = Some((name.clone(), n));
        Some(n)
    }

    /// The number of `name`, counting one more blob under it.
    fn acquire(&mut self, name: &InstanceName) -> u32 {
        if let Some(&n) = self.numbers.get(name) {
            if let Some((_, count)) = &mut self.names[n as usize] {
                *count += 1;
            }
            return n;
        }
        let n = match self.free.pop() {
            Some(n) => n,
            None => {
                self.names.push(None);
                u32::try_from(self.names.len() - 1).expect("fewer than 2^32 instance names")
            }
        };
        self.names[n as usize] = Some((name.clone(), 1));
        self.numbers.insert(name.clone(), n);
        n
    }

    /// One blob fewer under number `n`.
    fn release(&mut self, n: u32) {
        let Some((name, count)) = &mut self.names[n as usize] else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        self.numbers.remove(&*name);
        self.names[n as usize] = None;
        self.free.push(n);
        let mut last = self.last.borrow_mut();
        if last.as_ref().is_some_and(|(_, l)| *l == n) {
            *last = None;
        }
    }

    fn name(&self, n: u32) -> &InstanceName {
        &self.names[n as usize]
            .as_ref()
            .expect("a live node's instance is numbered")
            .0
    }
}

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

/// A blob's entry, to change in place: written back to the index when dropped.
pub struct EntryMut<'a, S: BuildHasher> {
    index: &'a mut BlobIndex<S>,
    slot: u32,
    entry: Entry,
}

impl<S: BuildHasher> std::ops::Deref for EntryMut<'_, S> {
    type Target = Entry;
    fn deref(&self) -> &Entry {
        &self.entry
    }
}

impl<S: BuildHasher> std::ops::DerefMut for EntryMut<'_, S> {
    fn deref_mut(&mut self) -> &mut Entry {
        &mut self.entry
    }
}

impl<S: BuildHasher> Drop for EntryMut<'_, S> {
    fn drop(&mut self) {
        let old = self.index.entry(self.slot).size;
        self.index.bytes = self.index.bytes - old + self.entry.size;
        self.index.set_entry(self.slot, &self.entry);
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
        let n = &self.nodes[i as usize];
        debug_assert!(
            n.instance != VACANT,
            "the table and the list only hold live nodes"
        );
        n
    }

    fn node_mut(&mut self, i: u32) -> &mut Node {
        &mut self.nodes[i as usize]
    }

    /// The digest of node `i`.
    fn digest(&self, i: u32) -> Digest {
        let n = self.node(i);
        let function = DigestFunction::ALL[((n.word & FUNCTION_MASK) >> FUNCTION_SHIFT) as usize];
        Digest {
            function,
            hash: n.hash,
            size: self.digest_size(i),
        }
    }

    fn digest_size(&self, i: u32) -> u64 {
        let n = self.node(i);
        if n.word & ODD != 0 {
            self.odd.get(&i).map_or(0, |o| o.size)
        } else {
            n.word & SIZE_MASK
        }
    }

    /// The key of node `i`.
    fn key(&self, i: u32) -> BlobKey {
        BlobKey::new(
            self.instances.name(self.node(i).instance).clone(),
            self.digest(i),
        )
    }

    /// The entry of node `i`.
    fn entry(&self, i: u32) -> Entry {
        let n = self.node(i);
        let size = if n.word & ODD != 0 {
            self.odd.get(&i).map_or(0, |o| o.charge)
        } else {
            n.word & SIZE_MASK
        };
        Entry {
            size,
            atime: n.atime,
            persisted_atime: n
                .atime
                .saturating_sub(u64::from(n.persisted_lag).saturating_mul(NANOS)),
            verified: n.word & VERIFIED != 0,
            pins: if n.word & PINNED != 0 {
                self.pins.get(&i).copied().unwrap_or(0)
            } else {
                0
            },
        }
    }

    /// Writes `entry` into node `i` (whose digest is set): the caller keeps `bytes`.
    fn set_entry(&mut self, i: u32, entry: &Entry) {
        let size = self.digest_size(i);
        let function = self.nodes[i as usize].word & FUNCTION_MASK;
        let mut word = function;
        if entry.verified {
            word |= VERIFIED;
        }
        if entry.pins > 0 {
            word |= PINNED;
            self.pins.insert(i, entry.pins);
        } else if self.nodes[i as usize].word & PINNED != 0 {
            self.pins.remove(&i);
        }
        if size > SIZE_MASK || entry.size != size {
            word |= ODD;
            self.odd.insert(
                i,
                Odd {
                    size,
                    charge: entry.size,
                },
            );
        } else {
            word |= size;
            if self.nodes[i as usize].word & ODD != 0 {
                self.odd.remove(&i);
            }
        }
        let n = self.node_mut(i);
        n.word = word;
        n.atime = entry.atime;
        let lag = entry.atime.saturating_sub(entry.persisted_atime) / NANOS;
        n.persisted_lag = u32::try_from(lag).unwrap_or(u32::MAX);
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
        // Through the entry, so that the persisted time keeps its value as the lag changes.
        let mut entry = self.entry(i);
        entry.atime = entry.atime.max(now);
        self.set_entry(i, &entry);
        Some(self.entry_mut(i))
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

    /// The persisted access time survives touches (to the second), for clocks past 2106 too:
    /// a blob whose file time was just written is not due again until the resolution passed.
    #[test]
    fn persisted_access_times_hold_for_any_clock() {
        let resolution = std::time::Duration::from_secs(60);
        for base in [1_700_000_000 * NANOS, 5_000_000_000 * NANOS] {
            let mut idx: BlobIndex = BlobIndex::new();
            idx.insert(key(1), Entry::scanned(1, base));
            let e = *idx.touch(&key(1), base + 30 * NANOS).unwrap();
            assert_eq!(e.atime, base + 30 * NANOS);
            assert_eq!(e.persisted_atime, base, "kept through the touch");
            assert!(!super::super::atime::due(
                e.atime,
                e.persisted_atime,
                resolution
            ));
            let e = *idx.touch(&key(1), base + 61 * NANOS).unwrap();
            assert!(super::super::atime::due(
                e.atime,
                e.persisted_atime,
                resolution
            ));
            idx.peek_mut(&key(1)).unwrap().persisted_atime = e.atime;
            let e = *idx.touch(&key(1), base + 62 * NANOS).unwrap();
            assert!(!super::super::atime::due(
                e.atime,
                e.persisted_atime,
                resolution
            ));
        }
    }

    #[test]
    fn a_node_is_64_bytes() {
        assert_eq!(std::mem::size_of::<Node>(), 64);
    }

    /// Sizes past what the packed node holds, and entries charged other than their digest's
    /// size, keep both sizes; the byte count follows the charges.
    #[test]
    fn odd_sizes_are_kept_whole() {
        let mut idx: BlobIndex = BlobIndex::new();
        let huge = BlobKey::new(
            InstanceName::default_instance(),
            Digest {
                size: 1 << 60,
                ..Digest::of(DigestFunction::Blake3, b"huge")
            },
        );
        idx.insert(huge.clone(), Entry::fresh(1 << 60, 1));
        idx.insert(key(1), Entry::fresh(4096, 2));
        assert_eq!(idx.bytes(), (1 << 60) + 4096);
        assert_eq!(idx.peek(&huge).unwrap().size, 1 << 60);
        assert_eq!(idx.peek(&key(1)).unwrap().size, 4096);
        let keys: Vec<BlobKey> = idx.iter().map(|(k, _)| k).collect();
        assert_eq!(keys, vec![key(1), huge.clone()]);
        // Charged as its digest again: back in the node.
        idx.insert(key(1), Entry::fresh(1, 3));
        assert_eq!(idx.bytes(), (1 << 60) + 1);
        assert_eq!(idx.odd.len(), 1);
        assert_eq!(idx.remove(&huge).unwrap().size, 1 << 60);
        assert!(idx.odd.is_empty());
        assert_eq!(idx.bytes(), 1);
    }

    /// An instance's number is freed with its last blob and reused by another name; the
    /// first name is not found through it afterwards.
    #[test]
    fn instance_numbers_are_reused_without_mixing_names() {
        let mut idx: BlobIndex = BlobIndex::new();
        let a = BlobKey::new(InstanceName::new("a").unwrap(), key(1).digest);
        let b = BlobKey::new(InstanceName::new("b").unwrap(), key(1).digest);
        idx.insert(a.clone(), Entry::fresh(1, 1));
        idx.insert(key(2), Entry::fresh(1, 1));
        assert!(idx.peek(&a).is_some());
        assert!(idx.peek(&b).is_none(), "same digest, another instance");
        idx.remove(&a);
        idx.insert(b.clone(), Entry::fresh(1, 2));
        assert_eq!(idx.instances.numbers.len(), 2);
        assert!(idx.peek(&a).is_none(), "a's number now names b");
        assert!(idx.peek(&b).is_some());
        assert_eq!(
            idx.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            vec![b, key(2)]
        );
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
        let instances = [
            InstanceName::default_instance(),
            InstanceName::new("other").unwrap(),
        ];
        for step in 0..20_000u64 {
            let n = next();
            // Two instances, each name parsed afresh or not (the index's cache of the last
            // name looked up must not tell them apart by allocation alone).
            let instance = match n % 3 {
                0 => instances[0].clone(),
                1 => instances[1].clone(),
                _ => InstanceName::new("other").unwrap(),
            };
            // Sizes that fit the packed node (the entry charged as the digest) and ones that
            // do not (charged otherwise, as the action cache does).
            let k = BlobKey::new(
                instance,
                Digest::of(DigestFunction::Sha256, &[(n >> 8) as u8 % 24]),
            );
            match next() % 6 {
                0 | 1 => {
                    // Whole seconds: the index keeps the persisted access time to the second.
                    let size = if next() % 2 == 0 {
                        k.digest.size
                    } else {
                        next() % 100
                    };
                    let e = Entry::fresh(size, step * NANOS);
                    idx.insert(k.clone(), e);
                    model_bytes += e.size;
                    if let Some(old) = model.put(k, e) {
                        model_bytes -= old.size;
                    }
                }
                2 => {
                    let a = idx.touch(&k, step * NANOS).map(|e| *e);
                    let b = model.get_mut(&k).map(|e| {
                        e.atime = e.atime.max(step * NANOS);
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
                    if let Some(mut e) = idx.peek_mut(&k) {
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
                let a: Vec<(BlobKey, Entry)> = idx.iter().collect();
                let b: Vec<(BlobKey, Entry)> = model.iter().map(|(k, e)| (k.clone(), *e)).collect();
                assert_eq!(a, b, "step {step}");
            }
        }
    }
}
