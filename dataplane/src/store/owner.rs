//! The owner shard: the index, memory tier, eviction and upload table for its part of the
//! digest space. It runs as one task on its core and handles commands one at a time; the
//! renames into and unlinks out of its part of the CAS go, in that order, to its file lane (a
//! thread of its own), so they stay ordered without locks and never stall the core. Work that
//! waits on I/O (reading a small blob, syncing a directory, a rename) runs in spawned tasks.

use super::accounting::Accounting;
use super::atime;
use super::blob_io;
use super::client::CasClient;
use super::commands::{Command, Committed, Found, Reply, ShardStats, UploadClaim, UploadStatus};
use super::file_lane::FileLane;
use super::index::{BlobIndex, Entry};
use super::layout::Layout;
use super::memory::MemoryTier;
use super::parked::{Claim, ParkedUpload, UploadTable};
use super::snapshot;
use super::StoreError;
use crate::runtime::Runtime;
use crate::shutdown::ShutdownWatch;
use futures::future::{select, Either};
use kiln_reapi::digest::{BlobKey, Hasher};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, error, info, warn};

/// Access times written per second of maintenance (per shard).
const ATIME_FLUSH_PER_TICK: usize = 16_384;
/// How an owner shard behaves; from the `[storage]` configuration.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// fsync blobs and directories before acknowledging.
    pub fsync: bool,
    /// Write access times to disk at most this often per blob.
    pub atime_resolution: Duration,
    /// Parked uploads are dropped after this long.
    pub upload_expiry: Duration,
    /// Parked uploads kept per shard.
    pub max_parked: usize,
    /// Access times queued for writing, per shard.
    pub max_pending_atimes: usize,
    /// Memory-tier budget of this shard.
    pub memory_budget: u64,
    /// Largest blob in the memory tier.
    pub memory_max_blob: u64,
}

/// Where a commit's outcome goes.
type CommitReply = Reply<Result<Committed, StoreError>>;

/// One owner shard's state.
pub struct Owner {
    shard: usize,
    runtime: Rc<dyn Runtime>,
    layout: Layout,
    settings: StoreSettings,
    index: RefCell<BlobIndex>,
    memory: MemoryTier,
    uploads: RefCell<UploadTable>,
    accounting: Arc<Accounting>,
    cas: CasClient,
    known_dirs: RefCell<HashSet<PathBuf>>,
    /// Blob directories whose own entry (and each one above, up to the CAS root) a sync by
    /// this process has made durable.
    durable_dirs: RefCell<HashSet<PathBuf>>,
    pending_atimes: RefCell<Vec<BlobKey>>,
    /// Renames, unlinks, chmods and access times, off the core and in order.
    lane: FileLane,
    /// Blobs being renamed in, with the later copies of each waiting for the outcome.
    committing: RefCell<HashMap<BlobKey, Vec<(PathBuf, CommitReply)>>>,
}

impl Owner {
    /// Builds shard `shard` from the blobs the start-up scan found for it (oldest first), and
    /// starts its file lane (the one thing that can fail).
    pub fn new(
        shard: usize,
        runtime: Rc<dyn Runtime>,
        layout: Layout,
        settings: StoreSettings,
        scanned: Vec<(BlobKey, Entry)>,
        accounting: Arc<Accounting>,
        cas: CasClient,
    ) -> std::io::Result<Rc<Owner>> {
        let lane = FileLane::start(format!("kiln-files-{shard}"))?;
        let mut index: BlobIndex = BlobIndex::with_capacity(scanned.len());
        for (key, entry) in scanned {
            index.insert(key, entry);
        }
        accounting.add(shard, index.bytes());
        accounting.set_oldest(shard, index.oldest_atime());
        Ok(Rc::new(Owner {
            shard,
            runtime,
            layout,
            memory: MemoryTier::new(settings.memory_budget, settings.memory_max_blob),
            uploads: RefCell::new(UploadTable::new(
                settings.max_parked,
                settings.upload_expiry,
            )),
            settings,
            index: RefCell::new(index),
            accounting,
            cas,
            known_dirs: RefCell::new(HashSet::new()),
            durable_dirs: RefCell::new(HashSet::new()),
            pending_atimes: RefCell::new(Vec::new()),
            lane,
            committing: RefCell::new(HashMap::new()),
        }))
    }

