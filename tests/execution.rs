//! Remote execution end to end: `kiln serve` (its embedded worker off) plus `kiln worker`
//! processes, on every data-plane backend.

#[macro_use]
mod common;

use common::blobs;
use common::exec::{code, execute, start_server, start_worker, Spec, Tree, Worker, NO_EMBEDDED};
use common::{Kiln, Options};
use kiln_proto::google::rpc::PreconditionFailure;
use kiln_proto::longrunning::operation::Result;
use kiln_proto::longrunning::operations_client::OperationsClient;
use kiln_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    WaitOperationRequest,
};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::execution_client::ExecutionClient;
use kiln_proto::reapi::execution_stage::Value as Stage;
use kiln_proto::reapi::{
    digest_function::Value as Function, ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse,
    GetActionResultRequest, Tree as TreeMsg, WaitExecutionRequest,
};
use prost::Message;
use tonic::Code;

const F: Function = Function::Sha256;
async fn read(ch: &tonic::transport::Channel, d: &kiln_proto::reapi::Digest) -> Vec<u8> {
    common::exec::read_output(ch, F, d).await
}

// A large input reaches a remote worker in parallel ranges, each on a connection of its own,
// byte for byte (the action copies it to an output whose digest must be the input's).
on_every_runtime! {
    async fn a_large_input_is_fetched_in_ranges(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let wdir = dir.path().join("w1");
        std::fs::create_dir_all(&wdir).unwrap();
        let config = wdir.join("worker.toml");
        std::fs::write(&config, "[worker]\nranged_fetch_min_bytes = \"1 MiB\"\nfetch_ranges = 3\n").unwrap();
        let _w = start_worker(rt, &kiln, &wdir, "w1", &["--config", config.to_str().unwrap()]).await;
        let ch = kiln.channel().await;
        let big = blobs::pseudo_random(5, (5 << 20) + 12_345);
        let d = blobs::digest(F, &big);
        blobs::write(&ch, &blobs::write_name("", F, &d), &big, 1 << 20).await.unwrap();
        let spec = Spec {
            tree: Tree::default().file("big", &big, false),
            outputs: vec!["copy".into()],
            ..Spec::script("cp big copy")
        };
        let action = spec.upload_except(&ch, F, Some(&big)).await;
        let (_, response) = execute(&ch, F, &action, false).await.unwrap();
        assert_eq!(code(&response), 0, "{response:?}");
        let result = response.result.unwrap();
        let copy = result.output_files.iter().find(|f| f.path == "copy").unwrap();
        assert_eq!(copy.digest.as_ref(), Some(&d), "the worker got the input's bytes");
        let reads = common::metric(&kiln.admin, "kiln_calls_total{method=\"ByteStream.Read\",code=\"OK\"}").await;
        assert_eq!(reads, 3.0, "one Read per range");
        kiln.stop().await;
    }
}

