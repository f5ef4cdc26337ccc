//! The scheduler as a state machine (sans-IO): events in — actions submitted, workers joining,
//! reporting, leaving, time passing — and commands out — dispatch, kill, stage changes,
//! outcomes. The execution service and the worker sessions apply events under a lock and carry
//! the commands out; every rule here is tested without sockets or clocks.
//!
//! Rules: the queue is ordered by priority (lower first) then arrival; an action goes to a free
//! worker whose directory cache holds its input root, else (see [`locality`]) to the free
//! worker scoring best by what it holds of the inputs and its load, among those whose platform
//! fits; identical cacheable actions in flight share one
//! operation; an action whose worker disappears is re-queued (at most `max_retries` times) but
//! an action's own failure is final; an action running past its timeout (plus a grace period
//! for the worker to report it) is killed and fails with DEADLINE_EXCEEDED; a worker silent for
//! `worker_timeout` is lost; an action whose process has exited gives its slot to the next
//! action while its outputs upload, but stays with its worker until the result arrives; an
//! action that must wait for a slot has its inputs fetched ahead by a busy worker likely to
//! take it ([`prefetch`]).

mod dispatch;
pub mod holders;
pub mod input_tree;
mod job;
pub mod locality;
pub mod platform;
mod prefetch;

pub use job::{
    Command, Job, OpId, Outcome, SchedulerConfig, Stage, SubmitError, Submitted, WorkerId,
};

#[cfg(test)]
mod tests;

use holders::BlobHolders;
use kiln_reapi::digest::BlobKey;
use kiln_reapi::status::ErrorKind;
use locality::{CachedDirs, Placements};
use platform::{consume, could_fit, Consumed, Kinds, Offer, Requirements};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

#[derive(Debug)]
enum OpStage {
    Queued {
        seq: u64,
    },
    /// `executed`: the process exited and the worker is uploading outputs; the slot and any
    /// consumed capacity are already given back.
    Running {
        worker: WorkerId,
        deadline: Instant,
        executed: bool,
    },
}

#[derive(Debug)]
struct OpState<P> {
    job: Job<P>,
    stage: OpStage,
    attempts: u32,
    /// When it last entered the queue.
    queued_since: Instant,
    /// Since when it has been held for a busy worker holding its input root (while a free
    /// worker could have taken it); `None` when not held since it last entered the queue.
    held_since: Option<Instant>,
    /// The busy worker told to fetch its inputs ahead ([`prefetch`]), while it waits.
    prefetch: Option<WorkerId>,
}

#[derive(Debug)]
struct WorkerState {
    offer: Offer,
    capacity: usize,
    running: HashSet<OpId>,
    /// Slots in use: running operations whose process has not exited yet.
    busy: usize,
    consumed: Consumed,
    last_seen: Instant,
    draining: bool,
    /// The directories its directory cache holds.
    dirs: CachedDirs,
    /// The queued operation whose inputs it was told to fetch ahead, if any (one at a time).
    prefetching: Option<OpId>,
    /// It serves its CAS to peers: its blobs are tracked, and it gets hints.
    serves: bool,
}

impl WorkerState {
    /// An action's process ended: its slot and consumed capacity are free again.
    fn free_slot(&mut self, kinds: &Kinds, requirements: &Requirements) {
        self.busy = self.busy.saturating_sub(1);
        consume(kinds, requirements, &mut self.consumed, false);
    }
}

/// The scheduler.
pub struct Scheduler<P, R> {
    config: SchedulerConfig,
    ops: HashMap<OpId, OpState<P>>,
    queue: BTreeMap<(i32, u64), OpId>,
    in_flight: HashMap<BlobKey, OpId>,
    workers: HashMap<WorkerId, WorkerState>,
    next_op: OpId,
    next_seq: u64,
    out: Vec<Command<P, R>>,
    placements: Placements,
    /// See [`Scheduler::wake_at`].
    wake_at: Option<Instant>,
    /// Which workers hold which blobs.
    holders: BlobHolders,
}

