//! Operations shared through Redis (`[redis] operations`): every operation this server
//! accepts is written to Redis as it changes stage, and again every [`HEARTBEAT`] while it
//! runs (its key expires [`RUNNING`] after the last write, so the operations of a server that
//! died vanish within minutes; a finished one is kept [`DONE`]), so that another server naming
//! the same Redis answers `GetOperation`, `WaitOperation` and `WaitExecution` for it,
//! following it until it is done, or until its key is gone (the watcher's stream then ends
//! without a result, and a client asking again is told `NOT_FOUND`).
//!
//! Each record names the server that schedules the operation and carries the request that
//! made it, and each server lists the operations it schedules and has not finished
//! (`owned:{server}`): with `[redis] take_over`, the servers that outlive one take its
//! operations over from these (see [`super::farm`]).

use super::ops::OpView;
use kiln_proto::farm::SharedOperation;
use kiln_proto::longrunning::operation;
use kiln_proto::reapi::execution_stage::Value as StageValue;
use kiln_proto::reapi::{ExecuteOperationMetadata, ExecuteRequest, ExecuteResponse};
use kiln_reapi::digest::BlobKey;
use kiln_redis::{Redis, Value};
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often a running operation's key is written again, changed or not.
const HEARTBEAT: Duration = Duration::from_secs(60);
/// How long a running operation's key lives after its last write.
const RUNNING: Duration = Duration::from_secs(180);
/// How long it lives once the operation is done.
const DONE: Duration = Duration::from_secs(600);
/// How long the finished state is tried (through a Redis that failed a moment ago).
const FINAL_TRIES: Duration = Duration::from_secs(30);
/// How often another server's operation is read again while it is followed.
const FOLLOW: Duration = Duration::from_millis(200);
/// Failed reads in a row after which a followed operation is given up.
const MAX_FAILED_READS: u32 = 25;
/// The largest operation read (its response inlines outputs up to the server's limits).
const MAX_BYTES: u64 = 64 << 20;
/// Operations read in one pipeline for a listing are each at most this (a larger one is read
/// on its own).
const LISTED_BYTES: u64 = 256 << 10;
/// The most operations of the farm a listing looks at.
pub const MAX_LISTED: usize = 100_000;
/// How often expired operations leave the index.
const SWEEP: Duration = Duration::from_secs(60);

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Operations in Redis.
pub struct SharedOps {
    redis: Arc<Redis>,
    /// This server's name in Redis (new at every start).
    server: String,
    /// Unfinished operations are listed in `owned:{server}` (`[redis] take_over`).
    listing: std::sync::atomic::AtomicBool,
}

/// An operation as Redis has it.
#[derive(Debug, Clone)]
pub struct Shared {
    /// What its watchers see.
    pub view: OpView,
    /// The server that schedules it.
    pub owner: String,
    /// The request that made it, if it may be taken over.
    pub request: Option<ExecuteRequest>,
}

impl SharedOps {
    /// Operations shared through `redis`, by the server named `server` there.
    pub fn new(redis: Arc<Redis>, server: String) -> Arc<SharedOps> {
        Arc::new(SharedOps {
            redis,
            server,
            listing: Default::default(),
        })
    }

