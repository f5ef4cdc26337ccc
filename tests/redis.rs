//! Kiln with a real `redis-server` (`[redis]`): the action cache and small blobs shared by two
//! servers, completeness still checked against each server's own CAS, Redis going away or
//! freezing (lookups that need it miss, writes fail with UNAVAILABLE naming Redis, none hangs,
//! results the server holds itself are still served) and coming back (Kiln recovers by
//! itself).

#[macro_use]
mod common;

use common::redis::RedisServer;
use common::{Kiln, Options, Runtime};
use kiln_proto::reapi::action_cache_client::ActionCacheClient;
use kiln_proto::reapi::{
    self, digest_function::Value as Function, ActionResult, GetActionResultRequest, OutputFile,
    UpdateActionResultRequest,
};
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const F: Function = Function::Sha256;

/// A call that needs Redis returns within this, Redis up or down.
const BOUND: Duration = Duration::from_secs(10);

async fn get(ch: &Channel, action: &reapi::Digest) -> Result<ActionResult, tonic::Status> {
    let mut client = ActionCacheClient::new(ch.clone());
    let call = client.get_action_result(GetActionResultRequest {
        action_digest: Some(action.clone()),
        digest_function: F as i32,
        ..Default::default()
    });
    let reply = tokio::time::timeout(BOUND, call)
        .await
        .expect("GetActionResult hung");
    reply.map(|r| r.into_inner())
}

async fn update(
    ch: &Channel,
    action: &reapi::Digest,
    result: &ActionResult,
) -> Result<(), tonic::Status> {
    let mut client = ActionCacheClient::new(ch.clone());
    let call = client.update_action_result(UpdateActionResultRequest {
        action_digest: Some(action.clone()),
        action_result: Some(result.clone()),
        digest_function: F as i32,
        ..Default::default()
    });
    let reply = tokio::time::timeout(BOUND, call)
        .await
        .expect("UpdateActionResult hung");
    reply.map(|_| ())
}

