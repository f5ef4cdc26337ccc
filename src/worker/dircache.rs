//! The worker's directory cache: opened from `worker.dircache_bytes`, and whether cached
//! input roots are mounted as overlays.

use anyhow::Context;
use kiln_config::Config;
use std::sync::Arc;
use tracing::info;

/// Whether cached input roots are mounted as overlays: when `worker.dircache_layout` asks
/// for it, there is a cache, and a trial mount in `work_dir` works (else they are linked,
/// and the log says why).
pub(crate) fn dircache_overlay(
    config: &Config,
    work_dir: &std::path::Path,
    cache: Option<&kiln_worker::dircache::DirCache>,
) -> bool {
    if config.worker.dircache_layout != kiln_config::DirCacheLayout::Overlay {
        return false;
    }
    let Some(cache) = cache else {
        return false;
    };
    let probe =
        kiln_worker::overlay::probe(&cache.dirs().build_path(), &work_dir.join(".overlay-probe"));
    match probe {
        Ok(()) => {
            info!("cached input roots are mounted as overlays");
            true
        }
        Err(why) => {
            tracing::warn!(%why, "worker.dircache_layout = \"overlay\", but overlays cannot be mounted here: cached input roots are linked");
            false
        }
    }
}

/// Opens the worker's directory cache (`worker.dircache_bytes`, 0: none).
pub(crate) fn open_dircache(
    config: &Config,
) -> anyhow::Result<Option<Arc<kiln_worker::dircache::DirCache>>> {
    let cap = config.worker.dircache_bytes.as_u64();
    if cap == 0 {
        return Ok(None);
    }
    let dir = config
        .worker
        .dircache_dir
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("dircache"));
    let work_dir = config
        .worker
        .work_dir
        .clone()
        .unwrap_or_else(|| config.storage.data_dir.join("work"));
    kiln_worker::dircache::check_place(&dir, &config.storage.data_dir, &work_dir)
        .map_err(|why| anyhow::anyhow!("worker.dircache_dir: {why}"))?;
    let cache = kiln_worker::dircache::DirCache::open(&dir, cap)
        .with_context(|| format!("cannot open the directory cache in {}", dir.display()))?;
    Ok(Some(cache))
}