    /// Lists this server's unfinished operations from now on, for the farm to take over.
    pub fn list_owned(&self) {
        self.listing
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Redis, for the farm's leases.
    pub(super) fn redis(&self) -> &Arc<Redis> {
        &self.redis
    }

    /// This server's name in Redis.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The set of operations `server` schedules and has not finished.
    pub(super) fn owned_key(&self, server: &str) -> String {
        self.redis.key(&format!("owned:{server}"))
    }

    /// The key of operation `name`, with a hash tag (a byte of the name's hash) so that its
    /// temporary key shares its Cluster slot.
    fn key(&self, name: &str) -> String {
        let tag = blake3::hash(name.as_bytes()).as_bytes()[0];
        self.redis.key(&format!("op:{{{tag:02x}}}:{name}"))
    }

    /// Removes operation `name` from Redis (it was deleted here).
    pub async fn forget(&self, name: &str) {
        if let Err(e) = self.redis.delete(&self.key(name)).await {
            tracing::debug!(operation = %name, error = %e, "cannot remove an operation from Redis");
        }
        let _ = self.redis.sorted_remove(&self.index_key(), name).await;
    }

    /// The index of operations in Redis: each name scored with when its key expires.
    fn index_key(&self) -> String {
        self.redis.key("ops")
    }

    /// Drops expired operations from the index every minute, while `self` lives (a task).
    pub fn sweep(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut every = tokio::time::interval(SWEEP);
            loop {
                every.tick().await;
                let Some(ops) = this.upgrade() else { return };
                let _ = ops
                    .redis
                    .sorted_remove_below(&ops.index_key(), now_ms())
                    .await;
            }
        });
    }

    /// The operations Redis holds (at most [`MAX_LISTED`]), in no order; `Err` with why
    /// when Redis failed.
    pub async fn names(&self) -> Result<Vec<String>, String> {
        self.redis
            .sorted_from(&self.index_key(), now_ms(), MAX_LISTED)
            .await
            .map_err(|e| e.to_string())
    }

    /// Operations `names` as Redis has them, in order (`None`: not there); `Err` with why
    /// when Redis failed.
    pub async fn read_many(&self, names: &[&String]) -> Result<Vec<Option<OpView>>, String> {
        let keys: Vec<(String, u64)> = names.iter().map(|n| (self.key(n), LISTED_BYTES)).collect();
        let values = self
            .redis
            .get_many(&keys)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::with_capacity(names.len());
        for (name, value) in names.iter().zip(values) {
            let view = match value {
                Value::Found(data) => decode(name, &data).map(|s| s.view),
                // Its response inlines large outputs: read on its own.
                Value::TooLarge(_) => self.read(name).await.ok().flatten().map(|s| s.view),
                Value::Missing => None,
            };
            out.push(view);
        }
        Ok(out)
    }

    /// Writes the operation `rx` watches to Redis as `name` (with `request`, for whoever
    /// takes it over) now, at every change and every [`HEARTBEAT`], until it is done (in a
    /// task of its own); lists it among this server's until then. With `merge` (the action's
    /// key, when identical actions may share it), it is named the one running that action,
    /// unless another is, so that an identical Execute on any server follows it. A failure is
    /// logged: the operation runs on regardless.
    pub fn mirror(
        self: &Arc<Self>,
        name: String,
        mut rx: watch::Receiver<OpView>,
        request: Arc<ExecuteRequest>,
        merge: Option<BlobKey>,
    ) {
        let this = self.clone();
        let running = merge.map(|key| self.redis.digest_key("run", &key));
        tokio::spawn(async move {
            let listing = this.listing.load(std::sync::atomic::Ordering::Relaxed);
            loop {
                let mut view = rx.borrow_and_update().clone();
                view.name.clone_from(&name);
                // Listed at every write while it runs: a server that took this one for dead
                // (its lease lapsed while it lived) emptied its list.
                if listing && !view.done() {
                    this.list(&name).await;
                }
                if let (Some(key), false) = (&running, view.done()) {
                    // Named the one running the action (or kept so, its expiry renewed),
                    // unless another is; before the operation is written, so that whoever
                    // sees it running can merge into it.
                    let _ = this.redis.hold(key, &name, RUNNING).await;
                }
                this.write(&view, Some(&request)).await;
                if view.done() {
                    if listing {
                        this.unlist(&name).await;
                    }
                    if let Some(key) = &running {
                        let _ = this.redis.release(key, name.as_bytes()).await;
                    }
                    return;
                }
                // A change, or the heartbeat; a closed channel (the operation gone) ends it.
                if let Ok(Err(_)) = tokio::time::timeout(HEARTBEAT, rx.changed()).await {
                    return;
                }
            }
        });
    }

    /// The operation another server runs for the action `key` (identical actions share it),
    /// if any.
    pub async fn running(&self, key: &BlobKey) -> Option<String> {
        match self
            .redis
            .get(&self.redis.digest_key("run", key), 1024)
            .await
        {
            Ok(Value::Found(name)) => String::from_utf8(name.to_vec()).ok(),
            _ => None,
        }
    }

    /// Ends operation `name` in Redis as `view` (finished) says, for an operation this server
    /// took over and finished without scheduling it.
    pub async fn end(&self, view: &OpView) {
        self.write(view, None).await;
    }

    /// Lists `name` among this server's unfinished operations.
    async fn list(&self, name: &str) {
        let key = self.owned_key(&self.server);
        if let Err(e) = self.redis.set_add(&key, name).await {
            e.log(
                &name,
                "cannot list an operation in Redis; it cannot be taken over until its next write",
            );
        }
    }

    /// Takes `name` off this server's list.
    async fn unlist(&self, name: &str) {
        let key = self.owned_key(&self.server);
        if let Err(e) = self.redis.set_remove(&key, name).await {
            tracing::debug!(operation = %name, error = %e, "cannot take a finished operation off the list in Redis");
        }
    }

    /// Writes `view` (with `request`); the finished state is tried again (past a Redis that
    /// failed a moment ago) for [`FINAL_TRIES`].
    async fn write(&self, view: &OpView, request: Option<&ExecuteRequest>) {
        let ttl = if view.done() { DONE } else { RUNNING };
        let data = encode(view, &self.server, request);
        let give_up = tokio::time::Instant::now() + FINAL_TRIES;
        let mut wait = Duration::from_millis(250);
        loop {
            let Err(e) = self
                .redis
                .put(&self.key(&view.name), &data, Some(ttl))
                .await
            else {
                // Listed (for ListOperations anywhere) until its key expires.
                let until = now_ms().saturating_add(ttl.as_millis() as u64);
                let index = self.index_key();
                if let Err(e) = self.redis.sorted_add(&index, &view.name, until).await {
                    tracing::debug!(operation = %view.name, error = %e, "cannot index an operation in Redis");
                }
                return;
            };
            if !view.done() || tokio::time::Instant::now() + wait > give_up {
                e.log(&view.name, "cannot share an operation through Redis");
                return;
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(4));
        }
    }

    /// Watches an operation another server accepted, if Redis has it: read again every
    /// [`FOLLOW`] while anyone watches, until it is done or its key is gone (or Redis failed
    /// [`MAX_FAILED_READS`] times in a row); the channel then closes.
    pub async fn watch(self: &Arc<Self>, name: &str) -> Option<watch::Receiver<OpView>> {
        let Ok(Some(Shared { view, .. })) = self.read(name).await else {
            return None;
        };
        let done = view.done();
        let (tx, rx) = watch::channel(view);
        if !done {
            let (this, name) = (self.clone(), name.to_string());
            tokio::spawn(async move {
                let mut failed = 0;
                loop {
                    tokio::select! {
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(FOLLOW) => {}
                    }
                    let view = match this.read(&name).await {
                        Ok(Some(shared)) => shared.view,
                        Ok(None) => return,
                        Err(()) => {
                            failed += 1;
                            if failed >= MAX_FAILED_READS {
                                return;
                            }
                            continue;
                        }
                    };
                    failed = 0;
                    let done = view.done();
                    tx.send_if_modified(|old| {
                        let changed = old.stage != view.stage || old.done() != view.done();
                        *old = view;
                        changed
                    });
                    if done {
                        return;
                    }
                }
            });
        }
        Some(rx)
    }

    /// Operation `name` as Redis has it: `Ok(None)` when it is not there (or not readable as
    /// one), `Err` when Redis failed.
    pub async fn read(&self, name: &str) -> Result<Option<Shared>, ()> {
        match self.redis.get(&self.key(name), MAX_BYTES).await {
            Ok(Value::Found(data)) => Ok(decode(name, &data)),
            Ok(_) => Ok(None),
            Err(e) => {
                tracing::debug!(operation = %name, error = %e, "cannot read an operation from Redis");
                Err(())
            }
        }
    }
}