impl<P: Clone, R> Scheduler<P, R> {
    /// An empty scheduler.
    pub fn new(config: SchedulerConfig) -> Scheduler<P, R> {
        Scheduler {
            ops: HashMap::new(),
            queue: BTreeMap::new(),
            in_flight: HashMap::new(),
            workers: HashMap::new(),
            next_op: 1,
            next_seq: 0,
            out: Vec::new(),
            placements: Placements::default(),
            wake_at: None,
            holders: BlobHolders::new(config.max_blob_facts),
            config,
        }
    }

    /// Takes the commands produced so far.
    pub fn commands(&mut self) -> Vec<Command<P, R>> {
        std::mem::take(&mut self.out)
    }

    /// Queued operations.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Running operations.
    pub fn running(&self) -> usize {
        self.ops.len() - self.queue.len()
    }

    /// Connected workers.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Whether any connected worker could ever run `requirements`.
    pub fn can_be_served(&self, requirements: &Requirements) -> bool {
        self.workers
            .values()
            .any(|w| !w.draining && could_fit(&self.config.kinds, requirements, &w.offer))
    }

    /// Queues a job, or joins an identical one in flight.
    pub fn submit(&mut self, now: Instant, job: Job<P>) -> Result<Submitted, SubmitError> {
        let submitted = self.enqueue(now, job, true)?;
        self.schedule(now);
        Ok(submitted)
    }

    /// Takes in a job whose action still runs on `worker` (its server died, and this
    /// scheduler took its operations over): running there from now on, nothing dispatched
    /// (and past the queue's bound: it is not waiting); queued as [`Scheduler::submit`] does
    /// when `worker` is not connected or cannot run it.
    pub fn submit_running(
        &mut self,
        now: Instant,
        job: Job<P>,
        worker: WorkerId,
    ) -> Result<Submitted, SubmitError> {
        let fits = self
            .workers
            .get(&worker)
            .is_some_and(|w| could_fit(&self.config.kinds, &job.requirements, &w.offer));
        let submitted = self.enqueue(now, job, !fits)?;
        if fits && !submitted.merged {
            self.run_on(now, submitted.op, worker);
        }
        self.schedule(now);
        Ok(submitted)
    }

    /// Queues a job (refused past `execution.max_queued` when `bounded`), or joins an
    /// identical one in flight; nothing is placed yet.
    fn enqueue(
        &mut self,
        now: Instant,
        job: Job<P>,
        bounded: bool,
    ) -> Result<Submitted, SubmitError> {
        if job.mergeable {
            if let Some(&op) = self.in_flight.get(&job.key) {
                return Ok(Submitted { op, merged: true });
            }
        }
        if bounded && self.queue.len() >= self.config.max_queued {
            return Err(SubmitError::QueueFull(self.queue.len()));
        }
        let op = self.next_op;
        self.next_op += 1;
        let seq = self.next_seq;
        self.next_seq += 1;
        if job.mergeable {
            self.in_flight.insert(job.key.clone(), op);
        }
        self.queue.insert((job.priority, seq), op);
        self.ops.insert(
            op,
            OpState {
                job,
                stage: OpStage::Queued { seq },
                attempts: 0,
                queued_since: now,
                held_since: None,
                prefetch: None,
            },
        );
        self.out.push(Command::Stage {
            op,
            stage: Stage::Queued,
        });
        Ok(Submitted { op, merged: false })
    }

    /// Queued operation `op` turns out to be running on `worker` already (it kept running
    /// there when its session ended, and the operation was queued again meanwhile): it runs
    /// on there, nothing dispatched. False (nothing changes) unless `op` is queued and
    /// `worker` connected.
    pub fn take_to(&mut self, now: Instant, op: OpId, worker: WorkerId) -> bool {
        let taken = self.run_on(now, op, worker);
        if taken {
            self.schedule(now);
        }
        taken
    }

