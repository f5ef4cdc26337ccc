//! Placement by locality: a worker caching the input root, the wait for a busy one, the
//! bytes of input files a worker holds, and the hints of peers holding the rest.

use super::*;

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
    s.worker_dirs(t, 2, true, vec![], vec![]);
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

/// Directory `n` of the trees of [`treed`].
fn tree_dir(n: u8) -> BlobKey {
    BlobKey::new(
        InstanceName::default_instance(),
        Digest::of(DigestFunction::Sha256, &[n, 0xd1]),
    )
}

/// A job whose input tree is directory 0 holding directories 1 (100 bytes of files) and 2
/// (900 bytes), and whose input files are 10 and 20.
fn treed(name: &'static str) -> Job<&'static str> {
    use crate::input_tree::{InputTree, WalkedDir};
    let dir = |n: u8, file_bytes: u64, children: &[u8]| {
        WalkedDir::new(
            tree_dir(n).digest,
            file_bytes,
            children.iter().map(|c| tree_dir(*c).digest),
        )
    };
    let dirs = [dir(0, 0, &[1, 2]), dir(1, 100, &[]), dir(2, 900, &[])];
    let root = tree_dir(0);
    Job {
        tree: Arc::new(InputTree::new(&root.instance, root.digest, &dirs)),
        input_root: Some(root),
        ..with_inputs(name, &[10, 20])
    }
}

#[test]
fn an_action_goes_to_the_free_worker_caching_most_of_its_input_tree_then_by_weights() {
    let t = Instant::now();
    let setup = |weights: crate::locality::Weights| {
        let mut s = S::new(SchedulerConfig {
            weights,
            ..config()
        });
        for w in 1..=4 {
            s.worker_joined(t, w, vec![], 2, true);
        }
        // 1 caches directory 1 (10% of the tree), 2 directory 2 (90%), 3 holds both input
        // files in its CAS; 4 holds nothing.
        s.worker_dirs(t, 1, true, vec![tree_dir(1)], vec![]);
        s.worker_dirs(t, 2, true, vec![tree_dir(2)], vec![]);
        s.worker_blobs(3, true, vec![file(10), file(20)], vec![]);
        s
    };
    let mut s = setup(crate::locality::Weights::default());
    s.submit(t, treed("a")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(2, "a", 1)], "90% of the tree");
    assert_eq!(s.placements().input_tree, 1);
    // Half loaded now, 2 still scores 4 × 0.9 − 0.5 = 3.1, above 1's 0.4 and 3's 2.
    s.submit(t, treed("b")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(2, "b", 1)]);
    // Full: the next best is the worker holding every input file (2, then 2 − 0.5), then
    // the one with 10% of the tree (0.4, above the idle 4's 0).
    for name in ["c", "d", "e"] {
        s.submit(t, treed(name)).unwrap();
    }
    assert_eq!(
        dispatched(&mut s),
        vec![(3, "c", 1), (3, "d", 1), (1, "e", 1)]
    );
    assert_eq!(
        (s.placements().input_blobs, s.placements().input_tree),
        (2, 3)
    );
    // A root cached outright beats any share of it.
    s.worker_dirs(t, 4, true, vec![tree_dir(0)], vec![]);
    s.submit(t, treed("f")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(4, "f", 1)]);
    assert_eq!(s.placements().input_root, 1);

    // Weights change the order: blobs before the tree.
    let mut s = setup(crate::locality::Weights {
        input_tree: 1.0,
        input_blobs: 3.0,
        ..Default::default()
    });
    s.submit(t, treed("a")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(3, "a", 1)]);
    assert_eq!(s.placements().input_blobs, 1);
    // With load weighing most, an idle worker wins over a half-loaded one holding more.
    let mut s = setup(crate::locality::Weights {
        load: 100.0,
        ..Default::default()
    });
    s.submit(t, treed("a")).unwrap();
    s.submit(t, treed("b")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(2, "a", 1), (3, "b", 1)]);
    // Locality weighing nothing: by load alone, ties to the lowest id.
    let mut s = setup(crate::locality::Weights {
        input_root: 0.0,
        input_tree: 0.0,
        input_blobs: 0.0,
        load: 1.0,
    });
    s.worker_dirs(t, 4, true, vec![tree_dir(0)], vec![]);
    s.submit(t, treed("a")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(1, "a", 1)]);
    assert_eq!(s.placements().load, 1);
    // Blobs before the root: 2 (full) and 4 (free) cache the root, 3 holds the files and
    // scores best. The action is not held for 2 while 4, a free holder, could take it: it
    // goes to the best now.
    let mut s = setup(crate::locality::Weights {
        input_root: 1.0,
        input_tree: 0.0,
        input_blobs: 3.0,
        load: 0.0,
    });
    s.worker_dirs(t, 2, true, vec![tree_dir(0)], vec![]);
    s.worker_dirs(t, 4, true, vec![tree_dir(0)], vec![]);
    for name in ["p1", "p2", "p3", "p4", "p5", "p6"] {
        s.submit(t, job(name, 0, &[])).unwrap();
    }
    let filled: Vec<WorkerId> = dispatched(&mut s).iter().map(|d| d.0).collect();
    assert_eq!(
        filled,
        vec![1, 2, 3, 4, 1, 2],
        "ties to the less loaded, then the lowest id"
    );
    s.submit(t, treed("t")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(3, "t", 1)], "not held");
    assert_eq!(s.placements().input_blobs, 1);
}