// Small blobs in a small-blob log (no file each): a worker copies such inputs into the
// action instead of linking them, and stores small outputs in the log. Run by the server's
// own worker, then by a `kiln worker` whose local CAS is a log chain too.
on_every_runtime! {
    async fn actions_run_with_their_small_blobs_in_a_log(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let large = vec![b'x'; 100_000];
        for embedded in [true, false] {
            let data = dir.path().join(format!("server-{embedded}"));
            let log_chain = common::log_chain("64 MiB", "1 MiB");
            let config = if embedded {
                log_chain.clone()
            } else {
                format!("{log_chain}{NO_EMBEDDED}")
            };
            let options = Options { config: Some(config), ..Options::on(rt) };
            let kiln = Kiln::start_async(&data, options).await;
            let _worker = if embedded {
                None
            } else {
                let worker_dir = dir.path().join("worker");
                std::fs::create_dir_all(&worker_dir).unwrap();
                let config = worker_dir.join("worker.toml");
                std::fs::write(&config, &log_chain).unwrap();
                let config = config.to_string_lossy().into_owned();
                Some(start_worker(rt, &kiln, &worker_dir, "logged", &["--config", &config]).await)
            };
            let ch = kiln.channel().await;
            let spec = Spec {
                tree: Tree::default()
                    .file("src/small.txt", b"a small input", false)
                    .file("src/large.bin", &large, false)
                    .file("tools/run.sh", b"#!/bin/sh\ncat src/small.txt\n", true),
                outputs: vec!["out/small".into(), "out/large".into()],
                ..Spec::script(
                    "set -e; test -x tools/run.sh; test ! -x src/small.txt; \
                     ./tools/run.sh > out/small; cp src/large.bin out/large",
                )
            };
            let action = spec.upload(&ch, F).await;
            let (_, response) = execute(&ch, F, &action, false).await.unwrap();
            assert_eq!(code(&response), 0, "{response:?}");
            let result = response.result.unwrap();
            if result.exit_code != 0 {
                let stderr = read(&ch, result.stderr_digest.as_ref().unwrap()).await;
                panic!("embedded: {embedded}: {}", String::from_utf8_lossy(&stderr));
            }
            let output = |path: &str| common::exec::output_file(&result, path);
            assert_eq!(read(&ch, &output("out/small")).await, b"a small input");
            assert_eq!(read(&ch, &output("out/large")).await, large);
            let logged = common::metric(&kiln.admin, "kiln_log_blobs").await;
            assert!(logged >= 3.0, "inputs and outputs in the log: {logged}");
            // The small blobs have no file in the server's CAS directory; the large one has.
            let files = common::blob_files(&data);
            assert!(files.iter().all(|(_, size)| *size > 64 << 10), "{files:?}");
            assert!(files.iter().any(|(_, size)| *size == 100_000), "{files:?}");
            kiln.stop().await;
        }
    }
}

