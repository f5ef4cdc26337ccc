use super::*;
use crate::locality::Placements;
use kiln_config::PropertyKind;
use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

type S = Scheduler<&'static str, &'static str>;

fn config() -> SchedulerConfig {
    SchedulerConfig {
        kinds: Kinds(BTreeMap::from([(
            "cores".to_string(),
            PropertyKind::Minimum,
        )])),
        max_retries: 1,
        worker_timeout: Duration::from_secs(10),
        timeout_grace: Duration::from_secs(5),
        max_queued: 100,
        unserved_timeout: Some(Duration::from_secs(30)),
        locality_wait: Duration::from_millis(100),
        max_cached_roots: 1000,
        max_blob_facts: 10_000,
    }
}

fn job(name: &'static str, priority: i32, reqs: &[(&str, &str)]) -> Job<&'static str> {
    let kinds = config().kinds;
    Job {
        key: BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, name.as_bytes()),
        ),
        priority,
        requirements: Requirements::new(
            &kinds,
            reqs.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
        )
        .unwrap(),
        timeout: Duration::from_secs(60),
        mergeable: true,
        queued_at: SystemTime::UNIX_EPOCH,
        input_root: None,
        inputs: Arc::from(Vec::new()),
        payload: name,
    }
}

fn props(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Peer hints as (hinted peer, digests hinted from it).
type Hints = Vec<(WorkerId, usize)>;

/// A dispatch as (worker, payload, attempt, hints).
type Dispatched = (WorkerId, &'static str, u32, Hints);

/// The dispatches among the commands.
fn dispatches(s: &mut S) -> Vec<Dispatched> {
    s.commands()
        .into_iter()
        .filter_map(|c| match c {
            Command::Dispatch {
                worker,
                payload,
                attempt,
                peers,
                ..
            } => Some((
                worker,
                payload,
                attempt,
                peers.into_iter().map(|(w, d)| (w, d.len())).collect(),
            )),
            _ => None,
        })
        .collect()
}

/// The dispatches among the commands, as (worker, payload, attempt).
fn dispatched(s: &mut S) -> Vec<(WorkerId, &'static str, u32)> {
    dispatches(s)
        .into_iter()
        .map(|(w, p, a, _)| (w, p, a))
        .collect()
}

fn finished(s: &mut S) -> Vec<(OpId, Outcome<&'static str>)> {
    s.commands()
        .into_iter()
        .filter_map(|c| match c {
            Command::Finished { op, outcome } => Some((op, outcome)),
            _ => None,
        })
        .collect()
}

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

fn rooted(name: &'static str, root: u8) -> Job<&'static str> {
    Job {
        input_root: Some(BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, &[root]),
        )),
        ..job(name, 0, &[])
    }
}

fn holds(s: &mut S, now: Instant, worker: WorkerId, root: u8) {
    let key = rooted("", root).input_root.unwrap();
    s.worker_roots(now, worker, false, vec![key], vec![]);
}

#[test]
fn an_action_goes_to_the_free_worker_holding_its_input_root() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 2, false);
    s.worker_joined(t, 2, vec![], 2, false);
    holds(&mut s, t, 2, 7);
    s.submit(t, rooted("cached", 7)).unwrap();
    s.submit(t, rooted("elsewhere", 8)).unwrap();
    // Worker 1 would win on load and id; the root is on 2.
    assert_eq!(
        dispatched(&mut s),
        vec![(2, "cached", 1), (1, "elsewhere", 1)]
    );
    assert_eq!(
        s.placements(),
        Placements {
            input_root: 1,
            load: 1,
            ..Placements::default()
        }
    );
    // A full report replaces what was known: root 7 is no longer on 2.
    s.worker_roots(t, 2, true, vec![], vec![]);
    s.submit(t, rooted("forgotten", 7)).unwrap();
    assert_eq!(
        dispatched(&mut s),
        vec![(1, "forgotten", 1)],
        "least loaded: 1 and 2 tie, 1 by id"
    );
}

#[test]
fn an_action_waits_a_little_for_a_busy_holder_then_goes_elsewhere() {
    let t = Instant::now();
    let ms = Duration::from_millis;
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, false);
    s.worker_joined(t, 2, vec![], 1, false);
    holds(&mut s, t, 2, 7);
    s.submit(t, rooted("busy-2", 7)).unwrap();
    assert_eq!(dispatched(&mut s), vec![(2, "busy-2", 1)]);
    // Worker 2 is busy: the next action of that root waits for it, keeping worker 1 for
    // itself, so an action queued behind it cannot overtake it.
    s.submit(t, rooted("wants-2", 7)).unwrap();
    assert_eq!(
        s.wake_at(),
        Some(t + ms(100)),
        "a tick is wanted when the wait ends"
    );
    s.tick(t + ms(50));
    s.submit(t + ms(50), rooted("behind", 9)).unwrap();
    assert!(
        dispatched(&mut s).is_empty(),
        "held, and worker 1 kept for it"
    );
    // The holder frees up within the wait: it gets the action, and the one behind gets 1.
    s.reported(t + ms(60), 2, 1, "done");
    assert_eq!(
        dispatched(&mut s),
        vec![(2, "wants-2", 1), (1, "behind", 1)]
    );
    assert_eq!(s.wake_at(), None);
    // Both busy for long: the wait runs from when another worker could first have taken the
    // action, not from when it was queued.
    s.submit(t + ms(70), rooted("gives-up", 7)).unwrap();
    s.reported(t + ms(500), 1, 3, "done");
    assert!(dispatched(&mut s).is_empty(), "held from 500 ms on");
    s.tick(t + ms(550));
    assert!(dispatched(&mut s).is_empty());
    s.tick(t + ms(600));
    assert_eq!(dispatched(&mut s), vec![(1, "gives-up", 1)]);
    assert_eq!(
        s.placements(),
        Placements {
            input_root: 2,
            load: 1,
            holder_busy: 1,
            ..Placements::default()
        }
    );
}

