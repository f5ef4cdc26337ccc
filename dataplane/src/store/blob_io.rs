//! Reading and writing blob files through the shard's runtime (io_uring on glommio).

use crate::digest::Hasher;
use crate::runtime::{File, Runtime};
use bytes::Bytes;
use std::io;
use std::path::{Path, PathBuf};

/// Writes coalesce into buffers of this size before going to the file.
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
    let mut writer = TempWriter::create(runtime, path.to_path_buf(), 0).await?;
    writer.append(data).await?;
    writer.finish(fsync).await
}

/// A temp file being filled sequentially, with writes coalesced into large buffers.
pub struct TempWriter {
    file: Box<dyn File>,
    path: PathBuf,
    written: u64,
    buf: Vec<u8>,
}

impl TempWriter {
    /// Creates a new temp file.
    pub async fn create(
        runtime: &dyn Runtime,
        path: PathBuf,
        size_hint: u64,
    ) -> io::Result<TempWriter> {
        let file = runtime.create_new(&path).await?;
        Ok(TempWriter::wrap(file, path, 0, size_hint))
    }

    /// Continues an existing temp file that holds `written` bytes.
    pub async fn reopen(
        runtime: &dyn Runtime,
        path: PathBuf,
        written: u64,
    ) -> io::Result<TempWriter> {
        let file = runtime.open_read_write(&path).await?;
        Ok(TempWriter::wrap(file, path, written, 0))
    }

    fn wrap(file: Box<dyn File>, path: PathBuf, written: u64, size_hint: u64) -> TempWriter {
        let cap = (size_hint as usize).clamp(64, WRITE_BUFFER);
        TempWriter {
            file,
            path,
            written,
            buf: Vec::with_capacity(cap),
        }
    }

    /// The temp file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes accepted so far (written or buffered).
    pub fn len(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// True before any byte was accepted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Accepts bytes, writing whenever a buffer fills.
    pub async fn append(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let room = WRITE_BUFFER - self.buf.len();
            let take = room.min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.buf.len() >= WRITE_BUFFER {
                self.flush().await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::replace(&mut self.buf, Vec::with_capacity(WRITE_BUFFER));
        let len = buf.len() as u64;
        self.file.write_all_at(buf, self.written).await?;
        self.written += len;
        Ok(())
    }

    /// Writes what is buffered, syncs when `fsync`, and closes.
    pub async fn finish(mut self, fsync: bool) -> io::Result<()> {
        self.flush().await?;
        if fsync {
            self.file.sync_data().await?;
        }
        self.file.close().await
    }

    /// Writes what is buffered and closes without syncing (for parking an interrupted upload).
    /// Returns the path and the bytes on disk.
    pub async fn suspend(mut self) -> io::Result<(PathBuf, u64)> {
        self.flush().await?;
        self.file.close().await?;
        Ok((self.path, self.written))
    }

    /// Closes and deletes the temp file.
    pub async fn discard(self) {
        let _ = self.file.close().await;
        let _ = std::fs::remove_file(&self.path);
    }
}
