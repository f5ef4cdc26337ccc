//! The small-blob log: a store tier that keeps small blobs as records appended to segment
//! files instead of one file each. A file per blob costs a create, a rename and an inode
//! (most of a small write's server CPU, see `docs/architecture.md`); a log appends a batch of
//! blobs with one write and makes it durable with one data sync. Only the store of a size
//! partition's small side (`kind = "log"`): its blobs are held in memory while written.
//!
//! - [`record`]: the record format, with checksums of the header and the bytes.
//! - [`segments`]: segment files; the start-up scan.
//! - [`index_file`]: a sealed segment's list of records, so a start need not read it.
//! - [`entries`]: the index, packed into 64 bytes a blob.
//! - [`state`]: the index with the segments, and the eviction choices, without I/O.
//! - [`writer`]: the thread that appends, syncs and evicts.
//!
//! Blobs written by this process are known good; records found at start-up are hashed on
//! their first read (a damaged one leaves the index). Reads run on the tier's own blocking
//! pool, never on the caller's core.

mod entries;
mod index_file;
mod record;
mod segments;
mod state;
mod writer;

use super::side_runtime::SideRuntime;
use super::{Blob, BlobEvents, BlobStore, PinHolder, StoreFuture, VerifiedUpload};
use crate::metrics::Metrics;
use crate::store::{Committed, StoreError};
use bytes::Bytes;
use futures::future::BoxFuture;
use kiln_reapi::digest::{BlobKey, Hasher};
use state::State;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{info, warn};
use writer::{Append, Job, Writer};

/// Bytes of blobs queued for a log's writer at most (as a count of its largest blobs).
const QUEUED_BYTES: u64 = 256 << 20;

/// How a log is sized and whether its writes are synced.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// The cap on its segment files' bytes (exceeded by the segment being appended, one pass's
    /// copies forward and pinned records).
    pub cap: u64,
    /// The size a segment is sealed at.
    pub segment: u64,
    /// The largest blob it takes.
    pub max_blob: u64,
    /// Whether each batch's data is synced before it is acknowledged.
    pub durable: bool,
}

/// What the log's callers and its writer share.
pub(crate) struct Shared {
    dir: PathBuf,
    options: LogOptions,
    state: Mutex<State>,
    events: Vec<Arc<dyn BlobEvents>>,
    metrics: Arc<Metrics>,
    /// What this log last added to the gauges (bytes, live bytes, blobs): every log of the
    /// process adds its own share.
    published: [AtomicI64; 3],
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock left the index as it was between two calls.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates this log's share of the gauges from `state`.
    fn publish(&self, state: &State) {
        let now = [state.total(), state.live(), state.blobs() as u64];
        let gauges = [
            &self.metrics.log_bytes,
            &self.metrics.log_live_bytes,
            &self.metrics.log_blobs,
        ];
        for ((gauge, last), n) in gauges.into_iter().zip(&self.published).zip(now) {
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            let before = last.swap(n, Ordering::Relaxed);
            gauge.inc_by(n.saturating_sub(before));
        }
    }

    /// Tells the tiers above that `key` is gone.
    fn forget(&self, key: &BlobKey) {
        for e in &self.events {
            e.forget(key);
        }
    }

    /// `key`'s record in `segment` at `offset` did not hash to its digest: it leaves the
    /// index (if the index still points at it: the blob may have been stored again since).
    fn damaged(&self, key: &BlobKey, segment: u64, offset: u64) {
        warn!(key = ?key, "log: a record does not match its digest; dropped");
        self.metrics.corrupt.inc();
        self.lose(key, segment, offset);
    }

    /// `key`'s record in `segment` at `offset` leaves the index, if the index still points
    /// at that record.
    fn lose(&self, key: &BlobKey, segment: u64, offset: u64) {
        let mut state = self.lock();
        if state.remove_at(key, segment, offset) {
            self.publish(&state);
            drop(state);
            self.forget(key);
        }
    }
}

