//! A blob on its way out of the store. It knows its digest, and when no one in this process has
//! checked its bytes yet it checks them as they are consumed, so no tier and no reader
//! re-implements verification: a reader gets either checked bytes or an error.
//!
//! Tiers attach [`BlobWatcher`]s to the blobs they hand up: the filesystem tier records the
//! verdict of a first check (so the next read is not hashed again, or the damaged file leaves
//! the index), the memory tier keeps the bytes of a small blob read whole.

use super::check::Check;
use super::in_flight::{self, Growing};
use super::BlobStore;
use crate::runtime::Runtime;
use crate::store::blob_io;
use crate::store::StoreError;
use bytes::Bytes;
use kiln_reapi::digest::BlobKey;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The outcome of the first check of a blob's file in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Its bytes hash to its digest.
    Good,
    /// They do not (or the file is shorter than the digest's size).
    Corrupt,
    /// The file is gone.
    Vanished,
}

/// Told what became of a blob as it was consumed; attached by the tier that handed it out.
pub trait BlobWatcher: Send + Sync {
    /// The blob was read whole and its bytes are valid.
    fn read_whole(&self, _key: &BlobKey, _data: &Bytes) {}
    /// A file no one had checked in this process was checked (or found gone).
    fn checked(&self, _key: &BlobKey, _verdict: Verdict) {}
}

/// Where a blob's bytes are.
#[derive(Clone)]
enum Body {
    /// In memory, checked.
    Bytes(Bytes),
    /// In a file; `checked` is false for files this process has not hashed (found on disk at
    /// start-up).
    File { path: PathBuf, checked: bool },
    /// Being uploaded (see [`super::in_flight`]); once stored, read from `then`.
    Arriving {
        growing: Arc<Growing>,
        then: Arc<dyn BlobStore>,
    },
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Body::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            Body::File { path, checked } => f
                .debug_struct("File")
                .field("path", path)
                .field("checked", checked)
                .finish(),
            Body::Arriving { growing, .. } => f.debug_tuple("Arriving").field(growing).finish(),
        }
    }
}

/// A stored blob, ready to be read.
#[derive(Clone)]
pub struct Blob {
    key: BlobKey,
    body: Body,
    watchers: Vec<Arc<dyn BlobWatcher>>,
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blob")
            .field("key", &self.key)
            .field("body", &self.body)
            .finish_non_exhaustive()
    }
}

impl Blob {
    /// A blob whose bytes are in memory. The caller vouches that they hash to `key`.
    pub fn bytes(key: BlobKey, data: Bytes) -> Blob {
        Blob {
            key,
            body: Body::Bytes(data),
            watchers: Vec::new(),
        }
    }

    /// A blob in a file; `checked` when this process already hashed it.
    pub fn file(key: BlobKey, path: PathBuf, checked: bool) -> Blob {
        Blob {
            key,
            body: Body::File { path, checked },
            watchers: Vec::new(),
        }
    }

    /// A blob being uploaded now, read as it arrives; once stored, read from `then`.
    pub fn arriving(key: BlobKey, growing: Arc<Growing>, then: Arc<dyn BlobStore>) -> Blob {
        Blob {
            key,
            body: Body::Arriving { growing, then },
            watchers: Vec::new(),
        }
    }

    /// The blob's key.
    pub fn key(&self) -> &BlobKey {
        &self.key
    }

    /// Its size (the digest's).
    pub fn size(&self) -> u64 {
        self.key.digest.size
    }

    /// Whether its bytes are in memory already (reading them costs nothing).
    pub fn in_memory(&self) -> bool {
        matches!(self.body, Body::Bytes(_))
    }

    /// The file holding it, when it is a file (not bytes in memory, not an upload arriving).
    pub fn path(&self) -> Option<&Path> {
        match &self.body {
            Body::File { path, .. } => Some(path),
            _ => None,
        }
    }

    /// Whether reading it will hash it (a file no one has checked in this process).
    pub fn needs_check(&self) -> bool {
        matches!(self.body, Body::File { checked: false, .. })
    }

    /// The same blob, with `watcher` told what becomes of it.
    pub fn watched(mut self, watcher: Arc<dyn BlobWatcher>) -> Blob {
        self.watchers.push(watcher);
        self
    }

