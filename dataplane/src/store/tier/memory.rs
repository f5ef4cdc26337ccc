//! The memory tier: recently read small blobs as refcounted `Bytes`, with a byte budget and
//! TinyLFU admission (moka), so a scan of cold blobs does not flush the hot set. One cache is
//! shared by every core (a hit is served on the core that asked, without a message to the
//! blob's owner shard). It is a cache over the tier below, never the only copy: existence,
//! pins and writes are that tier's answers, and a blob that leaves the filesystem tier leaves
//! the cache too ([`BlobEvents`]); a blob enters the cache when it was stored through
//! this tier with its bytes at hand, or read whole (and so checked) through it.

use super::{Blob, BlobEvents, BlobStore, BlobWatcher, PinHolder, StoreFuture, VerifiedUpload};
use crate::metrics::Metrics;
use crate::store::atime;
use crate::store::Committed;
use bytes::Bytes;
use futures::future::BoxFuture;
use kiln_reapi::digest::BlobKey;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What an entry costs beyond its blob's bytes (the key, the cache's own node and the
/// allocation of the bytes), counted against the budget so that many small blobs cannot take
/// the tier far past it. Measured: 449 bytes per entry for 500,000 one-byte blobs (RSS
/// before and after, release build); 402 with moka 0.12.16 and the cache shared by every core
/// (2026-12-06), so the budget errs on the safe side.
pub const ENTRY_OVERHEAD: u64 = 448;

/// A cached blob, and when a hit on it was last passed on to the tier below.
#[derive(Clone)]
struct Cached {
    data: Bytes,
    told: Arc<AtomicU64>,
}

/// Forget counters: a blob's bucket by two bytes of its hash (256 KiB of counters per cache;
/// with fewer, steady eviction would move every bucket often enough to drop many fills).
const FORGET_BUCKETS: usize = 1 << 16;

/// The cache of one memory tier, shared by the chains of every core.
#[derive(Clone)]
pub struct MemoryCache {
    cache: Option<moka::sync::Cache<BlobKey, Cached>>,
    /// Per bucket of blobs, how many left the tier below: bytes read (or stored) before a
    /// blob left it are not cached after (a reader may still hold the file of an evicted or
    /// damaged blob).
    forgets: Arc<[AtomicU32]>,
    max_blob: u64,
    /// A hit is passed on to the tier below at most this often per blob (nanoseconds).
    tell_every: u64,
}

