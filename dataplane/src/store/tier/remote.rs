//! The `grpc` and `shard` tiers: other REAPI CAS endpoints (Kiln servers, or any) as the
//! store of blobs, over the chain below (this server's own tiers, a read-through and
//! write-through cache of them). `grpc` is one endpoint; `shard` several, each blob on the
//! one [`super::rendezvous`] picks by its digest and their weights.
//!
//! - `contains`: what below does not hold is asked of its shard, each shard's share in one
//!   call, all shards at once. A shard that fails answers its blobs missing (the client
//!   uploads them again), never held.
//! - `open` and `pin` of a blob below does not hold: fetched from its shard (checked against
//!   its digest as it arrives) into this server's own files, then served from below. A shard
//!   that fails is `UNAVAILABLE`, naming it, for its blobs only.
//! - `put`: stored below, then written to its shard; a shard that fails makes the upload
//!   `UNAVAILABLE` (the client sends it again), though this server keeps it.
//!
//! Endpoints are reached through [`kiln_reapi::cas::Cas`] clients the process supplies
//! ([`RemoteMaker`]), on a small tokio runtime of the tier's own, whatever executor calls the
//! tier.

use super::rendezvous;
use super::side_runtime::SideRuntime;
use super::{Blob, BlobStore, PinHolder, StoreFuture, VerifiedUpload};
use crate::metrics::Metrics;
use crate::store::layout::Layout;
use crate::store::{CasClient, Committed, StoreError};
use futures::future::BoxFuture;
use kiln_reapi::cas::{Cas, CasError};
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Makes the client of a CAS endpoint (`grpc://HOST:PORT`); called inside a tokio runtime.
pub type RemoteMaker = Arc<dyn Fn(&str) -> Result<Arc<dyn Cas>, String> + Send + Sync>;

/// The endpoints of one remote tier, their clients, and the runtime that drives them.
pub struct Remotes {
    shards: Vec<(String, u32)>,
    stores: Vec<Arc<dyn Cas>>,
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
            shards,
            stores,
            runtime,
        }))
    }

    /// The shard of `key`.
    fn owner(&self, key: &BlobKey) -> usize {
        if self.shards.len() == 1 {
            return 0;
        }
        rendezvous::owner(&key.digest.hash, &self.shards)
    }

    /// Runs `work` against shard `i` on this tier's runtime.
    async fn call<T: Send + 'static>(
        &self,
        i: usize,
        work: impl FnOnce(Arc<dyn Cas>) -> BoxFuture<'static, Result<T, CasError>>,
    ) -> Result<T, StoreError> {
        let failed =
            |why: String| StoreError::Shared(format!("CAS shard {}: {why}", self.shards[i].0));
        self.runtime
            .run(work(self.stores[i].clone()))
            .await
            .map_err(|e| failed(e.0))?
            .map_err(|e| failed(e.to_string()))
    }
}

/// Blobs kept by [`Remotes`], over `below`.
pub struct RemoteTier {
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
            remotes,
            below,
            cas,
            layout,
            metrics,
        }
    }

    /// Fetches `key` from its shard into below; `false` when the shard does not hold it.
    async fn fill(&self, key: &BlobKey) -> Result<bool, StoreError> {
        let epoch = self.cas.sync_epoch();
        let temp = self.layout.temp_path();
        let (instance, digest, path) = (key.instance.clone(), key.digest, temp.clone());
        let held = self
            .remotes
            .call(self.remotes.owner(key), move |cas| {
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
        self.below
            .put(
                key,
                VerifiedUpload {
                    temp,
                    data: None,
                    epoch,
                },
            )
            .await?;
        self.metrics.remote_fetched_bytes.inc_by(key.digest.size);
        Ok(true)
    }

    /// Writes `key`, stored below, to its shard.
    async fn write_through(
        &self,
        key: &BlobKey,
        data: Option<bytes::Bytes>,
    ) -> Result<(), StoreError> {
        let shard = self.remotes.owner(key);
        let (instance, digest) = (key.instance.clone(), key.digest);
        if let Some(data) = data {
            return self
                .remotes
                .call(shard, move |cas| {
                    Box::pin(async move { cas.write_blobs(&instance, vec![(digest, data)]).await })
                })
                .await;
        }
        let blob = self
            .below
            .open(key)
            .await?
            .ok_or_else(|| StoreError::Vanished(key.clone()))?;
        match blob.path().map(|p| p.to_path_buf()) {
            Some(path) => {
                self.remotes
                    .call(shard, move |cas| {
                        Box::pin(async move { cas.write_file(&instance, digest, &path).await })
                    })
                    .await
            }
            None => {
                let data = self
                    .remotes
                    .runtime
                    .blocking(move || blob.read_all_blocking())
                    .await
                    .map_err(|e| StoreError::Shared(e.0))??;
                self.remotes
                    .call(shard, move |cas| {
                        Box::pin(
                            async move { cas.write_blobs(&instance, vec![(digest, data)]).await },
                        )
                    })
                    .await
            }
        }
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
            let mut held = self.below.contains(keys).await?;
            let mut per_shard: Vec<Vec<usize>> = vec![Vec::new(); self.remotes.shards.len()];
            for (i, key) in keys.iter().enumerate() {
                if !held[i] {
                    per_shard[self.remotes.owner(key)].push(i);
                }
            }
            let asks = per_shard.iter().enumerate().flat_map(|(shard, positions)| {
                by_instance(keys, positions)
                    .into_iter()
                    .map(move |(instance, wanted)| {
                        let digests: Vec<Digest> = wanted.iter().map(|(_, d)| *d).collect();
                        let positions: Vec<usize> = wanted.iter().map(|(i, _)| *i).collect();
                        async move {
                            let answer = self
                                .remotes
                                .call(shard, move |cas| {
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
                        self.metrics.remote_failures.inc();
                        tracing::warn!(error = %e, "a CAS shard could not say which blobs it holds; answered as missing");
                    }
                }
            }
            Ok(held)
        })
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async move {
            if let Some(blob) = self.below.open(key).await? {
                return Ok(Some(blob));
            }
            if key.digest.is_empty_blob() || !self.fill(key).await? {
                return Ok(None);
            }
            self.below.open(key).await
        })
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        Box::pin(async move {
            let data = upload.data.clone();
            let committed = self.below.put(key, upload).await?;
            if let Err(e) = self.write_through(key, data).await {
                self.metrics.remote_failures.inc();
                return Err(e);
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
            let mut pinned = self.below.pin(holder, keys).await?;
            for i in 0..keys.len() {
                if pinned[i].is_some() || keys[i].digest.is_empty_blob() {
                    continue;
                }
                match self.fill(&keys[i]).await {
                    Ok(true) => {
                        pinned[i] = self
                            .below
                            .pin(holder, std::slice::from_ref(&keys[i]))
                            .await?
                            .pop()
                            .flatten();
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot fetch a blob from its shard to pin it")
                    }
                }
            }
            Ok(pinned)
        })
    }

    fn unpin<'a>(&'a self, holder: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()> {
        self.below.unpin(holder, keys)
    }

    fn touched(&self, keys: &[BlobKey]) {
        self.below.touched(keys)
    }
}
