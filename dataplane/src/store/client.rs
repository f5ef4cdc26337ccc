//! The handle every core and the control plane use to reach the CAS: it routes each blob to
//! the shard that owns its part of the digest space, over that shard's bounded queue.

use super::accounting::{Accounting, Staged};
use super::commands::{
    Command, Committed, Dropped, Located, Reply, ShardStats, UploadClaim, UploadStatus,
};
use super::parked::ParkedUpload;
use super::StoreError;
use crate::metrics::Metrics;
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
        let (out, failure) = self
            .per_shard(keys, true, false, |keys, reply| Command::FindMissing {
                keys,
                reply,
            })
            .await;
        match failure {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    /// Sends each owner shard its share of `keys` in one command (all shards at once) and
    /// puts the answers back in `keys`' order; the empty blob gets `empty` without asking, a
    /// shard that cannot answer leaves `unanswered` and its error.
    async fn per_shard<T: Clone>(
        &self,
        keys: &[BlobKey],
        empty: T,
        unanswered: T,
        command: impl Fn(Vec<BlobKey>, Reply<Vec<T>>) -> Command + Copy,
    ) -> (Vec<T>, Option<StoreError>) {
        let n = self.shards.len();
        let mut groups: Vec<(Vec<usize>, Vec<BlobKey>)> = vec![(Vec::new(), Vec::new()); n];
        let mut out = vec![unanswered; keys.len()];
        for (i, key) in keys.iter().enumerate() {
            if key.digest.is_empty_blob() {
                out[i] = empty.clone();
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
                let answers = self.call(shard, |reply| command(keys, reply)).await?;
                Ok::<_, StoreError>((positions, answers))
            });
        let mut failure = None;
        for result in futures::future::join_all(calls).await {
            match result {
                Ok((positions, answers)) => {
                    for (p, a) in positions.into_iter().zip(answers) {
                        out[p] = a;
                    }
                }
                Err(e) => failure = Some(e),
            }
        }
        (out, failure)
    }

    /// Where the filesystem tier holds a blob (`None`: it does not). The empty blob is never
    /// stored: ask [`super::tier::BlobStore::open`].
    pub async fn locate(&self, key: &BlobKey) -> Result<Option<Located>, StoreError> {
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::Lookup { key, reply })
            .await
    }

    /// Makes a verified temp file the stored copy of `key`.
    ///
    /// `epoch` is [`CasClient::sync_epoch`] read before the temp file's first byte was
    /// written: if a filesystem sync fails after it, the blob is not acknowledged.
    pub async fn commit(
        &self,
        key: &BlobKey,
        temp: PathBuf,
        epoch: u64,
    ) -> Result<Committed, StoreError> {
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::Commit {
            key,
            temp,
            epoch,
            reply,
        })
        .await?
    }

    /// Marks blobs served by a tier above as used now (best effort, like the reports below).
    pub fn touch(&self, keys: &[BlobKey]) {
        for (shard, keys) in self.by_shard(keys) {
            self.tell(shard, Command::Touch { keys });
        }
    }

    /// `keys` grouped by owner shard (the empty blob, which no shard stores, left out).
    fn by_shard(&self, keys: &[BlobKey]) -> impl Iterator<Item = (usize, Vec<BlobKey>)> {
        let mut groups: Vec<Vec<BlobKey>> = vec![Vec::new(); self.shards.len()];
        for key in keys.iter().filter(|k| !k.digest.is_empty_blob()) {
            groups[self.owner_of(&key.digest)].push(key.clone());
        }
        groups
            .into_iter()
            .enumerate()
            .filter(|(_, k)| !k.is_empty())
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
            Command::Drop {
                key: key.clone(),
                why: Dropped::Corrupt,
            },
        );
    }

    /// Reports that a stored blob's file is gone.
    pub fn report_vanished(&self, key: &BlobKey) {
        self.tell(
            self.owner_of(&key.digest),
            Command::Drop {
                key: key.clone(),
                why: Dropped::Vanished,
            },
        );
    }

    /// Drops a stored blob whose file was found changed, waiting for room in the owner's
    /// queue (unlike [`Self::report_corrupt`], this notice must not be lost: a blob committed
    /// in this run is never hashed again on read).
    pub async fn drop_changed(&self, key: &BlobKey) {
        let shard = self.owner_of(&key.digest);
        self.count(shard);
        let _ = self.shards[shard]
            .send(Command::Drop {
                key: key.clone(),
                why: Dropped::Corrupt,
            })
            .await;
    }

    /// Registers a `Write` stream for an upload.
    pub async fn claim_upload(
        &self,
        upload_key: String,
        key: &BlobKey,
        progress: Arc<AtomicU64>,
        check_index: bool,
        stage: bool,
    ) -> Result<UploadClaim, StoreError> {
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::ClaimUpload {
            upload_key,
            key,
            progress,
            check_index,
            stage,
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
        check_index: bool,
    ) -> Result<UploadStatus, StoreError> {
        let shard = self.owner_of(&key.digest);
        let key = key.clone();
        self.call(shard, |reply| Command::QueryUpload {
            upload_key,
            key,
            check_index,
            reply,
        })
        .await
    }

    /// Pins the blobs that are present against eviction, for `holder` (see
    /// [`super::tier::PinHolder`]: a holder pins a blob once, and releases only its own pins).
    /// Per key: `None` absent; `Some(checked)` pinned, and whether this process has hashed
    /// its file (`Some(true)` for the empty blob, which is always present and never pinned;
    /// `Some(false)`: found on disk at start-up, so a reader that uses the file directly, not
    /// through a read, must check it). All or nothing: on an error nothing stays pinned.
    pub async fn pin(
        &self,
        holder: super::tier::PinHolder,
        keys: &[BlobKey],
    ) -> Result<Vec<Option<bool>>, StoreError> {
        let (out, failure) = self
            .per_shard(keys, Some(true), None, |keys, reply| Command::Pin {
                holder,
                keys,
                reply,
            })
            .await;
        if let Some(e) = failure {
            // All or nothing: release what the shards that answered did pin.
            self.unpin(holder, &super::tier::pinned_keys(keys, &out))
                .await;
            return Err(e);
        }
        Ok(out)
    }

    /// Releases `holder`'s pins of `keys` (pass only the keys that were pinned).
    pub async fn unpin(&self, holder: super::tier::PinHolder, keys: &[BlobKey]) {
        for (shard, keys) in self.by_shard(keys) {
            self.count(shard);
            // A stopped shard has no pins left to release.
            let _ = self.shards[shard]
                .send(Command::Unpin { holder, keys })
                .await;
        }
    }

    /// Sends `command` to `shard` from a thread that may block (the background rebuild);
    /// an error once the shard has stopped.
    pub(crate) fn send_blocking(&self, shard: usize, command: Command) -> Result<(), ()> {
        self.count(shard);
        self.shards[shard].send_blocking(command).map_err(|_| ())
    }

    /// Holds `bytes` of the cap for a temp file written outside an upload (a splice's
    /// concatenation, a copy to split), and asks the shard with the oldest blob to evict to
    /// make room, as an upload's first message does; [`StoreError::NoRoom`] when what is
    /// held already leaves no room that eviction could make.
    pub async fn stage(&self, bytes: u64) -> Result<Staged, StoreError> {
        let staged = self
            .accounting
            .stage(bytes)
            .ok_or_else(|| StoreError::NoRoom {
                size: bytes,
                staging: self.accounting.staging(),
                cap: self.accounting.cap(),
            })?;
        while let Some((shard, claimed)) = self.accounting.claim_eviction() {
            if let Err(queue) = self.request_eviction(shard, claimed) {
                // The claim goes back unless the shard got the request (then it gives it
                // back once it has evicted): also when this call is cancelled while it waits.
                let claim = Claim {
                    accounting: &self.accounting,
                    bytes: claimed,
                };
                if queue.send(Command::Evict { bytes: claimed }).await.is_ok() {
                    std::mem::forget(claim);
                }
            }
        }
        Ok(staged)
    }
}

