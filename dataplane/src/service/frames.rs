//! zstd frames of whole blobs, kept in memory (moka, weighted by bytes) so that the next
//! compressed read of the blob from its start sends the frame instead of compressing again:
//! compressing costs a core about 0.4-0.5 GB/s of blob on the development machine (even at
//! zstd's fast levels), sending a kept frame only its copy to the socket.
//!
//! Frames come from two places: a compressed read of a whole blob (made from bytes checked
//! against the digest as they went out), and a compressed upload of a whole blob (the client's
//! own frames, kept once they decompressed to exactly the blob's bytes and the blob was
//! stored), so the first compressed read of a blob a client uploaded compressed is already
//! cheap. A frame is any valid zstd encoding of the blob: clients decode whatever level it
//! was made at. It is served only once the blob has been found in the store again (so a blob
//! that left the store is not read from here).

use crate::metrics::Metrics;
use bytes::{Bytes, BytesMut};
use kiln_reapi::digest::BlobKey;
use std::sync::Arc;

/// Kept frames, by blob.
pub struct FrameCache {
    cache: Option<moka::sync::Cache<BlobKey, Bytes>>,
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
                .weigher(|_: &BlobKey, frame: &Bytes| {
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

    /// The kept frame of `key`, counted as a hit or a miss.
    pub fn get(&self, key: &BlobKey) -> Option<Bytes> {
        let cache = self.cache.as_ref()?;
        let found = cache.get(key);
        self.metrics
            .zstd_frames_inc(if found.is_some() { "hit" } else { "miss" });
        found
    }

    /// Whether the frame of a blob of `size` bytes is worth collecting.
    pub fn keeps(&self, size: u64) -> bool {
        self.cache.is_some() && size <= self.max_blob
    }

    /// A collector for the frame of a blob of `size` bytes as it is made or received, when
    /// that frame could be kept.
    pub fn collect(&self, size: u64) -> Option<Collecting> {
        self.keeps(size).then(|| Collecting {
            frame: Some(BytesMut::new()),
            max: usize::try_from(self.max_frame).unwrap_or(usize::MAX),
        })
    }

    /// Keeps `frame`, the whole blob `key` compressed (as zstd frames that decompress to
    /// exactly its bytes), when it is smaller than the blob: a client's frame padded with
    /// skippable frames is not handed to other clients, and the blob itself is the better
    /// answer for data that does not shrink.
    pub fn insert(&self, key: BlobKey, frame: Bytes) {
        if let Some(cache) = &self.cache {
            let len = frame.len() as u64;
            if len <= self.max_frame && len < key.digest.size {
                cache.insert(key, frame);
            }
        }
    }

    /// Keeps what `collecting` gathered, unless it ran past the largest frame kept.
    pub fn keep(&self, key: BlobKey, collecting: Collecting) {
        if let Some(frame) = collecting.frame {
            self.insert(key, frame.freeze());
        }
    }
}

/// A frame gathered piece by piece (copied: the pieces may be slices of larger buffers), and
/// dropped as soon as it runs past the largest frame kept.
#[derive(Debug)]
pub struct Collecting {
    frame: Option<BytesMut>,
    max: usize,
}

impl Collecting {
    /// Adds the frame's next bytes.
    pub fn push(&mut self, piece: &[u8]) {
        if self
            .frame
            .as_ref()
            .is_some_and(|f| f.len().saturating_add(piece.len()) > self.max)
        {
            self.frame = None;
        }
        if let Some(frame) = self.frame.as_mut() {
            frame.extend_from_slice(piece);
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
            Digest::of(DigestFunction::Sha256, &[7u8; 1 << 20]),
        );
        assert!(frames.keeps(1 << 20) && !frames.keeps((1 << 20) + 1));
        assert_eq!(frames.get(&key), None);
        // A frame over a quarter of the budget is not kept.
        frames.insert(key.clone(), Bytes::from(vec![0u8; (256 << 10) + 1]));
        assert_eq!(frames.get(&key), None);
        frames.insert(key.clone(), Bytes::from_static(b"frame"));
        assert_eq!(frames.get(&key), Some(Bytes::from_static(b"frame")));
        // A frame no smaller than its blob is not kept.
        let tiny = BlobKey::new(
            InstanceName::new("").unwrap(),
            Digest::of(DigestFunction::Sha256, b"blob!"),
        );
        frames.insert(tiny.clone(), Bytes::from_static(b"frame"));
        assert_eq!(frames.get(&tiny), None);
        let off = FrameCache::new(0, metrics);
        off.insert(key.clone(), Bytes::from_static(b"frame"));
        assert!(!off.keeps(1) && off.get(&key).is_none() && off.collect(1).is_none());
    }

    #[test]
    fn a_collected_frame_is_kept_whole_or_not_at_all() {
        let frames = FrameCache::new(1 << 20, Metrics::new());
        let key = |seed: u8| {
            BlobKey::new(
                InstanceName::new("").unwrap(),
                Digest::of(DigestFunction::Sha256, &[seed; 1 << 20]),
            )
        };
        assert!(frames.collect((1 << 20) + 1).is_none(), "blob too large");
        let mut small = frames.collect(100).unwrap();
        small.push(b"fra");
        small.push(b"me");
        frames.keep(key(1), small);
        assert_eq!(frames.get(&key(1)), Some(Bytes::from_static(b"frame")));
        // Past a quarter of the budget the collection is dropped, even if later pieces are
        // small.
        let mut large = frames.collect(1 << 20).unwrap();
        large.push(&vec![1u8; 200 << 10]);
        large.push(&vec![2u8; 100 << 10]);
        large.push(b"x");
        frames.keep(key(2), large);
        assert_eq!(frames.get(&key(2)), None);
    }
}
