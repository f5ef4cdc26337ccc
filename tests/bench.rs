//! kiln-bench against a real Kiln: every scenario produces results (or says why it skipped),
//! results round-trip through JSON, compare and plot work, and a read whose bytes do not match
//! the digest is reported as an error (against a tiny fake server: Kiln cannot be made to
//! serve bad bytes).

#[macro_use]
mod common;

use clap::Parser;
use common::Kiln;
use kiln_bench::{Args, Report};
use kiln_proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
use kiln_proto::bytestream::{
    QueryWriteStatusRequest, QueryWriteStatusResponse, ReadRequest, ReadResponse, WriteRequest,
    WriteResponse,
};
use kiln_proto::reapi::capabilities_server::{Capabilities, CapabilitiesServer};
use kiln_proto::reapi::{self, GetCapabilitiesRequest, ServerCapabilities};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tonic::{Request, Response, Status, Streaming};

fn args(line: &str) -> Args {
    Args::parse_from(std::iter::once("kiln-bench").chain(line.split_whitespace()))
}

async fn run(line: &str) -> Report {
    kiln_bench::run(args(line))
        .await
        .expect("bench run")
        .remove(0)
}

on_every_runtime! {
    async fn every_scenario_runs_against_kiln(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = tokio::task::spawn_blocking({
            let d = dir.path().join("data");
            move || Kiln::start(rt, &d)
        })
        .await
        .unwrap();
        let endpoint = format!(
            "--endpoint grpc://{} --quiet --connections 2 --concurrency 4",
            kiln.addr
        );
        for (line, kinds) in [
            ("write --size 4KiB-256KiB --ops 20", vec!["write"]),
            (
                "write --size 2MiB --ops 3 --digest-function blake3",
                vec!["write"],
            ),
            ("read --size 1MiB --ops 10 --blobs 3", vec!["read"]),
            // Three ranges of 1 MiB and a bit, verified whole.
            ("read --size 3MiB-4MiB --ops 4 --blobs 2 --ranges 3", vec!["read"]),
            (
                "batch --size 1KiB --batch 16 --ops 5",
                vec!["batch-read", "batch-update"],
            ),
            (
                "find-missing --digests-per-call 100 --ops 5",
                vec!["find-missing"],
            ),
            (
                "action-cache --blobs 20 --ops 40",
                vec!["get-hit", "get-miss", "update"],
            ),
            (
                "action-cache --blobs 20 --ops 40 --update-fraction 0 --hit-fraction 1",
                vec!["get-hit"],
            ),
            (
                "mixed --size 1KiB --batch 4 --ops 10",
                vec![
                    "build-step",
                    "execute",
                    "find-missing",
                    "get-result",
                    "read-output",
                    "upload",
                ],
            ),
            ("execute --ops 5", vec!["execute", "queue-to-start"]),
            ("get-tree --ops 4 --page-size 7", vec!["get-tree"]),
            // zstd both ways, counted uncompressed; and splices of 3 chunks.
            (
                "write --size 300KiB --ops 4 --content text --compressed",
                vec!["write"],
            ),
            (
                "read --size 300KiB --ops 4 --blobs 2 --content text --compressed",
                vec!["read"],
            ),
            (
                "read --size 300KiB --ops 4 --blobs 2 --content text --compressed --upload-compressed",
                vec!["read"],
            ),
            ("splice --size 1MiB --chunks 3 --ops 4", vec!["splice"]),
            (
                // Five inputs per action, uploaded in a batch: the actions run only if the
                // server has every one of them.
                "execute --ops 3 --input-size 1KiB --input-files 5",
                vec!["execute", "queue-to-start", "input-fetch"],
            ),
            (
                // An output file per action, which the worker uploads.
                "execute --ops 2 --output-size 2MiB",
                vec!["execute", "queue-to-start", "output-upload"],
            ),
            (
                "write --size 8KiB --duration 0.5 --warmup 0.2 --rate 200",
                vec!["write"],
            ),
        ] {
            let report = run(&format!("{line} {endpoint}")).await;
            let mut seen: Vec<&str> = report.results.iter().map(|r| r.kind.as_str()).collect();
            seen.sort_unstable();
            let mut expected = kinds.clone();
            expected.sort_unstable();
            assert_eq!(seen, expected, "{line}: exactly these kinds");
            for kind in kinds {
                let r = report
                    .results
                    .iter()
                    .find(|r| r.kind == kind)
                    .unwrap_or_else(|| panic!("{line}: no {kind} results in {report:?}"));
                assert!(r.ops > 0, "{line}: {kind} ran nothing");
                assert_eq!(r.errors, 0, "{line}: {kind} errors {:?}", r.errors_by_code);
                assert!(
                    r.latency_ms.p50 > 0.0 && r.latency_ms.p99 >= r.latency_ms.p50,
                    "{line}: {r:?}"
                );
            }
        }
        kiln.stop().await;
    }
}

