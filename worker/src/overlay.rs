//! A cached input root put in place as an overlay mount (`worker.dircache_layout =
//! "overlay"`; Linux, as root): the directory-cache entry is the mount's read-only lower
//! layer and the action writes to an upper layer of its own, so the whole tree is in place
//! after one `mount`, whatever its size. A write to an input copies the file up first, so
//! nothing an action does through its own paths reaches the entry (or the CAS files it shares
//! inodes with), and no tamper check is needed for it.
//!
//! Mounts live at `<work dir>/<action>/root`, with their layers beside them, and are
//! unmounted before the action's directory is removed; a worker that died leaves them
//! mounted, so the work directory's clean-up at start unmounts first
//! ([`unmount_leftover`]).

use std::io;
use std::path::{Path, PathBuf};

/// The directory beside an action's root that holds the overlay's layers.
pub fn layers_of(root: &Path) -> PathBuf {
    root.with_file_name("layers")
}

/// An overlay mounted over an input root; unmounted when dropped.
#[derive(Debug)]
pub struct Mounted {
    at: PathBuf,
    device: u64,
}

impl Mounted {
    /// The mount's device: every file of the tree (input or written by the action) is on it.
    pub fn device(&self) -> u64 {
        self.device
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.at) {
            tracing::warn!(at = %self.at.display(), error = %e, "cannot unmount an action's input overlay");
        }
    }
}

/// Mounts `lower` read-only at `at` (an empty directory) with its writable layers in `layers`
/// (created; on one filesystem). A path the mount options cannot carry (`,`, `:` or `\`) is
/// `InvalidInput`.
pub fn mount(lower: &Path, layers: &Path, at: &Path) -> io::Result<Mounted> {
    let (upper, work) = (layers.join("upper"), layers.join("work"));
    for p in [lower, &upper, &work] {
        let s = p.to_str().unwrap_or(",");
        if s.contains([',', ':', '\\']) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{}: an overlay layer's path cannot hold ',', ':' or '\\'",
                    p.display()
                ),
            ));
        }
    }
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    // The layers are reached only through the mount: an action (with `run_as_user`) cannot
    // put in the upper layer what it could not put through the mount (a link from outside).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(layers, std::fs::Permissions::from_mode(0o700))?;
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    sys::mount(&options, at)?;
    let mut mounted = Mounted {
        at: at.to_path_buf(),
        device: 0,
    };
    use std::os::unix::fs::MetadataExt;
    mounted.device = std::fs::symlink_metadata(at)?.dev();
    Ok(mounted)
}

/// Unmounts `at` (detached when a process still uses it).
fn unmount(at: &Path) -> io::Result<()> {
    sys::unmount(at)
}

/// Unmounts whatever is mounted at `<dir>/root` for each directory in `dir` (a work directory
/// left by a worker that died); nothing where nothing is mounted.
pub fn unmount_leftover(dir: &Path) {
    let root = dir.join("root");
    match sys::unmount_if_mounted(&root) {
        Ok(true) => {
            tracing::info!(at = %root.display(), "unmounted an input overlay left by an earlier run")
        }
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(at = %root.display(), error = %e, "cannot unmount an input overlay left by an earlier run")
        }
    }
}

/// Checks that overlays can be mounted here (in `scratch`, a directory of the work directory,
/// removed afterwards): a file of the lower layer is seen, and one written is not written to
/// the lower layer. The reason when not.
pub fn probe(scratch: &Path) -> Result<(), String> {
    let result = try_probe(scratch).map_err(|e| e.to_string());
    let _ = crate::materialise::remove_tree(scratch);
    result
}

fn try_probe(scratch: &Path) -> io::Result<()> {
    let (lower, at) = (scratch.join("lower"), scratch.join("root"));
    std::fs::create_dir_all(&lower)?;
    std::fs::create_dir_all(&at)?;
    std::fs::write(lower.join("seen"), b"lower")?;
    let mounted = mount(&lower, &layers_of(&at), &at)?;
    let seen = std::fs::read(at.join("seen"))?;
    std::fs::write(at.join("seen"), b"upper")?;
    drop(mounted);
    if seen != b"lower" || std::fs::read(lower.join("seen"))? != b"lower" {
        return Err(io::Error::other(
            "the overlay did not keep its lower layer apart",
        ));
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod sys {
    use rustix::mount::{MountFlags, UnmountFlags};
    use std::io;
    use std::path::Path;

    pub fn mount(options: &str, at: &Path) -> io::Result<()> {
        let options = std::ffi::CString::new(options)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        rustix::mount::mount(
            "kiln-inputs",
            at,
            "overlay",
            MountFlags::NODEV | MountFlags::NOSUID,
            Some(options.as_c_str()),
        )?;
        Ok(())
    }

    pub fn unmount(at: &Path) -> io::Result<()> {
        match rustix::mount::unmount(at, UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) => Ok(rustix::mount::unmount(at, UnmountFlags::DETACH)?),
            r => Ok(r?),
        }
    }

    /// `Ok(false)` where nothing is mounted at `at` (or it does not exist).
    pub fn unmount_if_mounted(at: &Path) -> io::Result<bool> {
        match rustix::mount::unmount(at, UnmountFlags::DETACH) {
            Ok(()) => Ok(true),
            // Not a mount point; or a worker not running as root, which mounted nothing.
            Err(
                rustix::io::Errno::INVAL
                | rustix::io::Errno::NOENT
                | rustix::io::Errno::NOTDIR
                | rustix::io::Errno::PERM,
            ) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::path::Path;

    fn unsupported() -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, "overlay mounts are Linux's")
    }

    pub fn mount(_options: &str, _at: &Path) -> io::Result<()> {
        Err(unsupported())
    }

    pub fn unmount(_at: &Path) -> io::Result<()> {
        Err(unsupported())
    }

    pub fn unmount_if_mounted(_at: &Path) -> io::Result<bool> {
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_root() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "overlay mounts need root: run the suite as root (CI does)"
        );
    }

    fn mounted_at(at: &Path) -> bool {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let at = at.to_str().unwrap();
        info.lines().any(|l| l.split(' ').nth(4) == Some(at))
    }

    #[test]
    fn overlays_can_be_mounted_here() {
        assert_root();
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(probe(&dir.path().join("probe")), Ok(()));
        assert!(!dir.path().join("probe").exists(), "the probe cleans up");
    }

    #[test]
    fn a_mount_left_by_a_worker_that_died_is_unmounted_before_the_work_directory_is_emptied() {
        assert_root();
        let dir = tempfile::tempdir().unwrap();
        let lower = dir.path().join("entry");
        std::fs::create_dir_all(lower.join("sub")).unwrap();
        std::fs::write(lower.join("sub/file"), b"entry").unwrap();
        let work = dir.path().join("work");
        let at = work.join("action").join("root");
        std::fs::create_dir_all(&at).unwrap();
        // As a worker killed while an action ran leaves it (and unmounted at the end should
        // this test fail).
        std::mem::forget(mount(&lower, &layers_of(&at), &at).unwrap());
        struct Cleanup(PathBuf);
        impl Drop for Cleanup {
            fn drop(&mut self) {
                let _ = sys::unmount_if_mounted(&self.0);
            }
        }
        let _cleanup = Cleanup(at.clone());
        assert!(mounted_at(&at));
        crate::prepare_work_dir(&work).unwrap();
        assert!(!mounted_at(&at));
        assert!(!work.join("action").exists());
        assert_eq!(std::fs::read(lower.join("sub/file")).unwrap(), b"entry");
    }
}
