//! Giving queued operations to workers: in queue order, each to the free worker whose
//! platform fits and that scores best by what it holds (see [`crate::locality`]): its input
//! root cached, else — after a bounded wait for a busy holder of the root — the most bytes of
//! its input tree in cached directories, of its input files in the worker's CAS, the lighter
//! load. Each dispatch carries hints of the peers holding the inputs its worker lacks
//! ([`crate::holders`]).

use crate::locality::{Reason, Score};
use crate::platform::{consume, could_fit, fits};
use crate::{Command, OpId, OpStage, OpState, Scheduler, Stage, WorkerId, WorkerState};
use kiln_reapi::digest::Digest;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Input files (the largest first, as jobs list them) weighed when placing by the bytes a
/// worker holds, and looked at for hints: the scheduler's lock is held meanwhile.
const MAX_SCORED: usize = 100_000;

/// Queued actions looked at for the workers they alone can run (the scheduler's lock is held
/// meanwhile).
const MAX_SOLE_LOOKED_AT: usize = 1_000;

/// Digests hinted with one dispatch at most (about 75 bytes each in the message).
const MAX_HINTS: usize = 100_000;

/// Workers that alone can run some queued actions, with those actions and their
/// requirements.
type Sole = HashMap<WorkerId, Vec<(OpId, crate::platform::Requirements)>>;