    fn tell_checked(&self, verdict: Verdict) {
        for w in &self.watchers {
            w.checked(&self.key, verdict);
        }
    }

    fn tell_read_whole(&self, data: &Bytes) {
        for w in &self.watchers {
            w.read_whole(&self.key, data);
        }
    }

    /// The verdict on an I/O error while reading the file: gone, cut short, or neither.
    fn io_failure(&self, path: &Path, e: io::Error) -> StoreError {
        match e.kind() {
            io::ErrorKind::NotFound => {
                self.tell_checked(Verdict::Vanished);
                StoreError::Vanished(self.key.clone())
            }
            io::ErrorKind::UnexpectedEof => {
                self.tell_checked(Verdict::Corrupt);
                StoreError::Corrupt(self.key.clone())
            }
            _ => StoreError::io("read", path, e),
        }
    }

    /// Ends a check: the verdict goes to the watchers; a mismatch is an error.
    fn conclude(&self, check: Check) -> Result<(), StoreError> {
        if check.matches() {
            self.tell_checked(Verdict::Good);
            Ok(())
        } else {
            self.tell_checked(Verdict::Corrupt);
            Err(StoreError::Corrupt(self.key.clone()))
        }
    }

    /// The whole blob, checked, read through a core's runtime.
    pub async fn read_all(self, runtime: &dyn Runtime) -> Result<Bytes, StoreError> {
        let (path, checked) = match &self.body {
            Body::Bytes(data) => return Ok(data.clone()),
            Body::File { path, checked } => (path.clone(), *checked),
            Body::Arriving { growing, then } => {
                let data = in_flight::read_all(growing, &**then, runtime).await?;
                self.tell_read_whole(&data);
                return Ok(data);
            }
        };
        let data = blob_io::read_all(runtime, &path, self.size())
            .await
            .map_err(|e| self.io_failure(&path, e))?;
        self.finish_whole(data, checked)
    }

    /// The whole blob, checked, read with blocking calls (for threads that may block: the
    /// control plane's blocking pool, tests).
    pub fn read_all_blocking(self) -> Result<Bytes, StoreError> {
        let (path, checked) = match &self.body {
            Body::Bytes(data) => return Ok(data.clone()),
            Body::File { path, checked } => (path.clone(), *checked),
            Body::Arriving { growing, then } => {
                let data = in_flight::read_all_blocking(growing, &**then)?;
                self.tell_read_whole(&data);
                return Ok(data);
            }
        };
        let data = read_file_blocking(&path, self.size()).map_err(|e| self.io_failure(&path, e))?;
        self.finish_whole(Bytes::from(data), checked)
    }

    /// Checks the bytes of a file no one in this process has checked (found on disk at
    /// start-up), reading it with blocking calls and keeping nothing: for readers that use the
    /// file itself rather than its bytes (a worker hardlinking an input into an action). The
    /// verdict goes to the watchers; an error says the blob is damaged or gone, or could not
    /// be read now (an I/O error, which says nothing of the blob).
    pub fn check_blocking(&self) -> Result<(), StoreError> {
        let Body::File {
            path,
            checked: false,
        } = &self.body
        else {
            return Ok(());
        };
        let mut check = Check::new(&self.key);
        match check_file_blocking(path, &mut check) {
            Ok(()) => self.conclude(check),
            Err(e) => Err(self.io_failure(path, e)),
        }
    }

