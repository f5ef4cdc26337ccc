//! A farm of servers sharing Redis, as the tests of shared operations and take-over use it:
//! its servers and workers, actions that wait on a flag file, and the operations calls they
//! make.

use super::exec::{start_worker, Worker};
use super::redis::RedisServer;
use super::{Kiln, Options, Runtime};
use kiln_proto::reapi::{self, digest_function::Value as Function};
use std::time::Duration;
use tonic::transport::Channel;

const F: Function = Function::Sha256;

pub async fn server(dir: &std::path::Path, name: &str, redis: &RedisServer) -> Kiln {
    Kiln::start_async(
        &dir.join(name),
        Options {
            config: Some(format!(
                "[redis]\nurl = \"{}\"\ntimeout_ms = 500\n[worker]\nembedded = false\n",
                redis.url()
            )),
            ..Options::on(Runtime::Glommio)
        },
    )
    .await
}

/// The options of a server of a farm that shares operations and small blobs through the
/// Redis at `url`, with no worker of its own, a short lease, and workers lost after 3 s of
/// silence.
pub fn farm_options(url: &str) -> Options {
    Options {
        config: Some(format!(
            concat!(
                "[redis]\nurl = \"{}\"\ntimeout_ms = 500\nlease_secs = 5\n",
                "[storage]\nchain = [\"memory\", \"shared\", \"filesystem\"]\n",
                "[storage.tiers.shared]\nkind = \"redis\"\nmax_blob_bytes = \"64 KiB\"\n",
                "{}"
            ),
            url,
            super::exec::NO_EMBEDDED
        )),
        ..Options::on(Runtime::Glommio)
    }
}

/// A server with [`farm_options`], its data under `dir/name`.
pub async fn farm_server(dir: &std::path::Path, name: &str, url: &str) -> Kiln {
    Kiln::start_async(&dir.join(name), farm_options(url)).await
}

/// Waits until the server behind `ch` knows operation `name` (accepted by another server of
/// its farm: it sees it through Redis).
pub async fn known(ch: &Channel, name: &str) {
    super::eventually("the operation to be seen through another server", || {
        let (ch, name) = (ch.clone(), name.to_string());
        async move {
            kiln_proto::longrunning::operations_client::OperationsClient::new(ch)
                .get_operation(kiln_proto::longrunning::GetOperationRequest { name })
                .await
                .ok()
        }
    })
    .await;
}

/// Waits for `server` to adopt the held action "one" (under `dir`) where it runs (when it
/// takes the operation over, or, when the worker reports it after that, as queued again),
/// lets it finish, and checks that `follow` (a client following it) sees it succeed on
/// `worker`, and that it started and completed once.
pub async fn adopted_and_run_once(
    server: &Kiln,
    dir: &std::path::Path,
    follow: tokio::task::JoinHandle<reapi::ExecuteResponse>,
    worker: &str,
) {
    super::eventually("the server to adopt the action", || async {
        server
            .log_text()
            .contains("its worker still runs it")
            .then_some(())
    })
    .await;
    std::fs::write(dir.join("flag-one"), b"").unwrap();
    let response = follow.await.unwrap();
    assert_eq!(super::exec::code(&response), 0, "{response:?}");
    assert_eq!(super::exec::worker_of(&response), worker);
    assert_eq!(lines(dir, "starts"), ["one"], "started once");
    assert_eq!(lines(dir, "log"), ["one"], "completed once");
}

