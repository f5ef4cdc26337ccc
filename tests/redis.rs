//! Kiln with a real `redis-server` (`[redis]`): the action cache shared by two servers,
//! completeness still checked against each server's own CAS, Redis going away (calls that
//! need it fail with UNAVAILABLE naming Redis within the timeout, results the server holds
//! itself are still served) and coming back (Kiln recovers by itself).

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

    // Redis goes away: what b holds itself is still served; what it needs Redis for fails
    // with UNAVAILABLE naming Redis, within the timeout.
    redis.stop();
    assert_eq!(get(&chb, &action("one")).await.unwrap(), result(7));
    for outcome in [
        get(&chb, &action("unknown")).await.map(|_| ()),
        update(&chb, &action("three"), &result(3)).await,
    ] {
        let e = outcome.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("Redis at 127.0.0.1:"), "{e:?}");
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
