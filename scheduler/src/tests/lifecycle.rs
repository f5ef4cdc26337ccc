//! The queue and the workers' lifecycle: priority, platforms, merging, retries, timeouts,
//! draining, cancelling, shutting down, slots freed while outputs upload.

use super::*;

#[test]
fn priority_then_arrival() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.submit(t, job("late-low", 5, &[])).unwrap();
    s.submit(t, job("urgent", -1, &[])).unwrap();
    s.submit(t, job("normal-1", 0, &[])).unwrap();
    s.submit(t, job("normal-2", 0, &[])).unwrap();
    assert!(dispatched(&mut s).is_empty(), "no worker yet");
    s.worker_joined(t, 1, vec![], 1, false);
    assert_eq!(dispatched(&mut s), vec![(1, "urgent", 1)]);
    let urgent = 2;
    s.reported(t, 1, urgent, "done");
    assert_eq!(dispatched(&mut s), vec![(1, "normal-1", 1)]);
    s.reported(t, 1, 3, "done");
    assert_eq!(dispatched(&mut s), vec![(1, "normal-2", 1)]);
    s.reported(t, 1, 4, "done");
    assert_eq!(dispatched(&mut s), vec![(1, "late-low", 1)]);
}

#[test]
fn platform_matching_and_least_loaded_choice() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(
        t,
        1,
        props(&[("OSFamily", "linux"), ("cores", "8")]),
        4,
        false,
    );
    s.worker_joined(
        t,
        2,
        props(&[("OSFamily", "macos"), ("cores", "8")]),
        4,
        false,
    );
    s.submit(t, job("mac", 0, &[("OSFamily", "macos")]))
        .unwrap();
    s.submit(t, job("any-1", 0, &[])).unwrap();
    s.submit(t, job("any-2", 0, &[])).unwrap();
    s.submit(t, job("windows", 0, &[("OSFamily", "windows")]))
        .unwrap();
    let d = dispatched(&mut s);
    assert!(d.contains(&(2, "mac", 1)), "{d:?}");
    // Worker 2 already runs one, so the next goes to worker 1; then both run one and the
    // tie goes to the lower id.
    assert!(
        d.contains(&(1, "any-1", 1)) && d.contains(&(1, "any-2", 1)),
        "{d:?}"
    );
    assert_eq!(s.queued(), 1, "nothing runs windows");
    assert!(!s.can_be_served(&job("windows", 0, &[("OSFamily", "windows")]).requirements));
    // Minimum: 8 cores hold one 6-core action, not two.
    s.submit(t, job("big-1", 0, &[("cores", "6"), ("OSFamily", "linux")]))
        .unwrap();
    s.submit(t, job("big-2", 0, &[("cores", "6"), ("OSFamily", "linux")]))
        .unwrap();
    assert_eq!(dispatched(&mut s), vec![(1, "big-1", 1)]);
    let big1 = 5;
    s.reported(t, 1, big1, "done");
    assert_eq!(
        dispatched(&mut s),
        vec![(1, "big-2", 1)],
        "cores returned on completion"
    );
}

#[test]
fn identical_actions_share_one_operation() {
    let t = Instant::now();
    let mut s = S::new(config());
    let a = s.submit(t, job("same", 0, &[])).unwrap();
    let b = s.submit(t, job("same", 0, &[])).unwrap();
    assert_eq!((a.op, a.merged, b.op, b.merged), (1, false, 1, true));
    let mut uncached = job("same", 0, &[]);
    uncached.mergeable = false;
    let c = s.submit(t, uncached).unwrap();
    assert_ne!(c.op, a.op, "do_not_cache actions never merge");
    s.worker_joined(t, 1, vec![], 1, false);
    dispatched(&mut s);
    s.reported(t, 1, a.op, "done");
    assert_eq!(finished(&mut s), vec![(a.op, Outcome::Reported("done"))]);
    // Once finished, a new identical submission is a new operation.
    let d = s.submit(t, job("same", 0, &[])).unwrap();
    assert!(!d.merged && d.op != a.op);
}

