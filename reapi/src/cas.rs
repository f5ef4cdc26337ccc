//! The CAS as the control plane and the worker use it, whichever store answers: the server's
//! own chain of tiers, a worker's local CAS, or another server over gRPC (and, later, a peer
//! worker). Code that only needs blobs programs against [`Cas`], so a new source of blobs is a
//! new implementation, not a new code path in its callers.
//!
//! Every implementation checks bytes against their digest before it hands them out or keeps
//! them: a caller never sees a blob whose bytes do not hash to its digest.

use crate::digest::{Digest, InstanceName};
use crate::status::{Classify, ErrorKind};
use bytes::Bytes;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;

/// What a [`Cas`] method returns.
pub type CasFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, CasError>> + Send + 'a>>;

/// A content-addressable store of blobs, local or remote.
pub trait Cas: Send + Sync {
    /// Of `digests`, those the store does not hold, in the order given (the empty blob is
    /// always held). Blobs found count as used now.
    fn find_missing<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Digest>>;

    /// Blobs read whole into memory, checked, one answer per digest in order (`None`: not
    /// held, or held damaged). For metadata and small blobs: the caller bounds the sizes it
    /// asks for.
    fn read_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Option<Bytes>>>;

    /// Writes a blob into a new file at `path`, checked; `false` (and no file) when the
    /// store does not hold it. For blobs of any size: nothing holds the whole blob in memory.
    fn read_to_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, bool>;

    /// Stores blobs held in memory. Each one's bytes must hash to its digest: a store that
    /// cannot trust its caller checks them (a server does), one that can may not.
    fn write_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        blobs: Vec<(Digest, Bytes)>,
    ) -> CasFuture<'a, ()>;

    /// Stores the file at `path`, whose bytes hash to `digest` and will not change while it
    /// is stored (a local store may link it rather than copy it).
    fn write_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, ()>;

    /// Holds room for `bytes` of temp files the caller is about to write beside the store
    /// (a splice's concatenation, a copy to split): a store with a cap counts them against it
    /// until the hold is dropped, evicting old blobs to make room, and refuses
    /// (`RESOURCE_EXHAUSTED`) when no eviction could. A store that keeps no cap holds nothing.
    fn hold_room(&self, bytes: u64) -> CasFuture<'_, RoomHold> {
        let _ = bytes;
        Box::pin(async { Ok(RoomHold::none()) })
    }
}

/// Room a store holds for a caller's temp files ([`Cas::hold_room`]), until dropped.
pub struct RoomHold(Option<Box<dyn Send + Sync>>);

impl RoomHold {
    /// Holds nothing.
    pub fn none() -> RoomHold {
        RoomHold(None)
    }

    /// Holds what `hold` holds, until dropped.
    pub fn new(hold: impl Send + Sync + 'static) -> RoomHold {
        RoomHold(Some(Box::new(hold)))
    }
}

impl std::fmt::Debug for RoomHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "RoomHold"
        } else {
            "RoomHold(none)"
        })
    }
}

/// One blob read whole into memory, checked; `None` when the store does not hold it.
pub async fn read_blob(
    cas: &dyn Cas,
    instance: &InstanceName,
    digest: Digest,
) -> Result<Option<Bytes>, CasError> {
    let mut found = cas
        .read_blobs(instance, std::slice::from_ref(&digest))
        .await?;
    Ok(found.pop().flatten())
}

/// Why a [`Cas`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    /// The store in this process failed; `detail` is for the log, `message` for a client.
    #[error("{detail}")]
    Local {
        /// What kind of failure (the store error's own).
        kind: ErrorKind,
        /// What a client may be told.
        message: String,
        /// The whole error, for the log (may name local paths).
        detail: String,
    },
    /// Another server refused the call, failed it, or could not be reached; or its answer
    /// broke the protocol (then `DATA_LOSS`, with what was wrong).
    #[error("the remote CAS: {}: {}", .0.code(), .0.message())]
    Remote(tonic::Status),
}

impl CasError {
    /// A failure of a store in this process, from its own error.
    pub fn local(error: &impl Classify) -> CasError {
        CasError::Local {
            kind: error.kind(),
            message: error.client_message(),
            detail: error.to_string(),
        }
    }

    /// A local I/O failure while `doing` something for a call (a download's file).
    pub fn io(doing: &str, error: &std::io::Error) -> CasError {
        CasError::Local {
            kind: ErrorKind::of_io(error),
            message: format!("{doing}: {error}"),
            detail: format!("{doing}: {error}"),
        }
    }

    /// An answer from another server that breaks the protocol.
    pub fn bad_answer(what: impl Into<String>) -> CasError {
        CasError::Remote(tonic::Status::data_loss(what.into()))
    }

    /// Whether the failure says a blob is not there (a remote `NOT_FOUND`, or a local store's
    /// missing blob).
    pub fn is_missing(&self) -> bool {
        match self {
            CasError::Local { kind, .. } => *kind == ErrorKind::Missing,
            CasError::Remote(s) => s.code() == tonic::Code::NotFound,
        }
    }
}

impl Classify for CasError {
    /// A local store's failure keeps its kind. Another server's is [`ErrorKind::Unavailable`]
    /// (a part the request needs failed: retry), except a missing blob, which stays
    /// [`ErrorKind::Missing`] so that callers can ask for it to be uploaded.
    fn kind(&self) -> ErrorKind {
        match self {
            CasError::Local { kind, .. } => *kind,
            CasError::Remote(s) if s.code() == tonic::Code::NotFound => ErrorKind::Missing,
            CasError::Remote(_) => ErrorKind::Unavailable,
        }
    }

    fn client_message(&self) -> String {
        match self {
            CasError::Local { message, .. } => message.clone(),
            remote => remote.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_remote_failure_is_unavailable_unless_the_blob_is_missing() {
        let missing = CasError::Remote(tonic::Status::not_found("gone"));
        assert_eq!(missing.kind(), ErrorKind::Missing);
        assert!(missing.is_missing());
        let refused = CasError::Remote(tonic::Status::invalid_argument("no"));
        assert_eq!(refused.kind(), ErrorKind::Unavailable);
        assert!(!refused.is_missing());
        assert_eq!(
            CasError::bad_answer("too long").status().code(),
            tonic::Code::Unavailable
        );
    }

    #[test]
    fn a_local_failure_keeps_its_kind_and_hides_its_detail() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e = CasError::io("writing a downloaded blob", &full);
        assert_eq!(e.kind(), ErrorKind::Exhausted);
        assert!(e.client_message().starts_with("writing a downloaded blob"));
        #[derive(Debug, thiserror::Error)]
        #[error("read /srv/secret/cas/ab: broken")]
        struct Secret;
        impl Classify for Secret {
            fn kind(&self) -> ErrorKind {
                ErrorKind::Internal
            }
            fn client_message(&self) -> String {
                "the CAS could not read a blob".into()
            }
        }
        let e = CasError::local(&Secret);
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert_eq!(e.client_message(), "the CAS could not read a blob");
        assert!(e.to_string().contains("/srv/secret"));
    }
}
