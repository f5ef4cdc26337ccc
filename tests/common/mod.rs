//! Shared harness for the integration tests: starts `kiln serve` as a real process on an
//! ephemeral port with its own data directory, and offers small REAPI client helpers.
//! Every process a test starts is killed (if still running) when its handle drops.

#![allow(dead_code)]

pub mod blobs;
pub mod exec;
pub mod farm;
pub mod origin;
pub mod peers;
pub mod redis;
pub mod redis_farm;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long to wait for the server to come up or go down before failing the test.
pub const PROCESS_TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `check` until it yields a value, failing the test after [`PROCESS_TIMEOUT`]. For
/// state another process reaches on its own schedule (an upload noticed as interrupted).
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Makes sure a program from a Debian package is installed, installing the package when it is
/// missing (CI runs as root). Fails the test with a clear message when that is impossible:
/// a test that needs a real tool never silently skips.
pub fn ensure_debian_package(program: &str, package: &str) {
    // One install at a time in this process (tests run side by side), and apt waits for
    // another process's dpkg lock rather than failing at once.
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = INSTALLING.lock().unwrap_or_else(|e| e.into_inner());
    if Path::new(program).exists() {
        return;
    }
    let status = Command::new("apt-get")
        .args([
            "-o",
            "DPkg::Lock::Timeout=300",
            "install",
            "-y",
            "--no-install-recommends",
            package,
        ])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status();
    assert!(
        Path::new(program).exists(),
        "{program} is missing and `apt-get install {package}` failed ({status:?}); install it to run this test"
    );
}

/// A running `kiln serve`.
pub struct Kiln {
    child: Option<Child>,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The admin listener, `http://HOST:PORT`.
    pub admin: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

/// A data-plane backend to run the server on; every integration test runs on each (see
/// [`on_every_runtime!`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    /// glommio (io_uring).
    Glommio,
    /// monoio on io_uring.
    MonoioUring,
    /// monoio on epoll, the readiness model of macOS's kqueue.
    MonoioLegacy,
}

impl Runtime {
    /// The `--runtime` value.
    pub fn flag(self) -> &'static str {
        match self {
            Runtime::Glommio => "glommio",
            Runtime::MonoioUring => "monoio-uring",
            Runtime::MonoioLegacy => "monoio-legacy",
        }
    }
}

/// Runs a test once per data-plane backend: `async fn name(rt: Runtime) { ... }` becomes the
/// tests `name::glommio`, `name::monoio_uring` and `name::monoio_legacy`.
#[macro_export]
macro_rules! on_every_runtime {
    ($(async fn $name:ident($rt:ident: Runtime) $body:block)*) => {$(
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn on_runtime($rt: $crate::common::Runtime) $body

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn glommio() {
                on_runtime($crate::common::Runtime::Glommio).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn monoio_uring() {
                on_runtime($crate::common::Runtime::MonoioUring).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn monoio_legacy() {
                on_runtime($crate::common::Runtime::MonoioLegacy).await
            }
        }
    )*};
}

/// Asserts that `result` failed with `code` and a message containing `needle`.
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<T, tonic::Status>,
    code: tonic::Code,
    needle: &str,
) {
    let err = result.expect_err("expected an error");
    assert_eq!(err.code(), code, "{err:?}");
    assert!(
        err.message().contains(needle),
        "message {:?} lacks {needle:?}",
        err.message()
    );
}

/// The blob files (`{hash}-{size}`) under `data_dir/cas/`, with their sizes.
pub fn blob_files(data_dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut dirs = vec![data_dir.join("cas")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let (path, name) = (entry.path(), entry.file_name());
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                dirs.push(path);
            } else if name
                .to_str()
                .and_then(|n| n.split_once('-'))
                .is_some_and(|(hash, _)| {
                    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
                })
            {
                out.push((path, meta.len()));
            }
        }
    }
    out
}

