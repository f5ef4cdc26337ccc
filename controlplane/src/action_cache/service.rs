//! `GetActionResult` and `UpdateActionResult`.

use super::completeness::{self, CheckLimits, Incomplete};
use super::AcStore;
use crate::error::ControlError;
use crate::metrics::ControlMetrics;
use kiln_dataplane::digest::{BlobKey, Digest, InstanceName};
use kiln_dataplane::store::CasClient;
use kiln_proto::reapi::action_cache_server::ActionCache;
use kiln_proto::reapi::{self, ActionResult, GetActionResultRequest, UpdateActionResultRequest};
use prost::Message;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use tracing::{debug, debug_span, Instrument};

/// The ActionCache service.
pub struct ActionCacheService {
    metrics: Arc<ControlMetrics>,
    store: AcStore,
    cas: CasClient,
    completeness: bool,
    limits: CheckLimits,
}

impl ActionCacheService {
    /// Serves `store`, checking completeness against `cas` when `completeness` is set.
    pub fn new(
        store: AcStore,
        cas: CasClient,
        completeness: bool,
        limits: CheckLimits,
        metrics: Arc<ControlMetrics>,
    ) -> ActionCacheService {
        ActionCacheService {
            metrics,
            store,
            cas,
            completeness,
            limits,
        }
    }

    async fn get(&self, request: GetActionResultRequest) -> Result<ActionResult, ControlError> {
        let instance = InstanceName::new(&request.instance_name)?;
        let digest =
            Digest::from_proto_field(request.action_digest.as_ref(), request.digest_function)?;
        let key = BlobKey::new(instance, digest);
        let miss = || ControlError::NotFound(format!("no action result for {digest:?}"));
        let Some(data) = self.store.get(&key).await? else {
            return Err(miss());
        };
        let Ok(result) = ActionResult::decode(data) else {
            tracing::warn!(action = ?digest, "stored action result does not decode; dropping it");
            self.store.remove(&key);
            return Err(miss());
        };
        if self.completeness {
            match completeness::check(
                &self.cas,
                &key.instance,
                digest.function,
                &result,
                self.limits,
            )
            .await?
            {
                None => {}
                Some(Incomplete::Missing(blobs)) => {
                    debug!(action = ?digest, missing = blobs.len(), "action result incomplete; reporting a miss");
                    return Err(ControlError::Incomplete(format!(
                        "action result for {digest:?} references {} blob(s) no longer in the CAS, e.g. {:?}",
                        blobs.len(),
                        blobs[0]
                    )));
                }
                Some(Incomplete::Malformed(why)) => {
                    tracing::warn!(action = ?digest, why, "action result references malformed data; dropping it");
                    self.store.remove(&key);
                    return Err(miss());
                }
            }
        }
        Ok(result)
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
        let data = result.encode_to_vec();
        self.store
            .put(BlobKey::new(instance, digest), data.into())
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
impl ActionCache for ActionCacheService {
    async fn get_action_result(
        &self,
        request: Request<GetActionResultRequest>,
    ) -> Result<Response<ActionResult>, Status> {
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
        let request = request.into_inner();
        let span = debug_span!("UpdateActionResult", instance = %request.instance_name);
        let result = self.update(request).instrument(span).await;
        self.metrics
            .ac("update", if result.is_ok() { "ok" } else { "error" });
        Ok(Response::new(result?))
    }
}
