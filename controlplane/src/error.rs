//! Errors of the control-plane services and their gRPC statuses (mapped here, once).

use kiln_dataplane::store::StoreError;
use kiln_reapi::digest::{DigestError, InstanceNameError};
use kiln_reapi::status::{Classify, ErrorKind};
use tonic::Status;

/// A failed control-plane request.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A malformed digest or unsupported digest function.
    #[error("{0}")]
    Digest(#[from] DigestError),
    /// An unacceptable instance name.
    #[error("invalid instance name: {0}")]
    Instance(#[from] InstanceNameError),
    /// A required field is missing.
    #[error("missing field {0}")]
    MissingField(&'static str),
    /// A digest inside a message is malformed.
    #[error("{field}: {source}")]
    FieldDigest {
        field: String,
        #[source]
        source: DigestError,
    },
    /// The entry is not there.
    #[error("{0}")]
    NotFound(String),
    /// The entry is there but references blobs the CAS no longer holds: served as a miss.
    #[error("{0}")]
    Incomplete(String),
    /// A result no completeness check could ever find complete, since it names a malformed
    /// tree: storing it would only make misses.
    #[error("action result not stored: no check could find it complete: {0}")]
    Uncheckable(String),
    /// A result whose completeness check needs more than this server allows (more digests
    /// than `action_cache.max_check_digests`, or a tree blob larger than a check reads; the
    /// message names which): storing it would only make misses.
    #[error("action result not stored: too large to check: {0}")]
    OverCheckBudget(String),
    /// A value over a configured limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        size: u64,
        limit: u64,
    },
    /// The CAS failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A CAS call failed.
    #[error(transparent)]
    Cas(#[from] kiln_reapi::cas::CasError),
    /// Redis failed (or did not answer in time).
    #[error(transparent)]
    Redis(#[from] kiln_redis::RedisError),
    /// Local file I/O failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl ControlError {
    /// Wraps an I/O error.
    pub fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> ControlError {
        ControlError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl Classify for ControlError {
    fn kind(&self) -> ErrorKind {
        match self {
            ControlError::Digest(_)
            | ControlError::Instance(_)
            | ControlError::MissingField(_)
            | ControlError::FieldDigest { .. }
            | ControlError::Uncheckable(_)
            | ControlError::TooLarge { .. } => ErrorKind::Invalid,
            ControlError::NotFound(_) | ControlError::Incomplete(_) => ErrorKind::Missing,
            ControlError::OverCheckBudget(_) => ErrorKind::Precondition,
            ControlError::Store(e) => e.kind(),
            ControlError::Cas(e) => e.kind(),
            ControlError::Redis(e) => e.kind(),
            ControlError::Io { source, .. } => ErrorKind::of_io(source),
        }
    }

    /// The error, except that I/O failures name what failed but not the server's paths (those go to the log).
    fn client_message(&self) -> String {
        match self {
            ControlError::Store(e) => e.client_message(),
            ControlError::Cas(e) => e.client_message(),
            ControlError::Io { op, source, .. } => format!("the server could not {op}: {source}"),
            _ => self.to_string(),
        }
    }
}

impl From<ControlError> for Status {
    fn from(e: ControlError) -> Status {
        if e.kind().is_server_fault() {
            tracing::error!(error = %e, "control-plane request failed");
        } else {
            tracing::debug!(error = %e, "control-plane request refused");
        }
        e.status()
    }
}
