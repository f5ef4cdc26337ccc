//! The `redis` tier (`storage.tiers.NAME = { kind = "redis", max_blob_bytes = … }`): small
//! blobs shared through Redis by every server naming the same Redis (`[redis]`), over the
//! chain below it (the server's own tiers, which stay where its files are):
//!
//! - `put`: stored below, then written through to Redis (a blob up to `max_blob_bytes` whose
//!   bytes the writer holds). A failed write to Redis is logged and counted, not the upload's
//!   failure: the blob is durable here.
//! - `contains`: the keys below does not hold and Redis may, asked of Redis in pipelined
//!   chunks (`redis.pipeline_keys` per round trip). With Redis down they are answered as
//!   missing (the client uploads them again), never as held.
//! - `open` and `pin` of a blob only Redis holds: its bytes fetched, checked against the
//!   digest, and stored below first (so that it is a file here, pinnable and linkable like
//!   any other), then served from below. With Redis down such a read fails `UNAVAILABLE`
//!   naming Redis.
//!
//! Redis is reached from a small tokio runtime of this tier's own ([`SharedBlobs`]), whatever
//! executor calls the tier (the data plane's cores, the control plane).

use super::side_runtime::SideRuntime;
use super::{Blob, BlobStore, PinHolder, StoreFuture, VerifiedUpload};
use crate::metrics::Metrics;
use crate::store::layout::Layout;
use crate::store::{CasClient, Committed, StoreError};
use bytes::Bytes;
use futures::future::BoxFuture;
use kiln_reapi::digest::{BlobKey, Digest};
use kiln_redis::{Redis, RedisError, Value};
use std::sync::Arc;

/// Redis and the runtime that reaches it, shared by every core's chain.
pub struct SharedBlobs {
    redis: Arc<Redis>,
    runtime: SideRuntime,
}

impl SharedBlobs {
    /// Blobs shared through `redis`.
    pub fn new(redis: Arc<Redis>) -> std::io::Result<Arc<SharedBlobs>> {
        Ok(Arc::new(SharedBlobs {
            redis,
            runtime: SideRuntime::new("kiln-redis")?,
        }))
    }

    /// Runs `work` against Redis on this tier's runtime.
    async fn call<T: Send + 'static>(
        &self,
        work: impl FnOnce(Arc<Redis>) -> BoxFuture<'static, Result<T, RedisError>>,
    ) -> Result<T, RedisError> {
        let redis = self.redis.clone();
        let at = redis.at().to_string();
        self.runtime
            .run(work(redis))
            .await
            .map_err(|e| RedisError::Failed {
                at,
                message: format!("the call was cut short: {}", e.0),
            })?
    }
}

/// Small blobs through Redis, over `below`.
pub struct RedisTier {
    inner: Arc<RedisInner>,
}

/// What the tier's work, run to its end on the tier's runtime, shares.
struct RedisInner {
    shared: Arc<SharedBlobs>,
    below: Arc<dyn BlobStore>,
    max_blob: u64,
    cas: CasClient,
    layout: Layout,
    metrics: Arc<Metrics>,
}

impl RedisTier {
    /// Blobs up to `max_blob` bytes shared through `shared`, over `below`; blobs fetched are
    /// stored below through temp files of `layout`.
    pub fn new(
        shared: Arc<SharedBlobs>,
        below: Arc<dyn BlobStore>,
        max_blob: u64,
        cas: CasClient,
        layout: Layout,
        metrics: Arc<Metrics>,
    ) -> RedisTier {
        RedisTier {
            inner: Arc::new(RedisInner {
                shared,
                below,
                max_blob,
                cas,
                layout,
                metrics,
            }),
        }
    }
}

impl RedisInner {
    fn shares(&self, key: &BlobKey) -> bool {
        key.digest.size > 0 && key.digest.size <= self.max_blob
    }

    /// The Redis key of a blob: instance, digest function, the hash in a hash tag, size.
    fn key(&self, key: &BlobKey) -> String {
        self.shared.redis.digest_key("cas", key)
    }

    fn failed(&self, what: &str, e: &RedisError) {
        self.metrics.redis_failures.inc();
        e.log(&"blobs", what);
    }

    /// Fetches `keys` (all shared, none held below) from Redis and stores below those Redis
    /// has and whose bytes match their digest; returns which were stored.
    async fn fill(&self, keys: &[BlobKey]) -> Result<Vec<bool>, StoreError> {
        // Each read up to its digest's size: a longer value is not even transferred.
        let names: Vec<(String, u64)> = keys.iter().map(|k| (self.key(k), k.digest.size)).collect();
        let values = self
            .shared
            .call(move |r| Box::pin(async move { r.get_many(&names).await }))
            .await
            .map_err(|e| StoreError::Shared(e.to_string()))?;
        let mut stored = Vec::with_capacity(keys.len());
        for (key, value) in keys.iter().zip(values) {
            let data = match value {
                Value::Found(data) => data,
                Value::Missing => {
                    stored.push(false);
                    continue;
                }
                Value::TooLarge(_) => Bytes::new(),
            };
            if Digest::of(key.digest.function, &data) != key.digest {
                tracing::warn!(blob = ?key.digest, "a blob in Redis does not match its digest; dropping it");
                let name = self.key(key);
                let _ = self
                    .shared
                    .call(move |r| Box::pin(async move { r.delete(&name).await }))
                    .await;
                stored.push(false);
                continue;
            }
            self.store_below(key, data).await?;
            stored.push(true);
        }
        Ok(stored)
    }

