//! Noticing an action that wrote to one of its inputs. Inputs are hardlinks to read-only
//! files of the local CAS (or of the executable cache), so an action running as the worker's
//! user could `chmod` one and write through it, changing the shared file. Kiln never changes
//! a stored file's mtime (it sets access times only), so a changed mtime or length after the
//! action means the file was written: it is hashed again, and if its content changed the blob
//! is dropped from the CAS (the client uploads it again) and an executable copy is deleted.
//!
//! An action that puts the mtime back (`touch -r`) after writing is not caught here. The
//! ctime would catch it, but every hardlink made or removed by a concurrent action and every
//! access-time update moves the ctime too, so checking it re-hashes nearly every shared input
//! after every action. The protection against that case is `worker.run_as_user`: the action
//! then cannot make the worker's files writable at all.

use kiln_reapi::digest::Digest;
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Where a shared input file lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A blob file of the local CAS.
    Cas,
    /// A copy in the executable cache.
    ExecCache,
    /// A file of this directory-cache entry (itself usually a link to one of the others).
    DirCache(kiln_reapi::digest::BlobKey),
}

/// What the tamper check compares of a shared file: its inode, and what writing to it or
/// changing its mode would change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileState {
    /// Device and inode.
    pub inode: (u64, u64),
    /// Length.
    pub len: u64,
    /// Modification time.
    pub modified: SystemTime,
    /// Permission bits.
    pub mode: u32,
}

impl FileState {
    /// The state `meta` describes.
    pub fn of(meta: &std::fs::Metadata) -> Option<FileState> {
        use std::os::unix::fs::PermissionsExt;
        Some(FileState {
            inode: (meta.dev(), meta.ino()),
            len: meta.len(),
            modified: meta.modified().ok()?,
            mode: meta.permissions().mode() & 0o7777,
        })
    }

    /// The state of the file at `path` now (not through a final symlink).
    pub fn at(path: &Path) -> Option<FileState> {
        FileState::of(&std::fs::symlink_metadata(path).ok()?)
    }
}

/// A file an action's directory shares (by hardlink) with the worker's stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    /// The shared file.
    pub path: PathBuf,
    /// The blob it holds, where known (a directory-cache file's is in its manifest).
    pub digest: Option<Digest>,
    /// Which store it belongs to.
    pub origin: Origin,
    /// Its state when it was linked.
    pub state: FileState,
}

/// The shared files of one action, each recorded once.
#[derive(Debug, Default)]
pub struct SharedFiles {
    /// Files recorded by path (a CAS file linked at several places is recorded once).
    by_path: HashMap<PathBuf, Shared>,
    /// Files recorded as linked from a directory-cache entry: each path once by construction
    /// (one walk of the entry), so kept without hashing paths.
    linked: Vec<Shared>,
    /// Inodes of input files the worker made for this action alone.
    made: std::collections::HashSet<(u64, u64)>,
}

impl SharedFiles {
    /// Records `path` as linked into the action (its state now is the reference).
    pub fn record(&mut self, path: &Path, digest: Digest, origin: Origin) {
        if self.by_path.contains_key(path) {
            return;
        }
        if let Some(state) = FileState::at(path) {
            self.by_path.insert(
                path.to_path_buf(),
                Shared {
                    path: path.to_path_buf(),
                    digest: Some(digest),
                    origin,
                    state,
                },
            );
        }
    }

    /// Records `path`, a file of a directory-cache entry, as linked into the action, in
    /// `state` (read by the caller when it linked the file). One walk of an entry records
    /// each of its paths once.
    pub fn record_linked(&mut self, path: &Path, origin: Origin, state: FileState) {
        self.linked.push(Shared {
            path: path.to_path_buf(),
            digest: None,
            origin,
            state,
        });
    }

    /// A mark to [`SharedFiles::undo`] back to.
    pub fn mark(&self) -> usize {
        self.linked.len()
    }

    /// Forgets the linked files recorded since `mark` (a walk that failed, whose links were
    /// removed again). Made inodes are kept: they only widen what counts as the worker's.
    pub fn undo(&mut self, mark: usize) {
        self.linked.truncate(mark);
    }