/// An eviction claimed ([`Accounting::claim_eviction`]) and not yet handed to a shard:
/// released when dropped.
struct Claim<'a> {
    accounting: &'a Accounting,
    bytes: u64,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.accounting.eviction_done(self.bytes);
    }
}

impl CasClient {
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

    /// The blobs the store holds: at most `max` in all, from each shard a share in
    /// proportion to what it holds.
    pub async fn keys(&self, max: usize) -> Result<Vec<BlobKey>, StoreError> {
        let held: Vec<u64> = self.stats().await?.iter().map(|s| s.blobs).collect();
        let total: u64 = held.iter().sum();
        let share = |blobs: u64| -> usize {
            if total <= max as u64 {
                return usize::MAX;
            }
            let share = (u128::from(blobs) * max as u128).div_ceil(u128::from(total));
            usize::try_from(share).unwrap_or(usize::MAX)
        };
        let calls = (0..self.shards.len()).map(|s| {
            let max = share(held[s]);
            self.call(s, move |reply| Command::Keys { max, reply })
        });
        let mut keys = Vec::new();
        for shard in futures::future::join_all(calls).await {
            keys.extend(shard?);
        }
        keys.truncate(max);
        Ok(keys)
    }

    /// Counters from every shard.
    pub async fn stats(&self) -> Result<Vec<ShardStats>, StoreError> {
        let calls = (0..self.shards.len()).map(|s| self.call(s, |reply| Command::Stats { reply }));
        futures::future::join_all(calls).await.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{DigestFunction, InstanceName};

    /// Shard 0 is gone; shard 1 answers every key present and records what it is asked to
    /// unpin. Returns the client, keys on both shards, and the record.
    fn half_gone() -> (CasClient, Vec<BlobKey>, Arc<std::sync::Mutex<Vec<BlobKey>>>) {
        let accounting = Arc::new(Accounting::new(u64::MAX, 2));
        let (cas, ShardQueues(mut queues)) = CasClient::new(2, 16, Metrics::new(), accounting);
        let live = queues.pop().expect("shard 1");
        drop(queues); // shard 0's receiver: its sends fail
        let unpinned = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = unpinned.clone();
        std::thread::spawn(move || {
            while let Ok(command) = live.recv_blocking() {
                match command {
                    Command::FindMissing { keys, reply } => {
                        let _ = reply.send(vec![true; keys.len()]);
                    }
                    Command::Pin { keys, reply, .. } => {
                        let _ = reply.send(vec![Some(true); keys.len()]);
                    }
                    Command::Unpin { keys, .. } => record.lock().unwrap().extend(keys),
                    _ => {}
                }
            }
        });
        let instance = InstanceName::new("").unwrap();
        let keys: Vec<BlobKey> = (0..64u32)
            .map(|i| {
                let d = Digest::of(DigestFunction::Sha256, &i.to_le_bytes());
                BlobKey::new(instance.clone(), d)
            })
            .collect();
        assert!(keys.iter().any(|k| cas.owner_of(&k.digest) == 0));
        assert!(keys.iter().any(|k| cas.owner_of(&k.digest) == 1));
        (cas, keys, unpinned)
    }

    /// A shard that cannot answer fails the call; a pin then releases what the other shards
    /// pinned (and only that), and an existence check, which pins nothing, releases nothing.
    #[test]
    fn a_failed_shard_fails_the_call_and_releases_only_its_own_pins() {
        let (cas, keys, unpinned) = half_gone();
        let on_live: Vec<BlobKey> = keys
            .iter()
            .filter(|k| cas.owner_of(&k.digest) == 1)
            .cloned()
            .collect();
        assert!(futures::executor::block_on(cas.contains(&keys)).is_err());
        let holder = super::super::tier::PinHolder::new(std::time::Duration::from_secs(60));
        assert!(futures::executor::block_on(cas.pin(holder, &keys)).is_err());
        // The pin's release was sent before pin returned; the recorder thread takes
        // it off the queue: wait for it by asking once more (the queue is in order).
        assert!(futures::executor::block_on(cas.contains(&on_live)).is_ok());
        assert_eq!(*unpinned.lock().unwrap(), on_live);
    }
}