on_every_runtime! {
    async fn inputs_outputs_symlinks_and_executables(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let _w = start_worker(rt, &kiln, &dir.path().join("w1"), "w1", &[]).await;
        let ch = kiln.channel().await;
        let spec = Spec {
            tree: Tree::default()
                .file("src/data.txt", b"hello inputs", false)
                .file("tools/run.sh", b"#!/bin/sh\necho tool ran\n", true)
                .file("src/deep/er/leaf", b"leaf", false)
                .symlink("src/link", "data.txt"),
            outputs: vec!["out/copy.txt".into(), "out/dir".into(), "out/sym".into(), "out/exe".into()],
            ..Spec::script(
                "set -e; test -x tools/run.sh; test ! -x src/data.txt; ./tools/run.sh; \
                 cat src/link > out/copy.txt; mkdir -p out/dir/nested; cp src/deep/er/leaf out/dir/nested/; \
                 echo x > out/dir/top; ln -s copy.txt out/sym; printf '#!/bin/sh\\n' > out/exe; chmod +x out/exe; \
                 echo to-stderr >&2",
            )
        };
        let action = spec.upload(&ch, F).await;
        let (ops, response) = execute(&ch, F, &action, false).await.unwrap();
        // Durable before reported: the action cache holds the result as soon as the operation
        // is complete (it used to be written by a task spawned after completion).
        let cached = ActionCacheClient::new(ch.clone())
            .get_action_result(GetActionResultRequest { action_digest: Some(action.clone()), ..Default::default() })
            .await
            .expect("the result is in the action cache once the operation completed")
            .into_inner();
        assert_eq!(code(&response), 0, "{response:?}");
        assert!(!response.cached_result);
        assert!(ops.iter().all(|o| o.name.starts_with("operations/")));
        let result = response.result.unwrap();
        assert_eq!(cached, result, "the action cache holds the reported result");
        assert_eq!(result.exit_code, 0);
        assert_eq!(read(&ch, result.stdout_digest.as_ref().unwrap()).await, b"tool ran\n");
        assert_eq!(read(&ch, result.stderr_digest.as_ref().unwrap()).await, b"to-stderr\n");
        let copy = result.output_files.iter().find(|f| f.path == "out/copy.txt").unwrap();
        assert_eq!(read(&ch, copy.digest.as_ref().unwrap()).await, b"hello inputs");
        assert!(!copy.is_executable);
        let exe = result.output_files.iter().find(|f| f.path == "out/exe").unwrap();
        assert!(exe.is_executable, "executable bit kept");
        assert_eq!(result.output_symlinks.len(), 1);
        assert_eq!(result.output_symlinks[0].target, "copy.txt");
        let tree = TreeMsg::decode(read(&ch, result.output_directories[0].tree_digest.as_ref().unwrap()).await.as_slice()).unwrap();
        let root = tree.root.unwrap();
        assert_eq!(root.files[0].name, "top");
        assert_eq!(root.directories[0].name, "nested");
        assert_eq!(read(&ch, tree.children[0].files[0].digest.as_ref().unwrap()).await, b"leaf");
        let meta = result.execution_metadata.as_ref().unwrap();
        assert_eq!(meta.worker, "w1");
        assert!(meta.queued_timestamp.is_some() && meta.execution_completed_timestamp.is_some());
        // The cached result is the reported one, and a second Execute is a cache hit.
        assert_eq!(cached.output_files.len(), 2);
        let (_, again) = execute(&ch, F, &action, false).await.unwrap();
        assert!(again.cached_result);
        kiln.stop().await;
    }

    async fn failures_timeouts_and_missing_inputs(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let _w = start_worker(rt, &kiln, &dir.path().join("w1"), "w1", &[]).await;
        let ch = kiln.channel().await;

        // A non-zero exit is a result, not an error, and is not cached.
        let action = Spec::script("echo failing; exit 7").upload(&ch, F).await;
        let (_, response) = execute(&ch, F, &action, false).await.unwrap();
        assert_eq!(code(&response), 0);
        assert_eq!(response.result.as_ref().unwrap().exit_code, 7);
        let miss = ActionCacheClient::new(ch.clone())
            .get_action_result(GetActionResultRequest { action_digest: Some(action), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(miss.code(), Code::NotFound);

        // A timeout kills the process group: DEADLINE_EXCEEDED, with what it printed.
        let action = Spec { timeout_secs: 1, ..Spec::script("echo before; sleep 60") }.upload(&ch, F).await;
        let (_, response) = execute(&ch, F, &action, false).await.unwrap();
        assert_eq!(code(&response), Code::DeadlineExceeded as i32, "{response:?}");
        let stdout = response.result.as_ref().unwrap().stdout_digest.clone().unwrap();
        assert_eq!(read(&ch, &stdout).await, b"before\n");

        // A missing input: FAILED_PRECONDITION naming it, nothing queued.
        let spec = Spec { tree: Tree::default().file("in", b"present", false), ..Spec::script("cat in") };
        let action = spec.upload(&ch, F).await;
        let absent = Spec { tree: Tree::default().file("in", b"never uploaded", false), ..Spec::script("cat in") };
        let missing_action = absent.upload_except(&ch, F, Some(b"never uploaded")).await;
        let err = execute(&ch, F, &missing_action, false).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        let status = kiln_proto::google::rpc::Status::decode(err.details()).unwrap();
        let failure = PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
        let wanted = common::blobs::digest(F, b"never uploaded");
        assert_eq!(failure.violations[0].r#type, "MISSING");
        assert_eq!(failure.violations[0].subject, format!("blobs/{}/{}", wanted.hash, wanted.size_bytes));
        // The one with its inputs works.
        let (_, ok) = execute(&ch, F, &action, false).await.unwrap();
        assert_eq!(read(&ch, ok.result.unwrap().stdout_digest.as_ref().unwrap()).await, b"present");
        kiln.stop().await;
    }

    async fn platform_properties_choose_the_worker(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let config = format!("{NO_EMBEDDED}unserved_timeout_secs = 1\n");
        let kiln = Kiln::start_async(&dir.path().join("server"), Options { config: Some(config), ..Options::on(rt) }).await;
        let (k, d) = (kiln.addr, dir.path().to_path_buf());
        let (_a, _b) = tokio::task::spawn_blocking(move || {
            (
                Worker::start_at(k, rt, &d.join("a"), "linux-box", &["--property", "OSFamily=linux"]),
                Worker::start_at(k, rt, &d.join("b"), "mac-box", &["--property", "OSFamily=macos"]),
            )
        }).await.unwrap();
        let ch = kiln.channel().await;
        for (os, worker) in [("macos", "mac-box"), ("linux", "linux-box"), ("macos", "mac-box")] {
            let spec = Spec { platform: vec![("OSFamily".into(), os.into())], ..Spec::script("true") };
            let (_, r) = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
            assert_eq!(r.result.unwrap().execution_metadata.unwrap().worker, worker);
        }
        // Nobody offers windows: after unserved_timeout_secs the build gets a clear error.
        let spec = Spec { platform: vec![("OSFamily".into(), "windows".into())], ..Spec::script("true") };
        let (_, r) = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
        let status = r.status.unwrap();
        assert_eq!(status.code, Code::FailedPrecondition as i32);
        assert!(status.message.contains("OSFamily=windows"), "{status:?}");
        kiln.stop().await;
    }

    async fn identical_concurrent_actions_run_once(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let _w = start_worker(rt, &kiln, &dir.path().join("w1"), "w1", &["--max-inflight", "4"]).await;
        let ch = kiln.channel().await;
        let marker = dir.path().join("runs");
        let script = format!("echo run >> {}; sleep 1; date +%s%N", marker.display());
        let action = Spec::script(&script).upload(&ch, F).await;
        let runs: Vec<_> = (0..4).map(|_| {
            let ch = ch.clone();
            let action = action.clone();
            tokio::spawn(async move { execute(&ch, F, &action, false).await.unwrap() })
        }).collect();
        let mut names = std::collections::HashSet::new();
        let mut stdouts = std::collections::HashSet::new();
        for r in runs {
            let (ops, response) = r.await.unwrap();
            names.insert(ops.last().unwrap().name.clone());
            stdouts.insert(response.result.unwrap().stdout_digest.unwrap().hash);
        }
        assert_eq!(std::fs::read_to_string(&marker).unwrap().lines().count(), 1, "ran once");
        assert_eq!(stdouts.len(), 1, "everyone got the same result");
        assert!(names.len() <= 2, "one operation (plus cache hits for late callers): {names:?}");
        kiln.stop().await;
    }

    async fn a_killed_worker_is_replaced(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let mut first = tokio::task::spawn_blocking({
            let (d, k) = (dir.path().join("w1"), kiln.addr);
            move || Worker::start_at(k, rt, &d, "doomed", &[])
        }).await.unwrap();
        let ch = kiln.channel().await;
        let started = dir.path().join("started");
        let spec = Spec::script(&format!("echo $$ >> {}; sleep 3; echo finished", started.display()));
        let action = spec.upload(&ch, F).await;
        let run = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &action, false).await }) };
        common::eventually("the action to start on the first worker", || async { started.exists().then_some(()) }).await;
        first.kill();
        let _second = start_worker(rt, &kiln, &dir.path().join("w2"), "survivor", &[]).await;
        let (_, response) = run.await.unwrap().unwrap();
        assert_eq!(code(&response), 0, "{response:?}");
        let result = response.result.unwrap();
        assert_eq!(result.execution_metadata.unwrap().worker, "survivor");
        assert_eq!(read(&ch, result.stdout_digest.as_ref().unwrap()).await, b"finished\n");
        kiln.stop().await;
    }
}

