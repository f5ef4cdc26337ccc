//! Operations as clients see them: names, the latest view of each (stage, and the response
//! once done), finished ones kept for a while, and the `google.longrunning.Operation`
//! messages built from a view.

use super::Payload;
use crate::scheduler::OpId;
use bytes::Bytes;
use kiln_proto::longrunning::{operation, Operation};
use kiln_proto::reapi::{
    execution_stage::Value as StageValue, Digest, ExecuteOperationMetadata, ExecuteResponse,
};
use kiln_reapi::status::any;
use prost::Message;
use std::collections::{HashMap, VecDeque};
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
    /// The worker it was last sent to (as it is known: its credential's name, else its own;
    /// empty: none yet), which alone may say it still runs it after its session ended.
    pub worker: String,
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

struct Live {
    name: String,
    view: watch::Sender<OpView>,
    payload: Arc<Payload>,
}

/// A finished operation as it is kept: no channel (nothing will change), the response encoded
/// (about a third of its decoded size). Tens of thousands of these are kept.
struct Finished {
    instance: String,
    action_digest: Digest,
    digest_function: i32,
    response: Bytes,
}

impl Finished {
    fn view(&self, name: &str) -> Option<OpView> {
        let response = ExecuteResponse::decode(self.response.clone()).ok()?;
        Some(OpView {
            worker: String::new(),
            name: name.to_string(),
            instance: self.instance.clone(),
            stage: StageValue::Completed,
            action_digest: self.action_digest.clone(),
            digest_function: self.digest_function,
            response: Some(Arc::new(response)),
        })
    }
}

/// Live and recently finished operations.
#[derive(Default)]
pub struct Registry {
    live: HashMap<OpId, Live>,
    by_name: HashMap<String, OpId>,
    finished: HashMap<Arc<str>, Finished>,
    /// Finished names, oldest first (names are unique; a name deleted from `finished` stays
    /// here until it comes up, when forgetting it again does nothing).
    finished_order: VecDeque<(Instant, Arc<str>)>,
    /// At most this many finished operations are kept (0: no cap).
    max_finished: usize,
}

impl Registry {
    /// A registry keeping at most `max_finished` finished operations (0: no cap).
    pub fn new(max_finished: usize) -> Registry {
        Registry {
            max_finished,
            ..Registry::default()
        }
    }

