//! Compiles Kiln's `.proto` files with protox (pure Rust: no system `protoc`) and generates
//! prost messages and tonic services. Every `bytes` field becomes `bytes::Bytes`, so blob
//! payloads are sliced out of the received buffer instead of copied.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "build/bazel/semver/semver.proto",
    "build/bazel/remote/execution/v2/remote_execution.proto",
    "build/bazel/remote/asset/v1/remote_asset.proto",
    "google/bytestream/bytestream.proto",
    "google/longrunning/operations.proto",
    "google/rpc/code.proto",
    "google/rpc/status.proto",
    "google/rpc/error_details.proto",
    "kiln/worker/v1/worker.proto",
    "kiln/farm/v1/farm.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("protos");
    println!("cargo:rerun-if-changed={}", root.display());
    let files: Vec<PathBuf> = FILES.iter().map(|f| root.join(f)).collect();
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