// --server-pid: the server's CPU over the measured phase, per operation, in the report and
// its JSON; a pid that is not there is refused before anything runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_cpu_is_reported_per_operation() {
    let dir = tempfile::tempdir().unwrap();
    let kiln = tokio::task::spawn_blocking({
        let d = dir.path().join("data");
        move || Kiln::start(common::Runtime::Glommio, &d)
    })
    .await
    .unwrap();
    let json = dir.path().join("cpu.json");
    let line = format!(
        "write --endpoint grpc://{} --quiet --size 64KiB --ops 1000 --server-pid {} --json {}",
        kiln.addr,
        kiln.pid(),
        json.display()
    );
    let report = run(&line).await;
    let cpu = report.server_cpu.clone().expect("server CPU measured");
    assert_eq!(cpu.pid, kiln.pid());
    assert_eq!(cpu.operations, 1000);
    assert!(cpu.user_seconds + cpu.system_seconds > 0.0, "{cpu:?}");
    let expected = (cpu.user_seconds + cpu.system_seconds) * 1e6 / 1000.0;
    assert!((cpu.micros_per_op - expected).abs() < 1e-6, "{cpu:?}");
    assert!(
        report.table().contains("µs per operation"),
        "{}",
        report.table()
    );
    assert_eq!(Report::read(&json).unwrap().server_cpu, Some(cpu));
    let missing = kiln_bench::run(args(&format!(
        "write --endpoint grpc://{} --quiet --ops 1 --server-pid 999999999",
        kiln.addr
    )))
    .await
    .expect_err("no such process");
    assert!(format!("{missing:#}").contains("999999999"), "{missing:#}");
    // A short soak: resident memory sampled through the run, summarised and plotted.
    let plot = dir.path().join("soak.svg");
    let soak = run(&format!(
        "write --endpoint grpc://{} --quiet --size 4KiB --duration 1.5 --warmup 0 --server-pid {} --rss-every 0.1 --plot {}",
        kiln.addr,
        kiln.pid(),
        plot.display()
    ))
    .await;
    let rss = soak.server_rss.clone().expect("RSS sampled");
    assert!(rss.samples.len() >= 5, "{rss:?}");
    assert!(
        rss.samples.iter().all(|(t, mib)| *t >= 0.0 && *mib > 1.0),
        "{rss:?}"
    );
    assert!(soak.table().contains("server RSS:"), "{}", soak.table());
    let svg = std::fs::read_to_string(dir.path().join("soak.rss.svg")).expect("RSS plot");
    assert!(svg.contains("<polyline") && svg.contains("MiB"), "{svg}");
    kiln.stop().await;
}

