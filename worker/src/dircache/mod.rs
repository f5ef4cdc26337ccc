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

use crate::materialise::remove_tree;
use disk::Dirs;
use index::{Counts, Evicted, Index, Place, RootLookup};
use kiln_reapi::digest::{BlobKey, Digest};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

/// The cache: its directory and its index.
pub struct DirCache {
    dirs: Dirs,
    index: Mutex<Index>,
    /// Tells this process's counts from another's in reports.
    run: u64,
}

/// What Kiln keeps directly under a data directory besides the directory cache.
const DATA_DIR_NAMES: &[&str] = &[
    "cas", "ac", "ac-tmp", "tmp", "work", "tls", "auth", "identity", "worker",
];

/// Checks that a cache at `dir` keeps out of the data directory's other contents and of the
/// work directory (its start-up clears and removes what it does not know under `dir`; the
/// work directory is emptied at every start).
pub fn check_place(dir: &Path, data_dir: &Path, work_dir: &Path) -> Result<(), String> {
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let (dir, data_dir, work_dir) = (abs(dir), abs(data_dir), abs(work_dir));
    for (other, what) in [
        (&data_dir, "the data directory"),
        (&work_dir, "the work directory"),
    ] {
        if other.starts_with(&dir) {
            return Err(format!(
                "{} would hold {what} {}",
                dir.display(),
                other.display()
            ));
        }
    }
    if dir.starts_with(&work_dir) {
        return Err(format!(
            "{} is inside the work directory, which is emptied at every start",
            dir.display()
        ));
    }
    if let Ok(below) = dir.strip_prefix(&data_dir) {
        if below
            .components()
            .next()
            .is_some_and(|c| DATA_DIR_NAMES.iter().any(|n| c.as_os_str() == *n))
        {
            return Err(format!(
                "{} is inside a directory Kiln keeps in the data directory",
                dir.display()
            ));
        }
    }
    Ok(())
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
        let mut index = self.cache.lock();
        let removed = index.release(&self.key);
        self.cache.settle(index, removed);
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
        for f in found {
            evicted.extend(index.load(f.key, f.bytes, f.dirs));
        }
        for key in &evicted {
            if let Ok(Some(trash)) = disk::detach(&dirs, key) {
                let _ = remove_tree(&trash);
            }
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

    /// Carries out removals the index decided, while it is still locked (`index`): the
    /// entries `removed` leave the cache's names at once, so that no new entry of the same
    /// name can be installed before they are gone; their trees are deleted after the lock is
    /// released, on tokio's blocking pool when there is one.
    fn settle(&self, index: MutexGuard<'_, Index>, removed: Vec<BlobKey>) {
        let mut trash = Vec::new();
        for key in &removed {
            match disk::detach(&self.dirs, key) {
                Ok(Some(t)) => trash.push(t),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(entry = ?key, error = %e, "cannot remove a directory-cache entry")
                }
            }
        }
        drop(index);
        if trash.is_empty() {
            return;
        }
        let remove = move || {
            for t in trash {
                if let Err(e) = remove_tree(&t) {
                    tracing::warn!(dir = %t.display(), error = %e, "cannot delete a removed directory-cache entry");
                }
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
                        self.evict(key);
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
    /// built already, or is evicted and still leased, or does not fit.
    pub fn begin(self: &Arc<Self>, key: &BlobKey, bytes: u64) -> Option<Building> {
        self.lock().begin(key, bytes).then(|| Building {
            cache: self.clone(),
            key: key.clone(),
            done: false,
        })
    }

    /// Evicts `key` (an action changed one of its files): removed at once, or when its last
    /// lease is released (its manifest goes now, so that a crash meanwhile does not bring it
    /// back).
    pub fn evict(&self, key: &BlobKey) {
        let mut index = self.lock();
        match index.evict(key) {
            Evicted::Now => self.settle(index, vec![key.clone()]),
            Evicted::AtRelease => {
                if let Err(e) = disk::forget_manifest(&self.dirs, key) {
                    tracing::warn!(entry = ?key, error = %e, "cannot remove a directory-cache manifest");
                }
            }
            Evicted::No => {}
        }
    }

    /// Evicts every entry with a file of content `d` (blocking: reads their manifests). An
    /// entry's files are the same inodes as the CAS's, the executable copies' and other
    /// entries', so one changed file can be in many entries.
    pub fn evict_holding(&self, d: &Digest) {
        let keys = self.lock().keys();
        for key in keys {
            if disk::holds(&self.dirs, &key, d) {
                self.evict(&key);
            }
        }
    }

    /// Counts an action's input root as laid out from the cache (`hit`) or not.
    pub fn note_root(&self, hit: bool) {
        self.lock().note_root(hit);
    }

    /// Counts `n` subtrees of a missed root linked from entries into an action's tree.
    pub fn note_subtrees(&self, n: u64) {
        self.lock().note_subtrees(n);
    }

    /// The directories (input roots and the directories inside them) that came to be held
    /// and stopped being held since the last call; with `all`, every directory held instead
    /// of the changes (the first report of a session).
    pub fn take_changes(&self, all: bool) -> (Vec<BlobKey>, Vec<BlobKey>) {
        self.lock().take_changes(all)
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
        let mut index = self.cache.lock();
        let evicted = index.finish(&self.key, dirs);
        self.cache.settle(index, evicted);
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

#[cfg(test)]
mod tests {
    use super::check_place;
    use std::path::Path;

    #[test]
    fn the_cache_keeps_out_of_the_data_and_work_directories() {
        let ok = |d: &str| check_place(Path::new(d), Path::new("/data"), Path::new("/data/work"));
        assert_eq!(ok("/data/dircache"), Ok(()));
        assert_eq!(ok("/elsewhere/cache"), Ok(()));
        assert_eq!(ok("/data/mine/cache"), Ok(()));
        for bad in [
            "/data",
            "/",
            "/data/work/cache",
            "/data/work",
            "/data/cas/x",
            "/data/tmp",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
        let apart = check_place(Path::new("/w"), Path::new("/data"), Path::new("/w/work"));
        assert!(apart.is_err(), "an ancestor of the work directory");
    }
}
