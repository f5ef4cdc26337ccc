//! The `grpc` and `shard` tiers: other REAPI CAS endpoints (Kiln servers, or any) as the
//! store of blobs, over the chain below (this server's own tiers, a read-through and
//! write-through cache of them). `grpc` is one endpoint; `shard` several, each blob on the
//! one [`super::rendezvous`] picks by its digest and their weights.
//!
//! - `put`: written to its shard first, then stored below, so that a shard that fails leaves
//!   nothing here (the upload is `UNAVAILABLE` and the client's retry finds the blob missing
//!   and sends it again).
//! - `contains`: what below does not hold is asked of its shard, all shards at once. A shard
//!   that fails (or failed a moment ago) answers its blobs missing, never held.
//! - `open` and `pin` of a blob below does not hold: fetched from its shard (checked against
//!   its digest as it arrives, by the `Cas` client) into this server's own files, then served
//!   from below; a pin fetches its blobs concurrently. A shard that fails makes a read
//!   `UNAVAILABLE` naming it, and a pin answers its blobs not held.
//!
//! Each call to a shard is bounded (a base of [`CALL_BASE`] plus the blob's size at
//! [`MIN_RATE`]); after a shard failed, calls to it fail at once for [`BACKOFF`], so a shard
//! that is down or hung costs each caller at most one bound. Work that creates a temp file or
//! commits runs to its end on the tier's runtime even when its caller goes away, so no temp
//! file is left behind.
//!
//! Endpoints are reached through [`kiln_reapi::cas::Cas`] clients the process supplies
//! ([`RemoteMaker`]).

use super::rendezvous;
use super::side_runtime::SideRuntime;
use super::{pinned_keys, Blob, BlobStore, PinHolder, StoreFuture, VerifiedUpload};
use crate::metrics::Metrics;
use crate::store::layout::Layout;
use crate::store::{CasClient, Committed, StoreError};
use futures::future::BoxFuture;
use futures::StreamExt;
use kiln_reapi::cas::{Cas, CasError};
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Makes the client of a CAS endpoint (`grpc://HOST:PORT`); called inside a tokio runtime.
pub type RemoteMaker = Arc<dyn Fn(&str) -> Result<Arc<dyn Cas>, String> + Send + Sync>;

/// The bound on a call to a shard, before its blob's share.
const CALL_BASE: Duration = Duration::from_secs(10);
/// The rate a shard is expected to move a blob at least.
const MIN_RATE: u64 = 10 << 20;
/// How long calls to a shard fail at once after it failed.
const BACKOFF: Duration = Duration::from_secs(1);
/// Blobs a pin fetches at once.
const FETCHES: usize = 16;

/// The endpoints of one remote tier, their clients, and the runtime that drives them.
pub struct Remotes {
    shards: Vec<(String, u32)>,
    /// Each shard's seed for [`rendezvous::owner_seeded`].
    seeds: Vec<(u64, u32)>,
    stores: Vec<Arc<dyn Cas>>,
    /// Until when each shard is taken for down, and why.
    down: Vec<Mutex<Option<(Instant, String)>>>,
    runtime: SideRuntime,
}

impl Remotes {
    /// Clients of `shards` (endpoint, weight) made by `maker`.
    pub fn new(shards: Vec<(String, u32)>, maker: &RemoteMaker) -> std::io::Result<Arc<Remotes>> {
        let runtime = SideRuntime::new("kiln-remote")?;
        let stores = runtime.enter(|| {
            shards
                .iter()
                .map(|(endpoint, _)| maker(endpoint).map_err(std::io::Error::other))
                .collect::<std::io::Result<Vec<_>>>()
        })?;
        Ok(Arc::new(Remotes {
            seeds: rendezvous::seeds(&shards),
            down: shards.iter().map(|_| Mutex::new(None)).collect(),
            shards,
            stores,
            runtime,
        }))
    }

    /// The shard of `key`.
    fn owner(&self, key: &BlobKey) -> usize {
        rendezvous::owner_seeded(&key.digest.hash, &self.seeds)
    }

    fn failed(&self, i: usize, why: impl std::fmt::Display) -> StoreError {
        StoreError::Shared(format!("CAS shard {}: {why}", self.shards[i].0))
    }

