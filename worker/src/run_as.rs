//! Running actions as another user (`worker.run_as_user`): the worker (root) keeps owning its
//! CAS, its executable cache and every input file, which stay read-only, so an action cannot
//! `chmod` an input and write through it; the action user owns only the directories of its
//! own input tree, where it creates outputs. The privilege drop happens at the last moment
//! before `exec`, after the action entered its cgroup (with `setpriv` from util-linux on the
//! cgroup path, with `setuid`/`setgid` in the child otherwise).

use crate::beneath;
use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// The user actions run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// Its name (or the number given).
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// `setpriv`, which drops to that user after the cgroup is entered (Linux).
    pub setpriv: Option<PathBuf>,
}

impl RunAs {
    /// Looks `user` up (a name, or a numeric uid) and checks that this process can become
    /// it (it must be root).
    pub fn lookup(user: &str) -> Result<RunAs, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(format!(
                "worker.run_as_user = {user:?} needs the worker to run as root (it drops to that user for each action)"
            ));
        }
        let (uid, gid) = passwd(user).ok_or_else(|| format!("no user {user:?} on this machine"))?;
        if uid == 0 {
            return Err("worker.run_as_user must not be root".into());
        }
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists());
        if cfg!(target_os = "linux") && setpriv.is_none() {
            return Err("worker.run_as_user needs setpriv (Debian package util-linux)".into());
        }
        Ok(RunAs {
            name: user.to_string(),
            uid,
            gid,
            setpriv,
        })
    }

    /// The argv prefix that runs the rest as this user (`setpriv --reuid … --`).
    pub fn setpriv_argv(&self) -> Option<Vec<String>> {
        let setpriv = self.setpriv.as_ref()?;
        Some(vec![
            setpriv.to_string_lossy().into_owned(),
            format!("--reuid={}", self.uid),
            format!("--regid={}", self.gid),
            "--clear-groups".into(),
            "--".into(),
        ])
    }

    /// Gives every directory under `root` (and `root`) to this user, leaving files and
    /// symlinks to the worker.
    ///
    /// The walk goes by directory handle, never by path: each directory is opened below the
    /// one before it without following a symlink, and given away through its handle. A
    /// process that swaps a directory of the tree for a symlink while the walk runs (another
    /// action of the same user can reach the tree) makes the walk skip that name; it cannot
    /// make this process (root) give away what the symlink points to.
    pub fn give_directories(&self, root: &Path) -> io::Result<()> {
        use rustix::fs::{fchown, Gid, Uid};
        let (uid, gid) = (Uid::from_raw(self.uid), Gid::from_raw(self.gid));
        beneath::each_directory(root, &mut |dir| Ok(fchown(dir, Some(uid), Some(gid))?))
    }
}

/// (uid, gid) of a user name or numeric uid.
fn passwd(user: &str) -> Option<(u32, u32)> {
    let name = CString::new(user).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; getpwnam_r writes into pwd and buf only.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc == 0 && !result.is_null() {
        return Some((pwd.pw_uid, pwd.pw_gid));
    }
    let uid: u32 = user.parse().ok()?;
    // SAFETY: as above, by uid.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_looked_up_and_root_is_refused() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(RunAs::lookup("nobody").unwrap_err().contains("root"));
            return;
        }
        let nobody = RunAs::lookup("nobody").unwrap();
        assert_eq!(
            RunAs::lookup(&nobody.uid.to_string()).unwrap().uid,
            nobody.uid
        );
        assert!(RunAs::lookup("root")
            .unwrap_err()
            .contains("must not be root"));
        assert!(RunAs::lookup("no-such-user-kiln").is_err());
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("a/b")).unwrap();
        std::fs::write(dir.path().join("a/file"), "x").unwrap();
        // A symlink to a directory outside the tree: the link is not followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("inner")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("a/escape")).unwrap();
        nobody.give_directories(dir.path()).unwrap();
        use std::os::unix::fs::MetadataExt;
        for kept in [outside.path().to_path_buf(), outside.path().join("inner")] {
            assert_eq!(std::fs::metadata(&kept).unwrap().uid(), 0, "{kept:?}");
        }
        assert_eq!(
            std::fs::metadata(dir.path().join("a")).unwrap().uid(),
            nobody.uid
        );
        // The root itself must not be a symlink either.
        let link_root = dir.path().join("root-link");
        std::os::unix::fs::symlink(outside.path(), &link_root).unwrap();
        assert!(nobody.give_directories(&link_root).is_err());
        assert_eq!(std::fs::metadata(outside.path()).unwrap().uid(), 0);
        assert_eq!(
            std::fs::metadata(dir.path().join("a/b")).unwrap().uid(),
            nobody.uid
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("a/file")).unwrap().uid(),
            0,
            "files stay the worker's"
        );
    }
}
