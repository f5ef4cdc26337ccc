//! A cached input root put in place as an overlay mount (`worker.dircache_layout =
//! "overlay"`; Linux, as root): the directory-cache entry is the mount's read-only lower
//! layer and the action writes to an upper layer of its own, so the whole tree is in place
//! after one `mount`, whatever its size. A write to an input copies the file up first, so
//! nothing an action does through its own paths reaches the entry (or the CAS files it shares
//! inodes with), and no tamper check is needed for it.
//!
//! Mounts live at `<work dir>/<action>/root`, with their layers beside them (in a directory
//! only the worker can enter), and are unmounted — with anything the action mounted over them
//! — before the action's directory is removed and its entry released; one that will not come
//! off keeps both. A worker that died leaves its mounts, so the work directory's clean-up at
//! start unmounts first ([`unmount_leftover`]).

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Mounts stacked at one place that are unmounted before giving up.
const MAX_STACKED: usize = 16;

/// The directory beside an action's root that holds the overlay's layers.
pub fn layers_of(root: &Path) -> PathBuf {
    root.with_file_name("layers")
}

/// An overlay mounted over an input root; unmounted by [`Mounted::unmount`], or when dropped.
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

    /// Unmounts the tree (and whatever the action mounted over it), checking that it is gone.
    /// An error leaves it mounted: its directory must not be removed then, nor its entry
    /// released.
    pub fn unmount(mut self) -> io::Result<()> {
        let at = std::mem::take(&mut self.at);
        unmount_all(&at, Some(self.device))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.at.as_os_str().is_empty() {
            return;
        }
        if let Err(e) = unmount_all(&self.at, Some(self.device)) {
            tracing::error!(at = %self.at.display(), error = %e, "cannot unmount an action's input overlay");
        }
    }
}

