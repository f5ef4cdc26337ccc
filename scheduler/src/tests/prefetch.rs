//! Fetching inputs ahead for actions that wait for a busy worker.

use super::*;

/// The prefetches among the commands, as (worker, payload, digests named, hints).
fn prefetches(s: &mut S) -> Vec<(WorkerId, &'static str, usize, Hints)> {
    s.commands()
        .into_iter()
        .filter_map(|c| match c {
            Command::Prefetch {
                worker,
                payload,
                digests,
                peers,
                ..
            } => Some((
                worker,
                payload,
                digests.len(),
                peers.into_iter().map(|(w, d)| (w, d.len())).collect(),
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn a_waiting_action_has_its_inputs_fetched_ahead_by_the_busy_worker_holding_most_of_them() {
    let t = Instant::now();
    let mut s = S::new(config());
    for w in 1..=3 {
        s.worker_joined(t, w, vec![], 1, true);
    }
    // Worker 2 holds 20 of 30 input bytes; 3 holds 10.
    s.worker_blobs(2, true, vec![file(20)], vec![]);
    s.worker_blobs(3, true, vec![file(10)], vec![]);
    for name in ["busy-1", "busy-2", "busy-3"] {
        s.submit(t, job(name, 0, &[])).unwrap();
    }
    s.commands();
    s.submit(t, with_inputs("waits", &[10, 20])).unwrap();
    assert_eq!(
        prefetches(&mut s),
        vec![(2, "waits", 1, vec![(3, 1)])],
        "worker 2 fetches what it lacks (file 10), from worker 3"
    );
    // One action per worker: the next waiting one goes to another busy worker.
    s.submit(t, with_inputs("also", &[20])).unwrap();
    assert_eq!(prefetches(&mut s), vec![(1, "also", 1, vec![(2, 1)])]);
    // Worker 1 frees first: "waits" is first in the queue but its prefetcher is busy, so it
    // takes worker 1 as usual (a free worker never waits for the prefetcher).
    s.reported(t, 1, 1, "done");
    let placed = dispatched(&mut s);
    assert_eq!(placed, vec![(1, "waits", 1)]);
    // Worker 2 frees: "also" was fetched ahead by worker 1, busy again, so it goes to worker
    // 2 by the bytes worker 2 holds.
    s.reported(t, 2, 2, "done");
    assert_eq!(dispatched(&mut s), vec![(2, "also", 1)]);
    assert_eq!(s.placements().input_blobs, 1);
    // A prefetcher that frees first gets its action.
    s.submit(t, with_inputs("third", &[30])).unwrap();
    let ahead = prefetches(&mut s);
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    let prefetcher = ahead[0].0;
    let running_on = |s: &S, w: WorkerId| (1..=6).find(|op| s.is_running_on(*op, w));
    let busy_op = running_on(&s, prefetcher).expect("the prefetcher runs something");
    s.reported(t, prefetcher, busy_op, "done");
    assert_eq!(dispatched(&mut s), vec![(prefetcher, "third", 1)]);
    assert_eq!(s.placements().prefetched, 1);
    // A worker that leaves gives up its prefetch: the action may be fetched ahead again.
    s.submit(t, with_inputs("fourth", &[40])).unwrap();
    let ahead = prefetches(&mut s);
    assert_eq!(ahead.len(), 1, "{ahead:?}");
    let gone = ahead[0].0;
    s.worker_left(t, gone);
    let again = prefetches(&mut s);
    assert!(
        again
            .iter()
            .any(|(w, p, _, _)| *w != gone && *p == "fourth"),
        "{again:?}"
    );
    assert!(again.iter().all(|(w, _, _, _)| *w != gone));
}

#[test]
fn an_action_whose_root_a_worker_caches_waits_for_it_rather_than_being_fetched_ahead() {
    let t = Instant::now();
    let mut s = S::new(config());
    for w in 1..=2 {
        s.worker_joined(t, w, vec![], 1, true);
    }
    holds(&mut s, t, 2, 7);
    s.submit(t, job("busy-1", 0, &[])).unwrap();
    s.submit(t, job("busy-2", 0, &[])).unwrap();
    s.commands();
    let cached = Job {
        inputs: vec![file(5)].into(),
        ..rooted("cached", 7)
    };
    s.submit(t, cached).unwrap();
    assert!(prefetches(&mut s).is_empty(), "worker 2 caches its root");
    let fresh = Job {
        inputs: vec![file(6)].into(),
        ..rooted("fresh", 8)
    };
    s.submit(t, fresh).unwrap();
    assert_eq!(prefetches(&mut s).len(), 1);
}

// A root cached only by a worker that could never run the action (another platform) does not
// hold the action back from being fetched ahead.
#[test]
fn a_root_cached_by_a_worker_that_cannot_run_the_action_does_not_stop_fetching_ahead() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, props(&[("os", "linux")]), 1, true);
    s.worker_joined(t, 2, props(&[("os", "mac")]), 1, true);
    holds(&mut s, t, 2, 7);
    s.submit(t, job("busy-1", 0, &[("os", "linux")])).unwrap();
    s.submit(t, job("busy-2", 0, &[("os", "mac")])).unwrap();
    s.commands();
    let linux_only = Job {
        inputs: vec![file(5)].into(),
        requirements: job("x", 0, &[("os", "linux")]).requirements,
        ..rooted("linux", 7)
    };
    s.submit(t, linux_only).unwrap();
    let fetched: Vec<(WorkerId, &str)> = prefetches(&mut s)
        .into_iter()
        .map(|(w, p, _, _)| (w, p))
        .collect();
    assert_eq!(fetched, vec![(1, "linux")]);
}

// A worker that drains gives up its fetch ahead: at the next event another busy worker
// fetches that action's inputs.
#[test]
fn a_draining_worker_gives_up_its_fetch_ahead() {
    let t = Instant::now();
    let mut s = S::new(config());
    for w in 1..=2 {
        s.worker_joined(t, w, vec![], 1, true);
    }
    s.worker_blobs(1, true, vec![file(20)], vec![]);
    s.submit(t, job("busy-1", 0, &[])).unwrap();
    s.submit(t, job("busy-2", 0, &[])).unwrap();
    s.commands();
    // Worker 1 holds 20 of its 30 bytes, and fetches the rest ahead.
    s.submit(t, with_inputs("waits", &[20, 10])).unwrap();
    let first: Vec<WorkerId> = prefetches(&mut s).iter().map(|p| p.0).collect();
    assert_eq!(first, vec![1], "the worker holding its bytes");
    s.worker_draining(1);
    s.submit(t, job("nudge", 0, &[])).unwrap();
    let again: Vec<(WorkerId, &str)> = prefetches(&mut s).iter().map(|p| (p.0, p.1)).collect();
    assert_eq!(again, vec![(2, "waits")]);
}
