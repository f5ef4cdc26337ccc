//! Fixing an action's output files before they are hashed: a private copy (or, within the
//! action's budget, the bytes in memory) of each, checked on the handle it is read from
//! against whose files an output may be, bounded in bytes, entries and memory.

use super::Blob;
use crate::beneath;
use crate::error::{io, ActionError};
use crate::local::hash_path;
use bytes::Bytes;
use kiln_dataplane::store::clone::clone_or_copy_from;
use kiln_reapi::digest::{Digest, DigestFunction};
use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Private copies of output files, made before they are hashed: the bytes stored are the
/// bytes hashed, whatever happens to the action's own files afterwards (a copy is a new
/// inode no action process ever had open; where the filesystem can, it is a clone and costs
/// no data copy).
pub struct Staging {
    dir: PathBuf,
    next: std::sync::atomic::AtomicU64,
    /// Bytes of outputs still to be held in memory (then they are staged as files): so
    /// thousands of outputs of up to [`IN_MEMORY`] each cannot hold gigabytes until uploaded.
    memory_left: std::sync::atomic::AtomicI64,
    /// What the outputs fixed so far add up to, and its bound.
    total: std::sync::atomic::AtomicU64,
    max_bytes: u64,
    /// Entries of output directories listed so far, and their bound.
    entries: std::sync::atomic::AtomicU64,
    max_entries: u64,
    /// Files fixed, by inode (device, number): a file linked at many paths is fixed once.
    fixed: std::sync::Mutex<HashMap<(u64, u64), Fixed>>,
}

/// A fixed output file: its digest, its bytes, its permission bits.
type Fixed = (Digest, Blob, u32);

/// Entries (files, directories, symlinks) of one action's output directories at most: each
/// is held in the `Tree` message, about a hundred bytes, until the result is stored.
pub const MAX_OUTPUT_ENTRIES: u64 = 1_000_000;

/// Bytes of one action's outputs held in memory at most (see [`Staging`]).
pub const MEMORY_BUDGET: u64 = 64 << 20;

impl Staging {
    /// Stages into `dir` (created now, and refused if anything is already there: a symlink
    /// the action left in its place must not take the copies elsewhere; removed with the
    /// action's directory) outputs adding up to at most `max_bytes` (the room free there).
    pub fn new(dir: PathBuf, max_bytes: u64) -> Result<Staging, ActionError> {
        std::fs::create_dir(&dir).map_err(io("create", &dir))?;
        Ok(Staging {
            dir,
            next: std::sync::atomic::AtomicU64::new(0),
            memory_left: std::sync::atomic::AtomicI64::new(MEMORY_BUDGET as i64),
            total: std::sync::atomic::AtomicU64::new(0),
            max_bytes,
            entries: std::sync::atomic::AtomicU64::new(0),
            max_entries: MAX_OUTPUT_ENTRIES,
            fixed: Default::default(),
        })
    }

