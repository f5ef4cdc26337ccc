//! Keeping every process an action starts inside the action: each action runs in its own
//! session, and on Linux in its own cgroup, so that when the action ends (exit, timeout or
//! kill) every process it left behind — including ones that called `setsid` or double-forked
//! away from its process group — is killed before its outputs are read.
//!
//! Detection, best first, with the reason logged when falling back:
//! 1. cgroup2 (`cgroup.kill`, Linux 5.14+): `kiln-action-PID-ID` below the worker's own
//!    cgroup (works on hybrid hosts where cgroup2 is mounted at `/sys/fs/cgroup/unified`
//!    without controllers); cgroups left by a worker that died are killed and removed at
//!    start;
//! 2. the cgroup v1 `freezer` controller: freeze, kill every member, thaw;
//! 3. the session alone: the session's process group is killed and, on Linux, every process
//!    still in the action's session. A process that made a new session escapes this, which is
//!    why the cgroups come first. On macOS this is what runs (no cgroups there).

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long to wait for an action's processes to be gone after killing them.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// How this worker contains actions.
#[derive(Debug, Clone)]
pub enum Containment {
    /// A cgroup2 directory per action below `parent` (the worker's own cgroup).
    Cgroup2 {
        /// Where action cgroups are made.
        parent: PathBuf,
    },
    /// A cgroup v1 freezer directory per action below `parent`.
    Freezer {
        /// Where action cgroups are made.
        parent: PathBuf,
    },
    /// Sessions only.
    Session {
        /// Why no cgroup is used.
        reason: String,
    },
}

impl Containment {
    /// The best containment this host offers to this process (logged).
    pub fn detect() -> Containment {
        let found = Containment::probe();
        match &found {
            Containment::Session { reason } if cfg!(target_os = "linux") => tracing::warn!(
                reason = %reason,
                "actions are contained by their session only: a process that calls setsid can outlive its action"
            ),
            other => tracing::info!("actions are contained by {}", other.describe()),
        }
        found
    }

    fn probe() -> Containment {
        let mut why = Vec::new();
        #[cfg(target_os = "linux")]
        {
            match linux::cgroup2_parent() {
                Ok(parent) => return Containment::Cgroup2 { parent },
                Err(e) => why.push(format!("cgroup2: {e}")),
            }
            match linux::freezer_parent() {
                Ok(parent) => return Containment::Freezer { parent },
                Err(e) => why.push(format!("cgroup v1 freezer: {e}")),
            }
        }
        #[cfg(not(target_os = "linux"))]
        why.push("no cgroups on this platform".to_string());
        Containment::Session {
            reason: why.join("; "),
        }
    }

    /// Sessions only (for tests of the fallback, and where cgroups are not wanted).
    pub fn session_only(reason: &str) -> Containment {
        Containment::Session {
            reason: reason.to_string(),
        }
    }

    /// A short description for the log.
    pub fn describe(&self) -> String {
        match self {
            Containment::Cgroup2 { parent } => format!("cgroup2 under {}", parent.display()),
            Containment::Freezer { parent } => {
                format!("cgroup v1 freezer under {}", parent.display())
            }
            Containment::Session { reason } => format!("sessions only ({reason})"),
        }
    }

    /// Whether a process that leaves the action's session is still contained.
    pub fn holds_new_sessions(&self) -> bool {
        !matches!(self, Containment::Session { .. })
    }

    /// A fresh jail for one action; `id` names it (unique among running actions).
    pub fn jail(&self, id: &str) -> io::Result<Jail> {
        let dir = match self {
            Containment::Cgroup2 { parent } | Containment::Freezer { parent } => {
                let dir = parent.join(format!("{}{id}", action_prefix(std::process::id())));
                std::fs::create_dir(&dir)?;
                Some(dir)
            }
            Containment::Session { .. } => None,
        };
        Ok(Jail {
            dir,
            freezer: matches!(self, Containment::Freezer { .. }),
            leader: None,
        })
    }
}

/// What `/bin/sh` runs to start an action inside its cgroup: `$0` is the cgroup's
/// `cgroup.procs` ("0" moves the writing process, in cgroup v1 and v2 alike), `$1` the soft
/// open-file limit the action gets (empty: the process's own, see [`crate::limits`]), the
/// rest the action's argv. 125 if either cannot be set (the program is then not run).
const ENTER: &str = r#"echo 0 > "$0" || { echo "kiln: cannot enter the action's cgroup" >&2; exit 125; }; [ -z "$1" ] || ulimit -S -n "$1" || { echo "kiln: cannot set the action's open-file limit" >&2; exit 125; }; shift; exec "$@""#;

