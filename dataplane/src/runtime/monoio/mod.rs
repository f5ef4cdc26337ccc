//! The monoio backend: the one Kiln's Mac workers run (kqueue there), and on Linux either on
//! io_uring or on the readiness ("legacy") driver, which has kqueue's model — that is how the
//! macOS path is exercised here.
//!
//! Sockets use monoio's poll-io streams (tokio's I/O traits, vectored writes). Files: on the
//! io_uring driver, monoio's own io_uring file operations with owned buffers; on the legacy
//! driver a read or write of a file would block the event loop (readiness does not apply to
//! disks), so file operations run on a small thread pool attached to each shard's runtime.

mod files;

use super::{Backend, BoxConnection, File, Listener, LocalBoxFuture, Runtime, ShardMain};
use monoio::io::IntoPollIo;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

/// Which monoio driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MonoioDriver {
    /// io_uring (Linux).
    Uring,
    /// epoll (Linux) or kqueue (macOS).
    Legacy,
}

/// Threads per shard for blocking file operations.
const FILE_THREADS: usize = 2;

/// Starts monoio executors.
#[derive(Debug, Clone, Copy)]
pub struct MonoioBackend {
    driver: MonoioDriver,
}

impl MonoioBackend {
    /// A backend on `driver`.
    pub fn new(driver: MonoioDriver) -> MonoioBackend {
        MonoioBackend { driver }
    }
}

impl Backend for MonoioBackend {
    fn name(&self) -> &'static str {
        match self.driver {
            MonoioDriver::Uring => "monoio-uring",
            MonoioDriver::Legacy => "monoio-legacy",
        }
    }

    fn start_shard(
        &self,
        name: String,
        core: Option<core_affinity::CoreId>,
        main: ShardMain,
    ) -> io::Result<std::thread::JoinHandle<()>> {
        let driver = self.driver;
        std::thread::Builder::new().name(name).spawn(move || {
            if let Some(core) = core {
                if !core_affinity::set_for_current(core) {
                    tracing::warn!(core = core.id, "could not pin shard thread to its core");
                }
            }
            let pool = Box::new(monoio::blocking::DefaultThreadPool::new(FILE_THREADS));
            let runtime: Rc<dyn Runtime> = Rc::new(MonoioRuntime { driver });
            let result = match driver {
                #[cfg(target_os = "linux")]
                MonoioDriver::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                    .with_entries(256)
                    .enable_timer()
                    .attach_thread_pool(pool)
                    .build()
                    .map(|mut rt| rt.block_on(main(runtime))),
                #[cfg(not(target_os = "linux"))]
                MonoioDriver::Uring => Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "io_uring needs Linux",
                )),
                MonoioDriver::Legacy => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                    .enable_timer()
                    .attach_thread_pool(pool)
                    .build()
                    .map(|mut rt| rt.block_on(main(runtime))),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "cannot start a monoio executor");
            }
        })
    }
}

/// The per-shard handle to the current monoio runtime.
struct MonoioRuntime {
    driver: MonoioDriver,
}

fn tune(fd: i32) -> io::Result<()> {
    // SAFETY: the fd stays open for the duration of this borrow (the stream owns it).
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    super::tune_stream(&socket2::SockRef::from(&fd))
}

impl Runtime for MonoioRuntime {
    fn name(&self) -> &'static str {
        MonoioBackend::new(self.driver).name()
    }

    fn spawn(&self, future: LocalBoxFuture<'static, ()>) {
        // Dropping the join handle detaches the task.
        drop(monoio::spawn(future));
    }

    fn sleep(&self, duration: Duration) -> LocalBoxFuture<'static, ()> {
        Box::pin(monoio::time::sleep(duration))
    }

    fn listener(&self, socket: std::net::TcpListener) -> io::Result<Box<dyn Listener>> {
        socket.set_nonblocking(true)?;
        Ok(Box::new(MonoioListener(
            monoio::net::TcpListener::from_std(socket)?,
        )))
    }

    fn connect(&self, addr: SocketAddr) -> LocalBoxFuture<'static, io::Result<BoxConnection>> {
        Box::pin(async move {
            let stream = monoio::net::TcpStream::connect_addr(addr).await?;
            tune(stream.as_raw_fd())?;
            Ok(Box::pin(stream.into_poll_io()?) as BoxConnection)
        })
    }

    fn open_read(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>> {
        files::open(self.driver, path.to_path_buf(), files::Mode::Read)
    }

    fn open_read_write(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>> {
        files::open(self.driver, path.to_path_buf(), files::Mode::ReadWrite)
    }

    fn create_new(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>> {
        files::open(self.driver, path.to_path_buf(), files::Mode::CreateNew)
    }

    fn sync_dir(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<()>> {
        let path = path.to_path_buf();
        Box::pin(async move { files::blocking(move || files::sync_dir(&path)).await })
    }

    fn remove_file(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<()>> {
        files::remove(self.driver, path.to_path_buf())
    }
}

struct MonoioListener(monoio::net::TcpListener);

impl Listener for MonoioListener {
    fn accept(&self) -> LocalBoxFuture<'_, io::Result<(BoxConnection, SocketAddr)>> {
        Box::pin(async move {
            let (stream, peer) = self.0.accept().await?;
            tune(stream.as_raw_fd())?;
            Ok((Box::pin(stream.into_poll_io()?) as BoxConnection, peer))
        })
    }

    fn stop(&self) {
        super::sys::stop_listening(self.0.as_raw_fd());
    }
}
