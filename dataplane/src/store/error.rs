//! Failures of the store itself (not of the request).

use kiln_reapi::digest::BlobKey;
use kiln_reapi::status::{Classify, ErrorKind};
use std::path::PathBuf;

/// A store operation that could not be carried out.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The owning shard has stopped (shutdown) or its queue is gone.
    #[error("the CAS is shutting down")]
    Unavailable,
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The blob is larger than the whole CAS may hold.
    #[error("blob of {size} bytes is larger than the CAS capacity of {cap} bytes")]
    TooLarge { size: u64, cap: u64 },
    /// Room for a temp file was refused: with what uploads and other temp files already
    /// hold, no eviction could make room (pinned blobs stay).
    #[error("no room in the CAS for {size} bytes now: {staging} bytes are held by uploads and temp files in progress, of a capacity of {cap} bytes; retry later")]
    NoRoom { size: u64, staging: u64, cap: u64 },
    /// A stored blob failed verification and was removed.
    #[error("stored copy of {0:?} was corrupt and has been removed; upload it again")]
    Corrupt(BlobKey),
    /// A stored blob's file was gone when it was read (removed behind the server's back, or
    /// evicted meanwhile).
    #[error("blob {0:?} is no longer stored; upload it again")]
    Vanished(BlobKey),
    /// The tier shared through Redis could not answer (the message names Redis).
    #[error("{0}")]
    Shared(String),
}

impl StoreError {
    /// Wraps an I/O error with what was being done to which path.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> StoreError {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

impl StoreError {
    /// The same failure again, for a second caller (I/O errors cannot be cloned).
    pub fn retell(&self) -> StoreError {
        match self {
            StoreError::Unavailable => StoreError::Unavailable,
            StoreError::Io { op, path, source } => StoreError::io(
                op,
                path.clone(),
                std::io::Error::new(source.kind(), source.to_string()),
            ),
            StoreError::TooLarge { size, cap } => StoreError::TooLarge {
                size: *size,
                cap: *cap,
            },
            StoreError::NoRoom { size, staging, cap } => StoreError::NoRoom {
                size: *size,
                staging: *staging,
                cap: *cap,
            },
            StoreError::Corrupt(key) => StoreError::Corrupt(key.clone()),
            StoreError::Vanished(key) => StoreError::Vanished(key.clone()),
            StoreError::Shared(why) => StoreError::Shared(why.clone()),
        }
    }
}

impl Classify for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Unavailable | StoreError::Shared(_) => ErrorKind::Unavailable,
            StoreError::TooLarge { .. } => ErrorKind::Invalid,
            StoreError::NoRoom { .. } => ErrorKind::Exhausted,
            // Removed on detection: for the caller the blob is not there (upload it again).
            StoreError::Corrupt(_) | StoreError::Vanished(_) => ErrorKind::Missing,
            StoreError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }

    /// Names what failed but not the server's paths (those go to the log).
    fn client_message(&self) -> String {
        match self {
            StoreError::Io { op, source, .. } => {
                format!("the server could not {op} the blob: {source}")
            }
            other => other.to_string(),
        }
    }
}