#[test]
fn worker_loss_requeues_a_bounded_number_of_times() {
    let t = Instant::now();
    let mut s = S::new(config());
    let op = s.submit(t, job("flaky", 0, &[])).unwrap().op;
    s.worker_joined(t, 1, vec![], 1, false);
    assert_eq!(dispatched(&mut s), vec![(1, "flaky", 1)]);
    s.worker_left(t, 1);
    assert_eq!(s.queued(), 1, "re-queued, not failed");
    s.worker_joined(t, 2, vec![], 1, false);
    assert_eq!(dispatched(&mut s), vec![(2, "flaky", 2)]);
    s.worker_left(t, 2);
    let f = finished(&mut s);
    assert_eq!(f.len(), 1);
    assert!(
        matches!(&f[0], (o, Outcome::Failed { kind: ErrorKind::Unavailable, .. }) if *o == op),
        "{f:?}"
    );
    // A late report from a worker the operation was taken from is ignored.
    s.reported(t, 1, op, "late");
    assert!(finished(&mut s).is_empty());
}

#[test]
fn an_action_failing_on_its_own_is_not_retried() {
    let t = Instant::now();
    let mut s = S::new(config());
    let op = s.submit(t, job("fails", 0, &[])).unwrap().op;
    s.worker_joined(t, 1, vec![], 1, false);
    dispatched(&mut s);
    s.reported(t, 1, op, "exit 1");
    assert_eq!(finished(&mut s), vec![(op, Outcome::Reported("exit 1"))]);
    assert_eq!((s.queued(), s.running()), (0, 0));
}

#[test]
fn silent_workers_are_lost_and_overdue_actions_killed() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 2, false);
    s.worker_joined(t, 2, vec![], 1, false);
    let a = s.submit(t, job("a", 0, &[])).unwrap().op;
    dispatched(&mut s);
    // Worker 2 keeps talking, worker 1 goes silent.
    s.worker_seen(t + Duration::from_secs(8), 2);
    s.tick(t + Duration::from_secs(11));
    assert_eq!(s.workers(), 1);
    let commands = s.commands();
    assert!(
        commands.contains(&Command::Disconnect { worker: 1 }),
        "a lost worker's session is closed: {commands:?}"
    );
    // The action moved to worker 2 (attempt 2).
    assert!(
        commands.iter().any(|c| matches!(
            c,
            Command::Dispatch {
                worker: 2,
                payload: "a",
                attempt: 2,
                ..
            }
        )),
        "{commands:?}"
    );
    // It runs past timeout (60 s) plus grace (5 s): killed and failed.
    s.worker_seen(t + Duration::from_secs(70), 2);
    s.tick(t + Duration::from_secs(70));
    assert!(
        finished(&mut s).is_empty(),
        "deadline counts from the dispatch at 11 s"
    );
    s.worker_seen(t + Duration::from_secs(77), 2);
    s.tick(t + Duration::from_secs(77));
    let commands = s.commands();
    assert!(
        commands.contains(&Command::Kill { worker: 2, op: a }),
        "{commands:?}"
    );
    assert!(commands.iter().any(|c| matches!(c, Command::Finished { op, outcome: Outcome::Failed { kind: ErrorKind::TimedOut, .. } } if *op == a)));
}

#[test]
fn draining_workers_get_no_new_work_and_queue_is_bounded() {
    let t = Instant::now();
    let mut s = S::new(SchedulerConfig {
        max_queued: 2,
        ..config()
    });
    s.worker_joined(t, 1, vec![], 4, false);
    s.worker_draining(1);
    s.submit(t, job("x", 0, &[])).unwrap();
    s.submit(t, job("y", 0, &[])).unwrap();
    assert!(dispatched(&mut s).is_empty());
    assert_eq!(
        s.submit(t, job("z", 0, &[])),
        Err(SubmitError::QueueFull(2))
    );
    // Merging into an existing op still works at the bound.
    assert!(s.submit(t, job("x", 0, &[])).unwrap().merged);
}