/// An operation as it is kept: a `kiln.farm.v1.SharedOperation`.
fn encode(view: &OpView, owner: &str, request: Option<&ExecuteRequest>) -> Vec<u8> {
    SharedOperation {
        instance_name: view.instance.clone(),
        operation: Some(view.to_operation()),
        owner: owner.to_string(),
        request: request.cloned(),
        worker: view.worker.clone(),
    }
    .encode_to_vec()
}

/// Operation `name` kept as `data`; `None` when it is not one.
fn decode(name: &str, data: &[u8]) -> Option<Shared> {
    let shared = SharedOperation::decode(data).ok()?;
    let operation = shared.operation?;
    let metadata = ExecuteOperationMetadata::decode(operation.metadata?.value.as_slice()).ok()?;
    let response = match operation.result {
        Some(operation::Result::Response(any)) => Some(Arc::new(
            ExecuteResponse::decode(any.value.as_slice()).ok()?,
        )),
        Some(operation::Result::Error(_)) => return None,
        None => None,
    };
    Some(Shared {
        view: OpView {
            worker: shared.worker,
            name: name.to_string(),
            instance: shared.instance_name,
            stage: StageValue::try_from(metadata.stage).ok()?,
            action_digest: metadata.action_digest?,
            digest_function: metadata.digest_function,
            response,
        },
        owner: shared.owner,
        request: shared.request,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_operations_key_has_a_hash_tag_for_its_cluster_slot() {
        let config = kiln_config::RedisConfig {
            url: "redis://127.0.0.1:1".into(),
            ..Default::default()
        };
        let ops = SharedOps::new(Redis::new(&config).unwrap().unwrap(), "s".into());
        let key = ops.key("operations/abc");
        let tag = &key[key.find('{').unwrap()..=key.find('}').unwrap()];
        assert_eq!(tag.len(), 4, "{key}");
        assert!(
            key.starts_with("kiln:op:{") && key.ends_with(":operations/abc"),
            "{key}"
        );
    }

    #[test]
    fn an_operation_reads_back_as_written_and_garbage_is_none() {
        let view = OpView {
            worker: String::new(),
            name: "operations/x".into(),
            instance: "main".into(),
            stage: StageValue::Completed,
            action_digest: kiln_proto::reapi::Digest {
                hash: "ab".repeat(32),
                size_bytes: 3,
            },
            digest_function: 1,
            response: Some(Arc::new(ExecuteResponse {
                cached_result: true,
                ..Default::default()
            })),
        };
        let request = ExecuteRequest {
            instance_name: "main".into(),
            skip_cache_lookup: true,
            ..Default::default()
        };
        let back = decode("operations/x", &encode(&view, "srv", Some(&request))).unwrap();
        assert_eq!(back.view.to_operation(), view.to_operation());
        assert_eq!(back.view.instance, "main");
        assert_eq!((back.owner.as_str(), back.request), ("srv", Some(request)));
        let without = decode("operations/x", &encode(&view, "srv", None)).unwrap();
        assert_eq!(without.request, None);
        for bad in [&b""[..], b"\xff\xff\xff\xff", b"\x12\x01\x99"] {
            assert!(decode("operations/x", bad).is_none());
        }
    }
}