/// A commit counted in `awaiting_sync` while it lives.
struct Awaiting<'a>(&'a Metrics);

impl<'a> Awaiting<'a> {
    fn new(metrics: &'a Metrics) -> Awaiting<'a> {
        metrics.awaiting_sync.inc();
        Awaiting(metrics)
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.0.awaiting_sync.dec();
    }
}

/// The small-blob log tier.
pub struct SmallBlobLog {
    shared: Arc<Shared>,
    appends: async_channel::Sender<Job>,
    /// Reads and temp-file reads run on its blocking pool.
    side: SideRuntime,
}

impl SmallBlobLog {
    /// Opens the log in `dir` (created if missing): sealed segments are listed from their
    /// index files, the others read through once (the newest's torn tail cut off), and a new
    /// segment is begun. `events` hear of the blobs it evicts or finds damaged.
    pub fn open(
        dir: &Path,
        options: LogOptions,
        events: Vec<Arc<dyn BlobEvents>>,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<SmallBlobLog> {
        let started = std::time::Instant::now();
        let found = segments::recover(dir, options.durable, options.max_blob)?;
        let mut state = State::default();
        let (mut records, mut torn, mut indexed) = (0usize, 0u64, 0usize);
        state.reserve(found.iter().map(|s| s.records.len()).sum());
        for seg in found {
            state.add_segment(seg.id, Arc::new(seg.file), seg.len);
            torn += seg.torn;
            indexed += usize::from(seg.from_index);
            if seg.torn > 0 {
                warn!(
                    segment = seg.id,
                    bytes = seg.torn,
                    "log: a torn tail was cut off"
                );
            }
            records += seg.records.len();
            for r in seg.records {
                state.found(r.key, seg.id, r.offset, r.record_len);
            }
        }
        let id = state.next_id();
        let file = segments::create(dir, id, options.durable)?;
        state.add_segment(id, Arc::new(file), 0);
        info!(
            dir = %dir.display(),
            blobs = state.blobs(),
            records,
            segments_from_index_files = indexed,
            torn_bytes = torn,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "log indexed"
        );
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            options,
            state: Mutex::new(state),
            events,
            metrics,
            published: Default::default(),
        });
        shared.publish(&shared.lock());
        // Bounded by bytes (each append holds a blob of up to max_blob): with the disk slow,
        // writers wait here rather than queue without end.
        let queued = usize::try_from(QUEUED_BYTES / options.max_blob.max(1))
            .unwrap_or(1)
            .max(16);
        let (tx, rx) = async_channel::bounded(queued);
        let writer = Writer {
            shared: shared.clone(),
            rx,
            entries: Default::default(),
        };
        std::thread::Builder::new()
            .name("kiln-log".into())
            .spawn(move || writer.run())?;
        Ok(SmallBlobLog {
            shared,
            appends: tx,
            side: SideRuntime::new("kiln-log-read")?,
        })
    }

