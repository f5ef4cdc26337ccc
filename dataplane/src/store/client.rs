//! The handle every core and the control plane use to reach the CAS: it routes each blob to
//! the shard that owns its part of the digest space, over that shard's bounded queue.

use super::accounting::Accounting;
use super::commands::{Command, Committed, Found, ShardStats, UploadClaim, UploadStatus};
use super::parked::ParkedUpload;
use super::StoreError;
use crate::metrics::Metrics;
use bytes::Bytes;
use futures::channel::oneshot;
use kiln_reapi::digest::{BlobKey, Digest};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// A cloneable, `Send` handle to all owner shards.
#[derive(Clone)]
pub struct CasClient {
    shards: Arc<[async_channel::Sender<Command>]>,
    metrics: Arc<Metrics>,
    accounting: Arc<Accounting>,
    /// The shard this handle is used on (`None`: the control plane), for counting.
    home: Option<usize>,
}

/// The receiving ends of the shard queues, one per shard, handed to the shards at start.
pub struct ShardQueues(pub(crate) Vec<async_channel::Receiver<Command>>);

impl CasClient {
    /// Creates queues of `depth` for `shards` shards.
    pub fn new(
        shards: usize,
        depth: usize,
        metrics: Arc<Metrics>,
        accounting: Arc<Accounting>,
    ) -> (CasClient, ShardQueues) {
        let (senders, receivers): (Vec<_>, Vec<_>) = (0..shards.max(1))
            .map(|_| async_channel::bounded(depth.max(1)))
            .unzip();
        (
            CasClient {
                shards: senders.into(),
                metrics,
                accounting,
                home: None,
            },
            ShardQueues(receivers),
        )
    }

    /// The same handle, used on shard `home`.
    pub fn for_shard(&self, home: usize) -> CasClient {
        CasClient {
            home: Some(home),
            ..self.clone()
        }
    }

    /// The counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Disk usage, cap and pinned bytes.
    pub fn accounting(&self) -> &Arc<Accounting> {
        &self.accounting
    }

    fn count(&self, shard: usize) {
        self.metrics.command(match self.home {
            None => "control",
            Some(h) if h == shard => "local",
            Some(_) => "remote",
        });
    }

    /// Number of shards.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The shard that owns a digest.
    pub fn owner_of(&self, digest: &Digest) -> usize {
        (digest.shard_bits() % self.shards.len() as u64) as usize
    }

    /// Commands waiting in each shard's queue.
    pub fn queue_depths(&self) -> Vec<usize> {
        self.shards.iter().map(|s| s.len()).collect()
    }

