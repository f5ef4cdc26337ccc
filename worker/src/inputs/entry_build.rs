//! Building the cache entry of a missed input root, apart from laying the action's inputs
//! out: claimed in the cache when the tree is fetched, run beside the action.

use crate::dircache::{disk, Building, DirCache, Lease};
use crate::error::io;
use crate::fetch::InputTree;
use crate::materialise::{remove_tree, Materialiser};
use kiln_reapi::digest::BlobKey;
use std::path::PathBuf;
use std::sync::Arc;

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
    pub(super) fn claim(
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
    pub(super) fn run(
        self,
        cache: &Arc<DirCache>,
        m: &Materialiser<'_>,
        tree: &InputTree,
    ) -> Option<Lease> {
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