impl MemoryCache {
    /// A cache holding at most `budget` bytes of blobs no larger than `max_blob`; a zero budget
    /// disables it.
    pub fn new(budget: u64, max_blob: u64) -> MemoryCache {
        let cache = (budget > 0 && max_blob > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(budget)
                .weigher(|_: &BlobKey, v: &Cached| {
                    u32::try_from(v.data.len() as u64 + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
                })
                .build()
        });
        MemoryCache {
            cache,
            forgets: (0..FORGET_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            max_blob,
            tell_every: 0,
        }
    }

    /// The same cache, passing a hit on a blob to the tier below (so that it keeps its place
    /// there) at most once per `every`. Each one is a message to the blob's owner shard:
    /// passing on every hit of a 64 KiB read cost 10-15 us of server CPU per read (a third
    /// of what the read costs otherwise), while the filesystem's eviction order only needs
    /// to be about right.
    pub fn telling_every(mut self, every: Duration) -> MemoryCache {
        self.tell_every = u64::try_from(every.as_nanos()).unwrap_or(u64::MAX);
        self
    }

    /// Whether a blob of `size` bytes may be kept here.
    pub fn admits(&self, size: u64) -> bool {
        self.cache.is_some() && size <= self.max_blob
    }

    /// The cached bytes of a blob.
    pub fn get(&self, key: &BlobKey) -> Option<Bytes> {
        Some(self.cache.as_ref()?.get(key)?.data)
    }

    /// A hit: the bytes, and whether to pass it on to the tier below now.
    fn hit(&self, key: &BlobKey) -> Option<(Bytes, bool)> {
        let cached = self.cache.as_ref()?.get(key)?;
        let now = atime::now();
        let last = cached.told.load(Ordering::Relaxed);
        let due = now.saturating_sub(last) >= self.tell_every
            && cached
                .told
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        Some((cached.data, due))
    }

    fn forgets_of(&self, key: &BlobKey) -> &AtomicU32 {
        let h = &key.digest.hash;
        &self.forgets[usize::from(u16::from_le_bytes([h[1], h[2]])) % FORGET_BUCKETS]
    }

    /// A mark to pass to [`MemoryCache::insert_unless_forgotten`], taken before the bytes
    /// were read or stored.
    pub fn mark(&self, key: &BlobKey) -> u32 {
        // SeqCst here and in `forget`: an insert followed by this load on one thread, and
        // an increment followed by an invalidation on another, must not both miss the other.
        self.forgets_of(key).load(Ordering::SeqCst)
    }

    /// Offers a blob to the cache unless a blob of its bucket left the tier below since
    /// `mark` was taken.
    pub fn insert_unless_forgotten(&self, key: BlobKey, data: &Bytes, mark: u32) {
        if self.mark(&key) != mark {
            return;
        }
        self.insert(key.clone(), data);
        // A forget between the check and the insert: undo it.
        if self.mark(&key) != mark {
            if let Some(cache) = &self.cache {
                cache.invalidate(&key);
            }
        }
    }

    /// Offers a blob to the cache (TinyLFU may decline it).
    fn insert(&self, key: BlobKey, data: &Bytes) {
        if let Some(cache) = &self.cache {
            if data.len() as u64 <= self.max_blob {
                // The cache must own exactly the bytes it counts: `data` is often a slice of a
                // larger buffer (a gRPC message, a receive or read buffer), which it would
                // keep alive whole while the budget counts only the slice.
                let cached = Cached {
                    data: Bytes::copy_from_slice(data),
                    told: Arc::new(AtomicU64::new(atime::now())),
                };
                cache.insert(key, cached);
            }
        }
    }

    /// Approximate bytes held.
    pub fn weighted_size(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| {
            c.run_pending_tasks();
            c.weighted_size()
        })
    }
}

impl BlobEvents for MemoryCache {
    fn forget(&self, key: &BlobKey) {
        // Counted first: a fill that read the blob before this sees the count moved.
        self.forgets_of(key).fetch_add(1, Ordering::SeqCst);
        if let Some(cache) = &self.cache {
            cache.invalidate(key);
        }
    }
}

/// Keeps the bytes of a small blob read whole, unless it left the tier below meanwhile.
struct Fill {
    cache: Arc<MemoryCache>,
    mark: u32,
}

impl BlobWatcher for Fill {
    fn read_whole(&self, key: &BlobKey, data: &Bytes) {
        self.cache
            .insert_unless_forgotten(key.clone(), data, self.mark);
    }
}

/// The memory tier over `inner`.
pub struct Memory {
    cache: Arc<MemoryCache>,
    inner: Arc<dyn BlobStore>,
    metrics: Arc<Metrics>,
}

impl Memory {
    /// Caches `inner`'s small blobs in `cache`; hits are counted in `metrics`.
    pub fn new(
        cache: Arc<MemoryCache>,
        inner: Arc<dyn BlobStore>,
        metrics: Arc<Metrics>,
    ) -> Memory {
        Memory {
            cache,
            inner,
            metrics,
        }
    }
}

