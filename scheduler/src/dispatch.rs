//! Giving queued operations to workers: in queue order, each to a free worker whose directory
//! cache holds its input root, else (after a bounded wait for a busy holder, see
//! [`crate::locality`]) to the free worker holding the most bytes of its input files, else to
//! the least-loaded free worker whose platform fits. Each dispatch carries hints of the peers
//! holding the inputs its worker lacks ([`crate::holders`]).

use crate::locality::Reason;
use crate::platform::{consume, could_fit, fits};
use crate::{Command, OpId, OpStage, OpState, Scheduler, Stage, WorkerId, WorkerState};
use std::collections::HashSet;
use std::time::Instant;

/// Input files (the largest first, as jobs list them) weighed when placing by the bytes a
/// worker holds, and looked at for hints: the scheduler's lock is held meanwhile.
const MAX_SCORED: usize = 100_000;

/// Digests hinted with one dispatch at most (about 75 bytes each in the message).
const MAX_HINTS: usize = 100_000;

/// What [`Scheduler::choose`] decided for a queued action.
enum Choice {
    /// Dispatch it to this worker, for this reason.
    Place(WorkerId, Reason),
    /// Hold it for a busy worker holding its input root, until `until`, keeping the free
    /// worker `keep` for it.
    Hold { keep: WorkerId, until: Instant },
    /// No worker can take it now.
    NotNow,
}

impl<P: Clone, R> Scheduler<P, R> {
    /// Where `state` goes now. A free worker whose directory cache holds its input root; else,
    /// while a busy worker holding it may still free up (held less than `locality_wait`), the
    /// action is held and keeps one free worker it fits for itself (`reserved`: actions behind
    /// it cannot take that one, so holding never lets them overtake it); else the
    /// least-loaded free worker.
    fn choose(&self, now: Instant, state: &OpState<P>, reserved: &HashSet<WorkerId>) -> Choice {
        let kinds = &self.config.kinds;
        let requirements = &state.job.requirements;
        let free = |id: &WorkerId, w: &WorkerState| {
            !w.draining
                && !reserved.contains(id)
                && w.busy < w.capacity
                && fits(kinds, requirements, &w.offer, &w.consumed)
        };
        let holds = |w: &WorkerState| {
            state
                .job
                .input_root
                .as_ref()
                .is_some_and(|r| w.roots.contains(r))
        };
        // Least loaded first; ties by id, so the choice is deterministic.
        let least_loaded = |pick: &dyn Fn(&WorkerId, &WorkerState) -> bool| {
            self.workers
                .iter()
                .filter(|(id, w)| pick(id, w))
                .min_by(|(a_id, a), (b_id, b)| {
                    let load = |w: &WorkerState| w.busy as f64 / w.capacity as f64;
                    load(a).total_cmp(&load(b)).then(a_id.cmp(b_id))
                })
                .map(|(id, _)| *id)
        };
        if let Some(id) = least_loaded(&|id, w| free(id, w) && holds(w)) {
            return Choice::Place(id, Reason::InputRoot);
        }
        let Some(other) = least_loaded(&free) else {
            return Choice::NotNow;
        };
        // The worker that fetched its inputs ahead, if it is free now (after a busy root
        // holder's wait, below).
        let prefetcher = state
            .prefetch
            .filter(|id| self.workers.get(id).is_some_and(|w| free(id, w)));
        let busy_holder = self
            .workers
            .values()
            .any(|w| !w.draining && holds(w) && could_fit(kinds, requirements, &w.offer));
        if !busy_holder {
            if let Some(id) = prefetcher {
                return Choice::Place(id, Reason::Prefetched);
            }
            return match self.most_bytes(state, &free) {
                Some(id) => Choice::Place(id, Reason::InputBlobs),
                None => Choice::Place(other, Reason::Load),
            };
        }
        let since = state.held_since.unwrap_or(now);
        if now.saturating_duration_since(since) < self.config.locality_wait {
            return Choice::Hold {
                keep: other,
                until: since + self.config.locality_wait,
            };
        }
        let id = prefetcher
            .or_else(|| self.most_bytes(state, &free))
            .unwrap_or(other);
        Choice::Place(id, Reason::WaitedForHolder)
    }

