//! Running an action's command: a clean environment holding only what the Command sets, its
//! working directory, stdout and stderr to files, its own process group so that a timeout or a
//! kill takes every process it started.

use crate::error::ActionError;
use std::path::{Path, PathBuf};
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

/// Runs `spec` until it exits, times out, or `kill` fires.
pub async fn run(spec: &RunSpec, kill: oneshot::Receiver<()>) -> Result<RunEnd, ActionError> {
    let program = spec
        .argv
        .first()
        .ok_or_else(|| ActionError::BadInput("the Command has no arguments".into()))?;
    let resolved = if program.contains('/') && Path::new(program).is_relative() {
        spec.cwd.join(program)
    } else {
        PathBuf::from(program)
    };
    let stdout = std::fs::File::create(&spec.stdout)
        .map_err(|e| ActionError::io("create", &spec.stdout, e))?;
    let stderr = std::fs::File::create(&spec.stderr)
        .map_err(|e| ActionError::io("create", &spec.stderr, e))?;
    let mut command = tokio::process::Command::new(&resolved);
    command
        .arg0(program)
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|source| ActionError::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();
    let kill_group = || {
        if let Some(pid) = pid {
            // SAFETY: killpg on the group we created for this child.
            unsafe {
                libc::killpg(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    };
    let end = tokio::select! {
        status = child.wait() => {
            let status = status.map_err(|e| ActionError::io("wait for", &resolved, e))?;
            // The leader exited; take down anything it left running in its group.
            kill_group();
            use std::os::unix::process::ExitStatusExt;
            RunEnd::Exited(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
        }
        _ = tokio::time::sleep(spec.timeout) => {
            kill_group();
            let _ = child.wait().await;
            RunEnd::TimedOut
        }
        _ = kill => {
            kill_group();
            let _ = child.wait().await;
            RunEnd::Killed
        }
    };
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(run(&s, rx).await.unwrap(), RunEnd::Exited(3));
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
        assert_eq!(run(&s, rx).await.unwrap(), RunEnd::TimedOut);
        let pid: i32 = std::fs::read_to_string(dir.path().join("pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SIGKILL lands asynchronously; the process must be gone (or a zombie) soon after.
        let running = |pid: i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|stat| {
                    stat.rsplit(") ")
                        .next()
                        .is_some_and(|rest| !rest.starts_with('Z'))
                })
                .unwrap_or(false)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while running(pid) {
            assert!(
                std::time::Instant::now() < deadline,
                "the background process was not killed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
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
                rx
            )
            .await
            .unwrap(),
            RunEnd::Exited(0)
        );
        // A script sees the path it was run by (resolved against the working directory).
        let out = std::fs::read_to_string(dir.path().join("out")).unwrap();
        assert!(
            out.starts_with("tool ") && out.trim_end().ends_with("/bin/tool"),
            "{out}"
        );
        let (_tx, rx) = oneshot::channel();
        let missing = run(
            &spec(dir.path(), &["no-such-program"], Duration::from_secs(30)),
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
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = oneshot::channel();
        let s = spec(dir.path(), &["sleep", "30"], Duration::from_secs(60));
        let running = tokio::spawn(async move { run(&s, rx).await });
        tx.send(()).unwrap();
        assert_eq!(running.await.unwrap().unwrap(), RunEnd::Killed);
    }
}
