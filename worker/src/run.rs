//! Running an action's command: a clean environment holding only what the Command sets, its
//! working directory, stdout and stderr to files, in its own session and (where the host has
//! one) its own cgroup, so that every process it started is gone when [`run`] returns — on
//! exit, timeout or kill alike (see [`crate::contain`]).

use crate::contain::Containment;
use crate::error::ActionError;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;
use tokio::sync::oneshot;

/// What to run.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// argv; the first is the program: absolute, relative to the working directory, or a bare
    /// name looked up on the action's PATH.
    pub argv: Vec<String>,
    /// The whole environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub cwd: PathBuf,
    /// Where stdout goes.
    pub stdout: PathBuf,
    /// Where stderr goes.
    pub stderr: PathBuf,
    /// Kill after this long.
    pub timeout: Duration,
    /// Names the action's cgroup: unique among the worker's running actions.
    pub id: String,
    /// Runs the action as this user.
    pub run_as: Option<crate::run_as::RunAs>,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunEnd {
    /// It exited (128 + signal number if a signal ended it).
    Exited(i32),
    /// It ran past its timeout and was killed.
    TimedOut,
    /// It was killed on request.
    Killed,
}

/// Runs `spec` until it exits, times out, or `kill` fires; then kills whatever the action
/// left running and returns once it is gone.
pub async fn run(
    spec: &RunSpec,
    contain: &Containment,
    kill: oneshot::Receiver<()>,
) -> Result<RunEnd, ActionError> {
    let program = spec
        .argv
        .first()
        .ok_or_else(|| ActionError::BadInput("the Command has no arguments".into()))?;
    let stdout = std::fs::File::create(&spec.stdout)
        .map_err(|e| ActionError::io("create", &spec.stdout, e))?;
    let stderr = std::fs::File::create(&spec.stderr)
        .map_err(|e| ActionError::io("create", &spec.stderr, e))?;
    let mut jail = contain
        .jail(&spec.id)
        .map_err(|e| ActionError::io("create the cgroup of", &spec.cwd, e))?;
    let path = spec
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str());
    let spawn_error = |source| ActionError::Spawn {
        program: program.clone(),
        source,
    };
    let mut command = jail
        .command(
            program,
            &spec.argv[1..],
            &spec.cwd,
            path,
            spec.run_as.as_ref(),
        )
        .map_err(spawn_error)?;
    command
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = tokio::task::spawn_blocking(move || drop(jail)).await;
            return Err(spawn_error(e));
        }
    };
    jail.started(child.id());
    let end = tokio::select! {
        status = child.wait() => status
            .map(|status| {
                use std::os::unix::process::ExitStatusExt;
                RunEnd::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
            })
            .map_err(|e| ActionError::io("wait for", &spec.cwd, e)),
        _ = tokio::time::sleep(spec.timeout) => Ok(RunEnd::TimedOut),
        _ = kill => Ok(RunEnd::Killed),
    };
    // The leader first, by its pid (safe: it is our child and not yet reaped, so the pid
    // cannot have been reused). A kill or timeout can fire before the leader has entered
    // its cgroup; the cgroup kill below would then find the cgroup empty and the leader
    // would enter it afterwards and run on. Before it enters, it has started nothing else.
    // (Fails harmlessly when the leader has already been reaped.)
    let _ = child.start_kill();
    // Whatever the action left running (a background job, a daemon that called setsid) goes
    // now, before any output is read, on every path; the jail is removed on the same
    // blocking thread (never on the event loop).
    let killed = tokio::task::spawn_blocking(move || {
        let killed = jail.kill_all();
        drop(jail);
        killed
    })
    .await
    .map_err(|e| ActionError::io("kill the processes of", &spec.cwd, std::io::Error::other(e)))?;
    let _ = child.wait().await;
    let end = end?;
    killed.map_err(|e| ActionError::io("kill the processes of", &spec.cwd, e))?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn contain() -> Containment {
        Containment::detect()
    }

    /// Whether `pid` is a live process (not gone, not a zombie).
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                stat.rsplit(") ")
                    .next()
                    .is_some_and(|rest| !rest.starts_with('Z'))
            })
            .unwrap_or(false)
    }

    /// The pid a test script wrote to `pid`.
    fn pid_in(dir: &Path) -> i32 {
        std::fs::read_to_string(dir.join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// Waits (bounded) until `pid` is gone or a zombie.
    async fn wait_gone(pid: i32, why: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while alive(pid) {
            assert!(std::time::Instant::now() < deadline, "{why}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_process_that_left_the_session_is_gone_when_run_returns() {
        let contain = contain();
        if !contain.holds_new_sessions() {
            eprintln!(
                "SKIPPED: no cgroup for actions here: {}",
                contain.describe()
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = oneshot::channel();
        // A daemon in a new session (out of the action's process group and session) that
        // keeps writing after the action exits.
        let s = spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "setsid sh -c 'while :; do echo more >> grown; sleep 0.01; done' & echo $! > pid; sleep 0.2",
            ],
            Duration::from_secs(30),
        );
        assert_eq!(run(&s, &contain, rx).await.unwrap(), RunEnd::Exited(0));
        let pid = pid_in(dir.path());
        // kill_all waited until the cgroup was empty: no waiting here.
        assert!(!alive(pid), "the setsid daemon {pid} outlived its action");
        let len = std::fs::metadata(dir.path().join("grown")).unwrap().len();
        assert!(len > 0, "the daemon ran");
    }

    #[tokio::test]
    async fn the_session_fallback_kills_background_jobs_of_the_session() {
        let contain = Containment::session_only("test");
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = oneshot::channel();
        let s = spec(
            dir.path(),
            &["sh", "-c", "(trap '' HUP; sleep 30) & echo $! > pid"],
            Duration::from_secs(30),
        );
        assert_eq!(run(&s, &contain, rx).await.unwrap(), RunEnd::Exited(0));
        let pid = pid_in(dir.path());
        wait_gone(pid, "the background job survived").await;
    }

    fn spec(dir: &Path, argv: &[&str], timeout: Duration) -> RunSpec {
        RunSpec {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: vec![
                ("PATH".into(), "/bin:/usr/bin".into()),
                ("GREETING".into(), "hi".into()),
            ],
            cwd: dir.to_path_buf(),
            stdout: dir.join("out"),
            stderr: dir.join("err"),
            timeout,
            id: uuid::Uuid::new_v4().simple().to_string(),
            run_as: None,
        }
    }

    #[tokio::test]
    async fn environment_is_exactly_the_commands_and_exit_codes_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = oneshot::channel();
        let s = spec(
            dir.path(),
            &["sh", "-c", "echo $GREETING $HOME; exit 3"],
            Duration::from_secs(30),
        );
        assert_eq!(run(&s, &contain(), rx).await.unwrap(), RunEnd::Exited(3));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out")).unwrap(),
            "hi\n",
            "HOME is not inherited"
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let (_tx, rx) = oneshot::channel();
        // A background grandchild that would outlive its parent if only the parent were killed.
        let s = spec(
            dir.path(),
            &[
                "sh",
                "-c",
                "(sleep 30; echo late > late) & echo $! > pid; sleep 30",
            ],
            Duration::from_millis(300),
        );
        assert_eq!(run(&s, &contain(), rx).await.unwrap(), RunEnd::TimedOut);
        let pid = pid_in(dir.path());
        // SIGKILL lands asynchronously without a cgroup; gone (or a zombie) soon after.
        wait_gone(pid, "the background process was not killed").await;
    }

    #[tokio::test]
    async fn relative_programs_resolve_against_the_working_directory_and_missing_ones_fail() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let tool = dir.path().join("bin/tool");
        std::fs::write(&tool, "#!/bin/sh\necho tool $0\n").unwrap();
        std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (_tx, rx) = oneshot::channel();
        assert_eq!(
            run(
                &spec(dir.path(), &["bin/tool"], Duration::from_secs(30)),
                &contain(),
                rx
            )
            .await
            .unwrap(),
            RunEnd::Exited(0)
        );
        // A script sees a path to itself that works from the working directory ("bin/tool"
        // as the action named it, or that resolved against the working directory).
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        let seen = out.trim_end().strip_prefix("tool ").unwrap_or_default();
        assert!(
            seen.ends_with("bin/tool") && dir.path().join(seen).is_file(),
            "{out}"
        );
        let (_tx, rx) = oneshot::channel();
        let missing = run(
            &spec(dir.path(), &["no-such-program"], Duration::from_secs(30)),
            &contain(),
            rx,
        )
        .await;
        assert!(
            matches!(missing, Err(ActionError::Spawn { .. })),
            "{missing:?}"
        );
    }

    #[tokio::test]
    async fn kill_stops_it() {
        // The kill is sent at once, so it often lands while the leader is still entering its
        // cgroup (the case that once left `sleep` running outside the kill); repeated to meet
        // that interleaving on every run.
        for _ in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let (tx, rx) = oneshot::channel();
            let s = spec(dir.path(), &["sleep", "30"], Duration::from_secs(60));
            let running = tokio::spawn(async move { run(&s, &contain(), rx).await });
            tx.send(()).unwrap();
            assert_eq!(running.await.unwrap().unwrap(), RunEnd::Killed);
        }
    }
}
