//! A server of a farm sharing Redis dies (SIGKILL), or its link to a worker breaks: another
//! server, or the same one restarted, takes its operations over; actions still running on
//! workers are adopted where they run, never run twice; only the worker an operation was sent
//! to may say it still runs it.

#[macro_use]
mod common;

use common::redis::RedisServer;
use common::redis_farm::*;
use common::{Kiln, Options};
use kiln_proto::reapi::digest_function::Value as Function;
use std::time::Duration;

const F: Function = Function::Sha256;

// Server a is killed (SIGKILL) with two actions running on worker wa (which serves a and b)
// and two queued: server b takes them over under the same names. The running ones go on
// where they run (wa kept them as orphans, and b adopted them: neither is started again);
// a queued one runs on b's worker wb; the other, cancelled through b just after the kill
// (a's lease not lapsed yet), is cancelled when b takes it over. Every action starts and
// completes at most once, and watchers on b, started before the kill, see every result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_servers_operations_are_taken_over_and_complete_once() {
    let (_redis, dir, a, b) = two_servers().await;
    let also_b = format!("grpc://{}", b.addr);
    let wa = worker(
        &a,
        dir.path(),
        "wa",
        &["--scheduler", &also_b, "--max-inflight", "2"],
    )
    .await;
    let wb = worker(&b, dir.path(), "wb", &["--max-inflight", "3"]).await;
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
        known(&chb, name).await;
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
    let w = worker(&a, dir.path(), "w", &["--config", config.to_str().unwrap()]).await;
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
    adopted_and_run_once(&restarted, dir.path(), follow, &w.name).await;
    restarted.stop().await;
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
    let w = worker(&a, dir.path(), "w", &[]).await;
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

// A server whose host vanishes (frozen with SIGSTOP: its connections stay open, and it says
// nothing more) while its action runs on a worker that serves it and b. The worker's
// session with a does not break (HTTP/2 would notice only tens of seconds later), but a has
// been silent for three of its keep-alive intervals (which a farm sends at least every
// fifth of its lease) before its lease lapses: the worker leaves the session and keeps the
// action for whoever takes it over, and b, taking a's operations over, adopts it where it
// runs. It starts once, and a client following it through b sees it end. (One slot: b
// cannot start it again meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_of_a_vanished_server_is_adopted_where_it_runs() {
    let (_redis, dir, a, b) = two_servers().await;
    let also_b = format!("grpc://{}", b.addr);
    let w = worker(
        &a,
        dir.path(),
        "w",
        &["--scheduler", &also_b, "--max-inflight", "1"],
    )
    .await;
    let (cha, chb) = (a.channel().await, b.channel().await);
    let (name, _stream) = accepted(&cha, held(dir.path(), "one").upload(&cha, F).await).await;
    common::eventually("the action to start", || async {
        (lines(dir.path(), "starts") == ["one"]).then_some(())
    })
    .await;
    known(&chb, &name).await;
    let follow = watching(&chb, &name).await;
    a.signal(libc::SIGSTOP);
    adopted_and_run_once(&b, dir.path(), follow, &w.name).await;
    kill(a).await;
    b.stop().await;
}
