//! Writing an upload's temp file through the page cache: bytes coalesce into one buffer, sized
//! to what is still to come, which is written when full.

use super::blob_io::WRITE_BUFFER;
use crate::runtime::{Appender, File, LocalBoxFuture, ProgressHook};
use std::io;

/// The buffer to allocate when bytes arrive for a blob expected to be `size_hint` bytes (0:
/// unknown) of which `accepted` are in: the rest, between 64 bytes and [`WRITE_BUFFER`].
fn buffer_capacity(size_hint: u64, accepted: u64) -> usize {
    if size_hint == 0 {
        return WRITE_BUFFER;
    }
    let rest = size_hint.saturating_sub(accepted);
    usize::try_from(rest).map_or(WRITE_BUFFER, |r| r.clamp(64, WRITE_BUFFER))
}

/// A file filled sequentially through the page cache, with writes coalesced into large buffers.
pub struct BufferedAppender {
    file: Box<dyn File>,
    written: u64,
    /// The blob's expected size (0: unknown), to size the buffer to what is still to come.
    size_hint: u64,
    /// Bytes not yet written; empty (no allocation) after each write until more arrive.
    buf: Vec<u8>,
    hook: Option<ProgressHook>,
}

impl BufferedAppender {
    /// Appends to `file`, which holds `written` bytes.
    pub fn new(file: Box<dyn File>, written: u64, size_hint: u64) -> BufferedAppender {
        BufferedAppender {
            file,
            written,
            size_hint,
            buf: Vec::new(),
            hook: None,
        }
    }

    /// A buffer is allocated only when bytes arrive, so an upload waiting for its fsync, or
    /// for its client, holds none.
    fn buffer_capacity(&self) -> usize {
        buffer_capacity(self.size_hint, self.taken())
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let len = buf.len() as u64;
        self.file.write_all_at(buf, self.written).await?;
        self.written += len;
        if let Some(hook) = &self.hook {
            hook(self.written);
        }
        Ok(())
    }
}

impl Appender for BufferedAppender {
    fn append<'a>(&'a mut self, mut data: &'a [u8]) -> LocalBoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
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
        })
    }

    fn on_disk(&self) -> u64 {
        self.written
    }

    fn on_progress(&mut self, hook: ProgressHook) {
        self.hook = Some(hook);
    }

    fn taken(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    fn buffer_held(&self) -> usize {
        self.buf.capacity()
    }

    fn finish(mut self: Box<Self>, fsync: bool) -> LocalBoxFuture<'static, io::Result<u64>> {
        Box::pin(async move {
            let flushed = self.flush().await;
            let synced = match (&flushed, fsync) {
                (Ok(()), true) => self.file.sync_data().await,
                _ => Ok(()),
            };
            let closed = self.file.close().await;
            flushed?;
            synced?;
            closed?;
            Ok(self.written)
        })
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

    /// On a real glommio executor and file: after each write the appender holds no buffer, so
    /// an upload waiting for its fsync or its client costs no buffer memory; the bytes on disk
    /// are exactly what was appended, including past a wrong size hint.
    #[test]
    fn holds_no_buffer_between_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob.tmp");
        let data: Vec<u8> = (0..WRITE_BUFFER + 5000).map(|i| (i % 251) as u8).collect();
        let expected = data.clone();
        let file = path.clone();
        let held = on_glommio("appender-test", move |runtime| {
            Box::pin(async move {
                let created = runtime.create_new(&file).await.unwrap();
                let mut w = BufferedAppender::new(created, 0, 1000);
                let mut held = vec![w.buffer_held()];
                w.append(&data[..500]).await.unwrap();
                held.push(w.buffer_held());
                w.append(&data[500..]).await.unwrap();
                held.push(w.buffer_held());
                w.flush().await.unwrap();
                held.push(w.buffer_held());
                Box::new(w).finish(true).await.unwrap();
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
