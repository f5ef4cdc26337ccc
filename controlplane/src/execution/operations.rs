//! `google.longrunning.Operations` for execution operations: get, wait, cancel, list (by name
//! prefix and stage, in pages) and delete (of a finished one).

use super::farm::Ask;
use super::ExecutionCore;
use kiln_proto::longrunning::operations_server::Operations;
use kiln_proto::longrunning::{
    CancelOperationRequest, DeleteOperationRequest, GetOperationRequest, ListOperationsRequest,
    ListOperationsResponse, Operation, WaitOperationRequest,
};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use tracing::Instrument;

/// The Operations service.
pub struct OperationsService {
    core: Arc<ExecutionCore>,
}

impl OperationsService {
    /// Serves `core`'s operations.
    pub fn new(core: Arc<ExecutionCore>) -> OperationsService {
        OperationsService { core }
    }

    /// The operation named `name`, if the caller of `request` holds the execute role in its
    /// instance (operation names do not carry one, so the check follows the lookup).
    async fn rx<T>(
        &self,
        request: &Request<T>,
        name: &str,
    ) -> Result<tokio::sync::watch::Receiver<super::OpView>, Status> {
        let rx = self
            .core
            .watch_anywhere(name)
            .await
            .ok_or_else(|| Status::not_found(format!("no operation named {name:?}")))?;
        let instance = rx.borrow().instance.clone();
        crate::auth::check(request, crate::auth::paths::OPERATIONS, Some(&instance))?;
        Ok(rx)
    }
}

#[tonic::async_trait]
impl Operations for OperationsService {
    async fn list_operations(
        &self,
        request: Request<ListOperationsRequest>,
    ) -> Result<Response<ListOperationsResponse>, Status> {
        crate::auth::check(&request, crate::auth::paths::OPERATIONS, None)?;
        let query = super::listing::OpQuery::parse(request.get_ref())
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let span = tracing::debug_span!("ListOperations", prefix = %query.prefix);
        // Only operations of instances where the caller may see operations.
        let mut seen: std::collections::HashMap<String, bool> = Default::default();
        let allowed = |instance: &str| {
            *seen.entry(instance.to_string()).or_insert_with(|| {
                crate::auth::check(&request, crate::auth::paths::OPERATIONS, Some(instance)).is_ok()
            })
        };
        let (page, last, unreachable) = self
            .core
            .list_anywhere(&query, allowed)
            .instrument(span)
            .await;
        Ok(Response::new(ListOperationsResponse {
            operations: page.iter().map(|v| v.to_operation()).collect(),
            next_page_token: last
                .map(|l| super::listing::OpQuery::token_after(&l))
                .unwrap_or_default(),
            unreachable,
        }))
    }

    async fn get_operation(
        &self,
        request: Request<GetOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        crate::auth::check(&request, crate::auth::paths::OPERATIONS, None)?;
        let rx = self.rx(&request, &request.get_ref().name).await?;
        let op = rx.borrow().to_operation();
        Ok(Response::new(op))
    }

    async fn delete_operation(
        &self,
        request: Request<DeleteOperationRequest>,
    ) -> Result<Response<()>, Status> {
        crate::auth::check(&request, crate::auth::paths::OPERATIONS, None)?;
        let name = request.get_ref().name.clone();
        // The caller needs the role in the operation's instance: found first.
        self.rx(&request, &name).await?;
        if !self.core.is_local(&name) {
            self.core.ask_owner(&name, Ask::Delete).await?;
            return Ok(Response::new(()));
        }
        match self.core.delete(&name).await {
            Ok(()) => Ok(Response::new(())),
            Err(true) => Err(Status::failed_precondition(format!(
                "operation {name:?} is still running; cancel it (CancelOperation), then delete it once it has finished"
            ))),
            Err(false) => Err(Status::not_found(format!("no operation named {name:?}"))),
        }
    }

    async fn cancel_operation(
        &self,
        request: Request<CancelOperationRequest>,
    ) -> Result<Response<()>, Status> {
        crate::auth::check(&request, crate::auth::paths::OPERATIONS, None)?;
        let name = request.get_ref().name.clone();
        self.rx(&request, &name).await?;
        if !self.core.is_local(&name) {
            self.core.ask_owner(&name, Ask::Cancel).await?;
            return Ok(Response::new(()));
        }
        if self.core.cancel(&name) {
            Ok(Response::new(()))
        } else {
            Err(Status::not_found(format!(
                "no running or queued operation named {name:?}"
            )))
        }
    }

    async fn wait_operation(
        &self,
        request: Request<WaitOperationRequest>,
    ) -> Result<Response<Operation>, Status> {
        crate::auth::check(&request, crate::auth::paths::OPERATIONS, None)?;
        let mut rx = self.rx(&request, &request.get_ref().name).await?;
        let request = request.into_inner();
        let limit = request
            .timeout
            .as_ref()
            .map(kiln_reapi::convert::duration)
            .unwrap_or(Duration::from_secs(60))
            .min(Duration::from_secs(600));
        let _ = tokio::time::timeout(limit, rx.wait_for(|v| v.done())).await;
        let op = rx.borrow().to_operation();
        Ok(Response::new(op))
    }
}
