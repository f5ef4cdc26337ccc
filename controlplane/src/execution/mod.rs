//! Remote execution: the Execution and Operations services, the worker API, and the core that
//! feeds the [`crate::scheduler`] state machine with events and carries out its commands —
//! dispatching to worker sessions, publishing operation stages, and on completion writing the
//! action cache and releasing the inputs' pins.

mod commands;
pub mod farm;
mod listing;
mod operations;
mod ops;
mod prepare;
mod prepare_error;
mod service;
pub mod shared_ops;
mod worker_events;
mod workers;

pub use operations::OperationsService;
pub use ops::OpView;
pub use service::ExecutionService;
pub use workers::WorkerApiService;

use crate::action_cache::ActionCache;
use crate::scheduler::{
    self, Job, OpId, Outcome, Scheduler, SchedulerConfig, SubmitError, WorkerId,
};
use kiln_config::ExecutionConfig;
use kiln_dataplane::store::tier::BlobStore;
use kiln_dataplane::store::{CasClient, ChainCas};
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::reapi::{execution_stage::Value as StageValue, ActionResult, ExecuteResponse};
use kiln_proto::worker::{ExecutionResult, ServerMessage, StartExecute};
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::BlobKey;
use ops::Registry;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// An operation taken over from a server that died, as it is queued again here.
pub(crate) struct Taken {
    /// Its name.
    pub name: String,
    /// The worker that still runs it, when connected here.
    pub running_on: Option<WorkerId>,
    /// The worker it was last sent to (by name), which alone may claim it later.
    pub sent_to: String,
}

/// What a queued action carries to its worker.
#[derive(Debug)]
pub struct Payload {
    /// The message to the worker, without the per-dispatch fields.
    pub start: StartExecute,
    /// The action, for the action cache.
    pub key: BlobKey,
    /// Store the result in the action cache when it succeeds.
    pub cacheable: bool,
    /// Blobs pinned in the CAS for this action.
    pub pins: Vec<BlobKey>,
    /// Whose pins they are.
    pub holder: kiln_dataplane::store::tier::PinHolder,
}

/// A worker's open session.
struct Session {
    tx: mpsc::Sender<ServerMessage>,
    name: String,
    /// The worker's last report of its directory cache.
    dircache: Option<kiln_proto::worker::DirCacheReport>,
    /// Its last report of its transfers.
    transfers: Option<kiln_proto::worker::TransferReport>,
    /// Where it serves its CAS to peers.
    endpoint: Option<PeerEndpoint>,
    /// Operations it still runs for a session (with another server, or an earlier one) that
    /// ended: this server may take them over.
    orphans: std::collections::HashSet<String>,
    /// Who it is when it claims an operation (see [`worker_events::Joining`]).
    claimant: String,
}

/// Where a worker serves its CAS to its peers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerEndpoint {
    /// `grpc://HOST:PORT` or `grpcs://HOST:PORT`.
    pub endpoint: String,
    /// With `grpcs://`: the name its certificate carries (else empty).
    pub tls_name: String,
}

/// What a connected worker last reported of itself, for the status page and metrics.
#[derive(Debug, Clone, Default)]
pub struct WorkerView {
    /// Its name.
    pub name: String,
    /// Its directory cache, if it has one.
    pub dircache: Option<kiln_proto::worker::DirCacheReport>,
    /// Its transfers.
    pub transfers: Option<kiln_proto::worker::TransferReport>,
    /// Where it serves its CAS to peers.
    pub endpoint: Option<PeerEndpoint>,
    /// The blobs the scheduler knows it holds.
    pub blob_facts: usize,
    /// The actions this server may have running on it at once (what other servers it
    /// serves leave free).
    pub slots: usize,
}

/// Counts for the status page and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct SchedulerStats {
    /// Actions waiting for a worker.
    pub queued: usize,
    /// Actions on workers.
    pub running: usize,
    /// Connected workers.
    pub workers: usize,
    /// Finished operations kept for WaitExecution/GetOperation.
    pub completed_kept: usize,
    /// Placements made since start, by reason.
    pub placements: crate::scheduler::locality::Placements,
}

