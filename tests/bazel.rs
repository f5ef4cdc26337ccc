//! A real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3) against `kiln serve` (see
//! `tests/bazel/README.md`): as a remote cache — the first build uploads everything (all
//! misses, salted per run), and after `bazel clean` the second build is entirely remote cache
//! hits — and as a remote executor, where `bazel test` of the genrules, the C library and
//! binary and a C test runs every action on Kiln's embedded worker, then a clean rerun is all
//! cache hits.

#[macro_use]
mod common;

use common::Kiln;
use std::path::Path;
use std::process::Command;

const BAZEL: &str = "/usr/bin/bazel-4";

/// Runs `run_bazel.sh` against a fresh Kiln; `remote_execution` adds `--remote_executor` and
/// runs `bazel test`, requiring every action of the first run to execute remotely.
async fn bazel_against_kiln(rt: common::Runtime, remote_execution: bool) {
    common::ensure_debian_package(BAZEL, "bazel-bootstrap");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let kiln = tokio::task::spawn_blocking(move || Kiln::start(rt, &data_dir))
        .await
        .unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bazel/run_bazel.sh");
    let salt = format!("{}-{}", std::process::id(), uuid::Uuid::new_v4());
    let scratch = dir.path().join("scratch");
    let endpoint = format!("grpc://{}", kiln.addr);
    let output = tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("bash");
        cmd.arg(script)
            .arg(&endpoint)
            .arg(salt)
            .arg(scratch)
            .env("BAZEL", BAZEL)
            .env("REQUIRE_FIRST_MISS", "1");
        if remote_execution {
            cmd.arg(format!("--remote_executor={endpoint}"))
                .env("BAZEL_COMMAND", "test")
                .env("REQUIRE_REMOTE", "1");
        }
        cmd.output().expect("run run_bazel.sh")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success() && stdout.contains("KILN_BAZEL_RESULT PASS"),
        "bazel run failed ({}):\n{stdout}\n{stderr}\nkiln log:\n{}",
        output.status,
        kiln.log_text()
    );
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