    /// [`Scheduler::take_to`] without placing anything else.
    fn run_on(&mut self, now: Instant, op: OpId, worker: WorkerId) -> bool {
        let Some(w) = self.workers.get(&worker) else {
            return false;
        };
        let Some(state) = self.ops.get_mut(&op) else {
            return false;
        };
        // Only where it could have been placed.
        if !could_fit(&self.config.kinds, &state.job.requirements, &w.offer) {
            return false;
        }
        let OpStage::Queued { seq } = state.stage else {
            return false;
        };
        self.queue.remove(&(state.job.priority, seq));
        if let Some(ahead) = state.prefetch.take() {
            if let Some(p) = self.workers.get_mut(&ahead) {
                p.prefetching = None;
            }
        }
        let w = self.workers.get_mut(&worker).expect("checked above");
        state.attempts += 1;
        state.stage = OpStage::Running {
            worker,
            deadline: now + state.job.timeout + self.config.timeout_grace,
            executed: false,
        };
        w.running.insert(op);
        w.busy += 1;
        consume(
            &self.config.kinds,
            &state.job.requirements,
            &mut w.consumed,
            true,
        );
        self.out.push(Command::Stage {
            op,
            stage: Stage::Executing,
        });
        true
    }

    /// A worker connected; with `serves`, it serves its CAS to its peers: the blobs it
    /// reports are tracked, and its actions carry hints of the peers holding their inputs.
    pub fn worker_joined(
        &mut self,
        now: Instant,
        worker: WorkerId,
        properties: Vec<(String, String)>,
        capacity: usize,
        serves: bool,
    ) {
        self.worker_joined_running(now, worker, properties, capacity, serves, &[]);
    }

    /// [`Scheduler::worker_joined`], the worker still running `running` (queued again since
    /// its session with this scheduler broke): those still queued run on there
    /// ([`Scheduler::take_to`]) before anything is placed. Returns those taken.
    pub fn worker_joined_running(
        &mut self,
        now: Instant,
        worker: WorkerId,
        properties: Vec<(String, String)>,
        capacity: usize,
        serves: bool,
        running: &[OpId],
    ) -> Vec<OpId> {
        self.workers.insert(
            worker,
            WorkerState {
                offer: Offer::new(properties),
                capacity,
                running: HashSet::new(),
                busy: 0,
                consumed: Consumed::new(),
                last_seen: now,
                draining: false,
                dirs: CachedDirs::new(self.config.max_cached_dirs),
                serves,
                prefetching: None,
            },
        );
        let taken = running
            .iter()
            .copied()
            .filter(|&op| self.run_on(now, op, worker))
            .collect();
        self.schedule(now);
        taken
    }

    /// The worker says it does not run `op`, which this scheduler thinks it runs (it was
    /// to be adopted there, but had ended): queued again, as when a worker is lost.
    pub fn not_running(&mut self, now: Instant, worker: WorkerId, op: OpId) {
        if !self.is_running_on(op, worker) {
            return;
        }
        let executed = matches!(
            self.ops.get(&op).map(|s| &s.stage),
            Some(OpStage::Running { executed: true, .. })
        );
        if let (Some(w), Some(state)) = (self.workers.get_mut(&worker), self.ops.get(&op)) {
            w.running.remove(&op);
            if !executed {
                w.free_slot(&self.config.kinds, &state.job.requirements);
            }
        }
        self.requeue_lost(now, op);
        self.schedule(now);
    }