/// Upload temp files left under `data_dir/tmp/` (which holds them in subdirectories); none
/// when the directory does not exist.
pub fn temp_files(data_dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(data_dir.join("tmp"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        match std::fs::read_dir(&path) {
            Ok(inner) => out.extend(inner.flatten().map(|e| e.path())),
            Err(_) => out.push(path),
        }
    }
    out
}

/// The value of the metric `name` (with its labels, as exported) on the admin listener at
/// `admin` (plain HTTP); fails the test when it is not exported.
pub async fn metric(admin: &str, name: &str) -> f64 {
    metric_if_any(admin, name)
        .await
        .unwrap_or_else(|| panic!("{name} is not exported"))
}

/// The value of the metric `name`, 0 before it is first counted.
pub async fn metric_or_zero(admin: &str, name: &str) -> f64 {
    metric_if_any(admin, name).await.unwrap_or(0.0)
}

/// The value of the metric `name`, or `None` before it is first counted.
pub async fn metric_if_any(admin: &str, name: &str) -> Option<f64> {
    let url = format!("{admin}/metrics");
    let text = tokio::task::spawn_blocking(move || {
        ureq::get(&url)
            .call()
            .expect("metrics")
            .body_mut()
            .read_to_string()
            .expect("body")
    })
    .await
    .expect("scrape");
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Runs `kiln token ARGS --data-dir DATA_DIR`; returns what it printed (a new token's secret).
pub fn kiln_token(data_dir: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("token")
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run kiln token");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("text")
        .trim()
        .to_string()
}

/// `curl` (a real HTTP client) against the admin listener: the status code and the headers
/// and body it printed.
pub fn curl(url: &str, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-D", "-", "-w", "\n%{http_code}", "--max-time", "30"])
        .args(args)
        .arg(url)
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (text, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), text.to_string())
}

/// Options for starting a server.
#[derive(Clone)]
pub struct Options {
    /// The data-plane backend.
    pub runtime: Runtime,
    /// Extra TOML appended to a generated config file.
    pub config: Option<String>,
    /// Number of shards (default 2, so cross-shard paths are always exercised).
    pub shards: Option<usize>,
    /// Listen address (default an ephemeral port on 127.0.0.1).
    pub listen: Option<String>,
    /// Extra environment variables for the server process.
    pub env: Vec<(String, String)>,
    /// The network namespace to run it in (`ip netns exec`), with its admin listener on
    /// `listen`'s address instead of 127.0.0.1 and `--insecure`.
    pub netns: Option<String>,
    /// A soft open-file limit to start the server under (the hard limit stays).
    pub soft_open_files: Option<u64>,
}

/// A `[storage]` chain sending blobs up to 64 KiB to a small-blob log of `bytes`, in segments
/// of `segment_bytes`, and larger ones to files.
pub fn log_chain(bytes: &str, segment_bytes: &str) -> String {
    format!(
        "[storage]\nchain = [\"split\"]\n[storage.tiers.split]\nkind = \"size_partition\"\nthreshold_bytes = \"64 KiB\"\nsmall = [\"memory\", \"log\"]\nlarge = [\"filesystem\"]\n[storage.tiers.log]\nkind = \"log\"\nbytes = \"{bytes}\"\nsegment_bytes = \"{segment_bytes}\"\n"
    )
}

/// A command running the kiln binary, inside the network namespace `netns` when given.
pub fn kiln_command(netns: Option<&str>) -> Command {
    match netns {
        None => Command::new(env!("CARGO_BIN_EXE_kiln")),
        Some(ns) => {
            // `ip netns exec` execs the program: the child's pid is kiln's own.
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_kiln")]);
            cmd
        }
    }
}

/// Starts `cmd` with a soft open-file limit of `soft`, its hard limit unchanged.
fn lower_open_files(cmd: &mut Command, soft: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only makes the getrlimit and setrlimit
    // system calls, on a struct on its own stack: no allocation, no lock.
    unsafe {
        cmd.pre_exec(move || kiln_worker::limits::set_soft_open_files(soft));
    }
}

impl Options {
    /// Default options on `runtime`.
    pub fn on(runtime: Runtime) -> Options {
        Options {
            runtime,
            config: None,
            shards: None,
            listen: None,
            env: Vec::new(),
            netns: None,
            soft_open_files: None,
        }
    }
}

impl Kiln {
    /// Starts a server on `data_dir` on `runtime` with default options.
    pub fn start(runtime: Runtime, data_dir: &Path) -> Kiln {
        Kiln::start_with(data_dir, Options::on(runtime))
    }

    /// Starts a server on `data_dir` on `runtime` with default options, from async code.
    pub async fn start_on(runtime: Runtime, data_dir: &Path) -> Kiln {
        Kiln::start_async(data_dir, Options::on(runtime)).await
    }

    /// Starts a server on `data_dir` from async code (the start blocks until the server is up,
    /// so it runs on a blocking thread).
    pub async fn start_async(data_dir: &Path, options: Options) -> Kiln {
        let data_dir = data_dir.to_path_buf();
        tokio::task::spawn_blocking(move || Kiln::start_with(&data_dir, options))
            .await
            .expect("start kiln")
    }

    /// Starts a server on `data_dir`.
    pub fn start_with(data_dir: &Path, options: Options) -> Kiln {
        let mut cmd = kiln_command(options.netns.as_deref());
        let listen = options.listen.as_deref().unwrap_or("127.0.0.1:0");
        let admin = match &options.netns {
            None => "127.0.0.1:0".to_string(),
            Some(_) => {
                let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
                format!("{host}:0")
            }
        };
        cmd.arg("serve");
        if options.netns.is_some() {
            cmd.arg("--insecure");
        }
        cmd.arg("--listen")
            .arg(listen)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--shards")
            .arg(options.shards.unwrap_or(2).to_string())
            .arg("--admin-listen")
            .arg(admin)
            .arg("--runtime")
            .arg(options.runtime.flag());
        if let Some(extra) = &options.config {
            // Inside the data directory, which the test's temporary directory removes (beside
            // it, a test whose data directory is the temporary directory itself left it behind).
            std::fs::create_dir_all(data_dir).expect("create the data directory");
            let path = data_dir.join("kiln-test.toml");
            std::fs::write(&path, extra).expect("write config");
            cmd.arg("--config").arg(&path);
        }
        cmd.envs(options.env.iter().map(|(k, v)| (k, v)));
        if let Some(soft) = options.soft_open_files {
            lower_open_files(&mut cmd, soft);
        }
        cmd.env("RUST_LOG", "info,kiln_dataplane=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kiln");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    log.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut kiln = Kiln {
            child: Some(child),
            addr: "127.0.0.1:0".parse().unwrap(),
            admin: String::new(),
            data_dir: data_dir.to_path_buf(),
            log,
            lines,
        };
        let line = kiln.wait_for_log("kiln listening on ");
        let addr = line
            .split("kiln listening on ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .expect("address in the listening line");
        kiln.addr = addr.parse().expect("socket address");
        kiln.admin = line
            .split("admin on ")
            .nth(1)
            .and_then(|rest| rest.split(';').next())
            .unwrap_or_default()
            .to_string();
        kiln
    }

    /// Waits until the server logs a line containing `needle` (fails the test after a timeout
    /// or if the process exits first). Returns the line.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PROCESS_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("kiln never logged {needle:?}; log:\n{}", self.log_text()),
            }
        }
    }

    /// Everything the server logged so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A gRPC channel to the server.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect to kiln")
    }

    /// A gRPC channel over TLS trusting the CA certificates in `ca`, presenting `identity`
    /// (certificate and key files) when given; the server name checked is 127.0.0.1.
    pub async fn tls_channel(
        &self,
        ca: &Path,
        identity: Option<(&Path, &Path)>,
    ) -> Result<tonic::transport::Channel, tonic::transport::Error> {
        kiln_tls::install_provider();
        let identity = identity.map(|(c, k)| {
            kiln_tls::client::ClientIdentity::from_files(c, k).expect("client identity")
        });
        let trust = kiln_tls::client::Trust::ca_file(ca).expect("CA file");
        let config = kiln_tls::client::config(trust, identity).expect("client config");
        tonic::transport::Endpoint::from_shared(self.url())
            .unwrap()
            .connect_with_connector(kiln_tls::client::Connector::new(config))
            .await
    }

    /// The sum of this server's metrics whose lines start with any of `prefixes`, read from
    /// its admin listener over HTTPS with the farm CA `ca`.
    pub async fn metric_over_tls(&self, ca: &Path, prefixes: &[&str]) -> f64 {
        let (url, ca) = (format!("{}/metrics", self.admin), ca.to_path_buf());
        let (_, text) =
            tokio::task::spawn_blocking(move || curl(&url, &["--cacert", ca.to_str().unwrap()]))
                .await
                .unwrap();
        text.lines()
            .filter(|l| prefixes.iter().any(|p| l.starts_with(p)))
            .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<f64>().ok())
            .sum()
    }

    /// A one-time join token (`kiln join-token create`) for this server, whose data is in
    /// `data`.
    pub fn join_token(&self, data: &Path) -> String {
        let made = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["join-token", "create", "--ttl", "10m", "--server-address"])
            .arg(self.addr.to_string())
            .arg("--data-dir")
            .arg(data)
            .output()
            .unwrap();
        assert!(
            made.status.success(),
            "{}",
            String::from_utf8_lossy(&made.stderr)
        );
        String::from_utf8(made.stdout).unwrap().trim().to_string()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`).
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(pid, signal);
        }
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let pid = self.child.as_ref().expect("running").id() as i32;
        // SAFETY: kill(2) with a pid we own.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }

    /// Waits for the process to exit (killing it and failing the test after a timeout).
    pub fn wait(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let pid = child.id() as i32;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(PROCESS_TIMEOUT) {
            Ok(status) => status.expect("wait for kiln"),
            Err(_) => {
                // SAFETY: kill(2) with a pid we own; the waiting thread reaps it.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
                panic!("kiln did not exit; log:\n{}", self.log_text());
            }
        }
    }

    /// SIGTERM, then wait for a clean exit, off the async runtime so that the test's own
    /// client connections keep running (they must answer the server's GOAWAY and PING).
    pub async fn stop(self) {
        tokio::task::spawn_blocking(move || self.stop_blocking())
            .await
            .expect("stop kiln");
    }

    /// SIGTERM, then wait; asserts a clean exit.
    pub fn stop_blocking(mut self) {
        self.sigterm();
        let status = self.wait();
        assert!(
            status.success(),
            "kiln exited with {status}; log:\n{}",
            self.log_text()
        );
        if std::env::var_os("KILN_TEST_LOG").is_some() {
            eprintln!("{}", self.log_text());
        }
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `127.0.0.1:PORT` for a port free now, picked at random below the kernel's ephemeral range:
/// for a server a test restarts on the same address while clients keep reconnecting to it (a
/// connection to a port inside that range with nothing listening can be given that very port
/// as its source, connecting to itself, and the restarted server could not bind it).
pub fn free_port_below_ephemeral() -> String {
    let range =
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(32768);
    let span = low.saturating_sub(10_000).max(1);
    for _ in 0..1000 {
        let port = 10_000
            + u16::from_le_bytes(uuid::Uuid::new_v4().as_bytes()[..2].try_into().unwrap()) % span;
        let addr = format!("127.0.0.1:{port}");
        if std::net::TcpListener::bind(&addr).is_ok() {
            return addr;
        }
    }
    panic!("no free port below {low}");
}
