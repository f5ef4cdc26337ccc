//! After an action has run: the input files its tree shared with the worker's stores (the
//! CAS, the executable copies, the directory cache; see [`crate::tamper`]) that it changed
//! are put right. A file whose content is intact but whose mode or modification time changed
//! gets them back, which puts right every store sharing that inode. A file whose content
//! changed leaves every store that holds that very inode (the CAS drops the blob, which the
//! client uploads again; an executable copy is deleted), and every directory-cache entry with
//! a file of that content is evicted (entries share inodes with the stores and each other).

use crate::action::WorkerContext;
use crate::dircache::disk;
use crate::local::hash_file;
use crate::tamper::{FileState, Origin, Shared, SharedFiles};
use kiln_reapi::digest::{Digest, InstanceName};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Puts right what the action did to the shared files `shared`.
pub async fn repair(ctx: &WorkerContext, instance: &InstanceName, shared: SharedFiles) {
    if shared.is_empty() {
        return;
    }
    let changed = tokio::task::spawn_blocking(move || shared.changed())
        .await
        .unwrap_or_default();
    // Every changed file's digest first: a repair evicts directory-cache entries, and with
    // them the manifests that name the digests of the other changed files.
    let mut known = Vec::with_capacity(changed.len());
    for s in changed {
        let digest = digest_of(ctx, &s).await;
        known.push((s, digest));
    }
    for (s, digest) in known {
        repair_one(ctx, instance, s, digest).await;
    }
}

/// The digest of the content a shared file held before the action ran.
async fn digest_of(ctx: &WorkerContext, s: &Shared) -> Option<Digest> {
    match (&s.origin, &ctx.dircache) {
        // A directory-cache file's digest is in its entry's manifest.
        (Origin::DirCache(entry), Some(cache)) => {
            let (dirs, entry, path) = (cache.dirs().clone(), entry.clone(), s.path.clone());
            tokio::task::spawn_blocking(move || {
                let rel = path.strip_prefix(dirs.entry(&entry)).ok()?;
                disk::file_digest(&dirs, &entry, rel)
            })
            .await
            .ok()
            .flatten()
        }
        _ => s.digest,
    }
}

async fn repair_one(
    ctx: &WorkerContext,
    instance: &InstanceName,
    s: Shared,
    digest: Option<Digest>,
) {
    if let Some(d) = digest {
        if hash_file(d.function, &s.path)
            .await
            .is_ok_and(|got| got == d)
        {
            let (path, state) = (s.path.clone(), s.state);
            let restored = tokio::task::spawn_blocking(move || restore(&path, &state))
                .await
                .is_ok_and(|r| r.is_ok());
            if restored {
                tracing::info!(path = %s.path.display(), "an action changed the mode or time of one of its inputs; put back");
                return;
            }
        }
    }
    tracing::warn!(path = %s.path.display(), blob = ?digest, "an action wrote to one of its inputs; dropping every stored copy");
    if let (Origin::DirCache(entry), Some(cache)) = (&s.origin, &ctx.dircache) {
        cache.evict(entry);
    }
    let Some(d) = digest else { return };
    let (cas_path, exec_path) = (
        ctx.local.path(instance, d),
        ctx.exec_cache.join(format!("{}-{}", d.hex(), d.size)),
    );
    let (inode, cache) = (s.state.inode, ctx.dircache.clone());
    let cas_is_it = tokio::task::spawn_blocking(move || {
        if FileState::at(&exec_path).is_some_and(|now| now.inode == inode) {
            let _ = std::fs::remove_file(&exec_path);
        }
        if let Some(cache) = cache {
            cache.evict_holding(&d);
        }
        FileState::at(&cas_path).is_some_and(|now| now.inode == inode)
    })
    .await
    .unwrap_or(false);
    if cas_is_it {
        ctx.local.drop_changed(instance, d).await;
    }
}

/// Gives the file at `path` back the mode and modification time of `state`, if it is still
/// that inode.
fn restore(path: &Path, state: &FileState) -> std::io::Result<()> {
    if FileState::at(path).is_none_or(|now| now.inode != state.inode) {
        return Err(std::io::Error::other("replaced meanwhile"));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(state.mode))?;
    filetime::set_file_mtime(path, filetime::FileTime::from_system_time(state.modified))
}