    /// Records an input file the worker made for this action alone, by inode.
    pub fn record_made_inode(&mut self, inode: (u64, u64)) {
        self.made.insert(inode);
    }

    /// The files whose content, mode or modification time may have changed since they were
    /// recorded. A file that is gone (evicted, or dropped already) or replaced by another
    /// (stored again, or a concurrent action's executable copy) is not the one the action
    /// could write: not reported.
    pub fn changed(&self) -> Vec<Shared> {
        self.by_path
            .values()
            .chain(&self.linked)
            .filter(|s| {
                FileState::at(&s.path)
                    .is_some_and(|now| now.inode == s.state.inode && now != s.state)
            })
            .cloned()
            .collect()
    }

    /// Records an input file the worker made for this action alone (an empty file, a copy
    /// with its own mode or times, a copy where a link was impossible): not shared, but the
    /// worker's, like the shared ones (see [`SharedFiles::inodes`]).
    pub fn record_made(&mut self, path: &Path) {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            self.made.insert((meta.dev(), meta.ino()));
        }
    }

    /// The inodes (device, number) of the input files the worker put in the tree: the
    /// recorded shared files and the ones it made.
    pub fn inodes(&self) -> std::collections::HashSet<(u64, u64)> {
        self.by_path
            .values()
            .chain(&self.linked)
            .map(|s| s.state.inode)
            .chain(self.made.iter().copied())
            .collect()
    }

    /// How many shared files are recorded.
    pub fn len(&self) -> usize {
        self.by_path.len() + self.linked.len()
    }

    /// Whether no shared file is.
    pub fn is_empty(&self) -> bool {
        self.by_path.is_empty() && self.linked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::DigestFunction;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_and_mode_changes_are_noticed_and_links_and_access_times_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        for p in [&a, &b] {
            std::fs::write(p, b"original").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).unwrap();
        }
        let d = Digest::of(DigestFunction::Sha256, b"original");
        let mut shared = SharedFiles::default();
        shared.record(&a, d, Origin::Cas);
        shared.record(&b, d, Origin::ExecCache);
        shared.record(&a, d, Origin::Cas);
        assert_eq!(shared.len(), 2, "each file once");
        assert!(
            shared.changed().is_empty(),
            "untouched files are not reported"
        );
        // Kiln's own access-time updates, a chmod to the same mode and new links (a
        // concurrent action's) move only the ctime: no re-hash.
        filetime::set_file_atime(&a, filetime::FileTime::from_unix_time(1, 0)).unwrap();
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o444)).unwrap();
        let link = dir.path().join("link");
        std::fs::hard_link(&a, &link).unwrap();
        assert!(shared.changed().is_empty());
        // A new mode is a change (a writable or no longer executable input for the next
        // action), and put back it is none.
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o644)).unwrap();
        let changed = shared.changed();
        assert_eq!(changed.len(), 1);
        assert_eq!(
            (changed[0].origin.clone(), changed[0].state.mode),
            (Origin::ExecCache, 0o444)
        );
        std::fs::set_permissions(&b, std::fs::Permissions::from_mode(0o444)).unwrap();
        assert!(shared.changed().is_empty());
        // Writing through a hardlink after a chmod: same length, new mtime.
        std::fs::set_permissions(&link, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(&link, b"tampered").unwrap();
        let changed = shared.changed();
        assert_eq!(changed.len(), 1);
        assert_eq!(
            (changed[0].path.as_path(), changed[0].origin.clone()),
            (a.as_path(), Origin::Cas)
        );
        // A file that disappeared, or was replaced by a new one, is not reported.
        std::fs::remove_file(&b).unwrap();
        assert_eq!(shared.changed().len(), 1);
        let replacement = dir.path().join("new");
        std::fs::write(&replacement, b"another copy").unwrap();
        std::fs::rename(&replacement, &a).unwrap();
        assert!(shared.changed().is_empty());
    }
}