    /// Of the free workers (`free`), the one known to hold the most bytes of the action's
    /// input files (the largest [`MAX_SCORED`] of them), if any holds some; ties go to the
    /// less loaded, then the lower id.
    fn most_bytes(
        &self,
        state: &OpState<P>,
        free: &dyn Fn(&WorkerId, &WorkerState) -> bool,
    ) -> Option<WorkerId> {
        if self.holders.is_empty() {
            return None;
        }
        let inputs = &state.job.inputs[..state.job.inputs.len().min(MAX_SCORED)];
        let load = |w: &WorkerState| w.busy as f64 / w.capacity as f64;
        self.holders
            .bytes_held(inputs)
            .into_iter()
            .filter_map(|(id, bytes)| {
                let w = self.workers.get(&id).filter(|w| free(&id, w))?;
                (bytes > 0).then_some((id, bytes, load(w)))
            })
            .max_by(|(a_id, a, a_load), (b_id, b, b_load)| {
                a.cmp(b).then(b_load.total_cmp(a_load)).then(b_id.cmp(a_id))
            })
            .map(|(id, _, _)| id)
    }

    /// When the scheduler next needs a [`Scheduler::tick`] to place an action it holds for a
    /// busy worker (`None`: nothing held; the regular tick is enough).
    pub fn wake_at(&self) -> Option<Instant> {
        self.wake_at
    }

    /// Gives queued operations to workers, in queue order, while any worker has room.
    pub(crate) fn schedule(&mut self, now: Instant) {
        self.place(now);
        self.prefetch();
    }

    /// Places queued operations on free workers.
    fn place(&mut self, now: Instant) {
        self.wake_at = None;
        let mut free: usize = self
            .workers
            .values()
            .filter(|w| !w.draining)
            .map(|w| w.capacity.saturating_sub(w.busy))
            .sum();
        if free == 0 || self.queue.is_empty() {
            return;
        }
        let queued: Vec<((i32, u64), OpId)> = self.queue.iter().map(|(k, v)| (*k, *v)).collect();
        let mut reserved = HashSet::new();
        for (slot, op) in queued {
            if free == 0 {
                break;
            }
            let Some(state) = self.ops.get(&op) else {
                continue;
            };
            let (worker, reason) = match self.choose(now, state, &reserved) {
                Choice::Place(worker, reason) => (worker, reason),
                Choice::Hold { keep, until } => {
                    reserved.insert(keep);
                    free -= 1;
                    self.wake_at = Some(self.wake_at.map_or(until, |w| w.min(until)));
                    if let Some(state) = self.ops.get_mut(&op) {
                        state.held_since.get_or_insert(now);
                    }
                    continue;
                }
                Choice::NotNow => continue,
            };
            self.placements.count(reason);
            let prefetched = state.prefetch;
            let serves =
                |w: &WorkerId| self.workers.get(w).is_some_and(|w| w.serves && !w.draining);
            let peers = if serves(&worker) {
                let inputs = &state.job.inputs[..state.job.inputs.len().min(MAX_SCORED)];
                self.holders
                    .hints(worker, inputs, MAX_HINTS, |w| serves(&w))
            } else {
                Vec::new()
            };
            self.prefetch_over(op, prefetched);
            let kinds = &self.config.kinds;
            self.queue.remove(&slot);
            let state = self.ops.get_mut(&op).expect("queued op exists");
            state.prefetch = None;
            state.attempts += 1;
            state.stage = OpStage::Running {
                worker,
                deadline: now + state.job.timeout + self.config.timeout_grace,
                executed: false,
            };
            let w = self.workers.get_mut(&worker).expect("chosen worker exists");
            w.running.insert(op);
            w.busy += 1;
            consume(kinds, &state.job.requirements, &mut w.consumed, true);
            free -= 1;
            self.out.push(Command::Stage {
                op,
                stage: Stage::Executing,
            });
            self.out.push(Command::Dispatch {
                worker,
                op,
                attempt: state.attempts,
                payload: state.job.payload.clone(),
                timeout: state.job.timeout,
                queued_at: state.job.queued_at,
                peers,
            });
        }
    }
}
