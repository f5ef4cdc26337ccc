//! Reading and writing blob files through the shard's runtime (io_uring on glommio).

use crate::runtime::{File, Runtime};
use bytes::Bytes;
use kiln_reapi::digest::Hasher;
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

/// The buffer to allocate when bytes arrive for a blob expected to be `size_hint` bytes (0:
/// unknown) of which `accepted` are in: the rest, between 64 bytes and [`WRITE_BUFFER`].
fn buffer_capacity(size_hint: u64, accepted: u64) -> usize {
    if size_hint == 0 {
        return WRITE_BUFFER;
    }
    let rest = size_hint.saturating_sub(accepted);
    usize::try_from(rest).map_or(WRITE_BUFFER, |r| r.clamp(64, WRITE_BUFFER))
}

/// A temp file being filled sequentially, with writes coalesced into large buffers.
pub struct TempWriter {
    file: Box<dyn File>,
    path: PathBuf,
    written: u64,
    /// The blob's expected size (0: unknown), to size the buffer to what is still to come.
    size_hint: u64,
    /// Bytes not yet written; empty (no allocation) after each write until more arrive.
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
        TempWriter {
            file,
            path,
            written,
            size_hint,
            buf: Vec::new(),
        }
    }

    /// Buffer capacity for the rest of the blob: what the hint says is still to come, at most
    /// one write's worth. A buffer is allocated only when bytes arrive, so an upload waiting
    /// for its fsync, or for its client, holds none.
    fn buffer_capacity(&self) -> usize {
        buffer_capacity(self.size_hint, self.len())
    }

    /// Bytes of buffer held now.
    pub fn buffer_held(&self) -> usize {
        self.buf.capacity()
    }

    /// The temp file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written to the file (readable by others), not counting what is buffered.
    pub fn on_disk(&self) -> u64 {
        self.written
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
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(self.buffer_capacity());
            }
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
        let buf = std::mem::take(&mut self.buf);
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

    /// Closes and deletes the temp file (off the event loop, through `runtime`).
    pub async fn discard(self, runtime: &dyn Runtime) {
        let _ = self.file.close().await;
        let _ = runtime.remove_file(&self.path).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::on_glommio;

    #[test]
    fn buffers_are_sized_to_what_is_still_to_come() {
        assert_eq!(buffer_capacity(0, 0), WRITE_BUFFER, "size unknown");
        assert_eq!(buffer_capacity(10, 0), 64, "at least 64 bytes");
        assert_eq!(buffer_capacity(4096, 0), 4096);
        assert_eq!(buffer_capacity(3 * WRITE_BUFFER as u64, 0), WRITE_BUFFER);
        assert_eq!(
            buffer_capacity(WRITE_BUFFER as u64 + 4096, WRITE_BUFFER as u64),
            4096,
            "the tail of a blob gets a tail-sized buffer"
        );
        assert_eq!(
            buffer_capacity(100, 5000),
            64,
            "a client sending more than it said"
        );
    }

    /// On a real glommio executor and file: after each write the writer holds no buffer, so an
    /// upload waiting for its fsync or its client costs no buffer memory; the bytes on disk are
    /// exactly what was appended, including past a wrong size hint.
    #[test]
    fn holds_no_buffer_between_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.tmp");
        let data: Vec<u8> = (0..WRITE_BUFFER + 5000).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let file = path.clone();
        let held = on_glommio("blob-io-test", move |runtime| {
            Box::pin(async move {
                let mut w = TempWriter::create(&*runtime, file, 1000).await.unwrap();
                let mut held = vec![w.buffer_held()];
                w.append(&data[..500]).await.unwrap();
                held.push(w.buffer_held());
                w.append(&data[500..]).await.unwrap();
                held.push(w.buffer_held());
                w.flush().await.unwrap();
                held.push(w.buffer_held());
                w.finish(true).await.unwrap();
                held
            })
        });
        assert_eq!(held[0], 0, "nothing allocated before bytes arrive");
        assert_eq!(held[1], 1000, "sized by the hint");
        assert!(held[2] <= WRITE_BUFFER, "never past one write: {}", held[2]);
        assert_eq!(held[3], 0, "nothing held after a write");
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }
}
