//! The Execution service: `Execute` (cache lookup first, then queue) and `WaitExecution`, both
//! streaming the operation until it is done. A client that goes away stops receiving; the
//! action keeps running for anyone else waiting on it and for the action cache.

use super::ops::OpView;
use super::{prepare, ExecutionCore};
use crate::error::ControlError;
use kiln_proto::longrunning::Operation;
use kiln_proto::reapi::execution_server::Execution;
use kiln_proto::reapi::{
    execution_stage::Value as StageValue, ExecuteRequest, ExecuteResponse, WaitExecutionRequest,
};
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use kiln_reapi::status::Classify;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{debug_span, Instrument};

/// How often a waiting client is sent the operation again even if nothing changed, so idle
/// streams survive proxies and the client knows the server is alive.
const REFRESH: Duration = Duration::from_secs(30);

/// The Execution service.
pub struct ExecutionService {
    core: Arc<ExecutionCore>,
}

impl ExecutionService {
    /// Serves `core`.
    pub fn new(core: Arc<ExecutionCore>) -> ExecutionService {
        ExecutionService { core }
    }
}

type OpStream = Pin<Box<dyn futures::Stream<Item = Result<Operation, Status>> + Send>>;

/// Streams an operation's views until it is done.
pub(super) fn stream(mut rx: watch::Receiver<OpView>) -> OpStream {
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let view = rx.borrow_and_update().clone();
            if tx.send(Ok(view.to_operation())).await.is_err() {
                return; // the client went away; the action runs on
            }
            if view.done() {
                return;
            }
            // A change, or nothing for a while (send the same view again); a closed channel ends it.
            if let Ok(Err(_)) = tokio::time::timeout(REFRESH, rx.changed()).await {
                return;
            }
        }
    });
    Box::pin(ReceiverStream::new(out))
}

impl ExecutionService {
    async fn execute_inner(&self, request: ExecuteRequest) -> Result<OpStream, Status> {
        let instance = InstanceName::new(&request.instance_name).map_err(ControlError::from)?;
        let digest =
            Digest::from_proto_field(request.action_digest.as_ref(), request.digest_function)
                .map_err(ControlError::from)?;
        let key = BlobKey::new(instance, digest);
        if !request.skip_cache_lookup {
            match self.core.cache.get(&key).await {
                Ok(result) => return Ok(cached(&key, result)),
                Err(ControlError::NotFound(_) | ControlError::Incomplete(_)) => {}
                Err(e) => tracing::warn!(error = %e, "action cache lookup failed; executing"),
            }
        }
        // An identical action running on another server of the farm: follow it.
        if let Some(rx) = self.core.running_elsewhere(&key).await {
            return Ok(follow_elsewhere(self.core.clone(), key, request, rx));
        }
        let job = prepare::prepare(&self.core, &key, &request).await?;
        match self.core.submit(job, Arc::new(request), None) {
            Ok((_, rx)) => Ok(stream(rx)),
            Err(e) => Err(e.status()),
        }
    }
}

/// Streams an identical action's operation another server runs (`rx`) to its end, and serves
/// its result if that result is complete in this server's CAS (the action cache checks it);
/// if it is not (the farm's servers share no CAS), or the operation is lost, runs the action
/// here after all and streams that operation instead.
fn follow_elsewhere(
    core: Arc<ExecutionCore>,
    key: BlobKey,
    request: ExecuteRequest,
    mut rx: watch::Receiver<OpView>,
) -> OpStream {
    let (tx, out) = mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let view = rx.borrow_and_update().clone();
            if let Some(response) = &view.response {
                // Served as it is when it carries no result (it failed), or one whose outputs
                // are all here.
                let here = match &response.result {
                    None => true,
                    Some(result) => core.cache.complete_here(&key, result).await,
                };
                if here {
                    let _ = tx.send(Ok(view.to_operation())).await;
                    return;
                }
                break;
            }
            if tx.send(Ok(view.to_operation())).await.is_err() {
                return; // the client went away
            }
            if let Ok(Err(_)) = tokio::time::timeout(REFRESH, rx.changed()).await {
                break; // lost before it ended
            }
        }
        if tx.is_closed() {
            return; // nobody to run it for
        }
        tracing::info!(action = %key.digest, "an identical action another server ran left no complete result here: running it here");
        let here = match prepare::prepare(&core, &key, &request).await {
            Ok(job) => core
                .submit(job, Arc::new(request), None)
                .map_err(|e| e.status()),
            Err(e) => Err(e.into()),
        };
        match here {
            Ok((_, rx)) => {
                let mut views = stream(rx);
                while let Some(item) = futures::StreamExt::next(&mut views).await {
                    if tx.send(item).await.is_err() {
                        return;
                    }
                }
            }
            Err(status) => {
                let _ = tx.send(Err(status)).await;
            }
        }
    });
    Box::pin(ReceiverStream::new(out))
}

/// A finished operation for a cache hit.
fn cached(key: &BlobKey, result: kiln_proto::reapi::ActionResult) -> OpStream {
    let view = OpView {
        worker: String::new(),
        name: format!("operations/{}", uuid::Uuid::new_v4()),
        instance: key.instance.as_str().to_string(),
        stage: StageValue::Completed,
        action_digest: key.digest.to_proto(),
        digest_function: key.digest.function.proto() as i32,
        response: Some(Arc::new(ExecuteResponse {
            result: Some(result),
            cached_result: true,
            status: Some(Default::default()),
            ..Default::default()
        })),
    };
    Box::pin(futures::stream::iter([Ok(view.to_operation())]))
}

#[tonic::async_trait]
impl Execution for ExecutionService {
    type ExecuteStream = OpStream;
    type WaitExecutionStream = OpStream;

    async fn execute(
        &self,
        request: Request<ExecuteRequest>,
    ) -> Result<Response<OpStream>, Status> {
        let instance = request.get_ref().instance_name.clone();
        crate::auth::check(&request, crate::auth::paths::EXECUTE, Some(&instance))?;
        let request = request.into_inner();
        let span = debug_span!("Execute", instance = %request.instance_name);
        Ok(Response::new(
            self.execute_inner(request).instrument(span).await?,
        ))
    }

    async fn wait_execution(
        &self,
        request: Request<WaitExecutionRequest>,
    ) -> Result<Response<OpStream>, Status> {
        crate::auth::check(&request, crate::auth::paths::WAIT_EXECUTION, None)?;
        let name = request.get_ref().name.clone();
        let rx = self.core.watch_anywhere(&name).await.ok_or_else(|| {
            Status::not_found(format!(
                "no operation named {name:?} (finished long ago, from before a restart, or of a server that is gone)"
            ))
        })?;
        // Operation names carry no instance: the check follows the lookup.
        let instance = rx.borrow().instance.clone();
        crate::auth::check(
            &request,
            crate::auth::paths::WAIT_EXECUTION,
            Some(&instance),
        )?;
        Ok(Response::new(stream(rx)))
    }
}