    /// Counts `len` more bytes of outputs: refused (`RESOURCE_EXHAUSTED`) past `max_bytes`,
    /// the room where they are staged (a sparse file of a terabyte would otherwise be copied
    /// until the disk is full).
    fn count(&self, len: u64, shown: &Path) -> Result<(), ActionError> {
        use std::sync::atomic::Ordering;
        let before = self.total.fetch_add(len, Ordering::Relaxed);
        match before.checked_add(len) {
            Some(total) if total <= self.max_bytes => Ok(()),
            _ => Err(ActionError::io(
                "stage",
                shown,
                std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    format!(
                        "the outputs add up to more than the {} bytes free where they are staged",
                        self.max_bytes
                    ),
                ),
            )),
        }
    }

    /// Counts `n` more entries of output directories: refused past [`MAX_OUTPUT_ENTRIES`]
    /// (each is held in the `Tree` message until the action's result is stored).
    pub(super) fn count_entries(&self, n: usize, shown: &Path) -> Result<(), ActionError> {
        use std::sync::atomic::Ordering;
        let n = n as u64;
        let total = self
            .entries
            .fetch_add(n, Ordering::Relaxed)
            .saturating_add(n);
        if total > self.max_entries {
            return Err(ActionError::BadInput(format!(
                "output directory {}: the outputs hold more than {} files, directories and symlinks",
                shown.display(),
                self.max_entries
            )));
        }
        Ok(())
    }

    /// The same staging with another bound on entries (tests of the bound).
    #[cfg(test)]
    pub(super) fn with_max_entries(mut self, n: u64) -> Staging {
        self.max_entries = n;
        self
    }

    /// Whether `len` more bytes may be held in memory (taken from the budget if so).
    fn take_memory(&self, len: u64) -> bool {
        use std::sync::atomic::Ordering;
        let len = i64::try_from(len).unwrap_or(i64::MAX);
        self.memory_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left >= len).then_some(left - len)
            })
            .is_ok()
    }

    /// Fixes the bytes of `file` and hashes them: a file up to [`IN_MEMORY`] is read into
    /// memory while the action's [`MEMORY_BUDGET`] lasts (one read; those bytes are what is
    /// hashed and stored), a larger one (or one past the budget) is copied
    /// (cloned where the filesystem can) into the staging directory and the copy is hashed.
    pub async fn fix(
        &self,
        function: DigestFunction,
        file: &Path,
    ) -> Result<(Digest, Blob), ActionError> {
        use std::os::unix::fs::OpenOptionsExt;
        // Not through a symlink, and without blocking on a FIFO or a device the action left
        // in place of a file. (Its directory is the worker's own.)
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(file)
            .map_err(|e| fix_error(file, e))?;
        let (digest, blob, _) = self.fix_file(function, f, file, None).await?;
        Ok((digest, blob))
    }

    /// [`Staging::fix`] of a file already open (`shown`: its path, for messages), refused
    /// unless `owners` allows it; also returns its permission bits. Every check is made on
    /// the open handle, so what is checked is what is read.
    pub async fn fix_file(
        &self,
        function: DigestFunction,
        f: std::fs::File,
        shown: &Path,
        owners: Option<&OutputOwners>,
    ) -> Result<(Digest, Blob, u32), ActionError> {
        use std::os::unix::fs::MetadataExt;
        let meta = f.metadata().map_err(|e| fix_error(shown, e))?;
        // Only a regular file is an output file.
        if !meta.is_file() {
            return Err(ActionError::BadInput(format!(
                "output {}: not a regular file (a FIFO, socket or device is not an output)",
                shown.display()
            )));
        }
        if let Some(owners) = owners {
            owners.check(&meta, shown)?;
        }
        let mode = meta.mode() & 0o7777;
        let len = meta.len();
        let inode = (meta.dev(), meta.ino());
        let known = self
            .fixed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&inode)
            .cloned();
        if let Some(fixed) = known {
            return Ok(fixed);
        }
        self.count(len, shown)?;
        let in_memory = len <= IN_MEMORY && self.take_memory(len);
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let copy = self.dir.join(n.to_string());
        let (digest, blob) =
            tokio::task::spawn_blocking(move || -> std::io::Result<(Digest, Blob)> {
                use std::io::Read;
                let mut f = f;
                if in_memory {
                    // Bounded even if the file grew since (a process that outlived the action).
                    let mut bytes = Vec::with_capacity(len as usize);
                    f.by_ref().take(IN_MEMORY).read_to_end(&mut bytes)?;
                    let bytes = Bytes::from(bytes);
                    return Ok((Digest::of(function, &bytes), Blob::Bytes(bytes)));
                }
                // From the handle checked above, not the path again (which the action's
                // processes could have swapped for a symlink meanwhile).
                clone_or_copy_from(&f, &copy)?;
                drop(f);
                std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o444))?;
                Ok((hash_path(function, &copy)?, Blob::File(copy)))
            })
            .await
            .map_err(|e| ActionError::io("copy", shown, std::io::Error::other(e)))?
            .map_err(|e| fix_error(shown, e))?;
        let fixed = (digest, blob, mode);
        self.fixed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(inode, fixed.clone());
        Ok(fixed)
    }
}

/// A failure to fix an output: the action's (not a regular file, or a symlink where a file
/// was declared) or the worker's.
pub(super) fn fix_error(file: &Path, e: std::io::Error) -> ActionError {
    if e.kind() == std::io::ErrorKind::InvalidInput
        || beneath::is_not_a_directory(&e)
        || beneath::is_gone(&e)
    {
        return ActionError::BadInput(format!("output {}: {e}", file.display()));
    }
    ActionError::io("copy", file, e)
}

/// Outputs up to this size are read into memory rather than copied to a file.
pub const IN_MEMORY: u64 = 1 << 20;

/// Whose files an action's outputs may be. With `run_as_user` the worker (root) reads the
/// outputs, so a hard link the action made to a file only root may read (`/etc/shadow`, where
/// the system lets any user link any file, as macOS does) must not become an output: an
/// output file must belong to the action's user, or be one of the inputs the worker linked in.
#[derive(Debug, Default)]
pub struct OutputOwners {
    /// The action's user, when it is not the worker's (`None`: no check).
    pub action_uid: Option<u32>,
    /// Inodes (device, number) of the input files shared with the worker's stores.
    pub inputs: std::collections::HashSet<(u64, u64)>,
    /// The device of the overlay the inputs are mounted as: its files are inputs, or the
    /// action's own (a link from outside a mount is impossible, and its layers are the
    /// worker's alone).
    pub input_device: Option<u64>,
}

impl OutputOwners {
    /// Refuses a file that is neither the action user's nor an input.
    fn check(&self, meta: &std::fs::Metadata, path: &Path) -> Result<(), ActionError> {
        use std::os::unix::fs::MetadataExt;
        let Some(action) = self.action_uid else {
            return Ok(());
        };
        let uid = meta.uid();
        if uid == action
            || self.inputs.contains(&(meta.dev(), meta.ino()))
            || self.input_device == Some(meta.dev())
        {
            return Ok(());
        }
        Err(ActionError::BadInput(format!(
            "output {}: the file belongs to uid {uid}, not to the action's user (a hard link to a file outside the action?)",
            path.display()
        )))
    }
}
