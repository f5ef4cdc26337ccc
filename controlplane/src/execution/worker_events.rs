//! What worker sessions tell the core: a worker joining, reporting on itself (its directory
//! cache, the blobs it holds, its transfers), keeping alive, draining, leaving, and an
//! action's process ending and its result arriving.

use super::{lock, ExecutionCore, PeerEndpoint, Session, WorkerView};
use crate::scheduler::OpId;
use crate::scheduler::WorkerId;
use kiln_proto::worker::{
    server_message, AdoptOperation, ExecutionResult, KillOperation, ServerMessage,
};
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// A worker's Hello, as its session registers it.
pub(super) struct Joining {
    /// Its name, in logs and results.
    pub name: String,
    /// Who it is when it claims an operation still runs there: its credential's name when
    /// it presented one, else its name; empty: it may claim none.
    pub claimant: String,
    /// Platform properties offered.
    pub properties: Vec<(String, String)>,
    /// Actions it may run for this server at once.
    pub capacity: usize,
    /// Where it serves its CAS to peers.
    pub endpoint: Option<PeerEndpoint>,
    /// What it still runs for sessions that ended.
    pub orphans: Vec<String>,
}

/// Orphans of one worker taken in.
const MAX_ORPHANS: usize = 4096;

/// Operation names, with their ids here while they are live, and whether they were last sent
/// to the worker that names them.
type Named = Vec<(String, Option<(OpId, bool)>)>;

impl ExecutionCore {
    /// Registers a worker session, still running `orphans` for sessions that ended; returns
    /// its id.
    pub(super) fn worker_joined(
        &self,
        joining: Joining,
        tx: mpsc::Sender<ServerMessage>,
    ) -> WorkerId {
        let Joining {
            name,
            claimant,
            properties,
            capacity,
            endpoint,
            orphans,
        } = joining;
        let id = self.next_worker.fetch_add(1, Ordering::Relaxed);
        let serves = endpoint.is_some();
        lock(&self.sessions).insert(
            id,
            Session {
                tx,
                name: name.clone(),
                claimant: claimant.clone(),
                dircache: None,
                transfers: None,
                endpoint,
                orphans: Default::default(),
            },
        );
        tracing::info!(worker = %name, id, capacity, "worker connected");
        // What it still runs of this server's own operations (queued again when its session
        // broke) runs on there, before anything else is placed on it.
        let (ours, others) = self.orphans_of(orphans, &claimant);
        let ids: Vec<OpId> = ours
            .iter()
            .filter_map(|(_, op)| op.filter(|(_, sent_there)| *sent_there).map(|(op, _)| op))
            .collect();
        let taken = self
            .apply(|s, now| s.worker_joined_running(now, id, properties, capacity, serves, &ids));
        self.note_orphans(id, others);
        for (operation, op) in ours {
            let adopted = op.is_some_and(|(op, _)| taken.contains(&op));
            self.orphan_told(id, operation, op, adopted);
        }
        id
    }

    /// `orphans` (names a worker gave), this server's own (with their id while they are
    /// live) apart from the others; at most [`MAX_ORPHANS`] (a worker runs a few hundred
    /// actions at most: a longer list is not believed).
    /// Only the worker an operation was last sent to (`worker`, by name) may have it run on
    /// there: another's claim is not believed (it is told to kill what it names).
    fn orphans_of(&self, orphans: Vec<String>, worker: &str) -> (Named, Named) {
        let registry = lock(&self.registry);
        orphans
            .into_iter()
            .take(MAX_ORPHANS)
            .map(|name| {
                let op = registry.op(&name);
                let sent_there =
                    !worker.is_empty() && registry.view(&name).is_some_and(|v| v.worker == worker);
                (name, op.map(|op| (op, sent_there)))
            })
            .partition(|(name, op)| op.is_some() || registry.watch(name).is_some())
    }

    /// Keeps `others`, the worker's orphans of other servers, for a take-over.
    fn note_orphans(&self, worker: WorkerId, others: Named) {
        if let Some(session) = lock(&self.sessions).get_mut(&worker) {
            session.orphans = others.into_iter().map(|(name, _)| name).collect();
        }
    }

