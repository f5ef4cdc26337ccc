//! Taking over the operations of a server that died (`[redis] take_over`). Every server
//! sharing operations through Redis holds a lease there (`server:{name}`, renewed every fifth
//! of `redis.lease_secs`) and is listed in `servers`. Each server checks the others' leases
//! as often; when one has lapsed, the first server to claim it (`takeover:{name}`, set only
//! if missing) reads the dead server's unfinished operations (`owned:{name}`) and schedules
//! each again under its own name: from the action cache if the result is there by now, else
//! prepared and queued as if just asked for (merged into an identical action it runs
//! already). Watchers anywhere follow the operation through Redis as before, and see it end.
//!
//! One server schedules an operation at a time as long as leases hold: a server cut off from
//! Redis for longer than its lease while it still runs may have its operations taken over
//! (each then runs twice, and the later result is the one shared); it says so in its log when
//! it finds its lease gone.

use super::shared_ops::{Shared, SharedOps};
use super::{lock, prepare, ExecutionCore, OpView};
use crate::error::ControlError;
use crate::scheduler::{OpId, WorkerId};
use futures::StreamExt;
use kiln_proto::google::rpc::Status as RpcStatus;
use kiln_proto::reapi::execution_stage::Value as StageValue;
use kiln_proto::reapi::{ExecuteRequest, ExecuteResponse};
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use kiln_reapi::status::Classify;
use kiln_redis::When;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::Instrument;

/// Operations of a dead server taken over at once.
const AT_ONCE: usize = 16;

/// The servers sharing one Redis, as one of them sees them.
pub struct Farm {
    ops: Arc<SharedOps>,
    lease: Duration,
}

impl Farm {
    /// Starts holding this server's lease and watching the others' (in tasks of their own,
    /// for as long as `core` lives).
    pub fn start(core: &Arc<ExecutionCore>, ops: Arc<SharedOps>, lease: Duration) {
        // Workers keep what a session that ended ran for three leases: a dead server is taken
        // over within a lease and a fifth, and its operations then adopted.
        let _ = core.orphan_grace.set(lease * 3);
        ops.list_owned();
        let farm = Arc::new(Farm { ops, lease });
        let span = tracing::info_span!("farm", server = %farm.ops.server());
        // The lease has a task of its own: nothing else this server does in Redis (a long
        // take-over, a write retried) may hold up its renewal.
        let weak = Arc::downgrade(core);
        tokio::spawn({
            let farm = farm.clone();
            async move { farm.hold(weak).await }.instrument(span.clone())
        });
        let weak = Arc::downgrade(core);
        tokio::spawn(async move { farm.watch(weak).await }.instrument(span));
    }

    fn key(&self, what: &str, server: &str) -> String {
        self.ops.redis().key(&format!("{what}:{server}"))
    }

    fn servers_key(&self) -> String {
        self.ops.redis().key("servers")
    }

    fn every(&self) -> tokio::time::Interval {
        let mut ticks = tokio::time::interval((self.lease / 5).max(Duration::from_millis(100)));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks
    }

