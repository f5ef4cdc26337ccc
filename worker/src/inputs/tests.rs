use super::*;
use crate::dircache::disk;
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
    /// Cached roots are mounted as overlays.
    overlay: bool,
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
            overlay: false,
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
        let hit = link_cached(cache, &key, at, self.overlay).unwrap();
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
            blob_bytes: None,
            exec_cache: &exec,
            function: F.proto() as i32,
            cache: Some((cache, &instance)),
        };
        let tree = InputTree {
            root,
            directories: self.directories.clone(),
        };
        let (inputs, job) = lay_out(Some(cache), &m, &key, F.proto() as i32, &tree, at).unwrap();
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

/// Thread `t` of a concurrency test: `rounds` actions, each on the next of `roots` in turn,
/// each checked laid out whole.
fn take_turns(
    fx: &Fixture,
    cache: &Arc<DirCache>,
    roots: &[(Digest, Vec<u8>)],
    t: usize,
    rounds: usize,
) {
    for round in 0..rounds {
        let (root, top) = &roots[(t + round) % roots.len()];
        let at = fx.path(&format!("work/{t}-{round}"));
        let placed = fx.place(cache, *root, &at);
        assert_laid_out(&at, top);
        drop(placed);
    }
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

#[cfg(target_os = "linux")]
fn assert_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "overlay mounts need root: run the suite as root (CI does)"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_cached_root_is_mounted_as_an_overlay_that_keeps_the_entry_apart() {
    assert_root();
    let mut fx = Fixture::new();
    fx.overlay = true;
    let cache = fx.open(1 << 30);
    let (root, _) = fx.tree(b"int main;");
    let first = fx.place(&cache, root, &fx.path("work/1/root"));
    assert_eq!(first.cache, CacheUse::Miss);
    assert!(first.mount.is_none(), "a miss is laid out from the CAS");
    let at = fx.path("work/2/root");
    let second = fx.place(&cache, root, &at);
    assert_eq!(second.cache, CacheUse::Hit);
    let mount = second.mount.as_ref().expect("a hit is mounted");
    assert_laid_out(&at, b"int main;");
    assert_eq!(meta(&at.join("lib/a.h")).dev(), mount.device());
    assert_eq!(
        second.shared.len(),
        0,
        "nothing shared to check after the run"
    );
    // An action writing to an input and beside it changes its own layer only.
    let key = BlobKey::new(InstanceName::default_instance(), root);
    let entry_file = cache.dirs().entry(&key).join("main.c");
    std::fs::set_permissions(at.join("main.c"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(at.join("main.c"), b"changed").unwrap();
    std::fs::write(at.join("lib/new.o"), b"output").unwrap();
    assert_eq!(std::fs::read(&entry_file).unwrap(), b"int main;");
    assert_eq!(meta(&entry_file).mode() & 0o7777, 0o444);
    let cas_file = fx.path("cas").join(Digest::of(F, b"int main;").hex());
    assert_eq!(std::fs::read(&cas_file).unwrap(), b"int main;");
    assert!(!cache.dirs().entry(&key).join("lib/new.o").exists());
    // The next action sees the entry as it was.
    let third = fx.place(&cache, root, &fx.path("work/3/root"));
    assert_laid_out(&fx.path("work/3/root"), b"int main;");
    drop(third);
    // Leased while mounted; unmounted before the lease goes, then the entry is removed.
    cache.evict(&key);
    drop(first);
    assert!(cache.dirs().entry(&key).is_dir());
    drop(second);
    assert_eq!(std::fs::read_dir(&at).unwrap().count(), 0, "unmounted");
    assert!(!cache.dirs().entry(&key).exists());
}

#[test]
fn a_cached_root_that_cannot_be_mounted_is_linked() {
    let mut fx = Fixture::new();
    fx.overlay = true;
    let cache = fx.open(1 << 30);
    let (root, _) = fx.tree(b"int main;");
    drop(fx.place(&cache, root, &fx.path("work/1/root")));
    // The mount's options cannot name a layer whose path holds a comma.
    let at = fx.path("work/a,b/root");
    let hit = fx.place(&cache, root, &at);
    assert_eq!(hit.cache, CacheUse::Hit);
    assert!(hit.mount.is_none());
    assert_eq!(
        hit.shared.len(),
        5,
        "linked, and recorded for the tamper check"
    );
    assert_laid_out(&at, b"int main;");
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
            s.spawn(move || take_turns(fx, cache, roots, t, 6));
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
            rt.spawn_blocking(move || take_turns(&fx, &cache, &roots, t, 8))
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