    /// Tells `worker` its orphan `operation` (here `op`) runs on there (`adopted`: the
    /// worker it is sent to from now on, which alone may name it again), or to kill it
    /// (placed elsewhere meanwhile, or finished). Whether the worker's session took it.
    pub(super) fn tell_orphan(
        &self,
        worker: WorkerId,
        operation: String,
        op: Option<OpId>,
        adopted: bool,
    ) -> bool {
        let message = match (adopted, op) {
            (true, Some(op)) => {
                self.mark_sent(op, worker);
                server_message::Message::Adopt(AdoptOperation { operation })
            }
            _ => server_message::Message::Kill(KillOperation { operation }),
        };
        self.send(worker, message)
    }

    /// [`Self::tell_orphan`] of this server's own operation, queued again when the worker's
    /// session broke.
    fn orphan_told(
        &self,
        worker: WorkerId,
        operation: String,
        op: Option<(OpId, bool)>,
        adopted: bool,
    ) {
        if adopted {
            tracing::info!(%operation, worker, "queued again, but its worker still runs it: it runs on there");
        }
        self.tell_orphan(worker, operation, op.map(|(op, _)| op), adopted);
    }

    /// Operation `op` is sent to (or runs on) `worker`: only that worker may later say it
    /// still runs it.
    pub(super) fn mark_sent(&self, op: OpId, worker: WorkerId) {
        let claimant = lock(&self.sessions)
            .get(&worker)
            .map(|s| s.claimant.clone());
        if let Some(claimant) = claimant {
            lock(&self.registry).set_worker(op, &claimant);
        }
    }

    /// What a worker still runs for sessions that ended. Those of this server's operations
    /// (its session with this server broke and came back, or this server took them over
    /// before the worker came back) were queued again: one still queued runs on where it
    /// runs (adopted), one placed elsewhere or finished meanwhile is killed. The others may
    /// be taken over later.
    pub(super) fn worker_orphans(&self, worker: WorkerId, orphans: Vec<String>) {
        let Some(name) = lock(&self.sessions)
            .get(&worker)
            .map(|s| s.claimant.clone())
        else {
            return;
        };
        let (ours, others) = self.orphans_of(orphans, &name);
        self.note_orphans(worker, others);
        for (operation, op) in ours {
            // Adopted here already (its Adopt crossed this list on the way).
            if op.is_some_and(|(op, _)| lock(&self.scheduler).is_running_on(op, worker)) {
                continue;
            }
            let adopted = op.is_some_and(|(op, sent_there)| {
                sent_there && self.apply(|s, now| s.take_to(now, op, worker))
            });
            self.orphan_told(worker, operation, op, adopted);
        }
    }

    /// The worker does not run `operation` after all (it was to be adopted there): queued
    /// again.
    pub(super) fn not_running(&self, worker: WorkerId, operation: &str) {
        let Some(op) = lock(&self.registry).op(operation) else {
            return;
        };
        tracing::info!(%operation, worker, "the worker no longer ran an action to be adopted there: queued again");
        self.apply(|s, now| s.not_running(now, worker, op));
    }

    /// A worker reports on itself: its directory cache and the directories it holds, the
    /// blobs its CAS holds, its transfers (an entry that does not parse is skipped: it only
    /// loses the worker a placement or a hint).
    pub(super) fn worker_report(&self, worker: WorkerId, report: kiln_proto::worker::WorkerReport) {
        {
            let mut sessions = lock(&self.sessions);
            let Some(session) = sessions.get_mut(&worker) else {
                return;
            };
            if report.dircache.is_some() {
                session.dircache = report.dircache;
            }
            if report.transfers.is_some() {
                session.transfers = report.transfers;
            }
        }
        let keys = |held: Vec<kiln_proto::worker::HeldKey>| -> Vec<BlobKey> {
            held.into_iter()
                .filter_map(|r| {
                    let instance = InstanceName::new(&r.instance_name).ok()?;
                    let digest =
                        Digest::from_proto_field(r.digest.as_ref(), r.digest_function).ok()?;
                    Some(BlobKey::new(instance, digest))
                })
                .collect()
        };
        let (added, removed) = (keys(report.added), keys(report.removed));
        if report.full || !added.is_empty() || !removed.is_empty() {
            self.apply(|s, now| s.worker_dirs(now, worker, report.full, added, removed));
        }
        let (added, removed) = (keys(report.blobs_added), keys(report.blobs_removed));
        if report.blobs_full || !added.is_empty() || !removed.is_empty() {
            self.apply(|s, _| s.worker_blobs(worker, report.blobs_full, added, removed));
        }
    }

