//! The filesystem tier: blob files under the CAS's directory, each part of the digest space
//! kept by its owner shard (index, verified commit, eviction, access times; see
//! [`crate::store::owner`]) and reached through the shard router, [`CasClient`]. Every chain
//! ends here: it is the store that survives a restart.

use super::{Blob, BlobStore, BlobWatcher, PinHolder, StoreFuture, Verdict, VerifiedUpload};
use crate::store::{CasClient, Committed, StoreError};
use bytes::Bytes;
use futures::future::BoxFuture;
use kiln_reapi::digest::BlobKey;
use std::sync::Arc;

/// The filesystem tier, reached from one core (or the control plane) through `cas`.
pub struct Filesystem {
    cas: CasClient,
    reporter: Arc<Reporter>,
}

impl Filesystem {
    /// The tier behind the router `cas`.
    pub fn new(cas: CasClient) -> Filesystem {
        Filesystem {
            reporter: Arc::new(Reporter(cas.clone())),
            cas,
        }
    }
}

/// Tells the owner what the first read of an unchecked file found: a good file is not hashed
/// again; a damaged or vanished one leaves the index.
struct Reporter(CasClient);

impl BlobWatcher for Reporter {
    fn checked(&self, key: &BlobKey, verdict: Verdict) {
        match verdict {
            Verdict::Good => self.0.report_verified(key),
            Verdict::Corrupt => self.0.report_corrupt(key),
            Verdict::Vanished => self.0.report_vanished(key),
        }
    }
}

impl BlobStore for Filesystem {
    fn contains<'a>(&'a self, keys: &'a [BlobKey]) -> StoreFuture<'a, Vec<bool>> {
        Box::pin(self.cas.contains(keys))
    }

    fn open<'a>(&'a self, key: &'a BlobKey) -> StoreFuture<'a, Option<Blob>> {
        Box::pin(async move {
            if key.digest.is_empty_blob() {
                return Ok(Some(Blob::bytes(key.clone(), Bytes::new())));
            }
            // Watched even when verified: a file found gone must leave the index too.
            Ok(self.cas.locate(key).await?.map(|at| {
                Blob::file(key.clone(), at.path, at.verified).watched(self.reporter.clone())
            }))
        })
    }

    fn put<'a>(&'a self, key: &'a BlobKey, upload: VerifiedUpload) -> StoreFuture<'a, Committed> {
        Box::pin(async move {
            // Writers ask `keeps_files` first: an upload for this tier comes as a file.
            let Some(temp) = upload.temp else {
                let why = std::io::Error::other("an upload for the filesystem tier has no file");
                return Err(StoreError::io("store", std::path::PathBuf::new(), why));
            };
            self.cas.commit(key, temp, upload.epoch).await
        })
    }

    fn pin<'a>(
        &'a self,
        holder: PinHolder,
        keys: &'a [BlobKey],
    ) -> StoreFuture<'a, Vec<Option<bool>>> {
        Box::pin(self.cas.pin(holder, keys))
    }

    fn unpin<'a>(&'a self, holder: PinHolder, keys: &'a [BlobKey]) -> BoxFuture<'a, ()> {
        Box::pin(self.cas.unpin(holder, keys))
    }

    fn touched(&self, keys: &[BlobKey]) {
        self.cas.touch(keys);
    }
}
