//! The glommio backend (Linux): io_uring for sockets and files, one executor per shard thread.
//!
//! Files use glommio's buffered (page-cache) I/O through io_uring: it works on every filesystem
//! a build server uses (ZFS, ext4, XFS, tmpfs) and keeps hot blobs in the page cache. Large
//! uploads may be written with direct I/O instead ([`direct`]), where the filesystem takes it.

mod conn;
mod direct;

use super::{Appender, Backend, BoxConnection, File, Listener, LocalBoxFuture, Runtime, ShardMain};
use bytes::Bytes;
use conn::Conn;
use glommio::io::{BufferedFile, OpenOptions};
use glommio::net::{TcpListener, TcpStream};
use std::cell::Cell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd};
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

/// Registered-buffer memory per executor. glommio only uses it for O_DIRECT files' buffers
/// that fit in it, which Kiln's (see [`direct`]) do not; kept small so many executors fit under
/// an unprivileged 8 MiB memlock limit.
pub(super) const IO_MEMORY: usize = 256 * 1024;

/// How long the start-up waits for the direct I/O probe.
const DIRECT_PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts glommio executors.
#[derive(Debug, Default, Clone, Copy)]
pub struct GlommioBackend;

impl Backend for GlommioBackend {
    fn name(&self) -> &'static str {
        "glommio"
    }

    fn direct_writes(&self, dir: &Path) -> Result<(), String> {
        let dir = dir.to_path_buf();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(super::DIRECT_PROBE_THREAD.into())
            .spawn(move || {
                let result =
                    std::panic::catch_unwind(|| direct::probe(&dir)).unwrap_or_else(|_| {
                        Err("glommio could not describe the disk (it panicked)".into())
                    });
                let _ = tx.send(result);
            })
            .map_err(|e| e.to_string())?;
        // The probe's first direct file also tries polled I/O on the disk: a disk where that
        // hangs must not hold up the start (the thread is left to itself).
        rx.recv_timeout(DIRECT_PROBE_TIMEOUT)
            .unwrap_or_else(|_| Err(format!("no answer within {DIRECT_PROBE_TIMEOUT:?}")))
    }

    fn start_shard(
        &self,
        name: String,
        core: Option<core_affinity::CoreId>,
        main: ShardMain,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new().name(name).spawn(move || {
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(core = core.id, "could not pin shard thread to its core");
                }
            }
            let executor = match glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
                .io_memory(IO_MEMORY)
                .ring_depth(256)
                .make()
            {
                Ok(executor) => executor,
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a glommio executor (io_uring unavailable?)");
                    return;
                }
            };
            executor.run(async move {
                let runtime: Rc<dyn Runtime> = Rc::new(GlommioRuntime {
                    direct: Rc::new(Cell::new(true)),
                });
                main(runtime).await;
            });
        })
    }
}

/// The per-shard handle to the current glommio executor.
struct GlommioRuntime {
    /// False once the CAS's filesystem refused direct I/O.
    direct: Rc<Cell<bool>>,
}

fn io_err<T>(e: glommio::GlommioError<T>) -> io::Error {
    io::Error::from(e)
}