/// The shared state of the execution services.
pub struct ExecutionCore {
    scheduler: Mutex<Scheduler<Arc<Payload>, ExecutionResult>>,
    registry: Mutex<Registry>,
    sessions: Mutex<HashMap<WorkerId, Session>>,
    next_worker: AtomicU64,
    /// The CAS's accounting (its cap and pinned bytes).
    cas: CasClient,
    /// The CAS's chain: inputs are pinned through it.
    store: Arc<dyn BlobStore>,
    /// The CAS: an action's metadata and input tree are read through it.
    blobs: Arc<dyn Cas>,
    cache: Arc<ActionCache>,
    config: ExecutionConfig,
    kinds: scheduler::platform::Kinds,
    /// The largest message the worker API may send (`server.max_message_bytes`).
    max_message: usize,
    /// Signalled whenever an operation finishes (shutdown waits on it).
    finished: tokio::sync::Notify,
    /// Wakes the ticking task when the scheduler starts holding an action for a busy worker.
    woken: Arc<tokio::sync::Notify>,
    /// Where operations are shared with the farm's other servers (`[redis] operations`).
    shared: Option<Arc<shared_ops::SharedOps>>,
    /// How long workers keep running what a session that ended ran (set when this server's
    /// farm takes operations over; else they kill it at once).
    orphan_grace: std::sync::OnceLock<Duration>,
}

/// Operations a `ListOperations` call looks at, at most (a page may end short of its size
/// there, with a token to go on).
const MAX_EXAMINED: usize = 10_000;

/// How often the scheduler's clock advances when nothing asks for sooner.
const TICK: Duration = Duration::from_secs(1);

