//! Direct (O_DIRECT) writes of an upload's temp file on glommio.
//!
//! Bytes are copied once, into an aligned buffer; a full buffer goes to the disk by DMA, not
//! through the page cache, and up to [`IN_FLIGHT`] buffers are being written while the next one
//! fills (and the caller hashes the next bytes). The last, partial buffer is written padded to
//! the alignment and the file is then cut to its length, before any sync, so that a synced file
//! is exactly the blob.

use super::super::{Appender, LocalBoxFuture, ProgressHook};
use glommio::io::{DmaBuffer, DmaFile, OpenOptions};
use glommio::Task;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::path::Path;
use std::rc::Rc;

/// Bytes per write.
pub(super) const BUFFER: usize = 1 << 20;
/// Writes in flight at once per file (so at most `IN_FLIGHT + 1` buffers per upload).
pub(super) const IN_FLIGHT: usize = 2;
/// Positions and lengths are aligned to at least this, whatever the device reports: a page,
/// which is what ZFS asks of direct I/O.
const MIN_ALIGN: u64 = 4096;

/// Writes a small file in `dir` the way an upload would be written, on an executor of its own
/// on this thread: whether direct writes work there.
pub(super) fn probe(dir: &Path) -> Result<(), String> {
    let path = dir.join(format!("direct-probe-{}", std::process::id()));
    let executor = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .io_memory(super::IO_MEMORY)
        .ring_depth(16)
        .make()
        .map_err(|e| format!("no executor: {e}"))?;
    let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let written = executor.run({
        let (path, data) = (path.clone(), data.clone());
        async move {
            let mut w = create(&path, data.len() as u64, Rc::new(Cell::new(true)))
                .await?
                .ok_or_else(|| io::Error::other("the filesystem refuses O_DIRECT"))?;
            w.append(&data).await?;
            w.finish(true).await
        }
    });
    let read = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    match (written, read) {
        (Ok(_), Ok(read)) if read == data => Ok(()),
        (Ok(_), Ok(read)) => Err(format!(
            "wrote 5000 bytes, read back {} different ones",
            read.len()
        )),
        (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
    }
}

/// Creates `path` for direct writes. `None` when its filesystem refuses O_DIRECT (the file is
/// removed again, and `supported` remembers the answer for this shard).
pub(super) async fn create(
    path: &Path,
    size_hint: u64,
    supported: Rc<Cell<bool>>,
) -> io::Result<Option<Box<dyn Appender>>> {
    if !supported.get() {
        return Ok(None);
    }
    let opened = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .dma_open(path)
        .await;
    let refusal = match opened {
        Ok(file) => {
            let align = file.alignment().max(MIN_ALIGN);
            if align as usize <= BUFFER && BUFFER.is_multiple_of(align as usize) {
                return Ok(Some(Box::new(DirectAppender::new(file, align, size_hint))));
            }
            let _ = file.close().await;
            format!("an alignment of {align} bytes, which does not divide {BUFFER}")
        }
        // glommio created the file, then setting O_DIRECT on it failed.
        Err(e) if refuses_direct(&e) => e.to_string(),
        Err(e) => return Err(io::Error::from(e)),
    };
    tracing::warn!(
        path = %path.display(),
        why = %refusal,
        "no direct I/O on this filesystem; large uploads are written through the page cache"
    );
    supported.set(false);
    match glommio::io::remove(path).await.map_err(io::Error::from) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether opening a file failed because its filesystem does not take O_DIRECT (`EINVAL`,
/// which glommio's conversion to `io::Error` would lose).
fn refuses_direct(e: &glommio::GlommioError<()>) -> bool {
    matches!(e, glommio::GlommioError::EnhancedIoError { source, .. }
        if source.raw_os_error() == Some(libc::EINVAL))
}

/// How far the file is written from its start, as writes complete (in any order).
#[derive(Default)]
struct Progress {
    on_disk: Cell<u64>,
    /// The end of each write in flight, oldest first, and whether it completed.
    ends: RefCell<VecDeque<(u64, bool)>>,
    hook: RefCell<Option<ProgressHook>>,
}

impl Progress {
    fn started(&self, end: u64) {
        self.ends.borrow_mut().push_back((end, false));
    }

    /// The write ending at `end` completed: the prefix of completed writes is on disk.
    fn completed(&self, end: u64) {
        let advanced = {
            let mut ends = self.ends.borrow_mut();
            if let Some(entry) = ends.iter_mut().find(|(e, _)| *e == end) {
                entry.1 = true;
            }
            let mut advanced = false;
            while let Some(&(e, true)) = ends.front() {
                ends.pop_front();
                self.on_disk.set(e);
                advanced = true;
            }
            advanced
        };
        if advanced {
            if let Some(hook) = self.hook.borrow().as_ref() {
                hook(self.on_disk.get());
            }
        }
    }
}

/// A temp file written with direct I/O, several buffers in flight.
struct DirectAppender {
    file: Rc<DmaFile>,
    align: u64,
    /// The buffer being filled, allocated when bytes arrive.
    buffer: Option<DmaBuffer>,
    filled: usize,
    /// Bytes handed to writes: where the buffer being filled starts.
    submitted: u64,
    /// The blob's expected size (0: unknown): the last buffer is only as large as what is
    /// left of it, so an upload never holds more buffer than its blob's size (rounded up).
    size_hint: u64,
    progress: Rc<Progress>,
    /// Writes in flight, oldest first, with the size of their buffers.
    writes: VecDeque<(usize, Task<io::Result<()>>)>,
}

impl DirectAppender {
    fn new(file: DmaFile, align: u64, size_hint: u64) -> DirectAppender {
        DirectAppender {
            file: Rc::new(file),
            align,
            buffer: None,
            filled: 0,
            submitted: 0,
            size_hint,
            progress: Rc::new(Progress::default()),
            writes: VecDeque::new(),
        }
    }

    /// The size of the next buffer: [`BUFFER`], or what is left of the blob, aligned.
    fn next_buffer(&self) -> usize {
        let rest = self.size_hint.saturating_sub(self.taken());
        if self.size_hint == 0 || rest >= BUFFER as u64 {
            return BUFFER;
        }
        align_up(rest.max(1), self.align) as usize
    }

    /// Hands the buffer being filled to a write (padded to the alignment if it is the last).
    async fn submit(&mut self) -> io::Result<()> {
        while self.writes.len() >= IN_FLIGHT {
            self.complete_oldest().await?;
        }
        let Some(mut buffer) = self.buffer.take() else {
            return Ok(());
        };
        let len = self.filled;
        let padded = align_up(len as u64, self.align) as usize;
        buffer.as_bytes_mut()[len..padded].fill(0);
        buffer.trim_to_size(padded);
        let pos = self.submitted;
        let end = pos + len as u64;
        let file = self.file.clone();
        let progress = self.progress.clone();
        progress.started(end);
        let write = glommio::spawn_local(async move {
            let written = file.write_at(buffer, pos).await.map_err(io::Error::from)?;
            if written < padded {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("No space left on device (a short write: {written} of {padded} bytes)"),
                ));
            }
            progress.completed(end);
            Ok(())
        });
        self.submitted = end;
        self.filled = 0;
        self.writes.push_back((padded, write));
        Ok(())
    }

    /// Waits for the oldest write.
    async fn complete_oldest(&mut self) -> io::Result<()> {
        match self.writes.pop_front() {
            Some((_, write)) => write.await,
            None => Ok(()),
        }
    }

    async fn finish_inner(&mut self, fsync: bool) -> io::Result<u64> {
        let len = self.taken();
        self.submit().await?;
        while !self.writes.is_empty() {
            self.complete_oldest().await?;
        }
        if !len.is_multiple_of(self.align) {
            self.file.truncate(len).await.map_err(io::Error::from)?;
        }
        if fsync {
            self.file.fdatasync().await.map_err(io::Error::from)?;
        }
        Ok(len)
    }
}

impl Appender for DirectAppender {
    fn append<'a>(&'a mut self, mut data: &'a [u8]) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            while !data.is_empty() {
                let next = self.next_buffer();
                let file = &self.file;
                let buffer = self
                    .buffer
                    .get_or_insert_with(|| file.alloc_dma_buffer(next));
                let size = buffer.len();
                let take = (size - self.filled).min(data.len());
                buffer.as_bytes_mut()[self.filled..self.filled + take]
                    .copy_from_slice(&data[..take]);
                self.filled += take;
                data = &data[take..];
                if self.filled == size {
                    self.submit().await?;
                }
            }
            Ok(())
        })
    }

    fn on_disk(&self) -> u64 {
        self.progress.on_disk.get()
    }

    fn on_progress(&mut self, hook: ProgressHook) {
        *self.progress.hook.borrow_mut() = Some(hook);
    }

    fn taken(&self) -> u64 {
        self.submitted + self.filled as u64
    }

    fn buffer_held(&self) -> usize {
        self.buffer.as_ref().map_or(0, |b| b.len())
            + self.writes.iter().map(|(size, _)| size).sum::<usize>()
    }

    fn finish(mut self: Box<Self>, fsync: bool) -> LocalBoxFuture<'static, io::Result<u64>> {
        Box::pin(async move {
            let result = self.finish_inner(fsync).await;
            // Whatever happened, no write is left running on the file before it closes.
            while let Some((_, write)) = self.writes.pop_front() {
                let _ = write.await;
            }
            let file = self.file.clone();
            drop(self);
            // Every write is done and dropped its handle: this is the last one.
            let closed = match Rc::try_unwrap(file) {
                Ok(file) => file.close().await.map_err(io::Error::from),
                Err(_) => Ok(()),
            };
            let len = result?;
            closed?;
            Ok(len)
        })
    }
}

