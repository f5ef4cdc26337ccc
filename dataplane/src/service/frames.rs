//! zstd frames of whole blobs, kept in memory (moka, weighted by bytes) so that the next
//! compressed read of the blob from its start sends the frame instead of compressing again:
//! compressing costs a core about 0.4-0.5 GB/s of blob on the development machine (even at
//! zstd's fast levels), sending a kept frame only its copy to the socket.
//!
//! Frames come from two places: a compressed read of a whole blob (made from bytes checked
//! against the digest as they went out), and a compressed upload of a whole blob (the client's
//! own frame, kept once it decompressed to exactly the blob's bytes and the blob was stored),
//! so the first compressed read of a blob a client uploaded compressed is already cheap. A
//! client's frame is kept only when it is one zstd frame and nothing else (no skippable frames
//! or further frames riding along to other readers), smaller than the blob, and made with a
//! window every standard decoder accepts ([`MAX_SHARED_WINDOW_LOG`]); a kept frame is never
//! replaced by another. A frame is served only once the blob has been found in the store
//! again (so a blob that left the store is not read from here).
//!
//! Frames being collected (by reads and uploads in progress) hold at most the cache's budget
//! between them, whatever number of streams collect at once.

use crate::metrics::Metrics;
use bytes::{Bytes, BytesMut};
use kiln_reapi::compression::is_one_frame;
use kiln_reapi::digest::BlobKey;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The largest window (as a power of two) a client's frame may use to be handed to other
/// clients: libzstd's default limit for decoders (zstd-jni's, Bazel's, among them).
pub const MAX_SHARED_WINDOW_LOG: u32 = 27;

/// Kept frames, by blob.
pub struct FrameCache {
    cache: Option<moka::sync::Cache<BlobKey, Bytes>>,
    /// Largest blob (uncompressed) whose frame is collected.
    max_blob: u64,
    /// Largest frame kept.
    max_frame: u64,
    /// Bytes held by frames being collected, across every stream.
    collecting: Arc<AtomicU64>,
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
            collecting: Arc::new(AtomicU64::new(0)),
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
    /// that frame could be kept (it must come to less than the blob).
    pub fn collect(&self, size: u64) -> Option<Collecting> {
        self.keeps(size).then(|| Collecting {
            frame: Some(BytesMut::new()),
            max: self.max_frame.min(size.saturating_sub(1)),
            reserved: 0,
            collecting: self.collecting.clone(),
            budget: self.max_blob,
        })
    }

    /// Keeps `frame`, the whole blob `key` compressed (as zstd that decompresses to exactly
    /// its bytes), when it is smaller than the blob (the blob itself is the better answer for
    /// data that does not shrink) and no frame of the blob is kept yet.
    pub fn insert(&self, key: BlobKey, frame: Bytes) {
        if let Some(cache) = &self.cache {
            let len = frame.len() as u64;
            if len <= self.max_frame && len < key.digest.size {
                cache.entry(key).or_insert(frame);
            }
        }
    }

    /// Keeps what `collecting` gathered, unless it ran past what may be kept.
    pub fn keep(&self, key: BlobKey, collecting: Collecting) {
        if let Some(frame) = collecting.into_frame() {
            self.insert(key, frame);
        }
    }

    /// Keeps `frame`, which a client uploaded and which decompressed to exactly the blob
    /// `key` (with windows of at most 2^`window_log_limit`), when it is fit to hand to other
    /// clients: a single zstd frame and nothing else, made with a window every decoder
    /// accepts.
    pub fn keep_uploaded(&self, key: BlobKey, frame: Bytes, window_log_limit: u32) {
        if window_log_limit <= MAX_SHARED_WINDOW_LOG && is_one_frame(&frame) {
            self.insert(key, frame);
        }
    }
}

/// A frame gathered piece by piece (copied: the pieces may be slices of larger buffers), and
/// dropped as soon as it runs past what may be kept or the bytes every collection holds
/// together would pass the cache's budget.
#[derive(Debug)]
pub struct Collecting {
    frame: Option<BytesMut>,
    /// Largest frame worth keeping.
    max: u64,
    /// Bytes this collection counts in `collecting`.
    reserved: u64,
    collecting: Arc<AtomicU64>,
    budget: u64,
}

impl Collecting {
    /// Adds the frame's next bytes.
    pub fn push(&mut self, piece: &[u8]) {
        let Some(frame) = self.frame.as_mut() else {
            return;
        };
        let n = piece.len() as u64;
        if (frame.len() as u64).saturating_add(n) > self.max {
            self.give_back();
            return;
        }
        let before = self.collecting.fetch_add(n, Ordering::Relaxed);
        self.reserved += n;
        if before.saturating_add(n) > self.budget {
            self.give_back();
            return;
        }
        frame.extend_from_slice(piece);
    }

    /// The frame, if it was collected whole.
    pub fn into_frame(mut self) -> Option<Bytes> {
        let frame = self.frame.take().map(BytesMut::freeze);
        self.give_back();
        frame
    }

    fn give_back(&mut self) {
        self.frame = None;
        self.collecting.fetch_sub(self.reserved, Ordering::Relaxed);
        self.reserved = 0;
    }
}

impl Drop for Collecting {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    #[test]
    fn frames_are_kept_by_blob_within_the_budget() {
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
        // Collections in progress share the budget (1 MiB here): a fifth of 250 KiB does not
        // fit while four are held; once they are gone it does.
        let mut held: Vec<Collecting> = (0..4)
            .map(|_| {
                let mut c = frames.collect(1 << 20).unwrap();
                c.push(&vec![3u8; 250 << 10]);
                c
            })
            .collect();
        let mut fifth = frames.collect(1 << 20).unwrap();
        fifth.push(&vec![4u8; 250 << 10]);
        assert!(fifth.into_frame().is_none());
        held.clear();
        let mut again = frames.collect(1 << 20).unwrap();
        again.push(&vec![4u8; 250 << 10]);
        assert!(again.into_frame().is_some());
    }

    #[test]
    fn an_uploaded_frame_is_kept_only_when_fit_to_share() {
        let frames = FrameCache::new(1 << 20, Metrics::new());
        let data = b"a blob a client uploaded compressed, ".repeat(100);
        let key = BlobKey::new(
            InstanceName::new("").unwrap(),
            Digest::of(DigestFunction::Sha256, &data),
        );
        let frame = Bytes::from(zstd::encode_all(&data[..], 3).unwrap());
        let mut padded = frame.to_vec();
        padded.extend_from_slice(&0x184D_2A50u32.to_le_bytes());
        padded.extend_from_slice(&4u32.to_le_bytes());
        padded.extend_from_slice(b"junk");
        frames.keep_uploaded(key.clone(), Bytes::from(padded), 23);
        assert_eq!(frames.get(&key), None, "a skippable frame rides along");
        frames.keep_uploaded(key.clone(), frame.clone(), MAX_SHARED_WINDOW_LOG + 1);
        assert_eq!(frames.get(&key), None, "windows some decoders refuse");
        frames.keep_uploaded(key.clone(), frame.clone(), 23);
        assert_eq!(frames.get(&key), Some(frame.clone()));
        // A kept frame is not replaced by another.
        let other = Bytes::from(zstd::encode_all(&data[..], 1).unwrap());
        assert_ne!(other, frame);
        frames.keep_uploaded(key.clone(), other, 23);
        assert_eq!(frames.get(&key), Some(frame));
    }
}
