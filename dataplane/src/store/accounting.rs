//! Disk usage across shards. Each shard indexes its own part of the digest space, but the cap
//! is one number for the whole CAS, so one large blob on one shard can push out old blobs on
//! another. Shards publish their total and the age of their least recently used blob; when the
//! total goes over the cap, the shard holding the globally oldest blob is asked to evict, which
//! approximates one LRU over the whole store without a shared lock.
//!
//! Uploads in progress and parked uploads count too: each holds its declared size
//! ([`Staged`]) from its first message until it is committed or dropped, so temp files cannot
//! push the store past its cap, and old blobs are evicted to make room for them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Space held for an upload's temp file (its declared size), counted against the cap until
/// this is dropped.
#[derive(Debug)]
pub struct Staged {
    accounting: Arc<Accounting>,
    bytes: u64,
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.accounting
            .staging
            .fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Shared usage counters; one per data plane.
#[derive(Debug)]
pub struct Accounting {
    cap: u64,
    used: AtomicU64,
    /// Bytes some shard has been asked to evict and has not finished evicting.
    requested: AtomicU64,
    /// Per shard: access time of its least recently used blob (`u64::MAX` when empty).
    oldest: Vec<AtomicU64>,
    /// Per shard: bytes it holds.
    per_shard: Vec<AtomicU64>,
    /// Bytes of blobs pinned by running actions.
    pinned: AtomicU64,
    /// Bytes held by uploads in progress or parked.
    staging: AtomicU64,
    /// Blobs that have left the index (evicted or found corrupt) since start: when it has not
    /// moved, every blob seen present before is still present.
    removals: AtomicU64,
    /// Filesystem syncs that failed since start (group commit): an upload whose data was
    /// dirty when one failed may have lost it, whichever group's sync the error reached.
    sync_failures: AtomicU64,
}

impl Accounting {
    /// Counters for `shards` shards sharing a cap of `cap` bytes.
    pub fn new(cap: u64, shards: usize) -> Accounting {
        Accounting {
            cap,
            used: AtomicU64::new(0),
            requested: AtomicU64::new(0),
            oldest: (0..shards).map(|_| AtomicU64::new(u64::MAX)).collect(),
            per_shard: (0..shards).map(|_| AtomicU64::new(0)).collect(),
            pinned: AtomicU64::new(0),
            staging: AtomicU64::new(0),
            removals: AtomicU64::new(0),
            sync_failures: AtomicU64::new(0),
        }
    }

    /// Failed filesystem syncs so far. An upload reads it before writing its first byte and
    /// is not acknowledged if it has moved by the time its own sync is done (`syncfs`
    /// reports a write-back error once, to whichever sync runs next, not to the group whose
    /// data it lost).
    pub fn sync_failures(&self) -> u64 {
        self.sync_failures.load(Ordering::SeqCst)
    }

    /// Records a failed filesystem sync.
    pub fn sync_failed(&self) {
        self.sync_failures.fetch_add(1, Ordering::SeqCst);
    }

    /// Bytes held by uploads in progress or parked.
    pub fn staging(&self) -> u64 {
        self.staging.load(Ordering::Relaxed)
    }