impl Runtime for GlommioRuntime {
    fn name(&self) -> &'static str {
        "glommio"
    }

    fn spawn(&self, future: LocalBoxFuture<'static, ()>) {
        glommio::spawn_local(future).detach();
    }

    fn sleep(&self, duration: Duration) -> LocalBoxFuture<'static, ()> {
        Box::pin(glommio::timer::sleep(duration))
    }

    fn listener(&self, socket: std::net::TcpListener) -> io::Result<Box<dyn Listener>> {
        socket.set_nonblocking(true)?;
        // SAFETY: the fd is a bound, listening TCP socket whose ownership moves into glommio.
        let fd = socket.into_raw_fd();
        let listener = unsafe { TcpListener::from_raw_fd(fd) };
        Ok(Box::new(GlommioListener(listener, fd)))
    }

    fn connect(&self, addr: SocketAddr) -> LocalBoxFuture<'static, io::Result<BoxConnection>> {
        Box::pin(async move {
            let stream = TcpStream::connect(addr).await.map_err(io_err)?;
            tune(&stream)?;
            Ok(Box::pin(Conn(stream)) as BoxConnection)
        })
    }

    fn open_read(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            let file = BufferedFile::open(&path).await.map_err(io_err)?;
            Ok(Box::new(GlommioFile(file)) as Box<dyn File>)
        })
    }

    fn open_read_write(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .buffered_open(&path)
                .await
                .map_err(io_err)?;
            Ok(Box::new(GlommioFile(file)) as Box<dyn File>)
        })
    }

    fn create_new(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .buffered_open(&path)
                .await
                .map_err(io_err)?;
            Ok(Box::new(GlommioFile(file)) as Box<dyn File>)
        })
    }

    fn sync_dir(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<()>> {
        let path = path.to_path_buf();
        Box::pin(async move {
            let dir = glommio::io::Directory::open(&path).await.map_err(io_err)?;
            let synced = dir.sync().await.map_err(io_err);
            let closed = dir.close().await.map_err(io_err);
            synced.and(closed)
        })
    }

    fn remove_file(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<()>> {
        let path = path.to_path_buf();
        // glommio runs the unlink on its executor's blocking thread.
        Box::pin(async move { glommio::io::remove(&path).await.map_err(io_err) })
    }

    fn create_direct(
        &self,
        path: &Path,
        size_hint: u64,
    ) -> LocalBoxFuture<'static, io::Result<Option<Box<dyn Appender>>>> {
        let path = path.to_path_buf();
        let supported = self.direct.clone();
        Box::pin(async move { direct::create(&path, size_hint, supported).await })
    }
}

fn tune(stream: &TcpStream) -> io::Result<()> {
    // SAFETY: the fd stays open for the duration of this borrow (the stream owns it).
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    super::tune_stream(&socket2::SockRef::from(&fd))
}

/// glommio's listener does not expose its descriptor; the second field keeps it for `stop`.
struct GlommioListener(TcpListener, std::os::fd::RawFd);

impl Listener for GlommioListener {
    fn accept(&self) -> LocalBoxFuture<'_, io::Result<(BoxConnection, SocketAddr)>> {
        Box::pin(async move {
            let stream = self.0.accept().await.map_err(io_err)?;
            let peer = stream.peer_addr()?;
            tune(&stream)?;
            Ok((Box::pin(Conn(stream)) as BoxConnection, peer))
        })
    }

    fn stop(&self) {
        super::sys::stop_listening(self.1);
    }
}

struct GlommioFile(BufferedFile);

impl File for GlommioFile {
    fn read_at(&self, pos: u64, len: usize) -> LocalBoxFuture<'_, io::Result<Bytes>> {
        Box::pin(async move {
            let mut out: Option<bytes::BytesMut> = None;
            let mut done = 0usize;
            // A buffered read may return less than asked before end of file; keep going.
            while done < len {
                let got = self
                    .0
                    .read_at(pos + done as u64, len - done)
                    .await
                    .map_err(io_err)?;
                if got.is_empty() {
                    break;
                }
                if done == 0 && got.len() == len {
                    return Ok(Bytes::copy_from_slice(&got));
                }
                out.get_or_insert_with(|| bytes::BytesMut::with_capacity(len))
                    .extend_from_slice(&got);
                done += got.len();
            }
            Ok(out.map(|b| b.freeze()).unwrap_or_default())
        })
    }

    fn write_all_at(&self, buf: Vec<u8>, pos: u64) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move {
            let total = buf.len();
            let written = self.0.write_at(buf, pos).await.map_err(io_err)?;
            // A regular file only takes less than asked when the device is full (io_uring writes
            // are not cut short by signals); the buffer is gone, so report it.
            if written < total {
                return Err(io::Error::new(
                    io::ErrorKind::StorageFull,
                    format!("No space left on device (a short write: {written} of {total} bytes)"),
                ));
            }
            Ok(())
        })
    }

    fn sync_data(&self) -> LocalBoxFuture<'_, io::Result<()>> {
        Box::pin(async move { self.0.fdatasync().await.map_err(io_err) })
    }

    fn close(self: Box<Self>) -> LocalBoxFuture<'static, io::Result<()>> {
        Box::pin(async move { self.0.close().await.map_err(io_err) })
    }
}
