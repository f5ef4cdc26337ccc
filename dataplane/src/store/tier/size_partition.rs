//! The size partition: blobs up to a threshold go to one chain, larger ones to another (for
//! example small blobs through a memory tier and large ones straight to disk). A blob's size
//! is in its digest, so every call is routed without asking either side.

use super::{pinned_keys, Blob, BlobStore, PinHolder, StoreFuture, VerifiedUpload};
use crate::store::{Committed, StoreError};
use futures::future::BoxFuture;
use kiln_reapi::digest::BlobKey;
use std::sync::Arc;

/// Blobs up to `threshold` bytes to `small`, the rest to `large`.
pub struct SizePartition {
    threshold: u64,
    small: Arc<dyn BlobStore>,
    large: Arc<dyn BlobStore>,
}

impl SizePartition {
    /// The partition at `threshold` bytes (inclusive on the small side).
    pub fn new(
        threshold: u64,
        small: Arc<dyn BlobStore>,
        large: Arc<dyn BlobStore>,
    ) -> SizePartition {
        SizePartition {
            threshold,
            small,
            large,
        }
    }

    fn side(&self, key: &BlobKey) -> &dyn BlobStore {
        if key.digest.size <= self.threshold {
            &*self.small
        } else {
            &*self.large
        }
    }

    /// Asks both sides at once for their share of `keys`. Returns, per side, the positions
    /// of its keys in `keys`, the keys, and its answer.
    async fn ask_both<T>(
        &self,
        keys: &[BlobKey],
        ask: impl for<'a> Fn(&'a dyn BlobStore, &'a [BlobKey]) -> StoreFuture<'a, Vec<T>>,
    ) -> [Side<T>; 2] {
        let mut split: [(Vec<usize>, Vec<BlobKey>); 2] = Default::default();
        for (i, k) in keys.iter().enumerate() {
            let side = &mut split[usize::from(k.digest.size > self.threshold)];
            side.0.push(i);
            side.1.push(k.clone());
        }
        let [(sp, sk), (lp, lk)] = split;
        let (sa, la) = futures::future::join(ask(&*self.small, &sk), ask(&*self.large, &lk)).await;
        [
            Side {
                positions: sp,
                keys: sk,
                answer: sa,
            },
            Side {
                positions: lp,
                keys: lk,
                answer: la,
            },
        ]
    }

    /// Both sides' keys (for calls without answers).
    fn split(&self, keys: &[BlobKey]) -> (Vec<BlobKey>, Vec<BlobKey>) {
        keys.iter()
            .cloned()
            .partition(|k| k.digest.size <= self.threshold)
    }
}

/// One side's share of a call.
struct Side<T> {
    positions: Vec<usize>,
    keys: Vec<BlobKey>,
    answer: Result<Vec<T>, StoreError>,
}

/// The two sides' answers in the order of the `n` keys asked about.
fn merge<T: Clone + Default>(n: usize, sides: [(Vec<usize>, Vec<T>); 2]) -> Vec<T> {
    let mut out = vec![T::default(); n];
    for (positions, answers) in sides {
        for (p, v) in positions.into_iter().zip(answers) {
            out[p] = v;
        }
    }
    out
}

impl BlobStore for SizePartition {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(async move {
            let [s, l] = self.ask_both(keys, |side, keys| side.contains(keys)).await;
            Ok(merge(
                keys.len(),
                [(s.positions, s.answer?), (l.positions, l.answer?)],
            ))
        })
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        self.side(key).open(key)
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        self.side(key).put(key, upload)
    }

    fn pin<'a>(
        &'a self,
        holder: PinHolder,
        keys: &'a [BlobKey],
    ) -> StoreFuture<'a, Vec<Option<bool>>> {
        Box::pin(async move {
            let [s, l] = self
                .ask_both(keys, |side, keys| side.pin(holder, keys))
                .await;
            match (s.answer, l.answer) {
                (Ok(sa), Ok(la)) => Ok(merge(keys.len(), [(s.positions, sa), (l.positions, la)])),
                // All or nothing: release what the side that answered pinned.
                (Ok(pinned), Err(e)) => {
                    self.small
                        .unpin(holder, &pinned_keys(&s.keys, &pinned))
                        .await;
                    Err(e)
                }
                (Err(e), Ok(pinned)) => {
                    self.large
                        .unpin(holder, &pinned_keys(&l.keys, &pinned))
                        .await;
                    Err(e)
                }
                (Err(e), Err(_)) => Err(e),
            }
        })
    }

    fn unpin<'a>(&'a self, holder: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let (small, large) = self.split(keys);
            futures::future::join(
                self.small.unpin(holder, &small),
                self.large.unpin(holder, &large),
            )
            .await;
        })
    }

    fn touched(&self, keys: &[BlobKey]) {
        let (small, large) = self.split(keys);
        self.small.touched(&small);
        self.large.touched(&large);
    }

    fn keeps_files(&self, key: &BlobKey) -> bool {
        self.side(key).keeps_files(key)
    }
}