    /// Serves commands until `stop` fires, then drops parked uploads and flushes access times;
    /// returns its blobs grouped by directory, for the index snapshot.
    pub(crate) async fn run(
        self: Rc<Self>,
        queue: async_channel::Receiver<Command>,
        stop: ShutdownWatch,
    ) -> snapshot::Grouped {
        let maintenance = {
            let owner = self.clone();
            let stop = stop.clone();
            async move { owner.maintain(stop).await }
        };
        self.runtime.spawn(Box::pin(maintenance));
        // Evict right away if the store came up over its (possibly lowered) cap.
        self.maybe_evict();
        let mut stopping = Box::pin(stop.wait());
        while let Either::Left((Ok(command), _)) =
            select(Box::pin(queue.recv()), stopping.as_mut()).await
        {
            self.handle(command);
        }
        queue.close();
        let parked = self.uploads.borrow_mut().drain_parked();
        self.remove_temps(parked);
        self.flush_atimes(usize::MAX);
        self.lane.drained().await;
        debug!(shard = self.shard, "owner stopped");
        snapshot::group(self.index.borrow().iter())
    }

    fn handle(self: &Rc<Self>, command: Command) {
        match command {
            Command::FindMissing { keys, reply } => {
                let now = atime::now();
                let present: Vec<bool> =
                    keys.iter().map(|k| self.touch(k, now).is_some()).collect();
                let found = present.iter().filter(|p| **p).count() as u64;
                self.metrics().present.inc_by(found);
                self.metrics().missing.inc_by(present.len() as u64 - found);
                let _ = reply.send(present);
            }
            Command::Lookup {
                key,
                inline_up_to,
                reply,
            } => self.lookup(key, inline_up_to, reply),
            Command::Commit {
                key,
                temp,
                data,
                reply,
            } => self.commit(key, temp, data, reply),
            Command::Verified { key } => {
                if let Some(e) = self.index.borrow_mut().peek_mut(&key) {
                    e.verified = true;
                }
            }
            Command::Corrupt { key } => self.remove_corrupt(&key),
            Command::ClaimUpload {
                upload_key,
                key,
                progress,
                reply,
            } => {
                let claim = if self.touch(&key, atime::now()).is_some() {
                    UploadClaim::Present
                } else {
                    let claimed = self.uploads.borrow_mut().claim(&upload_key, progress);
                    match claimed {
                        Claim::Fresh => match self.accounting.stage(key.digest.size) {
                            Some(staged) => UploadClaim::Fresh(staged),
                            None => {
                                self.uploads.borrow_mut().release(&upload_key, None);
                                UploadClaim::Full {
                                    staging: self.accounting.staging(),
                                    cap: self.accounting.cap(),
                                }
                            }
                        },
                        Claim::Resume(p) => UploadClaim::Resume(p),
                        Claim::Busy => UploadClaim::Busy,
                    }
                };
                let staged = matches!(claim, UploadClaim::Fresh(_));
                let _ = reply.send(claim);
                if staged {
                    // Old blobs make room for the new temp file.
                    self.maybe_evict();
                }
            }
            Command::ReleaseUpload { upload_key, park } => {
                let dropped = self.uploads.borrow_mut().release(&upload_key, park);
                self.remove_temps(dropped);
            }
            Command::QueryUpload {
                upload_key,
                key,
                reply,
            } => {
                let status = if self.index.borrow().peek(&key).is_some() {
                    UploadStatus::Complete
                } else {
                    match self.uploads.borrow().committed(&upload_key) {
                        Some(n) => UploadStatus::Partial(n),
                        None => UploadStatus::Unknown,
                    }
                };
                let _ = reply.send(status);
            }
            Command::Pin { keys, reply } => {
                let now = atime::now();
                let mut index = self.index.borrow_mut();
                let pinned = keys
                    .iter()
                    .map(|k| match index.touch(k, now) {
                        Some(e) => {
                            e.pins += 1;
                            if e.pins == 1 {
                                self.accounting.set_pinned(e.size, true);
                            }
                            true
                        }
                        None => false,
                    })
                    .collect();
                drop(index);
                self.publish_oldest();
                let _ = reply.send(pinned);
            }
            Command::Unpin { keys } => {
                let mut index = self.index.borrow_mut();
                for k in &keys {
                    if let Some(e) = index.peek_mut(k) {
                        if e.pins > 0 {
                            e.pins -= 1;
                            if e.pins == 0 {
                                self.accounting.set_pinned(e.size, false);
                            }
                        }
                    }
                }
            }
            Command::Evict { bytes } => {
                // If this shard ran dry before the request was met, the next oldest shard goes on.
                if self.evict(bytes) > 0 {
                    self.maybe_evict();
                }
            }
            Command::Stats { reply } => {
                let index = self.index.borrow();
                let (active, parked) = self.uploads.borrow().counts();
                let _ = reply.send(ShardStats {
                    blobs: index.len() as u64,
                    bytes: index.bytes(),
                    memory_bytes: self.memory.weighted_size(),
                    active_uploads: active as u64,
                    parked_uploads: parked as u64,
                    pending_atimes: self.pending_atimes.borrow().len() as u64,
                });
            }
        }
    }

