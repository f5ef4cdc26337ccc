//! Reading an action's tree after it ran, by directory handle: every name is stat'ed, opened
//! or read relative to a handle of the directory that holds it, never following a symlink.
//! A process of the action (or of another action of the same user) that swaps a directory
//! for a symlink while the worker reads cannot make the worker read outside the tree; the
//! swapped name is seen as the symlink it now is.

use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// What a name in a directory is, as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file: its permission bits, owner and inode (device, number).
    File {
        mode: u32,
        uid: u32,
        inode: (u64, u64),
    },
    /// A directory.
    Dir,
    /// A symlink (never followed).
    Symlink,
    /// A FIFO, socket or device: not an output.
    Other,
}

/// Opens the directory at `path` (which must not itself be a symlink).
pub fn open_root(path: &Path) -> io::Result<OwnedFd> {
    open_dir(rustix::fs::CWD, path.as_os_str())
}

/// Opens the directory `name` below `dir`; a symlink there is an error
/// ([`is_not_a_directory`]).
pub fn open_dir(dir: impl AsFd, name: &OsStr) -> io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// Opens the file `name` below `dir` for reading: not through a symlink, and without
/// blocking on a FIFO or a device left in its place.
pub fn open_file(dir: impl AsFd, name: &OsStr) -> io::Result<std::fs::File> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    Ok(std::fs::File::from(fd))
}

/// What `name` below `dir` is, or `None` when there is nothing by that name.
pub fn kind(dir: impl AsFd, name: &OsStr) -> io::Result<Option<Kind>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(match FileType::from_raw_mode(st.st_mode as _) {
            // st_mode is a u16 on macOS.
            #[allow(clippy::unnecessary_cast)]
            FileType::RegularFile => Kind::File {
                mode: st.st_mode as u32 & 0o7777,
                uid: st.st_uid,
                inode: (st.st_dev as u64, st.st_ino as u64),
            },
            FileType::Directory => Kind::Dir,
            FileType::Symlink => Kind::Symlink,
            _ => Kind::Other,
        })),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The target of the symlink `name` below `dir`, as text.
pub fn read_link(dir: impl AsFd, name: &OsStr) -> io::Result<String> {
    let target = rustix::fs::readlinkat(dir, name, Vec::new())?;
    Ok(String::from_utf8_lossy(target.as_bytes()).into_owned())
}

