//! The boundary between the data plane and the executor that runs it.
//!
//! Everything above this module (gRPC framing, blob services, stores) is written against
//! [`Runtime`] and never names glommio or monoio. A backend provides: spawning on the current
//! core, timers, wrapping a listening socket and accepting from it, outgoing connections, and
//! files read and written with owned buffers. [`Backend`] starts one pinned executor per shard.
//! The shape follows quinn's `runtime.rs`: a few documented methods, one file per backend.

pub mod coalesce;
#[cfg(target_os = "linux")]
mod glommio;
mod listener;
mod monoio;
pub(crate) mod sys;

#[cfg(target_os = "linux")]
pub use self::glommio::GlommioBackend;
pub use self::monoio::{MonoioBackend, MonoioDriver};
pub use listener::bind_reuseport_group;

use bytes::Bytes;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

/// A future that stays on the core that created it.
pub type LocalBoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// A connected byte stream, exposed through tokio's I/O traits so h2 can drive it.
pub trait Connection: AsyncRead + AsyncWrite + Unpin {}
impl<T: AsyncRead + AsyncWrite + Unpin> Connection for T {}

/// A boxed connection.
pub type BoxConnection = Pin<Box<dyn Connection>>;

/// A listening socket bound to this core's executor.
pub trait Listener {
    /// Waits for the next connection; the stream already has TCP_NODELAY and keep-alive set.
    fn accept(&self) -> LocalBoxFuture<'_, io::Result<(BoxConnection, SocketAddr)>>;
    /// Stops listening now: new connections are refused from the moment this returns, even
    /// while an io_uring accept still holds the socket open.
    fn stop(&self);
}

/// An open file, read and written at explicit offsets with owned buffers.
pub trait File {
    /// Reads up to `len` bytes at `pos`; a short result means end of file.
    fn read_at(&self, pos: u64, len: usize) -> LocalBoxFuture<'_, io::Result<Bytes>>;
    /// Writes all of `buf` at `pos`.
    fn write_all_at(&self, buf: Vec<u8>, pos: u64) -> LocalBoxFuture<'_, io::Result<()>>;
    /// Flushes the file's data to stable storage.
    fn sync_data(&self) -> LocalBoxFuture<'_, io::Result<()>>;
    /// Closes the file, reporting any deferred error.
    fn close(self: Box<Self>) -> LocalBoxFuture<'static, io::Result<()>>;
}

/// Told how many bytes from a file's start are written, as more are.
pub type ProgressHook = Box<dyn Fn(u64)>;

/// A new file written from its start to its end, in order (an upload's temp file).
pub trait Appender {
    /// Takes `data`; returns once it is buffered or written, never holding more than the
    /// appender's own buffers.
    fn append<'a>(&'a mut self, data: &'a [u8]) -> LocalBoxFuture<'a, io::Result<()>>;
    /// Bytes from the start that are in the file, for readers following the upload.
    fn on_disk(&self) -> u64;
    /// Calls `hook` with [`Appender::on_disk`] whenever more of the file is written.
    fn on_progress(&mut self, hook: ProgressHook);
    /// Bytes taken so far (written or buffered).
    fn taken(&self) -> u64;
    /// Bytes of buffer held now.
    fn buffer_held(&self) -> usize;
    /// Writes what is buffered, leaves the file exactly [`Appender::taken`] bytes long, syncs its
    /// data when `fsync`, and closes it. Returns its length.
    fn finish(self: Box<Self>, fsync: bool) -> LocalBoxFuture<'static, io::Result<u64>>;
}