/// Mounts `lower` read-only at `at` (an empty directory) with its writable layers in `layers`
/// (which must not exist: it is made, for the worker alone). A path the mount options cannot
/// carry (`,`, `:` or `\`) is `InvalidInput`.
pub fn mount(lower: &Path, layers: &Path, at: &Path) -> io::Result<Mounted> {
    let (upper, work) = (layers.join("upper"), layers.join("work"));
    for p in [lower, &upper, &work, at] {
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
    // The layers are reached only through the mount, from the moment they exist: an action
    // (with `run_as_user`) cannot put in the upper layer what it could not put through the
    // mount (a link from outside).
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(layers)?;
    std::fs::create_dir(&upper)?;
    std::fs::create_dir(&work)?;
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
    mounted.device = std::fs::symlink_metadata(at)?.dev();
    Ok(mounted)
}

/// Unmounts every mount at `at` (an action may have mounted over its tree; each detached
/// where a process still uses it) until none is left, then checks that `at` is not on
/// `device` (the overlay's) any more, when known.
fn unmount_all(at: &Path, device: Option<u64>) -> io::Result<()> {
    let mut left = true;
    for _ in 0..MAX_STACKED {
        if !sys::unmount_one(at)? {
            left = false;
            break;
        }
    }
    let still = match std::fs::symlink_metadata(at) {
        Ok(meta) => left || device.is_some_and(|d| meta.dev() == d),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    if still {
        return Err(io::Error::other(format!(
            "{} is still mounted after {MAX_STACKED} unmounts",
            at.display()
        )));
    }
    Ok(())
}

/// Whether `at` is a mount point (on another device than its parent).
fn is_mount_point(at: &Path) -> bool {
    let (Ok(meta), Some(Ok(parent))) = (
        std::fs::symlink_metadata(at),
        at.parent().map(std::fs::symlink_metadata),
    ) else {
        return false;
    };
    meta.dev() != parent.dev()
}

/// Unmounts whatever is mounted at `<dir>/root` (`dir` an action's directory left by a worker
/// that died); nothing where nothing is mounted. An error when something stays mounted: the
/// directory must not be removed then.
pub fn unmount_leftover(dir: &Path) -> io::Result<()> {
    let root = dir.join("root");
    if !is_mount_point(&root) {
        return Ok(());
    }
    unmount_all(&root, None).map_err(|e| {
        io::Error::other(format!(
            "{} was left mounted by an earlier run (an input overlay: a worker running as \
             root mounts them) and cannot be unmounted: {e}",
            root.display()
        ))
    })?;
    tracing::info!(at = %root.display(), "unmounted an input overlay left by an earlier run");
    Ok(())
}

/// Checks that overlays can be mounted as actions will have them: the lower layer in `lower`
/// (a new directory where the cache keeps its entries), the mount and its layers in `scratch`
/// (a new directory of the work directory); both removed afterwards. A file of the lower
/// layer must be seen, one written must not reach the lower layer, both must be on the
/// mount's device (else the cache and the work directory are on filesystems the overlay
/// cannot present as one), and the mount must come off. The reason when not.
pub fn probe(lower: &Path, scratch: &Path) -> Result<(), String> {
    let result = try_probe(lower, scratch).map_err(|e| e.to_string());
    if !is_mount_point(&scratch.join("root")) {
        let _ = crate::materialise::remove_tree(scratch);
    }
    let _ = crate::materialise::remove_tree(lower);
    result
}

fn try_probe(lower: &Path, scratch: &Path) -> io::Result<()> {
    let at = scratch.join("root");
    std::fs::create_dir_all(lower)?;
    std::fs::create_dir_all(&at)?;
    std::fs::write(lower.join("seen"), b"lower")?;
    let mounted = mount(lower, &layers_of(&at), &at)?;
    let seen = std::fs::read(at.join("seen"))?;
    std::fs::write(at.join("written"), b"upper")?;
    let devices = [
        std::fs::symlink_metadata(at.join("seen"))?.dev(),
        std::fs::symlink_metadata(at.join("written"))?.dev(),
    ];
    let device = mounted.device();
    mounted.unmount()?;
    if seen != b"lower" || lower.join("written").exists() {
        return Err(io::Error::other(
            "the overlay did not keep its lower layer apart",
        ));
    }
    if devices != [device, device] {
        return Err(io::Error::other(
            "the overlay shows the directory cache's files and the action's on different \
             devices (the cache and the work directory are on filesystems it cannot join): \
             put worker.dircache_dir on the work directory's filesystem",
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

    /// Unmounts the topmost mount at `at` (detached when a process still uses it); `false`
    /// when nothing is mounted there (or `at` is gone).
    pub fn unmount_one(at: &Path) -> io::Result<bool> {
        let r = match rustix::mount::unmount(at, UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(at, UnmountFlags::DETACH),
            r => r,
        };
        match r {
            Ok(()) => Ok(true),
            Err(
                rustix::io::Errno::INVAL | rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR,
            ) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod sys {
    use std::io;
    use std::path::Path;

    pub fn mount(_options: &str, _at: &Path) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "overlay mounts are Linux's",
        ))
    }

    pub fn unmount_one(_at: &Path) -> io::Result<bool> {
        Ok(false)
    }
}

#[cfg(all(test, target_os = "linux"))]
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

    /// Unmounts what a test mounted at the path, should the test fail.
    struct Cleanup(PathBuf);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = unmount_all(&self.0, None);
        }
    }

    #[test]
    fn overlays_can_be_mounted_here() {
        assert_root();
        let dir = tempfile::tempdir().unwrap();
        let (lower, scratch) = (dir.path().join("lower"), dir.path().join("probe"));
        assert_eq!(probe(&lower, &scratch), Ok(()));
        assert!(!scratch.exists() && !lower.exists(), "the probe cleans up");
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
        let _cleanup = Cleanup(at.clone());
        // As a worker killed while an action ran leaves it, with a second mount the action
        // made over it.
        std::mem::forget(mount(&lower, &layers_of(&at), &at).unwrap());
        let over = dir.path().join("over");
        std::fs::create_dir_all(&over).unwrap();
        std::mem::forget(mount(&over, &work.join("action").join("more"), &at).unwrap());
        assert!(mounted_at(&at));
        crate::prepare_work_dir(&work).unwrap();
        assert!(!mounted_at(&at));
        assert!(!work.join("action").exists());
        assert_eq!(std::fs::read(lower.join("sub/file")).unwrap(), b"entry");
    }

    #[test]
    fn an_unmount_takes_off_what_the_action_mounted_over_its_tree() {
        assert_root();
        let dir = tempfile::tempdir().unwrap();
        let (lower, over) = (dir.path().join("entry"), dir.path().join("over"));
        std::fs::create_dir_all(&lower).unwrap();
        std::fs::create_dir_all(&over).unwrap();
        let at = dir.path().join("action/root");
        std::fs::create_dir_all(&at).unwrap();
        let _cleanup = Cleanup(at.clone());
        let mounted = mount(&lower, &layers_of(&at), &at).unwrap();
        std::mem::forget(mount(&over, &dir.path().join("action/more"), &at).unwrap());
        mounted.unmount().unwrap();
        assert!(!mounted_at(&at));
        // A `layers` someone else made first is refused, not used.
        let again = dir.path().join("again/root");
        std::fs::create_dir_all(&again).unwrap();
        std::fs::create_dir_all(layers_of(&again)).unwrap();
        let refused = mount(&lower, &layers_of(&again), &again);
        assert_eq!(
            refused.map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
