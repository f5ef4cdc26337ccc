//! A real Bazel (Debian's bazel-bootstrap, Bazel 4.2.3) against `kiln serve` as its remote
//! cache: the first build uploads everything (all misses, salted per run), and after
//! `bazel clean` the second build is entirely remote cache hits. See `tests/bazel/README.md`.

#[macro_use]
mod common;

use common::Kiln;
use std::path::Path;
use std::process::Command;

const BAZEL: &str = "/usr/bin/bazel-4";

on_every_runtime! {
    async fn bazel_second_clean_build_is_all_remote_cache_hits(rt: Runtime) {
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
            Command::new("bash")
                .arg(script)
                .arg(endpoint)
                .arg(salt)
                .arg(scratch)
                .env("BAZEL", BAZEL)
                .env("REQUIRE_FIRST_MISS", "1")
                .output()
                .expect("run run_bazel.sh")
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
}
