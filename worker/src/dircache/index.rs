//! The directory cache's bookkeeping, without I/O: which input roots are cached, how many
//! bytes each holds, which are leased by running actions, which subtree lies where (and which
//! directories came and went, for the scheduler), and what to evict to stay under the byte
//! cap (least recently used first, never a leased entry).
//!
//! An entry is keyed by the input root it was built for ([`BlobKey`]: instance and
//! `Directory` digest). Every directory inside an entry is also findable by its own digest
//! ([`Index::lease_subtree`]), so a subtree shared by two input roots is kept once, inside the
//! first root's entry, and reused from there.

use kiln_reapi::digest::BlobKey;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

/// What [`Index::lease_root`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootLookup {
    /// Cached and now leased; `verified`: its files were checked in this process.
    Hit { verified: bool },
    /// Being built by another action: not usable yet.
    Building,
    /// Not cached.
    Miss,
}

/// What [`Index::evict`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Evicted {
    /// Forgotten: remove it from disk now.
    Now,
    /// Leased: removed at its last release (no one leases it meanwhile).
    AtRelease,
    /// Not there, or evicted already.
    No,
}

/// A directory inside an entry: `rel` below the root of entry `entry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    /// The entry holding it (leased by the caller until released).
    pub entry: BlobKey,
    /// Its path below the entry's root (empty: the root itself).
    pub rel: PathBuf,
}

#[derive(Debug)]
enum State {
    Building,
    Ready { verified: bool },
}

#[derive(Debug)]
struct Entry {
    bytes: u64,
    leases: u32,
    used: u64,
    state: State,
    /// Evicted while leased: removed when the last lease is released.
    doomed: bool,
    /// The directories inside it (digest, path below its root), root included.
    dirs: Vec<(BlobKey, PathBuf)>,
}

/// Counters since start.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Input roots found cached.
    pub hits: u64,
    /// Input roots not cached.
    pub misses: u64,
    /// Subtrees of missed roots linked from an entry into the action's tree.
    pub subtree_hits: u64,
    /// Entries evicted (by the cap, or because an action changed one of their files).
    pub evictions: u64,
}

/// The cache's state.
#[derive(Debug)]
pub struct Index {
    cap: u64,
    bytes: u64,
    clock: u64,
    entries: HashMap<BlobKey, Entry>,
    /// Ready entries by last use (the clock when used), oldest first.
    by_use: BTreeMap<u64, BlobKey>,
    /// Directory → the entries holding it, each with its path there.
    subtrees: HashMap<BlobKey, Vec<(BlobKey, PathBuf)>>,
    counts: Counts,
    /// Directories (keys of `subtrees`) that became held (`true`) or stopped being held
    /// (`false`) since [`Index::take_changes`]; only the last change of each counts.
    changes: HashMap<BlobKey, bool>,
}