    /// Each connected worker's last report of itself, by name.
    pub fn worker_views(&self) -> Vec<WorkerView> {
        let facts: HashMap<WorkerId, (usize, usize)> = {
            let ids: Vec<WorkerId> = lock(&self.sessions).keys().copied().collect();
            let scheduler = lock(&self.scheduler);
            ids.into_iter()
                .map(|id| {
                    let facts = (scheduler.worker_blob_facts(id), scheduler.worker_slots(id));
                    (id, facts)
                })
                .collect()
        };
        let mut out: Vec<WorkerView> = lock(&self.sessions)
            .iter()
            .map(|(id, s)| WorkerView {
                name: s.name.clone(),
                dircache: s.dircache,
                transfers: s.transfers,
                endpoint: s.endpoint.clone(),
                blob_facts: facts.get(id).map_or(0, |f| f.0),
                slots: facts.get(id).map_or(0, |f| f.1),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Facts "worker W holds blob B" the scheduler keeps.
    pub fn blob_facts(&self) -> usize {
        lock(&self.scheduler).blob_facts()
    }

    pub(super) fn worker_seen(&self, worker: WorkerId) {
        self.apply(|s, now| s.worker_seen(now, worker));
    }

    pub(super) fn worker_capacity(&self, worker: WorkerId, capacity: usize) {
        self.apply(|s, now| s.worker_capacity(now, worker, capacity));
    }

    pub(super) fn worker_draining(&self, worker: WorkerId) {
        self.apply(|s, _| s.worker_draining(worker));
    }

    pub(super) fn worker_left(&self, worker: WorkerId) {
        if let Some(session) = lock(&self.sessions).remove(&worker) {
            tracing::info!(worker = %session.name, id = worker, "worker disconnected");
        }
        self.apply(|s, now| s.worker_left(now, worker));
    }

    /// The worker says an operation's process exited and its outputs are uploading.
    pub(super) fn executed(&self, worker: WorkerId, operation: &str) {
        let Some(op) = lock(&self.registry).op(operation) else {
            return;
        };
        self.apply(|s, now| s.executed(now, worker, op));
    }

    /// A worker reports an operation's result. The result is stored in the action cache
    /// before the operation completes, so a client that calls `Execute` or `GetActionResult`
    /// as soon as it sees the completion finds it, and a crash in between loses nothing that
    /// was reported (tested by `inputs_outputs_symlinks_and_executables` in
    /// `tests/execution.rs`).
    pub(super) async fn reported(&self, worker: WorkerId, result: ExecutionResult) {
        let Some(op) = lock(&self.registry).op(&result.operation) else {
            tracing::debug!(operation = %result.operation, "result for an operation no longer running");
            return;
        };
        if !lock(&self.scheduler).is_running_on(op, worker) {
            tracing::debug!(operation = %result.operation, worker, "late result from a worker the operation was taken from");
            return;
        }
        let payload = lock(&self.registry).payload(op);
        if let Some((payload, stored)) = payload
            .as_ref()
            .and_then(|p| self.to_cache(p, &result).map(|r| (p, r)))
        {
            if let Err(e) = self.cache.put(payload.key.clone(), stored).await {
                tracing::warn!(operation = %result.operation, error = %e, "cannot store an action result (in this server's action cache, or in Redis after it)");
            }
        }
        self.apply(|s, now| s.reported(now, worker, op, result));
    }
}