/// The names in `dir` (without `.` and `..`), sorted, each with what it is.
pub fn list(dir: impl AsFd) -> io::Result<Vec<(OsString, Kind)>> {
    let dir = dir.as_fd();
    let mut out = Vec::new();
    let mut entries = rustix::fs::Dir::read_from(dir)?;
    while let Some(entry) = entries.read() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        // Gone since it was listed: not there.
        if let Some(k) = kind(dir, name)? {
            out.push((name.to_os_string(), k));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Calls `visit` on `root` and every directory below it, parents first, each through its own
/// handle opened below its parent's (so at most one handle per level is open, and a tree may
/// be at most [`kiln_reapi::tree::MAX_DEPTH`] levels deep). A name that is gone, or is no
/// longer a directory (a symlink put in its place), by the time it is opened is skipped.
pub fn each_directory(
    root: &Path,
    visit: &mut dyn FnMut(&OwnedFd) -> io::Result<()>,
) -> io::Result<()> {
    directories(root, false, visit)
}

/// [`each_directory`], giving a directory the worker may not open (an action's `chmod 000`,
/// which a worker not running as root cannot read past) back its owner's permissions first:
/// for taking a tree apart.
pub fn each_directory_forcing(
    root: &Path,
    visit: &mut dyn FnMut(&OwnedFd) -> io::Result<()>,
) -> io::Result<()> {
    directories(root, true, visit)
}

/// Opens the directory `name` below `dir`; with `force`, one that refuses the worker
/// (`EACCES`) is first made `0700` through a handle that cannot be a symlink.
fn open_dir_as(dir: impl AsFd, name: &OsStr, force: bool) -> io::Result<OwnedFd> {
    match open_dir(&dir, name) {
        Err(e) if force && e.raw_os_error() == Some(libc::EACCES) => {
            unlock(&dir, name)?;
            open_dir(dir, name)
        }
        other => other,
    }
}

/// Gives the directory `name` below `dir` mode `0700`, never through a symlink: on Linux
/// through an `O_PATH` handle (which needs no permission on the directory itself) and its
/// `/proc/self/fd` link, which names the directory, not a path to it.
#[cfg(target_os = "linux")]
fn unlock(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let handle = rustix::fs::openat(
        dir,
        name,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let link = format!("/proc/self/fd/{}", handle.as_raw_fd());
    rustix::fs::chmod(link.as_str(), Mode::from_raw_mode(0o700))?;
    Ok(())
}

/// Gives the directory `name` below `dir` mode `0700`, never through a symlink.
#[cfg(not(target_os = "linux"))]
fn unlock(dir: impl AsFd, name: &OsStr) -> io::Result<()> {
    rustix::fs::chmodat(
        dir,
        name,
        Mode::from_raw_mode(0o700),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

fn directories(
    root: &Path,
    force: bool,
    visit: &mut dyn FnMut(&OwnedFd) -> io::Result<()>,
) -> io::Result<()> {
    fn below(
        dir: OwnedFd,
        depth: usize,
        force: bool,
        visit: &mut dyn FnMut(&OwnedFd) -> io::Result<()>,
    ) -> io::Result<()> {
        if depth > kiln_reapi::tree::MAX_DEPTH {
            return Err(io::Error::other(format!(
                "directory tree deeper than {} levels",
                kiln_reapi::tree::MAX_DEPTH
            )));
        }
        visit(&dir)?;
        for (name, kind) in list(&dir)? {
            if kind != Kind::Dir {
                continue;
            }
            match open_dir_as(&dir, &name, force) {
                Ok(child) => below(child, depth + 1, force, visit)?,
                Err(e) if is_not_a_directory(&e) || is_gone(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
    let top = open_dir_as(rustix::fs::CWD, root.as_os_str(), force)?;
    below(top, 0, force, visit)
}

/// Whether an open failed because the name is not (or no longer) a directory or regular
/// file: a symlink or something else put in its place.
pub fn is_not_a_directory(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR))
}

/// Whether a name listed a moment ago is gone, or is no longer what it was listed as (a
/// `readlinkat` of what is now not a symlink).
pub fn is_gone(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_below_their_handle_and_links_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/file"), b"data").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("escape")).unwrap();
        let root = open_root(dir.path()).unwrap();
        let names = list(&root).unwrap();
        assert_eq!(
            names,
            vec![
                (OsString::from("escape"), Kind::Symlink),
                (OsString::from("sub"), Kind::Dir)
            ]
        );
        let err = open_dir(&root, OsStr::new("escape")).unwrap_err();
        assert!(is_not_a_directory(&err), "{err}");
        assert_eq!(
            read_link(&root, OsStr::new("escape")).unwrap(),
            outside.path().to_string_lossy()
        );
        // A directory opened, then swapped for a symlink: the handle still reads the
        // directory it opened, and the name now opens as nothing.
        let sub = open_dir(&root, OsStr::new("sub")).unwrap();
        std::fs::rename(dir.path().join("sub"), dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("sub")).unwrap();
        assert!(matches!(
            kind(&sub, OsStr::new("file")).unwrap(),
            Some(Kind::File { .. })
        ));
        let mut data = String::new();
        use std::io::Read;
        open_file(&sub, OsStr::new("file"))
            .unwrap()
            .read_to_string(&mut data)
            .unwrap();
        assert_eq!(data, "data");
        assert!(is_not_a_directory(
            &open_dir(&root, OsStr::new("sub")).unwrap_err()
        ));
        assert!(open_file(&root, OsStr::new("escape")).is_err());
        assert_eq!(kind(&root, OsStr::new("nothing")).unwrap(), None);
        assert!(open_root(&dir.path().join("escape")).is_err());
    }
}