on_every_runtime! {
    async fn workers_reconnect_to_a_restarted_server(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let addr = kiln.addr;
        let _w = tokio::task::spawn_blocking({
            let d = dir.path().join("w1");
            move || Worker::start_at(addr, rt, &d, "w1", &["--property", "pool=a"])
        }).await.unwrap();
        {
            let ch = kiln.channel().await;
            let (_, r) = execute(&ch, F, &Spec::script("echo one").upload(&ch, F).await, false).await.unwrap();
            assert_eq!(code(&r), 0);
        }
        kiln.stop().await;
        // The same port again, as after an upgrade.
        let options = Options { config: Some(NO_EMBEDDED.into()), listen: Some(addr.to_string()), ..Options::on(rt) };
        let kiln = Kiln::start_async(&dir.path().join("server"), options).await;
        let kiln = logged(kiln, "worker connected").await;
        let ch = kiln.channel().await;
        let spec = Spec { platform: vec![("pool".into(), "a".into())], ..Spec::script("echo two") };
        let (_, r) = execute(&ch, F, &spec.upload(&ch, F).await, false).await.unwrap();
        assert_eq!(read(&ch, r.result.unwrap().stdout_digest.as_ref().unwrap()).await, b"two\n");
        kiln.stop().await;
    }
}

/// Waits (off the async threads) until the server logs `needle`.
async fn logged(mut kiln: Kiln, needle: &'static str) -> Kiln {
    tokio::task::spawn_blocking(move || {
        kiln.wait_for_log(needle);
        kiln
    })
    .await
    .unwrap()
}

