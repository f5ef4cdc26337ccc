//! Putting a written file into a store's tree, shared by the CAS's owner shards and the
//! action cache: the file's directory made, the file made read-only and renamed into place,
//! and the directories to sync before it may be acknowledged. Blocking: the owners call it on
//! their file lane, the action cache on the control plane's blocking pool.

use crate::store::layout::Layout;
use crate::store::StoreError;
use kiln_reapi::digest::BlobKey;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

/// Creates `key`'s directory when `make_dir` (the caller has not seen it yet), makes `temp`
/// read-only when `read_only` (blob files: workers hardlink them into action directories)
/// and renames it to `path`, replacing what was there. `temp` is removed when any step fails.
pub fn rename_in(
    layout: &Layout,
    key: &BlobKey,
    make_dir: bool,
    read_only: bool,
    temp: &Path,
    path: &Path,
) -> Result<(), StoreError> {
    if make_dir {
        if let Err(e) = layout.ensure_blob_dir(key) {
            let _ = std::fs::remove_file(temp);
            return Err(StoreError::io(
                "create directory for",
                layout.blob_dir(key),
                e,
            ));
        }
    }
    if read_only {
        let mode = std::os::unix::fs::PermissionsExt::from_mode(0o444);
        let _ = std::fs::set_permissions(temp, mode);
    }
    if let Err(e) = std::fs::rename(temp, path) {
        let _ = std::fs::remove_file(temp);
        return Err(StoreError::io("rename into", path, e));
    }
    Ok(())
}

/// The directories a rename into `dir` syncs before it is acknowledged: `dir` itself (that
/// makes the rename durable) and, until this process has once made `dir` durable (`durable`),
/// every directory above it up to the tree's root: `dir` may have just been created (by this
/// commit, or by another whose syncs have not finished), or be left on disk by a run that
/// stopped before syncing it. A second commit into a fresh directory must not be acknowledged
/// before the directory itself is durable in its parent.
pub fn dirs_to_sync(dir: &Path, root: &Path, durable: &HashSet<PathBuf>) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if !durable.contains(dir) {
        out.extend(
            dir.ancestors()
                .skip(1)
                .take_while(|d| d.starts_with(root))
                .map(Path::to_path_buf),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_synced_up_to_the_root_until_it_is_durable() {
        let root = Path::new("/data/cas");
        let dir = root.join("i_main/sha256/ab");
        let mut durable = HashSet::new();
        let first = dirs_to_sync(&dir, root, &durable);
        assert_eq!(
            first,
            vec![
                dir.clone(),
                root.join("i_main/sha256"),
                root.join("i_main"),
                root.to_path_buf()
            ]
        );
        // A second commit before the first's syncs finished does the same.
        assert_eq!(dirs_to_sync(&dir, root, &durable), first);
        durable.insert(dir.clone());
        assert_eq!(dirs_to_sync(&dir, root, &durable), vec![dir.clone()]);
        // Nothing outside the tree's root.
        assert!(first.iter().all(|d| d.starts_with(root)));
    }
}
