//! Copying a stored blob to a new path as cheaply as the filesystem allows: a clone that shares
//! the data blocks (APFS `clonefile` on macOS, `FICLONE` on Btrfs/XFS on Linux), else a plain
//! copy. Workers use it to materialise inputs where a hardlink would let an action modify the
//! CAS copy.

use std::fs::File;
use std::io::{self, Seek};
use std::path::Path;

/// How the copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneKind {
    /// Shares the source's blocks (copy-on-write).
    Cloned,
    /// A full copy of the bytes.
    Copied,
}

/// Creates `dst` (which must not exist) with the content of `src`.
pub fn clone_or_copy(src: &Path, dst: &Path) -> io::Result<CloneKind> {
    clone_or_copy_from(&File::open(src)?, dst)
}

/// Creates `dst` (which must not exist) with the whole content of the open file `from`: the
/// path it was opened by is not looked at again, so a file swapped for a symlink after it was
/// opened and checked cannot redirect the copy.
pub fn clone_or_copy_from(from: &File, dst: &Path) -> io::Result<CloneKind> {
    if try_clone(from, dst)? {
        return Ok(CloneKind::Cloned);
    }
    let mut to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    let mut from = from;
    from.seek(io::SeekFrom::Start(0))?;
    io::copy(&mut from, &mut to)?;
    Ok(CloneKind::Copied)
}

/// Clones with APFS `fclonefileat`; `Ok(false)` when the filesystem cannot.
#[cfg(target_os = "macos")]
fn try_clone(from: &File, dst: &Path) -> io::Result<bool> {
    use std::ffi::CString;
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    /// `<sys/clonefile.h>`: the clone belongs to the caller, not to the source's owner (a
    /// root worker's private copy of an action's file must not stay the action user's).
    const CLONE_NOOWNERCOPY: u32 = 0x0002;
    let d = CString::new(dst.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: the descriptor is open for the call and `d` is a valid NUL-terminated path.
    let flags = CLONE_NOOWNERCOPY;
    if unsafe { libc::fclonefileat(from.as_raw_fd(), libc::AT_FDCWD, d.as_ptr(), flags) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOTSUP) | Some(libc::EXDEV) => Ok(false),
        _ => Err(e),
    }
}

/// Clones with the `FICLONE` ioctl; `Ok(false)` when the filesystem cannot (ext4, tmpfs, ZFS
/// before block cloning, another filesystem).
#[cfg(target_os = "linux")]
fn try_clone(from: &File, dst: &Path) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    /// `_IOW(0x94, 9, int)`.
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let to = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dst)?;
    // SAFETY: both descriptors are open for the duration of the call.
    if unsafe { libc::ioctl(to.as_raw_fd(), FICLONE as _, from.as_raw_fd()) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    drop(to);
    let _ = std::fs::remove_file(dst);
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
            Ok(false)
        }
        _ => Err(e),
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn try_clone(_from: &File, _dst: &Path) -> io::Result<bool> {
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_has_the_same_bytes_whichever_way_it_was_made() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let dst = dir.path().join("dst");
        let kind = clone_or_copy(&src, &dst).unwrap();
        assert!(matches!(kind, CloneKind::Cloned | CloneKind::Copied));
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        // Writing the copy leaves the source alone.
        std::fs::write(&dst, b"changed").unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), data);
        assert!(
            clone_or_copy(&src, &dst).is_err(),
            "the destination must not exist"
        );
    }

    #[test]
    fn a_copy_from_an_open_file_ignores_its_path_and_position() {
        use std::io::Read;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::write(&src, b"the bytes that were checked").unwrap();
        let mut opened = File::open(&src).unwrap();
        let mut first = [0u8; 3];
        opened.read_exact(&mut first).unwrap();
        // The path now names something else entirely.
        std::fs::remove_file(&src).unwrap();
        std::fs::write(dir.path().join("secret"), b"not this").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), &src).unwrap();
        let dst = dir.path().join("dst");
        clone_or_copy_from(&opened, &dst).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"the bytes that were checked");
    }
}
