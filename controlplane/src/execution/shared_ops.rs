//! Operations shared through Redis (`[redis] operations`): every operation this server
//! accepts is written to Redis as it changes stage (one key per operation, kept a day while it
//! runs and an hour once it is done), so that another server naming the same Redis answers
//! `GetOperation`, `WaitOperation` and `WaitExecution` for it, following it until it is done.
//!
//! This shares what operations look like, not who runs them: the server that accepted an
//! operation schedules it, and if that server dies its operations end with it (their keys
//! expire). Taking operations over is the scheduler's state in Redis, not built yet.

use super::ops::OpView;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::execution_stage::Value as StageValue;
use kiln_proto::reapi::{ExecuteOperationMetadata, ExecuteResponse};
use kiln_redis::{Redis, Value};
use prost::Message;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long an operation's key lives while it runs (refreshed at each change).
const RUNNING: Duration = Duration::from_secs(24 * 3600);
/// How long it lives once the operation is done.
const DONE: Duration = Duration::from_secs(3600);
/// How often another server's operation is read again while it is followed.
const FOLLOW: Duration = Duration::from_millis(200);
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

    fn key(&self, name: &str) -> String {
        self.redis.key(&format!("op:{name}"))
    }

    /// Writes the operation `rx` watches to Redis now and at every change, until it is done
    /// (in a task of its own). A failure is logged: the operation runs on regardless.
    pub fn mirror(self: &Arc<Self>, mut rx: watch::Receiver<OpView>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let view = rx.borrow_and_update().clone();
                let ttl = if view.done() { DONE } else { RUNNING };
                if let Err(e) = this
                    .redis
                    .put(&this.key(&view.name), &encode(&view), Some(ttl))
                    .await
                {
                    if e.is_known_down() {
                        tracing::debug!(operation = %view.name, error = %e, "operation not shared");
                    } else {
                        tracing::warn!(operation = %view.name, error = %e, "cannot share an operation through Redis");
                    }
                }
                if view.done() || rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    /// Watches an operation another server accepted, if Redis has it: read again every
    /// [`FOLLOW`] while anyone watches and it is not done.
    pub async fn watch(self: &Arc<Self>, name: &str) -> Option<watch::Receiver<OpView>> {
        let view = self.read(name).await?;
        let done = view.done();
        let (tx, rx) = watch::channel(view);
        if !done {
            let (this, name) = (self.clone(), name.to_string());
            tokio::spawn(async move {
                while !tx.is_closed() {
                    tokio::time::sleep(FOLLOW).await;
                    let Some(view) = this.read(&name).await else {
                        continue;
                    };
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

    async fn read(&self, name: &str) -> Option<OpView> {
        match self.redis.get(&self.key(name), MAX_BYTES).await {
            Ok(Value::Found(data)) => decode(name, &data),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(operation = %name, error = %e, "cannot read an operation from Redis");
                None
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
