//! Committing a verified upload: the rename into place on the file lane, indexing, answering
//! every copy of the blob that waited on it, and the syncs that make the blob durable before
//! any of them is acknowledged.

use super::{CommitReply, Owner};
use crate::store::atime;
use crate::store::commands::Committed;
#[cfg(doc)]
use crate::store::group_commit::GroupCommit;
use crate::store::index::Entry;
use crate::store::tree_commit::{dirs_to_sync, rename_in};
use crate::store::StoreError;
use kiln_reapi::digest::BlobKey;
use std::path::{Path, PathBuf};
use std::rc::Rc;

impl Owner {
    pub(super) fn commit(
        self: &Rc<Self>,
        key: BlobKey,
        temp: PathBuf,
        epoch: u64,
        reply: CommitReply,
    ) {
        if let Some(waiting) = self.committing.borrow_mut().get_mut(&key) {
            // The same blob is being renamed in or made durable: this copy is answered with
            // that one's outcome, once it is durable.
            self.metrics().awaiting_sync.inc();
            waiting.push((temp, reply));
            return;
        }
        if self.touch(&key, atime::now()).is_some() {
            self.remove_later(temp);
            let _ = reply.send(Ok(Committed::AlreadyPresent));
            return;
        }
        let size = key.digest.size;
        if size > self.accounting.cap() {
            self.remove_later(temp);
            let _ = reply.send(Err(StoreError::TooLarge {
                size,
                cap: self.accounting.cap(),
            }));
            return;
        }
        self.committing.borrow_mut().insert(key.clone(), Vec::new());
        let dir = self.layout.blob_dir(&key);
        let path = self.layout.blob_path(&key);
        let make_dir = !self.known_dirs.borrow().contains(&dir);
        let renamed = {
            let layout = self.layout.clone();
            let key = key.clone();
            self.lane
                .run(move || rename_in(&layout, &key, make_dir, true, &temp, &path))
        };
        let owner = self.clone();
        self.runtime.spawn(Box::pin(async move {
            let outcome = renamed.await.unwrap_or(Err(StoreError::Unavailable));
            owner.renamed(key, dir, epoch, outcome, reply).await;
        }));
    }

    /// A commit's file is in place (or not): make it durable, then index it and answer it
    /// and every copy that waited on it. The blob becomes visible (to lookups, copies and
    /// `FindMissingBlobs`) only once it is durable, so nothing is ever answered "present"
    /// on the strength of a write a crash could still undo. Its bytes count against the cap
    /// from the rename on.
    pub(super) async fn renamed(
        self: Rc<Self>,
        key: BlobKey,
        dir: PathBuf,
        epoch: u64,
        outcome: Result<(), StoreError>,
        reply: CommitReply,
    ) {
        let size = key.digest.size;
        let in_place = outcome.is_ok();
        let result = match outcome {
            Ok(()) => {
                self.known_dirs.borrow_mut().insert(dir.clone());
                self.accounting.add(self.shard, size);
                if self.settings.fsync {
                    self.make_durable(&dir).await
                } else {
                    Ok(())
                }
            }
            Err(e) => Err(e),
        };
        let result = result.and_then(|()| self.check_epoch(epoch));
        let waiting = self
            .committing
            .borrow_mut()
            .remove(&key)
            .unwrap_or_default();
        self.metrics().awaiting_sync.dec_by(waiting.len() as i64);
        for (temp, _) in &waiting {
            self.remove_later(temp.clone());
        }
        if let Err(e) = result {
            if in_place {
                // Not acknowledged, so not kept: a file whose sync failed is not trusted.
                self.accounting.remove(self.shard, size);
                self.remove_later(self.layout.blob_path(&key));
                self.note_removed(&key);
            }
            for (_, r) in waiting {
                let _ = r.send(Err(e.retell()));
            }
            let _ = reply.send(Err(e));
            return;
        }
        self.index
            .borrow_mut()
            .insert(key.clone(), Entry::fresh(size, atime::now()));
        self.stored(&key);
        // The file's own access time is the kernel's (coarse) time of creation, so blobs
        // committed within one clock tick would tie after a restart: record the index's.
        self.schedule_atime(&key);
        self.metrics().commits.inc();
        self.publish_oldest();
        for (_, r) in waiting {
            // Their own bytes are dropped; the stored file is this one, now durable.
            let _ = r.send(Ok(Committed::AlreadyPresent));
        }
        self.maybe_evict();
        let _ = reply.send(Ok(Committed::Stored));
    }

    /// An error when a filesystem sync failed after `epoch` was read: the bytes written since
    /// may be lost, and the error went to whichever sync ran next.
    fn check_epoch(&self, epoch: u64) -> Result<(), StoreError> {
        if self.accounting.sync_failures() == epoch {
            return Ok(());
        }
        Err(StoreError::io(
            "make durable",
            self.layout.tree_dir(),
            std::io::Error::other("a filesystem sync failed while this blob was being written"),
        ))
    }

    /// Syncs what a rename into `dir` needs to survive a crash: with group commit, one sync
    /// of the filesystem shared with the commits made meanwhile ([`GroupCommit`]); otherwise
    /// the directories of [`dirs_to_sync`] (the blob's own data was synced by its writer).
    pub(super) async fn make_durable(self: &Rc<Self>, dir: &Path) -> Result<(), StoreError> {
        if let Some(group) = &self.settings.group_commit {
            return group.sync(self.metrics()).await;
        }
        let todo = dirs_to_sync(dir, self.layout.tree_dir(), &self.durable_dirs.borrow());
        for d in &todo {
            self.runtime
                .sync_dir(d)
                .await
                .map_err(|e| StoreError::io("sync", d, e))?;
        }
        self.durable_dirs.borrow_mut().insert(dir.to_path_buf());
        Ok(())
    }
}