    /// Marks a blob used; schedules its access time for disk when it is stale there.
    fn touch(&self, key: &BlobKey, now: u64) -> Option<Entry> {
        let mut index = self.index.borrow_mut();
        let entry = index.touch(key, now)?;
        if atime::due(
            entry.atime,
            entry.persisted_atime,
            self.settings.atime_resolution,
        ) {
            entry.persisted_atime = entry.atime;
            self.schedule_atime(key);
        }
        let copy = *entry;
        drop(index);
        self.publish_oldest();
        Some(copy)
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        self.cas.metrics()
    }

    fn publish_oldest(&self) {
        self.accounting
            .set_oldest(self.shard, self.index.borrow().oldest_atime());
    }

    fn lookup(
        self: &Rc<Self>,
        key: BlobKey,
        inline_up_to: u64,
        reply: super::commands::Reply<Result<Found, StoreError>>,
    ) {
        let Some(entry) = self.touch(&key, atime::now()) else {
            self.metrics().lookups_inc("miss");
            let _ = reply.send(Ok(Found::Missing));
            return;
        };
        if let Some(data) = self.memory.get(&key) {
            self.metrics().lookups_inc("memory");
            let _ = reply.send(Ok(Found::Bytes(data)));
            return;
        }
        self.metrics().lookups_inc("disk");
        let path = self.layout.blob_path(&key);
        if entry.size > inline_up_to {
            let _ = reply.send(Ok(Found::File {
                path,
                size: entry.size,
                verified: entry.verified,
            }));
            return;
        }
        // Small blob: read it here, check it if it came from an earlier run, keep it in memory.
        let owner = self.clone();
        self.runtime.spawn(Box::pin(async move {
            let result = match blob_io::read_all(&*owner.runtime, &path, entry.size).await {
                Ok(data) => {
                    let good = entry.verified || Hasher::hash(key.digest.function, &data) == key.digest.hash;
                    if good {
                        if !entry.verified {
                            if let Some(e) = owner.index.borrow_mut().peek_mut(&key) {
                                e.verified = true;
                            }
                        }
                        if owner.memory.admits(entry.size) {
                            owner.memory.insert(key.clone(), data.clone());
                        }
                        Ok(Found::Bytes(data))
                    } else {
                        owner.remove_corrupt(&key);
                        Ok(Found::Missing)
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    // Deleted or truncated behind our back: the index must not claim it.
                    warn!(blob = ?key, error = %e, "blob file missing or short; dropping it from the index");
                    owner.remove_corrupt(&key);
                    Ok(Found::Missing)
                }
                Err(e) => Err(StoreError::io("read", path, e)),
            };
            let _ = reply.send(result);
        }));
    }

    fn commit(
        self: &Rc<Self>,
        key: BlobKey,
        temp: PathBuf,
        data: Option<bytes::Bytes>,
        reply: CommitReply,
    ) {
        if self.touch(&key, atime::now()).is_some() {
            self.remove_later(temp);
            let _ = reply.send(Ok(Committed::AlreadyPresent));
            return;
        }
        if let Some(waiting) = self.committing.borrow_mut().get_mut(&key) {
            // The same blob is being renamed in: this copy is answered with that one's outcome.
            waiting.push((temp, reply));
            return;
        }
        let size = key.digest.size;
        if size > self.accounting.cap() {
            self.remove_later(temp);
            let _ = reply.send(Err(StoreError::TooLarge {
                size,
                cap: self.accounting.cap(),
            }));
            return;
        }
        self.committing.borrow_mut().insert(key.clone(), Vec::new());
        let dir = self.layout.blob_dir(&key);
        let path = self.layout.blob_path(&key);
        let make_dir = !self.known_dirs.borrow().contains(&dir);
        let renamed = {
            let layout = self.layout.clone();
            let key = key.clone();
            let dir = dir.clone();
            self.lane
                .run(move || rename_in(&layout, &key, make_dir, &dir, &temp, &path))
        };
        let owner = self.clone();
        self.runtime.spawn(Box::pin(async move {
            let outcome = renamed.await.unwrap_or(Err(StoreError::Unavailable));
            owner.renamed(key, dir, data, outcome, reply).await;
        }));
    }

    /// A commit's file is in place (or not): index it, make it durable, then answer it and
    /// every copy that waited on it.
    async fn renamed(
        self: Rc<Self>,
        key: BlobKey,
        dir: PathBuf,
        data: Option<bytes::Bytes>,
        outcome: Result<(), StoreError>,
        reply: CommitReply,
    ) {
        let waiting = self
            .committing
            .borrow_mut()
            .remove(&key)
            .unwrap_or_default();
        if let Err(e) = outcome {
            for (temp, r) in waiting {
                self.remove_later(temp);
                let _ = r.send(Err(retell(&e)));
            }
            let _ = reply.send(Err(e));
            return;
        }
        self.known_dirs.borrow_mut().insert(dir.clone());
        let size = key.digest.size;
        self.index
            .borrow_mut()
            .insert(key.clone(), Entry::fresh(size, atime::now()));
        // The file's own access time is the kernel's (coarse) time of creation, so blobs
        // committed within one clock tick would tie after a restart: record the index's.
        self.schedule_atime(&key);
        self.accounting.add(self.shard, size);
        self.metrics().commits.inc();
        self.publish_oldest();
        if let Some(data) = data {
            if self.memory.admits(size) {
                self.memory.insert(key, data);
            }
        }
        for (temp, _) in &waiting {
            self.remove_later(temp.clone());
        }
        self.maybe_evict();
        let result = if self.settings.fsync {
            self.make_durable(&dir).await
        } else {
            Ok(())
        };
        // Copies that found the blob being committed are answered only now: acknowledged
        // means durable for them too.
        for (_, r) in waiting {
            let _ = r.send(match &result {
                Ok(()) => Ok(Committed::AlreadyPresent),
                Err(e) => Err(retell(e)),
            });
        }
        let _ = reply.send(result.map(|()| Committed::Stored));
    }

    /// Syncs what a rename into `dir` needs to survive a crash (see [`dirs_to_sync`]).
    async fn make_durable(&self, dir: &Path) -> Result<(), StoreError> {
        let todo = dirs_to_sync(dir, self.layout.tree_dir(), &self.durable_dirs.borrow());
        for d in &todo {
            self.runtime
                .sync_dir(d)
                .await
                .map_err(|e| StoreError::io("sync", d, e))?;
        }
        self.durable_dirs.borrow_mut().insert(dir.to_path_buf());
        Ok(())
    }

    /// Deletes a file on the lane (temp files and blobs no longer indexed).
    fn remove_later(&self, path: PathBuf) {
        self.lane.queue(move || {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    warn!(path = %path.display(), error = %e, "cannot delete file");
                }
            }
        });
    }

    fn remove_corrupt(&self, key: &BlobKey) {
        let removed = self.index.borrow_mut().remove(key);
        if let Some(entry) = removed {
            error!(blob = ?key, "stored blob does not hash to its digest; removed it");
            self.metrics().corrupt.inc();
            self.accounting.remove(self.shard, entry.size);
            if entry.pins > 0 {
                self.accounting.set_pinned(entry.size, false);
            }
            self.memory.remove(key);
            self.remove_later(self.layout.blob_path(key));
            self.publish_oldest();
        }
    }

    /// If the store is over its cap, asks the shard with the oldest blob to evict.
    fn maybe_evict(self: &Rc<Self>) {
        while let Some((shard, bytes)) = self.accounting.claim_eviction() {
            if shard == self.shard {
                if self.evict(bytes) == 0 {
                    warn!(
                        shard = self.shard,
                        "CAS over capacity, and every blob left on this shard is pinned"
                    );
                    break;
                }
                continue;
            }
            if let Err(sender) = self.cas.request_eviction(shard, bytes) {
                // That shard's queue is full: deliver the request without blocking this loop.
                let accounting = self.accounting.clone();
                self.runtime.spawn(Box::pin(async move {
                    if sender.send(Command::Evict { bytes }).await.is_err() {
                        accounting.eviction_done(bytes);
                    }
                }));
            }
        }
    }

    /// Evicts least recently used, unpinned blobs until `bytes` are freed or none are left;
    /// releases the claim and returns the bytes freed.
    fn evict(&self, bytes: u64) -> u64 {
        let mut freed = 0u64;
        let mut count = 0u64;
        while freed < bytes {
            let Some((key, entry)) = self.index.borrow_mut().pop_oldest_unpinned() else {
                break;
            };
            // Counted as a removal before its file goes: whoever sees the file gone also sees
            // the removal count moved (the action cache's completeness shortcut relies on it).
            self.accounting.remove(self.shard, entry.size);
            self.memory.remove(&key);
            self.remove_later(self.layout.blob_path(&key));
            freed += entry.size;
            self.metrics().evictions.inc();
            self.metrics().evicted_bytes.inc_by(entry.size);
            count += 1;
        }
        self.publish_oldest();
        self.accounting.eviction_done(bytes);
        if count > 0 {
            debug!(shard = self.shard, blobs = count, bytes = freed, "evicted");
        }
        freed
    }

    /// Periodic work: expire parked uploads, write access times.
    async fn maintain(self: Rc<Self>, stop: ShutdownWatch) {
        let mut stopping = Box::pin(stop.wait());
        loop {
            match select(
                self.runtime.sleep(Duration::from_secs(1)),
                stopping.as_mut(),
            )
            .await
            {
                Either::Left(_) => {}
                Either::Right(_) => return,
            }
            let expired = self.uploads.borrow_mut().expire(self.runtime.now());
            if !expired.is_empty() {
                info!(
                    shard = self.shard,
                    count = expired.len(),
                    "dropping expired interrupted uploads"
                );
            }
            self.remove_temps(expired);
            self.flush_atimes(ATIME_FLUSH_PER_TICK);
        }
    }

    /// Queues a blob's access time for its file (best effort: past the bound it is skipped,
    /// and only the order after a restart can suffer).
    fn schedule_atime(&self, key: &BlobKey) {
        let mut pending = self.pending_atimes.borrow_mut();
        if pending.len() < self.settings.max_pending_atimes {
            pending.push(key.clone());
        }
    }

    /// Writes up to `limit` pending access times to the blobs' files, on the lane.
    fn flush_atimes(&self, limit: usize) {
        let keys: Vec<BlobKey> = {
            let mut pending = self.pending_atimes.borrow_mut();
            let n = pending.len().min(limit);
            pending.drain(..n).collect()
        };
        let index = self.index.borrow();
        let times: Vec<(PathBuf, u64)> = keys
            .iter()
            .filter_map(|key| Some((self.layout.blob_path(key), index.peek(key)?.atime)))
            .collect();
        if !times.is_empty() {
            self.lane.queue(move || {
                for (path, atime) in times {
                    atime::persist(&path, atime);
                }
            });
        }
    }

    /// Deletes dropped uploads' temp files on the lane.
    fn remove_temps(&self, uploads: Vec<ParkedUpload>) {
        for p in uploads {
            self.remove_later(p.temp);
        }
    }
}