    /// Writes the blob into a new file at `dest` (which must not exist), checked, with
    /// blocking calls: a file is cloned or copied, and the copy is hashed (its bytes cannot
    /// change under the check, as the original's could). A mismatch removes the copy and is
    /// the blob's verdict.
    pub fn copy_to_blocking(self, dest: &Path) -> Result<(), StoreError> {
        // A file already at `dest` is not this call's to replace or remove.
        if dest.symlink_metadata().is_ok() {
            let exists = io::Error::from(io::ErrorKind::AlreadyExists);
            return Err(StoreError::io("create", dest, exists));
        }
        // Failures at `dest` say nothing of the blob: no verdict, and the copy goes.
        let at_dest = |op: &'static str, e: io::Error| {
            let _ = std::fs::remove_file(dest);
            StoreError::io(op, dest, e)
        };
        let write = |data: &[u8]| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(dest)
                .and_then(|mut f| f.write_all(data))
                .map_err(|e| at_dest("write", e))
        };
        let path = match &self.body {
            Body::Bytes(data) => return write(data),
            Body::File { path, .. } => path.clone(),
            // Copied from its file once stored, never read whole into memory (it may be large).
            Body::Arriving { growing, then } => {
                return in_flight::stored_blob_blocking(growing, &**then)?.copy_to_blocking(dest);
            }
        };
        // The blob's own file first: that it is gone is the blob's verdict.
        if let Err(e) = std::fs::metadata(&path) {
            return Err(self.io_failure(&path, e));
        }
        if let Err(e) = crate::store::clone::clone_or_copy(&path, dest) {
            return Err(at_dest("copy to", e));
        }
        let mut check = Check::new(&self.key);
        match check_file_blocking(dest, &mut check) {
            Ok(()) => self.conclude(check).inspect_err(|_| {
                let _ = std::fs::remove_file(dest);
            }),
            Err(e) => Err(at_dest("read", e)),
        }
    }

    fn finish_whole(self, data: Bytes, checked: bool) -> Result<Bytes, StoreError> {
        if !checked {
            let mut check = Check::new(&self.key);
            check.update(&data);
            self.conclude(check)?;
        }
        self.tell_read_whole(&data);
        Ok(data)
    }

    /// Hands `start..end` of the blob to `sink` in pieces of at most `chunk` bytes (a file is
    /// read one piece ahead of the one being sent). A blob that needs its check is checked as
    /// it streams when the whole blob is asked for (the last piece is held back until its
    /// hash matched), and hashed in full before its first byte otherwise. `sink` failing ends
    /// the stream with its error.
    pub async fn stream<S: ChunkSink>(
        self,
        runtime: &dyn Runtime,
        start: u64,
        end: u64,
        chunk: usize,
        sink: &mut S,
    ) -> Result<(), StreamEnd<S::Error>> {
        let end = end.min(self.size());
        let chunk = chunk.max(1);
        let (path, checked) = match &self.body {
            Body::Bytes(data) => {
                let mut pos = start as usize;
                while pos < end as usize {
                    let next = (pos + chunk).min(end as usize);
                    sink.send(data.slice(pos..next))
                        .await
                        .map_err(StreamEnd::Sink)?;
                    pos = next;
                }
                return Ok(());
            }
            Body::File { path, checked } => (path.clone(), *checked),
            Body::Arriving { growing, then } => {
                return in_flight::stream(growing, &**then, runtime, start, end, chunk as u64, sink)
                    .await
            }
        };
        let whole = start == 0 && end == self.size();
        let mut check = (!checked).then(|| Check::new(&self.key));
        if !whole {
            if let Some(c) = check.take() {
                let hash = blob_io::hash_file(runtime, &path, self.size(), c.into_hasher())
                    .await
                    .map_err(|e| self.io_failure(&path, e))?;
                self.conclude(Check::finished(&self.key, hash))?;
            }
        }
        if start >= end {
            return Ok(());
        }
        let file = runtime
            .open_read(&path)
            .await
            .map_err(|e| self.io_failure(&path, e))?;
        let result = self
            .stream_file(&*file, &path, start, end, chunk as u64, check, sink)
            .await;
        let _ = file.close().await;
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn stream_file<S: ChunkSink>(
        &self,
        file: &dyn crate::runtime::File,
        path: &Path,
        start: u64,
        end: u64,
        chunk: u64,
        mut check: Option<Check>,
        sink: &mut S,
    ) -> Result<(), StreamEnd<S::Error>> {
        let read = |pos: u64| blob_io::read_exact_at(file, pos, (end - pos).min(chunk) as usize);
        let mut pos = start;
        let mut current = read(pos).await.map_err(|e| self.io_failure(path, e))?;
        loop {
            if let Some(c) = check.as_mut() {
                c.update(&current);
            }
            let next_pos = pos + current.len() as u64;
            if next_pos >= end {
                if let Some(c) = check {
                    self.conclude(c)?;
                }
                return sink.send(current).await.map_err(StreamEnd::Sink);
            }
            // Read the next piece while this one goes out.
            let (next, sent) = futures::future::join(read(next_pos), sink.send(current)).await;
            sent.map_err(StreamEnd::Sink)?;
            current = next.map_err(|e| self.io_failure(path, e))?;
            pos = next_pos;
        }
    }
}