    /// A worker reports the directories its directory cache holds: with `full`, `added` is
    /// the whole set; otherwise the changes since its last report.
    pub fn worker_dirs(
        &mut self,
        now: Instant,
        worker: WorkerId,
        full: bool,
        added: Vec<BlobKey>,
        removed: Vec<BlobKey>,
    ) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.dirs.update(full, added, removed);
        }
        self.schedule(now);
    }

    /// A worker that serves its peers reports the blobs its CAS holds: with `full`, `added`
    /// is the whole set; otherwise the changes since its last report. (Ignored from a worker
    /// that does not serve: nobody could fetch from it.)
    pub fn worker_blobs(
        &mut self,
        worker: WorkerId,
        full: bool,
        added: Vec<BlobKey>,
        removed: Vec<BlobKey>,
    ) {
        if self.workers.get(&worker).is_some_and(|w| w.serves) {
            self.holders.update(worker, full, added, removed);
        }
    }

    /// Facts "worker W holds blob B" remembered.
    pub fn blob_facts(&self) -> usize {
        self.holders.len()
    }

    /// Facts remembered about `worker` (the blobs it is known to hold).
    pub fn worker_blob_facts(&self, worker: WorkerId) -> usize {
        self.holders.facts_of(worker)
    }

    /// The actions `worker` may run at once for this scheduler.
    pub fn worker_slots(&self, worker: WorkerId) -> usize {
        self.workers.get(&worker).map_or(0, |w| w.capacity)
    }

    /// Placements made since start, by reason.
    pub fn placements(&self) -> Placements {
        self.placements
    }

    /// A worker said something (keep-alive or any message).
    pub fn worker_seen(&mut self, now: Instant, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.last_seen = now;
        }
    }

    /// A worker now takes at most `capacity` actions of this scheduler at once (a worker
    /// serving several schedulers shares its slots among them; 0: none for now). What it
    /// runs beyond that runs on; nothing new is sent until it is under.
    pub fn worker_capacity(&mut self, now: Instant, worker: WorkerId, capacity: usize) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.capacity = capacity;
        }
        self.schedule(now);
    }

    /// A worker is shutting down: it finishes what it runs but gets nothing new.
    pub fn worker_draining(&mut self, worker: WorkerId) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.draining = true;
        // Its fetch ahead is given up: another worker may fetch that action's inputs.
        let prefetching = w.prefetching.take();
        self.prefetcher_left(worker, prefetching);
    }

    /// A worker is gone (its stream ended, or it went silent): its operations are re-queued,
    /// or fail once they have been retried enough.
    pub fn worker_left(&mut self, now: Instant, worker: WorkerId) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.holders.worker_left(worker);
        self.prefetcher_left(worker, w.prefetching);
        self.out.push(Command::Disconnect { worker });
        let mut lost: Vec<OpId> = w.running.into_iter().collect();
        lost.sort_unstable();
        for op in lost {
            self.requeue_lost(now, op);
        }
        self.schedule(now);
    }

    /// `op`'s worker lost it: queued again, or failed once retried enough.
    fn requeue_lost(&mut self, now: Instant, op: OpId) {
        let Some(state) = self.ops.get_mut(&op) else {
            return;
        };
        if state.attempts > self.config.max_retries {
            let attempts = state.attempts;
            self.finish(
                op,
                Outcome::Failed {
                    kind: ErrorKind::Unavailable,
                    message: format!("the worker running this action was lost {attempts} times"),
                },
            );
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        state.stage = OpStage::Queued { seq };
        state.queued_since = now;
        state.held_since = None;
        self.queue.insert((state.job.priority, seq), op);
        self.out.push(Command::Stage {
            op,
            stage: Stage::Queued,
        });
    }

    /// The worker reports the operation's outcome.
    pub fn reported(&mut self, now: Instant, worker: WorkerId, op: OpId, result: R) {
        if !self.is_running_on(op, worker) {
            // A late report from a worker the operation was taken from: ignore it.
            return;
        }
        self.finish(op, Outcome::Reported(result));
        self.schedule(now);
    }

    /// Whether `op` is running on `worker` (so a result from that worker would complete it).
    pub fn is_running_on(&self, op: OpId, worker: WorkerId) -> bool {
        matches!(self.ops.get(&op), Some(OpState { stage: OpStage::Running { worker: w, .. }, .. }) if *w == worker)
    }

    /// The operation's process exited on `worker`, which now uploads its outputs: the slot
    /// (and consumed capacity) goes to the next action, while the operation stays with the
    /// worker — lost with it, re-queued, until its result arrives.
    pub fn executed(&mut self, now: Instant, worker: WorkerId, op: OpId) {
        let Some(state) = self.ops.get_mut(&op) else {
            return;
        };
        let OpStage::Running {
            worker: w,
            executed,
            deadline,
        } = &mut state.stage
        else {
            return;
        };
        if *w != worker || *executed {
            return;
        }
        *executed = true;
        // The process finished in time; uploading its outputs gets as long again.
        *deadline = now + state.job.timeout + self.config.timeout_grace;
        if let Some(w) = self.workers.get_mut(&worker) {
            w.free_slot(&self.config.kinds, &state.job.requirements);
        }
        self.schedule(now);
    }

    /// A client cancelled the operation.
    pub fn cancel(&mut self, now: Instant, op: OpId) {
        let Some(state) = self.ops.get(&op) else {
            return;
        };
        if let OpStage::Running { worker, .. } = state.stage {
            self.out.push(Command::Kill { worker, op });
        }
        self.finish(
            op,
            Outcome::Failed {
                kind: ErrorKind::Cancelled,
                message: "cancelled by a client".into(),
            },
        );
        self.schedule(now);
    }

    /// Fails every queued operation (the server is going down; running ones may still report).
    pub fn fail_queued(&mut self, kind: ErrorKind, message: &str) {
        let queued: Vec<OpId> = self.queue.values().copied().collect();
        for op in queued {
            self.finish(
                op,
                Outcome::Failed {
                    kind,
                    message: message.to_string(),
                },
            );
        }
    }

    /// Time passed: lose silent workers, fail operations far past their timeout.
    pub fn tick(&mut self, now: Instant) {
        let silent: Vec<WorkerId> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                now.saturating_duration_since(w.last_seen) > self.config.worker_timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for worker in silent {
            self.worker_left(now, worker);
        }
        let overdue: Vec<(OpId, WorkerId)> = self
            .ops
            .iter()
            .filter_map(|(op, s)| match s.stage {
                OpStage::Running {
                    worker, deadline, ..
                } if now > deadline => Some((*op, worker)),
                _ => None,
            })
            .collect();
        for (op, worker) in overdue {
            self.out.push(Command::Kill { worker, op });
            self.finish(
                op,
                Outcome::Failed {
                    kind: ErrorKind::TimedOut,
                    message: "the action ran past its timeout and its worker did not report".into(),
                },
            );
        }
        self.fail_unserved(now);
        self.schedule(now);
    }

    /// Fails queued operations that no connected worker could run and that have waited
    /// longer than `unserved_timeout` (REAPI: FAILED_PRECONDITION, "no worker available").
    fn fail_unserved(&mut self, now: Instant) {
        let Some(limit) = self.config.unserved_timeout else {
            return;
        };
        let unserved: Vec<(OpId, String)> = self
            .queue
            .values()
            .filter_map(|op| {
                let s = self.ops.get(op)?;
                (now.saturating_duration_since(s.queued_since) > limit
                    && !self.can_be_served(&s.job.requirements))
                .then(|| (*op, s.job.requirements.to_string()))
            })
            .collect();
        for (op, requirements) in unserved {
            self.finish(
                op,
                Outcome::Failed {
                    kind: ErrorKind::Precondition,
                    message: format!(
                        "no connected worker offers the platform this action needs ({requirements}); \
                         it waited {} s for one",
                        limit.as_secs()
                    ),
                },
            );
        }
    }

    fn finish(&mut self, op: OpId, outcome: Outcome<R>) {
        let Some(state) = self.ops.remove(&op) else {
            return;
        };
        self.prefetch_over(op, state.prefetch);
        match state.stage {
            OpStage::Queued { seq } => {
                self.queue.remove(&(state.job.priority, seq));
            }
            OpStage::Running {
                worker, executed, ..
            } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.running.remove(&op);
                    if !executed {
                        w.free_slot(&self.config.kinds, &state.job.requirements);
                    }
                }
            }
        }
        if self.in_flight.get(&state.job.key) == Some(&op) {
            self.in_flight.remove(&state.job.key);
        }
        self.out.push(Command::Finished { op, outcome });
    }
}