/// On the lane: creates the blob's directory when this shard has not seen it, makes the file
/// read-only (workers hardlink it into action directories) and renames it into place. (The
/// syncs that make it durable follow on the core; see [`dirs_to_sync`].)
fn rename_in(
    layout: &Layout,
    key: &BlobKey,
    make_dir: bool,
    dir: &Path,
    temp: &Path,
    path: &Path,
) -> Result<(), StoreError> {
    if make_dir {
        if let Err(e) = layout.ensure_blob_dir(key) {
            let _ = std::fs::remove_file(temp);
            return Err(StoreError::io("create directory for", dir, e));
        }
    }
    let _ = std::fs::set_permissions(temp, std::os::unix::fs::PermissionsExt::from_mode(0o444));
    if let Err(e) = std::fs::rename(temp, path) {
        let _ = std::fs::remove_file(temp);
        return Err(StoreError::io("rename into", path, e));
    }
    Ok(())
}

/// The directories a commit into `dir` syncs before it is acknowledged: `dir` itself (that
/// makes the rename durable) and, until this process has once made `dir` durable, every
/// directory above it up to the CAS root: `dir` may have just been created (by this commit,
/// or by another whose syncs have not finished), or be left on disk by a run that stopped
/// before syncing it. A second commit into a fresh directory must not be acknowledged before
/// the directory itself is durable in its parent.
fn dirs_to_sync(dir: &Path, cas_root: &Path, durable: &HashSet<PathBuf>) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if !durable.contains(dir) {
        out.extend(
            dir.ancestors()
                .skip(1)
                .take_while(|d| d.starts_with(cas_root))
                .map(Path::to_path_buf),
        );
    }
    out
}

