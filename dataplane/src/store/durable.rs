//! Blocking durability calls for the threads that may block (start-up, a file lane, the stop,
//! the control plane's blocking pool). The cores go through `Runtime::sync_dir` instead.

use std::io;
use std::path::Path;

/// Makes a directory's entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Flushes everything written to the filesystem holding `dir` (`syncfs`), so that a snapshot
/// never outlives the blobs it lists.
pub fn sync_filesystem(dir: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(dir)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor this function owns for the duration of the call.
        if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        // No syncfs: sync(2) for every filesystem's dirty data, then a full fsync of the
        // directory (F_FULLFSYNC on macOS, which also flushes the drive's cache).
        // SAFETY: sync takes no arguments and cannot fail.
        unsafe { libc::sync() };
        dir.sync_all()
    }
}