/// What one fact "worker W holds blob B" costs in the scheduler's map, about (the key, its
/// holders and its place in the arrival order), for `execution.locality_map_bytes`.
const FACT_BYTES: u64 = 128;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ExecutionCore {
    /// A core on the CAS (read through it as a [`Cas`]; its chain of tiers pins, its shards'
    /// handle accounts) and `cache`, configured by `[execution]`. Spawns its timer on the
    /// current tokio runtime.
    pub fn start(
        config: ExecutionConfig,
        local: &ChainCas,
        cache: Arc<ActionCache>,
        max_message: usize,
        shared: Option<Arc<shared_ops::SharedOps>>,
    ) -> Arc<ExecutionCore> {
        let kinds = scheduler::platform::Kinds(config.properties.clone());
        let scheduler = Scheduler::new(SchedulerConfig {
            kinds: kinds.clone(),
            max_retries: config.max_retries,
            worker_timeout: Duration::from_secs(config.worker_timeout_secs),
            timeout_grace: Duration::from_secs(30),
            max_queued: config.max_queued,
            unserved_timeout: (config.unserved_timeout_secs > 0)
                .then(|| Duration::from_secs(config.unserved_timeout_secs)),
            locality_wait: Duration::from_millis(config.locality_wait_ms),
            max_cached_dirs: config.max_cached_dirs_per_worker,
            weights: config.placement_weights,
            max_blob_facts: usize::try_from(config.locality_map_bytes.as_u64() / FACT_BYTES)
                .unwrap_or(usize::MAX),
        });
        let core = Arc::new(ExecutionCore {
            scheduler: Mutex::new(scheduler),
            registry: Mutex::new(Registry::new(config.max_completed_operations)),
            sessions: Mutex::new(HashMap::new()),
            next_worker: AtomicU64::new(1),
            cas: local.client().clone(),
            store: local.store().clone(),
            blobs: Arc::new(local.clone()),
            cache,
            config,
            kinds,
            max_message,
            finished: tokio::sync::Notify::new(),
            woken: Arc::new(tokio::sync::Notify::new()),
            shared,
            orphan_grace: std::sync::OnceLock::new(),
        });
        if let Some(shared) = &core.shared {
            shared.sweep();
        }
        let weak = Arc::downgrade(&core);
        tokio::spawn(async move {
            let mut next = Instant::now() + TICK;
            loop {
                // Every second, and when an action held for a busy worker is due to be placed
                // elsewhere (see `Scheduler::wake_at`; `apply` wakes this loop when it changes).
                let wake = {
                    let Some(core) = weak.upgrade() else { return };
                    let held = lock(&core.scheduler).wake_at();
                    let until = held.map_or(next, |h| h.min(next));
                    let woken = core.woken.clone();
                    drop(core);
                    tokio::select! {
                        _ = tokio::time::sleep_until(until.into()) => true,
                        _ = woken.notified() => false,
                    }
                };
                if !wake {
                    continue;
                }
                let Some(core) = weak.upgrade() else { return };
                let now = Instant::now();
                core.apply(|s, now| s.tick(now));
                if now >= next {
                    next = now + TICK;
                    let retention = Duration::from_secs(core.config.completed_retention_secs);
                    lock(&core.registry).prune(now, retention);
                }
            }
        });
        core
    }

    /// Queue, run and worker counts.
    pub fn stats(&self) -> SchedulerStats {
        let completed_kept = lock(&self.registry).finished_count();
        let s = lock(&self.scheduler);
        SchedulerStats {
            queued: s.queued(),
            running: s.running(),
            workers: s.workers(),
            completed_kept,
            placements: s.placements(),
        }
    }

    /// Runs one event on the scheduler and carries out what it decides.
    fn apply<T>(
        &self,
        event: impl FnOnce(&mut Scheduler<Arc<Payload>, ExecutionResult>, Instant) -> T,
    ) -> T {
        let (out, broken, held) = {
            let mut s = lock(&self.scheduler);
            let before = s.wake_at();
            let out = event(&mut s, Instant::now());
            let after = s.wake_at();
            let sooner = after.is_some_and(|a| before.is_none_or(|b| a < b));
            (out, self.carry_out(s.commands()), sooner)
        };
        if held {
            self.woken.notify_one();
        }
        self.drop_broken(broken);
        out
    }

    fn finished(&self, op: OpId, outcome: Outcome<ExecutionResult>) {
        let response = match outcome {
            Outcome::Reported(r) => ExecuteResponse {
                result: r.result,
                cached_result: false,
                status: r.status.or(Some(RpcStatus::default())),
                message: r.message,
                ..Default::default()
            },
            Outcome::Failed { kind, message } => ExecuteResponse {
                status: Some(RpcStatus {
                    code: kind.code() as i32,
                    message: message.clone(),
                    details: Vec::new(),
                }),
                message,
                ..Default::default()
            },
        };
        let Some(payload) = lock(&self.registry).finish(Instant::now(), op, response) else {
            return;
        };
        self.finished.notify_waiters();
        let store = self.store.clone();
        tokio::spawn(async move { store.unpin(payload.holder, &payload.pins).await });
    }

    /// The result to store in the action cache for a worker's report, if any: a successful
    /// execution of a cacheable action that exited 0 (or any exit code, with
    /// `execution.cache_failed_results`).
    fn to_cache<'r>(&self, payload: &Payload, r: &'r ExecutionResult) -> Option<&'r ActionResult> {
        let succeeded = r.status.as_ref().is_none_or(|s| s.code == 0);
        let result = r.result.as_ref()?;
        (payload.cacheable
            && succeeded
            && (result.exit_code == 0 || self.config.cache_failed_results))
            .then_some(result)
    }

    /// Queues a prepared job of `request` as a new operation; merged jobs release their own
    /// pins at once.
    fn submit(
        &self,
        job: Job<Arc<Payload>>,
        request: Arc<kiln_proto::reapi::ExecuteRequest>,
        taken: Option<Taken>,
    ) -> Result<(OpId, tokio::sync::watch::Receiver<OpView>), SubmitError> {
        let payload = job.payload.clone();
        let adopted = taken.is_some();
        let (name, running_on, sent_to) = match taken {
            Some(t) => (Some(t.name), t.running_on, t.sent_to),
            None => (None, None, String::new()),
        };
        // Named the one running its action only where other servers merge into it.
        let merge = (job.mergeable && self.orphan_grace().is_some()).then(|| job.key.clone());
        let view = OpView {
            worker: sent_to,
            name: name.unwrap_or_else(|| format!("operations/{}", uuid::Uuid::new_v4())),
            instance: job.key.instance.as_str().to_string(),
            stage: StageValue::Queued,
            action_digest: job.key.digest.to_proto(),
            digest_function: job.key.digest.function.proto() as i32,
            response: None,
        };
        let op_name = view.name.clone();
        // Register before the scheduler can dispatch (it needs the name), and watch while the
        // operation certainly is live: under the scheduler lock, taken before the registry's
        // (the same order as in `carry_out`).
        let (result, broken) = {
            let mut s = lock(&self.scheduler);
            if !s.can_be_served(&job.requirements) {
                tracing::warn!(
                    action = %job.key.digest,
                    requirements = ?job.requirements,
                    "no connected worker offers this platform; the action waits for one (execution.unserved_timeout_secs)"
                );
            }
            let submitted = match running_on {
                Some(worker) => s.submit_running(Instant::now(), job, worker),
                None => s.submit(Instant::now(), job),
            };
            let result = submitted.map(|sub| {
                let mut registry = lock(&self.registry);
                if !sub.merged {
                    registry.insert(sub.op, payload.clone(), view);
                }
                (sub, registry.watch_op(sub.op))
            });
            let broken = self.carry_out(s.commands());
            (result, broken)
        };
        self.drop_broken(broken);
        // A refused job and one merged into another operation release their own pins.
        if result.as_ref().map_or(true, |(sub, _)| sub.merged) {
            let store = self.store.clone();
            let (holder, pins) = (payload.holder, payload.pins.clone());
            tokio::spawn(async move { store.unpin(holder, &pins).await });
        }
        let (sub, rx) = result?;
        let rx = rx.expect("a submitted operation is live while the scheduler lock is held");
        // A merged job's operation is shared already; one taken over is shared under its
        // own name too (its watchers follow that name), whatever it ran as here.
        if let (Some(shared), true) = (&self.shared, !sub.merged || adopted) {
            shared.mirror(op_name, rx.clone(), request, merge);
        }
        Ok((sub.op, rx))
    }

    /// The server is shutting down: queued actions fail with UNAVAILABLE (clients retry
    /// elsewhere or after the restart), running ones get until `grace` to finish, then every
    /// worker session is closed so workers reconnect to the next server.
    pub async fn shutdown(&self, grace: Duration) {
        self.apply(|s, _| {
            s.fail_queued(
                kiln_reapi::status::ErrorKind::Unavailable,
                "the server is shutting down; retry",
            )
        });
        let drained = async {
            loop {
                let notified = self.finished.notified();
                if self.stats().running == 0 {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(grace, drained).await.is_err() {
            tracing::warn!("actions still running at the end of the grace period");
        }
        lock(&self.sessions).clear();
    }

    /// Watches an operation by name.
    pub fn watch(&self, name: &str) -> Option<tokio::sync::watch::Receiver<OpView>> {
        lock(&self.registry).watch(name)
    }

    /// An identical action (`key`) another server of the farm runs, to follow instead of
    /// running it again here: its operation, while it is not done.
    pub async fn running_elsewhere(
        &self,
        key: &BlobKey,
    ) -> Option<tokio::sync::watch::Receiver<OpView>> {
        // Only where a dead server's operations are taken over: else following one could
        // wait on a server that is gone.
        self.orphan_grace()?;
        let shared = self.shared.as_ref()?;
        let name = shared.running(key).await?;
        // This server's own: the scheduler merges it.
        if self.watch(&name).is_some() {
            return None;
        }
        let rx = self.watch_anywhere(&name).await?;
        let live = !rx.borrow().done();
        live.then_some(rx)
    }

    /// Watches an operation by name: this server's, or one another server accepted and
    /// shared through Redis.
    pub async fn watch_anywhere(&self, name: &str) -> Option<tokio::sync::watch::Receiver<OpView>> {
        if let Some(rx) = self.watch(name) {
            return Some(rx);
        }
        self.shared.as_ref()?.watch(name).await
    }

    /// A page of operations, in name order (see [`listing::OpQuery`]).
    pub fn list(
        &self,
        query: &listing::OpQuery,
        allowed: impl FnMut(&str) -> bool,
    ) -> (Vec<OpView>, Option<String>) {
        lock(&self.registry).list(query, allowed)
    }

    /// A page of operations in name order, this server's and, with `[redis] operations`, the
    /// farm's other servers' (see [`listing::OpQuery`]); and what could not be reached
    /// (Redis failed: this server's own are listed).
    pub async fn list_anywhere(
        &self,
        query: &listing::OpQuery,
        mut allowed: impl FnMut(&str) -> bool,
    ) -> (Vec<OpView>, Option<String>, Vec<String>) {
        let Some(shared) = &self.shared else {
            let (page, last) = self.list(query, allowed);
            return (page, last, Vec::new());
        };
        let mut names = lock(&self.registry).names(query, &mut allowed);
        let mut unreachable = match shared.names().await {
            Ok(farm) => {
                names.extend(farm.into_iter().filter(|n| query.wants_name(n)));
                names.sort_unstable();
                names.dedup();
                Vec::new()
            }
            Err(e) => vec![format!(
                "the operations of the farm's other servers (Redis failed: {e})"
            )],
        };
        // Views a page's worth at a time, until a page and one more are found (or
        // MAX_EXAMINED names were looked at: the page then ends there): this server's from its
        // registry, the others' from Redis, in one pipeline. Only wanted views are kept.
        let mut candidates: Vec<(&String, Option<OpView>)> = Vec::new();
        let mut wanted = 0;
        let mut cut = None;
        // At least 256 a round trip: small pages must not cost a round trip a name.
        for chunk in names.chunks(query.page_size.max(256)) {
            if candidates.len() >= MAX_EXAMINED {
                cut = candidates.last().map(|(n, _)| n.to_string());
                break;
            }
            let local: Vec<Option<OpView>> = {
                let registry = lock(&self.registry);
                chunk.iter().map(|n| registry.view(n)).collect()
            };
            let elsewhere: Vec<&String> = chunk
                .iter()
                .zip(&local)
                .filter(|(_, v)| v.is_none())
                .map(|(n, _)| n)
                .collect();
            let (read, failed) = match shared.read_many(&elsewhere).await {
                Ok(read) => (read, false),
                Err(e) => {
                    // This server's own of the chunk are listed; the page ends with it.
                    unreachable.push(format!(
                        "the farm's other servers' operations from {:?} on (Redis failed: {e})",
                        chunk.first()
                    ));
                    (vec![None; elsewhere.len()], true)
                }
            };
            let mut read = read.into_iter();
            for (name, view) in chunk.iter().zip(local) {
                let view = view
                    .or_else(|| read.next().flatten())
                    .filter(|v| query.wants_stage(v.stage) && allowed(&v.instance));
                wanted += usize::from(view.is_some());
                candidates.push((name, view));
            }
            if failed {
                cut = chunk.last().map(|n| n.to_string());
                break;
            }
            if wanted > query.page_size {
                break;
            }
        }
        let (page, last) = listing::page(query, candidates, allowed);
        (page, last.or(cut), unreachable)
    }

    /// Forgets a finished operation (here and in Redis); `Err(true)` while it runs,
    /// `Err(false)` if this server does not know it.
    pub async fn delete(&self, name: &str) -> Result<(), bool> {
        lock(&self.registry).delete(name)?;
        if let Some(shared) = &self.shared {
            shared.forget(name).await;
        }
        Ok(())
    }

    /// Whether this server accepted the operation named `name` (and still knows it).
    pub fn is_local(&self, name: &str) -> bool {
        self.watch(name).is_some()
    }

    /// Cancels an operation by name; false if it is not running or queued.
    pub fn cancel(&self, name: &str) -> bool {
        let Some(op) = lock(&self.registry).op(name) else {
            return false;
        };
        self.apply(|s, now| s.cancel(now, op));
        true
    }
}