    async fn call<T>(
        &self,
        shard: usize,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.count(shard);
        self.shards[shard]
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Unavailable)?;
        rx.await.map_err(|_| StoreError::Unavailable)
    }

    fn tell(&self, shard: usize, command: Command) {
        // Best effort: these notices only save work later (a lost "verified" means the blob is
        // hashed again on its next read; a lost "corrupt" is found again the same way).
        self.count(shard);
        let _ = self.shards[shard].try_send(command);
    }

    /// For each key, whether the CAS holds it (the empty blob always); present blobs count as
    /// used now.
    pub async fn contains(&self, keys: &[BlobKey]) -> Result<Vec<bool>, StoreError> {
        let n = self.shards.len();
        let mut groups: Vec<(Vec<usize>, Vec<BlobKey>)> = vec![(Vec::new(), Vec::new()); n];
        let mut out = vec![false; keys.len()];
        for (i, key) in keys.iter().enumerate() {
            if key.digest.is_empty_blob() {
                out[i] = true;
                continue;
            }
            let g = &mut groups[self.owner_of(&key.digest)];
            g.0.push(i);
            g.1.push(key.clone());
        }
        let calls = groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.1.is_empty())
            .map(|(shard, (positions, keys))| async move {
                let present = self
                    .call(shard, |reply| Command::FindMissing { keys, reply })
                    .await?;
                Ok::<_, StoreError>((positions, present))
            });
        let mut failure = None;
        for result in futures::future::join_all(calls).await {
            match result {
                Ok((positions, present)) => {
                    for (p, is) in positions.into_iter().zip(present) {
                        out[p] = is;
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        if let Some(e) = failure {
            // All or nothing: release what the shards that answered did pin.
            let pinned: Vec<BlobKey> = keys
                .iter()
                .zip(&out)
                .filter(|(_, is)| **is)
                .map(|(k, _)| k.clone())
                .collect();
            self.unpin(&pinned).await;
            return Err(e);
        }
        Ok(out)
    }

    /// The keys the CAS does not hold (the empty blob is always held).
    pub async fn find_missing(&self, keys: &[BlobKey]) -> Result<Vec<BlobKey>, StoreError> {
        let present = self.contains(keys).await?;
        Ok(keys
            .iter()
            .zip(present)
            .filter(|(_, p)| !*p)
            .map(|(k, _)| k.clone())
            .collect())
    }

    /// Finds a blob; blobs up to `inline_up_to` bytes come back as bytes, larger ones as a file.
    pub async fn lookup(&self, key: &BlobKey, inline_up_to: u64) -> Result<Found, StoreError> {
        if key.digest.is_empty_blob() {
            return Ok(Found::Bytes(Bytes::new()));
        }
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::Lookup {
            key,
            inline_up_to,
            reply,
        })
        .await?
    }

    /// Makes a verified temp file the stored copy of `key`. `data`, when given, is the blob's
    /// content for the memory tier.
    ///
    /// `epoch` is [`CasClient::sync_epoch`] read before the temp file's first byte was
    /// written: if a filesystem sync fails after it, the blob is not acknowledged.
    pub async fn commit(
        &self,
        key: &BlobKey,
        temp: PathBuf,
        data: Option<Bytes>,
        epoch: u64,
    ) -> Result<Committed, StoreError> {
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::Commit {
            key,
            temp,
            data,
            epoch,
            reply,
        })
        .await?
    }

    /// What an upload reads before it writes its temp file, to pass to [`CasClient::commit`].
    pub fn sync_epoch(&self) -> u64 {
        self.accounting.sync_failures()
    }

    /// Reports that a file-backed blob read in full hashed correctly.
    pub fn report_verified(&self, key: &BlobKey) {
        self.tell(
            self.owner_of(&key.digest),
            Command::Verified { key: key.clone() },
        );
    }

    /// Reports that a stored blob did not hash to its digest.
    pub fn report_corrupt(&self, key: &BlobKey) {
        self.tell(
            self.owner_of(&key.digest),
            Command::Corrupt { key: key.clone() },
        );
    }

    /// Drops a stored blob whose file was found changed, waiting for room in the owner's
    /// queue (unlike [`Self::report_corrupt`], this notice must not be lost: a blob committed
    /// in this run is never hashed again on read).
    pub async fn drop_changed(&self, key: &BlobKey) {
        let shard = self.owner_of(&key.digest);
        self.count(shard);
        let _ = self.shards[shard]
            .send(Command::Corrupt { key: key.clone() })
            .await;
    }

    /// Registers a `Write` stream for an upload.
    pub async fn claim_upload(
        &self,
        upload_key: String,
        key: &BlobKey,
        progress: Arc<AtomicU64>,
    ) -> Result<UploadClaim, StoreError> {
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::ClaimUpload {
            upload_key,
            key,
            progress,
            reply,
        })
        .await
    }

    /// Ends a `Write` stream; `park` keeps an interrupted upload for resumption.
    pub async fn release_upload(
        &self,
        upload_key: String,
        key: &BlobKey,
        park: Option<ParkedUpload>,
    ) {
        let shard = self.owner_of(&key.digest);
        let command = Command::ReleaseUpload { upload_key, park };
        if let Err(async_channel::SendError(Command::ReleaseUpload { park: Some(p), .. })) =
            self.shards[shard].send(command).await
        {
            // The shard is gone (shutdown); the temp directory is wiped at the next start.
            tracing::debug!(temp = %p.temp.display(), "upload not parked: shard stopped");
        }
    }

    /// The state of an upload, for `QueryWriteStatus`.
    pub async fn query_upload(
        &self,
        upload_key: String,
        key: &BlobKey,
    ) -> Result<UploadStatus, StoreError> {
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::QueryUpload {
            upload_key,
            key,
            reply,
        })
        .await
    }

    /// Pins the blobs that are present against eviction (each pin counts; unpin as often).
    /// Returns, for each key, whether it was present (and is now pinned). The empty blob is
    /// always present and never pinned.
    pub async fn pin(&self, keys: &[BlobKey]) -> Result<Vec<bool>, StoreError> {
        Ok(self
            .pin_checked(keys)
            .await?
            .into_iter()
            .map(|p| p.is_some())
            .collect())
    }

    /// [`CasClient::pin`], saying for each pinned blob whether this process has hashed its
    /// file (`Some(true)`; the empty blob too) or not yet (`Some(false)`: found on disk at
    /// start-up; a reader that uses the file directly, not through a read, must check it).
    /// `None`: absent.
    pub async fn pin_checked(&self, keys: &[BlobKey]) -> Result<Vec<Option<bool>>, StoreError> {
        let n = self.shards.len();
        let mut groups: Vec<(Vec<usize>, Vec<BlobKey>)> = vec![(Vec::new(), Vec::new()); n];
        let mut out = vec![None; keys.len()];
        for (i, key) in keys.iter().enumerate() {
            if key.digest.is_empty_blob() {
                out[i] = Some(true);
                continue;
            }
            let g = &mut groups[self.owner_of(&key.digest)];
            g.0.push(i);
            g.1.push(key.clone());
        }
        let calls = groups
            .into_iter()
            .enumerate()
            .filter(|(_, g)| !g.1.is_empty())
            .map(|(shard, (positions, keys))| async move {
                let present = self
                    .call(shard, |reply| Command::Pin { keys, reply })
                    .await?;
                Ok::<_, StoreError>((positions, present))
            });
        for result in futures::future::join_all(calls).await {
            let (positions, present) = result?;
            for (p, is) in positions.into_iter().zip(present) {
                out[p] = is;
            }
        }
        Ok(out)
    }

    /// Releases pins taken with [`CasClient::pin`] (pass only the keys that were pinned).
    pub async fn unpin(&self, keys: &[BlobKey]) {
        let mut groups: Vec<Vec<BlobKey>> = vec![Vec::new(); self.shards.len()];
        for key in keys.iter().filter(|k| !k.digest.is_empty_blob()) {
            groups[self.owner_of(&key.digest)].push(key.clone());
        }
        for (shard, keys) in groups
            .into_iter()
            .enumerate()
            .filter(|(_, k)| !k.is_empty())
        {
            self.count(shard);
            // A stopped shard has no pins left to release.
            let _ = self.shards[shard].send(Command::Unpin { keys }).await;
        }
    }

    /// Asks `shard` to evict `bytes` (sent by a shard that found the store over its cap).
    pub(crate) fn request_eviction(
        &self,
        shard: usize,
        bytes: u64,
    ) -> Result<(), async_channel::Sender<Command>> {
        match self.shards[shard].try_send(Command::Evict { bytes }) {
            Ok(()) => Ok(()),
            Err(async_channel::TrySendError::Full(_)) => Err(self.shards[shard].clone()),
            Err(async_channel::TrySendError::Closed(_)) => Ok(()),
        }
    }

    /// Counters from every shard.
    pub async fn stats(&self) -> Result<Vec<ShardStats>, StoreError> {
        let calls = (0..self.shards.len()).map(|s| self.call(s, |reply| Command::Stats { reply }));
        futures::future::join_all(calls).await.into_iter().collect()
    }
}
