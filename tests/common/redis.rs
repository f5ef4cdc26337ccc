//! A real `redis-server` for a test (Debian's `redis-server`; `.ci/run` installs it): on an
//! ephemeral port of 127.0.0.1, nothing persisted, stopped (and its directory removed) when
//! dropped.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One `redis-server`.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    dir: tempfile::TempDir,
    /// In cluster mode.
    cluster: bool,
}

impl RedisServer {
    /// Starts one on a free port.
    pub fn start() -> RedisServer {
        RedisServer::start_with(false)
    }

    /// Starts one on a free port, in cluster mode with `cluster`.
    pub fn start_with(cluster: bool) -> RedisServer {
        for _ in 0..20 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut server = RedisServer {
                child: None,
                port,
                dir: tempfile::tempdir().unwrap(),
                cluster,
            };
            // A port taken meanwhile by another process: another port.
            if server.spawn() {
                return server;
            }
        }
        panic!("no free port for redis-server after 20 tries");
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server on its port; `false` if it exited (the port was taken).
    fn spawn(&mut self) -> bool {
        let mut command = Command::new("redis-server");
        // The child dies with the thread that started it (the test's own, which outlives the
        // server), so a test killed outright leaves no server behind. Linux only.
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .args(if self.cluster {
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ][..]
            } else {
                &[][..]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "redis-server is needed for this test: apt-get install redis-server (.ci/run does)",
            );
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            // Exited (the port was taken, perhaps by another Redis that would answer PING).
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("redis-server on port {} did not answer", self.port);
    }

    /// Whether it answers PING.
    pub fn ping(&self) -> bool {
        self.command("PING\r\n")
            .is_some_and(|r| r.starts_with("+PONG"))
    }

    /// Sends one command in the inline protocol and returns the first reply read.
    pub fn command(&self, line: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(line.as_bytes()).ok()?;
        let mut buf = vec![0u8; 64 << 10];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Freezes the server (SIGSTOP): connections open, nothing answered.
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws it (SIGCONT).
    pub fn resume(&mut self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: kill has no preconditions; the pid is our own child's, not yet reaped.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// Stops the server (as a crash would: at once).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "port {} was taken while Redis was down",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of `n` masters (no replicas), each a [`RedisServer`] in cluster mode,
/// joined with `redis-cli --cluster create` and ready (every slot served) when returned.
pub struct RedisCluster {
    /// The nodes.
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `n` nodes and makes them one cluster.
    pub fn start(n: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n).map(|_| RedisServer::start_with(true)).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is needed for this test (Debian's redis-tools, with redis-server)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while !nodes.iter().all(|s| {
            s.command("CLUSTER INFO\r\n")
                .is_some_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(Instant::now() < deadline, "the cluster did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        RedisCluster { nodes }
    }

    /// `redis://` of its first node.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }
}