async fn server(dir: &std::path::Path, name: &str, redis: &RedisServer) -> Kiln {
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

fn action(tag: &str) -> reapi::Digest {
    common::blobs::digest(F, format!("action {tag}").as_bytes())
}

fn result(code: i32) -> ActionResult {
    ActionResult {
        exit_code: code,
        stdout_raw: format!("exit {code}").into_bytes().into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_share_their_action_cache_through_redis() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = server(dir.path(), "a", &redis).await;
    let b = server(dir.path(), "b", &redis).await;
    let (cha, chb) = (a.channel().await, b.channel().await);

    // Stored through a, a hit on b.
    update(&cha, &action("one"), &result(7)).await.unwrap();
    assert_eq!(get(&chb, &action("one")).await.unwrap(), result(7));
    assert_eq!(
        get(&chb, &action("none")).await.map_err(|s| s.code()),
        Err(Code::NotFound)
    );

    // A result whose output only a holds is a miss on b until b's CAS has it too.
    let blob = b"an output".to_vec();
    let d = common::blobs::digest(F, &blob);
    common::exec::upload(&cha, F, vec![(d.clone(), blob.clone())]).await;
    let with_output = ActionResult {
        output_files: vec![OutputFile {
            path: "out".into(),
            digest: Some(d.clone()),
            ..Default::default()
        }],
        ..result(0)
    };
    update(&cha, &action("two"), &with_output).await.unwrap();
    assert_eq!(get(&cha, &action("two")).await.unwrap(), with_output);
    assert_eq!(
        get(&chb, &action("two")).await.map_err(|s| s.code()),
        Err(Code::NotFound)
    );
    common::exec::upload(&chb, F, vec![(d.clone(), blob.clone())]).await;
    assert_eq!(get(&chb, &action("two")).await.unwrap(), with_output);

    // b holds an incomplete result of its own; a stores a newer, complete one: b serves that.
    let gone = ActionResult {
        output_files: vec![OutputFile {
            path: "lost".into(),
            digest: Some(common::blobs::digest(F, b"never uploaded")),
            ..Default::default()
        }],
        ..result(9)
    };
    update(&chb, &action("redone"), &gone).await.unwrap();
    assert_eq!(
        get(&chb, &action("redone")).await.map_err(|s| s.code()),
        Err(Code::NotFound)
    );
    update(&cha, &action("redone"), &result(0)).await.unwrap();
    assert_eq!(get(&chb, &action("redone")).await.unwrap(), result(0));

    // Redis freezes, then goes away: what b holds itself is still served; a lookup that needs
    // Redis is a miss and a write fails with UNAVAILABLE naming Redis, none of them hanging.
    for gone in [RedisServer::pause, RedisServer::stop] {
        gone(&mut redis);
        assert_eq!(get(&chb, &action("one")).await.unwrap(), result(7));
        let miss = get(&chb, &action("unknown")).await;
        assert_eq!(miss.map_err(|s| s.code()), Err(Code::NotFound));
        let e = update(&chb, &action("three"), &result(3))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("Redis at 127.0.0.1:"), "{e:?}");
        assert_eq!(
            get(&chb, &action("three")).await.unwrap(),
            result(3),
            "kept by b itself"
        );
    }

    // Back (empty): both servers use it again by themselves.
    redis.restart();
    common::eventually("the servers to reach Redis again", || async {
        update(&cha, &action("four"), &result(4)).await.ok()
    })
    .await;
    assert_eq!(get(&chb, &action("four")).await.unwrap(), result(4));
    a.stop().await;
    b.stop().await;
}

/// A server whose CAS shares blobs up to 64 KiB through `redis`.
async fn sharing_server(dir: &std::path::Path, name: &str, redis: &RedisServer) -> Kiln {
    sharing_server_at(dir, name, &redis.url(), false).await
}

/// A server whose action cache and CAS (blobs up to 64 KiB) are shared through the Redis at
/// `url` (a Cluster's node with `cluster`).
async fn sharing_server_at(dir: &std::path::Path, name: &str, url: &str, cluster: bool) -> Kiln {
    Kiln::start_async(
        &dir.join(name),
        Options {
            config: Some(format!(
                concat!(
                    "[redis]\nurl = \"{}\"\ntimeout_ms = 500\ncluster = {}\n",
                    "[storage]\nchain = [\"memory\", \"shared\", \"filesystem\"]\n",
                    "[storage.tiers.shared]\nkind = \"redis\"\nmax_blob_bytes = \"64 KiB\"\n",
                    "[worker]\nembedded = false\n"
                ),
                url, cluster
            )),
            ..Options::on(Runtime::Glommio)
        },
    )
    .await
}

/// A counter of Redis's `INFO` (`section`), by name.
/// (A command's statistics appear at its first call: absent is 0; any other counter must be
/// there.)
fn info(redis: &RedisServer, section: &str, name: &str) -> u64 {
    let text = redis.command(&format!("INFO {section}\r\n")).unwrap();
    let found = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")));
    assert!(
        found.is_some() || name.starts_with("cmdstat_"),
        "Redis reports no {name} (Redis 6 or later is needed)"
    );
    found.map_or(0, |v| {
        let v = v.split(',').next().unwrap_or(v);
        v.trim_start_matches("calls=").trim().parse().unwrap()
    })
}

// A `redis` tier in the chain shares small blobs between servers: a blob uploaded to a is
// found and read on b (and then kept by b, which serves it with Redis gone); a large one is
// not shared. FindMissingBlobs of 12,000 digests costs Redis 12,000 TOUCH (rather than
// EXISTS, so that what is found is marked used in Redis's LRU) in a few pipelined round trips
// (its writes to the connection, one or a few per pipeline, not one per key). A value of the
// digest's length that does not hash to it is never served. With Redis down, what b
// does not hold is answered missing by FindMissingBlobs and UNAVAILABLE (naming Redis) by a
// read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_blobs_are_shared_through_a_redis_tier() {
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = sharing_server(dir.path(), "a", &redis).await;
    let b = sharing_server(dir.path(), "b", &redis).await;
    let (cha, chb) = (a.channel().await, b.channel().await);
    let small = common::blobs::pseudo_random(1, 1000);
    let other = common::blobs::pseudo_random(2, 2000);
    let large = common::blobs::pseudo_random(3, 100 << 10);
    let (ds, dother, dl) = (
        common::blobs::digest(F, &small),
        common::blobs::digest(F, &other),
        common::blobs::digest(F, &large),
    );
    common::exec::upload(
        &cha,
        F,
        vec![
            (ds.clone(), small.clone()),
            (dother.clone(), other.clone()),
            (dl.clone(), large.clone()),
        ],
    )
    .await;
    let missing_on_b = |digests: Vec<reapi::Digest>| {
        let chb = chb.clone();
        async move { common::blobs::find_missing(&chb, "", F, digests).await }
    };
    assert_eq!(
        missing_on_b(vec![ds.clone(), dl.clone()]).await,
        vec![dl.clone()]
    );
    let read = |ch: &Channel, d: &reapi::Digest| {
        let (ch, name) = (ch.clone(), common::blobs::read_name("", F, d));
        async move { common::blobs::read(&ch, &name, 0, 0).await }
    };
    assert_eq!(read(&chb, &ds).await.unwrap(), small);

    // Many digests b does not hold: pipelined.
    let many: Vec<reapi::Digest> = (0..12_000u32)
        .map(|i| common::blobs::digest(F, format!("absent {i}").as_bytes()))
        .collect();
    let (exists, writes) = (
        info(&redis, "commandstats", "cmdstat_touch"),
        info(&redis, "stats", "total_writes_processed"),
    );
    assert_eq!(missing_on_b(many.clone()).await.len(), many.len());
    assert_eq!(
        info(&redis, "commandstats", "cmdstat_touch") - exists,
        12_000
    );
    let round_trips = info(&redis, "stats", "total_writes_processed") - writes;
    assert!(
        round_trips < 100,
        "{round_trips} writes for 12,000 keys: not pipelined"
    );

    // A value that does not hash to its key's digest is dropped, not served.
    let forged = common::blobs::digest(F, b"forged");
    let key = format!(
        "kiln:cas::sha256:{{{}}}{}:{}",
        &forged.hash[..2],
        &forged.hash[2..],
        forged.size_bytes
    );
    assert!(redis
        .command(&format!("SET {key} garbag\r\n"))
        .unwrap()
        .starts_with("+OK"));
    let got = read(&chb, &forged).await;
    assert_eq!(got.map_err(|s| s.code()), Err(Code::NotFound));
    assert!(redis
        .command(&format!("EXISTS {key}\r\n"))
        .unwrap()
        .starts_with(":0"));

    // Redis gone: b serves what it holds; the rest is missing, or unavailable to read.
    redis.stop();
    assert_eq!(read(&chb, &ds).await.unwrap(), small);
    assert_eq!(
        missing_on_b(vec![ds.clone(), dother.clone()]).await,
        vec![dother.clone()]
    );
    let e = read(&chb, &dother).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("Redis at 127.0.0.1:"), "{e:?}");
    a.stop().await;
    b.stop().await;
}

