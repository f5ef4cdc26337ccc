//! The owner shard's index of committed blobs (sans-IO): size, access time, whether the bytes
//! were verified by this process, and pins, in least-recently-used order.

use kiln_reapi::digest::BlobKey;
use lru::LruCache;
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

/// Blobs in LRU order with their total size.
pub struct BlobIndex<S = VerifiedKeys> {
    map: LruCache<BlobKey, Entry, S>,
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
        BlobIndex {
            map: LruCache::unbounded_with_hasher(S::default()),
            bytes: 0,
        }
    }

    /// Number of blobs.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when no blob is indexed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total bytes of indexed blobs.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Adds (or replaces) a blob as the most recently used.
    pub fn insert(&mut self, key: BlobKey, entry: Entry) {
        self.bytes += entry.size;
        if let Some(old) = self.map.put(key, entry) {
            self.bytes -= old.size;
        }
    }

    /// Every blob, most recently used first.
    pub fn iter(&self) -> impl Iterator<Item = (&BlobKey, &Entry)> {
        self.map.iter()
    }

    /// Looks a blob up without changing its recency.
    pub fn peek(&self, key: &BlobKey) -> Option<&Entry> {
        self.map.peek(key)
    }

    /// Marks a blob used at `now` and returns it.
    pub fn touch(&mut self, key: &BlobKey, now: u64) -> Option<&mut Entry> {
        let entry = self.map.get_mut(key)?;
        entry.atime = entry.atime.max(now);
        Some(entry)
    }

    /// Mutable access without changing recency.
    pub fn peek_mut(&mut self, key: &BlobKey) -> Option<&mut Entry> {
        self.map.peek_mut(key)
    }

    /// Forgets a blob.
    pub fn remove(&mut self, key: &BlobKey) -> Option<Entry> {
        let entry = self.map.pop(key)?;
        self.bytes -= entry.size;
        Some(entry)
    }

    /// The access time of the least recently used blob.
    pub fn oldest_atime(&self) -> Option<u64> {
        self.map.peek_lru().map(|(_, e)| e.atime)
    }

    /// Removes and returns the least recently used blob that is not pinned. Pinned blobs met on
    /// the way are in use, so they move to the most-recent end.
    pub fn pop_oldest_unpinned(&mut self) -> Option<(BlobKey, Entry)> {
        for _ in 0..self.map.len() {
            let pinned = self.map.peek_lru().map(|(_, e)| e.pins > 0)?;
            if !pinned {
                let (key, entry) = self.map.pop_lru()?;
                self.bytes -= entry.size;
                return Some((key, entry));
            }
            let key = self.map.peek_lru().map(|(k, _)| k.clone())?;
            self.map.promote(&key);
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
}
