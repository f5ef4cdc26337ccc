//! Laying out an action's inputs. With the directory cache on: an input root the cache holds
//! (as an entry, or as a directory inside one) is linked from there, with nothing fetched,
//! looked up or pinned; any other is fetched into the local CAS and materialised straight into
//! place (reusing whole every subtree an entry already holds), and its entry is built by an
//! [`EntryBuild`] that runs beside the action, off its critical path (the action waits for it
//! only before it releases its pins). Without the cache the tree is fetched and materialised.

use crate::action::WorkerContext;
use crate::dircache::{disk, Building, DirCache, Lease, RootHit};
use crate::error::{io, ActionError};
use crate::fetch::{fetch, InputTree, Source};
use crate::materialise::{link_from_cache, remove_tree, Materialiser};
use crate::tamper::SharedFiles;
use kiln_dataplane::store::tier::PinHolder;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How an action's input root was found in the directory cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// No cache on this worker.
    Off,
    /// Linked from the cache.
    Hit,
    /// Fetched and built.
    Miss,
}

/// A cache entry being built beside an action; its lease when it was built.
pub type EntryBuilding = tokio::task::JoinHandle<Option<Lease>>;

/// An action's inputs in place.
pub struct Inputs {
    /// The input files the tree shares with the stores, to check after the run.
    pub shared: SharedFiles,
    /// Leases on the cache entries the tree was linked from: held until the action is done.
    pub leases: Vec<Lease>,
    /// How the root was found.
    pub cache: CacheUse,
    /// The cache entry of a missed root, being built beside the action: awaited before the
    /// action's pins are released (the build links the pinned blobs); its lease, held with
    /// the others until the action is done.
    pub building: Option<EntryBuilding>,
}

/// Lays out the input tree `root_digest` of `instance` at `root` (which must not exist);
/// the blobs fetched for it are pinned for `holder` into `pins`, to be released when the
/// action is done.
#[allow(clippy::too_many_arguments)]
pub async fn place(
    ctx: &WorkerContext,
    holder: PinHolder,
    source: &Source<'_>,
    instance: &InstanceName,
    function: i32,
    root_digest: Digest,
    root: &Path,
    pins: &mut Vec<BlobKey>,
) -> Result<Inputs, ActionError> {
    let key = BlobKey::new(instance.clone(), root_digest);
    if let Some(cache) = ctx.dircache.clone() {
        let (key, root) = (key.clone(), root.to_path_buf());
        let hit = blocking(root.clone(), move || link_cached(&cache, &key, &root)).await?;
        if let Some(cache) = &ctx.dircache {
            cache.note_root(hit.is_some());
        }
        if let Some(inputs) = hit {
            return Ok(inputs);
        }
    }
    let (tree, taken) = fetch(
        &ctx.local,
        holder,
        source,
        instance,
        root_digest,
        ctx.fetch_parallelism,
    )
    .await?;
    *pins = taken;
    let local = ctx.local.clone();
    let exec_cache = ctx.exec_cache.clone();
    let cache = ctx.dircache.clone();
    let (inst, root) = (instance.clone(), root.to_path_buf());
    let tree = Arc::new(tree);
    let laid = {
        let (local, exec_cache, cache, inst, tree) = (
            local.clone(),
            exec_cache.clone(),
            cache.clone(),
            inst.clone(),
            tree.clone(),
        );
        blocking(root.clone(), move || {
            std::fs::create_dir_all(&root).map_err(io("create", &root))?;
            let blob_path = |d: Digest| local.path(&inst, d);
            let m = Materialiser {
                blob_path: &blob_path,
                exec_cache: &exec_cache,
                function,
                cache: cache.as_ref().map(|c| (c, &inst)),
            };
            lay_out(cache.as_ref(), &m, &key, function, &tree, &root)
        })
        .await?
    };
    let (mut inputs, job) = laid;
    if let (Some(job), Some(cache)) = (job, cache) {
        inputs.building = Some(tokio::task::spawn_blocking(move || {
            let blob_path = |d: Digest| local.path(&inst, d);
            let m = Materialiser {
                blob_path: &blob_path,
                exec_cache: &exec_cache,
                function,
                cache: Some((&cache, &inst)),
            };
            job.run(&cache, &m, &tree)
        }));
    }
    Ok(inputs)
}

