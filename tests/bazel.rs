//! A real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3) against `kiln serve` (see
//! `tests/bazel/README.md`): as a remote cache — the first build uploads everything (all
//! misses, salted per run), and after `bazel clean` the second build is entirely remote cache
//! hits — and as a remote executor, where `bazel test` of the genrules, the C library and
//! binary and a C test runs every action on Kiln's embedded worker, then a clean rerun is all
//! cache hits; the same against a server with two `kiln worker`s; with `[auth]`, with a
//! bearer token and without one; and a build whose server is killed and restarted while it
//! runs.

#[macro_use]
mod common;

use common::Kiln;
use std::path::Path;
use std::process::Command;

const BAZEL: &str = "/usr/bin/bazel-4";

/// Runs `run_bazel.sh` against `endpoint` with `extra` Bazel flags; `remote_execution` adds
/// `--remote_executor` and runs `bazel test`, requiring every action of the first run to
/// execute remotely. Returns stdout and stderr.
async fn run_bazel(
    endpoint: String,
    scratch: std::path::PathBuf,
    remote_execution: bool,
    extra: Vec<String>,
) -> (bool, String, String) {
    run_bazel_with(endpoint, scratch, remote_execution, extra, Vec::new()).await
}

/// [`run_bazel`] with `env` set for the script.
async fn run_bazel_with(
    endpoint: String,
    scratch: std::path::PathBuf,
    remote_execution: bool,
    extra: Vec<String>,
    env: Vec<(String, String)>,
) -> (bool, String, String) {
    common::ensure_debian_package(BAZEL, "bazel-bootstrap");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel/run_bazel.sh");
    let salt = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4());
    let output = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .arg(&endpoint)
            .arg(salt)
            .arg(&scratch)
            .args(&extra)
            .env("BAZEL", BAZEL)
            .env("REQUIRE_FIRST_MISS", "1")
            .envs(env);
        if remote_execution {
            cmd.arg(format!("--remote_executor={endpoint}"))
                .env("BAZEL_COMMAND", "test")
                .env("REQUIRE_REMOTE", "1");
        }
        cmd.output().expect("run run_bazel.sh")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    println!("{stdout}");
    let passed = output.status.success() && stdout.contains("KILN_BAZEL_RESULT PASS");
    (passed, stdout, stderr)
}

/// A fresh Kiln (with `config`), and `run_bazel` against it; asserts the run passed.
async fn bazel_against_kiln(rt: common::Runtime, remote_execution: bool) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let kiln = tokio::task::spawn_blocking(move || Kiln::start(rt, &data_dir))
        .await
        .unwrap();
    let endpoint = format!("grpc://{}", kiln.addr);
    let (passed, stdout, stderr) = run_bazel(
        endpoint,
        dir.path().join("scratch"),
        remote_execution,
        Vec::new(),
    )
    .await;
    assert!(
        passed,
        "bazel run failed:\n{stdout}\n{stderr}\nkiln log:\n{}",
        kiln.log_text()
    );
    kiln.stop().await;
}

// With [auth] on: Bazel with a bearer token in --remote_header executes remotely and then
// hits the cache; without the token its remote calls are refused as unauthenticated. (Over
// plain gRPC on loopback: Debian's Bazel 4.2.3 cannot open grpcs:// at all, its netty being
// built without JDK ALPN; TLS is tested with Kiln's own clients and curl.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_with_a_bearer_token_and_without() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let token = common::kiln_token(
        &data_dir,
        &[
            "create",
            "--name",
            "bazel",
            "--role",
            "cache-read,cache-write,execute",
        ],
    );
    let options = common::Options {
        config: Some("[auth]\nenabled = true\n".into()),
        ..common::Options::on(common::Runtime::Glommio)
    };
    let kiln = Kiln::start_async(&data_dir, options).await;
    let endpoint = format!("grpc://{}", kiln.addr);
    let header = format!("--remote_header=authorization=Bearer {token}");
    let (passed, stdout, stderr) = run_bazel(
        endpoint.clone(),
        dir.path().join("with"),
        true,
        vec![header],
    )
    .await;
    assert!(
        passed,
        "with the token:\n{stdout}\n{stderr}\nkiln log:\n{}",
        kiln.log_text()
    );
    let (passed, stdout, stderr) =
        run_bazel(endpoint, dir.path().join("without"), true, Vec::new()).await;
    let logs =
        std::fs::read_to_string(dir.path().join("without/logs/build1.log")).unwrap_or_default();
    assert!(
        !passed,
        "without a token Bazel must fail:\n{stdout}\n{stderr}"
    );
    assert!(
        logs.contains("UNAUTHENTICATED") && logs.contains("credentials required"),
        "{logs}\n{stdout}\n{stderr}"
    );
    kiln.stop().await;
}