// A worker that alone can run a queued action is not taken by an action another free worker
// can run, however well it scores for it: the gpu worker (1) caches the generic action's
// whole tree, yet the generic action goes to worker 2 while the gpu action waits in the
// queue, and the gpu action gets worker 1.
#[test]
fn a_worker_is_never_starved_of_work_it_alone_can_run() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, props(&[("gpu", "yes")]), 1, true);
    s.worker_joined(t, 2, vec![], 1, true);
    // Both busy while the two actions queue.
    s.submit(t, job("hold-1", 0, &[("gpu", "yes")])).unwrap();
    s.submit(t, job("hold-2", 0, &[])).unwrap();
    assert_eq!(dispatched(&mut s).len(), 2);
    s.worker_dirs(t, 1, true, vec![tree_dir(0)], vec![]);
    s.submit(t, treed("generic")).unwrap();
    s.submit(t, job("gpu", 0, &[("gpu", "yes")])).unwrap();
    assert!(dispatched(&mut s).is_empty());
    // Worker 1 frees first: the generic action, first in the queue, does not take it.
    s.reported(t, 1, 1, "done");
    assert_eq!(dispatched(&mut s), vec![(1, "gpu", 1)]);
    // Worker 2 frees: the generic action waits a little for its root's holder (busy), then
    // takes worker 2.
    s.reported(t, 2, 2, "done");
    assert!(dispatched(&mut s).is_empty());
    s.tick(t + Duration::from_millis(150));
    assert_eq!(dispatched(&mut s), vec![(2, "generic", 1)]);
    // With no gpu action queued, a generic one goes to worker 1, its root's holder.
    s.reported(t, 1, 4, "done");
    s.reported(t, 2, 3, "done");
    s.submit(t, treed("generic-2")).unwrap();
    assert_eq!(dispatched(&mut s), vec![(1, "generic-2", 1)]);
}

// A sole worker keeps only as many free slots as there are queued actions it alone can run:
// with two slots and one gpu action waiting, the generic action ahead of it takes the other
// slot rather than wait for the busy worker 2.
#[test]
fn a_sole_worker_keeps_only_the_slots_its_own_actions_need() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 2, vec![], 1, true);
    s.submit(t, job("hold", 0, &[])).unwrap();
    assert_eq!(dispatched(&mut s), vec![(2, "hold", 1)]);
    s.submit(t, job("generic", 0, &[])).unwrap();
    s.submit(t, job("gpu", 0, &[("gpu", "yes")])).unwrap();
    assert!(dispatched(&mut s).is_empty());
    s.worker_joined(t, 1, props(&[("gpu", "yes")]), 2, true);
    assert_eq!(dispatched(&mut s), vec![(1, "generic", 1), (1, "gpu", 1)]);
}