/// Lays out the fetched `tree` at `root` (existing, empty), straight from the CAS (and from
/// cache entries holding its subtrees); returns the inputs and, when the cache takes the tree,
/// the job that builds its entry (blocking).
fn lay_out(
    cache: Option<&Arc<DirCache>>,
    m: &Materialiser<'_>,
    key: &BlobKey,
    function: i32,
    tree: &InputTree,
    root: &Path,
) -> Result<(Inputs, Option<EntryBuild>), ActionError> {
    let (shared, leases) = m.materialise(tree, root)?;
    if let Some(cache) = cache {
        // Each lease is a subtree linked in from an entry.
        cache.note_subtrees(leases.len() as u64);
    }
    let job = cache.and_then(|c| EntryBuild::claim(c, key, function, tree));
    let inputs = Inputs {
        shared,
        leases,
        cache: if cache.is_some() {
            CacheUse::Miss
        } else {
            CacheUse::Off
        },
        building: None,
    };
    Ok((inputs, job))
}

/// Runs `work` on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    at: PathBuf,
    work: impl FnOnce() -> Result<T, ActionError> + Send + 'static,
) -> Result<T, ActionError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ActionError::io("lay out inputs", &at, std::io::Error::other(e)))?
}

/// Links input root `key` from the cache into `root` when an entry holds it.
fn link_cached(
    cache: &Arc<DirCache>,
    key: &BlobKey,
    root: &Path,
) -> Result<Option<Inputs>, ActionError> {
    let (lease, src) = match cache.lease_root(key) {
        RootHit::Hit(lease) => {
            let src = cache.dirs().entry(key);
            (lease, src)
        }
        RootHit::Miss => match cache.lease_subtree(key) {
            Some((lease, place)) => (lease, cache.dirs().place(&place)),
            None => return Ok(None),
        },
    };
    linked(cache, lease, &src, root, CacheUse::Hit)
}

/// Lays out the tree at `src` in leased entry `lease` at `root`; `None` when that failed
/// (the entry is evicted and `root` left empty).
fn linked(
    cache: &DirCache,
    lease: Lease,
    src: &Path,
    root: &Path,
    how: CacheUse,
) -> Result<Option<Inputs>, ActionError> {
    std::fs::create_dir_all(root).map_err(io("create", root))?;
    let mut shared = SharedFiles::default();
    if !link_from_cache(cache, src, root, lease.key(), &mut shared)? {
        return Ok(None);
    }
    Ok(Some(Inputs {
        shared,
        leases: vec![lease],
        cache: how,
        building: None,
    }))
}

/// The building of a cache entry for a missed input root, claimed in the cache (so no other
/// action builds it meanwhile) and run apart from laying the action's inputs out.
pub struct EntryBuild {
    building: Building,
    dirs: Vec<(BlobKey, PathBuf)>,
    manifest: kiln_proto::worker::DirCacheManifest,
}

impl EntryBuild {
    /// Claims an entry for `tree`; `None` when the cache will not take it (it is being built
    /// by another action, does not fit, or has modes that would lock the worker out of its own
    /// entry).
    fn claim(
        cache: &Arc<DirCache>,
        key: &BlobKey,
        function: i32,
        tree: &InputTree,
    ) -> Option<EntryBuild> {
        let manifest = disk::manifest(&key.instance, function, tree);
        let (facts, _) = disk::facts(&manifest).ok()?;
        if !facts.cacheable {
            return None;
        }
        let building = cache.begin(key, facts.bytes)?;
        Some(EntryBuild {
            building,
            dirs: facts.dirs,
            manifest,
        })
    }

