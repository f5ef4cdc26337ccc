//! Blobs shared between workers, end to end: `kiln serve` (its embedded worker off) and two
//! `kiln worker` processes on 127.0.0.1, each serving its CAS to the other, on every
//! data-plane backend. The workers' platform properties decide which one runs an action.
//! (Peers and the server over QUIC and mutual TLS are in tests/quic.rs.)

#[macro_use]
mod common;

use common::exec::{code, execute, start_server, worker_of, Spec};
use common::metric_or_zero as number;
use common::peers::{facts_known, inputs, run_on, worker};
use kiln_proto::reapi::digest_function::Value as Function;

const F: Function = Function::Sha256;

// A blob one worker holds reaches another worker from that worker, not from the server: w1
// runs an action first and so holds its inputs; the same inputs for w2 come from w1 (its
// served-bytes counter moves; the server sends no file of them). Both workers' admin
// listeners and the server's /metrics and /status say so. The race delay is long here, so
// that a slow machine never sends w2 to the server while w1 is healthy.
on_every_runtime! {
    async fn an_input_one_worker_holds_reaches_another_from_that_worker(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let patient = "peer_race_delay_ms = 60000\n";
        let (_w1, admin1) = worker(rt, &kiln, dir.path(), "w1", "a", patient).await;
        let (_w2, admin2) = worker(rt, &kiln, dir.path(), "w2", "b", patient).await;
        let ch = kiln.channel().await;
        let (tree, bytes) = inputs("x");
        let (_, r) = execute(&ch, F, &run_on("a", &tree, "one").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        let first = number(&admin1, "kiln_worker_fetch_bytes_total{source=\"server\"}").await as u64;
        assert!(first >= bytes, "w1 fetched {first} of {bytes} bytes from the server");
        facts_known(&kiln.admin, 23.0).await;
        let read_before = number(&kiln.admin, "kiln_sent_bytes_total{method=\"ByteStream.Read\"}").await;
        let batch_before = number(&kiln.admin, "kiln_sent_bytes_total{method=\"CAS.BatchReadBlobs\"}").await;

        let (_, r) = execute(&ch, F, &run_on("b", &tree, "two").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        let out = common::exec::read_output(&ch, F, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
        assert_eq!(out, format!("{bytes}\ntwo\n").into_bytes());
        assert_eq!(number(&admin2, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await as u64, bytes, "every input file from w1");
        assert_eq!(number(&admin2, "kiln_worker_peer_failures_total").await, 0.0);
        let served = number(&admin1, "kiln_worker_served_bytes_total").await as u64;
        assert!(served >= bytes, "w1 served {served} of {bytes} bytes");
        let read_after = number(&kiln.admin, "kiln_sent_bytes_total{method=\"ByteStream.Read\"}").await;
        assert!(read_after - read_before < (1 << 20) as f64, "the server streamed the large input again: {read_before} -> {read_after}");
        // Only w2's Directory blobs came from the server: far less than the small files.
        let batch_after = number(&kiln.admin, "kiln_sent_bytes_total{method=\"CAS.BatchReadBlobs\"}").await;
        assert!(batch_after - batch_before < 4096.0, "{batch_before} -> {batch_after}");

        // The server exports what the workers report, and shows it.
        common::eventually("w2's report of its transfers", || {
            let admin = kiln.admin.clone();
            async move {
                let peer = number(&admin, "kiln_worker_fetch_bytes_total{worker=\"w2\",source=\"peer\"}").await;
                let served = number(&admin, "kiln_worker_served_bytes_total{worker=\"w1\"}").await;
                (peer as u64 == bytes && served as u64 >= bytes).then_some(())
            }
        })
        .await;
        let (_, status) = common::curl(&format!("{}/status", kiln.admin), &[]);
        assert!(status.contains("id=\"workers\"") && status.contains("<th>w2</th>"), "{status}");
        assert!(status.contains("3.0 MiB from peers"), "{status}");
        kiln.stop().await;
    }
}

// A peer that stops answering (here: stopped with SIGSTOP while it is still connected, so
// the scheduler still names it) costs the worker the race delay, not the action: the server
// is asked too, its copy wins, and the peer's request is cancelled.
on_every_runtime! {
    async fn a_stalled_peer_leaves_the_worker_to_the_server(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let (w1, _) = worker(rt, &kiln, dir.path(), "w1", "a", "").await;
        // A delay no fetch on this host comes near, so that the fetch's length shows w2 asked
        // (and waited for) w1 before the server.
        let (_w2, admin2) = worker(rt, &kiln, dir.path(), "w2", "b", "peer_race_delay_ms = 1500\n").await;
        let ch = kiln.channel().await;
        let (tree, bytes) = inputs("y");
        let (_, r) = execute(&ch, F, &run_on("a", &tree, "one").upload(&ch, F).await, false).await.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        facts_known(&kiln.admin, 23.0).await;
        let action = run_on("b", &tree, "two").upload(&ch, F).await;
        w1.signal(libc::SIGSTOP);
        let result = execute(&ch, F, &action, false).await;
        w1.signal(libc::SIGCONT);
        let (_, r) = result.unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w2"), "{r:?}");
        let from_server = number(&admin2, "kiln_worker_fetch_bytes_total{source=\"server\"}").await as u64;
        assert!(from_server >= bytes, "{from_server} of {bytes} bytes from the server");
        assert_eq!(number(&admin2, "kiln_worker_fetch_bytes_total{source=\"peer\"}").await, 0.0);
        let meta = r.result.unwrap().execution_metadata.unwrap();
        let at = |t: Option<prost_types::Timestamp>| {
            let t = t.unwrap();
            t.seconds as f64 + f64::from(t.nanos) / 1e9
        };
        let fetch = at(meta.input_fetch_completed_timestamp) - at(meta.input_fetch_start_timestamp);
        assert!(fetch >= 1.5, "w2 waited {fetch:.3} s: it was not hinted to ask w1 first");
        kiln.stop().await;
    }
}

// An action that must wait for the only worker has its inputs fetched ahead by that worker
// while it runs the action before it, and then runs there without fetching them again.
on_every_runtime! {
    async fn a_waiting_action_has_its_inputs_fetched_while_the_worker_is_busy(rt: Runtime) {
        let dir = tempfile::tempdir().unwrap();
        let kiln = start_server(rt, dir.path()).await;
        let (_w, admin) = worker(rt, &kiln, dir.path(), "w1", "a", "").await;
        let ch = kiln.channel().await;
        let (flag, started) = (dir.path().join("flag"), dir.path().join("started"));
        let hold = Spec {
            platform: vec![("pool".into(), "a".into())],
            ..Spec::script(&format!("touch {}; while [ ! -e {} ]; do sleep 0.02; done", started.display(), flag.display()))
        };
        let hold = hold.upload(&ch, F).await;
        let held = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &hold, false).await }) };
        common::eventually("the holding action to start", || async { started.exists().then_some(()) }).await;
        let from_server = || async { number(&admin, "kiln_worker_fetch_bytes_total{source=\"server\"}").await as u64 };
        let before = from_server().await;
        let (tree, bytes) = inputs("p");
        let waiting = run_on("a", &tree, "later").upload(&ch, F).await;
        let later = { let ch = ch.clone(); tokio::spawn(async move { execute(&ch, F, &waiting, false).await }) };
        // Fetched while the worker is still busy with the first action (which ends only once
        // the flag below is written).
        common::eventually("the waiting action's inputs to be fetched ahead", || async {
            (from_server().await >= before + bytes).then_some(())
        })
        .await;
        let fetched_ahead = from_server().await;
        std::fs::write(&flag, b"").unwrap();
        let (_, r) = held.await.unwrap().unwrap();
        assert_eq!(code(&r), 0, "{r:?}");
        let (_, r) = later.await.unwrap().unwrap();
        assert_eq!((code(&r), worker_of(&r).as_str()), (0, "w1"), "{r:?}");
        let out = common::exec::read_output(&ch, F, r.result.unwrap().stdout_digest.as_ref().unwrap()).await;
        assert_eq!(out, format!("{bytes}\nlater\n").into_bytes());
        assert!(from_server().await < fetched_ahead + 4096, "no input fetched twice (only Directory blobs)");
        let placed = number(&kiln.admin, "kiln_scheduler_placements_total{reason=\"prefetched\"}").await;
        assert_eq!(placed, 1.0);
        kiln.stop().await;
    }
}
