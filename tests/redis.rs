//! Kiln with a real `redis-server` (`[redis]`): the action cache and small blobs shared by two
//! servers, completeness still checked against each server's own CAS, Redis going away or
//! freezing (lookups that need it miss, writes fail with UNAVAILABLE naming Redis, none hangs,
//! results the server holds itself are still served) and coming back (Kiln recovers by
//! itself).

#[macro_use]
mod common;

use common::redis::RedisServer;
use common::redis_farm::server;
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

// A server that drops a result it cannot use (here: over a check budget lowered since it
// stored it) takes it out of Redis only if Redis still holds that result: another server's
// newer one stays there, and is served at once by the server that dropped its own; the same
// result is taken out, so the other server no longer finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_result_leaves_another_servers_newer_one_in_redis() {
    use kiln_proto::reapi::{Directory, FileNode, OutputDirectory, Tree};
    use prost::Message;
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let a = server(dir.path(), "a", &redis).await;
    let b = server(dir.path(), "b", &redis).await;
    let (cha, chb) = (a.channel().await, b.channel().await);
    let mut blobs = Vec::new();
    let mut files = Vec::new();
    for i in 0..12 {
        let data = format!("output file {i}").into_bytes();
        let d = common::blobs::digest(F, &data);
        files.push(FileNode {
            name: format!("f{i}"),
            digest: Some(d.clone()),
            ..Default::default()
        });
        blobs.push((d, data));
    }
    let tree = Tree {
        root: Some(Directory {
            files,
            ..Default::default()
        }),
        children: vec![],
    }
    .encode_to_vec();
    let tree_digest = common::blobs::digest(F, &tree);
    blobs.push((tree_digest.clone(), tree));
    common::exec::upload(&cha, F, blobs.clone()).await;
    common::exec::upload(&chb, F, blobs).await;
    let big = ActionResult {
        output_directories: vec![OutputDirectory {
            path: "out".into(),
            tree_digest: Some(tree_digest),
            ..Default::default()
        }],
        ..result(0)
    };
    update(&cha, &action("replaced"), &big).await.unwrap();
    assert_eq!(get(&cha, &action("replaced")).await.unwrap(), big);
    // b stores another result for the action: Redis holds b's; a still holds its own.
    update(&chb, &action("replaced"), &result(5)).await.unwrap();
    // Two more actions with a's result, in Redis and in a; b has never read them.
    for tag in ["dropped", "control"] {
        update(&cha, &action(tag), &big).await.unwrap();
    }
    a.stop().await;
    let a = Kiln::start_async(
        &dir.path().join("a"),
        Options {
            config: Some(format!(
                "[redis]\nurl = \"{}\"\ntimeout_ms = 500\n[worker]\nembedded = false\n[action_cache]\nmax_check_digests = 10\n",
                redis.url()
            )),
            ..Options::on(Runtime::Glommio)
        },
    )
    .await;
    let cha = a.channel().await;
    assert_eq!(
        get(&cha, &action("replaced")).await.unwrap(),
        result(5),
        "a's own result dropped, b's served from Redis"
    );
    assert_eq!(get(&chb, &action("replaced")).await.unwrap(), result(5));
    // a drops its "dropped", which is what Redis holds: gone from Redis too, so b, which would
    // serve it from there (as it does "control"), misses.
    let miss = get(&cha, &action("dropped")).await;
    assert_eq!(miss.map_err(|s| s.code()), Err(Code::NotFound));
    assert_eq!(get(&chb, &action("control")).await.unwrap(), big);
    let miss = get(&chb, &action("dropped")).await;
    assert_eq!(miss.map_err(|s| s.code()), Err(Code::NotFound));
    a.stop().await;
    b.stop().await;
}
