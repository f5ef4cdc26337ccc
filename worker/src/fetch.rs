//! Getting an action's inputs into the local CAS: the input tree's Directory messages, then
//! every file blob not already local, downloaded in parallel (small ones in batches), each
//! verified before it is committed. A file a peer is hinted to hold is asked of that peer
//! first, raced against the server ([`crate::peers`]). Everything the action uses is pinned
//! until it finishes.

use crate::error::ActionError;
use crate::local::LocalCas;
use crate::peers::race::{race, Winner};
use crate::peers::{Hints, PeerAddr, PeerRequest, Peers, TransferStats};
use crate::remote::SMALL;
use bytes::Bytes;
use futures::stream::{self, StreamExt};
use kiln_dataplane::store::tier::PinHolder;
use kiln_proto::reapi::Directory;
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use kiln_reapi::walk::{self, WalkLimits};
use std::collections::HashMap;
use std::sync::Arc;

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
    /// Download from another CAS (the server's), and from peers where hinted.
    Remote(Remote<'a>),
}

/// The server's CAS, and the peers hinted to hold some of an action's inputs.
pub struct Remote<'a> {
    /// The server's CAS.
    pub server: &'a dyn Cas,
    /// The worker's peers and this action's hints, when it has any.
    pub peers: Option<(&'a Peers, &'a Hints)>,
    /// Where fetched bytes are counted.
    pub stats: &'a TransferStats,
    /// Input files the scheduler knows this worker lacks: fetched while the tree is read.
    pub missing: &'a [Digest],
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
    // Files the scheduler knows are missing are fetched while the tree is read; the walk's
    // own list then finds them here (or fetches what this could not).
    let early = async {
        let Source::Remote(remote) = source else {
            return;
        };
        if remote.missing.is_empty() {
            return;
        }
        if let Err(e) = prefetch(local, remote, instance, remote.missing, parallelism).await {
            tracing::debug!(error = %e, "fetching the inputs known missing failed; the walk's fetch follows");
        }
    };
    let (walked, ()) =
        futures::future::join(fetch_directories(local, source, instance, root), early).await;
    let (directories, files) = walked?;
    let files: Vec<Digest> = files.into_iter().filter(|d| !d.is_empty_blob()).collect();
    let (missing, mut pins) = local.pin(holder, instance, &files).await?;
    if !missing.is_empty() {
        let Source::Remote(remote) = source else {
            local.unpin(holder, &pins).await;
            return Err(ActionError::MissingInputs(missing));
        };
        if let Err(e) = download(local, remote, instance, &missing, parallelism).await {
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
    let got = remote.server.read_blobs(instance, &absent).await?;
    let bytes = got.iter().flatten().map(|b| b.len() as u64).sum();
    remote.stats.fetched(Winner::Server, bytes);
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

/// Fetches ahead the input files `digests` the local CAS lacks (a waiting action's, before
/// it is started here), from hinted peers and the server; nothing is pinned, so what is
/// evicted before the action starts is fetched again then. Returns how many were fetched.
pub async fn prefetch(
    local: &LocalCas,
    remote: &Remote<'_>,
    instance: &InstanceName,
    digests: &[Digest],
    parallelism: usize,
) -> Result<usize, ActionError> {
    let digests: Vec<Digest> = digests
        .iter()
        .filter(|d| !d.is_empty_blob())
        .copied()
        .collect();
    let missing = local.cas().find_missing(instance, &digests).await?;
    match download(local, remote, instance, &missing, parallelism).await {
        Ok(()) | Err(ActionError::MissingInputs(_)) => Ok(missing.len()),
        Err(e) => Err(e),
    }
}

/// Blobs per batch read, and bytes (so that the batches in flight at once stay small).
const BATCH_BLOBS: usize = 256;
const BATCH_BYTES: u64 = 4 << 20;

/// One piece of a download: small blobs in one batch read, or one large blob streamed to a
/// file; from the peer hinted to hold them, if any.
enum Piece {
    Batch(Option<Arc<PeerAddr>>, Vec<Digest>),
    Large(Option<Arc<PeerAddr>>, Digest),
}

/// Downloads blobs into the local CAS, `parallelism` pieces at once.
async fn download(
    local: &LocalCas,
    remote: &Remote<'_>,
    instance: &InstanceName,
    missing: &[Digest],
    parallelism: usize,
) -> Result<(), ActionError> {
    let mut by_peer: HashMap<Option<Arc<PeerAddr>>, Vec<Digest>> = HashMap::new();
    for d in missing {
        let peer = remote.peers.and_then(|(_, hints)| hints.peer(d).cloned());
        by_peer.entry(peer).or_default().push(*d);
    }
    let mut pieces = Vec::new();
    for (peer, digests) in by_peer {
        let (small, large): (Vec<Digest>, Vec<Digest>) =
            digests.into_iter().partition(|d| d.size <= SMALL);
        for batch in batches(&small) {
            pieces.push(Piece::Batch(peer.clone(), batch.to_vec()));
        }
        pieces.extend(large.into_iter().map(|d| Piece::Large(peer.clone(), d)));
    }
    let results: Vec<Result<Vec<Digest>, ActionError>> = stream::iter(pieces)
        .map(|piece| async move {
            match piece {
                Piece::Batch(peer, batch) => {
                    download_batch(local, remote, instance, peer, &batch, parallelism).await
                }
                Piece::Large(peer, d) => download_large(local, remote, instance, peer, d).await,
            }
        })
        .buffer_unordered(parallelism.max(1))
        .collect()
        .await;
    let mut not_found = Vec::new();
    for r in results {
        not_found.extend(r?);
    }
    if !not_found.is_empty() {
        return Err(ActionError::MissingInputs(not_found));
    }
    Ok(())
}

/// `digests` in runs of at most [`BATCH_BLOBS`] blobs and (past the first) [`BATCH_BYTES`].
fn batches(digests: &[Digest]) -> Vec<&[Digest]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, d) in digests.iter().enumerate() {
        if i > start && (i - start >= BATCH_BLOBS || bytes.saturating_add(d.size) > BATCH_BYTES) {
            out.push(&digests[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(d.size);
    }
    if start < digests.len() {
        out.push(&digests[start..]);
    }
    out
}

/// A request for `bytes` to `peer`, when hinted and usable.
fn peer_request<'a>(
    remote: &Remote<'a>,
    peer: Option<Arc<PeerAddr>>,
    bytes: u64,
) -> Option<(&'a Peers, Arc<PeerAddr>, PeerRequest)> {
    let (peers, _) = remote.peers?;
    let endpoint = peer?;
    let request = peers.ask(&endpoint, bytes)?;
    Some((peers, endpoint, request))
}

/// One batch of small blobs, stored locally; returns those neither source has.
async fn download_batch(
    local: &LocalCas,
    remote: &Remote<'_>,
    instance: &InstanceName,
    peer: Option<Arc<PeerAddr>>,
    batch: &[Digest],
    parallelism: usize,
) -> Result<Vec<Digest>, ActionError> {
    let server = |digests: Vec<Digest>| async move {
        let got = remote.server.read_blobs(instance, &digests).await?;
        Ok::<_, kiln_reapi::cas::CasError>(digests.into_iter().zip(got).collect::<Vec<_>>())
    };
    let bytes = batch.iter().fold(0u64, |sum, d| sum.saturating_add(d.size));
    let got: Vec<(Digest, Option<Bytes>)> = match peer_request(remote, peer, bytes) {
        None => {
            let got = server(batch.to_vec()).await?;
            count(remote.stats, Winner::Server, &got);
            got
        }
        Some((peers, endpoint, request)) => {
            let asked = async {
                let got = request.cas.read_blobs(instance, batch).await?;
                // Nothing at all: the hint was stale, go to the server at once.
                Ok(got
                    .iter()
                    .any(Option::is_some)
                    .then(|| batch.iter().copied().zip(got).collect::<Vec<_>>()))
            };
            let raced = race(asked, || request.delay(), || server(batch.to_vec())).await;
            peers.outcome(&endpoint, &request, &raced);
            let mut got = raced.result?;
            let bytes = count(remote.stats, raced.winner, &got);
            if raced.winner == Winner::Peer && request.quic.is_some() {
                remote.stats.over_quic(bytes);
            }
            if raced.winner == Winner::Peer {
                // What the peer lacked comes from the server.
                let lacking: Vec<Digest> = got
                    .iter()
                    .filter(|(_, b)| b.is_none())
                    .map(|(d, _)| *d)
                    .collect();
                if !lacking.is_empty() {
                    got.retain(|(_, b)| b.is_some());
                    let more = server(lacking).await?;
                    count(remote.stats, Winner::Server, &more);
                    got.extend(more);
                }
            }
            got
        }
    };
    let mut not_found = Vec::new();
    let present: Vec<(Digest, Bytes)> = got
        .into_iter()
        .filter_map(|(d, b)| {
            if b.is_none() {
                not_found.push(d);
            }
            Some((d, b?))
        })
        .collect();
    stream::iter(present)
        .map(|(d, bytes)| local.put_bytes(instance, d, bytes))
        .buffer_unordered(parallelism.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<(), _>>()?;
    Ok(not_found)
}

/// Counts the bytes of the blobs in `got` as fetched from `source`; returns them.
fn count(stats: &TransferStats, source: Winner, got: &[(Digest, Option<Bytes>)]) -> u64 {
    let bytes = got
        .iter()
        .flat_map(|(_, b)| b)
        .map(|b| b.len() as u64)
        .sum();
    stats.fetched(source, bytes);
    bytes
}

/// One large blob, streamed to a file and committed; returns it if neither source has it.
async fn download_large(
    local: &LocalCas,
    remote: &Remote<'_>,
    instance: &InstanceName,
    peer: Option<Arc<PeerAddr>>,
    d: Digest,
) -> Result<Vec<Digest>, ActionError> {
    let epoch = local.sync_epoch();
    let server = || async {
        let temp = local.temp_path();
        let found = remote.server.read_to_file(instance, d, &temp).await?;
        Ok::<_, kiln_reapi::cas::CasError>(found.then_some(temp))
    };
    let (file, winner, quic) = match peer_request(remote, peer, d.size) {
        None => (server().await?, Winner::Server, false),
        Some((peers, endpoint, request)) => {
            let asked = async {
                let temp = local.temp_path();
                let found = request.cas.read_to_file(instance, d, &temp).await?;
                Ok(found.then_some(Some(temp)))
            };
            let raced = race(asked, || request.delay(), server).await;
            peers.outcome(&endpoint, &request, &raced);
            (raced.result?, raced.winner, request.quic.is_some())
        }
    };
    let Some(file) = file else {
        return Ok(vec![d]);
    };
    remote.stats.fetched(winner, d.size);
    if winner == Winner::Peer && quic {
        remote.stats.over_quic(d.size);
    }
    local.commit_download(instance, d, file, epoch).await?;
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::DigestFunction;

    #[test]
    fn batches_are_bounded_by_count_and_bytes() {
        let blob = |size| Digest {
            size,
            ..Digest::of(DigestFunction::Sha256, b"")
        };
        let many: Vec<Digest> = (0..600).map(|_| blob(1)).collect();
        let sizes: Vec<usize> = batches(&many).iter().map(|b| b.len()).collect();
        assert_eq!(sizes, vec![256, 256, 88]);
        let big: Vec<Digest> = (0..40).map(|_| blob(200 << 10)).collect();
        let runs = batches(&big);
        assert!(runs
            .iter()
            .all(|b| b.iter().map(|d| d.size).sum::<u64>() <= BATCH_BYTES));
        assert_eq!(runs.iter().map(|b| b.len()).sum::<usize>(), 40);
        assert!(batches(&[]).is_empty());
    }
}