/// The first operation an Execute stream sends, and the stream (drop it to disconnect).
async fn first_operation(
    ch: &tonic::transport::Channel,
    action: &kiln_proto::reapi::Digest,
) -> (
    kiln_proto::longrunning::Operation,
    tonic::Streaming<kiln_proto::longrunning::Operation>,
) {
    let mut stream = ExecutionClient::new(ch.clone())
        .execute(ExecuteRequest {
            action_digest: Some(action.clone()),
            digest_function: F as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let op = stream.message().await.unwrap().expect("a first operation");
    (op, stream)
}

fn stage(op: &kiln_proto::longrunning::Operation) -> Stage {
    let any = op.metadata.as_ref().expect("metadata");
    ExecuteOperationMetadata::decode(any.value.as_slice())
        .unwrap()
        .stage()
}

fn response(op: &kiln_proto::longrunning::Operation) -> ExecuteResponse {
    let Some(Result::Response(any)) = &op.result else {
        panic!("no response in {op:?}");
    };
    ExecuteResponse::decode(any.value.as_slice()).unwrap()
}

// An operation outlives the client that started it; others find it by name with
// WaitExecution, GetOperation and WaitOperation, and CancelOperation kills it.
// skip_cache_lookup runs an action again; do_not_cache keeps it out of the cache and the
// merging.
on_every_runtime! {
    async fn operations_are_found_by_name_waited_on_and_cancelled(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let _w = start_worker(rt, &kiln, &dir.path().join("w1"), "w1", &["--max-inflight", "2"]).await;
        let ch = kiln.channel().await;
        let ops = OperationsClient::new(ch.clone());

        let runs = dir.path().join("runs");
        let gate = dir.path().join("gate");
        let script = format!(
            "echo run >> {runs}; while [ ! -e {gate} ]; do sleep 0.01; done; echo finished",
            runs = runs.display(),
            gate = gate.display()
        );
        let action = Spec::script(&script).upload(&ch, F).await;
        let (first, stream) = first_operation(&ch, &action).await;
        drop(stream); // the client that started it goes away
        common::eventually("the action to start", || async { runs.exists().then_some(()) }).await;
        let got = ops.clone().get_operation(GetOperationRequest { name: first.name.clone() }).await.unwrap().into_inner();
        assert!(!got.done);
        assert_eq!(stage(&got), Stage::Executing);
        let mut waiting = ExecutionClient::new(ch.clone())
            .wait_execution(WaitExecutionRequest { name: first.name.clone() })
            .await
            .unwrap()
            .into_inner();
        let now = waiting.message().await.unwrap().unwrap();
        assert_eq!((now.name.as_str(), now.done), (first.name.as_str(), false));
        // Listed while it runs, by stage; not deleted while it runs.
        let listed = |filter: &'static str| {
            let ops = ops.clone();
            async move {
                ops.clone()
                    .list_operations(ListOperationsRequest { name: "operations/".into(), filter: filter.into(), ..Default::default() })
                    .await
                    .unwrap()
                    .into_inner()
                    .operations
                    .into_iter()
                    .map(|o| o.name)
                    .collect::<Vec<_>>()
            }
        };
        assert!(listed("stage=EXECUTING").await.contains(&first.name));
        assert!(!listed("stage=COMPLETED").await.contains(&first.name));
        let err = ops.clone().delete_operation(DeleteOperationRequest { name: first.name.clone() }).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        std::fs::write(&gate, b"").unwrap();
        let mut last = now;
        while let Some(op) = waiting.message().await.unwrap() {
            last = op;
        }
        assert!(last.done);
        assert_eq!(stage(&last), Stage::Completed);
        let done = response(&last);
        assert_eq!(read(&ch, done.result.as_ref().unwrap().stdout_digest.as_ref().unwrap()).await, b"finished\n");
        let waited = ops.clone().wait_operation(WaitOperationRequest { name: first.name.clone(), timeout: None }).await.unwrap().into_inner();
        assert!(waited.done);
        assert_eq!(response(&waited).result, done.result);
        // Finished: listed as completed; deleted, it is gone.
        assert!(listed("stage=COMPLETED").await.contains(&first.name));
        ops.clone().delete_operation(DeleteOperationRequest { name: first.name.clone() }).await.unwrap();
        let gone = ops.clone().get_operation(GetOperationRequest { name: first.name.clone() }).await.unwrap_err();
        assert_eq!(gone.code(), Code::NotFound);
        assert!(!listed("").await.contains(&first.name));
        let bad = ops.clone().list_operations(ListOperationsRequest { filter: "done=true".into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(bad.code(), Code::InvalidArgument);

        // Cached now; skip_cache_lookup runs it again.
        let (_, hit) = execute(&ch, F, &action, false).await.unwrap();
        assert!(hit.cached_result);
        let (_, rerun) = execute(&ch, F, &action, true).await.unwrap();
        assert!(!rerun.cached_result);
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 2);

        // do_not_cache: run every time, never stored.
        let uncached = Spec { do_not_cache: true, ..Spec::script(&script) }.upload(&ch, F).await;
        for _ in 0..2 {
            let (_, r) = execute(&ch, F, &uncached, false).await.unwrap();
            assert!(!r.cached_result);
        }
        assert_eq!(std::fs::read_to_string(&runs).unwrap().lines().count(), 4);
        let miss = ActionCacheClient::new(ch.clone())
            .get_action_result(GetActionResultRequest { action_digest: Some(uncached), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(miss.code(), Code::NotFound);

        // Cancel a running action: its watchers see CANCELLED and its process group dies.
        let pid_file = dir.path().join("pid");
        let stuck = Spec::script(&format!("echo $$ > {}.tmp; mv {0}.tmp {0}; sleep 600", pid_file.display()))
            .upload(&ch, F)
            .await;
        let (op, mut stream) = first_operation(&ch, &stuck).await;
        common::eventually("the stuck action to start", || async { pid_file.exists().then_some(()) }).await;
        let pid = std::fs::read_to_string(&pid_file).unwrap().trim().to_string();
        ops.clone().cancel_operation(CancelOperationRequest { name: op.name.clone() }).await.unwrap();
        let mut last = op;
        while let Some(o) = stream.message().await.unwrap() {
            last = o;
        }
        assert_eq!(response(&last).status.unwrap().code, Code::Cancelled as i32);
        common::eventually("the cancelled process to die", || {
            let proc_dir = std::path::PathBuf::from(format!("/proc/{pid}"));
            async move { (!proc_dir.exists()).then_some(()) }
        })
        .await;
        let err = ops.clone().cancel_operation(CancelOperationRequest { name: "operations/none".into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        kiln.stop().await;
    }
}

// With the queue full, Execute answers RESOURCE_EXHAUSTED and gives back the pins it took on
// the refused action's inputs; an Action naming a huge blob as a Directory is refused with
// INVALID_ARGUMENT instead of being read into memory.
on_every_runtime! {
    async fn a_full_queue_and_oversized_directories_are_refused_cleanly(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_async(
            &dir.path().join("server"),
            Options {
                config: Some("[worker]\nembedded = false\n[execution]\nmax_queued = 1\n".into()),
                ..Options::on(rt)
            },
        ).await;
        let ch = kiln.channel().await;
        assert_eq!(common::metric(&kiln.admin, "kiln_cas_pinned_bytes").await, 0.0);
        let queued = Spec { tree: Tree::default().file("a", &[1u8; 5000], false), ..Spec::script("cat a") }
            .upload(&ch, F)
            .await;
        let (op, _keep) = first_operation(&ch, &queued).await;
        assert_eq!(stage(&op), Stage::Queued, "no worker: it waits");
        let held = common::metric(&kiln.admin, "kiln_cas_pinned_bytes").await;
        assert!(held >= 5000.0, "the queued action's inputs are pinned: {held}");
        let refused = Spec { tree: Tree::default().file("b", &[2u8; 7000], false), ..Spec::script("cat b") }
            .upload(&ch, F)
            .await;
        let err = execute(&ch, F, &refused, false).await.unwrap_err();
        assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
        common::eventually("the refused action's pins to be released", || {
            let admin = kiln.admin.clone();
            async move { (common::metric(&admin, "kiln_cas_pinned_bytes").await == held).then_some(()) }
        })
        .await;

        let huge = common::blobs::pseudo_random(9, 17 << 20);
        let huge_digest = common::blobs::digest(F, &huge);
        blobs::write(&ch, &common::blobs::write_name("", F, &huge_digest), &huge, 1 << 20)
            .await
            .unwrap();
        let command = kiln_proto::reapi::Command { arguments: vec!["true".into()], ..Default::default() };
        let command_bytes = command.encode_to_vec();
        let command_digest = common::blobs::digest(F, &command_bytes);
        let action = kiln_proto::reapi::Action {
            command_digest: Some(command_digest.clone()),
            input_root_digest: Some(huge_digest),
            ..Default::default()
        };
        let action_bytes = action.encode_to_vec();
        let action_digest = common::blobs::digest(F, &action_bytes);
        common::exec::upload(&ch, F, vec![(command_digest, command_bytes), (action_digest.clone(), action_bytes)]).await;
        let err = execute(&ch, F, &action_digest, false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("Directory"), "{err:?}");
        kiln.stop().await;
    }
}

// A worker that stops answering (SIGSTOP) is declared lost after worker_timeout_secs: its
// action finishes on another worker, and when it wakes up its old session is closed, so it
// reconnects as a fresh worker instead of lingering half-registered.
on_every_runtime! {
    async fn a_stalled_worker_is_dropped_and_comes_back(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let stalled = start_worker(rt, &kiln, &dir.path().join("w1"), "sleepy", &["--max-inflight", "1"]).await;
        let ch = kiln.channel().await;
        let (started, gate) = (dir.path().join("started"), dir.path().join("gate"));
        let script = format!(
            "echo $$ >> {s}; while [ ! -e {g} ]; do sleep 0.01; done; echo done",
            s = started.display(),
            g = gate.display()
        );
        let action = Spec::script(&script).upload(&ch, F).await;
        let run = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &action, false).await }) };
        common::eventually("the action to start on the first worker", || async { started.exists().then_some(()) }).await;
        stalled.signal(libc::SIGSTOP);
        let kiln = logged(kiln, "worker lost").await;
        let _awake = start_worker(rt, &kiln, &dir.path().join("w2"), "awake", &[]).await;
        std::fs::write(&gate, b"").unwrap();
        let (_, response) = run.await.unwrap().unwrap();
        assert_eq!(code(&response), 0, "{response:?}");
        assert_eq!(response.result.unwrap().execution_metadata.unwrap().worker, "awake");
        stalled.signal(libc::SIGCONT);
        let kiln = logged(kiln, "worker connected worker=sleepy").await;
        let (_, r) = execute(&ch, F, &Spec::script("echo again").upload(&ch, F).await, false).await.unwrap();
        assert_eq!(code(&r), 0);
        drop(stalled);
        kiln.stop().await;
    }
}

// Bounds on what an Execute may ask for: more distinct inputs than
// execution.max_input_digests is INVALID_ARGUMENT naming the limit; and many missing inputs
// give a PreconditionFailure that lists the first 32 and says how many there are in all.
on_every_runtime! {
    async fn input_trees_and_precondition_failures_are_bounded(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = Kiln::start_async(
            &dir.path().join("server"),
            Options {
                config: Some("[execution]\nmax_input_digests = 50\n".into()),
                ..Options::on(rt)
            },
        ).await;
        let ch = kiln.channel().await;
        let files = |n: usize, what: &str| {
            (0..n).fold(Tree::default(), |t, i| t.file(&format!("in/{i}"), format!("{what} {i}").as_bytes(), false))
        };
        let wide = Spec { tree: files(60, "input"), ..Spec::script("true") };
        let err = execute(&ch, F, &wide.upload(&ch, F).await, false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("50") && err.message().contains("max_input_digests"), "{err:?}");
        // 40 inputs, none uploaded (the Directory messages are).
        let missing = Spec { tree: files(40, "never uploaded"), ..Spec::script("true") };
        let action = missing.upload_only(&ch, F, |data| !data.starts_with(b"never uploaded ")).await;
        let err = execute(&ch, F, &action, false).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("40 blob(s)") && err.message().contains("8 more"), "{err:?}");
        let status = kiln_proto::google::rpc::Status::decode(err.details()).unwrap();
        let failure = PreconditionFailure::decode(status.details[0].value.as_slice()).unwrap();
        assert_eq!(failure.violations.len(), 32);
        assert!(failure.violations.iter().all(|v| v.r#type == "MISSING" && v.subject.starts_with("blobs/")));
        kiln.stop().await;
    }
}