/// Where `program` is: a path with a `/` relative to `cwd` (or absolute), else the first
/// executable file of that name on `path` (the action's PATH). The action's own error if it is
/// nowhere, before anything is started.
fn find_program(program: &str, cwd: &Path, path: Option<&str>) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        let p = cwd.join(program);
        return if executable(&p) {
            Ok(p)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{} is not an executable file", p.display()),
            ))
        };
    }
    path.unwrap_or("/usr/bin:/bin")
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| cwd.join(d).join(program))
        .find(|p| executable(p))
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{program} is not on the action's PATH"),
            )
        })
}

/// The name every action cgroup of the worker with this pid starts with.
fn action_prefix(pid: u32) -> String {
    format!("kiln-action-{pid}-")
}

/// One action's processes.
#[derive(Debug)]
pub struct Jail {
    dir: Option<PathBuf>,
    freezer: bool,
    leader: Option<i32>,
}

impl Jail {
    /// The command that starts `program` (as the action named it: absolute, relative to
    /// `cwd`, or a bare name looked up on the action's `path`) with `args`, inside this jail
    /// from its first instruction on, so nothing it starts can be outside.
    ///
    /// With a cgroup, a `/bin/sh` enters the cgroup and `exec`s the program: the spawn stays on
    /// the `posix_spawn`/`vfork` fast path. Writing the cgroup from a `pre_exec` hook instead
    /// forces `fork()`, whose copy-on-write faults in a busy multi-threaded server cost
    /// milliseconds per action (measured: Execute throughput fell by 3-4x). Without a cgroup
    /// the program runs in a new session (`setsid` in `pre_exec`, so `fork()`).
    pub fn command(
        &self,
        program: &str,
        args: &[String],
        cwd: &Path,
        path: Option<&str>,
        run_as: Option<&crate::run_as::RunAs>,
    ) -> io::Result<tokio::process::Command> {
        let found = find_program(program, cwd, path)?;
        let open_files = crate::limits::for_actions();
        match &self.dir {
            Some(dir) => {
                let mut command = tokio::process::Command::new("/bin/sh");
                command
                    .arg("-c")
                    .arg(ENTER)
                    .arg(dir.join("cgroup.procs"))
                    .arg(open_files.map(|n| n.to_string()).unwrap_or_default())
                    // Dropped to the action user after the cgroup is entered (only root may
                    // move a process into it).
                    .args(run_as.and_then(|r| r.setpriv_argv()).unwrap_or_default())
                    .arg(program)
                    .args(args)
                    .process_group(0);
                Ok(command)
            }
            None => {
                let mut command = tokio::process::Command::new(found);
                command.arg0(program).args(args);
                if let Some(r) = run_as {
                    command.uid(r.uid).gid(r.gid);
                }
                // SAFETY: the closure runs between fork and exec and makes only the setsid,
                // getrlimit and setrlimit system calls: no allocation, no lock.
                unsafe {
                    command.pre_exec(move || {
                        if libc::setsid() < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if let Some(soft) = open_files {
                            crate::limits::set_soft_open_files(soft)?;
                        }
                        Ok(())
                    });
                }
                Ok(command)
            }
        }
    }

    /// Records the session leader's pid once it is spawned.
    pub fn started(&mut self, pid: Option<u32>) {
        self.leader = pid.map(|p| p as i32);
    }

    /// Kills every process of the action and waits (bounded) until none is left. Blocking:
    /// call from a blocking thread.
    pub fn kill_all(&self) -> io::Result<()> {
        match &self.dir {
            // The cgroup holds every process, the leader included; killing by pid could hit
            // an unrelated group that reused a reaped leader's pid.
            Some(dir) => kill_cgroup(dir, self.freezer),
            None => {
                if let Some(pid) = self.leader {
                    // SAFETY: killpg on the process group the leader's setsid made.
                    unsafe {
                        libc::killpg(pid, libc::SIGKILL);
                    }
                    #[cfg(target_os = "linux")]
                    linux::kill_session(pid);
                }
                Ok(())
            }
        }
    }
}

impl Drop for Jail {
    /// Removes the cgroup (an empty one: call [`Jail::kill_all`] first, off the event loop).
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            if let Err(e) = std::fs::remove_dir(dir) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove an action's cgroup (processes stuck in it?)");
            }
        }
    }
}