    fn down(&self, i: usize) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        self.down[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `work` against shard `i` on this tier's runtime, within `CALL_BASE` plus `bytes`
    /// at `MIN_RATE`; at once an error while the shard is taken for down.
    async fn call<T: Send + 'static>(
        &self,
        i: usize,
        bytes: u64,
        work: impl FnOnce(Arc<dyn Cas>) -> BoxFuture<'static, Result<T, CasError>>,
    ) -> Result<T, StoreError> {
        if let Some((until, why)) = self.down(i).clone() {
            if Instant::now() < until {
                return Err(self.failed(i, format!("failed a moment ago ({why})")));
            }
        }
        let bound = CALL_BASE + Duration::from_secs(bytes / MIN_RATE);
        let call = work(self.stores[i].clone());
        let outcome = self
            .runtime
            .run(async move { tokio::time::timeout(bound, call).await })
            .await;
        let why = match outcome {
            Ok(Ok(Ok(v))) => {
                *self.down(i) = None;
                return Ok(v);
            }
            // The blob is not there, or the request was refused: the shard is up.
            Ok(Ok(Err(e))) if !is_unavailable(&e) => return Err(self.failed(i, e)),
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(_)) => format!("no answer within {bound:?}"),
            Err(e) => e.0,
        };
        *self.down(i) = Some((Instant::now() + BACKOFF, why.clone()));
        Err(self.failed(i, why))
    }
}

/// Whether `e` says the endpoint could not be reached or could not answer.
fn is_unavailable(e: &CasError) -> bool {
    use kiln_reapi::status::Classify;
    e.kind() == kiln_reapi::status::ErrorKind::Unavailable
}

/// Blobs kept by [`Remotes`], over `below`.
pub struct RemoteTier {
    inner: Arc<Inner>,
}

/// What the tier's work, run to its end on the tier's runtime, shares.
struct Inner {
    remotes: Arc<Remotes>,
    below: Arc<dyn BlobStore>,
    cas: CasClient,
    layout: Layout,
    metrics: Arc<Metrics>,
}

impl RemoteTier {
    /// Blobs of `remotes` over `below`; fetched blobs are written through temp files of
    /// `layout`.
    pub fn new(
        remotes: Arc<Remotes>,
        below: Arc<dyn BlobStore>,
        cas: CasClient,
        layout: Layout,
        metrics: Arc<Metrics>,
    ) -> RemoteTier {
        RemoteTier {
            inner: Arc::new(Inner {
                remotes,
                below,
                cas,
                layout,
                metrics,
            }),
        }
    }

    /// Runs `work` on the tier's runtime, to its end even if the caller goes away.
    async fn to_the_end<T: Send + 'static>(
        &self,
        work: impl FnOnce(Arc<Inner>) -> BoxFuture<'static, Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        self.inner
            .remotes
            .runtime
            .run(work(self.inner.clone()))
            .await
            .map_err(|e| {
                StoreError::Shared(format!("the call to a CAS shard was cut short: {}", e.0))
            })?
    }
}

impl Inner {
    /// Fetches `key` from its shard into below; `false` when the shard does not hold it.
    async fn fill(self: Arc<Self>, key: BlobKey) -> Result<bool, StoreError> {
        let epoch = self.cas.sync_epoch();
        let temp = self.layout.temp_path();
        let (instance, digest, path) = (key.instance.clone(), key.digest, temp.clone());
        let held = self
            .remotes
            .call(self.remotes.owner(&key), digest.size, move |cas| {
                Box::pin(async move { cas.read_to_file(&instance, digest, &path).await })
            })
            .await;
        match held {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(e) => {
                let _ = std::fs::remove_file(&temp);
                self.metrics.remote_failures.inc();
                return Err(e);
            }
        }
        let upload = VerifiedUpload {
            temp: Some(temp),
            data: None,
            epoch,
        };
        self.below.put(&key, upload).await?;
        self.metrics.remote_fetched_bytes.inc_by(key.digest.size);
        Ok(true)
    }

    /// Writes `upload` to `key`'s shard, then stores it below.
    async fn put(
        self: Arc<Self>,
        key: BlobKey,
        upload: VerifiedUpload,
    ) -> Result<Committed, StoreError> {
        let shard = self.remotes.owner(&key);
        let (instance, digest) = (key.instance.clone(), key.digest);
        let written = match (upload.data.clone(), upload.temp.clone()) {
            (Some(data), _) => {
                self.remotes
                    .call(shard, digest.size, move |cas| {
                        Box::pin(
                            async move { cas.write_blobs(&instance, vec![(digest, data)]).await },
                        )
                    })
                    .await
            }
            (None, Some(path)) => {
                self.remotes
                    .call(shard, digest.size, move |cas| {
                        Box::pin(async move { cas.write_file(&instance, digest, &path).await })
                    })
                    .await
            }
            (None, None) => Err(StoreError::Unavailable),
        };
        if let Err(e) = written {
            // Nothing kept here: the client's retry finds the blob missing and sends it again.
            if let Some(temp) = &upload.temp {
                let _ = std::fs::remove_file(temp);
            }
            self.metrics.remote_failures.inc();
            return Err(e);
        }
        self.below.put(&key, upload).await
    }
}