    /// Renews this server's lease every fifth of it; beside that (in a task of its own, so
    /// that a slow Redis never spaces the renewals out), lists the server among the farm's.
    async fn hold(self: Arc<Self>, core: Weak<ExecutionCore>) {
        use tracing::Instrument;
        // Counts renewals; the listing task follows it, and ends when this does.
        let (renewed, renewals) = tokio::sync::watch::channel(0u64);
        tokio::spawn({
            let this = self.clone();
            async move { this.list(renewals).await }.in_current_span()
        });
        let mut ticks = self.every();
        let mut held = false;
        loop {
            ticks.tick().await;
            if core.strong_count() == 0 {
                return;
            }
            held = self.renew(held).await;
            if held {
                renewed.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// After each renewal (those made while it works are answered once): lists this server
    /// among the farm's, and keeps its list of operations from expiring (it expires ten
    /// leases after the server stops: long after another took it over).
    async fn list(&self, mut renewals: tokio::sync::watch::Receiver<u64>) {
        let mut said = false;
        while renewals.changed().await.is_ok() {
            // Every time: a server that took this one for dead removed it from the list.
            let redis = self.ops.redis();
            let joined = redis.set_add(&self.servers_key(), self.ops.server()).await;
            let owned = self.ops.owned_key(self.ops.server());
            let _ = redis.expire(&owned, self.lease * 10).await;
            if let (Ok(()), false) = (joined, said) {
                said = true;
                tracing::info!("this server takes over the operations of servers sharing its Redis that die, and they take over its own");
            }
        }
    }

    /// Renews this server's lease (makes it, the first time); whether it holds one now.
    async fn renew(&self, held: bool) -> bool {
        let redis = self.ops.redis();
        let key = lease_key(&self.ops, self.ops.server());
        let renewed = match held {
            true => redis.set(&key, b"1", self.lease, When::Present).await,
            false => Ok(false),
        };
        match renewed {
            Ok(true) => true,
            Ok(false) => {
                if held {
                    tracing::error!(
                        "this server's lease in Redis lapsed (Redis out of reach for longer than redis.lease_secs?): another server may have taken over its operations, and they may run twice"
                    );
                }
                match redis.set(&key, b"1", self.lease, When::Always).await {
                    Ok(_) => true,
                    Err(e) => {
                        e.log(&"lease", "cannot take this server's lease in Redis");
                        false
                    }
                }
            }
            Err(e) => {
                e.log(&"lease", "cannot renew this server's lease in Redis");
                // Still held until it lapses; the next renewal finds out.
                held
            }
        }
    }

    /// Every fifth of a lease, looks for servers whose lease lapsed, and takes over each that
    /// this server claims first (in a task of its own, so that the others are looked at too).
    async fn watch(self: Arc<Self>, core: Weak<ExecutionCore>) {
        let mut ticks = self.every();
        loop {
            ticks.tick().await;
            let Some(live) = core.upgrade() else { return };
            self.answer(&live).await;
            drop(live);
            for dead in self.dead().await {
                // Long enough for this server to take them all; if it dies meanwhile, another
                // claims the dead one again after this.
                let claim = self
                    .ops
                    .redis()
                    .set(
                        &self.key("takeover", &dead),
                        self.ops.server().as_bytes(),
                        self.lease * 6,
                        When::Missing,
                    )
                    .await;
                if let (Ok(true), Some(core)) = (claim, core.upgrade()) {
                    let this = self.clone();
                    tokio::spawn(
                        async move { this.take_over(&core, &dead).await }.in_current_span(),
                    );
                }
            }
        }
    }

    /// The listed servers, other than this one, whose lease has lapsed.
    async fn dead(&self) -> Vec<String> {
        let redis = self.ops.redis();
        let Ok(servers) = redis.set_members(&self.servers_key()).await else {
            return Vec::new();
        };
        let others: Vec<String> = servers
            .into_iter()
            .filter(|s| s != self.ops.server())
            .collect();
        if others.is_empty() {
            return Vec::new();
        }
        let leases: Vec<String> = others.iter().map(|s| lease_key(&self.ops, s)).collect();
        let Ok(alive) = redis.exists_many(&leases).await else {
            return Vec::new();
        };
        others
            .into_iter()
            .zip(alive)
            .filter(|(_, alive)| !alive)
            .map(|(s, _)| s)
            .collect()
    }

    /// Schedules the unfinished operations of `dead` here, each claimed by taking it off the
    /// dead server's list (so no two servers take the same one), then forgets `dead`. An
    /// operation whose record could not be read stays on the list for the next claim.
    async fn take_over(&self, core: &Arc<ExecutionCore>, dead: &str) {
        let redis = self.ops.redis();
        let owned = self.ops.owned_key(dead);
        let Ok(names) = redis.set_members(&owned).await else {
            return; // claimed again once the claim lapses
        };
        tracing::warn!(
            dead,
            operations = names.len(),
            "a server sharing this Redis stopped renewing its lease: taking over its operations"
        );
        let (taken, left) = futures::stream::iter(names)
            .map(|name| {
                let owned = &owned;
                async move {
                    let shared = match self.ops.read(&name).await {
                        Ok(shared) => shared,
                        Err(()) => return (0, 1), // Redis failed: left for the next claim
                    };
                    match redis.set_remove(owned, &name).await {
                        Ok(true) => {}
                        Ok(false) => return (0, 0), // another server took it
                        Err(_) => return (0, 1),
                    }
                    match shared {
                        Some(Shared {
                            view,
                            owner,
                            request: Some(request),
                        }) if !view.done() && owner == dead => {
                            core.adopt(&self.ops, name, request, &view.worker).await;
                            (1, 0)
                        }
                        _ => (0, 0),
                    }
                }
            })
            .buffer_unordered(AT_ONCE)
            .fold((0usize, 0usize), |(t, l), (t1, l1)| async move {
                (t + t1, l + l1)
            })
            .await;
        if left == 0 {
            let _ = redis.set_remove(&self.servers_key(), dead).await;
        }
        tracing::info!(dead, taken, left, "took over a dead server's operations");
        // What it was asked after it died (its lease had not lapsed yet): done here, once
        // all its operations are (an ask of one left for the next claim would be lost).
        if left == 0 {
            self.answer_for(core, dead).await;
        }
    }
}

impl ExecutionCore {
    /// Schedules operation `name` (another server's, which died) here, as `request` asks:
    /// ended at once when the action cache has its result or it cannot be prepared (missing
    /// inputs included: the client uploads them and asks again, as after any Execute).
    pub(super) async fn adopt(
        &self,
        ops: &SharedOps,
        name: String,
        request: ExecuteRequest,
        worker: &str,
    ) {
        if self.watch(&name).is_some() {
            return;
        }
        let span = tracing::info_span!("take over", operation = %name);
        async {
            let response = match self.schedule(&name, &request, worker).await {
                Ok(None) => return,
                Ok(Some(cached)) => cached,
                Err(status) => ExecuteResponse {
                    message: status.message.clone(),
                    status: Some(status),
                    ..Default::default()
                },
            };
            ops.end(&ended(&name, &request, response)).await;
        }
        .instrument(span)
        .await
    }

    /// Queues operation `name` of `request` here (`None`), or the response it ends with at
    /// once: the action cache's result, or why it cannot run.
    async fn schedule(
        &self,
        name: &str,
        request: &ExecuteRequest,
        worker: &str,
    ) -> Result<Option<ExecuteResponse>, RpcStatus> {
        let key = key_of(request).map_err(|e| e.rpc_status())?;
        if !request.skip_cache_lookup {
            if let Ok(result) = self.cache.get(&key).await {
                return Ok(Some(ExecuteResponse {
                    result: Some(result),
                    cached_result: true,
                    status: Some(Default::default()),
                    ..Default::default()
                }));
            }
        }
        let job = prepare::prepare(self, &key, request)
            .await
            .map_err(|e| e.rpc_status())?;
        let request = Arc::new(request.clone());
        // A worker may still run it (its session with the dead server ended, and it kept the
        // action running for whoever takes it over): it runs on there.
        let holder = self.orphan_holder(name, worker);
        let taken = super::Taken {
            name: name.to_string(),
            running_on: holder,
            sent_to: worker.to_string(),
        };
        match self.submit(job, request, Some(taken)) {
            Ok((op, _)) => {
                if let Some(worker) = holder {
                    self.adopted(worker, op, name);
                }
                Ok(None)
            }
            Err(e) => {
                let status = e.status();
                Err(RpcStatus {
                    code: status.code() as i32,
                    message: status.message().to_string(),
                    details: Vec::new(),
                })
            }
        }
    }
}

/// The action `request` names.
fn key_of(request: &ExecuteRequest) -> Result<BlobKey, ControlError> {
    let instance = InstanceName::new(&request.instance_name)?;
    let digest = Digest::from_proto_field(request.action_digest.as_ref(), request.digest_function)?;
    Ok(BlobKey::new(instance, digest))
}

/// Operation `name` of `request`, finished with `response`.
fn ended(name: &str, request: &ExecuteRequest, response: ExecuteResponse) -> OpView {
    OpView {
        worker: String::new(),
        name: name.to_string(),
        instance: request.instance_name.clone(),
        stage: StageValue::Completed,
        action_digest: request.action_digest.clone().unwrap_or_default(),
        digest_function: request.digest_function,
        response: Some(Arc::new(response)),
    }
}

impl ExecutionCore {
    /// A connected worker that still runs operation `name` for a session that ended: the
    /// worker named `worker`, the one it was sent to (another's claim is not believed).
    fn orphan_holder(&self, name: &str, worker: &str) -> Option<WorkerId> {
        lock(&self.sessions)
            .iter()
            .find(|(_, s)| !worker.is_empty() && s.claimant == worker && s.orphans.contains(name))
            .map(|(id, _)| *id)
    }

    /// Operation `name` (here `op`) was submitted as running on `worker`, which held it as
    /// an orphan: the worker reports it here from now on. If the scheduler queued it instead
    /// (the worker left meanwhile, or an identical action runs here), the orphan is killed.
    fn adopted(&self, worker: WorkerId, op: OpId, name: &str) {
        // Merged into an identical operation here (under another name): not this one.
        let own = lock(&self.registry).name(op) == Some(name);
        let adopted = own && lock(&self.scheduler).is_running_on(op, worker);
        if let Some(session) = lock(&self.sessions).get_mut(&worker) {
            session.orphans.remove(name);
        }
        if adopted {
            tracing::info!(operation = %name, worker, "taken over while its worker still runs it: it runs on there");
        }
        if !self.tell_orphan(worker, name.to_string(), Some(op), adopted) && adopted {
            self.drop_broken(vec![worker]);
        }
    }

    /// How long workers keep running what a session that ended ran, when this server's farm
    /// takes operations over.
    pub fn orphan_grace(&self) -> Option<Duration> {
        self.orphan_grace.get().copied()
    }
}

/// The key of `server`'s lease.
fn lease_key(ops: &SharedOps, server: &str) -> String {
    ops.redis().key(&format!("server:{server}"))
}

/// What a server may ask of the server of the farm that schedules an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    /// Cancel it.
    Cancel,
    /// Forget it (it is finished).
    Delete,
}

impl Ask {
    fn word(self) -> &'static str {
        match self {
            Ask::Cancel => "cancel",
            Ask::Delete => "delete",
        }
    }
}

impl ExecutionCore {
    /// Asks the server of the farm that schedules operation `name` (not this one) to cancel
    /// or delete it: it does at its next look at the farm (within a fifth of a lease). A
    /// finished operation is deleted from Redis at once; a running one cannot be deleted,
    /// nor a finished one cancelled (the codes are those of this server's own).
    pub async fn ask_owner(&self, name: &str, ask: Ask) -> Result<(), tonic::Status> {
        let word = ask.word();
        let (Some(ops), Some(_)) = (&self.shared, self.orphan_grace()) else {
            return Err(tonic::Status::failed_precondition(format!(
                "operation {name:?} was accepted by another server of the farm; {word} it there"
            )));
        };
        let shared = match ops.read(name).await {
            Ok(Some(shared)) => shared,
            Ok(None) => {
                return Err(tonic::Status::not_found(format!(
                    "no operation named {name:?}"
                )))
            }
            Err(()) => {
                return Err(tonic::Status::unavailable(format!(
                    "cannot read operation {name:?} from Redis at {}; try again",
                    ops.redis().at()
                )))
            }
        };
        // This server's own, running, yet not known here: taken over and merged into an
        // identical operation, whose name the client does not know.
        if shared.owner == ops.server() && ask == Ask::Cancel && !shared.view.done() {
            return Err(tonic::Status::failed_precondition(format!(
                "operation {name:?} was merged into an identical one on this server when it was taken over; {word} that one (ListOperations shows it)"
            )));
        }
        // Its server gone, nobody reads what it is asked: the operation is being taken over.
        let lease = lease_key(ops, &shared.owner);
        if let Ok(alive) = ops.redis().exists_many(&[lease]).await {
            if alive.first() == Some(&false) && !shared.view.done() {
                return Err(tonic::Status::unavailable(format!(
                    "the server of operation {name:?} is gone, and another takes it over within redis.lease_secs: {word} it then"
                )));
            }
        }
        match (ask, shared.view.done()) {
            (Ask::Delete, false) => {
                return Err(tonic::Status::failed_precondition(format!(
                    "operation {name:?} is still running; cancel it (CancelOperation), then delete it once it has finished"
                )))
            }
            (Ask::Cancel, true) => {
                return Err(tonic::Status::not_found(format!(
                    "no running or queued operation named {name:?}"
                )))
            }
            (Ask::Delete, true) => ops.forget(name).await,
            (Ask::Cancel, false) => {}
        }
        let key = ops.redis().key(&format!("asks:{}", shared.owner));
        let asked = ops.redis().set_add(&key, &format!("{word}:{name}")).await;
        let _ = ops.redis().expire(&key, Duration::from_secs(600)).await;
        asked.map_err(|e| {
            tonic::Status::unavailable(format!(
                "cannot ask the operation's server through Redis: {e}"
            ))
        })
    }
}

impl Farm {
    /// Does what other servers asked of this one's operations (cancel, delete).
    async fn answer(&self, core: &Arc<ExecutionCore>) {
        self.answer_for(core, self.ops.server()).await;
    }

    /// Does what other servers asked of `server`'s operations (this one's, or those of a
    /// dead one it took over).
    async fn answer_for(&self, core: &Arc<ExecutionCore>, server: &str) {
        let redis = self.ops.redis();
        let key = self.key("asks", server);
        let Ok(asks) = redis.set_members(&key).await else {
            return;
        };
        for ask in asks {
            if !matches!(redis.set_remove(&key, &ask).await, Ok(true)) {
                continue;
            }
            match ask.split_once(':') {
                Some(("cancel", name)) => {
                    tracing::info!(operation = %name, "cancelled as another server of the farm asked");
                    core.cancel(name);
                }
                Some(("delete", name)) => {
                    let _ = core.delete(name).await;
                }
                _ => {}
            }
        }
    }
}
