//! The caller's role, checked by each control-plane method once it knows the instance. The
//! data plane identified the caller when the call arrived (bearer token or client
//! certificate) and put the [`kiln_auth::Principal`] in the request's extensions; a request
//! without one is refused.

use kiln_reapi::status::Classify;
use std::sync::Arc;
use tonic::{Request, Status};

/// gRPC paths of the control-plane methods, as the permission table names them.
pub mod paths {
    /// Capabilities.GetCapabilities.
    pub const CAPABILITIES: &str = "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities";
    /// ActionCache.GetActionResult.
    pub const GET_ACTION_RESULT: &str =
        "/build.bazel.remote.execution.v2.ActionCache/GetActionResult";
    /// ActionCache.UpdateActionResult.
    pub const UPDATE_ACTION_RESULT: &str =
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult";
    /// Execution.Execute.
    pub const EXECUTE: &str = "/build.bazel.remote.execution.v2.Execution/Execute";
    /// Execution.WaitExecution.
    pub const WAIT_EXECUTION: &str = "/build.bazel.remote.execution.v2.Execution/WaitExecution";
    /// Any google.longrunning.Operations method.
    pub const OPERATIONS: &str = "/google.longrunning.Operations/GetOperation";
    /// ContentAddressableStorage.GetTree.
    pub const GET_TREE: &str = "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree";
    /// Remote Asset Fetch.FetchBlob
    pub const FETCH_BLOB: &str = "/build.bazel.remote.asset.v1.Fetch/FetchBlob";
    /// Remote Asset Fetch.FetchDirectory
    pub const FETCH_DIRECTORY: &str = "/build.bazel.remote.asset.v1.Fetch/FetchDirectory";
    /// Remote Asset Push.PushBlob
    pub const PUSH_BLOB: &str = "/build.bazel.remote.asset.v1.Push/PushBlob";
    /// Remote Asset Push.PushDirectory
    pub const PUSH_DIRECTORY: &str = "/build.bazel.remote.asset.v1.Push/PushDirectory";
    /// CAS.SplitBlob
    pub const SPLIT_BLOB: &str =
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/SplitBlob";
    /// CAS.SpliceBlob
    pub const SPLICE_BLOB: &str =
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/SpliceBlob";
    /// WorkerApi.Session.
    pub const WORKER_SESSION: &str = "/kiln.worker.v1.WorkerApi/Session";
}

/// Whether the caller of `request` may call `path` on `instance` (`None`: a call that names
/// no instance, which needs the role on any instance).
pub fn check<T>(request: &Request<T>, path: &str, instance: Option<&str>) -> Result<(), Status> {
    let Some(principal) = request.extensions().get::<Arc<kiln_auth::Principal>>() else {
        return Err(Status::unauthenticated("the caller was not identified"));
    };
    kiln_auth::policy::authorize(principal, path, instance).map_err(|d| {
        tracing::debug!(caller = %principal.name, %path, "refused: {}", d.message);
        d.status()
    })
}
