//! Messages to an owner shard and their answers. Any core (and the control plane) sends them
//! through [`super::CasClient`]; replies come back on oneshot channels, blob bytes as `Bytes`.

use super::accounting::Staged;
use super::index::Entry;
use super::parked::ParkedUpload;
use super::snapshot::DirKey;
use super::StoreError;
use futures::channel::oneshot;
use kiln_reapi::digest::BlobKey;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Where a reply goes.
pub(crate) type Reply<T> = oneshot::Sender<T>;

/// Where the filesystem tier holds a blob.
#[derive(Debug, Clone)]
pub struct Located {
    /// The committed blob file.
    pub path: PathBuf,
    /// Whether this process has hashed it (false for files found on disk at start-up).
    pub verified: bool,
}

/// Outcome of committing an upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// The blob is now stored.
    Stored,
    /// It was already stored; the upload's temp file was discarded.
    AlreadyPresent,
}

/// What a new `Write` stream should do.
#[derive(Debug)]
pub enum UploadClaim {
    /// The blob is already stored: answer at once with its full size.
    Present,
    /// Start from zero, holding this much of the cap for the temp file.
    Fresh(Staged),
    /// Uploads in progress already hold so much of the cap that this one cannot fit.
    Full {
        /// Bytes held by uploads in progress or parked.
        staging: u64,
        /// The CAS's cap.
        cap: u64,
    },
    /// Continue a parked upload.
    Resume(ParkedUpload),
    /// Another stream is writing this upload now.
    Busy,
}

/// Status of an upload for `QueryWriteStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadStatus {
    /// The blob is stored.
    Complete,
    /// This many bytes were received.
    Partial(u64),
    /// No such upload.
    Unknown,
}

/// Counters of one shard.
#[derive(Debug, Clone, Default)]
pub struct ShardStats {
    /// Blobs indexed.
    pub blobs: u64,
    /// Bytes of indexed blobs.
    pub bytes: u64,
    /// Uploads being written now.
    pub active_uploads: u64,
    /// Interrupted uploads kept for resumption.
    pub parked_uploads: u64,
    /// Access times waiting to be written to their files (bounded per shard).
    pub pending_atimes: u64,
    /// Directories whose listing the background index rebuild has yet to deliver.
    pub pending_dirs: u64,
}

/// A request to an owner shard.
pub(crate) enum Command {
    FindMissing {
        keys: Vec<BlobKey>,
        reply: Reply<Vec<bool>>,
    },
    Lookup {
        key: BlobKey,
        reply: Reply<Option<Located>>,
    },
    /// Blobs served by a tier above: they count as used now.
    Touch {
        keys: Vec<BlobKey>,
    },
    Commit {
        key: BlobKey,
        temp: PathBuf,
        /// [`super::accounting::Accounting::sync_failures`] before the temp file was written.
        epoch: u64,
        reply: Reply<Result<Committed, StoreError>>,
    },
    Verified {
        key: BlobKey,
    },
    /// A stored blob that must leave the index.
    Drop {
        key: BlobKey,
        why: Dropped,
    },
    ClaimUpload {
        upload_key: String,
        key: BlobKey,
        progress: Arc<AtomicU64>,
        /// Whether a blob the index holds is answered as present (not for blobs the chain
        /// keeps in another store, such as a small-blob log: a file of one left from before
        /// is not what the chain serves).
        check_index: bool,
        /// Whether the upload takes room against the files' cap (a temp file); one held in
        /// memory for a small-blob log does not.
        stage: bool,
        reply: Reply<UploadClaim>,
    },
    ReleaseUpload {
        upload_key: String,
        park: Option<ParkedUpload>,
    },
    QueryUpload {
        upload_key: String,
        key: BlobKey,
        /// As for [`Command::ClaimUpload`].
        check_index: bool,
        reply: Reply<UploadStatus>,
    },
    Evict {
        bytes: u64,
    },
    Pin {
        holder: crate::store::tier::PinHolder,
        keys: Vec<BlobKey>,
        /// Per key: `None` absent; `Some(verified)` pinned, and whether this process has
        /// hashed its file.
        reply: Reply<Vec<Option<bool>>>,
    },
    Unpin {
        holder: crate::store::tier::PinHolder,
        keys: Vec<BlobKey>,
    },
    Stats {
        reply: Reply<ShardStats>,
    },
    /// The blobs the shard holds, at most `max`.
    Keys {
        max: usize,
        reply: Reply<Vec<BlobKey>>,
    },
    /// Directories' listings from the background rebuild: this shard's blobs in them,
    /// oldest first.
    Listed {
        dirs: Vec<DirKey>,
        entries: Vec<(BlobKey, Entry)>,
        /// Files of this shard's blobs cut short by a crash.
        damaged: Vec<BlobKey>,
    },
}

/// Why a stored blob leaves the index other than by eviction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Its bytes do not hash to its digest (counted in `kiln_cas_corrupt_blobs_total`).
    Corrupt,
    /// Its file is gone (removed behind the server's back).
    Vanished,
}