/// The same failure again, for a second caller (I/O errors cannot be cloned).
fn retell(e: &StoreError) -> StoreError {
    match e {
        StoreError::Unavailable => StoreError::Unavailable,
        StoreError::Io { op, path, source } => StoreError::io(
            op,
            path.clone(),
            std::io::Error::new(source.kind(), source.to_string()),
        ),
        StoreError::TooLarge { size, cap } => StoreError::TooLarge {
            size: *size,
            cap: *cap,
        },
        StoreError::Corrupt(key) => StoreError::Corrupt(key.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_is_synced_up_to_the_root_until_it_is_durable() {
        let root = Path::new("/data/cas");
        let dir = root.join("i_main/sha256/ab");
        let mut durable = HashSet::new();
        let first = dirs_to_sync(&dir, root, &durable);
        assert_eq!(
            first,
            vec![
                dir.clone(),
                root.join("i_main/sha256"),
                root.join("i_main"),
                root.to_path_buf()
            ]
        );
        // A second commit before the first's syncs finished does the same.
        assert_eq!(dirs_to_sync(&dir, root, &durable), first);
        durable.insert(dir.clone());
        assert_eq!(dirs_to_sync(&dir, root, &durable), vec![dir.clone()]);
        // Nothing outside the CAS root.
        assert!(first.iter().all(|d| d.starts_with(root)));
    }
}