/// Opens WaitExecution on `name` through `ch`, and follows it (in a task) to its end, within
/// a minute.
pub async fn watching(
    ch: &Channel,
    name: &str,
) -> tokio::task::JoinHandle<kiln_proto::reapi::ExecuteResponse> {
    use kiln_proto::longrunning::operation;
    use kiln_proto::reapi::execution_client::ExecutionClient;
    use prost::Message;
    let mut stream = ExecutionClient::new(ch.clone())
        .wait_execution(kiln_proto::reapi::WaitExecutionRequest {
            name: name.to_string(),
        })
        .await
        .unwrap_or_else(|s| panic!("WaitExecution {name}: {s:?}"))
        .into_inner();
    tokio::spawn(async move {
        let mut last = None;
        let follow = async {
            while let Some(op) = stream.message().await.unwrap() {
                last = Some(op);
            }
        };
        tokio::time::timeout(Duration::from_secs(60), follow)
            .await
            .expect("the operation ended within a minute");
        let last = last.expect("the stream sent the operation");
        assert!(last.done, "{last:?}");
        let Some(operation::Result::Response(any)) = last.result else {
            panic!("no response: {last:?}");
        };
        kiln_proto::reapi::ExecuteResponse::decode(any.value.as_slice()).unwrap()
    })
}

/// An action that notes its start (`starts`), waits for `flag-TAG`, and notes its end
/// (`log`), under `dir`.
pub fn held(dir: &std::path::Path, tag: &str) -> super::exec::Spec {
    super::exec::Spec::script(&format!(
        "echo {tag} >> {starts}; while [ ! -e {flag} ]; do sleep 0.02; done; echo {tag} >> {log}",
        starts = dir.join("starts").display(),
        flag = dir.join(format!("flag-{tag}")).display(),
        log = dir.join("log").display(),
    ))
}

/// The lines of `file` under `dir`, sorted (none when it is missing).
pub fn lines(dir: &std::path::Path, file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// Kills `kiln` with SIGKILL and waits for it.
pub async fn kill(mut kiln: Kiln) {
    kiln.signal(libc::SIGKILL);
    tokio::task::spawn_blocking(move || {
        kiln.wait();
    })
    .await
    .unwrap();
}

/// `kiln_worker_slots{worker="NAME"}` on `kiln`, once exported.
pub async fn slots(kiln: &Kiln, worker: &str) -> Option<f64> {
    super::metric_if_any(
        &kiln.admin,
        &format!("kiln_worker_slots{{worker=\"{worker}\"}}"),
    )
    .await
}

/// Executes `spec` through `ch`, returning the operation's name once accepted, and the rest
/// of its stream.
pub async fn accepted(
    ch: &Channel,
    action: reapi::Digest,
) -> (String, tonic::Streaming<kiln_proto::longrunning::Operation>) {
    let mut stream = kiln_proto::reapi::execution_client::ExecutionClient::new(ch.clone())
        .execute(kiln_proto::reapi::ExecuteRequest {
            action_digest: Some(action),
            digest_function: F as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    (first.name, stream)
}

/// ListOperations through `ch`: the names of a page, and its token.
pub async fn listed(ch: &Channel, filter: &str, size: i32, token: &str) -> (Vec<String>, String) {
    let page = kiln_proto::longrunning::operations_client::OperationsClient::new(ch.clone())
        .list_operations(kiln_proto::longrunning::ListOperationsRequest {
            name: "operations/".into(),
            filter: filter.into(),
            page_size: size,
            page_token: token.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.unreachable.is_empty(), "{:?}", page.unreachable);
    let names = page.operations.into_iter().map(|o| o.name).collect();
    (names, page.next_page_token)
}

/// Redis, a temporary directory, and servers a and b of a farm on them ([`farm_server`]).
pub async fn two_servers() -> (RedisServer, tempfile::TempDir, Kiln, Kiln) {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = farm_server(dir.path(), "a", &redis.url()).await;
    let b = farm_server(dir.path(), "b", &redis.url()).await;
    (redis, dir, a, b)
}

/// A `kiln worker` named `name` for `server` (with `extra` arguments), its data in `dir/name`.
pub async fn worker(server: &Kiln, dir: &std::path::Path, name: &str, extra: &[&str]) -> Worker {
    start_worker(Runtime::Glommio, server, &dir.join(name), name, extra).await
}