#[test]
fn cancel_kills_a_running_operation() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, false);
    let op = s.submit(t, job("long", 0, &[])).unwrap().op;
    let queued = s.submit(t, job("next", 0, &[])).unwrap().op;
    dispatched(&mut s);
    s.cancel(t, op);
    let commands = s.commands();
    assert!(commands.contains(&Command::Kill { worker: 1, op }));
    assert!(commands.iter().any(|c| matches!(c, Command::Finished { op: o, outcome: Outcome::Failed { kind: ErrorKind::Cancelled, .. } } if *o == op)));
    assert!(
        commands
            .iter()
            .any(|c| matches!(c, Command::Dispatch { op: o, .. } if *o == queued)),
        "freed slot reused"
    );
}

#[test]
fn shutting_down_fails_what_is_queued_only() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, false);
    let running = s.submit(t, job("running", 0, &[])).unwrap().op;
    let queued = s.submit(t, job("queued", 0, &[])).unwrap().op;
    s.commands();
    s.fail_queued(ErrorKind::Unavailable, "going down");
    let f = finished(&mut s);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].0, queued);
    s.reported(t, 1, running, "done");
    assert_eq!(finished(&mut s), vec![(running, Outcome::Reported("done"))]);
}

#[test]
fn a_finished_process_frees_its_slot_while_outputs_upload() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, props(&[("cores", "4")]), 1, false);
    let first = s.submit(t, job("first", 0, &[("cores", "4")])).unwrap().op;
    s.submit(t, job("second", 0, &[("cores", "4")])).unwrap();
    assert_eq!(dispatched(&mut s), vec![(1, "first", 1)]);
    // Another worker's word, or a repeat, changes nothing.
    s.executed(t, 2, first);
    assert!(dispatched(&mut s).is_empty());
    s.executed(t, 1, first);
    assert_eq!(
        dispatched(&mut s),
        vec![(1, "second", 1)],
        "slot and cores given back when the process exits"
    );
    s.executed(t, 1, first);
    assert!(dispatched(&mut s).is_empty(), "given back once");
    // The uploading action still belongs to the worker: lost with it, then re-run.
    s.worker_left(t, 1);
    assert_eq!(s.queued(), 2);
    s.worker_joined(t, 3, props(&[("cores", "4")]), 1, false);
    assert_eq!(dispatched(&mut s), vec![(3, "first", 2)]);
    // Its result frees nothing twice: the worker's one slot holds exactly one action.
    s.executed(t, 3, first);
    assert_eq!(dispatched(&mut s), vec![(3, "second", 2)]);
    s.reported(t, 3, first, "done");
    assert_eq!(finished(&mut s), vec![(first, Outcome::Reported("done"))]);
    assert!(dispatched(&mut s).is_empty());
    assert_eq!((s.queued(), s.running()), (0, 1));
}

