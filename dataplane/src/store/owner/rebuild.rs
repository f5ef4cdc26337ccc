//! Answering while the background rebuild ([`crate::store::rebuild`]) has yet to deliver some
//! directories' listings. A command about a blob of such a directory that the index does not
//! hold first looks at the blob's file (on the file lane, after any unlink queued before it):
//! a file of the right size is indexed as found on disk (unverified, so its first read hashes
//! it), and then the command runs as usual. When a listing arrives, its blobs join the index,
//! except those already there and those removed meanwhile (evicted, damaged, gone: the
//! listing may have been taken before their unlink).

use super::Owner;
use crate::store::atime;
use crate::store::commands::Command;
use crate::store::index::Entry;
use crate::store::layout::Layout;
use crate::store::snapshot::DirKey;
use kiln_reapi::digest::BlobKey;
use std::collections::HashSet;
use std::rc::Rc;

/// The directory a blob is filed in.
fn dir_of(key: &BlobKey) -> DirKey {
    DirKey {
        instance: key.instance.clone(),
        function: key.digest.function,
        fanout: key.digest.hash[0],
    }
}

/// The blobs a command is about, when it needs to know whether they are stored.
fn keys_of(command: &Command) -> &[BlobKey] {
    match command {
        Command::FindMissing { keys, .. } | Command::Pin { keys, .. } => keys,
        Command::Lookup { key, .. }
        | Command::Commit { key, .. }
        | Command::ClaimUpload { key, .. }
        | Command::QueryUpload { key, .. } => std::slice::from_ref(key),
        _ => &[],
    }
}

/// The entry for a blob file found on disk, if it is one (a file of the digest's size).
fn look(layout: &Layout, key: &BlobKey) -> Option<Entry> {
    let meta = std::fs::symlink_metadata(layout.blob_path(key)).ok()?;
    if !meta.is_file() || meta.len() != key.digest.size {
        return None;
    }
    let atime = meta
        .accessed()
        .or_else(|_| meta.modified())
        .map_or(0, atime::from_system_time);
    Some(Entry::scanned(meta.len(), atime))
}

impl Owner {
    /// Directories whose listings the background rebuild will deliver.
    pub fn await_listings(&self, dirs: &HashSet<DirKey>) {
        self.pending.borrow_mut().extend(dirs.iter().cloned());
    }

    /// Runs `command`, first looking at the files of the blobs it is about that a pending
    /// directory may hold.
    pub(super) fn handle(self: &Rc<Self>, command: Command) {
        if self.pending.borrow().is_empty() {
            return self.dispatch(command);
        }
        let unknown = self.unknown(keys_of(&command));
        if unknown.is_empty() {
            return self.dispatch(command);
        }
        let looked = {
            let layout = self.layout.clone();
            self.lane.run(move || {
                unknown
                    .into_iter()
                    .filter_map(|k| look(&layout, &k).map(|e| (k, e)))
                    .collect::<Vec<_>>()
            })
        };
        let owner = self.clone();
        self.runtime.spawn(Box::pin(async move {
            if let Some(found) = looked.await {
                owner.adopt(found);
            }
            owner.dispatch(command);
        }));
    }

    /// Of `keys`, those in a pending directory that the index does not hold (and no commit is
    /// placing).
    fn unknown(&self, keys: &[BlobKey]) -> Vec<BlobKey> {
        let pending = self.pending.borrow();
        let index = self.index.borrow();
        let committing = self.committing.borrow();
        keys.iter()
            .filter(|k| {
                !k.digest.is_empty_blob()
                    && pending.contains(&dir_of(k))
                    && index.peek(k).is_none()
                    && !committing.contains_key(*k)
            })
            .cloned()
            .collect()
    }

    /// Of blobs found on disk, those to index: not in the index, not being placed by a
    /// commit, not removed since their directory became pending (and, unless `listed`, still
    /// in a pending directory).
    fn new_to_index(&self, found: Vec<(BlobKey, Entry)>, listed: bool) -> Vec<(BlobKey, Entry)> {
        let pending = self.pending.borrow();
        let removed = self.removed_pending.borrow();
        let committing = self.committing.borrow();
        let index = self.index.borrow();
        found
            .into_iter()
            .filter(|(key, _)| {
                (listed || pending.contains(&dir_of(key)))
                    && !removed.contains(key)
                    && !committing.contains_key(key)
                    && index.peek(key).is_none()
            })
            .collect()
    }

    /// Indexes blobs a command found on disk, as just used (the command uses them).
    fn adopt(&self, found: Vec<(BlobKey, Entry)>) {
        let fresh = self.new_to_index(found, false);
        let bytes: u64 = fresh.iter().map(|(_, e)| e.size).sum();
        for (key, entry) in fresh {
            self.index.borrow_mut().insert(key.clone(), entry);
            self.stored(&key);
        }
        self.counted(bytes);
    }

    fn counted(&self, bytes: u64) {
        if bytes > 0 {
            self.accounting.add(self.shard, bytes);
            self.publish_oldest();
        }
    }

    /// The listings arrived (oldest first): their blobs join the index, placed among the
    /// others by access time, and their directories are no longer pending. Files cut short
    /// are deleted (on the lane, so before any later commit's rename) unless a commit has
    /// replaced them.
    pub(super) fn listed(
        self: &Rc<Self>,
        dirs: Vec<DirKey>,
        entries: Vec<(BlobKey, Entry)>,
        damaged: Vec<BlobKey>,
    ) {
        for key in damaged {
            let replaced = self.index.borrow().peek(&key).is_some()
                || self.committing.borrow().contains_key(&key);
            if !replaced {
                self.remove_later(self.layout.blob_path(&key));
            }
        }
        let fresh = self.new_to_index(entries, true);
        let bytes: u64 = fresh.iter().map(|(_, e)| e.size).sum();
        for (key, _) in &fresh {
            self.stored(key);
        }
        self.index.borrow_mut().insert_aged(fresh);
        {
            let mut pending = self.pending.borrow_mut();
            for d in &dirs {
                pending.remove(d);
            }
            let mut removed = self.removed_pending.borrow_mut();
            removed.retain(|k| pending.contains(&dir_of(k)));
        }
        self.counted(bytes);
        self.maybe_evict();
    }

    /// Remembers a blob that left the index while its directory is pending, so that a listing
    /// taken before its unlink does not bring it back.
    pub(super) fn note_removed(&self, key: &BlobKey) {
        let pending = self.pending.borrow();
        if !pending.is_empty() && pending.contains(&dir_of(key)) {
            self.removed_pending.borrow_mut().insert(key.clone());
        }
    }
}