/// Kills every process in a cgroup (and its child cgroups) and waits, bounded, until none is
/// left: `cgroup.kill` on cgroup2; on v1, freeze (so nothing forks meanwhile), kill every
/// member, thaw, and repeat until empty.
fn kill_cgroup(dir: &Path, freezer: bool) -> io::Result<()> {
    let deadline = Instant::now() + KILL_WAIT;
    if !freezer {
        std::fs::write(dir.join("cgroup.kill"), "1")?;
        return wait_empty(dir, deadline);
    }
    loop {
        std::fs::write(dir.join("freezer.state"), "FROZEN")?;
        // FREEZING until every task stopped: only then is the member list complete.
        while std::fs::read_to_string(dir.join("freezer.state"))?.trim() != "FROZEN" {
            if Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let pids = members(dir)?;
        for pid in &pids {
            // SAFETY: plain kill(2) of a pid listed in the action's cgroup.
            unsafe {
                libc::kill(*pid, libc::SIGKILL);
            }
        }
        std::fs::write(dir.join("freezer.state"), "THAWED")?;
        if pids.is_empty() || wait_empty(dir, Instant::now() + Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return wait_empty(dir, deadline);
        }
    }
}

/// Removes the (now empty) cgroups an action made inside its own, deepest first.
fn remove_children(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_children(&e.path());
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// The pids in a cgroup.
fn members(dir: &Path) -> io::Result<Vec<i32>> {
    Ok(std::fs::read_to_string(dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Waits until a cgroup has no process left.
/// Whether a cgroup still holds a process: cgroup2's `cgroup.events` counts child cgroups
/// too (an action may make its own); v1 has only the member list.
fn populated(dir: &Path) -> io::Result<bool> {
    match std::fs::read_to_string(dir.join("cgroup.events")) {
        Ok(events) => Ok(events.lines().any(|l| l.trim() == "populated 1")),
        Err(_) => Ok(!members(dir)?.is_empty()),
    }
}

fn wait_empty(dir: &Path, deadline: Instant) -> io::Result<()> {
    let mut pause = Duration::from_micros(100);
    loop {
        if !populated(dir)? {
            remove_children(dir);
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("processes still in {} after SIGKILL", dir.display()),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::path::PathBuf;

    /// Where a cgroup filesystem of `fstype` (and, for v1, with `option`) is mounted.
    fn mount_point(fstype: &str, option: Option<&str>) -> io::Result<PathBuf> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        for line in info.lines() {
            // "... mount_point options - fstype source super_options"
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let mut r = right.split_whitespace();
            if r.next() != Some(fstype) {
                continue;
            }
            let super_options = r.nth(1).unwrap_or("");
            if option.is_some_and(|o| !super_options.split(',').any(|s| s == o)) {
                continue;
            }
            if let Some(mount) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mount));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!(
                "no {fstype} mount{}",
                option.map(|o| format!(" with {o}")).unwrap_or_default()
            ),
        ))
    }

    /// This process's cgroup path in a hierarchy: `0::/x` for cgroup2, `N:freezer:/x` for v1.
    fn own_cgroup(controller: Option<&str>) -> io::Result<String> {
        let text = std::fs::read_to_string("/proc/self/cgroup")?;
        for line in text.lines() {
            let mut parts = line.splitn(3, ':');
            let (_, list, path) = (parts.next(), parts.next(), parts.next());
            let matches = match controller {
                None => list == Some(""),
                Some(c) => list.is_some_and(|l| l.split(',').any(|x| x == c)),
            };
            if let (true, Some(path)) = (matches, path) {
                return Ok(path.to_string());
            }
        }
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            "not in such a cgroup",
        ))
    }

    /// Checks that this process can make action cgroups in `parent` (which must offer
    /// `probe`), and removes what workers that died left there.
    fn usable(parent: PathBuf, probe: &str) -> io::Result<PathBuf> {
        static PROBES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let test = parent.join(format!("kiln-probe-{}-{n}", std::process::id()));
        match std::fs::create_dir(&test) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create a cgroup in {}: {e}", parent.display()),
                ))
            }
        }
        let offered = test.join(probe).exists();
        let _ = std::fs::remove_dir(&test);
        if !offered {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{probe} is missing (kernel too old?)"),
            ));
        }
        sweep(&parent);
        Ok(parent)
    }

    /// Kills and removes the action cgroups of workers that are no longer running (a worker
    /// that crashed leaves its actions' cgroups, perhaps with processes in them).
    pub(super) fn sweep(parent: &std::path::Path) {
        let Ok(entries) = std::fs::read_dir(parent) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = name
                .strip_prefix("kiln-action-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if std::path::Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let dir = e.path();
            let freezer = dir.join("freezer.state").exists();
            if super::kill_cgroup(&dir, freezer).is_ok() {
                let _ = std::fs::remove_dir(&dir);
            }
        }
    }

    /// The worker's own cgroup2 directory, if actions can be contained there.
    pub fn cgroup2_parent() -> io::Result<PathBuf> {
        let mount = mount_point("cgroup2", None)?;
        let own = own_cgroup(None)?;
        usable(mount.join(own.trim_start_matches('/')), "cgroup.kill")
    }

    /// The worker's own cgroup v1 freezer directory, if actions can be contained there.
    pub fn freezer_parent() -> io::Result<PathBuf> {
        let mount = mount_point("cgroup", Some("freezer"))?;
        let own = own_cgroup(Some("freezer"))?;
        usable(mount.join(own.trim_start_matches('/')), "freezer.state")
    }

    /// Kills every process whose session is `sid`.
    pub fn kill_session(sid: i32) {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // After "pid (comm) ": state ppid pgrp session ...
            let session = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(3))
                .and_then(|s| s.parse::<i32>().ok());
            if session == Some(sid) {
                // SAFETY: plain kill(2) of a process in the action's session.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn cgroups_of_a_worker_that_died_are_killed_and_removed_at_start() {
        let Containment::Cgroup2 { parent } = Containment::detect() else {
            eprintln!("SKIPPED: no cgroup2 for actions here");
            return;
        };
        // A private parent, so that other tests starting workers in parallel do not sweep
        // what this one sets up.
        let private = parent.join(format!("kiln-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&private).unwrap();
        // A pid that is certainly not running any more.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        let dead = gone.id();
        gone.wait().unwrap();
        let stale = private.join(format!("{}left", action_prefix(dead)));
        std::fs::create_dir(&stale).unwrap();
        // An orphan of that worker's action, still running.
        let procs = stale.join("cgroup.procs");
        let mut orphan = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("echo 0 > {} && exec sleep 60", procs.display()))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while members(&stale).unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the orphan never joined");
            std::thread::sleep(Duration::from_millis(5));
        }
        linux::sweep(&private);
        let removed = !stale.exists();
        let status = orphan.wait().unwrap();
        std::fs::remove_dir(&private).unwrap();
        assert!(removed, "the stale cgroup is removed");
        assert!(!status.success(), "the orphan was killed: {status:?}");
    }

    #[test]
    fn the_v1_freezer_kills_a_forking_action() {
        let Ok(parent) = linux::freezer_parent() else {
            eprintln!("SKIPPED: no cgroup v1 freezer here");
            return;
        };
        let dir = parent.join(format!("kiln-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        // A process that keeps forking children into the cgroup.
        let procs = dir.join("cgroup.procs");
        let mut forker = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo 0 > {} && while :; do sleep 30 & done",
                procs.display()
            ))
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while members(&dir).unwrap().len() < 5 {
            assert!(Instant::now() < deadline, "the forker never got going");
            std::thread::sleep(Duration::from_millis(5));
        }
        kill_cgroup(&dir, true).unwrap();
        assert!(members(&dir).unwrap().is_empty());
        let _ = forker.wait();
        std::fs::remove_dir(&dir).unwrap();
    }

    /// Once the process raised its open-file limit, actions still get the one it started
    /// with: in a cgroup (set by the entering shell) and in a session (set before `exec`).
    /// Lowers this test process's soft limit first (raised again to the hard limit after).
    #[tokio::test]
    async fn actions_get_the_open_file_limit_the_process_started_with() {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit on a struct on this stack frame.
        assert_eq!(
            unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) },
            0
        );
        let low = (limit.rlim_max / 2).min(4096);
        crate::limits::set_soft_open_files(low).unwrap();
        crate::limits::raise_open_files();
        assert_eq!(crate::limits::for_actions(), Some(low));
        for containment in [Containment::detect(), Containment::session_only("a test")] {
            let id = format!("limits-{}", uuid::Uuid::new_v4().simple());
            let mut jail = containment.jail(&id).unwrap();
            let args = ["-c".to_string(), "ulimit -S -n".to_string()];
            let mut command = jail
                .command("sh", &args, Path::new("/"), Some("/usr/bin:/bin"), None)
                .unwrap();
            command.stdout(std::process::Stdio::piped());
            let child = command.spawn().unwrap();
            jail.started(child.id());
            let out = child.wait_with_output().await.unwrap();
            jail.kill_all().unwrap();
            drop(jail);
            assert!(out.status.success(), "{}: {out:?}", containment.describe());
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("{low}\n"),
                "{}",
                containment.describe()
            );
        }
    }
}
