//! Blocking durability calls for the threads that may block (start-up, a file lane, the stop,
//! the control plane's blocking pool). The cores go through `Runtime::sync_dir` instead.

use std::io;
use std::path::Path;

/// Makes a directory's entries (files created, renamed or removed in it) durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Whether this system can make a group of commits durable with one filesystem sync:
/// `syncfs` must wait for every write on the filesystem and report write-back errors, which
/// Linux does from 5.8 on. Elsewhere (macOS: `sync` does not wait; older Linux: errors are not
/// reported) each commit syncs its own file and directory.
pub fn group_commit_supported() -> bool {
    #[cfg(target_os = "linux")]
    {
        linux_release().is_some_and(|v| v >= (5, 8))
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The largest blob whose data a commit leaves to group commit's filesystem sync, when group
/// commit is on for `config` (and this system can do it); `None` when every durable blob
/// syncs its own data.
pub fn group_commit_max(config: &kiln_config::Config) -> Option<u64> {
    (config.storage.fsync && config.storage.group_commit && group_commit_supported())
        .then(|| config.storage.group_commit_max_bytes.as_u64())
}

/// Whether a writer syncs a blob of `size` bytes itself before committing it: with `fsync`,
/// unless group commit (up to `group_max`) covers it.
pub fn sync_own_data(fsync: bool, group_max: Option<u64>, size: u64) -> bool {
    fsync && group_max.is_none_or(|max| size > max)
}

/// The running kernel's major and minor version.
#[cfg(target_os = "linux")]
fn linux_release() -> Option<(u32, u32)> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    parse_release(&release)
}

/// `6.1.0-18-amd64` → (6, 1).
#[cfg(any(target_os = "linux", test))]
fn parse_release(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

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

#[cfg(test)]
mod tests {
    #[test]
    fn kernel_releases_parse() {
        assert_eq!(super::parse_release("6.1.0-18-amd64\n"), Some((6, 1)));
        assert_eq!(super::parse_release("5.8.0"), Some((5, 8)));
        assert_eq!(super::parse_release("4.19.0-xyz"), Some((4, 19)));
        assert_eq!(super::parse_release("garbage"), None);
        assert!(Some((5, 7)) < Some((5, 8)) && Some((5, 10)) > Some((5, 8)));
    }
}
