//! Blocking durability calls for the threads that may block (start-up, a file lane, the stop,
//! the control plane's blocking pool). The cores go through `Runtime::sync_dir` instead.

use std::io;
use std::path::Path;

/// Makes a directory's entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Whether this platform can make a group of commits durable with one filesystem sync
/// (`syncfs`, which waits for every write on the filesystem and reports their errors). Where
/// it cannot (macOS: `sync` does not wait), each commit syncs its own file and directory.
pub const GROUP_COMMIT: bool = cfg!(target_os = "linux");

/// Flushes everything written to the filesystem holding `dir` (`syncfs`), so that a snapshot
/// never outlives the blobs it lists.
pub fn sync_filesystem(dir: &Path) -> io::Result<()> {
    let dir = std::fs::File::open(dir)?;
    #[cfg(target_os = "linux")]
    {
        syncfs(&dir)
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

/// `syncfs` on an open descriptor: waits until every write to its filesystem (data, inodes,
/// directory entries) is on stable storage, and reports a write-back error since the last.
#[cfg(target_os = "linux")]
pub fn syncfs(on: &std::fs::File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: syncfs on a descriptor borrowed for the duration of the call.
    if unsafe { libc::syncfs(on.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
