//! The owner shard: the index, eviction and upload table of the filesystem tier for its part
//! of the digest space. It runs as one task on its core and handles commands one at a time;
//! the renames into and unlinks out of its part of the CAS go, in that order, to its file lane
//! (a thread of its own), so they stay ordered without locks and never stall the core. Work
//! that waits on I/O (syncing a directory, a rename) runs in spawned tasks; reading blobs is
//! the reader's work, on the reader's core.
//!
//! Here: the owner's state, its command loop and lookups. `commit`: renaming a verified
//! upload in and making it durable. `evict`: blobs leaving the index. `maintain`: expiring
//! parked uploads and writing access times.

mod commit;
mod evict;
mod leases;
mod maintain;
mod rebuild;

use super::group_commit::GroupCommit;
use crate::store::tier::PinHolder;

use super::accounting::Accounting;
use super::atime;
use super::client::CasClient;
use super::commands::{Command, Committed, Located, Reply, ShardStats, UploadClaim, UploadStatus};
use super::file_lane::FileLane;
use super::index::{BlobIndex, Entry};
use super::layout::Layout;
use super::parked::{Claim, UploadTable};
use super::snapshot;
use super::snapshot::DirKey;
use super::tier::BlobEvents;
use super::StoreError;
use crate::runtime::Runtime;
use crate::shutdown::ShutdownWatch;
use futures::future::{select, Either};
use kiln_reapi::digest::BlobKey;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// How an owner shard behaves; from the `[storage]` configuration.
#[derive(Clone)]
pub struct StoreSettings {
    /// fsync blobs and directories before acknowledging.
    pub fsync: bool,
    /// With `fsync`: the process's group commit, when on (concurrent commits share one
    /// filesystem sync).
    pub group_commit: Option<Arc<GroupCommit>>,
    /// Write access times to disk at most this often per blob.
    pub atime_resolution: Duration,
    /// Parked uploads are dropped after this long.
    pub upload_expiry: Duration,
    /// Parked uploads kept per shard.
    pub max_parked: usize,
    /// Access times queued for writing, per shard.
    pub max_pending_atimes: usize,
    /// Told when a blob enters or leaves the index (the memory tiers' caches; a worker's
    /// record of what it holds).
    pub events: Vec<Arc<dyn BlobEvents>>,
}

/// Where a commit's outcome goes.
type CommitReply = Reply<Result<Committed, StoreError>>;

/// A later copy of a blob being committed: its temp file (dropped: the first copy is kept)
/// and its reply.
type WaitingCopy = (PathBuf, CommitReply);

/// One owner shard's state.
pub struct Owner {
    shard: usize,
    runtime: Rc<dyn Runtime>,
    layout: Layout,
    settings: StoreSettings,
    index: RefCell<BlobIndex>,
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
    /// Blobs being renamed in or made durable, with the later copies of each waiting for
    /// the outcome.
    committing: RefCell<HashMap<BlobKey, Vec<WaitingCopy>>>,
    /// Directories whose listing the background rebuild has yet to deliver.
    pending: RefCell<HashSet<DirKey>>,
    /// Blobs removed from the index while their directory is pending.
    removed_pending: RefCell<HashSet<BlobKey>>,
    /// Who holds each pinned blob's pins.
    leases: RefCell<leases::Leases>,
}