/// Where [`Blob::stream`] sends a blob's pieces.
pub trait ChunkSink {
    /// Why sending failed.
    type Error;
    /// Sends the next piece.
    fn send(&mut self, chunk: Bytes) -> impl std::future::Future<Output = Result<(), Self::Error>>;
}

/// How [`Blob::stream`] ended early.
#[derive(Debug)]
pub enum StreamEnd<E> {
    /// The store failed (the blob is damaged or gone, or the disk failed).
    Store(StoreError),
    /// The receiver failed.
    Sink(E),
}

impl<E> From<StoreError> for StreamEnd<E> {
    fn from(e: StoreError) -> StreamEnd<E> {
        StreamEnd::Store(e)
    }
}

/// Reads exactly `size` bytes of a file; a shorter file is `UnexpectedEof`.
/// Feeds the file at `path` to `check`, with blocking reads of at most one write buffer.
fn check_file_blocking(path: &Path, check: &mut Check) -> io::Result<()> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let size = check.size();
    let mut buf = vec![0u8; size.clamp(1, blob_io::WRITE_BUFFER as u64) as usize];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        check.update(&buf[..n]);
    }
}

fn read_file_blocking(path: &Path, size: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.take(size).read_to_end(&mut data)?;
    if data.len() as u64 != size {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("file shorter than expected: {} of {size} bytes", data.len()),
        ));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::on_glommio;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
    use std::sync::Mutex;

    /// Records what it is told.
    #[derive(Default)]
    struct Record {
        verdicts: Mutex<Vec<Verdict>>,
        whole: Mutex<Vec<Bytes>>,
    }

    impl BlobWatcher for Record {
        fn read_whole(&self, _key: &BlobKey, data: &Bytes) {
            self.whole.lock().unwrap().push(data.clone());
        }
        fn checked(&self, _key: &BlobKey, verdict: Verdict) {
            self.verdicts.lock().unwrap().push(verdict);
        }
    }

    fn key(data: &[u8]) -> BlobKey {
        BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Blake3, data),
        )
    }

    /// An unchecked file of `stored` bytes claiming to be `claimed`.
    fn unchecked(dir: &Path, claimed: &[u8], stored: &[u8]) -> (Blob, Arc<Record>) {
        let path = dir.join(format!("blob-{}", stored.len()));
        std::fs::write(&path, stored).unwrap();
        let record = Arc::new(Record::default());
        let blob = Blob::file(key(claimed), path, false).watched(record.clone());
        (blob, record)
    }

    #[test]
    fn an_unchecked_file_is_checked_when_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"the blob's own bytes".to_vec();
        let (blob, record) = unchecked(dir.path(), &data, &data);
        assert_eq!(blob.read_all_blocking().unwrap(), data);
        assert_eq!(*record.verdicts.lock().unwrap(), vec![Verdict::Good]);
        assert_eq!(record.whole.lock().unwrap().len(), 1);

        let mut damaged = data.clone();
        damaged[3] ^= 1;
        let (blob, record) = unchecked(dir.path(), &data, &damaged);
        assert!(matches!(
            blob.read_all_blocking(),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(*record.verdicts.lock().unwrap(), vec![Verdict::Corrupt]);
        assert!(
            record.whole.lock().unwrap().is_empty(),
            "bad bytes are kept nowhere"
        );

        let (blob, record) = unchecked(dir.path(), &data, &data[..5]);
        assert!(matches!(
            blob.read_all_blocking(),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(
            *record.verdicts.lock().unwrap(),
            vec![Verdict::Corrupt],
            "cut short"
        );

        let (blob, record) = unchecked(dir.path(), &data, &data);
        std::fs::remove_file(dir.path().join(format!("blob-{}", data.len()))).unwrap();
        assert!(matches!(
            blob.read_all_blocking(),
            Err(StoreError::Vanished(_))
        ));
        assert_eq!(*record.verdicts.lock().unwrap(), vec![Verdict::Vanished]);
    }

    #[test]
    fn a_file_used_in_place_is_checked_without_reading_it_into_memory() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![5u8; 3 << 20];
        let (blob, record) = unchecked(dir.path(), &data, &data);
        assert!(blob.check_blocking().is_ok());
        assert_eq!(*record.verdicts.lock().unwrap(), vec![Verdict::Good]);
        assert!(
            record.whole.lock().unwrap().is_empty(),
            "nothing read whole"
        );

        let mut longer = data.clone();
        longer.push(5);
        let (blob, record) = unchecked(dir.path(), &data, &longer);
        assert!(matches!(blob.check_blocking(), Err(StoreError::Corrupt(_))));
        assert_eq!(*record.verdicts.lock().unwrap(), vec![Verdict::Corrupt]);

        let (blob, record) = unchecked(dir.path(), &data, &data);
        std::fs::remove_file(dir.path().join(format!("blob-{}", data.len()))).unwrap();
        assert!(matches!(
            blob.check_blocking(),
            Err(StoreError::Vanished(_))
        ));
        assert_eq!(*record.verdicts.lock().unwrap(), vec![Verdict::Vanished]);
    }

    #[test]
    fn a_checked_file_is_not_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        std::fs::write(&path, b"the bytez").unwrap();
        let record = Arc::new(Record::default());
        // Checked earlier in this process: read as it is (the owner vouches for it).
        let blob = Blob::file(key(b"the bytes"), path, true).watched(record.clone());
        assert_eq!(blob.read_all_blocking().unwrap(), &b"the bytez"[..]);
        assert!(record.verdicts.lock().unwrap().is_empty());
    }

    /// Pieces received by a test sink.
    struct Collect(Vec<Bytes>);

    impl ChunkSink for Collect {
        type Error = ();
        async fn send(&mut self, chunk: Bytes) -> Result<(), ()> {
            self.0.push(chunk);
            Ok(())
        }
    }

    /// Streams `start..end` of each blob on a glommio core, in pieces of 1,000 bytes.
    fn stream_all(blobs: Vec<(Blob, u64, u64)>) -> Vec<(Vec<Bytes>, Result<(), String>)> {
        on_glommio("blob-stream-test", move |runtime| {
            Box::pin(async move {
                let mut out = Vec::new();
                for (blob, start, end) in blobs {
                    let mut sink = Collect(Vec::new());
                    let r = blob.stream(&*runtime, start, end, 1000, &mut sink).await;
                    out.push((sink.0, r.map_err(|e| format!("{e:?}"))));
                }
                out
            })
        })
    }

    /// A whole read of an unchecked file streams as it hashes and holds its last piece back
    /// until the hash matched: a damaged blob never reaches the reader complete. A range is
    /// checked in full before its first byte.
    #[test]
    fn streaming_checks_as_it_goes_and_holds_the_last_piece() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..4500u32).map(|i| (i % 253) as u8).collect();
        let mut damaged = data.clone();
        damaged[4400] ^= 1;
        let (good, good_record) = unchecked(dir.path(), &data, &data);
        let bad_dir = dir.path().join("bad");
        std::fs::create_dir(&bad_dir).unwrap();
        let (bad, bad_record) = unchecked(&bad_dir, &data, &damaged);
        let range_dir = dir.path().join("range");
        std::fs::create_dir(&range_dir).unwrap();
        let (bad_range, _) = unchecked(&range_dir, &data, &damaged);
        let out = stream_all(vec![(good, 0, 4500), (bad, 0, 4500), (bad_range, 100, 200)]);

        let (pieces, result) = &out[0];
        assert!(result.is_ok(), "{result:?}");
        assert_eq!(pieces.concat(), data);
        assert_eq!(pieces.len(), 5);
        assert_eq!(*good_record.verdicts.lock().unwrap(), vec![Verdict::Good]);

        let (pieces, result) = &out[1];
        assert!(
            result.as_ref().is_err_and(|e| e.contains("Corrupt")),
            "{result:?}"
        );
        assert_eq!(
            pieces.len(),
            4,
            "the last piece, which holds the damage, was held back"
        );
        assert_eq!(*bad_record.verdicts.lock().unwrap(), vec![Verdict::Corrupt]);

        let (pieces, result) = &out[2];
        assert!(result.is_err(), "{result:?}");
        assert!(pieces.is_empty(), "a range of a damaged blob sends nothing");
    }
}