/// What a data-plane shard needs from its executor.
pub trait Runtime {
    /// The backend's name for logs (`glommio`, `monoio-uring`, ...).
    fn name(&self) -> &'static str;
    /// Runs a future on this core, detached.
    fn spawn(&self, future: LocalBoxFuture<'static, ()>);
    /// Completes after `duration`.
    fn sleep(&self, duration: Duration) -> LocalBoxFuture<'static, ()>;
    /// The current time; a backend may override it to let tests control time.
    fn now(&self) -> Instant {
        Instant::now()
    }
    /// Adopts a bound, listening, non-blocking socket (one of a SO_REUSEPORT group).
    fn listener(&self, socket: std::net::TcpListener) -> io::Result<Box<dyn Listener>>;
    /// Opens a TCP connection (TCP_NODELAY set).
    fn connect(&self, addr: SocketAddr) -> LocalBoxFuture<'static, io::Result<BoxConnection>>;
    /// Opens an existing file for reading.
    fn open_read(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>>;
    /// Opens an existing file for reading and writing (resuming an upload).
    fn open_read_write(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>>;
    /// Creates a new file (failing if it exists) for reading and writing.
    fn create_new(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<Box<dyn File>>>;
    /// Makes a directory's entries (renames into it) durable.
    fn sync_dir(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<()>>;
    /// Deletes a file (an upload's temp file) off the event loop: an io_uring `unlinkat`
    /// where the driver has one, the backend's blocking pool otherwise.
    fn remove_file(&self, path: &Path) -> LocalBoxFuture<'static, io::Result<()>>;
    /// Creates a new file for direct writes (O_DIRECT: from aligned buffers to the disk, not
    /// through the page cache) of a blob of `size_hint` bytes (0: unknown), or `None` where
    /// the backend or the file's filesystem has none; the caller then writes it buffered.
    fn create_direct(
        &self,
        path: &Path,
        size_hint: u64,
    ) -> LocalBoxFuture<'static, io::Result<Option<Box<dyn Appender>>>> {
        let _ = (path, size_hint);
        Box::pin(async { Ok(None) })
    }
}

/// The name of the thread [`Backend::direct_writes`] tries direct I/O on (a panic there is
/// not a reason to stop the process).
pub const DIRECT_PROBE_THREAD: &str = "kiln-direct-probe";

/// The work a shard thread runs once its executor is up.
pub type ShardMain = Box<dyn FnOnce(Rc<dyn Runtime>) -> LocalBoxFuture<'static, ()> + Send>;

/// Starts executors: one thread per shard, pinned to a core when one is given.
pub trait Backend: Send + Sync {
    /// The backend's name.
    fn name(&self) -> &'static str;
    /// Whether uploads in `dir` can be written with direct I/O ([`Runtime::create_direct`]):
    /// tried once, with a small file, on a thread of its own named [`DIRECT_PROBE_THREAD`],
    /// so that a panic of the executor's device probe (glommio reads the disk's properties
    /// from sysfs, and panics on a layout it does not expect) costs direct I/O, not the
    /// process. The error says why not.
    fn direct_writes(&self, dir: &Path) -> Result<(), String> {
        let _ = dir;
        Err(format!("the {} runtime has no direct I/O", self.name()))
    }
    /// Starts a thread named `name` running `main` on a fresh executor.
    fn start_shard(
        &self,
        name: String,
        core: Option<core_affinity::CoreId>,
        main: ShardMain,
    ) -> io::Result<std::thread::JoinHandle<()>>;
}

/// Runs `work` on a shard thread of `backend` and returns what it returned, failing the test
/// after a minute (for tests of code that needs a core's runtime).
#[cfg(test)]
pub(crate) fn on_shard<T: Send + 'static>(
    backend: &dyn Backend,
    name: &str,
    work: impl FnOnce(Rc<dyn Runtime>) -> LocalBoxFuture<'static, T> + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let shard = backend
        .start_shard(
            name.to_string(),
            None,
            Box::new(move |runtime| {
                Box::pin(async move {
                    let _ = tx.send(work(runtime).await);
                })
            }),
        )
        .expect("a shard");
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the shard answered (it panicked or hung otherwise)");
    shard.join().expect("shard thread");
    out
}

/// [`on_shard`] on glommio.
#[cfg(all(test, target_os = "linux"))]
pub(crate) fn on_glommio<T: Send + 'static>(
    name: &str,
    work: impl FnOnce(Rc<dyn Runtime>) -> LocalBoxFuture<'static, T> + Send + 'static,
) -> T {
    on_shard(&GlommioBackend, name, work)
}

/// The backend a configuration asks for.
pub fn backend_for(kind: kiln_config::RuntimeKind) -> std::sync::Arc<dyn Backend> {
    match kind {
        #[cfg(target_os = "linux")]
        kiln_config::RuntimeKind::Glommio => std::sync::Arc::new(GlommioBackend),
        // Configuration validation refuses glommio off Linux; fall back to the macOS default.
        #[cfg(not(target_os = "linux"))]
        kiln_config::RuntimeKind::Glommio => {
            std::sync::Arc::new(MonoioBackend::new(MonoioDriver::Legacy))
        }
        kiln_config::RuntimeKind::MonoioUring => {
            std::sync::Arc::new(MonoioBackend::new(MonoioDriver::Uring))
        }
        kiln_config::RuntimeKind::MonoioLegacy => {
            std::sync::Arc::new(MonoioBackend::new(MonoioDriver::Legacy))
        }
    }
}

/// Sets TCP_NODELAY and keep-alive on a stream: window updates must not wait on delayed ACKs,
/// and a peer that vanished is noticed within a couple of minutes.
pub fn tune_stream(socket: &socket2::SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    let keepalive = keepalive.with_retries(6);
    socket.set_tcp_keepalive(&keepalive)
}

#[cfg(test)]
mod tests;