#[tokio::test]
async fn reports_round_trip_compare_and_plot() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.json");
    let b = dir.path().join("b.json");
    let svg = dir.path().join("p.svg");
    let first = kiln_bench::run(args(&format!(
        "tcp --size 1MiB --ops 20 --quiet --label one --json {}",
        a.display()
    )))
    .await
    .unwrap();
    kiln_bench::run(args(&format!(
        "tcp --size 1MiB --ops 20 --quiet --label two --json {}",
        b.display()
    )))
    .await
    .unwrap();
    let read_back = Report::read(&a).unwrap();
    assert_eq!(read_back, first[0], "JSON round trip");
    assert_eq!(read_back.results[0].kind, "tcp");
    assert_eq!(read_back.results[0].bytes, 20 << 20);
    let compared = kiln_bench::run(args(&format!(
        "--compare {} {} --plot {}",
        a.display(),
        b.display(),
        svg.display()
    )))
    .await
    .unwrap();
    assert_eq!(compared.len(), 2);
    let text = kiln_bench::report::compare(&compared);
    assert!(text.contains("two vs one"), "{text}");
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(
        plot.starts_with("<svg") && plot.matches("<polyline").count() == 2,
        "{plot}"
    );
    assert!(plot.contains("one tcp") && plot.contains("two tcp"));
}

/// A server that stores uploads and serves them back with one byte flipped.
#[derive(Default, Clone)]
struct Corrupting {
    blobs: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

fn blob_key(resource: &str) -> String {
    let parts: Vec<&str> = resource.rsplitn(3, '/').collect();
    format!(
        "{}/{}",
        parts.get(1).unwrap_or(&""),
        parts.first().unwrap_or(&"")
    )
}

#[tonic::async_trait]
impl Capabilities for Corrupting {
    async fn get_capabilities(
        &self,
        _: Request<GetCapabilitiesRequest>,
    ) -> Result<Response<ServerCapabilities>, Status> {
        Ok(Response::new(ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: vec![reapi::digest_function::Value::Sha256 as i32],
                max_batch_total_size_bytes: 4 << 20,
                ..Default::default()
            }),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl ByteStream for Corrupting {
    type ReadStream = futures::stream::Iter<std::vec::IntoIter<Result<ReadResponse, Status>>>;

    async fn read(
        &self,
        request: Request<ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let key = blob_key(&request.into_inner().resource_name);
        let mut data = self
            .blobs
            .lock()
            .unwrap()
            .get(&key)
            .cloned()
            .ok_or_else(|| Status::not_found(key))?;
        data[0] ^= 0xff;
        Ok(Response::new(futures::stream::iter(vec![Ok(
            ReadResponse { data: data.into() },
        )])))
    }

    async fn write(
        &self,
        request: Request<Streaming<WriteRequest>>,
    ) -> Result<Response<WriteResponse>, Status> {
        let mut stream = request.into_inner();
        let mut name = String::new();
        let mut data = Vec::new();
        while let Some(msg) = stream.message().await? {
            if name.is_empty() {
                name = msg.resource_name.clone();
            }
            data.extend_from_slice(&msg.data);
        }
        let size = data.len() as i64;
        self.blobs.lock().unwrap().insert(blob_key(&name), data);
        Ok(Response::new(WriteResponse {
            committed_size: size,
        }))
    }

    async fn query_write_status(
        &self,
        _: Request<QueryWriteStatusRequest>,
    ) -> Result<Response<QueryWriteStatusResponse>, Status> {
        Err(Status::unimplemented("not needed"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_reads_are_counted_as_errors() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = Corrupting::default();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(CapabilitiesServer::new(fake.clone()))
            .add_service(ByteStreamServer::new(fake))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    for ranges in [1, 2] {
        let report = run(&format!(
            "read --endpoint grpc://{addr} --size 2MiB --ops 6 --blobs 2 --quiet --ranges {ranges}"
        ))
        .await;
        let read = &report.results[0];
        assert_eq!(read.ops, 6);
        assert_eq!(read.errors, 6, "--ranges {ranges}");
        assert_eq!(read.errors_by_code.get("DIGEST_MISMATCH"), Some(&6));
        assert_eq!(read.bytes, 0, "bad bytes are not counted as throughput");
    }
    server.abort();
}