/// The free worker [`Scheduler::best`] found for an action.
struct Best {
    id: WorkerId,
    score: Score,
    /// Some free worker caches the action's input root (the best may not, with weights that
    /// put load first).
    root_free: bool,
}

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
    /// Where `state` goes now. The free worker scoring best ([`Scheduler::best`]) when its
    /// directory cache holds the input root; else, while no free worker holds the root and a
    /// busy one may still free up (held less than `locality_wait`), the action is held and
    /// keeps the best free worker for itself (`reserved`: actions behind it cannot take that
    /// one, so holding never lets them overtake it); else the worker that fetched its inputs
    /// ahead, if free; else the best.
    fn choose(
        &self,
        now: Instant,
        state: &OpState<P>,
        reserved: &HashSet<WorkerId>,
        sole: &Sole,
    ) -> Choice {
        let kinds = &self.config.kinds;
        let weights = &self.config.weights;
        let requirements = &state.job.requirements;
        let free = |id: &WorkerId, w: &WorkerState| {
            !w.draining
                && !reserved.contains(id)
                && w.busy < w.capacity
                && fits(kinds, requirements, &w.offer, &w.consumed)
        };
        // A worker that alone can run some queued actions takes an action another worker
        // could ever run (this one then waits for that one) only if it keeps a free slot for
        // each of them and each would still fit beside this one, however well it scores for
        // this one.
        let elsewhere = self.workers.iter().any(|(id, w)| {
            !w.draining
                && sole.get(id).is_none_or(|v| v.is_empty())
                && could_fit(kinds, requirements, &w.offer)
        });
        let leaves_room = |id: &WorkerId, w: &WorkerState| {
            let Some(waiting) = sole.get(id).filter(|v| !v.is_empty()) else {
                return true;
            };
            let mut after = w.consumed.clone();
            consume(kinds, requirements, &mut after, true);
            w.capacity.saturating_sub(w.busy) > waiting.len()
                && waiting
                    .iter()
                    .all(|(_, r)| fits(kinds, r, &w.offer, &after))
        };
        let unclaimed =
            |id: &WorkerId, w: &WorkerState| free(id, w) && (!elsewhere || leaves_room(id, w));
        let Some(Best {
            id: best,
            score,
            root_free,
        }) = self.best(state, &unclaimed)
        else {
            return Choice::NotNow;
        };
        if score.root && weights.input_root > 0.0 {
            return Choice::Place(best, Reason::InputRoot);
        }
        // The worker that fetched its inputs ahead, if it is free now (after a busy root
        // holder's wait, below).
        let prefetcher = state
            .prefetch
            .filter(|id| self.workers.get(id).is_some_and(|w| unclaimed(id, w)));
        let busy_holder = weights.input_root > 0.0
            && !root_free
            && state.job.input_root.as_ref().is_some_and(|root| {
                self.workers.iter().any(|(id, w)| {
                    !w.draining
                        && !free(id, w)
                        && w.dirs.contains(root)
                        && could_fit(kinds, requirements, &w.offer)
                })
            });
        if !busy_holder {
            if let Some(id) = prefetcher {
                return Choice::Place(id, Reason::Prefetched);
            }
            return Choice::Place(best, score.reason(weights));
        }
        let since = state.held_since.unwrap_or(now);
        if now.saturating_duration_since(since) < self.config.locality_wait {
            return Choice::Hold {
                keep: best,
                until: since + self.config.locality_wait,
            };
        }
        Choice::Place(prefetcher.unwrap_or(best), Reason::WaitedForHolder)
    }

    /// Of the free workers (`free`), the one with the highest [`Score::value`]; ties go to
    /// the less loaded, then the lower id. `None` when no worker is free for the action, found
    /// before anything is weighed (a queue of actions no free worker fits stays cheap).
    fn best(
        &self,
        state: &OpState<P>,
        free: &dyn Fn(&WorkerId, &WorkerState) -> bool,
    ) -> Option<Best> {
        let weights = &self.config.weights;
        let job = &state.job;
        let candidates: Vec<(&WorkerId, &WorkerState)> =
            self.workers.iter().filter(|(id, w)| free(id, w)).collect();
        if candidates.is_empty() {
            return None;
        }
        // Bytes of the input files each worker's CAS holds (the largest MAX_SCORED files);
        // only workers serving their CAS have their blobs tracked.
        let inputs = &job.inputs[..job.inputs.len().min(MAX_SCORED)];
        let weigh_blobs = weights.input_blobs > 0.0
            && !self.holders.is_empty()
            && candidates.iter().any(|(_, w)| w.serves);
        let (blobs_held, blobs_total): (HashMap<WorkerId, u64>, u64) = if !weigh_blobs {
            (HashMap::new(), 0)
        } else {
            let total = inputs
                .iter()
                .fold(0u64, |sum, k| sum.saturating_add(k.digest.size));
            (self.holders.bytes_held(inputs).into_iter().collect(), total)
        };
        let share = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        let mut root_free = false;
        let best = candidates
            .into_iter()
            .map(|(id, w)| {
                let root = job.input_root.as_ref().is_some_and(|r| w.dirs.contains(r));
                root_free |= root;
                let tree = if root {
                    1.0
                } else if w.dirs.is_empty() || weights.input_tree == 0.0 {
                    0.0
                } else {
                    share(job.tree.held(|d| w.dirs.contains(d)), job.tree.total())
                };
                let score = Score {
                    root,
                    tree,
                    blobs: share(blobs_held.get(id).copied().unwrap_or(0), blobs_total),
                    load: w.busy as f64 / w.capacity as f64,
                };
                (*id, score)
            })
            .max_by(|(a_id, a), (b_id, b)| {
                a.value(weights)
                    .total_cmp(&b.value(weights))
                    .then(b.load.total_cmp(&a.load))
                    .then(b_id.cmp(a_id))
            })?;
        Some(Best {
            id: best.0,
            score: best.1,
            root_free,
        })
    }

    /// The workers that alone can run some queued actions (of the first
    /// [`MAX_SOLE_LOOKED_AT`] queued; no other worker that is not draining could ever fit
    /// them), with those actions.
    fn sole_workers(&self) -> Sole {
        let kinds = &self.config.kinds;
        let mut sole: Sole = HashMap::new();
        // Workers that all offer the same (a farm of like machines, or one worker): what one
        // can run, all can (or no other worker exists to send anything to). Nothing to look at.
        let mut live = self.workers.values().filter(|w| !w.draining);
        if let Some(first) = live.next() {
            if live.all(|w| w.offer == first.offer) {
                return sole;
            }
        }
        for op in self.queue.values().take(MAX_SOLE_LOOKED_AT) {
            let Some(state) = self.ops.get(op) else {
                continue;
            };
            let mut fitting = self.workers.iter().filter(|(_, w)| {
                !w.draining && could_fit(kinds, &state.job.requirements, &w.offer)
            });
            if let (Some((id, _)), None) = (fitting.next(), fitting.next()) {
                sole.entry(*id)
                    .or_default()
                    .push((*op, state.job.requirements.clone()));
            }
        }
        sole
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
        let mut sole = self.sole_workers();
        let mut reserved = HashSet::new();
        for (slot, op) in queued {
            if free == 0 {
                break;
            }
            let Some(state) = self.ops.get(&op) else {
                continue;
            };
            let (worker, reason) = match self.choose(now, state, &reserved, &sole) {
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
            // Placed: no longer waiting for the worker it alone can run on.
            if let Some(waiting) = sole.get_mut(&worker) {
                waiting.retain(|(o, _)| *o != op);
            }
            let prefetched = state.prefetch;
            let serves =
                |w: &WorkerId| self.workers.get(w).is_some_and(|w| w.serves && !w.draining);
            let (peers, missing) = if serves(&worker) {
                let inputs = &state.job.inputs[..state.job.inputs.len().min(MAX_SCORED)];
                let peers = self
                    .holders
                    .hints(worker, inputs, MAX_HINTS, |w| serves(&w));
                // Not known to be held by the worker, nor hinted from a peer (the worker
                // fetches hinted ones early too): those only the server is known to have.
                let hinted: HashSet<&Digest> = peers.iter().flat_map(|(_, d)| d).collect();
                let missing = inputs
                    .iter()
                    .filter(|k| !hinted.contains(&k.digest) && !self.holders.holds(k, worker))
                    .take(MAX_HINTS)
                    .map(|k| k.digest)
                    .collect();
                (peers, missing)
            } else {
                (Vec::new(), Vec::new())
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
                missing,
            });
        }
    }
}