/// `keys` at `positions`, grouped by the instance they are in.
fn by_instance(
    keys: &[BlobKey],
    positions: &[usize],
) -> BTreeMap<InstanceName, Vec<(usize, Digest)>> {
    let mut out: BTreeMap<InstanceName, Vec<(usize, Digest)>> = BTreeMap::new();
    for &i in positions {
        out.entry(keys[i].instance.clone())
            .or_default()
            .push((i, keys[i].digest));
    }
    out
}

impl BlobStore for RemoteTier {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut held = inner.below.contains(keys).await?;
            let mut per_shard: Vec<Vec<usize>> = vec![Vec::new(); inner.remotes.shards.len()];
            for (i, key) in keys.iter().enumerate() {
                if !held[i] {
                    per_shard[inner.remotes.owner(key)].push(i);
                }
            }
            let asks = per_shard.iter().enumerate().flat_map(|(shard, positions)| {
                by_instance(keys, positions)
                    .into_iter()
                    .map(move |(instance, wanted)| {
                        let digests: Vec<Digest> = wanted.iter().map(|(_, d)| *d).collect();
                        let positions: Vec<usize> = wanted.iter().map(|(i, _)| *i).collect();
                        async move {
                            let answer = inner
                                .remotes
                                .call(shard, 0, move |cas| {
                                    Box::pin(
                                        async move { cas.find_missing(&instance, &digests).await },
                                    )
                                })
                                .await;
                            (positions, answer)
                        }
                    })
            });
            for (positions, answer) in futures::future::join_all(asks).await {
                match answer {
                    Ok(missing) => {
                        let missing: std::collections::HashSet<Digest> =
                            missing.into_iter().collect();
                        for i in positions {
                            held[i] = !missing.contains(&keys[i].digest);
                        }
                    }
                    Err(e) => {
                        inner.metrics.remote_failures.inc();
                        tracing::warn!(error = %e, "a CAS shard could not say which blobs it holds; answered as missing");
                    }
                }
            }
            Ok(held)
        })
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async move {
            if let Some(blob) = self.inner.below.open(key).await? {
                return Ok(Some(blob));
            }
            let owned = key.clone();
            if key.digest.is_empty_blob()
                || !self.to_the_end(|inner| Box::pin(inner.fill(owned))).await?
            {
                return Ok(None);
            }
            self.inner.below.open(key).await
        })
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        let key = key.clone();
        Box::pin(async move {
            self.to_the_end(move |inner| Box::pin(inner.put(key, upload)))
                .await
        })
    }

    fn pin<'a>(
        &'a self,
        holder: PinHolder,
        keys: &'a [BlobKey],
    ) -> StoreFuture<'a, Vec<Option<bool>>> {
        Box::pin(async move {
            let inner = &self.inner;
            let mut pinned = inner.below.pin(holder, keys).await?;
            let wanted: Vec<usize> = (0..keys.len())
                .filter(|&i| pinned[i].is_none() && !keys[i].digest.is_empty_blob())
                .collect();
            if wanted.is_empty() {
                return Ok(pinned);
            }
            let fetched: Vec<(usize, bool)> = futures::stream::iter(wanted)
                .map(|i| {
                    let key = keys[i].clone();
                    async move {
                        match self.to_the_end(|inner| Box::pin(inner.fill(key))).await {
                            Ok(stored) => (i, stored),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot fetch a blob from its shard to pin it");
                                (i, false)
                            }
                        }
                    }
                })
                .buffer_unordered(FETCHES)
                .collect()
                .await;
            let now: Vec<usize> = fetched
                .into_iter()
                .filter(|(_, s)| *s)
                .map(|(i, _)| i)
                .collect();
            let again_keys: Vec<BlobKey> = now.iter().map(|&i| keys[i].clone()).collect();
            match inner.below.pin(holder, &again_keys).await {
                Ok(again) => {
                    for (i, p) in now.into_iter().zip(again) {
                        pinned[i] = p;
                    }
                    Ok(pinned)
                }
                Err(e) => {
                    // All or nothing: the pins already taken go back.
                    inner.below.unpin(holder, &pinned_keys(keys, &pinned)).await;
                    Err(e)
                }
            }
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
