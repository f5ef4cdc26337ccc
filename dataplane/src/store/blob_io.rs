//! Reading and writing blob files through the shard's runtime (io_uring on glommio).

use super::appender::BufferedAppender;
use crate::runtime::{Appender, File, ProgressHook, Runtime};
use bytes::Bytes;
use kiln_reapi::digest::Hasher;
use std::io;
use std::path::{Path, PathBuf};

/// Files are read, and buffered writes coalesced, in pieces of this size.
pub const WRITE_BUFFER: usize = 1 << 20;

/// Reads a whole file of `size` bytes.
pub async fn read_all(runtime: &dyn Runtime, path: &Path, size: u64) -> io::Result<Bytes> {
    let file = runtime.open_read(path).await?;
    let result = read_exact_at(&*file, 0, size as usize).await;
    let closed = file.close().await;
    let data = result?;
    closed?;
    Ok(data)
}

/// Reads exactly `len` bytes at `pos`; a short file is an error.
pub async fn read_exact_at(file: &dyn File, pos: u64, len: usize) -> io::Result<Bytes> {
    let data = file.read_at(pos, len).await?;
    if data.len() != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!(
                "file shorter than expected: {} of {len} bytes at offset {pos}",
                data.len()
            ),
        ));
    }
    Ok(data)
}

/// Hashes a whole file with `hasher`, reading it in chunks.
pub async fn hash_file(
    runtime: &dyn Runtime,
    path: &Path,
    size: u64,
    mut hasher: Hasher,
) -> io::Result<[u8; 32]> {
    let file = runtime.open_read(path).await?;
    let mut pos = 0u64;
    let result = async {
        while pos < size {
            let len = (size - pos).min(WRITE_BUFFER as u64) as usize;
            let chunk = read_exact_at(&*file, pos, len).await?;
            hasher.update(&chunk);
            pos += len as u64;
        }
        Ok::<_, io::Error>(())
    }
    .await;
    let closed = file.close().await;
    result?;
    closed?;
    Ok(hasher.finalize())
}

/// Writes a complete blob to a new temp file, durable when `fsync`.
pub async fn write_new(
    runtime: &dyn Runtime,
    path: &Path,
    data: &[u8],
    fsync: bool,
) -> io::Result<()> {
    let mut writer = TempWriter::create(runtime, path.to_path_buf(), 0, false).await?;
    writer.append(data).await?;
    writer.finish(fsync).await
}

/// An upload's temp file being filled from start to end: through the page cache, or with
/// direct I/O where asked for and available.
pub struct TempWriter {
    path: PathBuf,
    sink: Box<dyn Appender>,
}

impl TempWriter {
    /// Creates a new temp file for a blob of `size_hint` bytes (0: unknown), written with
    /// direct I/O when `direct` and the runtime and filesystem allow it.
    pub async fn create(
        runtime: &dyn Runtime,
        path: PathBuf,
        size_hint: u64,
        direct: bool,
    ) -> io::Result<TempWriter> {
        if direct {
            match runtime.create_direct(&path, size_hint).await {
                Ok(Some(sink)) => return Ok(TempWriter { path, sink }),
                Ok(None) => {}
                Err(e) => {
                    // The file may have been made before the failure.
                    let _ = runtime.remove_file(&path).await;
                    return Err(e);
                }
            }
        }
        let file = runtime.create_new(&path).await?;
        let sink = Box::new(BufferedAppender::new(file, 0, size_hint));
        Ok(TempWriter { path, sink })
    }

    /// Continues an existing temp file that holds `written` bytes (through the page cache).
    pub async fn reopen(
        runtime: &dyn Runtime,
        path: PathBuf,
        written: u64,
    ) -> io::Result<TempWriter> {
        let file = runtime.open_read_write(&path).await?;
        let sink = Box::new(BufferedAppender::new(file, written, 0));
        Ok(TempWriter { path, sink })
    }

    /// The temp file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written to the file (readable by others), not counting what is buffered.
    pub fn on_disk(&self) -> u64 {
        self.sink.on_disk()
    }

    /// Calls `hook` with [`TempWriter::on_disk`] whenever more of the file is written.
    pub fn on_progress(&mut self, hook: ProgressHook) {
        self.sink.on_progress(hook);
    }

    /// Accepts bytes, writing whenever a buffer fills.
    pub async fn append(&mut self, data: &[u8]) -> io::Result<()> {
        self.sink.append(data).await
    }

    /// Writes what is buffered, syncs when `fsync`, and closes.
    pub async fn finish(self, fsync: bool) -> io::Result<()> {
        self.sink.finish(fsync).await.map(|_| ())
    }

    /// Writes what is buffered and closes without syncing (for parking an interrupted upload).
    /// Returns the path and the bytes on disk.
    pub async fn suspend(self) -> io::Result<(PathBuf, u64)> {
        let written = self.sink.finish(false).await?;
        Ok((self.path, written))
    }

    /// Closes and deletes the temp file (off the event loop, through `runtime`).
    pub async fn discard(self, runtime: &dyn Runtime) {
        let _ = self.sink.finish(false).await;
        let _ = runtime.remove_file(&self.path).await;
    }
}