    /// Holds `bytes` for an upload. Refused (`None`) when the uploads already staged plus
    /// this one would exceed the cap less the pinned blobs: no eviction could make room.
    /// Otherwise the store is over its cap only until eviction catches up.
    pub fn stage(self: &Arc<Self>, bytes: u64) -> Option<Staged> {
        let room = self.cap.saturating_sub(self.pinned());
        let mut current = self.staging.load(Ordering::Relaxed);
        loop {
            let next = current.checked_add(bytes).filter(|n| *n <= room)?;
            match self
                .staging
                .compare_exchange(current, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Staged {
                        accounting: self.clone(),
                        bytes,
                    })
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// A claim on no room (an upload held in memory, not in a temp file).
    pub fn unstaged(self: &Arc<Self>) -> Staged {
        Staged {
            accounting: self.clone(),
            bytes: 0,
        }
    }

    /// The cap in bytes.
    pub fn cap(&self) -> u64 {
        self.cap
    }

    /// Bytes currently stored.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Bytes stored by one shard.
    pub fn shard_used(&self, shard: usize) -> u64 {
        self.per_shard[shard].load(Ordering::Relaxed)
    }

    /// Bytes pinned by running actions.
    pub fn pinned(&self) -> u64 {
        self.pinned.load(Ordering::Relaxed)
    }

    /// Records a blob of `bytes` becoming pinned (`true`) or unpinned.
    pub fn set_pinned(&self, bytes: u64, pinned: bool) {
        if pinned {
            self.pinned.fetch_add(bytes, Ordering::Relaxed);
        } else {
            self.pinned.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// How many blobs have left the store since start. Read it before checking that blobs are
    /// present: while it has not moved, they still are.
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::SeqCst)
    }

    /// Records bytes added by `shard`.
    pub fn add(&self, shard: usize, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
        self.per_shard[shard].fetch_add(bytes, Ordering::Relaxed);
    }

    /// Records a blob that left a store other than the files (a small-blob log): counted in
    /// [`Accounting::removals`] only.
    pub fn note_removal(&self) {
        self.removals.fetch_add(1, Ordering::SeqCst);
    }

    /// Records a blob of `bytes` removed by `shard` (counted in [`Accounting::removals`]).
    pub fn remove(&self, shard: usize, bytes: u64) {
        self.removals.fetch_add(1, Ordering::SeqCst);
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.per_shard[shard].fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Publishes a shard's oldest access time.
    pub fn set_oldest(&self, shard: usize, atime: Option<u64>) {
        self.oldest[shard].store(atime.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// If the store (blobs and staged uploads) is over its cap beyond what is already being
    /// evicted, claims the excess and
    /// returns `(shard to evict from, bytes)`. The caller must send that request and, once the
    /// shard has evicted, call [`Accounting::eviction_done`] with the same byte count.
    pub fn claim_eviction(&self) -> Option<(usize, u64)> {
        loop {
            let used = self
                .used
                .load(Ordering::Relaxed)
                .saturating_add(self.staging.load(Ordering::Relaxed));
            let requested = self.requested.load(Ordering::Relaxed);
            let excess = used.checked_sub(self.cap)?.checked_sub(requested)?;
            if excess == 0 {
                return None;
            }
            if self
                .requested
                .compare_exchange(
                    requested,
                    requested + excess,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
            {
                return Some((self.oldest_shard(), excess));
            }
        }
    }

    /// Releases a claim made by [`Accounting::claim_eviction`].
    pub fn eviction_done(&self, claimed: u64) {
        self.requested.fetch_sub(claimed, Ordering::AcqRel);
    }

    /// The shard whose least recently used blob is the oldest (ties: lowest index).
    pub fn oldest_shard(&self) -> usize {
        self.oldest
            .iter()
            .enumerate()
            .min_by_key(|(i, a)| (a.load(Ordering::Relaxed), *i))
            .map(|(i, _)| i)
            .unwrap_or(0)
    }
}

/// A store other than the files tells of each blob it lets go (a small-blob log): a removal.
impl crate::store::tier::BlobEvents for Accounting {
    fn forget(&self, _key: &kiln_reapi::digest::BlobKey) {
        self.note_removal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excess_is_claimed_once_from_the_oldest_shard() {
        let a = Accounting::new(100, 3);
        a.add(0, 60);
        a.add(2, 30);
        assert_eq!(a.claim_eviction(), None, "under the cap");
        a.set_oldest(0, Some(50));
        a.set_oldest(1, None);
        a.set_oldest(2, Some(10));
        a.add(2, 30);
        assert_eq!(a.claim_eviction(), Some((2, 20)));
        assert_eq!(a.claim_eviction(), None, "already requested");
        a.remove(2, 20);
        a.eviction_done(20);
        assert_eq!(a.used(), 100);
        assert_eq!(a.claim_eviction(), None);
        assert_eq!(
            (a.shard_used(0), a.shard_used(1), a.shard_used(2)),
            (60, 0, 40)
        );
    }

    #[test]
    fn staged_uploads_count_against_the_cap_until_dropped() {
        let a = Arc::new(Accounting::new(100, 1));
        a.add(0, 50);
        a.set_oldest(0, Some(1));
        let first = a.stage(60).expect("fits once 10 bytes are evicted");
        assert_eq!(a.staging(), 60);
        assert_eq!(
            a.claim_eviction(),
            Some((0, 10)),
            "blobs make room for uploads"
        );
        a.eviction_done(10);
        assert!(a.stage(41).is_none(), "uploads alone would exceed the cap");
        a.set_pinned(30, true);
        assert!(a.stage(11).is_none(), "pinned blobs cannot make room");
        let second = a.stage(10).expect("exactly fits");
        drop(first);
        assert_eq!(a.staging(), 10);
        drop(second);
        assert_eq!(a.staging(), 0);
        assert!(a.stage(u64::MAX).is_none(), "no overflow");
        assert_eq!(a.claim_eviction(), None);
    }
}
