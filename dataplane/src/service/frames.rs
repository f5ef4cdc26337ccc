//! zstd frames of whole blobs read compressed, kept in memory (moka, weighted by bytes) so that
//! the next compressed read of the blob from its start sends the frame instead of compressing
//! again: compressing costs a core about 0.4 GB/s of blob on the development machine, sending a
//! kept frame only its copy to the socket. A frame is made from bytes checked against the
//! blob's digest as they went out, and is served only once the blob has been found in the store
//! again (so a blob that left the store is not read from here).

use crate::metrics::Metrics;
use bytes::Bytes;
use kiln_reapi::digest::BlobKey;
use std::sync::Arc;

/// Kept frames, by blob and the level they were made at.
pub struct FrameCache {
    cache: Option<moka::sync::Cache<(BlobKey, i32), Bytes>>,
    /// Largest blob (uncompressed) whose frame is collected.
    max_blob: u64,
    /// Largest frame kept.
    max_frame: u64,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for FrameCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameCache")
            .field("on", &self.cache.is_some())
            .field("max_frame", &self.max_frame)
            .finish()
    }
}

impl FrameCache {
    /// Room for `budget` bytes of frames (0: none kept): frames of blobs up to `budget` bytes
    /// are collected as they are made, and kept when they come to at most a quarter of it.
    pub fn new(budget: u64, metrics: Arc<Metrics>) -> FrameCache {
        let cache = (budget > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(budget)
                .weigher(|_: &(BlobKey, i32), frame: &Bytes| {
                    u32::try_from(frame.len() as u64 + 128).unwrap_or(u32::MAX)
                })
                .build()
        });
        FrameCache {
            cache,
            max_blob: budget,
            max_frame: budget / 4,
            metrics,
        }
    }

    /// The kept frame of `key` at `level`, counted as a hit or a miss.
    pub fn get(&self, key: &BlobKey, level: i32) -> Option<Bytes> {
        let cache = self.cache.as_ref()?;
        let found = cache.get(&(key.clone(), level));
        self.metrics
            .zstd_frames_inc(if found.is_some() { "hit" } else { "miss" });
        found
    }

    /// The largest frame kept.
    pub fn max_frame(&self) -> usize {
        usize::try_from(self.max_frame).unwrap_or(usize::MAX)
    }

    /// Whether the frame of a blob of `size` bytes is worth collecting.
    pub fn keeps(&self, size: u64) -> bool {
        self.cache.is_some() && size <= self.max_blob
    }

    /// Keeps `frame`, the whole blob `key` compressed at `level`.
    pub fn insert(&self, key: BlobKey, level: i32, frame: Bytes) {
        if let Some(cache) = &self.cache {
            if frame.len() as u64 <= self.max_frame {
                cache.insert((key, level), frame);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    #[test]
    fn frames_are_kept_by_blob_and_level_within_the_budget() {
        let metrics = Metrics::new();
        let frames = FrameCache::new(1 << 20, metrics.clone());
        let key = BlobKey::new(
            InstanceName::new("").unwrap(),
            Digest::of(DigestFunction::Sha256, b"blob"),
        );
        assert!(frames.keeps(1 << 20) && !frames.keeps((1 << 20) + 1));
        assert_eq!(frames.get(&key, 1), None);
        // A frame over a quarter of the budget is not kept.
        frames.insert(key.clone(), 1, Bytes::from(vec![0u8; (256 << 10) + 1]));
        assert_eq!(frames.get(&key, 1), None);
        frames.insert(key.clone(), 1, Bytes::from_static(b"frame"));
        assert_eq!(frames.get(&key, 1), Some(Bytes::from_static(b"frame")));
        assert_eq!(frames.get(&key, 3), None, "another level is another frame");
        let off = FrameCache::new(0, metrics);
        off.insert(key.clone(), 1, Bytes::from_static(b"frame"));
        assert!(!off.keeps(1) && off.get(&key, 1).is_none());
    }
}
