//! Operations as clients see them: names, the latest view of each (stage, and the response
//! once done), finished ones kept for a while, and the `google.longrunning.Operation`
//! messages built from a view.

use super::Payload;
use crate::scheduler::OpId;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::{
    execution_stage::Value as StageValue, Digest, ExecuteOperationMetadata, ExecuteResponse,
};
use prost::Message;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// What watchers of an operation see.
#[derive(Debug, Clone)]
pub struct OpView {
    /// The operation's name.
    pub name: String,
    /// The instance it runs in (callers need the execute role there to see it).
    pub instance: String,
    /// Its stage.
    pub stage: StageValue,
    /// The action it runs.
    pub action_digest: Digest,
    /// The digest function.
    pub digest_function: i32,
    /// The response, once done.
    pub response: Option<Arc<ExecuteResponse>>,
}

impl OpView {
    /// True once the operation finished.
    pub fn done(&self) -> bool {
        self.response.is_some()
    }

    /// The longrunning message for this view.
    pub fn to_operation(&self) -> Operation {
        let metadata = ExecuteOperationMetadata {
            stage: self.stage as i32,
            action_digest: Some(self.action_digest.clone()),
            digest_function: self.digest_function,
            ..Default::default()
        };
        Operation {
            name: self.name.clone(),
            metadata: Some(any(
                "build.bazel.remote.execution.v2.ExecuteOperationMetadata",
                &metadata,
            )),
            done: self.done(),
            result: self.response.as_ref().map(|r| {
                operation::Result::Response(any(
                    "build.bazel.remote.execution.v2.ExecuteResponse",
                    r.as_ref(),
                ))
            }),
        }
    }
}

/// Packs a message into an `Any`.
pub fn any(type_name: &str, message: &impl Message) -> prost_types::Any {
    prost_types::Any {
        type_url: format!("type.googleapis.com/{type_name}"),
        value: message.encode_to_vec(),
    }
}

struct Live {
    name: String,
    view: watch::Sender<OpView>,
    payload: Arc<Payload>,
}

/// Live and recently finished operations.
#[derive(Default)]
pub struct Registry {
    live: HashMap<OpId, Live>,
    by_name: HashMap<String, OpId>,
    finished: HashMap<String, (Instant, watch::Receiver<OpView>)>,
}

impl Registry {
    /// Registers a new operation; returns its name.
    pub fn insert(&mut self, op: OpId, payload: Arc<Payload>, view: OpView) -> String {
        let name = view.name.clone();
        let (tx, _) = watch::channel(view);
        self.by_name.insert(name.clone(), op);
        self.live.insert(
            op,
            Live {
                name: name.clone(),
                view: tx,
                payload,
            },
        );
        name
    }

    /// The name of a live operation.
    pub fn name(&self, op: OpId) -> Option<&str> {
        self.live.get(&op).map(|l| l.name.as_str())
    }

    /// The payload of a live operation.
    pub fn payload(&self, op: OpId) -> Option<Arc<Payload>> {
        self.live.get(&op).map(|l| l.payload.clone())
    }

    /// The live operation with this name.
    pub fn op(&self, name: &str) -> Option<OpId> {
        self.by_name.get(name).copied()
    }

    /// Watches an operation, live or recently finished.
    pub fn watch(&self, name: &str) -> Option<watch::Receiver<OpView>> {
        if let Some(op) = self.by_name.get(name) {
            return self.live.get(op).map(|l| l.view.subscribe());
        }
        self.finished.get(name).map(|(_, rx)| rx.clone())
    }

    /// Watches a live operation by id.
    pub fn watch_op(&self, op: OpId) -> Option<watch::Receiver<OpView>> {
        self.live.get(&op).map(|l| l.view.subscribe())
    }

    /// Moves a live operation to a new stage.
    pub fn set_stage(&self, op: OpId, stage: StageValue) {
        if let Some(l) = self.live.get(&op) {
            l.view.send_modify(|v| v.stage = stage);
        }
    }

    /// Completes an operation; returns its payload.
    pub fn finish(
        &mut self,
        now: Instant,
        op: OpId,
        response: ExecuteResponse,
    ) -> Option<Arc<Payload>> {
        let live = self.live.remove(&op)?;
        self.by_name.remove(&live.name);
        live.view.send_modify(|v| {
            v.stage = StageValue::Completed;
            v.response = Some(Arc::new(response));
        });
        self.finished
            .insert(live.name, (now, live.view.subscribe()));
        Some(live.payload)
    }

    /// Forgets finished operations older than `retention`.
    pub fn prune(&mut self, now: Instant, retention: Duration) {
        self.finished
            .retain(|_, (at, _)| now.saturating_duration_since(*at) < retention);
    }
}
