//! Files on monoio: io_uring operations with owned buffers on the io_uring driver; standard
//! blocking calls on the shard's thread pool on the legacy driver.

use super::MonoioDriver;
use crate::runtime::{File, LocalBoxFuture};
use bytes::Bytes;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How to open.
#[derive(Debug, Clone, Copy)]
pub(super) enum Mode {
    Read,
    ReadWrite,
    CreateNew,
}

impl Mode {
    fn std_options(self) -> std::fs::OpenOptions {
        let mut o = std::fs::OpenOptions::new();
        match self {
            Mode::Read => o.read(true),
            Mode::ReadWrite => o.read(true).write(true),
            Mode::CreateNew => o.read(true).write(true).create_new(true),
        };
        o
    }
}

/// Runs a blocking call on the shard's thread pool.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    monoio::spawn_blocking(f)
        .await
        .unwrap_or_else(|_| Err(io::Error::other("file thread pool is gone")))
}

/// Makes a directory's entries durable.
pub(super) fn sync_dir(path: &Path) -> io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Deletes a file: `unlinkat` through io_uring, else on the shard's thread pool (monoio's
/// legacy driver would make the call on the event loop).
pub(super) fn remove(
    driver: MonoioDriver,
    path: PathBuf,
) -> LocalBoxFuture<'static, io::Result<()>> {
    Box::pin(async move {
        match driver {
            #[cfg(target_os = "linux")]
            MonoioDriver::Uring => monoio::fs::remove_file(&path).await,
            _ => blocking(move || std::fs::remove_file(&path)).await,
        }
    })
}

/// Opens a file for the given driver.
pub(super) fn open(
    driver: MonoioDriver,
    path: PathBuf,
    mode: Mode,
) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>> {
    Box::pin(async move {
        match driver {
            #[cfg(target_os = "linux")]
            MonoioDriver::Uring => {
                let file = match mode {
                    Mode::Read => {
                        monoio::fs::OpenOptions::new()
                            .read(true)
                            .open(&path)
                            .await?
                    }
                    Mode::ReadWrite => {
                        monoio::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .open(&path)
                            .await?
                    }
                    Mode::CreateNew => {
                        monoio::fs::OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create_new(true)
                            .open(&path)
                            .await?
                    }
                };
                Ok(Box::new(UringFile(file)) as Box<dyn File>)
            }
            _ => {
                let file = blocking(move || mode.std_options().open(&path)).await?;
                Ok(Box::new(PooledFile(Arc::new(file))) as Box<dyn File>)
            }
        }
    })
}

/// A file driven through io_uring.
#[cfg(target_os = "linux")]
struct UringFile(monoio::fs::File);

#[cfg(target_os = "linux")]
impl File for UringFile {
    fn read_at(&self, pos: u64, len: usize) -> LocalBoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let mut out = Vec::with_capacity(len);
            // A read may return less than asked before end of file; keep going.
            while out.len() < len {
                let want = len - out.len();
                let (result, buf) = self
                    .0
                    .read_at(Vec::with_capacity(want), pos + out.len() as u64)
                    .await;
                let n = result?;
                if n == 0 {
                    break;
                }
                if out.is_empty() && n == len {
                    return Ok(Bytes::from(buf));
                }
                out.extend_from_slice(&buf[..n]);
            }
            Ok(Bytes::from(out))
        })
    }

    fn write_all_at(&self, buf: Vec<u8>, pos: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.write_all_at(buf, pos).await.0 })
    }

    fn sync_data(&self) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.sync_data().await })
    }

    fn close(self: Box<Self>) -> LocalBoxFuture<'static, io::Result<()>> {
        Box::pin(async move { self.0.close().await })
    }
}

/// A standard file whose calls run on the shard's thread pool.
struct PooledFile(Arc<std::fs::File>);

impl File for PooledFile {
    fn read_at(&self, pos: u64, len: usize) -> LocalBoxFuture<'_, io::Result<Bytes>> {
        let file = self.0.clone();
        Box::pin(blocking(move || {
            let mut buf = vec![0u8; len];
            let mut done = 0;
            while done < len {
                match read_at(&file, &mut buf[done..], pos + done as u64)? {
                    0 => break,
                    n => done += n,
                }
            }
            buf.truncate(done);
            Ok(Bytes::from(buf))
        }))
    }

    fn write_all_at(&self, buf: Vec<u8>, pos: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        let file = self.0.clone();
        Box::pin(blocking(move || write_all_at(&file, &buf, pos)))
    }

    fn sync_data(&self) -> LocalBoxFuture<'_, io::Result<()>> {
        let file = self.0.clone();
        // On macOS, std's sync_data is F_FULLFSYNC: fsync alone only reaches the drive's cache.
        Box::pin(blocking(move || file.sync_data()))
    }

    fn close(self: Box<Self>) -> LocalBoxFuture<'static, io::Result<()>> {
        // Dropping closes; nothing is buffered in user space.
        Box::pin(async move { Ok(()) })
    }
}

fn read_at(file: &std::fs::File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    std::os::unix::fs::FileExt::read_at(file, buf, pos)
}

fn write_all_at(file: &std::fs::File, buf: &[u8], pos: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::write_all_at(file, buf, pos)
}
