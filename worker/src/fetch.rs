//! Getting an action's inputs into the local CAS: the input tree's Directory messages, then
//! every file blob not already local, downloaded in parallel (small ones in batches), each
//! verified before it is committed. Everything the action uses is pinned until it finishes.

use crate::error::ActionError;
use crate::local::LocalCas;
use crate::remote::SMALL;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use kiln_dataplane::store::tier::PinHolder;
use kiln_proto::reapi::Directory;
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use kiln_reapi::walk::{self, WalkLimits};
use std::collections::HashMap;

/// An input tree: every directory by digest, from the root down.
pub struct InputTree {
    /// The root directory's digest.
    pub root: Digest,
    /// Every directory in the tree.
    pub directories: HashMap<Digest, Directory>,
}

/// Where missing inputs come from.
pub enum Source<'a> {
    /// The local CAS is the server's: a blob missing there is missing.
    Shared,
    /// Download from another CAS (the server's).
    Remote(&'a dyn Cas),
}

/// Fetches the tree under `root` and its files, pinned for `holder`; returns the tree and
/// the pins to release.
pub async fn fetch(
    local: &LocalCas,
    holder: PinHolder,
    source: &Source<'_>,
    instance: &InstanceName,
    root: Digest,
    parallelism: usize,
) -> Result<(InputTree, Vec<BlobKey>), ActionError> {
    let (directories, files) = fetch_directories(local, source, instance, root).await?;
    let files: Vec<Digest> = files.into_iter().filter(|d| !d.is_empty_blob()).collect();
    let (missing, mut pins) = local.pin(holder, instance, &files).await?;
    if !missing.is_empty() {
        let Source::Remote(remote) = source else {
            local.unpin(holder, &pins).await;
            return Err(ActionError::MissingInputs(missing));
        };
        if let Err(e) = download(local, *remote, instance, &missing, parallelism).await {
            local.unpin(holder, &pins).await;
            return Err(e);
        }
        let (still, more) = match local.pin(holder, instance, &missing).await {
            Ok(pinned) => pinned,
            Err(e) => {
                local.unpin(holder, &pins).await;
                return Err(e);
            }
        };
        pins.extend(more);
        if !still.is_empty() {
            local.unpin(holder, &pins).await;
            return Err(ActionError::MissingInputs(still));
        }
    }
    Ok((InputTree { root, directories }, pins))
}

/// Every Directory of the tree under `root` (read locally, else from the server and kept
/// locally) and every distinct file digest in it, walked with `kiln_reapi::walk` (directory
/// size and batch bounds as on the server; no count bound, the server's already applied).
async fn fetch_directories(
    local: &LocalCas,
    source: &Source<'_>,
    instance: &InstanceName,
    root: Digest,
) -> Result<(HashMap<Digest, Directory>, Vec<Digest>), ActionError> {
    let mut directories = HashMap::new();
    let walked = walk::walk(
        root,
        // The server checked the tree against its own execution.max_input_digests before it
        // sent the action; the worker must not refuse what it accepted.
        WalkLimits {
            max_digests: usize::MAX,
            ..WalkLimits::default()
        },
        |batch| read_directories(local, source, instance, batch),
        |digest, _, dir| {
            directories.insert(digest, dir);
            Ok(())
        },
    )
    .await?;
    if !walked.missing.is_empty() {
        return Err(ActionError::MissingInputs(walked.missing));
    }
    Ok((directories, walked.files))
}

/// One batch of Directory blobs, in order: from the local CAS, else from the server (and
/// then kept locally); `None` for those neither has.
async fn read_directories(
    local: &LocalCas,
    source: &Source<'_>,
    instance: &InstanceName,
    batch: Vec<Digest>,
) -> Result<Vec<Option<Bytes>>, ActionError> {
    let mut out = local.cas().read_blobs(instance, &batch).await?;
    let absent: Vec<Digest> = batch
        .iter()
        .zip(&out)
        .filter(|(_, found)| found.is_none())
        .map(|(d, _)| *d)
        .collect();
    let Source::Remote(remote) = source else {
        return Ok(out);
    };
    if absent.is_empty() {
        return Ok(out);
    }
    let got = remote.read_blobs(instance, &absent).await?;
    let mut got: HashMap<Digest, Bytes> = absent
        .into_iter()
        .zip(got)
        .filter_map(|(d, found)| Some((d, found?)))
        .collect();
    for (d, slot) in batch.iter().zip(out.iter_mut()) {
        if slot.is_none() {
            if let Some(bytes) = got.remove(d) {
                local.put_bytes(instance, *d, bytes.clone()).await?;
                *slot = Some(bytes);
            }
        }
    }
    Ok(out)
}

/// Downloads blobs into the local CAS: small ones in batches, large ones streamed to files.
async fn download(
    local: &LocalCas,
    remote: &dyn Cas,
    instance: &InstanceName,
    missing: &[Digest],
    parallelism: usize,
) -> Result<(), ActionError> {
    let (small, large): (Vec<Digest>, Vec<Digest>) = missing.iter().partition(|d| d.size <= SMALL);
    let mut not_found = Vec::new();
    for batch in small.chunks(256) {
        let got = remote.read_blobs(instance, batch).await?;
        let mut present = Vec::with_capacity(batch.len());
        for (d, found) in batch.iter().zip(got) {
            match found {
                Some(bytes) => present.push((*d, bytes)),
                None => not_found.push(*d),
            }
        }
        stream::iter(present)
            .map(|(d, bytes)| local.put_bytes(instance, d, bytes))
            .buffer_unordered(parallelism.max(1))
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<(), _>>()?;
    }
    let results: Vec<Result<Option<Digest>, ActionError>> = stream::iter(large)
        .map(|d| async move {
            let temp = local.temp_path();
            let epoch = local.sync_epoch();
            if !remote.read_to_file(instance, d, &temp).await? {
                return Ok(Some(d));
            }
            local.commit_download(instance, d, temp, epoch).await?;
            Ok(None)
        })
        .buffer_unordered(parallelism.max(1))
        .collect()
        .await;
    for r in results {
        not_found.extend(r?);
    }
    if !not_found.is_empty() {
        return Err(ActionError::MissingInputs(not_found));
    }
    Ok(())
}
