//! Operations shared by the servers of a farm through Redis: watched, listed, cancelled and
//! deleted through any server; identical actions merged across servers; one worker serving
//! two servers, its slots shared between them.

#[macro_use]
mod common;

use common::redis::RedisServer;
use common::redis_farm::*;
use common::{Kiln, Options, Runtime};
use kiln_proto::reapi::digest_function::Value as Function;
use tonic::transport::Channel;
use tonic::Code;

const F: Function = Function::Sha256;

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

// One worker serves two servers of a farm (`--scheduler a --scheduler b`, one slot): while
// a's action holds its slot, b is told it has none and keeps its action queued, then runs it
// once the slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_serves_two_servers_sharing_its_slot() {
    let (_redis, dir, a, b) = two_servers().await;
    let both = format!("grpc://{}", b.addr);
    let _w = worker(
        &a,
        dir.path(),
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

// ListOperations on any server of a farm lists the farm's operations, a's and b's, in name
// order, in pages whose token resumes after the last, filtered by stage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_are_listed_across_the_farm() {
    let (_redis, dir, a, b) = two_servers().await;
    let workers = [
        worker(&a, dir.path(), "wa", &[]).await,
        worker(&b, dir.path(), "wb", &[]).await,
    ];
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
    let (_redis, dir, a, b) = two_servers().await;
    let workers = [
        worker(&a, dir.path(), "wa", &[]).await,
        worker(&b, dir.path(), "wb", &[]).await,
    ];
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