    /// Builds the entry from the local CAS (whose blobs the action keeps pinned meanwhile) and
    /// puts it in place (blocking); returns its lease, which the action holds like the others.
    /// A failure is logged: the entry is not made.
    fn run(self, cache: &Arc<DirCache>, m: &Materialiser<'_>, tree: &InputTree) -> Option<Lease> {
        let built = cache.dirs().build_path();
        let key = self.building.key().clone();
        let result = std::fs::create_dir(&built)
            .map_err(io("create", &built))
            // The subtrees linked in from other entries need no lease once linked.
            .and_then(|()| m.materialise(tree, &built).map(drop))
            .and_then(|()| {
                disk::install(cache.dirs(), &key, &built, &self.manifest)
                    .map_err(io("install", &built))
            });
        match result {
            Ok(()) => Some(self.building.finish(self.dirs)),
            Err(e) => {
                let _ = remove_tree(&built);
                tracing::warn!(entry = ?key, error = %e, "cannot build a directory-cache entry");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tamper::Origin;
    use kiln_proto::reapi::{Directory, DirectoryNode, FileNode, NodeProperties, SymlinkNode};
    use kiln_reapi::digest::DigestFunction;
    use prost::Message;
    use std::collections::HashMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const F: DigestFunction = DigestFunction::Sha256;

    /// A CAS directory of read-only files named by hash, an executable cache and a cache.
    struct Fixture {
        dir: tempfile::TempDir,
        directories: HashMap<Digest, Directory>,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            for d in ["cas", "exec", "work"] {
                std::fs::create_dir(dir.path().join(d)).unwrap();
            }
            Fixture {
                dir,
                directories: HashMap::new(),
            }
        }

        fn path(&self, p: &str) -> PathBuf {
            self.dir.path().join(p)
        }

        fn open(&self, cap: u64) -> Arc<DirCache> {
            DirCache::open(&self.path("dircache"), cap).unwrap()
        }

        fn blob(&self, data: &[u8]) -> Digest {
            let d = Digest::of(F, data);
            let p = self.path("cas").join(d.hex());
            if !p.exists() {
                std::fs::write(&p, data).unwrap();
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).unwrap();
            }
            d
        }

        fn file(&self, name: &str, data: &[u8], exec: bool) -> FileNode {
            FileNode {
                name: name.into(),
                digest: Some(self.blob(data).to_proto()),
                is_executable: exec,
                node_properties: None,
            }
        }

        fn directory(&mut self, dir: Directory) -> Digest {
            let d = Digest::of(F, &dir.encode_to_vec());
            self.directories.insert(d, dir);
            d
        }

        fn sub(name: &str, d: Digest) -> DirectoryNode {
            DirectoryNode {
                name: name.into(),
                digest: Some(d.to_proto()),
            }
        }

        /// A shared subtree `lib/` of two files and a stamped, executable tool at the top.
        fn tree(&mut self, top_file: &[u8]) -> (Digest, Digest) {
            let lib = Directory {
                files: vec![
                    self.file("a.h", b"shared header", false),
                    self.file("b.h", b"second", false),
                ],
                node_properties: Some(NodeProperties {
                    properties: vec![],
                    mtime: Some(prost_types::Timestamp {
                        seconds: 1_234_567_890,
                        nanos: 0,
                    }),
                    unix_mode: Some(0o555),
                }),
                ..Default::default()
            };
            let lib = self.directory(lib);
            let mut stamped = self.file("stamped", b"stamped", false);
            stamped.node_properties = Some(NodeProperties {
                properties: vec![],
                mtime: Some(prost_types::Timestamp {
                    seconds: 1_000_000_000,
                    nanos: 0,
                }),
                unix_mode: Some(0o444),
            });
            let top = Directory {
                files: vec![
                    self.file("main.c", top_file, false),
                    self.file("tool", b"#!/bin/sh\n", true),
                    stamped,
                ],
                directories: vec![Self::sub("lib", lib)],
                symlinks: vec![SymlinkNode {
                    name: "link".into(),
                    target: "lib/a.h".into(),
                    node_properties: None,
                }],
                ..Default::default()
            };
            (self.directory(top), lib)
        }

        /// `n` trees of [`Fixture::tree`], each with its own top file.
        fn roots(&mut self, n: usize) -> Vec<(Digest, Vec<u8>)> {
            (0..n)
                .map(|i| {
                    let top = format!("top {i}").into_bytes();
                    (self.tree(&top).0, top)
                })
                .collect()
        }

        /// Lays out input root `root` at `at` as an action would, through `cache`.
        fn place(&self, cache: &Arc<DirCache>, root: Digest, at: &Path) -> Inputs {
            let key = BlobKey::new(InstanceName::default_instance(), root);
            std::fs::create_dir_all(at).unwrap();
            let hit = link_cached(cache, &key, at).unwrap();
            cache.note_root(hit.is_some());
            if let Some(inputs) = hit {
                return inputs;
            }
            let cas = self.path("cas");
            let blob_path = |d: Digest| cas.join(d.hex());
            let instance = InstanceName::default_instance();
            let exec = self.path("exec");
            let m = Materialiser {
                blob_path: &blob_path,
                exec_cache: &exec,
                function: F.proto() as i32,
                cache: Some((cache, &instance)),
            };
            let tree = InputTree {
                root,
                directories: self.directories.clone(),
            };
            let (inputs, job) =
                lay_out(Some(cache), &m, &key, F.proto() as i32, &tree, at).unwrap();
            // The entry's build, run here to its end (an action runs it beside itself), its
            // lease held with the others.
            let mut inputs = inputs;
            if let Some(lease) = job.and_then(|job| job.run(cache, &m, &tree)) {
                inputs.leases.push(lease);
            }
            inputs
        }
    }

    fn meta(p: &Path) -> std::fs::Metadata {
        std::fs::symlink_metadata(p).unwrap()
    }

    /// The layout every placement of [`Fixture::tree`] must have.
    fn assert_laid_out(at: &Path, top_file: &[u8]) {
        assert_eq!(std::fs::read(at.join("main.c")).unwrap(), top_file);
        assert_eq!(meta(&at.join("main.c")).mode() & 0o7777, 0o444);
        assert_eq!(meta(&at.join("tool")).mode() & 0o7777, 0o555);
        assert_eq!(meta(&at.join("stamped")).mtime(), 1_000_000_000);
        assert_eq!(std::fs::read(at.join("lib/a.h")).unwrap(), b"shared header");
        assert_eq!(meta(&at.join("lib")).mode() & 0o7777, 0o555);
        assert_eq!(meta(&at.join("lib")).mtime(), 1_234_567_890);
        assert_eq!(
            std::fs::read_link(at.join("link")).unwrap(),
            Path::new("lib/a.h")
        );
    }

    #[test]
    fn an_input_root_is_built_once_then_linked_from_the_cache() {
        let mut fx = Fixture::new();
        let cache = fx.open(1 << 30);
        let (root, _) = fx.tree(b"int main;");
        let first = fx.place(&cache, root, &fx.path("work/1"));
        assert_eq!(first.cache, CacheUse::Miss);
        assert_laid_out(&fx.path("work/1"), b"int main;");
        let second = fx.place(&cache, root, &fx.path("work/2"));
        assert_eq!(second.cache, CacheUse::Hit);
        assert_laid_out(&fx.path("work/2"), b"int main;");
        // The same inodes as the CAS's files, through the entry: nothing was copied.
        let cas_file = fx.path("cas").join(Digest::of(F, b"int main;").hex());
        assert_eq!(meta(&fx.path("work/2/main.c")).ino(), meta(&cas_file).ino());
        // Every file of the hit is recorded for the tamper check, as the entry's.
        let key = BlobKey::new(InstanceName::default_instance(), root);
        assert_eq!(second.shared.len(), 5, "main.c, tool, stamped, a.h, b.h");
        assert!(second
            .shared
            .inodes()
            .contains(&(meta(&cas_file).dev(), meta(&cas_file).ino())));
        let stats = cache.stats();
        assert_eq!(
            (stats.counts.hits, stats.counts.misses, stats.entries),
            (1, 1, 1)
        );
        // Leased while used: eviction leaves it alone; removed at the last release.
        cache.evict(&key);
        assert!(cache.dirs().entry(&key).is_dir());
        drop(first);
        assert!(cache.dirs().entry(&key).is_dir());
        drop(second);
        assert!(!cache.dirs().entry(&key).exists());
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn a_subtree_another_entry_holds_is_linked_from_it() {
        let mut fx = Fixture::new();
        let cache = fx.open(1 << 30);
        let (first, lib) = fx.tree(b"one");
        let (second, lib_again) = fx.tree(b"two");
        assert_eq!(lib, lib_again);
        drop(fx.place(&cache, first, &fx.path("work/1")));
        let placed = fx.place(&cache, second, &fx.path("work/2"));
        assert_eq!(placed.cache, CacheUse::Miss);
        assert_laid_out(&fx.path("work/2"), b"two");
        assert_eq!(cache.stats().counts.subtree_hits, 1);
        // A root that is a directory inside an entry is a hit.
        let only_lib = fx.place(&cache, lib, &fx.path("work/3"));
        assert_eq!(only_lib.cache, CacheUse::Hit);
        assert_eq!(
            std::fs::read(fx.path("work/3/a.h")).unwrap(),
            b"shared header"
        );
        assert_eq!(meta(&fx.path("work/3")).mtime(), 1_234_567_890);
    }

    #[test]
    fn entries_survive_a_restart_and_are_checked_before_their_first_use() {
        let mut fx = Fixture::new();
        let (kept, _) = fx.tree(b"kept");
        let (rewritten, _) = fx.tree(b"rewritten");
        let (retimed, _) = fx.tree(b"retimed");
        let cache = fx.open(1 << 30);
        for (i, root) in [kept, rewritten, retimed].into_iter().enumerate() {
            drop(fx.place(&cache, root, &fx.path(&format!("work/{i}"))));
        }
        let stamped = |root: Digest| {
            let key = BlobKey::new(InstanceName::default_instance(), root);
            cache.dirs().entry(&key).join("stamped")
        };
        let (rewritten_file, retimed_file) = (stamped(rewritten), stamped(retimed));
        drop(cache);
        // Changed while the worker was down (each entry's `stamped` is a copy of its own, not
        // the CAS's inode): other bytes with the mode and time put back, or only a new time.
        std::fs::set_permissions(&rewritten_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&rewritten_file, b"STAMPED").unwrap();
        std::fs::set_permissions(&rewritten_file, std::fs::Permissions::from_mode(0o444)).unwrap();
        let stamp = filetime::FileTime::from_unix_time(1_000_000_000, 0);
        filetime::set_file_mtime(&rewritten_file, stamp).unwrap();
        filetime::set_file_mtime(&retimed_file, filetime::FileTime::from_unix_time(5, 0)).unwrap();
        let cache = fx.open(1 << 30);
        assert_eq!(cache.stats().entries, 3);
        let kept_again = fx.place(&cache, kept, &fx.path("work/3"));
        assert_eq!(kept_again.cache, CacheUse::Hit);
        assert_laid_out(&fx.path("work/3"), b"kept");
        // Not hits: each is found not to match its manifest, evicted, and built again.
        for (root, top, at) in [
            (rewritten, &b"rewritten"[..], "work/4"),
            (retimed, b"retimed", "work/5"),
        ] {
            let again = fx.place(&cache, root, &fx.path(at));
            assert_eq!(again.cache, CacheUse::Miss, "{at}");
            assert_laid_out(&fx.path(at), top);
            assert_eq!(
                std::fs::read(fx.path(at).join("stamped")).unwrap(),
                b"stamped"
            );
        }
        assert_eq!(cache.stats().counts.evictions, 2);
        // An extra name in an entry is a mismatch too.
        drop(kept_again);
        drop(cache);
        let entry = {
            let c = fx.open(1 << 30);
            c.dirs()
                .entry(&BlobKey::new(InstanceName::default_instance(), kept))
        };
        std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(entry.join("planted"), b"x").unwrap();
        let cache = fx.open(1 << 30);
        assert_eq!(
            fx.place(&cache, kept, &fx.path("work/6")).cache,
            CacheUse::Miss
        );
        assert!(!fx.path("work/6/planted").exists());
    }

    #[test]
    fn a_cache_of_another_format_is_discarded_and_a_torn_entry_removed() {
        let mut fx = Fixture::new();
        let (root, _) = fx.tree(b"x");
        let cache = fx.open(1 << 30);
        drop(fx.place(&cache, root, &fx.path("work/1")));
        drop(cache);
        std::fs::write(fx.path("dircache/FORMAT"), b"kiln-dircache 99\n").unwrap();
        let cache = fx.open(1 << 30);
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(
            std::fs::read_dir(fx.path("dircache/entries"))
                .unwrap()
                .count(),
            0
        );
        assert_eq!(
            std::fs::read(fx.path("dircache/FORMAT")).unwrap(),
            disk::FORMAT
        );
        // A manifest cut short (a crash while it was written): its entry is removed.
        drop(fx.place(&cache, root, &fx.path("work/2")));
        drop(cache);
        let manifests: Vec<PathBuf> = std::fs::read_dir(fx.path("dircache/manifests"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(manifests.len(), 1);
        let bytes = std::fs::read(&manifests[0]).unwrap();
        std::fs::write(&manifests[0], &bytes[..bytes.len() / 2]).unwrap();
        let cache = fx.open(1 << 30);
        assert_eq!(cache.stats().entries, 0);
        assert_eq!(
            std::fs::read_dir(fx.path("dircache/entries"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn eviction_removes_the_least_recently_used_and_never_a_leased_entry() {
        let mut fx = Fixture::new();
        let roots: Vec<Digest> = (0..3)
            .map(|i| fx.tree(format!("root {i}").as_bytes()).0)
            .collect();
        let key = |d: Digest| BlobKey::new(InstanceName::default_instance(), d);
        // Room for one entry (each is charged its files' bytes and 4 KiB per directory).
        let cache = fx.open(9_000);
        drop(fx.place(&cache, roots[0], &fx.path("work/0")));
        let held = fx.place(&cache, roots[0], &fx.path("work/0-hit"));
        assert_eq!(held.cache, CacheUse::Hit);
        drop(fx.place(&cache, roots[1], &fx.path("work/1")));
        assert!(cache.dirs().entry(&key(roots[0])).is_dir(), "leased: kept");
        assert!(
            !cache.dirs().entry(&key(roots[1])).exists(),
            "over the cap and unleased"
        );
        drop(held);
        drop(fx.place(&cache, roots[2], &fx.path("work/2")));
        assert!(!cache.dirs().entry(&key(roots[0])).exists());
        assert!(cache.dirs().entry(&key(roots[2])).is_dir());
        assert_eq!(cache.stats().entries, 1);
    }

    #[test]
    fn a_file_changed_through_an_action_is_reported_as_the_entrys() {
        let mut fx = Fixture::new();
        let cache = fx.open(1 << 30);
        let (root, _) = fx.tree(b"victim");
        drop(fx.place(&cache, root, &fx.path("work/1")));
        let hit = fx.place(&cache, root, &fx.path("work/2"));
        let linked = fx.path("work/2/main.c");
        std::fs::set_permissions(&linked, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&linked, b"changed!").unwrap();
        let changed = hit.shared.changed();
        let key = BlobKey::new(InstanceName::default_instance(), root);
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].origin, Origin::DirCache(key.clone()));
        let rel = changed[0]
            .path
            .strip_prefix(cache.dirs().entry(&key))
            .unwrap();
        assert_eq!(
            disk::file_digest(cache.dirs(), &key, rel),
            Some(Digest::of(F, b"victim"))
        );
    }

    #[test]
    fn concurrent_actions_share_entries_and_subtrees_safely() {
        let mut fx = Fixture::new();
        let roots = fx.roots(4);
        let cache = fx.open(1 << 30);
        std::thread::scope(|s| {
            for t in 0..4 {
                let (fx, cache, roots) = (&fx, &cache, &roots);
                s.spawn(move || {
                    for round in 0..6 {
                        let (root, top) = &roots[(t + round) % roots.len()];
                        let at = fx.path(&format!("work/{t}-{round}"));
                        let placed = fx.place(cache, *root, &at);
                        assert_laid_out(&at, top);
                        drop(placed);
                    }
                });
            }
        });
        let stats = cache.stats();
        assert_eq!(stats.counts.hits + stats.counts.misses, 24);
        assert_eq!(stats.entries, 4, "each root built into one entry");
    }

    #[test]
    fn under_eviction_pressure_concurrent_actions_get_whole_trees() {
        let mut fx = Fixture::new();
        let roots = fx.roots(4);
        let (fx, roots) = (Arc::new(fx), Arc::new(roots));
        // Room for two entries (41 bytes of files and two directories each); removals run on
        // the runtime's blocking pool, as in the worker.
        let cap = 2 * (41 + 2 * 4096);
        let cache = fx.open(cap);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let (fx, cache, roots) = (fx.clone(), cache.clone(), roots.clone());
                rt.spawn_blocking(move || {
                    for round in 0..8 {
                        let (root, top) = &roots[(t + round) % roots.len()];
                        let at = fx.path(&format!("work/{t}-{round}"));
                        let placed = fx.place(&cache, *root, &at);
                        assert_laid_out(&at, top);
                        drop(placed);
                    }
                })
            })
            .collect();
        rt.block_on(async {
            for t in tasks {
                t.await.unwrap();
            }
        });
        drop(rt);
        let stats = cache.stats();
        assert!(stats.counts.evictions > 0, "the cap made room");
        assert!(stats.bytes <= cap, "{stats:?}");
        // What is on disk is what the index holds, each entry whole (removed trees may still
        // be in the trash: a shut-down runtime drops removals it had not started, and the next
        // start clears the trash).
        let count = |d: &str| std::fs::read_dir(fx.path(d)).unwrap().count() as u64;
        assert_eq!(count("dircache/entries"), stats.entries);
        assert_eq!(count("dircache/manifests"), stats.entries);
        for (root, _) in roots.iter() {
            let key = BlobKey::new(InstanceName::default_instance(), *root);
            if cache.dirs().entry(&key).exists() {
                assert_eq!(disk::verify(cache.dirs(), &key), Ok(()));
            }
        }
        drop(cache);
        let reopened = fx.open(cap);
        assert_eq!(reopened.stats().entries, stats.entries);
        assert_eq!(count("dircache/trash"), 0);
    }

    #[test]
    fn an_entry_built_again_while_its_old_copy_is_being_deleted_is_whole() {
        let mut fx = Fixture::new();
        let (root, _) = fx.tree(b"again");
        let key = BlobKey::new(InstanceName::default_instance(), root);
        let cache = fx.open(1 << 30);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let _in_runtime = rt.enter();
        for round in 0..20 {
            drop(fx.place(&cache, root, &fx.path(&format!("work/{round}"))));
            // Evicted unleased: its tree leaves the name at once and is deleted in the
            // background while the next round builds the same name again.
            cache.evict(&key);
        }
        drop(fx.place(&cache, root, &fx.path("work/last")));
        drop(_in_runtime);
        drop(rt);
        assert_eq!(disk::verify(cache.dirs(), &key), Ok(()));
        assert_eq!(cache.stats().entries, 1);
    }
}