// Redis Cluster (`redis.cluster`, three masters): two servers share action results and small
// blobs through it; FindMissingBlobs of 3,000 digests the server lacks goes out as one
// pipeline per hash tag (a Cluster pipeline must stay in one slot: no CROSSSLOT), every node
// answering its share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shares_results_and_blobs() {
    let cluster = common::redis::RedisCluster::start(3);
    let dir = tempfile::tempdir().unwrap();
    let a = sharing_server_at(dir.path(), "a", &cluster.url(), true).await;
    // b starts from two nodes.
    let seeds = format!("{}, {}", cluster.nodes[1].url(), cluster.nodes[2].url());
    let b = sharing_server_at(dir.path(), "b", &seeds, true).await;
    let (cha, chb) = (a.channel().await, b.channel().await);
    update(&cha, &action("clustered"), &result(5))
        .await
        .unwrap();
    assert_eq!(get(&chb, &action("clustered")).await.unwrap(), result(5));
    let small = common::blobs::pseudo_random(11, 500);
    let ds = common::blobs::digest(F, &small);
    common::exec::upload(&cha, F, vec![(ds.clone(), small.clone())]).await;
    assert!(common::blobs::find_missing(&chb, "", F, vec![ds.clone()])
        .await
        .is_empty());
    let name = common::blobs::read_name("", F, &ds);
    assert_eq!(common::blobs::read(&chb, &name, 0, 0).await.unwrap(), small);

    let many: Vec<reapi::Digest> = (0..3_000u32)
        .map(|i| common::blobs::digest(F, format!("spread {i}").as_bytes()))
        .collect();
    let touches = |s: &RedisServer| info(s, "commandstats", "cmdstat_touch");
    let before: Vec<u64> = cluster.nodes.iter().map(touches).collect();
    assert_eq!(
        common::blobs::find_missing(&chb, "", F, many.clone())
            .await
            .len(),
        many.len()
    );
    let per_node: Vec<u64> = cluster
        .nodes
        .iter()
        .zip(before)
        .map(|(s, b)| touches(s) - b)
        .collect();
    assert_eq!(per_node.iter().sum::<u64>(), 3_000, "{per_node:?}");
    assert!(
        per_node.iter().all(|n| *n > 500),
        "every node answers its share: {per_node:?}"
    );
    a.stop().await;
    b.stop().await;
}

// Redis killed and started again under load: calls go on throughout (four clients updating
// and reading results), every failure a clear UNAVAILABLE naming Redis (a lookup is a miss),
// none hanging, and once Redis is back updates succeed again by themselves; the server never
// falls over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_under_load() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = server(dir.path(), "a", &redis).await;
    let ch = a.channel().await;
    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut clients = Vec::new();
    for c in 0..4 {
        let (ch, stop, ok, failed) = (ch.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let act = action(&format!("load {c} {i}"));
                match update(&ch, &act, &result(1)).await {
                    Ok(()) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                        assert!(e.message().contains("Redis at 127.0.0.1:"), "{e:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Held by the server itself whether or not Redis took it.
                assert_eq!(get(&ch, &act).await.unwrap(), result(1));
                let miss = get(&ch, &action(&format!("absent {c} {i}"))).await;
                assert_eq!(miss.map_err(|s| s.code()), Err(Code::NotFound));
            }
        }));
    }
    let at_least = |counter: Arc<AtomicU64>, n: u64| async move {
        let start = counter.load(Ordering::Relaxed);
        common::eventually("calls to go on", || {
            let counter = counter.clone();
            async move { (counter.load(Ordering::Relaxed) >= start + n).then_some(()) }
        })
        .await
    };
    at_least(ok.clone(), 20).await;
    redis.stop();
    at_least(failed.clone(), 20).await;
    redis.restart();
    at_least(ok.clone(), 20).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    a.stop().await;
}

