//! The action cache proper: results stored durably ([`AcStore`]), and in Redis too where it is
//! shared ([`SharedResults`]), served only when complete. Used by the ActionCache service and
//! by Execute's cache lookup.

use super::completeness::{self, CheckLimits, Incomplete};
use super::shared::SharedResults;
use super::store::Stored;
use super::AcStore;
use crate::error::ControlError;
use kiln_dataplane::store::atime;
use kiln_dataplane::store::CasClient;
use kiln_proto::reapi::ActionResult;
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::BlobKey;
use prost::Message;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tracing::debug;

/// Stored action results, completeness-checked against the CAS.
pub struct ActionCache {
    store: AcStore,
    /// The tier behind `store` that the farm's servers share (`[redis] action_cache`).
    shared: Option<SharedResults>,
    /// The CAS's accounting (its count of removals).
    cas: CasClient,
    /// The CAS, for completeness checks.
    blobs: Arc<dyn Cas>,
    completeness: bool,
    limits: CheckLimits,
}

impl ActionCache {
    /// A cache over `store`, checking completeness against the CAS (`blobs`; `cas` for its
    /// accounting) when `completeness` is set.
    pub fn new(
        store: AcStore,
        cas: CasClient,
        blobs: Arc<dyn Cas>,
        completeness: bool,
        limits: CheckLimits,
    ) -> ActionCache {
        ActionCache {
            store,
            shared: None,
            cas,
            blobs,
            completeness,
            limits,
        }
    }

    /// Checks `result`, stored (or to be stored) for `key`, against the CAS.
    async fn check(
        &self,
        key: &BlobKey,
        result: &ActionResult,
    ) -> Result<Option<Incomplete>, ControlError> {
        completeness::check(
            &*self.blobs,
            &key.instance,
            key.digest.function,
            result,
            self.limits,
        )
        .await
    }

    /// The same, with `shared` (Redis) behind its own store.
    pub fn with_shared(mut self, shared: SharedResults) -> ActionCache {
        self.shared = Some(shared);
        self
    }

    /// The stored result of `key`: from the server's own store, else from the shared tier
    /// (and then kept in the server's own store).
    async fn stored(&self, key: &BlobKey) -> Result<Option<Stored>, ControlError> {
        if let Some(stored) = self.store.get(key).await? {
            return Ok(Some(stored));
        }
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let Some(data) = shared.get(key).await else {
            return Ok(None);
        };
        if ActionResult::decode(data.clone()).is_err() {
            tracing::warn!(action = ?key.digest, "action result in Redis does not decode; dropping it");
            shared.remove(key, &data).await;
            return Ok(None);
        }
        match self.store.put(key.clone(), data.clone()).await {
            Ok(_) => match self.store.get(key).await? {
                Some(stored) => Ok(Some(stored)),
                None => Ok(Some(Stored::detached(data))),
            },
            // Served all the same, not kept here.
            Err(e) => {
                tracing::warn!(action = ?key.digest, error = %e, "cannot keep an action result read from Redis");
                Ok(Some(Stored::detached(data)))
            }
        }
    }

    /// Whether `result` (of action `key`, found elsewhere: another server ran it) is complete
    /// in this server's CAS, so that its outputs can be served from here.
    pub async fn complete_here(&self, key: &BlobKey, result: &ActionResult) -> bool {
        // A result naming more outputs than any walk may check is not believed complete.
        let outputs = result.output_files.len() + result.output_directories.len();
        if outputs > self.limits.max_digests {
            return false;
        }
        let checked = self.check(key, result).await;
        matches!(checked, Ok(None))
    }

    /// The result for an action, if stored and complete (a hit marks its blobs used). A
    /// result found complete is not checked again while no blob has left the CAS since that
    /// check ([`kiln_dataplane::store::accounting::Accounting::removals`]: every blob it
    /// references is then still there) and the check is younger than
    /// [`CheckLimits::recheck_after`] (so a hot result still marks its blobs used that often,
    /// and they keep their place in the LRU).
    pub async fn get(&self, key: &BlobKey) -> Result<ActionResult, ControlError> {
        let digest = key.digest;
        let miss = || ControlError::NotFound(format!("no action result for {digest:?}"));
        let Some(stored) = self.stored(key).await? else {
            return Err(miss());
        };
        let Ok(result) = ActionResult::decode(stored.data.clone()) else {
            tracing::warn!(action = ?digest, "stored action result does not decode; dropping it");
            self.store.remove(key, &stored);
            return Err(miss());
        };
        if !self.completeness {
            // Decoded: later hits may be served without the control plane (see `ready`).
            stored.checked.at.store(atime::now(), Ordering::Release);
            return Ok(result);
        }
        // Read before the check: a removal during the check moves it, so the next hit checks.
        let removals = self.cas.accounting().removals();
        let now = atime::now();
        let mark = &stored.checked;
        if mark.holds(now, removals, self.limits.recheck_after) {
            return Ok(result);
        }
        match self.check(key, &result).await? {
            None => {
                mark.at.store(now, Ordering::Release);
                mark.removals.store(removals, Ordering::Release);
                Ok(result)
            }
            Some(Incomplete::Missing(blobs)) => {
                // Another server may have stored a newer, complete result since.
                if let Some(newer) = self.newer_from_shared(key, &stored.data).await? {
                    return Ok(newer);
                }
                debug!(action = ?digest, missing = blobs.len(), "action result incomplete; reporting a miss");
                Err(ControlError::Incomplete(format!(
                    "action result for {digest:?} references {} blob(s) no longer in the CAS, e.g. {:?}",
                    blobs.len(),
                    blobs[0]
                )))
            }
            Some(Incomplete::Malformed(why) | Incomplete::OverBudget(why)) => {
                // No check here will ever pass it. Servers sharing Redis are meant to share
                // one budget (docs/operations.md), so it leaves Redis too: otherwise each read
                // here would fetch it again and spend the whole budget on it once more.
                tracing::warn!(action = ?digest, why, "action result can never be found complete; dropping it");
                self.store.remove(key, &stored);
                if let Some(shared) = &self.shared {
                    shared.remove(key, &stored.data).await;
                }
                // Another server may have stored a different result since, usable here.
                if let Some(newer) = self.newer_from_shared(key, &stored.data).await? {
                    return Ok(newer);
                }
                Err(miss())
            }
        }
    }