/// What an owner leaves when it stops, for the index snapshot.
pub struct Stopped {
    /// Its blobs, by directory.
    pub blobs: snapshot::Grouped,
    /// The directories whose listings the background rebuild had not delivered to it.
    pub pending: HashSet<DirKey>,
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
            pending: RefCell::new(HashSet::new()),
            removed_pending: RefCell::new(HashSet::new()),
            leases: RefCell::new(leases::Leases::default()),
        }))
    }

    /// Serves commands until `stop` fires, then drops parked uploads and flushes access times;
    /// returns its blobs grouped by directory, and the directories still pending, for the
    /// index snapshot.
    pub(crate) async fn run(
        self: Rc<Self>,
        queue: async_channel::Receiver<Command>,
        stop: ShutdownWatch,
    ) -> Stopped {
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
        Stopped {
            blobs: snapshot::group(self.index.borrow().iter()),
            pending: self.pending.take(),
        }
    }

    fn dispatch(self: &Rc<Self>, command: Command) {
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
            Command::Lookup { key, reply } => self.lookup(key, reply),
            Command::Touch { keys } => {
                let now = atime::now();
                for k in &keys {
                    self.touch(k, now);
                }
            }
            Command::Commit {
                key,
                temp,
                epoch,
                reply,
            } => self.commit(key, temp, epoch, reply),
            Command::Verified { key } => {
                if let Some(mut e) = self.index.borrow_mut().peek_mut(&key) {
                    e.verified = true;
                }
            }
            Command::Drop { key, why } => self.drop_blob(&key, why),
            Command::ClaimUpload {
                upload_key,
                key,
                progress,
                check_index,
                stage,
                reply,
            } => {
                let claim = if check_index && self.touch(&key, atime::now()).is_some() {
                    UploadClaim::Present
                } else {
                    let claimed = self.uploads.borrow_mut().claim(&upload_key, progress);
                    match claimed {
                        Claim::Fresh if !stage => UploadClaim::Fresh(self.accounting.unstaged()),
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
                let staged = stage && matches!(claim, UploadClaim::Fresh(_));
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
                check_index,
                reply,
            } => {
                let status = if check_index && self.index.borrow().peek(&key).is_some() {
                    UploadStatus::Complete
                } else {
                    match self.uploads.borrow().committed(&upload_key) {
                        Some(n) => UploadStatus::Partial(n),
                        None => UploadStatus::Unknown,
                    }
                };
                let _ = reply.send(status);
            }
            Command::Pin {
                holder,
                keys,
                reply,
            } => {
                let now = atime::now();
                let mut index = self.index.borrow_mut();
                let mut leases = self.leases.borrow_mut();
                let pinned = keys
                    .iter()
                    .map(|k| match index.touch(k, now) {
                        Some(mut e) => {
                            let was = e.pins;
                            e.pins = leases.pin(k, holder, was);
                            if was == 0 && e.pins > 0 {
                                self.accounting.set_pinned(e.size, true);
                            }
                            Some(e.verified)
                        }
                        None => None,
                    })
                    .collect();
                drop((index, leases));
                self.publish_oldest();
                if let Err(pinned) = reply.send(pinned) {
                    // The caller is gone (cancelled): no one will release these pins.
                    let held = keys.iter().zip(pinned).filter(|(_, p)| p.is_some());
                    self.unpin(holder, held.map(|(k, _)| k));
                }
            }
            Command::Unpin { holder, keys } => self.unpin(holder, keys.iter()),
            Command::Listed {
                dirs,
                entries,
                damaged,
            } => self.listed(dirs, entries, damaged),
            Command::Evict { bytes } => {
                // If this shard ran dry before the request was met, the next oldest shard goes on.
                if self.evict(bytes) > 0 {
                    self.maybe_evict();
                }
            }
            Command::Keys { max, reply } => {
                let keys = self
                    .index
                    .borrow()
                    .iter()
                    .take(max)
                    .map(|(k, _)| k)
                    .collect();
                let _ = reply.send(keys);
            }
            Command::Stats { reply } => {
                let index = self.index.borrow();
                let (active, parked) = self.uploads.borrow().counts();
                let _ = reply.send(ShardStats {
                    blobs: index.len() as u64,
                    bytes: index.bytes(),
                    active_uploads: active as u64,
                    parked_uploads: parked as u64,
                    pending_atimes: self.pending_atimes.borrow().len() as u64,
                    pending_dirs: self.pending.borrow().len() as u64,
                });
            }
        }
    }

    /// Releases `holder`'s pin of each blob of `keys` it pins.
    fn unpin<'a>(&self, holder: PinHolder, keys: impl Iterator<Item = &'a BlobKey>) {
        let mut index = self.index.borrow_mut();
        let mut leases = self.leases.borrow_mut();
        for k in keys {
            if let Some(mut e) = index.peek_mut(k) {
                let was = e.pins;
                e.pins = leases.unpin(k, holder, was);
                if was > 0 && e.pins == 0 {
                    self.accounting.set_pinned(e.size, false);
                }
            }
        }
    }

    /// Ends pins past their holder's deadline (and forgets the holders of blobs that left).
    pub(super) fn expire_pins(&self) {
        let now = crate::store::tier::lease_clock();
        let mut index = self.index.borrow_mut();
        let changed = self
            .leases
            .borrow_mut()
            .expire(now, |k| index.peek(k).map_or(0, |e| e.pins));
        for (k, pins) in changed {
            if let Some(mut e) = index.peek_mut(&k) {
                let was = e.pins;
                e.pins = pins;
                if was > 0 && pins == 0 {
                    self.accounting.set_pinned(e.size, false);
                }
            }
        }
    }

    /// Marks a blob used; schedules its access time for disk when it is stale there.
    fn touch(&self, key: &BlobKey, now: u64) -> Option<Entry> {
        let (copy, due) =
            self.index
                .borrow_mut()
                .touch_persisting(key, now, self.settings.atime_resolution)?;
        if due {
            self.schedule_atime(key);
        }
        self.publish_oldest();
        Some(copy)
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        self.cas.metrics()
    }

    /// A blob left the index: the tiers that cache it drop it too.
    fn forgotten(&self, key: &BlobKey) {
        for f in &self.settings.events {
            f.forget(key);
        }
    }

    fn stored(&self, key: &BlobKey) {
        for f in &self.settings.events {
            f.stored(key);
        }
    }

    fn publish_oldest(&self) {
        self.accounting
            .set_oldest(self.shard, self.index.borrow().oldest_atime());
    }

    /// Where a blob is; reading it (and checking it, when not yet verified) is the reader's
    /// work, on the reader's core ([`super::tier::Blob`]).
    fn lookup(&self, key: BlobKey, reply: Reply<Option<Located>>) {
        let Some(entry) = self.touch(&key, atime::now()) else {
            self.metrics().lookups_inc("miss");
            let _ = reply.send(None);
            return;
        };
        self.metrics().lookups_inc("disk");
        let _ = reply.send(Some(Located {
            path: self.layout.blob_path(&key),
            verified: entry.verified,
        }));
    }
}