impl BlobStore for Memory {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        self.inner.contains(keys)
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async move {
            if let Some((data, tell)) = self.cache.hit(key) {
                self.metrics.lookups_inc("memory");
                if tell {
                    // The tier below keeps its order of use (its eviction) as if it had
                    // served it.
                    self.inner.touched(std::slice::from_ref(key));
                }
                return Ok(Some(Blob::bytes(key.clone(), data)));
            }
            let mark = self.cache.mark(key);
            let blob = self.inner.open(key).await?;
            Ok(blob.map(|b| {
                if self.cache.admits(b.size()) {
                    b.watched(Arc::new(Fill {
                        cache: self.cache.clone(),
                        mark,
                    }))
                } else {
                    b
                }
            }))
        })
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        Box::pin(async move {
            let data = upload.data.clone();
            let mark = self.cache.mark(key);
            let committed = self.inner.put(key, upload).await?;
            if let Some(data) = data.filter(|d| self.cache.admits(d.len() as u64)) {
                self.cache.insert_unless_forgotten(key.clone(), &data, mark);
            }
            Ok(committed)
        })
    }

    fn pin<'a>(
        &'a self,
        holder: PinHolder,
        keys: &'a [BlobKey],
    ) -> StoreFuture<'a, Vec<Option<bool>>> {
        self.inner.pin(holder, keys)
    }

    fn unpin<'a>(&'a self, holder: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()> {
        self.inner.unpin(holder, keys)
    }

    fn touched(&self, keys: &[BlobKey]) {
        self.inner.touched(keys);
    }

    fn keeps_files(&self, key: &BlobKey) -> bool {
        self.inner.keeps_files(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn key(n: u32) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Blake3, &n.to_le_bytes()),
        )
    }

    #[test]
    fn respects_budget_and_blob_limit() {
        let tier = MemoryCache::new(10_000, 1_000);
        assert!(!tier.admits(1_001));
        tier.insert(key(0), &Bytes::from(vec![0u8; 2_000]));
        assert!(tier.get(&key(0)).is_none(), "over the per-blob limit");
        for n in 1..100 {
            tier.insert(key(n), &Bytes::from(vec![0u8; 500]));
        }
        assert!(tier.weighted_size() <= 10_000, "{}", tier.weighted_size());
    }

    #[test]
    fn zero_budget_disables() {
        let tier = MemoryCache::new(0, 1_000);
        assert!(!tier.admits(1));
        tier.insert(key(1), &Bytes::from_static(b"x"));
        assert!(tier.get(&key(1)).is_none());
    }

    #[test]
    fn a_slice_of_a_larger_buffer_is_cached_as_its_own_bytes() {
        let tier = MemoryCache::new(1 << 20, 1 << 10);
        // A 100-byte blob inside a 64 KiB receive buffer.
        let buffer = Bytes::from(vec![7u8; 64 << 10]);
        let slice = buffer.slice(1000..1100);
        tier.insert(key(1), &slice);
        let cached = tier.get(&key(1)).expect("cached");
        assert_eq!(cached, slice);
        let inside = buffer.as_ptr_range();
        assert!(
            !inside.contains(&cached.as_ptr()),
            "the cache must not keep the 64 KiB buffer alive for 100 bytes"
        );
    }

    #[test]
    fn small_blobs_are_charged_their_entry_overhead() {
        let tier = MemoryCache::new(10_000, 1_000);
        for n in 0..100 {
            tier.insert(key(n), &Bytes::from_static(b"x"));
        }
        assert!(tier.weighted_size() <= 10_000, "{}", tier.weighted_size());
        let kept = (0..100).filter(|n| tier.get(&key(*n)).is_some()).count();
        assert!(
            kept as u64 <= 10_000 / (1 + ENTRY_OVERHEAD),
            "{kept} one-byte blobs in a 10,000-byte budget"
        );
    }

    #[test]
    fn hits_are_passed_on_at_most_as_often_as_asked() {
        let every_hit = MemoryCache::new(1 << 20, 1 << 10).telling_every(Duration::ZERO);
        every_hit.insert(key(1), &Bytes::from_static(b"x"));
        for _ in 0..3 {
            assert_eq!(
                every_hit.hit(&key(1)),
                Some((Bytes::from_static(b"x"), true))
            );
        }
        let hourly = MemoryCache::new(1 << 20, 1 << 10).telling_every(Duration::from_secs(3600));
        hourly.insert(key(1), &Bytes::from_static(b"x"));
        // Stored just now: that counts as the last use the tier below saw.
        assert_eq!(hourly.hit(&key(1)), Some((Bytes::from_static(b"x"), false)));
        assert_eq!(hourly.hit(&key(2)), None);
    }

    #[test]
    fn bytes_read_before_a_blob_left_are_not_cached_after() {
        let cache = MemoryCache::new(1 << 20, 1 << 10);
        let mark = cache.mark(&key(1));
        cache.forget(&key(1));
        cache.insert_unless_forgotten(key(1), &Bytes::from_static(b"x"), mark);
        assert!(cache.get(&key(1)).is_none(), "read before the forget");
        let mark = cache.mark(&key(1));
        cache.insert_unless_forgotten(key(1), &Bytes::from_static(b"x"), mark);
        assert!(cache.get(&key(1)).is_some(), "read after it");
    }
}
