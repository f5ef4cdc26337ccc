//! The CAS as a chain of tiers. Every tier implements [`BlobStore`]; decorators hold the tier
//! below them, so a chain is composed from `storage.chain` in the configuration ([`chain`])
//! without any tier knowing which others exist.
//!
//! - [`filesystem`]: the owner shards' files, through their router ([`super::CasClient`]):
//!   verified commit, eviction, access times. Every chain ends in it.
//! - [`memory`]: recently read small blobs in memory, shared by every core.
//! - [`size_partition`]: small and large blobs to different chains.
//! - [`in_flight`]: a reader of a blob being uploaded follows the upload (read-while-write).
//! - [`redis`]: small blobs shared through Redis with the other servers of a farm.
//! - [`remote`]: other REAPI CAS endpoints as the store, one (`grpc`) or sharded by
//!   [`rendezvous`] hashing (`shard`), this server's own tiers a cache of them.
//!
//! Blobs leave the store as a [`Blob`], which checks its bytes as they are consumed when this
//! process has not checked them yet ([`blob`]): verification is in that one place.

pub mod blob;
pub mod chain;
mod check;
pub mod filesystem;
pub mod in_flight;
pub mod log;
pub mod memory;
pub mod redis;
pub mod remote;
pub mod rendezvous;
mod side_runtime;
pub mod size_partition;

pub use blob::{Blob, BlobWatcher, ChunkSink, StreamEnd, Verdict};
pub use chain::ChainPlan;

use super::commands::Committed;
use super::StoreError;
use bytes::Bytes;
use futures::future::BoxFuture;
use kiln_reapi::digest::BlobKey;
use std::path::PathBuf;
use std::sync::Arc;

/// What a tier's methods return.
pub type StoreFuture<'a, T> = BoxFuture<'a, Result<T, StoreError>>;

/// An upload whose bytes were checked against its digest: a temp file in the CAS's temp
/// directory (the tier that keeps it takes it over, and removes it if it does not), or only
/// bytes in memory, for a store that does not keep files ([`BlobStore::keeps_files`]).
#[derive(Debug)]
pub struct VerifiedUpload {
    /// The temp file holding exactly the blob's bytes (`None`: only `data`).
    pub temp: Option<PathBuf>,
    /// The same bytes in memory, when the writer has them (small blobs), for memory tiers.
    pub data: Option<Bytes>,
    /// [`super::CasClient::sync_epoch`] read before the temp file's first byte was written.
    pub epoch: u64,
}

/// Who holds a pin, and until when: a pin is a lease of its holder, released only by that
/// holder (or by its deadline). One per queued operation, one per action on a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinHolder {
    /// Unique per holder.
    pub id: u64,
    /// When its pins end by themselves, on [`lease_clock`] (`u64::MAX`: never).
    pub until: u64,
}

impl PinHolder {
    /// A new holder whose pins last at most `ttl` from now.
    pub fn new(ttl: std::time::Duration) -> PinHolder {
        PinHolder {
            until: lease_clock().saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX)),
            ..PinHolder::unbounded()
        }
    }

    /// A new holder whose pins last until it releases them.
    pub fn unbounded() -> PinHolder {
        PinHolder {
            id: uuid::Uuid::new_v4().as_u64_pair().0,
            until: u64::MAX,
        }
    }
}

/// The clock of pin deadlines: nanoseconds since this process first read it, monotonic (a
/// wall-clock step neither ends nor stretches pins).
pub fn lease_clock() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// A blob store: one tier, or a chain of them. Usable from any thread (the data plane's cores
/// and the control plane share the tiers' state).
pub trait BlobStore: Send + Sync {
    /// For each key, whether the store holds it (the empty blob always); held blobs count as
    /// used now.
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>>;

    /// The blob, ready to read, or `None` when the store does not hold it.
    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>>;

    /// Stores a verified upload; visible (and acknowledged) only once durable as configured.
    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed>;