#[test]
fn actions_no_worker_could_run_fail_after_the_unserved_timeout() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, props(&[("OSFamily", "linux")]), 1, false);
    let windows = s
        .submit(t, job("windows", 0, &[("OSFamily", "windows")]))
        .unwrap()
        .op;
    let busy = s
        .submit(t, job("busy", 0, &[("OSFamily", "linux")]))
        .unwrap()
        .op;
    let waiting = s
        .submit(t, job("waiting", 0, &[("OSFamily", "linux")]))
        .unwrap()
        .op;
    s.commands();
    // Before the limit nothing fails; a matching worker that is only busy keeps actions queued.
    s.worker_seen(t + Duration::from_secs(19), 1);
    s.tick(t + Duration::from_secs(20));
    assert!(finished(&mut s).is_empty());
    s.worker_seen(t + Duration::from_secs(29), 1);
    s.tick(t + Duration::from_secs(31));
    let f = finished(&mut s);
    assert_eq!(f.len(), 1, "{f:?}");
    assert!(
        matches!(&f[0], (o, Outcome::Failed { kind: ErrorKind::Precondition, message }) if *o == windows && message.contains("OSFamily=windows")),
        "{f:?}"
    );
    assert_eq!((s.queued(), s.running()), (1, 1));
    // Once the only linux worker is gone, the one waiting since 0 s fails at the next tick;
    // the one its worker was running went back to the queue at 31 s, with a fresh clock.
    s.worker_left(t + Duration::from_secs(31), 1);
    s.tick(t + Duration::from_secs(40));
    let failed: Vec<OpId> = finished(&mut s).into_iter().map(|(op, _)| op).collect();
    assert_eq!(failed, vec![waiting]);
    s.tick(t + Duration::from_secs(60));
    assert!(finished(&mut s).is_empty(), "re-queued at 31 s");
    s.tick(t + Duration::from_secs(62));
    let failed: Vec<OpId> = finished(&mut s).into_iter().map(|(op, _)| op).collect();
    assert_eq!(failed, vec![busy]);
    // 0 in the configuration: wait forever.
    let mut s = S::new(SchedulerConfig {
        unserved_timeout: None,
        ..config()
    });
    s.submit(t, job("patient", 0, &[("OSFamily", "windows")]))
        .unwrap();
    s.tick(t + Duration::from_secs(100_000));
    assert!(finished(&mut s).is_empty());
}

#[test]
fn a_worker_shared_with_other_schedulers_takes_what_its_capacity_says() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 2, false);
    // Another scheduler now runs one action there: one slot left for this one.
    s.worker_capacity(t, 1, 1);
    for name in ["a", "b", "c"] {
        s.submit(t, job(name, 0, &[])).unwrap();
    }
    assert_eq!(dispatched(&mut s).len(), 1);
    // All its slots busy elsewhere: nothing new, what runs runs on.
    s.worker_capacity(t, 1, 0);
    assert!(dispatched(&mut s).is_empty());
    assert_eq!(s.running(), 1);
    // Free again: the queue is served at once.
    s.worker_capacity(t, 1, 3);
    assert_eq!(dispatched(&mut s).len(), 2);
}

#[test]
fn a_job_taken_over_runs_on_where_it_still_runs() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, false);
    let op = s.submit_running(t, job("orphan", 0, &[]), 1).unwrap().op;
    let commands = s.commands();
    assert!(
        commands
            .iter()
            .all(|c| !matches!(c, Command::Dispatch { .. })),
        "nothing sent: {commands:?}"
    );
    assert!(s.is_running_on(op, 1));
    // Its slot is taken: the next waits, and gets it once the process exits.
    s.submit(t, job("next", 0, &[])).unwrap();
    assert!(dispatched(&mut s).is_empty());
    s.executed(t, 1, op);
    assert_eq!(dispatched(&mut s).len(), 1);
    // A worker not connected: queued as usual.
    let queued = s.submit_running(t, job("elsewhere", 0, &[]), 7).unwrap().op;
    assert!(!s.is_running_on(queued, 7));
    assert_eq!(s.queued(), 1);
}

#[test]
fn a_queued_job_found_running_on_a_worker_runs_on_there() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, false);
    let busy = s.submit(t, job("busy", 0, &[])).unwrap().op;
    let orphan = s.submit(t, job("orphan", 0, &[])).unwrap().op;
    assert_eq!(dispatched(&mut s).len(), 1);
    assert!(!s.take_to(t, busy, 1), "not queued");
    assert!(!s.take_to(t, orphan, 9), "no such worker");
    // Worker 2 joins, its one slot taken by the action it still runs.
    s.worker_joined(t, 2, vec![], 0, false);
    assert!(dispatched(&mut s).is_empty());
    assert!(s.take_to(t, orphan, 2));
    assert!(s.is_running_on(orphan, 2));
    assert_eq!(s.queued(), 0);
    assert!(dispatched(&mut s).is_empty(), "nothing sent");
}
