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
use super::{prepare, ExecutionCore, OpView};
use crate::error::ControlError;
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
    /// Starts holding this server's lease and watching the others' (in a task of its own,
    /// for as long as `core` lives).
    pub fn start(core: &Arc<ExecutionCore>, ops: Arc<SharedOps>, lease: Duration) {
        let farm = Farm { ops, lease };
        let core = Arc::downgrade(core);
        let span = tracing::info_span!("farm", server = %farm.ops.server());
        tokio::spawn(async move { farm.run(core).await }.instrument(span));
    }

    fn key(&self, what: &str, server: &str) -> String {
        self.ops.redis().key(&format!("{what}:{server}"))
    }

    fn servers_key(&self) -> String {
        self.ops.redis().key("servers")
    }

    async fn run(self, core: Weak<ExecutionCore>) {
        let every = (self.lease / 5).max(Duration::from_millis(100));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut held = false;
        let mut listed = false;
        loop {
            ticks.tick().await;
            if core.strong_count() == 0 {
                return;
            }
            held = self.renew(held).await;
            if held && !listed {
                listed = self.join().await;
            }
            if held {
                self.look_for_the_dead(&core).await;
            }
        }
    }

    /// Renews this server's lease (makes it, the first time); whether it holds one now.
    async fn renew(&self, held: bool) -> bool {
        let redis = self.ops.redis();
        let key = self.key("server", self.ops.server());
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

    /// Lists this server among the farm's; whether it is.
    async fn join(&self) -> bool {
        match self
            .ops
            .redis()
            .set_add(&self.servers_key(), self.ops.server())
            .await
        {
            Ok(()) => {
                tracing::info!("this server takes over the operations of servers sharing its Redis that die, and they take over its own");
                true
            }
            Err(e) => {
                e.log(&"servers", "cannot list this server in Redis");
                false
            }
        }
    }

    /// Takes over the operations of every listed server whose lease has lapsed, if this
    /// server claims it first.
    async fn look_for_the_dead(&self, core: &Weak<ExecutionCore>) {
        let redis = self.ops.redis();
        let Ok(servers) = redis.set_members(&self.servers_key()).await else {
            return;
        };
        let others: Vec<String> = servers
            .into_iter()
            .filter(|s| s != self.ops.server())
            .collect();
        if others.is_empty() {
            return;
        }
        let leases: Vec<String> = others.iter().map(|s| self.key("server", s)).collect();
        let Ok(alive) = redis.exists_many(&leases).await else {
            return;
        };
        for (dead, _) in others.iter().zip(alive).filter(|(_, alive)| !alive) {
            // Long enough for this server to take them all; if it dies meanwhile, another
            // claims the dead one again after this.
            let claim = redis
                .set(
                    &self.key("takeover", dead),
                    self.ops.server().as_bytes(),
                    self.lease * 6,
                    When::Missing,
                )
                .await;
            if let Ok(true) = claim {
                let Some(core) = core.upgrade() else { return };
                self.take_over(&core, dead).await;
            }
        }
    }

    /// Schedules the unfinished operations of `dead` here, then forgets `dead`.
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
        let taken = futures::stream::iter(names)
            .map(|name| async move {
                match self.ops.read(&name).await {
                    Ok(Some(Shared {
                        view,
                        request: Some(request),
                        ..
                    })) if !view.done() => {
                        core.adopt(&self.ops, name, request).await;
                        1
                    }
                    _ => 0,
                }
            })
            .buffer_unordered(AT_ONCE)
            .fold(0usize, |n, one| async move { n + one })
            .await;
        let _ = redis.delete(&owned).await;
        let _ = redis.set_remove(&self.servers_key(), dead).await;
        tracing::info!(dead, taken, "took over a dead server's operations");
    }
}

impl ExecutionCore {
    /// Schedules operation `name` (another server's, which died) here, as `request` asks:
    /// ended at once when the action cache has its result or it cannot be prepared (missing
    /// inputs included: the client uploads them and asks again, as after any Execute).
    pub(super) async fn adopt(&self, ops: &SharedOps, name: String, request: ExecuteRequest) {
        if self.watch(&name).is_some() {
            return;
        }
        let span = tracing::info_span!("take over", operation = %name);
        async {
            let response = match self.schedule(&name, &request).await {
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
        match self.submit(job, request, Some(name.to_string())) {
            Ok(_) => Ok(None),
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
        name: name.to_string(),
        instance: request.instance_name.clone(),
        stage: StageValue::Completed,
        action_digest: request.action_digest.clone().unwrap_or_default(),
        digest_function: request.digest_function,
        response: Some(Arc::new(response)),
    }
}