// A sole worker's waiting actions keep what they need of its consumable properties too: an
// action that would leave the big one no room goes to the other worker even though the sole
// worker holds its tree; and a sole action placed in a pass frees its claim within that pass.
#[test]
fn a_sole_worker_keeps_the_resources_and_slots_its_waiting_actions_need() {
    let t = Instant::now();
    let mut s = S::new(config());
    s.worker_joined(t, 1, props(&[("cores", "16")]), 4, true);
    s.worker_joined(t, 2, props(&[("cores", "8")]), 4, true);
    s.worker_dirs(t, 1, true, vec![tree_dir(0)], vec![]);
    let needs = |name, cores| Job {
        requirements: job(name, 0, &[("cores", cores)]).requirements,
        ..treed(name)
    };
    s.submit(t, needs("small-1", "4")).unwrap();
    assert_eq!(
        dispatched(&mut s),
        vec![(1, "small-1", 1)],
        "its root's holder"
    );
    s.submit(t, job("big", 0, &[("cores", "16")])).unwrap();
    assert!(dispatched(&mut s).is_empty(), "12 cores left of 16");
    s.submit(t, needs("small-2", "4")).unwrap();
    assert_eq!(
        dispatched(&mut s),
        vec![(2, "small-2", 1)],
        "the big one keeps its room"
    );

    // Sole actions first in the queue: placed in the same pass, they leave the rest of the
    // worker to the others.
    let mut s = S::new(config());
    s.worker_joined(t, 2, vec![], 1, true);
    s.submit(t, job("hold", 0, &[])).unwrap();
    assert_eq!(dispatched(&mut s), vec![(2, "hold", 1)]);
    s.submit(t, job("gpu", 0, &[("gpu", "yes")])).unwrap();
    s.submit(t, job("generic", 0, &[])).unwrap();
    s.worker_joined(t, 1, props(&[("gpu", "yes")]), 2, true);
    assert_eq!(dispatched(&mut s), vec![(1, "gpu", 1), (1, "generic", 1)]);
}

// A dispatch names the input files its worker is known to lack, when the scheduler tracks
// what that worker holds (it serves its peers); for any other worker the list is empty.
#[test]
fn a_dispatch_names_the_inputs_its_worker_is_known_to_lack() {
    let t = Instant::now();
    let missing_of = |s: &mut S| -> Vec<Vec<u64>> {
        s.commands()
            .into_iter()
            .filter_map(|c| match c {
                Command::Dispatch { missing, .. } => Some(missing.iter().map(|d| d.size).collect()),
                _ => None,
            })
            .collect()
    };
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, true);
    s.worker_blobs(1, true, vec![file(20)], vec![]);
    s.submit(t, with_inputs("a", &[30, 20, 10])).unwrap();
    assert_eq!(missing_of(&mut s), vec![vec![30, 10]]);
    // A file a peer is hinted for is not listed again (the worker fetches hinted ones early
    // too).
    s.worker_joined(t, 2, vec![], 1, true);
    s.worker_blobs(2, true, vec![file(30)], vec![]);
    s.submit(t, with_inputs("b", &[30, 20, 10])).unwrap();
    assert_eq!(
        missing_of(&mut s),
        vec![vec![10]],
        "on worker 2 (1 is busy), which holds 30; 20 is hinted from worker 1"
    );
    let mut s = S::new(config());
    s.worker_joined(t, 1, vec![], 1, false);
    s.submit(t, with_inputs("a", &[30, 20, 10])).unwrap();
    assert_eq!(
        missing_of(&mut s),
        vec![Vec::<u64>::new()],
        "not tracked: not known"
    );
}
