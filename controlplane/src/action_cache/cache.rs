//! The action cache proper: results stored durably ([`AcStore`]) and served only when complete.
//! Used by the ActionCache service and by Execute's cache lookup.

use super::completeness::{self, CheckLimits, Incomplete};
use super::AcStore;
use crate::error::ControlError;
use kiln_dataplane::store::CasClient;
use kiln_proto::reapi::ActionResult;
use kiln_reapi::digest::BlobKey;
use prost::Message;
use tracing::debug;

/// Stored action results, completeness-checked against the CAS.
pub struct ActionCache {
    store: AcStore,
    cas: CasClient,
    completeness: bool,
    limits: CheckLimits,
}

impl ActionCache {
    /// A cache over `store`, checking completeness against `cas` when `completeness` is set.
    pub fn new(
        store: AcStore,
        cas: CasClient,
        completeness: bool,
        limits: CheckLimits,
    ) -> ActionCache {
        ActionCache {
            store,
            cas,
            completeness,
            limits,
        }
    }

    /// The result for an action, if stored and complete (a hit marks its blobs used).
    pub async fn get(&self, key: &BlobKey) -> Result<ActionResult, ControlError> {
        let digest = key.digest;
        let miss = || ControlError::NotFound(format!("no action result for {digest:?}"));
        let Some(data) = self.store.get(key).await? else {
            return Err(miss());
        };
        let Ok(result) = ActionResult::decode(data) else {
            tracing::warn!(action = ?digest, "stored action result does not decode; dropping it");
            self.store.remove(key);
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
                    self.store.remove(key);
                    return Err(miss());
                }
            }
        }
        Ok(result)
    }

    /// Stores the result for an action.
    pub async fn put(&self, key: BlobKey, result: &ActionResult) -> Result<(), ControlError> {
        self.store.put(key, result.encode_to_vec().into()).await
    }
}