impl Index {
    /// An empty index holding at most `cap` bytes of entries.
    pub fn new(cap: u64) -> Index {
        Index {
            cap,
            bytes: 0,
            clock: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
            subtrees: HashMap::new(),
            counts: Counts::default(),
            changes: HashMap::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn touch(&mut self, key: &BlobKey) {
        let now = self.tick();
        if let Some(e) = self.entries.get_mut(key) {
            self.by_use.remove(&e.used);
            e.used = now;
            self.by_use.insert(now, key.clone());
        }
    }

    /// Looks up the input root `key`, leasing it on a hit.
    pub fn lease_root(&mut self, key: &BlobKey) -> RootLookup {
        let found = match self.entries.get_mut(key) {
            None => RootLookup::Miss,
            Some(e) if e.doomed => RootLookup::Miss,
            Some(Entry {
                state: State::Building,
                ..
            }) => RootLookup::Building,
            Some(e) => {
                e.leases += 1;
                let State::Ready { verified } = e.state else {
                    unreachable!("matched above")
                };
                RootLookup::Hit { verified }
            }
        };
        if let RootLookup::Hit { .. } = found {
            self.touch(key);
        }
        found
    }

    /// Counts an action's input root as laid out from the cache (`hit`) or not.
    pub fn note_root(&mut self, hit: bool) {
        if hit {
            self.counts.hits += 1;
        } else {
            self.counts.misses += 1;
        }
    }

    /// Counts `n` subtrees of a missed root linked from entries.
    pub fn note_subtrees(&mut self, n: u64) {
        self.counts.subtree_hits += n;
    }

    /// Finds the directory `dir` inside some ready entry and leases that entry.
    pub fn lease_subtree(&mut self, dir: &BlobKey) -> Option<Place> {
        let places = self.subtrees.get(dir)?;
        let (entry, rel) = places.iter().find(|(k, _)| {
            self.entries
                .get(k)
                .is_some_and(|e| !e.doomed && matches!(e.state, State::Ready { verified: true }))
        })?;
        let place = Place {
            entry: entry.clone(),
            rel: rel.clone(),
        };
        if let Some(e) = self.entries.get_mut(&place.entry) {
            e.leases += 1;
        }
        self.touch(&place.entry);
        Some(place)
    }

    /// Claims `key` for building an entry of `bytes`: `false` when it exists or is being
    /// built, or would not fit under the cap even alone.
    pub fn begin(&mut self, key: &BlobKey, bytes: u64) -> bool {
        if bytes > self.cap || self.entries.contains_key(key) {
            return false;
        }
        self.entries.insert(
            key.clone(),
            Entry {
                bytes,
                leases: 1,
                used: 0,
                state: State::Building,
                doomed: false,
                dirs: Vec::new(),
            },
        );
        true
    }

    /// A build claimed with [`Index::begin`] failed: forgets it.
    pub fn abandon(&mut self, key: &BlobKey) {
        if matches!(
            self.entries.get(key),
            Some(Entry {
                state: State::Building,
                ..
            })
        ) {
            self.entries.remove(key);
        }
    }

    /// A build claimed with [`Index::begin`] is in place, holding the directories `dirs`; it
    /// stays leased by its builder. Returns the entries to remove from disk to get back under
    /// the cap.
    pub fn finish(&mut self, key: &BlobKey, dirs: Vec<(BlobKey, PathBuf)>) -> Vec<BlobKey> {
        let Some(e) = self.entries.get_mut(key) else {
            return Vec::new();
        };
        // Evicted while it was being built (an action changed a file it holds): it never
        // becomes ready, and goes at its builder's release.
        if !matches!(e.state, State::Building) || e.doomed {
            return Vec::new();
        }
        e.state = State::Ready { verified: true };
        let bytes = e.bytes;
        self.add(key, bytes, dirs);
        self.touch(key);
        self.over_cap()
    }

    /// An entry found on disk at start-up (not leased, not yet verified in this process),
    /// oldest first. Returns the entries to remove to stay under the cap.
    pub fn load(
        &mut self,
        key: BlobKey,
        bytes: u64,
        dirs: Vec<(BlobKey, PathBuf)>,
    ) -> Vec<BlobKey> {
        if self.entries.contains_key(&key) {
            return Vec::new();
        }
        self.entries.insert(
            key.clone(),
            Entry {
                bytes,
                leases: 0,
                used: 0,
                state: State::Ready { verified: false },
                doomed: false,
                dirs: Vec::new(),
            },
        );
        self.add(&key, bytes, dirs);
        self.touch(&key);
        self.over_cap()
    }

    fn add(&mut self, key: &BlobKey, bytes: u64, dirs: Vec<(BlobKey, PathBuf)>) {
        self.bytes = self.bytes.saturating_add(bytes);
        // Only a checked entry lends its subtrees (`lease_subtree`): one loaded at start-up
        // reports its root now and the rest once checked (`verified`).
        let checked = self
            .entries
            .get(key)
            .is_some_and(|e| matches!(e.state, State::Ready { verified: true }));
        for (dir, rel) in &dirs {
            let places = self.subtrees.entry(dir.clone()).or_default();
            if places.is_empty() && (checked || dir == key) {
                self.changes.insert(dir.clone(), true);
            }
            places.push((key.clone(), rel.clone()));
        }
        if let Some(e) = self.entries.get_mut(key) {
            e.dirs = dirs;
        }
    }

    /// Records that a loaded entry's files were all found intact.
    pub fn verified(&mut self, key: &BlobKey) {
        if let Some(Entry {
            state: State::Ready { verified },
            dirs,
            ..
        }) = self.entries.get_mut(key)
        {
            if !*verified {
                *verified = true;
                for (dir, _) in dirs.iter() {
                    self.changes.insert(dir.clone(), true);
                }
            }
        }
    }

    /// Releases one lease of `key`; returns the entries now to be removed from disk: `key`
    /// itself when it was evicted while leased, and any that a cache over its cap (while
    /// every entry was leased) can now give up.
    pub fn release(&mut self, key: &BlobKey) -> Vec<BlobKey> {
        let Some(e) = self.entries.get_mut(key) else {
            return Vec::new();
        };
        e.leases = e.leases.saturating_sub(1);
        if e.leases == 0 && e.doomed {
            self.forget(key);
            return vec![key.clone()];
        }
        self.over_cap()
    }

    /// Evicts `key` (an action changed one of its files, or its files failed a check). A
    /// leased entry is removed at its last release, and no one leases it meanwhile.
    pub fn evict(&mut self, key: &BlobKey) -> Evicted {
        let Some(e) = self.entries.get_mut(key) else {
            return Evicted::No;
        };
        if e.doomed {
            return Evicted::No;
        }
        e.doomed = true;
        self.counts.evictions += 1;
        if e.leases == 0 {
            self.forget(key);
            return Evicted::Now;
        }
        Evicted::AtRelease
    }

    /// The directories (input roots and every directory inside an entry) that came to be
    /// held, and stopped being held, since the last call (for reports to the scheduler); with
    /// `all`, instead of the changes, every directory an entry not evicted holds and can lend
    /// (all of a checked entry's, the root of one loaded at start-up), the entries' roots
    /// last: the scheduler drops the facts it got first when it must, and a report cut
    /// short keeps its end.
    pub fn take_changes(&mut self, all: bool) -> (Vec<BlobKey>, Vec<BlobKey>) {
        let changes = std::mem::take(&mut self.changes);
        if all {
            let entries = &self.entries;
            let lends = |dir: &BlobKey, places: &[(BlobKey, PathBuf)]| {
                places.iter().any(|(k, _)| {
                    entries.get(k).is_some_and(|e| {
                        !e.doomed
                            && (k == dir || matches!(e.state, State::Ready { verified: true }))
                    })
                })
            };
            let (mut roots, mut inner): (Vec<BlobKey>, Vec<BlobKey>) = (Vec::new(), Vec::new());
            for (dir, places) in &self.subtrees {
                if lends(dir, places) {
                    if entries.contains_key(dir) {
                        roots.push(dir.clone());
                    } else {
                        inner.push(dir.clone());
                    }
                }
            }
            inner.append(&mut roots);
            return (inner, Vec::new());
        }
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for (dir, held) in changes {
            if held {
                added.push(dir);
            } else {
                removed.push(dir);
            }
        }
        (added, removed)
    }

    /// The entries not evicted, built or being built.
    pub fn keys(&self) -> Vec<BlobKey> {
        self.entries
            .iter()
            .filter(|(_, e)| !e.doomed)
            .map(|(k, _)| k.clone())
            .collect()
    }

    fn forget(&mut self, key: &BlobKey) {
        let Some(e) = self.entries.remove(key) else {
            return;
        };
        self.by_use.remove(&e.used);
        if !matches!(e.state, State::Building) {
            self.bytes = self.bytes.saturating_sub(e.bytes);
        }
        for (dir, _) in e.dirs {
            if let Some(places) = self.subtrees.get_mut(&dir) {
                places.retain(|(k, _)| k != key);
                if places.is_empty() {
                    self.subtrees.remove(&dir);
                    self.changes.insert(dir, false);
                }
            }
        }
    }

    /// Evicts unleased entries, least recently used first, until the cache is under its cap.
    fn over_cap(&mut self) -> Vec<BlobKey> {
        let mut out = Vec::new();
        if self.bytes <= self.cap {
            return out;
        }
        let candidates: Vec<BlobKey> = self.by_use.values().cloned().collect();
        for key in candidates {
            if self.bytes <= self.cap {
                break;
            }
            if self.entries.get(&key).is_some_and(|e| e.leases == 0)
                && self.evict(&key) == Evicted::Now
            {
                out.push(key);
            }
        }
        out
    }

    /// The cap.
    pub fn capacity(&self) -> u64 {
        self.cap
    }

    /// Bytes held by ready entries.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Ready entries.
    pub fn entries(&self) -> usize {
        self.entries
            .values()
            .filter(|e| matches!(e.state, State::Ready { .. }))
            .count()
    }

    /// The counters.
    pub fn counts(&self) -> Counts {
        self.counts
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

    fn built(index: &mut Index, k: &BlobKey, bytes: u64, dirs: &[(u8, &str)]) -> Vec<BlobKey> {
        assert!(index.begin(k, bytes));
        let dirs = dirs
            .iter()
            .map(|(n, rel)| (key(*n), PathBuf::from(rel)))
            .collect();
        index.finish(k, dirs)
    }

    #[test]
    fn a_built_root_is_a_hit_and_its_subtrees_are_found() {
        let mut index = Index::new(100);
        let root = key(1);
        assert_eq!(index.lease_root(&root), RootLookup::Miss);
        assert!(index.begin(&root, 10));
        assert!(!index.begin(&root, 10), "claimed once");
        assert_eq!(index.lease_root(&root), RootLookup::Building);
        assert!(index
            .finish(
                &root,
                vec![(root.clone(), PathBuf::new()), (key(2), "a/b".into())]
            )
            .is_empty());
        assert_eq!(index.lease_root(&root), RootLookup::Hit { verified: true });
        assert_eq!(
            index.lease_subtree(&key(2)),
            Some(Place {
                entry: root.clone(),
                rel: "a/b".into()
            })
        );
        assert_eq!(index.lease_subtree(&key(3)), None);
        index.note_root(true);
        index.note_root(false);
        index.note_subtrees(1);
        assert_eq!(
            index.counts(),
            Counts {
                hits: 1,
                misses: 1,
                subtree_hits: 1,
                evictions: 0
            }
        );
        assert_eq!((index.bytes(), index.entries()), (10, 1));
    }

    #[test]
    fn eviction_takes_the_least_recently_used_and_never_a_leased_entry() {
        let mut index = Index::new(30);
        let (a, b, c, d) = (key(1), key(2), key(3), key(4));
        assert!(built(&mut index, &a, 10, &[]).is_empty());
        assert!(index.release(&a).is_empty());
        assert!(built(&mut index, &b, 10, &[]).is_empty());
        assert!(index.release(&b).is_empty());
        assert!(built(&mut index, &c, 10, &[]).is_empty());
        assert!(index.release(&c).is_empty());
        // a is used again (and still leased), so b is the oldest unleased.
        assert_eq!(index.lease_root(&a), RootLookup::Hit { verified: true });
        assert_eq!(built(&mut index, &d, 10, &[]), vec![b.clone()]);
        assert_eq!(index.lease_root(&b), RootLookup::Miss);
        // Everything else leased: over the cap until a lease ends.
        assert_eq!(index.lease_root(&c), RootLookup::Hit { verified: true });
        let e = key(5);
        assert!(
            built(&mut index, &e, 10, &[]).is_empty(),
            "a, c, d, e all leased"
        );
        assert_eq!(index.bytes(), 40);
        // Once a lease ends, the cache gets back under its cap.
        assert_eq!(index.release(&d), vec![d.clone()]);
        assert_eq!(index.bytes(), 30);
        assert!(!index.begin(&key(6), 31), "larger than the cap alone");
    }

    #[test]
    fn an_entry_evicted_while_leased_goes_at_its_last_release_and_takes_its_subtrees() {
        let mut index = Index::new(100);
        let root = key(1);
        built(&mut index, &root, 10, &[(2, "sub")]);
        assert_eq!(index.lease_root(&root), RootLookup::Hit { verified: true });
        assert_eq!(index.evict(&root), Evicted::AtRelease, "two leases");
        assert_eq!(index.evict(&root), Evicted::No, "evicted once");
        assert_eq!(
            index.lease_root(&root),
            RootLookup::Miss,
            "not leased again"
        );
        assert_eq!(index.lease_subtree(&key(2)), None);
        assert!(index.release(&root).is_empty());
        assert_eq!(
            index.release(&root),
            vec![root.clone()],
            "last lease: remove it"
        );
        assert_eq!((index.bytes(), index.entries()), (0, 0));
        assert!(index.begin(&root, 10), "can be built again");
        assert_eq!(index.counts().evictions, 1);
    }

    #[test]
    fn loaded_entries_are_unverified_and_their_subtrees_not_lent_until_checked() {
        let mut index = Index::new(15);
        assert!(index
            .load(key(1), 10, vec![(key(2), "x".into())])
            .is_empty());
        assert_eq!(index.lease_subtree(&key(2)), None, "not checked yet");
        assert_eq!(
            index.lease_root(&key(1)),
            RootLookup::Hit { verified: false }
        );
        index.verified(&key(1));
        assert!(index.lease_subtree(&key(2)).is_some());
        // A second entry over the cap evicts the oldest unleased one: here none is unleased.
        assert!(
            index.load(key(3), 10, vec![]).len() == 1,
            "key(3) itself is unleased"
        );
        assert_eq!(index.lease_root(&key(3)), RootLookup::Miss);
    }

    fn sorted((mut a, mut r): (Vec<BlobKey>, Vec<BlobKey>)) -> (Vec<BlobKey>, Vec<BlobKey>) {
        a.sort();
        r.sort();
        (a, r)
    }

    #[test]
    fn changes_of_directories_are_reported_once_and_a_full_report_lists_what_is_held() {
        let mut index = Index::new(100);
        // Entry 1 holds directories 1 (its root) and 5; entry 2 holds 2 and 5 too.
        built(&mut index, &key(1), 10, &[(1, ""), (5, "x")]);
        built(&mut index, &key(2), 10, &[(2, ""), (5, "y")]);
        assert!(index.begin(&key(3), 10), "being built: not reported");
        let mut expected = vec![key(1), key(2), key(5)];
        expected.sort();
        assert_eq!(sorted(index.take_changes(false)), (expected, vec![]));
        assert_eq!(index.take_changes(false), (vec![], vec![]));
        assert_eq!(index.evict(&key(1)), Evicted::AtRelease);
        let (mut all, removed) = index.take_changes(true);
        all.sort();
        let mut held = vec![key(2), key(5)];
        held.sort();
        assert_eq!((all, removed), (held, vec![]), "evicted: not held any more");
        assert_eq!(index.release(&key(1)), vec![key(1)]);
        assert_eq!(
            index.take_changes(false),
            (vec![], vec![key(1)]),
            "5 is still held by entry 2"
        );
        assert_eq!(index.evict(&key(2)), Evicted::AtRelease);
        index.release(&key(2));
        assert_eq!(
            sorted(index.take_changes(false)),
            sorted((vec![], vec![key(2), key(5)]))
        );
        // Built and evicted between two reports: reported as not held.
        built(&mut index, &key(4), 10, &[(4, "")]);
        assert_eq!(index.evict(&key(4)), Evicted::AtRelease);
        index.release(&key(4));
        assert_eq!(index.take_changes(false), (vec![], vec![key(4)]));
    }

    #[test]
    fn an_entry_loaded_at_start_up_reports_its_root_and_the_rest_once_checked() {
        let mut index = Index::new(100);
        index.load(
            key(1),
            10,
            vec![(key(1), PathBuf::new()), (key(5), "x".into())],
        );
        built(&mut index, &key(2), 10, &[(2, ""), (6, "y")]);
        let mut first = vec![key(1), key(2), key(6)];
        first.sort();
        assert_eq!(sorted(index.take_changes(false)), (first, vec![]));
        let (all, _) = index.take_changes(true);
        assert_eq!(all.len(), 3, "{all:?}");
        assert!(
            all[1..].contains(&key(1)) && all[1..].contains(&key(2)),
            "roots last: {all:?}"
        );
        index.verified(&key(1));
        assert_eq!(
            index.take_changes(false).0.len(),
            2,
            "1 and 5, once checked"
        );
        assert!(index.take_changes(true).0.contains(&key(5)));
    }

    #[test]
    fn a_build_evicted_before_it_finished_never_becomes_ready() {
        let mut index = Index::new(100);
        assert!(index.begin(&key(1), 10));
        assert_eq!(index.evict(&key(1)), Evicted::AtRelease);
        assert!(index.finish(&key(1), vec![(key(2), "x".into())]).is_empty());
        assert_eq!(index.lease_root(&key(1)), RootLookup::Miss);
        assert_eq!(index.lease_subtree(&key(2)), None);
        assert_eq!((index.bytes(), index.entries()), (0, 0));
        assert_eq!(
            index.take_changes(false),
            (vec![], vec![]),
            "never reported"
        );
        assert_eq!(
            index.release(&key(1)),
            vec![key(1)],
            "removed at its builder's release"
        );
        assert_eq!(index.take_changes(false), (vec![], vec![]));
    }

    #[test]
    fn an_abandoned_build_is_forgotten() {
        let mut index = Index::new(100);
        assert!(index.begin(&key(1), 5));
        index.abandon(&key(1));
        assert_eq!(index.lease_root(&key(1)), RootLookup::Miss);
        assert_eq!(index.bytes(), 0);
    }
}