    /// Finished operations kept now.
    pub fn finished_count(&self) -> usize {
        self.finished.len()
    }

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
        let view = self.finished.get(name)?.view(name)?;
        // The sender goes at once: watchers see a finished view and stop.
        Some(watch::channel(view).1)
    }

    /// Watches a live operation by id.
    pub fn watch_op(&self, op: OpId) -> Option<watch::Receiver<OpView>> {
        self.live.get(&op).map(|l| l.view.subscribe())
    }

    /// Operation `op` was sent to the worker named `worker`.
    pub fn set_worker(&self, op: OpId, worker: &str) {
        if let Some(live) = self.live.get(&op) {
            live.view.send_modify(|v| v.worker = worker.to_string());
        }
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
        let kept = {
            let view = live.view.borrow();
            Finished {
                instance: view.instance.clone(),
                action_digest: view.action_digest.clone(),
                digest_function: view.digest_function,
                response: Bytes::from(response.encode_to_vec()),
            }
        };
        live.view.send_modify(|v| {
            v.stage = StageValue::Completed;
            v.response = Some(Arc::new(response));
        });
        let name: Arc<str> = live.name.into();
        self.finished_order.push_back((now, name.clone()));
        self.finished.insert(name, kept);
        if self.max_finished > 0 {
            while self.finished.len() > self.max_finished {
                self.forget_oldest();
            }
        }
        Some(live.payload)
    }

    /// Forgets finished operations older than `retention`.
    pub fn prune(&mut self, now: Instant, retention: Duration) {
        while let Some((at, _)) = self.finished_order.front() {
            if now.saturating_duration_since(*at) < retention {
                break;
            }
            self.forget_oldest();
        }
    }

    /// The page of operations `query` asks for, in name order, keeping only those whose
    /// instance `allowed` accepts; and the name to resume after, when more remain.
    pub fn list(
        &self,
        query: &super::listing::OpQuery,
        mut allowed: impl FnMut(&str) -> bool,
    ) -> (Vec<OpView>, Option<String>) {
        let names = self.names(query, &mut allowed);
        let views = names.iter().map(|n| self.view(n));
        super::listing::page(query, names.iter().zip(views), allowed)
    }

    /// The names of the operations `query` may want, in name order: finished ones only
    /// when completed ones are wanted, and only of instances the caller may see (checked
    /// before their responses are decoded).
    pub fn names(
        &self,
        query: &super::listing::OpQuery,
        mut allowed: impl FnMut(&str) -> bool,
    ) -> Vec<String> {
        let finished = query.wants_stage(StageValue::Completed).then(|| {
            self.finished
                .iter()
                .filter(|(_, f)| allowed(&f.instance))
                .map(|(n, _)| &**n)
        });
        let mut names: Vec<String> = self
            .by_name
            .keys()
            .map(String::as_str)
            .chain(finished.into_iter().flatten())
            .filter(|n| query.wants_name(n))
            .map(str::to_string)
            .collect();
        names.sort_unstable();
        names
    }

    /// The view of operation `name`, live or finished.
    pub fn view(&self, name: &str) -> Option<OpView> {
        match self.by_name.get(name) {
            Some(op) => self.live.get(op).map(|l| l.view.borrow().clone()),
            None => self.finished.get(name).and_then(|f| f.view(name)),
        }
    }

    /// Forgets a finished operation; `Err(true)` if it is still running, `Err(false)` if
    /// there is none of that name.
    pub fn delete(&mut self, name: &str) -> Result<(), bool> {
        if self.by_name.contains_key(name) {
            return Err(true);
        }
        // Its place in `finished_order` goes when it comes up: forgetting a name already
        // gone does nothing.
        self.finished.remove(name).map(|_| ()).ok_or(false)
    }

    fn forget_oldest(&mut self) {
        if let Some((_, name)) = self.finished_order.pop_front() {
            self.finished.remove(&name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::execution::Payload;
    use kiln_reapi::digest::{BlobKey, Digest as BlobDigest, DigestFunction, InstanceName};

    fn payload() -> Arc<Payload> {
        Arc::new(Payload {
            start: Default::default(),
            key: BlobKey::new(
                InstanceName::default_instance(),
                BlobDigest::of(DigestFunction::Sha256, b"action"),
            ),
            cacheable: true,
            pins: Vec::new(),
            holder: kiln_dataplane::store::tier::PinHolder::new(std::time::Duration::from_secs(60)),
        })
    }

    fn run(r: &mut Registry, op: OpId, at: Instant) -> String {
        let view = OpView {
            worker: String::new(),
            name: format!("op-{op}"),
            instance: String::new(),
            stage: StageValue::Queued,
            action_digest: Digest::default(),
            digest_function: 0,
            response: None,
        };
        let name = r.insert(op, payload(), view);
        r.finish(at, op, response(op));
        name
    }

    fn response(op: OpId) -> ExecuteResponse {
        ExecuteResponse {
            cached_result: op.is_multiple_of(2),
            message: format!("finished {op}"),
            ..Default::default()
        }
    }

    #[test]
    fn a_finished_operation_reads_back_as_it_finished() {
        let mut r = Registry::new(10);
        let view = OpView {
            worker: String::new(),
            name: "op-7".into(),
            instance: "main".into(),
            stage: StageValue::Executing,
            action_digest: Digest {
                hash: "ab".repeat(32),
                size_bytes: 140,
            },
            digest_function: 7,
            response: None,
        };
        let name = r.insert(7, payload(), view);
        let live = r.watch(&name).unwrap();
        r.finish(Instant::now(), 7, response(7));
        assert_eq!(
            live.borrow().response.as_deref(),
            Some(&response(7)),
            "a watcher of the live operation sees the response"
        );
        let later = r.watch(&name).unwrap();
        let seen = later.borrow().clone();
        assert_eq!(seen.response.as_deref(), Some(&response(7)));
        assert_eq!(seen.stage, StageValue::Completed);
        assert_eq!(seen.instance, "main");
        assert_eq!(seen.action_digest.size_bytes, 140);
        assert_eq!(seen.digest_function, 7);
        assert_eq!(
            later.borrow().to_operation(),
            live.borrow().to_operation(),
            "GetOperation answers the same before and after"
        );
    }

    #[test]
    fn finished_operations_are_capped_and_expire_oldest_first() {
        let t0 = Instant::now();
        let mut r = Registry::new(3);
        let names: Vec<String> = (0..5)
            .map(|i| run(&mut r, i, t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(r.finished_count(), 3, "capped");
        assert!(r.watch(&names[0]).is_none() && r.watch(&names[1]).is_none());
        assert!(r.watch(&names[2]).unwrap().borrow().done());
        r.prune(t0 + Duration::from_millis(12_500), Duration::from_secs(10));
        assert!(r.watch(&names[2]).is_none(), "older than the retention");
        assert!(r.watch(&names[3]).is_some() && r.watch(&names[4]).is_some());
        let mut uncapped = Registry::new(0);
        for i in 0..100 {
            run(&mut uncapped, i, t0);
        }
        assert_eq!(uncapped.finished_count(), 100);
    }

    #[test]
    fn operations_list_in_pages_by_prefix_stage_and_instance_and_delete_when_finished() {
        use crate::execution::listing::OpQuery;
        use kiln_proto::longrunning::ListOperationsRequest;
        let t0 = Instant::now();
        let mut r = Registry::new(0);
        let finished: Vec<String> = (0..5).map(|i| run(&mut r, i, t0)).collect();
        let live = OpView {
            worker: String::new(),
            name: "op-9".into(),
            instance: "other".into(),
            stage: StageValue::Executing,
            action_digest: Digest::default(),
            digest_function: 0,
            response: None,
        };
        r.insert(9, payload(), live);
        let query = |filter: &str, size: i32, token: &str| {
            OpQuery::parse(&ListOperationsRequest {
                name: "op-".into(),
                filter: filter.into(),
                page_size: size,
                page_token: token.into(),
                ..Default::default()
            })
            .unwrap()
        };
        // Pages of two, in name order, each resuming after the last.
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let (page, last) = r.list(&query("", 2, &token), |_| true);
            assert!(page.len() <= 2);
            seen.extend(page.into_iter().map(|v| v.name));
            match last {
                Some(l) => token = OpQuery::token_after(&l),
                None => break,
            }
        }
        let mut all = finished.clone();
        all.push("op-9".into());
        assert_eq!(seen, all);
        // By stage, and only instances the caller may see.
        let (running, _) = r.list(&query("stage=EXECUTING", 0, ""), |_| true);
        assert_eq!(running.len(), 1);
        let (visible, _) = r.list(&query("", 0, ""), |i| i != "other");
        assert_eq!(visible.len(), 5);
        // Delete: a finished one goes; a running one stays; an unknown one is not found.
        assert_eq!(r.delete(&finished[0]), Ok(()));
        assert!(r.watch(&finished[0]).is_none());
        assert_eq!(r.delete("op-9"), Err(true));
        assert_eq!(r.delete(&finished[0]), Err(false));
        // Pruning past a deleted one still works.
        r.prune(t0 + Duration::from_secs(60), Duration::from_secs(1));
        assert_eq!(r.finished_count(), 0);
    }
}
