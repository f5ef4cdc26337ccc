//! One walk of a tree for `GetTree`: every `Directory` under a root, breadth first, each once,
//! read a level at a time through the CAS's batch reads (`kiln_reapi::walk`, the walk every
//! other part of Kiln uses). Directories the CAS lacks are left out with their subtrees, as
//! REAPI says ("the server will return the portion present and omit the rest"). Each
//! directory is kept as the bytes the CAS holds, so a listing's memory is what its bytes say,
//! and pages are sent without encoding anything again.

use super::subtrees::Subtrees;
use super::TreeError;
use bytes::Bytes;
use kiln_reapi::cas::Cas;
use kiln_reapi::digest::{Digest, InstanceName};
use kiln_reapi::walk::{Walk, WalkLimits};

/// Bytes of `Directory` blobs read in one batch.
const BATCH_BYTES: u64 = 4 << 20;
/// The fewest bytes a distinct digest takes in a `Directory` (a node's 64-digit hash): so a
/// tree of `max_bytes` has at most `max_bytes / 64` of them, which bounds the walk's own sets.
const MIN_NODE_BYTES: u64 = 64;
/// What a directory costs beyond its message's bytes while a walk or a listing holds it: its
/// `Bytes` handle, its digest in the listing, and its digest in the walk's set and list. A
/// tree of many small directories held three to five times the bytes it was charged.
pub const PER_DIRECTORY: u64 = 176;

/// A tree's directories in the walk's order.
#[derive(Debug)]
pub struct Listing {
    /// Each directory's `Directory` message, as stored, the root first.
    pub directories: Vec<Bytes>,
    /// Their digests, in the same order (page tokens check them).
    pub digests: Vec<Digest>,
    /// The memory it holds: its messages' bytes and [`PER_DIRECTORY`] for each.
    pub memory: u64,
    /// Whether every directory of the tree was there.
    pub complete: bool,
    /// How many of them came from the kept directories rather than the CAS.
    pub kept: usize,
    /// The share of `GetTree`'s memory budget this listing holds while anything does.
    pub(super) _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Walks the tree under `root`, holding at most `max_bytes` of directories, none larger than
/// `max_message` (a directory is sent whole, in one response message).
pub async fn list(
    cas: &dyn Cas,
    subtrees: &Subtrees,
    instance: &InstanceName,
    root: Digest,
    max_bytes: u64,
    max_message: u64,
) -> Result<Listing, TreeError> {
    let max_directory_bytes = WalkLimits::DEFAULT
        .max_directory_bytes
        .min(max_bytes)
        .min(max_message);
    // Files are checked but not kept: a listing sends directories only.
    let mut walk = Walk::new(
        root,
        WalkLimits {
            max_digests: usize::try_from(max_bytes / MIN_NODE_BYTES + 1).unwrap_or(usize::MAX),
            max_directory_bytes,
            batch_bytes: BATCH_BYTES,
        },
    )
    .without_files();
    let mut listing = Listing {
        directories: Vec::new(),
        digests: Vec::new(),
        memory: 0,
        complete: true,
        kept: 0,
        _budget: None,
    };
    let too_large = || TreeError::TooLarge { root, max_bytes };
    loop {
        let batch = match walk.next_batch() {
            Ok(batch) => batch,
            Err(kiln_reapi::walk::WalkError::DirectoryTooLarge { digest, .. })
                if !cas.find_missing(instance, &[digest]).await?.is_empty() =>
            {
                // Not stored: its claimed size does not matter. A missing root is NOT_FOUND,
                // a missing subdirectory is left out, as for any other.
                if digest == root {
                    return Err(TreeError::RootMissing(root));
                }
                walk.skip_missing();
                listing.complete = false;
                continue;
            }
            Err(kiln_reapi::walk::WalkError::DirectoryTooLarge { digest, .. })
                if digest.size > max_bytes =>
            {
                return Err(too_large())
            }
            Err(e) => return Err(e.into()),
        };
        if batch.is_empty() {
            return Ok(listing);
        }
        // Directories kept from earlier walks; the rest read from the CAS, and kept.
        let mut found: Vec<Option<Bytes>> = batch
            .iter()
            .map(|(d, _)| subtrees.get(instance, *d))
            .collect();
        let unread: Vec<Digest> = batch
            .iter()
            .zip(&found)
            .filter(|(_, kept)| kept.is_none())
            .map(|((d, _), _)| *d)
            .collect();
        listing.kept += batch.len() - unread.len();
        if !unread.is_empty() {
            let mut read = cas.read_blobs(instance, &unread).await?.into_iter();
            for ((digest, _), slot) in batch.iter().zip(found.iter_mut()) {
                if slot.is_none() {
                    *slot = read.next().flatten();
                    if let Some(bytes) = slot {
                        subtrees.insert(instance, *digest, bytes.clone());
                    }
                }
            }
        }
        for ((digest, depth), bytes) in batch.into_iter().zip(found) {
            let Some(bytes) = bytes else {
                if digest == root {
                    return Err(TreeError::RootMissing(root));
                }
                walk.missing(digest);
                listing.complete = false;
                continue;
            };
            listing.memory = listing
                .memory
                .saturating_add(bytes.len() as u64)
                .saturating_add(PER_DIRECTORY);
            if listing.memory > max_bytes {
                return Err(too_large());
            }
            match walk.found(digest, depth, &bytes) {
                Ok(_) => {}
                Err(kiln_reapi::walk::WalkError::TooMany(_)) => return Err(too_large()),
                Err(e) => return Err(e.into()),
            }
            listing.directories.push(bytes);
            listing.digests.push(digest);
        }
    }
}
