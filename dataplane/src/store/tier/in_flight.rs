//! The in-flight tier (read-while-write): a reader of a blob that is being uploaded streams
//! it as it arrives instead of getting `NOT_FOUND`.
//!
//! ByteStream uploads register with [`Uploads`] (one registry for the process: the upload
//! and its readers may be on different cores) and report how much of the temp file is
//! written. A reader the tier below cannot serve follows the upload: it reads the temp file
//! up to what is written, waits for more, and sends the piece that completes its range only
//! once the upload was verified and stored; if the upload fails, stalls out or is parked, the
//! reader gets `NOT_FOUND` and nothing is stored (an upload that fails poisons nothing),
//! unless another upload of the same blob stored it meanwhile (the reader then goes on from
//! the store).
//! `FindMissingBlobs` still reports the blob missing until it is stored, as the spec requires.

use super::{Blob, BlobStore, ChunkSink, PinHolder, StoreFuture, StreamEnd, VerifiedUpload};
use crate::metrics::Metrics;
use crate::runtime::{ProgressHook, Runtime};
use crate::store::{blob_io, Committed, StoreError};
use event_listener::{Event, Listener};
use futures::future::BoxFuture;
use kiln_reapi::digest::BlobKey;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

/// How an upload ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Verified and stored: every byte of its temp file is the blob's.
    Stored,
    /// Failed, refused, interrupted or stalled: nothing was stored.
    Failed,
}

/// What a reader sees of an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes written to the temp file (readable by anyone who opens it).
    pub on_disk: u64,
    /// How it ended, once it has.
    pub ended: Option<Ended>,
}

/// One upload being followed.
pub struct Growing {
    key: BlobKey,
    temp: PathBuf,
    progress: Mutex<Progress>,
    changed: Event,
}

impl std::fmt::Debug for Growing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Growing")
            .field("key", &self.key)
            .field("temp", &self.temp)
            .field("progress", &self.progress())
            .finish()
    }
}

impl Growing {
    fn lock(&self) -> MutexGuard<'_, Progress> {
        // The state is two plain numbers: usable even if a holder panicked.
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn advance(&self, on_disk: u64) {
        let mut p = self.lock();
        if on_disk > p.on_disk {
            p.on_disk = on_disk;
            drop(p);
            self.changed.notify(usize::MAX);
        }
    }

    /// Where the upload stands.
    pub fn progress(&self) -> Progress {
        *self.lock()
    }

    /// Waits until the upload moves on from `seen` (more bytes, or its end).
    async fn changed_from(&self, seen: Progress) {
        loop {
            let listener = self.changed.listen();
            if self.progress() != seen {
                return;
            }
            listener.await;
        }
    }

    /// Blocks until the upload ended.
    fn wait_end_blocking(&self) -> Ended {
        loop {
            let listener = self.changed.listen();
            if let Some(e) = self.progress().ended {
                return e;
            }
            listener.wait();
        }
    }

    async fn wait_end(&self) -> Ended {
        loop {
            let seen = self.progress();
            if let Some(e) = seen.ended {
                return e;
            }
            self.changed_from(seen).await;
        }
    }
}

/// The uploads in progress, shared by every core.
#[derive(Default)]
pub struct Uploads {
    map: Mutex<HashMap<BlobKey, Arc<Growing>>>,
}

impl Uploads {
    fn lock(&self) -> MutexGuard<'_, HashMap<BlobKey, Arc<Growing>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an upload of `key` into `temp` holding `on_disk` bytes already (a resumed
    /// upload). `None` when another upload of the same blob is registered: readers follow that
    /// one.
    pub fn begin(self: &Arc<Self>, key: &BlobKey, temp: &Path, on_disk: u64) -> Option<Arriving> {
        let growing = Arc::new(Growing {
            key: key.clone(),
            temp: temp.to_path_buf(),
            progress: Mutex::new(Progress {
                on_disk,
                ended: None,
            }),
            changed: Event::new(),
        });
        let mut map = self.lock();
        if map.contains_key(key) {
            return None;
        }
        map.insert(key.clone(), growing.clone());
        Some(Arriving {
            uploads: self.clone(),
            growing,
        })
    }

