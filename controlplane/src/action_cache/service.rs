//! `GetActionResult` and `UpdateActionResult`.

use super::ActionCache;
use crate::error::ControlError;
use crate::metrics::ControlMetrics;
use kiln_dataplane::service::ReadyResults;
use kiln_proto::reapi::action_cache_server::ActionCache as ActionCacheApi;
use kiln_proto::reapi::{self, ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{debug_span, Instrument};

/// `GetActionResult` hits the data plane serves itself ([`ReadyResults`]), counted with the
/// control plane's.
pub struct DataPlaneHits {
    /// The cache.
    pub cache: Arc<ActionCache>,
    /// Where hits are counted.
    pub metrics: Arc<ControlMetrics>,
}

impl ReadyResults for DataPlaneHits {
    fn ready(&self, key: &BlobKey) -> Option<bytes::Bytes> {
        let data = self.cache.ready(key)?;
        self.metrics.ac("get", "hit");
        self.metrics.action_cache_data_plane_hits.inc();
        Some(data)
    }
}

/// The ActionCache service.
pub struct ActionCacheService {
    metrics: Arc<ControlMetrics>,
    cache: Arc<ActionCache>,
}

impl ActionCacheService {
    /// Serves `cache`, counting outcomes in `metrics`.
    pub fn new(cache: Arc<ActionCache>, metrics: Arc<ControlMetrics>) -> ActionCacheService {
        ActionCacheService { metrics, cache }
    }

    async fn get(&self, request: GetActionResultRequest) -> Result<ActionResult, ControlError> {
        let instance = InstanceName::new(&request.instance_name)?;
        let digest =
            Digest::from_proto_field(request.action_digest.as_ref(), request.digest_function)?;
        self.cache.get(&BlobKey::new(instance, digest)).await
    }

    async fn update(
        &self,
        request: UpdateActionResultRequest,
    ) -> Result<ActionResult, ControlError> {
        let instance = InstanceName::new(&request.instance_name)?;
        let digest =
            Digest::from_proto_field(request.action_digest.as_ref(), request.digest_function)?;
        let result = request
            .action_result
            .ok_or(ControlError::MissingField("action_result"))?;
        validate_digests(&result, request.digest_function)?;
        self.cache
            .put(BlobKey::new(instance, digest), &result)
            .await?;
        Ok(result)
    }
}

/// Refuses results whose digests could never be resolved (they would only ever be misses).
fn validate_digests(result: &ActionResult, function: i32) -> Result<(), ControlError> {
    let check = |field: String, d: Option<&reapi::Digest>| match d {
        None => Ok(()),
        Some(d) => Digest::from_proto(d, function)
            .map(|_| ())
            .map_err(|source| ControlError::FieldDigest { field, source }),
    };
    for (i, f) in result.output_files.iter().enumerate() {
        check(format!("output_files[{i}].digest"), f.digest.as_ref())?;
    }
    for (i, d) in result.output_directories.iter().enumerate() {
        check(
            format!("output_directories[{i}].tree_digest"),
            d.tree_digest.as_ref(),
        )?;
        check(
            format!("output_directories[{i}].root_directory_digest"),
            d.root_directory_digest.as_ref(),
        )?;
    }
    check("stdout_digest".into(), result.stdout_digest.as_ref())?;
    check("stderr_digest".into(), result.stderr_digest.as_ref())
}

#[tonic::async_trait]
impl ActionCacheApi for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let instance = request.get_ref().instance_name.clone();
        crate::auth::check(
            &request,
            crate::auth::paths::GET_ACTION_RESULT,
            Some(&instance),
        )?;
        let request = request.into_inner();
        let span = debug_span!("GetActionResult", instance = %request.instance_name);
        let result = self.get(request).instrument(span).await;
        self.metrics.ac(
            "get",
            match &result {
                Ok(_) => "hit",
                Err(ControlError::Incomplete(_)) => "incomplete",
                Err(ControlError::NotFound(_)) => "miss",
                Err(_) => "error",
            },
        );
        Ok(Response::new(result?))
    }

    async fn update_action_result(
        &self,
        request: Request<UpdateActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
        let instance = request.get_ref().instance_name.clone();
        crate::auth::check(
            &request,
            crate::auth::paths::UPDATE_ACTION_RESULT,
            Some(&instance),
        )?;
        let request = request.into_inner();
        let span = debug_span!("UpdateActionResult", instance = %request.instance_name);
        let result = self.update(request).instrument(span).await;
        self.metrics
            .ac("update", if result.is_ok() { "ok" } else { "error" });
        Ok(Response::new(result?))
    }
}
