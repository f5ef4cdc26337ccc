//! Laying out an action's inputs. With the directory cache on: an input root the cache holds
//! (as an entry, or as a directory inside one) is linked from there, with nothing fetched,
//! looked up or pinned; any other is fetched into the local CAS and materialised straight into
//! place (reusing whole every subtree an entry already holds), and its entry is built by an
//! [`EntryBuild`] that runs beside the action, off its critical path (the action waits for it
//! only before it releases its pins). Without the cache the tree is fetched and materialised.
//! With `worker.dircache_layout = "overlay"` a cached root is mounted instead of linked
//! ([`crate::overlay`]), and linked where the mount is refused.

mod entry_build;
mod expanse;

pub use entry_build::EntryBuild;

use crate::action::WorkerContext;
use crate::dircache::{DirCache, Lease, RootHit};
use crate::error::{io, ActionError};
use crate::fetch::{fetch, InputTree, Source};
use crate::materialise::{link_from_cache, Materialiser};
use crate::overlay::Mounted;
use crate::tamper::SharedFiles;
use crate::LocalCas;
use kiln_dataplane::store::tier::PinHolder;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How an action's input root was found in the directory cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheUse {
    /// No cache on this worker.
    Off,
    /// Linked (or mounted) from the cache.
    Hit,
    /// Fetched and built.
    Miss,
}

/// A cache entry being built beside an action; its lease when it was built.
pub type EntryBuilding = tokio::task::JoinHandle<Option<Lease>>;

/// An action's inputs in place.
pub struct Inputs {
    /// The overlay the tree is mounted as, when it is: unmount it (by dropping it) before
    /// the action's directory is removed. (Declared first, so that it is unmounted before the
    /// leases below are released.)
    pub mount: Option<Mounted>,
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
        let overlay = ctx.dircache_overlay;
        let hit = blocking(root.clone(), move || {
            link_cached(&cache, &key, &root, overlay)
        })
        .await?;
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
        let runtime = tokio::runtime::Handle::current();
        blocking(root.clone(), move || {
            // Before anything is made (off the executor: a tree may hold millions of
            // directories): a tree whose layout would not end is refused.
            expanse::check(&tree, function)?;
            std::fs::create_dir_all(&root).map_err(io("create", &root))?;
            let blob_path = |d: Digest| local.path(&inst, d);
            let blob_bytes = |d: Digest| bytes_outside_files(&local, &runtime, &inst, d);
            let m = Materialiser {
                blob_path: &blob_path,
                blob_bytes: Some(&blob_bytes),
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
        let runtime = tokio::runtime::Handle::current();
        inputs.building = Some(tokio::task::spawn_blocking(move || {
            let blob_path = |d: Digest| local.path(&inst, d);
            let blob_bytes = |d: Digest| bytes_outside_files(&local, &runtime, &inst, d);
            let m = Materialiser {
                blob_path: &blob_path,
                blob_bytes: Some(&blob_bytes),
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
        mount: None,
    };
    Ok((inputs, job))
}

/// The bytes of an input the local CAS keeps no file of (a small-blob log), read from a
/// blocking thread through `runtime`; `Ok(None)` for one kept as a file (linked instead).
fn bytes_outside_files(
    local: &LocalCas,
    runtime: &tokio::runtime::Handle,
    instance: &InstanceName,
    d: Digest,
) -> Result<Option<bytes::Bytes>, ActionError> {
    if local.keeps_file(instance, d) {
        return Ok(None);
    }
    match runtime.block_on(local.bytes_of(instance, d))? {
        Some(data) => Ok(Some(data)),
        None => Err(ActionError::MissingInputs(vec![d])),
    }
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

/// Lays out input root `key` from the cache at `root` when an entry holds it: mounted as an
/// overlay with `overlay` (linked where the mount is refused), else linked.
fn link_cached(
    cache: &Arc<DirCache>,
    key: &BlobKey,
    root: &Path,
    overlay: bool,
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
    if overlay {
        std::fs::create_dir_all(root).map_err(io("create", root))?;
        match crate::overlay::mount(&src, &crate::overlay::layers_of(root), root) {
            Ok(mount) => {
                return Ok(Some(Inputs {
                    shared: SharedFiles::default(),
                    leases: vec![lease],
                    cache: CacheUse::Hit,
                    building: None,
                    mount: Some(mount),
                }))
            }
            Err(e) => {
                tracing::warn!(entry = ?key, error = %e, "cannot mount a cached input root: linked instead")
            }
        }
    }
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
        mount: None,
    }))
}

#[cfg(test)]
mod tests;
