//! Blobs leaving the index: eviction over the cap (on this shard or asked of the one holding
//! the oldest blob), blobs found corrupt, and the unlinks that follow on the file lane.

use super::Owner;
use crate::store::commands::{Command, Dropped};
use kiln_reapi::digest::BlobKey;
use std::path::PathBuf;
use std::rc::Rc;
use tracing::{debug, error, warn};

impl Owner {
    /// Deletes a file on the lane (temp files and blobs no longer indexed).
    pub(super) fn remove_later(&self, path: PathBuf) {
        self.lane.queue(move || {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot delete file");
                }
            }
        });
    }

    /// Takes a blob out of the index (and its file off the disk) for `why`.
    pub(super) fn drop_blob(&self, key: &BlobKey, why: Dropped) {
        let removed = self.index.borrow_mut().remove(key);
        if let Some(entry) = removed {
            match why {
                Dropped::Corrupt => {
                    error!(blob = ?key, "stored blob does not hash to its digest; removed it");
                    self.metrics().corrupt.inc();
                }
                Dropped::Vanished => {
                    warn!(blob = ?key, "stored blob's file is gone; forgot it");
                }
            }
            self.accounting.remove(self.shard, entry.size);
            if entry.pins > 0 {
                self.accounting.set_pinned(entry.size, false);
            }
            // Its holders' pins went with it.
            self.leases.borrow_mut().forget(key);
            self.remove_later(self.layout.blob_path(key));
            self.forgotten(key);
            self.note_removed(key);
            self.publish_oldest();
        }
    }

    /// If the store is over its cap, asks the shard with the oldest blob to evict.
    pub(super) fn maybe_evict(self: &Rc<Self>) {
        while let Some((shard, bytes)) = self.accounting.claim_eviction() {
            if shard == self.shard {
                if self.evict(bytes) == 0 {
                    warn!(
                        shard = self.shard,
                        "CAS over capacity, and every blob left on this shard is pinned"
                    );
                    break;
                }
                continue;
            }
            if let Err(sender) = self.cas.request_eviction(shard, bytes) {
                // That shard's queue is full: deliver the request without blocking this loop.
                let accounting = self.accounting.clone();
                self.runtime.spawn(Box::pin(async move {
                    if sender.send(Command::Evict { bytes }).await.is_err() {
                        accounting.eviction_done(bytes);
                    }
                }));
            }
        }
    }

    /// Evicts least recently used, unpinned blobs until `bytes` are freed or none are left;
    /// releases the claim and returns the bytes freed.
    pub(super) fn evict(&self, bytes: u64) -> u64 {
        let mut freed = 0u64;
        let mut count = 0u64;
        while freed < bytes {
            let Some((key, entry)) = self.index.borrow_mut().pop_oldest_unpinned() else {
                break;
            };
            // Counted as a removal before its file goes: whoever sees the file gone also sees
            // the removal count moved (the action cache's completeness shortcut relies on it).
            self.accounting.remove(self.shard, entry.size);
            self.remove_later(self.layout.blob_path(&key));
            self.forgotten(&key);
            self.note_removed(&key);
            freed += entry.size;
            self.metrics().evictions.inc();
            self.metrics().evicted_bytes.inc_by(entry.size);
            count += 1;
        }
        self.publish_oldest();
        self.accounting.eviction_done(bytes);
        if count > 0 {
            debug!(shard = self.shard, blobs = count, bytes = freed, "evicted");
        }
        freed
    }
}