    /// [`RedisInner::fill`] on the tier's runtime, to its end even if the caller goes away
    /// (so that no temp file is left behind).
    async fn fill_to_the_end(self: &Arc<Self>, keys: &[BlobKey]) -> Result<Vec<bool>, StoreError> {
        let (this, keys) = (self.clone(), keys.to_vec());
        self.shared
            .runtime
            .run(async move { this.fill(&keys).await })
            .await
            .map_err(|e| StoreError::Shared(format!("a fetch from Redis was cut short: {}", e.0)))?
    }

    /// Stores `data` (checked against `key`) below, through a temp file written on this
    /// tier's runtime (never on a data-plane core).
    async fn store_below(&self, key: &BlobKey, data: Bytes) -> Result<(), StoreError> {
        let epoch = self.cas.sync_epoch();
        if !self.below.keeps_files(key) {
            let upload = VerifiedUpload {
                temp: None,
                data: Some(data),
                epoch,
            };
            self.below.put(key, upload).await?;
            self.metrics.redis_fetched_bytes.inc_by(key.digest.size);
            return Ok(());
        }
        let temp = self.layout.temp_path();
        let (path, bytes) = (temp.clone(), data.clone());
        let written = self
            .shared
            .runtime
            .blocking(move || std::fs::write(&path, &bytes))
            .await
            .map_err(|_| StoreError::Unavailable)?;
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(StoreError::io("write", temp, e));
        }
        self.below
            .put(
                key,
                VerifiedUpload {
                    temp: Some(temp),
                    data: Some(data),
                    epoch,
                },
            )
            .await?;
        self.metrics.redis_fetched_bytes.inc_by(key.digest.size);
        Ok(())
    }
}

impl BlobStore for RedisTier {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(async move {
            let mut held = self.inner.below.contains(keys).await?;
            let asked: Vec<usize> = (0..keys.len())
                .filter(|&i| !held[i] && self.inner.shares(&keys[i]))
                .collect();
            if asked.is_empty() {
                return Ok(held);
            }
            let names: Vec<String> = asked.iter().map(|&i| self.inner.key(&keys[i])).collect();
            match self
                .inner
                .shared
                .call(move |r| Box::pin(async move { r.exists_many(&names).await }))
                .await
            {
                Ok(found) => {
                    for (i, f) in asked.into_iter().zip(found) {
                        held[i] = f;
                    }
                }
                Err(e) => self.inner.failed(
                    "cannot ask Redis which blobs it holds; answered as missing",
                    &e,
                ),
            }
            Ok(held)
        })
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async move {
            if let Some(blob) = self.inner.below.open(key).await? {
                return Ok(Some(blob));
            }
            if !self.inner.shares(key)
                || !self
                    .inner
                    .fill_to_the_end(std::slice::from_ref(key))
                    .await?[0]
            {
                return Ok(None);
            }
            self.inner.below.open(key).await
        })
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        Box::pin(async move {
            let data = upload.data.clone().filter(|_| self.inner.shares(key));
            let committed = self.inner.below.put(key, upload).await?;
            if let Some(data) = data {
                let name = self.inner.key(key);
                let written = self
                    .inner
                    .shared
                    .call(move |r| Box::pin(async move { r.put(&name, &data, None).await }))
                    .await;
                match written {
                    Ok(()) => {
                        self.inner
                            .metrics
                            .redis_stored_bytes
                            .inc_by(key.digest.size);
                    }
                    Err(e) => self
                        .inner
                        .failed("cannot write a blob through to Redis", &e),
                }
            }
            Ok(committed)
        })
    }

    fn pin<'a>(
        &'a self,
        holder: PinHolder,
        keys: &'a [BlobKey],
    ) -> StoreFuture<'a, Vec<Option<bool>>> {
        Box::pin(async move {
            let mut pinned = self.inner.below.pin(holder, keys).await?;
            let wanted: Vec<usize> = (0..keys.len())
                .filter(|&i| pinned[i].is_none() && self.inner.shares(&keys[i]))
                .collect();
            if wanted.is_empty() {
                return Ok(pinned);
            }
            let fetch: Vec<BlobKey> = wanted.iter().map(|&i| keys[i].clone()).collect();
            let stored = match self.inner.fill_to_the_end(&fetch).await {
                Ok(s) => s,
                Err(e) => {
                    // What is pinned stays pinned; the rest is not held, as far as a pin goes.
                    tracing::warn!(error = %e, "cannot fetch blobs from Redis to pin them");
                    return Ok(pinned);
                }
            };
            let now: Vec<BlobKey> = fetch
                .into_iter()
                .zip(&stored)
                .filter(|(_, s)| **s)
                .map(|(k, _)| k)
                .collect();
            let again = match self.inner.below.pin(holder, &now).await {
                Ok(again) => again,
                Err(e) => {
                    // All or nothing: the pins already taken go back.
                    self.inner
                        .below
                        .unpin(holder, &super::pinned_keys(keys, &pinned))
                        .await;
                    return Err(e);
                }
            };
            let mut again = again.into_iter();
            for (i, s) in wanted.into_iter().zip(stored) {
                if s {
                    pinned[i] = again.next().flatten();
                }
            }
            Ok(pinned)
        })
    }

    fn unpin<'a>(&'a self, holder: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()> {
        self.inner.below.unpin(holder, keys)
    }

    fn touched(&self, keys: &[BlobKey]) {
        self.inner.below.touched(keys)
    }

    fn keeps_files(&self, key: &BlobKey) -> bool {
        self.inner.below.keeps_files(key)
    }
}