    /// Waits until everything queued before has been written and the eviction after it
    /// done (for tests that read the log's counters).
    #[cfg(test)]
    pub(crate) async fn settled(&self) {
        let (tx, rx) = futures::channel::oneshot::channel();
        if self.appends.send(Job::Settle(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Runs blocking `work` on the tier's pool.
    async fn blocking<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, StoreError> {
        self.side
            .blocking(work)
            .await
            .map_err(|_| StoreError::Unavailable)
    }

    /// The upload's bytes (read from its temp file when it has no copy in memory, and hashed
    /// again: the file's bytes are only as good as the file); the temp file is removed. Bytes
    /// in memory without a file are taken as they are, without a trip to the pool.
    async fn bytes_of(&self, key: &BlobKey, upload: VerifiedUpload) -> Result<Bytes, StoreError> {
        let (temp, data) = match upload {
            VerifiedUpload {
                temp: None,
                data: Some(data),
                ..
            } => return Ok(data),
            VerifiedUpload { temp, data, .. } => (temp, data),
        };
        let key = key.clone();
        self.blocking(move || {
            let read = match (data, &temp) {
                (Some(d), _) => Ok(d),
                (None, Some(t)) => match std::fs::read(t) {
                    Ok(d) if Hasher::hash(key.digest.function, &d) == key.digest.hash => {
                        Ok(Bytes::from(d))
                    }
                    Ok(_) => Err(StoreError::Corrupt(key)),
                    Err(e) => Err(StoreError::io("read", t, e)),
                },
                (None, None) => Err(StoreError::Unavailable),
            };
            if let Some(t) = &temp {
                let _ = std::fs::remove_file(t);
            }
            read
        })
        .await?
    }
}

impl BlobStore for SmallBlobLog {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(async move {
            let mut state = self.shared.lock();
            Ok(keys
                .iter()
                .map(|k| k.digest.is_empty_blob() || state.touch(k))
                .collect())
        })
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async move {
            if key.digest.is_empty_blob() {
                return Ok(Some(Blob::bytes(key.clone(), Bytes::new())));
            }
            let Some(state::Located {
                file,
                segment,
                offset,
                checked,
            }) = self.shared.lock().find(key)
            else {
                return Ok(None);
            };
            // Read, and hashed when not yet checked, off the caller's core.
            let digest = key.digest;
            let read = self
                .blocking(move || {
                    let data = segments::read(&file, offset, digest.size)?;
                    let good = checked || Hasher::hash(digest.function, &data) == digest.hash;
                    Ok::<_, std::io::Error>((data, good))
                })
                .await?;
            let data = match read {
                Ok((data, true)) => data,
                // Not its digest's bytes, or cut short.
                Ok((_, false)) => {
                    self.shared.damaged(key, segment, offset);
                    return Ok(None);
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    self.shared.damaged(key, segment, offset);
                    return Ok(None);
                }
                Err(e) => return Err(StoreError::io("read", &self.shared.dir, e)),
            };
            if !checked {
                self.shared.lock().checked(key, segment, offset);
            }
            Ok(Some(Blob::bytes(key.clone(), Bytes::from(data))))
        })
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        Box::pin(async move {
            let size = key.digest.size;
            if size > self.shared.options.max_blob {
                if let Some(t) = upload.temp {
                    let _ = self.blocking(move || std::fs::remove_file(t)).await;
                }
                return Err(StoreError::TooLarge {
                    size,
                    cap: self.shared.options.max_blob,
                });
            }
            let data = self.bytes_of(key, upload).await?;
            if data.len() as u64 != size {
                return Err(StoreError::Corrupt(key.clone()));
            }
            if key.digest.is_empty_blob() || self.shared.lock().touch(key) {
                return Ok(Committed::AlreadyPresent);
            }
            let (reply, answer) = futures::channel::oneshot::channel();
            let append = Append {
                key: key.clone(),
                data,
                reply,
            };
            // Counted with the commits waiting for durability until answered (or given up).
            let _awaiting = Awaiting::new(&self.shared.metrics);
            self.appends
                .send(Job::Append(append))
                .await
                .map_err(|_| StoreError::Unavailable)?;
            answer.await.map_err(|_| StoreError::Unavailable)?
        })
    }

    fn pin<'a>(
        &'a self,
        holder: PinHolder,
        keys: &'a [BlobKey],
    ) -> StoreFuture<'a, Vec<Option<bool>>> {
        Box::pin(async move {
            let mut state = self.shared.lock();
            Ok(keys
                .iter()
                .map(|k| {
                    if k.digest.is_empty_blob() {
                        Some(true)
                    } else {
                        state.pin(holder, k)
                    }
                })
                .collect())
        })
    }

    fn unpin<'a>(&'a self, holder: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let mut state = self.shared.lock();
            for k in keys {
                state.unpin(holder, k);
            }
        })
    }

    fn touched(&self, keys: &[BlobKey]) {
        let mut state = self.shared.lock();
        for k in keys {
            state.touch(k);
        }
    }

    fn keeps_files(&self, _key: &BlobKey) -> bool {
        false
    }
}

#[cfg(test)]
mod tests;