// Operations shared through Redis: an operation server a accepted (and runs, on its own
// worker) is seen through server b: GetOperation while it runs, and WaitExecution on b
// follows it to its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_accepted_by_one_server_is_watched_through_another() {
    use kiln_proto::longrunning::operations_client::OperationsClient;
    use kiln_proto::longrunning::GetOperationRequest;
    use kiln_proto::reapi::execution_client::ExecutionClient;
    use kiln_proto::reapi::ExecuteRequest;
    use prost::Message;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let runs = Kiln::start_async(
        &dir.path().join("a"),
        Options {
            config: Some(format!("[redis]\nurl = \"{}\"\n", redis.url())),
            ..Options::on(Runtime::Glommio)
        },
    )
    .await;
    let watches = server(dir.path(), "b", &redis).await;
    let (cha, chb) = (runs.channel().await, watches.channel().await);
    let (flag, started) = (dir.path().join("flag"), dir.path().join("started"));
    let hold = common::exec::Spec::script(&format!(
        "touch {}; while [ ! -e {} ]; do sleep 0.02; done; echo held",
        started.display(),
        flag.display()
    ))
    .upload(&cha, F)
    .await;
    let mut on_a = ExecutionClient::new(cha.clone())
        .execute(ExecuteRequest {
            action_digest: Some(hold),
            digest_function: F as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let name = on_a.message().await.unwrap().unwrap().name;
    common::eventually("the action to start", || async {
        started.exists().then_some(())
    })
    .await;
    let get_on_b = || {
        let (chb, name) = (chb.clone(), name.clone());
        async move {
            OperationsClient::new(chb)
                .get_operation(GetOperationRequest { name })
                .await
                .map(|r| r.into_inner())
        }
    };
    common::eventually("b to see a's operation", || async { get_on_b().await.ok() }).await;
    let running = get_on_b().await.unwrap();
    assert!(!running.done, "running");
    let stage = kiln_proto::reapi::ExecuteOperationMetadata::decode(
        running.metadata.unwrap().value.as_slice(),
    )
    .unwrap()
    .stage;
    assert_eq!(
        stage,
        kiln_proto::reapi::execution_stage::Value::Executing as i32
    );
    let delete = |ch: Channel| {
        let name = name.clone();
        async move {
            OperationsClient::new(ch)
                .delete_operation(kiln_proto::longrunning::DeleteOperationRequest { name })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    // Running: not deleted, through either server.
    assert_eq!(delete(chb.clone()).await, Err(Code::FailedPrecondition));
    let on_b = watching(&chb, &name).await;
    std::fs::write(&flag, b"").unwrap();
    let response = on_b.await.unwrap();
    assert_eq!(common::exec::code(&response), 0, "{response:?}");
    assert!(get_on_b().await.unwrap().done);
    // Deleted through b once finished: gone from b at once, and from a once a has done as
    // b asked.
    assert_eq!(delete(chb.clone()).await, Ok(()));
    assert_eq!(
        get_on_b().await.map(|_| ()).map_err(|s| s.code()),
        Err(Code::NotFound)
    );
    common::eventually("a to forget it as b asked", || async {
        let on_a = OperationsClient::new(cha.clone())
            .get_operation(GetOperationRequest { name: name.clone() })
            .await;
        (on_a.map_err(|s| s.code()).err() == Some(Code::NotFound)).then_some(())
    })
    .await;
    // Cancelled through b while it runs on a.
    let never = common::exec::Spec::script("while true; do sleep 0.02; done")
        .upload(&cha, F)
        .await;
    let (second, _second) = accepted(&cha, never).await;
    let cancelled = watching(&cha, &second).await;
    common::eventually("b to see a's second operation", || async {
        OperationsClient::new(chb.clone())
            .get_operation(GetOperationRequest {
                name: second.clone(),
            })
            .await
            .ok()
    })
    .await;
    OperationsClient::new(chb.clone())
        .cancel_operation(kiln_proto::longrunning::CancelOperationRequest {
            name: second.clone(),
        })
        .await
        .unwrap();
    let response = cancelled.await.unwrap();
    assert_eq!(
        common::exec::code(&response),
        Code::Cancelled as i32,
        "{response:?}"
    );
    drop(on_a);
    runs.stop().await;
    watches.stop().await;
}

/// The options of a server of a farm that shares operations and small blobs through the
/// Redis at `url`, with no worker of its own, a short lease, and workers lost after 3 s of
/// silence.
fn farm_options(url: &str) -> Options {
    Options {
        config: Some(format!(
            concat!(
                "[redis]\nurl = \"{}\"\ntimeout_ms = 500\nlease_secs = 3\n",
                "[storage]\nchain = [\"memory\", \"shared\", \"filesystem\"]\n",
                "[storage.tiers.shared]\nkind = \"redis\"\nmax_blob_bytes = \"64 KiB\"\n",
                "{}"
            ),
            url,
            common::exec::NO_EMBEDDED
        )),
        ..Options::on(Runtime::Glommio)
    }
}

/// A server with [`farm_options`], its data under `dir/name`.
async fn farm_server(dir: &std::path::Path, name: &str, url: &str) -> Kiln {
    Kiln::start_async(&dir.join(name), farm_options(url)).await
}

/// Opens WaitExecution on `name` through `ch`, and follows it (in a task) to its end, within
/// a minute.
async fn watching(
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
fn held(dir: &std::path::Path, tag: &str) -> common::exec::Spec {
    common::exec::Spec::script(&format!(
        "echo {tag} >> {starts}; while [ ! -e {flag} ]; do sleep 0.02; done; echo {tag} >> {log}",
        starts = dir.join("starts").display(),
        flag = dir.join(format!("flag-{tag}")).display(),
        log = dir.join("log").display(),
    ))
}

/// The lines of `file` under `dir`, sorted (none when it is missing).
fn lines(dir: &std::path::Path, file: &str) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// Kills `kiln` with SIGKILL and waits for it.
async fn kill(mut kiln: Kiln) {
    kiln.signal(libc::SIGKILL);
    tokio::task::spawn_blocking(move || {
        kiln.wait();
    })
    .await
    .unwrap();
}

// Server a is killed (SIGKILL) with two actions running on worker wa (which serves a and b)
// and two queued: server b takes them over under the same names. The running ones go on
// where they run (wa kept them as orphans, and b adopted them: neither is started again);
// a queued one runs on b's worker wb; the other, cancelled through b just after the kill
// (a's lease not lapsed yet), is cancelled when b takes it over. Every action starts and
// completes at most once, and watchers on b, started before the kill, see every result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_servers_operations_are_taken_over_and_complete_once() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = farm_server(dir.path(), "a", &redis.url()).await;
    let b = farm_server(dir.path(), "b", &redis.url()).await;
    let also_b = format!("grpc://{}", b.addr);
    let wa = common::exec::start_worker(
        Runtime::Glommio,
        &a,
        &dir.path().join("wa"),
        "wa",
        &["--scheduler", &also_b, "--max-inflight", "2"],
    )
    .await;
    let wb = common::exec::start_worker(
        Runtime::Glommio,
        &b,
        &dir.path().join("wb"),
        "wb",
        &["--max-inflight", "3"],
    )
    .await;
    let (cha, chb) = (a.channel().await, b.channel().await);
    let mut names = Vec::new();
    let mut on_a = Vec::new();
    for tag in ["one", "two", "three", "four"] {
        let (name, stream) = accepted(&cha, held(dir.path(), tag).upload(&cha, F).await).await;
        names.push(name);
        on_a.push(stream);
    }
    common::eventually("wa to start the first two actions", || async {
        (lines(dir.path(), "starts") == ["one", "two"]).then_some(())
    })
    .await;
    // Watchers on b, before the kill.
    let mut watchers = Vec::new();
    for name in &names {
        common::eventually("b to see a's operation", || {
            let (chb, name) = (chb.clone(), name.clone());
            async move {
                kiln_proto::longrunning::operations_client::OperationsClient::new(chb)
                    .get_operation(kiln_proto::longrunning::GetOperationRequest { name })
                    .await
                    .ok()
            }
        })
        .await;
        watchers.push(watching(&chb, name).await);
    }
    kill(a).await;
    drop(on_a);
    // Cancelled through b at once: a's lease has not lapsed, so b asks a, which is gone; b
    // does as asked when it takes a's operations over.
    kiln_proto::longrunning::operations_client::OperationsClient::new(chb.clone())
        .cancel_operation(kiln_proto::longrunning::CancelOperationRequest {
            name: names[3].clone(),
        })
        .await
        .unwrap();
    // b takes over once a's lease lapses: wb starts the queued one, wa's two are adopted.
    common::eventually("wb to start the queued action", || async {
        lines(dir.path(), "starts")
            .contains(&"three".to_string())
            .then_some(())
    })
    .await;
    common::eventually("b to adopt both actions running on wa", || async {
        (b.log_text()
            .matches("taken over while its worker still runs it")
            .count()
            == 2)
            .then_some(())
    })
    .await;
    for tag in ["one", "two", "three"] {
        std::fs::write(dir.path().join(format!("flag-{tag}")), b"").unwrap();
    }
    let cancelled = watchers.pop().unwrap().await.unwrap();
    assert_eq!(
        common::exec::code(&cancelled),
        tonic::Code::Cancelled as i32,
        "{cancelled:?}"
    );
    let mut ran_on = Vec::new();
    for watcher in watchers {
        let response = watcher.await.unwrap();
        assert_eq!(common::exec::code(&response), 0, "{response:?}");
        ran_on.push(common::exec::worker_of(&response));
    }
    assert_eq!(ran_on, [wa.name.clone(), wa.name.clone(), wb.name.clone()]);
    let mut started = lines(dir.path(), "starts");
    started.retain(|t| t != "four"); // it may have started on wb before it was cancelled
    assert_eq!(started, ["one", "three", "two"], "none started twice");
    assert_eq!(
        lines(dir.path(), "log"),
        ["one", "three", "two"],
        "each completed once"
    );
    // Asked again, b answers from what it ran.
    for name in &names[..3] {
        let again = watching(&chb, name).await.await.unwrap();
        assert_eq!(common::exec::code(&again), 0);
    }
    b.stop().await;
}

// One server with Redis, and a worker of its own (`kiln worker`): the server is killed
// (SIGKILL) while an action runs, and restarted on the same address. The worker keeps the
// action running, reconnects, and tells the restarted server it still runs it; the server
// takes over its dead former self's operation, adopts the action where it runs, and a
// client following the operation sees it end. It started once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_adopts_what_its_worker_still_runs() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let listen = common::free_port_below_ephemeral();
    let a = Kiln::start_async(
        &dir.path().join("a"),
        Options {
            listen: Some(listen.clone()),
            ..farm_options(&redis.url())
        },
    )
    .await;
    // Reconnecting at least every second.
    let config = dir.path().join("worker.toml");
    std::fs::write(&config, "[worker]\nmax_reconnect_delay_secs = 1\n").unwrap();
    let w = common::exec::start_worker(
        Runtime::Glommio,
        &a,
        &dir.path().join("w"),
        "w",
        &["--config", config.to_str().unwrap()],
    )
    .await;
    let cha = a.channel().await;
    let (name, stream) = accepted(&cha, held(dir.path(), "one").upload(&cha, F).await).await;
    common::eventually("the action to start", || async {
        (lines(dir.path(), "starts") == ["one"]).then_some(())
    })
    .await;
    kill(a).await;
    drop(stream);
    let restarted = Kiln::start_async(
        &dir.path().join("a"),
        Options {
            listen: Some(listen),
            ..farm_options(&redis.url())
        },
    )
    .await;
    let ch = restarted.channel().await;
    let follow = watching(&ch, &name).await;
    common::eventually("the restarted server to adopt the action", || async {
        restarted
            .log_text()
            .contains("taken over while its worker still runs it")
            .then_some(())
    })
    .await;
    std::fs::write(dir.path().join("flag-one"), b"").unwrap();
    let response = follow.await.unwrap();
    assert_eq!(common::exec::code(&response), 0, "{response:?}");
    assert_eq!(common::exec::worker_of(&response), w.name);
    assert_eq!(lines(dir.path(), "starts"), ["one"], "started once");
    assert_eq!(lines(dir.path(), "log"), ["one"]);
    restarted.stop().await;
}

/// `kiln_worker_slots{worker="NAME"}` on `kiln`, once exported.
async fn slots(kiln: &Kiln, worker: &str) -> Option<f64> {
    common::metric_if_any(
        &kiln.admin,
        &format!("kiln_worker_slots{{worker=\"{worker}\"}}"),
    )
    .await
}

/// Executes `spec` through `ch`, returning the operation's name once accepted, and the rest
/// of its stream.
async fn accepted(
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

// One worker serves two servers of a farm (`--scheduler a --scheduler b`, one slot): while
// a's action holds its slot, b is told it has none and keeps its action queued, then runs it
// once the slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_two_servers_sharing_its_slot() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = farm_server(dir.path(), "a", &redis.url()).await;
    let b = farm_server(dir.path(), "b", &redis.url()).await;
    let both = format!("grpc://{}", b.addr);
    let _w = common::exec::start_worker(
        Runtime::Glommio,
        &a,
        &dir.path().join("w"),
        "w",
        &["--scheduler", &both, "--max-inflight", "1"],
    )
    .await;
    for server in [&a, &b] {
        common::eventually("the worker to join both servers", || async {
            (slots(server, "w").await == Some(1.0)).then_some(())
        })
        .await;
    }
    let (cha, chb) = (a.channel().await, b.channel().await);
    let path = |name: &str| dir.path().join(name);
    let (x, _x_stream) = accepted(&cha, held(dir.path(), "x").upload(&cha, F).await).await;
    common::eventually("a's action to start", || async {
        (lines(dir.path(), "starts") == ["x"]).then_some(())
    })
    .await;
    common::eventually("b to be told the worker's slot is taken", || async {
        (slots(&b, "w").await == Some(0.0)).then_some(())
    })
    .await;
    let y_action = common::exec::Spec::script(&format!("touch {}", path("started-y").display()))
        .upload(&chb, F)
        .await;
    let (y, _y_stream) = accepted(&chb, y_action).await;
    let stage = |ch: Channel, name: String| async move {
        let op = kiln_proto::longrunning::operations_client::OperationsClient::new(ch)
            .get_operation(kiln_proto::longrunning::GetOperationRequest { name })
            .await
            .unwrap()
            .into_inner();
        <kiln_proto::reapi::ExecuteOperationMetadata as prost::Message>::decode(
            op.metadata.unwrap().value.as_slice(),
        )
        .unwrap()
        .stage
    };
    // Nothing changes b's view of the worker until x's process exits.
    assert_eq!(
        stage(chb.clone(), y.clone()).await,
        kiln_proto::reapi::execution_stage::Value::Queued as i32
    );
    assert!(!path("started-y").exists());
    let (on_a, on_b) = (watching(&cha, &x).await, watching(&chb, &y).await);
    std::fs::write(path("flag-x"), b"").unwrap();
    for response in [on_a.await.unwrap(), on_b.await.unwrap()] {
        assert_eq!(common::exec::code(&response), 0, "{response:?}");
        assert_eq!(common::exec::worker_of(&response), "w");
    }
    assert_eq!(lines(dir.path(), "log"), ["x"]);
    a.stop().await;
    b.stop().await;
}

/// ListOperations through `ch`: the names of a page, and its token.
async fn listed(ch: &Channel, filter: &str, size: i32, token: &str) -> (Vec<String>, String) {
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

// ListOperations on any server of a farm lists the farm's operations, a's and b's, in name
// order, in pages whose token resumes after the last, filtered by stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_listed_across_the_farm() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = farm_server(dir.path(), "a", &redis.url()).await;
    let b = farm_server(dir.path(), "b", &redis.url()).await;
    let mut workers = Vec::new();
    for (server, name) in [(&a, "wa"), (&b, "wb")] {
        let wdir = dir.path().join(name);
        workers.push(common::exec::start_worker(Runtime::Glommio, server, &wdir, name, &[]).await);
    }
    let (cha, chb) = (a.channel().await, b.channel().await);
    let (x, _x) = accepted(&cha, held(dir.path(), "x").upload(&cha, F).await).await;
    let (y, _y) = accepted(&chb, held(dir.path(), "y").upload(&chb, F).await).await;
    let mut both = vec![x.clone(), y.clone()];
    both.sort();
    common::eventually("both actions to start", || async {
        (lines(dir.path(), "starts") == ["x", "y"]).then_some(())
    })
    .await;
    for ch in [&cha, &chb] {
        common::eventually("each server to list both executing", || async {
            (listed(ch, "stage=EXECUTING", 0, "").await.0 == both).then_some(())
        })
        .await;
        let (first, token) = listed(ch, "stage=EXECUTING", 1, "").await;
        assert_eq!(first, both[..1]);
        assert!(!token.is_empty());
        let (second, _) = listed(ch, "stage=EXECUTING", 1, &token).await;
        assert_eq!(second, both[1..]);
        let (queued, _) = listed(ch, "stage=QUEUED", 0, "").await;
        assert!(queued.is_empty(), "{queued:?}");
    }
    let (on_a, on_b) = (watching(&cha, &x).await, watching(&chb, &y).await);
    for tag in ["x", "y"] {
        std::fs::write(dir.path().join(format!("flag-{tag}")), b"").unwrap();
    }
    on_a.await.unwrap();
    on_b.await.unwrap();
    for ch in [&cha, &chb] {
        common::eventually("each server to list both completed", || async {
            (listed(ch, "stage=COMPLETED", 0, "").await.0 == both).then_some(())
        })
        .await;
    }
    drop(workers);
    a.stop().await;
    b.stop().await;
}

// Identical actions are merged across the farm: an action running for server a's client is
// executed through server b too; b's client follows a's operation (the same name) instead of
// b running it again, and both see its one result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_actions_are_merged_across_servers() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = farm_server(dir.path(), "a", &redis.url()).await;
    let b = farm_server(dir.path(), "b", &redis.url()).await;
    let mut workers = Vec::new();
    for (server, name) in [(&a, "wa"), (&b, "wb")] {
        let wdir = dir.path().join(name);
        workers.push(common::exec::start_worker(Runtime::Glommio, server, &wdir, name, &[]).await);
    }
    let (cha, chb) = (a.channel().await, b.channel().await);
    let action = held(dir.path(), "m").upload(&cha, F).await;
    let (on_a, _a) = accepted(&cha, action.clone()).await;
    common::eventually("the action to start on a's worker", || async {
        (lines(dir.path(), "starts") == ["m"]).then_some(())
    })
    .await;
    // Shared as executing (a writes it named as the one running the action first).
    common::eventually("b to list a's operation as executing", || async {
        (listed(&chb, "stage=EXECUTING", 0, "").await.0 == [on_a.clone()]).then_some(())
    })
    .await;
    let (on_b, _b) = accepted(&chb, action).await;
    assert_eq!(on_b, on_a, "b's client follows a's operation");
    let (first, second) = (watching(&cha, &on_a).await, watching(&chb, &on_b).await);
    std::fs::write(dir.path().join("flag-m"), b"").unwrap();
    for response in [first.await.unwrap(), second.await.unwrap()] {
        assert_eq!(common::exec::code(&response), 0, "{response:?}");
        assert_eq!(common::exec::worker_of(&response), "wa");
    }
    assert_eq!(lines(dir.path(), "starts"), ["m"], "run once");
    // A failed action (exit 1: kept in no action cache) is merged the same, and served as
    // it is; the same action twice through a is merged by a's scheduler.
    let mut failing = held(dir.path(), "f");
    failing.script = format!("{}; exit 1", failing.script);
    let failing = failing.upload(&cha, F).await;
    let (on_a, _a) = accepted(&cha, failing.clone()).await;
    let (again_a, _a2) = accepted(&cha, failing.clone()).await;
    assert_eq!(again_a, on_a, "merged on a");
    common::eventually("b to list the failing operation as executing", || async {
        (listed(&chb, "stage=EXECUTING", 0, "").await.0 == [on_a.clone()]).then_some(())
    })
    .await;
    let (on_b, mut b_stream) = accepted(&chb, failing).await;
    assert_eq!(on_b, on_a);
    std::fs::write(dir.path().join("flag-f"), b"").unwrap();
    let mut last = None;
    while let Some(op) = b_stream.message().await.unwrap() {
        last = Some(op);
    }
    let last = last.unwrap();
    assert_eq!(last.name, on_a, "served a's failure as it is");
    assert_eq!(lines(dir.path(), "starts"), ["f", "m"], "run once");
    // An output only a's CAS holds (larger than the blobs the servers share through Redis):
    // b's client follows a's operation, then finds the result incomplete on b, and b runs the
    // action itself.
    let mut big = held(dir.path(), "big");
    big.script = format!("head -c 100000 /dev/zero > out; {}", big.script);
    big.outputs = vec!["out".into()];
    let big = big.upload(&cha, F).await;
    let (on_a, _a) = accepted(&cha, big.clone()).await;
    common::eventually("b to list a's second operation as executing", || async {
        (listed(&chb, "stage=EXECUTING", 0, "").await.0 == [on_a.clone()]).then_some(())
    })
    .await;
    let (on_b, mut b_stream) = accepted(&chb, big).await;
    assert_eq!(on_b, on_a, "b's client follows a's operation first");
    std::fs::write(dir.path().join("flag-big"), b"").unwrap();
    let mut last = None;
    while let Some(op) = b_stream.message().await.unwrap() {
        last = Some(op);
    }
    let last = last.expect("b's stream ended with the operation");
    assert!(
        last.done && last.name != on_a,
        "run on b under a name of b's: {last:?}"
    );
    let Some(kiln_proto::longrunning::operation::Result::Response(any)) = last.result else {
        panic!("{last:?}");
    };
    let response =
        <kiln_proto::reapi::ExecuteResponse as prost::Message>::decode(any.value.as_slice())
            .unwrap();
    assert_eq!(common::exec::worker_of(&response), "wb");
    assert_eq!(lines(dir.path(), "starts"), ["big", "big", "f", "m"]);
    drop(workers);
    a.stop().await;
    b.stop().await;
}

// A worker whose session with a live server breaks (frozen with SIGSTOP past the server's
// patience: the server drops it and queues its action again) keeps the action running, and
// when it comes back the server lets the still-queued operation run on there: it starts once.
// Only the worker an operation was sent to may say so: meanwhile, an intruder's session
// naming that operation as its own is told to kill it, not given it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_back_from_a_broken_session_keeps_its_action_and_only_it() {
    use kiln_proto::worker::worker_api_client::WorkerApiClient;
    use kiln_proto::worker::{server_message, worker_message, Hello, WorkerMessage};
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = farm_server(dir.path(), "a", &redis.url()).await;
    let w = common::exec::start_worker(Runtime::Glommio, &a, &dir.path().join("w"), "w", &[]).await;
    let cha = a.channel().await;
    let (name, _stream) = accepted(&cha, held(dir.path(), "one").upload(&cha, F).await).await;
    common::eventually("the action to start", || async {
        (lines(dir.path(), "starts") == ["one"]).then_some(())
    })
    .await;
    w.signal(libc::SIGSTOP);
    common::eventually("the server to queue the action again", || async {
        (common::metric(&a.admin, "kiln_scheduler_queued").await == 1.0).then_some(())
    })
    .await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WorkerMessage {
        message: Some(worker_message::Message::Hello(Hello {
            worker_id: "intruder".into(),
            max_inflight: 0,
            running: vec![name.clone()],
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut told = WorkerApiClient::new(cha.clone())
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let kill = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match told.message().await.unwrap().unwrap().message {
                Some(server_message::Message::Kill(k)) => return k.operation,
                Some(server_message::Message::Adopt(a)) => panic!("adopted by an intruder: {a:?}"),
                _ => {}
            }
        }
    })
    .await
    .expect("the intruder is told to kill what it claims");
    assert_eq!(kill, name);
    drop((tx, told));
    w.signal(libc::SIGCONT);
    let follow = watching(&cha, &name).await;
    common::eventually("w to have it run on where it runs", || async {
        a.log_text()
            .contains("queued again, but its worker still runs it")
            .then_some(())
    })
    .await;
    std::fs::write(dir.path().join("flag-one"), b"").unwrap();
    let response = follow.await.unwrap();
    assert_eq!(common::exec::worker_of(&response), "w");
    assert_eq!(lines(dir.path(), "starts"), ["one"], "started once");
    a.stop().await;
}
