//! Operations shared through Redis (`[redis] operations`): every operation this server
//! accepts is written to Redis as it changes stage, and again every [`HEARTBEAT`] while it
//! runs (its key expires [`RUNNING`] after the last write, so the operations of a server that
//! died vanish within minutes; a finished one is kept [`DONE`]), so that another server naming
//! the same Redis answers `GetOperation`, `WaitOperation` and `WaitExecution` for it,
//! following it until it is done, or until its key is gone (the watcher's stream then ends
//! without a result, and a client asking again is told `NOT_FOUND`).
//!
//! This shares what operations look like, not who runs them: the server that accepted an
//! operation schedules it, and if that server dies its operations end with it. Taking
//! operations over is the scheduler's state in Redis, not built yet.

use super::ops::OpView;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::execution_stage::Value as StageValue;
use kiln_proto::reapi::{ExecuteOperationMetadata, ExecuteResponse};
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

/// Operations in Redis.
pub struct SharedOps {
    redis: Arc<Redis>,
}

impl SharedOps {
    /// Operations shared through `redis`.
    pub fn new(redis: Arc<Redis>) -> Arc<SharedOps> {
        Arc::new(SharedOps { redis })
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
    }

    /// Writes the operation `rx` watches to Redis now, at every change and every
    /// [`HEARTBEAT`], until it is done (in a task of its own). A failure is logged: the
    /// operation runs on regardless.
    pub fn mirror(self: &Arc<Self>, mut rx: watch::Receiver<OpView>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let view = rx.borrow_and_update().clone();
                this.write(&view).await;
                if view.done() {
                    return;
                }
                // A change, or the heartbeat; a closed channel (the operation gone) ends it.
                if let Ok(Err(_)) = tokio::time::timeout(HEARTBEAT, rx.changed()).await {
                    return;
                }
            }
        });
    }

    /// Writes `view`; the finished state is tried again (past a Redis that failed a moment
    /// ago) for [`FINAL_TRIES`].
    async fn write(&self, view: &OpView) {
        let (ttl, data) = (if view.done() { DONE } else { RUNNING }, encode(view));
        let give_up = tokio::time::Instant::now() + FINAL_TRIES;
        let mut wait = Duration::from_millis(250);
        loop {
            let Err(e) = self
                .redis
                .put(&self.key(&view.name), &data, Some(ttl))
                .await
            else {
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
        let Ok(Some(view)) = self.read(name).await else {
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
                        Ok(Some(view)) => view,
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
    async fn read(&self, name: &str) -> Result<Option<OpView>, ()> {
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

/// An operation as it is kept: its instance's length (4 bytes), the instance, then the
/// `google.longrunning.Operation` its watchers see.
fn encode(view: &OpView) -> Vec<u8> {
    let operation = view.to_operation().encode_to_vec();
    let mut out = Vec::with_capacity(4 + view.instance.len() + operation.len());
    out.extend_from_slice(&(view.instance.len() as u32).to_le_bytes());
    out.extend_from_slice(view.instance.as_bytes());
    out.extend_from_slice(&operation);
    out
}

/// The view of operation `name` kept as `data`; `None` when it is not one.
fn decode(name: &str, data: &[u8]) -> Option<OpView> {
    let len = u32::from_le_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let instance = std::str::from_utf8(data.get(4..4usize.checked_add(len)?)?).ok()?;
    let operation = Operation::decode(data.get(4 + len..)?).ok()?;
    let metadata = ExecuteOperationMetadata::decode(operation.metadata?.value.as_slice()).ok()?;
    let response = match operation.result {
        Some(operation::Result::Response(any)) => Some(Arc::new(
            ExecuteResponse::decode(any.value.as_slice()).ok()?,
        )),
        Some(operation::Result::Error(_)) => return None,
        None => None,
    };
    Some(OpView {
        name: name.to_string(),
        instance: instance.to_string(),
        stage: StageValue::try_from(metadata.stage).ok()?,
        action_digest: metadata.action_digest?,
        digest_function: metadata.digest_function,
        response,
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
        let ops = SharedOps::new(Redis::new(&config).unwrap().unwrap());
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
        let back = decode("operations/x", &encode(&view)).unwrap();
        assert_eq!(back.to_operation(), view.to_operation());
        assert_eq!(back.instance, "main");
        for bad in [&b""[..], b"\xff\xff\xff\xff", b"\x01\x00\x00\x00a\x99"] {
            assert!(decode("operations/x", bad).is_none());
        }
    }
}