    /// The upload of `key` in progress, if any.
    pub fn get(&self, key: &BlobKey) -> Option<Arc<Growing>> {
        self.lock().get(key).cloned()
    }

    /// Uploads registered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no upload is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The writer's side of a registered upload. Dropped without [`Arriving::stored`], the upload
/// counts as failed, so no reader waits for it forever.
pub struct Arriving {
    uploads: Arc<Uploads>,
    growing: Arc<Growing>,
}

impl Arriving {
    /// What the temp file's writer calls with the bytes of it written, as more are.
    pub fn follower(&self) -> ProgressHook {
        let growing = self.growing.clone();
        Box::new(move |on_disk| growing.advance(on_disk))
    }

    /// The upload was verified and stored.
    pub fn stored(self) {
        self.end(Ended::Stored);
    }

    fn end(&self, how: Ended) {
        {
            let mut map = self.uploads.lock();
            if map
                .get(&self.growing.key)
                .is_some_and(|g| Arc::ptr_eq(g, &self.growing))
            {
                map.remove(&self.growing.key);
            }
        }
        let mut p = self.growing.lock();
        if p.ended.is_none() {
            p.ended = Some(how);
        }
        drop(p);
        self.growing.changed.notify(usize::MAX);
    }
}

impl Drop for Arriving {
    fn drop(&mut self) {
        self.end(Ended::Failed);
    }
}

/// The in-flight tier over `inner`.
pub struct InFlight {
    uploads: Arc<Uploads>,
    inner: Arc<dyn BlobStore>,
    metrics: Arc<Metrics>,
}

impl InFlight {
    /// Readers of blobs `inner` does not hold follow the uploads registered in `uploads`
    /// (counted in `metrics` as lookups served `in_flight`).
    pub fn new(
        uploads: Arc<Uploads>,
        inner: Arc<dyn BlobStore>,
        metrics: Arc<Metrics>,
    ) -> InFlight {
        InFlight {
            uploads,
            inner,
            metrics,
        }
    }
}

impl BlobStore for InFlight {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        self.inner.contains(keys)
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async move {
            // The upload first: one that finishes while the tier below is asked is stored by
            // the time that answers, or followed here (and read from below once stored).
            let upload = self.uploads.get(key);
            if let Some(blob) = self.inner.open(key).await? {
                return Ok(Some(blob));
            }
            let Some(followed) = upload else {
                return Ok(None);
            };
            self.metrics.lookups_inc("in_flight");
            Ok(Some(Blob::arriving(
                key.clone(),
                followed,
                self.inner.clone(),
            )))
        })
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        self.inner.put(key, upload)
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

/// What a reader of an upload does once it cannot follow the temp file (it was renamed into
/// place, or the upload failed before the reader opened it): read the stored blob from the
/// tier below, or report it missing.
async fn stored_blob(growing: &Growing, then: &dyn BlobStore) -> Result<Blob, StoreError> {
    // Stored, or failed while another upload (not followed) may have stored it.
    growing.wait_end().await;
    then.open(&growing.key)
        .await?
        .ok_or_else(|| StoreError::Vanished(growing.key.clone()))
}

/// The whole blob once its upload is stored (through the tier below).
pub(super) async fn read_all(
    growing: &Growing,
    then: &dyn BlobStore,
    runtime: &dyn Runtime,
) -> Result<bytes::Bytes, StoreError> {
    let blob = stored_blob(growing, then).await?;
    Box::pin(blob.read_all(runtime)).await
}

/// [`read_all`] for threads that may block.
pub(super) fn read_all_blocking(
    growing: &Growing,
    then: &dyn BlobStore,
) -> Result<bytes::Bytes, StoreError> {
    stored_blob_blocking(growing, then)?.read_all_blocking()
}

/// The upload's blob as the tier below holds it once the upload has ended, for threads that
/// may block.
pub(super) fn stored_blob_blocking(
    growing: &Growing,
    then: &dyn BlobStore,
) -> Result<Blob, StoreError> {
    // Stored, or failed while another upload (not followed) may have stored it.
    growing.wait_end_blocking();
    futures::executor::block_on(then.open(&growing.key))?
        .ok_or_else(|| StoreError::Vanished(growing.key.clone()))
}

/// Streams `start..end` of the upload's blob as it arrives (see the module's rules).
pub(super) async fn stream<S: ChunkSink>(
    growing: &Growing,
    then: &dyn BlobStore,
    runtime: &dyn Runtime,
    start: u64,
    end: u64,
    chunk: u64,
    sink: &mut S,
) -> Result<(), StreamEnd<S::Error>> {
    let file = match runtime.open_read(&growing.temp).await {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let blob = stored_blob(growing, then).await?;
            return Box::pin(blob.stream(runtime, start, end, chunk as usize, sink)).await;
        }
        Err(e) => return Err(StoreError::io("read", &growing.temp, e).into()),
    };
    let result = follow(growing, &*file, start, end, chunk, sink).await;
    let _ = file.close().await;
    match result? {
        None => Ok(()),
        // The followed upload failed after `from` bytes were sent: another upload of the
        // same blob may have stored it.
        Some(from) => {
            let blob = stored_blob(growing, then).await?;
            Box::pin(blob.stream(runtime, from, end, chunk as usize, sink)).await
        }
    }
}