// The farm's shape: `kiln serve` with its embedded worker off and two `kiln worker`
// processes (each with its own CAS, work directory and directory cache). Bazel's actions run
// on them and the clean rerun is all cache hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_runs_on_a_server_with_two_workers() {
    let rt = common::Runtime::Glommio;
    let dir = tempfile::tempdir().unwrap();
    let options = common::Options {
        config: Some("[worker]\nembedded = false\n".into()),
        ..common::Options::on(rt)
    };
    let kiln = Kiln::start_async(&dir.path().join("server"), options).await;
    let mut workers = Vec::new();
    for name in ["w1", "w2"] {
        let (addr, wdir) = (kiln.addr, dir.path().join(name));
        workers.push(
            tokio::task::spawn_blocking(move || {
                common::exec::Worker::start_at(addr, rt, &wdir, name, &[])
            })
            .await
            .unwrap(),
        );
    }
    let endpoint = format!("grpc://{}", kiln.addr);
    let (passed, stdout, stderr) =
        run_bazel(endpoint, dir.path().join("scratch"), true, Vec::new()).await;
    assert!(
        passed,
        "bazel run failed:\n{stdout}\n{stderr}\nkiln log:\n{}",
        kiln.log_text()
    );
    // Every action ran on one of the two workers, each laying its inputs out through its
    // directory cache (as the workers reported).
    let mut laid_out = 0.0;
    for name in ["w1", "w2"] {
        for counter in ["hits", "misses"] {
            let metric = format!("kiln_worker_dircache_{counter}_total{{worker=\"{name}\"}}");
            laid_out += common::metric_if_any(&kiln.admin, &metric)
                .await
                .unwrap_or(0.0);
        }
    }
    let executed = common::metric(
        &kiln.admin,
        "kiln_calls_total{method=\"Execution.Execute\",code=\"OK\"}",
    )
    .await;
    assert!(laid_out >= 1.0, "the workers laid out no input tree");
    assert!(
        executed >= laid_out,
        "{executed} Execute calls, {laid_out} laid out"
    );
    drop(workers);
    kiln.stop().await;
}

// A build survives its server: Bazel executes on server a, which shares its operations
// through Redis; a is killed (SIGKILL) while an action waits on a gate, and restarted on the
// same address. Bazel's broken Execute stream is retried as WaitExecution on the restarted
// server, which follows the operation through Redis, takes it over from its dead former self
// once that one's lease lapses, and runs it again; the build passes, and the clean rerun is
// all cache hits. (`--remote_retries` gives Bazel's backoff room for the restart.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bazel_build_survives_its_server_killed_and_restarted() {
    let redis = common::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("server");
    let options = |listen: Option<String>| common::Options {
        config: Some(format!(
            "[redis]\nurl = \"{}\"\ntimeout_ms = 500\nlease_secs = 3\n",
            redis.url()
        )),
        listen,
        ..common::Options::on(common::Runtime::Glommio)
    };
    // A free port below the kernel's range of ephemeral ports: while the server is down,
    // Bazel's reconnections to a port inside that range can be given it as their own source
    // port (a connection to itself), and the restarted server could not bind it.
    let listen = common::free_port_below_ephemeral();
    let mut kiln = Kiln::start_async(&data_dir, options(Some(listen))).await;
    let endpoint = format!("grpc://{}", kiln.addr);
    let gate = dir.path().join("gate");
    let build = tokio::spawn(run_bazel_with(
        endpoint,
        dir.path().join("scratch"),
        true,
        vec![
            format!("--action_env=KILN_GATE={}", gate.display()),
            "--remote_retries=20".into(),
        ],
        vec![("ALLOW_BUILD1_WARNINGS".into(), "1".into())],
    ));
    let started = dir.path().join("gate.started");
    common::eventually(
        "the gated action to start on the server's worker",
        || async { started.exists().then_some(()) },
    )
    .await;
    kiln.signal(libc::SIGKILL);
    let addr = kiln.addr.to_string();
    let old_log = tokio::task::spawn_blocking(move || {
        kiln.wait();
        kiln.log_text()
    })
    .await
    .unwrap();
    let kiln = Kiln::start_async(&data_dir, options(Some(addr))).await;
    std::fs::write(&gate, b"").unwrap();
    let (passed, stdout, stderr) = build.await.unwrap();
    assert!(
        passed,
        "bazel run failed:\n{stdout}\n{stderr}\nfirst server's log:\n{old_log}\nrestarted server's log:\n{}",
        kiln.log_text()
    );
    let log = kiln.log_text();
    let took = log
        .lines()
        .find(|l| l.contains("took over a dead server's operations"))
        .unwrap_or_else(|| panic!("the restarted server took nothing over:\n{log}"));
    assert!(!took.contains("taken=0"), "{took}");
    kiln.stop().await;
}

on_every_runtime! {
    async fn bazel_second_clean_build_is_all_remote_cache_hits(rt: Runtime) {
        bazel_against_kiln(rt, false).await;
    }

    async fn bazel_tests_run_remotely_then_all_hit_the_cache(rt: Runtime) {
        bazel_against_kiln(rt, true).await;
    }
}