#[test]
fn a_draining_holder_is_not_waited_for() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, false);
    s.worker_joined(t, 2, vec![], 1, false);
    holds(&mut s, t, 2, 7);
    s.worker_draining(2);
    s.submit(t, rooted("now", 7)).unwrap();
    assert_eq!(dispatched(&mut s), vec![(1, "now", 1)]);
    assert_eq!(s.placements().load, 1);
}

fn with_inputs(name: &'static str, inputs: &[u8]) -> Job<&'static str> {
    Job {
        inputs: inputs.iter().map(|n| file(*n)).collect(),
        ..job(name, 0, &[])
    }
}

/// Input file `n`, of `n` bytes.
fn file(n: u8) -> BlobKey {
    BlobKey::new(
        InstanceName::default_instance(),
        Digest {
            size: u64::from(n),
            ..Digest::of(DigestFunction::Sha256, &[n, 0xf1])
        },
    )
}

/// The dispatches among the commands, as (worker, payload, peer hints).
fn dispatched_with_hints(s: &mut S) -> Vec<(WorkerId, &'static str, Hints)> {
    dispatches(s)
        .into_iter()
        .map(|(w, p, _, h)| (w, p, h))
        .collect()
}

#[test]
fn an_action_goes_to_the_free_worker_holding_most_of_its_input_bytes_with_hints_for_the_rest() {
    let t = Instant::now();
    let mut s = S::new(config());
    for w in 1..=3 {
        s.worker_joined(t, w, vec![], 1, true);
    }
    // Worker 2 holds files 10 and 20 (30 bytes); worker 3 holds 1..=5 (15 bytes).
    s.worker_blobs(2, true, vec![file(10), file(20)], vec![]);
    s.worker_blobs(3, true, (1..=5).map(file).collect(), vec![]);
    s.submit(t, with_inputs("a", &[1, 2, 3, 4, 5, 10, 20, 30]))
        .unwrap();
    assert_eq!(
        dispatched_with_hints(&mut s),
        vec![(2, "a", vec![(3, 5)])],
        "to the worker with the most bytes; the files worker 3 holds hinted from it"
    );
    assert_eq!(s.placements().input_blobs, 1);
    // Worker 2 is busy now: the next goes to 3, hinted 10 and 20 from 2.
    s.submit(t, with_inputs("b", &[1, 10, 20])).unwrap();
    assert_eq!(dispatched_with_hints(&mut s), vec![(3, "b", vec![(2, 2)])]);
    // Nobody free holds anything: by load, with hints still from the busy holders.
    s.submit(t, with_inputs("c", &[1, 10])).unwrap();
    assert_eq!(
        dispatched_with_hints(&mut s),
        vec![(1, "c", vec![(2, 1), (3, 1)])]
    );
    assert_eq!(s.placements().load, 1);
    // A worker that left is no longer a holder, nor hinted.
    s.reported(t, 1, 3, "done");
    s.reported(t, 3, 2, "done");
    s.worker_left(t, 3);
    s.submit(t, with_inputs("d", &[1, 10])).unwrap();
    assert_eq!(dispatched_with_hints(&mut s), vec![(1, "d", vec![(2, 1)])]);
    assert_eq!(s.blob_facts(), 2);
    // A draining holder is not hinted.
    s.reported(t, 1, 4, "done");
    s.worker_draining(2);
    s.submit(t, with_inputs("e", &[10])).unwrap();
    assert_eq!(dispatched_with_hints(&mut s), vec![(1, "e", vec![])]);
    // A worker that does not serve its peers gets no hints, and what it reports holding is
    // not kept: nobody could fetch from it.
    s.reported(t, 1, 5, "done");
    s.worker_joined(t, 9, vec![], 1, false);
    s.worker_blobs(9, true, vec![file(40)], vec![]);
    assert_eq!(s.blob_facts(), 2);
    s.worker_left(t, 1);
    s.submit(t, with_inputs("f", &[1])).unwrap();
    assert_eq!(dispatched_with_hints(&mut s), vec![(9, "f", vec![])]);
}

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
