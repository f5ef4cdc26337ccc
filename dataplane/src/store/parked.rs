//! Uploads in flight and uploads whose stream dropped, kept for resumption (sans-IO).
//!
//! An interrupted upload keeps its temp file and hashing state here for a bounded time; the
//! client finds its committed size with `QueryWriteStatus` and continues with a new `Write`.
//! The table holds at most a configured number of parked uploads; the oldest go first.

use super::accounting::Staged;
use kiln_reapi::digest::Hasher;
use lru::LruCache;
use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// An interrupted upload.
#[derive(Debug)]
pub struct ParkedUpload {
    /// Temp file holding the bytes received so far.
    pub temp: PathBuf,
    /// Bytes received (and written) so far.
    pub committed: u64,
    /// Hash state over those bytes.
    pub hasher: Hasher,
    /// When it was parked.
    pub parked_at: Instant,
    /// The space its temp file holds against the cap.
    pub staged: Staged,
    /// Failed filesystem syncs before its temp file was first written.
    pub epoch: u64,
}

/// What a new `Write` finds for its upload key.
#[derive(Debug)]
pub enum Claim {
    /// Nothing known: start from zero.
    Fresh,
    /// A parked upload to continue.
    Resume(ParkedUpload),
    /// Another stream is writing this upload right now.
    Busy,
}

/// Active and parked uploads of one shard.
pub struct UploadTable {
    active: HashMap<String, Arc<AtomicU64>>,
    parked: LruCache<String, ParkedUpload>,
    expiry: Duration,
}

impl UploadTable {
    /// A table keeping at most `max_parked` parked uploads for `expiry` each.
    pub fn new(max_parked: usize, expiry: Duration) -> UploadTable {
        UploadTable {
            active: HashMap::new(),
            parked: LruCache::new(
                NonZeroUsize::new(max_parked.max(1)).unwrap_or(NonZeroUsize::MIN),
            ),
            expiry,
        }
    }

    /// Registers a stream writing `key`, with a counter it keeps up to date.
    pub fn claim(&mut self, key: &str, progress: Arc<AtomicU64>) -> Claim {
        if self.active.contains_key(key) {
            return Claim::Busy;
        }
        self.active.insert(key.to_string(), progress);
        match self.parked.pop(key) {
            Some(p) => Claim::Resume(p),
            None => Claim::Fresh,
        }
    }

    /// The stream writing `key` ended; `park` keeps its state for resumption. Returns parked
    /// uploads pushed out to make room (their temp files must be deleted).
    pub fn release(&mut self, key: &str, park: Option<ParkedUpload>) -> Vec<ParkedUpload> {
        self.active.remove(key);
        let mut dropped = Vec::new();
        if let Some(p) = park {
            // Either the oldest parked upload made room, or an older state of this same key was
            // replaced; both temp files are garbage now.
            if let Some((_, old)) = self.parked.push(key.to_string(), p) {
                dropped.push(old);
            }
        }
        dropped
    }

    /// Committed size of an active or parked upload.
    pub fn committed(&self, key: &str) -> Option<u64> {
        if let Some(progress) = self.active.get(key) {
            return Some(progress.load(Ordering::Relaxed));
        }
        self.parked.peek(key).map(|p| p.committed)
    }

    /// Removes parked uploads older than the expiry; their temp files must be deleted.
    pub fn expire(&mut self, now: Instant) -> Vec<ParkedUpload> {
        let mut out = Vec::new();
        while let Some((_, p)) = self.parked.peek_lru() {
            if now.saturating_duration_since(p.parked_at) < self.expiry {
                break;
            }
            if let Some((_, p)) = self.parked.pop_lru() {
                out.push(p);
            }
        }
        out
    }

    /// Every parked upload (at shutdown).
    pub fn drain_parked(&mut self) -> Vec<ParkedUpload> {
        let mut out = Vec::new();
        while let Some((_, p)) = self.parked.pop_lru() {
            out.push(p);
        }
        out
    }

    /// Numbers of active and parked uploads.
    pub fn counts(&self) -> (usize, usize) {
        (self.active.len(), self.parked.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::DigestFunction;

    fn parked(n: u64, at: Instant) -> ParkedUpload {
        let accounting = Arc::new(crate::store::accounting::Accounting::new(u64::MAX, 1));
        ParkedUpload {
            temp: PathBuf::from(format!("/tmp/{n}")),
            committed: n,
            hasher: Hasher::new(DigestFunction::Sha256),
            parked_at: at,
            staged: accounting.stage(n).expect("room"),
            epoch: 0,
        }
    }

    #[test]
    fn claim_release_resume() {
        let mut t = UploadTable::new(4, Duration::from_secs(60));
        let progress = Arc::new(AtomicU64::new(0));
        assert!(matches!(t.claim("a", progress.clone()), Claim::Fresh));
        assert!(matches!(t.claim("a", Arc::default()), Claim::Busy));
        progress.store(42, Ordering::Relaxed);
        assert_eq!(t.committed("a"), Some(42));
        assert!(t.release("a", Some(parked(42, Instant::now()))).is_empty());
        assert_eq!(t.committed("a"), Some(42));
        match t.claim("a", Arc::default()) {
            Claim::Resume(p) => assert_eq!(p.committed, 42),
            other => panic!("expected resume, got {other:?}"),
        }
        t.release("a", None);
        assert_eq!(t.committed("a"), None);
        assert_eq!(t.counts(), (0, 0));
    }

    #[test]
    fn bounded_and_expiring() {
        let start = Instant::now();
        let mut t = UploadTable::new(2, Duration::from_secs(10));
        for (i, k) in ["a", "b", "c"].iter().enumerate() {
            t.claim(k, Arc::default());
            let dropped = t.release(
                k,
                Some(parked(i as u64, start + Duration::from_secs(i as u64))),
            );
            if i == 2 {
                assert_eq!(dropped.len(), 1, "oldest pushed out");
                assert_eq!(dropped[0].committed, 0);
            }
        }
        assert!(t.expire(start + Duration::from_secs(5)).is_empty());
        let expired = t.expire(start + Duration::from_secs(11) + Duration::from_millis(1));
        assert_eq!(expired.len(), 1);
        assert_eq!(t.drain_parked().len(), 1);
    }
}
