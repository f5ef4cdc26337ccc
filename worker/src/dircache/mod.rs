//! The worker's directory cache: input trees kept laid out on disk, keyed by their root's
//! `Directory` digest, so an action whose input root was seen before gets its inputs by one
//! walk of hardlinks from the cache, with no tree to fetch, no blob to look up and nothing to
//! pin; and a new input root reuses, from any entry, every subtree some entry already holds.
//!
//! [`index`] keeps the bookkeeping (leases, byte cap, LRU eviction) without I/O; [`disk`] the
//! layout, the manifests and the hardlink walk. Entries are read-only, leased by every action
//! that uses them (a leased entry is never removed), survive a restart (checked file by file
//! against their manifest before their first use in a process), and an entry whose file an
//! action changed is evicted.

pub mod disk;
pub mod index;

use disk::{Dirs, Facts};
use index::{Counts, Index, Place, RootLookup};
use kiln_reapi::digest::BlobKey;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// The cache: its directory and its index.
pub struct DirCache {
    dirs: Dirs,
    index: Mutex<Index>,
    /// Tells this process's counts from another's in reports.
    run: u64,
}

/// A snapshot of the cache for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirCacheStats {
    /// Bytes the entries are charged.
    pub bytes: u64,
    /// The cap.
    pub capacity: u64,
    /// Entries.
    pub entries: u64,
    /// Counters since start.
    pub counts: Counts,
    /// This process's run (see [`DirCacheStats::report`]).
    pub run: u64,
}

impl DirCacheStats {
    /// As the worker reports it to the scheduler.
    pub fn report(&self) -> kiln_proto::worker::DirCacheReport {
        kiln_proto::worker::DirCacheReport {
            bytes: self.bytes,
            capacity: self.capacity,
            entries: self.entries,
            hits: self.counts.hits,
            misses: self.counts.misses,
            subtree_hits: self.counts.subtree_hits,
            evictions: self.counts.evictions,
            run: self.run,
        }
    }
}

/// One lease on an entry: the entry is not removed while a lease is held; dropping it
/// releases it (and removes an entry evicted meanwhile).
pub struct Lease {
    cache: Arc<DirCache>,
    key: BlobKey,
}

impl Lease {
    /// The leased entry.
    pub fn key(&self) -> &BlobKey {
        &self.key
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lease({:?})", self.key)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let removed = self.cache.lock().release(&self.key);
        for key in removed {
            self.cache.remove_later(key);
        }
    }
}

/// What looking up an input root gave.
pub enum RootHit {
    /// Cached (and checked): lay it out from here.
    Hit(Lease),
    /// Not usable: build it, or lay the tree out without the cache.
    Miss,
}

impl DirCache {
    /// Opens the cache in `root` holding at most `cap` bytes (blocking: reads every
    /// manifest).
    pub fn open(root: &Path, cap: u64) -> std::io::Result<Arc<DirCache>> {
        let dirs = Dirs::new(root);
        let found = disk::open(&dirs)?;
        let mut index = Index::new(cap);
        let mut evicted = Vec::new();
        for Facts { key, bytes, dirs } in found {
            evicted.extend(index.load(key, bytes, dirs));
        }
        for key in &evicted {
            disk::remove(&dirs, key)?;
        }
        tracing::info!(dir = %root.display(), entries = index.entries(), bytes = index.bytes(), "directory cache opened");
        Ok(Arc::new(DirCache {
            dirs,
            index: Mutex::new(index),
            run: uuid::Uuid::new_v4().as_u64_pair().0,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cache's directories.
    pub fn dirs(&self) -> &Dirs {
        &self.dirs
    }

    /// Removes `key` from disk: on tokio's blocking pool when there is one.
    fn remove_later(&self, key: BlobKey) {
        let dirs = self.dirs.clone();
        let remove = move || {
            if let Err(e) = disk::remove(&dirs, &key) {
                tracing::warn!(entry = ?key, error = %e, "cannot remove a directory-cache entry");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(remove)),
            Err(_) => remove(),
        }
    }

    fn lease(self: &Arc<Self>, key: BlobKey) -> Lease {
        Lease {
            cache: self.clone(),
            key,
        }
    }

    /// Looks up input root `key` (blocking: an entry found on disk at start-up is checked
    /// against its manifest before its first use, and evicted if it does not match).
    pub fn lease_root(self: &Arc<Self>, key: &BlobKey) -> RootHit {
        let found = self.lock().lease_root(key);
        match found {
            RootLookup::Hit { verified } => {
                let lease = self.lease(key.clone());
                if !verified {
                    if let Err(why) = disk::verify(&self.dirs, key) {
                        tracing::warn!(entry = ?key, %why, "directory-cache entry does not match its manifest: evicted");
                        self.lock().evict(key);
                        return RootHit::Miss;
                    }
                    self.lock().verified(key);
                }
                disk::touch(&self.dirs, key);
                RootHit::Hit(lease)
            }
            RootLookup::Building | RootLookup::Miss => RootHit::Miss,
        }
    }

    /// Finds the directory `dir` inside a checked entry, leased.
    pub fn lease_subtree(self: &Arc<Self>, dir: &BlobKey) -> Option<(Lease, Place)> {
        let place = self.lock().lease_subtree(dir)?;
        Some((self.lease(place.entry.clone()), place))
    }

    /// Claims input root `key` for building an entry charged `bytes`; `None` when it is being
    /// built already or does not fit.
    pub fn begin(self: &Arc<Self>, key: &BlobKey, bytes: u64) -> Option<Building> {
        self.lock().begin(key, bytes).then(|| Building {
            cache: self.clone(),
            key: key.clone(),
            done: false,
        })
    }

    /// Evicts `key` (an action changed one of its files): removed at once, or when its last
    /// lease is released.
    pub fn evict(&self, key: &BlobKey) {
        if self.lock().evict(key) {
            self.remove_later(key.clone());
        }
    }

    /// Counts an action's input root as laid out from the cache (`hit`) or not.
    pub fn note_root(&self, hit: bool) {
        self.lock().note_root(hit);
    }

    /// Counts a subtree of a missed root linked from an entry.
    pub fn note_subtree(&self) {
        self.lock().note_subtree();
    }

    /// The cache's size and counters.
    pub fn stats(&self) -> DirCacheStats {
        let index = self.lock();
        DirCacheStats {
            bytes: index.bytes(),
            capacity: index.capacity(),
            entries: index.entries() as u64,
            counts: index.counts(),
            run: self.run,
        }
    }
}

/// An entry being built: [`Building::finish`] once its tree is in place, or dropped to give
/// the claim up.
pub struct Building {
    cache: Arc<DirCache>,
    key: BlobKey,
    done: bool,
}

impl Building {
    /// The input root being built.
    pub fn key(&self) -> &BlobKey {
        &self.key
    }

    /// The entry's tree is in place (holding `dirs`): it becomes usable, leased by the
    /// caller; entries evicted to make room are removed.
    pub fn finish(mut self, dirs: Vec<(BlobKey, std::path::PathBuf)>) -> Lease {
        self.done = true;
        let evicted = self.cache.lock().finish(&self.key, dirs);
        for key in evicted {
            self.cache.remove_later(key);
        }
        self.cache.lease(self.key.clone())
    }
}

impl Drop for Building {
    fn drop(&mut self) {
        if !self.done {
            self.cache.lock().abandon(&self.key);
        }
    }
}