impl Drop for DirectAppender {
    fn drop(&mut self) {
        // Dropped unfinished (its upload's task was cancelled): let the writes in flight end
        // on their own rather than cancel them under the kernel.
        for (_, write) in self.writes.drain(..) {
            write.detach();
        }
    }
}

fn align_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align) * align
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::on_glommio;

    /// Appends `data` to a new direct file in `dir` in pieces of `piece` bytes; returns what
    /// `finish` said, the progress reported along the way, and the file's bytes.
    fn write_direct(
        dir: &Path,
        data: Vec<u8>,
        piece: usize,
        size_hint: u64,
    ) -> (u64, Vec<u64>, Vec<u8>) {
        let path = dir.join("blob.tmp");
        let file = path.clone();
        let (len, progress) = on_glommio("direct-test", move |_| {
            Box::pin(async move {
                let mut w = create(&file, size_hint, Rc::new(Cell::new(true)))
                    .await
                    .unwrap()
                    .expect("this filesystem takes direct I/O");
                // Never more buffer than the blob (rounded up to whole pages), nor than one
                // filling and the writes in flight.
                let bound = match size_hint {
                    0 => (IN_FLIGHT + 1) * BUFFER,
                    n => (n.div_ceil(4096) * 4096).min(((IN_FLIGHT + 1) * BUFFER) as u64) as usize,
                };
                let seen = Rc::new(RefCell::new(Vec::new()));
                let log = seen.clone();
                w.on_progress(Box::new(move |n| log.borrow_mut().push(n)));
                for chunk in data.chunks(piece) {
                    w.append(chunk).await.unwrap();
                    assert!(w.buffer_held() <= bound, "{} > {bound}", w.buffer_held());
                    assert!(w.on_disk() <= w.taken());
                }
                let len = w.finish(true).await.unwrap();
                let progress = seen.borrow().clone();
                (len, progress)
            })
        });
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        (len, progress, bytes)
    }

    /// On a real glommio executor and real files (the temp directory's filesystem, and tmpfs,
    /// where glommio writes through the page cache): blobs of every alignment, appended in
    /// pieces that straddle the buffers, with their size known or not, come back byte for
    /// byte and exactly as long (the padded last write is cut off), progress reaches the end
    /// in order, and the buffers held stay within the blob's size.
    #[test]
    fn the_file_holds_exactly_what_was_appended() {
        let disk = tempfile::tempdir().unwrap();
        let shm = tempfile::tempdir_in("/dev/shm").ok();
        let dirs = std::iter::once(disk.path()).chain(shm.as_ref().map(|d| d.path()));
        for dir in dirs {
            let sizes = [1, 4095, 4096, 4097, BUFFER - 1, BUFFER, 5 * BUFFER + 12_345];
            for (size, hinted) in sizes.iter().flat_map(|&n| [(n, true), (n, false)]) {
                let data: Vec<u8> = (0..size).map(|i| (i * 7 % 253) as u8).collect();
                let hint = if hinted { size as u64 } else { 0 };
                let (len, progress, bytes) = write_direct(dir, data.clone(), 7919, hint);
                assert_eq!(len, size as u64, "{}: {size}", dir.display());
                assert!(bytes == data, "{}: {size} bytes differ", dir.display());
                assert!(progress.windows(2).all(|w| w[0] < w[1]), "{progress:?}");
                assert_eq!(progress.last().copied(), Some(size as u64));
            }
        }
    }

    /// The start-up probe succeeds where direct writes work (the temp directory's disk, and
    /// tmpfs, where glommio writes through the page cache) and leaves nothing behind; it
    /// fails, saying why, where the directory cannot take the file.
    #[test]
    fn the_probe_says_whether_direct_writes_work() {
        let disk = tempfile::tempdir().unwrap();
        assert_eq!(probe(disk.path()), Ok(()));
        assert_eq!(
            std::fs::read_dir(disk.path()).unwrap().count(),
            0,
            "left behind"
        );
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            assert_eq!(probe(shm.path()), Ok(()));
        }
        let gone = disk.path().join("missing");
        assert!(probe(&gone).is_err());
    }

    /// ramfs (mounted here for the test) refuses O_DIRECT: the file glommio created is removed,
    /// the shard remembers, and the start-up probe says no.
    #[test]
    fn a_filesystem_refusing_o_direct_is_written_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let _ramfs = Ramfs::mount(dir.path());
        let path = dir.path().join("blob.tmp");
        let file = path.clone();
        let (made, remembered) = on_glommio("direct-test", move |_| {
            Box::pin(async move {
                let supported = Rc::new(Cell::new(true));
                let made = create(&file, 0, supported.clone()).await.unwrap().is_some();
                (made, supported.get())
            })
        });
        assert!(!made, "no direct appender on ramfs");
        assert!(!remembered, "the shard remembers");
        assert!(!path.exists(), "the half-made file is removed");
        assert!(probe(dir.path()).is_err(), "the probe says no");
    }

    /// A ramfs mounted over a directory for the length of a test (needs root, like the
    /// other tests that use the kernel's facilities).
    struct Ramfs(std::path::PathBuf);

    impl Ramfs {
        fn mount(dir: &Path) -> Ramfs {
            let ok = std::process::Command::new("mount")
                .args(["-t", "ramfs", "ramfs"])
                .arg(dir)
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "this test needs root to mount a ramfs on {}",
                dir.display()
            );
            Ramfs(dir.to_path_buf())
        }
    }

    impl Drop for Ramfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }

    /// A filesystem found to refuse direct I/O is not asked again on this shard.
    #[test]
    fn a_refusal_is_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.tmp");
        let file = path.clone();
        let made = on_glommio("direct-test", move |_| {
            Box::pin(async move {
                create(&file, 0, Rc::new(Cell::new(false)))
                    .await
                    .unwrap()
                    .is_some()
            })
        });
        assert!(!made);
        assert!(!path.exists(), "nothing created");
    }
}
