//! Kiln's worker: connects to the scheduler, runs actions in fresh directories with inputs
//! materialised from a local CAS, stores outputs and reports results.
//!
//! [`session`] keeps the connection, [`action`] runs one action: lays out its [`inputs`]
//! (linked from the [`dircache`] when it holds the tree, else [`fetch`]ed from [`peers`] and
//! [`remote`] into [`local`] and [`materialise`]d), [`run`]s the command, collects [`outputs`].
//! Its CAS is served to peers read-only; [`holdings`] tells the scheduler what it holds.
//! Both CAS are used as `kiln_reapi::cas::Cas`: the inputs' source and the outputs'
//! destination could be any implementation.

pub mod action;
mod beneath;
#[cfg(test)]
mod cas_behaviour;
pub mod contain;
pub mod dircache;
pub mod error;
pub mod fetch;
pub mod holdings;
pub mod inputs;
pub mod limits;
pub mod link;
pub mod local;
pub mod materialise;
pub mod outputs;
pub mod overlay;
pub mod peers;
pub mod quic;
pub mod remote;
pub mod repair;
pub mod reports;
pub mod run;
pub mod run_as;
pub mod running;
pub mod session;
pub mod slots;
pub mod tamper;

pub use action::WorkerContext;
pub use local::LocalCas;
pub use session::Identity;

/// Parses `NAME=VALUE` properties.
pub fn parse_properties(list: &[String]) -> Vec<(String, String)> {
    list.iter()
        .filter_map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// Prepares the work directory: creates it, empties what an earlier run left, and makes the
/// executable cache. Returns the cache's path.
pub fn prepare_work_dir(work_dir: &std::path::Path) -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(work_dir)?;
    // Actions (of other users, with `run_as_user`) may pass through to their own directory
    // but not list the others' (named at random). A work directory this process may not
    // change (another user's mount) is left as it is.
    if let Err(e) = std::fs::set_permissions(work_dir, std::fs::Permissions::from_mode(0o711)) {
        tracing::warn!(dir = %work_dir.display(), error = %e, "cannot make the work directory 0711: actions may list one another's directories");
    }
    for entry in std::fs::read_dir(work_dir)? {
        let path = entry?.path();
        if path.is_dir() {
            overlay::unmount_leftover(&path)?;
            materialise::remove_tree(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    let exec_cache = work_dir.join(".exec");
    std::fs::create_dir_all(&exec_cache)?;
    Ok(exec_cache)
}