/// Sends `start..end` from the upload's temp file as it arrives; `Some(position)` when the
/// upload failed with the range sent up to there.
async fn follow<S: ChunkSink>(
    growing: &Growing,
    file: &dyn crate::runtime::File,
    start: u64,
    end: u64,
    chunk: u64,
    sink: &mut S,
) -> Result<Option<u64>, StreamEnd<S::Error>> {
    let mut pos = start;
    while pos < end {
        let seen = growing.progress();
        // Before the upload is verified, the piece that would complete the range waits.
        let sendable = match seen.ended {
            Some(Ended::Failed) => return Ok(Some(pos)),
            Some(Ended::Stored) => end,
            None => seen.on_disk.min(end.saturating_sub(1)),
        };
        if pos >= sendable {
            growing.changed_from(seen).await;
            continue;
        }
        let len = (sendable - pos).min(chunk) as usize;
        let data = blob_io::read_exact_at(file, pos, len)
            .await
            .map_err(|e| StoreError::io("read", &growing.temp, e))?;
        sink.send(data).await.map_err(StreamEnd::Sink)?;
        pos += len as u64;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::super::behaviour::{key, Plane};
    use super::*;
    use crate::runtime::{on_glommio, Backend, GlommioBackend};
    use bytes::Bytes;
    use futures::executor::block_on;
    use std::io::Write;
    use std::sync::mpsc;

    /// Forwards each piece to the test thread.
    struct Forward(mpsc::Sender<Bytes>);

    impl ChunkSink for Forward {
        type Error = ();
        async fn send(&mut self, chunk: Bytes) -> Result<(), ()> {
            self.0.send(chunk).map_err(|_| ())
        }
    }

    /// `n` readers of `key` on a glommio core, each streaming the whole blob in pieces of
    /// 1,000 bytes: their pieces, and each one's outcome when it ends.
    #[allow(clippy::type_complexity)]
    fn readers(
        store: Arc<dyn BlobStore>,
        key: BlobKey,
        n: usize,
    ) -> (
        Vec<mpsc::Receiver<Bytes>>,
        mpsc::Receiver<(usize, Result<(), String>)>,
        std::thread::JoinHandle<()>,
    ) {
        let (done_tx, done) = mpsc::channel();
        let (txs, rxs): (Vec<_>, Vec<_>) = (0..n).map(|_| mpsc::channel()).unzip();
        let shard = GlommioBackend
            .start_shard(
                "in-flight-readers".into(),
                None,
                Box::new(move |runtime| {
                    Box::pin(async move {
                        let reads = txs.into_iter().enumerate().map(|(i, tx)| {
                            let (store, key, runtime, done) =
                                (store.clone(), key.clone(), runtime.clone(), done_tx.clone());
                            async move {
                                let size = key.digest.size;
                                let result = match store.open(&key).await {
                                    Ok(Some(blob)) => blob
                                        .stream(&*runtime, 0, size, 1000, &mut Forward(tx))
                                        .await
                                        .map_err(|e| format!("{e:?}")),
                                    other => Err(format!("{other:?}")),
                                };
                                let _ = done.send((i, result));
                            }
                        });
                        futures::future::join_all(reads).await;
                    })
                }),
            )
            .expect("reader core");
        (rxs, done, shard)
    }

    fn take(rx: &mpsc::Receiver<Bytes>, bytes: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < bytes {
            got.extend_from_slice(&rx.recv().expect("a piece"));
        }
        got
    }

    fn data(size: usize) -> Vec<u8> {
        (0..size).map(|i| (i * 7 % 251) as u8).collect()
    }

    /// A slow writer, followed by three readers: each gets what is written as it is written,
    /// all but the last byte before the upload is stored, and the whole blob after.
    #[test]
    fn readers_follow_a_slow_upload() {
        let plane = Plane::start("chain = [\"in_flight\", \"filesystem\"]");
        let store = plane.plan.build(&plane.cas);
        let uploads = plane.plan.uploads().expect("an in-flight tier");
        let blob = data(10_000);
        let k = key(&blob);
        let upload = plane.upload(&[], false);
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(upload.temp.as_deref().expect("a temp file"))
            .unwrap();
        let arriving = uploads
            .begin(&k, upload.temp.as_deref().expect("a temp file"), 0)
            .expect("registered");
        assert!(
            uploads
                .begin(&k, upload.temp.as_deref().expect("a temp file"), 0)
                .is_none(),
            "one upload per blob is followed"
        );
        // What the upload's writer is given to report its progress.
        let advance = arriving.follower();
        let (pieces, done, shard) = readers(store.clone(), k.clone(), 3);
        file.write_all(&blob[..4_000]).unwrap();
        advance(4_000);
        for rx in &pieces {
            assert_eq!(take(rx, 4_000), &blob[..4_000]);
        }
        file.write_all(&blob[4_000..]).unwrap();
        advance(10_000);
        for rx in &pieces {
            assert_eq!(take(rx, 5_999), &blob[4_000..9_999]);
        }
        assert!(
            done.try_recv().is_err(),
            "no reader ends before the upload is stored"
        );
        assert_eq!(
            block_on(store.contains(std::slice::from_ref(&k))).unwrap(),
            vec![false]
        );
        let stored = VerifiedUpload {
            temp: upload.temp.clone(),
            data: None,
            epoch: upload.epoch,
        };
        assert_eq!(block_on(store.put(&k, stored)).unwrap(), Committed::Stored);
        arriving.stored();
        for rx in &pieces {
            assert_eq!(take(rx, 1), &blob[9_999..]);
        }
        for _ in 0..3 {
            let (i, result) = done.recv().unwrap();
            assert!(result.is_ok(), "reader {i}: {result:?}");
        }
        shard.join().unwrap();
        assert!(uploads.is_empty());
        // Later readers read the stored blob.
        let again = block_on(store.open(&k)).unwrap().unwrap();
        assert_eq!(again.read_all_blocking().unwrap(), blob);
    }

    /// A writer that fails: its readers get an error, not the blob, and nothing is stored.
    #[test]
    fn a_failed_upload_fails_its_readers_and_stores_nothing() {
        let plane = Plane::start("chain = [\"in_flight\", \"filesystem\"]");
        let store = plane.plan.build(&plane.cas);
        let uploads = plane.plan.uploads().expect("an in-flight tier");
        let blob = data(5_000);
        let k = key(&blob);
        let upload = plane.upload(&blob[..3_000], false);
        let arriving = uploads
            .begin(&k, upload.temp.as_deref().expect("a temp file"), 3_000)
            .expect("registered");
        let (pieces, done, shard) = readers(store.clone(), k.clone(), 2);
        for rx in &pieces {
            assert_eq!(take(rx, 3_000), &blob[..3_000]);
        }
        drop(arriving);
        for _ in 0..2 {
            let (i, result) = done.recv().unwrap();
            assert!(
                result.as_ref().is_err_and(|e| e.contains("Vanished")),
                "reader {i}: {result:?}"
            );
        }
        shard.join().unwrap();
        assert!(uploads.is_empty());
        assert!(
            block_on(store.open(&k)).unwrap().is_none(),
            "no reader finds it now"
        );
        assert_eq!(
            block_on(store.contains(std::slice::from_ref(&k))).unwrap(),
            vec![false]
        );
    }

    /// A followed upload fails after another upload of the same blob stored it: its readers
    /// go on from the store where they were.
    #[test]
    fn readers_of_a_failed_upload_go_on_from_another_that_stored_the_blob() {
        let plane = Plane::start("chain = [\"in_flight\", \"filesystem\"]");
        let store = plane.plan.build(&plane.cas);
        let uploads = plane.plan.uploads().expect("an in-flight tier");
        let blob = data(5_000);
        let k = key(&blob);
        let followed = plane.upload(&blob[..3_000], false);
        let arriving = uploads
            .begin(&k, followed.temp.as_deref().expect("a temp file"), 3_000)
            .expect("registered");
        let (pieces, done, shard) = readers(store.clone(), k.clone(), 2);
        for rx in &pieces {
            assert_eq!(take(rx, 3_000), &blob[..3_000]);
        }
        // Another client's upload of the same blob (not followed) is stored; the followed one
        // then fails.
        block_on(store.put(&k, plane.upload(&blob, false))).unwrap();
        drop(arriving);
        for rx in &pieces {
            assert_eq!(take(rx, 2_000), &blob[3_000..]);
        }
        for _ in 0..2 {
            let (i, result) = done.recv().unwrap();
            assert!(result.is_ok(), "reader {i}: {result:?}");
        }
        shard.join().unwrap();
    }

    /// A reader that finds the upload but opens its temp file only after the upload was
    /// renamed into place reads the stored blob (and copies it).
    #[test]
    fn a_reader_that_comes_late_reads_the_stored_blob() {
        let plane = Plane::start("chain = [\"in_flight\", \"filesystem\"]");
        let uploads = plane.plan.uploads().expect("an in-flight tier");
        let filesystem = plane.plan.build(&plane.cas);
        let blob = data(3_000);
        let k = key(&blob);
        let upload = plane.upload(&blob, false);
        let arriving = uploads
            .begin(&k, upload.temp.as_deref().expect("a temp file"), 3_000)
            .expect("registered");
        let growing = uploads.get(&k).expect("followed");
        block_on(filesystem.put(&k, upload)).unwrap();
        arriving.stored();
        let late = Blob::arriving(k.clone(), growing, filesystem.clone());
        assert_eq!(late.clone().read_all_blocking().unwrap(), blob);
        // A copy into a file (what SplitBlob and the Remote Asset's checks take) is the stored
        // blob's, copied from its file.
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        late.clone().copy_to_blocking(&copy).unwrap();
        assert_eq!(std::fs::read(&copy).unwrap(), blob);
        let (tx, rx) = mpsc::channel();
        let streamed = on_glommio("late-reader", move |runtime| {
            Box::pin(async move {
                let mut sink = Forward(tx);
                let r = late.stream(&*runtime, 0, 3_000, 1000, &mut sink).await;
                r.map_err(|e| format!("{e:?}"))
            })
        });
        assert!(streamed.is_ok(), "{streamed:?}");
        let got: Vec<u8> = rx.iter().flat_map(|b| b.to_vec()).collect();
        assert_eq!(got, blob);
    }
}