    /// Pins the held blobs against eviction for `holder` (a holder pins a blob once). Per key:
    /// `None` not held; `Some(checked)` pinned, and whether this process has hashed it (a
    /// reader that uses the file itself, not through [`Blob`], must check it when not).
    fn pin<'a>(
        &'a self,
        holder: PinHolder,
        keys: &'a [BlobKey],
    ) -> StoreFuture<'a, Vec<Option<bool>>>;

    /// Releases `holder`'s pins of `keys` (only the keys that were pinned; others' pins stay).
    fn unpin<'a>(&'a self, holder: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()>;

    /// Blobs a tier above served itself: they count as used now (best effort).
    fn touched(&self, keys: &[BlobKey]);

    /// Whether the store keeps `key` as a file of its own (the filesystem tier), so that an
    /// upload of it is written to a temp file first and a worker can hardlink it. A store
    /// that does not (the small-blob log) takes the upload's bytes from memory, and workers
    /// copy the blob's bytes. Decorators answer for the store below them.
    fn keeps_files(&self, _key: &BlobKey) -> bool {
        true
    }
}

/// Told when a blob enters the filesystem tier and when it no longer holds it (evicted,
/// found damaged or gone): a cache of it drops its copy, so that every tier agrees the blob
/// is gone; a worker notes what it holds, to tell the scheduler.
pub trait BlobEvents: Send + Sync {
    /// `key` was committed to the filesystem tier (or found there by the background index
    /// rebuild).
    fn stored(&self, _key: &BlobKey) {}

    /// `key` left the filesystem tier.
    fn forget(&self, key: &BlobKey);
}

/// Of `keys`, those a pin answered as pinned (`pinned`: its answer), to release them.
pub fn pinned_keys(keys: &[BlobKey], pinned: &[Option<bool>]) -> Vec<BlobKey> {
    keys.iter()
        .zip(pinned)
        .filter(|(_, p)| p.is_some())
        .map(|(k, _)| k.clone())
        .collect()
}

/// Pins `keys` in a tokio task of its own, so that a caller cancelled meanwhile (a client that
/// gave up on its `Execute`, an action cancelled while its inputs are pinned) leaves no pin
/// behind: pins the caller never received are released by the task.
pub async fn pin_to_the_end(
    store: Arc<dyn BlobStore>,
    holder: PinHolder,
    keys: Vec<BlobKey>,
) -> Result<Vec<Option<bool>>, StoreError> {
    let (tx, rx) = futures::channel::oneshot::channel();
    tokio::spawn(async move {
        let result = store.pin(holder, &keys).await;
        if let Err(Ok(pinned)) = tx.send(result) {
            store.unpin(holder, &pinned_keys(&keys, &pinned)).await;
        }
    });
    rx.await.map_err(|_| StoreError::Unavailable)?
}

/// For a blob `store` keeps outside files (a small-blob log), whether it holds it; `None` for
/// a blob kept as a file, which the owner shards' index answers for. Upload claims and
/// `QueryWriteStatus` ask this first: a file of such a blob left from before is not what the
/// chain serves.
pub async fn held_outside_files(
    store: &dyn BlobStore,
    key: &BlobKey,
) -> Result<Option<bool>, StoreError> {
    if store.keeps_files(key) {
        return Ok(None);
    }
    Ok(Some(store.contains(std::slice::from_ref(key)).await?[0]))
}

/// The keys `store` does not hold, in order.
pub async fn find_missing(
    store: &dyn BlobStore,
    keys: &[BlobKey],
) -> Result<Vec<BlobKey>, StoreError> {
    let present = store.contains(keys).await?;
    Ok(keys
        .iter()
        .zip(present)
        .filter(|(_, p)| !*p)
        .map(|(k, _)| k.clone())
        .collect())
}

/// A whole blob's bytes, checked, for code on a tokio runtime (the control plane, workers):
/// a file is read on tokio's blocking pool. `None` when the store does not hold it (or its
/// copy turned out damaged or gone, and left the store).
pub async fn read_whole(store: &dyn BlobStore, key: &BlobKey) -> Result<Option<Bytes>, StoreError> {
    let Some(blob) = store.open(key).await? else {
        return Ok(None);
    };
    let result = if blob.in_memory() {
        blob.read_all_blocking()
    } else {
        tokio::task::spawn_blocking(move || blob.read_all_blocking())
            .await
            .map_err(|_| StoreError::Unavailable)?
    };
    match result {
        Ok(data) => Ok(Some(data)),
        Err(StoreError::Corrupt(_) | StoreError::Vanished(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
pub(crate) mod behaviour;
#[cfg(test)]
mod pin_tests;
