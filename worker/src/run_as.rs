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
use std::sync::{Arc, Mutex};

/// The users actions run as: one shared by every action (`run_as_user = "name"`), or one per
/// running action (`run_as_user = ["a", "b", …]`), each taken by an action while it runs, so
/// that no action can reach another's tree, outputs or processes (they are other users').
#[derive(Debug)]
pub struct ActionUsers {
    users: Vec<RunAs>,
    /// Indexes in `users` no running action holds (for users of their own).
    free: Mutex<Vec<usize>>,
    /// One permit per user of its own; `None` when one user is shared.
    permits: Option<Arc<tokio::sync::Semaphore>>,
}

impl ActionUsers {
    /// Every action runs as `user`.
    pub fn shared(user: RunAs) -> ActionUsers {
        ActionUsers {
            users: vec![user],
            free: Mutex::new(Vec::new()),
            permits: None,
        }
    }

    /// Each running action takes one of `users` (distinct users, at least one) for itself;
    /// with all taken, the next waits.
    pub fn each(users: Vec<RunAs>) -> ActionUsers {
        let n = users.len();
        ActionUsers {
            free: Mutex::new((0..n).rev().collect()),
            permits: Some(Arc::new(tokio::sync::Semaphore::new(n))),
            users,
        }
    }

    /// A user for one action, held until the lease is dropped.
    pub async fn take(self: &Arc<Self>) -> UserLease {
        let Some(permits) = &self.permits else {
            return UserLease {
                user: self.users[0].clone(),
                held: None,
            };
        };
        // The semaphore is never closed.
        let permit = permits.clone().acquire_owned().await.ok();
        let index = self
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .unwrap_or(0);
        UserLease {
            user: self.users[index].clone(),
            held: Some((self.clone(), index, permit)),
        }
    }
}

/// A user taken for one action ([`ActionUsers::take`]); given back when dropped.
#[derive(Debug)]
pub struct UserLease {
    user: RunAs,
    held: Option<(
        Arc<ActionUsers>,
        usize,
        Option<tokio::sync::OwnedSemaphorePermit>,
    )>,
}

impl UserLease {
    /// The user.
    pub fn user(&self) -> &RunAs {
        &self.user
    }
}

impl Drop for UserLease {
    fn drop(&mut self) {
        if let Some((users, index, permit)) = self.held.take() {
            users
                .free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(index);
            drop(permit);
        }
    }
}

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

    fn user(uid: u32) -> RunAs {
        RunAs {
            name: format!("u{uid}"),
            uid,
            gid: uid,
            setpriv: None,
        }
    }

    /// Users of their own: two running actions hold two users; a third waits until one is
    /// given back, and gets that one. One shared user is everyone's at once.
    #[tokio::test]
    async fn each_running_action_holds_a_user_of_its_own() {
        let users = Arc::new(ActionUsers::each(vec![user(1), user(2)]));
        let a = users.take().await;
        let b = users.take().await;
        assert_ne!(a.user().uid, b.user().uid);
        let waiting = tokio::spawn({
            let users = users.clone();
            async move { users.take().await.user().uid }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "no user free");
        let freed = b.user().uid;
        drop(b);
        assert_eq!(waiting.await.unwrap(), freed);
        drop(a);

        let shared = Arc::new(ActionUsers::shared(user(3)));
        let (x, y) = (shared.take().await, shared.take().await);
        assert_eq!((x.user().uid, y.user().uid), (3, 3));
    }

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