    /// The shared tier's result for `key` when it differs from `have` (the server's own,
    /// found incomplete) and is complete: kept in the server's own store and returned.
    async fn newer_from_shared(
        &self,
        key: &BlobKey,
        have: &bytes::Bytes,
    ) -> Result<Option<ActionResult>, ControlError> {
        let Some(shared) = &self.shared else {
            return Ok(None);
        };
        let Some(data) = shared.get(key).await.filter(|d| d != have) else {
            return Ok(None);
        };
        let Ok(result) = ActionResult::decode(data.clone()) else {
            return Ok(None);
        };
        let check = self.check(key, &result).await?;
        match check {
            None => {}
            Some(Incomplete::Missing(_)) => return Ok(None),
            Some(Incomplete::Malformed(why) | Incomplete::OverBudget(why)) => {
                // No check will ever pass it: it leaves Redis as an own one leaves this store.
                tracing::warn!(action = ?key.digest, why, "shared action result can never be found complete; dropping it from Redis");
                shared.remove(key, &data).await;
                return Ok(None);
            }
        }
        if let Err(e) = self.store.put(key.clone(), data).await {
            tracing::warn!(action = ?key.digest, error = %e, "cannot keep an action result read from Redis");
        }
        Ok(Some(result))
    }

    /// The stored bytes of a result that can be served with no I/O and no check: held in
    /// memory, decoded and (with completeness checking) found complete by a check that still
    /// holds — younger than [`CheckLimits::recheck_after`], with no blob removed from the CAS
    /// since. Marks it used. `None`: serve it with [`ActionCache::get`].
    pub fn ready(&self, key: &BlobKey) -> Option<bytes::Bytes> {
        let stored = self.store.ready(key)?;
        let mark = &stored.checked;
        if mark.at.load(Ordering::Acquire) == 0 {
            // Never decoded by `get`: a result read from its file is checked there first.
            return None;
        }
        let removals = self.cas.accounting().removals();
        if self.completeness && !mark.holds(atime::now(), removals, self.limits.recheck_after) {
            return None;
        }
        Some(stored.data)
    }

    /// Stores the result for an action: in the server's own store, then in the shared tier
    /// (a failure there fails the put, though the server's own store keeps the result).
    /// With completeness checking it is checked first: one no check could ever find
    /// complete is refused ([`ControlError::Uncheckable`], [`ControlError::OverCheckBudget`]);
    /// one found complete is stored as checked, so its first hit needs no check of its own.
    pub async fn put(&self, key: BlobKey, result: &ActionResult) -> Result<(), ControlError> {
        let data: bytes::Bytes = result.encode_to_vec().into();
        // A result too large to keep is refused before it costs a check.
        self.store.fits(data.len())?;
        let checked = self.check_before_storing(&key, result).await?;
        let mark = self.store.put(key.clone(), data.clone()).await?;
        if let Some((at, removals)) = checked {
            mark.removals.store(removals, Ordering::Release);
            mark.at.store(at, Ordering::Release);
        }
        if let Some(shared) = &self.shared {
            shared.put(&key, &data).await?;
        }
        Ok(())
    }

    /// With completeness checking, checks a result about to be stored: refuses one that no
    /// check could find complete (naming a malformed tree, [`ControlError::Uncheckable`]; over
    /// the check's budget, [`ControlError::OverCheckBudget`]: every read would drop it and the
    /// action would run again each build); `Some((when, removals))`
    /// for one found complete. One that names blobs not (yet) in the CAS is stored unchecked,
    /// as is any result when the CAS cannot be asked.
    async fn check_before_storing(
        &self,
        key: &BlobKey,
        result: &ActionResult,
    ) -> Result<Option<(u64, u64)>, ControlError> {
        if !self.completeness {
            return Ok(None);
        }
        // Read before the check, as `get` does.
        let removals = self.cas.accounting().removals();
        let now = atime::now();
        let checked = self.check(key, result).await;
        match checked {
            Ok(None) => Ok(Some((now, removals))),
            Ok(Some(Incomplete::Malformed(why))) => Err(ControlError::Uncheckable(why)),
            Ok(Some(Incomplete::OverBudget(why))) => Err(ControlError::OverCheckBudget(why)),
            Ok(Some(Incomplete::Missing(_))) => Ok(None),
            Err(e) => {
                debug!(action = ?key.digest, error = %e, "cannot check an action result before storing it; stored unchecked");
                Ok(None)
            }
        }
    }
}
